//! Multi-seed exploration (`peerdma explore`): runs one scenario over many seeds with schedule exploration
//! on, stops at the first seed whose run fails, and counts the distinct interleavings it saw.
//!
//! With exploration on, the engine ([`peerdma_sim::SimConfig`]) draws from the seed (1) the order of agents
//! ready at the same instant and (2) preemptions at yield points — every protocol step boundary that
//! awaits `Kernel::preempt_point` or a zero-length sleep is, now and then, held back by a random delay of
//! up to 20 µs, so that another agent's whole protocol step (an invalidation, a fault, a DMA landing) lands
//! in the window. This is the randomised-priority idea of PCT (Burckhardt et al., ASPLOS 2010) applied to
//! a discrete-event simulator: each seed gives a different schedule, and a seed's schedule is a pure
//! function of the seed, so a failing seed replays identically with
//! `peerdma run FILE --explore --seed N` (the command [`replay_command`] prints).
//!
//! Distinct interleavings are counted by [`crate::Report::schedule_hash`], a hash of the order in which
//! agents ran. The seeds run through [`for_each_seed`], the one place a parallel runner plugs in.

use std::collections::BTreeSet;

use peerdma_core::mutation::{self, Mutation};

use crate::ast::Scenario;
use crate::report::{Outcome, Report};
use crate::run::{RunOptions, run};

/// What to explore.
#[derive(Clone, Debug)]
pub struct ExploreOptions {
    /// The first seed.
    pub first_seed: u64,
    /// How many seeds, from `first_seed` on.
    pub seeds: u64,
    /// Host threads to run seeds on (the runner may run them one at a time; see [`for_each_seed`]).
    pub jobs: usize,
    /// Mutation switches on during every run (test-only: [`peerdma_core::mutation`]).
    pub mutations: Vec<Mutation>,
}

impl Default for ExploreOptions {
    fn default() -> Self {
        Self {
            first_seed: 0,
            seeds: 1_000,
            jobs: 1,
            mutations: Vec::new(),
        }
    }
}

/// The first failing seed and its report.
#[derive(Clone, Debug)]
pub struct SeedFailure {
    /// The seed.
    pub seed: u64,
    /// Its run's report (the oracle's violation, the failed expectations, the limit...).
    pub report: Report,
}

/// What an exploration found.
#[derive(Clone, Debug, Default)]
pub struct ExploreSummary {
    /// Seeds run (up to and including the first failure).
    pub runs: u64,
    /// Seeds whose run passed.
    pub passed: u64,
    /// Distinct interleavings seen (distinct [`Report::schedule_hash`] values).
    pub distinct_schedules: usize,
    /// Engine events delivered over every run.
    pub events: u64,
    /// The lowest failing seed, if any.
    pub first_failure: Option<SeedFailure>,
}

/// Runs `f` for each seed of `seeds` in order and returns the first `Some` it gives, with its seed; `f`
/// is not called for later seeds. This is the runner's interface: today it runs seeds one at a time on the
/// calling thread (`jobs` is accepted for the parallel runner shared with `peerdma sweep`, which must keep
/// this contract: the result is the *lowest* seed's, whatever the number of jobs).
pub fn for_each_seed<T>(
    seeds: std::ops::Range<u64>,
    _jobs: usize,
    mut f: impl FnMut(u64) -> Option<T>,
) -> Option<(u64, T)> {
    for seed in seeds {
        if let Some(t) = f(seed) {
            return Some((seed, t));
        }
    }
    None
}

/// Explores `scn` over `opts.seeds` seeds and stops at the first failure.
pub fn explore(scn: &Scenario, opts: &ExploreOptions) -> ExploreSummary {
    mutation::set(&opts.mutations);
    let mut hashes = BTreeSet::new();
    let mut summary = ExploreSummary::default();
    let end = opts.first_seed.saturating_add(opts.seeds);
    let failure = for_each_seed(opts.first_seed..end, opts.jobs, |seed| {
        let report = run(
            scn,
            &RunOptions {
                seed: Some(seed),
                explore: Some(true),
                step_log: false,
                trace: false,
            },
        );
        summary.runs += 1;
        summary.events += report.events;
        hashes.insert(report.schedule_hash);
        if report.outcome == Outcome::Passed {
            summary.passed += 1;
            None
        } else {
            Some(report)
        }
    });
    mutation::set(&[]);
    summary.distinct_schedules = hashes.len();
    summary.first_failure = failure.map(|(seed, report)| SeedFailure { seed, report });
    summary
}

/// Returns the command that replays seed `seed` of `path` exactly (with the mutation switches, if any).
pub fn replay_command(path: &str, seed: u64, mutations: &[Mutation]) -> String {
    let mut cmd = format!("peerdma run {path} --explore --seed {seed}");
    for m in mutations {
        cmd.push_str(" --mutate ");
        cmd.push_str(m.name());
    }
    cmd
}
