//! `peerdma sweep` through the binary: the output is the same bytes whatever `--jobs` and however `--shard`
//! splits it, each line is the run it names, and bad arguments exit 2 with a hint.
#![expect(
    clippy::tests_outside_test_module,
    reason = "an integration-test crate is all tests"
)]

mod common;

use common::peerdma;

const FILE: &str = "examples/iommu-lazy-window.toml";
/// Eight values of the IOTLB miss cost, the default (26 ns) among them.
const PARAM: &str = "iommu.iotlb_miss=0,13,26,52,104,208,416,832ns";

fn sweep(extra: &[&str]) -> Vec<u8> {
    let mut args = vec!["sweep", FILE, "--param", PARAM];
    args.extend_from_slice(extra);
    let out = peerdma(&args);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn a_sweep_of_8_values_is_the_same_bytes_whatever_the_jobs_and_shards() {
    let one = sweep(&["--jobs", "1"]);
    assert_eq!(
        one.split(|&b| b == b'\n').filter(|l| !l.is_empty()).count(),
        8
    );
    assert_eq!(
        sweep(&["--jobs", "2"]),
        one,
        "--jobs 2 differs from --jobs 1"
    );
    assert_eq!(
        sweep(&["--jobs", "5"]),
        one,
        "--jobs 5 differs from --jobs 1"
    );
    let mut halves = sweep(&["--jobs", "2", "--shard", "0/2"]);
    halves.extend(sweep(&["--jobs", "1", "--shard", "1/2"]));
    assert_eq!(halves, one, "two shards concatenated differ from the whole");
    let mut thirds = Vec::new();
    for s in ["0/3", "1/3", "2/3"] {
        thirds.extend(sweep(&["--jobs", "2", "--shard", s]));
    }
    assert_eq!(
        thirds, one,
        "three shards concatenated differ from the whole"
    );
}

#[test]
fn each_line_is_the_run_it_names() {
    let out = sweep(&["--jobs", "2"]);
    let lines: Vec<serde_json::Value> = out
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    let misses: Vec<u64> = lines
        .iter()
        .map(|l| l["params"]["iommu.iotlb_miss"].as_u64().unwrap())
        .collect();
    assert_eq!(misses, vec![0, 13, 26, 52, 104, 208, 416, 832]);
    // The parameter reaches the model: a dearer miss makes the run longer, strictly.
    let ends: Vec<u64> = lines
        .iter()
        .map(|l| l["report"]["end_time"].as_u64().unwrap())
        .collect();
    assert!(ends.windows(2).all(|w| w[0] < w[1]), "{ends:?}");
    // The default value's line holds exactly the report `peerdma run --json` prints.
    let run = peerdma(&["run", FILE, "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(lines[2]["report"], report);
    assert_eq!(lines[2]["seed"], report["seed"]);
}

#[test]
fn seeds_run_innermost_from_the_scenario_seed() {
    let out = peerdma(&[
        "sweep",
        FILE,
        "--param",
        "dma.max_outstanding=1,4",
        "--seeds",
        "3",
        "--seed",
        "10",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let got: Vec<(u64, u64)> = out
        .stdout
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_slice(l).unwrap();
            (
                v["params"]["dma.max_outstanding"].as_u64().unwrap(),
                v["report"]["seed"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![(1, 10), (1, 11), (1, 12), (4, 10), (4, 11), (4, 12)]
    );
}

#[test]
fn bad_sweep_arguments_exit_2_with_a_hint() {
    for (args, want) in [
        (
            vec!["--param", "iommu.iotlb_mis=1"],
            "did you mean `iommu.iotlb_miss`",
        ),
        (vec!["--param", "iommu.iotlb_miss"], "key=v1,v2"),
        (vec!["--param", "dma.max_outstanding=1us"], "bad value"),
        (vec!["--shard", "2/2"], "below the count"),
    ] {
        let mut a = vec!["sweep", FILE];
        a.extend(args);
        let out = peerdma(&a);
        assert_eq!(out.status.code(), Some(2), "{a:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{a:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}
