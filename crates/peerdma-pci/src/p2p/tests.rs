//! Tests of the P2PDMA decision (`spec/linux-p2p.md` §1.4 decision table, §1.5 orchestrators, §8 cache).

use peerdma_core::Bdf;

use super::*;
use crate::topology::{AcsCtrl, TopologyBuilder};

use WhitelistEntry::{NotListed as NL, SameHostBridgeOnly as SAME, Unrestricted as ANY};

fn bdf(bus: u8, dev: u8, func: u8) -> Bdf {
    Bdf::new(bus, dev, func).unwrap()
}

/// The fixture, by socket:
/// ```text
/// s0 ─ hb0 ─┬ rp0 ─ sw0 ─┬ d0 ─ a
///           │            ├ d1 ─ b
///           │            ├ d2 ─ sw1 ─ d0 ─ c
///           │            ├ d3 ─ sw2 ─ d0 ─ d
///           │            └ d4 ─ g
///           ├ rp1 ─ e, e1 (two functions of one device)
///           └ rcie (root-complex integrated endpoint)
/// s0 ─ hb2 (unrestricted, domain 1) ─ rp3 ─ h
/// s1 ─ hb1 ─ rp2 ─ f
/// ib0: non-PCI child of a; plat0: non-PCI device on s0
/// ```
fn fixture(hb0: WhitelistEntry, hb1: WhitelistEntry, cpu: bool) -> Topology {
    let mut b = TopologyBuilder::new();
    b.cpu_allows_all_host_bridges(cpu);
    b.socket("s0");
    b.socket("s1");
    b.host_bridge("hb0", hb0).parent("s0");
    b.host_bridge("hb1", hb1).parent("s1");
    b.host_bridge("hb2", ANY).parent("s0").domain(1);
    b.root_port("rp0", "hb0").bdf(bdf(0, 1, 0));
    b.switch_upstream("sw0", "rp0").bdf(bdf(1, 0, 0));
    for i in 0..5u8 {
        b.switch_downstream(&format!("sw0.d{i}"), "sw0")
            .bdf(bdf(2, i, 0));
    }
    b.endpoint("a", "sw0.d0", bdf(3, 0, 0));
    b.endpoint("b", "sw0.d1", bdf(4, 0, 0));
    b.switch_upstream("sw1", "sw0.d2").bdf(bdf(5, 0, 0));
    b.switch_downstream("sw1.d0", "sw1").bdf(bdf(6, 0, 0));
    b.endpoint("c", "sw1.d0", bdf(7, 0, 0));
    b.switch_upstream("sw2", "sw0.d3").bdf(bdf(8, 0, 0));
    b.switch_downstream("sw2.d0", "sw2").bdf(bdf(9, 0, 0));
    b.endpoint("d", "sw2.d0", bdf(0xa, 0, 0));
    b.endpoint("g", "sw0.d4", bdf(0xb, 0, 0));
    b.root_port("rp1", "hb0").bdf(bdf(0, 2, 0));
    b.endpoint("e", "rp1", bdf(0x10, 0, 0));
    b.endpoint("e1", "rp1", bdf(0x10, 0, 1));
    b.endpoint("rcie", "hb0", bdf(0, 0x1f, 0));
    b.root_port("rp2", "hb1").bdf(bdf(0x80, 1, 0));
    b.endpoint("f", "rp2", bdf(0x81, 0, 0));
    b.root_port("rp3", "hb2").bdf(bdf(0, 1, 0));
    b.endpoint("h", "rp3", bdf(1, 0, 0));
    b.non_pci("ib0", Some("a"));
    b.non_pci("plat0", Some("s0"));
    b.build().unwrap()
}

fn id(topo: &Topology, name: &str) -> NodeId {
    topo.lookup(name)
        .unwrap_or_else(|| panic!("no node {name}"))
}

fn names(topo: &Topology, ids: &[NodeId]) -> Vec<String> {
    ids.iter().map(|&i| topo.name(i).to_owned()).collect()
}

#[derive(Clone, Copy, Debug)]
enum Why {
    NotPci,
    NotListed,
    CrossHost,
}

fn why(topo: &Topology, reason: Option<NotSupportedReason>) -> Option<(String, String)> {
    reason.map(|r| {
        let (w, n) = match r {
            NotSupportedReason::NotPciDevice { node } => (Why::NotPci, node),
            NotSupportedReason::HostBridgeNotWhitelisted { host_bridge } => {
                (Why::NotListed, host_bridge)
            }
            NotSupportedReason::CrossHostBridgeRestricted { host_bridge } => {
                (Why::CrossHost, host_bridge)
            }
        };
        (format!("{w:?}"), topo.name(n).to_owned())
    })
}

struct Row {
    case: &'static str,
    hb0: WhitelistEntry,
    hb1: WhitelistEntry,
    cpu: bool,
    acs: &'static [(&'static str, AcsCtrl)],
    provider: &'static str,
    client: &'static str,
    map: MapType,
    distance: u32,
    reason: Option<(Why, &'static str)>,
    acs_redirects: &'static [&'static str],
}

const NO_ACS: &[(&str, AcsCtrl)] = &[];
const ACS_ALL: AcsCtrl = AcsCtrl {
    rr: true,
    cr: true,
    ec: true,
};
const ACS_NONE_SET: AcsCtrl = AcsCtrl {
    rr: false,
    cr: false,
    ec: false,
};

#[rustfmt::skip]
const ROWS: &[Row] = &[
    // Common upstream bridge, no ACS on the checked path: BUS_ADDR, distance = steps(P→CA) + steps(C→CA).
    Row { case: "same switch", hb0: NL, hb1: NL, cpu: false, acs: NO_ACS, provider: "a", client: "b",
          map: MapType::BusAddr, distance: 4, reason: None, acs_redirects: &[] },
    Row { case: "same switch, reversed", hb0: NL, hb1: NL, cpu: false, acs: NO_ACS, provider: "b", client: "a",
          map: MapType::BusAddr, distance: 4, reason: None, acs_redirects: &[] },
    Row { case: "provider is the client", hb0: NL, hb1: NL, cpu: false, acs: NO_ACS, provider: "a", client: "a",
          map: MapType::BusAddr, distance: 0, reason: None, acs_redirects: &[] },
    Row { case: "two functions of one device", hb0: NL, hb1: NL, cpu: false, acs: NO_ACS, provider: "e",
          client: "e1", map: MapType::BusAddr, distance: 2, reason: None, acs_redirects: &[] },
    Row { case: "switch and nested switch", hb0: NL, hb1: NL, cpu: false, acs: NO_ACS, provider: "a",
          client: "c", map: MapType::BusAddr, distance: 6, reason: None, acs_redirects: &[] },
    Row { case: "different switches under one root port", hb0: NL, hb1: NL, cpu: false, acs: NO_ACS,
          provider: "c", client: "d", map: MapType::BusAddr, distance: 8, reason: None, acs_redirects: &[] },
    // No common upstream bridge, one host bridge: distance = len(P chain) + len(C chain); whitelist decides.
    Row { case: "different root ports, not whitelisted", hb0: NL, hb1: NL, cpu: false, acs: NO_ACS,
          provider: "a", client: "e", map: MapType::NotSupported, distance: 6,
          reason: Some((Why::NotListed, "hb0")), acs_redirects: &[] },
    Row { case: "different root ports, same-host-bridge entry", hb0: SAME, hb1: NL, cpu: false, acs: NO_ACS,
          provider: "a", client: "e", map: MapType::ThruHostBridge, distance: 6, reason: None, acs_redirects: &[] },
    Row { case: "different root ports, unrestricted entry", hb0: ANY, hb1: NL, cpu: false, acs: NO_ACS,
          provider: "a", client: "e", map: MapType::ThruHostBridge, distance: 6, reason: None, acs_redirects: &[] },
    Row { case: "different root ports, cpu flag", hb0: NL, hb1: NL, cpu: true, acs: NO_ACS,
          provider: "a", client: "e", map: MapType::ThruHostBridge, distance: 6, reason: None, acs_redirects: &[] },
    Row { case: "root-complex integrated endpoint", hb0: ANY, hb1: NL, cpu: false, acs: NO_ACS,
          provider: "a", client: "rcie", map: MapType::ThruHostBridge, distance: 5, reason: None,
          acs_redirects: &[] },
    // Across host bridges.
    Row { case: "across host bridges, both unrestricted", hb0: ANY, hb1: ANY, cpu: false, acs: NO_ACS,
          provider: "a", client: "f", map: MapType::ThruHostBridge, distance: 6, reason: None, acs_redirects: &[] },
    Row { case: "across host bridges, client's not whitelisted", hb0: ANY, hb1: NL, cpu: false, acs: NO_ACS,
          provider: "a", client: "f", map: MapType::NotSupported, distance: 6,
          reason: Some((Why::NotListed, "hb1")), acs_redirects: &[] },
    Row { case: "across host bridges, neither whitelisted", hb0: NL, hb1: NL, cpu: false, acs: NO_ACS,
          provider: "a", client: "f", map: MapType::NotSupported, distance: 6,
          reason: Some((Why::NotListed, "hb0")), acs_redirects: &[] },
    Row { case: "across host bridges, provider's entry requires same host bridge", hb0: SAME, hb1: ANY,
          cpu: false, acs: NO_ACS, provider: "a", client: "f", map: MapType::NotSupported, distance: 6,
          reason: Some((Why::CrossHost, "hb0")), acs_redirects: &[] },
    Row { case: "across host bridges, client's entry requires same host bridge", hb0: ANY, hb1: SAME,
          cpu: false, acs: NO_ACS, provider: "a", client: "f", map: MapType::NotSupported, distance: 6,
          reason: Some((Why::CrossHost, "hb1")), acs_redirects: &[] },
    Row { case: "across host bridges, cpu flag", hb0: NL, hb1: NL, cpu: true, acs: NO_ACS,
          provider: "a", client: "f", map: MapType::ThruHostBridge, distance: 6, reason: None, acs_redirects: &[] },
    Row { case: "across host bridges on one socket", hb0: ANY, hb1: NL, cpu: false, acs: NO_ACS,
          provider: "a", client: "h", map: MapType::ThruHostBridge, distance: 6, reason: None, acs_redirects: &[] },
    // ACS redirect on the checked path turns BUS_ADDR into a host-bridge attempt (same distance).
    Row { case: "RR on provider's downstream port, not whitelisted", hb0: NL, hb1: NL, cpu: false,
          acs: &[("sw0.d0", AcsCtrl::RR)], provider: "a", client: "b", map: MapType::NotSupported, distance: 4,
          reason: Some((Why::NotListed, "hb0")), acs_redirects: &["sw0.d0"] },
    Row { case: "RR on provider's downstream port, whitelisted", hb0: ANY, hb1: NL, cpu: false,
          acs: &[("sw0.d0", AcsCtrl::RR)], provider: "a", client: "b", map: MapType::ThruHostBridge, distance: 4,
          reason: None, acs_redirects: &["sw0.d0"] },
    Row { case: "RR on provider's downstream port, same-host-bridge entry", hb0: SAME, hb1: NL, cpu: false,
          acs: &[("sw0.d0", AcsCtrl::RR)], provider: "a", client: "b", map: MapType::ThruHostBridge, distance: 4,
          reason: None, acs_redirects: &["sw0.d0"] },
    Row { case: "RR on provider's downstream port, cpu flag", hb0: NL, hb1: NL, cpu: true,
          acs: &[("sw0.d0", AcsCtrl::RR)], provider: "a", client: "b", map: MapType::ThruHostBridge, distance: 4,
          reason: None, acs_redirects: &["sw0.d0"] },
    Row { case: "CR on client's downstream port, not whitelisted", hb0: NL, hb1: NL, cpu: false,
          acs: &[("sw0.d1", AcsCtrl::CR)], provider: "a", client: "b", map: MapType::NotSupported, distance: 4,
          reason: Some((Why::NotListed, "hb0")), acs_redirects: &["sw0.d1"] },
    Row { case: "RR+CR+EC on both downstream ports, whitelisted", hb0: ANY, hb1: NL, cpu: false,
          acs: &[("sw0.d0", ACS_ALL), ("sw0.d1", ACS_ALL)], provider: "a", client: "b",
          map: MapType::ThruHostBridge, distance: 4, reason: None, acs_redirects: &["sw0.d0", "sw0.d1"] },
    Row { case: "EC on the common upstream port counts (provider side includes it)", hb0: ANY, hb1: NL,
          cpu: false, acs: &[("sw0", AcsCtrl::EC)], provider: "a", client: "b", map: MapType::ThruHostBridge,
          distance: 4, reason: None, acs_redirects: &["sw0"] },
    Row { case: "EC on the common upstream port, reversed, not whitelisted", hb0: NL, hb1: NL, cpu: false,
          acs: &[("sw0", AcsCtrl::EC)], provider: "b", client: "a", map: MapType::NotSupported, distance: 4,
          reason: Some((Why::NotListed, "hb0")), acs_redirects: &["sw0"] },
    Row { case: "RR above the common upstream port is not checked", hb0: NL, hb1: NL, cpu: false,
          acs: &[("rp0", AcsCtrl::RR)], provider: "a", client: "b", map: MapType::BusAddr, distance: 4,
          reason: None, acs_redirects: &[] },
    Row { case: "ACS capability with no bit set", hb0: NL, hb1: NL, cpu: false,
          acs: &[("sw0.d0", ACS_NONE_SET)], provider: "a", client: "b", map: MapType::BusAddr, distance: 4,
          reason: None, acs_redirects: &[] },
    Row { case: "RR on the provider endpoint itself", hb0: NL, hb1: NL, cpu: false,
          acs: &[("a", AcsCtrl::RR)], provider: "a", client: "b", map: MapType::NotSupported, distance: 4,
          reason: Some((Why::NotListed, "hb0")), acs_redirects: &["a"] },
    Row { case: "RR on the client endpoint itself", hb0: ANY, hb1: NL, cpu: false,
          acs: &[("b", AcsCtrl::RR)], provider: "a", client: "b", map: MapType::ThruHostBridge, distance: 4,
          reason: None, acs_redirects: &["b"] },
    Row { case: "provider is the client, with ACS on it", hb0: ANY, hb1: NL, cpu: false,
          acs: &[("a", AcsCtrl::RR)], provider: "a", client: "a", map: MapType::ThruHostBridge, distance: 0,
          reason: None, acs_redirects: &["a"] },
    Row { case: "RR in a nested switch below the common port", hb0: ANY, hb1: NL, cpu: false,
          acs: &[("sw1.d0", AcsCtrl::RR)], provider: "a", client: "c", map: MapType::ThruHostBridge,
          distance: 6, reason: None, acs_redirects: &["sw1.d0"] },
    Row { case: "ACS is ignored without a common upstream bridge", hb0: SAME, hb1: NL, cpu: false,
          acs: &[("sw0.d0", AcsCtrl::RR), ("rp1", AcsCtrl::RR), ("e", AcsCtrl::CR)], provider: "a",
          client: "e", map: MapType::ThruHostBridge, distance: 6, reason: None, acs_redirects: &[] },
    // Not PCI devices.
    Row { case: "client is a non-PCI child device", hb0: ANY, hb1: ANY, cpu: true, acs: NO_ACS,
          provider: "a", client: "ib0", map: MapType::NotSupported, distance: 0,
          reason: Some((Why::NotPci, "ib0")), acs_redirects: &[] },
    Row { case: "client is a platform device under no host bridge", hb0: ANY, hb1: ANY, cpu: true,
          acs: NO_ACS, provider: "b", client: "plat0", map: MapType::NotSupported, distance: 0,
          reason: Some((Why::NotPci, "plat0")), acs_redirects: &[] },
    Row { case: "client is a host bridge", hb0: ANY, hb1: ANY, cpu: true, acs: NO_ACS,
          provider: "b", client: "hb0", map: MapType::NotSupported, distance: 0,
          reason: Some((Why::NotPci, "hb0")), acs_redirects: &[] },
    Row { case: "provider is not a PCI device", hb0: ANY, hb1: ANY, cpu: true, acs: NO_ACS,
          provider: "plat0", client: "a", map: MapType::NotSupported, distance: 0,
          reason: Some((Why::NotPci, "plat0")), acs_redirects: &[] },
];

#[test]
fn decision_table_of_spec_1_4_holds_row_by_row() {
    for row in ROWS {
        let mut topo = fixture(row.hb0, row.hb1, row.cpu);
        for &(name, acs) in row.acs {
            topo.set_acs(id(&topo, name), Some(acs)).unwrap();
        }
        let d = p2p_distance(&topo, id(&topo, row.provider), id(&topo, row.client));
        assert_eq!(d.map_type, row.map, "{}", row.case);
        assert_eq!(d.distance, row.distance, "{}", row.case);
        let want_reason = row.reason.map(|(w, n)| (format!("{w:?}"), n.to_owned()));
        assert_eq!(why(&topo, d.reason), want_reason, "{}", row.case);
        assert_eq!(
            names(&topo, &d.acs_redirects),
            row.acs_redirects,
            "{}",
            row.case
        );
        assert_eq!(
            d.path.is_empty(),
            row.map == MapType::NotSupported,
            "{}: path {:?}",
            row.case,
            names(&topo, &d.path)
        );
    }
}

#[test]
fn bus_addr_path_stays_below_the_common_upstream_port() {
    let topo = fixture(NL, NL, false);
    let d = p2p_distance(&topo, id(&topo, "a"), id(&topo, "c"));
    assert_eq!(
        names(&topo, &d.path),
        ["a", "sw0.d0", "sw0", "sw0.d2", "sw1", "sw1.d0", "c"]
    );
    assert_eq!(d.common_upstream, Some(id(&topo, "sw0")));
    let same = p2p_distance(&topo, id(&topo, "a"), id(&topo, "a"));
    assert_eq!(names(&topo, &same.path), ["a"]);
}

#[test]
fn host_bridge_path_goes_through_the_root_complex() {
    let topo = fixture(ANY, ANY, false);
    let d = p2p_distance(&topo, id(&topo, "a"), id(&topo, "e"));
    assert_eq!(
        names(&topo, &d.path),
        ["a", "sw0.d0", "sw0", "rp0", "hb0", "rp1", "e"]
    );
    assert_eq!(d.common_upstream, None);
}

#[test]
fn cross_socket_path_names_both_sockets_and_host_bridges() {
    let topo = fixture(ANY, ANY, false);
    let d = p2p_distance(&topo, id(&topo, "a"), id(&topo, "f"));
    assert_eq!(
        names(&topo, &d.path),
        [
            "a", "sw0.d0", "sw0", "rp0", "hb0", "s0", "s1", "hb1", "rp2", "f"
        ]
    );
    let d = p2p_distance(&topo, id(&topo, "a"), id(&topo, "h"));
    assert_eq!(
        names(&topo, &d.path),
        ["a", "sw0.d0", "sw0", "rp0", "hb0", "s0", "hb2", "rp3", "h"]
    );
}

#[test]
fn acs_redirect_route_crosses_the_switch_twice() {
    let mut topo = fixture(ANY, NL, false);
    topo.set_acs(id(&topo, "sw0.d0"), Some(AcsCtrl::RR))
        .unwrap();
    let d = p2p_distance(&topo, id(&topo, "a"), id(&topo, "b"));
    assert_eq!(d.map_type, MapType::ThruHostBridge);
    assert_eq!(
        names(&topo, &d.path),
        [
            "a", "sw0.d0", "sw0", "rp0", "hb0", "rp0", "sw0", "sw0.d1", "b"
        ]
    );
    assert_eq!(d.common_upstream, Some(id(&topo, "sw0")));
}

#[test]
fn cache_answers_from_the_first_computation_even_after_acs_changes() {
    // spec/linux-p2p.md §8: the map-type cache is never invalidated.
    let mut topo = fixture(NL, NL, false);
    let (a, b) = (id(&topo, "a"), id(&topo, "b"));
    let mut cache = P2pCache::new();
    assert_eq!(cache.cached(a, b), None);
    assert_eq!(cache.map_type(&topo, a, b), MapType::BusAddr);
    assert_eq!(cache.cached(a, b), Some(MapType::BusAddr));

    topo.set_acs(id(&topo, "sw0.d0"), Some(AcsCtrl::RR))
        .unwrap();
    assert_eq!(
        cache.map_type(&topo, a, b),
        MapType::BusAddr,
        "stale by design"
    );
    assert_eq!(p2p_distance(&topo, a, b).map_type, MapType::NotSupported);

    // A fresh computation (what distance_many does) overwrites the entry.
    cache.compute(&topo, a, b);
    assert_eq!(cache.map_type(&topo, a, b), MapType::NotSupported);
}

#[test]
fn cache_refuses_non_pci_clients_without_storing() {
    let topo = fixture(ANY, ANY, true);
    let mut cache = P2pCache::new();
    assert_eq!(
        cache.map_type(&topo, id(&topo, "a"), id(&topo, "ib0")),
        MapType::NotSupported
    );
    assert!(cache.is_empty());
}

#[test]
fn forgetting_a_provider_drops_only_its_entries() {
    let topo = fixture(NL, NL, false);
    let (a, b, c) = (id(&topo, "a"), id(&topo, "b"), id(&topo, "c"));
    let mut cache = P2pCache::new();
    cache.map_type(&topo, a, b);
    cache.map_type(&topo, a, c);
    cache.map_type(&topo, b, a);
    cache.forget_provider(a);
    assert_eq!(cache.len(), 1);
    assert_eq!(cache.cached(b, a), Some(MapType::BusAddr));
}

#[test]
fn distance_many_sums_and_walks_to_the_pci_parent() {
    let topo = fixture(NL, NL, false);
    let mut cache = P2pCache::new();
    let (a, b, c) = (id(&topo, "a"), id(&topo, "b"), id(&topo, "c"));
    assert_eq!(distance_many(&topo, &mut cache, b, &[a, c]), Some(4 + 6));
    // ib0 is a child device of a: the kernel walks dev->parent to the PCI function.
    assert_eq!(
        distance_many(&topo, &mut cache, b, &[id(&topo, "ib0")]),
        Some(4)
    );
    assert_eq!(cache.cached(b, a), Some(MapType::BusAddr));
}

#[test]
fn distance_many_fails_like_the_kernel() {
    let topo = fixture(NL, NL, false);
    let mut cache = P2pCache::new();
    let (a, b, e) = (id(&topo, "a"), id(&topo, "b"), id(&topo, "e"));
    assert_eq!(distance_many(&topo, &mut cache, a, &[]), None, "no clients");
    assert_eq!(
        distance_many(&topo, &mut cache, a, &[id(&topo, "plat0")]),
        None,
        "no PCI device above the client"
    );
    assert_eq!(
        distance_many(&topo, &mut cache, a, &[b, e]),
        None,
        "one client NOT_SUPPORTED"
    );
    assert_eq!(cache.cached(a, e), Some(MapType::NotSupported));
}

#[test]
fn distance_many_counts_host_bridge_clients() {
    let topo = fixture(ANY, NL, false);
    let mut cache = P2pCache::new();
    let (a, b, e) = (id(&topo, "a"), id(&topo, "b"), id(&topo, "e"));
    assert_eq!(distance_many(&topo, &mut cache, a, &[b, e]), Some(4 + 6));
}

#[test]
fn find_many_picks_the_nearest_provider() {
    let topo = fixture(NL, NL, false);
    let mut cache = P2pCache::new();
    let providers = [id(&topo, "e"), id(&topo, "c"), id(&topo, "b")];
    let mut calls = Vec::new();
    let got = find_many(&topo, &mut cache, &providers, &[id(&topo, "a")], |n| {
        calls.push(n);
        0
    });
    assert_eq!(got, Some(id(&topo, "b")));
    assert_eq!(
        calls,
        [1],
        "the kernel draws a random index even for one candidate"
    );
}

#[test]
fn find_many_breaks_ties_with_the_caller_rng() {
    let topo = fixture(NL, NL, false);
    let mut cache = P2pCache::new();
    let providers = [id(&topo, "b"), id(&topo, "c"), id(&topo, "g")];
    let a = id(&topo, "a");
    let mut seen = Vec::new();
    let first = find_many(&topo, &mut cache, &providers, &[a], |n| {
        seen.push(n);
        0
    });
    let second = find_many(&topo, &mut cache, &providers, &[a], |_| 1);
    let wrapped = find_many(&topo, &mut cache, &providers, &[a], |_| 3);
    assert_eq!(seen, [2]);
    assert_eq!(first, Some(id(&topo, "b")));
    assert_eq!(second, Some(id(&topo, "g")));
    assert_eq!(wrapped, Some(id(&topo, "g")), "3 mod 2 = 1");
}

#[test]
fn find_many_prefers_a_provider_that_is_also_a_client() {
    let topo = fixture(NL, NL, false);
    let mut cache = P2pCache::new();
    let (a, b, c) = (id(&topo, "a"), id(&topo, "b"), id(&topo, "c"));
    let got = find_many(&topo, &mut cache, &[c, a], &[a, b], |_| 0);
    assert_eq!(got, Some(a), "a: 0 + 4, c: 6 + 6");
}

#[test]
fn find_many_returns_none_when_no_provider_reaches_every_client() {
    let topo = fixture(NL, NL, false);
    let mut cache = P2pCache::new();
    let providers = [id(&topo, "a"), id(&topo, "b")];
    let got = find_many(&topo, &mut cache, &providers, &[id(&topo, "f")], |_| {
        panic!("no candidate, no draw")
    });
    assert_eq!(got, None);
}

#[test]
fn map_type_prints_and_numbers_like_the_kernel() {
    assert_eq!(MapType::ThruHostBridge.to_string(), "THRU_HOST_BRIDGE");
    assert_eq!(MapType::BusAddr.kernel_value(), 3);
    assert_eq!(MapType::NotSupported.kernel_value(), 2);
}

#[test]
fn distance_and_map_type_are_symmetric_for_every_pair() {
    // The checked ACS set is {P..=CA} ∪ {C..CA}, which is the same set seen from either side.
    for (hb0, hb1) in [(NL, NL), (ANY, NL), (SAME, ANY), (ANY, ANY)] {
        let mut topo = fixture(hb0, hb1, false);
        for (name, acs) in [
            ("sw0.d1", AcsCtrl::RR),
            ("sw0", AcsCtrl::EC),
            ("c", AcsCtrl::CR),
        ] {
            topo.set_acs(id(&topo, name), Some(acs)).unwrap();
        }
        let ids: Vec<NodeId> = topo.ids().collect();
        for &p in &ids {
            for &c in &ids {
                let there = p2p_distance(&topo, p, c);
                let back = p2p_distance(&topo, c, p);
                assert_eq!(
                    (there.map_type, there.distance),
                    (back.map_type, back.distance),
                    "{} <-> {}",
                    topo.name(p),
                    topo.name(c)
                );
            }
        }
    }
}
