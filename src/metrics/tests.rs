use super::*;
use crate::stats::QueueStats;

fn range(spec: &str) -> FineRange {
    FineRange::parse(spec).unwrap()
}

/// The coarse and fine bucket that a single observation of `nanos` lands in.
fn buckets_of(fine: FineRange, nanos: u64) -> (usize, usize) {
    let h = LatencyHistogram::new(fine);
    h.observe(nanos);
    let s = h.snapshot();
    let one = |v: &[u64]| {
        assert_eq!(v.iter().sum::<u64>(), 1, "{v:?}");
        v.iter().position(|&n| n == 1).unwrap()
    };
    assert_eq!(s.sum_ns, nanos);
    (one(&s.coarse), one(&s.fine))
}

#[test]
fn coarse_bucket_boundaries_are_exact() {
    let fine = FineRange::default();
    for (nanos, k) in [
        (0, 0),
        (1, 0),
        (999, 0),
        (1000, 0),
        (1001, 1),
        (2000, 1),
        (2001, 2),
        (4000, 2),
        (4001, 3),
        (1_000_000, 10),
        (1_024_000, 10),
        (1_024_001, 11),
        (1000 << 24, 24),
        ((1000 << 24) + 1, 25),
        (u64::MAX, 25),
    ] {
        assert_eq!(buckets_of(fine, nanos).0, k, "{nanos} ns");
    }
    // Around every bound, the index is the first bucket whose upper bound holds the value.
    for k in 0..COARSE_BUCKETS - 1 {
        let b = 1000u64 << k;
        for v in [b - 1, b, b + 1] {
            let want = (0..COARSE_BUCKETS)
                .find(|&i| v as f64 <= coarse_upper_ns(i))
                .unwrap();
            assert_eq!(coarse_index(v), want, "{v} ns");
        }
    }
}

#[test]
fn fine_bucket_boundaries_are_exact() {
    // Default: 0-1ms in 50 steps of 20 µs; slot 0 is ≤ 0, slot 51 is > 1 ms.
    let fine = FineRange::default();
    for (nanos, j) in [
        (0, 0),
        (1, 1),
        (20_000, 1),
        (20_001, 2),
        (40_000, 2),
        (40_001, 3),
        (999_999, 50),
        (1_000_000, 50),
        (1_000_001, 51),
        (u64::MAX, 51),
    ] {
        assert_eq!(buckets_of(fine, nanos).1, j, "{nanos} ns");
    }
    let offset = range("100us-200us/10");
    for (nanos, j) in [
        (0, 0),
        (100_000, 0),
        (100_001, 1),
        (110_000, 1),
        (110_001, 2),
        (200_000, 10),
        (200_001, 11),
    ] {
        assert_eq!(buckets_of(offset, nanos).1, j, "{nanos} ns");
    }
}

#[test]
fn fine_buckets_of_uneven_steps_match_their_bounds() {
    let thirds = range("0-1000ns/3");
    for (nanos, j) in [(333, 1), (334, 2), (666, 2), (667, 3), (1000, 3), (1001, 4)] {
        assert_eq!(buckets_of(thirds, nanos).1, j, "{nanos} ns");
    }
    for spec in ["0-1000ns/3", "7-1000ns/13", "1us-1ms/1000", "0-1ms/50"] {
        let r = range(spec);
        let h = LatencyHistogram::new(r);
        let top = r.hi_ns() + 3;
        let stride = (top / 5000).max(1);
        for v in (0..=top)
            .step_by(stride as usize)
            .chain([r.lo_ns(), r.hi_ns()])
        {
            let want = (0..r.steps() as usize + 2)
                .find(|&i| v as f64 <= r.upper_ns(i))
                .unwrap();
            assert_eq!(h.fine_index(v), want, "{spec}: {v} ns");
        }
    }
}

#[test]
fn fine_range_parses_units_and_defaults() {
    assert_eq!(range("0-1ms/50"), FineRange::default());
    assert_eq!(range("0-1ms"), FineRange::default());
    assert_eq!(range(DEFAULT_FINE), FineRange::default());
    assert_eq!(range(" 0 - 1 ms / 50 "), FineRange::default());
    let cases = [
        ("200us-2.5ms/100", (200_000, 2_500_000, 100)),
        ("1.5-2ms/1", (1_500_000, 2_000_000, 1)),
        ("100-900us/8", (100_000, 900_000, 8)),
        ("10ns-20ns/10", (10, 20, 10)),
        ("0-1µs/4", (0, 1000, 4)),
        ("0-1s/1000", (0, 1_000_000_000, 1000)),
        ("500ns-.5ms/7", (500, 500_000, 7)),
    ];
    for (spec, (lo, hi, steps)) in cases {
        let r = range(spec);
        assert_eq!((r.lo_ns(), r.hi_ns(), r.steps()), (lo, hi, steps), "{spec}");
        assert_eq!(range(&r.to_string()), r, "{spec} shown as {r}");
    }
    assert_eq!(FineRange::default().to_string(), "0-1ms/50");
    assert_eq!(range("1500ns-2ms/3").to_string(), "1500ns-2ms/3");
}

#[test]
fn fine_range_rejects_bad_specs_clearly() {
    for spec in [
        "", "1ms", "0-1/50", "0-1xs/5", "a-1ms", "0-1ms/x", "0-1.5ns", "0-1..5ms", "0-.ms",
    ] {
        let e = FineRange::parse(spec).unwrap_err();
        assert!(matches!(e, MetricsError::Syntax { .. }), "{spec}: {e:?}");
        assert!(e.to_string().contains("LO-HI[/STEPS]"), "{e}");
    }
    let empty = MetricsError::Empty {
        lo_ns: 1_000_000,
        hi_ns: 1_000_000,
    };
    assert_eq!(FineRange::parse("1ms-1ms").unwrap_err(), empty);
    assert_eq!(
        FineRange::parse("2ms-1ms").unwrap_err().to_string(),
        "latency range is empty: 2000000 ns is not below 1000000 ns"
    );
    assert_eq!(
        FineRange::parse("0-1ms/0").unwrap_err(),
        MetricsError::Steps(0)
    );
    assert_eq!(
        FineRange::parse("0-1ms/1001").unwrap_err(),
        MetricsError::Steps(1001)
    );
    assert!(matches!(
        FineRange::parse("0-20000000s/1000").unwrap_err(),
        MetricsError::TooWide { steps: 1000, .. }
    ));
    assert!(FineRange::new(0, u64::MAX, 1).is_ok());
}

/// Observes `values` into a fresh histogram and checks each quantile's estimate against
/// the true value, within the width of the bucket that the estimate came from.
fn check_percentiles(fine: FineRange, values: &mut [u64], max_error_ns: impl Fn(u64) -> f64) {
    let h = LatencyHistogram::new(fine);
    for &v in values.iter() {
        h.observe(v);
    }
    values.sort_unstable();
    let s = h.snapshot();
    for q in [0.5, 0.9, 0.99, 0.999] {
        let truth = values[rank(q, values.len() as u64) as usize - 1];
        let est_ns = percentile(&s, q) * 1000.0;
        let err = (est_ns - truth as f64).abs();
        assert!(
            err <= max_error_ns(truth),
            "q={q}: estimated {est_ns} ns, true {truth} ns"
        );
    }
}

/// Width of the coarse bucket that holds `v`.
fn coarse_width(v: u64) -> f64 {
    let k = coarse_index(v);
    coarse_upper_ns(k) - if k == 0 { 0.0 } else { coarse_upper_ns(k - 1) }
}

/// Width of the narrower bucket holding `v` (default fine range: 20 µs steps in (0, 1 ms]).
fn narrowest(v: u64) -> f64 {
    if (1..=1_000_000).contains(&v) {
        coarse_width(v).min(20_000.0)
    } else {
        coarse_width(v)
    }
}

#[test]
fn percentiles_are_within_a_bucket_width() {
    let fine = FineRange::default();
    // Uniform inside the fine range: within one fine step (20 µs).
    let mut uniform: Vec<u64> = (1..=1_000_000).step_by(7).collect();
    check_percentiles(fine, &mut uniform, |_| 20_000.0);
    // Uniform beyond it: within the width of the coarse bucket.
    let mut slow: Vec<u64> = (2_000_000..20_000_000).step_by(997).collect();
    check_percentiles(fine, &mut slow, coarse_width);
    // A fast mode with a slow tail.
    let mut mixed: Vec<u64> = (0..10_000)
        .map(|i| {
            if i % 100 < 95 {
                40_000 + i % 1000
            } else {
                5_000_000 + i
            }
        })
        .collect();
    check_percentiles(fine, &mut mixed, narrowest);
    // Near zero the coarse buckets are finer than 20 µs steps and are used.
    let mut tiny: Vec<u64> = (0..1000).map(|i| 1001 + i % 999).collect();
    check_percentiles(fine, &mut tiny, |_| 1000.0);
    // Exponential-ish spread over many coarse buckets.
    let mut spread: Vec<u64> = (0..5000u64).map(|i| 500 + i * i * 3).collect();
    check_percentiles(fine, &mut spread, narrowest);
}

#[test]
fn percentile_edge_cases() {
    let h = LatencyHistogram::new(FineRange::default());
    assert_eq!(percentile(&h.snapshot(), 0.5), 0.0);
    h.observe(u64::MAX);
    // Only an +Inf observation: the last finite bound.
    assert_eq!(percentile(&h.snapshot(), 0.99), 16_777_216.0);
    let h = LatencyHistogram::new(FineRange::default());
    h.observe(30_000);
    for q in [0.0, 0.5, 1.0, -1.0, 2.0, f64::NAN] {
        let p = percentile(&h.snapshot(), q);
        assert!((20.0..=40.0).contains(&p), "q={q}: {p}");
    }
}

#[test]
fn observations_from_four_threads_sum_exactly() {
    const PER_THREAD: u64 = 200_000;
    let value = |t: u64, i: u64| (t * 7919 + i * 104_729) % 3_000_000;
    let shared = LatencyHistogram::new(FineRange::default());
    let disk = DiskMetrics::new(4, FineRange::default());
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (shared, disk) = (&shared, &disk);
            s.spawn(move || {
                for i in 0..PER_THREAD {
                    shared.observe(value(t, i));
                    disk.queue(t as usize).observe(OpKind::Write, value(t, i));
                }
            });
        }
    });
    let reference = LatencyHistogram::new(FineRange::default());
    for t in 0..4 {
        for i in 0..PER_THREAD {
            reference.observe(value(t, i));
        }
    }
    let want = reference.snapshot();
    assert_eq!(want.count(), 4 * PER_THREAD);
    assert_eq!(want.fine_count(), 4 * PER_THREAD);
    assert_eq!(shared.snapshot(), want);
    assert_eq!(disk.snapshot(OpKind::Write), want);
    assert_eq!(disk.snapshot(OpKind::Read).count(), 0);
}

#[test]
fn snapshots_merge_and_refuse_other_ranges() {
    let a = LatencyHistogram::new(FineRange::default());
    let b = LatencyHistogram::new(FineRange::default());
    a.observe(5_000);
    b.observe(5_000);
    b.observe(2_000_000);
    let mut m = a.snapshot();
    m.merge(&b.snapshot());
    assert_eq!(m.count(), 3);
    assert_eq!(m.sum_ns, 2_010_000);
    assert_eq!(m.coarse[3], 2);
    assert_eq!(m.fine[1], 2);
    assert_eq!(m.fine[51], 1);
    let other = LatencyHistogram::new(range("0-2ms/50")).snapshot();
    let r = std::panic::catch_unwind(move || m.merge(&other));
    assert!(r.is_err());
}

#[test]
fn op_kinds_are_indexed_and_named() {
    for (i, op) in OpKind::ALL.iter().enumerate() {
        assert_eq!(op.index(), i);
    }
    let names: std::collections::HashSet<_> = OpKind::ALL.iter().map(|o| o.name()).collect();
    assert_eq!(names.len(), OpKind::ALL.len());
    use crate::request::Op;
    assert_eq!(OpKind::from(Op::Read { offset: 0 }), OpKind::Read);
    assert_eq!(OpKind::from(Op::GetId), OpKind::GetId);
    let wz = Op::WriteZeroes {
        offset: 0,
        len: 512,
        unmap: true,
    };
    assert_eq!(OpKind::from(wz), OpKind::WriteZeroes);
}

// ---- encoding ----

/// The counter names of `QueueStats`, each with the value `f(index)`.
fn counters(f: impl Fn(usize, &str) -> u64) -> Vec<(&'static str, u64)> {
    let names = QueueStats::default().snapshot();
    names
        .iter()
        .enumerate()
        .map(|(i, &(n, _))| (n, f(i, n)))
        .collect()
}

fn view<'a>(disk: &str, m: &'a DiskMetrics, c: Vec<(&'static str, u64)>) -> DiskView<'a> {
    DiskView {
        labels: vec![
            ("disk".into(), disk.into()),
            ("volume".into(), "vol-1".into()),
        ],
        counters: c,
        metrics: m,
    }
}

/// Value of the sample whose series is exactly `series`.
fn value_of(text: &str, series: &str) -> f64 {
    let found = text.lines().filter_map(sample).find(|(s, _)| *s == series);
    let (_, v) = found.unwrap_or_else(|| panic!("no {series} in\n{text}"));
    v.parse().unwrap()
}

/// `(le, cumulative count)` of every bucket line of `family` with labels ending in `tail`.
fn buckets_in(text: &str, family: &str, tail: &str) -> Vec<(String, u64)> {
    let prefix = format!("{family}_bucket{{le=\"");
    let mut out = Vec::new();
    for (series, v) in text.lines().filter_map(sample) {
        if let Some(rest) = series.strip_prefix(&prefix) {
            if let Some((le, labels)) = rest.split_once('"') {
                if labels.trim_end_matches('}').ends_with(tail) {
                    out.push((le.to_string(), v.parse().unwrap()));
                }
            }
        }
    }
    out
}

#[test]
fn histograms_encode_cumulative_monotone_buckets() {
    let m = DiskMetrics::new(2, FineRange::default());
    let reads = [
        0,
        1000,
        1001,
        15_000,
        20_000,
        999_999,
        1_000_001,
        40_000_000_000,
    ];
    for (i, &v) in reads.iter().enumerate() {
        m.queue(i % 2).observe(OpKind::Read, v);
    }
    m.queue(1).observe(OpKind::Flush, 250_000);
    let text = encode(&[view("/run/d0.sock", &m, counters(|_, _| 0))]);
    assert!(text.ends_with("# EOF\n"), "{text}");
    for family in [
        "ferrodisk_request_latency_seconds",
        "ferrodisk_request_latency_fine_seconds",
    ] {
        assert_eq!(
            text.matches(&format!("# TYPE {family} histogram\n"))
                .count(),
            1
        );
        for op in OpKind::ALL {
            let labels = format!(
                "{{disk=\"/run/d0.sock\",volume=\"vol-1\",op=\"{}\"}}",
                op.name()
            );
            let n = m.snapshot(op).count();
            let count = value_of(&text, &format!("{family}_count{labels}"));
            assert_eq!(count, n as f64, "{family} {op:?}");
            let sum = value_of(&text, &format!("{family}_sum{labels}"));
            assert_eq!(sum, m.snapshot(op).sum_ns as f64 / 1e9);
            let tail = format!("op=\"{}\"", op.name());
            let buckets = buckets_in(&text, family, &tail);
            let len = if family.contains("fine") { 52 } else { 26 };
            assert_eq!(buckets.len(), len, "{family} {op:?}");
            assert_eq!(buckets.last().unwrap(), &("+Inf".to_string(), n));
            for w in buckets.windows(2) {
                assert!(w[0].1 <= w[1].1, "{family}: {w:?}");
                if w[1].0 != "+Inf" {
                    let (a, b): (f64, f64) = (w[0].0.parse().unwrap(), w[1].0.parse().unwrap());
                    assert!(a < b, "{family}: {w:?}");
                }
            }
        }
    }
    let read = "{disk=\"/run/d0.sock\",volume=\"vol-1\",op=\"read\"}";
    let coarse = buckets_in(&text, "ferrodisk_request_latency_seconds", "op=\"read\"");
    // ≤ 1 µs: 0 and 1000; ≤ 2 µs: + 1001; ≤ 16 µs: + 15 µs.
    assert_eq!(coarse[0], ("0.000001".to_string(), 2));
    assert_eq!(coarse[1], ("0.000002".to_string(), 3));
    assert_eq!(coarse[4], ("0.000016".to_string(), 4));
    assert_eq!(coarse[24].1, 7);
    let fine = buckets_in(
        &text,
        "ferrodisk_request_latency_fine_seconds",
        "op=\"read\"",
    );
    assert_eq!(fine[0], ("0.0".to_string(), 1));
    assert_eq!(fine[1], ("0.00002".to_string(), 5));
    assert_eq!(fine[50], ("0.001".to_string(), 6));
    assert_eq!(
        value_of(
            &text,
            &format!("ferrodisk_request_latency_seconds_count{read}")
        ),
        8.0
    );
}

#[test]
fn counters_encode_by_op_direction_and_kind() {
    let m = DiskMetrics::new(1, FineRange::default());
    let c = counters(|i, n| match n {
        "requests" => 1000,
        _ => 10 + i as u64,
    });
    let by_name = |n: &str| c.iter().find(|x| x.0 == n).unwrap().1 as f64;
    let text = encode(&[view("d", &m, c.clone())]);
    let l = |extra: &str| format!("{{disk=\"d\",volume=\"vol-1\"{extra}}}");
    for op in OpKind::ALL.iter().filter(|o| **o != OpKind::Other) {
        let series = format!(
            "ferrodisk_requests_total{}",
            l(&format!(",op=\"{}\"", op.name()))
        );
        assert_eq!(value_of(&text, &series), by_name(op.counter().unwrap()));
    }
    let named: f64 = OpKind::ALL
        .iter()
        .filter_map(|o| o.counter())
        .map(by_name)
        .sum();
    let other = format!("ferrodisk_requests_total{}", l(",op=\"other\""));
    assert_eq!(value_of(&text, &other), 1000.0 - named);
    let read = format!("ferrodisk_bytes_total{}", l(",direction=\"read\""));
    assert_eq!(value_of(&text, &read), by_name("read_bytes"));
    let unsupp = format!("ferrodisk_errors_total{}", l(",kind=\"unsupp\""));
    assert_eq!(value_of(&text, &unsupp), by_name("errors_unsupp"));
    let retries = format!("ferrodisk_retries_total{}", l(""));
    assert_eq!(value_of(&text, &retries), by_name("retries"));
    assert!(text.contains("# TYPE ferrodisk_requests counter\n"));
    assert!(!text.contains("ferrodisk_reads_total"), "{text}");
    assert!(!text.contains("ferrodisk_read_bytes"), "{text}");
}

#[test]
fn two_disks_share_each_family() {
    let (a, b) = (
        DiskMetrics::new(1, FineRange::default()),
        DiskMetrics::new(3, range("0-10ms/20")),
    );
    a.queue(0).observe(OpKind::Read, 10_000);
    b.queue(2).observe(OpKind::Read, 7_000_000);
    let text = encode(&[
        view("a", &a, counters(|_, _| 1)),
        view("b", &b, counters(|_, _| 2)),
    ]);
    let types = text.lines().filter(|l| l.starts_with("# TYPE ")).count();
    let families: std::collections::HashSet<_> =
        text.lines().filter(|l| l.starts_with("# TYPE ")).collect();
    assert_eq!(
        types,
        families.len(),
        "a family is described twice:\n{text}"
    );
    let l = |d: &str| format!("{{disk=\"{d}\",volume=\"vol-1\",op=\"read\"}}");
    let fine = "ferrodisk_request_latency_fine_seconds";
    assert_eq!(value_of(&text, &format!("{fine}_count{}", l("a"))), 1.0);
    assert_eq!(value_of(&text, &format!("{fine}_count{}", l("b"))), 1.0);
    // Each disk has its own fine bounds.
    assert_eq!(
        buckets_in(&text, fine, "disk=\"b\",volume=\"vol-1\",op=\"read\"").len(),
        22
    );
}

#[test]
fn labels_are_escaped_and_sanitized() {
    let m = DiskMetrics::new(1, FineRange::default());
    let v = DiskView {
        labels: vec![("disk-path".into(), "/run/a \"b\"\\c\nd}.sock".into())],
        counters: vec![("requests", 3)],
        metrics: &m,
    };
    let text = encode(&[v]);
    let series =
        "ferrodisk_requests_total{disk_path=\"/run/a \\\"b\\\"\\\\c\\nd}.sock\",op=\"other\"}";
    assert_eq!(value_of(&text, series), 3.0);
    assert!(text
        .lines()
        .all(|l| l.starts_with('#') || sample(l).is_some()));
}

#[test]
fn json_has_percentiles_and_buckets_per_op() {
    let m = DiskMetrics::new(2, FineRange::default());
    for i in 0..100 {
        m.queue(i % 2)
            .observe(OpKind::Read, 50_000 + i as u64 * 100);
    }
    m.queue(0).observe(OpKind::Write, 3_000_000);
    let j = to_json(&m);
    assert_eq!(j["fine_range"], "0-1ms/50");
    let read = &j["ops"]["read"];
    assert_eq!(read["count"], 100);
    assert_eq!(read["sum_ns"], 100 * 50_000 + 100 * 99 * 50);
    let p50 = read["p50_us"].as_f64().unwrap();
    assert!((40.0..=60.0).contains(&p50), "{p50}");
    assert!(read["p999_us"].as_f64().unwrap() >= read["p99_us"].as_f64().unwrap());
    assert_eq!(read["buckets"]["fine"], json!([[60.0, 100]]));
    assert_eq!(read["buckets"]["coarse"], json!([[64.0, 100]]));
    let write = &j["ops"]["write"];
    assert_eq!(write["buckets"]["fine"], json!([[null, 1]]));
    assert_eq!(write["buckets"]["coarse"], json!([[4096.0, 1]]));
    assert_eq!(j["ops"]["flush"]["count"], 0);
    assert_eq!(j["ops"].as_object().unwrap().len(), OpKind::ALL.len());
}

// ---- never_updated: the "a test fails if a metric is never updated" ----

/// Encodes one disk whose counters are all `value` (requests: 100 × `value`).
fn encode_with(m: &DiskMetrics, value: impl Fn(&str) -> u64) -> String {
    let c = counters(|_, n| match n {
        "requests" => 100 * value(n),
        _ => value(n),
    });
    encode(&[view("/run/vm1.sock", m, c)])
}

#[test]
fn every_metric_moves_when_every_kind_is_driven() {
    let m = DiskMetrics::new(2, FineRange::default());
    let before = encode_with(&m, |_| 0);
    for (i, op) in OpKind::ALL.iter().enumerate() {
        m.queue(i % 2).observe(*op, 10_000 * (i as u64 + 1));
    }
    let after = encode_with(&m, |_| 1);
    let stale = never_updated(&before, &after);
    assert!(stale.is_empty(), "never updated: {stale:#?}");
    // It did compare something: every counter and histogram series.
    let compared = samples(&after).count();
    // One counter series per QueueStats counter (`requests` becomes op="other"), and
    // `_sum` and `_count` of two histograms per op.
    let counter_series = QueueStats::default().snapshot().len();
    assert_eq!(
        compared,
        counter_series + 2 * 2 * OpKind::ALL.len(),
        "{after}"
    );
}

#[test]
fn never_updated_lists_what_stayed_put() {
    let m = DiskMetrics::new(1, FineRange::default());
    let before = encode_with(&m, |_| 0);
    for op in OpKind::ALL.iter().filter(|o| **o != OpKind::Flush) {
        m.queue(0).observe(*op, 1234);
    }
    let after = encode_with(&m, |n| u64::from(!matches!(n, "flushes" | "retries")));
    let labels = "{disk=\"/run/vm1.sock\",volume=\"vol-1\"";
    let flush = format!("{labels},op=\"flush\"}}");
    assert_eq!(
        never_updated(&before, &after),
        vec![
            format!("ferrodisk_requests_total{flush}"),
            format!("ferrodisk_retries_total{labels}}}"),
            format!("ferrodisk_request_latency_seconds_sum{flush}"),
            format!("ferrodisk_request_latency_seconds_count{flush}"),
            format!("ferrodisk_request_latency_fine_seconds_sum{flush}"),
            format!("ferrodisk_request_latency_fine_seconds_count{flush}"),
        ]
    );
}

#[test]
fn never_updated_reads_the_text_format_robustly() {
    let before = "# HELP a_total x\n\
                  # TYPE a counter\n\
                  a_total{p=\"x y\",q=\"}\\\" z\"} 1 # {trace=\"1\"} 1.0 17\n\
                  a_created{p=\"x y\"} 1700000000\n\
                  b_total 5\n\
                  h_bucket{le=\"0.1\"} 0\n\
                  h_count 2\n\
                  gone_total 1\n\
                  # EOF\n";
    let after = "a_total{p=\"x y\",q=\"}\\\" z\"} 2.0 # {trace=\"2\"} 1.0 18\n\
                 a_created{p=\"x y\"} 1700000000\n\
                 b_total   5.0\n\
                 h_bucket{le=\"0.1\"} 0\n\
                 h_count 3\n\
                 new_total{a=\"1\"} 4\n\
                 new_zero_total 0\n\
                 # EOF\n";
    assert_eq!(
        never_updated(before, after),
        vec!["b_total", "new_zero_total", "gone_total"]
    );
    assert_eq!(sample("a{x=\"}\"}\t7 123"), Some(("a{x=\"}\"}", "7")));
    assert_eq!(sample("  "), None);
    assert_eq!(sample("a{x=\"unterminated} 1"), None);
    assert!(never_updated("", "").is_empty());
}

#[test]
fn observe_n_equals_n_observations() {
    let a = LatencyHistogram::new(FineRange::default());
    let b = LatencyHistogram::new(FineRange::default());
    for ns in [
        0u64,
        999,
        1_000,
        1_001,
        35_000,
        999_999,
        1_000_001,
        7_000_000_000,
    ] {
        a.observe_n(ns, 5);
        for _ in 0..5 {
            b.observe(ns);
        }
    }
    assert_eq!(a.snapshot(), b.snapshot());
}
