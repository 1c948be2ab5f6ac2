//! Replication under a real guest (issue #6): a QEMU guest runs fio with continuous crc32c
//! verification on a disk replicated to two `ferrodisk replica` servers on loopback. One
//! replica is killed (SIGKILL) mid-run and restarted. The guest must see no I/O error, the
//! replica must go out of sync and come back in sync by a delta resync, and at the end the
//! primary and both replicas must hold the same bytes (`ferrodisk verify`).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ferrodisk_vmm_tests::*;

const MIB: u64 = 1 << 20;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET /health` of the primary, as JSON (`Null` while it does not answer).
fn health(port: u16) -> serde_json::Value {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return serde_json::Value::Null;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = write!(
        s,
        "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    let body = resp.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    serde_json::from_str(body).unwrap_or(serde_json::Value::Null)
}

fn replica_state(port: u16, replica: &str) -> String {
    let h = health(port);
    h["volumes"][0]["replicas"]
        .as_array()
        .and_then(|a| a.iter().find(|r| r["addr"] == replica))
        .and_then(|r| r["state"].as_str())
        .unwrap_or("?")
        .to_string()
}

fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn start_replica(dir: &WorkDir, name: &str, port: u16, key: &Path) -> Daemon {
    let args: Vec<String> = vec![
        "replica".into(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--data".into(),
        dir.join(name).display().to_string(),
        "--replication-key".into(),
        key.display().to_string(),
    ];
    let d = Daemon::start_program(dir, name, &ferrodisk_bin(), &args, &[]);
    wait_until(Duration::from_secs(10), "the replica to listen", || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    d
}

#[test]
fn guest_fio_verify_survives_a_replica_kill_and_resync() {
    let dir = WorkDir::new("replication");
    let key = dir.join("key");
    std::fs::write(&key, b"vmm-test-key-0123456789abcdef").unwrap();
    let (p1, p2, hp) = (free_port(), free_port(), free_port());
    let (a1, a2) = (format!("127.0.0.1:{p1}"), format!("127.0.0.1:{p2}"));
    let _r1 = start_replica(&dir, "r1", p1, &key);
    let mut r2 = start_replica(&dir, "r2", p2, &key);

    let img = dir.image("disk.img", 128 * MIB);
    let sock = dir.join("disk.sock");
    let args: Vec<String> = vec![
        "serve".into(),
        "--authority".into(),
        format!("file:{}", dir.join("authority").display()),
        "--node".into(),
        "host-a".into(),
        "--replication-key".into(),
        key.display().to_string(),
        "--health".into(),
        format!("127.0.0.1:{hp}"),
        "--disk".into(),
        format!(
            "path={},socket={},queues=2,volume=vm-vol,replicas={a1}+{a2},replica-timeout-ms=2000",
            img.display(),
            sock.display()
        ),
    ];
    let primary = Daemon::start_program(
        &dir,
        "primary",
        &ferrodisk_bin(),
        &args,
        std::slice::from_ref(&sock),
    );
    wait_until(Duration::from_secs(60), "both replicas in sync", || {
        replica_state(hp, &a1) == "in-sync" && replica_state(hp, &a2) == "in-sync"
    });

    let mut vm = Vm::new(&dir, "guest", VmDisk::only(&sock, 2));
    vm.smp = 2;
    vm.timeout = Duration::from_secs(300);
    let running = vm.spawn(
        r#"
echo FIO-START
step fio fio --group_reporting --eta=never --filename=/dev/vda --direct=1 --ioengine=libaio \
    --time_based=1 --runtime=30 --name=repl --rw=randwrite --bssplit=4k/50:64k/50 --iodepth=16 \
    --numjobs=2 --size=24M --offset_increment=32M --cpus_allowed=0-1 --cpus_allowed_policy=split \
    --verify=crc32c --verify_backlog=256 --verify_fatal=1 --verify_state_save=0
dmesg >/tmp/dmesg
kv ioerrors "$(grep -ciE 'I/O error|blk_update_request|error, dev vd|Buffer I/O' /tmp/dmesg)"
step after fio --name=after --filename=/dev/vda --direct=1 --ioengine=libaio --rw=randwrite \
    --bs=64k --iodepth=8 --offset=96M --size=8M --verify=crc32c --verify_fatal=1
"#,
    );
    let mut running = running;
    running.wait_for_console("FIO-START", Duration::from_secs(120));
    std::thread::sleep(Duration::from_secs(5));
    r2.kill(libc::SIGKILL);
    wait_until(Duration::from_secs(15), "r2 out of sync", || {
        replica_state(hp, &a2) == "out-of-sync"
    });
    std::thread::sleep(Duration::from_secs(5));
    let _r2 = r2.respawn();
    wait_until(Duration::from_secs(60), "r2 back in sync", || {
        replica_state(hp, &a2) == "in-sync"
    });
    let h = health(hp);
    let r = running.wait();
    r.assert_all_ok();
    assert_eq!(r.kv("ioerrors"), "0", "the guest logged I/O errors");
    let copied = h["volumes"][0]["replicas"][1]["copied_regions"]
        .as_u64()
        .unwrap();
    assert!(
        (1..128).contains(&copied),
        "a delta resync copies some, not all, of the 128 regions: {copied}"
    );
    let stats = primary.stop();
    assert_eq!(total(&stats, &sock, "errors_ioerr"), 0);

    let out = Command::new(ferrodisk_bin())
        .args(["verify", "--image"])
        .arg(&img)
        .args(["--volume", "vm-vol", "--replicas", &format!("{a1}+{a2}")])
        .arg("--replication-key")
        .arg(&key)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "verify: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("0 differing range(s)"), "{text}");
}
