//! Micro-benchmarks of the per-request path, without a frontend or a kernel in the way:
//!
//! - `parse`: pop and parse a 3-descriptor read chain (header, 4 KiB data, status), iovecs
//!   included;
//! - `complete`: write the status and a used-ring entry for 32 requests, then decide on one
//!   notification;
//! - `worker_null`: the whole worker batch on the null engine (pop, parse, dispatch,
//!   complete, notify) for 32 requests.
//!
//! Run with `cargo bench --bench request_path`. These count instructions more than
//! anything: compare runs on the same machine, before and after a change.

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ferrodisk::config::DiskConfig;
use ferrodisk::disk::Disk;
use ferrodisk::request::{self, Geometry, GuestMem, Scratch};
use ferrodisk::worker::{QueueWorker, Vring};
use vhost_user_backend::VringT;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

const QSIZE: u16 = 256;
const BATCH: u16 = 32;

fn memory() -> GuestMem {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap()
}

/// Writes BATCH read chains (3 descriptors each) and fills the whole avail ring with their
/// heads, so any window of BATCH consecutive avail entries is a valid batch.
fn fill_queue(mem: &GuestMem, vq: &MockSplitQueue<GuestMem>) {
    for c in 0..BATCH {
        let base = 0x100_0000 + u64::from(c) * 0x2000;
        let head = c * 3;
        mem.write_obj(0u32, GuestAddress(base)).unwrap(); // VIRTIO_BLK_T_IN
        mem.write_obj(u64::from(c) * 8, GuestAddress(base + 8))
            .unwrap();
        let descs = [
            Descriptor::new(base, 16, VRING_DESC_F_NEXT as u16, head + 1),
            Descriptor::new(
                base + 0x1000,
                4096,
                (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16,
                head + 2,
            ),
            Descriptor::new(base + 0x20, 1, VRING_DESC_F_WRITE as u16, 0),
        ];
        for (i, d) in descs.iter().enumerate() {
            vq.desc_table()
                .store(head + i as u16, RawDescriptor::from(*d))
                .unwrap();
        }
    }
    for i in 0..QSIZE {
        vq.avail()
            .ring()
            .ref_at(usize::from(i))
            .unwrap()
            .store((i % BATCH) * 3);
    }
}

fn parse(c: &mut Criterion) {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    fill_queue(&mem, &vq);
    vq.avail().idx().store(BATCH);
    let mut q: Queue = vq.create_queue().unwrap();
    let geo = Geometry {
        capacity_sectors: 1 << 21,
        readonly: false,
    };
    let mut scratch = Scratch::default();
    let mut iov = Vec::with_capacity(64);
    let mut g = c.benchmark_group("parse");
    g.throughput(Throughput::Elements(u64::from(BATCH)));
    g.bench_function("read_3desc_x32", |b| {
        b.iter(|| {
            q.set_next_avail(0);
            let mut iter = q.iter(&mem).unwrap();
            for chain in iter.by_ref() {
                let r = request::parse(chain, &mem, geo, &mut scratch, &mut iov).unwrap();
                std::hint::black_box(r);
            }
        })
    });
    g.finish();
}

fn complete(c: &mut Criterion) {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    let mut q: Queue = vq.create_queue().unwrap();
    let mut g = c.benchmark_group("complete");
    g.throughput(Throughput::Elements(u64::from(BATCH)));
    g.bench_function("status_and_used_x32", |b| {
        b.iter(|| {
            for i in 0..BATCH {
                mem.write_obj(0u8, GuestAddress(0x100_0020 + u64::from(i) * 0x2000))
                    .unwrap();
                q.add_used(&mem, i * 3, 4097).unwrap();
            }
            std::hint::black_box(q.needs_notification(&mem).unwrap());
        })
    });
    g.finish();
}

fn worker_null(c: &mut Criterion) {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    fill_queue(&mem, &vq);
    let atomic = GuestMemoryAtomic::new(mem.clone());
    let vring = Vring::new(atomic.clone(), QSIZE).unwrap();
    vring.set_queue_size(QSIZE);
    vring
        .set_queue_info(vq.desc_table_addr().0, vq.avail_addr().0, vq.used_addr().0)
        .unwrap();
    vring.set_queue_event_idx(true);
    vring.set_queue_ready(true);
    vring.set_enabled(true);
    let disk = Arc::new(
        Disk::open(DiskConfig::parse("engine=null,size=1G,socket=/nonexistent").unwrap()).unwrap(),
    );
    let mut w = QueueWorker::new(
        disk,
        0,
        atomic,
        Arc::new(AtomicUsize::new(0)),
        Default::default(),
        Default::default(),
    )
    .unwrap();
    let mut avail = 0u16;
    let mut g = c.benchmark_group("worker_null");
    g.throughput(Throughput::Elements(u64::from(BATCH)));
    g.bench_function("batch_x32", |b| {
        b.iter(|| {
            avail = avail.wrapping_add(BATCH);
            vq.avail().idx().store(avail);
            w.process_queue(&vring);
        })
    });
    g.finish();
}

criterion_group!(benches, parse, complete, worker_null);
criterion_main!(benches);
