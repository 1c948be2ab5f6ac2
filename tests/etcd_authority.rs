//! The membership authority on a real etcd: compare-and-set, take-over, promotion and
//! fencing, concurrent writers on one and on several connections, and bounded failure when
//! etcd is unreachable or silent.

#[path = "common/etcd.rs"]
mod etcd;

use std::net::TcpListener;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use etcd::Etcd;
use ferrodisk::repl::authority::{Authority, AuthorityError, Store, VolumeRecord};
use ferrodisk::repl::etcd::EtcdStore;

/// The longest a call to an unreachable etcd may take before it reports an error.
const FAILURE_BOUND: Duration = Duration::from_secs(10);

fn authority(etcd: &Etcd) -> Authority {
    Authority::new(Arc::new(EtcdStore::connect(&etcd.endpoint()).unwrap()))
}

fn record(volume: &str, epoch: u64) -> VolumeRecord {
    VolumeRecord {
        volume: volume.into(),
        epoch,
        primary: "n".into(),
        replicas: vec![],
        uuid: "u".into(),
        deleted: false,
    }
}

#[test]
fn compare_and_set_follows_the_key_revision() {
    let etcd = Etcd::start();
    let s = EtcdStore::connect(&etcd.endpoint()).unwrap();
    assert_eq!(s.describe(), format!("etcd:{}", etcd.endpoint()));
    assert!(s.load("v").unwrap().is_none());

    let created = s.compare_and_set(None, &record("v", 1)).unwrap().unwrap();
    assert_eq!(s.compare_and_set(None, &record("v", 9)).unwrap(), None);
    let loaded = s.load("v").unwrap().unwrap();
    assert_eq!((loaded.revision, loaded.record.epoch), (created, 1));

    let next = s
        .compare_and_set(Some(created), &record("v", 2))
        .unwrap()
        .unwrap();
    assert!(next > created);
    let loaded = s.load("v").unwrap().unwrap();
    assert_eq!((loaded.revision, loaded.record.epoch), (next, 2));

    assert_eq!(
        s.compare_and_set(Some(created), &record("v", 3)).unwrap(),
        None
    );
    assert_eq!(s.compare_and_set(Some(0), &record("v", 3)).unwrap(), None);
    assert_eq!(
        s.compare_and_set(Some(u64::MAX), &record("v", 3)).unwrap(),
        None
    );
    assert_eq!(
        s.load("v").unwrap().unwrap().record.epoch,
        2,
        "failed CAS wrote nothing"
    );

    // A write to another volume moves etcd's revision but not this key's.
    s.compare_and_set(None, &record("w", 1)).unwrap().unwrap();
    let again = s
        .compare_and_set(Some(next), &record("v", 4))
        .unwrap()
        .unwrap();
    assert_eq!(s.load("v").unwrap().unwrap().revision, again);

    assert!(matches!(s.load("../x"), Err(AuthorityError::Refused(_))));
    assert!(matches!(
        s.compare_and_set(None, &record("a/b", 1)),
        Err(AuthorityError::Refused(_))
    ));
}

#[test]
fn take_over_promote_and_fencing() {
    let etcd = Etcd::start();
    let a = Authority::open(&format!("etcd:{}", etcd.endpoint())).unwrap();
    assert_eq!(a.describe(), format!("etcd:{}", etcd.endpoint()));
    let reps = vec!["r1:1".to_string(), "r2:1".to_string()];

    let r = a.take_over("v", "n1", &reps, None).unwrap();
    assert_eq!(r.epoch, 1);
    assert!(
        r.replicas.iter().all(|m| !m.in_sync),
        "new replicas start out of sync"
    );
    let e = a.promote("v", "r1:1", "n2").unwrap_err();
    assert!(e.to_string().contains("not in sync"), "{e}");
    assert!(a.promote("v", "r9:1", "n2").is_err());
    assert!(matches!(
        a.promote("nope", "r1:1", "n2"),
        Err(AuthorityError::NoVolume(_))
    ));

    a.set_in_sync("v", "n1", 1, "r1:1", true).unwrap();
    let r = a.take_over("v", "n1", &reps, None).unwrap();
    assert_eq!(r.epoch, 2);
    assert!(
        r.member("r1:1").unwrap().in_sync,
        "a clean restart keeps sync state"
    );
    let r = a.take_over("v", "n1", &reps, None).unwrap();
    assert_eq!(r.epoch, 3);
    let r = a.take_over("v", "n1", &reps, Some("another")).unwrap();
    assert_eq!((r.epoch, r.uuid.as_str()), (4, "another"));
    assert!(
        r.replicas.iter().all(|m| !m.in_sync),
        "a new incarnation: all resync"
    );

    a.set_in_sync("v", "n1", 4, "r1:1", true).unwrap();
    let r = a.promote("v", "r1:1", "n2").unwrap();
    assert_eq!((r.epoch, r.primary.as_str()), (5, "n2"));
    assert_eq!(r.uuid, "another", "a promotion keeps the incarnation");
    assert!(
        r.member("r1:1").is_none(),
        "the promoted replica holds the primary copy"
    );
    assert_eq!(a.load("v").unwrap().unwrap().record, r);

    let e = a.set_in_sync("v", "n1", 4, "r2:1", true).unwrap_err();
    assert!(
        matches!(e, AuthorityError::Fenced { ours: 4, current: 5, ref primary, .. } if primary == "n2"),
        "{e}"
    );
    let e = a.take_over("v", "n1", &reps, None).unwrap_err();
    assert!(e.to_string().contains("promote"), "{e}");
    let r = a.take_over("v", "n2", &["r2:1".to_string()], None).unwrap();
    assert_eq!((r.epoch, r.primary.as_str()), (6, "n2"));

    // Delete: a tombstone through etcd, then a new incarnation.
    let before = a.delete("v").unwrap().unwrap();
    assert_eq!(before, r);
    let tomb = a.load("v").unwrap().unwrap().record;
    assert!(tomb.deleted && tomb.primary.is_empty() && tomb.uuid.is_empty());
    assert_eq!(tomb.epoch, 7);
    assert_eq!(a.delete("v").unwrap(), None);
    let e = a.set_in_sync("v", "n2", 6, "r2:1", false).unwrap_err();
    assert!(
        matches!(e, AuthorityError::Fenced { current: 7, .. }),
        "{e}"
    );
    let r = a.take_over("v", "n1", &reps, None).unwrap();
    assert_eq!((r.epoch, r.primary.as_str()), (8, "n1"));
    assert_ne!(r.uuid, "another");
}

/// 4 threads × 10 read-modify-writes, each thread through `authority_for(thread)`.
fn no_update_is_lost(etcd: &Etcd, authority_for: impl Fn(usize) -> Authority) {
    authority(etcd).take_over("v", "n1", &[], None).unwrap();
    let start = Arc::new(Barrier::new(4));
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let a = authority_for(i);
            let start = start.clone();
            std::thread::spawn(move || {
                start.wait();
                for _ in 0..10 {
                    a.update("v", |r| {
                        let mut r = r.unwrap().clone();
                        r.epoch += 1;
                        Ok(r)
                    })
                    .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(authority(etcd).load("v").unwrap().unwrap().record.epoch, 41);
}

#[test]
fn concurrent_writers_on_one_connection_never_lose_an_update() {
    let etcd = Etcd::start();
    let shared = authority(&etcd);
    no_update_is_lost(&etcd, |_| shared.clone());
}

#[test]
fn concurrent_writers_on_separate_connections_never_lose_an_update() {
    let etcd = Etcd::start();
    no_update_is_lost(&etcd, |_| authority(&etcd));
}

/// Who won one race between a promotion and the old primary dropping the same replica.
#[derive(Debug, PartialEq)]
enum Winner {
    Promotion,
    OldPrimary,
}

/// The old primary `n1` marks `r1` out of sync while an operator, on another connection,
/// promotes `r1`. Either order is legal, but not both: a promoted replica was in sync, and
/// a primary that lost the volume is fenced.
fn race_promotion(volume: &str, operator: &Authority, old_primary: &Authority) -> Winner {
    let reps = vec!["r1:1".to_string(), "r2:1".to_string()];
    old_primary.take_over(volume, "n1", &reps, None).unwrap();
    old_primary
        .set_in_sync(volume, "n1", 1, "r1:1", true)
        .unwrap();

    let start = Arc::new(Barrier::new(2));
    let promote = {
        let (op, start, volume) = (operator.clone(), start.clone(), volume.to_string());
        std::thread::spawn(move || {
            start.wait();
            op.promote(&volume, "r1:1", "n2")
        })
    };
    let drop_replica = {
        let (old, start, volume) = (old_primary.clone(), start, volume.to_string());
        std::thread::spawn(move || {
            start.wait();
            old.set_in_sync(&volume, "n1", 1, "r1:1", false)
        })
    };
    let promoted = promote.join().unwrap();
    let dropped = drop_replica.join().unwrap();
    let last = operator.load(volume).unwrap().unwrap().record;
    match (promoted, dropped) {
        (
            Ok(r),
            Err(AuthorityError::Fenced {
                ours: 1,
                current: 2,
                primary,
                ..
            }),
        ) => {
            assert_eq!(
                (r.epoch, r.primary.as_str(), primary.as_str()),
                (2, "n2", "n2")
            );
            assert_eq!(last, r);
            Winner::Promotion
        }
        (Err(AuthorityError::Refused(why)), Ok(r)) => {
            assert!(why.contains("not in sync"), "{why}");
            assert_eq!((r.epoch, r.primary.as_str()), (1, "n1"));
            assert!(!r.member("r1:1").unwrap().in_sync);
            assert_eq!(last, r);
            Winner::OldPrimary
        }
        (p, d) => panic!("both or neither won: promote {p:?}, set_in_sync {d:?}"),
    }
}

#[test]
fn a_promotion_and_the_old_primary_race_and_exactly_one_wins() {
    let etcd = Etcd::start();
    let operator = authority(&etcd);
    let old_primary = authority(&etcd);
    let mut promotions = 0;
    for round in 0..20 {
        if race_promotion(&format!("v{round}"), &operator, &old_primary) == Winner::Promotion {
            promotions += 1;
        }
    }
    eprintln!("promotion won {promotions} of 20 races");
}

/// Asserts that `result` failed within [`FAILURE_BOUND`] of `started`, naming `endpoint`.
fn assert_bounded_failure<T>(result: Result<T, AuthorityError>, started: Instant, endpoint: &str) {
    let elapsed = started.elapsed();
    let Err(e) = result else {
        panic!("etcd at {endpoint} is unreachable, yet the call succeeded");
    };
    assert!(elapsed < FAILURE_BOUND, "took {elapsed:?}: {e}");
    assert!(matches!(e, AuthorityError::Backend(_)), "{e:?}");
    assert!(
        e.to_string().contains(endpoint),
        "the error names the endpoint: {e}"
    );
}

#[test]
fn a_closed_port_fails_quickly_and_clearly() {
    let port = etcd::free_ports(1)[0];
    let endpoint = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    let result = Authority::open(&format!("etcd:{endpoint}"));
    if let Err(e) = &result {
        eprintln!("closed port: {e} (after {:?})", started.elapsed());
    }
    assert_bounded_failure(result, started, &endpoint);
}

#[test]
fn a_silent_server_fails_within_the_deadline() {
    // Accepts connections (in the kernel backlog) and never speaks HTTP/2.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", silent.local_addr().unwrap());
    let started = Instant::now();
    let result = EtcdStore::connect(&endpoint);
    if let Err(e) = &result {
        eprintln!("silent server: {e} (after {:?})", started.elapsed());
    }
    assert_bounded_failure(result, started, &endpoint);
}

#[test]
fn an_etcd_that_stops_turns_calls_into_errors_until_it_is_back() {
    let mut etcd = Etcd::start();
    let endpoint = etcd.endpoint();
    let a = authority(&etcd);
    a.take_over("v", "n1", &[], None).unwrap();
    etcd.kill(0);
    let started = Instant::now();
    assert_bounded_failure(a.load("v"), started, &endpoint);
    let started = Instant::now();
    assert_bounded_failure(a.take_over("v", "n1", &[], None), started, &endpoint);
    etcd.restart(0);
    let r = a.take_over("v", "n1", &[], None).unwrap();
    assert_eq!(
        r.epoch, 2,
        "the failed take-over wrote nothing; the store reconnected"
    );
}

#[test]
fn bad_endpoints_are_refused() {
    assert!(matches!(
        EtcdStore::connect(""),
        Err(AuthorityError::Backend(_))
    ));
    assert!(matches!(
        EtcdStore::connect(" , "),
        Err(AuthorityError::Backend(_))
    ));
    let e = EtcdStore::connect("http://not a uri").err().unwrap();
    assert!(e.to_string().contains("not a uri"), "{e}");
}

/// Writes `value` at `key` behind the store's back, as a broken or foreign writer would.
fn put_raw(etcd: &Etcd, key: &str, value: &str) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut client = etcd_client::Client::connect([etcd.endpoint()], None)
            .await
            .unwrap();
        client.put(key, value, None).await.unwrap();
    });
}

#[test]
fn a_corrupt_record_is_reported_as_corrupt() {
    let etcd = Etcd::start();
    let s = EtcdStore::connect(&etcd.endpoint()).unwrap();
    put_raw(&etcd, "/ferrodisk/volumes/bad", "{not json");
    assert!(matches!(s.load("bad"), Err(AuthorityError::Corrupt(v, _)) if v == "bad"));
    let other = serde_json::to_string(&record("other", 1)).unwrap();
    put_raw(&etcd, "/ferrodisk/volumes/misfiled", &other);
    let e = s.load("misfiled").unwrap_err();
    assert!(
        matches!(&e, AuthorityError::Corrupt(v, why) if v == "misfiled" && why.contains("other")),
        "{e}"
    );
}

#[test]
fn one_dead_endpoint_of_two_does_not_stop_the_store() {
    let etcd = Etcd::start();
    let port = etcd::free_ports(1)[0];
    let dead = format!("http://127.0.0.1:{port}");
    for endpoints in [
        format!("{dead},{}", etcd.endpoint()),
        format!("{},{dead}", etcd.endpoint()),
    ] {
        let a = Authority::open(&format!("etcd:{endpoints}")).unwrap();
        assert_eq!(a.describe(), format!("etcd:{endpoints}"));
        for _ in 0..10 {
            let before = a.load("v").unwrap().map_or(0, |v| v.record.epoch);
            let r = a.take_over("v", "n1", &[], None).unwrap();
            assert_eq!(r.epoch, before + 1);
        }
    }
}

/// A store on a 3-member cluster whose first endpoint is a follower, which is then killed:
/// reads and compare-and-sets move to the remaining members without an error.
#[test]
fn a_cluster_member_down_is_skipped_without_errors() {
    let mut etcd = Etcd::start_cluster(3);
    let leader = etcd.leader();
    let follower = (leader + 1) % 3;
    let order = [follower, leader, (leader + 2) % 3];
    let endpoints: Vec<_> = order.iter().map(|&i| etcd.member_endpoint(i)).collect();
    let a = Authority::open(&format!("etcd:{}", endpoints.join(","))).unwrap();
    let reps = vec!["r1:1".to_string()];
    a.take_over("v", "n1", &reps, None).unwrap();
    let raw = EtcdStore::connect(&endpoints.join(",")).unwrap();
    let rev = raw.load("v").unwrap().unwrap().revision;

    etcd.kill(follower);
    // A compare-and-set that finds its endpoint refusing connections was never sent, so it
    // moves on to the next member (a read first would have moved it anyway). The pause lets
    // the store's driver thread see the dead member's connection close: a request written
    // into a connection the peer has just dropped has an unknown outcome and is not retried.
    std::thread::sleep(Duration::from_millis(200));
    let w = raw.compare_and_set(None, &record("w", 1)).unwrap();
    assert!(w.unwrap() > rev);
    let started = Instant::now();
    a.set_in_sync("v", "n1", 1, "r1:1", true).unwrap();
    let r = a.take_over("v", "n1", &reps, None).unwrap();
    assert_eq!(r.epoch, 2);
    assert!(r.member("r1:1").unwrap().in_sync);
    eprintln!(
        "first calls after losing a member took {:?}",
        started.elapsed()
    );

    // A second store, as another host would open it, also works: its first read skips the
    // dead member.
    let other = Authority::open(&format!("etcd:{}", endpoints.join(","))).unwrap();
    let r = other.promote("v", "r1:1", "n2").unwrap();
    assert_eq!((r.epoch, r.primary.as_str()), (3, "n2"));
    let e = a.set_in_sync("v", "n1", 2, "r1:1", false).unwrap_err();
    assert!(
        matches!(e, AuthorityError::Fenced { current: 3, .. }),
        "{e}"
    );

    etcd.restart(follower);
    let only_restarted = Authority::open(&format!("etcd:{}", etcd.member_endpoint(follower)));
    let r = only_restarted.unwrap().load("v").unwrap().unwrap().record;
    assert_eq!(
        (r.epoch, r.primary.as_str()),
        (3, "n2"),
        "the member caught up"
    );
}
