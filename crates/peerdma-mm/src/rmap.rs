//! The reverse map, modelled as a page-table walk: every mapping of a set of frames, in every live address
//! space.
//!
//! Linux counterpart: mm/rmap.c (`rmap_walk`, reached through `try_to_unmap`, `try_to_migrate` and
//! `remove_migration_ptes`). Linux finds a page's mappings through its `anon_vma` chain or its file's
//! `i_mmap` tree; the model keeps no such links and walks the page tables of all address spaces instead
//! (MGLRU walks page tables too). The result is the same set of mappings, found at a cost the model does not
//! charge.
//!
//! Rules:
//! 1. Address spaces are visited in pid order and leaves in address order, so the result is deterministic.
//! 2. Exited address spaces are skipped (their tables are empty anyway).
//! 3. Special present entries (raw PFNs without `struct page` semantics) and entries that name no frame
//!    (swap, PFNMAP) are never reported.
//! 4. A 2 MiB leaf is reported once per sub-frame the caller asks for, each with its own 4 KiB address and
//!    the whole leaf, so the caller can split it before replacing one page.
//!
//! Users: reclaim ([`crate::vmscan`], present 4 KiB mappings of its victims), device-range migration
//! ([`crate::migrate_device`], device-private, device-coherent and device-exclusive mappings of device pages,
//! then the migration entries that replaced them) and the unmap and finalize steps of `migrate_vma`
//! ([`crate::migrate`], the other mappings of each collected page, e.g. another process's after `fork`).
//!
//! The per-frame mapping accounting every mapping change goes through, `PhysMem::map_frame` /
//! `unmap_frame` (`folio_add_*_rmap` + `folio_get`, `folio_remove_rmap_*` + `folio_put`), lives with the frames in [`crate::phys`].

use peerdma_core::{FrameId, PAGE_SIZE, Pid, Va};

use crate::kernel::Mms;
use crate::pagetable::{Leaf, Pte};

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
    /// Returns every mapping of the frames `want_fn` selects, in every live address space (the module's
    /// rules 1–4).
    pub(crate) fn rmap_walk(&self, mut want_fn: impl FnMut(FrameId) -> bool) -> Vec<Mapping> {
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
