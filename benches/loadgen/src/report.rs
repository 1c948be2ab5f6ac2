//! The markdown report (docs/benchmarks.md), generated whole from the samples.

use std::fmt::Write;

use crate::compare::{Backend, Backing, CompareOpts, Env, IdleCpu, Sample, Workload};
use crate::run::Rw;
use crate::util::shell_quote;

pub fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

struct Data<'a> {
    samples: &'a [Sample],
}

impl Data<'_> {
    /// Median over rounds of a metric.
    fn med(
        &self,
        backing: Backing,
        backend: Backend,
        w: &Workload,
        q: usize,
        path: &[&str],
    ) -> Option<f64> {
        median(
            self.samples
                .iter()
                .filter(|s| {
                    s.backing == backing
                        && s.backend == backend
                        && s.workload == *w
                        && s.queues == q
                })
                .filter_map(|s| s.f(path))
                .collect(),
        )
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn f_iops(v: Option<f64>) -> String {
    match v {
        Some(v) if v >= 100_000.0 => format!("{:.0}k", v / 1e3),
        Some(v) if v >= 1_000.0 => format!("{:.1}k", v / 1e3),
        Some(v) => format!("{v:.0}"),
        None => "–".into(),
    }
}

fn f2(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.2}")).unwrap_or_else(|| "–".into())
}

fn f_lat(v: Option<f64>) -> String {
    match v {
        Some(v) if v >= 100.0 => format!("{v:.0}"),
        Some(v) => format!("{v:.1}"),
        None => "–".into(),
    }
}

fn f_pct(v: Option<f64>) -> String {
    v.map(|v| format!("{:.0} %", v * 100.0))
        .unwrap_or_else(|| "–".into())
}

const IOPS: &[&str] = &["iops"];
const CPU: &[&str] = &["backend_cpu_us_per_io"];
const P50: &[&str] = &["lat_us", "p50"];
const P99: &[&str] = &["lat_us", "p99"];

fn table(out: &mut String, o: &CompareOpts, d: &Data, backing: Backing) {
    let direct = backing == Backing::Direct && o.fio;
    out.push_str(
        "| workload | queues | Ferrodisk IOPS | qsd IOPS | IOPS ratio | Ferrodisk CPU µs/IO | \
         qsd CPU µs/IO | CPU ratio | Ferrodisk p50/p99 µs | qsd p50/p99 µs | p50 ratio |",
    );
    if direct {
        out.push_str(" fio IOPS | fio p50 µs | % of device (fio): Ferrodisk / qsd |");
    }
    out.push('\n');
    out.push_str("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    if direct {
        out.push_str("--:|--:|--:|");
    }
    out.push('\n');
    for &q in &o.queues {
        for w in &o.workloads {
            let (fd, qs) = (Backend::Ferrodisk, Backend::Qsd);
            let fi = d.med(backing, fd, w, q, IOPS);
            let qi = d.med(backing, qs, w, q, IOPS);
            let fc = d.med(backing, fd, w, q, CPU);
            let qc = d.med(backing, qs, w, q, CPU);
            let fp50 = d.med(backing, fd, w, q, P50);
            let qp50 = d.med(backing, qs, w, q, P50);
            let qcol = if q == 1 {
                "1".to_string()
            } else {
                format!("{q} (qd {}/queue)", o.qd_per_queue(w, q))
            };
            let _ = write!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} / {} | {} / {} | {} |",
                w.name(),
                qcol,
                f_iops(fi),
                f_iops(qi),
                f2(ratio(fi, qi)),
                f2(fc),
                f2(qc),
                f2(ratio(fc, qc)),
                f_lat(fp50),
                f_lat(d.med(backing, fd, w, q, P99)),
                f_lat(qp50),
                f_lat(d.med(backing, qs, w, q, P99)),
                f2(ratio(fp50, qp50)),
            );
            if direct {
                let fio = d.med(backing, Backend::Fio, w, q, IOPS);
                let _ = write!(
                    out,
                    " {} | {} | {} / {} |",
                    f_iops(fio),
                    f_lat(d.med(backing, Backend::Fio, w, q, P50)),
                    f_pct(ratio(fi, fio)),
                    f_pct(ratio(qi, fio))
                );
            }
            out.push('\n');
        }
    }
}

enum Verdict {
    Met(String),
    NotMet(String),
    Missing(String),
}

fn targets(o: &CompareOpts, d: &Data) -> Vec<(String, Verdict)> {
    let mut v = Vec::new();
    let q1 = 1;
    let w4 = |rw, qd| Workload { rw, bs: 4096, qd };
    let missing = |what: &str| Verdict::Missing(format!("not evaluated: {what} not in this run"));
    let has = |b: Backing, w: &Workload, q: usize| {
        o.backings.contains(&b) && o.workloads.contains(w) && o.queues.contains(&q)
    };

    for rw in [Rw::RandRead, Rw::RandWrite] {
        let w = w4(rw, 32);
        let name = format!(
            "null {}, 1 queue: IOPS ratio ≥ 1.5 and CPU ratio ≤ 0.5",
            w.name()
        );
        if !has(Backing::Null, &w, q1) {
            v.push((name, missing(&format!("null/{}/1 queue", w.name()))));
            continue;
        }
        let ir = ratio(
            d.med(Backing::Null, Backend::Ferrodisk, &w, q1, IOPS),
            d.med(Backing::Null, Backend::Qsd, &w, q1, IOPS),
        );
        let cr = ratio(
            d.med(Backing::Null, Backend::Ferrodisk, &w, q1, CPU),
            d.med(Backing::Null, Backend::Qsd, &w, q1, CPU),
        );
        let text = format!(
            "IOPS ratio {} (≥ 1.50), CPU ratio {} (≤ 0.50)",
            f2(ir),
            f2(cr)
        );
        let ok = ir.is_some_and(|r| r >= 1.5) && cr.is_some_and(|r| r <= 0.5);
        v.push((
            name,
            if ok {
                Verdict::Met(text)
            } else {
                Verdict::NotMet(text)
            },
        ));
    }

    for rw in [Rw::RandRead, Rw::RandWrite] {
        let w = w4(rw, 32);
        let name = format!("O_DIRECT {}, 1 queue: Ferrodisk ≥ 95 % of fio", w.name());
        if !has(Backing::Direct, &w, q1) || !o.fio {
            v.push((
                name,
                missing(&format!("direct/{}/1 queue with fio", w.name())),
            ));
            continue;
        }
        let fi = d.med(Backing::Direct, Backend::Ferrodisk, &w, q1, IOPS);
        let fio = d.med(Backing::Direct, Backend::Fio, &w, q1, IOPS);
        let r = ratio(fi, fio);
        let text = format!(
            "{} of {} IOPS = {} (≥ 95 %)",
            f_iops(fi),
            f_iops(fio),
            f_pct(r)
        );
        v.push((
            name,
            if r.is_some_and(|r| r >= 0.95) {
                Verdict::Met(text)
            } else {
                Verdict::NotMet(text)
            },
        ));
    }

    {
        let w = w4(Rw::RandRead, 1);
        let name = format!("null {}, 1 queue: p50 ratio ≤ 0.70", w.name());
        if has(Backing::Null, &w, q1) {
            let fp = d.med(Backing::Null, Backend::Ferrodisk, &w, q1, P50);
            let qp = d.med(Backing::Null, Backend::Qsd, &w, q1, P50);
            let r = ratio(fp, qp);
            let text = format!(
                "p50 {} µs vs {} µs = {} (≤ 0.70)",
                f_lat(fp),
                f_lat(qp),
                f2(r)
            );
            v.push((
                name,
                if r.is_some_and(|r| r <= 0.7) {
                    Verdict::Met(text)
                } else {
                    Verdict::NotMet(text)
                },
            ));
        } else {
            v.push((name, missing(&format!("null/{}/1 queue", w.name()))));
        }
    }

    {
        let w = w4(Rw::RandRead, 32);
        let name = format!("Ferrodisk null {}: 2 queues > 1 queue (IOPS)", w.name());
        if has(Backing::Null, &w, 1) && has(Backing::Null, &w, 2) {
            let a = d.med(Backing::Null, Backend::Ferrodisk, &w, 1, IOPS);
            let b = d.med(Backing::Null, Backend::Ferrodisk, &w, 2, IOPS);
            let text = format!(
                "{} (2 queues, qd {}/queue) vs {} (1 queue) = {}×",
                f_iops(b),
                o.qd_per_queue(&w, 2),
                f_iops(a),
                f2(ratio(b, a))
            );
            let ok = matches!((a, b), (Some(a), Some(b)) if b > a);
            v.push((
                name,
                if ok {
                    Verdict::Met(text)
                } else {
                    Verdict::NotMet(text)
                },
            ));
        } else {
            v.push((
                name,
                missing(&format!("null/{} at 1 and 2 queues", w.name())),
            ));
        }
    }
    v
}

pub fn markdown(
    o: &CompareOpts,
    env: &Env,
    samples: &[Sample],
    idle: &[IdleCpu],
    elapsed: f64,
) -> String {
    let d = Data { samples };
    let mut s = String::new();
    let cmd = std::iter::once("benches/compare.sh".to_string())
        .chain(o.argv.iter().map(|a| shell_quote(a)))
        .collect::<Vec<_>>()
        .join(" ");
    let _ = writeln!(
        s,
        "# Benchmarks: Ferrodisk vs qemu-storage-daemon (vhost-user-blk)\n"
    );
    let _ = writeln!(
        s,
        "Generated {} by `ferrodisk-loadgen compare` in {:.0} s. This file is rewritten whole on \
         every run: do not edit it by hand.{}\n",
        env.date,
        elapsed,
        if o.quick {
            " **Quick smoke run: 1 round of 1 s, not a measurement.**"
        } else {
            ""
        }
    );
    let _ = writeln!(s, "## Machine\n");
    let _ = writeln!(s, "- CPUs: {} × {}", env.nproc, env.cpu_model);
    let _ = writeln!(s, "- Kernel: {}", env.kernel);
    let _ = writeln!(s, "- qemu-storage-daemon: {}", env.qsd_version);
    if let Some(f) = &env.fio_version {
        let _ = writeln!(s, "- fio: {f}");
    }
    let _ = writeln!(s, "- Ferrodisk: commit {}", env.commit);
    let _ = writeln!(s, "- Load average at start: {}", env.loadavg);
    let _ = writeln!(
        s,
        "- Backing file and sockets in: {} ({})\n",
        env.tmpdir, env.tmpfs_type
    );

    let _ = writeln!(s, "## Reproduce\n\n```sh\n{cmd}\n```\n");
    let _ = writeln!(
        s,
        "Settings: {} round(s), each run {} s measured after {} s of warm-up; disk size {}; \
         {}. Runs alternate Ferrodisk, qsd{} for each workload and round; every run gets freshly \
         started daemons. Numbers are medians over the rounds. Raw records: `{}`.\n",
        o.rounds,
        o.duration,
        o.ramp,
        crate::util::fmt_size(o.size),
        if o.split_qd {
            "the workload's qd is the total in flight, split evenly over the queues"
        } else {
            "the workload's qd is per queue (with 2 queues, twice as many requests are in flight)"
        },
        if o.backings.contains(&Backing::Direct) && o.fio {
            " (and fio for O_DIRECT)"
        } else {
            ""
        },
        o.results
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default(),
    );
    let _ = writeln!(
        s,
        "Client: `ferrodisk-loadgen run`, a libblkio (virtio-blk-vhost-user) frontend, one thread \
         per queue, each keeping qd requests in flight; latency is submit to completion. \
         Backend CPU is utime + stime of the daemon (all threads) over the measured window, \
         divided by completed I/Os. Ratios are Ferrodisk / qsd: IOPS ratio > 1 is better, CPU \
         and p50 ratios < 1 are better. Client and backend share the machine's {} CPUs.\n",
        env.nproc
    );
    let _ = writeln!(
        s,
        "Backends as started (`$SOCK` and `$DIR` are per-run; `queues`/`num-queues` vary):\n"
    );
    for (name, line) in &env.daemon_cmds {
        let _ = writeln!(s, "- {name}: `{line}`");
    }
    s.push('\n');

    for &b in &o.backings {
        let _ = writeln!(s, "## {}\n", b.title());
        table(&mut s, o, &d, b);
        s.push('\n');
    }

    if !idle.is_empty() {
        let _ = writeln!(
            s,
            "## Idle CPU\n\nBackend CPU over {:.0} s while a connected client (all queues started) \
             does no I/O, in % of one core:\n",
            idle[0].secs
        );
        for &b in &o.backings {
            let get = |be| idle.iter().find(|i| i.backing == b && i.backend == be);
            if let (Some(f), Some(q)) = (get(Backend::Ferrodisk), get(Backend::Qsd)) {
                let _ = writeln!(
                    s,
                    "- {} ({} queue{}): Ferrodisk {:.2} %, qsd {:.2} %",
                    b.name(),
                    f.queues,
                    if f.queues == 1 { "" } else { "s" },
                    f.pct_of_core,
                    q.pct_of_core
                );
            }
        }
        s.push('\n');
    }

    let _ = writeln!(s, "## Targets\n");
    for (name, v) in targets(o, &d) {
        let _ = match v {
            Verdict::Met(t) => writeln!(s, "- **MET**: {name}: {t}"),
            Verdict::NotMet(t) => writeln!(s, "- **NOT MET**: {name}: {t}"),
            Verdict::Missing(t) => writeln!(s, "- {name}: {t}"),
        };
    }
    if let Some(i) = idle
        .iter()
        .find(|i| i.backend == Backend::Ferrodisk && i.pct_of_core > 5.0)
    {
        let _ = writeln!(
            s,
            "- **NOT MET**: an idle disk must not burn a core: Ferrodisk used {:.1} % of a core idle ({})",
            i.pct_of_core,
            i.backing.name()
        );
    } else if idle.iter().any(|i| i.backend == Backend::Ferrodisk) {
        let worst = idle
            .iter()
            .filter(|i| i.backend == Backend::Ferrodisk)
            .map(|i| i.pct_of_core)
            .fold(0.0, f64::max);
        let _ = writeln!(
            s,
            "- **MET**: an idle disk must not burn a core (≤ 5 %): Ferrodisk at most {worst:.2} % of a core"
        );
    }
    s
}
