//! A literal model of iova.c's `__alloc_and_insert_iova_range` and `__cached_rbnode_delete_update`: it
//! steps from range to range through the tree the way the rbtree walk does, with no hole index. Shared
//! by the allocator's unit tests (through `#[path]`) and the domain's reference-model test; the includer
//! provides `DMA_32BIT_PFN` and `rounded_pages` in the parent module.

use std::collections::BTreeMap;

use super::{DMA_32BIT_PFN, rounded_pages};

/// The allocator state: the ranges, the two cached nodes and `max32_alloc_size`.
pub(crate) struct Naive {
    start: u64,
    end: u64,
    /// First page -> (last page, reserved).
    nodes: BTreeMap<u64, (u64, bool)>,
    cached: Option<u64>,
    cached32: Option<u64>,
    max32: u64,
}

impl Naive {
    /// An empty allocator over `[start, end)`.
    pub(crate) fn new(start: u64, end: u64) -> Self {
        Self {
            start,
            end,
            nodes: BTreeMap::new(),
            cached: None,
            cached32: None,
            max32: DMA_32BIT_PFN,
        }
    }

    /// `(pfn_lo, pfn_hi)` of a node, the anchor for `None`.
    fn span(&self, node: Option<u64>) -> (u64, u64) {
        node.map_or((u64::MAX, u64::MAX), |lo| (lo, self.nodes[&lo].0))
    }

    fn prev(&self, node: Option<u64>) -> Option<u64> {
        let below = node.unwrap_or(u64::MAX);
        self.nodes.range(..below).next_back().map(|(&lo, _)| lo)
    }

    /// Allocates like `alloc_iova(.., size_aligned = true)` below the exclusive `limit_pfn`.
    pub(crate) fn alloc(&mut self, nr_pages: u64, limit_pfn: u64) -> Option<u64> {
        let size = rounded_pages(nr_pages);
        let mask = !(size.next_power_of_two() - 1);
        let limit = limit_pfn.min(self.end);
        if limit <= DMA_32BIT_PFN && size >= self.max32 {
            return None;
        }
        let mut curr = if limit <= DMA_32BIT_PFN {
            self.cached32
        } else {
            self.cached
        };
        let retry_pfn = self.span(curr).1;
        let (mut high, mut low) = (limit, self.start);
        loop {
            let mut new;
            loop {
                high = high.min(self.span(curr).0);
                new = high.wrapping_sub(size) & mask;
                let prev = self.prev(curr);
                let Some(p) = prev else { break };
                curr = Some(p);
                if !(new <= self.nodes[&p].0 && new >= low) {
                    break;
                }
            }
            if high < size || new < low {
                if low == self.start && retry_pfn < limit {
                    high = limit;
                    low = retry_pfn + 1;
                    curr = None;
                    continue;
                }
                self.max32 = size;
                return None;
            }
            self.nodes.insert(new, (new + size - 1, false));
            if new + size - 1 < DMA_32BIT_PFN {
                self.cached32 = Some(new);
            } else {
                self.cached = Some(new);
            }
            return Some(new);
        }
    }

    /// Reserves `[lo, hi]` (already checked to be free): a node that moves no cache.
    pub(crate) fn reserve(&mut self, lo: u64, hi: u64) {
        self.nodes.insert(lo, (hi, true));
    }

    /// Frees the range starting at `lo`.
    pub(crate) fn free(&mut self, lo: u64) {
        let (hi, _) = self.nodes[&lo];
        let next = self.nodes.range(lo + 1..).next().map(|(&l, _)| l);
        let c32 = self.span(self.cached32).0;
        if self.cached32 == Some(lo) || (hi < DMA_32BIT_PFN && lo >= c32) {
            self.cached32 = next;
        }
        if lo < DMA_32BIT_PFN {
            self.max32 = DMA_32BIT_PFN;
        }
        if lo >= self.span(self.cached).0 {
            self.cached = next;
        }
        self.nodes.remove(&lo);
    }
}
