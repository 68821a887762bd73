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
//! agents ran. The seeds run on the one parallel runner ([`crate::batch`], shared with `peerdma sweep`)
//! through [`for_each_seed`]; the summary and the first failure are the same whatever the number of jobs.

use std::collections::BTreeSet;
use std::num::NonZeroUsize;

use peerdma_core::mutation::{self, Mutation};

use crate::ast::Scenario;
use crate::batch::run_indexed_until;
use crate::report::{Outcome, Report};
use crate::run::{RunOptions, run};

/// What to explore.
#[derive(Clone, Debug)]
pub struct ExploreOptions {
    /// The first seed.
    pub first_seed: u64,
    /// How many seeds, from `first_seed` on.
    pub seeds: u64,
    /// Host threads to run seeds on (0 counts as 1).
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

/// Runs `work` for the seeds of `seeds` on `jobs` worker threads ([`crate::batch::run_indexed_until`], the
/// one parallel runner) and hands each result to `visit` **in seed order**, until `visit` returns
/// `false`. The workers stay busy across the whole range (no barrier between groups of seeds); after a
/// stop, the seeds already started past the stopping one finish and are discarded. What `visit` sees is
/// the same whatever `jobs` is.
pub fn for_each_seed<R: Send>(
    seeds: std::ops::Range<u64>,
    jobs: NonZeroUsize,
    work: impl Fn(u64) -> R + Sync,
    mut visit: impl FnMut(u64, R) -> bool,
) {
    let start = seeds.start;
    let count = usize::try_from(seeds.end.saturating_sub(start)).unwrap_or(usize::MAX);
    run_indexed_until(
        count,
        jobs,
        |i| work(start + i as u64),
        |i, r| visit(start + i as u64, r),
    );
}

/// Explores `scn` over `opts.seeds` seeds and stops at the first failure.
pub fn explore(scn: &Scenario, opts: &ExploreOptions) -> ExploreSummary {
    let mut hashes = BTreeSet::new();
    let mut summary = ExploreSummary::default();
    let end = opts.first_seed.saturating_add(opts.seeds);
    let jobs = NonZeroUsize::new(opts.jobs).unwrap_or(NonZeroUsize::MIN);
    let work = |seed: u64| {
        // The switches are per host thread: set them in the worker that runs this seed.
        mutation::set(&opts.mutations);
        let report = run(
            scn,
            &RunOptions {
                seed: Some(seed),
                explore: Some(true),
                step_log: false,
                trace: false,
                progress: None,
            },
        );
        mutation::set(&[]);
        report
    };
    for_each_seed(opts.first_seed..end, jobs, work, |seed, report| {
        summary.runs += 1;
        summary.events += report.events;
        hashes.insert(report.schedule_hash);
        if report.outcome == Outcome::Passed {
            summary.passed += 1;
            true
        } else {
            summary.first_failure = Some(SeedFailure { seed, report });
            false
        }
    });
    summary.distinct_schedules = hashes.len();
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
