//! Seccomp filters for the threads that handle data from outside: the queue workers (guest
//! requests) and the replica server's connection and applier threads (frames from the
//! network).
//!
//! Each filter is an allow-list of system calls, built with `seccompiler` (as firecracker
//! and cloud-hypervisor do) and installed by the thread itself, for itself only (no TSYNC):
//! the other threads of the daemon (the API, the frontend-message thread, replication links)
//! open files and sockets and keep their full rights. The queue workers are started by
//! vhost-user-backend, not by us, so a worker installs its filter on its first
//! `handle_event`, before it looks at its queue ([`enter`] does it once per thread).
//!
//! What is allowed, and why, is listed in [`worker_syscalls`] and [`replica_syscalls`]; it
//! was derived by reading the code and checked by running the test suites under `strace -f`
//! (see `docs/architecture.md`, "Sandboxing"). Some entries look at arguments: `mmap` and
//! `mprotect` may not make memory executable, and `fcntl`, `ioctl`, `prctl`, `setsockopt`,
//! `shutdown` and `io_uring_register` are allowed only for the commands we use. A second
//! filter on the queue workers answers file look-ups with `EACCES` (`soft_refusals`).
//!
//! What a thread gets for a system call outside its list depends on the [`Mode`]:
//! `trap` (the default) sends SIGSYS, whose handler names the system call on stderr and then
//! exits with status 159 (128 + SIGSYS); `kill` ends the process at once
//! (`SECCOMP_RET_KILL_PROCESS`, no message); `log` allows the call but has the kernel log it
//! (audit); `off` installs nothing.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Once;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// What a filtered thread gets for a system call outside its allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// The kernel kills the process (SIGSYS, core dump).
    Kill,
    /// SIGSYS: a handler names the system call on stderr, then the process exits (159).
    Trap,
    /// Allowed, and logged by the kernel (audit log): for finding a missing entry.
    Log,
    /// No filter.
    Off,
}

impl Mode {
    fn to_u8(self) -> u8 {
        match self {
            Mode::Kill => 0,
            Mode::Trap => 1,
            Mode::Log => 2,
            Mode::Off => 3,
        }
    }

    fn from_u8(v: u8) -> Mode {
        match v {
            0 => Mode::Kill,
            1 => Mode::Trap,
            2 => Mode::Log,
            _ => Mode::Off,
        }
    }
}

/// The threads that get a filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A vhost-user queue worker (`vring_worker`): guest requests, io_uring, replication
    /// frames sent non-blocking.
    QueueWorker,
    /// A replica server's connection thread (`replica-PEER`) and applier (`apply-VOLUME`).
    Replica,
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the seccomp filter")]
    Build(#[source] seccompiler::BackendError),
    #[error("cannot install the seccomp filter")]
    Apply(#[source] seccompiler::Error),
    #[error("this architecture ({0}) has no seccomp filter")]
    Arch(&'static str),
    #[error("cannot install the SIGSYS handler")]
    Handler(#[source] io::Error),
}

/// The process-wide mode, set once at start from `--seccomp`.
static MODE: AtomicU8 = AtomicU8::new(1);

/// Sets the mode for every filter installed from now on.
pub fn set_mode(mode: Mode) {
    MODE.store(mode.to_u8(), Ordering::Release);
}

/// The mode filters are installed with.
pub fn mode() -> Mode {
    Mode::from_u8(MODE.load(Ordering::Acquire))
}

thread_local! {
    /// Whether this thread has installed its filter (or decided it needs none).
    static ENTERED: Cell<bool> = const { Cell::new(false) };
    /// Whether this thread runs under its filter.
    static FILTERED: Cell<bool> = const { Cell::new(false) };
}

/// Whether the calling thread has installed a filter with [`enter`].
pub fn filtered() -> bool {
    FILTERED.with(Cell::get)
}

/// A panic on a filtered thread is reported without a backtrace: resolving one opens the
/// executable and `/proc/self/maps`, which the filter refuses, and that would turn a
/// contained panic (a driver image's, caught at its boundary) into the daemon's exit.
/// Other threads keep the default report.
fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if filtered() {
                let t = std::thread::current();
                eprintln!(
                    "thread '{}' {info}\n(no backtrace: the thread is sandboxed)",
                    t.name().unwrap_or("<unnamed>")
                );
            } else {
                default(info);
            }
        }));
    });
}

/// Installs the filter of `role` on the calling thread, once: later calls on the same thread
/// do nothing. Returns whether a filter was installed by this call.
pub fn enter(role: Role) -> Result<bool, SeccompError> {
    if ENTERED.with(Cell::get) {
        return Ok(false);
    }
    ENTERED.with(|e| e.set(true));
    let mode = mode();
    if mode == Mode::Off {
        return Ok(false);
    }
    install_panic_hook();
    apply(role, mode)?;
    FILTERED.with(|f| f.set(true));
    tracing::debug!(?role, ?mode, "seccomp filter installed on this thread");
    Ok(true)
}

/// Like [`enter`], for a thread that cannot run without its filter: a failure to install it
/// is logged and ends the process (a sandbox that silently is not there is worse).
pub fn enter_or_exit(role: Role) {
    if let Err(e) = enter(role) {
        tracing::error!(?role, "{}", crate::api::chain(&e));
        std::process::exit(1);
    }
}

/// Installs the filter of `role` with `mode` on the calling thread (not on the others).
pub fn apply(role: Role, mode: Mode) -> Result<(), SeccompError> {
    let Some(prog) = program(role, mode)? else {
        return Ok(());
    };
    if mode == Mode::Trap {
        install_sigsys_handler()?;
    }
    // The refusals first: once the allow-list is in place, installing a filter is refused.
    if let Some(refusals) = refusal_program(role, mode)? {
        seccompiler::apply_filter(&refusals).map_err(SeccompError::Apply)?;
    }
    seccompiler::apply_filter(&prog).map_err(SeccompError::Apply)
}

/// A second filter, for the system calls a thread must not make but that code it runs may
/// try (see [`soft_refusals`]): they fail with `EACCES`. The allow-list lets them through,
/// and the kernel takes the stricter answer of the two filters.
fn refusal_program(role: Role, mode: Mode) -> Result<Option<BpfProgram>, SeccompError> {
    if matches!(mode, Mode::Log | Mode::Off) {
        return Ok(None);
    }
    let list = soft_refusals(role);
    if list.is_empty() {
        return Ok(None);
    }
    let arch: TargetArch = std::env::consts::ARCH
        .try_into()
        .map_err(|_| SeccompError::Arch(std::env::consts::ARCH))?;
    let rules = list.into_iter().map(|nr| (nr, Vec::new())).collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EACCES as u32),
        arch,
    )
    .map_err(SeccompError::Build)?;
    let prog: BpfProgram = filter.try_into().map_err(SeccompError::Build)?;
    Ok(Some(prog))
}

/// File look-ups a queue worker never makes for its own work, refused with `EACCES`
/// rather than ending the process: a driver image that panics (caught at its boundary)
/// has its own copy of std, which resolves a backtrace by opening the executable and
/// `/proc/self/maps` when `RUST_BACKTRACE` is set. Refused, the backtrace has no symbols
/// and the panic stays contained.
fn soft_refusals(role: Role) -> Vec<i64> {
    match role {
        Role::QueueWorker => vec![
            libc::SYS_openat,
            libc::SYS_statx,
            libc::SYS_newfstatat,
            libc::SYS_getcwd,
            libc::SYS_readlinkat,
            libc::SYS_faccessat,
            #[cfg(target_arch = "x86_64")]
            libc::SYS_open,
            #[cfg(target_arch = "x86_64")]
            libc::SYS_stat,
            #[cfg(target_arch = "x86_64")]
            libc::SYS_lstat,
            #[cfg(target_arch = "x86_64")]
            libc::SYS_readlink,
            #[cfg(target_arch = "x86_64")]
            libc::SYS_access,
        ],
        Role::Replica => Vec::new(),
    }
}

/// The allow-list program of `role` (`None` for [`Mode::Off`]). Only ever installed with
/// its [`refusal_program`] (see [`apply`]).
fn program(role: Role, mode: Mode) -> Result<Option<BpfProgram>, SeccompError> {
    let mismatch = match mode {
        Mode::Kill => SeccompAction::KillProcess,
        Mode::Trap => SeccompAction::Trap,
        Mode::Log => SeccompAction::Log,
        Mode::Off => return Ok(None),
    };
    let arch: TargetArch = std::env::consts::ARCH
        .try_into()
        .map_err(|_| SeccompError::Arch(std::env::consts::ARCH))?;
    let list = match role {
        Role::QueueWorker => worker_syscalls(),
        Role::Replica => replica_syscalls(),
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for entry in list.map_err(SeccompError::Build)? {
        rules.entry(entry.0).or_default().extend(entry.1);
    }
    if refusal_program(role, mode)?.is_some() {
        // Let them through here: the refusal filter answers EACCES, and a trap or a kill
        // here would take precedence over it.
        for nr in soft_refusals(role) {
            rules.insert(nr, Vec::new());
        }
    }
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch)
        .map_err(SeccompError::Build)?;
    let prog: BpfProgram = filter.try_into().map_err(SeccompError::Build)?;
    Ok(Some(prog))
}

/// One allow-list entry: a system call, and the rules of which one must match (none:
/// allowed with any arguments).
type Entry = (i64, Vec<SeccompRule>);
type Built<T> = Result<T, seccompiler::BackendError>;

fn any(nr: i64) -> Entry {
    (nr, Vec::new())
}

/// `nr` when its argument `arg` (a 32-bit value) is one of `values`.
fn arg_in(nr: i64, arg: u8, values: &[u64]) -> Built<Entry> {
    let rules = values
        .iter()
        .map(|&v| {
            let c = SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, v)?;
            SeccompRule::new(vec![c])
        })
        .collect::<Built<Vec<_>>>()?;
    Ok((nr, rules))
}

/// `setsockopt` for exactly these (level, option name) pairs: an option name alone would
/// also allow the option of that number at every other level.
fn socket_options(pairs: &[(libc::c_int, libc::c_int)]) -> Built<Entry> {
    let rules = pairs
        .iter()
        .map(|&(level, name)| {
            let eq = |arg, v: libc::c_int| {
                SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, v as u64)
            };
            SeccompRule::new(vec![eq(1, level)?, eq(2, name)?])
        })
        .collect::<Built<Vec<_>>>()?;
    Ok((libc::SYS_setsockopt, rules))
}

/// `nr` (`mmap` or `mprotect`) when its protection (argument 2) lacks `PROT_EXEC`: no
/// filtered thread loads code (driver images are loaded by the API thread, before their
/// queues start).
fn no_exec(nr: i64) -> Built<Entry> {
    let c = SeccompCondition::new(
        2,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
        0,
    )?;
    Ok((nr, vec![SeccompRule::new(vec![c])?]))
}

/// What every filtered thread needs: memory, locks, time, stderr, closing, thread exit.
fn common_syscalls() -> Built<Vec<Entry>> {
    Ok(vec![
        // Allocation: glibc malloc maps and grows its arenas (mprotect), returns memory
        // (madvise), and falls back to brk; large buffers are remapped by realloc.
        no_exec(libc::SYS_mmap)?,
        no_exec(libc::SYS_mprotect)?,
        any(libc::SYS_munmap),
        any(libc::SYS_madvise),
        any(libc::SYS_mremap),
        any(libc::SYS_brk),
        // Locks, condition variables, channels, thread parking; std's spin loops.
        any(libc::SYS_futex),
        any(libc::SYS_sched_yield),
        // Time: normally the vDSO, a real call on a clock source without one.
        any(libc::SYS_clock_gettime),
        // Logging (stderr), eventfd and timerfd reads and writes; a panic message names
        // the thread id.
        any(libc::SYS_write),
        any(libc::SYS_read),
        // No more than `write`: a vectored write to a descriptor the thread already has
        // (std's `write_vectored`, which a TLS layer writing records uses).
        any(libc::SYS_writev),
        any(libc::SYS_gettid),
        // A thread's first HashMap asks for its random keys.
        any(libc::SYS_getrandom),
        // Dropping an fd (an old memory map's file, a closed connection): std checks it
        // with F_GETFD first in debug builds.
        any(libc::SYS_close),
        arg_in(libc::SYS_fcntl, 1, &[libc::F_GETFD as u64])?,
        // Thread exit (glibc masks signals and frees the alternate signal stack), process
        // exit, and the return from a signal handler.
        any(libc::SYS_rt_sigprocmask),
        any(libc::SYS_sigaltstack),
        any(libc::SYS_rt_sigreturn),
        any(libc::SYS_restart_syscall),
        any(libc::SYS_exit),
        any(libc::SYS_exit_group),
    ])
}

/// The queue workers' allow-list (seen under `strace -f` in the blkio_frontend,
/// durability, replication, driver_images and QEMU guest tests, and read from
/// `worker.rs`, `engine/uring.rs` and the worker's side of `repl/primary.rs`).
pub fn worker_syscalls() -> Built<Vec<Entry>> {
    let mut v = common_syscalls()?;
    v.extend([
        // The worker's epoll: kicks, completions, replica acks, the timer.
        #[cfg(target_arch = "x86_64")]
        any(libc::SYS_epoll_wait),
        any(libc::SYS_epoll_pwait),
        // The engine's ring: submit and reap. Its other calls (setup, register) happen
        // when the queue starts, on the frontend-message thread.
        any(libc::SYS_io_uring_enter),
        // Deferred requests and wake-ups.
        any(libc::SYS_timerfd_settime),
        // A replicated disk's frames, sent with MSG_DONTWAIT; the shutdown of a link the
        // replication state machine drops.
        any(libc::SYS_sendto),
        arg_in(libc::SYS_shutdown, 1, &[libc::SHUT_RDWR as u64])?,
    ]);
    Ok(v)
}

/// `io_uring_register` opcodes (`linux/io_uring.h`): the applier's ring is created
/// disabled, restricted, then enabled (`engine::uring::restricted_ring`).
const IORING_REGISTER_RESTRICTIONS: u64 = 11;
const IORING_REGISTER_ENABLE_RINGS: u64 = 12;

/// `FS_IOC_GETVERSION` (the inode generation, `sys::file_id`).
const FS_IOC_GETVERSION: u64 = 0x8008_7601;

/// The replica server's connection thread's allow-list, which its applier thread inherits
/// (seen under `strace -f` in the replication and durability tests, and read from
/// `repl/replica.rs` and `repl/wire.rs`). Besides the socket and the ring, a replica opens,
/// creates, syncs, renames and removes a volume's image and sidecar (`Open`, `Fence`,
/// `Adopt`, `Drop`), and the connection thread starts the applier.
pub fn replica_syscalls() -> Built<Vec<Entry>> {
    let mut v = common_syscalls()?;
    v.extend([
        // The connection: frames in, replies out, with the handshake's deadline as read
        // and write timeouts.
        any(libc::SYS_recvfrom),
        any(libc::SYS_sendto),
        arg_in(libc::SYS_shutdown, 1, &[libc::SHUT_RDWR as u64])?,
        socket_options(&[
            (libc::SOL_SOCKET, libc::SO_RCVTIMEO),
            (libc::SOL_SOCKET, libc::SO_SNDTIMEO),
            (libc::IPPROTO_TCP, libc::TCP_NODELAY),
        ])?,
        // The sender's second handle on the stream (try_clone).
        arg_in(libc::SYS_fcntl, 1, &[libc::F_DUPFD_CLOEXEC as u64])?,
        // The applier's ring (created in the applier thread, restricted), its synchronous
        // fallbacks, and the batch's fdatasync.
        any(libc::SYS_io_uring_setup),
        arg_in(
            libc::SYS_io_uring_register,
            1,
            &[IORING_REGISTER_RESTRICTIONS, IORING_REGISTER_ENABLE_RINGS],
        )?,
        any(libc::SYS_io_uring_enter),
        any(libc::SYS_pread64),
        any(libc::SYS_pwrite64),
        any(libc::SYS_fdatasync),
        any(libc::SYS_fsync),
        any(libc::SYS_fallocate),
        any(libc::SYS_fadvise64),
        any(libc::SYS_ftruncate),
        // Volume files: image, sidecar (written beside and renamed), directory syncs.
        any(libc::SYS_openat),
        any(libc::SYS_statx),
        any(libc::SYS_newfstatat),
        any(libc::SYS_fstat),
        arg_in(libc::SYS_ioctl, 1, &[FS_IOC_GETVERSION])?,
        #[cfg(target_arch = "x86_64")]
        any(libc::SYS_rename),
        any(libc::SYS_renameat),
        any(libc::SYS_renameat2),
        #[cfg(target_arch = "x86_64")]
        any(libc::SYS_unlink),
        any(libc::SYS_unlinkat),
        // Starting the applier thread (its stack, guard page and name come from the
        // allocation entries and this).
        any(libc::SYS_clone3),
        any(libc::SYS_clone),
        any(libc::SYS_set_robust_list),
        any(libc::SYS_rseq),
        any(libc::SYS_sched_getaffinity),
        arg_in(libc::SYS_prctl, 0, &[libc::PR_SET_NAME as u64])?,
    ]);
    Ok(v)
}

/// A SIGSYS handler for [`Mode::Trap`]: names the refused system call on stderr and exits.
fn install_sigsys_handler() -> Result<(), SeccompError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| result = set_sigsys_handler());
    result.map_err(SeccompError::Handler)
}

/// Runs in a signal handler: only async-signal-safe work (no allocation, no locks).
extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel hands a SIGSYS handler a valid siginfo of a seccomp trap.
    let nr = unsafe { sigsys_syscall(info) };
    let mut msg = [0u8; 96];
    let head = b"ferrodisk: seccomp refused system call ";
    let mut n = head.len();
    msg[..n].copy_from_slice(head);
    n += format_decimal(nr, &mut msg[n..]);
    let tail = b" on a sandboxed thread; exiting\n";
    msg[n..n + tail.len()].copy_from_slice(tail);
    n += tail.len();
    write_stderr_and_exit(&msg[..n], 128 + libc::SIGSYS);
}

/// Writes `v` in decimal into `out`; returns the bytes written (at most 11).
fn format_decimal(v: i32, out: &mut [u8]) -> usize {
    let mut digits = [0u8; 11];
    let mut n = 0;
    let neg = v < 0;
    let mut u = v.unsigned_abs();
    loop {
        digits[n] = b'0' + (u % 10) as u8;
        n += 1;
        u /= 10;
        if u == 0 {
            break;
        }
    }
    let mut w = 0;
    if neg {
        out[0] = b'-';
        w = 1;
    }
    for i in (0..n).rev() {
        out[w] = digits[i];
        w += 1;
    }
    w
}

fn set_sigsys_handler() -> io::Result<()> {
    // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; we fill in the
    // handler (an `extern "C"` function of the right signature for SA_SIGINFO) and pass
    // pointers to locals that live for the call.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            on_sigsys;
        sa.sa_sigaction = handler as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The system call number of a seccomp SIGSYS (`si_syscall`, which `libc` does not name).
///
/// # Safety
/// `info` must point at the siginfo of a SIGSYS that seccomp raised.
unsafe fn sigsys_syscall(info: *const libc::siginfo_t) -> i32 {
    // The kernel's `_sigsys` member of the siginfo union: after `si_signo`, `si_errno`,
    // `si_code` (and padding to pointer alignment) come `_call_addr` (a pointer) and then
    // `_syscall` (an int).
    let union_start = if cfg!(target_pointer_width = "64") {
        16
    } else {
        12
    };
    let offset = union_start + std::mem::size_of::<*const libc::c_void>();
    // SAFETY: the caller guarantees a SIGSYS siginfo, whose `_sigsys._syscall` is at this
    // offset inside the 128-byte siginfo; the read is unaligned-safe.
    unsafe { info.cast::<u8>().add(offset).cast::<i32>().read_unaligned() }
}

/// Async-signal-safe: one `write` to stderr, then `_exit`.
fn write_stderr_and_exit(msg: &[u8], status: i32) -> ! {
    // SAFETY: `msg` is a valid buffer for the call; `_exit` never returns and runs no
    // destructors or atexit handlers, so it is safe inside a signal handler.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::_exit(status)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;
    use std::process::Command;

    use super::*;

    const CHILD: &str = "FERRODISK_SECCOMP_TEST_CHILD";

    /// In a child process (run by the tests below): a thread installs the worker filter,
    /// does what a worker does, then calls `socket()` (or maps executable memory).
    #[test]
    fn child_makes_a_forbidden_call_under_the_worker_filter() {
        let Ok(how) = std::env::var(CHILD) else {
            return; // only meaningful in the child
        };
        let (mode, call) = how.split_once(',').unwrap();
        let call = call.to_string();
        let mode = match mode {
            "kill" => Mode::Kill,
            "trap" => Mode::Trap,
            _ => Mode::Log,
        };
        set_mode(mode);
        let efd = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        let t = std::thread::spawn(move || {
            assert!(
                enter(Role::QueueWorker).unwrap(),
                "installed by the first call"
            );
            assert!(
                !enter(Role::QueueWorker).unwrap(),
                "and only once per thread"
            );
            assert!(filtered());
            // What a worker does: allocate, lock, log, use an eventfd.
            let v: Vec<u8> = vec![7; 1 << 20];
            let m = std::sync::Mutex::new(v.len());
            *m.lock().unwrap() += 1;
            efd.write(1).unwrap();
            assert_eq!(efd.read().unwrap(), 1);
            drop(efd);
            eprintln!("worker calls done");
            let r = match call.as_str() {
                // SAFETY: plain system calls on no memory of ours; the result is checked.
                "socket" => unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) },
                // SAFETY: a NUL-terminated path that lives for the call.
                "open" => unsafe {
                    let fd = libc::open(c"/proc/self/maps".as_ptr(), libc::O_RDONLY);
                    let errno = io::Error::last_os_error().raw_os_error().unwrap();
                    eprintln!("open errno {errno}");
                    fd
                },
                // SAFETY: an anonymous mapping the test never uses; unmapped below.
                _ => unsafe {
                    let p = libc::mmap(
                        std::ptr::null_mut(),
                        4096,
                        libc::PROT_READ | libc::PROT_EXEC,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    );
                    if p == libc::MAP_FAILED {
                        -1
                    } else {
                        libc::munmap(p, 4096)
                    }
                },
            };
            eprintln!("{call} returned {r}");
        });
        t.join().unwrap();
        // The filter is the thread's own: this thread may still do anything.
        // SAFETY: as above.
        let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        assert!(s >= 0, "the main thread has no filter");
        // SAFETY: `s` is our socket.
        unsafe { libc::close(s) };
    }

    fn run_child(how: &str) -> std::process::Output {
        Command::new(std::env::current_exe().unwrap())
            .args([
                "seccomp::tests::child_makes_a_forbidden_call_under_the_worker_filter",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD, how)
            .output()
            .unwrap()
    }

    #[test]
    fn kill_mode_kills_the_process_on_a_forbidden_call() {
        let out = run_child("kill,socket");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("worker calls done"), "{err}");
        assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{err}");
        assert!(!err.contains("socket returned"), "{err}");
    }

    #[test]
    fn trap_mode_names_the_call_and_exits() {
        let out = run_child("trap,socket");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("worker calls done"), "{err}");
        assert_eq!(out.status.code(), Some(159), "{err}");
        let msg = format!("seccomp refused system call {} ", libc::SYS_socket);
        assert!(err.contains(&msg), "{err}");
    }

    #[test]
    fn executable_memory_is_refused() {
        let out = run_child("trap,mmap-exec");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(159), "{err}");
        let msg = format!("seccomp refused system call {} ", libc::SYS_mmap);
        assert!(err.contains(&msg), "{err}");
    }

    #[test]
    fn file_lookups_fail_with_eacces_and_the_process_goes_on() {
        for mode in ["trap", "kill"] {
            let out = run_child(&format!("{mode},open"));
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{mode}: {err}");
            assert!(err.contains("open returned -1"), "{mode}: {err}");
            assert!(
                err.contains(&format!("open errno {}", libc::EACCES)),
                "{err}"
            );
        }
    }

    #[test]
    fn log_mode_allows_the_call() {
        let out = run_child("log,socket");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        assert!(err.contains("socket returned"), "{err}");
        assert!(!err.contains("socket returned -1"), "{err}");
    }

    #[test]
    fn the_programs_build_for_this_architecture() {
        for role in [Role::QueueWorker, Role::Replica] {
            for mode in [Mode::Kill, Mode::Trap, Mode::Log] {
                let p = program(role, mode).unwrap().unwrap();
                assert!(p.len() > 10 && p.len() < 4096);
            }
            assert!(program(role, Mode::Off).unwrap().is_none());
        }
    }

    #[test]
    fn decimal() {
        let mut b = [0u8; 11];
        let n = format_decimal(-2147483648, &mut b);
        assert_eq!(&b[..n], b"-2147483648");
        let n = format_decimal(41, &mut b);
        assert_eq!(&b[..n], b"41");
    }
}
