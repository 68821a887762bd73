//! The executor: virtual clock, event queue and tasks.

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
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
    /// The events due at `now` not yet delivered, by sequence number (oldest first): taken from `queue` in
    /// one go when time advances, and joined by events scheduled for `now` while they are delivered, so that
    /// exploration picks among them by index instead of emptying and refilling the heap for every event.
    ready: VecDeque<(u64, usize)>,
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
    /// Set by [`Sim::shutdown`]: the run is over, an agent spawned from now on is dropped at once.
    shut_down: bool,
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
                ready: VecDeque::new(),
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
                shut_down: false,
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
        if inner.shut_down {
            // A destructor that hands work on to an agent (a released mirror's unregister) after the run:
            // nothing runs any more, and the agent's future would hold the model in a cycle with the
            // engine. Dropped outside the borrow: its destructor may reach the engine.
            inner.tasks.push(Task {
                name: name.into(),
                future: None,
                scheduled: false,
                done: true,
            });
            drop(inner);
            drop(future);
            return TaskId(id);
        }
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

    /// Drops every agent's future, the pending ones included, and every queued event: the run is over for
    /// good. An agent's future holds `Rc`s of the model (the kernel, its devices, this engine), so an agent
    /// still pending when a run ends (a device's worker loop, a thread blocked at a deadlock, every agent of
    /// a stopped run) would otherwise keep the whole simulation alive in a reference cycle with the engine;
    /// a process running many seeds would leak one simulation per seed. Call it once the report is taken:
    /// from then on an agent spawned (by a destructor) is dropped at once.
    pub fn shutdown(&self) {
        let futures: Vec<BoxFuture> = {
            let mut inner = self.inner.borrow_mut();
            inner.shut_down = true;
            inner.queue.clear();
            inner.ready.clear();
            inner.progress = None;
            inner
                .tasks
                .iter_mut()
                .filter_map(|t| t.future.take())
                .collect()
        };
        // Dropped outside the borrow: a future's destructor may reach the engine, even spawn an agent (a
        // guard that hands its work on), which `shut_down` drops at once.
        drop(futures);
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
        if inner.ready.is_empty() {
            // Time advances: every event due at the next instant becomes ready, in sequence order.
            let Some(&Reverse((time, _, _))) = inner.queue.peek() else {
                return NextEvent::Empty;
            };
            if time > inner.cfg.time_limit {
                return NextEvent::PastLimit;
            }
            while let Some(&Reverse((t, s, i))) = inner.queue.peek() {
                if t != time {
                    break;
                }
                inner.queue.pop();
                inner.ready.push_back((s, i));
            }
            inner.now = time;
        }
        // Without exploration the oldest ready event runs; with it, one of them at random (the others keep
        // their relative order).
        let pick = if inner.cfg.explore {
            let n = inner.ready.len() as u64;
            usize::try_from(inner.explore_rng.below(n)).expect("index below the ready count")
        } else {
            0
        };
        let (_, chosen) = inner
            .ready
            .remove(pick)
            .expect("a ready event at the picked index");
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
        if at == self.now && !self.ready.is_empty() {
            // Due at the instant being delivered: it joins the ready events (the newest, so last).
            self.ready.push_back((seq, id));
        } else {
            self.queue.push(Reverse((at, seq, id)));
        }
    }
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

mod observe;

pub use observe::{Flow, Span};

#[cfg(test)]
mod tests;
