//! Replication: writes forwarded to remote replica servers, epoch fencing through an
//! authority, dirty-region tracking and resync. See `docs/replication.md`.

pub mod authority;
pub mod bitmap;
pub mod etcd;
pub mod machine;
pub mod primary;
pub mod replica;
pub mod tools;
pub mod wire;
