//! The report's forms through the binary: every example's `--json` report (with the step log) validates
//! against `docs/report.schema.json`, as does each `peerdma sweep` line's report; `--plot` writes SVG
//! charts and `--csv` spreadsheets; the text report shows the measured tables.
#![expect(
    clippy::tests_outside_test_module,
    clippy::unwrap_used,
    reason = "an integration-test crate is all tests"
)]

use serde_json::Value;

use std::path::PathBuf;

mod common;

use common::{peerdma, root};

fn examples() -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(root().join("examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .map(|p| format!("examples/{}", p.file_name().unwrap().to_string_lossy()))
        .collect();
    out.sort();
    out
}

fn validator() -> jsonschema::Validator {
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("docs/report.schema.json")).unwrap(),
    )
    .unwrap();
    jsonschema::validator_for(&schema).unwrap()
}

fn assert_valid(v: &jsonschema::Validator, what: &str, report: &Value) {
    let errors: Vec<String> = v
        .iter_errors(report)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{what}: the report breaks the schema:\n{}",
        errors.join("\n")
    );
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("peerdma-report-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn every_example_runs_with_trace_plot_csv_and_json_and_its_report_validates() {
    let v = validator();
    for f in examples() {
        let dir = tmp(&f.replace('/', "_"));
        let (plots, csv, trace) = (dir.join("plots"), dir.join("csv"), dir.join("trace.json"));
        std::fs::create_dir_all(&dir).unwrap();
        let out = peerdma(&[
            "run",
            &f,
            "--json",
            "--steps",
            "--trace",
            trace.to_str().unwrap(),
            "--plot",
            plots.to_str().unwrap(),
            "--csv",
            csv.to_str().unwrap(),
        ]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{f}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_valid(&v, &f, &report);
        assert_eq!(report["schema_version"], 1);
        // Charts: at least the residency or faults chart, each an SVG document.
        let svgs: Vec<PathBuf> = std::fs::read_dir(&plots)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert!(!svgs.is_empty(), "{f}: no chart");
        for s in &svgs {
            let text = std::fs::read_to_string(s).unwrap();
            assert!(
                text.starts_with("<svg") && text.trim_end().ends_with("</svg>"),
                "{}",
                s.display()
            );
        }
        // CSV: the summary holds the outcome and every counter of the JSON report.
        let summary = std::fs::read_to_string(csv.join("summary.csv")).unwrap();
        assert!(summary.starts_with("key,value\n"));
        assert!(summary.contains("\noutcome,passed\n"), "{f}: {summary}");
        for (k, n) in report["metrics"].as_object().unwrap() {
            assert!(
                summary.contains(&format!("\n{k},{n}\n")),
                "{f}: {k} missing from summary.csv"
            );
        }
        let lat = std::fs::read_to_string(csv.join("latency.csv")).unwrap();
        assert_eq!(
            lat.lines().count() - 1,
            report["latency"].as_object().unwrap().len(),
            "{f}: one latency.csv row per kind"
        );
        assert!(csv.join("steps.csv").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn sweep_lines_carry_valid_reports_and_the_sweep_plot_is_drawn() {
    let v = validator();
    let dir = tmp("sweep");
    let out = peerdma(&[
        "sweep",
        "examples/iommu-lazy-window.toml",
        "--param",
        "iommu.iotlb_miss=0,200",
        "--seeds",
        "2",
        "--plot",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0));
    for l in String::from_utf8(out.stdout).unwrap().lines() {
        let line: Value = serde_json::from_str(l).unwrap();
        assert_valid(&v, l, &line["report"]);
    }
    let svg = std::fs::read_to_string(dir.join("sweep.svg")).unwrap();
    assert!(svg.contains("iommu.iotlb_miss"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_text_report_shows_step_durations_latency_bandwidth_and_iotlb_tables() {
    let out = peerdma(&["run", "examples/iommu-lazy-window.toml"]);
    let text = String::from_utf8(out.stdout).unwrap();
    for heading in [
        "step durations:",
        "latency:",
        "bandwidth per path:",
        "iotlb:",
    ] {
        assert!(text.contains(heading), "no `{heading}` in\n{text}");
    }
    // The IOMMU-translated example moves its bytes through the IOMMU path.
    assert!(
        text.lines()
            .any(|l| l.contains("nic0") && l.contains("iommu")),
        "{text}"
    );
    // A zero-time example has no duration tables.
    let out = peerdma(&["run", "examples/p2p-switch.toml"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        !text.contains("step durations:") && text.contains("p2p_bus_addr"),
        "{text}"
    );
}

#[test]
fn the_schema_rejects_a_report_with_an_undocumented_field_or_a_wrong_version() {
    let v = validator();
    let out = peerdma(&["run", "examples/quickstart.toml", "--json"]);
    let mut report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v.is_valid(&report));
    report["schema_version"] = Value::from(2);
    assert!(!v.is_valid(&report));
    report["schema_version"] = Value::from(1);
    report["undocumented"] = Value::from(1);
    assert!(!v.is_valid(&report));
}

#[test]
fn the_atc_table_reports_each_sva_device_hit_rate_from_its_own_lookups() {
    let out = peerdma(&["run", "examples/sva-atc-sizing.toml", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let atc = report["atc"].as_array().unwrap();
    let rate = |dev: &str| {
        let r = atc.iter().find(|r| r["device"] == dev).unwrap();
        let (hits, misses) = (r["hits"].as_u64().unwrap(), r["misses"].as_u64().unwrap());
        // Every miss is one ATS translation request of that device.
        assert_eq!(
            report["metrics"][format!("sva.{dev}.atc_misses")].as_u64(),
            Some(misses)
        );
        #[expect(clippy::cast_precision_loss, reason = "a rate")]
        let want = hits as f64 / (hits + misses) as f64;
        assert!((r["hit_rate"].as_f64().unwrap() - want).abs() < 1e-9);
        want
    };
    let (small, medium, large) = (rate("small"), rate("medium"), rate("large"));
    // The example's three ATC sizes over one access pattern: a bigger ATC never hits less.
    assert!(
        small <= medium && medium < large,
        "{small} {medium} {large}"
    );
    // The per-device counts add up to the global ones.
    let sum = |key: &str| atc.iter().map(|r| r[key].as_u64().unwrap()).sum::<u64>();
    assert_eq!(
        report["metrics"]["sva.atc_hits"].as_u64(),
        Some(sum("hits"))
    );
    assert_eq!(
        report["metrics"]["sva.atc_misses"].as_u64(),
        Some(sum("misses"))
    );
    let text = peerdma(&["run", "examples/sva-atc-sizing.toml"]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("\natc:\n"));
}
