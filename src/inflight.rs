//! Inflight I/O tracking for split virtqueues (vhost-user spec, "Inflight I/O tracking").
//!
//! The backend allocates a shared memory region (a memfd) and hands it to the frontend with
//! GET_INFLIGHT_FD. The frontend keeps it and gives it back with SET_INFLIGHT_FD on every
//! (re)connection, so the region outlives a crashed backend. It holds one `QueueRegionSplit`
//! per queue:
//!
//! ```text
//! offset 0  u64 features   8 u16 version   10 u16 desc_num   12 u16 last_batch_head
//!        14 u16 used_idx   16 DescStateSplit[desc_num]: u8 inflight, 5 pad, u16 next, u64 counter
//! ```
//!
//! Order of writes (each one a single aligned store, so a crash between two instructions
//! leaves every field whole):
//! - on pop: `desc[h].counter = counter++`, then `desc[h].inflight = 1`, before the request
//!   is parsed or submitted;
//! - on completion (batches of one, because each used-ring update is one `add_used`):
//!   `desc[h].next = last_batch_head`, `last_batch_head = h`, the used ring update,
//!   `desc[h].inflight = 0`, `used_idx = used.idx`;
//! - on reconnect: if `used_idx` differs from the used ring's index, the last batch reached
//!   the guest, so its entries are cleared; then the entries still in flight are resubmitted
//!   in counter order, and the queue resumes at `used.idx + in-flight count`.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::Ordering;

use vm_memory::{Bytes, VolatileSlice};

/// Region format version we write and accept.
pub const VERSION: u16 = 1;
const QUEUE_HEADER: usize = 16;
const DESC_STATE: usize = 16;
const ALIGN: usize = 64;

const OFF_VERSION: usize = 8;
const OFF_DESC_NUM: usize = 10;
const OFF_LAST_BATCH_HEAD: usize = 12;
const OFF_USED_IDX: usize = 14;
const DESC_INFLIGHT: usize = 0;
const DESC_NEXT: usize = 6;
const DESC_COUNTER: usize = 8;

/// Bytes of one queue's region.
pub fn queue_region_size(queue_size: u16) -> usize {
    (QUEUE_HEADER + DESC_STATE * usize::from(queue_size)).div_ceil(ALIGN) * ALIGN
}

/// Errors setting up an inflight region.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    #[error("cannot create the inflight memfd")]
    Create(#[source] io::Error),
    #[error("cannot map the inflight region")]
    Map(#[source] io::Error),
    #[error("the inflight region is {have} bytes, {need} needed for {queues} queues of {size}")]
    TooSmall {
        have: u64,
        need: u64,
        queues: u16,
        size: u16,
    },
    #[error("the inflight region of queue {queue} has version {version} and {desc_num} descriptors, expected version {VERSION} and {size}")]
    Layout {
        queue: u16,
        version: u16,
        desc_num: u16,
        size: u16,
    },
}

/// A mapped inflight region.
pub struct InflightRegion {
    file: File,
    ptr: *mut u8,
    len: usize,
    pub num_queues: u16,
    pub queue_size: u16,
}

// SAFETY: the mapping is plain shared memory, valid until `drop`; every access goes through
// volatile/atomic operations on a `VolatileSlice`, and each queue's part is written by that
// queue's worker only.
unsafe impl Send for InflightRegion {}
// SAFETY: as above.
unsafe impl Sync for InflightRegion {}

impl InflightRegion {
    /// Allocates a fresh, zeroed region (GET_INFLIGHT_FD) and writes each queue's header.
    pub fn create(num_queues: u16, queue_size: u16) -> Result<Self, InflightError> {
        // SAFETY: the name is a valid C string; memfd_create returns a new fd we own.
        let fd = unsafe { libc::memfd_create(c"ferrodisk-inflight".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(InflightError::Create(io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        let len = usize::from(num_queues) * queue_region_size(queue_size);
        file.set_len(len as u64).map_err(InflightError::Create)?;
        let region = Self::map(file, len, 0, num_queues, queue_size)?;
        for q in 0..num_queues {
            let mem = region.mem();
            let base = region.queue_base(q);
            store(&mem, base + OFF_DESC_NUM, queue_size);
            store(&mem, base + OFF_VERSION, VERSION);
        }
        Ok(region)
    }

    /// Maps a region the frontend gave back (SET_INFLIGHT_FD).
    pub fn open(
        file: File,
        mmap_size: u64,
        mmap_offset: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Self, InflightError> {
        let need = (usize::from(num_queues) * queue_region_size(queue_size)) as u64;
        if mmap_size < need || num_queues == 0 || queue_size == 0 {
            return Err(InflightError::TooSmall {
                have: mmap_size,
                need,
                queues: num_queues,
                size: queue_size,
            });
        }
        let region = Self::map(file, need as usize, mmap_offset, num_queues, queue_size)?;
        for q in 0..num_queues {
            let mem = region.mem();
            let base = region.queue_base(q);
            let version: u16 = load(&mem, base + OFF_VERSION);
            let desc_num: u16 = load(&mem, base + OFF_DESC_NUM);
            // A zeroed region (never used) is fine: it gets its header now.
            if version == 0 {
                store(&mem, base + OFF_DESC_NUM, queue_size);
                store(&mem, base + OFF_VERSION, VERSION);
            } else if version != VERSION || desc_num != queue_size {
                return Err(InflightError::Layout {
                    queue: q,
                    version,
                    desc_num,
                    size: queue_size,
                });
            }
        }
        Ok(region)
    }

    fn map(
        file: File,
        len: usize,
        offset: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Self, InflightError> {
        // SAFETY: a new shared mapping of `len` bytes of `file` at `offset`; the kernel checks
        // the arguments, and we own the result until `drop` unmaps it.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(InflightError::Map(io::Error::last_os_error()));
        }
        Ok(InflightRegion {
            file,
            ptr: ptr.cast(),
            len,
            num_queues,
            queue_size,
        })
    }

    /// The memfd, to send to the frontend.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Bytes mapped (the `mmap_size` told to the frontend).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn mem(&self) -> VolatileSlice<'_> {
        // SAFETY: `ptr..ptr+len` is our mapping, alive as long as `self` (unmapped in drop).
        unsafe { VolatileSlice::new(self.ptr, self.len) }
    }

    fn queue_base(&self, q: u16) -> usize {
        usize::from(q) * queue_region_size(self.queue_size)
    }

    /// The tracker of queue `q`, or `None` if the region has no such queue.
    pub fn tracker(&self, q: u16) -> Option<QueueTracker> {
        (q < self.num_queues).then(|| QueueTracker::new(self.queue_base(q), self.queue_size))
    }

    /// Runs `f` on queue state through the mapping.
    pub fn with<R>(&self, f: impl FnOnce(&VolatileSlice<'_>) -> R) -> R {
        f(&self.mem())
    }
}

impl Drop for InflightRegion {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping made in `map`; no reference into it outlives
        // `self` (every access borrows `self`).
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

fn store<T: vm_memory::AtomicAccess>(mem: &VolatileSlice<'_>, off: usize, v: T) {
    // Offsets are computed from the fixed layout and are in bounds and aligned.
    let _ = mem.store(v, off, Ordering::Release);
}

fn load<T: vm_memory::AtomicAccess + Default>(mem: &VolatileSlice<'_>, off: usize) -> T {
    mem.load(off, Ordering::Acquire).unwrap_or_default()
}

/// One queue's view of the region: where it lives and the next counter value.
#[derive(Debug, Clone)]
pub struct QueueTracker {
    base: usize,
    size: u16,
    counter: u64,
}

impl QueueTracker {
    fn new(base: usize, size: u16) -> Self {
        QueueTracker {
            base,
            size,
            counter: 1,
        }
    }

    fn desc(&self, head: u16) -> usize {
        self.base + QUEUE_HEADER + DESC_STATE * usize::from(head)
    }

    /// Marks `head` in flight. Call right after popping it, before anything else.
    pub fn mark(&mut self, mem: &VolatileSlice<'_>, head: u16) {
        self.set_counter(mem, head);
        self.set_inflight(mem, head);
    }

    /// A whole completion around `add_used`, which updates the used ring and returns its new
    /// index.
    pub fn complete(&self, mem: &VolatileSlice<'_>, head: u16, add_used: impl FnOnce() -> u16) {
        self.link_into_batch(mem, head);
        self.set_batch_head(mem, head);
        let idx = add_used();
        self.clear_inflight(mem, head);
        self.set_used_idx(mem, idx);
    }

    // The single stores the two sequences above are made of, in order. Separate functions so
    // that tests can stop (crash) between any two of them.

    fn set_counter(&mut self, mem: &VolatileSlice<'_>, head: u16) {
        if head < self.size {
            store(mem, self.desc(head) + DESC_COUNTER, self.counter);
            self.counter += 1;
        }
    }

    fn set_inflight(&self, mem: &VolatileSlice<'_>, head: u16) {
        if head < self.size {
            store(mem, self.desc(head) + DESC_INFLIGHT, 1u8);
        }
    }

    fn link_into_batch(&self, mem: &VolatileSlice<'_>, head: u16) {
        if head < self.size {
            let last: u16 = load(mem, self.base + OFF_LAST_BATCH_HEAD);
            store(mem, self.desc(head) + DESC_NEXT, last);
        }
    }

    fn set_batch_head(&self, mem: &VolatileSlice<'_>, head: u16) {
        if head < self.size {
            store(mem, self.base + OFF_LAST_BATCH_HEAD, head);
        }
    }

    fn clear_inflight(&self, mem: &VolatileSlice<'_>, head: u16) {
        if head < self.size {
            store(mem, self.desc(head) + DESC_INFLIGHT, 0u8);
        }
    }

    fn set_used_idx(&self, mem: &VolatileSlice<'_>, used_idx: u16) {
        store(mem, self.base + OFF_USED_IDX, used_idx);
    }

    /// After a reconnect: repairs the last batch against the used ring's index and returns
    /// the heads still in flight, oldest first. The queue resumes popping at
    /// `ring_used_idx + returned.len()`.
    pub fn recover(&mut self, mem: &VolatileSlice<'_>, ring_used_idx: u16) -> Vec<u16> {
        let used_idx: u16 = load(mem, self.base + OFF_USED_IDX);
        if used_idx != ring_used_idx {
            // The last batch reached the used ring but its entries were not cleared.
            let mut batch = ring_used_idx.wrapping_sub(used_idx).min(self.size);
            let mut head: u16 = load(mem, self.base + OFF_LAST_BATCH_HEAD);
            while batch > 0 && head < self.size {
                store(mem, self.desc(head) + DESC_INFLIGHT, 0u8);
                head = load(mem, self.desc(head) + DESC_NEXT);
                batch -= 1;
            }
            store(mem, self.base + OFF_USED_IDX, ring_used_idx);
        }
        let mut inflight: Vec<(u64, u16)> = (0..self.size)
            .filter(|&h| load::<u8>(mem, self.desc(h) + DESC_INFLIGHT) == 1)
            .map(|h| (load::<u64>(mem, self.desc(h) + DESC_COUNTER), h))
            .collect();
        inflight.sort_unstable();
        let max = (0..self.size)
            .map(|h| load::<u64>(mem, self.desc(h) + DESC_COUNTER))
            .max();
        self.counter = max.unwrap_or(0) + 1;
        inflight.into_iter().map(|(_, h)| h).collect()
    }
}

#[cfg(test)]
mod tests;
