//! Hostile peers and link security, against real `ferrodisk replica` and `ferrodisk serve`
//! processes: a flood of unauthenticated connections, a peer trickling its handshake, a
//! peer that sends large frames and never reads, and TLS (replication over it, refusals,
//! and that the bytes on the wire are encrypted).

#[path = "common/cluster.rs"]
mod cluster;
mod common;
#[path = "common/etcd.rs"]
mod etcd;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blkio::ReqFlags;
use cluster::{free_port, make_image, wait_in_sync, wait_until, Env, Proc, VOLUME};
use common::Client;
use ferrodisk::repl::wire::{self, Key, Msg, HANDSHAKE_TIMEOUT};

/// A 4 KiB pattern that appears nowhere by chance.
fn pattern() -> Vec<u8> {
    let mut p = Vec::with_capacity(4096);
    let mut x: u32 = 0x9e37_79b9;
    while p.len() < 4096 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        p.extend_from_slice(&x.to_le_bytes());
    }
    p
}

/// Writes `data` at `offset` through the primary on `sock`, flushes, and reads it back.
fn write_and_read_back(sock: &std::path::Path, offset: u64, data: &[u8]) {
    let mut c = Client::connect(sock, 1, false).expect("connect to the primary");
    assert_eq!(c.write(0, offset, data, ReqFlags::empty()), 0);
    assert_eq!(c.flush(0), 0);
    assert_eq!(c.read(0, offset, data.len()).unwrap(), data);
}

fn replica_has(env: &Env, name: &str, offset: u64, data: &[u8]) -> bool {
    let img = std::fs::read(env.replica_image(name)).unwrap_or_default();
    img.get(offset as usize..offset as usize + data.len()) == Some(data)
}

// --- Bounds of the replica server -------------------------------------------------------

/// Keeps `n` connections from 127.0.0.2 open, each trickling a byte every 200 ms and
/// reconnecting when the server closes it, until `stop`.
fn flood(port: u16, n: usize, stop: Arc<AtomicBool>) -> Vec<std::thread::JoinHandle<()>> {
    let per_thread = 50;
    (0..n.div_ceil(per_thread))
        .map(|_| {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let dial = || {
                    let s = socket_from("127.0.0.2", port)?;
                    s.set_nonblocking(true)?;
                    Ok::<_, std::io::Error>(s)
                };
                let mut conns: Vec<Option<TcpStream>> = (0..per_thread).map(|_| None).collect();
                while !stop.load(Ordering::SeqCst) {
                    for c in conns.iter_mut() {
                        let alive = match c {
                            Some(s) => s.write(b"F").is_ok_and(|n| n == 1),
                            None => false,
                        };
                        if !alive {
                            *c = dial().ok();
                        }
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            })
        })
        .collect()
}

/// A TCP connection to 127.0.0.1:`port` from the local address `from` (another loopback
/// address: another host, as far as the server can tell).
fn socket_from(from: &str, port: u16) -> std::io::Result<TcpStream> {
    // std has no bind-before-connect; a listener-free trick: bind a socket with libc.
    use std::os::fd::FromRawFd;
    let local: std::net::Ipv4Addr = from.parse().unwrap();
    // SAFETY: socket() returns a new descriptor (or -1), which we own from here on.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket nobody else owns; the TcpStream closes it.
    let s = unsafe { TcpStream::from_raw_fd(fd) };
    let addr = |ip: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let a = addr(local, 0);
    // SAFETY: `a` is a valid sockaddr_in of `len` bytes, read during the call only.
    if unsafe { libc::bind(fd, &a as *const _ as *const libc::sockaddr, len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let r = addr(std::net::Ipv4Addr::LOCALHOST, port);
    // SAFETY: as above, for the remote address.
    if unsafe { libc::connect(fd, &r as *const _ as *const libc::sockaddr, len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(s)
}

/// (a) A flood of unauthenticated connections from another address, more than the
/// replica's file descriptors allow and reconnecting as fast as they are closed, does not
/// keep a primary from connecting, replicating, and reconnecting after a restart.
#[test]
fn a_flood_of_unauthenticated_connections_does_not_keep_a_primary_out() {
    let env = Env::new(false);
    let (p1, hp) = (free_port(), free_port());
    let _r1 = env.replica_with("r1", p1, &["prlimit", "--nofile=200:200", "--"], &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let flooders = flood(p1, 400, Arc::clone(&stop));
    std::thread::sleep(Duration::from_secs(2));
    let img = env.path("img");
    make_image(&img, None);
    let sock = env.path("s.sock");
    let data = pattern();
    {
        let _primary = env.primary("a", &img, &sock, &[p1], hp, "");
        wait_in_sync(hp, &[p1], Duration::from_secs(30));
        write_and_read_back(&sock, 1 << 20, &data);
        assert!(replica_has(&env, "r1", 1 << 20, &data));
    }
    // A restarted primary reconnects through the flood.
    let _primary = env.primary("a", &img, &sock, &[p1], hp, "");
    wait_in_sync(hp, &[p1], Duration::from_secs(30));
    write_and_read_back(&sock, 2 << 20, &data);
    assert!(replica_has(&env, "r1", 2 << 20, &data));
    stop.store(true, Ordering::SeqCst);
    for f in flooders {
        f.join().unwrap();
    }
}

/// (b) A peer that trickles its handshake one byte a second is disconnected once the
/// handshake's single deadline passes (not kept for as long as it keeps sending).
#[test]
fn a_peer_trickling_its_handshake_is_dropped_at_the_deadline() {
    let env = Env::new(false);
    let p1 = free_port();
    let _r1 = env.replica("r1", p1);
    let mut s = TcpStream::connect(("127.0.0.1", p1)).unwrap();
    let start = Instant::now();
    let mut w = s.try_clone().unwrap();
    std::thread::spawn(move || {
        let hello = [b"FDR2".as_slice(), &[7u8; 32]].concat();
        for b in hello {
            if w.write_all(&[b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    });
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut buf = [0u8; 64];
    let r = s.read(&mut buf);
    let took = start.elapsed();
    assert!(
        matches!(r, Ok(0) | Err(_)),
        "the server answered a handshake it never got: {r:?}"
    );
    assert!(
        took < HANDSHAKE_TIMEOUT + Duration::from_secs(2),
        "dropped after {took:?}; the handshake deadline is {HANDSHAKE_TIMEOUT:?}"
    );
}

fn status_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

/// The documented bound of what one connection may hold (docs/replication.md): its
/// buffer (`--conn-buffer-mib`, 64 MiB by default) plus three frames and its socket
/// buffers (16 MiB).
const CONN_BOUND: u64 = (64 + 16) << 20;

/// (c) A peer that sends many large frames and never reads its acknowledgements makes the
/// replica hold at most the documented bound: the replica stops reading its socket.
#[test]
fn a_peer_that_never_reads_cannot_grow_the_replicas_memory_beyond_the_bound() {
    let env = Env::new(false);
    let p1 = free_port();
    let r1 = env.replica("r1", p1);
    let key = Key::from_file(&env.key).unwrap();
    let s = TcpStream::connect(("127.0.0.1", p1)).unwrap();
    let (mut tx, mut rx) = wire::client(s, &key).unwrap();
    tx.send(&Msg::Open {
        seq: 0,
        epoch: 1,
        size: 64 << 20,
        volume: VOLUME.into(),
        uuid: "0123456789abcdef0123456789abcdef".into(),
    })
    .unwrap();
    assert!(matches!(rx.recv().unwrap(), Msg::Opened { .. }));
    let before = status_kib(r1.pid(), "VmRSS:") << 10;
    // Replies of 4 MiB that are never read block the replica's applier; then 4 MiB writes.
    let sender = std::thread::spawn(move || {
        tx.set_timeout(Some(Duration::from_secs(3))).unwrap();
        for seq in 1..=4u64 {
            let read = Msg::Read {
                seq,
                offset: 0,
                len: 4 << 20,
            };
            if tx.send(&read).is_err() {
                return 0;
            }
        }
        let data = vec![0x5a; 4 << 20];
        let crc = crc32c::crc32c(&data);
        let mut sent = 0u64;
        for seq in 100..220u64 {
            let offset = (seq % 16) << 22;
            if tx.send_write(seq, 1, offset, crc, &data).is_err() {
                break;
            }
            sent += data.len() as u64;
        }
        sent
    });
    let sent = sender.join().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let peak = status_kib(r1.pid(), "VmHWM:") << 10;
    let grew = peak.saturating_sub(before);
    assert!(
        grew <= CONN_BOUND,
        "the replica grew by {} MiB (peak) after {} MiB sent; the bound is {} MiB",
        grew >> 20,
        sent >> 20,
        CONN_BOUND >> 20
    );
    assert!(sent >= 32 << 20, "only {} MiB were sent", sent >> 20);
    drop(rx);
}

// --- TLS ---------------------------------------------------------------------------------

/// A TCP relay from a free port to `to`, recording every byte that goes through it.
fn recording_relay(to: u16) -> (u16, Arc<Mutex<Vec<u8>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let rec = Arc::clone(&seen);
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(c) = c else { return };
            let Ok(s) = TcpStream::connect(("127.0.0.1", to)) else {
                continue;
            };
            for (mut a, mut b) in [(c.try_clone().unwrap(), s.try_clone().unwrap()), (s, c)] {
                let rec = Arc::clone(&rec);
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 << 10];
                    while let Ok(n) = a.read(&mut buf) {
                        if n == 0 || b.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        rec.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                    let _ = b.shutdown(std::net::Shutdown::Both);
                });
            }
        }
    });
    (port, seen)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Replicates a distinctive 4 KiB write through a recording relay; returns whether the
/// pattern crossed the wire in the clear.
fn pattern_on_the_wire(env: &Env) -> bool {
    let (p1, hp) = (free_port(), free_port());
    let _r1 = env.replica("r1", p1);
    let (relay, seen) = recording_relay(p1);
    let img = env.path("img");
    make_image(&img, None);
    let sock = env.path("s.sock");
    let _primary = env.primary("a", &img, &sock, &[relay], hp, "");
    wait_in_sync(hp, &[relay], Duration::from_secs(30));
    let data = pattern();
    write_and_read_back(&sock, 3 << 20, &data);
    wait_until(Duration::from_secs(10), "the write on the replica", || {
        replica_has(env, "r1", 3 << 20, &data)
    });
    let seen = seen.lock().unwrap();
    assert!(seen.len() > 4096, "the relay saw {} bytes", seen.len());
    contains(&seen, &data)
}

/// A primary and a replica over TLS replicate, and the guest reads its write back byte
/// for byte, from the primary and on the replica's copy.
#[test]
fn tls_replicates_and_reads_back() {
    let mut env = Env::new(false);
    env.use_tls("ca1", "host1");
    let (p1, hp) = (free_port(), free_port());
    let r1 = env.replica("r1", p1);
    let img = env.path("img");
    make_image(&img, None);
    let sock = env.path("s.sock");
    let _primary = env.primary("a", &img, &sock, &[p1], hp, "");
    wait_in_sync(hp, &[p1], Duration::from_secs(30));
    let data = pattern();
    let big: Vec<u8> = (0..(4 << 20)).map(|i: u32| (i % 251) as u8).collect();
    write_and_read_back(&sock, 4096, &data);
    write_and_read_back(&sock, 8 << 20, &big);
    wait_until(Duration::from_secs(10), "the writes on the replica", || {
        replica_has(&env, "r1", 4096, &data) && replica_has(&env, "r1", 8 << 20, &big)
    });
    assert!(r1.log().contains("TLS 1.3"), "{}", r1.log());
    // The tools speak TLS too.
    let (code, out) = env.verify(&img, &[p1]);
    assert_eq!(code, 0, "{out}");
}

/// Plain TCP is never a default: with neither TLS nor a pre-shared key, a replica server
/// and a replicated disk refuse to start, and say what is missing.
#[test]
fn neither_tls_nor_a_key_refuses_to_start() {
    let env = Env::new(false);
    let data = env.path("r1");
    let out = std::process::Command::new(common::BIN)
        .args(["replica", "--listen", "127.0.0.1:0", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("need TLS") && err.contains("--replication-key"),
        "{err}"
    );
    let img = env.path("img");
    make_image(&img, None);
    let disk = format!(
        "path={},socket={},volume={VOLUME},replicas=127.0.0.1:1",
        img.display(),
        env.path("s.sock").display()
    );
    let out = std::process::Command::new(common::BIN)
        .args(["serve", "--authority", &env.authority, "--disk", &disk])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("need TLS"), "{err}");
    // Half of the TLS files is refused too.
    let (cert, _, _) = env.tls_files("ca1", "host1");
    let out = std::process::Command::new(common::BIN)
        .args(["replica", "--listen", "127.0.0.1:0", "--data"])
        .arg(&data)
        .arg("--tls-cert")
        .arg(&cert)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("all three"), "{err}");
}

/// The wire carries the pattern in the clear with a pre-shared key (the check has
/// teeth), and never under TLS.
#[test]
fn tls_encrypts_the_wire_and_psk_does_not() {
    let psk = Env::new(false);
    assert!(
        pattern_on_the_wire(&psk),
        "with a pre-shared key the data is not encrypted: the relay must see it"
    );
    let mut tls = Env::new(false);
    tls.use_tls("ca1", "host1");
    assert!(
        !pattern_on_the_wire(&tls),
        "the guest's data crossed the wire in the clear under TLS"
    );
}

/// A replica whose certificate comes from another CA is refused by the primary, which
/// says so at WARN (not only in /health).
#[test]
fn a_replica_with_a_certificate_from_another_ca_is_refused_and_logged() {
    let mut env = Env::new(false);
    env.use_tls("ca1", "host1");
    let p1 = free_port();
    let primary_link = env.link.clone();
    env.use_tls("ca2", "host1");
    let r1 = env.replica("r1", p1);
    env.link = primary_link;
    let img = env.path("img");
    make_image(&img, None);
    let sock = env.path("s.sock");
    let hp = free_port();
    let mut cmd = env.primary_command("a", &img, &sock, &[p1], hp, "");
    let log = env.path("primary-a.log");
    let primary: Proc = env.spawn_primary(&mut cmd, &sock, &log);
    wait_until(Duration::from_secs(20), "a WARN about the replica", || {
        primary.log().lines().any(|l| {
            l.contains("WARN") && l.contains("cannot connect to the replica") && l.contains("TLS")
        })
    });
    assert!(
        !std::fs::exists(env.replica_image("r1")).unwrap(),
        "{}",
        r1.log()
    );
}

/// A client without a certificate is refused by a TLS replica.
#[test]
fn a_client_without_a_certificate_is_refused_by_the_replica() {
    let mut env = Env::new(false);
    env.use_tls("ca1", "host1");
    let p1 = free_port();
    let r1 = env.replica("r1", p1);
    let (_, _, ca) = env.tls_files("ca1", "host1");
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(&ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{p1}").parse().unwrap();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut tls = rustls::Stream::new(&mut conn, &mut s);
    let _ = tls.write_all(b"hello");
    let mut buf = [0u8; 16];
    let r = tls.read(&mut buf);
    assert!(!matches!(r, Ok(n) if n > 0), "the replica answered: {r:?}");
    wait_until(
        Duration::from_secs(10),
        "the refusal in the replica's log",
        || r1.log().contains("handshake failed: TLS"),
    );
}
