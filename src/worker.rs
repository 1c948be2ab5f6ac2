//! The queue worker: one per virtqueue, on its own thread.
//!
//! A kick pops every available chain, parses each into a request, hands reads, writes,
//! flushes, discards and write-zeroes to the queue's engine (filling the SQ), and then makes
//! one submission for the whole batch. Completions (from the ring's eventfd, or at once for
//! the null engine, GET_ID and refused chains) are written to the used ring as a batch, and
//! the guest is signalled at most once per batch, as EVENT_IDX allows.
//!
//! When the in-flight table is full, the worker stops popping: the remaining chains stay in
//! the virtqueue (back-pressure) and are picked up when completions free slots.

use std::collections::VecDeque;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost_user_backend::{VringMutex, VringT};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic};

use crate::buf::{AlignedBuf, Payload};
use crate::disk::Disk;
use crate::driver::{abi, Driver, Verdict};
use crate::engine::uring::{UringError, UringQueue};
use crate::engine::{Completion, QueueEngine};
use crate::inflight::{InflightRegion, QueueTracker};
use crate::metrics::OpKind;
use crate::proxy::InflightSlot;
use crate::repl::machine::OpId;
use crate::repl::primary::{Begin, Delivery, DeliveryKind, Replication};
use crate::request::{self, GuestMem, Op, Request, Scratch};
use crate::stats::{add, QueueStats, RateLimit};
use crate::sys;
use crate::virtio_blk::{ID_BYTES, MAX_REQUEST_BYTES, S_IOERR, S_OK, S_UNSUPP};
use vmm_sys_util::timerfd::TimerFd;

pub type GM = GuestMemoryAtomic<GuestMem>;
pub type Vring = VringMutex<GM>;

pub struct QueueWorker {
    disk: Arc<Disk>,
    queue: usize,
    mem: GM,
    engine: QueueEngine,
    scratch: Scratch,
    iov: Vec<libc::iovec>,
    done: Vec<Completion>,
    log_limit: RateLimit,
    /// Set when the in-flight table filled up with chains still waiting in the virtqueue.
    backpressured: bool,
    /// Idle time after which polling stops (zero: no polling).
    poll_budget: Duration,
    /// While set, guest notifications stay suppressed: the poll loop watches the ring.
    polling: bool,
    /// Inflight tracking: the connection's region, the generation we last saw of it, and
    /// this queue's tracker in it.
    inflight: Arc<InflightSlot>,
    inflight_generation: u64,
    tracker: Option<(Arc<InflightRegion>, QueueTracker)>,
    /// Set when a region was handed over: resubmit what it says is in flight before popping.
    needs_recovery: bool,
    /// Shared by the connection's workers; see [`BlkBackend::quiesce`](crate::backend::BlkBackend::quiesce).
    stop: Arc<std::sync::atomic::AtomicBool>,
    /// Replication: the disk's stage, this connection's number, and the requests waiting
    /// for replica acknowledgements (indexed by head).
    repl: Option<Arc<Replication>>,
    /// Replication frames were queued since the last [`Replication::flush`].
    repl_queued: bool,
    connection: u64,
    held: Vec<Option<Held>>,
    deliveries: Vec<Delivery>,
    in_flight: Arc<AtomicUsize>,
    /// When each head's request was taken from the ring (the start of its batch), and its
    /// kind: completions feed the latency histograms.
    started: Vec<(Instant, OpKind)>,
    batch_start: Instant,
    /// The attachment's driver image (refreshed when an upgrade swaps it), a request it
    /// asked to delay, and the reads it transforms on completion (indexed by head).
    driver: Option<Arc<Driver>>,
    driver_generation: u64,
    deferred: Option<Deferred>,
    driver_reads: Vec<Option<DriverRead>>,
    timer: TimerFd,
    /// The heads taken from the ring and not yet returned to it (indexed by head): a guest
    /// that offers a head again while it is in flight gets the second offer refused.
    active: Vec<bool>,
    /// Bytes of request copies this queue holds (replicated writes' stable copies, driver
    /// images' bounce buffers), charged per head until the request is published.
    charged: Vec<u32>,
    charged_total: usize,
    /// Requests the engine had no slot for when they became ready (a parked or deferred
    /// request released while the ring is full): they go first when slots free up.
    overflow: VecDeque<Parked>,
}

/// The most bytes of request copies one queue holds at a time. A request is taken from
/// the ring only while one more of the largest size still fits, so the bound holds.
pub const QUEUE_COPY_BUDGET: usize = 64 << 20;

/// A request a driver image asked to retry later; nothing behind it is popped meanwhile.
struct Deferred {
    req: Request,
    iov: Vec<libc::iovec>,
    mem: Arc<GuestMem>,
    until: Instant,
}

/// A read whose data the driver image transforms once it is in the guest's buffers.
struct DriverRead {
    offset: u64,
    len: u64,
    iov: Vec<libc::iovec>,
    /// Keeps the mapping the iovecs point into alive until the read is published.
    _mem: Arc<GuestMem>,
}

/// A replicated request: its operation in the replication stage, and what it waits for.
struct Held {
    op: OpId,
    /// The local completion, once the engine finished it.
    completion: Option<Completion>,
    /// A request the replication stage parked (write ordering, activity log): what its
    /// local I/O needs once it is released.
    parked: Option<Parked>,
}

/// A parked request's parsed form, its buffers, the mapping they point into, and what owns
/// a buffer of ours they point into.
struct Parked {
    req: Request,
    iov: Vec<libc::iovec>,
    mem: Arc<GuestMem>,
    keep: Option<Keep>,
}

/// What keeps a buffer of ours alive while the engine writes from it.
type Keep = Box<dyn Send>;

// SAFETY: the raw pointers in `iov` are scratch, only meaningful during one batch on the
// worker's own thread; the worker is moved between threads only before it starts.
unsafe impl Send for QueueWorker {}

impl Drop for QueueWorker {
    /// The replication stage must learn how the local I/O of every request it still
    /// tracks ended, and that parked requests will never run: otherwise their regions
    /// would stay busy, and later overlapping writes would wait forever.
    fn drop(&mut self) {
        let Some(repl) = self.repl.clone() else {
            return;
        };
        if let QueueEngine::Uring(u) = &mut self.engine {
            u.drain(&mut self.done);
            if u.events.sync_errors > 0 {
                repl.local_sync_failed("an fdatasync of the local copy failed");
            }
        }
        let mut ignored = Vec::new();
        for c in std::mem::take(&mut self.done) {
            if let Some(Some(h)) = self.held.get_mut(usize::from(c.head)) {
                if h.completion.is_none() && h.parked.is_none() {
                    h.completion = Some(c);
                    repl.local_done(self.queue, h.op, c.status == S_OK, &mut ignored);
                }
            }
        }
        // Parked requests, and released ones that waited in `overflow` for an engine slot
        // (their local write never started), will never run.
        for h in self.held.iter_mut().filter_map(Option::take) {
            if h.parked.is_some() || h.completion.is_none() {
                repl.abandon(h.op);
            }
        }
    }
}

impl QueueWorker {
    pub fn new(
        disk: Arc<Disk>,
        queue: usize,
        mem: GM,
        in_flight: Arc<AtomicUsize>,
        inflight: Arc<InflightSlot>,
        stop: Arc<std::sync::atomic::AtomicBool>,
    ) -> Result<Self, UringError> {
        let size = disk.config.queue_size;
        let engine = match &disk.files {
            Some(files) => QueueEngine::Uring(Box::new(UringQueue::new(
                files,
                size,
                Arc::clone(&in_flight),
            )?)),
            None => QueueEngine::Null,
        };
        let repl = disk.repl.get().cloned();
        let connection = repl.as_ref().map_or(0, |r| r.current_connection());
        Ok(QueueWorker {
            queue,
            mem,
            engine,
            scratch: Scratch::default(),
            iov: Vec::with_capacity(256),
            done: Vec::with_capacity(2 * usize::from(size)),
            log_limit: RateLimit::new(10, Duration::from_secs(1)),
            backpressured: false,
            poll_budget: Duration::from_micros(u64::from(disk.config.poll_us)),
            polling: false,
            inflight,
            inflight_generation: 0,
            tracker: None,
            needs_recovery: false,
            stop,
            held: if repl.is_some() {
                (0..size).map(|_| None).collect()
            } else {
                Vec::new()
            },
            repl,
            repl_queued: false,
            connection,
            deliveries: Vec::new(),
            in_flight,
            started: vec![(Instant::now(), OpKind::Other); usize::from(size)],
            batch_start: Instant::now(),
            driver: disk.driver(),
            driver_generation: disk
                .driver_generation
                .load(std::sync::atomic::Ordering::Acquire),
            deferred: None,
            driver_reads: (0..size).map(|_| None).collect(),
            timer: TimerFd::new().map_err(|e| UringError::EventFd(e.into()))?,
            active: vec![false; usize::from(size)],
            charged: vec![0; usize::from(size)],
            charged_total: 0,
            overflow: VecDeque::new(),
            disk,
        })
    }

    /// The eventfd to watch for engine completions, if the engine has one.
    pub fn completion_fd(&self) -> Option<i32> {
        match &self.engine {
            QueueEngine::Uring(u) => Some(u.eventfd()),
            QueueEngine::Null => None,
        }
    }

    fn stats(&self) -> &QueueStats {
        &self.disk.stats.queues[self.queue]
    }

    /// Handles a kick: drains the available ring into the engine.
    pub fn process_queue(&mut self, vring: &Vring) {
        let mut mem = self.mem.memory().into_inner();
        let mut state = vring.get_mut();
        self.refresh_inflight();
        self.refresh_driver();
        if self.needs_recovery {
            self.recover(&mut state, &mem);
        }
        self.drain_overflow();
        loop {
            self.backpressured = false;
            self.take_batches(&mut state, &mut mem);
            self.publish(&mut state, &mem);
            // Publishing gave copies back (requests that failed, or finished inside this
            // call): if that is what held the queue back, nothing else would wake it.
            if !(self.backpressured && self.has_room()) {
                return;
            }
        }
    }

    /// Takes batches from the ring until it is empty, or something holds the queue back.
    fn take_batches(
        &mut self,
        state: &mut vhost_user_backend::VringState<GM>,
        mem: &mut Arc<GuestMem>,
    ) {
        loop {
            let queue = state.get_queue_mut();
            let _ = queue.disable_notification(&**mem);
            self.pop_batch(queue, mem);
            // The replicas get the batch's writes first: their round trip is the long pole.
            self.flush_replication();
            let (submit_error, ready) = match &mut self.engine {
                QueueEngine::Uring(u) => (u.submit().err(), u.has_completions()),
                QueueEngine::Null => (None, false),
            };
            if let Some(e) = submit_error {
                self.log(format_args!("io_uring submit failed: {e}"));
            }
            // Requests the kernel finished inside the submit call (page-cache hits) complete
            // in this batch, without a trip through the eventfd.
            if ready {
                self.reap();
            }
            // Stopping: the avail ring may still hold chains, which stay there for the next
            // backend; re-enabling notifications would only report them again.
            if self.backpressured || self.polling || self.stopping() || self.held_back() {
                break;
            }
            match state.get_queue_mut().enable_notification(&**mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    self.log(format_args!("cannot re-enable notifications: {e}"));
                    break;
                }
            }
        }
    }

    /// Moves finished engine requests into `done`.
    fn reap(&mut self) {
        if let QueueEngine::Uring(u) = &mut self.engine {
            u.reap(&mut self.done);
            let ev = std::mem::take(&mut u.events);
            // An fdatasync of a replicated disk's local copy failed: the copy may have lost
            // writes the replicas hold, and the replication stage stops serving it.
            if let (Some(repl), true) = (&self.repl, ev.sync_errors > 0) {
                repl.local_sync_failed("an fdatasync of the local copy failed");
            }
            let st = &self.disk.stats.queues[self.queue];
            add(&st.short_transfers, ev.short_transfers);
            add(&st.retries, ev.retries);
            add(&st.errors_ioerr, ev.errors);
        }
    }

    /// Adaptive polling: after an event, keep watching the avail ring and the completion
    /// queue until nothing has happened for the poll budget, then re-enable guest
    /// notifications and go back to sleep. Does nothing when the budget is zero.
    pub fn poll(&mut self, vring: &Vring) {
        if self.poll_budget.is_zero() {
            return;
        }
        /// Return to the event loop now and then, so exit and ring-enable events are seen.
        const MAX_SPIN: Duration = Duration::from_millis(2);
        self.polling = true;
        let start = Instant::now();
        let mut last_work = start;
        loop {
            let mut worked = false;
            if let QueueEngine::Uring(u) = &mut self.engine {
                if u.has_completions() {
                    self.process_completions(vring);
                    worked = true;
                }
            }
            if self.avail_pending(vring) {
                self.process_queue(vring);
                worked = true;
            }
            if self
                .repl
                .as_ref()
                .is_some_and(|r| r.mailbox(self.queue).ready())
            {
                self.process_replica_acks(vring);
                worked = true;
            }
            let now = Instant::now();
            if worked {
                last_work = now;
            } else if now.duration_since(last_work) >= self.poll_budget
                || now.duration_since(start) >= MAX_SPIN
            {
                break;
            }
            std::hint::spin_loop();
        }
        self.polling = false;
        // Re-enables notifications, and picks up whatever raced with that.
        self.process_queue(vring);
    }

    /// Whether the guest made chains available that we have not popped (no system call).
    fn avail_pending(&self, vring: &Vring) -> bool {
        let mem = self.mem.memory();
        let state = vring.get_ref();
        let q = state.get_queue();
        // A corrupt index (more pending than the queue holds) is not work: the pop would
        // refuse it, and counting it would keep the poll loop spinning.
        let pending = |idx: std::num::Wrapping<u16>| {
            let n = idx.0.wrapping_sub(q.next_avail());
            n != 0 && n <= q.size()
        };
        !self.stopping()
            && !self.held_back()
            && q.ready()
            && q.avail_idx(&*mem, std::sync::atomic::Ordering::Acquire)
                .is_ok_and(pending)
    }

    /// Nothing new is taken while a request waits for its driver image, or while the disk
    /// is paused for an upgrade.
    fn held_back(&self) -> bool {
        self.deferred.is_some() || self.disk.paused.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Set once the connection is being wound down: take nothing new from the rings.
    fn stopping(&self) -> bool {
        self.stop.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Handles the engine's eventfd: completes finished requests.
    pub fn process_completions(&mut self, vring: &Vring) {
        self.reap();
        self.drain_overflow();
        if !self.done.is_empty() {
            let mem = self.mem.memory().into_inner();
            let mut state = vring.get_mut();
            self.publish(&mut state, &mem);
        }
        if self.backpressured {
            self.process_queue(vring);
        }
    }

    /// Handles the replication stage's results: releases parked requests and completes
    /// those that are done everywhere.
    pub fn process_replica_acks(&mut self, vring: &Vring) {
        let Some(repl) = &self.repl else { return };
        repl.mailbox(self.queue).take(&mut self.deliveries);
        self.apply_deliveries();
        if let QueueEngine::Uring(u) = &mut self.engine {
            if let Err(e) = u.submit() {
                self.log(format_args!("io_uring submit failed: {e}"));
            }
        }
        if !self.done.is_empty() {
            let mem = self.mem.memory().into_inner();
            let mut state = vring.get_mut();
            self.publish(&mut state, &mem);
        }
        // Published requests gave their copies back: take more if the budget held us.
        if self.backpressured {
            self.process_queue(vring);
        }
    }

    /// Applies the deliveries in `self.deliveries` (results for other connections, or for
    /// requests no longer held, are stale and ignored).
    fn apply_deliveries(&mut self) {
        let mut deliveries = std::mem::take(&mut self.deliveries);
        for d in deliveries.drain(..) {
            if d.connection != self.connection {
                continue;
            }
            let held = self.held.get(usize::from(d.head)).and_then(Option::as_ref);
            if held.is_none_or(|h| h.op != d.op) {
                continue;
            }
            match d.kind {
                DeliveryKind::Release => self.release(d.head),
                DeliveryKind::Complete { ok } => self.finish_held(d.head, ok),
            }
        }
        // Results caused by what was just applied.
        if !self.deliveries.is_empty() {
            let more = std::mem::take(&mut self.deliveries);
            self.deliveries = deliveries;
            self.deliveries.extend(more);
            return self.apply_deliveries();
        }
        self.deliveries = deliveries;
    }

    /// A parked request may go: submit its local I/O (the stage has forwarded it).
    fn release(&mut self, head: u16) {
        let Some(Some(h)) = self.held.get_mut(usize::from(head)) else {
            return;
        };
        let Some(p) = h.parked.take() else { return };
        self.iov = p.iov;
        self.submit_local(&p.req, &p.mem, p.keep);
        // Released outside any batch of this worker (a completion, a mailbox): submit now.
        if let QueueEngine::Uring(u) = &mut self.engine {
            if let Err(e) = u.submit() {
                self.log(format_args!("io_uring submit failed: {e}"));
            }
        }
    }

    /// A replicated request is done everywhere: it completes (failed if `ok` is false).
    fn finish_held(&mut self, head: u16, ok: bool) {
        let Some(slot) = self.held.get_mut(usize::from(head)) else {
            return;
        };
        let Some(h) = slot.take() else { return };
        let mut c = match (&h.completion, &h.parked) {
            (Some(c), _) => *c,
            // Failed before its local I/O was submitted.
            (None, Some(p)) => Completion {
                head,
                status_addr: Some(p.req.status),
                status: S_IOERR,
                used_len: 1,
            },
            (None, None) => {
                // Cannot happen: the stage completes a request only after its local I/O.
                *slot = Some(h);
                return;
            }
        };
        if !ok && c.status == S_OK {
            c.status = S_IOERR;
            c.used_len = 1;
            add(&self.disk.stats.queues[self.queue].errors_ioerr, 1);
        }
        self.done.push(c);
        self.in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Release);
    }

    /// Local completions of replicated requests wait in `held` for the replication stage.
    fn hold_replicated(&mut self) {
        let Some(repl) = self.repl.clone() else {
            return;
        };
        let mut i = 0;
        while i < self.done.len() {
            let c = self.done[i];
            let op = match self.held.get_mut(usize::from(c.head)) {
                Some(Some(h)) if h.completion.is_none() && h.parked.is_none() => {
                    h.completion = Some(c);
                    h.op
                }
                _ => {
                    i += 1;
                    continue;
                }
            };
            self.done.swap_remove(i);
            repl.local_done(self.queue, op, c.status == S_OK, &mut self.deliveries);
        }
        self.apply_deliveries();
    }

    /// Whether another request may be taken from the ring: the engine has a slot for it,
    /// nothing waits for one already, and a copy of the largest request still fits the
    /// queue's budget.
    fn has_room(&self) -> bool {
        let engine = match &self.engine {
            QueueEngine::Uring(u) => u.has_room(),
            QueueEngine::Null => true,
        };
        engine
            && self.overflow.is_empty()
            && self.charged_total + MAX_REQUEST_BYTES as usize <= QUEUE_COPY_BUDGET
    }

    /// Records `bytes` of copies held for `head` until its request is published.
    fn charge(&mut self, head: u16, bytes: usize) {
        if let Some(c) = self.charged.get_mut(usize::from(head)) {
            *c = c.saturating_add(bytes as u32);
            self.charged_total += bytes;
        }
    }

    /// Hands requests that waited for an engine slot to the engine, oldest first.
    fn drain_overflow(&mut self) {
        let mut moved = false;
        while let QueueEngine::Uring(u) = &self.engine {
            if !u.has_room() {
                break;
            }
            let Some(p) = self.overflow.pop_front() else {
                break;
            };
            self.in_flight
                .fetch_sub(1, std::sync::atomic::Ordering::Release);
            self.iov = p.iov;
            self.submit_local(&p.req, &p.mem, p.keep);
            moved = true;
        }
        if let (true, QueueEngine::Uring(u)) = (moved, &mut self.engine) {
            if let Err(e) = u.submit() {
                self.log(format_args!("io_uring submit failed: {e}"));
            }
        }
    }

    fn pop_batch(&mut self, queue: &mut virtio_queue::Queue, mem: &mut Arc<GuestMem>) {
        if self.stopping() || self.held_back() {
            return;
        }
        let geo = self.disk.geometry();
        self.batch_start = Instant::now();
        // A frontend adds memory (ADD_MEM_REG, SET_MEM_TABLE, acknowledged once the map is
        // replaced) before it publishes a request that uses it. So observe the avail index
        // first and load the memory map after: it covers every chain up to that index. A
        // map loaded earlier (this batch's caller may have been descheduled since) would
        // refuse a request into a region added in between. Chains published after the
        // observation wait for the next round, which loads the map again.
        let observed = match queue.avail_idx(&**mem, std::sync::atomic::Ordering::Acquire) {
            Ok(idx) => idx.0.wrapping_sub(queue.next_avail()),
            Err(e) => {
                self.log(format_args!("cannot read the available ring: {e}"));
                return;
            }
        };
        *mem = self.mem.memory().into_inner();
        let mut iter = match queue.iter(&**mem) {
            Ok(iter) => iter,
            // Not ready (stopped by GET_VRING_BASE, or not set up yet) or a corrupt avail
            // index. Nothing is popped; the next kick tries again, and the log is limited.
            Err(e) => {
                self.log(format_args!("cannot read the available ring: {e}"));
                return;
            }
        };
        let mut popped = 0u16;
        loop {
            if !self.has_room() {
                self.backpressured = true;
                return;
            }
            if self.deferred.is_some() {
                return; // a driver image asked to wait: keep the order
            }
            if popped == observed {
                return;
            }
            let Some(chain) = iter.next() else { return };
            popped = popped.wrapping_add(1);
            add(&self.stats().requests, 1);
            let head = chain.head_index();
            let parsed = request::parse(chain, mem, geo, &mut self.scratch, &mut self.iov);
            if !self.take_head(&parsed, mem) {
                continue;
            }
            if let Some((region, tracker)) = &mut self.tracker {
                region.with(|m| tracker.mark(m, head));
            }
            self.handle_parsed(parsed, mem);
        }
    }

    /// Claims the head of a parsed chain. A head that is still in flight is the guest's
    /// error: the second offer gets IOERR in its status byte and no used element (the head
    /// goes back once, when the first request completes), and the first is left alone.
    fn take_head(
        &mut self,
        parsed: &Result<Request, request::Rejected>,
        mem: &Arc<GuestMem>,
    ) -> bool {
        let (head, status) = match parsed {
            Ok(r) => (r.head, Some(r.status)),
            Err(r) => (r.head, r.status),
        };
        let Some(active) = self.active.get_mut(usize::from(head)) else {
            return true;
        };
        if !*active {
            *active = true;
            return true;
        }
        add(&self.stats().errors_ioerr, 1);
        if let Some(addr) = status {
            let _ = mem.write_obj(S_IOERR, addr);
        }
        self.log(format_args!(
            "refused a request whose head {head} is still in flight"
        ));
        false
    }

    fn handle_parsed(&mut self, parsed: Result<Request, request::Rejected>, mem: &Arc<GuestMem>) {
        {
            let head = match &parsed {
                Ok(r) => r.head,
                Err(r) => r.head,
            };
            if let Some(t) = self.started.get_mut(usize::from(head)) {
                *t = (
                    self.batch_start,
                    parsed
                        .as_ref()
                        .map_or(OpKind::Other, |r| OpKind::from(r.op)),
                );
            }
            match parsed {
                Ok(req) => {
                    self.count(&req);
                    self.dispatch(&req, mem)
                }
                Err(rej) => {
                    let status = rej.error.status();
                    let st = self.stats();
                    add(
                        if status == Some(S_UNSUPP) {
                            &st.errors_unsupp
                        } else {
                            &st.errors_ioerr
                        },
                        1,
                    );
                    self.log(format_args!(
                        "refused request (head {}): {}",
                        rej.head, rej.error
                    ));
                    self.done.push(Completion {
                        head: rej.head,
                        status_addr: rej.status,
                        status: status.unwrap_or(0),
                        used_len: u32::from(rej.status.is_some()),
                    });
                }
            }
        }
    }

    /// Picks up a region the frontend handed over since the last batch.
    fn refresh_inflight(&mut self) {
        let generation = self.inflight.generation();
        if generation == self.inflight_generation {
            return;
        }
        self.inflight_generation = generation;
        self.tracker = self
            .inflight
            .current()
            .and_then(|r| r.tracker(self.queue as u16).map(|t| (r, t)));
        self.needs_recovery = self.tracker.is_some();
    }

    /// Resubmits what the inflight region says was in flight when the last backend stopped,
    /// oldest first, and resumes popping after it.
    fn recover(&mut self, state: &mut vhost_user_backend::VringState<GM>, mem: &Arc<GuestMem>) {
        let queue = state.get_queue_mut();
        if !queue.ready() {
            return; // Not started yet: try again at the first kick.
        }
        self.needs_recovery = false;
        let Some((region, tracker)) = &mut self.tracker else {
            return;
        };
        let used = match queue.used_idx(&**mem, std::sync::atomic::Ordering::Acquire) {
            Ok(u) => u.0,
            Err(e) => {
                self.log(format_args!("cannot read the used index to recover: {e}"));
                return;
            }
        };
        let heads = region.with(|m| tracker.recover(m, used));
        tracing::debug!(
            queue = self.queue,
            used,
            base = queue.next_avail(),
            avail = ?queue.avail_idx(&**mem, std::sync::atomic::Ordering::Acquire).map(|w| w.0),
            ?heads,
            "inflight recovery"
        );
        queue.set_next_avail(used.wrapping_add(heads.len() as u16));
        let (table, size) = (GuestAddress(queue.desc_table()), queue.size());
        if !heads.is_empty() {
            tracing::info!(
                disk = %self.disk.config.socket.display(),
                queue = self.queue,
                requests = heads.len(),
                used,
                "resubmitting requests left in flight by the previous backend"
            );
        }
        let geo = self.disk.geometry();
        for head in heads {
            add(&self.stats().resubmitted, 1);
            let parsed = request::parse_head(
                head,
                table,
                size,
                mem,
                geo,
                &mut self.scratch,
                &mut self.iov,
            );
            if self.take_head(&parsed, mem) {
                self.handle_parsed(parsed, mem);
            }
        }
        // Completions the previous backend wrote may not have been signalled.
        let _ = state.signal_used_queue();
    }

    /// Completes `req` with IOERR. Its completion goes where the engine's would: a
    /// replicated request's to its `Held` (a request the engine could not take fails like
    /// one the engine failed).
    fn fail_now(&mut self, req: &Request) {
        add(&self.stats().errors_ioerr, 1);
        self.done.push(Completion {
            head: req.head,
            status_addr: Some(req.status),
            status: S_IOERR,
            used_len: 1,
        });
    }

    /// The driver image stage: asks the image about `req`. Returns the bounce buffer that
    /// replaces the guest's data for a transformed write, or `Err(())` when the request was
    /// completed (failed) or deferred here.
    fn driver_stage(
        &mut self,
        req: &Request,
        mem: &Arc<GuestMem>,
    ) -> Result<Option<AlignedBuf>, ()> {
        let Some(drv) = self.driver.clone() else {
            return Ok(None);
        };
        if req.op == Op::GetId {
            return Ok(None);
        }
        let (op, offset, len) = match req.op {
            Op::Read { offset } => (abi::OP_READ, offset, u64::from(req.data_len)),
            Op::Write { offset } => (abi::OP_WRITE, offset, u64::from(req.data_len)),
            Op::Flush => (abi::OP_FLUSH, 0, 0),
            Op::Discard { offset, len } => (abi::OP_DISCARD, offset, len),
            Op::WriteZeroes { offset, len, .. } => (abi::OP_WRITE_ZEROES, offset, len),
            Op::GetId => return Ok(None),
        };
        let mut bounce = (op == abi::OP_WRITE && drv.wants_write_data())
            .then(|| AlignedBuf::zeroed(len as usize));
        let r = abi::Request {
            op,
            queue: self.queue as u32,
            offset,
            len,
            iov: self.iov.as_ptr(),
            iovcnt: self.iov.len() as u32,
            _reserved: 0,
            bounce: bounce
                .as_mut()
                .map_or(std::ptr::null_mut(), |b| b.as_mut_ptr()),
        };
        match drv.submit(&r) {
            // Charged once the request goes on with its bounce buffer (a delayed one drops
            // it and is charged when it is dispatched again).
            Verdict::Pass if bounce.is_some() => self.charge(req.head, len as usize),
            Verdict::Pass => {}
            Verdict::Fail | Verdict::Broken => {
                self.fail_now(req);
                return Err(());
            }
            Verdict::Delay(ns) => {
                let until = Instant::now() + Duration::from_nanos(ns);
                self.deferred = Some(Deferred {
                    req: *req,
                    iov: std::mem::take(&mut self.iov),
                    mem: Arc::clone(mem),
                    until,
                });
                self.in_flight
                    .fetch_add(1, std::sync::atomic::Ordering::Release);
                self.arm_timer(until);
                return Err(());
            }
        }
        if op == abi::OP_READ && drv.wants_read_data() {
            if let Some(slot) = self.driver_reads.get_mut(usize::from(req.head)) {
                *slot = Some(DriverRead {
                    offset,
                    len,
                    iov: self.iov.clone(),
                    _mem: Arc::clone(mem),
                });
            }
        }
        if let Some(b) = &bounce {
            self.iov.clear();
            self.iov.push(libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: len as usize,
            });
        }
        Ok(bounce)
    }

    fn arm_timer(&mut self, until: Instant) {
        let d = until
            .saturating_duration_since(Instant::now())
            .max(Duration::from_nanos(1));
        if let Err(e) = self.timer.reset(d, None) {
            self.log(format_args!("cannot arm the worker's timer: {e}"));
        }
    }

    /// The eventfd-like timer of this worker (deferred requests, wake-ups).
    pub fn timer_fd(&self) -> i32 {
        use std::os::fd::AsRawFd;
        self.timer.as_raw_fd()
    }

    /// Wakes the worker up soon (after an upgrade, or to retry a deferred request).
    pub fn wake(&mut self) {
        self.arm_timer(Instant::now());
    }

    /// Handles the timer: retries a deferred request whose time has come, then goes on
    /// taking requests from the ring.
    pub fn process_timer(&mut self, vring: &Vring) {
        let _ = self.timer.wait();
        if let Some(d) = self.deferred.take() {
            if Instant::now() < d.until {
                self.arm_timer(d.until);
                self.deferred = Some(d);
                return;
            }
            self.in_flight
                .fetch_sub(1, std::sync::atomic::Ordering::Release);
            self.iov = d.iov;
            self.dispatch(&d.req, &d.mem);
            self.flush_replication();
            if let QueueEngine::Uring(u) = &mut self.engine {
                if let Err(e) = u.submit() {
                    self.log(format_args!("io_uring submit failed: {e}"));
                }
            }
        }
        self.process_queue(vring);
    }

    /// Sends the replication frames queued by this batch's requests (one send per replica).
    fn flush_replication(&mut self) {
        if std::mem::take(&mut self.repl_queued) {
            if let Some(r) = &self.repl {
                r.flush();
            }
        }
    }

    fn dispatch(&mut self, req: &Request, mem: &Arc<GuestMem>) {
        if req.is_empty() {
            // Nothing to move: answered here, never sent to the driver image, the engine
            // or the replicas (a replica's fallocate of 0 bytes fails, which would count as
            // a replica fault).
            self.done.push(Completion {
                head: req.head,
                status_addr: Some(req.status),
                status: S_OK,
                used_len: 1,
            });
            return;
        }
        if self.refresh_driver_failed() && req.op != Op::GetId {
            self.fail_now(req);
            return;
        }
        let mut bounce = match self.driver_stage(req, mem) {
            Ok(b) => b,
            Err(()) => return,
        };
        if let Some(repl) = self.repl.clone() {
            if repl.is_fenced() && req.op != Op::GetId {
                self.fail_now(req);
                return;
            }
            if req.op.mutation(req.data_len).is_some() {
                if self
                    .held
                    .get(usize::from(req.head))
                    .is_some_and(Option::is_some)
                {
                    // A guest that reuses a head still in flight: refuse the second request,
                    // leave the first alone (its operation must not be lost).
                    self.log(format_args!(
                        "refused a request whose head {} is still in flight",
                        req.head
                    ));
                    self.fail_now(req);
                    return;
                }
                // One copy of a write's data, for the replicas and the local write alike:
                // the guest may change its buffer while the write is in flight.
                let data = match req.op {
                    Op::Write { .. } => Some(self.stable_copy(req.head, bounce.take())),
                    _ => None,
                };
                let keep = data.clone().map(|d| Box::new(d) as Keep);
                let verdict = repl.begin(
                    self.queue,
                    self.connection,
                    req.head,
                    req.op,
                    data,
                    &mut self.deliveries,
                );
                let mut keep = keep;
                let (op, parked) = match verdict {
                    Begin::Go(op) => (op, None),
                    Begin::Parked(op) => (
                        op,
                        Some(Parked {
                            req: *req,
                            iov: std::mem::take(&mut self.iov),
                            mem: Arc::clone(mem),
                            keep: keep.take(),
                        }),
                    ),
                    Begin::Refused => {
                        self.fail_now(req);
                        return;
                    }
                    Begin::Local => return self.submit_local(req, mem, keep),
                };
                let go = parked.is_none();
                self.repl_queued |= go;
                if let Some(h) = self.held.get_mut(usize::from(req.head)) {
                    *h = Some(Held {
                        op,
                        completion: None,
                        parked,
                    });
                    self.in_flight
                        .fetch_add(1, std::sync::atomic::Ordering::Release);
                }
                if go {
                    self.submit_local(req, mem, keep);
                }
                self.apply_deliveries();
                return;
            }
        }
        self.submit_local(req, mem, bounce.map(|b| Box::new(b) as Keep));
    }

    /// The data of a replicated write, copied once into a buffer of ours that both the
    /// replicas' frames and the local write use (`self.iov` is pointed at it). A driver
    /// image's transformed data (`bounce`) is such a copy already.
    fn stable_copy(&mut self, head: u16, bounce: Option<AlignedBuf>) -> Payload {
        let buf = match bounce {
            Some(b) => b,
            None => {
                let len: usize = self.iov.iter().map(|v| v.iov_len).sum();
                self.charge(head, len);
                let mut b = AlignedBuf::zeroed(len);
                // SAFETY: `iov` was built from guest memory that the caller holds alive for
                // this call; it is only read.
                unsafe { sys::copy_from_guest_buffers_to(&self.iov, b.as_mut_slice()) };
                self.iov.clear();
                self.iov.push(libc::iovec {
                    iov_base: b.as_mut_ptr().cast(),
                    iov_len: len,
                });
                b
            }
        };
        // The bytes stay where they are: the iovec keeps pointing at them.
        Payload::new(buf)
    }

    /// Hands a request to the engine (or completes it at once: GET_ID, the null engine).
    fn submit_local(&mut self, req: &Request, mem: &Arc<GuestMem>, keep: Option<Keep>) {
        let write_through = !self.disk.writeback();
        let complete_now = |used_len| Completion {
            head: req.head,
            status_addr: Some(req.status),
            status: S_OK,
            used_len,
        };
        match (&mut self.engine, req.op) {
            (_, Op::GetId) => {
                let mut id = [0u8; ID_BYTES];
                let serial = self.disk.serial.as_bytes();
                id[..serial.len()].copy_from_slice(serial);
                // SAFETY: `iov` was built from `mem`, which this frame holds alive.
                let n = unsafe { sys::copy_to_guest_buffers(&self.iov, &id) };
                self.done.push(complete_now(n as u32 + 1));
            }
            (QueueEngine::Null, op) => {
                let used = if let Op::Read { .. } = op {
                    // SAFETY: `iov` was built from `mem`, which this frame holds alive.
                    unsafe { sys::zero_guest_buffers(&self.iov) };
                    req.data_len + 1
                } else {
                    1
                };
                self.done.push(complete_now(used));
            }
            (QueueEngine::Uring(u), _) if !u.has_room() => {
                // A parked or deferred request released while the ring is full: it waits
                // for a slot, ahead of anything new (`has_room` stops the popping), and
                // counts as in flight meanwhile.
                self.in_flight
                    .fetch_add(1, std::sync::atomic::Ordering::Release);
                self.overflow.push_back(Parked {
                    req: *req,
                    iov: std::mem::take(&mut self.iov),
                    mem: Arc::clone(mem),
                    keep,
                });
            }
            (QueueEngine::Uring(u), _) => {
                match u.push(req, &mut self.iov, mem, write_through, keep) {
                    Ok(true) => add(&self.disk.stats.queues[self.queue].unaligned_fallbacks, 1),
                    Ok(false) => {}
                    Err(refused) => {
                        self.iov.clear();
                        self.log(format_args!(
                            "io_uring did not take request {}: {}",
                            req.head, refused.why
                        ));
                        self.fail_now(req);
                    }
                }
            }
        }
    }

    /// Whether the attachment's driver image has failed (then every request fails).
    fn refresh_driver_failed(&self) -> bool {
        self.driver.as_ref().is_some_and(|d| d.is_failed())
    }

    /// Picks up a driver image swapped in by an upgrade (at a quiesce point).
    fn refresh_driver(&mut self) {
        let g = self
            .disk
            .driver_generation
            .load(std::sync::atomic::Ordering::Acquire);
        if g != self.driver_generation {
            self.driver_generation = g;
            self.driver = self.disk.driver();
        }
    }

    /// Lets the driver image transform completed reads in place, before the guest sees them.
    fn complete_driver_reads(&mut self) {
        let Some(drv) = self.driver.clone() else {
            return;
        };
        for i in 0..self.done.len() {
            let c = self.done[i];
            let Some(r) = self
                .driver_reads
                .get_mut(usize::from(c.head))
                .and_then(Option::take)
            else {
                continue;
            };
            if c.status != S_OK {
                continue;
            }
            let req = abi::Request {
                op: abi::OP_READ,
                queue: self.queue as u32,
                offset: r.offset,
                len: r.len,
                iov: r.iov.as_ptr(),
                iovcnt: r.iov.len() as u32,
                _reserved: 0,
                bounce: std::ptr::null_mut(),
            };
            if !drv.complete(&req, 0) {
                self.done[i].status = S_IOERR;
                self.done[i].used_len = 1;
                add(&self.disk.stats.queues[self.queue].errors_ioerr, 1);
            }
        }
    }

    fn count(&self, req: &Request) {
        let st = self.stats();
        match req.op {
            Op::Read { .. } => {
                add(&st.reads, 1);
                add(&st.read_bytes, u64::from(req.data_len));
            }
            Op::Write { .. } => {
                add(&st.writes, 1);
                add(&st.write_bytes, u64::from(req.data_len));
            }
            Op::Flush => add(&st.flushes, 1),
            Op::GetId => add(&st.get_ids, 1),
            Op::Discard { .. } => add(&st.discards, 1),
            Op::WriteZeroes { .. } => add(&st.write_zeroes, 1),
        }
    }

    /// Writes status bytes and used entries for every completion, then signals once.
    fn publish(&mut self, state: &mut vhost_user_backend::VringState<GM>, mem: &GuestMem) {
        debug_assert!(!self.repl_queued, "replication frames left unsent");
        self.complete_driver_reads();
        self.hold_replicated();
        if self.done.is_empty() {
            return;
        }
        add(&self.stats().batches, 1);
        // Latency: requests taken in one batch and completed in this one share their start
        // and end, so runs of them are recorded at once (one set of atomic adds per run, not
        // per request).
        {
            let now = Instant::now();
            let metrics = self.disk.metrics.queue(self.queue);
            let mut run: Option<(Instant, OpKind, u64)> = None;
            for c in &self.done {
                let Some(&(t, op)) = self.started.get(usize::from(c.head)) else {
                    continue;
                };
                match &mut run {
                    Some((rt, rop, n)) if *rt == t && *rop == op => *n += 1,
                    _ => {
                        if let Some((rt, rop, n)) = run.take() {
                            let ns = now.saturating_duration_since(rt).as_nanos() as u64;
                            metrics.observe_n(rop, ns, n);
                        }
                        run = Some((t, op, 1));
                    }
                }
            }
            if let Some((rt, rop, n)) = run {
                metrics.observe_n(rop, now.saturating_duration_since(rt).as_nanos() as u64, n);
            }
        }
        for i in 0..self.done.len() {
            let c = self.done[i];
            let h = usize::from(c.head);
            if let Some(a) = self.active.get_mut(h) {
                *a = false;
            }
            if let Some(bytes) = self.charged.get_mut(h) {
                self.charged_total -= std::mem::take(bytes) as usize;
            }
            if let Some(addr) = c.status_addr {
                if let Err(e) = mem.write_obj(c.status, addr) {
                    self.log(format_args!(
                        "cannot write the status byte at {:#x}: {e}",
                        addr.0
                    ));
                }
            }
            let queue = state.get_queue_mut();
            let mut result = Ok(());
            match &self.tracker {
                Some((region, tracker)) => region.with(|m| {
                    tracker.complete(m, c.head, || {
                        result = queue.add_used(mem, c.head, c.used_len);
                        queue.next_used()
                    })
                }),
                None => result = queue.add_used(mem, c.head, c.used_len),
            }
            if let Err(e) = result {
                self.log(format_args!(
                    "cannot add head {} to the used ring: {e}",
                    c.head
                ));
            }
        }
        self.done.clear();
        match state.get_queue_mut().needs_notification(mem) {
            Ok(false) => {}
            Ok(true) | Err(_) => {
                add(&self.stats().notifications, 1);
                if let Err(e) = state.signal_used_queue() {
                    self.log(format_args!("cannot signal the guest: {e}"));
                }
            }
        }
    }

    fn log(&mut self, args: std::fmt::Arguments<'_>) {
        if let Some(suppressed) = self.log_limit.allow() {
            let socket = self.disk.config.socket.display();
            if suppressed > 0 {
                tracing::warn!(disk = %socket, queue = self.queue, suppressed, "{args}");
            } else {
                tracing::warn!(disk = %socket, queue = self.queue, "{args}");
            }
        }
    }
}
