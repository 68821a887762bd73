//! The user's contract, through the binary: every bundled scenario passes, runs are deterministic, input
//! errors exit 2 with a location, failed expectations exit 1 with a location, and the teardown race is
//! explored across seeds without an oracle violation.
#![expect(
    clippy::tests_outside_test_module,
    clippy::unwrap_used,
    reason = "an integration-test crate is all tests"
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn peerdma(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_peerdma"))
        .current_dir(root())
        .args(args)
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn scenario_files() -> Vec<String> {
    let mut files = Vec::new();
    for dir in ["scenarios", "scenarios/conformance", "examples"] {
        for e in std::fs::read_dir(root().join(dir)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                files.push(format!(
                    "{dir}/{}",
                    p.file_name().unwrap().to_string_lossy()
                ));
            }
        }
    }
    files.sort();
    files
}

#[test]
fn every_bundled_scenario_passes() {
    let files = scenario_files();
    assert!(files.len() >= 30, "scenarios missing: {files:?}");
    let mut failed = Vec::new();
    for f in &files {
        let out = peerdma(&["run", f]);
        if out.status.code() != Some(0) {
            failed.push(format!(
                "{f}: exit {:?}\n{}{}",
                out.status.code(),
                text(&out.stdout),
                text(&out.stderr)
            ));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

#[test]
fn same_scenario_and_seed_give_byte_identical_reports_and_traces() {
    let dir = std::env::temp_dir().join(format!("peerdma-det-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for args in [
        vec!["run", "examples/quickstart.toml", "--steps"],
        vec!["run", "examples/quickstart.toml", "--json", "--steps"],
        vec![
            "run",
            "scenarios/conformance/anon_teardown.toml",
            "--seed",
            "5",
            "--json",
        ],
    ] {
        let mut outs = Vec::new();
        for i in 0..2 {
            let trace = dir.join(format!("trace{i}.json"));
            let mut a = args.clone();
            let t = trace.to_string_lossy().into_owned();
            a.extend(["--trace", t.as_str()]);
            let out = peerdma(&a);
            assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
            outs.push((out.stdout, std::fs::read(&trace).unwrap()));
        }
        assert!(
            outs[0].0 == outs[1].0,
            "report differs between runs of {args:?}"
        );
        assert!(
            outs[0].1 == outs[1].1,
            "trace differs between runs of {args:?}"
        );
        assert!(!outs[0].1.is_empty());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn json_report_carries_seed_outcome_and_counters() {
    let out = peerdma(&["run", "examples/quickstart.toml", "--json", "--seed", "11"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["seed"], 11);
    assert_eq!(v["outcome"]["kind"], "passed");
    assert_eq!(v["metrics"]["dmirror.read"], 3);
}

#[test]
fn teardown_race_is_explored_without_violations() {
    let mut outcomes = std::collections::BTreeSet::new();
    for seed in 0..24 {
        let s = seed.to_string();
        let out = peerdma(&[
            "run",
            "scenarios/conformance/anon_teardown.toml",
            "--steps",
            "--seed",
            &s,
        ]);
        let o = text(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "seed {seed}:\n{o}");
        let read = o
            .lines()
            .find(|l| l.contains("dmirror.read"))
            .unwrap()
            .to_owned();
        outcomes.insert(if read.contains("-EFAULT") {
            "efault"
        } else {
            "success"
        });
    }
    assert_eq!(
        outcomes.len(),
        2,
        "the munmap never raced the READ both ways: {outcomes:?}"
    );
}

#[test]
fn failed_expectation_exits_1_naming_the_step() {
    let dir = std::env::temp_dir().join(format!("peerdma-fail-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("fail.toml");
    std::fs::write(
        &f,
        "[sim]\ntime = \"zero\"\n[[thread]]\nname = \"t\"\nsteps = [\n  { op = \"mmap\", name = \"b\", len = \"4KiB\", prot = \"rw\", flags = [\"private\", \"anonymous\"] },\n  { op = \"load\", at = \"b\", expect = { data = \"u32:1\" } },\n]\n",
    )
    .unwrap();
    let out = peerdma(&["run", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let o = text(&out.stdout);
    assert!(o.contains("fail.toml:7:3: load"), "{o}");
    assert!(o.contains("data differs"), "{o}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// One malformed input: the file text, then the expected `line:col` and a fragment of the message.
const MALFORMED: &[(&str, &str, &str, &str)] = &[
    ("toml syntax error", "[sim\nseed = 1\n", ":1:5", "expected"),
    (
        "unknown top-level key",
        "[sim]\nseeed = 1\n",
        ":2:1",
        "unknown key `seeed`",
    ),
    (
        "unknown key in a step",
        STEP_UNKNOWN,
        ":3:44",
        "unknown key `lenght`",
    ),
    (
        "wrong type",
        "[sim]\nseed = \"seven\"\n",
        ":2:8",
        "expected an integer for `seed`",
    ),
    ("bad unit", STEP_BAD_UNIT, ":3:44", "found `4 KB B`"),
    (
        "unknown mapping name",
        STEP_UNKNOWN_MAPPING,
        ":5:23",
        "unknown mapping `bfu`",
    ),
    (
        "symbolic address beyond its mapping",
        STEP_BEYOND,
        ":5:23",
        "beyond the end of mapping `buf`",
    ),
    ("zero length", STEP_ZERO_LEN, ":3:44", "non-zero length"),
    ("overflowing length", STEP_OVERFLOW, ":3:44", "overflows"),
];

const STEP_UNKNOWN: &str =
    "[[thread]]\nname = \"t\"\nsteps = [ { op = \"munmap\", at = \"0x10000\", lenght = 4096 } ]\n";
const STEP_BAD_UNIT: &str = "[[thread]]\nname = \"t\"\nsteps = [ { op = \"mmap\", name = \"b\", len = \"4 KB B\", prot = \"rw\", flags = [\"private\", \"anonymous\"] } ]\n";
const STEP_UNKNOWN_MAPPING: &str = "[[thread]]\nname = \"t\"\nsteps = [\n  { op = \"mmap\", name = \"buf\", len = \"4KiB\", prot = \"rw\", flags = [\"private\", \"anonymous\"] },\n  { op = \"load\", at = \"bfu\" },\n]\n";
const STEP_BEYOND: &str = "[[thread]]\nname = \"t\"\nsteps = [\n  { op = \"mmap\", name = \"buf\", len = \"4KiB\", prot = \"rw\", flags = [\"private\", \"anonymous\"] },\n  { op = \"load\", at = \"buf+8KiB\" },\n]\n";
const STEP_ZERO_LEN: &str = "[[thread]]\nname = \"t\"\nsteps = [ { op = \"mmap\", name = \"b\", len = \"0KiB\", prot = \"rw\", flags = [\"private\", \"anonymous\"] } ]\n";
const STEP_OVERFLOW: &str = "[[thread]]\nname = \"t\"\nsteps = [ { op = \"mmap\", name = \"b\", len = \"99999999TiB\", prot = \"rw\", flags = [\"private\", \"anonymous\"] } ]\n";

#[test]
fn malformed_input_exits_2_with_its_location_and_no_panic() {
    let dir = std::env::temp_dir().join(format!("peerdma-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut wrong = Vec::new();
    for (i, (what, body, loc, fragment)) in MALFORMED.iter().enumerate() {
        let f = dir.join(format!("bad{i}.toml"));
        std::fs::write(&f, body).unwrap();
        for cmd in ["check", "run"] {
            let out = peerdma(&[cmd, f.to_str().unwrap()]);
            let err = text(&out.stderr);
            let located = format!("bad{i}.toml{loc}");
            if out.status.code() != Some(2)
                || !err.contains(&located)
                || !err.contains(fragment)
                || err.contains("panicked")
            {
                wrong.push(format!(
                    "{what} ({cmd}): exit {:?}, wanted `{located}` and `{fragment}` in:\n{err}",
                    out.status.code()
                ));
            }
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn missing_file_exits_2() {
    let out = peerdma(&["run", "no/such/scenario.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("no/such/scenario.toml"));
}
