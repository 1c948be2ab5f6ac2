//! The primary side of replication: the pipeline stage between the queue workers and the
//! engine for a replicated disk. It drives the replication state machine
//! ([`machine::Core`](super::machine::Core)), which makes every decision; this module only
//! performs the actions it asks for and reports their results.
//!
//! Threads, and what each may block on:
//! - **Queue workers** call [`Replication::begin`] and [`Replication::local_done`]: a short
//!   critical section on the state machine, then frames queued on the links' senders. The
//!   frames of a batch are written by [`Replication::flush`] with non-blocking sends; what a
//!   socket does not take is written by the link's thread. A worker never waits on a
//!   replica, the authority or a disk sync.
//! - **One thread per replica link** connects, receives replies, writes what a socket did not
//!   take at once, and reads (resync) or writes (recovery) the local copy for it.
//! - **One metadata thread** stores the activity log (the first write to a new region waits
//!   for it) and decides checkpoints.
//! - **One control thread** runs checkpoints (`fdatasync` of the local copy) and stores the
//!   dirty bitmaps.
//! - **One authority thread** records replicas' states in the authority.
//!
//! Results for guest requests reach the worker of their queue through its [`Mailbox`]
//! (an eventfd in the worker's epoll), or directly when the worker itself caused them.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::authority::{Authority, AuthorityError};
use super::bitmap::{BitmapFile, DirtyMap, Loaded, Tag};
use super::machine::{
    Action, BitmapSnapshot, CheckpointError, Core, CoreConfig, Frame, LinkInit, Micros, Mutation,
    OpDesc, OpId, OpenError, Payload, RecordError, Reply, Verdict,
};
use super::wire::{self, Auth, Code, Msg, Throttle};
use crate::request::Op;

pub use super::machine::{LinkState, LinkStatus, Phase};

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
    /// Where the activity log, the dirty bitmaps and the lock live.
    pub meta_dir: PathBuf,
    /// The volume's UUID when its owner knows it (the API); `None`: the authority's.
    pub uuid: Option<String>,
    /// The name replicas' TLS certificates must carry (`None`: each replica's host).
    pub tls_name: Option<String>,
}

pub const DEFAULT_REGION: u64 = 1 << 20;

/// How long a start may wait for the replicas it needs (see [`Core::start_blocker`]).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a clean stop waits for its last checkpoint.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a link thread ticks the state machine, and how long it waits in `poll`.
const TICK: Duration = Duration::from_millis(20);
/// How long a connection attempt (connect, handshake, `Open`) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Results for the worker of one queue.
pub struct Mailbox {
    items: Mutex<Vec<Delivery>>,
    ready: AtomicBool,
    event: EventFd,
}

/// What happened to one guest request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    pub connection: u64,
    pub head: u16,
    pub op: OpId,
    pub kind: DeliveryKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryKind {
    /// A parked request may go: submit its local I/O.
    Release,
    /// The request is done everywhere (`ok: false`: fail it; if it was parked, without
    /// local I/O).
    Complete { ok: bool },
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
        self.event.as_raw_fd()
    }
}

/// What [`Replication::begin`] decided for a guest mutation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Begin {
    /// Submit the local I/O now; a [`DeliveryKind::Complete`] follows.
    Go(OpId),
    /// Hold the request until a delivery says what to do.
    Parked(OpId),
    /// Fail it now.
    Refused,
    /// Not replicated (nothing to replicate): local I/O only.
    Local,
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
    #[error("another primary serves this volume from {0} (one writer per replicated volume)")]
    Busy(PathBuf),
    #[error("the volume cannot be served yet: {0}")]
    NotReady(String),
    #[error("fenced while starting: {0}")]
    Fenced(String),
}

/// What a daemon needs to serve replicated disks (`serve --authority --node`, and
/// `--replication-key` or `--replication-tls-*`), shared by its `--disk` disks and its API
/// attachments.
#[derive(Clone)]
pub struct ReplContext {
    pub authority: Authority,
    /// How links to replicas authenticate: TLS or a pre-shared key.
    pub key: Auth,
    pub node: String,
}

/// Starts replication for `disk` (its `volume=`, `replicas=` and timing keys), reading and
/// writing the local copy at `path` and keeping the metadata in `meta_dir`. `uuid` is the
/// volume's UUID when the caller knows it (the API).
pub fn start_for_disk(
    disk: &crate::disk::Disk,
    path: &Path,
    ctx: &ReplContext,
    meta_dir: PathBuf,
    uuid: Option<&str>,
) -> Result<Arc<Replication>, ReplError> {
    let c = &disk.config;
    let local = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|source| ReplError::Local {
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
        uuid: uuid.map(str::to_string),
        tls_name: c.tls_name.clone(),
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

/// The sending side of one link.
struct LinkTx {
    /// The connection the sender belongs to (0: none).
    conn: u64,
    sender: Option<wire::Sender>,
    /// A send failed: the link thread reports the connection lost.
    broken: bool,
}

/// Work for one of the driver's threads, posted by the others.
struct Inbox {
    items: Mutex<Vec<Action>>,
    wake: EventFd,
}

impl Inbox {
    fn new() -> io::Result<Inbox> {
        Ok(Inbox {
            items: Mutex::new(Vec::new()),
            wake: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    fn post(&self, a: Action) {
        self.items.lock().unwrap_or_else(|p| p.into_inner()).push(a);
        let _ = self.wake.write(1);
    }

    fn take(&self, into: &mut VecDeque<Action>) {
        into.extend(
            self.items
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .drain(..),
        );
    }

    /// Waits (at most `ms`) for a post.
    fn wait(&self, ms: i32) {
        let mut fds = [libc::pollfd {
            fd: self.wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        if crate::sys::poll(&mut fds, ms).is_ok_and(|n| n > 0) {
            let _ = self.wake.read();
        }
    }
}

/// One replica, as the driver sees it.
struct LinkIo {
    addr: String,
    /// Failed connection attempts, reported at WARN (rate-limited, see [`Throttle`]).
    failures: Throttle,
    tx: Mutex<LinkTx>,
    /// Work for the link's thread from other threads.
    inbox: Inbox,
}

impl LinkIo {
    fn tx(&self) -> MutexGuard<'_, LinkTx> {
        self.tx.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The metadata files, split between the metadata thread (the activity log: its stores
/// are on the write path of new regions) and the control thread (the bitmaps).
struct MetaFiles {
    activity: BitmapFile,
    bitmaps: Vec<(BitmapFile, u64)>,
    /// The epoch every store is tagged with.
    epoch: u64,
}

/// The thread a batch of actions runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ctx {
    /// A queue worker; `batched`: it flushes its frames itself at the end of its batch.
    Worker {
        queue: usize,
        batched: bool,
    },
    Link(usize),
    Meta,
    Ctl,
    Auth,
    Other,
}

/// Work [`Replication::execute`] leaves to the calling thread.
#[derive(Default)]
struct Local {
    work: VecDeque<Action>,
    own: Vec<Delivery>,
}

/// The replication state of one disk, shared by its workers and its threads.
pub struct Replication {
    pub config: ReplConfig,
    pub epoch: u64,
    pub uuid: String,
    authority: Authority,
    key: Auth,
    disk_bytes: u64,
    core: Mutex<Core>,
    origin: Instant,
    /// A page-cache descriptor of the local copy, for resync reads and recovery writes.
    local: File,
    links: Vec<LinkIo>,
    /// The metadata thread: activity log stores, checkpoint decisions.
    meta: Inbox,
    /// The control thread: checkpoints' syncs and bitmap stores (a sync may take seconds;
    /// no reply, log store or authority record waits behind it).
    ctl: Inbox,
    /// The authority thread: records replicas' states (writes waiting for a fault to be
    /// recorded wait for nothing else).
    auth: Inbox,
    mailboxes: Vec<Mailbox>,
    fenced: AtomicBool,
    fence_reason: Mutex<String>,
    connection: AtomicU64,
    stop: AtomicBool,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// The exclusive lock on the metadata directory, held until [`Replication::shutdown`].
    lock: Mutex<Option<File>>,
}

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

const ACTIVITY: &str = "activity";

impl Replication {
    /// Takes the volume over as its primary (bumping the epoch in the authority), loads the
    /// activity log and the dirty bitmaps, starts the threads, and returns once the state
    /// machine serves: the in-sync replicas answered, and what an unclean stop may have
    /// left different was reconciled.
    pub fn start(
        config: ReplConfig,
        authority: Authority,
        key: Auth,
        local: File,
        disk_bytes: u64,
        queues: usize,
    ) -> Result<Arc<Replication>, ReplError> {
        let meta_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ReplError::Meta { path, source }
        };
        let dir = &config.meta_dir;
        std::fs::create_dir_all(dir).map_err(meta_err(dir))?;
        let lock_path = dir.join("lock");
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(meta_err(&lock_path))?;
        if !crate::sys::try_flock_exclusive(&lock).map_err(meta_err(&lock_path))? {
            return Err(ReplError::Busy(dir.clone()));
        }
        // The record as this node left it (or not): what the metadata may be trusted for.
        let before = authority.load(&config.volume)?.map(|v| v.record);
        let record = authority.take_over(
            &config.volume,
            &config.node,
            &config.replicas,
            config.uuid.as_deref(),
        )?;
        let (files, links, activity) =
            Self::load_meta(&config, before.as_ref(), &record, disk_bytes)?;
        tracing::info!(
            volume = %config.volume,
            epoch = record.epoch,
            uuid = %record.uuid,
            authority = %authority.describe(),
            active_regions = activity.as_ref().map_or(usize::MAX, DirtyMap::count),
            "took the volume over as primary"
        );
        let mut cfg = CoreConfig::new(
            &config.volume,
            &record.uuid,
            record.epoch,
            disk_bytes,
            config.region_bytes,
        );
        cfg.timeout = config.timeout.as_micros() as u64;
        cfg.resync_rate = config.resync_rate;
        let origin = Instant::now();
        let mut first = Vec::new();
        let core = Core::new(cfg, links, activity, 0, &mut first);
        let repl = Arc::new(Replication {
            epoch: record.epoch,
            uuid: record.uuid.clone(),
            authority,
            key,
            disk_bytes,
            core: Mutex::new(core),
            origin,
            local,
            links: config
                .replicas
                .iter()
                .map(|addr| {
                    Ok(LinkIo {
                        addr: addr.clone(),
                        failures: Throttle::new(),
                        tx: Mutex::new(LinkTx {
                            conn: 0,
                            sender: None,
                            broken: false,
                        }),
                        inbox: Inbox::new()?,
                    })
                })
                .collect::<io::Result<_>>()
                .map_err(ReplError::Start)?,
            meta: Inbox::new().map_err(ReplError::Start)?,
            ctl: Inbox::new().map_err(ReplError::Start)?,
            auth: Inbox::new().map_err(ReplError::Start)?,
            mailboxes: (0..queues)
                .map(|_| Mailbox::new())
                .collect::<io::Result<_>>()
                .map_err(ReplError::Start)?,
            fenced: AtomicBool::new(false),
            fence_reason: Mutex::new(String::new()),
            connection: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            threads: Mutex::new(Vec::new()),
            lock: Mutex::new(Some(lock)),
            config,
        });
        repl.spawn_threads(files)?;
        repl.execute(first, Ctx::Other, &mut Local::default());
        if let Err(e) = repl.wait_serving() {
            repl.stop_threads();
            drop(repl.lock.lock().unwrap_or_else(|p| p.into_inner()).take());
            return Err(e);
        }
        Ok(repl)
    }

    /// Opens the activity log and one dirty bitmap per replica, trusting each only if this
    /// node stored it as the primary of the epoch `before` holds (the one `take_over` just
    /// superseded), for a replica that was a member then; then stores them all again at the
    /// new epoch.
    ///
    /// - A replica dropped from the membership and added back, or metadata from an older
    ///   era of this node, would describe a copy as it was then: not trusted (found by the
    ///   simulation and the review). Its replica gets a full rebuild.
    /// - No record, a tombstone, another uuid, or another primary before (a promotion to
    ///   this node: every other replica was recorded out of sync): nothing was written here
    ///   that a replica holds and this copy lacks; the log starts empty.
    /// - This node was the primary, but its log is missing, unreadable or older: every
    ///   region counts as active, and is reconciled from an in-sync replica.
    fn load_meta(
        config: &ReplConfig,
        before: Option<&super::authority::VolumeRecord>,
        record: &super::authority::VolumeRecord,
        disk_bytes: u64,
    ) -> Result<(MetaFiles, Vec<LinkInit>, Option<DirtyMap>), ReplError> {
        let rb = config.region_bytes;
        let path_of = |name: &str| config.meta_dir.join(name);
        let open = |name: &str| {
            BitmapFile::open(&path_of(name), disk_bytes, rb).map_err(|source| ReplError::Meta {
                path: path_of(name),
                source,
            })
        };
        let ours =
            before.filter(|b| !b.deleted && b.primary == config.node && b.uuid == record.uuid);
        // Stored at the epoch of this node's last take-over only. (Files of the epoch before
        // it, left by a start that died before storing them again, would be accurate in
        // this directory, but another metadata directory of this node may have served that
        // epoch meanwhile: not trusted, at the price of a full reconcile.)
        let trusted = |tag: &Tag, epoch: u64| {
            ours.is_some_and(|b| b.epoch == epoch) && tag.uuid == record.uuid
        };
        let empty = DirtyMap::in_memory(disk_bytes, rb);
        let (mut al_file, loaded) = open(ACTIVITY)?;
        let activity = match loaded {
            Loaded::Valid(map, tag, epoch) if trusted(&tag, epoch) => Some(map),
            _ if ours.is_none() => Some(empty.clone()),
            Loaded::Invalid(why) => {
                tracing::error!(volume = %config.volume, "the activity log cannot be read ({why}): every region will be reconciled");
                None
            }
            _ => {
                tracing::warn!(volume = %config.volume, "no activity log of the last epoch: every region will be reconciled");
                None
            }
        };
        let al_tag = Tag {
            uuid: record.uuid.clone(),
            gen: 0,
        };
        let mut al_words = empty.clone();
        match &activity {
            Some(map) => al_words = map.clone(),
            None => al_words.set_all(),
        }
        al_file
            .store(al_words.words(), &al_tag, record.epoch)
            .map_err(|source| ReplError::Meta {
                path: path_of(ACTIVITY),
                source,
            })?;
        let mut links = Vec::new();
        let mut bitmaps = Vec::new();
        for addr in &config.replicas {
            let name = map_name(addr);
            let (mut file, loaded) = open(&name)?;
            let member = ours.is_some_and(|b| b.member(addr).is_some());
            let bitmap = match loaded {
                Loaded::Valid(map, tag, epoch) if member && trusted(&tag, epoch) => {
                    Some((map, tag))
                }
                Loaded::Invalid(why) => {
                    tracing::error!(volume = %config.volume, replica = %addr, "the dirty bitmap cannot be read ({why}): the replica gets a full rebuild");
                    None
                }
                _ => None,
            };
            let (words, tag) = match &bitmap {
                Some((map, tag)) => (map.words().to_vec(), tag.clone()),
                None => {
                    let mut all = empty.clone();
                    all.set_all();
                    (all.words().to_vec(), Tag::default())
                }
            };
            file.store(&words, &tag, record.epoch)
                .map_err(|source| ReplError::Meta {
                    path: path_of(&name),
                    source,
                })?;
            links.push(LinkInit {
                addr: addr.clone(),
                in_sync: record.member(addr).is_some_and(|m| m.in_sync),
                bitmap,
            });
            bitmaps.push((file, 0));
        }
        Ok((
            MetaFiles {
                activity: al_file,
                bitmaps,
                epoch: record.epoch,
            },
            links,
            activity,
        ))
    }

    /// Starts the link, metadata, control and authority threads (all or none).
    fn spawn_threads(self: &Arc<Self>, files: MetaFiles) -> Result<(), ReplError> {
        let spawned = self.try_spawn_threads(files);
        if spawned.is_err() {
            self.stop_threads();
        }
        spawned
    }

    fn try_spawn_threads(self: &Arc<Self>, files: MetaFiles) -> Result<(), ReplError> {
        let spawn = |name: String, f: Box<dyn FnOnce() + Send>| {
            let t = std::thread::Builder::new()
                .name(name)
                .spawn(f)
                .map_err(ReplError::Start)?;
            self.threads
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(t);
            Ok::<(), ReplError>(())
        };
        for i in 0..self.links.len() {
            let me = Arc::clone(self);
            spawn(
                format!("link-{}", self.links[i].addr),
                Box::new(move || me.link_thread(i)),
            )?;
        }
        let MetaFiles {
            activity,
            bitmaps,
            epoch,
        } = files;
        let me = Arc::clone(self);
        spawn(
            format!("meta-{}", self.config.volume),
            Box::new(move || me.meta_thread(activity, epoch)),
        )?;
        let me = Arc::clone(self);
        spawn(
            format!("ctl-{}", self.config.volume),
            Box::new(move || me.ctl_thread(bitmaps, epoch)),
        )?;
        let me = Arc::clone(self);
        spawn(
            format!("auth-{}", self.config.volume),
            Box::new(move || me.auth_thread()),
        )?;
        Ok(())
    }

    /// Waits until the state machine serves, or fails the start.
    /// Waits until the state machine serves, or fails the start once it has made no
    /// progress for a while (a recovery may pull many regions; it must keep moving).
    fn wait_serving(&self) -> Result<(), ReplError> {
        let patience = START_TIMEOUT.max(3 * self.config.timeout);
        let mut deadline = Instant::now() + patience;
        let mut progress = 0;
        loop {
            {
                let c = self.core();
                if let Some(why) = c.fenced() {
                    return Err(ReplError::Fenced(why.to_string()));
                }
                if c.phase() == Phase::Serving {
                    return Ok(());
                }
                if c.start_progress() != progress {
                    progress = c.start_progress();
                    deadline = Instant::now() + patience;
                }
                if Instant::now() >= deadline {
                    let why = c
                        .start_blocker()
                        .unwrap_or("the replicas did not answer")
                        .to_string();
                    tracing::error!(volume = %self.config.volume, "not serving: {why}");
                    return Err(ReplError::NotReady(why));
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn core(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now(&self) -> Micros {
        self.origin.elapsed().as_micros() as Micros
    }

    pub fn mailbox(&self, queue: usize) -> &Mailbox {
        &self.mailboxes[queue]
    }

    /// A new frontend connection: results for the old one are ignored from now on.
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

    /// Every link's state and counters, and the disk's phase.
    pub fn status(&self) -> (Phase, Vec<LinkStatus>) {
        let c = self.core();
        (c.phase(), c.status())
    }

    // -----------------------------------------------------------------------------------
    // The worker's side
    // -----------------------------------------------------------------------------------

    /// Starts a guest write, discard or write-zeroes (`data`: a write's payload). Results
    /// for the calling worker's own queue that are ready at once go to `own`.
    pub fn begin(
        &self,
        queue: usize,
        connection: u64,
        head: u16,
        op: Op,
        data: Option<Payload>,
        own: &mut Vec<Delivery>,
    ) -> Begin {
        if self.is_fenced() {
            return Begin::Refused;
        }
        let (offset, len, kind) = match op {
            Op::Write { offset } => {
                let data = data.unwrap_or_else(|| Payload::new(Vec::new()));
                let crc = crc32c::crc32c(&data);
                (offset, data.len() as u64, Mutation::Write { crc, data })
            }
            Op::Discard { offset, len } => (offset, len, Mutation::Zero { unmap: true }),
            Op::WriteZeroes { offset, len, unmap } => (offset, len, Mutation::Zero { unmap }),
            _ => return Begin::Local,
        };
        let desc = OpDesc {
            queue: queue as u16,
            conn: connection,
            head,
            offset,
            len,
            kind,
        };
        let mut actions = Vec::new();
        let verdict = {
            let now = self.now();
            self.core().begin(now, desc, &mut actions)
        };
        self.execute_for_worker(actions, queue, own, true);
        match verdict {
            Verdict::Go(id) => Begin::Go(id),
            Verdict::Parked(id) => Begin::Parked(id),
            Verdict::Refused => Begin::Refused,
            Verdict::Local => Begin::Local,
        }
    }

    /// The local I/O of a started request is done.
    pub fn local_done(&self, queue: usize, op: OpId, ok: bool, own: &mut Vec<Delivery>) {
        let mut actions = Vec::new();
        {
            let now = self.now();
            self.core().local_done(now, op, ok, &mut actions);
        }
        // What this releases is sent now: the worker's batch may be over.
        self.execute_for_worker(actions, queue, own, false);
    }

    /// A flush of the local copy failed: see [`Core::local_sync_failed`].
    pub fn local_sync_failed(&self, why: &str) {
        let mut actions = Vec::new();
        {
            let now = self.now();
            self.core().local_sync_failed(now, why, &mut actions);
        }
        self.execute(actions, Ctx::Other, &mut Local::default());
    }

    /// A parked request will never run (its worker is going away).
    pub fn abandon(&self, op: OpId) {
        let mut actions = Vec::new();
        {
            let now = self.now();
            self.core().abandon(now, op, &mut actions);
        }
        self.execute(actions, Ctx::Other, &mut Local::default());
    }

    /// Writes the frames queued since the last call, on every link, without blocking: a
    /// queue worker calls it once per batch, so a batch costs one send per replica.
    pub fn flush(&self) {
        for i in 0..self.links.len() {
            self.flush_link(i);
        }
    }

    /// Performs actions a worker caused; with `batched`, the frames wait for the worker's
    /// [`flush`](Self::flush) at the end of its batch.
    fn execute_for_worker(
        &self,
        actions: Vec<Action>,
        queue: usize,
        own: &mut Vec<Delivery>,
        batched: bool,
    ) {
        if actions.is_empty() {
            return;
        }
        let mut local = Local::default();
        self.execute(actions, Ctx::Worker { queue, batched }, &mut local);
        own.append(&mut local.own);
    }

    // -----------------------------------------------------------------------------------
    // Performing actions
    // -----------------------------------------------------------------------------------

    /// Performs what it can of `actions` at once (sends, deliveries) and routes the rest to
    /// the thread that must do it; work for the calling thread goes to `local`.
    fn execute(&self, actions: Vec<Action>, ctx: Ctx, local: &mut Local) {
        let mut touched = 0u64;
        for a in actions {
            match a {
                Action::Send { link, conn, frame } => {
                    if self.send(link, conn, &frame) {
                        touched |= 1 << link;
                    }
                }
                Action::Disconnect { link, conn } => self.disconnect(link, conn),
                Action::Connect { link, .. }
                | Action::ReadLocal { link, .. }
                | Action::WriteLocal { link, .. } => {
                    if ctx == Ctx::Link(link) {
                        local.work.push_back(a);
                    } else {
                        self.links[link].inbox.post(a);
                    }
                }
                Action::Record { .. } => {
                    if ctx == Ctx::Auth {
                        local.work.push_back(a);
                    } else {
                        self.auth.post(a);
                    }
                }
                Action::StoreBitmap(_) | Action::Checkpoint { .. } => {
                    if ctx == Ctx::Ctl {
                        local.work.push_back(a);
                    } else {
                        self.ctl.post(a);
                    }
                }
                Action::StoreActivity { .. } => {
                    if ctx == Ctx::Meta {
                        local.work.push_back(a);
                    } else {
                        self.meta.post(a);
                    }
                }
                Action::Release {
                    queue,
                    conn,
                    head,
                    op,
                } => self.deliver(ctx, local, queue, conn, head, op, DeliveryKind::Release),
                Action::Complete {
                    queue,
                    conn,
                    head,
                    op,
                    ok,
                } => self.deliver(
                    ctx,
                    local,
                    queue,
                    conn,
                    head,
                    op,
                    DeliveryKind::Complete { ok },
                ),
                Action::Fenced { reason } => {
                    *self.fence_reason.lock().unwrap_or_else(|p| p.into_inner()) = reason;
                    self.fenced.store(true, Ordering::Release);
                }
            }
        }
        // A worker writes its batch's frames once, at the end of the batch.
        if !matches!(ctx, Ctx::Worker { batched: true, .. }) {
            for i in 0..self.links.len() {
                if touched & (1 << i) != 0 {
                    self.flush_link(i);
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn deliver(
        &self,
        ctx: Ctx,
        local: &mut Local,
        queue: u16,
        connection: u64,
        head: u16,
        op: OpId,
        kind: DeliveryKind,
    ) {
        let d = Delivery {
            connection,
            head,
            op,
            kind,
        };
        if matches!(ctx, Ctx::Worker { queue: q, .. } if q == usize::from(queue)) {
            local.own.push(d);
        } else if let Some(m) = self.mailboxes.get(usize::from(queue)) {
            m.post(d);
        }
    }

    /// Queues `frame` on `link` if `conn` is still its connection.
    fn send(&self, link: usize, conn: u64, frame: &Frame) -> bool {
        let mut tx = self.links[link].tx();
        if tx.conn != conn {
            return false;
        }
        let Some(s) = &mut tx.sender else {
            return false;
        };
        match frame {
            Frame::Write {
                seq,
                epoch,
                offset,
                crc,
                data,
            } => s.push_write(*seq, *epoch, *offset, *crc, data),
            Frame::Zero {
                seq,
                epoch,
                offset,
                len,
                unmap,
            } => s.push(&Msg::Zero {
                seq: *seq,
                epoch: *epoch,
                offset: *offset,
                len: *len,
                unmap: *unmap,
            }),
            Frame::Sums { seq, offset, len } => s.push(&Msg::Sums {
                seq: *seq,
                offset: *offset,
                len: *len,
                chunk: *len as u32,
            }),
            Frame::Read { seq, offset, len } => s.push(&Msg::Read {
                seq: *seq,
                offset: *offset,
                len: *len,
            }),
            Frame::Adopt { seq, epoch, gen } => s.push(&Msg::Adopt {
                seq: *seq,
                epoch: *epoch,
                gen: *gen,
            }),
        }
        true
    }

    /// Writes what the socket of `link` takes now; the rest is left to the link's thread.
    fn flush_link(&self, link: usize) {
        let l = &self.links[link];
        let mut tx = l.tx();
        let Some(s) = &mut tx.sender else {
            return;
        };
        if !s.has_queued() {
            return;
        }
        match s.try_flush() {
            Ok(true) => {}
            Ok(false) => {
                let _ = l.inbox.wake.write(1);
            }
            Err(_) => {
                tx.broken = true;
                let _ = l.inbox.wake.write(1);
            }
        }
    }

    fn disconnect(&self, link: usize, conn: u64) {
        let l = &self.links[link];
        let mut tx = l.tx();
        if tx.conn == conn {
            if let Some(s) = tx.sender.take() {
                s.shutdown();
            }
            tx.conn = 0;
            tx.broken = false;
            let _ = l.inbox.wake.write(1);
        }
    }

    // -----------------------------------------------------------------------------------
    // Link threads
    // -----------------------------------------------------------------------------------

    /// A link's thread: performs its blocking work, receives replies, ticks the machine.
    fn link_thread(self: Arc<Self>, i: usize) {
        let mut rx: Option<(u64, wire::Receiver)> = None;
        let mut local = Local::default();
        let mut next_tick = Instant::now();
        while !self.stop.load(Ordering::SeqCst) {
            self.links[i].inbox.take(&mut local.work);
            while let Some(a) = local.work.pop_front() {
                let out = self.link_work(i, a, &mut rx);
                self.execute(out, Ctx::Link(i), &mut local);
            }
            // Drop a receiver whose connection the machine has closed.
            if let Some((conn, _)) = &rx {
                if self.links[i].tx().conn != *conn {
                    rx = None;
                }
            }
            let lost = self.wait_and_receive(i, &mut rx, &mut local);
            if let Some((conn, why)) = lost {
                rx = None;
                let mut out = Vec::new();
                let now = self.now();
                self.core().on_disconnect(now, i, conn, why, &mut out);
                self.execute(out, Ctx::Link(i), &mut local);
            }
            if Instant::now() >= next_tick {
                next_tick = Instant::now() + TICK;
                let mut out = Vec::new();
                let now = self.now();
                self.core().tick(now, i, &mut out);
                self.execute(out, Ctx::Link(i), &mut local);
            }
        }
        if let Some(s) = self.links[i].tx().sender.take() {
            s.shutdown();
        }
    }

    /// Waits (at most a tick) for a reply, writability or a wake-up, writes what is queued
    /// and handles the replies. Returns a lost connection.
    fn wait_and_receive(
        &self,
        i: usize,
        rx: &mut Option<(u64, wire::Receiver)>,
        local: &mut Local,
    ) -> Option<(u64, String)> {
        let link = &self.links[i];
        let (want_out, broken) = {
            let tx = link.tx();
            (
                tx.sender.as_ref().is_some_and(|s| s.has_queued()),
                tx.broken,
            )
        };
        if let (true, Some((conn, _))) = (broken, rx.as_ref()) {
            return Some((*conn, "send failed".into()));
        }
        let mut fds = [
            libc::pollfd {
                fd: link.inbox.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: -1,
                events: 0,
                revents: 0,
            },
        ];
        let buffered = rx.as_ref().is_some_and(|(_, r)| r.has_buffered());
        if let Some((_, r)) = rx.as_ref() {
            fds[1].fd = r.raw_fd();
            fds[1].events = libc::POLLIN | if want_out { libc::POLLOUT } else { 0 };
        }
        let timeout = if buffered { 0 } else { TICK.as_millis() as i32 };
        if let Err(e) = crate::sys::poll(&mut fds, timeout) {
            tracing::warn!("poll failed: {e}");
            std::thread::sleep(TICK);
        }
        if fds[0].revents != 0 {
            let _ = link.inbox.wake.read();
        }
        let (conn, r) = rx.as_mut()?;
        let conn = *conn;
        if fds[1].revents & libc::POLLOUT != 0 {
            self.flush_link(i);
        }
        let readable =
            buffered || fds[1].revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0;
        if !readable {
            return None;
        }
        loop {
            match r.recv() {
                Ok(msg) => {
                    let reply = match msg {
                        Msg::Ack { seq, .. } => Reply::Ack { seq },
                        Msg::Nack { seq, code, message } => Reply::Nack {
                            seq,
                            stale: code == Code::Stale,
                            message,
                        },
                        Msg::SumsReply { seq, crcs } => Reply::Sums { seq, crcs },
                        Msg::Data { seq, data } => Reply::Data { seq, data },
                        other => {
                            return Some((conn, format!("unexpected message {:?}", other.seq())))
                        }
                    };
                    let mut out = Vec::new();
                    let now = self.now();
                    self.core().on_reply(now, i, conn, reply, &mut out);
                    self.execute(out, Ctx::Link(i), local);
                    if !r.has_buffered() && !readable_now(r.raw_fd()) {
                        return None;
                    }
                }
                Err(e) if e.is_timeout() => return None,
                Err(e) => return Some((conn, e.to_string())),
            }
        }
    }

    /// Performs one blocking action of link `i`; returns what the machine asks next.
    fn link_work(
        &self,
        i: usize,
        a: Action,
        rx: &mut Option<(u64, wire::Receiver)>,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        match a {
            Action::Connect { conn, .. } => {
                *rx = None;
                let result = match self.open_link(i) {
                    Ok((sender, receiver, identity)) => {
                        let mut tx = self.links[i].tx();
                        if let Some(old) = tx.sender.replace(sender) {
                            old.shutdown();
                        }
                        tx.conn = conn;
                        tx.broken = false;
                        drop(tx);
                        *rx = Some((conn, receiver));
                        Ok(identity)
                    }
                    Err(e) => {
                        self.report_open_failure(i, &e);
                        Err(e)
                    }
                };
                let now = self.now();
                self.core().on_open(now, i, conn, result, &mut out);
            }
            Action::ReadLocal {
                region,
                offset,
                len,
                ..
            } => {
                let mut data = vec![0u8; len as usize];
                let result = self
                    .local
                    .read_exact_at(&mut data, offset)
                    .map(|()| data)
                    .map_err(|e| e.to_string());
                let now = self.now();
                self.core().on_local_read(now, i, region, result, &mut out);
            }
            Action::WriteLocal {
                region,
                offset,
                data,
                ..
            } => {
                let result = self
                    .local
                    .write_all_at(&data, offset)
                    .map_err(|e| e.to_string());
                let now = self.now();
                self.core()
                    .on_local_written(now, i, region, result, &mut out);
            }
            _ => {}
        }
        out
    }

    /// Logs a failed connection attempt at WARN (rate-limited): a replica that refuses
    /// our key or certificate, or that we refuse, must be visible without `/health`.
    fn report_open_failure(&self, i: usize, e: &OpenError) {
        if let Some(n) = self.links[i].failures.ready() {
            let (volume, replica) = (&self.config.volume, &self.links[i].addr);
            let (OpenError::Stale(why) | OpenError::Failed(why)) = e;
            tracing::warn!(%volume, %replica, "cannot connect to the replica ({n} failed attempt(s) since the last report): {why}");
        }
    }

    /// Connects to link `i`'s replica, authenticates and opens the volume at our epoch.
    fn open_link(&self, i: usize) -> Result<(wire::Sender, wire::Receiver, Tag), OpenError> {
        let addr = &self.links[i].addr;
        let failed = |e: String| OpenError::Failed(format!("{addr}: {e}"));
        let sa = addr
            .to_socket_addrs()
            .map_err(|e| failed(e.to_string()))?
            .next()
            .ok_or_else(|| failed("no address".into()))?;
        let stream = TcpStream::connect_timeout(&sa, CONNECT_TIMEOUT)
            .map_err(|e| failed(format!("connect: {e}")))?;
        let (mut s, mut r) = self
            .key
            .connect(stream, addr, self.config.tls_name.as_deref())
            .map_err(|e| failed(e.to_string()))?;
        s.set_timeout(Some(self.config.timeout.max(CONNECT_TIMEOUT)))
            .map_err(|e| failed(e.to_string()))?;
        r.set_timeout(Some(self.config.timeout.max(CONNECT_TIMEOUT)))
            .map_err(|e| failed(e.to_string()))?;
        s.send(&Msg::Open {
            seq: 0,
            epoch: self.epoch,
            size: self.disk_bytes,
            volume: self.config.volume.clone(),
            uuid: self.uuid.clone(),
        })
        .map_err(|e| failed(e.to_string()))?;
        let identity = match r.recv() {
            Ok(Msg::Opened { uuid, gen, .. }) => Tag { uuid, gen },
            Ok(Msg::Nack {
                code: Code::Stale,
                message,
                ..
            }) => return Err(OpenError::Stale(message)),
            Ok(Msg::Nack { message, .. }) => return Err(failed(format!("refused: {message}"))),
            Ok(_) => return Err(failed("unexpected reply to Open".into())),
            Err(e) => return Err(failed(e.to_string())),
        };
        r.set_timeout(Some(TICK))
            .map_err(|e| failed(e.to_string()))?;
        Ok((s, r, identity))
    }

    // -----------------------------------------------------------------------------------
    // The metadata thread
    // -----------------------------------------------------------------------------------

    /// The metadata thread: stores the activity log (on the path of writes to new
    /// regions: nothing slow runs here), and decides checkpoints.
    fn meta_thread(self: Arc<Self>, mut activity: BitmapFile, epoch: u64) {
        let tag = Tag {
            uuid: self.uuid.clone(),
            gen: 0,
        };
        let mut local = Local::default();
        loop {
            self.meta.take(&mut local.work);
            let idle = local.work.is_empty();
            while let Some(a) = local.work.pop_front() {
                let mut out = Vec::new();
                if let Action::StoreActivity { gen, words } = a {
                    let stored = activity.store(&words, &tag, epoch);
                    if let Err(e) = &stored {
                        tracing::error!(volume = %self.config.volume, "cannot store the activity log: {e}");
                    }
                    let now = self.now();
                    self.core()
                        .on_activity_stored(now, gen, stored.is_ok(), &mut out);
                }
                self.execute(out, Ctx::Meta, &mut local);
            }
            if idle && self.stop.load(Ordering::SeqCst) {
                break;
            }
            if idle {
                self.meta.wait(TICK.as_millis() as i32);
            }
            let mut out = Vec::new();
            let now = self.now();
            self.core().tick_meta(now, &mut out);
            self.execute(out, Ctx::Meta, &mut local);
        }
    }

    /// The control thread: syncs the local copy for checkpoints and stores the dirty
    /// bitmaps. A slow disk delays only these, never a replica's replies, an activity-log
    /// store or an authority record.
    fn ctl_thread(self: Arc<Self>, mut bitmaps: Vec<(BitmapFile, u64)>, epoch: u64) {
        let mut local = Local::default();
        loop {
            self.ctl.take(&mut local.work);
            let idle = local.work.is_empty();
            while let Some(a) = local.work.pop_front() {
                let out = self.ctl_work(a, &mut bitmaps, epoch);
                self.execute(out, Ctx::Ctl, &mut local);
            }
            if idle && self.stop.load(Ordering::SeqCst) {
                break;
            }
            if idle {
                self.ctl.wait(100);
            }
        }
    }

    fn ctl_work(&self, a: Action, bitmaps: &mut [(BitmapFile, u64)], epoch: u64) -> Vec<Action> {
        let mut out = Vec::new();
        match a {
            Action::StoreBitmap(snap) => {
                // An empty bitmap is stored just before the replica is recorded in sync: the
                // local copy its resync read must be durable first. A writeback error not
                // reported yet (the page cache may have served what the disk lost) fences.
                if snap.words.iter().all(|&w| w == 0) {
                    if let Err(e) = self.local.sync_data() {
                        let now = self.now();
                        let mut core = self.core();
                        core.local_sync_failed(now, &e.to_string(), &mut out);
                        core.on_bitmap_stored(snap.link, snap.gen, false, &mut out);
                        return out;
                    }
                }
                let ok = self.store_bitmap(bitmaps, &snap, epoch).is_ok();
                self.core()
                    .on_bitmap_stored(snap.link, snap.gen, ok, &mut out);
            }
            Action::Checkpoint { id, bitmaps: snaps } => {
                let result = match self.local.sync_data() {
                    Err(e) => Err(CheckpointError::Sync(e.to_string())),
                    Ok(()) => snaps
                        .iter()
                        .try_for_each(|b| self.store_bitmap(bitmaps, b, epoch))
                        .map_err(CheckpointError::Store),
                };
                let now = self.now();
                self.core().on_checkpoint(now, id, result, &mut out);
            }
            _ => {}
        }
        out
    }

    /// The authority thread: records replicas' states in the authority (a call may take
    /// seconds while the authority is slow or down; only what waits for a record waits).
    fn auth_thread(self: Arc<Self>) {
        let mut local = Local::default();
        loop {
            self.auth.take(&mut local.work);
            let idle = local.work.is_empty();
            while let Some(a) = local.work.pop_front() {
                let mut out = Vec::new();
                if let Action::Record { link, in_sync } = a {
                    let r = self.authority.set_in_sync(
                        &self.config.volume,
                        &self.config.node,
                        self.epoch,
                        &self.links[link].addr,
                        in_sync,
                    );
                    let result = match r {
                        Ok(_) => Ok(()),
                        Err(e @ AuthorityError::Fenced { .. }) => {
                            Err(RecordError::Fenced(e.to_string()))
                        }
                        Err(e) => Err(RecordError::Failed(e.to_string())),
                    };
                    let now = self.now();
                    self.core()
                        .on_recorded(now, link, in_sync, result, &mut out);
                }
                self.execute(out, Ctx::Auth, &mut local);
            }
            if idle && self.stop.load(Ordering::SeqCst) {
                break;
            }
            if idle {
                self.auth.wait(100);
            }
        }
    }

    /// Stores a bitmap snapshot unless the file already holds a newer one.
    fn store_bitmap(
        &self,
        bitmaps: &mut [(BitmapFile, u64)],
        snap: &BitmapSnapshot,
        epoch: u64,
    ) -> Result<(), String> {
        let Some((file, stored)) = bitmaps.get_mut(snap.link) else {
            return Err("no such replica".into());
        };
        if snap.gen <= *stored {
            return Ok(());
        }
        match file.store(&snap.words, &snap.tag, epoch) {
            Ok(()) => {
                *stored = snap.gen;
                Ok(())
            }
            Err(e) => {
                tracing::error!(volume = %self.config.volume, replica = %self.links[snap.link].addr, "cannot store the dirty bitmap: {e}");
                Err(e.to_string())
            }
        }
    }

    // -----------------------------------------------------------------------------------
    // Stop
    // -----------------------------------------------------------------------------------

    /// Stops replication after the disk drained (and its local copy was flushed): the last
    /// checkpoint empties the activity log if every fault was recorded, so that the next
    /// start reconciles nothing. Returns whether the stop was clean.
    pub fn shutdown(&self) -> bool {
        let mut out = Vec::new();
        {
            let now = self.now();
            self.core().stop(now, &mut out);
        }
        self.execute(out, Ctx::Other, &mut Local::default());
        let deadline = Instant::now() + STOP_TIMEOUT;
        let clean = loop {
            if let Phase::Stopped { clean } = self.core().phase() {
                break clean;
            }
            if Instant::now() >= deadline {
                break false;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        self.stop_threads();
        // Another primary (a re-attach) may take the volume from here on.
        drop(self.lock.lock().unwrap_or_else(|p| p.into_inner()).take());
        if clean {
            tracing::info!(volume = %self.config.volume, "replication stopped cleanly");
        } else {
            tracing::warn!(volume = %self.config.volume, "replication stopped with work outstanding: the next start reconciles the active regions");
        }
        clean
    }

    fn stop_threads(&self) {
        self.stop.store(true, Ordering::SeqCst);
        for l in &self.links {
            let _ = l.inbox.wake.write(1);
        }
        let _ = self.meta.wake.write(1);
        let _ = self.ctl.wake.write(1);
        let _ = self.auth.wake.write(1);
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

/// Whether more bytes can be read from `fd` without blocking.
fn readable_now(fd: i32) -> bool {
    let mut fds = [libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }];
    crate::sys::poll(&mut fds, 0).is_ok_and(|n| n > 0)
}
