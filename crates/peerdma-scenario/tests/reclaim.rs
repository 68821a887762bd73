//! The `reclaim` op: one `shrink_node` pass at the step's moment. A page referenced since the last pass gets a
//! second chance (rotated), so a fresh working set goes to swap on the second pass; a later access swaps it
//! back in intact, and a node the scenario does not have is `ENOENT`.
#![expect(
    clippy::tests_outside_test_module,
    reason = "an integration-test crate is all tests"
)]

use peerdma_scenario::{Outcome, RunOptions, parse, run};

const SCENARIO: &str = r#"
[sim]
time = "zero"
memory = ["64MiB", "64MiB"]

[[thread]]
name = "t0"
steps = [
  { op = "mmap", name = "buf", len = "16 pages", prot = "rw", flags = ["private", "anonymous"] },
  { op = "store", at = "buf", pattern = "u32:index" },
  { op = "reclaim", pages = 16, expect = { cpages = 0 } },
  { op = "reclaim", pages = 16, node = 0, expect = { cpages = 16 } },
  { op = "reclaim", pages = 16, expect = { cpages = 0 } },
  { op = "load", at = "buf", expect = { data = "u32:index" } },
  { op = "reclaim", pages = 16, node = 1, expect = { cpages = 0 } },
  { op = "reclaim", pages = 16, node = 2, expect = { errno = "ENOENT" } },
]
"#;

#[test]
fn reclaim_rotates_referenced_pages_then_swaps_them_out() {
    let scn = parse("reclaim.toml", SCENARIO).expect("parses");
    let report = run(&scn, &RunOptions::default());
    assert_eq!(report.outcome, Outcome::Passed, "{}", report.render_text());
    for (counter, n) in [("lru.rotate", 16), ("swap.out", 16), ("swap.in", 16)] {
        assert_eq!(report.metrics.get(counter), Some(&n), "{counter}");
    }
}

#[test]
fn reclaim_needs_an_integer_page_count() {
    let text = "[[thread]]\nname = \"t0\"\nsteps = [{ op = \"reclaim\", pages = \"4KiB\" }]\n";
    let err = parse("bad.toml", text).expect_err("pages is a count");
    assert_eq!(
        err.to_string(),
        "bad.toml:3:36: expected an integer number of pages for `pages`, found a string"
    );
}
