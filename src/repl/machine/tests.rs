//! Scripted tests of the replication state machine: each drives [`Core`] by hand, the way
//! the daemon's threads do, and checks the actions it asks for.

use super::*;

const MIB: u64 = 1 << 20;
const DISK: u64 = 16 * MIB;
const UUID: &str = "0123456789abcdef0123456789abcdef";

fn cfg() -> CoreConfig {
    let mut c = CoreConfig::new("v", UUID, 5, DISK, MIB);
    c.timeout = 1_000_000;
    c.reconnect = 100_000;
    c
}

fn tag(gen: u64) -> Tag {
    Tag {
        uuid: UUID.into(),
        gen,
    }
}

fn empty() -> DirtyMap {
    DirtyMap::in_memory(DISK, MIB)
}

fn in_sync(addr: &str, gen: u64) -> LinkInit {
    LinkInit {
        addr: addr.into(),
        in_sync: true,
        bitmap: Some((empty(), tag(gen))),
    }
}

/// A core and the actions it asked for, not yet looked at.
struct H {
    core: Core,
    out: Vec<Action>,
    now: Micros,
}

impl H {
    fn new(links: Vec<LinkInit>, activity: Option<DirtyMap>) -> H {
        let mut out = Vec::new();
        let core = Core::new(cfg(), links, activity, 0, &mut out);
        H { core, out, now: 0 }
    }

    fn take(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.out)
    }

    /// The connection id of the pending `Connect` for `link`.
    fn connecting(&mut self, link: usize) -> u64 {
        let i = self
            .out
            .iter()
            .position(|a| matches!(a, Action::Connect { link: l, .. } if *l == link))
            .unwrap_or_else(|| panic!("no Connect for link {link} in {:?}", self.out));
        match self.out.remove(i) {
            Action::Connect { conn, .. } => conn,
            _ => unreachable!(),
        }
    }

    fn open(&mut self, link: usize, id: Tag) -> u64 {
        let conn = self.connecting(link);
        self.core
            .on_open(self.now, link, conn, Ok(id), &mut self.out);
        conn
    }

    fn open_fails(&mut self, link: usize) {
        let conn = self.connecting(link);
        self.core.on_open(
            self.now,
            link,
            conn,
            Err(OpenError::Failed("refused".into())),
            &mut self.out,
        );
    }

    fn write(&mut self, head: u16, offset: u64, len: u64) -> Verdict {
        let d = OpDesc {
            queue: 0,
            conn: 1,
            head,
            offset,
            len,
            kind: Mutation::Write {
                crc: 0,
                data: Payload::new(vec![0; len as usize]),
            },
        };
        self.core.begin(self.now, d, &mut self.out)
    }

    /// Stores whatever activity log store is pending, successfully.
    fn store_activity(&mut self) {
        let gens: Vec<u64> = self
            .out
            .iter()
            .filter_map(|a| match a {
                Action::StoreActivity { gen, .. } => Some(*gen),
                _ => None,
            })
            .collect();
        self.out
            .retain(|a| !matches!(a, Action::StoreActivity { .. }));
        for g in gens {
            self.core
                .on_activity_stored(self.now, g, true, &mut self.out);
        }
    }

    /// Sends `(link, conn, seq)` of every guest write frame asked for, removing them.
    fn sent_writes(&mut self) -> Vec<(usize, u64, u64)> {
        let mut v = Vec::new();
        self.out.retain(|a| match a {
            Action::Send {
                link,
                conn,
                frame: Frame::Write { seq, .. } | Frame::Zero { seq, .. },
            } => {
                v.push((*link, *conn, *seq));
                false
            }
            _ => true,
        });
        v
    }

    fn ack(&mut self, link: usize, conn: u64, seq: u64) {
        self.core
            .on_reply(self.now, link, conn, Reply::Ack { seq }, &mut self.out);
    }

    fn completes(&self) -> Vec<(u16, bool)> {
        self.out
            .iter()
            .filter_map(|a| match a {
                Action::Complete { head, ok, .. } => Some((*head, *ok)),
                _ => None,
            })
            .collect()
    }

    fn releases(&self) -> Vec<u16> {
        self.out
            .iter()
            .filter_map(|a| match a {
                Action::Release { head, .. } => Some(*head),
                _ => None,
            })
            .collect()
    }

    fn records(&mut self) -> Vec<(usize, bool)> {
        let mut v = Vec::new();
        self.out.retain(|a| match a {
            Action::Record { link, in_sync } => {
                v.push((*link, *in_sync));
                false
            }
            _ => true,
        });
        v
    }

    fn recorded(&mut self, link: usize, in_sync: bool) {
        self.core
            .on_recorded(self.now, link, in_sync, Ok(()), &mut self.out);
    }

    /// [`H::serving_pair`] after one write to region 3 (parked for the activity log, then
    /// done locally and on both replicas), its actions taken.
    fn serving_pair_with_a_write_to_region_3() -> H {
        let (mut h, c0, c1) = H::serving_pair();
        let Verdict::Parked(id) = h.write(1, 3 * MIB, 4096) else {
            panic!()
        };
        h.store_activity();
        let sent = h.sent_writes();
        h.take();
        h.core.local_done(h.now, id, true, &mut h.out);
        h.ack(0, c0, sent[0].2);
        h.ack(1, c1, sent[1].2);
        h.take();
        h
    }

    /// Two in-sync replicas opened with the identity our bitmaps describe: serving.
    fn serving_pair() -> (H, u64, u64) {
        let mut h = H::new(vec![in_sync("a", 7), in_sync("b", 7)], Some(empty()));
        let c0 = h.open(0, tag(7));
        let c1 = h.open(1, tag(7));
        assert_eq!(h.core.phase(), Phase::Serving);
        h.take();
        (h, c0, c1)
    }
}

#[test]
fn a_clean_start_with_matching_replicas_serves_at_once() {
    let mut h = H::new(vec![in_sync("a", 7), in_sync("b", 7)], Some(empty()));
    assert_eq!(h.core.phase(), Phase::Starting);
    h.open(0, tag(7));
    assert_eq!(
        h.core.phase(),
        Phase::Starting,
        "waits for every in-sync replica"
    );
    h.open(1, tag(7));
    assert_eq!(h.core.phase(), Phase::Serving);
    assert!(h.records().is_empty(), "nothing to record");
    assert!(
        !h.out.iter().any(|a| matches!(a, Action::Send { .. })),
        "nothing to pull or compare: {:?}",
        h.out
    );
}

#[test]
fn a_write_waits_for_the_activity_log_then_for_every_replica() {
    let (mut h, c0, c1) = H::serving_pair();
    let Verdict::Parked(id) = h.write(3, 0, 4096) else {
        panic!("the region is not in the log yet")
    };
    assert!(
        h.sent_writes().is_empty(),
        "nothing leaves before the log is durable"
    );
    h.store_activity();
    assert_eq!(h.releases(), vec![3]);
    let sent = h.sent_writes();
    assert_eq!(sent.len(), 2);
    h.take();
    // The region is in the log now: the next write to it goes at once.
    assert!(matches!(h.write(4, 8192, 4096), Verdict::Go(_)));
    h.take();
    h.core.local_done(h.now, id, true, &mut h.out);
    h.ack(0, c0, sent[0].2);
    assert!(h.completes().is_empty(), "one replica still owes its ack");
    h.ack(1, c1, sent[1].2);
    assert_eq!(h.completes(), vec![(3, true)]);
}

#[test]
fn overlapping_writes_are_ordered_and_others_are_not() {
    let (mut h, c0, c1) = H::serving_pair();
    h.write(1, 0, MIB);
    h.store_activity();
    h.take();
    let first = h.core.ops.keys().copied().max().unwrap();
    let sent = {
        // Re-send is not needed: collect the frames of the first write from its pending.
        let mut v: Vec<(usize, u64, u64)> = Vec::new();
        for (i, l) in h.core.links.iter().enumerate() {
            for (seq, _) in l.pending.iter() {
                v.push((i, if i == 0 { c0 } else { c1 }, *seq));
            }
        }
        v
    };
    assert!(
        matches!(h.write(2, 4096, 4096), Verdict::Parked(_)),
        "overlaps the first"
    );
    assert!(matches!(
        h.write(3, 2 * MIB, 4096),
        Verdict::Parked(_) | Verdict::Go(_)
    ));
    h.store_activity();
    h.take();
    assert!(
        matches!(h.write(4, 2 * MIB + 8192, 4096), Verdict::Go(_)),
        "no overlap, no wait"
    );
    h.take();
    h.core.local_done(h.now, first, true, &mut h.out);
    for (l, c, s) in sent {
        h.ack(l, c, s);
    }
    assert_eq!(h.completes(), vec![(1, true)]);
    assert_eq!(
        h.releases(),
        vec![2],
        "the overlapping write goes once the first is done everywhere"
    );
}

#[test]
fn a_fault_is_recorded_before_the_writes_it_holds_complete() {
    let (mut h, c0, c1) = H::serving_pair();
    let Verdict::Parked(id) = h.write(1, 0, 4096) else {
        panic!()
    };
    h.store_activity();
    let sent = h.sent_writes();
    h.take();
    h.core.local_done(h.now, id, true, &mut h.out);
    h.ack(0, c0, sent[0].2);
    h.core
        .on_disconnect(h.now, 1, c1, "reset".into(), &mut h.out);
    assert_eq!(h.core.link_state(1), LinkState::Failing);
    assert!(
        h.core.dirty(1).is_set(0),
        "the write is marked for the replica"
    );
    assert!(h.completes().is_empty(), "not before the authority knows");
    assert_eq!(h.records(), vec![(1, false)]);
    // The authority is unreachable for a while: still nothing completes.
    h.core.on_recorded(
        h.now,
        1,
        false,
        Err(RecordError::Failed("down".into())),
        &mut h.out,
    );
    assert!(h.completes().is_empty());
    h.now += 200_000;
    h.core.tick(h.now, 1, &mut h.out);
    assert_eq!(h.records(), vec![(1, false)], "retried");
    h.recorded(1, false);
    assert_eq!(h.core.link_state(1), LinkState::OutOfSync);
    assert_eq!(h.completes(), vec![(1, true)]);
}

#[test]
fn a_fault_while_being_recorded_in_sync_is_recorded_before_anything_completes() {
    let mut h = H::new(
        vec![LinkInit {
            addr: "a".into(),
            in_sync: false,
            bitmap: Some((empty(), tag(9))),
        }],
        Some(empty()),
    );
    assert_eq!(h.core.phase(), Phase::Serving);
    let c = h.open(0, tag(9));
    assert_eq!(h.core.link_state(0), LinkState::Resyncing);
    let snap = h
        .out
        .iter()
        .find_map(|a| match a {
            Action::StoreBitmap(s) => Some(s.clone()),
            _ => None,
        })
        .expect("the empty bitmap is stored first");
    h.take();
    h.core.on_bitmap_stored(0, snap.gen, true, &mut h.out);
    assert_eq!(h.records(), vec![(0, true)]);
    // A write goes to the resyncing replica, then the connection drops while the
    // authority is recording it in sync.
    h.write(1, 0, 4096);
    h.store_activity();
    h.take();
    h.core
        .on_disconnect(h.now, 0, c, "reset".into(), &mut h.out);
    assert_eq!(h.core.link_state(0), LinkState::Failing);
    h.recorded(0, true);
    assert_eq!(
        h.records(),
        vec![(0, false)],
        "recorded in sync, then at once out of sync"
    );
    h.recorded(0, false);
    assert_eq!(h.core.link_state(0), LinkState::OutOfSync);
    assert!(h.core.dirty(0).is_set(0));
}

#[test]
fn a_replica_that_lost_its_copy_gets_a_full_rebuild() {
    let (mut h, _, c1) = H::serving_pair();
    h.core
        .on_disconnect(h.now, 1, c1, "killed".into(), &mut h.out);
    h.recorded(1, false);
    h.take();
    h.now += 200_000;
    h.core.tick(h.now, 1, &mut h.out);
    // It comes back blank: our uuid (taken at Open), no generation.
    let conn = h.open(
        1,
        Tag {
            uuid: UUID.into(),
            gen: 0,
        },
    );
    assert_eq!(h.core.link_state(1), LinkState::Resyncing);
    assert_eq!(h.core.dirty(1).count(), 16, "every region");
    let adopt = h.out.iter().find_map(|a| match a {
        Action::Send {
            link: 1,
            conn: c,
            frame: Frame::Adopt { gen, .. },
        } if *c == conn => Some(*gen),
        _ => None,
    });
    let gen = adopt.expect("a fresh generation is adopted first");
    assert_ne!(gen, 7);
    assert!(
        h.out
            .iter()
            .any(|a| matches!(a, Action::ReadLocal { link: 1, .. })),
        "the rebuild starts"
    );
}

#[test]
fn a_delta_resync_compares_then_copies_and_guest_writes_wait_behind_a_copy() {
    let (mut h, _, c1) = H::serving_pair();
    h.core
        .on_disconnect(h.now, 1, c1, "killed".into(), &mut h.out);
    h.recorded(1, false);
    h.write(1, 0, 4096);
    h.store_activity();
    h.take();
    assert!(h.core.dirty(1).is_set(0));
    let op = h.core.ops.keys().copied().max().unwrap();
    h.core.local_done(h.now, op, true, &mut h.out);
    let sent_to_a: Vec<u64> = h.core.links[0].pending.keys().copied().collect();
    let c0 = h.core.links[0].conn.unwrap();
    for s in sent_to_a {
        h.ack(0, c0, s);
    }
    h.take();
    h.now += 200_000;
    h.core.tick(h.now, 1, &mut h.out);
    let conn = h.open(1, tag(7));
    assert!(
        !h.out.iter().any(|a| matches!(
            a,
            Action::Send {
                frame: Frame::Adopt { .. },
                ..
            }
        )),
        "same copy: delta"
    );
    let read = h
        .out
        .iter()
        .find_map(|a| match a {
            Action::ReadLocal {
                link: 1, region, ..
            } => Some(*region),
            _ => None,
        })
        .unwrap();
    assert_eq!(read, 0);
    h.take();
    let data = vec![9u8; MIB as usize];
    h.core
        .on_local_read(h.now, 1, 0, Ok(data.clone()), &mut h.out);
    let sums = h
        .out
        .iter()
        .find_map(|a| match a {
            Action::Send {
                frame: Frame::Sums { seq, .. },
                ..
            } => Some(*seq),
            _ => None,
        })
        .unwrap();
    h.take();
    h.core.on_reply(
        h.now,
        1,
        conn,
        Reply::Sums {
            seq: sums,
            crcs: vec![1],
        },
        &mut h.out,
    );
    let copy = h
        .out
        .iter()
        .find_map(|a| match a {
            Action::Send {
                frame: Frame::Write { seq, data: d, .. },
                ..
            } => Some((*seq, d.len())),
            _ => None,
        })
        .expect("different: copied");
    assert_eq!(copy.1, MIB as usize);
    h.take();
    assert!(
        matches!(h.write(2, 4096, 512), Verdict::Parked(_)),
        "a guest write to the region waits behind the copy"
    );
    h.ack(1, conn, copy.0);
    assert_eq!(h.releases(), vec![2]);
    assert!(!h.core.dirty(1).is_set(0));
}

#[test]
fn an_unclean_start_pulls_the_active_regions_from_an_in_sync_replica() {
    let mut al = empty();
    al.set(2);
    al.set(5);
    let mut h = H::new(vec![in_sync("a", 7), in_sync("b", 7)], Some(al));
    let c0 = h.open(0, tag(7));
    h.open(1, tag(7));
    assert_eq!(h.core.phase(), Phase::Starting);
    let reads: Vec<(u64, u64)> = h
        .out
        .iter()
        .filter_map(|a| match a {
            Action::Send {
                link: 0,
                frame: Frame::Read { seq, offset, .. },
                ..
            } => Some((*seq, *offset)),
            _ => None,
        })
        .collect();
    assert_eq!(
        reads.iter().map(|r| r.1).collect::<Vec<_>>(),
        vec![2 * MIB, 5 * MIB]
    );
    h.take();
    for (seq, offset) in reads {
        h.core.on_reply(
            h.now,
            0,
            c0,
            Reply::Data {
                seq,
                data: vec![1; MIB as usize],
            },
            &mut h.out,
        );
        let region = (offset / MIB) as usize;
        assert!(h
            .out
            .iter()
            .any(|a| matches!(a, Action::WriteLocal { region: r, .. } if *r == region)));
        h.take();
        h.core
            .on_local_written(h.now, 0, region, Ok(()), &mut h.out);
    }
    // The other in-sync replica is brought up to date on those regions before serving.
    assert_eq!(h.core.phase(), Phase::Starting);
    assert_eq!(h.core.link_state(1), LinkState::Resyncing);
    assert!(h.core.recorded_in_sync(1), "it stays recorded in sync");
    assert_eq!(h.core.dirty(1).count(), 2);
}

#[test]
fn an_unclean_start_waits_for_an_unreachable_in_sync_replica() {
    let mut al = empty();
    al.set(0);
    let mut h = H::new(vec![in_sync("a", 7)], Some(al.clone()));
    h.open_fails(0);
    assert_eq!(h.core.phase(), Phase::Starting);
    assert!(
        h.records().is_empty(),
        "it may hold writes we lost: not recorded away"
    );
    assert!(h
        .core
        .start_blocker()
        .is_some_and(|b| b.contains("unclean")));
    // With a clean stop (empty log) the local copy is complete: the replica is recorded
    // out of sync and the disk serves.
    let mut h = H::new(vec![in_sync("a", 7)], Some(empty()));
    h.open_fails(0);
    assert_eq!(h.records(), vec![(0, false)]);
    h.recorded(0, false);
    assert_eq!(h.core.phase(), Phase::Serving);
}

#[test]
fn in_sync_replicas_that_lost_their_data_are_not_a_source() {
    let mut al = empty();
    al.set(0);
    let mut h = H::new(vec![in_sync("a", 7)], Some(al));
    h.open(
        0,
        Tag {
            uuid: String::new(),
            gen: 0,
        },
    );
    assert_eq!(h.records(), vec![(0, false)], "blank: recorded out of sync");
    assert!(!h.out.iter().any(|a| matches!(
        a,
        Action::Send {
            frame: Frame::Read { .. },
            ..
        }
    )));
    h.recorded(0, false);
    assert_eq!(
        h.core.phase(),
        Phase::Serving,
        "the local copy is the best there is"
    );
    assert_eq!(h.core.link_state(0), LinkState::Resyncing, "full rebuild");
}

#[test]
fn a_stale_nack_fences_and_fails_everything() {
    let (mut h, c0, _) = H::serving_pair();
    let Verdict::Parked(running) = h.write(1, 0, 4096) else {
        panic!()
    };
    h.store_activity();
    h.take();
    assert!(
        matches!(h.write(2, 0, 4096), Verdict::Parked(_)),
        "overlaps"
    );
    h.take();
    let seq = *h.core.links[0].pending.keys().next().unwrap();
    h.core.on_reply(
        h.now,
        0,
        c0,
        Reply::Nack {
            seq,
            stale: true,
            message: "epoch 9".into(),
        },
        &mut h.out,
    );
    assert!(h.core.fenced().is_some());
    assert!(h.out.iter().any(|a| matches!(a, Action::Fenced { .. })));
    assert_eq!(
        h.completes(),
        vec![(2, false)],
        "the parked write fails at once"
    );
    h.take();
    h.core.local_done(h.now, running, true, &mut h.out);
    assert_eq!(
        h.completes(),
        vec![(1, false)],
        "the running one after its local I/O"
    );
    assert_eq!(h.write(3, 0, 512), Verdict::Refused);
}

#[test]
fn idle_regions_leave_the_activity_log_after_a_checkpoint() {
    let mut h = H::serving_pair_with_a_write_to_region_3();
    assert!(h.core.activity().is_set(3));
    h.now += 1_000_000;
    h.core.tick_meta(h.now, &mut h.out);
    assert!(h.out.is_empty(), "not idle long enough");
    h.now += 10_000_000;
    h.core.tick_meta(h.now, &mut h.out);
    let id = match h.take().as_slice() {
        [Action::Checkpoint { id, .. }] => *id,
        other => panic!("{other:?}"),
    };
    h.core.on_checkpoint(h.now, id, Ok(()), &mut h.out);
    assert!(!h.core.activity().is_set(3));
    assert!(h.out.iter().any(
        |a| matches!(a, Action::StoreActivity { words, .. } if words.iter().all(|w| *w == 0))
    ));
}

#[test]
fn a_clean_stop_empties_the_log_only_when_every_fault_was_recorded() {
    let stop = |fault: bool| {
        let (mut h, c0, c1) = H::serving_pair();
        let Verdict::Parked(id) = h.write(1, 0, 4096) else {
            panic!()
        };
        h.store_activity();
        let sent = h.sent_writes();
        h.take();
        h.core.local_done(h.now, id, true, &mut h.out);
        h.ack(0, c0, sent[0].2);
        if fault {
            // The fault cannot be recorded (the authority is down): the write never
            // completes, and the stop must not call this copy clean.
            h.core
                .on_disconnect(h.now, 1, c1, "reset".into(), &mut h.out);
        } else {
            h.ack(1, c1, sent[1].2);
        }
        h.take();
        h.core.stop(h.now, &mut h.out);
        loop {
            let acts = h.take();
            if acts.is_empty() {
                break;
            }
            for a in acts {
                match a {
                    Action::Checkpoint { id, .. } => {
                        h.core.on_checkpoint(h.now, id, Ok(()), &mut h.out)
                    }
                    Action::StoreActivity { gen, .. } => {
                        h.core.on_activity_stored(h.now, gen, true, &mut h.out)
                    }
                    _ => {}
                }
            }
        }
        h.core.phase()
    };
    assert_eq!(stop(false), Phase::Stopped { clean: true });
    assert_eq!(
        stop(true),
        Phase::Stopping,
        "still waiting for the fault to be recorded"
    );
}

#[test]
fn losing_the_recovery_source_mid_pull_chooses_again_without_recording_it() {
    let mut al = empty();
    al.set(1);
    let mut h = H::new(vec![in_sync("a", 7), in_sync("b", 7)], Some(al));
    let c0 = h.open(0, tag(7));
    h.open(1, tag(7));
    assert!(h.out.iter().any(|a| matches!(
        a,
        Action::Send {
            link: 0,
            frame: Frame::Read { .. },
            ..
        }
    )));
    h.take();
    h.core
        .on_disconnect(h.now, 0, c0, "reset".into(), &mut h.out);
    // Not recorded out of sync: it may hold what this copy lacks. The other in-sync
    // replica becomes the source, and the lost one is recorded out of sync once the new
    // source's regions are pulled.
    assert!(h.records().is_empty());
    let (seq, c1) = h
        .out
        .iter()
        .find_map(|a| match a {
            Action::Send {
                link: 1,
                conn,
                frame: Frame::Read { seq, .. },
            } => Some((*seq, *conn)),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{:?}", h.out));
    h.take();
    h.core.on_reply(
        h.now,
        1,
        c1,
        Reply::Data {
            seq,
            data: vec![1; MIB as usize],
        },
        &mut h.out,
    );
    h.take();
    h.core.on_local_written(h.now, 1, 1, Ok(()), &mut h.out);
    assert_eq!(h.records(), vec![(0, false)]);
}

#[test]
fn the_only_in_sync_source_lost_mid_pull_blocks_the_start_until_it_is_back() {
    let mut al = empty();
    al.set(1);
    let mut h = H::new(vec![in_sync("a", 7)], Some(al));
    let c0 = h.open(0, tag(7));
    h.take();
    h.core
        .on_disconnect(h.now, 0, c0, "reset".into(), &mut h.out);
    assert!(h.records().is_empty());
    assert_eq!(h.core.phase(), Phase::Starting);
    assert!(h.core.start_blocker().is_some());
    h.now += 200_000;
    h.core.tick(h.now, 0, &mut h.out);
    let c = h.open(0, tag(7));
    let read = h.out.iter().find_map(|a| match a {
        Action::Send {
            link: 0,
            conn,
            frame: Frame::Read { seq, .. },
        } if *conn == c => Some(*seq),
        _ => None,
    });
    assert!(read.is_some(), "pulled again once it is back");
}

/// Found by the simulation (tests/replication_sim.rs): a resync copy in flight to a replica
/// that is not recorded in sync, a guest write to the region parked behind it, and the
/// replica times out. The fault retired the copy before it settled the link's state, so the
/// released write ran against a link still "resyncing" with no connection, waited for a
/// record that never comes, and hung with every write that overlapped it.
#[test]
fn a_write_parked_behind_a_copy_completes_when_the_replica_fails() {
    let mut dirty = empty();
    dirty.set(0);
    let out_of_sync = LinkInit {
        addr: "a".into(),
        in_sync: false,
        bitmap: Some((dirty, tag(7))),
    };
    let mut h = H::new(vec![out_of_sync], Some(empty()));
    assert_eq!(h.core.phase(), Phase::Serving);
    // The copy our bitmap describes: a delta resync of region 0, found different, copied.
    let conn = h.open(0, tag(7));
    assert_eq!(h.core.link_state(0), LinkState::Resyncing);
    assert!(h
        .out
        .iter()
        .any(|a| matches!(a, Action::ReadLocal { region: 0, .. })));
    h.take();
    h.core
        .on_local_read(h.now, 0, 0, Ok(vec![9u8; MIB as usize]), &mut h.out);
    let sums = h
        .out
        .iter()
        .find_map(|a| match a {
            Action::Send {
                frame: Frame::Sums { seq, .. },
                ..
            } => Some(*seq),
            _ => None,
        })
        .expect("compared");
    h.take();
    h.core.on_reply(
        h.now,
        0,
        conn,
        Reply::Sums {
            seq: sums,
            crcs: vec![1],
        },
        &mut h.out,
    );
    assert!(h.out.iter().any(|a| matches!(
        a,
        Action::Send {
            frame: Frame::Write { .. },
            ..
        }
    )));
    h.take();
    let Verdict::Parked(op) = h.write(1, 4096, 512) else {
        panic!("a guest write to the region waits behind the copy")
    };
    h.store_activity();
    assert!(h.releases().is_empty());
    // The replica stops answering.
    h.now += 2_000_000;
    h.core.tick(h.now, 0, &mut h.out);
    assert_eq!(h.core.link_state(0), LinkState::OutOfSync);
    assert_eq!(h.releases(), vec![1], "released once the copy is given up");
    assert!(
        h.records().is_empty(),
        "never recorded in sync: nothing to record"
    );
    h.take();
    h.core.local_done(h.now, op, true, &mut h.out);
    assert_eq!(h.completes(), vec![(1, true)], "the write completes");
    assert!(h.core.dirty(0).is_set(0), "and is marked for the replica");
    assert_eq!(h.core.in_flight(), 0);
}

/// Found by the simulation (tests/replication_sim.rs), whose seeds did not replay: the
/// machine kept operations and requests in hash maps, so a fault completed the writes it
/// held in an order that changed from run to run. Its output now depends only on its input.
#[test]
fn a_fault_completes_the_writes_it_held_in_the_order_they_were_sent() {
    let (mut h, c0, c1) = H::serving_pair();
    let mut ops = Vec::new();
    for head in 0..24u16 {
        h.write(head, u64::from(head) * 8192, 512);
        ops.push(h.core.next_op);
    }
    h.store_activity();
    for op in ops {
        h.core.local_done(h.now, OpId(op), true, &mut h.out);
    }
    for (link, conn, seq) in h.sent_writes() {
        if link == 0 {
            h.ack(link, conn, seq);
        }
    }
    assert!(h.completes().is_empty(), "replica b has not answered");
    h.take();
    h.core
        .on_disconnect(h.now, 1, c1, "reset".into(), &mut h.out);
    assert_eq!(h.records(), vec![(1, false)]);
    h.recorded(1, false);
    let heads: Vec<u16> = h.completes().iter().map(|c| c.0).collect();
    assert_eq!(heads, (0..24).collect::<Vec<u16>>());
    let _ = c0;
}

/// Found by the simulation (tests/replication_sim.rs): a write began on a region while the
/// store that takes the idle region out of the activity log was under way. It went at once
/// (the last completed store had the region), was sent to a replica, and the primary's host
/// crashed after the store landed: the restart did not reconcile the region, and the
/// replica kept a write the primary never had. A region counts as logged only if the store
/// in flight keeps it too.
#[test]
fn a_write_waits_while_the_log_being_stored_drops_its_region() {
    let mut h = H::serving_pair_with_a_write_to_region_3();
    h.now += 10_000_000;
    h.core.tick_meta(h.now, &mut h.out);
    let id = match h.take().as_slice() {
        [Action::Checkpoint { id, .. }] => *id,
        other => panic!("{other:?}"),
    };
    h.core.on_checkpoint(h.now, id, Ok(()), &mut h.out);
    let dropping = match h.take().as_slice() {
        [Action::StoreActivity { gen, words }] if words.iter().all(|w| *w == 0) => *gen,
        other => panic!("{other:?}"),
    };
    // The store that drops region 3 is under way: a new write there must wait for a store
    // that has it again.
    assert!(
        matches!(h.write(2, 3 * MIB, 4096), Verdict::Parked(_)),
        "the log on disk is about to lose the region"
    );
    assert!(h.sent_writes().is_empty());
    h.core.on_activity_stored(h.now, dropping, true, &mut h.out);
    let again = match h.take().as_slice() {
        [Action::StoreActivity { gen, words }] if words[0] & (1 << 3) != 0 => *gen,
        other => panic!("{other:?}"),
    };
    h.core.on_activity_stored(h.now, again, true, &mut h.out);
    assert_eq!(h.releases(), vec![2]);
}

/// Runs the metadata work of a stop (checkpoints and log stores, all successful) until
/// nothing is left; returns the phase and whether the log was stored.
fn finish_stop(h: &mut H) -> (Phase, bool) {
    let mut stored = false;
    for _ in 0..10 {
        for a in h.take() {
            match a {
                Action::Checkpoint { id, .. } => {
                    h.core.on_checkpoint(h.now, id, Ok(()), &mut h.out)
                }
                Action::StoreActivity { gen, .. } => {
                    stored = true;
                    h.core.on_activity_stored(h.now, gen, true, &mut h.out)
                }
                _ => {}
            }
        }
    }
    (h.core.phase(), stored)
}

/// Found by the simulation (tests/replication_sim.rs): a clean stop that began while a
/// periodic checkpoint was under way never took its last checkpoint (the stop waited for
/// the checkpoint, and nothing went on once it was done): it timed out as unclean, and the
/// next start reconciled every active region.
#[test]
fn a_stop_during_a_checkpoint_takes_the_last_checkpoint_after_it() {
    let mut h = H::serving_pair_with_a_write_to_region_3();
    h.now += 10_000_000;
    h.core.tick_meta(h.now, &mut h.out);
    let periodic = match h.take().as_slice() {
        [Action::Checkpoint { id, .. }] => *id,
        other => panic!("{other:?}"),
    };
    h.core.stop(h.now, &mut h.out);
    assert_eq!(h.core.phase(), Phase::Stopping);
    h.core.on_checkpoint(h.now, periodic, Ok(()), &mut h.out);
    assert_eq!(finish_stop(&mut h).0, Phase::Stopped { clean: true });
}

/// Found by the simulation (tests/replication_sim.rs): a primary that never wrote stopped
/// cleanly without ever storing its activity log. The daemon then finds dirty bitmaps and
/// no log, which it must read as "anything may have been in flight": the next start
/// reconciled every region (pulling the whole volume from a replica, or not serving while
/// none was reachable). A clean stop always leaves a stored, empty log.
#[test]
fn a_clean_stop_stores_the_empty_log_even_if_nothing_was_written() {
    let (mut h, _, _) = H::serving_pair();
    h.core.stop(h.now, &mut h.out);
    let (phase, stored) = finish_stop(&mut h);
    assert_eq!(phase, Phase::Stopped { clean: true });
    assert!(stored, "the empty log is stored");
}

/// Found by the simulation (tests/replication_sim.rs): recording a resynced replica in sync
/// failed, but the authority had applied it (the reply was lost: a timeout). The replica
/// then failed, and the fault was not recorded because the machine believed it had never
/// been recorded in sync: the authority kept calling a replica in sync while it was being
/// rebuilt from blank, under a fresh generation `promote` would accept. A `Record` that
/// failed may have been applied.
#[test]
fn a_failed_record_in_sync_may_have_been_applied() {
    let out_of_sync = LinkInit {
        addr: "a".into(),
        in_sync: false,
        bitmap: Some((empty(), tag(7))),
    };
    let mut h = H::new(vec![out_of_sync], Some(empty()));
    let conn = h.open(0, tag(7));
    let gen = h
        .out
        .iter()
        .find_map(|a| match a {
            Action::StoreBitmap(s) => Some(s.gen),
            _ => None,
        })
        .expect("caught up: the empty bitmap is stored first");
    h.take();
    h.core.on_bitmap_stored(0, gen, true, &mut h.out);
    assert_eq!(h.records(), vec![(0, true)]);
    h.core.on_recorded(
        h.now,
        0,
        true,
        Err(RecordError::Failed("the reply was lost".into())),
        &mut h.out,
    );
    let Verdict::Parked(op) = h.write(1, 0, 4096) else {
        panic!()
    };
    h.store_activity();
    assert_eq!(h.sent_writes().len(), 1, "sent to the resyncing replica");
    h.take();
    h.core.local_done(h.now, op, true, &mut h.out);
    h.core
        .on_disconnect(h.now, 0, conn, "reset".into(), &mut h.out);
    assert_eq!(
        h.records(),
        vec![(0, false)],
        "the authority may call it in sync: the fault is recorded"
    );
    assert!(h.completes().is_empty(), "the write waits for the record");
    h.recorded(0, false);
    assert_eq!(h.completes(), vec![(1, true)]);
}

/// Found by the simulation (tests/replication_sim.rs): at an unclean start with two
/// replicas recorded in sync, one unreachable, the start chose the other as its source and
/// recorded the unreachable one out of sync at once. The source then lost its disk
/// mid-pull, and the start, finding no replica recorded in sync any more, served the local
/// copy without the acknowledged writes the demoted replica still held. No replica recorded
/// in sync is recorded out of sync before the pulls are done.
#[test]
fn replicas_in_sync_stay_candidates_until_the_recovery_pulls_are_done() {
    let mut al = empty();
    al.set(1);
    let mut h = H::new(vec![in_sync("a", 7), in_sync("b", 7)], Some(al));
    let c0 = h.open(0, tag(7));
    h.open_fails(1);
    assert!(h.out.iter().any(|a| matches!(
        a,
        Action::Send {
            link: 0,
            frame: Frame::Read { .. },
            ..
        }
    )));
    assert!(h.records().is_empty(), "b may be needed if a goes away");
    h.take();
    // The source loses its disk mid-pull and comes back blank.
    h.core
        .on_disconnect(h.now, 0, c0, "reset".into(), &mut h.out);
    h.now += 200_000;
    h.core.tick(h.now, 0, &mut h.out);
    h.open(
        0,
        Tag {
            uuid: UUID.into(),
            gen: 0,
        },
    );
    assert_eq!(
        h.core.phase(),
        Phase::Starting,
        "the local copy may lack acknowledged writes that b holds"
    );
    h.take();
    h.core.tick(h.now, 1, &mut h.out);
    let c1 = h.open(1, tag(7));
    let read = h.out.iter().any(
        |a| matches!(a, Action::Send { link: 1, conn, frame: Frame::Read { .. } } if *conn == c1),
    );
    assert!(read, "b is the source now: {:?}", h.out);
}

/// Drives one write through: admitted (and the log stored), local done, acked by every link.
fn write_through(h: &mut H, head: u16, offset: u64, len: u64, local_ok: bool) -> OpId {
    let id = match h.write(head, offset, len) {
        Verdict::Go(id) | Verdict::Parked(id) => id,
        v => panic!("{v:?}"),
    };
    h.store_activity();
    let sent = h.sent_writes();
    h.core.local_done(h.now, id, local_ok, &mut h.out);
    for (l, c, s) in sent {
        h.ack(l, c, s);
    }
    id
}

#[test]
fn a_failed_local_write_resyncs_every_replica_from_the_local_copy() {
    let (mut h, _, _) = H::serving_pair();
    write_through(&mut h, 1, 3 * MIB, 4096, false);
    assert_eq!(h.completes(), vec![(1, false)], "the guest gets the error");
    for i in 0..2 {
        // The replicas applied a write the local copy lacks: they are brought back to it,
        // and stay recorded in sync (the write was never acknowledged).
        assert!(h.core.dirty(i).is_set(3));
        assert_eq!(h.core.link_state(i), LinkState::Resyncing);
        assert!(h.core.recorded_in_sync(i));
    }
    // One resync of the region at a time (each holds it against guest writes).
    assert!(
        h.out
            .iter()
            .any(|a| matches!(a, Action::ReadLocal { region: 3, .. })),
        "{:?}",
        h.out
    );
}

#[test]
fn a_released_request_whose_worker_went_away_counts_as_a_failed_local_write() {
    let (mut h, c0, c1) = H::serving_pair();
    let first = write_through_pending(&mut h, 1, 0, 4096);
    let Verdict::Parked(second) = h.write(2, 0, 4096) else {
        panic!("overlaps the first")
    };
    h.core.local_done(h.now, first.0, true, &mut h.out);
    for (l, s) in first.1 {
        h.ack(l, [c0, c1][l], s);
    }
    assert_eq!(h.releases(), vec![2], "released: its frames are out");
    h.take();
    // Its worker is gone before it submitted the local write.
    h.core.abandon(h.now, second, &mut h.out);
    assert!(h.core.dirty(0).is_set(0) && h.core.dirty(1).is_set(0));
    assert_eq!(h.core.in_flight(), 1, "still waits for the replicas' acks");
}

/// Admits a write and stores the log; returns its id and (link, seq) of its frames.
fn write_through_pending(h: &mut H, head: u16, offset: u64, len: u64) -> (OpId, Vec<(usize, u64)>) {
    let id = match h.write(head, offset, len) {
        Verdict::Go(id) | Verdict::Parked(id) => id,
        v => panic!("{v:?}"),
    };
    h.store_activity();
    let sent = h
        .sent_writes()
        .into_iter()
        .map(|(l, _, s)| (l, s))
        .collect();
    h.take();
    (id, sent)
}

#[test]
fn a_region_written_all_the_time_still_gets_resynced() {
    let (mut h, c0, c1) = H::serving_pair();
    h.core
        .on_disconnect(h.now, 1, c1, "killed".into(), &mut h.out);
    h.recorded(1, false);
    h.take();
    // A write is in flight on region 0 all along; the replica comes back.
    let (w1, s1) = write_through_pending(&mut h, 1, 0, 4096);
    h.now += 200_000;
    h.core.tick(h.now, 1, &mut h.out);
    let conn = h.open(1, tag(7));
    assert!(
        !h.out
            .iter()
            .any(|a| matches!(a, Action::ReadLocal { region: 0, .. })),
        "the resync of region 0 waits behind the write in flight"
    );
    h.take();
    // A newer write to the region waits behind the resync.
    assert!(matches!(h.write(2, 8192, 4096), Verdict::Parked(_)));
    h.take();
    h.core.local_done(h.now, w1, true, &mut h.out);
    for (l, s) in s1 {
        h.ack(l, c0, s);
    }
    assert!(h.out.iter().any(|a| matches!(
        a,
        Action::ReadLocal {
            link: 1,
            region: 0,
            ..
        }
    )));
    assert!(h.releases().is_empty(), "the newer write still waits");
    h.take();
    h.core
        .on_local_read(h.now, 1, 0, Ok(vec![0; MIB as usize]), &mut h.out);
    let sums = h
        .out
        .iter()
        .find_map(|a| match a {
            Action::Send {
                frame: Frame::Sums { seq, .. },
                ..
            } => Some(*seq),
            _ => None,
        })
        .unwrap();
    h.take();
    let crc = crc32c::crc32c(&vec![0u8; MIB as usize]);
    h.core.on_reply(
        h.now,
        1,
        conn,
        Reply::Sums {
            seq: sums,
            crcs: vec![crc],
        },
        &mut h.out,
    );
    assert!(!h.core.dirty(1).is_set(0), "equal: resynced");
    assert_eq!(h.releases(), vec![2], "then the newer write goes");
}

#[test]
fn an_activity_log_over_its_size_checkpoints_the_oldest_idle_regions() {
    let mut c = cfg();
    c.al_max_regions = 4;
    let mut out = Vec::new();
    let core = Core::new(c, Vec::new(), Some(empty()), 0, &mut out);
    let mut h = H { core, out, now: 0 };
    for r in 0..6u64 {
        h.now += 10;
        write_through(&mut h, r as u16, r * MIB, 512, true);
    }
    h.take();
    assert_eq!(h.core.activity().count(), 6);
    h.now += 10;
    h.core.tick_meta(h.now, &mut h.out);
    let (id, _) = match h.take().as_slice() {
        [Action::Checkpoint { id, bitmaps }] => (*id, bitmaps.len()),
        other => panic!("{other:?}"),
    };
    h.core.on_checkpoint(h.now, id, Ok(()), &mut h.out);
    let left: Vec<usize> = h.core.activity().iter().collect();
    assert_eq!(
        left.len(),
        3,
        "down to 90 % of 4, the oldest first: {left:?}"
    );
    assert!(left.iter().all(|&r| r >= 3));
}

#[test]
fn after_a_failed_local_sync_the_disk_is_fenced_and_no_region_leaves_the_log() {
    let (mut h, _, _) = H::serving_pair();
    write_through(&mut h, 1, 0, 512, true);
    h.take();
    h.now += 10_000_000;
    h.core.tick_meta(h.now, &mut h.out);
    let id = match h.take().as_slice() {
        [Action::Checkpoint { id, .. }] => *id,
        other => panic!("{other:?}"),
    };
    h.core.on_checkpoint(
        h.now,
        id,
        Err(CheckpointError::Sync("EIO".into())),
        &mut h.out,
    );
    assert!(
        h.take().iter().any(|a| matches!(a, Action::Fenced { .. })),
        "a later sync would succeed although pages are gone: the disk stops"
    );
    assert!(h.core.fenced().is_some());
    assert!(h.core.activity().is_set(0));
    assert!(
        matches!(h.write(2, 0, 512), Verdict::Refused),
        "no request is served any more"
    );
    h.take();
    h.now += 10_000_000;
    h.core.tick_meta(h.now, &mut h.out);
    assert!(
        !h.out.iter().any(|a| matches!(a, Action::Checkpoint { .. })),
        "no more checkpoints: a later sync would lie: {:?}",
        h.out
    );
    h.take();
    h.core.stop(h.now, &mut h.out);
    for a in h.take() {
        if let Action::Checkpoint { id, .. } = a {
            h.core.on_checkpoint(h.now, id, Ok(()), &mut h.out);
        }
    }
    assert_eq!(h.core.phase(), Phase::Stopped { clean: false });
    assert!(h.core.activity().is_set(0), "the next start reconciles it");
}

#[test]
fn a_failed_activity_log_store_is_retried_later_not_at_once() {
    let (mut h, _, _) = H::serving_pair();
    assert!(matches!(h.write(1, 0, 512), Verdict::Parked(_)));
    let gen = h
        .take()
        .into_iter()
        .find_map(|a| match a {
            Action::StoreActivity { gen, .. } => Some(gen),
            _ => None,
        })
        .unwrap();
    h.core.on_activity_stored(h.now, gen, false, &mut h.out);
    assert_eq!(h.completes(), vec![(1, false)]);
    assert!(
        !h.out
            .iter()
            .any(|a| matches!(a, Action::StoreActivity { .. })),
        "no store at once: {:?}",
        h.out
    );
    h.take();
    assert!(
        matches!(h.write(2, 0, 512), Verdict::Parked(_)),
        "waits meanwhile"
    );
    assert!(!h
        .out
        .iter()
        .any(|a| matches!(a, Action::StoreActivity { .. })));
    h.now += 200_000;
    h.core.tick_meta(h.now, &mut h.out);
    assert!(h
        .out
        .iter()
        .any(|a| matches!(a, Action::StoreActivity { .. })));
}

#[test]
fn regions_pulled_at_start_are_in_the_stored_log_before_the_disk_serves() {
    let mut bits = empty();
    bits.set(9);
    let mut al = empty();
    al.set(2);
    let mut h = H::new(
        vec![LinkInit {
            addr: "a".into(),
            in_sync: true,
            bitmap: Some((bits, tag(7))),
        }],
        Some(al),
    );
    let c = h.open(0, tag(7));
    h.store_activity();
    assert_eq!(h.core.phase(), Phase::Starting);
    let reads: Vec<(u64, usize)> = h
        .out
        .iter()
        .filter_map(|a| match a {
            Action::Send {
                frame: Frame::Read { seq, offset, .. },
                ..
            } => Some((*seq, (*offset / MIB) as usize)),
            _ => None,
        })
        .collect();
    assert_eq!(reads.iter().map(|r| r.1).collect::<Vec<_>>(), vec![2, 9]);
    h.take();
    for (seq, region) in reads {
        h.core.on_reply(
            h.now,
            0,
            c,
            Reply::Data {
                seq,
                data: vec![1; MIB as usize],
            },
            &mut h.out,
        );
        h.core
            .on_local_written(h.now, 0, region, Ok(()), &mut h.out);
    }
    assert!(
        h.core.activity().is_set(9),
        "in the log before the disk serves"
    );
    assert_eq!(h.core.phase(), Phase::Serving);
}

#[test]
fn a_local_write_failing_while_a_replica_is_recorded_in_sync_leaves_it_resyncing() {
    let (mut h, _, c1) = H::serving_pair();
    h.core
        .on_disconnect(h.now, 1, c1, "killed".into(), &mut h.out);
    h.recorded(1, false);
    h.take();
    h.now += 200_000;
    h.core.tick(h.now, 1, &mut h.out);
    h.open(1, tag(7));
    let gen = match h.take().as_slice() {
        [Action::StoreBitmap(b)] if b.link == 1 => b.gen,
        other => panic!("{other:?}"),
    };
    h.core.on_bitmap_stored(1, gen, true, &mut h.out);
    assert_eq!(h.records(), vec![(1, true)], "nothing left to copy");
    h.take();
    // While that record is in flight, a local write fails: both replicas hold a write the
    // local copy lacks, and must be brought back to it.
    write_through(&mut h, 1, 3 * MIB, 4096, false);
    assert!(h.core.dirty(1).is_set(3));
    h.recorded(1, true);
    assert!(h.core.recorded_in_sync(1));
    assert_eq!(
        h.core.link_state(1),
        LinkState::Resyncing,
        "still catching up on region 3"
    );
    // Drive every action: the resyncs compare, copy and finish; link 1 ends in sync.
    for _ in 0..50 {
        if h.core.link_state(1) == LinkState::InSync {
            break;
        }
        h.now += 1_000_000;
        h.core.tick(h.now, 0, &mut h.out);
        h.core.tick(h.now, 1, &mut h.out);
        for a in h.take() {
            match a {
                Action::ReadLocal { link, region, .. } => {
                    let data = vec![0u8; MIB as usize];
                    h.core
                        .on_local_read(h.now, link, region, Ok(data), &mut h.out);
                }
                Action::Send {
                    link,
                    conn,
                    frame: Frame::Sums { seq, .. },
                } => h.core.on_reply(
                    h.now,
                    link,
                    conn,
                    Reply::Sums { seq, crcs: vec![1] },
                    &mut h.out,
                ),
                Action::Send {
                    link,
                    conn,
                    frame: Frame::Write { seq, .. },
                } => h.ack(link, conn, seq),
                Action::StoreBitmap(b) => h.core.on_bitmap_stored(b.link, b.gen, true, &mut h.out),
                Action::Record { link, in_sync } => {
                    assert!(
                        !in_sync || h.core.dirty(link).count() == 0,
                        "link {link} recorded in sync with regions left"
                    );
                    h.recorded(link, in_sync);
                }
                _ => {}
            }
        }
    }
    assert_eq!(
        h.core.link_state(1),
        LinkState::InSync,
        "{:?}",
        h.core.links[1]
    );
    assert_eq!(
        h.core.link_state(0),
        LinkState::InSync,
        "{:?}",
        h.core.links[0]
    );
}
