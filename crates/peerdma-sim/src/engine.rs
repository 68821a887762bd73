//! The executor: virtual clock, event queue and tasks.

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use peerdma_core::{SimDuration, SimTime};

use crate::rng::RngStream;
use crate::trace::{Metrics, TraceEvent};

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
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            explore: false,
            jitter: 0.0,
            time_limit: SimTime(60_000_000_000),
            trace: true,
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
    TimeLimit,
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
    trace: Vec<TraceEvent>,
    metrics: Metrics,
    events: u64,
}

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
                trace: Vec::new(),
                metrics: Metrics::default(),
                events: 0,
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

    /// Records a trace event attributed to the current agent.
    pub fn trace(&self, kind: &'static str, detail: impl FnOnce() -> String) {
        let mut inner = self.inner.borrow_mut();
        if !inner.cfg.trace {
            return;
        }
        let agent = inner
            .current
            .map_or_else(|| "engine".to_owned(), |c| inner.tasks[c].name.clone());
        let time = inner.now;
        inner.trace.push(TraceEvent {
            time,
            agent,
            kind,
            detail: detail(),
        });
    }

    /// Adds `n` to the metric counter `name`.
    pub fn count(&self, name: &str, n: u64) {
        self.inner.borrow_mut().metrics.add(name, n);
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

    /// Runs until every agent finishes, a deadlock, the time limit, or [`Sim::stop`].
    pub fn run(&self) -> RunOutcome {
        loop {
            if let Some(reason) = self.stopped() {
                return RunOutcome::Stopped(reason);
            }
            match self.next_event() {
                NextEvent::Task(id) => self.poll_task(id),
                NextEvent::PastLimit => return RunOutcome::TimeLimit,
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

impl Inner {
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
        let at = inner.now + self.dur;
        inner.schedule(id, at);
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
        assert_eq!(sim.run(), RunOutcome::TimeLimit);
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
}
