//! The `qos` driver image: per-instance-type IOPS and bandwidth limits, like cloud volume
//! types.
//!
//! - **Config**: see [`config`]. The limits come from the manifest's table keyed by the
//!   instance type (context key `instance-type`), overridden by the attach config; 0 or
//!   absent is unlimited. `init` refuses a malformed config with a message saying where.
//! - **Accounting**: two token buckets ([`bucket`]) per attachment, one for operations and one
//!   for bytes, shared by all the attachment's queues. Reads and writes cost one operation and
//!   `len` bytes. Flush, discard and write-zeroes cost one operation and **0 bytes**: they
//!   move no data over the guest's link, and charging a discard's range would let one trim
//!   of a large range stall the disk for seconds.
//! - **Burst**: each bucket holds 100 ms worth of tokens ([`bucket::BURST`]) and starts full.
//! - **Waiting**: `submit` never sleeps. When a bucket is short it returns
//!   [`Verdict::Delay`] with the exact time until enough tokens are in, and charges nothing;
//!   the host calls again then, and the queue holds its order meanwhile.
//! - **Threads**: the buckets sit behind one `Mutex`, held for a few arithmetic operations
//!   (no allocation, no I/O, no panics) and read the clock inside the lock, so concurrent
//!   submits from several queue threads see time in order and never over-admit.
//! - **Data**: `FLAGS` is 0: the image never sees or copies the data.

pub mod bucket;
pub mod config;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use ferrodisk_driver_sdk::{export_driver, Driver, HostInfo, Op, Req, Verdict};

use bucket::Limiter;
use config::Limits;

/// A monotonic clock, in nanoseconds since some start (a trait so tests can simulate time).
pub trait Clock: Send + Sync + 'static {
    /// Nanoseconds since the clock's start.
    fn now_ns(&self) -> u64;
}

/// The real clock: [`Instant`] since the attachment.
#[derive(Debug)]
pub struct MonotonicClock(Instant);

impl Clock for MonotonicClock {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.0.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// One attachment's limiter.
#[derive(Debug)]
pub struct Qos<C: Clock = MonotonicClock> {
    limits: Limits,
    /// `None` when nothing is limited: then `submit` takes no lock.
    limiter: Option<Mutex<Limiter>>,
    clock: C,
}

impl<C: Clock> Qos<C> {
    /// The limiter for `host`'s config, on `clock`.
    pub fn with_clock(host: &HostInfo, clock: C) -> Result<Self, String> {
        let limits = config::limits(host).map_err(|e| format!("qos: {e}"))?;
        let limiter = Limiter::new(limits.iops, limits.bytes_per_sec(), clock.now_ns());
        let limiter = (!limiter.is_unlimited()).then(|| Mutex::new(limiter));
        Ok(Qos {
            limits,
            limiter,
            clock,
        })
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Admits one request of `op` and `len` bytes now, or says how long to wait.
    pub fn admit(&self, op: Op, len: u64) -> Verdict {
        let Some(limiter) = &self.limiter else {
            return Verdict::Pass;
        };
        let bytes = match op {
            Op::Read | Op::Write => len,
            Op::Flush | Op::Discard | Op::WriteZeroes | Op::Unknown(_) => 0,
        };
        // The critical section cannot panic, but a poisoned lock still holds valid counts.
        let mut limiter = limiter
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match limiter.admit(self.clock.now_ns(), bytes) {
            Ok(()) => Verdict::Pass,
            Err(wait_ns) => Verdict::Delay(Duration::from_nanos(wait_ns)),
        }
    }
}

impl Driver for Qos<MonotonicClock> {
    const NAME: &'static str = "qos";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const FLAGS: u32 = 0;

    fn init(host: &HostInfo) -> Result<Self, String> {
        Qos::with_clock(host, MonotonicClock(Instant::now()))
    }

    fn submit(&self, req: &mut Req<'_>) -> Verdict {
        self.admit(req.op(), req.len())
    }
}

export_driver!(Qos<MonotonicClock>);

#[cfg(test)]
mod tests {
    use super::*;
    use ferrodisk_driver_sdk::serde_json::{json, Value};
    use ferrodisk_driver_sdk::testing::TestHost;
    use ferrodisk_driver_sdk::{exported_image, DELAY, PASS};
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    use std::sync::Arc;

    /// A simulated clock shared by the test and the driver.
    #[derive(Debug, Clone, Default)]
    struct SimClock(Arc<AtomicU64>);

    impl Clock for SimClock {
        fn now_ns(&self) -> u64 {
            self.0.load(Ordering::SeqCst)
        }
    }

    fn image_config() -> Value {
        json!({"limits": {
            "m5.large": {"iops": 3000, "mbps": 125},
            "t3.micro": {"iops": 100},
            "default": {"iops": 1000, "mbps": 50},
        }})
    }

    fn host(instance_type: Option<&str>, attach: Value) -> HostInfo {
        let mut host = HostInfo::default();
        if let Some(t) = instance_type {
            host.context.insert("instance-type".into(), t.into());
        }
        host.config = json!({"image": image_config(), "attach": attach});
        host
    }

    fn limits(instance_type: Option<&str>, attach: Value) -> Result<Limits, String> {
        Qos::with_clock(&host(instance_type, attach), SimClock::default()).map(|q| q.limits())
    }

    #[test]
    fn limits_follow_the_instance_type_then_the_attach_overrides() {
        let l = |iops, mbps| Ok(Limits { iops, mbps });
        assert_eq!(limits(Some("m5.large"), Value::Null), l(3000, 125));
        assert_eq!(
            limits(Some("c7g.huge"), Value::Null),
            l(1000, 50),
            "unknown type: default"
        );
        assert_eq!(limits(None, json!({})), l(1000, 50), "no type: default");
        assert_eq!(
            limits(Some("t3.micro"), Value::Null),
            l(100, 0),
            "an entry stands alone"
        );
        assert_eq!(limits(Some("m5.large"), json!({"iops": 500})), l(500, 125));
        assert_eq!(
            limits(Some("m5.large"), json!({"mbps": 10, "iops": null})),
            l(3000, 10)
        );
        assert_eq!(
            limits(Some("m5.large"), json!({"iops": 0, "mbps": 0})),
            l(0, 0)
        );
        let bare = HostInfo {
            config: json!({"attach": {"mbps": 7}}),
            ..HostInfo::default()
        };
        let q = Qos::with_clock(&bare, SimClock::default()).unwrap();
        assert_eq!(q.limits(), Limits { iops: 0, mbps: 7 });
        assert_eq!(q.limits().bytes_per_sec(), 7 << 20);
    }

    #[test]
    fn malformed_configs_are_refused_with_the_place() {
        let err = |image: Value, attach: Value| {
            let h = HostInfo {
                config: json!({"image": image, "attach": attach}),
                ..HostInfo::default()
            };
            Qos::with_clock(&h, SimClock::default()).unwrap_err()
        };
        let cases = [
            (
                json!([1]),
                Value::Null,
                "qos: image must be an object, got [1]",
            ),
            (
                json!({"limit": {}}),
                Value::Null,
                "qos: unknown key image.limit",
            ),
            (
                json!({"limits": 5}),
                Value::Null,
                "qos: image.limits must be an object, got 5",
            ),
            (
                json!({"limits": {"x": 5}}),
                Value::Null,
                "qos: image.limits.\"x\" must be an object",
            ),
            (
                json!({"limits": {"x": {"iops": "fast"}}}),
                Value::Null,
                "qos: image.limits.\"x\".iops must be a non-negative integer, got \"fast\"",
            ),
            (
                json!({"limits": {"x": {"iops": -1}}}),
                Value::Null,
                "non-negative integer, got -1",
            ),
            (
                json!({"limits": {"x": {"mbps": 1.5}}}),
                Value::Null,
                "non-negative integer, got 1.5",
            ),
            (
                json!({"limits": {"x": {"ipos": 1}}}),
                Value::Null,
                "unknown key image.limits.\"x\".ipos",
            ),
            (Value::Null, json!("fast"), "qos: attach must be an object"),
            (
                Value::Null,
                json!({"burst": 1}),
                "qos: unknown key attach.burst",
            ),
            (
                Value::Null,
                json!({"mbps": u64::MAX}),
                "qos: attach.mbps is too large",
            ),
        ];
        for (image, attach, want) in cases {
            let got = err(image.clone(), attach.clone());
            assert!(
                got.contains(want),
                "{image} / {attach}: got {got:?}, want {want:?}"
            );
        }
    }

    #[test]
    fn unlimited_passes_everything() {
        let q = Qos::with_clock(
            &host(Some("x"), json!({"iops": 0, "mbps": 0})),
            SimClock::default(),
        )
        .unwrap();
        assert!(q.limiter.is_none());
        for _ in 0..100_000 {
            assert_eq!(q.admit(Op::Write, 1 << 20), Verdict::Pass);
        }
    }

    #[test]
    fn non_data_ops_cost_one_op_and_no_bytes() {
        let clock = SimClock::default();
        // 10 IOPS (1 op of burst), 1 MiB/s (~100 KiB of burst).
        let q =
            Qos::with_clock(&host(None, json!({"iops": 10, "mbps": 1})), clock.clone()).unwrap();
        assert_eq!(
            q.admit(Op::Discard, 1 << 30),
            Verdict::Pass,
            "the range is not charged"
        );
        assert_eq!(
            q.admit(Op::Flush, 0),
            Verdict::Delay(Duration::from_millis(100))
        );
        clock.0.store(100_000_000, Ordering::SeqCst);
        assert_eq!(q.admit(Op::WriteZeroes, 1 << 30), Verdict::Pass);
        clock.0.store(200_000_000, Ordering::SeqCst);
        assert_eq!(
            q.admit(Op::Read, 100 << 10),
            Verdict::Pass,
            "the byte bucket is still full"
        );
    }

    #[test]
    fn concurrent_queues_never_over_admit() {
        let clock = SimClock::default();
        let q =
            Qos::with_clock(&host(Some("m5.large"), json!({"mbps": 0})), clock.clone()).unwrap();
        let admitted = AtomicUsize::new(0);
        let round = |q: &Qos<SimClock>| {
            std::thread::scope(|s| {
                for _ in 0..4 {
                    s.spawn(|| {
                        for _ in 0..1000 {
                            if q.admit(Op::Read, 4096) == Verdict::Pass {
                                admitted.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                    });
                }
            });
            admitted.swap(0, Ordering::SeqCst)
        };
        // Time stands still: exactly the burst (100 ms of 3000 IOPS) passes, from 4000 tries.
        assert_eq!(round(&q), 300);
        assert_eq!(round(&q), 0);
        // 50 ms later, exactly 150 more.
        clock.0.store(50_000_000, Ordering::SeqCst);
        assert_eq!(round(&q), 150);
    }

    #[test]
    fn through_the_exported_abi() {
        let image = exported_image!();
        let (info, name, version) = image.info();
        assert_eq!(
            (name.as_str(), version.as_str(), info.flags),
            ("qos", "1.0.0", 0)
        );
        let test_host = TestHost::new(
            &json!({"instance-type": "t3.micro"}),
            &json!({"image": image_config(), "attach": {"iops": 10}}),
        );
        let attached = image.attach(&test_host).unwrap();
        // 10 IOPS: a burst of 1, then a delay of up to 100 ms (the real clock runs).
        let data = [0u8; 512];
        assert_eq!(attached.submit(Op::Write, 0, 0, &[&data], None).0, PASS);
        let (rc, delay) = attached.submit_range(Op::Flush, 1, 0, 0);
        assert_eq!(rc, DELAY);
        assert!(delay > 0 && delay <= 100_000_000, "{delay}");
        let bad = TestHost::new(&json!({}), &json!({"image": {"limits": 3}}));
        assert_eq!(
            image.attach(&bad).unwrap_err(),
            "qos: image.limits must be an object, got 3"
        );
    }
}
