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
    /// Set by [`WriteGuard::downgrade`]: the hold became a read hold, so dropping releases nothing.
    downgraded: bool,
}

impl RwGuard for ReadGuard {
    fn make(sem: RwSem) -> Self {
        Self { sem }
    }
}

impl RwGuard for WriteGuard {
    fn make(sem: RwSem) -> Self {
        Self {
            sem,
            downgraded: false,
        }
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
        if self.downgraded {
            return;
        }
        self.sem.release(Kind::Write);
    }
}

impl WriteGuard {
    /// Turns the write hold into a read hold without letting a writer in between (`downgrade_write`),
    /// and grants the readers queued at the head.
    pub fn downgrade(self) -> ReadGuard {
        // Not `mem::forget(self)`: that would leak the guard's reference to the semaphore (and, through
        // it, the whole simulation).
        let mut this = self;
        this.downgraded = true;
        let sem = this.sem.clone();
        drop(this);
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
mod tests;
