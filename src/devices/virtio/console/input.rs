//! Host input for the virtio console, shared by the stdin thread (which
//! fills it) and the worker (which hands it to the guest), and the sink
//! guest output goes to.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Host input held for a guest that has not posted buffers yet; stdin waits
/// beyond this.
pub const INPUT_MAX: usize = 4096;

/// Host input waiting for the guest, shared by the stdin thread and the
/// worker. [`ConsoleInput::enqueue`] wakes the worker.
#[derive(Clone)]
pub struct ConsoleInput {
    pub(super) bytes: Arc<Mutex<VecDeque<u8>>>,
    pub(super) evt: Arc<EventFd>,
}

impl ConsoleInput {
    /// An empty input buffer.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            bytes: Arc::new(Mutex::new(VecDeque::with_capacity(INPUT_MAX))),
            evt: Arc::new(EventFd::new(EFD_NONBLOCK)?),
        })
    }

    /// Queue bytes for the guest; returns how many fit (0 when
    /// [`INPUT_MAX`] are waiting already: try again later).
    pub fn enqueue(&self, bytes: &[u8]) -> usize {
        let n = {
            let mut q = self.bytes.lock().unwrap_or_else(|e| e.into_inner());
            let n = bytes.len().min(INPUT_MAX.saturating_sub(q.len()));
            q.extend(&bytes[..n]);
            n
        };
        if n > 0 {
            if let Err(e) = self.evt.write(1) {
                log::warn!("virtio-console: cannot wake the worker: {e}");
            }
        }
        n
    }
}

/// Where guest output goes.
pub type ConsoleSink = Box<dyn Write + Send>;
