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

/// The indices of the 1 MiB regions where files `a` and `b` differ; panics if their sizes
/// differ.
fn differing_regions(a: &Path, b: &Path) -> Vec<u64> {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert_eq!(
        x.len(),
        y.len(),
        "{} and {} differ in size",
        a.display(),
        b.display()
    );
    x.chunks(MIB as usize)
        .zip(y.chunks(MIB as usize))
        .enumerate()
        .filter(|(_, (p, q))| p != q)
        .map(|(i, _)| i as u64)
        .collect()
}

/// The SHA-256 of a file, in hex (`sha256sum`).
fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success(), "sha256sum {}", path.display());
    String::from_utf8_lossy(&out.stdout)
        .split(' ')
        .next()
        .unwrap()
        .to_string()
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

    /// Replica `i`'s data directory.
    fn replica_data(&self, i: usize) -> PathBuf {
        self.dir.join(&format!("r{}", i + 1))
    }

    /// Replica `i`'s copy of the volume.
    fn replica_image(&self, i: usize) -> PathBuf {
        self.replica_data(i).join(format!("{VOLUME}.img"))
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

/// Issue #12: a wiped replica is rebuilt in full, and overlapping writes from two queues
/// land in the same order on every copy.
///
/// The guest (2 vCPUs, the disk on 2 queues; blk-mq maps CPU n to queue n) first fills the
/// whole 64 MiB disk with random data, so that a blank copy can never pass for a rebuilt
/// one. Then one fio run, 30 s, has four jobs at once:
/// - `verify-q0` and `verify-q1`, pinned to CPU 0 and 1: randwrite with crc32c
///   verification (verify_backlog) on MiB 0..16 and 16..32;
/// - `overlap-q0` and `overlap-q1`, pinned to CPU 0 and 1: random data (refilled for every
///   write, random offsets, 4 KiB and 64 KiB blocks) on the SAME range, MiB 48..52, without
///   verification: which write wins cannot be known, but it must be the same on every copy.
///
/// Meanwhile replica 2 is SIGKILLed, its whole data directory removed, and it is restarted
/// on the same port and directory; the test waits until both replicas are in sync again,
/// while fio still runs. Afterwards: fio exited 0 with no job in error, no I/O error in the
/// guest's dmesg, both queues carried writes, the primary stops cleanly, and the primary's
/// image and both replicas' images are identical byte for byte (and to what the guest read
/// back); `ferrodisk verify` agrees.
#[test]
fn guest_fio_verify_and_overlapping_writes_survive_a_wiped_replica() {
    const SIZE: u64 = 64 * MIB;
    const REGIONS: u64 = SIZE / MIB;
    /// The 1 MiB regions fio never writes after the prefill: 32..48 and 52..64.
    const UNTOUCHED: u64 = 28;
    let t_test = Instant::now();
    let mut c = Replicated::start("replication-wipe", SIZE);
    let t_setup = t_test.elapsed();
    let a2 = c.addrs[1].clone();

    let mut vm = Vm::new(&c.dir, "guest", VmDisk::only(&c.sock, 2));
    vm.smp = 2;
    vm.timeout = Duration::from_secs(150);
    let mut running = vm.spawn(
        r#"
step prefill fio --name=prefill --filename=/dev/vda --direct=1 --ioengine=libaio --rw=write \
    --bs=1M --iodepth=4 --size=64M --refill_buffers=1 --eta=never
echo FIO-START
step fio sh -c 'fio --eta=never --filename=/dev/vda --direct=1 --ioengine=libaio \
    --time_based=1 --runtime=30 --rw=randwrite --bssplit=4k/50:64k/50 \
    --name=verify-q0 --cpus_allowed=0 --offset=0 --size=16M --iodepth=16 \
        --verify=crc32c --verify_backlog=256 --verify_fatal=1 --verify_state_save=0 \
    --name=verify-q1 --cpus_allowed=1 --offset=16M --size=16M --iodepth=16 \
        --verify=crc32c --verify_backlog=256 --verify_fatal=1 --verify_state_save=0 \
    --name=overlap-q0 --cpus_allowed=0 --offset=48M --size=4M --iodepth=8 \
        --refill_buffers=1 --randrepeat=0 \
    --name=overlap-q1 --cpus_allowed=1 --offset=48M --size=4M --iodepth=8 \
        --refill_buffers=1 --randrepeat=0 \
    >/tmp/fio.out 2>&1; rc=$?; cat /tmp/fio.out; exit $rc'
kv jobs_ok "$(grep -c 'err= 0' /tmp/fio.out)"
kv jobs_failed "$(grep -cE 'err= *[1-9-]' /tmp/fio.out)"
dmesg >/tmp/dmesg
kv ioerrors "$(grep -ciE 'I/O error|blk_update_request|error, dev vd|Buffer I/O' /tmp/dmesg)"
kv sha256 "$(dd if=/dev/vda bs=1M iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)"
"#,
    );
    let t_fio = running.wait_for_console("FIO-START", Duration::from_secs(90));
    let fio_started = Instant::now();
    // Let every job write for a while, so that each range holds data r2 will lose.
    std::thread::sleep(Duration::from_secs(3));
    let counter = |h: &Value, name: &str| replica_health(h, &a2)[name].as_u64().unwrap_or(0);
    let before = c.health();
    let (compared_before, copied_before) = (
        counter(&before, "compared_regions"),
        counter(&before, "copied_regions"),
    );

    let t_kill = Instant::now();
    c.replicas[1].kill(libc::SIGKILL);
    let to_out = c.wait_health(
        Duration::from_secs(15),
        "r2 out of sync after SIGKILL",
        |h| replica_state(h, &a2) == "out-of-sync",
    );
    let data = c.replica_data(1);
    std::fs::remove_dir_all(&data).unwrap();
    assert!(!data.exists());
    c.restart_replica(1);
    let to_in_sync = c.wait_health(
        Duration::from_secs(60),
        "both replicas in sync after r2 came back wiped",
        |h| c.addrs.iter().all(|a| replica_state(h, a) == "in-sync"),
    );
    let down = t_kill.elapsed();
    let in_sync_at = fio_started.elapsed();
    assert!(
        !running
            .console_so_far()
            .contains("FERRODISK-STEP name=fio "),
        "fio ended before r2 was back in sync ({to_in_sync:?} after its restart): the rebuild \
         did not run under the guest's writes"
    );
    let h = c.health();
    let r = running.wait();
    let fio_for = fio_started.elapsed();
    r.assert_all_ok();
    assert_eq!(r.kv("jobs_ok"), "4", "fio: 4 jobs with err= 0");
    assert_eq!(r.kv("jobs_failed"), "0", "fio: jobs in error");
    assert_eq!(r.kv("ioerrors"), "0", "the guest logged I/O errors");

    let stats = c.stop_primary();
    assert_eq!(total(&stats, &c.sock, "errors_ioerr"), 0);
    let q_writes = [0, 1].map(|q| per_queue(&stats, &c.sock, q, "writes"));
    assert!(
        q_writes.iter().all(|&w| w > 0),
        "both queues must carry writes: {q_writes:?}"
    );

    // Byte for byte: the primary's image against each replica's.
    let diffs: Vec<Vec<u64>> = (0..2)
        .map(|i| differing_regions(&c.img, &c.replica_image(i)))
        .collect();
    let compared = counter(&h, "compared_regions").saturating_sub(compared_before);
    let copied = counter(&h, "copied_regions").saturating_sub(copied_before);
    eprintln!(
        "replication-wipe: setup {t_setup:.1?}, boot+prefill {t_fio:.1?}, fio {fio_for:.1?}; \
         r2 killed at +3 s of fio, out of sync after {to_out:.1?}, in sync {to_in_sync:.1?} \
         after its restart ({down:.1?} after the kill, at +{in_sync_at:.1?} of fio); \
         regions compared {compared} and copied {copied} to r2; writes per queue \
         {q_writes:?}; differing MiB regions: r1 {:?}, r2 {:?}; total {:.1?}",
        diffs[0],
        diffs[1],
        t_test.elapsed()
    );
    for (i, d) in diffs.iter().enumerate() {
        assert!(
            d.is_empty(),
            "r{}'s copy differs from the primary's in {} of {REGIONS} MiB regions: {d:?} \
             (verified ranges 0..32, overlapping writes 48..52)",
            i + 1,
            d.len()
        );
    }
    assert_eq!(
        r.kv("sha256"),
        sha256(&c.img),
        "what the guest read back differs from the primary's image"
    );
    // A full rebuild compares every region. It copies at least every region that only the
    // prefill wrote (MiB 32..48 and 52..64, UNTOUCHED of them); the others may already be
    // equal through the guest writes forwarded to r2 during the rebuild (the 4 MiB that the
    // overlap jobs rewrite many times over often are).
    assert!(
        compared >= REGIONS && copied >= UNTOUCHED,
        "the wiped r2 must be rebuilt in full: {compared} regions compared (of {REGIONS}), \
         {copied} copied (at least {UNTOUCHED} hold data only the primary has)"
    );
    c.verify();
}
