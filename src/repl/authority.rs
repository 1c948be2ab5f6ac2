//! The membership authority: per volume, the epoch, the primary, which replicas are in
//! sync, and the uuid of the volume's incarnation. Every change is a compare-and-set on the
//! record's revision, so two writers can never both win, and a primary whose epoch is no
//! longer current learns it on its next change.
//!
//! Lifecycle: a volume's first `take_over` mints its uuid. Deleting it writes a tombstone
//! (`deleted`, the epoch bumped) rather than removing the record, so epochs stay monotonic
//! per name: every old primary and every old copy stays fenced, and re-creating the name
//! makes a new incarnation (a new uuid, a higher epoch) whose replicas all start out of sync.
//!
//! Two stores implement [`Store`]: [`FileStore`] (embedded, one host: a JSON file per
//! volume, replaced with fsync + atomic rename under an exclusive lock) and, for a cluster,
//! etcd (see [`etcd`](super::etcd)).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// One replica of a volume, as the authority records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// `host:port` of the replica server.
    pub addr: String,
    /// Whether every acknowledged write is on this replica. Only an in-sync replica may be
    /// promoted, and a primary waits for every in-sync replica before acknowledging a write.
    pub in_sync: bool,
}

/// The authority's record of one volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub volume: String,
    /// Bumped by every primary before it serves, and by every promotion.
    pub epoch: u64,
    /// Node id of the only host allowed to serve the volume.
    pub primary: String,
    pub replicas: Vec<Member>,
    /// The incarnation of the volume (32 lowercase hex characters, see [`new_uuid`]); a
    /// replica's copy counts only if it carries this uuid. Empty in records written by an
    /// older Ferrodisk, and in a tombstone.
    #[serde(default)]
    pub uuid: String,
    /// A tombstone: the volume was deleted. Its epoch still fences older primaries.
    #[serde(default)]
    pub deleted: bool,
}

/// A new volume uuid: 16 bytes from the operating system's random number generator, as 32
/// lowercase hex characters.
///
/// # Panics
///
/// If `/dev/urandom` cannot be read (no usable system at all: the replication handshake
/// needs it too).
pub fn new_uuid() -> String {
    use std::io::Read;
    let mut b = [0u8; 16];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .expect("the system's random number generator (/dev/urandom) cannot be read");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl VolumeRecord {
    pub fn member(&self, addr: &str) -> Option<&Member> {
        self.replicas.iter().find(|m| m.addr == addr)
    }

    pub fn member_mut(&mut self, addr: &str) -> Option<&mut Member> {
        self.replicas.iter_mut().find(|m| m.addr == addr)
    }
}

/// A record and the revision it was read at (the compare-and-set token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub record: VolumeRecord,
    pub revision: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    #[error("authority store I/O on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the authority's record for {0} is corrupt: {1}")]
    Corrupt(String, String),
    #[error("authority backend: {0}")]
    Backend(String),
    #[error("compare-and-set on {0} kept conflicting")]
    Contended(String),
    #[error("volume {0} is not known to the authority")]
    NoVolume(String),
    /// The caller's view is stale: someone bumped the epoch or took the volume over.
    #[error("fenced: volume {volume} is at epoch {current} with primary `{primary}`, we hold epoch {ours}")]
    Fenced {
        volume: String,
        ours: u64,
        current: u64,
        primary: String,
    },
    #[error("{0}")]
    Refused(String),
}

/// A key-value store with compare-and-set, holding one [`VolumeRecord`] per volume.
pub trait Store: Send + Sync {
    /// Reads the record of `volume`, if any.
    fn load(&self, volume: &str) -> Result<Option<Versioned>, AuthorityError>;
    /// Writes `record` if the stored revision is still `expected` (`None`: the volume must
    /// not exist yet). Returns the new revision, or `Ok(None)` when the comparison failed.
    fn compare_and_set(
        &self,
        expected: Option<u64>,
        record: &VolumeRecord,
    ) -> Result<Option<u64>, AuthorityError>;
    /// A human-readable name for logs ("file:/var/lib/...", "etcd:http://...").
    fn describe(&self) -> String;
}

/// The operations the data path needs, built on any [`Store`].
#[derive(Clone)]
pub struct Authority {
    store: Arc<dyn Store>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.store.describe())
    }
}

/// How many times a read-modify-write is retried when another writer got in between.
const CAS_RETRIES: usize = 200;

impl Authority {
    pub fn new(store: Arc<dyn Store>) -> Authority {
        Authority { store }
    }

    /// Opens `file:DIR` or `etcd:http://HOST:PORT[,http://...]`. A bare path means `file:`.
    pub fn open(spec: &str) -> Result<Authority, AuthorityError> {
        if let Some(endpoints) = spec.strip_prefix("etcd:") {
            let store = super::etcd::EtcdStore::connect(endpoints)?;
            return Ok(Authority::new(Arc::new(store)));
        }
        let dir = spec.strip_prefix("file:").unwrap_or(spec);
        Ok(Authority::new(Arc::new(FileStore::open(Path::new(dir))?)))
    }

    pub fn describe(&self) -> String {
        self.store.describe()
    }

    pub fn load(&self, volume: &str) -> Result<Option<Versioned>, AuthorityError> {
        self.store.load(volume)
    }

    /// Read-modify-write with compare-and-set, retried on conflict. `change` sees the current
    /// record (or `None`) and returns the new one, or an error to give up with.
    pub fn update(
        &self,
        volume: &str,
        mut change: impl FnMut(Option<&VolumeRecord>) -> Result<VolumeRecord, AuthorityError>,
    ) -> Result<VolumeRecord, AuthorityError> {
        for _ in 0..CAS_RETRIES {
            let current = self.store.load(volume)?;
            let next = change(current.as_ref().map(|v| &v.record))?;
            if current.as_ref().is_some_and(|c| c.record == next) {
                return Ok(next);
            }
            if self
                .store
                .compare_and_set(current.map(|c| c.revision), &next)?
                .is_some()
            {
                return Ok(next);
            }
            std::thread::yield_now();
        }
        Err(AuthorityError::Contended(volume.to_string()))
    }

    /// A primary takes the volume: checks that `node` may serve it, bumps the epoch, and sets
    /// the membership to `replicas` (members it already knew keep their sync state, new ones
    /// start out of sync).
    ///
    /// A volume with no record, or a deleted one, gets a new incarnation: the uuid `uuid`
    /// (or a new one), the epoch after the tombstone's, every replica out of sync. So does a
    /// `uuid` other than the record's (the volume of that name was deleted without the
    /// authority learning it). A record of an older Ferrodisk (no uuid) gets one, and every
    /// replica out of sync: their copies carry no identity.
    pub fn take_over(
        &self,
        volume: &str,
        node: &str,
        replicas: &[String],
        uuid: Option<&str>,
    ) -> Result<VolumeRecord, AuthorityError> {
        if let Some(u) = uuid.filter(|u| !crate::config::valid_name(u)) {
            return Err(AuthorityError::Refused(format!(
                "volume uuid `{u}`: use 1-64 characters from [A-Za-z0-9._-]"
            )));
        }
        let mint = || uuid.map_or_else(new_uuid, str::to_string);
        self.update(volume, |cur| {
            let (mut rec, keep_sync) = match cur {
                None => (incarnation(volume, 0, mint()), false),
                Some(r) if r.deleted => (incarnation(volume, r.epoch, mint()), false),
                Some(r) if r.primary != node => {
                    return Err(AuthorityError::Refused(format!(
                        "volume {volume} belongs to primary `{}` at epoch {}; run `ferrodisk promote` to move it to `{node}`",
                        r.primary, r.epoch
                    )))
                }
                Some(r) if r.uuid.is_empty() => {
                    let mut rec = r.clone();
                    rec.uuid = mint();
                    (rec, false)
                }
                Some(r) if uuid.is_some_and(|u| u != r.uuid) => {
                    tracing::warn!(volume, old = %r.uuid, new = ?uuid, "a new incarnation replaces the authority's record");
                    (incarnation(volume, r.epoch, mint()), false)
                }
                Some(r) => (r.clone(), true),
            };
            rec.epoch += 1;
            rec.primary = node.to_string();
            rec.replicas = replicas
                .iter()
                .map(|addr| Member {
                    addr: addr.clone(),
                    in_sync: keep_sync && rec.member(addr).is_some_and(|m| m.in_sync),
                })
                .collect();
            Ok(rec)
        })
    }

    /// Deletes `volume`: writes a tombstone (the epoch bumped, no primary, no replicas, no
    /// uuid), which fences every primary and copy of the old incarnation. Returns the record
    /// as it was (`None` if there was none, or it was deleted already: nothing is written).
    pub fn delete(&self, volume: &str) -> Result<Option<VolumeRecord>, AuthorityError> {
        self.delete_incarnation(volume, None)
    }

    /// [`delete`](Self::delete), only if the record is incarnation `uuid` (when given): a
    /// volume re-created meanwhile under the same name is left alone.
    pub fn delete_incarnation(
        &self,
        volume: &str,
        uuid: Option<&str>,
    ) -> Result<Option<VolumeRecord>, AuthorityError> {
        for _ in 0..CAS_RETRIES {
            let Some(cur) = self.store.load(volume)? else {
                return Ok(None);
            };
            if cur.record.deleted || uuid.is_some_and(|u| u != cur.record.uuid) {
                return Ok(None);
            }
            let tombstone = VolumeRecord {
                volume: volume.to_string(),
                epoch: cur.record.epoch + 1,
                primary: String::new(),
                replicas: Vec::new(),
                uuid: String::new(),
                deleted: true,
            };
            if self
                .store
                .compare_and_set(Some(cur.revision), &tombstone)?
                .is_some()
            {
                return Ok(Some(cur.record));
            }
            std::thread::yield_now();
        }
        Err(AuthorityError::Contended(volume.to_string()))
    }

    /// Records that `addr` is (or is no longer) in sync, as the primary at `epoch`. Fails
    /// with [`AuthorityError::Fenced`] if that primary is no longer current.
    pub fn set_in_sync(
        &self,
        volume: &str,
        node: &str,
        epoch: u64,
        addr: &str,
        in_sync: bool,
    ) -> Result<VolumeRecord, AuthorityError> {
        self.update(volume, |cur| {
            let Some(r) = cur else {
                return Err(AuthorityError::NoVolume(volume.to_string()));
            };
            if r.deleted || r.epoch != epoch || r.primary != node {
                return Err(AuthorityError::Fenced {
                    volume: volume.to_string(),
                    ours: epoch,
                    current: r.epoch,
                    primary: r.primary.clone(),
                });
            }
            let mut r = r.clone();
            match r.member_mut(addr) {
                Some(m) => m.in_sync = in_sync,
                None => {
                    return Err(AuthorityError::Refused(format!(
                        "{addr} is not a replica of {volume}"
                    )))
                }
            }
            Ok(r)
        })
    }

    /// Makes the in-sync replica `addr` the new primary `node`: bumps the epoch, drops
    /// `addr` from the replicas (it now holds the primary copy) and marks the others out of
    /// sync until the new primary has resynced them. The old primary is fenced
    /// from then on: its next change fails, and replicas that learn the new epoch refuse it.
    pub fn promote(
        &self,
        volume: &str,
        addr: &str,
        node: &str,
    ) -> Result<VolumeRecord, AuthorityError> {
        self.promote_from(volume, addr, node, None)
    }

    /// [`promote`](Self::promote), only if the volume is still at epoch `from` (when given).
    pub fn promote_from(
        &self,
        volume: &str,
        addr: &str,
        node: &str,
        from: Option<u64>,
    ) -> Result<VolumeRecord, AuthorityError> {
        self.update(volume, |cur| {
            let Some(r) = cur else {
                return Err(AuthorityError::NoVolume(volume.to_string()));
            };
            if r.deleted {
                return Err(AuthorityError::Refused(format!(
                    "volume {volume} was deleted: there is nothing to promote"
                )));
            }
            if from.is_some_and(|e| e != r.epoch) {
                return Err(AuthorityError::Refused(format!(
                    "volume {volume} moved to epoch {} while promoting; check its state and retry",
                    r.epoch
                )));
            }
            match r.member(addr) {
                Some(m) if m.in_sync => {}
                Some(_) => {
                    return Err(AuthorityError::Refused(format!(
                        "replica {addr} of {volume} is not in sync: promoting it could lose acknowledged writes"
                    )))
                }
                None => {
                    return Err(AuthorityError::Refused(format!(
                        "{addr} is not a replica of {volume}"
                    )))
                }
            }
            let mut r = r.clone();
            r.epoch += 1;
            r.primary = node.to_string();
            r.replicas.retain(|m| m.addr != addr);
            // The old primary may have died with writes in flight that reached some replicas
            // and not others (none of them acknowledged). Until the new primary has compared
            // them with its copy, the others are not known to match it.
            for m in &mut r.replicas {
                m.in_sync = false;
            }
            Ok(r)
        })
    }
}

/// The record of a new incarnation of `volume` after `epoch` (bumped by the caller): no
/// members yet.
fn incarnation(volume: &str, epoch: u64, uuid: String) -> VolumeRecord {
    VolumeRecord {
        volume: volume.to_string(),
        epoch,
        primary: String::new(),
        replicas: Vec::new(),
        uuid,
        deleted: false,
    }
}

/// The embedded store: `DIR/<volume>.json`, each holding `{"revision": N, "record": {...}}`.
///
/// Crash safety: a new version is written to a temporary file, fsynced, renamed over the old
/// one, and the directory is fsynced, so a crash leaves either the old or the new record.
/// An exclusive `flock` on `DIR/.lock` serialises compare-and-set across processes.
pub struct FileStore {
    dir: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct OnDisk {
    revision: u64,
    record: VolumeRecord,
}

impl FileStore {
    pub fn open(dir: &Path) -> Result<FileStore, AuthorityError> {
        std::fs::create_dir_all(dir).map_err(|source| AuthorityError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        Ok(FileStore {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, volume: &str) -> PathBuf {
        self.dir.join(format!("{volume}.json"))
    }

    fn io(&self, path: &Path) -> impl FnOnce(io::Error) -> AuthorityError {
        let path = path.to_path_buf();
        move |source| AuthorityError::Io { path, source }
    }

    fn lock(&self) -> Result<File, AuthorityError> {
        let path = self.dir.join(".lock");
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(self.io(&path))?;
        crate::sys::flock_exclusive(&f).map_err(self.io(&path))?;
        Ok(f)
    }

    fn read(&self, volume: &str) -> Result<Option<OnDisk>, AuthorityError> {
        let path = self.path(volume);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| AuthorityError::Corrupt(volume.to_string(), e.to_string())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io(&path)(e)),
        }
    }
}

/// Checks a volume name: it becomes a file name here and a key in etcd.
pub fn check_volume_name(volume: &str) -> Result<(), String> {
    if crate::config::valid_name(volume) {
        Ok(())
    } else {
        Err(format!(
            "volume id `{volume}`: use 1-64 characters from [A-Za-z0-9._-], not starting with a dot"
        ))
    }
}

impl Store for FileStore {
    fn load(&self, volume: &str) -> Result<Option<Versioned>, AuthorityError> {
        check_volume_name(volume).map_err(AuthorityError::Refused)?;
        Ok(self.read(volume)?.map(|d| Versioned {
            record: d.record,
            revision: d.revision,
        }))
    }

    fn compare_and_set(
        &self,
        expected: Option<u64>,
        record: &VolumeRecord,
    ) -> Result<Option<u64>, AuthorityError> {
        check_volume_name(&record.volume).map_err(AuthorityError::Refused)?;
        let _lock = self.lock()?;
        let current = self.read(&record.volume)?.map(|d| d.revision);
        if current != expected {
            return Ok(None);
        }
        let revision = current.unwrap_or(0) + 1;
        let bytes = serde_json::to_vec_pretty(&OnDisk {
            revision,
            record: record.clone(),
        })
        .map_err(|e| AuthorityError::Corrupt(record.volume.clone(), e.to_string()))?;
        let path = self.path(&record.volume);
        crate::sys::write_atomic(&path, &bytes).map_err(self.io(&path))?;
        Ok(Some(revision))
    }

    fn describe(&self) -> String {
        format!("file:{}", self.dir.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> (tempfile::TempDir, Authority) {
        let dir = tempfile::tempdir().unwrap();
        let a = Authority::open(&format!("file:{}", dir.path().display())).unwrap();
        (dir, a)
    }

    #[test]
    fn take_over_bumps_the_epoch_and_keeps_sync_state() {
        let (_d, a) = auth();
        let reps = vec!["r1:1".to_string(), "r2:1".to_string()];
        let r = a.take_over("v", "n1", &reps, None).unwrap();
        assert_eq!(r.epoch, 1);
        assert!(
            r.replicas.iter().all(|m| !m.in_sync),
            "new replicas start out of sync"
        );
        assert_eq!(r.uuid.len(), 32, "a new volume gets a uuid");
        assert!(!r.deleted);
        a.set_in_sync("v", "n1", 1, "r1:1", true).unwrap();
        let again = a.take_over("v", "n1", &reps, None).unwrap();
        assert_eq!(again.epoch, 2);
        assert!(again.member("r1:1").unwrap().in_sync);
        assert_eq!(again.uuid, r.uuid, "the uuid is kept");
        let same = a.take_over("v", "n1", &reps, Some(&r.uuid)).unwrap();
        assert_eq!((same.epoch, same.uuid.as_str()), (3, r.uuid.as_str()));
        assert!(same.member("r1:1").unwrap().in_sync);
        let more = vec!["r1:1".to_string(), "r3:1".to_string()];
        let r = a.take_over("v", "n1", &more, None).unwrap();
        assert!(r.member("r1:1").unwrap().in_sync);
        assert!(
            !r.member("r3:1").unwrap().in_sync,
            "a new member starts out of sync"
        );
        assert!(r.member("r2:1").is_none());
    }

    #[test]
    fn new_uuids_are_32_lowercase_hex_characters_and_differ() {
        let a = new_uuid();
        assert_eq!(a.len(), 32);
        assert!(a
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        assert_ne!(a, new_uuid());
    }

    #[test]
    fn another_uuid_is_a_new_incarnation() {
        let (_d, a) = auth();
        let reps = vec!["r1:1".to_string()];
        let r = a.take_over("v", "n1", &reps, Some("u1")).unwrap();
        assert_eq!(r.uuid, "u1");
        a.set_in_sync("v", "n1", 1, "r1:1", true).unwrap();
        let r = a.take_over("v", "n1", &reps, Some("u2")).unwrap();
        assert_eq!((r.epoch, r.uuid.as_str()), (2, "u2"));
        assert!(!r.member("r1:1").unwrap().in_sync, "old copies resync");
        assert!(a.take_over("v", "n1", &reps, Some("not hex!")).is_err());
        // Another node's volume is refused, whatever the uuid.
        let e = a.take_over("v", "n2", &reps, Some("u3")).unwrap_err();
        assert!(e.to_string().contains("promote"), "{e}");
    }

    #[test]
    fn a_record_without_uuid_gets_one_and_its_replicas_resync() {
        let (d, a) = auth();
        // A record written by an older Ferrodisk: no uuid, no deleted flag.
        std::fs::write(
            d.path().join("v.json"),
            r#"{"revision": 4, "record": {"volume": "v", "epoch": 6, "primary": "n1",
                "replicas": [{"addr": "r1:1", "in_sync": true}]}}"#,
        )
        .unwrap();
        let old = a.load("v").unwrap().unwrap().record;
        assert_eq!((old.uuid.as_str(), old.deleted), ("", false));
        let r = a.take_over("v", "n1", &["r1:1".to_string()], None).unwrap();
        assert_eq!(r.epoch, 7);
        assert_eq!(r.uuid.len(), 32);
        assert!(!r.member("r1:1").unwrap().in_sync);
    }

    #[test]
    fn delete_writes_a_tombstone_that_fences_and_a_new_incarnation_follows() {
        let (_d, a) = auth();
        assert_eq!(a.delete("v").unwrap(), None, "nothing to delete");
        assert!(a.load("v").unwrap().is_none(), "and nothing written");
        let reps = vec!["r1:1".to_string()];
        a.take_over("v", "n1", &reps, None).unwrap();
        let before = a.set_in_sync("v", "n1", 1, "r1:1", true).unwrap();
        assert_eq!(a.delete("v").unwrap(), Some(before.clone()));
        let tomb = a.load("v").unwrap().unwrap().record;
        assert_eq!(
            tomb,
            VolumeRecord {
                volume: "v".into(),
                epoch: 2,
                primary: String::new(),
                replicas: vec![],
                uuid: String::new(),
                deleted: true,
            }
        );
        assert_eq!(a.delete("v").unwrap(), None, "already deleted");
        assert_eq!(a.load("v").unwrap().unwrap().record.epoch, 2);
        // The old primary is fenced; nothing can be promoted.
        let e = a.set_in_sync("v", "n1", 1, "r1:1", false).unwrap_err();
        assert!(
            matches!(e, AuthorityError::Fenced { current: 2, .. }),
            "{e}"
        );
        let e = a.set_in_sync("v", "", 2, "r1:1", false).unwrap_err();
        assert!(matches!(e, AuthorityError::Fenced { .. }), "{e}");
        let e = a.promote("v", "r1:1", "n2").unwrap_err();
        assert!(e.to_string().contains("deleted"), "{e}");
        // Re-created, by any node: a new uuid, a higher epoch, every replica out of sync.
        let r = a.take_over("v", "n2", &reps, None).unwrap();
        assert_eq!((r.epoch, r.primary.as_str(), r.deleted), (3, "n2", false));
        assert_ne!(r.uuid, before.uuid);
        assert_eq!(r.uuid.len(), 32);
        assert!(!r.member("r1:1").unwrap().in_sync);
    }

    #[test]
    fn a_stale_primary_is_fenced() {
        let (_d, a) = auth();
        let reps = vec!["r1:1".to_string()];
        a.take_over("v", "n1", &reps, None).unwrap();
        a.set_in_sync("v", "n1", 1, "r1:1", true).unwrap();
        let r = a.promote("v", "r1:1", "n2").unwrap();
        assert_eq!((r.epoch, r.primary.as_str()), (2, "n2"));
        assert!(r.replicas.is_empty());
        let e = a.set_in_sync("v", "n1", 1, "r1:1", false).unwrap_err();
        assert!(
            matches!(e, AuthorityError::Fenced { current: 2, .. }),
            "{e}"
        );
        let e = a.take_over("v", "n1", &reps, None).unwrap_err();
        assert!(e.to_string().contains("promote"), "{e}");
    }

    #[test]
    fn only_in_sync_replicas_are_promoted() {
        let (_d, a) = auth();
        a.take_over("v", "n1", &["r1:1".to_string()], None).unwrap();
        let e = a.promote("v", "r1:1", "n2").unwrap_err();
        assert!(e.to_string().contains("not in sync"), "{e}");
        assert!(a.promote("v", "r9:1", "n2").is_err());
        assert!(a.promote("nope", "r1:1", "n2").is_err());
    }

    #[test]
    fn compare_and_set_refuses_a_stale_revision() {
        let (d, _a) = auth();
        let s = FileStore::open(d.path()).unwrap();
        let rec = VolumeRecord {
            volume: "v".into(),
            epoch: 1,
            primary: "n".into(),
            replicas: vec![],
            uuid: "u".into(),
            deleted: false,
        };
        assert_eq!(s.compare_and_set(None, &rec).unwrap(), Some(1));
        assert_eq!(s.compare_and_set(None, &rec).unwrap(), None);
        assert_eq!(s.compare_and_set(Some(1), &rec).unwrap(), Some(2));
        assert_eq!(s.compare_and_set(Some(1), &rec).unwrap(), None);
        assert_eq!(s.load("v").unwrap().unwrap().revision, 2);
        assert!(s.load("../x").is_err(), "names are checked");
    }

    #[test]
    fn concurrent_writers_never_lose_an_update() {
        let (_d, a) = auth();
        a.take_over("v", "n1", &[], None).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let a = a.clone();
                std::thread::spawn(move || {
                    for _ in 0..10 {
                        a.update("v", |r| {
                            let mut r = r.unwrap().clone();
                            r.epoch += 1;
                            Ok(r)
                        })
                        .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(a.load("v").unwrap().unwrap().record.epoch, 41);
    }
}
