//! `peerdma bench --quick --json`: the schema is stable and every figure and ratio is a finite positive
//! number (timings themselves are not asserted: they depend on the machine).
#![expect(
    clippy::tests_outside_test_module,
    clippy::unwrap_used,
    reason = "an integration-test crate is all tests"
)]

use serde_json::Value;

mod bench_common;

use bench_common::{positive, run_bench};

/// Every figure a run without `--scaling` reports, in order.
const FIGURES: &[&str] = &[
    "cpu_fault",
    "linux_fault",
    "linux_munmap",
    "cpu_fault_full_page",
    "linux_fault_full_page",
    "pagetable_walk",
    "mirror_fault",
    "device_access",
    "mirror_invalidate",
    "linux_dontneed",
    "migrate_to_dev",
    "linux_memcpy",
    "migrate_to_sys",
    "engine",
    "engine_core",
    "engine_explore",
    "engine_core_explore",
    "memory_resident",
    "memory_configured",
    "memory_token",
];

fn bench(args: &[&str]) -> Value {
    serde_json::from_slice(&run_bench(args).stdout).unwrap()
}

#[test]
fn quick_json_has_the_documented_schema_and_sane_numbers() {
    let v = bench(&["--quick", "--json", "--scaling", "--seeds", "6"]);
    assert_eq!(v["schema"], "peerdma-bench/1");
    assert!(v["machine"]["cpus"].as_u64().unwrap() >= 1);
    assert!(v["machine"]["model"].is_string());
    let cfg = &v["config"];
    assert_eq!(cfg["pages"], 1024);
    assert_eq!(cfg["quick"], true);
    assert_eq!(cfg["scaling_seeds"], 6);
    let reps = usize::try_from(cfg["reps"].as_u64().unwrap()).unwrap();
    assert!(reps >= 5, "at least 5 repetitions, got {reps}");

    // Three simulated worlds per repetition are checked for leaks; the count is reported, not asserted
    // (a leak is a library bug the bench reports).
    let leak = &v["leak_check"];
    assert_eq!(leak["worlds"].as_u64().unwrap(), 3 * reps as u64);
    let not_freed = leak["not_freed_worlds"].as_array().unwrap();
    assert_eq!(leak["not_freed"].as_u64().unwrap(), not_freed.len() as u64);
    assert!(not_freed.len() <= 3 * reps);

    let figs = v["figures"].as_array().unwrap();
    let names: Vec<&str> = figs.iter().map(|f| f["name"].as_str().unwrap()).collect();
    let mut want: Vec<&str> = FIGURES.to_vec();
    want.extend([
        "explore_jobs1",
        "explore_jobs1_cpu",
        "explore_jobs2",
        "explore_jobs2_cpu",
    ]);
    assert_eq!(names, want);
    for f in figs {
        let name = f["name"].as_str().unwrap();
        assert!(["peerdma", "linux"].contains(&f["side"].as_str().unwrap()));
        assert!(["ns", "events/s", "GB/s", "B", "s"].contains(&f["unit"].as_str().unwrap()));
        let samples = f["samples"].as_array().unwrap();
        assert_eq!(samples.len(), reps, "{name}: one sample per repetition");
        let median = positive(&f["median"], name);
        let (min, max) = (positive(&f["min"], name), positive(&f["max"], name));
        assert!(
            min <= median && median <= max,
            "{name}: {min} <= {median} <= {max}"
        );
        for s in samples {
            positive(s, name);
        }
        if f["unit"] == "ns" {
            let rate = positive(&f["per_second"], name);
            assert!(
                (rate * median / 1e9 - 1.0).abs() < 1e-9,
                "{name}: rate = 1/median"
            );
        } else {
            assert!(f["per_second"].is_null());
        }
    }

    let ratios = v["ratios"].as_array().unwrap();
    let names: Vec<&str> = ratios.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "fault_vs_linux",
            "invalidate_vs_linux_dontneed",
            "device_access_mps",
            "engine_meps",
            "engine_explore_meps",
            "migrate_to_dev_vs_memcpy",
            "migrate_to_sys_vs_memcpy",
            "memory_per_resident_page",
            "memory_token_per_page",
            "explore_speedup_2_jobs",
            "explore_cpu_bound_2_jobs",
        ]
    );
    for r in ratios {
        let name = r["name"].as_str().unwrap();
        let value = positive(&r["value"], name);
        let target = positive(&r["target"], name);
        let headroom = positive(&r["headroom"], name);
        let at_most = match r["compare"].as_str().unwrap() {
            "<=" => true,
            ">=" => false,
            c => panic!("{name}: compare {c}"),
        };
        let pass = if at_most {
            value <= target
        } else {
            value >= target
        };
        assert_eq!(r["pass"], pass, "{name}: pass agrees with value and target");
        assert_eq!(
            headroom >= 1.0,
            pass,
            "{name}: headroom >= 1 exactly when it passes"
        );
    }
    // Token mode is in the library: measured with its target, not listed as unavailable.
    let token_measured = v["figures"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["name"] == "memory_token");
    let token_listed = v["unavailable"]
        .as_array()
        .unwrap()
        .iter()
        .any(|u| u["name"] == "memory_token" && u["why"].is_string());
    assert!(token_measured && !token_listed);
}

#[test]
fn the_table_names_every_figure_and_target() {
    let text = String::from_utf8(run_bench(&["--quick", "--pages", "256"]).stdout).unwrap();
    assert!(text.starts_with("peerdma bench: 256 pages"), "{text}");
    for f in FIGURES {
        assert!(
            text.lines().any(|l| l.split_whitespace().next() == Some(f)),
            "no row for {f}:\n{text}"
        );
    }
    for r in ["fault_vs_linux", "memory_per_resident_page"] {
        let row = text.lines().find(|l| l.starts_with(r)).unwrap();
        assert!(row.contains("pass") || row.contains("MISS"), "{row}");
    }
}
