//! `peerdma bench --sweep --quick`: the JSON schema is stable, every dimension reports every operation at
//! each of its sizes, and every cost and growth factor is a finite positive number consistent with the
//! medians (timings themselves are not asserted: they depend on the machine).
#![expect(
    clippy::tests_outside_test_module,
    reason = "an integration-test crate is all tests"
)]

use serde_json::Value;

mod bench_common;

use bench_common::{positive, run_bench};

/// The quick sweep's dimensions, their sizes and their operations, in output order.
const DIMENSIONS: &[(&str, &[u64], &[&str])] = &[
    (
        "pages",
        &[64, 256],
        &[
            "cpu_fault",
            "reclaim",
            "mirror_fault",
            "mirror_invalidate",
            "migrate_to_dev",
            "migrate_to_sys",
            "dma_map_page",
            "dma_unmap_page",
        ],
    ),
    ("mirrors", &[1, 2], &["mirror_invalidate"]),
    (
        "devices",
        &[1, 4],
        &[
            "dma_map_unmap",
            "p2p_distance",
            "p2p_distance_many",
            "mirror_fault",
        ],
    ),
    (
        "processes",
        &[1, 4],
        &["cpu_fault", "migrate_to_dev", "migrate_to_sys", "reclaim"],
    ),
    (
        "pasids",
        &[1, 4],
        &["sva_bind", "sva_fault", "sva_translate"],
    ),
];

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        f64::midpoint(s[n / 2 - 1], s[n / 2])
    }
}

#[test]
fn quick_sweep_json_has_every_dimension_size_and_op_with_sane_numbers() {
    let v: Value =
        serde_json::from_slice(&run_bench(&["--sweep", "--quick", "--json"]).stdout).unwrap();
    assert_eq!(v["schema"], "peerdma-bench-sweep/1");
    assert!(v["machine"]["cpus"].as_u64().unwrap() >= 1);
    assert_eq!(v["config"]["quick"], true);
    let reps = v["config"]["reps"].as_u64().unwrap();
    assert!(reps >= 5, "at least 5 repetitions, got {reps}");
    let flat = positive(&v["config"]["flat_within"], "flat_within");
    assert!(
        v["skipped"].as_array().unwrap().is_empty(),
        "the quick sizes never hit the time limit"
    );

    let points = v["points"].as_array().unwrap();
    let got: Vec<(String, u64, String)> = points
        .iter()
        .map(|p| {
            (
                p["dimension"].as_str().unwrap().to_owned(),
                p["size"].as_u64().unwrap(),
                p["op"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let mut want = Vec::new();
    for (d, sizes, ops) in DIMENSIONS {
        for op in *ops {
            for s in *sizes {
                want.push(((*d).to_owned(), *s, (*op).to_owned()));
            }
        }
    }
    assert_eq!(got, want, "one point per dimension, operation and size");

    for p in points {
        let name = format!("{} {} {}", p["dimension"], p["size"], p["op"]);
        assert_eq!(p["unit"], "ns", "{name}");
        assert_eq!(p["data"], "token", "{name}");
        assert!(!p["what"].as_str().unwrap().is_empty(), "{name}");
        let samples: Vec<f64> = p["samples"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| positive(s, &name))
            .collect();
        assert_eq!(
            samples.len() as u64,
            reps,
            "{name}: one sample a repetition"
        );
        assert_eq!(p["reps"].as_u64().unwrap(), reps, "{name}");
        let m = positive(&p["median"], &name);
        assert!((m - median(&samples)).abs() <= 1e-9 * m, "{name}: median");
        // Growth is this median over the same operation's median at the dimension's smallest size.
        let base = points
            .iter()
            .find(|q| q["dimension"] == p["dimension"] && q["op"] == p["op"])
            .unwrap();
        let g = positive(&p["growth"], &name);
        assert!(
            (g - m / base["median"].as_f64().unwrap()).abs() <= 1e-9 * g,
            "{name}: growth"
        );
        assert_eq!(p["flat"], g <= flat, "{name}: flat agrees with growth");
    }
}

#[test]
fn quick_sweep_table_has_a_row_per_point() {
    let text = String::from_utf8(run_bench(&["--sweep", "--quick"]).stdout).unwrap();
    assert!(text.starts_with("peerdma bench --sweep:"), "{text}");
    for (d, sizes, ops) in DIMENSIONS {
        for op in *ops {
            let rows = text
                .lines()
                .filter(|l| {
                    let w: Vec<&str> = l.split_whitespace().collect();
                    w.first() == Some(d) && w.contains(op)
                })
                .count();
            assert_eq!(rows, sizes.len(), "{d} {op}:\n{text}");
        }
    }
    for l in text
        .lines()
        .filter(|l| l.contains('x') && l.starts_with("pages"))
    {
        assert!(l.ends_with("yes") || l.ends_with("NO"), "{l}");
    }
}
