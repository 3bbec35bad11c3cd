//! End-to-end: container images made with tools that are not ours (umoci,
//! skopeo), converted with `microvm image build`, booted.
//!
//! - The Flask app as an OCI archive: the cached bookworm tree as one layer,
//!   the app as a second, Cmd/Env/WorkingDir/ExposedPorts set by umoci. It
//!   answers `Hello, World!` over virtio-net (inside a network namespace this
//!   test creates) and prints the Env value and WorkingDir it got.
//! - A busybox-only image (no libc, no shell but busybox) as a docker-save
//!   tarball made by skopeo, with a layer that deletes a lower file (umoci's
//!   whiteout) and one with an opaque directory: `-- echo hi` exits 0 and its
//!   entrypoint sees the whiteouts applied and runs as the image's User in
//!   its WorkingDir; its `false` Cmd exits 1.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const HOST_IP: &str = "10.214.0.1";
const GUEST_IP: &str = "10.214.0.2";

/// The static init built by init/build.sh.
fn init_binary() -> Option<PathBuf> {
    artifact("MICROVM_INIT", "init/microvm-init", "init/build.sh")
}

/// A tool on PATH, or None after reporting.
fn tool(name: &str) -> Option<()> {
    match Command::new(name).arg("--version").output() {
        Ok(o) if o.status.success() => Some(()),
        _ => {
            missing(&format!("{name} is not installed (scripts/deps.sh)"));
            None
        }
    }
}

/// Run a host command; panic with its output if it fails.
fn sh(argv: &[&str]) {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {argv:?}: {e}"));
    assert!(
        out.status.success(),
        "{argv:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn p(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

/// `microvm image build SOURCE -o OUT`, asserting success.
fn image_build(source: &Path, out: &Path, init: &Path) {
    let r = Command::new(microvm_bin())
        .args(["image", "build", p(source), "-o", p(out), "--init", p(init)])
        .output()
        .expect("run microvm image build");
    assert!(
        r.status.success(),
        "microvm image build {} failed:\n{}",
        source.display(),
        String::from_utf8_lossy(&r.stderr)
    );
}

/// The newest debootstrap'd tree rootfs/build.sh cached.
fn bookworm_tree() -> Option<PathBuf> {
    if let Some(t) = std::env::var_os("MICROVM_ROOTFS_TREE") {
        return Some(PathBuf::from(t));
    }
    let dir = cache_dir().join("rootfs");
    let newest = std::fs::read_dir(&dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("base-"))
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok());
    match newest {
        Some(e) => Some(e.path()),
        None => {
            missing(&format!(
                "no base-* tree in {} (set MICROVM_ROOTFS_TREE or run rootfs/build.sh)",
                dir.display()
            ));
            None
        }
    }
}

/// umoci: a new layout at `layout` with tag `latest`, unpacked at `bundle`.
fn umoci_new(layout: &Path, bundle: &Path) -> String {
    let image = format!("{}:latest", p(layout));
    sh(&["umoci", "init", "--layout", p(layout)]);
    sh(&["umoci", "new", "--image", &image]);
    sh(&["umoci", "unpack", "--image", &image, p(bundle)]);
    image
}

#[test]
fn flask_image_answers_and_sees_its_config() {
    let Some(kernel) = boot_prereqs() else { return };
    let (Some(init), Some(tree)) = (init_binary(), bookworm_tree()) else {
        return;
    };
    let (Some(()), Some(())) = (tool("umoci"), tool("curl")) else {
        return;
    };
    let dir = TempDir::new("image-flask");
    let (layout, bundle) = (dir.path("layout"), dir.path("bundle"));
    let image = umoci_new(&layout, &bundle);
    let rootfs = bundle.join("rootfs");
    // Each step below takes minutes in the nested lane's emulated L1 and
    // prints nothing of its own: say what runs, so that a slow, busy machine
    // does not look like a stalled one (tests/nested/run.sh --stall).
    // Layer 1: the distribution; layer 2: the app, as a Dockerfile would.
    let step = Step::start("image: copy the bookworm tree into the bundle");
    sh(&[
        "cp",
        "-a",
        "--reflink=auto",
        &format!("{}/.", p(&tree)),
        p(&rootfs),
    ]);
    drop(step);
    let step = Step::start("image: umoci repack (layer 1, the distribution)");
    sh(&["umoci", "repack", "--image", &image, p(&bundle)]);
    drop(step);
    let app = Path::new(env!("CARGO_MANIFEST_DIR")).join("rootfs/app/app.py");
    std::fs::create_dir_all(rootfs.join("app")).unwrap();
    std::fs::copy(&app, rootfs.join("app/app.py")).unwrap();
    let step = Step::start("image: umoci repack (layer 2, the app) and config");
    sh(&["umoci", "repack", "--image", &image, p(&bundle)]);
    sh(&[
        "umoci",
        "config",
        "--image",
        &image,
        "--config.cmd",
        "python3",
        "--config.cmd",
        "/app/app.py",
        "--config.exposedports",
        "80/tcp",
        "--config.env",
        "APP_MESSAGE=set-by-the-image-config",
        "--config.env",
        "PYTHONUNBUFFERED=1",
        "--config.workingdir",
        "/app",
    ]);
    sh(&["umoci", "gc", "--layout", p(&layout)]);
    drop(step);
    // As an OCI archive: the layout directory in a tar.
    let step = Step::start("image: tar the layout, microvm image build");
    let archive = dir.path("flask-oci.tar");
    sh(&["tar", "-C", p(&layout), "-cf", p(&archive), "."]);
    let disk = dir.path("flask.ext4");
    image_build(&archive, &disk, &init);
    drop(step);

    let Some(ns) = Netns::create() else { return };
    let mut vm = NetVm::boot(&ns, &kernel, &disk, HOST_IP, GUEST_IP);
    let ready = vm.wait_for("microvm-init: app ready on port 80");
    eprintln!(
        "image: boot to Flask app ready: {:.1} s",
        ready.as_secs_f64()
    );
    if !vm.console_has("app: starting in /app, APP_MESSAGE=set-by-the-image-config") {
        vm.fail("the app did not get the image's WorkingDir and Env");
    }
    let one = ns.exec(&[
        "curl",
        "-s",
        "--max-time",
        "120",
        &format!("http://{GUEST_IP}/"),
    ]);
    let body = String::from_utf8_lossy(&one.stdout).to_string();
    if body.trim() != "Hello, World!" {
        vm.fail(&format!(
            "unexpected body {body:?} (curl: {:?})",
            one.status
        ));
    }
    vm.sigterm_gives_143();
}

/// Checks the whiteouts from inside the guest, then runs its arguments.
const ENTRYPOINT: &str = r#"#!/bin/sh
[ -e /etc/gone ] && echo "check: whiteout FAILED" || echo "check: whiteout ok"
[ -e /data/old ] || [ -e /data/sub/deep ] && echo "check: opaque FAILED" || echo "check: opaque ok"
[ -e /data/new ] && echo "check: upper ok" || echo "check: upper FAILED"
while read -r k v rest; do
    case $k in Uid:|SigBlk:) echo "check: $k $v" ;; esac
done </proc/self/status
echo "check: cwd $PWD home $HOME"
exec "$@"
"#;

#[test]
fn busybox_image_runs_commands_and_exit_codes() {
    let Some(kernel) = boot_prereqs() else { return };
    let Some(init) = init_binary() else { return };
    let (Some(()), Some(())) = (tool("umoci"), tool("skopeo")) else {
        return;
    };
    let busybox = Path::new("/bin/busybox");
    if !busybox.is_file() {
        missing("/bin/busybox (busybox-static) is not installed");
        return;
    }
    let dir = TempDir::new("image-busybox");
    let (layout, bundle) = (dir.path("layout"), dir.path("bundle"));
    let image = umoci_new(&layout, &bundle);
    let rootfs = bundle.join("rootfs");
    // Layer 1: busybox alone (static: no libc in the image) and some files.
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    std::fs::copy(busybox, rootfs.join("bin/busybox")).unwrap();
    for applet in ["sh", "echo", "false", "true", "test", "[", "cat", "ls"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
    }
    std::fs::write(rootfs.join("entrypoint.sh"), ENTRYPOINT).unwrap();
    sh(&["chmod", "0755", p(&rootfs.join("entrypoint.sh"))]);
    for (f, text) in [("etc/gone", "x"), ("data/old", "x"), ("data/sub/deep", "x")] {
        let path = rootfs.join(f);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    sh(&["umoci", "repack", "--image", &image, p(&bundle)]);
    // Layer 2: umoci writes the whiteout for the deleted file.
    std::fs::remove_file(rootfs.join("etc/gone")).unwrap();
    sh(&["umoci", "repack", "--image", &image, p(&bundle)]);
    // Layer 3: an opaque /data (made with GNU tar, added verbatim by umoci).
    let top = dir.path("top");
    std::fs::create_dir_all(top.join("data")).unwrap();
    std::fs::write(top.join("data/.wh..wh..opq"), "").unwrap();
    std::fs::write(top.join("data/new"), "upper").unwrap();
    let top_tar = dir.path("top.tar");
    sh(&[
        "tar",
        "-C",
        p(&top),
        "--owner=0",
        "--group=0",
        "-cf",
        p(&top_tar),
        "data",
    ]);
    sh(&["umoci", "raw", "add-layer", "--image", &image, p(&top_tar)]);
    sh(&[
        "umoci",
        "config",
        "--image",
        &image,
        "--config.entrypoint",
        "/entrypoint.sh",
        "--config.cmd",
        "false",
        "--config.user",
        "1000:1000",
        "--config.workingdir",
        "/data",
    ]);
    // As `docker save` would write it.
    let archive = dir.path("busybox-docker.tar");
    sh(&[
        "skopeo",
        "copy",
        "--quiet",
        &format!("oci:{}:latest", p(&layout)),
        &format!("docker-archive:{}:busybox:latest", p(&archive)),
    ]);
    let disk = dir.path("busybox.ext4");
    image_build(&archive, &disk, &init);
    let disk2 = dir.path("busybox-2.ext4");
    std::fs::copy(&disk, &disk2).unwrap();

    let deadline = boot_deadline(Duration::from_secs(60), Duration::from_secs(1200));
    let boot = |disk: &Path, cmd: &[&str]| {
        let mut a = args(&["--kernel", p(&kernel), "--rootfs", p(disk)]);
        if !cmd.is_empty() {
            a.push("--".into());
            a.extend(cmd.iter().map(|s| s.to_string()));
        }
        run(&a, None, deadline)
    };
    let r = boot(&disk, &["echo", "hi"]);
    let lines: Vec<&str> = r.stdout.lines().map(|l| l.trim_end_matches('\r')).collect();
    r.check(r.code() == Some(0), "`-- echo hi` exits 0");
    r.check(lines.contains(&"hi"), "`-- echo hi` prints hi");
    for check in ["whiteout", "opaque", "upper"] {
        r.check(
            lines.contains(&format!("check: {check} ok").as_str()),
            &format!("the guest sees the {check} layer applied"),
        );
    }
    // User and WorkingDir from the config; no signal left blocked by PID 1.
    for want in [
        "check: Uid: 1000",
        "check: SigBlk: 0000000000000000",
        "check: cwd /data home /",
    ] {
        r.check(
            lines.contains(&want),
            &format!("the entrypoint printed {want:?}"),
        );
    }
    let r = boot(&disk2, &[]);
    r.check(r.code() == Some(1), "the image's `false` Cmd exits 1");
}
