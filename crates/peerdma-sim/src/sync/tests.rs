//! Unit tests of the parent module.

use std::cell::RefCell;
use std::rc::Rc;

use peerdma_core::SimDuration;

use super::*;
use crate::engine::{RunOutcome, SimConfig};

type Log = Rc<RefCell<Vec<String>>>;

fn push(log: &Log, s: impl Into<String>) {
    log.borrow_mut().push(s.into());
}

#[test]
fn mutex_excludes_and_hands_over_in_fifo_order() {
    let sim = Sim::new(SimConfig::default());
    let m = SimMutex::new(&sim, "m");
    let log: Log = Rc::default();
    for name in ["a", "b", "c"] {
        let (s, m, l) = (sim.clone(), m.clone(), log.clone());
        sim.spawn(name, async move {
            let g = m.lock().await;
            push(&l, format!("{name}+"));
            s.sleep(SimDuration(10)).await;
            push(&l, format!("{name}-"));
            drop(g);
        });
    }
    assert_eq!(sim.run(), RunOutcome::Completed);
    assert_eq!(*log.borrow(), ["a+", "a-", "b+", "b-", "c+", "c-"]);
    assert_eq!(sim.now().0, 30);
}

/// A non-blockable invalidation gives up on a held lock; a blockable one waits for it.
#[test]
fn lock_if_blockable_waits_only_when_it_may_block() {
    let sim = Sim::new(SimConfig::default());
    let m = SimMutex::new(&sim, "m");
    let log: Log = Rc::default();
    let (s, m1) = (sim.clone(), m.clone());
    sim.spawn("holder", async move {
        let g = m1.lock().await;
        s.sleep(SimDuration(10)).await;
        drop(g);
    });
    let (s, m2, l) = (sim.clone(), m.clone(), log.clone());
    sim.spawn("notifier", async move {
        push(
            &l,
            format!("try:{}", m2.lock_if_blockable(false).await.is_some()),
        );
        let g = m2.lock_if_blockable(true).await;
        push(&l, format!("wait:{}@{}", g.is_some(), s.now().0));
    });
    assert_eq!(sim.run(), RunOutcome::Completed);
    assert_eq!(*log.borrow(), ["try:false", "wait:true@10"]);
}

#[test]
fn try_lock_fails_while_held() {
    let sim = Sim::new(SimConfig::default());
    let m = SimMutex::new(&sim, "m");
    let g = m.try_lock().unwrap();
    assert!(m.try_lock().is_none());
    drop(g);
    assert!(m.try_lock().is_some());
}

#[test]
fn rwsem_readers_share_and_writer_excludes() {
    let sim = Sim::new(SimConfig::default());
    let sem = RwSem::new(&sim, "mmap_lock");
    let log: Log = Rc::default();
    let spawn_reader = |name: &'static str, start: u64| {
        let (s, sem, l) = (sim.clone(), sem.clone(), log.clone());
        sim.spawn(name, async move {
            s.sleep(SimDuration(start)).await;
            let g = sem.read().await;
            push(&l, format!("{name}+{}", s.now().0));
            s.sleep(SimDuration(10)).await;
            drop(g);
        });
    };
    spawn_reader("r1", 0);
    spawn_reader("r2", 1);
    {
        let (s, sem, l) = (sim.clone(), sem.clone(), log.clone());
        sim.spawn("w", async move {
            s.sleep(SimDuration(2)).await;
            let g = sem.write().await;
            push(&l, format!("w+{}", s.now().0));
            s.sleep(SimDuration(10)).await;
            drop(g);
        });
    }
    // r3 arrives while the writer is queued: it must wait behind the writer (no writer starvation).
    spawn_reader("r3", 3);
    assert_eq!(sim.run(), RunOutcome::Completed);
    assert_eq!(*log.borrow(), ["r1+0", "r2+1", "w+11", "r3+21"]);
}

#[test]
fn rwsem_downgrade_admits_queued_readers_but_not_writers() {
    let sim = Sim::new(SimConfig::default());
    let sem = RwSem::new(&sim, "s");
    let log: Log = Rc::default();
    {
        let (s, sem, l) = (sim.clone(), sem.clone(), log.clone());
        sim.spawn("w", async move {
            let g = sem.write().await;
            s.sleep(SimDuration(10)).await;
            let r = g.downgrade();
            push(&l, "downgraded");
            s.sleep(SimDuration(10)).await;
            drop(r);
        });
    }
    {
        let (s, sem, l) = (sim.clone(), sem.clone(), log.clone());
        sim.spawn("r", async move {
            s.sleep(SimDuration(1)).await;
            let _g = sem.read().await;
            push(&l, format!("r+{}", s.now().0));
        });
    }
    assert_eq!(sim.run(), RunOutcome::Completed);
    assert_eq!(*log.borrow(), ["downgraded", "r+10"]);
}

/// A downgraded write hold gives its reference to the semaphore back: nothing of the simulation outlives
/// its last handle (`mem::forget` of the guard leaked the semaphore, and through it the engine, on every
/// munmap).
#[test]
fn rwsem_downgrade_leaks_nothing() {
    let sim = Sim::new(SimConfig::default());
    let sem = RwSem::new(&sim, "s");
    let watch = Rc::downgrade(&sem.state);
    {
        let sem = sem.clone();
        sim.spawn("d", async move {
            let g = sem.write().await;
            drop(g.downgrade());
        });
    }
    {
        let (s, sem) = (sim.clone(), sem.clone());
        sim.spawn("w", async move {
            s.sleep(SimDuration(1)).await;
            let _w = sem.write().await;
        });
    }
    assert_eq!(
        sim.run(),
        RunOutcome::Completed,
        "the write lock is free again"
    );
    drop((sem, sim));
    assert!(
        watch.upgrade().is_none(),
        "the semaphore (and the engine it holds) leaked"
    );
}

#[test]
fn completion_banks_and_releases() {
    let sim = Sim::new(SimConfig::default());
    let c = Completion::new(&sim);
    let log: Log = Rc::default();
    for name in ["w1", "w2"] {
        let (s, c, l) = (sim.clone(), c.clone(), log.clone());
        sim.spawn(name, async move {
            c.wait().await;
            push(&l, format!("{name}@{}", s.now().0));
        });
    }
    {
        let (s, c) = (sim.clone(), c.clone());
        sim.spawn("completer", async move {
            s.sleep(SimDuration(5)).await;
            c.complete();
            s.sleep(SimDuration(5)).await;
            c.complete_all();
        });
    }
    assert_eq!(sim.run(), RunOutcome::Completed);
    assert_eq!(*log.borrow(), ["w1@5", "w2@10"]);
    assert!(c.is_done());
}

#[test]
fn wait_queue_rechecks_its_condition() {
    let sim = Sim::new(SimConfig::default());
    let wq = WaitQueue::new(&sim);
    let flag = Rc::new(Cell::new(0u32));
    let log: Log = Rc::default();
    {
        let (s, wq, f, l) = (sim.clone(), wq.clone(), flag.clone(), log.clone());
        sim.spawn("waiter", async move {
            wq.wait_event(|| f.get() >= 2).await;
            push(&l, format!("passed@{}", s.now().0));
        });
    }
    {
        let (s, wq, f) = (sim.clone(), wq.clone(), flag.clone());
        sim.spawn("waker", async move {
            for _ in 0..2 {
                s.sleep(SimDuration(7)).await;
                f.set(f.get() + 1);
                wq.wake_up_all();
            }
        });
    }
    assert_eq!(sim.run(), RunOutcome::Completed);
    assert_eq!(*log.borrow(), ["passed@14"]);
}

#[test]
fn lock_cycle_is_reported_as_deadlock() {
    let sim = Sim::new(SimConfig::default());
    let (a, b) = (SimMutex::new(&sim, "a"), SimMutex::new(&sim, "b"));
    for (name, first, second) in [("t1", a.clone(), b.clone()), ("t2", b, a)] {
        let s = sim.clone();
        sim.spawn(name, async move {
            let _g1 = first.lock().await;
            s.sleep(SimDuration(1)).await;
            let _g2 = second.lock().await;
        });
    }
    assert_eq!(
        sim.run(),
        RunOutcome::Deadlock {
            blocked: vec!["t1".into(), "t2".into()]
        }
    );
}
