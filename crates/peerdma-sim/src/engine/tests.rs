//! Unit tests of the engine.

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

/// An agent still pending when a run ends holds the engine (and whatever it captured) in a reference
/// cycle; `shutdown` drops it, so the engine and the agent's state are freed with the last handle.
#[test]
fn shutdown_frees_what_a_pending_agent_holds() {
    let sim = Sim::new(SimConfig::default());
    let state = Rc::new(RefCell::new(0u32));
    let watch = Rc::downgrade(&state);
    let engine = Rc::downgrade(&sim.inner);
    let s = sim.clone();
    sim.spawn("stuck", async move {
        *state.borrow_mut() += 1;
        let _keep = (&s, &state);
        std::future::pending::<()>().await;
    });
    assert!(matches!(sim.run(), RunOutcome::Deadlock { .. }));
    sim.shutdown();
    drop(sim);
    assert!(watch.upgrade().is_none(), "the agent's state leaked");
    assert!(engine.upgrade().is_none(), "the engine leaked");
}

/// A pending agent's future may spawn another agent when dropped (a guard that hands its work on); that
/// agent is dropped by `shutdown` too, or it would hold the engine and what it captured in a cycle.
#[test]
fn shutdown_frees_an_agent_spawned_while_dropping_another() {
    struct SpawnOnDrop(Sim, Rc<RefCell<u32>>);
    impl Drop for SpawnOnDrop {
        fn drop(&mut self) {
            let (s, state) = (self.0.clone(), self.1.clone());
            self.0.spawn("handed-on", async move {
                let _keep = (&s, &state);
                std::future::pending::<()>().await;
            });
        }
    }
    let sim = Sim::new(SimConfig::default());
    let state = Rc::new(RefCell::new(0u32));
    let watch = Rc::downgrade(&state);
    let guard = SpawnOnDrop(sim.clone(), state);
    sim.spawn("stuck", async move {
        let _guard = guard;
        std::future::pending::<()>().await;
    });
    assert!(matches!(sim.run(), RunOutcome::Deadlock { .. }));
    sim.shutdown();
    // A destructor that runs after the shutdown (the model's last handles dropped) and spawns: dropped too.
    let late = Rc::new(RefCell::new(0u32));
    let late_watch = Rc::downgrade(&late);
    drop(SpawnOnDrop(sim.clone(), late));
    drop(sim);
    assert!(
        watch.upgrade().is_none(),
        "the handed-on agent's state leaked"
    );
    assert!(
        late_watch.upgrade().is_none(),
        "the agent spawned after shutdown leaked"
    );
}
