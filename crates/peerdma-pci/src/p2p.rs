//! Linux's P2PDMA routing decision: the distance and map type between a provider (the function whose BAR
//! memory is accessed) and a client (the function doing DMA), the per-(provider, client) map-type cache,
//! and the orchestrator helpers `distance_many` / `find_many` (DESIGN.md §4.2; `spec/linux-p2p.md` §1.4–§1.5;
//! drivers/pci/p2pdma.c `calc_map_type_and_dist`, `pci_p2pdma_map_type`, `pci_p2pdma_distance_many`,
//! `pci_p2pmem_find_many`, v6.16 behaviour).
//!
//! # The algorithm ([`p2p_distance`]), in steps
//! 1. If either side is not a PCI function: NOT_SUPPORTED (what `pci_p2pdma_map_type` answers for a non-PCI
//!    client; `distance_many` first walks to the PCI parent, see [`distance_many`]).
//! 2. Take the upstream chains `P, up(P), …` and `C, up(C), …` (`up` = `pci_upstream_bridge`, which stops at
//!    a root port or an integrated endpoint, so two chains under different root ports never meet). The common
//!    upstream node is the first node of P's chain that is also on C's chain; `dist_a` / `dist_b` are their
//!    positions in the two chains.
//! 3. With a common node: distance = `dist_a + dist_b`; count ACS redirects (RR, CR or EC set) on P's chain
//!    from P up to **and including** the common node, and on C's chain from C up to but **excluding** it
//!    (endpoints themselves count). None: BUS_ADDR, done. Some: go to 5.
//! 4. Without a common node: distance = `len(P chain) + len(C chain)`, ACS is ignored; go to 5.
//! 5. Host bridge: allowed if the CPU flag is set, else by the whitelist — same host bridge: its entry exists;
//!    different host bridges: both entries exist and neither is `REQ_SAME_HOST_BRIDGE` (provider's checked
//!    first). Allowed: THRU_HOST_BRIDGE; refused: NOT_SUPPORTED. The distance is the same either way (no
//!    host-bridge penalty since v5.x).
//!
//! # Cache rules ([`P2pCache`])
//! - Every computation through the cache stores its map type under (provider, client), overwriting; nothing
//!   ever invalidates an entry, so an ACS change after the first lookup is not seen (the kernel's xarray has
//!   the same property, `spec/linux-p2p.md` §8). [`P2pCache::forget_provider`] models the provider's state
//!   being freed at unbind.
//! - A lookup for a non-PCI client answers NOT_SUPPORTED without touching the cache.
//! - The kernel keys the cache by the client's `(domain << 16) | BDF`; the model keys it by [`NodeId`], which
//!   is equivalent while nothing is hot-plugged.
//! - The kernel only stores when the provider has P2PDMA state. This cache does not know providers; the
//!   provider registry ([`crate::provider::P2pProviders::map_type`]) answers NOT_SUPPORTED for a function
//!   without state before it consults the cache.

use std::collections::BTreeMap;
use std::fmt;

use crate::topology::{NodeId, Topology, WhitelistEntry};

/// How a client reaches a provider's memory (`enum pci_p2pdma_map_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MapType {
    /// The path stays in the PCIe fabric: program the PCI bus address (`phys + bus_offset`), no IOMMU.
    BusAddr,
    /// The path goes through the root complex, which allows it: map like normal memory (phys or IOVA).
    ThruHostBridge,
    /// The path crosses a host bridge that is not allowed: DMA mapping fails with `-EREMOTEIO`.
    NotSupported,
}

impl MapType {
    /// Returns the kernel's enum value (v6.x: NOT_SUPPORTED 2, BUS_ADDR 3, THRU_HOST_BRIDGE 4).
    pub fn kernel_value(self) -> u8 {
        match self {
            Self::NotSupported => 2,
            Self::BusAddr => 3,
            Self::ThruHostBridge => 4,
        }
    }
}

impl fmt::Display for MapType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::BusAddr => "BUS_ADDR",
            Self::ThruHostBridge => "THRU_HOST_BRIDGE",
            Self::NotSupported => "NOT_SUPPORTED",
        })
    }
}

/// Why a pair is NOT_SUPPORTED.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NotSupportedReason {
    /// This side is not a PCI function ("cannot be used for peer-to-peer DMA as it is not a PCI device").
    NotPciDevice {
        /// The node that is not a PCI function.
        node: NodeId,
    },
    /// This host bridge has no whitelist entry ("Host bridge not in P2PDMA whitelist").
    HostBridgeNotWhitelisted {
        /// The host bridge.
        host_bridge: NodeId,
    },
    /// This host bridge's entry carries `REQ_SAME_HOST_BRIDGE` and the path crosses to another host bridge.
    CrossHostBridgeRestricted {
        /// The host bridge.
        host_bridge: NodeId,
    },
}

/// The outcome of [`p2p_distance`] for one (provider, client) pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct P2pDecision {
    /// The map type.
    pub map_type: MapType,
    /// The P2PDMA distance (step 3 or 4 of the module docs); 0 when a side is not a PCI function.
    pub distance: u32,
    /// The nodes the data traverses, provider first, client last. A THRU_HOST_BRIDGE path goes up to the
    /// provider's host bridge (then its socket, the client's socket if another, the client's host bridge) and
    /// down to the client, so with a common upstream switch it lists that switch's nodes twice (once per
    /// direction of its full-duplex links). Empty for NOT_SUPPORTED: such a pair never carries data.
    pub path: Vec<NodeId>,
    /// Why the pair is NOT_SUPPORTED; `None` otherwise.
    pub reason: Option<NotSupportedReason>,
    /// The first upstream node the two chains share, if any.
    pub common_upstream: Option<NodeId>,
    /// The nodes whose ACS redirect forced the host-bridge route, provider side first (the kernel's
    /// `pci=disable_acs_redir=` list). Empty without a common upstream node (ACS is then ignored).
    pub acs_redirects: Vec<NodeId>,
}

impl P2pDecision {
    fn not_pci(node: NodeId) -> Self {
        Self {
            map_type: MapType::NotSupported,
            distance: 0,
            path: Vec::new(),
            reason: Some(NotSupportedReason::NotPciDevice { node }),
            common_upstream: None,
            acs_redirects: Vec::new(),
        }
    }
}

fn count_u32(n: usize) -> u32 {
    u32::try_from(n).expect("a PCI hierarchy is far shallower than 2^32 levels")
}

/// Returns the map type and distance from `provider` to `client` (`calc_map_type_and_dist`, module docs).
///
/// # Panics
/// Panics if an id does not come from `topo`.
pub fn p2p_distance(topo: &Topology, provider: NodeId, client: NodeId) -> P2pDecision {
    // Step 1.
    for side in [provider, client] {
        if !topo.node(side).is_pci_function() {
            return P2pDecision::not_pci(side);
        }
    }
    // Step 2.
    let p_chain = topo.upstream_chain(provider);
    let c_chain = topo.upstream_chain(client);
    let common = p_chain.iter().enumerate().find_map(|(dist_a, a)| {
        c_chain
            .iter()
            .position(|bb| bb == a)
            .map(|dist_b| (dist_a, dist_b))
    });

    let (distance, acs_redirects) = match common {
        Some((dist_a, dist_b)) => {
            // Step 3: P's side including the common node, C's side excluding it.
            let acs: Vec<NodeId> = p_chain[..=dist_a]
                .iter()
                .chain(&c_chain[..dist_b])
                .copied()
                .filter(|&n| topo.node(n).acs_redirects())
                .collect();
            let distance = count_u32(dist_a + dist_b);
            if acs.is_empty() {
                let mut path = p_chain[..=dist_a].to_vec();
                path.extend(c_chain[..dist_b].iter().rev());
                return P2pDecision {
                    map_type: MapType::BusAddr,
                    distance,
                    path,
                    reason: None,
                    common_upstream: Some(p_chain[dist_a]),
                    acs_redirects: Vec::new(),
                };
            }
            (distance, acs)
        }
        // Step 4.
        None => (count_u32(p_chain.len() + c_chain.len()), Vec::new()),
    };

    // Step 5.
    let common_upstream = common.map(|(dist_a, _)| p_chain[dist_a]);
    let hb_p = topo
        .host_bridge_of(provider)
        .expect("validated: every PCI function is below a host bridge");
    let hb_c = topo
        .host_bridge_of(client)
        .expect("validated: every PCI function is below a host bridge");
    if let Err(reason) = host_bridge_allows(topo, hb_p, hb_c) {
        return P2pDecision {
            map_type: MapType::NotSupported,
            distance,
            path: Vec::new(),
            reason: Some(reason),
            common_upstream,
            acs_redirects,
        };
    }
    let mut path = p_chain;
    path.push(hb_p);
    if hb_p != hb_c {
        let s_p = topo.socket_of(hb_p);
        let s_c = topo.socket_of(hb_c);
        path.extend(s_p);
        if s_c != s_p {
            path.extend(s_c);
        }
        path.push(hb_c);
    }
    path.extend(c_chain.iter().rev());
    P2pDecision {
        map_type: MapType::ThruHostBridge,
        distance,
        path,
        reason: None,
        common_upstream,
        acs_redirects,
    }
}

/// `cpu_supports_p2pdma() || host_bridge_whitelist(P, C)`.
fn host_bridge_allows(
    topo: &Topology,
    hb_p: NodeId,
    hb_c: NodeId,
) -> Result<(), NotSupportedReason> {
    if topo.cpu_allows_all_host_bridges() {
        return Ok(());
    }
    let entry = |hb: NodeId| {
        topo.node(hb)
            .host_bridge()
            .expect("host_bridge_of returns host bridges")
            .whitelist
    };
    let same = hb_p == hb_c;
    for hb in [hb_p, hb_c] {
        match entry(hb) {
            WhitelistEntry::NotListed => {
                return Err(NotSupportedReason::HostBridgeNotWhitelisted { host_bridge: hb });
            }
            WhitelistEntry::SameHostBridgeOnly if !same => {
                return Err(NotSupportedReason::CrossHostBridgeRestricted { host_bridge: hb });
            }
            WhitelistEntry::SameHostBridgeOnly | WhitelistEntry::Unrestricted => {}
        }
        if same {
            break;
        }
    }
    Ok(())
}

/// The map-type cache of every provider (`pci_p2pdma::map_types`), keyed by (provider, client). Rules in the
/// module docs.
#[derive(Clone, Debug, Default)]
pub struct P2pCache {
    map_types: BTreeMap<(NodeId, NodeId), MapType>,
}

impl P2pCache {
    /// Returns an empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Returns the map type for a DMA mapping of `provider` memory by `client` (`pci_p2pdma_map_type`):
    /// NOT_SUPPORTED for a non-PCI client (not cached), else the cached value, else computed and cached.
    ///
    /// # Panics
    /// Panics if an id does not come from `topo`.
    pub fn map_type(&mut self, topo: &Topology, provider: NodeId, client: NodeId) -> MapType {
        if !topo.node(client).is_pci_function() || !topo.node(provider).is_pci_function() {
            return MapType::NotSupported;
        }
        if let Some(&m) = self.map_types.get(&(provider, client)) {
            return m;
        }
        self.compute(topo, provider, client).map_type
    }

    /// Computes the decision afresh (as `calc_map_type_and_dist` always does) and stores its map type.
    ///
    /// # Panics
    /// Panics if an id does not come from `topo`.
    pub fn compute(&mut self, topo: &Topology, provider: NodeId, client: NodeId) -> P2pDecision {
        let decision = p2p_distance(topo, provider, client);
        if !matches!(
            decision.reason,
            Some(NotSupportedReason::NotPciDevice { .. })
        ) {
            self.map_types.insert((provider, client), decision.map_type);
        }
        decision
    }

    /// Returns the cached map type, if any, without computing.
    pub fn cached(&self, provider: NodeId, client: NodeId) -> Option<MapType> {
        self.map_types.get(&(provider, client)).copied()
    }

    /// Drops every entry of `provider` (its P2PDMA state was released).
    pub fn forget_provider(&mut self, provider: NodeId) {
        self.map_types.retain(|&(p, _), _| p != provider);
    }

    /// Returns the number of cached pairs.
    pub fn len(&self) -> usize {
        self.map_types.len()
    }

    /// Returns whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.map_types.is_empty()
    }
}

/// Returns the summed distance from `provider` to every client, or `None` (the kernel's -1) when `clients` is
/// empty, a client has no PCI device at or above it, or any pair is NOT_SUPPORTED
/// (`pci_p2pdma_distance_many`, non-verbose: stops at the first failure). A client that is not a PCI
/// function is replaced by its nearest PCI ancestor ([`Topology::find_pci_dev`]). THRU_HOST_BRIDGE pairs
/// count like any other. Fills `cache` as a side effect.
///
/// # Panics
/// Panics if an id does not come from `topo`.
pub fn distance_many(
    topo: &Topology,
    cache: &mut P2pCache,
    provider: NodeId,
    clients: &[NodeId],
) -> Option<u32> {
    if clients.is_empty() {
        return None;
    }
    let mut total: u32 = 0;
    for &client in clients {
        let pci_client = topo.find_pci_dev(client)?;
        let d = cache.compute(topo, provider, pci_client);
        if d.map_type == MapType::NotSupported {
            return None;
        }
        total = total.saturating_add(d.distance);
    }
    Some(total)
}

/// The most providers `find_many` keeps tied at the best distance (`PAGE_SIZE / sizeof(pointer)`); later ties
/// are dropped, like the kernel's.
pub const FIND_MANY_MAX_TIED: usize = 512;

/// Returns the provider with the smallest [`distance_many`] to `clients`, or `None` when no provider can
/// serve them all (`pci_p2pmem_find_many`).
///
/// `providers` stands for the devices with published P2P memory, in the order the kernel would iterate
/// them (`pci_get_device`, i.e. bus order). Ties at the best distance (up to [`FIND_MANY_MAX_TIED`]) are
/// broken by `pick_fn(n)`, which must return an index in `0..n` (values out of range are reduced modulo
/// `n`); it is called once whenever a provider is found, even for `n == 1`, as the kernel always draws a
/// random number. Pass a seeded RNG stream's uniform draw to reproduce the kernel's random choice.
///
/// # Panics
/// Panics if an id does not come from `topo`.
pub fn find_many(
    topo: &Topology,
    cache: &mut P2pCache,
    providers: &[NodeId],
    clients: &[NodeId],
    mut pick_fn: impl FnMut(usize) -> usize,
) -> Option<NodeId> {
    let mut best = u32::MAX;
    let mut tied: Vec<NodeId> = Vec::new();
    for &provider in providers {
        let Some(d) = distance_many(topo, cache, provider, clients) else {
            continue;
        };
        if d > best || (d == best && tied.len() >= FIND_MANY_MAX_TIED) {
            continue;
        }
        if d < best {
            tied.clear();
            best = d;
        }
        tied.push(provider);
    }
    if tied.is_empty() {
        return None;
    }
    Some(tied[pick_fn(tied.len()) % tied.len()])
}

#[cfg(test)]
mod tests;
