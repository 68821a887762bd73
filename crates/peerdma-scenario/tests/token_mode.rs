//! `[sim] data = "token"`: pages hold versions instead of bytes. Swap-out/in and migration to device memory
//! and back carry the version, so the oracle, which compares every read with the last write's version,
//! passes; steps that compare bytes are refused at the key when the file is read.
#![expect(
    clippy::tests_outside_test_module,
    reason = "an integration-test crate is all tests"
)]

use peerdma_scenario::{Outcome, RunOptions, parse, run};

const SCENARIO: &str = r#"
[sim]
time = "zero"
data = "token"
memory = ["64MiB", "64MiB"]

[[device]]
name = "mirror0"
kind = "dmirror"

[[thread]]
name = "t0"
steps = [
  { op = "mmap", name = "buf", len = "16 pages", prot = "rw", flags = ["private", "anonymous"] },
  { op = "store", at = "buf", pattern = "u32:index" },
  { op = "reclaim", pages = 16, expect = { cpages = 0 } },
  { op = "reclaim", pages = 16, node = 0, expect = { cpages = 16 } },
  { op = "load", at = "buf" },
  { op = "open", dev = "mirror0", fd = "m" },
  { op = "dmirror.migrate_to_dev", fd = "m", at = "buf", pages = 16, expect = { cpages = 16 } },
  { op = "load", at = "buf" },
  { op = "fork", child = "kid" },
  { op = "store", at = "buf", len = "4KiB", pattern = "byte:1" },
  { op = "load", at = "buf", len = "8KiB" },
  { op = "wait", child = "kid" },
]

[[thread]]
name = "k0"
process = "kid"
steps = [
  { op = "load", at = "buf", len = "8KiB" },
  { op = "store", at = "buf+4KiB", len = "4KiB", pattern = "byte:2" },
  { op = "load", at = "buf", len = "8KiB" },
  { op = "exit" },
]
"#;

/// Every read is checked against the last write's version, through swap, device migration and COW.
#[test]
fn versions_survive_swap_migration_and_cow() {
    let scn = parse("token.toml", SCENARIO).expect("parses");
    let report = run(&scn, &RunOptions::default());
    assert_eq!(report.outcome, Outcome::Passed, "{}", report.render_text());
    for (counter, n) in [("swap.out", 16), ("swap.in", 16)] {
        assert_eq!(report.metrics.get(counter), Some(&n), "{counter}");
    }
    assert!(
        report.metrics.get("cpu.cow_copy").copied().unwrap_or(0) >= 1,
        "{:?}",
        report.metrics
    );
}

/// `expect.data` and `expect.value` compare bytes a token-mode run does not keep: an input error at the key.
#[test]
fn byte_expectations_are_refused_in_token_mode() {
    for (step, key) in [
        (
            r#"{ op = "load", at = "buf", expect = { data = "zero" } }"#,
            "data =",
        ),
        (
            r#"{ op = "load", at = "buf", len = 8, expect = { value = 0 } }"#,
            "value =",
        ),
    ] {
        // The step sits on line 8 after two spaces; columns count from 1.
        let col = 3 + step.find(key).unwrap();
        let text = format!(
            "[sim]\ndata = \"token\"\n\n[[thread]]\nname = \"t0\"\nsteps = [\n  {{ op = \"mmap\", name = \"buf\", len = \"4KiB\", prot = \"rw\", flags = [\"private\", \"anonymous\"] }},\n  {step},\n]\n"
        );
        let err = parse("token.toml", &text).expect_err(step);
        assert_eq!((err.line, err.col), (8, col), "{err}");
        assert!(err.message.contains("data = \"token\""), "{err}");
        let bytes = text.replace("data = \"token\"", "data = \"bytes\"");
        assert!(
            parse("bytes.toml", &bytes).is_ok(),
            "bytes mode takes {step}"
        );
    }
}
