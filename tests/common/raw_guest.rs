//! A hand-driven virtqueue over vhost-user: the test plays a guest that writes descriptors
//! and avail-ring entries itself, so it can do what no well-behaved driver does (offer a
//! head twice, send degenerate requests) and see exactly what the backend answers.
//!
//! Layout of the shared memory (guest physical address = offset in the file):
//! descriptor table at 0, avail ring at 0x1000, used ring at 0x2000, data from 0x10000.

#![allow(dead_code)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

pub const DESC: u64 = 0;
pub const AVAIL: u64 = 0x1000;
pub const USED: u64 = 0x2000;
pub const DATA: u64 = 0x10000;
pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;

pub struct RawGuest {
    pub frontend: Frontend,
    _file: File,
    base: *mut u8,
    len: usize,
    size: u16,
    avail_idx: u16,
    kick: EventFd,
    _call: EventFd,
}

impl RawGuest {
    /// Connects to `socket`, shares `mem_len` bytes of memory and starts queue 0 with
    /// `size` descriptors.
    pub fn connect(socket: &Path, size: u16, mem_len: usize) -> RawGuest {
        let file = tempfile::tempfile_in("/dev/shm").expect("a file in /dev/shm");
        file.set_len(mem_len as u64).unwrap();
        // SAFETY: maps `file` (owned by the returned RawGuest, which unmaps it in Drop) for
        // the guest's memory; nothing else in this process aliases the mapping.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mem_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED, "mmap");
        let mut f = Frontend::connect(socket, 1).expect("connect");
        f.set_owner().unwrap();
        let offered = f.get_features().unwrap();
        // VERSION_1 and the protocol features, nothing else (no EVENT_IDX, no indirect).
        let wanted = (1u64 << 32) | (1 << 30);
        f.set_features(offered & wanted).unwrap();
        let proto = f.get_protocol_features().unwrap();
        f.set_protocol_features(
            proto & (VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::CONFIG),
        )
        .unwrap();
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: mem_len as u64,
            userspace_addr: base as u64,
            mmap_offset: 0,
            mmap_handle: file.as_raw_fd(),
        };
        f.set_mem_table(&[region]).unwrap();
        f.set_vring_num(0, size).unwrap();
        f.set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: size,
                queue_size: size,
                flags: 0,
                desc_table_addr: base as u64 + DESC,
                used_ring_addr: base as u64 + USED,
                avail_ring_addr: base as u64 + AVAIL,
                log_addr: None,
            },
        )
        .unwrap();
        f.set_vring_base(0, 0).unwrap();
        let kick = EventFd::new(0).unwrap();
        let call = EventFd::new(0).unwrap();
        f.set_vring_call(0, &call).unwrap();
        f.set_vring_kick(0, &kick).unwrap();
        f.set_vring_enable(0, true).unwrap();
        RawGuest {
            frontend: f,
            _file: file,
            base: base.cast(),
            len: mem_len,
            size,
            avail_idx: 0,
            kick,
            _call: call,
        }
    }

    pub fn write(&self, addr: u64, bytes: &[u8]) {
        assert!(
            addr as usize + bytes.len() <= self.len,
            "outside the guest's memory"
        );
        // SAFETY: the range lies inside the mapping, which `self` owns until Drop; the
        // backend process may access the same bytes concurrently, as a device does.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.base.add(addr as usize), bytes.len())
        };
    }

    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        assert!(
            addr as usize + len <= self.len,
            "outside the guest's memory"
        );
        let mut out = vec![0u8; len];
        // SAFETY: as in `write`.
        unsafe {
            std::ptr::copy_nonoverlapping(self.base.add(addr as usize), out.as_mut_ptr(), len)
        };
        out
    }

    /// Descriptor `i`.
    pub fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.write(DESC + 16 * u64::from(i), &d);
    }

    /// A request header at `at`.
    pub fn header(&self, at: u64, req_type: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&req_type.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.write(at, &h);
    }

    /// A discard or write-zeroes segment at `at`.
    pub fn segment(&self, at: u64, sector: u64, sectors: u32, flags: u32) {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&sectors.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        self.write(at, &s);
    }

    /// Offers `heads` in the avail ring and kicks.
    pub fn offer(&mut self, heads: &[u16]) {
        for &h in heads {
            let slot = AVAIL + 4 + 2 * u64::from(self.avail_idx % self.size);
            self.write(slot, &h.to_le_bytes());
            self.avail_idx = self.avail_idx.wrapping_add(1);
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.write(AVAIL + 2, &self.avail_idx.to_le_bytes());
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.kick.write(1).unwrap();
    }

    pub fn used_idx(&self) -> u16 {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let b = self.read(USED + 2, 2);
        u16::from_le_bytes([b[0], b[1]])
    }

    /// Every used element so far: (head, length).
    pub fn used(&self) -> Vec<(u32, u32)> {
        (0..self.used_idx())
            .map(|i| {
                let e = self.read(USED + 4 + 8 * u64::from(i % self.size), 8);
                (
                    u32::from_le_bytes(e[0..4].try_into().unwrap()),
                    u32::from_le_bytes(e[4..8].try_into().unwrap()),
                )
            })
            .collect()
    }

    /// Waits until at least `n` used elements are there; panics after `limit`.
    pub fn wait_used(&self, n: u16, limit: Duration) -> Vec<(u32, u32)> {
        let deadline = Instant::now() + limit;
        while self.used_idx() < n {
            assert!(
                Instant::now() < deadline,
                "only {} of {n} requests completed within {limit:?}",
                self.used_idx()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        self.used()
    }
}

impl Drop for RawGuest {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping made in `connect`; no slice into it outlives `self`.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}
