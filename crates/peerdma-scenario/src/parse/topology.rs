//! The `[topology]` table, walked like the rest of the file into the [`peerdma_pci`] spec values
//! ([`TopologySpec`] and its parts), then built, so that an invalid tree is reported at the node's
//! declaration.
//!
//! The messages keep the wording that `[topology]` has always had (it used to be read through `serde`):
//! `unknown field `x`, expected one of ...`, `missing field `x``, `invalid type: integer `5`, expected a
//! string`... Every message starts with "invalid `[topology]`: ". As with `serde`, the keys of a table are
//! read in sorted order (the first problem in that order is the one reported), a missing key is reported at
//! the table, and a table may also be written as an array of its fields in declaration order (`link = [4,
//! 16]`).

use std::collections::BTreeMap;
use std::ops::Range;

use peerdma_core::Bdf;
use peerdma_pci::link::{DEFAULT_MPS, DEFAULT_MRRS, DEFAULT_RCB};
use peerdma_pci::topology::{
    BarSpec, DownstreamPortSpec, EndpointSpec, HostBridgeSpec, NonPciSpec, RootPortSpec,
    SocketSpec, SwitchSpec, parse_offset, parse_size_or_address,
};
use peerdma_pci::{AcsCtrl, CompletionSplit, LinkSpec, Topology, TopologySpec, WhitelistEntry};
use toml::Spanned;
use toml::de::{DeString, DeValue};

use super::{Parser, Result, Value};
use crate::error::ScenarioError;

const TOPOLOGY_FIELDS: &[&str] = &[
    "cpu_allows_all_host_bridges",
    "socket",
    "host_bridge",
    "root_port",
    "switch",
    "endpoint",
    "non_pci",
];
const SOCKET_FIELDS: &[&str] = &["name"];
const HOST_BRIDGE_FIELDS: &[&str] = &["name", "socket", "whitelist", "domain"];
const ROOT_PORT_FIELDS: &[&str] = &["name", "parent", "bdf", "acs", "bars"];
const SWITCH_FIELDS: &[&str] = &["name", "parent", "bdf", "acs", "link", "bars", "downstream"];
const DOWNSTREAM_FIELDS: &[&str] = &["name", "bdf", "acs", "bars"];
const ENDPOINT_FIELDS: &[&str] = &["name", "parent", "bdf", "acs", "link", "bars"];
const NON_PCI_FIELDS: &[&str] = &["name", "parent"];
const BAR_FIELDS: &[&str] = &["index", "size", "phys", "bus_offset", "prefetchable"];
const ACS_FIELDS: &[&str] = &["rr", "cr", "ec"];
const LINK_FIELDS: &[&str] = &[
    "gen",
    "width",
    "mps",
    "mrrs",
    "rcb",
    "addr64",
    "ecrc",
    "completion_split",
];

const WHITELIST: &[(&str, WhitelistEntry)] = &[
    ("not-listed", WhitelistEntry::NotListed),
    ("same-host-bridge-only", WhitelistEntry::SameHostBridgeOnly),
    ("unrestricted", WhitelistEntry::Unrestricted),
];
const COMPLETION_SPLIT: &[(&str, CompletionSplit)] =
    &[("mps", CompletionSplit::Mps), ("rcb", CompletionSplit::Rcb)];

const SIZE_EXPECTED: &str = "a non-negative integer or a string like \"16MiB\" or \"0x1000\"";
const OFFSET_EXPECTED: &str = "an integer or a string like \"-0x1000\"";

/// Returns `names` as `serde` lists what it expected: "`a`", "`a` or `b`", "one of `a`, `b`, `c`".
fn one_of(names: &[&str]) -> String {
    match names {
        [a] => format!("`{a}`"),
        [a, b] => format!("`{a}` or `{b}`"),
        _ => format!(
            "one of {}",
            names
                .iter()
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// An integer as `toml` hands it on: 64-bit when it fits, else 128-bit, else not at all.
enum Int {
    Signed(i64),
    Unsigned(u64),
    /// Fits 128 bits only: how `serde` names it (`integer `N` as i128`).
    Wide(String),
    Overflow,
}

const INT_OVERFLOW: &str = "integer number overflowed";

fn int(i: &toml::de::DeInteger<'_>) -> Int {
    let (s, radix) = (i.as_str(), i.radix());
    if let Ok(v) = i64::from_str_radix(s, radix) {
        Int::Signed(v)
    } else if let Ok(v) = u64::from_str_radix(s, radix) {
        Int::Unsigned(v)
    } else if let Ok(v) = i128::from_str_radix(s, radix) {
        Int::Wide(format!("integer `{v}` as i128"))
    } else if let Ok(v) = u128::from_str_radix(s, radix) {
        Int::Wide(format!("integer `{v}` as u128"))
    } else {
        Int::Overflow
    }
}

/// A float as `serde` prints it: with a decimal point when finite.
fn float_text(f: f64) -> String {
    let text = f.to_string();
    if f.is_finite() && !text.contains('.') {
        format!("{text}.0")
    } else {
        text
    }
}

/// Returns how `serde` names `v` in an "invalid type" message, or, for a number that `toml` cannot hand
/// on, the whole message.
fn unexpected(v: &DeValue<'_>) -> std::result::Result<String, String> {
    Ok(match v {
        DeValue::String(s) => format!("string {:?}", s.as_ref()),
        DeValue::Integer(i) => match int(i) {
            Int::Signed(n) => format!("integer `{n}`"),
            Int::Unsigned(n) => format!("integer `{n}`"),
            Int::Wide(text) => text,
            Int::Overflow => return Err(INT_OVERFLOW.to_owned()),
        },
        DeValue::Float(f) => {
            let text = f.as_str();
            match text.parse::<f64>() {
                Ok(x) if !x.is_infinite() || text.contains("inf") => {
                    format!("floating point `{}`", float_text(x))
                }
                _ => return Err("floating-point number overflowed".to_owned()),
            }
        }
        DeValue::Boolean(b) => format!("boolean `{b}`"),
        DeValue::Datetime(_) | DeValue::Table(_) => "map".to_owned(),
        DeValue::Array(_) => "sequence".to_owned(),
    })
}

/// The "invalid type: ..., expected ..." message for `v`.
fn invalid_type(v: &DeValue<'_>, expected: &str) -> String {
    match unexpected(v) {
        Ok(found) => format!("invalid type: {found}, expected {expected}"),
        Err(message) => message,
    }
}

/// One entry of a struct-like value: a known field and its value, or a key that is not a field.
enum Entry<'t, 'i> {
    Field(&'static str, &'t Value<'i>),
    Unknown(&'t Spanned<DeString<'i>>),
}

/// A struct-like value: a table (its entries in sorted key order) or an array (its items, field by field).
struct Fields<'t, 'i> {
    entries: Vec<Entry<'t, 'i>>,
    /// The number of items, for a struct written as an array.
    seq_len: Option<usize>,
    span: Range<usize>,
    name: &'static str,
    /// The struct's fields, in declaration order.
    names: &'static [&'static str],
}

impl Fields<'_, '_> {
    /// Returns the span of `key`'s value, for a struct written as a table.
    fn span_of(&self, key: &str) -> Option<Range<usize>> {
        if self.seq_len.is_some() {
            return None;
        }
        self.entries.iter().find_map(|e| match e {
            Entry::Field(k, v) if *k == key => Some(v.span()),
            _ => None,
        })
    }
}

/// A BAR with its `index` when written as a table (to find it by index), and its span.
type BarDecl = (Option<u8>, Range<usize>, BarSpec);

/// Where a node is declared (a table of `[topology]`, or a switch's `downstream` entry written as a table),
/// to report the errors of building the tree at the declaration's key at fault.
struct Decl {
    name: String,
    name_span: Range<usize>,
    /// The spans of the values of `parent` (`socket` for a host bridge), `bdf`, `acs`, `link` and `bars`.
    keys: BTreeMap<&'static str, Range<usize>>,
    /// Each BAR written as a table with an `index`: the index and the table's span.
    bars: Vec<(u8, Range<usize>)>,
}

impl Decl {
    fn new(f: &Fields<'_, '_>, name: &str, bars: &[BarDecl]) -> Option<Self> {
        let name_span = f.span_of("name")?;
        let mut keys = BTreeMap::new();
        for key in ["parent", "bdf", "acs", "link", "bars"] {
            if let Some(span) = f.span_of(key) {
                keys.insert(key, span);
            }
        }
        if let Some(span) = f.span_of("socket") {
            keys.insert("parent", span);
        }
        Some(Self {
            name: name.to_owned(),
            name_span,
            keys,
            bars: bars
                .iter()
                .filter_map(|(index, span, _)| index.map(|i| (i, span.clone())))
                .collect(),
        })
    }
}

impl Parser<'_> {
    fn topo_err(&self, span: &Range<usize>, message: impl std::fmt::Display) -> ScenarioError {
        self.err(span, format!("invalid `[topology]`: {message}"))
    }

    fn invalid_type(&self, v: &Value<'_>, expected: &str) -> ScenarioError {
        self.topo_err(&v.span(), invalid_type(v.get_ref(), expected))
    }

    /// The `[topology]` table, with the topology it builds.
    pub(super) fn topology(&self, v: &Value<'_>) -> Result<(TopologySpec, Topology)> {
        self.table(v, "the `[topology]` table")?;
        let mut decls = Vec::new();
        let spec = self.topology_spec(v, &mut decls)?;
        match spec.build() {
            Ok(topo) => Ok((spec, topo)),
            Err(e) => {
                let span = topology_error_span(&decls, &e).unwrap_or_else(|| v.span());
                Err(self.topo_err(&span, e))
            }
        }
    }

    fn topology_spec(&self, v: &Value<'_>, decls: &mut Vec<Decl>) -> Result<TopologySpec> {
        let f = self.fields(v, "TopologySpec", TOPOLOGY_FIELDS)?;
        let mut spec = TopologySpec::default();
        for e in &f.entries {
            let (key, v) = self.entry(&f, e)?;
            match key {
                "cpu_allows_all_host_bridges" => {
                    spec.cpu_allows_all_host_bridges = self.de_bool(v)?;
                }
                "socket" => {
                    spec.sockets = self.de_list(v, |p, v| p.socket(v, decls))?;
                }
                "host_bridge" => {
                    spec.host_bridges = self.de_list(v, |p, v| p.host_bridge(v, decls))?;
                }
                "root_port" => {
                    spec.root_ports = self.de_list(v, |p, v| p.root_port(v, decls))?;
                }
                "switch" => {
                    spec.switches = self.de_list(v, |p, v| p.switch(v, decls))?;
                }
                "endpoint" => {
                    spec.endpoints = self.de_list(v, |p, v| p.endpoint(v, decls))?;
                }
                _ => {
                    spec.non_pci = self.de_list(v, |p, v| p.non_pci(v, decls))?;
                }
            }
        }
        Ok(spec)
    }

    fn socket(&self, v: &Value<'_>, decls: &mut Vec<Decl>) -> Result<SocketSpec> {
        let f = self.fields(v, "SocketSpec", SOCKET_FIELDS)?;
        let mut name = None;
        for e in &f.entries {
            let (_, v) = self.entry(&f, e)?;
            name = Some(self.de_string(v)?);
        }
        let name = self.present(&f, "name", name)?;
        decls.extend(Decl::new(&f, &name, &[]));
        Ok(SocketSpec { name })
    }

    fn host_bridge(&self, v: &Value<'_>, decls: &mut Vec<Decl>) -> Result<HostBridgeSpec> {
        let f = self.fields(v, "HostBridgeSpec", HOST_BRIDGE_FIELDS)?;
        let (mut name, mut socket, mut whitelist, mut domain) = (None, None, None, None);
        for e in &f.entries {
            let (key, v) = self.entry(&f, e)?;
            match key {
                "name" => name = Some(self.de_string(v)?),
                "socket" => socket = Some(self.de_string(v)?),
                "whitelist" => whitelist = Some(self.de_enum(v, WHITELIST)?),
                _ => domain = Some(self.de_uint(v, "u32", u32::MAX.into())?),
            }
        }
        let name = self.present(&f, "name", name)?;
        decls.extend(Decl::new(&f, &name, &[]));
        Ok(HostBridgeSpec {
            name,
            socket,
            whitelist: whitelist.unwrap_or_default(),
            domain: domain.and_then(|d| u32::try_from(d).ok()).unwrap_or(0),
        })
    }

    fn root_port(&self, v: &Value<'_>, decls: &mut Vec<Decl>) -> Result<RootPortSpec> {
        let f = self.fields(v, "RootPortSpec", ROOT_PORT_FIELDS)?;
        let (mut name, mut parent, mut bdf, mut acs, mut bars) = (None, None, None, None, None);
        for e in &f.entries {
            let (key, v) = self.entry(&f, e)?;
            match key {
                "name" => name = Some(self.de_string(v)?),
                "parent" => parent = Some(self.de_string(v)?),
                "bdf" => bdf = Some(self.de_bdf(v)?),
                "acs" => acs = Some(self.acs(v)?),
                _ => bars = Some(self.bars(v)?),
            }
        }
        let name = self.present(&f, "name", name)?;
        let parent = self.present(&f, "parent", parent)?;
        let bars = bars.unwrap_or_default();
        decls.extend(Decl::new(&f, &name, &bars));
        Ok(RootPortSpec {
            name,
            parent,
            bdf,
            acs,
            bars: bars.into_iter().map(|(_, _, b)| b).collect(),
        })
    }

    fn switch(&self, v: &Value<'_>, decls: &mut Vec<Decl>) -> Result<SwitchSpec> {
        let f = self.fields(v, "SwitchSpec", SWITCH_FIELDS)?;
        let (mut name, mut parent, mut bdf, mut acs) = (None, None, None, None);
        let (mut link, mut bars, mut downstream) = (None, None, None);
        let mut downstream_decls = Vec::new();
        for e in &f.entries {
            let (key, v) = self.entry(&f, e)?;
            match key {
                "name" => name = Some(self.de_string(v)?),
                "parent" => parent = Some(self.de_string(v)?),
                "bdf" => bdf = Some(self.de_bdf(v)?),
                "acs" => acs = Some(self.acs(v)?),
                "link" => link = Some(self.link(v)?),
                "bars" => bars = Some(self.bars(v)?),
                _ => {
                    downstream =
                        Some(self.de_list(v, |p, v| p.downstream(v, &mut downstream_decls))?);
                }
            }
        }
        let name = self.present(&f, "name", name)?;
        let parent = self.present(&f, "parent", parent)?;
        let bars = bars.unwrap_or_default();
        decls.extend(Decl::new(&f, &name, &bars));
        // Like every declaration, a downstream port is known by its table, inside a switch's table.
        if f.seq_len.is_none() {
            decls.extend(downstream_decls);
        }
        Ok(SwitchSpec {
            name,
            parent,
            bdf,
            acs,
            link,
            bars: bars.into_iter().map(|(_, _, b)| b).collect(),
            downstream: downstream.unwrap_or_default(),
        })
    }

    fn downstream(&self, v: &Value<'_>, decls: &mut Vec<Decl>) -> Result<DownstreamPortSpec> {
        let f = self.fields(v, "DownstreamPortSpec", DOWNSTREAM_FIELDS)?;
        let (mut name, mut bdf, mut acs, mut bars) = (None, None, None, None);
        for e in &f.entries {
            let (key, v) = self.entry(&f, e)?;
            match key {
                "name" => name = Some(self.de_string(v)?),
                "bdf" => bdf = Some(self.de_bdf(v)?),
                "acs" => acs = Some(self.acs(v)?),
                _ => bars = Some(self.bars(v)?),
            }
        }
        let name = self.present(&f, "name", name)?;
        let bars = bars.unwrap_or_default();
        decls.extend(Decl::new(&f, &name, &bars));
        Ok(DownstreamPortSpec {
            name,
            bdf,
            acs,
            bars: bars.into_iter().map(|(_, _, b)| b).collect(),
        })
    }

    fn endpoint(&self, v: &Value<'_>, decls: &mut Vec<Decl>) -> Result<EndpointSpec> {
        let f = self.fields(v, "EndpointSpec", ENDPOINT_FIELDS)?;
        let (mut name, mut parent, mut bdf, mut acs) = (None, None, None, None);
        let (mut link, mut bars) = (None, None);
        for e in &f.entries {
            let (key, v) = self.entry(&f, e)?;
            match key {
                "name" => name = Some(self.de_string(v)?),
                "parent" => parent = Some(self.de_string(v)?),
                "bdf" => bdf = Some(self.de_bdf(v)?),
                "acs" => acs = Some(self.acs(v)?),
                "link" => link = Some(self.link(v)?),
                _ => bars = Some(self.bars(v)?),
            }
        }
        let name = self.present(&f, "name", name)?;
        let parent = self.present(&f, "parent", parent)?;
        let bdf = self.present(&f, "bdf", bdf)?;
        let bars = bars.unwrap_or_default();
        decls.extend(Decl::new(&f, &name, &bars));
        Ok(EndpointSpec {
            name,
            parent,
            bdf,
            acs,
            link,
            bars: bars.into_iter().map(|(_, _, b)| b).collect(),
        })
    }

    fn non_pci(&self, v: &Value<'_>, decls: &mut Vec<Decl>) -> Result<NonPciSpec> {
        let f = self.fields(v, "NonPciSpec", NON_PCI_FIELDS)?;
        let (mut name, mut parent) = (None, None);
        for e in &f.entries {
            let (key, v) = self.entry(&f, e)?;
            match key {
                "name" => name = Some(self.de_string(v)?),
                _ => parent = Some(self.de_string(v)?),
            }
        }
        let name = self.present(&f, "name", name)?;
        decls.extend(Decl::new(&f, &name, &[]));
        Ok(NonPciSpec { name, parent })
    }

    /// A `bars` list.
    fn bars(&self, v: &Value<'_>) -> Result<Vec<BarDecl>> {
        self.de_list(v, Self::bar)
    }

    fn bar(&self, v: &Value<'_>) -> Result<BarDecl> {
        let f = self.fields(v, "BarSpec", BAR_FIELDS)?;
        let (mut index, mut size, mut phys) = (None, None, None);
        let (mut bus_offset, mut prefetchable) = (None, None);
        for e in &f.entries {
            let (key, v) = self.entry(&f, e)?;
            match key {
                "index" => index = Some(self.de_uint(v, "u8", u8::MAX.into())?),
                "size" => size = Some(self.de_size(v)?),
                "phys" => phys = Some(self.de_size(v)?),
                "bus_offset" => bus_offset = Some(self.de_offset(v)?),
                _ => prefetchable = Some(self.de_bool(v)?),
            }
        }
        let index = self.present(&f, "index", index)?;
        let index = u8::try_from(index).unwrap_or(u8::MAX);
        let size = self.present(&f, "size", size)?;
        let phys = self.present(&f, "phys", phys)?;
        let bar = BarSpec {
            index,
            size,
            phys,
            bus_offset: bus_offset.unwrap_or(0),
            prefetchable: prefetchable.unwrap_or(false),
        };
        Ok((f.seq_len.is_none().then_some(index), f.span.clone(), bar))
    }

    fn acs(&self, v: &Value<'_>) -> Result<AcsCtrl> {
        let f = self.fields(v, "AcsCtrl", ACS_FIELDS)?;
        let mut acs = AcsCtrl::default();
        for e in &f.entries {
            let (key, v) = self.entry(&f, e)?;
            let bit = self.de_bool(v)?;
            match key {
                "rr" => acs.rr = bit,
                "cr" => acs.cr = bit,
                _ => acs.ec = bit,
            }
        }
        Ok(acs)
    }

    fn link(&self, v: &Value<'_>) -> Result<LinkSpec> {
        let f = self.fields(v, "LinkSpec", LINK_FIELDS)?;
        let (mut generation, mut width) = (None, None);
        let mut link = LinkSpec {
            generation: 0,
            width: 0,
            mps: DEFAULT_MPS,
            mrrs: DEFAULT_MRRS,
            rcb: DEFAULT_RCB,
            addr64: true,
            ecrc: false,
            completion_split: CompletionSplit::default(),
        };
        let u8_max = u8::MAX.into();
        let u32_max = u32::MAX.into();
        let narrow = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
        for e in &f.entries {
            let (key, v) = self.entry(&f, e)?;
            match key {
                "gen" => generation = Some(self.de_uint(v, "u8", u8_max)?),
                "width" => width = Some(self.de_uint(v, "u8", u8_max)?),
                "mps" => link.mps = narrow(self.de_uint(v, "u32", u32_max)?),
                "mrrs" => link.mrrs = narrow(self.de_uint(v, "u32", u32_max)?),
                "rcb" => link.rcb = narrow(self.de_uint(v, "u32", u32_max)?),
                "addr64" => link.addr64 = self.de_bool(v)?,
                "ecrc" => link.ecrc = self.de_bool(v)?,
                _ => link.completion_split = self.de_enum(v, COMPLETION_SPLIT)?,
            }
        }
        let generation = self.present(&f, "gen", generation)?;
        let width = self.present(&f, "width", width)?;
        link.generation = u8::try_from(generation).unwrap_or(u8::MAX);
        link.width = u8::try_from(width).unwrap_or(u8::MAX);
        Ok(link)
    }

    // ----- serde's reading of values, with its wording -----

    /// A struct-like value named `name` (for messages) with `fields`, in declaration order.
    fn fields<'t, 'i>(
        &self,
        v: &'t Value<'i>,
        name: &'static str,
        fields: &'static [&'static str],
    ) -> Result<Fields<'t, 'i>> {
        let (entries, seq_len) = match v.get_ref() {
            DeValue::Table(table) => {
                let entries = table
                    .iter()
                    .map(|(k, v)| {
                        fields
                            .iter()
                            .find(|&&f| f == k.get_ref().as_ref())
                            .map_or(Entry::Unknown(k), |&f| Entry::Field(f, v))
                    })
                    .collect();
                (entries, None)
            }
            DeValue::Array(items) => {
                let entries = fields
                    .iter()
                    .zip(items)
                    .map(|(&f, v)| Entry::Field(f, v))
                    .collect();
                (entries, Some(items.len()))
            }
            _ => return Err(self.invalid_type(v, &format!("struct {name}"))),
        };
        Ok(Fields {
            entries,
            seq_len,
            span: v.span(),
            name,
            names: fields,
        })
    }

    /// The field and value of an entry, or the error for a key that is not a field.
    fn entry<'t, 'i>(
        &self,
        f: &Fields<'_, '_>,
        e: &Entry<'t, 'i>,
    ) -> Result<(&'static str, &'t Value<'i>)> {
        match *e {
            Entry::Field(key, v) => Ok((key, v)),
            Entry::Unknown(k) => Err(self.topo_err(
                &k.span(),
                format!(
                    "unknown field `{}`, expected {}",
                    k.get_ref().as_ref(),
                    one_of(f.names)
                ),
            )),
        }
    }

    /// A required field's value, or the error for its absence.
    fn present<T>(&self, f: &Fields<'_, '_>, key: &str, value: Option<T>) -> Result<T> {
        value.ok_or_else(|| {
            let message = match f.seq_len {
                Some(len) => format!(
                    "invalid length {len}, expected struct {} with {} elements",
                    f.name,
                    f.names.len()
                ),
                None => format!("missing field `{key}`"),
            };
            self.topo_err(&f.span, message)
        })
    }

    fn de_list<T>(
        &self,
        v: &Value<'_>,
        mut item: impl FnMut(&Self, &Value<'_>) -> Result<T>,
    ) -> Result<Vec<T>> {
        let DeValue::Array(items) = v.get_ref() else {
            return Err(self.invalid_type(v, "a sequence"));
        };
        items.iter().map(|v| item(self, v)).collect()
    }

    fn de_bool(&self, v: &Value<'_>) -> Result<bool> {
        match v.get_ref() {
            DeValue::Boolean(b) => Ok(*b),
            _ => Err(self.invalid_type(v, "a boolean")),
        }
    }

    fn de_string(&self, v: &Value<'_>) -> Result<String> {
        match v.get_ref() {
            DeValue::String(s) => Ok(s.as_ref().to_owned()),
            _ => Err(self.invalid_type(v, "a string")),
        }
    }

    fn de_bdf(&self, v: &Value<'_>) -> Result<Bdf> {
        self.de_string(v)?
            .parse()
            .map_err(|e| self.topo_err(&v.span(), e))
    }

    /// An unsigned integer of type `ty` (`u8`, `u16`, `u32`) up to `max`.
    fn de_uint(&self, v: &Value<'_>, ty: &str, max: u64) -> Result<u64> {
        let DeValue::Integer(i) = v.get_ref() else {
            return Err(self.invalid_type(v, ty));
        };
        let out_of_range = |n: &dyn std::fmt::Display| {
            self.topo_err(
                &v.span(),
                format!("invalid value: integer `{n}`, expected {ty}"),
            )
        };
        match int(i) {
            Int::Signed(n) => u64::try_from(n)
                .ok()
                .filter(|&n| n <= max)
                .ok_or_else(|| out_of_range(&n)),
            Int::Unsigned(n) if n <= max => Ok(n),
            Int::Unsigned(n) => Err(out_of_range(&n)),
            Int::Wide(_) | Int::Overflow => Err(self.invalid_type(v, ty)),
        }
    }

    /// A BAR size or address: a non-negative integer or a string with a unit or in hex.
    fn de_size(&self, v: &Value<'_>) -> Result<u64> {
        match v.get_ref() {
            DeValue::String(s) => parse_size_or_address(s).map_err(|e| self.topo_err(&v.span(), e)),
            DeValue::Integer(i) => match int(i) {
                Int::Signed(n) => u64::try_from(n).map_err(|_| {
                    self.topo_err(
                        &v.span(),
                        format!("expected a non-negative value, found {n}"),
                    )
                }),
                Int::Unsigned(n) => Ok(n),
                Int::Wide(_) | Int::Overflow => Err(self.invalid_type(v, SIZE_EXPECTED)),
            },
            _ => Err(self.invalid_type(v, SIZE_EXPECTED)),
        }
    }

    /// A BAR bus offset: an integer or a string in hex, possibly negative.
    fn de_offset(&self, v: &Value<'_>) -> Result<i64> {
        match v.get_ref() {
            DeValue::String(s) => parse_offset(s).map_err(|e| self.topo_err(&v.span(), e)),
            DeValue::Integer(i) => match int(i) {
                Int::Signed(n) => Ok(n),
                Int::Unsigned(n) => {
                    Err(self.topo_err(&v.span(), format!("offset {n} does not fit 64 signed bits")))
                }
                Int::Wide(_) | Int::Overflow => Err(self.invalid_type(v, OFFSET_EXPECTED)),
            },
            _ => Err(self.invalid_type(v, OFFSET_EXPECTED)),
        }
    }

    /// A unit enum: its name as a string, or a one-entry table `{ name = {} }` (or `[]`).
    fn de_enum<T: Copy>(&self, v: &Value<'_>, variants: &[(&str, T)]) -> Result<T> {
        let names: Vec<&str> = variants.iter().map(|&(n, _)| n).collect();
        let variant = |name: &str, span: &Range<usize>| {
            variants
                .iter()
                .find(|&&(n, _)| n == name)
                .map(|&(_, value)| value)
                .ok_or_else(|| {
                    self.topo_err(
                        span,
                        format!("unknown variant `{name}`, expected {}", one_of(&names)),
                    )
                })
        };
        match v.get_ref() {
            DeValue::String(s) => variant(s.as_ref(), &v.span()),
            DeValue::Table(table) => {
                let mut entries = table.iter();
                let (Some((key, value)), None) = (entries.next(), entries.next()) else {
                    let message = if table.is_empty() {
                        "wanted exactly 1 element, found 0 elements"
                    } else {
                        "wanted exactly 1 element, more than 1 element"
                    };
                    return Err(self.topo_err(&v.span(), message));
                };
                let found = variant(key.get_ref().as_ref(), &key.span())?;
                let problem = match value.get_ref() {
                    DeValue::Array(items) if items.is_empty() => None,
                    DeValue::Array(_) => Some("expected empty array".to_owned()),
                    DeValue::Table(t) if t.is_empty() => None,
                    DeValue::Table(_) => Some("expected empty table".to_owned()),
                    other => Some(format!("expected table, found {}", other.type_str())),
                };
                match problem {
                    Some(message) => Err(self.topo_err(&value.span(), message)),
                    None => Ok(found),
                }
            }
            _ => Err(self.topo_err(&v.span(), "wanted string or table")),
        }
    }
}

/// Returns where a [`peerdma_pci::Error`] about a node points: the key of the node's declaration that is at
/// fault (`bdf`, `parent`, `link`, the BAR with the index in question) or else its `name` value. For a
/// duplicated name, its last declaration. `None` when the node's declaration is not known (the caller
/// points at `[topology]`).
fn topology_error_span(decls: &[Decl], err: &peerdma_pci::Error) -> Option<Range<usize>> {
    use peerdma_pci::Error as E;
    let name = err.node()?;
    let decl = decls
        .iter()
        .filter(|d| d.name == name)
        .max_by_key(|d| d.name_span.start)?;
    let key = |k: &str| decl.keys.get(k).cloned();
    let bar = |index: u8| {
        decl.bars
            .iter()
            .find(|(i, _)| *i == index)
            .map(|(_, span)| span.clone())
            .or_else(|| key("bars"))
    };
    let specific = match err {
        E::MissingParent { .. }
        | E::ParentRequired { .. }
        | E::EndpointAsParent { .. }
        | E::BadParent { .. }
        | E::Cycle { .. } => key("parent"),
        E::MissingBdf { .. } | E::DuplicateBdf { .. } => key("bdf"),
        E::InvalidBar { index, .. } | E::OverlappingBars { index, .. } => bar(*index),
        E::InvalidLink { .. } => key("link"),
        E::AttributeNotAllowed { attribute, .. } => match *attribute {
            "bars" => key("bars"),
            "acs" => key("acs"),
            "a bdf" => key("bdf"),
            "a link" => key("link"),
            _ => None,
        },
        E::DuplicateName { .. } | E::UnknownNode { .. } => None,
    };
    specific.or(Some(decl.name_span.clone()))
}
