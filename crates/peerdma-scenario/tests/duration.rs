//! `expect.duration` with `expect.tolerance`: any step can state its simulated duration (how the calibration
//! scenarios assert a reproduced figure), exactly or within a percentage or a time.
#![expect(
    clippy::tests_outside_test_module,
    reason = "an integration-test crate is all tests"
)]

use peerdma_core::SimDuration;
use peerdma_scenario::{Outcome, RunOptions, Tolerance, parse, run};

fn scenario(expect: &str) -> String {
    format!(
        "[sim]\ntime = \"calibrated\"\n[[thread]]\nname = \"t\"\nsteps = [\n  {{ op = \"mmap\", name = \"b\", len = \"4KiB\", prot = \"rw\", flags = [\"private\", \"anonymous\"] }},\n  {{ op = \"store\", at = \"b\", pattern = \"byte:1\", expect = {{ {expect} }} }},\n]\n"
    )
}

#[test]
fn tolerances_parse_as_percentages_or_times() {
    let tol = |t: &str| {
        let s = parse(
            "d.toml",
            &scenario(&format!("duration = \"1us\", tolerance = \"{t}\"")),
        )
        .unwrap();
        s.threads[0].steps[1].expect.tolerance
    };
    assert_eq!(tol("2%"), Tolerance::RelativePpm(20_000));
    assert_eq!(tol("0.5%"), Tolerance::RelativePpm(5_000));
    assert_eq!(
        tol("10ns"),
        Tolerance::Absolute(SimDuration::from_nanos(10))
    );
    let s = parse("d.toml", &scenario("duration = \"1.4us\"")).unwrap();
    assert_eq!(
        s.threads[0].steps[1].expect.duration,
        Some(SimDuration::from_nanos(1400))
    );
    assert_eq!(s.threads[0].steps[1].expect.tolerance, Tolerance::Exact);
}

#[test]
fn a_tolerance_without_a_duration_or_a_bad_percentage_is_a_located_error() {
    let e = parse("d.toml", &scenario("tolerance = \"2%\"")).unwrap_err();
    assert!(
        e.message.contains("needs `expect.duration`"),
        "{}",
        e.message
    );
    assert_eq!(e.line, 7);
    let e = parse(
        "d.toml",
        &scenario("duration = \"1us\", tolerance = \"x%\""),
    )
    .unwrap_err();
    assert!(e.message.contains("percentage"), "{}", e.message);
}

#[test]
fn the_step_duration_is_checked_within_its_tolerance() {
    // The first store to a fresh page: 1 us fault + 400 ns access.
    let outcome = |expect: &str| {
        let s = parse("d.toml", &scenario(expect)).unwrap();
        run(&s, &RunOptions::default())
    };
    assert_eq!(outcome("duration = \"1.4us\"").outcome, Outcome::Passed);
    assert_eq!(
        outcome("duration = \"1.3us\", tolerance = \"10%\"").outcome,
        Outcome::Passed
    );
    assert_eq!(
        outcome("duration = \"1.39us\", tolerance = \"10ns\"").outcome,
        Outcome::Passed
    );
    let r = outcome("duration = \"1.3us\", tolerance = \"5%\"");
    assert_eq!(r.outcome, Outcome::ExpectationFailed);
    assert!(
        r.failures[0]
            .message
            .contains("expected a duration of 1.300us (within 5%), took 1.400us"),
        "{}",
        r.failures[0].message
    );
    assert_eq!(
        outcome("duration = \"1.41us\"").outcome,
        Outcome::ExpectationFailed
    );
}
