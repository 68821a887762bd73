//! Device models built on the mm and dma layers (a mirroring device uses the one mirror loop of
//! [`peerdma_dma::hmm_mirror`]). Each model is a state machine driven by
//! the simulation engine, with the device's own translation state and timing.
//!
//! - [`dmirror`]: the Linux HMM test device (lib/test_hmm.c), the conformance vehicle.
//! - [`gpu`]: a GPU whose memory moves under its peers (buffer objects, managed memory, UVM faults).
//! - [`nvme`]: an NVMe controller with O_DIRECT commands into RAM or peer memory (drivers/nvme/host/pci.c).
//! - [`rnic`]: an RDMA NIC with pinned, ODP and dma-buf memory regions (drivers/infiniband).
//! - [`sva`]: an SVA accelerator (DSA / CAPI AFU shape) with its IOMMU side: PASID binding, an ATS device
//!   ATC, PRI page requests and the secondary-TLB flush (drivers/iommu/iommu-sva.c).

pub mod dmirror;
pub mod gpu;
pub mod nvme;
pub mod rnic;
pub mod sva;

pub use dmirror::{
    Dmirror, DmirrorCosts, DmirrorDevice, DmirrorMemory, DmirrorResult, FaultInjection,
};
pub use sva::{
    CompletionRecord, CompletionStatus, Descriptor, JobId, Order, SvaAccel, SvaAccelConfig,
    SvaCosts, SvaDevError, SvaInjection, SvaIommu, SvaStats,
};
