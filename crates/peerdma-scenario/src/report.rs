//! Run reports: a human-readable text form, JSON, and the trace as Chrome-trace JSON. Every form is a pure
//! function of the run, so one scenario and seed always print the same bytes.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use peerdma_core::SimTime;
use peerdma_sim::TraceEvent;
use serde::Serialize;

/// How a run ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "detail", rename_all = "snake_case")]
pub enum Outcome {
    /// Every thread finished and every expectation held.
    Passed,
    /// Every thread finished, but at least one expectation failed.
    ExpectationFailed,
    /// The oracle found a violation and stopped the run.
    OracleViolation(String),
    /// Threads were still blocked with nothing left to wake them.
    Deadlock(Vec<String>),
    /// Simulated time passed `sim.time_limit`; the detail names the limit and the pending threads with the
    /// step each is in.
    TimeLimit(String),
    /// A resource limit of `[sim.limits]` was reached, or the clock would overflow: the detail names the
    /// limit (and the step, for a step's request). Exit code 2, like an invalid input.
    Limit(String),
    /// The run was stopped for another reason.
    Stopped(String),
}

/// A failed expectation, located in the scenario file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ExpectFailure {
    /// 1-based line of the step.
    pub line: usize,
    /// 1-based column of the step.
    pub col: usize,
    /// The thread that ran it.
    pub thread: String,
    /// The operation.
    pub op: String,
    /// When it finished.
    pub time: SimTime,
    /// What differed.
    pub message: String,
}

/// One executed step (with `--steps`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StepRecord {
    /// When the step started.
    pub start: SimTime,
    /// When it finished.
    pub end: SimTime,
    /// The thread.
    pub thread: String,
    /// The operation.
    pub op: String,
    /// Its line in the scenario.
    pub line: usize,
    /// Its result (errno, counters).
    pub result: String,
    /// Whether its expectations held.
    pub ok: bool,
}

/// The result of one run.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The scenario file.
    pub scenario: String,
    /// The seed used.
    pub seed: u64,
    /// Whether schedule exploration was on.
    pub explore: bool,
    /// `calibrated` or `zero`.
    pub time_mode: String,
    /// How it ended.
    pub outcome: Outcome,
    /// Simulated time at the end.
    pub end_time: SimTime,
    /// Engine events delivered.
    pub events: u64,
    /// A hash of the order in which agents ran ([`peerdma_sim::Sim::schedule_hash`]): `peerdma explore`
    /// counts distinct interleavings with it. Not part of the printed report.
    #[serde(skip)]
    pub schedule_hash: u64,
    /// Steps whose expectations were checked.
    pub expectations: u64,
    /// Failed expectations, in the order they failed.
    pub failures: Vec<ExpectFailure>,
    /// Metric counters.
    pub metrics: BTreeMap<String, u64>,
    /// The step log (empty unless requested).
    pub steps: Vec<StepRecord>,
    /// The trace.
    #[serde(skip)]
    pub trace: Vec<TraceEvent>,
}

impl Report {
    /// Returns the process exit code: 0 when the run passed, 2 when it stopped at a limit (the input asked
    /// for more than `[sim.limits]` allows), 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self.outcome {
            Outcome::Passed => 0,
            Outcome::Limit(_) => 2,
            _ => 1,
        }
    }

    /// Renders the report for a terminal.
    pub fn render_text(&self) -> String {
        let mut s = String::new();
        let verdict = match &self.outcome {
            Outcome::Passed => "PASSED".to_owned(),
            Outcome::ExpectationFailed => {
                format!("FAILED ({} expectation(s))", self.failures.len())
            }
            Outcome::OracleViolation(v) => format!("ORACLE VIOLATION\n  {v}"),
            Outcome::Deadlock(b) => format!("DEADLOCK (blocked: {})", b.join(", ")),
            Outcome::TimeLimit(d) => format!("TIME LIMIT reached: {d}"),
            Outcome::Limit(d) => format!("LIMIT reached: {d}"),
            Outcome::Stopped(r) => format!("STOPPED: {r}"),
        };
        let _ = writeln!(s, "peerdma run: {}", self.scenario);
        let _ = writeln!(
            s,
            "  seed {}  time {}  explore {}  simulated {}  events {}",
            self.seed,
            self.time_mode,
            if self.explore { "on" } else { "off" },
            self.end_time,
            self.events
        );
        let _ = writeln!(s, "  steps checked {}  result {verdict}", self.expectations);
        if !self.steps.is_empty() {
            let _ = writeln!(s, "\nsteps:");
            let _ = writeln!(
                s,
                "  {:>12}  {:<10} {:<18} {:>5}  result",
                "start", "thread", "op", "line"
            );
            for r in &self.steps {
                let _ = writeln!(
                    s,
                    "  {:>12}  {:<10} {:<18} {:>5}  {}{}",
                    r.start.to_string(),
                    r.thread,
                    r.op,
                    r.line,
                    r.result,
                    if r.ok { "" } else { "  <-- FAILED" }
                );
            }
        }
        if !self.failures.is_empty() {
            let _ = writeln!(s, "\nfailed expectations:");
            for f in &self.failures {
                let _ = writeln!(
                    s,
                    "  {}:{}:{}: {} ({} at {}): {}",
                    self.scenario, f.line, f.col, f.op, f.thread, f.time, f.message
                );
            }
        }
        if !self.metrics.is_empty() {
            let _ = writeln!(s, "\ncounters:");
            let width = self
                .metrics
                .keys()
                .map(String::len)
                .max()
                .unwrap_or(0)
                .max(24);
            for (k, v) in &self.metrics {
                let _ = writeln!(s, "  {k:<width$} {v:>10}");
            }
        }
        s
    }

    /// Renders the report as pretty JSON (the trace excluded).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("report fields serialize")
    }

    /// Renders the trace in the Chrome trace-event format (`chrome://tracing`, Perfetto): one instant event
    /// per trace record, one track per agent, timestamps in microseconds of simulated time.
    pub fn trace_chrome_json(&self) -> String {
        let mut tids: BTreeMap<&str, usize> = BTreeMap::new();
        for e in &self.trace {
            let n = tids.len();
            tids.entry(e.agent.as_str()).or_insert(n);
        }
        let mut events: Vec<serde_json::Value> = tids
            .iter()
            .map(|(name, tid)| {
                serde_json::json!({"ph": "M", "pid": 1, "tid": tid, "name": "thread_name", "args": {"name": name}})
            })
            .collect();
        for e in &self.trace {
            #[expect(clippy::cast_precision_loss, reason = "display only")]
            let ts = e.time.as_nanos() as f64 / 1000.0;
            events.push(serde_json::json!({
                "ph": "i", "s": "t", "pid": 1, "tid": tids[e.agent.as_str()], "ts": ts,
                "name": e.kind, "args": {"detail": e.detail},
            }));
        }
        serde_json::to_string(&serde_json::json!({ "traceEvents": events }))
            .expect("trace serializes")
    }
}
