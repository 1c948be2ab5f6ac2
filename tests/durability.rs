//! Multi-process fault tests of issue #12 ("Durability you can trust"): real `ferrodisk
//! replica` servers, real primaries (`ferrodisk serve --disk` or the API daemon), a libblkio
//! client that records every acknowledged write, and faults injected from outside: a
//! replica's disk wiped or its image replaced, a primary killed after losing its unflushed
//! page cache, a volume deleted and re-created, a second primary, overlapping writes on two
//! queues, a corrupt dirty bitmap, an unreachable authority, a full file system.
//!
//! Every test checks the copies byte for byte, by reading the replicas' files
//! (`<data>/<volume>.img`) and the primary's image once the primary has stopped (or died),
//! and checks every acknowledged write on them; `ferrodisk verify` alone is not enough.
//!
//! They assert the behaviour of docs/replication.md after issue #12: a blank, wiped or
//! recreated copy is rebuilt, never trusted; promote refuses such a copy; a replicated
//! volume has one writer; every acknowledged write survives an unclean stop that lost the
//! primary's page cache; overlapping writes leave identical copies; an unreadable bitmap
//! and an unrecorded fault fail closed.

#[path = "common/cluster.rs"]
mod cluster;
mod common;
#[path = "common/etcd.rs"]
mod etcd;

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use blkio::{Completion, ReqFlags};
use cluster::{
    free_port, health, make_image, read_file, replica_state, wait_in_sync, wait_until, Env, Model,
    Proc, Writer, SIZE, VOLUME,
};
use common::api_daemon::ApiDaemon;
use common::{Client, Rng};
use ferrodisk::repl::authority::Authority;

const MIB: u64 = 1 << 20;
/// One write of the region tests: 64 KiB.
const CHUNK: usize = 64 << 10;

// ---------------------------------------------------------------------------------------
// Helpers

/// A copy of the volume as a file holds it; a missing file is a clear failure.
fn copy_of(what: &str, path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{what}: cannot read {}: {e}", path.display()))
}

/// Where two copies differ, or `None` if they are equal byte for byte.
fn difference(a: &[u8], b: &[u8]) -> Option<String> {
    if a.len() != b.len() {
        return Some(format!("sizes differ: {} and {} bytes", a.len(), b.len()));
    }
    if a == b {
        return None;
    }
    let regions: Vec<usize> = a
        .chunks(MIB as usize)
        .zip(b.chunks(MIB as usize))
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i)
        .collect();
    let blocks = a
        .chunks(4096)
        .zip(b.chunks(4096))
        .filter(|(x, y)| x != y)
        .count();
    let first = a.iter().zip(b).position(|(x, y)| x != y).unwrap_or(0);
    let shown: Vec<String> = regions.iter().take(12).map(|r| r.to_string()).collect();
    Some(format!(
        "{blocks} blocks of 4 KiB differ, in {} of {} regions of 1 MiB (regions {}{}); first \
         differing byte at offset {first:#x}",
        regions.len(),
        a.len().div_ceil(MIB as usize),
        shown.join(","),
        if regions.len() > 12 { ",..." } else { "" },
    ))
}

/// Fails unless `b` (what `b_name` holds) equals `a` byte for byte.
fn assert_same(a_name: &str, a: &[u8], b_name: &str, b: &[u8], context: &str) {
    if let Some(d) = difference(a, b) {
        panic!("{b_name} is not a byte-for-byte copy of {a_name}: {d}. {context}");
    }
}

/// Writes `data` at `offset` through queue 0; it must succeed. Records it in `model`.
fn write_ok(c: &mut Client, model: &mut Model, offset: u64, data: &[u8]) {
    let r = c.write(0, offset, data, ReqFlags::empty());
    assert_eq!(
        r,
        0,
        "the write of {} bytes at {offset} failed ({r})",
        data.len()
    );
    model.record(offset, data);
}

/// Writes one 64 KiB chunk of fresh random data at each offset.
fn write_chunks(
    c: &mut Client,
    model: &mut Model,
    rng: &mut Rng,
    offsets: impl Iterator<Item = u64>,
) {
    let mut data = vec![0u8; CHUNK];
    for o in offsets {
        rng.fill(&mut data);
        write_ok(c, model, o, &data);
    }
}

/// Reads the whole volume back through the daemon serving `socket`, and checks every
/// acknowledged write on it.
/// Writes `data` at `offset` and reads it back; says what went wrong.
fn write_read_back(c: &mut Client, offset: u64, data: &[u8]) -> Result<(), String> {
    let w = c.write(0, offset, data, ReqFlags::empty());
    let r = c.read(0, offset, data.len());
    if w != 0 || r.as_deref() != Ok(data) {
        return Err(format!(
            "write {w}, read back equal: {:?}",
            r.map(|d| d == data)
        ));
    }
    Ok(())
}

fn read_back(socket: &Path, model: &Model, what: &str) {
    let mut c = Client::connect(socket, 1, false)
        .unwrap_or_else(|e| panic!("{what}: cannot connect to {}: {e}", socket.display()));
    let mut all = Vec::with_capacity(model.data.len());
    let mut at = 0u64;
    while at < model.data.len() as u64 {
        let n = (model.data.len() as u64 - at).min(4 * MIB) as usize;
        let got = c
            .read(0, at, n)
            .unwrap_or_else(|e| panic!("{what}: the read of {n} bytes at {at} failed ({e})"));
        all.extend_from_slice(&got);
        at += n as u64;
    }
    model.check(what, &all);
}

/// Waits until the primary (health on `hp`) no longer calls the replica on `port` in sync:
/// it noticed that the replica is gone.
fn wait_not_in_sync(hp: u16, port: u16) {
    wait_until(
        Duration::from_secs(15),
        &format!("the primary to notice that replica {port} is gone"),
        || replica_state(hp, port).0 != "in-sync",
    );
}

/// The replica's health entry, for failure messages.
fn replica_summary(hp: u16, port: u16) -> String {
    let (state, dirty, copied) = replica_state(hp, port);
    format!("health says {state}, dirty_regions={dirty}, copied_regions={copied}")
}

/// A primary, two replicas and a zeroed image, all in sync.
struct Cluster {
    env: Env,
    p1: u16,
    p2: u16,
    hp: u16,
    img: PathBuf,
    sock: PathBuf,
    r1: Proc,
    r2: Proc,
    primary: Proc,
    model: Model,
}

impl Cluster {
    fn start(use_etcd: bool, extra: &str) -> Cluster {
        let env = Env::new(use_etcd);
        let (p1, p2, hp) = (free_port(), free_port(), free_port());
        let r1 = env.replica("r1", p1);
        let r2 = env.replica("r2", p2);
        let img = env.path("img");
        let model = Model::new(make_image(&img, None));
        let sock = env.path("s.sock");
        let primary = env.primary("a", &img, &sock, &[p1, p2], hp, extra);
        wait_in_sync(hp, &[p1, p2], Duration::from_secs(30));
        Cluster {
            env,
            p1,
            p2,
            hp,
            img,
            sock,
            r1,
            r2,
            primary,
            model,
        }
    }

    /// One 64 KiB write of random data at every MiB of the volume (64 regions).
    fn write_every_region(&mut self, seed: u64) {
        let mut c = Client::connect(&self.sock, 1, false).expect("connect");
        let mut rng = Rng(seed);
        write_chunks(
            &mut c,
            &mut self.model,
            &mut rng,
            (0..SIZE / MIB).map(|i| i * MIB),
        );
    }

    /// Stops the primary cleanly and starts it again with `extra` disk options (on a new
    /// health port); waits until both replicas are in sync.
    fn restart_primary(&mut self, extra: &str) {
        self.stop_primary();
        self.hp = free_port();
        let (p1, p2) = (self.p1, self.p2);
        self.primary = self
            .env
            .primary("a", &self.img, &self.sock, &[p1, p2], self.hp, extra);
        wait_in_sync(self.hp, &[p1, p2], Duration::from_secs(30));
    }

    /// Stops the primary with SIGTERM; it must exit 0.
    fn stop_primary(&mut self) {
        let s = self.primary.terminate();
        assert!(
            s.success(),
            "the primary exited {s} after SIGTERM:\n{}",
            self.primary.log()
        );
    }

    /// Checks the three copies byte for byte against each other, and every acknowledged
    /// write on each. The primary must have stopped.
    fn check_copies(&self, context: &str) {
        let primary = copy_of("the primary image", &self.img);
        for r in ["r1", "r2"] {
            let copy = copy_of(&format!("replica {r}"), &self.env.replica_image(r));
            assert_same(
                "the primary image",
                &primary,
                &format!("replica {r}'s file"),
                &copy,
                context,
            );
        }
        self.model.check("the primary image", &primary);
    }
}

/// The replica's data directory after a failure of its disk.
#[derive(Clone, Copy, Debug)]
enum Wipe {
    /// The whole `--data` directory is gone (a failed mount, a new disk).
    DataDir,
    /// Only `<volume>.img` is gone; the other files stay.
    ImageOnly,
    /// `<volume>.img` is a new blank file of the same size (another inode).
    BlankImage,
}

impl Wipe {
    fn apply(self, env: &Env, name: &str) {
        let img = env.replica_image(name);
        match self {
            Wipe::DataDir => std::fs::remove_dir_all(env.replica_dir(name)).unwrap(),
            Wipe::ImageOnly => std::fs::remove_file(&img).unwrap(),
            Wipe::BlankImage => {
                std::fs::remove_file(&img).unwrap();
                std::fs::File::create(&img).unwrap().set_len(SIZE).unwrap();
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// 1. A wiped replica is rebuilt, never trusted.

fn wiped_replica(wipe: Wipe) {
    let mut c = Cluster::start(false, "");
    c.write_every_region(1);
    c.r2.kill();
    wait_not_in_sync(c.hp, c.p2);
    wipe.apply(&c.env, "r2");
    c.r2 = c.env.replica("r2", c.p2);
    wait_in_sync(c.hp, &[c.p1, c.p2], Duration::from_secs(60));
    let summary = replica_summary(c.hp, c.p2);
    c.stop_primary();
    c.check_copies(&format!(
        "Replica r2 was SIGKILLed, its disk wiped ({wipe:?}) and restarted; once the primary \
         called it in sync again ({summary}) it must hold the whole volume."
    ));
}

#[test]
fn wiped_replica_is_rebuilt_not_trusted() {
    wiped_replica(Wipe::DataDir);
}

#[test]
fn replica_without_its_image_is_rebuilt() {
    wiped_replica(Wipe::ImageOnly);
}

#[test]
fn replica_with_a_new_blank_image_is_rebuilt() {
    wiped_replica(Wipe::BlankImage);
}

// ---------------------------------------------------------------------------------------
// 2. promote refuses a wiped replica.

/// When and how replica r1 lost its copy before `promote --replica r1`.
#[derive(Clone, Copy, Debug)]
enum Lost {
    /// After the primary died: the data directory is gone (there is no image at all).
    DataDirAfterPrimary,
    /// After the primary died: the image is a new blank file of the right size.
    BlankImageAfterPrimary,
    /// While the primary ran (the report): it re-created a blank image on r1 and
    /// reconnected; then the primary died.
    DataDirWhilePrimaryRan,
}

fn promote_after_wipe(lost: Lost) {
    let mut c = Cluster::start(false, "");
    if let Lost::DataDirWhilePrimaryRan = lost {
        // A throttled resync: a full rebuild of r1 takes a minute, so a primary that
        // rebuilds r1 (as it must) has not finished when it is killed.
        c.restart_primary(",resync-mbps=1");
    }
    c.write_every_region(2);
    match lost {
        Lost::DataDirAfterPrimary | Lost::BlankImageAfterPrimary => {
            c.primary.kill();
            c.r1.kill();
            let wipe = match lost {
                Lost::BlankImageAfterPrimary => Wipe::BlankImage,
                _ => Wipe::DataDir,
            };
            wipe.apply(&c.env, "r1");
            c.r1 = c.env.replica("r1", c.p1);
        }
        Lost::DataDirWhilePrimaryRan => {
            c.r1.kill();
            wait_not_in_sync(c.hp, c.p1);
            Wipe::DataDir.apply(&c.env, "r1");
            let opened = |p: &Proc| p.log().matches("connection opened").count();
            let before = opened(&c.r1);
            c.r1 = c.env.replica("r1", c.p1);
            wait_until(
                Duration::from_secs(15),
                "the primary to reconnect to r1",
                || {
                    opened(&c.r1) > before
                        || matches!(
                            replica_state(c.hp, c.p1).0.as_str(),
                            "resyncing" | "in-sync"
                        )
                },
            );
            std::thread::sleep(Duration::from_secs(1));
            c.primary.kill();
        }
    }

    let auth = Authority::open(&c.env.authority).unwrap();
    let before = auth.load(VOLUME).unwrap().expect("the volume's record");
    let (code, out) = c.env.promote(c.p1, "b", &[]);
    let after = auth.load(VOLUME).unwrap().expect("the volume's record");
    assert!(
        code != 0,
        "promote accepted replica r1, whose copy was lost ({lost:?}) and is blank: {out}"
    );
    assert_eq!(
        after, before,
        "a refused promote must leave the authority record unchanged"
    );

    // The intact replica can still be promoted, and serves every acknowledged write.
    let (code, out) = c.env.promote(c.p2, "b", &[]);
    assert_eq!(code, 0, "promote of the intact replica r2: {out}");
    let r2img = c.env.replica_image("r2");
    c.model
        .check("the promoted replica r2", &copy_of("replica r2", &r2img));
    let (sock2, hp2) = (c.env.path("b.sock"), free_port());
    let meta = format!(",meta={}", c.env.path("b-meta").display());
    let mut b = c.env.primary("b", &r2img, &sock2, &[c.p1], hp2, &meta);
    read_back(&sock2, &c.model, "read back through the new primary on r2");
    wait_in_sync(hp2, &[c.p1], Duration::from_secs(60));
    assert!(b.terminate().success(), "{}", b.log());
    assert_same(
        "the promoted copy (r2)",
        &copy_of("replica r2", &r2img),
        "replica r1's file",
        &copy_of("replica r1", &c.env.replica_image("r1")),
        "The wiped replica r1 must be rebuilt from the new primary.",
    );
}

#[test]
fn promote_refuses_a_wiped_replica() {
    promote_after_wipe(Lost::DataDirAfterPrimary);
}

#[test]
fn promote_refuses_a_replica_with_a_blank_image() {
    promote_after_wipe(Lost::BlankImageAfterPrimary);
}

#[test]
fn promote_refuses_a_replica_wiped_while_the_primary_ran() {
    promote_after_wipe(Lost::DataDirWhilePrimaryRan);
}

// ---------------------------------------------------------------------------------------
// 3. A re-created volume does not inherit the old volume's data.

/// An API daemon with two replica servers and the file authority.
struct ApiCluster {
    env: Env,
    p1: u16,
    p2: u16,
    _r1: Proc,
    _r2: Proc,
    d: ApiDaemon,
}

impl ApiCluster {
    fn start() -> ApiCluster {
        let env = Env::new(false);
        let (p1, p2) = (free_port(), free_port());
        let r1 = env.replica("r1", p1);
        let r2 = env.replica("r2", p2);
        let key = env.key.display().to_string();
        let d = ApiDaemon::start(
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
        ApiCluster {
            env,
            p1,
            p2,
            _r1: r1,
            _r2: r2,
            d,
        }
    }

    fn cli_ok(&self, args: &[&str]) -> String {
        let (rc, out, err) = self.d.cli(args);
        assert_eq!(rc, 0, "ferrodisk {}: {out}{err}", args.join(" "));
        out
    }

    /// `volume create VOLUME` with both replicas and `extra` options.
    fn create(&self, size: &str, extra: &[&str]) {
        let (r1, r2) = (
            format!("127.0.0.1:{}", self.p1),
            format!("127.0.0.1:{}", self.p2),
        );
        let mut args = vec![
            "volume",
            "create",
            VOLUME,
            "--size",
            size,
            "--replica",
            &r1,
            "--replica",
            &r2,
        ];
        args.extend_from_slice(extra);
        self.cli_ok(&args);
    }

    fn attach_args<'a>(
        &self,
        instance: &'a str,
        socket: &'a Path,
        extra: &[&'a str],
    ) -> Vec<&'a str> {
        let mut args = vec![
            "attach",
            "--volume",
            VOLUME,
            "--instance",
            instance,
            "--socket",
            socket.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        args
    }

    fn attach(&self, instance: &str, socket: &Path, extra: &[&str]) {
        self.cli_ok(&self.attach_args(instance, socket, extra));
    }

    /// Waits until the attachment's two replicas are in sync.
    fn wait_in_sync(&self, instance: &str) {
        let id = format!("{VOLUME}@{instance}");
        wait_until(
            Duration::from_secs(60),
            &format!("both replicas of {id} in sync"),
            || {
                let (_, st) = self.d.call("GET", &format!("/v1/stats/{id}"), None);
                let reps = st[0]["replication"]["replicas"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                reps.len() == 2 && reps.iter().all(|r| r["state"] == "in-sync")
            },
        );
    }

    fn detach(&self, instance: &str) {
        self.cli_ok(&["detach", &format!("{VOLUME}@{instance}")]);
    }

    fn primary_image(&self) -> PathBuf {
        self.env.path("state/volumes").join(format!("{VOLUME}.img"))
    }
}

#[test]
fn recreated_volume_does_not_inherit_old_data() {
    let a = ApiCluster::start();
    a.create("16M", &[]);
    let sock = a.env.path("v.sock");
    a.attach("vm", &sock, &[]);
    a.wait_in_sync("vm");
    let pattern: Vec<u8> = (0..256 << 10).map(|i: u32| (i % 253) as u8 | 1).collect();
    {
        let mut c = Client::connect(&sock, 1, false).unwrap();
        for i in 0..16 {
            assert_eq!(c.write(0, i * MIB, &pattern, ReqFlags::empty()), 0);
        }
        assert_eq!(c.flush(0), 0);
    }
    a.detach("vm");
    for r in ["r1", "r2"] {
        let f = copy_of(r, &a.env.replica_image(r));
        assert!(
            f[..pattern.len()] == pattern[..],
            "precondition: the old volume's data is on {r}"
        );
    }
    a.cli_ok(&["volume", "delete", VOLUME]);

    // Nothing may still call the old copies in sync.
    let mut problems = Vec::new();
    let rec = Authority::open(&a.env.authority)
        .unwrap()
        .load(VOLUME)
        .unwrap();
    if let Some(v) = rec {
        let in_sync: Vec<&str> = v
            .record
            .replicas
            .iter()
            .filter(|m| m.in_sync)
            .map(|m| m.addr.as_str())
            .collect();
        if !in_sync.is_empty() {
            problems.push(format!(
                "after `volume delete {VOLUME}` the authority still records {in_sync:?} as \
                 in-sync replicas of it (epoch {})",
                v.record.epoch
            ));
        }
    }

    a.create("16M", &[]);
    a.attach("vm", &sock, &[]);
    a.wait_in_sync("vm");
    a.detach("vm");
    let primary = copy_of("the new primary image", &a.primary_image());
    if primary.iter().any(|&b| b != 0) {
        problems.push("the re-created volume's primary image is not blank".to_string());
    }
    for r in ["r1", "r2"] {
        let copy = copy_of(r, &a.env.replica_image(r));
        if let Some(d) = difference(&primary, &copy) {
            let old = copy
                .chunks(MIB as usize)
                .filter(|c| c[..pattern.len()] == pattern[..])
                .count();
            problems.push(format!(
                "replica {r} of the re-created volume is not a copy of its (blank) primary: {d}; \
                 {old} of 16 regions still hold the deleted volume's data"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---------------------------------------------------------------------------------------
// 4. Never two primaries.

#[test]
fn second_attach_of_a_replicated_volume_is_refused() {
    let a = ApiCluster::start();
    a.create("16M", &[]);
    let (s1, s2) = (a.env.path("vm1.sock"), a.env.path("vm2.sock"));
    a.attach("vm-1", &s1, &["--multi-attach"]);
    a.wait_in_sync("vm-1");
    let mut c = Client::connect(&s1, 1, false).unwrap();
    assert_eq!(c.write(0, 0, &[7u8; 4096], ReqFlags::empty()), 0);

    let mut problems = Vec::new();
    let (rc, out, err) = a.d.cli(&a.attach_args("vm-2", &s2, &["--multi-attach"]));
    if rc == 0 {
        problems.push(format!(
            "a second attachment (vm-2) of the replicated volume was accepted: {out}{err}"
        ));
    } else if !format!("{out}{err}").to_lowercase().contains("replicated") {
        problems.push(format!(
            "the refusal of a second attachment should say the volume is replicated: {out}{err}"
        ));
    }
    // vm-1 keeps working.
    if let Err(e) = write_read_back(&mut c, MIB, &[0x5au8; 4096]) {
        problems.push(format!(
            "vm-1's disk stopped working after the second attach: {e}"
        ));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn second_primary_process_is_refused() {
    let mut c = Cluster::start(false, "");
    let mut client = Client::connect(&c.sock, 1, false).unwrap();
    write_ok(&mut client, &mut c.model, 0, &[3u8; 4096]);

    // Same node, authority, image and metadata directory; another socket and health port.
    let sock2 = c.env.path("s2.sock");
    let hp2 = free_port();
    let mut cmd = c
        .env
        .primary_command("a", &c.img, &sock2, &[c.p1, c.p2], hp2, "");
    let mut second = c
        .env
        .spawn_primary(&mut cmd, &sock2, &c.env.path("primary-a-second.log"));
    let mut problems = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut serving_since = None;
    let exit = loop {
        if let Some(s) = second.wait_exit(Duration::from_millis(50)) {
            break Some(s);
        }
        if sock2.exists() {
            // Give it a moment: a refusal may come after the socket.
            let t = *serving_since.get_or_insert_with(Instant::now);
            if t.elapsed() > Duration::from_secs(2) {
                break None;
            }
        }
        if Instant::now() > deadline {
            break None;
        }
    };
    match exit {
        Some(s) if !s.success() => {}
        Some(s) => problems.push(format!("the second primary exited {s}, not an error")),
        None => problems.push(format!(
            "a second primary of {VOLUME} (same node and metadata directory) started{}:\n{}",
            if sock2.exists() { " and serves" } else { "" },
            second.log()
        )),
    }
    second.kill();
    // The first primary keeps serving, unfenced.
    let h = health(c.hp);
    if h["status"] == "fenced" {
        problems.push(format!(
            "the first primary was fenced: {}",
            h["volumes"][0]["fence_reason"]
        ));
    }
    if let Err(e) = write_read_back(&mut client, MIB, &[9u8; 4096]) {
        problems.push(format!("the first primary stopped serving: {e}"));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---------------------------------------------------------------------------------------
// 5. An unclean stop that lost the primary's page cache keeps every acknowledged write.

#[test]
fn unclean_stop_keeps_writes_only_the_replicas_have() {
    let mut c = Cluster::start(false, "");
    let mut rng = Rng(5);
    {
        let mut client = Client::connect(&c.sock, 1, false).expect("connect");
        // W1: even MiBs, flushed.
        write_chunks(
            &mut client,
            &mut c.model,
            &mut rng,
            (0..32).map(|i| 2 * i * MIB),
        );
        assert_eq!(client.flush(0), 0, "flush");
        let flushed = std::fs::read(&c.img).unwrap();
        // W2: odd MiBs, and new data over half of W1, acknowledged but not flushed.
        write_chunks(
            &mut client,
            &mut c.model,
            &mut rng,
            (0..32).map(|i| (2 * i + 1) * MIB + 4096),
        );
        write_chunks(
            &mut client,
            &mut c.model,
            &mut rng,
            (0..16).map(|i| 4 * i * MIB),
        );
        // Killed at once, with the guest still connected: the primary has had no time to
        // write W2 back itself (the fault below is valid only for data it never synced).
        c.primary.kill();
        drop(client);
        // A host crash: the page cache with W2 is gone, the file holds what was flushed.
        std::fs::write(&c.img, &flushed).unwrap();
    }
    // Precondition: every acknowledged write is durable on both replicas.
    for r in ["r1", "r2"] {
        let copy = copy_of(r, &c.env.replica_image(r));
        c.model
            .check(&format!("replica {r} before the restart"), &copy);
    }
    let (sock2, hp2) = (c.env.path("s2.sock"), free_port());
    let mut a = c.env.primary("a", &c.img, &sock2, &[c.p1, c.p2], hp2, "");
    wait_in_sync(hp2, &[c.p1, c.p2], Duration::from_secs(60));
    read_back(
        &sock2,
        &c.model,
        "read back through the primary restarted after an unclean stop that lost its \
         unflushed (acknowledged) writes",
    );
    assert!(a.terminate().success(), "{}", a.log());
    c.check_copies("After the unclean stop and recovery, the copies must be identical.");
}

// ---------------------------------------------------------------------------------------
// 6. Overlapping writes in flight at once leave identical copies.

/// Rounds of the overlap test.
const OVERLAP_ROUNDS: usize = 1000;
/// Writes in flight per queue in each round.
const OVERLAP_DEPTH: usize = 4;

/// How the overlap test's primary is set up.
#[derive(Clone, Copy, Debug)]
struct Overlap {
    queues: usize,
    depth: usize,
    rounds: usize,
    /// A sparse image (O_DIRECT writes into holes are punted to io_uring's workers, so the
    /// local completion order varies even more) or a written one.
    sparse: bool,
    direct: bool,
}

/// Runs rounds of overlapping writes: in each round, `depth` writes per queue, all within
/// one 48 KiB window, each with its own data, in flight at once. Then stops the primary and
/// compares the copies; `Err` says how they differ.
fn overlapping_writes(o: Overlap) -> Result<(), String> {
    let env = Env::new(false);
    let (p1, p2, hp) = (free_port(), free_port(), free_port());
    let _r1 = env.replica("r1", p1);
    let _r2 = env.replica("r2", p2);
    let img = env.path("img");
    if o.sparse {
        common::make_image(&img, SIZE);
    } else {
        make_image(&img, None);
    }
    let sock = env.path("s.sock");
    let extra = format!(
        ",queues={},direct={}",
        o.queues,
        if o.direct { "on" } else { "off" }
    );
    let mut primary = env.primary("a", &img, &sock, &[p1, p2], hp, &extra);
    wait_in_sync(hp, &[p1, p2], Duration::from_secs(30));

    let mut c = Client::connect(&sock, o.queues as i32, false).expect("connect");
    let mut rng = Rng(6);
    let slot = 64 << 10;
    let mut tag = 0u8;
    for round in 0..o.rounds {
        let window = rng.below(SIZE / 4096 - 12) * 4096;
        for k in 0..o.depth {
            for q in 0..o.queues {
                // 16-32 KiB somewhere in the window: every write of the round overlaps the
                // others. Each write has its own byte value (memset: cheap in a debug build).
                let len = (4 + rng.below(5) as usize) * 4096;
                let offset = window + rng.below(((48 << 10) - len as u64) / 4096 + 1) * 4096;
                let at = (k * o.queues + q) * slot;
                tag = tag % 250 + 1;
                c.buf()[at..at + len].fill(tag);
                // SAFETY: the buffer stays mapped and untouched until the round completes.
                let p = unsafe { c.buf.add(at) };
                c.queues[q].write(offset, p, len, round, ReqFlags::empty());
                let mut none: [MaybeUninit<Completion>; 0] = [];
                c.queues[q].do_io(&mut none, 0, None, None).expect("submit");
            }
        }
        for q in 0..o.queues {
            let mut done = [const { MaybeUninit::<Completion>::uninit() }; 16];
            let mut timeout = Duration::from_secs(20);
            let n = c.queues[q]
                .do_io(&mut done[..o.depth], o.depth, Some(&mut timeout), None)
                .expect("completions");
            assert_eq!(n, o.depth, "round {round}: completions on queue {q}");
            for d in &done[..n] {
                // SAFETY: do_io initialized the first `n` completions.
                let ret = unsafe { d.assume_init_read() }.ret;
                assert_eq!(ret, 0, "round {round}: a write failed on queue {q}");
            }
        }
    }
    drop(c);
    let summary: Vec<String> = [p1, p2].iter().map(|&p| replica_summary(hp, p)).collect();
    assert!(primary.terminate().success(), "{}", primary.log());
    let local = copy_of("the primary image", &img);
    let r1 = copy_of("r1", &env.replica_image("r1"));
    let r2 = copy_of("r2", &env.replica_image("r2"));
    let mut problems = Vec::new();
    for (r, copy) in [("r1", &r1), ("r2", &r2)] {
        if let Some(d) = difference(&local, copy) {
            problems.push(format!("replica {r} differs from the primary image: {d}"));
        }
    }
    if let Some(d) = difference(&r1, &r2) {
        problems.push(format!("r2 differs from r1: {d}"));
    }
    if problems.is_empty() {
        return Ok(());
    }
    Err(format!(
        "after {} rounds of overlapping writes on {} queue(s) ({} in flight per queue), all \
         acknowledged and every replica in sync ({summary:?}):\n{}",
        o.rounds,
        o.queues,
        o.depth,
        problems.join("\n")
    ))
}

#[test]
fn overlapping_writes_leave_identical_copies() {
    let r = overlapping_writes(Overlap {
        queues: 2,
        depth: OVERLAP_DEPTH,
        rounds: OVERLAP_ROUNDS,
        sparse: true,
        direct: true,
    });
    if let Err(e) = r {
        panic!("{e}");
    }
}

/// The same on one queue: several overlapping writes in flight on one virtqueue.
#[test]
fn overlapping_writes_on_one_queue_leave_identical_copies() {
    let r = overlapping_writes(Overlap {
        queues: 1,
        depth: OVERLAP_DEPTH,
        rounds: OVERLAP_ROUNDS / 4,
        sparse: true,
        direct: true,
    });
    if let Err(e) = r {
        panic!("{e}");
    }
}

// ---------------------------------------------------------------------------------------
// 7. Smaller ones.

/// (a) A dirty bitmap with no valid slot means "everything may differ", not "nothing".
#[test]
fn unreadable_dirty_bitmap_fails_closed() {
    let mut c = Cluster::start(false, "");
    c.write_every_region(71);
    c.r2.kill();
    wait_not_in_sync(c.hp, c.p2);
    // Recorded out of sync; these writes are marked in r2's bitmap only.
    {
        let mut client = Client::connect(&c.sock, 1, false).unwrap();
        let mut rng = Rng(72);
        write_chunks(
            &mut client,
            &mut c.model,
            &mut rng,
            (0..32).map(|i| 2 * i * MIB + 8192),
        );
    }
    let (state, dirty, _) = replica_state(c.hp, c.p2);
    assert!(
        state == "out-of-sync" && dirty > 0,
        "r2 is out of sync with dirty regions: {state}, {dirty}"
    );
    c.stop_primary();
    let bitmap = c
        .env
        .path(&format!("img.ferrodisk/dirty-127.0.0.1_{}", c.p2));
    let len = std::fs::metadata(&bitmap)
        .unwrap_or_else(|e| panic!("r2's dirty bitmap {}: {e}", bitmap.display()))
        .len();
    assert!(len > 0, "the bitmap file is empty");
    let mut garbage = vec![0u8; len as usize];
    Rng(73).fill(&mut garbage);
    std::fs::write(&bitmap, &garbage).unwrap();

    c.r2 = c.env.replica("r2", c.p2);
    let (sock2, hp2) = (c.env.path("s2.sock"), free_port());
    let mut a = c.env.primary("a", &c.img, &sock2, &[c.p1, c.p2], hp2, "");
    wait_in_sync(hp2, &[c.p1, c.p2], Duration::from_secs(60));
    let summary = replica_summary(hp2, c.p2);
    assert!(a.terminate().success(), "{}", a.log());
    c.check_copies(&format!(
        "r2 missed 32 writes, recorded only in a dirty bitmap that was then overwritten with \
         garbage; r2 was called in sync again ({summary})."
    ));
}

/// (b) A fault that could not be recorded in the authority makes the next start unclean.
#[test]
fn clean_stop_is_recorded_only_when_every_fault_was() {
    let mut c = Cluster::start(true, "");
    let w = Writer::start_patient(&c.sock, c.model.clone(), 7, SIZE);
    w.wait_acked(100);
    c.env.etcd.as_mut().unwrap().kill(0);
    // Every replica is in sync: writes need no authority.
    w.wait_acked(20);
    c.r1.kill();
    // The primary cannot record r1's fault: the writes in flight wait for the authority.
    wait_not_in_sync(c.hp, c.p1);
    std::thread::sleep(Duration::from_secs(1));
    w.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    c.model = w.finish();
    // The stalled writes keep the drain waiting (30 s); then the primary stops.
    let stopped = c.primary.terminate_within(Duration::from_secs(90));
    c.env.etcd.as_mut().unwrap().restart(0);
    c.r1 = c.env.replica("r1", c.p1);
    let (sock2, hp2) = (c.env.path("s2.sock"), free_port());
    let mut a = c.env.primary("a", &c.img, &sock2, &[c.p1, c.p2], hp2, "");
    wait_in_sync(hp2, &[c.p1, c.p2], Duration::from_secs(60));
    let summary = replica_summary(hp2, c.p1);
    assert!(a.terminate().success(), "{}", a.log());
    c.check_copies(&format!(
        "r1 was killed while the authority was unreachable, so its fault was never recorded; \
         the primary then stopped ({stopped:?}) and was restarted: r1 must not be trusted \
         ({summary})."
    ));
}

/// (c) `volume resize` of a replicated volume that is not attached is refused.
#[test]
fn resizing_a_detached_replicated_volume_is_refused() {
    let a = ApiCluster::start();
    a.create("16M", &[]);
    let sock = a.env.path("v.sock");
    a.attach("vm", &sock, &[]);
    a.wait_in_sync("vm");
    a.detach("vm");
    let (rc, out, err) = a.d.cli(&["volume", "resize", VOLUME, "--size", "32M"]);
    let len = std::fs::metadata(a.primary_image()).unwrap().len();
    assert!(
        rc != 0 && len == 16 * MIB,
        "resizing a detached replicated volume must be refused (docs/api.md): exit {rc} \
         ({out}{err}), the primary image is now {len} bytes (was {})",
        16 * MIB
    );
    let (_, vols) = a.d.call("GET", "/v1/volumes", None);
    assert_eq!(vols[0]["size"], 16 * MIB, "{vols}");
}

/// An ext4 file system on a loop device whose backing file lives on a small tmpfs: once the
/// tmpfs is full, writing back the file system's new blocks fails, so `fdatasync` fails
/// (`ENOSPC`, then `EIO`) although `write` succeeded. No journal and `errors=continue`, so
/// the file system works again once space is freed. Unmounted on drop.
struct ThinFs {
    tmpfs: PathBuf,
    mnt: PathBuf,
    /// Holds the mount points; removed after they are unmounted.
    _dir: tempfile::TempDir,
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} is needed (root, e2fsprogs, loop devices): {e}"));
    assert!(
        out.status.success(),
        "{cmd} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl ThinFs {
    fn mount() -> ThinFs {
        assert!(
            Path::new("/dev/loop-control").exists(),
            "the flush-failure test needs loop devices (/dev/loop-control)"
        );
        let dir = tempfile::tempdir().unwrap();
        let (tmpfs, mnt) = (dir.path().join("tmpfs"), dir.path().join("mnt"));
        std::fs::create_dir_all(&tmpfs).unwrap();
        std::fs::create_dir_all(&mnt).unwrap();
        run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                "size=24m",
                "tmpfs",
                tmpfs.to_str().unwrap(),
            ],
        );
        let fs = ThinFs {
            tmpfs,
            mnt,
            _dir: dir,
        };
        let disk = fs.tmpfs.join("disk");
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(32 * MIB)
            .unwrap();
        run(
            "mkfs.ext4",
            &[
                "-q",
                "-F",
                "-O",
                "^has_journal",
                "-E",
                "lazy_itable_init=0",
                disk.to_str().unwrap(),
            ],
        );
        run(
            "mount",
            &[
                "-o",
                "loop,errors=continue",
                disk.to_str().unwrap(),
                fs.mnt.to_str().unwrap(),
            ],
        );
        fs
    }

    /// Fills the tmpfs under the file system: its unwritten blocks can no longer be stored.
    fn exhaust(&self) {
        let mut f = std::fs::File::create(self.tmpfs.join("hog")).unwrap();
        let chunk = vec![0xeeu8; 1 << 20];
        use std::io::Write;
        while f.write_all(&chunk).is_ok() {}
    }

    fn release(&self) {
        std::fs::remove_file(self.tmpfs.join("hog")).unwrap();
    }
}

impl Drop for ThinFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).output();
        let _ = Command::new("umount").arg("-l").arg(&self.tmpfs).output();
    }
}

/// Established TCP connections to `port` on loopback made from this host (the primary's
/// links to the replica listening there), from /proc/net/tcp.
fn connections_to(port: u16) -> usize {
    let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap();
    tcp.lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3
                && f[3] == "01"
                && f[2]
                    .rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
                    == Some(port)
        })
        .count()
}

/// (d) A detach whose flush fails still stops the replication links.
#[test]
fn failed_flush_at_detach_still_stops_the_links() {
    let fs = ThinFs::mount();
    let env = Env::new(false);
    let (p1, p2) = (free_port(), free_port());
    let _r1 = env.replica("r1", p1);
    let _r2 = env.replica("r2", p2);
    let key = env.key.display().to_string();
    let d = ApiDaemon::start(
        env.dir.path(),
        &[
            "--authority",
            &env.authority,
            "--node",
            "api-node",
            "--replication-key",
            &key,
            "--volume-root",
            fs.mnt.to_str().unwrap(),
        ],
    );
    let a = ApiCluster {
        env,
        p1,
        p2,
        _r1,
        _r2,
        d,
    };
    let img = fs.mnt.join("v.img");
    a.create("8M", &["--path", img.to_str().unwrap()]);
    // Opened before the write-back fails, so its own fdatasync reports the failure too.
    let probe = std::fs::File::open(&img).unwrap();
    let sock = a.env.path("v.sock");
    a.attach("vm", &sock, &[]);
    a.wait_in_sync("vm");
    assert!(
        connections_to(p1) > 0 && connections_to(p2) > 0,
        "precondition: /proc/net/tcp shows the primary's connections to both replicas"
    );
    {
        let mut c = Client::connect(&sock, 1, false).unwrap();
        let data = vec![0x33u8; MIB as usize];
        assert_eq!(c.write(0, MIB, &data, ReqFlags::empty()), 0);
    }
    fs.exhaust();
    let (rc, out, err) = a.d.cli(&["detach", &format!("{VOLUME}@vm")]);
    assert!(
        probe.sync_data().is_err(),
        "precondition: the write-back of the volume must fail (detach: {rc} {out}{err})"
    );
    let mut problems = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while connections_to(p1) + connections_to(p2) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let left = connections_to(p1) + connections_to(p2);
    if left > 0 {
        problems.push(format!(
            "5 s after a detach whose flush failed (detach exit {rc}), the daemon still holds \
             {left} connection(s) to the replicas: the link threads were not stopped"
        ));
    }
    // Space again: the volume attaches and works.
    fs.release();
    let (rc, out, err) = a.d.cli(&a.attach_args("vm", &sock, &[]));
    if rc != 0 {
        problems.push(format!("re-attach after the failed flush: {out}{err}"));
    } else {
        a.wait_in_sync("vm");
        let mut c = Client::connect(&sock, 1, false).unwrap();
        if let Err(e) = write_read_back(&mut c, 2 * MIB, &[0x44u8; 65536]) {
            problems.push(format!("the re-attached disk does not work: {e}"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---------------------------------------------------------------------------------------
// Found by the review and the simulation: a replica removed from the membership and added
// back later must not be trusted with the bitmap it had then.

/// r2 is dropped (a clean restart with only r1), every region is written, and r2 is added
/// back (a clean restart with both). Its old bitmap file says "nothing missing" for the
/// identity r2 still reports: trusting it would record r2 in sync without a single write
/// made while it was away. It must be rebuilt, and end byte-identical.
#[test]
fn a_replica_added_back_is_not_trusted_with_its_old_bitmap() {
    let mut c = Cluster::start(false, "");
    c.write_every_region(5);
    c.stop_primary();
    c.hp = free_port();
    let p1 = c.p1;
    c.primary = c.env.primary("a", &c.img, &c.sock, &[p1], c.hp, "");
    wait_in_sync(c.hp, &[p1], Duration::from_secs(30));
    c.write_every_region(6);
    c.restart_primary("");
    c.stop_primary();
    c.check_copies("A replica added back must be rebuilt, not trusted with its old bitmap.");
}

// ---------------------------------------------------------------------------------------
// Found by the review: a failed sync of the primary's copy must stop it. Linux reports a
// writeback error once; the pages the disk lacks may then leave the page cache, and a read
// would return what was there before an acknowledged write.

/// The primary's backing lives on a file system whose writeback fails: a guest flush fails,
/// the disk is fenced (reads fail too, even once the page cache no longer holds the lost
/// write), and the restart pulls the lost write back from a replica.
#[test]
fn a_failed_flush_fences_and_the_restart_pulls_back_what_the_disk_lost() {
    const LEN: u64 = 8 * MIB;
    let fs = ThinFs::mount();
    let env = Env::new(false);
    let (p1, p2) = (free_port(), free_port());
    let _r1 = env.replica("r1", p1);
    let _r2 = env.replica("r2", p2);
    let img = fs.mnt.join("img");
    // Sparse: writing back a write needs new blocks, which the full tmpfs cannot store.
    std::fs::File::create(&img).unwrap().set_len(LEN).unwrap();
    let mut model = Model::new(vec![0u8; LEN as usize]);
    let sock = env.path("s.sock");
    let meta = format!(",meta={}", env.path("meta").display());
    let mut hp = free_port();
    let mut primary = env.primary("a", &img, &sock, &[p1, p2], hp, &meta);
    wait_in_sync(hp, &[p1, p2], Duration::from_secs(30));
    let mut c = Client::connect(&sock, 1, false).unwrap();
    let mut rng = Rng(12);
    let mut data = vec![0u8; MIB as usize];
    rng.fill(&mut data);
    assert_eq!(c.write(0, 2 * MIB, &data, ReqFlags::empty()), 0);
    model.record(2 * MIB, &data);
    fs.exhaust();
    let flushed = c.flush(0);
    assert_ne!(
        flushed, 0,
        "precondition: the flush must fail once the file system cannot write back"
    );
    // The page cache lets go of the pages the disk lacks (memory pressure would).
    ferrodisk::sys::drop_page_cache(&std::fs::File::open(&img).unwrap()).unwrap();
    let mut problems = Vec::new();
    match c.read(0, 2 * MIB, data.len()) {
        Err(_) => {}
        Ok(got) if got == data => problems.push(
            "precondition lost: the write was still readable after the failed flush and the \
             cache drop (the test no longer shows anything)"
                .to_string(),
        ),
        Ok(_) => problems.push(
            "after a failed flush the disk served a read that lacks an acknowledged write"
                .to_string(),
        ),
    }
    let status = health(hp)["volumes"][0]["status"].clone();
    if status != "fenced" {
        problems.push(format!(
            "after a failed flush /health says {status}, not fenced"
        ));
    }
    drop(c);
    primary.kill();
    fs.release();
    let on_disk = read_file(&img);
    assert_ne!(
        &on_disk[2 * MIB as usize..3 * MIB as usize],
        &data[..],
        "precondition: the backing file must lack the write (else nothing was lost)"
    );
    hp = free_port();
    let _primary = env.primary("a", &img, &sock, &[p1, p2], hp, &meta);
    wait_in_sync(hp, &[p1, p2], Duration::from_secs(60));
    let mut c = Client::connect(&sock, 1, false).unwrap();
    let mut got = Vec::new();
    for off in (0..LEN).step_by(MIB as usize) {
        got.extend(
            c.read(0, off, MIB as usize)
                .expect("read after the restart"),
        );
    }
    model.check("read through the restarted primary", &got);
    drop(c);
    for r in ["r1", "r2"] {
        let copy = read_file(&env.replica_image(r));
        if copy != got {
            problems.push(format!(
                "replica {r} differs from the primary after the restart"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
