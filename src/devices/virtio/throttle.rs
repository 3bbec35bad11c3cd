//! A device's rate limiter at run time: the [`RateLimiter`] its worker
//! charges, the timer the worker sleeps on while a charge is refused (a
//! limited device never spins), and the handle the VMM keeps to change the
//! limits (`PATCH`), which wakes the worker.
//!
//! The limiter sits behind a mutex only the worker takes on the fast path;
//! the VMM takes it for an update, so it is never contended for long.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use crate::rate_limit::{RateLimitConfig, RateLimiter};

struct Shared {
    limiter: Mutex<RateLimiter>,
    /// Charges refused so far (Firecracker's `*_throttled` counters).
    throttled: AtomicU64,
    config: Mutex<RateLimitConfig>,
    /// The worker's wake-up, written on each update: the worker looks at
    /// its queues again. Made with the worker.
    updated: Mutex<Option<EventFd>>,
}

/// What the device (and through it the VMM) keeps: the limits, to change
/// and show them.
#[derive(Clone)]
pub struct ThrottleHandle(Arc<Shared>);

impl ThrottleHandle {
    /// Limits `config`, buckets full.
    pub fn new(config: RateLimitConfig) -> Self {
        Self(Arc::new(Shared {
            limiter: Mutex::new(RateLimiter::new(&config, Instant::now())),
            throttled: AtomicU64::new(0),
            config: Mutex::new(config),
            updated: Mutex::new(None),
        }))
    }

    /// New limits, buckets full; a waiting worker is woken.
    pub fn update(&self, config: RateLimitConfig) {
        *self.0.limiter.lock().unwrap_or_else(|e| e.into_inner()) =
            RateLimiter::new(&config, Instant::now());
        *self.0.config.lock().unwrap_or_else(|e| e.into_inner()) = config;
        if let Some(evt) = &*self.0.updated.lock().unwrap_or_else(|e| e.into_inner()) {
            // EAGAIN: a wake is pending already.
            let _ = evt.write(1);
        }
    }

    /// Charges refused so far.
    pub fn throttled(&self) -> u64 {
        self.0.throttled.load(Ordering::Relaxed)
    }

    /// The limits in force.
    pub fn config(&self) -> RateLimitConfig {
        *self.0.config.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The worker's side: its own timer.
    pub fn worker(&self) -> std::io::Result<Throttle> {
        let timer = TimerFd::new()?;
        // Non-blocking, so reading it is never a wait.
        // SAFETY: F_SETFL on an fd we own.
        if unsafe { libc::fcntl(timer.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let updated = EventFd::new(EFD_NONBLOCK)?;
        *self.0.updated.lock().unwrap_or_else(|e| e.into_inner()) = Some(updated.try_clone()?);
        Ok(Throttle {
            shared: self.0.clone(),
            timer,
            updated,
            wake_at: None,
        })
    }
}

/// The worker's side of a limiter.
pub struct Throttle {
    shared: Arc<Shared>,
    timer: TimerFd,
    updated: EventFd,
    /// When the armed timer fires.
    wake_at: Option<Instant>,
}

impl Throttle {
    /// The fds to watch (readable): the timer and the update eventfd.
    pub fn fds(&self) -> [RawFd; 2] {
        [self.timer.as_raw_fd(), self.updated.as_raw_fd()]
    }

    /// [`Throttle::fds`] as a worker's watch list entries, tokens `first`
    /// and `first + 1`.
    pub fn watch(&self, first: u64) -> [(RawFd, u64, EventSet); 2] {
        let [timer, updated] = self.fds();
        [
            (timer, first, EventSet::IN),
            (updated, first + 1, EventSet::IN),
        ]
    }

    /// Whether `ready` holds one of the tokens of [`Throttle::watch`]; if
    /// so the fds are consumed ([`Throttle::on_ready`]) and the caller
    /// tries its queue again.
    pub fn woke(&mut self, ready: &[u64], first: u64) -> bool {
        let woke = ready.iter().any(|&t| t == first || t == first + 1);
        if woke {
            self.on_ready();
        }
        woke
    }

    /// Charge `bytes` and `ops`. A refused charge arms the timer for when
    /// it would fit and returns false: the caller puts its work back and
    /// waits for [`Throttle::fds`].
    pub fn admit(&mut self, bytes: u64, ops: u64) -> bool {
        let now = Instant::now();
        let r = self
            .shared
            .limiter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .consume(bytes, ops, now);
        match r {
            Ok(()) => true,
            Err(wait) => {
                self.shared.throttled.fetch_add(1, Ordering::Relaxed);
                self.arm(now, wait);
                false
            }
        }
    }

    fn arm(&mut self, now: Instant, wait: Duration) {
        let at = now + wait;
        // An earlier wake-up already armed serves: the charge is retried then.
        if self.wake_at.is_some_and(|t| t <= at && t > now) {
            return;
        }
        match self.timer.reset(wait, None) {
            Ok(()) => self.wake_at = Some(at),
            Err(e) => log::warn!("rate limiter: cannot arm its timer: {e}"),
        }
    }

    /// One of [`Throttle::fds`] was readable: consume it. The caller then
    /// tries its queues again.
    pub fn on_ready(&mut self) {
        // EAGAIN: the timer has not fired (the update eventfd woke us).
        if self.timer.wait().is_ok() {
            self.wake_at = None;
        }
        // Non-blocking; EAGAIN when it was the timer.
        let _ = self.updated.read();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rate_limit::BucketConfig;

    #[test]
    fn a_refused_charge_arms_the_timer_and_an_update_lifts_the_limit() {
        let limited = RateLimitConfig {
            bandwidth: None,
            ops: Some(BucketConfig {
                size: 1,
                one_time_burst: None,
                refill_time: 50,
            }),
        };
        let h = ThrottleHandle::new(limited);
        let mut t = h.worker().unwrap();
        assert!(t.admit(0, 1));
        assert!(!t.admit(0, 1));
        assert_eq!(h.throttled(), 1);
        let start = Instant::now();
        // The timer fires: poll its fd.
        let mut pfd = libc::pollfd {
            fd: t.fds()[0],
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the call.
        let n = unsafe { libc::poll(&mut pfd, 1, 2000) };
        assert_eq!(n, 1);
        assert!(start.elapsed() >= Duration::from_millis(30));
        t.on_ready();
        assert!(t.admit(0, 1));
        h.update(RateLimitConfig::default());
        t.on_ready();
        assert_eq!(h.config(), RateLimitConfig::default());
        for _ in 0..1000 {
            assert!(t.admit(1 << 20, 1));
        }
    }
}
