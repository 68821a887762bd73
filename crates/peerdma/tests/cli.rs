//! The user's contract, through the binary: every bundled scenario passes, runs are deterministic, input
//! errors exit 2 with a location, failed expectations exit 1 with a location, and the teardown race is
//! explored across seeds without an oracle violation.
#![expect(
    clippy::tests_outside_test_module,
    clippy::unwrap_used,
    reason = "an integration-test crate is all tests"
)]

use std::path::Path;

mod common;

use common::{peerdma, root};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Every `.toml` under `scenarios/` and `examples/`, in subdirectories too, as paths from the repository root —
/// except `scenarios/scale/`, whose runs take minutes and gigabytes (tests/scale.rs, ignored by default).
fn scenario_files() -> Vec<String> {
    fn walk(dir: &Path, rel: &str, files: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            if p.is_dir() && format!("{rel}/{name}") == "scenarios/scale" {
                continue;
            }
            if p.is_dir() {
                walk(&p, &format!("{rel}/{name}"), files);
            } else if p.extension().is_some_and(|x| x == "toml") {
                files.push(format!("{rel}/{name}"));
            }
        }
    }
    let mut files = Vec::new();
    for dir in ["scenarios", "examples"] {
        walk(&root().join(dir), dir, &mut files);
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
        // Two threads, DMA link sharing, provider removal waiting for pins, calibrated time.
        vec!["run", "scenarios/p2p_remove.toml", "--json", "--steps"],
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
fn every_example_is_in_the_bundled_run() {
    let files = scenario_files();
    for f in [
        "examples/p2p-switch.toml",
        "examples/p2p-host-bridge.toml",
        "examples/quickstart.toml",
        "scenarios/conformance/anon_teardown.toml",
    ] {
        assert!(files.iter().any(|x| x == f), "{f} missing from {files:?}");
    }
}

#[test]
fn run_json_reports_the_dma_map_segments_of_the_p2p_switch_example() {
    let out = peerdma(&["run", "examples/p2p-switch.toml", "--json", "--steps"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["outcome"]["kind"], "passed");
    let maps: Vec<(u64, &str)> = v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["op"] == "dma.map")
        .map(|s| (s["line"].as_u64().unwrap(), s["result"].as_str().unwrap()))
        .collect();
    // The CMB alone: 16 pinned P2P pages, one bus-address segment at the BAR's bus address (no IOVA).
    assert_eq!(
        maps[0].1,
        "success pinned=16 segments=[bus:64KiB] dma_addr=0x380000000000"
    );
    // Without FOLL_PCI_P2PDMA, and long-term: refused.
    assert_eq!(maps[1].1, "-EREMOTEIO");
    assert_eq!(maps[2].1, "-EINVAL");
    // The CMB then a RAM page: one list, bus addresses then an IOVA.
    assert_eq!(
        maps[3].1,
        "success pinned=17 segments=[bus:64KiB, ram:4KiB] dma_addr=0x380000000000"
    );
    assert!(maps.windows(2).all(|w| w[0].0 < w[1].0), "{maps:?}");
    // Counters: every map_sg is unmapped by the end of the run.
    let m = &v["metrics"];
    assert!(m["dma.map_sg"].as_u64().unwrap() >= 2, "{m}");
    assert_eq!(m["dma.map_sg"], m["dma.unmap_sg"], "{m}");
}

#[test]
fn check_accepts_the_p2p_examples_and_rejects_a_bad_pci_file_at_its_token() {
    for f in ["examples/p2p-switch.toml", "examples/p2p-host-bridge.toml"] {
        let out = peerdma(&["check", f]);
        assert_eq!(out.status.code(), Some(0), "{f}: {}", text(&out.stderr));
    }
    let dir = std::env::temp_dir().join(format!("peerdma-pci-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("bad-pci.toml");
    std::fs::write(&f, PCI_BAD_SEGMENT.replace("disk:4KiB", "bus:lots")).unwrap();
    let out = peerdma(&["check", f.to_str().unwrap()]);
    let err = text(&out.stderr);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("bad-pci.toml:22:96"), "{err}");
    assert!(err.contains("bad length in segment `bus:lots`"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
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

/// `expect.violation` is an expectation like any other: a strict domain faults the stale DMA, so the
/// oracle reports nothing and the step fails; the same DMA from a lazy domain is caught and the run passes.
#[test]
fn an_expected_violation_that_does_not_happen_fails_the_step() {
    let dir = std::env::temp_dir().join(format!("peerdma-viol-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let example = std::fs::read_to_string(root().join("examples/iommu-lazy-window.toml")).unwrap();
    let f = dir.join("strict.toml");
    // Make nic0 strict too: its stale DMA now faults instead of reaching the page.
    std::fs::write(
        &f,
        example.replace("iommu = \"dma-lazy\"", "iommu = \"dma\""),
    )
    .unwrap();
    let out = peerdma(&["run", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let o = text(&out.stdout);
    assert!(
        o.contains("expected the oracle to report a stale translation violation, it reported none"),
        "{o}"
    );
    let ok = peerdma(&["run", "examples/iommu-lazy-window.toml"]);
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok.stdout));
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
    (
        "pci device without a topology",
        "[[device]]\nname = \"nvme0\"\nkind = \"pci\"\n",
        ":2:8",
        "a `kind = \"pci\"` device needs a `[topology]`",
    ),
    (
        "dma.map segment of an unknown kind",
        PCI_BAD_SEGMENT,
        ":22:96",
        "unknown segment kind `disk` in `disk:4KiB`",
    ),
    (
        "open of a pci device (was a panic in run)",
        PCI_OPEN,
        ":21:24",
        "device `nic0` is a `kind = \"pci\"` device, which has no device file",
    ),
    (
        "dma_sg.read of an unknown handle",
        PCI_UNKNOWN_HANDLE,
        ":22:34",
        "unknown dma handle `g`; expected one of: h",
    ),
];

/// A root port with one endpoint `nic0` and its `pci` device, then a thread whose line 22 is the bad step.
const PCI_BAD_SEGMENT: &str = r#"[topology]
[[topology.socket]]
name = "s0"
[[topology.host_bridge]]
name = "hb0"
socket = "s0"
[[topology.root_port]]
name = "rp0"
parent = "hb0"
bdf = "00:01.0"
[[topology.endpoint]]
name = "nic0"
parent = "rp0"
bdf = "01:00.0"
[[device]]
name = "nic0"
kind = "pci"
[[thread]]
name = "t"
steps = [
  { op = "mmap", name = "buf", len = "4KiB", prot = "rw", flags = ["private", "anonymous"] },
  { op = "dma.map", dev = "nic0", at = "buf", len = "4KiB", name = "h", expect = { segments = ["disk:4KiB"] } },
]
"#;
const PCI_OPEN: &str = r#"[topology]
[[topology.socket]]
name = "s0"
[[topology.host_bridge]]
name = "hb0"
socket = "s0"
[[topology.root_port]]
name = "rp0"
parent = "hb0"
bdf = "00:01.0"
[[topology.endpoint]]
name = "nic0"
parent = "rp0"
bdf = "01:00.0"
[[device]]
name = "nic0"
kind = "pci"
[[thread]]
name = "t"
steps = [
  { op = "open", dev = "nic0", fd = "f" },
]
"#;
const PCI_UNKNOWN_HANDLE: &str = r#"[topology]
[[topology.socket]]
name = "s0"
[[topology.host_bridge]]
name = "hb0"
socket = "s0"
[[topology.root_port]]
name = "rp0"
parent = "hb0"
bdf = "00:01.0"
[[topology.endpoint]]
name = "nic0"
parent = "rp0"
bdf = "01:00.0"
[[device]]
name = "nic0"
kind = "pci"
[[thread]]
name = "t"
steps = [
  { op = "mmap", name = "buf", len = "4KiB", prot = "rw", flags = ["private", "anonymous"] },
  { op = "dma_sg.read", handle = "g" },
  { op = "dma.map", dev = "nic0", at = "buf", len = "4KiB", name = "h" },
]
"#;
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

#[test]
fn an_endless_input_is_refused_at_the_size_limit_and_an_empty_one_is_an_error() {
    let out = peerdma(&["check", "/dev/zero"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("larger than the input limit"),
        "{}",
        text(&out.stderr)
    );
    let empty = std::env::temp_dir().join(format!("peerdma-empty-{}.toml", std::process::id()));
    std::fs::write(&empty, "").unwrap();
    for cmd in ["check", "run", "explore"] {
        let out = peerdma(&[cmd, empty.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{cmd}");
        assert!(
            text(&out.stderr).contains("no `[[thread]]`"),
            "{cmd}: {}",
            text(&out.stderr)
        );
    }
    std::fs::remove_file(&empty).unwrap();
}

#[test]
fn explore_prints_the_first_failing_seed_and_its_replay_command() {
    let out = peerdma(&[
        "explore",
        "scenarios/protocol/dmirror-munmap.toml",
        "--seeds",
        "1000",
        "--jobs",
        "2",
        "--mutate",
        "skip_read_retry",
    ]);
    let o = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{o}");
    let seed: u64 = o
        .split("FIRST FAILING SEED ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{o}"));
    let replay = format!(
        "replay: peerdma run scenarios/protocol/dmirror-munmap.toml --explore --seed {seed} --mutate skip_read_retry"
    );
    assert!(o.contains(&replay), "{o}");
    assert!(
        o.contains("ORACLE VIOLATION") && o.contains("distinct interleavings"),
        "{o}"
    );
    let s = seed.to_string();
    let again = peerdma(&[
        "run",
        "scenarios/protocol/dmirror-munmap.toml",
        "--explore",
        "--seed",
        &s,
        "--mutate",
        "skip_read_retry",
    ]);
    assert_eq!(again.status.code(), Some(1));
    let report = text(&again.stdout);
    assert!(o.contains(&report), "the replay differs:\n{report}");
}

/// `peerdma link --json` for one configuration and payload sizes: (size, write Gb/s, read Gb/s) per size.
fn link_json(args: &[&str]) -> Vec<(u64, f64, f64)> {
    let mut all = vec!["link", "--json"];
    all.extend_from_slice(args);
    let out = peerdma(&all);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["sizes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["size"].as_u64().unwrap(),
                r["write_gbps"].as_f64().unwrap(),
                r["read_gbps"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// spec/numbers.md §1 reference rows: (generation, width, payload sizes, write Gb/s, read Gb/s), MPS 256,
/// MRRS 512, 64-bit addresses, no ECRC, RCB 64, completions split at MPS.
const LINK_REFERENCE: &[(&str, &str, &str, f64, f64)] = &[
    ("3", "x8", "64", 42.10, 44.10),
    ("3", "x8", "128B", 48.75, 50.06),
    ("3", "x8", "256", 52.92, 53.69),
    ("3", "x8", "512,4KiB,64KiB", 52.92, 53.69),
    ("3", "x8", "1500", 52.81, 53.60),
    ("4", "x16", "256", 207.91, 210.92),
    ("5", "16", "256", 415.82, 421.84),
];

#[test]
fn link_reproduces_the_numbers_md_section_1_reference_rows() {
    let mut wrong = Vec::new();
    for &(generation, width, sizes, write, read) in LINK_REFERENCE {
        let rows = link_json(&[
            "--gen", generation, "--width", width, "--mps", "256", "--mrrs", "512", "--size", sizes,
        ]);
        assert_eq!(rows.len(), sizes.split(',').count());
        for (size, w, r) in rows {
            if (w - write).abs() >= 0.01 || (r - read).abs() >= 0.01 {
                wrong.push(format!(
                    "Gen{generation} {width} {size} B: write {w:.4} read {r:.4}, want {write:.2} {read:.2}"
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn link_json_carries_the_link_parameters() {
    let out = peerdma(&[
        "link", "--gen", "4", "--width", "x4", "--mps", "512", "--mrrs", "1KiB", "--rcb", "128",
        "--addr", "32", "--ecrc", "--size", "4KiB", "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let link = &v["link"];
    assert_eq!(
        (&link["gen"], &link["width"], &link["mps"], &link["mrrs"]),
        (&4.into(), &4.into(), &512.into(), &1024.into())
    );
    assert_eq!(
        (&link["rcb"], &link["addr"], &link["ecrc"]),
        (&128.into(), &32.into(), &true.into())
    );
    assert_eq!(v["sizes"][0]["size"], 4096);
}

#[test]
fn link_text_prints_two_decimals_per_size() {
    let out = peerdma(&[
        "link", "--gen", "3", "--width", "x8", "--mps", "256", "--mrrs", "512", "--size", "64,1500",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let o = text(&out.stdout);
    assert!(o.contains("42.10") && o.contains("44.10"), "{o}");
    assert!(o.contains("52.81") && o.contains("53.60"), "{o}");
}

#[test]
fn link_with_invalid_parameters_exits_2_without_panicking() {
    let base = |generation: &'static str,
                width: &'static str,
                mps: &'static str,
                extra: &[&'static str]| {
        let mut a = vec![
            "link", "--gen", generation, "--width", width, "--mps", mps, "--mrrs", "512", "--size",
            "64",
        ];
        a.extend_from_slice(extra);
        a
    };
    let cases: Vec<(&str, Vec<&str>, &str)> = vec![
        ("gen 9", base("9", "x8", "256", &[]), "generation 9"),
        ("gen 0", base("0", "x8", "256", &[]), "generation 0"),
        ("width x3", base("3", "x3", "256", &[]), "width 3"),
        ("width y8", base("3", "y8", "256", &[]), "y8"),
        ("mps 100", base("3", "x8", "100", &[]), "mps 100"),
        ("mps 8KiB", base("3", "x8", "8KiB", &[]), "mps 8192"),
        ("rcb 32", base("3", "x8", "256", &["--rcb", "32"]), "rcb 32"),
        (
            "addr 48",
            base("3", "x8", "256", &["--addr", "48"]),
            "--addr 48",
        ),
        (
            "size 0",
            base("3", "x8", "256", &["--size", "0"]),
            "at least 1 byte",
        ),
        (
            "bad size",
            base("3", "x8", "256", &["--size", "4 KB B"]),
            "4 KB B",
        ),
    ];
    let mut wrong = Vec::new();
    for (what, args, fragment) in cases {
        let out = peerdma(&args);
        let err = text(&out.stderr);
        if out.status.code() != Some(2) || !err.contains(fragment) || err.contains("panicked") {
            wrong.push(format!(
                "{what}: exit {:?}, wanted `{fragment}` in:\n{err}",
                out.status.code()
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// `peerdma topo FILE --json`: the pairs, keyed by (provider, client).
fn topo_pairs(file: &str) -> std::collections::BTreeMap<(String, String), serde_json::Value> {
    let out = peerdma(&["topo", file, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let key = (
                p["provider"].as_str().unwrap().to_owned(),
                p["client"].as_str().unwrap().to_owned(),
            );
            (key, p.clone())
        })
        .collect()
}

fn pair<'a>(
    pairs: &'a std::collections::BTreeMap<(String, String), serde_json::Value>,
    provider: &str,
    client: &str,
) -> &'a serde_json::Value {
    pairs
        .get(&(provider.to_owned(), client.to_owned()))
        .unwrap_or_else(|| panic!("no pair {provider} -> {client} in {pairs:?}"))
}

#[test]
fn topo_switch_example_is_bus_addr_through_the_switch() {
    let pairs = topo_pairs("examples/p2p-switch.toml");
    assert_eq!(pairs.len(), 1, "only the NVMe has a BAR: {pairs:?}");
    let p = pair(&pairs, "nvme0", "nic0");
    assert_eq!(p["map_type"], "BUS_ADDR");
    assert_eq!(p["distance"], 4);
    assert_eq!(
        p["path"],
        serde_json::json!(["nvme0", "sw0.d0", "sw0", "sw0.d1", "nic0"])
    );
    assert_eq!(p["common_upstream"], "sw0");
    assert_eq!(p["reason"], serde_json::Value::Null);
    // The Gen4 x4 SSD link is slower than the Gen3 x16 NIC link; the switch's own upstream link is not crossed.
    assert_eq!(p["bottleneck"]["node"], "nvme0");
    assert_eq!(p["bottleneck"]["link"], "Gen4 x4");
    let text_out = text(&peerdma(&["topo", "examples/p2p-switch.toml"]).stdout);
    assert!(text_out.contains("BUS_ADDR"), "{text_out}");
    assert!(
        text_out.contains("nvme0 -> sw0.d0 -> sw0 -> sw0.d1 -> nic0"),
        "{text_out}"
    );
}

#[test]
fn topo_host_bridge_example_shows_whitelist_and_acs_outcomes() {
    let pairs = topo_pairs("examples/p2p-host-bridge.toml");
    let p = pair(&pairs, "nvme0", "nic0");
    assert_eq!(p["map_type"], "THRU_HOST_BRIDGE");
    assert_eq!(p["distance"], 4);
    assert_eq!(p["common_upstream"], serde_json::Value::Null);
    assert_eq!(
        p["path"],
        serde_json::json!(["nvme0", "rp0", "hb0", "s0", "hb1", "rp1", "nic0"])
    );

    let p = pair(&pairs, "nvme0", "nic1");
    assert_eq!(p["map_type"], "NOT_SUPPORTED");
    assert_eq!(p["reason"]["kind"], "host-bridge-not-whitelisted");
    assert_eq!(p["reason"]["host_bridge"], "hb2");
    assert_eq!(p["path"], serde_json::json!([]));
    assert_eq!(p["bottleneck"], serde_json::Value::Null);

    let p = pair(&pairs, "nvme1", "nic2");
    assert_eq!(p["map_type"], "THRU_HOST_BRIDGE");
    assert_eq!(p["distance"], 4);
    assert_eq!(p["common_upstream"], "sw0");
    assert_eq!(p["acs_redirects"], serde_json::json!(["sw0.d0"]));
    assert_eq!(p["bottleneck"]["node"], "nic2");

    let p = pair(&pairs, "nvme1", "nic1");
    assert_eq!(p["map_type"], "NOT_SUPPORTED");
    assert_eq!(p["reason"]["host_bridge"], "hb2");
    assert_eq!(
        pair(&pairs, "nvme0", "nic2")["map_type"],
        "THRU_HOST_BRIDGE"
    );
}

/// A valid topology with a switch, an NVMe and a NIC; the cases below break one line of it.
const TOPO_BASE: &str = r#"[topology]

[[topology.host_bridge]]
name = "hb0"

[[topology.root_port]]
name = "rp0"
parent = "hb0"
bdf = "00:01.0"

[[topology.switch]]
name = "sw0"
parent = "rp0"
bdf = "01:00.0"
downstream = [ { name = "sw0.d0", bdf = "02:00.0" }, { name = "sw0.d1", bdf = "02:01.0" } ]

[[topology.endpoint]]
name = "nvme0"
parent = "sw0.d0"
bdf = "03:00.0"
link = { gen = 4, width = 4 }
bars = [ { index = 2, size = "256MiB", phys = "0x3800_0000_0000" } ]

[[topology.endpoint]]
name = "nic0"
parent = "sw0.d1"
bdf = "04:00.0"
link = { gen = 3, width = 8 }
bars = [ { index = 0, size = "32MiB", phys = "0x3800_1000_0000" } ]

[[thread]]
name = "t"
steps = [ { op = "exit" } ]
"#;

/// Invalid topologies: (what, line of `TOPO_BASE` to replace, its replacement, expected `:line:col`, a
/// fragment of the message).
const BAD_TOPOLOGIES: &[(&str, &str, &str, &str, &str)] = &[
    (
        "duplicate bdf",
        r#"bdf = "04:00.0""#,
        r#"bdf = "03:00.0""#,
        ":27:7",
        "already used by `nvme0`",
    ),
    (
        "device on a missing port",
        r#"parent = "sw0.d1""#,
        r#"parent = "sw0.d7""#,
        ":26:10",
        "parent `sw0.d7` does not exist",
    ),
    (
        "overlapping bars",
        r#"phys = "0x3800_1000_0000""#,
        r#"phys = "0x3800_0800_0000""#,
        ":29:10",
        "overlaps bar 2",
    ),
    (
        "impossible link width",
        "link = { gen = 3, width = 8 }",
        "link = { gen = 3, width = 3 }",
        ":28:8",
        "width 3",
    ),
    (
        "unknown key in a topology table",
        "link = { gen = 3, width = 8 }",
        "lnk = { gen = 3, width = 8 }",
        ":28:1",
        "unknown field `lnk`",
    ),
    (
        "bad size in a bar",
        r#"size = "32MiB""#,
        r#"size = "32 furlongs""#,
        ":29:30",
        "32 furlongs",
    ),
];

#[test]
fn invalid_topologies_exit_2_at_the_node_and_no_panic() {
    let dir = std::env::temp_dir().join(format!("peerdma-topo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.toml");
    std::fs::write(&good, TOPO_BASE).unwrap();
    let out = peerdma(&["check", good.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let mut wrong = Vec::new();
    for (i, (what, line, replacement, loc, fragment)) in BAD_TOPOLOGIES.iter().enumerate() {
        let body = TOPO_BASE.replacen(line, replacement, 1);
        assert_ne!(body, TOPO_BASE, "{what}: `{line}` not in the base topology");
        let f = dir.join(format!("topo{i}.toml"));
        std::fs::write(&f, body).unwrap();
        for cmd in ["check", "run", "topo"] {
            let out = peerdma(&[cmd, f.to_str().unwrap()]);
            let err = text(&out.stderr);
            let located = format!("topo{i}.toml{loc}");
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
fn topo_without_a_topology_table_exits_2() {
    let out = peerdma(&["topo", "examples/quickstart.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("no `[topology]` table"));
}

#[test]
fn params_json_lists_every_parameter_once_with_unit_default_source_and_doc() {
    let out = peerdma(&["params", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = v.as_array().unwrap();
    let mut keys = std::collections::BTreeMap::new();
    for r in rows {
        for field in ["key", "unit", "source", "doc"] {
            assert!(
                r[field].as_str().is_some_and(|s| !s.is_empty()),
                "{field} of {r}"
            );
        }
        assert!(r["default"].is_u64(), "{r}");
        let key = r["key"].as_str().unwrap().to_owned();
        assert!(keys.insert(key.clone(), r.clone()).is_none(), "{key} twice");
    }
    for key in [
        "mm.cpu_fault",
        "mm.swap_io",
        "iommu.iotlb_miss",
        "dma.hop",
        "dmirror.ioctl",
        "dma.pin_page",
    ] {
        assert_eq!(keys[key]["unit"], "ns", "{key}");
    }
    assert_eq!(keys["mm.swap_io"]["default"], 80_000);
    assert_eq!(keys["dma.max_outstanding"]["unit"], "count");
    assert_eq!(keys["dma.max_outstanding"]["default"], 256);
}

#[test]
fn params_text_shows_defaults_with_units() {
    let out = peerdma(&["params"]);
    assert_eq!(out.status.code(), Some(0));
    let t = text(&out.stdout);
    let line = t.lines().find(|l| l.starts_with("mm.swap_io ")).unwrap();
    assert!(
        line.contains("80us") && line.contains("spec/numbers.md §5"),
        "{line}"
    );
}

#[test]
fn ops_lists_every_registered_op_once_and_its_markdown_is_the_format_doc_table() {
    let out = peerdma(&["ops", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    let registered: Vec<&str> = peerdma_scenario::OPS.iter().map(|s| s.name).collect();
    assert_eq!(names, registered);
    assert!(names.contains(&"reclaim") && names.contains(&"dma_sg.read"));
    let out = peerdma(&["ops", "--markdown"]);
    assert_eq!(out.status.code(), Some(0));
    let doc = std::fs::read_to_string(root().join("docs/scenario-format.md")).unwrap();
    for row in text(&out.stdout).lines() {
        assert!(
            doc.lines().any(|l| l == row),
            "not in the format doc: {row}"
        );
    }
    let out = peerdma(&["ops"]);
    assert!(
        text(&out.stdout).contains("reclaim\n  keys:   pages, node\n  expect: errno, cpages\n")
    );
}

#[test]
fn sva_munmap_race_is_explored_without_violations() {
    // The accelerator streams while the process munmaps, mprotects and forks: every seed must pass with the
    // oracle clean, and the first fill must both finish and be cut short by the munmap across seeds.
    let mut first_fill = std::collections::BTreeSet::new();
    for seed in 0..24 {
        let s = seed.to_string();
        let out = peerdma(&[
            "run",
            "examples/sva-munmap-race.toml",
            "--steps",
            "--seed",
            &s,
        ]);
        let o = text(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "seed {seed}:\n{o}");
        let wait = o
            .lines()
            .find(|l| l.contains("sva.wait"))
            .unwrap()
            .to_owned();
        first_fill.insert(wait.contains("cpages=64"));
    }
    assert_eq!(
        first_fill.len(),
        2,
        "the munmap never raced the fill both ways"
    );
}
