//! Pausing a thread from the main thread: the wanted state, and whether the
//! thread has parked. Used by the vCPU threads and the device workers.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// What the main thread wants a paused-or-running thread to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wanted {
    /// Run.
    Run,
    /// Stop working and wait.
    Pause,
    /// End the thread.
    Exit,
}

#[derive(Debug)]
struct ControlState {
    wanted: Wanted,
    /// The thread is parked (paused) or gone.
    parked: bool,
}

/// Shared between the main thread and one thread it can pause (a vCPU, a
/// device worker).
#[derive(Debug)]
pub struct PauseControl {
    state: Mutex<ControlState>,
    changed: Condvar,
}

impl Default for PauseControl {
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

impl PauseControl {
    fn lock(&self) -> MutexGuard<'_, ControlState> {
        // The state is two plain fields: still consistent after a panic.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called by the controlled thread when woken (a vCPU after `KVM_RUN` was
    /// interrupted, a worker after its wake eventfd): parks while paused.
    /// Returns false when the thread must end.
    pub fn may_run(&self) -> bool {
        self.may_run_with(|| {})
    }

    /// [`Self::may_run`], calling `on_park` once before the thread counts as
    /// parked for a pause: what it records (a vCPU's registers, a worker's
    /// queue positions) is in place when [`Self::wait_parked`] returns.
    pub fn may_run_with(&self, on_park: impl FnOnce()) -> bool {
        let mut on_park = Some(on_park);
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
                        if let Some(f) = on_park.take() {
                            // Unlocked: the hook may take time (KVM ioctls);
                            // the wanted state is read again after it.
                            drop(s);
                            f();
                            s = self.lock();
                            continue;
                        }
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

    /// Mark the thread gone (it ended on its own).
    pub fn set_gone(&self) {
        let mut s = self.lock();
        s.parked = true;
        self.changed.notify_all();
    }

    /// Wait until the thread is parked, up to `timeout`. True if it is.
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn pause_parks_and_resume_runs() {
        let c = Arc::new(PauseControl::default());
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
