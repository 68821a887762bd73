//! `peerdma bench --sweep`: how the simulator's host cost per operation grows with size, along five
//! dimensions — pages touched, mirrors of one range, devices behind a switch tree, live processes, and
//! processes bound to an SVA device (PASIDs) — each figure the median of interleaved repetitions
//! (docs/performance.md, "How cost grows with size").
//!
//! Method: a repetition runs every (dimension, size) world once, in ascending size order on even
//! repetitions and descending on odd ones, so a change of machine load hits every size alike. The page
//! sizes of 1 GiB and more run 3 repetitions (fewer than the others: each takes seconds). A world whose
//! first run takes longer than [`SLOW_S`] seconds stops its dimension from growing further (the larger
//! sizes are reported as skipped, with the time that stopped them). Every world runs in token data mode
//! (`[sim] data = "token"`) and is timed on the thread's CPU clock ([`Stopwatch`]). Growth is the median at a size over the median at the dimension's smallest
//! size, for the same operation.
//!
//! This is a host-side tool; it models no kernel mechanism itself.

mod render;
mod spread;
mod worlds;

use std::process::ExitCode;

use super::median;
use super::sim::{BenchResult, host_now};

/// The JSON schema identifier of the sweep's output; bumped when a field changes meaning or goes away.
pub(crate) const SCHEMA: &str = "peerdma-bench-sweep/1";

/// A world whose first run takes longer than this (seconds) is not run at larger sizes.
pub(crate) const SLOW_S: f64 = 60.0;

/// Growth within this factor of the smallest size counts as "stays flat".
pub(crate) const FLAT: f64 = 1.5;

/// A stopwatch on this thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`), not the wall clock: the simulation
/// runs on one thread, and on a shared machine a run of seconds is preempted where one of microseconds is
/// not, so wall time would make the large sizes look slower by the machine's load alone.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Stopwatch(std::time::Duration);

impl Stopwatch {
    /// This thread's CPU time so far.
    fn now() -> std::time::Duration {
        let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
        std::time::Duration::new(
            u64::try_from(t.tv_sec).unwrap_or(0),
            u32::try_from(t.tv_nsec).unwrap_or(0),
        )
    }

    /// Starts it.
    pub(crate) fn start() -> Self {
        Self(Self::now())
    }

    /// CPU time since [`Stopwatch::start`].
    pub(crate) fn elapsed(self) -> std::time::Duration {
        Self::now().saturating_sub(self.0)
    }
}

/// One timed operation of a world: its name and host ns per operation.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Op {
    name: &'static str,
    ns: f64,
}

impl Op {
    fn new(name: &'static str, ns: f64) -> Self {
        Self { name, ns }
    }
}

/// The arguments of `peerdma bench --sweep`.
#[derive(Clone, Debug)]
pub(crate) struct SweepArgs {
    /// JSON instead of the table.
    pub(crate) json: bool,
    /// Repetitions per figure (at least 5; 3 for the page sizes of 1 GiB and more).
    pub(crate) reps: usize,
    /// Tiny sizes, for tests.
    pub(crate) quick: bool,
    /// Only this dimension (`None`: all five).
    pub(crate) only: Option<String>,
}

/// One measured point: an operation at one size of one dimension.
#[derive(Clone, Debug)]
pub(crate) struct Point {
    /// `pages`, `mirrors`, `devices`, `processes` or `pasids`.
    pub(crate) dimension: &'static str,
    /// The size (pages, or a count).
    pub(crate) size: u64,
    /// The size for people (`1 GiB`, `64`).
    pub(crate) label: String,
    /// The operation.
    pub(crate) op: &'static str,
    /// One sample per repetition that ran this size, ns per operation.
    pub(crate) samples: Vec<f64>,
}

impl Point {
    /// The median of the samples.
    pub(crate) fn median(&self) -> f64 {
        median(&self.samples)
    }
}

/// A size not measured, and why.
#[derive(Clone, Debug)]
pub(crate) struct Skipped {
    /// The dimension.
    pub(crate) dimension: &'static str,
    /// The world (its operations).
    pub(crate) world: &'static str,
    /// The size for people.
    pub(crate) label: String,
    /// Why.
    pub(crate) why: String,
}

/// Everything one sweep measured.
#[derive(Clone, Debug)]
pub(crate) struct SweepRun {
    /// Whether `--quick` was given.
    pub(crate) quick: bool,
    /// Repetitions of the ordinary sizes.
    pub(crate) reps: usize,
    /// The 1-minute load average before and after.
    pub(crate) load: (Option<f64>, Option<f64>),
    /// The points, by dimension, operation, size.
    pub(crate) points: Vec<Point>,
    /// The sizes not measured.
    pub(crate) skipped: Vec<Skipped>,
    /// The fixed parameters of each dimension, for people (`pages: …`).
    pub(crate) params: Vec<(&'static str, String)>,
}

impl SweepRun {
    /// The growth of `p` over the same operation at its dimension's smallest measured size.
    pub(crate) fn growth(&self, p: &Point) -> f64 {
        let base = self
            .points
            .iter()
            .filter(|q| q.dimension == p.dimension && q.op == p.op)
            .min_by_key(|q| q.size)
            .map_or(f64::NAN, Point::median);
        p.median() / base
    }
}

/// A world to run: one size of one dimension.
struct Job {
    dimension: &'static str,
    world: &'static str,
    size: u64,
    label: String,
    reps: usize,
    run: Box<dyn Fn() -> BenchResult<Vec<Op>>>,
}

/// `pages` pages as a size for people.
fn bytes_label(pages: u64) -> String {
    let b = pages * peerdma_core::PAGE_SIZE;
    if b >= 1 << 30 {
        format!("{} GiB", b >> 30)
    } else if b >= 1 << 20 {
        format!("{} MiB", b >> 20)
    } else {
        format!("{} KiB", b >> 10)
    }
}

/// A world of the pages dimension.
type World = fn(u64) -> BenchResult<Vec<Op>>;

/// The worlds of a sweep, and the fixed parameters of each dimension.
fn plan(quick: bool, reps: usize) -> (Vec<Job>, Vec<(&'static str, String)>) {
    let few = reps.min(3);
    let page_sizes: &[u64] = if quick {
        &[64, 256]
    } else {
        &[256, 4_096, 65_536, 262_144, 1_048_576]
    };
    let counts: &[usize] = if quick { &[1, 4] } else { &[1, 16, 64, 256] };
    let mirror_counts: &[usize] = if quick { &[1, 2] } else { &[1, 2, 4, 8] };
    let device_counts: &[usize] = if quick { &[1, 4] } else { &[1, 4, 16, 64] };
    let (range, calls, other, sva_pages) = if quick {
        (256, 1_024, 64, 64)
    } else {
        (16_384, 65_536, 1_024, 1_024)
    };
    let mut jobs = Vec::new();
    let page_worlds: [(&'static str, World); 4] = [
        ("cpu_fault+reclaim", worlds::fault_reclaim),
        ("mirror_fault+invalidate", worlds::mirror),
        ("migrate", worlds::migration),
        ("dma_map", worlds::iova),
    ];
    for (world, f) in page_worlds {
        for &pages in page_sizes {
            jobs.push(Job {
                dimension: "pages",
                world,
                size: pages,
                label: bytes_label(pages),
                reps: if pages >= 262_144 { few } else { reps },
                run: Box::new(move || f(pages)),
            });
        }
    }
    for &n in mirror_counts {
        jobs.push(Job {
            dimension: "mirrors",
            world: "mirror_invalidate",
            size: n as u64,
            label: n.to_string(),
            reps,
            run: Box::new(move || spread::mirrors(n, range)),
        });
    }
    for &n in device_counts {
        jobs.push(Job {
            dimension: "devices",
            world: "devices",
            size: n as u64,
            label: n.to_string(),
            reps,
            run: Box::new(move || spread::devices(n, range, calls)),
        });
    }
    for &n in counts {
        jobs.push(Job {
            dimension: "processes",
            world: "processes",
            size: n as u64,
            label: n.to_string(),
            reps,
            run: Box::new(move || spread::processes(n, range, other)),
        });
        jobs.push(Job {
            dimension: "pasids",
            world: "pasids",
            size: n as u64,
            label: n.to_string(),
            reps,
            run: Box::new(move || spread::pasids(n, sva_pages)),
        });
    }
    let params = vec![
        (
            "pages",
            "one process; token data mode; 3 repetitions from 1 GiB up".to_owned(),
        ),
        (
            "mirrors",
            format!("{range} populated pages, every mirror faulted in whole"),
        ),
        (
            "devices",
            format!(
                "switch tree, 8 endpoints a switch; {calls} map/unmap and distance calls; \
                 {range} pages faulted, a slice per device"
            ),
        ),
        (
            "processes",
            format!("{other} resident pages in every other process; {range} pages measured"),
        ),
        (
            "pasids",
            format!("{sva_pages} pages filled by the device in the last process bound"),
        ),
    ];
    (jobs, params)
}

/// Runs the sweep.
pub(crate) fn measure(a: &SweepArgs) -> BenchResult<SweepRun> {
    let reps = a.reps.max(5);
    let (mut jobs, mut params) = plan(a.quick, reps);
    if let Some(d) = &a.only {
        jobs.retain(|j| j.dimension == d);
        params.retain(|(p, _)| p == d);
    }
    let load_before = super::loadavg();
    let mut points: Vec<Point> = Vec::new();
    let mut skipped: Vec<Skipped> = Vec::new();
    // Index of a job whose world is stopped at larger sizes, by world.
    let mut stopped: Vec<(&'static str, &'static str, u64)> = Vec::new();
    for rep in 0..reps {
        let order: Vec<&Job> = if rep % 2 == 0 {
            jobs.iter().collect()
        } else {
            jobs.iter().rev().collect()
        };
        for job in order {
            if rep >= job.reps
                || stopped
                    .iter()
                    .any(|&(d, w, s)| d == job.dimension && w == job.world && job.size > s)
            {
                continue;
            }
            let t = host_now();
            let ops = (job.run)()
                .map_err(|e| format!("{} {} ({}): {e}", job.dimension, job.label, job.world))?;
            let secs = t.elapsed().as_secs_f64();
            for op in ops {
                if let Some(p) = points
                    .iter_mut()
                    .find(|p| p.dimension == job.dimension && p.op == op.name && p.size == job.size)
                {
                    p.samples.push(op.ns);
                } else {
                    points.push(Point {
                        dimension: job.dimension,
                        size: job.size,
                        label: job.label.clone(),
                        op: op.name,
                        samples: vec![op.ns],
                    });
                }
            }
            if rep == 0 && secs > SLOW_S {
                stopped.push((job.dimension, job.world, job.size));
                for j in jobs.iter().filter(|j| {
                    j.dimension == job.dimension && j.world == job.world && j.size > job.size
                }) {
                    skipped.push(Skipped {
                        dimension: j.dimension,
                        world: j.world,
                        label: j.label.clone(),
                        why: format!(
                            "one run at {} took {secs:.0} s (limit {SLOW_S:.0} s)",
                            job.label
                        ),
                    });
                }
            }
        }
    }
    // By dimension, then operation in the order the dimension's worlds report them, then size.
    let mut op_order: Vec<(&'static str, &'static str)> = Vec::new();
    for p in &points {
        if !op_order.contains(&(p.dimension, p.op)) {
            op_order.push((p.dimension, p.op));
        }
    }
    let op_rank = |p: &Point| op_order.iter().position(|o| *o == (p.dimension, p.op));
    points.sort_by(|a, b| {
        dim_rank(a.dimension)
            .cmp(&dim_rank(b.dimension))
            .then(op_rank(a).cmp(&op_rank(b)))
            .then(a.size.cmp(&b.size))
    });
    Ok(SweepRun {
        quick: a.quick,
        reps,
        load: (load_before, super::loadavg()),
        points,
        skipped,
        params,
    })
}

/// The order of the dimensions in the output.
fn dim_rank(d: &str) -> usize {
    ["pages", "mirrors", "devices", "processes", "pasids"]
        .iter()
        .position(|x| *x == d)
        .unwrap_or(usize::MAX)
}

/// `peerdma bench --sweep`: measures, prints the table or JSON; exit 0, or 1 when an operation failed.
pub(crate) fn command(a: &SweepArgs) -> ExitCode {
    super::print_run(
        "peerdma bench --sweep",
        a.json,
        measure(a),
        render::json,
        render::text,
    )
}

#[cfg(test)]
mod tests {
    use super::{Point, SweepRun, bytes_label};

    fn point(dimension: &'static str, size: u64, op: &'static str, samples: &[f64]) -> Point {
        Point {
            dimension,
            size,
            label: size.to_string(),
            op,
            samples: samples.to_vec(),
        }
    }

    #[test]
    fn growth_is_over_the_same_ops_median_at_the_smallest_size_of_its_dimension() {
        let run = SweepRun {
            quick: true,
            reps: 3,
            load: (None, None),
            points: vec![
                point("pages", 4, "a", &[10.0, 30.0, 20.0]),
                point("pages", 1, "a", &[5.0, 9.0, 10.0]),
                point("pages", 1, "b", &[1.0, 1.0, 1.0]),
                point("devices", 1, "a", &[100.0, 100.0, 100.0]),
            ],
            skipped: Vec::new(),
            params: Vec::new(),
        };
        // The medians are 20 and 9: the base is the smallest size's, not the first listed.
        assert!((run.growth(&run.points[0]) - 20.0 / 9.0).abs() < 1e-12);
        assert!((run.growth(&run.points[1]) - 1.0).abs() < 1e-12);
        assert!(
            (run.growth(&run.points[3]) - 1.0).abs() < 1e-12,
            "per dimension"
        );
    }

    #[test]
    fn sizes_read_in_binary_units() {
        assert_eq!(bytes_label(64), "256 KiB");
        assert_eq!(bytes_label(256), "1 MiB");
        assert_eq!(bytes_label(262_144), "1 GiB");
        assert_eq!(bytes_label(1_048_576), "4 GiB");
    }
}
