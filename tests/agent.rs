//! The guest agent and its client, on the host, without a VM: each test
//! starts `microvm-init agent --unix SOCKET` and drives it with
//! `microvm exec --unix` / `microvm cp --unix`.
//!
//! The agent binary belongs to another package (init/), so Cargo gives us
//! no `CARGO_BIN_EXE_` path for it. `$MICROVM_AGENT_BIN` or
//! `$MICROVM_INIT` (the static build; scripts/test sets it) if set; else,
//! under cargo (`$CARGO` set), it is built once per run with that cargo
//! into a target directory of its own under CARGO_TARGET_TMPDIR (the outer
//! `cargo test` may still hold the lock on the main one), so it is never
//! stale; else the `microvm-init` that `cargo build --workspace` put beside
//! `microvm`. Some tests need root (uid/gid switching) and
//! say so when they skip.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use microvm_init::agent_proto::{read_frame, write_frame, Frame, VERSION};

fn agent_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // The static build scripts/build-guest.sh made (scripts/test sets it).
        for var in ["MICROVM_AGENT_BIN", "MICROVM_INIT"] {
            if let Some(p) = std::env::var_os(var).filter(|p| Path::new(p).is_file()) {
                return PathBuf::from(p);
            }
        }
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("agent-init");
        if let Some(cargo) = std::env::var_os("CARGO") {
            let st = Command::new(cargo)
                .args(["build", "-q", "-p", "microvm-init", "--bin", "microvm-init"])
                .arg("--manifest-path")
                .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
                .env("CARGO_TARGET_DIR", &dir)
                .status()
                .expect("run cargo build -p microvm-init");
            assert!(st.success(), "cargo build -p microvm-init failed");
            return dir.join("debug/microvm-init");
        }
        // Run without cargo (the nested lane runs the executable in its
        // L1): what `cargo build --workspace` left beside microvm, or an
        // earlier run's build.
        let beside = Path::new(env!("CARGO_BIN_EXE_microvm")).with_file_name("microvm-init");
        [beside, dir.join("debug/microvm-init")]
            .into_iter()
            .find(|p| p.is_file())
            .expect("no microvm-init: set MICROVM_AGENT_BIN or run under cargo")
    })
}

fn microvm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_microvm"))
}

fn is_root() -> bool {
    // SAFETY: geteuid(2) has no arguments.
    unsafe { libc::geteuid() == 0 }
}

/// A running agent on its own socket, killed when dropped.
struct Agent {
    child: Child,
    sock: PathBuf,
    dir: PathBuf,
}

impl Agent {
    fn start(name: &str) -> Agent {
        let dir = std::env::temp_dir().join(format!("microvm-agent-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("agent.sock");
        let child = Command::new(agent_bin())
            .arg("agent")
            .arg("--unix")
            .arg(&sock)
            .stdin(Stdio::null())
            .spawn()
            .expect("start the agent");
        let deadline = Instant::now() + Duration::from_secs(60);
        while UnixStream::connect(&sock).is_err() {
            assert!(Instant::now() < deadline, "the agent never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
        Agent { child, sock, dir }
    }

    fn exec(&self, args: &[&str]) -> Command {
        let mut c = microvm();
        c.arg("exec").arg("--unix").arg(&self.sock).args(args);
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.exec(args)
            .stdin(Stdio::null())
            .output()
            .expect("run microvm exec")
    }

    fn cp(&self, src: &str, dst: &str) -> Output {
        microvm()
            .arg("cp")
            .arg("--unix")
            .arg(&self.sock)
            .args([src, dst])
            .output()
            .expect("run microvm cp")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn exit_codes_and_signals() {
    let a = Agent::start("status");
    assert_eq!(a.run(&["--", "true"]).status.code(), Some(0));
    assert_eq!(a.run(&["--", "false"]).status.code(), Some(1));
    assert_eq!(a.run(&["--", "sh", "-c", "exit 7"]).status.code(), Some(7));
    let killed = a.run(&["--", "sh", "-c", "kill -9 $$"]);
    assert_eq!(killed.status.code(), Some(128 + 9));
    let missing = a.run(&["--", "no-such-command-here"]);
    assert_eq!(missing.status.code(), Some(127));
    assert!(text(&missing.stderr).contains("no-such-command-here"));
}

#[test]
fn stdout_and_stderr_kept_apart() {
    let a = Agent::start("stdio");
    let out = a.run(&[
        "--",
        "sh",
        "-c",
        "echo to-out; echo to-err >&2; echo more-out",
    ]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(text(&out.stdout), "to-out\nmore-out\n");
    assert_eq!(text(&out.stderr), "to-err\n");
}

#[test]
fn env_cwd_and_user() {
    let a = Agent::start("env");
    let out = a.run(&[
        "--env",
        "GREETING=hi there",
        "--cwd",
        "/tmp",
        "--",
        "sh",
        "-c",
        "echo \"$GREETING\"; pwd",
    ]);
    assert_eq!(text(&out.stdout), "hi there\n/tmp\n");
    if !is_root() {
        eprintln!("SKIPPED: --user needs root");
        return;
    }
    let out = a.run(&[
        "--user",
        "1234:5678",
        "--",
        "sh",
        "-c",
        "id -u; id -g; id -G",
    ]);
    assert_eq!(
        text(&out.stdout),
        "1234\n5678\n5678\n",
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn stdin_64_mib_through_sha256sum() {
    let a = Agent::start("stdin");
    // Not random, but no run of a period a hash would hide.
    let mut data = vec![0u8; 64 << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let file = a.dir.join("input");
    std::fs::write(&file, &data).unwrap();
    let host = Command::new("sha256sum").arg(&file).output().unwrap();
    let host_hash = text(&host.stdout).split(' ').next().unwrap().to_string();
    let out = a
        .exec(&["--", "sha256sum"])
        .stdin(std::fs::File::open(&file).unwrap())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), format!("{host_hash}  -\n"));
    // And back out through stdout, whole.
    let mut child = a
        .exec(&["--", "cat"])
        .stdin(std::fs::File::open(&file).unwrap())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut echoed = Vec::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_end(&mut echoed)
        .unwrap();
    assert!(child.wait().unwrap().success());
    assert!(echoed == data, "cat gave back {} bytes", echoed.len());
}

#[test]
fn tty_exec() {
    let a = Agent::start("tty");
    // Our stdin is no terminal, so the client asks for 24x80.
    let out = a.run(&["--tty", "--", "sh", "-c", "stty size; tty; echo $TERM"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let s = text(&out.stdout);
    let lines: Vec<&str> = s.lines().map(str::trim_end).collect();
    assert_eq!(lines[0], "24 80", "{s:?}");
    assert!(lines[1].starts_with("/dev/pts/"), "{s:?}");
    assert_eq!(lines[2], "xterm-256color");
    // stdin reaches a TTY command too, and its exit status comes back.
    let mut child = a
        .exec(&["--tty", "--", "sh", "-c", "read l; echo got:$l; exit 3"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"hello\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(
        text(&out.stdout).contains("got:hello"),
        "{:?}",
        text(&out.stdout)
    );
}

#[test]
fn twenty_at_once() {
    let a = Agent::start("many");
    // Each command waits until all 20 have started: run one after the
    // other they could not finish (each gives up after 60 s with 99).
    let dir = std::env::temp_dir().join(format!("microvm-agent-many-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let d = dir.display();
    let children: Vec<_> = (0..20)
        .map(|i| {
            let script = format!(
                "touch {d}/{i}; n=0; while [ $(ls {d} | wc -l) -lt 20 ]; do \
                 n=$((n + 1)); [ $n -gt 600 ] && exit 99; sleep 0.1; done; echo n{i}; exit {i}"
            );
            a.exec(&["--", "sh", "-c", &script])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (i, c) in children.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(i32::try_from(i).unwrap()),
            "exec {i}"
        );
        assert_eq!(text(&out.stdout), format!("n{i}\n"));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn ctrl_c_reaches_the_command() {
    let a = Agent::start("sigint");
    let mut child = a
        .exec(&["--", "sh", "-c", "echo ready; exec sleep 100"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = [0u8; 6];
    child.stdout.take().unwrap().read_exact(&mut line).unwrap();
    assert_eq!(&line, b"ready\n");
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid, libc::SIGINT) };
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(128 + libc::SIGINT));
}

#[test]
fn a_client_that_goes_away_takes_its_command_with_it() {
    let a = Agent::start("hangup");
    let mut child = a
        .exec(&["--", "sh", "-c", "echo $$; exec sleep 100"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut buf = Vec::new();
    let mut b = [0u8; 1];
    while out.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
        buf.push(b[0]);
    }
    let pid: u32 = text(&buf).trim().parse().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let deadline = Instant::now() + Duration::from_secs(60);
    // Gone, or a zombie on its way (the agent reaps it).
    while proc_dir.exists()
        && !std::fs::read_to_string(proc_dir.join("stat")).is_ok_and(|s| s.contains(") Z"))
    {
        assert!(Instant::now() < deadline, "sleep {pid} still runs");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn tree_sums(root: &Path) -> Vec<(String, String, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let out = Command::new("sh")
        .arg("-c")
        .arg("find . -type f | LC_ALL=C sort | xargs sha256sum")
        .current_dir(root)
        .output()
        .unwrap();
    text(&out.stdout)
        .lines()
        .map(|l| {
            let (sum, name) = l.split_once("  ").unwrap();
            let mode = std::fs::metadata(root.join(name))
                .unwrap()
                .permissions()
                .mode();
            (name.to_string(), sum.to_string(), mode & 0o7777)
        })
        .collect()
}

#[test]
fn copy_a_directory_both_ways() {
    let a = Agent::start("cp");
    let src = a.dir.join("src");
    std::fs::create_dir_all(src.join("sub/deeper")).unwrap();
    std::fs::write(src.join("small"), b"hello\n").unwrap();
    let big: Vec<u8> = (0..3_000_000u32)
        .map(|i| u8::try_from(i * 7 % 253).unwrap())
        .collect();
    std::fs::write(src.join("sub/big"), &big).unwrap();
    std::fs::write(src.join("sub/deeper/script"), b"#!/bin/sh\n").unwrap();
    std::os::unix::fs::symlink("small", src.join("link")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        src.join("sub/deeper/script"),
        std::fs::Permissions::from_mode(0o750),
    )
    .unwrap();
    // "The guest" is this host here: copy in, then back out, compare.
    let guest = a.dir.join("in-guest");
    let put = a.cp(src.to_str().unwrap(), &format!("VM:{}", guest.display()));
    assert!(put.status.success(), "{}", text(&put.stderr));
    let back = a.dir.join("back");
    let get = a.cp(&format!("VM:{}", guest.display()), back.to_str().unwrap());
    assert!(get.status.success(), "{}", text(&get.stderr));
    let want = tree_sums(&src);
    assert_eq!(want.len(), 3);
    assert_eq!(tree_sums(&guest), want);
    assert_eq!(tree_sums(&back), want);
    assert_eq!(
        std::fs::read_link(back.join("link")).unwrap(),
        Path::new("small")
    );
    // A single file into an existing directory keeps its name, as docker cp.
    let get = a.cp(
        &format!("VM:{}", guest.join("small").display()),
        a.dir.to_str().unwrap(),
    );
    assert!(get.status.success(), "{}", text(&get.stderr));
    assert_eq!(std::fs::read(a.dir.join("small")).unwrap(), b"hello\n");
    // A file into a guest directory named with a trailing slash.
    let put = a.cp(
        src.join("sub/big").to_str().unwrap(),
        &format!("VM:{}/", guest.display()),
    );
    assert!(put.status.success(), "{}", text(&put.stderr));
    assert!(std::fs::read(guest.join("big")).unwrap() == big);
    // What is not there is an error with its reason, exit 125.
    let missing = a.cp("VM:/no/such/path", a.dir.join("x").to_str().unwrap());
    assert_eq!(missing.status.code(), Some(125));
    assert!(
        text(&missing.stderr).contains("No such file"),
        "{}",
        text(&missing.stderr)
    );
}

#[test]
fn copy_keeps_owners_with_archive() {
    if !is_root() {
        eprintln!("SKIPPED: chown needs root");
        return;
    }
    let a = Agent::start("cp-owner");
    let src = a.dir.join("owned");
    std::fs::write(&src, b"x").unwrap();
    std::os::unix::fs::chown(&src, Some(4321), Some(8765)).unwrap();
    let dst = a.dir.join("copied");
    let out = microvm()
        .args(["cp", "-a", "--unix"])
        .arg(&a.sock)
        .arg(&src)
        .arg(format!("VM:{}", dst.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(&dst).unwrap();
    assert_eq!((m.uid(), m.gid()), (4321, 8765));
}

/// A raw connection that has said hello.
fn greeted(a: &Agent) -> UnixStream {
    let mut s = UnixStream::connect(&a.sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write_frame(&mut s, &Frame::Hello { version: VERSION }).unwrap();
    assert_eq!(
        read_frame(&mut s).unwrap(),
        Some(Frame::Hello { version: VERSION })
    );
    s
}

/// The agent answers with an Error frame and closes.
fn refused(mut s: UnixStream) {
    match read_frame(&mut s) {
        Ok(Some(Frame::Error(_))) => {}
        other => panic!("expected an Error frame, got {other:?}"),
    }
    assert!(matches!(read_frame(&mut s), Ok(None) | Err(_)));
}

#[test]
fn bad_frames_close_only_their_connection() {
    let a = Agent::start("bad");
    // Garbage instead of a hello.
    let mut s = UnixStream::connect(&a.sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    refused(s);
    // Another version.
    let mut s = UnixStream::connect(&a.sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write_frame(&mut s, &Frame::Hello { version: 999 }).unwrap();
    refused(s);
    // A length past the bound, after the hello.
    let mut s = greeted(&a);
    s.write_all(&[0xff, 0xff, 0xff, 0x7f, 0x11]).unwrap();
    refused(s);
    // An unknown kind.
    let mut s = greeted(&a);
    s.write_all(&[0, 0, 0, 0, 0x66]).unwrap();
    refused(s);
    // An agent-to-host frame sent to the agent.
    let mut s = greeted(&a);
    write_frame(
        &mut s,
        &Frame::Exit(microvm_init::agent_proto::ExitStatus::Code(0)),
    )
    .unwrap();
    refused(s);
    // A put whose data stream turns into something else.
    let mut s = greeted(&a);
    let put = microvm_init::agent_proto::PutRequest {
        path: a.dir.join("half").display().to_string(),
        payload: microvm_init::agent_proto::Payload::File,
        mode: 0o644,
        owner: None,
    };
    write_frame(&mut s, &Frame::Put(put)).unwrap();
    write_frame(&mut s, &Frame::Data(b"abc".to_vec())).unwrap();
    write_frame(&mut s, &Frame::Signal(2)).unwrap();
    refused(s);
    // More stdin than the window allows, to a command that does not read.
    let mut s = greeted(&a);
    let req = microvm_init::agent_proto::ExecRequest {
        argv: vec!["sleep".into(), "100".into()],
        ..Default::default()
    };
    write_frame(&mut s, &Frame::Exec(req)).unwrap();
    let chunk = vec![0u8; microvm_init::agent_proto::MAX_FRAME];
    let mut refused_it = false;
    for _ in 0..4 {
        if write_frame(&mut s, &Frame::Stdin(chunk.clone())).is_err() {
            refused_it = true;
            break;
        }
    }
    if !refused_it {
        // The window is 1 MiB: the second chunk is over it. Error, then
        // Exit of the killed command, or just the close.
        let mut saw_error = false;
        while let Ok(Some(f)) = read_frame(&mut s) {
            saw_error |= matches!(f, Frame::Error(_));
        }
        assert!(saw_error);
    }
    // Too little entropy in a resumed (a bounded field; the clock is not
    // touched: the frame is refused before anything is done).
    let mut s = greeted(&a);
    let short = [[36u8, 0, 0, 0, 0x30].as_slice(), &[0u8; 36]].concat();
    s.write_all(&short).unwrap();
    refused(s);
    // Through all that, the agent still serves.
    assert_eq!(a.run(&["--", "true"]).status.code(), Some(0));
}

#[test]
fn tty_size_and_resize_frames() {
    let a = Agent::start("resize");
    let mut s = greeted(&a);
    let req = microvm_init::agent_proto::ExecRequest {
        argv: vec![
            "sh".into(),
            "-c".into(),
            "stty size; read x; stty size".into(),
        ],
        tty: true,
        rows: 10,
        cols: 20,
        ..Default::default()
    };
    write_frame(&mut s, &Frame::Exec(req)).unwrap();
    let mut out = String::new();
    let mut resized = false;
    let status = loop {
        match read_frame(&mut s).unwrap() {
            Some(Frame::Stdout(d)) => out.push_str(&text(&d)),
            Some(Frame::StdinAck(_)) => {}
            Some(Frame::Exit(st)) => break st,
            other => panic!("{other:?} after {out:?}"),
        }
        if !resized && out.contains("10 20") {
            write_frame(
                &mut s,
                &Frame::Resize {
                    rows: 30,
                    cols: 100,
                },
            )
            .unwrap();
            write_frame(&mut s, &Frame::Stdin(b"\n".to_vec())).unwrap();
            resized = true;
        }
    };
    assert_eq!(status, microvm_init::agent_proto::ExitStatus::Code(0));
    let sizes: Vec<&str> = out
        .lines()
        .map(str::trim)
        .filter(|l| l.contains(' '))
        .collect();
    assert_eq!(sizes, ["10 20", "30 100"], "{out:?}");
}

/// A stand-in for the VM's hybrid vsock socket: reads `CONNECT <port>\n`,
/// answers `OK 1073741824\n` and splices the connection to the agent's
/// Unix socket if the port is 52, closes it otherwise. Serves `n`
/// connections; the lines it read come back from the join handle.
fn fake_hybrid_vsock(a: &Agent, n: usize) -> (PathBuf, std::thread::JoinHandle<Vec<String>>) {
    let path = a.dir.join("vsock.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let agent = a.sock.clone();
    let h = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for _ in 0..n {
            let (mut host, _) = listener.accept().unwrap();
            let mut line = Vec::new();
            let mut b = [0u8; 1];
            while host.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
                line.push(b[0]);
            }
            let line = text(&line);
            let ok = line == "CONNECT 52";
            lines.push(line);
            if !ok {
                continue;
            }
            host.write_all(b"OK 1073741824\n").unwrap();
            let guest = UnixStream::connect(&agent).unwrap();
            let (mut h2, mut g2) = (host.try_clone().unwrap(), guest.try_clone().unwrap());
            let up = std::thread::spawn(move || {
                let _ = std::io::copy(&mut h2, &mut g2);
                let _ = g2.shutdown(std::net::Shutdown::Write);
            });
            let (mut g, mut h) = (guest, host);
            let _ = std::io::copy(&mut g, &mut h);
            let _ = h.shutdown(std::net::Shutdown::Both);
            let _ = up.join();
        }
        lines
    });
    (path, h)
}

#[test]
fn through_the_hybrid_vsock_handshake() {
    let a = Agent::start("vsock");
    let (vsock, served) = fake_hybrid_vsock(&a, 2);
    let out = microvm()
        .arg("exec")
        .arg("--vsock")
        .arg(&vsock)
        .args(["--", "sh", "-c", "echo via vsock; exit 5"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "via vsock\n");
    // No listener on that port: the socket closes without OK.
    let out = microvm()
        .arg("exec")
        .arg("--vsock")
        .arg(&vsock)
        .args(["--port", "53", "--", "true"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("vsock port 53"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(served.join().unwrap(), ["CONNECT 52", "CONNECT 53"]);
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn a_reader_that_stops_stops_the_command_not_the_agent() {
    let a = Agent::start("backpressure");
    // 1 GiB of output that nobody reads for a while.
    let mut child = a
        .exec(&["--", "head", "-c", "1073741824", "/dev/zero"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let agent_rss = rss_kib(a.child.id());
    let client_rss = rss_kib(child.id());
    assert!(agent_rss < 64 << 10, "agent RSS {agent_rss} KiB");
    assert!(client_rss < 64 << 10, "client RSS {client_rss} KiB");
    // Reading again lets it all through.
    let mut n = 0u64;
    let mut out = child.stdout.take().unwrap();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match out.read(&mut buf).unwrap() {
            0 => break,
            k => n += u64::try_from(k).unwrap(),
        }
    }
    assert!(child.wait().unwrap().success());
    assert_eq!(n, 1 << 30);
}
