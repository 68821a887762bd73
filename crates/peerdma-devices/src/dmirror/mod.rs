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
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;

use peerdma_core::timing::{ParamSpec, Timing};
use peerdma_core::{DeviceId, Errno, FrameId, Pid, Range, SimDuration, Va};
use peerdma_dma::hmm_mirror::{
    HMM_RANGE_DEFAULT_TIMEOUT, MirrorDevice, ProgramCost, lock_and_set_seq,
};
use peerdma_mm::hmm::{HMM_PFN_ERROR, HMM_PFN_VALID, HMM_PFN_WRITE, HmmRange, hmm_pfn_to_frame};
use peerdma_mm::{
    DeviceGrant, FrameTranslation, IntervalNotifierOps, Kernel, NotifierEvent, NotifierId,
    NotifierRange,
};
use peerdma_sim::{SimMutex, TraceArg};

mod device;
mod file;
mod tables;

pub use device::DmirrorDevice;
pub use file::Dmirror;

/// A fault's result as a trace field: `ok` or the errno's name.
pub(super) fn errno_arg(res: Result<(), Errno>) -> TraceArg {
    match res {
        Ok(()) => "ok".into(),
        Err(e) => e.name().into(),
    }
}

/// Pages per fault/snapshot chunk (test_hmm.c works in 64-page pieces).
pub const CHUNK_PAGES: u64 = 64;

/// Device pages evicted at once when device memory is full.
pub(super) const EVICT_BATCH: usize = 32;

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

pub(super) const IOCTL: ParamSpec = ParamSpec::time(
    "dmirror.ioctl",
    200,
    "assumption",
    "the dmirror ioctl round trip (entering and leaving the driver)",
);
pub(super) const DMA_PAGE: ParamSpec = ParamSpec::time(
    "dmirror.dma_page",
    600,
    "spec/numbers.md §1–2 (≈ 7 GB/s of a Gen3 x8 link)",
    "device DMA of one 4 KiB page by the dmirror device",
);
pub(super) const PT_UPDATE: ParamSpec = ParamSpec::time(
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
pub(super) enum Tag {
    Read,
    Write,
    /// DPT_XA_TAG_ATOMIC: mapped through a device-exclusive entry. test_hmm.c tests `tag & WRITE`, and
    /// ATOMIC (1) shares a bit with WRITE (3), so an atomic entry also serves device writes.
    Atomic,
}

#[derive(Clone, Copy, Debug)]
pub(super) struct PtEntry {
    pub(super) frame: FrameId,
    /// The frame's allocation generation when the entry was programmed (the translation's epoch).
    pub(super) generation: u64,
    pub(super) tag: Tag,
}

/// State shared by the open file and its notifier callbacks.
#[derive(Debug)]
pub(super) struct Shared {
    pub(super) kernel: Rc<Kernel>,
    pub(super) device: Rc<DmirrorDevice>,
    pub(super) dev: DeviceId,
    pub(super) pid: Pid,
    pub(super) lock: SimMutex,
    pub(super) pt: RefCell<tables::DevicePt>,
    pub(super) costs: DmirrorCosts,
    pub(super) injection: Cell<FaultInjection>,
    /// Every notifier event the mirror acted on (zapped its range for), in order.
    pub(super) events: RefCell<Vec<NotifierEvent>>,
}

impl Shared {
    /// The device's translation of `va` through its page-table entry `e` (a mirror grant).
    pub(super) fn translation(&self, va: Va, e: PtEntry) -> FrameTranslation {
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
        self.pt.borrow_mut().remove_range(first..=last)
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
pub(super) struct SnapshotOps(Rc<Shared>);

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
