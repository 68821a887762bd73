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
//! [`MirrorDevice`] of this module: program = DMA-map each returned pfn and write the MTT entry (device
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

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::rc::{Rc, Weak};

use peerdma_core::timing::{ParamSpec, Timing};
use peerdma_core::{Errno, FrameId, PAGE_SIZE, Pid, Range, SimDuration, SimTime, Va};
use peerdma_dma::{
    AttachId, DeviceAddr, DmaAddr, DmaDevice, DmaError, DmaOp, DmaRequest, DmaSgFlags, DmaSgHandle,
    FenceInjection, HmmMirror, ImporterKind, MappedSg, MirrorDevice, Platform, ProgramCost,
    RequestId, get_user_dma_sg,
};
use peerdma_mm::hmm::{HMM_PFN_REQ_WRITE, HMM_PFN_WRITE, HmmRange, hmm_pfn_to_frame};
use peerdma_mm::mmu_notifier::NotifierRange;
use peerdma_mm::{DeviceGrant, Kernel, MmioId};
use peerdma_sim::{SimMutex, WaitQueue};

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

/// MR access flags (`enum ib_access_flags`, same bit values).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Access(pub u32);

impl Access {
    /// `IB_ACCESS_LOCAL_WRITE`.
    pub const LOCAL_WRITE: Self = Self(1);
    /// `IB_ACCESS_REMOTE_WRITE`.
    pub const REMOTE_WRITE: Self = Self(1 << 1);
    /// `IB_ACCESS_REMOTE_READ`.
    pub const REMOTE_READ: Self = Self(1 << 2);
    /// `IB_ACCESS_REMOTE_ATOMIC`.
    pub const REMOTE_ATOMIC: Self = Self(1 << 3);
    /// `IB_ACCESS_ON_DEMAND`.
    pub const ON_DEMAND: Self = Self(1 << 6);
    /// `IB_ACCESS_HUGETLB`.
    pub const HUGETLB: Self = Self(1 << 7);

    /// Returns whether every flag of `other` is set.
    pub fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// Returns whether any flag of `other` is set.
    pub fn intersects(self, other: Self) -> bool {
        self.0 & other.0 != 0
    }

    /// Returns whether the NIC may write the MR (`writable` of `ib_umem_odp`).
    pub fn writable(self) -> bool {
        self.intersects(Self::LOCAL_WRITE | Self::REMOTE_WRITE | Self::REMOTE_ATOMIC)
    }
}

impl std::ops::BitOr for Access {
    type Output = Self;
    fn bitor(self, o: Self) -> Self {
        Self(self.0 | o.0)
    }
}

/// A protection domain's handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PdId(pub u32);

/// A queue pair's number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct QpId(pub u32);

/// A completion queue's handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct CqId(pub u32);

/// What kind of memory backs an MR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MrKind {
    /// Long-term pinned user memory (`ib_umem_get`).
    Pinned,
    /// ODP over an explicit range.
    Odp,
    /// Implicit ODP over the whole address space.
    ImplicitOdp,
    /// A dma-buf export, dynamic importer (`ib_umem_dmabuf_get`).
    DmaBuf,
}

/// `ibv_advise_mr` advice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Advice {
    /// `IB_UVERBS_ADVISE_MR_ADVICE_PREFETCH`: read fault, mapped read-only.
    Prefetch,
    /// `IB_UVERBS_ADVISE_MR_ADVICE_PREFETCH_WRITE`: write fault; the MR must be writable (`EPERM`).
    PrefetchWrite,
    /// `IB_UVERBS_ADVISE_MR_ADVICE_PREFETCH_NO_FAULT`: map only the pages already present.
    PrefetchNoFault,
}

/// One scatter/gather entry of a work request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sge {
    /// The MR's local key.
    pub lkey: u32,
    /// Start address (page-aligned; an MR's VA, or an offset into a dma-buf MR).
    pub addr: Va,
    /// Length in bytes (whole pages).
    pub len: u64,
}

/// A send-queue work request's operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WrOpcode {
    /// RDMA WRITE: local SGE → remote `(remote_addr, rkey)`.
    Write,
    /// RDMA READ: remote `(remote_addr, rkey)` → local SGE.
    Read,
    /// SEND: local SGE → the remote QP's next receive.
    Send,
}

/// A send-queue work request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SendWr {
    /// The caller's id, echoed in the completion.
    pub wr_id: u64,
    /// The operation.
    pub opcode: WrOpcode,
    /// The local buffer.
    pub sge: Sge,
    /// The remote address (WRITE, READ).
    pub remote_addr: Va,
    /// The remote key (WRITE, READ).
    pub rkey: u32,
}

/// A work completion's status (`enum ib_wc_status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WcStatus {
    /// `IB_WC_SUCCESS`.
    Success,
    /// `IB_WC_LOC_PROT_ERR`: the local SGE failed its key, PD, range, right or fault.
    LocProtErr,
    /// `IB_WC_REM_ACCESS_ERR`: the responder refused the key, PD, range or right, or its fault failed.
    RemAccessErr,
    /// `IB_WC_RNR_RETRY_EXC_ERR`: RNR NAKs outlasted `rnr_retry`.
    RnrRetryExcErr,
    /// `IB_WC_RETRY_EXC_ERR`: transport retransmissions outlasted `retry_cnt`.
    RetryExcErr,
    /// `IB_WC_WR_FLUSH_ERR`: the QP was in Error.
    WrFlushErr,
}

impl WcStatus {
    /// Returns the status's `ibv_wc_status_str`-like short name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::LocProtErr => "loc_prot_err",
            Self::RemAccessErr => "rem_access_err",
            Self::RnrRetryExcErr => "rnr_retry_exc_err",
            Self::RetryExcErr => "retry_exc_err",
            Self::WrFlushErr => "wr_flush_err",
        }
    }
}

/// A work completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wc {
    /// The work request's id.
    pub wr_id: u64,
    /// Its status.
    pub status: WcStatus,
    /// What completed: a send-queue opcode, or `None` for a receive.
    pub opcode: Option<WrOpcode>,
    /// Bytes moved.
    pub bytes: u64,
    /// When it completed.
    pub at: SimTime,
}

/// A queue pair's state (reduced: Reset/Init/RTR are folded into RTS).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QpState {
    /// Ready to send.
    Rts,
    /// Error: every new WR is flushed.
    Error,
}

/// A QP's attributes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QpAttr {
    /// The most send WRs outstanding (posted, not completed); more is `ENOMEM` at post.
    pub max_send_wr: u32,
    /// RNR retransmissions allowed (0–7, 7 infinite).
    pub rnr_retry: u8,
    /// Transport retransmissions allowed (0–7).
    pub retry_cnt: u8,
}

impl Default for QpAttr {
    fn default() -> Self {
        Self {
            max_send_wr: 16,
            rnr_retry: RNR_RETRY_INFINITE,
            retry_cnt: 7,
        }
    }
}

/// What a registration returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MrKeys {
    /// The local key.
    pub lkey: u32,
    /// The remote key (equal to the local key).
    pub rkey: u32,
}

/// A snapshot of an MR for tests and reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MrInfo {
    /// Its kind.
    pub kind: MrKind,
    /// Its PD.
    pub pd: PdId,
    /// Its access flags.
    pub access: Access,
    /// Pages the NIC has a translation for now (pinned: every page).
    pub nr_mapped: u64,
    /// Implicit ODP: the start of each live child's 1 GiB slot.
    pub children: Vec<Va>,
}

// ---------------------------------------------------------------------------------------------------------
// ODP umem: the device side of the one mirror loop.

/// One MTT entry of an ODP umem.
struct OdpEntry {
    frame: FrameId,
    /// The CPU entry was writable when faulted: the page is dirtied at unmap.
    cpu_writable: bool,
    /// The NIC may write through it.
    dev_write: bool,
    sg: MappedSg,
}

/// An ODP umem (an explicit MR or an implicit child) as a [`MirrorDevice`].
struct Umem {
    platform: Rc<Platform>,
    dev: Rc<DmaDevice>,
    pid: Pid,
    lock: SimMutex,
    range: Range<Va>,
    writable: bool,
    entries: RefCell<BTreeMap<u64, OdpEntry>>,
    /// Implicit child: its parent's children and its slot.
    parent: Option<(Weak<Children>, u64)>,
    ever_mapped: Cell<bool>,
    faulting: Cell<u32>,
    dead: Cell<bool>,
}

impl Umem {
    fn release_entries(&self, zapped: Vec<OdpEntry>) -> SimDuration {
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
struct OdpUmem {
    mirror: HmmMirror<Umem>,
}

impl OdpUmem {
    fn new(
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

    fn umem(&self) -> &Umem {
        self.mirror.device()
    }

    /// The MTT lookup of page `va`: its DMA address when the NIC may `write` (or read) through it.
    fn lookup(&self, va: Va, write: bool) -> Option<DmaAddr> {
        self.umem()
            .entries
            .borrow()
            .get(&va.page_number())
            .filter(|e| e.dev_write || !write)
            .and_then(|e| e.sg.page_addr(0))
    }

    /// Faults `r` into the NIC (`pagefault_real_mr`). `EAGAIN` when the umem died meanwhile.
    async fn fault(&self, r: Range<Va>, write: bool) -> Result<(), Errno> {
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

// ---------------------------------------------------------------------------------------------------------
// Memory regions.

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

    fn insert_mr(
        &self,
        pd: PdId,
        pid: Pid,
        access: Access,
        range: Range<Va>,
        backing: MrBacking,
    ) -> MrKeys {
        let mut st = self.st.borrow_mut();
        st.next_key += 0x100;
        let key = st.next_key;
        st.mrs.insert(
            key,
            Rc::new(Mr {
                pd,
                pid,
                access,
                range,
                backing,
                failed: RefCell::default(),
                pending: Cell::new(0),
            }),
        );
        MrKeys {
            lkey: key,
            rkey: key,
        }
    }

    /// `ibv_reg_mr(pd, addr, len, access)`: pinned, ODP, or implicit ODP (`addr = 0, len = u64::MAX` with
    /// `ON_DEMAND`) by the flags (module docs, registration rules).
    ///
    /// # Errors
    /// `EINVAL`, `EOVERFLOW` by the rules; the long-term pin's errnos for a pinned MR.
    pub async fn reg_mr(
        &self,
        pd: PdId,
        addr: Va,
        len: u64,
        access: Access,
    ) -> Result<MrKeys, RnicError> {
        let pid = self.pd_pid(pd)?;
        if access.intersects(Access::REMOTE_WRITE | Access::REMOTE_ATOMIC)
            && !access.contains(Access::LOCAL_WRITE)
        {
            return Err(Errno::EINVAL.into());
        }
        let implicit = addr.raw() == 0 && len == u64::MAX;
        if access.contains(Access::ON_DEMAND) {
            if implicit {
                if access.contains(Access::HUGETLB) {
                    return Err(Errno::EINVAL.into());
                }
                let children = Rc::new(RefCell::new(BTreeMap::new()));
                self.count("rnic.reg_mr.implicit", 1);
                let range = Range::new(Va::from_raw(0), Va::from_raw(TASK_SIZE));
                return Ok(self.insert_mr(pd, pid, access, range, MrBacking::Implicit(children)));
            }
            let end = addr
                .raw()
                .checked_add(len)
                .and_then(|e| Va::from_raw(e).align_up(PAGE_SIZE))
                .ok_or(Errno::EOVERFLOW)?;
            let start = addr.align_down(PAGE_SIZE);
            if end <= start {
                return Err(Errno::EINVAL.into());
            }
            let range = Range::new(start, end);
            let umem = OdpUmem::new(
                &self.platform,
                &self.dev,
                pid,
                range,
                access.writable(),
                None,
            )?;
            self.count("rnic.reg_mr.odp", 1);
            // mlx5_ib_init_odp_mr: one snapshot pass maps the pages already present, faulting nothing.
            if self.snapshot(&umem, pid, range).await.is_err() {
                self.count("rnic.snapshot_errors", 1);
            }
            return Ok(self.insert_mr(pd, pid, access, range, MrBacking::Odp(umem)));
        }
        // ib_umem_get.
        let end = addr
            .raw()
            .checked_add(len)
            .and_then(|e| Va::from_raw(e).align_up(PAGE_SIZE))
            .ok_or(Errno::EINVAL)?;
        if len == 0 {
            return Err(Errno::EINVAL.into());
        }
        let range = Range::new(addr.align_down(PAGE_SIZE), end);
        let mut flags = DmaSgFlags::LONGTERM;
        if access.writable() {
            flags |= DmaSgFlags::WRITE;
        }
        let h = get_user_dma_sg(&self.platform, pid, range, self.dev.id, flags).await?;
        self.count("rnic.reg_mr.pinned", 1);
        Ok(self.insert_mr(pd, pid, access, range, MrBacking::Pinned(h)))
    }

    /// `ibv_reg_dmabuf_mr(pd, offset, len, iova = 0, fd, access)`: a dynamic importer of `len` bytes at
    /// `offset` of the BAR export `mmio`; the MR's addresses are `[0, len)`.
    ///
    /// # Errors
    /// `EINVAL` for a range outside the export or a bad access; the attach's errnos (`ENODEV`,
    /// `EREMOTEIO`).
    pub fn reg_dmabuf_mr(
        &self,
        pd: PdId,
        mmio: MmioId,
        offset: u64,
        len: u64,
        access: Access,
    ) -> Result<MrKeys, RnicError> {
        let pid = self.pd_pid(pd)?;
        if access.intersects(Access::REMOTE_WRITE | Access::REMOTE_ATOMIC)
            && !access.contains(Access::LOCAL_WRITE)
        {
            return Err(Errno::EINVAL.into());
        }
        let ex = self.platform.export_range(mmio).ok_or(Errno::ENODEV)?;
        let r = page_range(Va::from_raw(offset), len)?;
        if r.end.raw() > ex.len() {
            return Err(Errno::EINVAL.into());
        }
        let pas = (0..r.nr_pages())
            .map(|i| ex.start.add(offset + i * PAGE_SIZE))
            .collect();
        let att = self.platform.dmabuf_attach(
            mmio,
            self.dev.id,
            ImporterKind::Dynamic,
            pas,
            access.writable(),
        )?;
        self.count("rnic.reg_mr.dmabuf", 1);
        let range = Range::new(Va::from_raw(0), Va::from_raw(len));
        Ok(self.insert_mr(pd, pid, access, range, MrBacking::DmaBuf { mmio, att }))
    }

    /// `ibv_reg_dmabuf_mr` on the dma-buf a GPU exported for buffer object `bo` (`ib_umem_dmabuf_get`: a
    /// dynamic importer with `move_notify`, mapped now): `len` bytes from the buffer's start; the MR's
    /// addresses are `[0, len)`. Every move of the buffer zaps the MR's translations (its `move_notify`);
    /// the NIC's next access maps the buffer again where it is then ([`crate::gpu::Gpu::bo_dma`]).
    ///
    /// # Errors
    /// `EINVAL` for a bad access or a length beyond the buffer; [`RnicError::UnknownBo`];
    /// the attach's errnos (`EREMOTEIO` when the NIC cannot reach the window).
    pub async fn reg_gpu_bo_mr(
        &self,
        pd: PdId,
        gpu: &Rc<crate::gpu::Gpu>,
        bo: crate::gpu::BoId,
        len: u64,
        access: Access,
    ) -> Result<MrKeys, RnicError> {
        let pid = self.pd_pid(pd)?;
        if access.intersects(Access::REMOTE_WRITE | Access::REMOTE_ATOMIC)
            && !access.contains(Access::LOCAL_WRITE)
        {
            return Err(Errno::EINVAL.into());
        }
        let r = page_range(Va::from_raw(0), len)?;
        if r.end.raw() > gpu.bo_size(bo)? {
            return Err(Errno::EINVAL.into());
        }
        let att = gpu
            .bo_attach(bo, self.dev.id, ImporterKind::Dynamic, access.writable())
            .await?;
        self.count("rnic.reg_mr.dmabuf", 1);
        let range = Range::new(Va::from_raw(0), Va::from_raw(len));
        Ok(self.insert_mr(
            pd,
            pid,
            access,
            range,
            MrBacking::GpuBo {
                gpu: gpu.clone(),
                att,
            },
        ))
    }

    fn mr(&self, key: u32) -> Result<Rc<Mr>, RnicError> {
        self.st
            .borrow()
            .mrs
            .get(&key)
            .cloned()
            .ok_or(RnicError::UnknownMr(key))
    }

    /// `ibv_dereg_mr`: unpins, or zaps and removes every ODP notifier, or detaches.
    ///
    /// # Errors
    /// [`RnicError::UnknownMr`].
    pub async fn dereg_mr(&self, lkey: u32) -> Result<(), RnicError> {
        let mr = self
            .st
            .borrow_mut()
            .mrs
            .remove(&lkey)
            .ok_or(RnicError::UnknownMr(lkey))?;
        let Ok(mr) = Rc::try_unwrap(mr) else {
            // A WR still uses it: its access ends with the MR gone from the table; the backing goes with
            // the last reference (coarse: Linux waits for the mkey's users).
            return Ok(());
        };
        match mr.backing {
            MrBacking::Pinned(h) => h.release().await,
            MrBacking::Odp(u) => {
                u.mirror.unmap_range(u.umem().range).await;
                u.mirror.remove().await;
            }
            MrBacking::Implicit(children) => {
                let all: Vec<Rc<OdpUmem>> = std::mem::take(&mut *children.borrow_mut())
                    .into_values()
                    .collect();
                for c in all {
                    c.umem().dead.set(true);
                    c.mirror.unmap_range(c.umem().range).await;
                    c.mirror.remove().await;
                }
            }
            MrBacking::DmaBuf { mmio, att } => {
                let cost = self.platform.dmabuf_detach(mmio, att);
                self.k().spend(cost).await;
            }
            MrBacking::GpuBo { gpu, att } => gpu.bo_detach(att),
        }
        Ok(())
    }

    /// Returns a snapshot of MR `lkey`.
    ///
    /// # Errors
    /// [`RnicError::UnknownMr`].
    pub fn mr_info(&self, lkey: u32) -> Result<MrInfo, RnicError> {
        let mr = self.mr(lkey)?;
        let (nr_mapped, children) = match &mr.backing {
            MrBacking::Pinned(h) => (h.nr_pinned() as u64, Vec::new()),
            MrBacking::Odp(u) => (u.umem().entries.borrow().len() as u64, Vec::new()),
            MrBacking::Implicit(c) => {
                let c = c.borrow();
                (
                    c.values()
                        .map(|u| u.umem().entries.borrow().len() as u64)
                        .sum(),
                    c.keys()
                        .map(|s| Va::from_raw(s * IMPLICIT_CHILD_SIZE))
                        .collect(),
                )
            }
            MrBacking::DmaBuf { mmio, att } => (
                if self.platform.dmabuf_is_mapped(*mmio, *att) {
                    mr.range.nr_pages()
                } else {
                    0
                },
                Vec::new(),
            ),
            MrBacking::GpuBo { gpu, att } => (
                if gpu.bo_is_mapped(*att) {
                    mr.range.nr_pages()
                } else {
                    0
                },
                Vec::new(),
            ),
        };
        Ok(MrInfo {
            kind: mr.kind(),
            pd: mr.pd,
            access: mr.access,
            nr_mapped,
            children,
        })
    }

    /// Returns the umem that serves `va` of an ODP MR, creating an implicit child on demand.
    fn umem_for(&self, mr: &Mr, va: Va) -> Result<Rc<OdpUmem>, Errno> {
        match &mr.backing {
            MrBacking::Odp(u) => Ok(u.clone()),
            MrBacking::Implicit(children) => {
                if va.raw() >= TASK_SIZE {
                    return Err(Errno::EFAULT);
                }
                let slot = va.raw() / IMPLICIT_CHILD_SIZE;
                if let Some(c) = children.borrow().get(&slot) {
                    return Ok(c.clone());
                }
                let start = Va::from_raw(slot * IMPLICIT_CHILD_SIZE);
                let range = Range::new(start, start.add(IMPLICIT_CHILD_SIZE));
                let c = OdpUmem::new(
                    &self.platform,
                    &self.dev,
                    mr.pid,
                    range,
                    mr.access.writable(),
                    Some((Rc::downgrade(children), slot)),
                )?;
                children.borrow_mut().insert(slot, c.clone());
                self.count("rnic.implicit_children_created", 1);
                Ok(c)
            }
            _ => Err(Errno::EINVAL),
        }
    }

    /// The NIC accesses `[va, va + pages)` of `mr` through its device path, one request per page:
    /// `data` is `Some` for a write. Returns the bytes read.
    ///
    /// An ODP page without a (writable) translation is faulted (`Miss::Fault`: `rnic.fault_service` plus
    /// the mirror's fault of the rest of the access inside the umem) or stops the access with `EAGAIN`
    /// (`Miss::Stop`). The MTT lookup and the issue of a page happen together, as the hardware does.
    async fn access(
        &self,
        mr: &Mr,
        va: Va,
        pages: u64,
        data: Option<&[u8]>,
        miss: Miss,
    ) -> Result<Vec<u8>, Errno> {
        let write = data.is_some();
        let op = |i: u64| match data {
            Some(d) => {
                let o = usize::try_from(i * PAGE_SIZE).expect("fits");
                DmaOp::Write(d[o..o + PAGE_BYTES].to_vec())
            }
            None => DmaOp::Read,
        };
        match &mr.backing {
            MrBacking::Pinned(h) => {
                let off = va.offset_from(mr.range.start);
                return match data {
                    Some(d) => h
                        .write(off, d)
                        .await
                        .map(|()| Vec::new())
                        .map_err(|e| e.errno()),
                    None => h
                        .read(off, usize::try_from(pages * PAGE_SIZE).expect("fits"))
                        .await
                        .map_err(|e| e.errno()),
                };
            }
            MrBacking::DmaBuf { mmio, att } => {
                if !self.platform.dmabuf_is_mapped(*mmio, *att) {
                    // The MTTs were zapped by move_notify: this access faults and the mapping is rebuilt.
                    self.count("rnic.dmabuf_faults", 1);
                }
                let first = va.offset_from(mr.range.start) / PAGE_SIZE;
                let mut reqs = Vec::new();
                for i in 0..pages {
                    let idx = usize::try_from(first + i).expect("fits");
                    let addr = self.platform.dmabuf_page_addr(*mmio, *att, idx)?;
                    reqs.push(DmaRequest {
                        addr: DeviceAddr::Dma(addr),
                        grant: DeviceGrant::Raw,
                        op: op(i),
                    });
                }
                return self.platform.dma(&self.dev, reqs).await.into_result();
            }
            MrBacking::GpuBo { gpu, att } => {
                if !gpu.bo_is_mapped(*att) {
                    // The MTTs were zapped by move_notify: this access faults and the mapping is rebuilt
                    // at the buffer's current place (under the buffer's reservation lock).
                    self.count("rnic.dmabuf_faults", 1);
                }
                let off = va.offset_from(mr.range.start);
                return gpu
                    .bo_dma(*att, off, pages * PAGE_SIZE, data)
                    .await
                    .map_err(|e| RnicError::from(e).errno());
            }
            MrBacking::Odp(_) | MrBacking::Implicit(_) => {}
        }
        // ODP.
        let space = &self.dev.space;
        let mut issued: VecDeque<(u64, RequestId)> = VecDeque::new();
        let mut out = vec![
            0u8;
            if write {
                0
            } else {
                usize::try_from(pages * PAGE_SIZE).expect("fits")
            }
        ];
        let mut todo: VecDeque<u64> = (0..pages).collect();
        let mut result = Ok(());
        while let Some(i) = todo.pop_front() {
            let pva = va.add(i * PAGE_SIZE);
            // The device's tags.
            while space.nr_in_flight() >= space.max_outstanding() && !issued.is_empty() {
                let (j, id) = issued.pop_front().expect("non-empty");
                Self::land(&mut out, j, space.wait(id).await, &mut todo, &mut result);
            }
            let umem = match self.umem_for(mr, pva) {
                Ok(u) => u,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            let Some(addr) = umem.lookup(pva, write) else {
                if miss == Miss::Stop {
                    result = Err(Errno::EAGAIN);
                    break;
                }
                let end = va.add(pages * PAGE_SIZE).min(umem.umem().range.end);
                self.count("rnic.odp_faults", 1);
                self.k().sim.sleep(self.costs.fault_service).await;
                match umem.fault(Range::new(pva, end), write).await {
                    Ok(()) | Err(Errno::EAGAIN) => {}
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
                todo.push_front(i);
                continue;
            };
            let req = DmaRequest {
                addr: DeviceAddr::Dma(addr),
                grant: DeviceGrant::Mirror {
                    pid: mr.pid,
                    va: pva,
                },
                op: op(i),
            };
            match self.platform.dma_issue(&self.dev, req) {
                Ok(id) => issued.push_back((i, id)),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
            self.k().sim.sleep(SimDuration::ZERO).await;
        }
        // What was issued still lands.
        while let Some((j, id)) = issued.pop_front() {
            Self::land(&mut out, j, space.wait(id).await, &mut todo, &mut result);
        }
        if result.is_ok() && !todo.is_empty() {
            // Requests a fence aborted: issue them again.
            let again: Vec<u64> = todo.into_iter().collect();
            for i in again {
                let d = data.map(|d| &d[usize::try_from(i * PAGE_SIZE).expect("fits")..]);
                let d = d.map(|d| &d[..PAGE_BYTES]);
                let page = Box::pin(self.access(mr, va.add(i * PAGE_SIZE), 1, d, miss)).await?;
                if !write {
                    let o = usize::try_from(i * PAGE_SIZE).expect("fits");
                    out[o..o + PAGE_BYTES].copy_from_slice(&page);
                }
            }
        }
        result.map(|()| out)
    }

    fn land(
        out: &mut [u8],
        i: u64,
        r: Result<Vec<u8>, Errno>,
        todo: &mut VecDeque<u64>,
        result: &mut Result<(), Errno>,
    ) {
        match r {
            Ok(page) => {
                if !page.is_empty() {
                    let o = usize::try_from(i * PAGE_SIZE).expect("fits");
                    out[o..o + PAGE_BYTES].copy_from_slice(&page);
                }
            }
            Err(Errno::EAGAIN) => todo.push_back(i),
            Err(e) => {
                if result.is_ok() {
                    *result = Err(e);
                }
            }
        }
    }

    /// `ibv_advise_mr(pd, advice, flags, sge[])`; `flush` makes it synchronous
    /// (`IB_UVERBS_ADVISE_MR_FLAG_FLUSH`) and returns the first error; otherwise the work runs in the
    /// background and its failures are only counted (`rnic.prefetch_errors`).
    ///
    /// # Errors
    /// Per SGE: `ENOENT` for an unknown key or a non-ODP MR, `EPERM` for another PD or a
    /// `PrefetchWrite` of a read-only MR, `EINVAL` for a bad range; with `flush`, the fault's errno.
    pub async fn advise_mr(
        self: &Rc<Self>,
        pd: PdId,
        advice: Advice,
        flush: bool,
        sges: &[Sge],
    ) -> Result<(), RnicError> {
        self.pd_pid(pd)?;
        let mut work = Vec::new();
        for s in sges {
            let mr = self.mr(s.lkey).map_err(|_| Errno::ENOENT)?;
            if !matches!(mr.backing, MrBacking::Odp(_) | MrBacking::Implicit(_)) {
                return Err(Errno::ENOENT.into());
            }
            if mr.pd != pd {
                return Err(Errno::EPERM.into());
            }
            if advice == Advice::PrefetchWrite && !mr.access.writable() {
                return Err(Errno::EPERM.into());
            }
            let r = page_range(s.addr, s.len)?;
            if !mr.range.contains_range(&r) {
                return Err(Errno::EINVAL.into());
            }
            work.push((mr, r));
        }
        self.count("rnic.prefetch", 1);
        if flush {
            for (mr, r) in work {
                self.prefetch(&mr, r, advice).await?;
            }
            return Ok(());
        }
        let me = self.clone();
        self.k()
            .sim
            .spawn(format!("rnic.{}.prefetch", self.dev.name), async move {
                for (mr, r) in work {
                    if me.prefetch(&mr, r, advice).await.is_err() {
                        me.count("rnic.prefetch_errors", 1);
                    }
                }
            });
        Ok(())
    }

    /// The snapshot mode of a fault (`MLX5_PF_FLAGS_SNAPSHOT`): maps, read-only, the runs of pages of `r`
    /// that the CPU page table already has and the NIC has not, faulting nothing in.
    async fn snapshot(&self, umem: &OdpUmem, pid: Pid, r: Range<Va>) -> Result<(), Errno> {
        let wanted =
            |p: Va| self.k().translate(pid, p).is_some() && umem.lookup(p, false).is_none();
        let mut p = r.start;
        while p < r.end {
            if !wanted(p) {
                p = p.add(PAGE_SIZE);
                continue;
            }
            let start = p;
            while p < r.end && wanted(p) {
                p = p.add(PAGE_SIZE);
            }
            match umem.fault(Range::new(start, p), false).await {
                Ok(()) | Err(Errno::EAGAIN) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    async fn prefetch(&self, mr: &Mr, r: Range<Va>, advice: Advice) -> Result<(), Errno> {
        let write = advice == Advice::PrefetchWrite;
        let mut va = r.start;
        while va < r.end {
            let umem = self.umem_for(mr, va)?;
            let end = r.end.min(umem.umem().range.end);
            if advice == Advice::PrefetchNoFault {
                self.snapshot(&umem, mr.pid, Range::new(va, end)).await?;
            } else {
                match umem.fault(Range::new(va, end), write).await {
                    Ok(()) | Err(Errno::EAGAIN) => {}
                    Err(e) => return Err(e),
                }
            }
            va = end;
        }
        Ok(())
    }

    /// `ibv_create_cq`.
    pub fn create_cq(&self) -> CqId {
        let mut st = self.st.borrow_mut();
        let cq = CqId(st.next_cq);
        st.next_cq += 1;
        st.cqs.insert(cq, VecDeque::new());
        cq
    }

    /// `ibv_create_qp` (RC) on `pd`, completing on `cq`; it starts in RTS once connected.
    ///
    /// # Errors
    /// Unknown PD or CQ; `EINVAL` for `rnr_retry` or `retry_cnt` above 7 or `max_send_wr` 0.
    pub fn create_qp(&self, pd: PdId, cq: CqId, attr: QpAttr) -> Result<QpId, RnicError> {
        self.pd_pid(pd)?;
        if attr.rnr_retry > 7 || attr.retry_cnt > 7 || attr.max_send_wr == 0 {
            return Err(Errno::EINVAL.into());
        }
        let mut st = self.st.borrow_mut();
        if !st.cqs.contains_key(&cq) {
            return Err(RnicError::UnknownCq(cq.0));
        }
        let qp = QpId(st.next_qp);
        st.next_qp += 1;
        st.qps.insert(
            qp,
            Rc::new(Qp {
                pd,
                cq,
                attr,
                state: Cell::new(QpState::Rts),
                outstanding: Cell::new(0),
                remote: RefCell::new(None),
                recv: RefCell::default(),
                sq: SimMutex::new(&self.platform.kernel.sim, "rnic.sq"),
            }),
        );
        Ok(qp)
    }

    fn qp(&self, qp: QpId) -> Result<Rc<Qp>, RnicError> {
        self.st
            .borrow()
            .qps
            .get(&qp)
            .cloned()
            .ok_or(RnicError::UnknownQp(qp.0))
    }

    /// Connects `qp` of this NIC with `rqp` of `remote` (both directions; `remote` may be this NIC).
    ///
    /// # Errors
    /// Unknown QPs.
    pub fn connect(
        self: &Rc<Self>,
        qp: QpId,
        remote: &Rc<Self>,
        rqp: QpId,
    ) -> Result<(), RnicError> {
        let a = self.qp(qp)?;
        let b = remote.qp(rqp)?;
        *a.remote.borrow_mut() = Some((Rc::downgrade(remote), rqp));
        *b.remote.borrow_mut() = Some((Rc::downgrade(self), qp));
        Ok(())
    }

    /// Returns a QP's state.
    ///
    /// # Errors
    /// [`RnicError::UnknownQp`].
    pub fn qp_state(&self, qp: QpId) -> Result<QpState, RnicError> {
        Ok(self.qp(qp)?.state.get())
    }

    /// `ibv_post_recv`: queues a receive buffer for SENDs.
    ///
    /// # Errors
    /// Unknown QP; `EINVAL` when the QP is in Error (the WR would be flushed).
    pub fn post_recv(&self, qp: QpId, wr_id: u64, sge: Sge) -> Result<(), RnicError> {
        let q = self.qp(qp)?;
        if q.state.get() == QpState::Error {
            return Err(Errno::EINVAL.into());
        }
        q.recv.borrow_mut().push_back((wr_id, sge));
        Ok(())
    }

    /// `ibv_post_send`: queues `wr`; it runs in the background, in order with the QP's other WRs, and
    /// completes on the QP's CQ.
    ///
    /// # Errors
    /// Unknown QP; [`RnicError::NotConnected`]; `ENOMEM` when `max_send_wr` WRs are outstanding.
    pub fn post_send(self: &Rc<Self>, qp: QpId, wr: SendWr) -> Result<(), RnicError> {
        let q = self.qp(qp)?;
        if q.remote.borrow().is_none() {
            return Err(RnicError::NotConnected(qp.0));
        }
        if q.outstanding.get() >= q.attr.max_send_wr {
            return Err(Errno::ENOMEM.into());
        }
        q.outstanding.set(q.outstanding.get() + 1);
        let me = self.clone();
        self.k()
            .sim
            .spawn(format!("rnic.{}.qp{}", self.dev.name, qp.0), async move {
                let g = q.sq.lock().await;
                let (status, bytes) = me.execute(&q, &wr).await;
                drop(g);
                q.outstanding.set(q.outstanding.get() - 1);
                me.complete(
                    q.cq,
                    Wc {
                        wr_id: wr.wr_id,
                        status,
                        opcode: Some(wr.opcode),
                        bytes,
                        at: me.k().sim.now(),
                    },
                );
            });
        Ok(())
    }

    fn complete(&self, cq: CqId, wc: Wc) {
        self.k().sim.trace("rnic.wc", || {
            format!(
                "{} cq{} wr {} {}",
                self.dev.name,
                cq.0,
                wc.wr_id,
                wc.status.name()
            )
        });
        self.count(&format!("rnic.wc.{}", wc.status.name()), 1);
        if let Some(q) = self.st.borrow_mut().cqs.get_mut(&cq) {
            q.push_back(wc);
        }
        self.cq_wq.wake_up_all();
    }

    /// `ibv_poll_cq`: takes up to `max` completions.
    ///
    /// # Errors
    /// [`RnicError::UnknownCq`].
    pub fn poll_cq(&self, cq: CqId, max: usize) -> Result<Vec<Wc>, RnicError> {
        let mut st = self.st.borrow_mut();
        let q = st.cqs.get_mut(&cq).ok_or(RnicError::UnknownCq(cq.0))?;
        let n = max.min(q.len());
        Ok(q.drain(..n).collect())
    }

    /// Waits until `cq` holds at least `n` completions, then takes `n` of them.
    ///
    /// # Errors
    /// [`RnicError::UnknownCq`].
    pub async fn wait_cq(&self, cq: CqId, n: usize) -> Result<Vec<Wc>, RnicError> {
        if !self.st.borrow().cqs.contains_key(&cq) {
            return Err(RnicError::UnknownCq(cq.0));
        }
        self.cq_wq
            .wait_event(|| self.st.borrow().cqs.get(&cq).is_none_or(|q| q.len() >= n))
            .await;
        self.poll_cq(cq, n)
    }

    /// Checks a local SGE for `qp` (key, PD, range, local write for a destination).
    fn local_mr(&self, q: &Qp, sge: &Sge, dest: bool) -> Option<(Rc<Mr>, Range<Va>)> {
        let mr = self.mr(sge.lkey).ok()?;
        let r = page_range(sge.addr, sge.len).ok()?;
        let ok = mr.pd == q.pd
            && mr.range.contains_range(&r)
            && (!dest || mr.access.contains(Access::LOCAL_WRITE));
        ok.then_some((mr, r))
    }

    fn to_error(&self, q: &Qp) {
        if q.state.get() != QpState::Error {
            q.state.set(QpState::Error);
            self.count("rnic.qp_errors", 1);
        }
    }

    async fn wire(&self, pages: u64) {
        let t = self.costs.wire_latency + self.costs.wire_page.saturating_mul(pages);
        self.k().sim.sleep(self.k().sim.jitter(t)).await;
    }

    /// Runs one send WR as the requester (module docs); returns its status and the bytes moved.
    async fn execute(&self, q: &Qp, wr: &SendWr) -> (WcStatus, u64) {
        if q.state.get() == QpState::Error {
            return (WcStatus::WrFlushErr, 0);
        }
        let Some((remote, rqp)) = q
            .remote
            .borrow()
            .as_ref()
            .and_then(|(w, r)| w.upgrade().map(|w| (w, *r)))
        else {
            self.to_error(q);
            return (WcStatus::RetryExcErr, 0);
        };
        let dest = wr.opcode == WrOpcode::Read;
        let Some((mr, r)) = self.local_mr(q, &wr.sge, dest) else {
            self.to_error(q);
            return (WcStatus::LocProtErr, 0);
        };
        let pages = r.nr_pages();
        // The requester reads its source (WRITE, SEND): a requester fault stalls the QP until resolved.
        let payload = if dest {
            None
        } else {
            let Ok(d) = self.access(&mr, r.start, pages, None, Miss::Fault).await else {
                self.to_error(q);
                return (WcStatus::LocProtErr, 0);
            };
            Some(d)
        };
        let mut rnr_left = q.attr.rnr_retry;
        let mut retry_left = q.attr.retry_cnt;
        loop {
            // Request packet(s) out.
            self.wire(if dest { 0 } else { pages }).await;
            let answer = remote.respond(rqp, wr, pages, payload.as_deref()).await;
            match answer {
                Answer::Ack(data) => {
                    // The ACK, or the READ response's data.
                    self.wire(if dest { pages } else { 0 }).await;
                    if dest
                        && self
                            .access(&mr, r.start, pages, Some(&data), Miss::Fault)
                            .await
                            .is_err()
                    {
                        self.to_error(q);
                        return (WcStatus::LocProtErr, 0);
                    }
                    return (WcStatus::Success, r.len());
                }
                Answer::Rnr => {
                    self.count("rnic.rnr_naks", 1);
                    self.wire(0).await;
                    if q.attr.rnr_retry != RNR_RETRY_INFINITE {
                        if rnr_left == 0 {
                            self.to_error(q);
                            return (WcStatus::RnrRetryExcErr, 0);
                        }
                        rnr_left -= 1;
                    }
                    let t = self.costs.rnr_timer.max(SimDuration::from_nanos(1));
                    self.k().sim.sleep(t).await;
                }
                Answer::Drop => {
                    self.count("rnic.transport_retries", 1);
                    if retry_left == 0 {
                        self.to_error(q);
                        return (WcStatus::RetryExcErr, 0);
                    }
                    retry_left -= 1;
                    let t = self.costs.ack_timeout.max(SimDuration::from_nanos(1));
                    self.k().sim.sleep(t).await;
                }
                Answer::AccessErr => {
                    self.count("rnic.remote_access_errors", 1);
                    self.wire(0).await;
                    self.to_error(q);
                    if let Ok(rq) = remote.qp(rqp) {
                        remote.to_error(&rq);
                    }
                    return (WcStatus::RemAccessErr, 0);
                }
            }
        }
    }

    /// The responder's handling of one request packet of `wr` on its QP `qp`.
    async fn respond(&self, qp: QpId, wr: &SendWr, pages: u64, payload: Option<&[u8]>) -> Answer {
        let Ok(q) = self.qp(qp) else {
            return Answer::AccessErr;
        };
        if q.state.get() == QpState::Error {
            return Answer::AccessErr;
        }
        let (mr, r, right) = match wr.opcode {
            WrOpcode::Send => {
                let Some(&(_, sge)) = q.recv.borrow().front() else {
                    self.count("rnic.rnr_no_recv", 1);
                    return Answer::Rnr;
                };
                if sge.len < pages * PAGE_SIZE {
                    return Answer::AccessErr;
                }
                let Some((mr, _)) = self.local_mr(&q, &sge, true) else {
                    return Answer::AccessErr;
                };
                let r = Range::from_len(sge.addr, pages * PAGE_SIZE).expect("checked");
                (mr, r, Access::LOCAL_WRITE)
            }
            WrOpcode::Write | WrOpcode::Read => {
                let Ok(mr) = self.mr(wr.rkey) else {
                    return Answer::AccessErr;
                };
                let right = if wr.opcode == WrOpcode::Write {
                    Access::REMOTE_WRITE
                } else {
                    Access::REMOTE_READ
                };
                let Some(r) = Range::from_len(wr.remote_addr, pages * PAGE_SIZE) else {
                    return Answer::AccessErr;
                };
                if mr.pd != q.pd
                    || !mr.range.contains_range(&r)
                    || !wr.remote_addr.is_page_aligned()
                {
                    return Answer::AccessErr;
                }
                (mr, r, right)
            }
        };
        if !mr.access.contains(right) {
            return Answer::AccessErr;
        }
        // A fault of this range failed earlier: the driver resumed the QP with error.
        let failed = mr
            .failed
            .borrow()
            .range(r.start.page_number()..r.end.page_number())
            .next()
            .is_some();
        if failed {
            mr.failed.borrow_mut().clear();
            return Answer::AccessErr;
        }
        let is_read = wr.opcode == WrOpcode::Read;
        match self.access(&mr, r.start, pages, payload, Miss::Stop).await {
            Ok(data) => {
                if wr.opcode == WrOpcode::Send {
                    let (wr_id, _) = q.recv.borrow_mut().pop_front().expect("checked");
                    self.complete(
                        q.cq,
                        Wc {
                            wr_id,
                            status: WcStatus::Success,
                            opcode: None,
                            bytes: r.len(),
                            at: self.k().sim.now(),
                        },
                    );
                }
                Answer::Ack(data)
            }
            Err(Errno::EAGAIN) => {
                self.count("rnic.responder_faults", 1);
                self.background_fault(&mr, r, !is_read);
                if is_read { Answer::Drop } else { Answer::Rnr }
            }
            Err(_) => Answer::AccessErr,
        }
    }

    /// Starts the page-fault work of a responder fault (one at a time per MR); a failure is remembered.
    fn background_fault(&self, mr: &Rc<Mr>, r: Range<Va>, write: bool) {
        if mr.pending.get() > 0 {
            return;
        }
        mr.pending.set(1);
        let mr = mr.clone();
        let me_k = self.platform.kernel.clone();
        let service = self.costs.fault_service;
        // Resolve the umems now (a child is created even by a fault that then fails).
        let mut umems = Vec::new();
        let mut va = r.start;
        while va < r.end {
            match self.umem_for(&mr, va) {
                Ok(u) => {
                    let end = r.end.min(u.umem().range.end);
                    umems.push((u, Range::new(va, end)));
                    va = end;
                }
                Err(e) => {
                    mr.failed.borrow_mut().insert(va.page_number(), e);
                    mr.pending.set(0);
                    return;
                }
            }
        }
        self.count("rnic.odp_faults", 1);
        let name = format!("rnic.{}.page_fault", self.dev.name);
        self.k().sim.spawn(name, async move {
            me_k.sim.sleep(service).await;
            for (u, rr) in umems {
                match u.fault(rr, write).await {
                    Ok(()) | Err(Errno::EAGAIN) => {}
                    Err(e) => {
                        mr.failed.borrow_mut().insert(rr.start.page_number(), e);
                        break;
                    }
                }
            }
            mr.pending.set(0);
        });
    }
}
