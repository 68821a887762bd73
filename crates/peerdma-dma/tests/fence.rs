//! The fence (DESIGN.md §4.4 invalidate step 5, §4.8): an invalidation of a range a device mirrors returns
//! only after the device's in-flight requests holding translations of that range have landed, explored
//! over many schedules; a driver that skips the wait is caught by the oracle as a stale translation.
#![expect(
    clippy::tests_outside_test_module,
    clippy::unwrap_used,
    reason = "an integration-test crate is all tests"
)]

mod common;

use std::cell::Cell;
use std::rc::Rc;

use common::{NIC, anon, range, world_explore_timed};
use peerdma_core::{PAGE_SIZE, SimDuration};
use peerdma_dma::{DmaCosts, DmaMirror, DmaOp, FenceInjection, FenceMode};
use peerdma_iommu::DomainType;
use peerdma_mm::oracle::ViolationKind;
use peerdma_mm::{Advice, Prot};
use peerdma_sim::RunOutcome;

const PAGES: u64 = 64;
const SEEDS: u64 = 32;

/// What one schedule of the race did.
struct Race {
    outcome: RunOutcome,
    violations: Vec<ViolationKind>,
    fence_waits: u64,
    aborted: u64,
    /// The invalidation returned while device requests of its range were still in flight.
    returned_with_requests_in_flight: bool,
}

/// A device writes 64 mirrored pages (pipelined, in flight over calibrated link time) while the CPU, after a
/// seed-dependent delay, drops the range with MADV_DONTNEED — whose CLEAR invalidation reaches the mirror —
/// and at once reads the range back.
#[expect(
    clippy::many_single_char_names,
    reason = "w, k, p, m: the harness names used in every test"
)]
fn race(seed: u64, injection: FenceInjection, mode: FenceMode) -> Race {
    let w = world_explore_timed(DomainType::Dma, seed, DmaCosts::calibrated());
    let (k, p) = (w.k.clone(), w.p.clone());
    let pid = k.create_process();
    let in_flight_after = Rc::new(Cell::new(false));
    let (k2, p2, flag) = (k.clone(), p.clone(), in_flight_after.clone());
    w.sim.spawn("setup", async move {
        let va = anon(&k2, pid, PAGES, Prot::RW).await;
        let nic = p2.device(NIC).unwrap();
        nic.space.inject(injection);
        nic.space.set_fence_mode(mode);
        let m = Rc::new(DmaMirror::register(&p2, nic.clone(), pid, range(va, PAGES)).unwrap());
        // Fault the whole range in first, so the race is between DMA in flight and the invalidation.
        m.fault(range(va, PAGES), true).await.unwrap();
        let dev = m.clone();
        k2.sim.spawn("device", async move {
            let ops = (0..PAGES).map(|_| DmaOp::Write(vec![0xd0; 4096])).collect();
            // Pages the DONTNEED dropped fault back in; whatever the schedule, the write completes.
            dev.access(va, ops).await.unwrap();
        });
        let (k3, nic3) = (k2.clone(), nic.clone());
        k2.sim.spawn("cpu", async move {
            // Somewhere inside the device's ~64 × 0.6 µs of transfers.
            k3.sim
                .sleep(SimDuration::from_nanos(seed * 1_300 % 40_000))
                .await;
            k3.madvise(pid, va, PAGES * PAGE_SIZE, Advice::DontNeed)
                .await
                .unwrap();
            flag.set(nic3.space.nr_in_flight_in(pid, range(va, PAGES)) > 0);
            // Reading the range back checks every page against the oracle's record (data integrity).
            let mut b = vec![0u8; 4096];
            for i in 0..PAGES {
                k3.load(pid, va.add(i * PAGE_SIZE), &mut b).await.unwrap();
            }
        });
    });
    let outcome = w.sim.run();
    let metrics = w.sim.metrics();
    Race {
        outcome,
        violations: k.oracle_violations().iter().map(|v| v.kind).collect(),
        fence_waits: metrics.get("dma.fence_waits"),
        aborted: metrics.get("dma.aborted"),
        returned_with_requests_in_flight: in_flight_after.get(),
    }
}

#[test]
fn an_invalidation_racing_a_long_device_write_waits_for_it() {
    let mut waited = 0;
    for seed in 0..SEEDS {
        let r = race(seed, FenceInjection::None, FenceMode::Drain);
        assert_eq!(
            r.outcome,
            RunOutcome::Completed,
            "seed {seed}: {:?}",
            r.violations
        );
        assert!(r.violations.is_empty(), "seed {seed}: {:?}", r.violations);
        assert!(
            !r.returned_with_requests_in_flight,
            "seed {seed}: DONTNEED returned with requests of its range in flight"
        );
        waited += r.fence_waits;
    }
    assert!(
        waited > 0,
        "some schedule had requests in flight at the invalidation"
    );
}

#[test]
fn a_fence_that_aborts_leaves_nothing_in_flight_and_the_device_retries() {
    let mut aborted = 0;
    for seed in 0..SEEDS {
        let r = race(seed, FenceInjection::None, FenceMode::Abort);
        assert_eq!(
            r.outcome,
            RunOutcome::Completed,
            "seed {seed}: {:?}",
            r.violations
        );
        assert!(!r.returned_with_requests_in_flight, "seed {seed}");
        aborted += r.aborted;
    }
    assert!(aborted > 0, "some schedule aborted requests");
}

#[test]
fn skipping_the_fence_wait_is_reported_as_a_stale_translation() {
    let mut caught = 0;
    for seed in 0..SEEDS {
        let r = race(seed, FenceInjection::SkipWait, FenceMode::Drain);
        match r.violations.first() {
            None => {}
            Some(ViolationKind::StaleTranslation) => caught += 1,
            Some(other) => panic!("seed {seed}: the first violation is {other:?}"),
        }
    }
    assert!(caught > 0, "exploration found no stale translation");
}
