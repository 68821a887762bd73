//! Property tests of `IommuDomain` against a naive reference: a literal model of iova.c's tree walk for
//! the IOVA space (cached node, retry, size-aligned fit; `support/iova_walk.rs`) and a list of queued
//! allocations for the flush queue.
#![expect(
    clippy::tests_outside_test_module,
    clippy::unwrap_used,
    reason = "an integration-test crate is all tests"
)]

use peerdma_core::{Iova, PAGE_SIZE, Pa, Range, SimDuration, SimTime};
use peerdma_iommu::iova::{DMA_32BIT_PFN, rounded_pages};
use peerdma_iommu::{DomainConfig, DomainType, IommuDomain, IommuProt, Translation};
use proptest::prelude::*;

const NR_PAGES: u64 = 128;
/// First and last page of the reserved window.
const RESERVED: (u64, u64) = (88, 91);
const PA_BASE: u64 = 0x10_0000_0000;

#[derive(Clone, Debug)]
enum Op {
    /// Allocate and map this many pages.
    Alloc(u64),
    /// Unmap the held allocation with this index (modulo the number held).
    Unmap(usize),
    /// Translate page `.1` of the allocation ever made with index `.0`; write when `.2`.
    Translate(usize, u64, bool),
    /// Advance time by this many milliseconds and tick.
    Tick(u64),
    /// Flush everything.
    Flush,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (1u64..40).prop_map(Op::Alloc),
        2 => any::<usize>().prop_map(Op::Unmap),
        4 => (any::<usize>(), 0u64..40, any::<bool>()).prop_map(|(a, p, w)| Op::Translate(a, p, w)),
        1 => (0u64..8).prop_map(Op::Tick),
        1 => Just(Op::Flush),
    ]
}

#[path = "support/iova_walk.rs"]
mod iova_walk;

fn run(domain_type: DomainType, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut dom = IommuDomain::new(DomainConfig {
        aperture: Range::new(Iova::from_raw(0), Iova::from_raw(NR_PAGES * PAGE_SIZE)),
        iotlb_entries: 4,
        fq_size: 3,
        ..DomainConfig::with_type(domain_type)
    });
    // dma-iommu never hands out page 0.
    let mut iovad = iova_walk::Naive::new(1, NR_PAGES);
    // A reserved window in the middle (like dma-iommu's MSI window), which splits the space in two.
    dom.reserve_iova(Range::new(
        Iova::from_raw(RESERVED.0 * PAGE_SIZE),
        Iova::from_raw((RESERVED.1 + 1) * PAGE_SIZE),
    ))
    .unwrap();
    iovad.reserve(RESERVED.0, RESERVED.1);
    // (start page, rounded size, mapped pages) of allocations still held by the "driver".
    let mut held: Vec<(u64, u64, u64)> = Vec::new();
    let mut queued: Vec<(u64, u64)> = Vec::new();
    let mut ever: Vec<(u64, u64)> = Vec::new();
    let mut now = SimTime::ZERO;
    let mut next_pa = PA_BASE;

    for op in ops {
        let mut flushed = false;
        match *op {
            Op::Alloc(n) => {
                let expected = iovad.alloc(n, u64::MAX).map(|s| (s, rounded_pages(n)));
                match dom.alloc_iova(n * PAGE_SIZE) {
                    Ok(iova) => {
                        let (start, size) = expected.expect("reference found space too");
                        prop_assert_eq!(iova.page_number(), start);
                        dom.map(
                            iova,
                            Pa::from_raw(next_pa),
                            n * PAGE_SIZE,
                            IommuProt::READ_WRITE,
                        )
                        .unwrap();
                        next_pa += size * PAGE_SIZE;
                        held.push((start, size, n));
                        ever.push((start, n));
                    }
                    Err(e) => {
                        prop_assert_eq!(expected, None);
                        prop_assert_eq!(e.errno(), peerdma_core::Errno::ENOMEM);
                    }
                }
            }
            Op::Unmap(i) if !held.is_empty() => {
                let (start, size, n) = held.swap_remove(i % held.len());
                let out = dom
                    .unmap(Iova::from_raw(start * PAGE_SIZE), n * PAGE_SIZE, now)
                    .unwrap();
                prop_assert_eq!(out.nr_pages, n);
                if domain_type == DomainType::DmaFq {
                    flushed = out.flushed;
                    // An overdue timeout flushes the older entries before this one is queued.
                    if flushed && dom.fq_len() != 0 {
                        for q in queued.drain(..) {
                            iovad.free(q.0);
                        }
                        flushed = false;
                    }
                    queued.push((start, size));
                } else {
                    iovad.free(start);
                }
            }
            Op::Translate(a, page, write) if !ever.is_empty() => {
                let (start, n) = ever[a % ever.len()];
                let iova = Iova::from_raw((start + page % n) * PAGE_SIZE + 8);
                let t = dom.translate(iova, write);
                let table = dom.lookup(iova);
                match t {
                    Translation::Hit { pa, stale } => {
                        if stale {
                            prop_assert_eq!(domain_type, DomainType::DmaFq);
                            prop_assert!(dom.fq_len() > 0, "stale entries outlive the flush queue");
                        } else {
                            prop_assert_eq!(Some(pa), table.map(|(p, _)| p));
                        }
                    }
                    Translation::Miss { pa, levels } => {
                        prop_assert_eq!(levels, 4);
                        prop_assert_eq!(Some(pa), table.map(|(p, _)| p));
                    }
                    Translation::Fault(_) => prop_assert_eq!(table, None),
                }
                prop_assert!(dom.iotlb().len() <= 4);
            }
            Op::Tick(ms) => {
                now = now + SimDuration::from_millis(ms);
                flushed = dom.tick(now);
            }
            Op::Flush => {
                dom.flush_all();
                flushed = true;
            }
            Op::Unmap(_) | Op::Translate(..) => {}
        }
        if flushed {
            prop_assert_eq!(dom.fq_len(), 0);
            for q in queued.drain(..) {
                iovad.free(q.0);
            }
        }
        prop_assert_eq!(dom.fq_len(), queued.len());
        prop_assert_eq!(dom.nr_iova_allocations(), held.len() + queued.len());
        prop_assert_eq!(dom.mapped_pages(), held.iter().map(|h| h.2).sum::<u64>());
    }
    Ok(())
}

// 256 cases each by default; set PROPTEST_CASES for a longer run.
proptest! {
    #[test]
    fn strict_domain_matches_the_reference(ops in proptest::collection::vec(op(), 1..80)) {
        run(DomainType::Dma, &ops)?;
    }

    #[test]
    fn deferred_domain_matches_the_reference(ops in proptest::collection::vec(op(), 1..80)) {
        run(DomainType::DmaFq, &ops)?;
    }
}
