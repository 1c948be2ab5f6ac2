//! Driver images through the API (issue #8): selection by instance context, verification
//! (checksum, signature, symbols, ABI), init failures, runtime failures, and hot update.
//!
//! Most images here are tiny C modules compiled by the test with `cc` (the ABI is C, and a
//! broken module — a missing symbol, another ABI version — is easiest to make in C). The
//! real images (`drivers/qos`, `drivers/crypt`, `drivers/faulty`) have their own tests and
//! VM tests.

mod common;
#[path = "common/raw_guest.rs"]
mod raw_guest;

use std::path::{Path, PathBuf};
use std::process::Command;

use blkio::ReqFlags;
use common::api_daemon::ApiDaemon;
use common::{Client, BIN};
use serde_json::{json, Value};

/// Most tests here add unsigned images: the daemon must be told to accept them.
const UNSIGNED: &[&str] = &["--allow-unsigned-images"];

/// What a test C module does.
#[derive(Clone, Copy, Default)]
struct CModule<'a> {
    name: &'a str,
    version: &'a str,
    abi: u32,
    /// Leave `ferrodisk_driver_fini` out.
    no_fini: bool,
    /// Writes: 0 pass, 1 FAIL verdict, -1 internal error.
    on_write: i32,
    /// A constructor creates this file when the module is loaded: proof that its code ran.
    marker: Option<&'a Path>,
    /// Ask for write data (a bounce buffer per write) and store it unchanged.
    bounce: bool,
}

/// The C source of the test images (parameters as `-D` macros).
const C_TEMPLATE: &str = include_str!("data/passthrough_driver.c");

fn compile(dir: &Path, m: CModule<'_>) -> PathBuf {
    let src = dir.join(format!("{}-{}.c", m.name, m.version));
    std::fs::write(&src, C_TEMPLATE).unwrap();
    let so = dir.join(format!("lib{}-{}.so", m.name, m.version));
    let mut cmd = Command::new("cc");
    cmd.args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(&so)
        .arg(&src)
        .arg(format!("-DNAME=\"{}\"", m.name))
        .arg(format!("-DVERSION=\"{}\"", m.version))
        .arg(format!("-DABI={}", m.abi))
        .arg(format!("-DON_WRITE={}", m.on_write));
    if m.no_fini {
        cmd.arg("-DNO_FINI");
    }
    if m.bounce {
        cmd.arg("-DBOUNCE");
    }
    if let Some(marker) = m.marker {
        cmd.arg(format!("-DMARKER=\"{}\"", marker.display()));
    }
    let out = cmd
        .output()
        .expect("`cc` is needed to build test images: install Debian's gcc");
    assert!(
        out.status.success(),
        "cc: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    so
}

fn module(name: &str, version: &str) -> CModule<'static> {
    CModule {
        name: Box::leak(name.to_string().into_boxed_str()),
        version: Box::leak(version.to_string().into_boxed_str()),
        abi: 1,
        ..CModule::default()
    }
}

/// `ferrodisk image pack` into `<dir>/img-<name>-<version>`; returns the image directory.
fn pack(dir: &Path, so: &Path, name: &str, version: &str, extra: &[&str]) -> PathBuf {
    let out = dir.join(format!("img-{name}-{version}"));
    let o = Command::new(BIN)
        .args(["image", "pack", "--module"])
        .arg(so)
        .args(["--name", name, "--version", version, "--out"])
        .arg(&out)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "pack: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

fn add(d: &ApiDaemon, img: &Path) -> (u16, Value) {
    d.call("POST", "/v1/images", Some(json!({ "path": img })))
}

fn volume(d: &ApiDaemon, name: &str) {
    let (s, v) = d.call(
        "POST",
        "/v1/volumes",
        Some(json!({"name": name, "size": "8M"})),
    );
    assert_eq!(s, 201, "{v}");
}

fn attach(
    d: &ApiDaemon,
    dir: &Path,
    vol: &str,
    inst: &str,
    ctx: Value,
    cfg: Value,
) -> (u16, Value) {
    d.call(
        "POST",
        "/v1/attachments",
        Some(
            json!({"volume": vol, "instance": inst, "context": ctx, "driver_config": cfg,
                    "socket": dir.join(format!("{vol}-{inst}.sock")), "multi_attach": true}),
        ),
    )
}

fn image_of(d: &ApiDaemon, id: &str) -> (String, String, String) {
    let (_, st) = d.call("GET", &format!("/v1/stats/{id}"), None);
    let drv = &st[0]["driver"];
    (
        drv["image"].as_str().unwrap_or("-").to_string(),
        drv["version"].as_str().unwrap_or("-").to_string(),
        drv["state"].as_str().unwrap_or("-").to_string(),
    )
}

#[test]
fn the_newest_matching_image_is_chosen_with_a_default() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let d = ApiDaemon::start(p, UNSIGNED);
    let linux1 = compile(p, module("linux", "1.0.0"));
    let linux2 = compile(p, module("linux", "1.10.0"));
    let big = compile(p, module("big", "3.0.0"));
    let base = compile(p, module("base", "1.0.0"));
    for (so, name, ver, rule) in [
        (&linux1, "linux", "1.0.0", "os=linux"),
        (&linux2, "linux", "1.10.0", "os=linux"),
        (&big, "big", "3.0.0", "instance-type=m5.24xlarge,os=*"),
    ] {
        let (s, v) = add(&d, &pack(p, so, name, ver, &["--rule", rule]));
        assert_eq!(s, 201, "{v}");
    }
    let (s, v) = add(&d, &pack(p, &base, "base", "1.0.0", &["--default"]));
    assert_eq!(s, 201, "{v}");
    volume(&d, "v");
    let cases = [
        ("a", json!({"os": "linux"}), ("linux", "1.10.0")),
        (
            "b",
            json!({"os": "linux", "instance-type": "m5.24xlarge"}),
            ("big", "3.0.0"),
        ),
        ("c", json!({"os": "windows"}), ("base", "1.0.0")),
        (
            "e",
            json!({"instance-type": "m5.24xlarge"}),
            ("base", "1.0.0"),
        ),
    ];
    for (inst, ctx, (name, ver)) in cases {
        let (s, v) = attach(&d, p, "v", inst, ctx.clone(), json!({}));
        assert_eq!(s, 201, "{v}");
        assert_eq!(v["image"]["name"], name, "context {ctx}");
        assert_eq!(
            v["image"]["version"], ver,
            "context {ctx}: 1.10.0 is newer than 1.9"
        );
        let (n, ver2, state) = image_of(&d, &format!("v@{inst}"));
        assert_eq!(
            (n.as_str(), ver2.as_str(), state.as_str()),
            (name, ver, "ok")
        );
    }
    let (rc, out, _) = d.cli(&["image", "list"]);
    assert_eq!(rc, 0);
    assert!(out.contains("v@a") && out.contains("1.10.0"), "{out}");
    // An image in use cannot be removed; an unused one can.
    let (s, _) = d.call("DELETE", "/v1/images/base/1.0.0", None);
    assert_eq!(s, 409);
    let (s, _) = d.call("DELETE", "/v1/images/linux/1.0.0", None);
    assert_eq!(s, 200);
}

#[test]
fn bad_images_are_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let d = ApiDaemon::start(p, UNSIGNED);
    // Checksum mismatch: the module changed after packing.
    let img = pack(
        p,
        &compile(p, module("sum", "1.0.0")),
        "sum",
        "1.0.0",
        &["--default"],
    );
    let so = std::fs::read_dir(&img)
        .unwrap()
        .flatten()
        .find(|e| e.path().extension().is_some_and(|x| x == "so"))
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&so).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 0xff;
    std::fs::write(&so, bytes).unwrap();
    let (s, v) = add(&d, &img);
    assert_eq!(s, 400);
    assert!(
        v["error"].as_str().unwrap().contains("checksum mismatch"),
        "{v}"
    );
    // Missing symbol.
    let m = CModule {
        no_fini: true,
        ..module("nofini", "1.0.0")
    };
    let (s, v) = add(&d, &pack(p, &compile(p, m), "nofini", "1.0.0", &[]));
    assert_eq!(s, 400);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("lacks the symbol `ferrodisk_driver_fini`"),
        "{v}"
    );
    // ABI mismatch in the module (the manifest claims 1).
    let m = CModule {
        abi: 2,
        ..module("abi2", "1.0.0")
    };
    let (s, v) = add(&d, &pack(p, &compile(p, m), "abi2", "1.0.0", &[]));
    assert_eq!(s, 400);
    assert!(v["error"].as_str().unwrap().contains("ABI mismatch"), "{v}");
    // Not a shared object at all.
    let junk = p.join("junk.so");
    std::fs::write(&junk, b"not an ELF file").unwrap();
    let (s, v) = add(&d, &pack(p, &junk, "junk", "1.0.0", &[]));
    assert_eq!(s, 400);
    assert!(v["error"].as_str().unwrap().contains("cannot load"), "{v}");
    // A manifest for another ABI.
    let img = pack(p, &compile(p, module("man", "1.0.0")), "man", "1.0.0", &[]);
    let mpath = img.join("manifest.json");
    let text = std::fs::read_to_string(&mpath)
        .unwrap()
        .replace("\"abi\": 1", "\"abi\": 7");
    std::fs::write(&mpath, text).unwrap();
    let (s, v) = add(&d, &img);
    assert_eq!(s, 400);
    assert!(
        v["error"].as_str().unwrap().contains("built for ABI 7"),
        "{v}"
    );
    // Nothing was stored, and the daemon still works.
    let (_, list) = d.call("GET", "/v1/images", None);
    assert_eq!(list.as_array().unwrap().len(), 0, "{list}");
    volume(&d, "ok");
    let (s, v) = attach(&d, p, "ok", "i", json!({}), json!({}));
    assert_eq!(s, 201, "{v}");
}

#[test]
fn signatures_are_checked_when_a_key_is_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    for k in ["good", "evil"] {
        let o = Command::new(BIN)
            .args(["image", "keygen"])
            .arg(p.join(k))
            .output()
            .unwrap();
        assert!(o.status.success());
    }
    let pubkey = p.join("good.pub");
    let d = ApiDaemon::start(p, &["--trusted-image-key", pubkey.to_str().unwrap()]);
    let so = compile(p, module("s", "1.0.0"));
    let good = p.join("good").display().to_string();
    let evil = p.join("evil").display().to_string();
    let (s, v) = add(&d, &pack(p, &so, "s", "1.0.0", &[]));
    assert_eq!(s, 400, "unsigned: {v}");
    assert!(
        v["error"].as_str().unwrap().contains("no manifest.sig"),
        "{v}"
    );
    let (s, v) = add(&d, &pack(p, &so, "s", "1.0.0", &["--sign", &evil]));
    assert_eq!(s, 400, "signed by another key: {v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("does not match the trusted key"),
        "{v}"
    );
    // A signed manifest that was edited afterwards (e.g. its rules widened).
    let img = pack(
        p,
        &so,
        "s",
        "1.0.0",
        &["--sign", &good, "--rule", "os=linux"],
    );
    let mpath = img.join("manifest.json");
    let text = std::fs::read_to_string(&mpath)
        .unwrap()
        .replace("linux", "*");
    std::fs::write(&mpath, text).unwrap();
    let (s, v) = add(&d, &img);
    assert_eq!(s, 400, "{v}");
    let (s, v) = add(&d, &pack(p, &so, "s", "1.0.0", &["--sign", &good]));
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["signed"], true);
}

#[test]
fn init_failure_refuses_the_attach_and_others_keep_working() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let d = ApiDaemon::start(p, UNSIGNED);
    let (s, v) = add(
        &d,
        &pack(
            p,
            &compile(p, module("picky", "1.0.0")),
            "picky",
            "1.0.0",
            &["--default"],
        ),
    );
    assert_eq!(s, 201, "{v}");
    volume(&d, "a");
    volume(&d, "b");
    let (s, v) = attach(&d, p, "a", "good", json!({}), json!({}));
    assert_eq!(s, 201, "{v}");
    let (s, v) = attach(&d, p, "b", "bad", json!({}), json!({"mode": "fail_init"}));
    assert_eq!(s, 400, "{v}");
    let msg = v["error"].as_str().unwrap();
    assert!(
        msg.contains("init failed") && msg.contains("picky refuses instance bad"),
        "{msg}"
    );
    assert!(
        !p.join("b-bad.sock").exists(),
        "nothing is served for a refused attach"
    );
    let mut c = Client::connect(&p.join("a-good.sock"), 1, false).unwrap();
    assert_eq!(c.write(0, 0, &[3u8; 4096], ReqFlags::empty()), 0);
}

#[test]
fn an_image_error_at_runtime_fails_the_attachment_not_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let d = ApiDaemon::start(p, UNSIGNED);
    let broken = CModule {
        on_write: -1,
        ..module("broken", "1.0.0")
    };
    let gate = CModule {
        on_write: 1,
        ..module("gate", "1.0.0")
    };
    for (m, rule) in [(broken, "role=broken"), (gate, "role=gate")] {
        let (s, v) = add(
            &d,
            &pack(p, &compile(p, m), m.name, m.version, &["--rule", rule]),
        );
        assert_eq!(s, 201, "{v}");
    }
    volume(&d, "v");
    volume(&d, "w");
    volume(&d, "x");
    assert_eq!(
        attach(&d, p, "v", "b", json!({"role": "broken"}), json!({})).0,
        201
    );
    assert_eq!(
        attach(&d, p, "w", "g", json!({"role": "gate"}), json!({})).0,
        201
    );
    assert_eq!(attach(&d, p, "x", "plain", json!({}), json!({})).0, 201);
    let mut b = Client::connect(&p.join("v-b.sock"), 1, false).unwrap();
    assert!(b.read(0, 0, 4096).is_ok(), "reads pass");
    assert_ne!(
        b.write(0, 0, &[1u8; 4096], ReqFlags::empty()),
        0,
        "the image's error fails the request"
    );
    assert!(
        b.read(0, 0, 4096).is_err(),
        "the attachment is failed from then on"
    );
    let (_, _, state) = image_of(&d, "v@b");
    assert_eq!(state, "failed");
    // A gate that refuses writes: IOERR, but the attachment stays healthy.
    let mut g = Client::connect(&p.join("w-g.sock"), 1, false).unwrap();
    assert_ne!(g.write(0, 0, &[1u8; 4096], ReqFlags::empty()), 0);
    assert!(g.read(0, 0, 4096).is_ok());
    assert_eq!(image_of(&d, "w@g").2, "ok");
    // The disk without an image is untouched.
    let mut x = Client::connect(&p.join("x-plain.sock"), 1, false).unwrap();
    assert_eq!(x.write(0, 0, &[1u8; 4096], ReqFlags::empty()), 0);
    assert!(d.log().contains("driver image failed"), "{}", d.log());
}

#[test]
fn a_new_version_applies_on_reattach_or_upgrade_only() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let mut d = ApiDaemon::start(p, UNSIGNED);
    let (s, _) = add(
        &d,
        &pack(
            p,
            &compile(p, module("drv", "1.0.0")),
            "drv",
            "1.0.0",
            &["--rule", "os=linux"],
        ),
    );
    assert_eq!(s, 201);
    volume(&d, "v");
    volume(&d, "w");
    let (s, _) = attach(&d, p, "v", "old", json!({"os": "linux"}), json!({}));
    assert_eq!(s, 201);
    // I/O in flight across the upgrade: a writer keeps going while v2 is added and applied.
    let sock = p.join("v-old.sock");
    let done = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let progress = std::sync::Arc::clone(&done);
    const WRITES: u64 = 20_000;
    let writer = std::thread::spawn(move || {
        let mut c = Client::connect(&sock, 1, false).unwrap();
        let mut errors = 0;
        for i in 0..WRITES {
            let data = [(i % 251) as u8; 4096];
            if c.write(0, (i % 64) * 4096, &data, ReqFlags::empty()) != 0 {
                errors += 1;
            }
            progress.store(i + 1, std::sync::atomic::Ordering::Relaxed);
        }
        errors
    });
    while done.load(std::sync::atomic::Ordering::Relaxed) < 100 {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let (s, _) = add(
        &d,
        &pack(
            p,
            &compile(p, module("drv", "2.0.0")),
            "drv",
            "2.0.0",
            &["--rule", "os=linux"],
        ),
    );
    assert_eq!(s, 201);
    assert_eq!(
        image_of(&d, "v@old").1,
        "1.0.0",
        "a running attachment stays on v1"
    );
    let (s, v) = attach(&d, p, "w", "new", json!({"os": "linux"}), json!({}));
    assert_eq!(s, 201);
    assert_eq!(v["image"]["version"], "2.0.0", "a new attach runs v2");
    let (rc, out, err) = d.cli(&["attachment", "upgrade", "v@old"]);
    assert_eq!(rc, 0, "{out}{err}");
    assert!(out.contains("drv 1.0.0 → drv 2.0.0"), "{out}");
    let at = done.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        at < WRITES,
        "the upgrade must happen while the writer runs ({at} of {WRITES} done)"
    );
    assert_eq!(
        writer.join().unwrap(),
        0,
        "no request failed or was lost across the upgrade"
    );
    assert_eq!(image_of(&d, "v@old").1, "2.0.0");
    let (rc, out, _) = d.cli(&["attachment", "upgrade", "v@old"]);
    assert_eq!(rc, 0);
    assert!(out.contains("already on drv 2.0.0"), "{out}");
    // The choice is kept across a daemon restart (a restart is not a re-attach).
    d.terminate();
    let d = ApiDaemon::start(p, UNSIGNED);
    assert_eq!(image_of(&d, "v@old").1, "2.0.0");
    assert_eq!(image_of(&d, "w@new").1, "2.0.0");
}

/// The workspace's `faulty` image (built by `cargo build --workspace`, which
/// `scripts/test.sh` runs first).
fn faulty_module() -> PathBuf {
    let so = Path::new(BIN)
        .parent()
        .unwrap()
        .join("libferrodisk_driver_faulty.so");
    assert!(
        so.exists(),
        "{} is missing: build the images with `cargo build --workspace`",
        so.display()
    );
    so
}

/// Adds the `faulty` image, version 1.0.0, selected by `rule`.
fn add_faulty(d: &ApiDaemon, dir: &Path, rule: &str) {
    let (s, v) = add(
        d,
        &pack(dir, &faulty_module(), "faulty", "1.0.0", &["--rule", rule]),
    );
    assert_eq!(s, 201, "{v}");
}

#[test]
fn a_panic_inside_a_rust_image_is_contained() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let d = ApiDaemon::start(p, UNSIGNED);
    add_faulty(&d, p, "test=faulty");
    volume(&d, "p");
    volume(&d, "c");
    volume(&d, "i");
    let ctx = json!({"test": "faulty"});
    assert_eq!(
        attach(
            &d,
            p,
            "p",
            "w",
            ctx.clone(),
            json!({"mode": "panic_on_write"})
        )
        .0,
        201
    );
    assert_eq!(
        attach(
            &d,
            p,
            "c",
            "r",
            ctx.clone(),
            json!({"mode": "panic_in_complete"})
        )
        .0,
        201
    );
    let (s, v) = attach(&d, p, "i", "x", ctx, json!({"mode": "fail_init"}));
    assert_eq!(s, 400);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("init refused as configured"),
        "{v}"
    );

    let mut w = Client::connect(&p.join("p-w.sock"), 1, false).unwrap();
    assert!(w.read(0, 0, 4096).is_ok());
    assert_ne!(
        w.write(0, 0, &[1u8; 4096], ReqFlags::empty()),
        0,
        "the panicking write fails"
    );
    assert!(w.read(0, 0, 4096).is_err(), "then the attachment is failed");
    let (_, st) = d.call("GET", "/v1/stats/p@w", None);
    assert_eq!(st[0]["driver"]["state"], "failed", "{st}");
    assert!(
        st[0]["driver"]["failure"]
            .as_str()
            .unwrap()
            .contains("panic"),
        "{st}"
    );
    let mut r = Client::connect(&p.join("c-r.sock"), 1, false).unwrap();
    assert!(
        r.read(0, 0, 4096).is_err(),
        "a panic in complete fails the read"
    );
    assert_eq!(image_of(&d, "c@r").2, "failed");
    // The daemon is alive and other disks work.
    volume(&d, "ok");
    assert_eq!(attach(&d, p, "ok", "z", json!({}), json!({})).0, 201);
    let mut z = Client::connect(&p.join("ok-z.sock"), 1, false).unwrap();
    assert_eq!(z.write(0, 0, &[1u8; 4096], ReqFlags::empty()), 0);
}

/// An upgrade drains the rings without holding the daemon's lock: while it waits for a
/// write that the image holds back (`faulty` in `hold_writes` mode), other API calls are
/// answered; a detach of the same attachment, and a removal of the image it is moving to,
/// are refused (409) until the upgrade is done.
#[test]
fn an_upgrade_that_drains_slowly_does_not_block_the_api() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let d = ApiDaemon::start(p, UNSIGNED);
    add_faulty(&d, p, "os=linux");
    volume(&d, "v");
    // Version 2: a pass-through module under the same name, built now (the compiler is
    // slow) and added after the attach (which must pick version 1).
    let v2 = pack(
        p,
        &compile(p, module("faulty", "2.0.0")),
        "faulty",
        "2.0.0",
        &["--rule", "os=linux"],
    );
    // Writes wait until 8 s after the attach: the window in which the checks below run.
    let cfg = json!({"mode": "hold_writes", "hold_ms": 8000});
    let (s, v) = attach(&d, p, "v", "vm", json!({"os": "linux"}), cfg);
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["image"]["version"], "1.0.0", "{v}");
    let (s, v) = add(&d, &v2);
    assert_eq!(s, 201, "{v}");

    let sock = p.join("v-vm.sock");
    let written = Arc::new(AtomicBool::new(false));
    let w = Arc::clone(&written);
    let writer = std::thread::spawn(move || {
        let mut c = Client::connect(&sock, 1, false).unwrap();
        let r = c.write(0, 0, &[7u8; 4096], ReqFlags::empty());
        w.store(true, Ordering::SeqCst);
        r
    });
    std::thread::sleep(Duration::from_millis(200));
    let api = p.join("api.sock");
    let upgrade = std::thread::spawn(move || {
        let r = ferrodisk::api::client::request(&api, "POST", "/v1/attachments/v@vm/upgrade", None)
            .unwrap();
        (r.status, r.json())
    });
    std::thread::sleep(Duration::from_millis(300));
    // The upgrade is draining (the held write is still in flight): the API answers.
    let (s, _) = d.call("GET", "/v1/volumes", None);
    assert_eq!(s, 200);
    assert!(
        !written.load(Ordering::SeqCst) && !upgrade.is_finished(),
        "the API answered only after the drain"
    );
    let (s, v) = d.call("DELETE", "/v1/attachments/v@vm", None);
    assert_eq!(s, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("upgrade"), "{v}");
    // Nor can the image it is moving to be removed meanwhile.
    let (s, v) = d.call("DELETE", "/v1/images/faulty/2.0.0", None);
    assert_eq!(s, 409, "{v}");
    let (status, v) = upgrade.join().unwrap();
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["to"]["version"], "2.0.0", "{v}");
    assert_eq!(writer.join().unwrap(), 0, "the held write completed");
    assert_eq!(image_of(&d, "v@vm").1, "2.0.0");
    let (s, v) = d.call("DELETE", "/v1/attachments/v@vm", None);
    assert_eq!(s, 200, "detach works once the upgrade is done: {v}");
}

/// The module `image add` stores and loads is the one it verified: a module swapped on disk
/// right after the daemon read and hashed it (the daemon is held in that window by a test
/// hook) is never loaded, and attachments run the verified code.
#[test]
fn a_module_swapped_after_verification_never_runs() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let pause = p.join("pause");
    let d = ApiDaemon::start_with_env(
        p,
        UNSIGNED,
        &[("FERRODISK_TEST_IMAGE_PAUSE", pause.as_path())],
    );
    let marker = p.join("evil-ran");
    let good = compile(p, module("swap", "1.0.0"));
    let img = pack(p, &good, "swap", "1.0.0", &["--default"]);
    // Same name and version, so that nothing but the hash tells them apart.
    let evil_dir = p.join("evil");
    std::fs::create_dir(&evil_dir).unwrap();
    let evil = compile(
        &evil_dir,
        CModule {
            marker: Some(&marker),
            ..module("swap", "1.0.0")
        },
    );
    let api = d.api.clone();
    let adding = {
        let img = img.clone();
        std::thread::spawn(move || {
            let r = ferrodisk::api::client::request(
                &api,
                "POST",
                "/v1/images",
                Some(&json!({ "path": img })),
            )
            .unwrap();
            (r.status, r.json())
        })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !pause.with_extension("reached").exists() {
        assert!(std::time::Instant::now() < deadline, "{}", d.log());
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // Verified: now the module in the image directory becomes another one.
    let so = img.join(good.file_name().unwrap());
    std::fs::copy(&evil, img.join("swapped")).unwrap();
    std::fs::rename(img.join("swapped"), &so).unwrap();
    std::fs::write(pause.with_extension("go"), b"").unwrap();
    let (s, v) = adding.join().unwrap();
    assert!(!marker.exists(), "the swapped-in module ran in the daemon");
    assert_eq!(s, 201, "the verified bytes were stored: {v}");
    let stored = p
        .join("state/images/swap/1.0.0")
        .join(good.file_name().unwrap());
    assert_eq!(
        std::fs::read(&stored).unwrap(),
        std::fs::read(&good).unwrap(),
        "the stored copy is the verified module"
    );
    volume(&d, "v");
    let (s, v) = attach(&d, p, "v", "i", json!({}), json!({}));
    assert_eq!(s, 201, "{v}");
    assert_eq!(image_of(&d, "v@i").0, "swap");
    assert!(!marker.exists(), "the swapped-in module ran at attach");
}

/// The stored copy is checked again at attach: a module replaced in the store is refused
/// (checksum mismatch) and never loaded.
#[test]
fn a_tampered_stored_module_is_refused_at_attach() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let d = ApiDaemon::start(p, UNSIGNED);
    let marker = p.join("evil-ran");
    let good = compile(p, module("tamper", "1.0.0"));
    let (s, v) = add(&d, &pack(p, &good, "tamper", "1.0.0", &["--default"]));
    assert_eq!(s, 201, "{v}");
    let evil_dir = p.join("evil");
    std::fs::create_dir(&evil_dir).unwrap();
    let evil = compile(
        &evil_dir,
        CModule {
            marker: Some(&marker),
            ..module("tamper", "1.0.0")
        },
    );
    let stored = p
        .join("state/images/tamper/1.0.0")
        .join(good.file_name().unwrap());
    std::fs::copy(&evil, &stored).unwrap();
    volume(&d, "v");
    let (s, v) = attach(&d, p, "v", "i", json!({}), json!({}));
    assert!(!marker.exists(), "the tampered module ran in the daemon");
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("checksum mismatch"),
        "{v}"
    );
    assert!(!p.join("v-i.sock").exists(), "nothing is served");
}

/// Without `--allow-unsigned-images`, an unsigned image is refused, with a message that
/// says what to do.
#[test]
fn unsigned_images_are_refused_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let d = ApiDaemon::start(p, &[]);
    let marker = p.join("ran");
    let so = compile(
        p,
        CModule {
            marker: Some(&marker),
            ..module("u", "1.0.0")
        },
    );
    let (s, v) = add(&d, &pack(p, &so, "u", "1.0.0", &["--default"]));
    assert_eq!(s, 400, "{v}");
    let msg = v["error"].as_str().unwrap();
    assert!(
        msg.contains("unsigned images are refused")
            && msg.contains("--trusted-image-key")
            && msg.contains("--allow-unsigned-images"),
        "{msg}"
    );
    assert!(!marker.exists(), "the refused module was loaded");
    let (_, list) = d.call("GET", "/v1/images", None);
    assert_eq!(list.as_array().unwrap().len(), 0, "{list}");
    drop(d);

    // Stored and attached under --allow-unsigned-images, then a restart without it: the
    // attachment is not served again with that image, and the module is not loaded.
    let mut d = ApiDaemon::start(p, UNSIGNED);
    let (s, v) = add(&d, &pack(p, &so, "u", "1.0.0", &["--default"]));
    assert_eq!(s, 201, "{v}");
    volume(&d, "v");
    let (s, v) = attach(&d, p, "v", "i", json!({}), json!({}));
    assert_eq!(s, 201, "{v}");
    d.terminate();
    std::fs::remove_file(&marker).unwrap();
    let d = ApiDaemon::start(p, &[]);
    let (_, atts) = d.call("GET", "/v1/attachments", None);
    let state = atts[0]["state"].as_str().unwrap();
    assert!(
        state.starts_with("failed") && state.contains("unsigned images are refused"),
        "{atts}"
    );
    assert!(
        !marker.exists(),
        "the unsigned module was loaded at the restart"
    );
}

/// A bouncing image (a 4 MiB copy per write, charged to the queue's copy budget) that
/// fails every write, without polling: the writes complete inside the call that took them,
/// so the budget fills and frees within one kick. The queue must go on taking the rest of
/// the ring (it used to stop at 16 writes with nothing left to wake it: the guest hung).
#[test]
fn a_full_copy_budget_freed_within_one_kick_does_not_stall_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let d = ApiDaemon::start(p, UNSIGNED);
    let so = compile(
        p,
        CModule {
            bounce: true,
            on_write: 1,
            ..module("copy", "1.0.0")
        },
    );
    let (s, v) = add(&d, &pack(p, &so, "copy", "1.0.0", &["--default"]));
    assert_eq!(s, 201, "{v}");
    volume(&d, "v");
    let sock = p.join("v-a.sock");
    let (s, v) = d.call(
        "POST",
        "/v1/attachments",
        Some(
            json!({"volume": "v", "instance": "a", "context": {}, "socket": sock,
                    "options": {"direct": false, "poll_us": 0, "queue_size": 128}}),
        ),
    );
    assert_eq!(s, 201, "{v}");
    let mut g = raw_guest::RawGuest::connect(&sock, 128, 8 << 20);
    let buf = 4u64 << 20;
    g.write(buf, &vec![0x6bu8; 4 << 20]);
    let mut heads = Vec::new();
    for h in 0..40u16 {
        let at = raw_guest::DATA + 0x40 * u64::from(h);
        g.header(at, raw_guest::T_OUT, 0);
        g.desc(3 * h, at, 16, raw_guest::F_NEXT, 3 * h + 1);
        g.desc(3 * h + 1, buf, 4 << 20, raw_guest::F_NEXT, 3 * h + 2);
        g.desc(3 * h + 2, at + 0x20, 1, raw_guest::F_WRITE, 0);
        heads.push(3 * h);
    }
    g.offer(&heads);
    g.wait_used(40, std::time::Duration::from_secs(30));
    for h in 0..40u64 {
        assert_eq!(
            g.read(raw_guest::DATA + 0x40 * h + 0x20, 1)[0],
            1,
            "write {h}: the image fails it (IOERR)"
        );
    }
}
