//! The PCIe topology: a tree per host bridge of root ports, switches (an upstream port with its downstream
//! ports) and endpoints, host bridges joined by sockets, and the links between a device and its parent port
//! (DESIGN.md §4.1).
//!
//! # What is modelled
//! - **Nodes** have a name (used by errors and reports), a kind ([`NodeKind`]), an optional parent and, for PCI
//!   functions (root ports, switch ports, endpoints), an optional BDF (required for endpoints), BARs and an
//!   optional ACS capability ([`AcsCtrl`]: the RR, CR and EC bits of ACS Control, PCIe Base Spec §7.7.8).
//! - **Host bridges** carry the P2PDMA whitelist entry of their root device ([`WhitelistEntry`],
//!   `spec/linux-p2p.md` §1.4) and a PCI domain; the whole system carries the "CPU allows every host-bridge
//!   path" flag (Linux `cpu_supports_p2pdma()`: AMD Zen).
//! - **Links** ([`LinkConfig`]) join an endpoint or a switch upstream port to the root port or switch
//!   downstream port above it. Connections inside the root complex (root port to host bridge) and inside a
//!   switch (downstream to upstream port) have no link. A missing link means "not modelled" (no bandwidth
//!   limit), not an error.
//! - **Non-PCI devices** ([`NodeKind::NonPci`]) stand for a `struct device` that is not a `pci_dev`: a child
//!   device of a PCI function (an RDMA `ib_device`, say) or a platform device. P2PDMA walks their parents to
//!   find a PCI device (`find_parent_pci_dev` in drivers/pci/p2pdma.c).
//!
//! # Invariants (checked by [`TopologyBuilder::build`])
//! 1. Names are unique; every parent exists; following parents never cycles.
//! 2. Parent kinds: a host bridge sits on a socket or on nothing; a root port on a host bridge; a switch
//!    upstream port on a root port or switch downstream port; a downstream port on an upstream port; an
//!    endpoint on a root port, a downstream port, or a host bridge (root-complex integrated endpoint); a
//!    non-PCI device on nothing, a socket, an endpoint or another non-PCI device. So every PCI function is
//!    below exactly one host bridge.
//! 3. BDFs are unique within a PCI domain (the domain of the host bridge above the function).
//! 4. BARs have an index 0–5 (unique per function), a non-zero power-of-two size, a base aligned to the size,
//!    and do not overlap any other BAR in CPU physical address space; their bus range does not overflow.
//! 5. Link settings are possible for PCIe and covered by the DLL tables ([`LinkConfig::new`]).
//!
//! # Bus addresses
//! A BAR's bus offset is `pci_bus_address(bar) − pci_resource_start(bar)`; a CPU physical address `p` inside it
//! is seen on the bus at `p + bus_offset` (v6.x `pci_p2pdma_bus_addr_map`, `spec/linux-p2p.md` §1.1). The
//! offset may be negative.
//!
//! Simplification: Linux finds a host bridge's whitelist entry from the vendor/device id of the first device
//! on its root bus (only if that is 00.0 or a root port); here the scenario states the outcome of that
//! lookup directly on the host bridge.

mod builder;
mod spec;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;

use peerdma_core::{Bdf, BusAddr, Pa, Range};
use serde::{Deserialize, Serialize};

pub use builder::{NodeDecl, TopologyBuilder};
pub use spec::{
    BarSpec, DownstreamPortSpec, EndpointSpec, HostBridgeSpec, NonPciSpec, RootPortSpec,
    SocketSpec, SwitchSpec, TopologySpec, parse_offset, parse_size_or_address,
};

use crate::link::LinkConfig;
use crate::{BarProblem, Error, Result};

/// The number of standard BARs of a PCI function (`PCI_STD_NUM_BARS`).
pub const NR_BARS: u8 = 6;

/// The index of a node in its [`Topology`], in declaration order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(u32);

impl NodeId {
    /// Returns the position of the node in declaration order.
    pub fn index(self) -> usize {
        usize::try_from(self.0).expect("u32 fits usize on supported targets")
    }

    fn from_index(i: usize) -> Self {
        Self(u32::try_from(i).expect("fewer than 2^32 nodes"))
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// A host bridge's entry in the kernel's P2PDMA host-bridge whitelist (`pci_p2pdma_whitelist`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WhitelistEntry {
    /// Not in the whitelist: host-bridge paths are refused unless the CPU flag allows them.
    #[default]
    NotListed,
    /// Listed with `REQ_SAME_HOST_BRIDGE` (Sandy Bridge-EP, Haswell-EP): allowed only when provider and client
    /// are under this same host bridge.
    SameHostBridgeOnly,
    /// Listed without restriction (Skylake-E and later entries): allowed within this host bridge and towards
    /// another unrestricted one.
    Unrestricted,
}

/// The attributes of a host bridge.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct HostBridge {
    /// Its whitelist entry.
    pub whitelist: WhitelistEntry,
    /// Its PCI domain (segment); BDFs are unique per domain. Linux numbers domains with an `int`: ACPI
    /// segments are 16-bit, but a VMD controller puts its domains from 0x10000 up
    /// (`drivers/pci/controller/vmd.c`, `vmd_find_free_domain`), so the model takes 32 bits.
    pub domain: u32,
}

/// What a node is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NodeKind {
    /// A CPU socket; joins the host bridges on it.
    Socket,
    /// A host bridge (root complex); the top of a PCI hierarchy.
    HostBridge(HostBridge),
    /// A PCIe root port.
    RootPort,
    /// The upstream port of a switch.
    SwitchUpstream,
    /// A downstream port of a switch.
    SwitchDownstream,
    /// An endpoint function (a device's PCI function, or a root-complex integrated endpoint).
    Endpoint,
    /// A device that is not a PCI function (a child `struct device` or a platform device).
    NonPci,
}

impl NodeKind {
    /// Returns the kind's name as errors print it (`"switch downstream port"`).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Socket => "socket",
            Self::HostBridge(_) => "host bridge",
            Self::RootPort => "root port",
            Self::SwitchUpstream => "switch upstream port",
            Self::SwitchDownstream => "switch downstream port",
            Self::Endpoint => "endpoint",
            Self::NonPci => "non-PCI device",
        }
    }

    /// Returns whether the node is a PCI function (a `pci_dev`): a port or an endpoint.
    pub fn is_pci_function(&self) -> bool {
        matches!(
            self,
            Self::RootPort | Self::SwitchUpstream | Self::SwitchDownstream | Self::Endpoint
        )
    }

    /// Returns whether the node is a PCI-to-PCI bridge (a port): what `pci_upstream_bridge` can return.
    pub fn is_pci_bridge(&self) -> bool {
        matches!(
            self,
            Self::RootPort | Self::SwitchUpstream | Self::SwitchDownstream
        )
    }
}

/// The ACS Control bits that matter to P2PDMA (PCIe Base Spec §7.7.8.3).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcsCtrl {
    /// P2P Request Redirect.
    #[serde(default)]
    pub rr: bool,
    /// P2P Completion Redirect.
    #[serde(default)]
    pub cr: bool,
    /// P2P Egress Control.
    #[serde(default)]
    pub ec: bool,
}

impl AcsCtrl {
    /// ACS Control with only Request Redirect set.
    pub const RR: Self = Self {
        rr: true,
        cr: false,
        ec: false,
    };
    /// ACS Control with only Completion Redirect set.
    pub const CR: Self = Self {
        rr: false,
        cr: true,
        ec: false,
    };
    /// ACS Control with only Egress Control set.
    pub const EC: Self = Self {
        rr: false,
        cr: false,
        ec: true,
    };

    /// Returns whether any of RR, CR or EC is set: what v6.x `pci_bridge_has_acs_redir` tests (it ignores the
    /// egress control vector, `spec/linux-p2p.md` §8).
    pub fn redirects(&self) -> bool {
        self.rr || self.cr || self.ec
    }
}

/// A memory BAR of a PCI function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Bar {
    /// BAR index, 0–5.
    pub index: u8,
    /// Size in bytes, a power of two.
    pub size: u64,
    /// CPU physical base address (`pci_resource_start`), aligned to the size.
    pub phys: Pa,
    /// Bus address minus CPU physical address (`pci_bus_address − pci_resource_start`); 0 on x86.
    pub bus_offset: i64,
    /// Whether the BAR is prefetchable.
    pub prefetchable: bool,
}

impl Bar {
    /// Returns the BAR's CPU physical range.
    ///
    /// # Panics
    /// Panics if the range overflows, which a validated topology excludes.
    pub fn phys_range(&self) -> Range<Pa> {
        Range::from_len(self.phys, self.size).expect("validated: BAR range fits 64 bits")
    }

    /// Returns the BAR's range as seen on the PCI bus.
    ///
    /// # Panics
    /// Panics if the range overflows, which a validated topology excludes.
    pub fn bus_range(&self) -> Range<BusAddr> {
        let start = self
            .bus_of(self.phys)
            .expect("validated: BAR bus range fits 64 bits");
        Range::from_len(start, self.size).expect("validated: BAR bus range fits 64 bits")
    }

    /// Returns whether `pa` lies inside the BAR.
    pub fn contains(&self, pa: Pa) -> bool {
        pa >= self.phys && pa.raw() - self.phys.raw() < self.size
    }

    /// Returns the bus address of `pa` (`pa + bus_offset`), or `None` when `pa` is outside the BAR.
    pub fn bus_addr(&self, pa: Pa) -> Option<BusAddr> {
        if !self.contains(pa) {
            return None;
        }
        self.bus_of(pa)
    }

    fn bus_of(&self, pa: Pa) -> Option<BusAddr> {
        pa.raw()
            .checked_add_signed(self.bus_offset)
            .map(BusAddr::from_raw)
    }

    fn check(&self) -> std::result::Result<(), BarProblem> {
        if self.index >= NR_BARS {
            return Err(BarProblem::IndexOutOfRange);
        }
        if !self.size.is_power_of_two() {
            return Err(BarProblem::SizeNotPowerOfTwo);
        }
        if !self.phys.is_aligned(self.size) {
            return Err(BarProblem::Misaligned);
        }
        // Both half-open ranges, CPU physical and bus, must have a representable end.
        self.phys
            .raw()
            .checked_add(self.size)
            .and_then(|_| self.phys.raw().checked_add_signed(self.bus_offset))
            .and_then(|bus| bus.checked_add(self.size))
            .map(|_| ())
            .ok_or(BarProblem::AddressOverflow)
    }
}

/// One node of a validated topology.
#[derive(Clone, Debug)]
pub struct Node {
    name: String,
    kind: NodeKind,
    parent: Option<NodeId>,
    children: Vec<NodeId>,
    bdf: Option<Bdf>,
    acs: Option<AcsCtrl>,
    link: Option<LinkConfig>,
    bars: Vec<Bar>,
}

impl Node {
    /// Returns the node's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Returns the node's kind.
    pub fn kind(&self) -> NodeKind {
        self.kind
    }

    /// Returns the parent node, if any.
    pub fn parent(&self) -> Option<NodeId> {
        self.parent
    }

    /// Returns the children, in declaration order.
    pub fn children(&self) -> &[NodeId] {
        &self.children
    }

    /// Returns the BDF of a PCI function, when it has one.
    pub fn bdf(&self) -> Option<Bdf> {
        self.bdf
    }

    /// Returns the ACS Control register, or `None` when the function has no ACS capability.
    pub fn acs(&self) -> Option<AcsCtrl> {
        self.acs
    }

    /// Returns whether the function has an ACS capability with RR, CR or EC set.
    pub fn acs_redirects(&self) -> bool {
        self.acs.is_some_and(|a| a.redirects())
    }

    /// Returns the link to the parent port, when it is modelled.
    pub fn link(&self) -> Option<&LinkConfig> {
        self.link.as_ref()
    }

    /// Returns the BARs, in declaration order.
    pub fn bars(&self) -> &[Bar] {
        &self.bars
    }

    /// Returns the BAR with `index`, if the function has it.
    pub fn bar(&self, index: u8) -> Option<&Bar> {
        self.bars.iter().find(|b| b.index == index)
    }

    /// Returns whether the node is a PCI function.
    pub fn is_pci_function(&self) -> bool {
        self.kind.is_pci_function()
    }

    /// Returns the host-bridge attributes when the node is a host bridge.
    pub fn host_bridge(&self) -> Option<HostBridge> {
        match self.kind {
            NodeKind::HostBridge(hb) => Some(hb),
            _ => None,
        }
    }
}

/// A validated PCIe topology. Built by [`TopologyBuilder`] or [`TopologySpec::build`].
#[derive(Clone, Debug)]
pub struct Topology {
    nodes: Vec<Node>,
    names: BTreeMap<String, NodeId>,
    /// BAR start address → (function, position in its `bars`); BARs never overlap.
    bars_by_start: BTreeMap<u64, (NodeId, usize)>,
    cpu_allows_all_host_bridges: bool,
}

impl Topology {
    /// Returns an empty builder.
    pub fn builder() -> TopologyBuilder {
        TopologyBuilder::new()
    }

    /// Returns the node `id`.
    ///
    /// # Panics
    /// Panics if `id` does not come from this topology.
    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id.index()]
    }

    /// Returns the node `id`, or `None` when the id is not from this topology.
    pub fn get(&self, id: NodeId) -> Option<&Node> {
        self.nodes.get(id.index())
    }

    /// Returns the id of the node called `name`.
    pub fn lookup(&self, name: &str) -> Option<NodeId> {
        self.names.get(name).copied()
    }

    /// Returns the node's name (a shorthand for `node(id).name()`).
    ///
    /// # Panics
    /// Panics if `id` does not come from this topology.
    pub fn name(&self, id: NodeId) -> &str {
        self.node(id).name()
    }

    /// Returns the PCI function with `bdf` in PCI `domain`.
    pub fn by_bdf(&self, domain: u32, bdf: Bdf) -> Option<NodeId> {
        self.ids().find(|&id| {
            let n = self.node(id);
            n.bdf == Some(bdf) && self.domain_of(id) == Some(domain)
        })
    }

    /// Returns every node id in declaration order.
    pub fn ids(&self) -> impl Iterator<Item = NodeId> + '_ {
        (0..self.nodes.len()).map(NodeId::from_index)
    }

    /// Returns every node with its id, in declaration order.
    pub fn nodes(&self) -> impl Iterator<Item = (NodeId, &Node)> + '_ {
        self.nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (NodeId::from_index(i), n))
    }

    /// Returns the endpoints, in declaration order.
    pub fn endpoints(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.ids()
            .filter(|&id| self.node(id).kind == NodeKind::Endpoint)
    }

    /// Returns the number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Returns whether the topology has no node.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Returns whether the CPU allows P2P through any host bridge without a whitelist lookup (Linux
    /// `cpu_supports_p2pdma()`, true on AMD Zen).
    pub fn cpu_allows_all_host_bridges(&self) -> bool {
        self.cpu_allows_all_host_bridges
    }

    /// Returns the bridge directly upstream of a PCI function (`pci_upstream_bridge`): its parent port, or
    /// `None` for a root port, a root-complex integrated endpoint or a node that is not a PCI function.
    ///
    /// # Panics
    /// Panics if `id` does not come from this topology.
    pub fn upstream_bridge(&self, id: NodeId) -> Option<NodeId> {
        let node = self.node(id);
        if !node.kind.is_pci_function() {
            return None;
        }
        node.parent.filter(|&p| self.node(p).kind.is_pci_bridge())
    }

    /// Returns `id` and its upstream bridges, bottom-up: `[id, up(id), up(up(id)), …]`, ending at a root port
    /// (or at `id` itself for a root-complex integrated endpoint).
    ///
    /// # Panics
    /// Panics if `id` does not come from this topology.
    pub fn upstream_chain(&self, id: NodeId) -> Vec<NodeId> {
        let mut chain = vec![id];
        let mut cur = id;
        while let Some(up) = self.upstream_bridge(cur) {
            chain.push(up);
            cur = up;
        }
        chain
    }

    /// Returns the host bridge above a PCI function (`pci_find_host_bridge`), or `None` for other nodes.
    ///
    /// # Panics
    /// Panics if `id` does not come from this topology.
    pub fn host_bridge_of(&self, id: NodeId) -> Option<NodeId> {
        if !self.node(id).kind.is_pci_function() {
            return None;
        }
        let mut cur = self.node(id).parent;
        while let Some(p) = cur {
            if matches!(self.node(p).kind, NodeKind::HostBridge(_)) {
                return Some(p);
            }
            cur = self.node(p).parent;
        }
        None
    }

    /// Returns the PCI domain of a PCI function (its host bridge's domain).
    ///
    /// # Panics
    /// Panics if `id` does not come from this topology.
    pub fn domain_of(&self, id: NodeId) -> Option<u32> {
        self.host_bridge_of(id)
            .and_then(|hb| self.node(hb).host_bridge())
            .map(|hb| hb.domain)
    }

    /// Returns the socket a host bridge sits on, if any.
    ///
    /// # Panics
    /// Panics if `id` does not come from this topology.
    pub fn socket_of(&self, host_bridge: NodeId) -> Option<NodeId> {
        self.node(host_bridge)
            .parent
            .filter(|&p| self.node(p).kind == NodeKind::Socket)
    }

    /// Returns the nearest PCI function at or above `id` (`find_parent_pci_dev`: the node itself if it is a
    /// PCI function, else its closest ancestor that is), or `None` when there is none.
    ///
    /// # Panics
    /// Panics if `id` does not come from this topology.
    pub fn find_pci_dev(&self, id: NodeId) -> Option<NodeId> {
        let mut cur = Some(id);
        while let Some(c) = cur {
            if self.node(c).kind.is_pci_function() {
                return Some(c);
            }
            cur = self.node(c).parent;
        }
        None
    }

    /// Returns the function and BAR whose CPU physical range contains `pa`.
    pub fn bar_at(&self, pa: Pa) -> Option<(NodeId, &Bar)> {
        let (_, &(id, pos)) = self.bars_by_start.range(..=pa.raw()).next_back()?;
        let bar = &self.node(id).bars[pos];
        bar.contains(pa).then_some((id, bar))
    }

    /// Returns the BAR whose PCI bus range contains `bus` *in the bus address space of `initiator`'s host
    /// bridge*, its function, and the CPU physical address `bus` stands for (`bus - bus_offset`): where the
    /// fabric delivers a transaction that `initiator` issues at that bus address.
    ///
    /// Bus addresses are per host bridge: each host bridge translates its own windows (the
    /// `pci_host_bridge` windows whose offsets `pcibios_resource_to_bus` applies), and two host bridges
    /// may have overlapping bus ranges with different offsets (POWER PHBs, arm64 host controllers). A
    /// transaction a function issues at a bus address is routed inside its own hierarchy, so only the BARs
    /// below the same host bridge can answer it (`drivers/pci/p2pdma.c` hands out a bus address only for
    /// BUS_ADDR, which needs a common upstream bridge). `None` when `initiator` has no host bridge (a
    /// non-PCI node) or no BAR below it answers.
    ///
    /// # Panics
    /// Panics if `initiator` does not come from this topology.
    pub fn bar_at_bus(&self, initiator: NodeId, bus: BusAddr) -> Option<(NodeId, &Bar, Pa)> {
        let hb = self.host_bridge_of(self.find_pci_dev(initiator)?)?;
        self.nodes().find_map(|(id, n)| {
            if !n.kind.is_pci_function() || self.host_bridge_of(id) != Some(hb) {
                return None;
            }
            n.bars().iter().find_map(|b| {
                b.bus_range().contains(bus).then(|| {
                    let pa = bus.raw().checked_add_signed(-b.bus_offset)?;
                    Some((id, b, Pa::from_raw(pa)))
                })?
            })
        })
    }

    /// Returns the bus address of CPU physical address `pa` inside some BAR (`pa + bus_offset` of that BAR),
    /// or `None` when `pa` is in no BAR.
    pub fn bus_addr(&self, pa: Pa) -> Option<BusAddr> {
        self.bar_at(pa).and_then(|(_, bar)| bar.bus_addr(pa))
    }

    /// Replaces the ACS Control register of a PCI function (`None` removes the capability), as a driver or
    /// the `pci=disable_acs_redir=` parameter would. Map types already cached in a
    /// [`P2pCache`](crate::p2p::P2pCache) are *not* recomputed, exactly like Linux (`spec/linux-p2p.md` §8).
    ///
    /// # Errors
    /// [`Error::UnknownNode`] for a foreign id; [`Error::AttributeNotAllowed`] for a node that is not a PCI
    /// function.
    pub fn set_acs(&mut self, id: NodeId, acs: Option<AcsCtrl>) -> Result<()> {
        let node = self
            .nodes
            .get_mut(id.index())
            .ok_or(Error::UnknownNode { id })?;
        if !node.kind.is_pci_function() {
            return Err(Error::AttributeNotAllowed {
                node: node.name.clone(),
                kind: node.kind.name(),
                attribute: "acs",
            });
        }
        node.acs = acs;
        Ok(())
    }
}
