//! Device models built on the mm and dma layers (a mirroring device uses the one mirror loop of
//! [`peerdma_dma::hmm_mirror`]). Each model is a state machine driven by
//! the simulation engine, with the device's own translation state and timing.
//!
//! - [`dmirror`]: the Linux HMM test device (lib/test_hmm.c), the conformance vehicle.
//! - [`rnic`]: an RDMA NIC with pinned, ODP and dma-buf memory regions (drivers/infiniband).

pub mod dmirror;
pub mod rnic;

pub use dmirror::{
    Dmirror, DmirrorCosts, DmirrorDevice, DmirrorMemory, DmirrorResult, FaultInjection,
};
