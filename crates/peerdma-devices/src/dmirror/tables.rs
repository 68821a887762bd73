//! The dmirror driver's two per-page tables, kept dense instead of in ordered maps: each open file's device
//! page table (`dmirror->pt`, an xarray indexed by page number in lib/test_hmm.c) and the device's page
//! owners (`zone_device_data` of each device page, test_hmm.c's `dmirror_page_to_chunk` / the `dmirror`
//! stored with the page).
//!
//! Linux keeps both per page in arrays (an xarray's leaf nodes hold 64 slots; `zone_device_data` sits in
//! the `struct page`), so a migration of N pages costs N slot stores, not N ordered-tree insertions. The
//! model does the same: [`DevicePt`] holds 64-entry chunks (test_hmm.c's 64-page unit, an xarray node's
//! width) in an ordered map of chunks, so lookups, insertions and removals touch one chunk and iteration
//! is still in address order; [`PageOwners`] holds one slot per frame of the device's region, in chunks of
//! 512 frames allocated when a frame of theirs first gets an owner. Both behave exactly as the ordered maps
//! they replace (same contents, same iteration order); only the host cost differs.

use std::collections::BTreeMap;
use std::ops::RangeInclusive;

use peerdma_core::FrameId;

use super::PtEntry;
use super::device::PageOwner;

/// Entries per device page-table chunk (an xarray node's 64 slots; test_hmm.c's 64-page unit).
const PT_SLOTS: usize = 64;
/// [`PT_SLOTS`] as a page count.
const PT_CHUNK: u64 = PT_SLOTS as u64;

/// One chunk of [`DevicePt`]: 64 slots and how many are used.
#[derive(Debug)]
struct PtChunk {
    used: u32,
    slots: [Option<PtEntry>; PT_SLOTS],
}

fn slot(vpn: u64) -> usize {
    usize::try_from(vpn % PT_CHUNK).expect("below 64")
}

/// A file's device page table: page number → entry, in 64-entry chunks (module docs).
#[derive(Debug, Default)]
pub(crate) struct DevicePt {
    chunks: BTreeMap<u64, Box<PtChunk>>,
    len: usize,
}

impl DevicePt {
    /// The number of entries.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// The entry for page number `vpn`.
    pub(super) fn get(&self, vpn: u64) -> Option<PtEntry> {
        self.chunks.get(&(vpn / PT_CHUNK))?.slots[slot(vpn)]
    }

    /// Whether page number `vpn` has an entry.
    pub(super) fn contains(&self, vpn: u64) -> bool {
        self.get(vpn).is_some()
    }

    /// Sets the entry for `vpn` (replacing any).
    pub(super) fn insert(&mut self, vpn: u64, e: PtEntry) {
        let chunk = self.chunks.entry(vpn / PT_CHUNK).or_insert_with(|| {
            Box::new(PtChunk {
                used: 0,
                slots: [None; PT_SLOTS],
            })
        });
        let s = &mut chunk.slots[slot(vpn)];
        if s.is_none() {
            chunk.used += 1;
            self.len += 1;
        }
        *s = Some(e);
    }

    /// Removes the entry for `vpn`; returns it.
    pub(super) fn remove(&mut self, vpn: u64) -> Option<PtEntry> {
        let key = vpn / PT_CHUNK;
        let chunk = self.chunks.get_mut(&key)?;
        let e = chunk.slots[slot(vpn)].take()?;
        chunk.used -= 1;
        self.len -= 1;
        if chunk.used == 0 {
            self.chunks.remove(&key);
        }
        Some(e)
    }

    /// Removes every entry in `range` (page numbers, inclusive); returns how many there were.
    pub(super) fn remove_range(&mut self, range: RangeInclusive<u64>) -> u64 {
        let (first, last) = (*range.start(), *range.end());
        if first > last {
            return 0;
        }
        let keys: Vec<u64> = self
            .chunks
            .range(first / PT_CHUNK..=last / PT_CHUNK)
            .map(|(&k, _)| k)
            .collect();
        let mut n = 0;
        for k in keys {
            let chunk = self.chunks.get_mut(&k).expect("listed above");
            let lo = (k * PT_CHUNK).max(first);
            let hi = (k * PT_CHUNK + PT_CHUNK - 1).min(last);
            for vpn in lo..=hi {
                if chunk.slots[slot(vpn)].take().is_some() {
                    chunk.used -= 1;
                    n += 1;
                }
            }
            if chunk.used == 0 {
                self.chunks.remove(&k);
            }
        }
        self.len -= usize::try_from(n).expect("at most len");
        n
    }

    /// Removes every entry.
    pub(super) fn clear(&mut self) {
        self.chunks.clear();
        self.len = 0;
    }

    /// The entries with page numbers in `[first, end)`, in page order.
    pub(super) fn range(&self, first: u64, end: u64) -> impl Iterator<Item = (u64, PtEntry)> + '_ {
        let last_chunk = end.saturating_sub(1) / PT_CHUNK;
        let chunks = if first < end {
            Some(self.chunks.range(first / PT_CHUNK..=last_chunk))
        } else {
            None
        };
        chunks
            .into_iter()
            .flatten()
            .flat_map(|(&k, c)| {
                c.slots
                    .iter()
                    .enumerate()
                    .filter_map(move |(i, e)| Some((k * PT_CHUNK + i as u64, (*e)?)))
            })
            .filter(move |&(vpn, _)| vpn >= first && vpn < end)
    }

    /// Every entry, in page order.
    pub(super) fn iter(&self) -> impl Iterator<Item = (u64, PtEntry)> + '_ {
        self.range(0, u64::MAX)
    }
}

/// Frames per [`PageOwners`] chunk.
const OWNER_SLOTS: usize = 512;
/// [`OWNER_SLOTS`] as a frame count.
const OWNER_CHUNK: u64 = OWNER_SLOTS as u64;

/// The owner of each page of the device's region (module docs): frame → [`PageOwner`].
#[derive(Debug, Default)]
pub(crate) struct PageOwners {
    /// The region's first frame.
    base: u64,
    chunks: Vec<Option<Box<[Option<PageOwner>; OWNER_SLOTS]>>>,
    len: usize,
}

impl PageOwners {
    /// An empty table for the region starting at frame `base`.
    pub(super) fn new(base: FrameId) -> Self {
        Self {
            base: base.0,
            chunks: Vec::new(),
            len: 0,
        }
    }

    /// The chunk and slot of `f`, if it is in the region's range.
    fn index(&self, f: FrameId) -> Option<(usize, usize)> {
        let off = f.0.checked_sub(self.base)?;
        let c = usize::try_from(off / OWNER_CHUNK).ok()?;
        let i = usize::try_from(off % OWNER_CHUNK).expect("below 512");
        Some((c, i))
    }

    /// The number of pages with an owner.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Whether `f` has an owner.
    pub(super) fn contains(&self, f: FrameId) -> bool {
        self.index(f).is_some_and(|(c, i)| {
            self.chunks
                .get(c)
                .and_then(Option::as_ref)
                .is_some_and(|ch| ch[i].is_some())
        })
    }

    /// Sets the owner of `f`, a frame of the region (replacing any).
    ///
    /// # Panics
    /// Panics if `f` lies below the region (a driver bug: it only owns pages of its own memory).
    pub(super) fn insert(&mut self, f: FrameId, owner: PageOwner) {
        let (c, i) = self.index(f).expect("a frame of the device's region");
        if self.chunks.len() <= c {
            self.chunks.resize_with(c + 1, || None);
        }
        let s =
            &mut self.chunks[c].get_or_insert_with(|| Box::new(std::array::from_fn(|_| None)))[i];
        if s.is_none() {
            self.len += 1;
        }
        *s = Some(owner);
    }

    /// Removes the owner of `f`; returns it.
    pub(super) fn remove(&mut self, f: FrameId) -> Option<PageOwner> {
        let (c, i) = self.index(f)?;
        let o = self.chunks.get_mut(c)?.as_mut()?[i].take()?;
        self.len -= 1;
        Some(o)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::rc::Weak;

    use peerdma_core::FrameId;

    use super::{DevicePt, PageOwners};
    use crate::dmirror::device::PageOwner;
    use crate::dmirror::{PtEntry, Tag};

    /// A fixed xorshift sequence: the same operations on every run.
    fn xorshift(s: &mut u64) -> u64 {
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        *s
    }

    fn entry(frame: u64) -> PtEntry {
        PtEntry {
            frame: FrameId(frame),
            generation: frame * 3,
            tag: if frame.is_multiple_of(2) {
                Tag::Read
            } else {
                Tag::Write
            },
        }
    }

    fn same(pt: &DevicePt, model: &BTreeMap<u64, u64>) {
        assert_eq!(pt.len(), model.len());
        let got: Vec<(u64, u64)> = pt.iter().map(|(v, e)| (v, e.frame.0)).collect();
        let want: Vec<(u64, u64)> = model.iter().map(|(&v, &f)| (v, f)).collect();
        assert_eq!(got, want);
    }

    /// The chunked page table holds exactly what an ordered map would after any mix of insertions,
    /// removals, inclusive range removals (chunk-crossing, partial and empty ranges included) and lookups,
    /// and lists its entries in the same order, over a whole range or a part.
    #[test]
    fn device_pt_behaves_as_an_ordered_map() {
        let mut pt = DevicePt::default();
        let mut model: BTreeMap<u64, u64> = BTreeMap::new();
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        for step in 0..20_000u64 {
            let vpn = xorshift(&mut s) % 700;
            match xorshift(&mut s) % 6 {
                0..=2 => {
                    pt.insert(vpn, entry(step));
                    model.insert(vpn, step);
                }
                3 => assert_eq!(pt.remove(vpn).map(|e| e.frame.0), model.remove(&vpn)),
                4 => {
                    let last = vpn + xorshift(&mut s) % 150;
                    let keys: Vec<u64> = model.range(vpn..=last).map(|(&k, _)| k).collect();
                    for k in &keys {
                        model.remove(k);
                    }
                    assert_eq!(pt.remove_range(vpn..=last), keys.len() as u64);
                }
                _ => {
                    let end = vpn + xorshift(&mut s) % 150;
                    let got: Vec<u64> = pt.range(vpn, end).map(|(v, _)| v).collect();
                    let want: Vec<u64> = model.range(vpn..end).map(|(&k, _)| k).collect();
                    assert_eq!(got, want);
                    assert_eq!(pt.contains(vpn), model.contains_key(&vpn));
                    assert_eq!(pt.get(vpn).map(|e| e.frame.0), model.get(&vpn).copied());
                }
            }
            if step % 1000 == 0 {
                same(&pt, &model);
            }
        }
        same(&pt, &model);
        let last = std::hint::black_box(4);
        assert_eq!(
            pt.remove_range(5..=last),
            0,
            "an empty range removes nothing"
        );
        pt.clear();
        assert_eq!((pt.len(), pt.iter().count()), (0, 0));
    }

    /// The owner table counts, finds and removes owners as an ordered map keyed by frame would, and
    /// ignores frames below its region.
    #[test]
    fn page_owners_behave_as_a_map() {
        let base = 10_000u64;
        let mut owners = PageOwners::new(FrameId(base));
        let mut model: BTreeSet<u64> = BTreeSet::new();
        let mut s = 0x2545_f491_4f6c_dd1du64;
        let owner = || PageOwner { fd: Weak::new() };
        for _ in 0..10_000 {
            let f = base + xorshift(&mut s) % 2_000;
            if xorshift(&mut s).is_multiple_of(3) {
                assert_eq!(owners.remove(FrameId(f)).is_some(), model.remove(&f));
            } else {
                owners.insert(FrameId(f), owner());
                model.insert(f);
            }
            assert_eq!(owners.len(), model.len());
            let probe = base + xorshift(&mut s) % 2_000;
            assert_eq!(owners.contains(FrameId(probe)), model.contains(&probe));
        }
        assert!(!owners.contains(FrameId(base - 1)));
        assert!(owners.remove(FrameId(3)).is_none());
    }
}
