//! How `ferrodisk serve` starts: a disk's socket appears only once the disk can be served.

mod common;

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::BIN;

/// A primary that the authority refuses (the volume belongs to another node) exits with an
/// error, and its socket never appears, not even for a moment: a hypervisor waiting for the
/// file would connect to a daemon about to exit. A thread watches the path all along.
#[test]
fn a_start_the_authority_refuses_never_publishes_its_socket() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let authority = format!("file:{}", p.join("authority").display());
    let key = p.join("key");
    std::fs::write(&key, b"0123456789abcdef0123456789abcdef").unwrap();
    let img = p.join("vol1.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    // The volume belongs to node `b`.
    let replicas = vec!["127.0.0.1:1".to_string()];
    ferrodisk::repl::authority::Authority::open(&authority)
        .unwrap()
        .take_over("vol1", "b", &replicas, None)
        .unwrap();

    let sock = p.join("vol1.sock");
    let log = p.join("serve.log");
    let seen = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (sock, seen, done) = (sock.clone(), Arc::clone(&seen), Arc::clone(&done));
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                if std::fs::symlink_metadata(&sock).is_ok() {
                    seen.store(true, Ordering::SeqCst);
                }
                std::thread::yield_now();
            }
        })
    };
    let mut child = Command::new(BIN)
        .args(["serve", "--authority", &authority, "--node", "a"])
        .arg("--replication-key")
        .arg(&key)
        .arg("--disk")
        .arg(format!(
            "path={},socket={},volume=vol1,replicas=127.0.0.1:1",
            img.display(),
            sock.display()
        ))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    done.store(true, Ordering::SeqCst);
    watcher.join().unwrap();
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    let status = status.unwrap_or_else(|| panic!("serve did not exit:\n{log}"));
    assert!(
        !status.success(),
        "the refused start exited {status}:\n{log}"
    );
    assert!(log.contains("belongs to primary `b`"), "{log}");
    assert!(
        !seen.load(Ordering::SeqCst),
        "the socket of a refused start appeared:\n{log}"
    );
}
