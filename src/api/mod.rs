//! The management plane: volumes and attachments, persisted, and served over an HTTP/JSON
//! API on a unix socket (see `docs/api.md`).
//!
//! A *volume* is a backing (a file Ferrodisk created, or an existing file or block device)
//! with the instances allowed to attach it. An *attachment* serves a volume to one instance
//! on a vhost-user socket, with the instance's context (key/value pairs). Both are kept in
//! `<state dir>/state.json`, replaced atomically on every change; after a daemon restart
//! every attachment is served again on its socket, so a guest with reconnect carries on.

pub mod client;
pub mod http;
pub mod paths;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::config::{Backing, DiskConfig, MAX_QUEUES, MAX_QUEUE_SIZE};
use crate::disk::Disk;
use crate::driver::{AttachInfo, Driver, ImagePolicy, ImageStore, StoredImage};
use crate::server::{self, DiskServer, SocketAccess};

/// An API error: an HTTP status and a message for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }
    fn bad(m: impl Into<String>) -> ApiError {
        ApiError::new(400, m)
    }
    fn forbidden(m: impl Into<String>) -> ApiError {
        ApiError::new(403, m)
    }
    fn not_found(m: impl Into<String>) -> ApiError {
        ApiError::new(404, m)
    }
    fn conflict(m: impl Into<String>) -> ApiError {
        ApiError::new(409, m)
    }
    fn internal(m: impl Into<String>) -> ApiError {
        ApiError::new(500, m)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.status)
    }
}

/// Metric labels of a disk: `(name, value)` pairs.
pub type Labels = Vec<(String, String)>;

/// A volume as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub name: String,
    pub path: PathBuf,
    pub size: u64,
    /// Ferrodisk created the file (and deletes it with the volume).
    pub owned: bool,
    /// Instances allowed to attach it; empty: any instance.
    #[serde(default)]
    pub allowed_instances: Vec<String>,
    /// Replica servers (`HOST:PORT`): the volume is replicated while attached (see
    /// `docs/replication.md`); the daemon needs `--replication-key`.
    #[serde(default)]
    pub replicas: Vec<String>,
    /// A replica that has not answered within this many ms is declared failed (default
    /// 5000, as `replica-timeout-ms`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica_timeout_ms: Option<u32>,
    /// Resync bandwidth limit per replica in MiB/s, 0 unlimited (default 200, as
    /// `resync-mbps`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync_mbps: Option<u32>,
    /// A replicated volume's UUID, minted at creation: the authority and the replicas know
    /// this incarnation by it, so a volume re-created under the same name never pairs with
    /// an old copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
}

pub use crate::repl::primary::ReplContext;

/// `POST /v1/volumes`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVolume {
    pub name: String,
    /// Size of a new file: bytes, or with a K/M/G/T suffix.
    #[serde(default)]
    pub size: Option<String>,
    /// An existing file or block device to use (its size is its own), or where to create
    /// the new file (default: `<state dir>/volumes/<name>.img`).
    #[serde(default)]
    pub path: Option<PathBuf>,
    #[serde(default)]
    pub allowed_instances: Vec<String>,
    /// Replica servers, `HOST:PORT` each: the volume is replicated.
    #[serde(default)]
    pub replicas: Vec<String>,
    #[serde(default)]
    pub replica_timeout_ms: Option<u32>,
    #[serde(default)]
    pub resync_mbps: Option<u32>,
}

/// Per-attachment options.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachOptions {
    #[serde(default)]
    pub queues: Option<u16>,
    #[serde(default)]
    pub queue_size: Option<u16>,
    #[serde(default)]
    pub readonly: bool,
    #[serde(default)]
    pub direct: Option<bool>,
    #[serde(default)]
    pub poll_us: Option<u32>,
    #[serde(default)]
    pub serial: Option<String>,
    /// Mode of the socket file, as an octal string ("0600" by default).
    #[serde(default)]
    pub socket_mode: Option<String>,
    #[serde(default)]
    pub socket_uid: Option<u32>,
    #[serde(default)]
    pub socket_gid: Option<u32>,
    /// The fine latency buckets, `LO-HI[/STEPS]` (default `0-1ms/50`).
    #[serde(default)]
    pub latency_range: Option<String>,
}

/// `POST /v1/attachments`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attach {
    pub volume: String,
    pub instance: String,
    #[serde(default)]
    pub context: BTreeMap<String, String>,
    pub socket: PathBuf,
    #[serde(default)]
    pub options: AttachOptions,
    /// Allow the volume to be attached to more than one instance at a time.
    #[serde(default)]
    pub multi_attach: bool,
    /// Configuration for the driver image chosen by the context (e.g. `{"key": "..."}` for
    /// `crypt`), passed to the image as `config_json.attach`.
    #[serde(default)]
    pub driver_config: serde_json::Value,
}

/// The driver image an attachment runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRef {
    pub name: String,
    pub version: String,
}

/// An attachment as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// `<volume>@<instance>`.
    pub id: String,
    pub volume: String,
    pub instance: String,
    pub context: BTreeMap<String, String>,
    pub socket: PathBuf,
    pub options: AttachOptions,
    pub multi_attach: bool,
    #[serde(default)]
    pub driver_config: serde_json::Value,
    /// The image chosen at attach (or upgrade); kept across daemon restarts.
    #[serde(default)]
    pub image: Option<ImageRef>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct State {
    volumes: BTreeMap<String, Volume>,
    attachments: BTreeMap<String, Attachment>,
}

struct Inner {
    state: State,
    /// Attachments being served, by id.
    live: HashMap<String, Arc<DiskServer>>,
    /// Attachments that could not be served again after a restart, with the reason.
    failed: BTreeMap<String, String>,
    /// Disks given with `--disk` (served, but not managed or persisted).
    static_disks: Vec<Arc<DiskServer>>,
    /// Attachments with an upgrade running (it drains without holding this lock), and the
    /// image each is moving to.
    upgrading: HashMap<String, Option<ImageRef>>,
}

/// How the daemon serving the API was started.
#[derive(Clone, Default)]
pub struct ManagerOptions {
    /// Which driver images are accepted (`--trusted-image-key`, `--allow-unsigned-images`).
    pub images: ImagePolicy,
    /// Where volumes may live besides `<state>/volumes` (`--volume-root`).
    pub volume_roots: Vec<PathBuf>,
}

/// The daemon's volumes and attachments.
pub struct Manager {
    dir: PathBuf,
    inner: Mutex<Inner>,
    images: ImageStore,
    roots: paths::VolumeRoots,
    repl: Option<ReplContext>,
    /// The log lines API requests cause (see [`Manager::log`]).
    log_limit: Mutex<crate::stats::RateLimit>,
}

/// At most this many log lines caused by API requests per [`API_LOG_PERIOD`]; then one line
/// says how many were left out.
const API_LOG_BURST: u32 = 50;
const API_LOG_PERIOD: std::time::Duration = std::time::Duration::from_secs(10);

fn valid_name(what: &str, s: &str) -> Result<(), ApiError> {
    if crate::config::valid_name(s) {
        Ok(())
    } else {
        Err(ApiError::bad(format!(
            "{what} `{s}`: use 1-64 characters from [A-Za-z0-9._-], not starting with a dot"
        )))
    }
}

fn parse_mode(s: &str) -> Result<u32, ApiError> {
    let m = u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .map_err(|_| ApiError::bad(format!("socket_mode `{s}` is not an octal mode")))?;
    if m & !0o777 != 0 {
        return Err(ApiError::bad(format!(
            "socket_mode `{s}` has bits beyond 0777"
        )));
    }
    Ok(m)
}

impl Manager {
    /// Opens (or creates) the state in `dir` and serves every recorded attachment again.
    /// An attachment that cannot be served (its backing is gone, its socket is taken) is
    /// reported in `failed` and logged; the others are served.
    pub fn open(
        dir: &Path,
        opts: ManagerOptions,
        repl: Option<ReplContext>,
    ) -> Result<Arc<Manager>, String> {
        std::fs::create_dir_all(dir.join("volumes"))
            .map_err(|e| format!("state directory {}: {e}", dir.display()))?;
        let path = dir.join("state.json");
        let state: State = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| format!("{} is corrupt: {e}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let images = ImageStore::open(&dir.join("images"), opts.images)?;
        let roots = paths::VolumeRoots::new(&dir.join("volumes"), &opts.volume_roots)?;
        let m = Arc::new(Manager {
            repl,
            images,
            roots,
            log_limit: Mutex::new(crate::stats::RateLimit::new(API_LOG_BURST, API_LOG_PERIOD)),
            dir: dir.to_path_buf(),
            inner: Mutex::new(Inner {
                state,
                live: HashMap::new(),
                failed: BTreeMap::new(),
                static_disks: Vec::new(),
                upgrading: Default::default(),
            }),
        });
        {
            let mut inner = m.lock();
            let atts: Vec<Attachment> = inner.state.attachments.values().cloned().collect();
            for a in atts {
                let vol = inner.state.volumes.get(&a.volume).cloned();
                let served = match vol {
                    Some(v) => m.load_driver(&v, &a).and_then(|d| m.serve(&v, &a, d)),
                    None => Err(ApiError::internal(format!("volume {} is gone", a.volume))),
                };
                match served {
                    Ok(s) => {
                        tracing::info!(attachment = %a.id, socket = %a.socket.display(), "attachment restored");
                        inner.live.insert(a.id.clone(), s);
                    }
                    Err(e) => {
                        tracing::error!(attachment = %a.id, "cannot serve the attachment again: {}", e.message);
                        inner.failed.insert(a.id.clone(), e.message);
                    }
                }
            }
        }
        Ok(m)
    }

    /// Runs `line` (one `tracing` call) unless the API's log lines are over their rate: a
    /// client that creates and deletes volumes in a loop cannot flood the daemon's log.
    fn log(&self, line: impl FnOnce()) {
        let allowed = self
            .log_limit
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .allow();
        match allowed {
            Some(0) => line(),
            Some(n) => {
                tracing::warn!(
                    suppressed = n,
                    "{n} log lines caused by API requests were left out (rate limit)"
                );
                line();
            }
            None => {}
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serves `--disk` disks alongside the managed ones (in stats and metrics).
    pub fn add_static(&self, s: Arc<DiskServer>) {
        self.lock().static_disks.push(s);
    }

    fn save(&self, state: &State) -> Result<(), ApiError> {
        let bytes =
            serde_json::to_vec_pretty(state).map_err(|e| ApiError::internal(e.to_string()))?;
        crate::sys::write_atomic(&self.dir.join("state.json"), &bytes)
            .map_err(|e| ApiError::internal(format!("cannot save the state: {e}")))
    }

    /// Applies `change` to a copy of the state, saves it, and only then makes it current.
    fn commit(&self, inner: &mut Inner, change: impl FnOnce(&mut State)) -> Result<(), ApiError> {
        let mut next = inner.state.clone();
        change(&mut next);
        self.save(&next)?;
        inner.state = next;
        Ok(())
    }

    pub fn create_volume(&self, req: CreateVolume) -> Result<Volume, ApiError> {
        valid_name("volume name", &req.name)?;
        for i in &req.allowed_instances {
            valid_name("instance id", i)?;
        }
        for r in &req.replicas {
            if !crate::config::valid_host_port(r) {
                return Err(ApiError::bad(format!("replica `{r}`: expected HOST:PORT")));
            }
        }
        if req.replicas.is_empty()
            && (req.replica_timeout_ms.is_some() || req.resync_mbps.is_some())
        {
            return Err(ApiError::bad(
                "replica_timeout_ms and resync_mbps apply only to a volume with replicas",
            ));
        }
        if let Some(t) = req.replica_timeout_ms {
            if !(100..=600_000).contains(&t) {
                return Err(ApiError::bad(format!(
                    "replica_timeout_ms {t}: out of range (100 to 600000)"
                )));
            }
        }
        if let Some(r) = req.resync_mbps {
            if r > 1_000_000 {
                return Err(ApiError::bad(format!(
                    "resync_mbps {r}: out of range (0 to 1000000)"
                )));
            }
        }
        let mut inner = self.lock();
        if inner.state.volumes.contains_key(&req.name) {
            return Err(ApiError::conflict(format!("volume {} exists", req.name)));
        }
        let size = req
            .size
            .as_deref()
            .map(|s| crate::config::parse_size("size", s).map_err(|e| ApiError::bad(e.to_string())))
            .transpose()?;
        let (path, size, owned) = match (&req.path, size) {
            (Some(p), None) => {
                let (path, f) = self.roots.open_existing(p, false)?;
                let meta = f
                    .metadata()
                    .map_err(|e| ApiError::bad(format!("{}: {e}", p.display())))?;
                let size = if meta.file_type().is_block_device() {
                    crate::sys::block_device_info(&f)
                        .map_err(|e| ApiError::bad(format!("{}: {e}", p.display())))?
                        .size
                } else {
                    meta.len()
                };
                if size == 0 || size % 512 != 0 {
                    return Err(ApiError::bad(format!(
                        "{} is {size} bytes: not a non-zero multiple of 512",
                        p.display()
                    )));
                }
                (path, size, false)
            }
            (p, Some(size)) => {
                let path = p
                    .clone()
                    .unwrap_or_else(|| self.dir.join("volumes").join(format!("{}.img", req.name)));
                let (path, f) = self.roots.create(&path)?;
                let sized = f.set_len(size).and_then(|()| f.sync_all());
                if let Err(e) = sized {
                    let _ = self.roots.remove(&path);
                    return Err(size_error(&path, size, e));
                }
                (path, size, true)
            }
            (None, None) => {
                return Err(ApiError::bad(
                    "give `size` (a new file) or `path` (an existing file or block device)",
                ))
            }
        };
        let vol = Volume {
            name: req.name.clone(),
            path,
            size,
            owned,
            allowed_instances: req.allowed_instances,
            replicas: req.replicas,
            replica_timeout_ms: req.replica_timeout_ms,
            resync_mbps: req.resync_mbps,
            uuid: None,
        };
        let vol = Volume {
            uuid: (!vol.replicas.is_empty()).then(crate::repl::authority::new_uuid),
            ..vol
        };
        let v = vol.clone();
        let r = self.commit(&mut inner, |s| {
            s.volumes.insert(v.name.clone(), v);
        });
        if let Err(e) = r {
            if owned {
                let _ = self.roots.remove(&vol.path);
            }
            return Err(e);
        }
        self.log(|| tracing::info!(volume = %vol.name, path = %vol.path.display(), size = vol.size, "volume created"));
        Ok(vol)
    }

    pub fn volumes(&self) -> Vec<serde_json::Value> {
        let inner = self.lock();
        inner
            .state
            .volumes
            .values()
            .map(|v| {
                let attached: Vec<&String> = inner
                    .state
                    .attachments
                    .values()
                    .filter(|a| a.volume == v.name)
                    .map(|a| &a.id)
                    .collect();
                let mut j = serde_json::to_value(v).unwrap_or_default();
                j["attachments"] = serde_json::json!(attached);
                j
            })
            .collect()
    }

    /// Grows a volume; attached guests see the new size through a config-change message.
    pub fn resize_volume(&self, name: &str, size: &str) -> Result<Volume, ApiError> {
        let bytes =
            crate::config::parse_size("size", size).map_err(|e| ApiError::bad(e.to_string()))?;
        let mut inner = self.lock();
        let vol = inner
            .state
            .volumes
            .get(name)
            .cloned()
            .ok_or_else(|| ApiError::not_found(format!("no volume {name}")))?;
        if bytes < vol.size {
            return Err(ApiError::bad(format!(
                "shrinking {name} from {} to {bytes} bytes is refused (the guest may have data there)",
                vol.size
            )));
        }
        if !vol.replicas.is_empty() {
            return Err(ApiError::conflict(format!(
                "volume {name} is replicated: resizing a replicated volume is not supported yet (its replicas and bitmaps have a fixed size)"
            )));
        }
        let live: Vec<Arc<DiskServer>> = inner
            .state
            .attachments
            .values()
            .filter(|a| a.volume == name)
            .filter_map(|a| inner.live.get(&a.id).cloned())
            .collect();
        if live.is_empty() {
            let (_, f) = self.roots.open_existing(&vol.path, true)?;
            if f.metadata()
                .map(|m| m.file_type().is_block_device())
                .unwrap_or(false)
            {
                return Err(ApiError::bad("a block device has the size of the device"));
            }
            f.set_len(bytes)
                .and_then(|()| f.sync_all())
                .map_err(|e| size_error(&vol.path, bytes, e))?;
        }
        for s in &live {
            s.disk.resize(bytes).map_err(ApiError::bad)?;
        }
        self.commit(&mut inner, |s| {
            if let Some(v) = s.volumes.get_mut(name) {
                v.size = bytes;
            }
        })?;
        self.log(|| {
            tracing::info!(
                volume = name,
                size = bytes,
                attachments = live.len(),
                "volume resized"
            )
        });
        Ok(Volume { size: bytes, ..vol })
    }

    /// Deletes a volume. A replicated volume's tombstone, its replicas' copies and its
    /// metadata are dealt with after the API's lock is released (they take network calls):
    /// the volume is gone from the state first, and the authority's record is tombstoned
    /// only if it is still this incarnation's.
    pub fn delete_volume(&self, name: &str) -> Result<(), ApiError> {
        let vol = {
            let mut inner = self.lock();
            let vol = inner
                .state
                .volumes
                .get(name)
                .cloned()
                .ok_or_else(|| ApiError::not_found(format!("no volume {name}")))?;
            if let Some(a) = inner.state.attachments.values().find(|a| a.volume == name) {
                return Err(ApiError::conflict(format!(
                    "volume {name} is attached ({}); detach it first",
                    a.id
                )));
            }
            self.commit(&mut inner, |s| {
                s.volumes.remove(name);
            })?;
            vol
        };
        if !vol.replicas.is_empty() {
            self.forget_replicated(&vol);
        }
        if vol.owned {
            if let Err(e) = self.roots.remove(&vol.path) {
                self.log(|| tracing::warn!(volume = name, "{}", e.message));
            }
        }
        self.log(|| tracing::info!(volume = name, "volume deleted"));
        Ok(())
    }

    /// Deleting a replicated volume: its authority record becomes a tombstone (a higher
    /// epoch, no members, no UUID), which fences every old primary and copy; its replicas
    /// drop their copies; its replication metadata goes. What cannot be reached is logged:
    /// a volume created again under this name gets a new UUID, so no old copy is ever taken
    /// for one of its copies.
    fn forget_replicated(&self, vol: &Volume) {
        let name = &vol.name;
        if let Some(ctx) = &self.repl {
            match ctx.authority.delete_incarnation(name, vol.uuid.as_deref()) {
                Ok(Some(before)) => {
                    let epoch = before.epoch + 1;
                    for m in &before.replicas {
                        match crate::repl::tools::drop_copy(&m.addr, &ctx.key, name, epoch) {
                            Ok(()) => {
                                self.log(|| tracing::info!(volume = %name, replica = %m.addr, "replica copy dropped"))
                            }
                            Err(e) => {
                                self.log(|| tracing::warn!(volume = %name, replica = %m.addr, "cannot drop the replica's copy (its UUID keeps it from ever being used again): {e}"))
                            }
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    self.log(|| tracing::warn!(volume = %name, "cannot delete the volume's authority record (a volume created again under this name gets a new UUID anyway): {e}"))
                }
            }
        }
        // Unless a volume created again under this name already serves from it (it holds
        // the lock; it does not trust another incarnation's metadata anyway). Moved aside
        // under the lock first, so that a volume attaching meanwhile starts a fresh one.
        let meta = self.dir.join("replication").join(name);
        let lock = File::open(meta.join("lock"));
        let free = lock.as_ref().map_or(true, |f| {
            crate::sys::try_flock_exclusive(f).unwrap_or(false)
        });
        if free {
            let aside = self
                .dir
                .join("replication")
                .join(format!(".deleted-{name}-{}", std::process::id()));
            let gone =
                std::fs::rename(&meta, &aside).and_then(|()| std::fs::remove_dir_all(&aside));
            if let Err(e) = gone {
                if e.kind() != std::io::ErrorKind::NotFound {
                    self.log(
                        || tracing::warn!(volume = %name, "cannot remove {}: {e}", meta.display()),
                    );
                }
            }
        }
    }

    pub fn attach(&self, req: Attach) -> Result<Attachment, ApiError> {
        valid_name("instance id", &req.instance)?;
        if req.socket.as_os_str().is_empty() || !req.socket.is_absolute() {
            return Err(ApiError::bad("`socket` must be an absolute path"));
        }
        for (k, v) in &req.context {
            if k.is_empty() || k.len() > 64 || v.len() > 256 {
                return Err(ApiError::bad(format!(
                    "context `{k}`: keys are 1-64 bytes, values at most 256"
                )));
            }
        }
        let mut inner = self.lock();
        let vol = inner
            .state
            .volumes
            .get(&req.volume)
            .cloned()
            .ok_or_else(|| ApiError::not_found(format!("no volume {}", req.volume)))?;
        if !vol.allowed_instances.is_empty() && !vol.allowed_instances.contains(&req.instance) {
            return Err(ApiError::forbidden(format!(
                "instance {} may not attach volume {} (allowed: {})",
                req.instance,
                vol.name,
                vol.allowed_instances.join(", ")
            )));
        }
        let id = format!("{}@{}", req.volume, req.instance);
        if inner.state.attachments.contains_key(&id) {
            return Err(ApiError::conflict(format!("{id} is already attached")));
        }
        let others: Vec<&Attachment> = inner
            .state
            .attachments
            .values()
            .filter(|a| a.volume == req.volume)
            .collect();
        if let (Some(o), false) = (others.first(), vol.replicas.is_empty()) {
            return Err(ApiError::conflict(format!(
                "volume {} is replicated and attached to {} already: a replicated volume has one writer, its primary (detach it first)",
                req.volume, o.instance
            )));
        }
        if let Some(o) = others.first() {
            if !req.multi_attach || others.iter().any(|a| !a.multi_attach) {
                return Err(ApiError::conflict(format!(
                    "volume {} is attached to {} already; multi-attach must be asked for by every attachment",
                    req.volume, o.instance
                )));
            }
        }
        if inner
            .state
            .attachments
            .values()
            .any(|a| a.socket == req.socket)
        {
            return Err(ApiError::conflict(format!(
                "socket {} serves another attachment",
                req.socket.display()
            )));
        }
        let mut att = Attachment {
            id: id.clone(),
            volume: req.volume,
            instance: req.instance,
            context: req.context,
            socket: req.socket,
            options: req.options,
            multi_attach: req.multi_attach,
            driver_config: req.driver_config,
            image: None,
        };
        att.image = self.images.select(&att.context).map(|i| ImageRef {
            name: i.manifest.name,
            version: i.manifest.version,
        });
        let driver = self.load_driver(&vol, &att)?;
        let served = self.serve(&vol, &att, driver)?;
        let a = att.clone();
        if let Err(e) = self.commit(&mut inner, |s| {
            s.attachments.insert(a.id.clone(), a);
        }) {
            served.close();
            return Err(e);
        }
        inner.live.insert(id.clone(), served);
        inner.failed.remove(&id);
        self.log(|| tracing::info!(attachment = %id, socket = %att.socket.display(), context = ?att.context, "attached"));
        Ok(att)
    }

    /// Drains the attachment's requests, closes its connection and socket, and forgets it.
    pub fn detach(&self, id: &str) -> Result<(), ApiError> {
        let server = {
            let mut inner = self.lock();
            if !inner.state.attachments.contains_key(id) {
                return Err(ApiError::not_found(format!("no attachment {id}")));
            }
            if inner.upgrading.contains_key(id) {
                return Err(ApiError::conflict(format!(
                    "an upgrade of {id} is running; detach when it has finished"
                )));
            }
            self.commit(&mut inner, |s| {
                s.attachments.remove(id);
            })?;
            inner.failed.remove(id);
            inner.live.remove(id)
        };
        if let Some(s) = server {
            s.close();
            if let Err(e) = s.disk.sync() {
                self.log(|| tracing::error!(attachment = id, "flush at detach failed: {e}"));
            }
            // Replication stops either way (its threads and connections end). A clean stop
            // empties the activity log; after a failed flush its own sync fails too, and
            // the next attach reconciles the active regions.
            if let Some(r) = s.disk.repl.get() {
                r.shutdown();
            }
        }
        self.log(|| tracing::info!(attachment = id, "detached"));
        Ok(())
    }

    pub fn attachments(&self) -> Vec<serde_json::Value> {
        let inner = self.lock();
        inner
            .state
            .attachments
            .values()
            .map(|a| {
                let mut j = serde_json::to_value(a).unwrap_or_default();
                j["state"] = match (inner.live.get(&a.id), inner.failed.get(&a.id)) {
                    (Some(_), _) => "serving".into(),
                    (None, Some(why)) => format!("failed: {why}").into(),
                    (None, None) => "stopped".into(),
                };
                j
            })
            .collect()
    }

    /// Counters (and latency histograms) per disk; `id` selects one attachment.
    pub fn stats(&self, id: Option<&str>) -> Result<Vec<serde_json::Value>, ApiError> {
        let inner = self.lock();
        let mut out = Vec::new();
        for (aid, s) in &inner.live {
            if id.is_some_and(|i| i != aid) {
                continue;
            }
            let a = inner.state.attachments.get(aid);
            out.push(disk_stats(Some(aid), a, &s.disk));
        }
        if id.is_none() {
            for s in &inner.static_disks {
                out.push(disk_stats(None, None, &s.disk));
            }
        }
        if let (Some(i), true) = (id, out.is_empty()) {
            return Err(ApiError::not_found(format!(
                "no attachment {i} is being served"
            )));
        }
        out.sort_by(|a, b| a["socket"].as_str().cmp(&b["socket"].as_str()));
        Ok(out)
    }

    /// Every disk being served: (labels, disk).
    pub fn disks(&self) -> Vec<(Labels, Arc<Disk>)> {
        let inner = self.lock();
        let mut out = Vec::new();
        for (id, s) in &inner.live {
            let mut labels = vec![(
                "disk".to_string(),
                s.disk.config.socket.display().to_string(),
            )];
            if let Some(a) = inner.state.attachments.get(id) {
                labels.push(("volume".into(), a.volume.clone()));
                labels.push(("instance".into(), a.instance.clone()));
            }
            out.push((labels, Arc::clone(&s.disk)));
        }
        for s in &inner.static_disks {
            out.push((
                vec![(
                    "disk".to_string(),
                    s.disk.config.socket.display().to_string(),
                )],
                Arc::clone(&s.disk),
            ));
        }
        out
    }

    /// Graceful stop: drain and close every attachment; the state stays, so the next
    /// start serves them again.
    pub fn stop_all(&self) -> Vec<Arc<DiskServer>> {
        let inner = self.lock();
        let all: Vec<Arc<DiskServer>> = inner
            .live
            .values()
            .chain(inner.static_disks.iter())
            .cloned()
            .collect();
        for s in &all {
            s.stop();
        }
        all
    }
}

impl Manager {
    /// Loads the attachment's recorded image for it (`None`: no image).
    fn load_driver(&self, vol: &Volume, a: &Attachment) -> Result<Option<Arc<Driver>>, ApiError> {
        let Some(r) = &a.image else { return Ok(None) };
        let img = self.images.get(&r.name, &r.version).ok_or_else(|| {
            ApiError::new(
                409,
                format!("image {} {} is not stored any more", r.name, r.version),
            )
        })?;
        let info = AttachInfo {
            queues: u32::from(a.options.queues.unwrap_or(crate::config::DEFAULT_QUEUES)),
            capacity: vol.size,
            volume: &a.volume,
            instance: &a.instance,
            context: &a.context,
            attach_config: &a.driver_config,
        };
        let refused = |e: crate::driver::ImageError| {
            ApiError::new(e.status(), format!("image {} {}: {e}", r.name, r.version))
        };
        let (manifest, sealed) = self.images.load(&img).map_err(refused)?;
        let d = Driver::load(&sealed, &manifest, &info).map_err(refused)?;
        self.log(|| tracing::info!(attachment = %a.id, image = %r.name, version = %r.version, "driver image loaded"));
        Ok(Some(Arc::new(d)))
    }

    /// Verifies and stores an image (`POST /v1/images`).
    pub fn add_image(&self, dir: &Path) -> Result<serde_json::Value, ApiError> {
        let img = self
            .images
            .add(dir)
            .map_err(|e| ApiError::new(e.status(), format!("image refused: {e}")))?;
        self.log(|| tracing::info!(image = %img.manifest.name, version = %img.manifest.version, "image added"));
        Ok(image_json(&img, &[]))
    }

    pub fn images(&self) -> Vec<serde_json::Value> {
        let inner = self.lock();
        self.images
            .list()
            .iter()
            .map(|i| {
                let users: Vec<&str> = inner
                    .state
                    .attachments
                    .values()
                    .filter(|a| {
                        a.image.as_ref().is_some_and(|r| {
                            r.name == i.manifest.name && r.version == i.manifest.version
                        })
                    })
                    .map(|a| a.id.as_str())
                    .collect();
                image_json(i, &users)
            })
            .collect()
    }

    pub fn remove_image(&self, name: &str, version: &str) -> Result<(), ApiError> {
        let inner = self.lock();
        let is_it = |r: &Option<ImageRef>| {
            r.as_ref()
                .is_some_and(|r| r.name == name && r.version == version)
        };
        if let Some(a) = inner.state.attachments.values().find(|a| is_it(&a.image)) {
            return Err(ApiError::conflict(format!(
                "image {name} {version} is in use by {}; upgrade or detach it first",
                a.id
            )));
        }
        if let Some((id, _)) = inner.upgrading.iter().find(|(_, t)| is_it(t)) {
            return Err(ApiError::conflict(format!(
                "image {name} {version} is being loaded by an upgrade of {id}"
            )));
        }
        self.images
            .remove(name, version)
            .map_err(|e| ApiError::not_found(e.to_string()))
    }

    /// Switches a running attachment to the newest image its context selects, at a quiesce
    /// point (`POST /v1/attachments/{id}/upgrade`).
    pub fn upgrade(&self, id: &str) -> Result<serde_json::Value, ApiError> {
        let (a, server, vol, target) = {
            let mut inner = self.lock();
            let a = inner
                .state
                .attachments
                .get(id)
                .cloned()
                .ok_or_else(|| ApiError::not_found(format!("no attachment {id}")))?;
            let server = inner
                .live
                .get(id)
                .cloned()
                .ok_or_else(|| ApiError::conflict(format!("{id} is not being served")))?;
            let vol = inner
                .state
                .volumes
                .get(&a.volume)
                .cloned()
                .ok_or_else(|| ApiError::internal(format!("volume {} is gone", a.volume)))?;
            let target = self.images.select(&a.context).map(|i| ImageRef {
                name: i.manifest.name,
                version: i.manifest.version,
            });
            if target == a.image && !server.disk.driver().is_some_and(|d| d.is_failed()) {
                return Ok(
                    serde_json::json!({"id": id, "from": a.image, "to": target, "changed": false}),
                );
            }
            if inner.upgrading.contains_key(id) {
                return Err(ApiError::conflict(format!(
                    "an upgrade of {id} is already running"
                )));
            }
            inner.upgrading.insert(id.to_string(), target.clone());
            (a, server, vol, target)
        };
        /// Ends the upgrade's claim however `upgrade_unlocked` returns (or unwinds).
        struct Claim<'a>(&'a Manager, &'a str);
        impl Drop for Claim<'_> {
            fn drop(&mut self) {
                self.0.lock().upgrading.remove(self.1);
            }
        }
        let _claim = Claim(self, id);
        // Loading the image and draining the rings take time: other API calls go on
        // meanwhile. Detach waits for the end (409), so the disk stays while it drains.
        self.upgrade_unlocked(id, &a, &server, &vol, &target)
    }

    fn upgrade_unlocked(
        &self,
        id: &str,
        a: &Attachment,
        server: &DiskServer,
        vol: &Volume,
        target: &Option<ImageRef>,
    ) -> Result<serde_json::Value, ApiError> {
        let from = a.image.clone();
        let next = Attachment {
            image: target.clone(),
            ..a.clone()
        };
        // Load and init the new image first: a bad image leaves the attachment as it was.
        let driver = self.load_driver(vol, &next)?;
        let old = server
            .quiesced(|| server.disk.set_driver(driver))
            .ok_or_else(|| {
                ApiError::new(
                    503,
                    format!("{id} did not drain within the timeout; nothing changed"),
                )
            })?;
        drop(old); // fini of the old image, after every request that used it completed
        let mut inner = self.lock();
        self.commit(&mut inner, |s| {
            s.attachments.insert(next.id.clone(), next);
        })?;
        self.log(|| tracing::info!(attachment = id, ?from, to = ?target, "attachment upgraded"));
        Ok(serde_json::json!({"id": id, "from": from, "to": target, "changed": true}))
    }
}

fn image_json(i: &StoredImage, users: &[&str]) -> serde_json::Value {
    serde_json::json!({
        "name": i.manifest.name,
        "version": i.manifest.version,
        "abi": i.manifest.abi,
        "sha256": i.manifest.sha256,
        "rules": i.manifest.rules,
        "default": i.manifest.default,
        "signed": i.dir.join("manifest.sig").exists(),
        "in_use_by": users,
    })
}

fn disk_stats(id: Option<&str>, a: Option<&Attachment>, d: &Disk) -> serde_json::Value {
    let stats: serde_json::Value =
        serde_json::from_str(&d.stats.to_json()).unwrap_or(serde_json::Value::Null);
    let repl = d
        .repl
        .get()
        .map(|r| crate::repl::tools::health_json(&[Arc::clone(r)]).1);
    serde_json::json!({
        "attachment": id,
        "socket": d.config.socket.display().to_string(),
        "volume": a.map(|a| a.volume.clone()).or_else(|| d.config.volume.clone()),
        "instance": a.map(|a| a.instance.clone()),
        "context": a.map(|a| a.context.clone()),
        "size": d.capacity_bytes(),
        "stats": stats,
        "latency": crate::metrics::to_json(&d.metrics),
        "replication": repl.map(|r| r["volumes"][0].clone()),
        "driver": d.driver().map(|drv| serde_json::json!({
            "image": drv.name(),
            "version": drv.version(),
            "state": if drv.is_failed() { "failed" } else { "ok" },
            "failure": drv.failure(),
        })),
    })
}

/// Opens the volume for an attachment and serves it on its socket, with its driver image.
impl Manager {
    /// Opens the volume for an attachment and serves it on its socket, with its driver
    /// image and, for a replicated volume, its replication stage.
    fn serve(
        &self,
        vol: &Volume,
        a: &Attachment,
        driver: Option<Arc<Driver>>,
    ) -> Result<Arc<DiskServer>, ApiError> {
        if vol.replicas.is_empty() {
            return serve(vol, a, driver, &self.roots, None);
        }
        let ctx = self.repl.as_ref().ok_or_else(|| {
            ApiError::bad(format!(
                "volume {} is replicated: start the daemon with --replication-key (and --authority, --node)",
                vol.name
            ))
        })?;
        serve(vol, a, driver, &self.roots, Some((ctx, &self.dir)))
    }
}

fn serve(
    vol: &Volume,
    a: &Attachment,
    driver: Option<Arc<Driver>>,
    roots: &paths::VolumeRoots,
    repl: Option<(&ReplContext, &Path)>,
) -> Result<Arc<DiskServer>, ApiError> {
    let o = &a.options;
    let mut cfg = DiskConfig::new(Backing::Path(vol.path.clone()), a.socket.clone());
    if let Some(q) = o.queues {
        if q == 0 || q > MAX_QUEUES {
            return Err(ApiError::bad(format!("queues={q}: use 1..{MAX_QUEUES}")));
        }
        cfg.queues = q;
    }
    if let Some(q) = o.queue_size {
        if !(2..=MAX_QUEUE_SIZE).contains(&q) || !q.is_power_of_two() {
            return Err(ApiError::bad(format!(
                "queue_size={q}: use a power of two in 2..{MAX_QUEUE_SIZE}"
            )));
        }
        cfg.queue_size = q;
    }
    if let Some(p) = o.poll_us {
        if u64::from(p) > crate::config::MAX_POLL_US {
            return Err(ApiError::bad(format!("poll_us={p} is too large")));
        }
        cfg.poll_us = p;
    }
    if let Some(s) = &o.serial {
        if s.len() > 20 || !s.is_ascii() {
            return Err(ApiError::bad("serial: at most 20 ASCII characters"));
        }
        cfg.serial = Some(s.clone());
    }
    cfg.readonly = o.readonly;
    cfg.direct = o.direct;
    if let Some(r) = &o.latency_range {
        cfg.latency_range = crate::metrics::FineRange::parse(r)
            .map_err(|e| ApiError::bad(format!("latency_range: {e}")))?;
    }
    let access = SocketAccess {
        mode: o
            .socket_mode
            .as_deref()
            .map(parse_mode)
            .transpose()?
            .unwrap_or(0o600),
        uid: o.socket_uid,
        gid: o.socket_gid,
    };
    if repl.is_some() {
        cfg.volume = Some(vol.name.clone());
        cfg.replicas = vol.replicas.clone();
        if let Some(t) = vol.replica_timeout_ms {
            cfg.replica_timeout_ms = t;
        }
        if let Some(r) = vol.resync_mbps {
            cfg.resync_mbps = r;
        }
    }
    // The backing must still resolve under a volume root (no symlink or directory swapped
    // in since it was created), checked before it is opened and, through the open files,
    // after.
    let (resolved, _) = roots.open_existing(&vol.path, false)?;
    let disk = Disk::open(cfg).map_err(|e| ApiError::bad(chain(&e)))?;
    let files = disk.files.as_ref().map(|f| (&f.main, f.buffered.as_ref()));
    if let Some((main, buffered)) = files {
        roots.check_open(main, &resolved)?;
        if let Some(b) = buffered {
            roots.check_open(b, &resolved)?;
        }
    }
    // Replication opens the local copy again: through the disk's own open file.
    let local = files.map_or_else(
        || vol.path.clone(),
        |(main, _)| {
            use std::os::fd::AsRawFd;
            PathBuf::from(format!("/proc/self/fd/{}", main.as_raw_fd()))
        },
    );
    disk.set_driver(driver);
    let sock_err = |e: server::ServeError| match e {
        server::ServeError::Access { .. } => ApiError::bad(chain(&e)),
        e => ApiError::conflict(chain(&e)),
    };
    // A taken socket is refused before replication claims the volume; the socket is
    // published only once the authority has accepted this primary.
    server::check_free(&a.socket).map_err(sock_err)?;
    if let Some((ctx, dir)) = repl {
        let meta = dir.join("replication").join(&vol.name);
        let r = crate::repl::primary::start_for_disk(&disk, &local, ctx, meta, vol.uuid.as_deref())
            .map_err(|e| match e {
                crate::repl::primary::ReplError::Local { .. } => ApiError::internal(chain(&e)),
                e => ApiError::new(409, format!("replication of {}: {}", vol.name, chain(&e))),
            })?;
        let _ = disk.repl.set(r);
    }
    let repl = disk.repl.get().cloned();
    let listener = match server::bind(&a.socket, access) {
        Ok(l) => l,
        Err(e) => {
            if let Some(r) = &repl {
                r.shutdown();
            }
            return Err(sock_err(e));
        }
    };
    DiskServer::start(Arc::new(disk), listener)
        .map(Arc::new)
        .map_err(|e| {
            let _ = std::fs::remove_file(&a.socket);
            if let Some(r) = repl {
                r.shutdown();
            }
            ApiError::internal(format!("cannot start the disk thread: {e}"))
        })
}

/// An error with its chain of sources.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}

/// A file that cannot take `size` bytes: the file system's limit (EFBIG, EINVAL) is the
/// client's to fix (400); anything else is ours (500).
fn size_error(path: &std::path::Path, size: u64, e: std::io::Error) -> ApiError {
    let msg = format!("{}: cannot make it {size} bytes: {e}", path.display());
    match e.raw_os_error() {
        Some(libc::EFBIG) | Some(libc::EINVAL) => ApiError::bad(msg),
        _ => ApiError::internal(msg),
    }
}
