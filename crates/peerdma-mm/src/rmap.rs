//! The reverse map: every mapping of a set of frames, in every live address space.
//!
//! Linux counterpart: mm/rmap.c (`rmap_walk`, `rmap_walk_anon`, `rmap_walk_file`, reached through
//! `try_to_unmap`, `try_to_migrate` and `remove_migration_ptes`). Linux goes from a page to the VMAs that
//! may map it (`folio->mapping`: the `anon_vma` of a fork family or the file's `i_mmap` tree), computes the
//! address from `folio->index` (`vma_address`) and looks it up in that VMA's page table, so the cost follows
//! the page's own mappings. The model gets the same cost with a reverse index kept by each page table
//! ([`crate::pagetable::rmap_index`]): every leaf the table stores or removes updates it (`folio_add_anon_rmap_pte`,
//! `folio_remove_rmap_pte` at the one place entries change), and the walk asks the index of each live
//! address space that may map a wanted frame (below) instead of walking every leaf. The result is the set of mappings a walk of
//! all page tables finds, in the same order (the test oracle below keeps that walk); the model charges no
//! simulated time for it.
//!
//! Rules:
//! 1. Address spaces are visited in pid order and mappings reported in address order within each, so the
//!    result is deterministic.
//! 2. Exited address spaces are skipped (their tables are empty anyway), and so are live ones outside the
//!    wanted frames' families and files (below): they cannot map them.
//! 3. Special present entries (raw PFNs without `struct page` semantics) and entries that name no frame
//!    (swap, PFNMAP) are never reported.
//! 4. A 2 MiB leaf is reported once per wanted sub-frame, each with its own 4 KiB address and the whole
//!    leaf, so the caller can split it before replacing one page.
//!
//! Which address spaces a walk visits (`folio->mapping`, module [`Scopes`]):
//! - an anonymous page names its anon_vma ([`crate::phys::Frame::anon_vma`]): the address space it was
//!   created for (`folio_add_new_anon_rmap` with the faulting VMA's `anon_vma`). The walk visits that
//!   address space and every one forked from it since, through exited ones (`anon_vma_fork` links a child's
//!   VMAs into the parent's anon_vma tree, `rmap_walk_anon` walks it). A page swapped in while other address
//!   spaces still hold its swap entry names the root of the faulting process's fork tree, Linux's
//!   `anon_vma->root` for a folio that is not exclusive (mm/rmap.c `__folio_set_anon`). Migration gives
//!   the destination the source's anon_vma (`folio_migrate_mapping`), so a page moved to device-private
//!   memory and back keeps its family; mremap moves pages inside one address space.
//! - a page-cache page names its file: the walk visits the live address spaces that have mapped that file
//!   (`rmap_walk_file` over the `i_mmap` tree). *Coarse:* an address space stays in the file's set after
//!   it munmaps the file, until it exits; the per-address-space index then finds nothing there.
//! - a free frame has no mappings and sends the walk nowhere;
//! - any other frame (a driver or P2P page, an anonymous page allocated by a driver outside a fault, such as
//!   a device page never migrated into a process) visits every live address space.
//!
//! The model's families are whole address spaces where Linux's anon_vma trees hold VMAs: a page's walk may
//! visit an address space of its family that no longer maps it (one lookup, as Linux visits a VMA that
//! does not map the page). No KSM: an anonymous page never belongs to two families.
//!
//! Users: reclaim ([`crate::vmscan`], present 4 KiB mappings of its victims), device-range migration
//! ([`crate::migrate_device`], device-private, device-coherent and device-exclusive mappings of device pages,
//! then the migration entries that replaced them) and the unmap and finalize steps of `migrate_vma`
//! ([`crate::migrate`], the other mappings of each collected page, e.g. another process's after `fork`).
//!
//! The per-frame mapping accounting every mapping change goes through, `PhysMem::map_frame` /
//! `unmap_frame` (`folio_add_*_rmap` + `folio_get`, `folio_remove_rmap_*` + `folio_put`), lives with the
//! frames in [`crate::phys`].

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};

use peerdma_core::{FrameId, Pid, Va};

use crate::kernel::Mms;
use crate::pagetable::Leaf;
use crate::phys::{FrameOwner, PhysMem};
use crate::vma::{Vma, VmaBacking};

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

/// The links from a page to the address spaces that may map it (module docs): the fork tree that stands for
/// the anon_vma trees, and each file's mappers that stand for its `i_mmap`.
#[derive(Debug, Default)]
pub(crate) struct Scopes {
    /// Each address space's parent (`fork`); kept after either exits.
    parent: BTreeMap<Pid, Pid>,
    /// Each address space's children, in fork order; kept after exits, so a family reaches the children of
    /// an exited parent.
    children: BTreeMap<Pid, Vec<Pid>>,
    /// The address spaces that have mapped each file (a superset of its `i_mmap`, module docs).
    file_mms: BTreeMap<u32, BTreeSet<Pid>>,
    /// Address spaces whose index the walks consulted, in all ([`Mms::rmap_visits`]).
    visits: Cell<u64>,
}

/// Which address spaces one wanted frame sends the walk to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Scope {
    /// An anon_vma: this address space and its descendants.
    Family(Pid),
    /// A file's mappers.
    File(u32),
    /// Every live address space.
    All,
}

impl Scopes {
    /// Records that `child` was forked from `parent` (`anon_vma_fork`).
    pub(crate) fn note_fork(&mut self, parent: Pid, child: Pid) {
        self.parent.insert(child, parent);
        self.children.entry(parent).or_default().push(child);
    }

    /// Records a VMA inserted into `pid` (`vma_link_file` adds a file VMA to `i_mmap`).
    pub(crate) fn note_vma(&mut self, pid: Pid, vma: &Vma) {
        if let VmaBacking::File { file, .. } = vma.backing {
            self.file_mms.entry(file).or_default().insert(pid);
        }
    }

    /// Returns the root of `pid`'s fork tree (`anon_vma->root`).
    pub(crate) fn family_root(&self, mut pid: Pid) -> Pid {
        while let Some(&p) = self.parent.get(&pid) {
            pid = p;
        }
        pid
    }

    /// Appends `pid` and every address space forked from it, directly or not, to `out`.
    fn family(&self, pid: Pid, out: &mut Vec<Pid>) {
        let mut stack = vec![pid];
        while let Some(p) = stack.pop() {
            out.push(p);
            if let Some(c) = self.children.get(&p) {
                stack.extend(c.iter().rev());
            }
        }
    }
}

/// The scope of one frame (module docs).
fn scope(phys: &PhysMem, f: FrameId) -> Option<Scope> {
    if !phys.exists(f) {
        return None;
    }
    let fr = phys.frame(f);
    match (fr.owner(), fr.anon_vma()) {
        // A free frame has no mappings (`folio_mapped` is false): nothing to visit.
        (FrameOwner::Free, _) => None,
        (FrameOwner::Anon, Some(pid)) => Some(Scope::Family(pid)),
        (FrameOwner::File { file, .. }, _) => Some(Scope::File(file)),
        _ => Some(Scope::All),
    }
}

impl Mms {
    /// Inserts `vma` into `pid` and records a file VMA among its file's mappers.
    pub(crate) fn insert_vma(&mut self, pid: Pid, vma: Vma) {
        self.scopes_mut().note_vma(pid, &vma);
        self.mm_mut(pid).insert_vma(vma);
    }

    /// Returns how many address spaces the reverse-map walks have visited so far (a cost figure for tests and
    /// benchmarks; no simulated time is charged for it).
    pub(crate) fn rmap_visits(&self) -> u64 {
        self.scopes().visits.get()
    }

    /// Returns every mapping of `frames` (duplicates allowed) in the live address spaces that may map them
    /// (the module's rules 1–4; `phys` tells each frame's anon_vma or file).
    pub(crate) fn rmap_walk(
        &self,
        phys: &PhysMem,
        frames: impl IntoIterator<Item = FrameId>,
    ) -> Vec<Mapping> {
        let mut frames: Vec<FrameId> = frames.into_iter().collect();
        frames.sort_unstable();
        frames.dedup();
        // The frames of each scope, in frame order, then the scopes each address space is visited for.
        let mut groups: BTreeMap<Scope, Vec<FrameId>> = BTreeMap::new();
        for &f in &frames {
            if let Some(sc) = scope(phys, f) {
                groups.entry(sc).or_default().push(f);
            }
        }
        let groups: Vec<(Scope, Vec<FrameId>)> = groups.into_iter().collect();
        let mut visit: BTreeMap<Pid, Vec<usize>> = BTreeMap::new();
        let mut pids = Vec::new();
        for (g, (sc, _)) in groups.iter().enumerate() {
            pids.clear();
            match *sc {
                Scope::Family(p) => self.scopes().family(p, &mut pids),
                Scope::File(file) => {
                    pids.extend(self.scopes().file_mms.get(&file).into_iter().flatten());
                }
                Scope::All => pids.extend(self.live().map(crate::kernel::AddressSpace::pid)),
            }
            for &p in &pids {
                visit.entry(p).or_default().push(g);
            }
        }
        let mut out = Vec::new();
        // Most frames have one mapping: room for that many hits up front, not a regrowth per doubling.
        let mut hits: Vec<(Va, FrameId)> = Vec::with_capacity(frames.len());
        for (pid, gs) in visit {
            let Some(mm) = self.get(pid).filter(|mm| mm.is_alive()) else {
                continue;
            };
            let visits = &self.scopes().visits;
            visits.set(visits.get() + 1);
            let pt = mm.pt();
            if pt.rmap().is_empty() {
                continue;
            }
            hits.clear();
            for g in gs {
                for &f in &groups[g].1 {
                    pt.rmap().find(f, &mut hits);
                }
            }
            hits.sort_unstable();
            out.reserve(hits.len());
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
