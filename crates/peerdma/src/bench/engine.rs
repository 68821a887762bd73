//! Whole-scenario figures of `peerdma bench`: the engine's events per second on
//! `scenarios/oversubscribe.toml` (reclaim, swap, two mirroring devices, migrations; exploration off and
//! on), and the parallel runner's scaling on a many-seed exploration of a protocol scenario
//! (`peerdma_scenario::explore`, the runner `peerdma sweep` shares).
//!
//! The scenarios are compiled into the binary, so the bench runs from any directory.

use std::hint::black_box;

use peerdma_core::SimDuration;
use peerdma_sim::{Sim, SimConfig, SimMutex};

use peerdma_scenario::explore::{ExploreOptions, explore};
use peerdma_scenario::{Outcome, RunOptions, Scenario, parse, run};

use super::sim::{BenchResult, host_now, per};

/// The scenario of the engine figure.
pub(crate) const OVERSUBSCRIBE: (&str, &str) = (
    "scenarios/oversubscribe.toml",
    include_str!("../../../../scenarios/oversubscribe.toml"),
);

/// The scenario of the scaling figure: a device mirror racing munmap, short enough that 1,000 seeds take
/// seconds, with exploration's random orders and preemptions.
pub(crate) const SCALING: (&str, &str) = (
    "scenarios/protocol/dmirror-munmap.toml",
    include_str!("../../../../scenarios/protocol/dmirror-munmap.toml"),
);

/// Parses one of the compiled-in scenarios.
pub(crate) fn load((path, text): (&str, &str)) -> BenchResult<Scenario> {
    let s = parse(path, text).map_err(|e| e.render())?;
    s.check_runnable().map_err(|e| e.render())?;
    Ok(s)
}

/// Runs `scn` once (exploration `explore`, seed 1) and returns its events per second of host time.
pub(crate) fn events_per_second(scn: &Scenario, explore: bool) -> BenchResult<f64> {
    let t = host_now();
    let report = run(
        scn,
        &RunOptions {
            seed: Some(1),
            explore: Some(explore),
            ..RunOptions::default()
        },
    );
    let ns_per_event = per(t.elapsed(), report.events);
    if report.outcome != Outcome::Passed {
        return Err(format!(
            "{} did not pass (explore {explore}): {:?}",
            scn.path, report.outcome
        ));
    }
    Ok(1e9 / ns_per_event.max(f64::MIN_POSITIVE))
}

/// The engine on its own, without a model: 16 agents × 1,000 rounds of (sleep, lock a simulated mutex,
/// sleep, unlock), as `crates/peerdma-sim/benches/engine.rs` (≈ 48,000 events); events per second.
pub(crate) fn core_events_per_second(explore: bool) -> f64 {
    let sim = Sim::new(SimConfig {
        trace: false,
        explore,
        seed: 1,
        ..SimConfig::default()
    });
    let m = SimMutex::new(&sim, "m");
    for a in 0..16u64 {
        let (s, m) = (sim.clone(), m.clone());
        sim.spawn(format!("a{a}"), async move {
            for _ in 0..1000 {
                s.sleep(SimDuration(1 + a)).await;
                let g = m.lock().await;
                s.sleep(SimDuration(1)).await;
                drop(g);
            }
        });
    }
    let t = host_now();
    black_box(sim.run());
    1e9 / per(t.elapsed(), sim.events_delivered()).max(f64::MIN_POSITIVE)
}

/// This process's CPU time (user + system, all threads) in seconds, from `/proc/self/stat` (fields 14
/// and 15, in USER_HZ = 100 ticks per second on Linux).
fn cpu_seconds() -> BenchResult<f64> {
    let s = std::fs::read_to_string("/proc/self/stat")
        .map_err(|e| format!("cannot read /proc/self/stat: {e}"))?;
    let after = s.rsplit_once(')').ok_or("unexpected /proc/self/stat")?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| -> BenchResult<f64> {
        f.get(i)
            .and_then(|v| v.parse::<u32>().ok())
            .map(f64::from)
            .ok_or_else(|| "unexpected /proc/self/stat".to_owned())
    };
    // Field 3 (the state) is the first after the command name: utime is field 14, stime 15.
    Ok((ticks(11)? + ticks(12)?) / 100.0)
}

/// The wall-clock and CPU seconds of one exploration.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ExploreTime {
    /// Host wall-clock seconds.
    pub(crate) wall: f64,
    /// CPU seconds over every thread of this process (10 ms resolution).
    pub(crate) cpu: f64,
}

/// Explores `seeds` seeds of `scn` on `jobs` worker threads; returns the host seconds it took.
pub(crate) fn explore_seconds(scn: &Scenario, seeds: u64, jobs: usize) -> BenchResult<ExploreTime> {
    let cpu0 = cpu_seconds()?;
    let t = host_now();
    let summary = explore(
        scn,
        &ExploreOptions {
            first_seed: 0,
            seeds,
            jobs,
            mutations: Vec::new(),
        },
    );
    let wall = t.elapsed().as_secs_f64();
    let cpu = cpu_seconds()? - cpu0;
    if let Some(f) = summary.first_failure {
        return Err(format!("{} failed at seed {}", scn.path, f.seed));
    }
    if summary.runs != seeds {
        return Err(format!(
            "{} ran {} of {seeds} seeds",
            scn.path, summary.runs
        ));
    }
    Ok(ExploreTime { wall, cpu })
}
