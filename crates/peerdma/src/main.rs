//! `peerdma`: run, check and explore scenario files; size PCIe links (`link`); show a scenario's PCIe
//! topology and its P2PDMA decisions (`topo`); list the timing-model parameters (`params`) and the steps'
//! ops (`ops`).
//!
//! Exit codes: 0 the run passed (or the file is valid), 1 an expectation failed or the oracle found a
//! violation, 2 the input is invalid (a located error is printed) or a file could not be read or written.
#![expect(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "a command line prints its results"
)]

mod bench;
mod link;
mod ops;
mod params;
mod plot;
mod progress;
mod resources;
mod sweep;
mod topo;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use peerdma_core::mutation::{self, Mutation};
use peerdma_scenario::explore::{ExploreOptions, explore, replay_command};
use peerdma_scenario::{RunOptions, Scenario, parse_file, run};

/// Parses a `--mutate` switch name.
fn parse_mutation(s: &str) -> Result<Mutation, String> {
    Mutation::from_name(s).ok_or_else(|| {
        let names: Vec<&str> = Mutation::ALL.iter().map(|m| m.name()).collect();
        format!(
            "unknown mutation `{s}`; expected one of: {}",
            names.join(", ")
        )
    })
}

/// Reads a scenario that has something to run, or prints the located error (exit 2).
fn load(file: &Path) -> Result<Scenario, ExitCode> {
    match parse_file(file).and_then(|s| s.check_runnable().map(|()| s)) {
        Ok(s) => Ok(s),
        Err(e) => {
            eprintln!("{}", e.render());
            Err(ExitCode::from(2))
        }
    }
}

/// `peerdma explore`.
fn explore_command(file: &Path, opts: &ExploreOptions) -> ExitCode {
    let scn = match load(file) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let summary = explore(&scn, opts);
    let shown = file.display().to_string();
    println!(
        "peerdma explore: {shown}\n  seeds {}..{}  runs {}  passed {}  distinct interleavings {}  events {}",
        opts.first_seed,
        opts.first_seed.saturating_add(opts.seeds),
        summary.runs,
        summary.passed,
        summary.distinct_schedules,
        summary.events
    );
    match summary.first_failure {
        None => {
            println!("  every seed passed");
            ExitCode::SUCCESS
        }
        Some(f) => {
            println!("  FIRST FAILING SEED {}", f.seed);
            print!("{}", f.report.render_text());
            println!(
                "  replay: {}",
                replay_command(&shown, f.seed, &opts.mutations)
            );
            ExitCode::from(u8::try_from(f.report.exit_code()).unwrap_or(1))
        }
    }
}

/// Examples shown after `peerdma --help`.
const EXAMPLES: &str = "\
Examples:
  peerdma run examples/quickstart.toml --steps
  peerdma run examples/p2p-switch.toml --json --trace trace.json --plot plots --csv csv
  peerdma check examples/fence.toml --json
  peerdma sweep examples/iommu-lazy-window.toml --param iommu.iotlb_miss=26,100,200 --seeds 4 --jobs 4
  peerdma topo examples/p2p-host-bridge.toml
  peerdma link --gen 4 --width x16 --mps 256 --mrrs 512 --size 64,4KiB
  peerdma completions bash > peerdma.bash

The scenario format: docs/scenario-format.md. Reports, traces and plots: docs/reports.md.
Sweeps: docs/sweeps.md. Calibration: docs/calibration.md.";

/// Software VMA-focused peer-to-peer DMA: a deterministic simulator of Linux mm, HMM and device mirrors.
#[derive(Debug, Parser)]
#[command(name = "peerdma", version, about, after_help = EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs a scenario and prints its report.
    Run {
        /// The scenario file (TOML).
        file: PathBuf,
        /// Overrides `sim.seed`.
        #[arg(long)]
        seed: Option<u64>,
        /// Turns schedule exploration on (randomised order of simultaneous events).
        #[arg(long)]
        explore: bool,
        /// Prints the report as JSON.
        #[arg(long)]
        json: bool,
        /// Includes the log of every step in the report.
        #[arg(long)]
        steps: bool,
        /// Writes the trace in Chrome trace-event format (Perfetto, chrome://tracing) to this file: a
        /// process per simulated process and device, spans for steps and protocol phases, flows from
        /// device faults to their resolution, counter tracks (docs/reports.md).
        #[arg(long, value_name = "FILE")]
        trace: Option<PathBuf>,
        /// Writes SVG charts into this directory: latency CDFs, DMA throughput, faults, residency and DMA
        /// requests in flight over simulated time.
        #[arg(long, value_name = "DIR")]
        plot: Option<PathBuf>,
        /// Writes the report as CSV files into this directory (summary, latency, bandwidth, iotlb, series,
        /// steps).
        #[arg(long, value_name = "DIR")]
        csv: Option<PathBuf>,
        /// Prints the host resources the run used (peak resident memory, wall time) to stderr, outside
        /// the report.
        #[arg(long)]
        resources: bool,
        /// Test-only: removes one protocol step (a mutation switch; `peerdma_core::mutation`).
        #[arg(long, hide = true, value_parser = parse_mutation)]
        mutate: Vec<Mutation>,
    },
    /// Runs a scenario over many seeds with schedule exploration (random order of simultaneous events and
    /// random preemptions at protocol step boundaries); stops at the first failing seed and prints its
    /// report and the command that replays it.
    Explore {
        /// The scenario file (TOML).
        file: PathBuf,
        /// How many seeds to run.
        #[arg(long, default_value_t = 1_000)]
        seeds: u64,
        /// The first seed.
        #[arg(long, default_value_t = 0)]
        first_seed: u64,
        /// Worker threads (default: the host's available parallelism). Does not change the output.
        #[arg(long, value_name = "N")]
        jobs: Option<std::num::NonZeroUsize>,
        /// Test-only: removes one protocol step (a mutation switch; `peerdma_core::mutation`).
        #[arg(long, hide = true, value_parser = parse_mutation)]
        mutate: Vec<Mutation>,
    },
    /// Runs a scenario over every combination of swept parameter values and seeds, on worker threads, and
    /// prints one JSON line per run (`{job, params, seed, report}`), in the same order and bytes whatever
    /// `--jobs` and however `--shard` splits the runs (docs/sweeps.md).
    ///
    /// Example: `peerdma sweep examples/p2p-switch.toml --param dma.hop=100ns,200ns --seeds 4 --jobs 2`
    Sweep {
        /// The scenario file (TOML).
        file: PathBuf,
        /// A swept key and its values: `seed` or a timing parameter (`peerdma params`), times with units
        /// (`dma.hop=100ns,1us`). Repeat for a product; the last given varies fastest.
        #[arg(long = "param", value_name = "KEY=V1,V2,...")]
        params: Vec<String>,
        /// Runs each combination with N consecutive seeds from the scenario's `sim.seed` (or `--seed`).
        #[arg(long, value_name = "N", default_value_t = 1)]
        seeds: u64,
        /// The first seed (default: the scenario's `sim.seed`).
        #[arg(long)]
        seed: Option<u64>,
        /// Turns schedule exploration on.
        #[arg(long)]
        explore: bool,
        /// Worker threads (default: the host's available parallelism). Does not change the output.
        #[arg(long, value_name = "N")]
        jobs: Option<std::num::NonZeroUsize>,
        /// Runs only shard I of N (from 0): a contiguous block of the runs; the shards' outputs concatenated
        /// in order are the whole sweep's output.
        #[arg(long, value_name = "I/N", default_value = "0/1")]
        shard: peerdma_scenario::batch::Shard,
        /// Writes `sweep.svg` into this directory: each run's simulated time against the first swept
        /// parameter, a line per seed.
        #[arg(long, value_name = "DIR")]
        plot: Option<PathBuf>,
    },
    /// Validates a scenario without running it.
    Check {
        /// The scenario file (TOML).
        file: PathBuf,
        /// Prints `{file, ok, threads, devices}` or `{file, ok, error: {line, col, message}}` as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Measures the simulator's host cost per operation (faults, page-table walks, mirror faults and
    /// invalidations, device accesses, migrations, engine events, memory per page) side by side with the
    /// real kernel's (anonymous fault, munmap, MADV_DONTNEED, memcpy) and prints the ratios against the
    /// performance targets; each figure is the median of interleaved repetitions (docs/performance.md).
    Bench {
        /// Prints JSON (schema `peerdma-bench/1`, docs/performance.md) instead of the table.
        #[arg(long)]
        json: bool,
        /// Repetitions per figure (at least 5).
        #[arg(long, value_name = "N", default_value_t = 5)]
        reps: usize,
        /// Pages per operation (default 65,536; 1,024 with --quick). Migration moves at most 16,384.
        #[arg(long, value_name = "N")]
        pages: Option<u64>,
        /// A small, fast run (1,024 pages, a short engine scenario), for tests.
        #[arg(long)]
        quick: bool,
        /// Also measures the parallel runner: a many-seed exploration on 1 worker and on 2.
        #[arg(long)]
        scaling: bool,
        /// Seeds of the --scaling exploration (default 1,000; 40 with --quick).
        #[arg(long, value_name = "N")]
        seeds: Option<u64>,
        /// Measures instead how the cost per operation grows with size: pages touched (1 MiB to 4 GiB),
        /// mirrors (1 to 8), devices (1 to 64), processes (1 to 256) and PASIDs (1 to 256); JSON schema
        /// `peerdma-bench-sweep/1`. With --quick, tiny sizes.
        #[arg(long, conflicts_with_all = ["pages", "scaling", "seeds"])]
        sweep: bool,
        /// With --sweep, only this dimension (for profiling one of them).
        #[arg(long, value_name = "DIMENSION", requires = "sweep", value_parser = ["pages", "mirrors", "devices", "processes", "pasids"])]
        only: Option<String>,
    },
    /// Measures one memory figure of `peerdma bench` in this fresh process and prints it (internal).
    #[command(hide = true)]
    BenchMemory {
        /// Pages.
        #[arg(long)]
        pages: u64,
        /// What to measure.
        #[arg(long, value_enum)]
        what: bench::MemWhat,
    },
    /// Prints a completion script for a shell (`peerdma completions bash > peerdma.bash`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Prints the effective write and read bandwidth of a PCIe link for each payload size (docs/figures.md §1).
    Link {
        /// PCIe generation, 1-7.
        #[arg(long = "gen", value_name = "G")]
        generation: u8,
        /// Negotiated width: x1, x2, x4, x8, x16 or x32.
        #[arg(long, value_name = "xN", value_parser = link::parse_width)]
        width: u8,
        /// Max Payload Size in bytes (a power of two in 128..=4096; units allowed). Default 256, as a
        /// topology link's.
        #[arg(long, value_name = "M", default_value = "256", value_parser = link::parse_size_u32)]
        mps: u32,
        /// Max Read Request Size in bytes (a power of two in 128..=4096; units allowed). Default 512, as a
        /// topology link's.
        #[arg(long, value_name = "R", default_value = "512", value_parser = link::parse_size_u32)]
        mrrs: u32,
        /// Read Completion Boundary in bytes: 64, 128, 256 or 512.
        #[arg(long, value_name = "B", default_value = "64", value_parser = link::parse_size_u32)]
        rcb: u32,
        /// Request address width: 32 or 64 bits.
        #[arg(long, value_name = "32|64", default_value_t = 64)]
        addr: u8,
        /// Every TLP carries an ECRC digest.
        #[arg(long)]
        ecrc: bool,
        /// Payload sizes, comma-separated, with units (`64,256B,4KiB`).
        #[arg(long, value_name = "S[,S...]", value_delimiter = ',', required = true)]
        size: Vec<String>,
        /// Prints JSON: the link parameters and one `{size, write_gbps, read_gbps}` per size.
        #[arg(long, conflicts_with = "csv")]
        json: bool,
        /// Prints CSV: `size,write_gbps,read_gbps`, one row per size (for a sweep of sizes).
        #[arg(long)]
        csv: bool,
    },
    /// Lists every timing-model parameter: key, default with unit, description and source (overridable in a
    /// scenario's `[timing]` table).
    Params {
        /// Prints a JSON array of `{key, unit, default, source, doc}` (`unit` "ns" or "count").
        #[arg(long)]
        json: bool,
    },
    /// Lists every op a scenario step can use: its keys, the `expect` keys it checks and what it does.
    Ops {
        /// Prints a JSON array of `{name, keys, expect_keys, doc_keys, doc}`.
        #[arg(long, conflicts_with = "markdown")]
        json: bool,
        /// Prints the steps table of docs/scenario-format.md.
        #[arg(long)]
        markdown: bool,
    },
    /// Prints a scenario's `[topology]` tree and the P2PDMA map type, distance, path and bottleneck link of
    /// every (provider, client) pair of endpoints.
    Topo {
        /// The scenario file (TOML) with a `[topology]` table.
        file: PathBuf,
        /// Prints the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `peerdma topo`.
fn topo_command(file: &Path, json: bool) -> ExitCode {
    let scn = match parse_file(file) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{}", e.render());
            return ExitCode::from(2);
        }
    };
    let shown = file.display().to_string();
    let Some(spec) = scn.topology.as_ref() else {
        eprintln!("error: {shown} has no `[topology]` table");
        return ExitCode::from(2);
    };
    // The parser has built it once already; an error here cannot happen, but is reported, not unwrapped.
    let topology = match spec.build() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {shown}: invalid `[topology]`: {e}");
            return ExitCode::from(2);
        }
    };
    if json {
        print!("{}", topo::render_json(&shown, &topology));
    } else {
        print!("{}", topo::render_text(&shown, &topology));
    }
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { file, json } => {
            match parse_file(&file).and_then(|s| s.check_runnable().map(|()| s)) {
                Ok(scn) if json => {
                    println!(
                        "{}",
                        serde_json::json!({
                            "file": file.display().to_string(),
                            "ok": true,
                            "threads": scn.threads.len(),
                            "devices": scn.devices.len(),
                        })
                    );
                    ExitCode::SUCCESS
                }
                Ok(scn) => {
                    println!(
                        "{}: ok ({} thread(s), {} device(s))",
                        file.display(),
                        scn.threads.len(),
                        scn.devices.len()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) if json => {
                    println!(
                        "{}",
                        serde_json::json!({
                            "file": file.display().to_string(),
                            "ok": false,
                            "error": {"line": e.line, "col": e.col, "message": e.message},
                        })
                    );
                    ExitCode::from(2)
                }
                Err(e) => {
                    eprintln!("{}", e.render());
                    ExitCode::from(2)
                }
            }
        }
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "peerdma", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Command::Run {
            file,
            seed,
            explore,
            json,
            steps,
            trace,
            plot,
            csv,
            resources,
            mutate,
        } => {
            let started = resources::start();
            let scn = match load(&file) {
                Ok(s) => s,
                Err(code) => return code,
            };
            let opts = RunOptions {
                seed,
                explore: explore.then_some(true),
                step_log: steps,
                trace: trace.is_some(),
                progress: progress::for_terminal(),
            };
            mutation::set(&mutate);
            let report = run(&scn, &opts);
            mutation::set(&[]);
            // The progress bar (if any) goes away before the report prints.
            drop(opts);
            if resources {
                eprintln!(
                    "{}",
                    resources::render(resources::peak_rss_bytes(), started.elapsed())
                );
            }
            if json {
                println!("{}", report.to_json());
            } else {
                print!("{}", report.render_text());
            }
            if let Some(path) = trace
                && let Err(e) = std::fs::write(&path, report.trace_chrome_json())
            {
                eprintln!("error: cannot write trace {}: {e}", path.display());
                return ExitCode::from(2);
            }
            if let Some(dir) = plot
                && let Err(e) = plot::run_plots(&report, &dir)
            {
                eprintln!("error: cannot plot into {}: {e}", dir.display());
                return ExitCode::from(2);
            }
            if let Some(dir) = csv
                && let Err(e) = report.write_csv(&dir)
            {
                eprintln!("error: cannot write CSV into {}: {e}", dir.display());
                return ExitCode::from(2);
            }
            ExitCode::from(u8::try_from(report.exit_code()).unwrap_or(1))
        }
        Command::Link {
            generation,
            width,
            mps,
            mrrs,
            rcb,
            addr,
            ecrc,
            size,
            json,
            csv,
        } => {
            let args = link::LinkArgs {
                generation,
                width,
                mps,
                mrrs,
                rcb,
                addr_bits: addr,
                ecrc,
                sizes: size,
            };
            match link::run(&args, json, csv) {
                Ok(out) => {
                    print!("{out}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Topo { file, json } => topo_command(&file, json),
        Command::Bench {
            json,
            reps,
            quick,
            sweep: true,
            only,
            ..
        } => bench::sweep_command(&bench::SweepArgs {
            json,
            reps,
            quick,
            only,
        }),
        Command::Bench {
            json,
            reps,
            pages,
            quick,
            scaling,
            seeds,
            sweep: false,
            ..
        } => bench::command(&bench::BenchArgs {
            json,
            reps,
            pages,
            quick,
            scaling,
            seeds,
        }),
        Command::BenchMemory { pages, what } => match bench::memory_child(pages, what) {
            Ok(v) => {
                println!("{v}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(1)
            }
        },
        Command::Explore {
            file,
            seeds,
            first_seed,
            jobs,
            mutate,
        } => explore_command(
            &file,
            &ExploreOptions {
                first_seed,
                seeds,
                jobs: jobs
                    .unwrap_or_else(peerdma_scenario::batch::default_workers)
                    .get(),
                mutations: mutate,
            },
        ),
        Command::Sweep {
            file,
            params,
            seeds,
            seed,
            explore,
            jobs,
            shard,
            plot,
        } => sweep::run(&sweep::SweepArgs {
            file: &file,
            params: &params,
            seeds,
            seed,
            explore,
            jobs,
            shard,
            plot: plot.as_deref(),
        }),
        Command::Ops { json, markdown } => {
            let all = peerdma_scenario::OPS;
            if json {
                print!("{}", ops::render_json(all));
            } else if markdown {
                print!("{}", peerdma_scenario::ops::markdown_table());
            } else {
                print!("{}", ops::render_text(all));
            }
            ExitCode::SUCCESS
        }
        Command::Params { json } => {
            let all = peerdma_scenario::params::all_params();
            if json {
                print!("{}", params::render_json(&all));
            } else {
                print!("{}", params::render_text(&all));
            }
            ExitCode::SUCCESS
        }
    }
}
