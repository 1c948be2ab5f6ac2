//! Safe views of one `fd_request`: [`Req`] for `submit` (guest data read-only, the bounce
//! buffer writable) and [`ReqMut`] for `complete` (guest buffers writable, reads only).
//!
//! # Memory
//!
//! The guest's buffers and the bounce buffer are borrowed for the call only: the lifetime
//! `'a` ends when the SDK's extern function returns, so an image cannot keep them. The guest
//! buffers are guest memory. A guest may change them while the image reads them (it owns
//! them) and may even point two descriptors at the same bytes, so:
//!
//! - read each guest byte once where it matters ([`Req::bounce_with_data`] copies the guest
//!   data into the bounce buffer first, and the image transforms the bounce buffer);
//! - writable guest buffers are handed out one at a time, through callbacks
//!   ([`ReqMut::for_each_buffer_mut`], [`ReqMut::for_each_sector_mut`]), never as a set of
//!   `&mut` slices that could alias.
//!
//! [`for_each_block_mut`] is the one place that walks fixed-size blocks across iovec
//! boundaries: whole blocks inside one iovec are transformed in place, a block straddling
//! iovecs is gathered into a stack buffer, transformed, and scattered back.

use std::io::{IoSlice, IoSliceMut};
use std::marker::PhantomData;
use std::{fmt, ptr, slice};

use crate::abi::{Request, OP_READ, OP_WRITE, WANTS_READ_DATA, WANTS_WRITE_DATA};
use crate::driver::Op;

/// The sector size of the data helpers.
pub const SECTOR_SIZE: usize = 512;

/// Why a data helper could not run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataError {
    /// The request has no bounce buffer: it is not a write, or the image lacks
    /// [`WANTS_WRITE_DATA`].
    NoBounce,
    /// Guest buffers are writable only in `complete`, for reads.
    NotARead,
    /// The data is not a whole number of blocks.
    Unaligned {
        /// Bytes of data.
        len: u64,
        /// The block size asked for.
        block: usize,
    },
    /// The guest buffers and the request (or bounce buffer) disagree on the length.
    LengthMismatch {
        /// Bytes in the guest buffers.
        guest: u64,
        /// Bytes the request (or bounce buffer) says.
        len: u64,
    },
}

impl fmt::Display for DataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DataError::NoBounce => write!(f, "the request has no bounce buffer"),
            DataError::NotARead => write!(f, "guest buffers are writable only for reads"),
            DataError::Unaligned { len, block } => {
                write!(
                    f,
                    "{len} bytes of data are not a multiple of {block}-byte blocks"
                )
            }
            DataError::LengthMismatch { guest, len } => {
                write!(
                    f,
                    "the guest buffers hold {guest} bytes, the request says {len}"
                )
            }
        }
    }
}

impl std::error::Error for DataError {}

/// Why the SDK refused a request from the host (reported as
/// [`ERR_INVALID`](crate::ERR_INVALID)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Invalid {
    /// `iov` is NULL with `iovcnt > 0`, or an entry has a NULL base and a non-zero length.
    NullBuffer,
    /// The image reads the data, and the iovecs do not add up to `len`.
    Length,
    /// A write for an image with `WANTS_WRITE_DATA` has no bounce buffer.
    NoBounce,
}

/// Checks the iovecs of a request and borrows them for `'a`.
///
/// # Safety
///
/// `raw.iov` is NULL or points to `raw.iovcnt` iovecs valid for `'a`.
unsafe fn iovecs<'a>(raw: &Request) -> Result<&'a [libc::iovec], Invalid> {
    if raw.iovcnt == 0 {
        return Ok(&[]);
    }
    if raw.iov.is_null() {
        return Err(Invalid::NullBuffer);
    }
    // SAFETY: non-NULL, and the caller guarantees `iovcnt` entries owned by the host for 'a
    // (the duration of the call).
    let iov = unsafe { slice::from_raw_parts(raw.iov, raw.iovcnt as usize) };
    if iov.iter().any(|v| v.iov_base.is_null() && v.iov_len != 0) {
        return Err(Invalid::NullBuffer);
    }
    Ok(iov)
}

/// Total bytes of some iovecs (saturating: a sum past `u64::MAX` cannot match any `len`).
fn total(iov: &[libc::iovec]) -> u64 {
    iov.iter()
        .fold(0u64, |n, v| n.saturating_add(v.iov_len as u64))
}

/// One guest buffer as a shared slice.
///
/// # Safety
///
/// `v` describes memory valid for reads for `'a` (a NULL base only with length 0).
unsafe fn as_slice<'a>(v: &libc::iovec) -> &'a [u8] {
    if v.iov_len == 0 {
        return &[];
    }
    // SAFETY: non-empty entries have a non-NULL base (checked by `iovecs`), valid for 'a
    // per the caller.
    unsafe { slice::from_raw_parts(v.iov_base.cast::<u8>(), v.iov_len) }
}

/// A request in `submit`: its fields, the guest's data (read-only) and, for writes of an image
/// with [`WANTS_WRITE_DATA`], the bounce buffer to fill.
pub struct Req<'a> {
    op: Op,
    queue: u32,
    offset: u64,
    len: u64,
    iov: &'a [libc::iovec],
    bounce: Option<&'a mut [u8]>,
}

impl<'a> Req<'a> {
    /// A request over Rust buffers (for tests and for calling an image from Rust). `len` is
    /// the request length; for reads and writes it should be the total of `data`.
    pub fn new(
        op: Op,
        queue: u32,
        offset: u64,
        len: u64,
        data: &'a [IoSlice<'a>],
        bounce: Option<&'a mut [u8]>,
    ) -> Req<'a> {
        // SAFETY: std guarantees `IoSlice` is ABI-compatible with `iovec` on Unix; the slices
        // it describes are borrowed for 'a by `data`.
        let iov = unsafe { &*(data as *const [IoSlice<'a>] as *const [libc::iovec]) };
        Req {
            op,
            queue,
            offset,
            len,
            iov,
            bounce,
        }
    }

    /// Borrows an `fd_request` from the host for `submit`.
    ///
    /// # Safety
    ///
    /// For `'a`: the request's `iov` entries are valid for reads, and `bounce` (`len` bytes)
    /// is valid for reads and writes and accessed by nothing else.
    pub(crate) unsafe fn from_raw(raw: &Request, flags: u32) -> Result<Req<'a>, Invalid> {
        // SAFETY: the caller guarantees the iovecs are valid for 'a.
        let iov = unsafe { iovecs(raw) }?;
        let mut bounce = None;
        if raw.op == OP_WRITE && flags & WANTS_WRITE_DATA != 0 {
            if total(iov) != raw.len {
                return Err(Invalid::Length);
            }
            let len = usize::try_from(raw.len).map_err(|_| Invalid::Length)?;
            bounce = Some(match (raw.bounce.is_null(), len) {
                (_, 0) => &mut [][..],
                (true, _) => return Err(Invalid::NoBounce),
                // SAFETY: non-NULL, `len` bytes owned by the host for the call ('a) and
                // lent to the image to fill, per the ABI.
                (false, _) => unsafe { slice::from_raw_parts_mut(raw.bounce, len) },
            });
        }
        Ok(Req {
            op: Op::from_raw(raw.op),
            queue: raw.queue,
            offset: raw.offset,
            len: raw.len,
            iov,
            bounce,
        })
    }

    /// The request kind.
    pub fn op(&self) -> Op {
        self.op
    }

    /// The virtqueue it came from.
    pub fn queue(&self) -> u32 {
        self.queue
    }

    /// Byte offset on the disk.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the request has no bytes (flushes, zero-length requests).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The guest's buffers, in order (for writes: the data to store). Guest memory: see the
    /// module docs.
    pub fn data(&self) -> impl Iterator<Item = &[u8]> + '_ {
        // SAFETY: the iovecs were checked at construction and are valid for 'a, which
        // outlives this borrow of `self`.
        self.iov.iter().map(|v| unsafe { as_slice(v) })
    }

    /// Total bytes in the guest's buffers.
    pub fn data_len(&self) -> u64 {
        total(self.iov)
    }

    /// The bounce buffer (`len` bytes): writes of an image with [`WANTS_WRITE_DATA`] only.
    /// What the image leaves in it is what the host stores.
    pub fn bounce(&mut self) -> Option<&mut [u8]> {
        self.bounce.as_deref_mut()
    }

    /// Copies the guest's data into the bounce buffer and returns it, to transform in place.
    /// Reads each guest byte exactly once.
    pub fn bounce_with_data(&mut self) -> Result<&mut [u8], DataError> {
        let guest = total(self.iov);
        let bounce = self.bounce.as_deref_mut().ok_or(DataError::NoBounce)?;
        if guest != bounce.len() as u64 {
            return Err(DataError::LengthMismatch {
                guest,
                len: bounce.len() as u64,
            });
        }
        let mut at = 0;
        for v in self.iov {
            // SAFETY: the iovec was checked at construction and is valid for 'a.
            let src = unsafe { as_slice(v) };
            bounce[at..at + src.len()].copy_from_slice(src);
            at += src.len();
        }
        Ok(bounce)
    }
}

/// A request in `complete`: its fields and, for reads, the guest's buffers to transform in
/// place.
pub struct ReqMut<'a> {
    op: Op,
    queue: u32,
    offset: u64,
    len: u64,
    iov: &'a [libc::iovec],
    _buffers: PhantomData<&'a mut [u8]>,
}

impl<'a> ReqMut<'a> {
    /// A request over Rust buffers (for tests and for calling an image from Rust).
    pub fn new(op: Op, queue: u32, offset: u64, len: u64, data: &'a mut [IoSliceMut<'a>]) -> Self {
        // SAFETY: std guarantees `IoSliceMut` is ABI-compatible with `iovec` on Unix; the
        // buffers are borrowed mutably (and so exclusively) for 'a through `data`.
        let iov = unsafe { &*(data as *mut [IoSliceMut<'a>] as *const [libc::iovec]) };
        ReqMut {
            op,
            queue,
            offset,
            len,
            iov,
            _buffers: PhantomData,
        }
    }

    /// Borrows an `fd_request` from the host for `complete`.
    ///
    /// # Safety
    ///
    /// The request's `iov` entries are valid for `'a`, and for writes too when `op` is a
    /// read (the guest's buffers, lent to the image until `complete` returns).
    pub(crate) unsafe fn from_raw(raw: &Request, flags: u32) -> Result<ReqMut<'a>, Invalid> {
        // SAFETY: the caller guarantees the iovecs are valid for 'a.
        let iov = unsafe { iovecs(raw) }?;
        if raw.op == OP_READ && flags & WANTS_READ_DATA != 0 && total(iov) != raw.len {
            return Err(Invalid::Length);
        }
        Ok(ReqMut {
            op: Op::from_raw(raw.op),
            queue: raw.queue,
            offset: raw.offset,
            len: raw.len,
            iov,
            _buffers: PhantomData,
        })
    }

    /// The request kind.
    pub fn op(&self) -> Op {
        self.op
    }

    /// The virtqueue it came from.
    pub fn queue(&self) -> u32 {
        self.queue
    }

    /// Byte offset on the disk.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the request has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The guest's buffers, read-only.
    pub fn data(&self) -> impl Iterator<Item = &[u8]> + '_ {
        // SAFETY: the iovecs were checked at construction and are valid for 'a.
        self.iov.iter().map(|v| unsafe { as_slice(v) })
    }

    /// Calls `f` with each guest buffer in turn, writable (reads only).
    pub fn for_each_buffer_mut(&mut self, mut f: impl FnMut(&mut [u8])) -> Result<(), DataError> {
        if self.op != Op::Read {
            return Err(DataError::NotARead);
        }
        for v in self.iov.iter().filter(|v| v.iov_len != 0) {
            // SAFETY: a read's buffers are lent to the image, writable, until `complete`
            // returns ('a); only this one reference to them is live during `f`.
            f(unsafe { slice::from_raw_parts_mut(v.iov_base.cast::<u8>(), v.iov_len) });
        }
        Ok(())
    }

    /// Calls `f(index, sector)` for each 512-byte sector of the guest buffers, in order,
    /// `index` counting from 0 at the start of the request, across iovec boundaries (reads
    /// only; the total must be a multiple of 512).
    pub fn for_each_sector_mut(
        &mut self,
        f: impl FnMut(u64, &mut [u8; SECTOR_SIZE]),
    ) -> Result<(), DataError> {
        self.for_each_block_mut::<SECTOR_SIZE>(f)
    }

    /// [`for_each_sector_mut`](Self::for_each_sector_mut) for any block size.
    pub fn for_each_block_mut<const N: usize>(
        &mut self,
        f: impl FnMut(u64, &mut [u8; N]),
    ) -> Result<(), DataError> {
        if self.op != Op::Read {
            return Err(DataError::NotARead);
        }
        let len = total(self.iov);
        if N == 0 || len % N as u64 != 0 {
            return Err(DataError::Unaligned { len, block: N });
        }
        // SAFETY: a read's buffers are lent to the image, writable, until `complete` returns
        // ('a, which outlives this call).
        unsafe { for_each_block_mut(self.iov, f) };
        Ok(())
    }
}

/// Calls `f(index, block)` for each `N`-byte block of the buffers described by `iov`, in
/// order. A block inside one iovec is passed in place; a block straddling iovecs is gathered
/// into a stack buffer and scattered back after `f`. A trailing partial block is left alone,
/// and `N = 0` does nothing.
///
/// # Safety
///
/// Every entry with a non-zero length points to memory valid for reads and writes of
/// `iov_len` bytes for the duration of the call, and not accessed through other references
/// meanwhile. Entries may overlap each other: only one reference is live at a time.
pub unsafe fn for_each_block_mut<const N: usize>(
    iov: &[libc::iovec],
    mut f: impl FnMut(u64, &mut [u8; N]),
) {
    if N == 0 {
        return;
    }
    let mut index = 0u64;
    let mut tmp = [0u8; N];
    let mut fill = 0usize; // bytes of a straddling block gathered into `tmp`
    let mut start = (0usize, 0usize); // where that block begins: (iovec, offset)
    for (i, v) in iov.iter().enumerate().filter(|(_, v)| v.iov_len != 0) {
        let base = v.iov_base.cast::<u8>();
        let mut off = 0usize;
        if fill > 0 {
            let take = (N - fill).min(v.iov_len);
            // SAFETY: `take <= iov_len` bytes readable at `base` (the caller's guarantee);
            // `tmp[fill..fill + take]` is in bounds; a stack buffer cannot overlap them.
            unsafe { ptr::copy_nonoverlapping(base, tmp.as_mut_ptr().add(fill), take) };
            fill += take;
            off = take;
            if fill < N {
                continue;
            }
            f(index, &mut tmp);
            index += 1;
            // SAFETY: the block's bytes, from `start` on, lie in entries valid for writes.
            unsafe { scatter(iov, start, &tmp) };
            fill = 0;
        }
        while v.iov_len - off >= N {
            // SAFETY: `N` bytes at `base + off` lie inside this entry, valid for reads and
            // writes during the call; `[u8; N]` has alignment 1; this is the only live
            // reference to them until `f` returns.
            let block = unsafe { &mut *base.add(off).cast::<[u8; N]>() };
            f(index, block);
            index += 1;
            off += N;
        }
        if off < v.iov_len {
            start = (i, off);
            fill = v.iov_len - off;
            // SAFETY: `fill < N` bytes readable at `base + off`, inside this entry.
            unsafe { ptr::copy_nonoverlapping(base.add(off), tmp.as_mut_ptr(), fill) };
        }
    }
}

/// Writes a gathered block back, from `(entry, offset)` on, across entries.
///
/// # Safety
///
/// `N` bytes from `start` on lie in entries of `iov` valid for writes.
unsafe fn scatter<const N: usize>(iov: &[libc::iovec], start: (usize, usize), block: &[u8; N]) {
    let (mut i, mut off) = start;
    let mut done = 0;
    while done < N {
        let v = &iov[i];
        let n = (v.iov_len - off).min(N - done);
        // SAFETY: `n` bytes at `iov_base + off` lie inside entry `i` (valid for writes, per
        // the caller); the source is a stack buffer and cannot overlap.
        unsafe {
            ptr::copy_nonoverlapping(
                block.as_ptr().add(done),
                v.iov_base.cast::<u8>().add(off),
                n,
            )
        };
        done += n;
        i += 1;
        off = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Splits `data` at `cuts` (a zero-length piece where two cuts are equal).
    fn split(data: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut at = 0;
        for &c in cuts {
            out.push(data[at..c].to_vec());
            at = c;
        }
        out.push(data[at..].to_vec());
        out
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 512) as u8).collect()
    }

    /// Runs `for_each_sector_mut` over `data` split at `cuts`, XOR-ing each sector with its
    /// index + 1, and checks both the result and the indexes seen.
    fn check_split(n: usize, cuts: &[usize]) {
        let data = pattern(n);
        let mut pieces = split(&data, cuts);
        let mut slices: Vec<IoSliceMut<'_>> =
            pieces.iter_mut().map(|p| IoSliceMut::new(p)).collect();
        let mut req = ReqMut::new(Op::Read, 0, 0, n as u64, &mut slices);
        let mut seen = Vec::new();
        req.for_each_sector_mut(|i, s| {
            seen.push(i);
            s.iter_mut().for_each(|b| *b ^= i as u8 + 1);
        })
        .unwrap();
        let got: Vec<u8> = pieces.concat();
        let want: Vec<u8> = data
            .iter()
            .enumerate()
            .map(|(j, b)| b ^ ((j / 512) as u8 + 1))
            .collect();
        assert_eq!(got, want, "cuts {cuts:?}");
        assert_eq!(
            seen,
            (0..(n / 512) as u64).collect::<Vec<_>>(),
            "cuts {cuts:?}"
        );
    }

    #[test]
    fn sectors_across_iovec_boundaries() {
        check_split(2048, &[]);
        check_split(2048, &[512, 1024]);
        check_split(2048, &[1, 513, 1000, 1000, 1535, 2047]);
        check_split(1536, &[100, 200, 300, 400, 500, 600, 700, 1400]);
        let every_byte: Vec<usize> = (1..1024).collect();
        check_split(1024, &every_byte);
    }

    #[test]
    fn sector_helpers_refuse_misuse() {
        let mut buf = vec![0u8; 1000];
        let mut slices = [IoSliceMut::new(&mut buf)];
        let mut req = ReqMut::new(Op::Read, 0, 0, 1000, &mut slices);
        let err = req.for_each_sector_mut(|_, _| ()).unwrap_err();
        assert_eq!(
            err,
            DataError::Unaligned {
                len: 1000,
                block: 512
            }
        );
        let mut buf = vec![0u8; 512];
        let mut slices = [IoSliceMut::new(&mut buf)];
        let mut req = ReqMut::new(Op::Write, 0, 0, 512, &mut slices);
        assert_eq!(req.for_each_sector_mut(|_, _| ()), Err(DataError::NotARead));
        assert_eq!(req.for_each_buffer_mut(|_| ()), Err(DataError::NotARead));
    }

    #[test]
    fn bounce_with_data_gathers() {
        let data = pattern(1500);
        let pieces = split(&data, &[3, 700, 700, 1499]);
        let slices: Vec<IoSlice<'_>> = pieces.iter().map(|p| IoSlice::new(p)).collect();
        let mut bounce = vec![0u8; 1500];
        let mut req = Req::new(Op::Write, 1, 4096, 1500, &slices, Some(&mut bounce));
        assert_eq!(
            req.data().map(<[u8]>::len).collect::<Vec<_>>(),
            vec![3, 697, 0, 799, 1]
        );
        assert_eq!(req.bounce_with_data().unwrap(), &data[..]);
        assert_eq!(bounce, data);

        let mut short = vec![0u8; 10];
        let mut req = Req::new(Op::Write, 0, 0, 10, &slices, Some(&mut short));
        assert_eq!(
            req.bounce_with_data().unwrap_err(),
            DataError::LengthMismatch {
                guest: 1500,
                len: 10
            }
        );
        let mut req = Req::new(Op::Write, 0, 0, 1500, &slices, None);
        assert_eq!(req.bounce_with_data().unwrap_err(), DataError::NoBounce);
    }

    fn raw_request(op: u32, len: u64, iov: &[libc::iovec], bounce: *mut u8) -> Request {
        Request {
            op,
            queue: 0,
            offset: 0,
            len,
            iov: iov.as_ptr(),
            iovcnt: iov.len() as u32,
            _reserved: 0,
            bounce,
        }
    }

    #[test]
    fn raw_requests_are_validated() {
        let mut data = vec![1u8; 64];
        let good = [libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: 64,
        }];
        let null = [libc::iovec {
            iov_base: ptr::null_mut(),
            iov_len: 64,
        }];
        let mut bounce = vec![0u8; 64];
        let b = bounce.as_mut_ptr();
        let all = WANTS_WRITE_DATA | WANTS_READ_DATA;
        // SAFETY: the iovecs and buffers outlive every borrowed request.
        unsafe {
            assert!(Req::from_raw(&raw_request(OP_WRITE, 64, &good, b), all).is_ok());
            let err = Req::from_raw(&raw_request(OP_WRITE, 64, &null, b), all).err();
            assert_eq!(err, Some(Invalid::NullBuffer));
            let err = Req::from_raw(&raw_request(OP_WRITE, 65, &good, b), all).err();
            assert_eq!(err, Some(Invalid::Length));
            let err = Req::from_raw(&raw_request(OP_WRITE, 64, &good, ptr::null_mut()), all).err();
            assert_eq!(err, Some(Invalid::NoBounce));
            // Without the flag the image sees no bounce buffer and no length check is made.
            let mut req =
                Req::from_raw(&raw_request(OP_WRITE, 65, &good, ptr::null_mut()), 0).unwrap();
            assert!(req.bounce().is_none());
            let err =
                ReqMut::from_raw(&raw_request(OP_READ, 63, &good, ptr::null_mut()), all).err();
            assert_eq!(err, Some(Invalid::Length));
            let mut r = raw_request(OP_READ, 0, &good, ptr::null_mut());
            r.iov = ptr::null();
            assert_eq!(ReqMut::from_raw(&r, 0).err(), Some(Invalid::NullBuffer));
            r.iovcnt = 0;
            assert!(ReqMut::from_raw(&r, all).is_ok());
        }
    }
}
