//! The client subcommands: they call the daemon's API and print tables (or `--json`).

use std::path::PathBuf;
use std::process::ExitCode;

use ferrodisk::api::client::{request, Response};
use serde_json::{json, Value};

/// The sandbox of the threads that handle guest requests and replication frames.
#[derive(clap::Args)]
pub struct SeccompArgs {
    /// Seccomp filter on the queue workers and the replica server's connection threads:
    /// `trap` refuses a system call outside their allow-list and exits naming it (159),
    /// `kill` has the kernel kill the process silently, `log` allows it and has the kernel
    /// log it (audit), `off` installs no filter. See docs/architecture.md, "Sandboxing".
    #[arg(
        long,
        value_enum,
        value_name = "MODE",
        env = "FERRODISK_SECCOMP",
        default_value = "trap"
    )]
    pub seccomp: ferrodisk::seccomp::Mode,
}

#[derive(clap::Args)]
pub struct ApiSocket {
    /// The daemon's API socket.
    #[arg(long, env = "FERRODISK_API", default_value = "/run/ferrodisk/api.sock")]
    pub api: PathBuf,
}

#[derive(clap::Subcommand)]
pub enum VolumeCmd {
    /// Create a volume: a new file of --size, or an existing file or block device (--path).
    Create {
        name: String,
        #[arg(long)]
        size: Option<String>,
        #[arg(long)]
        path: Option<PathBuf>,
        /// An instance allowed to attach it (repeat; default: any).
        #[arg(long = "allow", value_name = "INSTANCE")]
        allow: Vec<String>,
        /// A replica server, HOST:PORT (repeat): the volume is replicated while attached.
        #[arg(long = "replica", value_name = "HOST:PORT")]
        replicas: Vec<String>,
        /// Declare a replica failed after this many ms without an answer [default: 5000].
        #[arg(long, value_name = "MS")]
        replica_timeout_ms: Option<u32>,
        /// Resync bandwidth limit per replica, MiB/s, 0 unlimited [default: 200].
        #[arg(long, value_name = "MIBS")]
        resync_mbps: Option<u32>,
        #[arg(long)]
        json: bool,
    },
    /// List volumes.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Grow a volume; attached guests see the new size at once.
    Resize {
        name: String,
        #[arg(long)]
        size: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete a volume (it must not be attached).
    Delete {
        name: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
pub struct AttachArgs {
    #[command(flatten)]
    pub api: ApiSocket,
    #[arg(long)]
    pub volume: String,
    #[arg(long)]
    pub instance: String,
    /// Instance context, KEY=VALUE (repeat), e.g. --context instance-type=m5.large --context os=linux.
    #[arg(long = "context", value_name = "KEY=VALUE")]
    pub context: Vec<String>,
    /// The vhost-user socket to serve the disk on.
    #[arg(long)]
    pub socket: PathBuf,
    #[arg(long)]
    pub queues: Option<u16>,
    #[arg(long)]
    pub queue_size: Option<u16>,
    #[arg(long)]
    pub readonly: bool,
    #[arg(long)]
    pub serial: Option<String>,
    /// Mode of the socket (octal, default 600).
    #[arg(long)]
    pub socket_mode: Option<String>,
    #[arg(long)]
    pub socket_uid: Option<u32>,
    #[arg(long)]
    pub socket_gid: Option<u32>,
    /// Allow the volume to be attached to several instances at once.
    #[arg(long)]
    pub multi_attach: bool,
    /// JSON config for the driver image the context selects (e.g. '{"key":"..."}').
    #[arg(long)]
    pub driver_config: Option<String>,
    #[arg(long)]
    pub json: bool,
}

/// Prints the response (JSON or `human`), or the error; the exit code follows the status.
fn finish(r: Result<Response, String>, json: bool, human: impl FnOnce(&Value)) -> ExitCode {
    match r {
        Err(e) => {
            eprintln!("ferrodisk: {e}");
            ExitCode::from(1)
        }
        Ok(r) if r.status >= 400 => {
            if json {
                println!("{}", r.body);
            }
            eprintln!("ferrodisk: {} (HTTP {})", r.error(), r.status);
            ExitCode::from(if r.status < 500 { 2 } else { 1 })
        }
        Ok(r) => {
            let v = r.json();
            if json {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or(r.body));
            } else {
                human(&v);
            }
            ExitCode::SUCCESS
        }
    }
}

/// Prints rows as an aligned table.
fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

fn human_size(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 && (v / 1024.0).fract() == 0.0 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v}{}", UNITS[u])
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

pub fn volume(api: &ApiSocket, cmd: VolumeCmd) -> ExitCode {
    match cmd {
        VolumeCmd::Create {
            name,
            size,
            path,
            allow,
            replicas,
            replica_timeout_ms,
            resync_mbps,
            json,
        } => {
            let mut body = json!({ "name": name, "size": size, "path": path,
                                   "allowed_instances": allow, "replicas": replicas });
            // Only when given: a daemon from before these keys refuses unknown ones.
            if let Some(t) = replica_timeout_ms {
                body["replica_timeout_ms"] = json!(t);
            }
            if let Some(r) = resync_mbps {
                body["resync_mbps"] = json!(r);
            }
            let r = request(&api.api, "POST", "/v1/volumes", Some(&body));
            finish(r, json, |v| {
                println!(
                    "volume {} created: {} at {}",
                    s(&v["name"]),
                    human_size(v["size"].as_u64().unwrap_or(0)),
                    s(&v["path"])
                )
            })
        }
        VolumeCmd::List { json } => {
            let r = request(&api.api, "GET", "/v1/volumes", None);
            finish(r, json, |v| {
                let rows = v
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|x| {
                        let atts: Vec<String> = x["attachments"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(s)
                            .collect();
                        let allowed: Vec<String> = x["allowed_instances"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(s)
                            .collect();
                        vec![
                            s(&x["name"]),
                            human_size(x["size"].as_u64().unwrap_or(0)),
                            s(&x["path"]),
                            if allowed.is_empty() {
                                "any".into()
                            } else {
                                allowed.join(",")
                            },
                            if atts.is_empty() {
                                "-".into()
                            } else {
                                atts.join(",")
                            },
                            {
                                let r: Vec<String> = x["replicas"]
                                    .as_array()
                                    .into_iter()
                                    .flatten()
                                    .map(s)
                                    .collect();
                                if r.is_empty() {
                                    "-".into()
                                } else {
                                    r.join(",")
                                }
                            },
                        ]
                    })
                    .collect();
                table(
                    &["NAME", "SIZE", "PATH", "ALLOWED", "ATTACHED", "REPLICAS"],
                    rows,
                );
            })
        }
        VolumeCmd::Resize { name, size, json } => {
            let r = request(
                &api.api,
                "POST",
                &format!("/v1/volumes/{name}/resize"),
                Some(&json!({ "size": size })),
            );
            finish(r, json, |v| {
                println!(
                    "volume {} is now {}",
                    s(&v["name"]),
                    human_size(v["size"].as_u64().unwrap_or(0))
                )
            })
        }
        VolumeCmd::Delete { name, json } => {
            let r = request(&api.api, "DELETE", &format!("/v1/volumes/{name}"), None);
            finish(r, json, |_| println!("volume {name} deleted"))
        }
    }
}

pub fn attach(a: &AttachArgs) -> ExitCode {
    let mut context = serde_json::Map::new();
    for kv in &a.context {
        let Some((k, v)) = kv.split_once('=') else {
            eprintln!("ferrodisk: --context {kv}: expected KEY=VALUE");
            return ExitCode::from(2);
        };
        context.insert(k.to_string(), Value::String(v.to_string()));
    }
    let driver_config: Value = match a
        .driver_config
        .as_deref()
        .map(serde_json::from_str)
        .transpose()
    {
        Ok(c) => c.unwrap_or(Value::Null),
        Err(e) => {
            eprintln!("ferrodisk: --driver-config: {e}");
            return ExitCode::from(2);
        }
    };
    let body = json!({
        "driver_config": driver_config,
        "volume": a.volume,
        "instance": a.instance,
        "context": context,
        "socket": a.socket,
        "multi_attach": a.multi_attach,
        "options": {
            "queues": a.queues,
            "queue_size": a.queue_size,
            "readonly": a.readonly,
            "serial": a.serial,
            "socket_mode": a.socket_mode,
            "socket_uid": a.socket_uid,
            "socket_gid": a.socket_gid,
        },
    });
    let r = request(&a.api.api, "POST", "/v1/attachments", Some(&body));
    finish(r, a.json, |v| {
        let image = if v["image"].is_null() {
            String::new()
        } else {
            format!(
                " with image {} {}",
                s(&v["image"]["name"]),
                s(&v["image"]["version"])
            )
        };
        println!("attached {} on {}{image}", s(&v["id"]), s(&v["socket"]))
    })
}

#[derive(clap::Subcommand)]
pub enum ImageCmd {
    /// Verify an image directory (manifest.json, module, manifest.sig) and store it.
    Add {
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// List stored images and the attachments using each.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove a stored image version (it must not be in use).
    Remove {
        name: String,
        version: String,
        #[arg(long)]
        json: bool,
    },
    /// Build an image directory from a module (local; no daemon needed).
    Pack {
        /// The shared object (e.g. target/release/libferrodisk_driver_crypt.so).
        #[arg(long)]
        module: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        version: String,
        /// A rule: KEY=VALUE[,KEY=VALUE...] that the instance context must all have
        /// (VALUE `*`: any value). Repeat for alternatives.
        #[arg(long = "rule")]
        rules: Vec<String>,
        /// Use this image when no image's rules match.
        #[arg(long)]
        default: bool,
        /// JSON config passed to the image (`config_json.image`).
        #[arg(long)]
        config: Option<String>,
        /// Sign with this ed25519 secret key (from `ferrodisk image keygen`).
        #[arg(long)]
        sign: Option<PathBuf>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Create an ed25519 signing key (FILE) and its public key (FILE.pub).
    Keygen { out: PathBuf },
}

#[derive(clap::Subcommand)]
pub enum AttachmentCmd {
    /// Wait until every replica of the attachment is in sync, showing resync progress.
    Wait {
        id: String,
        /// Give up after this many seconds (exit 3); 0 waits for ever.
        #[arg(long, default_value_t = 0)]
        timeout: u64,
        #[arg(long)]
        json: bool,
    },
    /// Switch a running attachment to the newest image its context selects, at a quiesce
    /// point (in-flight requests drained, none lost).
    Upgrade {
        id: String,
        #[arg(long)]
        json: bool,
    },
}

pub fn image(api: &ApiSocket, cmd: ImageCmd) -> ExitCode {
    match cmd {
        ImageCmd::Add { dir, json } => {
            let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
            let r = request(
                &api.api,
                "POST",
                "/v1/images",
                Some(&json!({ "path": dir })),
            );
            finish(r, json, |v| {
                println!(
                    "image {} {} added ({}signed)",
                    s(&v["name"]),
                    s(&v["version"]),
                    if v["signed"] == true { "" } else { "not " }
                )
            })
        }
        ImageCmd::List { json } => {
            let r = request(&api.api, "GET", "/v1/images", None);
            finish(r, json, |v| {
                let rows = v
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|i| {
                        let users: Vec<String> = i["in_use_by"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(s)
                            .collect();
                        vec![
                            s(&i["name"]),
                            s(&i["version"]),
                            s(&i["abi"]),
                            if i["signed"] == true {
                                "yes".into()
                            } else {
                                "no".into()
                            },
                            i["rules"].to_string(),
                            if i["default"] == true {
                                "yes".into()
                            } else {
                                "-".into()
                            },
                            if users.is_empty() {
                                "-".into()
                            } else {
                                users.join(",")
                            },
                        ]
                    })
                    .collect();
                table(
                    &[
                        "NAME",
                        "VERSION",
                        "ABI",
                        "SIGNED",
                        "RULES",
                        "DEFAULT",
                        "IN USE BY",
                    ],
                    rows,
                );
            })
        }
        ImageCmd::Remove {
            name,
            version,
            json,
        } => {
            let r = request(
                &api.api,
                "DELETE",
                &format!("/v1/images/{name}/{version}"),
                None,
            );
            finish(r, json, |_| println!("image {name} {version} removed"))
        }
        ImageCmd::Pack {
            module,
            name,
            version,
            rules,
            default,
            config,
            sign,
            out,
        } => {
            let mut parsed = Vec::new();
            for r in &rules {
                let mut m = std::collections::BTreeMap::new();
                for kv in r.split(',') {
                    let Some((k, v)) = kv.split_once('=') else {
                        eprintln!("ferrodisk: --rule {r}: expected KEY=VALUE[,KEY=VALUE...]");
                        return ExitCode::from(2);
                    };
                    m.insert(k.to_string(), v.to_string());
                }
                parsed.push(m);
            }
            let config = match config.as_deref().map(serde_json::from_str).transpose() {
                Ok(c) => c.unwrap_or(Value::Null),
                Err(e) => {
                    eprintln!("ferrodisk: --config: {e}");
                    return ExitCode::from(2);
                }
            };
            let manifest = ferrodisk::driver::Manifest {
                name: name.clone(),
                version: version.clone(),
                abi: ferrodisk::driver::abi::ABI_VERSION,
                module: String::new(),
                sha256: String::new(),
                rules: parsed,
                default,
                config,
            };
            match ferrodisk::driver::pack(&module, manifest, &out, sign.as_deref()) {
                Ok(()) => {
                    println!(
                        "packed {name} {version} into {}{}",
                        out.display(),
                        if sign.is_some() { " (signed)" } else { "" }
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("ferrodisk: {e}");
                    ExitCode::from(1)
                }
            }
        }
        ImageCmd::Keygen { out } => match ferrodisk::driver::keygen(&out) {
            Ok(public) => {
                println!("secret key: {} (keep it private)", out.display());
                println!("public key: {}.pub = {public}", out.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ferrodisk: {e}");
                ExitCode::from(1)
            }
        },
    }
}

pub fn attachment(api: &ApiSocket, cmd: AttachmentCmd) -> ExitCode {
    match cmd {
        AttachmentCmd::Wait { id, timeout, json } => wait_in_sync(api, &id, timeout, json),
        AttachmentCmd::Upgrade { id, json } => {
            let r = request(
                &api.api,
                "POST",
                &format!("/v1/attachments/{id}/upgrade"),
                None,
            );
            finish(r, json, |v| {
                let name = |x: &Value| {
                    if x.is_null() {
                        "no image".to_string()
                    } else {
                        format!("{} {}", s(&x["name"]), s(&x["version"]))
                    }
                };
                if v["changed"] == true {
                    println!("{id}: {} → {}", name(&v["from"]), name(&v["to"]));
                } else {
                    println!("{id}: already on {}", name(&v["to"]))
                }
            })
        }
    }
}

/// Polls the attachment's stats until every replica is in sync. Progress goes to stderr:
/// rewritten in place on a terminal, otherwise a line whenever a replica's state changes or
/// its resync passes another 10 %. Exit codes: 0 in sync (or not replicated), 1 fenced or
/// the API failed, 2 no such attachment, 3 timed out.
pub fn wait_in_sync(api: &ApiSocket, id: &str, timeout_s: u64, json: bool) -> ExitCode {
    use std::io::{IsTerminal, Write};
    let start = std::time::Instant::now();
    let tty = std::io::stderr().is_terminal();
    let mut last_line = String::new();
    let mut shown = std::collections::HashMap::<String, (String, i64)>::new();
    loop {
        let r = match request(&api.api, "GET", &format!("/v1/stats/{id}"), None) {
            Ok(r) if r.status < 400 => r,
            other => return finish(other, json, |_| {}),
        };
        let v = r.json();
        let repl = v[0]["replication"].clone();
        let pending_line = tty && !last_line.is_empty();
        let done = |code: u8, msg: String| {
            if pending_line {
                eprintln!();
            }
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&repl).unwrap_or_default()
                );
            } else {
                println!("{msg}");
            }
            ExitCode::from(code)
        };
        if repl.is_null() {
            return done(0, format!("{id}: not replicated"));
        }
        if repl["status"] == "fenced" {
            return done(1, format!("{id}: fenced: {}", s(&repl["fence_reason"])));
        }
        let reps = repl["replicas"].as_array().cloned().unwrap_or_default();
        if reps.iter().all(|r| r["state"] == "in-sync") {
            return done(0, format!("{id}: {} replica(s) in sync", reps.len()));
        }
        let parts: Vec<String> = reps
            .iter()
            .map(|r| {
                let (addr, state) = (s(&r["addr"]), s(&r["state"]));
                let pct = r["resync_progress"].as_f64().map(|p| p * 100.0);
                if !tty {
                    let decile = pct.map_or(-1, |p| (p / 10.0) as i64);
                    let now = (state.clone(), decile);
                    if shown.get(&addr) != Some(&now) {
                        match pct {
                            Some(p) => eprintln!(
                                "{addr}: {state} {p:.0}% ({} copied)",
                                human_size(r["copied_bytes"].as_u64().unwrap_or(0))
                            ),
                            None => eprintln!("{addr}: {state}"),
                        }
                        shown.insert(addr.clone(), now);
                    }
                }
                match pct {
                    Some(p) => format!("{addr} {state} {p:.1}%"),
                    None => format!("{addr} {state}"),
                }
            })
            .collect();
        if tty {
            let line = parts.join("  ");
            eprint!("\r{line:<width$}", width = last_line.len());
            let _ = std::io::stderr().flush();
            last_line = line;
        }
        if timeout_s > 0 && start.elapsed().as_secs() >= timeout_s {
            return done(3, format!("{id}: not in sync after {timeout_s} s"));
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}

pub fn detach(api: &ApiSocket, id: &str, json: bool) -> ExitCode {
    let r = request(&api.api, "DELETE", &format!("/v1/attachments/{id}"), None);
    finish(r, json, |_| println!("detached {id}"))
}

pub fn stats(api: &ApiSocket, id: Option<&str>, json: bool) -> ExitCode {
    let path = match id {
        Some(i) => format!("/v1/stats/{i}"),
        None => "/v1/stats".to_string(),
    };
    let r = request(&api.api, "GET", &path, None);
    finish(r, json, |v| {
        let rows = v
            .as_array()
            .into_iter()
            .flatten()
            .map(|d| {
                let t = &d["stats"]["totals"];
                let lat = &d["latency"]["ops"];
                let p = |op: &str, q: &str| {
                    lat[op][q]
                        .as_f64()
                        .map(|x| format!("{x:.0}"))
                        .unwrap_or_else(|| "-".into())
                };
                let repl = &d["replication"];
                let repl_s = if repl.is_null() {
                    "-".to_string()
                } else {
                    let reps: Vec<String> = repl["replicas"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|r| match r["resync_progress"].as_f64() {
                            Some(p) => {
                                format!("{}:{} {:.0}%", s(&r["addr"]), s(&r["state"]), p * 100.0)
                            }
                            None => format!("{}:{}", s(&r["addr"]), s(&r["state"])),
                        })
                        .collect();
                    format!(
                        "{} e{} [{}]",
                        s(&repl["status"]),
                        s(&repl["epoch"]),
                        reps.join(" ")
                    )
                };
                vec![
                    d["attachment"].as_str().unwrap_or("(--disk)").to_string(),
                    s(&d["socket"]),
                    human_size(d["size"].as_u64().unwrap_or(0)),
                    s(&t["reads"]),
                    s(&t["writes"]),
                    s(&t["flushes"]),
                    s(&t["read_bytes"]),
                    s(&t["write_bytes"]),
                    format!("{}/{}", s(&t["errors_ioerr"]), s(&t["errors_unsupp"])),
                    format!("{}/{}", p("read", "p50_us"), p("read", "p99_us")),
                    format!("{}/{}", p("write", "p50_us"), p("write", "p99_us")),
                    match &d["driver"] {
                        Value::Null => "-".to_string(),
                        drv => format!(
                            "{} {} ({})",
                            s(&drv["image"]),
                            s(&drv["version"]),
                            s(&drv["state"])
                        ),
                    },
                    repl_s,
                ]
            })
            .collect();
        table(
            &[
                "ATTACHMENT",
                "SOCKET",
                "SIZE",
                "READS",
                "WRITES",
                "FLUSHES",
                "READ_B",
                "WRITE_B",
                "ERR(IO/UNSUP)",
                "READ_P50/P99_US",
                "WRITE_P50/P99_US",
                "IMAGE",
                "REPLICATION",
            ],
            rows,
        );
    })
}
