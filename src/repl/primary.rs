//! The primary side of replication: the pipeline stage between the queue workers and the
//! engine for a replicated disk.
//!
//! A worker calls [`Replication::begin`] for every write, discard and write-zeroes before it
//! hands the request to its engine. For each replica [`Link`]:
//! - in sync (or resyncing): the data is sent at once with its crc32c, and the request
//!   completes only when the local write and the replica's durable acknowledgement are both
//!   in (the acknowledgement arrives in the worker's [`Mailbox`]);
//! - out of sync: the regions the write touches are marked in the link's persistent dirty
//!   bitmap, durably, before the write is submitted.
//!
//! Each link has a thread that reads acknowledgements, detects failures (disconnect, error,
//! or no answer within the timeout), and resyncs. On a failure it marks every write still
//! waiting for that replica in the bitmap, records the replica as out of sync in the
//! authority, and only then lets those writes complete. If the authority says we are no
//! longer the primary, or a replica refuses our epoch, the disk is fenced: every request
//! fails with IOERR from then on.
//!
//! Resync runs on the link thread while guest I/O goes on: for each dirty region it compares
//! checksums and copies the region only if they differ. A region is copied only if no write
//! to it was in flight or started while it was read (per-region generation and in-flight
//! counters); otherwise it is retried. New writes are forwarded to a resyncing replica in
//! order on the same connection, so a copy can never overwrite newer data.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::authority::{Authority, AuthorityError};
use super::bitmap::DirtyMap;
use super::wire::{self, Code, Key, Msg};
use crate::request::Op;

/// Settings of a replicated disk.
#[derive(Debug, Clone)]
pub struct ReplConfig {
    pub volume: String,
    pub replicas: Vec<String>,
    pub node: String,
    pub timeout: Duration,
    /// Resync bandwidth limit in bytes per second (0: unlimited).
    pub resync_rate: u64,
    pub region_bytes: u64,
    /// Where the dirty bitmaps and the clean-shutdown marker live.
    pub meta_dir: PathBuf,
}

pub const DEFAULT_REGION: u64 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum LinkState {
    InSync = 0,
    /// A fault was seen; the link thread is recording it. Writes wait for it.
    Failing = 1,
    /// Recorded as out of sync; writes mark the dirty bitmap instead of being sent.
    OutOfSync = 2,
    /// Connected again and catching up; writes are sent, dirty regions are being copied.
    Resyncing = 3,
}

impl LinkState {
    fn from_u8(v: u8) -> LinkState {
        match v {
            0 => LinkState::InSync,
            1 => LinkState::Failing,
            2 => LinkState::OutOfSync,
            _ => LinkState::Resyncing,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            LinkState::InSync => "in-sync",
            LinkState::Failing => "failing",
            LinkState::OutOfSync => "out-of-sync",
            LinkState::Resyncing => "resyncing",
        }
    }
}

/// Replica acknowledgements for one queue's worker.
pub struct Mailbox {
    items: Mutex<Vec<Delivery>>,
    ready: AtomicBool,
    event: EventFd,
}

/// The outcome of one request on one replica.
#[derive(Debug, Clone, Copy)]
pub struct Delivery {
    pub connection: u64,
    pub head: u16,
    pub ok: bool,
}

impl Mailbox {
    fn new() -> io::Result<Mailbox> {
        Ok(Mailbox {
            items: Mutex::new(Vec::new()),
            ready: AtomicBool::new(false),
            event: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    fn post(&self, d: Delivery) {
        self.items.lock().unwrap_or_else(|p| p.into_inner()).push(d);
        // One wake-up per batch: the eventfd is written only when the mailbox goes from
        // taken to non-empty. `take` clears `ready` before it locks the items, so a post
        // that finds `ready` set has pushed before that lock and is taken with the rest
        // (both sides SeqCst).
        if !self.ready.swap(true, Ordering::SeqCst) {
            let _ = self.event.write(1);
        }
    }

    /// Whether deliveries are waiting (no system call).
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Takes every delivery.
    pub fn take(&self, out: &mut Vec<Delivery>) {
        let _ = self.event.read();
        self.ready.store(false, Ordering::SeqCst);
        out.append(&mut self.items.lock().unwrap_or_else(|p| p.into_inner()));
    }

    pub fn fd(&self) -> i32 {
        use std::os::fd::AsRawFd;
        self.event.as_raw_fd()
    }
}

/// What a sent message is waiting for.
enum Pending {
    Guest {
        queue: usize,
        connection: u64,
        head: u16,
        offset: u64,
        len: u64,
        sent: Instant,
    },
    /// A checksum request for a dirty region; `data` is the local copy read for it.
    Compare {
        region: usize,
        generation: u32,
        data: Vec<u8>,
        sent: Instant,
    },
    Copy {
        region: usize,
        sent: Instant,
    },
}

impl Pending {
    fn sent(&self) -> Instant {
        match self {
            Pending::Guest { sent, .. }
            | Pending::Compare { sent, .. }
            | Pending::Copy { sent, .. } => *sent,
        }
    }

    fn set_sent(&mut self, t: Instant) {
        match self {
            Pending::Guest { sent, .. }
            | Pending::Compare { sent, .. }
            | Pending::Copy { sent, .. } => *sent = t,
        }
    }
}

struct LinkTx {
    sender: Option<wire::Sender>,
    next_seq: u64,
    pending: HashMap<u64, Pending>,
    /// Guest writes queued in `sender` and not written yet. Their `sent` time is set when
    /// they are written, so that time spent queued (behind another replica's slow send in
    /// the same flush) never counts against this replica's timeout.
    unsent: Vec<u64>,
}

impl LinkTx {
    /// Everything waiting for this link, which stops waiting here.
    fn take_pending(&mut self) -> Vec<Pending> {
        self.unsent.clear();
        self.pending.drain().map(|(_, p)| p).collect()
    }

    /// Writes the queued frames; on success, starts their timeout clocks.
    fn flush(&mut self) -> std::io::Result<()> {
        let Some(s) = &mut self.sender else {
            return Ok(());
        };
        let r = if s.has_queued() { s.flush() } else { Ok(()) };
        if r.is_ok() && !self.unsent.is_empty() {
            let now = Instant::now();
            for seq in self.unsent.drain(..) {
                if let Some(p) = self.pending.get_mut(&seq) {
                    p.set_sent(now);
                }
            }
        }
        r
    }
}

/// Counters of one link, for the health endpoint and stats.
#[derive(Default)]
pub struct LinkCounters {
    pub writes: AtomicU64,
    pub failures: AtomicU64,
    pub resynced_regions: AtomicU64,
    pub resync_bytes: AtomicU64,
    pub compared_regions: AtomicU64,
}

/// One replica of the disk.
pub struct Link {
    pub addr: String,
    idx: usize,
    state: AtomicU8,
    tx: Mutex<LinkTx>,
    pub counters: LinkCounters,
    /// Regions left to resync when the current resync started, for progress.
    pub resync_total: AtomicU64,
    /// Whether the authority currently records this replica as in sync.
    recorded_in_sync: AtomicBool,
    last_error: Mutex<String>,
}

impl Link {
    pub fn state(&self) -> LinkState {
        LinkState::from_u8(self.state.load(Ordering::SeqCst))
    }

    fn set_state(&self, s: LinkState) {
        self.state.store(s as u8, Ordering::SeqCst);
    }

    fn tx(&self) -> MutexGuard<'_, LinkTx> {
        self.tx.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn last_error(&self) -> String {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_error(&self, e: String) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = e;
    }
}

/// Per-region counters that let a resync copy a region without racing guest writes.
struct Regions {
    generation: Vec<AtomicU32>,
    in_flight: Vec<AtomicU32>,
    bytes: u64,
}

impl Regions {
    fn span(&self, offset: u64, len: u64) -> std::ops::Range<usize> {
        if len == 0 {
            return 0..0;
        }
        let n = self.generation.len();
        let first = (offset / self.bytes) as usize;
        let last = ((offset + len - 1) / self.bytes) as usize;
        first.min(n)..(last + 1).min(n)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReplError {
    #[error(transparent)]
    Authority(#[from] AuthorityError),
    #[error("replication metadata in {path}")]
    Meta {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start replication: {0}")]
    Start(io::Error),
    #[error("cannot open the local copy {path}")]
    Local {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What a daemon needs to serve replicated disks (`serve --authority --node
/// --replication-key`), shared by its `--disk` disks and its API attachments.
#[derive(Clone)]
pub struct ReplContext {
    pub authority: Authority,
    pub key: Key,
    pub node: String,
}

/// Starts replication for `disk` (its `volume=`, `replicas=` and timing keys), reading the
/// local copy from `path` and keeping the bitmaps in `meta_dir`.
pub fn start_for_disk(
    disk: &crate::disk::Disk,
    path: &std::path::Path,
    ctx: &ReplContext,
    meta_dir: PathBuf,
) -> Result<Arc<Replication>, ReplError> {
    let c = &disk.config;
    let local = File::open(path).map_err(|source| ReplError::Local {
        path: path.to_path_buf(),
        source,
    })?;
    let cfg = ReplConfig {
        volume: c.volume.clone().unwrap_or_default(),
        replicas: c.replicas.clone(),
        node: ctx.node.clone(),
        timeout: Duration::from_millis(u64::from(c.replica_timeout_ms)),
        resync_rate: u64::from(c.resync_mbps) << 20,
        region_bytes: DEFAULT_REGION,
        meta_dir,
    };
    Replication::start(
        cfg,
        ctx.authority.clone(),
        ctx.key.clone(),
        local,
        disk.capacity_bytes(),
        usize::from(c.queues),
    )
}

/// A request the replication stage cannot take (fenced, or a bitmap could not be made
/// durable): it fails with IOERR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused;

/// The replication state of one disk, shared by its workers and its link threads.
pub struct Replication {
    pub config: ReplConfig,
    authority: Authority,
    key: Key,
    pub epoch: u64,
    /// The volume's incarnation in the authority, sent in every `Open`.
    uuid: String,
    disk_bytes: u64,
    /// A page-cache descriptor of the local copy, for resync reads.
    local: File,
    pub links: Vec<Arc<Link>>,
    maps: Vec<Mutex<DirtyMap>>,
    /// Each link's receiving half, handed from `start` to the link thread.
    receivers: Vec<Mutex<Option<wire::Receiver>>>,
    regions: Regions,
    fenced: AtomicBool,
    fence_reason: Mutex<String>,
    mailboxes: Vec<Mailbox>,
    /// Writes between reading link states and marking their bitmaps (see `begin`).
    unforwarded: AtomicUsize,
    connection: AtomicU64,
    stop: AtomicBool,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

const CLEAN_MARKER: &str = "clean";

fn map_name(addr: &str) -> String {
    let safe: String = addr
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("dirty-{safe}")
}

impl Replication {
    /// Takes the volume over as its primary (bumping the epoch in the authority), opens the
    /// dirty bitmaps, connects to the in-sync replicas, and starts one thread per replica.
    pub fn start(
        config: ReplConfig,
        authority: Authority,
        key: Key,
        local: File,
        disk_bytes: u64,
        queues: usize,
    ) -> Result<Arc<Replication>, ReplError> {
        let meta = |source| ReplError::Meta {
            path: config.meta_dir.clone(),
            source,
        };
        std::fs::create_dir_all(&config.meta_dir).map_err(meta)?;
        let marker = config.meta_dir.join(CLEAN_MARKER);
        // A start is clean only if this node stopped cleanly as the volume's primary at the
        // epoch the authority still holds: then every write was drained to every in-sync
        // replica. A promoted node, a node whose metadata is new, or a node whose epoch was
        // superseded meanwhile is not (found by the simulation, tests/replication_sim.rs).
        let before = authority.load(&config.volume)?;
        let marker_epoch: Option<u64> = std::fs::read_to_string(&marker)
            .ok()
            .and_then(|s| s.trim().parse().ok());
        let clean = match &before {
            None => true, // a new volume: no copy can differ yet
            Some(v) => v.record.primary == config.node && marker_epoch == Some(v.record.epoch),
        };
        // From now until a clean stop, a crash counts as unclean.
        if marker.exists() {
            std::fs::remove_file(&marker).map_err(meta)?;
            File::open(&config.meta_dir)
                .and_then(|d| d.sync_all())
                .map_err(meta)?;
        }

        let mut record =
            authority.take_over(&config.volume, &config.node, &config.replicas, None)?;
        if !clean {
            // In-flight writes may differ between the copies: every replica resyncs first.
            let in_sync: Vec<String> = record
                .replicas
                .iter()
                .filter(|m| m.in_sync)
                .map(|m| m.addr.clone())
                .collect();
            for addr in &in_sync {
                record = authority.set_in_sync(
                    &config.volume,
                    &config.node,
                    record.epoch,
                    addr,
                    false,
                )?;
            }
        }
        tracing::info!(
            volume = %config.volume,
            epoch = record.epoch,
            authority = %authority.describe(),
            clean,
            "took the volume over as primary"
        );
        let mut maps = Vec::new();
        let mut links = Vec::new();
        for (idx, addr) in config.replicas.iter().enumerate() {
            let path = config.meta_dir.join(map_name(addr));
            let existed = path.exists();
            let mut map =
                DirtyMap::open(&path, disk_bytes, config.region_bytes).map_err(|source| {
                    ReplError::Meta {
                        path: path.clone(),
                        source,
                    }
                })?;
            let in_sync = record.member(addr).is_some_and(|m| m.in_sync);
            let was_member = before
                .as_ref()
                .is_some_and(|v| v.record.member(addr).is_some());
            if in_sync {
                // Clean start of an in-sync replica: nothing differs.
                for r in 0..map.regions() {
                    map.clear(r);
                }
            } else if !was_member || !existed || !clean {
                // A new or re-added replica (its old bitmap missed what was written while
                // it was not a member), or an unclean stop: any region may differ.
                map.set_all();
            }
            map.persist().map_err(|source| ReplError::Meta {
                path: path.clone(),
                source,
            })?;
            maps.push(Mutex::new(map));
            links.push(Arc::new(Link {
                addr: addr.clone(),
                idx,
                state: AtomicU8::new(if in_sync {
                    LinkState::InSync
                } else {
                    LinkState::OutOfSync
                } as u8),
                tx: Mutex::new(LinkTx {
                    sender: None,
                    next_seq: 1,
                    pending: HashMap::new(),
                    unsent: Vec::new(),
                }),
                counters: LinkCounters::default(),
                resync_total: AtomicU64::new(0),
                recorded_in_sync: AtomicBool::new(in_sync),
                last_error: Mutex::new(String::new()),
            }));
        }
        let n = disk_bytes.div_ceil(config.region_bytes) as usize;
        let repl = Arc::new(Replication {
            regions: Regions {
                generation: (0..n).map(|_| AtomicU32::new(0)).collect(),
                in_flight: (0..n).map(|_| AtomicU32::new(0)).collect(),
                bytes: config.region_bytes,
            },
            epoch: record.epoch,
            uuid: record.uuid.clone(),
            authority,
            key,
            disk_bytes,
            local,
            receivers: links.iter().map(|_| Mutex::new(None)).collect(),
            links,
            maps,
            fenced: AtomicBool::new(false),
            fence_reason: Mutex::new(String::new()),
            mailboxes: (0..queues)
                .map(|_| Mailbox::new())
                .collect::<io::Result<_>>()
                .map_err(ReplError::Start)?,
            unforwarded: AtomicUsize::new(0),
            connection: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            threads: Mutex::new(Vec::new()),
            config,
        });
        // In-sync replicas must accept our epoch before we serve; one that cannot is
        // recorded as out of sync first.
        for link in &repl.links {
            if link.state() == LinkState::InSync {
                match repl.connect(link) {
                    Ok(r) => {
                        *repl.receivers[link.idx]
                            .lock()
                            .unwrap_or_else(|p| p.into_inner()) = Some(r);
                    }
                    Err(e) => {
                        tracing::warn!(volume = %repl.config.volume, replica = %link.addr, "in-sync replica unreachable at start: {e}");
                        link.set_error(e.clone());
                        link.set_state(LinkState::Failing);
                        repl.record_failure(link, &e);
                    }
                }
            }
        }
        if repl.is_fenced() {
            return Err(ReplError::Authority(AuthorityError::Refused(format!(
                "fenced while starting: {}",
                repl.fence_reason()
            ))));
        }
        for link in &repl.links {
            let (r, l) = (Arc::clone(&repl), Arc::clone(link));
            let t = std::thread::Builder::new()
                .name(format!("link-{}", link.addr))
                .spawn(move || r.link_thread(&l))
                .map_err(ReplError::Start)?;
            repl.threads
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(t);
        }
        Ok(repl)
    }

    pub fn mailbox(&self, queue: usize) -> &Mailbox {
        &self.mailboxes[queue]
    }

    /// A new frontend connection: acknowledgements for the old one are ignored from now on.
    pub fn new_connection(&self) -> u64 {
        self.connection.fetch_add(1, Ordering::SeqCst) + 1
    }

    pub fn current_connection(&self) -> u64 {
        self.connection.load(Ordering::SeqCst)
    }

    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::Acquire)
    }

    pub fn fence_reason(&self) -> String {
        self.fence_reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn fence(&self, why: &str) {
        if !self.fenced.swap(true, Ordering::AcqRel) {
            tracing::error!(volume = %self.config.volume, epoch = self.epoch, "FENCED, every request now fails: {why}");
            *self.fence_reason.lock().unwrap_or_else(|p| p.into_inner()) = why.to_string();
        }
    }

    /// Dirty regions per replica.
    pub fn dirty_regions(&self, link: usize) -> usize {
        self.maps[link]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .count()
    }

    /// Starts a mutating request (write, discard, write-zeroes). Queues it for the replicas
    /// that get it and marks the bitmaps of those that do not. Returns how many replica
    /// acknowledgements the request must wait for, or `Err` if it must fail (fenced, or a
    /// bitmap could not be made durable). After `Ok`, the caller must call
    /// [`flush`](Self::flush) (once for a batch of requests) and
    /// [`end_local`](Self::end_local) when the local I/O is done.
    pub fn begin(
        &self,
        queue: usize,
        connection: u64,
        head: u16,
        op: Op,
        data: &[u8],
    ) -> Result<u32, Refused> {
        if self.is_fenced() {
            return Err(Refused);
        }
        let (offset, len) = match op {
            Op::Write { offset } => (offset, data.len() as u64),
            Op::Discard { offset, len } | Op::WriteZeroes { offset, len, .. } => (offset, len),
            _ => return Ok(0),
        };
        let span = self.regions.span(offset, len);
        for r in span.clone() {
            // In-flight first, then the generation: a resync reads the generation first and
            // the in-flight count second, so it sees at least one of them move (found by
            // the simulation, tests/replication_sim.rs).
            self.regions.in_flight[r].fetch_add(1, Ordering::SeqCst);
            self.regions.generation[r].fetch_add(1, Ordering::SeqCst);
        }
        // Dekker-style handshake with a link that starts resyncing: it waits for this
        // counter to drop to zero after switching state, so a write that saw the old state
        // has set its bits by then.
        self.unforwarded.fetch_add(1, Ordering::SeqCst);
        let mut forward: [Option<&Arc<Link>>; 8] = Default::default();
        let mut nf = 0;
        let mut failed = false;
        for link in &self.links {
            match link.state() {
                LinkState::OutOfSync => {
                    let mut map = self.maps[link.idx]
                        .lock()
                        .unwrap_or_else(|p| p.into_inner());
                    if map.mark(offset, len) {
                        if let Err(e) = map.persist() {
                            tracing::error!(volume = %self.config.volume, "cannot persist the dirty bitmap: {e}");
                            failed = true;
                        }
                    }
                }
                _ if nf < forward.len() => {
                    forward[nf] = Some(link);
                    nf += 1;
                }
                _ => failed = true,
            }
        }
        self.unforwarded.fetch_sub(1, Ordering::SeqCst);
        if failed {
            self.end_local(offset, len);
            return Err(Refused);
        }
        let crc = if matches!(op, Op::Write { .. }) {
            crc32c::crc32c(data)
        } else {
            0
        };
        for link in forward.iter().take(nf).flatten() {
            let mut tx = link.tx();
            let seq = tx.next_seq;
            tx.next_seq += 1;
            tx.pending.insert(
                seq,
                Pending::Guest {
                    queue,
                    connection,
                    head,
                    offset,
                    len,
                    sent: Instant::now(),
                },
            );
            link.counters.writes.fetch_add(1, Ordering::Relaxed);
            let epoch = self.epoch;
            if tx.sender.is_some() {
                tx.unsent.push(seq);
            }
            if let Some(s) = &mut tx.sender {
                let sent = match op {
                    Op::Write { .. } => s.queue_write(seq, epoch, offset, crc, data),
                    Op::Discard { .. } => s.queue(&Msg::Zero {
                        seq,
                        epoch,
                        offset,
                        len,
                        unmap: true,
                    }),
                    Op::WriteZeroes { unmap, .. } => s.queue(&Msg::Zero {
                        seq,
                        epoch,
                        offset,
                        len,
                        unmap,
                    }),
                    _ => Ok(()),
                };
                if sent.is_err() {
                    // The link thread sees the closed socket and handles the failure,
                    // including this request.
                    s.shutdown();
                    tx.sender = None;
                }
            }
        }
        Ok(nf as u32)
    }

    /// Writes the frames [`begin`](Self::begin) queued, on every link: a queue worker calls
    /// it once per batch of requests, so a batch costs one send per replica.
    pub fn flush(&self) {
        for link in &self.links {
            let mut tx = link.tx();
            if tx.flush().is_err() {
                // As in `begin`: the link thread sees the closed socket.
                if let Some(s) = tx.sender.take() {
                    s.shutdown();
                }
            }
        }
    }

    /// The local part of a request started with [`begin`](Self::begin) is done.
    pub fn end_local(&self, offset: u64, len: u64) {
        for r in self.regions.span(offset, len) {
            self.regions.in_flight[r].fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Stops the link threads (after the disk drained) and, if nothing is outstanding,
    /// records a clean stop so that the next start need not resync everything.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::SeqCst);
        for link in &self.links {
            if let Some(s) = &link.tx().sender {
                s.shutdown();
            }
        }
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = t.join();
        }
        let outstanding: usize = self.links.iter().map(|l| l.tx().pending.len()).sum();
        let mut ok = outstanding == 0 && !self.is_fenced();
        for m in &self.maps {
            ok &= m
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .persist()
                .is_ok();
        }
        if ok {
            let marker = self.config.meta_dir.join(CLEAN_MARKER);
            let done = std::fs::write(&marker, self.epoch.to_string())
                .and_then(|()| File::open(&self.config.meta_dir)?.sync_all());
            if let Err(e) = done {
                tracing::warn!("cannot record a clean stop: {e}");
            }
        }
    }

    fn connect(&self, link: &Link) -> Result<wire::Receiver, String> {
        let addr = link
            .addr
            .to_socket_addrs()
            .map_err(|e| format!("{}: {e}", link.addr))?
            .next()
            .ok_or_else(|| format!("{}: no address", link.addr))?;
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .map_err(|e| format!("connect {}: {e}", link.addr))?;
        let (mut s, mut r) =
            wire::client(stream, &self.key).map_err(|e| format!("{}: {e}", link.addr))?;
        s.set_timeout(Some(self.config.timeout))
            .map_err(|e| e.to_string())?;
        r.set_timeout(Some(self.config.timeout))
            .map_err(|e| e.to_string())?;
        s.send(&Msg::Open {
            seq: 0,
            epoch: self.epoch,
            size: self.disk_bytes,
            volume: self.config.volume.clone(),
            uuid: self.uuid.clone(),
        })
        .map_err(|e| format!("{}: {e}", link.addr))?;
        match r.recv() {
            Ok(Msg::Opened { .. }) => {}
            Ok(Msg::Nack {
                code: Code::Stale,
                message,
                ..
            }) => {
                self.fence(&format!(
                    "replica {} refused epoch {}: {message}",
                    link.addr, self.epoch
                ));
                return Err(message);
            }
            Ok(Msg::Nack { message, .. }) => {
                return Err(format!("{} refused: {message}", link.addr))
            }
            Ok(_) => return Err(format!("{}: unexpected reply to Open", link.addr)),
            Err(e) => return Err(format!("{}: {e}", link.addr)),
        }
        r.set_timeout(Some(POLL)).map_err(|e| e.to_string())?;
        let mut tx = link.tx();
        tx.sender = Some(s);
        tx.unsent.clear();
        drop(tx);
        Ok(r)
    }

    fn post(&self, queue: usize, connection: u64, head: u16, ok: bool) {
        if let Some(m) = self.mailboxes.get(queue) {
            m.post(Delivery {
                connection,
                head,
                ok,
            });
        }
    }

    /// The link thread: reads acknowledgements, watches for faults, reconnects, resyncs.
    fn link_thread(&self, link: &Link) {
        let mut rx = self.receivers[link.idx]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let mut rs = Resync::default();
        let mut next_attempt = Instant::now();
        let mut last_timeout_check = Instant::now();
        while !self.stop.load(Ordering::SeqCst) {
            if self.is_fenced() {
                if let Some(s) = link.tx().sender.take() {
                    s.shutdown();
                }
                rx = None;
                self.fail_pending(link);
                std::thread::sleep(POLL);
                continue;
            }
            let Some(r) = &mut rx else {
                self.settle_out_of_sync(link);
                if Instant::now() >= next_attempt {
                    match self.connect(link) {
                        Ok(r) => {
                            rx = Some(r);
                            self.start_resync(link, &mut rs);
                        }
                        Err(e) => {
                            tracing::debug!(replica = %link.addr, "reconnect failed: {e}");
                            link.set_error(e);
                            next_attempt = Instant::now() + RECONNECT;
                        }
                    }
                } else {
                    std::thread::sleep(POLL.min(RECONNECT));
                }
                continue;
            };
            let mut fault = match r.recv() {
                Ok(msg) => self.on_reply(link, msg, &mut rs).err(),
                Err(e) if e.is_timeout() => None,
                Err(e) => Some(format!("connection lost: {e}")),
            };
            if fault.is_none() && last_timeout_check.elapsed() >= POLL {
                last_timeout_check = Instant::now();
                let tx = link.tx();
                if tx.sender.is_none() {
                    fault = Some("send failed".to_string());
                } else if let Some(oldest) = tx.pending.values().map(Pending::sent).min() {
                    if oldest.elapsed() > self.config.timeout {
                        fault = Some(format!(
                            "no answer within {} ms",
                            self.config.timeout.as_millis()
                        ));
                    }
                }
            }
            if fault.is_none() && link.state() == LinkState::Resyncing {
                fault = self.pump_resync(link, &mut rs).err();
            }
            if self.stop.load(Ordering::SeqCst) {
                break; // our own shutdown closed the connection
            }
            if let Some(why) = fault {
                rx = None;
                rs = Resync::default();
                next_attempt = Instant::now() + RECONNECT;
                if !self.is_fenced() {
                    link.set_state(LinkState::Failing);
                    link.counters.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(volume = %self.config.volume, replica = %link.addr, "replica fault: {why}");
                    link.set_error(why.clone());
                    if let Some(s) = link.tx().sender.take() {
                        s.shutdown();
                    }
                    self.record_failure(link, &why);
                }
            }
        }
    }

    /// Records a replica fault: every write still waiting for it is marked in the bitmap
    /// (durably), the authority learns that the replica is out of sync, and only then do
    /// those writes complete.
    fn record_failure(&self, link: &Link, why: &str) {
        let pending: Vec<Pending> = link.tx().take_pending();
        let persisted = self.mark_all(link, &pending);
        if link.recorded_in_sync.load(Ordering::SeqCst) {
            loop {
                match self.authority.set_in_sync(
                    &self.config.volume,
                    &self.config.node,
                    self.epoch,
                    &link.addr,
                    false,
                ) {
                    Ok(_) => {
                        link.recorded_in_sync.store(false, Ordering::SeqCst);
                        tracing::warn!(volume = %self.config.volume, replica = %link.addr, "recorded out of sync in the authority ({why}); tracking dirty regions");
                        break;
                    }
                    Err(e @ AuthorityError::Fenced { .. }) => {
                        self.fence(&e.to_string());
                        break;
                    }
                    Err(e) => {
                        // Writes wait: acknowledging them before the authority knows would
                        // let a stale replica be promoted.
                        tracing::error!(volume = %self.config.volume, replica = %link.addr, "cannot record the fault in the authority, retrying: {e}");
                        if self.stop.load(Ordering::SeqCst) {
                            break;
                        }
                        std::thread::sleep(RECONNECT);
                    }
                }
            }
        }
        let ok = persisted && !self.is_fenced() && !link.recorded_in_sync.load(Ordering::SeqCst);
        link.set_state(LinkState::OutOfSync);
        self.post_outcomes(pending, ok);
    }

    /// Marks what `pending` covers in the link's bitmap and persists it.
    fn mark_all(&self, link: &Link, pending: &[Pending]) -> bool {
        let mut map = self.maps[link.idx]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for p in pending {
            match p {
                Pending::Guest { offset, len, .. } => {
                    map.mark(*offset, *len);
                }
                Pending::Compare { region, .. } | Pending::Copy { region, .. } => {
                    map.set(*region);
                }
            }
        }
        match map.persist() {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(volume = %self.config.volume, "cannot persist the dirty bitmap: {e}");
                false
            }
        }
    }

    /// Writes that raced with a fault and registered on a disconnected, out-of-sync link:
    /// mark them and let them complete (the authority already knows).
    fn settle_out_of_sync(&self, link: &Link) {
        if link.state() != LinkState::OutOfSync {
            return;
        }
        let pending: Vec<Pending> = link.tx().take_pending();
        if pending.is_empty() {
            return;
        }
        let ok = self.mark_all(link, &pending);
        self.post_outcomes(pending, ok);
    }

    /// Tells the queue workers how the guest requests among `pending` ended on this link.
    fn post_outcomes(&self, pending: Vec<Pending>, ok: bool) {
        for p in pending {
            if let Pending::Guest {
                queue,
                connection,
                head,
                ..
            } = p
            {
                self.post(queue, connection, head, ok);
            }
        }
    }

    /// Fenced: everything waiting fails.
    fn fail_pending(&self, link: &Link) {
        let pending: Vec<Pending> = link.tx().take_pending();
        self.post_outcomes(pending, false);
    }

    fn on_reply(&self, link: &Link, msg: Msg, rs: &mut Resync) -> Result<(), String> {
        match msg {
            Msg::Ack { seq, .. } => {
                let p = link.tx().pending.remove(&seq);
                match p {
                    Some(Pending::Guest {
                        queue,
                        connection,
                        head,
                        ..
                    }) => self.post(queue, connection, head, true),
                    Some(Pending::Copy { region, .. }) => {
                        rs.outstanding -= 1;
                        link.counters
                            .resynced_regions
                            .fetch_add(1, Ordering::Relaxed);
                        link.counters
                            .resync_bytes
                            .fetch_add(self.region_len(region), Ordering::Relaxed);
                    }
                    Some(Pending::Compare { .. }) => {
                        return Err("ack for a checksum request".into())
                    }
                    None => {}
                }
                Ok(())
            }
            Msg::Nack {
                code: Code::Stale,
                message,
                ..
            } => {
                self.fence(&format!(
                    "replica {} refused epoch {}: {message}",
                    link.addr, self.epoch
                ));
                Ok(())
            }
            Msg::Nack { code, message, .. } => {
                tracing::error!(volume = %self.config.volume, replica = %link.addr, ?code, "replica failed a request: {message}");
                Err(format!("replica error ({code:?}): {message}"))
            }
            Msg::SumsReply { seq, crcs } => {
                let mut tx = link.tx();
                let Some(Pending::Compare {
                    region,
                    generation,
                    data,
                    ..
                }) = tx.pending.remove(&seq)
                else {
                    return Err("unexpected checksum reply".into());
                };
                rs.outstanding -= 1;
                link.counters
                    .compared_regions
                    .fetch_add(1, Ordering::Relaxed);
                if crcs == [crc32c::crc32c(&data)] {
                    return Ok(()); // already equal
                }
                // Copy only if no write touched the region since it was read; a newer write
                // is (or will be) sent on this connection after the copy, in order.
                let unchanged = self.regions.generation[region].load(Ordering::SeqCst)
                    == generation
                    && self.regions.in_flight[region].load(Ordering::SeqCst) == 0;
                if !unchanged {
                    drop(tx);
                    self.maps[link.idx]
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .set(region);
                    return Ok(());
                }
                let seq = tx.next_seq;
                tx.next_seq += 1;
                let offset = region as u64 * self.config.region_bytes;
                let crc = crc32c::crc32c(&data);
                let epoch = self.epoch;
                let Some(s) = &mut tx.sender else {
                    return Err("disconnected".into());
                };
                s.send_write(seq, epoch, offset, crc, &data)
                    .map_err(|e| format!("send: {e}"))?;
                tx.pending.insert(
                    seq,
                    Pending::Copy {
                        region,
                        sent: Instant::now(),
                    },
                );
                rs.outstanding += 1;
                Ok(())
            }
            _ => Err("unexpected message from the replica".into()),
        }
    }

    fn region_len(&self, region: usize) -> u64 {
        let start = region as u64 * self.config.region_bytes;
        self.config
            .region_bytes
            .min(self.disk_bytes.saturating_sub(start))
    }

    /// Connected again: switch to resyncing and wait until every write that saw the old
    /// state has marked its bits.
    fn start_resync(&self, link: &Link, rs: &mut Resync) {
        if link.state() == LinkState::InSync {
            return;
        }
        link.set_state(LinkState::Resyncing);
        while self.unforwarded.load(Ordering::SeqCst) != 0 {
            std::hint::spin_loop();
        }
        *rs = Resync {
            started: Some(Instant::now()),
            last: Some(Instant::now()),
            ..Resync::default()
        };
        let dirty = self.dirty_regions(link.idx);
        link.resync_total.store(dirty as u64, Ordering::Relaxed);
        tracing::info!(volume = %self.config.volume, replica = %link.addr, dirty_regions = dirty, "replica back: resyncing");
    }

    /// Issues more resync work, up to a window, within the rate limit.
    fn pump_resync(&self, link: &Link, rs: &mut Resync) -> Result<(), String> {
        const WINDOW: usize = 4;
        let rate = self.config.resync_rate;
        if rate > 0 {
            let now = Instant::now();
            let last = rs.last.unwrap_or(now);
            let add = (now.duration_since(last).as_secs_f64() * rate as f64) as u64;
            rs.last = Some(now);
            rs.allowance = (rs.allowance + add).min(rate / 10 + self.config.region_bytes);
        }
        let mut skipped = 0;
        while rs.outstanding < WINDOW {
            let (region, remaining) = {
                let map = self.maps[link.idx]
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                (map.next_set(rs.cursor), map.count())
            };
            let Some(region) = region else {
                if rs.outstanding == 0 {
                    self.finish_resync(link, rs);
                }
                return Ok(());
            };
            rs.cursor = region + 1;
            // The generation before the in-flight count (see `begin`).
            let generation = self.regions.generation[region].load(Ordering::SeqCst);
            if self.regions.in_flight[region].load(Ordering::SeqCst) > 0 {
                skipped += 1;
                if skipped >= remaining {
                    return Ok(()); // every dirty region is busy: try again shortly
                }
                continue;
            }
            let len = self.region_len(region);
            if rate > 0 {
                if rs.allowance < len {
                    return Ok(());
                }
                rs.allowance -= len;
            }
            self.maps[link.idx]
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear(region);
            let offset = region as u64 * self.config.region_bytes;
            let mut data = vec![0u8; len as usize];
            if let Err(e) = self.local.read_exact_at(&mut data, offset) {
                self.maps[link.idx]
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .set(region);
                return Err(format!("cannot read the local copy for resync: {e}"));
            }
            let mut tx = link.tx();
            let seq = tx.next_seq;
            tx.next_seq += 1;
            let Some(s) = &mut tx.sender else {
                drop(tx);
                self.maps[link.idx]
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .set(region);
                return Err("disconnected".into());
            };
            s.send(&Msg::Sums {
                seq,
                offset,
                len,
                chunk: len as u32,
            })
            .map_err(|e| format!("send: {e}"))?;
            tx.pending.insert(
                seq,
                Pending::Compare {
                    region,
                    generation,
                    data,
                    sent: Instant::now(),
                },
            );
            rs.outstanding += 1;
        }
        Ok(())
    }

    /// The bitmap is empty and nothing is outstanding: the replica is in sync again.
    fn finish_resync(&self, link: &Link, rs: &mut Resync) {
        {
            let mut map = self.maps[link.idx]
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if map.count() != 0 {
                return;
            }
            if let Err(e) = map.persist() {
                tracing::error!("cannot persist the dirty bitmap: {e}");
                return;
            }
        }
        // Until the state machine tracks generations: the resynced copy is vouched for as
        // generation `epoch` of this volume (applied after every copy sent before it), so
        // that `promote` accepts it.
        {
            let mut tx = link.tx();
            let seq = tx.next_seq;
            tx.next_seq += 1;
            let adopt = Msg::Adopt {
                seq,
                epoch: self.epoch,
                gen: self.epoch,
            };
            let Some(s) = &mut tx.sender else {
                return;
            };
            if let Err(e) = s.send(&adopt) {
                // The link thread sees the missing sender as a fault.
                tracing::warn!(replica = %link.addr, "cannot send Adopt: {e}");
                tx.sender = None;
                return;
            }
        }
        match self.authority.set_in_sync(
            &self.config.volume,
            &self.config.node,
            self.epoch,
            &link.addr,
            true,
        ) {
            Ok(_) => {
                link.recorded_in_sync.store(true, Ordering::SeqCst);
                link.set_state(LinkState::InSync);
                link.set_error(String::new());
                tracing::info!(
                    volume = %self.config.volume,
                    replica = %link.addr,
                    seconds = rs.started.map(|s| s.elapsed().as_secs_f64()).unwrap_or(0.0),
                    compared = link.counters.compared_regions.load(Ordering::Relaxed),
                    copied = link.counters.resynced_regions.load(Ordering::Relaxed),
                    "replica in sync"
                );
            }
            Err(e @ AuthorityError::Fenced { .. }) => self.fence(&e.to_string()),
            Err(e) => tracing::error!("cannot record the replica as in sync, retrying: {e}"),
        }
    }
}

/// Resync progress of one link.
#[derive(Default)]
struct Resync {
    cursor: usize,
    outstanding: usize,
    allowance: u64,
    last: Option<Instant>,
    started: Option<Instant>,
}

/// How often the link thread wakes up when idle.
const POLL: Duration = Duration::from_millis(50);
/// How long to wait between reconnection attempts.
const RECONNECT: Duration = Duration::from_secs(1);
