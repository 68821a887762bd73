//! Unit tests of the IOVA allocator, and a property test against a literal model of iova.c's walk.

use super::*;

#[test]
fn small_requests_round_up_to_a_power_of_two() {
    assert_eq!(rounded_pages(1), 1);
    assert_eq!(rounded_pages(3), 4);
    assert_eq!(rounded_pages(31), 32);
    assert_eq!(rounded_pages(32), 32);
    assert_eq!(rounded_pages(33), 33);
}

#[test]
fn allocation_is_top_down_from_the_limit() {
    let mut a = IovaAllocator::new(1, 1 << 20);
    assert_eq!(a.alloc(1, u64::MAX), Some(((1 << 20) - 1, 1)));
    assert_eq!(a.alloc(1, u64::MAX), Some(((1 << 20) - 2, 1)));
    assert_eq!(a.alloc(1, 0x100), Some((0xff, 1)));
}

#[test]
fn large_requests_are_aligned_to_the_next_power_of_two() {
    let mut a = IovaAllocator::new(1, 1 << 20);
    let (pfn, n) = a.alloc(33, u64::MAX).unwrap();
    assert_eq!(n, 33);
    assert_eq!(pfn % 64, 0);
    assert_eq!(pfn, (1 << 20) - 64);
}

#[test]
fn holes_between_allocations_are_found() {
    let mut a = IovaAllocator::new(1, 16);
    let top = a.alloc(4, u64::MAX).unwrap();
    let mid = a.alloc(4, u64::MAX).unwrap();
    let low = a.alloc(4, u64::MAX).unwrap();
    assert_eq!((top.0, mid.0, low.0), (12, 8, 4));
    a.free(8).unwrap();
    assert_eq!(a.alloc(4, u64::MAX), Some((8, 4)));
    // [1, 4) holds three pages: a 4-page request no longer fits, a 2-page one does at 2.
    assert_eq!(a.alloc(4, u64::MAX), None);
    assert_eq!(a.alloc(2, u64::MAX), Some((2, 2)));
}

#[test]
fn reserved_ranges_are_skipped_and_never_freed() {
    let mut a = IovaAllocator::new(1, 16);
    a.reserve(8, 8).unwrap();
    assert_eq!(a.alloc(4, u64::MAX), Some((4, 4)));
    assert_eq!(a.free(8), Err(SlotError::Reserved));
    assert_eq!(
        a.reserve(6, 1),
        Err(SlotError::Overlap {
            start_pfn: 4,
            nr_pages: 4
        })
    );
}

/// Rule 4: once an allocation has moved `cached32_node` below a hole, a later request that fits the hole
/// still goes below the cached node; only the retry from the limit, when the space below is used up,
/// reaches the hole again, and it then takes the highest one.
#[test]
fn a_hole_above_the_cached_node_waits_for_the_retry() {
    let mut a = IovaAllocator::new(9, 17);
    for want in [16, 15, 14, 13] {
        assert_eq!(a.alloc(1, u64::MAX), Some((want, 1)));
    }
    // Freeing 15 (above the cached node 13) moves the cache to 16, just above the hole.
    assert_eq!(a.free(15), Ok(1));
    // Two pages do not fit at 15: the walk goes on down, past 14 and 13, to [10, 12).
    assert_eq!(a.alloc(2, u64::MAX), Some((10, 2)));
    // One page would fit at 15 and at 12, but the search starts below the cached node 10.
    assert_eq!(a.alloc(1, u64::MAX), Some((9, 1)));
    // Nothing is left below 9: the retry from the limit takes the highest hole, 15, then the cache
    // (now 15) leads to 12.
    assert_eq!(a.alloc(1, u64::MAX), Some((15, 1)));
    assert_eq!(a.alloc(1, u64::MAX), Some((12, 1)));
    assert_eq!(a.alloc(1, u64::MAX), None);
}

/// Rule 5: freeing the most recent (lowest) allocation moves the cache up to the range above it, so the
/// next allocation of that size takes the same range back (LIFO reuse).
#[test]
fn freeing_the_cached_node_hands_its_range_back() {
    let mut a = IovaAllocator::new(1, 1 << 20);
    let ranges: Vec<u64> = (0..4).map(|_| a.alloc(4, u64::MAX).unwrap().0).collect();
    assert_eq!(
        ranges,
        [(1 << 20) - 4, (1 << 20) - 8, (1 << 20) - 12, (1 << 20) - 16]
    );
    assert_eq!(a.free(ranges[3]), Ok(4));
    assert_eq!(a.alloc(4, u64::MAX), Some((ranges[3], 4)));
    // A free above the cached node also moves the cache to just above the freed range.
    assert_eq!(a.free(ranges[1]), Ok(4));
    assert_eq!(a.alloc(4, u64::MAX), Some((ranges[1], 4)));
}

/// Rule 7: a failed 32-bit search makes every request of that size or more under any 32-bit limit fail
/// at once, even where a hole exists; a limit above 4 GiB is not affected; a free below 4 GiB resets it.
#[test]
fn max32_fast_failure_until_a_free_below_4g() {
    let start = DMA_32BIT_PFN - 32;
    let mut a = IovaAllocator::new(start, DMA_32BIT_PFN + 16);
    let low = a.alloc(1, start + 1).unwrap();
    assert_eq!(low, (start, 1));
    // Eight pages do not fit below start + 9: the search fails and records 8.
    assert_eq!(a.alloc(8, start + 9), None);
    // [DMA32 - 8, DMA32) is free, but the 32-bit request of 8 (or 16) pages fails without a search.
    assert_eq!(a.alloc(8, DMA_32BIT_PFN), None);
    assert_eq!(a.alloc(16, DMA_32BIT_PFN), None);
    // Smaller sizes still search; a 64-bit limit is not subject to the fast failure.
    assert_eq!(a.alloc(4, DMA_32BIT_PFN), Some((DMA_32BIT_PFN - 4, 4)));
    assert_eq!(a.alloc(8, u64::MAX), Some((DMA_32BIT_PFN + 8, 8)));
    // A free of a range starting below 4 GiB resets the fast failure.
    assert_eq!(a.free(low.0), Ok(1));
    assert_eq!(a.alloc(8, DMA_32BIT_PFN), Some((DMA_32BIT_PFN - 16, 8)));
}

/// Rules 3 and 4: the 32-bit and 64-bit limits keep separate cached nodes, so an allocation below 4 GiB
/// does not move where the next 64-bit search starts, and a 64-bit search that falls below 4 GiB updates
/// the 32-bit cache, not its own.
#[test]
fn the_two_cached_nodes_are_independent() {
    let mut a = IovaAllocator::new(1, DMA_32BIT_PFN + 4);
    assert_eq!(a.alloc(1, u64::MAX), Some((DMA_32BIT_PFN + 3, 1)));
    assert_eq!(a.alloc(1, DMA_32BIT_PFN), Some((DMA_32BIT_PFN - 1, 1)));
    assert_eq!(a.cached32, Some((DMA_32BIT_PFN - 1, DMA_32BIT_PFN - 1)));
    assert_eq!(a.alloc(1, u64::MAX), Some((DMA_32BIT_PFN + 2, 1)));
    // Four pages fit neither in [DMA32, DMA32 + 2) nor above DMA32 - 1: the 64-bit walk goes below 4 GiB.
    assert_eq!(a.alloc(4, u64::MAX), Some((DMA_32BIT_PFN - 8, 4)));
    assert_eq!(a.cached, Some((DMA_32BIT_PFN + 2, DMA_32BIT_PFN + 2)));
    assert_eq!(a.cached32, Some((DMA_32BIT_PFN - 8, DMA_32BIT_PFN - 5)));
    // The 32-bit search continues below its own cached node, past the free [DMA32 - 4, DMA32 - 1).
    assert_eq!(a.alloc(2, DMA_32BIT_PFN), Some((DMA_32BIT_PFN - 10, 2)));
}

#[path = "../../tests/support/iova_walk.rs"]
mod reference;

#[derive(Clone, Debug)]
enum Op {
    Alloc { nr_pages: u64, limit: u64 },
    Free(usize),
    Reserve { offset: u64, nr_pages: u64 },
}

/// A 96-page window straddling 4 GiB, so that both cached nodes, the fast failure and exhaustion all
/// happen within a few dozen operations.
const W_START: u64 = DMA_32BIT_PFN - 48;
const W_END: u64 = DMA_32BIT_PFN + 48;

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    let limit = prop_oneof![Just(u64::MAX), Just(DMA_32BIT_PFN), (W_START..W_END + 8),];
    prop_oneof![
        6 => (1u64..=40, limit).prop_map(|(nr_pages, limit)| Op::Alloc { nr_pages, limit }),
        4 => any::<usize>().prop_map(Op::Free),
        1 => (0u64..100, 1u64..8).prop_map(|(offset, nr_pages)| Op::Reserve { offset, nr_pages }),
    ]
}

/// The index of page `pfn` in the test's occupancy map of the window.
fn idx(pfn: u64) -> usize {
    usize::try_from(pfn - W_START).unwrap()
}

/// Checks the hole index: exactly the gaps between consecutive slots and the window edges.
fn check_holes(a: &IovaAllocator) {
    let mut want = BTreeMap::new();
    let mut bottom = a.start_pfn;
    for (&lo, s) in &a.slots {
        if bottom < lo {
            want.insert(lo, bottom);
        }
        bottom = lo + s.nr_pages;
    }
    if bottom < a.end_pfn {
        want.insert(a.end_pfn, bottom);
    }
    assert_eq!(a.holes, want);
}

proptest::proptest! {
    /// Against the literal walk: the same answers; and on their own terms: ranges inside the window and
    /// under the limit, size aligned, never on another range or a reservation; a failure only on the
    /// fast path or when no aligned hole exists below the limit at all (so the retry covered the rest).
    #[test]
    fn matches_the_literal_walk_and_never_overlaps(ops in proptest::collection::vec(op(), 1..120)) {
        let mut a = IovaAllocator::new(W_START, W_END);
        let mut naive = reference::Naive::new(W_START, W_END);
        let mut used = vec![false; idx(W_END)];
        let mut live: Vec<u64> = Vec::new();
        let mut max32 = DMA_32BIT_PFN;
        for op in ops {
            match op {
                Op::Alloc { nr_pages, limit } => {
                    let got = a.alloc(nr_pages, limit);
                    proptest::prop_assert_eq!(got.map(|g| g.0), naive.alloc(nr_pages, limit));
                    let size = rounded_pages(nr_pages);
                    let align = size.next_power_of_two();
                    let top = limit.min(W_END);
                    let fast = top <= DMA_32BIT_PFN && size >= max32;
                    let fits = |p: u64| {
                        p >= W_START && p + size <= top
                            && (p..p + size).all(|q| !used[idx(q)])
                    };
                    match got {
                        Some((pfn, n)) => {
                            proptest::prop_assert!(!fast, "fast failure ignored");
                            proptest::prop_assert_eq!(n, size);
                            proptest::prop_assert_eq!(pfn % align, 0);
                            proptest::prop_assert!(fits(pfn), "bad range {pfn:#x}+{n}");
                            for q in pfn..pfn + n {
                                used[idx(q)] = true;
                            }
                            live.push(pfn);
                        }
                        None if fast => {}
                        None => {
                            let first = W_START.next_multiple_of(align);
                            let hole = (first..top).step_by(usize::try_from(align).unwrap()).find(|&p| fits(p));
                            proptest::prop_assert_eq!(hole, None, "failed with a hole");
                            max32 = size;
                        }
                    }
                }
                Op::Free(i) if !live.is_empty() => {
                    let pfn = live.swap_remove(i % live.len());
                    let n = a.free(pfn).unwrap();
                    naive.free(pfn);
                    for q in pfn..pfn + n {
                        used[idx(q)] = false;
                    }
                    if pfn < DMA_32BIT_PFN {
                        max32 = DMA_32BIT_PFN;
                    }
                }
                Op::Free(_) => proptest::prop_assert_eq!(a.free(W_END), Err(SlotError::NotAllocated)),
                Op::Reserve { offset, nr_pages } => {
                    let start = W_START + offset;
                    let res = a.reserve(start, nr_pages);
                    let end = (start + nr_pages).min(W_END);
                    let free = (start.min(end)..end).all(|q| !used[idx(q)]);
                    proptest::prop_assert_eq!(res.is_ok(), free);
                    if res.is_ok() && start < end {
                        naive.reserve(start, end - 1);
                        for q in start..end {
                            used[idx(q)] = true;
                        }
                    }
                }
            }
            check_holes(&a);
            proptest::prop_assert_eq!(a.nr_allocations(), live.len());
        }
    }
}
