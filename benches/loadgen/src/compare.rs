//! `ferrodisk-loadgen compare`: Ferrodisk vs qemu-storage-daemon (and fio for O_DIRECT) on
//! the same backings, alternating runs, medians across rounds; writes docs/benchmarks.md and
//! benches/results/latest.jsonl.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use crate::report;
use crate::run::{self, Rw};
use crate::util::{self, fmt_size, Args};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

fn check_stop() -> Result<(), String> {
    if STOP.load(Ordering::SeqCst) {
        Err("interrupted by a signal".into())
    } else {
        Ok(())
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Backing {
    Null,
    Buffered,
    Direct,
}

impl Backing {
    fn parse(s: &str) -> Result<Backing, String> {
        Ok(match s {
            "null" => Backing::Null,
            "buffered" => Backing::Buffered,
            "direct" => Backing::Direct,
            _ => {
                return Err(format!(
                    "unknown backing {s:?}: expected null, buffered, direct"
                ))
            }
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            Backing::Null => "null",
            Backing::Buffered => "buffered",
            Backing::Direct => "direct",
        }
    }
    pub fn title(self) -> &'static str {
        match self {
            Backing::Null => "null backing (no storage: the vhost-user path alone)",
            Backing::Buffered => "buffered file (page cache)",
            Backing::Direct => "O_DIRECT file",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Backend {
    Ferrodisk,
    Qsd,
    Fio,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Ferrodisk => "ferrodisk",
            Backend::Qsd => "qsd",
            Backend::Fio => "fio",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Workload {
    pub rw: Rw,
    pub bs: u64,
    /// Requests in flight per queue (or in total with --split-qd).
    pub qd: usize,
}

impl Workload {
    /// `<bs>-<rw>-qd<N>`, e.g. `4k-randread-qd32`.
    pub fn parse(s: &str) -> Result<Workload, String> {
        let err = || format!("workload {s:?}: expected <bs>-<rw>-qd<N>, e.g. 4k-randread-qd32");
        let mut it = s.split('-');
        let (Some(bs), Some(rw), Some(qd), None) = (it.next(), it.next(), it.next(), it.next())
        else {
            return Err(err());
        };
        let bs = util::parse_size(bs).map_err(|_| err())?;
        let rw = Rw::parse(rw).map_err(|_| err())?;
        let qd: usize = qd
            .strip_prefix("qd")
            .ok_or_else(err)?
            .parse()
            .map_err(|_| err())?;
        if bs == 0 || bs % 512 != 0 || qd == 0 {
            return Err(err());
        }
        Ok(Workload { rw, bs, qd })
    }
    pub fn name(&self) -> String {
        format!("{}-{}-qd{}", fmt_size(self.bs), self.rw.name(), self.qd)
    }
}

pub const DEFAULT_WORKLOADS: &str =
    "4k-randread-qd1,4k-randwrite-qd1,4k-randread-qd32,4k-randwrite-qd32,64k-read-qd8,64k-write-qd8";
const QUICK_WORKLOADS: &str = "4k-randread-qd32,4k-randwrite-qd32";

pub const COMPARE_USAGE: &str = "\
ferrodisk-loadgen compare [options]      (usually via benches/compare.sh)
  --backings LIST    null,buffered,direct                            [all three]
  --workloads LIST   <bs>-<rw>-qd<N>,...  rw: randread|randwrite|read|write|randrw
                     [4k-randread-qd1,4k-randwrite-qd1,4k-randread-qd32,
                      4k-randwrite-qd32,64k-read-qd8,64k-write-qd8]
  --queues LIST      queue counts, e.g. 1,2                           [1,2]
  --split-qd         qd is the total over all queues (qd/queues each);
                     default: qd is per queue (2 queues = 2x in flight)
  --rounds N         alternating rounds Ferrodisk, qsd[, fio]         [3]
  --duration SECS    measured seconds per run                         [5]
  --ramp SECS        warm-up seconds per run, not measured            [1]
  --idle SECS        idle-CPU window per backend and backing; 0 = skip [3]
  --size SIZE        disk size (null device and backing file)         [1G]
  --tmpdir DIR       where the backing file and sockets go (not tmpfs) [/var/tmp]
  --out FILE         markdown report            [docs/benchmarks.md; --quick: benches/results/quick.md]
  --results FILE     raw JSON lines             [benches/results/latest.jsonl; --quick: .../quick.jsonl]
  --no-fio           skip the fio device-limit runs for the direct backing
  --quick            smoke preset: --backings null --workloads 4k-randread-qd32,4k-randwrite-qd32
                     --queues 1 --rounds 1 --duration 1 --ramp 0.5 --idle 1 (flags given also apply)
Binaries: $FERRODISK_BIN or <workspace>/target/release/ferrodisk; qemu-storage-daemon and fio from PATH.";

#[derive(Debug)]
pub struct CompareOpts {
    pub backings: Vec<Backing>,
    pub workloads: Vec<Workload>,
    pub queues: Vec<usize>,
    pub split_qd: bool,
    pub rounds: usize,
    pub duration: f64,
    pub ramp: f64,
    pub idle: f64,
    pub size: u64,
    pub tmpdir: Option<PathBuf>,
    pub out: PathBuf,
    pub results: PathBuf,
    pub fio: bool,
    pub quick: bool,
    /// The arguments as given, for the "reproduce" line.
    pub argv: Vec<String>,
}

fn list<T>(v: &str, f: impl Fn(&str) -> Result<T, String>) -> Result<Vec<T>, String> {
    let r: Vec<T> = v
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(f)
        .collect::<Result<_, _>>()?;
    if r.is_empty() {
        return Err("empty list".into());
    }
    Ok(r)
}

pub fn workspace_root() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    p.canonicalize()
        .unwrap_or_else(|_| std::env::current_dir().unwrap())
}

pub fn parse_opts(argv: Vec<String>) -> Result<CompareOpts, String> {
    let mut a = Args::new(argv.clone());
    let mut backings = None;
    let mut workloads = None;
    let mut queues = None;
    let mut rounds = None;
    let mut duration = None;
    let mut ramp = None;
    let mut idle = None;
    let mut size = 1u64 << 30;
    let mut tmpdir = None;
    let mut out = None;
    let mut results = None;
    let mut fio = true;
    let mut quick = false;
    let mut split_qd = false;
    while let Some((k, inline)) = a.next_opt()? {
        match k.as_str() {
            "help" => return Err(COMPARE_USAGE.into()),
            "quick" => {
                quick = true;
                continue;
            }
            "no-fio" => {
                fio = false;
                continue;
            }
            "split-qd" => {
                split_qd = true;
                continue;
            }
            _ => {}
        }
        let v = a.value(&k, inline)?;
        match k.as_str() {
            "backings" => backings = Some(list(&v, Backing::parse)?),
            "workloads" => workloads = Some(list(&v, Workload::parse)?),
            "queues" => {
                queues = Some(list(&v, |s| {
                    s.parse::<usize>()
                        .ok()
                        .filter(|&n| (1..=64).contains(&n))
                        .ok_or_else(|| format!("--queues: invalid count {s:?}"))
                })?)
            }
            "rounds" => rounds = Some(util::parse_num::<usize>(&k, &v)?.max(1)),
            "duration" => duration = Some(util::parse_num::<f64>(&k, &v)?),
            "ramp" => ramp = Some(util::parse_num::<f64>(&k, &v)?),
            "idle" => idle = Some(util::parse_num::<f64>(&k, &v)?),
            "size" => size = util::parse_size(&v)?,
            "tmpdir" => tmpdir = Some(PathBuf::from(v)),
            "out" => out = Some(PathBuf::from(v)),
            "results" => results = Some(PathBuf::from(v)),
            _ => return Err(format!("unknown option --{k}\n\n{COMPARE_USAGE}")),
        }
    }
    let root = workspace_root();
    let q = quick;
    let o = CompareOpts {
        backings: backings.unwrap_or_else(|| {
            if q {
                vec![Backing::Null]
            } else {
                vec![Backing::Null, Backing::Buffered, Backing::Direct]
            }
        }),
        workloads: match workloads {
            Some(w) => w,
            None => list(
                if q {
                    QUICK_WORKLOADS
                } else {
                    DEFAULT_WORKLOADS
                },
                Workload::parse,
            )?,
        },
        queues: queues.unwrap_or_else(|| if q { vec![1] } else { vec![1, 2] }),
        split_qd,
        rounds: rounds.unwrap_or(if q { 1 } else { 3 }),
        duration: duration.unwrap_or(if q { 1.0 } else { 5.0 }),
        ramp: ramp.unwrap_or(if q { 0.5 } else { 1.0 }),
        idle: idle.unwrap_or(if q { 1.0 } else { 3.0 }),
        size,
        tmpdir,
        out: out.unwrap_or_else(|| {
            if q {
                root.join("benches/results/quick.md")
            } else {
                root.join("docs/benchmarks.md")
            }
        }),
        results: results.unwrap_or_else(|| {
            if q {
                root.join("benches/results/quick.jsonl")
            } else {
                root.join("benches/results/latest.jsonl")
            }
        }),
        fio,
        quick,
        argv,
    };
    let bad = |v: f64, min_excl: bool| v.is_nan() || if min_excl { v <= 0.0 } else { v < 0.0 };
    if bad(o.duration, true) || bad(o.ramp, false) || bad(o.idle, false) {
        return Err("--duration must be > 0, --ramp and --idle >= 0".into());
    }
    if o.size < (1 << 20) || o.size % 4096 != 0 {
        return Err("--size must be a multiple of 4k and at least 1M".into());
    }
    for w in &o.workloads {
        for &n in &o.queues {
            if o.split_qd && w.qd > 1 && w.qd % n != 0 {
                return Err(format!(
                    "--split-qd: {} does not divide evenly over {n} queues",
                    w.name()
                ));
            }
        }
    }
    Ok(o)
}

impl CompareOpts {
    /// Requests in flight per queue for a workload at `queues` queues.
    pub fn qd_per_queue(&self, w: &Workload, queues: usize) -> usize {
        if self.split_qd {
            (w.qd / queues).max(1)
        } else {
            w.qd
        }
    }

    fn runs(&self) -> usize {
        let per_round: usize = self
            .backings
            .iter()
            .map(|b| {
                if *b == Backing::Direct && self.fio {
                    3
                } else {
                    2
                }
            })
            .sum();
        per_round * self.workloads.len() * self.queues.len() * self.rounds
    }

    /// Seconds, from the matrix (about 0.4 s of start/stop per run).
    pub fn estimate_secs(&self) -> f64 {
        let runs = self.runs() as f64 * (self.ramp + self.duration + 0.4);
        let idle = if self.idle > 0.0 {
            self.backings.len() as f64 * 2.0 * (self.idle + 0.8)
        } else {
            0.0
        };
        let file = if self.backings.iter().any(|b| *b != Backing::Null) {
            self.size as f64 / 500e6
        } else {
            0.0
        };
        runs + idle + file
    }
}

struct Bins {
    ferrodisk: PathBuf,
    qsd: PathBuf,
    fio: Option<PathBuf>,
    loadgen: PathBuf,
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn find_bins(o: &CompareOpts, root: &Path) -> Result<Bins, String> {
    let ferrodisk = match std::env::var_os("FERRODISK_BIN") {
        Some(p) => PathBuf::from(p),
        None => root.join("target/release/ferrodisk"),
    };
    if !ferrodisk.is_file() {
        return Err(format!(
            "ferrodisk binary not found at {} (build it with `cargo build --release -p ferrodisk`, \
             or set FERRODISK_BIN)",
            ferrodisk.display()
        ));
    }
    let qsd = which("qemu-storage-daemon").ok_or(
        "qemu-storage-daemon not found in PATH (Debian: apt-get install qemu-system-x86 or \
         qemu-utils, which ship it)",
    )?;
    let fio = if o.fio && o.backings.contains(&Backing::Direct) {
        Some(which("fio").ok_or(
            "fio not found in PATH (needed for the direct backing's device limit; \
             install fio or pass --no-fio)",
        )?)
    } else {
        None
    };
    let loadgen = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    Ok(Bins {
        ferrodisk,
        qsd,
        fio,
        loadgen,
    })
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const TMPFS_MAGIC: i64 = 0x0102_1994;

fn is_tmpfs(p: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: `c` is a valid NUL-terminated path and `st` is a writable statfs buffer.
    let r = unsafe { libc::statfs(c.as_ptr(), st.as_mut_ptr()) };
    #[allow(clippy::unnecessary_cast)] // f_type's type differs between architectures.
    // SAFETY: statfs filled the buffer on success (and it was zeroed anyway).
    let t = unsafe { st.assume_init() }.f_type as i64;
    r == 0 && t == TMPFS_MAGIC
}

fn make_tempdir(o: &CompareOpts, root: &Path) -> Result<TempDir, String> {
    let needs_disk = o.backings.iter().any(|b| *b != Backing::Null);
    let parent = match &o.tmpdir {
        Some(d) => d.clone(),
        None => {
            let vt = PathBuf::from("/var/tmp");
            if vt.is_dir() && !is_tmpfs(&vt) {
                vt
            } else {
                root.join("target")
            }
        }
    };
    if needs_disk && is_tmpfs(&parent) {
        return Err(format!(
            "{} is a tmpfs: the file backings must be on a real disk (pass --tmpdir)",
            parent.display()
        ));
    }
    let dir = parent.join(format!("ferrodisk-bench.{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    Ok(TempDir(dir))
}

/// Writes a fully allocated (not sparse) file of `size` bytes with a non-zero pattern.
fn make_backing_file(path: &Path, size: u64) -> Result<(), String> {
    let mut f = File::create(path).map_err(|e| format!("create {}: {e}", path.display()))?;
    let mut chunk = vec![0u8; 4 << 20];
    let mut r = util::Rng::new(7);
    for c in chunk.chunks_mut(8) {
        c.copy_from_slice(&r.next().to_le_bytes());
    }
    let mut left = size;
    while left > 0 {
        check_stop()?;
        let n = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n])
            .map_err(|e| format!("write {}: {e}", path.display()))?;
        left -= n as u64;
    }
    f.sync_all()
        .map_err(|e| format!("fsync {}: {e}", path.display()))?;
    Ok(())
}

fn sync_file(path: &Path) {
    if let Ok(f) = File::open(path) {
        let _ = f.sync_data();
    }
}

fn die_with_parent(cmd: &mut Command) {
    // SAFETY: the closure runs between fork and exec and only calls prctl(2), which is
    // async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

/// Removes terminal colour sequences (ESC [ ... letter) from a log.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\x1b' && it.peek() == Some(&'[') {
            for d in it.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A running backend daemon; killed on drop.
struct Daemon {
    child: Option<Child>,
    name: &'static str,
    socket: PathBuf,
    log: PathBuf,
}

/// The command line of a backend for a backing (also shown in the report).
fn daemon_args(
    backend: Backend,
    backing: Backing,
    file: &Path,
    socket: &Path,
    queues: usize,
    size: u64,
) -> Vec<String> {
    let s = socket.display();
    let f = file.display();
    match backend {
        Backend::Ferrodisk => {
            let spec = match backing {
                Backing::Null => format!(
                    "engine=null,size={},socket={s},queues={queues}",
                    fmt_size(size)
                ),
                Backing::Buffered => format!("path={f},socket={s},queues={queues},direct=off"),
                Backing::Direct => format!("path={f},socket={s},queues={queues},direct=on"),
            };
            vec!["serve".into(), "--disk".into(), spec]
        }
        Backend::Qsd => {
            let blockdev = match backing {
                Backing::Null => format!("driver=null-co,node-name=n0,size={size},read-zeroes=off"),
                Backing::Buffered => {
                    format!("driver=file,node-name=n0,filename={f},cache.direct=off,aio=io_uring")
                }
                Backing::Direct => {
                    format!("driver=file,node-name=n0,filename={f},cache.direct=on,aio=io_uring")
                }
            };
            vec![
                "--blockdev".into(),
                blockdev,
                "--export".into(),
                format!(
                    "type=vhost-user-blk,id=e0,addr.type=unix,addr.path={s},node-name=n0,\
                     writable=on,num-queues={queues},writethrough=off"
                ),
            ]
        }
        Backend::Fio => unreachable!(),
    }
}

impl Daemon {
    fn start(
        bins: &Bins,
        backend: Backend,
        backing: Backing,
        tmp: &Path,
        queues: usize,
        size: u64,
    ) -> Result<Daemon, String> {
        let (bin, name, sock) = match backend {
            Backend::Ferrodisk => (&bins.ferrodisk, "ferrodisk", tmp.join("ferrodisk.sock")),
            Backend::Qsd => (&bins.qsd, "qemu-storage-daemon", tmp.join("qsd.sock")),
            Backend::Fio => unreachable!(),
        };
        let _ = std::fs::remove_file(&sock);
        let log = tmp.join(format!("{}.log", backend.name()));
        let logf = File::create(&log).map_err(|e| format!("create {}: {e}", log.display()))?;
        let logf2 = logf.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = Command::new(bin);
        cmd.args(daemon_args(
            backend,
            backing,
            &tmp.join("backing.img"),
            &sock,
            queues,
            size,
        ))
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(logf)
        .stderr(logf2);
        die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let mut d = Daemon {
            child: Some(child),
            name,
            socket: sock,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while !d.socket.exists() {
            check_stop()?;
            if let Some(st) = d
                .child
                .as_mut()
                .unwrap()
                .try_wait()
                .map_err(|e| e.to_string())?
            {
                return Err(format!(
                    "{name} exited at startup ({st}):\n{}",
                    d.log_tail()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{name}: socket {} did not appear within 15 s:\n{}",
                    d.socket.display(),
                    d.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(d)
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    fn log_tail(&self) -> String {
        let s = strip_ansi(&std::fs::read_to_string(&self.log).unwrap_or_default());
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Fails if the daemon has died.
    fn check_alive(&mut self) -> Result<(), String> {
        if let Some(st) = self
            .child
            .as_mut()
            .unwrap()
            .try_wait()
            .map_err(|e| e.to_string())?
        {
            return Err(format!("{} died ({st}):\n{}", self.name, self.log_tail()));
        }
        Ok(())
    }

    /// SIGTERM, then SIGKILL after 15 s.
    fn stop(mut self) -> Result<(), String> {
        let mut child = self.child.take().unwrap();
        // SAFETY: kill(2) on our own child, which has not been reaped yet.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if child.try_wait().map_err(|e| e.to_string())?.is_some() {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                eprintln!("warning: {} ignored SIGTERM for 15 s; killed", self.name);
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = std::fs::remove_file(&self.socket);
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Runs a child to completion with a deadline; stdout and stderr go to files in `tmp`.
fn run_child(
    mut cmd: Command,
    what: &str,
    tmp: &Path,
    limit: Duration,
) -> Result<(i32, String, String), String> {
    let out_p = tmp.join("child.out");
    let err_p = tmp.join("child.err");
    let out = File::create(&out_p).map_err(|e| e.to_string())?;
    let err = File::create(&err_p).map_err(|e| e.to_string())?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    die_with_parent(&mut cmd);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {what}: {e}"))?;
    struct Kill<'a>(&'a mut Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            if let Ok(None) = self.0.try_wait() {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
    }
    let guard = Kill(&mut child);
    let deadline = Instant::now() + limit;
    let status = loop {
        check_stop()?;
        if let Some(st) = guard.0.try_wait().map_err(|e| e.to_string())? {
            break st;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{what} did not finish within {:.0} s",
                limit.as_secs_f64()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    drop(guard);
    let stdout = std::fs::read_to_string(&out_p).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_p).unwrap_or_default();
    Ok((status.code().unwrap_or(-1), stdout, stderr))
}

/// One measurement, as stored in the JSON lines file.
#[derive(Clone, Debug)]
pub struct Sample {
    pub backing: Backing,
    pub backend: Backend,
    pub workload: Workload,
    pub queues: usize,
    pub round: usize,
    pub rec: Value,
}

impl Sample {
    pub fn f(&self, path: &[&str]) -> Option<f64> {
        let mut v = &self.rec;
        for p in path {
            v = v.get(p)?;
        }
        v.as_f64()
    }
}

struct Ctx<'a> {
    o: &'a CompareOpts,
    bins: &'a Bins,
    tmp: &'a Path,
    results: File,
    samples: Vec<Sample>,
    done: usize,
    total: usize,
}

impl Ctx<'_> {
    fn push(&mut self, s: Sample) -> Result<(), String> {
        let mut m = Map::new();
        m.insert("backing".into(), s.backing.name().into());
        m.insert("backend".into(), s.backend.name().into());
        m.insert("workload".into(), s.workload.name().into());
        m.insert("round".into(), s.round.into());
        if let Value::Object(r) = &s.rec {
            for (k, v) in r {
                m.insert(k.clone(), v.clone());
            }
        }
        writeln!(self.results, "{}", Value::Object(m)).map_err(|e| format!("results: {e}"))?;
        self.samples.push(s);
        Ok(())
    }

    fn progress(&mut self, s: &Sample) {
        self.done += 1;
        let cpu = s
            .f(&["backend_cpu_us_per_io"])
            .map(|c| format!(", backend {c:.2} µs CPU/IO"))
            .unwrap_or_default();
        eprintln!(
            "[{}/{}] {} q{} {} round {} {}: {:.0} IOPS, p50 {:.1} µs{}",
            self.done,
            self.total,
            s.backing.name(),
            s.queues,
            s.workload.name(),
            s.round,
            s.backend.name(),
            s.f(&["iops"]).unwrap_or(0.0),
            s.f(&["lat_us", "p50"]).unwrap_or(0.0),
            cpu
        );
    }

    fn run_backend(
        &mut self,
        backend: Backend,
        backing: Backing,
        w: &Workload,
        queues: usize,
        round: usize,
    ) -> Result<(), String> {
        let o = self.o;
        let mut d = Daemon::start(self.bins, backend, backing, self.tmp, queues, o.size)?;
        let qd = o.qd_per_queue(w, queues);
        let label = format!(
            "{}/{}/{}/q{}/r{}",
            backing.name(),
            backend.name(),
            w.name(),
            queues,
            round
        );
        let mut cmd = Command::new(&self.bins.loadgen);
        cmd.arg("run")
            .arg("--socket")
            .arg(&d.socket)
            .args(["--rw", w.rw.name()])
            .args(["--bs", &w.bs.to_string()])
            .args(["--qd", &qd.to_string()])
            .args(["--queues", &queues.to_string()])
            .args(["--duration", &o.duration.to_string()])
            .args(["--ramp", &o.ramp.to_string()])
            .args(["--pid", &d.pid().to_string()])
            .args(["--label", &label]);
        let limit = Duration::from_secs_f64(o.ramp + o.duration + 60.0);
        let (code, out, err) = run_child(cmd, "ferrodisk-loadgen run", self.tmp, limit)?;
        let alive = d.check_alive();
        let rec: Option<Value> = out.lines().find_map(|l| serde_json::from_str(l).ok());
        match (code, rec) {
            (0, Some(rec)) => {
                alive?;
                d.stop()?;
                if backing != Backing::Null {
                    sync_file(&self.tmp.join("backing.img"));
                }
                if rec.get("ios").and_then(Value::as_u64).unwrap_or(0) == 0 {
                    return Err(format!("{label}: no I/O completed in the measured window"));
                }
                let s = Sample {
                    backing,
                    backend,
                    workload: *w,
                    queues,
                    round,
                    rec,
                };
                self.progress(&s);
                self.push(s)
            }
            (_, rec) => {
                let errors = rec
                    .and_then(|r| r.get("errors").and_then(Value::as_u64))
                    .map(|e| format!(" with {e} I/O error(s)"))
                    .unwrap_or_default();
                let daemon = match alive {
                    Err(e) => format!("\n{e}"),
                    Ok(()) => format!("\n{} log:\n{}", d.name, d.log_tail()),
                };
                Err(format!(
                    "{label}: the load generator failed (exit {code}){errors}:\n{}{}",
                    err.trim(),
                    daemon
                ))
            }
        }
    }

    fn run_fio(&mut self, w: &Workload, queues: usize, round: usize) -> Result<(), String> {
        let o = self.o;
        let fio = self.bins.fio.as_ref().unwrap();
        let qd = o.qd_per_queue(w, queues);
        let file = self.tmp.join("backing.img");
        let json = self.tmp.join("fio.json");
        let _ = std::fs::remove_file(&json);
        let mut cmd = Command::new(fio);
        cmd.args(fio_args(&file, w, qd, queues, o.duration, o.ramp, o.size))
            .arg(format!("--output={}", json.display()));
        let limit = Duration::from_secs_f64(o.ramp + o.duration + 60.0);
        let (code, _out, err) = run_child(cmd, "fio", self.tmp, limit)?;
        if code != 0 {
            return Err(format!("fio failed (exit {code}): {}", err.trim()));
        }
        let text = std::fs::read_to_string(&json).map_err(|e| format!("fio output: {e}"))?;
        let rec = fio_record(&text, w, qd, queues, o.duration)
            .map_err(|e| format!("cannot parse fio's JSON: {e}"))?;
        sync_file(&file);
        let s = Sample {
            backing: Backing::Direct,
            backend: Backend::Fio,
            workload: *w,
            queues,
            round,
            rec,
        };
        self.progress(&s);
        self.push(s)
    }

    fn idle(
        &mut self,
        backend: Backend,
        backing: Backing,
        queues: usize,
    ) -> Result<IdleCpu, String> {
        let o = self.o;
        let mut d = Daemon::start(self.bins, backend, backing, self.tmp, queues, o.size)?;
        let sock = d
            .socket
            .to_str()
            .ok_or("socket path is not UTF-8")?
            .to_string();
        let client = run::connect(&sock, queues, Duration::from_secs(5))?;
        std::thread::sleep(Duration::from_millis(300));
        let pid = d.pid();
        let c0 = util::proc_cpu_secs(Some(pid));
        let t0 = Instant::now();
        let until = t0 + Duration::from_secs_f64(o.idle);
        while Instant::now() < until {
            check_stop()?;
            std::thread::sleep(Duration::from_millis(50));
        }
        let c1 = util::proc_cpu_secs(Some(pid));
        let secs = t0.elapsed().as_secs_f64();
        drop(client);
        d.check_alive()?;
        d.stop()?;
        let (Some(c0), Some(c1)) = (c0, c1) else {
            return Err(format!("cannot read /proc/{pid}/stat"));
        };
        let r = IdleCpu {
            backing,
            backend,
            queues,
            secs,
            pct_of_core: (c1 - c0) / secs * 100.0,
        };
        eprintln!(
            "idle: {} {} q{}: {:.2} % of one core over {:.1} s",
            backing.name(),
            backend.name(),
            queues,
            r.pct_of_core,
            secs
        );
        writeln!(
            self.results,
            "{}",
            serde_json::json!({
                "backing": backing.name(), "backend": backend.name(), "idle": true,
                "queues": queues, "seconds": secs, "cpu_pct_of_core": r.pct_of_core,
            })
        )
        .map_err(|e| format!("results: {e}"))?;
        Ok(r)
    }
}

#[derive(Clone, Debug)]
pub struct IdleCpu {
    pub backing: Backing,
    pub backend: Backend,
    pub queues: usize,
    pub secs: f64,
    pub pct_of_core: f64,
}

fn secs_ms(s: f64) -> String {
    format!("{}ms", (s * 1000.0).round().max(1.0) as u64)
}

pub fn fio_args(
    file: &Path,
    w: &Workload,
    qd: usize,
    jobs: usize,
    duration: f64,
    ramp: f64,
    size: u64,
) -> Vec<String> {
    let mut a = vec![
        "--name=x".to_string(),
        format!("--filename={}", file.display()),
        "--direct=1".into(),
        "--ioengine=io_uring".into(),
        format!("--rw={}", w.rw.name()),
        format!("--bs={}", w.bs),
        format!("--iodepth={qd}"),
        format!("--numjobs={jobs}"),
        "--group_reporting".into(),
        "--time_based".into(),
        format!("--runtime={}", secs_ms(duration)),
        "--norandommap".into(),
        "--randrepeat=0".into(),
        "--lat_percentiles=1".into(),
        "--output-format=json".into(),
    ];
    if ramp > 0.0 {
        a.push(format!("--ramp_time={}", secs_ms(ramp)));
    }
    if w.rw == Rw::RandRw {
        a.push("--rwmixread=50".into());
    }
    if !w.rw.random() && jobs > 1 {
        // Each job its own stripe, as the load generator's threads do.
        let stripe = size / jobs as u64 / w.bs * w.bs;
        a.push(format!("--size={stripe}"));
        a.push(format!("--offset_increment={stripe}"));
    }
    a
}

/// fio's JSON to a record shaped like `run`'s.
fn fio_record(
    text: &str,
    w: &Workload,
    qd: usize,
    jobs: usize,
    duration: f64,
) -> Result<Value, String> {
    // fio may print notes before the JSON object.
    let start = text.find('{').ok_or("no JSON object")?;
    let v: Value = serde_json::from_str(&text[start..]).map_err(|e| e.to_string())?;
    let job = v.get("jobs").and_then(|j| j.get(0)).ok_or("no jobs[0]")?;
    let side = |s: &str| job.get(s).cloned().unwrap_or(Value::Null);
    let (r, wr) = (side("read"), side("write"));
    let num = |x: &Value, k: &str| x.get(k).and_then(Value::as_f64).unwrap_or(0.0);
    let iops = num(&r, "iops") + num(&wr, "iops");
    let ios = num(&r, "total_ios") + num(&wr, "total_ios");
    let bw = num(&r, "bw_bytes") + num(&wr, "bw_bytes");
    let lat_side = match w.rw {
        Rw::RandWrite | Rw::Write => &wr,
        _ => &r,
    };
    let lat = lat_side
        .get("lat_ns")
        .filter(|l| l.get("percentile").is_some())
        .or_else(|| lat_side.get("clat_ns"))
        .ok_or("no latency data")?;
    let pct = |p: &str| {
        lat.get("percentile")
            .and_then(|m| m.get(p))
            .and_then(Value::as_f64)
            .map(|ns| ns / 1e3)
    };
    let runtime_ms = num(&r, "runtime").max(num(&wr, "runtime"));
    Ok(serde_json::json!({
        "label": format!("direct/fio/{}/q{}", w.name(), jobs),
        "socket": Value::Null,
        "rw": w.rw.name(),
        "bs": w.bs,
        "qd": qd,
        "queues": jobs,
        "duration_s": if runtime_ms > 0.0 { runtime_ms / 1e3 } else { duration },
        "ios": ios as u64,
        "iops": iops,
        "mib_s": bw / (1u64 << 20) as f64,
        "lat_us": {
            "p50": pct("50.000000"),
            "p99": pct("99.000000"),
            "p99_9": pct("99.900000"),
            "mean": lat.get("mean").and_then(Value::as_f64).map(|ns| ns / 1e3),
        },
        "backend_cpu_us_per_io": Value::Null,
        "client_cpu_us_per_io": Value::Null,
        "errors": job.get("error").and_then(Value::as_u64).unwrap_or(0),
    }))
}

/// Facts about the machine and the software under test, for the report header.
pub struct Env {
    pub date: String,
    pub nproc: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub qsd_version: String,
    pub fio_version: Option<String>,
    pub commit: String,
    pub loadavg: String,
    pub tmpdir: String,
    pub tmpfs_type: String,
    pub daemon_cmds: Vec<(String, String)>,
}

fn cmd_line(bin: &Path, args: &[&str]) -> Option<String> {
    let o = Command::new(bin).args(args).output().ok()?;
    let s = String::from_utf8_lossy(&o.stdout);
    s.lines().next().map(|l| l.trim().to_string())
}

fn gather_env(o: &CompareOpts, bins: &Bins, root: &Path, tmp: &Path) -> Env {
    let date = cmd_line(Path::new("date"), &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let mut commit = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    if let Some(st) = git(&[
        "status",
        "--porcelain",
        "--untracked-files=no",
        "--",
        "src",
        "Cargo.toml",
        "Cargo.lock",
    ]) {
        if !st.is_empty() {
            commit.push_str(" (with uncommitted changes in src/ or Cargo.*)");
        }
    }
    let ph_file = PathBuf::from("$DIR/backing.img");
    let mut daemon_cmds = Vec::new();
    for b in &o.backings {
        for be in [Backend::Ferrodisk, Backend::Qsd] {
            let args = daemon_args(be, *b, &ph_file, Path::new("$SOCK"), o.queues[0], o.size);
            let bin = if be == Backend::Ferrodisk {
                "ferrodisk"
            } else {
                "qemu-storage-daemon"
            };
            let line = std::iter::once(bin.to_string())
                .chain(args)
                .collect::<Vec<_>>()
                .join(" ");
            daemon_cmds.push((format!("{} / {}", b.name(), be.name()), line));
        }
        if *b == Backing::Direct && o.fio {
            if let Some(w) = o.workloads.first() {
                let qd = o.qd_per_queue(w, o.queues[0]);
                let line = std::iter::once("fio".to_string())
                    .chain(fio_args(
                        &ph_file,
                        w,
                        qd,
                        o.queues[0],
                        o.duration,
                        o.ramp,
                        o.size,
                    ))
                    .collect::<Vec<_>>()
                    .join(" ");
                daemon_cmds.push(("direct / fio (device limit)".into(), line));
            }
        }
    }
    Env {
        date,
        nproc: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        cpu_model,
        kernel,
        qsd_version: cmd_line(&bins.qsd, &["--version"]).unwrap_or_else(|| "unknown".into()),
        fio_version: bins.fio.as_ref().and_then(|f| cmd_line(f, &["--version"])),
        commit,
        loadavg: std::fs::read_to_string("/proc/loadavg")
            .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_default(),
        tmpdir: tmp
            .parent()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        tmpfs_type: if is_tmpfs(tmp) {
            "tmpfs".into()
        } else {
            "disk".into()
        },
        daemon_cmds,
    }
}

pub fn compare(o: CompareOpts) -> Result<(), String> {
    install_signal_handlers();
    let root = workspace_root();
    let bins = find_bins(&o, &root)?;
    let est = o.estimate_secs();
    eprintln!(
        "compare: {} backing(s) x {} workload(s) x {} queue count(s) x {} round(s) = {} runs, \
         about {:.0} min {:.0} s",
        o.backings.len(),
        o.workloads.len(),
        o.queues.len(),
        o.rounds,
        o.runs(),
        (est / 60.0).floor(),
        est % 60.0
    );
    let tmp = make_tempdir(&o, &root)?;
    for p in [&o.out, &o.results] {
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).map_err(|e| format!("mkdir {}: {e}", d.display()))?;
        }
    }
    let results = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&o.results)
        .map_err(|e| format!("{}: {e}", o.results.display()))?;
    let env = gather_env(&o, &bins, &root, &tmp.0);
    let started = Instant::now();
    let mut ctx = Ctx {
        o: &o,
        bins: &bins,
        tmp: &tmp.0,
        results,
        samples: Vec::new(),
        done: 0,
        total: o.runs(),
    };
    let mut idle = Vec::new();
    let qmax = *o.queues.iter().max().unwrap();
    let file = tmp.0.join("backing.img");
    for &backing in &o.backings {
        if backing != Backing::Null && !file.exists() {
            eprintln!(
                "creating a {} backing file in {}",
                fmt_size(o.size),
                tmp.0.display()
            );
            make_backing_file(&file, o.size)?;
        }
        if o.idle > 0.0 {
            for be in [Backend::Ferrodisk, Backend::Qsd] {
                idle.push(ctx.idle(be, backing, qmax)?);
            }
        }
        for &queues in &o.queues {
            for w in &o.workloads {
                for round in 1..=o.rounds {
                    ctx.run_backend(Backend::Ferrodisk, backing, w, queues, round)?;
                    ctx.run_backend(Backend::Qsd, backing, w, queues, round)?;
                    if backing == Backing::Direct && o.fio {
                        ctx.run_fio(w, queues, round)?;
                    }
                }
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let md = report::markdown(&o, &env, &ctx.samples, &idle, elapsed);
    std::fs::write(&o.out, &md).map_err(|e| format!("write {}: {e}", o.out.display()))?;
    drop(tmp);
    println!("{md}");
    eprintln!(
        "compare: done in {:.0} s; wrote {} and {}",
        elapsed,
        o.out.display(),
        o.results.display()
    );
    Ok(())
}
