//! The two outputs of `peerdma bench`: a table for people, and JSON with a stable schema
//! (`peerdma-bench/1`, documented in docs/performance.md, "peerdma bench").

use std::fmt::Write as _;

use serde_json::{Value, json};

use super::{BenchRun, SCHEMA, Side};

/// The machine: logical CPUs and the CPU model (`/proc/cpuinfo`).
pub(super) fn machine() -> (usize, String) {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    (cpus, model)
}

/// The `machine` object of both JSON documents (`peerdma bench`, `--sweep`): logical CPUs, CPU model, load
/// average before and after the run.
pub(super) fn machine_json(load: (Option<f64>, Option<f64>)) -> Value {
    let (cpus, model) = machine();
    json!({
        "cpus": cpus,
        "model": model,
        "load_before": load.0,
        "load_after": load.1,
    })
}

/// A finite number as JSON, anything else as `null`.
fn num(v: f64) -> Value {
    if v.is_finite() { json!(v) } else { Value::Null }
}

/// The JSON document (one object).
pub(crate) fn json(r: &BenchRun) -> String {
    let figures: Vec<Value> = r
        .figures
        .iter()
        .map(|f| {
            let min = f.samples.iter().copied().fold(f64::INFINITY, f64::min);
            let max = f.samples.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            json!({
                "name": f.name,
                "side": match f.side { Side::Peerdma => "peerdma", Side::Linux => "linux" },
                "what": f.what,
                "unit": f.unit,
                "median": num(f.median()),
                "min": num(min),
                "max": num(max),
                "per_second": f.per_second().map_or(Value::Null, num),
                "samples": f.samples.iter().map(|&v| num(v)).collect::<Vec<_>>(),
            })
        })
        .collect();
    let ratios: Vec<Value> = r
        .ratios
        .iter()
        .map(|x| {
            json!({
                "name": x.name,
                "what": x.what,
                "value": num(x.value),
                "target": x.target,
                "compare": if x.at_most { "<=" } else { ">=" },
                "pass": x.pass(),
                "headroom": num(x.headroom()),
            })
        })
        .collect();
    let unavailable: Vec<Value> = r
        .unavailable
        .iter()
        .map(|u| json!({"name": u.name, "why": u.why}))
        .collect();
    json!({
        "schema": SCHEMA,
        "machine": machine_json(r.load),
        "config": {
            "pages": r.pages,
            "migrate_pages": r.migrate_pages,
            "device_requests": r.requests,
            "reps": r.reps,
            "quick": r.quick,
            "engine_scenario": r.engine_scenario,
            "scaling_scenario": r.scaling.map(|s| s.0),
            "scaling_seeds": r.scaling.map(|s| s.1),
        },
        "leak_check": {"worlds": r.worlds.0, "not_freed": r.worlds.1.len(), "not_freed_worlds": r.worlds.1},
        "figures": figures,
        "ratios": ratios,
        "unavailable": unavailable,
    })
    .to_string()
}

/// A figure's value with its unit, scaled for reading.
fn show(v: f64, unit: &str) -> String {
    match unit {
        "ns" if v >= 1e6 => format!("{:.2} ms", v / 1e6),
        "ns" if v >= 1e3 => format!("{:.2} µs", v / 1e3),
        "ns" => format!("{v:.1} ns"),
        "events/s" => format!("{:.2} M/s", v / 1e6),
        "GB/s" => format!("{v:.2} GB/s"),
        "B" => format!("{v:.0} B"),
        "s" => format!("{v:.2} s"),
        _ => format!("{v} {unit}"),
    }
}

/// The table.
pub(crate) fn text(r: &BenchRun) -> String {
    let (cpus, model) = machine();
    let load = |l: Option<f64>| l.map_or_else(|| "?".to_owned(), |v| format!("{v:.2}"));
    let mut o = String::new();
    let _ = writeln!(
        o,
        "peerdma bench: {} pages ({} migrated), {} repetitions, medians; {cpus} CPU(s), {model}, load {} -> {}",
        r.pages,
        r.migrate_pages,
        r.reps,
        load(r.load.0),
        load(r.load.1)
    );
    let _ = writeln!(o, "engine scenario: {}", r.engine_scenario);
    if let Some((scn, seeds)) = r.scaling {
        let _ = writeln!(o, "scaling: {seeds} seeds of {scn}");
    }
    let _ = writeln!(
        o,
        "\n{:<21} {:<8} {:>12} {:>13} {:>25}  what",
        "figure", "side", "median", "per second", "min .. max"
    );
    for f in &r.figures {
        let min = f.samples.iter().copied().fold(f64::INFINITY, f64::min);
        let max = f.samples.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let rate = f
            .per_second()
            .map_or_else(String::new, |p| format!("{:.2} M", p / 1e6));
        let side = match f.side {
            Side::Peerdma => "peerdma",
            Side::Linux => "linux",
        };
        let _ = writeln!(
            o,
            "{:<21} {side:<8} {:>12} {rate:>13} {:>25}  {}",
            f.name,
            show(f.median(), f.unit),
            format!("{} .. {}", show(min, f.unit), show(max, f.unit)),
            f.what
        );
    }
    let _ = writeln!(
        o,
        "\n{:<30} {:>10} {:>10} {:>6} {:>9}  what",
        "target", "value", "target", "", "headroom"
    );
    for x in &r.ratios {
        let _ = writeln!(
            o,
            "{:<30} {:>10.3} {:>3}{:>7} {:>6} {:>8.2}x  {}",
            x.name,
            x.value,
            if x.at_most { "<=" } else { ">=" },
            x.target,
            if x.pass() { "pass" } else { "MISS" },
            x.headroom(),
            x.what
        );
    }
    let _ = writeln!(
        o,
        "leak check: {} of {} simulated worlds outlived every handle{}",
        r.worlds.1.len(),
        r.worlds.0,
        if r.worlds.1.is_empty() {
            String::new()
        } else {
            let mut w = r.worlds.1.clone();
            w.sort_unstable();
            w.dedup();
            format!(
                " ({}: a reference cycle keeps them, memory grows with every repetition)",
                w.join(", ")
            )
        }
    );
    for u in &r.unavailable {
        let _ = writeln!(o, "not measured: {}: {}", u.name, u.why);
    }
    o
}
