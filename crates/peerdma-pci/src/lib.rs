//! The PCIe model: the topology tree (sockets, host bridges, root ports, switches, endpoints, their BARs and
//! ACS controls, and the links between them), Linux's P2PDMA routing decision (distance and map type, with the
//! host-bridge whitelist and the per-(provider, client) cache), bus-address translation, and the closed-form
//! PCIe link bandwidth model.
//!
//! Linux counterparts: drivers/pci/p2pdma.c (`calc_map_type_and_dist`, `pci_p2pdma_distance_many`,
//! `pci_p2pmem_find_many`, the host-bridge whitelist), drivers/pci/pci.c (`pci_upstream_bridge`) and the
//! ACS capability (PCIe Base Spec §7.7.8). The behavioural reference is `spec/linux-p2p.md` §1; the timing
//! reference is `spec/numbers.md` §1 and `spec/pcie-dll-tables.toml`.
//!
//! Layout:
//! - [`topology`]: the tree, its validating builder and the serde description a scenario's `[topology]`
//!   section deserializes into;
//! - [`p2p`]: `p2p_distance` / map types, the map-type cache, `distance_many` / `find_many`;
//! - [`provider`]: P2P providers — BAR ranges added and published as P2P memory, `find_many` over the
//!   published ones, bus addresses, the provider state freed at unbind (the pages themselves are the memory
//!   model's);
//! - [`link`]: link bandwidth, transfer time, per-hop latency and the coarse shared-link model.

pub mod link;
pub mod p2p;
pub mod provider;
pub mod topology;

use std::fmt;

use peerdma_core::{Bdf, Pa, Range};

pub use link::{CompletionSplit, LinkConfig, LinkSpec, SharedLink, Transfer};
pub use p2p::{
    MapType, NotSupportedReason, P2pCache, P2pDecision, distance_many, find_many, p2p_distance,
};
pub use provider::{P2pProviders, P2pResource};
pub use topology::{
    AcsCtrl, Bar, HostBridge, Node, NodeDecl, NodeId, NodeKind, Topology, TopologyBuilder,
    TopologySpec, WhitelistEntry,
};

/// A link parameter that [`Error::InvalidLink`] complains about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkParam {
    /// The PCIe generation (1–7).
    Generation,
    /// The negotiated width in lanes.
    Width,
    /// Max Payload Size in bytes.
    Mps,
    /// Max Read Request Size in bytes.
    Mrrs,
    /// Read Completion Boundary in bytes.
    Rcb,
}

impl fmt::Display for LinkParam {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Generation => "generation",
            Self::Width => "width",
            Self::Mps => "mps",
            Self::Mrrs => "mrrs",
            Self::Rcb => "rcb",
        })
    }
}

/// What is wrong with one BAR, for [`Error::InvalidBar`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarProblem {
    /// The index is not 0–5 (`PCI_STD_NUM_BARS` is 6).
    IndexOutOfRange,
    /// Two BARs of one function use the same index.
    DuplicateIndex,
    /// The size is zero or not a power of two.
    SizeNotPowerOfTwo,
    /// The physical base is not aligned to the size (BARs are naturally aligned).
    Misaligned,
    /// `phys + size` or `phys + bus_offset` leaves the 64-bit address space.
    AddressOverflow,
}

impl fmt::Display for BarProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::IndexOutOfRange => "index is not in 0..=5",
            Self::DuplicateIndex => "index used twice",
            Self::SizeNotPowerOfTwo => "size is not a non-zero power of two",
            Self::Misaligned => "base is not aligned to the size",
            Self::AddressOverflow => "range or bus offset overflows the 64-bit address space",
        })
    }
}

fn at_node(node: Option<&String>) -> String {
    node.map_or_else(String::new, |n| format!(" of node `{n}`"))
}

/// Errors of the PCIe model: an invalid topology or link description, or a call with an id that does not
/// belong to the topology. P2P routing outcomes (NOT_SUPPORTED) are not errors; see [`p2p::MapType`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Two nodes have the same name.
    #[error("duplicate node name `{name}`")]
    DuplicateName {
        /// The name used twice.
        name: String,
    },
    /// A node names a parent that does not exist.
    #[error("node `{node}`: parent `{parent}` does not exist")]
    MissingParent {
        /// The node.
        node: String,
        /// The parent name it gave.
        parent: String,
    },
    /// A node that must have a parent has none.
    #[error("node `{node}` needs a parent ({expected})")]
    ParentRequired {
        /// The node.
        node: String,
        /// The kinds of node that may be its parent.
        expected: &'static str,
    },
    /// A node gives an endpoint as its parent; endpoints have no secondary bus.
    #[error("node `{node}`: parent `{parent}` is an endpoint, which cannot have children")]
    EndpointAsParent {
        /// The node.
        node: String,
        /// The endpoint it named as parent.
        parent: String,
    },
    /// A node's parent is of a kind that cannot hold it (e.g. an endpoint under a switch upstream port).
    #[error("node `{node}`: parent `{parent}` is a {parent_kind}, expected {expected}")]
    BadParent {
        /// The node.
        node: String,
        /// Its parent.
        parent: String,
        /// The parent's kind.
        parent_kind: &'static str,
        /// The kinds that would be accepted.
        expected: &'static str,
    },
    /// Following parents from this node comes back to it.
    #[error("node `{node}` is its own ancestor (parent cycle)")]
    Cycle {
        /// A node on the cycle (the first one in declaration order).
        node: String,
    },
    /// An endpoint has no BDF.
    #[error("node `{node}`: an endpoint needs a bdf")]
    MissingBdf {
        /// The endpoint.
        node: String,
    },
    /// Two PCI functions of one PCI domain share a BDF.
    #[error("node `{node}`: bdf {domain:04x}:{bdf} is already used by `{other}`")]
    DuplicateBdf {
        /// The second function declared with the BDF.
        node: String,
        /// The first one.
        other: String,
        /// The PCI domain (segment) of the host bridge above both.
        domain: u32,
        /// The BDF.
        bdf: Bdf,
    },
    /// An attribute was given to a node kind that does not have it (a BAR on a socket, ACS on a host bridge).
    #[error("node `{node}`: a {kind} cannot have {attribute}")]
    AttributeNotAllowed {
        /// The node.
        node: String,
        /// Its kind.
        kind: &'static str,
        /// The attribute (`"bars"`, `"acs"`, `"a bdf"`, `"a link"`).
        attribute: &'static str,
    },
    /// One BAR is malformed.
    #[error("node `{node}`: bar {index}: {problem}")]
    InvalidBar {
        /// The function owning the BAR.
        node: String,
        /// The BAR index.
        index: u8,
        /// What is wrong.
        problem: BarProblem,
    },
    /// Two BARs (of one function or of two) overlap in CPU physical address space.
    #[error(
        "node `{node}`: bar {index} {range} overlaps bar {other_index} {other_range} of `{other}`"
    )]
    OverlappingBars {
        /// The function declared second.
        node: String,
        /// Its BAR index.
        index: u8,
        /// Its physical range.
        range: Range<Pa>,
        /// The function declared first.
        other: String,
        /// Its BAR index.
        other_index: u8,
        /// Its physical range.
        other_range: Range<Pa>,
    },
    /// A link setting is impossible (generation, width, MPS, MRRS or RCB).
    #[error("invalid link{}: {param} {value}, expected {expected}", at_node(.node.as_ref()))]
    InvalidLink {
        /// The node whose upstream link it is, when the link belongs to a topology.
        node: Option<String>,
        /// The parameter.
        param: LinkParam,
        /// The value given.
        value: u64,
        /// What is accepted.
        expected: &'static str,
    },
    /// A node id does not belong to this topology.
    #[error("unknown node id {id}")]
    UnknownNode {
        /// The id.
        id: NodeId,
    },
}

impl Error {
    /// Returns the name of the node the error is about, if it names one.
    pub fn node(&self) -> Option<&str> {
        match self {
            Self::DuplicateName { name: node }
            | Self::MissingParent { node, .. }
            | Self::ParentRequired { node, .. }
            | Self::EndpointAsParent { node, .. }
            | Self::BadParent { node, .. }
            | Self::Cycle { node }
            | Self::MissingBdf { node }
            | Self::DuplicateBdf { node, .. }
            | Self::AttributeNotAllowed { node, .. }
            | Self::InvalidBar { node, .. }
            | Self::OverlappingBars { node, .. } => Some(node),
            Self::InvalidLink { node, .. } => node.as_deref(),
            Self::UnknownNode { .. } => None,
        }
    }
}

/// The result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
