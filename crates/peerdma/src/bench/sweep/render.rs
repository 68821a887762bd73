//! The two outputs of `peerdma bench --sweep`: a table for people, and JSON with a stable schema
//! (`peerdma-bench-sweep/1`, documented in docs/performance.md, "JSON schema").

use std::fmt::Write as _;

use serde_json::{Value, json};

use super::{FLAT, SCHEMA, SLOW_S, SweepRun};

/// What each operation measures, per operation (the same in every dimension it appears in).
pub(crate) fn what(op: &str) -> &'static str {
    match op {
        "cpu_fault" => "anonymous write fault, per page",
        "reclaim" => "reclaim to swap (passes of 32), per page written",
        "mirror_fault" => "device fault through a DMA mirror, per page",
        "mirror_invalidate" => "MADV_DONTNEED of mirrored pages, per page per mirror",
        "migrate_to_dev" => "migration to device-private memory, per page",
        "migrate_to_sys" => "migration back to system memory, per page",
        "dma_map_page" => "dma_map_sg of one page, all earlier mappings live, per page",
        "dma_unmap_page" => "dma_unmap_sg of one page, per page",
        "dma_map_unmap" => "dma_map_sg + dma_unmap_sg of one page, round-robin over devices",
        "p2p_distance" => "P2P map type and distance of one endpoint pair, uncached",
        "p2p_distance_many" => "pci_p2pdma_distance_many to every endpoint, per client",
        "sva_bind" => "iommu_sva_bind_device of one more process, mean over the binds",
        "sva_fault" => "device fill through PRI (one I/O page fault a page), per page",
        "sva_translate" => "device fill of present pages (ATS translation), per page",
        _ => "",
    }
}

/// A finite number as JSON, anything else as `null`.
fn num(v: f64) -> Value {
    if v.is_finite() { json!(v) } else { Value::Null }
}

/// The JSON document (one object).
pub(crate) fn json(r: &SweepRun) -> String {
    let points: Vec<Value> = r
        .points
        .iter()
        .map(|p| {
            let g = r.growth(p);
            json!({
                "dimension": p.dimension,
                "size": p.size,
                "label": p.label,
                "op": p.op,
                "what": what(p.op),
                "data": "token",
                "unit": "ns",
                "reps": p.samples.len(),
                "median": num(p.median()),
                "samples": p.samples.iter().map(|&v| num(v)).collect::<Vec<_>>(),
                "growth": num(g),
                "flat": g <= FLAT,
            })
        })
        .collect();
    let skipped: Vec<Value> = r
        .skipped
        .iter()
        .map(
            |s| json!({"dimension": s.dimension, "world": s.world, "label": s.label, "why": s.why}),
        )
        .collect();
    let params: serde_json::Map<String, Value> = r
        .params
        .iter()
        .map(|(k, v)| ((*k).to_owned(), json!(v)))
        .collect();
    json!({
        "schema": SCHEMA,
        "machine": super::super::render::machine_json(r.load),
        "config": {
            "quick": r.quick,
            "reps": r.reps,
            "flat_within": FLAT,
            "slow_limit_s": SLOW_S,
            "params": params,
        },
        "points": points,
        "skipped": skipped,
    })
    .to_string()
}

/// ns with a sensible number of digits.
fn ns(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// The table.
pub(crate) fn text(r: &SweepRun) -> String {
    let (cpus, model) = super::super::render::machine();
    let load = |l: Option<f64>| l.map_or_else(|| "?".to_owned(), |v| format!("{v:.2}"));
    let mut s = String::new();
    let _ = writeln!(
        s,
        "peerdma bench --sweep: host ns per operation by size (median of interleaved repetitions; \
         token data mode)"
    );
    let _ = writeln!(
        s,
        "machine: {cpus} CPUs, {model}; load average {} before, {} after",
        load(r.load.0),
        load(r.load.1)
    );
    for (d, p) in &r.params {
        let _ = writeln!(s, "  {d}: {p}");
    }
    let _ = writeln!(
        s,
        "\n{:<10} {:>8} {:<18} {:>4} {:>12} {:>8}  within {FLAT}x",
        "dimension", "size", "op", "reps", "ns/op", "growth"
    );
    let mut last = ("", "");
    for p in &r.points {
        if last != (p.dimension, p.op) && !last.0.is_empty() {
            s.push('\n');
        }
        last = (p.dimension, p.op);
        let g = r.growth(p);
        let _ = writeln!(
            s,
            "{:<10} {:>8} {:<18} {:>4} {:>12} {:>7.2}x  {}",
            p.dimension,
            p.label,
            p.op,
            p.samples.len(),
            ns(p.median()),
            g,
            if g <= FLAT { "yes" } else { "NO" }
        );
    }
    if !r.skipped.is_empty() {
        let _ = writeln!(s, "\nnot measured:");
        for k in &r.skipped {
            let _ = writeln!(s, "  {} {} ({}): {}", k.dimension, k.label, k.world, k.why);
        }
    }
    s
}
