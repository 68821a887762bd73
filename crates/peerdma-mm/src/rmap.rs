//! The reverse map: every mapping of a set of frames, in every live address space.
//!
//! Linux counterpart: mm/rmap.c (`rmap_walk`, `rmap_walk_anon`, `rmap_walk_file`, reached through
//! `try_to_unmap`, `try_to_migrate` and `remove_migration_ptes`). Linux goes from a page to the VMAs that
//! may map it (`folio->mapping`: the `anon_vma` of a fork family or the file's `i_mmap` tree), computes the
//! address from `folio->index` (`vma_address`) and looks it up in that VMA's page table, so the cost follows
//! the page's own mappings. The model gets the same cost with a reverse index kept by each page table
//! ([`crate::pagetable::rmap_index`]): every leaf the table stores or removes updates it (`folio_add_anon_rmap_pte`,
//! `folio_remove_rmap_pte` at the one place entries change), and the walk asks each live address space's
//! index for the wanted frames instead of walking every leaf. The result is the set of mappings a walk of
//! all page tables finds, in the same order (the test oracle below keeps that walk); the model charges no
//! simulated time for it.
//!
//! Rules:
//! 1. Address spaces are visited in pid order and mappings reported in address order within each, so the
//!    result is deterministic.
//! 2. Exited address spaces are skipped (their tables are empty anyway).
//! 3. Special present entries (raw PFNs without `struct page` semantics) and entries that name no frame
//!    (swap, PFNMAP) are never reported.
//! 4. A 2 MiB leaf is reported once per wanted sub-frame, each with its own 4 KiB address and the whole
//!    leaf, so the caller can split it before replacing one page.
//!
//! Coarse modelling: the walk asks every live address space (a hash lookup per wanted frame each), where
//! Linux visits only the VMAs of the page's `anon_vma` or file; with one process, or a fork family, that is
//! the same set.
//!
//! Users: reclaim ([`crate::vmscan`], present 4 KiB mappings of its victims), device-range migration
//! ([`crate::migrate_device`], device-private, device-coherent and device-exclusive mappings of device pages,
//! then the migration entries that replaced them) and the unmap and finalize steps of `migrate_vma`
//! ([`crate::migrate`], the other mappings of each collected page, e.g. another process's after `fork`).
//!
//! The per-frame mapping accounting every mapping change goes through, `PhysMem::map_frame` /
//! `unmap_frame` (`folio_add_*_rmap` + `folio_get`, `folio_remove_rmap_*` + `folio_put`), lives with the
//! frames in [`crate::phys`].

use peerdma_core::{FrameId, Pid, Va};

use crate::kernel::Mms;
use crate::pagetable::Leaf;

#[cfg(test)]
mod tests;

/// One page-table mapping of a frame, found by `Mms::rmap_walk`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// The address space.
    pub pid: Pid,
    /// The address of the 4 KiB page that maps `frame`.
    pub va: Va,
    /// The frame.
    pub frame: FrameId,
    /// The leaf holding the mapping (for a PMD leaf, the whole 2 MiB entry).
    pub leaf: Leaf,
}

impl Mms {
    /// Returns every mapping of `frames` (duplicates allowed) in every live address space (the module's
    /// rules 1–4).
    pub(crate) fn rmap_walk(&self, frames: impl IntoIterator<Item = FrameId>) -> Vec<Mapping> {
        let mut frames: Vec<FrameId> = frames.into_iter().collect();
        frames.sort_unstable();
        frames.dedup();
        let mut out = Vec::new();
        let mut hits: Vec<(Va, FrameId)> = Vec::new();
        for mm in self.live() {
            let pt = mm.pt();
            if pt.rmap().is_empty() {
                continue;
            }
            hits.clear();
            for &f in &frames {
                pt.rmap().find(f, &mut hits);
            }
            hits.sort_unstable();
            for &(va, frame) in &hits {
                let leaf = pt
                    .lookup(va)
                    .expect("the rmap index names a mapped address");
                out.push(Mapping {
                    pid: mm.pid(),
                    va,
                    frame,
                    leaf,
                });
            }
        }
        out
    }

    /// The walk the index replaced, kept as the tests' oracle: every leaf of every live address space, in
    /// pid then address order, reporting the frames `want_fn` selects (rules 1–4).
    #[cfg(test)]
    pub(crate) fn rmap_walk_all_leaves(
        &self,
        mut want_fn: impl FnMut(FrameId) -> bool,
    ) -> Vec<Mapping> {
        use peerdma_core::PAGE_SIZE;

        use crate::pagetable::Pte;

        let mut out = Vec::new();
        for mm in self.live() {
            for leaf in mm.pt().leaves(Va::from_raw(0), Va::from_raw(u64::MAX)) {
                if matches!(leaf.pte, Pte::Present { special: true, .. }) {
                    continue;
                }
                let Some(head) = leaf.pte.frame() else {
                    continue;
                };
                for i in 0..leaf.size.nr_pages() {
                    let frame = FrameId(head.0 + i);
                    if want_fn(frame) {
                        out.push(Mapping {
                            pid: mm.pid(),
                            va: leaf.base.add(i * PAGE_SIZE),
                            frame,
                            leaf,
                        });
                    }
                }
            }
        }
        out
    }
}
