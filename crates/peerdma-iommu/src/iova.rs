//! The IOVA allocator of a DMA domain (drivers/iommu/iova.c: `alloc_iova`, `alloc_iova_fast`, `free_iova`,
//! `reserve_iova`).
//!
//! The allocator hands out page-granular ranges of I/O virtual address space inside a window
//! `[start, end)` (half-open, like every range in peerdma). It keeps the allocated ranges in a `BTreeMap`
//! keyed by first page number, the way iova.c keeps them in an rbtree.
//!
//! Rules, as in Linux:
//! 1. **Size rounding** (`alloc_iova_fast`): a request of fewer than 32 pages
//!    (`1 << (IOVA_RANGE_CACHE_MAX_SIZE - 1)`) is rounded up to a power of two pages; larger requests keep
//!    their page count.
//! 2. **Size alignment** (`alloc_iova(.., size_aligned = true)`): the first page number is a multiple of the
//!    page count rounded up to a power of two, so a 4-page range starts on a 16 KiB boundary and a 33-page
//!    range on a 256 KiB boundary.
//! 3. **Top-down**: the search starts at the limit (the window end, or a lower limit such as 4 GiB for the
//!    DMA layer's 32-bit-first attempt) and returns the *highest* aligned hole that fits.
//! 4. **Exhaustion** is a `None`; the domain turns it into [`Error::IovaExhausted`](crate::Error), ENOMEM.
//! 5. **Reserved ranges** (`reserve_iova`: the MSI window, PCI host-bridge windows) are never handed out and
//!    cannot be freed.
//!
//! Coarse: Linux starts its search below a cached node (`cached_node`, `cached32_node`) and retries from the
//! top only on failure, and `alloc_iova_fast` first pops a recently freed range of the same size from the
//! per-CPU rcache magazines. This model always returns the highest fitting hole; after a free, that is the
//! same range the rcache would hand back in the common LIFO case, but long-running fragmentation patterns
//! can differ.

use std::collections::BTreeMap;

/// Requests below this many pages are rounded up to a power of two (iova.c: `IOVA_RANGE_CACHE_MAX_SIZE` 6,
/// so `1 << 5`).
pub const IOVA_ROUNDUP_LIMIT_PAGES: u64 = 1 << 5;

/// One allocated range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Slot {
    nr_pages: u64,
    reserved: bool,
}

/// A top-down, size-aligned IOVA allocator over page numbers.
#[derive(Clone, Debug)]
pub struct IovaAllocator {
    start_pfn: u64,
    end_pfn: u64,
    slots: BTreeMap<u64, Slot>,
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
    /// Creates an allocator over the page numbers `[start_pfn, end_pfn)`.
    pub fn new(start_pfn: u64, end_pfn: u64) -> Self {
        Self {
            start_pfn,
            end_pfn: end_pfn.max(start_pfn),
            slots: BTreeMap::new(),
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
    /// the rounded page count, or `None` when no aligned hole fits.
    pub fn alloc(&mut self, nr_pages: u64, limit_pfn: u64) -> Option<(u64, u64)> {
        if nr_pages == 0 {
            return None;
        }
        let size = rounded_pages(nr_pages);
        let align = size.checked_next_power_of_two()?;
        let mask = !(align - 1);
        let mut high = limit_pfn.min(self.end_pfn);
        let fits = |high: u64, low: u64| -> Option<u64> {
            let cand = high.checked_sub(size)? & mask;
            (cand >= low).then_some(cand)
        };
        for (&lo, slot) in self.slots.range(..high).rev() {
            let end = lo + slot.nr_pages;
            if end < high
                && let Some(cand) = fits(high, end.max(self.start_pfn))
            {
                self.slots.insert(
                    cand,
                    Slot {
                        nr_pages: size,
                        reserved: false,
                    },
                );
                return Some((cand, size));
            }
            high = high.min(lo);
        }
        let cand = fits(high, self.start_pfn)?;
        self.slots.insert(
            cand,
            Slot {
                nr_pages: size,
                reserved: false,
            },
        );
        Some((cand, size))
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
        self.slots.insert(
            start,
            Slot {
                nr_pages: end - start,
                reserved: true,
            },
        );
        Ok(())
    }

    /// Frees the allocation that starts at `start_pfn` and returns its page count.
    pub fn free(&mut self, start_pfn: u64) -> Result<u64, SlotError> {
        match self.slots.get(&start_pfn) {
            None => Err(SlotError::NotAllocated),
            Some(slot) if slot.reserved => Err(SlotError::Reserved),
            Some(slot) => {
                let n = slot.nr_pages;
                self.slots.remove(&start_pfn);
                Ok(n)
            }
        }
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
        self.slots.values().filter(|s| !s.reserved).count()
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
mod tests {
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
}
