//! The description of a topology, as a scenario's `[topology]` section writes it, and its conversion
//! into a validated [`Topology`].
//!
//! The scenario parser (`peerdma-scenario`) builds these values with its own span-keeping walk of the
//! document; the `serde` derives read the same description from any other TOML (`toml::from_str`).
//!
//! ```toml
//! [topology]
//! cpu_allows_all_host_bridges = false          # AMD Zen: true
//!
//! [[topology.socket]]
//! name = "s0"
//!
//! [[topology.host_bridge]]
//! name = "hb0"
//! socket = "s0"                                # optional
//! whitelist = "unrestricted"                   # "not-listed" (default), "same-host-bridge-only", "unrestricted"
//! domain = 0                                   # optional PCI domain (32-bit: VMD domains start at 0x10000)
//!
//! [[topology.root_port]]
//! name = "rp0"
//! parent = "hb0"
//! bdf = "00:01.0"                              # optional for ports
//! acs = { rr = true, cr = true }               # optional ACS capability: rr, cr, ec
//!
//! [[topology.switch]]                          # one upstream port (named like the switch) + downstream ports
//! name = "sw0"
//! parent = "rp0"
//! link = { gen = 4, width = 16 }               # mps 256, mrrs 512, rcb 64, addr64, no ecrc by default
//! downstream = [ { name = "sw0.d0" }, { name = "sw0.d1", acs = { rr = true } } ]
//!
//! [[topology.endpoint]]
//! name = "nvme0"
//! parent = "sw0.d0"
//! bdf = "03:00.0"
//! link = { gen = 4, width = 4, mps = 256, mrrs = 512 }
//! bars = [ { index = 0, size = "16MiB", phys = "0x3800_0000_0000", bus_offset = 0, prefetchable = true } ]
//!
//! [[topology.non_pci]]                         # a device that is not a PCI function
//! name = "ib0"
//! parent = "nvme0"                             # optional
//! ```
//! Sizes and addresses are integers or strings: decimal, `0x` hexadecimal, or decimal with a `B`, `KiB`,
//! `MiB`, `GiB` or `TiB` suffix; `_` separators are allowed; `bus_offset` may be negative (`"-0x1000"`).
//! Nodes are added in the order sockets, host bridges, root ports, switches (upstream port, then its
//! downstream ports), endpoints, non-PCI devices; within a list, in file order.

use std::fmt;

use peerdma_core::{Bdf, Pa};
use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

use super::{AcsCtrl, Bar, NodeKind, Topology, TopologyBuilder, WhitelistEntry};
use crate::Result;
use crate::link::LinkSpec;

/// A whole topology description (`[topology]`).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopologySpec {
    /// The "CPU allows every host-bridge path" flag (Linux `cpu_supports_p2pdma()`, AMD Zen).
    #[serde(default)]
    pub cpu_allows_all_host_bridges: bool,
    /// `[[topology.socket]]`.
    #[serde(default, rename = "socket")]
    pub sockets: Vec<SocketSpec>,
    /// `[[topology.host_bridge]]`.
    #[serde(default, rename = "host_bridge")]
    pub host_bridges: Vec<HostBridgeSpec>,
    /// `[[topology.root_port]]`.
    #[serde(default, rename = "root_port")]
    pub root_ports: Vec<RootPortSpec>,
    /// `[[topology.switch]]`.
    #[serde(default, rename = "switch")]
    pub switches: Vec<SwitchSpec>,
    /// `[[topology.endpoint]]`.
    #[serde(default, rename = "endpoint")]
    pub endpoints: Vec<EndpointSpec>,
    /// `[[topology.non_pci]]`.
    #[serde(default)]
    pub non_pci: Vec<NonPciSpec>,
}

/// A socket.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SocketSpec {
    /// Its name.
    pub name: String,
}

/// A host bridge.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostBridgeSpec {
    /// Its name.
    pub name: String,
    /// The socket it sits on.
    #[serde(default)]
    pub socket: Option<String>,
    /// Its P2PDMA whitelist entry.
    #[serde(default)]
    pub whitelist: WhitelistEntry,
    /// Its PCI domain.
    #[serde(default)]
    pub domain: u32,
}

/// A root port.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootPortSpec {
    /// Its name.
    pub name: String,
    /// Its host bridge.
    pub parent: String,
    /// Its BDF (`"00:01.0"`).
    #[serde(default, deserialize_with = "de_opt_bdf")]
    pub bdf: Option<Bdf>,
    /// Its ACS capability.
    #[serde(default)]
    pub acs: Option<AcsCtrl>,
    /// Its BARs.
    #[serde(default)]
    pub bars: Vec<BarSpec>,
}

/// A switch: its upstream port (named like the switch) and its downstream ports.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchSpec {
    /// The name of the switch and of its upstream port.
    pub name: String,
    /// The root port or downstream port above the switch.
    pub parent: String,
    /// The upstream port's BDF.
    #[serde(default, deserialize_with = "de_opt_bdf")]
    pub bdf: Option<Bdf>,
    /// The upstream port's ACS capability.
    #[serde(default)]
    pub acs: Option<AcsCtrl>,
    /// The upstream link.
    #[serde(default)]
    pub link: Option<LinkSpec>,
    /// The upstream port's BARs.
    #[serde(default)]
    pub bars: Vec<BarSpec>,
    /// The downstream ports.
    #[serde(default)]
    pub downstream: Vec<DownstreamPortSpec>,
}

/// A switch downstream port.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DownstreamPortSpec {
    /// Its name.
    pub name: String,
    /// Its BDF.
    #[serde(default, deserialize_with = "de_opt_bdf")]
    pub bdf: Option<Bdf>,
    /// Its ACS capability.
    #[serde(default)]
    pub acs: Option<AcsCtrl>,
    /// Its BARs.
    #[serde(default)]
    pub bars: Vec<BarSpec>,
}

/// An endpoint function.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    /// Its name.
    pub name: String,
    /// The root port, downstream port or host bridge (integrated endpoint) above it.
    pub parent: String,
    /// Its BDF.
    #[serde(deserialize_with = "de_bdf")]
    pub bdf: Bdf,
    /// Its ACS capability.
    #[serde(default)]
    pub acs: Option<AcsCtrl>,
    /// Its upstream link.
    #[serde(default)]
    pub link: Option<LinkSpec>,
    /// Its BARs.
    #[serde(default)]
    pub bars: Vec<BarSpec>,
}

/// A device that is not a PCI function.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NonPciSpec {
    /// Its name.
    pub name: String,
    /// Its parent device (a socket, an endpoint or another non-PCI device), if any.
    #[serde(default)]
    pub parent: Option<String>,
}

/// A BAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BarSpec {
    /// Index 0–5.
    pub index: u8,
    /// Size in bytes.
    #[serde(deserialize_with = "de_u64")]
    pub size: u64,
    /// CPU physical base.
    #[serde(deserialize_with = "de_u64")]
    pub phys: u64,
    /// Bus address minus CPU physical address.
    #[serde(default, deserialize_with = "de_i64")]
    pub bus_offset: i64,
    /// Whether the BAR is prefetchable.
    #[serde(default)]
    pub prefetchable: bool,
}

impl BarSpec {
    /// Returns the BAR this describes (validated when the topology is built).
    pub fn to_bar(&self) -> Bar {
        Bar {
            index: self.index,
            size: self.size,
            phys: Pa::from_raw(self.phys),
            bus_offset: self.bus_offset,
            prefetchable: self.prefetchable,
        }
    }
}

impl TopologySpec {
    /// Returns a builder holding these declarations (to extend them before building).
    pub fn to_builder(&self) -> TopologyBuilder {
        let mut b = TopologyBuilder::new();
        b.cpu_allows_all_host_bridges(self.cpu_allows_all_host_bridges);
        for s in &self.sockets {
            b.socket(&s.name);
        }
        for h in &self.host_bridges {
            let d = b.host_bridge(&h.name, h.whitelist);
            d.domain(h.domain);
            if let Some(s) = &h.socket {
                d.parent(s);
            }
        }
        for r in &self.root_ports {
            let d = b.root_port(&r.name, &r.parent);
            pci_attrs(d, r.bdf, r.acs, None, &r.bars);
        }
        for s in &self.switches {
            let d = b.switch_upstream(&s.name, &s.parent);
            pci_attrs(d, s.bdf, s.acs, s.link.as_ref(), &s.bars);
            for p in &s.downstream {
                let d = b.switch_downstream(&p.name, &s.name);
                pci_attrs(d, p.bdf, p.acs, None, &p.bars);
            }
        }
        for e in &self.endpoints {
            let d = b.node(&e.name, NodeKind::Endpoint, Some(&e.parent));
            pci_attrs(d, Some(e.bdf), e.acs, e.link.as_ref(), &e.bars);
        }
        for n in &self.non_pci {
            b.non_pci(&n.name, n.parent.as_deref());
        }
        b
    }

    /// Validates the description and returns the topology.
    ///
    /// # Errors
    /// As [`TopologyBuilder::build`]: every error names the offending node.
    pub fn build(&self) -> Result<Topology> {
        self.to_builder().build()
    }
}

fn pci_attrs(
    d: &mut super::NodeDecl,
    bdf: Option<Bdf>,
    acs: Option<AcsCtrl>,
    link: Option<&LinkSpec>,
    bars: &[BarSpec],
) {
    if let Some(bdf) = bdf {
        d.bdf(bdf);
    }
    if let Some(acs) = acs {
        d.acs(acs);
    }
    if let Some(link) = link {
        d.link(link.clone());
    }
    for bar in bars {
        d.bar(bar.to_bar());
    }
}

fn de_bdf<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Bdf, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map_err(de::Error::custom)
}

fn de_opt_bdf<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<Bdf>, D::Error> {
    de_bdf(d).map(Some)
}

/// Parses a BAR size or address as `[topology]` writes it: decimal, `0x` hex, or decimal with a `B`, `KiB`,
/// `MiB`, `GiB` or `TiB` suffix; `_` separators allowed.
///
/// # Errors
/// The message for a value that is not a number, or that overflows 64 bits.
pub fn parse_size_or_address(text: &str) -> std::result::Result<u64, String> {
    let t: String = text.trim().chars().filter(|&c| c != '_').collect();
    let err = || format!("invalid size or address `{text}`");
    if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        return u64::from_str_radix(hex, 16).map_err(|_| err());
    }
    let (digits, shift) = [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10), ("B", 0)]
        .iter()
        .find_map(|&(suffix, shift)| t.strip_suffix(suffix).map(|d| (d.trim_end(), shift)))
        .unwrap_or((t.as_str(), 0));
    let value: u64 = digits.parse().map_err(|_| err())?;
    value
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("size `{text}` overflows 64 bits"))
}

/// Parses a BAR `bus_offset` as `[topology]` writes it: [`parse_size_or_address`] with an optional `-`.
///
/// # Errors
/// The message for a value that is not a number, or that does not fit 64 signed bits.
pub fn parse_offset(text: &str) -> std::result::Result<i64, String> {
    let t = text.trim();
    let (neg, body) = t.strip_prefix('-').map_or((false, t), |b| (true, b));
    let magnitude = parse_size_or_address(body)?;
    let err = || format!("offset `{text}` does not fit 64 signed bits");
    if neg {
        0i64.checked_sub_unsigned(magnitude).ok_or_else(err)
    } else {
        i64::try_from(magnitude).map_err(|_| err())
    }
}

struct U64Visitor;

impl Visitor<'_> for U64Visitor {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a non-negative integer or a string like \"16MiB\" or \"0x1000\"")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<u64, E> {
        Ok(v)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<u64, E> {
        u64::try_from(v).map_err(|_| E::custom(format!("expected a non-negative value, found {v}")))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<u64, E> {
        parse_size_or_address(v).map_err(E::custom)
    }
}

struct I64Visitor;

impl Visitor<'_> for I64Visitor {
    type Value = i64;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an integer or a string like \"-0x1000\"")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<i64, E> {
        i64::try_from(v).map_err(|_| E::custom(format!("offset {v} does not fit 64 signed bits")))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<i64, E> {
        Ok(v)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<i64, E> {
        parse_offset(v).map_err(E::custom)
    }
}

fn de_u64<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<u64, D::Error> {
    d.deserialize_any(U64Visitor)
}

fn de_i64<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<i64, D::Error> {
    d.deserialize_any(I64Visitor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_accept_units_hex_and_separators() {
        assert_eq!(parse_size_or_address("4096"), Ok(4096));
        assert_eq!(parse_size_or_address("16MiB"), Ok(16 << 20));
        assert_eq!(parse_size_or_address("2 GiB"), Ok(2 << 30));
        assert_eq!(
            parse_size_or_address("0x3800_0000_0000"),
            Ok(0x3800_0000_0000)
        );
        assert_eq!(parse_size_or_address("64B"), Ok(64));
        parse_size_or_address("16MB").unwrap_err();
        parse_size_or_address("20000000TiB").unwrap_err();
        assert_eq!(parse_offset("-0x1000"), Ok(-0x1000));
        assert_eq!(parse_offset("-0x8000000000000000"), Ok(i64::MIN));
        parse_offset("0x8000000000000000").unwrap_err();
    }
}
