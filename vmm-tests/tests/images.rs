//! Driver images with real guests (issue #8):
//! - `crypt`: a context that selects it, a guest that writes, a backing file that holds only
//!   ciphertext, and a re-attached guest that reads the plaintext back;
//! - `qos`: the guest's measured IOPS follow the configured limit within 10 %;
//! - hot update: version 2 of an image is added while a guest runs fio with verification on
//!   an attachment of version 1; a new attachment gets v2, the running one stays on v1
//!   until `ferrodisk attachment upgrade`, which switches it under load without an error.
//!
//! The images are the workspace's own (`drivers/crypt`, `drivers/qos`), built by
//! `cargo build --workspace`, plus small C pass-through images compiled here for v1/v2.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ferrodisk_vmm_tests::*;

const MIB: u64 = 1 << 20;

/// A built image module of the workspace (`target/<profile>/lib<name>.so`, next to the
/// ferrodisk binary under test).
fn module(name: &str) -> PathBuf {
    let bin = ferrodisk_bin();
    let dir = bin.parent().unwrap();
    let so = dir.join(format!("lib{name}.so"));
    assert!(
        so.exists(),
        "{} is missing: build the images with `cargo build --workspace`",
        so.display()
    );
    so
}

struct Api {
    api: PathBuf,
    daemon: Option<Daemon>,
}

fn start(dir: &WorkDir) -> Api {
    let api = dir.join("api.sock");
    let args: Vec<String> = vec![
        "serve".into(),
        "--api".into(),
        api.display().to_string(),
        "--state".into(),
        dir.join("state").display().to_string(),
        // The test images are not signed.
        "--allow-unsigned-images".into(),
    ];
    let daemon = Daemon::start_program(
        dir,
        "ferrodisk",
        &ferrodisk_bin(),
        &args,
        std::slice::from_ref(&api),
    );
    Api {
        api,
        daemon: Some(daemon),
    }
}

fn pack_add(a: &Api, dir: &WorkDir, so: &Path, name: &str, version: &str, extra: &[&str]) {
    let out = dir.join(&format!("img-{name}-{version}"));
    let mut args = vec![
        "image",
        "pack",
        "--module",
        so.to_str().unwrap(),
        "--name",
        name,
        "--version",
        version,
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    ferrodisk_cli(&a.api, &args);
    let text = ferrodisk_cli(&a.api, &["image", "add", out.to_str().unwrap()]);
    assert!(text.contains("added"), "{text}");
}

const KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\
                   f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff0102030405060708090a0b0c0d0e0f10";

#[test]
fn crypt_stores_ciphertext_and_a_reattached_guest_reads_plaintext() {
    let dir = WorkDir::new("images-crypt");
    let a = start(&dir);
    pack_add(
        &a,
        &dir,
        &module("ferrodisk_driver_crypt"),
        "crypt",
        "1.0.0",
        &["--rule", "encryption=aes-xts"],
    );
    ferrodisk_cli(&a.api, &["volume", "create", "secret", "--size", "64M"]);
    let sock = dir.join("secret.sock");
    let cfg = format!("{{\"key\":\"{KEY}\"}}");
    let attach = |inst: &str| {
        ferrodisk_cli(
            &a.api,
            &[
                "attach",
                "--volume",
                "secret",
                "--instance",
                inst,
                "--context",
                "encryption=aes-xts",
                "--driver-config",
                &cfg,
                "--socket",
                sock.to_str().unwrap(),
            ],
        )
    };
    let out = attach("vm-1");
    assert!(out.contains("with image crypt 1.0.0"), "{out}");
    // The guest writes 8 MiB of recognisable text with O_DIRECT and records its hash.
    let r = Vm::new(&dir, "writer", VmDisk::only(&sock, 1)).run(
        r#"
wait_dev /dev/vda
yes FERRODISK-PLAINTEXT-MARKER | head -c 8388608 > /tmp/plain
step write dd if=/tmp/plain of=/dev/vda bs=1M count=8 oflag=direct
step sync sync
kv sha "$(sha256sum /tmp/plain | cut -d' ' -f1)"
"#,
    );
    r.assert_all_ok();
    let sha = r.kv("sha").to_string();
    ferrodisk_cli(&a.api, &["detach", "secret@vm-1"]);

    // The backing file holds no plaintext, and the written range is not zeros.
    let backing = std::fs::read(dir.join("state/volumes/secret.img")).unwrap();
    let marker = b"FERRODISK-PLAINTEXT-MARKER";
    assert!(
        !backing.windows(marker.len()).any(|w| w == marker),
        "plaintext found in the backing file"
    );
    let written = &backing[..8 * MIB as usize];
    assert!(
        written.chunks(512).all(|s| s.iter().any(|&b| b != 0)),
        "every written sector holds ciphertext"
    );

    // Attached again with the key: a new guest reads the plaintext.
    let out = attach("vm-2");
    assert!(out.contains("crypt 1.0.0"), "{out}");
    let r = Vm::new(&dir, "reader", VmDisk::only(&sock, 1)).run(
        r#"
wait_dev /dev/vda
kv sha "$(dd if=/dev/vda bs=1M count=8 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)"
kv marker "$(dd if=/dev/vda bs=1M count=1 iflag=direct 2>/dev/null | head -c 26)"
"#,
    );
    assert_eq!(
        r.kv("sha"),
        sha,
        "the re-attached guest reads the plaintext"
    );
    assert_eq!(r.kv("marker"), "FERRODISK-PLAINTEXT-MARKER");
    let stats = ferrodisk_cli(&a.api, &["stats", "secret@vm-2"]);
    assert!(stats.contains("crypt 1.0.0 (ok)"), "{stats}");
    ferrodisk_cli(&a.api, &["detach", "secret@vm-2"]);
    a.daemon.unwrap().stop();
}

#[test]
fn qos_limits_guest_iops_within_ten_percent() {
    const LIMIT: f64 = 400.0;
    let dir = WorkDir::new("images-qos");
    let a = start(&dir);
    pack_add(
        &a,
        &dir,
        &module("ferrodisk_driver_qos"),
        "qos",
        "1.0.0",
        &[
            "--rule",
            "instance-type=*",
            "--config",
            r#"{"limits":{"t.small":{"iops":400},"default":{"iops":100000}}}"#,
        ],
    );
    ferrodisk_cli(&a.api, &["volume", "create", "q", "--size", "64M"]);
    let sock = dir.join("q.sock");
    ferrodisk_cli(
        &a.api,
        &[
            "attach",
            "--volume",
            "q",
            "--instance",
            "vm-q",
            "--context",
            "instance-type=t.small",
            "--socket",
            sock.to_str().unwrap(),
        ],
    );
    let mut vm = Vm::new(&dir, "guest", VmDisk::only(&sock, 1));
    vm.timeout = Duration::from_secs(180);
    // Random 4k reads at depth 8 for 10 s; fio's terse field 8 is the read IOPS.
    let r = vm.run(
        r#"
wait_dev /dev/vda
step fio sh -c 'fio --name=q --filename=/dev/vda --direct=1 --ioengine=libaio --rw=randread --bs=4k --iodepth=8 --time_based=1 --runtime=10 --size=48M --minimal > /tmp/fio.out'
kv iops "$(cut -d';' -f8 /tmp/fio.out)"
"#,
    );
    r.assert_all_ok();
    let iops: f64 = r.kv("iops").parse().expect("fio's IOPS");
    let ratio = iops / LIMIT;
    eprintln!("qos: guest measured {iops} IOPS against a limit of {LIMIT} ({ratio:.3})");
    assert!(
        (0.9..=1.1).contains(&ratio),
        "measured {iops} IOPS, limit {LIMIT}: not within 10 %"
    );
    a.daemon.unwrap().stop();
}

#[test]
fn hot_update_new_attach_gets_v2_running_one_upgrades_under_load() {
    let dir = WorkDir::new("images-update");
    let a = start(&dir);
    let src = dir.join("passthrough.c");
    std::fs::write(&src, include_str!("../../tests/data/passthrough_driver.c")).unwrap();
    let build = |version: &str| {
        let so = dir.join(&format!("libpass-{version}.so"));
        let out = Command::new("cc")
            .args(["-shared", "-fPIC", "-O1", "-o"])
            .arg(&so)
            .arg(&src)
            .args([
                "-DNAME=\"pass\"".to_string(),
                format!("-DVERSION=\"{version}\""),
                "-DABI=1".into(),
                "-DON_WRITE=0".into(),
            ])
            .output()
            .expect("`cc` is needed: install Debian's gcc");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        so
    };
    pack_add(
        &a,
        &dir,
        &build("1.0.0"),
        "pass",
        "1.0.0",
        &["--rule", "os=linux"],
    );
    ferrodisk_cli(&a.api, &["volume", "create", "a", "--size", "128M"]);
    ferrodisk_cli(&a.api, &["volume", "create", "b", "--size", "16M"]);
    let sock = dir.join("a.sock");
    ferrodisk_cli(
        &a.api,
        &[
            "attach",
            "--volume",
            "a",
            "--instance",
            "vm-a",
            "--context",
            "os=linux",
            "--socket",
            sock.to_str().unwrap(),
            "--queues",
            "2",
        ],
    );
    let mut vm = Vm::new(&dir, "guest", VmDisk::only(&sock, 2));
    vm.smp = 2;
    vm.timeout = Duration::from_secs(240);
    let mut running = vm.spawn(
        r#"
wait_dev /dev/vda
echo FIO-START
step fio fio --group_reporting --eta=never --filename=/dev/vda --direct=1 --ioengine=libaio \
    --time_based=1 --runtime=20 --name=u --rw=randwrite --bssplit=4k/50:64k/50 --iodepth=16 \
    --numjobs=2 --size=24M --offset_increment=32M --cpus_allowed=0-1 --cpus_allowed_policy=split \
    --verify=crc32c --verify_backlog=256 --verify_fatal=1 --verify_state_save=0
kv ioerrors "$(dmesg | grep -ciE 'I/O error|blk_update_request|error, dev vd')"
"#,
    );
    running.wait_for_console("FIO-START", Duration::from_secs(120));
    std::thread::sleep(Duration::from_secs(3));
    pack_add(
        &a,
        &dir,
        &build("2.0.0"),
        "pass",
        "2.0.0",
        &["--rule", "os=linux"],
    );
    let out = ferrodisk_cli(
        &a.api,
        &[
            "attach",
            "--volume",
            "b",
            "--instance",
            "vm-b",
            "--context",
            "os=linux",
            "--socket",
            dir.join("b.sock").to_str().unwrap(),
        ],
    );
    assert!(out.contains("pass 2.0.0"), "a new attach runs v2: {out}");
    let stats = ferrodisk_cli(&a.api, &["stats", "a@vm-a"]);
    assert!(
        stats.contains("pass 1.0.0 (ok)"),
        "the running attachment stays on v1: {stats}"
    );
    std::thread::sleep(Duration::from_secs(3));
    let out = ferrodisk_cli(&a.api, &["attachment", "upgrade", "a@vm-a"]);
    assert!(out.contains("pass 1.0.0 → pass 2.0.0"), "{out}");
    let r = running.wait();
    r.assert_all_ok();
    assert_eq!(r.kv("ioerrors"), "0");
    let stats = ferrodisk_cli(&a.api, &["stats", "a@vm-a"]);
    assert!(stats.contains("pass 2.0.0 (ok)"), "{stats}");
    a.daemon.unwrap().stop();
}
