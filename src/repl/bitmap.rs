//! The persistent dirty bitmap: which regions of a volume a replica may be missing.
//!
//! One bit per region (1 MiB by default). A bit is set, and made durable, before a write
//! that a replica will not get is acknowledged (see `docs/replication.md`), and cleared in
//! memory once the region has been resynced. Clearing is persisted lazily: a bit that stays
//! set on disk only costs a redundant resync of that region.
//!
//! On-disk layout: two slots, each `magic | generation | region_bytes | regions | crc32c |
//! bits`, written alternately with `pwrite` + `fdatasync`. A load takes the valid slot with
//! the highest generation, so a torn write of one slot leaves the other intact.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

const MAGIC: &[u8; 8] = b"FDBITMP1";
const HEADER: usize = 8 + 8 + 8 + 8 + 4;

pub struct DirtyMap {
    region_bytes: u64,
    regions: usize,
    bits: Vec<u64>,
    /// Set bits, kept so that `count` is cheap.
    set: usize,
    file: Option<File>,
    generation: u64,
    /// Bits changed since the last persist.
    changed: bool,
}

impl DirtyMap {
    /// A bitmap that lives only in memory (tests, simulation).
    pub fn in_memory(disk_bytes: u64, region_bytes: u64) -> DirtyMap {
        assert!(region_bytes.is_power_of_two() && region_bytes >= 4096);
        let regions = disk_bytes.div_ceil(region_bytes) as usize;
        DirtyMap {
            region_bytes,
            regions,
            bits: vec![0; regions.div_ceil(64)],
            set: 0,
            file: None,
            generation: 0,
            changed: false,
        }
    }

    /// Opens (or creates, all clear) the bitmap stored at `path`. A stored bitmap for another
    /// geometry is refused.
    pub fn open(path: &Path, disk_bytes: u64, region_bytes: u64) -> io::Result<DirtyMap> {
        let mut map = DirtyMap::in_memory(disk_bytes, region_bytes);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)?;
        let slot = map.slot_bytes() as u64;
        let mut best: Option<(u64, Vec<u64>)> = None;
        for s in 0..2u64 {
            let mut buf = vec![0u8; slot as usize];
            let n = read_full(&file, &mut buf, s * slot)?;
            if n < buf.len() {
                continue;
            }
            if let Some((generation, bits)) = map.decode(&buf)? {
                if best.as_ref().is_none_or(|(g, _)| generation > *g) {
                    best = Some((generation, bits));
                }
            }
        }
        if let Some((generation, bits)) = best {
            map.generation = generation;
            map.set = bits.iter().map(|w| w.count_ones() as usize).sum();
            map.bits = bits;
        }
        map.file = Some(file);
        if map.generation == 0 {
            // A fresh file: write both slots so the geometry is on record.
            map.changed = true;
            map.persist()?;
            map.changed = true;
            map.persist()?;
        }
        Ok(map)
    }

    fn slot_bytes(&self) -> usize {
        HEADER + self.bits.len() * 8
    }

    fn decode(&self, buf: &[u8]) -> io::Result<Option<(u64, Vec<u64>)>> {
        if &buf[..8] != MAGIC {
            return Ok(None);
        }
        let word = |i: usize| u64::from_le_bytes(buf[i..i + 8].try_into().unwrap_or_default());
        let generation = word(8);
        let (rb, regions) = (word(16), word(24));
        let crc = u32::from_le_bytes(buf[32..36].try_into().unwrap_or_default());
        if crc32c::crc32c(&buf[HEADER..]) != crc ^ (generation as u32) {
            return Ok(None); // torn or corrupt slot
        }
        if rb != self.region_bytes || regions != self.regions as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the dirty bitmap is for {regions} regions of {rb} bytes, this disk has {} of {}",
                    self.regions, self.region_bytes
                ),
            ));
        }
        let bits = buf[HEADER..]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect();
        Ok(Some((generation, bits)))
    }

    pub fn region_bytes(&self) -> u64 {
        self.region_bytes
    }

    pub fn regions(&self) -> usize {
        self.regions
    }

    /// The regions `[offset, offset + len)` touches (a zero length touches none).
    pub fn span(&self, offset: u64, len: u64) -> std::ops::Range<usize> {
        if len == 0 {
            return 0..0;
        }
        let first = (offset / self.region_bytes) as usize;
        let last = ((offset + len - 1) / self.region_bytes) as usize;
        first.min(self.regions)..(last + 1).min(self.regions)
    }

    pub fn is_set(&self, region: usize) -> bool {
        region < self.regions && self.bits[region / 64] & (1 << (region % 64)) != 0
    }

    pub fn set(&mut self, region: usize) -> bool {
        if region >= self.regions || self.is_set(region) {
            return false;
        }
        self.bits[region / 64] |= 1 << (region % 64);
        self.set += 1;
        self.changed = true;
        true
    }

    pub fn clear(&mut self, region: usize) {
        if self.is_set(region) {
            self.bits[region / 64] &= !(1 << (region % 64));
            self.set -= 1;
            self.changed = true;
        }
    }

    /// Marks every region `[offset, offset + len)` touches; returns whether a bit was new.
    pub fn mark(&mut self, offset: u64, len: u64) -> bool {
        let mut new = false;
        for r in self.span(offset, len) {
            new |= self.set(r);
        }
        new
    }

    /// Whether marking `[offset, offset + len)` would set a new bit.
    pub fn covers(&self, offset: u64, len: u64) -> bool {
        self.span(offset, len).all(|r| self.is_set(r))
    }

    pub fn set_all(&mut self) {
        for r in 0..self.regions {
            self.set(r);
        }
    }

    pub fn count(&self) -> usize {
        self.set
    }

    /// The first set region at or after `from`, wrapping around.
    pub fn next_set(&self, from: usize) -> Option<usize> {
        if self.set == 0 {
            return None;
        }
        (from..self.regions)
            .chain(0..from.min(self.regions))
            .find(|&r| self.is_set(r))
    }

    /// Makes the current bits durable, if they changed (one `pwrite` + `fdatasync`).
    pub fn persist(&mut self) -> io::Result<()> {
        if !self.changed {
            return Ok(());
        }
        let Some(file) = &self.file else {
            self.changed = false;
            return Ok(());
        };
        let generation = self.generation + 1;
        let mut buf = Vec::with_capacity(self.slot_bytes());
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&generation.to_le_bytes());
        buf.extend_from_slice(&self.region_bytes.to_le_bytes());
        buf.extend_from_slice(&(self.regions as u64).to_le_bytes());
        buf.extend_from_slice(&[0; 4]);
        for w in &self.bits {
            buf.extend_from_slice(&w.to_le_bytes());
        }
        let crc = crc32c::crc32c(&buf[HEADER..]) ^ (generation as u32);
        buf[32..36].copy_from_slice(&crc.to_le_bytes());
        let at = (generation % 2) * self.slot_bytes() as u64;
        file.write_all_at(&buf, at)?;
        file.sync_data()?;
        self.generation = generation;
        self.changed = false;
        Ok(())
    }
}

fn read_full(file: &File, buf: &mut [u8], at: u64) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], at + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn spans_and_marks() {
        let mut m = DirtyMap::in_memory(10 * MIB + 512, MIB);
        assert_eq!(m.regions(), 11);
        assert_eq!(m.span(0, 0), 0..0);
        assert_eq!(m.span(MIB - 512, 1024), 0..2);
        assert_eq!(m.span(10 * MIB, 512), 10..11);
        assert!(m.mark(MIB - 512, 1024));
        assert!(!m.mark(0, 512), "already set");
        assert!(m.covers(0, 2 * MIB));
        assert!(!m.covers(0, 3 * MIB));
        assert_eq!(m.count(), 2);
        assert_eq!(m.next_set(2), Some(0));
        m.clear(0);
        m.clear(1);
        assert_eq!(m.next_set(0), None);
        m.set_all();
        assert_eq!(m.count(), 11);
    }

    #[test]
    fn persists_across_reopen_and_survives_a_torn_slot() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bm");
        {
            let mut m = DirtyMap::open(&p, 64 * MIB, MIB).unwrap();
            assert_eq!(m.count(), 0);
            m.mark(5 * MIB, 1);
            m.persist().unwrap();
            m.mark(9 * MIB, 1);
            m.persist().unwrap();
        }
        let m = DirtyMap::open(&p, 64 * MIB, MIB).unwrap();
        assert!(m.is_set(5) && m.is_set(9) && m.count() == 2);
        // Tear the newest slot: the previous one (bit 5 only) must win.
        let slot = m.slot_bytes() as u64;
        let newest = m.generation % 2;
        drop(m);
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[0xff; 8], newest * slot + HEADER as u64)
            .unwrap();
        let m = DirtyMap::open(&p, 64 * MIB, MIB).unwrap();
        assert!(m.is_set(5) && !m.is_set(9));
        assert!(
            DirtyMap::open(&p, 32 * MIB, MIB).is_err(),
            "geometry is checked"
        );
    }
}
