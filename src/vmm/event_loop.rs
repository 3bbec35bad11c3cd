//! The main thread's event loop: one epoll over
//! - a wake eventfd paired with a channel of [`VmEvent`]s (vCPU stops, the
//!   i8042 reset, API requests),
//! - the activate eventfd the virtio transports signal on `DRIVER_OK`,
//! - a signalfd for SIGINT/SIGTERM/SIGHUP,
//!
//! and the `--timeout` deadline as the epoll timeout.

use std::os::fd::AsRawFd;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::Instant;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::host;
use crate::rpc::{ActionResult, ActionSink, VmmAction};
use crate::vcpu::VcpuStop;

/// Something the main thread must act on.
#[derive(Debug)]
pub enum VmEvent {
    /// The guest reset the machine through the i8042.
    Reset,
    /// A vCPU stopped on its own.
    VcpuStopped(u8, VcpuStop),
    /// An API action (boxed: some carry whole device configurations) and
    /// where its answer goes.
    Api(Box<VmmAction>, Sender<ActionResult>),
    /// A NIC's backend process (passt) exited; carries the message.
    BackendExited(String),
}

/// What one wait returned.
#[derive(Debug)]
pub enum Ready {
    /// An event from another thread.
    Event(VmEvent),
    /// SIGINT, SIGTERM or SIGHUP.
    Signal(i32),
    /// A virtio device asked to be activated.
    Activate,
    /// The deadline passed.
    Timeout,
}

/// Errors of the event loop.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    /// epoll, eventfd or signalfd could not be set up.
    #[error("cannot set up the event loop ({what})")]
    Setup {
        /// What failed.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// epoll_wait failed.
    #[error("event loop wait failed")]
    Wait(#[source] std::io::Error),
}

/// Hands events to the main thread from any thread.
#[derive(Clone)]
pub struct EventSender {
    tx: Sender<VmEvent>,
    wake: Arc<EventFd>,
}

impl EventSender {
    /// Queue `event` and wake the loop. Dropped silently once the loop is gone.
    pub fn send(&self, event: VmEvent) {
        if self.tx.send(event).is_ok() {
            if let Err(e) = self.wake.write(1) {
                log::error!("cannot wake the event loop: {e}");
            }
        }
    }
}

/// The API's actions reach the main thread as events.
impl ActionSink for EventSender {
    fn submit(&self, action: VmmAction, reply: Sender<ActionResult>) {
        self.send(VmEvent::Api(Box::new(action), reply));
    }
}

const TOKEN_WAKE: u64 = 0;
const TOKEN_ACTIVATE: u64 = 1;
const TOKEN_SIGNAL: u64 = 2;

/// The epoll set and the channel behind it.
pub struct EventLoop {
    epoll: Epoll,
    wake: Arc<EventFd>,
    tx: Sender<VmEvent>,
    rx: Receiver<VmEvent>,
    activate: EventFd,
    signals: std::fs::File,
}

impl EventLoop {
    /// A loop serving SIGINT/SIGTERM/SIGHUP (blocked here in the calling thread:
    /// they must be blocked in every thread, see `main`).
    pub fn new() -> Result<Self, EventLoopError> {
        let setup = |what| move |source| EventLoopError::Setup { what, source };
        let set = host::block_stop_signals().map_err(setup("signal mask"))?;
        let signals = host::signal_fd(&set).map_err(setup("signalfd"))?;
        let epoll = Epoll::new().map_err(setup("epoll"))?;
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(setup("eventfd"))?);
        let activate = EventFd::new(EFD_NONBLOCK).map_err(setup("eventfd"))?;
        for (fd, token) in [
            (wake.as_raw_fd(), TOKEN_WAKE),
            (activate.as_raw_fd(), TOKEN_ACTIVATE),
            (signals.as_raw_fd(), TOKEN_SIGNAL),
        ] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(setup("epoll_ctl"))?;
        }
        let (tx, rx) = mpsc::channel();
        Ok(Self {
            epoll,
            wake,
            tx,
            rx,
            activate,
            signals,
        })
    }

    /// A sender for other threads.
    pub fn sender(&self) -> EventSender {
        EventSender {
            tx: self.tx.clone(),
            wake: self.wake.clone(),
        }
    }

    /// A copy of the activate eventfd, for the virtio transports.
    pub fn activate_evt(&self) -> std::io::Result<EventFd> {
        self.activate.try_clone()
    }

    /// Wait until something is ready or `deadline` passes.
    pub fn wait(&self, deadline: Option<Instant>) -> Result<Vec<Ready>, EventLoopError> {
        let mut ready = Vec::new();
        // Events queued before we slept (the wake count is read below).
        let mut events = [EpollEvent::default(); 3];
        let timeout_ms = match deadline {
            None => -1,
            Some(at) => {
                let left = at.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(vec![Ready::Timeout]);
                }
                // Round up so we never wake just before the deadline.
                i32::try_from(left.as_millis().saturating_add(1)).unwrap_or(i32::MAX)
            }
        };
        let n = match self.epoll.wait(timeout_ms, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
            Err(e) => return Err(EventLoopError::Wait(e)),
        };
        for ev in &events[..n] {
            match ev.data() {
                TOKEN_WAKE => {
                    // EAGAIN: merged with an earlier wake.
                    let _ = self.wake.read();
                }
                TOKEN_ACTIVATE => {
                    let _ = self.activate.read();
                    ready.push(Ready::Activate);
                }
                TOKEN_SIGNAL => {
                    while let Some(sig) = host::read_signal(&self.signals) {
                        ready.push(Ready::Signal(sig));
                    }
                }
                _ => {}
            }
        }
        // Drain the channel whatever woke us: a send and its wake are not atomic.
        while let Ok(ev) = self.rx.try_recv() {
            ready.push(Ready::Event(ev));
        }
        if ready.is_empty() && deadline.is_some_and(|d| Instant::now() >= d) {
            ready.push(Ready::Timeout);
        }
        Ok(ready)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn events_wake_the_loop_and_deadlines_end_it() {
        let lp = EventLoop::new().unwrap();
        let tx = lp.sender();
        std::thread::spawn(move || tx.send(VmEvent::Reset));
        let got = lp
            .wait(Some(Instant::now() + Duration::from_secs(10)))
            .unwrap();
        assert!(matches!(got.as_slice(), [Ready::Event(VmEvent::Reset)]));

        lp.activate_evt().unwrap().write(1).unwrap();
        let got = lp.wait(None).unwrap();
        assert!(matches!(got.as_slice(), [Ready::Activate]));

        let t0 = Instant::now();
        let got = lp
            .wait(Some(Instant::now() + Duration::from_millis(30)))
            .unwrap();
        assert!(matches!(got.as_slice(), [Ready::Timeout]));
        assert!(t0.elapsed() >= Duration::from_millis(30));
    }
}
