//! The operations API with a real guest (issue #7): a volume is created and attached with
//! the `ferrodisk` CLI, a QEMU guest boots on it (the QEMU command line of
//! `docs/integration.md`), the volume is resized while the guest runs and the guest sees the
//! new size, and the attachment is detached after the guest shut down.

use std::time::Duration;

use ferrodisk_vmm_tests::*;

#[test]
fn attach_with_the_cli_boot_resize_live_then_detach() {
    let dir = WorkDir::new("api");
    let api = dir.join("api.sock");
    let args: Vec<String> = vec![
        "serve".into(),
        "--api".into(),
        api.display().to_string(),
        "--state".into(),
        dir.join("state").display().to_string(),
    ];
    let daemon = Daemon::start_program(
        &dir,
        "ferrodisk",
        &ferrodisk_bin(),
        &args,
        std::slice::from_ref(&api),
    );
    ferrodisk_cli(&api, &["volume", "create", "vol1", "--size", "64M"]);
    let sock = dir.join("vol1.sock");
    let out = ferrodisk_cli(
        &api,
        &[
            "attach",
            "--volume",
            "vol1",
            "--instance",
            "vm-1",
            "--context",
            "os=linux",
            "--socket",
            sock.to_str().unwrap(),
            "--queues",
            "2",
        ],
    );
    assert!(out.contains("attached vol1@vm-1"), "{out}");

    let mut vm = Vm::new(&dir, "guest", VmDisk::only(&sock, 2));
    vm.smp = 2;
    vm.timeout = Duration::from_secs(180);
    // The guest reports its size, waits for the host to grow the disk, and reports again.
    let mut running = vm.spawn(
        r#"
wait_dev /dev/vda
kv size.before "$(cat /sys/block/vda/size)"
echo READY-FOR-RESIZE
n=0
while [ "$(cat /sys/block/vda/size)" = "131072" ] && [ $n -lt 600 ]; do sleep 0.1; n=$((n+1)); done
kv size.after "$(cat /sys/block/vda/size)"
step write-new-end dd if=/dev/urandom of=/dev/vda bs=1M seek=90 count=6 oflag=direct
step read-new-end dd if=/dev/vda of=/dev/null bs=1M skip=90 count=6 iflag=direct
dmesg | grep -i "capacity change" | tail -n 2
"#,
    );
    running.wait_for_console("READY-FOR-RESIZE", Duration::from_secs(120));
    let out = ferrodisk_cli(&api, &["volume", "resize", "vol1", "--size", "96M"]);
    assert!(out.contains("96MiB"), "{out}");
    let report = running.wait();
    report.assert_all_ok();
    assert_eq!(report.kv("size.before"), "131072", "64 MiB in sectors");
    assert_eq!(
        report.kv("size.after"),
        "196608",
        "the guest sees 96 MiB without a reboot"
    );

    let stats = ferrodisk_cli(&api, &["stats", "vol1@vm-1", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert!(
        v[0]["stats"]["totals"]["writes"].as_u64().unwrap() >= 6,
        "{stats}"
    );
    // The guest is gone: detach drains and removes the socket.
    let out = ferrodisk_cli(&api, &["detach", "vol1@vm-1"]);
    assert!(out.contains("detached"), "{out}");
    assert!(!sock.exists());
    let out = ferrodisk_cli(&api, &["volume", "list"]);
    assert!(out.contains("vol1") && out.contains("96MiB"), "{out}");
    daemon.stop();
}
