//! Simulated kernel synchronisation: mutex, rw-semaphore (`mmap_lock`), completion and wait queue.
//!
//! They block *simulated* agents, never the host thread. Hand-over is direct: releasing a lock grants it to
//! the first waiter and schedules that waiter at the current time, so a lock is never stolen by an agent that
//! arrives later (FIFO fairness, like the kernel's mutex hand-off and rwsem's queueing).
//!
//! Dropping a lock future while it is queued is not supported: agents never abandon a wait.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use crate::engine::{Sim, TaskId};

/// A waiter: the agent and the flag the releaser sets when it hands the resource over.
struct Waiter {
    task: TaskId,
    granted: Rc<Cell<bool>>,
}

// ---------------------------------------------------------------------------------------------- mutex

#[derive(Default)]
struct MutexState {
    locked: bool,
    waiters: VecDeque<Waiter>,
}

/// A sleeping mutex (`struct mutex`) for simulated agents.
#[derive(Clone)]
pub struct SimMutex {
    sim: Sim,
    name: &'static str,
    state: Rc<RefCell<MutexState>>,
}

impl fmt::Debug for SimMutex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimMutex")
            .field("name", &self.name)
            .field("locked", &self.is_locked())
            .finish_non_exhaustive()
    }
}

impl SimMutex {
    /// Creates an unlocked mutex; `name` appears in traces.
    pub fn new(sim: &Sim, name: &'static str) -> Self {
        Self {
            sim: sim.clone(),
            name,
            state: Rc::default(),
        }
    }

    /// Returns whether the mutex is held.
    pub fn is_locked(&self) -> bool {
        self.state.borrow().locked
    }

    /// Returns a future that acquires the mutex, waiting in FIFO order.
    pub fn lock(&self) -> MutexLock {
        MutexLock {
            mutex: self.clone(),
            granted: None,
        }
    }

    /// Acquires the mutex only if it is free (`mutex_trylock`).
    pub fn try_lock(&self) -> Option<MutexGuard> {
        let mut st = self.state.borrow_mut();
        if st.locked {
            return None;
        }
        st.locked = true;
        Some(MutexGuard {
            mutex: self.clone(),
        })
    }

    /// Acquires the mutex, waiting if `may_block`, else only if it is free: what an MMU-notifier callback
    /// does with its driver lock (`mutex_lock` for a blockable range, `mutex_trylock` otherwise). `None`
    /// when it would have to wait and may not.
    pub async fn lock_if_blockable(&self, may_block: bool) -> Option<MutexGuard> {
        if may_block {
            Some(self.lock().await)
        } else {
            self.try_lock()
        }
    }

    fn unlock(&self) {
        let next = {
            let mut st = self.state.borrow_mut();
            let next = st.waiters.pop_front();
            if next.is_none() {
                st.locked = false;
            }
            next
        };
        if let Some(w) = next {
            w.granted.set(true);
            self.sim.wake(w.task);
        }
    }
}

/// The future of [`SimMutex::lock`].
pub struct MutexLock {
    mutex: SimMutex,
    granted: Option<Rc<Cell<bool>>>,
}

impl fmt::Debug for MutexLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MutexLock")
            .field("mutex", &self.mutex.name)
            .finish_non_exhaustive()
    }
}

impl Future for MutexLock {
    type Output = MutexGuard;

    fn poll(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<MutexGuard> {
        if let Some(g) = &self.granted {
            return if g.get() {
                Poll::Ready(MutexGuard {
                    mutex: self.mutex.clone(),
                })
            } else {
                Poll::Pending
            };
        }
        let mut st = self.mutex.state.borrow_mut();
        if !st.locked {
            st.locked = true;
            drop(st);
            return Poll::Ready(MutexGuard {
                mutex: self.mutex.clone(),
            });
        }
        let granted = Rc::new(Cell::new(false));
        st.waiters.push_back(Waiter {
            task: self.mutex.sim.current(),
            granted: granted.clone(),
        });
        drop(st);
        self.granted = Some(granted);
        Poll::Pending
    }
}

/// Holds a [`SimMutex`]; dropping it unlocks and hands the mutex to the first waiter.
pub struct MutexGuard {
    mutex: SimMutex,
}

impl fmt::Debug for MutexGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MutexGuard")
            .field("mutex", &self.mutex.name)
            .finish_non_exhaustive()
    }
}

impl Drop for MutexGuard {
    fn drop(&mut self) {
        self.mutex.unlock();
    }
}

// ---------------------------------------------------------------------------------------------- rwsem

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Read,
    Write,
}

#[derive(Default)]
struct RwState {
    readers: u32,
    writer: bool,
    waiters: VecDeque<(Kind, Waiter)>,
}

/// A read-write semaphore (`struct rw_semaphore`), the model of `mmap_lock`.
///
/// Rules (kernel/locking/rwsem.c, simplified): a reader gets the lock at once only when no writer holds it
/// and nobody is queued (so queued writers are not starved); a writer when nobody holds it and nobody is
/// queued. On release the queue head is granted: a writer alone, or the run of consecutive readers at the head.
#[derive(Clone)]
pub struct RwSem {
    sim: Sim,
    name: &'static str,
    state: Rc<RefCell<RwState>>,
}

impl fmt::Debug for RwSem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.state.borrow();
        f.debug_struct("RwSem")
            .field("name", &self.name)
            .field("readers", &st.readers)
            .field("writer", &st.writer)
            .finish_non_exhaustive()
    }
}

impl RwSem {
    /// Creates an unlocked semaphore.
    pub fn new(sim: &Sim, name: &'static str) -> Self {
        Self {
            sim: sim.clone(),
            name,
            state: Rc::default(),
        }
    }

    /// Returns a future that takes the semaphore for reading (`down_read`).
    pub fn read(&self) -> RwLockFuture<ReadGuard> {
        RwLockFuture {
            sem: self.clone(),
            kind: Kind::Read,
            granted: None,
            _guard: std::marker::PhantomData,
        }
    }

    /// Returns a future that takes the semaphore for writing (`down_write`).
    pub fn write(&self) -> RwLockFuture<WriteGuard> {
        RwLockFuture {
            sem: self.clone(),
            kind: Kind::Write,
            granted: None,
            _guard: std::marker::PhantomData,
        }
    }

    /// Returns whether anyone holds the semaphore for writing.
    pub fn is_write_locked(&self) -> bool {
        self.state.borrow().writer
    }

    /// Returns the number of readers holding the semaphore.
    pub fn readers(&self) -> u32 {
        self.state.borrow().readers
    }

    fn release(&self, kind: Kind) {
        let mut woken = Vec::new();
        {
            let mut st = self.state.borrow_mut();
            match kind {
                Kind::Read => st.readers -= 1,
                Kind::Write => st.writer = false,
            }
            if st.readers == 0 && !st.writer {
                match st.waiters.front().map(|(k, _)| *k) {
                    Some(Kind::Write) => {
                        let (_, w) = st.waiters.pop_front().expect("front exists");
                        st.writer = true;
                        woken.push(w);
                    }
                    Some(Kind::Read) => {
                        while st.waiters.front().is_some_and(|(k, _)| *k == Kind::Read) {
                            let (_, w) = st.waiters.pop_front().expect("front exists");
                            st.readers += 1;
                            woken.push(w);
                        }
                    }
                    None => {}
                }
            }
        }
        for w in woken {
            w.granted.set(true);
            self.sim.wake(w.task);
        }
    }
}

/// Converts a granted semaphore into its guard type.
pub trait RwGuard: Sized {
    /// Creates the guard for `sem`.
    #[doc(hidden)]
    fn make(sem: RwSem) -> Self;
}

/// Holds an [`RwSem`] for reading.
pub struct ReadGuard {
    sem: RwSem,
}

/// Holds an [`RwSem`] for writing.
pub struct WriteGuard {
    sem: RwSem,
}

impl RwGuard for ReadGuard {
    fn make(sem: RwSem) -> Self {
        Self { sem }
    }
}

impl RwGuard for WriteGuard {
    fn make(sem: RwSem) -> Self {
        Self { sem }
    }
}

impl fmt::Debug for ReadGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ReadGuard({})", self.sem.name)
    }
}

impl fmt::Debug for WriteGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WriteGuard({})", self.sem.name)
    }
}

impl Drop for ReadGuard {
    fn drop(&mut self) {
        self.sem.release(Kind::Read);
    }
}

impl Drop for WriteGuard {
    fn drop(&mut self) {
        self.sem.release(Kind::Write);
    }
}

impl WriteGuard {
    /// Turns the write hold into a read hold without letting a writer in between (`downgrade_write`),
    /// and grants the readers queued at the head.
    pub fn downgrade(self) -> ReadGuard {
        let sem = self.sem.clone();
        std::mem::forget(self);
        let mut woken = Vec::new();
        {
            let mut st = sem.state.borrow_mut();
            st.writer = false;
            st.readers += 1;
            while st.waiters.front().is_some_and(|(k, _)| *k == Kind::Read) {
                let (_, w) = st.waiters.pop_front().expect("front exists");
                st.readers += 1;
                woken.push(w);
            }
        }
        for w in woken {
            w.granted.set(true);
            sem.sim.wake(w.task);
        }
        ReadGuard { sem }
    }
}

/// The future of [`RwSem::read`] and [`RwSem::write`].
pub struct RwLockFuture<G> {
    sem: RwSem,
    kind: Kind,
    granted: Option<Rc<Cell<bool>>>,
    _guard: std::marker::PhantomData<fn() -> G>,
}

impl<G> fmt::Debug for RwLockFuture<G> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RwLockFuture({}, {:?})", self.sem.name, self.kind)
    }
}

impl<G: RwGuard> Future for RwLockFuture<G> {
    type Output = G;

    fn poll(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<G> {
        if let Some(g) = &self.granted {
            return if g.get() {
                Poll::Ready(G::make(self.sem.clone()))
            } else {
                Poll::Pending
            };
        }
        let mut st = self.sem.state.borrow_mut();
        let free = match self.kind {
            Kind::Read => !st.writer && st.waiters.is_empty(),
            Kind::Write => !st.writer && st.readers == 0 && st.waiters.is_empty(),
        };
        if free {
            match self.kind {
                Kind::Read => st.readers += 1,
                Kind::Write => st.writer = true,
            }
            drop(st);
            return Poll::Ready(G::make(self.sem.clone()));
        }
        let granted = Rc::new(Cell::new(false));
        let kind = self.kind;
        st.waiters.push_back((
            kind,
            Waiter {
                task: self.sem.sim.current(),
                granted: granted.clone(),
            },
        ));
        drop(st);
        self.granted = Some(granted);
        Poll::Pending
    }
}

// ---------------------------------------------------------------------------------------------- completion

#[derive(Default)]
struct CompletionState {
    done: u64,
    all: bool,
    waiters: VecDeque<Waiter>,
}

/// A `struct completion`: `complete` releases one waiter (or banks one release), `complete_all` every waiter,
/// now and later.
#[derive(Clone)]
pub struct Completion {
    sim: Sim,
    state: Rc<RefCell<CompletionState>>,
}

impl fmt::Debug for Completion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.state.borrow();
        f.debug_struct("Completion")
            .field("done", &st.done)
            .field("all", &st.all)
            .finish_non_exhaustive()
    }
}

impl Completion {
    /// Creates a completion nobody has completed.
    pub fn new(sim: &Sim) -> Self {
        Self {
            sim: sim.clone(),
            state: Rc::default(),
        }
    }

    /// Releases one waiter, or lets the next `wait` pass at once.
    pub fn complete(&self) {
        let w = {
            let mut st = self.state.borrow_mut();
            let w = st.waiters.pop_front();
            if w.is_none() {
                st.done += 1;
            }
            w
        };
        if let Some(w) = w {
            w.granted.set(true);
            self.sim.wake(w.task);
        }
    }

    /// Releases every waiter, and every later `wait` passes at once.
    pub fn complete_all(&self) {
        let ws: Vec<Waiter> = {
            let mut st = self.state.borrow_mut();
            st.all = true;
            st.waiters.drain(..).collect()
        };
        for w in ws {
            w.granted.set(true);
            self.sim.wake(w.task);
        }
    }

    /// Returns whether `complete_all` was called.
    pub fn is_done(&self) -> bool {
        self.state.borrow().all
    }

    /// Returns a future that waits for the completion (`wait_for_completion`).
    pub fn wait(&self) -> CompletionWait {
        CompletionWait {
            c: self.clone(),
            granted: None,
        }
    }
}

/// The future of [`Completion::wait`].
pub struct CompletionWait {
    c: Completion,
    granted: Option<Rc<Cell<bool>>>,
}

impl fmt::Debug for CompletionWait {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CompletionWait")
    }
}

impl Future for CompletionWait {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<()> {
        if let Some(g) = &self.granted {
            return if g.get() {
                Poll::Ready(())
            } else {
                Poll::Pending
            };
        }
        let mut st = self.c.state.borrow_mut();
        if st.all {
            return Poll::Ready(());
        }
        if st.done > 0 {
            st.done -= 1;
            return Poll::Ready(());
        }
        let granted = Rc::new(Cell::new(false));
        st.waiters.push_back(Waiter {
            task: self.c.sim.current(),
            granted: granted.clone(),
        });
        drop(st);
        self.granted = Some(granted);
        Poll::Pending
    }
}

// ---------------------------------------------------------------------------------------------- wait queue

/// A wait queue (`wait_queue_head_t`): agents sleep until a condition holds; whoever changes the condition
/// calls [`WaitQueue::wake_up_all`], and each woken agent re-checks its condition (`wait_event`).
#[derive(Clone)]
pub struct WaitQueue {
    sim: Sim,
    waiters: Rc<RefCell<Vec<TaskId>>>,
}

impl fmt::Debug for WaitQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WaitQueue")
            .field("waiters", &self.waiters.borrow().len())
            .finish_non_exhaustive()
    }
}

impl WaitQueue {
    /// Creates an empty wait queue.
    pub fn new(sim: &Sim) -> Self {
        Self {
            sim: sim.clone(),
            waiters: Rc::default(),
        }
    }

    /// Wakes every sleeping agent, in the order they went to sleep.
    pub fn wake_up_all(&self) {
        let ws: Vec<TaskId> = self.waiters.borrow_mut().drain(..).collect();
        for w in ws {
            self.sim.wake(w);
        }
    }

    /// Returns the number of sleeping agents.
    pub fn len(&self) -> usize {
        self.waiters.borrow().len()
    }

    /// Returns whether no agent sleeps here.
    pub fn is_empty(&self) -> bool {
        self.waiters.borrow().is_empty()
    }

    /// Returns a future that completes once `cond_fn` returns true (checked now and after every wake-up).
    pub fn wait_event<F: FnMut() -> bool>(&self, cond_fn: F) -> WaitEvent<F> {
        WaitEvent {
            wq: self.clone(),
            cond_fn,
        }
    }
}

/// The future of [`WaitQueue::wait_event`].
pub struct WaitEvent<F> {
    wq: WaitQueue,
    cond_fn: F,
}

impl<F> fmt::Debug for WaitEvent<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WaitEvent")
    }
}

impl<F: FnMut() -> bool + Unpin> Future for WaitEvent<F> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<()> {
        if (self.cond_fn)() {
            return Poll::Ready(());
        }
        let me = self.wq.sim.current();
        let mut ws = self.wq.waiters.borrow_mut();
        if !ws.contains(&me) {
            ws.push(me);
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
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
}
