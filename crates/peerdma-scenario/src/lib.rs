//! Scenario files: the TOML format of `docs/scenario-format.md`, parsed into a validated model.
//!
//! A scenario declares simulation settings, files, devices, processes and threads; each thread runs a list of
//! steps (`mmap`, `store`, `dmirror.read`...) with expectations. This crate turns the text into a
//! [`Scenario`] and rejects every input error *before* anything runs, at its `file:line:col`:
//!
//! 1. [`parse()`] / [`parse_file()`] read the TOML and build the [`ast`] model ([`parse`](mod@parse) module);
//! 2. values with units go through [`units`], data patterns through [`pattern`], `[timing]` keys through the
//!    [`params`] registry;
//! 3. any problem is a [`ScenarioError`] ([`error`]), whose [`ScenarioError::render`] shows the source line
//!    with a caret under the offending token.
//!
//! Each step's op belongs to one family module of [`ops`] (`mem`, `file`, `proc`, `dmirror`, `gup`, `dma`,
//! `p2p`), which holds the op's keys, its documentation line, its parsing and its execution; the registry
//! [`OPS`] lists every op once. [`run()`] executes a scenario; a step that cannot run as written is a
//! [`RunError`].
//!
//! [`batch`] runs many runs on worker threads with their results in job order; [`sweep`] builds the job
//! list of a parameter sweep (`peerdma sweep`).
//!
//! # Examples
//! ```
//! let err = peerdma_scenario::parse("s.toml", "[sim]\njitter = 2.0\n").unwrap_err();
//! assert_eq!(err.line, 2);
//! assert_eq!(err.col, 10);
//! assert!(err.message.contains("between 0.0 and 1.0"));
//! ```

pub mod ast;
pub mod batch;
pub mod error;
pub mod explore;
pub mod fuzzing;
pub mod ops;
pub mod params;
pub mod parse;
pub mod pattern;
pub mod report;
pub mod run;
pub mod sweep;
pub mod units;

pub use ast::{
    AddrError, AddrExpr, Advice, DeviceDecl, DeviceKind, DeviceMemoryKind, DmaMode, Expect,
    ExportDecl, FileDecl, IommuMode, Limits, Loc, MmapFlags, P2pDecl, Prot, Scenario, Signal,
    SimSettings, SleepSpec, Step, ThreadDecl, TimeMode, Tolerance, WriteSource,
};
pub use error::{RunError, ScenarioError};
pub use ops::{OPS, Op, OpSpec};
pub use parse::{parse, parse_file};
pub use pattern::{Mismatch, Pattern, PatternError, Segment};
pub use report::{Outcome, Report};
pub use run::{Progress, RunOptions, run};
