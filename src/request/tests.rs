use proptest::prelude::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;

const MEM_SIZE: u64 = 0x100_0000;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
const W: u16 = VRING_DESC_F_WRITE as u16;

fn mem() -> GuestMem {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

fn header(mem: &GuestMem, at: u64, req_type: u32, sector: u64) {
    mem.write_obj(req_type.to_le(), GuestAddress(at)).unwrap();
    mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
    mem.write_obj(sector.to_le(), GuestAddress(at + 8)).unwrap();
}

const GEO: Geometry = Geometry {
    capacity_sectors: 2048,
    readonly: false,
};

fn run(
    mem: &GuestMem,
    descs: &[RawDescriptor],
    geo: Geometry,
) -> (Result<Request, Rejected>, Vec<libc::iovec>) {
    let q = MockSplitQueue::new(mem, 16);
    let chain = q.build_desc_chain(descs).unwrap();
    let mut iov = Vec::new();
    let r = parse(chain, mem, geo, &mut Scratch::default(), &mut iov);
    (r, iov)
}

fn err(r: Result<Request, Rejected>) -> ParseError {
    r.unwrap_err().error
}

#[test]
fn read_with_separate_descriptors() {
    let m = mem();
    header(&m, HDR, T_IN, 8);
    let (r, iov) = run(
        &m,
        &[desc(HDR, 16, 0), desc(DATA, 4096, W), desc(STATUS, 1, W)],
        GEO,
    );
    let r = r.unwrap();
    assert_eq!(r.op, Op::Read { offset: 4096 });
    assert_eq!(r.data_len, 4096);
    assert_eq!(r.status, GuestAddress(STATUS));
    assert_eq!(iov.len(), 1);
    assert_eq!(iov[0].iov_len, 4096);
    assert_eq!(
        iov[0].iov_base as u64,
        m.get_host_address(GuestAddress(DATA)).unwrap() as u64
    );
}

#[test]
fn write_with_two_segments() {
    let m = mem();
    header(&m, HDR, T_OUT, 0);
    let (r, iov) = run(
        &m,
        &[
            desc(HDR, 16, 0),
            desc(DATA, 512, 0),
            desc(DATA + 8192, 1024, 0),
            desc(STATUS, 1, W),
        ],
        GEO,
    );
    assert_eq!(r.unwrap().op, Op::Write { offset: 0 });
    assert_eq!(
        iov.iter().map(|v| v.iov_len).collect::<Vec<_>>(),
        vec![512, 1024]
    );
}

#[test]
fn any_layout_header_with_data_and_data_with_status() {
    let m = mem();
    header(&m, HDR, T_OUT, 1);
    let (r, iov) = run(&m, &[desc(HDR, 16 + 512, 0), desc(STATUS, 1, W)], GEO);
    assert_eq!(r.unwrap().op, Op::Write { offset: 512 });
    assert_eq!(iov[0].iov_len, 512);
    header(&m, HDR, T_IN, 1);
    let (r, iov) = run(&m, &[desc(HDR, 16, 0), desc(DATA, 513, W)], GEO);
    let r = r.unwrap();
    assert_eq!(r.status, GuestAddress(DATA + 512));
    assert_eq!(iov[0].iov_len, 512);
}

#[test]
fn malformed_chains() {
    let m = mem();
    header(&m, HDR, T_IN, 0);
    assert_eq!(
        err(run(&m, &[desc(HDR, 8, 0), desc(STATUS, 1, W)], GEO).0),
        ParseError::HeaderTooShort(8)
    );
    let (r, _) = run(&m, &[desc(HDR, 16, 0), desc(STATUS, 1, 0)], GEO);
    assert_eq!(
        r.unwrap_err(),
        Rejected {
            head: 0,
            status: None,
            error: ParseError::NoStatus
        }
    );
    assert_eq!(
        err(run(&m, &[desc(HDR, 16, 0), desc(STATUS, 0, W)], GEO).0),
        ParseError::NoStatus
    );
    assert_eq!(
        err(run(
            &m,
            &[
                desc(HDR, 16, 0),
                desc(DATA, 512, W),
                desc(DATA, 512, 0),
                desc(STATUS, 1, W)
            ],
            GEO
        )
        .0),
        ParseError::ReadableAfterWritable
    );
    // A read with device-readable data, and a write with device-writable data.
    assert_eq!(
        err(run(
            &m,
            &[desc(HDR, 16, 0), desc(DATA, 512, 0), desc(STATUS, 1, W)],
            GEO
        )
        .0),
        ParseError::WrongDirection(T_IN)
    );
    header(&m, HDR, T_OUT, 0);
    assert_eq!(
        err(run(
            &m,
            &[desc(HDR, 16, 0), desc(DATA, 512, W), desc(STATUS, 1, W)],
            GEO
        )
        .0),
        ParseError::WrongDirection(T_OUT)
    );
}

#[test]
fn range_alignment_and_read_only() {
    let m = mem();
    header(&m, HDR, T_IN, 2047);
    assert!(run(
        &m,
        &[desc(HDR, 16, 0), desc(DATA, 512, W), desc(STATUS, 1, W)],
        GEO
    )
    .0
    .is_ok());
    assert!(matches!(
        err(run(
            &m,
            &[desc(HDR, 16, 0), desc(DATA, 1024, W), desc(STATUS, 1, W)],
            GEO
        )
        .0),
        ParseError::OutOfRange { .. }
    ));
    header(&m, HDR, T_IN, u64::MAX);
    assert!(matches!(
        err(run(
            &m,
            &[desc(HDR, 16, 0), desc(DATA, 512, W), desc(STATUS, 1, W)],
            GEO
        )
        .0),
        ParseError::OutOfRange { .. }
    ));
    header(&m, HDR, T_IN, 0);
    assert_eq!(
        err(run(
            &m,
            &[desc(HDR, 16, 0), desc(DATA, 100, W), desc(STATUS, 1, W)],
            GEO
        )
        .0),
        ParseError::UnalignedLength(100)
    );
    header(&m, HDR, T_OUT, 0);
    let ro = Geometry {
        readonly: true,
        ..GEO
    };
    let (r, _) = run(
        &m,
        &[desc(HDR, 16, 0), desc(DATA, 512, 0), desc(STATUS, 1, W)],
        ro,
    );
    let rej = r.unwrap_err();
    assert_eq!(rej.error, ParseError::ReadOnly);
    assert_eq!(rej.error.status(), Some(S_IOERR));
    assert_eq!(rej.status, Some(GuestAddress(STATUS)));
    // Flush on a read-only disk is fine.
    header(&m, HDR, T_FLUSH, 0);
    assert_eq!(
        run(&m, &[desc(HDR, 16, 0), desc(STATUS, 1, W)], ro)
            .0
            .unwrap()
            .op,
        Op::Flush
    );
}

#[test]
fn unknown_type_is_unsupported() {
    let m = mem();
    header(&m, HDR, 99, 0);
    let e = err(run(&m, &[desc(HDR, 16, 0), desc(STATUS, 1, W)], GEO).0);
    assert_eq!(e, ParseError::UnknownType(99));
    assert_eq!(e.status(), Some(S_UNSUPP));
}

#[test]
fn address_outside_guest_memory() {
    let m = mem();
    header(&m, HDR, T_IN, 0);
    let e = err(run(
        &m,
        &[
            desc(HDR, 16, 0),
            desc(MEM_SIZE + 4096, 512, W),
            desc(STATUS, 1, W),
        ],
        GEO,
    )
    .0);
    assert_eq!(e, ParseError::BadAddress(MEM_SIZE + 4096));
    // Straddling the end of memory is just as bad.
    let e = err(run(
        &m,
        &[
            desc(HDR, 16, 0),
            desc(MEM_SIZE - 512, 1024, W),
            desc(STATUS, 1, W),
        ],
        GEO,
    )
    .0);
    assert!(matches!(e, ParseError::BadAddress(_)), "{e:?}");
    // A header outside memory.
    let e = err(run(&m, &[desc(MEM_SIZE + 16, 16, 0), desc(STATUS, 1, W)], GEO).0);
    assert!(matches!(e, ParseError::BadAddress(_)), "{e:?}");
}

fn segment(m: &GuestMem, at: u64, sector: u64, sectors: u32, flags: u32) {
    m.write_obj(sector.to_le(), GuestAddress(at)).unwrap();
    m.write_obj(sectors.to_le(), GuestAddress(at + 8)).unwrap();
    m.write_obj(flags.to_le(), GuestAddress(at + 12)).unwrap();
}

#[test]
fn discard_and_write_zeroes_segments() {
    let m = mem();
    header(&m, HDR, T_DISCARD, 0);
    segment(&m, DATA, 8, 16, 0);
    let chain = [desc(HDR, 16, 0), desc(DATA, 16, 0), desc(STATUS, 1, W)];
    assert_eq!(
        run(&m, &chain, GEO).0.unwrap().op,
        Op::Discard {
            offset: 4096,
            len: 8192
        }
    );
    segment(&m, DATA, 8, 16, 1);
    assert_eq!(err(run(&m, &chain, GEO).0), ParseError::BadSegmentFlags(1));
    header(&m, HDR, T_WRITE_ZEROES, 0);
    assert_eq!(
        run(&m, &chain, GEO).0.unwrap().op,
        Op::WriteZeroes {
            offset: 4096,
            len: 8192,
            unmap: true
        }
    );
    segment(&m, DATA, 2040, 16, 0);
    assert!(matches!(
        err(run(&m, &chain, GEO).0),
        ParseError::OutOfRange { .. }
    ));
    let two = [desc(HDR, 16, 0), desc(DATA, 32, 0), desc(STATUS, 1, W)];
    assert_eq!(err(run(&m, &two, GEO).0), ParseError::BadSegmentCount(32));
    let ro = Geometry {
        readonly: true,
        ..GEO
    };
    segment(&m, DATA, 0, 1, 0);
    assert_eq!(err(run(&m, &chain, ro).0), ParseError::ReadOnly);
}

#[test]
fn get_id() {
    let m = mem();
    header(&m, HDR, T_GET_ID, 0);
    let (r, iov) = run(
        &m,
        &[desc(HDR, 16, 0), desc(DATA, 20, W), desc(STATUS, 1, W)],
        GEO,
    );
    assert_eq!(r.unwrap().op, Op::GetId);
    assert_eq!(iov[0].iov_len, 20);
    assert_eq!(
        err(run(&m, &[desc(HDR, 16, 0), desc(STATUS, 1, W)], GEO).0),
        ParseError::NoIdBuffer
    );
}

#[test]
fn indirect_descriptors() {
    let m = mem();
    header(&m, HDR, T_IN, 4);
    let table = 0x40_0000u64;
    let entries = [
        SplitDescriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 1),
        SplitDescriptor::new(
            DATA,
            2048,
            (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16,
            2,
        ),
        SplitDescriptor::new(STATUS, 1, W, 0),
    ];
    for (i, e) in entries.iter().enumerate() {
        m.write_obj(RawDescriptor::from(*e), GuestAddress(table + 16 * i as u64))
            .unwrap();
    }
    let (r, iov) = run(&m, &[desc(table, 48, VRING_DESC_F_INDIRECT as u16)], GEO);
    let r = r.unwrap();
    assert_eq!(r.op, Op::Read { offset: 2048 });
    assert_eq!(iov[0].iov_len, 2048);
}

fn arb_desc() -> impl Strategy<Value = (u64, u32, bool)> {
    (
        prop_oneof![
            HDR..HDR + 0x1000,
            DATA..DATA + 0x1000,
            (MEM_SIZE - 0x800)..(MEM_SIZE + 0x800),
            Just(u64::MAX - 4)
        ],
        prop_oneof![0u32..64, Just(512), Just(4096), 0u32..0x2000],
        any::<bool>(),
    )
}

proptest! {
    /// Whatever the guest puts in a chain, parsing never panics, and what it accepts is
    /// within the disk and within guest memory, with iovecs adding up to the data length.
    #[test]
    fn random_chains_are_safe(
        descs in prop::collection::vec(arb_desc(), 1..8),
        req_type in prop_oneof![Just(T_IN), Just(T_OUT), Just(T_FLUSH), Just(T_GET_ID), Just(T_DISCARD), Just(T_WRITE_ZEROES), 0u32..20],
        sector in prop_oneof![0u64..2100, Just(u64::MAX)],
        seg in (0u64..2100, 0u32..64, 0u32..3),
        readonly in any::<bool>(),
    ) {
        let m = mem();
        header(&m, HDR, req_type, sector);
        segment(&m, HDR + 16, seg.0, seg.1, seg.2);
        let raw: Vec<RawDescriptor> = descs.iter().map(|&(a, l, w)| desc(a, l, if w { W } else { 0 })).collect();
        let geo = Geometry { capacity_sectors: 2048, readonly };
        let (r, iov) = run(&m, &raw, geo);
        match r {
            Ok(req) => {
                let total: usize = iov.iter().map(|v| v.iov_len).sum();
                prop_assert_eq!(total as u32, req.data_len);
                let base = m.get_host_address(GuestAddress(0)).unwrap() as u64;
                for v in &iov {
                    prop_assert!(v.iov_base as u64 >= base && v.iov_base as u64 + v.iov_len as u64 <= base + MEM_SIZE);
                }
                let last = descs.last().unwrap();
                prop_assert!(last.2 && last.1 > 0);
                match req.op {
                    Op::Read { offset } | Op::Write { offset } => {
                        prop_assert!(offset + u64::from(req.data_len) <= 2048 * 512);
                        prop_assert_eq!(req.data_len % 512, 0);
                        let is_write = matches!(req.op, Op::Write { .. });
                        prop_assert!(!(readonly && is_write));
                    }
                    Op::Discard { offset, len } | Op::WriteZeroes { offset, len, .. } => {
                        prop_assert!(!readonly);
                        prop_assert!(offset + len <= 2048 * 512);
                    }
                    Op::GetId => prop_assert!(req.data_len as usize <= ID_BYTES),
                    Op::Flush => {}
                }
            }
            Err(rej) => {
                prop_assert_eq!(rej.status.is_none(), rej.error == ParseError::NoStatus);
            }
        }
    }
}

/// The walker used to resubmit in-flight requests agrees with virtio-queue's iterator.
#[test]
fn parse_head_matches_the_queue_iterator() {
    let m = mem();
    header(&m, HDR, T_IN, 4);
    let descs = [
        desc(HDR, 16, 0),
        desc(DATA, 2048, W),
        desc(DATA + 4096, 1024, W),
        desc(STATUS, 1, W),
    ];
    let q = MockSplitQueue::new(&m, 16);
    let chain = q.build_desc_chain(&descs).unwrap();
    let mut iov_a = Vec::new();
    let a = parse(chain, &m, GEO, &mut Scratch::default(), &mut iov_a).unwrap();
    let mut iov_b = Vec::new();
    let b = parse_head(
        0,
        q.desc_table_addr(),
        16,
        &m,
        GEO,
        &mut Scratch::default(),
        &mut iov_b,
    )
    .unwrap();
    assert_eq!(a, b);
    assert_eq!(
        iov_a.iter().map(|v| v.iov_len).collect::<Vec<_>>(),
        iov_b.iter().map(|v| v.iov_len).collect::<Vec<_>>()
    );
    // An index past the table, and a chain that loops back on itself, end cleanly.
    assert!(parse_head(
        16,
        q.desc_table_addr(),
        16,
        &m,
        GEO,
        &mut Scratch::default(),
        &mut iov_b
    )
    .is_err());
    let table = 0x50_0000u64;
    m.write_obj(
        RawDescriptor::from(SplitDescriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 1)),
        GuestAddress(table),
    )
    .unwrap();
    m.write_obj(
        RawDescriptor::from(SplitDescriptor::new(
            STATUS,
            1,
            (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16,
            0,
        )),
        GuestAddress(table + 16),
    )
    .unwrap();
    let r = parse_head(
        0,
        GuestAddress(table),
        16,
        &m,
        GEO,
        &mut Scratch::default(),
        &mut iov_b,
    );
    assert!(r.is_err(), "a looping chain must not be accepted: {r:?}");
}

#[test]
fn parse_head_follows_indirect_tables() {
    let m = mem();
    header(&m, HDR, T_OUT, 2);
    let ind = 0x60_0000u64;
    let entries = [
        SplitDescriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 1),
        SplitDescriptor::new(DATA, 512, VRING_DESC_F_NEXT as u16, 2),
        SplitDescriptor::new(STATUS, 1, W, 0),
    ];
    for (i, e) in entries.iter().enumerate() {
        m.write_obj(RawDescriptor::from(*e), GuestAddress(ind + 16 * i as u64))
            .unwrap();
    }
    let table = 0x70_0000u64;
    m.write_obj(
        RawDescriptor::from(SplitDescriptor::new(
            ind,
            48,
            VRING_DESC_F_INDIRECT as u16,
            0,
        )),
        GuestAddress(table + 16 * 3),
    )
    .unwrap();
    let mut iov = Vec::new();
    let r = parse_head(
        3,
        GuestAddress(table),
        8,
        &m,
        GEO,
        &mut Scratch::default(),
        &mut iov,
    )
    .unwrap();
    assert_eq!(
        (r.head, r.op, r.data_len),
        (3, Op::Write { offset: 1024 }, 512)
    );
}

/// Descriptors may all point at one guest buffer: the data length is what the device is
/// asked to move (and what a replicated write copies), so it is capped, not the memory.
#[test]
fn requests_beyond_the_advertised_size_are_refused() {
    let m = mem();
    let geo = Geometry {
        capacity_sectors: 1 << 30,
        readonly: false,
    };
    let half = MAX_REQUEST_BYTES / 2;
    for req_type in [T_OUT, T_IN] {
        header(&m, HDR, req_type, 0);
        let flags = if req_type == T_IN { W } else { 0 };
        let (ok, _) = run(
            &m,
            &[
                desc(HDR, 16, 0),
                desc(DATA, half, flags),
                desc(DATA, half, flags),
                desc(STATUS, 1, W),
            ],
            geo,
        );
        assert_eq!(ok.unwrap().data_len, MAX_REQUEST_BYTES);
        let (r, _) = run(
            &m,
            &[
                desc(HDR, 16, 0),
                desc(DATA, half, flags),
                desc(DATA, half, flags),
                desc(DATA, 512, flags),
                desc(STATUS, 1, W),
            ],
            geo,
        );
        if req_type == T_IN {
            // A read copies nothing: it is not held to the limit.
            assert_eq!(r.unwrap().data_len, MAX_REQUEST_BYTES + 512);
            continue;
        }
        let e = err(r);
        assert!(matches!(e, ParseError::TooLarge(n) if n == u64::from(MAX_REQUEST_BYTES) + 512));
        assert_eq!(e.status(), Some(S_IOERR));
    }
}
