//! The executor: virtual clock, event queue and tasks.

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::task::{Context, Poll, Waker};

use peerdma_core::{SimDuration, SimTime};

use crate::rng::RngStream;
use crate::stats::Stats;
use crate::trace::{Metrics, Phase, TraceArgs, TraceEvent, Track};

/// Trace records a run keeps by default before it drops new ones ([`Sim::set_trace_cap`]).
pub const DEFAULT_TRACE_CAP: usize = 2_000_000;

/// Identifies one agent (task) of a simulation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TaskId(pub usize);

/// Engine settings.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Seed of every RNG stream.
    pub seed: u64,
    /// Randomise the order of agents ready at the same instant (schedule exploration).
    pub explore: bool,
    /// Relative latency jitter in `[0, 1]` applied by [`Sim::jitter`].
    pub jitter: f64,
    /// The run stops with [`RunOutcome::TimeLimit`] when the next event lies beyond this time.
    pub time_limit: SimTime,
    /// Record trace events.
    pub trace: bool,
    /// The run stops with [`RunOutcome::Limit`] once this many events have been delivered.
    pub max_events: u64,
    /// Trace events past this many are not recorded; the run stops with [`RunOutcome::Limit`].
    pub max_trace: usize,
    /// With exploration on, the probability (in 1/256) that a [`Sim::preempt_point`] (a protocol step
    /// boundary) becomes a preemption: the agent is delayed by a random time up to
    /// [`SimConfig::preempt_max`] drawn from the exploration stream, so that other agents' steps land in
    /// the window. 0 turns preemption off.
    pub preempt_per_256: u32,
    /// The longest delay one exploration preemption adds.
    pub preempt_max: SimDuration,
    /// Consulted every 1,024 events: a reason to stop the run (a wall-clock budget kept by the caller,
    /// which the model itself may not read) ends it with [`RunOutcome::Limit`].
    pub watchdog: Option<Watchdog>,
}

/// A check the engine runs every 1,024 events; `Some(reason)` stops the run with [`RunOutcome::Limit`].
#[derive(Clone)]
pub struct Watchdog(pub Rc<dyn Fn() -> Option<String>>);

impl fmt::Debug for Watchdog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Watchdog")
    }
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            explore: false,
            jitter: 0.0,
            time_limit: SimTime(60_000_000_000),
            trace: true,
            max_events: u64::MAX,
            max_trace: usize::MAX,
            preempt_per_256: 0,
            preempt_max: SimDuration(0),
            watchdog: None,
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutcome {
    /// Every agent finished.
    Completed,
    /// Some agents still wait, but no event is left that could wake them: a simulated deadlock.
    Deadlock {
        /// Names of the blocked agents, in task order.
        blocked: Vec<String>,
    },
    /// The next event lies beyond the time limit.
    TimeLimit {
        /// The time limit.
        limit: SimTime,
        /// Names of the agents that had not finished, in task order.
        pending: Vec<String>,
    },
    /// A resource limit of [`SimConfig`] was reached (events, trace size, the watchdog) or the clock would
    /// overflow; the reason names it.
    Limit(String),
    /// [`Sim::stop`] was called (an oracle violation or a failed expectation).
    Stopped(String),
}

enum NextEvent {
    Task(usize),
    PastLimit,
    Empty,
}

type BoxFuture = Pin<Box<dyn Future<Output = ()>>>;

struct Task {
    name: String,
    future: Option<BoxFuture>,
    scheduled: bool,
    done: bool,
}

struct Inner {
    cfg: SimConfig,
    now: SimTime,
    seq: u64,
    queue: BinaryHeap<Reverse<(SimTime, u64, usize)>>,
    tasks: Vec<Task>,
    current: Option<usize>,
    explore_rng: RngStream,
    jitter_rng: RngStream,
    stopped: Option<String>,
    limit: Option<String>,
    schedule_hash: u64,
    trace: Vec<TraceEvent>,
    trace_cap: usize,
    trace_dropped: u64,
    next_flow: u64,
    metrics: Metrics,
    stats: Stats,
    events: u64,
    progress: Option<(u64, ProgressFn)>,
}

/// A progress callback ([`Sim::set_progress`]).
type ProgressFn = Box<dyn FnMut(SimTime, u64)>;

/// A handle on one simulation. Cloning it is cheap; every clone drives the same engine.
#[derive(Clone)]
pub struct Sim {
    inner: Rc<RefCell<Inner>>,
}

impl fmt::Debug for Sim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = self.inner.borrow();
        f.debug_struct("Sim")
            .field("now", &inner.now)
            .field("tasks", &inner.tasks.len())
            .finish()
    }
}

impl Sim {
    /// Creates an engine at time zero with no agents.
    pub fn new(cfg: SimConfig) -> Self {
        let explore_rng = RngStream::new(cfg.seed, "engine.explore");
        let jitter_rng = RngStream::new(cfg.seed, "engine.jitter");
        Self {
            inner: Rc::new(RefCell::new(Inner {
                cfg,
                now: SimTime::ZERO,
                seq: 0,
                queue: BinaryHeap::new(),
                tasks: Vec::new(),
                current: None,
                explore_rng,
                jitter_rng,
                stopped: None,
                limit: None,
                schedule_hash: FNV_OFFSET,
                trace: Vec::new(),
                trace_cap: DEFAULT_TRACE_CAP,
                trace_dropped: 0,
                next_flow: 0,
                metrics: Metrics::default(),
                stats: Stats::default(),
                events: 0,
                progress: None,
            })),
        }
    }

    /// Returns the current simulated time.
    pub fn now(&self) -> SimTime {
        self.inner.borrow().now
    }

    /// Returns the simulation seed.
    pub fn seed(&self) -> u64 {
        self.inner.borrow().cfg.seed
    }

    /// Returns whether schedule exploration is on.
    pub fn exploring(&self) -> bool {
        self.inner.borrow().cfg.explore
    }

    /// Creates the RNG stream `name` (deterministic in the seed and the name).
    pub fn rng(&self, name: &str) -> RngStream {
        RngStream::new(self.seed(), name)
    }

    /// Spawns an agent, ready to run at the current time; returns its id.
    pub fn spawn(
        &self,
        name: impl Into<String>,
        future: impl Future<Output = ()> + 'static,
    ) -> TaskId {
        let now = self.now();
        self.spawn_at(now, name, future)
    }

    /// Spawns an agent that first runs at `at` (not before now): one event, where a spawned agent that
    /// sleeps until `at` would take two. Returns its id.
    pub fn spawn_at(
        &self,
        at: SimTime,
        name: impl Into<String>,
        future: impl Future<Output = ()> + 'static,
    ) -> TaskId {
        let mut inner = self.inner.borrow_mut();
        let id = inner.tasks.len();
        inner.tasks.push(Task {
            name: name.into(),
            future: Some(Box::pin(future)),
            scheduled: false,
            done: false,
        });
        let at = at.max(inner.now);
        inner.schedule(id, at);
        TaskId(id)
    }

    /// Returns the agent being polled.
    ///
    /// # Panics
    /// Panics outside an agent: simulated primitives can only be awaited by agents.
    pub fn current(&self) -> TaskId {
        TaskId(
            self.inner
                .borrow()
                .current
                .expect("simulated primitive awaited outside an agent"),
        )
    }

    /// Returns the name of the agent being polled, or `"engine"` outside agents.
    pub fn current_name(&self) -> String {
        let inner = self.inner.borrow();
        inner
            .current
            .map_or_else(|| "engine".to_owned(), |c| inner.tasks[c].name.clone())
    }

    /// Returns the name of agent `id`.
    pub fn task_name(&self, id: TaskId) -> String {
        self.inner.borrow().tasks[id.0].name.clone()
    }

    /// Returns whether agent `id` has finished.
    pub fn is_done(&self, id: TaskId) -> bool {
        self.inner.borrow().tasks[id.0].done
    }

    /// Makes agent `id` runnable at the current time (used by the primitives to hand over a resource).
    pub fn wake(&self, id: TaskId) {
        let mut inner = self.inner.borrow_mut();
        let now = inner.now;
        inner.schedule(id.0, now);
    }

    /// Returns a future that completes `d` later in simulated time. `sleep(0)` yields to every agent already
    /// runnable at this instant.
    pub fn sleep(&self, d: SimDuration) -> Sleep {
        Sleep {
            sim: self.clone(),
            dur: d,
            registered: false,
        }
    }

    /// Returns a future for a protocol step boundary where another CPU's work may interleave: with
    /// exploration off it completes at once (no event); with exploration on it yields to every agent ready
    /// now and, with probability [`SimConfig::preempt_per_256`]/256, holds the agent back by a random delay
    /// up to [`SimConfig::preempt_max`] (a preemption), drawn from the exploration stream.
    pub fn preempt_point(&self) -> Sleep {
        let mut inner = self.inner.borrow_mut();
        if !inner.cfg.explore {
            return Sleep {
                sim: self.clone(),
                dur: SimDuration(0),
                registered: true,
            };
        }
        let mut dur = SimDuration(0);
        if inner.cfg.preempt_per_256 > 0
            && inner.explore_rng.below(256) < u64::from(inner.cfg.preempt_per_256)
        {
            let max = inner.cfg.preempt_max.0;
            dur = SimDuration(inner.explore_rng.below(max.saturating_add(1)));
        }
        Sleep {
            sim: self.clone(),
            dur,
            registered: false,
        }
    }

    /// Returns `d` perturbed by the configured jitter, drawn from the engine's jitter stream.
    pub fn jitter(&self, d: SimDuration) -> SimDuration {
        let mut inner = self.inner.borrow_mut();
        let j = inner.cfg.jitter;
        if j <= 0.0 || d.0 == 0 {
            return d;
        }
        let u = inner.jitter_rng.unit_f64() * 2.0 - 1.0;
        #[expect(clippy::cast_precision_loss, reason = "durations far below 2^53 ns")]
        let scaled = d.0 as f64 * (1.0 + j * u);
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "scaled is in [0, 2d]"
        )]
        SimDuration(scaled.max(0.0).round() as u64)
    }

    /// Stops the run after the current step with `reason` (the first reason wins).
    pub fn stop(&self, reason: impl Into<String>) {
        let mut inner = self.inner.borrow_mut();
        if inner.stopped.is_none() {
            inner.stopped = Some(reason.into());
        }
    }

    /// Returns the stop reason, if the run was stopped.
    pub fn stopped(&self) -> Option<String> {
        self.inner.borrow().stopped.clone()
    }

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

    /// Returns whether this run records a trace ([`SimConfig::trace`]): model code may skip building
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
        let series = match &track {
            Track::Agent => name.to_owned(),
            Track::Device(d) => format!("{name}.{d}"),
        };
        inner.stats.record_sample(&series, now, value);
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

    /// Calls `f(now, events delivered)` every `every` events while the run goes on (a progress display; it
    /// must not touch the simulation). Host-side only: it changes nothing the run computes.
    pub fn set_progress(&self, every: u64, f: impl FnMut(SimTime, u64) + 'static) {
        self.inner.borrow_mut().progress = Some((every.max(1), Box::new(f)));
    }

    fn report_progress(&self) {
        let (now, events, due) = {
            let inner = self.inner.borrow();
            let due = inner
                .progress
                .as_ref()
                .is_some_and(|(every, _)| inner.events.is_multiple_of(*every));
            (inner.now, inner.events, due)
        };
        if due {
            // Taken out while it runs, so the callback may read the engine.
            let p = self.inner.borrow_mut().progress.take();
            if let Some((every, mut f)) = p {
                f(now, events);
                self.inner.borrow_mut().progress = Some((every, f));
            }
        }
    }

    /// Returns a hash of the order in which agents ran so far (FNV-1a over the agent of each event): two runs
    /// with the same hash took the same interleaving.
    pub fn schedule_hash(&self) -> u64 {
        self.inner.borrow().schedule_hash
    }

    /// Returns the names of the agents that have not finished, in task order.
    pub fn pending(&self) -> Vec<String> {
        self.inner
            .borrow()
            .tasks
            .iter()
            .filter(|t| !t.done)
            .map(|t| t.name.clone())
            .collect()
    }

    /// Ends the run at the next event with [`RunOutcome::Limit`] and `reason` (the first reason wins).
    pub fn limit_reached(&self, reason: impl Into<String>) {
        let mut inner = self.inner.borrow_mut();
        if inner.limit.is_none() {
            inner.limit = Some(reason.into());
        }
    }

    /// Runs until every agent finishes, a deadlock, the time limit, a resource limit, or [`Sim::stop`].
    pub fn run(&self) -> RunOutcome {
        loop {
            if let Some(reason) = self.stopped() {
                return RunOutcome::Stopped(reason);
            }
            if let Some(reason) = self.inner.borrow().limit.clone() {
                return RunOutcome::Limit(reason);
            }
            let (events, max_events, watchdog) = {
                let inner = self.inner.borrow();
                (
                    inner.events,
                    inner.cfg.max_events,
                    inner.cfg.watchdog.clone(),
                )
            };
            if events >= max_events {
                return RunOutcome::Limit(format!(
                    "event limit reached: {events} events delivered (`[sim.limits] events`)"
                ));
            }
            if events % 1024 == 0
                && let Some(w) = watchdog
                && let Some(reason) = (w.0)()
            {
                return RunOutcome::Limit(reason);
            }
            match self.next_event() {
                NextEvent::Task(id) => {
                    self.poll_task(id);
                    self.report_progress();
                }
                NextEvent::PastLimit => {
                    return RunOutcome::TimeLimit {
                        limit: self.inner.borrow().cfg.time_limit,
                        pending: self.pending(),
                    };
                }
                NextEvent::Empty => {
                    let inner = self.inner.borrow();
                    let blocked: Vec<String> = inner
                        .tasks
                        .iter()
                        .filter(|t| !t.done)
                        .map(|t| t.name.clone())
                        .collect();
                    return if blocked.is_empty() {
                        RunOutcome::Completed
                    } else {
                        RunOutcome::Deadlock { blocked }
                    };
                }
            }
        }
    }

    /// Pops the next event.
    fn next_event(&self) -> NextEvent {
        let mut inner = self.inner.borrow_mut();
        let Some(Reverse((time, seq, id))) = inner.queue.pop() else {
            return NextEvent::Empty;
        };
        if time > inner.cfg.time_limit {
            inner.queue.push(Reverse((time, seq, id)));
            return NextEvent::PastLimit;
        }
        let mut chosen = id;
        if inner.cfg.explore {
            // Gather every event due at this instant and pick one at random; the rest go back with their
            // sequence numbers, so their relative order is unchanged.
            let mut same = vec![(seq, id)];
            while let Some(&Reverse((t, s, i))) = inner.queue.peek() {
                if t != time {
                    break;
                }
                inner.queue.pop();
                same.push((s, i));
            }
            let n = same.len() as u64;
            let pick =
                usize::try_from(inner.explore_rng.below(n)).expect("index below a Vec length");
            chosen = same[pick].1;
            for (k, (s, i)) in same.into_iter().enumerate() {
                if k != pick {
                    inner.queue.push(Reverse((time, s, i)));
                }
            }
        }
        inner.now = time;
        inner.events += 1;
        inner.schedule_hash = (inner.schedule_hash ^ chosen as u64).wrapping_mul(FNV_PRIME);
        inner.tasks[chosen].scheduled = false;
        NextEvent::Task(chosen)
    }

    fn poll_task(&self, id: usize) {
        let future = {
            let mut inner = self.inner.borrow_mut();
            if inner.tasks[id].done {
                return;
            }
            inner.current = Some(id);
            inner.tasks[id].future.take()
        };
        let Some(mut future) = future else {
            return;
        };
        let mut cx = Context::from_waker(Waker::noop());
        let poll = future.as_mut().poll(&mut cx);
        let mut inner = self.inner.borrow_mut();
        inner.current = None;
        match poll {
            Poll::Ready(()) => inner.tasks[id].done = true,
            Poll::Pending => inner.tasks[id].future = Some(future),
        }
    }
}

/// FNV-1a 64-bit offset basis and prime, for [`Sim::schedule_hash`].
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

impl Inner {
    /// Appends a trace record on behalf of the current agent; returns whether it was kept (`force` keeps it
    /// past the cap: the end of something begun).
    fn push_event(
        &mut self,
        kind: &'static str,
        detail: String,
        phase: Phase,
        track: Track,
        args: TraceArgs,
        force: bool,
    ) -> bool {
        if !force && self.trace.len() >= self.cfg.max_trace {
            if self.limit.is_none() {
                self.limit = Some(format!(
                    "trace limit reached: {} events recorded (`[sim.limits] trace`)",
                    self.trace.len()
                ));
            }
            return false;
        }
        if !force && self.trace.len() >= self.trace_cap {
            self.trace_dropped += 1;
            return false;
        }
        let agent = self
            .current
            .map_or_else(|| "engine".to_owned(), |c| self.tasks[c].name.clone());
        self.trace.push(TraceEvent {
            time: self.now,
            agent,
            kind,
            detail,
            phase,
            track,
            args,
        });
        true
    }

    fn schedule(&mut self, id: usize, at: SimTime) {
        if self.tasks[id].scheduled || self.tasks[id].done {
            return;
        }
        self.tasks[id].scheduled = true;
        self.seq += 1;
        let seq = self.seq;
        self.queue.push(Reverse((at, seq, id)));
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

/// The future returned by [`Sim::sleep`].
#[derive(Debug)]
pub struct Sleep {
    sim: Sim,
    dur: SimDuration,
    registered: bool,
}

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<()> {
        if self.registered {
            return Poll::Ready(());
        }
        self.registered = true;
        let mut inner = self.sim.inner.borrow_mut();
        let id = inner.current.expect("sleep awaited outside an agent");
        let dur = self.dur;
        let Some(at) = inner.now.0.checked_add(dur.0) else {
            let name = inner.tasks[id].name.clone();
            let now = inner.now;
            if inner.limit.is_none() {
                inner.limit = Some(format!(
                    "clock overflow: agent `{name}` at {now} sleeps {dur}, past 2^64 ns"
                ));
            }
            return Poll::Pending;
        };
        inner.schedule(id, SimTime(at));
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::rc::Rc;

    use super::*;

    fn log_run(cfg: SimConfig, agents: &[(&'static str, u64)]) -> Vec<(u64, &'static str)> {
        let sim = Sim::new(cfg);
        let log = Rc::new(RefCell::new(Vec::new()));
        for &(name, delay) in agents {
            let (s, l) = (sim.clone(), log.clone());
            sim.spawn(name, async move {
                for _ in 0..3 {
                    s.sleep(SimDuration(delay)).await;
                    l.borrow_mut().push((s.now().0, name));
                }
            });
        }
        assert_eq!(sim.run(), RunOutcome::Completed);
        Rc::try_unwrap(log).unwrap().into_inner()
    }

    #[test]
    fn spawn_at_runs_the_agent_first_at_that_time_in_one_event() {
        let sim = Sim::new(SimConfig::default());
        let ran_at = Rc::new(RefCell::new(None));
        let (s, r) = (sim.clone(), ran_at.clone());
        sim.spawn_at(SimTime(700), "later", async move {
            *r.borrow_mut() = Some(s.now());
        });
        assert_eq!(sim.run(), RunOutcome::Completed);
        assert_eq!(*ran_at.borrow(), Some(SimTime(700)));
        assert_eq!(sim.events_delivered(), 1);
    }

    #[test]
    fn events_run_in_time_order() {
        let log = log_run(SimConfig::default(), &[("slow", 30), ("fast", 10)]);
        let times: Vec<u64> = log.iter().map(|e| e.0).collect();
        let mut sorted = times.clone();
        sorted.sort_unstable();
        assert_eq!(times, sorted);
        assert_eq!(log[0], (10, "fast"));
        assert_eq!(log.last().unwrap(), &(90, "slow"));
    }

    #[test]
    fn ties_break_by_scheduling_order() {
        let log = log_run(SimConfig::default(), &[("a", 10), ("b", 10), ("c", 10)]);
        let names: Vec<&str> = log.iter().map(|e| e.1).collect();
        assert_eq!(names, ["a", "b", "c", "a", "b", "c", "a", "b", "c"]);
    }

    #[test]
    fn exploration_is_deterministic_per_seed_and_varies_across_seeds() {
        let agents = [("a", 10), ("b", 10), ("c", 10), ("d", 10)];
        let run = |seed| {
            log_run(
                SimConfig {
                    seed,
                    explore: true,
                    ..SimConfig::default()
                },
                &agents,
            )
        };
        assert_eq!(run(1), run(1));
        let distinct: std::collections::BTreeSet<Vec<(u64, &str)>> = (0..16).map(run).collect();
        assert!(distinct.len() > 1, "exploration never changed the order");
    }

    #[test]
    fn exploration_never_reorders_across_time() {
        let log = log_run(
            SimConfig {
                seed: 3,
                explore: true,
                ..SimConfig::default()
            },
            &[("x", 5), ("y", 7)],
        );
        let times: Vec<u64> = log.iter().map(|e| e.0).collect();
        let mut sorted = times.clone();
        sorted.sort_unstable();
        assert_eq!(times, sorted);
    }

    #[test]
    fn time_limit_stops_the_run() {
        let sim = Sim::new(SimConfig {
            time_limit: SimTime(100),
            ..SimConfig::default()
        });
        let s = sim.clone();
        sim.spawn("sleeper", async move { s.sleep(SimDuration(1_000)).await });
        assert_eq!(
            sim.run(),
            RunOutcome::TimeLimit {
                limit: SimTime(100),
                pending: vec!["sleeper".to_owned()]
            }
        );
        assert_eq!(sim.now(), SimTime(0));
    }

    #[test]
    fn stop_ends_the_run_with_its_reason() {
        let sim = Sim::new(SimConfig::default());
        let s = sim.clone();
        sim.spawn("stopper", async move {
            s.stop("violation");
            s.sleep(SimDuration(5)).await;
        });
        assert_eq!(sim.run(), RunOutcome::Stopped("violation".into()));
    }

    #[test]
    fn jitter_stays_within_bounds_and_is_reproducible() {
        let mk = || {
            Sim::new(SimConfig {
                seed: 9,
                jitter: 0.5,
                ..SimConfig::default()
            })
        };
        let (a, b) = (mk(), mk());
        for _ in 0..100 {
            let x = a.jitter(SimDuration(1_000));
            assert_eq!(x, b.jitter(SimDuration(1_000)));
            assert!((500..=1_500).contains(&x.0));
        }
    }

    #[test]
    fn event_limit_stops_the_run_naming_the_limit() {
        let sim = Sim::new(SimConfig {
            max_events: 5,
            ..SimConfig::default()
        });
        let s = sim.clone();
        sim.spawn("spinner", async move {
            loop {
                s.sleep(SimDuration(1)).await;
            }
        });
        let RunOutcome::Limit(reason) = sim.run() else {
            panic!("expected a limit");
        };
        assert!(reason.contains("event limit"), "{reason}");
        assert_eq!(sim.events_delivered(), 5);
    }

    #[test]
    fn a_sleep_past_the_end_of_the_clock_is_an_overflow_not_a_saturation() {
        let sim = Sim::new(SimConfig {
            time_limit: SimTime(u64::MAX),
            ..SimConfig::default()
        });
        let s = sim.clone();
        sim.spawn("far", async move {
            s.sleep(SimDuration(10)).await;
            s.sleep(SimDuration(u64::MAX)).await;
        });
        let RunOutcome::Limit(reason) = sim.run() else {
            panic!("expected a clock overflow");
        };
        assert!(
            reason.contains("clock overflow") && reason.contains("`far`"),
            "{reason}"
        );
        assert_eq!(sim.now(), SimTime(10));
    }

    #[test]
    fn trace_limit_stops_the_run() {
        let sim = Sim::new(SimConfig {
            max_trace: 3,
            ..SimConfig::default()
        });
        let s = sim.clone();
        sim.spawn("tracer", async move {
            for _ in 0..10 {
                s.trace("x", String::new);
                s.sleep(SimDuration(1)).await;
            }
        });
        assert!(matches!(sim.run(), RunOutcome::Limit(r) if r.contains("trace limit")));
        assert_eq!(sim.take_trace().len(), 3);
    }

    #[test]
    fn watchdog_reason_ends_the_run() {
        let sim = Sim::new(SimConfig {
            watchdog: Some(Watchdog(Rc::new(|| Some("wall time".to_owned())))),
            ..SimConfig::default()
        });
        let s = sim.clone();
        sim.spawn("a", async move { s.sleep(SimDuration(1)).await });
        assert_eq!(sim.run(), RunOutcome::Limit("wall time".to_owned()));
    }

    #[test]
    fn schedule_hash_tells_interleavings_apart() {
        let run = |seed| {
            let sim = Sim::new(SimConfig {
                seed,
                explore: true,
                ..SimConfig::default()
            });
            for name in ["a", "b", "c"] {
                let s = sim.clone();
                sim.spawn(name, async move {
                    for _ in 0..3 {
                        s.sleep(SimDuration(10)).await;
                    }
                });
            }
            assert_eq!(sim.run(), RunOutcome::Completed);
            sim.schedule_hash()
        };
        assert_eq!(run(4), run(4));
        let distinct: std::collections::BTreeSet<u64> = (0..32).map(run).collect();
        assert!(distinct.len() > 8, "only {} interleavings", distinct.len());
    }

    #[test]
    fn exploration_preempts_at_preempt_points_only() {
        // Two agents pass preemption points in turn; without preemption they alternate at time 0. With
        // preemption on, some seeds hold one back so that the other runs several steps in a row.
        let run = |seed, per_256, explore| {
            let sim = Sim::new(SimConfig {
                seed,
                explore,
                preempt_per_256: per_256,
                preempt_max: SimDuration(1_000),
                ..SimConfig::default()
            });
            for name in ["a", "b"] {
                let s = sim.clone();
                sim.spawn(name, async move {
                    for _ in 0..4 {
                        s.preempt_point().await;
                        s.sleep(SimDuration(0)).await;
                    }
                });
            }
            assert_eq!(sim.run(), RunOutcome::Completed);
            (sim.now(), sim.events_delivered())
        };
        assert!((0..16).all(|seed| run(seed, 0, true).0 == SimTime(0)));
        assert!((0..16).any(|seed| run(seed, 128, true).0 > SimTime(0)));
        // Off exploration a preemption point costs nothing: one event per plain sleep (and the spawn).
        assert_eq!(run(0, 128, false), (SimTime(0), 10));
    }
}
