//! Disk configuration: the `--disk key=value,...` syntax of `ferrodisk serve`.
//!
//! Parsing is strict: an unknown key, a repeated key or a malformed value is an error that
//! names the key, so a typo never silently changes how a disk is served.

use std::path::PathBuf;

/// Default number of virtqueues per disk.
pub const DEFAULT_QUEUES: u16 = 1;
/// Default virtqueue size (descriptors per queue).
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// The largest virtqueue we accept; also bounds every per-queue table.
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// The most queues a disk may have (one worker thread each).
pub const MAX_QUEUES: u16 = 64;
/// Default adaptive-polling budget per queue, in microseconds.
pub const DEFAULT_POLL_US: u32 = 50;
/// The largest polling budget accepted (an idle disk must never burn a core for long).
pub const MAX_POLL_US: u64 = 10_000;

/// Errors in a `--disk` specification.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("unknown key `{0}` (known keys: path, engine, size, socket, queues, queue-size, readonly, direct, serial, writeback, poll-us, inflight, volume, replicas, replica-timeout-ms, resync-mbps, meta, tls-name, latency-range)")]
    UnknownKey(String),
    #[error("key `{0}` is given twice")]
    DuplicateKey(String),
    #[error("`{0}` is not of the form key=value")]
    NotKeyValue(String),
    #[error("bad value `{value}` for `{key}`: {why}")]
    BadValue {
        key: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("missing `{0}`")]
    Missing(&'static str),
    #[error("`path` and `engine=null` exclude each other")]
    PathWithNull,
    #[error("`size` is only for `engine=null`; a file or device has its own size")]
    SizeWithoutNull,
    #[error("`{0}` needs `volume=ID`")]
    NeedsVolume(&'static str),
    #[error("replication needs a real backing (`path=`), not `engine=null`")]
    ReplicatedNull,
}

/// Which engine serves a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backing {
    /// A regular file or a block device, through io_uring.
    Path(PathBuf),
    /// No I/O at all: reads return zeros, writes are dropped. Measures the path itself.
    Null { size: u64 },
}

/// One disk, as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    pub backing: Backing,
    pub socket: PathBuf,
    pub queues: u16,
    pub queue_size: u16,
    pub readonly: bool,
    /// `None`: O_DIRECT for block devices, page cache for files.
    pub direct: Option<bool>,
    pub serial: Option<String>,
    /// Initial state of the guest-visible write cache (virtio-blk `writeback`).
    pub writeback: bool,
    /// How long a queue worker keeps polling the virtqueue and the ring after the last
    /// request before it goes back to sleep, in microseconds (0: never poll).
    pub poll_us: u32,
    /// Offer vhost-user inflight I/O tracking (crash-safe reconnect).
    pub inflight: bool,
    /// Replication: the volume id in the authority (`None`: not replicated).
    pub volume: Option<String>,
    /// Replica servers, `host:port` each.
    pub replicas: Vec<String>,
    /// How long a replica may take to acknowledge before it is declared failed.
    pub replica_timeout_ms: u32,
    /// Resync bandwidth limit per replica, MiB/s (0: unlimited).
    pub resync_mbps: u32,
    /// Directory for the dirty bitmaps and the clean-stop marker (default `<path>.ferrodisk`).
    pub meta: Option<PathBuf>,
    /// The name the replicas' TLS certificates must carry (`None`: each replica's host).
    pub tls_name: Option<String>,
    /// The range of the fine latency histogram buckets.
    pub latency_range: crate::metrics::FineRange,
}

/// Default time a replica may take to acknowledge a write.
pub const DEFAULT_REPLICA_TIMEOUT_MS: u32 = 5000;
/// Default resync bandwidth limit, MiB/s.
pub const DEFAULT_RESYNC_MBPS: u32 = 200;

impl DiskConfig {
    /// A disk with every option at its default.
    pub fn new(backing: Backing, socket: PathBuf) -> DiskConfig {
        DiskConfig {
            backing,
            socket,
            queues: DEFAULT_QUEUES,
            queue_size: DEFAULT_QUEUE_SIZE,
            readonly: false,
            direct: None,
            serial: None,
            writeback: true,
            poll_us: DEFAULT_POLL_US,
            inflight: true,
            volume: None,
            replicas: Vec::new(),
            replica_timeout_ms: DEFAULT_REPLICA_TIMEOUT_MS,
            resync_mbps: DEFAULT_RESYNC_MBPS,
            meta: None,
            tls_name: None,
            latency_range: crate::metrics::FineRange::default(),
        }
    }

    /// Parses `key=value[,key=value...]`.
    pub fn parse(spec: &str) -> Result<Self, ConfigError> {
        let mut seen: Vec<&str> = Vec::new();
        let mut path = None;
        let mut null = false;
        let mut size = None;
        let mut socket = None;
        let mut cfg = DiskConfig {
            backing: Backing::Null { size: 0 },
            socket: PathBuf::new(),
            queues: DEFAULT_QUEUES,
            queue_size: DEFAULT_QUEUE_SIZE,
            readonly: false,
            direct: None,
            serial: None,
            writeback: true,
            poll_us: DEFAULT_POLL_US,
            inflight: true,
            volume: None,
            replicas: Vec::new(),
            replica_timeout_ms: DEFAULT_REPLICA_TIMEOUT_MS,
            resync_mbps: DEFAULT_RESYNC_MBPS,
            meta: None,
            tls_name: None,
            latency_range: crate::metrics::FineRange::default(),
        };
        for item in spec.split(',').filter(|s| !s.is_empty()) {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| ConfigError::NotKeyValue(item.to_string()))?;
            if seen.contains(&key) {
                return Err(ConfigError::DuplicateKey(key.to_string()));
            }
            seen.push(key);
            match key {
                "path" => path = Some(PathBuf::from(value)),
                "engine" => match value {
                    "null" => null = true,
                    "uring" | "io_uring" => null = false,
                    _ => return Err(bad("engine", value, "expected `null` or `uring`")),
                },
                "size" => size = Some(parse_size("size", value)?),
                "socket" => socket = Some(PathBuf::from(value)),
                "queues" => {
                    cfg.queues = parse_in_range("queues", value, 1, u64::from(MAX_QUEUES))? as u16
                }
                "queue-size" => {
                    let n = parse_in_range("queue-size", value, 2, u64::from(MAX_QUEUE_SIZE))?;
                    if !n.is_power_of_two() {
                        return Err(bad("queue-size", value, "must be a power of two"));
                    }
                    cfg.queue_size = n as u16;
                }
                "readonly" => cfg.readonly = parse_bool("readonly", value)?,
                "direct" => cfg.direct = Some(parse_bool("direct", value)?),
                "writeback" => cfg.writeback = parse_bool("writeback", value)?,
                "inflight" => cfg.inflight = parse_bool("inflight", value)?,
                "poll-us" => cfg.poll_us = parse_in_range("poll-us", value, 0, MAX_POLL_US)? as u32,
                "volume" => {
                    if !valid_name(value) {
                        return Err(bad(
                            "volume",
                            value,
                            "1-64 characters from [A-Za-z0-9._-], not starting with a dot",
                        ));
                    }
                    cfg.volume = Some(value.to_string());
                }
                "replicas" => {
                    // An empty list is a volume without replicas (still fenced by epoch).
                    for r in value
                        .split('+')
                        .filter(|r| !value.is_empty() || !r.is_empty())
                    {
                        if !valid_host_port(r) {
                            return Err(bad(
                                "replicas",
                                value,
                                "expected HOST:PORT[+HOST:PORT...]",
                            ));
                        }
                        if cfg.replicas.iter().any(|x| x == r) {
                            return Err(bad("replicas", value, "a replica is listed twice"));
                        }
                        cfg.replicas.push(r.to_string());
                    }
                    if cfg.replicas.len() > 8 {
                        return Err(bad("replicas", value, "at most 8 replicas"));
                    }
                }
                "replica-timeout-ms" => {
                    cfg.replica_timeout_ms =
                        parse_in_range("replica-timeout-ms", value, 100, 600_000)? as u32
                }
                "resync-mbps" => {
                    cfg.resync_mbps = parse_in_range("resync-mbps", value, 0, 1_000_000)? as u32
                }
                "meta" => cfg.meta = Some(PathBuf::from(value)),
                "tls-name" => {
                    if value.is_empty() || value.len() > 253 || value.contains(['/', ' ']) {
                        return Err(bad(
                            "tls-name",
                            value,
                            "expected a DNS name or an IP address",
                        ));
                    }
                    cfg.tls_name = Some(value.to_string());
                }
                "latency-range" => {
                    cfg.latency_range = crate::metrics::FineRange::parse(value).map_err(|_| {
                        bad(
                            "latency-range",
                            value,
                            "expected LO-HI[/STEPS], e.g. 0-1ms/50",
                        )
                    })?
                }
                "serial" => {
                    if value.len() > 20 || !value.is_ascii() {
                        return Err(bad("serial", value, "at most 20 ASCII characters"));
                    }
                    cfg.serial = Some(value.to_string());
                }
                _ => return Err(ConfigError::UnknownKey(key.to_string())),
            }
        }
        cfg.socket = socket.ok_or(ConfigError::Missing("socket"))?;
        if cfg.volume.is_none() {
            for key in [
                "replicas",
                "replica-timeout-ms",
                "resync-mbps",
                "meta",
                "tls-name",
            ] {
                if seen.contains(&key) {
                    return Err(ConfigError::NeedsVolume(key));
                }
            }
        } else if null {
            return Err(ConfigError::ReplicatedNull);
        }
        cfg.backing = match (path, null, size) {
            (Some(_), true, _) => return Err(ConfigError::PathWithNull),
            (Some(_), false, Some(_)) => return Err(ConfigError::SizeWithoutNull),
            (Some(p), false, None) => Backing::Path(p),
            (None, true, Some(size)) => Backing::Null { size },
            (None, true, None) => return Err(ConfigError::Missing("size (for engine=null)")),
            (None, false, _) => return Err(ConfigError::Missing("path (or engine=null)")),
        };
        Ok(cfg)
    }

    /// The serial number reported by VIRTIO_BLK_T_GET_ID.
    pub fn serial_or_default(&self) -> String {
        if let Some(s) = &self.serial {
            return s.clone();
        }
        let name = match &self.backing {
            Backing::Path(p) => p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            Backing::Null { .. } => "null".to_string(),
        };
        let mut s: String = format!("fd-{name}")
            .chars()
            .filter(|c| c.is_ascii_graphic())
            .collect();
        s.truncate(20);
        s
    }
}

fn bad(key: &'static str, value: &str, why: &'static str) -> ConfigError {
    ConfigError::BadValue {
        key,
        value: value.to_string(),
        why,
    }
}

fn parse_bool(key: &'static str, value: &str) -> Result<bool, ConfigError> {
    match value {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(bad(key, value, "expected on or off")),
    }
}

fn parse_in_range(key: &'static str, value: &str, min: u64, max: u64) -> Result<u64, ConfigError> {
    let n: u64 = value.parse().map_err(|_| bad(key, value, "not a number"))?;
    if n < min || n > max {
        return Err(bad(key, value, "out of range"));
    }
    Ok(n)
}

/// The rule for names that become file names and keys (volumes, instances, images): 1-64
/// characters from `[A-Za-z0-9._-]`, not starting with a dot.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// Whether `s` is `HOST:PORT` with a non-zero port (a replica address).
pub fn valid_host_port(s: &str) -> bool {
    s.rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0))
}

/// Parses a byte size with an optional binary suffix (K, M, G, T). Must be a multiple of 512.
pub fn parse_size(key: &'static str, value: &str) -> Result<u64, ConfigError> {
    let (digits, mult) = match value.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(bad(key, value, "unknown suffix (use K, M, G or T)")),
            };
            (&value[..i], m)
        }
        _ => (value, 1),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| bad(key, value, "not a number"))?;
    // A file's size is an off_t: beyond i64::MAX no file system (nor set_len) takes it.
    let bytes = n
        .checked_mul(mult)
        .filter(|&b| b <= i64::MAX as u64)
        .ok_or_else(|| bad(key, value, "too large"))?;
    if bytes == 0 || bytes % 512 != 0 {
        return Err(bad(key, value, "must be a non-zero multiple of 512"));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_file_disk() {
        let c = DiskConfig::parse("path=/tmp/a.img,socket=/tmp/a.sock,queues=2,queue-size=128,readonly=on,direct=off,serial=abc").unwrap();
        assert_eq!(c.backing, Backing::Path("/tmp/a.img".into()));
        assert_eq!(c.queues, 2);
        assert_eq!(c.queue_size, 128);
        assert!(c.readonly);
        assert_eq!(c.direct, Some(false));
        assert_eq!(c.serial.as_deref(), Some("abc"));
    }

    #[test]
    fn parses_a_replicated_disk() {
        let c = DiskConfig::parse(
            "path=/a.img,socket=/s,volume=vol-1,replicas=10.0.0.2:7000+[::1]:7001,replica-timeout-ms=2000,resync-mbps=50",
        )
        .unwrap();
        assert_eq!(c.volume.as_deref(), Some("vol-1"));
        assert_eq!(c.replicas, vec!["10.0.0.2:7000", "[::1]:7001"]);
        assert_eq!((c.replica_timeout_ms, c.resync_mbps), (2000, 50));
        assert_eq!(c.tls_name, None);
    }

    #[test]
    fn an_empty_replica_list_and_a_tls_name() {
        let c = DiskConfig::parse("path=/a,socket=/s,volume=v,replicas=,tls-name=replicas.example")
            .unwrap();
        assert!(c.replicas.is_empty());
        assert_eq!(c.tls_name.as_deref(), Some("replicas.example"));
        assert!(DiskConfig::parse("path=/a,socket=/s,volume=v,replicas=h:1+").is_err());
        assert!(DiskConfig::parse("path=/a,socket=/s,tls-name=x").is_err());
    }

    #[test]
    fn parses_a_null_disk() {
        let c = DiskConfig::parse("engine=null,size=1G,socket=/s").unwrap();
        assert_eq!(c.backing, Backing::Null { size: 1 << 30 });
        assert_eq!(c.serial_or_default(), "fd-null");
    }

    #[test]
    fn rejects_bad_specs() {
        use ConfigError::*;
        let err = |s| DiskConfig::parse(s).unwrap_err();
        assert_eq!(err("path=/a,socket=/s,bogus=1"), UnknownKey("bogus".into()));
        assert_eq!(
            err("path=/a,path=/b,socket=/s"),
            DuplicateKey("path".into())
        );
        assert_eq!(err("path=/a"), Missing("socket"));
        assert_eq!(err("socket=/s"), Missing("path (or engine=null)"));
        assert_eq!(
            err("engine=null,socket=/s"),
            Missing("size (for engine=null)")
        );
        assert_eq!(err("path=/a,engine=null,size=1M,socket=/s"), PathWithNull);
        assert!(matches!(
            err("engine=null,size=1000,socket=/s"),
            BadValue { key: "size", .. }
        ));
        assert!(matches!(
            err("path=/a,socket=/s,queues=0"),
            BadValue { key: "queues", .. }
        ));
        assert!(matches!(
            err("path=/a,socket=/s,queue-size=100"),
            BadValue { .. }
        ));
        assert!(matches!(
            err("path=/a,socket=/s,readonly=maybe"),
            BadValue { .. }
        ));
        assert!(matches!(err("path=/a,socket=/s,x"), NotKeyValue(_)));
        assert_eq!(
            err("path=/a,socket=/s,replicas=h:1"),
            NeedsVolume("replicas")
        );
        assert_eq!(
            err("engine=null,size=1M,socket=/s,volume=v"),
            ReplicatedNull
        );
        assert!(matches!(
            err("path=/a,socket=/s,volume=v,replicas=h:1+h:1"),
            BadValue {
                key: "replicas",
                ..
            }
        ));
        assert!(matches!(
            err("path=/a,socket=/s,volume=v,replicas=h"),
            BadValue {
                key: "replicas",
                ..
            }
        ));
        assert!(matches!(
            err("path=/a,socket=/s,volume=../x"),
            BadValue { key: "volume", .. }
        ));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("size", "512").unwrap(), 512);
        assert_eq!(parse_size("size", "4k").unwrap(), 4096);
        assert_eq!(parse_size("size", "2T").unwrap(), 2 << 40);
        assert!(parse_size("size", "0").is_err());
        assert!(parse_size("size", "1X").is_err());
        // Beyond an off_t: no file can be that large (the API used to answer 500 for it).
        assert!(parse_size("size", "9223372036854775808").is_err());
        assert!(parse_size("size", "8388608T").is_err());
        assert_eq!(
            parse_size("size", "9223372036854775296").unwrap(),
            i64::MAX as u64 - 511
        );
    }
}
