//! Fuzzes the management API's request bodies: the JSON the HTTP handlers deserialize, and
//! the `Manager` calls that validate and apply them (no HTTP server, no socket listener of
//! our own: the handler's body type and its `Manager` method, as `api::http` calls them).
//!
//! The first input byte picks the body; the rest is its JSON:
//! - 0: `CreateVolume` (`POST /v1/volumes`), then the volume is deleted again;
//! - 1: `Attach` (`POST /v1/attachments`) to the volume `v`, then detached again;
//! - 2: `{"size": ...}` (`POST /v1/volumes/r/resize`) on a fresh volume `r`;
//! - 3: `AttachOptions` alone (deserialize, serialize, deserialize: the same value).
//!
//! The state directory is on tmpfs. Paths in bodies are redirected into it where the call
//! would create something (a new volume file, a socket); an existing `path` is only looked
//! at. Oracles: no panic; a body that deserializes serializes back to the same value; a
//! created volume has a valid name and a non-zero size that is a multiple of 512; a refusal
//! is a 4xx (a 5xx is the daemon's own failure, never the body's fault).
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};

use ferrodisk::api::{ApiError, Attach, AttachOptions, CreateVolume, Manager, ManagerOptions};
use libfuzzer_sys::fuzz_target;

struct World {
    dir: PathBuf,
    manager: Arc<Manager>,
}

/// Removes state directories left by fuzz processes that are gone.
fn sweep(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name.strip_prefix("ferrodisk-fuzz-api-") {
            if !Path::new("/proc").join(pid).exists() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        sweep(&base);
        let dir = base.join(format!("ferrodisk-fuzz-api-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("new")).unwrap();
        // Bodies may name files under `new/`, a volume root; any other path is refused.
        let opts = ManagerOptions {
            volume_roots: vec![dir.join("new")],
            ..ManagerOptions::default()
        };
        let manager = Manager::open(&dir.join("state"), opts, None).expect("manager");
        manager
            .create_volume(CreateVolume {
                name: "v".into(),
                size: Some("1M".into()),
                ..Default::default()
            })
            .expect("volume v");
        World { dir, manager }
    })
}

/// A refusal of a body is the client's fault (4xx); the daemon's own failures are 5xx.
fn check_refusal(what: &str, e: &ApiError) {
    assert!(
        (400..500).contains(&e.status),
        "{what}: a body was refused with {}: {}",
        e.status,
        e.message
    );
}

fn roundtrip<T: serde::Serialize + serde::de::DeserializeOwned>(v: &T) {
    let a = serde_json::to_value(v).expect("serialize");
    let back: T = serde_json::from_value(a.clone()).expect("what we serialize deserializes");
    assert_eq!(serde_json::to_value(&back).unwrap(), a);
}

fn create(w: &World, body: &[u8]) {
    let Ok(mut req) = serde_json::from_slice::<CreateVolume>(body) else {
        return;
    };
    roundtrip(&req);
    if req.size.is_some() && req.path.is_some() {
        // It would create this file: create it in the state directory instead.
        req.path = Some(w.dir.join("new").join("file.img"));
    }
    let name = req.name.clone();
    match w.manager.create_volume(req) {
        Ok(v) => {
            assert_eq!(v.name, name);
            assert!(ferrodisk::config::valid_name(&v.name));
            assert!(
                v.size > 0 && v.size % 512 == 0,
                "volume of {} bytes",
                v.size
            );
            if name != "v" {
                w.manager
                    .delete_volume(&name)
                    .expect("delete what was created");
            }
        }
        Err(e) => check_refusal("create", &e),
    }
}

/// Attaches served for real per process. Each one leaks an eventfd per queue (a known bug:
/// docs/fuzzing.md), so after these the socket goes in a directory that does not exist:
/// every check still runs and the attach fails at the very end (bind, a 409).
const SERVED_ATTACHES: u32 = 128;

fn attach(w: &World, body: &[u8]) {
    static SERVED: AtomicU32 = AtomicU32::new(0);
    let Ok(mut req) = serde_json::from_slice::<Attach>(body) else {
        return;
    };
    roundtrip(&req);
    if req.socket.is_absolute() {
        req.socket = if SERVED.fetch_add(1, Ordering::Relaxed) < SERVED_ATTACHES {
            w.dir.join("s.sock")
        } else {
            w.dir.join("no-such-dir").join("s.sock")
        };
    }
    match w.manager.attach(req) {
        Ok(a) => w.manager.detach(&a.id).expect("detach what was attached"),
        Err(e) => check_refusal("attach", &e),
    }
}

fn resize(w: &World, body: &[u8]) {
    #[derive(serde::Deserialize)]
    struct Resize {
        size: String,
    }
    let Ok(req) = serde_json::from_slice::<Resize>(body) else {
        return;
    };
    w.manager
        .create_volume(CreateVolume {
            name: "r".into(),
            size: Some("512".into()),
            ..Default::default()
        })
        .expect("volume r");
    if let Err(e) = w.manager.resize_volume("r", &req.size) {
        check_refusal("resize", &e);
    }
    w.manager.delete_volume("r").expect("delete r");
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let w = world();
    match which % 4 {
        0 => create(w, body),
        1 => attach(w, body),
        2 => resize(w, body),
        _ => {
            if let Ok(o) = serde_json::from_slice::<AttachOptions>(body) {
                let back: AttachOptions =
                    serde_json::from_value(serde_json::to_value(&o).unwrap()).unwrap();
                assert_eq!(back, o);
            }
        }
    }
});
