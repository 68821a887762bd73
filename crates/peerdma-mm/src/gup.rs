//! GUP: `get_user_pages` / `pin_user_pages` — taking references on the pages behind a user virtual range.
//!
//! Linux counterpart: mm/gup.c (about v6.16), spec/linux-p2p.md §2. In order:
//! 1. Argument validation (`is_valid_gup_args`, §2.2): internal flags, GET with PIN, LONGTERM without PIN,
//!    neither GET nor PIN, LONGTERM with PCI_P2PDMA — each `EINVAL`.
//! 2. Per VMA (`check_vma_flags`, §2.3): VM_IO/VM_PFNMAP (memory without `struct page`: the 2016 problem),
//!    FOLL_ANON on a non-anonymous VMA, a write without VM_WRITE (unless FORCE on a private mapping), a read
//!    without VM_READ, a long-term writable pin of a dirty-tracked file mapping — `EFAULT`.
//! 3. Per page: fault it in (write-faulting for FOLL_WRITE; a device-private page migrates back to RAM
//!    through the CPU fault path), then grab (`try_grab_folio`, §2.4): refcount 0 is `ENOMEM`, a P2PDMA page
//!    without FOLL_PCI_P2PDMA is `EREMOTEIO`, GET adds 1 to the refcount, PIN adds
//!    [`GUP_PIN_COUNTING_BIAS`] (never for the zero page).
//! 4. FOLL_LONGTERM (`__gup_longterm_locked`, §2.4), as numbered steps:
//!    1. The whole call runs inside a `memalloc_pin_save` scope on the address space
//!       (`AddressSpace::memalloc_pin`, [`Kernel::memalloc_pin_depth`], include/linux/sched/mm.h): pages
//!       it faults in avoid movable memory from the start.
//!    2. Pin the range (steps 1–3 above).
//!    3. `collect_longterm_unpinnable_folios` (mm/gup.c): the pages that are not long-term pinnable
//!       ([`folio_is_longterm_pinnable`]): device-coherent pages and pages in movable memory
//!       (ZONE_MOVABLE, [`crate::phys::PhysMem::is_zone_movable_page`]). None: done.
//!    4. `migrate_longterm_unpinnable_folios` (mm/gup.c): every pin is released; each device-coherent page
//!       is migrated to RAM on its own (`migrate_device_coherent_folio`; failure is `EBUSY`); each movable
//!       page is migrated to a page outside movable memory (`migrate_pages(MR_LONGTERM_PIN)`; the model
//!       reuses `migrate_vma` with MIGRATE_VMA_SELECT_SYSTEM, so the pinning address space's mirrors see a
//!       MIGRATE invalidation with no owner and every other mapping's a CLEAR one; Linux's `try_to_migrate`
//!       fires CLEAR for all of them). Every destination is allocated with [`GfpZone::Normal`] (`GFP_USER`
//!       under the pin scope: never a movable node). A page that cannot be moved — no page outside movable
//!       memory free, the page pinned or locked by someone else — makes the call `ENOMEM` with nothing
//!       pinned (pages already moved stay moved, as in Linux). Counters: `gup.longterm_migrations` (one
//!       per round that migrated) and `gup.longterm_migrated_pages`.
//!    5. Go back to step 2: the whole range is pinned again from scratch (Linux's `-EAGAIN`).
//!
//!    Short-term pins (no FOLL_LONGTERM) leave pages in movable memory where they are.
//! 5. A hole after the first page ends the walk early: the result holds fewer pages than asked (Linux's
//!    partial return); a failure on the first page is the errno.
//!
//! Time: after step 3, the call spends `dma.pin_page` ([`crate::MmCosts::pin_page`]) per page taken, GET or
//! PIN, holding `mmap_lock` for reading; faults it triggers cost what faults cost. A FOLL_LONGTERM retry
//! (step 4.5) pays again.
//!
//! Pins are values: dropping a [`PinnedPages`] releases every reference it holds (`unpin_user_pages`).

use std::fmt;
use std::rc::Rc;

use bitflags::bitflags;
use peerdma_core::{Errno, FrameId, PAGE_SIZE, Pa, Pid, Range, Va};

use crate::kernel::Kernel;
use crate::migrate::{
    MIGRATE_PFN_MIGRATE, MIGRATE_PFN_WRITE, MIGRATE_VMA_SELECT_DEVICE_COHERENT,
    MIGRATE_VMA_SELECT_SYSTEM, MigrateVma, migrate_pfn, migrate_pfn_to_frame,
};
use crate::phys::{GUP_PIN_COUNTING_BIAS, GfpZone, MemoryKind};
use crate::vma::{VmFlags, VmaBacking};

bitflags! {
    /// `FOLL_*` flags (include/linux/mm_types.h).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct GupFlags: u32 {
        /// FOLL_WRITE: write intent.
        const WRITE = 1 << 0;
        /// FOLL_GET: a plain reference.
        const GET = 1 << 1;
        /// FOLL_PIN: a DMA pin (set by the `pin_*` entry points).
        const PIN = 1 << 2;
        /// FOLL_LONGTERM: the pin may be held indefinitely.
        const LONGTERM = 1 << 3;
        /// FOLL_PCI_P2PDMA: the caller accepts P2PDMA pages.
        const PCI_P2PDMA = 1 << 4;
        /// FOLL_FORCE: write read-only private COW mappings (ptrace).
        const FORCE = 1 << 5;
        /// FOLL_NOFAULT: never fault.
        const NOFAULT = 1 << 6;
        /// FOLL_ANON: anonymous VMAs only.
        const ANON = 1 << 7;
        /// FOLL_TOUCH (internal only).
        const TOUCH = 1 << 16;
        /// FOLL_TRIED (internal only).
        const TRIED = 1 << 17;
        /// FOLL_REMOTE (internal only).
        const REMOTE = 1 << 18;
    }
}

impl GupFlags {
    /// Flags only mm/gup.c itself may set.
    pub const INTERNAL: GupFlags = GupFlags::TOUCH
        .union(GupFlags::TRIED)
        .union(GupFlags::REMOTE);
}

/// One page a GUP took: what a DMA mapping needs of it ([`PinnedPages::pages`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PinnedPage {
    /// The frame.
    pub frame: FrameId,
    /// Its CPU physical address.
    pub pa: Pa,
    /// The memory it is.
    pub kind: MemoryKind,
}

/// References taken by GUP. Dropping it releases them (`put_page` / `unpin_user_page`).
pub struct PinnedPages {
    kernel: Rc<Kernel>,
    frames: Vec<FrameId>,
    pin: bool,
    /// Why the walk stopped before the last page asked for (a partial result).
    stopped_by: Option<Errno>,
}

impl fmt::Debug for PinnedPages {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinnedPages")
            .field("frames", &self.frames)
            .field("pin", &self.pin)
            .field("stopped_by", &self.stopped_by)
            .finish_non_exhaustive()
    }
}

impl PinnedPages {
    /// Returns the frames, one per page taken (possibly fewer than asked: a partial result).
    pub fn frames(&self) -> &[FrameId] {
        &self.frames
    }

    /// Returns what a DMA mapping needs of each page taken, in order: its frame, its CPU physical address
    /// and the kind of memory it is (the driver's `page_to_phys` / `is_pci_p2pdma_page` questions, answered
    /// once here).
    pub fn pages(&self) -> Vec<PinnedPage> {
        let phys = self.kernel.phys();
        self.frames
            .iter()
            .map(|&frame| PinnedPage {
                frame,
                pa: phys.frame_pa(frame),
                kind: phys.kind(frame),
            })
            .collect()
    }

    /// Returns, for a partial result, the errno of the first page the walk could not take (what a second
    /// GUP starting at that page would return, without making one); `None` when every page was taken.
    pub fn stopped_by(&self) -> Option<Errno> {
        self.stopped_by
    }

    /// Returns whether these are pins (FOLL_PIN) rather than plain references (FOLL_GET).
    pub fn is_pin(&self) -> bool {
        self.pin
    }

    /// Returns the number of pages taken.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// Returns whether no page was taken.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }
}

impl Drop for PinnedPages {
    fn drop(&mut self) {
        release(&self.kernel, &self.frames, self.pin);
        self.kernel.pin_wq().wake_up_all();
    }
}

fn release(kernel: &Kernel, frames: &[FrameId], pin: bool) {
    let mut phys = kernel.phys();
    let zero = phys.zero_page();
    for &f in frames {
        if f == zero {
            continue;
        }
        if pin {
            phys.frame_mut(f).refcount -= GUP_PIN_COUNTING_BIAS - 1;
        }
        phys.put(f);
    }
}

/// Returns whether a folio of memory `kind`, in ZONE_MOVABLE or not (`in_zone_movable`, a movable RAM node:
/// [`crate::phys::PhysMem::is_zone_movable_page`]), may be pinned with FOLL_LONGTERM where it is
/// (`folio_is_longterm_pinnable`, include/linux/mm.h, v6.13+, spec §2.4 table). The model has no CMA, so:
/// - the zero page: yes;
/// - device-coherent memory: no ("must always allow eviction"; long-term GUP migrates it to RAM first);
/// - fsdax: no (truncate and hole-punch must complete);
/// - RAM in ZONE_MOVABLE: no (the zone must stay migratable; long-term GUP migrates the page out first);
/// - other RAM: yes;
/// - P2P memory: yes — its long-term exclusion is the argument check (LONGTERM with PCI_P2PDMA is `EINVAL`);
/// - device-private memory: yes, as in Linux (ZONE_DEVICE, not movable, neither coherent nor fsdax). GUP never
///   holds such a folio anyway: the walk faults a device-private entry back to RAM before grabbing it.
pub fn folio_is_longterm_pinnable(
    kind: MemoryKind,
    is_zero_page: bool,
    in_zone_movable: bool,
) -> bool {
    if is_zero_page {
        return true;
    }
    match kind {
        MemoryKind::DeviceCoherent { .. } | MemoryKind::FsDax { .. } => false,
        MemoryKind::Ram { .. } => !in_zone_movable,
        MemoryKind::P2pMem { .. } | MemoryKind::DevicePrivate { .. } => true,
    }
}

/// A `memalloc_pin_save` scope on one address space (include/linux/sched/mm.h): while it lives, the address
/// space's anonymous allocations avoid movable memory; dropping it is `memalloc_pin_restore`.
struct MemallocPinScope {
    kernel: Rc<Kernel>,
    pid: Pid,
}

impl MemallocPinScope {
    fn save(kernel: &Rc<Kernel>, pid: Pid) -> Self {
        kernel.mms().mm_mut(pid).memalloc_pin_save();
        Self {
            kernel: kernel.clone(),
            pid,
        }
    }
}

impl Drop for MemallocPinScope {
    fn drop(&mut self) {
        let mut st = self.kernel.mms();
        if let Some(mm) = st.get_mut(self.pid) {
            mm.memalloc_pin_restore();
        }
    }
}

/// `is_valid_gup_args`.
fn check_args(flags: GupFlags) -> Result<(), Errno> {
    let bad = flags.intersects(GupFlags::INTERNAL)
        || flags.contains(GupFlags::GET | GupFlags::PIN)
        || (flags.contains(GupFlags::LONGTERM) && !flags.contains(GupFlags::PIN))
        || !flags.intersects(GupFlags::GET | GupFlags::PIN)
        || flags.contains(GupFlags::LONGTERM | GupFlags::PCI_P2PDMA);
    if bad { Err(Errno::EINVAL) } else { Ok(()) }
}

impl Kernel {
    /// `get_user_pages` (flags must hold GET) or `pin_user_pages` (PIN) over `nr_pages` pages at `start` of
    /// `pid`. Takes `mmap_lock` for reading itself (the `_unlocked` variants).
    ///
    /// # Errors
    /// The errno of the first page's failure (see the module docs); a later failure ends the walk early.
    pub async fn get_user_pages(
        self: &Rc<Self>,
        pid: Pid,
        start: Va,
        nr_pages: u64,
        flags: GupFlags,
    ) -> Result<PinnedPages, Errno> {
        check_args(flags)?;
        if nr_pages == 0 || !start.is_page_aligned() {
            return Err(Errno::EINVAL);
        }
        let range = Range::from_len(start, nr_pages.checked_mul(PAGE_SIZE).ok_or(Errno::EINVAL)?)
            .ok_or(Errno::EINVAL)?;
        let lock = self.mmap_lock(pid);
        let _g = lock.read().await;
        let _pin_scope = flags
            .contains(GupFlags::LONGTERM)
            .then(|| MemallocPinScope::save(self, pid));
        loop {
            let (frames, stopped_by) = self.grab_range(pid, range, flags).await?;
            // The walk and the refcount update of every page taken (`dma.pin_page`), under mmap_lock.
            self.spend(self.costs.pin_page.saturating_mul(frames.len() as u64))
                .await;
            let pin = flags.contains(GupFlags::PIN);
            if !flags.contains(GupFlags::LONGTERM) {
                return Ok(PinnedPages {
                    kernel: self.clone(),
                    frames,
                    pin,
                    stopped_by,
                });
            }
            // collect_longterm_unpinnable_folios: device-coherent memory must stay evictable, ZONE_MOVABLE
            // migratable.
            let unpinnable: Vec<(usize, FrameId)> = {
                let phys = self.phys();
                let zero = phys.zero_page();
                frames
                    .iter()
                    .copied()
                    .enumerate()
                    .filter(|&(_, f)| {
                        !folio_is_longterm_pinnable(
                            phys.kind(f),
                            f == zero,
                            phys.is_zone_movable_page(f),
                        )
                    })
                    .collect()
            };
            if unpinnable.is_empty() {
                return Ok(PinnedPages {
                    kernel: self.clone(),
                    frames,
                    pin,
                    stopped_by,
                });
            }
            release(self, &frames, pin);
            self.pin_wq().wake_up_all();
            // migrate_longterm_unpinnable_folios: device-coherent folios one by one
            // (migrate_device_coherent_folio), movable RAM through migrate_pages, whose failure is ENOMEM.
            // (fsdax, the only other kind, never gets here: its VMA is refused with EOPNOTSUPP first.)
            if unpinnable.iter().any(|&(_, f)| {
                !matches!(
                    self.memory_kind(f),
                    MemoryKind::DeviceCoherent { .. } | MemoryKind::Ram { .. }
                )
            }) {
                return Err(Errno::ENOMEM);
            }
            let nr = unpinnable.len() as u64;
            for (i, f) in unpinnable {
                let va = range.start.add(i as u64 * PAGE_SIZE);
                if matches!(self.memory_kind(f), MemoryKind::DeviceCoherent { .. }) {
                    self.migrate_device_coherent_page(pid, va, f).await?;
                } else {
                    self.migrate_longterm_movable_page(pid, va, f).await?;
                }
            }
            self.sim.count("gup.longterm_migrations", 1);
            self.sim.count("gup.longterm_migrated_pages", nr);
        }
    }

    /// Walks `range` taking one reference (or pin) per page; returns the frames taken and, when it stopped
    /// early, the errno of the page it could not take.
    async fn grab_range(
        &self,
        pid: Pid,
        range: Range<Va>,
        flags: GupFlags,
    ) -> Result<(Vec<FrameId>, Option<Errno>), Errno> {
        let write = flags.contains(GupFlags::WRITE);
        let mut frames = Vec::new();
        for va in range.pages() {
            let r = self.grab_page(pid, va, flags, write).await;
            match r {
                Ok(f) => frames.push(f),
                Err(e) if frames.is_empty() => return Err(e),
                Err(e) => return Ok((frames, Some(e))),
            }
        }
        Ok((frames, None))
    }

    /// `get_user_page_vma_remote(mm, addr, FOLL_GET | FOLL_WRITE, ..)` for one page, the caller holding
    /// `mmap_lock`: one reference on the page at `va`, faulted in writable, with GUP's per-VMA and per-page
    /// checks (what `make_device_exclusive` takes the page with). The caller drops the reference.
    ///
    /// # Errors
    /// GUP's errno (`EFAULT`, `EREMOTEIO`, ...).
    pub(crate) async fn get_user_page_write(&self, pid: Pid, va: Va) -> Result<FrameId, Errno> {
        self.grab_page(pid, va, GupFlags::GET, true).await
    }

    async fn grab_page(
        &self,
        pid: Pid,
        va: Va,
        flags: GupFlags,
        write: bool,
    ) -> Result<FrameId, Errno> {
        let vma = self.mms().mm(pid).vma(va).cloned().ok_or(Errno::EFAULT)?;
        // check_vma_flags (§2.3).
        if vma.flags.intersects(VmFlags::IO | VmFlags::PFNMAP) {
            return Err(Errno::EFAULT);
        }
        if flags.contains(GupFlags::ANON) && !vma.is_anonymous() {
            return Err(Errno::EFAULT);
        }
        // Filesystem truncate and hole-punch must be able to complete: no long-term pins of fsdax.
        if flags.contains(GupFlags::LONGTERM) && vma.flags.contains(VmFlags::DAX) {
            return Err(Errno::EOPNOTSUPP);
        }
        let private = !vma.is_shared();
        if write
            && !vma.flags.contains(VmFlags::WRITE)
            && !(flags.contains(GupFlags::FORCE) && private)
        {
            return Err(Errno::EFAULT);
        }
        if !write && !vma.flags.contains(VmFlags::READ) {
            return Err(Errno::EFAULT);
        }
        if write && flags.contains(GupFlags::PIN | GupFlags::LONGTERM) && vma.is_shared() {
            let dirty_tracked = match vma.backing {
                VmaBacking::File { file, .. } => !self.files().file(file).is_shmem(),
                _ => false,
            };
            if dirty_tracked {
                return Err(Errno::EFAULT);
            }
        }
        // FOLL_FORCE write to a read-only private mapping: break COW into an exclusive anonymous page that
        // stays read-only in the CPU page table (`can_follow_write_pte`).
        let force_cow = write && !vma.flags.contains(VmFlags::WRITE);
        // gup_must_unshare (mm/internal.h): a read-only PIN of a COW-shared anonymous page first unshares it
        // (FAULT_FLAG_UNSHARE), so the pinned page is exclusive and a later write reuses it. Since 6.2 a
        // read-only FOLL_LONGTERM pin in a COW mapping (`is_cow_mapping`: private and may-write — every
        // private mapping here, whatever its current protection) also unshares a page that is not anonymous:
        // the shared zero page or a page-cache page, so a later CPU write is seen through the pin.
        let unshare = flags.contains(GupFlags::PIN) && !write && vma.is_anonymous();
        let unshare_non_anon =
            flags.contains(GupFlags::PIN | GupFlags::LONGTERM) && !write && !vma.is_shared();
        loop {
            let hit = {
                let st = self.mms();
                let phys = self.phys();
                match st.mm(pid).translate(va) {
                    Some((frame, w, leaf)) => {
                        let f = leaf.frame_at(va).unwrap_or(frame);
                        let exclusive_anon = f != phys.zero_page()
                            && phys.frame(f).owner() == crate::phys::FrameOwner::Anon
                            && phys.frame(f).mapcount <= 1
                            && phys.frame(f).refcount % GUP_PIN_COUNTING_BIAS == 1;
                        let shared_anon = f != phys.zero_page()
                            && phys.frame(f).owner() == crate::phys::FrameOwner::Anon
                            && !exclusive_anon;
                        let not_anon = f == phys.zero_page()
                            || (phys.frame(f).owner() != crate::phys::FrameOwner::Anon
                                && matches!(phys.kind(f), MemoryKind::Ram { .. }));
                        let ok = (w || !write || (force_cow && exclusive_anon))
                            && !(unshare && shared_anon)
                            && !(unshare_non_anon && !w && not_anon);
                        ok.then_some(f)
                    }
                    None => None,
                }
            };
            if let Some(frame) = hit {
                let mut phys = self.phys();
                let zero = phys.zero_page();
                if frame != zero {
                    if phys.frame(frame).refcount == 0 {
                        return Err(Errno::ENOMEM);
                    }
                    // try_grab_folio: a P2PDMA page only for callers that accept it (spec §2.4 step 2).
                    if phys.is_p2pdma_page(frame) && !flags.contains(GupFlags::PCI_P2PDMA) {
                        return Err(Errno::EREMOTEIO);
                    }
                    let fr = phys.frame_mut(frame);
                    fr.refcount += if flags.contains(GupFlags::PIN) {
                        GUP_PIN_COUNTING_BIAS
                    } else {
                        1
                    };
                }
                return Ok(frame);
            }
            if flags.contains(GupFlags::NOFAULT) {
                return Err(Errno::EFAULT);
            }
            if force_cow
                || ((unshare || unshare_non_anon) && self.mms().mm(pid).translate(va).is_some())
            {
                self.handle_mm_fault(pid, va, false)
                    .await
                    .map_err(|_| Errno::EFAULT)?;
                let leaf = self.mms().mm(pid).pt().lookup(va).ok_or(Errno::EFAULT)?;
                self.do_wp_page(pid, &vma, va, leaf)
                    .await
                    .map_err(|_| Errno::EFAULT)?;
                self.note_anon_vma(pid, va);
                let mut st = self.mms();
                // The copy stays read-only: a FOLL_FORCE write leaves the entry as the mapping has it, and
                // an unshare never makes it writable (`wp_page_copy` / `wp_page_reuse` with
                // FAULT_FLAG_UNSHARE); a later CPU write reuses the now-exclusive page.
                if let Some(l) = st.mm(pid).pt().lookup(va) {
                    st.mm_mut(pid).pt_mut().set_pte(va, l.pte.with_write(false));
                }
                continue;
            }
            self.handle_mm_fault(pid, va, write)
                .await
                .map_err(|_| Errno::EFAULT)?;
        }
    }

    /// `migrate_device_coherent_folio`: moves one device-coherent page at `va` back to system RAM outside
    /// movable memory (`GFP_USER` under the pin scope: [`GfpZone::Normal`]), as long-term GUP does before
    /// pinning (the owner's mirrors are told through a MIGRATE invalidation with no owner). The caller holds
    /// `mmap_lock`.
    ///
    /// # Errors
    /// `EBUSY` when the page could not be migrated (a destination that cannot be allocated included: the
    /// source is then put back).
    pub async fn migrate_device_coherent_page(
        &self,
        pid: Pid,
        va: Va,
        frame: FrameId,
    ) -> Result<(), Errno> {
        let MemoryKind::DeviceCoherent { owner } = self.memory_kind(frame) else {
            return Ok(());
        };
        let page = Range::from_len(va, PAGE_SIZE).ok_or(Errno::EBUSY)?;
        let mut m = MigrateVma::new(pid, page, MIGRATE_VMA_SELECT_DEVICE_COHERENT, owner);
        m.event_owner = None;
        self.migrate_vma_setup(&mut m)
            .await
            .map_err(|_| Errno::EBUSY)?;
        if m.src[0] & MIGRATE_PFN_MIGRATE == 0 {
            return Err(Errno::EBUSY);
        }
        self.migrate_one_page_out_of(&mut m, pid)
            .await
            .then_some(())
            .ok_or(Errno::EBUSY)
    }

    /// The `migrate_pages(MR_LONGTERM_PIN)` step of `migrate_longterm_unpinnable_folios` (mm/gup.c) for one
    /// page: moves the anonymous page `frame` mapped at `va` out of movable memory, to a page allocated with
    /// [`GfpZone::Normal`] from `pid`'s home node's fallback order (`alloc_migration_target` with
    /// `GFP_USER`). Reuses `migrate_vma` (MIGRATE_VMA_SELECT_SYSTEM, no owner): the pinning address space's
    /// mirrors see a MIGRATE invalidation, other mappings' a CLEAR one. The caller holds `mmap_lock` and no
    /// pin of its own on the page.
    ///
    /// # Errors
    /// `ENOMEM` when the page could not be migrated: no page outside movable memory is free, or the page is
    /// pinned, locked by another migration or not anonymous. The source is left mapped where it was.
    pub async fn migrate_longterm_movable_page(
        &self,
        pid: Pid,
        va: Va,
        frame: FrameId,
    ) -> Result<(), Errno> {
        if !self.is_zone_movable_page(frame) {
            return Ok(());
        }
        let page = Range::from_len(va, PAGE_SIZE).ok_or(Errno::ENOMEM)?;
        let mut m = MigrateVma::without_owner(pid, page, MIGRATE_VMA_SELECT_SYSTEM);
        self.migrate_vma_setup(&mut m)
            .await
            .map_err(|_| Errno::ENOMEM)?;
        if m.src[0] & MIGRATE_PFN_MIGRATE == 0 || migrate_pfn_to_frame(m.src[0]) != Some(frame) {
            // Not collected (pinned, locked, not anonymous) or a different page by now: give back whatever
            // was collected.
            m.dst[0] = 0;
            self.migrate_vma_pages(&mut m).await;
            self.migrate_vma_finalize(&mut m);
            return Err(Errno::ENOMEM);
        }
        self.migrate_one_page_out_of(&mut m, pid)
            .await
            .then_some(())
            .ok_or(Errno::ENOMEM)
    }

    /// Allocates the destination of the one collected page of `m` outside movable memory, copies it and
    /// completes the migration; with no page to be had, declines it (the source is restored). Returns
    /// whether the page moved.
    async fn migrate_one_page_out_of(&self, m: &mut MigrateVma, pid: Pid) -> bool {
        let src = migrate_pfn_to_frame(m.src[0]);
        let dst = src.and_then(|_| self.alloc_ram_page_in(Some(pid), GfpZone::Normal));
        m.dst[0] = 0;
        if let (Some(src), Some(dst)) = (src, dst) {
            self.copy_page(src, dst);
            m.dst[0] = migrate_pfn(dst) | (m.src[0] & MIGRATE_PFN_WRITE);
        }
        let moved = m.dst[0] != 0;
        self.migrate_vma_pages(m).await;
        self.migrate_vma_finalize(m);
        moved
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// spec/linux-p2p.md §2.2, one row per check.
    #[test]
    fn argument_checks_follow_is_valid_gup_args() {
        let rows: &[(GupFlags, Result<(), Errno>)] = &[
            (GupFlags::GET, Ok(())),
            (GupFlags::PIN, Ok(())),
            (GupFlags::PIN | GupFlags::LONGTERM, Ok(())),
            (GupFlags::PIN | GupFlags::PCI_P2PDMA, Ok(())),
            (GupFlags::GET | GupFlags::TOUCH, Err(Errno::EINVAL)),
            (GupFlags::GET | GupFlags::PIN, Err(Errno::EINVAL)),
            (GupFlags::GET | GupFlags::LONGTERM, Err(Errno::EINVAL)),
            (GupFlags::WRITE, Err(Errno::EINVAL)),
            (
                GupFlags::PIN | GupFlags::LONGTERM | GupFlags::PCI_P2PDMA,
                Err(Errno::EINVAL),
            ),
        ];
        for (flags, want) in rows {
            assert_eq!(check_args(*flags), *want, "{flags:?}");
        }
    }
}
