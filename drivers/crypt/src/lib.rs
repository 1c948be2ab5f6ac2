//! The `crypt` driver image: per-volume encryption at rest with XTS-AES-256 (IEEE 1619,
//! NIST SP 800-38E), the key supplied at attach.
//!
//! # Format
//!
//! - **Key**: `{"attach": {"key": "<128 hex digits>"}}`, 64 bytes: Key1 (data, the first 32
//!   bytes) then Key2 (tweak, the last 32), as in IEEE 1619 and dm-crypt's `aes-xts-plain64`.
//!   `init` refuses a missing or malformed key, and a key whose halves are equal (IEEE
//!   1619-2018 and FIPS forbid Key1 = Key2). Error messages never quote the key.
//! - **Data unit**: one 512-byte sector. **Tweak**: the sector number (`offset / 512`) as a
//!   128-bit little-endian integer (dm-crypt `plain64`). So the same plaintext stores
//!   differently in every sector, and a volume image is readable by
//!   `cryptsetup --type plain -c aes-xts-plain64 -s 512` with the same key.
//! - Offsets and lengths that are not multiples of 512 are failed (`FAIL`): XTS cannot
//!   encrypt part of a data unit without reading the rest.
//!
//! # Data path
//!
//! - `submit(write)`: the guest data is copied into the host's bounce buffer (each guest
//!   byte read once) and encrypted there, sector by sector; the guest's buffers are never
//!   written. The host stores the bounce buffer.
//! - `complete(read)`: the stored sectors are decrypted in place in the guest's buffers; a
//!   sector straddling two buffers is gathered, decrypted and scattered back by the SDK.
//!
//! # Zeroes
//!
//! Discard and write-zeroes pass through, so the backing holds zero bytes there, and a guest
//! must then read zeros (`write-zeroes` promises it, and discard with `unmap` is commonly
//! relied on to). Decrypting zeros would return noise, so **a stored sector that is all zero
//! bytes is returned as zeros, not decrypted**. The cost is nil: a real ciphertext sector is
//! all zeros with probability 2^-4096. (A guest writing a zero-filled sector stores its
//! ciphertext, not zeros, and reads back zeros too.) This does reveal which sectors were
//! never written or were discarded, as any thin-provisioned encrypted volume does.
//!
//! # Limits
//!
//! XTS is not authenticated: it hides data, it does not detect tampering with the stored
//! sectors (a changed sector decrypts to noise). The expanded keys are zeroized on detach;
//! the key's text in the attach config is owned by the host and the SDK's parsed copy, and
//! is not.

use aes::cipher::{generic_array::GenericArray, KeyInit};
use aes::Aes256;
use ferrodisk_driver_sdk::serde_json::Value;
use ferrodisk_driver_sdk::{
    export_driver, Driver, HostInfo, Op, Req, ReqMut, Verdict, ERR_INTERNAL, SECTOR_SIZE,
    WANTS_READ_DATA, WANTS_WRITE_DATA,
};
use xts_mode::{get_tweak_default, Xts128};
use zeroize::Zeroizing;

/// Key length in bytes (two AES-256 keys).
pub const KEY_BYTES: usize = 64;

/// One attachment's cipher. Holds no plaintext; `Debug` shows nothing of the key.
pub struct Crypt {
    xts: Xts128<Aes256>,
}

impl std::fmt::Debug for Crypt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Crypt { .. }")
    }
}

impl Crypt {
    /// The cipher for a 64-byte key: Key1 (data) then Key2 (tweak).
    pub fn new(key: &[u8; KEY_BYTES]) -> Result<Crypt, String> {
        let (key1, key2) = key.split_at(KEY_BYTES / 2);
        if key1 == key2 {
            return Err(
                "crypt: attach.key has identical halves; XTS needs two different \
                        256-bit keys (IEEE 1619)"
                    .into(),
            );
        }
        let data = Aes256::new(GenericArray::from_slice(key1));
        let tweak = Aes256::new(GenericArray::from_slice(key2));
        Ok(Crypt {
            xts: Xts128::new(data, tweak),
        })
    }

    /// The cipher for the attach config `{"key": "<128 hex digits>"}`.
    pub fn from_attach_config(attach: &Value) -> Result<Crypt, String> {
        let map = match attach {
            Value::Object(map) => map,
            Value::Null => return Err(format!("crypt: {MISSING}")),
            _ => return Err("crypt: attach must be an object like {\"key\": \"<hex>\"}".into()),
        };
        if let Some(other) = map.keys().find(|k| *k != "key") {
            return Err(format!(
                "crypt: unknown key attach.{other} (expected \"key\")"
            ));
        }
        match map.get("key") {
            None | Some(Value::Null) => Err(format!("crypt: {MISSING}")),
            Some(Value::String(hex)) => Crypt::new(&*parse_key(hex)?),
            Some(_) => Err("crypt: attach.key must be a string of 128 hex digits".into()),
        }
    }

    /// Encrypts sector `sector` (its number on the disk) in place.
    pub fn encrypt_sector(&self, sector: u64, data: &mut [u8; SECTOR_SIZE]) {
        self.xts
            .encrypt_sector(data, get_tweak_default(u128::from(sector)));
    }

    /// Decrypts sector `sector` in place; an all-zero sector stays zeros (see the crate
    /// docs).
    pub fn decrypt_sector(&self, sector: u64, data: &mut [u8; SECTOR_SIZE]) {
        if data.iter().all(|&b| b == 0) {
            return;
        }
        self.xts
            .decrypt_sector(data, get_tweak_default(u128::from(sector)));
    }
}

const MISSING: &str =
    "attach.key is missing: attach with {\"key\": \"<128 hex digits>\"} (a 64-byte XTS-AES-256 key)";

/// Decodes the key, without ever quoting it in an error.
fn parse_key(hex: &str) -> Result<Zeroizing<[u8; KEY_BYTES]>, String> {
    if hex.len() != 2 * KEY_BYTES {
        return Err(format!(
            "crypt: attach.key must be 128 hex digits (64 bytes), got {} characters",
            hex.chars().count()
        ));
    }
    let mut key = Zeroizing::new([0u8; KEY_BYTES]);
    for (i, pair) in hex.as_bytes().chunks_exact(2).enumerate() {
        let digit = |at: usize| {
            (pair[at] as char).to_digit(16).ok_or_else(|| {
                format!(
                    "crypt: attach.key is not hexadecimal (character {})",
                    2 * i + at + 1
                )
            })
        };
        key[i] = (digit(0)? * 16 + digit(1)?) as u8;
    }
    Ok(key)
}

/// Whether a request covers whole sectors.
fn aligned(offset: u64, len: u64) -> bool {
    offset % SECTOR_SIZE as u64 == 0 && len % SECTOR_SIZE as u64 == 0
}

impl Driver for Crypt {
    const NAME: &'static str = "crypt";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const FLAGS: u32 = WANTS_WRITE_DATA | WANTS_READ_DATA;

    fn init(host: &HostInfo) -> Result<Self, String> {
        Crypt::from_attach_config(host.attach_config())
    }

    fn submit(&self, req: &mut Req<'_>) -> Verdict {
        match req.op() {
            Op::Flush => Verdict::Pass,
            Op::Read | Op::Discard | Op::WriteZeroes if aligned(req.offset(), req.len()) => {
                Verdict::Pass
            }
            Op::Write if aligned(req.offset(), req.len()) => {
                let first = req.offset() / SECTOR_SIZE as u64;
                // The SDK checked the bounce buffer against the flags; should it still be
                // missing, this is a host bug, and passing would store plaintext.
                let Ok(bounce) = req.bounce_with_data() else {
                    return Verdict::Error(ERR_INTERNAL);
                };
                for (i, sector) in bounce.chunks_exact_mut(SECTOR_SIZE).enumerate() {
                    let sector = <&mut [u8; SECTOR_SIZE]>::try_from(sector).expect("exact chunks");
                    self.encrypt_sector(first + i as u64, sector);
                }
                Verdict::Pass
            }
            Op::Read | Op::Write | Op::Discard | Op::WriteZeroes | Op::Unknown(_) => Verdict::Fail,
        }
    }

    fn complete(&self, req: &mut ReqMut<'_>, status: i32) -> Result<(), String> {
        if req.op() != Op::Read || status != 0 {
            return Ok(());
        }
        if !aligned(req.offset(), req.len()) {
            return Err(format!(
                "crypt: read of {} bytes at {} is not whole sectors",
                req.len(),
                req.offset()
            ));
        }
        let first = req.offset() / SECTOR_SIZE as u64;
        req.for_each_sector_mut(|i, sector| self.decrypt_sector(first + i, sector))
            .map_err(|e| format!("crypt: {e}"))
    }
}

export_driver!(Crypt);

#[cfg(test)]
mod tests;
