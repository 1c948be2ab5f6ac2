//! A real etcd on loopback for tests: one member ([`Etcd::start`]) or a cluster
//! ([`Etcd::start_cluster`]), with free client and peer ports, data in a temporary
//! directory, each member's output in a log file there, every process killed on drop.
//! Include it with `#[path = "common/etcd.rs"] mod etcd;`.
//!
//! etcd is required, never skipped: without it the test panics and says what to install.

#![allow(dead_code)]

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferrodisk::repl::authority::Store;
use ferrodisk::repl::etcd::EtcdStore;

/// How long etcd gets to elect a leader and answer.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts with fresh ports, in case another process took a port between probe and bind.
const START_ATTEMPTS: usize = 3;

/// One etcd member: its URLs and, while it runs, its process.
struct Member {
    name: String,
    client_url: String,
    peer_url: String,
    child: Option<Child>,
}

/// A running etcd cluster. Dropping it kills every member and removes the data.
pub struct Etcd {
    bin: PathBuf,
    members: Vec<Member>,
    dir: tempfile::TempDir,
}

impl Etcd {
    /// Starts a one-member etcd and waits until it serves reads.
    pub fn start() -> Etcd {
        Etcd::start_cluster(1)
    }

    /// Starts an `n`-member cluster and waits until every member serves reads.
    pub fn start_cluster(n: usize) -> Etcd {
        let bin = etcd_binary();
        let mut last_log = String::new();
        for _ in 0..START_ATTEMPTS {
            let mut etcd = Etcd::new(bin.clone(), n);
            for i in 0..n {
                etcd.spawn(i, "new");
            }
            match (0..n).try_for_each(|i| etcd.wait_ready(i)) {
                Ok(()) => return etcd,
                Err(why) => {
                    last_log = format!("{why}\n{}", etcd.logs());
                    eprintln!("etcd failed to start: {last_log}");
                }
            }
        }
        panic!("etcd did not start after {START_ATTEMPTS} attempts; last logs:\n{last_log}");
    }

    /// Comma-separated client URLs of all members, e.g. `http://127.0.0.1:40123`.
    pub fn endpoint(&self) -> String {
        let urls: Vec<_> = self.members.iter().map(|m| m.client_url.as_str()).collect();
        urls.join(",")
    }

    /// The client URL of member `i`.
    pub fn member_endpoint(&self, i: usize) -> String {
        self.members[i].client_url.clone()
    }

    /// Kills member `i` (abruptly, like a crash); its data stays.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Restarts member `i` on the same ports and data, and waits until it serves reads.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i, "existing");
        if let Err(why) = self.wait_ready(i) {
            panic!("etcd member {i} did not restart: {why}\n{}", self.logs());
        }
    }

    /// Index of the member that is the raft leader now.
    pub fn leader(&self) -> usize {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        runtime.block_on(async {
            for (i, m) in self.members.iter().enumerate() {
                if m.child.is_none() {
                    continue;
                }
                let Ok(mut client) = etcd_client::Client::connect([&m.client_url], None).await
                else {
                    continue;
                };
                if let Ok(status) = client.status().await {
                    let me = status.header().map(|h| h.member_id());
                    if me == Some(status.leader()) {
                        return i;
                    }
                }
            }
            panic!("no etcd member says it leads\n{}", self.logs());
        })
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// What every member has logged so far.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for m in &self.members {
            let log = std::fs::read_to_string(self.log_path(&m.name)).unwrap_or_default();
            out.push_str(&format!(
                "--- etcd {} ({}) ---\n{log}",
                m.name, m.client_url
            ));
        }
        out
    }

    fn new(bin: PathBuf, n: usize) -> Etcd {
        let ports = free_ports(2 * n);
        let members = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client_url: format!("http://127.0.0.1:{}", ports[2 * i]),
                peer_url: format!("http://127.0.0.1:{}", ports[2 * i + 1]),
                child: None,
            })
            .collect();
        Etcd {
            bin,
            members,
            dir: tempfile::tempdir().expect("tempdir for etcd"),
        }
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    /// Starts member `i` with `--initial-cluster-state=state`, its output appended to its log.
    fn spawn(&mut self, i: usize, state: &str) {
        let cluster: Vec<_> = self
            .members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url))
            .collect();
        let m = &self.members[i];
        let out = File::options()
            .create(true)
            .append(true)
            .open(self.log_path(&m.name))
            .expect("etcd log file");
        let err = out.try_clone().expect("etcd log file");
        let data = self.dir.path().join(format!("{}.data", m.name));
        let child = Command::new(&self.bin)
            .arg(format!("--name={}", m.name))
            .arg(format!("--data-dir={}", data.display()))
            .arg(format!("--listen-client-urls={}", m.client_url))
            .arg(format!("--advertise-client-urls={}", m.client_url))
            .arg(format!("--listen-peer-urls={}", m.peer_url))
            .arg(format!("--initial-advertise-peer-urls={}", m.peer_url))
            .arg(format!("--initial-cluster={}", cluster.join(",")))
            .arg(format!("--initial-cluster-state={state}"))
            .arg("--initial-cluster-token=ferrodisk-test")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.bin.display()));
        self.members[i].child = Some(child);
    }

    /// Waits until member `i` answers a read through [`EtcdStore`].
    fn wait_ready(&mut self, i: usize) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        let m = &mut self.members[i];
        loop {
            let child = m.child.as_mut().expect("member is running");
            if let Some(status) = child.try_wait().expect("poll etcd") {
                return Err(format!("etcd {} exited with {status}", m.name));
            }
            let answer = EtcdStore::connect(&m.client_url).and_then(|s| s.load("ready-probe"));
            match answer {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    return Err(format!(
                        "etcd {} gave no answer within {START_TIMEOUT:?}: {e}",
                        m.name
                    ))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// `/usr/bin/etcd`, or `etcd` on `PATH`; panics if neither exists.
fn etcd_binary() -> PathBuf {
    let default = PathBuf::from("/usr/bin/etcd");
    if default.is_file() {
        return default;
    }
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("etcd"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "etcd is required for these tests and was not found at /usr/bin/etcd or on PATH: \
             install Debian's `etcd-server` package (apt-get install etcd-server)"
        )
    })
}

/// `n` distinct loopback TCP ports that were free a moment ago (all bound at once, so they
/// differ, then released).
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local address").port())
        .collect()
}
