//! Token buckets with Firecracker's `rate_limiter` semantics: a limiter has
//! up to two buckets, `bandwidth` (bytes) and `ops` (requests or frames).
//! A bucket holds `size` tokens and refills from empty to full in
//! `refill_time` ms, continuously; `one_time_burst` tokens more are there
//! at the start and spent first, never refilled. A bucket with `size` 0 or
//! `refill_time` 0 limits nothing, as in Firecracker.
//!
//! One charge larger than a whole bucket is let through when the bucket is
//! full and leaves it in debt, so a big request is slowed to the rate
//! instead of starved. The arithmetic is in u128 and saturating: the
//! figures come from API clients and snapshot files.
//!
//! Pure and clock-driven (the caller passes `Instant`s): the devices wait
//! on a timer for the [`Duration`] a refused charge returns.

use std::time::{Duration, Instant};

/// One bucket as the API and the config file give it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BucketConfig {
    /// Tokens the bucket holds when full.
    pub size: u64,
    /// Tokens spent before the bucket's own, once.
    #[serde(default)]
    pub one_time_burst: Option<u64>,
    /// Milliseconds to refill from empty to full.
    pub refill_time: u64,
}

impl BucketConfig {
    /// Whether the bucket limits anything.
    pub fn limits(&self) -> bool {
        self.size > 0 && self.refill_time > 0
    }
}

/// A limiter as the API gives it; the default limits nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Bytes.
    #[serde(default)]
    pub bandwidth: Option<BucketConfig>,
    /// Operations.
    #[serde(default)]
    pub ops: Option<BucketConfig>,
}

impl RateLimitConfig {
    /// Whether any bucket limits anything.
    pub fn limits(&self) -> bool {
        self.bandwidth.is_some_and(|b| b.limits()) || self.ops.is_some_and(|b| b.limits())
    }

    /// The limiter as an API answer shows it: `null` buckets when unlimited.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({ "bandwidth": self.bandwidth, "ops": self.ops })
    }
}

/// A limit per second, as the command line gives it: `bytes` of bandwidth
/// and `ops` operations each second. Each bucket holds a tenth of a second
/// of the rate where that divides evenly (else the largest of 1/8, 1/5,
/// 1/4, 1/2 that does, else a whole second): a bucket is also the burst a
/// device gets after an idle spell, and a one-second one let a 5 s transfer
/// through at 1.2 times the rate.
pub fn per_second(bytes: Option<u64>, ops: Option<u64>) -> RateLimitConfig {
    let bucket = |rate: u64| {
        let parts = [10, 8, 5, 4, 2]
            .into_iter()
            .find(|d| rate.is_multiple_of(*d))
            .unwrap_or(1);
        BucketConfig {
            size: rate / parts,
            one_time_burst: None,
            refill_time: 1000 / parts,
        }
    };
    RateLimitConfig {
        bandwidth: bytes.map(bucket),
        ops: ops.map(bucket),
    }
}

/// `N`, `NK`, `NM` or `NG` (powers of 1024), at least 1: a command-line rate.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let (digits, shift) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    digits
        .parse::<u64>()
        .ok()
        .filter(|&n| n > 0)
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| {
            format!("'{s}' is not a rate (a positive number, optionally with K, M or G)")
        })
}

const NS_PER_MS: u128 = 1_000_000;

/// A running bucket.
#[derive(Clone, Debug)]
struct Bucket {
    size: u128,
    refill_ns: u128,
    burst: u128,
    /// May be negative after a charge larger than the bucket.
    budget: i128,
    /// Time of the last refill, and nanoseconds of it not yet turned into
    /// a whole token.
    last: Instant,
    carry_ns: u128,
}

fn to_i128(v: u128) -> i128 {
    i128::try_from(v).unwrap_or(i128::MAX)
}

impl Bucket {
    fn new(c: &BucketConfig, now: Instant) -> Option<Self> {
        c.limits().then(|| Self {
            size: u128::from(c.size),
            refill_ns: u128::from(c.refill_time).saturating_mul(NS_PER_MS),
            burst: u128::from(c.one_time_burst.unwrap_or(0)),
            budget: to_i128(u128::from(c.size)),
            last: now,
            carry_ns: 0,
        })
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_nanos();
        self.last = now;
        let ns = elapsed.saturating_add(self.carry_ns);
        // Tokens for `ns`: ns * size / refill_ns, the rest kept for later.
        let tokens = ns.saturating_mul(self.size) / self.refill_ns;
        self.carry_ns = if tokens >= self.size {
            0
        } else {
            ns - tokens * self.refill_ns / self.size.max(1)
        };
        let size = to_i128(self.size);
        self.budget = self.budget.saturating_add(to_i128(tokens)).min(size);
    }

    /// How long until `n` tokens can be taken (zero: now).
    fn wait_for(&self, n: u128) -> Duration {
        if n <= self.burst {
            return Duration::ZERO;
        }
        // A charge larger than the bucket waits for a full bucket.
        let need = to_i128((n - self.burst).min(self.size));
        if self.budget >= need {
            return Duration::ZERO;
        }
        let missing = need.saturating_sub(self.budget).unsigned_abs();
        let ns = missing
            .saturating_mul(self.refill_ns)
            .div_ceil(self.size)
            .saturating_sub(self.carry_ns)
            .max(1);
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }

    fn take(&mut self, n: u128) {
        let from_burst = n.min(self.burst);
        self.burst -= from_burst;
        self.budget = self.budget.saturating_sub(to_i128(n - from_burst));
    }
}

/// A limiter: its buckets and their state.
#[derive(Clone, Debug, Default)]
pub struct RateLimiter {
    bandwidth: Option<Bucket>,
    ops: Option<Bucket>,
}

impl RateLimiter {
    /// A limiter with full buckets.
    pub fn new(c: &RateLimitConfig, now: Instant) -> Self {
        Self {
            bandwidth: c.bandwidth.as_ref().and_then(|b| Bucket::new(b, now)),
            ops: c.ops.as_ref().and_then(|b| Bucket::new(b, now)),
        }
    }

    /// Whether it limits anything.
    pub fn limits(&self) -> bool {
        self.bandwidth.is_some() || self.ops.is_some()
    }

    /// Charge `bytes` and `ops` together, or neither: `Err` says how long
    /// until the charge would fit.
    pub fn consume(&mut self, bytes: u64, ops: u64, now: Instant) -> Result<(), Duration> {
        let mut wait = Duration::ZERO;
        for (bucket, n) in [(&mut self.bandwidth, bytes), (&mut self.ops, ops)] {
            if let Some(b) = bucket {
                b.refill(now);
                wait = wait.max(b.wait_for(u128::from(n)));
            }
        }
        if !wait.is_zero() {
            return Err(wait);
        }
        for (bucket, n) in [(&mut self.bandwidth, bytes), (&mut self.ops, ops)] {
            if let Some(b) = bucket {
                b.take(u128::from(n));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(size: u64, refill_time: u64, burst: Option<u64>) -> BucketConfig {
        BucketConfig {
            size,
            one_time_burst: burst,
            refill_time,
        }
    }

    fn bw(b: BucketConfig) -> RateLimitConfig {
        RateLimitConfig {
            bandwidth: Some(b),
            ops: None,
        }
    }

    #[test]
    fn a_full_bucket_gives_its_size_then_refills_at_the_rate() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(&bw(bucket(1000, 100, None)), t0);
        assert!(l.consume(600, 1, t0).is_ok());
        assert!(l.consume(400, 1, t0).is_ok());
        let wait = l.consume(100, 1, t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(10));
        assert!(l.consume(100, 1, t0 + Duration::from_millis(9)).is_err());
        assert!(l.consume(100, 1, t0 + Duration::from_millis(10)).is_ok());
        // Never more than the size, however long it rested.
        let later = t0 + Duration::from_secs(60);
        assert!(l.consume(1000, 1, later).is_ok());
        assert!(l.consume(1, 1, later).is_err());
    }

    #[test]
    fn fractions_of_a_token_are_not_lost() {
        // 3 tokens per 10 ms: 1 per 3.33 ms.
        let t0 = Instant::now();
        let mut l = RateLimiter::new(&bw(bucket(3, 10, None)), t0);
        assert!(l.consume(3, 0, t0).is_ok());
        let mut t = t0;
        let mut got = 0;
        for _ in 0..1000 {
            t += Duration::from_millis(1);
            if l.consume(1, 0, t).is_ok() {
                got += 1;
            }
        }
        // 1 s at 300/s.
        assert!((299..=300).contains(&got), "{got}");
    }

    #[test]
    fn the_burst_is_spent_first_and_once() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(&bw(bucket(100, 1000, Some(500))), t0);
        assert!(l.consume(500, 0, t0).is_ok());
        assert!(l.consume(100, 0, t0).is_ok());
        assert!(l.consume(1, 0, t0).is_err());
        let t1 = t0 + Duration::from_secs(10);
        assert!(l.consume(100, 0, t1).is_ok());
        assert!(l.consume(1, 0, t1).is_err(), "the burst does not come back");
    }

    #[test]
    fn a_charge_larger_than_the_bucket_passes_when_full_and_leaves_a_debt() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(&bw(bucket(100, 100, None)), t0);
        assert!(l.consume(300, 0, t0).is_ok());
        // 200 in debt: 200 ms to be back at 0, 201 ms for one token.
        let wait = l.consume(1, 0, t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(201));
        // A second large one waits for a full bucket.
        let t1 = t0 + Duration::from_millis(250);
        assert!(l.consume(300, 0, t1).is_err());
        assert!(l.consume(300, 0, t0 + Duration::from_millis(300)).is_ok());
    }

    #[test]
    fn both_buckets_or_neither() {
        let t0 = Instant::now();
        let c = RateLimitConfig {
            bandwidth: Some(bucket(1000, 1000, None)),
            ops: Some(bucket(2, 1000, None)),
        };
        let mut l = RateLimiter::new(&c, t0);
        assert!(l.consume(10, 1, t0).is_ok());
        assert!(l.consume(10, 1, t0).is_ok());
        // Ops are out: the bytes are not taken either.
        assert!(l.consume(10, 1, t0).is_err());
        assert!(l.consume(980, 0, t0).is_ok());
    }

    #[test]
    fn zero_size_or_refill_limits_nothing_and_huge_figures_do_not_overflow() {
        let t0 = Instant::now();
        for b in [bucket(0, 100, None), bucket(100, 0, None)] {
            let mut l = RateLimiter::new(&bw(b), t0);
            assert!(!l.limits());
            assert!(l.consume(u64::MAX, u64::MAX, t0).is_ok());
        }
        let huge = bucket(u64::MAX, u64::MAX, Some(u64::MAX));
        let mut l = RateLimiter::new(
            &RateLimitConfig {
                bandwidth: Some(huge),
                ops: Some(huge),
            },
            t0,
        );
        for i in 0..4 {
            let _ = l.consume(u64::MAX, u64::MAX, t0 + Duration::from_secs(i * 1000));
        }
        let mut l = RateLimiter::new(&bw(bucket(1, u64::MAX, None)), t0);
        assert!(l.consume(1, 0, t0).is_ok());
        assert!(l.consume(1, 0, t0).unwrap_err() > Duration::from_secs(1 << 30));
    }

    #[test]
    fn command_line_rates() {
        assert_eq!(parse_rate("10M"), Ok(10 << 20));
        assert_eq!(parse_rate("512k"), Ok(512 << 10));
        assert_eq!(parse_rate("7"), Ok(7));
        for bad in ["", "0", "M", "-1", "1.5M", "99999999999G"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
        let c = per_second(Some(1 << 20), None);
        // 2^20 B/s: buckets of 1/8 s.
        let b = c.bandwidth.unwrap();
        assert_eq!((b.size, b.refill_time), (1 << 17, 125));
        assert!(c.ops.is_none() && c.limits());
        for (rate, size, refill) in [
            (10 << 20, 1 << 20, 100),
            (1000, 100, 100),
            (7, 7, 1000),
            (3, 3, 1000),
            (6, 3, 500),
        ] {
            let b = per_second(None, Some(rate)).ops.unwrap();
            assert_eq!((b.size, b.refill_time), (size, refill), "{rate}/s");
            // The same rate whatever the bucket.
            assert_eq!(b.size * 1000 / b.refill_time, rate);
        }
    }

    #[test]
    fn the_api_shape_parses_and_refuses_unknown_fields() {
        let c: RateLimitConfig = serde_json::from_str(
            r#"{"bandwidth": {"size": 10485760, "refill_time": 1000}, "ops": null}"#,
        )
        .unwrap();
        assert!(c.limits());
        assert_eq!(c.bandwidth.unwrap().size, 10 << 20);
        assert!(!serde_json::from_str::<RateLimitConfig>("{}")
            .unwrap()
            .limits());
        assert!(serde_json::from_str::<RateLimitConfig>(r#"{"bandwidth": {}}"#).is_err());
        assert!(serde_json::from_str::<RateLimitConfig>(r#"{"speed": 1}"#).is_err());
    }
}
