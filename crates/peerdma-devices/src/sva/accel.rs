//! The SVA accelerator: PASID bonds, work queues of copy/fill descriptors over user VAs, the ATS ATC, PRI page
//! requests and completion records (the shape of Intel DSA / a CAPI AFU: drivers/dma/idxd).

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;

use peerdma_core::{DeviceId, Errno, FrameId, PAGE_SHIFT, PAGE_SIZE, Pid, Va};
use peerdma_dma::{DmaOp, DmaSpace, FenceInjection};
use peerdma_iommu::{
    Atc, AtcLookup, AtcStats, AtsCompletion, PageRequest, PageResponseCode, Pasid, PasidEntry,
    SvaHandle,
};
use peerdma_mm::{DeviceGrant, FrameTranslation};
use peerdma_sim::WaitQueue;

use super::descriptor::{
    CompletionRecord, CompletionStatus, Descriptor, JobId, Order, SvaAccelConfig,
};
use super::iommu::{DomainState, GroupKey, SvaIommu, SvaNotifier};
use super::{MAX_PRI_ROUNDS, SvaDevError, SvaDevResult, SvaInjection, USER_VA_END};

pub(super) struct Bond {
    pub(super) handle: SvaHandle,
    pub(super) pasid: Pasid,
}

pub(super) struct Job {
    pub(super) pasid: Pasid,
    pub(super) result: Option<CompletionRecord>,
}

pub(super) struct AccelInner {
    pub(super) id: DeviceId,
    pub(super) name: String,
    pub(super) iommu: SvaIommu,
    pub(super) space: DmaSpace,
    pub(super) atc: RefCell<Atc<(FrameId, u64)>>,
    pub(super) wq_depth: usize,
    pub(super) bonds: RefCell<BTreeMap<Pid, Bond>>,
    pub(super) jobs: RefCell<BTreeMap<JobId, Job>>,
    pub(super) next_job: Cell<u64>,
    pub(super) next_grpid: Cell<u16>,
    pub(super) responses: RefCell<BTreeMap<GroupKey, PageResponseCode>>,
    pub(super) wq: WaitQueue,
    /// The per-device counter names of its ATC lookups (`sva.<name>.atc_hits` / `atc_misses`), made once.
    pub(super) hits_counter: String,
    pub(super) misses_counter: String,
}

/// The SVA accelerator (module docs). Cloning shares it.
#[derive(Clone)]
pub struct SvaAccel(pub(super) Rc<AccelInner>);

impl std::fmt::Debug for SvaAccel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SvaAccel")
            .field("name", &self.0.name)
            .finish_non_exhaustive()
    }
}

/// Why a page could not be accessed.
#[derive(Clone, Copy)]
pub(super) enum Stop {
    Fault(Va),
    Aborted,
}

impl SvaAccel {
    /// Creates the accelerator `id` behind `iommu`.
    ///
    /// # Errors
    /// [`SvaDevError::Sva`] when the device id was used before.
    pub fn new(
        iommu: &SvaIommu,
        id: DeviceId,
        name: &str,
        cfg: SvaAccelConfig,
    ) -> SvaDevResult<Self> {
        iommu.0.sva.borrow_mut().add_device(id, cfg.info)?;
        let k = &iommu.0.kernel;
        let wq_depth = cfg.wq_depth.max(1);
        let space = DmaSpace::new(k, id, name, u32::try_from(wq_depth * 2).unwrap_or(u32::MAX));
        if iommu.0.injection.get() == SvaInjection::SkipAtcWait {
            space.inject(FenceInjection::SkipWait);
        }
        let inner = Rc::new(AccelInner {
            id,
            name: name.to_owned(),
            iommu: iommu.clone(),
            space,
            atc: RefCell::new(Atc::new(cfg.atc)),
            wq_depth,
            bonds: RefCell::default(),
            jobs: RefCell::default(),
            next_job: Cell::new(1),
            next_grpid: Cell::new(0),
            responses: RefCell::default(),
            wq: WaitQueue::new(&k.sim),
            hits_counter: format!("sva.{name}.atc_hits"),
            misses_counter: format!("sva.{name}.atc_misses"),
        });
        iommu
            .0
            .devices
            .borrow_mut()
            .insert(id, Rc::downgrade(&inner));
        Ok(Self(inner))
    }

    /// Returns the device id.
    pub fn id(&self) -> DeviceId {
        self.0.id
    }

    /// Returns the ATC counters.
    pub fn atc_stats(&self) -> AtcStats {
        self.0.atc.borrow().stats()
    }

    /// Returns the number of ATC entries held.
    pub fn atc_len(&self) -> usize {
        self.0.atc.borrow().len()
    }

    /// Returns the access path (its in-flight requests).
    pub fn space(&self) -> &DmaSpace {
        &self.0.space
    }

    /// Returns the number of descriptors outstanding.
    pub fn nr_outstanding(&self) -> usize {
        self.0
            .jobs
            .borrow()
            .values()
            .filter(|j| j.result.is_none())
            .count()
    }

    /// Binds `pid`'s address space (`iommu_sva_bind_device`); returns its PASID. Binding again takes one
    /// more reference on the same bond.
    ///
    /// # Errors
    /// The bind errnos of [`peerdma_iommu::sva`] as [`SvaDevError::Errno`].
    pub fn bind(&self, pid: Pid) -> SvaDevResult<Pasid> {
        let inner = &self.0;
        let iommu = &inner.iommu.0;
        if !iommu.kernel.is_alive(pid) {
            return Err(SvaDevError::Errno(Errno::EINVAL));
        }
        let bond = iommu.sva.borrow_mut().bind(inner.id, pid)?;
        if bond.new {
            let fresh = !iommu.domains.borrow().contains_key(&bond.domain);
            if fresh {
                let ops = Rc::new(SvaNotifier {
                    iommu: Rc::downgrade(iommu),
                    domain: bond.domain,
                });
                let id = iommu
                    .kernel
                    .interval_notifier_insert(pid, Va::from_raw(0), USER_VA_END, ops)
                    .ok();
                iommu.domains.borrow_mut().insert(
                    bond.domain,
                    DomainState {
                        mm: pid,
                        notifier: id,
                        attached: Vec::new(),
                    },
                );
            }
            iommu
                .domains
                .borrow_mut()
                .get_mut(&bond.domain)
                .expect("inserted above")
                .attached
                .push((inner.id, bond.pasid));
            inner.bonds.borrow_mut().insert(
                pid,
                Bond {
                    handle: bond.handle,
                    pasid: bond.pasid,
                },
            );
        }
        iommu.kernel.sim.count("sva.binds", 1);
        Ok(bond.pasid)
    }

    /// Drops one reference of `pid`'s bond (`iommu_sva_unbind_device`); at the last, the PASID stop
    /// protocol of the module docs runs first: wait for the PASID's descriptors, drain its page requests,
    /// flush the ATC of the PASID, detach.
    ///
    /// # Errors
    /// [`SvaDevError::NotBound`] when `pid` is not bound.
    pub async fn unbind(&self, pid: Pid) -> SvaDevResult<()> {
        let inner = &self.0;
        let iommu = &inner.iommu.0;
        let (handle, pasid) = match inner.bonds.borrow().get(&pid) {
            Some(b) => (b.handle, b.pasid),
            None => return Err(SvaDevError::NotBound(pid.0)),
        };
        if iommu.sva.borrow().handle_users(handle) > 1 {
            iommu.sva.borrow_mut().unbind(handle)?;
            return Ok(());
        }
        // 1. The device stops using the PASID.
        inner
            .wq
            .wait_event(|| {
                !inner
                    .jobs
                    .borrow()
                    .values()
                    .any(|j| j.pasid == pasid && j.result.is_none())
            })
            .await;
        // 2. Drain page requests: the hardware queue and partial groups, pending groups answered INVALID,
        //    then wait for the fault worker's groups of this device (`iopf_queue_flush_dev`).
        let unit = inner.iommu.unit_of(inner.id);
        if let Some(u) = iommu.units.borrow_mut().get_mut(&unit) {
            u.prq.remove_device(inner.id, Some(pasid));
        }
        iommu
            .wq
            .wait_event(|| {
                iommu
                    .handling
                    .borrow()
                    .get(&inner.id)
                    .is_none_or(|n| *n == 0)
            })
            .await;
        // 3. No translation of the PASID survives it.
        inner.atc.borrow_mut().invalidate_pasid(pasid);
        // 4. Detach.
        inner.bonds.borrow_mut().remove(&pid);
        let domain = {
            let mut domains = iommu.domains.borrow_mut();
            let mut gone = None;
            for (id, d) in domains.iter_mut() {
                d.attached.retain(|a| *a != (inner.id, pasid));
                if d.attached.is_empty() && d.mm == pid {
                    gone = Some((*id, d.notifier));
                }
            }
            if let Some((id, _)) = gone {
                domains.remove(&id);
            }
            gone
        };
        iommu.sva.borrow_mut().unbind(handle)?;
        if let Some((_, Some(n))) = domain {
            iommu.kernel.interval_notifier_remove(pid, n).await;
        }
        iommu.kernel.sim.count("sva.unbinds", 1);
        Ok(())
    }

    /// Submits descriptor `desc` of `pid` (ENQCMD to a shared work queue), with its completion record at
    /// `completion` (page aligned) and block-on-fault (`true`: page faults go through PRI). Returns the job.
    ///
    /// # Errors
    /// `EAGAIN` (as [`SvaDevError::Errno`]) when the work queue is full; [`SvaDevError::NotBound`];
    /// [`SvaDevError::Unaligned`] for a range that is not whole pages.
    pub fn submit(
        &self,
        pid: Pid,
        desc: Descriptor,
        completion: Va,
        block_on_fault: bool,
    ) -> SvaDevResult<JobId> {
        self.submit_ordered(pid, desc, Order::Sequential, completion, block_on_fault)
    }

    /// [`SvaAccel::submit`] with the pages visited in `order`. `bytes_completed` of a descriptor that stops
    /// early counts the pages done before the failing one, whatever their order.
    ///
    /// # Errors
    /// As [`SvaAccel::submit`].
    pub fn submit_ordered(
        &self,
        pid: Pid,
        desc: Descriptor,
        order: Order,
        completion: Va,
        block_on_fault: bool,
    ) -> SvaDevResult<JobId> {
        let inner = &self.0;
        let pasid = inner
            .bonds
            .borrow()
            .get(&pid)
            .map(|b| b.pasid)
            .ok_or(SvaDevError::NotBound(pid.0))?;
        let ranges: &[(Va, u64)] = match desc {
            Descriptor::Copy { src, dst, len } => &[(src, len), (dst, len)],
            Descriptor::Fill { dst, len, .. } => &[(dst, len)],
        };
        for &(addr, len) in ranges.iter().chain([&(completion, PAGE_SIZE)]) {
            if addr.page_offset() != 0 || len % PAGE_SIZE != 0 || len == 0 {
                return Err(SvaDevError::Unaligned {
                    addr: addr.raw(),
                    len,
                });
            }
        }
        if self.nr_outstanding() >= inner.wq_depth {
            inner.iommu.0.kernel.sim.count("sva.wq_full", 1);
            return Err(SvaDevError::Errno(Errno::EAGAIN));
        }
        let id = JobId(inner.next_job.get());
        inner.next_job.set(id.0 + 1);
        inner.jobs.borrow_mut().insert(
            id,
            Job {
                pasid,
                result: None,
            },
        );
        let me = self.clone();
        let sim = inner.iommu.0.kernel.sim.clone();
        let len = match desc {
            Descriptor::Copy { len, .. } | Descriptor::Fill { len, .. } => len,
        };
        let mut rng = sim.rng(&format!("{}.order{}", inner.name, id.0));
        let pages = order.pages(len / PAGE_SIZE, |n| rng.between(0, n - 1));
        sim.spawn(format!("{}.job{}", inner.name, id.0), async move {
            let rec = me.run(pid, pasid, desc, &pages, block_on_fault).await;
            me.finish(id, pid, pasid, completion, rec).await;
        });
        Ok(id)
    }

    /// Waits for job `id` and returns its completion record (and forgets the job).
    ///
    /// # Errors
    /// [`SvaDevError::UnknownJob`].
    pub async fn wait(&self, id: JobId) -> SvaDevResult<CompletionRecord> {
        let inner = &self.0;
        if !inner.jobs.borrow().contains_key(&id) {
            return Err(SvaDevError::UnknownJob(id.0));
        }
        inner
            .wq
            .wait_event(|| {
                inner
                    .jobs
                    .borrow()
                    .get(&id)
                    .is_none_or(|j| j.result.is_some())
            })
            .await;
        inner
            .jobs
            .borrow_mut()
            .remove(&id)
            .and_then(|j| j.result)
            .ok_or(SvaDevError::UnknownJob(id.0))
    }

    pub(super) async fn run(
        &self,
        pid: Pid,
        pasid: Pasid,
        desc: Descriptor,
        pages: &[u64],
        block_on_fault: bool,
    ) -> CompletionRecord {
        let dst = match desc {
            Descriptor::Copy { dst, .. } | Descriptor::Fill { dst, .. } => dst,
        };
        let mut done = 0;
        for &i in pages {
            let off = i * PAGE_SIZE;
            let data = match desc {
                Descriptor::Copy { src, .. } => match self
                    .access(pid, pasid, src.add(off), None, block_on_fault)
                    .await
                {
                    Ok(d) => d,
                    Err(stop) => return Self::stopped(stop, done),
                },
                Descriptor::Fill { pattern, .. } => pattern.to_le_bytes().repeat(512),
            };
            if let Err(stop) = self
                .access(pid, pasid, dst.add(off), Some(data), block_on_fault)
                .await
            {
                return Self::stopped(stop, done);
            }
            done += PAGE_SIZE;
        }
        CompletionRecord {
            status: CompletionStatus::Success,
            bytes_completed: done,
            fault_addr: None,
        }
    }

    pub(super) fn stopped(stop: Stop, done: u64) -> CompletionRecord {
        match stop {
            Stop::Fault(va) => CompletionRecord {
                status: CompletionStatus::PageFault,
                bytes_completed: done,
                fault_addr: Some(va),
            },
            Stop::Aborted => CompletionRecord {
                status: CompletionStatus::Aborted,
                bytes_completed: done,
                fault_addr: None,
            },
        }
    }

    pub(super) async fn finish(
        &self,
        id: JobId,
        pid: Pid,
        pasid: Pasid,
        completion: Va,
        rec: CompletionRecord,
    ) {
        let inner = &self.0;
        let k = &inner.iommu.0.kernel;
        // The completion record goes to user memory like any other write (it may fault or abort too).
        let bytes = rec.to_bytes().to_vec();
        let wrote = self
            .access(pid, pasid, completion, Some(bytes), true)
            .await
            .is_ok();
        if rec.status == CompletionStatus::Aborted {
            inner.iommu.0.stats.borrow_mut().aborts += 1;
            k.sim.count("sva.aborts", 1);
        }
        k.sim.count(
            match rec.status {
                CompletionStatus::Success => "sva.desc_success",
                CompletionStatus::PageFault => "sva.desc_page_fault",
                CompletionStatus::Aborted => "sva.desc_aborted",
            },
            1,
        );
        k.sim.trace("sva.complete", || {
            format!(
                "{} job {} {:?} {} bytes{}",
                inner.name,
                id.0,
                rec.status,
                rec.bytes_completed,
                if wrote { "" } else { " (record not written)" }
            )
        });
        if let Some(j) = inner.jobs.borrow_mut().get_mut(&id) {
            j.result = Some(rec);
        }
        inner.wq.wake_up_all();
    }

    /// Translates (module docs, steps 1–4) and accesses one page: a read when `data` is `None`, else a
    /// write of `data`.
    pub(super) async fn access(
        &self,
        pid: Pid,
        pasid: Pasid,
        va: Va,
        data: Option<Vec<u8>>,
        block_on_fault: bool,
    ) -> Result<Vec<u8>, Stop> {
        let inner = &self.0;
        let iommu = &inner.iommu.0;
        let k = &iommu.kernel;
        let write = data.is_some();
        let mut pri_rounds = 0u32;
        // A completion just cached, used at once (no second lookup: the miss already counted).
        let mut fresh = None;
        loop {
            // Step 1.
            match iommu.sva.borrow().entry(inner.id, pasid) {
                Some(PasidEntry::Valid(p)) if p == pid => {}
                _ => return Err(Stop::Aborted),
            }
            // Step 2.
            let hit =
                fresh
                    .take()
                    .or_else(|| match inner.atc.borrow_mut().lookup(pasid, va, write) {
                        AtcLookup::Hit(c) => {
                            k.sim.count("sva.atc_hits", 1);
                            k.sim.count(&inner.hits_counter, 1);
                            Some(c)
                        }
                        AtcLookup::ReadOnly(_) | AtcLookup::Miss => None,
                    });
            if let Some(c) = hit {
                let page = (va.raw() >> PAGE_SHIFT) - c.base_page;
                let (base, generation) = c.target;
                let frame = FrameId(base.0 + page);
                let t = FrameTranslation {
                    frame,
                    generation,
                    grant: DeviceGrant::Mirror { pid, va },
                };
                let op = match &data {
                    Some(d) => DmaOp::Write(d.clone()),
                    None => DmaOp::Read,
                };
                let wire = iommu.costs.page_transfer;
                let id = inner
                    .space
                    .submit_frame(t, op, wire)
                    .await
                    .map_err(|_| Stop::Fault(va))?;
                return match inner.space.wait(id).await {
                    Ok(d) => Ok(d),
                    Err(Errno::EAGAIN) => continue,
                    Err(_) => Err(Stop::Fault(va)),
                };
            }
            // Step 3: a translation request.
            k.sim.count("sva.atc_misses", 1);
            k.sim.count(&inner.misses_counter, 1);
            k.sim.count("sva.translation_requests", 1);
            iommu.stats.borrow_mut().translation_requests += 1;
            k.sim.sleep(iommu.costs.ats_translation).await;
            let notifier = iommu
                .domains
                .borrow()
                .values()
                .find(|d| d.mm == pid)
                .and_then(|d| d.notifier);
            if let Some(n) = notifier {
                k.interval_read_begin(pid, n).await;
            }
            match iommu.sva.borrow().entry(inner.id, pasid) {
                Some(PasidEntry::Valid(p)) if p == pid => {}
                _ => return Err(Stop::Aborted),
            }
            let walk = k.is_alive(pid).then(|| k.translate(pid, va)).flatten();
            if let Some((frame, writable)) = walk
                && (writable || !write)
                && let Some(generation) = k.frame_generation(frame)
            {
                // Completions are one page: the model does not ask the mm for its leaf size (the ATC
                // itself holds larger ranges; see `peerdma_iommu::ats`).
                let c = AtsCompletion {
                    target: (frame, generation),
                    base_page: va.raw() >> PAGE_SHIFT,
                    nr_pages: 1,
                    read: true,
                    write: writable,
                };
                inner.atc.borrow_mut().insert(pasid, c);
                fresh = Some(c);
                continue;
            }
            // Step 4: no translation.
            if !block_on_fault || pri_rounds >= MAX_PRI_ROUNDS {
                return Err(Stop::Fault(va));
            }
            pri_rounds += 1;
            let grpid = inner.next_grpid.get();
            inner.next_grpid.set(grpid.wrapping_add(1) % 512);
            let req = PageRequest {
                dev: inner.id,
                pasid: Some(pasid),
                addr: va,
                write,
                grpid,
                last: true,
            };
            match inner.iommu.page_request(inner, req).await {
                PageResponseCode::Success => {}
                PageResponseCode::Invalid | PageResponseCode::Failure => {
                    let valid = matches!(
                        iommu.sva.borrow().entry(inner.id, pasid),
                        Some(PasidEntry::Valid(p)) if p == pid
                    );
                    return Err(if valid {
                        Stop::Fault(va)
                    } else {
                        Stop::Aborted
                    });
                }
            }
        }
    }
}
