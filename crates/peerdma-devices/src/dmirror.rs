//! `dmirror`, the Linux HMM test device (lib/test_hmm.c), as a device model.
//!
//! Each *open* of the device is a [`Dmirror`]: it binds to the opener's address space with an interval
//! notifier covering all of it, and keeps a "device page table" (`pt`) of frames tagged read, write or atomic,
//! holding **no page references** — coherence comes only from invalidation (spec/linux-hmm.md §2.2, §4).
//!
//! The fault protocol (`dmirror_range_fault`, spec §1.2) and the invalidate callback
//! (`dmirror_interval_invalidate`, spec §2.3) are the shared mirror loop of [`peerdma_dma::hmm_mirror`] (its
//! numbered steps); this module supplies the dmirror device side ([`MirrorDevice`]):
//! - fault: per 64-page chunk, with `dev_private_owner` = this device (its own device-private pages come
//!   back as they are); program `pt` from the pfns (`dmirror_do_fault`), the page-table writes' time spent
//!   after the driver lock drops; [`FaultInjection::SkipReadRetry`] programs despite a retry, and the oracle
//!   reports it;
//! - invalidate: ignore MIGRATE events this device owns (test_hmm.c's rule and its two races:
//!   [`DmirrorDevice::set_invalidate_own_migrations`]); erase the `pt` entries of the range —
//!   `[start >> 12, end >> 12]` inclusive, exactly as test_hmm.c's `xa_for_each_range` does, so one page past
//!   the range goes too; no fence (the model's device accesses are synchronous under the driver lock) and
//!   nothing to DMA-unmap (test_hmm.c's device reaches pages by PFN).
//!
//! Eviction (RELEASE, and full device memory during MIGRATE_TO_DEV) works by physical page, as
//! `dmirror_device_evict_chunk` does: `migrate_device_range` / `migrate_device_pfns`
//! ([`peerdma_mm::migrate_device`]) find every mapping of each device page in every process, so a page
//! shared by parent and child after `fork` moves to one system page mapped by both. The mirrors' entries go
//! through the walk's CLEAR invalidations; no mirror page table is edited directly.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::{Rc, Weak};

use peerdma_core::timing::{ParamSpec, Timing};
use peerdma_core::{
    DeviceId, Errno, FrameId, PAGE_SHIFT, PAGE_SIZE, PMD_SHIFT, PUD_SHIFT, Pid, Range, SimDuration,
    Va,
};
use peerdma_dma::DmaSpace;
use peerdma_dma::hmm_mirror::{
    HMM_RANGE_DEFAULT_TIMEOUT, HmmMirror, MirrorDevice, ProgramCost, lock_and_set_seq,
};
use peerdma_mm::hmm::{
    HMM_PFN_ERROR, HMM_PFN_VALID, HMM_PFN_WRITE, HmmRange, hmm_pfn_to_frame, hmm_pfn_to_map_order,
};
use peerdma_mm::migrate::{
    MIGRATE_PFN_COMPOUND, MIGRATE_PFN_MIGRATE, MIGRATE_PFN_VALID, MIGRATE_PFN_WRITE,
    MIGRATE_VMA_SELECT_COMPOUND, MIGRATE_VMA_SELECT_DEVICE_COHERENT,
    MIGRATE_VMA_SELECT_DEVICE_PRIVATE, MIGRATE_VMA_SELECT_SYSTEM, migrate_pfn,
    migrate_pfn_to_frame,
};
use peerdma_mm::{
    DeviceData, DeviceGrant, DevicePagemapOps, FrameTranslation, IntervalNotifierOps, Kernel,
    MemoryKind, MigrateVma, NotifierEvent, NotifierId, NotifierRange, VmFault, VmFlags, Vma,
};
use peerdma_sim::{SimMutex, TraceArg, Track};

/// A fault's result as a trace field: `ok` or the errno's name.
fn errno_arg(res: Result<(), Errno>) -> TraceArg {
    match res {
        Ok(()) => "ok".into(),
        Err(e) => e.name().into(),
    }
}

/// Pages per fault/snapshot chunk (test_hmm.c works in 64-page pieces).
pub const CHUNK_PAGES: u64 = 64;

/// Device pages evicted at once when device memory is full.
const EVICT_BATCH: usize = 32;

/// `HMM_RANGE_DEFAULT_TIMEOUT`: the retry loops (fault and snapshot) give up with `EBUSY` after this long.
pub const RANGE_TIMEOUT: SimDuration = HMM_RANGE_DEFAULT_TIMEOUT;

/// Snapshot byte values (`HMM_DMIRROR_PROT_*`, lib/test_hmm_uapi.h).
pub mod prot {
    /// The page cannot be accessed.
    pub const ERROR: u8 = 0xff;
    /// Not present.
    pub const NONE: u8 = 0x00;
    /// Readable.
    pub const READ: u8 = 0x01;
    /// Writable.
    pub const WRITE: u8 = 0x02;
    /// Mapped by a PMD leaf.
    pub const PMD: u8 = 0x04;
    /// Mapped by a PUD leaf.
    pub const PUD: u8 = 0x08;
    /// The shared zero page.
    pub const ZERO: u8 = 0x10;
    /// Device-private memory of this device.
    pub const DEV_PRIVATE_LOCAL: u8 = 0x20;
    /// Device-private memory of another device.
    pub const DEV_PRIVATE_REMOTE: u8 = 0x30;
    /// Device-coherent memory of this device.
    pub const DEV_COHERENT_LOCAL: u8 = 0x40;
    /// Device-coherent memory of another device.
    pub const DEV_COHERENT_REMOTE: u8 = 0x50;
}

/// Which ZONE_DEVICE flavour the device's memory is (`HMM_DMIRROR_MEMORY_DEVICE_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DmirrorMemory {
    /// MEMORY_DEVICE_PRIVATE (devices 0 and 1).
    #[default]
    Private,
    /// MEMORY_DEVICE_COHERENT (devices 2 and 3).
    Coherent,
}

const IOCTL: ParamSpec = ParamSpec::time(
    "dmirror.ioctl",
    200,
    "assumption",
    "the dmirror ioctl round trip (entering and leaving the driver)",
);
const DMA_PAGE: ParamSpec = ParamSpec::time(
    "dmirror.dma_page",
    600,
    "spec/numbers.md §1–2 (≈ 7 GB/s of a Gen3 x8 link)",
    "device DMA of one 4 KiB page by the dmirror device",
);
const PT_UPDATE: ParamSpec = ParamSpec::time(
    "dmirror.pt_update",
    10,
    "assumption",
    "programming or erasing one dmirror device page-table entry",
);

/// Timing of the device model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DmirrorCosts {
    /// The ioctl round trip (`dmirror.ioctl`).
    pub ioctl: SimDuration,
    /// Device DMA of one 4 KiB page (`dmirror.dma_page`; ≈ 7 GB/s of a Gen3 x8 link, spec/numbers.md §1–2).
    pub dma_page: SimDuration,
    /// Programming or erasing one device page-table entry (`dmirror.pt_update`).
    pub pt_update: SimDuration,
}

impl DmirrorCosts {
    /// The parameters these costs are built from, in field order.
    pub const PARAMS: &[ParamSpec] = &[IOCTL, DMA_PAGE, PT_UPDATE];

    /// Returns the costs `timing` gives.
    pub fn from_timing(timing: &Timing) -> Self {
        Self {
            ioctl: timing.time(&IOCTL),
            dma_page: timing.time(&DMA_PAGE),
            pt_update: timing.time(&PT_UPDATE),
        }
    }

    /// Calibrated defaults.
    pub fn calibrated() -> Self {
        Self::from_timing(&Timing::calibrated())
    }

    /// Every cost zero.
    pub fn zero() -> Self {
        Self::from_timing(&Timing::zero())
    }
}

/// A deliberate bug to inject, so tests can prove the oracle catches it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FaultInjection {
    /// A correct driver.
    #[default]
    None,
    /// Program device entries without checking `read_retry` (a classic mirror bug).
    SkipReadRetry,
}

/// The result of a successful command: the counters and the data it returns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DmirrorResult {
    /// `cmd.cpages`.
    pub cpages: u64,
    /// `cmd.faults`.
    pub faults: u64,
    /// The bounce buffer (READ) or snapshot bytes (SNAPSHOT); empty otherwise.
    pub data: Vec<u8>,
}

/// Device page-table entry tags (`DPT_XA_TAG_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tag {
    Read,
    Write,
    /// DPT_XA_TAG_ATOMIC: mapped through a device-exclusive entry. test_hmm.c tests `tag & WRITE`, and
    /// ATOMIC (1) shares a bit with WRITE (3), so an atomic entry also serves device writes.
    Atomic,
}

#[derive(Clone, Copy, Debug)]
struct PtEntry {
    frame: FrameId,
    /// The frame's allocation generation when the entry was programmed (the translation's epoch).
    generation: u64,
    tag: Tag,
}

/// State shared by the open file and its notifier callbacks.
#[derive(Debug)]
struct Shared {
    kernel: Rc<Kernel>,
    device: Rc<DmirrorDevice>,
    dev: DeviceId,
    pid: Pid,
    lock: SimMutex,
    pt: RefCell<BTreeMap<u64, PtEntry>>,
    costs: DmirrorCosts,
    injection: Cell<FaultInjection>,
    /// Every notifier event the mirror acted on (zapped its range for), in order.
    events: RefCell<Vec<NotifierEvent>>,
}

impl Shared {
    /// The device's translation of `va` through its page-table entry `e` (a mirror grant).
    fn translation(&self, va: Va, e: PtEntry) -> FrameTranslation {
        FrameTranslation {
            frame: e.frame,
            generation: e.generation,
            grant: DeviceGrant::Mirror { pid: self.pid, va },
        }
    }
}

/// The device side of the shared mirror loop: `dmirror_do_fault` and `dmirror_interval_invalidate`.
impl MirrorDevice for Shared {
    /// The number of `pt` entries erased.
    type Zapped = u64;

    const COUNTER_PREFIX: &'static str = "dmirror";

    fn kernel(&self) -> &Kernel {
        &self.kernel
    }

    fn pid(&self) -> Pid {
        self.pid
    }

    fn driver_lock(&self) -> &SimMutex {
        &self.lock
    }

    fn notifier_name(&self) -> String {
        format!("dmirror{}", self.dev.0)
    }

    fn fault_label(&self) -> String {
        format!("dmirror{}", self.dev.0)
    }

    fn dev_private_owner(&self) -> Option<DeviceId> {
        Some(self.dev)
    }

    fn skip_read_retry(&self) -> bool {
        self.injection.get() == FaultInjection::SkipReadRetry
    }

    /// The driver's own migrations manage its page table (spec §2.3): test_hmm.c's
    /// `dmirror_interval_invalidate` returns at once — before `mmu_interval_set_seq` — for a MIGRATE event
    /// whose owner is `dmirror->mdevice`, the *device*, which every file open on it shares. Unless the
    /// device is set to invalidate its own migrations ([`DmirrorDevice::set_invalidate_own_migrations`]).
    fn ignores(&self, range: &NotifierRange) -> bool {
        range.event == NotifierEvent::Migrate
            && range.owner == Some(self.dev)
            && !self.device.invalidate_own.get()
    }

    /// `dmirror_do_fault`: programs `pt` from the pfns (under the driver lock); the page-table writes' time
    /// is spent after the lock drops.
    fn program(&self, range: &HmmRange) -> Result<ProgramCost, Errno> {
        let mut pt = self.pt.borrow_mut();
        let mut n = 0;
        for (i, &w) in range.hmm_pfns.iter().enumerate() {
            debug_assert!(
                w & HMM_PFN_VALID != 0 && w & HMM_PFN_ERROR == 0,
                "faulted range returned {w:#x}"
            );
            let vpn = range.start.page_number() + i as u64;
            let tag = if w & HMM_PFN_WRITE != 0 {
                Tag::Write
            } else {
                Tag::Read
            };
            pt.insert(
                vpn,
                PtEntry {
                    frame: hmm_pfn_to_frame(w),
                    generation: self
                        .kernel
                        .frame_generation(hmm_pfn_to_frame(w))
                        .unwrap_or(0),
                    tag,
                },
            );
            n += 1;
        }
        Ok(ProgramCost {
            locked: SimDuration::ZERO,
            unlocked: self.costs.pt_update.saturating_mul(n),
        })
    }

    /// Erases `[start >> 12, end >> 12]` — inclusive, as test_hmm.c's `xa_for_each_range` does.
    fn zap(&self, r: Range<Va>) -> u64 {
        let first = r.start.page_number();
        let last = r.end.page_number();
        let mut pt = self.pt.borrow_mut();
        let keys: Vec<u64> = pt.range(first..=last).map(|(k, _)| *k).collect();
        for k in &keys {
            pt.remove(k);
        }
        keys.len() as u64
    }

    fn invalidated(&self, range: &NotifierRange, erased: &u64) {
        self.events.borrow_mut().push(range.event);
        self.kernel.sim.trace("dmirror.invalidate", || {
            format!(
                "dev {} {} {:?} erased {erased}",
                self.dev.0, range.range, range.event
            )
        });
    }

    /// Nothing is DMA-mapped: the cost is the page-table erasure's.
    fn release(&self, erased: u64) -> SimDuration {
        self.costs.pt_update.saturating_mul(erased)
    }
}

/// The snapshot's temporary notifier: it only bumps the sequence (`dmirror_snapshot_invalidate`).
#[derive(Debug)]
struct SnapshotOps(Rc<Shared>);

impl IntervalNotifierOps for SnapshotOps {
    fn invalidate<'a>(
        &'a self,
        id: NotifierId,
        range: &'a NotifierRange,
        cur_seq: u64,
    ) -> Pin<Box<dyn Future<Output = bool> + 'a>> {
        Box::pin(async move {
            lock_and_set_seq(&*self.0, id, range, cur_seq)
                .await
                .is_some()
        })
    }

    fn name(&self) -> String {
        format!("dmirror{}.snapshot", self.0.dev.0)
    }
}

/// One dmirror device (`/dev/hmm_dmirrorN`) and its device memory (`dev_pagemap`): the device-private or
/// device-coherent region its migrations allocate from. Each device page remembers the open file that
/// migrated it, whose page table must lose the entry when the page migrates back (test_hmm.c keeps that in
/// `zone_device_data`).
#[derive(Debug)]
pub struct DmirrorDevice {
    kernel: Rc<Kernel>,
    id: DeviceId,
    memory: DmirrorMemory,
    region: Cell<usize>,
    owners: RefCell<BTreeMap<FrameId, PageOwner>>,
    /// Device pages in allocation order, for eviction under device memory pressure.
    lru: RefCell<std::collections::VecDeque<FrameId>>,
    costs: DmirrorCosts,
    /// The device's access path: its reads and writes of mirrored pages take the one translate → memory
    /// → oracle path, with the CPU copy's cost instead of a transfer (test_hmm.c copies with the CPU).
    space: DmaSpace,
    /// The cost of the owning GPU's TLB invalidation when a CPU or peer fault pulls a page back
    /// ([`DmirrorDevice::set_tlb_invalidate`]; `None` for the test device, which has no TLB).
    tlb_invalidate: Cell<Option<SimDuration>>,
    /// Whether the files' notifiers handle this device's own MIGRATE events like any invalidation.
    invalidate_own: Cell<bool>,
}

/// Who a device page belongs to: the open file that migrated it (test_hmm.c keeps it in
/// `zone_device_data`). Eviction finds the page's mappings itself (`migrate_device_range`'s rmap walk).
#[derive(Debug)]
struct PageOwner {
    fd: Weak<Shared>,
}

/// The region's `dev_pagemap_ops`.
#[derive(Debug)]
struct PagemapOps(Weak<DmirrorDevice>);

impl DevicePagemapOps for PagemapOps {
    fn migrate_to_ram<'a>(
        &'a self,
        pid: Pid,
        va: Va,
        _frame: FrameId,
    ) -> Pin<Box<dyn Future<Output = Result<(), VmFault>> + 'a>> {
        Box::pin(async move {
            let dev = self.0.upgrade().ok_or(VmFault::Sigbus)?;
            dev.migrate_to_ram(pid, va).await
        })
    }
}

impl DmirrorDevice {
    /// Creates device `id` with `bytes` of device memory of the given flavour.
    pub fn new(
        kernel: &Rc<Kernel>,
        id: DeviceId,
        memory: DmirrorMemory,
        bytes: u64,
        costs: DmirrorCosts,
    ) -> Rc<Self> {
        Self::new_at(kernel, id, memory, bytes, costs, None)
    }

    /// Creates device `id` as [`DmirrorDevice::new`] does; with `base`, its memory sits at that CPU physical
    /// address (VRAM a BAR window shows: [`Kernel::add_device_memory_at`], the beyond-mainline HMM P2P option).
    pub fn new_at(
        kernel: &Rc<Kernel>,
        id: DeviceId,
        memory: DmirrorMemory,
        bytes: u64,
        costs: DmirrorCosts,
        base: Option<peerdma_core::Pa>,
    ) -> Rc<Self> {
        let dev = Rc::new(Self {
            kernel: kernel.clone(),
            id,
            memory,
            region: Cell::new(0),
            owners: RefCell::new(BTreeMap::new()),
            lru: RefCell::new(std::collections::VecDeque::new()),
            costs,
            space: DmaSpace::new(kernel, id, &format!("dmirror{}", id.0), 1),
            tlb_invalidate: Cell::new(None),
            invalidate_own: Cell::new(false),
        });
        let kind = match memory {
            DmirrorMemory::Private => MemoryKind::DevicePrivate { owner: id },
            DmirrorMemory::Coherent => MemoryKind::DeviceCoherent { owner: id },
        };
        let ops = Rc::new(PagemapOps(Rc::downgrade(&dev)));
        let r = match base {
            Some(b) => kernel.add_device_memory_at(kind, bytes, b, ops),
            None => kernel.add_device_memory(kind, bytes, ops),
        };
        dev.region.set(r);
        dev
    }

    /// Makes this memory a GPU's: a page a CPU or peer fault pulls back (`migrate_to_ram`) costs the GPU a TLB
    /// invalidation of `cost` after its entry is unmapped (counted as `gpu.tlb_invalidations`): the GPU
    /// driver unmaps the page from the GPU and flushes its TLB before the copy (NVIDIA UVM's CPU-fault
    /// service does so for the page's block).
    pub fn set_tlb_invalidate(&self, cost: SimDuration) {
        self.tlb_invalidate.set(Some(cost));
    }

    /// Returns the device id (`pgmap->owner`).
    pub fn id(&self) -> DeviceId {
        self.id
    }

    /// Makes every file's notifier handle this device's own MIGRATE events like any other invalidation
    /// (erase the range, set the sequence) when `on`; by default they are ignored, as lib/test_hmm.c does.
    ///
    /// test_hmm.c's rule has two races, both reproduced by the model and reported by the oracle: a second
    /// file open on the same device keeps entries for pages another file migrated away (their frames
    /// freed), and a file's fault may program an entry for its own device page while a CPU fault migrates
    /// that page back to RAM (the ignored event set no sequence, so `read_retry` does not fire, and
    /// `dmirror_devmem_fault_alloc_and_copy` erased the entry before it was programmed). With `on`, the
    /// driver skips nothing and both are gone; MIGRATE_TO_DEV still programs its entries after
    /// `migrate_vma_pages`.
    pub fn set_invalidate_own_migrations(&self, on: bool) {
        self.invalidate_own.set(on);
    }

    /// Returns the number of pages of this device's memory holding data (allocated to a mirror): its
    /// residency.
    pub fn nr_resident(&self) -> usize {
        self.owners.borrow().len()
    }

    fn select_flag(&self) -> u32 {
        match self.memory {
            DmirrorMemory::Private => MIGRATE_VMA_SELECT_DEVICE_PRIVATE,
            DmirrorMemory::Coherent => MIGRATE_VMA_SELECT_DEVICE_COHERENT,
        }
    }

    /// `dmirror_devmem_fault`: migrates the faulting page back to system RAM; [`VmFault::Sigbus`] when the
    /// migration cannot be set up, as in test_hmm.c.
    async fn migrate_to_ram(&self, pid: Pid, va: Va) -> Result<(), VmFault> {
        let k = &self.kernel;
        let page = Range::from_len(va.align_down(PAGE_SIZE), PAGE_SIZE).ok_or(VmFault::Sigbus)?;
        let mut m = MigrateVma::new(pid, page, self.select_flag(), self.id);
        k.migrate_vma_setup(&mut m)
            .await
            .map_err(|_| VmFault::Sigbus)?;
        if let Some(cost) = self.tlb_invalidate.get() {
            k.sim.count("gpu.tlb_invalidations", 1);
            k.spend(cost).await;
        }
        self.kernel.reclaim_if_low_for(pid).await;
        let n = self.copy_to_sys(&mut m);
        k.spend(self.costs.dma_page.saturating_mul(n)).await;
        k.migrate_vma_pages(&mut m);
        k.migrate_vma_finalize(&mut m);
        Ok(())
    }

    /// Evicts every page of this device back to system memory: `dmirror_device_evict_chunk` over the device's
    /// region, with `migrate_device_range`. Every mapping of each page, in every process, moves to the new
    /// page; the mirrors lose their entries through the CLEAR invalidations of the rmap walk. Free pages are
    /// skipped, and pinned pages stay where they are.
    async fn evict_all(&self) -> u64 {
        let (start, nr) = self.kernel.region_frames(self.region.get());
        let mut src = vec![0u64; usize::try_from(nr).expect("region size fits usize")];
        self.kernel.migrate_device_range(&mut src, start, nr).await;
        self.evict_collected(&mut src).await
    }

    /// Evicts up to `nr` of this device's oldest pages back to system memory, to make room under device
    /// memory pressure (`migrate_device_pfns` over the chosen frames). It takes no `mmap_lock`, so callers
    /// may hold one (MIGRATE_TO_DEV holds its process's for reading).
    async fn evict_oldest(&self, nr: usize) -> u64 {
        let mut src: Vec<u64> = {
            let mut owners = self.owners.borrow_mut();
            let mut lru = self.lru.borrow_mut();
            let mut chosen = std::collections::BTreeSet::new();
            let mut out = Vec::new();
            while out.len() < nr {
                let Some(f) = lru.pop_front() else { break };
                if !owners.contains_key(&f) || !chosen.insert(f) {
                    continue;
                }
                if !self.kernel.frame_info(f).allocated {
                    // Freed since (unmapped): page_free forgets it.
                    owners.remove(&f);
                    continue;
                }
                out.push(f.0);
            }
            out
        };
        self.kernel.migrate_device_pfns(&mut src).await;
        self.evict_collected(&mut src).await
    }

    /// The rest of `dmirror_device_evict_chunk` for pages `migrate_device_range` / `_pfns` collected: allocate
    /// system pages (direct reclaim first, as `__GFP_NOFAIL` would), copy, keep the WRITE bit, then
    /// `migrate_device_pages` and `migrate_device_finalize`. Returns the pages moved.
    async fn evict_collected(&self, src: &mut [u64]) -> u64 {
        let k = &self.kernel;
        let mut dst = vec![0u64; src.len()];
        let mut n = 0;
        for (s, d) in src.iter().zip(dst.iter_mut()) {
            if *s & MIGRATE_PFN_MIGRATE == 0 {
                continue;
            }
            let Some(spage) = migrate_pfn_to_frame(*s) else {
                continue;
            };
            // No one process is known for an evicted page: node 0's allocation policy.
            k.reclaim_if_low().await;
            let Some(dpage) = k.alloc_ram_page(None) else {
                continue;
            };
            k.copy_page(spage, dpage);
            *d = migrate_pfn(dpage) | (*s & MIGRATE_PFN_WRITE);
            n += 1;
        }
        k.spend(self.costs.dma_page.saturating_mul(n)).await;
        k.migrate_device_pages(src, &dst);
        {
            // The pages leave the device: no open file owns them any more.
            let mut owners = self.owners.borrow_mut();
            for &s in src.iter() {
                if s & MIGRATE_PFN_MIGRATE != 0
                    && let Some(f) = migrate_pfn_to_frame(s)
                {
                    owners.remove(&f);
                }
            }
        }
        k.migrate_device_finalize(src, &dst);
        k.sim.count("dmirror.evicted", n);
        n
    }

    /// `dmirror_devmem_fault_alloc_and_copy` / `dmirror_migrate_alloc_and_copy` towards system memory: for each
    /// collected page, allocate a system page, erase the owning mirror's entry, copy. Returns the pages copied.
    fn copy_to_sys(&self, m: &mut MigrateVma) -> u64 {
        let mut n = 0;
        for i in 0..m.src.len() {
            if m.src[i] & MIGRATE_PFN_MIGRATE == 0 {
                continue;
            }
            let Some(src) = migrate_pfn_to_frame(m.src[i]) else {
                continue;
            };
            let Some(dst) = self.kernel.alloc_ram_page(Some(m.pid)) else {
                continue;
            };
            if let Some(fd) = self
                .owners
                .borrow_mut()
                .remove(&src)
                .and_then(|o| o.fd.upgrade())
            {
                fd.pt.borrow_mut().remove(&m.va(i).page_number());
            }
            self.kernel.copy_page(src, dst);
            m.dst[i] = migrate_pfn(dst) | (m.src[i] & MIGRATE_PFN_WRITE);
            n += 1;
        }
        n
    }
}

/// One open file of a dmirror device (`struct dmirror`).
#[derive(Debug)]
pub struct Dmirror {
    sh: Rc<Shared>,
    memory: DmirrorMemory,
    mirror: HmmMirror<Shared>,
    closed: Cell<bool>,
    fail_alloc: Cell<bool>,
}

impl Dmirror {
    /// Opens `device` from process `pid`: registers the mirror's notifier over the whole address space
    /// `[0, ULONG_MAX & PAGE_MASK)`.
    ///
    /// # Errors
    /// `EINVAL` when the process has exited.
    pub fn open(device: &Rc<DmirrorDevice>, pid: Pid) -> Result<Rc<Self>, Errno> {
        let kernel = &device.kernel;
        let sh = Rc::new(Shared {
            kernel: kernel.clone(),
            device: device.clone(),
            dev: device.id,
            pid,
            lock: SimMutex::new(&kernel.sim, "dmirror.mutex"),
            pt: RefCell::new(BTreeMap::new()),
            costs: device.costs.clone(),
            injection: Cell::new(FaultInjection::None),
            events: RefCell::new(Vec::new()),
        });
        let mirror = HmmMirror::register(
            sh.clone(),
            Va::from_raw(0),
            !(PAGE_SIZE - 1), // ULONG_MAX & PAGE_MASK
        )?;
        Ok(Rc::new(Self {
            sh,
            memory: device.memory,
            mirror,
            closed: Cell::new(false),
            fail_alloc: Cell::new(false),
        }))
    }

    /// Returns the device this file is open on.
    pub fn device(&self) -> DeviceId {
        self.sh.dev
    }

    /// Returns the memory flavour.
    pub fn memory(&self) -> DmirrorMemory {
        self.memory
    }

    /// Injects a driver bug (tests of the oracle only).
    pub fn inject(&self, f: FaultInjection) {
        self.sh.injection.set(f);
    }

    /// Returns the process whose address space this file mirrors: the opener's, also when the file is
    /// used from a child that inherited it across `fork` (the notifier was registered on the opener's mm).
    pub fn opener(&self) -> Pid {
        self.sh.pid
    }

    /// Returns every MMU notifier event the mirror has acted on (erased its range for), in order; the
    /// driver's own MIGRATE events, which it ignores, are not among them.
    pub fn events(&self) -> Vec<NotifierEvent> {
        self.sh.events.borrow().clone()
    }

    /// Returns the number of entries in the device page table.
    pub fn nr_mirrored(&self) -> usize {
        self.sh.pt.borrow().len()
    }

    /// Returns whether the device page table has an entry for the page at `va`.
    pub fn maps(&self, va: Va) -> bool {
        self.sh.pt.borrow().contains_key(&va.page_number())
    }

    /// Returns the device page-table entries in address order: `(va, frame, writable)`, `writable` for
    /// WRITE and ATOMIC entries (introspection, for tests of what a mirror may hold).
    pub fn entries(&self) -> Vec<(Va, FrameId, bool)> {
        self.sh
            .pt
            .borrow()
            .iter()
            .map(|(&vpn, e)| (Va::from_raw(vpn << PAGE_SHIFT), e.frame, e.tag != Tag::Read))
            .collect()
    }

    /// Closes the file: removes the notifier (waiting for a running invalidation) and drops the mirror.
    pub async fn close(&self) {
        if self.closed.replace(true) {
            return;
        }
        self.mirror.remove().await;
        self.sh.pt.borrow_mut().clear();
    }

    /// Validates `addr`/`npages` (spec §2.4) and returns the range.
    fn check(&self, addr: Va, npages: u64) -> Result<Range<Va>, Errno> {
        if self.closed.get() || !addr.is_page_aligned() || npages == 0 {
            return Err(Errno::EINVAL);
        }
        let len = npages.checked_mul(PAGE_SIZE).ok_or(Errno::EINVAL)?;
        let r = Range::from_len(addr, len).ok_or(Errno::EINVAL)?;
        if !self.sh.kernel.is_alive(self.sh.pid) {
            return Err(Errno::EINVAL);
        }
        Ok(r)
    }

    /// HMM_DMIRROR_READ: the device reads `npages` at `addr`, faulting what its page table lacks.
    pub async fn read(&self, addr: Va, npages: u64) -> Result<DmirrorResult, Errno> {
        let k = &self.sh.kernel;
        k.spend(self.sh.costs.ioctl).await;
        let r = self.check(addr, npages)?;
        let mut bounce = vec![0u8; usize::try_from(r.len()).map_err(|_| Errno::ENOMEM)?];
        let mut res = DmirrorResult::default();
        let mut start = r.start;
        loop {
            let done = {
                let _g = self.sh.lock.lock().await;
                self.do_read(r, start, &mut bounce, &mut res.cpages)
            };
            self.dma_time(res.cpages).await;
            if done {
                break;
            }
            start = r.start.add(res.cpages * PAGE_SIZE);
            self.fault(Range::new(start, r.end), false).await?;
            res.faults += 1;
        }
        res.data = bounce;
        k.sim.count("dmirror.read", 1);
        Ok(res)
    }

    /// Copies pages from `start` while `pt` has entries; returns whether the whole range was read.
    fn do_read(&self, r: Range<Va>, start: Va, bounce: &mut [u8], cpages: &mut u64) -> bool {
        let pt = self.sh.pt.borrow();
        for va in Range::new(start, r.end).pages() {
            let Some(e) = pt.get(&va.page_number()).copied() else {
                return false;
            };
            let off = usize::try_from(va.raw() - r.start.raw()).expect("inside the bounce buffer");
            self.sh.device.space.copy(
                &self.sh.translation(va, e),
                DeviceData::Read(&mut bounce[off..off + 4096]),
            );
            *cpages += 1;
        }
        true
    }

    /// HMM_DMIRROR_WRITE: the device writes `data` (`npages` pages) at `addr`, write-faulting as needed.
    pub async fn write(&self, addr: Va, npages: u64, data: &[u8]) -> Result<DmirrorResult, Errno> {
        let k = &self.sh.kernel;
        k.spend(self.sh.costs.ioctl).await;
        let r = self.check(addr, npages)?;
        if data.len() as u64 != r.len() {
            return Err(Errno::EINVAL);
        }
        let mut res = DmirrorResult::default();
        let mut start = r.start;
        loop {
            let done = {
                let _g = self.sh.lock.lock().await;
                self.do_write(r, start, data, &mut res.cpages)
            };
            self.dma_time(res.cpages).await;
            if done {
                break;
            }
            start = r.start.add(res.cpages * PAGE_SIZE);
            self.fault(Range::new(start, r.end), true).await?;
            res.faults += 1;
        }
        k.sim.count("dmirror.write", 1);
        Ok(res)
    }

    fn do_write(&self, r: Range<Va>, start: Va, data: &[u8], cpages: &mut u64) -> bool {
        let pt = self.sh.pt.borrow();
        for va in Range::new(start, r.end).pages() {
            let Some(e) = pt.get(&va.page_number()).copied() else {
                return false;
            };
            if e.tag == Tag::Read {
                return false;
            }
            let off = usize::try_from(va.raw() - r.start.raw()).expect("inside the data");
            self.sh.device.space.copy(
                &self.sh.translation(va, e),
                DeviceData::Write(&data[off..off + 4096]),
            );
            *cpages += 1;
        }
        true
    }

    async fn dma_time(&self, pages: u64) {
        self.sh
            .kernel
            .spend(self.sh.costs.dma_page.saturating_mul(pages))
            .await;
    }

    /// `dmirror_fault`: faults `r` in 64-page chunks through the shared mirror loop
    /// ([`HmmMirror::range_fault`], `dmirror_range_fault`).
    async fn fault(&self, r: Range<Va>, write: bool) -> Result<(), Errno> {
        let k = &self.sh.kernel;
        k.sim.count("dmirror.faults", 1);
        let track = Track::device(self.sh.device.space.name());
        let mut span = k.sim.span("device.fault", track.clone(), || {
            vec![
                ("va", TraceArg::Hex(r.start.raw())),
                ("pages", (r.len() / PAGE_SIZE).into()),
                ("write", write.into()),
            ]
        });
        let nr = k.sim.counter("dmirror.faults");
        k.sim.gauge(
            track.clone(),
            "device.faults",
            i64::try_from(nr).unwrap_or(i64::MAX),
        );
        let flow = k.sim.flow_begin("device.fault", track);
        let mut addr = r.start;
        let mut res = Ok(());
        while addr < r.end {
            let next = addr.add(CHUNK_PAGES * PAGE_SIZE).min(r.end);
            res = self.mirror.range_fault(Range::new(addr, next), write).await;
            if res.is_err() {
                break;
            }
            addr = next;
        }
        // The fault resolves in the faulting thread's context (hmm_range_fault ran there).
        k.sim.flow_end(flow, Track::Agent);
        span.add_end_args(|| vec![("result", errno_arg(res))]);
        res
    }

    /// HMM_DMIRROR_MIGRATE_TO_DEV: migrates `npages` at `addr` into this device's memory, then reads the
    /// range from the device page table without faulting (`-ENOENT` if any page is not there).
    pub async fn migrate_to_dev(&self, addr: Va, npages: u64) -> Result<DmirrorResult, Errno> {
        let k = &self.sh.kernel;
        let _span = k.sim.span(
            "migrate.to_device",
            Track::device(self.sh.device.space.name()),
            || vec![("va", TraceArg::Hex(addr.raw())), ("pages", npages.into())],
        );
        k.spend(self.sh.costs.ioctl).await;
        let r = self.check(addr, npages)?;
        let dev = &self.sh.device;
        {
            let lock = k.mmap_lock(self.sh.pid);
            let _m = lock.read().await;
            let mut addr = r.start;
            while addr < r.end {
                let vma = self.readable_vma(addr)?;
                // The THP version sizes its arrays for a whole PMD; chunks follow PMD boundaries so a THP lies
                // inside one chunk.
                let next = addr
                    .align_down(peerdma_core::PMD_SIZE)
                    .add(peerdma_core::PMD_SIZE)
                    .min(r.end)
                    .min(vma.range.end);
                let mut m = MigrateVma::new(
                    self.sh.pid,
                    Range::new(addr, next),
                    // FAIL_ALLOC is one-shot: the large allocation fails, so this chunk migrates base pages.
                    if self.fail_alloc.replace(false) {
                        MIGRATE_VMA_SELECT_SYSTEM
                    } else {
                        MIGRATE_VMA_SELECT_SYSTEM | MIGRATE_VMA_SELECT_COMPOUND
                    },
                    dev.id,
                );
                k.migrate_vma_setup(&mut m).await?;
                let mut copied = 0;
                for i in 0..m.src.len() {
                    if m.src[i] & MIGRATE_PFN_MIGRATE == 0 {
                        continue;
                    }
                    let src = migrate_pfn_to_frame(m.src[i]);
                    if src.is_some_and(|f| !matches!(k.memory_kind(f), MemoryKind::Ram { .. })) {
                        continue;
                    }
                    if m.src[i] & MIGRATE_PFN_COMPOUND != 0 {
                        // A whole THP: a 2 MiB block of device memory (declined if none is free).
                        let mut head = k.alloc_pmd_page(dev.region.get());
                        if head.is_none() {
                            dev.evict_oldest(512).await;
                            head = k.alloc_pmd_page(dev.region.get());
                        }
                        let (Some(head), Some(src)) = (head, src) else {
                            continue;
                        };
                        for j in 0..512 {
                            k.copy_page(FrameId(src.0 + j), FrameId(head.0 + j));
                        }
                        copied += 512;
                        m.dst[i] = migrate_pfn(head)
                            | MIGRATE_PFN_COMPOUND
                            | (m.src[i] & MIGRATE_PFN_WRITE);
                        continue;
                    }
                    let dst = if let Some(d) = k.alloc_page(dev.region.get()) {
                        d
                    } else {
                        // Device memory is full: evict the oldest device pages, then try again.
                        dev.evict_oldest(EVICT_BATCH).await;
                        let Some(d) = k.alloc_page(dev.region.get()) else {
                            continue;
                        };
                        d
                    };
                    if let Some(src) = src {
                        k.copy_page(src, dst);
                        copied += 1;
                    }
                    let write = m.src[i] & MIGRATE_PFN_WRITE != 0
                        || (src.is_none() && vma.flags.contains(VmFlags::WRITE));
                    m.dst[i] = migrate_pfn(dst) | if write { MIGRATE_PFN_WRITE } else { 0 };
                }
                k.spend(self.sh.costs.dma_page.saturating_mul(copied)).await;
                k.migrate_vma_pages(&mut m);
                {
                    let _g = self.sh.lock.lock().await;
                    let mut pt = self.sh.pt.borrow_mut();
                    for i in 0..m.src.len() {
                        if m.src[i] & MIGRATE_PFN_MIGRATE == 0 {
                            continue;
                        }
                        let Some(dst) = migrate_pfn_to_frame(m.dst[i]) else {
                            continue;
                        };
                        let tag = if m.dst[i] & MIGRATE_PFN_WRITE != 0 {
                            Tag::Write
                        } else {
                            Tag::Read
                        };
                        let nr = if m.dst[i] & MIGRATE_PFN_COMPOUND != 0 {
                            512
                        } else {
                            1
                        };
                        for j in 0..nr {
                            let (frame, va) = (FrameId(dst.0 + j), m.va(i).add(j * PAGE_SIZE));
                            let generation = k.frame_generation(frame).unwrap_or(0);
                            pt.insert(
                                va.page_number(),
                                PtEntry {
                                    frame,
                                    generation,
                                    tag,
                                },
                            );
                            let owner = PageOwner {
                                fd: Rc::downgrade(&self.sh),
                            };
                            dev.owners.borrow_mut().insert(frame, owner);
                            dev.lru.borrow_mut().push_back(frame);
                        }
                    }
                }
                k.migrate_vma_finalize(&mut m);
                addr = next;
            }
        }
        let res = self.read_back(r, npages).await?;
        k.sim.count("dmirror.migrate_to_dev", 1);
        Ok(res)
    }

    /// Reads the whole range from the device page table without faulting (the tail of MIGRATE_TO_DEV and
    /// EXCLUSIVE): `ENOENT` if any page is missing.
    async fn read_back(&self, r: Range<Va>, npages: u64) -> Result<DmirrorResult, Errno> {
        let mut bounce = vec![0u8; usize::try_from(r.len()).map_err(|_| Errno::ENOMEM)?];
        let mut cpages = 0;
        let done = {
            let _g = self.sh.lock.lock().await;
            self.do_read(r, r.start, &mut bounce, &mut cpages)
        };
        if !done {
            return Err(Errno::ENOENT);
        }
        Ok(DmirrorResult {
            cpages: npages,
            faults: 0,
            data: bounce,
        })
    }

    /// Returns the VMA at `addr` if it is readable: the per-chunk check of the migrate commands
    /// (`vma_lookup` + VM_READ, `EINVAL` otherwise — it also rejects holes).
    fn readable_vma(&self, addr: Va) -> Result<Vma, Errno> {
        let vma = self.sh.kernel.vma_at(self.sh.pid, addr);
        vma.filter(|v| v.flags.contains(VmFlags::READ))
            .ok_or(Errno::EINVAL)
    }

    /// HMM_DMIRROR_MIGRATE_TO_SYS: migrates this device's pages in the range back to system memory;
    /// `cpages` counts the pages migrated.
    pub async fn migrate_to_sys(&self, addr: Va, npages: u64) -> Result<DmirrorResult, Errno> {
        let k = &self.sh.kernel;
        let _span = k.sim.span(
            "migrate.to_ram",
            Track::device(self.sh.device.space.name()),
            || vec![("va", TraceArg::Hex(addr.raw())), ("pages", npages.into())],
        );
        k.spend(self.sh.costs.ioctl).await;
        let r = self.check(addr, npages)?;
        let dev = &self.sh.device;
        let lock = k.mmap_lock(self.sh.pid);
        let _m = lock.read().await;
        let mut res = DmirrorResult::default();
        let mut addr = r.start;
        while addr < r.end {
            let vma = self.readable_vma(addr)?;
            let next = addr
                .add(CHUNK_PAGES * PAGE_SIZE)
                .min(r.end)
                .min(vma.range.end);
            let mut m = MigrateVma::new(
                self.sh.pid,
                Range::new(addr, next),
                dev.select_flag(),
                dev.id,
            );
            k.migrate_vma_setup(&mut m).await?;
            k.reclaim_if_low_for(self.sh.pid).await;
            let n = dev.copy_to_sys(&mut m);
            k.spend(self.sh.costs.dma_page.saturating_mul(n)).await;
            k.migrate_vma_pages(&mut m);
            res.cpages += m
                .src
                .iter()
                .filter(|&&w| {
                    w & (MIGRATE_PFN_VALID | MIGRATE_PFN_MIGRATE)
                        == MIGRATE_PFN_VALID | MIGRATE_PFN_MIGRATE
                })
                .count() as u64;
            k.migrate_vma_finalize(&mut m);
            addr = next;
        }
        k.sim.count("dmirror.migrate_to_sys", 1);
        Ok(res)
    }

    /// HMM_DMIRROR_EXCLUSIVE: makes every page of the range device-exclusive (`make_device_exclusive` with
    /// no owner, so this mirror's own invalidation clears the old entry) and maps it ATOMIC, then reads the
    /// range from the device page table.
    pub async fn exclusive(&self, addr: Va, npages: u64) -> Result<DmirrorResult, Errno> {
        let k = &self.sh.kernel;
        k.spend(self.sh.costs.ioctl).await;
        let r = self.check(addr, npages)?;
        {
            let lock = k.mmap_lock(self.sh.pid);
            let _m = lock.read().await;
            for va in r.pages() {
                let frame = k.make_device_exclusive(self.sh.pid, va, None).await?;
                let _g = self.sh.lock.lock().await;
                self.sh.pt.borrow_mut().insert(
                    va.page_number(),
                    PtEntry {
                        frame,
                        generation: self.sh.kernel.frame_generation(frame).unwrap_or(0),
                        tag: Tag::Atomic,
                    },
                );
            }
        }
        let res = self.read_back(r, npages).await?;
        k.sim.count("dmirror.exclusive", 1);
        Ok(res)
    }

    /// HMM_DMIRROR_CHECK_EXCLUSIVE: `EPERM` if any page of the range is still mapped ATOMIC.
    pub async fn check_exclusive(&self, addr: Va, npages: u64) -> Result<DmirrorResult, Errno> {
        self.sh.kernel.spend(self.sh.costs.ioctl).await;
        let r = self.check(addr, npages)?;
        let _g = self.sh.lock.lock().await;
        let pt = self.sh.pt.borrow();
        let atomic = pt
            .range(r.start.page_number()..r.end.page_number())
            .any(|(_, e)| e.tag == Tag::Atomic);
        if atomic {
            Err(Errno::EPERM)
        } else {
            Ok(DmirrorResult::default())
        }
    }

    /// HMM_DMIRROR_FLAGS with HMM_DMIRROR_FLAG_FAIL_ALLOC: the next large (THP) allocation fails. The model
    /// migrates base pages only, so the flag never finds a large allocation to fail; it is recorded and reported.
    pub fn set_flags(&self, fail_alloc: bool) {
        self.fail_alloc.set(fail_alloc);
        self.sh.kernel.sim.count("dmirror.flags", 1);
    }

    /// HMM_DMIRROR_RELEASE: evicts all of this device's memory (for every open file) back to system memory.
    pub async fn release(&self) -> Result<DmirrorResult, Errno> {
        self.sh.kernel.spend(self.sh.costs.ioctl).await;
        if self.closed.get() {
            return Err(Errno::EINVAL);
        }
        self.sh.device.evict_all().await;
        self.sh.kernel.sim.count("dmirror.release", 1);
        Ok(DmirrorResult::default())
    }

    /// HMM_DMIRROR_SNAPSHOT: one byte per page describing the CPU mapping, without faulting.
    pub async fn snapshot(&self, addr: Va, npages: u64) -> Result<DmirrorResult, Errno> {
        let k = &self.sh.kernel;
        k.spend(self.sh.costs.ioctl).await;
        let r = self.check(addr, npages)?;
        let mut res = DmirrorResult::default();
        let mut start = r.start;
        while start < r.end {
            let next = start.add(CHUNK_PAGES * PAGE_SIZE).min(r.end);
            let chunk = Range::new(start, next);
            let id = k.interval_notifier_insert(
                self.sh.pid,
                chunk.start,
                chunk.len(),
                Rc::new(SnapshotOps(self.sh.clone())),
            )?;
            let out = self.snapshot_chunk(id, chunk).await;
            k.interval_notifier_remove(self.sh.pid, id).await;
            let bytes = out?;
            res.cpages += bytes.len() as u64;
            res.data.extend(bytes);
            start = next;
        }
        k.sim.count("dmirror.snapshot", 1);
        Ok(res)
    }

    async fn snapshot_chunk(&self, id: NotifierId, chunk: Range<Va>) -> Result<Vec<u8>, Errno> {
        let k = &self.sh.kernel;
        let deadline = k.sim.now() + RANGE_TIMEOUT;
        let lock = k.mmap_lock(self.sh.pid);
        let mut range = HmmRange::new(self.sh.pid, id, 0, chunk, 0);
        range.dev_private_owner = Some(self.sh.dev);
        loop {
            if k.sim.now() > deadline {
                return Err(Errno::EBUSY);
            }
            range.notifier_seq = k.interval_read_begin(self.sh.pid, id).await;
            let ret = {
                let _m = lock.read().await;
                k.hmm_range_fault(&mut range).await
            };
            match ret {
                Err(Errno::EBUSY) => continue,
                Err(e) => return Err(e),
                Ok(()) => {}
            }
            let _g = self.sh.lock.lock().await;
            if k.interval_read_retry(self.sh.pid, id, range.notifier_seq) {
                continue;
            }
            let zero = k.zero_page();
            return Ok(range
                .hmm_pfns
                .iter()
                .map(|&w| {
                    let kind = if w & HMM_PFN_VALID != 0 {
                        k.memory_kind(hmm_pfn_to_frame(w))
                    } else {
                        MemoryKind::Ram { node: 0 }
                    };
                    self.mkentry(w, zero, kind)
                })
                .collect());
        }
    }

    /// `dmirror_mkentry`: the snapshot byte for one pfn word.
    fn mkentry(&self, w: u64, zero: FrameId, kind: MemoryKind) -> u8 {
        if w & HMM_PFN_ERROR != 0 {
            return prot::ERROR;
        }
        if w & HMM_PFN_VALID == 0 {
            return prot::NONE;
        }
        let frame = hmm_pfn_to_frame(w);
        let mut b = match kind {
            MemoryKind::DevicePrivate { owner } if owner == self.sh.dev => prot::DEV_PRIVATE_LOCAL,
            MemoryKind::DevicePrivate { .. } => prot::DEV_PRIVATE_REMOTE,
            MemoryKind::DeviceCoherent { owner } if owner == self.sh.dev => {
                prot::DEV_COHERENT_LOCAL
            }
            MemoryKind::DeviceCoherent { .. } => prot::DEV_COHERENT_REMOTE,
            MemoryKind::Ram { .. } if frame == zero => prot::ZERO,
            MemoryKind::Ram { .. } | MemoryKind::FsDax { .. } | MemoryKind::P2pMem { .. } => {
                prot::NONE
            }
        };
        b |= if w & HMM_PFN_WRITE != 0 {
            prot::WRITE
        } else {
            prot::READ
        };
        let shift = hmm_pfn_to_map_order(w) + PAGE_SHIFT;
        if shift == PMD_SHIFT {
            b |= prot::PMD;
        } else if shift == PUD_SHIFT {
            b |= prot::PUD;
        }
        b
    }
}
