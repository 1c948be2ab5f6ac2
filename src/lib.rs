//! Ferrodisk: a vhost-user-blk backend with an io_uring engine.
//!
//! The data path, front to back (see `docs/architecture.md`):
//!
//! - [`server`]: one listening socket per disk; one vhost-user connection at a time.
//! - [`backend`]: the vhost-user device (features, config space, one thread per queue).
//! - [`worker`]: per-queue batching: pop chains, parse, submit, complete, notify.
//! - [`request`]: descriptor chain → validated [`request::Request`] with guest `iovec`s.
//! - [`engine`]: io_uring (files and block devices) or null.
//! - [`disk`]: backing, geometry, cache mode and [`stats`].
//!
//! Later pipeline stages (replication, driver images) sit between `worker` and `engine`:
//! they see validated requests and hand them on. `unsafe` code lives in [`sys`],
//! [`seccomp`] and [`engine::uring`] only. [`seccomp`] confines the queue workers and the
//! replica server's threads to the system calls they need.

pub mod api;
pub mod backend;
pub mod buf;
pub mod config;
pub mod disk;
pub mod driver;
pub mod engine;
pub mod inflight;
pub mod metrics;
pub mod proxy;
pub mod repl;
pub mod request;
pub mod seccomp;
pub mod server;
pub mod stats;
pub mod sys;
pub mod virtio_blk;
pub mod worker;
