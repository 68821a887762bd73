//! The reverse index one page table keeps of the frames it maps: frame → the page addresses mapping it.
//!
//! Linux counterpart: the links mm/rmap.c follows from a page to its mappings (`folio->mapping` and
//! `folio->index` into an `anon_vma` or an `address_space`'s `i_mmap`, then `vma_address` and a page-table
//! lookup). The model keeps the answer instead of the path: every entry the table stores or removes
//! ([`crate::pagetable::PageTable`]'s `set_at` and `clear`, the two places any leaf changes) updates this
//! index, so it holds exactly the table's leaves that name a frame, and finding a frame's mappings costs a
//! hash lookup rather than a walk of every leaf.
//!
//! Layout (per address space, so memory follows the pages it maps, not the frames configured):
//! - `first`: the mapcount-1 fast path, frame → the address of its first 4 KiB mapping here (an
//!   open-addressing hash table with a fixed multiplicative hash: deterministic, no per-process seed);
//! - `more`: the overflow for a frame mapped at more than one 4 KiB address of the same address space
//!   (a file page mapped twice), ordered `(frame, address)`;
//! - `huge`: 2 MiB leaves, `(head frame, address)`, so a sub-frame finds its leaf by a range lookup.
//!
//! Entries indexed: every leaf whose [`Pte::frame`] names a frame — present, device-private,
//! device-exclusive and migration entries — except special present entries (raw PFNs without
//! `struct page` semantics, which the rmap never reports). Swap and raw-PFN entries name no frame.

use std::collections::BTreeSet;
#[expect(
    clippy::disallowed_types,
    reason = "looked up by key only, never iterated into output; FrameHasher has no random seed"
)]
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use peerdma_core::{FrameId, PAGE_SIZE, PageSize, Va};

use super::Pte;

/// A multiplicative hash for frame numbers (Fibonacci hashing): sequential frames spread over the table
/// and the result does not depend on a random seed.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct FrameHasher(u64);

impl Hasher for FrameHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(26) ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// A hash table keyed by frame number with [`FrameHasher`]: O(1) lookups for per-frame side tables (this
/// index, the LRU's). Its iteration order is deterministic but meaningless; users look up by key and never
/// let iteration order reach output (CONVENTIONS).
#[expect(
    clippy::disallowed_types,
    reason = "looked up by key only, never iterated into output; FrameHasher has no random seed"
)]
pub(crate) type FrameHashMap<K, V> = HashMap<K, V, BuildHasherDefault<FrameHasher>>;

type FrameMap = FrameHashMap<u64, u64>;

/// Frames per 2 MiB leaf.
const PMD_FRAMES: u64 = 512;

/// The reverse index of one page table (module docs).
#[derive(Clone, Debug, Default)]
pub(crate) struct PtRmap {
    first: FrameMap,
    more: BTreeSet<(u64, u64)>,
    huge: BTreeSet<(u64, u64)>,
}

/// The frame a leaf's entry names for the rmap, if it is indexed (module docs).
fn indexed(pte: Pte) -> Option<FrameId> {
    if matches!(pte, Pte::Present { special: true, .. }) {
        return None;
    }
    pte.frame()
}

impl PtRmap {
    /// Records the leaf `pte` of `size` at `base` (the leaf's first address).
    pub(crate) fn add(&mut self, pte: Pte, base: Va, size: PageSize) {
        let Some(f) = indexed(pte) else { return };
        let va = base.raw();
        if size != PageSize::Size4K {
            self.huge.insert((f.0, va));
            return;
        }
        if let Some(&cur) = self.first.get(&f.0) {
            if cur != va {
                self.more.insert((f.0, va));
            }
        } else {
            self.first.insert(f.0, va);
        }
    }

    /// Forgets the leaf `pte` of `size` at `base`, which [`PtRmap::add`] recorded.
    pub(crate) fn remove(&mut self, pte: Pte, base: Va, size: PageSize) {
        let Some(f) = indexed(pte) else { return };
        let va = base.raw();
        if size != PageSize::Size4K {
            self.huge.remove(&(f.0, va));
            return;
        }
        if self.first.get(&f.0) == Some(&va) {
            match self.more.range((f.0, 0)..=(f.0, u64::MAX)).next().copied() {
                Some(next) => {
                    self.more.remove(&next);
                    self.first.insert(f.0, next.1);
                }
                None => {
                    self.first.remove(&f.0);
                }
            }
        } else {
            self.more.remove(&(f.0, va));
        }
    }

    /// Returns whether the table maps no frame.
    pub(crate) fn is_empty(&self) -> bool {
        self.first.is_empty() && self.huge.is_empty()
    }

    /// Appends the 4 KiB page address of every mapping of `frame` in this table to `out`, unordered.
    pub(crate) fn find(&self, frame: FrameId, out: &mut Vec<(Va, FrameId)>) {
        let f = frame.0;
        if let Some(&va) = self.first.get(&f) {
            out.push((Va::from_raw(va), frame));
            for &(_, va) in self.more.range((f, 0)..=(f, u64::MAX)) {
                out.push((Va::from_raw(va), frame));
            }
        }
        if self.huge.is_empty() {
            return;
        }
        let lo = f.saturating_sub(PMD_FRAMES - 1);
        for &(head, va) in self.huge.range((lo, 0)..=(f, u64::MAX)) {
            if f < head + PMD_FRAMES {
                out.push((Va::from_raw(va + (f - head) * PAGE_SIZE), frame));
            }
        }
    }

    /// Returns the number of leaves recorded (4 KiB and 2 MiB).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.first.len() + self.more.len() + self.huge.len()
    }
}
