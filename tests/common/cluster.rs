//! A replicated cluster on one host for multi-process tests: `ferrodisk replica` servers on
//! loopback, `ferrodisk serve` primaries, the authority (a file, or a real etcd), the health
//! endpoint, a libblkio writer that records every acknowledged write ([`Model`], [`Writer`]),
//! and the fault helpers (network namespaces, size-limited file systems).
//!
//! Every process is a [`Proc`], killed on drop; every wait is bounded.
//!
//! Include it next to `common` and `etcd`:
//! ```ignore
//! mod common;
//! #[path = "common/etcd.rs"]
//! mod etcd;
//! #[path = "common/cluster.rs"]
//! mod cluster;
//! ```

#![allow(dead_code)]

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use blkio::ReqFlags;

use crate::common::{signal, Client, Rng, BIN};
use crate::etcd::Etcd;

pub const SIZE: u64 = 64 << 20;
pub const VOLUME: &str = "vol1";

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed on drop, with its stderr in a log file.
pub struct Proc {
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(cmd: &mut Command, log: &Path) -> Proc {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = cmd
            .stdout(Stdio::null())
            .stderr(f)
            .env("FERRODISK_LOG", "info")
            .spawn()
            .expect("spawn ferrodisk");
        Proc {
            child: Some(child),
            log: log.to_path_buf(),
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        signal(&c, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "no exit within 30 s after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process id (it must be running).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Waits up to `limit` for the process to exit; `None` if it still runs.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.as_mut().expect("running").try_wait().unwrap() {
                self.child = None;
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then the exit status within `limit` (killed and `None` if it takes longer).
    pub fn terminate_within(&mut self, limit: Duration) -> Option<ExitStatus> {
        signal(self.child.as_ref().expect("running"), libc::SIGTERM);
        let s = self.wait_exit(limit);
        if s.is_none() {
            self.kill();
        }
        s
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct Env {
    pub dir: tempfile::TempDir,
    pub key: PathBuf,
    /// How every process of the cluster secures its replica links: `--replication-key
    /// KEY` by default, the TLS files after [`Env::use_tls`].
    pub link: Vec<std::ffi::OsString>,
    pub authority: String,
    pub etcd: Option<Etcd>,
}

impl Env {
    pub fn new(use_etcd: bool) -> Env {
        // FERRODISK_KEEP_TEST_DIR=1 keeps the directory (logs, images) for a post-mortem.
        let mut builder = tempfile::Builder::new();
        builder.disable_cleanup(std::env::var_os("FERRODISK_KEEP_TEST_DIR").is_some());
        let dir = builder.tempdir().unwrap();
        let key = dir.path().join("key");
        std::fs::write(&key, b"0123456789abcdef0123456789abcdef").unwrap();
        let (authority, etcd) = if use_etcd {
            let e = Etcd::start();
            (format!("etcd:{}", e.endpoint()), Some(e))
        } else {
            (
                format!("file:{}", dir.path().join("authority").display()),
                None,
            )
        };
        Env {
            dir,
            link: vec!["--replication-key".into(), key.clone().into()],
            key,
            authority,
            etcd,
        }
    }

    /// Secures the cluster's links with TLS: every process gets `--tls-cert`, `--tls-key`
    /// and `--tls-ca` from [`Env::tls_files`] for host `host`, signed by CA `ca`.
    pub fn use_tls(&mut self, ca: &str, host: &str) {
        let (cert, key, ca) = self.tls_files(ca, host);
        self.link = vec![
            "--tls-cert".into(),
            cert.into(),
            "--tls-key".into(),
            key.into(),
            "--tls-ca".into(),
            ca.into(),
        ];
    }

    /// Writes (once) a CA `ca` and a certificate for `host` (names `host`, `localhost`
    /// and 127.0.0.1, for servers and clients) signed by it; returns the cert, key and CA
    /// files.
    pub fn tls_files(&self, ca: &str, host: &str) -> (PathBuf, PathBuf, PathBuf) {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        };
        let dir = self.path(&format!("tls-{ca}"));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("ferrodisk test CA {ca}"));
        let ca_cert = params.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let names = vec![host.to_string(), "localhost".into(), "127.0.0.1".into()];
        let mut params = CertificateParams::new(names).unwrap();
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &ca_cert, &ca_key).unwrap();
        let files = (
            dir.join(format!("{host}.crt")),
            dir.join(format!("{host}.key")),
            dir.join("ca.crt"),
        );
        std::fs::write(&files.0, cert.pem()).unwrap();
        std::fs::write(&files.1, key.serialize_pem()).unwrap();
        std::fs::write(&files.2, ca_cert.pem()).unwrap();
        files
    }

    /// The volume's record in the authority (file or etcd).
    pub fn record(&self) -> ferrodisk::repl::authority::VolumeRecord {
        ferrodisk::repl::authority::Authority::open(&self.authority)
            .unwrap()
            .load(VOLUME)
            .unwrap()
            .expect("the volume is in the authority")
            .record
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn replica(&self, name: &str, port: u16) -> Proc {
        self.replica_with(name, port, &[], &[])
    }

    /// A replica server run under `wrapper` (a program and its arguments, e.g. `prlimit
    /// --nofile=N --`), with `extra` arguments.
    pub fn replica_with(&self, name: &str, port: u16, wrapper: &[&str], extra: &[&str]) -> Proc {
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        cmd.arg("replica")
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data")
            .arg(self.path(name))
            .args(&self.link)
            .args(extra);
        let p = Proc::spawn(&mut cmd, &self.path(&format!("{name}.log")));
        wait_until(Duration::from_secs(10), "replica listening", || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        p
    }

    /// Starts a primary serving `image` on `socket`; waits for the socket.
    pub fn primary(
        &self,
        node: &str,
        image: &Path,
        socket: &Path,
        replicas: &[u16],
        health: u16,
        extra: &str,
    ) -> Proc {
        let mut cmd = self.primary_command(node, image, socket, replicas, health, extra);
        let log = self.path(&format!("primary-{node}.log"));
        let mut p = self.spawn_primary(&mut cmd, socket, &log);
        if let Err(e) = wait_for_socket(&mut p, socket, Duration::from_secs(30)) {
            panic!("{e}");
        }
        p
    }

    /// The `ferrodisk serve` command of a primary (see [`Env::primary`]), to start it
    /// another way.
    pub fn primary_command(
        &self,
        node: &str,
        image: &Path,
        socket: &Path,
        replicas: &[u16],
        health: u16,
        extra: &str,
    ) -> Command {
        let list: Vec<String> = replicas.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .arg("--authority")
            .arg(&self.authority)
            .arg("--node")
            .arg(node)
            .args(&self.link)
            .arg("--health")
            .arg(format!("127.0.0.1:{health}"))
            .arg("--disk")
            .arg(format!(
                "path={},socket={},volume={VOLUME},replicas={},replica-timeout-ms=1000{extra}",
                image.display(),
                socket.display(),
                list.join("+")
            ));
        cmd
    }

    /// Spawns a primary's command with its log in `log`, after removing a stale `socket`;
    /// does not wait.
    pub fn spawn_primary(&self, cmd: &mut Command, socket: &Path, log: &Path) -> Proc {
        let _ = std::fs::remove_file(socket);
        Proc::spawn(cmd, log)
    }

    /// The data directory of the replica server `name` (its `--data`).
    pub fn replica_dir(&self, name: &str) -> PathBuf {
        self.path(name)
    }

    /// The replica server `name`'s copy of the volume.
    pub fn replica_image(&self, name: &str) -> PathBuf {
        self.path(name).join(format!("{VOLUME}.img"))
    }

    pub fn ferrodisk(&self, args: &[&str]) -> (i32, String) {
        let out = Command::new(BIN)
            .args(args)
            .args(&self.link)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// `ferrodisk promote` of the replica on `port` to node `node`, with `extra` options.
    pub fn promote(&self, port: u16, node: &str, extra: &[&str]) -> (i32, String) {
        let replica = format!("127.0.0.1:{port}");
        let mut args = vec![
            "promote",
            "--authority",
            &self.authority,
            "--volume",
            VOLUME,
            "--replica",
            &replica,
            "--node",
            node,
        ];
        args.extend_from_slice(extra);
        self.ferrodisk(&args)
    }

    pub fn verify(&self, image: &Path, replicas: &[u16]) -> (i32, String) {
        let list: Vec<String> = replicas.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        self.ferrodisk(&[
            "verify",
            "--image",
            image.to_str().unwrap(),
            "--volume",
            VOLUME,
            "--replicas",
            &list.join("+"),
        ])
    }
}

/// Waits until `socket` exists; `Err` (with the log) if `p` exits first or time runs out.
pub fn wait_for_socket(p: &mut Proc, socket: &Path, limit: Duration) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    while !socket.exists() {
        if let Some(s) = p.child.as_mut().expect("running").try_wait().unwrap() {
            return Err(format!("primary exited early ({s}):\n{}", p.log()));
        }
        if Instant::now() >= deadline {
            return Err(format!("no socket within {limit:?}:\n{}", p.log()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

pub fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The primary's health document (waiting for the endpoint to come up).
pub fn health(port: u16) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match ferrodisk::repl::tools::query_health(&format!("127.0.0.1:{port}")) {
            Ok(Some((_, doc))) => return doc,
            other => assert!(Instant::now() < deadline, "health endpoint: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The health document's entry for the replica at `addr`.
pub fn replica_health(port: u16, addr: &str) -> serde_json::Value {
    health(port)["volumes"][0]["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["addr"] == addr)
        .cloned()
        .unwrap_or_else(|| panic!("no replica {addr} in the health document"))
}

pub fn replica_state(port: u16, replica: u16) -> (String, u64, u64) {
    let r = replica_health(port, &format!("127.0.0.1:{replica}"));
    (
        r["state"].as_str().unwrap().to_string(),
        r["dirty_regions"].as_u64().unwrap(),
        r["copied_regions"].as_u64().unwrap(),
    )
}

pub fn wait_in_sync(health_port: u16, replicas: &[u16], limit: Duration) {
    for &r in replicas {
        wait_until(limit, &format!("replica {r} in sync"), || {
            replica_state(health_port, r).0 == "in-sync"
        });
    }
}

/// What the client knows: the content of every acknowledged write, and the ranges whose
/// last write failed (either old or new content is acceptable there).
#[derive(Clone)]
pub struct Model {
    pub data: Vec<u8>,
    pub unknown: Vec<bool>,
    pub acked: u64,
    pub failed: u64,
}

impl Model {
    pub fn new(initial: Vec<u8>) -> Model {
        let n = initial.len() / 512;
        Model {
            data: initial,
            unknown: vec![false; n],
            acked: 0,
            failed: 0,
        }
    }

    /// Records an acknowledged write of `data` at `offset`.
    pub fn record(&mut self, offset: u64, data: &[u8]) {
        let o = offset as usize;
        self.data[o..o + data.len()].copy_from_slice(data);
        for s in o / 512..(o + data.len()) / 512 {
            self.unknown[s] = false;
        }
        self.acked += 1;
    }

    /// Checks every acknowledged write against `actual`; returns the bad sectors.
    pub fn mismatches(&self, actual: &[u8]) -> Vec<u64> {
        assert_eq!(actual.len(), self.data.len());
        (0..self.unknown.len())
            .filter(|&s| {
                !self.unknown[s]
                    && actual[s * 512..(s + 1) * 512] != self.data[s * 512..(s + 1) * 512]
            })
            .map(|s| s as u64)
            .collect()
    }

    pub fn check(&self, what: &str, actual: &[u8]) {
        let bad = self.mismatches(actual);
        assert!(
            bad.is_empty(),
            "{what}: {} sectors differ from acknowledged writes (first: sector {}); {} writes acknowledged",
            bad.len(),
            bad[0],
            self.acked
        );
    }
}

/// A client thread writing random data until stopped.
pub struct Writer {
    pub stop: Arc<AtomicBool>,
    pub model: Arc<Mutex<Model>>,
    pub acked: Arc<AtomicU64>,
    pub thread: Option<JoinHandle<()>>,
}

impl Writer {
    /// Writes 4-64 KiB at random 4 KiB-aligned offsets in the first `span` bytes.
    pub fn start(socket: &Path, model: Model, seed: u64, span: u64) -> Writer {
        Writer::spawn(socket, model, seed, span, false)
    }

    /// As [`Writer::start`], for a daemon whose writes may stall (an unreachable authority)
    /// or never complete (the daemon goes away): a write without a completion is waited
    /// for without a time limit but stays unknown in the model, and the thread ends as soon
    /// as it is stopped, even with that write in flight, or when the connection fails.
    pub fn start_patient(socket: &Path, model: Model, seed: u64, span: u64) -> Writer {
        Writer::spawn(socket, model, seed, span, true)
    }

    fn spawn(socket: &Path, model: Model, seed: u64, span: u64, patient: bool) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let model = Arc::new(Mutex::new(model));
        let (s, m, a, sock) = (
            Arc::clone(&stop),
            Arc::clone(&model),
            Arc::clone(&acked),
            socket.to_path_buf(),
        );
        let thread = std::thread::spawn(move || {
            let mut c = Client::connect(&sock, 1, false).expect("connect");
            let mut rng = Rng(seed);
            let mut data = vec![0u8; 64 << 10];
            while !s.load(Ordering::Relaxed) {
                let len = (1 + rng.below(16) as usize) * 4096;
                let offset = rng.below((span - len as u64) / 4096) * 4096;
                rng.fill(&mut data[..len]);
                let (o, l) = (offset as usize, len);
                // In flight: either content is acceptable until the write is acknowledged.
                {
                    let mut m = m.lock().unwrap();
                    for sct in o / 512..(o + l) / 512 {
                        m.unknown[sct] = true;
                    }
                }
                let r = if patient {
                    match patient_write(&mut c, offset, &data[..len], &s) {
                        Some(r) => r,
                        None => return, // stopped or disconnected: the write stays unknown
                    }
                } else {
                    c.write(0, offset, &data[..len], ReqFlags::empty())
                };
                let mut m = m.lock().unwrap();
                if r == 0 {
                    m.data[o..o + l].copy_from_slice(&data[..len]);
                    for sct in o / 512..(o + l) / 512 {
                        m.unknown[sct] = false;
                    }
                    m.acked += 1;
                    a.fetch_add(1, Ordering::Relaxed);
                } else {
                    m.failed += 1;
                }
            }
        });
        Writer {
            stop,
            model,
            acked,
            thread: Some(thread),
        }
    }

    pub fn wait_acked(&self, n: u64) {
        let start = self.acked.load(Ordering::Relaxed);
        wait_until(Duration::from_secs(60), &format!("{n} more writes"), || {
            self.acked.load(Ordering::Relaxed) >= start + n
        });
    }

    pub fn finish(mut self) -> Model {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("writer thread");
        }
        self.model.lock().unwrap().clone()
    }
}

/// Writes `data` at `offset` on queue 0 and waits for its completion in slices of 200 ms;
/// `None` once `stop` is set or the connection fails before the write completes.
fn patient_write(c: &mut Client, offset: u64, data: &[u8], stop: &AtomicBool) -> Option<i32> {
    c.buf()[..data.len()].copy_from_slice(data);
    let p = c.buf;
    c.queues[0].write(offset, p, data.len(), 0, ReqFlags::empty());
    loop {
        let mut done = [std::mem::MaybeUninit::<blkio::Completion>::uninit()];
        let mut slice = Duration::from_millis(200);
        match c.queues[0].do_io(&mut done, 1, Some(&mut slice), None) {
            // SAFETY: do_io initialized the first completion.
            Ok(1) => return Some(unsafe { done[0].assume_init_read() }.ret),
            Ok(_) => {}
            Err(e) if e.errno() == blkio::Errno::TIME => {}
            Err(_) => return None,
        }
        if stop.load(Ordering::Relaxed) {
            return None;
        }
    }
}

pub fn make_image(path: &Path, fill: Option<u64>) -> Vec<u8> {
    let mut data = vec![0u8; SIZE as usize];
    if let Some(seed) = fill {
        Rng(seed).fill(&mut data);
    }
    std::fs::write(path, &data).unwrap();
    data
}

pub fn read_file(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

/// A network namespace with a veth pair to the test's namespace: a replica host on a
/// network that the test can cut. Removed on drop.
pub struct NetNs {
    pub name: String,
    pub host_if: String,
    pub ns_if: String,
    pub addr: String,
}

pub fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("`ip` (iproute2) is needed for the partition test: {e}"));
    assert!(
        out.status.success(),
        "ip {}: {} (the partition test needs root and iproute2)",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl NetNs {
    pub fn create() -> NetNs {
        // Distinct for each namespace of this process (tests run in parallel).
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = (std::process::id() * 2 + n) % 200 + 20;
        let name = format!("fdtest{id}");
        let (host_if, ns_if) = (format!("fdh{id}"), format!("fdn{id}"));
        // Leftovers of a crashed earlier run with the same id.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let _ = Command::new("ip").args(["link", "del", &host_if]).output();
        let net = format!("10.231.{id}");
        ip(&["netns", "add", &name]);
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ]);
        ip(&["link", "set", &ns_if, "netns", &name]);
        ip(&["addr", "add", &format!("{net}.1/24"), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        ip(&[
            "-n",
            &name,
            "addr",
            "add",
            &format!("{net}.2/24"),
            "dev",
            &ns_if,
        ]);
        ip(&["-n", &name, "link", "set", &ns_if, "up"]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        NetNs {
            name,
            host_if,
            ns_if,
            addr: format!("{net}.2"),
        }
    }

    /// Cuts the link: packets in both directions are lost (no reset, no error to the peer).
    pub fn partition(&self) {
        ip(&["-n", &self.name, "link", "set", &self.ns_if, "down"]);
    }

    pub fn heal(&self) {
        ip(&["-n", &self.name, "link", "set", &self.ns_if, "up"]);
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A size-limited tmpfs mounted for the test (root only); unmounted on drop.
pub struct SmallFs {
    pub dir: PathBuf,
}

impl SmallFs {
    pub fn mount(dir: &Path, bytes: u64) -> SmallFs {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir)
            .output()
            .unwrap_or_else(|e| panic!("`mount` is needed for the disk-error test: {e}"));
        assert!(
            out.status.success(),
            "mount -t tmpfs (the disk-error test needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallFs {
            dir: dir.to_path_buf(),
        }
    }

    /// Writes `name` until the filesystem is full; returns the bytes written.
    pub fn fill(&self, name: &str) -> u64 {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(name))
            .unwrap();
        let chunk = vec![0xeeu8; 4096];
        let mut n = 0;
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(k) => n += k as u64,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", self.dir.display()),
            }
        }
        n
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).output();
    }
}
