//! Fuzzes the replication wire protocol (`repl::wire`) from the peer's side, in both
//! directions, through its public entry points over a loopback TCP connection.
//!
//! The first input byte picks the mode; the rest is what the fuzzer's end sends:
//! - 0: raw handshake bytes to a replica (`wire::server`), which must refuse them cleanly;
//! - 1: raw handshake bytes to a primary (`wire::client`), likewise;
//! - 2: a correct handshake as the client, then frames to the replica's `Receiver`;
//! - 3: a correct handshake as the server, then frames to the primary's `Receiver`.
//!
//! In modes 2 and 3 the fuzzer's end knows the key, so it seals its frames with valid tags
//! and the bytes reach the frame and message decoders. Each frame is `len: u16 | mode: u8 |
//! kind: u8 | body[len]`: `mode` bit 0 corrupts the tag, bit 1 sends `len` as the frame's
//! raw length field in place of the body's real length (a lie: too long, too short, or
//! huge). Every message the library decodes is sent back through its `Sender`; the echoed
//! frame must carry a valid tag and, for canonical bodies, the very bytes that were sent.
#![no_main]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::OnceLock;

use ferrodisk::repl::wire::{self, Key, Msg, WireError};
use hmac::{Hmac, Mac};
use libfuzzer_sys::fuzz_target;
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

const PSK: &[u8; 32] = b"ferrodisk-fuzz-replication-key!!";

fn listener() -> &'static TcpListener {
    static L: OnceLock<TcpListener> = OnceLock::new();
    L.get_or_init(|| TcpListener::bind("127.0.0.1:0").expect("loopback listener"))
}

/// Closes with a reset: no TIME_WAIT, so millions of connections don't run out of ports.
fn abort_on_close(s: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `l` is a valid `linger` for the duration of the call and the fd is open.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
}

/// A connected pair: (the library's end, the fuzzer's end).
fn pair() -> (TcpStream, TcpStream) {
    let l = listener();
    let ours = TcpStream::connect(l.local_addr().unwrap()).expect("connect");
    let (theirs, _) = l.accept().expect("accept");
    abort_on_close(&ours);
    abort_on_close(&theirs);
    (theirs, ours)
}

fn mac(key: &[u8], parts: &[&[u8]]) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(key).unwrap();
    for p in parts {
        m.update(p);
    }
    m
}

fn derive(label: &[u8], nc: &[u8], ns: &[u8]) -> HmacSha256 {
    let k = mac(PSK, &[label, nc, ns]).finalize().into_bytes();
    HmacSha256::new_from_slice(&k).unwrap()
}

/// The fuzzer's end of an authenticated connection.
struct Peer {
    stream: TcpStream,
    tx: HmacSha256,
    rx: HmacSha256,
    tx_counter: u64,
    rx_counter: u64,
}

impl Peer {
    fn seal(&mut self, head: &[u8; 5], body: &[u8], corrupt: bool) -> Vec<u8> {
        let mut m = self.tx.clone();
        m.update(&self.tx_counter.to_le_bytes());
        m.update(head);
        m.update(body);
        self.tx_counter += 1;
        let mut tag = m.finalize().into_bytes();
        if corrupt {
            tag[0] ^= 1;
        }
        let mut out = head.to_vec();
        out.extend_from_slice(body);
        out.extend_from_slice(&tag);
        out
    }

    /// Reads one frame the library sent and checks its tag: (kind, body).
    fn read_frame(&mut self) -> (u8, Vec<u8>) {
        let mut head = [0u8; 5];
        self.stream.read_exact(&mut head).expect("echo header");
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let mut rest = vec![0u8; len + 32];
        self.stream.read_exact(&mut rest).expect("echo body");
        let mut m = self.rx.clone();
        m.update(&self.rx_counter.to_le_bytes());
        m.update(&head);
        m.update(&rest[..len]);
        m.verify_slice(&rest[len..])
            .expect("the echo's tag verifies");
        self.rx_counter += 1;
        rest.truncate(len);
        (head[4], rest)
    }
}

/// Splits the input into frames: (raw length field or None, corrupt tag, kind, body).
fn frames(mut b: &[u8]) -> Vec<(Option<u32>, bool, u8, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = usize::from(u16::from_le_bytes([b[0], b[1]]));
        let mode = b[2];
        let kind = b[3];
        b = &b[4..];
        let body = &b[..len.min(b.len())];
        b = &b[body.len()..];
        let lie = (mode & 2 != 0).then(|| {
            // Around the real length, or huge (past the limit).
            if mode & 4 != 0 {
                u32::MAX - u32::from(mode >> 3)
            } else {
                (body.len() as u32)
                    .wrapping_add(u32::from(mode >> 3))
                    .wrapping_sub(16)
            }
        });
        out.push((lie, mode & 1 != 0, kind, body));
    }
    out
}

/// The canonical encoding of a body the decoder accepted (the decoder folds a few values).
fn canonical(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut b = body.to_vec();
    match kind {
        // Zero: `unmap` is any non-zero byte.
        3 => {
            if let Some(last) = b.last_mut() {
                *last = u8::from(*last != 0);
            }
        }
        // Nack: an unknown code is Protocol (5).
        7 if b.len() > 8 && !(1..=5).contains(&b[8]) => b[8] = 5,
        _ => {}
    }
    b
}

/// Runs the library's end: receives until an error, echoing every message.
fn serve_library(
    (mut tx, mut rx): (wire::Sender, wire::Receiver),
) -> (Vec<Msg>, WireError, wire::Sender, wire::Receiver) {
    let mut got = Vec::new();
    loop {
        match rx.recv() {
            Ok(m) => {
                tx.send(&m).expect("echo");
                got.push(m);
            }
            Err(e) => return (got, e, tx, rx),
        }
    }
}

fn session(as_client: bool, input: &[u8]) {
    let (theirs, mut ours) = pair();
    let key = Key::new(PSK.to_vec()).unwrap();
    let lib = std::thread::spawn(move || {
        let halves = if as_client {
            wire::server(theirs, &key)
        } else {
            wire::client(theirs, &key)
        }
        .expect("the handshake with a peer that knows the key succeeds");
        serve_library(halves)
    });
    // The fuzzer's end of the handshake.
    let nc = [7u8; 32];
    let (tx, rx) = if as_client {
        ours.write_all(b"FDR2").unwrap();
        ours.write_all(&nc).unwrap();
        let mut reply = [0u8; 64];
        ours.read_exact(&mut reply).unwrap();
        let ns = &reply[..32];
        mac(PSK, &[b"fdr2 server", &nc, ns])
            .verify_slice(&reply[32..])
            .expect("the replica proves it holds the key");
        let mine = mac(PSK, &[b"fdr2 client", &nc, ns]).finalize().into_bytes();
        ours.write_all(&mine).unwrap();
        (derive(b"fdr2 c2s", &nc, ns), derive(b"fdr2 s2c", &nc, ns))
    } else {
        let mut hello = [0u8; 36];
        ours.read_exact(&mut hello).unwrap();
        assert_eq!(&hello[..4], b"FDR2");
        let nc = &hello[4..];
        let ns = [9u8; 32];
        let tag = mac(PSK, &[b"fdr2 server", nc, &ns]).finalize().into_bytes();
        ours.write_all(&ns).unwrap();
        ours.write_all(&tag).unwrap();
        // The primary's proof is checked by the replica; here we only consume it.
        let mut theirs_tag = [0u8; 32];
        ours.read_exact(&mut theirs_tag).unwrap();
        (derive(b"fdr2 s2c", nc, &ns), derive(b"fdr2 c2s", nc, &ns))
    };
    let mut peer = Peer {
        stream: ours,
        tx,
        rx,
        tx_counter: 0,
        rx_counter: 0,
    };
    let mut sent = Vec::new();
    for (lie, corrupt, kind, body) in frames(input) {
        let len = lie.unwrap_or(body.len() as u32);
        let mut head = [0u8; 5];
        head[..4].copy_from_slice(&len.to_le_bytes());
        head[4] = kind;
        let frame = peer.seal(&head, body, corrupt);
        // A frame the library rejects ends the connection: it may stop reading.
        if peer.stream.write_all(&frame).is_err() {
            break;
        }
        sent.push((len as usize == body.len() && !corrupt, kind, body));
    }
    let _ = peer.stream.shutdown(Shutdown::Write);
    let (got, err, _tx, _rx) = lib.join().expect("the library's end does not panic");
    // Every decoded message came from an honest frame, in order, and echoes as it was sent.
    assert!(got.len() <= sent.len());
    for (i, m) in got.iter().enumerate() {
        let (honest, kind, body) = sent[i];
        assert!(honest, "a dishonest frame decoded as {m:?}");
        let (echo_kind, echo_body) = peer.read_frame();
        assert_eq!(echo_kind, kind, "{m:?}");
        assert_eq!(
            echo_body,
            canonical(kind, body),
            "{m:?} re-encodes differently"
        );
    }
    // It stopped on the first bad frame, or at the end of the input.
    if got.len() == sent.len() {
        assert!(
            err.is_disconnect(),
            "unexpected error after the last frame: {err:?}"
        );
    } else {
        assert!(!err.is_timeout(), "{err:?}");
    }
}

/// Raw bytes where a handshake should be: the library must refuse them without panicking.
fn raw_handshake(to_server: bool, input: &[u8]) {
    let (theirs, mut ours) = pair();
    let key = Key::new(PSK.to_vec()).unwrap();
    // Small enough to sit in the socket buffer: no thread needed.
    ours.write_all(input).unwrap();
    ours.shutdown(Shutdown::Write).unwrap();
    let r = if to_server {
        wire::server(theirs, &key)
    } else {
        wire::client(theirs, &key)
    };
    // Nobody but a holder of the key gets through (a forged tag is a 2^-256 chance).
    let e = r.err().expect("a handshake without the key fails");
    assert!(!e.is_timeout(), "{e:?}");
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 4 {
        0 => raw_handshake(true, rest),
        1 => raw_handshake(false, rest),
        2 => session(true, rest),
        _ => session(false, rest),
    }
});
