//! Fuzzes descriptor-chain parsing (`request::parse` and `request::parse_head`).
//!
//! Input layout:
//! ```text
//! flags: u8 | qsize: u16 | head: u16 | capacity: u16 | memory image...
//! ```
//! The memory image is copied to guest address 0 (it spans two adjacent regions, so buffers
//! can cross a region boundary; a third region lies past a hole). The descriptor table sits
//! at address 0, so the first bytes of the image are descriptors (`addr: u64 | len: u32 |
//! flags: u16 | next: u16`); any of them may point at an indirect table, a header or a status
//! byte elsewhere in the image, or outside guest memory, or loop.
//!
//! Oracles, besides "no panic": a parsed request's `iovec`s lie inside guest memory and add
//! up to `data_len`; reads and writes are sector-aligned and inside the disk; and the chain
//! popped from the avail ring (virtio-queue's iterator, the live path) parses the same as the
//! one walked from its head (`parse_head`, the resubmit-after-reconnect path).
#![no_main]

use std::sync::OnceLock;

use ferrodisk::request::{
    parse, parse_head, Geometry, GuestMem, Op, Rejected, Request, Scratch, MAX_IOVECS,
};
use libfuzzer_sys::fuzz_target;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueOwnedT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Two adjacent regions, then a hole, then a small third region.
const REGIONS: [(u64, usize); 3] = [(0, 0x8000), (0x8000, 0x8000), (0x2_0000, 0x1000)];
/// The image is copied over the first two regions at most.
const IMAGE_MAX: usize = 0x1_0000;

fn mem() -> &'static GuestMem {
    static MEM: OnceLock<GuestMem> = OnceLock::new();
    MEM.get_or_init(|| {
        let ranges: Vec<_> = REGIONS.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
        GuestMemoryMmap::from_ranges(&ranges).expect("guest memory")
    })
}

/// Zeroes guest memory so that no byte of a previous input survives.
fn clear(mem: &GuestMem) {
    static ZEROS: [u8; 0x8000] = [0; 0x8000];
    for &(addr, len) in &REGIONS {
        mem.write_slice(&ZEROS[..len], GuestAddress(addr))
            .expect("region");
    }
}

/// Checks what a successful parse promises.
fn check_ok(mem: &GuestMem, geo: Geometry, req: &Request, iov: &[libc::iovec]) {
    assert!(iov.len() <= MAX_IOVECS);
    let sum: u64 = iov.iter().map(|v| v.iov_len as u64).sum();
    assert_eq!(sum, u64::from(req.data_len), "iovecs add up to data_len");
    for v in iov {
        let start = v.iov_base as u64;
        let inside = mem.iter().any(|r| {
            let base = r.as_ptr() as u64;
            start >= base && start + v.iov_len as u64 <= base + r.len()
        });
        assert!(
            inside,
            "iovec {start:#x}+{} is outside guest memory",
            v.iov_len
        );
    }
    let cap = geo.capacity_sectors << 9;
    match req.op {
        Op::Read { offset } | Op::Write { offset } => {
            assert_eq!(offset % 512, 0);
            assert_eq!(req.data_len % 512, 0);
            assert!(
                offset + u64::from(req.data_len) <= cap,
                "request beyond the disk"
            );
            if matches!(req.op, Op::Write { .. }) {
                assert!(!geo.readonly);
            }
        }
        Op::Discard { offset, len } | Op::WriteZeroes { offset, len, .. } => {
            assert!(!geo.readonly);
            assert_eq!(req.data_len, 0);
            assert!(offset + len <= cap, "discard beyond the disk");
        }
        Op::GetId => assert!(req.data_len as usize <= 20 && req.data_len > 0),
        Op::Flush => assert_eq!(req.data_len, 0),
    }
}

fn same(a: &Result<Request, Rejected>, b: &Result<Request, Rejected>) -> bool {
    a == b
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 7 {
        return;
    }
    let flags = data[0];
    let qsize_raw = u16::from_le_bytes([data[1], data[2]]);
    let head_raw = u16::from_le_bytes([data[3], data[4]]);
    let cap = u16::from_le_bytes([data[5], data[6]]);
    let image = &data[7..data.len().min(7 + IMAGE_MAX)];
    let geo = Geometry {
        capacity_sectors: if flags & 2 != 0 {
            u64::MAX >> 9
        } else {
            u64::from(cap)
        },
        readonly: flags & 1 != 0,
    };
    let mem = mem();
    clear(mem);
    mem.write_slice(image, GuestAddress(0)).expect("image fits");
    let mut scratch = Scratch::default();
    let mut iov = Vec::with_capacity(MAX_IOVECS);

    if flags & 4 != 0 {
        // The resubmit path alone, with any queue size (not only a power of two).
        let r = parse_head(
            head_raw,
            GuestAddress(0),
            qsize_raw,
            mem,
            geo,
            &mut scratch,
            &mut iov,
        );
        if let Ok(req) = &r {
            check_ok(mem, geo, req, &iov);
        }
        return;
    }

    // The live path: a split queue at address 0 whose avail ring offers `head`. The rings
    // follow the table and overwrite that part of the image.
    let qsize = 1u16 << (qsize_raw % 9);
    let head = head_raw % qsize;
    let q = MockSplitQueue::create(mem, GuestAddress(0), qsize);
    q.avail().ring().ref_at(0).unwrap().store(u16::to_le(head));
    q.avail().idx().store(u16::to_le(1));
    let mut queue: Queue = q.create_queue().expect("valid queue");
    let Some(chain) = queue.iter(mem).expect("queue iterator").next() else {
        return;
    };
    let live = parse(chain, mem, geo, &mut scratch, &mut iov);
    if let Ok(req) = &live {
        check_ok(mem, geo, req, &iov);
    }
    let live_iov: Vec<(usize, usize)> = iov
        .iter()
        .map(|v| (v.iov_base as usize, v.iov_len))
        .collect();
    let resubmit = parse_head(
        head,
        GuestAddress(0),
        qsize,
        mem,
        geo,
        &mut scratch,
        &mut iov,
    );
    let resubmit_iov: Vec<(usize, usize)> = iov
        .iter()
        .map(|v| (v.iov_base as usize, v.iov_len))
        .collect();
    assert!(
        same(&live, &resubmit),
        "the live path and the resubmit path disagree:\n  live:     {live:?}\n  resubmit: {resubmit:?}"
    );
    if live.is_ok() {
        assert_eq!(
            live_iov, resubmit_iov,
            "the two paths build different iovecs"
        );
    }
});
