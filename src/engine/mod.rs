//! Engines: where validated requests turn into I/O.
//!
//! Each queue worker owns one engine instance ([`QueueEngine`]); nothing here is shared
//! between queues, so the per-request path takes no lock. An engine either completes a
//! request at once (null engine, GET_ID) or accepts it into a fixed-size in-flight table and
//! reports it later through [`Completion`]s (io_uring).

pub mod null;
pub mod uring;

use vm_memory::GuestAddress;

/// A finished request, ready for the used ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub head: u16,
    /// Where to write the status byte; `None` for a chain without one.
    pub status_addr: Option<GuestAddress>,
    pub status: u8,
    /// Bytes written into device-writable buffers, status byte included.
    pub used_len: u32,
}

/// The engine of one queue.
pub enum QueueEngine {
    Uring(Box<uring::UringQueue>),
    Null,
}
