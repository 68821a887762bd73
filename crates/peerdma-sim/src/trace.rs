//! Trace and metric sinks. Both are plain ordered data, so two runs with one seed print the same bytes.
//!
//! A [`TraceEvent`] is one record of the trace (kept only when the run asks for a trace): an instant, the
//! begin or end of a span, a flow's start or end, or a counter sample, drawn on a [`Track`] with readable
//! [`TraceArg`]s. How model code records them, and what the metrics keep even without a trace, is in
//! [`crate::Sim`]'s observability methods (`span`, `instant`, `flow_begin`/`flow_end`, `gauge`, `latency`,
//! `transfer`) and in [`crate::Stats`].

use std::collections::BTreeMap;
use std::fmt;

use peerdma_core::SimTime;
use serde::Serialize;

/// Where a trace record is drawn.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Track {
    /// The track of the agent (simulated thread) that records it: the kernel work a thread does in its own
    /// context (its faults, the invalidations it triggers).
    Agent,
    /// Device `name`'s process, on a lane of the agent that drives it (so that one device used by two
    /// threads draws two lanes whose spans nest).
    Device(String),
}

impl Track {
    /// The track of device `name`.
    pub fn device(name: impl Into<String>) -> Self {
        Self::Device(name.into())
    }
}

/// A readable field of a trace record (`"pages": 16`, `"va": "0x7f0000001000"`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum TraceArg {
    /// A number.
    U64(u64),
    /// A signed number.
    I64(i64),
    /// An address or mask, shown as `0x...` text.
    #[serde(serialize_with = "hex")]
    Hex(u64),
    /// Text.
    Str(String),
    /// A flag.
    Bool(bool),
}

#[expect(
    clippy::trivially_copy_pass_by_ref,
    reason = "serde's serialize_with passes a reference"
)]
fn hex<S: serde::Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{v:#x}"))
}

impl fmt::Display for TraceArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::U64(v) => write!(f, "{v}"),
            Self::I64(v) => write!(f, "{v}"),
            Self::Hex(v) => write!(f, "{v:#x}"),
            Self::Str(s) => f.write_str(s),
            Self::Bool(b) => write!(f, "{b}"),
        }
    }
}

impl From<u64> for TraceArg {
    fn from(v: u64) -> Self {
        Self::U64(v)
    }
}

impl From<u32> for TraceArg {
    fn from(v: u32) -> Self {
        Self::U64(v.into())
    }
}

impl From<usize> for TraceArg {
    fn from(v: usize) -> Self {
        Self::U64(v as u64)
    }
}

impl From<i64> for TraceArg {
    fn from(v: i64) -> Self {
        Self::I64(v)
    }
}

impl From<bool> for TraceArg {
    fn from(v: bool) -> Self {
        Self::Bool(v)
    }
}

impl From<&str> for TraceArg {
    fn from(v: &str) -> Self {
        Self::Str(v.to_owned())
    }
}

impl From<String> for TraceArg {
    fn from(v: String) -> Self {
        Self::Str(v)
    }
}

/// The fields of a trace record, in the order given.
pub type TraceArgs = Vec<(&'static str, TraceArg)>;

/// What a trace record marks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Phase {
    /// A point in time.
    Instant,
    /// A span begins (matched by the next [`Phase::End`] of the same kind on the same track).
    Begin,
    /// A span ends.
    End,
    /// A flow (an arrow between tracks) starts; the id pairs it with its end.
    FlowStart(u64),
    /// A flow ends.
    FlowEnd(u64),
    /// A counter track's new value (the record's kind names the counter).
    Counter(i64),
}

/// One trace record: what an agent did, and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TraceEvent {
    /// Simulated time of the event.
    pub time: SimTime,
    /// The agent (task name) that caused it, or `"engine"`.
    pub agent: String,
    /// A short machine-readable kind (`"cpu.fault"`, `"mmu_notifier.invalidate"`).
    pub kind: &'static str,
    /// Human-readable details (the free text of [`crate::Sim::trace`]; empty when `args` say it all).
    pub detail: String,
    /// What it marks.
    pub phase: Phase,
    /// Where it is drawn.
    pub track: Track,
    /// Readable fields.
    pub args: TraceArgs,
}

/// Named counters and duration sums, kept in name order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Metrics {
    /// Monotonic counters (`"cpu.faults"`, `"dmirror.faults"`).
    pub counters: BTreeMap<String, u64>,
}

impl Metrics {
    /// Adds `n` to the counter `name`.
    pub fn add(&mut self, name: &str, n: u64) {
        if let Some(c) = self.counters.get_mut(name) {
            *c += n;
        } else {
            self.counters.insert(name.to_owned(), n);
        }
    }

    /// Returns the counter `name`, 0 if it never moved.
    pub fn get(&self, name: &str) -> u64 {
        self.counters.get(name).copied().unwrap_or(0)
    }
}
