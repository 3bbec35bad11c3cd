//! The one worker-thread loop every virtio device uses: epoll over the
//! device's own fds plus a control eventfd with which the main thread
//! pauses, resumes and stops it. A device implements [`EpollHandler`]; the
//! loop, pausing and shutdown are written once, here.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::pause::{PauseControl, Wanted};

/// Token of the control eventfd; handlers use any other value.
const TOKEN_CONTROL: u64 = u64::MAX;
/// How long a worker may take to park (it finishes its current batch first).
const PARK_TIMEOUT: Duration = Duration::from_secs(5);

/// What one round of work left behind.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Served {
    /// Work remains that needs no new event: call again without sleeping.
    pub more: bool,
    /// Stop watching these tokens until the device is reset (a queue the
    /// guest broke: polling it again would spin on the same error).
    pub stop_watching: Vec<u64>,
}

impl Served {
    /// A ring of the device is broken (`why`): log it under `label`, tell
    /// the driver (DEVICE_NEEDS_RESET, through `interrupt`) and stop
    /// watching `tokens` until the driver resets the device, which stops
    /// the worker: polling the ring again would spin on the same error.
    pub fn broken_ring(
        label: &str,
        why: &dyn std::fmt::Display,
        interrupt: &super::Interrupt,
        tokens: Vec<u64>,
    ) -> Self {
        log::warn!("{label}: {why}: device needs reset");
        interrupt.needs_reset();
        Self {
            more: false,
            stop_watching: tokens,
        }
    }
}

/// A device's side of the worker loop.
pub trait EpollHandler: Send + 'static {
    /// The fds to watch, with a token (not `u64::MAX`) and the events.
    fn watch(&self) -> Vec<(RawFd, u64, EventSet)>;
    /// Serve the tokens that are ready. Called once with none at start (for
    /// work queued before the worker existed), after each pause, and again
    /// with none while the last call returned `more`.
    fn serve(&mut self, ready: &[u64]) -> Served;
    /// The seccomp filter the worker thread installs before it serves.
    fn seccomp_kind(&self) -> Option<crate::seccomp::ThreadKind> {
        None
    }
    /// Where the device stands in each of its queues, for a snapshot:
    /// recorded each time the worker parks for a pause.
    fn queue_positions(&self) -> Vec<QueuePosition> {
        Vec::new()
    }
    /// Finish the work in flight (a device whose requests complete later:
    /// the io_uring block engine) before the worker parks or exits, so a
    /// paused device has nothing outstanding and its queue positions say
    /// all it did.
    fn quiesce(&mut self) {}
}

/// How far a device got in one queue: the next available entry it will
/// take and the next used entry it will fill.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueuePosition {
    /// `next_avail` of the device's queue.
    pub next_avail: u16,
    /// `next_used` of the device's queue.
    pub next_used: u16,
}

impl QueuePosition {
    /// Where `q` stands.
    pub fn of(q: &virtio_queue::Queue) -> Self {
        use virtio_queue::QueueT;
        Self {
            next_avail: q.next_avail(),
            next_used: q.next_used(),
        }
    }
}

/// A running worker: pause, resume, stop (joins the thread).
pub struct WorkerHandle {
    label: String,
    control: Arc<PauseControl>,
    wake: EventFd,
    thread: Option<JoinHandle<()>>,
    positions: Arc<Mutex<Vec<QueuePosition>>>,
}

impl WorkerHandle {
    /// Start a thread named `label` serving `handler`.
    pub fn spawn(label: String, mut handler: impl EpollHandler) -> io::Result<Self> {
        let wake = EventFd::new(EFD_NONBLOCK)?;
        let control = Arc::new(PauseControl::default());
        let epoll = Epoll::new()?;
        let mut fds = HashMap::new();
        epoll.ctl(
            ControlOperation::Add,
            wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_CONTROL),
        )?;
        for (fd, token, events) in handler.watch() {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))?;
            fds.insert(token, fd);
        }
        let positions = Arc::new(Mutex::new(Vec::new()));
        let (c, w, name) = (control.clone(), wake.try_clone()?, label.clone());
        let pos = positions.clone();
        let thread = std::thread::Builder::new()
            .name(label.clone())
            .spawn(move || {
                if let Some(kind) = handler.seccomp_kind() {
                    if let Err(e) = crate::seccomp::install(kind) {
                        log::error!("{name}: {}", crate::error_chain(&e));
                        c.set_gone();
                        return;
                    }
                }
                if let Err(e) = run(&epoll, &fds, &w, &c, &pos, &mut handler) {
                    log::error!("{name}: worker failed: {e}");
                }
                c.set_gone();
            })?;
        Ok(Self {
            label,
            control,
            wake,
            thread: Some(thread),
            positions,
        })
    }

    /// The queue positions the worker recorded when it last parked; call
    /// after [`Self::pause`] returned true.
    pub fn queue_positions(&self) -> Vec<QueuePosition> {
        self.positions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn request(&self, wanted: Wanted) -> bool {
        self.control.request(wanted);
        if let Err(e) = self.wake.write(1) {
            log::error!("{}: cannot wake the worker: {e}", self.label);
            return false;
        }
        true
    }

    /// Stop serving (after the current batch) until [`Self::resume`]; true
    /// once the worker is parked.
    pub fn pause(&self) -> bool {
        self.request(Wanted::Pause) && self.control.wait_parked(PARK_TIMEOUT)
    }

    /// Serve again.
    pub fn resume(&self) {
        self.request(Wanted::Run);
    }

    /// Tell the worker to stop and wait for it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        if !self.request(Wanted::Exit) {
            // The thread cannot be told to stop; joining would hang.
            return;
        }
        if thread.join().is_err() {
            log::error!("{}: worker thread panicked", self.label);
        }
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn run(
    epoll: &Epoll,
    fds: &HashMap<u64, RawFd>,
    wake: &EventFd,
    control: &PauseControl,
    positions: &Mutex<Vec<QueuePosition>>,
    handler: &mut impl EpollHandler,
) -> io::Result<()> {
    let mut events = [EpollEvent::default(); 8];
    let mut ready = Vec::with_capacity(events.len());
    let mut more = true;
    loop {
        let n = match epoll.wait(if more { 0 } else { -1 }, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        ready.clear();
        for ev in &events[..n] {
            if ev.data() == TOKEN_CONTROL {
                // EAGAIN: merged with an earlier request.
                let _ = wake.read();
                let park = || {
                    handler.quiesce();
                    *positions.lock().unwrap_or_else(|e| e.into_inner()) =
                        handler.queue_positions();
                };
                if !control.may_run_with(park) {
                    handler.quiesce();
                    return Ok(());
                }
                // Serve once more after a pause: parking finished what was
                // in flight, and requests held back for it (a full io_uring
                // engine) have no other event to bring the worker back.
                more = true;
            } else {
                ready.push(ev.data());
            }
        }
        if ready.is_empty() && !more {
            continue;
        }
        let served = handler.serve(&ready);
        more = served.more;
        for token in served.stop_watching {
            if let Some(&fd) = fds.get(&token) {
                epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default())?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    struct Counter {
        evt: EventFd,
        served: Arc<AtomicU32>,
        break_after: u32,
    }

    impl EpollHandler for Counter {
        fn watch(&self) -> Vec<(RawFd, u64, EventSet)> {
            vec![(self.evt.as_raw_fd(), 7, EventSet::IN)]
        }
        fn serve(&mut self, ready: &[u64]) -> Served {
            if ready.contains(&7) {
                let _ = self.evt.read();
                let n = self.served.fetch_add(1, Ordering::SeqCst) + 1;
                if n == self.break_after {
                    return Served {
                        more: false,
                        stop_watching: vec![7],
                    };
                }
            }
            Served::default()
        }
    }

    fn wait_count(c: &AtomicU32, want: u32) -> bool {
        let end = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < end {
            if c.load(Ordering::SeqCst) == want {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    }

    #[test]
    fn serves_pauses_resumes_forgets_broken_fds_and_stops() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let served = Arc::new(AtomicU32::new(0));
        let w = WorkerHandle::spawn(
            "test-worker".into(),
            Counter {
                evt: evt.try_clone().unwrap(),
                served: served.clone(),
                break_after: 3,
            },
        )
        .unwrap();
        evt.write(1).unwrap();
        assert!(wait_count(&served, 1));

        assert!(w.pause());
        evt.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            served.load(Ordering::SeqCst),
            1,
            "nothing served while paused"
        );
        w.resume();
        assert!(
            wait_count(&served, 2),
            "the kick made while paused is served"
        );

        evt.write(1).unwrap();
        assert!(wait_count(&served, 3));
        // The handler gave up on the fd: further kicks are not polled.
        evt.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(served.load(Ordering::SeqCst), 3);
        w.stop();
    }
}
