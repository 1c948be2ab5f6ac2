//! The sandbox seen from outside: a `ferrodisk serve` process's queue workers and a
//! `ferrodisk replica` process's connection threads run under a seccomp filter of their own
//! (`Seccomp: 2` in /proc), the other threads do not (no TSYNC), and `--seccomp off` turns
//! it off. The filters' contents are tested in `src/seccomp.rs`; the test suites
//! (blkio_frontend, durability, replication, the QEMU guests) run with the default filter.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blkio::ReqFlags;
use common::*;
use tempfile::TempDir;

/// `(tid, name, Seccomp mode)` of each thread of `pid`.
fn threads(pid: u32) -> Vec<(u32, String, u32)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in dir.flatten() {
        let tid: u32 = t.file_name().to_string_lossy().parse().unwrap();
        let Ok(status) = std::fs::read_to_string(t.path().join("status")) else {
            continue; // the thread ended meanwhile
        };
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        let mode = field("Seccomp:").parse().unwrap();
        out.push((tid, field("Name:"), mode));
    }
    out
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(dir: &Path, mode: &str) -> (Killed, std::path::PathBuf) {
    let img = dir.join("disk.img");
    let sock = dir.join("disk.sock");
    make_image(&img, 16 << 20);
    let child = Command::new(BIN)
        .arg("serve")
        .arg("--disk")
        .arg(format!(
            "path={},socket={},queues=2",
            img.display(),
            sock.display()
        ))
        .arg(format!("--seccomp={mode}"))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "no socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    (Killed(child), sock)
}

/// Serves two queues to a libblkio client, then returns the daemon's workers' seccomp
/// modes and the main thread's.
fn worker_modes(mode: &str) -> (Vec<u32>, u32) {
    let dir = TempDir::new().unwrap();
    let (d, sock) = serve(dir.path(), mode);
    let mut c = Client::connect(&sock, 2, false).expect("connect");
    for q in 0..2 {
        let data = vec![q as u8 + 1; 4096];
        assert_eq!(c.write(q, 4096 * q as u64, &data, ReqFlags::empty()), 0);
        assert_eq!(c.read(q, 4096 * q as u64, 4096).unwrap(), data);
    }
    let pid = d.0.id();
    let all = threads(pid);
    let workers: Vec<u32> = all
        .iter()
        .filter(|t| t.1 == "vring_worker")
        .map(|t| t.2)
        .collect();
    let main = all.iter().find(|t| t.0 == pid).unwrap().2;
    drop(c);
    (workers, main)
}

#[test]
fn queue_workers_serve_under_their_own_filter() {
    let (workers, main) = worker_modes("trap");
    assert_eq!(workers, vec![2, 2], "one filtered worker per queue");
    assert_eq!(main, 0, "the filter is the workers' own (no TSYNC)");
    let (workers, _) = worker_modes("kill");
    assert_eq!(workers, vec![2, 2]);
    let (workers, main) = worker_modes("off");
    assert_eq!((workers, main), (vec![0, 0], 0), "--seccomp=off");
}

#[test]
fn replica_connection_threads_run_under_their_filter() {
    let dir = TempDir::new().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, b"0123456789abcdef0123456789abcdef").unwrap();
    let data = dir.path().join("data");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let r = Killed(
        Command::new(BIN)
            .args(["replica", "--listen", &addr, "--data"])
            .arg(&data)
            .arg("--replication-key")
            .arg(&key)
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let _conn = loop {
        match std::net::TcpStream::connect(&addr) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("replica not listening: {e}"),
        }
    };
    // The connection thread waits for the handshake. It has its name from the start and
    // installs its filter first thing: wait (bounded) until it has.
    let pid = r.0.id();
    let conn = loop {
        let all = threads(pid);
        let main = all.iter().find(|t| t.0 == pid).unwrap().2;
        let conn = all.iter().find(|t| t.1.starts_with("replica-"));
        if let Some(&(_, _, 2)) = conn {
            break (2, main);
        }
        assert!(
            Instant::now() < deadline,
            "no filtered connection thread: {all:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(conn, (2, 0), "connection thread filtered, main thread not");
}
