//! The qos configuration: which limits apply to one attachment.
//!
//! ```json
//! {"image":  {"limits": {"m5.large": {"iops": 3000, "mbps": 125},
//!                        "default":  {"iops": 1000, "mbps": 50}}},
//!  "attach": {"iops": 500}}
//! ```
//!
//! - The instance type is the context key `instance-type`. Its entry in `image.limits`
//!   applies, or else the `default` entry, or else no limit. An entry stands alone: a key it
//!   lacks is unlimited (it does not fall back to `default`).
//! - `attach.iops` / `attach.mbps`, when present, override the entry's value (the operator
//!   attaching the volume decides; the override may raise or lift a limit).
//! - `iops` is operations per second; `mbps` is **mebibytes** per second (2^20 bytes, the
//!   unit of cloud volume throughput), not megabits. `0`, `null` or absent: unlimited.
//! - Anything else is refused: values must be non-negative integers, and unknown keys are
//!   errors (a misspelt `"ipos"` would otherwise silently mean "unlimited").

use std::collections::BTreeMap;

use ferrodisk_driver_sdk::serde_json::Value;
use ferrodisk_driver_sdk::HostInfo;

/// The context key naming the instance type.
pub const INSTANCE_TYPE_KEY: &str = "instance-type";
/// The `image.limits` entry used when the instance type has none.
pub const DEFAULT_ENTRY: &str = "default";
/// Bytes per `mbps` unit (one mebibyte).
pub const MIB: u64 = 1 << 20;

/// The limits of one attachment. 0 is unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    /// Operations per second.
    pub iops: u64,
    /// Mebibytes per second.
    pub mbps: u64,
}

impl Limits {
    /// Bytes per second (0: unlimited).
    pub fn bytes_per_sec(&self) -> u64 {
        self.mbps * MIB
    }
}

/// One `{"iops": .., "mbps": ..}` object; `None` for an absent (or `null`) key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Entry {
    iops: Option<u64>,
    mbps: Option<u64>,
}

/// The limits for this attachment, from its config and instance context.
pub fn limits(host: &HostInfo) -> Result<Limits, String> {
    let entries = image_limits(host.image_config())?;
    let chosen = host
        .context_str(INSTANCE_TYPE_KEY)
        .and_then(|t| entries.get(t))
        .or_else(|| entries.get(DEFAULT_ENTRY))
        .copied()
        .unwrap_or_default();
    let attach = match host.attach_config() {
        Value::Null => Entry::default(),
        value => entry(value, "attach")?,
    };
    Ok(Limits {
        iops: attach.iops.or(chosen.iops).unwrap_or(0),
        mbps: attach.mbps.or(chosen.mbps).unwrap_or(0),
    })
}

/// `image.limits`, every entry checked (a bad manifest fails on every instance type, not
/// only on the one using the bad entry).
fn image_limits(image: &Value) -> Result<BTreeMap<String, Entry>, String> {
    let image = match image {
        Value::Null => return Ok(BTreeMap::new()),
        Value::Object(image) => image,
        other => return Err(format!("image must be an object, got {other}")),
    };
    if let Some(key) = image.keys().find(|k| *k != "limits") {
        return Err(format!("unknown key image.{key} (expected \"limits\")"));
    }
    match image.get("limits") {
        None | Some(Value::Null) => Ok(BTreeMap::new()),
        Some(Value::Object(limits)) => limits
            .iter()
            .map(|(name, value)| {
                Ok((
                    name.clone(),
                    entry(value, &format!("image.limits.{name:?}"))?,
                ))
            })
            .collect(),
        Some(other) => Err(format!("image.limits must be an object, got {other}")),
    }
}

/// One limits object.
fn entry(value: &Value, path: &str) -> Result<Entry, String> {
    let Value::Object(map) = value else {
        return Err(format!(
            "{path} must be an object like {{\"iops\": 3000, \"mbps\": 125}}, got {value}"
        ));
    };
    if let Some(key) = map.keys().find(|k| *k != "iops" && *k != "mbps") {
        return Err(format!(
            "unknown key {path}.{key} (expected \"iops\" or \"mbps\")"
        ));
    }
    let iops = number(map.get("iops"), path, "iops")?;
    let mbps = number(map.get("mbps"), path, "mbps")?;
    if let Some(m) = mbps {
        if m.checked_mul(MIB).is_none() {
            return Err(format!("{path}.mbps is too large: {m}"));
        }
    }
    Ok(Entry { iops, mbps })
}

/// A non-negative integer, or `None` for absent or `null`.
fn number(value: Option<&Value>, path: &str, key: &str) -> Result<Option<u64>, String> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| format!("{path}.{key} must be a non-negative integer, got {v}")),
    }
}
