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
//!   Its DMA goes through the one access path, [`DmaSpace`](peerdma_dma::DmaSpace), with a [`DeviceGrant::Mirror`](peerdma_mm::DeviceGrant::Mirror) grant: the
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
//!    translation has landed ([`DmaSpace::fence`](peerdma_dma::DmaSpace::fence));
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
//!
//! Layout: `iommu.rs` (the IOMMU side: bonds, the secondary-TLB flush of the ATCs, PRI handling),
//! `accel.rs` (the accelerator: work queues, its ATC and page requests, completion records), `descriptor.rs`
//! (the descriptor and completion-record formats).

use peerdma_core::timing::{ParamSpec, Timing};
use peerdma_core::{Errno, SimDuration};
use peerdma_iommu::SvaError;

mod accel;
mod descriptor;
mod iommu;

pub use accel::SvaAccel;
pub use descriptor::{
    CompletionRecord, CompletionStatus, Descriptor, JobId, Order, SvaAccelConfig,
};
pub use iommu::SvaIommu;

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
