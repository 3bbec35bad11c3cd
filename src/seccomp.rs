//! Seccomp filters, one per kind of thread, built with `seccompiler`.
//!
//! Each thread installs its own filter before it touches guest-controlled
//! input: a vCPU before its first `KVM_RUN`, a device worker before it reads
//! a queue, and so on. A filter lists only the system calls (and, for
//! `ioctl`, the request numbers) that kind of thread makes; anything else
//! raises `SIGSYS` (`SECCOMP_RET_TRAP`). The handler installed by
//! [`install_sigsys_handler`] writes one line naming the thread and the system
//! call, then lets the default action of `SIGSYS` kill the whole process.
//! docs/ARCHITECTURE.md says which calls each thread may make and why.

use std::cell::Cell;
use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Errors building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The rules did not form a valid filter (a bug in this module).
    #[error("cannot build the seccomp filter for {0} threads")]
    Build(&'static str, #[source] seccompiler::BackendError),
    /// The kernel refused the filter.
    #[error("cannot install the seccomp filter for {0} threads")]
    Install(&'static str, #[source] seccompiler::Error),
    /// `sigaction(SIGSYS)` failed.
    #[error("cannot install the SIGSYS handler")]
    Handler(#[source] std::io::Error),
}

/// The kinds of thread microvm runs, each with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// A vCPU: `KVM_RUN` and the devices on the buses.
    Vcpu,
    /// A virtio-blk worker: queue processing and file I/O on its image.
    BlockWorker,
    /// A virtio-net worker: queue processing and frames to/from its backend.
    NetWorker,
    /// A virtio-console worker: guest output to stdout, host input to the guest.
    ConsoleWorker,
    /// A virtio-rng worker: random bytes (`getrandom`) into the guest's buffers.
    RngWorker,
    /// A virtio-vsock worker: its queues, and the host's Unix sockets
    /// (accepting clients on `uds_path`, connecting to `uds_path_PORT`).
    VsockWorker,
    /// Tells a restored guest's agent the host's clock and entropy, over
    /// the vsock device's Unix socket.
    AgentNotice,
    /// Copies host stdin into the console (the UART or virtio-console).
    Stdin,
    /// Writes the guest's console output to host stdout (`devices::stdout`).
    Stdout,
    /// Watches a helper child (passt, virtiofsd; `crate::helper`): forwards
    /// its stderr to the log, waits for its exit.
    Helper,
    /// The API socket: accepts connections and serves each on its own thread
    /// (created by this one, under the same filter).
    Api,
    /// The main thread once the VM is built: the event loop that serves
    /// signals, the timeout, API requests and device activation (it creates
    /// the device workers, which start under this filter and add their own),
    /// pauses and joins threads, swaps drive files, flushes drives.
    Main,
}

impl ThreadKind {
    /// A short name for messages.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::BlockWorker => "virtio-blk",
            ThreadKind::NetWorker => "virtio-net",
            ThreadKind::ConsoleWorker => "virtio-console",
            ThreadKind::RngWorker => "virtio-rng",
            ThreadKind::VsockWorker => "virtio-vsock",
            ThreadKind::AgentNotice => "agent-resume",
            ThreadKind::Stdin => "stdin",
            ThreadKind::Stdout => "stdout",
            ThreadKind::Api => "api",
            ThreadKind::Helper => "helper-supervisor",
            ThreadKind::Main => "main",
        }
    }
}

/// KVM ioctl request numbers the vCPU threads issue (`linux/kvm.h`).
mod kvm_nr {
    use kvm_bindings::{
        kvm_clock_data, kvm_cpuid2, kvm_debugregs, kvm_dirty_log, kvm_irqchip, kvm_lapic_state,
        kvm_mp_state, kvm_msrs, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
        kvm_xsave,
    };
    use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

    const KVMIO: u32 = 0xAE;
    ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
    ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
    ioctl_iow_nr!(KVM_SET_REGS, KVMIO, 0x82, kvm_regs);
    ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
    ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
    ioctl_iow_nr!(KVM_SET_VCPU_EVENTS, KVMIO, 0xa0, kvm_vcpu_events);
    ioctl_iowr_nr!(KVM_GET_CPUID2, KVMIO, 0x91, kvm_cpuid2);
    ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
    ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
    ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
    ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);
    ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
    ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
    ioctl_io_nr!(KVM_GET_TSC_KHZ, KVMIO, 0xa3);
    ioctl_io_nr!(KVM_CHECK_EXTENSION, KVMIO, 0x03);
    ioctl_iowr_nr!(KVM_GET_IRQCHIP, KVMIO, 0x62, kvm_irqchip);
    ioctl_ior_nr!(KVM_GET_PIT2, KVMIO, 0x9f, kvm_pit_state2);
    ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_clock_data);
    ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);

    /// What a vCPU thread needs: run, and finish instructions an
    /// interpreting KVM refuses (read registers, advance RIP, inject a vector).
    pub fn vcpu() -> Vec<u64> {
        [
            KVM_RUN(),
            KVM_GET_REGS(),
            KVM_SET_REGS(),
            KVM_GET_SREGS(),
            KVM_GET_VCPU_EVENTS(),
            KVM_SET_VCPU_EVENTS(),
            // Recording its state as it parks, for a snapshot.
            KVM_GET_CPUID2(),
            KVM_GET_MP_STATE(),
            KVM_GET_MSRS(),
            KVM_GET_XSAVE(),
            KVM_GET_XCRS(),
            KVM_GET_DEBUGREGS(),
            KVM_GET_LAPIC(),
            KVM_GET_TSC_KHZ(),
        ]
        .to_vec()
    }

    /// What the main thread reads of the VM for a snapshot.
    pub fn snapshot() -> Vec<u64> {
        [
            KVM_CHECK_EXTENSION(),
            KVM_GET_IRQCHIP(),
            KVM_GET_PIT2(),
            KVM_GET_CLOCK(),
            // A VM that tracks dirty pages: which the guest wrote.
            KVM_GET_DIRTY_LOG(),
        ]
        .to_vec()
    }
}

/// `TUNSETOFFLOAD`: programming the TAP's offloads when virtio-net activates.
const TUNSETOFFLOAD: u64 = 0x4004_54d0;
/// `FIONBIO`: how the standard library makes a socket non-blocking.
const FIONBIO: u64 = 0x5421;
/// `TCSETS`/`TCGETS`: the terminal's mode, restored when the VM ends.
const TCGETS: u64 = 0x5401;
const TCSETS: u64 = 0x5402;

/// What every thread may do: memory, locks, time, its own exit, logging to
/// stderr, and what the SIGSYS handler needs to report and die.
const COMMON: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_restart_syscall,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigaction,
    libc::SYS_sigaltstack,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_tgkill,
    libc::SYS_write,
    libc::SYS_exit,
    libc::SYS_exit_group,
    // Closing and duplicating fds it owns; hash-map seeds.
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_getrandom,
];

/// Creating threads and the fds a device worker owns (device activation).
const SPAWN_THREADS: &[i64] = &[
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_prctl,
    libc::SYS_sched_getaffinity,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_eventfd2,
];

fn syscalls(kind: ThreadKind) -> (Vec<i64>, Vec<u64>) {
    let mut calls: Vec<i64> = COMMON.to_vec();
    let mut ioctls: Vec<u64> = Vec::new();
    match kind {
        ThreadKind::Vcpu => {
            // Device activation is the main thread's (the transport signals
            // an eventfd): a vCPU runs, serves its exits and parks when paused.
            // A virtio-net reset or feature write from the guest reprograms
            // the TAP's offloads (TUNSETOFFLOAD on the TAP fd) right there.
            ioctls.extend(kvm_nr::vcpu());
            ioctls.push(TUNSETOFFLOAD);
            calls.push(libc::SYS_read);
        }
        ThreadKind::BlockWorker => calls.extend_from_slice(BLOCK_WORKER),
        ThreadKind::NetWorker => calls.extend_from_slice(NET_WORKER),
        ThreadKind::ConsoleWorker => calls.extend_from_slice(CONSOLE_WORKER),
        // Its queue's eventfd and the irqfd; getrandom is in COMMON.
        ThreadKind::RngWorker => calls.extend_from_slice(RNG_WORKER),
        ThreadKind::VsockWorker => {
            calls.extend_from_slice(VSOCK_WORKER);
            // Accepted sockets are made non-blocking.
            ioctls.push(FIONBIO);
        }
        ThreadKind::AgentNotice => calls.extend_from_slice(&[
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_read,
            libc::SYS_recvfrom,
            libc::SYS_sendto,
            libc::SYS_setsockopt,
            libc::SYS_shutdown,
        ]),
        ThreadKind::Stdin => calls.extend_from_slice(&[libc::SYS_read, libc::SYS_poll]),
        // `write` and `futex` are in COMMON: nothing more.
        ThreadKind::Stdout => {}
        // Reaping under the lock kill() takes, so a recycled PID is never signalled.
        ThreadKind::Helper => calls.extend_from_slice(&[
            libc::SYS_read,
            libc::SYS_waitid,
            libc::SYS_wait4,
            libc::SYS_kill,
        ]),
        ThreadKind::Api => {
            calls.extend_from_slice(SPAWN_THREADS);
            calls.extend_from_slice(&[
                libc::SYS_accept,
                libc::SYS_accept4,
                libc::SYS_read,
                libc::SYS_readv,
                libc::SYS_recvfrom,
                libc::SYS_recvmsg,
                libc::SYS_writev,
                libc::SYS_sendto,
                libc::SYS_sendmsg,
                libc::SYS_poll,
                libc::SYS_ppoll,
                libc::SYS_epoll_wait,
                libc::SYS_epoll_pwait,
                libc::SYS_shutdown,
                libc::SYS_getsockopt,
                // Read and write timeouts on a connection.
                libc::SYS_setsockopt,
            ]);
            ioctls.push(FIONBIO);
        }
        ThreadKind::Main => {
            calls.extend_from_slice(SPAWN_THREADS);
            // The workers it creates start under this filter and add their own.
            calls.push(libc::SYS_seccomp);
            calls.extend_from_slice(BLOCK_WORKER);
            calls.extend_from_slice(NET_WORKER);
            calls.extend_from_slice(CONSOLE_WORKER);
            calls.extend_from_slice(RNG_WORKER);
            calls.extend_from_slice(VSOCK_WORKER);
            calls.extend_from_slice(&[
                libc::SYS_poll,
                libc::SYS_ppoll,
                // PATCH /drives: open, lock and size the new backing file.
                libc::SYS_openat,
                libc::SYS_flock,
                libc::SYS_fstat,
                libc::SYS_newfstatat,
                libc::SYS_statx,
                libc::SYS_lseek,
                // The API socket file is removed on exit; a passt child is ended.
                libc::SYS_unlink,
                libc::SYS_unlinkat,
                libc::SYS_kill,
                libc::SYS_shutdown,
                libc::SYS_wait4,
                libc::SYS_waitid,
                // PUT /snapshot/create: the sparse memory file's length,
                // both files renamed into place once whole.
                libc::SYS_ftruncate,
                libc::SYS_rename,
                libc::SYS_renameat,
                libc::SYS_renameat2,
                // Activating a vsock device: its muxer's connect timer.
                libc::SYS_timerfd_create,
                // Activating an io_engine Async drive: its ring.
                libc::SYS_io_uring_setup,
            ]);
            ioctls.extend_from_slice(&[TUNSETOFFLOAD, TCGETS, TCSETS, FIONBIO]);
            ioctls.extend(kvm_nr::snapshot());
        }
    }
    (calls, ioctls)
}

/// A virtio-blk worker: its queue eventfd, the image file, the irqfd.
const BLOCK_WORKER: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_read,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_fdatasync,
    libc::SYS_fsync,
    // The rate limiter's timer.
    libc::SYS_timerfd_settime,
    // The io_uring engine: submit, reap, wait; a PATCHed drive's file is
    // registered in place of the old one (the ring itself allows nothing
    // else: see devices/virtio/block/uring.rs).
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
];

/// A virtio-net worker: queue eventfds, the backend's fd, the irqfd.
const NET_WORKER: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    // The passt backend waits briefly for its socket to drain.
    libc::SYS_poll,
    // The rate limiter's timer.
    libc::SYS_timerfd_settime,
];

/// A virtio-console worker: queue and input eventfds, stdout (`write`,
/// common), the irqfd.
const CONSOLE_WORKER: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_read,
];

/// A virtio-rng worker: its queue's eventfd, the irqfd (`getrandom` is
/// every thread's).
const RNG_WORKER: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_read,
    // The rate limiter's timer.
    libc::SYS_timerfd_settime,
];

/// A virtio-vsock worker: queue eventfds, the irqfd, its epoll and timer,
/// and Unix stream sockets: accepted on the listener, or made (`socket`,
/// `connect`) for a guest connection to `<uds_path>_PORT`.
const VSOCK_WORKER: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_read,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_accept4,
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_shutdown,
    libc::SYS_timerfd_settime,
];

/// glibc's malloc arenas at most: a fixed limit, set before any thread
/// starts (see [`limit_malloc_arenas`]).
const MALLOC_ARENAS: libc::c_int = 4;

/// Fix the number of glibc malloc arenas. Without a limit, the thread that
/// needs a ninth arena makes glibc count the CPUs by opening
/// /sys/devices/system/cpu/online, and no filter allows `openat` to a
/// worker or API connection thread: with drives, a NIC and the console a
/// VM has that many threads, and an API connection died of SIGSYS on it.
/// Fewer arenas is also less memory for a VMM whose threads mostly wait.
///
/// The same class: the first time `free()` shrinks a thread arena's heap,
/// glibc opens /proc/sys/vm/overcommit_memory (`check_may_shrink_heap`), so
/// a filtered worker freeing its buffers died of SIGSYS. Heaps are only
/// shrunk past the trim threshold, so a threshold larger than any heap (64
/// MiB) means glibc never does; freed memory stays for reuse instead of
/// going back to the kernel, and buffers of 128 KiB or more are mmap'd
/// and unmapped on free as before.
pub fn limit_malloc_arenas() {
    // SAFETY: mallopt only changes malloc's tuning; called before threads exist.
    if unsafe { libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS) } != 1 {
        log::warn!("cannot limit malloc arenas; a thread may die of SIGSYS on openat");
    }
    // SAFETY: as above.
    if unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD) } != 1 {
        log::warn!("cannot set malloc's trim threshold; a thread may die of SIGSYS on openat");
    }
}

/// Larger than glibc's largest thread heap (64 MiB): no heap is shrunk.
const MALLOC_TRIM_THRESHOLD: libc::c_int = 1 << 30;

/// The BPF program for `kind`.
pub fn filter(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    let (calls, ioctls) = syscalls(kind);
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        calls.into_iter().map(|c| (c, vec![])).collect();
    if !ioctls.is_empty() {
        let build = |e| SeccompError::Build(kind.name(), e);
        let by_request = ioctls
            .into_iter()
            .map(|nr| {
                SeccompRule::new(vec![SeccompCondition::new(
                    1,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::Eq,
                    nr,
                )
                .map_err(build)?])
                .map_err(build)
            })
            .collect::<Result<Vec<_>, _>>()?;
        rules.insert(libc::SYS_ioctl, by_request);
    }
    let f = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| SeccompError::Build(kind.name(), e))?;
    f.try_into()
        .map_err(|e| SeccompError::Build(kind.name(), e))
}

/// Off with `--no-seccomp` (for debugging): [`install`] then does nothing.
static ENABLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Turn the filters on or off for every thread started from now on.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, std::sync::atomic::Ordering::SeqCst);
}

/// Whether [`install`] installs filters.
pub fn enabled() -> bool {
    ENABLED.load(std::sync::atomic::Ordering::SeqCst)
}

thread_local! {
    /// The kind of filter this thread runs under, for the SIGSYS message.
    static KIND: Cell<Option<ThreadKind>> = const { Cell::new(None) };
}

/// Install `prog` (from [`filter`]) on the calling thread; from then on it is
/// bound by it, and so is every thread it creates.
pub fn apply(kind: ThreadKind, prog: &BpfProgram) -> Result<(), SeccompError> {
    KIND.with(|k| k.set(Some(kind)));
    seccompiler::apply_filter(prog).map_err(|e| SeccompError::Install(kind.name(), e))
}

/// Build and install the filter for `kind` on the calling thread (nothing
/// with `--no-seccomp`).
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    if !enabled() {
        return Ok(());
    }
    let prog = filter(kind)?;
    apply(kind, &prog)?;
    log::debug!("seccomp filter installed for a {} thread", kind.name());
    Ok(())
}

/// A few system call names for the SIGSYS message (the number is always printed).
fn syscall_name(nr: i64) -> &'static str {
    match nr {
        libc::SYS_open => "open",
        libc::SYS_openat => "openat",
        libc::SYS_socket => "socket",
        libc::SYS_connect => "connect",
        libc::SYS_bind => "bind",
        libc::SYS_execve => "execve",
        libc::SYS_execveat => "execveat",
        libc::SYS_fork => "fork",
        libc::SYS_vfork => "vfork",
        libc::SYS_clone => "clone",
        libc::SYS_clone3 => "clone3",
        libc::SYS_ptrace => "ptrace",
        libc::SYS_mount => "mount",
        libc::SYS_kill => "kill",
        libc::SYS_ioctl => "ioctl, a request this thread does not make:",
        libc::SYS_read => "read",
        libc::SYS_unlink => "unlink",
        libc::SYS_unlinkat => "unlinkat",
        libc::SYS_getuid => "getuid",
        libc::SYS_getppid => "getppid",
        _ => "?",
    }
}

/// Write `parts` to stderr with write(2) only (async-signal-safe).
fn raw_stderr(parts: &[&[u8]]) {
    for p in parts {
        // SAFETY: writing a valid byte slice to fd 2; a short or failed write
        // only loses part of the message.
        unsafe { libc::write(2, p.as_ptr().cast(), p.len()) };
    }
}

/// Decimal digits of `n` in `buf`, without allocating.
fn fmt_decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 || i == 0 {
            break;
        }
    }
    &buf[i..]
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // The SIGSYS member of siginfo: { void *call_addr; int syscall; unsigned arch; }
    // starts 16 bytes in on x86_64, after si_signo, si_errno, si_code and padding.
    const SI_SYSCALL_OFFSET: usize = 24;
    let nr = if info.is_null() {
        -1
    } else {
        // SAFETY: the kernel passed a valid siginfo for this SIGSYS (SA_SIGINFO);
        // the syscall number lies inside it at a fixed offset for x86_64.
        unsafe { i64::from(*info.cast::<u8>().add(SI_SYSCALL_OFFSET).cast::<i32>()) }
    };
    // A thread created by a filtered one carries its creator's filter.
    let kind = KIND
        .with(|k| k.get())
        .map(ThreadKind::name)
        .unwrap_or("inherited-filter");
    let mut buf = [0u8; 20];
    let num = fmt_decimal(u64::try_from(nr).unwrap_or(u64::MAX), &mut buf);
    // For ioctl, the request (second argument, in RSI at the trap).
    let mut rbuf = [0u8; 20];
    let (rlabel, request): (&[u8], &[u8]) = if nr == libc::SYS_ioctl && !ctx.is_null() {
        // SAFETY: with SA_SIGINFO the third argument is the interrupted
        // thread's ucontext, valid for the duration of the handler.
        let rsi =
            unsafe { (*ctx.cast::<libc::ucontext_t>()).uc_mcontext.gregs[libc::REG_RSI as usize] };
        (b" ", fmt_decimal(rsi as u64 & 0xffff_ffff, &mut rbuf))
    } else {
        (b"", b"")
    };
    raw_stderr(&[
        b"\nmicrovm: seccomp: a ",
        kind.as_bytes(),
        b" thread made a forbidden system call ",
        num,
        b" (",
        syscall_name(nr).as_bytes(),
        rlabel,
        request,
        b"); killing the process\n",
    ]);
    // SAFETY: restoring the default action and signalling our own thread;
    // SIGSYS stays blocked until this handler returns, then kills the process.
    unsafe {
        libc::signal(libc::SIGSYS, libc::SIG_DFL);
        libc::syscall(
            libc::SYS_tgkill,
            libc::getpid(),
            libc::syscall(libc::SYS_gettid),
            libc::SIGSYS,
        );
    }
}

/// Report a filter violation on stderr and die by SIGSYS (process-wide; call
/// once before any filter is installed).
pub fn install_sigsys_handler() -> Result<(), SeccompError> {
    // SAFETY: a zeroed sigaction is valid; we set a handler that only makes
    // async-signal-safe calls, with SA_SIGINFO for its three-argument form.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_sigsys as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut act.sa_mask);
        if libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) != 0 {
            return Err(SeccompError::Handler(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Run `body` in a forked child under the filter for `kind`; return how
    /// the child ended and what it wrote to stderr.
    fn in_child(kind: ThreadKind, body: fn()) -> (libc::c_int, String) {
        // Everything that allocates happens before fork.
        let prog = filter(kind).expect("filter builds");
        let mut fds = [0; 2];
        // SAFETY: pipe(2) fills two fds.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: the child only makes raw system calls and exits with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            // SAFETY: in the child: stderr to the pipe, then the filter, then the body.
            unsafe {
                libc::dup2(fds[1], 2);
                if install_sigsys_handler().is_err() || apply(kind, &prog).is_err() {
                    libc::_exit(99);
                }
                body();
                libc::_exit(0);
            }
        }
        let mut status = 0;
        // SAFETY: closing our copy of the write end; waiting for our own child.
        unsafe {
            libc::close(fds[1]);
            libc::waitpid(pid, &mut status, 0);
        }
        let mut out = Vec::new();
        let mut buf = [0u8; 512];
        loop {
            // SAFETY: reading into a valid buffer from the pipe we own.
            let n = unsafe { libc::read(fds[0], buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
            out.extend_from_slice(&buf[..n as usize]);
        }
        // SAFETY: closing the read end we own.
        unsafe { libc::close(fds[0]) };
        (status, String::from_utf8_lossy(&out).into_owned())
    }

    #[test]
    fn every_kind_builds() {
        for k in [
            ThreadKind::Vcpu,
            ThreadKind::BlockWorker,
            ThreadKind::NetWorker,
            ThreadKind::ConsoleWorker,
            ThreadKind::RngWorker,
            ThreadKind::VsockWorker,
            ThreadKind::AgentNotice,
            ThreadKind::Stdin,
            ThreadKind::Stdout,
            ThreadKind::Api,
            ThreadKind::Helper,
            ThreadKind::Main,
        ] {
            assert!(!filter(k).expect("builds").is_empty(), "{k:?}");
        }
    }

    #[test]
    fn forbidden_syscall_kills_with_sigsys_and_names_it() {
        let (status, err) = in_child(ThreadKind::BlockWorker, || {
            // SAFETY: a plain socket(2) call; the filter forbids it.
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        });
        assert!(libc::WIFSIGNALED(status), "killed by a signal: {status:#x}");
        assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);
        assert!(
            err.contains("a virtio-blk thread made a forbidden system call 41 (socket)"),
            "message: {err}"
        );
    }

    #[test]
    fn forbidden_ioctl_request_is_refused() {
        let (status, err) = in_child(ThreadKind::Vcpu, || {
            // SAFETY: winsize is plain old data; TIOCGWINSZ on stderr is an
            // ioctl the vCPU filter does not list.
            unsafe {
                let mut ws: libc::winsize = std::mem::zeroed();
                libc::ioctl(2, libc::TIOCGWINSZ, &mut ws);
            }
        });
        assert!(libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS);
        assert!(
            err.contains("system call 16 (ioctl, a request this thread does not make: 21523)"),
            "message: {err}"
        );
    }

    #[test]
    fn allowed_syscalls_pass() {
        let (status, err) = in_child(ThreadKind::Stdin, || {
            // SAFETY: calls the stdin filter allows: a write and a short sleep.
            unsafe {
                libc::write(2, b"ok".as_ptr().cast(), 2);
                let ts = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 1_000_000,
                };
                libc::nanosleep(&ts, std::ptr::null_mut());
            }
        });
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "{status:#x} {err}"
        );
        assert_eq!(err, "ok");
    }
}
