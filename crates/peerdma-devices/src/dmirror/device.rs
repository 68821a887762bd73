//! The dmirror device: its device memory (private or coherent), the page owners, eviction by physical page
//! and the pagemap callbacks (test_hmm.c's `dmirror_device`, `dmirror_devmem_fault`, `dmirror_device_evict_chunk`).

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::{Rc, Weak};

use peerdma_core::{DeviceId, FrameId, PAGE_SIZE, Pid, Range, SimDuration, Va};
use peerdma_dma::DmaSpace;
use peerdma_mm::migrate::{
    MIGRATE_PFN_MIGRATE, MIGRATE_PFN_WRITE, MIGRATE_VMA_SELECT_DEVICE_COHERENT,
    MIGRATE_VMA_SELECT_DEVICE_PRIVATE, migrate_pfn, migrate_pfn_to_frame,
};
use peerdma_mm::{DevicePagemapOps, Kernel, MemoryKind, MigrateVma, VmFault};

use super::tables::PageOwners;
use super::{DmirrorCosts, DmirrorMemory, Shared};

/// One dmirror device (`/dev/hmm_dmirrorN`) and its device memory (`dev_pagemap`): the device-private or
/// device-coherent region its migrations allocate from. Each device page remembers the open file that
/// migrated it, whose page table must lose the entry when the page migrates back (test_hmm.c keeps that in
/// `zone_device_data`).
#[derive(Debug)]
pub struct DmirrorDevice {
    pub(super) kernel: Rc<Kernel>,
    pub(super) id: DeviceId,
    pub(super) memory: DmirrorMemory,
    pub(super) region: Cell<usize>,
    pub(super) owners: RefCell<PageOwners>,
    /// Device pages in allocation order, for eviction under device memory pressure.
    pub(super) lru: RefCell<std::collections::VecDeque<FrameId>>,
    pub(super) costs: DmirrorCosts,
    /// The device's access path: its reads and writes of mirrored pages take the one translate → memory
    /// → oracle path, with the CPU copy's cost instead of a transfer (test_hmm.c copies with the CPU).
    pub(super) space: DmaSpace,
    /// The cost of the owning GPU's TLB invalidation when a CPU or peer fault pulls a page back
    /// ([`DmirrorDevice::set_tlb_invalidate`]; `None` for the test device, which has no TLB).
    pub(super) tlb_invalidate: Cell<Option<SimDuration>>,
    /// Whether the files' notifiers handle this device's own MIGRATE events like any invalidation.
    pub(super) invalidate_own: Cell<bool>,
}

/// Who a device page belongs to: the open file that migrated it (test_hmm.c keeps it in
/// `zone_device_data`). Eviction finds the page's mappings itself (`migrate_device_range`'s rmap walk).
#[derive(Debug)]
pub(super) struct PageOwner {
    pub(super) fd: Weak<Shared>,
}

/// The region's `dev_pagemap_ops`.
#[derive(Debug)]
pub(super) struct PagemapOps(Weak<DmirrorDevice>);

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
            owners: RefCell::new(PageOwners::default()),
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
        *dev.owners.borrow_mut() = PageOwners::new(kernel.region_frames(r).0);
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
    /// driver skips nothing and both are gone; and MIGRATE_TO_DEV maps the migrated range through the
    /// fault path after finalize instead of programming from the migration's arrays, so a MADV_DONTNEED
    /// that zapped the chunk during the copy (test_hmm.c's third race) cannot leave an entry for a page
    /// finalize freed.
    pub fn set_invalidate_own_migrations(&self, on: bool) {
        self.invalidate_own.set(on);
    }

    /// Returns the number of pages of this device's memory holding data (allocated to a mirror): its
    /// residency.
    pub fn nr_resident(&self) -> usize {
        self.owners.borrow().len()
    }

    pub(super) fn select_flag(&self) -> u32 {
        match self.memory {
            DmirrorMemory::Private => MIGRATE_VMA_SELECT_DEVICE_PRIVATE,
            DmirrorMemory::Coherent => MIGRATE_VMA_SELECT_DEVICE_COHERENT,
        }
    }

    /// `dmirror_devmem_fault`: migrates the faulting page back to system RAM; [`VmFault::Sigbus`] when the
    /// migration cannot be set up, as in test_hmm.c.
    pub(super) async fn migrate_to_ram(&self, pid: Pid, va: Va) -> Result<(), VmFault> {
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
        k.migrate_vma_pages(&mut m).await;
        k.migrate_vma_finalize(&mut m);
        Ok(())
    }

    /// Evicts every page of this device back to system memory: `dmirror_device_evict_chunk` over the device's
    /// region, with `migrate_device_range`. Every mapping of each page, in every process, moves to the new
    /// page; the mirrors lose their entries through the CLEAR invalidations of the rmap walk. Free pages are
    /// skipped, and pinned pages stay where they are.
    pub(super) async fn evict_all(&self) -> u64 {
        let (start, nr) = self.kernel.region_frames(self.region.get());
        let mut src = vec![0u64; usize::try_from(nr).expect("region size fits usize")];
        self.kernel.migrate_device_range(&mut src, start, nr).await;
        self.evict_collected(&mut src).await
    }

    /// Evicts up to `nr` of this device's oldest pages back to system memory, to make room under device
    /// memory pressure (`migrate_device_pfns` over the chosen frames). It takes no `mmap_lock`, so callers
    /// may hold one (MIGRATE_TO_DEV holds its process's for reading).
    pub(super) async fn evict_oldest(&self, nr: usize) -> u64 {
        let mut src: Vec<u64> = {
            let mut owners = self.owners.borrow_mut();
            let mut lru = self.lru.borrow_mut();
            let mut chosen = std::collections::BTreeSet::new();
            let mut out = Vec::new();
            while out.len() < nr {
                let Some(f) = lru.pop_front() else { break };
                if !owners.contains(f) || !chosen.insert(f) {
                    continue;
                }
                if !self.kernel.frame_info(f).allocated {
                    // Freed since (unmapped): page_free forgets it.
                    owners.remove(f);
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
    pub(super) async fn evict_collected(&self, src: &mut [u64]) -> u64 {
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
                    owners.remove(f);
                }
            }
        }
        k.migrate_device_finalize(src, &dst);
        k.sim.count("dmirror.evicted", n);
        n
    }

    /// `dmirror_devmem_fault_alloc_and_copy` / `dmirror_migrate_alloc_and_copy` towards system memory: for each
    /// collected page, allocate a system page, erase the owning mirror's entry, copy. Returns the pages copied.
    pub(super) fn copy_to_sys(&self, m: &mut MigrateVma) -> u64 {
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
                .remove(src)
                .and_then(|o| o.fd.upgrade())
            {
                fd.pt.borrow_mut().remove(m.va(i).page_number());
            }
            self.kernel.copy_page(src, dst);
            m.dst[i] = migrate_pfn(dst) | (m.src[i] & MIGRATE_PFN_WRITE);
            n += 1;
        }
        n
    }
}
