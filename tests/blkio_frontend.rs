//! End-to-end tests with libblkio (the vhost-user-blk frontend fio and QEMU's blkio driver
//! use) against a real `ferrodisk serve` process.

mod common;

use blkio::ReqFlags;
use common::*;
use tempfile::TempDir;

const MIB: u64 = 1 << 20;

fn file_disk(
    dir: &TempDir,
    size: u64,
    extra: &str,
) -> (std::path::PathBuf, std::path::PathBuf, String) {
    let img = dir.path().join("disk.img");
    let sock = dir.path().join("disk.sock");
    make_image(&img, size);
    let spec = format!("path={},socket={}{}", img.display(), sock.display(), extra);
    (img, sock, spec)
}

/// Random patterns of many sizes at random offsets (first and last sector included), written
/// and read back through both queues, checked against a model of the whole disk.
fn random_patterns(extra: &str) {
    let dir = TempDir::new().unwrap();
    let size = 64 * MIB;
    let (_img, sock, spec) = file_disk(&dir, size, extra);
    let _d = Daemon::start(&[spec], &sock);
    let mut c = Client::connect(&sock, 2, false).expect("connect");
    assert_eq!(c.capacity, size);
    let mut model = vec![0u8; size as usize];
    let mut rng = Rng(0x5eed_1234);
    let sizes = [512usize, 1024, 4096, 8192, 12288, 65536, 131072, 1 << 20];
    let mut writes = vec![(0u64, 4096usize), (size - 512, 512), (size - 65536, 65536)];
    for _ in 0..200 {
        let len = sizes[rng.below(sizes.len() as u64) as usize];
        let off = rng.below((size - len as u64) / 512) * 512;
        writes.push((off, len));
    }
    for (i, (off, len)) in writes.iter().enumerate() {
        let mut data = vec![0u8; *len];
        rng.fill(&mut data);
        assert_eq!(
            c.write(i % 2, *off, &data, ReqFlags::empty()),
            0,
            "write {len}@{off}"
        );
        model[*off as usize..*off as usize + len].copy_from_slice(&data);
    }
    for (i, (off, len)) in writes.iter().enumerate() {
        let got = c.read((i + 1) % 2, *off, *len).expect("read back");
        assert!(
            got == model[*off as usize..*off as usize + len],
            "mismatch at {len}@{off}"
        );
    }
    for (i, chunk) in (0..size).step_by(BUF_LEN).enumerate() {
        let got = c.read(i % 2, chunk, BUF_LEN).expect("full read");
        assert!(
            got == model[chunk as usize..chunk as usize + BUF_LEN],
            "disk differs from model in chunk {i}"
        );
    }
    assert_eq!(c.flush(0), 0);
}

#[test]
fn two_queues_random_patterns_buffered() {
    random_patterns(",queues=2");
}

#[test]
fn two_queues_random_patterns_direct() {
    random_patterns(",queues=2,direct=on");
}

#[test]
fn two_queues_random_patterns_polling() {
    random_patterns(",queues=2,direct=on,poll-us=200");
}

/// Scatter-gather with segments of odd sizes and misaligned addresses, under O_DIRECT (they
/// take the page-cache path) and without.
#[test]
fn scatter_gather_and_fua() {
    for extra in [",direct=on", ",direct=off"] {
        let dir = TempDir::new().unwrap();
        let (_img, sock, spec) = file_disk(&dir, 16 * MIB, extra);
        let _d = Daemon::start(&[spec], &sock);
        let mut c = Client::connect(&sock, 1, false).unwrap();
        let mut data = vec![0u8; 8192];
        Rng(7).fill(&mut data);
        // Stage the data in three pieces at scattered, partly misaligned buffer offsets.
        let pieces = [
            (100usize, 0usize, 1000usize),
            (300_000, 1000, 3096),
            (1_000_000, 4096, 4096),
        ];
        for (boff, doff, len) in pieces {
            c.buf()[boff..boff + len].copy_from_slice(&data[doff..doff + len]);
        }
        let iov: Vec<libc::iovec> = pieces
            .iter()
            .map(|(boff, _, len)| libc::iovec {
                iov_base: c.buf.wrapping_add(*boff).cast(),
                iov_len: *len,
            })
            .collect();
        c.queues[0].writev(1 << 20, iov.as_ptr(), iov.len() as u32, 0, ReqFlags::FUA);
        assert_eq!(c.wait(0), 0, "writev with FUA ({extra})");
        assert_eq!(
            c.read(0, 1 << 20, 8192).unwrap(),
            data,
            "contiguous read ({extra})"
        );
        // Read back scattered into other misaligned places.
        let rpieces = [(2_000_001usize, 512usize), (3_000_003, 7680)];
        let riov: Vec<libc::iovec> = rpieces
            .iter()
            .map(|(boff, len)| libc::iovec {
                iov_base: c.buf.wrapping_add(*boff).cast(),
                iov_len: *len,
            })
            .collect();
        c.queues[0].readv(
            1 << 20,
            riov.as_ptr(),
            riov.len() as u32,
            0,
            ReqFlags::empty(),
        );
        assert_eq!(c.wait(0), 0, "readv ({extra})");
        let mut got = c.buf()[2_000_001..2_000_001 + 512].to_vec();
        got.extend_from_slice(&c.buf()[3_000_003..3_000_003 + 7680]);
        assert_eq!(got, data, "scattered read ({extra})");
    }
}

#[test]
fn discard_and_write_zeroes() {
    let dir = TempDir::new().unwrap();
    let (img, sock, spec) = file_disk(&dir, 32 * MIB, "");
    let _d = Daemon::start(&[spec], &sock);
    let mut c = Client::connect(&sock, 1, false).unwrap();
    let ones = vec![0xabu8; 4 << 20];
    assert_eq!(c.write(0, 0, &ones, ReqFlags::empty()), 0);
    assert_eq!(c.write(0, 8 << 20, &ones, ReqFlags::empty()), 0);
    assert_eq!(c.flush(0), 0);
    let before = allocated_bytes(&img);
    assert!(before >= 8 << 20, "allocated {before}");
    // Discard punches a hole: the file's allocation drops and the range reads as zeros.
    c.queues[0].discard(0, 4 << 20, 0, ReqFlags::empty());
    assert_eq!(c.wait(0), 0, "discard");
    assert!(
        allocated_bytes(&img) <= before - (4 << 20),
        "discard freed nothing"
    );
    assert!(c.read(0, 0, 4 << 20).unwrap().iter().all(|&b| b == 0));
    // Write-zeroes without unmap, then with (NO_UNMAP clear means unmap is allowed).
    c.queues[0].write_zeroes((8 << 20) + 4096, 65536, 0, ReqFlags::NO_UNMAP);
    assert_eq!(c.wait(0), 0, "write-zeroes");
    c.queues[0].write_zeroes(9 << 20, 1 << 20, 0, ReqFlags::empty());
    assert_eq!(c.wait(0), 0, "write-zeroes with unmap");
    let got = c.read(0, 8 << 20, 4 << 20).unwrap();
    for (i, b) in got.iter().enumerate() {
        let zero = (4096..4096 + 65536).contains(&i) || ((1 << 20)..(2 << 20)).contains(&i);
        assert_eq!(
            *b,
            if zero { 0 } else { 0xab },
            "byte {i} after write-zeroes"
        );
    }
}

#[test]
fn out_of_range_requests_fail() {
    let dir = TempDir::new().unwrap();
    let (_img, sock, spec) = file_disk(&dir, 4 * MIB, "");
    let _d = Daemon::start(&[spec], &sock);
    let mut c = Client::connect(&sock, 1, false).unwrap();
    let cap = c.capacity;
    assert!(c.read(0, cap - 512, 1024).is_err(), "read across the end");
    assert!(c.read(0, cap, 512).is_err(), "read past the end");
    assert_ne!(
        c.write(0, cap - 512, &[1u8; 4096], ReqFlags::empty()),
        0,
        "write across the end"
    );
    c.queues[0].discard(cap - 512, 4096, 0, ReqFlags::empty());
    assert_ne!(c.wait(0), 0, "discard across the end");
    // The disk keeps working.
    assert_eq!(c.write(0, cap - 512, &[7u8; 512], ReqFlags::empty()), 0);
    assert_eq!(c.read(0, cap - 512, 512).unwrap(), vec![7u8; 512]);
}

#[test]
fn read_only_disk_refuses_a_writer() {
    let dir = TempDir::new().unwrap();
    let (img, sock, spec) = file_disk(&dir, 4 * MIB, ",readonly=on");
    std::fs::write(&img, vec![0x5au8; 4 << 20]).unwrap();
    let _d = Daemon::start(&[spec], &sock);
    // The device says RO: a read-write frontend is refused at start.
    let err = Client::connect(&sock, 1, false)
        .err()
        .expect("read-write start must fail");
    assert!(err.message().contains("read-only"), "{}", err.message());
    let mut c = Client::connect(&sock, 1, true).unwrap();
    assert_eq!(c.read(0, 0, 4096).unwrap(), vec![0x5au8; 4096]);
    assert_ne!(c.write(0, 0, &[0u8; 512], ReqFlags::empty()), 0);
}

#[test]
fn reconnect_sees_the_same_data() {
    let dir = TempDir::new().unwrap();
    let (_img, sock, spec) = file_disk(&dir, 8 * MIB, ",queues=2");
    let _d = Daemon::start(&[spec], &sock);
    let mut data = vec![0u8; 65536];
    Rng(99).fill(&mut data);
    {
        let mut c = Client::connect(&sock, 2, false).unwrap();
        assert_eq!(c.write(1, 4096, &data, ReqFlags::empty()), 0);
    }
    for round in 0..3 {
        let mut c = Client::connect(&sock, 2, false)
            .unwrap_or_else(|e| panic!("reconnect {round}: {}", e.message()));
        assert_eq!(
            c.read(round % 2, 4096, 65536).unwrap(),
            data,
            "round {round}"
        );
    }
}

#[test]
fn data_survives_sigterm_and_restart() {
    let dir = TempDir::new().unwrap();
    let (_img, sock, spec) = file_disk(&dir, 8 * MIB, ",direct=on");
    let d = Daemon::start(std::slice::from_ref(&spec), &sock);
    let mut data = vec![0u8; 1 << 20];
    Rng(3).fill(&mut data);
    {
        let mut c = Client::connect(&sock, 1, false).unwrap();
        assert_eq!(c.write(0, 2 << 20, &data, ReqFlags::empty()), 0);
        let (status, out) = d.terminate();
        assert!(status.success(), "exit status {status}");
        assert!(out.contains("\"writes\":1"), "stats: {out}");
    }
    let _d = Daemon::start(&[spec], &sock);
    let mut c = Client::connect(&sock, 1, false).unwrap();
    assert_eq!(c.read(0, 2 << 20, 1 << 20).unwrap(), data);
}

#[test]
fn null_engine_reads_zeros() {
    let dir = TempDir::new().unwrap();
    let sock = dir.path().join("null.sock");
    let _d = Daemon::start(
        &[format!(
            "engine=null,size=1G,socket={},queues=2",
            sock.display()
        )],
        &sock,
    );
    let mut c = Client::connect(&sock, 2, false).unwrap();
    assert_eq!(c.capacity, 1 << 30);
    c.buf()[..4096].fill(0xff);
    assert_eq!(c.read(1, 4096, 4096).unwrap(), vec![0u8; 4096]);
    assert_eq!(c.write(0, 0, &[1u8; 4096], ReqFlags::empty()), 0);
    assert_eq!(c.flush(1), 0);
}

#[test]
fn several_disks_in_one_process() {
    let dir = TempDir::new().unwrap();
    let mut specs = Vec::new();
    for i in 0..3 {
        let img = dir.path().join(format!("d{i}.img"));
        make_image(&img, (i + 1) * MIB);
        specs.push(format!(
            "path={},socket={}",
            img.display(),
            dir.path().join(format!("d{i}.sock")).display()
        ));
    }
    let last = dir.path().join("d2.sock");
    let _d = Daemon::start(&specs, &last);
    let mut clients: Vec<Client> = (0..3)
        .map(|i| Client::connect(&dir.path().join(format!("d{i}.sock")), 1, false).unwrap())
        .collect();
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(c.capacity, (i as u64 + 1) * MIB);
        assert_eq!(c.write(0, 0, &[i as u8 + 1; 512], ReqFlags::empty()), 0);
    }
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(c.read(0, 0, 512).unwrap(), vec![i as u8 + 1; 512]);
    }
}

/// A frontend may add a memory region and at once publish a request into it (libblkio does
/// exactly that in `map_mem_region`; QEMU does on memory hot-plug). The region is in the
/// backend's map once ADD_MEM_REG is acknowledged, so the request must never be refused as
/// outside guest memory, even while the queue's worker is busy with earlier requests.
#[test]
fn a_request_into_a_region_added_just_before_it_is_served() {
    let dir = TempDir::new().unwrap();
    let (_img, sock, spec) = file_disk(&dir, 16 * MIB, ",poll-us=0");
    let _d = Daemon::start(&[spec], &sock);
    let mut c = Client::connect(&sock, 1, false).unwrap();
    const BUSY: usize = 48;
    const ROUNDS: usize = 300;
    let mut refused = 0;
    for round in 0..ROUNDS {
        // Keep the worker popping: a batch of small writes, submitted without waiting.
        for i in 0..BUSY {
            let p = c.buf;
            c.queues[0].write((i as u64) * 4096, p, 4096, 0, ReqFlags::empty());
        }
        let mut none = [];
        c.queues[0].do_io(&mut none, 0, None, None).expect("submit");
        // A new region, and a read into it published right away.
        let region = c.blkio.alloc_mem_region(1 << 16).expect("alloc");
        c.blkio.map_mem_region(&region).expect("map");
        let p = region.addr as *mut u8;
        c.queues[0].read((round as u64 % 64) * 65536, p, 65536, 1, ReqFlags::empty());
        let mut got = 0;
        while got < BUSY + 1 {
            let mut cs: [std::mem::MaybeUninit<blkio::Completion>; 8] =
                std::array::from_fn(|_| std::mem::MaybeUninit::uninit());
            let mut timeout = std::time::Duration::from_secs(20);
            let n = c.queues[0]
                .do_io(&mut cs, 1, Some(&mut timeout), None)
                .expect("do_io");
            assert!(n > 0, "no completion within 20 s");
            for done in &cs[..n] {
                // SAFETY: do_io initialized the first `n` completions.
                let done = unsafe { done.assume_init_read() };
                if done.ret != 0 {
                    assert_eq!(done.user_data, 1, "a write failed: {}", done.ret);
                    refused += 1;
                }
            }
            got += n;
        }
        c.blkio.unmap_mem_region(&region);
        c.blkio.free_mem_region(&region);
    }
    assert_eq!(
        refused, 0,
        "{refused} of {ROUNDS} reads into a fresh region were refused"
    );
}

/// Every frontend connection gets fresh workers; nothing of the old ones may stay open.
/// (vhost-user-backend never closed the exit eventfd it takes from each worker: a daemon
/// leaked one descriptor per queue per connection until it ran out.)
#[test]
fn reconnections_leak_no_descriptors() {
    let dir = TempDir::new().unwrap();
    let (_img, sock, spec) = file_disk(&dir, 4 * MIB, ",queues=2");
    let d = Daemon::start(&[spec], &sock);
    let pid = d.child.as_ref().unwrap().id();
    let open_fds = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };
    let connect_once = || {
        let mut c = Client::connect(&sock, 2, false).unwrap();
        assert_eq!(c.write(1, 0, &[3u8; 4096], ReqFlags::empty()), 0);
    };
    connect_once();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let before = open_fds();
    for _ in 0..20 {
        connect_once();
    }
    // The accept loop finishes tearing the last connection down after the client left.
    let mut after = open_fds();
    for _ in 0..50 {
        if after <= before {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        after = open_fds();
    }
    assert!(
        after <= before,
        "{} descriptors more after 20 connections ({before} -> {after})",
        after - before
    );
}
