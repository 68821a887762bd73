//! Trace and metric sinks. Both are plain ordered data, so two runs with one seed print the same bytes.

use std::collections::BTreeMap;

use peerdma_core::SimTime;
use serde::Serialize;

/// One trace record: what an agent did, and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TraceEvent {
    /// Simulated time of the event.
    pub time: SimTime,
    /// The agent (task name) that caused it, or `"engine"`.
    pub agent: String,
    /// A short machine-readable kind (`"cpu.fault"`, `"mmu_notifier.invalidate"`).
    pub kind: &'static str,
    /// Human-readable details.
    pub detail: String,
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
