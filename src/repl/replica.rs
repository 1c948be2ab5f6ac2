//! The replica server (`ferrodisk replica`): holds replicas of many volumes, one file each,
//! and acknowledges a write only once it is durable.
//!
//! Each authenticated connection is bound to one volume by its first message (`Open`). A
//! reader thread verifies frames and queues them; an applier thread takes everything queued
//! as one batch and submits it to the connection's io_uring at once. Writes are `RWF_DSYNC`
//! (through O_DIRECT when aligned), so each is durable when it completes; a batch with a
//! discard or write-zeroes ends with one `fdatasync`. Acknowledgements are sent only after
//! that. Overlapping writes within a batch are applied in order.
//!
//! Fencing and identity: each volume keeps a sidecar `<volume>.meta` (JSON, replaced with
//! fsync + rename + directory fsync): the highest epoch it has seen, and the identity of its
//! copy, "generation `gen` of volume `uuid`" (gen 0: blank or unknown content), with the
//! inode of `<volume>.img` it was written for. An image that is missing, empty or another
//! file (a new inode) at open voids the identity (gen 0): a wiped copy never passes for the
//! data it held. A sidecar that cannot be parsed fails the open: never guess an epoch.
//! Requests from an older epoch get `Nack(Stale)`. A batch holds the volume's state lock for
//! reading while it writes, and raising the epoch takes it for writing, so once a `Fence`, a
//! `Drop` or a newer `Open` is acknowledged, no write of an older epoch can land.
//!
//! Bounds against hostile peers ([`Limits`]): at most `max_connections` authenticated
//! connections; at most `max_handshakes` connections still in their handshake, a quarter
//! of them from any one address (more from it are closed at once), and when they are all
//! taken a new one evicts the oldest: a flood of idle or trickling peers from elsewhere
//! cannot keep a primary out;
//! each handshake must end within [`wire::HANDSHAKE_TIMEOUT`] in total; and each
//! connection queues at most `conn_buffer` bytes of requests and their replies: beyond that
//! its reader stops reading the socket (back-pressure through TCP) until the applier has
//! answered what it holds.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver as ChanRx};
use std::sync::{Arc, Condvar, Mutex, RwLock, RwLockWriteGuard};

use io_uring::{opcode, types, IoUring};
use serde::{Deserialize, Serialize};

use super::wire::{self, Auth, Code, Key, Msg, Throttle, WireError, MAX_READ};
use crate::engine::uring::restricted_ring;
use crate::repl::authority::check_volume_name;

/// Most queued messages per connection before the reader waits for the applier.
const QUEUE_DEPTH: usize = 1024;
/// Largest checksum chunk, and most checksums, one `Sums` request may ask for.
const MAX_SUM_CHUNK: u32 = 4 << 20;
const MAX_SUMS: u64 = 4096;
/// Most operations per batch.
const MAX_BATCH: usize = 256;
/// How often an `Open` looks the volume up again when a `Drop` retired it meanwhile.
const OPEN_ATTEMPTS: usize = 3;

/// Why a replica refused a request: the code it answers with, and a message.
pub type Refusal = (Code, String);

pub struct ReplicaServer {
    data: PathBuf,
    auth: Auth,
    limits: Limits,
    volumes: Mutex<HashMap<String, Arc<Volume>>>,
    /// Connections in their handshake, oldest first, with their peer's address and a
    /// handle to shut each down.
    handshaking: Mutex<VecDeque<(u64, std::net::IpAddr, TcpStream)>>,
    next_id: AtomicU64,
    /// Authenticated connections open now.
    open: AtomicUsize,
    /// Rate limits for what peers can make the server log.
    evicted_log: Throttle,
    refused_log: Throttle,
}

/// The server's bounds (see the module note).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most authenticated connections at once; more are refused after their handshake.
    pub max_connections: usize,
    /// Most connections in their handshake at once; a new one evicts the oldest.
    pub max_handshakes: usize,
    /// Most bytes of requests (and of the replies they ask for) queued per connection.
    pub conn_buffer: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 64,
            max_handshakes: 16,
            conn_buffer: 64 << 20,
        }
    }
}

/// The bytes a connection has queued (requests and the replies they ask for), bounded:
/// the reader waits while it is full, and the applier gives back what it has answered.
struct Budget {
    /// Bytes in use, and whether the applier has stopped.
    state: Mutex<(usize, bool)>,
    freed: Condvar,
    cap: usize,
}

impl Budget {
    fn new(cap: usize) -> Budget {
        Budget {
            state: Mutex::new((0, false)),
            freed: Condvar::new(),
            cap,
        }
    }

    /// Takes `n` bytes, waiting while they do not fit (one message always fits an empty
    /// budget). Returns false once the applier has stopped.
    fn take(&self, n: usize) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while !st.1 && st.0 > 0 && st.0 + n > self.cap {
            st = self.freed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.0 += n;
        !st.1
    }

    fn give(&self, n: usize) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.0 = st.0.saturating_sub(n);
        self.freed.notify_all();
    }

    fn close(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).1 = true;
        self.freed.notify_all();
    }
}

/// What a request holds in memory until it is answered: its data, or the reply it asks for.
fn cost(m: &Msg) -> usize {
    let bytes = match m {
        Msg::Write { data, .. } => data.len() as u64,
        Msg::Read { len, .. } => (*len).min(MAX_READ),
        Msg::Sums { len, chunk, .. } => (len / u64::from((*chunk).max(1)) + 1).min(MAX_SUMS) * 4,
        _ => 0,
    };
    bytes as usize + 128
}

/// The sidecar `<volume>.meta`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Meta {
    epoch: u64,
    uuid: String,
    gen: u64,
    /// The image the identity was written for: its inode number, its birth time
    /// (nanoseconds; 0 where the file system has none) and its length. File systems reuse
    /// inode numbers, so the number alone does not tell a re-created image.
    ino: u64,
    #[serde(default)]
    birth: u64,
    #[serde(default)]
    generation: u64,
    #[serde(default)]
    len: u64,
}

/// The open image of a volume.
struct Image {
    file: File,
    /// The same file with O_DIRECT, for aligned writes (`None` if the filesystem refuses it).
    direct: Option<File>,
    dio_align: u64,
    /// Which file `file` is: the identity in the sidecar is valid only for it.
    id: crate::sys::FileId,
}

struct Volume {
    name: String,
    /// `None`: the volume has a sidecar but no image (dropped, or wiped), opened by an
    /// observer. A primary's `Open` re-creates it.
    image: Option<Image>,
    /// Changed only under the `state` write lock (a new incarnation of another size).
    size: AtomicU64,
    /// The highest epoch seen, the identity, and the writable session: each primary `Open`
    /// starts a new session, and writes still queued on an older connection are refused.
    state: RwLock<State>,
    meta: PathBuf,
    /// `<volume>.epoch` of older versions, removed once the sidecar is written.
    legacy: PathBuf,
}

/// A volume's fencing and identity state (see [`Volume::state`]).
#[derive(Debug, Clone)]
struct State {
    epoch: u64,
    session: u64,
    uuid: String,
    gen: u64,
    /// The volume was dropped or retired (its image went away): this object serves no more
    /// requests, and a new `Open` finds a fresh one.
    dropped: bool,
}

/// What a batch checks its requests against, taken under the state lock.
#[derive(Debug, Clone, Copy)]
struct Fencing {
    epoch: u64,
    session: u64,
    dropped: bool,
}

impl State {
    fn fencing(&self) -> Fencing {
        Fencing {
            epoch: self.epoch,
            session: self.session,
            dropped: self.dropped,
        }
    }
}

fn dropped_refusal(name: &str) -> Refusal {
    (
        Code::Range,
        format!("volume {name} was dropped or replaced while this connection was open; reconnect"),
    )
}

impl Volume {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    fn image(&self) -> Result<&Image, Refusal> {
        self.image.as_ref().ok_or_else(|| {
            (
                Code::Range,
                format!("volume {} has no image here", self.name),
            )
        })
    }

    fn lock(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes the sidecar for `next` (durably), then makes it the state.
    fn persist(&self, cur: &mut State, next: State) -> Result<(), Refusal> {
        let meta = Meta {
            epoch: next.epoch,
            uuid: next.uuid.clone(),
            gen: next.gen,
            ino: self.image.as_ref().map_or(0, |i| i.id.ino),
            birth: self.image.as_ref().map_or(0, |i| i.id.birth),
            generation: self.image.as_ref().map_or(0, |i| i.id.generation),
            len: self.size(),
        };
        write_meta(&self.meta, &meta).map_err(|e| {
            tracing::error!(volume = %self.name, "cannot persist the volume's identity: {e}");
            (
                Code::Io,
                format!("cannot persist the identity of volume {}: {e}", self.name),
            )
        })?;
        remove_legacy(&self.legacy);
        if next.epoch > cur.epoch {
            tracing::info!(volume = %self.name, epoch = next.epoch, previous = cur.epoch, "epoch raised");
        }
        *cur = next;
        Ok(())
    }

    /// Raises the stored epoch to `epoch` (durably) if it is higher; returns the stored one.
    /// Fails with `Stale` if `epoch` is older.
    fn raise_epoch(&self, epoch: u64) -> Result<u64, Refusal> {
        let mut cur = self.lock();
        if cur.dropped {
            return Err(dropped_refusal(&self.name));
        }
        if epoch < cur.epoch {
            return Err(stale(epoch, cur.epoch));
        }
        if epoch > cur.epoch {
            let next = State {
                epoch,
                ..cur.clone()
            };
            self.persist(&mut cur, next)?;
        }
        Ok(cur.epoch)
    }

    /// A primary's `Open` (`epoch > 0`): applies the identity rules, raises the epoch and
    /// starts a new session. Returns the state after the open.
    fn open_session(&self, epoch: u64, size: u64, uuid: &str) -> Result<State, Refusal> {
        let mut cur = self.lock();
        if cur.dropped {
            return Err(dropped_refusal(&self.name));
        }
        let mut next = State {
            epoch,
            ..cur.clone()
        };
        let resize = if admit_open(&self.name, cur.epoch, &cur.uuid, epoch, uuid)? {
            // A copy with no identity, or the copy of a deleted incarnation: it becomes a
            // blank copy of this one, resized if needed (its content is rebuilt anyway).
            if !cur.uuid.is_empty() {
                tracing::warn!(volume = %self.name, old = %cur.uuid, new = %uuid, epoch, "a new incarnation of the volume replaces this copy");
            }
            next.uuid = uuid.to_string();
            next.gen = 0;
            size != self.size()
        } else if size != self.size() {
            return Err((
                Code::Range,
                format!(
                    "volume {} is {} bytes here, not {size}",
                    self.name,
                    self.size()
                ),
            ));
        } else {
            false
        };
        // Resized before the new identity is written: after a crash in between, the copy
        // still names the old incarnation, and the next Open does all of this again.
        if resize {
            self.resize(size)?;
        }
        if !same_identity(&cur, &next) {
            self.persist(&mut cur, next)?;
        }
        // Writes another process left in the page cache (a primary that ran on this node
        // with this file as its backing, in write-back mode, until it died or was
        // promoted away) are made durable before the new primary compares or reads
        // anything here: a host crash would otherwise take them back after they were
        // compared equal, and the copy would differ with no dirty bit to show it.
        // If that sync fails, some of those writes are not on the disk, and Linux reports
        // the error once: a retry would succeed. So the copy's identity is voided (the next
        // primary compares all of it) and the page cache dropped (that comparison reads
        // what the disk holds).
        let img = self.image()?;
        if let Err(e) = img.file.sync_data() {
            tracing::error!(volume = %self.name, "cannot sync the replica's image ({e}): its identity is voided, the next primary rebuilds it by comparison");
            if let Err(e) = crate::sys::drop_page_cache(&img.file) {
                tracing::warn!(volume = %self.name, "cannot drop the image's page cache: {e}");
            }
            let void = State {
                gen: 0,
                ..cur.clone()
            };
            self.persist(&mut cur, void)?;
            return Err((Code::Io, format!("fdatasync: {e}")));
        }
        cur.session += 1;
        Ok(cur.clone())
    }

    /// Gives the image `size` bytes, allocated (called under the state write lock).
    fn resize(&self, size: u64) -> Result<(), Refusal> {
        let img = self.image()?;
        let io = |e: io::Error| {
            tracing::error!(volume = %self.name, size, "cannot resize the replica: {e}");
            (
                Code::Io,
                format!("cannot resize volume {} to {size} bytes: {e}", self.name),
            )
        };
        img.file.set_len(size).map_err(io)?;
        if size > 0 {
            crate::sys::fallocate(&img.file, 0, size).map_err(io)?;
        }
        img.file.sync_all().map_err(io)?;
        tracing::info!(volume = %self.name, from = self.size(), to = size, "resized the replica");
        self.size.store(size, Ordering::Relaxed);
        Ok(())
    }

    /// `Adopt` on the session `session`: records `gen` durably, for the current image.
    fn adopt(&self, session: Option<u64>, epoch: u64, gen: u64) -> Result<u64, Refusal> {
        let Some(session) = session else {
            return Err((Code::Protocol, "an observer cannot adopt a copy".into()));
        };
        let mut cur = self.lock();
        if cur.dropped {
            return Err(dropped_refusal(&self.name));
        }
        admit(cur.epoch, epoch)?;
        if cur.session != session {
            return Err((
                Code::Protocol,
                "superseded by a newer connection of this volume".into(),
            ));
        }
        let next = State { gen, ..cur.clone() };
        self.persist(&mut cur, next)?;
        tracing::info!(volume = %self.name, uuid = %cur.uuid, gen, "adopted a generation");
        Ok(gen)
    }
}

/// The rules of a primary's `Open` at `epoch` for incarnation `uuid`, against what the
/// volume stores: `Ok(true)` if the copy becomes a blank copy of `uuid` (it had no identity,
/// or it belongs to an older incarnation and `epoch` is newer), `Ok(false)` if it is
/// already that incarnation's, or a `Stale` refusal.
pub fn admit_open(
    name: &str,
    stored_epoch: u64,
    stored_uuid: &str,
    epoch: u64,
    uuid: &str,
) -> Result<bool, Refusal> {
    if epoch < stored_epoch {
        return Err(stale(epoch, stored_epoch));
    }
    if stored_uuid == uuid {
        return Ok(false);
    }
    if !stored_uuid.is_empty() && epoch == stored_epoch {
        return Err((
            Code::Stale,
            format!(
                "volume {name} here is incarnation {stored_uuid} at epoch {epoch}; another incarnation ({uuid}) needs a newer epoch"
            ),
        ));
    }
    Ok(true)
}

fn same_identity(a: &State, b: &State) -> bool {
    a.epoch == b.epoch && a.uuid == b.uuid && a.gen == b.gen
}

fn stale(epoch: u64, stored: u64) -> Refusal {
    (
        Code::Stale,
        format!("epoch {epoch} is older than {stored} (fenced)"),
    )
}

fn write_meta(path: &Path, meta: &Meta) -> io::Result<()> {
    let mut bytes = serde_json::to_vec(meta).map_err(io::Error::other)?;
    bytes.push(b'\n');
    crate::sys::write_atomic(path, &bytes)
}

fn remove_legacy(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => tracing::info!("replaced {} by the identity sidecar", path.display()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!("cannot remove {}: {e}", path.display()),
    }
}

/// Reads the sidecar (or a legacy `.epoch`); `Ok(None)` if there is neither. A file that
/// exists but cannot be read or parsed is an error: the caller fails closed.
fn read_meta(meta: &Path, legacy: &Path) -> Result<Option<Meta>, String> {
    match std::fs::read(meta) {
        Ok(b) => {
            return serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| format!("{} is corrupt ({e})", meta.display()))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot read {}: {e}", meta.display())),
    }
    match std::fs::read_to_string(legacy) {
        Ok(s) => s
            .trim()
            .parse()
            .map(|epoch| {
                Some(Meta {
                    epoch,
                    ..Meta::default()
                })
            })
            .map_err(|_| format!("{} does not hold an epoch", legacy.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", legacy.display())),
    }
}

/// Voids the identity in `meta` (gen 0, for image `id` of `len` bytes) unless the image is
/// provably the one it was written for: not (re)created, the same file (inode number, and a
/// birth time or inode generation the file system records) and the same length. Where the
/// file system records neither, nothing proves it, and the identity is void at every load:
/// the primary then compares the whole copy. Returns whether it did.
fn void_if_not_for(
    name: &str,
    meta: &mut Meta,
    created: bool,
    id: crate::sys::FileId,
    len: u64,
) -> bool {
    let same = !created
        && id.provable()
        && id.ino == meta.ino
        && id.birth == meta.birth
        && id.generation == meta.generation
        && len == meta.len;
    if meta.gen == 0 || same {
        return false;
    }
    if id.provable() {
        tracing::warn!(volume = name, uuid = %meta.uuid, gen = meta.gen, "the replica's image is new, resized, or not the file its identity was written for: identity void");
    } else {
        tracing::warn!(volume = name, uuid = %meta.uuid, gen = meta.gen, "this file system records no birth time or inode generation, so nothing proves the image is the one its identity was written for: identity void (the primary compares the whole copy)");
    }
    meta.gen = 0;
    meta.ino = id.ino;
    meta.birth = id.birth;
    meta.generation = id.generation;
    meta.len = len;
    true
}

/// Which file is at `path`, and its length, if there is one.
fn file_at(path: &Path) -> Option<(crate::sys::FileId, u64)> {
    let f = File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    Some((crate::sys::file_id(&f).ok()?, len))
}

impl ReplicaServer {
    /// A server authenticating peers with a pre-shared key, with the default limits.
    pub fn new(data: &Path, key: Key) -> io::Result<Arc<ReplicaServer>> {
        ReplicaServer::with(data, Auth::Psk(key), Limits::default())
    }

    pub fn with(data: &Path, auth: Auth, limits: Limits) -> io::Result<Arc<ReplicaServer>> {
        std::fs::create_dir_all(data)?;
        Ok(Arc::new(ReplicaServer {
            data: data.to_path_buf(),
            auth,
            limits,
            volumes: Mutex::new(HashMap::new()),
            handshaking: Mutex::new(VecDeque::new()),
            next_id: AtomicU64::new(0),
            open: AtomicUsize::new(0),
            evicted_log: Throttle::new(),
            refused_log: Throttle::new(),
        }))
    }

    /// Registers a connection starting its handshake; evicts the oldest one in its
    /// handshake if there are too many. `None`: its address has too many already.
    fn admit_handshake(&self, stream: &TcpStream, ip: std::net::IpAddr) -> io::Result<Option<u64>> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let handle = stream.try_clone()?;
        let mut h = self.handshaking.lock().unwrap_or_else(|p| p.into_inner());
        let per_address = (self.limits.max_handshakes / 4).max(1);
        if h.iter().filter(|(_, a, _)| *a == ip).count() >= per_address {
            if let Some(n) = self.refused_log.ready() {
                tracing::warn!(%ip, "refused a connection: {per_address} from this address are in their handshake already ({n} refused since the last report)");
            }
            return Ok(None);
        }
        while h.len() >= self.limits.max_handshakes.max(1) {
            let Some((_, _, oldest)) = h.pop_front() else {
                break;
            };
            let _ = oldest.shutdown(std::net::Shutdown::Both);
            if let Some(n) = self.evicted_log.ready() {
                tracing::warn!(
                    "{} connection(s) in their handshake evicted by newer ones (more than {} at once)",
                    n,
                    self.limits.max_handshakes
                );
            }
        }
        h.push_back((id, ip, handle));
        Ok(Some(id))
    }

    fn end_handshake(&self, id: u64) {
        let mut h = self.handshaking.lock().unwrap_or_else(|p| p.into_inner());
        h.retain(|(i, _, _)| *i != id);
    }

    /// Accepts connections forever, one thread each.
    pub fn run(self: &Arc<Self>, listener: TcpListener) -> io::Result<()> {
        tracing::info!(mode = self.auth.mode(), limits = ?self.limits, "accepting connections");
        loop {
            let (stream, peer) = match listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    continue;
                }
            };
            // A primary whose host crashed or was cut off sends no FIN: without this its
            // connection (and slot) would stay open for ever. Set here, before the
            // connection thread's seccomp filter.
            if let Err(e) = crate::sys::tcp_dead_peer_detection(&stream, 10, 5, 3, 30_000) {
                tracing::debug!(%peer, "cannot set keepalive on the connection: {e}");
            }
            let id = match self.admit_handshake(&stream, peer.ip()) {
                Ok(Some(id)) => id,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(%peer, "cannot keep a handle on the connection: {e}");
                    continue;
                }
            };
            let me = Arc::clone(self);
            let spawned = std::thread::Builder::new()
                .name(format!("replica-{peer}"))
                .spawn(move || {
                    crate::seccomp::enter_or_exit(crate::seccomp::Role::Replica);
                    me.connection(stream, peer, id)
                });
            if let Err(e) = spawned {
                self.end_handshake(id);
                tracing::error!("cannot start a connection thread: {e}");
            }
        }
    }

    fn image_path(&self, name: &str) -> PathBuf {
        self.data.join(format!("{name}.img"))
    }

    /// The volume `name`, loaded if needed. `primary` is `(epoch, uuid, size)` of a
    /// primary's `Open`, which creates a missing image of that size if its rules admit it;
    /// for an observer (`None`) the volume must exist. An in-memory volume whose image went
    /// away or was replaced (another inode) is retired and loaded again.
    fn volume(
        &self,
        name: &str,
        primary: Option<(u64, &str, u64)>,
    ) -> Result<Arc<Volume>, Refusal> {
        let size = primary.map_or(0, |p| p.2);
        check_volume_name(name).map_err(|e| (Code::Protocol, e))?;
        let mut vols = self.volumes.lock().unwrap_or_else(|p| p.into_inner());
        let mut prior_epoch = 0;
        let mut retired = None;
        if let Some(v) = vols.get(name) {
            let on_disk = file_at(&self.image_path(name));
            let mut st = v.lock();
            let current = !st.dropped
                && match &v.image {
                    // The same file, still linked, not truncated or extended under us.
                    Some(img) => {
                        on_disk == Some((img.id, v.size())) && !crate::sys::unlinked(&img.file)
                    }
                    None => on_disk.is_none() && size == 0,
                };
            if current {
                return Ok(Arc::clone(v));
            }
            // Retire it: its connections are refused from now on, and the highest epoch it
            // saw is kept (the sidecar may have gone with the image).
            if !st.dropped && v.image.is_some() {
                tracing::warn!(
                    volume = name,
                    "the replica's image was deleted or replaced under it: its identity is void"
                );
            }
            st.dropped = true;
            st.session += 1;
            prior_epoch = st.epoch;
            drop(st);
            retired = vols.remove(name);
        }
        match self.load(name, primary, prior_epoch) {
            Ok(v) => {
                let v = Arc::new(v);
                vols.insert(name.to_string(), Arc::clone(&v));
                Ok(v)
            }
            Err(e) => {
                // Keep what the retired volume knew (its epoch) for the next attempt.
                if let Some(old) = retired {
                    vols.insert(name.to_string(), old);
                }
                Err(e)
            }
        }
    }

    /// Opens (or creates) the image and reads the sidecar, voiding the identity if the
    /// image is not the file it was written for.
    fn load(
        &self,
        name: &str,
        primary: Option<(u64, &str, u64)>,
        prior_epoch: u64,
    ) -> Result<Volume, Refusal> {
        let size = primary.map_or(0, |p| p.2);
        let meta_path = self.data.join(format!("{name}.meta"));
        let legacy = self.data.join(format!("{name}.epoch"));
        let stored: Option<Meta> = read_meta(&meta_path, &legacy).map_err(|e| {
            tracing::error!(volume = name, "cannot open the volume: {e}");
            (
                Code::Io,
                format!("volume {name} cannot be opened: {e}; fix or remove it by hand"),
            )
        })?;
        let stored_epoch = stored.as_ref().map_or(0, |m| m.epoch);
        let path = self.image_path(name);
        let exists = path.exists();
        if !exists && size == 0 && stored.is_none() && prior_epoch == 0 {
            return Err((Code::Range, format!("volume {name} has no replica here")));
        }
        let mut meta = stored.unwrap_or_default();
        meta.epoch = meta.epoch.max(prior_epoch);
        if let Some((epoch, uuid, _)) = primary {
            // Refused before anything is created.
            admit_open(name, meta.epoch, &meta.uuid, epoch, uuid)?;
        }
        let image = if exists || size != 0 {
            Some(self.open_image(name, &path, size)?)
        } else {
            None
        };
        let (id, created, len) = image.as_ref().map_or(
            (crate::sys::FileId::default(), false, 0),
            |(img, created, len)| (img.id, *created, *len),
        );
        let voided = void_if_not_for(name, &mut meta, created, id, len);
        // The epoch may have been carried over from a retired volume.
        if voided || stored_epoch < meta.epoch {
            write_meta(&meta_path, &meta).map_err(|e| {
                tracing::error!(volume = name, "cannot persist the volume's identity: {e}");
                (
                    Code::Io,
                    format!("cannot persist the identity of volume {name}: {e}"),
                )
            })?;
            remove_legacy(&legacy);
        }
        Ok(Volume {
            name: name.to_string(),
            image: image.map(|(img, _, _)| img),
            size: AtomicU64::new(len),
            state: RwLock::new(State {
                epoch: meta.epoch,
                session: 0,
                uuid: meta.uuid,
                gen: meta.gen,
                dropped: false,
            }),
            meta: meta_path,
            legacy,
        })
    }

    /// Opens the image at `path`, creating it with `size` allocated bytes if it is missing
    /// or empty. Returns it, whether it was (re)created, and its length.
    fn open_image(
        &self,
        name: &str,
        path: &Path,
        size: u64,
    ) -> Result<(Image, bool, u64), Refusal> {
        let io = |e: io::Error| {
            tracing::error!(volume = name, "cannot open the replica's image: {e}");
            (Code::Io, format!("{}: {e}", path.display()))
        };
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        let md = file.metadata().map_err(io)?;
        let created = !existed || md.len() == 0;
        if created && size != 0 {
            file.set_len(size).map_err(io)?;
            // Allocate the blocks now: a write into a hole makes fdatasync commit metadata
            // too, which made each group commit several times slower.
            crate::sys::fallocate(&file, 0, size).map_err(io)?;
            file.sync_all().map_err(io)?;
            File::open(&self.data)
                .and_then(|d| d.sync_all())
                .map_err(io)?;
            tracing::info!(volume = name, size, "created an empty replica");
        }
        let direct = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok();
        let dio_align = direct
            .as_ref()
            .and_then(crate::sys::dio_alignment)
            .map_or(4096, u64::from)
            .max(512);
        let len = file.metadata().map_err(io)?.len();
        let id = crate::sys::file_id(&file).map_err(io)?;
        Ok((
            Image {
                file,
                direct,
                dio_align,
                id,
            },
            created,
            len,
        ))
    }

    /// Handles an `Open`: returns the volume, the session this connection writes in
    /// (`None` for an observer), and the reply.
    fn open(
        &self,
        seq: u64,
        epoch: u64,
        size: u64,
        name: &str,
        uuid: &str,
    ) -> Result<(Arc<Volume>, Option<u64>, Msg), Refusal> {
        if epoch > 0 {
            if uuid.is_empty() {
                return Err((
                    Code::Protocol,
                    "a primary's Open must carry the volume's uuid".into(),
                ));
            }
            if !crate::config::valid_name(uuid) {
                return Err((
                    Code::Protocol,
                    format!("uuid `{uuid}`: use 1-64 characters from [A-Za-z0-9._-]"),
                ));
            }
            if size == 0 {
                return Err((
                    Code::Protocol,
                    "a primary's Open must give the volume's size".into(),
                ));
            }
        }
        let primary = (epoch != 0).then_some((epoch, uuid, size));
        for _ in 0..OPEN_ATTEMPTS {
            let v = self.volume(name, primary)?;
            let opened = if epoch == 0 {
                let st = v.state.read().unwrap_or_else(|p| p.into_inner());
                (!st.dropped).then(|| st.clone())
            } else {
                match v.open_session(epoch, size, uuid) {
                    Ok(st) => Some(st),
                    Err(e) if !v.state.read().is_ok_and(|s| s.dropped) => return Err(e),
                    Err(_) => None,
                }
            };
            let Some(st) = opened else {
                continue; // dropped or retired meanwhile: look it up again
            };
            let reply = Msg::Opened {
                seq,
                epoch: st.epoch,
                size: v.size(),
                uuid: st.uuid.clone(),
                gen: st.gen,
            };
            return Ok((Arc::clone(&v), (epoch != 0).then_some(st.session), reply));
        }
        Err((
            Code::Io,
            format!("volume {name} kept being dropped while opening it; retry"),
        ))
    }

    /// `Drop`: raises the epoch durably, voids the identity, deletes the image and forgets
    /// the volume (a later `Open` re-creates it). Older primaries stay fenced by the epoch.
    fn drop_volume(&self, vol: &Arc<Volume>, epoch: u64) -> Result<u64, Refusal> {
        let mut vols = self.volumes.lock().unwrap_or_else(|p| p.into_inner());
        let mut cur = vol.lock();
        if cur.dropped {
            return Err(dropped_refusal(&vol.name));
        }
        if epoch < cur.epoch {
            return Err(stale(epoch, cur.epoch));
        }
        let next = State {
            epoch,
            session: cur.session + 1,
            uuid: String::new(),
            gen: 0,
            dropped: true,
        };
        // The void identity first: a crash before the image is gone leaves a blank copy.
        vol.persist(&mut cur, next)?;
        let path = self.image_path(&vol.name);
        let removed = match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => File::open(&self.data).and_then(|d| d.sync_all()),
        };
        if vols.get(&vol.name).is_some_and(|v| Arc::ptr_eq(v, vol)) {
            vols.remove(&vol.name);
        }
        removed.map_err(|e| {
            tracing::error!(volume = %vol.name, "cannot delete the dropped replica: {e}");
            (Code::Io, format!("{}: {e}", path.display()))
        })?;
        tracing::info!(volume = %vol.name, epoch, "dropped the replica");
        Ok(epoch)
    }

    /// Receives the connection's first message, which must be an `Open`, and answers it:
    /// returns the volume and the session to write in (`None` for an observer), or `None`
    /// if the connection ends there.
    fn bind(
        &self,
        tx: &mut wire::Sender,
        rx: &mut wire::Receiver,
        peer: std::net::SocketAddr,
    ) -> Option<(Arc<Volume>, Option<u64>)> {
        match rx.recv() {
            Ok(Msg::Open {
                seq,
                epoch,
                size,
                volume,
                uuid,
            }) => match self.open(seq, epoch, size, &volume, &uuid) {
                Ok((v, writable, reply)) => {
                    tx.send(&reply).ok()?;
                    tracing::info!(%peer, volume = %v.name, epoch, "connection opened");
                    Some((v, writable))
                }
                Err((code, message)) => {
                    tracing::warn!(%peer, volume = %volume, "open refused: {message}");
                    let _ = tx.send(&Msg::Nack { seq, code, message });
                    None
                }
            },
            Ok(other) => {
                tracing::warn!(%peer, "expected Open, got {:?}", other.seq());
                None
            }
            Err(e) => {
                tracing::warn!(%peer, "connection ended before Open: {e}");
                None
            }
        }
    }

    /// Authenticates a connection (within the handshake deadline) and takes one of the
    /// authenticated connections' places; `None` if it is refused.
    fn authenticate(
        &self,
        stream: TcpStream,
        peer: std::net::SocketAddr,
        id: u64,
    ) -> Option<(wire::Sender, wire::Receiver, OpenSlot<'_>)> {
        let r = self.auth.accept(stream);
        self.end_handshake(id);
        let (tx, rx) = match r {
            Ok(h) => h,
            Err(e) => {
                if let Some(n) = self.refused_log.ready() {
                    let what = match e {
                        WireError::Unauthenticated => "refused an unauthenticated peer".into(),
                        e => format!("handshake failed: {e}"),
                    };
                    tracing::warn!(%peer, "{what} ({n} refused since the last report)");
                }
                return None;
            }
        };
        if self.open.fetch_add(1, Ordering::SeqCst) >= self.limits.max_connections {
            self.open.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(%peer, "refused: {} connections are open already", self.limits.max_connections);
            return None;
        }
        Some((tx, rx, OpenSlot(&self.open)))
    }

    fn connection(self: Arc<Self>, stream: TcpStream, peer: std::net::SocketAddr, id: u64) {
        let Some((mut tx, mut rx, _slot)) = self.authenticate(stream, peer, id) else {
            return;
        };
        let Some((vol, writable)) = self.bind(&mut tx, &mut rx, peer) else {
            return;
        };
        let (qtx, qrx) = sync_channel::<(Msg, usize)>(QUEUE_DEPTH);
        let budget = Arc::new(Budget::new(self.limits.conn_buffer));
        let name = vol.name.clone();
        let server = Arc::clone(&self);
        let held = Arc::clone(&budget);
        let applier = std::thread::Builder::new()
            .name(format!("apply-{name}"))
            .spawn(move || {
                let mut a = match Applier::new(server, vol, tx, writable) {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::error!("cannot create an io_uring for the applier: {e}");
                        held.close();
                        return;
                    }
                };
                a.run(qrx, &held);
                held.close();
            });
        if applier.is_err() {
            return;
        }
        loop {
            match rx.recv() {
                Ok(m) => {
                    // Back-pressure: while the connection holds its budget, stop reading.
                    let n = cost(&m);
                    if !budget.take(n) || qtx.send((m, n)).is_err() {
                        break; // the applier stopped (its peer is gone)
                    }
                }
                Err(e) if e.is_disconnect() => break,
                Err(e) => {
                    tracing::warn!(%peer, volume = %name, "connection dropped: {e}");
                    break;
                }
            }
        }
        drop(qtx);
        if let Ok(a) = applier {
            let _ = a.join();
        }
        tracing::info!(%peer, volume = %name, "connection closed");
    }
}

/// One of the authenticated connections' places, given back when dropped.
struct OpenSlot<'a>(&'a AtomicUsize);

impl Drop for OpenSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The replica's fencing rule for a write or zero request: `stored` is the highest epoch the
/// volume has seen (raised only by `Open` and `Fence`, durably), `epoch` the request's.
/// Older is refused as stale; newer than the connection was opened at is a protocol error
/// (a primary opens at its epoch before writing).
pub fn admit(stored: u64, epoch: u64) -> Result<(), (Code, String)> {
    if epoch < stored {
        return Err((
            Code::Stale,
            format!("epoch {epoch} is older than {stored} (fenced)"),
        ));
    }
    if epoch > stored {
        return Err((
            Code::Protocol,
            format!("write at epoch {epoch} on a volume opened at {stored}"),
        ));
    }
    Ok(())
}

/// One queued operation in the current batch.
struct Op {
    seq: u64,
    offset: u64,
    len: u64,
    /// Keeps the write's buffer alive until its completion is reaped; the data starts at
    /// `start` (aligned for O_DIRECT).
    data: Vec<u8>,
    start: usize,
    result: Result<(), (Code, String)>,
}

struct Applier {
    server: Arc<ReplicaServer>,
    vol: Arc<Volume>,
    tx: wire::Sender,
    ring: IoUring,
    /// The session this connection opened (`None`: an observer: checksums, reads, fencing
    /// and dropping only).
    writable: Option<u64>,
    batch: Vec<Op>,
    replies: Vec<Msg>,
    /// A discard or write-zeroes in the batch: its metadata needs an fdatasync.
    needs_sync: bool,
}

impl Applier {
    fn new(
        server: Arc<ReplicaServer>,
        vol: Arc<Volume>,
        tx: wire::Sender,
        writable: Option<u64>,
    ) -> io::Result<Applier> {
        Ok(Applier {
            server,
            vol,
            tx,
            // Writes and fallocates on the image only (see `restricted_ring`).
            ring: restricted_ring(
                MAX_BATCH as u32,
                2 * MAX_BATCH as u32,
                &[opcode::Write::CODE, opcode::Fallocate::CODE],
                io_uring::squeue::Flags::empty(),
                |_| Ok(()),
            )
            .map_err(io::Error::other)?,
            writable,
            batch: Vec::with_capacity(MAX_BATCH),
            replies: Vec::with_capacity(MAX_BATCH),
            needs_sync: false,
        })
    }

    /// Applies what the reader queues, a batch at a time; gives each batch's bytes back
    /// to `budget` once its replies are sent.
    fn run(&mut self, queue: ChanRx<(Msg, usize)>, budget: &Budget) {
        while let Ok(first) = queue.recv() {
            let vol = Arc::clone(&self.vol);
            let mut state = Some(vol.state.read().unwrap_or_else(|p| p.into_inner()));
            let mut next = Some(first);
            let mut held = 0;
            while let Some((m, n)) = next.take() {
                held += n;
                if matches!(m, Msg::Fence { .. } | Msg::Adopt { .. } | Msg::Drop { .. }) {
                    // Everything before lands first; then the state changes (under the write
                    // lock), and no older write can land after it.
                    self.commit();
                    drop(state.take());
                    let reply = self.exclusive(m);
                    state = Some(vol.state.read().unwrap_or_else(|p| p.into_inner()));
                    self.replies.push(reply);
                } else {
                    let current = state.as_deref().map(State::fencing);
                    self.apply(m, current);
                }
                if self.batch.len() < MAX_BATCH {
                    next = queue.try_recv().ok();
                }
            }
            self.commit();
            drop(state);
            // One send for the batch's replies.
            for r in self.replies.drain(..) {
                if self.tx.queue(&r).is_err() {
                    return;
                }
            }
            if self.tx.flush().is_err() {
                return;
            }
            budget.give(held);
        }
    }

    /// A request that changes the volume's state (taken for writing, with no batch open).
    fn exclusive(&mut self, m: Msg) -> Msg {
        let seq = m.seq();
        let r = match m {
            Msg::Fence { epoch, .. } => self.vol.raise_epoch(epoch),
            Msg::Adopt { epoch, gen, .. } => self.vol.adopt(self.writable, epoch, gen),
            Msg::Drop { epoch, .. } => self.server.drop_volume(&self.vol, epoch),
            _ => Err((Code::Protocol, "unexpected message".into())),
        };
        match r {
            Ok(value) => Msg::Ack { seq, value },
            Err((code, message)) => Msg::Nack { seq, code, message },
        }
    }

    fn check(
        &self,
        epoch: u64,
        current: Option<Fencing>,
        offset: u64,
        len: u64,
    ) -> Result<(), (Code, String)> {
        let Some(session) = self.writable else {
            return Err((
                Code::Protocol,
                "connection opened as an observer (epoch 0): it cannot write".into(),
            ));
        };
        let current = current.unwrap_or(Fencing {
            epoch: u64::MAX,
            session: u64::MAX,
            dropped: true,
        });
        // A drop raised the epoch: an older writer learns that it is fenced.
        admit(current.epoch, epoch)?;
        if current.dropped {
            return Err(dropped_refusal(&self.vol.name));
        }
        // A newer connection of this volume took over (the primary reconnected and may be
        // resyncing): what is still queued here must not land on top of its copies (found
        // by the simulation, tests/replication_sim.rs).
        if current.session != session {
            return Err((
                Code::Protocol,
                "superseded by a newer connection of this volume".into(),
            ));
        }
        self.vol.image()?;
        let size = self.vol.size();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err((
                Code::Range,
                format!("{offset}+{len} is beyond the volume ({size} bytes)"),
            ));
        }
        Ok(())
    }

    fn overlaps(&self, offset: u64, len: u64) -> bool {
        self.batch
            .iter()
            .any(|o| o.offset < offset + len && offset < o.offset + o.len)
    }

    fn apply(&mut self, m: Msg, current: Option<Fencing>) {
        match m {
            Msg::Write {
                seq,
                epoch,
                offset,
                crc,
                data,
            } => self.write(seq, epoch, offset, crc, data, current),
            Msg::Zero {
                seq,
                epoch,
                offset,
                len,
                unmap,
            } => self.zero(seq, epoch, offset, len, unmap, current),
            Msg::Sums {
                seq,
                offset,
                len,
                chunk,
            } => {
                self.commit();
                let reply = self.sums(seq, offset, len, chunk, current);
                self.replies.push(reply);
            }
            Msg::Read { seq, offset, len } => {
                self.commit();
                let reply = self.read(seq, offset, len, current);
                self.replies.push(reply);
            }
            other => self.replies.push(Msg::Nack {
                seq: other.seq(),
                code: Code::Protocol,
                message: "unexpected message".into(),
            }),
        }
    }

    fn write(
        &mut self,
        seq: u64,
        epoch: u64,
        offset: u64,
        crc: u32,
        data: Vec<u8>,
        current: Option<Fencing>,
    ) {
        let len = data.len() as u64;
        let vol = Arc::clone(&self.vol);
        let img = match self
            .check(epoch, current, offset, len)
            .and_then(|()| vol.image())
        {
            Ok(img) => img,
            Err((code, message)) => return self.replies.push(Msg::Nack { seq, code, message }),
        };
        if crc32c::crc32c(&data) != crc {
            tracing::error!(volume = %self.vol.name, offset, len, "write failed its checksum: refused");
            self.replies.push(Msg::Nack {
                seq,
                code: Code::Checksum,
                message: format!("crc32c mismatch at {offset}+{len}"),
            });
            return;
        }
        if self.overlaps(offset, len) {
            self.commit();
        }
        // Durable at completion: RWF_DSYNC, through O_DIRECT when aligned (no page
        // cache, and the writes of a batch reach the device in parallel).
        let a = img.dio_align;
        let (fd, buf, start) = match &img.direct {
            Some(d) if offset % a == 0 && len % a == 0 => {
                let mut buf = vec![0u8; data.len() + a as usize];
                let start = buf.as_ptr().align_offset(a as usize);
                buf[start..start + data.len()].copy_from_slice(&data);
                (d.as_raw_fd(), buf, start)
            }
            _ => (img.file.as_raw_fd(), data, 0),
        };
        let sqe = opcode::Write::new(types::Fd(fd), buf[start..].as_ptr(), len as u32)
            .offset(offset)
            .rw_flags(libc::RWF_DSYNC)
            .build()
            .user_data(self.batch.len() as u64);
        self.push(sqe, seq, offset, len, buf, start);
    }

    fn zero(
        &mut self,
        seq: u64,
        epoch: u64,
        offset: u64,
        len: u64,
        unmap: bool,
        current: Option<Fencing>,
    ) {
        let vol = Arc::clone(&self.vol);
        let img = match self
            .check(epoch, current, offset, len)
            .and_then(|()| vol.image())
        {
            Ok(img) => img,
            Err((code, message)) => return self.replies.push(Msg::Nack { seq, code, message }),
        };
        if self.overlaps(offset, len) {
            self.commit();
        }
        let mode = if unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        let sqe = opcode::Fallocate::new(types::Fd(img.file.as_raw_fd()), len)
            .offset(offset)
            .mode(mode)
            .build()
            .user_data(self.batch.len() as u64);
        self.needs_sync = true;
        self.push(sqe, seq, offset, len, Vec::new(), 0);
    }

    fn push(
        &mut self,
        sqe: io_uring::squeue::Entry,
        seq: u64,
        offset: u64,
        len: u64,
        data: Vec<u8>,
        start: usize,
    ) {
        // The batch never exceeds the ring (MAX_BATCH entries): commit first when full.
        if self.batch.len() >= MAX_BATCH {
            self.commit();
        }
        self.batch.push(Op {
            seq,
            offset,
            len,
            data,
            start,
            result: Ok(()),
        });
        // SAFETY: the SQE points at `data`, now owned by the batch entry; entries are neither
        // dropped nor moved (their heap buffers stay put) until `commit` has reaped every CQE.
        // The file descriptor is owned by `self.vol`, which outlives the applier.
        let pushed = unsafe { self.ring.submission().push(&sqe) };
        if pushed.is_err() {
            // Cannot happen (the SQ holds MAX_BATCH); fail the entry rather than lose it.
            if let Some(op) = self.batch.last_mut() {
                op.result = Err((Code::Io, "submission queue full".into()));
            }
        }
    }

    /// Submits the batch, waits for it, makes it durable, and queues the replies.
    fn commit(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let vol = Arc::clone(&self.vol);
        let Ok(img) = vol.image() else {
            // Cannot happen: `check` admits nothing to a volume without an image.
            for op in &mut self.batch {
                op.result = Err((Code::Io, "the volume has no image".into()));
            }
            return self.reply_batch();
        };
        let n = self.batch.len();
        let mut reaped = 0;
        while reaped < n {
            if let Err(e) = self.ring.submit_and_wait(1) {
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                for op in &mut self.batch {
                    op.result = Err((Code::Io, format!("io_uring: {e}")));
                }
                // The kernel may still own buffers: wait for them before dropping the batch.
                let _ = self.ring.submit_and_wait(n - reaped);
                break;
            }
            let cqes: Vec<(u64, i32)> = self
                .ring
                .completion()
                .map(|c| (c.user_data(), c.result()))
                .collect();
            for (ud, res) in cqes {
                reaped += 1;
                let Some(op) = self.batch.get_mut(ud as usize) else {
                    continue;
                };
                if res < 0 {
                    op.result = Err((Code::Io, io::Error::from_raw_os_error(-res).to_string()));
                } else if !op.data.is_empty() && (res as u64) < op.len {
                    // A short write: finish it synchronously, then make it durable.
                    let done = op.start + res as usize;
                    let end = op.start + op.len as usize;
                    let r = img
                        .file
                        .write_all_at(&op.data[done..end], op.offset + res as u64)
                        .and_then(|()| img.file.sync_data());
                    if let Err(e) = r {
                        op.result = Err((Code::Io, e.to_string()));
                    }
                }
            }
        }
        // Writes are durable already (RWF_DSYNC); discards and write-zeroes changed
        // allocation, which one fdatasync for the batch makes durable.
        let synced = if std::mem::take(&mut self.needs_sync) {
            img.file.sync_data()
        } else {
            Ok(())
        };
        if let Err(e) = synced {
            for op in &mut self.batch {
                op.result = Err((Code::Io, format!("fdatasync: {e}")));
            }
        }
        // A write that failed may have taken, in its RWF_DSYNC sync, the writeback error of
        // another write of the batch, which then completed as if durable (Linux reports such
        // an error once per open file). Fail the whole batch (the primary resyncs each of
        // its ranges), and drop the image's page cache so that the resync's comparison
        // reads what the disk holds, not pages it lacks.
        if let Some(why) = self.batch.iter().find_map(|op| op.result.clone().err()) {
            for op in &mut self.batch {
                if op.result.is_ok() {
                    op.result = Err((
                        Code::Io,
                        format!("another write of its batch failed: {}", why.1),
                    ));
                }
            }
            if let Err(e) = crate::sys::drop_page_cache(&img.file) {
                tracing::warn!(volume = %vol.name, "cannot drop the image's page cache: {e}");
            }
        }
        self.reply_batch();
    }

    /// Queues the replies of the batch's operations and empties it.
    fn reply_batch(&mut self) {
        for op in self.batch.drain(..) {
            self.replies.push(match op.result {
                Ok(()) => Msg::Ack {
                    seq: op.seq,
                    value: 0,
                },
                Err((code, message)) => {
                    tracing::error!(volume = %self.vol.name, offset = op.offset, len = op.len, "replica disk error: {message}");
                    Msg::Nack { seq: op.seq, code, message }
                }
            });
        }
    }

    /// The image an observer request reads from, unless the volume was dropped.
    fn readable(&self, current: Option<Fencing>) -> Result<&Image, Refusal> {
        if current.is_none_or(|c| c.dropped) {
            return Err(dropped_refusal(&self.vol.name));
        }
        self.vol.image()
    }

    fn sums(&self, seq: u64, offset: u64, len: u64, chunk: u32, current: Option<Fencing>) -> Msg {
        let img = match self.readable(current) {
            Ok(img) => img,
            Err((code, message)) => return Msg::Nack { seq, code, message },
        };
        // Bounded work and memory per request, whatever the peer asks for.
        if chunk == 0
            || chunk > MAX_SUM_CHUNK
            || offset.checked_add(len).is_none_or(|e| e > self.vol.size())
            || len.div_ceil(u64::from(chunk)) > MAX_SUMS
        {
            return Msg::Nack {
                seq,
                code: Code::Range,
                message: "bad checksum range".into(),
            };
        }
        let mut crcs = Vec::new();
        let mut buf = vec![0u8; chunk as usize];
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(u64::from(chunk)) as usize;
            if let Err(e) = img.file.read_exact_at(&mut buf[..n], at) {
                return Msg::Nack {
                    seq,
                    code: Code::Io,
                    message: format!("read at {at}: {e}"),
                };
            }
            crcs.push(crc32c::crc32c(&buf[..n]));
            at += n as u64;
        }
        Msg::SumsReply { seq, crcs }
    }

    /// `Read`: at most [`MAX_READ`] bytes, inside the volume.
    fn read(&self, seq: u64, offset: u64, len: u64, current: Option<Fencing>) -> Msg {
        let img = match self.readable(current) {
            Ok(img) => img,
            Err((code, message)) => return Msg::Nack { seq, code, message },
        };
        let size = self.vol.size();
        if len > MAX_READ || offset.checked_add(len).is_none_or(|e| e > size) {
            return Msg::Nack {
                seq,
                code: Code::Range,
                message: format!(
                    "cannot read {offset}+{len}: the volume has {size} bytes, and a read takes at most {MAX_READ}"
                ),
            };
        }
        let mut data = vec![0u8; len as usize];
        match img.file.read_exact_at(&mut data, offset) {
            Ok(()) => Msg::Data { seq, data },
            Err(e) => {
                tracing::error!(volume = %self.vol.name, offset, len, "replica read failed: {e}");
                Msg::Nack {
                    seq,
                    code: Code::Io,
                    message: format!("read at {offset}: {e}"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Duration;

    fn key() -> Key {
        Key::new(b"replica-unit-test-key".to_vec()).unwrap()
    }

    /// A replica server on a free loopback port, serving from `dir`. A second one on the
    /// same directory is a restart (the old one is simply no longer used).
    fn serve(dir: &Path) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let srv = ReplicaServer::new(dir, key()).unwrap();
        std::thread::spawn(move || srv.run(listener));
        addr
    }

    /// A replica server on a free loopback port, serving from a temporary directory.
    fn server() -> (tempfile::TempDir, std::net::SocketAddr) {
        let dir = tempfile::tempdir().unwrap();
        let addr = serve(dir.path());
        (dir, addr)
    }

    type Conn = (wire::Sender, wire::Receiver);

    /// Opens volume `v` at `epoch` as incarnation `uuid`.
    fn open_as(addr: std::net::SocketAddr, epoch: u64, size: u64, uuid: &str) -> (Conn, Msg) {
        let (mut tx, mut rx) = wire::client(TcpStream::connect(addr).unwrap(), &key()).unwrap();
        rx.set_timeout(Some(Duration::from_secs(10))).unwrap();
        tx.send(&Msg::Open {
            seq: 0,
            epoch,
            size,
            volume: "v".into(),
            uuid: uuid.into(),
        })
        .unwrap();
        let reply = rx.recv().unwrap();
        ((tx, rx), reply)
    }

    /// Opens volume `v` at `epoch` as incarnation "u1" (an observer with epoch 0).
    fn open(
        addr: std::net::SocketAddr,
        epoch: u64,
        size: u64,
    ) -> (wire::Sender, wire::Receiver, Msg) {
        let ((tx, rx), reply) = open_as(addr, epoch, size, if epoch == 0 { "" } else { "u1" });
        (tx, rx, reply)
    }

    fn ask(c: &mut Conn, m: &Msg) -> Msg {
        c.0.send(m).unwrap();
        c.1.recv().unwrap()
    }

    /// The identity `(epoch, uuid, gen)` an `Opened` reports.
    fn ident(m: &Msg) -> (u64, &str, u64) {
        match m {
            Msg::Opened {
                epoch, uuid, gen, ..
            } => (*epoch, uuid.as_str(), *gen),
            m => panic!("expected Opened, got {m:?}"),
        }
    }

    fn sidecar(dir: &Path) -> Meta {
        serde_json::from_slice(&std::fs::read(dir.join("v.meta")).unwrap()).unwrap()
    }

    fn id(path: &Path) -> crate::sys::FileId {
        crate::sys::file_id(&File::open(path).unwrap()).unwrap()
    }

    const MIB: u64 = 1 << 20;

    fn write(
        tx: &mut wire::Sender,
        rx: &mut wire::Receiver,
        seq: u64,
        epoch: u64,
        offset: u64,
        data: &[u8],
        crc: u32,
    ) -> Msg {
        tx.send(&Msg::Write {
            seq,
            epoch,
            offset,
            crc,
            data: data.to_vec(),
        })
        .unwrap();
        rx.recv().unwrap()
    }

    fn code(m: &Msg) -> Option<Code> {
        match m {
            Msg::Nack { code, .. } => Some(*code),
            _ => None,
        }
    }

    #[test]
    fn bad_requests_get_clear_refusals_and_the_volume_keeps_working() {
        let (dir, addr) = server();
        let (mut tx, mut rx, reply) = open(addr, 3, 1 << 20);
        assert!(matches!(reply, Msg::Opened { epoch: 3, .. }), "{reply:?}");
        let data = vec![0xabu8; 4096];
        let crc = crc32c::crc32c(&data);
        assert_eq!(
            write(&mut tx, &mut rx, 1, 3, 0, &data, crc),
            Msg::Ack { seq: 1, value: 0 }
        );
        assert_eq!(
            code(&write(&mut tx, &mut rx, 2, 3, 4096, &data, crc ^ 1)),
            Some(Code::Checksum)
        );
        assert_eq!(
            code(&write(&mut tx, &mut rx, 3, 3, (1 << 20) - 512, &data, crc)),
            Some(Code::Range)
        );
        assert_eq!(
            code(&write(&mut tx, &mut rx, 4, 3, u64::MAX - 100, &data, crc)),
            Some(Code::Range)
        );
        assert_eq!(
            code(&write(&mut tx, &mut rx, 5, 2, 0, &data, crc)),
            Some(Code::Stale)
        );
        assert_eq!(
            code(&write(&mut tx, &mut rx, 6, 4, 0, &data, crc)),
            Some(Code::Protocol)
        );
        for (len, chunk) in [(1 << 20, u32::MAX), (1 << 20, 0), (1 << 20, 1)] {
            tx.send(&Msg::Sums {
                seq: 7,
                offset: 0,
                len,
                chunk,
            })
            .unwrap();
            assert_eq!(
                code(&rx.recv().unwrap()),
                Some(Code::Range),
                "chunk {chunk}"
            );
        }
        tx.send(&Msg::Sums {
            seq: 8,
            offset: 0,
            len: 8192,
            chunk: 4096,
        })
        .unwrap();
        let zero = crc32c::crc32c(&[0u8; 4096]);
        assert_eq!(
            rx.recv().unwrap(),
            Msg::SumsReply {
                seq: 8,
                crcs: vec![crc, zero]
            }
        );
        // The data landed, durably, where it was sent.
        let on_disk = std::fs::read(dir.path().join("v.img")).unwrap();
        assert_eq!(&on_disk[..4096], &data[..]);
        assert_eq!(on_disk.len(), 1 << 20);
    }

    #[test]
    fn fencing_is_durable_and_refuses_older_epochs() {
        let (dir, addr) = server();
        let (mut tx, mut rx, _) = open(addr, 5, 1 << 20);
        let (mut ftx, mut frx, reply) = open(addr, 0, 0);
        assert!(
            matches!(reply, Msg::Opened { epoch: 5, .. }),
            "epoch 0 observes without raising: {reply:?}"
        );
        ftx.send(&Msg::Fence { seq: 1, epoch: 9 }).unwrap();
        assert_eq!(frx.recv().unwrap(), Msg::Ack { seq: 1, value: 9 });
        let data = [1u8; 512];
        let m = write(&mut tx, &mut rx, 1, 5, 0, &data, crc32c::crc32c(&data));
        assert_eq!(code(&m), Some(Code::Stale), "{m:?}");
        assert_eq!(sidecar(dir.path()).epoch, 9);
        assert!(!dir.path().join("v.epoch").exists());
        let (_, _, reply) = open(addr, 8, 1 << 20);
        assert_eq!(code(&reply), Some(Code::Stale));
        let (_, _, reply) = open(addr, 10, 1 << 20);
        assert!(matches!(reply, Msg::Opened { epoch: 10, .. }), "{reply:?}");
        // Wrong size, unknown volume for an observer.
        let (_, _, reply) = open(addr, 10, 2 << 20);
        assert_eq!(code(&reply), Some(Code::Range));
    }

    #[test]
    fn a_newer_connection_supersedes_writes_queued_on_an_older_one() {
        let (dir, addr) = server();
        let (mut old_tx, mut old_rx, _) = open(addr, 4, 1 << 20);
        let data = [5u8; 4096];
        let crc = crc32c::crc32c(&data);
        assert_eq!(
            write(&mut old_tx, &mut old_rx, 1, 4, 0, &data, crc),
            Msg::Ack { seq: 1, value: 0 }
        );
        // The primary reconnects (same epoch): the old connection's writes no longer land.
        let (mut tx, mut rx, reply) = open(addr, 4, 1 << 20);
        assert!(matches!(reply, Msg::Opened { epoch: 4, .. }), "{reply:?}");
        let stale = [6u8; 4096];
        let m = write(
            &mut old_tx,
            &mut old_rx,
            2,
            4,
            4096,
            &stale,
            crc32c::crc32c(&stale),
        );
        assert_eq!(code(&m), Some(Code::Protocol), "{m:?}");
        assert_eq!(
            write(&mut tx, &mut rx, 1, 4, 8192, &data, crc),
            Msg::Ack { seq: 1, value: 0 }
        );
        let on_disk = std::fs::read(dir.path().join("v.img")).unwrap();
        assert_eq!(
            &on_disk[4096..8192],
            &[0u8; 4096][..],
            "the superseded write did not land"
        );
    }

    #[test]
    fn garbage_after_the_handshake_drops_only_that_connection() {
        let (_dir, addr) = server();
        let (mut tx, _rx, _) = open(addr, 1, 1 << 20);
        let mut raw = tx.try_clone_stream().unwrap();
        raw.write_all(&[0xff; 64]).unwrap();
        let _ = tx.send(&Msg::Fence { seq: 1, epoch: 1 });
        // The server is still there for others.
        let (_, _, reply) = open(addr, 1, 1 << 20);
        assert!(matches!(reply, Msg::Opened { epoch: 1, .. }), "{reply:?}");
    }

    fn adopt(c: &mut Conn, seq: u64, epoch: u64, gen: u64) -> Msg {
        ask(c, &Msg::Adopt { seq, epoch, gen })
    }

    #[test]
    fn the_identity_survives_a_restart_and_adopt_is_ordered_with_writes() {
        let (dir, addr) = server();
        let (mut c, reply) = open_as(addr, 2, MIB, "u1");
        assert_eq!(ident(&reply), (2, "u1", 0), "a new copy has no generation");
        // A write, the adoption and another write in one batch: applied in order.
        let data = [3u8; 4096];
        let crc = crc32c::crc32c(&data);
        c.0.queue_write(1, 2, 0, crc, &data).unwrap();
        c.0.queue(&Msg::Adopt {
            seq: 2,
            epoch: 2,
            gen: 7,
        })
        .unwrap();
        c.0.queue_write(3, 2, 4096, crc, &data).unwrap();
        c.0.flush().unwrap();
        let replies: Vec<Msg> = (0..3).map(|_| c.1.recv().unwrap()).collect();
        assert_eq!(
            replies,
            vec![
                Msg::Ack { seq: 1, value: 0 },
                Msg::Ack { seq: 2, value: 7 },
                Msg::Ack { seq: 3, value: 0 },
            ]
        );
        let img = dir.path().join("v.img");
        assert_eq!(
            sidecar(dir.path()),
            Meta {
                epoch: 2,
                uuid: "u1".into(),
                gen: 7,
                ino: id(&img).ino,
                birth: id(&img).birth,
                generation: id(&img).generation,
                len: MIB,
            }
        );
        let (_, reply) = open_as(addr, 0, 0, "");
        assert_eq!(ident(&reply), (2, "u1", 7));
        // Restart: the same identity, for an observer and for the primary's next epoch.
        let addr = serve(dir.path());
        let (_, reply) = open_as(addr, 0, 0, "");
        assert_eq!(ident(&reply), (2, "u1", 7));
        assert!(matches!(reply, Msg::Opened { size: MIB, .. }), "{reply:?}");
        let (_, reply) = open_as(addr, 3, MIB, "u1");
        assert_eq!(ident(&reply), (3, "u1", 7));
        assert_eq!(&std::fs::read(&img).unwrap()[..8192], &[3u8; 8192][..]);
    }

    /// Adopts generation 7 of "u1" at epoch 2 on a fresh server in `dir`.
    fn adopted(dir: &Path) -> std::net::SocketAddr {
        let addr = serve(dir);
        let (mut c, _) = open_as(addr, 2, MIB, "u1");
        assert_eq!(adopt(&mut c, 1, 2, 7), Msg::Ack { seq: 1, value: 7 });
        addr
    }

    #[test]
    fn a_wiped_image_voids_the_identity() {
        // Wiped while the server is down.
        let dir = tempfile::tempdir().unwrap();
        adopted(dir.path());
        std::fs::remove_file(dir.path().join("v.img")).unwrap();
        let addr = serve(dir.path());
        let (_, reply) = open_as(addr, 0, 0, "");
        assert_eq!(ident(&reply), (2, "u1", 0), "void, epoch and uuid kept");
        assert!(matches!(reply, Msg::Opened { size: 0, .. }), "{reply:?}");
        assert_eq!(sidecar(dir.path()).gen, 0, "durably");
        let (_, reply) = open_as(addr, 3, MIB, "u1");
        assert_eq!(ident(&reply), (3, "u1", 0));
        assert_eq!(
            std::fs::read(dir.path().join("v.img")).unwrap(),
            vec![0u8; MIB as usize],
            "re-created empty"
        );
        // Wiped while it runs: the next open notices, and the old connection is refused.
        let dir = tempfile::tempdir().unwrap();
        let addr = serve(dir.path());
        let (mut c, _) = open_as(addr, 2, MIB, "u1");
        assert_eq!(adopt(&mut c, 1, 2, 7), Msg::Ack { seq: 1, value: 7 });
        std::fs::remove_file(dir.path().join("v.img")).unwrap();
        let (_, reply) = open_as(addr, 2, MIB, "u1");
        assert_eq!(ident(&reply), (2, "u1", 0));
        let data = [1u8; 512];
        let m = write(&mut c.0, &mut c.1, 2, 2, 0, &data, crc32c::crc32c(&data));
        assert_eq!(code(&m), Some(Code::Range), "{m:?}");
        // A data directory wiped whole while it runs keeps the epoch it had seen.
        std::fs::remove_file(dir.path().join("v.img")).unwrap();
        std::fs::remove_file(dir.path().join("v.meta")).unwrap();
        let (_, reply) = open_as(addr, 0, 0, "");
        assert_eq!(ident(&reply), (2, "", 0));
        let (_, reply) = open_as(addr, 1, MIB, "u1");
        assert_eq!(code(&reply), Some(Code::Stale));
        assert!(
            !dir.path().join("v.img").exists(),
            "a refused open creates nothing"
        );
    }

    #[test]
    fn a_recreated_or_emptied_image_voids_the_identity() {
        let dir = tempfile::tempdir().unwrap();
        adopted(dir.path());
        // Restored by copy: the same bytes, another inode.
        let img = dir.path().join("v.img");
        let copy = dir.path().join("copy");
        std::fs::copy(&img, &copy).unwrap();
        std::fs::rename(&copy, &img).unwrap();
        let addr = serve(dir.path());
        let (_, reply) = open_as(addr, 3, MIB, "u1");
        assert_eq!(ident(&reply), (3, "u1", 0));
        assert_eq!(sidecar(dir.path()).ino, id(&img).ino);
        // Emptied in place (same inode).
        let dir = tempfile::tempdir().unwrap();
        adopted(dir.path());
        let img = dir.path().join("v.img");
        OpenOptions::new()
            .write(true)
            .open(&img)
            .unwrap()
            .set_len(0)
            .unwrap();
        let addr = serve(dir.path());
        let (_, reply) = open_as(addr, 3, MIB, "u1");
        assert_eq!(ident(&reply), (3, "u1", 0));
        assert_eq!(std::fs::metadata(&img).unwrap().len(), MIB);
    }

    #[test]
    fn an_image_recreated_blank_with_a_reused_inode_number_voids_the_identity() {
        // ext4 reuses a freed inode number at once: the number alone would match.
        let dir = tempfile::tempdir().unwrap();
        adopted(dir.path());
        let img = dir.path().join("v.img");
        let before = id(&img);
        let mut reused = false;
        for _ in 0..20 {
            std::fs::remove_file(&img).unwrap();
            File::create(&img).unwrap().set_len(MIB).unwrap();
            if id(&img).ino == before.ino {
                reused = true;
                break;
            }
        }
        let addr = serve(dir.path());
        let (_, reply) = open_as(addr, 3, MIB, "u1");
        assert_eq!(ident(&reply), (3, "u1", 0), "inode number reused: {reused}");
    }

    #[test]
    fn an_image_truncated_under_a_running_replica_voids_the_identity() {
        let dir = tempfile::tempdir().unwrap();
        let addr = serve(dir.path());
        let (mut c, _) = open_as(addr, 2, MIB, "u1");
        assert_eq!(adopt(&mut c, 1, 2, 7), Msg::Ack { seq: 1, value: 7 });
        let img = dir.path().join("v.img");
        OpenOptions::new()
            .write(true)
            .open(&img)
            .unwrap()
            .set_len(0)
            .unwrap();
        let (_, reply) = open_as(addr, 3, MIB, "u1");
        assert_eq!(ident(&reply), (3, "u1", 0));
    }

    #[test]
    fn a_new_incarnation_at_a_higher_epoch_replaces_the_uuid_and_resizes() {
        let dir = tempfile::tempdir().unwrap();
        let addr = serve(dir.path());
        let (mut old, _) = open_as(addr, 2, MIB, "u1");
        assert_eq!(adopt(&mut old, 1, 2, 7), Msg::Ack { seq: 1, value: 7 });
        let (_, reply) = open_as(addr, 3, 2 * MIB, "u2");
        assert_eq!(ident(&reply), (3, "u2", 0));
        assert!(matches!(reply, Msg::Opened { size, .. } if size == 2 * MIB));
        let img = dir.path().join("v.img");
        assert_eq!(std::fs::metadata(&img).unwrap().len(), 2 * MIB);
        let sc = sidecar(dir.path());
        assert_eq!((sc.epoch, sc.uuid.as_str(), sc.gen), (3, "u2", 0));
        // The old incarnation's primary is fenced.
        let data = [1u8; 512];
        let m = write(
            &mut old.0,
            &mut old.1,
            2,
            2,
            0,
            &data,
            crc32c::crc32c(&data),
        );
        assert_eq!(code(&m), Some(Code::Stale), "{m:?}");
        // Same incarnation, another size: refused as before.
        let (_, reply) = open_as(addr, 4, MIB, "u2");
        assert_eq!(code(&reply), Some(Code::Range));
        // It survives a restart, and shrinking works too.
        let addr = serve(dir.path());
        let (_, reply) = open_as(addr, 5, MIB / 2, "u3");
        assert_eq!(ident(&reply), (5, "u3", 0));
        assert_eq!(std::fs::metadata(&img).unwrap().len(), MIB / 2);
    }

    #[test]
    fn another_uuid_at_the_same_epoch_is_stale_and_a_primary_must_name_one() {
        let (_dir, addr) = server();
        let (_, reply) = open_as(addr, 2, MIB, "u1");
        assert_eq!(ident(&reply), (2, "u1", 0));
        let (_, reply) = open_as(addr, 2, MIB, "u2");
        assert_eq!(code(&reply), Some(Code::Stale), "{reply:?}");
        let (_, reply) = open_as(addr, 1, MIB, "u1");
        assert_eq!(code(&reply), Some(Code::Stale));
        for (uuid, size) in [("", MIB), ("a b", MIB), ("u1", 0)] {
            let (_, reply) = open_as(addr, 3, size, uuid);
            assert_eq!(code(&reply), Some(Code::Protocol), "{uuid:?} {size}");
        }
        let (_, reply) = open_as(addr, 0, 0, "");
        assert_eq!(ident(&reply), (2, "u1", 0), "nothing changed");
    }

    #[test]
    fn a_copy_without_identity_takes_the_first_uuid() {
        // A replica written by an older Ferrodisk: an image and `<volume>.epoch`.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("v.epoch"), "5\n").unwrap();
        std::fs::write(dir.path().join("v.img"), vec![9u8; MIB as usize]).unwrap();
        let addr = serve(dir.path());
        let (_, reply) = open_as(addr, 0, 0, "");
        assert_eq!(ident(&reply), (5, "", 0));
        let (_, reply) = open_as(addr, 4, MIB, "u1");
        assert_eq!(code(&reply), Some(Code::Stale), "the legacy epoch fences");
        let (_, reply) = open_as(addr, 5, MIB, "u1");
        assert_eq!(ident(&reply), (5, "u1", 0));
        assert_eq!(sidecar(dir.path()).uuid, "u1");
        assert!(
            !dir.path().join("v.epoch").exists(),
            "replaced by the sidecar"
        );
    }

    #[test]
    fn adopt_is_refused_on_a_stale_session_or_an_observer() {
        let (dir, addr) = server();
        let (mut a, _) = open_as(addr, 2, MIB, "u1");
        let (mut b, _) = open_as(addr, 2, MIB, "u1");
        assert_eq!(
            code(&adopt(&mut a, 1, 2, 5)),
            Some(Code::Protocol),
            "superseded"
        );
        assert_eq!(
            code(&adopt(&mut b, 1, 3, 5)),
            Some(Code::Protocol),
            "newer epoch"
        );
        let (mut o, _) = open_as(addr, 0, 0, "");
        assert_eq!(
            code(&adopt(&mut o, 1, 0, 5)),
            Some(Code::Protocol),
            "observer"
        );
        assert_eq!(
            ask(&mut o, &Msg::Fence { seq: 2, epoch: 3 }),
            Msg::Ack { seq: 2, value: 3 }
        );
        assert_eq!(code(&adopt(&mut b, 2, 2, 5)), Some(Code::Stale), "fenced");
        assert_eq!(sidecar(dir.path()).gen, 0);
        let (_, reply) = open_as(addr, 0, 0, "");
        assert_eq!(ident(&reply), (3, "u1", 0));
    }

    #[test]
    fn drop_fences_older_epochs_and_deletes_the_image() {
        let (dir, addr) = server();
        let (mut p, _) = open_as(addr, 2, MIB, "u1");
        assert_eq!(adopt(&mut p, 1, 2, 7), Msg::Ack { seq: 1, value: 7 });
        let (mut o, _) = open_as(addr, 0, 0, "");
        assert_eq!(
            code(&ask(&mut o, &Msg::Drop { seq: 1, epoch: 1 })),
            Some(Code::Stale)
        );
        assert_eq!(
            ask(&mut o, &Msg::Drop { seq: 2, epoch: 3 }),
            Msg::Ack { seq: 2, value: 3 }
        );
        assert!(!dir.path().join("v.img").exists());
        let sc = sidecar(dir.path());
        assert_eq!((sc.epoch, sc.uuid.as_str(), sc.gen), (3, "", 0));
        // The old primary is fenced, on its connection and on a new one.
        let data = [1u8; 512];
        let m = write(&mut p.0, &mut p.1, 2, 2, 0, &data, crc32c::crc32c(&data));
        assert_eq!(code(&m), Some(Code::Stale), "{m:?}");
        let (_, reply) = open_as(addr, 2, MIB, "u1");
        assert_eq!(code(&reply), Some(Code::Stale));
        assert!(
            !dir.path().join("v.img").exists(),
            "a refused open creates nothing"
        );
        // An observer still finds the (empty) volume: it can be fenced or dropped again.
        let (mut o, reply) = open_as(addr, 0, 0, "");
        assert_eq!(ident(&reply), (3, "", 0));
        let sums = Msg::Sums {
            seq: 1,
            offset: 0,
            len: 4096,
            chunk: 4096,
        };
        assert_eq!(code(&ask(&mut o, &sums)), Some(Code::Range));
        assert_eq!(
            ask(&mut o, &Msg::Drop { seq: 2, epoch: 3 }),
            Msg::Ack { seq: 2, value: 3 }
        );
        // Survives a restart; a new incarnation re-creates the image.
        let addr = serve(dir.path());
        let (_, reply) = open_as(addr, 0, 0, "");
        assert_eq!(ident(&reply), (3, "", 0));
        let (_, reply) = open_as(addr, 4, MIB, "u2");
        assert_eq!(ident(&reply), (4, "u2", 0));
        assert_eq!(
            std::fs::read(dir.path().join("v.img")).unwrap(),
            vec![0u8; MIB as usize]
        );
    }

    #[test]
    fn a_corrupt_sidecar_refuses_to_open() {
        let dir = tempfile::tempdir().unwrap();
        adopted(dir.path());
        std::fs::write(dir.path().join("v.meta"), b"{\"epoch\": 3, \"uu").unwrap();
        let addr = serve(dir.path());
        for epoch in [0, 9] {
            let (_, reply) = open_as(addr, epoch, MIB, "u1");
            assert_eq!(code(&reply), Some(Code::Io), "{reply:?}");
            let Msg::Nack { message, .. } = reply else {
                unreachable!()
            };
            assert!(message.contains("corrupt"), "{message}");
        }
        assert!(dir.path().join("v.img").exists(), "nothing was touched");
    }

    #[test]
    fn reads_are_bounded_and_allowed_to_observers() {
        let (_dir, addr) = server();
        let (mut tx, mut rx, _) = open(addr, 1, MIB);
        let data: Vec<u8> = (0..8192u32).map(|i| i as u8).collect();
        let crc = crc32c::crc32c(&data);
        assert_eq!(
            write(&mut tx, &mut rx, 1, 1, 4096, &data, crc),
            Msg::Ack { seq: 1, value: 0 }
        );
        // On the writing connection, queued right behind the write: it sees it.
        tx.queue_write(2, 1, 0, crc, &data).unwrap();
        tx.send(&Msg::Read {
            seq: 3,
            offset: 4096,
            len: 8192,
        })
        .unwrap();
        assert_eq!(rx.recv().unwrap(), Msg::Ack { seq: 2, value: 0 });
        let mut want = data[4096..].to_vec();
        want.extend_from_slice(&data[4096..]);
        assert_eq!(rx.recv().unwrap(), Msg::Data { seq: 3, data: want });
        let mut o = {
            let (tx, rx, _) = open(addr, 0, 0);
            (tx, rx)
        };
        let read = |seq, offset, len| Msg::Read { seq, offset, len };
        assert_eq!(
            ask(&mut o, &read(1, 0, 4096)),
            Msg::Data {
                seq: 1,
                data: data[..4096].to_vec()
            }
        );
        assert_eq!(
            ask(&mut o, &read(2, MIB, 0)),
            Msg::Data {
                seq: 2,
                data: vec![]
            }
        );
        for (offset, len) in [(0, MAX_READ + 1), (MIB - 512, 1024), (u64::MAX, 2)] {
            let m = ask(&mut o, &read(3, offset, len));
            assert_eq!(code(&m), Some(Code::Range), "{offset}+{len}");
        }
    }

    #[test]
    fn an_observer_needs_an_existing_volume() {
        let (dir, addr) = server();
        let (_, reply) = open_as(addr, 0, 0, "");
        assert_eq!(code(&reply), Some(Code::Range));
        let (_, reply) = open_as(addr, 0, MIB, "");
        assert_eq!(
            code(&reply),
            Some(Code::Range),
            "an observer creates nothing"
        );
        assert!(!dir.path().join("v.img").exists());
        assert!(!dir.path().join("v.meta").exists());
    }
}
