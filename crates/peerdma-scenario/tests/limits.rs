//! Limits instead of crashes, and reports that say what happened (issue "verification and hostile input"):
//! a catalogue of hostile inputs, each with the message and location (parse time) or the outcome (run time)
//! it must give.
#![expect(
    clippy::tests_outside_test_module,
    reason = "an integration-test crate is all tests"
)]

use peerdma_scenario::{Outcome, Report, RunOptions, parse, run};

fn run_text(text: &str) -> Report {
    let scn = parse("l.toml", text).unwrap_or_else(|e| panic!("{}", e.render()));
    run(&scn, &RunOptions::default())
}

fn thread(steps: &str) -> String {
    format!("[[thread]]\nname = \"t\"\nsteps = [\n{steps}\n]\n")
}

const MAP: &str = r#"  { op = "mmap", name = "buf", len = "4 pages", prot = "rw", flags = ["private", "anonymous"] },"#;

/// (input, expected line, expected column, a piece of the expected message).
const PARSE_CATALOGUE: &[(&str, usize, usize, &str)] = &[
    (
        "[sim]\nmemory = \"128GiB\"\n",
        2,
        10,
        "over the limit of 0x1000000000 (`[sim.limits] memory`)",
    ),
    (
        "[sim]\nlimits = { memory = \"1GiB\" }\nmemory = [\"1GiB\", \"4KiB\"]\n",
        3,
        10,
        "`memory` adds up to 0x40001000 bytes",
    ),
    (
        "[[device]]\nname = \"d\"\nkind = \"dmirror\"\nsize = \"1TiB\"\n",
        4,
        8,
        "this device's `size` brings the simulated memory",
    ),
    (
        "[[file]]\nname = \"f\"\nsize = \"2GiB\"\n",
        3,
        8,
        "over the host memory limit of 0x40000000 (`[sim.limits] host_memory`)",
    ),
    (
        "[sim.limits]\nsteps = -1\n",
        2,
        9,
        "expected an integer of 0 or more for `steps`",
    ),
    ("[sim.limits]\nheap = 1\n", 2, 1, "unknown key `heap`"),
    (
        "[[thread]]\nname = \"t\"\nsteps = [{ op = \"exit\" }, { op = \"sleep\", for = \"1us\" }]\n",
        3,
        27,
        "comes after the `exit` at line 3 and would never run",
    ),
];

#[test]
fn parse_catalogue_gives_each_message_at_its_location() {
    for &(text, line, col, message) in PARSE_CATALOGUE {
        let err = parse("c.toml", text).expect_err(text);
        assert!(
            err.message.contains(message),
            "{text}\n got: {err}\nwant: {message}"
        );
        assert_eq!((err.line, err.col), (line, col), "{text}\n{err}");
    }
}

#[test]
fn an_empty_scenario_is_not_runnable() {
    let scn = parse("e.toml", "").unwrap();
    let err = scn.check_runnable().unwrap_err();
    assert_eq!((err.line, err.col), (1, 1));
    assert!(err.message.contains("no `[[thread]]`"), "{err}");
    parse("e.toml", &thread(""))
        .unwrap()
        .check_runnable()
        .unwrap();
}

#[test]
fn a_load_over_the_host_memory_limit_stops_the_run_naming_the_limit_and_the_step() {
    let text = format!(
        "[sim.limits]\nhost_memory = \"64KiB\"\n{}",
        thread(&format!(
            "{MAP}\n  {{ op = \"mmap\", name = \"big\", len = \"1TiB\", prot = \"rw\", flags = [\"private\", \"anonymous\"] }},\n  {{ op = \"load\", at = \"big\" }},\n  {{ op = \"store\", at = \"buf\", pattern = \"zero\" }},"
        ))
    );
    let r = run_text(&text);
    let Outcome::Limit(why) = &r.outcome else {
        panic!("{}", r.render_text())
    };
    assert!(
        why.contains("l.toml:8:3") && why.contains("`load`") && why.contains("host_memory"),
        "{why}"
    );
    assert_eq!(r.exit_code(), 2);
}

/// A `store` streams its pattern a page at a time (no host buffer of the whole store): a store sixteen
/// times `host_memory` runs, and every byte lands where the pattern puts it — checked by loads, each
/// within the limit, of the first page, a page in the middle and the last page.
#[test]
fn a_store_over_the_host_memory_limit_streams_and_writes_every_page() {
    let store = r#"  { op = "mmap", name = "big", len = "1MiB", prot = "rw", flags = ["private", "anonymous"] },
  { op = "store", at = "big", pattern = [{ len = "4KiB", pattern = "byte:0x11" }, { len = "1016KiB", pattern = "u32:index" }, { pattern = "byte:0x5a" }] },
  { op = "load", at = "big", len = "4KiB", expect = { data = "byte:0x11" } },
  { op = "load", at = "big+4KiB", len = "8KiB", expect = { data = "u32:index+1024" } },
  { op = "load", at = "big+1020KiB", len = "4KiB", expect = { data = "byte:0x5a" } },"#;
    let r = run_text(&format!(
        "[sim.limits]\nhost_memory = \"64KiB\"\n{}",
        thread(store)
    ));
    assert!(matches!(r.outcome, Outcome::Passed), "{}", r.render_text());
    assert_eq!(r.exit_code(), 0, "{}", r.render_text());
}

/// A `pwrite` streams its pattern too: a write sixteen times `host_memory` into a one-page file runs,
/// extends the file and puts every byte where the pattern says (reads of the first and last pages, each
/// within the limit).
#[test]
fn a_pwrite_over_the_host_memory_limit_streams_and_writes_every_page() {
    let text = r#"[sim.limits]
host_memory = "64KiB"

[[file]]
name = "f"
size = "4KiB"

[[thread]]
name = "t"
steps = [
  { op = "pwrite", file = "f", offset = 0, len = "1MiB", pattern = "u32:-index-3" },
  { op = "pread", file = "f", offset = 0, len = "4KiB", expect = { data = "u32:-index-3" } },
  { op = "pread", file = "f", offset = "1020KiB", len = "4KiB", expect = { data = "u32:-index-261123" } },
]
"#;
    let r = run_text(text);
    assert!(matches!(r.outcome, Outcome::Passed), "{}", r.render_text());
}

#[test]
fn the_step_limit_stops_a_run() {
    let steps = "  { op = \"sleep\", for = \"1ns\" },\n".repeat(10);
    let r = run_text(&format!("[sim.limits]\nsteps = 5\n{}", thread(&steps)));
    assert!(
        matches!(&r.outcome, Outcome::Limit(w) if w.contains("step limit reached: 5 steps")),
        "{:?}",
        r.outcome
    );
}

#[test]
fn the_event_limit_stops_a_run() {
    let steps = "  { op = \"sleep\", for = \"1ns\" },\n".repeat(50);
    let r = run_text(&format!("[sim.limits]\nevents = 10\n{}", thread(&steps)));
    assert!(
        matches!(&r.outcome, Outcome::Limit(w) if w.contains("event limit")),
        "{:?}",
        r.outcome
    );
    assert_eq!(r.events, 10);
}

#[test]
fn the_time_limit_names_the_limit_and_the_pending_thread_and_its_step() {
    let text = format!(
        "[sim]\ntime_limit = \"1ms\"\n{}",
        thread("  { op = \"sleep\", for = \"2ms\" },")
    );
    let r = run_text(&text);
    let Outcome::TimeLimit(why) = &r.outcome else {
        panic!("{:?}", r.outcome)
    };
    assert!(
        why.contains("time limit 1.000ms (`[sim] time_limit`)")
            && why.contains("thread `t` in `sleep` at l.toml:6:3"),
        "{why}"
    );
}

#[test]
fn a_sleep_past_the_end_of_the_clock_is_an_error_not_a_saturation() {
    let text = format!(
        "[sim]\ntime_limit = 18446744073709551615\n{}",
        thread(
            "  { op = \"sleep\", for = 18446744073709551000 },\n  { op = \"sleep\", for = 18446744073709551000 },"
        )
    );
    let r = run_text(&text);
    assert!(
        matches!(&r.outcome, Outcome::Limit(w) if w.contains("clock overflow")),
        "{:?}",
        r.outcome
    );
}

#[test]
fn run_time_misuse_is_an_errno_that_expect_can_name() {
    let text = thread(&format!(
        "{MAP}\n  {{ op = \"pin\", at = \"buf\", pages = 1, flags = [\"pin\"], name = \"p\" }},\n  {{ op = \"unpin\", pin = \"p\" }},\n  {{ op = \"unpin\", pin = \"p\", expect = {{ errno = \"EBADF\" }} }},\n  {{ op = \"unpin\", pin = \"p\", expect = {{ errno = \"any\" }} }},"
    ));
    let r = run_text(&text);
    assert_eq!(r.outcome, Outcome::Passed, "{}", r.render_text());
    // Unexpected, it fails the step and says what the misuse was.
    let text = thread(&format!(
        "{MAP}\n  {{ op = \"pin\", at = \"buf\", pages = 1, flags = [\"pin\"], name = \"p\" }},\n  {{ op = \"unpin\", pin = \"p\" }},\n  {{ op = \"unpin\", pin = \"p\" }},"
    ));
    let r = run_text(&text);
    assert_eq!(r.failures.len(), 1);
    assert!(
        r.failures[0]
            .message
            .contains("expected success, got -EBADF (pin `p` is not held by process `main`)"),
        "{}",
        r.failures[0].message
    );
}
