//! The differences found by running Linux's own selftests and small C programs on a 6.18 kernel next to the
//! same steps in a scenario (issue 10), one test per numbered difference, each named after the kernel
//! rule, plus the scenario-language features those tests need. Each scenario states what Linux does; the
//! kernel file where the rule lives is named above each test.
#![expect(
    clippy::tests_outside_test_module,
    reason = "an integration-test crate is all tests"
)]

use peerdma_scenario::{Outcome, Report, RunOptions, parse, run};

/// A dmirror device of the private flavour, then `steps` in the `main` process's thread `t`.
fn with_dmirror(steps: &str) -> String {
    format!(
        "[sim]\ntime = \"zero\"\n\n[[device]]\nname = \"dmirror0\"\nkind = \"dmirror\"\n\n\
         [[thread]]\nname = \"t\"\nsteps = [\n{steps}\n]\n"
    )
}

/// Runs `text` and asserts that every expectation held and the oracle found nothing.
fn passes(name: &str, text: &str) -> Report {
    let scn = parse(name, text).unwrap_or_else(|e| panic!("{}", e.render()));
    let report = run(&scn, &RunOptions::default());
    assert_eq!(report.outcome, Outcome::Passed, "{}", report.render_text());
    report
}

// ----- scenario-language features -----

/// `expect.counters` checks how much a counter grew during the step: the child's first store to a page
/// shared after fork copies it once.
#[test]
fn expect_counters_checks_each_counters_growth_over_the_step() {
    passes(
        "counters.toml",
        r#"
[sim]
time = "zero"

[[thread]]
name = "t"
steps = [
  { op = "mmap", name = "buf", len = "4KiB", prot = "rw", flags = ["private", "anonymous"] },
  { op = "store", at = "buf", pattern = "byte:0x11", expect = { counters = { "cpu.faults" = 1, "cpu.cow_copy" = 0 } } },
  { op = "fork", child = "kid" },
  { op = "wait", child = "kid" },
]

[[thread]]
name = "k"
process = "kid"
steps = [
  { op = "store", at = "buf", pattern = "byte:0x22", expect = { counters = { "cpu.cow_copy" = 1 } } },
  { op = "store", at = "buf", pattern = "byte:0x33", expect = { counters = { "cpu.cow_copy" = 0, "cpu.faults" = 0 } } },
]
"#,
    );
    let text = with_dmirror(
        r#"  { op = "mmap", name = "buf", len = "4KiB", prot = "rw", flags = ["private", "anonymous"] },
  { op = "store", at = "buf", pattern = "zero", expect = { counters = { "cpu.faults" = 2 } } },"#,
    );
    let scn = parse("counters_fail.toml", &text).unwrap();
    let report = run(&scn, &RunOptions::default());
    assert_eq!(report.outcome, Outcome::ExpectationFailed);
    assert!(
        report.failures[0]
            .message
            .contains("expected counter `cpu.faults` to grow by 2, it grew by 1"),
        "{}",
        report.render_text()
    );
}

/// `expect.events` lists the notifier events a mirror acted on during the step; `[]` expects none.
#[test]
fn expect_events_lists_what_the_mirror_saw() {
    passes(
        "events.toml",
        &with_dmirror(
            r#"  { op = "open", dev = "dmirror0", fd = "m" },
  { op = "mmap", name = "buf", len = "4 pages", prot = "rw", flags = ["private", "anonymous"] },
  { op = "store", at = "buf", pattern = "u32:index", expect = { events = { m = [] } } },
  { op = "dmirror.read", fd = "m", at = "buf", pages = 4, expect = { cpages = 4, events = { m = [] } } },
  { op = "mprotect", at = "buf", len = "4 pages", prot = "r", expect = { events = { m = ["protection_vma"] } } },
  { op = "munmap", at = "buf", len = "4 pages", expect = { events = { m = ["unmap"] } } },"#,
        ),
    );
}

/// `data = { one_of = [...] }` accepts any of several outcomes (racing steps).
#[test]
fn expect_data_one_of_accepts_any_listed_pattern() {
    passes(
        "one_of.toml",
        &with_dmirror(
            r#"  { op = "mmap", name = "buf", len = "4KiB", prot = "rw", flags = ["private", "anonymous"] },
  { op = "store", at = "buf", pattern = "byte:0x22" },
  { op = "load", at = "buf", expect = { data = { one_of = ["byte:0x11", "byte:0x22"] } } },"#,
        ),
    );
    let text = with_dmirror(
        r#"  { op = "mmap", name = "buf", len = "4KiB", prot = "rw", flags = ["private", "anonymous"] },
  { op = "load", at = "buf", expect = { data = { one_of = ["byte:0x11", "byte:0x22"] } } },"#,
    );
    let report = run(
        &parse("one_of_fail.toml", &text).unwrap(),
        &RunOptions::default(),
    );
    assert_eq!(report.outcome, Outcome::ExpectationFailed);
    assert!(report.failures[0].message.contains("data matches none of"));
}

/// A plain FOLL_GET reference held across steps (what vmsplice holds) is no pin: a CPU write after fork
/// copies the page away from it, and `dma.read` through the reference sees the old page.
#[test]
fn get_references_are_held_across_steps_and_read_through() {
    passes(
        "get_ref.toml",
        r#"
[sim]
time = "zero"

[[thread]]
name = "t"
steps = [
  { op = "mmap", name = "buf", len = "4KiB", prot = "rw", flags = ["private", "anonymous"] },
  { op = "store", at = "buf", pattern = "byte:0x11" },
  { op = "pin", at = "buf", pages = 1, flags = ["get"], name = "ref" },
  { op = "fork", child = "kid" },
  { op = "wait", child = "kid" },
  { op = "store", at = "buf", pattern = "byte:0x22", expect = { counters = { "cpu.cow_copy" = 1 } } },
  { op = "dma.read", pin = "ref", expect = { data = "byte:0x11" } },
  { op = "load", at = "buf", expect = { data = "byte:0x22" } },
  { op = "unpin", pin = "ref" },
]

[[thread]]
name = "k"
process = "kid"
steps = [
  { op = "load", at = "buf", expect = { data = "byte:0x11" } },
]
"#,
    );
}

/// A child inherits the parent's open dmirror file; it still mirrors the opener's address space.
#[test]
fn an_inherited_device_file_mirrors_the_openers_address_space() {
    passes(
        "inherit_fd.toml",
        r#"
[sim]
time = "zero"

[[device]]
name = "dmirror0"
kind = "dmirror"

[[thread]]
name = "t"
steps = [
  { op = "open", dev = "dmirror0", fd = "m" },
  { op = "mmap", name = "buf", len = "4KiB", prot = "rw", flags = ["private", "anonymous"] },
  { op = "store", at = "buf", pattern = "byte:0x11" },
  { op = "fork", child = "kid" },
  { op = "wait", child = "kid" },
  { op = "load", at = "buf", expect = { data = "byte:0x33" } },
  { op = "close", fd = "m" },
]

[[thread]]
name = "k"
process = "kid"
steps = [
  { op = "store", at = "buf", pattern = "byte:0x22" },
  # The device reads and writes the parent's page, not the child's.
  { op = "dmirror.read", fd = "m", at = "buf", pages = 1, expect = { cpages = 1, data = "byte:0x11" } },
  { op = "dmirror.write", fd = "m", at = "buf", pages = 1, pattern = "byte:0x33", expect = { cpages = 1 } },
  { op = "load", at = "buf", expect = { data = "byte:0x22" } },
  { op = "close", fd = "m" },
]
"#,
    );
}
