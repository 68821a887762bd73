//! The IOMMU side of SVA: binding state per (IOMMU, mm), the secondary-TLB invalidation of the ATCs with its
//! completion wait, and PRI page-request handling by a fault worker (drivers/iommu/iommu-sva.c,
//! io-pgfault.c; intel/svm.c, prq.c).

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::{Rc, Weak};

use peerdma_core::{DeviceId, PAGE_SIZE, Pid, SimDuration};
use peerdma_dma::FenceInjection;
use peerdma_iommu::{
    GroupId, PRQ_ENTRIES, PageRequest, PageResponseCode, Pasid, PasidEntry, PostOutcome, PriGroup,
    PriQueue, PriStats, Sva, SvaDomainId,
};
use peerdma_mm::oracle::ViolationKind;
use peerdma_mm::{IntervalNotifierOps, Kernel, NotifierEvent, NotifierId, NotifierRange, VmFlags};
use peerdma_sim::WaitQueue;

use super::accel::AccelInner;
use super::{ATC_INV_TIMEOUT, SvaCosts, SvaInjection, SvaStats};

/// Why a page request group got its answer, as the device sees it.
pub(super) type GroupKey = (Option<Pasid>, u16);

pub(super) struct UnitState {
    pub(super) prq: PriQueue,
    pub(super) worker_busy: bool,
}

pub(super) struct IommuInner {
    pub(super) kernel: Rc<Kernel>,
    pub(super) costs: SvaCosts,
    pub(super) sva: RefCell<Sva>,
    pub(super) units: RefCell<BTreeMap<u32, UnitState>>,
    pub(super) prq_entries: Cell<usize>,
    pub(super) flush_threshold_pages: Cell<u64>,
    pub(super) devices: RefCell<BTreeMap<DeviceId, Weak<AccelInner>>>,
    /// Per SVA domain: its mm, its notifier and the (device, PASID) slots attached.
    pub(super) domains: RefCell<BTreeMap<SvaDomainId, DomainState>>,
    /// Groups being handled by the fault worker, per device.
    pub(super) handling: RefCell<BTreeMap<DeviceId, u32>>,
    /// Groups the fault worker may handle at once (`None`: unbounded); past it a group is answered
    /// FAILURE (the IOPF workqueue refused it: `-EBUSY`).
    pub(super) iopf_limit: Cell<Option<u32>>,
    pub(super) injection: Cell<SvaInjection>,
    pub(super) stats: RefCell<SvaStats>,
    pub(super) wq: WaitQueue,
}

pub(super) struct DomainState {
    pub(super) mm: Pid,
    pub(super) notifier: Option<NotifierId>,
    pub(super) attached: Vec<(DeviceId, Pasid)>,
}

/// The IOMMU side of SVA (module docs). Cloning shares it.
#[derive(Clone)]
pub struct SvaIommu(pub(super) Rc<IommuInner>);

impl std::fmt::Debug for SvaIommu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SvaIommu").finish_non_exhaustive()
    }
}

/// The SVA mm notifier of one domain: the secondary-TLB hook.
pub(super) struct SvaNotifier {
    pub(super) iommu: Weak<IommuInner>,
    pub(super) domain: SvaDomainId,
}

impl IntervalNotifierOps for SvaNotifier {
    fn invalidate<'a>(
        &'a self,
        id: NotifierId,
        range: &'a NotifierRange,
        cur_seq: u64,
    ) -> Pin<Box<dyn Future<Output = bool> + 'a>> {
        Box::pin(async move {
            if let Some(inner) = self.iommu.upgrade() {
                // Marks the walk barrier closed until the invalidation ends (module docs).
                inner.kernel.interval_set_seq(range.mm, id, cur_seq);
                SvaIommu(inner)
                    .invalidate_secondary_tlbs(self.domain, range)
                    .await;
            }
            true
        })
    }

    fn name(&self) -> String {
        format!("sva-domain-{}", self.domain.0)
    }
}

impl SvaIommu {
    /// Creates the IOMMU side over `kernel` with a global PASID space of `nr_pasids`.
    pub fn new(kernel: &Rc<Kernel>, costs: SvaCosts, nr_pasids: u32) -> Self {
        Self(Rc::new(IommuInner {
            kernel: kernel.clone(),
            costs,
            sva: RefCell::new(Sva::new(nr_pasids)),
            units: RefCell::default(),
            prq_entries: Cell::new(PRQ_ENTRIES),
            flush_threshold_pages: Cell::new(512),
            devices: RefCell::default(),
            domains: RefCell::default(),
            handling: RefCell::default(),
            iopf_limit: Cell::new(None),
            injection: Cell::new(SvaInjection::None),
            stats: RefCell::default(),
            wq: WaitQueue::new(&kernel.sim),
        }))
    }

    /// Sets the page-request queue size of units created from now on (VT-d: 2,048).
    pub fn set_prq_entries(&self, entries: usize) {
        self.0.prq_entries.set(entries.max(1));
    }

    /// Sets the range (in pages) from which a secondary-TLB flush becomes a whole-PASID flush.
    pub fn set_flush_threshold_pages(&self, pages: u64) {
        self.0.flush_threshold_pages.set(pages.max(1));
    }

    /// Bounds the groups the fault worker handles at once (past it: FAILURE).
    pub fn set_iopf_limit(&self, limit: Option<u32>) {
        self.0.iopf_limit.set(limit);
    }

    /// Injects a bug (tests of the checkers only).
    pub fn inject(&self, i: SvaInjection) {
        self.0.injection.set(i);
        for d in self.0.devices.borrow().values().filter_map(Weak::upgrade) {
            d.space.inject(if i == SvaInjection::SkipAtcWait {
                FenceInjection::SkipWait
            } else {
                FenceInjection::None
            });
        }
    }

    /// Marks an mm as unusable by the IOMMU (`arch_pgtable_dma_compat` fails: bind is `EBUSY`).
    pub fn set_mm_incompatible(&self, mm: Pid, incompatible: bool) {
        self.0
            .sva
            .borrow_mut()
            .set_mm_incompatible(mm, incompatible);
    }

    /// Attaches a non-SVA domain to (group, PASID) (bind landing there is `EBUSY`).
    pub fn attach_non_sva(&self, group: u32, pasid: Pasid) {
        self.0.sva.borrow_mut().attach_non_sva(group, pasid);
    }

    /// Returns the counters.
    pub fn stats(&self) -> SvaStats {
        *self.0.stats.borrow()
    }

    /// Returns the page-request queue counters of IOMMU unit `unit`.
    pub fn pri_stats(&self, unit: u32) -> PriStats {
        self.0
            .units
            .borrow()
            .get(&unit)
            .map(|u| u.prq.stats())
            .unwrap_or_default()
    }

    /// Returns the PASID `mm` holds.
    pub fn mm_pasid(&self, mm: Pid) -> Option<Pasid> {
        self.0.sva.borrow().mm_pasid(mm)
    }

    pub(super) fn unit_of(&self, dev: DeviceId) -> u32 {
        self.0.sva.borrow().device(dev).map_or(0, |i| i.iommu)
    }

    /// The secondary-TLB flush of `domain` for `range` (module docs, steps 1–5).
    pub(super) async fn invalidate_secondary_tlbs(
        &self,
        domain: SvaDomainId,
        range: &NotifierRange,
    ) {
        let inner = &self.0;
        let k = &inner.kernel;
        let (mm, attached) = match inner.domains.borrow().get(&domain) {
            Some(d) => (d.mm, d.attached.clone()),
            None => return,
        };
        if range.event == NotifierEvent::Release {
            inner.sva.borrow_mut().mm_release(mm);
        }
        let r = range.range;
        let nr_pages = (r.end.raw() - r.start.raw()).div_ceil(PAGE_SIZE);
        let full =
            range.event == NotifierEvent::Release || nr_pages >= inner.flush_threshold_pages.get();
        {
            let mut st = inner.stats.borrow_mut();
            st.iotlb_invalidations += 1;
            st.full_flushes += u64::from(full);
        }
        k.sim.count("sva.iotlb_invalidations", 1);
        let devs: Vec<(Rc<AccelInner>, Pasid)> = attached
            .iter()
            .filter_map(|(d, p)| Some((inner.devices.borrow().get(d)?.upgrade()?, *p)))
            .collect();
        let hung = inner.injection.get() == SvaInjection::IgnoreAtcInvalidation;
        for (d, pasid) in devs.iter().filter(|_| !hung) {
            let mut atc = d.atc.borrow_mut();
            if full {
                atc.invalidate_pasid(*pasid);
            } else {
                atc.invalidate(*pasid, r);
            }
            k.sim.count("sva.atc_invalidations", 1);
        }
        k.sim.trace("sva.flush", || {
            format!(
                "pid {} {r} {:?}{}",
                mm.0,
                range.event,
                if full { " (whole PASID)" } else { "" }
            )
        });
        if devs.is_empty() {
            return;
        }
        if hung {
            // No completion comes: SMMUv3's CMD_SYNC poll times out, the driver logs it and proceeds
            // (VT-d would retry while the device is present: not modelled).
            k.sim.sleep(ATC_INV_TIMEOUT).await;
            k.sim.count("sva.atc_inv_timeouts", 1);
            k.sim.trace("sva.flush", || {
                format!("pid {} {r}: ATC invalidation timed out", mm.0)
            });
            return;
        }
        if inner.injection.get() != SvaInjection::SkipAtcWait {
            k.sim.sleep(inner.costs.ats_invalidation).await;
        }
        for (d, _) in &devs {
            d.space.fence(mm, r).await;
        }
    }

    /// Posts a page request of device `dev` (step 4 of a translation) and waits for its group's response.
    pub(super) async fn page_request(
        &self,
        dev: &AccelInner,
        req: PageRequest,
    ) -> PageResponseCode {
        let inner = &self.0;
        let k = &inner.kernel;
        k.sim.count("sva.pri_requests", 1);
        let unit = self.unit_of(dev.id);
        let outcome = {
            let mut units = inner.units.borrow_mut();
            let u = units.entry(unit).or_insert_with(|| UnitState {
                prq: PriQueue::new(inner.prq_entries.get()),
                worker_busy: false,
            });
            u.prq.post(req)
        };
        let key = (req.pasid, req.grpid);
        match outcome {
            PostOutcome::Queued => self.kick_worker(unit),
            PostOutcome::Dropped(auto) => {
                k.sim.count("sva.pri_dropped", 1);
                if let Some(r) = auto {
                    k.sim.count("sva.pri_auto_responses", 1);
                    dev.responses.borrow_mut().insert(key, r.code);
                }
            }
        }
        dev.wq
            .wait_event(|| dev.responses.borrow().contains_key(&key))
            .await;
        dev.responses
            .borrow_mut()
            .remove(&key)
            .expect("waited for it")
    }

    /// Starts the unit's queue thread if it is idle.
    pub(super) fn kick_worker(&self, unit: u32) {
        let inner = &self.0;
        {
            let mut units = inner.units.borrow_mut();
            let u = units.get_mut(&unit).expect("posted to it");
            if u.worker_busy {
                return;
            }
            u.worker_busy = true;
        }
        let me = self.clone();
        inner
            .kernel
            .sim
            .spawn(format!("iommu{unit}.prq"), async move {
                me.prq_thread(unit).await;
            });
    }

    /// The queue thread (prq.c's event thread): the interrupt latency, then drains the queue and hands
    /// each group to the fault worker (unordered across groups).
    pub(super) async fn prq_thread(&self, unit: u32) {
        let inner = &self.0;
        let k = &inner.kernel;
        loop {
            k.sim
                .sleep(SimDuration::from_nanos(
                    inner.costs.pri_service.as_nanos() / 2,
                ))
                .await;
            let groups = {
                let mut units = inner.units.borrow_mut();
                let u = units.get_mut(&unit).expect("a running thread's unit");
                let g = u.prq.drain_hw();
                if g.is_empty() && u.prq.is_empty() {
                    u.worker_busy = false;
                }
                g
            };
            if groups.is_empty() {
                return;
            }
            for g in groups {
                let me = self.clone();
                k.sim.spawn(format!("iopf.{}", g.id.0), async move {
                    me.handle_group(unit, g).await;
                });
            }
        }
    }

    /// The SVA fault worker for one group (`iommu_sva_handle_iopf`): faults in order, the first failure is
    /// sticky; one response.
    pub(super) async fn handle_group(&self, unit: u32, g: PriGroup) {
        let inner = &self.0;
        let k = &inner.kernel;
        let dev = g.faults.last().expect("a group has its last page").dev;
        let busy = {
            let mut h = inner.handling.borrow_mut();
            let n = h.entry(dev).or_insert(0);
            *n += 1;
            *n
        };
        let code = if inner.iopf_limit.get().is_some_and(|l| busy > l) {
            PageResponseCode::Failure
        } else {
            let mut code = PageResponseCode::Success;
            for f in &g.faults {
                code = self.handle_fault(f).await;
                if code != PageResponseCode::Success {
                    break;
                }
            }
            code
        };
        k.sim
            .sleep(SimDuration::from_nanos(
                inner.costs.pri_service.as_nanos() / 2,
            ))
            .await;
        self.respond(unit, g.id, code);
        if inner.injection.get() == SvaInjection::RespondTwice {
            self.respond(unit, g.id, code);
        }
        if let Some(n) = inner.handling.borrow_mut().get_mut(&dev) {
            *n -= 1;
        }
        inner.wq.wake_up_all();
    }

    pub(super) fn respond(&self, unit: u32, id: GroupId, code: PageResponseCode) {
        let inner = &self.0;
        let k = &inner.kernel;
        let r = inner
            .units
            .borrow_mut()
            .get_mut(&unit)
            .expect("a group's unit")
            .prq
            .respond(id, code);
        match r {
            Ok(resp) => {
                k.sim.count(
                    match code {
                        PageResponseCode::Success => "sva.pri_success",
                        PageResponseCode::Invalid => "sva.pri_invalid",
                        PageResponseCode::Failure => "sva.pri_failure",
                    },
                    1,
                );
                let dev = inner
                    .devices
                    .borrow()
                    .get(&resp.dev)
                    .and_then(Weak::upgrade);
                if let Some(d) = dev {
                    d.responses
                        .borrow_mut()
                        .insert((resp.pasid, resp.grpid), code);
                    d.wq.wake_up_all();
                }
            }
            Err(e) => k.report_violation(
                ViolationKind::Protocol,
                format!("IOMMU page response protocol: {e}"),
            ),
        }
    }

    /// One page request (`iommu_sva_handle_mm`, spec table of its conditions).
    pub(super) async fn handle_fault(&self, f: &PageRequest) -> PageResponseCode {
        let inner = &self.0;
        let k = &inner.kernel;
        let Some(pasid) = f.pasid else {
            return PageResponseCode::Invalid;
        };
        let entry = inner.sva.borrow().entry(f.dev, pasid);
        let Some(PasidEntry::Valid(pid)) = entry else {
            return PageResponseCode::Invalid;
        };
        if !k.is_alive(pid) {
            return PageResponseCode::Invalid;
        }
        let lock = k.mmap_lock(pid);
        let _g = lock.read().await;
        if !k.is_alive(pid) {
            return PageResponseCode::Invalid;
        }
        let Some(vma) = k.vma_at(pid, f.addr) else {
            return PageResponseCode::Invalid;
        };
        let need = if f.write {
            VmFlags::WRITE
        } else {
            VmFlags::READ
        };
        if !vma.flags.contains(need) {
            return PageResponseCode::Invalid;
        }
        match k.handle_mm_fault(pid, f.addr, f.write).await {
            Ok(()) => PageResponseCode::Success,
            Err(_) => PageResponseCode::Invalid,
        }
    }
}
