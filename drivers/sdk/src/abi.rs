//! The C types and constants of driver image ABI version 1.
//!
//! `docs/driver-abi.md` is the reference. These are the only Rust definitions: images use
//! them through this SDK, and the host (`ferrodisk::driver::abi`) re-exports them. The test
//! at the bottom pins their layout to hard-coded numbers (stated in the crate docs), so an
//! accidental change of the ABI fails it.

use std::ffi::c_char;

/// The ABI version this SDK speaks (`FERRODISK_DRIVER_ABI`).
pub const ABI_VERSION: u32 = 1;

/// `fd_request.op`: read `len` bytes at `offset`.
pub const OP_READ: u32 = 0;
/// `fd_request.op`: write `len` bytes at `offset`.
pub const OP_WRITE: u32 = 1;
/// `fd_request.op`: flush the volatile write cache.
pub const OP_FLUSH: u32 = 2;
/// `fd_request.op`: discard (trim) a range.
pub const OP_DISCARD: u32 = 3;
/// `fd_request.op`: write zeroes to a range.
pub const OP_WRITE_ZEROES: u32 = 4;

/// `fd_driver_info.flags`: writes come with a bounce buffer of `len` bytes for the image to
/// fill with the bytes to store; the guest's buffers are left alone.
pub const WANTS_WRITE_DATA: u32 = 1 << 0;
/// `fd_driver_info.flags`: `complete` is called after each successful read, to transform the
/// guest's buffers in place.
pub const WANTS_READ_DATA: u32 = 1 << 1;

/// Verdict of `submit`: go on.
pub const PASS: i32 = 0;
/// Verdict of `submit`: complete the request with `VIRTIO_BLK_S_IOERR`.
pub const FAIL: i32 = 1;
/// Verdict of `submit`: call again after `*delay_ns` nanoseconds.
pub const DELAY: i32 = 2;
/// A negative return is an internal error of the image; this one means a panic was caught
/// at the boundary.
pub const ERR_PANIC: i32 = -2;
/// SDK convention (any negative value is an internal error to the host): the image reported
/// an error ([`Verdict::Error`](crate::Verdict::Error) without a negative code, or `Err` from
/// [`Driver::complete`](crate::Driver::complete)).
pub const ERR_INTERNAL: i32 = -1;
/// SDK convention: the host passed an invalid argument (a NULL instance or request, a NULL
/// buffer with a non-zero length, iovecs that do not add up to `len` where the image reads
/// them, or a missing bounce buffer).
pub const ERR_INVALID: i32 = -3;

/// `fd_driver_info`: static facts about an image, returned by `ferrodisk_driver_info`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct DriverInfo {
    /// [`ABI_VERSION`].
    pub abi_version: u32,
    /// `WANTS_*` flags.
    pub flags: u32,
    /// NUL-terminated, static.
    pub name: *const c_char,
    /// NUL-terminated, static.
    pub version: *const c_char,
}

/// `fd_host`: what the host tells an image at attach (`ferrodisk_driver_init`). The strings
/// are NUL-terminated and valid only during the call.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Host {
    /// The host's ABI version.
    pub abi_version: u32,
    /// Number of virtqueues (queue indexes are `0..queues`).
    pub queues: u32,
    /// Disk capacity in bytes.
    pub capacity: u64,
    /// Volume name.
    pub volume: *const c_char,
    /// Instance (VM) name.
    pub instance: *const c_char,
    /// The instance context, a JSON object of strings.
    pub context_json: *const c_char,
    /// `{"image": <manifest config>, "attach": <attach driver_config>}`.
    pub config_json: *const c_char,
}

/// `fd_request`: one request (`submit`, `complete`), valid only during the call.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Request {
    /// One of the `OP_*` values.
    pub op: u32,
    /// The virtqueue it came from (0-based).
    pub queue: u32,
    /// Byte offset on the disk.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// The guest's data buffers.
    pub iov: *const libc::iovec,
    /// Number of entries in `iov`.
    pub iovcnt: u32,
    /// Zero.
    pub _reserved: u32,
    /// Writes with [`WANTS_WRITE_DATA`]: `len` bytes to fill with the data to store.
    pub bounce: *mut u8,
}

/// `ferrodisk_driver_info`.
pub type InfoFn = unsafe extern "C" fn() -> *const DriverInfo;
/// `ferrodisk_driver_init`.
pub type InitFn = unsafe extern "C" fn(
    host: *const Host,
    err: *mut c_char,
    errlen: usize,
) -> *mut std::ffi::c_void;
/// `ferrodisk_driver_submit`.
pub type SubmitFn = unsafe extern "C" fn(
    inst: *mut std::ffi::c_void,
    req: *const Request,
    delay_ns: *mut u64,
) -> i32;
/// `ferrodisk_driver_complete`.
pub type CompleteFn =
    unsafe extern "C" fn(inst: *mut std::ffi::c_void, req: *const Request, status: i32) -> i32;
/// `ferrodisk_driver_fini`.
pub type FiniFn = unsafe extern "C" fn(inst: *mut std::ffi::c_void);

/// Symbol names an image exports (NUL-terminated, for `dlsym`).
pub const SYM_INFO: &[u8] = b"ferrodisk_driver_info\0";
/// See [`SYM_INFO`].
pub const SYM_INIT: &[u8] = b"ferrodisk_driver_init\0";
/// See [`SYM_INFO`].
pub const SYM_SUBMIT: &[u8] = b"ferrodisk_driver_submit\0";
/// See [`SYM_INFO`].
pub const SYM_COMPLETE: &[u8] = b"ferrodisk_driver_complete\0";
/// See [`SYM_INFO`].
pub const SYM_FINI: &[u8] = b"ferrodisk_driver_fini\0";

#[cfg(all(test, target_pointer_width = "64"))]
mod layout {
    use super::*;
    use std::mem::{align_of, offset_of, size_of};

    // These numbers are stated in the crate docs ("Layout") and in docs/driver-abi.md's C.

    #[test]
    fn driver_info_layout() {
        assert_eq!(size_of::<DriverInfo>(), 24);
        assert_eq!(align_of::<DriverInfo>(), 8);
        assert_eq!(offset_of!(DriverInfo, abi_version), 0);
        assert_eq!(offset_of!(DriverInfo, flags), 4);
        assert_eq!(offset_of!(DriverInfo, name), 8);
        assert_eq!(offset_of!(DriverInfo, version), 16);
    }

    #[test]
    fn host_layout() {
        assert_eq!(size_of::<Host>(), 48);
        assert_eq!(align_of::<Host>(), 8);
        assert_eq!(offset_of!(Host, abi_version), 0);
        assert_eq!(offset_of!(Host, queues), 4);
        assert_eq!(offset_of!(Host, capacity), 8);
        assert_eq!(offset_of!(Host, volume), 16);
        assert_eq!(offset_of!(Host, instance), 24);
        assert_eq!(offset_of!(Host, context_json), 32);
        assert_eq!(offset_of!(Host, config_json), 40);
    }

    #[test]
    fn request_layout() {
        assert_eq!(size_of::<Request>(), 48);
        assert_eq!(align_of::<Request>(), 8);
        assert_eq!(offset_of!(Request, op), 0);
        assert_eq!(offset_of!(Request, queue), 4);
        assert_eq!(offset_of!(Request, offset), 8);
        assert_eq!(offset_of!(Request, len), 16);
        assert_eq!(offset_of!(Request, iov), 24);
        assert_eq!(offset_of!(Request, iovcnt), 32);
        assert_eq!(offset_of!(Request, _reserved), 36);
        assert_eq!(offset_of!(Request, bounce), 40);
    }

    #[test]
    fn iovec_layout() {
        assert_eq!(size_of::<libc::iovec>(), 16);
        assert_eq!(align_of::<libc::iovec>(), 8);
        assert_eq!(offset_of!(libc::iovec, iov_base), 0);
        assert_eq!(offset_of!(libc::iovec, iov_len), 8);
    }

    #[test]
    fn constants_match_the_reference() {
        assert_eq!(ABI_VERSION, 1);
        assert_eq!(
            (OP_READ, OP_WRITE, OP_FLUSH, OP_DISCARD, OP_WRITE_ZEROES),
            (0, 1, 2, 3, 4)
        );
        assert_eq!((WANTS_WRITE_DATA, WANTS_READ_DATA), (1, 2));
        assert_eq!((PASS, FAIL, DELAY, ERR_PANIC), (0, 1, 2, -2));
    }
}
