//! An RDMA NIC (RoCE/InfiniBand RC transport, mlx5-like): protection domains, memory regions — pinned,
//! on-demand-paging (ODP) explicit and implicit, dma-buf backed (a BAR export, or a GPU buffer object that
//! moves: [`Rnic::reg_gpu_bo_mr`]) — queue pairs with RDMA WRITE, READ and SEND, and completion queues.
//!
//! Linux counterparts: drivers/infiniband/core/umem.c (`ib_umem_get`: a long-term pin), umem_odp.c
//! (`ib_umem_odp_get`, `ib_umem_odp_alloc_implicit`, `ib_umem_odp_map_dma_and_lock`,
//! `ib_umem_odp_unmap_dma_pages`), umem_dmabuf.c (`ib_umem_dmabuf_get`, the dynamic importer), the verbs
//! checks of drivers/infiniband/core/uverbs_cmd.c and `ib_check_mr_access` (include/rdma/ib_verbs.h), and
//! drivers/infiniband/hw/mlx5/odp.c (`pagefault_mr`, `mlx5_ib_invalidate_range`, implicit children,
//! `mlx5_ib_advise_mr_prefetch`) and mr.c.
//!
//! **Memory regions.** Registration rules (`ib_check_mr_access`, `ib_umem_odp_get`):
//! - remote write or remote atomic without local write: `EINVAL`;
//! - `ON_DEMAND` with `HUGETLB` on an implicit MR: `EINVAL`;
//! - ODP interval `[align_down(addr), align_up(addr + len))`: a wrap is `EOVERFLOW`, an empty one `EINVAL`;
//! - pinned (`ib_umem_get`): a wrap or a zero length is `EINVAL`; the pin's own errnos (`EFAULT` for a
//!   hole, long-term pin refusals) come from [`peerdma_dma::get_user_dma_sg`] with `LONGTERM`;
//! - implicit ODP is `addr = 0, len = u64::MAX` with `ON_DEMAND`; without `ON_DEMAND` it is `EINVAL`.
//!
//! lkey and rkey are equal (mlx5 gives one key per mkey). A work request's local SGE must name an MR of
//! the QP's PD, lie inside it, and have local write for a destination: otherwise the WR completes with
//! `LOC_PROT_ERR`. A remote key must name an MR of the responder QP's PD with the remote right the
//! operation needs, and the range must lie inside it: otherwise the responder NAKs with a remote access
//! error, the requester completes with `REM_ACCESS_ERR`, and both QPs go to Error.
//!
//! **ODP.** An ODP MR is a device of the one mirror loop ([`peerdma_dma::hmm_mirror`]), through the
//! [`MirrorDevice`](peerdma_dma::MirrorDevice) of this module: program = DMA-map each returned pfn and write the MTT entry (device
//! write only for a write fault, so a prefetch for read maps read-only: the "downgrade"); zap = clear the
//! MTT entries; fence = the device path's fence ([`peerdma_dma::DmaSpace::fence`]); release = DMA-unmap
//! and `set_page_dirty` every page whose CPU entry was writable when it was faulted, even if the NIC only
//! read it (`ib_umem_odp_unmap_dma_pages`). Nothing is pinned. Every byte the NIC moves goes through its
//! [`peerdma_dma::DmaSpace`], one request per page.
//!
//! Registration of an explicit ODP MR ends with mlx5's snapshot pass (`mlx5_ib_init_odp_mr`,
//! `MLX5_PF_FLAGS_SNAPSHOT`): the pages the CPU page table already maps are mapped read-only in the NIC,
//! nothing is faulted in; the first write to each still faults.
//!
//! Implicit ODP: the MR covers the whole user address space (`TASK_SIZE`, 47 bits here); children are ODP
//! umems of 1 GiB slots (`MLX5_IMR_MTT_SIZE`) created by the first fault in the slot — even one that then
//! fails — each with its own interval notifier. A child that an invalidation empties (it had mapped pages
//! and has none left) is destroyed by a work item once the invalidation drops its lock; a child that never
//! mapped a page lives until the parent is deregistered. A fault racing the destruction faults again and
//! makes a new child.
//!
//! **Faults.** A requester fault (the local SGE of a WRITE or SEND source, or of a READ destination) stalls
//! the QP while the driver resolves it: `rnic.fault_service` (EQE, work item, UMR, resume) plus the mirror's
//! fault; an unresolvable fault completes the WR with `LOC_PROT_ERR` and moves the QP to Error. A responder
//! fault is resolved in the background by a work item while the packet is answered at once:
//! - WRITE and SEND (and SEND with no receive posted): RNR NAK; the requester waits the RNR timer
//!   (`rnic.rnr_timer`) and retransmits; `rnr_retry` retransmissions are allowed, 7 meaning infinite; once
//!   exhausted the WR completes with `RNR_RETRY_EXC_ERR` and the QP goes to Error;
//! - READ: the model's responder drops the request while it faults and the requester retransmits after its
//!   local ACK timeout (`rnic.ack_timeout`); `retry_cnt` retransmissions are allowed; then `RETRY_EXC_ERR`
//!   and Error. The kernel (mlx5/odp.c) only resolves the fault and resumes the QP; what the wire carries
//!   is the HCA's. The model follows the InfiniBand rule that an RNR NAK answers only requests that need a
//!   receive or write resources (SEND, RDMA WRITE), and the ODP paper (Lesokhin et al., ASPLOS'17), where a
//!   READ responder fault costs the requester a transport timeout: the reason ODP faults are ms-scale.
//!
//! A background fault that fails (the VA is not mapped, a write to a read-only VMA) is remembered: the next
//! retransmission is answered with a remote access error NAK (spec: the driver resumes the QP with error).
//!
//! *Coarse (stated):* whole pages only (addresses and lengths page-aligned); one WR of a QP in flight at a
//! time (the pages of a WR pipeline up to the device's outstanding limit); the network is a fixed per-page
//! wire time plus a fixed one-way latency with no loss (no congestion, no shared switch); a responder fault
//! faults the whole accessed range; a read fault maps read-only (mlx5 maps a writable pfn writable);
//! atomics are not modelled; the QP state machine is reduced to RTS and Error.
//!
//! Layout: `verbs.rs` (the verbs' vocabulary), `odp.rs` (ODP umems, the mirror-loop device), `mr.rs` (memory
//! regions and the NIC's access path through them), `qp.rs` (queue pairs, the RC transport, completions).

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::rc::{Rc, Weak};

use peerdma_core::timing::{ParamSpec, Timing};
use peerdma_core::{Errno, PAGE_SIZE, Pid, Range, SimDuration, Va};
use peerdma_dma::{AttachId, DmaDevice, DmaError, DmaSgHandle, FenceInjection, Platform};
use peerdma_mm::{Kernel, MmioId};
use peerdma_sim::{SimMutex, WaitQueue};

mod mr;
mod odp;
mod qp;
mod verbs;

use odp::OdpUmem;
pub use verbs::{
    Access, Advice, CqId, MrInfo, MrKeys, MrKind, PdId, QpAttr, QpId, QpState, SendWr, Sge, Wc,
    WcStatus, WrOpcode,
};

/// `MLX5_IMR_MTT_SIZE`: the span of one implicit-ODP child (1 GiB).
pub const IMPLICIT_CHILD_SIZE: u64 = 1 << 30;

/// The user address space an implicit MR covers (`TASK_SIZE` of x86-64 with 4-level paging, 128 TiB).
pub const TASK_SIZE: u64 = 1 << 47;

/// [`PAGE_SIZE`] as a `usize`.
const PAGE_BYTES: usize = 4096;

/// An implicit MR's children by 1 GiB slot.
type Children = RefCell<BTreeMap<u64, Rc<OdpUmem>>>;

/// `rnr_retry = 7`: retransmit after RNR NAKs forever.
pub const RNR_RETRY_INFINITE: u8 = 7;

const FAULT_SERVICE: ParamSpec = ParamSpec::time(
    "rnic.fault_service",
    40_000,
    "spec/numbers.md §3: NIC + driver fault service, tens to hundreds of µs [R]; PART (TPDS 2022): an \
     SMMU-based RDMA minor fault ≈ 38 µs",
    "an ODP page fault's NIC and driver overhead (EQE, work item, UMR, resume), on top of the mm's fault",
);
const WIRE_PAGE: ParamSpec = ParamSpec::time(
    "rnic.wire_page",
    328,
    "4 KiB at 100 Gb/s (a ConnectX-5/6 port): 4096 × 8 / 100 ns",
    "network serialization time of one 4 KiB page between two NICs",
);
const WIRE_LATENCY: ParamSpec = ParamSpec::time(
    "rnic.wire_latency",
    1_000,
    "assumption: ≈ 1 µs one-way NIC to NIC through one switch (RDMA small-message latency is 1–2 µs)",
    "one-way network latency of a packet between two NICs (or a loopback)",
);
const RNR_TIMER: ParamSpec = ParamSpec::time(
    "rnic.rnr_timer",
    640_000,
    "InfiniBand spec RNR timer encoding: min_rnr_timer = 12 is 0.64 ms (the largest, 0, is 655.36 ms; \
     spec/numbers.md §3)",
    "how long a requester waits after an RNR NAK before retransmitting",
);
const ACK_TIMEOUT: ParamSpec = ParamSpec::time(
    "rnic.ack_timeout",
    67_108_864,
    "InfiniBand local ACK timeout 4.096 µs × 2^timeout; timeout = 14 (the usual rdma-core choice) is \
     67.1 ms",
    "how long a requester waits for a READ response before retransmitting (transport retry)",
);

/// Timing of the RDMA NIC model (module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RnicCosts {
    /// An ODP fault's NIC and driver overhead (`rnic.fault_service`).
    pub fault_service: SimDuration,
    /// Network time of one 4 KiB page (`rnic.wire_page`).
    pub wire_page: SimDuration,
    /// One-way network latency (`rnic.wire_latency`).
    pub wire_latency: SimDuration,
    /// The RNR timer (`rnic.rnr_timer`).
    pub rnr_timer: SimDuration,
    /// The local ACK timeout of a READ (`rnic.ack_timeout`).
    pub ack_timeout: SimDuration,
}

impl RnicCosts {
    /// The parameters these costs are built from, in field order.
    pub const PARAMS: &[ParamSpec] = &[
        FAULT_SERVICE,
        WIRE_PAGE,
        WIRE_LATENCY,
        RNR_TIMER,
        ACK_TIMEOUT,
    ];

    /// Returns the costs `timing` gives.
    pub fn from_timing(timing: &Timing) -> Self {
        Self {
            fault_service: timing.time(&FAULT_SERVICE),
            wire_page: timing.time(&WIRE_PAGE),
            wire_latency: timing.time(&WIRE_LATENCY),
            rnr_timer: timing.time(&RNR_TIMER),
            ack_timeout: timing.time(&ACK_TIMEOUT),
        }
    }

    /// The calibrated defaults.
    pub fn calibrated() -> Self {
        Self::from_timing(&Timing::calibrated())
    }

    /// Every cost zero.
    pub fn zero() -> Self {
        Self::from_timing(&Timing::zero())
    }
}

/// Misuse of the NIC's API (unknown handles), or an errno Linux returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RnicError {
    /// No such protection domain.
    #[error("unknown protection domain {0}")]
    UnknownPd(u32),
    /// No such memory region (by lkey).
    #[error("unknown memory region key {0:#x}")]
    UnknownMr(u32),
    /// No such queue pair.
    #[error("unknown queue pair {0}")]
    UnknownQp(u32),
    /// No such completion queue.
    #[error("unknown completion queue {0}")]
    UnknownCq(u32),
    /// The QP has no remote QP to send to.
    #[error("queue pair {0} is not connected")]
    NotConnected(u32),
    /// An outcome Linux gives as an errno.
    #[error(transparent)]
    Errno(#[from] Errno),
    /// A misuse of the DMA layer's API.
    #[error(transparent)]
    Dma(DmaError),
    /// No such GPU buffer object.
    #[error("unknown GPU buffer object {0}")]
    UnknownBo(u64),
}

impl From<crate::gpu::GpuError> for RnicError {
    fn from(e: crate::gpu::GpuError) -> Self {
        use crate::gpu::GpuError;
        match e {
            GpuError::Errno(e) => Self::Errno(e),
            GpuError::Dma(e) => e.into(),
            GpuError::UnknownBo(n) => Self::UnknownBo(n),
            // A range outside the buffer or an unknown attachment: the verbs' EINVAL.
            GpuError::BadRange { .. }
            | GpuError::UnknownAttach(_)
            | GpuError::WindowTooLarge { .. } => Self::Errno(Errno::EINVAL),
        }
    }
}

impl From<DmaError> for RnicError {
    fn from(e: DmaError) -> Self {
        match e {
            DmaError::Errno(e) => Self::Errno(e),
            misuse => Self::Dma(misuse),
        }
    }
}

impl RnicError {
    /// Returns the errno a verbs call would return for this error.
    pub fn errno(self) -> Errno {
        match self {
            Self::Errno(e) => e,
            Self::Dma(e) => e.errno(),
            Self::NotConnected(_) => Errno::EINVAL,
            _ => Errno::ENOENT,
        }
    }
}

enum MrBacking {
    Pinned(DmaSgHandle),
    Odp(Rc<OdpUmem>),
    Implicit(Rc<Children>),
    DmaBuf {
        mmio: MmioId,
        att: AttachId,
    },
    /// A dma-buf MR on a GPU buffer object: a dynamic importer of the GPU's TTM-style exporter.
    GpuBo {
        gpu: Rc<crate::gpu::Gpu>,
        att: crate::gpu::BoAttach,
    },
}

struct Mr {
    pd: PdId,
    pid: Pid,
    access: Access,
    /// The MR's range: its VAs, or `[0, len)` of a dma-buf MR.
    range: Range<Va>,
    backing: MrBacking,
    /// Responder faults that failed, by page number: the next access is a remote access error.
    failed: RefCell<BTreeMap<u64, Errno>>,
    /// Responder faults in progress.
    pending: Cell<u32>,
}

impl Mr {
    fn kind(&self) -> MrKind {
        match self.backing {
            MrBacking::Pinned(_) => MrKind::Pinned,
            MrBacking::Odp(_) => MrKind::Odp,
            MrBacking::Implicit(_) => MrKind::ImplicitOdp,
            MrBacking::DmaBuf { .. } | MrBacking::GpuBo { .. } => MrKind::DmaBuf,
        }
    }
}

/// How an access treats a missing translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Miss {
    /// Fault and wait (requester, prefetch).
    Fault,
    /// Stop with `EAGAIN` (responder: RNR).
    Stop,
}

// ---------------------------------------------------------------------------------------------------------
// Queue pairs.

struct Qp {
    pd: PdId,
    cq: CqId,
    attr: QpAttr,
    state: Cell<QpState>,
    outstanding: Cell<u32>,
    remote: RefCell<Option<(Weak<Rnic>, QpId)>>,
    recv: RefCell<VecDeque<(u64, Sge)>>,
    sq: SimMutex,
}

/// The responder's answer to one request packet.
enum Answer {
    /// Done; the data a READ returns.
    Ack(Vec<u8>),
    /// Receiver not ready (a fault in progress, or no receive posted).
    Rnr,
    /// A READ the responder dropped while it faults.
    Drop,
    /// Remote access error NAK.
    AccessErr,
}

#[derive(Default)]
struct State {
    next_pd: u32,
    pds: BTreeMap<PdId, Pid>,
    next_key: u32,
    mrs: BTreeMap<u32, Rc<Mr>>,
    next_qp: u32,
    qps: BTreeMap<QpId, Rc<Qp>>,
    next_cq: u32,
    cqs: BTreeMap<CqId, VecDeque<Wc>>,
}

/// An RDMA NIC attached to the platform (module docs).
pub struct Rnic {
    platform: Rc<Platform>,
    dev: Rc<DmaDevice>,
    costs: RnicCosts,
    st: RefCell<State>,
    cq_wq: WaitQueue,
}

impl fmt::Debug for Rnic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.st.borrow();
        f.debug_struct("Rnic")
            .field("dev", &self.dev.name)
            .field("mrs", &st.mrs.len())
            .field("qps", &st.qps.len())
            .finish_non_exhaustive()
    }
}

fn page_range(addr: Va, len: u64) -> Result<Range<Va>, Errno> {
    if !addr.is_page_aligned() || len == 0 || !len.is_multiple_of(PAGE_SIZE) {
        return Err(Errno::EINVAL);
    }
    Range::from_len(addr, len).ok_or(Errno::EINVAL)
}

impl Rnic {
    /// Creates the NIC model of platform device `dev`.
    pub fn new(platform: &Rc<Platform>, dev: Rc<DmaDevice>, costs: RnicCosts) -> Rc<Self> {
        Rc::new(Self {
            cq_wq: WaitQueue::new(&platform.kernel.sim),
            platform: platform.clone(),
            dev,
            costs,
            st: RefCell::default(),
        })
    }

    /// Returns the platform device.
    pub fn device(&self) -> &Rc<DmaDevice> {
        &self.dev
    }

    /// Test-only driver bug: the fence of every invalidation returns at once
    /// ([`FenceInjection::SkipWait`]); the oracle reports what lands afterwards.
    pub fn inject_skip_fence(&self, skip: bool) {
        self.dev.space.inject(if skip {
            FenceInjection::SkipWait
        } else {
            FenceInjection::None
        });
    }

    fn k(&self) -> &Kernel {
        &self.platform.kernel
    }

    fn count(&self, what: &str, n: u64) {
        self.k().sim.count(what, n);
    }

    /// `ibv_alloc_pd` in process `pid`.
    pub fn alloc_pd(&self, pid: Pid) -> PdId {
        let mut st = self.st.borrow_mut();
        let pd = PdId(st.next_pd);
        st.next_pd += 1;
        st.pds.insert(pd, pid);
        pd
    }

    /// `ibv_dealloc_pd`.
    ///
    /// # Errors
    /// `EBUSY` while an MR or QP uses it.
    pub fn dealloc_pd(&self, pd: PdId) -> Result<(), RnicError> {
        let mut st = self.st.borrow_mut();
        if !st.pds.contains_key(&pd) {
            return Err(RnicError::UnknownPd(pd.0));
        }
        if st.mrs.values().any(|m| m.pd == pd) || st.qps.values().any(|q| q.pd == pd) {
            return Err(Errno::EBUSY.into());
        }
        st.pds.remove(&pd);
        Ok(())
    }

    fn pd_pid(&self, pd: PdId) -> Result<Pid, RnicError> {
        self.st
            .borrow()
            .pds
            .get(&pd)
            .copied()
            .ok_or(RnicError::UnknownPd(pd.0))
    }
}
