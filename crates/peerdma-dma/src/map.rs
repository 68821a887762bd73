//! The DMA API: `map_sg` / `unmap_sg` with per-segment P2P classification, and a device's access through a
//! DMA address (`spec/linux-p2p.md` §1.6; DESIGN.md §4.2–§4.3).
//!
//! Linux counterparts: kernel/dma/mapping.c `dma_map_sgtable`, kernel/dma/direct.c `dma_direct_map_sg`,
//! drivers/iommu/dma-iommu.c `iommu_dma_map_sg` / `__iommu_dma_unmap`, drivers/pci/p2pdma.c
//! `pci_p2pdma_state` / `pci_p2pdma_map_type`.
//!
//! `map_sg`, as numbered steps (v6.x; a mixed list of RAM and several providers is allowed):
//! 1. Classify every page: not P2P memory → NONE; P2P memory → the provider's map type for this device
//!    (cached per pair; a run of pages of one provider reuses it, as `pci_p2pdma_state` does).
//! 2. Any NOT_SUPPORTED page fails the whole call with `EREMOTEIO` and nothing stays mapped.
//! 3. BUS_ADDR pages get `phys + bus_offset` and are marked as bus addresses: no IOVA, skipped at unmap.
//! 4. NONE and THRU_HOST_BRIDGE pages: with an identity domain the DMA address is the physical address; with
//!    a DMA domain one IOVA range is allocated for all of them (below 4 GiB first, as `iommu_dma_alloc_iova`
//!    does for PCI devices) and each page is mapped into it, the THRU_HOST_BRIDGE ones with the MMIO
//!    attribute (`DMA_ATTR_MMIO`, v6.18).
//!
//! `unmap_sg` releases the IOVA range through the domain (strict: now; lazy: the flush queue) and skips bus
//! addresses. *Coarse:* the flush queue's 10 ms timer is run lazily, when the domain is next used (a map, an
//! unmap or a device access), which no observer can tell from a timer that fired on time. A device access resolves a DMA address back to a physical one: through the IOTLB / IO page
//! table for an IOVA, through the provider's BAR for a bus address — and the routing check of the oracle
//! (DESIGN.md §7 check 5) tells a bus-address access that its map type does not allow.

use std::rc::Rc;

use peerdma_core::{BusAddr, DeviceId, Errno, Iova, PAGE_SIZE, Pa, SimDuration};
use peerdma_iommu::{DomainType, IommuProt, Translation};
use peerdma_mm::DeviceGrant;
use peerdma_mm::oracle::ViolationKind;
use peerdma_pci::{MapType, NodeId, p2p_distance};

use crate::error::DmaError;
use crate::platform::{DmaDevice, Platform};
use crate::space::{DeviceAddr, DmaOp, DmaRequest};

/// `DMA_BIT_MASK(32)`: the top of the 32-bit DMA space a PCI device's IOVAs come from first.
pub(crate) const DMA_BIT_MASK_32: u64 = (1 << 32) - 1;

/// A DMA address as the device is told it (`dma_addr_t`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum DmaAddr {
    /// An address the IOMMU translates (or, with an identity domain, the physical address itself).
    Iova(Iova),
    /// A PCI bus address that stays in the fabric (`SG_DMA_BUS_ADDRESS`).
    Bus(BusAddr),
}

impl DmaAddr {
    /// Returns the raw `dma_addr_t`.
    pub fn raw(self) -> u64 {
        match self {
            Self::Iova(a) => a.raw(),
            Self::Bus(b) => b.raw(),
        }
    }

    fn add(self, off: u64) -> Self {
        match self {
            Self::Iova(a) => Self::Iova(a.add(off)),
            Self::Bus(b) => Self::Bus(b.add(off)),
        }
    }
}

/// What kind of memory a segment reaches, and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SegKind {
    /// System or device memory that is not P2P memory (map type NONE).
    Ram,
    /// Peer memory reached by bus address inside the fabric (BUS_ADDR).
    P2pBusAddr,
    /// Peer memory reached through the host bridge (THRU_HOST_BRIDGE), mapped like RAM with the MMIO
    /// attribute.
    P2pThruHostBridge,
}

impl SegKind {
    /// Returns the name reports print (`ram`, `bus`, `host-bridge`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Ram => "ram",
            Self::P2pBusAddr => "bus",
            Self::P2pThruHostBridge => "host-bridge",
        }
    }
}

/// One merged run of a mapped list: contiguous DMA addresses of one kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaSegment {
    /// The first DMA address.
    pub addr: DmaAddr,
    /// Bytes.
    pub len: u64,
    /// What it reaches.
    pub kind: SegKind,
}

/// One mapped page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MappedPage {
    pub(crate) addr: DmaAddr,
    pub(crate) pa: Pa,
    pub(crate) kind: SegKind,
}

/// The result of `map_sg`: the device's DMA addresses, page by page, and what to release at unmap.
#[derive(Debug, Default)]
pub struct MappedSg {
    pub(crate) pages: Vec<MappedPage>,
    /// The IOVA range allocated for the non-bus pages, if the domain translates.
    iova: Option<(Iova, u64)>,
    /// The CPU time the mapping took (IO PTE updates), for callers that can spend it.
    pub(crate) cost: SimDuration,
}

impl MappedSg {
    /// Returns the merged segments (adjacent pages of one kind with contiguous DMA addresses).
    pub fn segments(&self) -> Vec<DmaSegment> {
        let mut out: Vec<DmaSegment> = Vec::new();
        for p in &self.pages {
            if let Some(last) = out.last_mut()
                && last.kind == p.kind
                && last.addr.add(last.len) == p.addr
            {
                last.len += PAGE_SIZE;
                continue;
            }
            out.push(DmaSegment {
                addr: p.addr,
                len: PAGE_SIZE,
                kind: p.kind,
            });
        }
        out
    }

    /// Returns the number of pages mapped.
    pub fn nr_pages(&self) -> usize {
        self.pages.len()
    }

    /// Returns the CPU time the mapping took (IO PTE updates), for a caller outside this crate to spend.
    pub fn cost(&self) -> SimDuration {
        self.cost
    }

    /// Returns the DMA address of page `i`.
    pub fn page_addr(&self, i: usize) -> Option<DmaAddr> {
        self.pages.get(i).map(|p| p.addr)
    }

    /// Splits a list of one page into that page and its IOVA range (what its unmap releases), so that a
    /// per-page table holds no list; `None` unless it holds exactly one page.
    pub(crate) fn into_single(mut self) -> Option<(MappedPage, Option<(Iova, u64)>)> {
        if self.pages.len() != 1 {
            return None;
        }
        Some((self.pages.pop()?, self.iova.take()))
    }
}

/// One page to map: its physical address, its P2P class (`None`: not P2P memory; else the map type and the
/// BAR's bus offset) and whether it is BAR memory without struct page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MapTarget {
    pub(crate) pa: Pa,
    pub(crate) class: Option<(MapType, i64)>,
    pub(crate) mmio: bool,
}

/// Where a device access through a DMA address landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Resolved {
    pub(crate) pa: Pa,
    pub(crate) cost: SimDuration,
}

impl Platform {
    /// Returns how `dev` must address the page at `pa` (step 1): `None` for memory that is not P2P memory.
    pub(crate) fn classify(&self, dev: &DmaDevice, pa: Pa) -> Option<(MapType, i64)> {
        let res = *self.providers.borrow().resource_at(pa)?;
        let mt = self
            .providers
            .borrow_mut()
            .map_type(self.topology(), res.provider, dev.node);
        Some((mt, res.bus_offset))
    }

    /// `dma_map_sg` of the pages at `pas` for `dev` (module docs, steps 1–4).
    ///
    /// # Errors
    /// `EREMOTEIO` when a page is P2P memory `dev` cannot reach; `ENOMEM` when the IOVA space is exhausted;
    /// `ENODEV` for an unknown device.
    pub fn map_sg(&self, dev: DeviceId, pas: &[Pa], write: bool) -> Result<MappedSg, DmaError> {
        let d = self.device(dev)?;
        let targets: Vec<MapTarget> = pas
            .iter()
            .map(|&pa| MapTarget {
                pa,
                class: self.classify(&d, pa),
                mmio: false,
            })
            .collect();
        self.map_targets(&d, &targets, write)
    }

    /// Maps pages whose classification is known; `mmio` marks pages of a BAR without struct page (mapped
    /// like THRU_HOST_BRIDGE memory when not bus-addressed).
    pub(crate) fn map_targets(
        &self,
        d: &Rc<DmaDevice>,
        targets: &[MapTarget],
        write: bool,
    ) -> Result<MappedSg, DmaError> {
        // Step 2.
        if !peerdma_core::mutation::active(peerdma_core::mutation::Mutation::RouteNotSupported)
            && targets
                .iter()
                .any(|t| matches!(t.class, Some((MapType::NotSupported, _))))
        {
            self.kernel.sim.count("dma.map_sg_eremoteio", 1);
            return Err(Errno::EREMOTEIO.into());
        }
        let mut domain = d.domain_mut();
        domain.tick(self.kernel.sim.now());
        let translates = domain.domain_type() != DomainType::Identity;
        let nr_iova = targets
            .iter()
            .filter(|t| !matches!(t.class, Some((MapType::BusAddr, _))))
            .count() as u64;
        // iommu_dma_alloc_iova: a PCI device first tries below 4 GiB (a SAC address), then the whole space.
        let iova = if translates && nr_iova > 0 {
            let size = nr_iova * PAGE_SIZE;
            Some(
                domain
                    .alloc_iova_limit(size, Iova::from_raw(DMA_BIT_MASK_32 + 1))
                    .or_else(|_| domain.alloc_iova(size))
                    .map_err(|e| e.errno())?,
            )
        } else {
            None
        };
        let mut pages = Vec::with_capacity(targets.len());
        let mut next = 0u64;
        for &MapTarget { pa, class, mmio } in targets {
            if let Some((MapType::BusAddr, off)) = class {
                // Step 3.
                pages.push(MappedPage {
                    addr: DmaAddr::Bus(BusAddr::from_raw(
                        pa.raw()
                            .checked_add_signed(off)
                            .expect("validated topology: bus range fits 64 bits"),
                    )),
                    pa,
                    kind: SegKind::P2pBusAddr,
                });
                continue;
            }
            // Step 4.
            let thru = class.is_some() || mmio;
            let kind = if thru {
                SegKind::P2pThruHostBridge
            } else {
                SegKind::Ram
            };
            let addr = match iova {
                Some(base) => {
                    let a = base.add(next * PAGE_SIZE);
                    next += 1;
                    let prot = IommuProt {
                        read: true,
                        write,
                        mmio: thru,
                    };
                    domain
                        .map(a, pa, PAGE_SIZE, prot)
                        .expect("a freshly allocated IOVA range is unmapped");
                    a
                }
                None => Iova::from_raw(pa.raw()),
            };
            pages.push(MappedPage {
                addr: DmaAddr::Iova(addr),
                pa,
                kind,
            });
        }
        for p in &pages {
            if let Some((frame, generation)) = self.kernel.frame_at_pa(p.pa) {
                d.space.record_issued(p.addr.raw(), frame, generation);
            }
        }
        self.kernel.sim.count("dma.map_sg", 1);
        self.kernel
            .sim
            .count("dma.mapped_pages", targets.len() as u64);
        let cost = if iova.is_some() {
            self.costs.iommu.map(nr_iova)
        } else {
            SimDuration::ZERO
        };
        Ok(MappedSg {
            pages,
            iova: iova.map(|a| (a, nr_iova * PAGE_SIZE)),
            cost,
        })
    }

    /// `dma_unmap_sg`: releases the IOVA range (bus addresses are skipped: they were never mapped). Returns
    /// the CPU time the unmap takes (IO PTE updates, and the IOTLB invalidation of a strict domain or the
    /// full flush a lazy domain's flush queue ran), for callers that can spend it.
    ///
    /// # Errors
    /// `ENODEV` for an unknown device.
    pub fn unmap_sg(&self, dev: DeviceId, sg: &mut MappedSg) -> Result<SimDuration, DmaError> {
        let d = self.device(dev)?;
        let mut cost = SimDuration::ZERO;
        if let Some((iova, len)) = sg.iova.take() {
            let now = self.kernel.sim.now();
            let mut domain = d.domain_mut();
            let outcome = domain
                .unmap(iova, len, now)
                .expect("map_sg mapped this IOVA range");
            cost = self.costs.iommu.unmap(&outcome);
        }
        sg.pages.clear();
        self.kernel.sim.count("dma.unmap_sg", 1);
        Ok(cost)
    }

    /// Resolves a device access at `addr` to a physical address, with its translation cost; `None` when the
    /// IOMMU faults or the bus address hits no live P2P memory. A bus-address access whose map type is not
    /// BUS_ADDR is a routing violation (oracle check 5), and so is a deferred-flush IOTLB hit whose entry
    /// the IO page table no longer has (the device used a DMA address after it was unmapped).
    pub(crate) fn resolve(&self, d: &DmaDevice, addr: DmaAddr, write: bool) -> Option<Resolved> {
        match addr {
            DmaAddr::Iova(iova) => {
                let t = {
                    let mut domain = d.domain_mut();
                    domain.tick(self.kernel.sim.now());
                    domain.translate(iova, write)
                };
                let c = &self.costs.iommu;
                match t {
                    Translation::Hit { pa, stale } => {
                        if stale {
                            self.violation(
                                ViolationKind::StaleTranslation,
                                format!(
                                    "{} used IOVA {:#x} after it was unmapped (stale IOTLB entry)",
                                    d.name,
                                    iova.raw()
                                ),
                            );
                        }
                        self.check_iova_route(d, iova, pa);
                        Some(Resolved {
                            pa,
                            cost: c.iotlb_hit,
                        })
                    }
                    Translation::Miss { pa, levels } => {
                        self.check_iova_route(d, iova, pa);
                        Some(Resolved {
                            pa,
                            cost: c.iotlb_miss + c.walk_per_level.saturating_mul(u64::from(levels)),
                        })
                    }
                    Translation::Fault(_) => {
                        self.kernel.sim.count("iommu.faults", 1);
                        None
                    }
                }
            }
            DmaAddr::Bus(bus) => {
                let (res, pa) = self
                    .topology()
                    .bar_at_bus(d.node, bus)
                    .map(|(id, _, pa)| (id, pa))?;
                let has_provider_state = self.providers.borrow().resource_at(pa).is_some();
                let mt = if has_provider_state {
                    self.providers
                        .borrow_mut()
                        .map_type(self.topology(), res, d.node)
                } else if self.export_live_at(pa) {
                    // BAR memory without struct page has no P2P provider state: its exporter decided the map
                    // type with the "naked p2pdma_provider" (spec/linux-p2p.md §1.8 (a); dmabuf.rs rule 1), so
                    // the routing check must use the same decision, not `pci_p2pdma_map_type`, which answers
                    // NOT_SUPPORTED for a device without provider state.
                    self.providers
                        .borrow_mut()
                        .provider_map_type(self.topology(), res, d.node)
                } else {
                    // Neither live P2P memory nor a live export: nothing may carry data there (oracle check 5).
                    MapType::NotSupported
                };
                if mt != MapType::BusAddr {
                    self.violation(
                        ViolationKind::Routing,
                        format!(
                            "{} sent a bus-address access to {:#x} whose map type is {mt:?}",
                            d.name,
                            bus.raw()
                        ),
                    );
                    return None;
                }
                Some(Resolved {
                    pa,
                    cost: SimDuration::ZERO,
                })
            }
        }
    }

    /// Returns the nodes whose upstream links a transfer between `client` and the memory of `provider`
    /// (`None`: system RAM) crosses: the provider–client path of the map-type decision, less the common
    /// switch's own uplink for a BUS_ADDR transfer (it turns around there), or the client's path to its host
    /// bridge for RAM. The topology never changes, so each pair is computed once.
    pub(crate) fn path_links(&self, provider: Option<NodeId>, client: NodeId) -> Rc<[NodeId]> {
        if let Some(l) = self.links.borrow().get(&(provider, client)) {
            return l.clone();
        }
        let topo = self.topology();
        let (path, turnaround) = match provider {
            Some(p) => {
                let dec = p2p_distance(topo, p, client);
                let turn = (dec.map_type == MapType::BusAddr)
                    .then_some(dec.common_upstream)
                    .flatten();
                (dec.path, turn)
            }
            None => (topo.upstream_chain(client), None),
        };
        let links: Rc<[NodeId]> = path
            .into_iter()
            .filter(|&n| Some(n) != turnaround && topo.node(n).link().is_some())
            .collect();
        self.links
            .borrow_mut()
            .insert((provider, client), links.clone());
        links
    }

    /// Oracle check 5 for an IOVA access that lands in P2P memory: the provider–client pair's map type must
    /// allow a transfer, so NOT_SUPPORTED never carries data whatever address the device was given
    /// (`map_sg` refuses such a pair; this catches a mapping that got through anyway).
    fn check_iova_route(&self, d: &DmaDevice, iova: Iova, pa: Pa) {
        let Some((res, _)) = self.topology().bar_at(pa) else {
            return;
        };
        if self.providers.borrow().resource_at(pa).is_none() {
            return;
        }
        let mt = self
            .providers
            .borrow_mut()
            .map_type(self.topology(), res, d.node);
        if mt == MapType::NotSupported {
            self.violation(
                ViolationKind::Routing,
                format!(
                    "{} reached P2P memory at {:#x} through IOVA {:#x}, but the pair's map type is \
                     NOT_SUPPORTED",
                    d.name,
                    pa.raw(),
                    iova.raw()
                ),
            );
        }
    }

    pub(crate) fn violation(&self, kind: ViolationKind, detail: String) {
        self.kernel.report_violation(kind, detail);
    }
}

impl Platform {
    /// A device DMA of whole pages at a raw DMA address — no handle, no pin, no mirror — as a device holding
    /// a stale or forged address issues it. `data` is written when given, else `buf` is read.
    ///
    /// The fabric routes it: an address in a peer BAR's bus range that `dev` reaches BUS_ADDR goes
    /// peer-to-peer; anything else goes upstream through `dev`'s IOMMU domain, the only protection. So the
    /// oracle sees what a real machine would suffer: a stale IOTLB hit inside a lazy domain's flush window
    /// (stale translation), a write to a freed frame (use after free), content changed behind a mapping's
    /// back (data integrity, at the next read), a write to a removed BAR.
    ///
    /// # Errors
    /// `EFAULT` when the IOMMU faults (a strict domain after unmap) or nothing answers the address;
    /// `EINVAL` for an unaligned address or length; `ENODEV` for an unknown device or a removed BAR.
    pub async fn raw_dma(
        &self,
        dev: DeviceId,
        addr: u64,
        data: Option<&[u8]>,
        buf: &mut [u8],
    ) -> Result<(), DmaError> {
        let d = self.device(dev)?;
        let len = data.map_or(buf.len(), <[u8]>::len);
        if !addr.is_multiple_of(PAGE_SIZE) || len == 0 || !len.is_multiple_of(4096) {
            return Err(Errno::EINVAL.into());
        }
        self.kernel.sim.count("dma.raw", 1);
        let write = data.is_some();
        let reqs: Vec<DmaRequest> = (0..len / 4096)
            .map(|i| {
                let a = addr + i as u64 * PAGE_SIZE;
                let bus = BusAddr::from_raw(a);
                let routed_peer =
                    self.topology()
                        .bar_at_bus(d.node, bus)
                        .is_some_and(|(owner, _, _)| {
                            self.providers.borrow_mut().provider_map_type(
                                self.topology(),
                                owner,
                                d.node,
                            ) == MapType::BusAddr
                        });
                let dma = if routed_peer {
                    DmaAddr::Bus(bus)
                } else {
                    DmaAddr::Iova(Iova::from_raw(a))
                };
                DmaRequest {
                    addr: DeviceAddr::Dma(dma),
                    grant: DeviceGrant::Raw,
                    op: match data {
                        Some(bytes) => DmaOp::Write(bytes[i * 4096..(i + 1) * 4096].to_vec()),
                        None => DmaOp::Read,
                    },
                }
            })
            .collect();
        let out = self.dma(&d, reqs).await;
        if !write {
            buf.copy_from_slice(&out.data);
        }
        out.into_result()?;
        Ok(())
    }
}
