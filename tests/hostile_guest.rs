//! A guest that does what no well-behaved driver does, played by a hand-driven virtqueue
//! (see `common/raw_guest.rs`) against a real `ferrodisk serve`: a head offered twice,
//! requests of zero bytes, requests larger than the device advertises. Each gets a clear
//! answer, the daemon's own state stays whole, and the disk keeps working.

#[path = "common/cluster.rs"]
mod cluster;
mod common;
#[path = "common/etcd.rs"]
mod etcd;
#[path = "common/raw_guest.rs"]
mod raw_guest;

use std::time::Duration;

use cluster::{free_port, health, wait_in_sync, wait_until, Env, SIZE};
use common::*;
use raw_guest::*;
use tempfile::TempDir;

const MIB: u64 = 1 << 20;
const LIMIT: Duration = Duration::from_secs(20);

fn file_disk(dir: &TempDir, extra: &str) -> (std::path::PathBuf, std::path::PathBuf, Daemon) {
    let img = dir.path().join("disk.img");
    let sock = dir.path().join("disk.sock");
    make_image(&img, 16 * MIB);
    let spec = format!("path={},socket={}{extra}", img.display(), sock.display());
    let d = Daemon::start(&[spec], &sock);
    (img, sock, d)
}

/// A write of `len` bytes of `fill` at `sector`, as chain `first..first+3`: header, data,
/// status (header at `at`, data at `at + 0x1000`, status at `at + 0xff0`).
fn write_chain(g: &RawGuest, first: u16, at: u64, sector: u64, len: u32, fill: u8) {
    g.header(at, T_OUT, sector);
    g.write(at + 0x1000, &vec![fill; len as usize]);
    g.write(at + 0xff0, &[0xee]);
    g.desc(first, at, 16, F_NEXT, first + 1);
    g.desc(first + 1, at + 0x1000, len, F_NEXT, first + 2);
    g.desc(first + 2, at + 0xff0, 1, F_WRITE, 0);
}

/// A read of `len` bytes at `sector` into `at + 0x1000`, as chain `first..first+3`.
fn read_chain(g: &RawGuest, first: u16, at: u64, sector: u64, len: u32) {
    g.header(at, T_IN, sector);
    g.write(at + 0xff0, &[0xee]);
    g.desc(first, at, 16, F_NEXT, first + 1);
    g.desc(first + 1, at + 0x1000, len, F_NEXT | F_WRITE, first + 2);
    g.desc(first + 2, at + 0xff0, 1, F_WRITE, 0);
}

fn status(g: &RawGuest, at: u64) -> u8 {
    g.read(at + 0xff0, 1)[0]
}

/// A head offered again while its first request is in flight: the second offer is refused
/// (IOERR in its status byte, no used element), the first completes normally and exactly
/// once, and the queue is not left with a phantom request (a later stop does not wait).
#[test]
fn a_head_offered_twice_is_refused_and_the_first_request_is_untouched() {
    let dir = TempDir::new().unwrap();
    // A delay in the engine would make the overlap certain; a null-free file disk with
    // many requests in one offer does it too: both offers are in one batch.
    let (img, sock, mut d) = file_disk(&dir, ",poll-us=0");
    let mut g = RawGuest::connect(&sock, 64, 4 * MIB as usize);
    write_chain(&g, 0, DATA, 8, 4096, 0x5a);
    // Head 0 twice in one offer: the second is popped while the first is in flight.
    g.offer(&[0, 0]);
    let used = g.wait_used(1, LIMIT);
    std::thread::sleep(Duration::from_millis(300));
    let used_after = g.used();
    assert_eq!(
        used_after.len(),
        1,
        "one used element for head 0, not two: {used:?} then {used_after:?}"
    );
    assert_eq!(used_after[0].0, 0);
    // The write happened once, with its data.
    let disk = std::fs::read(&img).unwrap();
    assert_eq!(&disk[4096..8192], &[0x5au8; 4096][..]);
    // The queue still works and the head is free again.
    read_chain(&g, 0, DATA + 0x4000, 8, 4096);
    g.offer(&[0]);
    let used = g.wait_used(2, LIMIT);
    assert_eq!(used[1], (0, 4097));
    assert_eq!(status(&g, DATA + 0x4000), 0);
    assert_eq!(g.read(DATA + 0x5000, 4096), vec![0x5au8; 4096]);
    drop(g);
    // A clean stop does not wait for a phantom request.
    let child = d.child.as_mut().unwrap();
    // SAFETY: sends SIGTERM to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let start = std::time::Instant::now();
    let st = child.wait().unwrap();
    assert!(st.success(), "daemon exit: {st:?}");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "stopping waited {:?} for a request that is not there",
        start.elapsed()
    );
}

/// Requests of zero bytes complete OK at once and touch nothing.
#[test]
fn zero_length_requests_are_answered_locally() {
    let dir = TempDir::new().unwrap();
    let (img, sock, _d) = file_disk(&dir, "");
    std::fs::write(&img, vec![0x11u8; 16 * MIB as usize]).unwrap();
    let mut g = RawGuest::connect(&sock, 64, 4 * MIB as usize);
    let mut heads = Vec::new();
    for (i, t) in [T_DISCARD, T_WRITE_ZEROES].into_iter().enumerate() {
        let at = DATA + 0x10000 * i as u64;
        let first = 3 * i as u16;
        g.header(at, t, 0);
        g.segment(at + 0x1000, 8, 0, 0);
        g.write(at + 0xff0, &[0xee]);
        g.desc(first, at, 16, F_NEXT, first + 1);
        g.desc(first + 1, at + 0x1000, 16, F_NEXT, first + 2);
        g.desc(first + 2, at + 0xff0, 1, F_WRITE, 0);
        heads.push(first);
    }
    g.offer(&heads);
    g.wait_used(2, LIMIT);
    for i in 0..2 {
        assert_eq!(status(&g, DATA + 0x10000 * i), 0, "request {i}");
    }
    assert_eq!(
        std::fs::read(&img).unwrap(),
        vec![0x11u8; 16 * MIB as usize]
    );
}

/// A write larger than the device advertises (descriptors may all point at one buffer) is
/// refused with IOERR; one at the limit works.
#[test]
fn a_request_larger_than_advertised_is_refused() {
    let dir = TempDir::new().unwrap();
    let (_img, sock, _d) = file_disk(&dir, "");
    let mut g = RawGuest::connect(&sock, 64, 8 * MIB as usize);
    let buf = 2 * MIB;
    let chain = |first: u16, at: u64, pieces: u16| {
        g.header(at, T_OUT, 0);
        g.write(at + 0xff0, &[0xee]);
        g.desc(first, at, 16, F_NEXT, first + 1);
        for k in 0..pieces {
            g.desc(first + 1 + k, buf, 2 * MIB as u32, F_NEXT, first + 2 + k);
        }
        g.desc(first + 1 + pieces, at + 0xff0, 1, F_WRITE, 0);
    };
    chain(0, DATA, 2); // 4 MiB: the limit
    chain(10, DATA + 0x4000, 3); // 6 MiB
    g.offer(&[0, 10]);
    g.wait_used(2, LIMIT);
    assert_eq!(status(&g, DATA), 0);
    assert_eq!(status(&g, DATA + 0x4000), 1, "VIRTIO_BLK_S_IOERR");
}

fn vm_rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

/// On a replicated disk every write is copied (the replicas and the local write send the
/// same bytes). With the replicas stopped, nothing completes, and a guest that keeps the
/// whole queue full of the largest writes must not make the daemon hold more than the
/// queue's copy budget (64 MiB, docs/architecture.md) plus its fixed cost.
#[test]
fn a_queue_full_of_large_writes_stays_within_the_copy_budget() {
    let env = Env::new(false);
    let (p1, hp) = (free_port(), free_port());
    let mut r1 = env.replica("r1", p1);
    let img = env.path("img");
    cluster::make_image(&img, None);
    let sock = env.path("s.sock");
    // The fixture's primary gives up on a silent replica after 1 s; this one waits 10 s,
    // so the writes stay in flight while the memory is measured.
    let mut cmd = std::process::Command::new(BIN);
    cmd.arg("serve")
        .arg("--authority")
        .arg(&env.authority)
        .arg("--node")
        .arg("a")
        .arg("--replication-key")
        .arg(&env.key)
        .arg("--health")
        .arg(format!("127.0.0.1:{hp}"))
        .arg("--disk")
        .arg(format!(
            "path={},socket={},volume={},replicas=127.0.0.1:{p1},replica-timeout-ms=10000,\
             queue-size=256",
            img.display(),
            sock.display(),
            cluster::VOLUME
        ));
    let mut primary = env.spawn_primary(&mut cmd, &sock, &env.path("primary-a.log"));
    if let Err(e) = cluster::wait_for_socket(&mut primary, &sock, Duration::from_secs(30)) {
        panic!("{e}");
    }
    wait_in_sync(hp, &[p1], Duration::from_secs(30));
    let mut g = RawGuest::connect(&sock, 256, 8 * MIB as usize);
    // Freeze the replica: the writes wait for it, and the budget is what bounds the
    // copies meanwhile.
    let base = vm_rss_kib(primary.pid());
    // SAFETY: stops our own child process.
    unsafe { libc::kill(r1.pid() as i32, libc::SIGSTOP) };
    let buf = 4 * MIB;
    let mut heads = Vec::new();
    for h in 0..84u16 {
        // 84 chains of header, one 4 MiB buffer (shared by all), status.
        let first = 3 * h;
        let at = DATA + 0x40 * u64::from(h);
        g.header(
            at,
            T_OUT,
            (u64::from(h) * 4 * MIB / 512) % (SIZE / 512 - 8192),
        );
        g.desc(first, at, 16, F_NEXT, first + 1);
        g.desc(first + 1, buf, 4 * MIB as u32, F_NEXT, first + 2);
        g.desc(first + 2, at + 0x20, 1, F_WRITE, 0);
        heads.push(first);
    }
    g.offer(&heads);
    let mut peak = 0;
    for _ in 0..100 {
        peak = peak.max(vm_rss_kib(primary.pid()));
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: resumes our own child process.
    unsafe { libc::kill(r1.pid() as i32, libc::SIGCONT) };
    let grown_mib = peak.saturating_sub(base) / 1024;
    eprintln!("RSS grew by {grown_mib} MiB with the queue full of 4 MiB writes");
    // The copies (64 MiB) plus the link's send buffer of the same frames, and slack.
    assert!(
        grown_mib < 160,
        "the daemon grew by {grown_mib} MiB with 84 writes of 4 MiB in flight (336 MiB \
         unbounded)"
    );
    // Once the replica is back, copies are given back as writes complete, and the queue
    // takes more than its budget's worth (16 of these) in the end.
    g.wait_used(24, Duration::from_secs(60));
    wait_until(Duration::from_secs(30), "health answers", || {
        !health(hp).is_null()
    });
    r1.kill();
}

/// On a replicated disk, a zero-length discard used to reach the replicas, whose
/// fallocate of 0 bytes failed: the replica was declared failed (and the authority
/// written) on every such request.
#[test]
fn zero_length_requests_never_reach_the_replicas() {
    let env = Env::new(false);
    let (p1, hp) = (free_port(), free_port());
    let _r1 = env.replica("r1", p1);
    let img = env.path("img");
    cluster::make_image(&img, None);
    let sock = env.path("s.sock");
    let _primary = env.primary("a", &img, &sock, &[p1], hp, "");
    wait_in_sync(hp, &[p1], Duration::from_secs(30));
    let mut g = RawGuest::connect(&sock, 64, 4 * MIB as usize);
    let mut heads = Vec::new();
    for i in 0..20u16 {
        let at = DATA + 0x1000 * u64::from(i);
        g.header(
            at,
            if i % 2 == 0 {
                T_DISCARD
            } else {
                T_WRITE_ZEROES
            },
            0,
        );
        g.segment(at + 0x100, 8, 0, 0);
        g.write(at + 0xff0, &[0xee]);
        g.desc(3 * i, at, 16, F_NEXT, 3 * i + 1);
        g.desc(3 * i + 1, at + 0x100, 16, F_NEXT, 3 * i + 2);
        g.desc(3 * i + 2, at + 0xff0, 1, F_WRITE, 0);
        heads.push(3 * i);
    }
    g.offer(&heads);
    g.wait_used(20, LIMIT);
    for i in 0..20u64 {
        assert_eq!(status(&g, DATA + 0x1000 * i), 0, "request {i}");
    }
    std::thread::sleep(Duration::from_millis(500));
    let r = cluster::replica_health(hp, &format!("127.0.0.1:{p1}"));
    assert_eq!(r["state"], "in-sync", "{r}");
    assert_eq!(r["failures"], 0, "the replica was declared failed: {r}");
}
