//! CAPI in software: an SVA accelerator (the shape of Intel DSA or a CAPI AFU) that DMAs to a process's
//! virtual addresses by PASID, translating through its ATC with PCIe ATS and faulting pages in with PRI.
//!
//! Two objects:
//! - [`SvaIommu`]: the IOMMU side — SVA binding ([`peerdma_iommu::sva`]), one page-request queue per IOMMU
//!   unit ([`peerdma_iommu::pri`], VT-d flavour), the IOPF fault worker, the SVA mm notifier that makes the
//!   SVA domain a **secondary TLB** of the CPU (drivers/iommu/iommu-sva.c, io-pgfault.c, intel/svm.c,
//!   intel/prq.c);
//! - [`SvaAccel`]: the device — work queues of copy/fill descriptors over user VAs, a bounded number of
//!   descriptors outstanding, an ATC ([`peerdma_iommu::ats`]), completion records written to user memory.
//!   Its DMA goes through the one access path, [`DmaSpace`], with a [`DeviceGrant::Mirror`] grant: the
//!   oracle's rule "a translation is valid until the invalidation that removes it completes" is exactly
//!   the ATS contract.
//!
//! **Translation of one page** (device side):
//! 1. The PASID-table entry must be valid (after process exit it aborts everything: status `Aborted`).
//! 2. ATC lookup: a hit is used at once (no CPU page-table check: that is the point of a cache).
//! 3. A miss (or a write hitting a read-only entry) sends a **translation request**: it costs
//!    `sva.ats_translation`; the IOMMU walks the CPU page table with the CPU's permission rules and the
//!    completion (permission + range size: 4 KiB, or 2 MiB for a PMD leaf) is cached.
//! 4. No translation (not present, or read-only for a write): with block-on-fault the device posts a page
//!    request (PRI) and waits for its group's response: SUCCESS → step 1 again; INVALID / FAILURE → the
//!    descriptor completes with `PageFault`. Without block-on-fault it completes with `PageFault` at once.
//!
//! **Secondary-TLB invalidation** (the SVA mm notifier, `arch_invalidate_secondary_tlbs`), on every CPU
//! TLB-flush path of the mm (munmap, mprotect, madvise, migration, reclaim, COW, fork's write-protect,
//! exit), as numbered steps:
//! 1. invalidate the IOMMU's IOTLB for the PASID (counted; the IOMMU's own IOTLB is not modelled as a cache);
//! 2. a range of at least `flush_threshold_pages` (512: SMMUv3 without range invalidation) becomes a
//!    whole-PASID flush; otherwise every attached device's ATC gets an invalidation of the power-of-two
//!    aligned span covering the range;
//! 3. the invalidation request and its completion message cost `sva.ats_invalidation`;
//! 4. the completion is the device's **fence**: it is sent only after every request holding a dropped
//!    translation has landed ([`DmaSpace::fence`]);
//! 5. only then does the CPU side go on and free pages.
//!
//! *Reality argued with:* Linux calls the hook after the PTE changed (from the TLB flush); the model's mm
//! calls its notifiers at `invalidate_range_start`, before the PTE changes. So that a translation request
//! cannot re-read the old PTE between the flush and the PTE change, the IOMMU's walk waits while an
//! invalidation of the mm is in progress (the notifier's `read_begin` used as a barrier: no sequence is
//! compared, nothing is retried). The effect is the same: a walk after the flush sees the new PTE.
//!
//! **Exit and unbind ordering**: process exit runs the notifier's RELEASE: every PASID entry of the mm
//! aborts, every ATC drops the PASID and the fence drains in-flight DMA before the mm frees anything; the
//! PASID stays allocated until the last unbind. Unbind (the PASID stop protocol): wait until the device has
//! no descriptor of the PASID outstanding, drain its page requests (pending groups answered INVALID), flush
//! its ATC of the PASID, then detach.
//!
//! *Coarse:* page-granular descriptors (addresses and lengths in whole 4 KiB pages; the completion record
//! sits at the start of a page); one page request per group; one request in flight per descriptor;
//! of the ATC invalidation-completion timeout only SMMUv3's behaviour (wait [`ATC_INV_TIMEOUT`], log, go on)
//! is modelled, behind [`SvaInjection::IgnoreAtcInvalidation`]; VT-d's retry is not.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::{Rc, Weak};

use peerdma_core::timing::{ParamSpec, Timing};
use peerdma_core::{DeviceId, Errno, FrameId, PAGE_SHIFT, PAGE_SIZE, Pid, SimDuration, Va};
use peerdma_dma::{DmaOp, DmaSpace, FenceInjection};
use peerdma_iommu::{
    Atc, AtcConfig, AtcLookup, AtcStats, AtsCompletion, GroupId, PRQ_ENTRIES, PageRequest,
    PageResponseCode, Pasid, PasidEntry, PostOutcome, PriGroup, PriQueue, PriStats, Sva,
    SvaDeviceInfo, SvaDomainId, SvaError, SvaHandle,
};
use peerdma_mm::oracle::ViolationKind;
use peerdma_mm::{
    DeviceGrant, FrameTranslation, IntervalNotifierOps, Kernel, NotifierEvent, NotifierId,
    NotifierRange, VmFlags,
};
use peerdma_sim::WaitQueue;

/// The end of the user address space the SVA notifier covers (x86-64 with 4-level paging: 128 TiB).
const USER_VA_END: u64 = 1 << 47;

/// How long the IOMMU driver waits for an ATC invalidation completion before it gives up
/// (`ARM_SMMU_POLL_TIMEOUT_US`, 1 s, drivers/iommu/arm/arm-smmu-v3/arm-smmu-v3.c).
pub const ATC_INV_TIMEOUT: SimDuration = SimDuration::from_millis(1000);

/// Page requests one access sends before it gives up with `PageFault` (a SUCCESS answer — the automatic one
/// after an overflow included — sends the device back to translating, which may fault again).
pub const MAX_PRI_ROUNDS: u32 = 64;

const ATS_TRANSLATION: ParamSpec = ParamSpec::time(
    "sva.ats_translation",
    800,
    "spec/numbers.md §2 (a small read round trip ≈ 550 ns plus an IOTLB-miss walk ≈ 250 ns)",
    "one ATS translation request and its completion",
);
const ATS_INVALIDATION: ParamSpec = ParamSpec::time(
    "sva.ats_invalidation",
    2_000,
    "assumption (order of a TLB shootdown round trip, spec/numbers.md §5)",
    "an ATS invalidation request and its completion message",
);
const PRI_SERVICE: ParamSpec = ParamSpec::time(
    "sva.pri_service",
    5_000,
    "spec/numbers.md §3 (software minor device fault 3.5–5.7 µs; SMMU minor fault ≈ 38 µs)",
    "a page request's trip: queue, interrupt, fault worker, response (the mm fault itself is extra)",
);
const PAGE_TRANSFER: ParamSpec = ParamSpec::time(
    "sva.page_transfer",
    600,
    "spec/numbers.md §1–2 (≈ 7 GB/s of a Gen3 x8 link)",
    "the accelerator moving one 4 KiB page over its link",
);

/// Timing of the SVA model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SvaCosts {
    /// One ATS translation request and completion (`sva.ats_translation`).
    pub ats_translation: SimDuration,
    /// One ATS invalidation request and completion (`sva.ats_invalidation`).
    pub ats_invalidation: SimDuration,
    /// A page request's trip through the IOMMU and fault worker (`sva.pri_service`).
    pub pri_service: SimDuration,
    /// One page on the wire (`sva.page_transfer`).
    pub page_transfer: SimDuration,
}

impl SvaCosts {
    /// The parameters these costs are built from, in field order.
    pub const PARAMS: &[ParamSpec] = &[
        ATS_TRANSLATION,
        ATS_INVALIDATION,
        PRI_SERVICE,
        PAGE_TRANSFER,
    ];

    /// Returns the costs `timing` gives.
    pub fn from_timing(timing: &Timing) -> Self {
        Self {
            ats_translation: timing.time(&ATS_TRANSLATION),
            ats_invalidation: timing.time(&ATS_INVALIDATION),
            pri_service: timing.time(&PRI_SERVICE),
            page_transfer: timing.time(&PAGE_TRANSFER),
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

/// Deliberate bugs, so tests can prove the oracle and the protocol checker catch them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SvaInjection {
    /// Correct.
    #[default]
    None,
    /// The secondary-TLB flush does not wait for the ATC invalidation to complete (no fence).
    SkipAtcWait,
    /// The device neither drops ATC entries nor sends invalidation completions (a broken or hung ATC). The
    /// IOMMU driver behaves as SMMUv3 does: it waits [`ATC_INV_TIMEOUT`], logs the timeout and goes on, so
    /// the device's later use of a stale entry is the oracle's to catch.
    IgnoreAtcInvalidation,
    /// The fault worker answers each page group twice.
    RespondTwice,
}

/// A misuse of the SVA device API; Linux's own failures are [`SvaDevError::Errno`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SvaDevError {
    /// A failure Linux reports with an errno (bind errnos, a full work queue: `EAGAIN`).
    #[error("{0}")]
    Errno(Errno),
    /// A bind/unbind misuse.
    #[error(transparent)]
    Sva(SvaError),
    /// The process is not bound to this device.
    #[error("pid {0} is not bound to the device")]
    NotBound(u32),
    /// A descriptor's address or length is not whole pages.
    #[error("descriptor range {addr:#x}+{len:#x} is not page aligned")]
    Unaligned {
        /// The address.
        addr: u64,
        /// The length.
        len: u64,
    },
    /// No such job.
    #[error("unknown job {0}")]
    UnknownJob(u64),
}

impl From<SvaError> for SvaDevError {
    fn from(e: SvaError) -> Self {
        match e {
            SvaError::Errno(e) => Self::Errno(e),
            other => Self::Sva(other),
        }
    }
}

/// Result alias of this module.
pub type SvaDevResult<T> = Result<T, SvaDevError>;

/// Counters of the SVA model (also counted in the simulator's metrics under `sva.*`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvaStats {
    /// ATS translation requests sent.
    pub translation_requests: u64,
    /// Secondary-TLB flushes (IOTLB invalidations by PASID).
    pub iotlb_invalidations: u64,
    /// Of which whole-PASID flushes.
    pub full_flushes: u64,
    /// Descriptors that completed with `Aborted`.
    pub aborts: u64,
}

/// Why a page request group got its answer, as the device sees it.
type GroupKey = (Option<Pasid>, u16);

struct UnitState {
    prq: PriQueue,
    worker_busy: bool,
}

struct IommuInner {
    kernel: Rc<Kernel>,
    costs: SvaCosts,
    sva: RefCell<Sva>,
    units: RefCell<BTreeMap<u32, UnitState>>,
    prq_entries: Cell<usize>,
    flush_threshold_pages: Cell<u64>,
    devices: RefCell<BTreeMap<DeviceId, Weak<AccelInner>>>,
    /// Per SVA domain: its mm, its notifier and the (device, PASID) slots attached.
    domains: RefCell<BTreeMap<SvaDomainId, DomainState>>,
    /// Groups being handled by the fault worker, per device.
    handling: RefCell<BTreeMap<DeviceId, u32>>,
    /// Groups the fault worker may handle at once (`None`: unbounded); past it a group is answered
    /// FAILURE (the IOPF workqueue refused it: `-EBUSY`).
    iopf_limit: Cell<Option<u32>>,
    injection: Cell<SvaInjection>,
    stats: RefCell<SvaStats>,
    wq: WaitQueue,
}

struct DomainState {
    mm: Pid,
    notifier: Option<NotifierId>,
    attached: Vec<(DeviceId, Pasid)>,
}

/// The IOMMU side of SVA (module docs). Cloning shares it.
#[derive(Clone)]
pub struct SvaIommu(Rc<IommuInner>);

impl std::fmt::Debug for SvaIommu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SvaIommu").finish_non_exhaustive()
    }
}

/// The SVA mm notifier of one domain: the secondary-TLB hook.
struct SvaNotifier {
    iommu: Weak<IommuInner>,
    domain: SvaDomainId,
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

    fn unit_of(&self, dev: DeviceId) -> u32 {
        self.0.sva.borrow().device(dev).map_or(0, |i| i.iommu)
    }

    /// The secondary-TLB flush of `domain` for `range` (module docs, steps 1–5).
    async fn invalidate_secondary_tlbs(&self, domain: SvaDomainId, range: &NotifierRange) {
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
    async fn page_request(&self, dev: &AccelInner, req: PageRequest) -> PageResponseCode {
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
    fn kick_worker(&self, unit: u32) {
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
    async fn prq_thread(&self, unit: u32) {
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
    async fn handle_group(&self, unit: u32, g: PriGroup) {
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

    fn respond(&self, unit: u32, id: GroupId, code: PageResponseCode) {
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
    async fn handle_fault(&self, f: &PageRequest) -> PageResponseCode {
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

/// A descriptor (the work a process submits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Descriptor {
    /// Copies `len` bytes from `src` to `dst`.
    Copy {
        /// Source VA.
        src: Va,
        /// Destination VA.
        dst: Va,
        /// Bytes (whole pages).
        len: u64,
    },
    /// Fills `len` bytes at `dst` with the 8-byte `pattern` repeated.
    Fill {
        /// Destination VA.
        dst: Va,
        /// Bytes (whole pages).
        len: u64,
        /// The pattern.
        pattern: u64,
    },
}

/// The order in which a descriptor visits its pages (the access pattern: streaming, strided, gather).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Order {
    /// Page 0, 1, 2, ...
    #[default]
    Sequential,
    /// Every `n`-th page, then the next residue: 0, n, 2n, ..., 1, n + 1, ...
    Strided(u64),
    /// A permutation drawn from the simulation's seeded RNG.
    Random,
}

impl Order {
    /// Returns the page indices of an `nr_pages` range in this order (`rng_fn(i)` draws below `i`).
    pub fn pages(self, nr_pages: u64, mut rng_fn: impl FnMut(u64) -> u64) -> Vec<u64> {
        match self {
            Self::Sequential => (0..nr_pages).collect(),
            Self::Strided(n) => {
                let n = n.clamp(1, nr_pages.max(1));
                (0..n)
                    .flat_map(|r| (r..nr_pages).step_by(usize::try_from(n).unwrap_or(1)))
                    .collect()
            }
            Self::Random => {
                let mut v: Vec<u64> = (0..nr_pages).collect();
                for i in (1..v.len()).rev() {
                    let j = usize::try_from(rng_fn(i as u64 + 1)).unwrap_or(0);
                    v.swap(i, j);
                }
                v
            }
        }
    }
}

/// Completion status codes (DSA's where they exist: 1 success, 3 page fault; the others are this
/// model's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompletionStatus {
    /// Done (1).
    Success,
    /// A page could not be translated (3): the record gives the address and the bytes done.
    PageFault,
    /// The PASID was torn down under it (process exit): the DMA aborted (0x20).
    Aborted,
}

impl CompletionStatus {
    /// Returns the status byte written to the completion record.
    pub fn code(self) -> u8 {
        match self {
            Self::Success => 1,
            Self::PageFault => 3,
            Self::Aborted => 0x20,
        }
    }
}

/// A completion record (written to user memory at the descriptor's completion address: status byte at
/// offset 0, bytes completed as a little-endian u32 at 4, fault address as a u64 at 8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompletionRecord {
    /// The status.
    pub status: CompletionStatus,
    /// Bytes done before it stopped.
    pub bytes_completed: u64,
    /// The faulting address (`PageFault`).
    pub fault_addr: Option<Va>,
}

impl CompletionRecord {
    /// Returns the 32 bytes written to user memory.
    pub fn to_bytes(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[0] = self.status.code();
        let done = u32::try_from(self.bytes_completed).unwrap_or(u32::MAX);
        b[4..8].copy_from_slice(&done.to_le_bytes());
        b[8..16].copy_from_slice(&self.fault_addr.map_or(0, Va::raw).to_le_bytes());
        b
    }
}

/// Identifies a submitted descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct JobId(pub u64);

/// The accelerator's configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SvaAccelConfig {
    /// What the IOMMU knows about it (group, unit, `max_pasids`).
    pub info: SvaDeviceInfo,
    /// Its ATC geometry.
    pub atc: AtcConfig,
    /// Descriptors outstanding at most (work-queue depth; one more is refused with `EAGAIN`).
    pub wq_depth: usize,
}

struct Bond {
    handle: SvaHandle,
    pasid: Pasid,
}

struct Job {
    pasid: Pasid,
    result: Option<CompletionRecord>,
}

struct AccelInner {
    id: DeviceId,
    name: String,
    iommu: SvaIommu,
    space: DmaSpace,
    atc: RefCell<Atc<(FrameId, u64)>>,
    wq_depth: usize,
    bonds: RefCell<BTreeMap<Pid, Bond>>,
    jobs: RefCell<BTreeMap<JobId, Job>>,
    next_job: Cell<u64>,
    next_grpid: Cell<u16>,
    responses: RefCell<BTreeMap<GroupKey, PageResponseCode>>,
    wq: WaitQueue,
}

/// The SVA accelerator (module docs). Cloning shares it.
#[derive(Clone)]
pub struct SvaAccel(Rc<AccelInner>);

impl std::fmt::Debug for SvaAccel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SvaAccel")
            .field("name", &self.0.name)
            .finish_non_exhaustive()
    }
}

/// Why a page could not be accessed.
#[derive(Clone, Copy)]
enum Stop {
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

    async fn run(
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

    fn stopped(stop: Stop, done: u64) -> CompletionRecord {
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

    async fn finish(
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
    async fn access(
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
