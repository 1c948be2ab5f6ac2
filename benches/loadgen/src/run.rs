//! `ferrodisk-loadgen run`: drives one vhost-user-blk socket through libblkio and prints one
//! JSON record.

use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, ReqFlags};

use crate::hist::Hist;
use crate::util::{self, Args, Rng};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[allow(clippy::enum_variant_names)]
pub enum Rw {
    RandRead,
    RandWrite,
    Read,
    Write,
    RandRw,
}

impl Rw {
    pub fn parse(s: &str) -> Result<Rw, String> {
        Ok(match s {
            "randread" => Rw::RandRead,
            "randwrite" => Rw::RandWrite,
            "read" => Rw::Read,
            "write" => Rw::Write,
            "randrw" => Rw::RandRw,
            _ => {
                return Err(format!(
                    "--rw {s:?}: expected randread|randwrite|read|write|randrw"
                ))
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Rw::RandRead => "randread",
            Rw::RandWrite => "randwrite",
            Rw::Read => "read",
            Rw::Write => "write",
            Rw::RandRw => "randrw",
        }
    }

    pub fn random(self) -> bool {
        matches!(self, Rw::RandRead | Rw::RandWrite | Rw::RandRw)
    }
}

#[derive(Clone, Debug)]
pub struct RunOpts {
    pub socket: String,
    pub rw: Rw,
    pub bs: u64,
    pub qd: usize,
    pub queues: usize,
    pub duration: f64,
    pub span: Option<u64>,
    pub ramp: f64,
    pub pid: Option<i32>,
    pub label: String,
    /// Seconds without any completion before giving up.
    pub timeout: f64,
}

pub const RUN_USAGE: &str = "\
ferrodisk-loadgen run --socket PATH [options]
  --socket PATH      vhost-user-blk socket (required)
  --rw MODE          randread|randwrite|read|write|randrw (50/50)   [randread]
  --bs SIZE          request size, multiple of 512 (4k, 64k, ...)   [4k]
  --qd N             requests in flight per queue                   [1]
  --queues N         virtqueues, one thread each                    [1]
  --duration SECS    measured time, float ok                        [5]
  --ramp SECS        warm-up before measuring (not counted)         [1]
  --span SIZE        bytes of the disk used from offset 0           [whole capacity]
  --pid PID          backend process, for backend CPU per I/O       [none: null]
  --label STR        copied into the record                         [\"\"]
  --timeout SECS     abort if no request completes for this long    [10]
Prints one JSON object on stdout. Exit status: 0 ok, 1 if any I/O failed (the record is
still printed), 2 on usage errors, 3 if the run could not complete (cannot connect, backend
gone, no completion within --timeout).";

pub fn parse_opts(mut a: Args) -> Result<RunOpts, String> {
    let mut o = RunOpts {
        socket: String::new(),
        rw: Rw::RandRead,
        bs: 4096,
        qd: 1,
        queues: 1,
        duration: 5.0,
        span: None,
        ramp: 1.0,
        pid: None,
        label: String::new(),
        timeout: 10.0,
    };
    while let Some((k, inline)) = a.next_opt()? {
        if k == "help" {
            return Err(RUN_USAGE.to_string());
        }
        let v = a.value(&k, inline)?;
        match k.as_str() {
            "socket" => o.socket = v,
            "rw" => o.rw = Rw::parse(&v)?,
            "bs" => o.bs = util::parse_size(&v)?,
            "qd" => o.qd = util::parse_num(&k, &v)?,
            "queues" => o.queues = util::parse_num(&k, &v)?,
            "duration" => o.duration = util::parse_num(&k, &v)?,
            "span" => o.span = Some(util::parse_size(&v)?),
            "ramp" => o.ramp = util::parse_num(&k, &v)?,
            "pid" => o.pid = Some(util::parse_num(&k, &v)?),
            "label" => o.label = v,
            "timeout" => o.timeout = util::parse_num(&k, &v)?,
            _ => return Err(format!("unknown option --{k}\n\n{RUN_USAGE}")),
        }
    }
    if o.socket.is_empty() {
        return Err(format!("--socket is required\n\n{RUN_USAGE}"));
    }
    if o.bs == 0 || o.bs % 512 != 0 {
        return Err(format!("--bs {} must be a non-zero multiple of 512", o.bs));
    }
    if o.qd == 0 || o.qd > 1024 {
        return Err("--qd must be in 1..=1024".into());
    }
    if o.queues == 0 || o.queues > 64 {
        return Err("--queues must be in 1..=64".into());
    }
    if !(o.duration > 0.0 && o.duration.is_finite()) {
        return Err("--duration must be > 0".into());
    }
    if !(o.ramp >= 0.0 && o.ramp.is_finite()) {
        return Err("--ramp must be >= 0".into());
    }
    if !(o.timeout > 0.0 && o.timeout.is_finite()) {
        return Err("--timeout must be > 0".into());
    }
    Ok(o)
}

/// The result of one run (also what the JSON record holds).
#[derive(Clone, Debug)]
pub struct Record {
    pub opts: RunOpts,
    pub ios: u64,
    pub iops: f64,
    pub mib_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p99_9_us: f64,
    pub mean_us: f64,
    pub backend_cpu_us_per_io: Option<f64>,
    pub client_cpu_us_per_io: Option<f64>,
    pub errors: u64,
}

fn jf(v: f64) -> String {
    if v.is_finite() {
        format!("{:.3}", v)
    } else {
        "null".into()
    }
}

fn jopt(v: Option<f64>) -> String {
    v.map(jf).unwrap_or_else(|| "null".into())
}

impl Record {
    /// One line of JSON, fields in the documented order.
    pub fn to_json(&self) -> String {
        let o = &self.opts;
        format!(
            concat!(
                "{{\"label\":{},\"socket\":{},\"rw\":\"{}\",\"bs\":{},\"qd\":{},\"queues\":{},",
                "\"duration_s\":{},\"ios\":{},\"iops\":{},\"mib_s\":{},",
                "\"lat_us\":{{\"p50\":{},\"p99\":{},\"p99_9\":{},\"mean\":{}}},",
                "\"backend_cpu_us_per_io\":{},\"client_cpu_us_per_io\":{},\"errors\":{}}}"
            ),
            serde_json::to_string(&o.label).unwrap(),
            serde_json::to_string(&o.socket).unwrap(),
            o.rw.name(),
            o.bs,
            o.qd,
            o.queues,
            jf(o.duration),
            self.ios,
            jf(self.iops),
            jf(self.mib_s),
            jf(self.p50_us),
            jf(self.p99_us),
            jf(self.p99_9_us),
            jf(self.mean_us),
            jopt(self.backend_cpu_us_per_io),
            jopt(self.client_cpu_us_per_io),
            self.errors
        )
    }
}

/// Connects with retries (the socket may exist a moment before the daemon listens).
pub fn connect(
    socket: &str,
    queues: usize,
    deadline: Duration,
) -> Result<(Blkio, Vec<Blkioq>), String> {
    let until = Instant::now() + deadline;
    let mut b = loop {
        let mut b = Blkio::new("virtio-blk-vhost-user").map_err(|e| format!("libblkio: {e}"))?;
        b.set_str("path", socket)
            .map_err(|e| format!("set path: {e}"))?;
        match b.connect() {
            Ok(()) => break b,
            Err(e) => {
                if Instant::now() >= until {
                    return Err(format!("cannot connect to {socket}: {e}"));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    let max = b.get_i32("max-queues").unwrap_or(queues as i32);
    if queues as i32 > max {
        return Err(format!(
            "--queues {queues}: the device at {socket} offers only {max} queue(s)"
        ));
    }
    b.set_i32("num-queues", queues as i32)
        .map_err(|e| format!("set num-queues={queues}: {e}"))?;
    let out = b.start().map_err(|e| format!("start: {e}"))?;
    if out.queues.len() != queues {
        return Err(format!(
            "asked for {queues} queues, got {}",
            out.queues.len()
        ));
    }
    Ok((b, out.queues))
}

struct Worker {
    q: Blkioq,
    rw: Rw,
    bs: u64,
    qd: usize,
    /// Address of this worker's first buffer slot; slot i is at base + i * stride.
    base: usize,
    stride: usize,
    /// Offsets used: [start, start + len) (len a multiple of bs).
    start: u64,
    len: u64,
    seed: u64,
    t_begin: Instant,
    t_measure: Instant,
    t_end: Instant,
    abort: Arc<AtomicBool>,
    pid: Option<i32>,
    timeout: Duration,
}

struct WorkerOut {
    hist: Hist,
    ios: u64,
    errors: u64,
    first_error: Option<String>,
}

impl Worker {
    fn run(mut self) -> Result<WorkerOut, String> {
        let mut rng = Rng::new(self.seed);
        let blocks = self.len / self.bs;
        let mut seq_next = 0u64;
        let mut hist = Hist::new();
        let mut ios = 0u64;
        let mut errors = 0u64;
        let mut first_error = None;
        let mut submit_t = vec![self.t_begin; self.qd];
        let mut comps: Vec<MaybeUninit<Completion>> =
            (0..self.qd).map(|_| MaybeUninit::uninit()).collect();

        let now = Instant::now();
        if self.t_begin > now {
            std::thread::sleep(self.t_begin - now);
        }

        let mut submit =
            |q: &mut Blkioq, slot: usize, rng: &mut Rng, now: Instant, st: &mut [Instant]| {
                let off = if self.rw.random() {
                    self.start + rng.below(blocks) * self.bs
                } else {
                    let o = self.start + seq_next * self.bs;
                    seq_next += 1;
                    if seq_next >= blocks {
                        seq_next = 0;
                    }
                    o
                };
                let write = match self.rw {
                    Rw::RandRead | Rw::Read => false,
                    Rw::RandWrite | Rw::Write => true,
                    Rw::RandRw => rng.next() >> 63 == 1,
                };
                let buf = (self.base + slot * self.stride) as *mut u8;
                st[slot] = now;
                if write {
                    q.write(off, buf, self.bs as usize, slot, ReqFlags::empty());
                } else {
                    q.read(off, buf, self.bs as usize, slot, ReqFlags::empty());
                }
            };

        let now = Instant::now();
        for slot in 0..self.qd {
            submit(&mut self.q, slot, &mut rng, now, &mut submit_t);
        }
        let mut inflight = self.qd;
        let mut waited = Duration::ZERO;
        while inflight > 0 {
            if self.abort.load(Ordering::Relaxed) {
                return Err("aborted".into());
            }
            let slice = Duration::from_millis(500);
            let mut t = slice;
            match self.q.do_io(&mut comps, 1, Some(&mut t), None) {
                Ok(n) => {
                    waited = Duration::ZERO;
                    let now = Instant::now();
                    let measuring = now >= self.t_measure && now < self.t_end;
                    let more = now < self.t_end;
                    for c in &comps[..n] {
                        // SAFETY: do_io initialized the first `n` completions.
                        let c = unsafe { c.assume_init_read() };
                        let slot = c.user_data;
                        inflight -= 1;
                        if c.ret != 0 {
                            errors += 1;
                            if first_error.is_none() {
                                let msg = if c.error_msg.is_null() {
                                    String::new()
                                } else {
                                    // SAFETY: libblkio's error_msg is a static NUL-terminated
                                    // string when not null.
                                    unsafe { std::ffi::CStr::from_ptr(c.error_msg) }
                                        .to_string_lossy()
                                        .into_owned()
                                };
                                let e = std::io::Error::from_raw_os_error(-c.ret);
                                first_error = Some(if msg.is_empty() {
                                    e.to_string()
                                } else {
                                    format!("{e} ({msg})")
                                });
                            }
                        } else if measuring {
                            hist.record((now - submit_t[slot]).as_nanos() as u64);
                            ios += 1;
                        }
                        if more {
                            submit(&mut self.q, slot, &mut rng, now, &mut submit_t);
                            inflight += 1;
                        }
                    }
                }
                Err(e) if e.errno() == blkio::Errno::TIME => {
                    waited += slice;
                    if let Some(pid) = self.pid {
                        if !util::pid_alive(pid) {
                            self.abort.store(true, Ordering::Relaxed);
                            return Err(format!(
                                "the backend (pid {pid}) exited with {inflight} request(s) in flight"
                            ));
                        }
                    }
                    if waited.as_secs_f64() >= self.timeout.as_secs_f64() {
                        self.abort.store(true, Ordering::Relaxed);
                        return Err(format!(
                            "no completion for {:.1} s with {inflight} request(s) in flight: \
                             is the backend still alive?",
                            waited.as_secs_f64()
                        ));
                    }
                }
                Err(e) => {
                    self.abort.store(true, Ordering::Relaxed);
                    return Err(format!("do_io failed: {e} (errno {})", e.errno()));
                }
            }
        }
        Ok(WorkerOut {
            hist,
            ios,
            errors,
            first_error,
        })
    }
}

fn round_up(v: usize, a: usize) -> usize {
    v.div_ceil(a) * a
}

pub fn run(o: &RunOpts) -> Result<Record, String> {
    let (mut b, queues) = connect(&o.socket, o.queues, Duration::from_secs(5))?;
    let capacity = b
        .get_u64("capacity")
        .map_err(|e| format!("capacity: {e}"))?;
    let span = o.span.unwrap_or(capacity);
    if span > capacity {
        return Err(format!(
            "--span {span} is larger than the disk ({capacity} bytes)"
        ));
    }
    let span = span / o.bs * o.bs;
    if span < o.bs * o.queues as u64 {
        return Err(format!(
            "span {span} bytes is too small for bs {} and {} queue(s)",
            o.bs, o.queues
        ));
    }

    let stride = round_up(o.bs as usize, 4096);
    let align = (b.get_u64("mem-region-alignment").unwrap_or(4096) as usize).max(4096);
    let region_len = round_up(stride * o.qd * o.queues, align.max(2 << 20));
    let region = b
        .alloc_mem_region(region_len)
        .map_err(|e| format!("alloc_mem_region({region_len}): {e}"))?;
    b.map_mem_region(&region)
        .map_err(|e| format!("map_mem_region: {e}"))?;
    // A non-zero pattern, so written data is not all zeroes.
    {
        // SAFETY: the region is `region.len` bytes mapped read-write for the life of `b`; no
        // request is in flight yet.
        let buf = unsafe { std::slice::from_raw_parts_mut(region.addr as *mut u8, region.len) };
        let mut r = Rng::new(0xfe44);
        for chunk in buf.chunks_mut(8) {
            let v = r.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    let abort = Arc::new(AtomicBool::new(false));
    let t_begin = Instant::now() + Duration::from_millis(20);
    let t_measure = t_begin + Duration::from_secs_f64(o.ramp);
    let t_end = t_measure + Duration::from_secs_f64(o.duration);
    let stripe = span / o.queues as u64 / o.bs * o.bs;

    let mut handles = Vec::new();
    for (i, q) in queues.into_iter().enumerate() {
        let (start, len) = if o.rw.random() {
            (0, span)
        } else {
            (i as u64 * stripe, stripe)
        };
        let w = Worker {
            q,
            rw: o.rw,
            bs: o.bs,
            qd: o.qd,
            base: region.addr + i * o.qd * stride,
            stride,
            start,
            len,
            seed: 0x5eed_0000 + i as u64,
            t_begin,
            t_measure,
            t_end,
            abort: abort.clone(),
            pid: o.pid,
            timeout: Duration::from_secs_f64(o.timeout),
        };
        let h = std::thread::Builder::new()
            .name(format!("lg-q{i}"))
            .spawn(move || w.run())
            .map_err(|e| format!("spawn: {e}"))?;
        handles.push(h);
    }

    // CPU accounting over the measured window, taken by this (otherwise idle) thread.
    let sleep_until = |t: Instant| {
        while !abort.load(Ordering::Relaxed) {
            let now = Instant::now();
            if now >= t {
                break;
            }
            std::thread::sleep((t - now).min(Duration::from_millis(50)));
        }
    };
    sleep_until(t_measure);
    let be0 = o.pid.and_then(|p| util::proc_cpu_secs(Some(p)));
    let cl0 = util::proc_cpu_secs(None);
    sleep_until(t_end);
    let be1 = o.pid.and_then(|p| util::proc_cpu_secs(Some(p)));
    let cl1 = util::proc_cpu_secs(None);

    let mut hist = Hist::new();
    let mut ios = 0;
    let mut errors = 0;
    let mut first_error = None;
    let mut failure = None;
    for h in handles {
        match h.join() {
            Ok(Ok(w)) => {
                hist.merge(&w.hist);
                ios += w.ios;
                errors += w.errors;
                if first_error.is_none() {
                    first_error = w.first_error;
                }
            }
            Ok(Err(e)) => {
                if failure.is_none() || failure.as_deref() == Some("aborted") {
                    failure = Some(e);
                }
            }
            Err(_) => failure = Some("a queue thread panicked".into()),
        }
    }
    if let Some(f) = failure {
        return Err(f);
    }
    if let Some(e) = &first_error {
        eprintln!("ferrodisk-loadgen: {errors} I/O error(s); first: {e}");
    }
    drop(b);

    let per_io = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if ios > 0 => Some((b - a) * 1e6 / ios as f64),
        _ => None,
    };
    let backend_cpu = per_io(be0, be1);
    if let (Some(pid), None, true) = (o.pid, backend_cpu, ios > 0) {
        return Err(format!(
            "cannot read /proc/{pid}/stat: did the backend exit?"
        ));
    }
    Ok(Record {
        opts: o.clone(),
        ios,
        iops: ios as f64 / o.duration,
        mib_s: ios as f64 * o.bs as f64 / o.duration / (1 << 20) as f64,
        p50_us: hist.quantile(0.50) / 1e3,
        p99_us: hist.quantile(0.99) / 1e3,
        p99_9_us: hist.quantile(0.999) / 1e3,
        mean_us: hist.mean() / 1e3,
        backend_cpu_us_per_io: backend_cpu,
        client_cpu_us_per_io: per_io(cl0, cl1),
        errors,
    })
}
