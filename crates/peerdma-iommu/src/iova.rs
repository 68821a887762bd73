//! The IOVA allocator of a DMA domain (drivers/iommu/iova.c: `alloc_iova`, `free_iova`, `reserve_iova`,
//! and the size rounding of `alloc_iova_fast`).
//!
//! The allocator hands out page-granular ranges of I/O virtual address space inside a window
//! `[start, end)` (half-open, like every range in peerdma). It keeps the allocated ranges in a `BTreeMap`
//! keyed by first page number, the way iova.c keeps them in an rbtree, and searches it the way
//! `__alloc_and_insert_iova_range` walks that rbtree.
//!
//! Rules, as in Linux:
//! 1. **Size rounding** (`alloc_iova_fast`): a request of fewer than 32 pages
//!    (`1 << (IOVA_RANGE_CACHE_MAX_SIZE - 1)`) is rounded up to a power of two pages; larger requests keep
//!    their page count.
//! 2. **Size alignment** (`alloc_iova(.., size_aligned = true)`): the first page number is a multiple of the
//!    page count rounded up to a power of two, so a 4-page range starts on a 16 KiB boundary and a 33-page
//!    range on a 256 KiB boundary.
//! 3. **Top-down from a cached node** (`__get_cached_rbnode`): the search starts just below a cached
//!    node and returns the *highest* aligned hole below it that fits under the limit (the window end, or a
//!    lower limit such as 4 GiB for the DMA layer's 32-bit-first attempt). There are two cached nodes:
//!    `cached32_node` serves limits at or below 4 GiB ([`DMA_32BIT_PFN`]), `cached_node` the others; both
//!    start at the anchor above the window.
//! 4. **Cache update on allocation** (`__cached_rbnode_insert_update`): a new range that ends below 4 GiB
//!    becomes `cached32_node`, any other `cached_node`. So once the search has moved below a hole, that
//!    hole is skipped by later searches, even one that would fit it.
//! 5. **Cache update on free** (`__cached_rbnode_delete_update`): freeing the cached node, or a range at or
//!    above it (for `cached32_node`: one that also ends below 4 GiB), moves the cache to the next range
//!    above the freed one, so the freed hole is the first one the next search sees.
//! 6. **Retry** (`retry_pfn`): when the search from the cached node reaches the bottom of the window
//!    without a fit, it is retried once from the limit down to just above the cached node. The two passes
//!    together cover every hole below the limit.
//! 7. **32-bit fast failure** (`max32_alloc_size`): a failed search records its size; until a range
//!    starting below 4 GiB is freed, every request of that size or more with a limit at or below 4 GiB
//!    fails at once, without searching, even under a higher 32-bit limit than the one that failed.
//! 8. **Exhaustion** is a `None`; the domain turns it into [`Error::IovaExhausted`](crate::Error), ENOMEM.
//! 9. **Reserved ranges** (`reserve_iova`: the MSI window, PCI host-bridge windows) are never handed out and
//!    cannot be freed; reserving does not move the cached nodes.
//!
//! Cost: besides the ranges, the allocator indexes the free holes between them by their top. The search
//! of rule 3 visits the holes below the starting point top-down, exactly the candidates the rbtree walk
//! tests, but without stepping over the ranges that touch each other, so an allocation or free costs
//! O(log n) plus one step per non-empty hole too small or too misaligned for the request (iova.c steps over
//! every range in between).
//!
//! Coarse: `alloc_iova_fast` first pops a recently freed range of the same size class (up to 32 pages)
//! from the per-CPU rcache magazines and their depot, and `free_iova_fast` pushes it there, leaving the
//! range in the rbtree. This model has no rcache: a free returns the range to the tree at once (so it
//! resets `max32_alloc_size` and moves the cached nodes, which an rcache hit does not do) and an allocation
//! always searches the tree. The results agree when a freed range is the highest hole below the cached
//! node (LIFO unmapping, or a freed range above the cached node); they differ when a range below holes is
//! freed: the rcache would hand it back first, this model the highest hole below the cached node. Linux's
//! `reserve_iova` also merges a reservation into overlapping ones; this model refuses the overlap.

use std::collections::BTreeMap;

use peerdma_core::PAGE_SHIFT;

/// Requests below this many pages are rounded up to a power of two (iova.c: `IOVA_RANGE_CACHE_MAX_SIZE` 6,
/// so `1 << 5`).
pub const IOVA_ROUNDUP_LIMIT_PAGES: u64 = 1 << 5;

/// The first page number above 4 GiB (iova.c `dma_32bit_pfn`: `1 << (32 - iova_shift)` with 4 KiB
/// granules). Limits at or below it use `cached32_node` and the `max32_alloc_size` fast failure.
pub const DMA_32BIT_PFN: u64 = 1 << (32 - PAGE_SHIFT);

/// One allocated range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Slot {
    nr_pages: u64,
    reserved: bool,
}

/// A top-down, size-aligned IOVA allocator over page numbers, with iova.c's cached nodes.
#[derive(Clone, Debug)]
pub struct IovaAllocator {
    start_pfn: u64,
    end_pfn: u64,
    /// Allocations and reservations by first page number (iova.c's rbtree).
    slots: BTreeMap<u64, Slot>,
    /// The non-empty free holes `[bottom, top)` between slots, keyed by `top`, value `bottom`.
    holes: BTreeMap<u64, u64>,
    /// `cached_node`: first and last page of a slot, `None` for the anchor above the window (a cached
    /// slot never changes size: freeing it moves the cache first).
    cached: Option<(u64, u64)>,
    /// `cached32_node`, likewise.
    cached32: Option<(u64, u64)>,
    /// `max32_alloc_size`: requests this large or larger under a 32-bit limit fail at once.
    max32_alloc_size: u64,
    nr_allocations: usize,
}

/// What [`IovaAllocator::reserve`] or [`IovaAllocator::free`] found in the way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotError {
    /// The range overlaps an existing allocation or reservation starting at this page number.
    Overlap {
        /// First page of the existing range.
        start_pfn: u64,
        /// Its length in pages.
        nr_pages: u64,
    },
    /// No allocation starts at the given page number.
    NotAllocated,
    /// The range is a reservation, which is never freed.
    Reserved,
}

/// Returns the page count an allocation of `nr_pages` really takes (rule 1 of the module docs).
pub fn rounded_pages(nr_pages: u64) -> u64 {
    if nr_pages < IOVA_ROUNDUP_LIMIT_PAGES {
        nr_pages.next_power_of_two()
    } else {
        nr_pages
    }
}

impl IovaAllocator {
    /// Creates an allocator over the page numbers `[start_pfn, end_pfn)` (iova.c `init_iova_domain`: both
    /// cached nodes at the anchor, `max32_alloc_size` at 4 GiB worth of pages).
    pub fn new(start_pfn: u64, end_pfn: u64) -> Self {
        let end_pfn = end_pfn.max(start_pfn);
        let mut holes = BTreeMap::new();
        if start_pfn < end_pfn {
            holes.insert(end_pfn, start_pfn);
        }
        Self {
            start_pfn,
            end_pfn,
            slots: BTreeMap::new(),
            holes,
            cached: None,
            cached32: None,
            max32_alloc_size: DMA_32BIT_PFN,
            nr_allocations: 0,
        }
    }

    /// Returns the first page number of the window.
    pub fn start_pfn(&self) -> u64 {
        self.start_pfn
    }

    /// Returns the first page number past the window.
    pub fn end_pfn(&self) -> u64 {
        self.end_pfn
    }

    /// Allocates `nr_pages` pages (before rounding) below `limit_pfn` and returns the first page number and
    /// the rounded page count, or `None` when the search (with its retry) finds no aligned hole or the
    /// 32-bit fast failure applies (rules 3 to 8 of the module docs).
    pub fn alloc(&mut self, nr_pages: u64, limit_pfn: u64) -> Option<(u64, u64)> {
        if nr_pages == 0 {
            return None;
        }
        let size = rounded_pages(nr_pages);
        let mask = !(size.checked_next_power_of_two()? - 1);
        // dma-iommu clamps the limit to the aperture before calling into iova.c.
        let limit = limit_pfn.min(self.end_pfn);
        let is32 = limit <= DMA_32BIT_PFN;
        if is32 && size >= self.max32_alloc_size {
            return None;
        }
        let cached = if is32 { self.cached32 } else { self.cached };
        let (cached_lo, retry_pfn) = cached.unwrap_or((u64::MAX, u64::MAX));
        let found = self
            .search(size, mask, limit.min(cached_lo), self.start_pfn)
            .or_else(|| {
                (retry_pfn < limit)
                    .then(|| self.search(size, mask, limit, retry_pfn + 1))
                    .flatten()
            });
        let Some(pfn) = found else {
            self.max32_alloc_size = size;
            return None;
        };
        self.insert(pfn, size, false);
        self.nr_allocations += 1;
        let node = Some((pfn, pfn + size - 1));
        if pfn + size - 1 < DMA_32BIT_PFN {
            self.cached32 = node;
        } else {
            self.cached = node;
        }
        Some((pfn, size))
    }

    /// The walk of `__alloc_and_insert_iova_range` below `high`: the holes in top-down order, each one's
    /// candidate the highest aligned start that ends at or below `min(hole top, high)`. Candidates only go
    /// down, so the walk stops at the first one below `low`; a hole holds its candidate when the candidate
    /// is not below the hole's bottom.
    fn search(&self, size: u64, mask: u64, high: u64, low: u64) -> Option<u64> {
        let straddling = self
            .holes
            .range(high..)
            .next()
            .filter(|&(_, &bottom)| bottom < high);
        for (&top, &bottom) in straddling.into_iter().chain(self.holes.range(..high).rev()) {
            let cand = top.min(high).checked_sub(size)? & mask;
            if cand < low {
                return None;
            }
            if cand >= bottom {
                return Some(cand);
            }
        }
        None
    }

    /// Puts a slot into the tree, splitting the hole it lies in.
    fn insert(&mut self, lo: u64, nr_pages: u64, reserved: bool) {
        let end = lo + nr_pages;
        if let Some((&top, &bottom)) = self.holes.range(lo + 1..).next()
            && bottom <= lo
            && end <= top
        {
            self.holes.remove(&top);
            if bottom < lo {
                self.holes.insert(lo, bottom);
            }
            if end < top {
                self.holes.insert(top, end);
            }
        }
        self.slots.insert(lo, Slot { nr_pages, reserved });
    }

    /// Takes a slot out of the tree, merging the holes on either side of it.
    fn remove(&mut self, lo: u64, nr_pages: u64) {
        let end = lo + nr_pages;
        self.slots.remove(&lo);
        let bottom = self.holes.remove(&lo).unwrap_or(lo);
        let above = self
            .holes
            .range(end + 1..)
            .next()
            .filter(|&(_, &b)| b == end)
            .map(|(&t, _)| t);
        let top = match above {
            Some(t) => {
                self.holes.remove(&t);
                t
            }
            None => end,
        };
        self.holes.insert(top, bottom);
    }

    /// Reserves `[start_pfn, start_pfn + nr_pages)` so that it is never allocated. The part outside the
    /// window is ignored.
    pub fn reserve(&mut self, start_pfn: u64, nr_pages: u64) -> Result<(), SlotError> {
        let end = start_pfn.saturating_add(nr_pages).min(self.end_pfn);
        let start = start_pfn.max(self.start_pfn);
        if start >= end {
            return Ok(());
        }
        if let Some((lo, n)) = self.first_overlap(start, end) {
            return Err(SlotError::Overlap {
                start_pfn: lo,
                nr_pages: n,
            });
        }
        self.insert(start, end - start, true);
        Ok(())
    }

    /// Frees the allocation that starts at `start_pfn` and returns its page count, updating the cached
    /// nodes and `max32_alloc_size` first (rule 5 and 7 of the module docs).
    pub fn free(&mut self, start_pfn: u64) -> Result<u64, SlotError> {
        // One lookup finds the range and its rb_next.
        let mut from = self.slots.range(start_pfn..);
        let n = match from.next() {
            Some((&lo, slot)) if lo == start_pfn && slot.reserved => {
                return Err(SlotError::Reserved);
            }
            Some((&lo, slot)) if lo == start_pfn => slot.nr_pages,
            _ => return Err(SlotError::NotAllocated),
        };
        let next = from.next().map(|(&lo, s)| (lo, lo + s.nr_pages - 1));
        let hi = start_pfn + n - 1;
        let cached32_lo = self.cached32.map_or(u64::MAX, |c| c.0);
        if cached32_lo == start_pfn || (hi < DMA_32BIT_PFN && start_pfn >= cached32_lo) {
            self.cached32 = next;
        }
        if start_pfn < DMA_32BIT_PFN {
            self.max32_alloc_size = DMA_32BIT_PFN;
        }
        if start_pfn >= self.cached.map_or(u64::MAX, |c| c.0) {
            self.cached = next;
        }
        self.remove(start_pfn, n);
        self.nr_allocations -= 1;
        Ok(n)
    }

    /// Returns the allocation (not reservation) that starts at `start_pfn`, as its page count.
    pub fn allocation_at(&self, start_pfn: u64) -> Option<u64> {
        self.slots
            .get(&start_pfn)
            .filter(|s| !s.reserved)
            .map(|s| s.nr_pages)
    }

    /// Returns the allocation (not reservation) containing page `pfn`, as `(first page, page count)`.
    pub fn allocation_containing(&self, pfn: u64) -> Option<(u64, u64)> {
        let (&lo, slot) = self.slots.range(..=pfn).next_back()?;
        (!slot.reserved && pfn < lo + slot.nr_pages).then_some((lo, slot.nr_pages))
    }

    /// Returns the number of allocations (reservations excluded).
    pub fn nr_allocations(&self) -> usize {
        self.nr_allocations
    }

    fn first_overlap(&self, start: u64, end: u64) -> Option<(u64, u64)> {
        if let Some((&lo, s)) = self.slots.range(..start).next_back()
            && lo + s.nr_pages > start
        {
            return Some((lo, s.nr_pages));
        }
        self.slots
            .range(start..end)
            .next()
            .map(|(&lo, s)| (lo, s.nr_pages))
    }
}

#[cfg(test)]
mod tests;
