//! The `ferrodisk` command line.

use std::collections::HashSet;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use ferrodisk::api::chain;
use ferrodisk::api::Manager;
use ferrodisk::config::{Backing, DiskConfig};
use ferrodisk::disk::Disk;
use ferrodisk::repl::authority::Authority;
use ferrodisk::repl::primary::ReplContext;
use ferrodisk::repl::replica::Limits;
use ferrodisk::repl::replica::ReplicaServer;
use ferrodisk::repl::tools;
use ferrodisk::repl::wire::{Auth, Key, Tls};
use ferrodisk::server::{self, DiskServer, SocketAccess};

mod cli;
use ferrodisk::sys;

#[derive(Parser)]
#[command(
    name = "ferrodisk",
    version,
    about = "A vhost-user-blk backend with an io_uring engine"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve one or more disks, each on its own vhost-user socket.
    Serve {
        /// path=IMG,socket=SOCK[,queues=N][,queue-size=N][,readonly=on][,direct=on|off]
        /// [,serial=ID][,writeback=on|off]  or  engine=null,size=SIZE,socket=SOCK[,...]
        #[arg(long = "disk", value_name = "SPEC")]
        disks: Vec<String>,
        #[command(flatten)]
        api: ApiArgs,
        #[command(flatten)]
        repl: ReplArgs,
        /// Serve `GET /health` (JSON) on this TCP address, e.g. 127.0.0.1:9100.
        #[arg(long, value_name = "ADDR")]
        health: Option<String>,
        #[command(flatten)]
        sandbox: cli::SeccompArgs,
    },
    /// Hold replicas of volumes for remote primaries.
    Replica {
        /// TCP address to listen on, e.g. 0.0.0.0:7700.
        #[arg(long, value_name = "ADDR")]
        listen: String,
        /// Directory of the replica files (`<volume>.img`, `<volume>.epoch`).
        #[arg(long, value_name = "DIR")]
        data: std::path::PathBuf,
        #[command(flatten)]
        sandbox: cli::SeccompArgs,
        #[command(flatten)]
        link: LinkArgs,
        /// Most authenticated connections at once.
        #[arg(long, value_name = "N", default_value_t = Limits::default().max_connections)]
        max_connections: usize,
        /// Most connections in their handshake at once (a new one evicts the oldest).
        #[arg(long, value_name = "N", default_value_t = Limits::default().max_handshakes)]
        max_handshakes: usize,
        /// Most MiB of requests (and of their replies) queued per connection.
        #[arg(long, value_name = "MIB", default_value_t = Limits::default().conn_buffer >> 20)]
        conn_buffer_mib: usize,
    },
    /// Make an in-sync replica the new primary of a volume (after the old one failed).
    Promote {
        #[arg(long, value_name = "SPEC", default_value = DEFAULT_AUTHORITY)]
        authority: String,
        #[arg(long, value_name = "ID")]
        volume: String,
        /// The replica (HOST:PORT, as the authority lists it) whose copy becomes primary.
        #[arg(long, value_name = "ADDR")]
        replica: String,
        /// Node id of the new primary (its `serve --node`).
        #[arg(long, value_name = "ID")]
        node: String,
        #[command(flatten)]
        link: LinkArgs,
        /// The old primary's health endpoint: refuse to promote while it reports healthy.
        #[arg(long = "primary-health", value_name = "ADDR")]
        primary_health: Option<String>,
        /// Promote even if the old primary's health endpoint answers healthy.
        #[arg(long)]
        force: bool,
    },
    /// Manage volumes through the daemon's API.
    Volume {
        #[command(flatten)]
        api: cli::ApiSocket,
        #[command(subcommand)]
        cmd: cli::VolumeCmd,
    },
    /// Serve a volume to an instance on a vhost-user socket.
    Attach(cli::AttachArgs),
    /// Driver images: add, list, remove (through the API); pack and keygen (local).
    Image {
        #[command(flatten)]
        api: cli::ApiSocket,
        #[command(subcommand)]
        cmd: cli::ImageCmd,
    },
    /// Operations on a running attachment.
    Attachment {
        #[command(flatten)]
        api: cli::ApiSocket,
        #[command(subcommand)]
        cmd: cli::AttachmentCmd,
    },
    /// Drain and close an attachment (ID is VOLUME@INSTANCE).
    Detach {
        #[command(flatten)]
        api: cli::ApiSocket,
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Counters and latency of every disk (or of one attachment).
    Stats {
        #[command(flatten)]
        api: cli::ApiSocket,
        id: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Compare a volume's local copy with its replicas, by checksum ranges.
    Verify {
        /// The local copy (the primary's image).
        #[arg(long, value_name = "PATH")]
        image: std::path::PathBuf,
        #[arg(long, value_name = "ID")]
        volume: String,
        /// Replicas to compare, HOST:PORT[+HOST:PORT...].
        #[arg(long, value_name = "LIST")]
        replicas: String,
        #[command(flatten)]
        link: LinkArgs,
        /// Checksum granularity in KiB.
        #[arg(long, default_value_t = 1024)]
        chunk_kib: u32,
    },
}

const DEFAULT_AUTHORITY: &str = "file:/var/lib/ferrodisk/authority";

#[derive(clap::Args)]
struct ApiArgs {
    /// Serve the management API (HTTP/JSON) on this unix socket.
    #[arg(long, value_name = "SOCK")]
    api: Option<std::path::PathBuf>,
    /// Where volumes and attachments are kept (with --api).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/ferrodisk")]
    state: std::path::PathBuf,
    /// Mode of the API socket (octal).
    #[arg(long, value_name = "MODE", default_value = "600")]
    api_mode: String,
    /// Owner (uid) of the API socket.
    #[arg(long, value_name = "UID")]
    api_uid: Option<u32>,
    /// Group (gid) of the API socket.
    #[arg(long, value_name = "GID")]
    api_gid: Option<u32>,
    /// Also serve Prometheus metrics (`GET /metrics`) on this TCP address.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// Accept only driver images signed by this ed25519 public key (hex file, from
    /// `ferrodisk image keygen`).
    #[arg(long, value_name = "FILE")]
    trusted_image_key: Option<std::path::PathBuf>,
    /// Accept driver images without a signature (by default every image must be signed by
    /// the --trusted-image-key). For development and tests only: an image runs as native
    /// code inside the daemon.
    #[arg(long)]
    allow_unsigned_images: bool,
    /// A directory (or a single file or block device) under which API clients may use or
    /// create volume files. Repeatable. `<state>/volumes` is always one; without this
    /// option it is the only one. Paths are compared after resolving symlinks.
    #[arg(long = "volume-root", value_name = "DIR")]
    volume_roots: Vec<std::path::PathBuf>,
}

#[derive(clap::Args)]
struct ReplArgs {
    /// Membership authority for replicated volumes: `file:DIR` (one host) or
    /// `etcd:http://HOST:PORT[,...]` (cluster).
    #[arg(long, value_name = "SPEC", default_value = DEFAULT_AUTHORITY)]
    authority: String,
    /// This host's node id in the authority (default: the hostname).
    #[arg(long, value_name = "ID")]
    node: Option<String>,
    #[command(flatten)]
    link: LinkArgs,
}

/// How replica links are secured: TLS (all three files) or, only when asked for, a
/// pre-shared key. Plain TCP is never a default.
#[derive(clap::Args)]
struct LinkArgs {
    /// Pre-shared key file (at least 16 bytes): peers are authenticated but the link is
    /// NOT encrypted. Use TLS unless the network is trusted.
    #[arg(
        long = "replication-key",
        visible_alias = "psk-file",
        value_name = "FILE"
    )]
    key: Option<std::path::PathBuf>,
    /// This host's certificate (PEM, then any intermediates), for TLS.
    #[arg(
        long = "replication-tls-cert",
        visible_alias = "tls-cert",
        value_name = "FILE"
    )]
    tls_cert: Option<std::path::PathBuf>,
    /// This host's private key (PEM), for TLS.
    #[arg(
        long = "replication-tls-key",
        visible_alias = "tls-key",
        value_name = "FILE"
    )]
    tls_key: Option<std::path::PathBuf>,
    /// The CA (PEM) that signs the peers' certificates, for TLS.
    #[arg(
        long = "replication-tls-ca",
        visible_alias = "tls-ca",
        value_name = "FILE"
    )]
    tls_ca: Option<std::path::PathBuf>,
}

const NO_LINK_SECURITY: &str = "replica links need TLS (--tls-cert FILE --tls-key FILE \
     --tls-ca FILE) or an explicit pre-shared key (--replication-key FILE: authenticated, \
     not encrypted)";

/// The link security `a` asks for; `None` if it asks for none.
fn link_auth(a: &LinkArgs) -> Result<Option<Auth>, String> {
    let tls = [&a.tls_cert, &a.tls_key, &a.tls_ca];
    let given = tls.iter().filter(|f| f.is_some()).count();
    if given > 0 && a.key.is_some() {
        return Err(
            "give either --replication-key (pre-shared key) or the TLS files, not both".into(),
        );
    }
    if let (Some(cert), Some(key), Some(ca)) = (&a.tls_cert, &a.tls_key, &a.tls_ca) {
        return Ok(Some(Auth::Tls(Arc::new(Tls::from_files(cert, key, ca)?))));
    }
    if given > 0 {
        return Err("TLS needs all three of --tls-cert, --tls-key and --tls-ca".into());
    }
    match &a.key {
        Some(k) => Ok(Some(Auth::Psk(Key::from_file(k)?))),
        None => Ok(None),
    }
}

/// The link security `a` asks for, which must be some.
fn required_auth(a: &LinkArgs) -> Result<Auth, ExitCode> {
    match link_auth(a) {
        Ok(Some(auth)) => Ok(auth),
        Ok(None) => Err(fail(NO_LINK_SECURITY, 2)),
        Err(e) => Err(fail(e, 2)),
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRODISK_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            disks,
            repl,
            health,
            api,
            sandbox,
        } => {
            ferrodisk::seccomp::set_mode(sandbox.seccomp);
            serve(&disks, &repl, health.as_deref(), &api)
        }
        Command::Volume { api, cmd } => cli::volume(&api, cmd),
        Command::Attach(a) => cli::attach(&a),
        Command::Image { api, cmd } => cli::image(&api, cmd),
        Command::Attachment { api, cmd } => cli::attachment(&api, cmd),
        Command::Detach { api, id, json } => cli::detach(&api, &id, json),
        Command::Stats { api, id, json } => cli::stats(&api, id.as_deref(), json),
        Command::Replica {
            listen,
            data,
            sandbox,
            link,
            max_connections,
            max_handshakes,
            conn_buffer_mib,
        } => {
            ferrodisk::seccomp::set_mode(sandbox.seccomp);
            let limits = Limits {
                max_connections,
                max_handshakes,
                conn_buffer: conn_buffer_mib << 20,
            };
            replica(&listen, &data, &link, limits)
        }
        Command::Promote {
            authority,
            volume,
            replica,
            node,
            link,
            primary_health,
            force,
        } => promote(
            &authority,
            &volume,
            &replica,
            &node,
            &link,
            primary_health.as_deref(),
            force,
        ),
        Command::Verify {
            image,
            volume,
            replicas,
            link,
            chunk_kib,
        } => verify(&image, &volume, &replicas, &link, chunk_kib),
    }
}

fn fail(msg: impl std::fmt::Display, code: u8) -> ExitCode {
    eprintln!("ferrodisk: {msg}");
    ExitCode::from(code)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".to_string())
}

/// What replication needs, from `--replication-key` or `--replication-tls-*`,
/// `--authority` and `--node`: `None` without either (then no disk may be replicated).
fn repl_context(args: &ReplArgs) -> Result<Option<ReplContext>, (String, u8)> {
    let Some(auth) = link_auth(&args.link).map_err(|e| (e, 2))? else {
        return Ok(None);
    };
    Ok(Some(ReplContext {
        key: auth,
        authority: Authority::open(&args.authority).map_err(|e| (chain(&e), 1))?,
        node: args.node.clone().unwrap_or_else(hostname),
    }))
}

/// Starts replication for the disks that have a volume.
fn start_replication(disks: &[Arc<Disk>], ctx: Option<&ReplContext>) -> Result<(), (String, u8)> {
    for d in disks {
        let (Some(volume), Backing::Path(path)) = (&d.config.volume, &d.config.backing) else {
            continue;
        };
        let ctx = ctx.ok_or((
            format!("a replicated disk (volume=): {NO_LINK_SECURITY}"),
            2,
        ))?;
        let meta = d.config.meta.clone().unwrap_or_else(|| {
            let mut p = path.clone().into_os_string();
            p.push(".ferrodisk");
            p.into()
        });
        let r = ferrodisk::repl::primary::start_for_disk(d, path, ctx, meta, None)
            .map_err(|e| (format!("volume {volume}: {}", chain(&e)), 1))?;
        let _ = d.repl.set(r);
    }
    Ok(())
}

fn replica(listen: &str, data: &std::path::Path, link: &LinkArgs, limits: Limits) -> ExitCode {
    let auth = match required_auth(link) {
        Ok(a) => a,
        Err(code) => return code,
    };
    if limits.max_connections == 0 || limits.max_handshakes == 0 || limits.conn_buffer == 0 {
        return fail(
            "--max-connections, --max-handshakes and --conn-buffer-mib must be at least 1",
            2,
        );
    }
    let listener = match std::net::TcpListener::bind(listen) {
        Ok(l) => l,
        Err(e) => return fail(format!("cannot listen on {listen}: {e}"), 1),
    };
    let server = match ReplicaServer::with(data, auth, limits) {
        Ok(s) => s,
        Err(e) => return fail(format!("{}: {e}", data.display()), 1),
    };
    tracing::info!(listen, data = %data.display(), "replica server ready");
    match server.run(listener) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e, 1),
    }
}

fn promote(
    authority: &str,
    volume: &str,
    replica: &str,
    node: &str,
    link: &LinkArgs,
    primary_health: Option<&str>,
    force: bool,
) -> ExitCode {
    let key = match required_auth(link) {
        Ok(a) => a,
        Err(code) => return code,
    };
    if let Some(h) = primary_health {
        match tools::query_health(h) {
            Ok(Some((200, _))) if !force => {
                return fail(
                    format!("the primary at {h} reports healthy; refusing to promote (use --force if it is partitioned from its guests)"),
                    1,
                )
            }
            Ok(Some((code, _))) => eprintln!("primary health at {h}: HTTP {code}"),
            Ok(None) => eprintln!("primary health at {h}: unreachable"),
            Err(e) => return fail(e, 2),
        }
    }
    let authority = match Authority::open(authority) {
        Ok(a) => a,
        Err(e) => return fail(chain(&e), 1),
    };
    match tools::promote(&authority, &key, volume, replica, node) {
        Ok(p) => {
            println!(
                "volume {volume}: promoted {replica} to primary `{node}` at epoch {}",
                p.epoch
            );
            for f in &p.fenced {
                println!("  fenced {f} at epoch {}", p.epoch);
            }
            for (u, e) in &p.unreachable {
                println!("  could not fence {u} (it will refuse the old primary once the new one connects): {e}");
            }
            println!(
                "next: ferrodisk serve --node {node} --authority ... --disk path=<replica data>/{volume}.img,socket=...,volume={volume}{}",
                if p.others.is_empty() { String::new() } else { format!(",replicas={}", p.others.join("+")) }
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(e, 1),
    }
}

fn verify(
    image: &std::path::Path,
    volume: &str,
    replicas: &str,
    link: &LinkArgs,
    chunk_kib: u32,
) -> ExitCode {
    let key = match required_auth(link) {
        Ok(a) => a,
        Err(code) => return code,
    };
    if chunk_kib == 0 || chunk_kib > 4096 {
        return fail("--chunk-kib must be 1..4096", 2);
    }
    let list: Vec<String> = replicas.split('+').map(str::to_string).collect();
    match tools::verify(image, volume, &list, &key, chunk_kib << 10) {
        Ok((size, diffs)) => {
            for d in &diffs {
                println!("DIFF {} offset={} len={}", d.replica, d.offset, d.len);
            }
            println!(
                "verified {volume}: {size} bytes against {} replica(s): {} differing range(s)",
                list.len(),
                diffs.len()
            );
            if diffs.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(3)
            }
        }
        Err(e) => fail(e, 1),
    }
}

/// Socket files to remove when it goes out of scope.
struct RemoveOnExit(Vec<std::path::PathBuf>);

impl Drop for RemoveOnExit {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn serve(specs: &[String], repl: &ReplArgs, health: Option<&str>, api: &ApiArgs) -> ExitCode {
    if specs.is_empty() && api.api.is_none() {
        return fail(
            "nothing to serve: give --disk SPEC (one or more) and/or --api SOCK",
            2,
        );
    }
    let mut configs = Vec::new();
    let mut sockets = HashSet::new();
    for spec in specs {
        match DiskConfig::parse(spec) {
            Ok(c) if !sockets.insert(c.socket.clone()) => {
                return fail(
                    format!("--disk {spec}: socket {} is used twice", c.socket.display()),
                    2,
                )
            }
            Ok(c) => configs.push(c),
            Err(e) => return fail(format!("--disk {spec}: {e}"), 2),
        }
    }
    let mut disks = Vec::new();
    for c in configs {
        match Disk::open(c) {
            Ok(d) => disks.push(Arc::new(d)),
            Err(e) => return fail(chain(&e), 1),
        }
    }
    // A socket that another live process serves is refused before replication claims the
    // volume in the authority.
    for d in &disks {
        if let Err(e) = server::check_free(&d.config.socket) {
            return fail(chain(&e), 1);
        }
    }
    let repl_ctx = if disks.iter().any(|d| d.config.volume.is_some()) || api.api.is_some() {
        match repl_context(repl) {
            Ok(c) => c,
            Err((msg, code)) => return fail(msg, code),
        }
    } else {
        None
    };
    if let Err((msg, code)) = start_replication(&disks, repl_ctx.as_ref()) {
        return fail(msg, code);
    }
    // Sockets are published only now, once the authority has accepted this primary: a
    // start that is refused never shows a socket for a hypervisor to find. Those published
    // are removed however serve() returns.
    let mut published = RemoveOnExit(Vec::new());
    let mut bound = Vec::new();
    for disk in &disks {
        let socket = disk.config.socket.clone();
        match server::bind(&socket, SocketAccess::default()) {
            Ok(l) => {
                published.0.push(socket);
                bound.push((Arc::clone(disk), l));
            }
            Err(e) => return fail(chain(&e), 1),
        }
    }
    if let Some(addr) = health {
        let listener = match std::net::TcpListener::bind(addr) {
            Ok(l) => l,
            Err(e) => return fail(format!("--health {addr}: {e}"), 1),
        };
        let repls: Vec<_> = disks.iter().filter_map(|d| d.repl.get().cloned()).collect();
        let spawned = std::thread::Builder::new()
            .name("health".into())
            .spawn(move || tools::serve_health(listener, repls));
        if let Err(e) = spawned {
            return fail(format!("cannot start the health thread: {e}"), 1);
        }
    }
    let signals = [libc::SIGTERM, libc::SIGINT];
    if let Err(e) = sys::block_signals(&signals) {
        return fail(format!("cannot block signals: {e}"), 1);
    }
    let mut servers: Vec<Arc<DiskServer>> = Vec::new();
    for (disk, listener) in bound {
        tracing::info!(
            disk = %disk.config.socket.display(),
            sectors = disk.capacity_sectors(),
            queues = disk.config.queues,
            readonly = disk.config.readonly,
            "serving"
        );
        match DiskServer::start(disk, listener) {
            Ok(s) => servers.push(Arc::new(s)),
            Err(e) => return fail(format!("cannot start a disk thread: {e}"), 1),
        }
    }
    let manager = match &api.api {
        Some(sock) => {
            let key = match &api.trusted_image_key {
                Some(p) => match ferrodisk::driver::TrustedKey::from_file(p) {
                    Ok(k) => Some(k),
                    Err(e) => return fail(e, 2),
                },
                None => None,
            };
            let opts = ferrodisk::api::ManagerOptions {
                images: ferrodisk::driver::ImagePolicy {
                    key,
                    allow_unsigned: api.allow_unsigned_images,
                },
                volume_roots: api.volume_roots.clone(),
            };
            let m = match Manager::open(&api.state, opts, repl_ctx) {
                Ok(m) => m,
                Err(e) => return fail(e, 1),
            };
            for s in &servers {
                m.add_static(Arc::clone(s));
            }
            let access = SocketAccess {
                mode: match u32::from_str_radix(&api.api_mode, 8) {
                    Ok(m) if m <= 0o777 => m,
                    _ => return fail(format!("--api-mode {}: not an octal mode", api.api_mode), 2),
                },
                uid: api.api_uid,
                gid: api.api_gid,
            };
            let metrics = match &api.metrics {
                Some(addr) => match std::net::TcpListener::bind(addr) {
                    Ok(l) => Some(l),
                    Err(e) => return fail(format!("--metrics {addr}: {e}"), 1),
                },
                None => None,
            };
            if let Err(e) = ferrodisk::api::http::spawn(Arc::clone(&m), sock, access, metrics) {
                return fail(e, 1);
            }
            published.0.push(sock.clone());
            tracing::info!(api = %sock.display(), state = %api.state.display(), "management API ready");
            Some(m)
        }
        None => None,
    };
    let sig = match sys::wait_signal(&signals) {
        Ok(s) => s,
        Err(e) => return fail(format!("cannot wait for signals: {e}"), 1),
    };
    tracing::info!(signal = sig, "shutting down: draining and flushing");
    let mut ok = true;
    let all = match &manager {
        Some(m) => m.stop_all(),
        None => {
            for s in &servers {
                s.stop();
            }
            servers
        }
    };
    for s in &all {
        if let Err(e) = s.disk.sync() {
            tracing::error!(disk = %s.disk.config.socket.display(), "flush failed: {e}");
            ok = false;
        }
        // Replication stops either way; its last checkpoint syncs again and, if that
        // fails too, leaves the activity log for the next start to reconcile.
        if let Some(r) = s.disk.repl.get() {
            r.shutdown();
        }
        println!(
            "{{\"disk\":\"{}\",\"stats\":{}}}",
            s.disk.config.socket.display(),
            s.disk.stats.to_json()
        );
        let _ = std::fs::remove_file(&s.disk.config.socket);
    }
    if let Some(sock) = &api.api {
        let _ = std::fs::remove_file(sock);
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
