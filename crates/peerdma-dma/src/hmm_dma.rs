//! Range-at-a-time DMA mapping of a mirrored range (Linux ≥ 6.15): one IOVA reservation for the whole range,
//! pages linked into it and unlinked from it one by one.
//!
//! Linux counterparts: mm/hmm.c `hmm_dma_map_alloc`, `hmm_dma_map_pfn`, `hmm_dma_unmap_pfn`,
//! `hmm_dma_map_free` (`struct hmm_dma_map`: a DMA-address list per page plus one `dma_iova_state`), over
//! drivers/iommu/dma-iommu.c `dma_iova_try_alloc`, `dma_iova_link`, `dma_iova_sync`, `dma_iova_unlink`,
//! `dma_iova_free`; since 6.15 drivers/infiniband/core/umem_odp.c allocates the map when a umem is created,
//! maps a page per `hmm_dma_map_pfn` on a fault and unmaps it per `hmm_dma_unmap_pfn` on an invalidation.
//!
//! The protocol, as numbered steps:
//! 1. [`HmmDmaMap::alloc`] (`hmm_dma_map_alloc` → `dma_iova_try_alloc`): a device behind a translating
//!    IOMMU domain reserves IOVA space for the whole range at once — below 4 GiB first, then anywhere, as
//!    `iommu_dma_alloc_iova` does for a PCI device. Without one (identity domain: `use_dma_iommu` is false)
//!    or when the reservation fails (the IOVA space is exhausted), the map falls back to the regular DMA
//!    API page by page; registration does not fail (Linux returns 0 from `hmm_dma_map_alloc` then).
//! 2. [`HmmDmaMap::map_pfn`] (`hmm_dma_map_pfn`), per page, by the page's P2P map type: BUS_ADDR → the bus
//!    address, nothing mapped; NOT_SUPPORTED → `EREMOTEIO`; otherwise, with the reservation, link the page
//!    at `base + idx * PAGE_SIZE` (`dma_iova_link`, one IO PTE write, read-write: HMM maps
//!    `DMA_BIDIRECTIONAL`; THRU_HOST_BRIDGE pages with the MMIO attribute) and `dma_iova_sync` that page;
//!    without it, `dma_map_phys` of the one page (a one-page IOVA allocation, [`Platform::map_sg`]'s
//!    path). A page still mapped is not linked again (the caller keeps its mapping: `hmm_dma_map_pfn`
//!    returns the old address for a `HMM_PFN_DMA_MAPPED` pfn).
//! 3. [`HmmDmaMap::unmap_pfns`] (`hmm_dma_unmap_pfn` per page, as `ib_umem_odp_unmap_dma_pages` loops):
//!    with the reservation, `dma_iova_unlink` of the one page, which clears its PTE and syncs the IOTLB
//!    for it at once in strict and lazy domains alike (the IOVA stays reserved); without it,
//!    `dma_unmap_phys` (the domain's strict or flush-queue unmap, the IOVA freed); bus addresses: nothing.
//! 4. [`HmmDmaMap::free`] (`hmm_dma_map_free` → `dma_iova_free`): gives the reservation back, freed at
//!    once (never through the flush queue); every page must have been unmapped first.
//!
//! Timing: a link costs one IO PTE write (`iommu.pte_update`), as a one-page map did; `dma_iova_sync` after
//! a link costs nothing (`iommu_sync_map` has nothing to invalidate: the model's IOTLB caches no
//! non-present entry), so the per-page sync of step 2 and a sync per batch cost the same; an unlink costs
//! one PTE clear and one range invalidation (`iommu.invalidate`), per page, because Linux syncs each
//! `dma_iova_unlink`. The reservation and its free cost nothing (the IOVA allocator has no cost in the
//! model). *Coarse:* `hmm_dma_map_alloc`'s `EOPNOTSUPP` for a device that needs SWIOTLB bouncing or DMA
//! syncs is not modelled (every device is coherent and addresses 64 bits).

use std::cell::Cell;
use std::rc::Rc;

use peerdma_core::{Errno, Iova, PAGE_SIZE, Pa, SimDuration};
use peerdma_iommu::{DomainType, IommuProt};
use peerdma_pci::MapType;

use crate::map::{DMA_BIT_MASK_32, DmaAddr, MapTarget, MappedPage, SegKind};
use crate::platform::{DmaDevice, Platform};

/// How one mapped page is undone (`hmm_dma_unmap_pfn`'s three cases).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Undo {
    /// Nothing to undo: a bus address (`HMM_PFN_P2PDMA_BUS`) or an identity domain's physical address.
    Nothing,
    /// Unlink it from the map's reservation (`dma_iova_unlink`).
    Unlink,
    /// Unmap its own one-page IOVA allocation (`dma_unmap_phys`; the fallback without a reservation).
    Unmap(Iova),
}

/// One page mapped by [`HmmDmaMap::map_pfn`]: its DMA address and how to undo it. Held inline by the
/// device's page table until [`HmmDmaMap::unmap_pfns`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaPfn {
    pub(crate) page: MappedPage,
    undo: Undo,
}

impl DmaPfn {
    /// Returns the DMA address the device is given for the page.
    pub fn addr(&self) -> DmaAddr {
        self.page.addr
    }

    /// Returns the physical address of the page.
    pub fn pa(&self) -> Pa {
        self.page.pa
    }

    /// Returns whether the page was linked into the map's IOVA reservation.
    pub fn is_linked(&self) -> bool {
        self.undo == Undo::Unlink
    }
}

/// A device's DMA map of one mirrored range (`struct hmm_dma_map`; module docs).
#[derive(Debug)]
pub struct HmmDmaMap {
    platform: Rc<Platform>,
    dev: Rc<DmaDevice>,
    /// Pages in the range (`nr_entries`).
    nr_pages: u64,
    /// `dma_iova_state.addr`: the reservation's first IOVA, `None` without one (fallback, or freed).
    base: Cell<Option<Iova>>,
}

impl HmmDmaMap {
    /// `hmm_dma_map_alloc` of `nr_pages` pages for `dev` (step 1): reserves IOVA space for all of them when
    /// the device's domain translates and the space has room, else maps page by page later.
    pub fn alloc(platform: &Rc<Platform>, dev: &Rc<DmaDevice>, nr_pages: u64) -> Self {
        let sim = &platform.kernel.sim;
        let base = {
            let mut domain = dev.domain_mut();
            let size = nr_pages.saturating_mul(PAGE_SIZE);
            (domain.domain_type() != DomainType::Identity && nr_pages > 0)
                .then(|| {
                    domain
                        .alloc_iova_limit(size, Iova::from_raw(DMA_BIT_MASK_32 + 1))
                        .or_else(|_| domain.alloc_iova(size))
                        .ok()
                })
                .flatten()
        };
        if base.is_some() {
            sim.count("dma.iova_reservations", 1);
        } else if dev.domain().domain_type() != DomainType::Identity {
            // dma_iova_try_alloc returned false: the regular DMA API, page by page.
            sim.count("dma.iova_reservation_fallbacks", 1);
        }
        Self {
            platform: platform.clone(),
            dev: dev.clone(),
            nr_pages,
            base: Cell::new(base),
        }
    }

    /// Returns the reservation's range (`dma_use_iova`), `None` when the map goes page by page.
    pub fn reservation(&self) -> Option<(Iova, u64)> {
        self.base.get().map(|b| (b, self.nr_pages * PAGE_SIZE))
    }

    /// Returns the number of pages the map covers.
    pub fn nr_pages(&self) -> u64 {
        self.nr_pages
    }

    /// `hmm_dma_map_pfn` of page `idx` of the range, at physical address `pa` (step 2). Returns the mapped
    /// page and the CPU time of the mapping. The caller counts the linked pages ([`HmmDmaMap::count_linked`]).
    ///
    /// # Errors
    /// `EREMOTEIO` for P2P memory the device cannot reach; `EINVAL` for an index outside the range;
    /// `EEXIST` when the page is linked already (the caller must not map a mapped page twice); `ENOMEM`
    /// when the fallback finds no IOVA space.
    pub fn map_pfn(&self, idx: u64, pa: Pa) -> Result<(DmaPfn, SimDuration), Errno> {
        if idx >= self.nr_pages {
            return Err(Errno::EINVAL);
        }
        let p = &self.platform;
        let d = &self.dev;
        let class = p.classify(d, pa);
        let Some(base) = self.base.get() else {
            let target = MapTarget {
                pa,
                class,
                mmio: false,
            };
            let sg = p.map_targets(d, &[target], true).map_err(|e| e.errno())?;
            let cost = sg.cost;
            let (page, iova) = sg.into_single().ok_or(Errno::EINVAL)?;
            let undo = iova.map_or(Undo::Nothing, |(a, _)| Undo::Unmap(a));
            return Ok((DmaPfn { page, undo }, cost));
        };
        let thru = match class {
            Some((MapType::NotSupported, _))
                if !peerdma_core::mutation::active(
                    peerdma_core::mutation::Mutation::RouteNotSupported,
                ) =>
            {
                p.kernel.sim.count("dma.map_sg_eremoteio", 1);
                return Err(Errno::EREMOTEIO);
            }
            Some((MapType::BusAddr, off)) => {
                let bus = pa
                    .raw()
                    .checked_add_signed(off)
                    .expect("validated topology: bus range fits 64 bits");
                let page = MappedPage {
                    addr: DmaAddr::Bus(peerdma_core::BusAddr::from_raw(bus)),
                    pa,
                    kind: SegKind::P2pBusAddr,
                };
                return Ok((
                    DmaPfn {
                        page,
                        undo: Undo::Nothing,
                    },
                    SimDuration::ZERO,
                ));
            }
            Some(_) => true,
            None => false,
        };
        let iova = base.add(idx * PAGE_SIZE);
        {
            let mut domain = d.domain_mut();
            domain.tick(p.kernel.sim.now());
            let prot = IommuProt {
                read: true,
                write: true,
                mmio: thru,
            };
            // dma_iova_link, then dma_iova_sync of the page (free: module docs).
            domain
                .map(iova, pa, PAGE_SIZE, prot)
                .map_err(|e| e.errno())?;
        }
        if let Some((frame, generation)) = p.kernel.frame_at_pa(pa) {
            d.space.record_issued(iova.raw(), frame, generation);
        }
        let page = MappedPage {
            addr: DmaAddr::Iova(iova),
            pa,
            kind: if thru {
                SegKind::P2pThruHostBridge
            } else {
                SegKind::Ram
            },
        };
        Ok((
            DmaPfn {
                page,
                undo: Undo::Unlink,
            },
            p.costs.iommu.map(1),
        ))
    }

    /// Adds `n` pages linked by [`HmmDmaMap::map_pfn`] to the `dma.iova_linked_pages` counter (the caller
    /// counts a fault's links once, not one counter update per page).
    pub fn count_linked(&self, n: u64) {
        if n > 0 {
            self.platform.kernel.sim.count("dma.iova_linked_pages", n);
        }
    }

    /// `hmm_dma_unmap_pfn` of each `(idx, page)` in order (step 3), through one borrow of the device's
    /// domain; returns the CPU time (per page: a PTE clear and an IOTLB sync for a linked page, the
    /// domain's unmap for a fallback one, nothing for a bus address).
    pub fn unmap_pfns(&self, pages: impl IntoIterator<Item = (u64, DmaPfn)>) -> SimDuration {
        let p = &self.platform;
        let now = p.kernel.sim.now();
        let costs = &p.costs.iommu;
        let mut domain = self.dev.domain_mut();
        let (mut cost, mut unlinked, mut unmapped) = (SimDuration::ZERO, 0, 0);
        for (idx, pfn) in pages {
            match pfn.undo {
                Undo::Nothing => {}
                Undo::Unlink => {
                    let base = self.base.get().expect("a linked page has a reservation");
                    let out = domain
                        .unlink(base.add(idx * PAGE_SIZE), PAGE_SIZE)
                        .expect("map_pfn linked this page");
                    cost += costs.unmap(&out);
                    unlinked += 1;
                }
                Undo::Unmap(iova) => {
                    let out = domain
                        .unmap(iova, PAGE_SIZE, now)
                        .expect("map_pfn mapped this IOVA");
                    cost += costs.unmap(&out);
                    unmapped += 1;
                }
            }
        }
        drop(domain);
        if unlinked > 0 {
            p.kernel.sim.count("dma.iova_unlinked_pages", unlinked);
        }
        if unmapped > 0 {
            p.kernel.sim.count("dma.unmap_sg", unmapped);
        }
        cost
    }

    /// `hmm_dma_map_free` (step 4): gives the reservation back. Every linked page must have been unmapped.
    ///
    /// # Errors
    /// `EBUSY` while a page is still linked (the reservation stays).
    pub fn free(&self) -> Result<(), Errno> {
        let Some(base) = self.base.get() else {
            return Ok(());
        };
        self.dev
            .domain_mut()
            .free_iova(base)
            .map_err(|e| e.errno())?;
        self.base.set(None);
        self.platform
            .kernel
            .sim
            .count("dma.iova_reservation_frees", 1);
        Ok(())
    }
}
