//! Parameter sweeps (`peerdma sweep`): one scenario run over the cartesian product of a few parameters'
//! values and a range of seeds, each run one JSON line.
//!
//! Host-side tooling, not a kernel model. A swept key is a timing-model parameter of [`crate::params`]
//! (what a scenario's `[timing]` table sets; a time takes a unit, `2us`) or `seed`. The job list is fixed
//! by the arguments alone: parameters vary in the order given, the last fastest, and seeds innermost; the
//! jobs run on [`crate::batch`]'s parallel runner, which hands results back in job order, so the lines are
//! the same bytes whatever the number of workers and however the list is sharded.

use std::collections::BTreeMap;
use std::fmt;

use peerdma_core::timing::ParamUnit;
use serde::Serialize;

use crate::ast::{Scenario, TimeMode};
use crate::params;
use crate::report::Report;
use crate::run::{RunOptions, run};
use crate::units;

/// What a swept key names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SweepKey {
    /// The run's seed.
    Seed,
    /// A timing-model parameter (its registry entry).
    Timing(peerdma_core::timing::ParamSpec),
}

/// One `--param key=v1,v2,...`: a key and its values, in the order given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SweepParam {
    /// The key as written (`dma.hop`, `seed`).
    pub key: String,
    /// What it names.
    pub kind: SweepKey,
    /// The values, in the parameter's unit (nanoseconds for a time).
    pub values: Vec<u64>,
}

/// Why a sweep's arguments were refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SweepError {
    /// Not `key=v1,v2,...`.
    #[error("expected `--param key=v1,v2,...`, found `{0}`")]
    Syntax(String),
    /// The key is neither `seed` nor a timing parameter.
    #[error("unknown sweep key `{key}`; {hint}")]
    UnknownKey {
        /// The key written.
        key: String,
        /// The nearest key, or where to find them.
        hint: String,
    },
    /// A value is not of the key's unit.
    #[error("`{key}`: bad value `{value}`: {reason}")]
    BadValue {
        /// The key.
        key: String,
        /// The value written.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The same key is swept twice.
    #[error("`{0}` is swept twice")]
    Duplicate(String),
    /// `seed` swept together with `--seeds` above 1.
    #[error("sweep either `seed` values or `--seeds N`, not both")]
    SeedTwice,
    /// A time parameter swept in a zero-time scenario, where it has no effect.
    #[error(
        "`{0}` is a time parameter, and the scenario runs with `[sim] time = \"zero\"`, where every time parameter is 0; sweep it in a calibrated scenario"
    )]
    ZeroTime(String),
}

impl SweepParam {
    /// Parses `key=v1,v2,...` (values with units for a time parameter: `100ns,1us`).
    pub fn parse(arg: &str) -> Result<Self, SweepError> {
        let (key, list) = arg
            .split_once('=')
            .ok_or_else(|| SweepError::Syntax(arg.to_owned()))?;
        let key = key.trim();
        let kind = if key == "seed" {
            SweepKey::Seed
        } else if let Some(spec) = params::find(key) {
            SweepKey::Timing(spec)
        } else {
            let hint = match params::nearest(key) {
                Some(near) => format!("did you mean `{near}`?"),
                None => {
                    "expected `seed` or a timing parameter (`peerdma params` lists them)".into()
                }
            };
            return Err(SweepError::UnknownKey {
                key: key.to_owned(),
                hint,
            });
        };
        let values = list
            .split(',')
            .map(|v| {
                let v = v.trim();
                let parsed = match kind {
                    SweepKey::Timing(spec) if spec.unit == ParamUnit::Time => {
                        units::parse_time(v).map(peerdma_core::SimDuration::as_nanos)
                    }
                    _ => units::parse_number(v),
                };
                parsed.map_err(|e| SweepError::BadValue {
                    key: key.to_owned(),
                    value: v.to_owned(),
                    reason: e.to_string(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            key: key.to_owned(),
            kind,
            values,
        })
    }
}

/// One run of a sweep: the parameter values (by key) and the seed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SweepJob {
    /// Its position in the whole (unsharded) job list, from 0.
    pub job: usize,
    /// The swept timing parameters' values, by key (nanoseconds for a time).
    pub params: BTreeMap<String, u64>,
    /// The seed.
    pub seed: u64,
}

/// Returns every job of a sweep of `scn`: the product of `params`' values (the first parameter slowest),
/// each with `seeds` consecutive seeds from `base_seed` (the scenario's `sim.seed` when `None`), unless
/// `seed` itself is swept.
pub fn jobs(
    scn: &Scenario,
    params: &[SweepParam],
    seeds: u64,
    base_seed: Option<u64>,
) -> Result<Vec<SweepJob>, SweepError> {
    let mut seen = Vec::new();
    for p in params {
        if seen.contains(&&p.key) {
            return Err(SweepError::Duplicate(p.key.clone()));
        }
        seen.push(&p.key);
        if p.kind == SweepKey::Seed && seeds > 1 {
            return Err(SweepError::SeedTwice);
        }
        if let SweepKey::Timing(spec) = p.kind
            && spec.unit == ParamUnit::Time
            && scn.sim.time == TimeMode::Zero
        {
            return Err(SweepError::ZeroTime(p.key.clone()));
        }
    }
    let base = base_seed.unwrap_or(scn.sim.seed);
    // The product, as (timing params, seed) pairs; seeds innermost.
    let mut combos: Vec<(BTreeMap<String, u64>, Option<u64>)> = vec![(BTreeMap::new(), None)];
    for p in params {
        combos = combos
            .into_iter()
            .flat_map(|(m, s)| {
                p.values.iter().map(move |&v| {
                    let mut m = m.clone();
                    match p.kind {
                        SweepKey::Seed => (m, Some(v)),
                        SweepKey::Timing(_) => {
                            m.insert(p.key.clone(), v);
                            (m, s)
                        }
                    }
                })
            })
            .collect();
    }
    let mut out = Vec::new();
    for (m, seed) in combos {
        let seeds: Vec<u64> = match seed {
            Some(s) => vec![s],
            None => (0..seeds.max(1)).map(|k| base.wrapping_add(k)).collect(),
        };
        for seed in seeds {
            out.push(SweepJob {
                job: out.len(),
                params: m.clone(),
                seed,
            });
        }
    }
    Ok(out)
}

/// Runs one job: `scn` with the job's timing parameters over its `[timing]` table and the job's seed.
pub fn run_job(scn: &Scenario, job: &SweepJob, opts: &RunOptions) -> Report {
    let mut scn = scn.clone();
    for (k, &v) in &job.params {
        scn.timing.insert(k.clone(), v);
    }
    let opts = RunOptions {
        seed: Some(job.seed),
        ..opts.clone()
    };
    run(&scn, &opts)
}

/// A sweep's output line: the job, then the run's report.
#[derive(Debug, Serialize)]
struct Line<'a> {
    #[serde(flatten)]
    job: &'a SweepJob,
    report: &'a Report,
}

/// Returns the JSON line (no newline) of one run: `{"job", "params", "seed", "report"}`, the report as
/// `peerdma run --json` prints it, compact.
pub fn json_line(job: &SweepJob, report: &Report) -> String {
    serde_json::to_string(&Line { job, report }).expect("a report serializes")
}

impl fmt::Display for SweepJob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "job {} seed {}", self.job, self.seed)?;
        for (k, v) in &self.params {
            write!(f, " {k}={v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scn(time: &str) -> Scenario {
        crate::parse(
            "s.toml",
            &format!("[sim]\nseed = 7\ntime = \"{time}\"\n[[thread]]\nname = \"t\"\nsteps = []\n"),
        )
        .unwrap()
    }

    #[test]
    fn values_take_the_parameter_unit() {
        let p = SweepParam::parse("dma.hop=100,1us, 2us").unwrap();
        assert_eq!(p.values, vec![100, 1000, 2000]);
        let p = SweepParam::parse("dma.max_outstanding=1,0x10").unwrap();
        assert_eq!(p.values, vec![1, 16]);
        assert!(matches!(
            SweepParam::parse("dma.max_outstanding=1us"),
            Err(SweepError::BadValue { .. })
        ));
        assert!(matches!(
            SweepParam::parse("dma.hops=1"),
            Err(SweepError::UnknownKey { hint, .. }) if hint.contains("`dma.hop`")
        ));
        assert!(matches!(
            SweepParam::parse("dma.hop"),
            Err(SweepError::Syntax(_))
        ));
    }

    #[test]
    fn the_product_varies_the_last_parameter_fastest_and_seeds_innermost() {
        let s = scn("calibrated");
        let a = SweepParam::parse("dma.hop=1,2").unwrap();
        let b = SweepParam::parse("mm.cpu_fault=10,20,30").unwrap();
        let j = jobs(&s, &[a, b], 2, None).unwrap();
        assert_eq!(j.len(), 12);
        let show: Vec<(u64, u64, u64)> = j
            .iter()
            .map(|j| (j.params["dma.hop"], j.params["mm.cpu_fault"], j.seed))
            .collect();
        assert_eq!(show[0], (1, 10, 7));
        assert_eq!(show[1], (1, 10, 8));
        assert_eq!(show[2], (1, 20, 7));
        assert_eq!(show[11], (2, 30, 8));
        assert!(j.iter().enumerate().all(|(i, j)| j.job == i));
    }

    #[test]
    fn seed_is_a_key() {
        let s = scn("zero");
        let j = jobs(&s, &[SweepParam::parse("seed=5,3").unwrap()], 1, None).unwrap();
        assert_eq!(j.iter().map(|j| j.seed).collect::<Vec<_>>(), vec![5, 3]);
        assert_eq!(
            jobs(&s, &[SweepParam::parse("seed=5").unwrap()], 2, None),
            Err(SweepError::SeedTwice)
        );
    }

    #[test]
    fn time_parameters_are_refused_in_zero_mode_counts_are_not() {
        let s = scn("zero");
        assert!(matches!(
            jobs(&s, &[SweepParam::parse("dma.hop=1").unwrap()], 1, None),
            Err(SweepError::ZeroTime(_))
        ));
        let counts = [SweepParam::parse("dma.max_outstanding=1").unwrap()];
        assert_eq!(jobs(&s, &counts, 1, None).unwrap().len(), 1);
        let twice = [
            SweepParam::parse("dma.max_outstanding=1").unwrap(),
            SweepParam::parse("dma.max_outstanding=2").unwrap(),
        ];
        assert!(matches!(
            jobs(&s, &twice, 1, None),
            Err(SweepError::Duplicate(_))
        ));
    }
}
