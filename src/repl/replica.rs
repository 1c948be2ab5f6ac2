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
//! Fencing: each volume keeps the highest epoch it has seen in `<volume>.epoch` (fsync +
//! rename). Requests from an older epoch get `Nack(Stale)`. A batch holds the volume's epoch
//! lock for reading while it writes, and raising the epoch takes it for writing, so once a
//! `Fence` or a newer `Open` is acknowledged, no write of an older epoch can land.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver as ChanRx};
use std::sync::{Arc, Mutex, RwLock};

use io_uring::{opcode, types, IoUring};

use super::wire::{self, Code, Key, Msg, WireError};
use crate::repl::authority::check_volume_name;

/// Most queued messages per connection before the reader waits for the applier.
const QUEUE_DEPTH: usize = 1024;
/// Largest checksum chunk, and most checksums, one `Sums` request may ask for.
const MAX_SUM_CHUNK: u32 = 4 << 20;
const MAX_SUMS: u64 = 4096;
/// Most operations per batch.
const MAX_BATCH: usize = 256;

pub struct ReplicaServer {
    data: PathBuf,
    key: Key,
    volumes: Mutex<HashMap<String, Arc<Volume>>>,
}

struct Volume {
    name: String,
    file: File,
    /// The same file with O_DIRECT, for aligned writes (`None` if the filesystem refuses it).
    direct: Option<File>,
    dio_align: u64,
    size: u64,
    /// The highest epoch seen, and the writable session: each primary `Open` starts a new
    /// session, and writes still queued on an older connection of the volume are refused.
    epoch: RwLock<EpochState>,
    meta: PathBuf,
}

impl Volume {
    /// Raises the stored epoch to `epoch` (durably) if it is higher; returns the stored one
    /// and, with `new_session`, the number of the session this call starts. Fails with
    /// `Stale` if `epoch` is older.
    fn raise_epoch(&self, epoch: u64, new_session: bool) -> Result<(u64, u64), (Code, String)> {
        let mut cur = self.epoch.write().unwrap_or_else(|p| p.into_inner());
        if epoch < cur.epoch {
            return Err((
                Code::Stale,
                format!("epoch {epoch} is older than {} (fenced)", cur.epoch),
            ));
        }
        if epoch > cur.epoch {
            crate::sys::write_atomic(&self.meta, format!("{epoch}\n").as_bytes())
                .map_err(|e| (Code::Io, format!("cannot persist epoch {epoch}: {e}")))?;
            tracing::info!(volume = %self.name, epoch, previous = cur.epoch, "epoch raised");
            cur.epoch = epoch;
        }
        if new_session {
            cur.session += 1;
        }
        Ok((cur.epoch, cur.session))
    }
}

/// A volume's fencing state (see [`Volume::epoch`]).
#[derive(Debug, Clone, Copy)]
struct EpochState {
    epoch: u64,
    session: u64,
}

fn read_epoch(meta: &Path) -> io::Result<u64> {
    match std::fs::read_to_string(meta) {
        Ok(s) => s.trim().parse().map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} does not hold an epoch", meta.display()),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

impl ReplicaServer {
    pub fn new(data: &Path, key: Key) -> io::Result<Arc<ReplicaServer>> {
        std::fs::create_dir_all(data)?;
        Ok(Arc::new(ReplicaServer {
            data: data.to_path_buf(),
            key,
            volumes: Mutex::new(HashMap::new()),
        }))
    }

    /// Accepts connections forever, one thread each.
    pub fn run(self: &Arc<Self>, listener: TcpListener) -> io::Result<()> {
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
            let me = Arc::clone(self);
            let spawned = std::thread::Builder::new()
                .name(format!("replica-{peer}"))
                .spawn(move || me.connection(stream, peer));
            if let Err(e) = spawned {
                tracing::error!("cannot start a connection thread: {e}");
            }
        }
    }

    fn volume(&self, name: &str, size: u64) -> Result<Arc<Volume>, (Code, String)> {
        check_volume_name(name).map_err(|e| (Code::Protocol, e))?;
        let mut vols = self.volumes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = vols.get(name) {
            if size != 0 && v.size != size {
                return Err((
                    Code::Range,
                    format!("volume {name} is {} bytes here, not {size}", v.size),
                ));
            }
            return Ok(Arc::clone(v));
        }
        let path = self.data.join(format!("{name}.img"));
        let io = |e: io::Error| (Code::Io, format!("{}: {e}", path.display()));
        let exists = path.exists();
        if !exists && size == 0 {
            return Err((Code::Range, format!("volume {name} has no replica here")));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if !exists || len == 0 {
            file.set_len(size).map_err(io)?;
            // Allocate the blocks now: a write into a hole makes fdatasync commit metadata
            // too, which made each group commit several times slower.
            crate::sys::fallocate(&file, 0, size).map_err(io)?;
            file.sync_all().map_err(io)?;
            File::open(&self.data)
                .and_then(|d| d.sync_all())
                .map_err(io)?;
            tracing::info!(volume = name, size, "created an empty replica");
        } else if size != 0 && len != size {
            return Err((
                Code::Range,
                format!("volume {name} is {len} bytes here, not {size}"),
            ));
        }
        let meta = self.data.join(format!("{name}.epoch"));
        let epoch = read_epoch(&meta).map_err(io)?;
        let direct = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .ok();
        let dio_align = direct
            .as_ref()
            .and_then(crate::sys::dio_alignment)
            .map_or(4096, u64::from)
            .max(512);
        let v = Arc::new(Volume {
            name: name.to_string(),
            direct,
            dio_align,
            size: file.metadata().map_err(io)?.len(),
            file,
            epoch: RwLock::new(EpochState { epoch, session: 0 }),
            meta,
        });
        vols.insert(name.to_string(), Arc::clone(&v));
        Ok(v)
    }

    fn connection(self: Arc<Self>, stream: TcpStream, peer: std::net::SocketAddr) {
        let (mut tx, mut rx) = match wire::server(stream, &self.key) {
            Ok(h) => h,
            Err(WireError::Unauthenticated) => {
                tracing::warn!(%peer, "refused an unauthenticated peer");
                return;
            }
            Err(e) => {
                tracing::warn!(%peer, "handshake failed: {e}");
                return;
            }
        };
        // The first message binds the connection to a volume.
        let (vol, writable) = match rx.recv() {
            Ok(Msg::Open {
                seq,
                epoch,
                size,
                volume,
                uuid: _,
            }) => {
                let opened = self.volume(&volume, size).and_then(|v| {
                    // Epoch 0 opens for checksums only (verify): no epoch change, no writes.
                    let (stored, session) = if epoch == 0 {
                        (v.epoch.read().unwrap_or_else(|p| p.into_inner()).epoch, 0)
                    } else {
                        v.raise_epoch(epoch, true)?
                    };
                    Ok((v, stored, session))
                });
                match opened {
                    Ok((v, stored, session)) => {
                        let reply = Msg::Opened {
                            seq,
                            epoch: stored,
                            size: v.size,
                            uuid: String::new(),
                            gen: 0,
                        };
                        if tx.send(&reply).is_err() {
                            return;
                        }
                        tracing::info!(%peer, volume = %v.name, epoch, "connection opened");
                        (v, (epoch != 0).then_some(session))
                    }
                    Err((code, message)) => {
                        tracing::warn!(%peer, volume = %volume, "open refused: {message}");
                        let _ = tx.send(&Msg::Nack { seq, code, message });
                        return;
                    }
                }
            }
            Ok(other) => {
                tracing::warn!(%peer, "expected Open, got {:?}", other.seq());
                return;
            }
            Err(e) => {
                tracing::warn!(%peer, "connection ended before Open: {e}");
                return;
            }
        };
        let (qtx, qrx) = sync_channel::<Msg>(QUEUE_DEPTH);
        let name = vol.name.clone();
        let applier = std::thread::Builder::new()
            .name(format!("apply-{name}"))
            .spawn(move || {
                let mut a = match Applier::new(vol, tx, writable) {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::error!("cannot create an io_uring for the applier: {e}");
                        return;
                    }
                };
                a.run(qrx);
            });
        if applier.is_err() {
            return;
        }
        loop {
            match rx.recv() {
                Ok(m) => {
                    if qtx.send(m).is_err() {
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
    vol: Arc<Volume>,
    tx: wire::Sender,
    ring: IoUring,
    /// The session this connection opened (`None`: checksums and fencing only).
    writable: Option<u64>,
    batch: Vec<Op>,
    replies: Vec<Msg>,
    /// A discard or write-zeroes in the batch: its metadata needs an fdatasync.
    needs_sync: bool,
}

impl Applier {
    fn new(vol: Arc<Volume>, tx: wire::Sender, writable: Option<u64>) -> io::Result<Applier> {
        Ok(Applier {
            vol,
            tx,
            ring: IoUring::new(MAX_BATCH as u32)?,
            writable,
            batch: Vec::with_capacity(MAX_BATCH),
            replies: Vec::with_capacity(MAX_BATCH),
            needs_sync: false,
        })
    }

    fn run(&mut self, queue: ChanRx<Msg>) {
        while let Ok(first) = queue.recv() {
            let vol = Arc::clone(&self.vol);
            let mut epoch = Some(vol.epoch.read().unwrap_or_else(|p| p.into_inner()));
            let mut next = Some(first);
            while let Some(m) = next.take() {
                match m {
                    Msg::Fence { seq, epoch: e } => {
                        // Everything before the fence lands first; then no older write can.
                        self.commit();
                        drop(epoch.take()); // the raise needs the write lock
                        let r = self.vol.raise_epoch(e, false).map(|(e, _)| e);
                        epoch = Some(vol.epoch.read().unwrap_or_else(|p| p.into_inner()));
                        self.replies.push(match r {
                            Ok(value) => Msg::Ack { seq, value },
                            Err((code, message)) => Msg::Nack { seq, code, message },
                        });
                    }
                    m => {
                        let current = epoch.as_deref().copied();
                        self.apply(m, current);
                    }
                }
                if self.batch.len() < MAX_BATCH {
                    next = queue.try_recv().ok();
                }
            }
            self.commit();
            drop(epoch);
            // One send for the batch's replies.
            for r in self.replies.drain(..) {
                if self.tx.queue(&r).is_err() {
                    return;
                }
            }
            if self.tx.flush().is_err() {
                return;
            }
        }
    }

    fn check(
        &self,
        epoch: u64,
        current: Option<EpochState>,
        offset: u64,
        len: u64,
    ) -> Result<(), (Code, String)> {
        let Some(session) = self.writable else {
            return Err((
                Code::Protocol,
                "connection opened for checksums only".into(),
            ));
        };
        let current = current.unwrap_or(EpochState {
            epoch: u64::MAX,
            session: u64::MAX,
        });
        admit(current.epoch, epoch)?;
        // A newer connection of this volume took over (the primary reconnected and may be
        // resyncing): what is still queued here must not land on top of its copies (found
        // by the simulation, tests/replication_sim.rs).
        if current.session != session {
            return Err((
                Code::Protocol,
                "superseded by a newer connection of this volume".into(),
            ));
        }
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.vol.size)
        {
            return Err((
                Code::Range,
                format!(
                    "{offset}+{len} is beyond the volume ({} bytes)",
                    self.vol.size
                ),
            ));
        }
        Ok(())
    }

    fn overlaps(&self, offset: u64, len: u64) -> bool {
        self.batch
            .iter()
            .any(|o| o.offset < offset + len && offset < o.offset + o.len)
    }

    fn apply(&mut self, m: Msg, current: Option<EpochState>) {
        match m {
            Msg::Write {
                seq,
                epoch,
                offset,
                crc,
                data,
            } => {
                let len = data.len() as u64;
                if let Err((code, message)) = self.check(epoch, current, offset, len) {
                    self.replies.push(Msg::Nack { seq, code, message });
                    return;
                }
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
                let a = self.vol.dio_align;
                let (fd, buf, start) = match &self.vol.direct {
                    Some(d) if offset % a == 0 && len % a == 0 => {
                        let mut buf = vec![0u8; data.len() + a as usize];
                        let start = buf.as_ptr().align_offset(a as usize);
                        buf[start..start + data.len()].copy_from_slice(&data);
                        (d.as_raw_fd(), buf, start)
                    }
                    _ => (self.vol.file.as_raw_fd(), data, 0),
                };
                let sqe = opcode::Write::new(types::Fd(fd), buf[start..].as_ptr(), len as u32)
                    .offset(offset)
                    .rw_flags(libc::RWF_DSYNC)
                    .build()
                    .user_data(self.batch.len() as u64);
                self.push(sqe, seq, offset, len, buf, start);
            }
            Msg::Zero {
                seq,
                epoch,
                offset,
                len,
                unmap,
            } => {
                if let Err((code, message)) = self.check(epoch, current, offset, len) {
                    self.replies.push(Msg::Nack { seq, code, message });
                    return;
                }
                if self.overlaps(offset, len) {
                    self.commit();
                }
                let mode = if unmap {
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                } else {
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
                };
                let sqe = opcode::Fallocate::new(types::Fd(self.vol.file.as_raw_fd()), len)
                    .offset(offset)
                    .mode(mode)
                    .build()
                    .user_data(self.batch.len() as u64);
                self.needs_sync = true;
                self.push(sqe, seq, offset, len, Vec::new(), 0);
            }
            Msg::Sums {
                seq,
                offset,
                len,
                chunk,
            } => {
                self.commit();
                self.replies.push(self.sums(seq, offset, len, chunk));
            }
            other => self.replies.push(Msg::Nack {
                seq: other.seq(),
                code: Code::Protocol,
                message: "unexpected message".into(),
            }),
        }
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
                    let r = self
                        .vol
                        .file
                        .write_all_at(&op.data[done..end], op.offset + res as u64)
                        .and_then(|()| self.vol.file.sync_data());
                    if let Err(e) = r {
                        op.result = Err((Code::Io, e.to_string()));
                    }
                }
            }
        }
        // Writes are durable already (RWF_DSYNC); discards and write-zeroes changed
        // allocation, which one fdatasync for the batch makes durable.
        let synced = if std::mem::take(&mut self.needs_sync) {
            self.vol.file.sync_data()
        } else {
            Ok(())
        };
        if let Err(e) = synced {
            for op in &mut self.batch {
                op.result = Err((Code::Io, format!("fdatasync: {e}")));
            }
        }
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

    fn sums(&self, seq: u64, offset: u64, len: u64, chunk: u32) -> Msg {
        // Bounded work and memory per request, whatever the peer asks for.
        if chunk == 0
            || chunk > MAX_SUM_CHUNK
            || offset.checked_add(len).is_none_or(|e| e > self.vol.size)
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
            if let Err(e) = self.vol.file.read_exact_at(&mut buf[..n], at) {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Duration;

    fn key() -> Key {
        Key::new(b"replica-unit-test-key".to_vec()).unwrap()
    }

    /// A replica server on a free loopback port, serving from a temporary directory.
    fn server() -> (tempfile::TempDir, std::net::SocketAddr) {
        let dir = tempfile::tempdir().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let srv = ReplicaServer::new(dir.path(), key()).unwrap();
        std::thread::spawn(move || srv.run(listener));
        (dir, addr)
    }

    fn open(
        addr: std::net::SocketAddr,
        epoch: u64,
        size: u64,
    ) -> (wire::Sender, wire::Receiver, Msg) {
        let (mut tx, mut rx) = wire::client(TcpStream::connect(addr).unwrap(), &key()).unwrap();
        rx.set_timeout(Some(Duration::from_secs(10))).unwrap();
        tx.send(&Msg::Open {
            seq: 0,
            epoch,
            size,
            volume: "v".into(),
            uuid: String::new(),
        })
        .unwrap();
        let reply = rx.recv().unwrap();
        (tx, rx, reply)
    }

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
        assert_eq!(
            std::fs::read_to_string(dir.path().join("v.epoch"))
                .unwrap()
                .trim(),
            "9"
        );
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
}
