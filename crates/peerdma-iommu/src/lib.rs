//! The IOMMU DMA-domain model: what sits between a device's DMA address and physical memory when the DMA
//! API runs on an IOMMU.
//!
//! Linux counterparts: drivers/iommu/iommu.c (domain types, `iommu_map` / `iommu_unmap`,
//! `iommu_flush_iotlb_all`, `iommu.strict`), drivers/iommu/dma-iommu.c (IOVA allocation for the DMA API,
//! `__iommu_dma_unmap`, the flush queue) and drivers/iommu/iova.c (the IOVA allocator). Design reference:
//! `DESIGN.md` §4.3; timing reference: `spec/numbers.md` §2.
//!
//! Layout:
//! - [`domain`]: [`IommuDomain`] (identity, strict DMA, deferred DMA with a flush queue), its config,
//!   translation outcomes and counters;
//! - [`iova`]: the top-down, size-aligned IOVA allocator;
//! - [`pagetable`]: the IO page table and [`IommuProt`];
//! - [`iotlb`]: the bounded LRU IOTLB and its cache rules (what is cached, when it is dropped, stale entries);
//! - [`costs`]: [`IommuCosts`], which turns outcomes into simulated time;
//! - [`sva`]: SVA binding — global PASIDs per mm, SVA domains per (IOMMU, mm), attach handles, PASID tables;
//! - [`ats`]: the device ATC of PCIe ATS and the shape of ATS invalidations;
//! - [`pri`]: PCIe PRI page requests and the I/O page-fault queue (VT-d flavour).
//!
//! Everything here is plain data: no simulator, no async, no wall clock. Outcomes a device sees
//! (translation faults, IOTLB misses, stale hits) are [`Translation`] values; [`Error`] means the caller
//! misused the API.
//!
//! SVA translation itself (walking the CPU page table), ATC invalidation completion and the PRI fault worker
//! need the mm and the simulator: they live in the device layer (`peerdma-devices`' `sva` module), built on
//! the plain data here. Not modelled: large IO pages, per-CPU flush queues, SMMUv3 stall-based faults.
//!
//! # Examples
//! ```
//! use peerdma_core::{Pa, SimTime, PAGE_SIZE};
//! use peerdma_iommu::{DomainConfig, DomainType, IommuDomain, IommuProt, Translation};
//!
//! let mut dom = IommuDomain::new(DomainConfig::with_type(DomainType::DmaFq));
//! let iova = dom.alloc_iova(PAGE_SIZE)?;
//! dom.map(iova, Pa::from_raw(0x8000_0000), PAGE_SIZE, IommuProt::READ_WRITE)?;
//! assert!(matches!(dom.translate(iova, true), Translation::Miss { .. }));
//! dom.unmap(iova, PAGE_SIZE, SimTime::ZERO)?;
//! // Deferred flushing: the device can still reach the old page until the flush queue drains.
//! assert_eq!(dom.translate(iova, true), Translation::Hit { pa: Pa::from_raw(0x8000_0000), stale: true });
//! dom.flush_all();
//! assert!(matches!(dom.translate(iova, true), Translation::Fault(_)));
//! # Ok::<(), peerdma_iommu::Error>(())
//! ```
//!
//! # A custom ATS device
//! The SVA, ATS and PRI pieces are plain data a device model drives itself. A device that caches
//! translations of its process (PASID), asks the IOMMU on a miss, sends a page request when the page is
//! not mapped, and obeys invalidations (here the "IOMMU walk" is a closure over a toy page table):
//! ```
//! use peerdma_core::{DeviceId, Pid, Range, Va};
//! use peerdma_iommu::{Atc, AtcConfig, AtcLookup, AtsCompletion, PageRequest, PageResponseCode};
//! use peerdma_iommu::{Pasid, PriQueue, Sva, SvaDeviceInfo, PRQ_ENTRIES};
//!
//! struct MyDevice { id: DeviceId, pasid: Pasid, atc: Atc<u64> }
//!
//! impl MyDevice {
//!     /// Translates `va` for a write: ATC, then a translation request, then a page request.
//!     fn translate(&mut self, va: Va, walk: impl Fn(u64) -> Option<u64>, prq: &mut PriQueue) -> Option<u64> {
//!         if let AtcLookup::Hit(c) = self.atc.lookup(self.pasid, va, true) {
//!             return Some(c.target);
//!         }
//!         let page = va.raw() >> 12;
//!         match walk(page) {
//!             Some(pa) => {
//!                 let c = AtsCompletion { target: pa, base_page: page, nr_pages: 1, read: true, write: true };
//!                 self.atc.insert(self.pasid, c);
//!                 Some(pa)
//!             }
//!             None => {
//!                 let req = PageRequest { dev: self.id, pasid: Some(self.pasid), addr: va, write: true, grpid: 0, last: true };
//!                 prq.post(req);
//!                 None // wait for the group's response, then translate again
//!             }
//!         }
//!     }
//! }
//!
//! let mut sva = Sva::new(1 << 20);
//! let dev = DeviceId(7);
//! let info = SvaDeviceInfo { group: Some(0), iommu: 0, max_pasids: 1 << 20, domain_alloc_sva: true };
//! sva.add_device(dev, info)?;
//! let bond = sva.bind(dev, Pid(1))?;
//! let mut d = MyDevice { id: dev, pasid: bond.pasid, atc: Atc::new(AtcConfig::default()) };
//! let mut prq = PriQueue::new(PRQ_ENTRIES);
//! let va = Va::from_raw(0x7000);
//!
//! // Not mapped yet: a page request; the fault worker answers its group once.
//! assert_eq!(d.translate(va, |_| None, &mut prq), None);
//! let group = prq.drain_hw().remove(0);
//! assert_eq!(prq.respond(group.id, PageResponseCode::Success)?.code, PageResponseCode::Success);
//! // Mapped now: a translation request fills the ATC, and the next access hits.
//! assert_eq!(d.translate(va, |p| Some(p + 100), &mut prq), Some(107));
//! assert_eq!(d.translate(va, |_| None, &mut prq), Some(107));
//! // The secondary-TLB flush of pages 5..9 invalidates the aligned span 0..16 and drops the entry.
//! let (base, nr, dropped) = d.atc.invalidate(d.pasid, Range::new(Va::from_raw(0x5000), Va::from_raw(0x9000)));
//! assert_eq!((base, nr, dropped), (0, 16, 1));
//! assert!(sva.unbind(bond.handle)?);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod ats;
pub mod costs;
pub mod domain;
pub mod iotlb;
pub mod iova;
pub mod pagetable;
pub mod pri;
pub mod sva;

use peerdma_core::{Errno, Iova, Pa, Range};

pub use ats::{Atc, AtcConfig, AtcLookup, AtcStats, AtsCompletion, invalidation_span};
pub use costs::IommuCosts;
pub use domain::{
    DomainConfig, DomainType, FaultReason, IommuDomain, IommuFault, IommuStats, Translation,
    UnmapOutcome,
};
pub use iotlb::Iotlb;
pub use pagetable::{IO_PAGE_TABLE_LEVELS, IommuProt};
pub use pri::{
    GroupId, PRQ_ENTRIES, PageRequest, PageResponse, PageResponseCode, PostOutcome, PriError,
    PriGroup, PriQueue, PriStats,
};
pub use sva::{Pasid, PasidEntry, Sva, SvaBond, SvaDeviceInfo, SvaDomainId, SvaError, SvaHandle};

/// A misuse of the IOMMU API or an invalid configuration. Device-side outcomes are [`Translation`]s, not
/// errors.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The operation needs a paging (DMA) domain.
    #[error("identity domain has no {op}")]
    IdentityDomain {
        /// What was asked for ("iova allocator", "page table").
        op: &'static str,
    },
    /// The domain config is invalid.
    #[error("invalid domain config: {reason}")]
    InvalidConfig {
        /// What is wrong.
        reason: &'static str,
    },
    /// A zero-length allocation, map or unmap.
    #[error("zero-length request")]
    ZeroSize,
    /// A map whose IOVA, physical address or length is not 4 KiB aligned.
    #[error("map of iova {iova:#x} to pa {pa:#x}, len {len:#x}, is not page aligned")]
    Unaligned {
        /// The IOVA asked for.
        iova: Iova,
        /// The physical address asked for.
        pa: Pa,
        /// The length asked for.
        len: u64,
    },
    /// A map that grants neither read nor write.
    #[error("mapping grants neither read nor write")]
    NoAccess,
    /// The range is not inside the domain's aperture.
    #[error("range {range} is outside the aperture {aperture}")]
    OutsideAperture {
        /// The range asked for.
        range: Range<Iova>,
        /// The domain's aperture.
        aperture: Range<Iova>,
    },
    /// No hole in the IOVA space fits the request.
    #[error("no iova space for {nr_pages} pages below {limit:#x}")]
    IovaExhausted {
        /// Pages asked for (before rounding).
        nr_pages: u64,
        /// The limit the allocation had to stay below.
        limit: Iova,
    },
    /// The range is not inside one live IOVA allocation (freed, never allocated, waiting on the flush
    /// queue, or not starting at an allocation where one must start).
    #[error("no live iova allocation holds {range}")]
    NotAllocated {
        /// The range asked for.
        range: Range<Iova>,
    },
    /// A page of the range is already mapped.
    #[error("iova {iova:#x} is already mapped")]
    AlreadyMapped {
        /// The first mapped page.
        iova: Iova,
    },
    /// A page of the range is not mapped.
    #[error("iova {iova:#x} is not mapped")]
    NotMapped {
        /// The first unmapped page.
        iova: Iova,
    },
    /// A page of the allocation would stay mapped after its IOVA is released.
    #[error("iova {iova:#x} is still mapped")]
    StillMapped {
        /// The first page still mapped.
        iova: Iova,
    },
    /// A reservation overlaps an allocation or another reservation.
    #[error("iova range {range} overlaps {existing}")]
    Overlap {
        /// The range asked for.
        range: Range<Iova>,
        /// The range in the way.
        existing: Range<Iova>,
    },
}

impl Error {
    /// Returns the errno Linux would return for the same misuse.
    pub fn errno(&self) -> Errno {
        match self {
            Self::IdentityDomain { .. }
            | Self::InvalidConfig { .. }
            | Self::ZeroSize
            | Self::Unaligned { .. }
            | Self::NoAccess
            | Self::NotAllocated { .. } => Errno::EINVAL,
            Self::OutsideAperture { .. } => Errno::EFAULT,
            Self::IovaExhausted { .. } => Errno::ENOMEM,
            Self::AlreadyMapped { .. } => Errno::EEXIST,
            Self::NotMapped { .. } => Errno::ENOENT,
            Self::StillMapped { .. } | Self::Overlap { .. } => Errno::EBUSY,
        }
    }
}

/// The result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
