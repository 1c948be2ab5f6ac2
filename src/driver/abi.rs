//! The driver image ABI, version 1: the C types and symbols a driver image exports
//! (`docs/driver-abi.md` is the reference; this module mirrors it for the host side).
//!
//! Everything crossing the boundary is `#[repr(C)]`, made of fixed-width integers and raw
//! pointers. New fields are only ever appended, behind a bump of [`ABI_VERSION`]; an image
//! built for another version is refused at load.

use std::ffi::c_char;

/// The ABI version this host speaks.
pub const ABI_VERSION: u32 = 1;

/// `fd_request.op` values.
pub const OP_READ: u32 = 0;
pub const OP_WRITE: u32 = 1;
pub const OP_FLUSH: u32 = 2;
pub const OP_DISCARD: u32 = 3;
pub const OP_WRITE_ZEROES: u32 = 4;

/// `fd_driver_info.flags`: the image transforms write data. The host then passes a bounce
/// buffer of `len` bytes with each write; the image fills it with the bytes to store, and
/// the guest's buffers are left alone.
pub const WANTS_WRITE_DATA: u32 = 1 << 0;
/// The image transforms read data: `complete` is called for each successful read, with the
/// guest's buffers (already filled from the backing), to change in place.
pub const WANTS_READ_DATA: u32 = 1 << 1;

/// Verdicts of `submit`.
pub const PASS: i32 = 0;
/// Complete the request with VIRTIO_BLK_S_IOERR.
pub const FAIL: i32 = 1;
/// Try again after `*delay_ns` nanoseconds (rate limits). The queue keeps its order: nothing
/// behind the request is taken from the ring meanwhile.
pub const DELAY: i32 = 2;
/// A negative verdict or return value is an internal error of the image (the SDK reports a
/// panic as [`ERR_PANIC`]): the host fails the request and marks the attachment failed.
pub const ERR_PANIC: i32 = -2;

/// Static facts about an image (`ferrodisk_driver_info`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct DriverInfo {
    pub abi_version: u32,
    pub flags: u32,
    /// NUL-terminated, static.
    pub name: *const c_char,
    pub version: *const c_char,
}

/// What the host tells an image when it attaches it (`ferrodisk_driver_init`). Strings are
/// NUL-terminated and live until `init` returns (copy what you keep).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Host {
    pub abi_version: u32,
    pub queues: u32,
    /// Disk capacity in bytes.
    pub capacity: u64,
    pub volume: *const c_char,
    pub instance: *const c_char,
    /// The instance context, a JSON object of strings.
    pub context_json: *const c_char,
    /// `{"image": <the manifest's config>, "attach": <the attach request's driver_config>}`.
    pub config_json: *const c_char,
}

/// One request (`submit`, `complete`). Valid only during the call.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Request {
    pub op: u32,
    /// The virtqueue it came from (0-based); calls for different queues may run at once.
    pub queue: u32,
    /// Byte offset and length on the disk.
    pub offset: u64,
    pub len: u64,
    /// The guest's data buffers: read-only for writes, writable in `complete` for reads.
    pub iov: *const libc::iovec,
    pub iovcnt: u32,
    pub _reserved: u32,
    /// Writes, with [`WANTS_WRITE_DATA`]: `len` bytes to fill with the data to store.
    pub bounce: *mut u8,
}

pub type InfoFn = unsafe extern "C" fn() -> *const DriverInfo;
pub type InitFn = unsafe extern "C" fn(
    host: *const Host,
    err: *mut c_char,
    errlen: usize,
) -> *mut std::ffi::c_void;
pub type SubmitFn = unsafe extern "C" fn(
    inst: *mut std::ffi::c_void,
    req: *const Request,
    delay_ns: *mut u64,
) -> i32;
pub type CompleteFn =
    unsafe extern "C" fn(inst: *mut std::ffi::c_void, req: *const Request, status: i32) -> i32;
pub type FiniFn = unsafe extern "C" fn(inst: *mut std::ffi::c_void);

/// The symbols an image must export.
pub const SYM_INFO: &[u8] = b"ferrodisk_driver_info\0";
pub const SYM_INIT: &[u8] = b"ferrodisk_driver_init\0";
pub const SYM_SUBMIT: &[u8] = b"ferrodisk_driver_submit\0";
pub const SYM_COMPLETE: &[u8] = b"ferrodisk_driver_complete\0";
pub const SYM_FINI: &[u8] = b"ferrodisk_driver_fini\0";
