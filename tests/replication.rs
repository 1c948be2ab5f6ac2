//! Multi-process replication tests: real `ferrodisk replica` servers over TCP on loopback,
//! a real `ferrodisk serve` primary, and a libblkio client that records every acknowledged
//! write. Each test ends by checking every acknowledged write on the surviving copies, and
//! the copies against each other with `ferrodisk verify`.
//!
//! The scenarios run twice: with the embedded file authority and with a real etcd.

#[path = "common/cluster.rs"]
mod cluster;
mod common;
#[path = "common/etcd.rs"]
mod etcd;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blkio::ReqFlags;
use cluster::{
    free_port, health, make_image, read_file, replica_health, replica_state, wait_in_sync,
    wait_until, Env, Model, NetNs, Proc, SmallFs, Writer, SIZE, VOLUME,
};
use common::{Client, Rng, BIN};

// ---------------------------------------------------------------------------------------

fn replica_killed_mid_write(use_etcd: bool) {
    let env = Env::new(use_etcd);
    let (p1, p2, hp) = (free_port(), free_port(), free_port());
    let _r1 = env.replica("r1", p1);
    let mut r2 = env.replica("r2", p2);
    let img = env.path("img");
    let initial = make_image(&img, None);
    let sock = env.path("s.sock");
    let mut primary = env.primary("a", &img, &sock, &[p1, p2], hp, "");
    wait_in_sync(hp, &[p1, p2], Duration::from_secs(30));

    // Writes go to the first 16 of the 64 regions, so a delta resync is visibly partial.
    let w = Writer::start(&sock, Model::new(initial), 1, 16 << 20);
    w.wait_acked(200);
    r2.kill();
    // Guest I/O goes on while the replica is down.
    w.wait_acked(300);
    let (state, dirty, _) = replica_state(hp, p2);
    assert_eq!(state, "out-of-sync");
    assert!(
        dirty > 0 && dirty <= 16,
        "dirty regions while down: {dirty}"
    );
    let rec = env.record();
    assert!(!rec.member(&format!("127.0.0.1:{p2}")).unwrap().in_sync);
    assert!(rec.member(&format!("127.0.0.1:{p1}")).unwrap().in_sync);

    let _r2 = env.replica("r2", p2);
    wait_in_sync(hp, &[p2], Duration::from_secs(30));
    let (_, _, copied) = replica_state(hp, p2);
    w.wait_acked(100);
    let model = w.finish();
    assert_eq!(
        model.failed, 0,
        "no guest write may fail while one replica is down"
    );
    assert!(
        (1..=16).contains(&copied),
        "delta resync copied {copied} of 64 regions"
    );
    assert!(primary.terminate().success(), "{}", primary.log());
    model.check("primary image", &read_file(&img));
    model.check(
        "replica r1",
        &read_file(&env.path("r1").join(format!("{VOLUME}.img"))),
    );
    model.check(
        "replica r2",
        &read_file(&env.path("r2").join(format!("{VOLUME}.img"))),
    );
    let (code, out) = env.verify(&img, &[p1, p2]);
    assert_eq!(code, 0, "{out}");
}

fn primary_killed_then_promoted(use_etcd: bool) {
    let env = Env::new(use_etcd);
    let (p1, p2, hp, hp2) = (free_port(), free_port(), free_port(), free_port());
    let _r1 = env.replica("r1", p1);
    let _r2 = env.replica("r2", p2);
    let img = env.path("img");
    let initial = make_image(&img, Some(7));
    let sock = env.path("s.sock");
    let mut primary = env.primary("a", &img, &sock, &[p1, p2], hp, "");
    wait_in_sync(hp, &[p1, p2], Duration::from_secs(60));
    let w = Writer::start(&sock, Model::new(initial), 2, SIZE);
    w.wait_acked(300);
    primary.kill(); // mid-write: the writer's last request never completes
    std::thread::sleep(Duration::from_millis(200));
    let w_stop = Arc::clone(&w.stop);
    w_stop.store(true, Ordering::Relaxed);
    let model = w.model.lock().unwrap().clone();
    // The writer thread is blocked on a request that will never complete (its daemon is
    // gone); it is abandoned, and its model snapshot is what was acknowledged.
    std::mem::forget(w);

    let (code, out) = env.promote(p1, "b", &["--primary-health", &format!("127.0.0.1:{hp}")]);
    assert_eq!(code, 0, "promote: {out}");
    assert!(out.contains("fenced 127.0.0.1:"), "{out}");
    // Every acknowledged write is on the promoted copy.
    let r1img = env.path("r1").join(format!("{VOLUME}.img"));
    model.check("promoted replica", &read_file(&r1img));

    // The new primary serves the promoted copy, with r2 as its replica.
    let sock2 = env.path("s2.sock");
    let mut b = env.primary(
        "b",
        &r1img,
        &sock2,
        &[p2],
        hp2,
        &format!(",meta={}", env.path("b-meta").display()),
    );
    {
        let mut c = Client::connect(&sock2, 1, false).expect("connect to the new primary");
        let mut at = 0;
        while at < SIZE {
            let got = c.read(0, at, 4 << 20).expect("read");
            let s = at as usize;
            for (i, chunk) in got.chunks(512).enumerate() {
                let sct = s / 512 + i;
                if !model.unknown[sct] {
                    assert!(
                        chunk == &model.data[sct * 512..(sct + 1) * 512],
                        "sector {sct} lost after failover"
                    );
                }
            }
            at += 4 << 20;
        }
    }
    wait_in_sync(hp2, &[p2], Duration::from_secs(60));
    assert!(b.terminate().success(), "{}", b.log());
    let (code, out) = env.verify(&r1img, &[p2]);
    assert_eq!(code, 0, "{out}");
    model.check(
        "r2 after resync from the new primary",
        &read_file(&env.path("r2").join(format!("{VOLUME}.img"))),
    );
}

fn stale_primary_is_fenced(use_etcd: bool) {
    let env = Env::new(use_etcd);
    let (p1, p2, hp) = (free_port(), free_port(), free_port());
    let _r1 = env.replica("r1", p1);
    let _r2 = env.replica("r2", p2);
    let img = env.path("img");
    make_image(&img, None);
    let sock = env.path("s.sock");
    let mut a = env.primary("a", &img, &sock, &[p1, p2], hp, "");
    wait_in_sync(hp, &[p1, p2], Duration::from_secs(30));
    let mut c = Client::connect(&sock, 1, false).expect("connect");
    assert_eq!(c.write(0, 0, &[1u8; 4096], ReqFlags::empty()), 0);

    // Promote r1 while the old primary keeps running (a partition from the operator's view).
    let (code, out) = env.promote(p1, "b", &[]);
    assert_eq!(code, 0, "promote: {out}");
    // The old primary's next write is refused by the fenced replicas: the guest sees IOERR.
    let stale = [0xEEu8; 4096];
    let r = c.write(0, 1 << 20, &stale, ReqFlags::empty());
    assert_ne!(r, 0, "a stale primary's write must fail");
    assert!(
        c.read(0, 0, 4096).is_err(),
        "a fenced primary must not serve reads either"
    );
    let h = health(hp);
    assert_eq!(h["status"], "fenced", "{h}");
    for r in ["r1", "r2"] {
        let data = read_file(&env.path(r).join(format!("{VOLUME}.img")));
        assert_ne!(
            &data[1 << 20..(1 << 20) + 4096],
            &stale[..],
            "the stale write reached {r}"
        );
        assert_eq!(
            &data[..4096],
            &[1u8; 4096][..],
            "the acknowledged write is on {r}"
        );
    }
    drop(c);
    a.kill();
    assert!(a.log().contains("FENCED"), "{}", a.log());
    // The old primary cannot take the volume back either.
    let mut again = Proc::spawn(
        Command::new(BIN)
            .args([
                "serve",
                "--authority",
                &env.authority,
                "--node",
                "a",
                "--replication-key",
            ])
            .arg(&env.key)
            .arg("--disk")
            .arg(format!(
                "path={},socket={},volume={VOLUME},replicas=127.0.0.1:{p2}",
                img.display(),
                env.path("s3.sock").display()
            )),
        &env.path("again.log"),
    );
    let status = again.child.as_mut().unwrap().wait().unwrap();
    assert_eq!(status.code(), Some(1), "{}", again.log());
    assert!(again.log().contains("promote"), "{}", again.log());
}

fn new_replica_rebuilt_under_load(use_etcd: bool) {
    let env = Env::new(use_etcd);
    let (p1, p2, hp) = (free_port(), free_port(), free_port());
    let _r1 = env.replica("r1", p1);
    let _r2 = env.replica("r2", p2);
    let img = env.path("img");
    let initial = make_image(&img, Some(3));
    let sock = env.path("s.sock");
    // A throttled rebuild of 64 MiB at 16 MiB/s takes about 4 s.
    let mut primary = env.primary("a", &img, &sock, &[p1, p2], hp, ",resync-mbps=16");
    let w = Writer::start(&sock, Model::new(initial), 3, SIZE);
    let mut progress = Vec::new();
    wait_until(Duration::from_secs(60), "rebuild", || {
        let h = health(hp);
        let reps = h["volumes"][0]["replicas"].as_array().unwrap().clone();
        if let Some(p) = reps[0]["resync_progress"].as_f64() {
            progress.push(p);
        }
        reps.iter().all(|r| r["state"] == "in-sync")
    });
    w.wait_acked(50);
    let model = w.finish();
    assert!(
        progress.iter().any(|&p| p > 0.05 && p < 0.95),
        "progress was never seen mid-way: {progress:?}"
    );
    let (_, _, copied) = replica_state(hp, p1);
    assert!(
        copied >= 60,
        "a new replica of random data copies (nearly) every region: {copied}"
    );
    assert!(primary.terminate().success(), "{}", primary.log());
    assert_eq!(model.failed, 0);
    model.check("primary", &read_file(&img));
    for r in ["r1", "r2"] {
        model.check(r, &read_file(&env.path(r).join(format!("{VOLUME}.img"))));
    }
    let (code, out) = env.verify(&img, &[p1, p2]);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn replica_killed_mid_write_then_delta_resync() {
    replica_killed_mid_write(false);
}

#[test]
fn primary_killed_then_replica_promoted() {
    primary_killed_then_promoted(false);
}

#[test]
fn stale_primary_writes_are_rejected() {
    stale_primary_is_fenced(false);
}

#[test]
fn new_empty_replica_full_rebuild_under_load() {
    new_replica_rebuilt_under_load(false);
}

#[test]
fn etcd_replica_killed_mid_write_then_delta_resync() {
    replica_killed_mid_write(true);
}

#[test]
fn etcd_primary_killed_then_replica_promoted() {
    primary_killed_then_promoted(true);
}

#[test]
fn etcd_stale_primary_writes_are_rejected() {
    stale_primary_is_fenced(true);
}

#[test]
fn etcd_new_empty_replica_full_rebuild_under_load() {
    new_replica_rebuilt_under_load(true);
}

#[test]
fn unauthenticated_peers_are_refused() {
    let env = Env::new(false);
    let p1 = free_port();
    let r1 = env.replica("r1", p1);
    let wrong = env.path("wrong-key");
    std::fs::write(&wrong, b"not-the-right-key-0123456789").unwrap();
    // Connect with the wrong key directly: the handshake fails on both sides.
    let key = ferrodisk::repl::wire::Key::from_file(&wrong).unwrap();
    let s = TcpStream::connect(("127.0.0.1", p1)).unwrap();
    let e = ferrodisk::repl::wire::client(s, &key)
        .err()
        .expect("must be refused");
    assert!(e.to_string().contains("authentication"), "{e}");
    // A peer that answers the server's challenge without the key is refused by the server.
    let mut s = TcpStream::connect(("127.0.0.1", p1)).unwrap();
    s.write_all(b"FDR2").unwrap();
    s.write_all(&[7u8; 32]).unwrap();
    let mut challenge = [0u8; 64];
    s.read_exact(&mut challenge).unwrap();
    s.write_all(&[0u8; 32]).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(
        rest.is_empty(),
        "the server must not answer an unauthenticated peer"
    );
    wait_until(
        Duration::from_secs(5),
        "the refusal in the replica's log",
        || r1.log().contains("refused an unauthenticated peer"),
    );
    // A peer of protocol version 1 is refused, and the log says why.
    let mut s = TcpStream::connect(("127.0.0.1", p1)).unwrap();
    s.write_all(b"FDR1").unwrap();
    s.write_all(&[7u8; 32]).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty(), "no answer to a version 1 peer");
    wait_until(
        Duration::from_secs(5),
        "the version refusal in the replica's log",
        || r1.log().contains("protocol version 1"),
    );
}

#[test]
fn partitioned_replica_degrades_then_heals_and_resyncs() {
    partitioned_replica(false);
}

#[test]
fn etcd_partitioned_replica_degrades_then_heals_and_resyncs() {
    partitioned_replica(true);
}

fn partitioned_replica(use_etcd: bool) {
    let env = Env::new(use_etcd);
    let ns = NetNs::create();
    let (p1, p2, hp) = (free_port(), free_port(), free_port());
    let _r1 = env.replica("r1", p1);
    // r2 lives in its own network namespace, reached over the veth pair.
    let r2addr = format!("{}:{p2}", ns.addr);
    let _r2 = Proc::spawn(
        Command::new("ip")
            .args([
                "netns", "exec", &ns.name, BIN, "replica", "--listen", &r2addr, "--data",
            ])
            .arg(env.path("r2"))
            .arg("--replication-key")
            .arg(&env.key),
        &env.path("r2.log"),
    );
    let img = env.path("img");
    let initial = make_image(&img, None);
    let sock = env.path("s.sock");
    let _ = std::fs::remove_file(&sock);
    let mut primary = Proc::spawn(
        Command::new(BIN)
            .args(["serve", "--authority", &env.authority, "--node", "a", "--replication-key"])
            .arg(&env.key)
            .args(["--health", &format!("127.0.0.1:{hp}"), "--disk"])
            .arg(format!(
                "path={},socket={},volume={VOLUME},replicas=127.0.0.1:{p1}+{r2addr},replica-timeout-ms=1000",
                img.display(),
                sock.display()
            )),
        &env.path("primary-a.log"),
    );
    wait_until(Duration::from_secs(20), "socket", || sock.exists());
    let state = |addr: &str| replica_health(hp, addr)["state"].clone();
    wait_until(Duration::from_secs(30), "both in sync", || {
        state(&format!("127.0.0.1:{p1}")) == "in-sync" && state(&r2addr) == "in-sync"
    });

    let w = Writer::start(&sock, Model::new(initial), 4, 16 << 20);
    w.wait_acked(100);
    ns.partition();
    // Writes stall for at most the replica timeout, then go on without r2.
    wait_until(Duration::from_secs(10), "r2 out of sync", || {
        state(&r2addr) == "out-of-sync"
    });
    // The authority (file or etcd) says so too, and the other replica is still in sync.
    let rec = env.record();
    assert!(!rec.member(&r2addr).unwrap().in_sync);
    assert!(rec.member(&format!("127.0.0.1:{p1}")).unwrap().in_sync);
    w.wait_acked(200);
    ns.heal();
    wait_until(Duration::from_secs(30), "r2 back in sync", || {
        state(&r2addr) == "in-sync"
    });
    w.wait_acked(50);
    let model = w.finish();
    assert_eq!(
        model.failed, 0,
        "no guest write may fail during the partition"
    );
    assert!(primary.terminate().success(), "{}", primary.log());
    assert!(
        primary.log().contains("no answer within 1000 ms"),
        "the partition is detected by the timeout:\n{}",
        primary.log()
    );
    model.check("primary", &read_file(&img));
    for r in ["r1", "r2"] {
        model.check(r, &read_file(&env.path(r).join(format!("{VOLUME}.img"))));
    }
}

#[test]
fn promote_refuses_a_replica_it_cannot_fence() {
    let env = Env::new(false);
    let (p1, hp) = (free_port(), free_port());
    let mut r1 = env.replica("r1", p1);
    let img = env.path("img");
    make_image(&img, None);
    let sock = env.path("s.sock");
    let mut a = env.primary("a", &img, &sock, &[p1], hp, "");
    wait_in_sync(hp, &[p1], Duration::from_secs(30));
    assert!(a.terminate().success());
    r1.kill();
    let auth = ferrodisk::repl::authority::Authority::open(&env.authority).unwrap();
    let before = auth.load(VOLUME).unwrap().unwrap();
    let (code, out) = env.promote(p1, "b", &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("cannot fence the replica to promote, nothing changed"),
        "{out}"
    );
    assert_eq!(
        auth.load(VOLUME).unwrap().unwrap(),
        before,
        "the authority is unchanged"
    );
}

#[test]
fn a_replicated_volume_through_the_api() {
    let env = Env::new(false);
    let (p1, p2) = (free_port(), free_port());
    let _r1 = env.replica("r1", p1);
    let _r2 = env.replica("r2", p2);
    let key = env.key.display().to_string();
    let d = common::api_daemon::ApiDaemon::start(
        env.dir.path(),
        &[
            "--authority",
            &env.authority,
            "--node",
            "api-node",
            "--replication-key",
            &key,
        ],
    );
    let (rc, out, err) = d.cli(&[
        "volume",
        "create",
        VOLUME,
        "--size",
        "16M",
        "--replica",
        &format!("127.0.0.1:{p1}"),
        "--replica",
        &format!("127.0.0.1:{p2}"),
    ]);
    assert_eq!(rc, 0, "{out}{err}");
    let sock = env.path("api.vol.sock");
    let attach = || {
        let (rc, out, err) = d.cli(&[
            "attach",
            "--volume",
            VOLUME,
            "--instance",
            "vm",
            "--socket",
            sock.to_str().unwrap(),
        ]);
        assert_eq!(rc, 0, "{out}{err}");
    };
    attach();
    let in_sync = |d: &common::api_daemon::ApiDaemon| {
        let (_, st) = d.call("GET", &format!("/v1/stats/{VOLUME}@vm"), None);
        let reps = st[0]["replication"]["replicas"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        reps.len() == 2 && reps.iter().all(|r| r["state"] == "in-sync")
    };
    wait_until(Duration::from_secs(30), "replicas in sync", || in_sync(&d));
    let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
    {
        let mut c = Client::connect(&sock, 1, false).unwrap();
        assert_eq!(c.write(0, 1 << 20, &data, ReqFlags::empty()), 0);
    }
    for r in ["r1", "r2"] {
        let f = read_file(&env.path(r).join(format!("{VOLUME}.img")));
        assert_eq!(
            &f[1 << 20..(1 << 20) + data.len()],
            &data[..],
            "the write is on {r}"
        );
    }
    let (rc, out, err) = d.cli(&["stats"]);
    assert_eq!(rc, 0);
    assert!(
        out.contains("in-sync"),
        "the table shows replication: {out}{err}"
    );
    // Detach records a clean stop; attaching again needs no resync.
    let (rc, _, _) = d.cli(&["detach", &format!("{VOLUME}@vm")]);
    assert_eq!(rc, 0);
    attach();
    wait_until(Duration::from_secs(30), "replicas in sync again", || {
        in_sync(&d)
    });
    let (_, st) = d.call("GET", &format!("/v1/stats/{VOLUME}@vm"), None);
    for r in st[0]["replication"]["replicas"].as_array().unwrap() {
        assert_eq!(
            r["compared_regions"], 0,
            "a clean re-attach compares nothing: {r}"
        );
    }
    let img = env.path("state/volumes").join(format!("{VOLUME}.img"));
    let (code, out) = env.verify(&img, &[p1, p2]);
    assert_eq!(code, 0, "{out}");
}

/// A replica whose disk fails writes (ENOSPC on a full tmpfs): the failure is reported
/// (the replica's log, the primary's log, health `last_error`, the authority), the guest's
/// writes do not fail, and once the disk works again the replica resyncs to equal data.
#[test]
fn replica_disk_errors_are_reported_then_resynced() {
    let env = Env::new(false);
    let (p1, p2, hp) = (free_port(), free_port(), free_port());
    let _r1 = env.replica("r1", p1);
    // r2's data lives on a tmpfs just larger than the volume.
    let fs = SmallFs::mount(&env.path("r2"), SIZE + (2 << 20));
    let _r2 = env.replica("r2", p2);
    let img = env.path("img");
    let initial = make_image(&img, None);
    let sock = env.path("s.sock");
    let mut primary = env.primary("a", &img, &sock, &[p1, p2], hp, "");
    wait_in_sync(hp, &[p1, p2], Duration::from_secs(30));

    // Free 4 MiB on every copy (discard punches a hole in the replicas' files), then let
    // something else take all the free space of r2's filesystem.
    const HOLE: u64 = 4 << 20;
    let mut model = Model::new(initial);
    {
        let mut c = Client::connect(&sock, 1, false).expect("connect");
        c.queues[0].discard(0, HOLE, 0, ReqFlags::empty());
        assert_eq!(c.wait(0), 0, "discard");
        model.data[..HOLE as usize].fill(0);
    }
    wait_in_sync(hp, &[p1, p2], Duration::from_secs(10));
    let hog = fs.fill("hog");
    assert!(
        hog >= HOLE,
        "the discard freed space on r2's tmpfs: {hog} bytes"
    );

    // Writes into the hole now fail on r2's disk.
    let w = Writer::start(&sock, model, 11, HOLE);
    // The link retries (and fails again) while the disk is full, so its state cycles
    // through out-of-sync and resyncing; the error stays in `last_error`.
    wait_until(Duration::from_secs(20), "r2's disk error in health", || {
        let r = replica_health(hp, &format!("127.0.0.1:{p2}"));
        r["state"] != "in-sync"
            && r["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("No space left on device"))
    });
    w.wait_acked(50);
    let rec = env.record();
    assert!(!rec.member(&format!("127.0.0.1:{p2}")).unwrap().in_sync);
    let r2log = std::fs::read_to_string(env.path("r2.log")).unwrap();
    assert!(
        r2log.contains("replica disk error") && r2log.contains("No space left on device"),
        "the replica logs its disk error:\n{r2log}"
    );

    // The disk works again: r2 catches up while the guest keeps writing.
    std::fs::remove_file(fs.dir.join("hog")).unwrap();
    wait_in_sync(hp, &[p2], Duration::from_secs(60));
    w.wait_acked(50);
    let model = w.finish();
    assert_eq!(
        model.failed, 0,
        "no guest write may fail on a replica's disk error"
    );
    assert!(primary.terminate().success(), "{}", primary.log());
    assert!(
        primary.log().contains("replica failed a request"),
        "the primary logs the replica's error:\n{}",
        primary.log()
    );
    model.check("primary", &read_file(&img));
    for r in ["r1", "r2"] {
        model.check(r, &read_file(&env.path(r).join(format!("{VOLUME}.img"))));
    }
    let (code, out) = env.verify(&img, &[p1, p2]);
    assert_eq!(code, 0, "{out}");
}

/// Through the API: a replicated volume imported from a file of data, with its own resync
/// rate; `attachment wait` shows the rebuild's progress and returns once both replicas are
/// in sync, with the data on them.
#[test]
fn api_attachment_wait_shows_rebuild_progress() {
    let env = Env::new(false);
    let (p1, p2) = (free_port(), free_port());
    let _r1 = env.replica("r1", p1);
    let _r2 = env.replica("r2", p2);
    let img = env.path("data.img");
    let mut data = vec![0u8; 32 << 20];
    Rng(5).fill(&mut data);
    std::fs::write(&img, &data).unwrap();
    let key = env.key.display().to_string();
    let d = common::api_daemon::ApiDaemon::start(
        env.dir.path(),
        &[
            "--authority",
            &env.authority,
            "--node",
            "n",
            "--replication-key",
            &key,
            "--volume-root",
            env.dir.path().to_str().unwrap(),
        ],
    );
    let (r1, r2) = (format!("127.0.0.1:{p1}"), format!("127.0.0.1:{p2}"));
    // The rate and timeout belong to replicated volumes only.
    let (rc, _, err) = d.cli(&[
        "volume",
        "create",
        "plain",
        "--size",
        "1M",
        "--resync-mbps",
        "8",
    ]);
    assert_eq!(rc, 2, "{err}");
    assert!(err.contains("only to a volume with replicas"), "{err}");
    let (rc, out, err) = d.cli(&[
        "volume",
        "create",
        VOLUME,
        "--path",
        img.to_str().unwrap(),
        "--replica",
        &r1,
        "--replica",
        &r2,
        "--resync-mbps",
        "4",
        "--replica-timeout-ms",
        "2000",
    ]);
    assert_eq!(rc, 0, "{out}{err}");
    let (_, vols) = d.call("GET", "/v1/volumes", None);
    assert_eq!(vols[0]["resync_mbps"], 4, "{vols}");
    assert_eq!(vols[0]["replica_timeout_ms"], 2000, "{vols}");
    let sock = env.path("v.sock");
    // 32 MiB for each replica at 4 MiB/s: about 8 s from the attach.
    let t0 = Instant::now();
    let (rc, out, err) = d.cli(&[
        "attach",
        "--volume",
        VOLUME,
        "--instance",
        "vm",
        "--socket",
        sock.to_str().unwrap(),
    ]);
    assert_eq!(rc, 0, "{out}{err}");
    let (rc, out, err) = d.cli(&[
        "attachment",
        "wait",
        &format!("{VOLUME}@vm"),
        "--timeout",
        "120",
    ]);
    assert_eq!(rc, 0, "{out}{err}");
    assert!(out.contains("2 replica(s) in sync"), "{out}");
    assert!(
        t0.elapsed() >= Duration::from_secs(4),
        "a rebuild of 32 MiB throttled to 4 MiB/s cannot be done in {:?}",
        t0.elapsed()
    );
    let mid_way = err
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.ends_with('%')))
        .filter_map(|w| w.trim_end_matches('%').parse::<f64>().ok())
        .any(|p| p > 5.0 && p < 95.0);
    assert!(mid_way, "progress was shown mid-way:\n{err}");
    for r in ["r1", "r2"] {
        assert!(
            read_file(&env.path(r).join(format!("{VOLUME}.img"))) == data,
            "{r} holds the volume's data"
        );
    }
    // Nothing left to wait for; an unknown attachment is an error.
    let (rc, out, _) = d.cli(&["attachment", "wait", &format!("{VOLUME}@vm")]);
    assert_eq!(rc, 0, "{out}");
    let (rc, _, err) = d.cli(&["attachment", "wait", "nope@vm"]);
    assert_eq!(rc, 2, "{err}");
}
