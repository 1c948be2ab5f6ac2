//! The io_uring engine: one ring per queue worker.
//!
//! Ownership: every accepted request lives in a `Slot` of a fixed table allocated when the
//! queue starts (one slot per virtqueue descriptor, so the table can never be outrun by a
//! well-behaved guest). The slot index is the SQE's `user_data`. A slot owns its `iovec`
//! array from the moment the SQE is pushed until its CQE is reaped; only then is the slot
//! freed. The guest memory snapshot its buffers point into is held by `Snapshots` for as
//! long as any slot uses it. Dropping the queue first waits for every in-flight SQE, so the
//! kernel never writes into memory we released.
//!
//! The ring is created disabled, gets the disk's files and the completion eventfd
//! registered, and is then restricted to the opcodes we use, with registered files required.
//! Submissions are batched: `push` only fills the SQ, `submit` makes one `io_uring_enter` call.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use io_uring::{opcode, register::Restriction, squeue, types, IoUring};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::Completion;
use crate::disk::Files;
use crate::request::{GuestMem, Op, Request, MAX_IOVECS};
use crate::stats::RateLimit;
use crate::virtio_blk::{S_IOERR, S_OK};

/// Fixed-file index of the main (possibly O_DIRECT) file.
const FILE_MAIN: u32 = 0;
/// Fixed-file index of the page-cache file used for misaligned buffers under O_DIRECT.
const FILE_BUFFERED: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum UringError {
    #[error("cannot create an io_uring with {entries} entries")]
    Create {
        entries: u32,
        #[source]
        source: io::Error,
    },
    #[error("cannot register {what} with the io_uring")]
    Register {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot create the completion eventfd")]
    EventFd(#[source] io::Error),
}

/// One request in flight.
struct Slot {
    head: u16,
    status: GuestAddress,
    op: Op,
    /// Which registered file the request goes to.
    file: u32,
    rw_flags: i32,
    /// Fallocate mode (discard and write-zeroes).
    mode: i32,
    /// Write-through: a discard or write-zeroes is followed by an fdatasync before it
    /// completes (a write carries RWF_DSYNC instead).
    sync_after: bool,
    /// The fdatasync of `sync_after` is the SQE in flight.
    syncing: bool,
    iov: Vec<libc::iovec>,
    /// First iovec not yet fully transferred (after a short read or write).
    iov_start: usize,
    done: u64,
    total: u64,
    used_len: u32,
    /// Which guest memory snapshot (see [`Snapshots`]) the iovecs point into.
    generation: u64,
    /// For a write from a buffer of ours (data a driver image transformed, or the copy a
    /// replicated write sends to the replicas): what owns the buffer the iovec points
    /// into, kept by the slot until the CQE is reaped.
    keep: Option<Box<dyn Send>>,
    /// Resubmissions after an error that made no progress (EAGAIN, EINTR).
    retries: u32,
}

// SAFETY: the raw pointers in `iov` point into guest memory kept alive by the queue's
// `Snapshots` entry for `generation`; a slot is
// only touched by the worker thread that owns the queue (or by whoever holds that worker's
// lock), never concurrently.
unsafe impl Send for Slot {}

impl Slot {
    fn new() -> Slot {
        Slot {
            head: 0,
            status: GuestAddress(0),
            op: Op::Flush,
            file: FILE_MAIN,
            rw_flags: 0,
            mode: 0,
            sync_after: false,
            syncing: false,
            iov: Vec::with_capacity(MAX_IOVECS.min(256)),
            iov_start: 0,
            done: 0,
            total: 0,
            used_len: 0,
            generation: 0,
            keep: None,
            retries: 0,
        }
    }

    /// Drops `n` transferred bytes from the front of the remaining iovecs.
    fn advance(&mut self, mut n: usize) {
        while n > 0 && self.iov_start < self.iov.len() {
            let v = &mut self.iov[self.iov_start];
            if n >= v.iov_len {
                n -= v.iov_len;
                self.iov_start += 1;
            } else {
                // SAFETY: `n < iov_len`, so the new base stays inside the same guest buffer.
                v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
                v.iov_len -= n;
                n = 0;
            }
        }
    }
}

/// The guest memory snapshots that in-flight requests point into, oldest first, each with
/// the number of slots using it.
///
/// The frontend may change the memory table while requests are in flight; the old mapping
/// must outlive them. Holding one `Arc` per snapshot (not per request) keeps the per-request
/// cost to a pointer comparison and a counter, with no atomic shared between queues.
#[derive(Default)]
struct Snapshots {
    live: std::collections::VecDeque<(u64, Arc<GuestMem>, usize)>,
    next_generation: u64,
}

impl Snapshots {
    /// Counts one more user of `mem`; returns its generation.
    fn acquire(&mut self, mem: &Arc<GuestMem>) -> u64 {
        match self.live.back_mut() {
            Some((generation, m, users)) if Arc::ptr_eq(m, mem) => {
                *users += 1;
                *generation
            }
            _ => {
                self.next_generation += 1;
                self.live
                    .push_back((self.next_generation, Arc::clone(mem), 1));
                self.next_generation
            }
        }
    }

    /// Counts one user of `generation` less, and drops snapshots nobody uses any more.
    fn release(&mut self, generation: u64) {
        if let Some(e) = self.live.iter_mut().find(|e| e.0 == generation) {
            e.2 -= 1;
        }
        while self.live.front().is_some_and(|e| e.2 == 0) {
            self.live.pop_front();
        }
    }
}

/// What a completed (or failed) CQE means for its slot.
enum Outcome {
    Done(u8),
    Resubmit,
    /// The next step of the same request (the fdatasync of a write-through discard).
    Next,
}

/// Events the worker counts.
#[derive(Default, Debug, Clone, Copy)]
pub struct EngineEvents {
    pub short_transfers: u64,
    pub retries: u64,
    pub errors: u64,
    /// fdatasyncs that made a write-through discard or write-zeroes durable.
    pub syncs: u64,
    /// Failures that may mean pages written earlier are gone, which Linux reports only once
    /// per open file: a failed fdatasync (a guest flush, or the sync after a write-through
    /// discard or write-zeroes), a failed RWF_DSYNC write (its sync may have taken another
    /// write's error, and that write then completed as if durable), and any EIO on a write.
    pub sync_errors: u64,
    /// SQEs that found the submission queue full even after a submit (never expected).
    pub sq_full: u64,
}

/// A request the ring did not take, handed back with what kept its buffer alive.
pub struct Refused {
    pub keep: Option<Box<dyn Send>>,
    pub why: &'static str,
}

/// Resubmissions of one request (EAGAIN, short transfers) before it fails with IOERR.
const MAX_RETRIES: u32 = 64;

/// The opcodes the engine submits; its ring refuses every other one (`-EACCES`).
pub const ENGINE_OPS: [u8; 4] = [
    opcode::Readv::CODE,
    opcode::Writev::CODE,
    opcode::Fsync::CODE,
    opcode::Fallocate::CODE,
];

/// Creates a ring of `entries` SQEs (and `cq_entries` CQEs) that accepts only the opcodes
/// `ops`, with exactly the SQE flags `flags` (every SQE must carry them, and no other flag
/// is allowed; e.g. `FIXED_FILE`, which also confines SQEs to the registered files).
///
/// The ring is created disabled (`IORING_SETUP_R_DISABLED`); `setup` registers what the
/// ring needs (files, an eventfd); then the restrictions are registered, which also
/// forbid any later `io_uring_register` call, and the ring is enabled.
pub fn restricted_ring(
    entries: u32,
    cq_entries: u32,
    ops: &[u8],
    flags: squeue::Flags,
    setup: impl FnOnce(&io_uring::Submitter<'_>) -> Result<(), UringError>,
) -> Result<IoUring, UringError> {
    let ring = IoUring::builder()
        .setup_r_disabled()
        .setup_cqsize(cq_entries)
        .build(entries)
        .map_err(|source| UringError::Create { entries, source })?;
    let sub = ring.submitter();
    setup(&sub)?;
    let reg = |what, r: io::Result<()>| r.map_err(|source| UringError::Register { what, source });
    let mut restrictions: Vec<Restriction> =
        ops.iter().map(|&op| Restriction::sqe_op(op)).collect();
    if !flags.is_empty() {
        restrictions.push(Restriction::sqe_flags_required(flags.bits()));
    }
    reg("restrictions", sub.register_restrictions(&mut restrictions))?;
    reg("enable", sub.register_enable_rings())?;
    Ok(ring)
}

pub struct UringQueue {
    ring: IoUring,
    eventfd: EventFd,
    slots: Vec<Slot>,
    free: Vec<u16>,
    in_flight: Arc<AtomicUsize>,
    snapshots: Snapshots,
    /// CQEs copied out of the CQ, reused across reaps.
    cqes: Vec<(u64, i32)>,
    dio_align: u64,
    has_buffered: bool,
    pub events: EngineEvents,
    log_limit: RateLimit,
}

impl UringQueue {
    /// Creates a ring for one queue of `queue_size` descriptors over `files`.
    pub fn new(
        files: &Files,
        queue_size: u16,
        in_flight: Arc<AtomicUsize>,
    ) -> Result<Self, UringError> {
        let entries = u32::from(queue_size).next_power_of_two();
        let eventfd = EventFd::new(EFD_NONBLOCK).map_err(UringError::EventFd)?;
        let mut fds: Vec<RawFd> = vec![files.main.as_raw_fd()];
        if let Some(b) = &files.buffered {
            fds.push(b.as_raw_fd());
        }
        let ring = restricted_ring(
            entries,
            entries * 2,
            &ENGINE_OPS,
            squeue::Flags::FIXED_FILE,
            |sub| {
                let reg = |what, r: io::Result<()>| {
                    r.map_err(|source| UringError::Register { what, source })
                };
                reg("files", sub.register_files(&fds))?;
                reg("the eventfd", sub.register_eventfd(eventfd.as_raw_fd()))
            },
        )?;
        let n = usize::from(queue_size);
        Ok(UringQueue {
            ring,
            eventfd,
            slots: (0..n).map(|_| Slot::new()).collect(),
            free: (0..n as u16).rev().collect(),
            in_flight,
            cqes: Vec::with_capacity(2 * n),
            snapshots: Snapshots::default(),
            dio_align: u64::from(files.dio_align),
            has_buffered: files.buffered.is_some(),
            events: EngineEvents::default(),
            log_limit: RateLimit::new(10, std::time::Duration::from_secs(1)),
        })
    }

    /// The eventfd the kernel signals when CQEs are posted.
    pub fn eventfd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    /// Whether CQEs are waiting to be reaped (no system call).
    pub fn has_completions(&mut self) -> bool {
        !self.ring.completion().is_empty()
    }

    pub fn has_room(&self) -> bool {
        !self.free.is_empty()
    }

    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Accepts `req`, taking its iovecs (the caller gets an empty vector back in `iov`).
    /// Returns whether the request went to the page-cache file because O_DIRECT could not
    /// take its buffers. A request the ring cannot take (no free slot: see
    /// [`has_room`](Self::has_room); or no room in the submission queue) is handed back,
    /// with its iovecs left in `iov`: never dropped.
    pub fn push(
        &mut self,
        req: &Request,
        iov: &mut Vec<libc::iovec>,
        mem: &Arc<GuestMem>,
        write_through: bool,
        keep: Option<Box<dyn Send>>,
    ) -> Result<bool, Refused> {
        let Some(idx) = self.free.pop() else {
            return Err(Refused {
                keep,
                why: "no free slot",
            });
        };
        let misaligned = self.has_buffered && !self.aligned(req, iov);
        let slot = &mut self.slots[usize::from(idx)];
        std::mem::swap(&mut slot.iov, iov);
        iov.clear();
        slot.head = req.head;
        slot.keep = keep;
        slot.status = req.status;
        slot.op = req.op;
        slot.iov_start = 0;
        slot.done = 0;
        slot.total = u64::from(req.data_len);
        slot.used_len = match req.op {
            Op::Read { .. } => req.data_len + 1,
            _ => 1,
        };
        slot.file = if misaligned { FILE_BUFFERED } else { FILE_MAIN };
        slot.rw_flags = match req.op {
            Op::Write { .. } if write_through => libc::RWF_DSYNC,
            _ => 0,
        };
        slot.sync_after =
            write_through && matches!(req.op, Op::Discard { .. } | Op::WriteZeroes { .. });
        slot.syncing = false;
        slot.mode = match req.op {
            Op::Discard { .. } | Op::WriteZeroes { unmap: true, .. } => {
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
            }
            _ => libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        };
        slot.retries = 0;
        slot.generation = self.snapshots.acquire(mem);
        if !self.push_sqe(idx) {
            let s = &mut self.slots[usize::from(idx)];
            std::mem::swap(&mut s.iov, iov);
            let keep = s.keep.take();
            self.snapshots.release(s.generation);
            self.free.push(idx);
            return Err(Refused {
                keep,
                why: "the submission queue is full",
            });
        }
        self.in_flight.fetch_add(1, Ordering::Release);
        Ok(misaligned)
    }

    /// Whether O_DIRECT can take this request's buffers as they are.
    fn aligned(&self, req: &Request, iov: &[libc::iovec]) -> bool {
        let a = self.dio_align;
        let offset = match req.op {
            Op::Read { offset } | Op::Write { offset } => offset,
            _ => return true,
        };
        offset % a == 0
            && iov
                .iter()
                .all(|v| (v.iov_base as u64) % a == 0 && (v.iov_len as u64) % a == 0)
    }

    /// Builds the SQE for slot `idx` from its current state.
    fn sqe(&self, idx: u16) -> squeue::Entry {
        let s = &self.slots[usize::from(idx)];
        let fd = types::Fixed(s.file);
        let rest = &s.iov[s.iov_start..];
        if s.syncing {
            return opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build()
                .user_data(u64::from(idx));
        }
        let entry = match s.op {
            Op::Read { offset } => opcode::Readv::new(fd, rest.as_ptr(), rest.len() as u32)
                .offset(offset + s.done)
                .build(),
            Op::Write { offset } => opcode::Writev::new(fd, rest.as_ptr(), rest.len() as u32)
                .offset(offset + s.done)
                .rw_flags(s.rw_flags)
                .build(),
            Op::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Op::Discard { offset, len } | Op::WriteZeroes { offset, len, .. } => {
                opcode::Fallocate::new(fd, len)
                    .offset(offset)
                    .mode(s.mode)
                    .build()
            }
            // GET_ID never reaches the engine; a flush is harmless if it ever did.
            Op::GetId => opcode::Fsync::new(fd).build(),
        };
        entry.user_data(u64::from(idx))
    }

    /// Queues the SQE of slot `idx`; returns whether it is queued. Bounded: a full SQ is
    /// handed to the kernel once, then the request is given up rather than spun on.
    fn push_sqe(&mut self, idx: u16) -> bool {
        let entry = self.sqe(idx);
        for attempt in 0..2 {
            // SAFETY: the SQE points at `slots[idx].iov`, whose heap buffer is owned by the
            // slot and neither moved nor freed until this SQE's CQE is reaped (the slot table
            // is never resized, and a slot is reused only after it is freed in `reap`). The
            // buffers the iovecs name are guest memory kept mapped by the `snapshots` entry
            // of `slots[idx].generation` until this slot is released, or, for a write a
            // buffer of ours, kept alive by `slots[idx].keep` until then.
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                return true;
            }
            // Cannot happen: the SQ has at least as many entries as there are slots, and each
            // slot has at most one SQE queued. Should it ever, hand the queued SQEs to the
            // kernel and try once more.
            if attempt == 0 {
                let _ = self.submit();
            }
        }
        self.events.sq_full += 1;
        false
    }

    /// Hands every queued SQE to the kernel in one system call.
    pub fn submit(&mut self) -> io::Result<()> {
        loop {
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Clears the eventfd and moves every finished request into `done`.
    pub fn reap(&mut self, done: &mut Vec<Completion>) {
        let _ = self.eventfd.read();
        loop {
            self.cqes.clear();
            self.cqes
                .extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            if self.cqes.is_empty() {
                return;
            }
            let mut resubmit = false;
            for i in 0..self.cqes.len() {
                let (user_data, res) = self.cqes[i];
                resubmit |= self.complete_one(user_data, res, done);
            }
            if resubmit {
                if let Err(e) = self.submit() {
                    if let Some(suppressed) = self.log_limit.allow() {
                        tracing::warn!(suppressed, "io_uring resubmit failed: {e}");
                    }
                }
            }
        }
    }

    /// Handles one CQE; returns whether it queued a resubmission.
    fn complete_one(&mut self, user_data: u64, res: i32, done: &mut Vec<Completion>) -> bool {
        let Some(idx) = u16::try_from(user_data)
            .ok()
            .filter(|&i| usize::from(i) < self.slots.len())
        else {
            if let Some(suppressed) = self.log_limit.allow() {
                tracing::error!(
                    suppressed,
                    "io_uring returned unknown user_data {user_data}"
                );
            }
            return false;
        };
        let mut outcome = self.outcome(idx, res);
        if let Outcome::Resubmit = outcome {
            self.events.retries += 1;
            let s = &mut self.slots[usize::from(idx)];
            // A short transfer made progress (bounded by the request's length); an EAGAIN
            // or EINTR did not: that kind is counted, and EAGAIN forever gives up.
            s.retries += u32::from(res < 0);
            if s.retries > MAX_RETRIES {
                tracing::debug!("request {:?} gave up after {MAX_RETRIES} retries", s.op);
                outcome = Outcome::Done(S_IOERR);
            }
        }
        if matches!(outcome, Outcome::Resubmit | Outcome::Next) {
            if self.push_sqe(idx) {
                return true;
            }
            outcome = Outcome::Done(S_IOERR);
        }
        match outcome {
            Outcome::Resubmit | Outcome::Next => unreachable!("handled above"),
            Outcome::Done(status) => {
                if status != S_OK {
                    self.events.errors += 1;
                }
                let s = &mut self.slots[usize::from(idx)];
                self.snapshots.release(s.generation);
                s.iov.clear();
                s.keep = None;
                done.push(Completion {
                    head: s.head,
                    status_addr: Some(s.status),
                    status,
                    used_len: if status == S_OK { s.used_len } else { 1 },
                });
                self.free.push(idx);
                self.in_flight.fetch_sub(1, Ordering::Release);
                false
            }
        }
    }

    fn outcome(&mut self, idx: u16, res: i32) -> Outcome {
        let s = &mut self.slots[usize::from(idx)];
        if s.syncing {
            // The fdatasync after a write-through discard or write-zeroes.
            return if res < 0 {
                self.events.sync_errors += 1;
                tracing::debug!(
                    "fdatasync after {:?} failed: {}",
                    s.op,
                    io::Error::from_raw_os_error(-res)
                );
                Outcome::Done(S_IOERR)
            } else {
                Outcome::Done(S_OK)
            };
        }
        if res < 0 {
            let errno = -res;
            return match (errno, s.op) {
                (libc::EAGAIN | libc::EINTR, _) => Outcome::Resubmit,
                // Discard is advisory: a backing that cannot discard keeps the data.
                (libc::EOPNOTSUPP, Op::Discard { .. }) => Outcome::Done(S_OK),
                // A device without unmapping write-zeroes still zeroes the slow way.
                (libc::EOPNOTSUPP, Op::WriteZeroes { .. })
                    if s.mode & libc::FALLOC_FL_PUNCH_HOLE != 0 =>
                {
                    s.mode = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
                    Outcome::Resubmit
                }
                (e, op) => {
                    let dsync = s.rw_flags & libc::RWF_DSYNC != 0;
                    match op {
                        Op::Flush => self.events.sync_errors += 1,
                        Op::Write { .. } if dsync || e == libc::EIO => self.events.sync_errors += 1,
                        _ => {}
                    }
                    tracing::debug!(
                        "request {:?} failed: {}",
                        op,
                        io::Error::from_raw_os_error(e)
                    );
                    Outcome::Done(S_IOERR)
                }
            };
        }
        match s.op {
            Op::Read { .. } | Op::Write { .. } => {
                let n = res as u64;
                if n == 0 && s.done < s.total {
                    // End of file under a read, or a write that makes no progress.
                    tracing::debug!(
                        "request {:?} transferred nothing after {} of {} bytes",
                        s.op,
                        s.done,
                        s.total
                    );
                    return Outcome::Done(S_IOERR);
                }
                s.done += n;
                if s.done < s.total {
                    self.events.short_transfers += 1;
                    s.advance(n as usize);
                    return Outcome::Resubmit;
                }
                Outcome::Done(S_OK)
            }
            Op::Discard { .. } | Op::WriteZeroes { .. } if s.sync_after => {
                s.syncing = true;
                self.events.syncs += 1;
                Outcome::Next
            }
            _ => Outcome::Done(S_OK),
        }
    }

    /// Waits until nothing is in flight, moving completions into `done`.
    pub fn drain(&mut self, done: &mut Vec<Completion>) {
        while self.in_flight() > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => {
                    tracing::error!("io_uring wait failed while draining: {e}");
                    return;
                }
            }
            self.reap(done);
        }
    }
}

impl Drop for UringQueue {
    fn drop(&mut self) {
        // The kernel may still write into guest memory for in-flight SQEs: wait for them
        // before the slots (and the memory they keep mapped) go away.
        let mut sink = Vec::new();
        self.drain(&mut sink);
    }
}

#[cfg(test)]
mod tests {
    use std::fs::OpenOptions;
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};

    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryMmap};

    use super::*;

    const MEM: usize = 4 << 20;

    struct Fixture {
        _dir: tempfile::TempDir,
        path: std::path::PathBuf,
        mem: Arc<GuestMem>,
        q: UringQueue,
    }

    fn fixture(direct: bool, size: u64) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::File::create(&path).unwrap().set_len(size).unwrap();
        let open = |flags| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(flags)
                .open(&path)
                .unwrap()
        };
        let files = if direct {
            Files {
                main: open(libc::O_DIRECT),
                buffered: Some(open(0)),
                is_block_device: false,
                dio_align: 512,
            }
        } else {
            Files {
                main: open(0),
                buffered: None,
                is_block_device: false,
                dio_align: 1,
            }
        };
        let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap());
        let q = UringQueue::new(&files, 8, Arc::new(AtomicUsize::new(0))).unwrap();
        Fixture {
            _dir: dir,
            path,
            mem,
            q,
        }
    }

    fn iov(mem: &GuestMem, addr: u64, len: usize) -> libc::iovec {
        let p = mem.get_host_address(GuestAddress(addr)).unwrap();
        libc::iovec {
            iov_base: p.cast(),
            iov_len: len,
        }
    }

    fn run(f: &mut Fixture, op: Op, bufs: &[(u64, usize)]) -> (Completion, bool) {
        let mut v: Vec<libc::iovec> = bufs.iter().map(|&(a, l)| iov(&f.mem, a, l)).collect();
        let data_len = bufs.iter().map(|b| b.1 as u32).sum();
        let req = Request {
            head: 3,
            op,
            status: GuestAddress(0x3f_0000),
            data_len,
        };
        let fallback = f.q.push(&req, &mut v, &f.mem, false, None).ok().unwrap();
        assert!(v.is_empty(), "push takes the iovecs");
        f.q.submit().unwrap();
        let mut done = Vec::new();
        f.q.drain(&mut done);
        assert_eq!(done.len(), 1);
        assert_eq!(f.q.in_flight(), 0);
        (done[0], fallback)
    }

    #[test]
    fn write_then_read_through_the_ring() {
        for direct in [false, true] {
            let mut f = fixture(direct, 1 << 20);
            let pattern: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
            f.mem.write_slice(&pattern, GuestAddress(0x1000)).unwrap();
            let (c, fb) = run(
                &mut f,
                Op::Write { offset: 4096 },
                &[(0x1000, 4096), (0x2000, 4096)],
            );
            assert_eq!((c.status, c.used_len, c.head, fb), (S_OK, 1, 3, false));
            let (c, _) = run(&mut f, Op::Read { offset: 4096 }, &[(0x10_0000, 8192)]);
            assert_eq!((c.status, c.used_len), (S_OK, 8193));
            let mut got = vec![0u8; 8192];
            f.mem.read_slice(&mut got, GuestAddress(0x10_0000)).unwrap();
            assert_eq!(got, pattern, "direct={direct}");
            let mut on_disk = vec![0u8; 8192];
            let mut file = std::fs::File::open(&f.path).unwrap();
            file.seek(SeekFrom::Start(4096)).unwrap();
            file.read_exact(&mut on_disk).unwrap();
            assert_eq!(on_disk, pattern);
        }
    }

    #[test]
    fn misaligned_buffers_take_the_page_cache_path_under_o_direct() {
        let mut f = fixture(true, 1 << 20);
        f.mem
            .write_slice(&[0x42u8; 1000], GuestAddress(0x1003))
            .unwrap();
        f.mem
            .write_slice(&[0x43u8; 24], GuestAddress(0x5001))
            .unwrap();
        let (c, fallback) = run(
            &mut f,
            Op::Write { offset: 0 },
            &[(0x1003, 1000), (0x5001, 24)],
        );
        assert_eq!(c.status, S_OK);
        assert!(
            fallback,
            "misaligned buffers must not go to the O_DIRECT file"
        );
        let (c, fallback) = run(&mut f, Op::Read { offset: 0 }, &[(0x20_0000, 1024)]);
        assert!(!fallback);
        assert_eq!(c.status, S_OK);
        let mut got = vec![0u8; 1024];
        f.mem.read_slice(&mut got, GuestAddress(0x20_0000)).unwrap();
        assert!(got[..1000].iter().all(|&b| b == 0x42) && got[1000..].iter().all(|&b| b == 0x43));
    }

    #[test]
    fn flush_discard_and_write_zeroes() {
        let mut f = fixture(false, 4 << 20);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&f.path)
            .unwrap()
            .write_all(&vec![1u8; 4 << 20])
            .unwrap();
        assert_eq!(run(&mut f, Op::Flush, &[]).0.status, S_OK);
        let before = std::fs::metadata(&f.path).unwrap().blocks();
        assert_eq!(
            run(
                &mut f,
                Op::Discard {
                    offset: 1 << 20,
                    len: 1 << 20
                },
                &[]
            )
            .0
            .status,
            S_OK
        );
        assert!(
            std::fs::metadata(&f.path).unwrap().blocks() < before,
            "hole punched"
        );
        assert_eq!(
            run(
                &mut f,
                Op::WriteZeroes {
                    offset: 0,
                    len: 8192,
                    unmap: false
                },
                &[]
            )
            .0
            .status,
            S_OK
        );
        let mut data = vec![9u8; 3 << 20];
        std::fs::File::open(&f.path)
            .unwrap()
            .read_exact(&mut data)
            .unwrap();
        assert!(data[..8192].iter().all(|&b| b == 0));
        assert!(data[8192..1 << 20].iter().all(|&b| b == 1));
        assert!(data[1 << 20..2 << 20].iter().all(|&b| b == 0));
        assert_eq!(
            std::fs::metadata(&f.path).unwrap().len(),
            4 << 20,
            "size kept"
        );
    }

    #[test]
    fn write_through_discard_and_write_zeroes_are_synced_before_they_complete() {
        let mut f = fixture(false, 4 << 20);
        let push = |f: &mut Fixture, op, write_through| {
            let req = Request {
                head: 1,
                op,
                status: GuestAddress(0x3f_0000),
                data_len: 0,
            };
            assert!(f
                .q
                .push(&req, &mut Vec::new(), &f.mem, write_through, None)
                .is_ok());
            f.q.submit().unwrap();
            let mut done = Vec::new();
            f.q.drain(&mut done);
            assert_eq!(done[0].status, S_OK);
        };
        let discard = Op::Discard {
            offset: 0,
            len: 1 << 20,
        };
        let zeroes = Op::WriteZeroes {
            offset: 0,
            len: 8192,
            unmap: false,
        };
        push(&mut f, discard, false);
        push(&mut f, zeroes, false);
        assert_eq!(f.q.events.syncs, 0, "write-back: no sync");
        push(&mut f, discard, true);
        push(&mut f, zeroes, true);
        assert_eq!(f.q.events.syncs, 2, "write-through: each one synced");
        assert_eq!(f.q.events.retries, 0);
    }

    #[test]
    fn failed_fdatasyncs_are_counted_as_sync_errors() {
        // No file system here fails an fdatasync on demand: classify the CQE results.
        let mut f = fixture(false, 1 << 20);
        run(&mut f, Op::Flush, &[]);
        let slot = &mut f.q.slots[0];
        slot.op = Op::Flush;
        slot.syncing = false;
        assert!(matches!(f.q.outcome(0, -libc::EIO), Outcome::Done(S_IOERR)));
        assert_eq!(f.q.events.sync_errors, 1, "a failed guest flush");
        let slot = &mut f.q.slots[0];
        slot.op = Op::Discard {
            offset: 0,
            len: 4096,
        };
        slot.syncing = true;
        assert!(matches!(f.q.outcome(0, -libc::EIO), Outcome::Done(S_IOERR)));
        assert_eq!(f.q.events.sync_errors, 2, "a failed sync after a discard");
        let slot = &mut f.q.slots[0];
        slot.op = Op::Write { offset: 0 };
        slot.syncing = false;
        slot.rw_flags = 0;
        assert!(matches!(
            f.q.outcome(0, -libc::ENOSPC),
            Outcome::Done(S_IOERR)
        ));
        assert_eq!(
            f.q.events.sync_errors, 2,
            "a write-back write failing with ENOSPC is not"
        );
        assert!(matches!(f.q.outcome(0, -libc::EIO), Outcome::Done(S_IOERR)));
        assert_eq!(f.q.events.sync_errors, 3, "an EIO on a write is");
        f.q.slots[0].rw_flags = libc::RWF_DSYNC;
        assert!(matches!(
            f.q.outcome(0, -libc::ENOSPC),
            Outcome::Done(S_IOERR)
        ));
        assert_eq!(
            f.q.events.sync_errors, 4,
            "a failed write-through write is: its sync may have taken another write's error"
        );
    }

    #[test]
    fn reading_past_a_truncated_end_fails_cleanly() {
        let mut f = fixture(false, 1 << 20);
        // Someone shrinks the file under us: the read hits EOF and must fail, not hang.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&f.path)
            .unwrap()
            .set_len(4096)
            .unwrap();
        let (c, _) = run(&mut f, Op::Read { offset: 0 }, &[(0x1000, 8192)]);
        assert_eq!((c.status, c.used_len), (S_IOERR, 1));
        assert_eq!(
            f.q.events.short_transfers, 1,
            "the first 4 KiB arrive, then EOF"
        );
    }

    /// Pushes `sqe` on `ring` and returns its CQE's result.
    fn submit_raw(ring: &mut IoUring, sqe: squeue::Entry) -> i32 {
        // SAFETY: every SQE these tests push points at memory (a path, a buffer) that lives
        // until `submit_and_wait` below has returned its completion.
        unsafe { ring.submission().push(&sqe.user_data(77)).unwrap() };
        ring.submit_and_wait(1).unwrap();
        let cqe = ring.completion().next().unwrap();
        assert_eq!(cqe.user_data(), 77);
        cqe.result()
    }

    #[test]
    fn the_engine_ring_refuses_other_opcodes_and_unregistered_files() {
        let mut f = fixture(false, 1 << 20);
        let path = std::ffi::CString::new(f.path.to_str().unwrap()).unwrap();
        let open = opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), path.as_ptr()).build();
        assert_eq!(submit_raw(&mut f.q.ring, open), -libc::EACCES, "OpenAt");
        let nop = opcode::Nop::new().build();
        assert_eq!(submit_raw(&mut f.q.ring, nop), -libc::EACCES, "Nop");
        let file = std::fs::File::open(&f.path).unwrap();
        let mut buf = [0u8; 512];
        let iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        let raw_fd = opcode::Readv::new(types::Fd(file.as_raw_fd()), iov.as_ptr(), 1).build();
        assert_eq!(
            submit_raw(&mut f.q.ring, raw_fd),
            -libc::EACCES,
            "a Readv on a file that is not registered"
        );
        let fixed = opcode::Readv::new(types::Fixed(FILE_MAIN), iov.as_ptr(), 1).build();
        assert_eq!(
            submit_raw(&mut f.q.ring, fixed),
            512,
            "the engine's own Readv"
        );
        let linked = opcode::Readv::new(types::Fixed(FILE_MAIN), iov.as_ptr(), 1)
            .build()
            .flags(squeue::Flags::IO_LINK);
        assert_eq!(
            submit_raw(&mut f.q.ring, linked),
            -libc::EACCES,
            "an SQE flag it does not use"
        );
        assert!(
            f.q.ring
                .submitter()
                .register_files(&[file.as_raw_fd()])
                .is_err(),
            "no registration once enabled"
        );
    }

    #[test]
    fn a_ring_without_fixed_files_takes_only_its_opcodes() {
        // The replica's applier ring: Write and Fallocate on plain file descriptors.
        let mut ring = restricted_ring(
            8,
            16,
            &[opcode::Write::CODE, opcode::Fallocate::CODE],
            squeue::Flags::empty(),
            |_| Ok(()),
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::File::create(dir.path().join("img")).unwrap();
        let data = [5u8; 4096];
        let fd = types::Fd(file.as_raw_fd());
        let write = opcode::Write::new(fd, data.as_ptr(), 4096).build();
        assert_eq!(submit_raw(&mut ring, write), 4096);
        let zero = opcode::Fallocate::new(fd, 4096)
            .mode(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE)
            .build();
        assert_eq!(submit_raw(&mut ring, zero), 0);
        let mut buf = [0u8; 16];
        let read = opcode::Read::new(fd, buf.as_mut_ptr(), 16).build();
        assert_eq!(submit_raw(&mut ring, read), -libc::EACCES, "Read");
        let path = std::ffi::CString::new("/etc/passwd").unwrap();
        let open = opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), path.as_ptr()).build();
        assert_eq!(submit_raw(&mut ring, open), -libc::EACCES, "OpenAt");
        let fixed = opcode::Write::new(types::Fixed(0), data.as_ptr(), 16).build();
        assert_eq!(submit_raw(&mut ring, fixed), -libc::EACCES, "an SQE flag");
    }

    #[test]
    fn snapshots_live_as_long_as_their_users() {
        let a = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4096)]).unwrap());
        let b = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4096)]).unwrap());
        let mut s = Snapshots::default();
        let ga = s.acquire(&a);
        assert_eq!(s.acquire(&a), ga);
        let gb = s.acquire(&b);
        assert_ne!(ga, gb);
        assert_eq!(
            Arc::strong_count(&a),
            2,
            "one reference per snapshot, not per request"
        );
        s.release(gb);
        assert_eq!(s.live.len(), 2, "b stays behind a, which is still in use");
        s.release(ga);
        s.release(ga);
        assert!(s.live.is_empty());
        assert_eq!(Arc::strong_count(&a), 1);
        assert_eq!(Arc::strong_count(&b), 1);
    }

    #[test]
    fn the_table_bounds_what_is_in_flight() {
        let mut f = fixture(false, 1 << 20);
        let mut pushed = 0;
        while f.q.has_room() {
            let mut v = vec![iov(&f.mem, 0x1000, 512)];
            let req = Request {
                head: pushed,
                op: Op::Read { offset: 0 },
                status: GuestAddress(0x3f_0000),
                data_len: 512,
            };
            assert!(f.q.push(&req, &mut v, &f.mem, false, None).is_ok());
            pushed += 1;
        }
        assert_eq!(pushed, 8);
        assert_eq!(f.q.in_flight(), 8);
        // A ninth request is handed back whole (it used to be dropped): its buffers stay with
        // the caller and what keeps its data alive comes back.
        let mut v = vec![iov(&f.mem, 0x1000, 512)];
        let req = Request {
            head: 8,
            op: Op::Write { offset: 0 },
            status: GuestAddress(0x3f_0000),
            data_len: 512,
        };
        let refused =
            f.q.push(&req, &mut v, &f.mem, false, Some(Box::new(7u8)))
                .expect_err("no slot: handed back");
        assert!(refused.keep.is_some());
        assert_eq!(v.len(), 1, "the iovecs stay with the caller");
        assert_eq!(f.q.in_flight(), 8);
        f.q.submit().unwrap();
        let mut done = Vec::new();
        f.q.drain(&mut done);
        let mut heads: Vec<u16> = done.iter().map(|c| c.head).collect();
        heads.sort();
        assert_eq!(heads, (0..8).collect::<Vec<_>>());
        assert!(f.q.has_room());
    }
}
