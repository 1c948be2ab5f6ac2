//! virtio-blk definitions: feature bits, request types, status codes and the config space.
//!
//! The config space is serialized by hand into a little-endian byte array so the layout is
//! explicit and no `unsafe` is needed (virtio 1.2, 5.2.4 "Device configuration layout").

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

pub const SECTOR_SHIFT: u32 = 9;
pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;

/// Request types we honour.
pub const T_IN: u32 = VIRTIO_BLK_T_IN;
pub const T_OUT: u32 = VIRTIO_BLK_T_OUT;
pub const T_FLUSH: u32 = VIRTIO_BLK_T_FLUSH;
pub const T_GET_ID: u32 = VIRTIO_BLK_T_GET_ID;
pub const T_DISCARD: u32 = VIRTIO_BLK_T_DISCARD;
pub const T_WRITE_ZEROES: u32 = VIRTIO_BLK_T_WRITE_ZEROES;

/// Status byte values.
pub const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
pub const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
pub const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// Length of the serial returned by GET_ID.
pub const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;
/// The `unmap` flag of a write-zeroes segment.
pub const WRITE_ZEROES_FLAG_UNMAP: u32 = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
/// Size of one discard / write-zeroes segment in the request payload.
pub const DISCARD_SEGMENT_BYTES: usize = 16;
/// Most sectors in one discard or write-zeroes segment (4 GiB - 512 would overflow u32 bytes).
pub const MAX_DISCARD_SECTORS: u32 = (1 << 22) - 1;
/// Segments per discard / write-zeroes request. One keeps the engine to one SQE per request.
pub const MAX_DISCARD_SEGMENTS: u32 = 1;
/// Most data bytes in one write. A longer write is refused (IOERR): the copies a
/// replicated or driver-image write needs are bounded by it, and a write always fits one
/// replication frame. The device advertises at most this much (SEG_MAX × SIZE_MAX); reads,
/// which copy nothing, are not held to it.
pub const MAX_REQUEST_BYTES: u32 = 4 << 20;

/// Most data segments per request we advertise (SEG_MAX), given the queue size.
pub fn seg_max(queue_size: u16) -> u32 {
    u32::from(queue_size).saturating_sub(2).clamp(1, 254)
}

/// Largest single data segment we advertise (SIZE_MAX): as large as it can be (in whole
/// pages) while `seg_max` segments stay within [`MAX_REQUEST_BYTES`].
pub fn size_max(seg_max: u32) -> u32 {
    let per_segment = MAX_REQUEST_BYTES / seg_max.max(1);
    (per_segment & !4095).max(4096)
}

/// The vhost-user "protocol features" bit in the virtio feature word.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// Feature bits offered to the driver.
pub fn features(readonly: bool, queues: u16) -> u64 {
    let mut f = (1u64 << VIRTIO_F_VERSION_1)
        | (1 << VIRTIO_RING_F_INDIRECT_DESC)
        | (1 << VIRTIO_RING_F_EVENT_IDX)
        | (1 << VIRTIO_BLK_F_SIZE_MAX)
        | (1 << VIRTIO_BLK_F_SEG_MAX)
        | (1 << VIRTIO_BLK_F_BLK_SIZE)
        | (1 << VIRTIO_BLK_F_FLUSH)
        | (1 << VIRTIO_BLK_F_TOPOLOGY)
        | (1 << VIRTIO_BLK_F_CONFIG_WCE)
        | VHOST_USER_F_PROTOCOL_FEATURES;
    if queues > 1 {
        f |= 1 << VIRTIO_BLK_F_MQ;
    }
    if readonly {
        f |= 1 << VIRTIO_BLK_F_RO;
    } else {
        f |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
    }
    f
}

/// Offset of the `writeback` byte in the config space (the only field a driver may write).
pub const CONFIG_WRITEBACK_OFFSET: usize = 32;
/// Size of the config space we serve (through `secure_erase_sector_alignment`).
pub const CONFIG_LEN: usize = 72;

/// The parts of the config space that vary per disk.
#[derive(Debug, Clone, Copy)]
pub struct ConfigSpace {
    pub capacity_sectors: u64,
    pub seg_max: u32,
    /// Logical block size in bytes.
    pub blk_size: u32,
    /// log2(physical block / logical block).
    pub physical_block_exp: u8,
    pub num_queues: u16,
    pub writeback: bool,
}

impl ConfigSpace {
    /// Serializes the config space (virtio 1.2, 5.2.4).
    pub fn to_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut b = [0u8; CONFIG_LEN];
        let put32 = |b: &mut [u8; CONFIG_LEN], off: usize, v: u32| {
            b[off..off + 4].copy_from_slice(&v.to_le_bytes())
        };
        b[0..8].copy_from_slice(&self.capacity_sectors.to_le_bytes());
        put32(&mut b, 8, size_max(self.seg_max));
        put32(&mut b, 12, self.seg_max);
        // 16..20: geometry, unused.
        put32(&mut b, 20, self.blk_size);
        b[24] = self.physical_block_exp;
        b[25] = 0; // alignment_offset
        let min_io = (self.blk_size >> SECTOR_SHIFT).max(1) as u16;
        b[26..28].copy_from_slice(&min_io.to_le_bytes());
        put32(&mut b, 28, 0); // opt_io_size: no preference
        b[CONFIG_WRITEBACK_OFFSET] = u8::from(self.writeback);
        b[34..36].copy_from_slice(&self.num_queues.to_le_bytes());
        put32(&mut b, 36, MAX_DISCARD_SECTORS);
        put32(&mut b, 40, MAX_DISCARD_SEGMENTS);
        put32(&mut b, 44, (self.blk_size >> SECTOR_SHIFT).max(1));
        put32(&mut b, 48, MAX_DISCARD_SECTORS);
        put32(&mut b, 52, MAX_DISCARD_SEGMENTS);
        b[56] = 1; // write_zeroes_may_unmap
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_layout() {
        let c = ConfigSpace {
            capacity_sectors: 0x1122_3344,
            seg_max: 126,
            blk_size: 4096,
            physical_block_exp: 0,
            num_queues: 2,
            writeback: true,
        };
        let b = c.to_bytes();
        assert_eq!(u64::from_le_bytes(b[0..8].try_into().unwrap()), 0x1122_3344);
        assert_eq!(u32::from_le_bytes(b[12..16].try_into().unwrap()), 126);
        assert_eq!(u32::from_le_bytes(b[20..24].try_into().unwrap()), 4096);
        assert_eq!(b[32], 1);
        assert_eq!(u16::from_le_bytes(b[34..36].try_into().unwrap()), 2);
        assert_eq!(b[56], 1);
    }

    #[test]
    fn advertised_requests_stay_within_the_limit() {
        for queue_size in [2u16, 3, 4, 16, 64, 100, 128, 256, 1024, u16::MAX] {
            let seg = seg_max(queue_size);
            let size = size_max(seg);
            assert!(
                size >= 4096 && size % 4096 == 0,
                "queue {queue_size}: {size}"
            );
            assert!(
                u64::from(seg) * u64::from(size) <= u64::from(MAX_REQUEST_BYTES),
                "queue {queue_size}: {seg} x {size}"
            );
        }
        let c = ConfigSpace {
            capacity_sectors: 8,
            seg_max: 254,
            blk_size: 512,
            physical_block_exp: 0,
            num_queues: 1,
            writeback: false,
        };
        let b = c.to_bytes();
        assert_eq!(u32::from_le_bytes(b[8..12].try_into().unwrap()), 16384);
    }

    #[test]
    fn readonly_drops_discard() {
        let f = features(true, 1);
        assert_ne!(f & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(f & (1 << VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(f & (1 << VIRTIO_BLK_F_MQ), 0);
        assert_ne!(features(false, 2) & (1 << VIRTIO_BLK_F_MQ), 0);
    }
}
