//! Operator tools: the health endpoint of a primary, `promote` and `verify`, and the
//! observer requests to one replica they are built on (identity, fence, drop).

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use super::authority::Authority;
use super::primary::{LinkState, Replication};
use super::wire::{self, Auth, Code, Msg};

/// The health document of every replicated disk of this daemon.
pub fn health_json(disks: &[Arc<Replication>]) -> (bool, serde_json::Value) {
    let mut healthy = true;
    let vols: Vec<_> = disks
        .iter()
        .map(|r| {
            let fenced = r.is_fenced();
            healthy &= !fenced;
            let (phase, links) = r.status();
            let replicas: Vec<_> = links
                .iter()
                .map(|l| {
                    let resyncing = l.state == LinkState::Resyncing.name();
                    serde_json::json!({
                        "addr": l.addr,
                        "state": l.state,
                        "dirty_regions": l.dirty_regions,
                        "resync_progress": if resyncing && l.resync_total > 0 {
                            serde_json::json!(1.0 - l.dirty_regions.min(l.resync_total) as f64 / l.resync_total as f64)
                        } else {
                            serde_json::Value::Null
                        },
                        "writes": l.writes,
                        "failures": l.failures,
                        "compared_regions": l.compared_regions,
                        "copied_regions": l.copied_regions,
                        "copied_bytes": l.copied_bytes,
                        "last_error": l.last_error,
                        "generation": l.identity.as_ref().map(|i| i.gen),
                    })
                })
                .collect();
            let degraded = links.iter().any(|l| l.state != LinkState::InSync.name());
            serde_json::json!({
                "volume": r.config.volume,
                "uuid": r.uuid,
                "node": r.config.node,
                "epoch": r.epoch,
                "phase": format!("{phase:?}"),
                "status": if fenced { "fenced" } else if degraded { "degraded" } else { "ok" },
                "fence_reason": r.fence_reason(),
                "replicas": replicas,
            })
        })
        .collect();
    (
        healthy,
        serde_json::json!({ "status": if healthy { "ok" } else { "fenced" }, "volumes": vols }),
    )
}

/// Serves `GET /health` (200 while no disk is fenced, 503 otherwise) on `listener`.
pub fn serve_health(listener: TcpListener, disks: Vec<Arc<Replication>>) {
    for stream in listener.incoming() {
        let Ok(mut s) = stream else { continue };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        // Read the whole request head: closing with unread bytes would reset the connection
        // before the client reads the answer.
        let mut line = String::new();
        let mut reader = BufReader::new(&s);
        if reader.read_line(&mut line).is_err() {
            continue;
        }
        let mut header = String::new();
        while reader.read_line(&mut header).is_ok_and(|n| n > 2) {
            header.clear();
        }
        let (code, body) = if line.starts_with("GET /health") {
            let (ok, doc) = health_json(&disks);
            (
                if ok {
                    "200 OK"
                } else {
                    "503 Service Unavailable"
                },
                doc.to_string(),
            )
        } else {
            ("404 Not Found", "{\"error\":\"GET /health\"}".to_string())
        };
        let _ = write!(
            s,
            "HTTP/1.1 {code}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    }
}

/// Asks a primary's health endpoint; `Ok(None)` if it cannot be reached at all.
pub fn query_health(addr: &str) -> Result<Option<(u16, serde_json::Value)>, String> {
    let Some(sa) = addr
        .to_socket_addrs()
        .map_err(|e| format!("{addr}: {e}"))?
        .next()
    else {
        return Err(format!("{addr}: no address"));
    };
    let Ok(mut s) = TcpStream::connect_timeout(&sa, Duration::from_secs(2)) else {
        return Ok(None);
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
    if write!(
        s,
        "GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .is_err()
    {
        return Ok(None);
    }
    let mut resp = String::new();
    if s.read_to_string(&mut resp).is_err() {
        return Ok(None); // a primary that hangs is not healthy
    }
    let code = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    let doc = serde_json::from_str(body).unwrap_or(serde_json::Value::Null);
    Ok(Some((code, doc)))
}

/// The identity of a replica's copy: `(stored epoch, volume uuid, generation)`.
pub type Identity = (u64, String, u64);

/// Connects to `addr` and opens `volume` at `epoch`; returns the connection and the reply
/// (`Opened` or `Nack`).
fn connect_open(
    addr: &str,
    key: &Auth,
    volume: &str,
    epoch: u64,
) -> Result<(wire::Sender, wire::Receiver, Msg), String> {
    let sa = addr
        .to_socket_addrs()
        .map_err(|e| format!("{addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr}: no address"))?;
    let stream = TcpStream::connect_timeout(&sa, Duration::from_secs(3))
        .map_err(|e| format!("{addr}: {e}"))?;
    let (mut tx, mut rx) = key
        .connect(stream, addr, None)
        .map_err(|e| format!("{addr}: {e}"))?;
    rx.set_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    tx.send(&Msg::Open {
        seq: 0,
        epoch,
        size: 0,
        volume: volume.to_string(),
        uuid: String::new(),
    })
    .map_err(|e| format!("{addr}: {e}"))?;
    match rx.recv() {
        Ok(m @ (Msg::Opened { .. } | Msg::Nack { .. })) => Ok((tx, rx, m)),
        Ok(_) => Err(format!("{addr}: unexpected reply to Open")),
        Err(e) => Err(format!("{addr}: {e}")),
    }
}

/// Opens `volume` on `addr` as an observer (epoch 0); returns the connection and the
/// identity of the copy.
fn open_conn(
    addr: &str,
    key: &Auth,
    volume: &str,
) -> Result<(wire::Sender, wire::Receiver, Identity), String> {
    match connect_open(addr, key, volume, 0)? {
        (
            tx,
            rx,
            Msg::Opened {
                epoch, uuid, gen, ..
            },
        ) => Ok((tx, rx, (epoch, uuid, gen))),
        (_, _, Msg::Nack { message, .. }) => Err(format!("{addr}: {message}")),
        _ => Err(format!("{addr}: unexpected reply to Open")),
    }
}

/// Sends `msg` and expects an `Ack`.
fn ack(
    addr: &str,
    tx: &mut wire::Sender,
    rx: &mut wire::Receiver,
    msg: &Msg,
) -> Result<(), String> {
    tx.send(msg).map_err(|e| format!("{addr}: {e}"))?;
    match rx.recv() {
        Ok(Msg::Ack { .. }) => Ok(()),
        Ok(Msg::Nack { message, .. }) => Err(format!("{addr}: {message}")),
        Ok(_) => Err(format!("{addr}: unexpected reply")),
        Err(e) => Err(format!("{addr}: {e}")),
    }
}

/// The identity of the copy of `volume` on the replica at `addr`: its stored epoch, and
/// "generation `gen` of volume `uuid`" (gen 0: blank or unknown content).
pub fn identity(addr: &str, key: &Auth, volume: &str) -> Result<Identity, String> {
    open_conn(addr, key, volume).map(|(_, _, id)| id)
}

/// Fences `volume` at `epoch` on the replica at `addr`: from then on it refuses every
/// request of an older epoch.
pub fn fence(addr: &str, key: &Auth, volume: &str, epoch: u64) -> Result<(), String> {
    let (mut tx, mut rx, _) = open_conn(addr, key, volume)?;
    ack(addr, &mut tx, &mut rx, &Msg::Fence { seq: 1, epoch })
}

/// Asks the replica at `addr` to drop its copy of the deleted `volume`: it raises the
/// volume's epoch to `epoch` (the tombstone's) durably, voids the copy's identity and
/// deletes its image. A replica that holds no copy has nothing to drop: `Ok`.
pub fn drop_copy(addr: &str, key: &Auth, volume: &str, epoch: u64) -> Result<(), String> {
    match connect_open(addr, key, volume, 0)? {
        (mut tx, mut rx, Msg::Opened { .. }) => {
            ack(addr, &mut tx, &mut rx, &Msg::Drop { seq: 1, epoch })
        }
        (
            _,
            _,
            Msg::Nack {
                code: Code::Range, ..
            },
        ) => Ok(()),
        (_, _, Msg::Nack { message, .. }) => Err(format!("{addr}: {message}")),
        _ => Err(format!("{addr}: unexpected reply to Open")),
    }
}

/// The outcome of `promote`.
pub struct Promoted {
    pub epoch: u64,
    pub fenced: Vec<String>,
    pub unreachable: Vec<(String, String)>,
    pub others: Vec<String>,
}

/// The promoted copy becomes the new primary's backing: it must hold this incarnation's data
/// (the authority's in-sync flag says nothing about a copy wiped or re-created since), and
/// it is fenced at `epoch` first, so that the old primary can never write into it again. If
/// either fails, nothing is changed (the fence: found by the simulation,
/// tests/replication_sim.rs). Both on one connection.
fn fence_to_promote(
    replica: &str,
    key: &Auth,
    volume: &str,
    uuid: &str,
    epoch: u64,
) -> Result<(), String> {
    let cannot = |e: String| format!("cannot fence the replica to promote, nothing changed: {e}");
    let (mut tx, mut rx, (_, held, gen)) = open_conn(replica, key, volume).map_err(cannot)?;
    if held != uuid || gen == 0 {
        return Err(format!(
            "replica {replica} holds no identified copy of volume {volume} (blank, wiped or another incarnation): promoting it would lose data"
        ));
    }
    ack(replica, &mut tx, &mut rx, &Msg::Fence { seq: 1, epoch }).map_err(cannot)
}

/// Health check → promote in the authority → fence every replica it can reach.
pub fn promote(
    authority: &Authority,
    key: &Auth,
    volume: &str,
    replica: &str,
    node: &str,
) -> Result<Promoted, String> {
    let before = authority
        .load(volume)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("volume {volume} is not known to {}", authority.describe()))?;
    if before.record.deleted {
        return Err(format!(
            "volume {volume} was deleted: there is nothing to promote"
        ));
    }
    let next = before.record.epoch + 1;
    match before.record.member(replica) {
        Some(m) if m.in_sync => {}
        Some(_) => {
            return Err(format!(
                "replica {replica} of {volume} is not in sync: promoting it could lose acknowledged writes"
            ))
        }
        None => return Err(format!("{replica} is not a replica of {volume}")),
    }
    fence_to_promote(replica, key, volume, &before.record.uuid, next)?;
    let rec = authority
        .promote_from(volume, replica, node, Some(before.record.epoch))
        .map_err(|e| e.to_string())?;
    let mut out = Promoted {
        epoch: rec.epoch,
        fenced: Vec::new(),
        unreachable: Vec::new(),
        others: rec.replicas.iter().map(|m| m.addr.clone()).collect(),
    };
    for m in &before.record.replicas {
        match fence(&m.addr, key, volume, rec.epoch) {
            Ok(()) => out.fenced.push(m.addr.clone()),
            Err(e) => out.unreachable.push((m.addr.clone(), e)),
        }
    }
    Ok(out)
}

/// A range where a replica differs from the local copy.
#[derive(Debug)]
pub struct Difference {
    pub replica: String,
    pub offset: u64,
    pub len: u64,
}

/// Compares `image` with each replica of `volume`, `chunk` bytes at a time, by crc32c.
pub fn verify(
    image: &std::path::Path,
    volume: &str,
    replicas: &[String],
    key: &Auth,
    chunk: u32,
) -> Result<(u64, Vec<Difference>), String> {
    let file = File::open(image).map_err(|e| format!("{}: {e}", image.display()))?;
    let size = file.metadata().map_err(|e| e.to_string())?.len();
    let span = u64::from(chunk) * 64;
    let mut local = Vec::new();
    let mut buf = vec![0u8; chunk as usize];
    let mut at = 0;
    while at < size {
        let n = (size - at).min(u64::from(chunk)) as usize;
        file.read_exact_at(&mut buf[..n], at)
            .map_err(|e| format!("{}: {e}", image.display()))?;
        local.push(crc32c::crc32c(&buf[..n]));
        at += n as u64;
    }
    let mut diffs = Vec::new();
    for addr in replicas {
        let (mut tx, mut rx, _) = open_conn(addr, key, volume)?;
        let mut at = 0;
        let mut seq = 1;
        while at < size {
            let len = (size - at).min(span);
            tx.send(&Msg::Sums {
                seq,
                offset: at,
                len,
                chunk,
            })
            .map_err(|e| format!("{addr}: {e}"))?;
            let crcs = match rx.recv() {
                Ok(Msg::SumsReply { crcs, .. }) => crcs,
                Ok(Msg::Nack { message, .. }) => return Err(format!("{addr}: {message}")),
                Ok(_) => return Err(format!("{addr}: unexpected reply")),
                Err(e) => return Err(format!("{addr}: {e}")),
            };
            let first = (at / u64::from(chunk)) as usize;
            for (i, c) in crcs.iter().enumerate() {
                if local.get(first + i) != Some(c) {
                    let off = (first + i) as u64 * u64::from(chunk);
                    diffs.push(Difference {
                        replica: addr.clone(),
                        offset: off,
                        len: (size - off).min(u64::from(chunk)),
                    });
                }
            }
            at += len;
            seq += 1;
        }
    }
    Ok((size, diffs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repl::replica::ReplicaServer;

    fn key() -> Auth {
        Auth::Psk(wire::Key::new(b"tools-unit-test-key!".to_vec()).unwrap())
    }

    fn replica() -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let srv = ReplicaServer::with(dir.path(), key(), Default::default()).unwrap();
        std::thread::spawn(move || srv.run(listener));
        (dir, addr)
    }

    /// A primary's connection to `addr`, opened at `epoch` as incarnation `uuid`.
    fn primary(addr: &str, epoch: u64, uuid: &str) -> (wire::Sender, wire::Receiver) {
        let stream = TcpStream::connect(addr).unwrap();
        let (mut tx, mut rx) = key().connect(stream, addr, None).unwrap();
        rx.set_timeout(Some(Duration::from_secs(10))).unwrap();
        tx.send(&Msg::Open {
            seq: 0,
            epoch,
            size: 1 << 20,
            volume: "v".into(),
            uuid: uuid.into(),
        })
        .unwrap();
        assert!(matches!(rx.recv().unwrap(), Msg::Opened { .. }));
        (tx, rx)
    }

    fn adopt(c: &mut (wire::Sender, wire::Receiver), epoch: u64, gen: u64) {
        ack("r", &mut c.0, &mut c.1, &Msg::Adopt { seq: 1, epoch, gen }).unwrap();
    }

    #[test]
    fn identity_and_drop_copy() {
        let (dir, addr) = replica();
        let k = key();
        assert!(identity(&addr, &k, "v").is_err(), "no copy yet");
        let mut p = primary(&addr, 2, "u1");
        adopt(&mut p, 2, 5);
        assert_eq!(identity(&addr, &k, "v").unwrap(), (2, "u1".to_string(), 5));
        let e = drop_copy(&addr, &k, "v", 1).unwrap_err();
        assert!(e.contains("older"), "{e}");
        drop_copy(&addr, &k, "v", 3).unwrap();
        assert_eq!(identity(&addr, &k, "v").unwrap(), (3, String::new(), 0));
        assert!(!dir.path().join("v.img").exists());
        drop_copy(&addr, &k, "v", 3).unwrap();
        drop_copy(&addr, &k, "other", 9).unwrap();
        assert!(identity(&addr, &k, "other").is_err(), "nothing was created");
    }

    #[test]
    fn promote_refuses_a_copy_that_is_not_this_incarnations() {
        let (_dir, addr) = replica();
        let adir = tempfile::tempdir().unwrap();
        let auth = Authority::open(&format!("file:{}", adir.path().display())).unwrap();
        let k = key();
        let bump = |epoch| {
            auth.update("v", |r| {
                let mut r = r.unwrap().clone();
                r.epoch = epoch;
                Ok(r)
            })
            .unwrap()
        };
        auth.take_over("v", "n1", std::slice::from_ref(&addr), Some("u1"))
            .unwrap();
        auth.set_in_sync("v", "n1", 1, &addr, true).unwrap();
        // In sync in the authority, but blank here (gen 0), then another incarnation's.
        let blank = primary(&addr, 1, "u1");
        let mut other = None;
        for epoch in [1, 2] {
            let e = promote(&auth, &k, "v", &addr, "n2").err().unwrap();
            assert!(e.contains("holds no identified copy"), "{e}");
            let rec = auth.load("v").unwrap().unwrap().record;
            assert_eq!(
                (rec.epoch, rec.primary.as_str()),
                (epoch, "n1"),
                "nothing changed"
            );
            assert_eq!(identity(&addr, &k, "v").unwrap().0, epoch, "not fenced");
            let mut p = primary(&addr, 2, "u2");
            adopt(&mut p, 2, 4);
            other = Some(p);
            bump(2);
        }
        drop((blank, other));
        // This incarnation's, adopted.
        let mut p = primary(&addr, 3, "u1");
        adopt(&mut p, 3, 4);
        bump(3);
        let done = promote(&auth, &k, "v", &addr, "n2").unwrap();
        assert_eq!(done.epoch, 4);
        assert_eq!(identity(&addr, &k, "v").unwrap(), (4, "u1".to_string(), 4));
        // A deleted volume has nothing to promote.
        auth.delete("v").unwrap();
        let e = promote(&auth, &k, "v", &addr, "n3").err().unwrap();
        assert!(e.contains("deleted"), "{e}");
    }
}
