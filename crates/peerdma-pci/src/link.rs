//! PCIe link bandwidth and latency: the closed-form model of `spec/numbers.md` §1 (Neugebauer et al.,
//! "Understanding PCIe performance for end host networking", SIGCOMM'18, and its public pcie-bench model),
//! per-hop latency, and a coarse model of several flows sharing one link.
//!
//! # The model, in steps
//! 1. **Raw rate** (Gb/s) = GT/s × encoding × lanes, with GT/s 2.5, 5, 8, 16, 32, 64, 128 for Gen1..Gen7 and
//!    encoding 8/10 (Gen1–2), 128/130 (Gen3–5), 242/256 (Gen6–7).
//! 2. **Usable TLP rate** = raw × (1 − (8 / ack_limit + 8 / fc_update + 4 / 1538)): one 8-byte DLLP per Ack
//!    interval and per flow-control-update interval, looked up by (generation, width, MPS) in
//!    `data/pcie-dll-tables.toml` (a copy of `spec/pcie-dll-tables.toml`; PCIe Base Spec r5.0 Tables
//!    2-46..2-48 and 3-7..3-9), plus a 4-byte SKIP ordered set every 1538 bytes.
//! 3. **Per-TLP overhead** = 8 (framing + sequence number + LCRC) + 4 (common TLP header) + the type's header
//!    (memory write / read request: 12 with 64-bit addresses, 8 with 32-bit; completion with data: 8),
//!    + 4 with ECRC.
//! 4. **Write** of S bytes: ⌈S / MPS⌉ write TLPs; effective rate = usable × S / (S + TLPs × overhead).
//! 5. **Read** of S bytes: ⌈S / MRRS⌉ read requests go upstream (header only); completions come back
//!    downstream, split at MPS (or at the RCB on chipsets that do so, [`CompletionSplit::Rcb`]). The effective
//!    rate is the data share of whichever direction is the bottleneck: usable × S / max(downstream bytes,
//!    upstream bytes). With any MRRS ≥ 128 the downstream (completion) direction is the bottleneck.
//!
//! **Interpretation (completion count).** numbers.md says ⌈S / MPS⌉ completions (⌈S / RCB⌉ when split at the
//! RCB), which is what pcie-bench computes. A completion never answers two read requests, so when MRRS is
//! smaller than the split size each request gets its own completion: we count ⌈S / min(MPS, MRRS)⌉ (and
//! ⌈S / min(RCB, MPS, MRRS)⌉ when splitting at the RCB). All sizes are powers of two, so this equals the
//! literal rule whenever MRRS ≥ MPS — in particular for every reference row of numbers.md §1 — and only
//! differs where the literal rule would undercount.
//!
//! **DLL tables.** The Gen1 x32 MPS 2048 row has fc_update 248 but ack_limit 148, and Gen2 x32 MPS 4096 has
//! ack_limit 237 but fc_update 327. Both asymmetries are in the spec file and in pcie-bench's tables; they
//! are kept as published (they look like transcription slips upstream, but changing them would be fudging).
//!
//! Deliberate simplifications (DESIGN.md §9): PCIe is modelled per transfer with closed-form costs, not per
//! symbol; requests are assumed aligned; replays, credits running out and bit errors are not modelled. A link
//! is full duplex and symmetric: both directions have the same usable rate.

use std::sync::OnceLock;

use peerdma_core::SimDuration;
use serde::{Deserialize, Serialize};

use crate::{Error, LinkParam, Result};

/// The DLL interval tables, embedded at build time (`spec/pcie-dll-tables.toml`).
const DLL_TABLES_TOML: &str = include_str!("../data/pcie-dll-tables.toml");

/// Transfer rates in GT/s per lane, Gen1..Gen7 (numbers.md §1).
const GT_PER_S: [f64; 7] = [2.5, 5.0, 8.0, 16.0, 32.0, 64.0, 128.0];

/// Bytes of framing, sequence number and LCRC around every TLP (numbers.md §1).
pub const TLP_FRAMING_BYTES: u32 = 8;
/// The common 4-byte TLP header (first DW) of every TLP (numbers.md §1).
pub const TLP_COMMON_HEADER_BYTES: u32 = 4;
/// Memory read/write request header beyond the first DW, 64-bit addressing (numbers.md §1).
pub const MEM_REQ_HEADER_64_BYTES: u32 = 12;
/// Memory read/write request header beyond the first DW, 32-bit addressing (numbers.md §1).
pub const MEM_REQ_HEADER_32_BYTES: u32 = 8;
/// Completion-with-data header beyond the first DW (numbers.md §1).
pub const CPLD_HEADER_BYTES: u32 = 8;
/// The optional ECRC digest (numbers.md §1).
pub const ECRC_BYTES: u32 = 4;

/// Per-hop latency of a PCIe switch or root port, store-and-forward aside (cut-through, port to port).
///
/// Not in `spec/numbers.md`: \[B\] vendor figure for a Gen5 switch (Broadcom PEX89000 family, ≈ 115 ns port to
/// port, as quoted by adapter vendors). Order of magnitude only; keep it a configurable parameter, never a
/// tested constant.
pub const DEFAULT_HOP_LATENCY: SimDuration = SimDuration::from_nanos(115);

/// Extra latency when a transfer crosses to the other socket: ≈ 107 ns per small read (docs/figures.md §2;
/// the DMA layer's `dma.remote_socket` default).
pub const REMOTE_SOCKET_LATENCY: SimDuration = SimDuration::from_nanos(107);

/// Default Max Payload Size of a [`LinkSpec`] (the numbers.md §1 reference configuration).
pub const DEFAULT_MPS: u32 = 256;
/// Default Max Read Request Size of a [`LinkSpec`] (the numbers.md §1 reference configuration).
pub const DEFAULT_MRRS: u32 = 512;
/// Default Read Completion Boundary of a [`LinkSpec`] (the numbers.md §1 reference configuration).
pub const DEFAULT_RCB: u32 = 64;

const WIDTHS: [u8; 6] = [1, 2, 4, 8, 16, 32];
const RCBS: [u32; 4] = [64, 128, 256, 512];

/// Where a completer splits the completions of one read request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CompletionSplit {
    /// At the Max Payload Size (most modern root complexes; the numbers.md reference).
    #[default]
    Mps,
    /// At the Read Completion Boundary (observed on several older chipsets).
    Rcb,
}

/// A link description as a scenario writes it; [`LinkConfig::from_spec`] validates it.
///
/// In TOML: `link = { gen = 4, width = 16, mps = 256, mrrs = 512 }`; everything but `gen` and `width` has a
/// default (MPS 256, MRRS 512, RCB 64, 64-bit addresses, no ECRC, completions split at MPS).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkSpec {
    /// PCIe generation, 1–7.
    #[serde(rename = "gen")]
    pub generation: u8,
    /// Negotiated width in lanes: 1, 2, 4, 8, 16 or 32.
    pub width: u8,
    /// Max Payload Size in bytes: a power of two in 128..=4096.
    #[serde(default = "default_mps")]
    pub mps: u32,
    /// Max Read Request Size in bytes: a power of two in 128..=4096.
    #[serde(default = "default_mrrs")]
    pub mrrs: u32,
    /// Read Completion Boundary in bytes: 64, 128, 256 or 512.
    #[serde(default = "default_rcb")]
    pub rcb: u32,
    /// Whether requests carry 64-bit addresses (4-DW headers).
    #[serde(default = "default_addr64")]
    pub addr64: bool,
    /// Whether every TLP carries an ECRC digest.
    #[serde(default)]
    pub ecrc: bool,
    /// Where completions are split.
    #[serde(default)]
    pub completion_split: CompletionSplit,
}

fn default_mps() -> u32 {
    DEFAULT_MPS
}
fn default_mrrs() -> u32 {
    DEFAULT_MRRS
}
fn default_rcb() -> u32 {
    DEFAULT_RCB
}
fn default_addr64() -> bool {
    true
}

impl LinkSpec {
    /// Creates a spec with the default MPS, MRRS, RCB, addressing and completion split.
    pub fn new(generation: u8, width: u8) -> Self {
        Self {
            generation,
            width,
            mps: DEFAULT_MPS,
            mrrs: DEFAULT_MRRS,
            rcb: DEFAULT_RCB,
            addr64: true,
            ecrc: false,
            completion_split: CompletionSplit::Mps,
        }
    }
}

/// A validated PCIe link configuration and its bandwidth model (module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LinkConfig {
    generation: u8,
    width: u8,
    mps: u32,
    mrrs: u32,
    rcb: u32,
    addr64: bool,
    ecrc: bool,
    completion_split: CompletionSplit,
    /// Ack DLLP interval in bytes, from the table by (generation, width, MPS).
    ack_limit: u32,
    /// Flow-control update DLLP interval in bytes, from the table by (generation, width, MPS).
    fc_update: u32,
}

/// The two kinds of DMA transfer the model prices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transfer {
    /// Memory writes from the initiator (posted; data flows one way).
    Write,
    /// Memory reads by the initiator (requests one way, completions with data the other).
    Read,
}

impl LinkConfig {
    /// Creates a link of `generation` and `width` with the given MPS and MRRS, RCB 64, 64-bit addresses, no
    /// ECRC and completions split at MPS.
    ///
    /// # Errors
    /// [`Error::InvalidLink`] (with no node) when a parameter is outside what PCIe and the DLL tables allow.
    pub fn new(generation: u8, width: u8, mps: u32, mrrs: u32) -> Result<Self> {
        let bad = |param, value: u64, expected| Error::InvalidLink {
            node: None,
            param,
            value,
            expected,
        };
        if !(1..=7).contains(&generation) {
            return Err(bad(LinkParam::Generation, generation.into(), "1..=7"));
        }
        if !WIDTHS.contains(&width) {
            return Err(bad(
                LinkParam::Width,
                width.into(),
                "one of 1, 2, 4, 8, 16, 32",
            ));
        }
        if !is_pow2_in_table_range(mps) {
            return Err(bad(
                LinkParam::Mps,
                mps.into(),
                "a power of two in 128..=4096",
            ));
        }
        if !is_pow2_in_table_range(mrrs) {
            return Err(bad(
                LinkParam::Mrrs,
                mrrs.into(),
                "a power of two in 128..=4096",
            ));
        }
        let tables = tables();
        let (Some(ack_limit), Some(fc_update)) = (
            tables.ack_limit.lookup(generation, width, mps),
            tables.fc_update.lookup(generation, width, mps),
        ) else {
            return Err(bad(
                LinkParam::Mps,
                mps.into(),
                "an mps the DLL tables cover for this generation and width",
            ));
        };
        Ok(Self {
            generation,
            width,
            mps,
            mrrs,
            rcb: DEFAULT_RCB,
            addr64: true,
            ecrc: false,
            completion_split: CompletionSplit::Mps,
            ack_limit,
            fc_update,
        })
    }

    /// Creates a link from its scenario description.
    ///
    /// # Errors
    /// [`Error::InvalidLink`] (with no node) when a parameter is impossible.
    pub fn from_spec(spec: &LinkSpec) -> Result<Self> {
        Ok(Self::new(spec.generation, spec.width, spec.mps, spec.mrrs)?
            .with_rcb(spec.rcb)?
            .with_addr64(spec.addr64)
            .with_ecrc(spec.ecrc)
            .with_completion_split(spec.completion_split))
    }

    /// Returns the scenario description of this link.
    pub fn spec(&self) -> LinkSpec {
        LinkSpec {
            generation: self.generation,
            width: self.width,
            mps: self.mps,
            mrrs: self.mrrs,
            rcb: self.rcb,
            addr64: self.addr64,
            ecrc: self.ecrc,
            completion_split: self.completion_split,
        }
    }

    /// Returns the link with another Read Completion Boundary.
    ///
    /// # Errors
    /// [`Error::InvalidLink`] unless `rcb` is 64, 128, 256 or 512.
    pub fn with_rcb(mut self, rcb: u32) -> Result<Self> {
        if !RCBS.contains(&rcb) {
            return Err(Error::InvalidLink {
                node: None,
                param: LinkParam::Rcb,
                value: rcb.into(),
                expected: "one of 64, 128, 256, 512",
            });
        }
        self.rcb = rcb;
        Ok(self)
    }

    /// Returns the link with 64-bit (`true`) or 32-bit request addressing.
    pub fn with_addr64(mut self, addr64: bool) -> Self {
        self.addr64 = addr64;
        self
    }

    /// Returns the link with ECRC on or off.
    pub fn with_ecrc(mut self, ecrc: bool) -> Self {
        self.ecrc = ecrc;
        self
    }

    /// Returns the link with another completion-splitting rule.
    pub fn with_completion_split(mut self, split: CompletionSplit) -> Self {
        self.completion_split = split;
        self
    }

    /// Returns the PCIe generation (1–7).
    pub fn generation(&self) -> u8 {
        self.generation
    }

    /// Returns the width in lanes.
    pub fn width(&self) -> u8 {
        self.width
    }

    /// Returns the Max Payload Size in bytes.
    pub fn mps(&self) -> u32 {
        self.mps
    }

    /// Returns the Max Read Request Size in bytes.
    pub fn mrrs(&self) -> u32 {
        self.mrrs
    }

    /// Returns the Read Completion Boundary in bytes.
    pub fn rcb(&self) -> u32 {
        self.rcb
    }

    /// Returns whether requests use 64-bit addresses.
    pub fn addr64(&self) -> bool {
        self.addr64
    }

    /// Returns whether TLPs carry ECRC.
    pub fn ecrc(&self) -> bool {
        self.ecrc
    }

    /// Returns where completions are split.
    pub fn completion_split(&self) -> CompletionSplit {
        self.completion_split
    }

    /// Returns the raw link rate in Gb/s: GT/s × encoding × lanes (step 1).
    pub fn raw_gbps(&self) -> f64 {
        let idx = usize::from(self.generation - 1);
        let encoding = match self.generation {
            1 | 2 => 8.0 / 10.0,
            3..=5 => 128.0 / 130.0,
            _ => 242.0 / 256.0,
        };
        GT_PER_S[idx] * encoding * f64::from(self.width)
    }

    /// Returns the rate left for TLPs in Gb/s, after Ack and FC-update DLLPs and SKIP ordered sets (step 2).
    pub fn usable_tlp_gbps(&self) -> f64 {
        let t = tables();
        let dllp = f64::from(t.dllp_bytes);
        let overhead = dllp / f64::from(self.ack_limit)
            + dllp / f64::from(self.fc_update)
            + f64::from(t.skip_length_bytes) / f64::from(t.skip_interval_bytes);
        self.raw_gbps() * (1.0 - overhead)
    }

    /// Returns the Ack DLLP interval (bytes) used for this link.
    pub fn ack_limit(&self) -> u32 {
        self.ack_limit
    }

    /// Returns the flow-control update DLLP interval (bytes) used for this link.
    pub fn fc_update(&self) -> u32 {
        self.fc_update
    }

    fn ecrc_bytes(&self) -> u32 {
        if self.ecrc { ECRC_BYTES } else { 0 }
    }

    /// Returns the bytes each memory write or read request TLP adds beyond its payload (step 3).
    pub fn request_overhead_bytes(&self) -> u32 {
        let hdr = if self.addr64 {
            MEM_REQ_HEADER_64_BYTES
        } else {
            MEM_REQ_HEADER_32_BYTES
        };
        TLP_FRAMING_BYTES + TLP_COMMON_HEADER_BYTES + hdr + self.ecrc_bytes()
    }

    /// Returns the bytes each completion with data adds beyond its payload (step 3).
    pub fn completion_overhead_bytes(&self) -> u32 {
        TLP_FRAMING_BYTES + TLP_COMMON_HEADER_BYTES + CPLD_HEADER_BYTES + self.ecrc_bytes()
    }

    /// Returns the number of write TLPs for `size` bytes: ⌈size / MPS⌉.
    pub fn write_tlps(&self, size: u64) -> u64 {
        size.div_ceil(self.mps.into())
    }

    /// Returns the number of read request TLPs for `size` bytes: ⌈size / MRRS⌉.
    pub fn read_requests(&self, size: u64) -> u64 {
        size.div_ceil(self.mrrs.into())
    }

    /// Returns the number of completions with data for a read of `size` bytes (see "Interpretation" in the
    /// module docs).
    pub fn completions(&self, size: u64) -> u64 {
        let split = match self.completion_split {
            CompletionSplit::Mps => self.mps,
            CompletionSplit::Rcb => self.rcb.min(self.mps),
        };
        size.div_ceil(split.min(self.mrrs).into())
    }

    /// Returns the bytes on the wire (TLP level) for a write of `size` bytes.
    pub fn write_wire_bytes(&self, size: u64) -> u64 {
        size.saturating_add(
            self.write_tlps(size)
                .saturating_mul(self.request_overhead_bytes().into()),
        )
    }

    /// Returns the bytes on the wire (TLP level) for a read of `size` bytes, in the bottleneck direction.
    pub fn read_wire_bytes(&self, size: u64) -> u64 {
        let down = size.saturating_add(
            self.completions(size)
                .saturating_mul(self.completion_overhead_bytes().into()),
        );
        let up = self
            .read_requests(size)
            .saturating_mul(self.request_overhead_bytes().into());
        down.max(up)
    }

    /// Returns the effective write bandwidth in Gb/s for transfers of `size` bytes (step 4); 0 for size 0.
    pub fn effective_write_gbps(&self, size: u64) -> f64 {
        self.effective(size, self.write_wire_bytes(size))
    }

    /// Returns the effective read bandwidth in Gb/s for transfers of `size` bytes (step 5); 0 for size 0.
    pub fn effective_read_gbps(&self, size: u64) -> f64 {
        self.effective(size, self.read_wire_bytes(size))
    }

    /// Returns the effective bandwidth in Gb/s of a transfer of `size` bytes.
    pub fn effective_gbps(&self, transfer: Transfer, size: u64) -> f64 {
        match transfer {
            Transfer::Write => self.effective_write_gbps(size),
            Transfer::Read => self.effective_read_gbps(size),
        }
    }

    fn effective(&self, size: u64, wire: u64) -> f64 {
        if size == 0 {
            return 0.0;
        }
        self.usable_tlp_gbps() * bytes_f64(size) / bytes_f64(wire)
    }

    /// Returns the time to stream a transfer of `size` bytes through this link alone at its effective rate,
    /// rounded up to a nanosecond (serialization only: add [`path_latency`] for the hops).
    pub fn transfer_time(&self, transfer: Transfer, size: u64) -> SimDuration {
        let wire = match transfer {
            Transfer::Write => self.write_wire_bytes(size),
            Transfer::Read => self.read_wire_bytes(size),
        };
        time_at_gbps(wire, self.usable_tlp_gbps())
    }

    /// Returns the time to write `size` bytes through this link ([`LinkConfig::transfer_time`]).
    pub fn write_time(&self, size: u64) -> SimDuration {
        self.transfer_time(Transfer::Write, size)
    }

    /// Returns the time to read `size` bytes through this link ([`LinkConfig::transfer_time`]).
    pub fn read_time(&self, size: u64) -> SimDuration {
        self.transfer_time(Transfer::Read, size)
    }
}

fn is_pow2_in_table_range(v: u32) -> bool {
    v.is_power_of_two() && (128..=4096).contains(&v)
}

#[expect(
    clippy::cast_precision_loss,
    reason = "byte counts are exact below 2^53; above it a 1e-16 relative error cannot matter to a bandwidth"
)]
fn bytes_f64(n: u64) -> f64 {
    n as f64
}

/// Returns the time to move `bytes` at `gbps` Gb/s (1 Gb/s = 1 bit/ns), rounded up to a nanosecond;
/// [`SimDuration::ZERO`] for no bytes, saturating for a zero or non-finite rate.
pub fn time_at_gbps(bytes: u64, gbps: f64) -> SimDuration {
    if bytes == 0 {
        return SimDuration::ZERO;
    }
    let ns = (bytes_f64(bytes) * 8.0 / gbps).ceil();
    if !(0.0..18_446_744_073_709_551_615.0).contains(&ns) {
        return SimDuration::from_nanos(u64::MAX);
    }
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "checked above: finite, non-negative and below u64::MAX"
    )]
    let ns = ns as u64;
    SimDuration::from_nanos(ns)
}

/// Returns the latency of crossing `nr_hops` switch or root ports at `hop_latency` each (e.g.
/// [`DEFAULT_HOP_LATENCY`]).
pub fn path_latency(nr_hops: u32, hop_latency: SimDuration) -> SimDuration {
    hop_latency.saturating_mul(nr_hops.into())
}

/// Returns the bandwidth each of `nr_flows` concurrent flows gets on a link of `capacity_gbps`: an equal
/// share; a lone (or first) flow gets all of it.
pub fn fair_share_gbps(capacity_gbps: f64, nr_flows: u32) -> f64 {
    capacity_gbps / f64::from(nr_flows.max(1))
}

/// One link direction shared by concurrent flows.
///
/// **Coarse max-min model.** Every flow on the link gets `capacity / N`. A flow crossing several shared links
/// runs at the smallest of its shares ([`SharedLink::bottleneck_gbps`]). Bandwidth a flow cannot use because
/// another link limits it is *not* handed to the other flows here (true max-min fairness would redistribute
/// it), so the model is pessimistic for unequal paths. It matches numbers.md §7's "model the uplink as a
/// shared bottleneck" for the common case of equal flows through one uplink.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SharedLink {
    capacity_gbps: f64,
    nr_flows: u32,
}

impl SharedLink {
    /// Creates an idle shared link of `capacity_gbps` (typically an effective rate of a [`LinkConfig`]).
    pub fn new(capacity_gbps: f64) -> Self {
        Self {
            capacity_gbps,
            nr_flows: 0,
        }
    }

    /// Returns the link's capacity in Gb/s.
    pub fn capacity_gbps(&self) -> f64 {
        self.capacity_gbps
    }

    /// Returns the number of active flows.
    pub fn nr_flows(&self) -> u32 {
        self.nr_flows
    }

    /// Adds a flow and returns the new per-flow share.
    pub fn join(&mut self) -> f64 {
        self.nr_flows = self.nr_flows.saturating_add(1);
        self.per_flow_gbps()
    }

    /// Removes a flow; returns `false` (and changes nothing) when no flow was active.
    pub fn leave(&mut self) -> bool {
        if self.nr_flows == 0 {
            return false;
        }
        self.nr_flows -= 1;
        true
    }

    /// Returns what each active flow gets (the whole capacity when idle: what a new lone flow would get).
    pub fn per_flow_gbps(&self) -> f64 {
        fair_share_gbps(self.capacity_gbps, self.nr_flows)
    }

    /// Returns the rate of a flow crossing all of `links`: the smallest per-flow share, or infinity for an
    /// empty path (nothing limits it).
    pub fn bottleneck_gbps<'a>(links: impl IntoIterator<Item = &'a SharedLink>) -> f64 {
        links
            .into_iter()
            .map(SharedLink::per_flow_gbps)
            .fold(f64::INFINITY, f64::min)
    }
}

/// One DLL interval table, indexed by [generation − 1][log2(width)][log2(MPS) − 7].
#[derive(Debug)]
struct IntervalTable([[[u32; 6]; 6]; 7]);

impl IntervalTable {
    fn lookup(&self, generation: u8, width: u8, mps: u32) -> Option<u32> {
        let g = usize::from(generation.checked_sub(1)?);
        let w = WIDTHS.iter().position(|&x| x == width)?;
        let m = usize::try_from(mps.checked_ilog2()?.checked_sub(7)?).ok()?;
        let v = *self.0.get(g)?.get(w)?.get(m)?;
        (v != 0).then_some(v)
    }
}

/// The DLL overhead parameters of `spec/pcie-dll-tables.toml`.
#[derive(Debug)]
struct DllTables {
    dllp_bytes: u32,
    skip_interval_bytes: u32,
    skip_length_bytes: u32,
    ack_limit: IntervalTable,
    fc_update: IntervalTable,
}

type RawTable = std::collections::BTreeMap<
    String,
    std::collections::BTreeMap<String, std::collections::BTreeMap<String, u32>>,
>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDllTables {
    dllp_bytes: u32,
    skip_interval_bytes: u32,
    skip_length_bytes: u32,
    ack_limit: RawTable,
    fc_update: RawTable,
}

fn convert_table(name: &str, raw: &RawTable) -> std::result::Result<IntervalTable, String> {
    let mut out = [[[0u32; 6]; 6]; 7];
    for (g, gen_row) in out.iter_mut().enumerate() {
        let gen_key = format!("gen{}", g + 1);
        let widths = raw
            .get(&gen_key)
            .ok_or_else(|| format!("{name}.{gen_key} missing"))?;
        for (w, width_row) in gen_row.iter_mut().enumerate() {
            let width_key = format!("x{}", WIDTHS[w]);
            let mpss = widths
                .get(&width_key)
                .ok_or_else(|| format!("{name}.{gen_key}.{width_key} missing"))?;
            for (m, slot) in width_row.iter_mut().enumerate() {
                let mps_key = format!("mps{}", 128u32 << m);
                let v = *mpss
                    .get(&mps_key)
                    .ok_or_else(|| format!("{name}.{gen_key}.{width_key}.{mps_key} missing"))?;
                if v == 0 {
                    return Err(format!("{name}.{gen_key}.{width_key}.{mps_key} is zero"));
                }
                *slot = v;
            }
        }
    }
    Ok(IntervalTable(out))
}

fn parse_tables(text: &str) -> std::result::Result<DllTables, String> {
    let raw: RawDllTables = toml::from_str(text).map_err(|e| e.to_string())?;
    if raw.skip_interval_bytes == 0 {
        return Err("skip_interval_bytes is zero".into());
    }
    Ok(DllTables {
        dllp_bytes: raw.dllp_bytes,
        skip_interval_bytes: raw.skip_interval_bytes,
        skip_length_bytes: raw.skip_length_bytes,
        ack_limit: convert_table("ack_limit", &raw.ack_limit)?,
        fc_update: convert_table("fc_update", &raw.fc_update)?,
    })
}

fn tables() -> &'static DllTables {
    static TABLES: OnceLock<DllTables> = OnceLock::new();
    TABLES.get_or_init(|| {
        parse_tables(DLL_TABLES_TOML)
            .expect("the embedded pcie-dll-tables.toml is complete (checked by a unit test)")
    })
}

#[cfg(test)]
mod tests;
