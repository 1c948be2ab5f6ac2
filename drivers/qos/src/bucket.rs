//! Token buckets, pure: every method takes the time `now` (nanoseconds on some monotonic
//! clock) as an argument, so the rate logic is tested on a simulated clock.
//!
//! # Arithmetic
//!
//! The level is kept in *token-nanoseconds* (one token = 10^9 units), so that refilling at
//! `rate` tokens per second adds exactly `rate` units per elapsed nanosecond: integers, no
//! rounding, no drift, whatever the rate. `i128` holds every product (`u64` rate times `u64`
//! nanoseconds).
//!
//! # Burst and large requests
//!
//! The bucket holds at most [`BURST`] (100 ms) worth of tokens, and starts full. A request is
//! admitted once the level reaches its cost, or the capacity when the cost is larger: so a
//! request bigger than the burst (a 1 MiB write under a 1 MiB/s limit) still passes, when
//! the bucket is full, and leaves the level negative; the debt is repaid before anything else
//! passes. The long-run rate is the limit either way.

use std::time::Duration;

/// Tokens a bucket can hold, as time at the limit rate.
pub const BURST: Duration = Duration::from_millis(100);

/// Units per token (the level is in token-nanoseconds).
const UNIT: i128 = 1_000_000_000;

/// One token bucket: `rate` tokens per second, up to [`BURST`] worth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBucket {
    /// Tokens per second (> 0).
    rate: u64,
    /// Token-nanoseconds: `rate * BURST`.
    capacity: i128,
    /// Token-nanoseconds; negative after a request larger than the capacity.
    level: i128,
    /// When `level` was last brought up to date.
    last_ns: u64,
}

impl TokenBucket {
    /// A full bucket of `rate` (> 0) tokens per second, at time `now_ns`.
    pub fn new(rate: u64, now_ns: u64) -> TokenBucket {
        assert!(rate > 0, "an unlimited bucket is no bucket");
        let capacity = i128::from(rate) * BURST.as_nanos() as i128;
        TokenBucket {
            rate,
            capacity,
            level: capacity,
            last_ns: now_ns,
        }
    }

    /// Tokens per second.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Adds the tokens earned since the last call. A `now_ns` earlier than the last one
    /// (clock reads racing between threads) earns nothing and does not move time back.
    fn refill(&mut self, now_ns: u64) {
        let elapsed = now_ns.saturating_sub(self.last_ns);
        self.last_ns = self.last_ns.max(now_ns);
        let earned = i128::from(elapsed) * i128::from(self.rate);
        self.level = (self.level + earned).min(self.capacity);
    }

    /// Nanoseconds until a request of `cost` tokens can be admitted (0: now).
    pub fn wait_ns(&mut self, now_ns: u64, cost: u64) -> u64 {
        self.refill(now_ns);
        let need = (i128::from(cost) * UNIT).min(self.capacity);
        if self.level >= need {
            return 0;
        }
        let missing = need - self.level;
        let rate = i128::from(self.rate);
        let ns = (missing + rate - 1) / rate;
        u64::try_from(ns).unwrap_or(u64::MAX)
    }

    /// Takes `cost` tokens (after [`wait_ns`](Self::wait_ns) said 0, at the same `now`).
    pub fn take(&mut self, cost: u64) {
        self.level -= i128::from(cost) * UNIT;
    }

    /// Whole tokens available now (negative: debt), for tests and stats.
    pub fn tokens(&mut self, now_ns: u64) -> i64 {
        self.refill(now_ns);
        i64::try_from(self.level.div_euclid(UNIT)).unwrap_or(i64::MAX)
    }
}

/// The two buckets of one attachment: operations and bytes, each optional (unlimited).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limiter {
    ops: Option<TokenBucket>,
    bytes: Option<TokenBucket>,
}

impl Limiter {
    /// Buckets for `iops` operations and `bytes_per_sec` bytes per second (0: unlimited).
    pub fn new(iops: u64, bytes_per_sec: u64, now_ns: u64) -> Limiter {
        Limiter {
            ops: (iops > 0).then(|| TokenBucket::new(iops, now_ns)),
            bytes: (bytes_per_sec > 0).then(|| TokenBucket::new(bytes_per_sec, now_ns)),
        }
    }

    /// Whether neither bucket limits anything.
    pub fn is_unlimited(&self) -> bool {
        self.ops.is_none() && self.bytes.is_none()
    }

    /// Admits one operation of `bytes` bytes at `now_ns`, charging both buckets, or says how
    /// many nanoseconds to wait: then nothing is charged (a request is charged once, when it
    /// passes).
    pub fn admit(&mut self, now_ns: u64, bytes: u64) -> Result<(), u64> {
        let ops_wait = self.ops.as_mut().map_or(0, |b| b.wait_ns(now_ns, 1));
        let bytes_wait = self.bytes.as_mut().map_or(0, |b| b.wait_ns(now_ns, bytes));
        let wait = ops_wait.max(bytes_wait);
        if wait > 0 {
            return Err(wait);
        }
        if let Some(b) = self.ops.as_mut() {
            b.take(1);
        }
        if let Some(b) = self.bytes.as_mut() {
            b.take(bytes);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    /// A closed loop: one client submitting `bytes`-byte requests back to back for
    /// `seconds`, `think_ns` apart, waiting exactly as told. Returns the requests admitted.
    fn run(limiter: &mut Limiter, bytes: u64, seconds: u64, think_ns: u64) -> u64 {
        let (mut now, mut admitted) = (0u64, 0u64);
        while now < seconds * SEC {
            match limiter.admit(now, bytes) {
                Ok(()) => {
                    admitted += 1;
                    now += think_ns;
                }
                Err(wait) => {
                    assert!(wait > 0);
                    now += wait;
                }
            }
        }
        admitted
    }

    fn within_1_percent(got: f64, want: f64) {
        assert!(
            (got - want).abs() <= want * 0.01,
            "got {got}, want {want} ± 1%"
        );
    }

    #[test]
    fn iops_converge_to_the_limit() {
        for (iops, think, seconds) in [
            (3000, 0, 100),
            (1000, 17_000, 100),
            (7, 0, 100),
            (123_456, 1, 10),
        ] {
            let mut limiter = Limiter::new(iops, 0, 0);
            let admitted = run(&mut limiter, 4096, seconds, think);
            within_1_percent(admitted as f64 / seconds as f64, iops as f64);
        }
    }

    #[test]
    fn bandwidth_converges_with_64k_requests() {
        let mbps = 125u64;
        let rate = mbps << 20;
        let mut limiter = Limiter::new(0, rate, 0);
        let admitted = run(&mut limiter, 65536, 60, 0);
        within_1_percent((admitted * 65536) as f64 / 60.0, rate as f64);
        // 125 MiB/s of 64 KiB requests is 2000 requests per second.
        within_1_percent(admitted as f64 / 60.0, 2000.0);
    }

    #[test]
    fn the_tighter_limit_wins() {
        // 10 000 IOPS but 10 MiB/s: 64 KiB requests are bandwidth-bound (160/s)...
        let mut limiter = Limiter::new(10_000, 10 << 20, 0);
        within_1_percent(run(&mut limiter, 65536, 50, 0) as f64 / 50.0, 160.0);
        // ...and 512-byte requests IOPS-bound.
        let mut limiter = Limiter::new(10_000, 10 << 20, 0);
        within_1_percent(run(&mut limiter, 512, 50, 0) as f64 / 50.0, 10_000.0);
    }

    #[test]
    fn burst_is_100ms_of_tokens_and_does_not_accumulate() {
        let mut limiter = Limiter::new(1000, 0, 0);
        for _ in 0..100 {
            assert_eq!(limiter.admit(0, 0), Ok(()));
        }
        // Empty: the next op waits exactly one token's time (1 ms at 1000 IOPS).
        assert_eq!(limiter.admit(0, 0), Err(1_000_000));
        assert_eq!(limiter.admit(999_999, 0), Err(1));
        assert_eq!(limiter.admit(1_000_000, 0), Ok(()));
        // Ten idle seconds refill only the burst: 100 more at once, then waits.
        let later = 11 * SEC;
        for _ in 0..100 {
            assert_eq!(limiter.admit(later, 0), Ok(()));
        }
        assert!(limiter.admit(later, 0).is_err());
    }

    #[test]
    fn requests_larger_than_the_burst_pass_when_full_and_leave_a_debt() {
        let rate = 1 << 20; // 1 MiB/s: the bucket holds 104 857.6 bytes
        let mut limiter = Limiter::new(0, rate, 0);
        assert_eq!(limiter.admit(0, 1 << 20), Ok(()));
        // The debt (1 MiB - 100 ms) is repaid, then the bucket must be full again.
        let wait = limiter.admit(0, 1 << 20).unwrap_err();
        assert_eq!(wait, SEC);
        let admitted = run(&mut Limiter::new(0, rate, 0), 1 << 20, 100, 0);
        within_1_percent(admitted as f64 / 100.0, 1.0);
    }

    #[test]
    fn a_waiting_request_is_not_charged() {
        let mut limiter = Limiter::new(10, 1000, 0);
        assert_eq!(limiter.admit(0, 100), Ok(())); // the whole byte burst
        assert!(limiter.admit(0, 100).is_err());
        assert!(limiter.admit(0, 100).is_err());
        // Only the admitted op was charged: the ops bucket held 1 (100 ms of 10 IOPS) and is
        // empty, not in debt.
        assert_eq!(limiter.ops.as_mut().unwrap().tokens(0), 0);
    }

    #[test]
    fn time_going_backwards_earns_nothing() {
        let mut bucket = TokenBucket::new(1000, 5 * SEC);
        bucket.take(100);
        assert_eq!(bucket.wait_ns(SEC, 1), 1_000_000);
        assert_eq!(bucket.wait_ns(5 * SEC + 1_000_000, 1), 0);
    }
}
