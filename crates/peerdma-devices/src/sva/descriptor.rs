//! The accelerator's descriptors and completion records (a DSA-like format: include/uapi/linux/idxd.h).

use peerdma_core::Va;
use peerdma_iommu::{AtcConfig, SvaDeviceInfo};

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
