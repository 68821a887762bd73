//! Device memory migration by physical range: `migrate_device_range` / `migrate_device_pfns`,
//! `migrate_device_pages` and `migrate_device_finalize`, which evict device pages wherever they are mapped.
//!
//! Linux counterparts: mm/migrate_device.c (`migrate_device_range`, `migrate_device_pfns`,
//! `migrate_device_unmap`, `migrate_device_pages`, `migrate_device_finalize`), mm/rmap.c (`try_to_migrate`,
//! `remove_migration_ptes`), lib/test_hmm.c (`dmirror_device_evict_chunk`), spec/linux-hmm.md §1.4.
//!
//! Unlike `migrate_vma` ([`crate::migrate`]), which starts from a virtual range of one process, this starts
//! from device page frames. Both find every mapping of each page with the rmap walk ([`crate::rmap`]): after
//! `fork`, one device page is mapped by two processes, and both mappings move to the same new page. The
//! unmap piece (`try_to_migrate`, here) and the reference-check and finalize pieces (`migrate_unmap_check`,
//! `remove_migration_ptes`, in [`crate::migrate`], the lower module) are shared with `migrate_vma`.
//!
//! The protocol, as numbered steps. It takes **no `mmap_lock`** (a driver evicts at unbind, or under memory
//! pressure while some process's `mmap_lock` may already be held):
//! 1. [`Kernel::migrate_device_range`] (or [`Kernel::migrate_device_pfns`] for a list of frames) takes each
//!    allocated device page (device-private or device-coherent memory): a reference and the page lock, giving
//!    `src = migrate_pfn | MIGRATE`. Free pages, pages of other memory, and busy pages (locked, or with a
//!    mapping that is already a migration entry: another migration holds them) give 0.
//! 2. It replaces every mapping of each taken page — device-private entries, device-coherent present PTEs,
//!    device-exclusive entries, in every process — by a migration entry that keeps that mapping's write bit,
//!    each inside an MMU_NOTIFY_CLEAR invalidation with no owner, as `try_to_migrate_one` does. Every mirror
//!    of every process that maps the page therefore drops its translation through its invalidate callback,
//!    the owning device's included (a MIGRATE event with the device as owner would be skipped by its own
//!    mirrors, test_hmm.c's rule, and leave them pointing at a page about to be freed). PMD-mapped device
//!    pages are split first. Then the reference check of `migrate_device_unmap`: a page with references
//!    beyond its migration entries and the one taken in step 1 — a pin (`maybe_dma_pinned`), a GUP
//!    reference — or with a mapping that could not be replaced, cannot migrate: its migration entries are
//!    restored at once, it is unlocked and its entry becomes 0. A restored or migrated device-exclusive entry
//!    comes back as a normal PTE (`remove_migration_pte`): the device already lost its atomic mapping through
//!    the CLEAR invalidation.
//! 3. The caller allocates destination pages (system RAM), copies, and fills `dst` (0 declines a page).
//! 4. [`Kernel::migrate_device_pages`] clears MIGRATE where `dst` is 0 and moves the page's identity (owner)
//!    to the destination.
//! 5. [`Kernel::migrate_device_finalize`] finds the migration entries of each page with the rmap walk
//!    (`remove_migration_ptes`) — including those `fork` copied meanwhile — and installs the destination in
//!    each, with that entry's write bit, or restores the source where the page did not migrate. The new page
//!    has one mapping and one reference per entry, so a page COW-shared by two processes stays shared and
//!    read-only in both (not anon-exclusive: a write in either copies). It unlocks the source and drops the
//!    reference of step 1: the device page is freed (`page_free`) once its last mapping went. CPU accesses
//!    waiting on migration entries, and CPU faults waiting on the page lock, are woken.
//!
//! A migration entry holds its mapping's reference, as everywhere in this model: `munmap` or exit during
//! steps 2–5 drops it, and the walk of step 5 no longer finds that mapping.
//!
//! Simplifications: only device memory is taken (Linux would also migrate a system page whose pfn is in
//! the range); device THPs are split rather than migrated as compound pages; `migrate_device_pages` does no
//! refcount freeze (step 5 installs whatever migration entries exist then).

use std::collections::BTreeSet;

use peerdma_core::{FrameId, PAGE_SIZE, PageSize, Pid, Range, Va};

use crate::kernel::Kernel;
use crate::migrate::{
    MIGRATE_PFN_MIGRATE, migrate_pfn, migrate_pfn_to_frame, migrate_unmap_check,
    remove_migration_ptes,
};
use crate::mmu_notifier::NotifierEvent;
use crate::pagetable::Pte;
use crate::phys::MemoryKind;
use crate::rmap::Mapping;

/// Returns the frame and write bit of an entry that maps a page `try_to_migrate` can replace by a migration
/// entry (device-private, present — system RAM or device-coherent —, device-exclusive).
fn migratable_mapping(pte: Pte) -> Option<(FrameId, bool)> {
    match pte {
        Pte::DevicePrivate { frame, write }
        | Pte::DeviceExclusive { frame, write }
        | Pte::Present {
            frame,
            write,
            special: false,
        } => Some((frame, write)),
        _ => None,
    }
}

impl Kernel {
    /// `migrate_device_range(src_pfns, start, npages)`: steps 1 and 2 of the module docs for the `npages`
    /// frames from `start`; fills `src_pfns[..npages]`.
    ///
    /// # Panics
    /// Panics if `src_pfns` holds fewer than `npages` entries (a caller bug).
    pub async fn migrate_device_range(&self, src_pfns: &mut [u64], start: FrameId, npages: u64) {
        let n = usize::try_from(npages).expect("npages fits the src_pfns array");
        assert!(src_pfns.len() >= n, "src_pfns shorter than npages");
        for (i, s) in (0u64..).zip(src_pfns[..n].iter_mut()) {
            *s = start.0 + i;
        }
        self.migrate_device_pfns(&mut src_pfns[..n]).await;
    }

    /// `migrate_device_pfns(src_pfns, npages)`: steps 1 and 2 of the module docs for the frames whose numbers
    /// `src_pfns` holds on entry (raw frame numbers); each becomes a migrate-pfn word, or 0.
    pub async fn migrate_device_pfns(&self, src_pfns: &mut [u64]) {
        // Step 1: take the pages.
        let taken: BTreeSet<FrameId> = {
            let st = self.mms();
            let mut phys = self.phys();
            let wanted: BTreeSet<FrameId> = src_pfns.iter().map(|&p| FrameId(p)).collect();
            let busy: BTreeSet<FrameId> = st
                .rmap_walk(&phys, wanted.iter().copied())
                .into_iter()
                .filter(|m| matches!(m.leaf.pte, Pte::Migration { .. }))
                .map(|m| m.frame)
                .collect();
            let mut taken = BTreeSet::new();
            for s in src_pfns.iter_mut() {
                let f = FrameId(*s);
                *s = 0;
                if !phys.exists(f)
                    || !matches!(
                        phys.kind(f),
                        MemoryKind::DevicePrivate { .. } | MemoryKind::DeviceCoherent { .. }
                    )
                {
                    continue;
                }
                let fr = phys.frame(f);
                // get_page_unless_zero + trylock_page.
                if !fr.is_allocated() || fr.locked || busy.contains(&f) || !taken.insert(f) {
                    continue;
                }
                phys.get(f);
                phys.frame_mut(f).locked = true;
                *s = migrate_pfn(f) | MIGRATE_PFN_MIGRATE;
            }
            taken
        };
        if taken.is_empty() {
            return;
        }
        // Step 2: try_to_migrate, then the reference check of migrate_device_unmap.
        let taken: Vec<FrameId> = taken.into_iter().collect();
        let walk = self.try_to_migrate(&taken).await;
        let restored = {
            let mut st = self.mms();
            let mut phys = self.phys();
            migrate_unmap_check(&mut st, &mut phys, src_pfns, &taken, walk)
        };
        if restored > 0 {
            self.migration_wq().wake_up_all();
        }
    }

    /// `try_to_migrate` (mm/rmap.c, `try_to_migrate_one`) for every page of `taken`, which the caller holds
    /// locked and referenced: replaces each of their mappings that is not a migration entry yet, in every
    /// process, by a migration entry keeping that mapping's write bit, each inside its own MMU_NOTIFY_CLEAR
    /// invalidation with no owner (step 2 of the module docs). PMD leaves are split first. A pinned page's
    /// mapping is left alone (`folio_try_share_anon_rmap_pte` fails), so the reference check restores it.
    ///
    /// `taken` is sorted. When no mapping needed replacing (every mapping of the pages is already a
    /// migration entry, the usual case after `migrate_vma_setup`'s collect: Linux skips `try_to_migrate`
    /// for a folio that is no longer `folio_mapped`), nothing changed and nothing slept, and the walk it
    /// made is returned for [`migrate_unmap_check`] to use instead of walking again; `None` otherwise.
    pub(crate) async fn try_to_migrate(&self, taken: &[FrameId]) -> Option<Vec<Mapping>> {
        if taken.is_empty() {
            return Some(Vec::new());
        }
        let mappings: Vec<(Pid, Va, FrameId)> = {
            let mut st = self.mms();
            let walk = st.rmap_walk(&self.phys(), taken.iter().copied());
            if walk
                .iter()
                .all(|m| migratable_mapping(m.leaf.pte).is_none())
            {
                return Some(walk);
            }
            for m in &walk {
                if m.leaf.size != PageSize::Size4K && migratable_mapping(m.leaf.pte).is_some() {
                    st.mm_mut(m.pid).pt_mut().split_pmd(m.va);
                }
            }
            walk.into_iter()
                .filter(|m| migratable_mapping(m.leaf.pte).is_some())
                .map(|m| (m.pid, m.va, m.frame))
                .collect()
        };
        for (pid, va, frame) in mappings {
            let page = Range::from_len(va, PAGE_SIZE).expect("page in user space");
            self.invalidate_range_start(pid, page, NotifierEvent::Clear, None)
                .await;
            {
                let mut st = self.mms();
                let phys = self.phys();
                // The entry may have changed while the invalidation slept (zapped, COW-broken).
                let cur = st
                    .mm(pid)
                    .pt()
                    .lookup(va)
                    .filter(|l| l.size == PageSize::Size4K)
                    .and_then(|l| migratable_mapping(l.pte));
                // A pinned exclusive page cannot be shared for migration (folio_try_share_anon_rmap_pte).
                if let Some((f, write)) = cur
                    && f == frame
                    && !phys.frame(frame).maybe_dma_pinned()
                {
                    st.mm_mut(pid)
                        .pt_mut()
                        .set_pte(va, Pte::Migration { frame, write });
                }
            }
            self.invalidate_range_end(pid);
        }
        None
    }

    /// `migrate_device_pages(src_pfns, dst_pfns, npages)`: step 4 of the module docs.
    ///
    /// # Panics
    /// Panics if the two arrays differ in length (a caller bug).
    pub fn migrate_device_pages(&self, src_pfns: &mut [u64], dst_pfns: &[u64]) {
        assert_eq!(src_pfns.len(), dst_pfns.len(), "src and dst arrays differ");
        let mut phys = self.phys();
        for (s, &d) in src_pfns.iter_mut().zip(dst_pfns) {
            if *s & MIGRATE_PFN_MIGRATE == 0 {
                continue;
            }
            let (Some(src), Some(dst)) = (migrate_pfn_to_frame(*s), migrate_pfn_to_frame(d)) else {
                *s &= !MIGRATE_PFN_MIGRATE;
                continue;
            };
            // folio_migrate_mapping: the destination takes the page's place (an anonymous page here).
            let owner = phys.frame(src).owner();
            phys.set_owner(dst, owner);
        }
    }

    /// `migrate_device_finalize(src_pfns, dst_pfns, npages)`: step 5 of the module docs.
    ///
    /// # Panics
    /// Panics if the two arrays differ in length (a caller bug).
    pub fn migrate_device_finalize(&self, src_pfns: &[u64], dst_pfns: &[u64]) {
        assert_eq!(src_pfns.len(), dst_pfns.len(), "src and dst arrays differ");
        let moved = {
            let mut st = self.mms();
            let mut phys = self.phys();
            let mut swap = self.swap();
            remove_migration_ptes(&mut st, &mut phys, &mut swap, src_pfns, dst_pfns)
        };
        if moved > 0 {
            self.sim.count("migrate.pages", moved);
        }
        self.migration_wq().wake_up_all();
    }
}
