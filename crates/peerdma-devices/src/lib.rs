//! Device models built on the mm (and, later, pci/iommu/dma) layers. Each model is a state machine driven by
//! the simulation engine, with the device's own translation state and timing.
//!
//! - [`dmirror`]: the Linux HMM test device (lib/test_hmm.c), the conformance vehicle.

pub mod dmirror;

pub use dmirror::{
    Dmirror, DmirrorCosts, DmirrorDevice, DmirrorMemory, DmirrorResult, FaultInjection,
};
