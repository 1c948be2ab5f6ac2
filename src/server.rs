//! Serving disks: one listening socket and one accept loop per disk.
//!
//! Each frontend connection gets a fresh [`BlkBackend`] (fresh workers and rings) inside a
//! fresh `VhostUserDaemon`; the listening socket outlives connections, so a frontend that
//! disconnects can come back. When a connection ends, requests still in flight are drained
//! into the used ring before the workers stop.
//!
//! Shutdown (SIGTERM/SIGINT): every connected frontend's connection is closed, its in-flight
//! requests drain, every disk is flushed, and the process exits 0.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Duration;

use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::backend::{completion_event, BlkBackend};
use crate::disk::Disk;
use crate::proxy::{InflightSlot, Relay};
use crate::sys;

/// The longest socket path the kernel takes, not counting the NUL (`sun_path` is 108 bytes).
const SUN_PATH_MAX: usize = 107;

/// How long a connection's in-flight requests may take to drain after it ends.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("socket {0} is in use by a live process")]
    SocketInUse(PathBuf),
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("cannot listen on {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot set the mode or owner of {path}")]
    Access {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot tell whether {path} is in use")]
    Probe {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove the stale socket {path}")]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

#[derive(Default)]
enum Conn {
    #[default]
    Idle,
    Connected(ShutdownHandle, Arc<BlkBackend>),
    Stopped,
}

#[derive(Default)]
struct Control {
    shutting_down: bool,
    conn: Conn,
}

/// A disk being served, and the handle to stop it.
pub struct DiskServer {
    pub disk: Arc<Disk>,
    control: Arc<(Mutex<Control>, Condvar)>,
    thread: Mutex<Option<thread::JoinHandle<()>>>,
}

/// Who may connect to a socket: its mode, and optionally its owner and group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketAccess {
    pub mode: u32,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

impl Default for SocketAccess {
    fn default() -> Self {
        SocketAccess {
            mode: 0o600,
            uid: None,
            gid: None,
        }
    }
}

/// Binds the disk's socket, refusing a path another live process listens on, and gives it
/// `access`. See [`listen_unix`].
pub fn bind(path: &Path, access: SocketAccess) -> Result<Listener, ServeError> {
    listen_unix(path, access).map(Listener::from)
}

/// Listens on the unix socket `path` with `access`, refusing a path another live process
/// listens on and replacing a stale one.
///
/// The socket is bound in a private directory (mode 0700) created next to `path`, given its
/// mode and owner there, put in the listening state, and only then linked to `path`
/// (`linkat`, which never replaces an existing file). So:
/// - `path` never names a socket that refuses connections (between bind and listen): a
///   hypervisor or script that waits for the file and then connects reaches the daemon;
/// - nobody can connect before the mode and owner are set, or swap the file for a symlink
///   while they are set (the private directory is ours alone, and the changes go through
///   its descriptor);
/// - two daemons started on the same path cannot both publish it.
///
/// The kernel keeps the name the socket was bound to (`ss -x` and `/proc/net/unix` show
/// `DIR/.ferrodisk-PID-N/s`). If that name would not fit in `sun_path`, the socket is bound
/// in place instead, with the bind-to-listen window of most servers.
pub fn listen_unix(path: &Path, access: SocketAccess) -> Result<UnixListener, ServeError> {
    remove_if_stale(path)?;
    let listen_err = |source: io::Error| ServeError::Listen {
        path: path.to_path_buf(),
        source,
    };
    let access_err = |source: io::Error| ServeError::Access {
        path: path.to_path_buf(),
        source,
    };
    let name = path
        .file_name()
        .ok_or_else(|| listen_err(io::Error::other("the path has no file name")))?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let apply = |dir: &std::fs::File, name: &std::ffi::OsStr| -> io::Result<()> {
        // The mode was set before bind, less the umask: set it whole.
        sys::chmod_at(dir, name, access.mode)?;
        if access.uid.is_some() || access.gid.is_some() {
            sys::chown_at(dir, name, access.uid, access.gid)?;
        }
        Ok(())
    };
    let Some((private, dir)) = private_dir(parent).map_err(listen_err)? else {
        // No room for the private directory's name: bind in place.
        let dir = std::fs::File::open(parent).map_err(listen_err)?;
        let l = sys::bind_unix_listener(path, access.mode).map_err(listen_err)?;
        if let Err(e) = apply(&dir, name) {
            let _ = std::fs::remove_file(path);
            return Err(access_err(e));
        }
        return Ok(l);
    };
    let s = std::ffi::OsStr::new("s");
    let published = sys::bind_unix_listener(&private.join(s), access.mode)
        .map_err(listen_err)
        .and_then(|l| apply(&dir, s).map_err(access_err).map(|()| l))
        .and_then(|l| {
            sys::link_at(&dir, s, path)
                .map_err(|e| match e.kind() {
                    io::ErrorKind::AlreadyExists => ServeError::SocketInUse(path.to_path_buf()),
                    _ => listen_err(e),
                })
                .map(|()| l)
        });
    let _ = sys::unlink_at(&dir, s);
    let _ = std::fs::remove_dir(&private);
    published
}

/// Removes `path` if it is a socket nobody listens on; refuses anything else.
fn remove_if_stale(path: &Path) -> Result<(), ServeError> {
    if !probe(path)? {
        return Ok(());
    }
    std::fs::remove_file(path)
        .or_else(|e| match e.kind() {
            io::ErrorKind::NotFound => Ok(()),
            _ => Err(e),
        })
        .map_err(|source| ServeError::RemoveStale {
            path: path.to_path_buf(),
            source,
        })
}

/// Fails if `path` is taken: it is not a socket, or a live process listens on it. A stale
/// socket is left for [`listen_unix`] to replace. For a start that has work to do before it
/// publishes its socket, so that it gives up before that work.
pub fn check_free(path: &Path) -> Result<(), ServeError> {
    probe(path).map(drop)
}

/// `Ok(true)`: `path` is a stale socket (nobody listens); `Ok(false)`: nothing is there.
fn probe(path: &Path) -> Result<bool, ServeError> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(false);
    };
    if !meta.file_type().is_socket() {
        return Err(ServeError::NotASocket(path.to_path_buf()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ServeError::SocketInUse(path.to_path_buf())),
        // Only a refused connection proves that nobody listens.
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(ServeError::Probe {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Creates `parent/.ferrodisk-PID-N` with mode 0700 and opens it; `None` if a socket in it
/// would not fit in `sun_path`.
fn private_dir(parent: &Path) -> io::Result<Option<(PathBuf, std::fs::File)>> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    for _ in 0..100 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = parent.join(format!(".ferrodisk-{}-{n}", std::process::id()));
        if dir.as_os_str().len() + 2 > SUN_PATH_MAX {
            return Ok(None);
        }
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(&dir)?;
        // What we opened must be the directory we made: ours, and closed to others.
        let m = f.metadata()?;
        if m.uid() != sys::euid() || m.mode() & 0o077 != 0 {
            return Err(io::Error::other(format!(
                "{} changed under us",
                dir.display()
            )));
        }
        return Ok(Some((dir, f)));
    }
    Err(io::Error::other("no free name for a private directory"))
}

impl DiskServer {
    /// Starts the accept loop of `disk` on `listener` in a thread of its own.
    pub fn start(disk: Arc<Disk>, listener: Listener) -> io::Result<DiskServer> {
        let control = Arc::new((Mutex::new(Control::default()), Condvar::new()));
        let (d, c) = (Arc::clone(&disk), Arc::clone(&control));
        let name = format!("disk-{}", disk.config.socket.display());
        let t = thread::Builder::new()
            .name(name)
            .spawn(move || accept_loop(d, listener, c))?;
        Ok(DiskServer {
            disk,
            control,
            thread: Mutex::new(Some(t)),
        })
    }

    /// Runs `f` at a quiesce point: no new request is taken from the rings, and every request
    /// already taken has completed. Requests the guest queues meanwhile wait in the rings and
    /// are taken afterwards: none is lost. Returns `None` if the disk did not drain in time
    /// (then `f` did not run).
    pub fn quiesced<R>(&self, f: impl FnOnce() -> R) -> Option<R> {
        use std::sync::atomic::Ordering;
        self.disk.paused.store(true, Ordering::Release);
        let backend = match &self
            .control
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .conn
        {
            Conn::Connected(_, b) => Some(Arc::clone(b)),
            _ => None,
        };
        let drained = backend.as_ref().is_none_or(|b| {
            b.barrier();
            b.wait_idle(DRAIN_TIMEOUT)
        });
        let r = drained.then(f);
        self.disk.paused.store(false, Ordering::Release);
        if let Some(b) = backend {
            b.wake_all();
        }
        r
    }

    /// Stops serving for good (detach): winds the connection down as [`stop`](Self::stop)
    /// does, ends the accept loop, and removes the socket file.
    pub fn close(&self) {
        self.stop();
        // An idle accept loop is blocked in accept(): wake it with a connection of our own,
        // which it drops once it sees that we are shutting down.
        let _ = UnixStream::connect(&self.disk.config.socket);
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.disk.config.socket);
    }

    /// Winds the current connection (if any) down: stop taking requests, let the ones taken
    /// complete into the used ring, then close the connection. The frontend's used index
    /// then says exactly what was consumed, so the next backend resumes in the right place
    /// even for frontends without inflight tracking.
    pub fn stop(&self) {
        let (lock, cvar) = &*self.control;
        let connected = {
            let mut ctl = lock.lock().unwrap_or_else(|p| p.into_inner());
            ctl.shutting_down = true;
            match &ctl.conn {
                Conn::Connected(h, b) => Some((h.clone(), Arc::clone(b))),
                _ => None,
            }
        };
        if let Some((handle, backend)) = connected {
            if !backend.quiesce(DRAIN_TIMEOUT) {
                tracing::error!(
                    disk = %self.disk.config.socket.display(),
                    in_flight = backend.in_flight(),
                    "requests still in flight at shutdown"
                );
            }
            handle.shutdown();
        }
        let ctl = lock.lock().unwrap_or_else(|p| p.into_inner());
        let (ctl, _) = cvar
            .wait_timeout_while(ctl, DRAIN_TIMEOUT, |c| {
                matches!(c.conn, Conn::Connected(..))
            })
            .unwrap_or_else(|p| p.into_inner());
        drop(ctl);
    }
}

fn accept_loop(disk: Arc<Disk>, mut listener: Listener, control: Arc<(Mutex<Control>, Condvar)>) {
    let socket = disk.config.socket.display().to_string();
    loop {
        match serve_one(&disk, &mut listener, &control) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                tracing::error!(disk = %socket, "connection failed: {e}");
                thread::sleep(Duration::from_millis(100));
            }
        }
        let (lock, cvar) = &*control;
        let mut ctl = lock.lock().unwrap_or_else(|p| p.into_inner());
        if ctl.shutting_down {
            ctl.conn = Conn::Stopped;
            cvar.notify_all();
            return;
        }
        ctl.conn = Conn::Idle;
        cvar.notify_all();
    }
}

/// Serves one frontend connection from accept to disconnect. Returns whether to go on.
fn serve_one(
    disk: &Arc<Disk>,
    listener: &mut Listener,
    control: &Arc<(Mutex<Control>, Condvar)>,
) -> Result<bool, Box<dyn std::error::Error>> {
    let socket = disk.config.socket.display().to_string();
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let inflight = Arc::new(InflightSlot::default());
    let backend = Arc::new(BlkBackend::new(
        Arc::clone(disk),
        mem.clone(),
        Arc::clone(&inflight),
    )?);
    let mut daemon = VhostUserDaemon::new(socket.clone(), Arc::clone(&backend), mem)
        .map_err(|e| format!("cannot create the vhost-user daemon: {e}"))?;
    let event = completion_event(backend.num_queues_usize());
    for (handler, fd) in daemon
        .get_epoll_handlers()
        .iter()
        .zip(backend.completion_fds())
    {
        if let Some(fd) = fd {
            handler.register_listener(fd, EventSet::IN, event)?;
        }
    }
    // Deferred requests and wake-ups.
    for (handler, fd) in daemon.get_epoll_handlers().iter().zip(backend.timer_fds()) {
        handler.register_listener(fd, EventSet::IN, event + 2)?;
    }
    // Replica acknowledgements wake the same worker threads.
    if let Some(repl) = disk.repl.get() {
        for (q, handler) in daemon.get_epoll_handlers().iter().enumerate() {
            handler.register_listener(repl.mailbox(q).fd(), EventSet::IN, event + 1)?;
        }
    }
    // Accept the frontend ourselves and put the relay between it and the library, which
    // gets its end over a private socket (see `proxy`).
    let frontend = accept(listener)?;
    if control
        .0
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .shutting_down
    {
        return Ok(false);
    }
    let (mut private, library_end) = private_pair()?;
    *disk
        .backend_channel
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = None;
    let d = Arc::clone(disk);
    let relay = Relay::spawn(
        frontend,
        library_end,
        inflight,
        &socket,
        Box::new(move |s| *d.backend_channel.lock().unwrap_or_else(|p| p.into_inner()) = Some(s)),
    )?;
    daemon
        .start(&mut private)
        .map_err(|e| format!("cannot start the vhost-user handler: {e}"))?;
    {
        let (lock, _) = &**control;
        let mut ctl = lock.lock().unwrap_or_else(|p| p.into_inner());
        match daemon.shutdown_handle() {
            Some(h) if ctl.shutting_down => h.shutdown(),
            Some(h) => ctl.conn = Conn::Connected(h, Arc::clone(&backend)),
            None => {}
        }
    }
    tracing::info!(disk = %socket, "frontend connected");
    match daemon.wait() {
        Ok(())
        | Err(vhost_user_backend::Error::HandleRequest(
            vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
        )) => tracing::info!(disk = %socket, "frontend disconnected"),
        Err(e) => tracing::warn!(disk = %socket, "frontend connection ended: {e}"),
    }
    relay.close();
    if !backend.wait_idle(DRAIN_TIMEOUT) {
        tracing::error!(disk = %socket, in_flight = backend.in_flight(), "requests still in flight after the connection ended");
    }
    drop(daemon);
    Ok(true)
}

/// Waits for the next frontend on the disk's socket.
fn accept(listener: &mut Listener) -> io::Result<UnixStream> {
    loop {
        match listener.accept() {
            Ok(Some(s)) => return Ok(s),
            Ok(None) => continue,
            Err(e) => return Err(io::Error::other(e)),
        }
    }
}

/// A listener on a fresh abstract socket (never visible in the file system) and a stream
/// already connected to it.
fn private_pair() -> io::Result<(Listener, UnixStream)> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixListener};
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = format!(
        "ferrodisk/{}/{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let addr = SocketAddr::from_abstract_name(name.as_bytes())?;
    let listener = UnixListener::bind_addr(&addr)?;
    let stream = UnixStream::connect_addr(&addr)?;
    Ok((Listener::from(listener), stream))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn socket_appears_listening_with_its_mode_and_no_temporary_is_left() {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("d.sock");
        let access = SocketAccess {
            mode: 0o640,
            uid: None,
            gid: None,
        };
        let l = listen_unix(&path, access).unwrap();
        assert_eq!(mode(&path), 0o640);
        UnixStream::connect(&path).expect("the published path accepts connections");
        assert!(l.accept().is_ok());
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("d.sock")]);
    }

    #[test]
    fn live_socket_is_refused_stale_one_replaced_file_kept() {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("d.sock");
        let live = listen_unix(&path, SocketAccess::default()).unwrap();
        assert!(matches!(
            listen_unix(&path, SocketAccess::default()),
            Err(ServeError::SocketInUse(_))
        ));
        drop(live);
        // The file is left behind, as after a crash: it is stale and gets replaced.
        assert!(path.exists());
        let _l = listen_unix(&path, SocketAccess::default()).unwrap();
        UnixStream::connect(&path).unwrap();

        let file = dir.path().join("plain");
        std::fs::write(&file, b"data").unwrap();
        assert!(matches!(
            listen_unix(&file, SocketAccess::default()),
            Err(ServeError::NotASocket(_))
        ));
        assert_eq!(std::fs::read(&file).unwrap(), b"data");
    }

    #[test]
    fn the_mode_is_whole_whatever_the_umask_and_other_names_are_refused() {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("wide.sock");
        let access = SocketAccess {
            mode: 0o666,
            uid: None,
            gid: None,
        };
        // The umask (022 or so) takes bits off at bind; they are put back.
        let _l = listen_unix(&path, access).unwrap();
        assert_eq!(mode(&path), 0o666);
        // A stale socket is replaced, a symlink is not followed or replaced.
        let link = dir.path().join("link.sock");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(matches!(
            listen_unix(&link, SocketAccess::default()),
            Err(ServeError::NotASocket(_))
        ));
        assert_eq!(mode(&path), 0o666, "the target of the symlink is untouched");
    }

    #[test]
    fn a_path_with_no_room_for_the_temporary_name_is_bound_in_place() {
        let dir = tempfile::TempDir::new().unwrap();
        let base = dir.path().as_os_str().len() + 1;
        assert!(base < 90, "temporary directory path too long for this test");
        let path = dir.path().join("s".repeat(SUN_PATH_MAX - base));
        assert_eq!(path.as_os_str().len(), SUN_PATH_MAX);
        let _l = listen_unix(&path, SocketAccess::default()).unwrap();
        assert_eq!(mode(&path), 0o600);
        UnixStream::connect(&path).unwrap();
    }
}
