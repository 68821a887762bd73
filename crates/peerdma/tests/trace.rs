//! `peerdma run --trace`: every example's trace is well-formed Chrome trace-event JSON: required fields,
//! begin/end matched per track, time monotonic per track, one flow from every device fault to its
//! resolution, readable args; and no trace is kept without `--trace`.
#![expect(
    clippy::tests_outside_test_module,
    clippy::unwrap_used,
    reason = "an integration-test crate is all tests"
)]

use std::collections::BTreeMap;

use serde_json::Value;

mod common;

use common::{peerdma, root};

/// The examples and the top-level scenarios.
fn files() -> Vec<String> {
    let mut out = Vec::new();
    for dir in ["examples", "scenarios"] {
        for e in std::fs::read_dir(root().join(dir)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                out.push(format!(
                    "{dir}/{}",
                    p.file_name().unwrap().to_string_lossy()
                ));
            }
        }
    }
    out.sort();
    out
}

/// Runs `file` with `--trace` into a temporary file; returns the trace and the JSON report.
fn traced(file: &str) -> (Vec<Value>, Value) {
    let dir = std::env::temp_dir().join(format!("peerdma-trace-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out_path = dir.join(format!("{}.json", file.replace('/', "_")));
    let out = peerdma(&["run", file, "--json", "--trace", out_path.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{file}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let trace: Value = serde_json::from_str(&std::fs::read_to_string(&out_path).unwrap()).unwrap();
    let _ = std::fs::remove_file(&out_path);
    (trace["traceEvents"].as_array().unwrap().clone(), report)
}

/// Checks one trace; returns the number of flows.
fn check(file: &str, events: &[Value], report: &Value) {
    let mut last_ts: BTreeMap<(u64, u64), f64> = BTreeMap::new();
    let mut stacks: BTreeMap<(u64, u64), Vec<String>> = BTreeMap::new();
    let mut flow_starts: BTreeMap<u64, usize> = BTreeMap::new();
    let mut flow_ends: BTreeMap<u64, usize> = BTreeMap::new();
    let mut device_faults = 0u64;
    let mut named_pids = Vec::new();
    for e in events {
        let ph = e["ph"]
            .as_str()
            .unwrap_or_else(|| panic!("{file}: no ph in {e}"));
        let name = e["name"]
            .as_str()
            .unwrap_or_else(|| panic!("{file}: no name in {e}"));
        let pid = e["pid"]
            .as_u64()
            .unwrap_or_else(|| panic!("{file}: no pid in {e}"));
        if ph == "M" {
            if name == "process_name" {
                named_pids.push(pid);
            }
            continue;
        }
        assert!(
            named_pids.contains(&pid),
            "{file}: pid {pid} has no process_name: {e}"
        );
        let ts = e["ts"]
            .as_f64()
            .unwrap_or_else(|| panic!("{file}: no ts in {e}"));
        let tid = if ph == "C" {
            0
        } else {
            e["tid"]
                .as_u64()
                .unwrap_or_else(|| panic!("{file}: no tid in {e}"))
        };
        let prev = last_ts.insert((pid, tid), ts).unwrap_or(0.0);
        assert!(
            ts >= prev,
            "{file}: time goes back on track {pid}/{tid}: {prev} then {e}"
        );
        if let Some(args) = e["args"].as_object() {
            for (k, v) in args {
                if let Some(s) = v.as_str() {
                    assert!(
                        !s.contains(" { ") && !s.contains("Some(") && !s.contains("DeviceId("),
                        "{file}: arg {k} is a Rust debug string: {s}"
                    );
                }
            }
        }
        match ph {
            "B" => {
                stacks.entry((pid, tid)).or_default().push(name.to_owned());
                if name == "device.fault" {
                    device_faults += 1;
                }
            }
            "E" => {
                let top = stacks.entry((pid, tid)).or_default().pop();
                assert_eq!(top.as_deref(), Some(name), "{file}: unmatched end {e}");
            }
            "s" => *flow_starts.entry(e["id"].as_u64().unwrap()).or_default() += 1,
            "f" => {
                assert_eq!(e["bp"], "e", "{file}: {e}");
                *flow_ends.entry(e["id"].as_u64().unwrap()).or_default() += 1;
            }
            "i" | "C" => {}
            other => panic!("{file}: unexpected phase {other}"),
        }
    }
    for (track, s) in &stacks {
        assert!(s.is_empty(), "{file}: spans left open on {track:?}: {s:?}");
    }
    assert!(
        flow_starts.values().all(|&n| n == 1),
        "{file}: a flow id starts twice"
    );
    assert_eq!(
        flow_starts, flow_ends,
        "{file}: every flow starts once and ends once"
    );
    // One flow per device fault, and as many device faults as the devices counted.
    let counted = ["dmirror.faults", "mirror.faults"]
        .iter()
        .map(|c| report["metrics"][c].as_u64().unwrap_or(0))
        .sum::<u64>();
    assert_eq!(
        device_faults, counted,
        "{file}: device-fault spans vs counters"
    );
    assert_eq!(
        flow_starts.len() as u64,
        counted,
        "{file}: flows vs device faults"
    );
}

#[test]
fn every_example_traces_well_formed_spans_flows_and_counters() {
    let mut flows = 0;
    let mut spans = BTreeMap::<String, u64>::new();
    for f in files() {
        let (events, report) = traced(&f);
        check(&f, &events, &report);
        flows += events.iter().filter(|e| e["ph"] == "s").count();
        for e in events.iter().filter(|e| e["ph"] == "B") {
            *spans
                .entry(e["name"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
    }
    assert!(flows > 0, "no device fault anywhere");
    for kind in [
        "cpu.fault",
        "device.fault",
        "mmu_notifier.invalidate",
        "dma.transfer",
        "hmm_range_fault",
    ] {
        assert!(
            spans.contains_key(kind),
            "no {kind} span in any example: {spans:?}"
        );
    }
    assert!(
        spans.keys().any(|k| k.starts_with("migrate.")),
        "no migration span in any example: {spans:?}"
    );
}

#[test]
fn the_quickstart_trace_has_a_process_per_simulated_process_and_device() {
    let (events, _) = traced("examples/quickstart.toml");
    let names: Vec<&str> = events
        .iter()
        .filter(|e| e["ph"] == "M" && e["name"] == "process_name")
        .map(|e| e["args"]["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"process main"), "{names:?}");
    assert!(
        names.iter().any(|n| n.starts_with("device dmirror")),
        "{names:?}"
    );
    // Counter tracks: residency of the device and of RAM.
    assert!(
        events
            .iter()
            .any(|e| e["ph"] == "C" && e["name"] == "residency")
    );
    // Every step is a span on its thread's track, with its line.
    let steps = events
        .iter()
        .filter(|e| e["ph"] == "B" && e["args"]["line"].is_u64())
        .count();
    assert_eq!(steps, 15);
}

#[test]
fn the_trace_is_the_same_bytes_run_after_run() {
    let a = traced("examples/p2p-switch.toml").0;
    let b = traced("examples/p2p-switch.toml").0;
    assert_eq!(a, b);
}
