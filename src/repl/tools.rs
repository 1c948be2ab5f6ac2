//! Operator tools: the health endpoint of a primary, `promote` and `verify`.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::authority::Authority;
use super::primary::{LinkState, Replication};
use super::wire::{self, Key, Msg};

/// The health document of every replicated disk of this daemon.
pub fn health_json(disks: &[Arc<Replication>]) -> (bool, serde_json::Value) {
    let mut healthy = true;
    let vols: Vec<_> = disks
        .iter()
        .map(|r| {
            let fenced = r.is_fenced();
            healthy &= !fenced;
            let replicas: Vec<_> = r
                .links
                .iter()
                .enumerate()
                .map(|(i, l)| {
                    let state = l.state();
                    let dirty = r.dirty_regions(i);
                    let total = l.resync_total.load(Ordering::Relaxed);
                    serde_json::json!({
                        "addr": l.addr,
                        "state": state.name(),
                        "dirty_regions": dirty,
                        "resync_progress": if state == LinkState::Resyncing && total > 0 {
                            serde_json::json!(1.0 - dirty as f64 / total as f64)
                        } else {
                            serde_json::Value::Null
                        },
                        "writes": l.counters.writes.load(Ordering::Relaxed),
                        "failures": l.counters.failures.load(Ordering::Relaxed),
                        "compared_regions": l.counters.compared_regions.load(Ordering::Relaxed),
                        "copied_regions": l.counters.resynced_regions.load(Ordering::Relaxed),
                        "copied_bytes": l.counters.resync_bytes.load(Ordering::Relaxed),
                        "last_error": l.last_error(),
                    })
                })
                .collect();
            let degraded = r.links.iter().any(|l| l.state() != LinkState::InSync);
            serde_json::json!({
                "volume": r.config.volume,
                "node": r.config.node,
                "epoch": r.epoch,
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

fn open_conn(
    addr: &str,
    key: &Key,
    volume: &str,
    epoch: u64,
) -> Result<(wire::Sender, wire::Receiver), String> {
    let sa = addr
        .to_socket_addrs()
        .map_err(|e| format!("{addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr}: no address"))?;
    let stream = TcpStream::connect_timeout(&sa, Duration::from_secs(3))
        .map_err(|e| format!("{addr}: {e}"))?;
    let (mut tx, mut rx) = wire::client(stream, key).map_err(|e| format!("{addr}: {e}"))?;
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
        Ok(Msg::Opened { .. }) => Ok((tx, rx)),
        Ok(Msg::Nack { message, .. }) => Err(format!("{addr}: {message}")),
        Ok(_) => Err(format!("{addr}: unexpected reply")),
        Err(e) => Err(format!("{addr}: {e}")),
    }
}

/// Fences `volume` at `epoch` on the replica at `addr`: from then on it refuses every
/// request of an older epoch.
pub fn fence(addr: &str, key: &Key, volume: &str, epoch: u64) -> Result<(), String> {
    let (mut tx, mut rx) = open_conn(addr, key, volume, 0)?;
    tx.send(&Msg::Fence { seq: 1, epoch })
        .map_err(|e| format!("{addr}: {e}"))?;
    match rx.recv() {
        Ok(Msg::Ack { .. }) => Ok(()),
        Ok(Msg::Nack { message, .. }) => Err(format!("{addr}: {message}")),
        Ok(_) => Err(format!("{addr}: unexpected reply")),
        Err(e) => Err(format!("{addr}: {e}")),
    }
}

/// The outcome of `promote`.
pub struct Promoted {
    pub epoch: u64,
    pub fenced: Vec<String>,
    pub unreachable: Vec<(String, String)>,
    pub others: Vec<String>,
}

/// Health check → promote in the authority → fence every replica it can reach.
pub fn promote(
    authority: &Authority,
    key: &Key,
    volume: &str,
    replica: &str,
    node: &str,
) -> Result<Promoted, String> {
    let before = authority
        .load(volume)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("volume {volume} is not known to {}", authority.describe()))?;
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
    // The promoted copy becomes the new primary's backing: fence it first, so that the old
    // primary can never write into it again. If that fails, nothing is changed (found by
    // the simulation, tests/replication_sim.rs).
    fence(replica, key, volume, next)
        .map_err(|e| format!("cannot fence the replica to promote, nothing changed: {e}"))?;
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
    key: &Key,
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
        let (mut tx, mut rx) = open_conn(addr, key, volume, 0)?;
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
