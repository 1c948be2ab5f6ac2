//! The VM test fixture: starts `ferrodisk serve`, boots a QEMU guest whose disks are
//! Ferrodisk's vhost-user-blk sockets, runs a script inside it and parses what it reports.
//!
//! - Every process is killed when its guard drops, on success, failure and panic alike.
//! - Every guest run has a time limit; a guest that overruns is killed and the test fails
//!   with its console log.
//! - Each test gets a work directory under `target/vmm-tests/`; it is removed when the test
//!   passes and kept (with the daemon and console logs) when it fails.
//!
//! Missing prerequisites (QEMU, the guest image, the `ferrodisk` binary) fail the test with
//! a message that says what is missing: nothing here skips itself.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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

/// A test's work directory: kept when the test panics, removed otherwise.
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
        if std::thread::panicking() {
            eprintln!("vmm-tests: logs kept in {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// A running `ferrodisk serve`. Killed on drop.
pub struct Daemon {
    child: Option<Child>,
    stdout: PathBuf,
    pub sockets: Vec<PathBuf>,
}

impl Daemon {
    /// Starts the daemon with one `--disk` per spec and waits until every socket listens.
    pub fn start(dir: &WorkDir, specs: &[String]) -> Daemon {
        let stdout = dir.join("ferrodisk.stdout");
        let mut cmd = Command::new(ferrodisk_bin());
        cmd.arg("serve");
        for s in specs {
            cmd.arg("--disk").arg(s);
        }
        let child = cmd
            .stdout(File::create(&stdout).unwrap())
            .stderr(
                File::options()
                    .create(true)
                    .append(true)
                    .open(dir.join("ferrodisk.log"))
                    .unwrap(),
            )
            .spawn()
            .expect("spawn ferrodisk");
        let sockets: Vec<PathBuf> = specs
            .iter()
            .filter_map(|s| {
                s.split(',')
                    .find_map(|kv| kv.strip_prefix("socket="))
                    .map(PathBuf::from)
            })
            .collect();
        let mut d = Daemon {
            child: Some(child),
            stdout,
            sockets,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !d.sockets.iter().all(|s| s.exists()) {
            if let Some(st) = d.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "ferrodisk exited at start ({st}); see {}",
                    dir.join("ferrodisk.log").display()
                );
            }
            assert!(
                Instant::now() < deadline,
                "ferrodisk sockets did not appear within 10 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        d
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// SIGTERM, a bounded wait for exit 0, and the per-disk counters it printed (by socket).
    pub fn stop(mut self) -> HashMap<String, Value> {
        let mut child = self.child.take().unwrap();
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("ferrodisk did not exit within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(
            status.success(),
            "ferrodisk exited with {status} after SIGTERM"
        );
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
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One vhost-user-blk disk attached to the guest.
pub struct VmDisk {
    pub socket: PathBuf,
    pub queues: u16,
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
        }
    }

    /// Boots the guest, runs `script` in it and returns its report once it powers off.
    pub fn run(&self, script: &str) -> GuestReport {
        let (kernel, initrd) = guest_image();
        let script_path = self.dir.join(&format!("{}.sh", self.name));
        std::fs::write(&script_path, script).unwrap();
        let console = self.dir.join(&format!("{}.console", self.name));
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
            cmd.arg("-chardev")
                .arg(format!("socket,id=c{i},path={}", d.socket.display()));
            cmd.arg("-device").arg(format!(
                "vhost-user-blk-pci,chardev=c{i},num-queues={}",
                d.queues
            ));
        }
        let log = File::create(self.dir.join(&format!("{}.qemu.log", self.name))).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn qemu-system-x86_64");
        let mut qemu = Qemu(child);
        let deadline = Instant::now() + self.timeout;
        let status = loop {
            if let Some(s) = qemu.0.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let text = std::fs::read_to_string(&console).unwrap_or_default();
                panic!(
                    "guest `{}` ran past {:?}; console:\n{text}",
                    self.name, self.timeout
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        let qlog = std::fs::read_to_string(self.dir.join(&format!("{}.qemu.log", self.name)))
            .unwrap_or_default();
        assert!(
            status.success(),
            "qemu exited with {status}:\n{qlog}\nconsole:\n{text}"
        );
        GuestReport::parse(&text)
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
