//! ZONE_MOVABLE memory and FOLL_LONGTERM placement out of it (spec/linux-p2p.md §2.4): a movable RAM node
//! takes anonymous user pages only (include/linux/gfp.h `gfp_zone`, `GFP_HIGHUSER_MOVABLE`), short-term pins
//! leave pages there, and a long-term pin migrates them to memory outside it before pinning the whole range
//! again (mm/gup.c `collect_longterm_unpinnable_folios`, `migrate_longterm_unpinnable_folios`), allocating
//! under `memalloc_pin_save` (include/linux/sched/mm.h).
#![expect(
    clippy::tests_outside_test_module,
    clippy::unwrap_used,
    reason = "an integration-test crate is all tests"
)]

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;

use peerdma_core::{DeviceId, Errno, FrameId, PAGE_SIZE, PMD_SIZE, Pid, Range, Va};
use peerdma_mm::{
    GupFlags as F, IntervalNotifierOps, Kernel, MmCosts, MmapArgs, MovableError, NotifierEvent,
    NotifierId, NotifierRange, Prot,
};
use peerdma_sim::{Metrics, RunOutcome, Sim, SimConfig};

/// Runs `f` as the only agent of a simulation with two 2 MiB RAM nodes, node 1 movable; returns its result
/// and the counters.
fn run<T: 'static, Fut: Future<Output = T> + 'static>(
    f: impl FnOnce(Rc<Kernel>) -> Fut,
) -> (T, Metrics) {
    let sim = Sim::new(SimConfig::default());
    let k = Kernel::new_numa(&sim, &[PMD_SIZE, PMD_SIZE], MmCosts::zero());
    k.set_node_movable(1).unwrap();
    let out = Rc::new(RefCell::new(None));
    let (o, fut) = (out.clone(), f(k));
    sim.spawn("test", async move { *o.borrow_mut() = Some(fut.await) });
    assert_eq!(sim.run(), RunOutcome::Completed);
    (out.borrow_mut().take().unwrap(), sim.metrics())
}

fn anon(pages: u64) -> MmapArgs {
    MmapArgs {
        len: pages * PAGE_SIZE,
        prot: Prot::RW,
        private: true,
        anonymous: true,
        ..MmapArgs::default()
    }
}

fn page(buf: Va, i: u64) -> Va {
    buf.checked_add(i * PAGE_SIZE).unwrap()
}

fn stamp(i: u64) -> u8 {
    u8::try_from(i).unwrap() + 0x41
}

/// A process on the movable node 1 with `n` anonymous pages, each written with its stamp.
async fn movable_buffer(k: &Kernel, n: u64) -> (Pid, Va) {
    let pid = k.create_process();
    k.set_home_node(pid, 1).unwrap();
    let buf = k.mmap(pid, &anon(n)).await.unwrap();
    for i in 0..n {
        k.store(pid, page(buf, i), &[stamp(i)]).await.unwrap();
    }
    (pid, buf)
}

fn frame_of(k: &Kernel, pid: Pid, va: Va) -> FrameId {
    k.translate(pid, va).unwrap().0
}

fn frames(k: &Kernel, pid: Pid, buf: Va, n: u64) -> Vec<FrameId> {
    (0..n).map(|i| frame_of(k, pid, page(buf, i))).collect()
}

/// (node, in ZONE_MOVABLE) of each frame.
fn placement(k: &Kernel, fs: &[FrameId]) -> Vec<(Option<u32>, bool)> {
    fs.iter()
        .map(|&f| {
            let info = k.frame_info(f);
            (info.node, info.zone_movable)
        })
        .collect()
}

/// The first byte of each page, read by the CPU.
async fn first_bytes(k: &Kernel, pid: Pid, buf: Va, n: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..n {
        let mut b = [0u8; 1];
        k.load(pid, page(buf, i), &mut b).await.unwrap();
        out.push(b[0]);
    }
    out
}

/// One invalidation as a recorder saw it.
type Seen = (NotifierEvent, Option<DeviceId>, Range<Va>);

/// A mirror that records every invalidation it sees.
#[derive(Debug, Default)]
struct Recorder(RefCell<Vec<Seen>>);

impl IntervalNotifierOps for Recorder {
    fn invalidate<'a>(
        &'a self,
        _id: NotifierId,
        r: &'a NotifierRange,
        _seq: u64,
    ) -> Pin<Box<dyn Future<Output = bool> + 'a>> {
        self.0.borrow_mut().push((r.event, r.owner, r.range));
        Box::pin(async { true })
    }

    fn name(&self) -> String {
        "recorder".to_owned()
    }
}

const LONGTERM: F = F::PIN.union(F::LONGTERM).union(F::WRITE);

#[test]
fn node_0_and_used_or_missing_nodes_cannot_be_made_movable() {
    let sim = Sim::new(SimConfig::default());
    let k = Kernel::new_numa(&sim, &[PMD_SIZE, PMD_SIZE, PMD_SIZE], MmCosts::zero());
    k.alloc_page(k.node_region(2)).unwrap();
    assert_eq!(k.set_node_movable(0), Err(MovableError::BootNode));
    assert_eq!(
        k.set_node_movable(3),
        Err(MovableError::NoSuchNode {
            node: 3,
            nr_nodes: 3
        })
    );
    assert_eq!(k.set_node_movable(2), Err(MovableError::InUse { node: 2 }));
    assert_eq!(k.set_node_movable(1), Ok(()));
    assert_eq!(
        (0..3).map(|n| k.is_node_movable(n)).collect::<Vec<_>>(),
        [false, true, false]
    );
}

#[test]
fn a_process_on_a_movable_node_faults_its_anonymous_pages_there() {
    let (placed, _) = run(|k| async move {
        let (pid, buf) = movable_buffer(&k, 4).await;
        placement(&k, &frames(&k, pid, buf, 4))
    });
    assert_eq!(placed, [(Some(1), true); 4]);
}

#[test]
fn short_term_pins_leave_movable_pages_in_place() {
    let ((same, placed), metrics) = run(|k| async move {
        let (pid, buf) = movable_buffer(&k, 4).await;
        let before = frames(&k, pid, buf, 4);
        let mut same = Vec::new();
        for flags in [F::GET, F::PIN, F::PIN | F::WRITE] {
            let pin = k.get_user_pages(pid, buf, 4, flags).await.unwrap();
            same.push(pin.frames() == before.as_slice());
        }
        let placed = placement(&k, &frames(&k, pid, buf, 4));
        (same, placed)
    });
    assert_eq!(same, [true, true, true]);
    assert_eq!(placed, [(Some(1), true); 4]);
    assert_eq!(metrics.get("gup.longterm_migrations"), 0);
    assert_eq!(metrics.get("migrate.pages"), 0);
}

#[test]
fn a_longterm_pin_migrates_movable_pages_out_keeps_their_data_and_pins_the_new_frames() {
    let (out, metrics) = run(|k| async move {
        let (pid, buf) = movable_buffer(&k, 4).await;
        let before = frames(&k, pid, buf, 4);
        let rec = Rc::new(Recorder::default());
        k.interval_notifier_insert(pid, buf, 4 * PAGE_SIZE, rec.clone())
            .unwrap();

        let pin = k.get_user_pages(pid, buf, 4, LONGTERM).await.unwrap();

        let pinned = pin.frames().to_vec();
        let mapped = frames(&k, pid, buf, 4);
        let placed = placement(&k, &pinned);
        let all_pinned = pinned.iter().all(|&f| k.frame_info(f).maybe_dma_pinned);
        let old_freed = before.iter().all(|&f| !k.frame_info(f).allocated);
        let data = first_bytes(&k, pid, buf, 4).await;
        let seen = rec.0.borrow().clone();
        drop(pin);
        (
            pinned == mapped,
            pinned.iter().zip(&before).all(|(a, b)| a != b),
            placed,
            all_pinned,
            old_freed,
            data,
            seen,
            buf,
        )
    });
    let (pins_mapped, moved, placed, all_pinned, old_freed, data, seen, buf) = out;
    assert!(pins_mapped, "the pin holds the frames now mapped");
    assert!(moved, "every page moved");
    assert_eq!(placed, [(Some(0), false); 4], "out of movable memory");
    assert!(all_pinned);
    assert!(old_freed, "the movable pages went back to node 1");
    assert_eq!(data, [0x41, 0x42, 0x43, 0x44]);
    let want: Vec<Seen> = (0..4)
        .map(|i| {
            (
                NotifierEvent::Migrate,
                None,
                Range::from_len(page(buf, i), PAGE_SIZE).unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen, want,
        "one MIGRATE invalidation with no owner per page"
    );
    assert_eq!(metrics.get("gup.longterm_migrations"), 1);
    assert_eq!(metrics.get("gup.longterm_migrated_pages"), 4);
}

#[test]
fn a_longterm_pin_of_a_page_cow_shared_after_fork_unshares_it_outside_movable_memory() {
    let (out, metrics) = run(|k| async move {
        let (parent, buf) = movable_buffer(&k, 1).await;
        let child = k.fork(parent).await.unwrap();
        let shared = frame_of(&k, parent, buf);
        // PIN without WRITE of a COW-shared anonymous page unshares it first (gup_must_unshare): the copy
        // is allocated under the pin scope, so it never lands in movable memory and nothing migrates.
        let pin = k
            .get_user_pages(parent, buf, 1, F::PIN | F::LONGTERM)
            .await
            .unwrap();
        let pf = pin.frames()[0];
        let cf = frame_of(&k, child, buf);
        let placed = placement(&k, &[pf, cf]);
        let data = (
            first_bytes(&k, parent, buf, 1).await,
            first_bytes(&k, child, buf, 1).await,
        );
        drop(pin);
        (pf != shared, cf == shared, placed, data)
    });
    let (copied, child_kept, placed, data) = out;
    assert!(copied && child_kept);
    assert_eq!(placed, [(Some(0), false), (Some(1), true)]);
    assert_eq!(data, (vec![0x41], vec![0x41]));
    assert_eq!(metrics.get("gup.longterm_migrations"), 0);
}

#[test]
fn with_no_free_page_outside_movable_memory_a_longterm_pin_is_enomem_and_pins_nothing() {
    let (out, metrics) = run(|k| async move {
        let (pid, buf) = movable_buffer(&k, 4).await;
        let before = frames(&k, pid, buf, 4);
        // Fill node 0 with driver pages: nothing outside movable memory is left.
        let drv = k.create_process();
        let free0 = k.nr_free_node(0);
        k.mmap_driver_pages(drv, free0 * PAGE_SIZE, Prot::RW, true)
            .await
            .unwrap();
        assert_eq!(k.nr_free_node(0), 0);

        let r = k
            .get_user_pages(pid, buf, 4, LONGTERM)
            .await
            .map(|p| p.len());

        let after = frames(&k, pid, buf, 4);
        let refcounts: Vec<u32> = after.iter().map(|&f| k.frame_info(f).refcount).collect();
        let data = first_bytes(&k, pid, buf, 4).await;
        (r, after == before, refcounts, data)
    });
    let (r, unmoved, refcounts, data) = out;
    assert_eq!(r, Err(Errno::ENOMEM));
    assert!(unmoved, "the pages stay where they were");
    assert_eq!(refcounts, [1; 4], "no pin and no stray reference is left");
    assert_eq!(data, [0x41, 0x42, 0x43, 0x44]);
    assert_eq!(metrics.get("gup.longterm_migrations"), 0);
}

#[test]
fn a_longterm_pin_of_untouched_pages_faults_them_outside_movable_memory_under_the_pin_scope() {
    let ((pinned_at, later_at, scope_closed), metrics) = run(|k| async move {
        let pid = k.create_process();
        k.set_home_node(pid, 1).unwrap();
        let buf = k.mmap(pid, &anon(3)).await.unwrap();
        let pin = k.get_user_pages(pid, buf, 2, LONGTERM).await.unwrap();
        let pinned_at = placement(&k, pin.frames());
        drop(pin);
        // memalloc_pin_restore: the next fault is the home node's again.
        k.store(pid, page(buf, 2), &[1]).await.unwrap();
        let later_at = placement(&k, &[frame_of(&k, pid, page(buf, 2))]);
        let scope_closed = k.memalloc_pin_depth(pid) == 0;
        (pinned_at, later_at, scope_closed)
    });
    assert_eq!(pinned_at, [(Some(0), false); 2]);
    assert_eq!(later_at, [(Some(1), true)]);
    assert!(scope_closed);
    assert_eq!(
        metrics.get("gup.longterm_migrations"),
        0,
        "nothing to migrate"
    );
}

#[test]
fn kernel_driver_pages_never_land_on_a_movable_node() {
    let ((placed, full), _) = run(|k| async move {
        let pid = k.create_process();
        k.set_home_node(pid, 1).unwrap();
        let va = k
            .mmap_driver_pages(pid, 2 * PAGE_SIZE, Prot::RW, true)
            .await
            .unwrap();
        let placed = placement(&k, &frames(&k, pid, va, 2));
        // Node 0 full: a driver mapping is refused although node 1 has room.
        let free0 = k.nr_free_node(0);
        k.mmap_driver_pages(pid, free0 * PAGE_SIZE, Prot::RW, true)
            .await
            .unwrap();
        let full = k
            .mmap_driver_pages(pid, PAGE_SIZE, Prot::RW, true)
            .await
            .map(|_| ());
        (placed, full)
    });
    assert_eq!(
        placed,
        [(Some(0), false); 2],
        "home node 1 is movable: node 0"
    );
    assert_eq!(full, Err(Errno::ENOMEM));
}
