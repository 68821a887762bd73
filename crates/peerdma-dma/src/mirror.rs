//! The long-term coherent translation mirror: a device mirrors a VA range of a process without pinning
//! anything (DESIGN.md §4.4; `spec/linux-p2p.md` §4.2–§4.3 (mlx5 ODP), `spec/linux-hmm.md` §1.2).
//!
//! Linux counterparts: drivers/infiniband/core/umem_odp.c (`ib_umem_odp_map_dma_and_lock`,
//! `ib_umem_odp_unmap_dma_pages`), drivers/infiniband/hw/mlx5/odp.c (`mlx5_ib_invalidate_range`), mm/hmm.c
//! `hmm_dma_map_pfn` (P2P-aware per-page DMA mapping).
//!
//! Fault, as numbered steps:
//! 1. `seq = read_begin`; take `mmap_lock` for reading; `hmm_range_fault` with REQ_FAULT (and REQ_WRITE for
//!    a write); drop `mmap_lock`. `EBUSY` retries (up to the 1 s HMM timeout), any other errno is the
//!    device's fault result (`EFAULT` for a hole or PFNMAP, `EPERM` for a write to a read-only VMA).
//! 2. Take the mirror lock; if `read_retry(seq)`, unlock and go to 1.
//! 3. DMA-map every returned page for the device (P2P pages by their map type: bus address, IOVA with the
//!    MMIO attribute, or `EREMOTEIO`) and program the device entries; unlock.
//!
//! Invalidate (the interval notifier):
//! 1. Take the mirror lock (a non-blockable invalidation that finds it held fails, as mlx5 does).
//! 2. `set_seq(cur_seq)`.
//! 3. Zap the device entries of the range, then DMA-unmap them (in that order: the device must stop using
//!    the addresses before the IOMMU mapping goes).
//!
//! A range in a PFNMAP VMA (a BAR without struct page) is mirrored through the BAR's owner instead of
//! `hmm_range_fault`, which refuses it: each page is a dynamic attachment to the owner's export
//! ([`crate::dmabuf`]), dropped by the same invalidations and revoked with the export.
//!
//! There is no pin anywhere: pages are free to migrate, swap or COW once an invalidation returns.
//! *Coarse:* one IOVA mapping per page (no MR-wide IOVA reservation); dirty tracking of written pages is
//! not modelled.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;

use peerdma_core::{Errno, FrameId, PAGE_SIZE, Pid, Range, SimDuration, Va};
use peerdma_mm::MmioId;
use peerdma_mm::hmm::{
    HMM_PFN_REQ_FAULT, HMM_PFN_REQ_WRITE, HMM_PFN_WRITE, HmmRange, hmm_pfn_to_frame,
};
use peerdma_mm::notifier::{IntervalNotifierOps, NotifierId, NotifierRange};
use peerdma_mm::vma::VmFlags;
use peerdma_sim::SimMutex;

use crate::dmabuf::{AttachId, ImporterKind};
use crate::map::{DmaSegment, MapTarget, MappedSg};
use crate::platform::{DmaDevice, Platform};

/// The HMM fault retry timeout (`HMM_RANGE_DEFAULT_TIMEOUT`, 1 s).
const RANGE_TIMEOUT: SimDuration = SimDuration::from_nanos(1_000_000_000);

/// What a device entry points at.
#[derive(Debug)]
enum Target {
    /// A page with struct page, DMA-mapped for the device.
    Page { frame: FrameId, sg: MappedSg },
    /// A page of a BAR without struct page, reached through a dynamic attachment to its export.
    Bar { mmio: MmioId, att: AttachId },
}

#[derive(Debug)]
struct Entry {
    write: bool,
    target: Target,
}

struct Shared {
    platform: Rc<Platform>,
    dev: Rc<DmaDevice>,
    pid: Pid,
    lock: SimMutex,
    entries: RefCell<BTreeMap<u64, Entry>>,
}

impl Shared {
    /// Zaps and DMA-unmaps the entries of `r` (invalidate step 3); returns how many went and the unmaps'
    /// CPU time.
    fn zap(&self, r: Range<Va>) -> (u64, SimDuration) {
        let gone: Vec<Entry> = {
            let mut e = self.entries.borrow_mut();
            let keys: Vec<u64> = e
                .range(r.start.page_number()..r.end.raw().div_ceil(PAGE_SIZE))
                .map(|(k, _)| *k)
                .collect();
            keys.iter().filter_map(|k| e.remove(k)).collect()
        };
        let n = gone.len() as u64;
        let mut cost = SimDuration::ZERO;
        for en in gone {
            cost += self.release(en.target);
        }
        (n, cost)
    }

    /// DMA-unmaps (or detaches) one entry's target; returns the unmap's CPU time.
    fn release(&self, t: Target) -> SimDuration {
        match t {
            Target::Page { mut sg, .. } => self
                .platform
                .unmap_sg(self.dev.id, &mut sg)
                .unwrap_or(SimDuration::ZERO),
            Target::Bar { mmio, att } => {
                self.platform.dmabuf_detach(mmio, att);
                SimDuration::ZERO
            }
        }
    }
}

struct Ops(Rc<Shared>);

impl IntervalNotifierOps for Ops {
    fn invalidate<'a>(
        &'a self,
        id: NotifierId,
        range: &'a NotifierRange,
        cur_seq: u64,
    ) -> Pin<Box<dyn Future<Output = bool> + 'a>> {
        Box::pin(async move {
            let sh = &self.0;
            let Some(_g) = sh.lock.lock_if_blockable(range.blockable).await else {
                return false;
            };
            let k = &sh.platform.kernel;
            k.interval_set_seq(sh.pid, id, cur_seq);
            let (n, cost) = sh.zap(range.range);
            k.sim.count("mirror.invalidated_pages", n);
            k.spend(cost).await;
            true
        })
    }

    fn name(&self) -> String {
        format!("mirror.{}", self.0.dev.name)
    }
}

/// A device's coherent mirror of `[start, end)` of one process (module docs).
pub struct DmaMirror {
    sh: Rc<Shared>,
    notifier: NotifierId,
    range: Range<Va>,
}

impl fmt::Debug for DmaMirror {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaMirror")
            .field("dev", &self.sh.dev.name)
            .field("range", &self.range)
            .field("entries", &self.sh.entries.borrow().len())
            .finish_non_exhaustive()
    }
}

impl DmaMirror {
    /// Registers a mirror of `range` of `pid` for `dev` (`ib_umem_odp_get`): inserts the interval notifier;
    /// nothing is faulted or pinned.
    ///
    /// # Errors
    /// `EINVAL` when the process has exited, `EOVERFLOW` for a range that wraps.
    pub fn register(
        platform: &Rc<Platform>,
        dev: Rc<DmaDevice>,
        pid: Pid,
        range: Range<Va>,
    ) -> Result<Self, Errno> {
        let sh = Rc::new(Shared {
            platform: platform.clone(),
            lock: SimMutex::new(&platform.kernel.sim, "mirror.umem_mutex"),
            dev,
            pid,
            entries: RefCell::new(BTreeMap::new()),
        });
        let notifier = platform.kernel.interval_notifier_insert(
            pid,
            range.start,
            range.len(),
            Rc::new(Ops(sh.clone())),
        )?;
        platform.kernel.sim.count("mirror.registrations", 1);
        Ok(Self {
            sh,
            notifier,
            range,
        })
    }

    /// Returns the mirrored range.
    pub fn range(&self) -> Range<Va> {
        self.range
    }

    /// Returns the number of pages the device has entries for now.
    pub fn nr_mapped(&self) -> usize {
        self.sh.entries.borrow().len()
    }

    /// Returns the device's current entries as merged segments.
    pub fn segments(&self) -> Vec<DmaSegment> {
        let mut all = MappedSg::default();
        for e in self.sh.entries.borrow().values() {
            match &e.target {
                Target::Page { sg, .. } => all.pages.extend(sg.pages.iter().copied()),
                Target::Bar { mmio, att } => {
                    if self.sh.platform.dmabuf_is_mapped(*mmio, *att)
                        && let Ok(p) = self.sh.platform.dmabuf_mapping(*mmio, *att)
                    {
                        all.pages.extend(p);
                    }
                }
            }
        }
        all.segments()
    }

    /// Faults `r` (page-aligned, inside the mirror) into the device (fault steps 1–3).
    ///
    /// # Errors
    /// `EFAULT` / `EPERM` from `hmm_range_fault`, `EBUSY` after the 1 s timeout, `EREMOTEIO` for P2P memory
    /// the device cannot reach, `EINVAL` outside the mirror.
    pub async fn fault(&self, r: Range<Va>, write: bool) -> Result<(), Errno> {
        if !self.range.contains_range(&r) || r.is_empty() {
            return Err(Errno::EINVAL);
        }
        let sh = &self.sh;
        let k = &sh.platform.kernel;
        k.sim.count("mirror.faults", 1);
        let pfnmap = k
            .state()
            .mm(sh.pid)
            .vma(r.start)
            .is_some_and(|v| v.flags.intersects(VmFlags::PFNMAP | VmFlags::IO));
        if pfnmap {
            return self.bar_fault(r, write).await;
        }
        let flags = HMM_PFN_REQ_FAULT | if write { HMM_PFN_REQ_WRITE } else { 0 };
        let mut range = HmmRange::new(sh.pid, self.notifier, 0, r, flags);
        let deadline = k.sim.now() + RANGE_TIMEOUT;
        let lock = k.mmap_lock(sh.pid);
        let guard = loop {
            if k.sim.now() > deadline {
                return Err(Errno::EBUSY);
            }
            range.notifier_seq = k.interval_read_begin(sh.pid, self.notifier).await;
            let ret = {
                let _m = lock.read().await;
                k.hmm_range_fault(&mut range).await
            };
            match ret {
                Err(Errno::EBUSY) => continue,
                Err(e) => return Err(e),
                Ok(()) => {}
            }
            k.preempt_point().await;
            let g = sh.lock.lock().await;
            if k.interval_read_retry(sh.pid, self.notifier, range.notifier_seq) {
                drop(g);
                k.sim.count("mirror.retries", 1);
                continue;
            }
            k.state().oracle.mirror_install(false, || {
                format!("mirror {} fault of {:#x}", sh.dev.name, r.start)
            });
            break g;
        };
        // The device entries are programmed and DMA-mapped under the mirror lock.
        let res = self.install(&range);
        if let Ok(cost) = res {
            k.spend(cost).await;
        }
        drop(guard);
        res.map(|_| ())
    }

    /// Fault step 3, under the mirror lock; returns the CPU time of the DMA mappings.
    fn install(&self, range: &HmmRange) -> Result<SimDuration, Errno> {
        let sh = &self.sh;
        let mut cost = SimDuration::ZERO;
        for (i, &w) in range.hmm_pfns.iter().enumerate() {
            let frame = hmm_pfn_to_frame(w);
            let write = w & HMM_PFN_WRITE != 0;
            let pa = sh.platform.kernel.state().phys.frame_pa(frame);
            let class = sh.platform.classify(&sh.dev, pa);
            let target = MapTarget {
                pa,
                class,
                mmio: false,
            };
            let sg = sh.platform.map_targets(&sh.dev, &[target], write)?;
            cost += sg.cost;
            let vpn = range.start.page_number() + i as u64;
            let old = sh.entries.borrow_mut().insert(
                vpn,
                Entry {
                    write,
                    target: Target::Page { frame, sg },
                },
            );
            if let Some(o) = old {
                cost += sh.release(o.target);
            }
        }
        Ok(cost)
    }

    /// The fault of a range in a PFNMAP VMA: `hmm_range_fault` refuses it, so the mirror goes through the
    /// BAR's owner instead (DESIGN.md §4.6, "mirror through the provider"): under `mmap_lock` the owner
    /// translates each page (`follow_pfnmap`); under the mirror lock each page is attached to the export as
    /// a dynamic importer. A revocation zaps the PFNMAP entries inside an invalidation, which removes these
    /// entries; a later fault then finds no translation (`EFAULT`). A `move_notify` only drops the
    /// attachment's mapping, rebuilt at the next access. `EAGAIN` when an invalidation raced the fault.
    async fn bar_fault(&self, r: Range<Va>, write: bool) -> Result<(), Errno> {
        let sh = &self.sh;
        let k = &sh.platform.kernel;
        let seq = k.interval_read_begin(sh.pid, self.notifier).await;
        let pages = {
            let lock = k.mmap_lock(sh.pid);
            let _m = lock.read().await;
            let mut out = Vec::new();
            for va in r.pages() {
                let vma = k.state().mm(sh.pid).vma(va).cloned().ok_or(Errno::EFAULT)?;
                if write && !vma.flags.contains(VmFlags::WRITE) {
                    return Err(Errno::EPERM);
                }
                out.push(k.follow_pfnmap(sh.pid, va).ok_or(Errno::EFAULT)?);
            }
            out
        };
        let _g = sh.lock.lock().await;
        if k.interval_read_retry(sh.pid, self.notifier, seq) {
            k.sim.count("mirror.retries", 1);
            return Err(Errno::EAGAIN);
        }
        for (va, (mmio, pa)) in r.pages().zip(pages) {
            let att = sh.platform.dmabuf_attach(
                mmio,
                sh.dev.id,
                ImporterKind::Dynamic,
                vec![pa],
                write,
            )?;
            let old = sh.entries.borrow_mut().insert(
                va.page_number(),
                Entry {
                    write,
                    target: Target::Bar { mmio, att },
                },
            );
            if let Some(o) = old {
                let _ = sh.release(o.target);
            }
        }
        Ok(())
    }

    /// The device writes one page `data` at `va` through its mirror, faulting it in first if the device has
    /// no (writable) entry (the ODP page-fault path).
    ///
    /// # Errors
    /// The errnos of [`DmaMirror::fault`]; `EFAULT` when the IOMMU faults.
    pub async fn write_page(&self, va: Va, data: &[u8]) -> Result<(), Errno> {
        self.access_page(va, true, Access::Write(data)).await
    }

    /// The device reads one page at `va` through its mirror (see [`DmaMirror::write_page`]).
    ///
    /// # Errors
    /// The errnos of [`DmaMirror::fault`]; `EFAULT` when the IOMMU faults.
    pub async fn read_page(&self, va: Va, buf: &mut [u8]) -> Result<(), Errno> {
        self.access_page(va, false, Access::Read(buf)).await
    }

    async fn access_page(&self, va: Va, write: bool, mut acc: Access<'_>) -> Result<(), Errno> {
        let page = va.align_down(PAGE_SIZE);
        let sh = &self.sh;
        let platform = &sh.platform;
        loop {
            let hit = sh
                .entries
                .borrow()
                .get(&page.page_number())
                .filter(|e| e.write || !write)
                .map(|e| match &e.target {
                    Target::Page { frame, sg } => (Some(*frame), Ok(sg.pages[0])),
                    Target::Bar { mmio, att } => {
                        (None, platform.dmabuf_mapping(*mmio, *att).map(|p| p[0]))
                    }
                });
            let Some((frame, mapped)) = hit else {
                let one = Range::from_len(page, PAGE_SIZE).ok_or(Errno::EFAULT)?;
                match self.fault(one, write).await {
                    // Raced with an invalidation: fault again, as the hardware would.
                    Err(Errno::EAGAIN) => {}
                    other => other?,
                }
                continue;
            };
            let mapped = mapped?;
            let res = platform
                .resolve(&sh.dev, mapped.addr, write)
                .ok_or(Errno::EFAULT)?;
            let kernel = &platform.kernel;
            match (frame, &mut acc) {
                (Some(f), Access::Write(data)) => {
                    kernel.device_write(sh.dev.id, sh.pid, page, f, data);
                }
                (Some(f), Access::Read(buf)) => kernel.device_read(sh.dev.id, sh.pid, page, f, buf),
                (None, Access::Write(data)) => kernel.mmio_write(sh.dev.id, res.pa, data)?,
                (None, Access::Read(buf)) => kernel.mmio_read(sh.dev.id, res.pa, buf)?,
            }
            platform
                .transfer(&sh.dev, res.pa, PAGE_SIZE, write, res.cost)
                .await;
            return Ok(());
        }
    }

    /// Unregisters the mirror: zaps and unmaps every entry, removes the notifier (`ib_umem_odp_release`).
    pub async fn unregister(&self) {
        let sh = &self.sh;
        {
            let _g = sh.lock.lock().await;
            let (_, cost) = sh.zap(self.range);
            sh.platform.kernel.spend(cost).await;
        }
        sh.platform
            .kernel
            .interval_notifier_remove(sh.pid, self.notifier)
            .await;
    }
}

enum Access<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
}
