//! The `ferrodisk` command line.

use std::collections::HashSet;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use ferrodisk::config::DiskConfig;
use ferrodisk::disk::Disk;
use ferrodisk::server::{self, DiskServer};
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
        #[arg(long = "disk", required = true, value_name = "SPEC")]
        disks: Vec<String>,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRODISK_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { disks } => serve(&disks),
    }
}

fn fail(msg: impl std::fmt::Display, code: u8) -> ExitCode {
    eprintln!("ferrodisk: {msg}");
    ExitCode::from(code)
}

/// Formats an error with its chain of sources.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}

fn serve(specs: &[String]) -> ExitCode {
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
    let mut bound = Vec::new();
    for c in configs {
        let socket = c.socket.clone();
        let disk = match Disk::open(c) {
            Ok(d) => Arc::new(d),
            Err(e) => return fail(chain(&e), 1),
        };
        match server::bind(&socket) {
            Ok(l) => bound.push((disk, l)),
            Err(e) => return fail(chain(&e), 1),
        }
    }
    let signals = [libc::SIGTERM, libc::SIGINT];
    if let Err(e) = sys::block_signals(&signals) {
        return fail(format!("cannot block signals: {e}"), 1);
    }
    let mut servers = Vec::new();
    for (disk, listener) in bound {
        tracing::info!(
            disk = %disk.config.socket.display(),
            sectors = disk.capacity_sectors,
            queues = disk.config.queues,
            readonly = disk.config.readonly,
            "serving"
        );
        match DiskServer::start(disk, listener) {
            Ok(s) => servers.push(s),
            Err(e) => return fail(format!("cannot start a disk thread: {e}"), 1),
        }
    }
    let sig = match sys::wait_signal(&signals) {
        Ok(s) => s,
        Err(e) => return fail(format!("cannot wait for signals: {e}"), 1),
    };
    tracing::info!(signal = sig, "shutting down: draining and flushing");
    let mut ok = true;
    for s in &servers {
        s.stop();
        if let Err(e) = s.disk.sync() {
            tracing::error!(disk = %s.disk.config.socket.display(), "flush failed: {e}");
            ok = false;
        }
        println!(
            "{{\"disk\":\"{}\",\"stats\":{}}}",
            s.disk.config.socket.display(),
            s.disk.stats.to_json()
        );
        let _ = std::fs::remove_file(&s.disk.config.socket);
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
