//! Driver images: versioned modules chosen by an instance's context at attach time, verified,
//! loaded, and run as a stage of the disk's request pipeline (see `docs/driver-images.md`
//! and, for the module interface, `docs/driver-abi.md`).
//!
//! An image is a directory with `manifest.json` (name, version, ABI version, the module's
//! file name and sha256, rules matching instance context, optional config) and the module, a
//! shared object, and `manifest.sig` (hex ed25519 signature of the manifest's bytes), which
//! must verify against the trusted key unless the daemon allows unsigned images; since the
//! manifest holds the module's hash, the signature covers the module too.
//!
//! Every file is read once into memory and checked there; the daemon stores those bytes, and
//! loads a module only from a sealed memfd holding the verified bytes (never from a path that
//! someone could swap between the check and `dlopen`).

pub mod abi;

use std::collections::BTreeMap;
use std::ffi::{c_char, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::config::valid_name;
use sha2::{Digest, Sha256};

/// An image's manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    /// `MAJOR.MINOR.PATCH`; the newest matching version wins.
    pub version: String,
    /// The driver ABI the module was built for.
    pub abi: u32,
    /// The module's file name, next to the manifest.
    pub module: String,
    /// Hex sha256 of the module.
    pub sha256: String,
    /// The image applies to an instance whose context has every key/value of at least one
    /// rule (`"*"` matches any value of a present key). No rules: it matches nothing (use
    /// `default`).
    #[serde(default)]
    pub rules: Vec<BTreeMap<String, String>>,
    /// Use this image when no image's rules match.
    #[serde(default)]
    pub default: bool,
    /// Passed to the module as `config_json.image`.
    #[serde(default)]
    pub config: serde_json::Value,
}

/// Why an image was refused.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{0}")]
    Invalid(String),
    #[error("checksum mismatch: the manifest says {expected}, the module hashes to {actual}")]
    Checksum { expected: String, actual: String },
    #[error("bad signature: {0}")]
    Signature(String),
    #[error("ABI mismatch: the image is built for ABI {image}, this ferrodisk speaks ABI {host}")]
    Abi { image: u32, host: u32 },
    #[error("cannot load the module: {0}")]
    Load(String),
    #[error("the module lacks the symbol `{0}`")]
    MissingSymbol(String),
    #[error("the image's init failed: {0}")]
    Init(String),
    #[error("{0}")]
    Unsigned(String),
    #[error("{0}")]
    Io(String),
}

impl ImageError {
    /// The HTTP status for the API.
    pub fn status(&self) -> u16 {
        match self {
            ImageError::Io(_) => 500,
            _ => 400,
        }
    }
}

pub fn parse_version(v: &str) -> Option<(u64, u64, u64)> {
    let mut it = v.split('.').map(|p| p.parse::<u64>().ok());
    let r = (it.next()??, it.next()??, it.next()??);
    it.next().is_none().then_some(r)
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A trusted ed25519 public key (hex, 64 characters, in a file).
#[derive(Clone)]
pub struct TrustedKey(ed25519_dalek::VerifyingKey);

impl TrustedKey {
    pub fn from_file(path: &Path) -> Result<TrustedKey, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("trusted key {}: {e}", path.display()))?;
        let bytes: [u8; 32] = unhex(&text)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| format!("trusted key {}: expected 64 hex characters", path.display()))?;
        ed25519_dalek::VerifyingKey::from_bytes(&bytes)
            .map(TrustedKey)
            .map_err(|e| format!("trusted key {}: {e}", path.display()))
    }
}

impl Manifest {
    fn check(&self) -> Result<(), ImageError> {
        if !valid_name(&self.name) {
            return Err(ImageError::Invalid(format!(
                "image name `{}`: use 1-64 characters from [A-Za-z0-9._-]",
                self.name
            )));
        }
        if parse_version(&self.version).is_none() {
            return Err(ImageError::Invalid(format!(
                "version `{}` is not MAJOR.MINOR.PATCH",
                self.version
            )));
        }
        if !valid_name(&self.module) {
            return Err(ImageError::Invalid(format!(
                "module file name `{}`",
                self.module
            )));
        }
        if self.abi != abi::ABI_VERSION {
            return Err(ImageError::Abi {
                image: self.abi,
                host: abi::ABI_VERSION,
            });
        }
        Ok(())
    }

    /// Whether the image's rules select it for `context`.
    pub fn matches(&self, context: &BTreeMap<String, String>) -> bool {
        self.rules.iter().any(|rule| {
            rule.iter()
                .all(|(k, v)| context.get(k).is_some_and(|c| v == "*" || c == v))
        })
    }
}

/// Which images the daemon accepts: those signed by `key`, and unsigned ones only with
/// `allow_unsigned` (`serve --allow-unsigned-images`).
#[derive(Clone, Default)]
pub struct ImagePolicy {
    pub key: Option<TrustedKey>,
    pub allow_unsigned: bool,
}

/// The largest manifest and module read (each is held in memory while it is verified).
const MAX_MANIFEST_BYTES: u64 = 1 << 20;
const MAX_MODULE_BYTES: u64 = 256 << 20;

/// Reads a regular file through one descriptor: a symlink as the last component, a FIFO or
/// a device is refused, and so is a file over `max` bytes.
fn read_regular(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut buf = Vec::with_capacity(meta.len().min(max) as usize);
    f.take(max + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > max {
        return Err(std::io::Error::other(format!("larger than {max} bytes")));
    }
    Ok(buf)
}

/// An image read into memory and verified. What the daemon stores and loads are these very
/// bytes: nothing reads the image's files again.
pub struct VerifiedImage {
    pub manifest: Manifest,
    manifest_bytes: Vec<u8>,
    signature: Option<Vec<u8>>,
    module: Vec<u8>,
}

/// Checks `manifest.sig` against the policy; `Ok(true)`: signed by the trusted key.
fn check_signature(
    manifest: &[u8],
    sig: Option<&[u8]>,
    p: &ImagePolicy,
) -> Result<bool, ImageError> {
    let (key, sig) = match (&p.key, sig) {
        (Some(k), Some(s)) => (k, s),
        (Some(_), None) if p.allow_unsigned => return Ok(false),
        (None, _) if p.allow_unsigned => return Ok(false),
        (Some(_), None) => {
            return Err(ImageError::Unsigned(
                "the image has no manifest.sig: this daemon accepts only images signed by its \
                 --trusted-image-key (sign with `ferrodisk image pack --sign`)"
                    .into(),
            ))
        }
        (None, _) => {
            return Err(ImageError::Unsigned(
                "this daemon has no --trusted-image-key to verify images with, and unsigned \
                 images are refused: start it with --trusted-image-key FILE and sign images \
                 (`ferrodisk image pack --sign`), or with --allow-unsigned-images"
                    .into(),
            ))
        }
    };
    let text = std::str::from_utf8(sig).unwrap_or_default();
    let sig: [u8; 64] = unhex(text)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| ImageError::Signature("manifest.sig is not 128 hex characters".into()))?;
    key.0
        .verify_strict(manifest, &ed25519_dalek::Signature::from_bytes(&sig))
        .map_err(|_| {
            ImageError::Signature("the signature does not match the trusted key".into())
        })?;
    Ok(true)
}

/// Reads the image in `dir` (each file through one descriptor, into memory) and verifies
/// those bytes: the manifest, its signature as `policy` requires, and the module's sha256.
/// The module is not loaded here (see [`SealedModule`]).
pub fn read_verified(dir: &Path, policy: &ImagePolicy) -> Result<VerifiedImage, ImageError> {
    let mpath = dir.join("manifest.json");
    let bytes = read_regular(&mpath, MAX_MANIFEST_BYTES)
        .map_err(|e| ImageError::Invalid(format!("{}: {e}", mpath.display())))?;
    let m: Manifest = serde_json::from_slice(&bytes)
        .map_err(|e| ImageError::Invalid(format!("{}: {e}", mpath.display())))?;
    let spath = dir.join("manifest.sig");
    let signature = match read_regular(&spath, 1024) {
        Ok(s) => Some(s),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(ImageError::Signature(format!("{}: {e}", spath.display()))),
    };
    check_signature(&bytes, signature.as_deref(), policy)?;
    m.check()?;
    let mpath = dir.join(&m.module);
    let module = read_regular(&mpath, MAX_MODULE_BYTES)
        .map_err(|e| ImageError::Invalid(format!("{}: {e}", mpath.display())))?;
    let actual = sha256_hex(&module);
    if !actual.eq_ignore_ascii_case(&m.sha256) {
        return Err(ImageError::Checksum {
            expected: m.sha256.clone(),
            actual,
        });
    }
    Ok(VerifiedImage {
        manifest: m,
        manifest_bytes: bytes,
        signature,
        module,
    })
}

/// A module's verified bytes in a sealed memfd, loaded with `dlopen` through
/// `/proc/self/fd/N`: no file anyone else can write is ever loaded, so the code that runs is
/// the code that was hashed.
pub struct SealedModule {
    file: std::fs::File,
    sha256: String,
}

impl SealedModule {
    fn new(name: &str, bytes: &[u8], sha256: &str) -> Result<SealedModule, ImageError> {
        let file =
            crate::sys::sealed_memfd(&format!("ferrodisk-image-{name}"), bytes).map_err(|e| {
                ImageError::Io(format!("cannot make the sealed copy of the module: {e}"))
            })?;
        let s = SealedModule {
            file,
            sha256: sha256.to_ascii_lowercase(),
        };
        s.check()?;
        Ok(s)
    }

    /// The name `dlopen` is given.
    fn path(&self) -> PathBuf {
        use std::os::fd::AsRawFd;
        PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }

    /// Checks the seals and hashes the sealed bytes again.
    fn check(&self) -> Result<(), ImageError> {
        use std::os::unix::fs::FileExt;
        let all = libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        let seals = crate::sys::seals(&self.file)
            .map_err(|e| ImageError::Io(format!("the module's sealed copy: {e}")))?;
        if seals & all != all {
            return Err(ImageError::Io("the module's copy is not sealed".into()));
        }
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut off = 0u64;
        loop {
            let n = self
                .file
                .read_at(&mut buf, off)
                .map_err(|e| ImageError::Io(format!("the module's sealed copy: {e}")))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            off += n as u64;
        }
        let actual: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        if actual != self.sha256 {
            return Err(ImageError::Checksum {
                expected: self.sha256.clone(),
                actual,
            });
        }
        Ok(())
    }
}

/// Debug builds: `FERRODISK_TEST_IMAGE_PAUSE=PATH` makes `image add` create `PATH.reached`
/// once it has read and verified the image, and wait (30 s at most) for `PATH.go`. The tests
/// swap the image's files in that window.
fn test_pause() {
    #[cfg(debug_assertions)]
    if let Some(p) = std::env::var_os("FERRODISK_TEST_IMAGE_PAUSE") {
        let p = PathBuf::from(p);
        let _ = std::fs::write(p.with_extension("reached"), b"");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !p.with_extension("go").exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

/// A loaded module: the library and its entry points.
struct Module {
    /// Keeps the code mapped for as long as the function pointers below are used.
    _lib: libloading::Library,
    init: abi::InitFn,
    submit: abi::SubmitFn,
    complete: abi::CompleteFn,
    fini: abi::FiniFn,
    flags: u32,
    name: String,
    version: String,
}

impl Module {
    fn open(sealed: &SealedModule) -> Result<Module, ImageError> {
        // SAFETY: loading a shared object runs its initialisers. The sealed copy holds the
        // bytes that passed the checksum (and signature) check, and cannot change (sealed,
        // and the descriptor is this process's own), which is the trust decision; the
        // library is owned by the returned `Module`.
        let lib = unsafe { libloading::Library::new(sealed.path()) }
            .map_err(|e| ImageError::Load(e.to_string()))?;
        fn sym<T: Copy>(lib: &libloading::Library, name: &[u8]) -> Result<T, ImageError> {
            // SAFETY: `T` is the function type the ABI (docs/driver-abi.md) gives this symbol;
            // the copied pointer is used only while `lib` (owned next to it in `Module`) is
            // loaded.
            unsafe { lib.get::<T>(name) }.map(|s| *s).map_err(|_| {
                ImageError::MissingSymbol(String::from_utf8_lossy(&name[..name.len() - 1]).into())
            })
        }
        let info: abi::InfoFn = sym(&lib, abi::SYM_INFO)?;
        let init = sym(&lib, abi::SYM_INIT)?;
        let submit = sym(&lib, abi::SYM_SUBMIT)?;
        let complete = sym(&lib, abi::SYM_COMPLETE)?;
        let fini = sym(&lib, abi::SYM_FINI)?;
        // SAFETY: `info` is the image's `ferrodisk_driver_info`, which takes nothing and
        // returns a pointer to static data (checked for NULL below) in the loaded library.
        let ip = unsafe { info() };
        if ip.is_null() {
            return Err(ImageError::Invalid(
                "ferrodisk_driver_info returned NULL".into(),
            ));
        }
        // SAFETY: non-NULL, points to the image's static `fd_driver_info`, valid while `lib`
        // is loaded; copied out at once.
        let i = unsafe { *ip };
        if i.abi_version != abi::ABI_VERSION {
            return Err(ImageError::Abi {
                image: i.abi_version,
                host: abi::ABI_VERSION,
            });
        }
        let cstr = |p: *const c_char| {
            if p.is_null() {
                String::new()
            } else {
                // SAFETY: a NUL-terminated static string of the image (the ABI's contract),
                // valid while `lib` is loaded; copied at once.
                unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
            }
        };
        Ok(Module {
            init,
            submit,
            complete,
            fini,
            flags: i.flags,
            name: cstr(i.name),
            version: cstr(i.version),
            _lib: lib,
        })
    }
}

/// What the host knows about the attachment, for `init`.
pub struct AttachInfo<'a> {
    pub queues: u32,
    pub capacity: u64,
    pub volume: &'a str,
    pub instance: &'a str,
    pub context: &'a BTreeMap<String, String>,
    pub attach_config: &'a serde_json::Value,
}

/// The verdict of the image on one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail,
    Delay(u64),
    /// The image failed internally: the attachment is now failed.
    Broken,
}

/// An image instance serving one attachment.
pub struct Driver {
    module: Module,
    instance: *mut std::ffi::c_void,
    failed: AtomicBool,
    reason: Mutex<String>,
}

// SAFETY: the ABI requires an image instance to accept calls from the disk's queue threads
// (docs/driver-abi.md, "Threads"); the pointer is owned by this `Driver` until `fini` in Drop.
unsafe impl Send for Driver {}
// SAFETY: as above: concurrent `submit`/`complete` from different queues is part of the ABI.
unsafe impl Sync for Driver {}

impl Driver {
    /// Loads the module of a stored image and creates its instance for an attachment.
    pub fn load(
        sealed: &SealedModule,
        manifest: &Manifest,
        a: &AttachInfo<'_>,
    ) -> Result<Driver, ImageError> {
        let module = Module::open(sealed)?;
        if module.name != manifest.name || module.version != manifest.version {
            return Err(ImageError::Invalid(format!(
                "the module says it is {} {}, the manifest {} {}",
                module.name, module.version, manifest.name, manifest.version
            )));
        }
        let c =
            |s: String| CString::new(s).map_err(|_| ImageError::Invalid("NUL in a string".into()));
        let volume = c(a.volume.to_string())?;
        let instance = c(a.instance.to_string())?;
        let context = c(serde_json::to_string(a.context).unwrap_or_default())?;
        let config = c(
            serde_json::json!({"image": manifest.config, "attach": a.attach_config}).to_string(),
        )?;
        let host = abi::Host {
            abi_version: abi::ABI_VERSION,
            queues: a.queues,
            capacity: a.capacity,
            volume: volume.as_ptr(),
            instance: instance.as_ptr(),
            context_json: context.as_ptr(),
            config_json: config.as_ptr(),
        };
        let mut err = vec![0u8; 512];
        // SAFETY: `host` and the strings it points to live until after the call; `err` is a
        // writable buffer of `err.len()` bytes owned by this frame. `init` is the image's
        // `ferrodisk_driver_init` with the ABI's signature.
        let instance = unsafe { (module.init)(&host, err.as_mut_ptr().cast(), err.len()) };
        if instance.is_null() {
            let n = err.iter().position(|&b| b == 0).unwrap_or(err.len());
            let msg = String::from_utf8_lossy(&err[..n]).into_owned();
            return Err(ImageError::Init(if msg.is_empty() {
                "init returned NULL without a message".into()
            } else {
                msg
            }));
        }
        Ok(Driver {
            module,
            instance,
            failed: AtomicBool::new(false),
            reason: Mutex::new(String::new()),
        })
    }

    pub fn name(&self) -> &str {
        &self.module.name
    }

    pub fn version(&self) -> &str {
        &self.module.version
    }

    pub fn wants_write_data(&self) -> bool {
        self.module.flags & abi::WANTS_WRITE_DATA != 0
    }

    pub fn wants_read_data(&self) -> bool {
        self.module.flags & abi::WANTS_READ_DATA != 0
    }

    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    pub fn failure(&self) -> String {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn mark_failed(&self, why: String) {
        if !self.failed.swap(true, Ordering::AcqRel) {
            tracing::error!(image = %self.module.name, version = %self.module.version, "driver image failed, the attachment now fails every request: {why}");
            *self.reason.lock().unwrap_or_else(|p| p.into_inner()) = why;
        }
    }

    /// Asks the image about a request before it is issued. `bounce`: for writes of an image
    /// that transforms data, a buffer of `len` bytes it fills.
    pub fn submit(&self, req: &abi::Request) -> Verdict {
        if self.is_failed() {
            return Verdict::Broken;
        }
        let mut delay = 0u64;
        // SAFETY: `req` and the buffers it points to (guest memory held by the caller's
        // snapshot, and the caller's bounce buffer) are valid for the call; `instance` is
        // ours until Drop. The image's contract is not to keep any of these pointers.
        let v = unsafe { (self.module.submit)(self.instance, req, &mut delay) };
        match v {
            abi::PASS => Verdict::Pass,
            abi::FAIL => Verdict::Fail,
            abi::DELAY => Verdict::Delay(delay.min(10_000_000_000)),
            e => {
                self.mark_failed(format!(
                    "submit returned {e}{}",
                    if e == abi::ERR_PANIC {
                        " (a panic in the image)"
                    } else {
                        ""
                    }
                ));
                Verdict::Broken
            }
        }
    }

    /// Lets the image transform a completed read in place. `false`: the image failed.
    pub fn complete(&self, req: &abi::Request, status: i32) -> bool {
        if self.is_failed() {
            return false;
        }
        // SAFETY: as for `submit`; for reads the guest buffers are device-writable and the
        // request has not been published to the guest yet.
        let r = unsafe { (self.module.complete)(self.instance, req, status) };
        if r < 0 {
            self.mark_failed(format!(
                "complete returned {r}{}",
                if r == abi::ERR_PANIC {
                    " (a panic in the image)"
                } else {
                    ""
                }
            ));
            return false;
        }
        true
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // SAFETY: `instance` came from this module's init and is released exactly once; no
        // request uses it any more (the attachment drained before the driver was dropped).
        unsafe { (self.module.fini)(self.instance) };
    }
}

/// The images the daemon has: `<state>/images/<name>/<version>/` (directory mode 0700),
/// and the sealed copies of the modules this process loaded.
pub struct ImageStore {
    dir: PathBuf,
    policy: ImagePolicy,
    /// By (name, version, sha256). Never dropped: glibc knows a loaded library by the name
    /// it was opened as, and a library can stay loaded after `dlclose`; a descriptor number
    /// closed and reused for another module would then `dlopen` the old library.
    sealed: Mutex<std::collections::HashMap<(String, String, String), Arc<SealedModule>>>,
}

/// A stored image.
#[derive(Debug, Clone)]
pub struct StoredImage {
    pub manifest: Manifest,
    pub dir: PathBuf,
}

impl ImageStore {
    pub fn open(dir: &Path, policy: ImagePolicy) -> Result<ImageStore, String> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)))
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(ImageStore {
            dir: dir.to_path_buf(),
            policy,
            sealed: Mutex::new(Default::default()),
        })
    }

    /// The sealed copy of a verified image's module (made once per process, hashed again
    /// at every use).
    fn seal(&self, v: &VerifiedImage) -> Result<Arc<SealedModule>, ImageError> {
        let m = &v.manifest;
        let key = (
            m.name.clone(),
            m.version.clone(),
            m.sha256.to_ascii_lowercase(),
        );
        let mut sealed = self.sealed.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = sealed.get(&key) {
            s.check()?;
            return Ok(Arc::clone(s));
        }
        let s = Arc::new(SealedModule::new(&m.name, &v.module, &m.sha256)?);
        sealed.insert(key, Arc::clone(&s));
        Ok(s)
    }

    fn forget_sealed(&self, m: &Manifest) {
        let key = (
            m.name.clone(),
            m.version.clone(),
            m.sha256.to_ascii_lowercase(),
        );
        self.sealed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
    }

    /// Verifies the image in `src` and stores it. The files of `src` are read once; the
    /// stored copy and the module loaded to check it are made from the verified bytes.
    pub fn add(&self, src: &Path) -> Result<StoredImage, ImageError> {
        let v = read_verified(src, &self.policy)?;
        test_pause();
        let m = &v.manifest;
        let dest = self.dir.join(&m.name).join(&m.version);
        if dest.exists() {
            return Err(ImageError::Invalid(format!(
                "image {} {} is already stored; versions are immutable: publish a new version",
                m.name, m.version
            )));
        }
        let sealed = self.seal(&v)?;
        let lib = match Module::open(&sealed) {
            Ok(lib) => lib,
            Err(e) => {
                if let ImageError::Load(_) = e {
                    // Never loaded, so glibc does not know its name: the copy can go.
                    self.forget_sealed(&v.manifest);
                }
                return Err(e);
            }
        };
        if lib.name != m.name || lib.version != m.version {
            return Err(ImageError::Invalid(format!(
                "the module says it is {} {}, the manifest {} {}",
                lib.name, lib.version, m.name, m.version
            )));
        }
        drop(lib);
        let tmp = self.dir.join(format!(".{}-{}.tmp", m.name, m.version));
        self.write_copy(&v, &tmp)
            .map_err(|e| ImageError::Io(format!("storing the image: {e}")))?;
        // Check the stored copy too: it is what a later attach (or restart) reads.
        read_verified(&tmp, &self.policy)?;
        let io = |e: std::io::Error| ImageError::Io(format!("storing the image: {e}"));
        std::fs::create_dir_all(dest.parent().unwrap_or(&self.dir)).map_err(io)?;
        std::fs::rename(&tmp, &dest).map_err(io)?;
        Ok(StoredImage {
            manifest: v.manifest,
            dir: dest,
        })
    }

    /// Writes the verified bytes into a new directory `tmp` (mode 0700), synced.
    fn write_copy(&self, v: &VerifiedImage, tmp: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let _ = std::fs::remove_dir_all(tmp);
        std::fs::DirBuilder::new().mode(0o700).create(tmp)?;
        let write = |name: &str, bytes: &[u8]| -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(tmp.join(name))?;
            std::io::Write::write_all(&mut f, bytes)?;
            f.sync_all()
        };
        write("manifest.json", &v.manifest_bytes)?;
        write(&v.manifest.module, &v.module)?;
        if let Some(sig) = &v.signature {
            write("manifest.sig", sig)?;
        }
        std::fs::File::open(tmp)?.sync_all()
    }

    /// The module of a stored image, for an attachment: the stored copy is read and
    /// verified again (signature as the policy requires, and sha256), and the sealed copy
    /// made from those bytes is returned (hashed again if it was made before). Returns the
    /// manifest that was verified with it.
    pub fn load(&self, img: &StoredImage) -> Result<(Manifest, Arc<SealedModule>), ImageError> {
        let v = read_verified(&img.dir, &self.policy)?;
        if v.manifest.name != img.manifest.name || v.manifest.version != img.manifest.version {
            return Err(ImageError::Invalid(format!(
                "the stored manifest of {} {} now says {} {}",
                img.manifest.name, img.manifest.version, v.manifest.name, v.manifest.version
            )));
        }
        let sealed = self.seal(&v)?;
        Ok((v.manifest, sealed))
    }

    /// Every stored image, oldest version first within a name.
    pub fn list(&self) -> Vec<StoredImage> {
        let mut out = Vec::new();
        let Ok(names) = std::fs::read_dir(&self.dir) else {
            return out;
        };
        for n in names.flatten() {
            let Ok(versions) = std::fs::read_dir(n.path()) else {
                continue;
            };
            for v in versions.flatten() {
                let dir = v.path();
                let Ok(bytes) = std::fs::read(dir.join("manifest.json")) else {
                    continue;
                };
                if let Ok(manifest) = serde_json::from_slice::<Manifest>(&bytes) {
                    out.push(StoredImage { manifest, dir });
                }
            }
        }
        out.sort_by(|a, b| {
            (a.manifest.name.as_str(), parse_version(&a.manifest.version))
                .cmp(&(b.manifest.name.as_str(), parse_version(&b.manifest.version)))
        });
        out
    }

    pub fn get(&self, name: &str, version: &str) -> Option<StoredImage> {
        self.list()
            .into_iter()
            .find(|i| i.manifest.name == name && i.manifest.version == version)
    }

    /// The image for `context`: the newest version among images whose rules match, else the
    /// newest default image, else none.
    pub fn select(&self, context: &BTreeMap<String, String>) -> Option<StoredImage> {
        let all = self.list();
        let newest = |it: Vec<&StoredImage>| {
            it.into_iter()
                .max_by(|a, b| {
                    parse_version(&a.manifest.version)
                        .cmp(&parse_version(&b.manifest.version))
                        .then(b.manifest.name.cmp(&a.manifest.name))
                })
                .cloned()
        };
        newest(all.iter().filter(|i| i.manifest.matches(context)).collect())
            .or_else(|| newest(all.iter().filter(|i| i.manifest.default).collect()))
    }

    pub fn remove(&self, name: &str, version: &str) -> Result<(), ImageError> {
        let dir = self.dir.join(name).join(version);
        if !valid_name(name) || parse_version(version).is_none() || !dir.exists() {
            return Err(ImageError::Invalid(format!("no image {name} {version}")));
        }
        std::fs::remove_dir_all(&dir).map_err(|e| ImageError::Io(e.to_string()))?;
        let _ = std::fs::remove_dir(self.dir.join(name));
        Ok(())
    }
}

/// Packs a module into an image directory (`ferrodisk image pack`): writes the manifest
/// with the module's hash and, with `signing_key` (hex ed25519 secret key), the signature.
pub fn pack(
    module: &Path,
    mut manifest: Manifest,
    out: &Path,
    signing_key: Option<&Path>,
) -> Result<(), String> {
    let code = std::fs::read(module).map_err(|e| format!("{}: {e}", module.display()))?;
    manifest.sha256 = sha256_hex(&code);
    manifest.module = module
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or("the module path has no file name")?;
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    std::fs::write(out.join(&manifest.module), &code).map_err(|e| e.to_string())?;
    let bytes = serde_json::to_vec_pretty(&manifest).map_err(|e| e.to_string())?;
    std::fs::write(out.join("manifest.json"), &bytes).map_err(|e| e.to_string())?;
    if let Some(k) = signing_key {
        let text = std::fs::read_to_string(k).map_err(|e| format!("{}: {e}", k.display()))?;
        let secret: [u8; 32] = unhex(&text)
            .and_then(|b| b.try_into().ok())
            .ok_or("the signing key must be 64 hex characters")?;
        use ed25519_dalek::Signer;
        let sig = ed25519_dalek::SigningKey::from_bytes(&secret).sign(&bytes);
        let hex: String = sig.to_bytes().iter().map(|b| format!("{b:02x}")).collect();
        std::fs::write(out.join("manifest.sig"), hex).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Creates an ed25519 key pair: the secret key (hex) at `path`, the public key at
/// `path.pub` (the file to give `serve --trusted-image-key`).
pub fn keygen(path: &Path) -> Result<String, String> {
    let mut secret = [0u8; 32];
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut secret))
        .map_err(|e| e.to_string())?;
    let sk = ed25519_dalek::SigningKey::from_bytes(&secret);
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    std::io::Write::write_all(&mut f, hex(&secret).as_bytes()).map_err(|e| e.to_string())?;
    let public = hex(sk.verifying_key().as_bytes());
    let mut pub_path = path.as_os_str().to_owned();
    pub_path.push(".pub");
    std::fs::write(&pub_path, &public).map_err(|e| e.to_string())?;
    Ok(public)
}
