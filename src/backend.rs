//! The vhost-user front: a [`VhostUserBackend`] for one disk and one frontend connection.
//!
//! vhost-user-backend runs one worker thread per entry of `queues_per_thread`; we give each
//! queue its own thread, and each thread its own [`QueueWorker`] behind a mutex that only
//! that thread takes on the I/O path (the frontend-message thread takes it only to stop or
//! drain a queue). The engine's completion eventfd is registered in the same epoll as the
//! queue's kick, under the event id [`completion_event`].

use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::VhostUserBackend;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::disk::Disk;
use crate::engine::uring::UringError;
use crate::proxy::InflightSlot;
use crate::stats::RateLimit;
use crate::virtio_blk::{self, CONFIG_LEN, CONFIG_WRITEBACK_OFFSET};
use crate::worker::{QueueWorker, Vring, GM};

/// Epoll event id of a worker's completion eventfd: queue events use ids `0..num_queues` and
/// the library reserves `num_queues` itself.
pub fn completion_event(num_queues: usize) -> u64 {
    num_queues as u64 + 1
}

/// How long stopping a queue waits for in-flight requests before giving up.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

pub struct BlkBackend {
    disk: Arc<Disk>,
    workers: Vec<Mutex<QueueWorker>>,
    in_flight: Vec<Arc<AtomicUsize>>,
    stop: Arc<AtomicBool>,
    /// The guest may toggle the write cache as often as it likes: its log line is limited.
    config_log: Mutex<RateLimit>,
    /// The exit eventfds' consumer ends handed to vhost-user-backend, which turns each into
    /// a raw fd for its epoll and never closes it: closed when this connection's backend
    /// goes (after the daemon and its handlers, which hold it).
    exit_fds: Mutex<Vec<std::os::fd::RawFd>>,
}

impl Drop for BlkBackend {
    fn drop(&mut self) {
        let fds = std::mem::take(self.exit_fds.get_mut().unwrap_or_else(|p| p.into_inner()));
        for fd in fds {
            // SAFETY: `fd` is the consumer end `exit_event` handed out; the library gave up
            // ownership of it (`into_raw_fd`) and its epoll handlers, which registered it,
            // hold this backend, so they are gone now; nothing uses or closes it but us.
            unsafe { crate::sys::close_abandoned_fd(fd) };
        }
    }
}

impl BlkBackend {
    /// Creates the workers (and their rings) for one frontend connection.
    pub fn new(disk: Arc<Disk>, mem: GM, inflight: Arc<InflightSlot>) -> Result<Self, UringError> {
        let n = usize::from(disk.config.queues);
        let stop = Arc::new(AtomicBool::new(false));
        if let Some(r) = disk.repl.get() {
            r.new_connection();
        }
        let in_flight: Vec<_> = (0..n).map(|_| Arc::new(AtomicUsize::new(0))).collect();
        let workers = (0..n)
            .map(|q| {
                QueueWorker::new(
                    Arc::clone(&disk),
                    q,
                    mem.clone(),
                    Arc::clone(&in_flight[q]),
                    Arc::clone(&inflight),
                    Arc::clone(&stop),
                )
                .map(Mutex::new)
            })
            .collect::<Result<_, _>>()?;
        Ok(BlkBackend {
            disk,
            workers,
            in_flight,
            stop,
            config_log: Mutex::new(RateLimit::new(5, Duration::from_secs(60))),
            exit_fds: Mutex::new(Vec::new()),
        })
    }

    fn worker(&self, q: usize) -> MutexGuard<'_, QueueWorker> {
        // A poisoned lock means a worker panicked; its state is still consistent enough to
        // drain, so keep going rather than take the daemon down.
        self.workers[q].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The completion eventfd of each worker thread (`None` for the null engine).
    pub fn completion_fds(&self) -> Vec<Option<i32>> {
        (0..self.workers.len())
            .map(|q| self.worker(q).completion_fd())
            .collect()
    }

    /// Each worker's timer (deferred requests, wake-ups).
    pub fn timer_fds(&self) -> Vec<i32> {
        (0..self.workers.len())
            .map(|q| self.worker(q).timer_fd())
            .collect()
    }

    /// Makes every worker look at its ring again soon (after a pause).
    pub fn wake_all(&self) {
        for q in 0..self.workers.len() {
            self.worker(q).wake();
        }
    }

    /// Waits until no worker is in the middle of a batch (each lock taken once).
    pub fn barrier(&self) {
        for q in 0..self.workers.len() {
            drop(self.worker(q));
        }
    }

    pub fn num_queues_usize(&self) -> usize {
        self.workers.len()
    }

    /// Stops taking requests from the rings and waits (bounded) until every request already
    /// taken has completed into the used ring. Used before a graceful disconnect, so the
    /// frontend's view of the ring (its used index) is exactly what was consumed, even for
    /// frontends without inflight tracking.
    pub fn quiesce(&self, timeout: Duration) -> bool {
        self.stop.store(true, Ordering::Release);
        // A worker may be between its stop check and its last pop: taking each worker's
        // lock once waits for any batch in progress to finish.
        for q in 0..self.workers.len() {
            drop(self.worker(q));
        }
        self.wait_idle(timeout)
    }

    /// Requests in flight on all queues.
    pub fn in_flight(&self) -> usize {
        self.in_flight
            .iter()
            .map(|c| c.load(Ordering::Acquire))
            .sum()
    }

    /// Waits (bounded) until no request is in flight. Worker threads keep reaping meanwhile.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.in_flight() > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.disk.config.queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.disk.config.queue_size)
    }

    fn features(&self) -> u64 {
        virtio_blk::features(self.disk.config.readonly, self.disk.config.queues)
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        let f = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            // A channel to the frontend, for config-change messages (live resize).
            | VhostUserProtocolFeatures::BACKEND_REQ;
        // The relay in front of the library answers the inflight messages (see `proxy`).
        if self.disk.config.inflight {
            f | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        } else {
            f
        }
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The library sets EVENT_IDX on each queue; `needs_notification` honours it.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let bytes = self.disk.config_space().to_bytes();
        let start = (offset as usize).min(CONFIG_LEN);
        let end = (offset as usize)
            .saturating_add(size as usize)
            .min(CONFIG_LEN);
        let mut out = bytes[start..end].to_vec();
        out.resize(size as usize, 0);
        out
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        let start = offset as usize;
        if start <= CONFIG_WRITEBACK_OFFSET && CONFIG_WRITEBACK_OFFSET < start + buf.len() {
            let on = buf[CONFIG_WRITEBACK_OFFSET - start] != 0;
            if on != self.disk.writeback() {
                let allowed = self
                    .config_log
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .allow();
                if let Some(suppressed) = allowed {
                    let mode = if on { "writeback" } else { "writethrough" };
                    tracing::info!(disk = %self.disk.config.socket.display(), suppressed, "guest set the write cache to {mode}");
                }
            }
            self.disk.set_writeback(on);
            return Ok(());
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "only the writeback field of the config space is writable",
        ))
    }

    fn update_memory(&self, _mem: GM) -> io::Result<()> {
        // Workers hold a clone of the same `GuestMemoryAtomic`, which the library updates in
        // place; each batch takes a fresh snapshot of it.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.workers.len()).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (consumer, notifier) =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()?;
        self.exit_fds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(std::os::fd::AsRawFd::as_raw_fd(&consumer));
        Some((consumer, notifier))
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let Some(count) = self.in_flight.get(queue_index as usize) else {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "no such queue"));
        };
        let deadline = Instant::now() + STOP_TIMEOUT;
        while count.load(Ordering::Acquire) > 0 {
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "in-flight requests did not complete",
                ));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        // Before this thread looks at a guest request: its filter (once per thread).
        crate::seccomp::enter_or_exit(crate::seccomp::Role::QueueWorker);
        let Some(vring) = vrings.first() else {
            return Ok(());
        };
        let mut worker = self.worker(thread_id);
        if device_event == 0 {
            worker.process_queue(vring);
        } else if u64::from(device_event) == completion_event(self.workers.len()) {
            worker.process_completions(vring);
        } else if u64::from(device_event) == completion_event(self.workers.len()) + 1 {
            worker.process_replica_acks(vring);
        } else if u64::from(device_event) == completion_event(self.workers.len()) + 2 {
            worker.process_timer(vring);
        }
        worker.poll(vring);
        // Never return an error for what a guest did: an error ends the worker thread.
        Ok(())
    }
}
