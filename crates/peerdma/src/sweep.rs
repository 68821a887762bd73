//! `peerdma sweep`: runs a scenario over the product of swept parameter values and seeds on worker threads
//! and prints one JSON line per run, in job order (`peerdma_scenario::sweep`, `peerdma_scenario::batch`).

use std::io::Write as _;
use std::num::NonZeroUsize;
use std::path::Path;
use std::process::ExitCode;

use peerdma_scenario::batch::{self, Shard};
use peerdma_scenario::sweep::{self, SweepParam};
use peerdma_scenario::{Outcome, RunOptions, parse_file};

/// The arguments of `peerdma sweep`.
#[derive(Debug)]
pub(crate) struct SweepArgs<'a> {
    pub(crate) file: &'a Path,
    pub(crate) params: &'a [String],
    pub(crate) seeds: u64,
    pub(crate) seed: Option<u64>,
    pub(crate) explore: bool,
    pub(crate) jobs: Option<NonZeroUsize>,
    pub(crate) shard: Shard,
}

/// Runs the sweep; exit 0 when every run passed, 1 when one did not (its line says how), 2 on bad input.
pub(crate) fn run(a: &SweepArgs<'_>) -> ExitCode {
    let scn = match parse_file(a.file) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{}", e.render());
            return ExitCode::from(2);
        }
    };
    let params = match a
        .params
        .iter()
        .map(|p| SweepParam::parse(p))
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let all = match sweep::jobs(&scn, &params, a.seeds, a.seed) {
        Ok(j) => j,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let mine = &all[a.shard.range(all.len())];
    let opts = RunOptions {
        explore: a.explore.then_some(true),
        ..RunOptions::default()
    };
    let workers = a.jobs.unwrap_or_else(batch::default_workers);
    let mut failed = false;
    let mut out = std::io::stdout().lock();
    let mut write_error = None;
    batch::run_ordered(
        mine,
        workers,
        |_, job| {
            let report = sweep::run_job(&scn, job, &opts);
            (
                report.outcome == Outcome::Passed,
                sweep::json_line(job, &report),
            )
        },
        |_, (passed, line)| {
            failed |= !passed;
            if write_error.is_none()
                && let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush())
            {
                write_error = Some(e);
            }
        },
    );
    if let Some(e) = write_error {
        eprintln!("error: cannot write the results: {e}");
        return ExitCode::from(2);
    }
    ExitCode::from(u8::from(failed))
}
