//! The long-term coherent translation mirror: a device mirrors a VA range of a process without pinning
//! anything (DESIGN.md §4.4; `spec/linux-p2p.md` §4.2–§4.3 (mlx5 ODP), `spec/linux-hmm.md` §1.2).
//!
//! Linux counterparts: drivers/infiniband/core/umem_odp.c (`ib_init_umem_odp`, `ib_umem_odp_map_dma_and_lock`,
//! `ib_umem_odp_unmap_dma_pages`, `ib_umem_odp_release`), drivers/infiniband/hw/mlx5/odp.c
//! (`mlx5_ib_invalidate_range`), mm/hmm.c `hmm_dma_map_alloc` / `hmm_dma_map_pfn` / `hmm_dma_unmap_pfn` /
//! `hmm_dma_map_free` (P2P-aware range-at-a-time DMA mapping, [`crate::hmm_dma`]).
//!
//! The fault loop and the invalidation are the shared ones of [`crate::hmm_mirror`] (its numbered steps);
//! this module supplies the ODP device side ([`MirrorDevice`]):
//! - program (fault step 7): DMA-map every returned page for the device (`hmm_dma_map_pfn`; P2P pages by
//!   their map type: bus address, IOVA with the MMIO attribute, or `EREMOTEIO`) and program the device
//!   entries, spending the mappings' CPU time under the mirror lock (`umem_mutex`);
//! - zap (invalidate step 4): remove the device entries of the range; a notifier invalidation (not
//!   `unregister`) counts them in `mirror.invalidated_pages`;
//! - fence (invalidate step 5): wait until the device's in-flight requests holding a translation of the
//!   range have landed ([`crate::space::DmaSpace::fence`]);
//! - release (invalidate step 6): DMA-unmap (`hmm_dma_unmap_pfn`) or detach the zapped entries — after the
//!   zap and the fence: the device must stop using the addresses before the IOMMU mapping goes.
//!
//! A range in a PFNMAP VMA (a BAR without struct page) is mirrored through the BAR's owner instead of
//! `hmm_range_fault`, which refuses it: each page is a dynamic attachment to the owner's export
//! ([`crate::dmabuf`]), dropped by the same invalidations and revoked with the export.
//!
//! There is no pin anywhere: pages are free to migrate, swap or COW once an invalidation returns.
//!
//! DMA mapping is range-at-a-time, as since Linux 6.15 ([`crate::hmm_dma`]): registration reserves the IOVA
//! of the whole mirrored range once (`hmm_dma_map_alloc` → `dma_iova_try_alloc`), so page `i` of the range
//! always sits at `base + i * PAGE_SIZE`; a fault links each page into it (`hmm_dma_map_pfn`; a page still
//! mapped is not linked again), an invalidation unlinks each zapped page with its own IOTLB sync
//! (`ib_umem_odp_unmap_dma_pages` → `hmm_dma_unmap_pfn` → `dma_iova_unlink`) and keeps the reservation, and
//! `unregister` frees it (`hmm_dma_map_free`). A device without a translating domain, or one whose IOVA
//! space has no room for the range, maps page by page with the regular DMA API instead. *Coarse:* dirty
//! tracking of written pages is not modelled. The device's table keeps each page's mapping inline (no
//! per-page list) and an invalidation unmaps its pages through one borrow of the domain.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt;
use std::rc::Rc;

use std::future::Future;
use std::pin::Pin;

use peerdma_core::{Errno, PAGE_SIZE, Pid, Range, SimDuration, Va};
use peerdma_mm::hmm::{HMM_PFN_WRITE, HmmRange, hmm_pfn_to_frame};
use peerdma_mm::mmu_notifier::NotifierRange;
use peerdma_mm::vma::VmFlags;
use peerdma_mm::{DeviceGrant, Kernel, MmioId};
use peerdma_sim::{SimMutex, TraceArg, Track};

use crate::dmabuf::{AttachId, ImporterKind};
use crate::hmm_dma::{DmaPfn, HmmDmaMap};
use crate::hmm_mirror::{HmmMirror, MirrorDevice, ProgramCost};
use crate::map::{DmaSegment, MappedSg};
use crate::platform::{DmaDevice, Platform};
use crate::space::{DeviceAddr, DmaOp, DmaRequest, RequestId};

/// What a device entry points at.
#[derive(Clone, Copy, Debug)]
enum Target {
    /// A page with struct page, DMA-mapped for the device by the mirror's [`HmmDmaMap`], inline rather
    /// than a one-page list, so that the per-page table allocates nothing per page.
    Page(DmaPfn),
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
    /// The DMA map of the whole mirrored range (`struct hmm_dma_map`): index 0 is page `first_vpn`.
    map: HmmDmaMap,
    first_vpn: u64,
}

impl Shared {
    /// DMA-unmaps (or detaches) the target of the entry of page `vpn`; returns the unmap's CPU time.
    fn release_target(&self, vpn: u64, t: Target) -> SimDuration {
        match t {
            Target::Page(pfn) => self.map.unmap_pfns([(vpn - self.first_vpn, pfn)]),
            Target::Bar { mmio, att } => self.platform.dmabuf_detach(mmio, att),
        }
    }
}

impl MirrorDevice for Shared {
    type Zapped = BTreeMap<u64, Entry>;

    const COUNTER_PREFIX: &'static str = "mirror";

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
        format!("mirror.{}", self.dev.name)
    }

    fn fault_label(&self) -> String {
        format!("mirror {}", self.dev.name)
    }

    /// A DMA device's mirror asks for P2P translations of device-private pages (beyond mainline, as an
    /// RDMA driver opting into `HMM_PFN_REQ_TRY_P2P` would). It changes nothing unless an owner placed its
    /// device-private memory at BAR addresses (the GPU's `beyond_mainline_p2p` option, off by default); the
    /// mapping then classifies the BAR page by the usual P2P rules.
    fn allow_p2p(&self) -> bool {
        true
    }

    /// Fault step 7, under the mirror lock: DMA-maps each page (`hmm_dma_map_pfn`) and programs its entry;
    /// the mappings' CPU time is spent before the lock drops. A page the device still maps at the same
    /// physical address keeps its mapping (only the entry's permission follows the new pfn), as
    /// `hmm_dma_map_pfn` returns the old address of a `HMM_PFN_DMA_MAPPED` pfn; any other old target is
    /// unmapped first (the model's read-retry mutations can leave one).
    fn program(&self, range: &HmmRange) -> Result<ProgramCost, Errno> {
        let mut cost = SimDuration::ZERO;
        let mut linked = 0;
        for (i, &w) in range.hmm_pfns.iter().enumerate() {
            let frame = hmm_pfn_to_frame(w);
            let write = w & HMM_PFN_WRITE != 0;
            let pa = self.platform.kernel.frame_pa(frame);
            let vpn = range.start.page_number() + i as u64;
            {
                let mut entries = self.entries.borrow_mut();
                if let Some(e) = entries.get_mut(&vpn) {
                    if matches!(e.target, Target::Page(p) if p.pa() == pa) {
                        e.write = write;
                        continue;
                    }
                    let old = entries.remove(&vpn).expect("the entry was just found");
                    drop(entries);
                    cost += self.release_target(vpn, old.target);
                }
            }
            let (pfn, c) = self
                .map
                .map_pfn(vpn - self.first_vpn, pa)
                .inspect_err(|_| self.map.count_linked(linked))?;
            cost += c;
            linked += u64::from(pfn.is_linked());
            self.entries.borrow_mut().insert(
                vpn,
                Entry {
                    write,
                    target: Target::Page(pfn),
                },
            );
        }
        self.map.count_linked(linked);
        Ok(ProgramCost {
            locked: cost,
            unlocked: SimDuration::ZERO,
        })
    }

    /// Removes the entries of the pages `r` touches; their mappings stay until `release`. One walk of the
    /// entries inside `r` (none outside it), and a range covering every entry takes the whole table.
    fn zap(&self, r: Range<Va>) -> BTreeMap<u64, Entry> {
        let mut e = self.entries.borrow_mut();
        let (lo, hi) = (r.start.page_number(), r.end.raw().div_ceil(PAGE_SIZE));
        let covers_all = e.first_key_value().is_none_or(|(&k, _)| k >= lo)
            && e.last_key_value().is_none_or(|(&k, _)| k < hi);
        if covers_all {
            return std::mem::take(&mut *e);
        }
        e.extract_if(lo..hi, |_, _| true).collect()
    }

    fn invalidated(&self, _range: &NotifierRange, zapped: &BTreeMap<u64, Entry>) {
        self.platform
            .kernel
            .sim
            .count("mirror.invalidated_pages", zapped.len() as u64);
    }

    /// DMA-unmaps the zapped entries; returns the unmaps' CPU time.
    fn fence<'a>(&'a self, range: Range<Va>) -> Pin<Box<dyn Future<Output = ()> + 'a>> {
        Box::pin(self.dev.space.fence(self.pid, range))
    }

    /// DMA-unmaps the zapped entries, page by page in address order as `ib_umem_odp_unmap_dma_pages`
    /// does (`hmm_dma_unmap_pfn` each: a linked page is unlinked with its own IOTLB sync, the reservation
    /// stays), the pages through one borrow of the domain; returns the unmaps' CPU time.
    fn release(&self, zapped: BTreeMap<u64, Entry>) -> SimDuration {
        let first = self.first_vpn;
        if !zapped
            .values()
            .any(|e| matches!(e.target, Target::Bar { .. }))
        {
            return self
                .map
                .unmap_pfns(zapped.into_iter().filter_map(|(vpn, e)| match e.target {
                    Target::Page(pfn) => Some((vpn - first, pfn)),
                    Target::Bar { .. } => None,
                }));
        }
        let mut cost = SimDuration::ZERO;
        let mut pages = Vec::new();
        for (vpn, en) in zapped {
            match en.target {
                Target::Page(pfn) => pages.push((vpn - self.first_vpn, pfn)),
                Target::Bar { mmio, att } => {
                    // Keep the order of the unmaps: the pages before this one go first.
                    cost += self.map.unmap_pfns(pages.drain(..));
                    cost += self.platform.dmabuf_detach(mmio, att);
                }
            }
        }
        cost + self.map.unmap_pfns(pages)
    }
}

/// A device's coherent mirror of `[start, end)` of one process (module docs).
pub struct DmaMirror {
    sh: Rc<Shared>,
    mirror: HmmMirror<Shared>,
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
    /// Registers a mirror of `range` of `pid` for `dev` (`ib_umem_odp_get` → `ib_init_umem_odp`): reserves
    /// the IOVA of the whole range (`hmm_dma_map_alloc`; page by page later when the device has no
    /// translating domain or the IOVA space has no room, which is not an error) and inserts the interval
    /// notifier; nothing is faulted or pinned.
    ///
    /// # Errors
    /// `EINVAL` when the process has exited, `EOVERFLOW` for a range that wraps (the reservation is given
    /// back).
    pub fn register(
        platform: &Rc<Platform>,
        dev: Rc<DmaDevice>,
        pid: Pid,
        range: Range<Va>,
    ) -> Result<Self, Errno> {
        let first_vpn = range.start.page_number();
        let nr_pages = range
            .end
            .raw()
            .div_ceil(PAGE_SIZE)
            .saturating_sub(first_vpn);
        let sh = Rc::new(Shared {
            platform: platform.clone(),
            lock: SimMutex::new(&platform.kernel.sim, "mirror.umem_mutex"),
            map: HmmDmaMap::alloc(platform, &dev, nr_pages),
            first_vpn,
            dev,
            pid,
            entries: RefCell::new(BTreeMap::new()),
        });
        let mirror = match HmmMirror::register(sh.clone(), range.start, range.len()) {
            Ok(m) => m,
            Err(e) => {
                sh.map.free()?;
                return Err(e);
            }
        };
        platform.kernel.sim.count("mirror.registrations", 1);
        Ok(Self { sh, mirror, range })
    }

    /// Returns the mirrored range.
    pub fn range(&self) -> Range<Va> {
        self.range
    }

    /// Returns the IOVA range reserved for the whole mirrored range (`dma_iova_try_alloc`), `None` when the
    /// mirror maps page by page (no translating domain, no room) or after `unregister`.
    pub fn iova_reservation(&self) -> Option<(peerdma_core::Iova, u64)> {
        self.sh.map.reservation()
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
                Target::Page(pfn) => all.pages.push(pfn.page),
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

    /// Faults `r` (page-aligned, inside the mirror) into the device: the shared loop of
    /// [`crate::hmm_mirror`], or, for a PFNMAP range, the path through the BAR's owner (`bar_fault`).
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
        // The device's trace track; an untraced run records nothing on it, so it is not built then.
        let track = if k.sim.tracing() {
            Track::device(sh.dev.name.as_str())
        } else {
            Track::Agent
        };
        let mut span = k.sim.span("device.fault", track.clone(), || {
            vec![
                ("va", TraceArg::Hex(r.start.raw())),
                ("pages", (r.len() / PAGE_SIZE).into()),
                ("write", write.into()),
            ]
        });
        let nr = k.sim.counter("mirror.faults");
        k.sim.gauge_device(
            &sh.dev.name,
            "device.faults",
            i64::try_from(nr).unwrap_or(i64::MAX),
        );
        let flow = k.sim.flow_begin("device.fault", track);
        let pfnmap = k
            .vma_at(sh.pid, r.start)
            .is_some_and(|v| v.flags.intersects(VmFlags::PFNMAP | VmFlags::IO));
        let res = if pfnmap {
            self.bar_fault(r, write).await
        } else {
            self.mirror.range_fault(r, write).await
        };
        // The fault resolves in the faulting thread's context.
        k.sim.flow_end(flow, Track::Agent);
        span.add_end_args(|| {
            let result: TraceArg = match res {
                Ok(()) => "ok".into(),
                Err(e) => e.name().into(),
            };
            vec![("result", result)]
        });
        res
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
        let seq = k.interval_read_begin(sh.pid, self.mirror.notifier()).await;
        let pages = {
            let lock = k.mmap_lock(sh.pid);
            let _m = lock.read().await;
            let mut out = Vec::new();
            for va in r.pages() {
                let vma = k.vma_at(sh.pid, va).ok_or(Errno::EFAULT)?;
                if write && !vma.flags.contains(VmFlags::WRITE) {
                    return Err(Errno::EPERM);
                }
                out.push(k.follow_pfnmap(sh.pid, va).ok_or(Errno::EFAULT)?);
            }
            out
        };
        let _g = sh.lock.lock().await;
        if k.interval_read_retry(sh.pid, self.mirror.notifier(), seq) {
            k.sim.count("mirror.retries", 1);
            return Err(Errno::EAGAIN);
        }
        let mut cost = SimDuration::ZERO;
        for (va, (mmio, pa)) in r.pages().zip(pages) {
            let att = sh.platform.dmabuf_attach(
                mmio,
                sh.dev.id,
                ImporterKind::Dynamic,
                vec![pa],
                write,
            )?;
            cost += sh.platform.dmabuf_map_cost(mmio, att);
            let old = sh.entries.borrow_mut().insert(
                va.page_number(),
                Entry {
                    write,
                    target: Target::Bar { mmio, att },
                },
            );
            if let Some(o) = old {
                cost += sh.release_target(va.page_number(), o.target);
            }
        }
        // The attachments' IOMMU mappings are made under the mirror lock, like the page mappings.
        k.spend(cost).await;
        Ok(())
    }

    /// The device writes one page `data` at `va` through its mirror, faulting it in first if the device has
    /// no (writable) entry (the ODP page-fault path).
    ///
    /// # Errors
    /// As [`DmaMirror::access`].
    pub async fn write_page(&self, va: Va, data: &[u8]) -> Result<(), Errno> {
        self.access(va, vec![DmaOp::Write(data.to_vec())])
            .await
            .map(drop)
    }

    /// The device reads one page at `va` through its mirror (see [`DmaMirror::write_page`]).
    ///
    /// # Errors
    /// As [`DmaMirror::access`].
    pub async fn read_page(&self, va: Va, buf: &mut [u8]) -> Result<(), Errno> {
        let data = self.access(va, vec![DmaOp::Read]).await?;
        buf.copy_from_slice(&data);
        Ok(())
    }

    /// The device runs `ops` on consecutive pages from `start` through its mirror and its access path
    /// ([`crate::space`]): each page's entry is looked up (and faulted in when missing, or read-only for
    /// a write — the ODP page-fault path) just before its request is issued, so requests pipeline up to
    /// the device's outstanding limit and an invalidation's fence waits for those in flight. A request a
    /// fence aborted is faulted and issued again. Returns the bytes read, 4 KiB per read.
    ///
    /// # Errors
    /// The errnos of [`DmaMirror::fault`]; `EFAULT` when the IOMMU faults or the oracle refuses an access;
    /// `ENODEV` for a revoked BAR.
    pub async fn access(&self, start: Va, ops: Vec<DmaOp>) -> Result<Vec<u8>, Errno> {
        let start = start.align_down(PAGE_SIZE);
        self.sh
            .dev
            .space
            .run_batch(ops, async |i, op| {
                self.issue(start.add(i as u64 * PAGE_SIZE), op).await
            })
            .await
            .into_result()
    }

    /// Looks up (faulting as needed) the device entry for `va` and issues one request through it.
    async fn issue(&self, va: Va, op: DmaOp) -> Result<RequestId, Errno> {
        let sh = &self.sh;
        let platform = &sh.platform;
        let write = op.is_write();
        loop {
            sh.dev.space.wait_tag().await;
            let hit = sh
                .entries
                .borrow()
                .get(&va.page_number())
                .filter(|e| e.write || !write)
                .map(|e| match &e.target {
                    Target::Page(pfn) => Ok(pfn.addr()),
                    Target::Bar { mmio, att } => {
                        platform.dmabuf_mapping(*mmio, *att).map(|p| p[0].addr)
                    }
                });
            let Some(addr) = hit else {
                let one = Range::from_len(va, PAGE_SIZE).ok_or(Errno::EFAULT)?;
                match self.fault(one, write).await {
                    // Raced with an invalidation: fault again, as the hardware would.
                    Err(Errno::EAGAIN) => {}
                    other => other?,
                }
                continue;
            };
            let req = DmaRequest {
                addr: DeviceAddr::Dma(addr?),
                grant: DeviceGrant::Mirror { pid: sh.pid, va },
                op,
            };
            return platform.dma_issue(&sh.dev, req);
        }
    }

    /// Unregisters the mirror (`ib_umem_odp_release`): zaps and unmaps every entry, removes the notifier,
    /// then frees the IOVA reservation (`hmm_dma_map_free`).
    pub async fn unregister(&self) {
        self.mirror.unmap_range(self.range).await;
        self.mirror.remove().await;
        let freed = self.sh.map.free();
        debug_assert!(freed.is_ok(), "every page was unmapped: {freed:?}");
    }
}
