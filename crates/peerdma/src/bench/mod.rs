//! `peerdma bench`: the simulator's host cost per operation, measured side by side with the Linux kernel
//! it models on the same machine, and checked against the targets of the performance issue
//! (docs/performance.md, "peerdma bench").
//!
//! Method: every figure is the median of `reps` (at least 5) repetitions, and the repetitions are
//! interleaved — one repetition runs every measurement once, simulated and real alternately (a simulated
//! fault, then Linux's fault; the mirror's invalidation, then Linux's MADV_DONTNEED; a migration, then
//! memcpy) — so that a change of machine load hits both sides of a ratio alike. A ratio is formed from the
//! two medians. The simulated side runs the library directly in zero-time mode (every model cost zero,
//! the oracle on, no trace) and times only the operation ([`sim`]); the Linux side runs on real anonymous
//! memory ([`real`]); memory is the resident-set growth of a child process ([`mem`]); whole-scenario
//! figures run compiled-in scenario files ([`engine`]).
//!
//! This is a host-side tool; it models no kernel mechanism itself.

mod engine;
mod mem;
mod real;
mod render;
mod sim;
mod sweep;

use std::process::ExitCode;

pub(crate) use mem::{MemWhat, child as memory_child};
use sim::BenchResult;
pub(crate) use sweep::{SweepArgs, command as sweep_command};

/// The JSON schema identifier; bumped when a field changes meaning or goes away.
pub(crate) const SCHEMA: &str = "peerdma-bench/1";

/// The arguments of `peerdma bench`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BenchArgs {
    /// JSON output instead of the table.
    pub(crate) json: bool,
    /// Repetitions per figure (raised to 5).
    pub(crate) reps: usize,
    /// Pages per operation (`None`: 65,536, or 1,024 with `quick`).
    pub(crate) pages: Option<u64>,
    /// A small, fast run for tests.
    pub(crate) quick: bool,
    /// Adds the parallel runner's scaling (`--jobs 1` against `--jobs 2`).
    pub(crate) scaling: bool,
    /// Seeds of the scaling exploration (`None`: 1,000, or 40 with `quick`).
    pub(crate) seeds: Option<u64>,
}

/// Which side of a ratio a figure is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Side {
    /// The simulator.
    Peerdma,
    /// The real kernel on this machine.
    Linux,
}

/// One measured figure: its samples (one per repetition) and their median.
#[derive(Clone, Debug)]
pub(crate) struct Figure {
    /// Stable name (the JSON key).
    pub(crate) name: &'static str,
    /// Which side.
    pub(crate) side: Side,
    /// The unit of the samples: `ns`, `events/s`, `GB/s`, `B` or `s`.
    pub(crate) unit: &'static str,
    /// What one sample measures.
    pub(crate) what: &'static str,
    /// One sample per repetition, in repetition order.
    pub(crate) samples: Vec<f64>,
}

impl Figure {
    /// The median of the samples (the mean of the middle two for an even count).
    pub(crate) fn median(&self) -> f64 {
        median(&self.samples)
    }

    /// Operations per second, for a figure in ns per operation.
    pub(crate) fn per_second(&self) -> Option<f64> {
        (self.unit == "ns").then(|| 1e9 / self.median())
    }
}

/// The median of `v` (NaN when empty).
pub(crate) fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => f64::midpoint(s[n / 2 - 1], s[n / 2]),
    }
}

/// A ratio checked against the target.
#[derive(Clone, Debug)]
pub(crate) struct Ratio {
    /// Stable name.
    pub(crate) name: &'static str,
    /// What it compares.
    pub(crate) what: &'static str,
    /// The value (from the medians).
    pub(crate) value: f64,
    /// The target.
    pub(crate) target: f64,
    /// `true`: the value must be at most the target; `false`: at least.
    pub(crate) at_most: bool,
}

impl Ratio {
    /// Whether the target is met.
    pub(crate) fn pass(&self) -> bool {
        if self.at_most {
            self.value <= self.target
        } else {
            self.value >= self.target
        }
    }

    /// How far inside the target the value is: ≥ 1 passes, 0.5 means "off by 2×".
    pub(crate) fn headroom(&self) -> f64 {
        if self.at_most {
            self.target / self.value
        } else {
            self.value / self.target
        }
    }
}

/// A figure this build cannot measure, and why.
#[derive(Clone, Debug)]
pub(crate) struct Unavailable {
    /// The figure's name.
    pub(crate) name: &'static str,
    /// Why.
    pub(crate) why: String,
}

/// Everything one `peerdma bench` run measured.
#[derive(Clone, Debug)]
pub(crate) struct BenchRun {
    /// Pages per operation.
    pub(crate) pages: u64,
    /// Pages of the migration and memcpy figures.
    pub(crate) migrate_pages: u64,
    /// Device requests of the translation-hit figure.
    pub(crate) requests: u64,
    /// Repetitions.
    pub(crate) reps: usize,
    /// Whether `--quick` was given.
    pub(crate) quick: bool,
    /// The engine figure's scenario.
    pub(crate) engine_scenario: &'static str,
    /// The scaling figure's scenario and seeds, when measured.
    pub(crate) scaling: Option<(&'static str, u64)>,
    /// The 1-minute load average before and after measuring (`/proc/loadavg`).
    pub(crate) load: (Option<f64>, Option<f64>),
    /// The measured figures, in a fixed order.
    pub(crate) figures: Vec<Figure>,
    /// The ratios against the targets, in a fixed order.
    pub(crate) ratios: Vec<Ratio>,
    /// Simulated worlds built for the figures (3 per repetition) and the ones that outlived every
    /// handle (kept by a reference cycle: a leak), by figure world.
    pub(crate) worlds: (u64, Vec<&'static str>),
    /// Figures not measured.
    pub(crate) unavailable: Vec<Unavailable>,
}

impl BenchRun {
    /// The median of the figure called `name` (NaN if absent).
    fn m(&self, name: &str) -> f64 {
        self.figures
            .iter()
            .find(|f| f.name == name)
            .map_or(f64::NAN, Figure::median)
    }
}

/// Collects samples by figure name, keeping the order in which figures first appear.
#[derive(Debug, Default)]
struct Samples(Vec<Figure>);

impl Samples {
    fn push(
        &mut self,
        name: &'static str,
        side: Side,
        unit: &'static str,
        what: &'static str,
        v: f64,
    ) {
        if let Some(f) = self.0.iter_mut().find(|f| f.name == name) {
            f.samples.push(v);
        } else {
            self.0.push(Figure {
                name,
                side,
                unit,
                what,
                samples: vec![v],
            });
        }
    }
}

/// Runs every measurement `reps` times, interleaved, and forms the ratios.
pub(crate) fn measure(a: &BenchArgs) -> BenchResult<BenchRun> {
    use Side::{Linux, Peerdma};
    let reps = a.reps.max(5);
    let pages = a
        .pages
        .unwrap_or(if a.quick { 1_024 } else { 65_536 })
        .max(64);
    // The migration moves at most 16 Ki pages per repetition (the size), memcpy the same bytes.
    let migrate_pages = pages.min(16_384);
    let requests = pages.min(65_536);
    // The engine figure: oversubscribe.toml, or with --quick (debug-build tests) a small scenario.
    let engine_src = if a.quick {
        engine::SCALING
    } else {
        engine::OVERSUBSCRIBE
    };
    let engine_scn = engine::load(engine_src)?;
    let scaling_seeds = a.seeds.unwrap_or(if a.quick { 40 } else { 1_000 });
    let scaling_scn = if a.scaling {
        Some(engine::load(engine::SCALING)?)
    } else {
        None
    };
    let token = mem::token_mode_available();
    let load_before = loadavg();
    let mut s = Samples::default();
    for rep in 0..reps {
        s.push(
            "cpu_fault",
            Peerdma,
            "ns",
            "anonymous write fault, per page",
            sim::cpu_fault(pages)?,
        );
        let fm = real::fault_munmap(pages)?;
        s.push(
            "linux_fault",
            Linux,
            "ns",
            "anonymous write fault, per page",
            fm.fault,
        );
        s.push(
            "linux_munmap",
            Linux,
            "ns",
            "munmap of resident anonymous pages, per page",
            fm.munmap,
        );
        s.push(
            "cpu_fault_full_page",
            Peerdma,
            "ns",
            "anonymous fault storing a whole 4 KiB page, per page",
            sim::cpu_fault_full_page(pages)?,
        );
        s.push(
            "linux_fault_full_page",
            Linux,
            "ns",
            "anonymous fault storing a whole 4 KiB page, per page",
            real::fault_full_page(pages)?,
        );
        s.push(
            "pagetable_walk",
            Peerdma,
            "ns",
            "page-table walk (lookup of a present 4 KiB entry)",
            sim::pagetable_walk(pages),
        );
        let mf = sim::mirror(pages, requests)?;
        s.push(
            "mirror_fault",
            Peerdma,
            "ns",
            "device fault through a DMA mirror, per page",
            mf.fault_per_page,
        );
        s.push(
            "device_access",
            Peerdma,
            "ns",
            "device translation hit + access + oracle check, per request",
            mf.access_per_request,
        );
        s.push(
            "mirror_invalidate",
            Peerdma,
            "ns",
            "MADV_DONTNEED of mirrored pages, per page per mirror (1 mirror)",
            mf.invalidate_per_page,
        );
        s.push(
            "linux_dontneed",
            Linux,
            "ns",
            "MADV_DONTNEED of resident anonymous pages, per page",
            real::dontneed(pages)?,
        );
        let mg = sim::migration(migrate_pages)?;
        s.push(
            "migrate_to_dev",
            Peerdma,
            "ns",
            "migration to device-private memory, per page, copy included",
            mg.to_dev_per_page,
        );
        s.push(
            "linux_memcpy",
            Linux,
            "GB/s",
            "memcpy between resident buffers",
            real::memcpy_gbps(migrate_pages)?,
        );
        s.push(
            "migrate_to_sys",
            Peerdma,
            "ns",
            "migration back to system memory, per page, copy included",
            mg.to_sys_per_page,
        );
        // Alternate which exploration mode goes first.
        for explore in [rep % 2 == 1, rep % 2 == 0] {
            let (name, what) = if explore {
                ("engine_explore", "engine events per second, exploration on")
            } else {
                ("engine", "engine events per second, exploration off")
            };
            s.push(
                name,
                Peerdma,
                "events/s",
                what,
                engine::events_per_second(&engine_scn, explore)?,
            );
            let (name, what) = if explore {
                (
                    "engine_core_explore",
                    "engine alone (16 agents, sleep/lock), events per second, exploration on",
                )
            } else {
                (
                    "engine_core",
                    "engine alone (16 agents, sleep/lock), events per second, exploration off",
                )
            };
            s.push(
                name,
                Peerdma,
                "events/s",
                what,
                engine::core_events_per_second(explore),
            );
        }
        s.push(
            "memory_resident",
            Peerdma,
            "B",
            "host bytes per resident page beyond its 4 KiB of data (bytes mode)",
            mem::measure(pages, MemWhat::Resident)? - 4096.0,
        );
        s.push(
            "memory_configured",
            Peerdma,
            "B",
            "host bytes per configured, unused RAM frame",
            mem::measure(pages, MemWhat::Configured)?,
        );
        if token {
            s.push(
                "memory_token",
                Peerdma,
                "B",
                "host bytes per resident page in all (token mode)",
                mem::measure(pages, MemWhat::Token)?,
            );
        }
        if let Some(scn) = &scaling_scn {
            // Alternate which worker count goes first.
            for jobs in if rep % 2 == 0 { [1, 2] } else { [2, 1] } {
                let t = engine::explore_seconds(scn, scaling_seeds, jobs)?;
                let (wall, cpu) = if jobs == 1 {
                    (
                        (
                            "explore_jobs1",
                            "wall seconds of the exploration on 1 worker",
                        ),
                        (
                            "explore_jobs1_cpu",
                            "CPU seconds of the exploration on 1 worker",
                        ),
                    )
                } else {
                    (
                        (
                            "explore_jobs2",
                            "wall seconds of the exploration on 2 workers",
                        ),
                        (
                            "explore_jobs2_cpu",
                            "CPU seconds of the exploration on 2 workers",
                        ),
                    )
                };
                s.push(wall.0, Peerdma, "s", wall.1, t.wall);
                // Never 0 in the figures: a tick (10 ms) at least.
                s.push(cpu.0, Peerdma, "s", cpu.1, t.cpu.max(0.01));
            }
        }
    }
    let mut unavailable = Vec::new();
    if !token {
        unavailable.push(Unavailable {
            name: "memory_token",
            why: "token data mode (`[sim] data = \"token\"`) is not in this build".to_owned(),
        });
    }
    let mut run = BenchRun {
        pages,
        migrate_pages,
        requests,
        reps,
        quick: a.quick,
        engine_scenario: engine_src.0,
        scaling: scaling_scn
            .as_ref()
            .map(|_| (engine::SCALING.0, scaling_seeds)),
        load: (load_before, loadavg()),
        worlds: (3 * reps as u64, sim::leaked_worlds()),
        figures: s.0,
        ratios: Vec::new(),
        unavailable,
    };
    run.ratios = ratios(&run);
    Ok(run)
}

/// The 1-minute load average (`/proc/loadavg`), when readable.
pub(super) fn loadavg() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The targets, from the medians.
fn ratios(r: &BenchRun) -> Vec<Ratio> {
    let page_bytes = 4096.0;
    let mut v = vec![
        Ratio {
            name: "fault_vs_linux",
            what: "simulated anonymous fault / Linux's",
            value: r.m("cpu_fault") / r.m("linux_fault"),
            target: 0.25,
            at_most: true,
        },
        Ratio {
            name: "invalidate_vs_linux_dontneed",
            what: "mirrored-page invalidation (1 mirror) / Linux's MADV_DONTNEED, per page",
            value: r.m("mirror_invalidate") / r.m("linux_dontneed"),
            target: 1.0,
            at_most: true,
        },
        Ratio {
            name: "device_access_mps",
            what: "device translation hits + access + oracle check, millions per second",
            value: 1e3 / r.m("device_access"),
            target: 20.0,
            at_most: false,
        },
        Ratio {
            name: "engine_meps",
            what: "engine events per second, millions (exploration off)",
            value: r.m("engine") / 1e6,
            target: 5.0,
            at_most: false,
        },
        Ratio {
            name: "engine_explore_meps",
            what: "engine events per second, millions (exploration on)",
            value: r.m("engine_explore") / 1e6,
            target: 5.0,
            at_most: false,
        },
        Ratio {
            name: "migrate_to_dev_vs_memcpy",
            what: "migration-to-device bandwidth / memcpy bandwidth",
            value: page_bytes / r.m("migrate_to_dev") / r.m("linux_memcpy"),
            target: 0.5,
            at_most: false,
        },
        Ratio {
            name: "migrate_to_sys_vs_memcpy",
            what: "migration-to-system bandwidth / memcpy bandwidth",
            value: page_bytes / r.m("migrate_to_sys") / r.m("linux_memcpy"),
            target: 0.5,
            at_most: false,
        },
        Ratio {
            name: "memory_per_resident_page",
            what: "host bytes per resident page beyond its data (bytes mode)",
            value: r.m("memory_resident"),
            target: 32.0,
            at_most: true,
        },
    ];
    if r.figures.iter().any(|f| f.name == "memory_token") {
        v.push(Ratio {
            name: "memory_token_per_page",
            what: "host bytes per resident page in all (token mode)",
            value: r.m("memory_token"),
            target: 32.0,
            at_most: true,
        });
    }
    if r.scaling.is_some() {
        v.push(Ratio {
            name: "explore_speedup_2_jobs",
            what: "exploration wall time on 1 worker / on 2 workers",
            value: r.m("explore_jobs1") / r.m("explore_jobs2"),
            target: 1.8,
            at_most: false,
        });
        v.push(Ratio {
            name: "explore_cpu_bound_2_jobs",
            what: "2 x CPU time on 1 worker / on 2: the speedup two idle cores allow (load-independent)",
            value: 2.0 * r.m("explore_jobs1_cpu") / r.m("explore_jobs2_cpu"),
            target: 1.8,
            at_most: false,
        });
    }
    v
}

/// `peerdma bench`: measures, prints the table or JSON; exit 0, or 1 when an operation failed.
pub(crate) fn command(a: &BenchArgs) -> ExitCode {
    print_run(
        "peerdma bench",
        a.json,
        measure(a),
        render::json,
        render::text,
    )
}

/// Prints a measured run as JSON or as the table (exit 0), or the error that stopped it (exit 1): the
/// output of `peerdma bench` and of `peerdma bench --sweep`.
#[expect(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "a command prints"
)]
pub(crate) fn print_run<R>(
    command: &str,
    json: bool,
    run: BenchResult<R>,
    as_json: fn(&R) -> String,
    as_text: fn(&R) -> String,
) -> ExitCode {
    match run {
        Ok(run) => {
            if json {
                println!("{}", as_json(&run));
            } else {
                print!("{}", as_text(&run));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {command}: {e}");
            ExitCode::from(1)
        }
    }
}
