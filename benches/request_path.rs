//! Micro-benchmarks of the per-request path, without a frontend or a kernel in the way:
//!
//! - `parse`: pop and parse a 3-descriptor read chain (header, 4 KiB data, status), iovecs
//!   included;
//! - `complete`: write the status and a used-ring entry for 32 requests, then decide on one
//!   notification;
//! - `worker_null`: the whole worker batch on the null engine (pop, parse, dispatch,
//!   complete, notify) for 32 requests;
//! - `repl_machine`: the replication state machine's share of one replicated write (admit
//!   it with write ordering and the activity log, its local completion, two replica
//!   acknowledgements) with 32 writes in flight: `spread` puts every write in its own
//!   region (the ordering check's fast path only), `random` is 4 KiB at random offsets of
//!   256 MiB as `benches/replication.sh` writes (writes often share a region with another
//!   one in flight, and the overlap scan runs; none overlaps).
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

/// A serving state machine with two in-sync replicas, driven by hand.
struct Machine {
    core: ferrodisk::repl::machine::Core,
    conns: [u64; 2],
    now: u64,
}

impl Machine {
    fn new() -> Machine {
        use ferrodisk::repl::bitmap::{DirtyMap, Tag};
        use ferrodisk::repl::machine::{Action, Core, CoreConfig, LinkInit};
        const UUID: &str = "0123456789abcdef0123456789abcdef";
        let disk = 1u64 << 30;
        let tag = Tag {
            uuid: UUID.into(),
            gen: 7,
        };
        let link = |a: &str| LinkInit {
            addr: a.into(),
            in_sync: true,
            bitmap: Some((DirtyMap::in_memory(disk, 1 << 20), tag.clone())),
        };
        let mut out = Vec::new();
        let mut core = Core::new(
            CoreConfig::new("v", UUID, 3, disk, 1 << 20),
            vec![link("a"), link("b")],
            Some(DirtyMap::in_memory(disk, 1 << 20)),
            0,
            &mut out,
        );
        let mut conns = [0; 2];
        for a in std::mem::take(&mut out) {
            if let Action::Connect { link, conn } = a {
                conns[link] = conn;
                core.on_open(0, link, conn, Ok(tag.clone()), &mut Vec::new());
            }
        }
        let mut m = Machine {
            core,
            conns,
            now: 1,
        };
        m.warm(disk);
        m
    }

    /// Steady state: every region is in the stored activity log (one write each, the log
    /// stored, the writes completed).
    fn warm(&mut self, disk: u64) {
        use ferrodisk::repl::machine::{Action, Frame, Mutation, OpDesc, Reply};
        let data = ferrodisk::buf::Payload::new(vec![0u8; 512]);
        let mut out = Vec::new();
        for r in 0..disk >> 20 {
            let d = OpDesc {
                queue: 0,
                conn: 1,
                head: 0,
                offset: r << 20,
                len: 512,
                kind: Mutation::Write {
                    crc: 0,
                    data: data.clone(),
                },
            };
            let id = match self.core.begin(self.now, d, &mut out) {
                ferrodisk::repl::machine::Verdict::Go(id)
                | ferrodisk::repl::machine::Verdict::Parked(id) => id,
                v => panic!("{v:?}"),
            };
            let mut pending = std::mem::take(&mut out);
            while let Some(a) = pending.pop() {
                match a {
                    Action::StoreActivity { gen, .. } => {
                        self.core.on_activity_stored(self.now, gen, true, &mut out)
                    }
                    Action::Send {
                        link,
                        frame: Frame::Write { seq, .. },
                        ..
                    } => {
                        let c = self.conns[link];
                        self.core.local_done(self.now, id, true, &mut Vec::new());
                        self.core
                            .on_reply(self.now, link, c, Reply::Ack { seq }, &mut Vec::new());
                    }
                    _ => {}
                }
                pending.append(&mut out);
            }
        }
    }

    /// Admits a write; returns its id and the (link, seq) of its frames.
    fn begin(
        &mut self,
        head: u16,
        offset: u64,
        data: &ferrodisk::buf::Payload,
        out: &mut Vec<ferrodisk::repl::machine::Action>,
    ) -> (ferrodisk::repl::machine::OpId, [(usize, u64); 2]) {
        use ferrodisk::repl::machine::{Action, Frame, Mutation, OpDesc, Verdict};
        self.now += 1;
        let d = OpDesc {
            queue: 0,
            conn: 1,
            head,
            offset,
            len: data.len() as u64,
            kind: Mutation::Write {
                crc: 0,
                data: data.clone(),
            },
        };
        let Verdict::Go(id) = self.core.begin(self.now, d, out) else {
            panic!("non-overlapping writes in the activity log go at once")
        };
        let mut seqs = [(0, 0); 2];
        let mut n = 0;
        for a in out.drain(..) {
            if let Action::Send {
                link,
                frame: Frame::Write { seq, .. },
                ..
            } = a
            {
                seqs[n] = (link, seq);
                n += 1;
            }
        }
        (id, seqs)
    }

    fn finish(
        &mut self,
        id: ferrodisk::repl::machine::OpId,
        seqs: [(usize, u64); 2],
        out: &mut Vec<ferrodisk::repl::machine::Action>,
    ) {
        use ferrodisk::repl::machine::Reply;
        self.core.local_done(self.now, id, true, out);
        for (link, seq) in seqs {
            self.core
                .on_reply(self.now, link, self.conns[link], Reply::Ack { seq }, out);
        }
        out.clear();
    }
}

fn repl_machine(c: &mut Criterion) {
    let data = ferrodisk::buf::Payload::new(vec![0u8; 4096]);
    let mut g = c.benchmark_group("repl_machine");
    g.throughput(Throughput::Elements(1));
    for (name, spread) in [("spread", true), ("random", false)] {
        let mut m = Machine::new();
        let mut out = Vec::new();
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next_offset = move |i: u64| {
            if spread {
                (i % 1024) << 20
            } else {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                (rng % 65536) * 4096
            }
        };
        // 32 writes in flight, never overlapping one another; each iteration retires the
        // oldest and admits a new one.
        let mut ring = std::collections::VecDeque::new();
        let mut i = 0u64;
        let mut admit =
            |m: &mut Machine, ring: &mut std::collections::VecDeque<_>, out: &mut Vec<_>| loop {
                i += 1;
                let off = next_offset(i);
                if ring.iter().any(|&(o, _, _)| o == off) {
                    continue;
                }
                let (id, seqs) = m.begin((i % 256) as u16, off, &data, out);
                ring.push_back((off, id, seqs));
                return;
            };
        for _ in 0..32 {
            admit(&mut m, &mut ring, &mut out);
        }
        g.bench_function(name, |b| {
            b.iter(|| {
                let (_, id, seqs) = ring.pop_front().unwrap();
                m.finish(id, seqs, &mut out);
                admit(&mut m, &mut ring, &mut out);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, parse, complete, worker_null, repl_machine);
criterion_main!(benches);
