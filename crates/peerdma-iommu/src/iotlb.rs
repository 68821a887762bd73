//! The IOTLB: the IOMMU's bounded cache of IO page-table translations (invalidated by
//! drivers/iommu/iommu.c `iommu_iotlb_sync` for a range and `iommu_flush_iotlb_all` for everything; on
//! Intel VT-d these become page-selective and domain-selective IOTLB invalidation descriptors).
//!
//! Cache rules:
//! 1. **What is cached**: one entry per 4 KiB IOVA page that a device access translated successfully
//!    after a page-table walk: the physical page and the permissions the PTE had *at the time of the
//!    walk*. Failed walks (not mapped, permission denied) are not cached.
//! 2. **Capacity**: at most `capacity` entries (numbers.md §2: reach ≈ 64 entries of 4 KiB). A capacity of
//!    0 caches nothing, so every access walks.
//! 3. **Replacement**: true LRU. Every hit and every fill makes the entry the most recently used; a fill
//!    into a full cache evicts the least recently used entry. (Hardware IOTLBs are set-associative with
//!    pseudo-LRU; a fully associative LRU is the simplest bounded policy with the same reach.)
//! 4. **When an entry is dropped**: only by eviction (rule 3), by a range invalidation covering its page
//!    ([`Iotlb::invalidate_range`], the strict-mode unmap path) or by a full flush ([`Iotlb::flush_all`],
//!    the flush-queue path). Changing the IO page table does **not** touch the cache.
//! 5. **Stale entries**: because of rule 4, after a PTE is cleared or changed an entry may keep serving the
//!    old translation until it is invalidated. That is exactly the deferred-flush (`iommu.strict=0`)
//!    exposure window; the domain reports such hits as `stale` by comparing with the page table.

use std::collections::BTreeMap;

use crate::pagetable::IommuProt;

/// A cached translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IotlbEntry {
    /// The physical page number the walk found.
    pub pa_pfn: u64,
    /// The permissions the PTE had when it was walked.
    pub prot: IommuProt,
    stamp: u64,
}

/// A bounded, fully associative, LRU IOTLB keyed by IOVA page number.
#[derive(Clone, Debug)]
pub struct Iotlb {
    capacity: usize,
    /// The cached pages; each entry's `stamp` orders them by last use (the smallest is the least recently
    /// used: found by a scan at eviction, so a hit updates one entry and nothing else — the IOTLB is small,
    /// 64 entries by default, and evictions happen only on misses, which walk anyway).
    entries: BTreeMap<u64, IotlbEntry>,
    next_stamp: u64,
}

impl Iotlb {
    /// Creates an empty IOTLB with room for `capacity` entries.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            entries: BTreeMap::new(),
            next_stamp: 0,
        }
    }

    /// Returns the number of entries it can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Returns the number of entries it holds.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Returns whether it holds no entry.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Returns whether IOVA page `iova_pfn` is cached, without touching its LRU position.
    pub fn contains(&self, iova_pfn: u64) -> bool {
        self.entries.contains_key(&iova_pfn)
    }

    /// Returns the cached entry for `iova_pfn` and makes it the most recently used.
    pub fn lookup(&mut self, iova_pfn: u64) -> Option<IotlbEntry> {
        let stamp = self.bump();
        let entry = self.entries.get_mut(&iova_pfn)?;
        entry.stamp = stamp;
        Some(*entry)
    }

    /// Caches a translation and returns the IOVA page number of the entry evicted to make room, if any.
    pub fn insert(&mut self, iova_pfn: u64, pa_pfn: u64, prot: IommuProt) -> Option<u64> {
        if self.capacity == 0 {
            return None;
        }
        let stamp = self.bump();
        self.entries.remove(&iova_pfn);
        let evicted = if self.entries.len() >= self.capacity {
            let victim = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.stamp)
                .map(|(&pfn, _)| pfn)
                .expect("a full cache has an LRU entry");
            self.entries.remove(&victim);
            Some(victim)
        } else {
            None
        };
        self.entries.insert(
            iova_pfn,
            IotlbEntry {
                pa_pfn,
                prot,
                stamp,
            },
        );
        evicted
    }

    /// Drops every entry for IOVA pages in `[start_pfn, end_pfn)` and returns how many were dropped.
    pub fn invalidate_range(&mut self, start_pfn: u64, end_pfn: u64) -> usize {
        let before = self.entries.len();
        if end_pfn.saturating_sub(start_pfn) == 1 {
            self.entries.remove(&start_pfn);
        } else {
            let victims: Vec<u64> = self
                .entries
                .range(start_pfn..end_pfn)
                .map(|(&pfn, _)| pfn)
                .collect();
            for pfn in &victims {
                self.entries.remove(pfn);
            }
        }
        before - self.entries.len()
    }

    /// Drops every entry and returns how many were dropped.
    pub fn flush_all(&mut self) -> usize {
        let n = self.entries.len();
        self.entries.clear();
        n
    }

    fn bump(&mut self) -> u64 {
        let s = self.next_stamp;
        self.next_stamp += 1;
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_cache_evicts_the_least_recently_used_entry() {
        let mut t = Iotlb::new(2);
        assert_eq!(t.insert(1, 10, IommuProt::READ), None);
        assert_eq!(t.insert(2, 20, IommuProt::READ), None);
        // Touch 1, so 2 becomes the least recently used.
        assert!(t.lookup(1).is_some());
        assert_eq!(t.insert(3, 30, IommuProt::READ), Some(2));
        assert!(t.contains(1) && t.contains(3) && !t.contains(2));
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn refilling_a_cached_page_does_not_evict() {
        let mut t = Iotlb::new(2);
        t.insert(1, 10, IommuProt::READ);
        t.insert(2, 20, IommuProt::READ);
        assert_eq!(t.insert(1, 11, IommuProt::READ), None);
        assert_eq!(t.lookup(1).map(|e| e.pa_pfn), Some(11));
    }

    #[test]
    fn zero_capacity_caches_nothing() {
        let mut t = Iotlb::new(0);
        assert_eq!(t.insert(1, 10, IommuProt::READ), None);
        assert!(t.lookup(1).is_none());
    }

    #[test]
    fn range_invalidation_drops_only_the_range() {
        let mut t = Iotlb::new(8);
        for p in 0..4 {
            t.insert(p, p + 100, IommuProt::READ);
        }
        assert_eq!(t.invalidate_range(1, 3), 2);
        assert!(t.contains(0) && t.contains(3) && !t.contains(1) && !t.contains(2));
        assert_eq!(t.flush_all(), 2);
        assert!(t.is_empty());
    }
}
