//! Shared fixtures for the in-process frontend tests: a `ferrodisk serve` child process that
//! is always killed, and a libblkio client (an independent vhost-user-blk frontend).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, ReqFlags};

pub mod api_daemon;

pub const BIN: &str = env!("CARGO_BIN_EXE_ferrodisk");

/// A running daemon. Dropping it kills the process.
pub struct Daemon {
    pub child: Option<Child>,
    pub socket: PathBuf,
}

impl Daemon {
    /// Starts `ferrodisk serve --disk SPEC...` and waits for the first socket.
    pub fn start(specs: &[String], socket: &Path) -> Daemon {
        let mut cmd = Command::new(BIN);
        cmd.arg("serve");
        for s in specs {
            cmd.arg("--disk").arg(s);
        }
        let child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn ferrodisk");
        let mut d = Daemon {
            child: Some(child),
            socket: socket.to_path_buf(),
        };
        d.wait_for_socket();
        d
    }

    fn wait_for_socket(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.socket.exists() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("ferrodisk exited early: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "socket {} never appeared",
                self.socket.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends SIGTERM and waits (bounded) for exit; returns the status and stdout.
    pub fn terminate(mut self) -> (ExitStatus, String) {
        let mut child = self.child.take().unwrap();
        signal(&child, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let mut out = String::new();
                use std::io::Read;
                child
                    .stdout
                    .take()
                    .unwrap()
                    .read_to_string(&mut out)
                    .unwrap();
                return (status, out);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("ferrodisk did not exit within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn signal(child: &Child, sig: i32) {
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, sig) };
}

/// Creates a sparse file of `size` bytes.
pub fn make_image(path: &Path, size: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
}

/// A libblkio virtio-blk-vhost-user client with one shared buffer region.
pub struct Client {
    pub blkio: Blkio,
    pub queues: Vec<Blkioq>,
    pub buf: *mut u8,
    pub buf_len: usize,
    pub capacity: u64,
}

pub const BUF_LEN: usize = 8 << 20;

impl Client {
    pub fn connect(socket: &Path, queues: i32, read_only: bool) -> Result<Client, blkio::Error> {
        let mut b = Blkio::new("virtio-blk-vhost-user")?;
        b.set_str("path", socket.to_str().unwrap())?;
        b.set_bool("read-only", read_only)?;
        b.connect()?;
        b.set_i32("num-queues", queues)?;
        let out = b.start()?;
        let region = b.alloc_mem_region(BUF_LEN)?;
        b.map_mem_region(&region)?;
        let capacity = b.get_u64("capacity")?;
        Ok(Client {
            queues: out.queues,
            buf: region.addr as *mut u8,
            buf_len: BUF_LEN,
            capacity,
            blkio: b,
        })
    }

    pub fn buf(&mut self) -> &mut [u8] {
        // SAFETY: the region is mapped for the life of `blkio`, which `self` owns; only this
        // thread touches it, and only while no request using it is in flight.
        unsafe { std::slice::from_raw_parts_mut(self.buf, self.buf_len) }
    }

    /// Waits for one completion on queue `q`; returns its `ret` (0 or -errno).
    pub fn wait(&mut self, q: usize) -> i32 {
        let mut c = [std::mem::MaybeUninit::<Completion>::uninit()];
        let mut timeout = Duration::from_secs(20);
        let n = self.queues[q]
            .do_io(&mut c, 1, Some(&mut timeout), None)
            .expect("do_io");
        assert_eq!(n, 1, "no completion within 20 s");
        // SAFETY: do_io initialized the first `n` completions.
        unsafe { c[0].assume_init_read() }.ret
    }

    /// Writes `data` at `offset` through queue `q` (staged at buffer offset 0).
    pub fn write(&mut self, q: usize, offset: u64, data: &[u8], flags: ReqFlags) -> i32 {
        self.buf()[..data.len()].copy_from_slice(data);
        let p = self.buf;
        self.queues[q].write(offset, p, data.len(), 0, flags);
        self.wait(q)
    }

    /// Reads `len` bytes at `offset` through queue `q`.
    pub fn read(&mut self, q: usize, offset: u64, len: usize) -> Result<Vec<u8>, i32> {
        let p = self.buf;
        self.queues[q].read(offset, p, len, 0, ReqFlags::empty());
        match self.wait(q) {
            0 => Ok(self.buf()[..len].to_vec()),
            e => Err(e),
        }
    }

    pub fn flush(&mut self, q: usize) -> i32 {
        self.queues[q].flush(0, ReqFlags::empty());
        self.wait(q)
    }
}

/// A deterministic pseudo-random generator (xorshift), so failures reproduce.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Allocated bytes of a file (st_blocks * 512).
pub fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}
