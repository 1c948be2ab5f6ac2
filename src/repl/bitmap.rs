//! Region bitmaps: which regions of a volume a replica may be missing (the dirty bitmaps),
//! and which regions may have writes in flight or unflushed on the primary (the activity
//! log). See `docs/replication.md`.
//!
//! [`DirtyMap`] is the set in memory: one bit per region (1 MiB by default). The replication
//! state machine (`core`) owns its maps and never touches a file. [`BitmapFile`] stores a
//! snapshot of a map durably, with the identity it describes ([`Tag`]): "the copy that says
//! this volume UUID and generation lacks at most these regions", and the epoch of the
//! primary that stored it (a bitmap is trusted only by the primary of the next epoch).
//!
//! On-disk layout: two slots, each `magic | generation | region_bytes | regions | crc32c |
//! uuid_len | uuid[64] | gen | epoch | bits`, written alternately with `pwrite` +
//! `fdatasync`. A load takes the valid slot with the highest generation, so a torn write of
//! one slot leaves the other.
//! A file that exists but has no valid slot (corrupt, another geometry, an older format)
//! loads as [`Loaded::Invalid`]: its owner must treat every region as dirty (fail closed).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

const MAGIC: &[u8; 8] = b"FDBITMP3";
/// Longest volume UUID stored.
const UUID_MAX: usize = 64;
/// magic, generation, region_bytes, regions, crc, uuid_len, uuid, gen, epoch.
const HEADER: usize = 8 + 8 + 8 + 8 + 4 + 1 + UUID_MAX + 8 + 8;
const CRC_AT: usize = 32;
const UUID_AT: usize = CRC_AT + 4;
const GEN_AT: usize = UUID_AT + 1 + UUID_MAX;
const EPOCH_AT: usize = GEN_AT + 8;

/// A set of regions, in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyMap {
    region_bytes: u64,
    regions: usize,
    bits: Vec<u64>,
    /// Set bits, kept so that `count` is cheap.
    set: usize,
}

impl DirtyMap {
    /// An empty map for a disk of `disk_bytes` in regions of `region_bytes`.
    pub fn in_memory(disk_bytes: u64, region_bytes: u64) -> DirtyMap {
        assert!(region_bytes.is_power_of_two() && region_bytes >= 4096);
        let regions = disk_bytes.div_ceil(region_bytes) as usize;
        DirtyMap {
            region_bytes,
            regions,
            bits: vec![0; regions.div_ceil(64)],
            set: 0,
        }
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
        let last = (offset.saturating_add(len - 1) / self.region_bytes) as usize;
        first.min(self.regions)..(last + 1).min(self.regions)
    }

    pub fn is_set(&self, region: usize) -> bool {
        region < self.regions && self.bits[region / 64] & (1 << (region % 64)) != 0
    }

    /// Sets one region; returns whether it was new.
    pub fn set(&mut self, region: usize) -> bool {
        if region >= self.regions || self.is_set(region) {
            return false;
        }
        self.bits[region / 64] |= 1 << (region % 64);
        self.set += 1;
        true
    }

    /// Clears one region; returns whether it was set.
    pub fn clear(&mut self, region: usize) -> bool {
        if !self.is_set(region) {
            return false;
        }
        self.bits[region / 64] &= !(1 << (region % 64));
        self.set -= 1;
        true
    }

    /// Marks every region `[offset, offset + len)` touches; returns whether a bit was new.
    pub fn mark(&mut self, offset: u64, len: u64) -> bool {
        let mut new = false;
        for r in self.span(offset, len) {
            new |= self.set(r);
        }
        new
    }

    /// Whether every region `[offset, offset + len)` touches is set.
    pub fn covers(&self, offset: u64, len: u64) -> bool {
        self.span(offset, len).all(|r| self.is_set(r))
    }

    pub fn set_all(&mut self) {
        for r in 0..self.regions {
            self.set(r);
        }
    }

    pub fn clear_all(&mut self) {
        self.bits.iter_mut().for_each(|w| *w = 0);
        self.set = 0;
    }

    /// Adds every region of `other` (same geometry); returns how many were new.
    pub fn union(&mut self, other: &DirtyMap) -> usize {
        let mut new = 0;
        for r in other.iter() {
            new += usize::from(self.set(r));
        }
        new
    }

    pub fn count(&self) -> usize {
        self.set
    }

    pub fn is_empty(&self) -> bool {
        self.set == 0
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

    /// The set regions, in order.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.regions).filter(|&r| self.is_set(r))
    }

    /// The bits as words (bit `r % 64` of word `r / 64` is region `r`).
    pub fn words(&self) -> &[u64] {
        &self.bits
    }

    /// Replaces the bits with `words` (extra bits past the last region are ignored).
    pub fn load_words(&mut self, words: &[u64]) {
        self.clear_all();
        for r in 0..self.regions {
            if words.get(r / 64).is_some_and(|w| w & (1 << (r % 64)) != 0) {
                self.set(r);
            }
        }
    }
}

/// The copy a stored bitmap describes: a volume UUID (or empty) and a
/// data generation (0: none).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tag {
    pub uuid: String,
    pub gen: u64,
}

/// What [`BitmapFile::open`] found.
#[derive(Debug)]
pub enum Loaded {
    /// No file, or an empty one: nothing was ever stored.
    New,
    /// The bits, the copy they describe, and the epoch of the primary that stored them.
    Valid(DirtyMap, Tag, u64),
    /// A file with no valid slot: every region must count as dirty. The reason is for logs.
    Invalid(String),
}

/// A bitmap stored in a file (see the module documentation).
pub struct BitmapFile {
    file: File,
    generation: u64,
    region_bytes: u64,
    regions: usize,
}

impl BitmapFile {
    /// Opens (creating if needed) the bitmap stored at `path` for a disk of this geometry.
    pub fn open(
        path: &Path,
        disk_bytes: u64,
        region_bytes: u64,
    ) -> io::Result<(BitmapFile, Loaded)> {
        let proto = DirtyMap::in_memory(disk_bytes, region_bytes);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)?;
        let mut this = BitmapFile {
            file,
            generation: 0,
            region_bytes,
            regions: proto.regions(),
        };
        let len = this.file.metadata()?.len();
        if len == 0 {
            return Ok((this, Loaded::New));
        }
        let slot = this.slot_bytes() as u64;
        let mut best: Option<(u64, DirtyMap, Tag, u64)> = None;
        let mut why = String::from("no valid slot");
        for s in 0..2u64 {
            let mut buf = vec![0u8; slot as usize];
            if read_full(&this.file, &mut buf, s * slot)? < buf.len() {
                continue;
            }
            match this.decode(&buf, &proto) {
                Ok((generation, map, tag, epoch)) => {
                    if best.as_ref().is_none_or(|(g, ..)| generation > *g) {
                        best = Some((generation, map, tag, epoch));
                    }
                }
                Err(e) => why = e,
            }
        }
        Ok(match best {
            Some((generation, map, tag, epoch)) => {
                this.generation = generation;
                (this, Loaded::Valid(map, tag, epoch))
            }
            None => (this, Loaded::Invalid(why)),
        })
    }

    fn slot_bytes(&self) -> usize {
        HEADER + self.regions.div_ceil(64) * 8
    }

    fn decode(&self, buf: &[u8], proto: &DirtyMap) -> Result<(u64, DirtyMap, Tag, u64), String> {
        if &buf[..8] != MAGIC {
            return Err("not a bitmap of this format".into());
        }
        let word = |i: usize| u64::from_le_bytes(buf[i..i + 8].try_into().unwrap_or_default());
        let generation = word(8);
        let crc = u32::from_le_bytes(buf[CRC_AT..CRC_AT + 4].try_into().unwrap_or_default());
        if crc32c::crc32c(&buf[CRC_AT + 4..]) != crc ^ (generation as u32) {
            return Err("torn or corrupt".into());
        }
        let (rb, regions) = (word(16), word(24));
        if rb != self.region_bytes || regions != self.regions as u64 {
            return Err(format!(
                "stored for {regions} regions of {rb} bytes, the disk has {} of {}",
                self.regions, self.region_bytes
            ));
        }
        let n = usize::from(buf[UUID_AT]).min(UUID_MAX);
        let uuid = String::from_utf8(buf[UUID_AT + 1..UUID_AT + 1 + n].to_vec())
            .map_err(|_| "a uuid that is not UTF-8".to_string())?;
        let tag = Tag {
            uuid,
            gen: word(GEN_AT),
        };
        let epoch = word(EPOCH_AT);
        let words: Vec<u64> = buf[HEADER..]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect();
        let mut map = proto.clone();
        map.load_words(&words);
        Ok((generation, map, tag, epoch))
    }

    /// Makes `words` (of a map of this geometry), `tag` and `epoch` durable: one `pwrite` of
    /// the older slot and one `fdatasync`. A uuid longer than 64 bytes is refused.
    pub fn store(&mut self, words: &[u64], tag: &Tag, epoch: u64) -> io::Result<()> {
        if tag.uuid.len() > UUID_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a volume uuid longer than 64 bytes",
            ));
        }
        let generation = self.generation + 1;
        let mut buf = Vec::with_capacity(self.slot_bytes());
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&generation.to_le_bytes());
        buf.extend_from_slice(&self.region_bytes.to_le_bytes());
        buf.extend_from_slice(&(self.regions as u64).to_le_bytes());
        buf.extend_from_slice(&[0; 4]);
        let mut uuid = [0u8; 1 + UUID_MAX];
        uuid[0] = tag.uuid.len() as u8;
        uuid[1..1 + tag.uuid.len()].copy_from_slice(tag.uuid.as_bytes());
        buf.extend_from_slice(&uuid);
        buf.extend_from_slice(&tag.gen.to_le_bytes());
        buf.extend_from_slice(&epoch.to_le_bytes());
        let n = self.regions.div_ceil(64);
        for i in 0..n {
            buf.extend_from_slice(&words.get(i).copied().unwrap_or(0).to_le_bytes());
        }
        let crc = crc32c::crc32c(&buf[CRC_AT + 4..]) ^ (generation as u32);
        buf[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
        let at = (generation % 2) * self.slot_bytes() as u64;
        self.file.write_all_at(&buf, at)?;
        self.file.sync_data()?;
        self.generation = generation;
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
    const UUID: &str = "00112233445566778899aabbccddeeff";

    #[test]
    fn spans_and_marks() {
        let mut m = DirtyMap::in_memory(10 * MIB + 512, MIB);
        assert_eq!(m.regions(), 11);
        assert_eq!(m.span(0, 0), 0..0);
        assert_eq!(m.span(MIB - 512, 1024), 0..2);
        assert_eq!(m.span(10 * MIB, 512), 10..11);
        assert_eq!(m.span(u64::MAX - 10, 100), 11..11, "no overflow");
        assert!(m.mark(MIB - 512, 1024));
        assert!(!m.mark(0, 512), "already set");
        assert!(m.covers(0, 2 * MIB));
        assert!(!m.covers(0, 3 * MIB));
        assert_eq!(m.count(), 2);
        assert_eq!(m.next_set(2), Some(0));
        assert_eq!(m.iter().collect::<Vec<_>>(), vec![0, 1]);
        let mut other = DirtyMap::in_memory(10 * MIB + 512, MIB);
        other.set(1);
        other.set(7);
        assert_eq!(m.union(&other), 1);
        m.clear(0);
        m.clear(1);
        m.clear(7);
        assert_eq!(m.next_set(0), None);
        m.set_all();
        assert_eq!(m.count(), 11);
        let w = m.words().to_vec();
        m.clear_all();
        assert!(m.is_empty());
        m.load_words(&w);
        assert_eq!(m.count(), 11);
    }

    #[test]
    fn persists_with_its_tag_and_survives_a_torn_slot() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bm");
        let tag = Tag {
            uuid: UUID.into(),
            gen: 77,
        };
        {
            let (mut f, loaded) = BitmapFile::open(&p, 64 * MIB, MIB).unwrap();
            assert!(matches!(loaded, Loaded::New));
            let mut m = DirtyMap::in_memory(64 * MIB, MIB);
            m.mark(5 * MIB, 1);
            f.store(m.words(), &tag, 3).unwrap();
            m.mark(9 * MIB, 1);
            f.store(m.words(), &tag, 3).unwrap();
        }
        let (f, loaded) = BitmapFile::open(&p, 64 * MIB, MIB).unwrap();
        let Loaded::Valid(m, t, epoch) = loaded else {
            panic!("{loaded:?}")
        };
        assert_eq!((t, epoch), (tag, 3));
        assert!(m.is_set(5) && m.is_set(9) && m.count() == 2);
        // Tear the newest slot: the previous one (bit 5 only) must win.
        let slot = f.slot_bytes() as u64;
        let newest = f.generation % 2;
        drop(f);
        let raw = OpenOptions::new().write(true).open(&p).unwrap();
        raw.write_all_at(&[0xff; 8], newest * slot + HEADER as u64)
            .unwrap();
        let (_, loaded) = BitmapFile::open(&p, 64 * MIB, MIB).unwrap();
        let Loaded::Valid(m, ..) = loaded else {
            panic!("{loaded:?}")
        };
        assert!(m.is_set(5) && !m.is_set(9));
    }

    #[test]
    fn an_unreadable_file_fails_closed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bm");
        {
            let (mut f, _) = BitmapFile::open(&p, 64 * MIB, MIB).unwrap();
            f.store(&[0], &Tag::default(), 1).unwrap();
            f.store(&[0], &Tag::default(), 1).unwrap();
        }
        assert!(matches!(
            BitmapFile::open(&p, 32 * MIB, MIB).unwrap().1,
            Loaded::Invalid(_)
        ));
        std::fs::write(&p, vec![0x5a; 4096]).unwrap();
        assert!(
            matches!(
                BitmapFile::open(&p, 64 * MIB, MIB).unwrap().1,
                Loaded::Invalid(_)
            ),
            "garbage is not an empty bitmap"
        );
        std::fs::write(&p, b"FDBITMP2 an older format").unwrap();
        assert!(matches!(
            BitmapFile::open(&p, 64 * MIB, MIB).unwrap().1,
            Loaded::Invalid(_)
        ));
    }
}
