//! `microvm-init`: PID 1 of a microvm guest, built as a static binary so that
//! it runs in any image (no libc, no shell needed there).
//!
//! It mounts the basics, tells the VMM's boot timer that user space runs,
//! sets the hostname and brings up `lo`, then starts the image's Entrypoint +
//! Cmd (or the command from `microvm.cmd=`) with its Env, WorkingDir and User
//! as its child, reaps every orphan, forwards SIGTERM/SIGINT/SIGHUP/SIGQUIT/
//! SIGUSR1/SIGUSR2, and when that child exits reports its status on the exit
//! port and reboots. The protocol is described in rootfs/README.md.
//!
//! With the argument `agent` it is the guest agent instead (`agent.rs`),
//! which PID 1 starts as its own child before the app.
//!
//! PID 1 must never exit (the kernel panics), so nothing here panics on bad
//! input: every step reports and carries on, and the end is `finish`.

mod agent;

use std::ffi::CString;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use microvm_init::{
    find_in_path, process_env, resolve_user, shell_status, tcp_listening, with_hwcaps_tunable,
    ImageConfig, KernelArgs, CONFIG_PATH, HOSTNAME,
};

/// Guest-physical address of the VMM's boot timer (one byte, MMIO).
const BOOT_TIMER_ADDR: libc::off_t = 0xC000_0000;
/// Boot timer value: user space runs.
const BOOT_TIMER_USERSPACE: u8 = 123;
/// Boot timer value: the app listens on an exposed port.
const BOOT_TIMER_APP_READY: u8 = 124;
/// I/O port the VMM reads the exit status from (written through /dev/port).
const EXIT_PORT: u64 = 0xf4;
/// Set while PID 1 re-executes itself under the AVX-free GLIBC_TUNABLES.
const STAGE_VAR: &str = "MICROVM_INIT_STAGE";
/// How often the exposed ports are checked until one listens.
const READY_POLL: Duration = Duration::from_millis(500);
/// Signals PID 1 passes on to its child.
const FORWARDED: [libc::c_int; 6] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// Whether the init's own `microvm-init:` lines go to the console.
static LOUD: AtomicBool = AtomicBool::new(true);

fn loud() -> bool {
    LOUD.load(Ordering::Relaxed)
}

fn say(msg: &str) {
    if loud() {
        let _ = writeln!(std::io::stdout(), "microvm-init: {msg}");
    }
}

/// Errors of the init itself are always printed.
fn warn(msg: &str) {
    let _ = writeln!(std::io::stderr(), "microvm-init: {msg}");
}

fn cstr(s: &str) -> CString {
    CString::new(s).unwrap_or_default()
}

fn mount(fstype: &str, target: &str, flags: libc::c_ulong, data: &str) {
    if is_mounted(target) {
        return;
    }
    let _ = std::fs::create_dir_all(target);
    let (src, t, ty, d) = (cstr(fstype), cstr(target), cstr(fstype), cstr(data));
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            t.as_ptr(),
            ty.as_ptr(),
            flags,
            d.as_ptr().cast(),
        )
    };
    if rc != 0 && loud() {
        warn(&format!(
            "mount {fstype} on {target}: {}",
            std::io::Error::last_os_error()
        ));
    }
}

fn is_mounted(target: &str) -> bool {
    std::fs::read_to_string("/proc/mounts")
        .map(|m| m.lines().any(|l| l.split(' ').nth(1) == Some(target)))
        .unwrap_or(false)
}

/// One byte to the boot timer. `/dev/mem` refuses read()/write() above the
/// end of RAM, so map the page (what busybox `devmem` does).
fn boot_timer(value: u8) {
    let path = cstr("/dev/mem");
    // SAFETY: open(2) on a valid path; the fd is closed below.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_SYNC | libc::O_CLOEXEC) };
    if fd < 0 {
        return;
    }
    // SAFETY: maps one page of /dev/mem at the timer's page-aligned address;
    // the result is checked before use and unmapped right after.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            BOOT_TIMER_ADDR,
        )
    };
    if p != libc::MAP_FAILED {
        // SAFETY: `p` is a live 4096-byte mapping; offset 0 is the timer byte.
        unsafe {
            std::ptr::write_volatile(p.cast::<u8>(), value);
            libc::munmap(p, 4096);
        }
    }
    // SAFETY: fd came from open(2) above.
    unsafe { libc::close(fd) };
}

/// Point stdin/stdout/stderr at /dev/console: the kernel may have started us
/// before the root file system had a /dev/console.
fn open_console() {
    let path = cstr("/dev/console");
    // SAFETY: open(2) on a valid path.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NOCTTY) };
    if fd < 0 {
        return;
    }
    for target in 0..3 {
        // SAFETY: dup2 of a descriptor we own onto the standard ones.
        unsafe { libc::dup2(fd, target) };
    }
    if fd > 2 {
        // SAFETY: fd is ours and no longer needed.
        unsafe { libc::close(fd) };
    }
}

/// Restart PID 1 under `GLIBC_TUNABLES` that keep the static glibc's memcpy
/// and friends off AVX (the ifuncs are resolved at startup, before `main`).
/// Returns only if exec fails; then we carry on as we are.
fn reexec_without_avx() {
    let tun = with_hwcaps_tunable(&std::env::var("GLIBC_TUNABLES").unwrap_or_default());
    let err = Command::new("/proc/self/exe")
        .args(std::env::args_os().skip(1))
        .env("GLIBC_TUNABLES", tun)
        .env(STAGE_VAR, "2")
        .exec();
    warn(&format!("cannot re-exec under GLIBC_TUNABLES: {err}"));
}

/// Start the agent (`microvm-init agent`, vsock port 52) as a child of its
/// own: PID 1's `reap` takes every orphan's status with waitpid(-1), which
/// would steal the statuses of the commands the agent runs were it here.
/// Its exit is reaped like any orphan's; it is never the app's.
fn start_agent() {
    let spawned = Command::new("/proc/self/exe")
        .arg0("microvm-init")
        .arg("agent")
        .stdin(Stdio::null())
        .spawn();
    if let Err(e) = spawned {
        warn(&format!("cannot start the agent: {e}"));
    }
}

/// The rest of the system setup, once per boot (after any re-exec).
fn setup_system() {
    let nosuid_nodev = libc::MS_NOSUID | libc::MS_NODEV;
    mount("sysfs", "/sys", nosuid_nodev | libc::MS_NOEXEC, "");
    mount("tmpfs", "/run", nosuid_nodev, "mode=0755");
    mount("tmpfs", "/tmp", nosuid_nodev, "mode=1777");
    mount(
        "devpts",
        "/dev/pts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        "gid=5,mode=620,ptmxmode=666",
    );
    mount("tmpfs", "/dev/shm", nosuid_nodev, "mode=1777");
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        if std::fs::symlink_metadata(link).is_err() {
            let _ = std::os::unix::fs::symlink(target, link);
        }
    }
    // SAFETY: the name is a valid buffer of the given length.
    unsafe { libc::sethostname(HOSTNAME.as_ptr().cast(), HOSTNAME.len()) };
    loopback_up();
}

/// `ip link set lo up` (the kernel assigns 127.0.0.1 itself; eth0 is left
/// to the kernel's `ip=` parameter).
fn loopback_up() {
    // SAFETY: plain socket(2); checked, closed below.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return;
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq we own; the
    // flags member of the union is the one these requests use.
    unsafe {
        if libc::ioctl(s, libc::SIOCGIFFLAGS, &mut req) == 0 {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(s, libc::SIOCSIFFLAGS, &req);
        }
        libc::close(s);
    }
}

/// Block the signals PID 1 handles so that `sigtimedwait` takes them without
/// races; `start` gives the child an empty mask again.
fn signal_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset right away.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        for s in FORWARDED {
            libc::sigaddset(&mut set, s);
        }
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    set
}

/// Reap every child that has exited; the main child's status if it was one.
fn reap(main_pid: libc::pid_t) -> Option<u8> {
    let mut main = None;
    loop {
        let mut st = 0;
        // SAFETY: waitpid with a valid status pointer.
        let pid = unsafe { libc::waitpid(-1, &mut st, libc::WNOHANG) };
        if pid <= 0 {
            return main;
        }
        if pid == main_pid {
            main = Some(shell_status(st));
        }
    }
}

fn is_executable(path: &str) -> bool {
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Start the process; Err(status) when it cannot be (127 not found, 126 other).
fn start(
    argv: &[String],
    cfg: &ImageConfig,
    command_mode: bool,
    noxsave: bool,
) -> Result<libc::pid_t, u8> {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    let id = resolve_user(&cfg.user, &passwd, &group).map_err(|e| {
        warn(&format!("User {:?}: {e}", cfg.user));
        126
    })?;
    let home = id.home.clone().unwrap_or_else(|| {
        if id.uid == 0 {
            "/root".into()
        } else {
            "/".into()
        }
    });
    let inherited: Vec<(String, String)> = std::env::vars().collect();
    let env = process_env(&cfg.env, &home, noxsave, &inherited);
    let path = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
        .unwrap_or_default();
    let Some(prog) = find_in_path(&argv[0], path, is_executable) else {
        warn(&format!("{}: command not found", argv[0]));
        return Err(127);
    };
    let workdir = if cfg.working_dir.is_empty() {
        "/"
    } else {
        &cfg.working_dir
    };
    let _ = std::fs::create_dir_all(workdir); // Docker creates a missing WorkingDir too
    let mut cmd = Command::new(&prog);
    cmd.arg0(&argv[0])
        .args(&argv[1..])
        .env_clear()
        .envs(env)
        .current_dir(workdir);
    if !command_mode {
        cmd.stdin(Stdio::null());
    }
    let groups: Vec<libc::gid_t> = id.groups.clone();
    let (uid, gid) = (id.uid, id.gid);
    // SAFETY: the closure runs in the forked child before exec and calls only
    // async-signal-safe functions (sigprocmask, setsid, setgroups, setgid,
    // setuid) on data prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            // PID 1 blocks the signals it waits for; the child must not
            // inherit that mask (std's spawn keeps it).
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
            // Its own session and process group, as under a container runtime.
            libc::setsid();
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    match cmd.spawn() {
        Ok(child) => libc::pid_t::try_from(child.id()).map_err(|_| 126),
        Err(e) => {
            warn(&format!("cannot start {}: {e}", argv[0]));
            Err(if e.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            })
        }
    }
}

/// Wait for the main child, reaping orphans, forwarding signals and, while
/// not yet ready, checking the exposed ports.
fn supervise(pid: libc::pid_t, set: &libc::sigset_t, ports: &[u16]) -> u8 {
    let mut waiting_ready = !ports.is_empty();
    loop {
        if let Some(st) = reap(pid) {
            return st;
        }
        if waiting_ready {
            let tcp = ["/proc/net/tcp", "/proc/net/tcp6"]
                .iter()
                .filter_map(|f| std::fs::read_to_string(f).ok())
                .find_map(|t| tcp_listening(&t, ports));
            if let Some(port) = tcp {
                boot_timer(BOOT_TIMER_APP_READY);
                say(&format!("app ready on port {port}"));
                waiting_ready = false;
            }
        }
        let wait = if waiting_ready {
            READY_POLL
        } else {
            Duration::from_secs(3600)
        };
        let ts = libc::timespec {
            tv_sec: libc::time_t::try_from(wait.as_secs()).unwrap_or(3600),
            tv_nsec: libc::c_long::from(wait.subsec_nanos()),
        };
        // SAFETY: valid set and timespec; no siginfo wanted.
        let sig = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &ts) };
        if sig > 0 && sig != libc::SIGCHLD {
            // SAFETY: kill(2) on our child's PID.
            unsafe { libc::kill(pid, sig) };
        }
    }
}

/// Stop everything, report `status` on the exit port, reboot. Never returns.
fn finish(status: u8) -> ! {
    say(&format!("exit status {status}, rebooting"));
    let _ = std::io::stdout().flush();
    // SAFETY: kill(-1) signals every process but PID 1; then reap them so
    // nothing holds files open for writing when / goes read-only.
    unsafe {
        libc::kill(-1, libc::SIGKILL);
        while libc::waitpid(-1, std::ptr::null_mut(), 0) > 0 {}
        libc::sync();
    }
    let root = cstr("/");
    // SAFETY: remount of / read-only; null source/type/data are allowed for MS_REMOUNT.
    unsafe {
        libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REMOUNT | libc::MS_RDONLY,
            std::ptr::null(),
        )
    };
    // Never create a regular file there: only write if it is the device.
    if std::fs::metadata("/dev/port").is_ok_and(|m| {
        use std::os::unix::fs::FileTypeExt;
        m.file_type().is_char_device()
    }) {
        if let Ok(f) = std::fs::OpenOptions::new().write(true).open("/dev/port") {
            use std::os::unix::fs::FileExt;
            let _ = f.write_at(&[status], EXIT_PORT);
        }
    }
    // SAFETY: reboot(2) as root; returns only on failure.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    let _ = std::fs::write("/proc/sysrq-trigger", "b");
    loop {
        // SAFETY: pause(2) has no arguments; PID 1 must not exit.
        unsafe { libc::pause() };
    }
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    // SAFETY: getpid(2) has no arguments.
    if argv.get(1).is_some_and(|a| a == "agent") && unsafe { libc::getpid() } != 1 {
        std::process::exit(i32::from(agent::main(&argv[2..])));
    }
    let first_stage = std::env::var_os(STAGE_VAR).is_none();
    if std::fs::metadata("/proc/self/stat").is_err() {
        mount(
            "proc",
            "/proc",
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            "",
        );
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let args = KernelArgs::parse(&cmdline);
    LOUD.store(args.command.is_none() || args.verbose, Ordering::Relaxed);
    if first_stage {
        mount("devtmpfs", "/dev", libc::MS_NOSUID, "mode=0755");
        boot_timer(BOOT_TIMER_USERSPACE);
        open_console();
        let tunables = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
        if args.noxsave && !tunables.contains("glibc.cpu.hwcaps=") {
            reexec_without_avx();
        }
    }
    setup_system();
    // Ctrl-Alt-Del (the API's SendCtrlAltDel) then reaches PID 1 as a SIGINT,
    // passed on to the app like any other, instead of restarting the kernel
    // at once: the app stops, and the init syncs and reboots as after any exit.
    // SAFETY: reboot(2) with RB_DISABLE_CAD only changes what Ctrl-Alt-Del does.
    unsafe { libc::reboot(libc::RB_DISABLE_CAD) };
    say("userspace up");
    start_agent();

    let cfg = match std::fs::read_to_string(CONFIG_PATH) {
        Ok(text) => ImageConfig::parse(&text).unwrap_or_else(|e| {
            warn(&format!("{CONFIG_PATH}: {e}"));
            ImageConfig::default()
        }),
        Err(e) => {
            warn(&format!("{CONFIG_PATH}: {e}"));
            ImageConfig::default()
        }
    };
    let command = match &args.command {
        None => None,
        Some(Ok(argv)) => Some(argv.as_slice()),
        Some(Err(())) => {
            warn("cannot decode microvm.cmd");
            finish(127);
        }
    };
    let argv = cfg.argv(command);
    if argv.is_empty() || argv[0].is_empty() {
        warn("no command: the image has no Entrypoint or Cmd and none was given");
        finish(127);
    }
    say(&format!("running: {argv:?}"));
    let set = signal_set();
    let status = match start(&argv, &cfg, command.is_some(), args.noxsave) {
        Ok(pid) => {
            let ports = if command.is_some() {
                &[][..]
            } else {
                &cfg.tcp_ports[..]
            };
            supervise(pid, &set, ports)
        }
        Err(st) => st,
    };
    finish(status);
}
