use super::*;

const QSIZE: u16 = 8;

/// What survives a crash: the region and the used ring (guest memory), and the avail ring.
struct World {
    region: Vec<u8>,
    used: Vec<u16>,
    avail: Vec<u16>,
}

/// What the (crashing) backend does, as single steps.
#[derive(Debug, Clone, Copy)]
enum Op {
    /// Pop the next avail entry (backend memory only).
    Pop,
    SetCounter(u16),
    SetInflight(u16),
    LinkIntoBatch(u16),
    SetBatchHead(u16),
    AddUsed(u16),
    ClearInflight(u16),
    SetUsedIdx,
}

fn fresh_world(avail: &[u16]) -> World {
    let mut region = vec![0u8; queue_region_size(QSIZE)];
    {
        let mem = VolatileSlice::from(&mut region[..]);
        store(&mem, OFF_DESC_NUM, QSIZE);
        store(&mem, OFF_VERSION, VERSION);
    }
    World {
        region,
        used: Vec::new(),
        avail: avail.to_vec(),
    }
}

/// Expands a script of pops and completions into the steps the worker performs.
fn steps(script: &[(bool, u16)]) -> Vec<Op> {
    let mut out = Vec::new();
    for &(pop, head) in script {
        if pop {
            out.extend([Op::Pop, Op::SetCounter(head), Op::SetInflight(head)]);
        } else {
            out.extend([
                Op::LinkIntoBatch(head),
                Op::SetBatchHead(head),
                Op::AddUsed(head),
                Op::ClearInflight(head),
                Op::SetUsedIdx,
            ]);
        }
    }
    out
}

/// Runs the first `n` steps; returns how many avail entries were popped.
fn run(world: &mut World, ops: &[Op], n: usize) -> usize {
    let mut t = QueueTracker::new(0, QSIZE);
    let mut popped = 0;
    let mem = VolatileSlice::from(&mut world.region[..]);
    for op in &ops[..n] {
        match *op {
            Op::Pop => popped += 1,
            Op::SetCounter(h) => t.set_counter(&mem, h),
            Op::SetInflight(h) => t.set_inflight(&mem, h),
            Op::LinkIntoBatch(h) => t.link_into_batch(&mem, h),
            Op::SetBatchHead(h) => t.set_batch_head(&mem, h),
            Op::AddUsed(h) => world.used.push(h),
            Op::ClearInflight(h) => t.clear_inflight(&mem, h),
            Op::SetUsedIdx => t.set_used_idx(&mem, world.used.len() as u16),
        }
    }
    popped
}

/// Crashes after every step of `script`, recovers, and checks that every request popped
/// before the crash ends up exactly once in: the used ring, the resubmitted set, or the part
/// of the avail ring that will be popped again; and that resubmission keeps pop order.
fn crash_everywhere(script: &[(bool, u16)]) {
    let avail: Vec<u16> = script.iter().filter(|s| s.0).map(|s| s.1).collect();
    let ops = steps(script);
    for crash_at in 0..=ops.len() {
        let mut w = fresh_world(&avail);
        let popped = run(&mut w, &ops, crash_at);
        let mut t = QueueTracker::new(0, QSIZE);
        let ring_idx = w.used.len() as u16;
        let resubmit = t.recover(&VolatileSlice::from(&mut w.region[..]), ring_idx);
        let resume_at = usize::from(ring_idx) + resubmit.len();
        // Resuming past what was popped would skip avail entries nobody processed.
        assert!(
            resume_at <= popped,
            "crash at {crash_at}: resumes at {resume_at}, only {popped} popped"
        );
        // Popped requests, by avail position, each accounted for exactly once.
        let mut accounted: Vec<(usize, &str)> = Vec::new();
        let mut used = w.used.clone();
        let mut resub = resubmit.clone();
        for pos in 0..popped {
            let head = w.avail[pos];
            if pos >= resume_at {
                accounted.push((pos, "popped again"));
            } else if let Some(i) = resub.iter().position(|&h| h == head) {
                // A head may appear twice in the avail ring (reused after completion); the
                // older use must already be in the used ring.
                let older_uses = w.avail[..pos].iter().filter(|&&h| h == head).count();
                let completed = w.used.iter().filter(|&&h| h == head).count();
                if completed > older_uses {
                    let j = used.iter().position(|&h| h == head).unwrap();
                    used.remove(j);
                    accounted.push((pos, "used"));
                } else {
                    resub.remove(i);
                    accounted.push((pos, "resubmitted"));
                }
            } else if let Some(j) = used.iter().position(|&h| h == head) {
                used.remove(j);
                accounted.push((pos, "used"));
            } else {
                panic!("crash at {crash_at}: head {head} at avail {pos} is lost (used {:?}, resubmit {resubmit:?})", w.used);
            }
        }
        assert!(
            used.is_empty(),
            "crash at {crash_at}: completed twice or never popped: {used:?}"
        );
        assert!(
            resub.is_empty(),
            "crash at {crash_at}: resubmitted but not in flight: {resub:?}"
        );
        // Resubmission order is pop order.
        let order: Vec<usize> = resubmit
            .iter()
            .map(|h| w.avail[..resume_at].iter().rposition(|a| a == h).unwrap())
            .collect();
        assert!(
            order.windows(2).all(|p| p[0] < p[1]),
            "crash at {crash_at}: resubmit order {resubmit:?}"
        );
    }
}

#[test]
fn crash_at_every_step_in_order_completions() {
    crash_everywhere(&[
        (true, 0),
        (true, 1),
        (false, 0),
        (true, 2),
        (false, 1),
        (false, 2),
    ]);
}

#[test]
fn crash_at_every_step_out_of_order_and_reused_heads() {
    crash_everywhere(&[
        (true, 3),
        (true, 5),
        (true, 0),
        (false, 5),
        (true, 7),
        (false, 0),
        (true, 5), // head 5 reused after its completion
        (false, 7),
        (true, 1),
        (false, 3),
        (false, 1),
        (false, 5),
    ]);
}

#[test]
fn crash_at_every_step_random_scripts() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..40 {
        let mut free: Vec<u16> = (0..QSIZE).collect();
        let mut busy: Vec<u16> = Vec::new();
        let mut script = Vec::new();
        for _ in 0..24 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let pop = !free.is_empty() && (busy.is_empty() || seed % 2 == 0);
            if pop {
                let h = free.remove((seed >> 8) as usize % free.len());
                busy.push(h);
                script.push((true, h));
            } else {
                let h = busy.remove((seed >> 8) as usize % busy.len());
                free.push(h);
                script.push((false, h));
            }
        }
        crash_everywhere(&script);
    }
}

#[test]
fn a_region_survives_being_reopened_by_another_process() {
    let r = InflightRegion::create(2, 16).unwrap();
    let mut t = r.tracker(1).unwrap();
    r.with(|m| t.mark(m, 9));
    r.with(|m| t.mark(m, 4));
    r.with(|m| t.complete(m, 9, || 1));
    let file = r.file().try_clone().unwrap();
    let len = r.len() as u64;
    drop(r);
    // A restarted backend gets the same memfd back from the frontend.
    let again = InflightRegion::open(file, len, 0, 2, 16).unwrap();
    let mut t = again.tracker(1).unwrap();
    assert_eq!(again.with(|m| t.recover(m, 1)), vec![4]);
    let mut t0 = again.tracker(0).unwrap();
    assert!(again.with(|m| t0.recover(m, 0)).is_empty());
}

#[test]
fn mismatched_regions_are_refused() {
    let r = InflightRegion::create(1, 16).unwrap();
    let file = r.file().try_clone().unwrap();
    let len = r.len() as u64;
    assert!(matches!(
        InflightRegion::open(file.try_clone().unwrap(), len, 0, 1, 32),
        Err(InflightError::TooSmall { .. })
    ));
    assert!(matches!(
        InflightRegion::open(file.try_clone().unwrap(), len, 0, 1, 8),
        Err(InflightError::Layout { .. })
    ));
    assert!(InflightRegion::open(file, len, 0, 1, 16).is_ok());
    assert!(r.tracker(1).is_none());
}
