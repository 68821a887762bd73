//! ODP umems: the NIC side of the one mirror loop (drivers/infiniband/core/umem_odp.c,
//! drivers/infiniband/hw/mlx5/odp.c).

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::{Rc, Weak};

use peerdma_core::{Errno, FrameId, PAGE_SIZE, Pid, Range, SimDuration, Va};
use peerdma_dma::{DmaAddr, DmaDevice, HmmMirror, MappedSg, MirrorDevice, Platform, ProgramCost};
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
    pub(super) sg: MappedSg,
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
    /// Implicit child: its parent's children and its slot.
    pub(super) parent: Option<(Weak<Children>, u64)>,
    pub(super) ever_mapped: Cell<bool>,
    pub(super) faulting: Cell<u32>,
    pub(super) dead: Cell<bool>,
}

impl Umem {
    pub(super) fn release_entries(&self, zapped: Vec<OdpEntry>) -> SimDuration {
        let k = &self.platform.kernel;
        let mut cost = SimDuration::ZERO;
        for mut e in zapped {
            cost += self
                .platform
                .unmap_sg(self.dev.id, &mut e.sg)
                .unwrap_or(SimDuration::ZERO);
            if e.cpu_writable && e.frame != k.zero_page() {
                k.set_page_dirty(e.frame);
                k.sim.count("rnic.dirtied_pages", 1);
            }
        }
        cost
    }
}

impl MirrorDevice for Umem {
    type Zapped = Vec<OdpEntry>;

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

    /// `populate_mtt`: DMA-map each pfn and write its MTT entry, under `umem_mutex`.
    fn program(&self, range: &HmmRange) -> Result<ProgramCost, Errno> {
        if self.dead.get() {
            return Err(Errno::EAGAIN);
        }
        let k = &self.platform.kernel;
        let write_fault = range.default_flags & HMM_PFN_REQ_WRITE != 0;
        let mut cost = SimDuration::ZERO;
        for (i, &w) in range.hmm_pfns.iter().enumerate() {
            let frame = hmm_pfn_to_frame(w);
            let cpu_writable = w & HMM_PFN_WRITE != 0;
            let dev_write = write_fault && cpu_writable && self.writable;
            let sg = self
                .platform
                .map_sg(self.dev.id, &[k.frame_pa(frame)], dev_write)?;
            cost += sg.cost();
            let vpn = range.start.page_number() + i as u64;
            let old = self.entries.borrow_mut().insert(
                vpn,
                OdpEntry {
                    frame,
                    cpu_writable,
                    dev_write,
                    sg,
                },
            );
            // A page mapped again (a prefetch or a write upgrade of a mapped page): the old DMA mapping
            // goes without dirtying; the dirty duty stays with the entry (hmm_dma_map_pfn keeps a mapped
            // pfn's state).
            if let Some(mut o) = old {
                if o.frame == frame
                    && o.cpu_writable
                    && let Some(e) = self.entries.borrow_mut().get_mut(&vpn)
                {
                    e.cpu_writable = true;
                }
                if o.frame == frame {
                    cost += self
                        .platform
                        .unmap_sg(self.dev.id, &mut o.sg)
                        .unwrap_or(SimDuration::ZERO);
                } else {
                    cost += self.release_entries(vec![o]);
                }
            }
        }
        if !range.hmm_pfns.is_empty() {
            self.ever_mapped.set(true);
        }
        Ok(ProgramCost {
            locked: cost,
            unlocked: SimDuration::ZERO,
        })
    }

    fn zap(&self, r: Range<Va>) -> Vec<OdpEntry> {
        let mut e = self.entries.borrow_mut();
        let keys: Vec<u64> = e
            .range(r.start.page_number()..r.end.raw().div_ceil(PAGE_SIZE))
            .map(|(k, _)| *k)
            .collect();
        keys.iter().filter_map(|k| e.remove(k)).collect()
    }

    fn invalidated(&self, _range: &NotifierRange, zapped: &Vec<OdpEntry>) {
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

    fn release(&self, zapped: Vec<OdpEntry>) -> SimDuration {
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
        let umem = Rc::new(Umem {
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
        let mirror = HmmMirror::register(umem, range.start, range.len())?;
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
            .and_then(|e| e.sg.page_addr(0))
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
