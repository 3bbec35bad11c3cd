//! Conversion tests on images built here (no boot): OCI layout, OCI archive
//! and docker archive; whiteouts; preserved metadata; hostile archives.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::source::sha256_of;
use super::*;

/// A scratch directory removed on drop.
struct Tmp(PathBuf);

impl Tmp {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("microvm-image-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A layer tar built entry by entry; `raw_name` bypasses the tar crate's own
/// path checks, to make hostile archives.
struct LayerTar(tar::Builder<Vec<u8>>);

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(1_700_000_000);
    h.set_uid(0);
    h.set_gid(0);
    h
}

fn raw_name(h: &mut tar::Header, name: &str) {
    let n = &mut h.as_old_mut().name;
    n.fill(0);
    n[..name.len()].copy_from_slice(name.as_bytes());
}

impl LayerTar {
    fn new() -> Self {
        Self(tar::Builder::new(Vec::new()))
    }
    fn dir(mut self, path: &str) -> Self {
        let mut h = header(tar::EntryType::Directory, 0o755, 0);
        raw_name(&mut h, path);
        h.set_cksum();
        self.0.append(&h, std::io::empty()).unwrap();
        self
    }
    fn file_owned(mut self, path: &str, data: &str, mode: u32, uid: u64) -> Self {
        let mut h = header(tar::EntryType::Regular, mode, data.len() as u64);
        h.set_uid(uid);
        h.set_gid(uid);
        raw_name(&mut h, path);
        h.set_cksum();
        self.0.append(&h, data.as_bytes()).unwrap();
        self
    }
    fn file(self, path: &str, data: &str) -> Self {
        self.file_owned(path, data, 0o644, 0)
    }
    fn link(mut self, kind: tar::EntryType, path: &str, target: &str) -> Self {
        let mut h = header(kind, 0o777, 0);
        raw_name(&mut h, path);
        h.set_link_name(target).unwrap();
        h.set_cksum();
        self.0.append(&h, std::io::empty()).unwrap();
        self
    }
    fn symlink(self, path: &str, target: &str) -> Self {
        self.link(tar::EntryType::Symlink, path, target)
    }
    fn xattr_file(mut self, path: &str, key: &str, value: &str) -> Self {
        let k = format!("SCHILY.xattr.{key}");
        self.0
            .append_pax_extensions([(k.as_str(), value.as_bytes())])
            .unwrap();
        self.file(path, "x")
    }
    fn bytes(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

const CONFIG_BODY: &str = r#""config":{"Entrypoint":["/entry"],"Cmd":["false"],"Env":["PATH=/bin","MSG=hi there"],"WorkingDir":"/work","User":"1000:1000","ExposedPorts":{"80/tcp":{},"53/udp":{}}}"#;

fn config_json(diff_ids: &[String]) -> Vec<u8> {
    let ids: Vec<String> = diff_ids.iter().map(|d| format!("\"{d}\"")).collect();
    format!(
        r#"{{"architecture":"amd64","os":"linux",{CONFIG_BODY},"rootfs":{{"type":"layers","diff_ids":[{}]}}}}"#,
        ids.join(",")
    )
    .into_bytes()
}

/// An OCI layout in `dir` with `layers` as (media type, blob, uncompressed tar).
fn oci_layout(dir: &Path, layers: &[(&str, Vec<u8>, Vec<u8>)]) {
    std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    let put = |data: &[u8]| -> (String, usize) {
        let d = sha256_of(data);
        std::fs::write(dir.join("blobs/sha256").join(&d[7..]), data).unwrap();
        (d, data.len())
    };
    let diff_ids: Vec<String> = layers.iter().map(|(_, _, t)| sha256_of(t)).collect();
    let (cd, cs) = put(&config_json(&diff_ids));
    let ls: Vec<String> = layers
        .iter()
        .map(|(mt, blob, _)| {
            let (d, s) = put(blob);
            format!(r#"{{"mediaType":"{mt}","digest":"{d}","size":{s}}}"#)
        })
        .collect();
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{cd}","size":{cs}}},"layers":[{}]}}"#,
        ls.join(",")
    );
    let (md, ms) = put(manifest.as_bytes());
    std::fs::write(
        dir.join("index.json"),
        format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{md}","size":{ms}}}]}}"#
        ),
    )
    .unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

const TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const TGZ: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const TZST: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

/// A minimal static x86-64 ELF header (no program headers) as the init.
fn fake_init(dir: &Path) -> PathBuf {
    let mut h = vec![0u8; 64];
    h[..6].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1]);
    h[18] = 62; // EM_X86_64
    let p = dir.join("fake-init");
    std::fs::write(&p, h).unwrap();
    p
}

fn opts(t: &Tmp, source: &Path) -> BuildOptions {
    BuildOptions {
        source: source.to_path_buf(),
        output: t.0.join("out/app.ext4"),
        size_mib: None,
        init: fake_init(&t.0),
        progress: false,
    }
}

fn debugfs(image: &Path, cmd: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", cmd])
        .arg(image)
        .output()
        .expect("run debugfs (e2fsprogs)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn exists(image: &Path, path: &str) -> bool {
    !debugfs(image, &format!("stat {path}")).is_empty()
}

/// The output directory holds nothing: no image, no leftover staging.
fn assert_no_output(t: &Tmp) {
    let left: Vec<_> = std::fs::read_dir(t.0.join("out")).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

fn root_user() -> bool {
    // SAFETY: geteuid(2) has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn base_layer() -> Vec<u8> {
    LayerTar::new()
        .dir("bin")
        .file_owned("bin/tool", "#!/bin/sh\n", 0o4755, 0)
        .file_owned("home/app/own", "mine", 0o600, 1000)
        .file_owned("srv/owned", "mine", 0o600, 1000)
        .link(tar::EntryType::Link, "bin/tool-hard", "bin/tool")
        .symlink("bin/sh", "tool")
        .xattr_file("bin/capped", "user.microvm", "yes")
        .file("etc/gone", "deleted by layer 2")
        .file("etc/kept", "kept")
        .file("data/old", "lower")
        .dir("data/sub")
        .file("data/sub/deep", "lower")
        .bytes()
}

fn top_layer() -> Vec<u8> {
    LayerTar::new()
        // Lower files replaced: a hard link over a file, a file over a directory.
        .file("etc/kept", "kept, upper")
        .link(tar::EntryType::Link, "bin/tool-hard", "etc/kept")
        .file("home/app", "now a file")
        .file("etc/.wh.gone", "")
        .file("data/new", "upper") // before the opaque marker: must survive it
        .file("data/.wh..wh..opq", "")
        .dir("data/sub")
        .file("data/sub/fresh", "upper")
        .bytes()
}

#[test]
fn oci_layout_layers_whiteouts_and_metadata() {
    let t = Tmp::new("layout");
    std::fs::create_dir_all(t.0.join("out")).unwrap();
    let (base, top) = (base_layer(), top_layer());
    let zstd = zstd::encode_all(&top[..], 1).unwrap();
    oci_layout(
        &t.0.join("img"),
        &[(TGZ, gzip(&base), base), (TZST, zstd, top)],
    );
    let o = opts(&t, &t.0.join("img"));
    let built = build(&o).unwrap();
    assert_eq!(built.layers, 2);
    let img = &o.output;

    // Whiteout removed the lower file; the opaque directory hid the lower
    // entries, kept this layer's own (before and after the marker).
    assert!(!exists(img, "/etc/gone") && exists(img, "/etc/kept"));
    assert!(!exists(img, "/data/old") && !exists(img, "/data/sub/deep"));
    assert!(exists(img, "/data/new") && exists(img, "/data/sub/fresh"));
    assert!(!exists(img, "/data/.wh..wh..opq") && !exists(img, "/etc/.wh.gone"));

    // Replacements by the upper layer.
    assert_eq!(debugfs(img, "cat /bin/tool-hard"), "kept, upper");
    assert!(debugfs(img, "stat /etc/kept").contains("Links: 2"));
    assert_eq!(debugfs(img, "cat /home/app"), "now a file");

    // Modes (setuid too), owners, symlinks, hard links, xattrs.
    let st = debugfs(img, "stat /bin/tool");
    assert!(st.contains("Mode:  04755"), "{st}");
    assert!(
        st.contains("Links: 1"),
        "its hard link now points elsewhere: {st}"
    );
    assert!(debugfs(img, "stat /bin/sh").contains("Fast link dest: \"tool\""));
    let own = debugfs(img, "stat /data/new");
    assert!(own.contains("Mode:  0644"), "{own}");
    let own = debugfs(img, "stat /srv/owned");
    assert!(own.contains("Mode:  0600"), "{own}");
    if root_user() {
        assert!(own.contains("User:  1000   Group:  1000"), "{own}");
    }
    assert!(debugfs(img, "ea_list /bin/capped").contains("user.microvm"));

    // The init and its config.
    assert!(debugfs(img, "stat /sbin/init").contains("Fast link dest: \"microvm-init\""));
    assert!(debugfs(img, "stat /sbin/microvm-init").contains("Mode:  0755"));
    let conf = debugfs(img, "cat /etc/microvm/init.conf");
    let c = microvm_init::ImageConfig::parse(&conf).unwrap();
    assert_eq!(c.argv(None), ["/entry", "false"]);
    assert_eq!(c.env, ["PATH=/bin", "MSG=hi there"]);
    assert_eq!(
        (c.working_dir.as_str(), c.user.as_str()),
        ("/work", "1000:1000")
    );
    assert_eq!(c.tcp_ports, [80]);
    assert!(exists(img, "/proc") && exists(img, "/tmp") && exists(img, "/etc/hosts"));
    // Nothing but the image is left next to it.
    let names: Vec<_> = std::fs::read_dir(t.0.join("out"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["app.ext4"]);
}

#[test]
fn oci_archive_and_docker_archive() {
    let t = Tmp::new("archives");
    std::fs::create_dir_all(t.0.join("out")).unwrap();
    let layer = LayerTar::new().file("bin/hello", "hello").bytes();

    // OCI archive: the layout directory as a tar.
    oci_layout(&t.0.join("img"), &[(TAR, layer.clone(), layer.clone())]);
    let mut b = tar::Builder::new(Vec::new());
    b.append_dir_all(".", t.0.join("img")).unwrap();
    std::fs::write(t.0.join("oci.tar"), b.into_inner().unwrap()).unwrap();
    let o = opts(&t, &t.0.join("oci.tar"));
    build(&o).unwrap();
    assert!(exists(&o.output, "/bin/hello"));
    std::fs::remove_file(&o.output).unwrap();

    // docker save: manifest.json, <hex>.json config, <id>/layer.tar, and a
    // second reference to the same layer through a symlink, as docker writes.
    let diff = sha256_of(&layer);
    let cfg = config_json(&[diff.clone(), diff.clone()]);
    let cfg_name = format!("{}.json", &sha256_of(&cfg)[7..]);
    let mut b = tar::Builder::new(Vec::new());
    let add = |b: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]| {
        let mut h = header(tar::EntryType::Regular, 0o644, data.len() as u64);
        h.set_path(name).unwrap();
        h.set_cksum();
        b.append(&h, data).unwrap();
    };
    add(&mut b, "aaa/layer.tar", &layer);
    let mut h = header(tar::EntryType::Symlink, 0o777, 0);
    h.set_path("bbb/layer.tar").unwrap();
    h.set_link_name("../aaa/layer.tar").unwrap();
    h.set_cksum();
    b.append(&h, std::io::empty()).unwrap();
    add(&mut b, &cfg_name, &cfg);
    let manifest = format!(
        r#"[{{"Config":"{cfg_name}","RepoTags":["t:latest"],"Layers":["aaa/layer.tar","bbb/layer.tar"]}}]"#
    );
    add(&mut b, "manifest.json", manifest.as_bytes());
    std::fs::write(t.0.join("docker.tar"), b.into_inner().unwrap()).unwrap();
    let o = opts(&t, &t.0.join("docker.tar"));
    let built = build(&o).unwrap();
    assert_eq!(built.layers, 2);
    assert!(exists(&o.output, "/bin/hello"));
    assert_eq!(built.config.cmd, ["false"]);
}

/// A file that is no image (a text file, an empty file, a tar of something
/// else) is named as such, never quoted, and is the caller's error.
#[test]
fn a_file_that_is_no_image_is_a_usage_error() {
    let t = Tmp::new("notimage");
    std::fs::create_dir_all(t.0.join("out")).unwrap();
    let text = t.0.join("passwd");
    std::fs::write(&text, "root:x:0:0:root:/root:/bin/bash\n".repeat(40)).unwrap();
    let empty = t.0.join("empty");
    std::fs::write(&empty, b"").unwrap();
    let other = t.0.join("other.tar");
    std::fs::write(&other, LayerTar::new().file("etc/hostname", "x").bytes()).unwrap();
    for src in [&text, &empty] {
        let err = build(&opts(&t, src)).unwrap_err();
        assert!(
            matches!(err, ImageError::UnknownFormat(_)),
            "{src:?}: {err}"
        );
        assert!(err.is_usage_error());
        assert!(!err.to_string().contains("root:x"), "{err}");
    }
    let err = build(&opts(&t, &other)).unwrap_err();
    assert!(matches!(err, ImageError::UnknownFormat(_)), "{err}");
    let err = build(&opts(&t, &t.0.join("missing"))).unwrap_err();
    assert!(err.is_usage_error(), "{err}");
    assert_no_output(&t);
}

/// Build `layer` as a one-layer image; the error, with nothing left behind
/// in the output directory.
fn build_fails(tag: &str, layer: Vec<u8>) -> (Tmp, ImageError) {
    let t = Tmp::new(tag);
    std::fs::create_dir_all(t.0.join("out")).unwrap();
    oci_layout(&t.0.join("img"), &[(TAR, layer.clone(), layer)]);
    let err = build(&opts(&t, &t.0.join("img"))).unwrap_err();
    assert_no_output(&t);
    (t, err)
}

#[test]
fn dotdot_entry_is_refused() {
    let layer = LayerTar::new()
        .file("ok", "1")
        .file("../../etc/x", "evil")
        .bytes();
    let (t, err) = build_fails("dotdot", layer);
    assert!(matches!(err, ImageError::Escapes { .. }), "{err}");
    assert!(err.to_string().contains("../../etc/x"), "{err}");
    // Two levels up from the staging root is the output directory's parent.
    assert!(!t.0.join("etc/x").exists() && !t.0.join("out/etc").exists());
}

#[test]
fn writing_through_an_outside_symlink_is_refused() {
    let t = Tmp::new("outside");
    let outside = t.0.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    for (tag, target) in [
        ("abs", outside.to_str().unwrap().to_string()),
        ("rel", "../../../..".into()),
    ] {
        let layer = LayerTar::new()
            .symlink("evil", &target)
            .file("evil/x", "evil")
            .bytes();
        let (_t, err) = build_fails(&format!("symlink-{tag}"), layer);
        assert!(
            matches!(err, ImageError::Escapes { .. }) && err.to_string().contains("symlink"),
            "{tag}: {err}"
        );
        assert!(!outside.join("x").exists());
    }
    // A hard link to a file outside the root.
    let layer = LayerTar::new()
        .link(tar::EntryType::Link, "passwd", "../../../../etc/passwd")
        .bytes();
    let (_t, err) = build_fails("hardlink", layer);
    assert!(matches!(err, ImageError::Escapes { .. }), "{err}");
}

#[test]
fn symlinks_inside_the_root_are_followed() {
    // Merged /usr: lib -> usr/lib, then a file through it.
    let t = Tmp::new("inside");
    std::fs::create_dir_all(t.0.join("out")).unwrap();
    let layer = LayerTar::new()
        .dir("usr/lib")
        .symlink("lib", "usr/lib")
        .file("lib/libx.so", "x")
        .bytes();
    oci_layout(&t.0.join("img"), &[(TAR, layer.clone(), layer)]);
    let o = opts(&t, &t.0.join("img"));
    build(&o).unwrap();
    assert!(exists(&o.output, "/usr/lib/libx.so"));
}

#[test]
fn bad_digests_missing_blobs_and_media_types() {
    let t = Tmp::new("digest");
    std::fs::create_dir_all(t.0.join("out")).unwrap();
    let layer = LayerTar::new().file("a", "1").bytes();
    let img = t.0.join("img");

    // The layer blob changed after its digest was taken.
    oci_layout(&img, &[(TAR, layer.clone(), layer.clone())]);
    let blob = img.join("blobs/sha256").join(&sha256_of(&layer)[7..]);
    let mut tampered = layer.clone();
    tampered[600] ^= 1; // inside the file data, not the header
    std::fs::write(&blob, &tampered).unwrap();
    let err = build(&opts(&t, &img)).unwrap_err();
    assert!(matches!(err, ImageError::Digest { .. }), "{err}");
    assert_no_output(&t);

    // A missing blob.
    std::fs::remove_file(&blob).unwrap();
    let err = build(&opts(&t, &img)).unwrap_err();
    assert!(matches!(err, ImageError::MissingBlob(_)), "{err}");
    assert_no_output(&t);

    // A media type we do not unpack.
    std::fs::remove_dir_all(&img).unwrap();
    oci_layout(
        &img,
        &[(
            "application/vnd.example.layer.v1.squashfs",
            layer.clone(),
            layer,
        )],
    );
    let err = build(&opts(&t, &img)).unwrap_err();
    assert!(matches!(err, ImageError::MediaType(_)), "{err}");
    assert_no_output(&t);

    // Neither format.
    let err = build(&opts(&t, &t.0.join("out"))).unwrap_err();
    assert!(matches!(err, ImageError::UnknownFormat(_)), "{err}");
}

#[test]
fn init_binary_must_be_static() {
    let t = Tmp::new("init");
    assert!(inject::check_init_binary(&fake_init(&t.0)).is_ok());
    // /bin/sh on the host is dynamically linked (or at least not our ELF).
    let sh = PathBuf::from("/bin/sh").canonicalize().unwrap();
    if !sh.ends_with("busybox") {
        let err = inject::check_init_binary(&sh).unwrap_err();
        assert!(err.to_string().contains("dynamically linked"), "{err}");
    }
    std::fs::write(t.0.join("script"), "#!/bin/sh\n").unwrap();
    assert!(inject::check_init_binary(&t.0.join("script")).is_err());
}
