//! Building a [`Topology`]: node declarations, their parent rules, bus numbers, BARs and windows, and the
//! checks of the whole (the PCI core's enumeration, reduced to what a scenario declares).

use std::collections::BTreeMap;

use peerdma_core::Bdf;

use crate::link::{LinkConfig, LinkSpec};
use crate::{BarProblem, Error, Result};

use super::{AcsCtrl, Bar, HostBridge, Node, NodeId, NodeKind, Topology, WhitelistEntry};

/// One node declaration in a [`TopologyBuilder`]; its setters return `&mut Self` so that they chain.
#[derive(Clone, Debug)]
pub struct NodeDecl {
    name: String,
    kind: NodeKind,
    parent: Option<String>,
    domain: Option<u32>,
    bdf: Option<Bdf>,
    acs: Option<AcsCtrl>,
    link: Option<LinkSpec>,
    bars: Vec<Bar>,
}

impl NodeDecl {
    fn new(name: &str, kind: NodeKind, parent: Option<&str>) -> Self {
        Self {
            name: name.to_owned(),
            kind,
            parent: parent.map(str::to_owned),
            domain: None,
            bdf: None,
            acs: None,
            link: None,
            bars: Vec::new(),
        }
    }

    /// Sets (or replaces) the parent by name.
    pub fn parent(&mut self, parent: &str) -> &mut Self {
        self.parent = Some(parent.to_owned());
        self
    }

    /// Sets the PCI domain of a host bridge.
    pub fn domain(&mut self, domain: u32) -> &mut Self {
        self.domain = Some(domain);
        self
    }

    /// Sets the BDF of a PCI function.
    pub fn bdf(&mut self, bdf: Bdf) -> &mut Self {
        self.bdf = Some(bdf);
        self
    }

    /// Gives the function an ACS capability with this control register.
    pub fn acs(&mut self, acs: AcsCtrl) -> &mut Self {
        self.acs = Some(acs);
        self
    }

    /// Sets the link to the parent port (validated at build time).
    pub fn link(&mut self, link: LinkSpec) -> &mut Self {
        self.link = Some(link);
        self
    }

    /// Adds a BAR (validated at build time).
    pub fn bar(&mut self, bar: Bar) -> &mut Self {
        self.bars.push(bar);
        self
    }
}

/// Builds a [`Topology`] node by node; [`TopologyBuilder::build`] validates everything at once and names the
/// offending node in its error.
///
/// # Examples
/// ```
/// use peerdma_core::Bdf;
/// use peerdma_pci::{MapType, Topology, WhitelistEntry, p2p_distance};
///
/// let mut b = Topology::builder();
/// b.host_bridge("hb0", WhitelistEntry::NotListed);
/// b.root_port("rp0", "hb0");
/// b.switch_upstream("sw0", "rp0");
/// b.switch_downstream("sw0.d0", "sw0");
/// b.switch_downstream("sw0.d1", "sw0");
/// b.endpoint("nvme0", "sw0.d0", Bdf::new(3, 0, 0).unwrap());
/// b.endpoint("nic0", "sw0.d1", Bdf::new(4, 0, 0).unwrap());
/// let topo = b.build()?;
///
/// let d = p2p_distance(&topo, topo.lookup("nvme0").unwrap(), topo.lookup("nic0").unwrap());
/// assert_eq!((d.map_type, d.distance), (MapType::BusAddr, 4));
/// # Ok::<(), peerdma_pci::Error>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct TopologyBuilder {
    cpu_allows_all_host_bridges: bool,
    nodes: Vec<NodeDecl>,
}

impl TopologyBuilder {
    /// Returns an empty builder (CPU flag off).
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the "CPU allows every host-bridge path" flag (`cpu_supports_p2pdma()`).
    pub fn cpu_allows_all_host_bridges(&mut self, allow: bool) -> &mut Self {
        self.cpu_allows_all_host_bridges = allow;
        self
    }

    fn push(&mut self, decl: NodeDecl) -> &mut NodeDecl {
        self.nodes.push(decl);
        self.nodes.last_mut().expect("just pushed")
    }

    /// Declares a socket.
    pub fn socket(&mut self, name: &str) -> &mut NodeDecl {
        self.push(NodeDecl::new(name, NodeKind::Socket, None))
    }

    /// Declares a host bridge in PCI domain 0 with no socket (set them with [`NodeDecl::domain`] and
    /// [`NodeDecl::parent`]).
    pub fn host_bridge(&mut self, name: &str, whitelist: WhitelistEntry) -> &mut NodeDecl {
        let kind = NodeKind::HostBridge(HostBridge {
            whitelist,
            domain: 0,
        });
        self.push(NodeDecl::new(name, kind, None))
    }

    /// Declares a root port below host bridge `parent`.
    pub fn root_port(&mut self, name: &str, parent: &str) -> &mut NodeDecl {
        self.push(NodeDecl::new(name, NodeKind::RootPort, Some(parent)))
    }

    /// Declares a switch upstream port below root port or downstream port `parent`.
    pub fn switch_upstream(&mut self, name: &str, parent: &str) -> &mut NodeDecl {
        self.push(NodeDecl::new(name, NodeKind::SwitchUpstream, Some(parent)))
    }

    /// Declares a switch downstream port below upstream port `parent`.
    pub fn switch_downstream(&mut self, name: &str, parent: &str) -> &mut NodeDecl {
        self.push(NodeDecl::new(
            name,
            NodeKind::SwitchDownstream,
            Some(parent),
        ))
    }

    /// Declares an endpoint function with `bdf` below `parent`.
    pub fn endpoint(&mut self, name: &str, parent: &str, bdf: Bdf) -> &mut NodeDecl {
        let mut decl = NodeDecl::new(name, NodeKind::Endpoint, Some(parent));
        decl.bdf = Some(bdf);
        self.push(decl)
    }

    /// Declares a node of any kind with an optional parent (for kinds the other methods do not cover, or to
    /// build an endpoint without a BDF and see it refused).
    pub fn node(&mut self, name: &str, kind: NodeKind, parent: Option<&str>) -> &mut NodeDecl {
        self.push(NodeDecl::new(name, kind, parent))
    }

    /// Declares a non-PCI device (optionally below a socket, endpoint or another non-PCI device).
    pub fn non_pci(&mut self, name: &str, parent: Option<&str>) -> &mut NodeDecl {
        self.push(NodeDecl::new(name, NodeKind::NonPci, parent))
    }

    /// Validates the declarations and returns the topology.
    ///
    /// # Errors
    /// The first problem found, in this order: duplicate names, missing parents, parent cycles, then per node
    /// in declaration order (parent kind, attributes, BDF presence, link, BARs), then duplicate BDFs, then
    /// overlapping BARs. Every error names the node (see the module docs for the rules).
    pub fn build(&self) -> Result<Topology> {
        let names = self.check_names()?;
        let parents = self.resolve_parents(&names)?;
        self.check_cycles(&parents)?;
        let mut links = Vec::with_capacity(self.nodes.len());
        for (i, decl) in self.nodes.iter().enumerate() {
            links.push(self.check_node(decl, parents[i])?);
        }
        let mut topo = self.assemble(names, &parents, links);
        check_bdfs(&topo)?;
        topo.bars_by_start = check_bars(&topo)?;
        Ok(topo)
    }

    fn check_names(&self) -> Result<BTreeMap<String, NodeId>> {
        let mut names = BTreeMap::new();
        for (i, decl) in self.nodes.iter().enumerate() {
            if names
                .insert(decl.name.clone(), NodeId::from_index(i))
                .is_some()
            {
                return Err(Error::DuplicateName {
                    name: decl.name.clone(),
                });
            }
        }
        Ok(names)
    }

    fn resolve_parents(&self, names: &BTreeMap<String, NodeId>) -> Result<Vec<Option<usize>>> {
        self.nodes
            .iter()
            .map(|decl| match &decl.parent {
                None => Ok(None),
                Some(p) => {
                    names
                        .get(p)
                        .map(|id| Some(id.index()))
                        .ok_or_else(|| Error::MissingParent {
                            node: decl.name.clone(),
                            parent: p.clone(),
                        })
                }
            })
            .collect()
    }

    fn check_cycles(&self, parents: &[Option<usize>]) -> Result<()> {
        for (i, decl) in self.nodes.iter().enumerate() {
            let mut cur = parents[i];
            for _ in 0..self.nodes.len() {
                let Some(c) = cur else { break };
                if c == i {
                    return Err(Error::Cycle {
                        node: decl.name.clone(),
                    });
                }
                cur = parents[c];
            }
        }
        Ok(())
    }

    /// Checks one node's parent kind and attributes; returns its validated link.
    fn check_node(&self, decl: &NodeDecl, parent: Option<usize>) -> Result<Option<LinkConfig>> {
        let node = || decl.name.clone();
        let parent_decl = parent.map(|p| &self.nodes[p]);
        let not_allowed = |attribute| Error::AttributeNotAllowed {
            node: node(),
            kind: decl.kind.name(),
            attribute,
        };

        // Parent kind (invariant 2).
        let (accepted, expected): (fn(&NodeKind) -> bool, &'static str) = match decl.kind {
            NodeKind::Socket => (|_| false, "nothing"),
            NodeKind::HostBridge(_) => (|k| *k == NodeKind::Socket, "a socket"),
            NodeKind::RootPort => (|k| matches!(k, NodeKind::HostBridge(_)), "a host bridge"),
            NodeKind::SwitchUpstream => (
                |k| matches!(k, NodeKind::RootPort | NodeKind::SwitchDownstream),
                "a root port or a switch downstream port",
            ),
            NodeKind::SwitchDownstream => {
                (|k| *k == NodeKind::SwitchUpstream, "a switch upstream port")
            }
            NodeKind::Endpoint => (
                |k| {
                    matches!(
                        k,
                        NodeKind::RootPort | NodeKind::SwitchDownstream | NodeKind::HostBridge(_)
                    )
                },
                "a root port, a switch downstream port or a host bridge",
            ),
            NodeKind::NonPci => (
                |k| matches!(k, NodeKind::Socket | NodeKind::Endpoint | NodeKind::NonPci),
                "a socket, an endpoint or a non-PCI device",
            ),
        };
        let parent_optional = matches!(
            decl.kind,
            NodeKind::Socket | NodeKind::HostBridge(_) | NodeKind::NonPci
        );
        match parent_decl {
            None if !parent_optional => {
                return Err(Error::ParentRequired {
                    node: node(),
                    expected,
                });
            }
            Some(_) if decl.kind == NodeKind::Socket => return Err(not_allowed("a parent")),
            Some(p) if p.kind == NodeKind::Endpoint && decl.kind.is_pci_function() => {
                return Err(Error::EndpointAsParent {
                    node: node(),
                    parent: p.name.clone(),
                });
            }
            Some(p) if !accepted(&p.kind) => {
                return Err(Error::BadParent {
                    node: node(),
                    parent: p.name.clone(),
                    parent_kind: p.kind.name(),
                    expected,
                });
            }
            None | Some(_) => {}
        }

        // Attributes.
        let pci = decl.kind.is_pci_function();
        if decl.domain.is_some() && !matches!(decl.kind, NodeKind::HostBridge(_)) {
            return Err(not_allowed("a pci domain"));
        }
        if decl.bdf.is_some() && !pci {
            return Err(not_allowed("a bdf"));
        }
        if decl.acs.is_some() && !pci {
            return Err(not_allowed("acs"));
        }
        if !decl.bars.is_empty() && !pci {
            return Err(not_allowed("bars"));
        }
        if decl.kind == NodeKind::Endpoint && decl.bdf.is_none() {
            return Err(Error::MissingBdf { node: node() });
        }
        let on_physical_link = parent_decl
            .is_some_and(|p| matches!(p.kind, NodeKind::RootPort | NodeKind::SwitchDownstream));
        let link = match &decl.link {
            None => None,
            Some(_) if !on_physical_link => {
                return Err(not_allowed(
                    "a link (only a device below a root port or switch downstream port has one)",
                ));
            }
            Some(spec) => Some(LinkConfig::from_spec(spec).map_err(|e| match e {
                Error::InvalidLink {
                    param,
                    value,
                    expected,
                    ..
                } => Error::InvalidLink {
                    node: Some(node()),
                    param,
                    value,
                    expected,
                },
                other => other,
            })?),
        };

        // BARs, one by one (overlaps are checked globally later).
        for (k, bar) in decl.bars.iter().enumerate() {
            let problem = if decl.bars[..k].iter().any(|b| b.index == bar.index) {
                Err(BarProblem::DuplicateIndex)
            } else {
                bar.check()
            };
            problem.map_err(|problem| Error::InvalidBar {
                node: node(),
                index: bar.index,
                problem,
            })?;
        }
        Ok(link)
    }

    fn assemble(
        &self,
        names: BTreeMap<String, NodeId>,
        parents: &[Option<usize>],
        links: Vec<Option<LinkConfig>>,
    ) -> Topology {
        let mut nodes: Vec<Node> = self
            .nodes
            .iter()
            .zip(links)
            .enumerate()
            .map(|(i, (decl, link))| {
                let kind = match decl.kind {
                    NodeKind::HostBridge(hb) => NodeKind::HostBridge(HostBridge {
                        domain: decl.domain.unwrap_or(hb.domain),
                        ..hb
                    }),
                    k => k,
                };
                Node {
                    name: decl.name.clone(),
                    kind,
                    parent: parents[i].map(NodeId::from_index),
                    children: Vec::new(),
                    bdf: decl.bdf,
                    acs: decl.acs,
                    link,
                    bars: decl.bars.clone(),
                }
            })
            .collect();
        for (i, p) in parents.iter().enumerate() {
            if let Some(p) = *p {
                nodes[p].children.push(NodeId::from_index(i));
            }
        }
        Topology {
            nodes,
            names,
            bars_by_start: BTreeMap::new(),
            cpu_allows_all_host_bridges: self.cpu_allows_all_host_bridges,
        }
    }
}

fn check_bdfs(topo: &Topology) -> Result<()> {
    let mut seen: BTreeMap<(u32, Bdf), NodeId> = BTreeMap::new();
    for id in topo.ids() {
        let Some(bdf) = topo.node(id).bdf else {
            continue;
        };
        let domain = topo
            .domain_of(id)
            .expect("validated: every PCI function is below a host bridge");
        if let Some(&other) = seen.get(&(domain, bdf)) {
            return Err(Error::DuplicateBdf {
                node: topo.name(id).to_owned(),
                other: topo.name(other).to_owned(),
                domain,
                bdf,
            });
        }
        seen.insert((domain, bdf), id);
    }
    Ok(())
}

fn check_bars(topo: &Topology) -> Result<BTreeMap<u64, (NodeId, usize)>> {
    // Sort every BAR by start (ties by declaration order) and sweep, remembering the BAR that reaches
    // furthest so far; report the one declared later as the offender.
    let mut all: Vec<(u64, NodeId, usize)> = Vec::new();
    for (id, node) in topo.nodes() {
        for (pos, bar) in node.bars.iter().enumerate() {
            all.push((bar.phys.raw(), id, pos));
        }
    }
    all.sort_unstable();
    let mut map = BTreeMap::new();
    let mut reach: Option<(u64, NodeId, usize)> = None; // (end, owner, pos)
    for &(start, id, pos) in &all {
        let bar = &topo.node(id).bars[pos];
        let end = bar.phys_range().end.raw();
        if let Some((reach_end, other, other_pos)) = reach
            && start < reach_end
        {
            let (first, first_pos, second, second_pos) =
                if other < id || (other == id && other_pos < pos) {
                    (other, other_pos, id, pos)
                } else {
                    (id, pos, other, other_pos)
                };
            let a = &topo.node(second).bars[second_pos];
            let b = &topo.node(first).bars[first_pos];
            return Err(Error::OverlappingBars {
                node: topo.name(second).to_owned(),
                index: a.index,
                range: a.phys_range(),
                other: topo.name(first).to_owned(),
                other_index: b.index,
                other_range: b.phys_range(),
            });
        }
        if reach.is_none_or(|(reach_end, _, _)| end > reach_end) {
            reach = Some((end, id, pos));
        }
        map.insert(start, (id, pos));
    }
    Ok(map)
}
