//! What a run lets people see: the trace (instants, spans, flows, counter tracks), latency histograms,
//! transfers, sampled series and metric counters — the observation half of [`Sim`]'s API.

use std::cell::RefCell;
use std::fmt;
use std::rc::{Rc, Weak};

use peerdma_core::{SimDuration, SimTime};

use super::{Inner, Sim};
use crate::stats::Stats;
use crate::trace::{Metrics, Phase, TraceArgs, TraceEvent, Track};

thread_local! {
    /// The buffer a device gauge's series name is spelled in ([`Sim::gauge`]).
    static SERIES_KEY: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Records `value` at `now` in the series `<name>.<device>`, spelled in a reused buffer (no allocation per
/// sample).
fn record_device_sample(stats: &mut Stats, name: &str, device: &str, now: SimTime, value: i64) {
    SERIES_KEY.with_borrow_mut(|key| {
        key.clear();
        key.push_str(name);
        key.push('.');
        key.push_str(device);
        stats.record_sample(key, now, value);
    });
}

impl Sim {
    /// Records a trace event attributed to the current agent: an instant on its track with free-text
    /// details (prefer [`Sim::instant`], whose fields are readable in a trace viewer).
    pub fn trace(&self, kind: &'static str, detail: impl FnOnce() -> String) {
        if !self.tracing() {
            return;
        }
        let detail = detail();
        self.inner.borrow_mut().push_event(
            kind,
            detail,
            Phase::Instant,
            Track::Agent,
            Vec::new(),
            false,
        );
    }

    /// Returns whether this run records a trace ([`SimConfig::trace`](super::SimConfig::trace)): model code may skip building
    /// trace-only data when it does not.
    pub fn tracing(&self) -> bool {
        self.inner.borrow().cfg.trace
    }

    /// Caps the trace at `cap` records: past it, new records are dropped (and counted,
    /// [`Sim::trace_dropped`]), except the ends of spans and flows already begun, so what is kept stays
    /// matched.
    pub fn set_trace_cap(&self, cap: usize) {
        self.inner.borrow_mut().trace_cap = cap;
    }

    /// Returns how many trace records the cap dropped.
    pub fn trace_dropped(&self) -> u64 {
        self.inner.borrow().trace_dropped
    }

    /// Records an instant `kind` on `track` with readable fields.
    pub fn instant(&self, kind: &'static str, track: Track, args: impl FnOnce() -> TraceArgs) {
        if !self.tracing() {
            return;
        }
        let args = args();
        self.inner
            .borrow_mut()
            .push_event(kind, String::new(), Phase::Instant, track, args, false);
    }

    /// Begins a span `kind` on `track` (a CPU fault, an invalidation, a DMA batch...): it ends when the
    /// returned guard is dropped or [`Span::end`]ed, and its duration is recorded in the latency histogram
    /// `kind` whether or not a trace is kept. Spans of one agent on one track nest like its calls do.
    pub fn span(&self, kind: &'static str, track: Track, args: impl FnOnce() -> TraceArgs) -> Span {
        let mut inner = self.inner.borrow_mut();
        let start = inner.now;
        let recorded = inner.cfg.trace
            && inner.push_event(
                kind,
                String::new(),
                Phase::Begin,
                track.clone(),
                args(),
                false,
            );
        Span {
            sim: Rc::downgrade(&self.inner),
            kind,
            track,
            start,
            recorded,
            end_args: Vec::new(),
            histogram: None,
        }
    }

    /// Starts a flow (an arrow in a trace viewer) from `track` now: a device fault to its resolution, a
    /// request to its completion. End it with [`Sim::flow_end`] where it resolves.
    pub fn flow_begin(&self, kind: &'static str, track: Track) -> Flow {
        let mut inner = self.inner.borrow_mut();
        let id = inner.next_flow;
        inner.next_flow += 1;
        let recorded = inner.cfg.trace
            && inner.push_event(
                kind,
                String::new(),
                Phase::FlowStart(id),
                track,
                Vec::new(),
                false,
            );
        Flow { id, kind, recorded }
    }

    /// Ends `flow` on `track` now.
    #[expect(
        clippy::needless_pass_by_value,
        reason = "ending a flow consumes it, so it cannot end twice"
    )]
    pub fn flow_end(&self, flow: Flow, track: Track) {
        let Flow { id, kind, recorded } = flow;
        if recorded {
            self.inner.borrow_mut().push_event(
                kind,
                String::new(),
                Phase::FlowEnd(id),
                track,
                Vec::new(),
                true,
            );
        }
    }

    /// Samples gauge `name` (residency, requests in flight, queue depth) at `value` now: a counter track of
    /// `track`'s process in the trace, and a point of the series `name` (or `name.<device>` for a device
    /// track) in [`Sim::stats`].
    pub fn gauge(&self, track: Track, name: &'static str, value: i64) {
        let mut inner = self.inner.borrow_mut();
        let now = inner.now;
        match &track {
            Track::Agent => inner.stats.record_sample(name, now, value),
            Track::Device(d) => record_device_sample(&mut inner.stats, name, d, now, value),
        }
        if inner.cfg.trace {
            inner.push_event(
                name,
                String::new(),
                Phase::Counter(value),
                track,
                Vec::new(),
                false,
            );
        }
    }

    /// [`Sim::gauge`] on the track of device `device`: the same sample and trace event, without building
    /// the track (and its name) unless the run is traced.
    pub fn gauge_device(&self, device: &str, name: &'static str, value: i64) {
        let mut inner = self.inner.borrow_mut();
        let now = inner.now;
        record_device_sample(&mut inner.stats, name, device, now, value);
        if inner.cfg.trace {
            inner.push_event(
                name,
                String::new(),
                Phase::Counter(value),
                Track::device(device),
                Vec::new(),
                false,
            );
        }
    }

    /// Records one duration in the latency histogram `name` (without a trace span).
    pub fn latency(&self, name: &str, d: SimDuration) {
        self.inner.borrow_mut().stats.record_latency(name, d);
    }

    /// Records `bytes` moved by `device` over access path `path` (`local`, `iommu`, `p2p_bus_addr`,
    /// `p2p_host_bridge`...), issued at `start` and landed now.
    pub fn transfer(&self, device: &str, path: &'static str, bytes: u64, start: SimTime) {
        let mut inner = self.inner.borrow_mut();
        let now = inner.now;
        inner.stats.record_transfer(device, path, bytes, start, now);
    }

    /// Returns a copy of the run's statistics (latency histograms, transfers, series).
    pub fn stats(&self) -> Stats {
        self.inner.borrow().stats.clone()
    }

    /// Adds `n` to the metric counter `name`.
    pub fn count(&self, name: &str, n: u64) {
        self.inner.borrow_mut().metrics.add(name, n);
    }

    /// Returns the counter `name` (0 if it never moved), without copying the others.
    pub fn counter(&self, name: &str) -> u64 {
        self.inner.borrow().metrics.get(name)
    }

    /// Returns a copy of the metrics.
    pub fn metrics(&self) -> Metrics {
        self.inner.borrow().metrics.clone()
    }

    /// Takes the trace recorded so far.
    pub fn take_trace(&self) -> Vec<TraceEvent> {
        std::mem::take(&mut self.inner.borrow_mut().trace)
    }

    /// Returns the number of events delivered so far.
    pub fn events_delivered(&self) -> u64 {
        self.inner.borrow().events
    }
}

/// A span in progress ([`Sim::span`]): ends when dropped, recording its duration under its kind.
#[must_use = "a span ends when dropped: bind it to a variable for the work it covers"]
pub struct Span {
    sim: Weak<RefCell<Inner>>,
    kind: &'static str,
    track: Track,
    start: SimTime,
    recorded: bool,
    end_args: TraceArgs,
    histogram: Option<String>,
}

impl fmt::Debug for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Span")
            .field("kind", &self.kind)
            .field("start", &self.start)
            .finish_non_exhaustive()
    }
}

impl Span {
    /// Adds fields known only at the end (pages faulted, an errno) to the span's end record.
    pub fn add_end_args(&mut self, args: impl FnOnce() -> TraceArgs) {
        if self.recorded {
            self.end_args.extend(args());
        }
    }

    /// Records the span's duration in the latency histogram `name` instead of its kind's (a step's span is
    /// named after its op but measured under `step.<op>`).
    pub fn with_histogram(mut self, name: String) -> Self {
        self.histogram = Some(name);
        self
    }

    /// Ends the span now.
    pub fn end(self) {}

    /// Returns when it began.
    pub fn start(&self) -> SimTime {
        self.start
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        // A span dropped while the engine is being torn down or borrowed records nothing.
        let Some(inner) = self.sim.upgrade() else {
            return;
        };
        let Ok(mut inner) = inner.try_borrow_mut() else {
            return;
        };
        let d = SimDuration(inner.now.0.saturating_sub(self.start.0));
        let hist = self.histogram.as_deref().unwrap_or(self.kind);
        inner.stats.record_latency(hist, d);
        if self.recorded {
            let args = std::mem::take(&mut self.end_args);
            inner.push_event(
                self.kind,
                String::new(),
                Phase::End,
                self.track.clone(),
                args,
                true,
            );
        }
    }
}

/// A flow in progress ([`Sim::flow_begin`]); pass it to [`Sim::flow_end`].
#[derive(Debug)]
#[must_use = "a flow is ended with Sim::flow_end"]
pub struct Flow {
    id: u64,
    kind: &'static str,
    recorded: bool,
}
