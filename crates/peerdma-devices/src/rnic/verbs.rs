//! The verbs' vocabulary of the RDMA NIC model: access flags, object ids, work requests and completions
//! (`include/rdma/ib_verbs.h`).

use peerdma_core::{SimTime, Va};

use super::RNR_RETRY_INFINITE;

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
