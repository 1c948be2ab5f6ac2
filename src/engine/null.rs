//! The null engine: no I/O at all. Reads return zeros and writes are dropped, so a benchmark
//! against it measures the vhost-user path itself (like qemu-storage-daemon's `null-co`).
//! It has no state: the worker completes null requests at once (see `worker::dispatch`).
