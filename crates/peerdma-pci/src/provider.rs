//! P2P providers: PCI functions that publish a range of a BAR as peer-to-peer memory, and the lookups a DMA
//! mapper makes against them (DESIGN.md §4.2; `spec/linux-p2p.md` §1.1, §1.2, §1.5).
//!
//! Linux counterpart: drivers/pci/p2pdma.c — `pci_p2pdma_add_resource`, `pci_p2pmem_publish`,
//! `pci_has_p2pmem`, `pci_p2pmem_find_many`, `pci_p2pmem_virt_to_bus`, `pci_p2pdma_map_type`, and the
//! release of the provider state at unbind.
//!
//! What lives here and what does not:
//! - Here: each provider's resources (BAR, offset, size → CPU physical range and bus offset), whether the
//!   memory is published, whether the provider state still exists, and the map-type cache
//!   ([`P2pCache`]) the kernel keeps inside the provider state.
//! - Not here: the pages. The struct pages of a resource (`devm_memremap_pages`) and the gen_pool that hands
//!   them out are the memory model's (`peerdma_mm::Kernel::add_p2p_memory`), because pages are frames with
//!   refcounts and bytes like any other.
//!
//! Rules, as the kernel applies them:
//! 1. `add_resource` (§1.2): the BAR must exist (the model's stand-in for "is `IORESOURCE_MEM`"), the offset
//!    must lie inside it, a zero size means "to the end of the BAR", and offset + size must fit: else
//!    `EINVAL`. The first resource creates the provider state; later calls add ranges to it.
//! 2. Published memory is what `find_many` may hand to other drivers; unpublished memory stays the provider
//!    driver's own.
//! 3. `map_type` at DMA-map time answers NOT_SUPPORTED when the provider has no state (never added, or
//!    removed) — `pci_p2pdma_map_type` does the same — and otherwise goes through the cache.
//! 4. `remove` frees the provider state: the cache entries go with it (the kernel's xarray lives in it), and
//!    every later lookup sees "no P2P memory".

use std::collections::BTreeMap;

use peerdma_core::{Bdf, BusAddr, Errno, Pa, Range};

use crate::p2p::{self, MapType, P2pCache};
use crate::topology::{NodeId, Topology};

/// One BAR range added as P2P memory (`pci_p2pdma_add_resource`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct P2pResource {
    /// The provider function.
    pub provider: NodeId,
    /// The BAR index.
    pub bar: u8,
    /// The CPU physical range of the resource (`bar_start + offset`, `size` bytes).
    pub phys: Range<Pa>,
    /// Bus address minus CPU physical address of the BAR (`pci_bus_address − pci_resource_start`).
    pub bus_offset: i64,
}

impl P2pResource {
    /// Returns the bus address of `pa` (`pa + bus_offset`), or `None` outside the resource.
    pub fn bus_addr(&self, pa: Pa) -> Option<BusAddr> {
        if !self.phys.contains(pa) {
            return None;
        }
        pa.raw()
            .checked_add_signed(self.bus_offset)
            .map(BusAddr::from_raw)
    }
}

#[derive(Clone, Debug, Default)]
struct ProviderState {
    resources: Vec<P2pResource>,
    published: bool,
}

/// Every provider's P2PDMA state (`pci_dev->p2pdma` of each function) and the shared map-type cache.
#[derive(Clone, Debug, Default)]
pub struct P2pProviders {
    providers: BTreeMap<NodeId, ProviderState>,
    cache: P2pCache,
}

impl P2pProviders {
    /// Returns an empty registry: no function provides P2P memory.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `size` bytes at `offset` of BAR `bar` of `provider` as P2P memory (`pci_p2pdma_add_resource`,
    /// rule 1 of the module docs). A zero `size` means the rest of the BAR.
    ///
    /// # Errors
    /// `EINVAL` when the node is not a PCI function, the BAR does not exist, `offset` is not inside it, or
    /// `offset + size` passes its end; `ENODEV` for an id that is not in `topo`.
    pub fn add_resource(
        &mut self,
        topo: &Topology,
        provider: NodeId,
        bar: u8,
        size: u64,
        offset: u64,
    ) -> Result<P2pResource, Errno> {
        let node = topo.get(provider).ok_or(Errno::ENODEV)?;
        if !node.is_pci_function() {
            return Err(Errno::EINVAL);
        }
        let b = node.bar(bar).ok_or(Errno::EINVAL)?;
        if offset >= b.size {
            return Err(Errno::EINVAL);
        }
        let size = if size == 0 { b.size - offset } else { size };
        if size.checked_add(offset).is_none_or(|end| end > b.size) {
            return Err(Errno::EINVAL);
        }
        let phys = Range::from_len(b.phys.add(offset), size).ok_or(Errno::EINVAL)?;
        let res = P2pResource {
            provider,
            bar,
            phys,
            bus_offset: b.bus_offset,
        };
        self.providers
            .entry(provider)
            .or_default()
            .resources
            .push(res);
        Ok(res)
    }

    /// Publishes (or unpublishes) the provider's memory for other drivers (`pci_p2pmem_publish`). A function
    /// without P2P state is left alone, as the kernel does.
    pub fn publish(&mut self, provider: NodeId, publish: bool) {
        if let Some(p) = self.providers.get_mut(&provider) {
            p.published = publish;
        }
    }

    /// Returns whether the provider has P2P state (any resource added, not removed).
    pub fn has_state(&self, provider: NodeId) -> bool {
        self.providers.contains_key(&provider)
    }

    /// Returns whether the provider has published P2P memory (`pci_has_p2pmem`).
    pub fn has_p2pmem(&self, provider: NodeId) -> bool {
        self.providers.get(&provider).is_some_and(|p| p.published)
    }

    /// Returns the providers with published memory in bus order (domain, then BDF), the order
    /// `pci_get_device` iterates them.
    pub fn published(&self, topo: &Topology) -> Vec<NodeId> {
        let mut v: Vec<(u32, Option<Bdf>, NodeId)> = self
            .providers
            .iter()
            .filter(|(_, p)| p.published)
            .map(|(&id, _)| (topo.domain_of(id).unwrap_or(0), topo.node(id).bdf(), id))
            .collect();
        v.sort_unstable();
        v.into_iter().map(|(_, _, id)| id).collect()
    }

    /// Returns the resources of `provider`.
    pub fn resources(&self, provider: NodeId) -> &[P2pResource] {
        self.providers
            .get(&provider)
            .map_or(&[][..], |p| p.resources.as_slice())
    }

    /// Returns the resource containing the CPU physical address `pa`, if a live provider has one.
    pub fn resource_at(&self, pa: Pa) -> Option<&P2pResource> {
        self.providers
            .values()
            .flat_map(|p| p.resources.iter())
            .find(|r| r.phys.contains(pa))
    }

    /// Returns the bus address of P2P memory at `pa` (`pci_p2pmem_virt_to_bus`), or `None` (the kernel's 0)
    /// when no live provider covers it.
    pub fn bus_addr(&self, pa: Pa) -> Option<BusAddr> {
        self.resource_at(pa).and_then(|r| r.bus_addr(pa))
    }

    /// Returns how `client` must address `provider`'s memory (`pci_p2pdma_map_type`, rule 3).
    ///
    /// # Panics
    /// Panics if an id does not come from `topo`.
    pub fn map_type(&mut self, topo: &Topology, provider: NodeId, client: NodeId) -> MapType {
        if !self.has_state(provider) {
            return MapType::NotSupported;
        }
        self.cache.map_type(topo, provider, client)
    }

    /// Returns how `client` must address BAR memory of `owner` that has no struct page and no provider
    /// state — the "naked `p2pdma_provider`" a dma-buf exporter consults (`spec/linux-p2p.md` §1.8 (a)):
    /// the same decision and cache as [`P2pProviders::map_type`], without the provider-state check.
    ///
    /// # Panics
    /// Panics if an id does not come from `topo`.
    pub fn provider_map_type(&mut self, topo: &Topology, owner: NodeId, client: NodeId) -> MapType {
        self.cache.map_type(topo, owner, client)
    }

    /// Returns the cached map type of a pair without computing it.
    pub fn cached(&self, provider: NodeId, client: NodeId) -> Option<MapType> {
        self.cache.cached(provider, client)
    }

    /// Returns the published provider closest to every client, ties broken by `pick_fn(n)`
    /// (`pci_p2pmem_find_many`; see [`p2p::find_many`]). `None` when no published provider serves them all.
    ///
    /// # Panics
    /// Panics if an id does not come from `topo`.
    pub fn find_many(
        &mut self,
        topo: &Topology,
        clients: &[NodeId],
        pick_fn: impl FnMut(usize) -> usize,
    ) -> Option<NodeId> {
        let providers = self.published(topo);
        p2p::find_many(topo, &mut self.cache, &providers, clients, pick_fn)
    }

    /// Frees the provider's P2P state at unbind (rule 4) and returns the resources it had.
    pub fn remove(&mut self, provider: NodeId) -> Vec<P2pResource> {
        self.cache.forget_provider(provider);
        self.providers
            .remove(&provider)
            .map(|p| p.resources)
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{Bar, TopologyBuilder, WhitelistEntry};

    fn bar(index: u8, phys: u64, size: u64, bus_offset: i64) -> Bar {
        Bar {
            index,
            size,
            phys: Pa::from_raw(phys),
            bus_offset,
            prefetchable: true,
        }
    }

    /// Two endpoints under one switch, a third under another root port (not whitelisted host bridge).
    fn topo() -> Topology {
        let mut b = TopologyBuilder::new();
        b.host_bridge("hb0", WhitelistEntry::NotListed);
        b.root_port("rp0", "hb0").bdf(Bdf::new(0, 1, 0).unwrap());
        b.root_port("rp1", "hb0").bdf(Bdf::new(0, 2, 0).unwrap());
        b.switch_upstream("up", "rp0")
            .bdf(Bdf::new(1, 0, 0).unwrap());
        b.switch_downstream("dn0", "up")
            .bdf(Bdf::new(2, 0, 0).unwrap());
        b.switch_downstream("dn1", "up")
            .bdf(Bdf::new(2, 1, 0).unwrap());
        b.endpoint("nvme", "dn0", Bdf::new(3, 0, 0).unwrap())
            .bar(bar(0, 0x1_0000_0000, 0x10_0000, 0x1000_0000));
        b.endpoint("nic", "dn1", Bdf::new(4, 0, 0).unwrap())
            .bar(bar(0, 0x1_0010_0000, 0x10_0000, 0));
        b.endpoint("gpu", "rp1", Bdf::new(5, 0, 0).unwrap())
            .bar(bar(2, 0x2_0000_0000, 0x100_0000, 0));
        b.build().unwrap()
    }

    fn id(t: &Topology, n: &str) -> NodeId {
        t.lookup(n).unwrap()
    }

    /// spec/linux-p2p.md §1.2 steps 1–4, one row each.
    #[test]
    fn add_resource_checks_follow_pci_p2pdma_add_resource() {
        type Row = (u8, u64, u64, Result<(u64, u64), Errno>);
        let t = topo();
        let nvme = id(&t, "nvme");
        let rows: &[Row] = &[
            (1, 0, 0, Err(Errno::EINVAL)), // no such BAR (not IORESOURCE_MEM)
            (0, 0x10_0000, 0, Err(Errno::EINVAL)), // offset >= bar_len
            (0, 0x8_0000, 0x8_0001, Err(Errno::EINVAL)), // size + offset > bar_len
            (0, 0x8_0000, 0, Ok((0x1_0008_0000, 0x8_0000))), // size 0: rest of the BAR
            (0, 0, 0x4000, Ok((0x1_0000_0000, 0x4000))),
        ];
        for &(bar_idx, offset, size, want) in rows {
            let mut p = P2pProviders::new();
            let got = p
                .add_resource(&t, nvme, bar_idx, size, offset)
                .map(|r| (r.phys.start.raw(), r.phys.len()));
            assert_eq!(got, want, "bar {bar_idx} offset {offset:#x} size {size:#x}");
            assert_eq!(p.has_state(nvme), want.is_ok());
        }
        let mut p = P2pProviders::new();
        assert_eq!(
            p.add_resource(&t, id(&t, "hb0"), 0, 0, 0),
            Err(Errno::EINVAL)
        );
    }

    #[test]
    fn bus_address_is_phys_plus_bus_offset() {
        let t = topo();
        let mut p = P2pProviders::new();
        let r = p.add_resource(&t, id(&t, "nvme"), 0, 0, 0).unwrap();
        assert_eq!(
            r.bus_addr(Pa::from_raw(0x1_0000_2000)),
            Some(BusAddr::from_raw(0x1_1000_2000))
        );
        assert_eq!(
            p.bus_addr(Pa::from_raw(0x1_0000_2000)),
            Some(BusAddr::from_raw(0x1_1000_2000))
        );
        assert_eq!(p.bus_addr(Pa::from_raw(0x1_0010_0000)), None);
    }

    #[test]
    fn a_bus_address_is_delivered_to_its_bar_at_bus_minus_offset() {
        let t = topo();
        let nic = id(&t, "nic");
        let (found, bar, pa) = t.bar_at_bus(nic, BusAddr::from_raw(0x1_1000_2000)).unwrap();
        assert_eq!((t.name(found), bar.index), ("nvme", 0));
        assert_eq!(pa, Pa::from_raw(0x1_0000_2000));
        // The nvme BAR's CPU address is not its bus address (offset 0x1000_0000): nothing answers there
        // but the nic's BAR, which starts right after the nvme's in CPU space.
        assert!(
            t.bar_at_bus(nic, BusAddr::from_raw(0x1_0000_2000))
                .is_none()
        );
        let (found, _, _) = t
            .bar_at_bus(id(&t, "nvme"), BusAddr::from_raw(0x1_0010_0000))
            .unwrap();
        assert_eq!(t.name(found), "nic");
    }

    /// Two host bridges whose bus ranges overlap with different offsets (POWER PHBs, arm64 host
    /// controllers): a bus address names a BAR only inside the initiator's own host bridge, whichever host
    /// bridge was declared first.
    #[test]
    fn a_bus_address_resolves_only_below_the_initiators_host_bridge() {
        let mut b = TopologyBuilder::new();
        b.host_bridge("hb0", WhitelistEntry::NotListed);
        b.host_bridge("hb1", WhitelistEntry::NotListed).domain(1);
        b.root_port("rp0", "hb0").bdf(Bdf::new(0, 1, 0).unwrap());
        b.root_port("rp1", "hb1").bdf(Bdf::new(0, 1, 0).unwrap());
        // Both BARs sit at bus address 0x8000_0000 of their own host bridge.
        b.endpoint("gpu", "rp0", Bdf::new(1, 0, 0).unwrap())
            .bar(bar(2, 0x2_0000_0000, 0x10_0000, -0x1_8000_0000));
        b.endpoint("nvme", "rp1", Bdf::new(1, 0, 0).unwrap())
            .bar(bar(0, 0x3_0000_0000, 0x10_0000, -0x2_8000_0000));
        b.endpoint("nic", "rp1", Bdf::new(2, 0, 0).unwrap());
        b.endpoint("fpga", "rp0", Bdf::new(2, 0, 0).unwrap());
        let t = b.build().unwrap();
        let bus = BusAddr::from_raw(0x8000_1000);
        let (found, _, pa) = t.bar_at_bus(id(&t, "nic"), bus).unwrap();
        assert_eq!((t.name(found), pa), ("nvme", Pa::from_raw(0x3_0000_1000)));
        let (found, _, pa) = t.bar_at_bus(id(&t, "fpga"), bus).unwrap();
        assert_eq!((t.name(found), pa), ("gpu", Pa::from_raw(0x2_0000_1000)));
        assert!(
            t.bar_at_bus(id(&t, "hb0"), bus).is_none(),
            "not a PCI function"
        );
    }

    #[test]
    fn only_published_memory_is_found_and_removal_forgets_the_provider() {
        let t = topo();
        let (nvme, nic, gpu) = (id(&t, "nvme"), id(&t, "nic"), id(&t, "gpu"));
        let mut p = P2pProviders::new();
        p.add_resource(&t, nvme, 0, 0, 0).unwrap();
        p.add_resource(&t, gpu, 2, 0, 0).unwrap();
        assert_eq!(p.find_many(&t, &[nic], |_| 0), None, "nothing published");
        p.publish(nvme, true);
        p.publish(gpu, true);
        assert!(p.has_p2pmem(nvme));
        // The GPU is behind another root port of a non-whitelisted host bridge: NOT_SUPPORTED for the NIC.
        assert_eq!(p.find_many(&t, &[nic], |_| 0), Some(nvme));
        assert_eq!(p.map_type(&t, nvme, nic), MapType::BusAddr);
        assert_eq!(p.cached(nvme, nic), Some(MapType::BusAddr));
        let gone = p.remove(nvme);
        assert_eq!(gone.len(), 1);
        assert!(!p.has_state(nvme));
        assert_eq!(
            p.cached(nvme, nic),
            None,
            "the cache lived in the provider state"
        );
        assert_eq!(p.map_type(&t, nvme, nic), MapType::NotSupported);
        assert_eq!(p.find_many(&t, &[nic], |_| 0), None);
        assert_eq!(p.resource_at(Pa::from_raw(0x1_0000_0000)), None);
    }

    #[test]
    fn published_lists_providers_in_bus_order() {
        let t = topo();
        let (nvme, nic, gpu) = (id(&t, "nvme"), id(&t, "nic"), id(&t, "gpu"));
        let mut p = P2pProviders::new();
        for n in [gpu, nic, nvme] {
            p.add_resource(&t, n, t.node(n).bars()[0].index, 0, 0)
                .unwrap();
            p.publish(n, true);
        }
        assert_eq!(p.published(&t), vec![nvme, nic, gpu]);
        p.publish(nic, false);
        assert_eq!(p.published(&t), vec![nvme, gpu]);
    }
}
