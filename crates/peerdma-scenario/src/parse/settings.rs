//! The `[sim]` and `[timing]` tables of a scenario: engine settings, limits, NUMA nodes, jitter and the
//! timing-model parameters (`crate::params`).

use std::collections::BTreeMap;

use peerdma_core::PAGE_SIZE;
use peerdma_core::timing::ParamUnit;
use toml::Spanned;
use toml::de::DeValue;

use crate::ast::{Limits, SimSettings, TimeMode};
use crate::params;

use super::{MAX_NODES, Parser, Result, Table, Value, describe, list};

impl Parser<'_> {
    /// The `[timing]` table (or one of its dotted-key groups, `prefix` being the keys above it): each entry
    /// is a parameter of the [`params`] registry, written as a quoted key (`"mm.cpu_fault" = "2us"`), a
    /// dotted key (`mm.cpu_fault = "2us"`) or inside a group table (`[timing.mm]`). A time takes a unit
    /// (no unit: nanoseconds), a count is an integer. Unknown keys (with the nearest key), wrong units,
    /// negative values and a parameter set twice are errors at the key or value.
    pub(super) fn timing(
        &self,
        t: &Table<'_, '_>,
        prefix: &str,
        out: &mut BTreeMap<String, u64>,
    ) -> Result<()> {
        for (k, v) in &t.entries {
            let key = if prefix.is_empty() {
                k.get_ref().to_string()
            } else {
                format!("{prefix}.{}", k.get_ref())
            };
            let Some(spec) = params::find(&key) else {
                if params::is_group(&key) {
                    let what = format!(
                        "a group of timing parameters for `{key}` (like `{key}.<name> = \"1us\"`)"
                    );
                    let group = self.table(v, &what)?;
                    self.timing(&group, &key, out)?;
                    continue;
                }
                // Suggest the nearest key, else list the keys of the group written (`mm.*` for
                // `mm.xyz`), else every key.
                let group = key
                    .rsplit_once('.')
                    .map(|(g, _)| g)
                    .filter(|g| params::is_group(g));
                let in_group = |k: &&str| {
                    group.is_none_or(|g| k.strip_prefix(g).is_some_and(|r| r.starts_with('.')))
                };
                let hint = match params::nearest(&key) {
                    Some(near) => {
                        format!("did you mean `{near}`? (`peerdma params` lists them all)")
                    }
                    None => format!(
                        "expected one of: {}",
                        list(params::all_params().iter().map(|p| p.key).filter(in_group))
                    ),
                };
                return Err(self.err(
                    &k.span(),
                    format!("unknown timing parameter `{key}` in `[timing]`; {hint}"),
                ));
            };
            let value = match spec.unit {
                ParamUnit::Time => {
                    if let DeValue::String(s) = v.get_ref()
                        && s.trim_start().starts_with('-')
                    {
                        return Err(self.err(
                            &v.span(),
                            format!("expected a time of 0 or more for `{key}`, found `{s}`"),
                        ));
                    }
                    self.time(v, &key)?.as_nanos()
                }
                ParamUnit::Count => self.uint_as(v, &key, "an integer count")?,
            };
            if out.insert(key.clone(), value).is_some() {
                return Err(self.err(
                    &k.span(),
                    format!("timing parameter `{key}` is set twice in `[timing]`"),
                ));
            }
        }
        Ok(())
    }

    pub(super) fn sim(&self, v: &Value<'_>) -> Result<SimSettings> {
        let t = self.table(v, "the `[sim]` table")?;
        self.allow(
            &t,
            &[
                "seed",
                "time",
                "explore",
                "jitter",
                "time_limit",
                "memory",
                "movable",
                "limits",
                "data",
            ],
        )?;
        let mut sim = SimSettings::default();
        if let Some(v) = t.get("data") {
            sim.data = self.keyword(
                v,
                "data",
                &[
                    ("bytes", peerdma_mm::phys::DataMode::Bytes),
                    ("token", peerdma_mm::phys::DataMode::Token),
                ],
            )?;
        }
        if let Some(v) = t.get("limits") {
            sim.limits = self.limits(v)?;
        }
        if let Some(v) = t.get("seed") {
            sim.seed = self.uint(v, "seed")?;
        }
        if let Some(v) = t.get("time") {
            sim.time = self.keyword(
                v,
                "time",
                &[
                    ("calibrated", TimeMode::Calibrated),
                    ("zero", TimeMode::Zero),
                ],
            )?;
        }
        if let Some(v) = t.get("explore") {
            sim.explore = self.boolean(v, "explore")?;
        }
        if let Some(v) = t.get("jitter") {
            sim.jitter = self.jitter(v)?;
        }
        if let Some(v) = t.get("time_limit") {
            sim.time_limit = self.time(v, "time_limit")?;
        }
        if let Some(v) = t.get("memory") {
            sim.memory = match v.get_ref() {
                DeValue::Array(items) => {
                    if items.is_empty() || items.len() > MAX_NODES {
                        return Err(self.err(
                            &v.span(),
                            format!(
                                "expected 1 to {MAX_NODES} node sizes for `memory`, found {}",
                                items.len()
                            ),
                        ));
                    }
                    items
                        .iter()
                        .map(|item| self.node_size(item))
                        .collect::<Result<Vec<_>>>()?
                }
                _ => vec![self.node_size(v)?],
            };
        }
        if let Some(v) = t.get("movable") {
            sim.movable = self.movable_nodes(v, sim.memory.len())?;
        }
        let total = sim.memory.iter().fold(0u64, |a, &m| a.saturating_add(m));
        if total > sim.limits.memory {
            let span = t.get("memory").map_or(0..0, Spanned::span);
            return Err(self.err(
                &span,
                format!(
                    "`memory` adds up to {total:#x} bytes, over the limit of {:#x} (`[sim.limits] memory`)",
                    sim.limits.memory
                ),
            ));
        }
        Ok(sim)
    }

    /// `[sim.limits]`: each key optional, each a size, a count or (`wall_time`) a time.
    pub(super) fn limits(&self, v: &Value<'_>) -> Result<Limits> {
        let t = self.table(v, "the `[sim.limits]` table")?;
        self.allow(
            &t,
            &[
                "host_memory",
                "memory",
                "steps",
                "events",
                "trace",
                "wall_time",
            ],
        )?;
        let mut l = Limits::default();
        if let Some(v) = t.get("host_memory") {
            l.host_memory = self.size(v, "host_memory")?;
        }
        if let Some(v) = t.get("memory") {
            l.memory = self.size(v, "memory")?;
        }
        if let Some(v) = t.get("steps") {
            l.steps = self.uint(v, "steps")?;
        }
        if let Some(v) = t.get("events") {
            l.events = self.uint(v, "events")?;
        }
        if let Some(v) = t.get("trace") {
            l.trace = self.uint(v, "trace")?;
        }
        if let Some(v) = t.get("wall_time") {
            l.wall_time = self.time(v, "wall_time")?;
        }
        Ok(l)
    }

    /// `[sim] movable`: a list of NUMA node ids whose memory is ZONE_MOVABLE, each below the node count, not
    /// node 0 (the zero page and kernel memory live there) and listed once; returned ascending.
    pub(super) fn movable_nodes(&self, v: &Value<'_>, nr_nodes: usize) -> Result<Vec<u32>> {
        let DeValue::Array(items) = v.get_ref() else {
            return Err(self.err(
                &v.span(),
                format!(
                    "expected a list of NUMA node ids for `movable`, found {}",
                    describe(v.get_ref())
                ),
            ));
        };
        let mut nodes = Vec::new();
        for item in items {
            let node = self.numa_node(item, "movable", nr_nodes)?;
            if node == 0 {
                return Err(self.err(
                    &item.span(),
                    "node 0 cannot be `movable`: it holds the zero page and kernel memory",
                ));
            }
            if nodes.contains(&node) {
                return Err(self.err(
                    &item.span(),
                    format!("node {node} is listed twice in `movable`"),
                ));
            }
            nodes.push(node);
        }
        nodes.sort_unstable();
        Ok(nodes)
    }

    /// One node's RAM size in `[sim] memory`: a non-zero multiple of the page size.
    pub(super) fn node_size(&self, v: &Value<'_>) -> Result<u64> {
        let memory = self.size(v, "memory")?;
        if memory == 0 || memory % PAGE_SIZE != 0 {
            return Err(self.err(
                &v.span(),
                format!(
                    "expected a non-zero multiple of the 4 KiB page size for `memory`, found {memory:#x}"
                ),
            ));
        }
        Ok(memory)
    }

    pub(super) fn jitter(&self, v: &Value<'_>) -> Result<f64> {
        let out_of_range = |shown: &str| {
            self.err(
                &v.span(),
                format!("expected `jitter` between 0.0 and 1.0, found {shown}"),
            )
        };
        match v.get_ref() {
            DeValue::Float(f) => {
                let value: f64 = f.as_str().parse().map_err(|_| out_of_range(f.as_str()))?;
                if (0.0..=1.0).contains(&value) {
                    Ok(value)
                } else {
                    Err(out_of_range(f.as_str()))
                }
            }
            DeValue::Integer(i) => match i.as_str() {
                "0" => Ok(0.0),
                "1" => Ok(1.0),
                other => Err(out_of_range(other)),
            },
            other => Err(self.err(
                &v.span(),
                format!(
                    "expected a number between 0.0 and 1.0 for `jitter`, found {}",
                    describe(other)
                ),
            )),
        }
    }
}
