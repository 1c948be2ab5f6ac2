//! The safe side of the SDK: the [`Driver`] trait an image implements, what `init` is told
//! ([`HostInfo`], owned copies of `fd_host`), the request kinds ([`Op`]) and the answers of
//! `submit` ([`Verdict`]).
//!
//! Nothing here touches raw pointers except [`HostInfo::from_raw`], which copies the host's
//! strings before `init` returns (they are valid only during the call).

use std::ffi::{c_char, CStr};
use std::time::Duration;

use serde_json::{Map, Value};

use crate::abi::{self, Host, ABI_VERSION};
use crate::request::{Req, ReqMut};

/// A driver image, written in safe Rust. [`export_driver!`](crate::export_driver) turns an
/// implementation into the five C symbols of the ABI.
///
/// One value is created per attachment (`init`) and dropped at detach (`fini`). `submit` and
/// `complete` take `&self` and are called from one thread per queue at the same time, hence
/// `Sync`: keep per-queue state indexed by [`Req::queue`], or synchronize.
///
/// A panic in any method is caught by the SDK and reported to the host as
/// [`ERR_PANIC`](crate::ERR_PANIC) (for `init`: a refusal with the message `"panic: ..."`);
/// it never unwinds into the host. Methods must not block: use [`Verdict::Delay`] to wait.
pub trait Driver: Send + Sync + Sized + 'static {
    /// The image name (`fd_driver_info.name`). Must not contain NUL.
    const NAME: &'static str;
    /// The image version (`fd_driver_info.version`), usually `env!("CARGO_PKG_VERSION")`.
    /// Must not contain NUL.
    const VERSION: &'static str;
    /// `WANTS_*` flags (`fd_driver_info.flags`). Without
    /// [`WANTS_WRITE_DATA`](crate::WANTS_WRITE_DATA) writes have no bounce buffer and no data
    /// is copied; without [`WANTS_READ_DATA`](crate::WANTS_READ_DATA) `complete` is not called.
    const FLAGS: u32;

    /// Creates the instance for one attachment, or refuses it with a message for the
    /// operator (copied into the host's `err`, truncated to its size).
    fn init(host: &HostInfo) -> Result<Self, String>;

    /// Decides on one request before it is issued. For writes with `WANTS_WRITE_DATA`, fill
    /// [`Req::bounce`] (or use [`Req::bounce_with_data`]) with the bytes to store.
    fn submit(&self, req: &mut Req<'_>) -> Verdict;

    /// Transforms a successful read in place ([`ReqMut::for_each_sector_mut`]). Called only
    /// with `WANTS_READ_DATA`. An `Err` is an internal error: the host fails the request and
    /// the attachment. ABI version 1 has no channel for the message, so the SDK writes the
    /// first one of each attachment to stderr.
    fn complete(&self, req: &mut ReqMut<'_>, status: i32) -> Result<(), String> {
        let _ = (req, status);
        Ok(())
    }
}

/// The answer of [`Driver::submit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Issue the request ([`PASS`](crate::PASS)).
    Pass,
    /// Complete it with `VIRTIO_BLK_S_IOERR` ([`FAIL`](crate::FAIL)). The attachment goes on.
    Fail,
    /// Ask again after this long ([`DELAY`](crate::DELAY)); the queue waits meanwhile.
    /// Saturates at `u64::MAX` nanoseconds.
    Delay(Duration),
    /// An internal error of the image: the host fails the request and marks the attachment
    /// failed. The code is returned as is when negative, else as
    /// [`ERR_INTERNAL`](crate::ERR_INTERNAL).
    Error(i32),
}

impl Verdict {
    /// The C return value of `submit`, and the delay to store for [`Verdict::Delay`].
    pub fn to_raw(self) -> (i32, Option<u64>) {
        match self {
            Verdict::Pass => (abi::PASS, None),
            Verdict::Fail => (abi::FAIL, None),
            Verdict::Delay(d) => (
                abi::DELAY,
                Some(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
            ),
            Verdict::Error(code) if code < 0 => (code, None),
            Verdict::Error(_) => (abi::ERR_INTERNAL, None),
        }
    }
}

/// A request kind (`fd_request.op`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// [`OP_READ`](crate::OP_READ).
    Read,
    /// [`OP_WRITE`](crate::OP_WRITE).
    Write,
    /// [`OP_FLUSH`](crate::OP_FLUSH).
    Flush,
    /// [`OP_DISCARD`](crate::OP_DISCARD).
    Discard,
    /// [`OP_WRITE_ZEROES`](crate::OP_WRITE_ZEROES).
    WriteZeroes,
    /// A value this SDK does not know (a host newer than ABI version 1 would bump the
    /// version instead, so this means a host bug). Images should fail it.
    Unknown(u32),
}

impl Op {
    /// Decodes `fd_request.op`.
    pub fn from_raw(op: u32) -> Op {
        match op {
            abi::OP_READ => Op::Read,
            abi::OP_WRITE => Op::Write,
            abi::OP_FLUSH => Op::Flush,
            abi::OP_DISCARD => Op::Discard,
            abi::OP_WRITE_ZEROES => Op::WriteZeroes,
            other => Op::Unknown(other),
        }
    }

    /// Encodes it back.
    pub fn to_raw(self) -> u32 {
        match self {
            Op::Read => abi::OP_READ,
            Op::Write => abi::OP_WRITE,
            Op::Flush => abi::OP_FLUSH,
            Op::Discard => abi::OP_DISCARD,
            Op::WriteZeroes => abi::OP_WRITE_ZEROES,
            Op::Unknown(op) => op,
        }
    }
}

/// What the host says at attach: owned copies of `fd_host`, with the JSON parsed.
///
/// `Debug` does not print [`config`](HostInfo::config): the attach config may hold secrets
/// (the crypt image's key).
#[derive(Clone, PartialEq)]
pub struct HostInfo {
    /// The host's ABI version (always [`ABI_VERSION`]: the SDK refuses others).
    pub abi_version: u32,
    /// Number of virtqueues.
    pub queues: u32,
    /// Disk capacity in bytes.
    pub capacity: u64,
    /// Volume name.
    pub volume: String,
    /// Instance (VM) name.
    pub instance: String,
    /// The instance context (`context_json`), e.g. `{"os": "linux", "instance-type":
    /// "m5.large"}`. Empty when the host passed NULL.
    pub context: Map<String, Value>,
    /// `{"image": <manifest config>, "attach": <attach driver_config>}` (`config_json`).
    /// An empty object when the host passed NULL.
    pub config: Value,
}

impl Default for HostInfo {
    fn default() -> Self {
        HostInfo {
            abi_version: ABI_VERSION,
            queues: 1,
            capacity: 0,
            volume: String::new(),
            instance: String::new(),
            context: Map::new(),
            config: Value::Object(Map::new()),
        }
    }
}

impl std::fmt::Debug for HostInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostInfo")
            .field("abi_version", &self.abi_version)
            .field("queues", &self.queues)
            .field("capacity", &self.capacity)
            .field("volume", &self.volume)
            .field("instance", &self.instance)
            .field("context", &self.context)
            .field("config", &format_args!("<not shown>"))
            .finish()
    }
}

impl HostInfo {
    /// A string value of the instance context.
    pub fn context_str(&self, key: &str) -> Option<&str> {
        self.context.get(key).and_then(Value::as_str)
    }

    /// The manifest's config for the image (`config.image`; `Null` when absent).
    pub fn image_config(&self) -> &Value {
        &self.config["image"]
    }

    /// The attach request's driver config (`config.attach`; `Null` when absent).
    pub fn attach_config(&self) -> &Value {
        &self.config["attach"]
    }

    /// Copies an `fd_host`. Fails on a NULL pointer, another ABI version, strings that are not
    /// UTF-8, or JSON that does not parse to an object.
    ///
    /// # Safety
    ///
    /// `host` is NULL or points to an `fd_host` whose non-NULL strings are NUL-terminated,
    /// all valid for the duration of this call (the host owns them until `init` returns).
    pub unsafe fn from_raw(host: *const Host) -> Result<HostInfo, String> {
        if host.is_null() {
            return Err("the host passed no attach information (NULL fd_host)".into());
        }
        // SAFETY: non-NULL, and the caller guarantees it points to an `fd_host` the host owns
        // until `init` returns; we copy everything out before returning.
        let host = unsafe { &*host };
        if host.abi_version != ABI_VERSION {
            return Err(format!(
                "the host speaks driver ABI version {}, this image speaks version {ABI_VERSION}",
                host.abi_version
            ));
        }
        // SAFETY: the caller guarantees each of the four strings is NULL or NUL-terminated,
        // owned by the host for the duration of this call; `string` copies it.
        let volume = unsafe { string(host.volume, "volume") }?;
        // SAFETY: as above.
        let instance = unsafe { string(host.instance, "instance") }?;
        // SAFETY: as above.
        let context = unsafe { string(host.context_json, "context_json") }?;
        // SAFETY: as above.
        let config = unsafe { string(host.config_json, "config_json") }?;
        Ok(HostInfo {
            abi_version: host.abi_version,
            queues: host.queues,
            capacity: host.capacity,
            volume,
            instance,
            context: json_object(&context, "context_json")?,
            config: Value::Object(json_object(&config, "config_json")?),
        })
    }
}

/// Copies a C string; NULL is the empty string.
///
/// # Safety
///
/// `ptr` is NULL or a NUL-terminated string valid for the duration of the call.
unsafe fn string(ptr: *const c_char, what: &str) -> Result<String, String> {
    if ptr.is_null() {
        return Ok(String::new());
    }
    // SAFETY: non-NULL and NUL-terminated, owned by the caller's caller (the host) for the
    // duration of the call; `to_str` borrows it only until we copy it.
    let s = unsafe { CStr::from_ptr(ptr) };
    s.to_str()
        .map(str::to_owned)
        .map_err(|_| format!("{what} is not valid UTF-8"))
}

/// Parses a JSON object; the empty string (a NULL pointer) is the empty object.
fn json_object(text: &str, what: &str) -> Result<Map<String, Value>, String> {
    if text.is_empty() {
        return Ok(Map::new());
    }
    match serde_json::from_str(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(format!("{what} is not a JSON object")),
        Err(e) => Err(format!("{what} is not valid JSON: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;

    #[test]
    fn verdicts_encode() {
        assert_eq!(Verdict::Pass.to_raw(), (0, None));
        assert_eq!(Verdict::Fail.to_raw(), (1, None));
        assert_eq!(
            Verdict::Delay(Duration::from_micros(3)).to_raw(),
            (2, Some(3000))
        );
        assert_eq!(Verdict::Delay(Duration::MAX).to_raw(), (2, Some(u64::MAX)));
        assert_eq!(Verdict::Error(-7).to_raw(), (-7, None));
        assert_eq!(Verdict::Error(5).to_raw(), (-1, None));
    }

    #[test]
    fn ops_round_trip() {
        for raw in 0..8 {
            assert_eq!(Op::from_raw(raw).to_raw(), raw);
        }
        assert_eq!(Op::from_raw(9), Op::Unknown(9));
    }

    fn raw_host(context: &CString, config: &CString) -> Host {
        Host {
            abi_version: ABI_VERSION,
            queues: 2,
            capacity: 1 << 30,
            volume: c"vol-1".as_ptr(),
            instance: std::ptr::null(),
            context_json: context.as_ptr(),
            config_json: config.as_ptr(),
        }
    }

    #[test]
    fn host_info_copies_and_parses() {
        let context = CString::new(r#"{"instance-type":"m5.large"}"#).unwrap();
        let config = CString::new(r#"{"image":{"a":1},"attach":{"b":2}}"#).unwrap();
        let raw = raw_host(&context, &config);
        // SAFETY: `raw` and the strings it points to live until the end of the test.
        let info = unsafe { HostInfo::from_raw(&raw) }.unwrap();
        assert_eq!((info.queues, info.capacity), (2, 1 << 30));
        assert_eq!(
            (info.volume.as_str(), info.instance.as_str()),
            ("vol-1", "")
        );
        assert_eq!(info.context_str("instance-type"), Some("m5.large"));
        assert_eq!(info.image_config()["a"], 1);
        assert_eq!(info.attach_config()["b"], 2);
        assert!(
            !format!("{info:?}").contains("\"b\""),
            "Debug must not show the config"
        );
    }

    #[test]
    fn host_info_refuses_bad_input() {
        // SAFETY: NULL is allowed.
        assert!(unsafe { HostInfo::from_raw(std::ptr::null()) }.is_err());
        let context = CString::new("[1]").unwrap();
        let config = CString::new("{").unwrap();
        let mut raw = raw_host(&context, &config);
        // SAFETY: `raw` and its strings live until the end of the test.
        let err = unsafe { HostInfo::from_raw(&raw) }.unwrap_err();
        assert_eq!(err, "context_json is not a JSON object");
        raw.context_json = std::ptr::null();
        // SAFETY: as above.
        let err = unsafe { HostInfo::from_raw(&raw) }.unwrap_err();
        assert!(err.starts_with("config_json is not valid JSON"), "{err}");
        raw.abi_version = 2;
        // SAFETY: as above.
        let err = unsafe { HostInfo::from_raw(&raw) }.unwrap_err();
        assert!(err.contains("ABI version 2"), "{err}");
    }
}
