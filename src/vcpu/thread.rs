//! vCPU threads the event loop owns: started, paused, resumed, stopped and
//! joined from the main thread.
//!
//! A vCPU leaves `KVM_RUN` only on an exit, so pausing it means kicking it:
//! the main thread records what it wants in [`VcpuControl`], then sends the
//! vCPU thread [`kick_signal`]. The handler runs on the vCPU thread and sets
//! `immediate_exit` in that thread's own `kvm_run`, so a kick that lands
//! just before `KVM_RUN` is not lost: the next `KVM_RUN` returns `EINTR` at
//! once. The run loop then sees the request and parks on a condition
//! variable, using no CPU until it is resumed.

use std::cell::Cell;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

/// What the main thread wants a vCPU to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wanted {
    /// Run the guest.
    Run,
    /// Leave `KVM_RUN` and wait.
    Pause,
    /// Leave `KVM_RUN` and end the thread.
    Exit,
}

#[derive(Debug)]
struct ControlState {
    wanted: Wanted,
    /// The vCPU thread is parked (paused) or gone.
    parked: bool,
}

/// Shared between the main thread and one vCPU thread.
#[derive(Debug)]
pub struct VcpuControl {
    state: Mutex<ControlState>,
    changed: Condvar,
}

impl Default for VcpuControl {
    fn default() -> Self {
        Self {
            state: Mutex::new(ControlState {
                wanted: Wanted::Run,
                parked: false,
            }),
            changed: Condvar::new(),
        }
    }
}

impl VcpuControl {
    fn lock(&self) -> MutexGuard<'_, ControlState> {
        // The state is two plain fields: still consistent after a panic.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called by the vCPU thread after `KVM_RUN` was interrupted (and before
    /// every entry): parks while paused. Returns false when the thread must end.
    pub fn may_run(&self) -> bool {
        let mut s = self.lock();
        loop {
            match s.wanted {
                Wanted::Run => {
                    if s.parked {
                        s.parked = false;
                        self.changed.notify_all();
                    }
                    return true;
                }
                Wanted::Exit => {
                    s.parked = true;
                    self.changed.notify_all();
                    return false;
                }
                Wanted::Pause => {
                    if !s.parked {
                        s.parked = true;
                        self.changed.notify_all();
                    }
                    s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
                }
            }
        }
    }

    /// Ask for `wanted` (the caller then kicks the thread).
    pub fn request(&self, wanted: Wanted) {
        let mut s = self.lock();
        s.wanted = wanted;
        self.changed.notify_all();
    }

    /// Mark the vCPU gone (its run loop returned on its own).
    pub fn set_gone(&self) {
        let mut s = self.lock();
        s.parked = true;
        self.changed.notify_all();
    }

    /// Wait until the vCPU is parked, up to `timeout`. True if it is.
    pub fn wait_parked(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut s = self.lock();
        while !s.parked {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            s = self
                .changed
                .wait_timeout(s, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }
}

thread_local! {
    /// This thread's `kvm_run`, for the kick handler; null outside vCPU threads.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The real-time signal that kicks a vCPU out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // `try_with`: a signal during thread teardown finds no TLS and does nothing.
    let _ = KVM_RUN.try_with(|p| {
        let run = p.get();
        if !run.is_null() {
            // SAFETY: `run` was set by this very thread to its vCPU's mmapped
            // kvm_run and is cleared before the VcpuFd is dropped; a volatile
            // byte write is async-signal-safe.
            unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
        }
    });
}

/// Install the kick handler (once per process).
pub fn install_kick_handler() -> std::io::Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(kick_signal(), kick_handler)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()));
    });
    result
}

/// Point the kick handler of the calling thread at `run` (null to clear).
pub fn set_thread_kvm_run(run: *mut kvm_run) {
    KVM_RUN.with(|p| p.set(run));
}

/// One running vCPU thread as the event loop sees it.
pub struct VcpuHandle {
    index: u8,
    control: Arc<VcpuControl>,
    thread: Option<JoinHandle<()>>,
}

/// How long a vCPU may take to park after a kick before pause gives up.
pub const PARK_TIMEOUT: Duration = Duration::from_secs(5);

impl VcpuHandle {
    /// A handle for the thread `thread` running vCPU `index` under `control`.
    pub fn new(index: u8, control: Arc<VcpuControl>, thread: JoinHandle<()>) -> Self {
        Self {
            index,
            control,
            thread: Some(thread),
        }
    }

    /// vCPU index.
    pub fn index(&self) -> u8 {
        self.index
    }

    /// Ask for `wanted` and kick the thread out of `KVM_RUN`.
    pub fn request(&self, wanted: Wanted) {
        self.control.request(wanted);
        if wanted == Wanted::Run {
            return;
        }
        if let Some(t) = &self.thread {
            if let Err(e) = t.kill(kick_signal()) {
                log::warn!("vcpu{}: cannot kick: {e}", self.index);
            }
        }
    }

    /// Wait until the vCPU is parked (paused or gone).
    pub fn wait_parked(&self) -> bool {
        self.control.wait_parked(PARK_TIMEOUT)
    }

    /// Stop the thread and join it.
    pub fn stop(mut self) {
        self.request(Wanted::Exit);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("vcpu{}: thread panicked", self.index);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pause_parks_and_resume_runs() {
        let c = Arc::new(VcpuControl::default());
        assert!(c.may_run());
        c.request(Wanted::Pause);
        let c2 = c.clone();
        let t = std::thread::spawn(move || {
            let mut rounds = 0;
            while c2.may_run() {
                rounds += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
            rounds
        });
        assert!(c.wait_parked(Duration::from_secs(5)));
        c.request(Wanted::Run);
        std::thread::sleep(Duration::from_millis(20));
        c.request(Wanted::Exit);
        let rounds = t.join().unwrap();
        assert!(rounds > 0, "ran after resume");
        assert!(c.wait_parked(Duration::from_millis(1)));
    }
}
