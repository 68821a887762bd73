//! The long-term coherent translation mirror: a device mirrors a VA range of a process without pinning
//! anything (DESIGN.md §4.4; `spec/linux-p2p.md` §4.2–§4.3 (mlx5 ODP), `spec/linux-hmm.md` §1.2).
//!
//! Linux counterparts: drivers/infiniband/core/umem_odp.c (`ib_umem_odp_map_dma_and_lock`,
//! `ib_umem_odp_unmap_dma_pages`), drivers/infiniband/hw/mlx5/odp.c (`mlx5_ib_invalidate_range`), mm/hmm.c
//! `hmm_dma_map_pfn` (P2P-aware per-page DMA mapping).
//!
//! The fault loop and the invalidation are the shared ones of [`crate::hmm_mirror`] (its numbered steps);
//! this module supplies the ODP device side ([`MirrorDevice`]):
//! - program (fault step 7): DMA-map every returned page for the device (P2P pages by their map type: bus
//!   address, IOVA with the MMIO attribute, or `EREMOTEIO`) and program the device entries, spending the
//!   mappings' CPU time under the mirror lock (`umem_mutex`);
//! - zap (invalidate step 4): remove the device entries of the range; a notifier invalidation (not
//!   `unregister`) counts them in `mirror.invalidated_pages`;
//! - fence (invalidate step 5): wait until the device's in-flight requests holding a translation of the
//!   range have landed ([`crate::space::DmaSpace::fence`]);
//! - release (invalidate step 6): DMA-unmap (or detach) the zapped entries — after the zap and the fence:
//!   the device must stop using the addresses before the IOMMU mapping goes.
//!
//! A range in a PFNMAP VMA (a BAR without struct page) is mirrored through the BAR's owner instead of
//! `hmm_range_fault`, which refuses it: each page is a dynamic attachment to the owner's export
//! ([`crate::dmabuf`]), dropped by the same invalidations and revoked with the export.
//!
//! There is no pin anywhere: pages are free to migrate, swap or COW once an invalidation returns.
//! *Coarse:* one IOVA mapping per page (no MR-wide IOVA reservation); dirty tracking of written pages is
//! not modelled. The per-page work is Linux's: mm/hmm.c `hmm_dma_map_pfn` links and syncs one page at a
//! time (into a umem-wide IOVA span reserved by `dma_iova_try_alloc` when the device is behind an IOMMU,
//! else `dma_map_page` per page), and `ib_umem_odp_unmap_dma_pages` unlinks page by page, each with its
//! IOTLB sync — so a mirror fault or invalidation costs one IO PTE update (and, on unmap, one range
//! invalidation) per page here too; only the IOVA addresses differ from the reserved-span layout. The
//! device's table keeps each page's mapping inline (no per-page list) and an invalidation unmaps its
//! pages through one borrow of the domain (`Platform::unmap_iovas`).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt;
use std::rc::Rc;

use std::future::Future;
use std::pin::Pin;

use peerdma_core::{Errno, Iova, PAGE_SIZE, Pid, Range, SimDuration, Va};
use peerdma_mm::hmm::{HMM_PFN_WRITE, HmmRange, hmm_pfn_to_frame};
use peerdma_mm::mmu_notifier::NotifierRange;
use peerdma_mm::vma::VmFlags;
use peerdma_mm::{DeviceGrant, Kernel, MmioId};
use peerdma_sim::{SimMutex, TraceArg, Track};

use crate::dmabuf::{AttachId, ImporterKind};
use crate::hmm_mirror::{HmmMirror, MirrorDevice, ProgramCost};
use crate::map::{DmaSegment, MapTarget, MappedPage, MappedSg};
use crate::platform::{DmaDevice, Platform};
use crate::space::{DeviceAddr, DmaOp, DmaRequest, RequestId};

/// What a device entry points at.
#[derive(Clone, Copy, Debug)]
enum Target {
    /// A page with struct page, DMA-mapped for the device: its one mapped page and the IOVA range its
    /// `dma_map` allocated (`None`: an identity domain or a bus address), inline rather than a one-page
    /// list, so that the per-page table allocates nothing per page.
    Page {
        page: MappedPage,
        iova: Option<(Iova, u64)>,
    },
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
    /// DMA-unmaps (or detaches) one entry's target; returns the unmap's CPU time.
    fn release_target(&self, t: Target) -> SimDuration {
        match t {
            Target::Page { iova, .. } => self.platform.unmap_iovas(self.dev.id, &[iova]),
            Target::Bar { mmio, att } => self.platform.dmabuf_detach(mmio, att),
        }
    }
}

impl MirrorDevice for Shared {
    type Zapped = Vec<Entry>;

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

    /// Fault step 7, under the mirror lock: DMA-maps each page and programs its entry; the mappings' CPU
    /// time is spent before the lock drops.
    fn program(&self, range: &HmmRange) -> Result<ProgramCost, Errno> {
        let mut cost = SimDuration::ZERO;
        for (i, &w) in range.hmm_pfns.iter().enumerate() {
            let frame = hmm_pfn_to_frame(w);
            let write = w & HMM_PFN_WRITE != 0;
            let pa = self.platform.kernel.frame_pa(frame);
            let class = self.platform.classify(&self.dev, pa);
            let target = MapTarget {
                pa,
                class,
                mmio: false,
            };
            let sg = self.platform.map_targets(&self.dev, &[target], write)?;
            cost += sg.cost;
            let (page, iova) = sg.into_single().expect("one target maps one page");
            let vpn = range.start.page_number() + i as u64;
            let old = self.entries.borrow_mut().insert(
                vpn,
                Entry {
                    write,
                    target: Target::Page { page, iova },
                },
            );
            if let Some(o) = old {
                cost += self.release_target(o.target);
            }
        }
        Ok(ProgramCost {
            locked: cost,
            unlocked: SimDuration::ZERO,
        })
    }

    /// Removes the entries of the pages `r` touches; their mappings stay until `release`. One walk of the
    /// entries inside `r` (none outside it), and a range covering every entry takes the whole table.
    fn zap(&self, r: Range<Va>) -> Vec<Entry> {
        let mut e = self.entries.borrow_mut();
        let (lo, hi) = (r.start.page_number(), r.end.raw().div_ceil(PAGE_SIZE));
        let covers_all = e.first_key_value().is_none_or(|(&k, _)| k >= lo)
            && e.last_key_value().is_none_or(|(&k, _)| k < hi);
        if covers_all {
            return std::mem::take(&mut *e).into_values().collect();
        }
        e.extract_if(lo..hi, |_, _| true).map(|(_, v)| v).collect()
    }

    fn invalidated(&self, _range: &NotifierRange, zapped: &Vec<Entry>) {
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
    /// does, the pages' IOVA ranges through one batch ([`Platform::unmap_sgs`]); returns the unmaps' CPU
    /// time.
    fn release(&self, zapped: Vec<Entry>) -> SimDuration {
        let mut cost = SimDuration::ZERO;
        let mut iovas = Vec::with_capacity(zapped.len());
        for en in zapped {
            match en.target {
                Target::Page { iova, .. } => iovas.push(iova),
                Target::Bar { mmio, att } => {
                    // Keep the order of the unmaps: the pages before this one go first.
                    cost += self.platform.unmap_iovas(self.dev.id, &iovas);
                    iovas.clear();
                    cost += self.platform.dmabuf_detach(mmio, att);
                }
            }
        }
        cost + self.platform.unmap_iovas(self.dev.id, &iovas)
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
        let mirror = HmmMirror::register(sh.clone(), range.start, range.len())?;
        platform.kernel.sim.count("mirror.registrations", 1);
        Ok(Self { sh, mirror, range })
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
                Target::Page { page, .. } => all.pages.push(*page),
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
        let track = Track::device(sh.dev.name.as_str());
        let mut span = k.sim.span("device.fault", track.clone(), || {
            vec![
                ("va", TraceArg::Hex(r.start.raw())),
                ("pages", (r.len() / PAGE_SIZE).into()),
                ("write", write.into()),
            ]
        });
        let nr = k.sim.counter("mirror.faults");
        k.sim.gauge(
            track.clone(),
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
                cost += sh.release_target(o.target);
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
                    Target::Page { page, .. } => Ok(page.addr),
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

    /// Unregisters the mirror: zaps and unmaps every entry, removes the notifier (`ib_umem_odp_release`).
    pub async fn unregister(&self) {
        self.mirror.unmap_range(self.range).await;
        self.mirror.remove().await;
    }
}
