//! One limiter for log lines a guest can cause: a hostile or broken driver
//! may repeat the same mistake in a loop, and the host log must not grow
//! with it. The first [`GuestLog::IN_FULL`] messages are logged; after them
//! at most one every [`GuestLog::INTERVAL`], with the count of those
//! suppressed in between.

use std::fmt;
use std::time::{Duration, Instant};

/// Counts guest-caused problems and logs a bounded share of them.
#[derive(Debug, Default)]
pub struct GuestLog {
    count: u64,
    last: Option<Instant>,
    suppressed: u64,
}

impl GuestLog {
    /// Messages logged before the limit applies.
    pub const IN_FULL: u64 = 10;
    /// Least time between two messages once the limit applies.
    pub const INTERVAL: Duration = Duration::from_secs(5);

    /// Record one problem; log `label: msg` if the limit lets it through.
    pub fn warn(&mut self, label: impl fmt::Display, msg: fmt::Arguments<'_>) {
        self.count = self.count.saturating_add(1);
        let now = Instant::now();
        let quiet = self.count > Self::IN_FULL
            && self
                .last
                .is_some_and(|t| now.duration_since(t) < Self::INTERVAL);
        if quiet {
            self.suppressed += 1;
            return;
        }
        self.last = Some(now);
        let n = self.count;
        match std::mem::take(&mut self.suppressed) {
            0 => log::warn!("{label}: {msg} (guest problem #{n})"),
            s => log::warn!("{label}: {msg} (guest problem #{n}, {s} similar suppressed)"),
        }
    }

    /// Record one error, logged with its causes.
    pub fn report(&mut self, label: impl fmt::Display, what: &str, err: &dyn std::error::Error) {
        self.warn(label, format_args!("{what}: {}", crate::error_chain(err)));
    }

    /// Problems recorded so far, logged or not.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Messages suppressed since the last one logged.
    pub fn suppressed(&self) -> u64 {
        self.suppressed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_logged_in_full_then_thinned_out() {
        let mut log = GuestLog::default();
        for i in 0..GuestLog::IN_FULL {
            log.warn("dev", format_args!("bad {i}"));
            assert_eq!(log.suppressed(), 0, "message {i} is logged");
        }
        // The eleventh comes within the interval of the tenth.
        for _ in 0..1000 {
            log.warn("dev", format_args!("bad"));
        }
        assert_eq!(log.count(), GuestLog::IN_FULL + 1000);
        assert_eq!(log.suppressed(), 1000);
    }
}
