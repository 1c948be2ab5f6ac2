//! The VM test fixture: starts `ferrodisk serve`, boots a QEMU guest whose disks are
//! Ferrodisk's vhost-user-blk sockets, runs a script inside it and parses what it reports.
//!
//! - Every process is killed when its guard drops, on success, failure and panic alike.
//! - Every guest run has a time limit; a guest that overruns is killed and the test fails
//!   with its console log.
//! - Each test gets a work directory under `target/vmm-tests/`; it is removed when the test
//!   passes and kept (with the daemon and console logs) when it fails, or always when
//!   `FERRODISK_KEEP_LOGS` is set.
//! - Restarts: [`Daemon::kill`] signals a backend and waits for its exit, [`Daemon::respawn`]
//!   starts the same backend again, [`Daemon::wait_connected`] waits for the frontend to come
//!   back; [`Vm::spawn`] runs a guest in the background meanwhile, and [`Vm::reconnect`]
//!   makes QEMU reconnect to a backend that went away.
//!
//! Missing prerequisites (QEMU, the guest image, the `ferrodisk` binary) fail the test with
//! a message that says what is missing: nothing here skips itself.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub use serde_json::Value;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The `ferrodisk` binary under test: `$FERRODISK_BIN`, else `target/debug/ferrodisk`.
pub fn ferrodisk_bin() -> PathBuf {
    let p = std::env::var_os("FERRODISK_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/debug/ferrodisk"));
    assert!(
        p.exists(),
        "the ferrodisk binary is missing at {} (run `cargo build` or set FERRODISK_BIN)",
        p.display()
    );
    p
}

/// Runs a `ferrodisk` client subcommand against the daemon API at `api`, asserts that it
/// succeeded, and returns its stdout and stderr.
pub fn ferrodisk_cli(api: &Path, args: &[&str]) -> String {
    let out = Command::new(ferrodisk_bin())
        .args(args)
        .env("FERRODISK_API", api)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "ferrodisk {}: {text}", args.join(" "));
    text
}

/// The guest kernel and initramfs, built (or taken from cache) by `guest-images/build.sh`.
pub fn guest_image() -> &'static (PathBuf, PathBuf) {
    static IMAGE: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let dir = std::env::var_os("FERRODISK_GUEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
                    .join(".cache/ferrodisk/guest")
            });
        let out = Command::new(repo_root().join("guest-images/build.sh"))
            .arg(&dir)
            .output()
            .expect("run guest-images/build.sh");
        assert!(
            out.status.success(),
            "guest-images/build.sh failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (dir.join("vmlinuz"), dir.join("initrd.img"))
    })
}

fn qemu() -> &'static str {
    static CHECK: OnceLock<()> = OnceLock::new();
    CHECK.get_or_init(|| {
        let ok = Command::new("qemu-system-x86_64").arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
        assert!(ok, "qemu-system-x86_64 is missing: apt-get install qemu-system-x86 (scripts/install-deps.sh does)");
    });
    "qemu-system-x86_64"
}

/// A test's work directory: kept when the test panics (or `FERRODISK_KEEP_LOGS` is set),
/// removed otherwise.
pub struct WorkDir {
    pub path: PathBuf,
}

impl WorkDir {
    pub fn new(name: &str) -> WorkDir {
        let path = repo_root().join("target/vmm-tests").join(name);
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        WorkDir { path }
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.path.join(p)
    }

    /// Creates a sparse image of `bytes` bytes.
    pub fn image(&self, name: &str, bytes: u64) -> PathBuf {
        let p = self.join(name);
        File::create(&p).unwrap().set_len(bytes).unwrap();
        p
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("FERRODISK_KEEP_LOGS").is_some() {
            eprintln!("vmm-tests: logs kept in {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// A running backend process: `ferrodisk serve` ([`Daemon::start`]) or any other vhost-user
/// server ([`Daemon::start_program`], e.g. qemu-storage-daemon). Killed on drop.
///
/// Successive instances in one work directory (a restart, a second daemon) append to one log,
/// `<name>.log` (stderr), each after a `=== vmm-tests: ... ===` line, and write their stdout to
/// `<name>.<n>.stdout`, where `n` counts the instances from 1.
pub struct Daemon {
    child: Child,
    status: Option<ExitStatus>,
    stdout: PathBuf,
    pub sockets: Vec<PathBuf>,
    dir: PathBuf,
    name: String,
    program: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    /// Where this instance's part of the shared log starts.
    log_start: u64,
    instance: u32,
}

impl Daemon {
    /// Starts `ferrodisk serve` with one `--disk` per spec and waits until every socket listens.
    pub fn start(dir: &WorkDir, specs: &[String]) -> Daemon {
        let mut args = vec!["serve".to_string()];
        for s in specs {
            args.push("--disk".into());
            args.push(s.clone());
        }
        let sockets: Vec<PathBuf> = specs
            .iter()
            .filter_map(|s| {
                s.split(',')
                    .find_map(|kv| kv.strip_prefix("socket="))
                    .map(PathBuf::from)
            })
            .collect();
        Daemon::start_program(dir, "ferrodisk", &ferrodisk_bin(), &args, &sockets)
    }

    /// Starts `program args...` as a backend serving `sockets` and waits until this process
    /// listens on every one of them. `name` names its log and stdout files.
    pub fn start_program(
        dir: &WorkDir,
        name: &str,
        program: &Path,
        args: &[String],
        sockets: &[PathBuf],
    ) -> Daemon {
        Daemon::spawn(
            dir.path.clone(),
            name.to_string(),
            program.to_path_buf(),
            args.to_vec(),
            sockets.to_vec(),
        )
    }

    /// Starts a new instance with the same program, arguments and sockets, and waits until it
    /// listens. The old instance must have exited (see [`Daemon::kill`]); Ferrodisk replaces a
    /// stale socket file itself, and so does qemu-storage-daemon.
    pub fn respawn(&self) -> Daemon {
        Daemon::spawn(
            self.dir.clone(),
            self.name.clone(),
            self.program.clone(),
            self.args.clone(),
            self.sockets.clone(),
        )
    }

    fn spawn(
        dir: PathBuf,
        name: String,
        program: PathBuf,
        args: Vec<String>,
        sockets: Vec<PathBuf>,
    ) -> Daemon {
        // The first free instance number; create_new makes the claim atomic.
        let (instance, stdout_file, stdout) = (1..)
            .find_map(|n| {
                let p = dir.join(format!("{name}.{n}.stdout"));
                File::options()
                    .write(true)
                    .create_new(true)
                    .open(&p)
                    .ok()
                    .map(|f| (n, f, p))
            })
            .unwrap();
        let log = dir.join(format!("{name}.log"));
        let mut log_file = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        writeln!(
            log_file,
            "=== vmm-tests: {name} instance {instance}: {} {} ===",
            program.display(),
            args.join(" ")
        )
        .unwrap();
        let log_start = log_file.metadata().unwrap().len();
        let child = Command::new(&program)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(stdout_file)
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", program.display()));
        let mut d = Daemon {
            child,
            status: None,
            stdout,
            sockets,
            dir,
            name,
            program,
            args,
            log,
            log_start,
            instance,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !d.listening() {
            if let Some(st) = d.child.try_wait().unwrap() {
                panic!(
                    "{} exited at start ({st}); end of its log:\n{}",
                    d.name,
                    d.log_tail(40)
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} did not listen on {:?} within 10 s; end of its log:\n{}",
                d.name,
                d.sockets,
                d.log_tail(40)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        d
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Which instance this is in its work directory (1 for the first).
    pub fn instance(&self) -> u32 {
        self.instance
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        if self.status.is_none() {
            self.status = self.child.try_wait().unwrap();
        }
        self.status.is_none()
    }

    /// Sends `sig` (e.g. `libc::SIGKILL`) and waits up to 30 s for the process to exit; returns
    /// its exit status. If it is still running after 30 s it is killed and this panics. Returns
    /// the status at once if the process had already exited.
    pub fn kill(&mut self, sig: i32) -> ExitStatus {
        let limit = Duration::from_secs(30);
        match self.signal_and_wait(sig, limit) {
            Some(s) => s,
            None => {
                let _ = self.child.kill();
                self.status = self.child.wait().ok();
                panic!(
                    "{} did not exit within {limit:?} of signal {sig}; end of its log:\n{}",
                    self.name,
                    self.log_tail(40)
                );
            }
        }
    }

    /// Sends `sig` (e.g. `libc::SIGSTOP`, `libc::SIGCONT`) and returns at once. Does nothing
    /// if the process has exited.
    pub fn signal(&mut self, sig: i32) {
        if self.alive() {
            // SAFETY: kill(2) on our own child, which has not been reaped.
            unsafe { libc::kill(self.child.id() as i32, sig) };
        }
    }

    /// Sends `sig` and waits up to `timeout` for the process to exit: its exit status, or
    /// `None` if it is still running (it is left running). Returns the status at once if the
    /// process had already exited (no signal is sent then).
    pub fn signal_and_wait(&mut self, sig: i32, timeout: Duration) -> Option<ExitStatus> {
        if !self.alive() {
            return self.status;
        }
        // SAFETY: kill(2) on our own child, which has not been reaped (its pid is not reused).
        unsafe { libc::kill(self.child.id() as i32, sig) };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                self.status = Some(s);
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The last `lines` lines of this instance's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log_so_far();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// This instance's part of the log (its stderr).
    pub fn log_so_far(&self) -> String {
        use std::io::{Read, Seek, SeekFrom};
        let mut bytes = Vec::new();
        if let Ok(mut f) = File::open(&self.log) {
            if f.seek(SeekFrom::Start(self.log_start)).is_ok() {
                let _ = f.read_to_end(&mut bytes);
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Polls this instance's log until a line contains `needle`; returns how long that took,
    /// or `None` after `timeout`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> Option<Duration> {
        let t0 = Instant::now();
        loop {
            if self.log_so_far().contains(needle) {
                return Some(t0.elapsed());
            }
            if t0.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The unix-socket connections this process has accepted on its sockets (found through
    /// `/proc/net/unix` and `/proc/PID/fd`, so it works for any backend): how many are open.
    pub fn connections(&self) -> usize {
        self.unix_sockets().into_iter().filter(|l| !l).count()
    }

    /// Whether this process listens on every one of its sockets.
    fn listening(&self) -> bool {
        self.unix_sockets().into_iter().filter(|l| *l).count() >= self.sockets.len()
    }

    /// For each unix socket of this process bound to one of `sockets`: whether it listens.
    ///
    /// Ferrodisk binds in a private directory next to the socket (`DIR/.ferrodisk-PID-N/s`)
    /// and links the file into place once it listens; the kernel keeps reporting the name it
    /// was bound to. A listener under such a name counts once its private directory is gone
    /// (the socket was published) and the socket file exists.
    fn unix_sockets(&self) -> Vec<bool> {
        let prefix = format!(".ferrodisk-{}-", self.pid());
        let private_of = |p: &Path| -> Option<PathBuf> {
            if p.file_name()? != "s" {
                return None;
            }
            let d = p.parent()?;
            d.file_name()?
                .to_str()?
                .starts_with(&prefix)
                .then(|| d.to_path_buf())
        };
        let Ok(fds) = std::fs::read_dir(format!("/proc/{}/fd", self.pid())) else {
            return Vec::new();
        };
        let inodes: std::collections::HashSet<String> = fds
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter_map(|l| {
                let l = l.to_str()?;
                Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
            })
            .collect();
        let table = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
        // Num RefCount Protocol Flags Type St Inode Path; Flags 0x10000 is __SO_ACCEPTCON.
        table
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let path = Path::new(*f.get(7)?);
                if !inodes.contains(f[6]) {
                    return None;
                }
                let mut published = None;
                let private = private_of(path);
                for s in &self.sockets {
                    if s == path {
                        published = Some(true);
                    } else if let Some(d) = &private {
                        if d.parent() == s.parent() {
                            published = Some(!d.exists() && s.exists());
                        }
                    }
                }
                let published = published?;
                let flags = u32::from_str_radix(f[3], 16).ok()?;
                let listening = flags & 0x10000 != 0;
                // An unpublished listener is not ready yet; an accepted connection is one.
                (published || !listening).then_some(listening)
            })
            .collect()
    }

    /// Waits until this process has accepted a connection on every one of its sockets;
    /// returns how long that took, or `None` after `timeout`.
    pub fn wait_connected(&self, timeout: Duration) -> Option<Duration> {
        let t0 = Instant::now();
        loop {
            if self.connections() >= self.sockets.len() {
                return Some(t0.elapsed());
            }
            if t0.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The per-disk counters Ferrodisk printed on its stdout when it stopped (by socket).
    pub fn stats(&self) -> HashMap<String, Value> {
        let out = std::fs::read_to_string(&self.stdout).unwrap();
        out.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .map(|v| {
                (
                    v["disk"].as_str().unwrap_or_default().to_string(),
                    v["stats"].clone(),
                )
            })
            .collect()
    }

    /// SIGTERM, a bounded wait for exit 0, and the per-disk counters it printed (by socket).
    pub fn stop(mut self) -> HashMap<String, Value> {
        let status = self.kill(libc::SIGTERM);
        assert!(
            status.success(),
            "{} exited with {status} after SIGTERM; end of its log:\n{}",
            self.name,
            self.log_tail(40)
        );
        self.stats()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One vhost-user-blk disk attached to the guest.
pub struct VmDisk {
    pub socket: PathBuf,
    pub queues: u16,
}

impl VmDisk {
    /// The disk list of a guest with one vhost-user disk on `socket`.
    pub fn only(socket: &Path, queues: u16) -> Vec<VmDisk> {
        vec![VmDisk {
            socket: socket.to_path_buf(),
            queues,
        }]
    }
}

/// How to run a guest.
pub struct Vm<'a> {
    pub dir: &'a WorkDir,
    /// Names the console and QEMU logs (several guests may run in one test).
    pub name: &'a str,
    pub disks: Vec<VmDisk>,
    pub smp: u8,
    pub timeout: Duration,
    /// Let a guest reboot (QEMU resets its devices) instead of exiting on reboot.
    pub allow_reboot: bool,
    /// `Some(s)`: QEMU reconnects to a backend that went away every `s` seconds
    /// (`-chardev socket,...,reconnect=s`), so a restarted backend gets the guest back.
    pub reconnect: Option<u32>,
}

/// What the guest reported.
#[derive(Debug, Default)]
pub struct GuestReport {
    pub steps: Vec<(String, i32)>,
    pub kv: HashMap<String, String>,
    /// `(steps, failed)` from the closing line; `None` if the guest never finished.
    pub end: Option<(u32, u32)>,
    /// How many times the guest started its script (more than 1 after a reboot). Steps and
    /// the end line are those of the last boot; values of earlier boots stay unless overwritten.
    pub boots: u32,
    pub console: String,
}

impl GuestReport {
    /// Parses the serial console.
    pub fn parse(console: &str) -> GuestReport {
        let mut r = GuestReport {
            console: console.to_string(),
            ..Default::default()
        };
        for line in console.lines().map(|l| l.trim_end_matches('\r')) {
            if line == "FERRODISK-BEGIN" {
                r.boots += 1;
                r.steps.clear();
                r.end = None;
            } else if let Some(rest) = line.strip_prefix("FERRODISK-STEP ") {
                let mut name = None;
                let mut rc = None;
                for f in rest.split(' ') {
                    if let Some(v) = f.strip_prefix("name=") {
                        name = Some(v.to_string());
                    } else if let Some(v) = f.strip_prefix("rc=") {
                        rc = v.parse().ok();
                    }
                }
                if let (Some(n), Some(rc)) = (name, rc) {
                    r.steps.push((n, rc));
                }
            } else if let Some(rest) = line.strip_prefix("FERRODISK-KV key=") {
                if let Some((k, v)) = rest.split_once(" value=") {
                    r.kv.insert(k.to_string(), v.to_string());
                }
            } else if let Some(rest) = line.strip_prefix("FERRODISK-END ") {
                let get = |k: &str| {
                    rest.split(' ')
                        .find_map(|f| f.strip_prefix(k))
                        .and_then(|v| v.parse().ok())
                };
                if let (Some(s), Some(f)) = (get("steps="), get("failed=")) {
                    r.end = Some((s, f));
                }
            }
        }
        r
    }

    /// The exit code of step `name`; panics with the console if it did not run.
    pub fn rc(&self, name: &str) -> i32 {
        match self.steps.iter().find(|(n, _)| n == name) {
            Some((_, rc)) => *rc,
            None => panic!("step `{name}` did not run; console:\n{}", self.console),
        }
    }

    /// Asserts that step `name` ran and exited 0.
    pub fn assert_ok(&self, name: &str) {
        assert_eq!(
            self.rc(name),
            0,
            "step `{name}` failed; console:\n{}",
            self.console
        );
    }

    /// Asserts that the guest finished and every step passed.
    pub fn assert_all_ok(&self) {
        match self.end {
            Some((n, 0)) if n as usize == self.steps.len() => {}
            _ => panic!(
                "guest steps failed or did not finish ({:?}); console:\n{}",
                self.end, self.console
            ),
        }
    }

    pub fn kv(&self, key: &str) -> &str {
        match self.kv.get(key) {
            Some(v) => v,
            None => panic!(
                "the guest did not report `{key}`; console:\n{}",
                self.console
            ),
        }
    }
}

/// A QEMU process; killed on drop.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Vm<'_> {
    pub fn new<'a>(dir: &'a WorkDir, name: &'a str, disks: Vec<VmDisk>) -> Vm<'a> {
        Vm {
            dir,
            name,
            disks,
            smp: 1,
            timeout: Duration::from_secs(180),
            allow_reboot: false,
            reconnect: None,
        }
    }

    /// Boots the guest, runs `script` in it and returns its report once it powers off.
    pub fn run(&self, script: &str) -> GuestReport {
        self.spawn(script).wait()
    }

    /// Boots the guest with `script` and returns at once; the guest runs until it powers off,
    /// the [`Vm::timeout`] (counted from now) passes, or the [`RunningVm`] is dropped.
    pub fn spawn(&self, script: &str) -> RunningVm {
        let (kernel, initrd) = guest_image();
        let script_path = self.dir.join(&format!("{}.sh", self.name));
        std::fs::write(&script_path, script).unwrap();
        let console = self.dir.join(&format!("{}.console", self.name));
        let _ = std::fs::remove_file(&console);
        let mut cmd = Command::new(qemu());
        cmd.args([
            "-machine",
            "q35,accel=tcg,memory-backend=mem0",
            "-cpu",
            "max",
            "-m",
            "512",
        ])
        .args(["-object", "memory-backend-memfd,id=mem0,size=512M,share=on"])
        .args(["-smp", &self.smp.to_string()])
        .args(["-nographic", "-nodefaults"])
        .args(if self.allow_reboot {
            &[][..]
        } else {
            &["-no-reboot"][..]
        })
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 quiet loglevel=1 panic=-1"])
        .arg("-fw_cfg")
        .arg(format!(
            "name=opt/ferrodisk/script,file={}",
            script_path.display()
        ));
        for (i, d) in self.disks.iter().enumerate() {
            let reconnect = self
                .reconnect
                .map(|s| format!(",reconnect={s}"))
                .unwrap_or_default();
            cmd.arg("-chardev").arg(format!(
                "socket,id=c{i},path={}{reconnect}",
                d.socket.display()
            ));
            cmd.arg("-device").arg(format!(
                "vhost-user-blk-pci,chardev=c{i},num-queues={}",
                d.queues
            ));
        }
        let qemu_log = self.dir.join(&format!("{}.qemu.log", self.name));
        let log = File::create(&qemu_log).unwrap();
        let started = Instant::now();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn qemu-system-x86_64");
        RunningVm {
            qemu: Qemu(child),
            name: self.name.to_string(),
            console,
            qemu_log,
            started,
            timeout: self.timeout,
        }
    }
}

/// A guest started by [`Vm::spawn`]. QEMU is killed when this drops.
pub struct RunningVm {
    qemu: Qemu,
    name: String,
    console: PathBuf,
    qemu_log: PathBuf,
    started: Instant,
    timeout: Duration,
}

/// How a guest run ended, from [`RunningVm::wait_or_kill`].
#[derive(Debug)]
pub struct VmOutcome {
    /// What the console held; `end` is `None` if the guest did not finish.
    pub report: GuestReport,
    /// QEMU's exit status; `None` if it ran past the time limit and was killed.
    pub status: Option<ExitStatus>,
    /// QEMU's own stdout and stderr.
    pub qemu_log: String,
    /// From spawn to exit (or to the kill).
    pub duration: Duration,
}

impl RunningVm {
    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.qemu.0.id()
    }

    /// Time since QEMU was started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// The serial console so far (with `\r` as QEMU wrote it).
    pub fn console_so_far(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.console).unwrap_or_default()).into_owned()
    }

    /// The status if QEMU has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.qemu.0.try_wait().unwrap()
    }

    /// Waits until the console contains `needle` and returns the time that took. Panics with
    /// the console if QEMU exits first, or after `timeout`.
    pub fn wait_for_console(&mut self, needle: &str, timeout: Duration) -> Duration {
        let t0 = Instant::now();
        loop {
            if self.console_so_far().contains(needle) {
                return t0.elapsed();
            }
            if let Some(st) = self.exited() {
                // It may have printed the needle just before exiting.
                let text = self.console_so_far();
                assert!(
                    text.contains(needle),
                    "guest `{}` exited ({st}) before printing {needle:?}; console:\n{text}",
                    self.name
                );
                return t0.elapsed();
            }
            if t0.elapsed() > timeout {
                panic!(
                    "guest `{}` did not print {needle:?} within {timeout:?}; console:\n{}",
                    self.name,
                    self.console_so_far()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (until the VM's time limit, counted from spawn) for the guest to power off and
    /// returns what happened, without judging it: a guest that overruns is killed and its
    /// partial console returned.
    pub fn wait_or_kill(mut self) -> VmOutcome {
        let deadline = self.started + self.timeout;
        let status = loop {
            if let Some(s) = self.exited() {
                break Some(s);
            }
            if Instant::now() > deadline {
                let _ = self.qemu.0.kill();
                let _ = self.qemu.0.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        VmOutcome {
            report: GuestReport::parse(&self.console_so_far()),
            status,
            qemu_log: std::fs::read_to_string(&self.qemu_log).unwrap_or_default(),
            duration: self.started.elapsed(),
        }
    }

    /// Waits for the guest to power off and returns its report. Panics with the console if it
    /// runs past the VM's time limit (counted from spawn) or QEMU fails.
    pub fn wait(self) -> GuestReport {
        let (name, timeout) = (self.name.clone(), self.timeout);
        let out = self.wait_or_kill();
        let text = &out.report.console;
        match out.status {
            None => panic!("guest `{name}` ran past {timeout:?}; console:\n{text}"),
            Some(status) => assert!(
                status.success(),
                "qemu exited with {status}:\n{}\nconsole:\n{text}",
                out.qemu_log
            ),
        }
        out.report
    }
}

/// Allocated bytes of a file (st_blocks * 512).
pub fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// A counter from the daemon's exit summary: `stats[socket]["totals"][name]`.
pub fn total(stats: &HashMap<String, Value>, socket: &Path, name: &str) -> u64 {
    stats
        .get(socket.to_str().unwrap())
        .unwrap_or_else(|| panic!("no stats for {}: {stats:?}", socket.display()))["totals"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name}"))
}

/// A per-queue counter: `stats[socket]["queues"][q][name]`.
pub fn per_queue(stats: &HashMap<String, Value>, socket: &Path, q: usize, name: &str) -> u64 {
    stats[socket.to_str().unwrap()]["queues"][q][name]
        .as_u64()
        .unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_console_protocol() {
        let c = "noise\r\nFERRODISK-BEGIN\nFERRODISK-STEP name=mkfs rc=0\r\n[  1.2] kernel says\nFERRODISK-KV key=sum value=abc def\nFERRODISK-STEP name=fio rc=3\nFERRODISK-END steps=2 failed=1\n";
        let r = GuestReport::parse(c);
        assert_eq!(
            r.steps,
            vec![("mkfs".to_string(), 0), ("fio".to_string(), 3)]
        );
        assert_eq!(r.kv("sum"), "abc def");
        assert_eq!(r.end, Some((2, 1)));
        assert_eq!(r.boots, 1);
        assert_eq!(r.rc("fio"), 3);
    }
}
