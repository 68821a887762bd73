//! `peerdma topo FILE`: the `[topology]` of a scenario as a tree (in the spirit of `lspci -t`) and Linux's
//! P2PDMA decision for every (provider, client) pair of endpoints (`spec/linux-p2p.md` §1.4).
//!
//! A provider is an endpoint with at least one BAR; its clients are every other endpoint. For each pair:
//! the map type, the distance, the path as node names, the bottleneck link and, for NOT_SUPPORTED, why.
//!
//! The bottleneck is the link with the lowest effective write bandwidth at 4 KiB payloads among the links
//! the data crosses: the upstream link of every node on the path, except the common upstream node's on a
//! BUS_ADDR path (the transfer turns around inside that switch and never crosses its upstream link).

use std::fmt::Write as _;

use peerdma_pci::{
    MapType, NodeId, NodeKind, NotSupportedReason, P2pDecision, Topology, WhitelistEntry,
    p2p_distance,
};
use serde_json::json;

use crate::link::{link_json, link_name};

/// The payload size the bottleneck is measured at.
const BOTTLENECK_PAYLOAD: u64 = 4096;

/// One (provider, client) pair and its decision.
#[derive(Debug)]
struct Pair {
    provider: NodeId,
    client: NodeId,
    decision: P2pDecision,
    /// The node whose upstream link is the bottleneck, with its write bandwidth at 4 KiB.
    bottleneck: Option<(NodeId, f64)>,
}

fn pairs(topo: &Topology) -> Vec<Pair> {
    let endpoints: Vec<NodeId> = topo.endpoints().collect();
    let mut out = Vec::new();
    for &provider in &endpoints {
        if topo.node(provider).bars().is_empty() {
            continue;
        }
        for &client in endpoints.iter().filter(|&&c| c != provider) {
            let decision = p2p_distance(topo, provider, client);
            let bottleneck = bottleneck(topo, &decision);
            out.push(Pair {
                provider,
                client,
                decision,
                bottleneck,
            });
        }
    }
    out
}

fn bottleneck(topo: &Topology, d: &P2pDecision) -> Option<(NodeId, f64)> {
    let turnaround = (d.map_type == MapType::BusAddr)
        .then_some(d.common_upstream)
        .flatten();
    d.path
        .iter()
        .filter(|&&n| Some(n) != turnaround)
        .filter_map(|&n| {
            topo.node(n)
                .link()
                .map(|l| (n, l.effective_write_gbps(BOTTLENECK_PAYLOAD)))
        })
        .fold(None, |best: Option<(NodeId, f64)>, (n, gbps)| match best {
            Some((_, b)) if b <= gbps => best,
            _ => Some((n, gbps)),
        })
}

fn names(topo: &Topology, ids: &[NodeId]) -> Vec<String> {
    ids.iter().map(|&n| topo.name(n).to_owned()).collect()
}

/// Why a pair is NOT_SUPPORTED, in words.
fn reason_text(topo: &Topology, d: &P2pDecision) -> Option<String> {
    let reason = d.reason?;
    let mut text = String::new();
    if !d.acs_redirects.is_empty() {
        let _ = write!(
            text,
            "ACS redirect at {} forces the host bridge; ",
            names(topo, &d.acs_redirects).join(", ")
        );
    }
    match reason {
        NotSupportedReason::NotPciDevice { node } => {
            let _ = write!(text, "`{}` is not a PCI device", topo.name(node));
        }
        NotSupportedReason::HostBridgeNotWhitelisted { host_bridge } => {
            let _ = write!(
                text,
                "host bridge `{}` is not in the P2PDMA whitelist",
                topo.name(host_bridge)
            );
        }
        NotSupportedReason::CrossHostBridgeRestricted { host_bridge } => {
            let _ = write!(
                text,
                "host bridge `{}` is whitelisted for same-host-bridge paths only",
                topo.name(host_bridge)
            );
        }
    }
    Some(text)
}

/// Why a supported pair goes through the host bridge, in words.
fn via_text(topo: &Topology, d: &P2pDecision) -> Option<String> {
    if d.map_type != MapType::ThruHostBridge {
        return None;
    }
    Some(if d.acs_redirects.is_empty() {
        "no common upstream bridge".to_owned()
    } else {
        format!(
            "ACS redirect at {}",
            names(topo, &d.acs_redirects).join(", ")
        )
    })
}

fn reason_kind(reason: NotSupportedReason) -> &'static str {
    match reason {
        NotSupportedReason::NotPciDevice { .. } => "not-pci-device",
        NotSupportedReason::HostBridgeNotWhitelisted { .. } => "host-bridge-not-whitelisted",
        NotSupportedReason::CrossHostBridgeRestricted { .. } => "cross-host-bridge-restricted",
    }
}

fn whitelist_name(w: WhitelistEntry) -> &'static str {
    match w {
        WhitelistEntry::NotListed => "not-listed",
        WhitelistEntry::SameHostBridgeOnly => "same-host-bridge-only",
        WhitelistEntry::Unrestricted => "unrestricted",
    }
}

/// Returns `16MiB` for 16 << 20.
fn size_text(bytes: u64) -> String {
    for (unit, shift) in [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    format!("{bytes}B")
}

/// The bracketed description of a node in the tree.
fn node_label(topo: &Topology, id: NodeId) -> String {
    let node = topo.node(id);
    let mut attrs = vec![node.kind().name().to_owned()];
    if let Some(bdf) = node.bdf() {
        attrs.push(bdf.to_string());
    }
    if let Some(hb) = node.host_bridge() {
        attrs.push(format!("domain {:04x}", hb.domain));
        attrs.push(format!("whitelist {}", whitelist_name(hb.whitelist)));
    }
    if let Some(link) = node.link() {
        attrs.push(format!(
            "{} {:.2} Gb/s",
            link_name(link),
            link.effective_write_gbps(BOTTLENECK_PAYLOAD)
        ));
    }
    if let Some(acs) = node.acs() {
        let bits: Vec<&str> = [("RR", acs.rr), ("CR", acs.cr), ("EC", acs.ec)]
            .iter()
            .filter(|(_, on)| *on)
            .map(|(n, _)| *n)
            .collect();
        attrs.push(if bits.is_empty() {
            "ACS".to_owned()
        } else {
            format!("ACS {}", bits.join("+"))
        });
    }
    for bar in node.bars() {
        attrs.push(format!(
            "BAR{} {} @ {:#x}",
            bar.index,
            size_text(bar.size),
            bar.phys.raw()
        ));
    }
    format!("{} [{}]", node.name(), attrs.join(", "))
}

fn tree(topo: &Topology, out: &mut String) {
    fn walk(topo: &Topology, id: NodeId, prefix: &str, last: bool, root: bool, out: &mut String) {
        let (branch, next) = match (root, last) {
            (true, _) => ("", String::new()),
            (false, true) => ("\\-", format!("{prefix}  ")),
            (false, false) => ("+-", format!("{prefix}| ")),
        };
        let _ = writeln!(out, "{prefix}{branch}{}", node_label(topo, id));
        let children = topo.node(id).children();
        for (i, &c) in children.iter().enumerate() {
            walk(topo, c, &next, i + 1 == children.len(), false, out);
        }
    }
    for (id, node) in topo.nodes() {
        if node.parent().is_none() {
            walk(topo, id, "", true, true, out);
        }
    }
}

/// Returns the text report of `topo`.
pub(crate) fn render_text(path: &str, topo: &Topology) -> String {
    let mut out = format!("topology of {path}");
    if topo.cpu_allows_all_host_bridges() {
        out.push_str(" (the CPU allows every host-bridge path)");
    }
    out.push_str(":\n");
    tree(topo, &mut out);
    let pairs = pairs(topo);
    out.push('\n');
    if pairs.is_empty() {
        out.push_str(
            "no (provider, client) pair: no endpoint has a BAR, or there is only one endpoint\n",
        );
        return out;
    }
    let header = [
        "provider",
        "client",
        "map type",
        "distance",
        "bottleneck (write @ 4KiB)",
        "path",
        "why",
    ];
    let rows: Vec<[String; 7]> = pairs
        .iter()
        .map(|p| {
            let d = &p.decision;
            let path = if d.path.is_empty() {
                "-".to_owned()
            } else {
                names(topo, &d.path).join(" -> ")
            };
            let bottleneck = p.bottleneck.map_or_else(
                || "-".to_owned(),
                |(n, gbps)| {
                    let link = topo.node(n).link().map(link_name).unwrap_or_default();
                    format!("{} {link} {gbps:.2} Gb/s", topo.name(n))
                },
            );
            let why = reason_text(topo, d)
                .or_else(|| via_text(topo, d))
                .unwrap_or_else(|| "-".to_owned());
            [
                topo.name(p.provider).to_owned(),
                topo.name(p.client).to_owned(),
                d.map_type.to_string(),
                d.distance.to_string(),
                bottleneck,
                path,
                why,
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[&str]| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else if i == 3 {
                let _ = write!(l, "{cell:>w$}  ");
            } else {
                let _ = write!(l, "{cell:<w$}  ");
            }
        }
        l.trim_end().to_owned()
    };
    let _ = writeln!(out, "{}", line(&header));
    for row in &rows {
        let cells: Vec<&str> = row.iter().map(String::as_str).collect();
        let _ = writeln!(out, "{}", line(&cells));
    }
    out
}

/// Returns the JSON report of `topo`.
pub(crate) fn render_json(path: &str, topo: &Topology) -> String {
    let nodes: Vec<_> = topo
        .nodes()
        .map(|(_, n)| {
            let bars: Vec<_> = n
                .bars()
                .iter()
                .map(|b| {
                    json!({
                        "index": b.index,
                        "size": b.size,
                        "phys": b.phys.raw(),
                        "bus_offset": b.bus_offset,
                        "prefetchable": b.prefetchable,
                    })
                })
                .collect();
            let kind = match n.kind() {
                NodeKind::HostBridge(_) => "host_bridge",
                NodeKind::Socket => "socket",
                NodeKind::RootPort => "root_port",
                NodeKind::SwitchUpstream => "switch_upstream",
                NodeKind::SwitchDownstream => "switch_downstream",
                NodeKind::Endpoint => "endpoint",
                NodeKind::NonPci => "non_pci",
            };
            json!({
                "name": n.name(),
                "kind": kind,
                "parent": n.parent().map(|p| topo.name(p)),
                "bdf": n.bdf().map(|b| b.to_string()),
                "whitelist": n.host_bridge().map(|hb| whitelist_name(hb.whitelist)),
                "acs_redirects": n.acs_redirects(),
                "link": n.link().map(link_json),
                "bars": bars,
            })
        })
        .collect();
    let pairs: Vec<_> = pairs(topo)
        .iter()
        .map(|p| {
            let d = &p.decision;
            let reason = d.reason.map(|r| {
                let host_bridge = match r {
                    NotSupportedReason::HostBridgeNotWhitelisted { host_bridge }
                    | NotSupportedReason::CrossHostBridgeRestricted { host_bridge } => {
                        Some(topo.name(host_bridge))
                    }
                    NotSupportedReason::NotPciDevice { .. } => None,
                };
                json!({
                    "kind": reason_kind(r),
                    "host_bridge": host_bridge,
                    "acs_redirects": names(topo, &d.acs_redirects),
                    "text": reason_text(topo, d),
                })
            });
            let bottleneck = p.bottleneck.map(|(n, gbps)| {
                json!({
                    "node": topo.name(n),
                    "link": topo.node(n).link().map(link_name),
                    "write_gbps": gbps,
                })
            });
            json!({
                "provider": topo.name(p.provider),
                "client": topo.name(p.client),
                "map_type": d.map_type.to_string(),
                "distance": d.distance,
                "path": names(topo, &d.path),
                "common_upstream": d.common_upstream.map(|n| topo.name(n)),
                "acs_redirects": names(topo, &d.acs_redirects),
                "bottleneck": bottleneck,
                "reason": reason,
            })
        })
        .collect();
    let v = json!({
        "file": path,
        "cpu_allows_all_host_bridges": topo.cpu_allows_all_host_bridges(),
        "nodes": nodes,
        "pairs": pairs,
    });
    format!("{v:#}\n")
}
