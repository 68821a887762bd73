//! Errors of the DMA layer's API.
//!
//! Two kinds of failure come back from `peerdma-dma`, and they are kept apart:
//! - **outcomes Linux returns** — a refused P2P mapping (`EREMOTEIO`), a fault on an unmapped page
//!   (`EFAULT`), a removed device (`ENODEV` once `remove_device` has run) — travel as
//!   [`DmaError::Errno`] with Linux's errno, so a scenario compares them one-to-one with the kernel;
//! - **misuse of the API** — a device id that was never added, a PCI node that is not a function, an
//!   offset outside a handle — get a variant of their own that names what was wrong. Each still has the
//!   errno the nearest kernel interface would give ([`DmaError::errno`]), so a scenario step that misuses
//!   the API fails with an errno that `expect` can name.
//!
//! A device that was added and then removed stays known: after `Platform::remove_device` its calls fail
//! with `Errno(ENODEV)`, as a driver sees after hot-unplug, not with [`DmaError::UnknownDevice`].

use peerdma_core::{DeviceId, Errno};
use peerdma_pci::NodeId;

/// An error from the DMA layer: a Linux outcome, or a misuse of the API with its context.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DmaError {
    /// An outcome Linux returns with this errno.
    #[error("{0}")]
    Errno(#[from] Errno),
    /// The device id was never added to the platform.
    #[error("device {0} is not attached to the platform")]
    UnknownDevice(DeviceId),
    /// The topology node is missing or not a PCI function, so no device can attach there.
    #[error("topology node {0} is not a PCI function")]
    NotPciFunction(NodeId),
    /// The device id or the PCI function is already taken by another device.
    #[error("device {id} or its PCI function {node} is already attached")]
    AlreadyAttached {
        /// The id asked for.
        id: DeviceId,
        /// The PCI function asked for.
        node: NodeId,
    },
    /// The device has no BAR with this index.
    #[error("device {device} has no BAR {bar}")]
    NoSuchBar {
        /// The device.
        device: DeviceId,
        /// The BAR index asked for.
        bar: u8,
    },
    /// An offset and length outside the object (handle, mirror) or not page-granular.
    #[error(
        "offset {offset:#x} + length {len:#x} is not a page-granular range inside the {size:#x}-byte object"
    )]
    BadRange {
        /// The offset asked for.
        offset: u64,
        /// The length asked for.
        len: u64,
        /// The object's size.
        size: u64,
    },
}

impl DmaError {
    /// The errno a kernel interface would return for this error: the errno itself for an outcome,
    /// `ENODEV` for an unknown device, `EEXIST` for a taken device or function, `EINVAL` otherwise.
    pub fn errno(&self) -> Errno {
        match *self {
            Self::Errno(e) => e,
            Self::UnknownDevice(_) => Errno::ENODEV,
            Self::AlreadyAttached { .. } => Errno::EEXIST,
            Self::NotPciFunction(_) | Self::NoSuchBar { .. } | Self::BadRange { .. } => {
                Errno::EINVAL
            }
        }
    }

    /// Whether this is a misuse of the API rather than an outcome Linux returns.
    pub fn is_misuse(&self) -> bool {
        !matches!(self, Self::Errno(_))
    }
}

impl From<DmaError> for Errno {
    fn from(e: DmaError) -> Self {
        e.errno()
    }
}
