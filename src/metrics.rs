//! Per-disk request metrics: latency histograms by operation, and the two views of them
//! (with the [`crate::stats`] counters) that the management API serves: Prometheus text
//! ([`encode`]) and `ferrodisk stats --json` ([`to_json`]).
//!
//! # Two bucket distributions
//!
//! Every [`LatencyHistogram`] sorts each observation into two independent sets of buckets
//! (after seed US11190419: a coarse distribution over the whole range, and a finer one where
//! detail matters):
//!
//! - **coarse**, log-scale: upper bounds 1 µs × 2^k for k = 0..=24 (1 µs … ~16.8 s), plus
//!   `+Inf`: 26 buckets. Every latency is resolved to within a factor of two.
//! - **fine**, linear: a configurable [`FineRange`] `LO-HI/STEPS` (default `0-1ms/50`, i.e.
//!   50 buckets of 20 µs). Buckets follow Prometheus `le` semantics (upper bound inclusive):
//!   one bucket for values `≤ LO`, `STEPS` buckets `(LO + i·w, LO + (i+1)·w]` with
//!   `w = (HI − LO)/STEPS`, and `+Inf` for values `> HI`.
//!
//! Both are exported: `ferrodisk_request_latency_seconds` (coarse) and
//! `ferrodisk_request_latency_fine_seconds` (fine). [`percentile`] uses the fine buckets when
//! the wanted rank falls inside the fine range (unless the coarse bucket there is narrower,
//! as it is near zero), the coarse ones otherwise.
//!
//! # Why per queue
//!
//! Each queue worker owns one [`QueueMetrics`] (a histogram per [`OpKind`]), and nothing else
//! writes to it, so the hot path never contends with another thread: its cache lines stay in
//! the worker's core. Each histogram (and its fine buckets) is aligned to 128 bytes so that
//! neighbouring queues do not share a line either. Readers (scrapes, `ferrodisk stats`)
//! merge per-queue [`HistogramSnapshot`]s; like [`crate::stats`], a snapshot taken under load
//! may mix instants (a bucket may already count an observation whose `sum` does not yet).
//!
//! # Cost of [`LatencyHistogram::observe`]
//!
//! Integer arithmetic only: a division by the constant 1000 (a multiply), one
//! `leading_zeros` for the coarse bucket, one multiply and one division for the fine bucket,
//! then three relaxed `fetch_add`s on lines owned by the calling thread. No allocation, no
//! lock, no floating point.
//!
//! The sum of latencies is kept in nanoseconds in a `u64`; it wraps after 2^64 ns (584
//! years) divided by the mean number of requests in flight on the queue, which Prometheus
//! treats as a counter reset.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabel as _, EncodeLabelSet, LabelSetEncoder, NoLabelSet,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use serde_json::{json, Value};

#[cfg(test)]
mod tests;

/// Number of coarse buckets: 1 µs × 2^k for k = 0..=24, then `+Inf`.
pub const COARSE_BUCKETS: usize = 26;
/// The fine range used when none is configured: 0 to 1 ms in 50 steps of 20 µs.
pub const DEFAULT_FINE: &str = "0-1ms/50";
/// Steps taken when a fine range gives none.
pub const DEFAULT_STEPS: u32 = 50;
/// The most fine buckets a histogram may have.
pub const MAX_STEPS: u32 = 1000;

/// Errors in a fine latency range.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MetricsError {
    #[error("bad latency range `{spec}`: {why} (expected LO-HI[/STEPS] with units ns, us, ms or s, e.g. `0-1ms/50`)")]
    Syntax { spec: String, why: &'static str },
    #[error("latency range is empty: {lo_ns} ns is not below {hi_ns} ns")]
    Empty { lo_ns: u64, hi_ns: u64 },
    #[error("{0} steps is out of range (1 to 1000)")]
    Steps(u32),
    #[error("latency range is too wide for {steps} steps (at most {max_ns} ns)")]
    TooWide { steps: u32, max_ns: u64 },
}

/// The range of the fine, linear buckets: `(lo, hi]` in `steps` equal steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FineRange {
    lo_ns: u64,
    hi_ns: u64,
    steps: u32,
}

impl Default for FineRange {
    /// 0 to 1 ms in 50 steps of 20 µs.
    fn default() -> Self {
        FineRange {
            lo_ns: 0,
            hi_ns: 1_000_000,
            steps: DEFAULT_STEPS,
        }
    }
}

impl FineRange {
    /// A validated range: `lo_ns < hi_ns`, `1 ≤ steps ≤ 1000`, and `(hi − lo) × steps`
    /// within `u64` (about 5 hours wide at 1000 steps).
    pub fn new(lo_ns: u64, hi_ns: u64, steps: u32) -> Result<Self, MetricsError> {
        if lo_ns >= hi_ns {
            return Err(MetricsError::Empty { lo_ns, hi_ns });
        }
        if !(1..=MAX_STEPS).contains(&steps) {
            return Err(MetricsError::Steps(steps));
        }
        if (hi_ns - lo_ns).checked_mul(u64::from(steps)).is_none() {
            let max_ns = u64::MAX / u64::from(steps);
            return Err(MetricsError::TooWide { steps, max_ns });
        }
        Ok(FineRange {
            lo_ns,
            hi_ns,
            steps,
        })
    }

    /// Parses `LO-HI[/STEPS]`, e.g. `0-1ms/50` or `200us-2.5ms/100`. Units are `ns`, `us`
    /// (or `µs`), `ms` and `s`; `LO` without a unit takes that of `HI`. `STEPS` defaults
    /// to 50.
    pub fn parse(spec: &str) -> Result<Self, MetricsError> {
        let bad = |why| MetricsError::Syntax {
            spec: spec.to_string(),
            why,
        };
        let (range, steps) = match spec.split_once('/') {
            Some((r, s)) => (
                r,
                s.trim().parse().map_err(|_| bad("STEPS is not a number"))?,
            ),
            None => (spec, DEFAULT_STEPS),
        };
        let (lo, hi) = range.split_once('-').ok_or_else(|| bad("no `-` in it"))?;
        let (hi_num, hi_unit) = split_unit(hi.trim());
        let hi_mult = unit_ns(hi_unit.ok_or_else(|| bad("HI has no unit"))?)
            .ok_or_else(|| bad("unknown unit"))?;
        let (lo_num, lo_unit) = split_unit(lo.trim());
        let lo_mult = match lo_unit {
            Some(u) => unit_ns(u).ok_or_else(|| bad("unknown unit"))?,
            None => hi_mult,
        };
        let lo_ns = to_ns(lo_num, lo_mult).ok_or_else(|| bad("LO is not a duration"))?;
        let hi_ns = to_ns(hi_num, hi_mult).ok_or_else(|| bad("HI is not a duration"))?;
        Self::new(lo_ns, hi_ns, steps)
    }

    /// Lower end, in nanoseconds (values up to it go to the first fine bucket).
    pub fn lo_ns(&self) -> u64 {
        self.lo_ns
    }

    /// Upper end, in nanoseconds (values above it go to the last fine bucket, `+Inf`).
    pub fn hi_ns(&self) -> u64 {
        self.hi_ns
    }

    /// Number of equal steps between `lo` and `hi`.
    pub fn steps(&self) -> u32 {
        self.steps
    }

    /// Upper bound of fine bucket `i` in nanoseconds: `lo` for `i = 0`, `hi` for
    /// `i = steps`, infinity for `i > steps`.
    pub fn upper_ns(&self, i: usize) -> f64 {
        let steps = self.steps as usize;
        if i > steps {
            return f64::INFINITY;
        }
        let width = (self.hi_ns - self.lo_ns) as f64;
        self.lo_ns as f64 + width * i as f64 / steps as f64
    }
}

impl fmt::Display for FineRange {
    /// The form [`FineRange::parse`] reads, e.g. `0-1ms/50`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lo = if self.lo_ns == 0 {
            "0".to_string()
        } else {
            format_ns(self.lo_ns)
        };
        write!(f, "{lo}-{}/{}", format_ns(self.hi_ns), self.steps)
    }
}

/// Splits `2.5ms` into `("2.5", Some("ms"))`.
fn split_unit(s: &str) -> (&str, Option<&str>) {
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let unit = s[end..].trim();
    (&s[..end], (!unit.is_empty()).then_some(unit))
}

fn unit_ns(unit: &str) -> Option<u64> {
    match unit {
        "ns" => Some(1),
        "us" | "µs" => Some(1_000),
        "ms" => Some(1_000_000),
        "s" => Some(1_000_000_000),
        _ => None,
    }
}

/// `num` (digits, maybe a fraction) times `mult` ns, exactly; `None` below a nanosecond.
fn to_ns(num: &str, mult: u64) -> Option<u64> {
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if (int.is_empty() && frac.is_empty()) || !digits(int) || !digits(frac) || frac.len() > 9 {
        return None;
    }
    let whole = if int.is_empty() {
        0
    } else {
        int.parse::<u64>().ok()?
    };
    let scale = 10u64.pow(frac.len() as u32);
    let part = if frac.is_empty() {
        0
    } else {
        frac.parse::<u64>().ok()?
    } * mult;
    if part % scale != 0 {
        return None;
    }
    whole.checked_mul(mult)?.checked_add(part / scale)
}

/// `n` ns in the largest unit that divides it.
fn format_ns(n: u64) -> String {
    for (unit, mult) in [("s", 1_000_000_000), ("ms", 1_000_000), ("us", 1_000)] {
        if n % mult == 0 {
            return format!("{}{unit}", n / mult);
        }
    }
    format!("{n}ns")
}

/// The coarse bucket of `nanos`: the smallest `k` with `nanos ≤ 1000 × 2^k`, or 25 (`+Inf`).
#[inline]
fn coarse_index(nanos: u64) -> usize {
    let us = nanos.div_ceil(1000);
    if us <= 1 {
        return 0;
    }
    // ceil(log2(us)) for us ≥ 2.
    let k = 64 - (us - 1).leading_zeros() as usize;
    k.min(COARSE_BUCKETS - 1)
}

/// Upper bound of coarse bucket `i` in nanoseconds (infinity for the last).
fn coarse_upper_ns(i: usize) -> f64 {
    if i + 1 >= COARSE_BUCKETS {
        f64::INFINITY
    } else {
        (1000u64 << i) as f64
    }
}

/// Sixteen counters on 128 bytes of their own (two lines, for the adjacent-line prefetcher), so no other thread's data shares it.
#[repr(align(128))]
struct Line([AtomicU64; 16]);

/// A lock-free latency histogram with coarse (log) and fine (linear) buckets.
///
/// Meant to be written by one thread (a queue worker) and read by any; [`observe`] is
/// nevertheless correct from several threads at once.
///
/// [`observe`]: LatencyHistogram::observe
#[repr(align(128))]
pub struct LatencyHistogram {
    coarse: [AtomicU64; COARSE_BUCKETS],
    sum_ns: AtomicU64,
    lo_ns: u64,
    hi_ns: u64,
    width_ns: u64,
    steps: u64,
    /// `steps + 2` counters: `≤ lo`, the steps, `> hi`; 16 to a line.
    fine: Box<[Line]>,
    range: FineRange,
}

impl LatencyHistogram {
    /// An empty histogram with the given fine range.
    pub fn new(range: FineRange) -> Self {
        let slots = range.steps as usize + 2;
        LatencyHistogram {
            coarse: Default::default(),
            sum_ns: AtomicU64::new(0),
            lo_ns: range.lo_ns,
            hi_ns: range.hi_ns,
            width_ns: range.hi_ns - range.lo_ns,
            steps: u64::from(range.steps),
            fine: (0..slots.div_ceil(16))
                .map(|_| Line(Default::default()))
                .collect(),
            range,
        }
    }

    /// Records one request that took `nanos` nanoseconds. O(1), no allocation or lock.
    #[inline]
    pub fn observe(&self, nanos: u64) {
        self.observe_n(nanos, 1);
    }

    /// Records `n` observations of the same latency (a batch of requests that started and
    /// completed together) for the cost of one.
    pub fn observe_n(&self, nanos: u64, n: u64) {
        self.coarse[coarse_index(nanos)].fetch_add(n, Relaxed);
        let j = self.fine_index(nanos);
        self.fine[j >> 4].0[j & 15].fetch_add(n, Relaxed);
        self.sum_ns.fetch_add(nanos.saturating_mul(n), Relaxed);
    }

    /// The fine slot of `nanos`: 0 for `≤ lo`, `1 + i` for `(lo + i·w, lo + (i+1)·w]`,
    /// `steps + 1` for `> hi`.
    #[inline]
    fn fine_index(&self, nanos: u64) -> usize {
        if nanos <= self.lo_ns {
            0
        } else if nanos > self.hi_ns {
            self.steps as usize + 1
        } else {
            // d ∈ (i·w/n, (i+1)·w/n]  ⇔  d·n ∈ (i·w, (i+1)·w]  ⇔  (d·n − 1) / w = i.
            // d·n ≤ w·n, which FineRange::new checked fits.
            let d = nanos - self.lo_ns;
            1 + ((d * self.steps - 1) / self.width_ns) as usize
        }
    }

    /// The fine range this histogram was built with.
    pub fn range(&self) -> FineRange {
        self.range
    }

    /// The current counts, as plain numbers.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let slots = self.steps as usize + 2;
        HistogramSnapshot {
            coarse: std::array::from_fn(|i| self.coarse[i].load(Relaxed)),
            fine: (0..slots)
                .map(|j| self.fine[j >> 4].0[j & 15].load(Relaxed))
                .collect(),
            sum_ns: self.sum_ns.load(Relaxed),
            range: self.range,
        }
    }
}

/// A histogram's counts at one moment (per-bucket, not cumulative).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// Coarse buckets; `coarse[k]` counts `(1 µs × 2^(k−1), 1 µs × 2^k]`, the last `+Inf`.
    pub coarse: [u64; COARSE_BUCKETS],
    /// `steps + 2` fine buckets: `≤ lo`, the steps, `> hi`.
    pub fine: Vec<u64>,
    /// Sum of all observations, in nanoseconds (wrapping).
    pub sum_ns: u64,
    /// The fine range the buckets in `fine` belong to.
    pub range: FineRange,
}

impl HistogramSnapshot {
    /// An empty snapshot for the given fine range (the neutral element of [`merge`]).
    ///
    /// [`merge`]: HistogramSnapshot::merge
    pub fn empty(range: FineRange) -> Self {
        HistogramSnapshot {
            coarse: [0; COARSE_BUCKETS],
            fine: vec![0; range.steps as usize + 2],
            sum_ns: 0,
            range,
        }
    }

    /// Number of observations (by the coarse buckets).
    pub fn count(&self) -> u64 {
        self.coarse.iter().sum()
    }

    /// Number of observations by the fine buckets: equal to [`count`] unless the snapshot
    /// was taken while an observation was half recorded.
    ///
    /// [`count`]: HistogramSnapshot::count
    pub fn fine_count(&self) -> u64 {
        self.fine.iter().sum()
    }

    /// Adds `other`'s counts to these.
    ///
    /// # Panics
    ///
    /// If the two have different fine ranges (their fine buckets cannot be added).
    pub fn merge(&mut self, other: &HistogramSnapshot) {
        assert_eq!(self.range, other.range, "merging different fine ranges");
        for (a, b) in self.coarse.iter_mut().zip(&other.coarse) {
            *a += b;
        }
        for (a, b) in self.fine.iter_mut().zip(&other.fine) {
            *a += b;
        }
        self.sum_ns = self.sum_ns.wrapping_add(other.sum_ns);
    }

    /// `(upper bound in ns, count)` of each coarse bucket; the last bound is infinite.
    pub fn coarse_buckets(&self) -> Vec<(f64, u64)> {
        let bounds = (0..COARSE_BUCKETS).map(coarse_upper_ns);
        bounds.zip(self.coarse.iter().copied()).collect()
    }

    /// `(upper bound in ns, count)` of each fine bucket: `lo`, the steps up to `hi`, then an
    /// infinite bound.
    pub fn fine_buckets(&self) -> Vec<(f64, u64)> {
        let bounds = (0..self.fine.len()).map(|i| self.range.upper_ns(i));
        bounds.zip(self.fine.iter().copied()).collect()
    }
}

/// Estimated `q`-quantile (`0 ≤ q ≤ 1`) in microseconds, by linear interpolation within a
/// bucket (as Prometheus' `histogram_quantile` does).
///
/// When the rank falls inside the fine range, the fine buckets give the estimate, unless
/// the coarse bucket holding the rank is the narrower of the two (below 2 × the fine step,
/// e.g. under 32 µs with 20 µs steps). Otherwise the coarse buckets do. 0 for an empty
/// histogram; a rank in the coarse `+Inf` bucket gives its lower bound (~16.8 s).
pub fn percentile(s: &HistogramSnapshot, q: f64) -> f64 {
    let q = if q.is_nan() { 0.0 } else { q.clamp(0.0, 1.0) };
    let coarse = match s.count() {
        0 => None,
        total => Some(interpolate(&s.coarse_buckets(), rank(q, total))),
    };
    let fine_total = s.fine_count();
    let fine = (fine_total > 0)
        .then(|| rank(q, fine_total))
        .filter(|&r| r > s.fine[0] && r <= fine_total - s.fine[s.fine.len() - 1])
        .map(|r| interpolate(&s.fine_buckets(), r));
    let best = match (coarse, fine) {
        (Some(c), Some(f)) if c.1 < f.1 => c,
        (_, Some(f)) => f,
        (Some(c), None) => c,
        (None, None) => return 0.0,
    };
    best.0 / 1000.0
}

/// The 1-based rank of the `q`-quantile among `total` observations.
fn rank(q: f64, total: u64) -> u64 {
    // The small slack keeps 0.99 × 100 from rounding up to 100 on float error.
    ((q * total as f64 - 1e-9).ceil() as u64).clamp(1, total)
}

/// The value of the `rank`-th observation, spreading each bucket evenly over its width,
/// and the width of the bucket it is in (ns). `rank` must be at most the total count.
fn interpolate(buckets: &[(f64, u64)], rank: u64) -> (f64, f64) {
    let mut seen = 0;
    let mut lower = 0.0;
    for &(upper, n) in buckets {
        if n > 0 && seen + n >= rank {
            if upper.is_infinite() {
                return (lower, f64::INFINITY);
            }
            let width = upper - lower;
            return (lower + width * (rank - seen) as f64 / n as f64, width);
        }
        seen += n;
        lower = upper;
    }
    (lower, f64::INFINITY)
}

/// What a request was, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpKind {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
    GetId,
    /// Refused before it became one of the above (bad chain, unknown type, ...).
    Other,
}

impl OpKind {
    /// Every kind, in [`OpKind::index`] order.
    pub const ALL: [OpKind; 7] = [
        OpKind::Read,
        OpKind::Write,
        OpKind::Flush,
        OpKind::Discard,
        OpKind::WriteZeroes,
        OpKind::GetId,
        OpKind::Other,
    ];

    /// The `op` label value.
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Read => "read",
            OpKind::Write => "write",
            OpKind::Flush => "flush",
            OpKind::Discard => "discard",
            OpKind::WriteZeroes => "write_zeroes",
            OpKind::GetId => "get_id",
            OpKind::Other => "other",
        }
    }

    /// Position in [`OpKind::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The [`crate::stats::QueueStats`] counter of requests of this kind, if there is one.
    fn counter(self) -> Option<&'static str> {
        match self {
            OpKind::Read => Some("reads"),
            OpKind::Write => Some("writes"),
            OpKind::Flush => Some("flushes"),
            OpKind::Discard => Some("discards"),
            OpKind::WriteZeroes => Some("write_zeroes"),
            OpKind::GetId => Some("get_ids"),
            OpKind::Other => None,
        }
    }
}

impl From<crate::request::Op> for OpKind {
    fn from(op: crate::request::Op) -> Self {
        use crate::request::Op;
        match op {
            Op::Read { .. } => OpKind::Read,
            Op::Write { .. } => OpKind::Write,
            Op::Flush => OpKind::Flush,
            Op::GetId => OpKind::GetId,
            Op::Discard { .. } => OpKind::Discard,
            Op::WriteZeroes { .. } => OpKind::WriteZeroes,
        }
    }
}

/// The histograms of one queue: one per [`OpKind`]. Written by that queue's worker only.
pub struct QueueMetrics {
    ops: [LatencyHistogram; OpKind::ALL.len()],
}

impl QueueMetrics {
    /// Empty histograms with the given fine range.
    pub fn new(fine: FineRange) -> Self {
        QueueMetrics {
            ops: std::array::from_fn(|_| LatencyHistogram::new(fine)),
        }
    }

    /// Records one `op` request that took `nanos` nanoseconds.
    #[inline]
    pub fn observe(&self, op: OpKind, nanos: u64) {
        self.ops[op.index()].observe(nanos);
    }

    /// `n` requests of kind `op` with the same latency.
    pub fn observe_n(&self, op: OpKind, nanos: u64, n: u64) {
        self.ops[op.index()].observe_n(nanos, n);
    }

    /// The histogram of one kind of request.
    pub fn histogram(&self, op: OpKind) -> &LatencyHistogram {
        &self.ops[op.index()]
    }
}

/// The latency histograms of one disk, per queue.
pub struct DiskMetrics {
    queues: Vec<QueueMetrics>,
    fine: FineRange,
}

impl DiskMetrics {
    /// Histograms for `queues` queues, all with the fine range `fine`.
    pub fn new(queues: u16, fine: FineRange) -> Self {
        DiskMetrics {
            queues: (0..queues).map(|_| QueueMetrics::new(fine)).collect(),
            fine,
        }
    }

    /// Queue `q`'s histograms.
    ///
    /// # Panics
    ///
    /// If `q` is not below the number of queues.
    pub fn queue(&self, q: usize) -> &QueueMetrics {
        &self.queues[q]
    }

    /// Number of queues.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// The fine range of every histogram of this disk.
    pub fn fine(&self) -> FineRange {
        self.fine
    }

    /// One kind of request, summed over all queues.
    pub fn snapshot(&self, op: OpKind) -> HistogramSnapshot {
        let mut total = HistogramSnapshot::empty(self.fine);
        for q in &self.queues {
            total.merge(&q.histogram(op).snapshot());
        }
        total
    }
}

/// One disk as [`encode`] sees it.
pub struct DiskView<'a> {
    /// Labels on every series of this disk, e.g. `[("disk", socket path), ("volume", id)]`.
    pub labels: Vec<(String, String)>,
    /// Counters summed over queues, named as in [`crate::stats::QueueStats::snapshot`].
    pub counters: Vec<(&'static str, u64)>,
    /// The disk's latency histograms.
    pub metrics: &'a DiskMetrics,
}

/// Prometheus (OpenMetrics) text for `disks`, encoded by `prometheus-client`.
///
/// Families, each series labelled with the disk's labels:
///
/// - `ferrodisk_requests_total{op}`: from `reads`, `writes`, `flushes`, `discards`,
///   `write_zeroes` and `get_ids`; `op="other"` is `requests` minus those (requests refused
///   before they had a kind), so the series sum to `requests`.
/// - `ferrodisk_bytes_total{direction}`: from each `<direction>_bytes` counter.
/// - `ferrodisk_errors_total{kind}`: from each `errors_<kind>` counter.
/// - `ferrodisk_<name>_total`: every other counter.
/// - `ferrodisk_request_latency_seconds{op}` (coarse buckets) and
///   `ferrodisk_request_latency_fine_seconds{op}` (fine buckets) histograms.
///
/// Every [`OpKind`] gets its series even before its first request, so dashboards and
/// [`never_updated`] see a stable set of series.
pub fn encode(disks: &[DiskView<'_>]) -> String {
    let scrape = Scrape {
        disks: disks.iter().map(DiskScrape::new).collect(),
    };
    let mut registry = Registry::default();
    registry.register_collector(Box::new(scrape));
    let mut out = String::new();
    // Writing to a String cannot fail, and nothing in the collector returns an error.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

/// A disk's numbers, owned (a collector must be `'static`), labels escaped.
#[derive(Debug)]
struct DiskScrape {
    labels: Vec<(String, String)>,
    counters: Vec<(&'static str, u64)>,
    ops: Vec<HistogramSnapshot>,
}

impl DiskScrape {
    fn new(view: &DiskView<'_>) -> Self {
        DiskScrape {
            labels: view
                .labels
                .iter()
                .map(|(k, v)| (label_name(k), escape_label_value(v)))
                .collect(),
            counters: view.counters.clone(),
            ops: OpKind::ALL
                .iter()
                .map(|&op| view.metrics.snapshot(op))
                .collect(),
        }
    }

    fn counter(&self, name: &str) -> Option<u64> {
        self.counters.iter().find(|(n, _)| *n == name).map(|c| c.1)
    }

    /// Requests of one kind; `Other` is what `requests` counts beyond the named kinds.
    fn requests(&self, op: OpKind) -> u64 {
        match op.counter() {
            Some(name) => self.counter(name).unwrap_or(0),
            None => {
                let named: u64 = OpKind::ALL
                    .iter()
                    .filter_map(|o| self.counter(o.counter()?))
                    .sum();
                self.counter("requests").unwrap_or(0).saturating_sub(named)
            }
        }
    }

    fn labels<'a>(&'a self, extra: Option<(&'static str, &'a str)>) -> Labels<'a> {
        Labels {
            base: &self.labels,
            extra,
        }
    }
}

/// A label name with anything outside `[a-zA-Z0-9_]` replaced by `_`.
fn label_name(k: &str) -> String {
    let mut s: String = k
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if s.is_empty() || s.starts_with(|c: char| c.is_ascii_digit()) {
        s.insert(0, '_');
    }
    s
}

/// Escapes `\`, `"` and newlines (prometheus-client writes label values as given).
fn escape_label_value(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// A disk's labels plus one of the series' own.
struct Labels<'a> {
    base: &'a [(String, String)],
    extra: Option<(&'static str, &'a str)>,
}

impl EncodeLabelSet for Labels<'_> {
    fn encode(&self, mut encoder: LabelSetEncoder) -> fmt::Result {
        for (k, v) in self.base {
            (k.as_str(), v.as_str()).encode(encoder.encode_label())?;
        }
        if let Some(pair) = self.extra {
            pair.encode(encoder.encode_label())?;
        }
        Ok(())
    }
}

/// Everything one scrape shows.
#[derive(Debug)]
struct Scrape {
    disks: Vec<DiskScrape>,
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        self.encode_requests(&mut enc)?;
        self.encode_split(&mut enc, "bytes", "direction", |n| n.strip_suffix("_bytes"))?;
        self.encode_split(&mut enc, "errors", "kind", |n| n.strip_prefix("errors_"))?;
        self.encode_rest(&mut enc)?;
        self.encode_latency(&mut enc, false)?;
        self.encode_latency(&mut enc, true)
    }
}

/// Whether a counter is shown in a family of its own (not requests, bytes or errors).
fn is_plain_counter(name: &str) -> bool {
    let by_op = name == "requests" || OpKind::ALL.iter().any(|o| o.counter() == Some(name));
    !(by_op || name.ends_with("_bytes") || name.starts_with("errors_"))
}

impl Scrape {
    fn encode_requests(&self, enc: &mut DescriptorEncoder) -> fmt::Result {
        let help = "Requests taken from the virtqueues, by operation (other: refused before \
                    they had one).";
        let mut m = enc.encode_descriptor("ferrodisk_requests", help, None, MetricType::Counter)?;
        for d in &self.disks {
            for op in OpKind::ALL {
                let labels = d.labels(Some(("op", op.name())));
                m.encode_family(&labels)?
                    .encode_counter::<NoLabelSet, u64, u64>(&d.requests(op), None)?;
            }
        }
        Ok(())
    }

    /// One family `ferrodisk_<family>` from every counter that `split` maps to a label value.
    fn encode_split(
        &self,
        enc: &mut DescriptorEncoder,
        family: &str,
        label: &'static str,
        split: impl Fn(&str) -> Option<&str>,
    ) -> fmt::Result {
        let name = format!("ferrodisk_{family}");
        let help = match family {
            "bytes" => "Bytes transferred by reads and writes.",
            _ => "Requests that failed, by virtio status.",
        };
        let mut m = enc.encode_descriptor(&name, help, None, MetricType::Counter)?;
        for d in &self.disks {
            for &(counter, v) in &d.counters {
                if let Some(value) = split(counter) {
                    let labels = d.labels(Some((label, value)));
                    m.encode_family(&labels)?
                        .encode_counter::<NoLabelSet, u64, u64>(&v, None)?;
                }
            }
        }
        Ok(())
    }

    /// `ferrodisk_<name>_total` for every other counter, in first-seen order.
    fn encode_rest(&self, enc: &mut DescriptorEncoder) -> fmt::Result {
        let mut names: Vec<&'static str> = Vec::new();
        for d in &self.disks {
            for &(n, _) in &d.counters {
                if is_plain_counter(n) && !names.contains(&n) {
                    names.push(n);
                }
            }
        }
        for counter in names {
            let name = format!("ferrodisk_{counter}");
            let help = format!("The {counter} counter, summed over queues.");
            let mut m = enc.encode_descriptor(&name, &help, None, MetricType::Counter)?;
            for d in &self.disks {
                if let Some(v) = d.counter(counter) {
                    m.encode_family(&d.labels(None))?
                        .encode_counter::<NoLabelSet, u64, u64>(&v, None)?;
                }
            }
        }
        Ok(())
    }

    fn encode_latency(&self, enc: &mut DescriptorEncoder, fine: bool) -> fmt::Result {
        let (name, help) = if fine {
            (
                "ferrodisk_request_latency_fine",
                "Request latency, in fine linear buckets over the configured range.",
            )
        } else {
            (
                "ferrodisk_request_latency",
                "Request latency, in log-scale buckets (1 us x 2^k).",
            )
        };
        let unit = Unit::Seconds;
        let mut m = enc.encode_descriptor(name, help, Some(&unit), MetricType::Histogram)?;
        for d in &self.disks {
            for (op, s) in OpKind::ALL.iter().zip(&d.ops) {
                let (buckets, count) = if fine {
                    (s.fine_buckets(), s.fine_count())
                } else {
                    (s.coarse_buckets(), s.count())
                };
                let buckets: Vec<(f64, u64)> = buckets
                    .into_iter()
                    .map(|(ns, n)| (if ns.is_infinite() { f64::MAX } else { ns / 1e9 }, n))
                    .collect();
                let sum = s.sum_ns as f64 / 1e9;
                m.encode_family(&d.labels(Some(("op", op.name()))))?
                    .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
            }
        }
        Ok(())
    }
}

/// The histograms of a disk for `ferrodisk stats --json`:
/// `{"fine_range": "0-1ms/50", "ops": {"read": {count, sum_ns, p50_us, p99_us, p999_us,
/// buckets: {coarse: [[le_us, n], ...], fine: [...]}}, ...}}`.
///
/// Buckets are per bucket (not cumulative), only those with observations; `le_us` is
/// `null` for `+Inf`.
pub fn to_json(m: &DiskMetrics) -> Value {
    let mut ops = serde_json::Map::new();
    for op in OpKind::ALL {
        let s = m.snapshot(op);
        ops.insert(
            op.name().to_string(),
            json!({
                "count": s.count(),
                "sum_ns": s.sum_ns,
                "p50_us": percentile(&s, 0.5),
                "p99_us": percentile(&s, 0.99),
                "p999_us": percentile(&s, 0.999),
                "buckets": {
                    "coarse": json_buckets(&s.coarse_buckets()),
                    "fine": json_buckets(&s.fine_buckets()),
                },
            }),
        );
    }
    json!({ "fine_range": m.fine().to_string(), "ops": ops })
}

fn json_buckets(buckets: &[(f64, u64)]) -> Value {
    let nonempty = buckets.iter().filter(|(_, n)| *n > 0);
    let pairs = nonempty.map(|&(ns, n)| {
        let le = (!ns.is_infinite()).then_some(ns / 1000.0);
        json!([le, n])
    });
    Value::Array(pairs.collect())
}

/// The series whose value is the same in `after` as in `before`: two Prometheus text
/// encodings taken before and after driving some load. Meant for tests that must fail when
/// a metric is wired to nothing.
///
/// Reads `name{labels} value [...]` lines and ignores comment (`# `) lines, `_created`
/// series and histogram `_bucket` series (a bucket may rightly stay 0; a histogram counts
/// as updated when its `_count` and `_sum` are). A series missing from `before` counts as
/// having been 0; one missing from `after` is listed. Values are compared as numbers when
/// both parse. Returns the series (`name{labels}`) in the order of `after`, then the
/// missing ones.
pub fn never_updated(before: &str, after: &str) -> Vec<String> {
    let old: HashMap<&str, &str> = samples(before).collect();
    let mut seen = std::collections::HashSet::new();
    let mut stale = Vec::new();
    for (series, value) in samples(after) {
        seen.insert(series);
        let same = match old.get(series) {
            Some(v) => same_value(v, value),
            None => same_value("0", value),
        };
        if same {
            stale.push(series.to_string());
        }
    }
    for (series, _) in samples(before) {
        if !seen.contains(series) {
            stale.push(series.to_string());
        }
    }
    stale
}

fn same_value(a: &str, b: &str) -> bool {
    match (a.parse::<f64>(), b.parse::<f64>()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

/// `(series, value)` of every sample line that [`never_updated`] looks at.
fn samples(text: &str) -> impl Iterator<Item = (&str, &str)> {
    text.lines().filter_map(sample).filter(|(series, _)| {
        let name = series.split('{').next().unwrap_or(series);
        !(name.ends_with("_created") || name.ends_with("_bucket"))
    })
}

/// Splits `name{a="x y",b="}"} 3 # exemplar` into `("name{...}", "3")`.
fn sample(line: &str) -> Option<(&str, &str)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let open = line.find(['{', ' ', '\t'])?;
    let end = if line[open..].starts_with('{') {
        let (mut quoted, mut escaped) = (false, false);
        let close = line[open..].char_indices().find(|&(_, c)| {
            match c {
                _ if escaped => escaped = false,
                '\\' if quoted => escaped = true,
                '"' => quoted = !quoted,
                '}' if !quoted => return true,
                _ => {}
            }
            false
        })?;
        open + close.0 + 1
    } else {
        open
    };
    let value = line[end..].split_whitespace().next()?;
    Some((&line[..end], value))
}
