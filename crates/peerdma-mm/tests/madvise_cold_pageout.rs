//! MADV_COLD and MADV_PAGEOUT (mm/madvise.c `madvise_cold_or_pageout_pte_range`, mm/swap.c
//! `folio_deactivate`, mm/vmscan.c `reclaim_pages`): cold moves only active private pages to the inactive
//! list and clears their young bits; pageout reclaims the private pages now whatever their young bits,
//! activating pinned ones and leaving pages another process maps alone.
#![expect(
    clippy::tests_outside_test_module,
    clippy::unwrap_used,
    reason = "an integration-test crate is all tests"
)]

use std::cell::RefCell;
use std::future::Future;
use std::rc::Rc;

use peerdma_core::{Advice, Errno, PAGE_SIZE, Pid, Va};
use peerdma_mm::phys::LruState;
use peerdma_mm::{GupFlags, Kernel, MmCosts, MmapArgs, Prot};
use peerdma_sim::{Metrics, RunOutcome, Sim, SimConfig};

/// Runs `f` as the only agent of a fresh simulation with 64 MiB of RAM; returns its result and the counters.
fn run<T: 'static, F: Future<Output = T> + 'static>(
    f: impl FnOnce(Rc<Kernel>, Sim) -> F,
) -> (T, Metrics) {
    let sim = Sim::new(SimConfig::default());
    let k = Kernel::new(&sim, 64 << 20, MmCosts::zero());
    let out = Rc::new(RefCell::new(None));
    let (o, fut) = (out.clone(), f(k, sim.clone()));
    sim.spawn("test", async move { *o.borrow_mut() = Some(fut.await) });
    assert_eq!(sim.run(), RunOutcome::Completed);
    (out.borrow_mut().take().unwrap(), sim.metrics())
}

fn page(buf: Va, i: u64) -> Va {
    buf.checked_add(i * PAGE_SIZE).unwrap()
}

/// Maps `n` private anonymous pages and stores byte `i + 1` in page `i`.
async fn populate(k: &Kernel, n: u64) -> (Pid, Va) {
    let pid = k.create_process();
    let args = MmapArgs {
        len: n * PAGE_SIZE,
        prot: Prot::RW,
        private: true,
        anonymous: true,
        ..MmapArgs::default()
    };
    let buf = k.mmap(pid, &args).await.unwrap();
    for i in 0..n {
        k.store(pid, page(buf, i), &[u8::try_from(i + 1).unwrap()])
            .await
            .unwrap();
    }
    (pid, buf)
}

fn lru_of(k: &Kernel, pid: Pid, va: Va) -> Option<LruState> {
    let (frame, _) = k.translate(pid, va)?;
    Some(k.frame_info(frame).lru)
}

/// Eight pages, the last four active and the first four inactive but marked referenced (the state the
/// reclaim test `low_inactive_list_is_refilled_…` reaches after two passes).
async fn half_active(k: &Kernel) -> (Pid, Va) {
    let (pid, buf) = populate(k, 8).await;
    k.reclaim(32).await;
    for i in 0..8 {
        k.store(pid, page(buf, i), &[9]).await.unwrap();
    }
    k.reclaim(32).await;
    (pid, buf)
}

#[test]
fn cold_deactivates_only_active_pages_and_makes_them_reclaimable() {
    let ((before, after, swapped), m) = run(|k, sim| async move {
        let (pid, buf) = half_active(&k).await;
        let states = |k: &Kernel| {
            (0..8)
                .map(|i| lru_of(k, pid, page(buf, i)))
                .collect::<Vec<_>>()
        };
        let before = states(&k);
        let deact = sim.metrics().get("lru.deactivate");
        k.madvise(pid, buf, 8 * PAGE_SIZE, Advice::Cold)
            .await
            .unwrap();
        let after = (states(&k), sim.metrics().get("lru.deactivate") - deact);
        // Nothing is young or referenced any more: one pass takes all eight.
        let swapped = k.reclaim(32).await;
        (before, after, swapped)
    });
    let active = [
        [Some(LruState::Inactive); 4].as_slice(),
        [Some(LruState::Active); 4].as_slice(),
    ]
    .concat();
    assert_eq!(before, active);
    assert_eq!(after.0, [Some(LruState::Inactive); 8], "all inactive now");
    assert_eq!(
        after.1, 4,
        "only the four active pages count as deactivated"
    );
    assert_eq!(swapped, 8, "cold cleared the young and referenced bits");
    assert_eq!(m.get("swap.out"), 8);
}

#[test]
fn pageout_reclaims_now_and_skips_pinned_and_shared_pages() {
    let ((errno, swapped, states, data), m) = run(|k, sim| async move {
        let (pid, buf) = populate(&k, 4).await;
        // Page 1 is pinned; page 2 is shared with a child by fork (fork copies the pinned page 1 for the
        // child, so the parent's page 1 stays exclusive).
        let pin = k
            .get_user_pages(
                pid,
                page(buf, 1),
                1,
                GupFlags::PIN | GupFlags::LONGTERM | GupFlags::WRITE,
            )
            .await
            .unwrap();
        let child = k.fork(pid).await.unwrap();
        k.munmap(child, page(buf, 0), PAGE_SIZE).await.unwrap();
        k.munmap(child, page(buf, 3), PAGE_SIZE).await.unwrap();
        let errno = k
            .madvise(pid, buf, 5 * PAGE_SIZE, Advice::PageOut)
            .await
            .err();
        // The pages are young (just stored): MADV_PAGEOUT ignores that.
        let swapped = sim.metrics().get("swap.out");
        k.madvise(pid, buf, 4 * PAGE_SIZE, Advice::PageOut)
            .await
            .unwrap();
        let swapped = sim.metrics().get("swap.out") - swapped;
        let states: Vec<_> = (0..4).map(|i| lru_of(&k, pid, page(buf, i))).collect();
        let mut data = Vec::new();
        for i in 0..4 {
            let mut b = [0u8; 1];
            k.load(pid, page(buf, i), &mut b).await.unwrap();
            data.push(b[0]);
        }
        drop(pin);
        (errno, swapped, states, data)
    });
    assert_eq!(errno, Some(Errno::ENOMEM), "a range past the mapping");
    assert_eq!(swapped, 2, "pages 0 and 3");
    assert_eq!(
        states,
        [None, Some(LruState::Active), Some(LruState::Inactive), None],
        "the pinned page is activated, the shared one left where it was"
    );
    assert_eq!(data, [1, 2, 3, 4], "the data comes back from swap");
    assert_eq!(m.get("swap.in"), 2);
    assert_eq!(m.get("lru.activate"), 1);
}
