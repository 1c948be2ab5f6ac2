//! The replication wire protocol: a mutually authenticated handshake, then frames.
//!
//! Two ways to secure a link, chosen by configuration ([`Auth`]), never by the peer:
//! - **TLS 1.3** (rustls, `ring` provider) with mutual authentication: each side presents a
//!   certificate signed by a CA the other trusts, and the primary also checks the replica's
//!   name (its address's host, or `tls-name=`). Frames travel inside TLS records without an
//!   HMAC tag: TLS already encrypts them and protects their integrity and order.
//! - **A pre-shared key** (`FDR2`, below): authenticated but NOT encrypted; every frame
//!   carries an HMAC-SHA256 tag.
//!
//! Either handshake must complete within [`HANDSHAKE_TIMEOUT`] in total (not per read): a
//! peer that trickles bytes is dropped when the deadline passes.
//!
//! Protocol version 2 with a pre-shared key. Handshake (the only unauthenticated bytes):
//! ```text
//! client → server  "FDR2" | nonce_c[32]
//! server → client  nonce_s[32] | HMAC(psk, "fdr2 server" | nonce_c | nonce_s)
//! client → server  HMAC(psk, "fdr2 client" | nonce_c | nonce_s)
//! ```
//! Each side proves it holds the key over the other side's fresh nonce, so neither a peer
//! without the key nor a replayed handshake gets through. Each direction then has its own
//! session key, `HMAC(psk, "fdr2 c2s"|"fdr2 s2c" | nonce_c | nonce_s)`. A peer that speaks
//! version 1 (`"FDR1"`) is refused with [`WireError::Version`]: the messages changed (an
//! `Open` carries the volume's uuid and is answered by `Opened`), so the versions never mix.
//!
//! Frame: `len: u32 | kind: u8 | body[len] | tag[32]` (no tag under TLS), where `tag = HMAC(session key,
//! counter: u64 | len | kind | body)` and `counter` counts the frames sent in that direction.
//! A replayed, reordered, dropped or altered frame fails the tag check and ends the
//! connection. Integers are little-endian; a string is `len: u16 | UTF-8 bytes`, so a
//! message can carry several. A body with bytes left over after its fields is malformed.

use std::io::{self, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

const MAGIC: &[u8; 4] = b"FDR2";
/// The magic of protocol version 1, recognised only to refuse it clearly.
const MAGIC_V1: &[u8; 4] = b"FDR1";
const TAG: usize = 32;
const NONCE: usize = 32;
/// Largest frame body: one write (or read reply) of up to 4 MiB plus its header.
pub const MAX_BODY: usize = (4 << 20) + 64;
/// Largest `Read`: the data of its reply must fit in one frame.
pub const MAX_READ: u64 = 4 << 20;

/// Why a replica refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Code {
    /// The request's epoch is older than one the replica has seen: the sender is fenced.
    Stale = 1,
    /// The data does not match its crc32c.
    Checksum = 2,
    /// The replica's disk failed.
    Io = 3,
    /// Offset or length outside the volume, or a size mismatch.
    Range = 4,
    /// A malformed or unexpected message.
    Protocol = 5,
}

impl Code {
    fn from_u8(b: u8) -> Code {
        match b {
            1 => Code::Stale,
            2 => Code::Checksum,
            3 => Code::Io,
            4 => Code::Range,
            _ => Code::Protocol,
        }
    }
}

/// A protocol message. Requests carry a `seq` that their reply echoes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    /// Binds the connection to a volume at `epoch`, creating a `size`-byte replica if needed.
    /// `uuid` names the volume's incarnation (the authority's `VolumeRecord::uuid`); a
    /// primary (`epoch > 0`) must send one. Epoch 0 opens as an observer: checksums, reads,
    /// fencing and dropping only. Answered by [`Msg::Opened`] or a `Nack`.
    Open {
        seq: u64,
        epoch: u64,
        size: u64,
        volume: String,
        uuid: String,
    },
    Write {
        seq: u64,
        epoch: u64,
        offset: u64,
        crc: u32,
        data: Vec<u8>,
    },
    /// Write-zeroes; with `unmap`, the range may be deallocated (discard).
    Zero {
        seq: u64,
        epoch: u64,
        offset: u64,
        len: u64,
        unmap: bool,
    },
    /// Raises the volume's epoch to at least `epoch` (promotion); older senders are refused.
    Fence {
        seq: u64,
        epoch: u64,
    },
    /// crc32c of each `chunk` bytes of `[offset, offset + len)`.
    Sums {
        seq: u64,
        offset: u64,
        len: u64,
        chunk: u32,
    },
    /// Success; `value` is the stored epoch for Fence, the generation for Adopt.
    Ack {
        seq: u64,
        value: u64,
    },
    Nack {
        seq: u64,
        code: Code,
        message: String,
    },
    SumsReply {
        seq: u64,
        crcs: Vec<u32>,
    },
    /// The reply to `Open`: the replica's stored epoch and the identity of its copy after
    /// the open ("generation `gen` of volume `uuid`"; `gen` 0: blank or unknown content).
    Opened {
        seq: u64,
        epoch: u64,
        size: u64,
        uuid: String,
        gen: u64,
    },
    /// The primary vouches for the copy: it is generation `gen` of the volume the connection
    /// opened. Applied in order with the connection's writes; `Ack{value: gen}` once durable.
    Adopt {
        seq: u64,
        epoch: u64,
        gen: u64,
    },
    /// Reads `[offset, offset + len)` (at most [`MAX_READ`] bytes); answered by `Data`.
    Read {
        seq: u64,
        offset: u64,
        len: u64,
    },
    /// The reply to `Read`.
    Data {
        seq: u64,
        data: Vec<u8>,
    },
    /// The volume was deleted: raise its epoch to `epoch` durably, void the copy's identity
    /// and delete it. Older senders stay fenced.
    Drop {
        seq: u64,
        epoch: u64,
    },
}

impl Msg {
    pub fn seq(&self) -> u64 {
        match self {
            Msg::Open { seq, .. }
            | Msg::Write { seq, .. }
            | Msg::Zero { seq, .. }
            | Msg::Fence { seq, .. }
            | Msg::Sums { seq, .. }
            | Msg::Ack { seq, .. }
            | Msg::Nack { seq, .. }
            | Msg::SumsReply { seq, .. }
            | Msg::Opened { seq, .. }
            | Msg::Adopt { seq, .. }
            | Msg::Read { seq, .. }
            | Msg::Data { seq, .. }
            | Msg::Drop { seq, .. } => *seq,
        }
    }

    fn kind(&self) -> u8 {
        match self {
            Msg::Open { .. } => 1,
            Msg::Write { .. } => 2,
            Msg::Zero { .. } => 3,
            Msg::Fence { .. } => 4,
            Msg::Sums { .. } => 5,
            Msg::Ack { .. } => 6,
            Msg::Nack { .. } => 7,
            Msg::SumsReply { .. } => 8,
            Msg::Opened { .. } => 9,
            Msg::Adopt { .. } => 10,
            Msg::Read { .. } => 11,
            Msg::Data { .. } => 12,
            Msg::Drop { .. } => 13,
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        let u64s = |o: &mut Vec<u8>, vs: &[u64]| {
            for v in vs {
                o.extend_from_slice(&v.to_le_bytes());
            }
        };
        match self {
            Msg::Open {
                seq,
                epoch,
                size,
                volume,
                uuid,
            } => {
                u64s(out, &[*seq, *epoch, *size]);
                put_string(out, volume);
                put_string(out, uuid);
            }
            Msg::Write {
                seq,
                epoch,
                offset,
                crc,
                data,
            } => {
                encode_write_header(out, *seq, *epoch, *offset, *crc);
                out.extend_from_slice(data);
            }
            Msg::Zero {
                seq,
                epoch,
                offset,
                len,
                unmap,
            } => {
                u64s(out, &[*seq, *epoch, *offset, *len]);
                out.push(u8::from(*unmap));
            }
            Msg::Fence { seq, epoch } | Msg::Drop { seq, epoch } => u64s(out, &[*seq, *epoch]),
            Msg::Sums {
                seq,
                offset,
                len,
                chunk,
            } => {
                u64s(out, &[*seq, *offset, *len]);
                out.extend_from_slice(&chunk.to_le_bytes());
            }
            Msg::Ack { seq, value } => u64s(out, &[*seq, *value]),
            Msg::Nack { seq, code, message } => {
                u64s(out, &[*seq]);
                out.push(*code as u8);
                put_string(out, message);
            }
            Msg::SumsReply { seq, crcs } => {
                u64s(out, &[*seq]);
                for c in crcs {
                    out.extend_from_slice(&c.to_le_bytes());
                }
            }
            Msg::Opened {
                seq,
                epoch,
                size,
                uuid,
                gen,
            } => {
                u64s(out, &[*seq, *epoch, *size]);
                put_string(out, uuid);
                u64s(out, &[*gen]);
            }
            Msg::Adopt { seq, epoch, gen } => u64s(out, &[*seq, *epoch, *gen]),
            Msg::Read { seq, offset, len } => u64s(out, &[*seq, *offset, *len]),
            Msg::Data { seq, data } => {
                u64s(out, &[*seq]);
                out.extend_from_slice(data);
            }
        }
    }

    fn decode(kind: u8, b: &[u8]) -> Result<Msg, WireError> {
        let mut r = Cursor { b, at: 0 };
        let m = match kind {
            1 => Msg::Open {
                seq: r.u64()?,
                epoch: r.u64()?,
                size: r.u64()?,
                volume: r.string()?,
                uuid: r.string()?,
            },
            2 => Msg::Write {
                seq: r.u64()?,
                epoch: r.u64()?,
                offset: r.u64()?,
                crc: r.u32()?,
                data: r.rest().to_vec(),
            },
            3 => Msg::Zero {
                seq: r.u64()?,
                epoch: r.u64()?,
                offset: r.u64()?,
                len: r.u64()?,
                unmap: r.u8()? != 0,
            },
            4 => Msg::Fence {
                seq: r.u64()?,
                epoch: r.u64()?,
            },
            5 => Msg::Sums {
                seq: r.u64()?,
                offset: r.u64()?,
                len: r.u64()?,
                chunk: r.u32()?,
            },
            6 => Msg::Ack {
                seq: r.u64()?,
                value: r.u64()?,
            },
            7 => Msg::Nack {
                seq: r.u64()?,
                code: Code::from_u8(r.u8()?),
                message: r.string()?,
            },
            8 => {
                let seq = r.u64()?;
                let rest = r.rest();
                if rest.len() % 4 != 0 {
                    return Err(WireError::Malformed("checksum reply length"));
                }
                Msg::SumsReply {
                    seq,
                    crcs: rest
                        .chunks_exact(4)
                        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect(),
                }
            }
            9 => Msg::Opened {
                seq: r.u64()?,
                epoch: r.u64()?,
                size: r.u64()?,
                uuid: r.string()?,
                gen: r.u64()?,
            },
            10 => Msg::Adopt {
                seq: r.u64()?,
                epoch: r.u64()?,
                gen: r.u64()?,
            },
            11 => Msg::Read {
                seq: r.u64()?,
                offset: r.u64()?,
                len: r.u64()?,
            },
            12 => Msg::Data {
                seq: r.u64()?,
                data: r.rest().to_vec(),
            },
            13 => Msg::Drop {
                seq: r.u64()?,
                epoch: r.u64()?,
            },
            _ => return Err(WireError::Malformed("unknown message kind")),
        };
        if r.at != b.len() {
            return Err(WireError::Malformed("trailing bytes"));
        }
        Ok(m)
    }
}

/// Appends `s` as `len: u16 | UTF-8`. A longer string (only a refusal's message can be) is
/// cut at a character boundary to fit.
fn put_string(out: &mut Vec<u8>, s: &str) {
    let mut end = s.len().min(usize::from(u16::MAX));
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out.extend_from_slice(&(end as u16).to_le_bytes());
    out.extend_from_slice(&s.as_bytes()[..end]);
}

/// The fixed part of a write body; the data follows it.
pub fn encode_write_header(out: &mut Vec<u8>, seq: u64, epoch: u64, offset: u64, crc: u32) {
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&epoch.to_le_bytes());
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&crc.to_le_bytes());
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let s = self
            .b
            .get(self.at..self.at + n)
            .ok_or(WireError::Malformed("message too short"))?;
        self.at += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn rest(&mut self) -> &'a [u8] {
        let s = &self.b[self.at..];
        self.at = self.b.len();
        s
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    /// A length-prefixed string (`len: u16 | UTF-8`).
    fn string(&mut self) -> Result<String, WireError> {
        let n = usize::from(self.u16()?);
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| WireError::Malformed("not UTF-8"))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("the peer failed authentication (wrong key, or not a Ferrodisk replica peer)")]
    Unauthenticated,
    #[error("a frame failed its integrity check")]
    BadTag,
    #[error("malformed message: {0}")]
    Malformed(&'static str),
    #[error("frame of {0} bytes is too large")]
    TooLarge(usize),
    /// The peer speaks another version of this protocol.
    #[error("{0}")]
    Version(String),
    #[error("the handshake did not complete within {} s", HANDSHAKE_TIMEOUT.as_secs())]
    HandshakeTimeout,
    /// TLS refused the peer (a certificate from another CA, a wrong name, no certificate)
    /// or the TLS stream broke.
    #[error("TLS: {0}")]
    Tls(String),
}

impl WireError {
    /// Whether a receive timed out (nothing, or only part of a frame, arrived in time; the
    /// part stays buffered for the next call).
    pub fn is_timeout(&self) -> bool {
        matches!(self, WireError::Io(e) if matches!(e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut))
    }

    /// Whether the peer simply went away (as opposed to misbehaving).
    pub fn is_disconnect(&self) -> bool {
        matches!(self, WireError::Io(e) if matches!(e.kind(),
            io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe))
    }
}

/// Rate-limits a log line that peers can trigger: at most [`Throttle::BURST`] reports in
/// any window of 10 s; the next report counts the events it stood for.
pub struct Throttle {
    /// The current window's start and the reports made in it.
    window: Mutex<(Option<Instant>, u32)>,
    count: std::sync::atomic::AtomicU64,
}

impl Default for Throttle {
    fn default() -> Throttle {
        Throttle::new()
    }
}

impl Throttle {
    const EVERY: Duration = Duration::from_secs(10);
    pub const BURST: u32 = 5;

    pub fn new() -> Throttle {
        Throttle {
            window: Mutex::new((None, 0)),
            count: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Counts one event; returns how many happened since the last report when this one
    /// may be reported.
    pub fn ready(&self) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        self.count.fetch_add(1, Relaxed);
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if w.0.is_none_or(|t| now.duration_since(t) >= Throttle::EVERY) {
            *w = (Some(now), 0);
        }
        if w.1 >= Throttle::BURST {
            return None;
        }
        w.1 += 1;
        Some(self.count.swap(0, Relaxed))
    }
}

/// A pre-shared key (at least 16 bytes).
#[derive(Clone)]
pub struct Key(Vec<u8>);

impl Key {
    pub fn new(bytes: Vec<u8>) -> Result<Key, String> {
        if bytes.len() < 16 {
            return Err(format!(
                "the replication key has {} bytes; use at least 16 (e.g. `head -c 32 /dev/urandom > key`)",
                bytes.len()
            ));
        }
        Ok(Key(bytes))
    }

    /// Reads a key file; a trailing newline is ignored so that text keys work too.
    pub fn from_file(path: &std::path::Path) -> Result<Key, String> {
        let mut b = std::fs::read(path)
            .map_err(|e| format!("cannot read the key file {}: {e}", path.display()))?;
        while b.last().is_some_and(|c| *c == b'\n' || *c == b'\r') {
            b.pop();
        }
        Key::new(b)
    }

    fn mac(&self, label: &[u8], nc: &[u8], ns: &[u8]) -> HmacSha256 {
        let mut m = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        m.update(label);
        m.update(nc);
        m.update(ns);
        m
    }

    fn derive(&self, label: &[u8], nc: &[u8], ns: &[u8]) -> HmacSha256 {
        let k = self.mac(label, nc, ns).finalize().into_bytes();
        HmacSha256::new_from_slice(&k).expect("HMAC takes any key length")
    }
}

fn nonce() -> io::Result<[u8; NONCE]> {
    let mut n = [0u8; NONCE];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut n)?;
    Ok(n)
}

/// The sending half of an authenticated connection.
pub struct Sender {
    stream: TcpStream,
    /// The frames' HMAC key (`None` under TLS, which protects the frames itself).
    mac: Option<HmacSha256>,
    counter: u64,
    /// Bytes for the socket: sealed frames, or TLS records under TLS.
    buf: Vec<u8>,
    /// Under TLS: the connection, shared with the receiving half, and the frame being
    /// built (encrypted into `buf` once sealed).
    tls: Option<Shared>,
    plain: Vec<u8>,
    /// Bytes at the front of `buf` already written (by a partial non-blocking send).
    sent: usize,
}

/// The receiving half of an authenticated connection.
pub struct Receiver {
    stream: BufReader<Source>,
    mac: Option<HmacSha256>,
    counter: u64,
    /// The frame being received: header, then body and tag. A timeout can leave it
    /// partly filled; the next `recv` goes on from there.
    head: [u8; 5],
    head_got: usize,
    buf: Vec<u8>,
    body_got: usize,
}

/// How long a whole handshake may take (in total, however the peer spreads its bytes)
/// before the peer is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// A socket whose every read and write must end by `deadline`: each call may block only for
/// what is left of it, and fails with `TimedOut` once it has passed.
struct Deadlined<'a> {
    stream: &'a TcpStream,
    deadline: Instant,
}

impl Deadlined<'_> {
    fn left(&self) -> io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        Ok(left)
    }
}

impl Read for Deadlined<'_> {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        self.stream.set_read_timeout(Some(self.left()?))?;
        (&mut &*self.stream).read(b)
    }
}

impl Write for Deadlined<'_> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.stream.set_write_timeout(Some(self.left()?))?;
        (&mut &*self.stream).write(b)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A handshake error: a read or write that ran out of time is the deadline passing.
fn handshake_error(e: io::Error) -> WireError {
    if matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    ) {
        return WireError::HandshakeTimeout;
    }
    if let Some(t) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        return WireError::Tls(t.to_string());
    }
    e.into()
}

/// An error reading a stream: under TLS, a refusal or a broken record is a TLS error.
fn stream_error(e: io::Error) -> WireError {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(t) => WireError::Tls(t.to_string()),
        None => e.into(),
    }
}

fn end_handshake(stream: &TcpStream) -> io::Result<()> {
    stream.set_read_timeout(None)?;
    stream.set_write_timeout(None)
}

/// How a link authenticates its peer and protects its frames (see the module note).
#[derive(Clone)]
pub enum Auth {
    /// Authenticated with a pre-shared key, not encrypted.
    Psk(Key),
    /// TLS 1.3 with certificates on both sides.
    Tls(Arc<Tls>),
}

impl Auth {
    /// Connects to a replica server as a client; `addr` is its `HOST:PORT` (the host names
    /// the certificate under TLS, unless `tls_name` does).
    pub fn connect(
        &self,
        stream: TcpStream,
        addr: &str,
        tls_name: Option<&str>,
    ) -> Result<(Sender, Receiver), WireError> {
        match self {
            Auth::Psk(k) => client(stream, k),
            Auth::Tls(t) => t.client(stream, tls_name.unwrap_or(host_of(addr))),
        }
    }

    /// Authenticates a client as a replica server.
    pub fn accept(&self, stream: TcpStream) -> Result<(Sender, Receiver), WireError> {
        match self {
            Auth::Psk(k) => server(stream, k),
            Auth::Tls(t) => t.server(stream),
        }
    }

    /// A short name of the mode, for logs.
    pub fn mode(&self) -> &'static str {
        match self {
            Auth::Psk(_) => "pre-shared key (not encrypted)",
            Auth::Tls(_) => "TLS 1.3",
        }
    }
}

/// The host part of `HOST:PORT` (`[v6]:PORT` gives `v6`).
pub fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// This host's TLS identity (certificate chain and key) and the CA it trusts for peers,
/// as a client (primary, tools) and as a server (replica).
pub struct Tls {
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
}

/// A TLS connection shared by the two halves: the lock is held only to encrypt or decrypt,
/// never across a socket call.
type Shared = Arc<Mutex<rustls::Connection>>;

fn lock(c: &Shared) -> MutexGuard<'_, rustls::Connection> {
    c.lock().unwrap_or_else(|p| p.into_inner())
}

impl Tls {
    /// Loads PEM files: `cert` (this host's certificate, then any intermediates), `key`
    /// (its private key) and `ca` (the certificates that sign peers').
    pub fn from_files(cert: &Path, key: &Path, ca: &Path) -> Result<Tls, String> {
        let read =
            |p: &Path| std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
        Tls::from_pem(&read(cert)?, &read(key)?, &read(ca)?).map_err(|e| {
            format!(
                "TLS files {}, {}, {}: {e}",
                cert.display(),
                key.display(),
                ca.display()
            )
        })
    }

    pub fn from_pem(cert: &[u8], key: &[u8], ca: &[u8]) -> Result<Tls, String> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let certs = |pem: &[u8], what: &str| {
            let v: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<_, _>>()
                .map_err(|e| format!("{what}: {e}"))?;
            if v.is_empty() {
                return Err(format!("{what}: no certificate found"));
            }
            Ok(v)
        };
        let chain = certs(cert, "the certificate")?;
        let mut roots = rustls::RootCertStore::empty();
        for c in certs(ca, "the CA")? {
            roots.add(c).map_err(|e| format!("the CA: {e}"))?;
        }
        let roots = Arc::new(roots);
        let key =
            PrivateKeyDer::from_pem_slice(key).map_err(|e| format!("the private key: {e}"))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
        let err = |e: rustls::Error| e.to_string();
        let mut client = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(tls13)
            .map_err(err)?
            .with_root_certificates(Arc::clone(&roots))
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .map_err(err)?;
        client.resumption = rustls::client::Resumption::disabled();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots,
            Arc::clone(&provider),
        )
        .build()
        .map_err(|e| e.to_string())?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(tls13)
            .map_err(err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(err)?;
        server.send_tls13_tickets = 0;
        Ok(Tls {
            client: Arc::new(client),
            server: Arc::new(server),
        })
    }

    fn client(&self, stream: TcpStream, name: &str) -> Result<(Sender, Receiver), WireError> {
        let name = rustls_pki_types::ServerName::try_from(name.to_string())
            .map_err(|_| WireError::Tls(format!("`{name}` is not a valid TLS name")))?;
        let c = rustls::ClientConnection::new(Arc::clone(&self.client), name)
            .map_err(|e| WireError::Tls(e.to_string()))?;
        tls_halves(stream, c.into())
    }

    fn server(&self, stream: TcpStream) -> Result<(Sender, Receiver), WireError> {
        let c = rustls::ServerConnection::new(Arc::clone(&self.server))
            .map_err(|e| WireError::Tls(e.to_string()))?;
        tls_halves(stream, c.into())
    }
}

/// Completes a TLS handshake within [`HANDSHAKE_TIMEOUT`] and splits the connection.
fn tls_halves(
    stream: TcpStream,
    mut conn: rustls::Connection,
) -> Result<(Sender, Receiver), WireError> {
    stream.set_nodelay(true)?;
    let mut io = Deadlined {
        stream: &stream,
        deadline: Instant::now() + HANDSHAKE_TIMEOUT,
    };
    while conn.is_handshaking() {
        conn.complete_io(&mut io).map_err(handshake_error)?;
    }
    while conn.wants_write() {
        conn.write_tls(&mut io).map_err(handshake_error)?;
    }
    end_handshake(&stream)?;
    // A frame is encrypted whole: its records are queued however large it is.
    conn.set_buffer_limit(None);
    let shared: Shared = Arc::new(Mutex::new(conn));
    let (mut tx, mut rx) = halves(stream, None, None)?;
    tx.tls = Some(Arc::clone(&shared));
    let sock = rx.stream.get_ref().socket().try_clone()?;
    rx.stream = BufReader::with_capacity(
        256 << 10,
        Source::Tls(TlsReader {
            sock,
            conn: shared,
            raw: vec![0; 64 << 10],
            lo: 0,
            hi: 0,
            plain: 0,
        }),
    );
    Ok((tx, rx))
}

/// What a receiver reads: the socket, or the plaintext of a TLS connection.
enum Source {
    Tcp(TcpStream),
    Tls(TlsReader),
}

impl Source {
    fn socket(&self) -> &TcpStream {
        match self {
            Source::Tcp(s) => s,
            Source::Tls(t) => &t.sock,
        }
    }

    /// Bytes received and not yet returned by `read`, below this layer.
    fn has_buffered(&self) -> bool {
        match self {
            Source::Tcp(_) => false,
            Source::Tls(t) => t.plain > 0 || t.lo < t.hi,
        }
    }
}

impl Read for Source {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        match self {
            Source::Tcp(s) => s.read(out),
            Source::Tls(t) => t.read(out),
        }
    }
}

/// The receiving side of a TLS connection: reads records from the socket (blocking, with
/// the socket's timeout, and without the lock) and decrypts them under the lock.
struct TlsReader {
    sock: TcpStream,
    conn: Shared,
    /// Records read from the socket, `raw[lo..hi]` not yet given to rustls (it takes them
    /// as its plaintext buffer empties).
    raw: Vec<u8>,
    lo: usize,
    hi: usize,
    /// Plaintext decrypted and not yet read.
    plain: usize,
}

impl Read for TlsReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            {
                let mut c = lock(&self.conn);
                match c.reader().read(out) {
                    Ok(n) => {
                        self.plain = self.plain.saturating_sub(n);
                        return Ok(n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                if self.lo < self.hi {
                    let mut rest = &self.raw[self.lo..self.hi];
                    self.lo += c.read_tls(&mut rest)?;
                    let state = c
                        .process_new_packets()
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    self.plain = state.plaintext_bytes_to_read();
                    continue;
                }
            }
            let n = self.sock.read(&mut self.raw)?;
            if n == 0 {
                return Ok(0);
            }
            (self.lo, self.hi) = (0, n);
        }
    }
}

/// Authenticates to a replica server as a client with a pre-shared key.
pub fn client(stream: TcpStream, key: &Key) -> Result<(Sender, Receiver), WireError> {
    stream.set_nodelay(true)?;
    let mut io = Deadlined {
        stream: &stream,
        deadline: Instant::now() + HANDSHAKE_TIMEOUT,
    };
    let nc = nonce()?;
    let mut hello = MAGIC.to_vec();
    hello.extend_from_slice(&nc);
    io.write_all(&hello).map_err(handshake_error)?;
    let mut reply = [0u8; NONCE + TAG];
    io.read_exact(&mut reply).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            // A version 1 replica closes the connection on our magic without a word.
            WireError::Version(
                "the replica closed the connection during the handshake: it may run an \
                 older Ferrodisk (replication protocol version 1; this one speaks version 2)"
                    .into(),
            )
        } else {
            handshake_error(e)
        }
    })?;
    let (ns, tag) = reply.split_at(NONCE);
    key.mac(b"fdr2 server", &nc, ns)
        .verify_slice(tag)
        .map_err(|_| WireError::Unauthenticated)?;
    let mine = key.mac(b"fdr2 client", &nc, ns).finalize().into_bytes();
    io.write_all(&mine).map_err(handshake_error)?;
    end_handshake(&stream)?;
    halves(
        stream,
        Some(key.derive(b"fdr2 c2s", &nc, ns)),
        Some(key.derive(b"fdr2 s2c", &nc, ns)),
    )
}

/// Authenticates a client as a replica server with a pre-shared key.
pub fn server(stream: TcpStream, key: &Key) -> Result<(Sender, Receiver), WireError> {
    stream.set_nodelay(true)?;
    let mut io = Deadlined {
        stream: &stream,
        deadline: Instant::now() + HANDSHAKE_TIMEOUT,
    };
    let mut hello = [0u8; 4 + NONCE];
    io.read_exact(&mut hello).map_err(handshake_error)?;
    if &hello[..4] == MAGIC_V1 {
        return Err(WireError::Version(
            "the peer speaks replication protocol version 1 (FDR1) and this replica speaks \
             version 2 (FDR2): upgrade the primary's Ferrodisk"
                .into(),
        ));
    }
    if &hello[..4] != MAGIC {
        return Err(WireError::Unauthenticated);
    }
    let nc = &hello[4..];
    let ns = nonce()?;
    let mut reply = ns.to_vec();
    reply.extend_from_slice(&key.mac(b"fdr2 server", nc, &ns).finalize().into_bytes());
    io.write_all(&reply).map_err(handshake_error)?;
    let mut tag = [0u8; TAG];
    io.read_exact(&mut tag).map_err(handshake_error)?;
    key.mac(b"fdr2 client", nc, &ns)
        .verify_slice(&tag)
        .map_err(|_| WireError::Unauthenticated)?;
    end_handshake(&stream)?;
    halves(
        stream,
        Some(key.derive(b"fdr2 s2c", nc, &ns)),
        Some(key.derive(b"fdr2 c2s", nc, &ns)),
    )
}

fn halves(
    stream: TcpStream,
    tx: Option<HmacSha256>,
    rx: Option<HmacSha256>,
) -> Result<(Sender, Receiver), WireError> {
    let r = stream.try_clone()?;
    Ok((
        Sender {
            stream,
            mac: tx,
            counter: 0,
            buf: Vec::with_capacity(64 << 10),
            tls: None,
            plain: Vec::new(),
            sent: 0,
        },
        Receiver {
            stream: BufReader::with_capacity(256 << 10, Source::Tcp(r)),
            mac: rx,
            counter: 0,
            head: [0; 5],
            head_got: 0,
            buf: Vec::with_capacity(64 << 10),
            body_got: 0,
        },
    ))
}

/// Queued frames are written once they reach this many bytes, whether or not the caller has
/// flushed: it bounds the memory a burst of large writes holds.
const FLUSH_AT: usize = 512 << 10;
/// The buffer is given back after a flush when it grew beyond this.
const KEEP_CAPACITY: usize = 4 << 20;

impl Sender {
    /// Sends one message, after the frames queued before it.
    pub fn send(&mut self, msg: &Msg) -> io::Result<()> {
        self.queue(msg)?;
        self.flush()
    }

    /// Seals `msg` and queues it; it is written by the next [`flush`](Self::flush) (or
    /// sooner, once the queue is large).
    pub fn queue(&mut self, msg: &Msg) -> io::Result<()> {
        let start = self.begin_frame();
        msg.encode(self.frame_buf());
        self.seal(start, msg.kind());
        self.flush_if_large()
    }

    /// Queues a write straight from `data` (no intermediate message value).
    pub fn queue_write(
        &mut self,
        seq: u64,
        epoch: u64,
        offset: u64,
        crc: u32,
        data: &[u8],
    ) -> io::Result<()> {
        let start = self.begin_frame();
        let b = self.frame_buf();
        encode_write_header(b, seq, epoch, offset, crc);
        b.extend_from_slice(data);
        self.seal(start, 2);
        self.flush_if_large()
    }

    /// Sends a write straight from `data`, after the frames queued before it.
    pub fn send_write(
        &mut self,
        seq: u64,
        epoch: u64,
        offset: u64,
        crc: u32,
        data: &[u8],
    ) -> io::Result<()> {
        self.queue_write(seq, epoch, offset, crc, data)?;
        self.flush()
    }

    /// Writes every queued frame, in the order they were sealed: one system call for a
    /// whole batch when the socket takes it. After an error the connection is unusable
    /// (a frame may be cut), and the caller closes it.
    pub fn flush(&mut self) -> io::Result<()> {
        if self.buf.len() == self.sent {
            return self.reset();
        }
        let r = self.stream.write_all(&self.buf[self.sent..]);
        self.sent = self.buf.len();
        self.reset().and(r)
    }

    /// Writes what the socket takes now of the queued frames, without blocking. Returns
    /// whether everything queued is written; the rest waits for the next call (when the
    /// socket is writable again).
    pub fn try_flush(&mut self) -> io::Result<bool> {
        while self.sent < self.buf.len() {
            let n = crate::sys::send_nonblocking(self.stream.as_raw_fd(), &self.buf[self.sent..])?;
            if n == 0 {
                return Ok(false);
            }
            self.sent += n;
        }
        self.reset()?;
        Ok(true)
    }

    /// Empties a fully written buffer (and gives back a large one).
    fn reset(&mut self) -> io::Result<()> {
        if self.sent == self.buf.len() {
            self.buf.clear();
            self.sent = 0;
            if self.buf.capacity() > KEEP_CAPACITY {
                self.buf.shrink_to(KEEP_CAPACITY);
            }
        }
        Ok(())
    }

    /// Seals `msg` and queues it without writing anything (see [`try_flush`](Self::try_flush)).
    pub fn push(&mut self, msg: &Msg) {
        let start = self.begin_frame();
        msg.encode(self.frame_buf());
        self.seal(start, msg.kind());
    }

    /// Queues a write straight from `data` without writing anything.
    pub fn push_write(&mut self, seq: u64, epoch: u64, offset: u64, crc: u32, data: &[u8]) {
        let start = self.begin_frame();
        let b = self.frame_buf();
        encode_write_header(b, seq, epoch, offset, crc);
        b.extend_from_slice(data);
        self.seal(start, 2);
    }

    /// Bytes queued and not yet written.
    pub fn unsent(&self) -> usize {
        self.buf.len() - self.sent
    }

    /// The socket, for `poll`.
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        self.stream.as_raw_fd()
    }

    /// Whether frames are queued and not written yet.
    pub fn has_queued(&self) -> bool {
        self.buf.len() > self.sent
    }

    fn flush_if_large(&mut self) -> io::Result<()> {
        if self.unsent() >= FLUSH_AT {
            self.flush()
        } else {
            Ok(())
        }
    }

    /// Where frames are built: `buf` itself, or under TLS the plaintext of the next one.
    fn frame_buf(&mut self) -> &mut Vec<u8> {
        if self.tls.is_some() {
            &mut self.plain
        } else {
            &mut self.buf
        }
    }

    /// Appends the 5 placeholder bytes of a frame header; returns where the frame starts.
    fn begin_frame(&mut self) -> usize {
        let b = self.frame_buf();
        let start = b.len();
        b.extend_from_slice(&[0; 5]);
        start
    }

    /// Fills in the header of the frame at `start` (5 placeholder bytes followed by the
    /// body, up to the end of the frame buffer) and appends its tag, or under TLS encrypts
    /// it into `buf`.
    fn seal(&mut self, start: usize, kind: u8) {
        let counter = self.counter;
        self.counter += 1;
        let mac = self.mac.clone();
        let b = self.frame_buf();
        let frame = &mut b[start..];
        let len = (frame.len() - 5) as u32;
        frame[..4].copy_from_slice(&len.to_le_bytes());
        frame[4] = kind;
        if let Some(mut m) = mac {
            m.update(&counter.to_le_bytes());
            m.update(&b[start..]);
            let tag = m.finalize().into_bytes();
            b.extend_from_slice(&tag);
        }
        if let Some(tls) = &self.tls {
            let mut c = lock(tls);
            // With no buffer limit the writer takes every byte; writing records into a
            // Vec cannot fail.
            let _ = c.writer().write_all(&self.plain);
            while c.wants_write() {
                if c.write_tls(&mut self.buf).is_err() {
                    break;
                }
            }
            self.plain.clear();
            if self.plain.capacity() > KEEP_CAPACITY {
                self.plain.shrink_to(KEEP_CAPACITY);
            }
        }
    }

    /// Sets how long a send may block (a peer that stops reading counts as failed).
    pub fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.stream.set_write_timeout(t)
    }

    /// Closes both directions (the receiver's blocked read returns).
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    /// The socket (under TLS, bytes written to it bypass the encryption).
    pub fn try_clone_stream(&self) -> io::Result<TcpStream> {
        self.stream.try_clone()
    }
}

impl Receiver {
    /// Receives one message, checking its tag.
    pub fn recv(&mut self) -> Result<Msg, WireError> {
        while self.head_got < 5 {
            match self.stream.read(&mut self.head[self.head_got..]) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
                Ok(n) => self.head_got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(stream_error(e)),
            }
            if self.head_got == 5 {
                let h = self.head;
                let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
                if len > MAX_BODY {
                    return Err(WireError::TooLarge(len));
                }
                self.buf.clear();
                self.buf.resize(len + self.tag_len(), 0);
                self.body_got = 0;
            }
        }
        while self.body_got < self.buf.len() {
            match self.stream.read(&mut self.buf[self.body_got..]) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
                Ok(n) => self.body_got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(stream_error(e)),
            }
        }
        self.head_got = 0;
        let head = self.head;
        let len = self.buf.len() - self.tag_len();
        if let Some(mac) = &self.mac {
            let mut m = mac.clone();
            m.update(&self.counter.to_le_bytes());
            m.update(&head);
            m.update(&self.buf[..len]);
            m.verify_slice(&self.buf[len..])
                .map_err(|_| WireError::BadTag)?;
        }
        self.counter += 1;
        Msg::decode(head[4], &self.buf[..len])
    }

    fn tag_len(&self) -> usize {
        if self.mac.is_some() {
            TAG
        } else {
            0
        }
    }

    /// The socket, for `poll`.
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        self.stream.get_ref().socket().as_raw_fd()
    }

    /// Whether more of a message may already be buffered (a whole frame header in our
    /// buffer, or under TLS any bytes rustls holds): the caller reads before it polls.
    pub fn has_buffered(&self) -> bool {
        self.stream.buffer().len() >= 5 || self.stream.get_ref().has_buffered()
    }

    /// Sets how long `recv` may block before it fails with `WouldBlock`/`TimedOut`.
    pub fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.stream.get_ref().socket().set_read_timeout(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    type Halves = Result<(Sender, Receiver), WireError>;

    fn pair(ck: &Key, sk: &Key) -> (Halves, Halves) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let sk = sk.clone();
        let t = std::thread::spawn(move || server(l.accept().unwrap().0, &sk));
        let c = client(TcpStream::connect(addr).unwrap(), ck);
        (c, t.join().unwrap())
    }

    fn key(b: u8) -> Key {
        Key::new(vec![b; 32]).unwrap()
    }

    #[test]
    fn messages_round_trip() {
        let (c, s) = pair(&key(1), &key(1));
        let ((mut tx, _), (_, mut rx)) = (c.unwrap(), s.unwrap());
        let msgs = vec![
            Msg::Open {
                seq: 1,
                epoch: 7,
                size: 1 << 30,
                volume: "vol-1".into(),
                uuid: "0123456789abcdef0123456789abcdef".into(),
            },
            Msg::Open {
                seq: 1,
                epoch: 0,
                size: 0,
                volume: "vol-1".into(),
                uuid: String::new(),
            },
            Msg::Write {
                seq: 2,
                epoch: 7,
                offset: 4096,
                crc: 99,
                data: vec![5; 4096],
            },
            Msg::Zero {
                seq: 3,
                epoch: 7,
                offset: 0,
                len: 1 << 20,
                unmap: true,
            },
            Msg::Fence { seq: 4, epoch: 9 },
            Msg::Sums {
                seq: 5,
                offset: 0,
                len: 1 << 20,
                chunk: 65536,
            },
            Msg::Ack { seq: 6, value: 3 },
            Msg::Nack {
                seq: 7,
                code: Code::Stale,
                message: "old".into(),
            },
            Msg::Nack {
                seq: 7,
                code: Code::Io,
                message: String::new(),
            },
            Msg::SumsReply {
                seq: 8,
                crcs: vec![1, 2, 3],
            },
            Msg::SumsReply {
                seq: 8,
                crcs: vec![],
            },
            Msg::Opened {
                seq: 9,
                epoch: 7,
                size: 1 << 30,
                uuid: "0123456789abcdef0123456789abcdef".into(),
                gen: 42,
            },
            Msg::Opened {
                seq: 9,
                epoch: 0,
                size: 0,
                uuid: String::new(),
                gen: 0,
            },
            Msg::Adopt {
                seq: 10,
                epoch: 7,
                gen: u64::MAX,
            },
            Msg::Read {
                seq: 11,
                offset: 1 << 20,
                len: 4096,
            },
            Msg::Data {
                seq: 12,
                data: vec![7; 4096],
            },
            Msg::Data {
                seq: 12,
                data: vec![],
            },
            Msg::Drop { seq: 13, epoch: 8 },
        ];
        for m in &msgs {
            tx.send(m).unwrap();
        }
        tx.send_write(9, 7, 512, 1, &[1, 2, 3]).unwrap();
        for m in &msgs {
            assert_eq!(&rx.recv().unwrap(), m);
        }
        assert_eq!(
            rx.recv().unwrap(),
            Msg::Write {
                seq: 9,
                epoch: 7,
                offset: 512,
                crc: 1,
                data: vec![1, 2, 3]
            }
        );
    }

    #[test]
    fn every_kind_decodes_what_it_encodes() {
        // Without a connection: each kind's body, and the same body with a byte too many
        // (refused, except where the last field takes the rest of the body).
        let msgs = [
            Msg::Open {
                seq: 1,
                epoch: 2,
                size: 3,
                volume: "é-v".into(),
                uuid: "u".into(),
            },
            Msg::Write {
                seq: 1,
                epoch: 2,
                offset: 3,
                crc: 4,
                data: vec![1, 2],
            },
            Msg::Zero {
                seq: 1,
                epoch: 2,
                offset: 3,
                len: 4,
                unmap: false,
            },
            Msg::Fence { seq: 1, epoch: 2 },
            Msg::Sums {
                seq: 1,
                offset: 2,
                len: 3,
                chunk: 4,
            },
            Msg::Ack { seq: 1, value: 2 },
            Msg::Nack {
                seq: 1,
                code: Code::Range,
                message: "no".into(),
            },
            Msg::SumsReply {
                seq: 1,
                crcs: vec![2],
            },
            Msg::Opened {
                seq: 1,
                epoch: 2,
                size: 3,
                uuid: "u".into(),
                gen: 4,
            },
            Msg::Adopt {
                seq: 1,
                epoch: 2,
                gen: 3,
            },
            Msg::Read {
                seq: 1,
                offset: 2,
                len: 3,
            },
            Msg::Data {
                seq: 1,
                data: vec![2, 3],
            },
            Msg::Drop { seq: 1, epoch: 2 },
        ];
        for m in &msgs {
            let mut body = Vec::new();
            m.encode(&mut body);
            assert_eq!(&Msg::decode(m.kind(), &body).unwrap(), m);
            body.push(0);
            let longer = Msg::decode(m.kind(), &body);
            match m {
                Msg::Write { .. } | Msg::Data { .. } => assert!(longer.is_ok()),
                // One byte more is not a whole checksum.
                Msg::SumsReply { .. } => assert!(longer.is_err()),
                _ => assert!(
                    matches!(longer, Err(WireError::Malformed("trailing bytes"))),
                    "{m:?}: {longer:?}"
                ),
            }
            body.truncate(body.len() - 2);
            if !matches!(
                m,
                Msg::Write { .. } | Msg::Data { .. } | Msg::SumsReply { .. }
            ) {
                assert!(Msg::decode(m.kind(), &body).is_err(), "{m:?} cut short");
            }
        }
        assert!(Msg::decode(14, &[0; 16]).is_err(), "unknown kind");
    }

    #[test]
    fn a_long_message_is_cut_at_a_character_boundary() {
        let long = "é".repeat(40_000); // 80000 bytes
        let mut body = Vec::new();
        Msg::Nack {
            seq: 1,
            code: Code::Io,
            message: long.clone(),
        }
        .encode(&mut body);
        match Msg::decode(7, &body).unwrap() {
            Msg::Nack { message, .. } => {
                assert_eq!(message.len(), 65534);
                assert!(long.starts_with(&message));
            }
            m => panic!("{m:?}"),
        }
    }

    #[test]
    fn a_version_1_peer_is_refused_clearly() {
        // A version 1 client, as the server sees it.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || server(l.accept().unwrap().0, &key(1)).map(|_| ()));
        let mut s = TcpStream::connect(addr).unwrap();
        let mut hello = b"FDR1".to_vec();
        hello.extend_from_slice(&[0; NONCE]);
        s.write_all(&hello).unwrap();
        let e = t.join().unwrap().unwrap_err();
        assert!(matches!(e, WireError::Version(_)), "{e:?}");
        assert!(e.to_string().contains("version 1"), "{e}");
        // A version 1 server, as the client sees it: it reads the hello and hangs up.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut hello = [0u8; 4 + NONCE];
            s.read_exact(&mut hello).unwrap();
            hello
        });
        let e = client(TcpStream::connect(addr).unwrap(), &key(1))
            .map(|_| ())
            .unwrap_err();
        assert_eq!(&t.join().unwrap()[..4], b"FDR2");
        assert!(matches!(e, WireError::Version(_)), "{e:?}");
    }

    #[test]
    fn a_wrong_key_is_refused_both_ways() {
        let (c, s) = pair(&key(1), &key(2));
        assert!(
            matches!(c, Err(WireError::Unauthenticated)),
            "client must refuse the server"
        );
        assert!(s.is_err(), "server must refuse the client");
    }

    #[test]
    fn a_peer_that_speaks_something_else_is_refused() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || server(l.accept().unwrap().0, &key(1)).map(|_| ()));
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n...............")
            .unwrap();
        assert!(matches!(t.join().unwrap(), Err(WireError::Unauthenticated)));
    }

    #[test]
    fn altered_or_replayed_frames_fail() {
        // Tamper with one byte of a frame on the way.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (_tx, mut rx) = server(l.accept().unwrap().0, &key(1)).unwrap();
            (rx.recv(), rx.recv())
        });
        let (mut tx, _rx) = client(TcpStream::connect(addr).unwrap(), &key(1)).unwrap();
        tx.send(&Msg::Fence { seq: 1, epoch: 1 }).unwrap();
        let mut raw = tx.try_clone_stream().unwrap();
        // A copy of a valid frame sent again (a replay) has the wrong counter.
        let mut m = tx.mac.clone().unwrap();
        m.update(&0u64.to_le_bytes());
        let mut frame = vec![16, 0, 0, 0, 4];
        frame.extend_from_slice(&1u64.to_le_bytes());
        frame.extend_from_slice(&1u64.to_le_bytes());
        m.update(&frame);
        frame.extend_from_slice(&m.finalize().into_bytes());
        raw.write_all(&frame).unwrap();
        let (first, second) = t.join().unwrap();
        assert_eq!(first.unwrap(), Msg::Fence { seq: 1, epoch: 1 });
        assert!(matches!(second, Err(WireError::BadTag)), "{second:?}");
    }

    #[test]
    fn queued_frames_go_out_in_order_on_flush_or_when_large() {
        let (c, s) = pair(&key(1), &key(1));
        let ((mut tx, _), (_, mut rx)) = (c.unwrap(), s.unwrap());
        rx.set_timeout(Some(Duration::from_millis(200))).unwrap();
        tx.queue_write(1, 3, 0, 7, &[1; 512]).unwrap();
        tx.queue(&Msg::Fence { seq: 2, epoch: 3 }).unwrap();
        assert!(tx.has_queued());
        let e = rx.recv().expect_err("nothing is written before the flush");
        assert!(e.is_timeout(), "{e:?}");
        // A plain send goes out after what was queued before it, under the next counters.
        tx.send(&Msg::Ack { seq: 3, value: 0 }).unwrap();
        assert!(!tx.has_queued());
        assert!(matches!(rx.recv().unwrap(), Msg::Write { seq: 1, .. }));
        assert_eq!(rx.recv().unwrap(), Msg::Fence { seq: 2, epoch: 3 });
        assert_eq!(rx.recv().unwrap(), Msg::Ack { seq: 3, value: 0 });
        // A queue that reaches FLUSH_AT bytes is written without a flush.
        let big = vec![9u8; 64 << 10];
        let n = (FLUSH_AT / big.len() + 1) as u64;
        rx.set_timeout(Some(Duration::from_secs(10))).unwrap();
        let reader = std::thread::spawn(move || {
            (0..n - 1)
                .map(|_| match rx.recv().unwrap() {
                    Msg::Write { seq, .. } => seq,
                    m => panic!("{m:?}"),
                })
                .collect::<Vec<_>>()
        });
        for seq in 0..n {
            tx.queue_write(10 + seq, 3, 0, 0, &big).unwrap();
        }
        assert!(tx.buf.len() < FLUSH_AT, "the queue was written out");
        assert_eq!(reader.join().unwrap(), (10..10 + n - 1).collect::<Vec<_>>());
        assert!(tx.has_queued(), "the last frame waits for a flush");
    }

    #[test]
    fn short_keys_are_refused() {
        assert!(Key::new(vec![1; 8]).is_err());
    }

    /// A CA and a certificate for 127.0.0.1 signed by it, as a [`Tls`].
    fn tls() -> Arc<Tls> {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = p.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        let t = Tls::from_pem(
            cert.pem().as_bytes(),
            key.serialize_pem().as_bytes(),
            ca.pem().as_bytes(),
        );
        Arc::new(t.unwrap())
    }

    fn tls_pair(client: &Auth, server: &Auth, name: Option<&str>) -> (Halves, Halves) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = server.clone();
        let t = std::thread::spawn(move || server.accept(l.accept().unwrap().0));
        let c = client.connect(TcpStream::connect(addr).unwrap(), &addr.to_string(), name);
        (c, t.join().unwrap())
    }

    #[test]
    fn messages_round_trip_over_tls_in_both_directions() {
        let auth = Auth::Tls(tls());
        let (c, s) = tls_pair(&auth, &auth, None);
        let ((mut ctx, mut crx), (mut stx, mut srx)) = (c.unwrap(), s.unwrap());
        let data: Vec<u8> = (0..MAX_READ as usize).map(|i| (i % 253) as u8).collect();
        let t = std::thread::spawn(move || {
            let got: Vec<Msg> = (0..3).map(|_| srx.recv().unwrap()).collect();
            stx.send(&Msg::Ack { seq: 9, value: 1 }).unwrap();
            got
        });
        ctx.send(&Msg::Fence { seq: 1, epoch: 2 }).unwrap();
        ctx.send_write(2, 2, 4096, 7, &data).unwrap();
        ctx.send(&Msg::Sums {
            seq: 3,
            offset: 0,
            len: 1,
            chunk: 1,
        })
        .unwrap();
        let got = t.join().unwrap();
        assert_eq!(got[0], Msg::Fence { seq: 1, epoch: 2 });
        assert!(matches!(&got[1], Msg::Write { data: d, offset: 4096, .. } if *d == data));
        assert_eq!(crx.recv().unwrap(), Msg::Ack { seq: 9, value: 1 });
    }

    #[test]
    fn tls_checks_the_name_and_the_ca() {
        let auth = Auth::Tls(tls());
        let (c, _) = tls_pair(&auth, &auth, Some("replica.example"));
        assert!(matches!(c, Err(WireError::Tls(_))), "{:?}", c.err());
        let other = Auth::Tls(tls());
        let (c, _) = tls_pair(&auth, &other, None);
        assert!(matches!(c, Err(WireError::Tls(_))), "{:?}", c.err());
    }
}
