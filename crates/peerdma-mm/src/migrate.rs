//! Device memory and `migrate_vma`: moving pages between system RAM and device memory by virtual range.
//!
//! Linux counterparts: mm/migrate_device.c (`migrate_vma_setup` / `_pages` / `_finalize`), include/linux/memremap.h
//! (`dev_pagemap`, `migrate_to_ram`), spec/linux-hmm.md §1.4–1.6.
//!
//! It also holds the pieces `migrate_vma` shares with the by-range migration of [`crate::migrate_device`]
//! (which depends on this module, never the reverse): the `migrate_pfn` encoding, `mapping_entry`, the
//! reference check of `migrate_device_unmap` (`migrate_unmap_check`) and `remove_migration_ptes`
//! (mm/migrate.c).
//!
//! The protocol, as numbered steps (the caller holds `mmap_lock` for reading throughout):
//! 1. [`Kernel::migrate_vma_setup`] validates the range (one VMA, not hugetlb/IO/PFNMAP/MIXEDMAP, `EINVAL`
//!    otherwise), then:
//!    1. *collect* (`migrate_vma_collect`, `migrate_vma_collect_pmd`): inside one MMU_NOTIFY_MIGRATE
//!       invalidation of the range with the driver's `pgmap_owner` (so the driver's own mirrors may skip it),
//!       it picks what the selection flags select: holes and the zero page of anonymous VMAs (no source
//!       page), system pages, and device pages of this owner. Each picked page is referenced and locked
//!       (pages another migration holds locked, and pinned pages, are skipped) and its PTE in the range
//!       becomes a migration entry (CPU accesses wait);
//!    2. *unmap* (`migrate_vma_unmap` → `migrate_device_unmap`, mm/migrate_device.c): `try_to_migrate`
//!       (mm/rmap.c) replaces every **other** mapping of each collected page — another process's after
//!       `fork`, found by the rmap walk ([`crate::rmap`]) — by a migration entry keeping that mapping's
//!       write bit, each inside its own MMU_NOTIFY_CLEAR invalidation with no owner, as
//!       `try_to_migrate_one` fires it: every mirror of those processes, the owning device's included,
//!       drops its translation. Then the reference check: a page still mapped somewhere, or with references
//!       beyond its migration entries and the collect's (a pin, a GUP reference), gets all its migration
//!       entries restored, is unlocked and dropped (`src` = 0).
//!
//!    `cpages` counts what is still migrating.
//! 2. The driver allocates destination pages, copies, and fills `dst` (0 declines a page).
//! 3. [`Kernel::migrate_vma_pages`] installs destinations for entries without a source page (anonymous VMAs
//!    only) and drops entries the driver declined.
//! 4. [`Kernel::migrate_vma_finalize`] (`remove_migration_ptes` through the rmap walk) replaces **every**
//!    migration entry of each source page — in the range and wherever step 1.2 put one — by the destination
//!    (a device-private entry for device-private memory, a present PTE otherwise), each with its own write
//!    bit, or restores the source; mapcount and refcount move with each mapping, so a page COW-shared by
//!    parent and child stays shared and read-only in both. It unlocks and releases the sources (a device
//!    page is freed once its last mapping went) and wakes CPU accesses waiting on migration entries or on
//!    the page lock.
//!
//! A CPU fault on a device-private entry calls the owning pagemap's [`DevicePagemapOps::migrate_to_ram`],
//! which migrates the page back with the same protocol: after `fork`, a fault in either process brings both
//! mappings to the one new page. Evicting device memory by physical range is [`crate::migrate_device`],
//! whose unmap and finalize steps this shares.
//!
//! Simplifications: a compound (THP) entry is collected only for a THP mapped once, by this range's PMD (a
//! shared one is split and migrated page by page, so step 1.2 reaches its other mappings); `migrate_vma_pages`
//! does not fire its second, insert-time notifier; there is no `fault_page` (the CPU fault path takes no
//! page lock, so the collect step locks the faulting page like any other).

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;

use peerdma_core::{DeviceId, Errno, FrameId, PAGE_SIZE, PageSize, Pid, Range, Va};

use crate::kernel::{Kernel, Mms, VmFault};
use crate::mmu_notifier::NotifierEvent;
use crate::pagetable::Pte;
use crate::phys::{FrameOwner, MemoryKind, PhysMem};
use crate::rmap::Mapping;
use crate::vma::VmFlags;
use crate::vmscan::Swap;

/// MIGRATE_PFN_VALID: the entry names a page.
pub const MIGRATE_PFN_VALID: u64 = 1 << 0;
/// MIGRATE_PFN_MIGRATE: the page is being migrated.
pub const MIGRATE_PFN_MIGRATE: u64 = 1 << 1;
/// MIGRATE_PFN_WRITE: the page is (to be) mapped writable.
pub const MIGRATE_PFN_WRITE: u64 = 1 << 3;
/// MIGRATE_PFN_COMPOUND: the entry is a whole THP (512 pages); the next 511 entries are unused.
pub const MIGRATE_PFN_COMPOUND: u64 = 1 << 4;
/// MIGRATE_PFN_SHIFT.
pub const MIGRATE_PFN_SHIFT: u32 = 6;

/// MIGRATE_VMA_SELECT_SYSTEM.
pub const MIGRATE_VMA_SELECT_SYSTEM: u32 = 1 << 0;
/// MIGRATE_VMA_SELECT_DEVICE_PRIVATE.
pub const MIGRATE_VMA_SELECT_DEVICE_PRIVATE: u32 = 1 << 1;
/// MIGRATE_VMA_SELECT_DEVICE_COHERENT.
pub const MIGRATE_VMA_SELECT_DEVICE_COHERENT: u32 = 1 << 2;
/// MIGRATE_VMA_SELECT_COMPOUND: collect a PMD-mapped THP lying wholly inside the range as one compound entry
/// instead of splitting it (the THP series, ~v6.19).
pub const MIGRATE_VMA_SELECT_COMPOUND: u32 = 1 << 3;

/// Marks a destination installed by `migrate_vma_pages` (model-internal; bit 2 was MIGRATE_PFN_LOCKED).
const DST_CONSUMED: u64 = 1 << 2;

/// Returns the migrate-pfn word of `frame` (`migrate_pfn`).
pub fn migrate_pfn(frame: FrameId) -> u64 {
    (frame.0 << MIGRATE_PFN_SHIFT) | MIGRATE_PFN_VALID
}

/// Returns the frame a migrate-pfn word names, if any (`migrate_pfn_to_page`).
pub fn migrate_pfn_to_frame(m: u64) -> Option<FrameId> {
    (m & MIGRATE_PFN_VALID != 0).then_some(FrameId(m >> MIGRATE_PFN_SHIFT))
}

/// `struct migrate_vma`.
#[derive(Clone, Debug)]
pub struct MigrateVma {
    /// The address space.
    pub pid: Pid,
    /// Page-aligned start.
    pub start: Va,
    /// Page-aligned end.
    pub end: Va,
    /// Source entries, one per page (filled by setup).
    pub src: Vec<u64>,
    /// Destination entries (filled by the driver).
    pub dst: Vec<u64>,
    /// MIGRATE_VMA_SELECT_* flags.
    pub flags: u32,
    /// The driver's `pgmap_owner`: device pages of this owner are candidates. `None` for the core's own
    /// migrations of system memory (long-term GUP), which select no device page.
    pub pgmap_owner: Option<DeviceId>,
    /// Pages collected by setup.
    pub cpages: u64,
    /// The owner the MIGRATE invalidation reports (`pgmap_owner` for driver migrations, none for the core's
    /// own, e.g. long-term GUP evicting device-coherent pages).
    pub event_owner: Option<DeviceId>,
}

impl MigrateVma {
    /// Creates a driver's arguments for `[start, end)`, with `pgmap_owner` as both the owner of the device
    /// pages it may select and the owner its MIGRATE invalidation reports.
    pub fn new(pid: Pid, range: Range<Va>, flags: u32, pgmap_owner: DeviceId) -> Self {
        Self {
            event_owner: Some(pgmap_owner),
            pgmap_owner: Some(pgmap_owner),
            ..Self::without_owner(pid, range, flags)
        }
    }

    /// Creates the arguments for `[start, end)` of a migration the core starts itself, on behalf of no
    /// driver: no `pgmap_owner` (no device page is selected) and a MIGRATE invalidation with no owner.
    pub fn without_owner(pid: Pid, range: Range<Va>, flags: u32) -> Self {
        Self {
            pid,
            start: range.start,
            end: range.end,
            src: Vec::new(),
            dst: Vec::new(),
            flags,
            pgmap_owner: None,
            cpages: 0,
            event_owner: None,
        }
    }

    /// Returns the address of entry `i`.
    pub fn va(&self, i: usize) -> Va {
        self.start.add(i as u64 * PAGE_SIZE)
    }
}

/// The driver side of a device memory region (`struct dev_pagemap_ops`).
pub trait DevicePagemapOps: std::fmt::Debug {
    /// Migrates the device-private page `frame` mapped at `va` of `pid` back to system RAM (`migrate_to_ram`);
    /// called from the CPU fault path with `mmap_lock` held for reading.
    ///
    /// # Errors
    /// The `vm_fault_t` error the fault ends with ([`VmFault`]); the access then gets SIGBUS.
    fn migrate_to_ram<'a>(
        &'a self,
        pid: Pid,
        va: Va,
        frame: FrameId,
    ) -> Pin<Box<dyn Future<Output = Result<(), VmFault>> + 'a>>;
}

/// Returns the CPU page-table entry that maps `frame` of memory `kind`: a non-present device-private entry for
/// device-private memory (the CPU cannot touch it), a present PTE for everything else.
pub(crate) fn mapping_entry(kind: MemoryKind, frame: FrameId, write: bool) -> Pte {
    match kind {
        MemoryKind::DevicePrivate { .. } => Pte::DevicePrivate { frame, write },
        _ => Pte::Present {
            frame,
            write,
            special: false,
        },
    }
}

impl Kernel {
    /// `make_device_exclusive(mm, addr, owner)` for one page (spec §1.7, mm/rmap.c): takes the page through
    /// GUP with FOLL_GET | FOLL_WRITE | FOLL_SPLIT_PMD (`get_user_page_vma_remote`), so GUP's rules apply,
    /// fires MMU_NOTIFY_EXCLUSIVE with `owner`, and replaces the PTE by a device-exclusive entry; returns the
    /// frame. The caller holds `mmap_lock` for reading. Any later CPU access restores the PTE (see the fault
    /// path).
    ///
    /// # Errors
    /// GUP's errno: `EFAULT` for a hole, a PFNMAP/IO mapping or one the page cannot be written through,
    /// `EREMOTEIO` for P2P memory (no FOLL_PCI_P2PDMA); `EOPNOTSUPP` for a page that is not anonymous or is
    /// hugetlb.
    pub async fn make_device_exclusive(
        &self,
        pid: Pid,
        va: Va,
        owner: Option<DeviceId>,
    ) -> Result<FrameId, Errno> {
        let va = va.align_down(PAGE_SIZE);
        loop {
            let frame = self.get_user_page_write(pid, va).await?;
            let (supported, cur) = {
                let st = self.mms();
                let phys = self.phys();
                let hugetlb = st
                    .mm(pid)
                    .vma(va)
                    .is_some_and(|v| v.flags.contains(VmFlags::HUGETLB));
                (
                    phys.frame(frame).owner() == FrameOwner::Anon && !hugetlb,
                    st.mm(pid).translate(va),
                )
            };
            // The reference only kept the folio while it was looked at (`folio_put`).
            self.phys().put(frame);
            if !supported {
                return Err(Errno::EOPNOTSUPP);
            }
            match cur {
                Some((f, true, leaf)) if leaf.size == PageSize::Size4K && f == frame => break,
                // FOLL_SPLIT_PMD: a PMD-mapped THP is split before its page is taken.
                Some((_, _, leaf)) if leaf.size != PageSize::Size4K => {
                    self.mms().mm_mut(pid).pt_mut().split_pmd(va);
                }
                _ => {}
            }
        }
        let page = Range::from_len(va, PAGE_SIZE).ok_or(Errno::EFAULT)?;
        self.invalidate_range_start(pid, page, NotifierEvent::Exclusive, owner)
            .await;
        let res = {
            let mut st = self.mms();
            let phys = self.phys();
            match st.mm(pid).translate(va) {
                Some((frame, write, _)) if phys.frame(frame).owner() == FrameOwner::Anon => {
                    st.mm_mut(pid)
                        .pt_mut()
                        .set_pte(va, Pte::DeviceExclusive { frame, write });
                    Ok(frame)
                }
                Some(_) => Err(Errno::EOPNOTSUPP),
                None => Err(Errno::EBUSY),
            }
        };
        self.invalidate_range_end(pid);
        res
    }

    /// Adds `bytes` of device memory of `kind` (device-private or device-coherent) with its pagemap callbacks
    /// (`memremap_pages`); returns the region index.
    pub fn add_device_memory(
        &self,
        kind: MemoryKind,
        bytes: u64,
        ops: Rc<dyn DevicePagemapOps>,
    ) -> usize {
        let r = self.phys().add_region(kind, bytes / PAGE_SIZE);
        self.pgmaps().insert(r, ops);
        r
    }

    /// Adds `bytes` of device memory of `kind` whose pages sit at CPU physical address `base` — VRAM a BAR
    /// window shows — with its pagemap callbacks; returns the region index. Only the beyond-mainline HMM P2P
    /// option ([`crate::hmm`], [`crate::hmm::HmmRange::allow_p2p`]) makes a difference: a peer's
    /// `hmm_range_fault` on such a device-private page gets the page's BAR address instead of migrating it.
    pub fn add_device_memory_at(
        &self,
        kind: MemoryKind,
        bytes: u64,
        base: peerdma_core::Pa,
        ops: Rc<dyn DevicePagemapOps>,
    ) -> usize {
        let r = self.phys().add_region_at(kind, bytes / PAGE_SIZE, base);
        self.pgmaps().insert(r, ops);
        r
    }

    /// Allocates a zero-filled anonymous page in region `r`.
    pub fn alloc_page(&self, r: usize) -> Option<FrameId> {
        self.phys().alloc(r, FrameOwner::Anon).ok()
    }

    /// Allocates 512 contiguous zero-filled anonymous pages (a THP) in region `r`; returns the head.
    pub fn alloc_pmd_page(&self, r: usize) -> Option<FrameId> {
        self.phys().alloc_pmd(r, FrameOwner::Anon).ok()
    }

    /// Copies a page for a migration (the driver's copy step).
    pub fn copy_page(&self, src: FrameId, dst: FrameId) {
        self.phys().copy_frame(src, dst);
    }

    /// Returns the kind of memory `frame` is in.
    pub fn memory_kind(&self, frame: FrameId) -> MemoryKind {
        self.phys().kind(frame)
    }

    /// Step 1: `migrate_vma_setup`.
    ///
    /// # Errors
    /// `EINVAL` for an empty range, a range not inside one VMA, or a hugetlb/IO/PFNMAP/MIXEDMAP VMA.
    pub async fn migrate_vma_setup(&self, m: &mut MigrateVma) -> Result<(), Errno> {
        let n = usize::try_from((m.end.raw().saturating_sub(m.start.raw())) / PAGE_SIZE)
            .map_err(|_| Errno::EINVAL)?;
        if n == 0 || !m.start.is_page_aligned() {
            return Err(Errno::EINVAL);
        }
        let vma = self
            .mms()
            .mm(m.pid)
            .vma(m.start)
            .cloned()
            .ok_or(Errno::EINVAL)?;
        if vma.flags.intersects(
            VmFlags::HUGETLB | VmFlags::IO | VmFlags::PFNMAP | VmFlags::MIXEDMAP | VmFlags::DAX,
        ) || m.end > vma.range.end
        {
            return Err(Errno::EINVAL);
        }
        m.src = vec![0; n];
        m.dst = vec![0; n];
        m.cpages = 0;
        let range = Range::new(m.start, m.end);
        self.invalidate_range_start(m.pid, range, NotifierEvent::Migrate, m.event_owner)
            .await;
        {
            let mut st = self.mms();
            let mut phys = self.phys();
            let anon = vma.is_anonymous();
            let start = m.start;
            let index =
                |va: Va| usize::try_from((va.raw() - start.raw()) / PAGE_SIZE).expect("in range");
            // migrate_vma_collect_hole: an unmapped page of an anonymous VMA migrates as a fresh page.
            let holes = |m: &mut MigrateVma, from: usize, to: usize| {
                if anon {
                    for s in &mut m.src[from..to] {
                        *s = MIGRATE_PFN_MIGRATE;
                    }
                    m.cpages += (to - from) as u64;
                }
            };
            // The one walker: leaves in address order, holes between them.
            let mut cur = st.mm_mut(m.pid).pt_mut().cursor_mut(range);
            let mut next = 0;
            while let Some(leaf) = cur.find_next() {
                let i = index(leaf.base.max(m.start));
                holes(m, next, i);
                next = i + 1;
                if leaf.size != PageSize::Size4K {
                    // A whole PMD-mapped anonymous THP inside the range, with SELECT_COMPOUND: one compound
                    // entry.
                    if m.flags & MIGRATE_VMA_SELECT_COMPOUND != 0
                        && m.flags & MIGRATE_VMA_SELECT_SYSTEM != 0
                        && leaf.size == PageSize::Size2M
                        && leaf.base >= m.start
                        && i + 512 <= n
                        && let Pte::Present {
                            frame,
                            write,
                            special: false,
                        } = leaf.pte
                        && matches!(phys.kind(frame), MemoryKind::Ram { .. })
                        && (0..512).all(|k| {
                            let f = phys.frame(FrameId(frame.0 + k));
                            // Mapped only here: a THP shared after fork is split and migrated page by page,
                            // so try_to_migrate reaches its other mappings (a simplification of compound rmap).
                            f.owner() == FrameOwner::Anon
                                && !f.maybe_dma_pinned()
                                && f.mapcount == 1
                        })
                    {
                        cur.set(Pte::Migration { frame, write });
                        m.src[i] = migrate_pfn(frame)
                            | MIGRATE_PFN_MIGRATE
                            | MIGRATE_PFN_COMPOUND
                            | if write { MIGRATE_PFN_WRITE } else { 0 };
                        m.cpages += 512;
                        next = i + 512;
                        continue;
                    }
                    if leaf.size == PageSize::Size2M {
                        // split_huge_pmd, then the walk visits its base pages.
                        cur.split();
                        next = i;
                    } else {
                        // A 1 GiB leaf (hugetlb, refused above): nothing to collect.
                        next = index(Va::from_raw(leaf.base.raw() + leaf.size.bytes()).min(m.end));
                    }
                    continue;
                }
                let (frame, write, private) = match leaf.pte {
                    Pte::Present {
                        frame,
                        write,
                        special: false,
                    } => (frame, write, false),
                    Pte::DevicePrivate { frame, write } => (frame, write, true),
                    _ => continue,
                };
                if frame == phys.zero_page() {
                    if m.flags & MIGRATE_VMA_SELECT_SYSTEM != 0 && anon {
                        m.src[i] = MIGRATE_PFN_MIGRATE;
                        m.cpages += 1;
                    }
                    continue;
                }
                let selected = match phys.kind(frame) {
                    MemoryKind::Ram { .. } => m.flags & MIGRATE_VMA_SELECT_SYSTEM != 0,
                    MemoryKind::DevicePrivate { owner } => {
                        private
                            && m.pgmap_owner == Some(owner)
                            && m.flags & MIGRATE_VMA_SELECT_DEVICE_PRIVATE != 0
                    }
                    MemoryKind::DeviceCoherent { owner } => {
                        m.pgmap_owner == Some(owner)
                            && m.flags & MIGRATE_VMA_SELECT_DEVICE_COHERENT != 0
                    }
                    // P2P memory never migrates (it is a BAR, not memory the kernel can move).
                    MemoryKind::FsDax { .. } | MemoryKind::P2pMem { .. } => false,
                };
                let fr = phys.frame(frame);
                // Only anonymous pages move; pinned pages stay (the refcount check of migrate_vma_unmap); a page
                // a device-range migration holds locked is skipped (the trylock of migrate_vma_collect_pmd).
                let pinned = fr.maybe_dma_pinned()
                    && !peerdma_core::mutation::active(
                        peerdma_core::mutation::Mutation::SkipPinCheckMigrate,
                    );
                if !selected || fr.owner() != FrameOwner::Anon || pinned || fr.locked {
                    continue;
                }
                // folio_get + folio_trylock: the page stays locked and referenced until finalize (or until
                // the reference check below gives it back).
                phys.get(frame);
                phys.frame_mut(frame).locked = true;
                cur.set(Pte::Migration { frame, write });
                m.src[i] = migrate_pfn(frame)
                    | MIGRATE_PFN_MIGRATE
                    | if write { MIGRATE_PFN_WRITE } else { 0 };
                m.cpages += 1;
            }
            holes(m, next, n);
        }
        self.invalidate_range_end(m.pid);
        // migrate_vma_unmap: the pages' other mappings (other processes after fork) become migration entries
        // too, each under its own CLEAR invalidation; what cannot be fully unmapped, or holds extra references,
        // is restored everywhere and dropped from the migration.
        let mut taken: Vec<FrameId> = m
            .src
            .iter()
            .filter(|&&s| s & MIGRATE_PFN_COMPOUND == 0)
            .filter_map(|&s| migrate_pfn_to_frame(s))
            .collect();
        taken.sort_unstable();
        taken.dedup();
        let walk = self.try_to_migrate(&taken).await;
        let restored = {
            let mut st = self.mms();
            let mut phys = self.phys();
            migrate_unmap_check(&mut st, &mut phys, &mut m.src, &taken, walk)
        };
        if restored > 0 {
            m.cpages -= restored as u64;
            self.migration_wq().wake_up_all();
        }
        Ok(())
    }

    /// Step 3: `migrate_vma_pages`.
    ///
    /// An entry with no source page (a hole or the zero page) gets its new page inserted into the CPU page
    /// table here (`migrate_vma_insert_page`), not by finalize's `remove_migration_ptes`: collection left no
    /// migration entry there, so a mirror may have mapped the hole's zero page since setup's invalidation
    /// ended. As `__migrate_device_pages` (mm/migrate_device.c) does, the first such entry opens one
    /// MMU_NOTIFY_MIGRATE invalidation (with the migration's owner) from its address to the end of the
    /// range, closed after the last insertion.
    pub async fn migrate_vma_pages(&self, m: &mut MigrateVma) {
        let first_hole = (0..m.src.len()).find(|&i| {
            m.src[i] & MIGRATE_PFN_MIGRATE != 0
                && m.src[i] & MIGRATE_PFN_VALID == 0
                && migrate_pfn_to_frame(m.dst[i]).is_some()
        });
        let notified = match first_hole {
            Some(i) if self.mms().mm(m.pid).vma(m.start).is_some() => {
                let range = Range::new(m.va(i), m.end);
                self.invalidate_range_start(m.pid, range, NotifierEvent::Migrate, m.event_owner)
                    .await;
                true
            }
            _ => false,
        };
        self.migrate_vma_insert_pages(m);
        if notified {
            self.invalidate_range_end(m.pid);
        }
    }

    /// The loop of `migrate_vma_pages` without the notifier: declines entries with no destination, inserts
    /// the new pages of holes and zero pages (`migrate_vma_insert_page`).
    fn migrate_vma_insert_pages(&self, m: &mut MigrateVma) {
        let mut st = self.mms();
        let mut phys = self.phys();
        let Some(vma) = st.mm(m.pid).vma(m.start).cloned() else {
            return;
        };
        for i in 0..m.src.len() {
            if m.src[i] & MIGRATE_PFN_MIGRATE == 0 {
                continue;
            }
            let Some(dst) = migrate_pfn_to_frame(m.dst[i]) else {
                m.src[i] &= !MIGRATE_PFN_MIGRATE;
                continue;
            };
            if m.src[i] & MIGRATE_PFN_VALID != 0 {
                continue;
            }
            // No source page (hole or zero page): migrate_vma_insert_page, anonymous VMAs only.
            let va = m.va(i);
            let zero = phys.zero_page();
            let ok = vma.is_anonymous()
                && match st.mm(m.pid).pt().lookup(va) {
                    None => true,
                    Some(l) => {
                        l.pte
                            == Pte::Present {
                                frame: zero,
                                write: false,
                                special: false,
                            }
                    }
                };
            if !ok {
                m.src[i] &= !MIGRATE_PFN_MIGRATE;
                continue;
            }
            let write = vma.flags.contains(VmFlags::WRITE);
            let pte = mapping_entry(phys.kind(dst), dst, write);
            st.mm_mut(m.pid).pt_mut().set_pte(va, pte);
            let d = phys.frame_mut(dst);
            d.mapcount = 1;
            // migrate_vma_insert_page: folio_add_new_anon_rmap in the range's VMA.
            d.set_anon_vma(m.pid);
            m.dst[i] |= DST_CONSUMED;
        }
    }

    /// Step 4: `migrate_vma_finalize`.
    pub fn migrate_vma_finalize(&self, m: &mut MigrateVma) {
        {
            let mut st = self.mms();
            let mut phys = self.phys();
            let mut swap = self.swap();
            let mut src_pfns = Vec::new();
            let mut dst_pfns = Vec::new();
            for i in 0..m.src.len() {
                let dst = migrate_pfn_to_frame(m.dst[i]);
                let consumed = m.dst[i] & DST_CONSUMED != 0;
                let Some(src) = migrate_pfn_to_frame(m.src[i]) else {
                    // No source page: the destination was installed by migrate_vma_pages, or is unused.
                    if let (Some(d), false) = (dst, consumed) {
                        phys.put(d);
                    }
                    continue;
                };
                let va = m.va(i);
                let migrated = m.src[i] & MIGRATE_PFN_MIGRATE != 0 && dst.is_some();
                if m.src[i] & MIGRATE_PFN_COMPOUND != 0 {
                    // A compound entry: the destination must be compound too (a declined one restores the THP).
                    let to = dst.filter(|_| migrated && m.dst[i] & MIGRATE_PFN_COMPOUND != 0);
                    let (frame, write) = if let Some(d) = to {
                        (d, m.dst[i] & MIGRATE_PFN_WRITE != 0)
                    } else {
                        if let Some(d) = dst {
                            for k in 0..512 {
                                phys.put(FrameId(d.0 + k));
                            }
                        }
                        (src, m.src[i] & MIGRATE_PFN_WRITE != 0)
                    };
                    let pte = mapping_entry(phys.kind(frame), frame, write);
                    st.mm_mut(m.pid).pt_mut().set_pmd(va, pte);
                    if to.is_some() {
                        for k in 0..512 {
                            // folio_migrate_mapping: the destination takes the source's anon_vma.
                            let anon_vma = phys.frame(FrameId(src.0 + k)).anon_vma();
                            let d = phys.frame_mut(FrameId(frame.0 + k));
                            d.mapcount = 1;
                            if let Some(a) = anon_vma {
                                d.set_anon_vma(a);
                            }
                            phys.put(FrameId(src.0 + k));
                        }
                    }
                    continue;
                }
                // A base page: every mapping that holds a migration entry for it, in this range or found by
                // try_to_migrate, is finalized below through the rmap walk.
                // A declined or failed one gets its source back there and its destination freed.
                src_pfns.push(m.src[i]);
                dst_pfns.push(m.dst[i]);
            }
            remove_migration_ptes(&mut st, &mut phys, &mut swap, &src_pfns, &dst_pfns);
        }
        let moved = m
            .src
            .iter()
            .zip(&m.dst)
            .filter(|(s, d)| **s & MIGRATE_PFN_MIGRATE != 0 && **d != 0)
            .count();
        self.sim.count("migrate.pages", moved as u64);
        self.migration_wq().wake_up_all();
    }
}

/// One mapping of a page the migration walk found: its migration entry (address space, address, write bit),
/// or `None` for a mapping that is not a 4 KiB migration entry.
type MigrationEntry = (FrameId, Option<(Pid, Va, bool)>);

/// The entries of `f` in `entries` (sorted by frame, stably: walk order within a frame).
fn entries_of(entries: &[MigrationEntry], f: FrameId) -> &[MigrationEntry] {
    let lo = entries.partition_point(|e| e.0 < f);
    let hi = lo + entries[lo..].partition_point(|e| e.0 == f);
    &entries[lo..hi]
}

/// The reference check of `migrate_device_unmap` (mm/migrate_device.c) after [`Kernel::try_to_migrate`], for
/// the entries of `src_pfns` whose page is in `taken` (sorted; locked, with one reference of the caller's): a page
/// still mapped somewhere other than by a migration entry, or with references beyond its migration entries
/// and the caller's — a pin (`maybe_dma_pinned`), a GUP reference — cannot migrate. Its migration entries are
/// restored everywhere (`remove_migration_ptes(src, src)`), it is unlocked, the caller's reference is dropped
/// and its entry becomes 0. Returns the number of pages restored; the caller wakes the migration wait queue.
/// `walk` is the rmap walk of `taken` when the caller already has it for the current state
/// ([`Kernel::try_to_migrate`] that changed nothing); `None` walks here.
pub(crate) fn migrate_unmap_check(
    st: &mut Mms,
    phys: &mut PhysMem,
    src_pfns: &mut [u64],
    taken: &[FrameId],
    walk: Option<Vec<Mapping>>,
) -> usize {
    // Each page's migration entries (in walk order) and whether it is still mapped otherwise: one sorted
    // vector, no per-page allocation.
    let walk = walk.unwrap_or_else(|| st.rmap_walk(phys, taken.iter().copied()));
    let mut entries: Vec<MigrationEntry> = walk
        .into_iter()
        .map(|m| match m.leaf.pte {
            Pte::Migration { write, .. } if m.leaf.size == PageSize::Size4K => {
                (m.frame, Some((m.pid, m.va, write)))
            }
            _ => (m.frame, None),
        })
        .collect();
    entries.sort_by_key(|e| e.0);
    let mut restored = 0;
    for s in src_pfns.iter_mut() {
        let Some(f) = migrate_pfn_to_frame(*s).filter(|f| taken.binary_search(f).is_ok()) else {
            continue;
        };
        let mine = entries_of(&entries, f);
        let still_mapped = mine.iter().any(|e| e.1.is_none());
        let expected = u32::try_from(mine.len()).expect("mappings fit u32") + 1;
        let skip_pin_check =
            peerdma_core::mutation::active(peerdma_core::mutation::Mutation::SkipPinCheckMigrate);
        if !still_mapped && (phys.frame(f).refcount == expected || skip_pin_check) {
            continue;
        }
        let kind = phys.kind(f);
        for &(pid, va, write) in mine.iter().filter_map(|e| e.1.as_ref()) {
            st.mm_mut(pid)
                .pt_mut()
                .set_pte(va, mapping_entry(kind, f, write));
        }
        phys.frame_mut(f).locked = false;
        phys.put(f);
        *s = 0;
        restored += 1;
    }
    restored
}

/// `remove_migration_ptes` for every entry of `src_pfns` (step 5 of the module docs, shared with
/// `migrate_vma_finalize`): each source page's migration entries, wherever the rmap walk finds them, get the
/// destination (where the entry migrated: VALID, MIGRATE and a destination) or the source back, each with its
/// own write bit; mapcount and refcount move with each mapping. The destination's allocation reference is
/// dropped (an unused destination is freed), the source is unlocked and the caller's reference on it dropped
/// (the last one frees it: `page_free`). Entries without a source page only drop their destination. Returns
/// the number of pages migrated; the caller counts them and wakes the migration wait queue.
pub(crate) fn remove_migration_ptes(
    st: &mut Mms,
    phys: &mut PhysMem,
    swap: &mut Swap,
    src_pfns: &[u64],
    dst_pfns: &[u64],
) -> u64 {
    let mut moved = 0u64;
    let sources = src_pfns.iter().filter_map(|&s| migrate_pfn_to_frame(s));
    // Each source's migration entries, in walk order: one sorted vector, no per-page allocation.
    let mut entries: Vec<MigrationEntry> = st
        .rmap_walk(phys, sources)
        .into_iter()
        .filter_map(|m| match m.leaf.pte {
            Pte::Migration { write, .. } if m.leaf.size == PageSize::Size4K => {
                Some((m.frame, Some((m.pid, m.va, write))))
            }
            _ => None,
        })
        .collect();
    entries.sort_by_key(|e| e.0);
    for (&s, &d) in src_pfns.iter().zip(dst_pfns) {
        let dst = migrate_pfn_to_frame(d);
        let Some(src) = migrate_pfn_to_frame(s) else {
            if let Some(d) = dst {
                phys.put(d);
            }
            continue;
        };
        let migrated = s & (MIGRATE_PFN_VALID | MIGRATE_PFN_MIGRATE)
            == MIGRATE_PFN_VALID | MIGRATE_PFN_MIGRATE
            && dst.is_some();
        let to = if migrated {
            dst.expect("migrated")
        } else {
            src
        };
        let kind = phys.kind(to);
        if migrated && let Some(a) = phys.frame(src).anon_vma() {
            // folio_migrate_mapping: the destination takes the source's anon_vma.
            phys.frame_mut(to).set_anon_vma(a);
        }
        for &(pid, va, write) in entries_of(&entries, src)
            .iter()
            .filter_map(|e| e.1.as_ref())
        {
            st.mm_mut(pid)
                .pt_mut()
                .set_pte(va, mapping_entry(kind, to, write));
            if migrated {
                // The mapping's reference moves from the old page to the new one.
                phys.get(to);
                phys.frame_mut(to).mapcount += 1;
                let fr = phys.frame_mut(src);
                fr.mapcount = fr.mapcount.saturating_sub(1);
                phys.put(src);
            }
        }
        if let Some(d) = dst {
            if migrated
                && phys.frame(d).mapcount > 0
                && matches!(phys.kind(d), MemoryKind::Ram { .. })
            {
                swap.lru_add_new_anon(phys, d);
            }
            // The caller's allocation reference; an unused destination is freed.
            phys.put(d);
        }
        phys.frame_mut(src).locked = false;
        // The caller's reference on the source: the last one frees the page (page_free).
        phys.put(src);
        if migrated {
            moved += 1;
        }
    }
    moved
}
