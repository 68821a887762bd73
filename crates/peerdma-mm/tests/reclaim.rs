//! Reclaim through the active/inactive LRU (mm/vmscan.c): second chance for referenced pages, deactivation
//! when the inactive list is low, pinned pages kept, data intact through swap.
#![expect(
    clippy::tests_outside_test_module,
    clippy::unwrap_used,
    reason = "an integration-test crate is all tests"
)]

use std::cell::RefCell;
use std::future::Future;
use std::rc::Rc;

use peerdma_core::{PAGE_SIZE, Pid, Va};
use peerdma_mm::phys::LruState;
use peerdma_mm::{GupFlags, Kernel, MmCosts, MmapArgs, Prot};
use peerdma_sim::{Metrics, RunOutcome, Sim, SimConfig};

/// Runs `f` as the only agent of a fresh simulation with `ram` bytes of RAM; returns its result and the
/// counters.
fn run<T: 'static, F: Future<Output = T> + 'static>(
    ram: u64,
    f: impl FnOnce(Rc<Kernel>) -> F,
) -> (T, Metrics) {
    let sim = Sim::new(SimConfig::default());
    let k = Kernel::new(&sim, ram, MmCosts::zero());
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

/// Maps `n` pages and stores byte `i + 1` in page `i`.
async fn populate(k: &Kernel, n: u64) -> (Pid, Va) {
    let pid = k.create_process();
    let buf = k.mmap(pid, &anon(n)).await.unwrap();
    for i in 0..n {
        k.store(pid, page(buf, i), &[u8::try_from(i + 1).unwrap()])
            .await
            .unwrap();
    }
    (pid, buf)
}

/// Returns the LRU list of the page `va` maps, or `None` when it is not resident.
fn lru_of(k: &Kernel, pid: Pid, va: Va) -> Option<LruState> {
    let (frame, _) = k.translate(pid, va)?;
    Some(k.frame_info(frame).lru)
}

#[test]
fn hot_page_gets_a_second_chance_while_a_cold_page_of_the_same_age_is_swapped_out() {
    let ((first, second, hot, cold, back), m) = run(64 << 20, |k| async move {
        // Page 0 (hot) and page 1 (cold) are the two oldest; pages 2 and 3 keep the inactive list full.
        let (pid, buf) = populate(&k, 4).await;
        let (hot, cold) = (page(buf, 0), page(buf, 1));
        // All were touched once by their faults: the first look only marks them.
        let first = k.reclaim(32).await;
        k.store(pid, hot, &[1]).await.unwrap();
        let second = k.reclaim(1).await;
        let (h, c) = (lru_of(&k, pid, hot), lru_of(&k, pid, cold));
        let mut b = [0u8; 1];
        k.load(pid, cold, &mut b).await.unwrap();
        (first, second, h, c, b[0])
    });
    assert_eq!(
        first, 0,
        "freshly faulted pages are young: rotated, not reclaimed"
    );
    assert_eq!(m.get("lru.rotate"), 4);
    assert_eq!(second, 1, "the cold page goes to swap");
    assert_eq!(
        hot,
        Some(LruState::Active),
        "a page young at two looks is activated"
    );
    assert_eq!(cold, None, "the cold page is swapped out");
    assert_eq!(m.get("lru.activate"), 1);
    assert_eq!(m.get("lru.scan"), 4 + 2);
    assert_eq!(m.get("lru.steal"), 1);
    assert_eq!(
        m.get("lru.deactivate"),
        0,
        "two inactive pages against one active are not low"
    );
    assert_eq!(back, 2, "the cold page swaps back in intact");
    assert_eq!(m.get("swap.in"), 1);
}

#[test]
fn low_inactive_list_is_refilled_from_the_active_tail_and_a_reused_page_reactivates() {
    let ((after_two, after_three, resident), m) = run(64 << 20, |k| async move {
        let (pid, buf) = populate(&k, 8).await;
        k.reclaim(32).await;
        for i in 0..8 {
            k.store(pid, page(buf, i), &[9]).await.unwrap();
        }
        // Every page is young a second time: all activate, leaving the inactive list empty, so the
        // active tail (the first four) is deactivated until the lists are even (ratio 1 below 1 GiB).
        k.reclaim(32).await;
        let lists = |k: &Kernel| {
            (
                k.nr_lru_pages(LruState::Inactive),
                k.nr_lru_pages(LruState::Active),
            )
        };
        let after_two = (
            lists(&k),
            (0..8)
                .map(|i| lru_of(&k, pid, page(buf, i)))
                .collect::<Vec<_>>(),
        );
        // A deactivated page used again comes straight back (its referenced mark survived); the other
        // three deactivated ones were not used and go to swap.
        k.store(pid, page(buf, 0), &[7]).await.unwrap();
        let swapped = k.reclaim(32).await;
        let resident: Vec<bool> = (0..8)
            .map(|i| lru_of(&k, pid, page(buf, i)).is_some())
            .collect();
        (after_two, (swapped, lists(&k)), resident)
    });
    let ((inactive, active), states) = after_two;
    assert_eq!((inactive, active), (4, 4));
    assert_eq!(
        states,
        [
            [Some(LruState::Inactive); 4].as_slice(),
            [Some(LruState::Active); 4].as_slice()
        ]
        .concat()
    );
    let (swapped, (inactive, active)) = after_three;
    assert_eq!(swapped, 3);
    assert_eq!(
        resident,
        [true, false, false, false, true, true, true, true]
    );
    // Page 0 reactivated and pages 1-3 went, leaving 5 active and none inactive: the lists rebalance.
    assert_eq!(m.get("lru.activate"), 8 + 1);
    assert_eq!((inactive, active), (3, 2));
    assert_eq!(m.get("lru.deactivate"), 4 + 3);
}

#[test]
fn pinned_page_is_never_swapped_and_is_activated_instead() {
    let ((kept, frame_same, swapped_after_unpin), m) = run(64 << 20, |k| async move {
        let (pid, buf) = populate(&k, 2).await;
        let pin = k
            .get_user_pages(
                pid,
                buf,
                1,
                GupFlags::PIN | GupFlags::LONGTERM | GupFlags::WRITE,
            )
            .await
            .unwrap();
        let frame = pin.frames()[0];
        let mut kept = true;
        for _ in 0..6 {
            k.reclaim(32).await;
            kept &= lru_of(&k, pid, buf).is_some();
        }
        let frame_same = k.translate(pid, buf).map(|t| t.0) == Some(frame);
        drop(pin);
        let swapped_after_unpin = k.reclaim(32).await;
        (kept, frame_same, swapped_after_unpin)
    });
    assert!(kept, "a pinned page stays mapped through every pass");
    assert!(frame_same, "and in the same frame");
    assert!(m.get("lru.activate") >= 4, "each look activates it");
    assert_eq!(
        m.get("swap.out"),
        2,
        "the unpinned page and, once unpinned, the pinned one"
    );
    assert_eq!(swapped_after_unpin, 1);
}

#[test]
fn hot_working_set_stays_resident_while_a_larger_stream_passes_through() {
    // 4 MiB of RAM (1023 usable pages): a 6000-page stream written once, with 64 hot pages, created after
    // the first 500 stream pages, read after every further 100. Reclaim's first look at the hot pages
    // marks them, the second (the stream's older pages went first) finds them used again and activates
    // them; from then on the stream only evicts its own pages.
    let ((late_misses, intact), m) = run(4 << 20, |k| async move {
        let pid = k.create_process();
        let hot = k.mmap(pid, &anon(64)).await.unwrap();
        let stream = k.mmap(pid, &anon(6000)).await.unwrap();
        let mut late_misses = 0;
        let mut intact = true;
        for chunk in 0..60 {
            for i in 0..100 {
                let n = chunk * 100 + i;
                k.store(pid, page(stream, n), &n.to_le_bytes())
                    .await
                    .unwrap();
            }
            if chunk == 4 {
                for i in 0..64 {
                    k.store(pid, page(hot, i), &[0xaa]).await.unwrap();
                }
            }
            if chunk < 5 {
                continue;
            }
            let mut b = [0u8; 1];
            for i in 0..64 {
                if chunk >= 30 && lru_of(&k, pid, page(hot, i)).is_none() {
                    late_misses += 1;
                }
                k.load(pid, page(hot, i), &mut b).await.unwrap();
                intact &= b[0] == 0xaa;
            }
        }
        let mut w = [0u8; 8];
        for n in 0..6000u64 {
            k.load(pid, page(stream, n), &mut w).await.unwrap();
            intact &= u64::from_le_bytes(w) == n;
        }
        (late_misses, intact)
    });
    assert!(intact, "data lost through swap");
    assert!(m.get("swap.out") >= 5000, "the stream does not fit");
    assert!(m.get("lru.activate") >= 64, "the hot pages are promoted");
    assert_eq!(
        late_misses, 0,
        "promoted hot pages are not swapped out by the stream"
    );
}

/// mm/vmscan.c `shrink_folio_list`: a folio that cannot be trylocked (a migration holds `PG_locked`) is kept
/// on the LRU and never unmapped; once unlocked it is reclaimable again.
#[test]
fn a_page_locked_by_a_migration_is_skipped_by_reclaim() {
    let ((kept, swapped_after_unlock), m) = run(64 << 20, |k| async move {
        let (pid, buf) = populate(&k, 2).await;
        let frame = k.translate(pid, buf).unwrap().0;
        k.set_frame_locked(frame, true);
        let mut kept = true;
        for _ in 0..6 {
            k.reclaim(32).await;
            kept &= k.translate(pid, buf).map(|t| t.0) == Some(frame);
        }
        k.set_frame_locked(frame, false);
        let mut swapped = 0;
        for _ in 0..3 {
            swapped += k.reclaim(32).await;
        }
        (kept, swapped)
    });
    assert!(
        kept,
        "the locked page stays mapped in its frame through every pass"
    );
    assert_eq!(
        m.get("swap.out"),
        2,
        "the other page, then the unlocked one"
    );
    assert_eq!(swapped_after_unlock, 1);
}
