//! ODP umems: the NIC side of the one mirror loop (drivers/infiniband/core/umem_odp.c,
//! drivers/infiniband/hw/mlx5/odp.c).
//!
//! DMA mapping is range-at-a-time, as since Linux 6.15 ([`peerdma_dma::hmm_dma`]): a umem reserves the IOVA
//! of its whole range when it is created (`ib_init_umem_odp` → `hmm_dma_map_alloc`; an implicit child its
//! 1 GiB slot), a fault links each page at `base + index * PAGE_SIZE` (`hmm_dma_map_pfn`; a page still
//! mapped — a prefetch, or a write upgrade — keeps its mapping), an invalidation unlinks each page with its
//! own IOTLB sync (`hmm_dma_unmap_pfn` in `ib_umem_odp_unmap_dma_pages`), and the umem's release frees the
//! reservation (`hmm_dma_map_free`). Without a translating domain, or without room in the IOVA space, the
//! pages are mapped one by one with the regular DMA API.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::{Rc, Weak};

use peerdma_core::{Errno, FrameId, PAGE_SIZE, Pid, Range, SimDuration, Va};
use peerdma_dma::{
    DmaAddr, DmaDevice, DmaPfn, HmmDmaMap, HmmMirror, MirrorDevice, Platform, ProgramCost,
};
use peerdma_mm::Kernel;
use peerdma_mm::hmm::{HMM_PFN_REQ_WRITE, HMM_PFN_WRITE, HmmRange, hmm_pfn_to_frame};
use peerdma_mm::mmu_notifier::NotifierRange;
use peerdma_sim::SimMutex;

use super::Children;

/// One MTT entry of an ODP umem.
pub(super) struct OdpEntry {
    pub(super) frame: FrameId,
    /// The CPU entry was writable when faulted: the page is dirtied at unmap.
    pub(super) cpu_writable: bool,
    /// The NIC may write through it.
    pub(super) dev_write: bool,
    /// Its DMA mapping in the umem's map.
    pub(super) pfn: DmaPfn,
}

/// An ODP umem (an explicit MR or an implicit child) as a [`MirrorDevice`].
pub(super) struct Umem {
    pub(super) platform: Rc<Platform>,
    pub(super) dev: Rc<DmaDevice>,
    pub(super) pid: Pid,
    pub(super) lock: SimMutex,
    pub(super) range: Range<Va>,
    pub(super) writable: bool,
    pub(super) entries: RefCell<BTreeMap<u64, OdpEntry>>,
    /// The DMA map of the whole range (`umem_odp->map`): index 0 is the range's first page.
    pub(super) map: HmmDmaMap,
    /// Implicit child: its parent's children and its slot.
    pub(super) parent: Option<(Weak<Children>, u64)>,
    pub(super) ever_mapped: Cell<bool>,
    pub(super) faulting: Cell<u32>,
    pub(super) dead: Cell<bool>,
}

impl Umem {
    /// `ib_umem_odp_unmap_dma_pages` of the zapped `(page number, entry)`s, in address order: each page's
    /// `hmm_dma_unmap_pfn`, then `set_page_dirty` when its CPU entry was writable.
    pub(super) fn release_entries(&self, zapped: Vec<(u64, OdpEntry)>) -> SimDuration {
        let k = &self.platform.kernel;
        let first = self.range.start.page_number();
        let cost = self
            .map
            .unmap_pfns(zapped.iter().map(|(vpn, e)| (vpn - first, e.pfn)));
        for (_, e) in zapped {
            if e.cpu_writable && e.frame != k.zero_page() {
                k.set_page_dirty(e.frame);
                k.sim.count("rnic.dirtied_pages", 1);
            }
        }
        cost
    }

    /// `hmm_dma_map_free` once the umem is released (every page unmapped).
    pub(super) fn free_map(&self) {
        let freed = self.map.free();
        debug_assert!(freed.is_ok(), "every page was unmapped: {freed:?}");
    }
}

impl MirrorDevice for Umem {
    type Zapped = Vec<(u64, OdpEntry)>;

    const COUNTER_PREFIX: &'static str = "rnic.odp";

    fn kernel(&self) -> &Kernel {
        &self.platform.kernel
    }

    fn pid(&self) -> Pid {
        self.pid
    }

    fn driver_lock(&self) -> &SimMutex {
        &self.lock
    }

    fn notifier_name(&self) -> String {
        format!("rnic.{}.odp@{:#x}", self.dev.name, self.range.start.raw())
    }

    fn fault_label(&self) -> String {
        format!("rnic {} odp", self.dev.name)
    }

    /// `populate_mtt`: DMA-map each pfn (`hmm_dma_map_pfn`) and write its MTT entry, under `umem_mutex`.
    /// A page the umem still maps (a prefetch or a write upgrade of a mapped page) keeps its DMA mapping
    /// and its dirty duty, as `hmm_dma_map_pfn` returns the address of a `HMM_PFN_DMA_MAPPED` pfn; only the
    /// MTT entry's permission follows the fault.
    fn program(&self, range: &HmmRange) -> Result<ProgramCost, Errno> {
        if self.dead.get() {
            return Err(Errno::EAGAIN);
        }
        let k = &self.platform.kernel;
        let write_fault = range.default_flags & HMM_PFN_REQ_WRITE != 0;
        let first = self.range.start.page_number();
        let mut cost = SimDuration::ZERO;
        let mut linked = 0;
        for (i, &w) in range.hmm_pfns.iter().enumerate() {
            let frame = hmm_pfn_to_frame(w);
            let cpu_writable = w & HMM_PFN_WRITE != 0;
            let dev_write = write_fault && cpu_writable && self.writable;
            let vpn = range.start.page_number() + i as u64;
            {
                let mut entries = self.entries.borrow_mut();
                if let Some(e) = entries.get_mut(&vpn) {
                    if e.frame == frame {
                        e.cpu_writable |= cpu_writable;
                        e.dev_write = dev_write;
                        continue;
                    }
                    // Another frame (a read-retry mutation can leave one): unmap and dirty the old one.
                    let old = entries.remove(&vpn).expect("the entry was just found");
                    drop(entries);
                    cost += self.release_entries(vec![(vpn, old)]);
                }
            }
            let (pfn, c) = self
                .map
                .map_pfn(vpn - first, k.frame_pa(frame))
                .inspect_err(|_| self.map.count_linked(linked))?;
            cost += c;
            linked += u64::from(pfn.is_linked());
            self.entries.borrow_mut().insert(
                vpn,
                OdpEntry {
                    frame,
                    cpu_writable,
                    dev_write,
                    pfn,
                },
            );
        }
        if !range.hmm_pfns.is_empty() {
            self.ever_mapped.set(true);
        }
        self.map.count_linked(linked);
        Ok(ProgramCost {
            locked: cost,
            unlocked: SimDuration::ZERO,
        })
    }

    fn zap(&self, r: Range<Va>) -> Vec<(u64, OdpEntry)> {
        self.entries
            .borrow_mut()
            .extract_if(
                r.start.page_number()..r.end.raw().div_ceil(PAGE_SIZE),
                |_, _| true,
            )
            .collect()
    }

    fn invalidated(&self, _range: &NotifierRange, zapped: &Vec<(u64, OdpEntry)>) {
        let k = &self.platform.kernel;
        k.sim.count("rnic.invalidated_pages", zapped.len() as u64);
        // mlx5: an implicit child that this invalidation emptied is destroyed by a work item.
        if let Some((parent, slot)) = &self.parent
            && !zapped.is_empty()
            && self.entries.borrow().is_empty()
            && let Some(children) = parent.upgrade()
        {
            let Some(child) = children.borrow().get(slot).cloned() else {
                return;
            };
            let slot = *slot;
            k.sim.spawn(
                format!("rnic.{}.destroy_child", self.dev.name),
                async move {
                    let umem = &child.mirror.device().clone();
                    let g = umem.lock.lock().await;
                    if umem.dead.get()
                        || umem.faulting.get() > 0
                        || !umem.entries.borrow().is_empty()
                    {
                        return;
                    }
                    umem.dead.set(true);
                    drop(g);
                    let removed = children.borrow_mut().remove(&slot);
                    if let Some(c) = removed {
                        c.mirror.remove().await;
                        c.umem().free_map();
                        umem.platform
                            .kernel
                            .sim
                            .count("rnic.implicit_children_destroyed", 1);
                    }
                },
            );
        }
    }

    fn fence<'a>(&'a self, range: Range<Va>) -> Pin<Box<dyn Future<Output = ()> + 'a>> {
        Box::pin(self.dev.space.fence(self.pid, range))
    }

    fn release(&self, zapped: Vec<(u64, OdpEntry)>) -> SimDuration {
        self.release_entries(zapped)
    }
}

/// An ODP umem with its mirror registration.
pub(super) struct OdpUmem {
    pub(super) mirror: HmmMirror<Umem>,
}

impl OdpUmem {
    pub(super) fn new(
        platform: &Rc<Platform>,
        dev: &Rc<DmaDevice>,
        pid: Pid,
        range: Range<Va>,
        writable: bool,
        parent: Option<(Weak<Children>, u64)>,
    ) -> Result<Rc<Self>, Errno> {
        let nr_pages = range.end.raw().div_ceil(PAGE_SIZE) - range.start.page_number();
        let umem = Rc::new(Umem {
            map: HmmDmaMap::alloc(platform, dev, nr_pages),
            platform: platform.clone(),
            dev: dev.clone(),
            pid,
            lock: SimMutex::new(&platform.kernel.sim, "rnic.umem_mutex"),
            range,
            writable,
            entries: RefCell::default(),
            parent,
            ever_mapped: Cell::new(false),
            faulting: Cell::new(0),
            dead: Cell::new(false),
        });
        let mirror = match HmmMirror::register(umem.clone(), range.start, range.len()) {
            Ok(m) => m,
            Err(e) => {
                umem.free_map();
                return Err(e);
            }
        };
        Ok(Rc::new(Self { mirror }))
    }

    pub(super) fn umem(&self) -> &Umem {
        self.mirror.device()
    }

    /// The MTT lookup of page `va`: its DMA address when the NIC may `write` (or read) through it.
    pub(super) fn lookup(&self, va: Va, write: bool) -> Option<DmaAddr> {
        self.umem()
            .entries
            .borrow()
            .get(&va.page_number())
            .filter(|e| e.dev_write || !write)
            .map(|e| e.pfn.addr())
    }

    /// Faults `r` into the NIC (`pagefault_real_mr`). `EAGAIN` when the umem died meanwhile.
    pub(super) async fn fault(&self, r: Range<Va>, write: bool) -> Result<(), Errno> {
        let u = self.umem();
        if u.dead.get() {
            return Err(Errno::EAGAIN);
        }
        u.faulting.set(u.faulting.get() + 1);
        let res = self.mirror.range_fault(r, write).await;
        u.faulting.set(u.faulting.get() - 1);
        res
    }
}
