//! The deterministic discrete-event engine every peerdma simulation runs on.
//!
//! # Execution model
//! A simulation is one thread. *Agents* (CPU threads, device engines, kernel workers) are Rust futures run by
//! this crate's own executor ([`Sim`]); a future is polled only when the engine delivers an event for it, and
//! every wake-up is an event in one queue ordered by `(virtual time, sequence number)`. The futures never use
//! the `Waker` they are given: the simulated primitives ([`sleep`](Sim::sleep), [`SimMutex`], [`RwSem`],
//! [`Completion`], [`WaitQueue`]) record the waiting agent's [`TaskId`] and schedule it themselves. So:
//! 1. time advances only between events, to the time of the next event;
//! 2. two events at the same time run in the order they were scheduled (the sequence number), or, with
//!    exploration on, in an order drawn from the seeded RNG — this is how schedules are searched;
//! 3. every `.await` on a primitive is a point where other agents can run, exactly like a sleeping or
//!    preempted kernel thread; code between two awaits is atomic with respect to other agents.
//!
//! Model state is plain data behind `Rc<RefCell<..>>`; no borrow may be held across an `.await`.
//! Nothing here reads the wall clock or a global RNG, so the same seed gives the same run, byte for byte.

mod engine;
mod rng;
mod stats;
mod sync;
mod trace;

pub use engine::{DEFAULT_TRACE_CAP, Flow, RunOutcome, Sim, SimConfig, Span, TaskId, Watchdog};
pub use rng::{RngStream, stream_seed};
pub use stats::{SERIES_CAP, Series, Stats, Transfer};
pub use sync::{Completion, MutexGuard, ReadGuard, RwSem, SimMutex, WaitQueue, WriteGuard};
pub use trace::{Metrics, Phase, TraceArg, TraceArgs, TraceEvent, Track};
