//! `peerdma`: run, check and explore scenario files.
//!
//! Exit codes: 0 the run passed (or the file is valid), 1 an expectation failed or the oracle found a
//! violation, 2 the input is invalid (a located error is printed) or a file could not be read or written.
#![expect(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "a command line prints its results"
)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use peerdma_scenario::{RunOptions, parse_file, run};

/// Software VMA-focused peer-to-peer DMA: a deterministic simulator of Linux mm, HMM and device mirrors.
#[derive(Debug, Parser)]
#[command(name = "peerdma", version, about)]
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
        /// Writes the trace in Chrome trace-event format to this file.
        #[arg(long)]
        trace: Option<PathBuf>,
    },
    /// Validates a scenario without running it.
    Check {
        /// The scenario file (TOML).
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { file } => match parse_file(&file) {
            Ok(scn) => {
                println!(
                    "{}: ok ({} thread(s), {} device(s))",
                    file.display(),
                    scn.threads.len(),
                    scn.devices.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}", e.render());
                ExitCode::from(2)
            }
        },
        Command::Run {
            file,
            seed,
            explore,
            json,
            steps,
            trace,
        } => {
            let scn = match parse_file(&file) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("{}", e.render());
                    return ExitCode::from(2);
                }
            };
            let opts = RunOptions {
                seed,
                explore: explore.then_some(true),
                step_log: steps,
            };
            let report = run(&scn, &opts);
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
            ExitCode::from(u8::try_from(report.exit_code()).unwrap_or(1))
        }
    }
}
