//! Multi-seed exploration and mutation checks (DESIGN.md §5, §7): every protocol scenario explores clean,
//! and every mutation switch — one protocol step removed — is caught by exploring its protocol scenario
//! within 1,000 seeds. The clean explorations run 1,000 seeds each in the normal test suite (the dev profile
//! is optimised for it); the README gives the figures.
#![expect(
    clippy::tests_outside_test_module,
    reason = "an integration-test crate is all tests"
)]

use std::path::PathBuf;

use peerdma_core::mutation::Mutation;
use peerdma_scenario::explore::{ExploreOptions, explore, replay_command};
use peerdma_scenario::{Outcome, RunOptions, Scenario, parse_file, run};

fn scenario(rel: &str) -> Scenario {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel);
    let mut s = parse_file(&path).unwrap_or_else(|e| panic!("{}", e.render()));
    rel.clone_into(&mut s.path);
    s
}

/// The protocol scenarios of the README, and the fewest distinct interleavings 100 seeds must show.
const PROTOCOL: &[(&str, usize)] = &[
    ("scenarios/protocol/dmirror-munmap.toml", 50),
    ("scenarios/protocol/dmirror-mprotect.toml", 30),
    ("scenarios/protocol/dmirror-fork.toml", 50),
    ("scenarios/protocol/dmirror-migrate.toml", 50),
    ("scenarios/protocol/dmirror-reclaim.toml", 20),
    ("scenarios/protocol/odp-munmap.toml", 50),
    ("scenarios/protocol/p2p-not-supported.toml", 50),
    ("scenarios/protocol/pin-migrate.toml", 2),
    ("scenarios/protocol/p2p-remove.toml", 10),
    ("scenarios/fork_after_pin.toml", 3),
    ("examples/fence.toml", 50),
    ("examples/iommu-lazy-window.toml", 1),
    // The RDMA NIC's ODP memory region, the GPU's managed memory and the SVA accelerator, each × munmap,
    // mprotect, fork, migration (by a dmirror device) and reclaim.
    ("scenarios/protocol/rnic-munmap.toml", 80),
    ("scenarios/protocol/rnic-mprotect.toml", 80),
    ("scenarios/protocol/rnic-fork.toml", 80),
    ("scenarios/protocol/rnic-migrate.toml", 80),
    ("scenarios/protocol/rnic-reclaim.toml", 80),
    ("scenarios/protocol/gpu-munmap.toml", 80),
    ("scenarios/protocol/gpu-mprotect.toml", 80),
    ("scenarios/protocol/gpu-fork.toml", 80),
    ("scenarios/protocol/gpu-migrate.toml", 80),
    ("scenarios/protocol/gpu-reclaim.toml", 80),
    ("scenarios/protocol/sva-munmap.toml", 30),
    ("scenarios/protocol/sva-mprotect.toml", 30),
    ("scenarios/protocol/sva-fork.toml", 30),
    ("scenarios/protocol/sva-migrate.toml", 30),
    ("scenarios/protocol/sva-reclaim.toml", 30),
];

/// Each mutation switch and the protocol scenario whose exploration catches it.
const CAUGHT_BY: &[(Mutation, &str)] = &[
    (
        Mutation::SkipReadRetry,
        "scenarios/protocol/dmirror-munmap.toml",
    ),
    (
        Mutation::SkipSeqBump,
        "scenarios/protocol/dmirror-munmap.toml",
    ),
    (Mutation::SkipFence, "scenarios/protocol/odp-munmap.toml"),
    (Mutation::EarlyFree, "scenarios/protocol/odp-munmap.toml"),
    (
        Mutation::SkipPinCheckMigrate,
        "scenarios/protocol/pin-migrate.toml",
    ),
    (Mutation::SkipPinCheckCow, "scenarios/fork_after_pin.toml"),
    (
        Mutation::RouteNotSupported,
        "scenarios/protocol/p2p-not-supported.toml",
    ),
    (Mutation::SkipStrictFlush, "examples/iommu-lazy-window.toml"),
];

/// Seeds per clean exploration: 1,000, in the test suite that `.ci/run` runs (the workspace's dev profile is
/// optimised, `opt-level = 1`, for this: a seed costs a few milliseconds of CPU).
const CLEAN_SEEDS: u64 = 1_000;

/// Worker threads for the explorations: every core the machine has.
fn jobs() -> usize {
    std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get)
}

#[test]
fn every_protocol_scenario_explores_clean_with_many_interleavings() {
    for &(file, min_schedules) in PROTOCOL {
        let s = explore(
            &scenario(file),
            &ExploreOptions {
                seeds: CLEAN_SEEDS,
                jobs: jobs(),
                ..ExploreOptions::default()
            },
        );
        if let Some(f) = &s.first_failure {
            panic!(
                "{file} fails at seed {}:\n{}",
                f.seed,
                f.report.render_text()
            );
        }
        assert_eq!(s.runs, CLEAN_SEEDS);
        // The table's minimum is for 100 seeds; scale it to the seeds run.
        let want = (min_schedules * usize::try_from(CLEAN_SEEDS).unwrap() / 100).max(1);
        assert!(
            s.distinct_schedules >= want.min(min_schedules),
            "{file}: only {} distinct interleavings in {CLEAN_SEEDS} seeds",
            s.distinct_schedules
        );
    }
}

#[test]
fn every_mutation_switch_is_caught_within_1000_seeds() {
    let mut covered = Vec::new();
    for &(m, file) in CAUGHT_BY {
        let s = explore(
            &scenario(file),
            &ExploreOptions {
                seeds: 1_000,
                jobs: jobs(),
                mutations: vec![m],
                ..ExploreOptions::default()
            },
        );
        let f = s
            .first_failure
            .unwrap_or_else(|| panic!("{} not caught by {file} in 1,000 seeds", m.name()));
        // Every switch is caught by the oracle, except the pin check of migration: the oracle does not
        // watch migrations of pinned pages (DESIGN.md §7.3 is checked at device access), so the scenario's
        // data expectation catches it (the DMA wrote to the page the process no longer maps).
        match (m, &f.report.outcome) {
            (_, Outcome::OracleViolation(_))
            | (Mutation::SkipPinCheckMigrate, Outcome::ExpectationFailed) => {}
            (_, other) => panic!("{}: {other:?}", m.name()),
        }
        covered.push(m);
    }
    covered.sort();
    assert_eq!(covered, Mutation::ALL, "a switch without its check");
}

#[test]
fn a_failing_seed_replays_identically_and_the_replay_command_names_it() {
    let scn = scenario("scenarios/protocol/dmirror-munmap.toml");
    let summary = explore(
        &scn,
        &ExploreOptions {
            seeds: 1_000,
            jobs: 1,
            mutations: vec![Mutation::SkipReadRetry],
            ..ExploreOptions::default()
        },
    );
    let f = summary.first_failure.expect("caught");
    assert_eq!(summary.runs, f.seed + 1, "stops at the first failing seed");
    let replay = || {
        let _on = peerdma_core::mutation::enable(Mutation::SkipReadRetry);
        run(
            &scn,
            &RunOptions {
                seed: Some(f.seed),
                explore: Some(true),
                ..RunOptions::default()
            },
        )
    };
    let (first, second) = (replay(), replay());
    assert_eq!(first.render_text(), f.report.render_text());
    assert_eq!(first.render_text(), second.render_text());
    assert_eq!(first.schedule_hash, f.report.schedule_hash);
    let Outcome::OracleViolation(v) = &first.outcome else {
        panic!("{:?}", first.outcome)
    };
    // The report names the step (file:line:col) and the pending threads.
    assert!(
        v.contains("at scenarios/protocol/dmirror-munmap.toml:") && v.contains("while pending"),
        "{v}"
    );
    assert_eq!(
        replay_command(&scn.path, f.seed, &[Mutation::SkipReadRetry]),
        format!(
            "peerdma run scenarios/protocol/dmirror-munmap.toml --explore --seed {} --mutate skip_read_retry",
            f.seed
        )
    );
    // Without the switch the same seed passes.
    let clean = run(
        &scn,
        &RunOptions {
            seed: Some(f.seed),
            explore: Some(true),
            ..RunOptions::default()
        },
    );
    assert_eq!(clean.outcome, Outcome::Passed);
}

#[test]
fn the_result_does_not_depend_on_the_number_of_jobs() {
    let scn = scenario("scenarios/protocol/dmirror-munmap.toml");
    let go = |jobs| {
        let s = explore(
            &scn,
            &ExploreOptions {
                seeds: 200,
                jobs,
                mutations: vec![Mutation::SkipSeqBump],
                ..ExploreOptions::default()
            },
        );
        (
            s.runs,
            s.passed,
            s.distinct_schedules,
            s.events,
            s.first_failure.map(|f| (f.seed, f.report.render_text())),
        )
    };
    assert_eq!(go(1), go(3));
}

/// Seeds the 100,000-seed runs of the README flagged, replayed: each must pass now.
/// - `gpu-migrate.toml` seed 2613: a CPU load pulled a page back from the GPU's memory while a kernel read
///   it; the GPU's pool followed lib/test_hmm.c's rule (its own MIGRATE invalidations ignored) and kept
///   the page mapped (the oracle: a read of a page the CPU page table no longer maps). The GPU's pool now
///   handles its own migrations like any other invalidation.
const FLAGGED_BY_LONG_RUNS: &[(&str, u64)] = &[("scenarios/protocol/gpu-migrate.toml", 2613)];

#[test]
fn the_seeds_the_long_runs_flagged_pass() {
    for &(path, seed) in FLAGGED_BY_LONG_RUNS {
        let r = run(
            &scenario(path),
            &RunOptions {
                seed: Some(seed),
                explore: Some(true),
                ..RunOptions::default()
            },
        );
        assert_eq!(r.outcome, Outcome::Passed, "{path} seed {seed}");
    }
}
