//! Tests of topology validation, queries, bus-address translation and the TOML description.

use peerdma_core::{Bdf, BusAddr, Pa};

use super::*;
use crate::{LinkParam, LinkSpec};

fn bdf(bus: u8, dev: u8, func: u8) -> Bdf {
    Bdf::new(bus, dev, func).unwrap()
}

fn bar(index: u8, size: u64, phys: u64) -> Bar {
    Bar {
        index,
        size,
        phys: Pa::from_raw(phys),
        bus_offset: 0,
        prefetchable: true,
    }
}

/// A valid base: hb0 ─ rp0 ─ sw0 ─ sw0.d0 ─ ep0, plus socket s0 and a second host bridge hb1 in domain 1.
fn base() -> TopologyBuilder {
    let mut b = TopologyBuilder::new();
    b.socket("s0");
    b.host_bridge("hb0", WhitelistEntry::NotListed).parent("s0");
    b.host_bridge("hb1", WhitelistEntry::NotListed)
        .parent("s0")
        .domain(1);
    b.root_port("rp0", "hb0").bdf(bdf(0, 1, 0));
    b.switch_upstream("sw0", "rp0")
        .bdf(bdf(1, 0, 0))
        .link(LinkSpec::new(4, 16));
    b.switch_downstream("sw0.d0", "sw0").bdf(bdf(2, 0, 0));
    b.endpoint("ep0", "sw0.d0", bdf(3, 0, 0))
        .link(LinkSpec::new(4, 8))
        .bar(bar(0, 0x10_0000, 0x1_0000_0000));
    b
}

fn variant(e: &Error) -> &'static str {
    match e {
        Error::DuplicateName { .. } => "DuplicateName",
        Error::MissingParent { .. } => "MissingParent",
        Error::ParentRequired { .. } => "ParentRequired",
        Error::EndpointAsParent { .. } => "EndpointAsParent",
        Error::BadParent { .. } => "BadParent",
        Error::Cycle { .. } => "Cycle",
        Error::MissingBdf { .. } => "MissingBdf",
        Error::DuplicateBdf { .. } => "DuplicateBdf",
        Error::AttributeNotAllowed { .. } => "AttributeNotAllowed",
        Error::InvalidBar { .. } => "InvalidBar",
        Error::OverlappingBars { .. } => "OverlappingBars",
        Error::InvalidLink { .. } => "InvalidLink",
        Error::UnknownNode { .. } => "UnknownNode",
    }
}

type Mutation = fn(&mut TopologyBuilder);

#[rustfmt::skip]
const INVALID: &[(&str, Mutation, &str, &str)] = &[
    ("duplicate name", |b| { b.socket("ep0"); }, "DuplicateName", "ep0"),
    ("missing parent", |b| { b.endpoint("ep1", "nowhere", bdf(9, 0, 0)); }, "MissingParent", "ep1"),
    ("endpoint as parent of an endpoint", |b| { b.endpoint("ep1", "ep0", bdf(9, 0, 0)); },
        "EndpointAsParent", "ep1"),
    ("endpoint as parent of a switch", |b| { b.switch_upstream("sw9", "ep0"); }, "EndpointAsParent", "sw9"),
    ("endpoint under a switch upstream port", |b| { b.endpoint("ep1", "sw0", bdf(9, 0, 0)); },
        "BadParent", "ep1"),
    ("endpoint under a socket", |b| { b.endpoint("ep1", "s0", bdf(9, 0, 0)); }, "BadParent", "ep1"),
    ("root port under a socket", |b| { b.root_port("rp9", "s0"); }, "BadParent", "rp9"),
    ("downstream port under a root port", |b| { b.switch_downstream("d9", "rp0"); }, "BadParent", "d9"),
    ("upstream port under a host bridge", |b| { b.switch_upstream("sw9", "hb0"); }, "BadParent", "sw9"),
    ("host bridge under a host bridge", |b| { b.host_bridge("hb9", WhitelistEntry::NotListed).parent("hb0"); },
        "BadParent", "hb9"),
    ("non-PCI device under a port", |b| { b.non_pci("x", Some("rp0")); }, "BadParent", "x"),
    ("root port without parent", |b| { b.node("rp9", NodeKind::RootPort, None); }, "ParentRequired", "rp9"),
    ("socket with a parent", |b| { b.socket("s9").parent("s0"); }, "AttributeNotAllowed", "s9"),
    ("parent cycle between switches", |b| {
        b.switch_upstream("u1", "d2");
        b.switch_downstream("d1", "u1");
        b.switch_upstream("u2", "d1");
        b.switch_downstream("d2", "u2");
    }, "Cycle", "u1"),
    ("node is its own parent", |b| { b.non_pci("x", Some("x")); }, "Cycle", "x"),
    ("endpoint without bdf", |b| { b.node("ep1", NodeKind::Endpoint, Some("rp0")); }, "MissingBdf", "ep1"),
    ("duplicate bdf in one domain", |b| { b.endpoint("ep1", "rp0", bdf(3, 0, 0)); }, "DuplicateBdf", "ep1"),
    ("bdf on a socket", |b| { b.socket("s9").bdf(bdf(9, 0, 0)); }, "AttributeNotAllowed", "s9"),
    ("acs on a host bridge", |b| { b.host_bridge("hb9", WhitelistEntry::NotListed).acs(AcsCtrl::RR); },
        "AttributeNotAllowed", "hb9"),
    ("bars on a non-PCI device", |b| { b.non_pci("x", None).bar(bar(0, 4096, 0x2000_0000)); },
        "AttributeNotAllowed", "x"),
    ("domain on a root port", |b| { b.root_port("rp9", "hb0").domain(2); }, "AttributeNotAllowed", "rp9"),
    ("link on a root port", |b| { b.root_port("rp9", "hb0").link(LinkSpec::new(3, 8)); },
        "AttributeNotAllowed", "rp9"),
    ("link on a downstream port", |b| { b.switch_downstream("d9", "sw0").link(LinkSpec::new(3, 8)); },
        "AttributeNotAllowed", "d9"),
    ("link on an integrated endpoint", |b| { b.endpoint("rc", "hb0", bdf(0, 0x1f, 0)).link(LinkSpec::new(3, 8)); },
        "AttributeNotAllowed", "rc"),
    ("bar index 6", |b| { b.endpoint("ep1", "rp0", bdf(9, 0, 0)).bar(bar(6, 4096, 0x2000_0000)); },
        "InvalidBar", "ep1"),
    ("bar index used twice", |b| {
        b.endpoint("ep1", "rp0", bdf(9, 0, 0)).bar(bar(0, 4096, 0x2000_0000)).bar(bar(0, 4096, 0x3000_0000));
    }, "InvalidBar", "ep1"),
    ("bar size not a power of two", |b| { b.endpoint("ep1", "rp0", bdf(9, 0, 0)).bar(bar(0, 3000, 0x2000_0000)); },
        "InvalidBar", "ep1"),
    ("bar size zero", |b| { b.endpoint("ep1", "rp0", bdf(9, 0, 0)).bar(bar(0, 0, 0x2000_0000)); },
        "InvalidBar", "ep1"),
    ("bar misaligned", |b| { b.endpoint("ep1", "rp0", bdf(9, 0, 0)).bar(bar(0, 0x2000, 0x2000_1000)); },
        "InvalidBar", "ep1"),
    ("bar reaching past 2^64", |b| {
        b.endpoint("ep1", "rp0", bdf(9, 0, 0)).bar(bar(0, 1 << 63, 1 << 63));
    }, "InvalidBar", "ep1"),
    ("bar bus offset underflowing", |b| {
        b.endpoint("ep1", "rp0", bdf(9, 0, 0)).bar(Bar { bus_offset: -0x4000_0000, ..bar(0, 4096, 0x2000_0000) });
    }, "InvalidBar", "ep1"),
    ("bars of two devices overlapping", |b| {
        b.endpoint("ep1", "rp0", bdf(9, 0, 0)).bar(bar(2, 0x1000, 0x1_0008_0000));
    }, "OverlappingBars", "ep1"),
    ("bars of one device overlapping", |b| {
        b.endpoint("ep1", "rp0", bdf(9, 0, 0)).bar(bar(0, 0x2000, 0x2000_0000)).bar(bar(1, 0x1000, 0x2000_1000));
    }, "OverlappingBars", "ep1"),
    ("link generation 0", |b| { b.endpoint("ep1", "rp0", bdf(9, 0, 0)).link(LinkSpec::new(0, 8)); },
        "InvalidLink", "ep1"),
    ("link generation 8", |b| { b.endpoint("ep1", "rp0", bdf(9, 0, 0)).link(LinkSpec::new(8, 8)); },
        "InvalidLink", "ep1"),
    ("link width x3", |b| { b.endpoint("ep1", "rp0", bdf(9, 0, 0)).link(LinkSpec::new(3, 3)); },
        "InvalidLink", "ep1"),
    ("link mps not a power of two", |b| {
        b.endpoint("ep1", "rp0", bdf(9, 0, 0)).link(LinkSpec { mps: 384, ..LinkSpec::new(3, 8) });
    }, "InvalidLink", "ep1"),
    ("link mps above the tables", |b| {
        b.endpoint("ep1", "rp0", bdf(9, 0, 0)).link(LinkSpec { mps: 8192, ..LinkSpec::new(3, 8) });
    }, "InvalidLink", "ep1"),
    ("link mrrs below 128", |b| {
        b.endpoint("ep1", "rp0", bdf(9, 0, 0)).link(LinkSpec { mrrs: 64, ..LinkSpec::new(3, 8) });
    }, "InvalidLink", "ep1"),
    ("link rcb 32", |b| {
        b.switch_upstream("sw9", "rp0").link(LinkSpec { rcb: 32, ..LinkSpec::new(3, 8) });
    }, "InvalidLink", "sw9"),
];

#[test]
fn every_invalid_topology_is_refused_naming_the_node() {
    base().build().expect("the base topology is valid");
    for &(case, mutate, want_variant, want_node) in INVALID {
        let mut b = base();
        mutate(&mut b);
        let err = b.build().expect_err(case);
        assert_eq!(variant(&err), want_variant, "{case}: {err}");
        assert_eq!(err.node(), Some(want_node), "{case}: {err}");
        assert!(
            err.to_string().contains(want_node),
            "{case}: message `{err}` names the node"
        );
    }
}

#[test]
fn errors_read_lowercase_without_trailing_period() {
    let mut b = base();
    b.endpoint("ep1", "rp0", bdf(9, 0, 0))
        .bar(bar(2, 0x1000, 0x1_0008_0000));
    let err = b.build().unwrap_err();
    assert_eq!(
        err.to_string(),
        "node `ep1`: bar 2 [0x100080000, 0x100081000) overlaps bar 0 [0x100000000, 0x100100000) of `ep0`"
    );
    let mut b = base();
    b.endpoint("ep1", "rp0", bdf(9, 0, 0)).link(LinkSpec {
        mps: 100,
        ..LinkSpec::new(3, 8)
    });
    let err = b.build().unwrap_err();
    assert!(matches!(
        err,
        Error::InvalidLink {
            param: LinkParam::Mps,
            value: 100,
            ..
        }
    ));
    assert_eq!(
        err.to_string(),
        "invalid link of node `ep1`: mps 100, expected a power of two in 128..=4096"
    );
}

#[test]
fn same_bdf_in_two_domains_is_fine() {
    let mut b = base();
    b.root_port("rp9", "hb1").bdf(bdf(0, 1, 0));
    b.endpoint("ep9", "rp9", bdf(3, 0, 0));
    let topo = b.build().unwrap();
    assert_eq!(topo.by_bdf(1, bdf(3, 0, 0)), topo.lookup("ep9"));
    assert_eq!(topo.by_bdf(0, bdf(3, 0, 0)), topo.lookup("ep0"));
    assert_eq!(topo.domain_of(topo.lookup("ep9").unwrap()), Some(1));
}

#[test]
fn upstream_bridge_stops_at_root_ports_and_integrated_endpoints() {
    let mut b = base();
    b.endpoint("rc", "hb0", bdf(0, 0x1f, 0));
    b.non_pci("ib0", Some("ep0"));
    let topo = b.build().unwrap();
    let n = |s| topo.lookup(s).unwrap();
    let chain: Vec<&str> = topo
        .upstream_chain(n("ep0"))
        .into_iter()
        .map(|i| topo.name(i))
        .collect();
    assert_eq!(chain, ["ep0", "sw0.d0", "sw0", "rp0"]);
    assert_eq!(topo.upstream_bridge(n("rp0")), None);
    assert_eq!(topo.upstream_bridge(n("rc")), None);
    assert_eq!(topo.upstream_bridge(n("ib0")), None);
    assert_eq!(topo.host_bridge_of(n("rc")), Some(n("hb0")));
    assert_eq!(topo.host_bridge_of(n("ib0")), None);
    assert_eq!(topo.find_pci_dev(n("ib0")), Some(n("ep0")));
    assert_eq!(topo.find_pci_dev(n("s0")), None);
    assert_eq!(topo.socket_of(n("hb0")), Some(n("s0")));
    assert_eq!(topo.node(n("sw0")).children(), [n("sw0.d0")]);
    assert_eq!(topo.endpoints().count(), 2);
}

#[test]
fn bus_address_is_phys_plus_the_bar_offset() {
    let mut b = base();
    b.endpoint("gpu", "rp0", bdf(9, 0, 0))
        .bar(Bar {
            bus_offset: -0x1_0000_0000,
            ..bar(2, 0x1000_0000, 0x2_0000_0000)
        })
        .bar(Bar {
            bus_offset: 0x8000_0000,
            ..bar(4, 0x1000, 0x3_0000_0000)
        });
    let topo = b.build().unwrap();
    let gpu = topo.lookup("gpu").unwrap();
    assert_eq!(
        topo.bus_addr(Pa::from_raw(0x2_0000_1234)),
        Some(BusAddr::from_raw(0x1_0000_1234))
    );
    assert_eq!(
        topo.bus_addr(Pa::from_raw(0x3_0000_0fff)),
        Some(BusAddr::from_raw(0x3_8000_0fff))
    );
    assert_eq!(
        topo.bus_addr(Pa::from_raw(0x3_0000_1000)),
        None,
        "half-open"
    );
    assert_eq!(
        topo.bus_addr(Pa::from_raw(0x1_0000_0010)),
        Some(BusAddr::from_raw(0x1_0000_0010))
    );
    assert_eq!(topo.bus_addr(Pa::from_raw(0x10)), None);
    let (owner, b2) = topo.bar_at(Pa::from_raw(0x2_0fff_ffff)).unwrap();
    assert_eq!((owner, b2.index), (gpu, 2));
    assert_eq!(
        b2.bus_range(),
        Range::new(
            BusAddr::from_raw(0x1_0000_0000),
            BusAddr::from_raw(0x1_1000_0000)
        )
    );
}

#[test]
fn set_acs_refuses_nodes_that_are_not_pci_functions() {
    let mut topo = base().build().unwrap();
    let s0 = topo.lookup("s0").unwrap();
    assert!(matches!(
        topo.set_acs(s0, Some(AcsCtrl::RR)),
        Err(Error::AttributeNotAllowed { .. })
    ));
    let ep0 = topo.lookup("ep0").unwrap();
    topo.set_acs(ep0, Some(AcsCtrl::EC)).unwrap();
    assert!(topo.node(ep0).acs_redirects());
    topo.set_acs(ep0, None).unwrap();
    assert_eq!(topo.node(ep0).acs(), None);
}

const TOML: &str = r#"
cpu_allows_all_host_bridges = false

[[socket]]
name = "s0"

[[host_bridge]]
name = "hb0"
socket = "s0"
whitelist = "same-host-bridge-only"

[[root_port]]
name = "rp0"
parent = "hb0"
bdf = "00:01.0"
acs = { rr = true, cr = true }

[[switch]]
name = "sw0"
parent = "rp0"
bdf = "01:00.0"
link = { gen = 4, width = 16 }
downstream = [ { name = "sw0.d0", bdf = "02:00.0" }, { name = "sw0.d1", bdf = "02:01.0", acs = { ec = true } } ]

[[endpoint]]
name = "nvme0"
parent = "sw0.d0"
bdf = "03:00.0"
link = { gen = 4, width = 4, mps = 512, mrrs = 1024, completion_split = "rcb" }
bars = [ { index = 0, size = "16MiB", phys = "0x3800_0000_0000", bus_offset = "-0x1000_0000", prefetchable = true } ]

[[endpoint]]
name = "nic0"
parent = "sw0.d1"
bdf = "04:00.0"

[[non_pci]]
name = "ib0"
parent = "nic0"
"#;

#[test]
fn toml_description_builds_the_same_tree() {
    let spec: TopologySpec = toml::from_str(TOML).unwrap();
    let topo = spec.build().unwrap();
    let n = |s| topo.lookup(s).unwrap();
    assert_eq!(topo.len(), 9);
    assert_eq!(
        topo.node(n("hb0")).host_bridge().unwrap().whitelist,
        WhitelistEntry::SameHostBridgeOnly
    );
    assert_eq!(topo.node(n("sw0.d1")).parent(), Some(n("sw0")));
    assert_eq!(topo.node(n("sw0.d1")).acs(), Some(AcsCtrl::EC));
    let link = topo.node(n("nvme0")).link().unwrap();
    assert_eq!(
        (link.generation(), link.width(), link.mps(), link.mrrs()),
        (4, 4, 512, 1024)
    );
    assert_eq!(link.completion_split(), crate::CompletionSplit::Rcb);
    let bar0 = topo.node(n("nvme0")).bar(0).unwrap();
    assert_eq!(bar0.size, 16 << 20);
    assert_eq!(bar0.bus_offset, -0x1000_0000);
    assert_eq!(topo.node(n("nic0")).link(), None);
    assert_eq!(topo.node(n("nic0")).bdf(), Some(bdf(4, 0, 0)));
    assert_eq!(topo.find_pci_dev(n("ib0")), Some(n("nic0")));
}

#[test]
fn toml_description_rejects_unknown_fields_and_bad_values() {
    for (bad, what) in [
        ("[[socket]]\nname = \"s0\"\ncores = 8\n", "unknown field"),
        (
            "[[host_bridge]]\nname = \"h\"\nwhitelist = \"maybe\"\n",
            "unknown variant",
        ),
        (
            "[[endpoint]]\nname = \"e\"\nparent = \"p\"\nbdf = \"00:40.0\"\n",
            "expected a BDF",
        ),
        (
            "[[endpoint]]\nname = \"e\"\nparent = \"p\"\nbdf = \"00:01.0\"\nbars = [{ index = 0, size = \"4 KB\", phys = 0 }]\n",
            "invalid size",
        ),
        (
            "[[root_port]]\nname = \"r\"\nparent = \"h\"\nacs = { rr = true, xx = true }\n",
            "unknown field",
        ),
    ] {
        let err = toml::from_str::<TopologySpec>(bad).unwrap_err().to_string();
        assert!(err.contains(what), "{bad}: {err}");
    }
}

#[test]
fn toml_description_errors_name_the_node() {
    let text = TOML.replace("parent = \"sw0.d1\"", "parent = \"sw0\"");
    let spec: TopologySpec = toml::from_str(&text).unwrap();
    let err = spec.build().unwrap_err();
    assert_eq!(err.node(), Some("nic0"));
    assert_eq!(
        err.to_string(),
        "node `nic0`: parent `sw0` is a switch upstream port, expected a root port, a switch downstream port or a host bridge"
    );
}
