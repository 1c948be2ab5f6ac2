//! Bad configuration is a clear CLI error with a non-zero exit, never a crash.

mod common;

use std::process::Command;

use common::*;
use tempfile::TempDir;

fn serve(args: &[&str]) -> (i32, String) {
    let mut cmd = Command::new(BIN);
    cmd.arg("serve");
    for a in args {
        cmd.arg("--disk").arg(a);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_configurations_fail_with_a_message() {
    let dir = TempDir::new().unwrap();
    let d = dir.path().display();
    let odd = dir.path().join("odd.img");
    std::fs::write(&odd, vec![0u8; 1000]).unwrap();
    let ok = dir.path().join("ok.img");
    make_image(&ok, 1 << 20);
    let cases = [
        (
            format!("path={d}/missing.img,socket={d}/a.sock"),
            "cannot open",
        ),
        (
            format!("path={},socket={d}/a.sock", odd.display()),
            "not a multiple of 512",
        ),
        (
            format!("path={},socket={d}/a.sock,colour=blue", ok.display()),
            "unknown key `colour`",
        ),
        (
            format!("path={},socket={d}/a.sock,queues=999", ok.display()),
            "bad value `999` for `queues`",
        ),
        (format!("engine=null,socket={d}/a.sock"), "missing `size"),
        (
            format!("path={},socket={d}", ok.display()),
            "exists and is not a socket",
        ),
    ];
    for (spec, want) in cases {
        let (code, err) = serve(&[&spec]);
        assert_ne!(code, 0, "{spec} must fail");
        assert!(err.contains(want), "{spec}: expected `{want}` in: {err}");
        assert!(!err.contains("panicked"), "{spec}: {err}");
    }
}

#[test]
fn a_socket_in_use_by_a_live_daemon_is_refused() {
    let dir = TempDir::new().unwrap();
    let img = dir.path().join("a.img");
    make_image(&img, 1 << 20);
    let sock = dir.path().join("a.sock");
    let spec = format!("path={},socket={}", img.display(), sock.display());
    let _live = Daemon::start(std::slice::from_ref(&spec), &sock);
    let (code, err) = serve(&[&spec]);
    assert_ne!(code, 0);
    assert!(err.contains("in use by a live process"), "{err}");
    // The live daemon is unharmed.
    let mut c = Client::connect(&sock, 1, false).unwrap();
    assert_eq!(c.read(0, 0, 512).unwrap(), vec![0u8; 512]);
}

#[test]
fn a_stale_socket_is_replaced() {
    let dir = TempDir::new().unwrap();
    let img = dir.path().join("a.img");
    make_image(&img, 1 << 20);
    let sock = dir.path().join("a.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let d = Daemon::start(
        &[format!("path={},socket={}", img.display(), sock.display())],
        &sock,
    );
    // The stale file exists from the start, so wait for the daemon to listen on its own.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let c = loop {
        match Client::connect(&sock, 1, false) {
            Ok(c) => break c,
            Err(e) if std::time::Instant::now() > deadline => {
                panic!("connect after replacing a stale socket: {}", e.message())
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    };
    drop(c);
    let (status, _) = d.terminate();
    assert!(status.success());
}
