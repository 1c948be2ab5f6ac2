//! Per-disk, per-queue counters.
//!
//! Each queue worker writes only its own [`QueueStats`] (relaxed atomics on a cache line of
//! its own), so counting costs no contention. Readers (the exit summary, later the metrics
//! endpoint) may see counters from slightly different instants.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

macro_rules! counters {
    ($($name:ident),* $(,)?) => {
        /// Counters of one queue.
        #[derive(Default)]
        #[repr(align(128))]
        pub struct QueueStats { $(pub $name: AtomicU64,)* }

        impl QueueStats {
            /// `(name, value)` for every counter, in declaration order.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name.load(Ordering::Relaxed)),)*]
            }
        }
    };
}

counters!(
    requests,
    reads,
    writes,
    flushes,
    discards,
    write_zeroes,
    get_ids,
    read_bytes,
    write_bytes,
    errors_ioerr,
    errors_unsupp,
    unaligned_fallbacks,
    short_transfers,
    retries,
    resubmitted,
    batches,
    notifications,
);

/// Adds `n` to a counter.
#[inline]
pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

pub struct DiskStats {
    pub queues: Vec<QueueStats>,
}

impl DiskStats {
    pub fn new(queues: u16) -> Self {
        DiskStats {
            queues: (0..queues).map(|_| QueueStats::default()).collect(),
        }
    }

    /// Sum of one counter over all queues.
    pub fn total(&self, name: &str) -> u64 {
        self.queues
            .iter()
            .flat_map(|q| q.snapshot())
            .filter(|(n, _)| *n == name)
            .map(|(_, v)| v)
            .sum()
    }

    /// Every counter, summed over the queues, in declaration order.
    pub fn totals(&self) -> Vec<(&'static str, u64)> {
        let mut out = self.queues[0].snapshot();
        for q in &self.queues[1..] {
            for (o, (_, v)) in out.iter_mut().zip(q.snapshot()) {
                o.1 += v;
            }
        }
        out
    }

    /// A JSON object with totals and per-queue counters.
    pub fn to_json(&self) -> String {
        let mut s = String::from("{\"totals\":{");
        let names: Vec<&str> = self.queues[0].snapshot().iter().map(|(n, _)| *n).collect();
        for (i, name) in names.iter().enumerate() {
            let _ = write!(
                s,
                "{}\"{}\":{}",
                if i > 0 { "," } else { "" },
                name,
                self.total(name)
            );
        }
        s.push_str("},\"queues\":[");
        for (qi, q) in self.queues.iter().enumerate() {
            s.push_str(if qi > 0 { ",{" } else { "{" });
            for (i, (name, v)) in q.snapshot().iter().enumerate() {
                let _ = write!(s, "{}\"{}\":{}", if i > 0 { "," } else { "" }, name, v);
            }
            s.push('}');
        }
        s.push_str("]}");
        s
    }
}

/// Lets through at most `burst` events per `period`, and counts the rest.
///
/// Guest-triggered log lines go through one of these, so a misbehaving guest cannot flood
/// the log (or slow the worker down by logging).
pub struct RateLimit {
    period: Duration,
    burst: u32,
    window_start: Instant,
    in_window: u32,
    suppressed: u64,
}

impl RateLimit {
    pub fn new(burst: u32, period: Duration) -> Self {
        RateLimit {
            period,
            burst,
            window_start: Instant::now(),
            in_window: 0,
            suppressed: 0,
        }
    }

    /// Returns `Some(suppressed_since_last)` if this event may be logged.
    pub fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        if now.duration_since(self.window_start) >= self.period {
            self.window_start = now;
            self.in_window = 0;
        }
        if self.in_window < self.burst {
            self.in_window += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_counts_what_it_drops() {
        let mut r = RateLimit::new(2, Duration::from_secs(3600));
        assert_eq!(r.allow(), Some(0));
        assert_eq!(r.allow(), Some(0));
        assert_eq!(r.allow(), None);
        assert_eq!(r.allow(), None);
        r.window_start -= Duration::from_secs(7200);
        assert_eq!(r.allow(), Some(2));
    }

    #[test]
    fn json_has_totals_and_queues() {
        let s = DiskStats::new(2);
        add(&s.queues[0].flushes, 3);
        add(&s.queues[1].flushes, 4);
        assert_eq!(s.total("flushes"), 7);
        let j = s.to_json();
        assert!(j.contains("\"totals\":{\"requests\":0"), "{j}");
        assert!(j.contains("\"flushes\":7"), "{j}");
        assert!(j.contains("\"flushes\":3"), "{j}");
    }
}
