//! Run reports: a human-readable text form, JSON (versioned: [`SCHEMA_VERSION`], described by
//! `docs/report.schema.json`), CSV files, and the trace as Chrome-trace JSON. Every form is a pure function
//! of the run, so one scenario and seed always print the same bytes.
//!
//! Besides the counters, a report carries what the engine's statistics measured
//! ([`peerdma_sim::Stats`]): latency percentiles per span kind (CPU faults, device faults, invalidations,
//! migrations, DMA transfers and requests, and each step op as `step.<op>`), bytes and bandwidth per
//! device and access path, IOTLB hit rates, and sampled series (residency, DMA in flight) for plots.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use peerdma_core::{SimDuration, SimTime};
use peerdma_sim::{Phase, Series, Stats, TraceArg, TraceEvent, Track};
use serde::Serialize;

/// The version of the JSON report's layout (`schema_version`): bumped when a field changes meaning or
/// goes away; adding a field keeps it.
pub const SCHEMA_VERSION: u32 = 1;

/// The percentiles of one latency distribution, in nanoseconds of simulated time (HDR histogram, 3
/// significant digits).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LatencySummary {
    /// Samples.
    pub count: u64,
    /// Smallest.
    pub min_ns: u64,
    /// Median.
    pub p50_ns: u64,
    /// 90th percentile.
    pub p90_ns: u64,
    /// 99th percentile.
    pub p99_ns: u64,
    /// 99.9th percentile.
    pub p999_ns: u64,
    /// Largest.
    pub max_ns: u64,
    /// Sum of all samples.
    pub total_ns: u64,
    /// The distribution as `[value_ns, cumulative fraction]` steps (for a CDF plot): one per distinct
    /// recorded value bucket, at most 200.
    #[serde(skip)]
    pub cdf: Vec<(u64, f64)>,
}

/// Bytes one device moved over one access path.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PathBandwidth {
    /// The device.
    pub device: String,
    /// `local`, `iommu`, `p2p_bus_addr` or `p2p_host_bridge`.
    pub path: String,
    /// Bytes landed.
    pub bytes: u64,
    /// Requests landed.
    pub requests: u64,
    /// GB/s from the first request's issue to the last landing.
    pub gbps: f64,
}

/// One device's IOTLB hit rate.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct IotlbRate {
    /// The device.
    pub device: String,
    /// IOTLB hits.
    pub hits: u64,
    /// IOTLB misses.
    pub misses: u64,
    /// hits / (hits + misses).
    pub hit_rate: f64,
}

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
    /// The JSON layout's version ([`SCHEMA_VERSION`]).
    pub schema_version: u32,
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
    /// Latency percentiles by span kind (`cpu.fault`, `device.fault`, `dma.request`, `step.<op>`...).
    pub latency: BTreeMap<String, LatencySummary>,
    /// Bytes and bandwidth per device and access path.
    pub bandwidth: Vec<PathBandwidth>,
    /// IOTLB hit rates per device with an IOMMU domain that translated something.
    pub iotlb: Vec<IotlbRate>,
    /// ATS ATC hit rates per SVA device that looked something up (`sva.<device>.atc_{hits,misses}`).
    pub atc: Vec<IotlbRate>,
    /// Trace records dropped past the trace cap (0 when the trace is complete or not kept).
    pub trace_dropped: u64,
    /// The trace (empty unless the run was asked for one).
    #[serde(skip)]
    pub trace: Vec<TraceEvent>,
    /// Sampled series by name (`residency.<device>`, `dma.outstanding.<device>`), for CSV and plots.
    #[serde(skip)]
    pub series: BTreeMap<String, Series>,
    /// The simulated process each agent (thread) belongs to, for the trace's processes.
    #[serde(skip)]
    pub agent_processes: BTreeMap<String, String>,
}

/// Quotes a CSV field when it holds a comma, a quote or a line break (RFC 4180).
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

/// Returns the summary of one histogram.
fn summarize_latency(h: &hdrhistogram::Histogram<u64>) -> LatencySummary {
    let mut cdf = Vec::new();
    let n = h.len();
    if n > 0 {
        let mut seen = 0u64;
        for v in h.iter_recorded() {
            seen += v.count_since_last_iteration();
            #[expect(clippy::cast_precision_loss, reason = "a fraction for plotting")]
            cdf.push((
                h.highest_equivalent(v.value_iterated_to()),
                seen as f64 / n as f64,
            ));
        }
        if cdf.len() > 200 {
            let step = cdf.len().div_ceil(200);
            let last = *cdf.last().expect("non-empty");
            cdf = cdf.into_iter().step_by(step).collect();
            if cdf.last() != Some(&last) {
                cdf.push(last);
            }
        }
    }
    let q = |x| {
        if n == 0 {
            0
        } else {
            h.highest_equivalent(h.value_at_quantile(x))
        }
    };
    let total = h
        .iter_recorded()
        .map(|v| v.value_iterated_to().saturating_mul(v.count_at_value()))
        .fold(0u64, u64::saturating_add);
    LatencySummary {
        count: n,
        min_ns: if n == 0 { 0 } else { h.min() },
        p50_ns: q(0.5),
        p90_ns: q(0.9),
        p99_ns: q(0.99),
        p999_ns: q(0.999),
        max_ns: if n == 0 {
            0
        } else {
            h.highest_equivalent(h.max())
        },
        total_ns: total,
        cdf,
    }
}

/// The measured parts of a report, from the engine's statistics and the counters.
pub(crate) struct Measured {
    pub(crate) latency: BTreeMap<String, LatencySummary>,
    pub(crate) bandwidth: Vec<PathBandwidth>,
    pub(crate) iotlb: Vec<IotlbRate>,
    pub(crate) atc: Vec<IotlbRate>,
    pub(crate) series: BTreeMap<String, Series>,
}

impl Measured {
    /// Summarizes `stats`; IOTLB rates come from the `iommu.<device>.iotlb_{hits,misses}` counters.
    pub(crate) fn new(stats: Stats, counters: &BTreeMap<String, u64>) -> Self {
        let latency = stats
            .latencies
            .iter()
            .map(|(k, h)| (k.clone(), summarize_latency(h)))
            .collect();
        let bandwidth = stats
            .transfers
            .iter()
            .map(|((device, path), t)| PathBandwidth {
                device: device.clone(),
                path: (*path).to_owned(),
                bytes: t.bytes,
                requests: t.requests,
                gbps: t.gbps(),
            })
            .collect();
        let iotlb = hit_rates(counters, "iommu.", ".iotlb_hits", ".iotlb_misses");
        let atc = hit_rates(counters, "sva.", ".atc_hits", ".atc_misses");
        Self {
            latency,
            bandwidth,
            iotlb,
            atc,
            series: stats.series,
        }
    }
}

/// Returns the hit rate of every device with a `<prefix><device><hits>` or `<prefix><device><misses>`
/// counter (a counter that never moved is absent, so a device may have only one of them), by device.
fn hit_rates(
    counters: &BTreeMap<String, u64>,
    prefix: &str,
    hits: &str,
    misses: &str,
) -> Vec<IotlbRate> {
    let mut by_dev: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    for (k, &n) in counters {
        let Some(rest) = k.strip_prefix(prefix) else {
            continue;
        };
        if let Some(dev) = rest.strip_suffix(hits) {
            by_dev.entry(dev).or_default().0 = n;
        } else if let Some(dev) = rest.strip_suffix(misses) {
            by_dev.entry(dev).or_default().1 = n;
        }
    }
    by_dev
        .into_iter()
        .map(|(dev, (hits, misses))| {
            #[expect(clippy::cast_precision_loss, reason = "a rate")]
            let hit_rate = if hits + misses == 0 {
                0.0
            } else {
                hits as f64 / (hits + misses) as f64
            };
            IotlbRate {
                device: dev.to_owned(),
                hits,
                misses,
                hit_rate,
            }
        })
        .collect()
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
        if self
            .metrics
            .get("gpu.beyond_mainline_p2p")
            .is_some_and(|&n| n > 0)
        {
            let _ = writeln!(
                s,
                "  BEYOND MAINLINE: peers map GPU device-private pages by P2P (the unmerged HMM P2P series; \
                 mainline migrates them to RAM)"
            );
        }
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
        self.render_measured(&mut s);
        s
    }

    /// The measured tables: step durations, latency percentiles, bandwidth per path, IOTLB hit rates. A
    /// table whose every duration is 0 (zero-time runs) is left out.
    fn render_measured(&self, s: &mut String) {
        let d = |ns: u64| SimDuration::from_nanos(ns).to_string();
        let (steps, phases): (Vec<_>, Vec<_>) = self
            .latency
            .iter()
            .filter(|(_, l)| l.max_ns > 0)
            .partition(|(k, _)| k.starts_with("step."));
        if !steps.is_empty() {
            let _ = writeln!(s, "\nstep durations:");
            let _ = writeln!(
                s,
                "  {:<24} {:>7} {:>12} {:>12} {:>12}",
                "op", "count", "total", "p50", "max"
            );
            for (k, l) in &steps {
                let _ = writeln!(
                    s,
                    "  {:<24} {:>7} {:>12} {:>12} {:>12}",
                    &k["step.".len()..],
                    l.count,
                    d(l.total_ns),
                    d(l.p50_ns),
                    d(l.max_ns)
                );
            }
        }
        if !phases.is_empty() {
            let _ = writeln!(s, "\nlatency:");
            let _ = writeln!(
                s,
                "  {:<24} {:>7} {:>12} {:>12} {:>12} {:>12}",
                "kind", "count", "p50", "p90", "p99", "max"
            );
            for (k, l) in &phases {
                let _ = writeln!(
                    s,
                    "  {:<24} {:>7} {:>12} {:>12} {:>12} {:>12}",
                    k,
                    l.count,
                    d(l.p50_ns),
                    d(l.p90_ns),
                    d(l.p99_ns),
                    d(l.max_ns)
                );
            }
        }
        if !self.bandwidth.is_empty() {
            let _ = writeln!(s, "\nbandwidth per path:");
            let _ = writeln!(
                s,
                "  {:<16} {:<16} {:>12} {:>9} {:>9}",
                "device", "path", "bytes", "requests", "GB/s"
            );
            for b in &self.bandwidth {
                // A zero-time run moves bytes in no time: no rate.
                let rate = if b.gbps > 0.0 {
                    format!("{:.2}", b.gbps)
                } else {
                    "-".to_owned()
                };
                let _ = writeln!(
                    s,
                    "  {:<16} {:<16} {:>12} {:>9} {:>9}",
                    b.device, b.path, b.bytes, b.requests, rate
                );
            }
        }
        for (title, rates) in [("iotlb", &self.iotlb), ("atc", &self.atc)] {
            if rates.is_empty() {
                continue;
            }
            let _ = writeln!(s, "\n{title}:");
            let _ = writeln!(
                s,
                "  {:<16} {:>9} {:>9} {:>9}",
                "device", "hits", "misses", "hit rate"
            );
            for r in rates {
                let _ = writeln!(
                    s,
                    "  {:<16} {:>9} {:>9} {:>8.1}%",
                    r.device,
                    r.hits,
                    r.misses,
                    r.hit_rate * 100.0
                );
            }
        }
    }

    /// Renders the report as pretty JSON (the trace excluded).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("report fields serialize")
    }

    /// Writes the report as CSV files into `dir` (created if missing), for spreadsheets: `summary.csv`
    /// (`key,value`: the run's fields and every counter), `latency.csv`, `bandwidth.csv`, `iotlb.csv`,
    /// `series.csv` (`series,time_ns,value`) and, with a step log, `steps.csv`. Returns the files written.
    ///
    /// # Errors
    /// The I/O error of creating the directory or writing a file.
    pub fn write_csv(&self, dir: &std::path::Path) -> std::io::Result<Vec<std::path::PathBuf>> {
        std::fs::create_dir_all(dir)?;
        let mut files = Vec::new();
        let mut put = |name: &str, text: String| -> std::io::Result<()> {
            let p = dir.join(name);
            std::fs::write(&p, text)?;
            files.push(p);
            Ok(())
        };
        let mut t = String::from("key,value\n");
        let outcome = serde_json::to_value(&self.outcome).expect("outcome serializes");
        for (k, v) in [
            ("schema_version", self.schema_version.to_string()),
            ("scenario", csv_field(&self.scenario)),
            ("seed", self.seed.to_string()),
            ("explore", self.explore.to_string()),
            ("time_mode", self.time_mode.clone()),
            ("outcome", outcome["kind"].as_str().unwrap_or("").to_owned()),
            ("end_time_ns", self.end_time.as_nanos().to_string()),
            ("events", self.events.to_string()),
            ("expectations", self.expectations.to_string()),
            ("failures", self.failures.len().to_string()),
            ("trace_dropped", self.trace_dropped.to_string()),
        ] {
            let _ = writeln!(t, "{k},{v}");
        }
        for (k, v) in &self.metrics {
            let _ = writeln!(t, "{},{v}", csv_field(k));
        }
        put("summary.csv", t)?;
        let mut t =
            String::from("kind,count,min_ns,p50_ns,p90_ns,p99_ns,p999_ns,max_ns,total_ns\n");
        for (k, l) in &self.latency {
            let _ = writeln!(
                t,
                "{},{},{},{},{},{},{},{},{}",
                csv_field(k),
                l.count,
                l.min_ns,
                l.p50_ns,
                l.p90_ns,
                l.p99_ns,
                l.p999_ns,
                l.max_ns,
                l.total_ns
            );
        }
        put("latency.csv", t)?;
        let mut t = String::from("device,path,bytes,requests,gbps\n");
        for b in &self.bandwidth {
            let _ = writeln!(
                t,
                "{},{},{},{},{:.6}",
                csv_field(&b.device),
                b.path,
                b.bytes,
                b.requests,
                b.gbps
            );
        }
        put("bandwidth.csv", t)?;
        for (file, rates) in [("iotlb.csv", &self.iotlb), ("atc.csv", &self.atc)] {
            let mut t = String::from("device,hits,misses,hit_rate\n");
            for r in rates {
                let _ = writeln!(
                    t,
                    "{},{},{},{:.6}",
                    csv_field(&r.device),
                    r.hits,
                    r.misses,
                    r.hit_rate
                );
            }
            put(file, t)?;
        }
        let mut t = String::from("series,time_ns,value\n");
        for (k, ser) in &self.series {
            for (time, v) in &ser.points {
                let _ = writeln!(t, "{},{},{v}", csv_field(k), time.as_nanos());
            }
        }
        put("series.csv", t)?;
        if !self.steps.is_empty() {
            let mut t = String::from("start_ns,end_ns,thread,op,line,result,ok\n");
            for r in &self.steps {
                let _ = writeln!(
                    t,
                    "{},{},{},{},{},{},{}",
                    r.start.as_nanos(),
                    r.end.as_nanos(),
                    csv_field(&r.thread),
                    r.op,
                    r.line,
                    csv_field(&r.result),
                    r.ok
                );
            }
            put("steps.csv", t)?;
        }
        Ok(files)
    }

    /// Renders the trace in the Chrome trace-event format (`chrome://tracing`, Perfetto): a process per
    /// simulated process (its threads' tracks), one `kernel` process for the other agents, and one per
    /// device (a lane per agent that drives it, and its counter tracks); spans as `B`/`E` pairs (a span
    /// still open when the run ended closes at the end time with `"unfinished": true`), instants, flow
    /// arrows (`s`/`f`) from each device fault to its resolution, counters (`C`); timestamps in
    /// microseconds of simulated time. When the trace cap dropped records, a `trace truncated` instant at
    /// the end says how many.
    pub fn trace_chrome_json(&self) -> String {
        chrome::render(self)
    }
}

/// The Chrome trace-event rendering ([`Report::trace_chrome_json`]).
mod chrome {
    use std::collections::BTreeMap;

    use serde_json::{Map, Value, json};

    use super::{Phase, Report, TraceArg, TraceEvent, Track};

    /// Microseconds of simulated time, as the format wants.
    #[expect(clippy::cast_precision_loss, reason = "display only")]
    fn us(ns: u64) -> f64 {
        ns as f64 / 1000.0
    }

    fn args_of(e: &TraceEvent) -> Value {
        let mut m = Map::new();
        for (k, v) in &e.args {
            m.insert((*k).to_owned(), arg(v));
        }
        if !e.detail.is_empty() {
            m.insert("detail".to_owned(), Value::String(e.detail.clone()));
        }
        Value::Object(m)
    }

    fn arg(v: &TraceArg) -> Value {
        serde_json::to_value(v).expect("a trace arg serializes")
    }

    /// Processes and lanes, numbered in a fixed order: the simulated processes (in the order their threads
    /// are declared), `kernel`, then devices by name.
    struct Layout {
        pids: BTreeMap<String, u64>,
        order: Vec<String>,
        tids: BTreeMap<(u64, String), u64>,
    }

    impl Layout {
        fn pid(&mut self, process: &str) -> u64 {
            if let Some(&p) = self.pids.get(process) {
                return p;
            }
            let p = self.order.len() as u64 + 1;
            self.pids.insert(process.to_owned(), p);
            self.order.push(process.to_owned());
            p
        }

        fn tid(&mut self, pid: u64, lane: &str) -> u64 {
            let n = self.tids.len() as u64 + 1;
            *self.tids.entry((pid, lane.to_owned())).or_insert(n)
        }
    }

    const KERNEL: &str = "kernel";

    pub(super) fn render(r: &Report) -> String {
        let mut lay = Layout {
            pids: BTreeMap::new(),
            order: Vec::new(),
            tids: BTreeMap::new(),
        };
        let process_of = |agent: &str| -> String {
            r.agent_processes
                .get(agent)
                .map_or_else(|| KERNEL.to_owned(), |p| format!("process {p}"))
        };
        for p in r.agent_processes.values() {
            lay.pid(&format!("process {p}"));
        }
        lay.pid(KERNEL);
        let mut devices: Vec<&str> = r
            .trace
            .iter()
            .filter_map(|e| match &e.track {
                Track::Device(d) => Some(d.as_str()),
                Track::Agent => None,
            })
            .collect();
        devices.sort_unstable();
        devices.dedup();
        for d in &devices {
            lay.pid(&format!("device {d}"));
        }
        let mut events: Vec<Value> = Vec::new();
        // Open spans per lane, to close what the run left open.
        let mut open: BTreeMap<(u64, u64), Vec<&'static str>> = BTreeMap::new();
        for e in &r.trace {
            let pid = match &e.track {
                Track::Agent => lay.pid(&process_of(&e.agent)),
                Track::Device(d) => lay.pid(&format!("device {d}")),
            };
            let ts = us(e.time.as_nanos());
            let ev = match e.phase {
                Phase::Counter(v) => {
                    json!({"ph": "C", "pid": pid, "ts": ts, "name": e.kind, "args": {"value": v}})
                }
                phase => {
                    let tid = lay.tid(pid, &e.agent);
                    match phase {
                        Phase::Instant => json!({
                            "ph": "i", "s": "t", "pid": pid, "tid": tid, "ts": ts, "name": e.kind,
                            "args": args_of(e),
                        }),
                        Phase::Begin => {
                            open.entry((pid, tid)).or_default().push(e.kind);
                            json!({
                                "ph": "B", "pid": pid, "tid": tid, "ts": ts, "name": e.kind,
                                "args": args_of(e),
                            })
                        }
                        Phase::End => {
                            open.entry((pid, tid)).or_default().pop();
                            json!({
                                "ph": "E", "pid": pid, "tid": tid, "ts": ts, "name": e.kind,
                                "args": args_of(e),
                            })
                        }
                        Phase::FlowStart(id) => json!({
                            "ph": "s", "pid": pid, "tid": tid, "ts": ts, "name": e.kind,
                            "cat": "flow", "id": id,
                        }),
                        Phase::FlowEnd(id) => json!({
                            "ph": "f", "bp": "e", "pid": pid, "tid": tid, "ts": ts, "name": e.kind,
                            "cat": "flow", "id": id,
                        }),
                        Phase::Counter(_) => unreachable!("handled above"),
                    }
                }
            };
            events.push(ev);
        }
        let end = us(r.end_time.as_nanos());
        for ((pid, tid), stack) in &open {
            for kind in stack.iter().rev() {
                events.push(json!({
                    "ph": "E", "pid": pid, "tid": tid, "ts": end, "name": kind,
                    "args": {"unfinished": true},
                }));
            }
        }
        if r.trace_dropped > 0 {
            let pid = lay.pid(KERNEL);
            let tid = lay.tid(pid, "trace");
            events.push(json!({
                "ph": "i", "s": "g", "pid": pid, "tid": tid, "ts": end, "name": "trace truncated",
                "args": {"dropped_records": r.trace_dropped, "kept_records": r.trace.len()},
            }));
        }
        let mut meta: Vec<Value> = Vec::new();
        for (i, name) in lay.order.iter().enumerate() {
            let pid = i as u64 + 1;
            meta.push(json!({"ph": "M", "pid": pid, "tid": 0, "name": "process_name", "args": {"name": name}}));
            meta.push(json!({"ph": "M", "pid": pid, "tid": 0, "name": "process_sort_index", "args": {"sort_index": pid}}));
        }
        for ((pid, lane), tid) in &lay.tids {
            meta.push(json!({"ph": "M", "pid": pid, "tid": tid, "name": "thread_name", "args": {"name": lane}}));
        }
        meta.extend(events);
        serde_json::to_string(&json!({
            "traceEvents": meta,
            "displayTimeUnit": "ns",
            "otherData": {"scenario": r.scenario, "seed": r.seed, "schema_version": super::SCHEMA_VERSION},
        }))
        .expect("trace serializes")
    }
}
