//! The one parallel runner: many independent jobs (a scenario with some parameters and a seed) on `J` worker
//! threads, their results handed back in job order, so that what a batch prints is the same bytes whatever
//! `J` and however the jobs are split into shards across machines.
//!
//! This is host-side tooling, not a model of a kernel mechanism: each run is a whole simulation with its own
//! engine (`peerdma_sim::Sim`) and world, built and dropped inside one worker thread, so the runs share
//! nothing and each stays deterministic. Parallelism only changes when a result is computed, never what it
//! is; [`run_ordered`] reorders results before handing them out.
//!
//! Used by `peerdma sweep` ([`crate::sweep`]) and by multi-seed exploration. Sharding ([`Shard`]) splits a
//! job list into contiguous blocks, so that the shards' outputs concatenated in shard order equal the
//! unsharded output byte for byte.
//!
//! # Examples
//! ```
//! use std::num::NonZeroUsize;
//! use peerdma_scenario::batch::run_ordered;
//!
//! let jobs: Vec<u64> = (0..10).collect();
//! let mut out = Vec::new();
//! run_ordered(&jobs, NonZeroUsize::new(3).unwrap(), |_, j| j * j, |i, r| out.push((i, r)));
//! assert_eq!(out, (0..10).map(|i| (i as usize, i * i)).collect::<Vec<_>>());
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::num::NonZeroUsize;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, PoisonError, mpsc};

/// Runs `work(index, job)` for every job on `workers` threads and calls `emit(index, result)` on the
/// calling thread for each result **in job order** (index 0 first), as soon as every earlier result has
/// been emitted. With one worker the jobs run on the calling thread, one after the other.
///
/// Workers take the next job index from a shared counter, so a slow job does not hold up the others.
pub fn run_ordered<J, R, W, E>(jobs: &[J], workers: NonZeroUsize, work: W, mut emit: E)
where
    J: Sync,
    R: Send,
    W: Fn(usize, &J) -> R + Sync,
    E: FnMut(usize, R),
{
    run_indexed_until(
        jobs.len(),
        workers,
        |i| work(i, &jobs[i]),
        |i, r| {
            emit(i, r);
            true
        },
    );
}

/// How far past the next result to emit a worker may start jobs, in multiples of the worker count: enough
/// that workers never wait when jobs take similar times, and a bound on the results held for reordering
/// (and on the work thrown away after a stop) when one job is much slower than the others.
const RUN_AHEAD_PER_WORKER: usize = 4;

/// Runs `work(i)` for `i` in `0..count` on `workers` threads and calls `emit(i, result)` on the calling
/// thread in index order, until `emit` returns `false`: then no further index is started, and results
/// computed past the stopping one are dropped. What `emit` sees is the same whatever `workers` is.
///
/// The workers live for the whole batch and take the next index from a shared counter, so there is no
/// barrier between groups of jobs; a worker only waits when it is `4 × workers` jobs ahead of the next
/// result to emit (a slow job holds the others' results), which bounds the reorder buffer and the work
/// discarded after a stop.
pub fn run_indexed_until<R, W, E>(count: usize, workers: NonZeroUsize, work: W, mut emit: E)
where
    R: Send,
    W: Fn(usize) -> R + Sync,
    E: FnMut(usize, R) -> bool,
{
    let workers = workers.get().min(count.max(1));
    if workers == 1 {
        for i in 0..count {
            if !emit(i, work(i)) {
                return;
            }
        }
        return;
    }
    let window = workers.saturating_mul(RUN_AHEAD_PER_WORKER);
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    // The number of results emitted so far; workers wait on it when too far ahead.
    let emitted = (Mutex::new(0usize), Condvar::new());
    let (tx, rx) = mpsc::channel::<(usize, R)>();
    std::thread::scope(|s| {
        for _ in 0..workers {
            let tx = tx.clone();
            let (next, stop, work, emitted) = (&next, &stop, &work, &emitted);
            s.spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        break;
                    }
                    let (lock, cv) = emitted;
                    let mut done = lock.lock().unwrap_or_else(PoisonError::into_inner);
                    while !stop.load(Ordering::Relaxed) && i >= done.saturating_add(window) {
                        done = cv.wait(done).unwrap_or_else(PoisonError::into_inner);
                    }
                    drop(done);
                    if stop.load(Ordering::Relaxed) || tx.send((i, work(i))).is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx);
        let mut pending: BTreeMap<usize, R> = BTreeMap::new();
        let mut due = 0;
        for (i, r) in rx {
            if stop.load(Ordering::Relaxed) {
                // Drain what the workers still send, so that they all end.
                continue;
            }
            pending.insert(i, r);
            while let Some(r) = pending.remove(&due) {
                if !emit(due, r) {
                    stop.store(true, Ordering::Relaxed);
                    pending.clear();
                    break;
                }
                due += 1;
            }
            let (lock, cv) = &emitted;
            *lock.lock().unwrap_or_else(PoisonError::into_inner) = due;
            cv.notify_all();
        }
    });
}

/// Returns every result of [`run_ordered`] in a vector, in job order.
pub fn map_ordered<J, R, W>(jobs: &[J], workers: NonZeroUsize, work: W) -> Vec<R>
where
    J: Sync,
    R: Send,
    W: Fn(usize, &J) -> R + Sync,
{
    let mut out = Vec::with_capacity(jobs.len());
    run_ordered(jobs, workers, work, |_, r| out.push(r));
    out
}

/// Returns the default number of workers: the host's available parallelism (1 when unknown).
pub fn default_workers() -> NonZeroUsize {
    std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN)
}

/// One of `count` shards of a job list (`--shard i/n`, `index` counted from 0): a contiguous block of jobs,
/// so that shards `0/n`, `1/n`, ... `n-1/n` concatenated are the whole list in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    /// This shard, from 0.
    pub index: usize,
    /// How many shards the job list is split into.
    pub count: usize,
}

impl Shard {
    /// The whole list as one shard.
    pub const ALL: Self = Self { index: 0, count: 1 };

    /// Returns the range of job indices of this shard in a list of `len` jobs: shard `i` of `n` holds jobs
    /// `i*len/n .. (i+1)*len/n` (sizes differ by at most one).
    pub fn range(self, len: usize) -> std::ops::Range<usize> {
        let at = |k: usize| k * len / self.count;
        at(self.index)..at(self.index + 1)
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// Why a `--shard` value was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ShardError {
    /// Not `i/n` with two unsigned integers.
    #[error("expected a shard as `i/n` (like `0/4`), found `{0}`")]
    Syntax(String),
    /// `n` is 0 or `i` is not below `n`.
    #[error("shard `{index}/{count}`: the index must be below the count (0/{count} .. {}/{count})", count.saturating_sub(1))]
    OutOfRange {
        /// The index given.
        index: usize,
        /// The count given.
        count: usize,
    },
}

impl FromStr for Shard {
    type Err = ShardError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ShardError::Syntax(s.to_owned());
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let index: usize = i.trim().parse().map_err(|_| bad())?;
        let count: usize = n.trim().parse().map_err(|_| bad())?;
        if count == 0 || index >= count {
            return Err(ShardError::OutOfRange { index, count });
        }
        Ok(Self { index, count })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nz(n: usize) -> NonZeroUsize {
        NonZeroUsize::new(n).unwrap()
    }

    #[test]
    fn results_come_in_job_order_whatever_the_workers() {
        // Jobs of very different lengths finish out of order on several workers.
        let jobs: Vec<u64> = (0..40).map(|i| (i * 7919) % 23).collect();
        let work = |i: usize, &j: &u64| {
            let mut x = j;
            for _ in 0..(j * 2000) {
                x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            }
            (i, x)
        };
        let one = map_ordered(&jobs, nz(1), work);
        for w in [2, 3, 8, 64] {
            let mut seen = Vec::new();
            run_ordered(&jobs, nz(w), work, |i, r| seen.push((i, r)));
            assert!(seen.iter().enumerate().all(|(k, (i, _))| k == *i));
            let got: Vec<_> = seen.into_iter().map(|(_, r)| r).collect();
            assert_eq!(got, one, "{w} workers");
        }
    }

    #[test]
    fn a_stop_ends_the_batch_at_the_same_index_whatever_the_workers() {
        use std::sync::atomic::AtomicUsize;
        for w in [1, 2, 3, 8] {
            let started = AtomicUsize::new(0);
            let mut seen = Vec::new();
            run_indexed_until(
                1_000,
                nz(w),
                |i| {
                    started.fetch_add(1, Ordering::Relaxed);
                    i * 3
                },
                |i, r| {
                    seen.push((i, r));
                    r != 60
                },
            );
            assert_eq!(
                seen,
                (0..=20).map(|i| (i, i * 3)).collect::<Vec<_>>(),
                "{w} workers"
            );
            // Stopped early: at most the run-ahead window (and one job per worker) past the stop ran.
            let started = started.load(Ordering::Relaxed);
            assert!(
                started <= 21 + RUN_AHEAD_PER_WORKER * w + w,
                "{w} workers started {started} jobs"
            );
        }
    }

    #[test]
    fn an_empty_list_runs_nothing() {
        let jobs: Vec<u8> = Vec::new();
        assert!(map_ordered(&jobs, nz(4), |_, &j| j).is_empty());
    }

    #[test]
    fn shards_are_contiguous_and_cover_the_list() {
        for len in [0, 1, 7, 8, 9, 100] {
            for count in 1..=9 {
                let mut all = Vec::new();
                for index in 0..count {
                    let r = Shard { index, count }.range(len);
                    assert!(r.len() >= len / count && r.len() <= len / count + 1);
                    all.extend(r);
                }
                assert_eq!(
                    all,
                    (0..len).collect::<Vec<_>>(),
                    "{len} jobs, {count} shards"
                );
            }
        }
    }

    #[test]
    fn shard_syntax() {
        assert_eq!("1/4".parse(), Ok(Shard { index: 1, count: 4 }));
        assert_eq!(
            "4/4".parse::<Shard>(),
            Err(ShardError::OutOfRange { index: 4, count: 4 })
        );
        assert!(matches!(
            "0/0".parse::<Shard>(),
            Err(ShardError::OutOfRange { .. })
        ));
        assert!(matches!("1-4".parse::<Shard>(), Err(ShardError::Syntax(_))));
        assert!(matches!("a/4".parse::<Shard>(), Err(ShardError::Syntax(_))));
    }
}
