//! The C boundary: generic implementations of the five ABI functions for any [`Driver`], which
//! [`export_driver!`](crate::export_driver) wraps in `#[no_mangle]` symbols.
//!
//! Every call runs inside `catch_unwind`, so a panic becomes [`ERR_PANIC`] (or, in `init`, a
//! refusal reading `"panic: <message>"`) and never unwinds into the host. Pointers from the
//! host are checked for NULL, and requests are validated (see [`ERR_INVALID`]) before the
//! image sees them.
//!
//! The instance handed to the host is a `Box<Instance<T>>` turned into a raw pointer by
//! `init`; the host owns it until it passes it to `fini`, which turns it back into a box and
//! drops it. Between the two, `submit` and `complete` borrow it shared (`&T`) from several
//! queue threads, which `T: Sync` allows.

use std::any::Any;
use std::ffi::{c_char, c_void};
use std::io::Write as _;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::abi::{DriverInfo, Host, Request, DELAY, ERR_INTERNAL, ERR_INVALID, ERR_PANIC};
use crate::driver::{Driver, HostInfo};
use crate::request::{Req, ReqMut};

/// What the host's instance pointer points to.
pub struct Instance<T> {
    driver: T,
    /// Whether a `complete` error was written to stderr already (once per attachment).
    complete_error_reported: AtomicBool,
}

/// A [`DriverInfo`] that can live in a `static`.
#[repr(transparent)]
pub struct StaticInfo(pub DriverInfo);

// SAFETY: the pointers in a `StaticInfo` point to immutable, NUL-terminated statics (built by
// `export_driver!` with `nul_terminated`); sharing them between threads only reads them.
unsafe impl Sync for StaticInfo {}

/// `s` followed by a NUL byte, as an array of `N = s.len() + 1` bytes, in a `const`
/// context. Fails to compile (a const panic) when `N` is wrong or `s` contains NUL.
pub const fn nul_terminated<const N: usize>(s: &str) -> [u8; N] {
    let bytes = s.as_bytes();
    assert!(bytes.len() + 1 == N, "N must be s.len() + 1");
    let mut out = [0u8; N];
    let mut i = 0;
    while i < bytes.len() {
        assert!(
            bytes[i] != 0,
            "a driver name or version must not contain NUL"
        );
        out[i] = bytes[i];
        i += 1;
    }
    out
}

/// `ferrodisk_driver_init` for `T`: copies the host's facts, calls [`Driver::init`], and
/// returns the boxed instance, or NULL with the error (or `"panic: ..."`) in `err`.
///
/// # Safety
///
/// `host` is NULL or a valid `fd_host` for the call (see [`HostInfo::from_raw`]); `err` is
/// NULL or valid for writes of `errlen` bytes.
pub unsafe fn init<T: Driver>(host: *const Host, err: *mut c_char, errlen: usize) -> *mut c_void {
    let result = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: the caller's guarantee on `host`, for the duration of this call.
        let info = unsafe { HostInfo::from_raw(host) }.map_err(|e| format!("{}: {e}", T::NAME))?;
        T::init(&info)
    }));
    let message = match result {
        Ok(Ok(driver)) => {
            let instance = Instance {
                driver,
                complete_error_reported: AtomicBool::new(false),
            };
            return Box::into_raw(Box::new(instance)).cast();
        }
        Ok(Err(message)) => message,
        Err(payload) => {
            let message = format!("panic: {}", panic_message(&*payload));
            drop_payload(payload);
            message
        }
    };
    // SAFETY: the caller's guarantee on `err` and `errlen`.
    unsafe { write_error(err, errlen, &message) };
    std::ptr::null_mut()
}

/// `ferrodisk_driver_submit` for `T`: [`PASS`](crate::PASS), [`FAIL`](crate::FAIL),
/// [`DELAY`] (with `*delay_ns` set) or a negative error.
///
/// # Safety
///
/// `inst` is NULL or a pointer returned by [`init`] for the same `T` and not yet passed to
/// [`fini`]; `req` is NULL or a valid `fd_request` whose buffers are valid for the call
/// (guest buffers for reads; the bounce buffer, for writes, for reads and writes); `delay_ns`
/// is NULL or valid for a write.
pub unsafe fn submit<T: Driver>(inst: *mut c_void, req: *const Request, delay_ns: *mut u64) -> i32 {
    if inst.is_null() || req.is_null() {
        return ERR_INVALID;
    }
    let result = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `inst` came from `init::<T>` (a live `Box<Instance<T>>`, owned by the host
        // until `fini`), and is only borrowed shared here.
        let instance = unsafe { &*inst.cast::<Instance<T>>() };
        // SAFETY: the host owns the request and its buffers for the duration of this call,
        // which outlives every borrow made from it (`Req<'_>` ends with the closure).
        let mut req = match unsafe { Req::from_raw(&*req, T::FLAGS) } {
            Ok(req) => req,
            Err(_) => return ERR_INVALID,
        };
        let (code, delay) = instance.driver.submit(&mut req).to_raw();
        if let Some(ns) = delay {
            if delay_ns.is_null() {
                return ERR_INVALID;
            }
            // SAFETY: non-NULL and, per the caller, valid for a write; unaligned-tolerant.
            unsafe { delay_ns.write_unaligned(ns) };
            debug_assert_eq!(code, DELAY);
        }
        code
    }));
    result.unwrap_or_else(|payload| {
        drop_payload(payload);
        ERR_PANIC
    })
}

/// `ferrodisk_driver_complete` for `T`: 0, or a negative error.
///
/// # Safety
///
/// As [`submit`], with the guest buffers of a read valid for reads and writes.
pub unsafe fn complete<T: Driver>(inst: *mut c_void, req: *const Request, status: i32) -> i32 {
    if inst.is_null() || req.is_null() {
        return ERR_INVALID;
    }
    let result = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: as in `submit`: a live `Instance<T>` owned by the host, borrowed shared.
        let instance = unsafe { &*inst.cast::<Instance<T>>() };
        // SAFETY: the host owns the request for this call and lends a read's guest buffers to
        // the image, writable, until it returns; `ReqMut<'_>` ends with the closure.
        let mut req = match unsafe { ReqMut::from_raw(&*req, T::FLAGS) } {
            Ok(req) => req,
            Err(_) => return ERR_INVALID,
        };
        match instance.driver.complete(&mut req, status) {
            Ok(()) => 0,
            Err(message) => {
                if !instance
                    .complete_error_reported
                    .swap(true, Ordering::Relaxed)
                {
                    report_complete_error(T::NAME, &message);
                }
                ERR_INTERNAL
            }
        }
    }));
    result.unwrap_or_else(|payload| {
        drop_payload(payload);
        ERR_PANIC
    })
}

/// `ferrodisk_driver_fini` for `T`: drops the instance (a panic in `Drop` is contained).
///
/// # Safety
///
/// `inst` is NULL or a pointer returned by [`init`] for the same `T`, passed here once, after
/// every `submit` and `complete` on it has returned.
pub unsafe fn fini<T: Driver>(inst: *mut c_void) {
    if inst.is_null() {
        return;
    }
    // SAFETY: `inst` is the `Box<Instance<T>>` leaked by `init::<T>`; the host gives up its
    // ownership here, with no call in flight, so we may take it back and drop it.
    let instance = unsafe { Box::from_raw(inst.cast::<Instance<T>>()) };
    if let Err(payload) = catch_unwind(AssertUnwindSafe(move || drop(instance))) {
        drop_payload(payload);
    }
}

/// Writes a `complete` error to stderr, prefixed with the image name unless it has it.
fn report_complete_error(name: &str, message: &str) {
    let prefixed = message
        .strip_prefix(name)
        .is_some_and(|rest| rest.starts_with(':'));
    let _ = if prefixed {
        writeln!(std::io::stderr(), "complete failed: {message}")
    } else {
        writeln!(std::io::stderr(), "{name}: complete failed: {message}")
    };
}

/// The message of a panic payload (`&str` or `String`, as `panic!` makes them).
fn panic_message(payload: &(dyn Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "(a non-string payload)"
    }
}

/// Drops a panic payload without letting a panicking `Drop` escape (it is leaked instead).
fn drop_payload(payload: Box<dyn Any + Send>) {
    if let Err(again) = catch_unwind(AssertUnwindSafe(move || drop(payload))) {
        std::mem::forget(again);
    }
}

/// Copies `message` into `err`, truncated to `errlen - 1` bytes at a UTF-8 character
/// boundary, and NUL-terminates it. Does nothing when `err` is NULL or `errlen` is 0.
///
/// # Safety
///
/// `err` is NULL or valid for writes of `errlen` bytes.
pub unsafe fn write_error(err: *mut c_char, errlen: usize, message: &str) {
    if err.is_null() || errlen == 0 {
        return;
    }
    let mut n = message.len().min(errlen - 1);
    while !message.is_char_boundary(n) {
        n -= 1;
    }
    // SAFETY: `n + 1 <= errlen` bytes at `err`, valid for writes per the caller; `message`
    // is our own string and cannot overlap the host's buffer.
    unsafe {
        std::ptr::copy_nonoverlapping(message.as_ptr(), err.cast::<u8>(), n);
        err.add(n).write(0);
    }
}

/// Exports a [`Driver`] as a driver image: emits the five `#[no_mangle] extern "C"`
/// functions of the ABI (`ferrodisk_driver_info`, `_init`, `_submit`, `_complete`, `_fini`)
/// and the static `fd_driver_info` they return. Invoke it once, at the root of a `cdylib`
/// (see the [crate docs](crate) for an example). The functions are `pub`, so the crate's
/// tests can call them by name, or through [`exported_image!`](crate::exported_image).
#[macro_export]
macro_rules! export_driver {
    ($ty:ty) => {
        #[doc(hidden)]
        static __FERRODISK_DRIVER_NAME: [u8; <$ty as $crate::Driver>::NAME.len() + 1] =
            $crate::ffi::nul_terminated(<$ty as $crate::Driver>::NAME);
        #[doc(hidden)]
        static __FERRODISK_DRIVER_VERSION: [u8; <$ty as $crate::Driver>::VERSION.len() + 1] =
            $crate::ffi::nul_terminated(<$ty as $crate::Driver>::VERSION);
        #[doc(hidden)]
        static __FERRODISK_DRIVER_INFO: $crate::ffi::StaticInfo =
            $crate::ffi::StaticInfo($crate::DriverInfo {
                abi_version: $crate::ABI_VERSION,
                flags: <$ty as $crate::Driver>::FLAGS,
                name: __FERRODISK_DRIVER_NAME.as_ptr().cast(),
                version: __FERRODISK_DRIVER_VERSION.as_ptr().cast(),
            });

        /// `ferrodisk_driver_info`: the image's static `fd_driver_info`.
        #[no_mangle]
        pub extern "C" fn ferrodisk_driver_info() -> *const $crate::DriverInfo {
            &__FERRODISK_DRIVER_INFO.0
        }

        /// `ferrodisk_driver_init`: see `docs/driver-abi.md`.
        ///
        /// # Safety
        ///
        /// `host` is NULL or a valid `fd_host` for the call; `err` is NULL or valid for
        /// writes of `errlen` bytes.
        #[no_mangle]
        pub unsafe extern "C" fn ferrodisk_driver_init(
            host: *const $crate::Host,
            err: *mut ::std::ffi::c_char,
            errlen: usize,
        ) -> *mut ::std::ffi::c_void {
            // SAFETY: the ABI's guarantees, forwarded as the caller's.
            unsafe { $crate::ffi::init::<$ty>(host, err, errlen) }
        }

        /// `ferrodisk_driver_submit`: see `docs/driver-abi.md`.
        ///
        /// # Safety
        ///
        /// `inst` comes from `ferrodisk_driver_init` and is not finalized; `req` and its
        /// buffers, and `delay_ns`, are valid for the call.
        #[no_mangle]
        pub unsafe extern "C" fn ferrodisk_driver_submit(
            inst: *mut ::std::ffi::c_void,
            req: *const $crate::Request,
            delay_ns: *mut u64,
        ) -> i32 {
            // SAFETY: the ABI's guarantees, forwarded as the caller's.
            unsafe { $crate::ffi::submit::<$ty>(inst, req, delay_ns) }
        }

        /// `ferrodisk_driver_complete`: see `docs/driver-abi.md`.
        ///
        /// # Safety
        ///
        /// `inst` comes from `ferrodisk_driver_init` and is not finalized; `req` and its
        /// buffers are valid for the call (a read's guest buffers writable).
        #[no_mangle]
        pub unsafe extern "C" fn ferrodisk_driver_complete(
            inst: *mut ::std::ffi::c_void,
            req: *const $crate::Request,
            status: i32,
        ) -> i32 {
            // SAFETY: the ABI's guarantees, forwarded as the caller's.
            unsafe { $crate::ffi::complete::<$ty>(inst, req, status) }
        }

        /// `ferrodisk_driver_fini`: see `docs/driver-abi.md`.
        ///
        /// # Safety
        ///
        /// `inst` comes from `ferrodisk_driver_init`, is passed once, with no call in flight.
        #[no_mangle]
        pub unsafe extern "C" fn ferrodisk_driver_fini(inst: *mut ::std::ffi::c_void) {
            // SAFETY: the ABI's guarantees, forwarded as the caller's.
            unsafe { $crate::ffi::fini::<$ty>(inst) }
        }

        // The exported signatures are exactly the ABI's.
        const _: $crate::abi::InfoFn = ferrodisk_driver_info;
        const _: $crate::abi::InitFn = ferrodisk_driver_init;
        const _: $crate::abi::SubmitFn = ferrodisk_driver_submit;
        const _: $crate::abi::CompleteFn = ferrodisk_driver_complete;
        const _: $crate::abi::FiniFn = ferrodisk_driver_fini;
    };
}
