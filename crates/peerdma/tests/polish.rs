//! CLI polish through the binary: `--help` shows examples and the format doc, `check --json`, shell
//! completions, and "did you mean" for unknown ops and keys.
#![expect(
    clippy::tests_outside_test_module,
    reason = "an integration-test crate is all tests"
)]

mod common;

use common::peerdma;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn help_shows_examples_and_the_format_doc() {
    let out = peerdma(&["--help"]);
    let t = text(&out.stdout);
    assert!(
        t.contains("Examples:") && t.contains("peerdma sweep "),
        "{t}"
    );
    assert!(t.contains("docs/scenario-format.md"), "{t}");
}

#[test]
fn check_json_reports_validity_and_the_error_location() {
    let out = peerdma(&["check", "examples/quickstart.toml", "--json"]);
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["threads"], 1);
    let dir = std::env::temp_dir().join(format!("peerdma-polish-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[[thread]]\nname = \"t\"\nsteps = [ { op = \"dmirror.raed\" } ]\n",
    )
    .unwrap();
    let out = peerdma(&["check", bad.to_str().unwrap(), "--json"]);
    assert_eq!(out.status.code(), Some(2));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(
        (v["error"]["line"].as_u64(), v["error"]["col"].as_u64()),
        (Some(3), Some(18))
    );
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("unknown op `dmirror.raed`") && msg.contains("did you mean `dmirror.read`?"),
        "{msg}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn completions_name_every_subcommand() {
    for shell in ["bash", "zsh", "fish"] {
        let out = peerdma(&["completions", shell]);
        assert_eq!(out.status.code(), Some(0), "{shell}");
        let t = text(&out.stdout);
        for sub in ["run", "check", "sweep", "topo", "params"] {
            assert!(t.contains(sub), "{shell}: no {sub}");
        }
    }
}

#[test]
fn link_defaults_mps_and_mrrs_like_a_topology_link_and_prints_csv() {
    let out = peerdma(&[
        "link",
        "--gen",
        "3",
        "--width",
        "x8",
        "--size",
        "64,256,4KiB",
        "--csv",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let t = text(&out.stdout);
    let rows: Vec<&str> = t.lines().collect();
    assert_eq!(rows[0], "size,write_gbps,read_gbps");
    // The docs/figures.md §1 reference rows (MPS 256, MRRS 512): 64 B 42.10 / 44.10, 4 KiB 52.92 / 53.69.
    let row = |i: usize| -> Vec<f64> { rows[i].split(',').map(|x| x.parse().unwrap()).collect() };
    for (i, size, write, read) in [(1, 64.0, 42.10, 44.10), (3, 4096.0, 52.92, 53.69)] {
        let r = row(i);
        assert!((r[0] - size).abs() < f64::EPSILON, "{t}");
        assert!(
            (r[1] - write).abs() < 0.005 && (r[2] - read).abs() < 0.005,
            "{t}"
        );
    }
}
