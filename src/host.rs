//! The ground floor: facts about the host and process-wide plumbing (KVM
//! mode, signals, host memory, the wall clock), used by every layer above
//! and using none of them.

use std::mem::MaybeUninit;
use std::time::{SystemTime, UNIX_EPOCH};

/// Where the kvm_pvm module says whether it runs guests by interpretation.
const PVM_NATIVE_PARAM: &str = "/sys/module/kvm_pvm/parameters/pvm_native";

/// True on hosts whose KVM interprets guest kernel mode (kvm_pvm in native
/// mode). Set `MICROVM_EMULATED_KVM=0/1` to override the detection.
pub fn kvm_is_emulated() -> bool {
    if let Ok(v) = std::env::var("MICROVM_EMULATED_KVM") {
        return v == "1";
    }
    std::fs::read_to_string(PVM_NATIVE_PARAM)
        .map(|s| s.trim() == "Y")
        .unwrap_or(false)
}

/// Signals that stop the VM: Ctrl-C, a supervisor's stop, and SIGHUP (the
/// terminal went away, or a supervisor's hang-up), which is a stop like
/// SIGTERM: the VM ends, its sockets, TAPs and passt go, exit 129.
pub const STOP_SIGNALS: [i32; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// A blocked signal set, for [`wait_signal`].
pub struct SignalSet(libc::sigset_t);

/// Block SIGINT, SIGTERM and SIGHUP in the calling thread (and threads it starts later).
pub fn block_stop_signals() -> std::io::Result<SignalSet> {
    let mut set = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the set we pass it; sigaddset and
    // pthread_sigmask only read the initialised set.
    unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        for s in STOP_SIGNALS {
            libc::sigaddset(set.as_mut_ptr(), s);
        }
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, set.as_ptr(), std::ptr::null_mut());
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        Ok(SignalSet(set.assume_init()))
    }
}

/// A non-blocking signalfd for the signals in `set` (which must be blocked
/// in every thread), for the event loop's epoll.
pub fn signal_fd(set: &SignalSet) -> std::io::Result<std::fs::File> {
    use std::os::fd::FromRawFd;
    // SAFETY: `set` is an initialised sigset; -1 asks for a new descriptor.
    let fd = unsafe { libc::signalfd(-1, &set.0, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nothing else owns.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

/// The next signal queued on a [`signal_fd`], if any.
pub fn read_signal(fd: &std::fs::File) -> Option<i32> {
    use std::io::Read;
    let mut buf = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
    let mut f = fd;
    match f.read(&mut buf) {
        Ok(n) if n == buf.len() => {
            let signo = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]);
            i32::try_from(signo).ok()
        }
        _ => None,
    }
}

/// Total RAM of the host in MiB, from /proc/meminfo.
pub fn host_memory_mib() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// Nanoseconds since the Unix epoch now (0 before it, `u64::MAX` past 2554).
pub fn unix_now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Fill `buf` from the host's `getrandom` (the kernel's CSPRNG; it blocks
/// only before the host's pool is initialised at boot).
pub fn random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: `rest` is a valid, writable buffer of `rest.len()` bytes
        // for the duration of the call.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        match usize::try_from(n) {
            Ok(n) => done += n,
            Err(_) => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// Write to stderr and ignore the outcome: stderr may be closed, or a pipe
/// whose reader is gone (`tee` ended by the same Ctrl-C), and `eprintln!`
/// panics then. Use through [`crate::say!`].
pub fn say(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = std::io::stderr().write_fmt(args);
}

/// `eprintln!` that never panics: see [`say`].
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::host::say(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// The exit status of a process in which a thread panicked.
pub const PANIC_EXIT: i32 = 101;

/// On any thread's panic: write the message to fd 2 with plain `write(2)`
/// (every seccomp filter of ours allows it), run `before_exit` (the
/// terminal's mode back), and end the process with [`PANIC_EXIT`]. A thread
/// that dies takes the VM with it instead of leaving it running headless,
/// and nothing after the message (unwinding, backtraces, destructors) can
/// meet a call a filter forbids.
pub fn install_panic_hook(before_exit: fn()) {
    std::panic::set_hook(Box::new(move |info| {
        let payload = info
            .payload()
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| info.payload().downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let thread = std::thread::current();
        let msg = format!(
            "microvm: thread '{}' panicked{at}: {payload}\nmicrovm: the VM is stopped (exit {PANIC_EXIT}); this is a bug in microvm\n",
            thread.name().unwrap_or("unnamed")
        );
        write_fd_all(2, msg.as_bytes());
        before_exit();
        // SAFETY: _exit(2) ends the process at once; nothing is used after it.
        unsafe { libc::_exit(PANIC_EXIT) }
    }));
}

/// `write(2)` all of `buf` to `fd`, giving up on an error.
fn write_fd_all(fd: i32, mut buf: &[u8]) {
    while !buf.is_empty() {
        // SAFETY: `buf` is a live byte slice of its length for the call.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        match usize::try_from(n) {
            Ok(n) if n > 0 => buf = &buf[n.min(buf.len())..],
            _ if n < 0
                && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {}
            _ => return,
        }
    }
}
