//! A vhost-user message relay in front of vhost-user-backend.
//!
//! vhost-user-backend 0.24 answers GET_INFLIGHT_FD and SET_INFLIGHT_FD with "not supported".
//! Ferrodisk accepts each frontend connection itself and relays messages, with their file
//! descriptors, to the library over a private socket. The relay answers the two inflight
//! messages itself, keeps the backend-request channel (SET_BACKEND_REQ_FD) for config-change
//! messages, and passes everything else through unchanged, both ways. Only the control
//! path crosses the relay: kicks, calls and guest memory are file descriptors that go
//! straight to the library.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::inflight::InflightRegion;

const GET_INFLIGHT_FD: u32 = 31;
const SET_INFLIGHT_FD: u32 = 32;
const SET_PROTOCOL_FEATURES: u32 = 16;
const SET_BACKEND_REQ_FD: u32 = 21;
const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
const PROTOCOL_F_REPLY_ACK: u64 = 1 << 3;
/// Larger payloads than this are not vhost-user messages we know; the connection is closed.
const MAX_PAYLOAD: usize = 64 << 10;
/// `VhostUserInflight`: u64 mmap_size, u64 mmap_offset, u16 num_queues, u16 queue_size, pad.
const INFLIGHT_PAYLOAD: usize = 24;
const MAX_FDS: usize = 32;

/// The inflight region of the current connection, shared with the queue workers.
#[derive(Default)]
pub struct InflightSlot {
    region: Mutex<Option<Arc<InflightRegion>>>,
    generation: AtomicU64,
}

impl InflightSlot {
    /// Bumped each time the frontend hands a region over (SET_INFLIGHT_FD).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn current(&self) -> Option<Arc<InflightRegion>> {
        self.region
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn install(&self, region: InflightRegion) {
        *self.region.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(region));
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}

/// One vhost-user message.
struct Message {
    header: [u8; 12],
    payload: Vec<u8>,
    fds: Vec<File>,
}

impl Message {
    fn request(&self) -> u32 {
        u32::from_le_bytes([
            self.header[0],
            self.header[1],
            self.header[2],
            self.header[3],
        ])
    }

    fn flags(&self) -> u32 {
        u32::from_le_bytes([
            self.header[4],
            self.header[5],
            self.header[6],
            self.header[7],
        ])
    }

    fn reply(request: u32, payload: Vec<u8>, fds: Vec<File>) -> Message {
        let mut header = [0u8; 12];
        header[0..4].copy_from_slice(&request.to_le_bytes());
        header[4..8].copy_from_slice(&(FLAG_VERSION | FLAG_REPLY).to_le_bytes());
        header[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        Message {
            header,
            payload,
            fds,
        }
    }
}

fn recv(sock: &UnixStream) -> io::Result<Message> {
    let mut header = [0u8; 12];
    let mut raw_fds = [-1 as RawFd; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: header.as_mut_ptr().cast(),
        iov_len: header.len(),
    }];
    // SAFETY: the iovec covers `header`, which this frame owns and nothing else references.
    let (n, nfds) =
        unsafe { sock.recv_with_fds(&mut iov, &mut raw_fds) }.map_err(io::Error::from)?;
    let fds: Vec<File> = raw_fds[..nfds]
        .iter()
        // SAFETY: recvmsg just gave us these descriptors; nobody else owns them.
        .map(|&fd| unsafe { File::from_raw_fd(fd) })
        .collect();
    if n == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    (&*sock).read_exact(&mut header[n..])?;
    let size = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
    if size > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message payload of {size} bytes"),
        ));
    }
    let mut payload = vec![0u8; size];
    (&*sock).read_exact(&mut payload)?;
    Ok(Message {
        header,
        payload,
        fds,
    })
}

fn send(sock: &UnixStream, m: &Message) -> io::Result<()> {
    let fds: Vec<RawFd> = m.fds.iter().map(|f| f.as_raw_fd()).collect();
    let total = m.header.len() + m.payload.len();
    let sent = sock
        .send_with_fds(&[&m.header[..], &m.payload[..]], &fds)
        .map_err(io::Error::from)?;
    if sent < total {
        let mut rest = m.header.to_vec();
        rest.extend_from_slice(&m.payload);
        (&*sock).write_all(&rest[sent..])?;
    }
    Ok(())
}

/// A running relay for one connection.
pub struct Relay {
    frontend: UnixStream,
    threads: Vec<JoinHandle<()>>,
}

impl Relay {
    /// Relays between `frontend` and `library` until either side closes.
    pub fn spawn(
        frontend: UnixStream,
        library: UnixStream,
        slot: Arc<InflightSlot>,
        name: &str,
        on_backend_channel: Box<dyn Fn(UnixStream) + Send>,
    ) -> io::Result<Relay> {
        let reply_ack = Arc::new(AtomicBool::new(false));
        let to_frontend = Arc::new(Mutex::new(frontend.try_clone()?));
        let (f_in, l_out) = (frontend.try_clone()?, library.try_clone()?);
        let (l_in, f_out) = (library, Arc::clone(&to_frontend));
        let up = {
            let name = name.to_string();
            std::thread::Builder::new()
                .name(format!("relay-{name}"))
                .spawn(move || {
                    let r = frontend_to_library(
                        &f_in,
                        &l_out,
                        &to_frontend,
                        &slot,
                        &reply_ack,
                        &*on_backend_channel,
                    );
                    if let Err(e) = r {
                        if e.kind() != io::ErrorKind::UnexpectedEof {
                            tracing::warn!(disk = %name, "vhost-user relay: {e}");
                        }
                    }
                    let _ = f_in.shutdown(Shutdown::Both);
                    let _ = l_out.shutdown(Shutdown::Both);
                })?
        };
        let down = std::thread::Builder::new()
            .name(format!("relay-{name}-back"))
            .spawn(move || {
                while let Ok(m) = recv(&l_in) {
                    let sock = f_out.lock().unwrap_or_else(|p| p.into_inner());
                    if send(&sock, &m).is_err() {
                        break;
                    }
                }
                let _ = l_in.shutdown(Shutdown::Both);
                let _ = f_out
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .shutdown(Shutdown::Both);
            })?;
        Ok(Relay {
            frontend,
            threads: vec![up, down],
        })
    }

    /// Closes the frontend connection and waits for both directions to stop.
    pub fn close(self) {
        let _ = self.frontend.shutdown(Shutdown::Both);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn frontend_to_library(
    from: &UnixStream,
    to: &UnixStream,
    to_frontend: &Mutex<UnixStream>,
    slot: &InflightSlot,
    reply_ack: &AtomicBool,
    on_backend_channel: &dyn Fn(UnixStream),
) -> io::Result<()> {
    loop {
        let mut m = recv(from)?;
        let answer = match m.request() {
            SET_BACKEND_REQ_FD => {
                let wants = m.flags() & FLAG_NEED_REPLY != 0 && reply_ack.load(Ordering::Acquire);
                let ok = match m.fds.pop() {
                    Some(f) => {
                        on_backend_channel(UnixStream::from(std::os::fd::OwnedFd::from(f)));
                        true
                    }
                    None => false,
                };
                wants.then(|| {
                    Message::reply(
                        SET_BACKEND_REQ_FD,
                        u64::from(!ok).to_le_bytes().to_vec(),
                        Vec::new(),
                    )
                })
            }
            GET_INFLIGHT_FD => Some(get_inflight_fd(&m)?),
            SET_INFLIGHT_FD => {
                let wants = m.flags() & FLAG_NEED_REPLY != 0 && reply_ack.load(Ordering::Acquire);
                let ok = set_inflight_fd(&m.payload, m.fds, slot);
                wants.then(|| {
                    Message::reply(
                        SET_INFLIGHT_FD,
                        u64::from(!ok).to_le_bytes().to_vec(),
                        Vec::new(),
                    )
                })
            }
            request => {
                if request == SET_PROTOCOL_FEATURES && m.payload.len() >= 8 {
                    let f = u64::from_le_bytes(m.payload[..8].try_into().unwrap_or_default());
                    reply_ack.store(f & PROTOCOL_F_REPLY_ACK != 0, Ordering::Release);
                }
                send(to, &m)?;
                continue;
            }
        };
        if let Some(reply) = answer {
            send(
                &to_frontend.lock().unwrap_or_else(|p| p.into_inner()),
                &reply,
            )?;
        }
    }
}

fn inflight_fields(payload: &[u8]) -> Option<(u64, u64, u16, u16)> {
    if payload.len() < 20 {
        return None;
    }
    let u64_at = |o: usize| u64::from_le_bytes(payload[o..o + 8].try_into().unwrap_or_default());
    let u16_at = |o: usize| u16::from_le_bytes([payload[o], payload[o + 1]]);
    Some((u64_at(0), u64_at(8), u16_at(16), u16_at(18)))
}

/// GET_INFLIGHT_FD: a fresh region for `num_queues` queues of `queue_size`.
fn get_inflight_fd(m: &Message) -> io::Result<Message> {
    let (_, _, queues, size) = inflight_fields(&m.payload)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "short GET_INFLIGHT_FD"))?;
    let region = InflightRegion::create(queues, size).map_err(io::Error::other)?;
    let mut payload = vec![0u8; INFLIGHT_PAYLOAD];
    payload[0..8].copy_from_slice(&(region.len() as u64).to_le_bytes());
    payload[16..18].copy_from_slice(&queues.to_le_bytes());
    payload[18..20].copy_from_slice(&size.to_le_bytes());
    let fd = region.file().try_clone()?;
    tracing::info!(
        queues,
        queue_size = size,
        bytes = region.len(),
        "inflight region created"
    );
    Ok(Message::reply(GET_INFLIGHT_FD, payload, vec![fd]))
}

/// SET_INFLIGHT_FD: map the region the frontend kept for us. Returns whether it worked.
fn set_inflight_fd(payload: &[u8], mut fds: Vec<File>, slot: &InflightSlot) -> bool {
    let Some((size, offset, queues, qsize)) = inflight_fields(payload) else {
        tracing::warn!("SET_INFLIGHT_FD with a short payload");
        return false;
    };
    let Some(file) = fds.pop() else {
        tracing::warn!("SET_INFLIGHT_FD without a file descriptor");
        return false;
    };
    match InflightRegion::open(file, size, offset, queues, qsize) {
        Ok(region) => {
            tracing::info!(queues, queue_size = qsize, "inflight region attached");
            slot.install(region);
            true
        }
        Err(e) => {
            tracing::warn!("cannot use the inflight region from the frontend: {e}");
            false
        }
    }
}
