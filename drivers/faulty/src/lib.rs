//! The `faulty` driver image: a test image for the host's handling of bad images. It
//! misbehaves on demand, as `{"attach": {"mode": "..."}}` says:
//!
//! | mode | behaviour |
//! |------|-----------|
//! | `"fail_init"` | `init` refuses: `"faulty: init refused as configured"` |
//! | `"panic_on_write"` | `submit` panics on writes (the SDK returns `ERR_PANIC`, -2) |
//! | `"error_on_write"` | `submit` returns [`WRITE_ERROR`] (-5) on writes |
//! | `"panic_in_complete"` | `complete` panics (the SDK returns `ERR_PANIC`, -2) |
//! | `"fail_writes"` | `submit` fails writes (`FAIL`: the guest sees an I/O error) |
//! | `"hold_writes"` | writes wait (`Delay`) until `hold_ms` (default 2000) after `init`, then pass: a slow drain on demand |
//! | anything else, or none | pass-through |
//!
//! Everything not named passes. `FLAGS` is `WANTS_READ_DATA`, so the host calls `complete`
//! for reads (and leaves the data alone); writes come without a bounce buffer.

use ferrodisk_driver_sdk::{
    export_driver, Driver, HostInfo, Op, Req, ReqMut, Verdict, WANTS_READ_DATA,
};

/// What `submit` returns for writes in `error_on_write` mode: a negative internal error
/// other than the SDK's own codes, so the host's handling of any negative value is tested.
pub const WRITE_ERROR: i32 = -5;

/// How the image misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `"panic_on_write"`.
    PanicOnWrite,
    /// `"error_on_write"`.
    ErrorOnWrite,
    /// `"panic_in_complete"`.
    PanicInComplete,
    /// `"fail_writes"`.
    FailWrites,
    /// `"hold_writes"`: writes are delayed until a deadline.
    HoldWrites,
    /// Anything else: pass-through.
    PassThrough,
}

/// One attachment.
#[derive(Debug)]
pub struct Faulty {
    mode: Mode,
    /// `hold_writes`: when writes start to pass.
    hold_until: std::time::Instant,
}

impl Faulty {
    /// The mode in force.
    pub fn mode(&self) -> Mode {
        self.mode
    }
}

impl Driver for Faulty {
    const NAME: &'static str = "faulty";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const FLAGS: u32 = WANTS_READ_DATA;

    fn init(host: &HostInfo) -> Result<Self, String> {
        let mode = match host.attach_config()["mode"].as_str() {
            Some("fail_init") => return Err("faulty: init refused as configured".into()),
            Some("panic_on_write") => Mode::PanicOnWrite,
            Some("error_on_write") => Mode::ErrorOnWrite,
            Some("panic_in_complete") => Mode::PanicInComplete,
            Some("fail_writes") => Mode::FailWrites,
            Some("hold_writes") => Mode::HoldWrites,
            _ => Mode::PassThrough,
        };
        let hold = host.attach_config()["hold_ms"].as_u64().unwrap_or(2000);
        Ok(Faulty {
            mode,
            hold_until: std::time::Instant::now() + std::time::Duration::from_millis(hold),
        })
    }

    fn submit(&self, req: &mut Req<'_>) -> Verdict {
        match (self.mode, req.op()) {
            (Mode::PanicOnWrite, Op::Write) => {
                panic!(
                    "faulty: panic on write at offset {} as configured",
                    req.offset()
                )
            }
            (Mode::ErrorOnWrite, Op::Write) => Verdict::Error(WRITE_ERROR),
            (Mode::FailWrites, Op::Write) => Verdict::Fail,
            (Mode::HoldWrites, Op::Write) => {
                match self
                    .hold_until
                    .checked_duration_since(std::time::Instant::now())
                {
                    Some(left) if !left.is_zero() => Verdict::Delay(left),
                    _ => Verdict::Pass,
                }
            }
            _ => Verdict::Pass,
        }
    }

    fn complete(&self, req: &mut ReqMut<'_>, _status: i32) -> Result<(), String> {
        if self.mode == Mode::PanicInComplete {
            panic!(
                "faulty: panic in complete at offset {} as configured",
                req.offset()
            );
        }
        Ok(())
    }
}

export_driver!(Faulty);

#[cfg(test)]
mod tests {
    use super::*;
    use ferrodisk_driver_sdk::serde_json::json;
    use ferrodisk_driver_sdk::testing::{Attached, TestHost};
    use ferrodisk_driver_sdk::{exported_image, ERR_PANIC, FAIL, PASS};

    fn attach(mode: &str) -> Result<Attached, String> {
        let host = TestHost::new(
            &json!({}),
            &json!({"image": null, "attach": {"mode": mode}}),
        );
        exported_image!().attach(&host)
    }

    /// (write, read, complete) results.
    fn run(mode: &str) -> (i32, i32, i32) {
        let attached = attach(mode).unwrap();
        let data = [9u8; 512];
        let write = attached.submit(Op::Write, 0, 0, &[&data], None).0;
        let read = attached.submit_range(Op::Read, 0, 0, 512).0;
        let mut buf = data;
        let complete = attached.complete_read(0, 0, &mut [&mut buf], 0);
        assert_eq!(buf, data, "faulty never changes data");
        (write, read, complete)
    }

    #[test]
    fn modes() {
        assert_eq!(
            attach("fail_init").unwrap_err(),
            "faulty: init refused as configured"
        );
        assert_eq!(run("panic_on_write"), (ERR_PANIC, PASS, 0));
        assert_eq!(run("error_on_write"), (WRITE_ERROR, PASS, 0));
        assert_eq!(run("panic_in_complete"), (PASS, PASS, ERR_PANIC));
        assert_eq!(run("fail_writes"), (FAIL, PASS, 0));
        assert_eq!(run("pass"), (PASS, PASS, 0));
        assert_eq!(run(""), (PASS, PASS, 0));
    }

    #[test]
    fn hold_writes_delays_writes_until_the_deadline() {
        let host = TestHost::new(
            &json!({}),
            &json!({"image": null, "attach": {"mode": "hold_writes", "hold_ms": 60000}}),
        );
        let attached = exported_image!().attach(&host).unwrap();
        let data = [1u8; 512];
        let (verdict, delay_ns) = attached.submit(Op::Write, 0, 0, &[&data], None);
        assert_eq!(verdict, ferrodisk_driver_sdk::DELAY);
        assert!(delay_ns > 50_000_000_000, "about 60 s: {delay_ns}");
        assert_eq!(attached.submit_range(Op::Read, 0, 0, 512).0, PASS);
        let host = TestHost::new(
            &json!({}),
            &json!({"image": null, "attach": {"mode": "hold_writes", "hold_ms": 0}}),
        );
        let attached = exported_image!().attach(&host).unwrap();
        assert_eq!(attached.submit(Op::Write, 0, 0, &[&data], None).0, PASS);
    }

    #[test]
    fn no_config_is_pass_through() {
        let host = TestHost::new(&json!({}), &json!({}));
        let attached = exported_image!().attach(&host).unwrap();
        assert_eq!(attached.submit_range(Op::Flush, 0, 0, 0).0, PASS);
    }

    #[test]
    fn info() {
        let (info, name, version) = exported_image!().info();
        assert_eq!((name.as_str(), version.as_str()), ("faulty", "1.0.0"));
        assert_eq!(info.flags, WANTS_READ_DATA);
    }
}
