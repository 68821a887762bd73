//! The platform a DMA happens on: the PCIe topology, the P2P providers, every DMA-capable device with its
//! IOMMU domain, and the BAR exports of devices whose memory has no `struct page`.
//!
//! Linux counterparts: the `pci_dev` / `iommu_group` / `dev_pagemap` state spread over drivers/pci/p2pdma.c
//! (`pci_p2pdma_add_resource`, the p2pmem `allocate` file, unbind), drivers/iommu/iommu.c (one default domain
//! per device) and drivers/vfio/pci (a BAR exported as a dma-buf).
//!
//! Set-up and teardown of P2P memory, as numbered steps:
//! 1. [`Platform::p2p_add_resource`]: the P2P subsystem records the BAR range (`peerdma_pci::P2pProviders`)
//!    and the memory model creates its struct pages (`Kernel::add_p2p_memory`).
//! 2. [`Platform::p2p_publish`]: other drivers may find it ([`Platform::p2p_find_many`]).
//! 3. [`Platform::p2pmem_mmap`]: a process maps it through the provider's `allocate` file.
//! 4. [`Platform::remove_device`] (unbind): every dma-buf importer of the device's BARs is revoked and
//!    unmapped, user mappings of its PFNMAP BARs and P2P pages are zapped, and the call waits until every
//!    page reference (pins) is gone; only then is the provider state freed.

use std::cell::{Ref, RefCell, RefMut};
use std::collections::BTreeMap;
use std::fmt;
use std::rc::Rc;

use peerdma_core::timing::{ParamSpec, Timing};
use peerdma_core::{DeviceId, Errno, Pa, Pid, Range, SimDuration, Va};
use peerdma_iommu::{DomainConfig, IommuCosts, IommuDomain};
use peerdma_mm::kernel::Kernel;
use peerdma_mm::vma::Prot;
use peerdma_pci::link::{DEFAULT_HOP_LATENCY, REMOTE_SOCKET_LATENCY};
use peerdma_pci::{NodeId, P2pProviders, P2pResource, Topology};
use peerdma_sim::RngStream;

use crate::dmabuf::Exports;
use crate::error::DmaError;
use crate::space::{DmaSpace, LinkFlows};

/// The default outstanding-request limit of a device ([`DmaCosts::max_outstanding`]).
pub const DEFAULT_MAX_OUTSTANDING: u32 = 256;

const HOP: ParamSpec = ParamSpec::time(
    "dma.hop",
    DEFAULT_HOP_LATENCY.as_nanos(),
    "vendor figure [B]: Gen5 switch port to port ≈ 115 ns (peerdma_pci::link::DEFAULT_HOP_LATENCY)",
    "latency of crossing one PCIe switch or root port",
);
const REMOTE_SOCKET: ParamSpec = ParamSpec::time(
    "dma.remote_socket",
    REMOTE_SOCKET_LATENCY.as_nanos(),
    "docs/figures.md §2: a DMA read of a buffer on the other socket takes about 107 ns longer (Neugebauer \
     et al., SIGCOMM 2018)",
    "extra latency of a DMA request to RAM on another NUMA node than the device's (the socket interconnect)",
);
const MAX_OUTSTANDING: ParamSpec = ParamSpec::count(
    "dma.max_outstanding",
    DEFAULT_MAX_OUTSTANDING as u64,
    "PCIe base spec §2.2.6.2 (8-bit Tag with Extended Tag: 256 outstanding non-posted requests); \
     spec/numbers.md §2 (a bounded number of outstanding reads)",
    "requests one device may have in flight (the access path pipelines up to this many)",
);

/// Timing-model parameters of the DMA layer.
#[derive(Clone, Debug, PartialEq)]
pub struct DmaCosts {
    /// IOMMU costs (IOTLB hit/miss, walks, invalidations; `iommu.*`).
    pub iommu: IommuCosts,
    /// Latency of crossing one switch or root port (`dma.hop`; spec/numbers.md §1; `peerdma_pci::link`).
    pub hop: SimDuration,
    /// Whether transfers take link time at all (`false` in zero-time mode).
    pub timed: bool,
    /// The most requests a device keeps in flight (`dma.max_outstanding`, a count: 256, the 8-bit Tag field
    /// with Extended Tag enabled, PCIe base spec §2.2.6.2; spec/numbers.md §2: throughput under misses
    /// follows from latency × outstanding requests). Used by the access path ([`crate::space`]).
    pub max_outstanding: u32,
    /// Extra latency of a request to RAM on a NUMA node other than the device's (`dma.remote_socket`).
    pub remote_socket: SimDuration,
}

impl DmaCosts {
    /// The parameters of the DMA layer itself, in field order (the IOMMU's are [`IommuCosts::PARAMS`]).
    pub const PARAMS: &[ParamSpec] = &[HOP, MAX_OUTSTANDING, REMOTE_SOCKET];

    /// Returns the costs `timing` gives, the IOMMU's included. Zero mode also turns link time off.
    pub fn from_timing(timing: &Timing) -> Self {
        Self {
            iommu: IommuCosts::from_timing(timing),
            hop: timing.time(&HOP),
            timed: !timing.is_zero(),
            max_outstanding: u32::try_from(timing.count(&MAX_OUTSTANDING)).unwrap_or(u32::MAX),
            remote_socket: timing.time(&REMOTE_SOCKET),
        }
    }

    /// The calibrated defaults.
    pub fn calibrated() -> Self {
        Self::from_timing(&Timing::calibrated())
    }

    /// Every cost zero.
    pub fn zero() -> Self {
        Self::from_timing(&Timing::zero())
    }
}

/// A DMA-capable device: its id in the memory model, its PCI function, and its IOMMU domain.
pub struct DmaDevice {
    /// The device id the memory model and the oracle know it by.
    pub id: DeviceId,
    /// Its node in the topology.
    pub node: NodeId,
    /// Its name.
    pub name: String,
    /// Its NUMA node (`dev_to_node`): the socket its host bridge sits on, as the index of that socket
    /// among the topology's sockets (socket k holds NUMA node k); `None` without a socket.
    pub numa_node: Option<u32>,
    pub(crate) domain: RefCell<IommuDomain>,
    /// Its access path and requests in flight.
    pub space: DmaSpace,
}

impl fmt::Debug for DmaDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaDevice")
            .field("id", &self.id)
            .field("node", &self.node)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl DmaDevice {
    /// Returns the device's IOMMU domain (statistics, lookups).
    pub fn domain(&self) -> Ref<'_, IommuDomain> {
        self.domain.borrow()
    }

    pub(crate) fn domain_mut(&self) -> RefMut<'_, IommuDomain> {
        self.domain.borrow_mut()
    }
}

/// The links a transfer crosses, by (provider or `None` for system RAM, client).
pub(crate) type PathLinks = BTreeMap<(Option<NodeId>, NodeId), Rc<[NodeId]>>;

/// The machine the DMA layer runs on (module docs).
pub struct Platform {
    /// The memory model.
    pub kernel: Rc<Kernel>,
    topo: Topology,
    pub(crate) providers: RefCell<P2pProviders>,
    devices: RefCell<BTreeMap<DeviceId, Rc<DmaDevice>>>,
    /// P2P resources with their memory-model regions, per provider node.
    p2p_regions: RefCell<BTreeMap<NodeId, Vec<(P2pResource, usize)>>>,
    pub(crate) exports: RefCell<Exports>,
    pub(crate) costs: DmaCosts,
    rng: RefCell<RngStream>,
    /// Devices with requests in flight per link, for bandwidth sharing ([`crate::space`]).
    flows: LinkFlows,
    /// The links a transfer crosses, per (provider or RAM, client) pair (`Platform::path_links`).
    pub(crate) links: RefCell<PathLinks>,
}

impl fmt::Debug for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Platform")
            .field("devices", &self.devices.borrow().len())
            .finish_non_exhaustive()
    }
}

impl Platform {
    /// Creates the platform over `topo`.
    pub fn new(kernel: Rc<Kernel>, topo: Topology, costs: DmaCosts) -> Rc<Self> {
        let rng = kernel.sim.rng("p2pdma.find");
        Rc::new(Self {
            kernel,
            topo,
            providers: RefCell::new(P2pProviders::new()),
            devices: RefCell::new(BTreeMap::new()),
            p2p_regions: RefCell::new(BTreeMap::new()),
            exports: RefCell::new(Exports::default()),
            costs,
            rng: RefCell::new(rng),
            flows: LinkFlows::default(),
            links: RefCell::new(BTreeMap::new()),
        })
    }

    /// Returns the topology.
    pub fn topology(&self) -> &Topology {
        &self.topo
    }

    /// Attaches device `id` at PCI function `node` with an IOMMU domain built from `domain`.
    ///
    /// # Errors
    /// `EINVAL` when `node` is not a PCI function of the topology, `EEXIST` when `id` or `node` is taken.
    pub fn add_device(
        &self,
        id: DeviceId,
        node: NodeId,
        name: &str,
        domain: DomainConfig,
    ) -> Result<Rc<DmaDevice>, DmaError> {
        if self.topo.get(node).is_none_or(|n| !n.is_pci_function()) {
            return Err(DmaError::NotPciFunction(node));
        }
        let mut devs = self.devices.borrow_mut();
        if devs.contains_key(&id) || devs.values().any(|d| d.node == node) {
            return Err(DmaError::AlreadyAttached { id, node });
        }
        let numa_node = self
            .topo
            .host_bridge_of(node)
            .and_then(|hb| self.topo.socket_of(hb))
            .and_then(|socket| {
                self.topo
                    .nodes()
                    .filter(|(_, n)| n.kind() == peerdma_pci::NodeKind::Socket)
                    .position(|(s, _)| s == socket)
            })
            .and_then(|i| u32::try_from(i).ok());
        let d = Rc::new(DmaDevice {
            id,
            node,
            name: name.to_owned(),
            numa_node,
            domain: RefCell::new(IommuDomain::new(domain)),
            space: DmaSpace::with_flows(
                &self.kernel,
                id,
                name,
                self.costs.max_outstanding,
                self.flows.clone(),
            ),
        });
        devs.insert(id, d.clone());
        Ok(d)
    }

    /// Returns device `id`.
    ///
    /// # Errors
    /// `ENODEV` for an unknown device.
    pub fn device(&self, id: DeviceId) -> Result<Rc<DmaDevice>, DmaError> {
        self.devices
            .borrow()
            .get(&id)
            .cloned()
            .ok_or(DmaError::UnknownDevice(id))
    }

    /// Returns the device at PCI function `node`.
    pub fn device_at(&self, node: NodeId) -> Option<Rc<DmaDevice>> {
        self.devices
            .borrow()
            .values()
            .find(|d| d.node == node)
            .cloned()
    }

    /// Adds `size` bytes at `offset` of BAR `bar` of `dev` as P2P memory with struct pages (step 1).
    ///
    /// # Errors
    /// The `pci_p2pdma_add_resource` errnos (`EINVAL`), `ENODEV` for an unknown device.
    pub fn p2p_add_resource(
        &self,
        dev: DeviceId,
        bar: u8,
        size: u64,
        offset: u64,
    ) -> Result<P2pResource, DmaError> {
        let d = self.device(dev)?;
        let res = self
            .providers
            .borrow_mut()
            .add_resource(&self.topo, d.node, bar, size, offset)?;
        let region = self
            .kernel
            .add_p2p_memory(dev, res.phys.start, res.phys.len());
        self.p2p_regions
            .borrow_mut()
            .entry(d.node)
            .or_default()
            .push((res, region));
        Ok(res)
    }

    /// Registers `size` bytes at `offset` of BAR `bar` of `dev` as a P2P provider range *without* P2P struct
    /// pages: the caller places its own memory there (device-private VRAM a BAR window shows, for the
    /// beyond-mainline HMM P2P option); mapping a page of it classifies by the same P2P rules (bus address,
    /// host bridge, refused).
    ///
    /// # Errors
    /// As [`Platform::p2p_add_resource`].
    pub fn p2p_add_window(
        &self,
        dev: DeviceId,
        bar: u8,
        size: u64,
        offset: u64,
    ) -> Result<P2pResource, DmaError> {
        let d = self.device(dev)?;
        Ok(self
            .providers
            .borrow_mut()
            .add_resource(&self.topo, d.node, bar, size, offset)?)
    }

    /// Publishes `dev`'s P2P memory (step 2).
    ///
    /// # Errors
    /// `ENODEV` for an unknown device.
    pub fn p2p_publish(&self, dev: DeviceId, publish: bool) -> Result<(), DmaError> {
        let d = self.device(dev)?;
        self.providers.borrow_mut().publish(d.node, publish);
        Ok(())
    }

    /// Returns the published provider nearest to every client, ties broken by the seeded `p2pdma.find`
    /// stream (`pci_p2pmem_find_many`).
    ///
    /// # Errors
    /// `ENODEV` for an unknown client.
    pub fn p2p_find_many(&self, clients: &[DeviceId]) -> Result<Option<DeviceId>, DmaError> {
        let nodes = clients
            .iter()
            .map(|&c| self.device(c).map(|d| d.node))
            .collect::<Result<Vec<_>, _>>()?;
        let mut rng = self.rng.borrow_mut();
        let found = self
            .providers
            .borrow_mut()
            .find_many(&self.topo, &nodes, |n| {
                usize::try_from(rng.below(n as u64)).expect("below n fits usize")
            });
        Ok(found.and_then(|n| self.device_at(n)).map(|d| d.id))
    }

    /// Maps `len` bytes of `provider`'s P2P memory into `pid` through its p2pmem `allocate` file (step 3;
    /// `spec/linux-p2p.md` §1.7). Each resource is tried in the order it was added (one gen_pool with
    /// several chunks).
    ///
    /// # Errors
    /// `ENODEV` when the device has no P2P memory (or it was removed), the §1.7 errnos otherwise (`EINVAL`
    /// for a private mapping or a non-zero offset, `ENOMEM` when no chunk has `len` contiguous bytes).
    pub async fn p2pmem_mmap(
        &self,
        pid: Pid,
        provider: DeviceId,
        len: u64,
        prot: Prot,
        shared: bool,
        pgoff: u64,
    ) -> Result<Va, DmaError> {
        self.device(provider)?;
        let regions = self.p2p_regions(provider);
        if regions.is_empty() {
            return Err(Errno::ENODEV.into());
        }
        let mut last = Errno::ENOMEM;
        for r in regions {
            match self
                .kernel
                .mmap_p2pmem(pid, r, len, prot, shared, pgoff)
                .await
            {
                Err(Errno::ENOMEM) => last = Errno::ENOMEM,
                other => return Ok(other?),
            }
        }
        Err(last.into())
    }

    /// `pci_alloc_p2pmem`: `len` contiguous bytes of `provider`'s P2P memory for a driver's own use (chunks
    /// tried in the order they were added). Returns the CPU physical range; its bus address is
    /// [`Platform::p2pmem_virt_to_bus`]. The allocation blocks the provider's removal until freed.
    ///
    /// # Errors
    /// `ENODEV` for a device without (live) P2P memory; `ENOMEM` when no chunk has `len` contiguous bytes.
    pub fn p2pmem_alloc(&self, provider: DeviceId, len: u64) -> Result<Range<Pa>, DmaError> {
        let regions = self.p2p_regions(provider);
        if regions.is_empty() {
            return Err(Errno::ENODEV.into());
        }
        for r in regions {
            if let Some(first) = self.kernel.alloc_p2pmem(r, len) {
                let pa = self.kernel.frame_pa(first);
                let len = len.div_ceil(peerdma_core::PAGE_SIZE) * peerdma_core::PAGE_SIZE;
                return Range::from_len(pa, len).ok_or(DmaError::Errno(Errno::EINVAL));
            }
        }
        Err(Errno::ENOMEM.into())
    }

    /// `pci_free_p2pmem` of an allocation made by [`Platform::p2pmem_alloc`].
    pub fn p2pmem_free(&self, alloc: Range<Pa>) {
        if let Some((f, _)) = self.kernel.frame_at_pa(alloc.start) {
            self.kernel.free_p2pmem(f, alloc.len());
        }
    }

    /// `pci_p2pmem_virt_to_bus`: the bus address of P2P memory at `pa`, `None` (the kernel's 0) when no live
    /// provider covers it.
    pub fn p2pmem_virt_to_bus(&self, pa: Pa) -> Option<peerdma_core::BusAddr> {
        self.providers.borrow().bus_addr(pa)
    }

    /// Returns the memory-model regions of `dev`'s P2P memory.
    pub fn p2p_regions(&self, dev: DeviceId) -> Vec<usize> {
        let Ok(d) = self.device(dev) else {
            return Vec::new();
        };
        self.p2p_regions
            .borrow()
            .get(&d.node)
            .map(|v| v.iter().map(|&(_, r)| r).collect())
            .unwrap_or_default()
    }

    /// Unbinds `dev` (step 4 of the module docs): revokes every importer of its BAR exports, zaps every
    /// user mapping of its BARs and P2P pages, waits for every page reference to drop, then frees its
    /// provider state. Afterwards no DMA can reach its BARs (the oracle flags one that tries).
    ///
    /// # Errors
    /// `ENODEV` for an unknown device.
    pub async fn remove_device(self: &Rc<Self>, dev: DeviceId) -> Result<(), DmaError> {
        let d = self.device(dev)?;
        self.kernel.sim.trace("p2pdma.remove", || d.name.clone());
        self.revoke_exports(dev).await;
        for r in self.p2p_regions(dev) {
            self.kernel.remove_p2p_memory(r).await;
        }
        self.providers.borrow_mut().remove(d.node);
        self.p2p_regions.borrow_mut().remove(&d.node);
        self.kernel.sim.count("p2pdma.removals", 1);
        Ok(())
    }
}
