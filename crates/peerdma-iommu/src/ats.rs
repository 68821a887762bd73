//! The device ATC (Address Translation Cache) of PCIe ATS, and the shape of ATS invalidations
//! (PCIe Base spec "Address Translation Services"; Linux drivers/pci/ats.c enables it, the IOMMU drivers
//! send the invalidations: `arm_smmu_atc_inv_domain`, VT-d `qi_flush_dev_iotlb_pasid`).
//!
//! Cache rules (vm-memory `Iotlb` style):
//! 1. **What is cached**: the completions of translation requests, per (PASID, translated range). A
//!    completion carries the translation, read/write permission and the range size (a power of two of
//!    pages: 4 KiB, or 2 MiB when the CPU maps a huge page). Only completions that grant access are cached.
//! 2. **Placement**: `sets × ways`, set-associative; the set is chosen from the PASID and the range's base
//!    page; the replacement policy is LRU within a set (an insert into a full set evicts its least recently
//!    used entry).
//! 3. **Lookup**: a hit needs an entry of the PASID whose range covers the address; a write that hits a
//!    read-only entry is a *permission miss* ([`AtcLookup::ReadOnly`]): the device asks again and, if the
//!    page is read-only on the CPU, sends a write page request (PRI), which breaks COW on the CPU side.
//! 4. **Invalidation**: an ATS invalidation request names a PASID and a span that is a power-of-two number of
//!    pages, aligned to its size ([`invalidation_span`]: pages 7–10 become 0–15); every entry of the PASID
//!    overlapping the span is dropped, so more than was asked may go. A whole-PASID invalidation drops
//!    every entry of the PASID. The invalidation *completes* (the device's fence) only after the device no
//!    longer uses any dropped translation — the device layer models that wait.

use peerdma_core::{PAGE_SHIFT, Range, Va};

use crate::sva::Pasid;

/// The ATC's geometry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AtcConfig {
    /// Number of sets (at least 1).
    pub sets: usize,
    /// Entries per set (at least 1).
    pub ways: usize,
}

impl AtcConfig {
    /// Returns the total number of entries.
    pub fn entries(&self) -> usize {
        self.sets.max(1) * self.ways.max(1)
    }
}

impl Default for AtcConfig {
    /// 64 entries, 16 sets of 4 ways (the order of IOTLB reach on the hosts of the published measurements).
    fn default() -> Self {
        Self { sets: 16, ways: 4 }
    }
}

/// A translation completion (what the IOMMU answers a translation request with).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AtsCompletion<T> {
    /// The translated base of the range (the device layer's notion: a frame and its generation).
    pub target: T,
    /// First page of the translated range (aligned to `nr_pages`).
    pub base_page: u64,
    /// Range size in pages (a power of two).
    pub nr_pages: u64,
    /// Read permission.
    pub read: bool,
    /// Write permission.
    pub write: bool,
}

/// What an ATC lookup found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AtcLookup<T> {
    /// A usable entry: its completion.
    Hit(AtsCompletion<T>),
    /// An entry covers the address but grants no write for a write access.
    ReadOnly(AtsCompletion<T>),
    /// Nothing cached.
    Miss,
}

/// Counters of one ATC.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AtcStats {
    /// Lookups that hit.
    pub hits: u64,
    /// Lookups that missed (permission misses included).
    pub misses: u64,
    /// Entries inserted.
    pub inserts: u64,
    /// Entries evicted by replacement.
    pub evictions: u64,
    /// Invalidation requests received (range or whole-PASID).
    pub invalidations: u64,
    /// Entries dropped by invalidations.
    pub invalidated: u64,
}

#[derive(Clone, Copy, Debug)]
struct Slot<T> {
    pasid: Pasid,
    c: AtsCompletion<T>,
    last_use: u64,
}

/// A bounded set-associative ATC (module docs).
#[derive(Clone, Debug)]
pub struct Atc<T> {
    cfg: AtcConfig,
    sets: Vec<Vec<Slot<T>>>,
    tick: u64,
    stats: AtcStats,
}

/// Returns the power-of-two, size-aligned span of pages an ATS invalidation of pages `[first, end)` sends:
/// `(base page, nr_pages)` (PCIe ATS invalidation requests encode a size-aligned power of two).
pub fn invalidation_span(first: u64, end: u64) -> (u64, u64) {
    let last = end.max(first + 1) - 1;
    let mut nr = 1u64;
    while first / nr != last / nr {
        nr <<= 1;
    }
    (first / nr * nr, nr)
}

impl<T: Copy> Atc<T> {
    /// Creates an empty ATC.
    pub fn new(cfg: AtcConfig) -> Self {
        let cfg = AtcConfig {
            sets: cfg.sets.max(1),
            ways: cfg.ways.max(1),
        };
        Self {
            cfg,
            sets: vec![Vec::new(); cfg.sets],
            tick: 0,
            stats: AtcStats::default(),
        }
    }

    /// Returns the geometry.
    pub fn config(&self) -> AtcConfig {
        self.cfg
    }

    /// Returns the counters.
    pub fn stats(&self) -> AtcStats {
        self.stats
    }

    /// Returns the number of entries held.
    pub fn len(&self) -> usize {
        self.sets.iter().map(Vec::len).sum()
    }

    /// Returns whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn set_of(&self, pasid: Pasid, base_page: u64) -> usize {
        let h = base_page ^ (u64::from(pasid.0) << 7);
        usize::try_from(h % self.cfg.sets as u64).expect("below the set count")
    }

    /// Looks `va` up for `pasid` (rule 3); a write needs write permission.
    pub fn lookup(&mut self, pasid: Pasid, va: Va, write: bool) -> AtcLookup<T> {
        let page = va.raw() >> PAGE_SHIFT;
        self.tick += 1;
        let tick = self.tick;
        // An entry sits in the set of its base page: try the 4 KiB and the 2 MiB base.
        for nr in [1u64, 512] {
            let base = page / nr * nr;
            let set = self.set_of(pasid, base);
            if let Some(s) = self.sets[set]
                .iter_mut()
                .find(|s| s.pasid == pasid && s.c.nr_pages == nr && s.c.base_page == base)
            {
                s.last_use = tick;
                let c = s.c;
                if write && !c.write {
                    self.stats.misses += 1;
                    return AtcLookup::ReadOnly(c);
                }
                self.stats.hits += 1;
                return AtcLookup::Hit(c);
            }
        }
        self.stats.misses += 1;
        AtcLookup::Miss
    }

    /// Caches a completion for `pasid` (rules 1–2); replaces an entry for the same range.
    pub fn insert(&mut self, pasid: Pasid, c: AtsCompletion<T>) {
        self.tick += 1;
        let tick = self.tick;
        let ways = self.cfg.ways;
        let set = self.set_of(pasid, c.base_page);
        let slots = &mut self.sets[set];
        slots.retain(|s| {
            !(s.pasid == pasid && s.c.base_page == c.base_page && s.c.nr_pages == c.nr_pages)
        });
        if slots.len() >= ways {
            let lru = slots
                .iter()
                .enumerate()
                .min_by_key(|(_, s)| s.last_use)
                .map(|(i, _)| i)
                .expect("a full set is not empty");
            slots.swap_remove(lru);
            self.stats.evictions += 1;
        }
        slots.push(Slot {
            pasid,
            c,
            last_use: tick,
        });
        self.stats.inserts += 1;
    }

    /// Handles an ATS invalidation request for `range` of `pasid` (rule 4): the span sent is
    /// [`invalidation_span`] of the range's pages. Returns (the span's first page, its pages, entries
    /// dropped).
    pub fn invalidate(&mut self, pasid: Pasid, range: Range<Va>) -> (u64, u64, usize) {
        let first = range.start.raw() >> PAGE_SHIFT;
        let end = range.end.raw().div_ceil(1 << PAGE_SHIFT);
        let (base, nr) = invalidation_span(first, end);
        let dropped = self.drop_where(|s| {
            s.pasid == pasid && s.c.base_page < base + nr && base < s.c.base_page + s.c.nr_pages
        });
        (base, nr, dropped)
    }

    /// Handles a whole-PASID invalidation; returns the entries dropped.
    pub fn invalidate_pasid(&mut self, pasid: Pasid) -> usize {
        self.drop_where(|s| s.pasid == pasid)
    }

    fn drop_where(&mut self, f: impl Fn(&Slot<T>) -> bool) -> usize {
        let before = self.len();
        for set in &mut self.sets {
            set.retain(|s| !f(s));
        }
        let dropped = before - self.len();
        self.stats.invalidations += 1;
        self.stats.invalidated += dropped as u64;
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Pasid = Pasid(1);

    fn c(page: u64, write: bool) -> AtsCompletion<u64> {
        AtsCompletion {
            target: page * 10,
            base_page: page,
            nr_pages: 1,
            read: true,
            write,
        }
    }

    fn va(page: u64) -> Va {
        Va::from_raw(page << PAGE_SHIFT)
    }

    fn pages(a: u64, b: u64) -> Range<Va> {
        Range::new(va(a), va(b))
    }

    #[test]
    fn invalidation_spans_are_size_aligned_powers_of_two() {
        assert_eq!(
            invalidation_span(7, 11),
            (0, 16),
            "pages 7-10 invalidate 0-15"
        );
        assert_eq!(invalidation_span(8, 12), (8, 4));
        assert_eq!(invalidation_span(5, 6), (5, 1));
        assert_eq!(invalidation_span(0, 512), (0, 512));
        assert_eq!(invalidation_span(511, 513), (0, 1024));
    }

    #[test]
    fn an_invalidation_drops_entries_of_the_whole_aligned_span_and_no_other_pasid() {
        let mut atc = Atc::new(AtcConfig { sets: 1, ways: 32 });
        for p in 0..20 {
            atc.insert(P, c(p, true));
        }
        atc.insert(Pasid(2), c(8, true));
        let (base, nr, dropped) = atc.invalidate(P, pages(7, 11));
        assert_eq!((base, nr, dropped), (0, 16, 16));
        assert!(matches!(atc.lookup(P, va(16), false), AtcLookup::Hit(_)));
        assert!(matches!(atc.lookup(P, va(15), false), AtcLookup::Miss));
        assert!(matches!(
            atc.lookup(Pasid(2), va(8), false),
            AtcLookup::Hit(_)
        ));
        assert_eq!(atc.invalidate_pasid(P), 4);
    }

    #[test]
    fn a_write_to_a_read_only_entry_is_a_permission_miss() {
        let mut atc = Atc::new(AtcConfig::default());
        atc.insert(P, c(3, false));
        assert!(matches!(atc.lookup(P, va(3), false), AtcLookup::Hit(_)));
        assert!(matches!(atc.lookup(P, va(3), true), AtcLookup::ReadOnly(_)));
        assert_eq!(atc.stats().hits, 1);
        assert_eq!(atc.stats().misses, 1);
    }

    #[test]
    fn a_full_set_evicts_its_least_recently_used_entry() {
        let mut atc = Atc::new(AtcConfig { sets: 1, ways: 2 });
        atc.insert(P, c(1, true));
        atc.insert(P, c(2, true));
        assert!(matches!(atc.lookup(P, va(1), false), AtcLookup::Hit(_)));
        atc.insert(P, c(3, true)); // evicts page 2, the LRU
        assert!(matches!(atc.lookup(P, va(2), false), AtcLookup::Miss));
        assert!(matches!(atc.lookup(P, va(1), false), AtcLookup::Hit(_)));
        assert_eq!(atc.stats().evictions, 1);
        assert_eq!(atc.len(), 2);
    }

    #[test]
    fn a_huge_range_completion_covers_all_its_pages() {
        let mut atc = Atc::new(AtcConfig::default());
        atc.insert(
            P,
            AtsCompletion {
                target: 0u64,
                base_page: 512,
                nr_pages: 512,
                read: true,
                write: true,
            },
        );
        assert!(matches!(atc.lookup(P, va(700), true), AtcLookup::Hit(_)));
        assert!(matches!(atc.lookup(P, va(1024), true), AtcLookup::Miss));
        assert_eq!(atc.invalidate(P, pages(600, 601)).2, 1);
    }

    #[test]
    fn a_larger_atc_never_has_fewer_hits_on_a_cyclic_stream() {
        // LRU caches of the same set count are inclusive as ways grow (stack property).
        let mut prev = 0;
        for ways in [1, 2, 4, 8, 16] {
            let mut atc = Atc::new(AtcConfig { sets: 4, ways });
            for round in 0..4 {
                for p in 0..40u64 {
                    let page = (p * 7 + round) % 40;
                    if matches!(atc.lookup(P, va(page), false), AtcLookup::Miss) {
                        atc.insert(P, c(page, true));
                    }
                }
            }
            assert!(atc.stats().hits >= prev, "ways {ways}");
            prev = atc.stats().hits;
        }
        assert!(prev > 0);
    }
}
