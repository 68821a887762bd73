//! The DMA layer of peerdma: how a device gets DMA addresses for memory a process sees as virtual addresses,
//! whatever backs them (DESIGN.md §2, §4.2–§4.6).
//!
//! Linux counterparts: kernel/dma/mapping.c and drivers/iommu/dma-iommu.c (`dma_map_sg` with per-segment
//! P2PDMA classification, `pci_p2pdma_state`), drivers/pci/p2pdma.c (p2pmem `allocate`, provider removal),
//! drivers/dma-buf/dma-buf.c (dynamic importers, `move_notify`), drivers/infiniband/core/umem_odp.c (the
//! coherent mirror), and the 2016 proposal `get_user_dma_sg()` that never landed as such
//! (`spec/linux-p2p.md` §7, §9 item 7).
//!
//! Layout:
//! - [`platform`]: the [`Platform`] — topology, P2P providers, each DMA device's IOMMU domain, BAR exports —
//!   and P2P memory set-up, p2pmem mmap and provider removal;
//! - [`map`]: `map_sg` / `unmap_sg` with P2P classification, and a device's access through a DMA address;
//! - [`dmabuf`]: BAR memory without `struct page` exported to importers (dynamic with `move_notify`, or
//!   pinned), revoked at removal;
//! - [`hmm_dma`]: range-at-a-time DMA mapping of a mirrored range (`hmm_dma_map_*`: one IOVA reservation,
//!   pages linked and unlinked one by one);
//! - [`hmm_mirror`]: the one mirror loop (fault with `read_begin` / `read_retry`, invalidate with zap, fence
//!   and DMA-unmap) that every mirroring device uses through [`MirrorDevice`];
//! - [`mirror`]: the long-term coherent translation mirror of a DMA device (ODP/HMM pattern, no pins);
//! - [`sg`]: `get_user_dma_sg(mm, range, initiator, flags)` dispatching per VMA (DESIGN.md §4.6);
//! - [`space`]: `DmaSpace`, the one path every device access takes, with DMA in flight and the fence
//!   (DESIGN.md §4.8).
//!
//! Errors ([`error`]): outcomes Linux returns keep Linux's errno ([`DmaError::Errno`]), so a refused DMA
//! mapping compares one-to-one with the kernel; a misuse of the API (a device never added, a range outside a
//! handle) is a [`DmaError`] variant of its own. The device path itself ([`space`], the mirror loop's
//! `hmm_range_fault`) reports per-request errnos as data.

pub mod dmabuf;
pub mod error;
pub mod hmm_dma;
pub mod hmm_mirror;
pub mod map;
pub mod mirror;
pub mod platform;
pub mod sg;
pub mod space;

pub use dmabuf::{AttachId, ImporterKind};
pub use error::DmaError;
pub use hmm_dma::{DmaPfn, HmmDmaMap};
pub use hmm_mirror::{HMM_RANGE_DEFAULT_TIMEOUT, HmmMirror, MirrorDevice, ProgramCost};
pub use map::{DmaAddr, DmaSegment, MappedSg, SegKind};
pub use mirror::DmaMirror;
pub use platform::{DmaCosts, DmaDevice, Platform};
pub use sg::{DmaSgFlags, DmaSgHandle, get_user_dma_sg};
pub use space::{
    DeviceAddr, DmaFault, DmaOp, DmaOutcome, DmaRequest, DmaSpace, FenceInjection, FenceMode,
    RequestId,
};
