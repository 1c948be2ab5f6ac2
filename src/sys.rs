//! Thin wrappers over the system calls the rest of the crate needs, so that `unsafe` stays in
//! a few named places: block-device ioctls, statx, signal masks and raw writes into guest
//! buffers.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

// _IOR(0x12, 114, size_t)
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const STATX_DIOALIGN: u32 = 0x2000;

/// Geometry of a block device.
#[derive(Debug, Clone, Copy)]
pub struct BlockDeviceInfo {
    pub size: u64,
    pub logical_block: u32,
    pub physical_block: u32,
}

/// Queries size and block sizes of a block device.
pub fn block_device_info(file: &File) -> io::Result<BlockDeviceInfo> {
    let fd = file.as_raw_fd();
    let mut size: u64 = 0;
    let mut logical: libc::c_int = 0;
    let mut physical: libc::c_uint = 0;
    // SAFETY: `fd` is owned by `file`, alive for this call; each ioctl writes one integer of
    // the type declared by the kernel ABI into a local we own.
    let rc = unsafe { libc::ioctl(fd, BLKGETSIZE64, &mut size as *mut u64) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above; BLKSSZGET writes an int.
    let rc = unsafe { libc::ioctl(fd, libc::BLKSSZGET, &mut logical as *mut libc::c_int) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above; BLKPBSZGET writes an unsigned int.
    let rc = unsafe { libc::ioctl(fd, libc::BLKPBSZGET, &mut physical as *mut libc::c_uint) };
    if rc < 0 {
        physical = logical as u32;
    }
    Ok(BlockDeviceInfo {
        size,
        logical_block: logical.max(512) as u32,
        physical_block: physical.max(512),
    })
}

/// The alignment O_DIRECT needs for buffers and offsets on this file, if the kernel says.
pub fn dio_alignment(file: &File) -> Option<u32> {
    // SAFETY: `statx` is plain old data; all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is owned by `file`; the empty path with AT_EMPTY_PATH refers to it, and
    // the kernel writes at most `sizeof(statx)` bytes into `stx`, which we own.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc != 0 || stx.stx_mask & STATX_DIOALIGN == 0 || stx.stx_dio_offset_align == 0 {
        return None;
    }
    Some(stx.stx_dio_mem_align.max(stx.stx_dio_offset_align))
}

/// Blocks `signals` in the calling thread (and in threads it spawns afterwards).
pub fn block_signals(signals: &[libc::c_int]) -> io::Result<()> {
    let set = sigset(signals);
    // SAFETY: `set` is a valid, initialized sigset owned by this frame.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Waits for one of `signals` (which must be blocked) and returns it.
pub fn wait_signal(signals: &[libc::c_int]) -> io::Result<libc::c_int> {
    let set = sigset(signals);
    let mut sig: libc::c_int = 0;
    // SAFETY: `set` and `sig` are owned by this frame for the duration of the call.
    let rc = unsafe { libc::sigwait(&set, &mut sig) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(sig)
}

fn sigset(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initializes it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is owned by this frame; sigemptyset/sigaddset only write into it.
    unsafe {
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
    }
    set
}

/// Writes zeros into guest buffers.
///
/// # Safety
/// Each iovec must point into guest memory that stays mapped for the duration of the call
/// (the caller holds the memory snapshot the iovecs were built from).
pub unsafe fn zero_guest_buffers(iov: &[libc::iovec]) {
    for v in iov {
        // SAFETY: guaranteed by the caller: `v` lies inside a live guest memory mapping. The
        // guest does not own this buffer while the request is being processed.
        unsafe { std::ptr::write_bytes(v.iov_base.cast::<u8>(), 0, v.iov_len) };
    }
}

/// Copies `src` into guest buffers, as far as they reach. Returns the bytes copied.
///
/// # Safety
/// As for [`zero_guest_buffers`].
pub unsafe fn copy_to_guest_buffers(iov: &[libc::iovec], mut src: &[u8]) -> usize {
    let mut copied = 0;
    for v in iov {
        let n = v.iov_len.min(src.len());
        // SAFETY: guaranteed by the caller; `n` is within both the iovec and `src`.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), v.iov_base.cast::<u8>(), n) };
        copied += n;
        src = &src[n..];
    }
    copied
}

/// Takes an exclusive `flock` on `file`, waiting for other holders; released on close.
pub fn flock_exclusive(file: &File) -> io::Result<()> {
    loop {
        // SAFETY: plain system call on a descriptor `file` owns for the duration of the call.
        let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Appends the contents of guest buffers to `dst`.
///
/// # Safety
/// As for [`zero_guest_buffers`].
pub unsafe fn copy_from_guest_buffers(iov: &[libc::iovec], dst: &mut Vec<u8>) {
    for v in iov {
        // SAFETY: guaranteed by the caller: `v` lies inside a live guest memory mapping for
        // the duration of the call, and is only read here.
        let src = unsafe { std::slice::from_raw_parts(v.iov_base.cast::<u8>(), v.iov_len) };
        dst.extend_from_slice(src);
    }
}

/// Allocates `[offset, offset + len)` of `file` (mode 0: blocks are reserved, reads see zeros).
pub fn fallocate(file: &File, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain system call on a descriptor `file` owns for the duration of the call.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            0,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
