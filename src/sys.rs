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

/// Copies the contents of guest buffers into `dst` (as much as fits); returns the bytes
/// copied.
///
/// # Safety
/// As for [`zero_guest_buffers`].
pub unsafe fn copy_from_guest_buffers_to(iov: &[libc::iovec], dst: &mut [u8]) -> usize {
    let mut at = 0;
    for v in iov {
        let n = v.iov_len.min(dst.len() - at);
        // SAFETY: guaranteed by the caller: `v` lies inside a live guest memory mapping for
        // the duration of the call, and is only read here; `n` is within both.
        let src = unsafe { std::slice::from_raw_parts(v.iov_base.cast::<u8>(), n) };
        dst[at..at + n].copy_from_slice(src);
        at += n;
    }
    at
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

/// Drops the clean pages of `file` from the page cache, so that later reads see what the
/// disk holds (after a writeback error, pages the disk lacks may stay cached as clean).
pub fn drop_page_cache(file: &File) -> io::Result<()> {
    // SAFETY: plain system call on a descriptor `file` owns for the duration of the call.
    let r = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(r))
    }
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn c_name(name: &std::ffi::OsStr) -> io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(name.as_bytes()).map_err(|_| io::Error::other("NUL in a file name"))
}

/// A listening unix stream socket bound to `path`, whose file is created with `mode` (less
/// the umask) from the start: the socket's own mode is set before `bind` creates the file,
/// so there is no moment when the file is more open than `mode`.
pub fn bind_unix_listener(
    path: &std::path::Path,
    mode: u32,
) -> io::Result<std::os::unix::net::UnixListener> {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long (108 bytes at most) or holds a NUL",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain system call; the new descriptor is owned by `fd` from here on.
    let fd =
        cvt(unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `fd` was just returned by socket() and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: plain system calls on the descriptor `fd` owns; `addr` lives on this stack
    // frame for the duration of bind().
    unsafe {
        cvt(libc::fchmod(fd.as_raw_fd(), mode as libc::mode_t))?;
        cvt(libc::bind(
            fd.as_raw_fd(),
            (&raw const addr).cast::<libc::sockaddr>(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        ))?;
        cvt(libc::listen(fd.as_raw_fd(), 128))?;
    }
    Ok(std::os::unix::net::UnixListener::from(fd))
}

/// `fchmodat(dir, name, mode)`: `name` is looked up in the directory `dir` refers to, not by
/// a path that could have been swapped meanwhile.
pub fn chmod_at(dir: &File, name: &std::ffi::OsStr, mode: u32) -> io::Result<()> {
    let n = c_name(name)?;
    // SAFETY: plain system call; `dir` stays open and `n` alive for its duration.
    cvt(unsafe { libc::fchmodat(dir.as_raw_fd(), n.as_ptr(), mode as libc::mode_t, 0) }).map(drop)
}

/// `fchownat(dir, name, uid, gid, AT_SYMLINK_NOFOLLOW)`; `None` leaves that id unchanged.
pub fn chown_at(
    dir: &File,
    name: &std::ffi::OsStr,
    uid: Option<u32>,
    gid: Option<u32>,
) -> io::Result<()> {
    let n = c_name(name)?;
    // SAFETY: plain system call; `dir` stays open and `n` alive for its duration.
    cvt(unsafe {
        libc::fchownat(
            dir.as_raw_fd(),
            n.as_ptr(),
            uid.unwrap_or(u32::MAX),
            gid.unwrap_or(u32::MAX),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

/// `linkat(dir, name, AT_FDCWD, target, 0)`: a second name for the file; fails with
/// `AlreadyExists` if `target` exists (never replaces it).
pub fn link_at(dir: &File, name: &std::ffi::OsStr, target: &std::path::Path) -> io::Result<()> {
    let (n, t) = (c_name(name)?, c_name(target.as_os_str())?);
    // SAFETY: plain system call; `dir` stays open and both strings alive for its duration.
    cvt(unsafe { libc::linkat(dir.as_raw_fd(), n.as_ptr(), libc::AT_FDCWD, t.as_ptr(), 0) })
        .map(drop)
}

/// `unlinkat(dir, name, 0)`.
pub fn unlink_at(dir: &File, name: &std::ffi::OsStr) -> io::Result<()> {
    let n = c_name(name)?;
    // SAFETY: plain system call; `dir` stays open and `n` alive for its duration.
    cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), n.as_ptr(), 0) }).map(drop)
}

/// The effective user id of this process.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Replaces `path` with `bytes` so that a crash leaves the old or the new content, never a
/// mix: a temporary file next to it (mode 0600) is written and fsynced, renamed over `path`,
/// and the directory is fsynced.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(".tmp");
    let tmp = dir.join(name);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

/// Takes an exclusive `flock` on `file` without waiting; `Ok(false)` if another open file
/// description holds it.
pub fn try_flock_exclusive(file: &File) -> io::Result<bool> {
    loop {
        // SAFETY: plain system call on a descriptor `file` owns for the duration of the call.
        let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EWOULDBLOCK) => return Ok(false),
            Some(libc::EINTR) => continue,
            _ => return Err(e),
        }
    }
}

/// `poll(2)` on `fds` for at most `timeout_ms` (EINTR counts as nothing ready).
pub fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) -> io::Result<usize> {
    // SAFETY: `fds` is a valid, exclusively borrowed array of `fds.len()` pollfd structs for
    // the duration of the call; the kernel only writes their `revents`.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    if r >= 0 {
        return Ok(r as usize);
    }
    let e = io::Error::last_os_error();
    if e.kind() == io::ErrorKind::Interrupted {
        Ok(0)
    } else {
        Err(e)
    }
}

/// Sends what the socket takes of `buf` now, never blocking (and never raising SIGPIPE).
/// Returns the bytes sent (0 when the socket buffer is full).
pub fn send_nonblocking(fd: std::os::fd::RawFd, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is a valid slice for the duration of the call and the kernel only
        // reads it; `fd` is a socket the caller owns.
        let r = unsafe {
            libc::send(
                fd,
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if r >= 0 {
            return Ok(r as usize);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) => return Ok(0),
            Some(libc::EINTR) => continue,
            _ => return Err(e),
        }
    }
}

/// What tells one file from another that took its place: the inode number, the birth time
/// in nanoseconds, and the inode generation (`FS_IOC_GETVERSION`). File systems reuse a
/// freed inode number at once; a re-created file gets another birth time or generation,
/// where the file system records them (0 where it does not).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FileId {
    pub ino: u64,
    pub birth: u64,
    pub generation: u64,
}

impl FileId {
    /// Whether a re-created file can be told from this one: without a birth time or an
    /// inode generation, the inode number alone proves nothing.
    pub fn provable(&self) -> bool {
        self.birth != 0 || self.generation != 0
    }
}

/// `_IOR('v', 1, long)`: the inode generation of ext2/3/4, XFS and others.
const FS_IOC_GETVERSION: libc::c_ulong = 0x8008_7601;

/// The [`FileId`] of an open file.
pub fn file_id(file: &File) -> io::Result<FileId> {
    // SAFETY: `statx` is plain old data; all zeros is a valid value.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the path is a valid NUL-terminated empty string, `file` owns the descriptor
    // for the duration of the call, and the kernel writes only into `st`, which we own.
    let r = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_INO | libc::STATX_BTIME,
            &mut st,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    let birth = if st.stx_mask & libc::STATX_BTIME != 0 {
        (st.stx_btime.tv_sec as u64)
            .wrapping_mul(1_000_000_000)
            .wrapping_add(u64::from(st.stx_btime.tv_nsec))
    } else {
        0
    };
    let mut generation: libc::c_long = 0;
    // SAFETY: the ioctl writes one `long` into `generation`, which we own, for the duration
    // of the call; `file` owns the descriptor. Failure (no such ioctl) leaves it 0.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_GETVERSION, &mut generation) };
    Ok(FileId {
        ino: st.stx_ino,
        birth,
        generation: if r == 0 { generation as u64 } else { 0 },
    })
}

/// Whether the open file has been unlinked (its name now names another file, or none).
pub fn unlinked(file: &File) -> bool {
    use std::os::unix::fs::MetadataExt;
    file.metadata().is_ok_and(|m| m.nlink() == 0)
}

/// A sealed in-memory copy of `bytes`: a memfd (close-on-exec) holding exactly these bytes,
/// with `F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`, so that nobody, this
/// process included, can change it any more. Asked to be executable (`MFD_EXEC`) where the
/// kernel knows the flag (Linux 6.3 and later), so that `vm.memfd_noexec=1` does not make it
/// unmappable for code.
pub fn sealed_memfd(name: &str, bytes: &[u8]) -> io::Result<File> {
    use std::io::Write;
    use std::os::fd::FromRawFd;
    let n = std::ffi::CString::new(name).map_err(|_| io::Error::other("NUL in a memfd name"))?;
    const MFD_EXEC: libc::c_uint = 0x0010;
    let base = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    // SAFETY: plain system call; `n` is a NUL-terminated string alive for its duration.
    let mut fd = unsafe { libc::memfd_create(n.as_ptr(), base | MFD_EXEC) };
    if fd < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
        // SAFETY: as above (a kernel before 6.3 refuses the unknown flag).
        fd = unsafe { libc::memfd_create(n.as_ptr(), base) };
    }
    let fd = cvt(fd)?;
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else; the File
    // owns (and closes) it from here on.
    let mut f = unsafe { File::from_raw_fd(fd) };
    f.write_all(bytes)?;
    let seals = libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: plain system call on a descriptor `f` owns for its duration.
    cvt(unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, seals) })?;
    Ok(f)
}

/// The seals of a memfd (`F_GET_SEALS`).
pub fn seals(file: &File) -> io::Result<libc::c_int> {
    // SAFETY: plain system call on a descriptor `file` owns for its duration.
    cvt(unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) })
}

/// Creates the file `name` in the directory `dir` (`openat` with `O_CREAT | O_EXCL |
/// O_NOFOLLOW`, read-write, close-on-exec) with `mode`: never through a symlink, never an
/// existing file.
pub fn create_at(dir: &File, name: &std::ffi::OsStr, mode: u32) -> io::Result<File> {
    use std::os::fd::FromRawFd;
    let n = c_name(name)?;
    let flags = libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_RDWR | libc::O_CLOEXEC;
    // SAFETY: plain system call; `dir` stays open and `n` alive for its duration.
    let fd = cvt(unsafe { libc::openat(dir.as_raw_fd(), n.as_ptr(), flags, mode) })?;
    // SAFETY: `fd` was just returned by openat and is owned by nobody else; the File owns
    // (and closes) it from here on.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Closes `fd`, a descriptor that its owner gave up with `into_raw_fd` and nobody closes:
/// vhost-user-backend registers each worker's exit eventfd that way and never closes it.
///
/// # Safety
/// `fd` must be open, owned by no live object, and used by nobody after this call.
pub unsafe fn close_abandoned_fd(fd: std::os::fd::RawFd) {
    // SAFETY: per the caller's contract, `fd` is an open descriptor nobody else owns, so
    // taking ownership of it here and dropping it closes it exactly once.
    drop(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
}

/// Makes the kernel notice a peer that vanished (a crashed or partitioned host sends no
/// FIN): keepalive probes after `idle_s` seconds of silence, every `interval_s`, `count`
/// of them; and sent data unacknowledged for `user_timeout_ms` ends the connection.
pub fn tcp_dead_peer_detection(
    stream: &std::net::TcpStream,
    idle_s: i32,
    interval_s: i32,
    count: i32,
    user_timeout_ms: i32,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = stream.as_raw_fd();
    let set = |level: libc::c_int, name: libc::c_int, value: libc::c_int| -> io::Result<()> {
        // SAFETY: `value` lives on the stack for the call, its size is passed, and the
        // kernel only reads it; `fd` is the caller's open socket.
        let r = unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, idle_s)?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, interval_s)?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, count)?;
    set(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, user_timeout_ms)
}
