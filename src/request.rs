//! Request parsing: one virtio-blk descriptor chain becomes one validated [`Request`].
//!
//! The parser accepts any descriptor layout the spec allows (VIRTIO_F_ANY_LAYOUT is implied
//! by VERSION_1): the first 16 device-readable bytes are the header, the last device-writable
//! byte is the status, and the data is whatever lies between. Data buffers become `iovec`s that
//! point straight into guest memory, written into a caller-owned vector so that parsing
//! allocates nothing. Every check that the guest can fail ends in a [`ParseError`] with the
//! virtio status it maps to; nothing here panics on guest input.

use std::ops::Deref;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};

use crate::virtio_blk::*;

/// Guest memory as mapped by this process.
pub type GuestMem = GuestMemoryMmap<()>;

/// Bytes in the request header (`type`, `reserved`, `sector`).
pub const HEADER_BYTES: u32 = 16;
/// Most descriptors we accept in one chain (header + data + status, indirect included).
pub const MAX_CHAIN_DESCS: usize = 512;
/// Most iovecs one request may need (data descriptors, each possibly split across regions).
pub const MAX_IOVECS: usize = 1024;

/// What a request asks for. Offsets and lengths are in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read { offset: u64 },
    Write { offset: u64 },
    Flush,
    GetId,
    Discard { offset: u64, len: u64 },
    WriteZeroes { offset: u64, len: u64, unmap: bool },
}

impl Op {
    /// The byte range a request changes (writes, discards, write-zeroes), given its data
    /// length; `None` for requests that change nothing.
    pub fn mutation(self, data_len: u32) -> Option<(u64, u64)> {
        match self {
            Op::Write { offset } => Some((offset, u64::from(data_len))),
            Op::Discard { offset, len } | Op::WriteZeroes { offset, len, .. } => {
                Some((offset, len))
            }
            _ => None,
        }
    }
}

/// A validated request. Its data buffers are the `iovec`s the parser wrote for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub head: u16,
    pub op: Op,
    /// Guest address of the status byte.
    pub status: GuestAddress,
    /// Bytes of data (device-readable for writes, device-writable for reads and GET_ID).
    pub data_len: u32,
}

impl Request {
    /// A read, write, discard or write-zeroes of no bytes: there is nothing to do.
    pub fn is_empty(&self) -> bool {
        match self.op {
            Op::Read { .. } | Op::Write { .. } => self.data_len == 0,
            Op::Discard { len, .. } | Op::WriteZeroes { len, .. } => len == 0,
            Op::Flush | Op::GetId => false,
        }
    }
}

/// Why a chain was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("the chain has no device-writable status byte at its end")]
    NoStatus,
    #[error("the chain is longer than {MAX_CHAIN_DESCS} descriptors")]
    ChainTooLong,
    #[error("the header is {0} bytes, expected {HEADER_BYTES}")]
    HeaderTooShort(u32),
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    #[error("the data buffers point the wrong way for request type {0}")]
    WrongDirection(u32),
    #[error("a buffer at {0:#x} lies outside guest memory")]
    BadAddress(u64),
    #[error("the data length {0} is not a multiple of 512")]
    UnalignedLength(u64),
    #[error("sectors {first}..{end} are beyond the end of the disk ({capacity} sectors)")]
    OutOfRange { first: u64, end: u64, capacity: u64 },
    #[error("the disk is read-only")]
    ReadOnly,
    #[error("unknown request type {0}")]
    UnknownType(u32),
    #[error("the request needs more than {MAX_IOVECS} buffers")]
    TooManyBuffers,
    #[error(
        "the write carries {0} bytes of data, more than the {MAX_REQUEST_BYTES} the device accepts"
    )]
    TooLarge(u64),
    #[error(
        "a discard or write-zeroes request carries {0} payload bytes, expected one 16-byte segment"
    )]
    BadSegmentCount(u32),
    #[error("a discard or write-zeroes segment has unsupported flags {0:#x}")]
    BadSegmentFlags(u32),
    #[error("a GET_ID request has no buffer for the serial")]
    NoIdBuffer,
}

impl ParseError {
    /// The virtio status reported for this error; `None` when no status byte can be written.
    pub fn status(&self) -> Option<u8> {
        match self {
            ParseError::NoStatus => None,
            ParseError::UnknownType(_) | ParseError::BadSegmentFlags(_) => Some(S_UNSUPP),
            ParseError::ChainTooLong
            | ParseError::HeaderTooShort(_)
            | ParseError::ReadableAfterWritable
            | ParseError::WrongDirection(_)
            | ParseError::BadAddress(_)
            | ParseError::UnalignedLength(_)
            | ParseError::OutOfRange { .. }
            | ParseError::ReadOnly
            | ParseError::TooManyBuffers
            | ParseError::TooLarge(_)
            | ParseError::BadSegmentCount(_)
            | ParseError::NoIdBuffer => Some(S_IOERR),
        }
    }
}

/// A refused chain: its head, where to write the status (if anywhere) and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejected {
    pub head: u16,
    pub status: Option<GuestAddress>,
    pub error: ParseError,
}

/// What the parser needs to know about the disk.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    pub capacity_sectors: u64,
    pub readonly: bool,
}

/// Reusable buffers for parsing, allocated once per queue.
pub struct Scratch {
    descs: Vec<Descriptor>,
}

impl Default for Scratch {
    fn default() -> Self {
        Scratch {
            descs: Vec::with_capacity(MAX_CHAIN_DESCS),
        }
    }
}

/// Parses one chain. On success the data buffers are in `iov` (cleared first).
pub fn parse<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMem,
    geo: Geometry,
    scratch: &mut Scratch,
    iov: &mut Vec<libc::iovec>,
) -> Result<Request, Rejected>
where
    M: Deref<Target = GuestMem>,
{
    parse_descriptors(chain.head_index(), chain, mem, geo, scratch, iov)
}

/// Parses the chain that starts at descriptor `head` of the table at `desc_table`, walking it
/// ourselves (used to resubmit in-flight requests after a reconnect, when there is no avail
/// ring entry to pop).
pub fn parse_head(
    head: u16,
    desc_table: GuestAddress,
    queue_size: u16,
    mem: &GuestMem,
    geo: Geometry,
    scratch: &mut Scratch,
    iov: &mut Vec<libc::iovec>,
) -> Result<Request, Rejected> {
    let walker = Walker {
        mem,
        table: desc_table,
        size: queue_size,
        next: head,
        ttl: queue_size,
        indirect: false,
        bytes: 0,
    };
    parse_descriptors(head, walker, mem, geo, scratch, iov)
}

/// Follows a descriptor chain through the table, with the same bounds as virtio-queue's
/// iterator: at most `size` descriptors, one level of indirection, indices in range, and the
/// chain ends before the descriptor that takes it past 2^32 bytes.
struct Walker<'a> {
    mem: &'a GuestMem,
    table: GuestAddress,
    size: u16,
    next: u16,
    ttl: u16,
    indirect: bool,
    /// Bytes of the descriptors yielded so far.
    bytes: u32,
}

impl Iterator for Walker<'_> {
    type Item = Descriptor;

    fn next(&mut self) -> Option<Descriptor> {
        if self.ttl == 0 || self.next >= self.size {
            return None;
        }
        let addr = self.table.checked_add(u64::from(self.next) * 16)?;
        let d: Descriptor = self.mem.read_obj(addr).ok()?;
        if d.refers_to_indirect_table() {
            let entries = d.len() / 16;
            if self.indirect || d.len() % 16 != 0 || entries == 0 || entries > u32::from(u16::MAX) {
                return None;
            }
            self.indirect = true;
            self.table = d.addr();
            self.size = entries as u16;
            self.ttl = self.size;
            self.next = 0;
            return self.next();
        }
        self.bytes = self.bytes.checked_add(d.len())?;
        self.ttl -= 1;
        if d.has_next() {
            self.next = d.next();
        } else {
            self.ttl = 0;
        }
        Some(d)
    }
}

fn parse_descriptors(
    head: u16,
    descs: impl Iterator<Item = Descriptor>,
    mem: &GuestMem,
    geo: Geometry,
    scratch: &mut Scratch,
    iov: &mut Vec<libc::iovec>,
) -> Result<Request, Rejected> {
    iov.clear();
    let status = collect(descs, &mut scratch.descs).map_err(|error| Rejected {
        head,
        status: None,
        error,
    })?;
    let reject = |error| Rejected {
        head,
        status: Some(status),
        error,
    };
    let descs = &scratch.descs;
    let readable = descs.iter().take_while(|d| !d.is_write_only()).count();
    if descs[readable..].iter().any(|d| !d.is_write_only()) {
        return Err(reject(ParseError::ReadableAfterWritable));
    }
    let (rd, wr) = descs.split_at(readable);
    let rd_len: u64 = rd.iter().map(|d| u64::from(d.len())).sum();
    // The status byte is the last writable byte; it is not data.
    let wr_len: u64 = wr.iter().map(|d| u64::from(d.len())).sum::<u64>() - 1;
    if rd_len < u64::from(HEADER_BYTES) {
        return Err(reject(ParseError::HeaderTooShort(rd_len as u32)));
    }
    let mut header = [0u8; HEADER_BYTES as usize];
    read_bytes(mem, rd, 0, &mut header).map_err(reject)?;
    let req_type = u32::from_le_bytes(header[0..4].try_into().unwrap_or_default());
    let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
    let rd_data = rd_len - u64::from(HEADER_BYTES);

    let op = match req_type {
        T_IN | T_OUT => {
            let (len, write) = if req_type == T_OUT {
                if wr_len != 0 {
                    return Err(reject(ParseError::WrongDirection(req_type)));
                }
                (rd_data, true)
            } else {
                if rd_data != 0 {
                    return Err(reject(ParseError::WrongDirection(req_type)));
                }
                (wr_len, false)
            };
            // A write's data is copied when it is replicated or transformed, and it must fit
            // one replication frame; a read moves straight into the guest's buffers.
            if write && len > u64::from(MAX_REQUEST_BYTES) {
                return Err(reject(ParseError::TooLarge(len)));
            }
            check_range(geo, sector, len).map_err(reject)?;
            if write && geo.readonly {
                return Err(reject(ParseError::ReadOnly));
            }
            if write {
                build_iovecs(mem, rd, u64::from(HEADER_BYTES), len, iov).map_err(reject)?;
                Op::Write {
                    offset: sector << SECTOR_SHIFT,
                }
            } else {
                build_iovecs(mem, wr, 0, len, iov).map_err(reject)?;
                Op::Read {
                    offset: sector << SECTOR_SHIFT,
                }
            }
        }
        T_FLUSH => Op::Flush,
        T_GET_ID => {
            if wr_len == 0 {
                return Err(reject(ParseError::NoIdBuffer));
            }
            build_iovecs(mem, wr, 0, wr_len.min(ID_BYTES as u64), iov).map_err(reject)?;
            Op::GetId
        }
        T_DISCARD | T_WRITE_ZEROES => {
            if wr_len != 0 {
                return Err(reject(ParseError::WrongDirection(req_type)));
            }
            if rd_data != DISCARD_SEGMENT_BYTES as u64 {
                return Err(reject(ParseError::BadSegmentCount(rd_data as u32)));
            }
            let mut seg = [0u8; DISCARD_SEGMENT_BYTES];
            read_bytes(mem, rd, u64::from(HEADER_BYTES), &mut seg).map_err(reject)?;
            segment_op(req_type, &seg, geo).map_err(reject)?
        }
        other => return Err(reject(ParseError::UnknownType(other))),
    };
    let data_len = iov.iter().map(|v| v.iov_len as u64).sum::<u64>() as u32;
    Ok(Request {
        head,
        op,
        status,
        data_len,
    })
}

/// Walks the chain into `descs` and returns the address of the status byte.
fn collect(
    chain: impl Iterator<Item = Descriptor>,
    descs: &mut Vec<Descriptor>,
) -> Result<GuestAddress, ParseError> {
    descs.clear();
    let mut too_long = false;
    let mut last = None;
    for d in chain {
        if descs.len() < MAX_CHAIN_DESCS {
            descs.push(d);
        } else {
            too_long = true;
        }
        last = Some(d);
    }
    let last = last.ok_or(ParseError::NoStatus)?;
    if !last.is_write_only() || last.len() == 0 {
        return Err(ParseError::NoStatus);
    }
    let status = last
        .addr()
        .checked_add(u64::from(last.len()) - 1)
        .ok_or(ParseError::NoStatus)?;
    if too_long {
        return Err(ParseError::ChainTooLong);
    }
    Ok(status)
}

fn check_range(geo: Geometry, sector: u64, len: u64) -> Result<(), ParseError> {
    if len % SECTOR_SIZE != 0 {
        return Err(ParseError::UnalignedLength(len));
    }
    if len > u64::from(u32::MAX) {
        return Err(ParseError::TooManyBuffers);
    }
    let end = sector.checked_add(len >> SECTOR_SHIFT);
    match end {
        Some(end) if end <= geo.capacity_sectors => Ok(()),
        _ => Err(ParseError::OutOfRange {
            first: sector,
            end: end.unwrap_or(u64::MAX),
            capacity: geo.capacity_sectors,
        }),
    }
}

fn segment_op(
    req_type: u32,
    seg: &[u8; DISCARD_SEGMENT_BYTES],
    geo: Geometry,
) -> Result<Op, ParseError> {
    let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or_default());
    let sectors = u32::from_le_bytes(seg[8..12].try_into().unwrap_or_default());
    let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or_default());
    if geo.readonly {
        return Err(ParseError::ReadOnly);
    }
    // Discard takes no flags; write-zeroes takes only UNMAP.
    let allowed = if req_type == T_DISCARD {
        0
    } else {
        WRITE_ZEROES_FLAG_UNMAP
    };
    if flags & !allowed != 0 {
        return Err(ParseError::BadSegmentFlags(flags));
    }
    if sectors > MAX_DISCARD_SECTORS {
        return Err(ParseError::OutOfRange {
            first: sector,
            end: sector.saturating_add(u64::from(sectors)),
            capacity: geo.capacity_sectors,
        });
    }
    let len = u64::from(sectors) << SECTOR_SHIFT;
    check_range(geo, sector, len)?;
    let offset = sector << SECTOR_SHIFT;
    Ok(if req_type == T_DISCARD {
        Op::Discard { offset, len }
    } else {
        Op::WriteZeroes {
            offset,
            len,
            unmap: flags & WRITE_ZEROES_FLAG_UNMAP != 0,
        }
    })
}

/// Calls `f(addr, len)` for the byte range `[skip, skip + len)` of the buffers `descs`.
fn for_each_range(
    descs: &[Descriptor],
    mut skip: u64,
    mut len: u64,
    mut f: impl FnMut(GuestAddress, u64) -> Result<(), ParseError>,
) -> Result<(), ParseError> {
    for d in descs {
        if len == 0 {
            break;
        }
        let dlen = u64::from(d.len());
        if skip >= dlen {
            skip -= dlen;
            continue;
        }
        let take = (dlen - skip).min(len);
        let addr = d
            .addr()
            .checked_add(skip)
            .ok_or(ParseError::BadAddress(d.addr().0))?;
        f(addr, take)?;
        len -= take;
        skip = 0;
    }
    Ok(())
}

/// The region holding all of `[addr, addr + len)`, and the offset of `addr` in it. `None`
/// when the range leaves guest memory or crosses into another region (the slow path).
#[inline]
fn within_one_region(
    mem: &GuestMem,
    addr: GuestAddress,
    len: u64,
) -> Option<(&vm_memory::GuestRegionMmap<()>, MemoryRegionAddress)> {
    let (region, at) = mem.to_region_addr(addr)?;
    (at.0.checked_add(len)? <= region.len()).then_some((region, at))
}

fn read_bytes(
    mem: &GuestMem,
    descs: &[Descriptor],
    skip: u64,
    out: &mut [u8],
) -> Result<(), ParseError> {
    let mut pos = 0usize;
    for_each_range(descs, skip, out.len() as u64, |addr, len| {
        let end = pos + len as usize;
        let read = match within_one_region(mem, addr, len) {
            Some((region, at)) => region.read_slice(&mut out[pos..end], at),
            None => mem.read_slice(&mut out[pos..end], addr),
        };
        read.map_err(|_| ParseError::BadAddress(addr.0))?;
        pos = end;
        Ok(())
    })
}

/// Appends `iovec`s covering `[skip, skip + len)` of `descs`, splitting at region boundaries.
fn build_iovecs(
    mem: &GuestMem,
    descs: &[Descriptor],
    skip: u64,
    len: u64,
    iov: &mut Vec<libc::iovec>,
) -> Result<(), ParseError> {
    for_each_range(descs, skip, len, |addr, len| {
        // Almost every buffer lies inside one region: one lookup, no slice iterator.
        if let Some((region, at)) = within_one_region(mem, addr, len) {
            let base = region
                .get_host_address(at)
                .map_err(|_| ParseError::BadAddress(addr.0))?;
            if iov.len() == MAX_IOVECS {
                return Err(ParseError::TooManyBuffers);
            }
            iov.push(libc::iovec {
                iov_base: base.cast(),
                iov_len: len as usize,
            });
            return Ok(());
        }
        for slice in mem.get_slices(addr, len as usize) {
            let slice = slice.map_err(|_| ParseError::BadAddress(addr.0))?;
            if iov.len() == MAX_IOVECS {
                return Err(ParseError::TooManyBuffers);
            }
            iov.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests;
