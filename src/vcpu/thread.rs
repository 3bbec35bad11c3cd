//! vCPU threads the event loop owns: started, paused, resumed, stopped and
//! joined from the main thread.
//!
//! A vCPU leaves `KVM_RUN` only on an exit, so pausing it means kicking it:
//! the main thread records what it wants in a [`VcpuControl`], then sends the
//! vCPU thread [`kick_signal`]. The handler runs on the vCPU thread and sets
//! `immediate_exit` in that thread's own `kvm_run`, so a kick that lands
//! just before `KVM_RUN` is not lost: the next `KVM_RUN` returns `EINTR` at
//! once. The run loop then sees the request and parks on a condition
//! variable, using no CPU until it is resumed.

use std::cell::Cell;
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::kvm_run;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

pub use crate::pause::{PauseControl as VcpuControl, Wanted};

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
    saved: super::SavedState,
}

/// How long a vCPU may take to park after a kick before pause gives up.
pub const PARK_TIMEOUT: Duration = Duration::from_secs(5);

impl VcpuHandle {
    /// A handle for the thread `thread` running vCPU `index` under `control`.
    pub fn new(
        index: u8,
        control: Arc<VcpuControl>,
        thread: JoinHandle<()>,
        saved: super::SavedState,
    ) -> Self {
        Self {
            index,
            control,
            thread: Some(thread),
            saved,
        }
    }

    /// The state the vCPU recorded when it last parked (call after
    /// [`Self::wait_parked`]); an error if it could not read it.
    pub fn saved_state(&self) -> Result<super::state::VcpuState, String> {
        self.saved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_else(|| Err(format!("vcpu{} has not parked", self.index)))
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
