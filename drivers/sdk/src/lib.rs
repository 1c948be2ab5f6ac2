//! Rust SDK for ferrodisk driver images, ABI version 1 (`docs/driver-abi.md`).
//!
//! A driver image is a `cdylib` that sits in a disk's request path: `submit` sees every read,
//! write, flush, discard and write-zeroes before it is issued (to gate it, delay it, or
//! transform write data into a bounce buffer), and `complete` sees every successful read (to
//! transform the data in place). This crate lets an image be written in safe Rust:
//!
//! - implement [`Driver`] (`init` / `submit` / `complete`, and `NAME`, `VERSION`, `FLAGS`);
//! - call [`export_driver!`] once at the root of the `cdylib`, which emits the five
//!   `#[no_mangle] extern "C"` functions `ferrodisk_driver_info|init|submit|complete|fini`.
//!
//! ```
//! use ferrodisk_driver_sdk::{export_driver, Driver, HostInfo, Req, Verdict};
//!
//! pub struct Nop;
//! impl Driver for Nop {
//!     const NAME: &'static str = "nop";
//!     const VERSION: &'static str = env!("CARGO_PKG_VERSION");
//!     const FLAGS: u32 = 0;
//!     fn init(_host: &HostInfo) -> Result<Self, String> { Ok(Nop) }
//!     fn submit(&self, _req: &mut Req<'_>) -> Verdict { Verdict::Pass }
//! }
//! export_driver!(Nop);
//! ```
//!
//! # What the SDK guarantees at the boundary
//!
//! - **No unwinding into the host.** Every call runs in `catch_unwind`. A panic in `submit`
//!   or `complete` returns [`ERR_PANIC`] (-2); in `init` it returns NULL with the message
//!   `"panic: <payload>"`; in `Drop` (at `fini`) it is swallowed.
//! - **Errors from `init`** are copied into the host's `err` buffer, truncated to `errlen - 1`
//!   bytes at a UTF-8 character boundary, and NUL-terminated (nothing is written when `err`
//!   is NULL or `errlen` is 0).
//! - **Pointer checks.** A NULL instance or request returns [`ERR_INVALID`] (-3); so does a
//!   request the image would read data from whose iovecs do not add up to `len`, an iovec
//!   with a NULL base and a non-zero length, or a write without the bounce buffer an image
//!   with [`WANTS_WRITE_DATA`] needs. `fini(NULL)` does nothing.
//! - **The instance** is a `Box` leaked to the host by `init` (`Box::into_raw`) and taken
//!   back by `fini` (`Box::from_raw`).
//! - **`fd_driver_info`** is a static with NUL-terminated copies of `NAME` and `VERSION`
//!   built at compile time (a NUL inside them is a compile error).
//! - [`Driver::complete`] errors return [`ERR_INTERNAL`] (-1), and the first one of each
//!   attachment is written to stderr (ABI version 1 has no channel for the message).
//!
//! # Layout
//!
//! The `#[repr(C)]` types in [`abi`] are the ones the host uses too (it re-exports them).
//! On 64-bit targets (x86_64, aarch64) their layout is, and a unit test pins it:
//!
//! | type | size | align | field offsets |
//! |------|------|-------|---------------|
//! | [`DriverInfo`] | 24 | 8 | `abi_version` 0, `flags` 4, `name` 8, `version` 16 |
//! | [`Host`] | 48 | 8 | `abi_version` 0, `queues` 4, `capacity` 8, `volume` 16, `instance` 24, `context_json` 32, `config_json` 40 |
//! | [`Request`] | 48 | 8 | `op` 0, `queue` 4, `offset` 8, `len` 16, `iov` 24, `iovcnt` 32, `_reserved` 36, `bounce` 40 |
//! | `struct iovec` | 16 | 8 | `iov_base` 0, `iov_len` 8 |
//!
//! # Data helpers
//!
//! [`Req::data`] iterates the guest's buffers of a write; [`Req::bounce_with_data`] copies
//! them into the bounce buffer to transform in place; [`ReqMut::for_each_sector_mut`] walks a
//! read's buffers in 512-byte sectors across iovec boundaries. See [`request`] for why guest
//! memory is handled this way.
//!
//! [`testing`] calls an image through its C functions, as the host does.

pub mod abi;
mod driver;
pub mod ffi;
pub mod request;
pub mod testing;

pub use abi::{
    DriverInfo, Host, Request, ABI_VERSION, DELAY, ERR_INTERNAL, ERR_INVALID, ERR_PANIC, FAIL,
    OP_DISCARD, OP_FLUSH, OP_READ, OP_WRITE, OP_WRITE_ZEROES, PASS, WANTS_READ_DATA,
    WANTS_WRITE_DATA,
};
pub use driver::{Driver, HostInfo, Op, Verdict};
pub use request::{DataError, Req, ReqMut, SECTOR_SIZE};
/// The JSON crate of [`HostInfo`], for images.
pub use serde_json;

#[cfg(test)]
export_driver!(tests::Probe);

#[cfg(test)]
mod tests {
    //! The SDK's boundary, exercised through the generated extern functions.

    use super::*;
    use crate::testing::{Image, TestHost};
    use serde_json::json;
    use std::ffi::c_char;
    use std::ptr;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// Instances dropped so far (by `fini`).
    static DROPPED: AtomicUsize = AtomicUsize::new(0);

    /// A driver doing what `attach.mode` says; writes are XOR-ed with 0xAA into the bounce
    /// buffer and reads XOR-ed back in `complete`.
    pub struct Probe {
        mode: String,
    }

    impl Drop for Probe {
        fn drop(&mut self) {
            DROPPED.fetch_add(1, Ordering::SeqCst);
            if self.mode == "panic_in_drop" {
                panic!("probe: drop");
            }
        }
    }

    impl Driver for Probe {
        const NAME: &'static str = "probe";
        const VERSION: &'static str = "0.1.2";
        const FLAGS: u32 = WANTS_WRITE_DATA | WANTS_READ_DATA;

        fn init(host: &HostInfo) -> Result<Self, String> {
            let mode = host.attach_config()["mode"]
                .as_str()
                .unwrap_or("pass")
                .to_owned();
            match mode.as_str() {
                "refuse" => Err("probe: refusé — this message is deliberately long".into()),
                "panic_in_init" => panic!("init exploded"),
                _ => Ok(Probe { mode }),
            }
        }

        fn submit(&self, req: &mut Req<'_>) -> Verdict {
            match self.mode.as_str() {
                "fail" => Verdict::Fail,
                "delay" => Verdict::Delay(Duration::from_micros(1500)),
                "error" => Verdict::Error(-42),
                "panic" => panic!("submit exploded at {}", req.offset()),
                _ => {
                    if let Ok(bounce) = req.bounce_with_data() {
                        bounce.iter_mut().for_each(|b| *b ^= 0xAA);
                    }
                    Verdict::Pass
                }
            }
        }

        fn complete(&self, req: &mut ReqMut<'_>, status: i32) -> Result<(), String> {
            match self.mode.as_str() {
                "panic" => panic!("complete exploded"),
                "error" => Err(format!("probe: complete refused (status {status})")),
                _ => req
                    .for_each_buffer_mut(|b| b.iter_mut().for_each(|x| *x ^= 0xAA))
                    .map_err(|e| e.to_string()),
            }
        }
    }

    fn image() -> Image {
        exported_image!()
    }

    fn host(mode: &str) -> TestHost {
        TestHost::new(&json!({}), &json!({"image": {}, "attach": {"mode": mode}}))
    }

    #[test]
    fn info_is_static_and_nul_terminated() {
        let (info, name, version) = image().info();
        assert_eq!(
            (info.abi_version, info.flags),
            (1, WANTS_WRITE_DATA | WANTS_READ_DATA)
        );
        assert_eq!((name.as_str(), version.as_str()), ("probe", "0.1.2"));
        assert_eq!(
            ferrodisk_driver_info(),
            ferrodisk_driver_info(),
            "one static"
        );
    }

    #[test]
    fn submit_verdicts() {
        let pass = image().attach(&host("pass")).unwrap();
        assert_eq!(pass.submit_range(Op::Flush, 0, 0, 0), (PASS, 0));
        let fail = image().attach(&host("fail")).unwrap();
        assert_eq!(fail.submit_range(Op::Flush, 0, 0, 0), (FAIL, 0));
        let delay = image().attach(&host("delay")).unwrap();
        assert_eq!(delay.submit_range(Op::Flush, 1, 0, 0), (DELAY, 1_500_000));
        let error = image().attach(&host("error")).unwrap();
        assert_eq!(error.submit_range(Op::Flush, 0, 0, 0), (-42, 0));
    }

    #[test]
    fn panics_are_contained() {
        let attached = image().attach(&host("panic")).unwrap();
        assert_eq!(
            attached.submit_range(Op::Discard, 0, 4096, 512).0,
            ERR_PANIC
        );
        let mut buf = [0u8; 16];
        assert_eq!(attached.complete_read(0, 0, &mut [&mut buf], 0), ERR_PANIC);
        // The instance is still usable after a contained panic (the host fails it anyway).
        assert_eq!(attached.submit_range(Op::Flush, 0, 0, 0).0, ERR_PANIC);
        let err = image().attach(&host("panic_in_init")).unwrap_err();
        assert_eq!(err, "panic: init exploded");
    }

    #[test]
    fn init_errors_are_truncated_and_terminated() {
        let full = "probe: refusé — this message is deliberately long";
        assert_eq!(image().attach(&host("refuse")).unwrap_err(), full);
        assert_eq!(
            image().attach_with_errlen(&host("refuse"), 8).unwrap_err(),
            "probe: "
        );
        assert_eq!(
            image().attach_with_errlen(&host("refuse"), 1).unwrap_err(),
            ""
        );
        // "é" is 2 bytes at 12..14: a cut inside it backs off to the boundary.
        assert_eq!(
            image().attach_with_errlen(&host("refuse"), 14).unwrap_err(),
            "probe: refus"
        );
        assert_eq!(
            image().attach_with_errlen(&host("refuse"), 15).unwrap_err(),
            "probe: refusé"
        );
        let raw = host("refuse").raw();
        // SAFETY: `raw`'s strings outlive the calls; a NULL or empty error buffer is allowed.
        unsafe {
            assert!(ferrodisk_driver_init(&raw, ptr::null_mut(), 64).is_null());
            let mut one = [0x55 as c_char; 1];
            assert!(ferrodisk_driver_init(&raw, one.as_mut_ptr(), 0).is_null());
            assert_eq!(one[0], 0x55, "errlen 0: nothing written");
        }
    }

    #[test]
    fn init_reports_bad_host_input() {
        let bad = TestHost::from_json_text("{}", "{not json");
        let err = image().attach(&bad).unwrap_err();
        assert!(
            err.starts_with("probe: config_json is not valid JSON"),
            "{err}"
        );
        let mut old = host("pass");
        old.abi_version = 0;
        let err = image().attach(&old).unwrap_err();
        assert!(err.contains("ABI version 0"), "{err}");
        let mut err = [0 as c_char; 64];
        // SAFETY: NULL host is allowed; `err` is valid for 64 bytes.
        assert!(unsafe { ferrodisk_driver_init(ptr::null(), err.as_mut_ptr(), 64) }.is_null());
    }

    #[test]
    fn writes_go_through_the_bounce_buffer_and_reads_are_transformed() {
        let attached = image().attach(&host("pass")).unwrap();
        let (a, b) = (vec![1u8; 5], vec![2u8; 3]);
        let mut bounce = vec![0u8; 8];
        assert_eq!(
            attached
                .submit(Op::Write, 0, 0, &[&a, &b], Some(&mut bounce))
                .0,
            PASS
        );
        assert_eq!(bounce, [0xAB, 0xAB, 0xAB, 0xAB, 0xAB, 0xA8, 0xA8, 0xA8]);
        assert_eq!(
            (a, b),
            (vec![1u8; 5], vec![2u8; 3]),
            "guest buffers untouched"
        );
        let (mut x, mut y) = (bounce[..2].to_vec(), bounce[2..].to_vec());
        assert_eq!(attached.complete_read(1, 0, &mut [&mut x, &mut y], 0), 0);
        assert_eq!([x, y].concat(), [1, 1, 1, 1, 1, 2, 2, 2]);
        // A write without the bounce buffer the flags promise is refused before the image.
        assert_eq!(
            attached.submit(Op::Write, 0, 0, &[&[1u8; 4]], None).0,
            ERR_INVALID
        );
    }

    #[test]
    fn complete_errors_are_internal_errors() {
        let attached = image().attach(&host("error")).unwrap();
        let mut buf = [0u8; 4];
        assert_eq!(
            attached.complete_read(0, 0, &mut [&mut buf], 0),
            ERR_INTERNAL
        );
        assert_eq!(
            attached.complete_read(0, 0, &mut [&mut buf], 0),
            ERR_INTERNAL
        );
    }

    #[test]
    fn null_pointers_are_refused() {
        let attached = image().attach(&host("pass")).unwrap();
        let req = testing::request(Op::Flush, 0, 0, 0, &[], ptr::null_mut());
        let mut delay = 0;
        // SAFETY: NULL pointers are what is tested; the others are valid.
        unsafe {
            assert_eq!(
                ferrodisk_driver_submit(ptr::null_mut(), &req, &mut delay),
                ERR_INVALID
            );
            assert_eq!(
                ferrodisk_driver_submit(attached.instance(), ptr::null(), &mut delay),
                ERR_INVALID
            );
            assert_eq!(
                ferrodisk_driver_complete(ptr::null_mut(), &req, 0),
                ERR_INVALID
            );
            assert_eq!(
                ferrodisk_driver_complete(attached.instance(), ptr::null(), 0),
                ERR_INVALID
            );
            ferrodisk_driver_fini(ptr::null_mut());
        }
        let delaying = image().attach(&host("delay")).unwrap();
        // SAFETY: a NULL `delay_ns` is refused when a delay must be stored.
        let rc = unsafe { ferrodisk_driver_submit(delaying.instance(), &req, ptr::null_mut()) };
        assert_eq!(rc, ERR_INVALID);
    }

    #[test]
    fn fini_drops_the_instance_and_contains_a_panicking_drop() {
        let before = DROPPED.load(Ordering::SeqCst);
        drop(image().attach(&host("pass")).unwrap());
        drop(image().attach(&host("panic_in_drop")).unwrap());
        assert!(DROPPED.load(Ordering::SeqCst) >= before + 2);
    }

    #[test]
    fn concurrent_submits_from_queue_threads() {
        let attached = image().attach(&host("pass")).unwrap();
        let inst = attached.instance() as usize;
        std::thread::scope(|s| {
            for q in 0..4u32 {
                s.spawn(move || {
                    let data = [q as u8; 64];
                    let mut bounce = [0u8; 64];
                    let iov = [libc::iovec {
                        iov_base: data.as_ptr() as *mut _,
                        iov_len: 64,
                    }];
                    for _ in 0..1000 {
                        let req = testing::request(Op::Write, q, 0, 64, &iov, bounce.as_mut_ptr());
                        let mut delay = 0;
                        // SAFETY: the instance outlives the scope; the request and buffers
                        // outlive the call.
                        let rc =
                            unsafe { ferrodisk_driver_submit(inst as *mut _, &req, &mut delay) };
                        assert_eq!(rc, PASS);
                        assert_eq!(bounce, [q as u8 ^ 0xAA; 64]);
                    }
                });
            }
        });
    }
}
