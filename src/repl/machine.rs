//! The primary's replication decisions: a state machine with no I/O, no clock and no
//! threads. The daemon (`primary`) and the simulation (`tests/replication_sim.rs`) drive the
//! same code: every call takes the current time in microseconds and appends [`Action`]s that
//! the driver performs, reporting each result back with another call.
//!
//! What it decides (see `docs/replication.md` for the rules and why they hold):
//! - **Link states.** Each replica is in sync, failing (a fault is being recorded in the
//!   authority; writes wait), out of sync (writes mark its dirty bitmap), or resyncing
//!   (writes are forwarded while dirty regions are compared and copied).
//! - **Identity.** A replica reports `(volume uuid, data generation)` when it is opened. Only
//!   an exact match with the tag of our bitmap allows a delta resync or counting the replica
//!   in sync; anything else gets a full rebuild under a fresh generation (`Adopt`).
//! - **Fault recording.** Writes waiting for a failed replica complete only after the
//!   authority records it out of sync (or it was not recorded in sync).
//! - **Write ordering.** Overlapping mutations in flight are ordered: a later one waits
//!   until every earlier overlapping one is done everywhere (resync copies included).
//! - **The activity log (AL).** A mutation is submitted locally and sent only once every
//!   region it touches is in the durable AL. Idle regions leave it after a checkpoint
//!   (local fdatasync, bitmaps durable).
//! - **Recovery.** At start, the regions that may differ (AL ∪ the source's bits) are pulled
//!   from a replica the authority records in sync, and the other in-sync replicas are
//!   resynced before the disk serves. An acknowledged write is never erased.
//! - **Fencing.** A replica refusing our epoch, or the authority saying we were superseded,
//!   fences the disk: every request fails from then on.

use std::collections::{BTreeMap, VecDeque};

use super::bitmap::{DirtyMap, Tag};
pub use crate::buf::Payload;

/// Microseconds since some origin chosen by the driver.
pub type Micros = u64;

/// A copy's identity: the volume UUID and the data generation it adopted.
pub type Identity = Tag;

/// Settings of the state machine.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub volume: String,
    pub uuid: String,
    /// Our epoch (from `take_over`).
    pub epoch: u64,
    pub disk_bytes: u64,
    pub region_bytes: u64,
    /// A replica that has not answered a request within this is failed.
    pub timeout: Micros,
    /// Between connection attempts, and between attempts to record a state.
    pub reconnect: Micros,
    /// Resync bandwidth per replica, bytes per second (0: unlimited).
    pub resync_rate: u64,
    /// Resync or recovery requests in flight per replica.
    pub window: usize,
    /// A region leaves the activity log once it has been idle this long.
    pub al_idle: Micros,
    /// How often idle regions are checkpointed out of the activity log.
    pub checkpoint_every: Micros,
    /// Regions the activity log should hold at most (after an unclean stop, each is pulled
    /// from a replica before the disk serves). Beyond it, the least recently written idle
    /// regions are checkpointed out at once; the regions of writes in flight are always in.
    pub al_max_regions: usize,
}

impl CoreConfig {
    /// Defaults for everything but the volume's identity and geometry.
    pub fn new(
        volume: &str,
        uuid: &str,
        epoch: u64,
        disk_bytes: u64,
        region_bytes: u64,
    ) -> CoreConfig {
        CoreConfig {
            volume: volume.to_string(),
            uuid: uuid.to_string(),
            epoch,
            disk_bytes,
            region_bytes,
            timeout: 5_000_000,
            reconnect: 1_000_000,
            resync_rate: 0,
            window: 4,
            al_idle: 5_000_000,
            checkpoint_every: 1_000_000,
            al_max_regions: 4096,
        }
    }
}

/// One replica, as the driver found it at start.
#[derive(Debug, Clone)]
pub struct LinkInit {
    pub addr: String,
    /// Whether the authority records it in sync.
    pub in_sync: bool,
    /// Its stored dirty bitmap and the copy it describes; `None` when there is none or it
    /// cannot be read (then every region counts as dirty and no copy matches it).
    pub bitmap: Option<(DirtyMap, Tag)>,
}

/// A guest request, or a resync copy, in the write-ordering tracker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OpId(pub u64);

/// What a guest mutation does.
#[derive(Debug, Clone)]
pub enum Mutation {
    Write {
        crc: u32,
        data: Payload,
    },
    /// Write-zeroes; with `unmap` the range may be deallocated (discard).
    Zero {
        unmap: bool,
    },
}

/// A guest mutation handed to [`Core::begin`].
#[derive(Debug, Clone)]
pub struct OpDesc {
    pub queue: u16,
    /// The frontend connection (a worker ignores results for older connections).
    pub conn: u64,
    pub head: u16,
    pub offset: u64,
    pub len: u64,
    pub kind: Mutation,
}

/// What [`Core::begin`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Submit the local I/O now; an [`Action::Complete`] follows once the replicas are done.
    Go(OpId),
    /// Hold the request: an [`Action::Release`] (then submit locally) or an
    /// [`Action::Complete`] with `ok: false` (fail it without local I/O) follows.
    Parked(OpId),
    /// Fail it now (fenced, or not serving).
    Refused,
    /// Nothing to replicate (an empty range): local I/O only.
    Local,
}

/// A message to a replica, on one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Write {
        seq: u64,
        epoch: u64,
        offset: u64,
        crc: u32,
        data: Payload,
    },
    Zero {
        seq: u64,
        epoch: u64,
        offset: u64,
        len: u64,
        unmap: bool,
    },
    /// The crc32c of `[offset, offset + len)` as one chunk.
    Sums {
        seq: u64,
        offset: u64,
        len: u64,
    },
    Read {
        seq: u64,
        offset: u64,
        len: u64,
    },
    Adopt {
        seq: u64,
        epoch: u64,
        gen: u64,
    },
}

/// A reply from a replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Ack {
        seq: u64,
    },
    Nack {
        seq: u64,
        stale: bool,
        message: String,
    },
    Sums {
        seq: u64,
        crcs: Vec<u32>,
    },
    Data {
        seq: u64,
        data: Vec<u8>,
    },
}

/// A stored-bitmap snapshot to make durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapSnapshot {
    pub link: usize,
    /// Increases with every change of the link's bits: a store of an older snapshot than
    /// the file holds must be skipped.
    pub gen: u64,
    pub words: Vec<u64>,
    pub tag: Tag,
}

/// Work for the driver, in the order it must be started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Queue `frame` on link `link` if its connection is still `conn` (any thread).
    Send {
        link: usize,
        conn: u64,
        frame: Frame,
    },
    /// Close connection `conn` of link `link` (any thread).
    Disconnect { link: usize, conn: u64 },
    /// Connect, authenticate and `Open`; report with [`Core::on_open`] (the link's thread).
    Connect { link: usize, conn: u64 },
    /// Record the replica in the authority; report with [`Core::on_recorded`] (the
    /// authority thread).
    Record { link: usize, in_sync: bool },
    /// Read a region of the local copy; report with [`Core::on_local_read`] (the link's
    /// thread).
    ReadLocal {
        link: usize,
        region: usize,
        offset: u64,
        len: u64,
    },
    /// Write recovered data into the local copy; report with [`Core::on_local_written`]
    /// (the link's thread).
    WriteLocal {
        link: usize,
        region: usize,
        offset: u64,
        data: Vec<u8>,
    },
    /// Store the activity log; report with [`Core::on_activity_stored`] (metadata thread).
    StoreActivity { gen: u64, words: Vec<u64> },
    /// Store a dirty bitmap; report with [`Core::on_bitmap_stored`] (control thread).
    StoreBitmap(BitmapSnapshot),
    /// `fdatasync` the local copy, then store these bitmaps; report with
    /// [`Core::on_checkpoint`] (control thread).
    Checkpoint {
        id: u64,
        bitmaps: Vec<BitmapSnapshot>,
    },
    /// A parked request may go: submit its local I/O (the worker of `queue`).
    Release {
        queue: u16,
        conn: u64,
        head: u16,
        op: OpId,
    },
    /// A request is done everywhere (the worker of `queue`).
    Complete {
        queue: u16,
        conn: u64,
        head: u16,
        op: OpId,
        ok: bool,
    },
    /// The disk is fenced from now on.
    Fenced { reason: String },
}

/// The state of one replica link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    InSync,
    /// A fault was seen; it is being recorded in the authority. Writes wait for it.
    Failing,
    /// Recorded as out of sync; writes mark the dirty bitmap instead of being sent.
    OutOfSync,
    /// Connected again and catching up; writes are sent, dirty regions are being copied.
    Resyncing,
}

impl LinkState {
    pub fn name(self) -> &'static str {
        match self {
            LinkState::InSync => "in-sync",
            LinkState::Failing => "failing",
            LinkState::OutOfSync => "out-of-sync",
            LinkState::Resyncing => "resyncing",
        }
    }
}

/// Where the disk stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Opening the in-sync replicas, recovering after an unclean stop.
    Starting,
    Serving,
    /// Draining for a clean stop: nothing new is admitted.
    Stopping,
    /// Stopped; `clean` says whether the activity log was emptied.
    Stopped {
        clean: bool,
    },
}

/// A link's counters and state, for health and stats.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkStatus {
    pub addr: String,
    pub state: &'static str,
    pub dirty_regions: usize,
    /// Regions left to resync when the current resync started.
    pub resync_total: usize,
    pub writes: u64,
    pub failures: u64,
    pub compared_regions: u64,
    pub copied_regions: u64,
    pub copied_bytes: u64,
    pub last_error: String,
    /// The replica's identity as it last reported it.
    pub identity: Option<Identity>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    Guest {
        queue: u16,
        conn: u64,
        head: u16,
    },
    /// A region being resynced to `link`: read, compared and maybe copied while guest
    /// writes to it wait.
    Resync {
        link: usize,
        region: usize,
    },
}

#[derive(Debug)]
struct Op {
    owner: Owner,
    offset: u64,
    len: u64,
    regions: std::ops::Range<usize>,
    /// Dropped once the frames are out.
    kind: Option<Mutation>,
    running: bool,
    /// Earlier overlapping operations not yet done.
    blocked_by: u32,
    dependents: Vec<OpId>,
    /// Waiting until every region is in the durable activity log.
    wants_al: bool,
    /// The local I/O's result (copies have none: `Some(true)` from the start).
    local: Option<bool>,
    /// Links whose part is not resolved yet (bit per link).
    waiting: u32,
    ok: bool,
}

#[derive(Debug)]
enum Pending {
    Guest {
        op: OpId,
        sent: Micros,
    },
    Compare {
        op: OpId,
        region: usize,
        data: Vec<u8>,
        sent: Micros,
    },
    Copy {
        op: OpId,
        region: usize,
        sent: Micros,
    },
    Pull {
        region: usize,
        sent: Micros,
    },
    Adopt {
        sent: Micros,
    },
}

impl Pending {
    fn sent(&self) -> Micros {
        match self {
            Pending::Guest { sent, .. }
            | Pending::Compare { sent, .. }
            | Pending::Copy { sent, .. }
            | Pending::Pull { sent, .. }
            | Pending::Adopt { sent } => *sent,
        }
    }
}

#[derive(Debug, Default)]
struct Resync {
    cursor: usize,
    /// Regions being read, compared or copied, each under an operation of the tracker.
    busy: Vec<usize>,
    ops: BTreeMap<usize, OpId>,
    allowance: u64,
    last: Option<Micros>,
    total: usize,
}

#[derive(Debug)]
struct Link {
    addr: String,
    state: LinkState,
    /// What the authority holds for it.
    recorded_in_sync: bool,
    /// A `Record` in flight, with the value asked for.
    recording: Option<bool>,
    /// A `Record` of "in sync" failed: the authority may have applied it all the same (its
    /// reply lost), so a fault is recorded as if it had.
    maybe_recorded: bool,
    /// When to try recording again after an authority error.
    record_retry_at: Option<Micros>,
    conn: Option<u64>,
    connecting: Option<u64>,
    retry_at: Micros,
    /// At least one connection attempt finished since start.
    probed: bool,
    identity: Option<Identity>,
    bits: DirtyMap,
    tag: Tag,
    bits_gen: u64,
    bits_stored: u64,
    /// The empty bitmap being stored before the link is recorded in sync.
    finishing: Option<u64>,
    pending: BTreeMap<u64, Pending>,
    /// Guest operations waiting for this link's fault to be recorded.
    waiting_record: Vec<OpId>,
    next_seq: u64,
    resync: Resync,
    status: LinkStatus,
}

impl Link {
    fn bit(idx: usize) -> u32 {
        1 << idx
    }

    fn mark_bits(&mut self, offset: u64, len: u64) {
        if self.bits.mark(offset, len) {
            self.bits_gen += 1;
        }
    }

    fn seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    fn snapshot(&self, idx: usize) -> BitmapSnapshot {
        BitmapSnapshot {
            link: idx,
            gen: self.bits_gen,
            words: self.bits.words().to_vec(),
            tag: self.tag.clone(),
        }
    }

    /// Whether the replica reported the identity our bitmap describes.
    fn matches(&self, uuid: &str) -> bool {
        self.identity
            .as_ref()
            .is_some_and(|id| id.uuid == uuid && id.gen != 0 && *id == self.tag)
    }

    /// Whether the replica holds a generation of this volume (it may be a source).
    fn of_volume(&self, uuid: &str) -> bool {
        self.identity
            .as_ref()
            .is_some_and(|id| id.uuid == uuid && id.gen != 0)
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Region {
    /// Operations in the tracker touching this region.
    mutating: u32,
    last_write_seq: u64,
    last_write_at: Micros,
}

#[derive(Debug)]
struct Activity {
    /// Regions that must be (or stay) in the log.
    wanted: DirtyMap,
    /// What the stored log holds.
    stored: DirtyMap,
    wanted_gen: u64,
    /// The store in flight: its generation and words.
    storing: Option<(u64, Vec<u64>)>,
    /// A store succeeded since start (a clean stop leaves a stored log, even an empty one).
    persisted: bool,
    /// After a failed store, when to try again (not at once: the metadata disk is failing).
    retry_at: Option<Micros>,
}

#[derive(Debug)]
struct Checkpoint {
    id: u64,
    start_seq: u64,
    eligible: Vec<usize>,
    bitmaps: Vec<(usize, u64)>,
    /// The final checkpoint of a clean stop.
    last: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Local,
    Link(usize),
}

#[derive(Debug, Default)]
struct Recovery {
    source: Option<Source>,
    /// Regions still to pull from the source, and pulls in flight.
    queue: VecDeque<usize>,
    pulling: usize,
    pulled: usize,
    /// Why the start cannot go on yet (for the driver's error message).
    blocker: Option<String>,
}

/// The replication state of one disk (see the module documentation).
#[derive(Debug)]
pub struct Core {
    cfg: CoreConfig,
    phase: Phase,
    fenced: Option<String>,
    links: Vec<Link>,
    regions: Vec<Region>,
    al: Activity,
    ops: BTreeMap<OpId, Op>,
    next_op: u64,
    write_seq: u64,
    gens_minted: u64,
    next_conn: u64,
    checkpoint: Option<Checkpoint>,
    next_checkpoint: u64,
    checkpoint_at: Micros,
    /// In a stop: the result of the last checkpoint.
    stop_checkpointed: Option<bool>,
    /// The local copy failed to sync once: its pages may be lost although a later sync
    /// succeeds, so no region leaves the activity log again in this run.
    sync_failed: bool,
    recovery: Recovery,
}

/// Most replicas per disk (an operation keeps a bit per replica it waits for).
pub const MAX_LINKS: usize = 16;

impl Core {
    /// A core for a disk whose stored activity log is `activity` (`None`: unreadable, so
    /// every region counts as active). Returns the first actions (connect every replica).
    pub fn new(
        cfg: CoreConfig,
        links: Vec<LinkInit>,
        activity: Option<DirtyMap>,
        now: Micros,
        out: &mut Vec<Action>,
    ) -> Core {
        assert!(links.len() <= MAX_LINKS, "at most {MAX_LINKS} replicas");
        let empty = DirtyMap::in_memory(cfg.disk_bytes, cfg.region_bytes);
        let stored = activity.unwrap_or_else(|| {
            let mut all = empty.clone();
            all.set_all();
            all
        });
        let links: Vec<Link> = links
            .into_iter()
            .map(|l| {
                let (bits, tag) = l.bitmap.unwrap_or_else(|| {
                    let mut all = empty.clone();
                    all.set_all();
                    (all, Tag::default())
                });
                Link {
                    status: LinkStatus {
                        addr: l.addr.clone(),
                        ..LinkStatus::default()
                    },
                    addr: l.addr,
                    state: if l.in_sync {
                        LinkState::InSync
                    } else {
                        LinkState::OutOfSync
                    },
                    recorded_in_sync: l.in_sync,
                    recording: None,
                    maybe_recorded: false,
                    record_retry_at: None,
                    conn: None,
                    connecting: None,
                    retry_at: 0,
                    probed: false,
                    identity: None,
                    bits,
                    tag,
                    bits_gen: 1,
                    bits_stored: 0,
                    finishing: None,
                    pending: BTreeMap::new(),
                    waiting_record: Vec::new(),
                    next_seq: 0,
                    resync: Resync::default(),
                }
            })
            .collect();
        let mut core = Core {
            regions: vec![Region::default(); empty.regions()],
            al: Activity {
                wanted: stored.clone(),
                stored,
                wanted_gen: 1,
                storing: None,
                persisted: false,
                retry_at: None,
            },
            cfg,
            phase: Phase::Starting,
            fenced: None,
            links,
            ops: BTreeMap::new(),
            next_op: 0,
            write_seq: 1,
            gens_minted: 0,
            next_conn: 0,
            checkpoint: None,
            next_checkpoint: 0,
            checkpoint_at: now,
            stop_checkpointed: None,
            sync_failed: false,
            recovery: Recovery::default(),
        };
        for i in 0..core.links.len() {
            core.connect(i, out);
        }
        core.advance_start(now, out);
        core
    }

    pub fn config(&self) -> &CoreConfig {
        &self.cfg
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn fenced(&self) -> Option<&str> {
        self.fenced.as_deref()
    }

    /// Why the start is not done yet, if it is waiting for something.
    pub fn start_blocker(&self) -> Option<&str> {
        self.recovery.blocker.as_deref()
    }

    pub fn link_state(&self, link: usize) -> LinkState {
        self.links[link].state
    }

    /// Whether the authority records the link in sync (as far as this primary knows).
    pub fn recorded_in_sync(&self, link: usize) -> bool {
        self.links[link].recorded_in_sync
    }

    pub fn links(&self) -> usize {
        self.links.len()
    }

    /// A link's dirty regions (tests and the simulation).
    pub fn dirty(&self, link: usize) -> &DirtyMap {
        &self.links[link].bits
    }

    /// The regions the activity log must hold (tests and the simulation).
    pub fn activity(&self) -> &DirtyMap {
        &self.al.wanted
    }

    /// Operations in the tracker (guest requests and copies).
    pub fn in_flight(&self) -> usize {
        self.ops.len()
    }

    pub fn status(&self) -> Vec<LinkStatus> {
        self.links
            .iter()
            .map(|l| {
                let mut s = l.status.clone();
                s.state = l.state.name();
                s.dirty_regions = l.bits.count();
                s.resync_total = l.resync.total;
                s.identity = l.identity.clone();
                s
            })
            .collect()
    }

    fn region_len(&self, region: usize) -> u64 {
        let start = region as u64 * self.cfg.region_bytes;
        self.cfg
            .region_bytes
            .min(self.cfg.disk_bytes.saturating_sub(start))
    }

    fn span(&self, offset: u64, len: u64) -> std::ops::Range<usize> {
        self.al.wanted.span(offset, len)
    }

    fn fresh_gen(&mut self) -> u64 {
        self.gens_minted += 1;
        (self.cfg.epoch << 24) | (self.gens_minted & 0xff_ffff)
    }

    // -----------------------------------------------------------------------------------
    // Guest requests and write ordering
    // -----------------------------------------------------------------------------------

    /// Admits a guest write, discard or write-zeroes.
    pub fn begin(&mut self, now: Micros, d: OpDesc, out: &mut Vec<Action>) -> Verdict {
        if self.fenced.is_some() || self.phase != Phase::Serving {
            return Verdict::Refused;
        }
        if d.len == 0 {
            return Verdict::Local;
        }
        self.next_op += 1;
        let id = OpId(self.next_op);
        let regions = self.span(d.offset, d.len);
        let end = d.offset.saturating_add(d.len);
        let mut blocked_by = 0;
        // Fast path: no operation in flight touches these regions, so none overlaps.
        if regions.clone().any(|r| self.regions[r].mutating > 0) {
            for o in self.ops.values_mut() {
                if o.offset < end && d.offset < o.offset.saturating_add(o.len) {
                    o.dependents.push(id);
                    blocked_by += 1;
                }
            }
        }
        for r in regions.clone() {
            let reg = &mut self.regions[r];
            reg.mutating += 1;
            reg.last_write_seq = self.write_seq;
            reg.last_write_at = now;
        }
        self.write_seq += 1;
        let wants_al = self.want_active(now, regions.clone(), out);
        self.ops.insert(
            id,
            Op {
                owner: Owner::Guest {
                    queue: d.queue,
                    conn: d.conn,
                    head: d.head,
                },
                offset: d.offset,
                len: d.len,
                regions,
                kind: Some(d.kind),
                running: false,
                blocked_by,
                dependents: Vec::new(),
                wants_al,
                local: None,
                waiting: 0,
                ok: true,
            },
        );
        if blocked_by == 0 && !wants_al {
            self.run(now, id, out);
            Verdict::Go(id)
        } else {
            Verdict::Parked(id)
        }
    }

    /// The local I/O of a request that went ([`Verdict::Go`] or [`Action::Release`]) is done.
    pub fn local_done(&mut self, now: Micros, id: OpId, ok: bool, out: &mut Vec<Action>) {
        let Some(op) = self.ops.get_mut(&id) else {
            return;
        };
        op.local = Some(ok);
        op.ok &= ok;
        if !ok {
            let (offset, len) = (op.offset, op.len);
            self.diverged(offset, len);
        }
        self.maybe_finish(now, id, out);
    }

    /// A request's worker went away: a parked request will never run, and one released
    /// but never submitted locally counts as a failed local write.
    pub fn abandon(&mut self, now: Micros, id: OpId, out: &mut Vec<Action>) {
        match self.ops.get(&id) {
            Some(o) if !o.running => {
                let op = self.ops.remove(&id).expect("present");
                self.retire(now, op, out);
                self.maybe_stop(out);
            }
            Some(o) if o.local.is_none() => self.local_done(now, id, false, out),
            _ => {}
        }
    }

    /// The replicas may have what the local copy lacks in `[offset, offset + len)` (a local
    /// write failed, or never happened): every replica is resynced there from the local
    /// copy, so the copies end identical. One recorded in sync stays so (it holds every
    /// acknowledged write; this write was not acknowledged) and is resynced there at once.
    fn diverged(&mut self, offset: u64, len: u64) {
        let serving = self.phase == Phase::Serving;
        for l in &mut self.links {
            l.mark_bits(offset, len);
            if serving && l.state == LinkState::InSync && l.conn.is_some() {
                l.state = LinkState::Resyncing;
                l.finishing = None;
                l.resync = Resync {
                    total: l.bits.count(),
                    ..Resync::default()
                };
            }
        }
    }

    /// Forwards a running operation to every link, or marks the bitmaps of those that do
    /// not get it.
    fn run(&mut self, now: Micros, id: OpId, out: &mut Vec<Action>) {
        let Some(op) = self.ops.get_mut(&id) else {
            return;
        };
        op.running = true;
        let (offset, len) = (op.offset, op.len);
        let kind = op.kind.take();
        let epoch = self.cfg.epoch;
        let mut waiting = 0;
        let mut lost = Vec::new();
        for (i, l) in self.links.iter_mut().enumerate() {
            match (l.state, l.conn) {
                (LinkState::InSync | LinkState::Resyncing, Some(conn)) => {
                    let seq = l.seq();
                    let frame = match &kind {
                        Some(Mutation::Write { crc, data }) => Frame::Write {
                            seq,
                            epoch,
                            offset,
                            crc: *crc,
                            data: data.clone(),
                        },
                        Some(Mutation::Zero { unmap }) => Frame::Zero {
                            seq,
                            epoch,
                            offset,
                            len,
                            unmap: *unmap,
                        },
                        None => continue,
                    };
                    l.pending.insert(seq, Pending::Guest { op: id, sent: now });
                    l.status.writes += 1;
                    waiting |= Link::bit(i);
                    out.push(Action::Send {
                        link: i,
                        conn,
                        frame,
                    });
                }
                (LinkState::OutOfSync, _) => l.mark_bits(offset, len),
                (state, _) => {
                    // Failing: the write waits until the authority knows. A link that lost
                    // its connection without a fault yet gets one now.
                    l.mark_bits(offset, len);
                    l.waiting_record.push(id);
                    waiting |= Link::bit(i);
                    if state != LinkState::Failing {
                        lost.push(i);
                    }
                }
            }
        }
        if let Some(op) = self.ops.get_mut(&id) {
            op.waiting = waiting;
        }
        for i in lost {
            self.fault(now, i, "no connection".into(), out);
        }
    }

    /// One link's part of an operation is resolved.
    fn resolve(&mut self, now: Micros, id: OpId, link: usize, ok: bool, out: &mut Vec<Action>) {
        if let Some(op) = self.ops.get_mut(&id) {
            op.waiting &= !Link::bit(link);
            op.ok &= ok;
            self.maybe_finish(now, id, out);
        }
    }

    fn maybe_finish(&mut self, now: Micros, id: OpId, out: &mut Vec<Action>) {
        let Some(op) = self.ops.get(&id) else {
            return;
        };
        if !op.running || op.local.is_none() || op.waiting != 0 {
            return;
        }
        let op = self.ops.remove(&id).expect("present");
        if let Owner::Guest { queue, conn, head } = op.owner {
            out.push(Action::Complete {
                queue,
                conn,
                head,
                op: id,
                ok: op.ok,
            });
        }
        self.retire(now, op, out);
        self.maybe_stop(out);
    }

    /// Takes a finished (or abandoned) operation out of the tracker and lets the
    /// operations that waited for it go.
    fn retire(&mut self, now: Micros, op: Op, out: &mut Vec<Action>) {
        for r in op.regions.clone() {
            self.regions[r].mutating -= 1;
        }
        if let Owner::Resync { link, region } = op.owner {
            let rs = &mut self.links[link].resync;
            rs.busy.retain(|&r| r != region);
            rs.ops.remove(&region);
        }
        for d in op.dependents {
            let ready = match self.ops.get_mut(&d) {
                Some(o) => {
                    o.blocked_by -= 1;
                    o.blocked_by == 0 && !o.wants_al && !o.running
                }
                None => false,
            };
            if ready {
                self.release(now, d, out);
            }
        }
    }

    /// A parked operation goes now: its worker submits the local I/O, and it is forwarded.
    fn release(&mut self, now: Micros, id: OpId, out: &mut Vec<Action>) {
        let Some(op) = self.ops.get(&id) else {
            return;
        };
        match op.owner {
            Owner::Guest { queue, conn, head } => {
                out.push(Action::Release {
                    queue,
                    conn,
                    head,
                    op: id,
                });
                self.run(now, id, out);
            }
            Owner::Resync { .. } => self.read_region(id, out),
        }
    }

    /// Fails a parked operation without local I/O.
    fn fail_parked(&mut self, now: Micros, id: OpId, out: &mut Vec<Action>) {
        let Some(op) = self.ops.remove(&id) else {
            return;
        };
        if let Owner::Guest { queue, conn, head } = op.owner {
            out.push(Action::Complete {
                queue,
                conn,
                head,
                op: id,
                ok: false,
            });
        }
        self.retire(now, op, out);
    }

    // -----------------------------------------------------------------------------------
    // The activity log
    // -----------------------------------------------------------------------------------

    /// Puts `regions` in the activity log; returns whether an operation on them must wait
    /// until the log is stored.
    fn want_active(
        &mut self,
        now: Micros,
        regions: std::ops::Range<usize>,
        out: &mut Vec<Action>,
    ) -> bool {
        let mut added = false;
        let mut waits = false;
        for r in regions {
            added |= self.al.wanted.set(r);
            waits |= !self.logged(r);
        }
        if added {
            self.al.wanted_gen += 1;
        }
        if waits {
            self.store_activity(now, out);
        }
        waits
    }

    /// Whether region `r` is in the durable activity log and stays there: a store under
    /// way that drops it (an idle region checkpointed out) may land at any moment.
    fn logged(&self, r: usize) -> bool {
        let kept = |words: &[u64]| words.get(r / 64).is_some_and(|w| w & (1 << (r % 64)) != 0);
        self.al.stored.is_set(r) && self.al.storing.as_ref().is_none_or(|(_, w)| kept(w))
    }

    fn store_activity(&mut self, now: Micros, out: &mut Vec<Action>) {
        if self.al.storing.is_some() || self.al.retry_at.is_some_and(|t| now < t) {
            return;
        }
        self.al.retry_at = None;
        if self.al.wanted == self.al.stored {
            return;
        }
        let words = self.al.wanted.words().to_vec();
        self.al.storing = Some((self.al.wanted_gen, words.clone()));
        out.push(Action::StoreActivity {
            gen: self.al.wanted_gen,
            words,
        });
    }

    /// The activity log store of generation `gen` finished.
    pub fn on_activity_stored(&mut self, now: Micros, gen: u64, ok: bool, out: &mut Vec<Action>) {
        let Some((g, words)) = self.al.storing.take() else {
            return;
        };
        if g != gen {
            self.al.storing = Some((g, words));
            return;
        }
        if ok {
            self.al.stored.load_words(&words);
            self.al.persisted = true;
            let mut ready: Vec<OpId> = self
                .ops
                .iter()
                .filter(|(_, o)| o.wants_al && o.regions.clone().all(|r| self.logged(r)))
                .map(|(id, _)| *id)
                .collect();
            ready.sort();
            for id in ready {
                let go = match self.ops.get_mut(&id) {
                    Some(o) => {
                        o.wants_al = false;
                        o.blocked_by == 0 && !o.running
                    }
                    None => false,
                };
                if go {
                    self.release(now, id, out);
                }
            }
        } else {
            // Nothing waiting for the log was submitted anywhere: fail those requests, and
            // try again later (the next writes to new regions wait for it meanwhile).
            tracing::error!(volume = %self.cfg.volume, "cannot store the activity log: failing the writes that wait for it");
            self.al.retry_at = Some(now + self.cfg.reconnect);
            let mut waiting: Vec<OpId> = self
                .ops
                .iter()
                .filter(|(_, o)| o.wants_al && !o.running)
                .map(|(id, _)| *id)
                .collect();
            waiting.sort();
            for id in waiting {
                self.fail_parked(now, id, out);
            }
        }
        self.store_activity(now, out);
        self.advance_start(now, out);
        self.maybe_stopped(out);
    }

    /// The metadata thread's tick: checkpoints idle regions out of the activity log.
    pub fn tick_meta(&mut self, now: Micros, out: &mut Vec<Action>) {
        if self.fenced.is_some() {
            return;
        }
        if self.al.retry_at.is_some_and(|t| now >= t) {
            self.store_activity(now, out);
        }
        if self.phase != Phase::Serving || self.checkpoint.is_some() || self.sync_failed {
            return;
        }
        let over = self
            .al
            .wanted
            .count()
            .saturating_sub(self.cfg.al_max_regions);
        // Over the size, checkpoint sooner (but not more than ten times per period).
        let due = if over > 0 {
            self.checkpoint_at
                .saturating_sub(self.cfg.checkpoint_every * 9 / 10)
        } else {
            self.checkpoint_at
        };
        if now < due {
            return;
        }
        self.checkpoint_at = now + self.cfg.checkpoint_every;
        let idle: Vec<usize> = self
            .al
            .wanted
            .iter()
            .filter(|&r| self.regions[r].mutating == 0)
            .collect();
        let eligible: Vec<usize> = if over > 0 {
            // Too many: the least recently written idle regions go, down to 90 %.
            let mut idle = idle;
            idle.sort_by_key(|&r| self.regions[r].last_write_at);
            let target = over + (self.cfg.al_max_regions / 10).max(1);
            idle.truncate(target);
            idle
        } else {
            idle.into_iter()
                .filter(|&r| now.saturating_sub(self.regions[r].last_write_at) >= self.cfg.al_idle)
                .collect()
        };
        if !eligible.is_empty() {
            self.start_checkpoint(eligible, false, out);
        }
    }

    /// A sync of the local copy failed (a checkpoint's, or the guest's flush): pages the
    /// replicas hold may be gone from it, and Linux reports a writeback error once, so a
    /// later sync would succeed all the same. The disk stops (fenced: every request fails,
    /// nothing is resynced from this copy any more), and its activity log stays, so the
    /// next start pulls those regions from an in-sync replica.
    pub fn local_sync_failed(&mut self, now: Micros, why: &str, out: &mut Vec<Action>) {
        self.sync_failed = true;
        let why = format!(
            "the local copy failed to sync ({why}): it may have lost writes the replicas hold; restart to reconcile it from an in-sync replica"
        );
        self.fence(now, why, out);
    }

    /// How much recovery and resync work the start has done (it may take long, but it
    /// must move).
    pub fn start_progress(&self) -> u64 {
        self.recovery.pulled as u64
            + self
                .links
                .iter()
                .map(|l| l.status.compared_regions + l.status.copied_regions)
                .sum::<u64>()
    }

    fn start_checkpoint(&mut self, eligible: Vec<usize>, last: bool, out: &mut Vec<Action>) {
        self.next_checkpoint += 1;
        let bitmaps: Vec<BitmapSnapshot> = self
            .links
            .iter()
            .enumerate()
            .filter(|(_, l)| l.bits_gen > l.bits_stored)
            .map(|(i, l)| l.snapshot(i))
            .collect();
        self.checkpoint = Some(Checkpoint {
            id: self.next_checkpoint,
            start_seq: self.write_seq,
            eligible,
            bitmaps: bitmaps.iter().map(|b| (b.link, b.gen)).collect(),
            last,
        });
        out.push(Action::Checkpoint {
            id: self.next_checkpoint,
            bitmaps,
        });
    }

    /// The local copy was synced and the checkpoint's bitmaps stored, or not.
    pub fn on_checkpoint(
        &mut self,
        now: Micros,
        id: u64,
        result: Result<(), CheckpointError>,
        out: &mut Vec<Action>,
    ) {
        if self.checkpoint.as_ref().is_none_or(|c| c.id != id) {
            return;
        }
        let c = self.checkpoint.take().expect("present");
        if let Err(CheckpointError::Sync(e)) = &result {
            self.local_sync_failed(now, e, out);
        }
        let ok = result.is_ok() && !self.sync_failed;
        if ok {
            for (link, gen) in c.bitmaps {
                let l = &mut self.links[link];
                l.bits_stored = l.bits_stored.max(gen);
            }
            let mut changed = false;
            for r in c.eligible {
                let reg = &self.regions[r];
                if reg.last_write_seq < c.start_seq && reg.mutating == 0 {
                    changed |= self.al.wanted.clear(r);
                }
            }
            if changed {
                self.al.wanted_gen += 1;
                self.store_activity(now, out);
            }
        } else {
            tracing::warn!(volume = %self.cfg.volume, "checkpoint failed; the activity log keeps its regions");
        }
        if c.last {
            self.stop_checkpointed = Some(ok);
            self.maybe_stopped(out);
        } else {
            // A stop that began during this checkpoint takes its last one now.
            self.maybe_stop(out);
        }
    }

    /// A dirty bitmap store finished.
    pub fn on_bitmap_stored(&mut self, link: usize, gen: u64, ok: bool, out: &mut Vec<Action>) {
        let l = &mut self.links[link];
        if ok {
            l.bits_stored = l.bits_stored.max(gen);
        }
        if l.finishing != Some(gen) {
            return;
        }
        if ok && l.state == LinkState::Resyncing && l.bits.is_empty() && l.recording.is_none() {
            self.record(link, true, out);
        } else {
            l.finishing = None;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Links: connections, replies, faults, recording
// ---------------------------------------------------------------------------------------

/// Why an `Open` failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenError {
    /// The replica has seen a newer epoch: we are fenced.
    Stale(String),
    /// Anything else (unreachable, refused, a bad reply): try again later.
    Failed(String),
}

/// Why a checkpoint failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckpointError {
    /// The local copy could not be synced.
    Sync(String),
    /// A bitmap could not be stored.
    Store(String),
}

/// Why recording a replica's state in the authority failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordError {
    /// The authority moved on: another primary took over.
    Fenced(String),
    /// The authority could not be reached or refused: try again later.
    Failed(String),
}

impl Core {
    fn connect(&mut self, link: usize, out: &mut Vec<Action>) {
        if self.fenced.is_some() {
            return;
        }
        let l = &mut self.links[link];
        if l.conn.is_some() || l.connecting.is_some() {
            return;
        }
        self.next_conn += 1;
        l.connecting = Some(self.next_conn);
        out.push(Action::Connect {
            link,
            conn: self.next_conn,
        });
    }

    /// A connection attempt ended: the replica accepted our epoch and reported its
    /// identity, or the attempt failed.
    pub fn on_open(
        &mut self,
        now: Micros,
        link: usize,
        conn: u64,
        result: Result<Identity, OpenError>,
        out: &mut Vec<Action>,
    ) {
        let l = &mut self.links[link];
        if l.connecting != Some(conn) || self.fenced.is_some() {
            if result.is_ok() {
                out.push(Action::Disconnect { link, conn });
            }
            return;
        }
        l.connecting = None;
        l.probed = true;
        match result {
            Err(OpenError::Stale(why)) => {
                let why = format!("replica {} refused epoch {}: {why}", l.addr, self.cfg.epoch);
                self.fence(now, why, out);
                return;
            }
            Err(OpenError::Failed(why)) => {
                tracing::debug!(volume = %self.cfg.volume, replica = %l.addr, "connection failed: {why}");
                l.status.last_error = why;
                l.retry_at = now + self.cfg.reconnect;
            }
            Ok(identity) => {
                l.conn = Some(conn);
                l.identity = Some(identity);
                if self.phase == Phase::Serving {
                    self.catch_up(now, link, out);
                }
            }
        }
        self.advance_start(now, out);
    }

    /// A connected, out-of-sync link starts catching up: by delta if it is the copy our
    /// bitmap describes, else by a full rebuild under a fresh generation.
    fn catch_up(&mut self, now: Micros, link: usize, out: &mut Vec<Action>) {
        let uuid = self.cfg.uuid.clone();
        let epoch = self.cfg.epoch;
        if self.links[link].state != LinkState::OutOfSync {
            return;
        }
        let Some(conn) = self.links[link].conn else {
            return;
        };
        let full = !self.links[link].matches(&uuid);
        let gen = if full { self.fresh_gen() } else { 0 };
        let l = &mut self.links[link];
        if full {
            tracing::info!(volume = %self.cfg.volume, replica = %l.addr, reported = ?l.identity, expected = ?l.tag, "replica does not hold the copy our bitmap describes: full rebuild");
            l.tag = Tag { uuid, gen };
            l.bits.set_all();
            l.bits_gen += 1;
            let seq = l.seq();
            l.pending.insert(seq, Pending::Adopt { sent: now });
            out.push(Action::Send {
                link,
                conn,
                frame: Frame::Adopt { seq, epoch, gen },
            });
        }
        l.state = LinkState::Resyncing;
        l.finishing = None;
        l.resync = Resync {
            total: l.bits.count(),
            ..Resync::default()
        };
        tracing::info!(volume = %self.cfg.volume, replica = %l.addr, dirty_regions = l.bits.count(), full, "replica back: resyncing");
        self.pump(now, link, out);
    }

    /// The connection `conn` of `link` broke (or the peer closed it).
    pub fn on_disconnect(
        &mut self,
        now: Micros,
        link: usize,
        conn: u64,
        why: String,
        out: &mut Vec<Action>,
    ) {
        if self.links[link].conn == Some(conn) {
            self.fault(now, link, format!("connection lost: {why}"), out);
            self.advance_start(now, out);
        }
    }

    /// A reply on connection `conn` of `link`.
    pub fn on_reply(
        &mut self,
        now: Micros,
        link: usize,
        conn: u64,
        reply: Reply,
        out: &mut Vec<Action>,
    ) {
        if self.links[link].conn != Some(conn) || self.fenced.is_some() {
            return;
        }
        match reply {
            Reply::Ack { seq } => self.on_ack(now, link, seq, out),
            Reply::Nack {
                stale: true,
                message,
                ..
            } => {
                let why = format!(
                    "replica {} refused epoch {}: {message}",
                    self.links[link].addr, self.cfg.epoch
                );
                self.fence(now, why, out);
            }
            Reply::Nack { message, .. } => {
                tracing::error!(volume = %self.cfg.volume, replica = %self.links[link].addr, "replica failed a request: {message}");
                self.fault(now, link, format!("replica error: {message}"), out);
            }
            Reply::Sums { seq, crcs } => self.on_sums(now, link, seq, crcs, out),
            Reply::Data { seq, data } => {
                let l = &mut self.links[link];
                match l.pending.remove(&seq) {
                    Some(Pending::Pull { region, .. })
                        if data.len() as u64 == self.region_len(region) =>
                    {
                        let offset = region as u64 * self.cfg.region_bytes;
                        out.push(Action::WriteLocal {
                            link,
                            region,
                            offset,
                            data,
                        });
                    }
                    // A late reply to a pull abandoned meanwhile.
                    None => {}
                    Some(_) => self.fault(now, link, "unexpected data reply".into(), out),
                }
            }
        }
        self.after_event(now, link, out);
    }

    fn on_ack(&mut self, now: Micros, link: usize, seq: u64, out: &mut Vec<Action>) {
        let region_bytes = self.cfg.region_bytes;
        let disk_bytes = self.cfg.disk_bytes;
        let len_of =
            |r: usize| region_bytes.min(disk_bytes.saturating_sub(r as u64 * region_bytes));
        let l = &mut self.links[link];
        match l.pending.remove(&seq) {
            Some(Pending::Guest { op, .. }) => self.resolve(now, op, link, true, out),
            Some(Pending::Copy { op, region, .. }) => {
                if l.bits.clear(region) {
                    l.bits_gen += 1;
                }
                l.status.copied_regions += 1;
                l.status.copied_bytes += len_of(region);
                self.resolve(now, op, link, true, out);
            }
            Some(Pending::Adopt { .. }) => l.identity = Some(l.tag.clone()),
            Some(Pending::Compare { .. } | Pending::Pull { .. }) => self.fault(
                now,
                link,
                "an ack where a reply with data was due".into(),
                out,
            ),
            None => {}
        }
    }

    fn on_sums(
        &mut self,
        now: Micros,
        link: usize,
        seq: u64,
        crcs: Vec<u32>,
        out: &mut Vec<Action>,
    ) {
        let epoch = self.cfg.epoch;
        let Some(Pending::Compare {
            op, region, data, ..
        }) = self.links[link].pending.remove(&seq)
        else {
            return; // a late reply to a comparison abandoned meanwhile
        };
        self.links[link].status.compared_regions += 1;
        if crcs.len() != 1 {
            self.fault(now, link, "malformed checksum reply".into(), out);
            return;
        }
        let crc = crc32c::crc32c(&data);
        let l = &mut self.links[link];
        if crcs[0] == crc {
            if l.bits.clear(region) {
                l.bits_gen += 1;
            }
            self.resolve(now, op, link, true, out);
            return;
        }
        // Copy it, still under the region's operation: guest writes to the region wait
        // until the replica acknowledged the copy, so it never overtakes a newer write.
        let Some(conn) = l.conn else { return };
        let seq = l.seq();
        let offset = region as u64 * self.cfg.region_bytes;
        l.pending.insert(
            seq,
            Pending::Copy {
                op,
                region,
                sent: now,
            },
        );
        out.push(Action::Send {
            link,
            conn,
            frame: Frame::Write {
                seq,
                epoch,
                offset,
                crc,
                data: Payload::new(data),
            },
        });
    }

    /// A fault on `link`: disconnect, mark what was waiting for it, and record it out of
    /// sync before anything that waited completes.
    fn fault(&mut self, now: Micros, link: usize, why: String, out: &mut Vec<Action>) {
        let reconnect = self.cfg.reconnect;
        let l = &mut self.links[link];
        if let Some(c) = l.conn.take() {
            out.push(Action::Disconnect { link, conn: c });
        }
        tracing::warn!(volume = %self.cfg.volume, replica = %l.addr, "replica fault: {why}");
        l.identity = None;
        l.retry_at = now + reconnect;
        l.status.failures += 1;
        l.status.last_error = why;
        l.finishing = None;
        // The regions being resynced are abandoned (their bits stay set).
        let copies: Vec<OpId> = l.resync.ops.values().copied().collect();
        let pending: Vec<Pending> = std::mem::take(&mut l.pending).into_values().collect();
        let mut guest = Vec::new();
        let mut pulls_lost = 0;
        for p in pending {
            match p {
                Pending::Guest { op, .. } => guest.push(op),
                Pending::Pull { region, .. } => {
                    self.recovery.queue.push_front(region);
                    pulls_lost += 1;
                }
                Pending::Compare { .. } | Pending::Copy { .. } | Pending::Adopt { .. } => {}
            }
        }
        for op in &guest {
            if let Some(o) = self.ops.get(op) {
                let (offset, len) = (o.offset, o.len);
                self.links[link].mark_bits(offset, len);
            }
        }
        self.recovery.pulling = self.recovery.pulling.saturating_sub(pulls_lost);
        let source = self.recovery.source == Some(Source::Link(link));
        let pulled = self.recovery.queue.is_empty() && self.recovery.pulling == 0;
        // (Any replica recorded in sync, not only the source: if the source is lost, another
        // one may be the only copy of what this one lacks.)
        if self.phase == Phase::Starting && (self.recovery.source.is_none() || !pulled) {
            // Before the disk serves, an in-sync replica that drops is not recorded out of
            // sync while it may hold writes this copy lacks: the start decides again.
            if source {
                tracing::warn!(volume = %self.cfg.volume, replica = %self.links[link].addr, "lost the recovery source; choosing again");
                self.recovery.source = None;
                self.recovery.queue.clear();
                self.recovery.pulling = 0;
            }
            self.retire_copies(now, copies, out);
            return;
        }
        let l = &mut self.links[link];
        let maybe_in_sync = l.recorded_in_sync || l.recording == Some(true) || l.maybe_recorded;
        if maybe_in_sync {
            l.state = LinkState::Failing;
            l.waiting_record.extend(guest);
            if l.recording.is_none() {
                self.record(link, false, out);
            }
        } else {
            // The authority knows already: nothing waits for a record.
            l.state = LinkState::OutOfSync;
            let waiting = std::mem::take(&mut l.waiting_record);
            for op in guest.into_iter().chain(waiting) {
                self.resolve(now, op, link, true, out);
            }
        }
        // Only now, with the link's state settled, may the operations that waited behind
        // its copies go: released earlier, a write would have run against a link still
        // resyncing without a connection (found by the simulation).
        self.retire_copies(now, copies, out);
    }

    /// Abandoned resync operations leave the tracker; what waited behind them is released.
    fn retire_copies(&mut self, now: Micros, copies: Vec<OpId>, out: &mut Vec<Action>) {
        for op in copies {
            if let Some(o) = self.ops.remove(&op) {
                self.retire(now, o, out);
            }
        }
    }

    fn record(&mut self, link: usize, in_sync: bool, out: &mut Vec<Action>) {
        let l = &mut self.links[link];
        l.recording = Some(in_sync);
        l.record_retry_at = None;
        out.push(Action::Record { link, in_sync });
    }

    /// The authority recorded `link` as in sync or not (or failed to).
    pub fn on_recorded(
        &mut self,
        now: Micros,
        link: usize,
        in_sync: bool,
        result: Result<(), RecordError>,
        out: &mut Vec<Action>,
    ) {
        let l = &mut self.links[link];
        if l.recording != Some(in_sync) {
            return;
        }
        l.recording = None;
        match result {
            Err(RecordError::Fenced(why)) => {
                self.fence(now, why, out);
                return;
            }
            Err(RecordError::Failed(why)) => {
                // What waits for this keeps waiting: acknowledging before the authority
                // knows could let a stale replica be promoted. A failed "in sync" may have
                // been applied (found by the simulation).
                l.maybe_recorded |= in_sync;
                tracing::error!(volume = %self.cfg.volume, replica = %l.addr, "cannot record the replica's state in the authority, retrying: {why}");
                l.status.last_error = format!("authority: {why}");
                l.record_retry_at = Some(now + self.cfg.reconnect);
                return;
            }
            Ok(()) => {}
        }
        l.recorded_in_sync = in_sync;
        l.maybe_recorded = false;
        if in_sync {
            if l.state == LinkState::Failing {
                // It failed while being recorded in sync: record the fault now.
                self.record(link, false, out);
            } else if l.state == LinkState::Resyncing && !l.bits.is_empty() {
                // Regions were marked meanwhile (a local write failed): it is recorded in
                // sync (it holds every acknowledged write) and catches up on them.
                l.finishing = None;
            } else if l.state == LinkState::Resyncing && l.bits.is_empty() {
                l.state = LinkState::InSync;
                l.finishing = None;
                l.status.last_error.clear();
                tracing::info!(
                    volume = %self.cfg.volume,
                    replica = %l.addr,
                    compared = l.status.compared_regions,
                    copied = l.status.copied_regions,
                    "replica in sync"
                );
                l.resync.total = 0;
            }
        } else {
            tracing::warn!(volume = %self.cfg.volume, replica = %l.addr, "recorded out of sync in the authority; tracking dirty regions");
            if l.state == LinkState::Failing {
                l.state = LinkState::OutOfSync;
                let waiting = std::mem::take(&mut l.waiting_record);
                for op in waiting {
                    self.resolve(now, op, link, true, out);
                }
                if self.phase == Phase::Serving {
                    self.catch_up(now, link, out);
                }
            }
        }
        self.advance_start(now, out);
        self.maybe_stopped(out);
    }

    /// The link's periodic tick (its own thread): timeouts, retries, reconnection, resync.
    pub fn tick(&mut self, now: Micros, link: usize, out: &mut Vec<Action>) {
        if self.fenced.is_some() || matches!(self.phase, Phase::Stopped { .. }) {
            return;
        }
        let timeout = self.cfg.timeout;
        let l = &self.links[link];
        if l.conn.is_some() {
            if let Some(oldest) = l.pending.values().map(Pending::sent).min() {
                if now.saturating_sub(oldest) > timeout {
                    let why = format!("no answer within {} ms", timeout / 1000);
                    self.fault(now, link, why, out);
                }
            }
        }
        let l = &self.links[link];
        if l.recording.is_none() && l.record_retry_at.is_some_and(|t| now >= t) {
            let want = match l.state {
                LinkState::Failing => Some(false),
                LinkState::Resyncing if l.finishing.is_some() && l.bits.is_empty() => Some(true),
                _ => None,
            };
            match want {
                Some(v) => self.record(link, v, out),
                None => {
                    let l = &mut self.links[link];
                    l.record_retry_at = None;
                    l.finishing = None;
                }
            }
        }
        let l = &self.links[link];
        if l.conn.is_none()
            && l.connecting.is_none()
            && now >= l.retry_at
            && l.state != LinkState::Failing
            && self.phase != Phase::Stopping
        {
            self.connect(link, out);
        }
        self.after_event(now, link, out);
    }

    /// Moves the start, the recovery and the resync of `link` on after an event.
    fn after_event(&mut self, now: Micros, link: usize, out: &mut Vec<Action>) {
        if self.phase == Phase::Starting {
            if self.recovery.source == Some(Source::Link(link)) {
                self.pump_pulls(now, link, out);
            }
            self.advance_start(now, out);
        }
        if self.links[link].state == LinkState::Resyncing && self.resync_allowed() {
            self.pump(now, link, out);
        }
    }

    fn resync_allowed(&self) -> bool {
        match self.phase {
            Phase::Serving => true,
            Phase::Starting => {
                self.recovery.source.is_some()
                    && self.recovery.queue.is_empty()
                    && self.recovery.pulling == 0
            }
            _ => false,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Resync
// ---------------------------------------------------------------------------------------

impl Core {
    /// Issues more resync work on `link`, up to the window, within the rate limit.
    fn pump(&mut self, now: Micros, link: usize, out: &mut Vec<Action>) {
        let (rate, window, region_bytes) =
            (self.cfg.resync_rate, self.cfg.window, self.cfg.region_bytes);
        {
            let l = &mut self.links[link];
            if l.state != LinkState::Resyncing || l.conn.is_none() || l.finishing.is_some() {
                return;
            }
            // Before the disk serves, no guest I/O competes: no rate limit.
            if rate > 0 && self.phase == Phase::Serving {
                let last = l.resync.last.unwrap_or(now);
                let add = (now.saturating_sub(last) as u128 * rate as u128 / 1_000_000) as u64;
                l.resync.last = Some(now);
                l.resync.allowance = (l.resync.allowance + add).min(rate / 10 + region_bytes);
            }
        }
        while self.links[link].resync.busy.len() < window {
            let Some(region) = self.next_dirty(link) else {
                break;
            };
            let len = self.region_len(region);
            let l = &mut self.links[link];
            if rate > 0 && self.phase == Phase::Serving {
                if l.resync.allowance < len {
                    break;
                }
                l.resync.allowance -= len;
            }
            l.resync.cursor = region + 1;
            self.lock_region(link, region, out);
        }
        self.finish_resync(link, out);
    }

    /// The next dirty region of `link` not being resynced already: one that no write is
    /// touching if there is one, else any (its resync waits behind the writes, and later
    /// writes wait behind it, so even a region written all the time gets resynced).
    fn next_dirty(&self, link: usize) -> Option<usize> {
        let l = &self.links[link];
        let mut from = l.resync.cursor;
        let mut busy_one = None;
        for _ in 0..l.bits.count() {
            let r = l.bits.next_set(from)?;
            from = r + 1;
            if l.resync.busy.contains(&r) {
                continue;
            }
            if self.regions[r].mutating == 0 {
                return Some(r);
            }
            busy_one.get_or_insert(r);
        }
        busy_one
    }

    /// Takes `region` for a resync of `link`: an operation of the write-ordering tracker,
    /// behind the writes already in flight there, so that while the region is read,
    /// compared and copied no guest write changes it, and the copy never overtakes one.
    fn lock_region(&mut self, link: usize, region: usize, out: &mut Vec<Action>) {
        self.next_op += 1;
        let id = OpId(self.next_op);
        let offset = region as u64 * self.cfg.region_bytes;
        let len = self.region_len(region);
        let mut blocked_by = 0;
        if self.regions[region].mutating > 0 {
            for o in self.ops.values_mut() {
                if o.offset < offset + len && offset < o.offset.saturating_add(o.len) {
                    o.dependents.push(id);
                    blocked_by += 1;
                }
            }
        }
        self.regions[region].mutating += 1;
        self.ops.insert(
            id,
            Op {
                owner: Owner::Resync { link, region },
                offset,
                len,
                regions: region..region + 1,
                kind: None,
                running: false,
                blocked_by,
                dependents: Vec::new(),
                wants_al: false,
                local: Some(true),
                waiting: Link::bit(link),
                ok: true,
            },
        );
        let rs = &mut self.links[link].resync;
        rs.busy.push(region);
        rs.ops.insert(region, id);
        if blocked_by == 0 {
            self.read_region(id, out);
        }
    }

    /// A region's resync operation holds the region now: read the local copy.
    fn read_region(&mut self, id: OpId, out: &mut Vec<Action>) {
        let Some(op) = self.ops.get_mut(&id) else {
            return;
        };
        op.running = true;
        if let Owner::Resync { link, region } = op.owner {
            out.push(Action::ReadLocal {
                link,
                region,
                offset: op.offset,
                len: op.len,
            });
        }
    }

    /// Ends a region's resync operation early (the link went away, or the read failed).
    fn drop_resync(&mut self, now: Micros, id: OpId, out: &mut Vec<Action>) {
        if let Some(o) = self.ops.remove(&id) {
            self.retire(now, o, out);
        }
    }

    /// The local copy of a region was read for a resync comparison.
    pub fn on_local_read(
        &mut self,
        now: Micros,
        link: usize,
        region: usize,
        result: Result<Vec<u8>, String>,
        out: &mut Vec<Action>,
    ) {
        let l = &mut self.links[link];
        let Some(&op) = l.resync.ops.get(&region) else {
            return;
        };
        let conn = match (l.state, l.conn, result) {
            (LinkState::Resyncing, Some(conn), Ok(data)) => {
                let seq = l.seq();
                let len = data.len() as u64;
                l.pending.insert(
                    seq,
                    Pending::Compare {
                        op,
                        region,
                        data,
                        sent: now,
                    },
                );
                out.push(Action::Send {
                    link,
                    conn,
                    frame: Frame::Sums {
                        seq,
                        offset: region as u64 * self.cfg.region_bytes,
                        len,
                    },
                });
                Some(conn)
            }
            (_, _, Err(e)) => {
                tracing::error!(volume = %self.cfg.volume, replica = %l.addr, region, "cannot read the local copy for resync: {e}");
                l.status.last_error = format!("local read: {e}");
                None
            }
            _ => None,
        };
        if conn.is_none() {
            self.drop_resync(now, op, out);
        }
    }

    /// Nothing left to resync on `link`: make its empty bitmap durable, then record it in
    /// sync (a replica already recorded in sync, resynced before serving, just goes back).
    fn finish_resync(&mut self, link: usize, out: &mut Vec<Action>) {
        let l = &mut self.links[link];
        let busy = !l.resync.busy.is_empty()
            || l.pending
                .values()
                .any(|p| !matches!(p, Pending::Guest { .. }));
        if l.state != LinkState::Resyncing || !l.bits.is_empty() || busy || l.finishing.is_some() {
            return;
        }
        if l.recorded_in_sync && l.recording.is_none() {
            l.state = LinkState::InSync;
            l.resync.total = 0;
            tracing::info!(volume = %self.cfg.volume, replica = %l.addr, "replica caught up");
            return;
        }
        if l.recording.is_some() {
            return;
        }
        l.finishing = Some(l.bits_gen);
        out.push(Action::StoreBitmap(l.snapshot(link)));
    }
}

// ---------------------------------------------------------------------------------------
// Start and recovery
// ---------------------------------------------------------------------------------------

impl Core {
    /// Moves the start on: once every replica the authority records in sync has answered
    /// (or not), chooses the source of truth, pulls what may differ from it, brings the
    /// other in-sync replicas up to date, and serves.
    fn advance_start(&mut self, now: Micros, out: &mut Vec<Action>) {
        if self.phase != Phase::Starting || self.fenced.is_some() {
            return;
        }
        if self.recovery.source.is_none() {
            if self.links.iter().any(|l| l.recorded_in_sync && !l.probed) {
                self.recovery.blocker = Some("opening the replicas recorded in sync".into());
                return;
            }
            match self.choose_source() {
                Ok(s) => self.decide(now, s, out),
                Err(why) => {
                    self.recovery.blocker = Some(why);
                    return;
                }
            }
        }
        if let Some(Source::Link(s)) = self.recovery.source {
            self.pump_pulls(now, s, out);
            if !self.recovery.queue.is_empty() || self.recovery.pulling > 0 {
                self.recovery.blocker = Some(format!(
                    "recovering: {} region(s) pulled from {}, {} to go",
                    self.recovery.pulled,
                    self.links[s].addr,
                    self.recovery.queue.len() + self.recovery.pulling
                ));
                return;
            }
        }
        self.demote_unusable(out);
        // The other replicas recorded in sync catch up before the disk serves.
        let mut waiting = false;
        for i in 0..self.links.len() {
            let l = &mut self.links[i];
            if l.recording.is_some() || l.state == LinkState::Failing {
                waiting = true;
                continue;
            }
            if !l.recorded_in_sync {
                continue;
            }
            if l.state == LinkState::InSync && !l.bits.is_empty() {
                l.state = LinkState::Resyncing;
                l.resync = Resync {
                    total: l.bits.count(),
                    ..Resync::default()
                };
                self.pump(now, i, out);
            }
            if self.links[i].state != LinkState::InSync {
                waiting = true;
            }
        }
        if waiting {
            self.recovery.blocker = Some("bringing the in-sync replicas up to date".into());
            return;
        }
        if self.al.wanted != self.al.stored || self.al.storing.is_some() {
            self.store_activity(now, out);
            self.recovery.blocker = Some("storing the activity log".into());
            return;
        }
        self.phase = Phase::Serving;
        self.recovery.blocker = None;
        tracing::info!(volume = %self.cfg.volume, epoch = self.cfg.epoch, recovered = self.recovery.pulled, "replication ready: serving");
        for i in 0..self.links.len() {
            self.catch_up(now, i, out);
        }
    }

    fn choose_source(&self) -> Result<Source, String> {
        let uuid = &self.cfg.uuid;
        let in_sync: Vec<usize> = (0..self.links.len())
            .filter(|&i| self.links[i].recorded_in_sync)
            .collect();
        if in_sync.is_empty() || self.al.stored.is_empty() {
            // No replica holds more than this copy: none is recorded in sync, or the last
            // stop was clean (every acknowledged write is durable here).
            return Ok(Source::Local);
        }
        let best = in_sync
            .iter()
            .copied()
            .filter(|&i| self.links[i].conn.is_some() && self.links[i].of_volume(uuid))
            .min_by_key(|&i| (!self.links[i].matches(uuid), self.links[i].bits.count()));
        if let Some(b) = best {
            return Ok(Source::Link(b));
        }
        let unreachable: Vec<&str> = in_sync
            .iter()
            .filter(|&&i| self.links[i].conn.is_none())
            .map(|&i| self.links[i].addr.as_str())
            .collect();
        if unreachable.is_empty() {
            // Every in-sync replica answered, and none holds a copy of this volume: their
            // data is gone; this copy is the best there is.
            return Ok(Source::Local);
        }
        Err(format!(
            "the last stop was unclean, and the replica(s) {} that the authority records in sync may hold acknowledged writes this copy lost; waiting until one can be reached",
            unreachable.join(", ")
        ))
    }

    /// Fixes the source of truth and what every other copy must catch up on.
    fn decide(&mut self, now: Micros, source: Source, out: &mut Vec<Action>) {
        let uuid = self.cfg.uuid.clone();
        let mut differ = self.al.stored.clone();
        if let Source::Link(s) = source {
            let l = &self.links[s];
            if l.matches(&uuid) {
                differ.union(&l.bits);
            } else {
                differ.set_all();
            }
            self.recovery.queue = differ.iter().collect();
            self.recovery.pulling = 0;
        }
        tracing::info!(
            volume = %self.cfg.volume,
            source = match source { Source::Local => "the local copy", Source::Link(s) => self.links[s].addr.as_str() },
            regions = differ.count(),
            "start: the source of truth is chosen"
        );
        self.recovery.source = Some(source);
        for i in 0..self.links.len() {
            if source == Source::Link(i) {
                continue;
            }
            let l = &mut self.links[i];
            if l.bits.union(&differ) > 0 {
                l.bits_gen += 1;
            }
        }
        // What is pulled lands in the page cache: it stays in the activity log (stored
        // before the disk serves) until a checkpoint has synced it, so a second crash
        // reconciles it again.
        if self.al.wanted.union(&differ) > 0 {
            self.al.wanted_gen += 1;
        }
        self.store_activity(now, out);
    }

    /// Once the source's regions are pulled: a replica recorded in sync that is unreachable,
    /// or not the copy we know, cannot stay in sync. Not earlier: if the source is lost
    /// mid-pull, it may be the only copy left of acknowledged writes this one lacks (found
    /// by the simulation).
    fn demote_unusable(&mut self, out: &mut Vec<Action>) {
        let uuid = self.cfg.uuid.clone();
        for i in 0..self.links.len() {
            if self.recovery.source == Some(Source::Link(i)) {
                continue;
            }
            let matched = self.links[i].matches(&uuid);
            let l = &mut self.links[i];
            if l.recorded_in_sync && !(l.conn.is_some() && matched) && l.state != LinkState::Failing
            {
                l.state = LinkState::Failing;
                if l.recording.is_none() {
                    self.record(i, false, out);
                }
            }
        }
    }

    fn pump_pulls(&mut self, now: Micros, src: usize, out: &mut Vec<Action>) {
        let region_bytes = self.cfg.region_bytes;
        while self.recovery.pulling < self.cfg.window {
            let Some(conn) = self.links[src].conn else {
                return;
            };
            let Some(region) = self.recovery.queue.pop_front() else {
                return;
            };
            let len = self.region_len(region);
            let l = &mut self.links[src];
            let seq = l.seq();
            l.pending.insert(seq, Pending::Pull { region, sent: now });
            self.recovery.pulling += 1;
            out.push(Action::Send {
                link: src,
                conn,
                frame: Frame::Read {
                    seq,
                    offset: region as u64 * region_bytes,
                    len,
                },
            });
        }
    }

    /// Recovered data was written into the local copy.
    pub fn on_local_written(
        &mut self,
        now: Micros,
        link: usize,
        region: usize,
        result: Result<(), String>,
        out: &mut Vec<Action>,
    ) {
        if self.recovery.source != Some(Source::Link(link)) {
            return;
        }
        self.recovery.pulling = self.recovery.pulling.saturating_sub(1);
        match result {
            Err(e) => {
                let why = format!("cannot write recovered data into the local copy: {e}");
                self.fence(now, why, out);
            }
            Ok(()) => {
                self.recovery.pulled += 1;
                let l = &mut self.links[link];
                if l.bits.clear(region) {
                    l.bits_gen += 1;
                }
                self.advance_start(now, out);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Stop and fencing
// ---------------------------------------------------------------------------------------

impl Core {
    /// Begins a clean stop (call once the workers have drained): nothing new is admitted,
    /// resync stops, and once every operation is done the local copy is synced, the bitmaps
    /// stored and the activity log emptied, if every fault was recorded.
    pub fn stop(&mut self, now: Micros, out: &mut Vec<Action>) {
        match self.phase {
            Phase::Stopping | Phase::Stopped { .. } => return,
            Phase::Starting => {
                self.phase = Phase::Stopped { clean: false };
                return;
            }
            Phase::Serving => {}
        }
        if self.fenced.is_some() {
            self.phase = Phase::Stopped { clean: false };
            return;
        }
        self.phase = Phase::Stopping;
        // Resyncs in flight are abandoned: their bits stay set, and late replies to them
        // are ignored.
        let resyncs: Vec<OpId> = self
            .ops
            .iter()
            .filter(|(_, o)| matches!(o.owner, Owner::Resync { .. }))
            .map(|(id, _)| *id)
            .collect();
        for l in &mut self.links {
            l.pending.retain(|_, p| matches!(p, Pending::Guest { .. }));
        }
        for id in resyncs {
            self.drop_resync(now, id, out);
        }
        self.maybe_stop(out);
    }

    /// In a stop, once nothing is in flight: the last checkpoint.
    fn maybe_stop(&mut self, out: &mut Vec<Action>) {
        if self.phase != Phase::Stopping
            || self.checkpoint.is_some()
            || self.stop_checkpointed.is_some()
        {
            return;
        }
        if !self.ops.is_empty() {
            return;
        }
        let all: Vec<usize> = self.al.wanted.iter().collect();
        self.start_checkpoint(all, true, out);
    }

    /// In a stop, once the last checkpoint and the activity log store are done.
    fn maybe_stopped(&mut self, out: &mut Vec<Action>) {
        if self.phase != Phase::Stopping || self.al.storing.is_some() {
            return;
        }
        let Some(ok) = self.stop_checkpointed else {
            return;
        };
        let faults_recorded = self
            .links
            .iter()
            .all(|l| l.state != LinkState::Failing && l.recording.is_none());
        let clean = ok && faults_recorded && self.ops.is_empty() && self.al.stored.is_empty();
        if !clean && self.al.wanted == self.al.stored && !self.al.stored.is_empty() {
            tracing::warn!(volume = %self.cfg.volume, regions = self.al.stored.count(), "stopped with regions in the activity log: the next start reconciles them");
        }
        if self.al.wanted != self.al.stored && ok && faults_recorded {
            return; // the emptied log is still being stored
        }
        if clean && !self.al.persisted {
            // Nothing was stored since start: the daemon would find no log next to the
            // bitmaps, and reconcile everything. Store the empty one.
            let words = self.al.wanted.words().to_vec();
            self.al.storing = Some((self.al.wanted_gen, words.clone()));
            out.push(Action::StoreActivity {
                gen: self.al.wanted_gen,
                words,
            });
            return;
        }
        self.phase = Phase::Stopped { clean };
    }

    /// Fenced: every request fails from now on, and no replica is written again.
    fn fence(&mut self, now: Micros, why: String, out: &mut Vec<Action>) {
        if self.fenced.is_some() {
            return;
        }
        tracing::error!(volume = %self.cfg.volume, epoch = self.cfg.epoch, "FENCED, every request now fails: {why}");
        self.fenced = Some(why.clone());
        out.push(Action::Fenced {
            reason: why.clone(),
        });
        for (i, l) in self.links.iter_mut().enumerate() {
            if let Some(c) = l.conn.take() {
                out.push(Action::Disconnect { link: i, conn: c });
            }
            l.connecting = None;
            l.pending.clear();
            l.waiting_record.clear();
            l.resync = Resync::default();
        }
        // Parked requests fail without local I/O; running ones fail once their local I/O is
        // done. Nothing is released again.
        let mut ids: Vec<OpId> = self.ops.keys().copied().collect();
        ids.sort();
        for id in &ids {
            let Some(op) = self.ops.get_mut(id) else {
                continue;
            };
            op.dependents.clear();
            if op.running {
                continue;
            }
            let op = self.ops.remove(id).expect("present");
            for r in op.regions.clone() {
                self.regions[r].mutating -= 1;
            }
            if let Owner::Guest { queue, conn, head } = op.owner {
                out.push(Action::Complete {
                    queue,
                    conn,
                    head,
                    op: *id,
                    ok: false,
                });
            }
        }
        for id in ids {
            if let Some(op) = self.ops.get_mut(&id) {
                op.waiting = 0;
                op.ok = false;
                if matches!(op.owner, Owner::Resync { .. }) {
                    op.local = Some(true);
                }
            }
            self.maybe_finish(now, id, out);
        }
        if self.phase == Phase::Starting {
            self.recovery.blocker = Some(why);
        }
        if self.phase == Phase::Stopping {
            self.phase = Phase::Stopped { clean: false };
        }
    }
}

#[cfg(test)]
mod tests;
