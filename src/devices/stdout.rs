//! Guest console output on its way to the host's stdout: a bounded buffer
//! that the UART (on a vCPU thread) and the virtio-console worker fill, and
//! one `stdout` thread that writes it out, a trickle (the UART's byte per
//! exit) gathered for up to 5 ms into one `write`.
//!
//! A reader that is slow still slows the guest down (a writer waits for
//! room, as it waited on the pipe before), so nothing is lost to a pager or
//! a busy log collector. A stdout that takes nothing for [`STALL`] (a pipe
//! nobody drains, a stopped terminal) is given up on until it takes bytes
//! again: output is dropped, counted and reported once on stderr, and no
//! vCPU or worker waits on it longer than that. A stdout that is closed or
//! whose reader is gone (EPIPE) drops everything from then on.
//! [`drain`] lets the exit path hand over what is still buffered, within a
//! bound.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// Bytes buffered for stdout at most; a writer waits (up to [`STALL`]) for
/// room beyond it.
const CAPACITY: usize = 256 << 10;
/// Most bytes the stdout thread hands to one `write` (a pipe's default size).
const CHUNK: usize = 64 << 10;
/// How long stdout may take nothing before its output is dropped.
pub const STALL: Duration = Duration::from_secs(2);
/// How long the stdout thread lets a trickle of output gather before each
/// write: the UART hands over one byte per port write, and a thread
/// wakeup and a `write` per byte cost more than the byte's exits. At most
/// one `write` per LINGER while output trickles; a human does not see 5 ms.
const LINGER: Duration = Duration::from_millis(5);

#[derive(Default)]
struct State {
    buf: VecDeque<u8>,
    /// When the stdout thread began the `write` it is in, if it is in one.
    writing_since: Option<Instant>,
    /// Bytes dropped since stdout last took some.
    dropped: u64,
    /// Writes failed for good (EPIPE, EBADF): drop everything.
    closed: bool,
    /// The stdout thread waits for bytes: wake it.
    idle: bool,
    /// Threads waiting for room (or for the buffer to drain): tell them
    /// after a write. Without waiters the notification's syscall is saved.
    room_waiters: usize,
}

impl State {
    /// Stdout has taken nothing for [`STALL`] while bytes wait.
    fn stalled(&self) -> bool {
        self.writing_since.is_some_and(|t| t.elapsed() >= STALL)
    }
}

struct Shared {
    state: Mutex<State>,
    /// Bytes to write (for the stdout thread).
    ready: Condvar,
    /// Room in the buffer, or everything written (for writers and [`drain`]).
    room: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A writer into the stdout buffer; cheap to clone, never fails.
#[derive(Clone)]
pub struct StdoutSink {
    /// `None`: the stdout thread could not be made; write to stdout here.
    shared: Option<Arc<Shared>>,
}

static SINK: OnceLock<StdoutSink> = OnceLock::new();

/// The process's stdout sink, its thread started on first use.
pub fn sink() -> StdoutSink {
    SINK.get_or_init(|| {
        StdoutSink::start(io::stdout()).unwrap_or_else(|e| {
            log::error!("cannot start the stdout thread (console output goes to stdout from the guest's own threads): {e}");
            StdoutSink { shared: None }
        })
    })
    .clone()
}

/// Wait until what the guest wrote is on stdout, at most `timeout` (none
/// at all while stdout is stalled): for the exit path.
pub fn drain(timeout: Duration) {
    if let Some(s) = SINK.get() {
        s.drain(timeout);
    }
}

impl StdoutSink {
    /// A sink whose thread writes into `out`.
    pub fn start(out: impl Write + Send + 'static) -> io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            ready: Condvar::new(),
            room: Condvar::new(),
        });
        let s = shared.clone();
        std::thread::Builder::new()
            .name("stdout".into())
            .spawn(move || writer(&s, out))?;
        Ok(Self {
            shared: Some(shared),
        })
    }

    /// Wait until the buffer is written out, at most `timeout`.
    pub fn drain(&self, timeout: Duration) {
        let Some(shared) = &self.shared else {
            return;
        };
        let end = Instant::now() + timeout;
        let mut st = shared.lock();
        while !st.closed && !st.stalled() && (!st.buf.is_empty() || st.writing_since.is_some()) {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            st.room_waiters += 1;
            st = shared
                .room
                .wait_timeout(st, left.min(STALL))
                .unwrap_or_else(|e| e.into_inner())
                .0;
            st.room_waiters -= 1;
        }
    }

    /// Bytes dropped since stdout last took some (for tests).
    #[cfg(test)]
    fn dropped(&self) -> u64 {
        self.shared.as_ref().map_or(0, |s| s.lock().dropped)
    }
}

impl Write for StdoutSink {
    fn write(&mut self, mut data: &[u8]) -> io::Result<usize> {
        let len = data.len();
        let Some(shared) = &self.shared else {
            let mut out = io::stdout();
            let _ = out.write_all(data).and_then(|()| out.flush());
            return Ok(len);
        };
        let mut st = shared.lock();
        loop {
            if st.closed {
                return Ok(len);
            }
            let n = data.len().min(CAPACITY.saturating_sub(st.buf.len()));
            st.buf.extend(&data[..n]);
            data = &data[n..];
            if n > 0 && st.idle {
                shared.ready.notify_one();
            }
            if data.is_empty() {
                return Ok(len);
            }
            if st.stalled() {
                if st.dropped == 0 {
                    crate::say!(
                        "microvm: stdout has taken nothing for {} s: guest console output is dropped until it takes some",
                        STALL.as_secs()
                    );
                }
                st.dropped = st.dropped.saturating_add(data.len() as u64);
                return Ok(len);
            }
            st.room_waiters += 1;
            st = shared
                .room
                .wait_timeout(st, STALL)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            st.room_waiters -= 1;
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        // Never waits: the stdout thread writes as soon as it can.
        Ok(())
    }
}

/// The stdout thread: write what the buffer holds, chunk by chunk.
fn writer(shared: &Shared, mut out: impl Write) {
    if let Err(e) = crate::seccomp::install(crate::seccomp::ThreadKind::Stdout) {
        crate::say!("microvm: stdout: {}", crate::error_chain(&e));
        shared.lock().closed = true;
        return;
    }
    let mut chunk = Vec::with_capacity(CHUNK);
    let mut st = shared.lock();
    loop {
        while st.buf.is_empty() {
            st.idle = true;
            st = shared.ready.wait(st).unwrap_or_else(|e| e.into_inner());
            st.idle = false;
        }
        if st.buf.len() < CHUNK {
            // A little waits: let more come (writers add without waking us
            // meanwhile). Also after a write, not only after a wakeup: a
            // byte that arrived during the write would otherwise be
            // written alone, and the UART's trickle would become one
            // `write` per byte.
            drop(st);
            std::thread::sleep(LINGER);
            st = shared.lock();
        }
        let n = st.buf.len().min(CHUNK);
        chunk.clear();
        chunk.extend(st.buf.drain(..n));
        st.writing_since = Some(Instant::now());
        drop(st);
        let r = out.write_all(&chunk).and_then(|()| out.flush());
        st = shared.lock();
        st.writing_since = None;
        if r.is_err() {
            // EPIPE, EBADF (`>&-`): nobody will read anything more.
            st.closed = true;
            st.buf.clear();
            shared.room.notify_all();
            return;
        }
        if st.dropped > 0 {
            crate::say!(
                "microvm: stdout takes output again; {} bytes of guest console output were dropped",
                st.dropped
            );
            st.dropped = 0;
        }
        if st.room_waiters > 0 {
            shared.room.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A stdout that takes nothing while `stuck` is set, then everything.
    #[derive(Clone)]
    struct Gate {
        stuck: Arc<AtomicBool>,
        got: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Gate {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            while self.stuck.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
            }
            self.got.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn everything_reaches_a_reader_that_reads() {
        let gate = Gate {
            stuck: Arc::new(AtomicBool::new(false)),
            got: Arc::default(),
        };
        let mut s = StdoutSink::start(gate.clone()).unwrap();
        let data: Vec<u8> = (0..3 * CAPACITY)
            .map(|i| u8::try_from(i % 251).unwrap())
            .collect();
        for piece in data.chunks(1000) {
            s.write_all(piece).unwrap();
        }
        s.drain(Duration::from_secs(10));
        assert_eq!(*gate.got.lock().unwrap(), data);
        assert_eq!(s.dropped(), 0);
    }

    #[test]
    fn a_stdout_that_takes_nothing_costs_a_writer_at_most_the_stall() {
        let gate = Gate {
            stuck: Arc::new(AtomicBool::new(true)),
            got: Arc::default(),
        };
        let mut s = StdoutSink::start(gate.clone()).unwrap();
        let t = Instant::now();
        // Three buffers' worth: the first fills the buffer, the writer
        // waits for room once (the stall), the rest is dropped at once.
        for piece in vec![7u8; 3 * CAPACITY].chunks(4096) {
            s.write_all(piece).unwrap();
        }
        let took = t.elapsed();
        assert!(took >= STALL && took < STALL * 3, "writes took {took:?}");
        assert!(s.dropped() > 0);
        // Exit does not wait for a stalled stdout either.
        let t = Instant::now();
        s.drain(Duration::from_secs(30));
        assert!(t.elapsed() < Duration::from_secs(1));
        // Once it takes bytes again, output flows and the count restarts.
        gate.stuck.store(false, Ordering::SeqCst);
        let end = Instant::now() + Duration::from_secs(10);
        while s.dropped() > 0 {
            assert!(Instant::now() < end, "stdout never took output again");
            std::thread::sleep(Duration::from_millis(5));
        }
        s.drain(Duration::from_secs(10));
        s.write_all(b"after").unwrap();
        s.drain(Duration::from_secs(10));
        assert!(gate.got.lock().unwrap().ends_with(b"after"));
        assert_eq!(s.dropped(), 0);
    }

    #[test]
    fn a_closed_stdout_drops_everything_at_once() {
        struct Closed;
        impl Write for Closed {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::from_raw_os_error(libc::EPIPE))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut s = StdoutSink::start(Closed).unwrap();
        s.write_all(b"first").unwrap();
        s.drain(Duration::from_secs(10));
        let t = Instant::now();
        for _ in 0..100 {
            s.write_all(&[1u8; CAPACITY]).unwrap();
        }
        assert!(t.elapsed() < Duration::from_secs(1));
    }
}
