//! Real QEMU guests on Ferrodisk disks (issue #3). Each test boots the test guest under TCG
//! with vhost-user-blk-pci disks served by a `ferrodisk serve` process.

use ferrodisk_vmm_tests::*;

const MIB: u64 = 1 << 20;

fn spec(img: &std::path::Path, sock: &std::path::Path, extra: &str) -> String {
    format!("path={},socket={}{}", img.display(), sock.display(), extra)
}

fn sha_of(r: &GuestReport, key: &str) -> String {
    let v = r.kv(key).to_string();
    assert_eq!(v.len(), 64, "`{key}` is not a sha256: {v:?}");
    v
}

/// Test 1: The disk is visible at its exact size, with its serial and its queue count.
#[test]
fn disk_is_visible_with_size_serial_and_queues() {
    let dir = WorkDir::new("visible");
    let bytes = 300 * MIB + 3 * 512; // deliberately not a round size
    let img = dir.image("disk.img", bytes);
    let sock = dir.join("disk.sock");
    let d = Daemon::start(
        &dir,
        &[spec(&img, &sock, ",queues=2,serial=FD-SERIAL-0042")],
    );
    let mut vm = Vm::new(&dir, "guest", VmDisk::only(&sock, 2));
    vm.smp = 2;
    let r = vm.run(
        r#"
kv size "$(cat /sys/block/vda/size)"
kv serial "$(cat /sys/block/vda/serial)"
kv mq "$(ls /sys/block/vda/mq | wc -l)"
kv ro "$(cat /sys/block/vda/ro)"
step read_last_sector dd if=/dev/vda of=/dev/null bs=512 skip=$(( $(cat /sys/block/vda/size) - 1 )) count=1
"#,
    );
    r.assert_all_ok();
    assert_eq!(r.kv("size"), (bytes / 512).to_string());
    assert_eq!(r.kv("serial"), "FD-SERIAL-0042");
    assert_eq!(r.kv("mq"), "2");
    assert_eq!(r.kv("ro"), "0");
    let stats = d.stop();
    assert!(
        total(&stats, &sock, "get_ids") >= 1,
        "the serial came from GET_ID"
    );
}

/// Test 2: ext4 written by one guest is intact for a second guest on the same daemon.
#[test]
fn ext4_survives_into_a_second_guest() {
    let dir = WorkDir::new("ext4");
    let img = dir.image("disk.img", 256 * MIB);
    let sock = dir.join("disk.sock");
    let d = Daemon::start(&dir, &[spec(&img, &sock, ",direct=on")]);
    let disks = || VmDisk::only(&sock, 1);
    let first = Vm::new(&dir, "writer", disks()).run(
        r#"
step mkfs mkfs.ext4 -q -F /dev/vda
step mount mount /dev/vda /mnt
step write sh -c 'for i in 1 2 3 4 5 6; do dd if=/dev/urandom of=/mnt/f$i bs=64k count=$((i * 7)) 2>/dev/null || exit 1; done; mkdir -p /mnt/d/e && echo hello > /mnt/d/e/g'
for i in 1 2 3 4 5 6; do kv sum.f$i "$(sha256sum /mnt/f$i | cut -d' ' -f1)"; done
kv sum.g "$(sha256sum /mnt/d/e/g | cut -d' ' -f1)"
step sync sync
step umount umount /mnt
"#,
    );
    first.assert_all_ok();
    let second = Vm::new(&dir, "reader", disks()).run(
        r#"
step fsck e2fsck -fn /dev/vda
step mount mount -o ro /dev/vda /mnt
for i in 1 2 3 4 5 6; do kv sum.f$i "$(sha256sum /mnt/f$i | cut -d' ' -f1)"; done
kv sum.g "$(sha256sum /mnt/d/e/g | cut -d' ' -f1)"
step umount umount /mnt
"#,
    );
    second.assert_all_ok();
    for key in [
        "sum.f1", "sum.f2", "sum.f3", "sum.f4", "sum.f5", "sum.f6", "sum.g",
    ] {
        assert_eq!(
            sha_of(&first, key),
            sha_of(&second, key),
            "{key} differs between guests"
        );
    }
    d.stop();
}

/// Test 3: fio with crc32c verification, mixed sizes, two jobs on two queues.
#[test]
fn fio_verify_on_two_queues() {
    let dir = WorkDir::new("fio");
    let img = dir.image("disk.img", 128 * MIB);
    let sock = dir.join("disk.sock");
    let d = Daemon::start(&dir, &[spec(&img, &sock, ",queues=2,direct=on")]);
    let mut vm = Vm::new(&dir, "guest", VmDisk::only(&sock, 2));
    vm.smp = 2;
    vm.timeout = std::time::Duration::from_secs(300);
    let r = vm.run(
        r#"
step fio fio --name=verify --filename=/dev/vda --direct=1 --ioengine=libaio --rw=randwrite --bssplit=4k/30:16k/20:64k/25:256k/25 --iodepth=16 --numjobs=2 --size=24M --offset_increment=32M --verify=crc32c --verify_fatal=1 --cpus_allowed=0-1 --cpus_allowed_policy=split --group_reporting --output-format=terse
"#,
    );
    r.assert_all_ok();
    let stats = d.stop();
    assert_eq!(total(&stats, &sock, "errors_ioerr"), 0);
    for q in 0..2 {
        let writes = per_queue(&stats, &sock, q, "writes");
        let reads = per_queue(&stats, &sock, q, "reads");
        assert!(
            writes > 50 && reads > 50,
            "queue {q} carried too little I/O: {writes} writes, {reads} reads"
        );
    }
}

/// Test 4: fstrim frees space in the backing file; blkdiscard and blkdiscard -z read back zeros.
#[test]
fn discard_and_write_zeroes_from_the_guest() {
    let dir = WorkDir::new("discard");
    let img = dir.image("disk.img", 192 * MIB);
    let sock = dir.join("disk.sock");
    let d = Daemon::start(&dir, &[spec(&img, &sock, "")]);
    let disks = || VmDisk::only(&sock, 1);
    Vm::new(&dir, "fill", disks())
        .run(
            r#"
step mkfs mkfs.ext4 -q -F -E nodiscard /dev/vda
step mount mount /dev/vda /mnt
step fill dd if=/dev/urandom of=/mnt/big bs=1M count=96
step rm sh -c 'sync && rm /mnt/big && sync'
step umount umount /mnt
"#,
        )
        .assert_all_ok();
    let filled = allocated_bytes(&img);
    assert!(
        filled >= 96 * MIB,
        "the backing file holds only {filled} bytes after the fill"
    );
    Vm::new(&dir, "trim", disks())
        .run(
            r#"
step mount mount /dev/vda /mnt
step fstrim fstrim -v /mnt
step umount umount /mnt
"#,
        )
        .assert_all_ok();
    let trimmed = allocated_bytes(&img);
    assert!(
        trimmed + 64 * MIB <= filled,
        "fstrim freed too little: {filled} -> {trimmed} bytes"
    );
    let r = Vm::new(&dir, "raw", disks()).run(
        r#"
step pattern dd if=/dev/urandom of=/dev/vda bs=1M count=4 conv=fsync
kv before3 "$(dd if=/dev/vda bs=1M skip=3 count=1 2>/dev/null | sha256sum | cut -d' ' -f1)"
step discard blkdiscard -o 0 -l 1048576 /dev/vda
step zeroout blkdiscard -z -o 1048576 -l 1048576 /dev/vda
echo 3 > /proc/sys/vm/drop_caches
kv mib0 "$(dd if=/dev/vda bs=1M skip=0 count=1 2>/dev/null | sha256sum | cut -d' ' -f1)"
kv mib1 "$(dd if=/dev/vda bs=1M skip=1 count=1 2>/dev/null | sha256sum | cut -d' ' -f1)"
kv mib3 "$(dd if=/dev/vda bs=1M skip=3 count=1 2>/dev/null | sha256sum | cut -d' ' -f1)"
kv zeros "$(dd if=/dev/zero bs=1M count=1 2>/dev/null | sha256sum | cut -d' ' -f1)"
"#,
    );
    r.assert_all_ok();
    let zeros = sha_of(&r, "zeros");
    assert_eq!(
        sha_of(&r, "mib0"),
        zeros,
        "discarded range does not read as zeros"
    );
    assert_eq!(
        sha_of(&r, "mib1"),
        zeros,
        "write-zeroes range does not read as zeros"
    );
    assert_eq!(
        sha_of(&r, "mib3"),
        sha_of(&r, "before3"),
        "untouched range changed"
    );
    assert_ne!(sha_of(&r, "mib3"), zeros);
    let stats = d.stop();
    assert!(
        total(&stats, &sock, "discards") >= 2,
        "fstrim and blkdiscard send discards"
    );
    assert!(
        total(&stats, &sock, "write_zeroes") >= 1,
        "blkdiscard -z sends write-zeroes"
    );
}

/// Test 5: A read-only disk. The guest sees ro; writes fail (EPERM on the raw device, EROFS
/// on a mounted file system); reads keep working, and the image is untouched.
///
/// Linux enforces a hardware read-only flag in its block layer (even after
/// `blockdev --setrw`), so a guest never sends the write; the daemon's own refusal of writes
/// to a read-only disk is covered by the request parser's tests.
#[test]
fn read_only_disk() {
    let dir = WorkDir::new("readonly");
    let img = dir.join("disk.img");
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("hello.txt"), "hello from the host\n").unwrap();
    let out = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&src)
        .arg(&img)
        .arg("32M")
        .output()
        .expect("mkfs.ext4 is missing on the host: apt-get install e2fsprogs");
    assert!(
        out.status.success(),
        "mkfs.ext4: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let content = std::fs::read(&img).unwrap();
    let sock = dir.join("disk.sock");
    let mut d = Daemon::start(&dir, &[spec(&img, &sock, ",readonly=on")]);
    let r = Vm::new(&dir, "guest", VmDisk::only(&sock, 1)).run(
        r#"
kv ro "$(cat /sys/block/vda/ro)"
kv before "$(dd if=/dev/vda bs=1M count=32 2>/dev/null | sha256sum | cut -d' ' -f1)"
step raw_write_fails sh -c 'out=$(dd if=/dev/zero of=/dev/vda bs=4k count=1 conv=fsync 2>&1); rc=$?; echo "$out"; [ $rc -ne 0 ] && echo "$out" | grep -q "Operation not permitted"'
step mount sh -c 'mount -t ext4 /dev/vda /mnt 2>&1; grep -q "^/dev/vda /mnt ext4 ro" /proc/mounts'
kv hello "$(cat /mnt/hello.txt)"
step touch_erofs sh -c 'out=$(touch /mnt/new 2>&1); rc=$?; echo "$out"; [ $rc -ne 0 ] && echo "$out" | grep -q "Read-only file system"'
step umount umount /mnt
echo 3 > /proc/sys/vm/drop_caches
kv after "$(dd if=/dev/vda bs=1M count=32 2>/dev/null | sha256sum | cut -d' ' -f1)"
"#,
    );
    r.assert_all_ok();
    assert_eq!(r.kv("ro"), "1");
    assert_eq!(r.kv("hello"), "hello from the host");
    assert_eq!(
        sha_of(&r, "before"),
        sha_of(&r, "after"),
        "reads changed after refused writes"
    );
    assert!(d.alive(), "the daemon died");
    assert_eq!(std::fs::read(&img).unwrap(), content, "the image changed");
    let stats = d.stop();
    assert_eq!(total(&stats, &sock, "writes"), 0);
    assert!(total(&stats, &sock, "reads") > 0);
}

/// Test 6: Two disks from one daemon in one guest, used at the same time.
#[test]
fn two_disks_from_one_daemon() {
    let dir = WorkDir::new("twodisks");
    let (a, b) = (dir.image("a.img", 64 * MIB), dir.image("b.img", 96 * MIB));
    let (sa, sb) = (dir.join("a.sock"), dir.join("b.sock"));
    let d = Daemon::start(
        &dir,
        &[
            spec(&a, &sa, ",serial=disk-a"),
            spec(&b, &sb, ",serial=disk-b,direct=on"),
        ],
    );
    let mut vm = Vm::new(
        &dir,
        "guest",
        vec![
            VmDisk {
                socket: sa.clone(),
                queues: 1,
            },
            VmDisk {
                socket: sb.clone(),
                queues: 1,
            },
        ],
    );
    vm.smp = 2;
    let r = vm.run(
        r#"
kv serials "$(cat /sys/block/vda/serial) $(cat /sys/block/vdb/serial)"
kv sizes "$(cat /sys/block/vda/size) $(cat /sys/block/vdb/size)"
step fio fio --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=8 --size=16M --verify=crc32c --verify_fatal=1 --output-format=terse --name=a --filename=/dev/vda --name=b --filename=/dev/vdb
"#,
    );
    r.assert_all_ok();
    assert_eq!(r.kv("serials"), "disk-a disk-b");
    assert_eq!(
        r.kv("sizes"),
        format!("{} {}", 64 * MIB / 512, 96 * MIB / 512)
    );
    let stats = d.stop();
    for s in [&sa, &sb] {
        assert!(
            total(&stats, s, "writes") >= 4096,
            "{} got too few writes",
            s.display()
        );
    }
}

/// Test 7: fsync in the guest reaches the backend as a flush.
#[test]
fn guest_fsync_reaches_the_backend_as_flush() {
    let dir = WorkDir::new("flush");
    let img = dir.image("disk.img", 64 * MIB);
    let sock = dir.join("disk.sock");
    let run = |name: &str, conv: &str| {
        let d = Daemon::start(&dir, &[spec(&img, &sock, "")]);
        let script = format!(
            "step writes sh -c 'for i in 1 2 3 4 5 6 7 8 9 10; do dd if=/dev/urandom of=/dev/vda bs=4k count=1 seek=$i {conv} 2>/dev/null || exit 1; done'\n"
        );
        Vm::new(&dir, name, VmDisk::only(&sock, 1))
            .run(&script)
            .assert_all_ok();
        total(&d.stop(), &sock, "flushes")
    };
    let without = run("nofsync", "");
    let with = run("fsync", "conv=fsync");
    assert!(
        with >= without + 10,
        "10 fsyncs gave {with} flushes, against {without} without fsync"
    );
}

/// A guest reboot inside one vhost-user connection: QEMU stops the vrings (GET_VRING_BASE)
/// with I/O under way, resets the device and starts it again. The disk must keep working.
#[test]
fn guest_reboot_keeps_the_disk_working() {
    let dir = WorkDir::new("reboot");
    let img = dir.image("disk.img", 64 * MIB);
    let sock = dir.join("disk.sock");
    let d = Daemon::start(&dir, &[spec(&img, &sock, ",queues=2")]);
    let mut vm = Vm::new(&dir, "guest", VmDisk::only(&sock, 2));
    vm.allow_reboot = true;
    vm.smp = 2;
    let r = vm.run(
        r#"
if [ "$(dd if=/dev/vda bs=6 count=1 2>/dev/null)" = REBOOT ]; then
    kv boot second
    step read dd if=/dev/vda of=/dev/null bs=1M count=16
    step fio fio --name=after --filename=/dev/vda --direct=1 --ioengine=libaio --rw=randrw --bs=4k --iodepth=16 --size=8M --offset=8M --verify=crc32c --verify_fatal=1 --output-format=terse
else
    step mark sh -c 'printf REBOOT | dd of=/dev/vda conv=fsync'
    fio --name=load --filename=/dev/vda --direct=1 --ioengine=libaio --rw=randread --bs=4k --iodepth=32 --size=32M --offset=16M --time_based=1 --runtime=30 >/dev/null 2>&1 &
    sleep 1
    reboot -f
fi
"#,
    );
    r.assert_all_ok();
    assert_eq!(r.kv("boot"), "second");
    assert_eq!(r.boots, 2, "the guest did not reboot");
    let stats = d.stop();
    assert_eq!(total(&stats, &sock, "errors_ioerr"), 0);
}
