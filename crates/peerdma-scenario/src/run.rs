//! The runner: builds a world from a parsed [`Scenario`], runs every thread as a simulated agent, checks each
//! step's `expect`, and returns a [`Report`].
//!
//! Threads start when their process exists (a forked child's threads start at the `fork`). A process exits
//! when its last thread finishes or a thread runs `exit`; `wait` in the parent returns then. Mapping names are
//! per process and inherited by a forked child; so are open device files (`open`), as file descriptors
//! are: a child's `dmirror.*` steps may use an inherited fd, which still mirrors the *opener's* address
//! space (the notifier was registered on the opener's mm, `mmu_interval_notifier_insert` in
//! lib/test_hmm.c's open). A file is released when its last holder closes it or exits; once its opener has
//! exited it answers `EINVAL` (test_hmm.c's `mmget_not_zero` fails), which the model gets by releasing it
//! when the opener exits.
//!
//! Building the world is in `run/build.rs`; checking each step against its `expect`, in `run/check.rs`.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::rc::Rc;

use peerdma_core::{DeviceId, Errno, Pid, SimDuration, SimTime, Va};
use peerdma_devices::{
    Dmirror, DmirrorCosts, DmirrorDevice, DmirrorMemory, DmirrorResult, JobId, SvaAccel, SvaCosts,
    SvaIommu,
};
use peerdma_dma::{DmaCosts, DmaSgHandle, DmaSpace, Platform};
use peerdma_mm::{Kernel, MmCosts, SigInfo};
use peerdma_sim::{RngStream, RunOutcome, Sim, SimConfig, Track, WaitQueue};

use crate::ast::{AddrExpr, DeviceKind, DeviceMemoryKind, Scenario, Step, TimeMode};
use crate::error::RunError;
use crate::report::{ExpectFailure, Outcome, Report, StepRecord};

mod build;
mod check;

use build::{build_platform, build_sva, nvmes, rnics, wall_clock_watchdog};

/// With exploration on, the chance (in 1/256) that a yield point becomes a preemption ([`SimConfig`]).
const EXPLORE_PREEMPT_PER_256: u32 = 64;
/// The longest delay one exploration preemption adds: 20 µs, longer than a page fault or an invalidation
/// (spec/numbers.md §3), so that another agent's whole protocol step can land in the window.
const EXPLORE_PREEMPT_MAX: SimDuration = SimDuration::from_nanos(20_000);

/// Returns the device id DMA through `pin`s is attributed to: a generic DMA engine, not a declared device,
/// numbered right after the scenario's devices (which are numbered by their position in `[[device]]`), so
/// that it is a real id no declared device has.
fn dma_engine_id(scn: &Scenario) -> DeviceId {
    DeviceId(u32::try_from(scn.devices.len()).expect("few devices"))
}

/// Command-line overrides of the scenario's `[sim]` table.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Overrides `sim.seed`.
    pub seed: Option<u64>,
    /// Overrides `sim.explore`.
    pub explore: Option<bool>,
    /// Record the step log in the report.
    pub step_log: bool,
    /// Collect the trace ([`Report::trace`]); without it the run records no trace events.
    pub trace: bool,
    /// Called with (simulated time, events so far) every few thousand events: a progress display. It
    /// changes nothing the run computes.
    pub progress: Option<Progress>,
}

/// A progress callback for [`RunOptions::progress`].
#[derive(Clone)]
pub struct Progress(pub std::sync::Arc<dyn Fn(SimTime, u64) + Send + Sync>);

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Progress")
    }
}

/// What a step produced, compared against its `expect`.
#[derive(Clone, Debug, Default)]
pub(crate) struct StepResult {
    pub(crate) errno: Option<Errno>,
    pub(crate) signal: Option<SigInfo>,
    pub(crate) dm: Option<DmirrorResult>,
    pub(crate) data: Option<Vec<u8>>,
    /// A `dma.map` handle's merged segments (`kind`, bytes) and first DMA address.
    pub(crate) segments: Option<Vec<(String, u64)>>,
    pub(crate) dma_addr: Option<u64>,
    /// Pages a `dma.map` step pinned.
    pub(crate) pinned: Option<u64>,
    /// An `rdma.poll`'s completion statuses, comma-separated.
    pub(crate) status: Option<String>,
    /// Further outcome a step reports in the step log (a `gpu.*` step's placement or UVM counters).
    pub(crate) note: Option<String>,
    /// An `sva.stats` step's device ATC hit rate (percent) and translation requests.
    pub(crate) sva_stats: Option<(u64, u64)>,
    /// The misuse behind `errno`, when the step used a handle its process does not hold.
    pub(crate) misuse: Option<String>,
}

/// A process of the scenario: its pid once it exists, and what its steps hold by name.
#[derive(Debug, Default)]
pub(crate) struct ProcState {
    pub(crate) pid: Option<Pid>,
    pub(crate) mappings: BTreeMap<String, (Va, u64)>,
    pub(crate) fds: BTreeMap<String, Rc<Dmirror>>,
    pub(crate) pins: BTreeMap<String, (peerdma_mm::PinnedPages, Va)>,
    pub(crate) handles: BTreeMap<String, DmaSgHandle>,
    /// The `sva` devices this process is bound to (unbound when it exits, as closing the device file does).
    pub(crate) sva_binds: Vec<String>,
    /// Jobs submitted by `sva.submit`, by name: the device and the job.
    pub(crate) sva_jobs: BTreeMap<String, (String, JobId)>,
    pub(crate) live_threads: usize,
    pub(crate) exited: bool,
}

/// What a step's op runs with: the world, the acting thread's process and its RNG stream.
pub(crate) struct StepCx<'a> {
    pub(crate) world: &'a World,
    pub(crate) proc_name: &'a str,
    pub(crate) pid: Pid,
    pub(crate) rng: &'a mut RngStream,
}

/// The running scenario: the kernel, the platform, the processes and what the steps recorded.
#[derive(Debug)]
pub(crate) struct World {
    pub(crate) kernel: Rc<Kernel>,
    scn: Scenario,
    pub(crate) procs: RefCell<BTreeMap<String, ProcState>>,
    pub(crate) files: BTreeMap<String, u32>,
    pub(crate) devices: BTreeMap<String, Rc<DmirrorDevice>>,
    /// `sva` devices by name.
    pub(crate) sva: BTreeMap<String, SvaAccel>,
    /// The DMA platform, when the scenario has a `[topology]`.
    platform: Option<Rc<Platform>>,
    /// `pci` devices by name.
    pub(crate) pci: BTreeMap<String, DeviceId>,
    /// BAR exports by name.
    pub(crate) exports: BTreeMap<String, peerdma_mm::MmioId>,
    /// `rnic` devices by name.
    pub(crate) rnics: BTreeMap<String, Rc<peerdma_devices::rnic::Rnic>>,
    /// The RDMA objects the steps named.
    pub(crate) rdma: RefCell<crate::ops::rdma::RdmaNames>,
    /// `nvme` devices by name.
    pub(crate) nvmes: BTreeMap<String, Rc<peerdma_devices::nvme::Nvme>>,
    /// `gpu` devices and what `gpu.*` steps created.
    pub(crate) gpu: crate::ops::gpu::GpuWorld,
    pub(crate) dma_page_cost: SimDuration,
    /// The access path of the scenario's DMA engine (`dma.write` through a pin).
    pub(crate) dma_engine: DmaSpace,
    pub(crate) proc_wq: WaitQueue,
    records: RefCell<Vec<StepRecord>>,
    failures: RefCell<Vec<ExpectFailure>>,
    expectations: RefCell<u64>,
    step_log: bool,
    /// The step each thread is running (or blocked in), or ran last once it has finished, by thread name:
    /// named by every report that stops a run with threads still pending, and by an oracle violation, which
    /// may be found as the step that caused it ends its thread.
    current: RefCell<BTreeMap<String, (crate::ast::Loc, &'static str)>>,
    /// Steps run so far, against `[sim.limits] steps`.
    steps_run: RefCell<u64>,
}

/// Runs `scn` to completion and returns its report.
///
/// Nothing of the run outlives it: a reference cycle that kept the kernel alive would leak a whole
/// simulation per run (per seed of an exploration). Builds with debug assertions (the test suite) check it
/// after every run.
pub fn run(scn: &Scenario, opts: &RunOptions) -> Report {
    let (report, kernel) = run_and_shut_down(scn, opts);
    debug_assert!(
        kernel.upgrade().is_none(),
        "{}: the run's kernel outlived the run (a reference cycle leaks the simulation)",
        scn.path
    );
    report
}

/// [`run`], returning also a weak handle of the run's kernel, which must be dead once every local is gone.
fn run_and_shut_down(scn: &Scenario, opts: &RunOptions) -> (Report, std::rc::Weak<Kernel>) {
    let seed = opts.seed.unwrap_or(scn.sim.seed);
    let explore = opts.explore.unwrap_or(scn.sim.explore);
    let limits = scn.sim.limits;
    let sim = Sim::new(SimConfig {
        seed,
        explore,
        jitter: scn.sim.jitter,
        time_limit: SimTime(scn.sim.time_limit.as_nanos()),
        trace: opts.trace,
        max_events: limits.events,
        max_trace: usize::try_from(limits.trace).unwrap_or(usize::MAX),
        preempt_per_256: EXPLORE_PREEMPT_PER_256,
        preempt_max: EXPLORE_PREEMPT_MAX,
        watchdog: wall_clock_watchdog(limits.wall_time),
    });
    // Every cost table comes from one timing: `[sim] time` with the `[timing]` overrides.
    let timing = scn.timing();
    let mm_costs = MmCosts::from_timing(&timing);
    let dm_costs = DmirrorCosts::from_timing(&timing);
    let kernel = Kernel::new_numa(&sim, &scn.sim.memory, mm_costs);
    kernel
        .set_data_mode(scn.sim.data)
        .expect("a fresh kernel has no page written");
    for &node in &scn.sim.movable {
        kernel
            .set_node_movable(node)
            .expect("validated by the parser: a fresh node other than 0, below the node count");
    }
    let mut files = BTreeMap::new();
    for f in &scn.files {
        let id = if f.dax {
            kernel.create_dax_file(&f.name, f.size)
        } else {
            kernel.create_file(&f.name, f.size, f.tmpfs)
        };
        files.insert(f.name.clone(), id);
    }
    let devices = scn
        .devices
        .iter()
        .enumerate()
        .filter(|(_, d)| d.kind == DeviceKind::Dmirror)
        .map(|(i, d)| {
            let mem = match d.memory {
                DeviceMemoryKind::Private => DmirrorMemory::Private,
                DeviceMemoryKind::Coherent => DmirrorMemory::Coherent,
            };
            let id = DeviceId(u32::try_from(i).expect("few devices"));
            let dev = DmirrorDevice::new(&kernel, id, mem, d.size, dm_costs.clone());
            dev.set_invalidate_own_migrations(d.invalidate_own_migrations);
            (d.name.clone(), dev)
        })
        .collect();
    let sva_iommu = SvaIommu::new(&kernel, SvaCosts::from_timing(&timing), 1 << 20);
    let sva = build_sva(scn, &sva_iommu);
    let dma_costs = DmaCosts::from_timing(&timing);
    let (platform, pci, exports) = match build_platform(scn, &kernel, dma_costs) {
        Ok(p) => p,
        Err(e) => {
            sim.stop(e.to_string());
            (None, BTreeMap::new(), BTreeMap::new())
        }
    };
    let rnics = rnics(scn, platform.as_ref(), &timing);
    let nvmes = nvmes(scn, platform.as_ref(), &timing);
    let gpu = match crate::ops::gpu::GpuWorld::build(scn, platform.as_ref(), &pci, &timing) {
        Ok(g) => g,
        Err(e) => {
            sim.stop(e.to_string());
            crate::ops::gpu::GpuWorld::default()
        }
    };
    let mut procs = BTreeMap::new();
    for p in &scn.processes {
        procs.insert(p.clone(), ProcState::default());
    }
    for t in &scn.threads {
        procs.entry(t.process.clone()).or_default().live_threads += 1;
    }
    let world = Rc::new(World {
        kernel: kernel.clone(),
        scn: scn.clone(),
        procs: RefCell::new(procs),
        files,
        dma_page_cost: dm_costs.dma_page,
        dma_engine: DmaSpace::new(&kernel, dma_engine_id(scn), "dma_engine", 1),
        devices,
        sva,
        platform,
        rnics,
        nvmes,
        rdma: RefCell::default(),
        pci,
        exports,
        gpu,
        proc_wq: WaitQueue::new(&sim),
        records: RefCell::new(Vec::new()),
        failures: RefCell::new(Vec::new()),
        expectations: RefCell::new(0),
        step_log: opts.step_log,
        current: RefCell::new(BTreeMap::new()),
        steps_run: RefCell::new(0),
    });
    {
        let w = world.clone();
        sim.spawn("init", async move { w.init().await });
    }
    if let Some(p) = &opts.progress {
        let p = p.0.clone();
        sim.set_progress(4096, move |now, events| p(now, events));
    }
    let outcome = sim.run();
    let report = world.finish(&sim, seed, explore, &outcome);
    // Pending agents (device workers, a stopped run's threads) and drivers' callbacks (an open mirror's
    // notifier) hold the model in cycles with the kernel and the engine.
    kernel.shutdown();
    (report, Rc::downgrade(&kernel))
}

impl World {
    async fn init(self: Rc<Self>) {
        for f in &self.scn.files {
            let id = self.files[&f.name];
            let Ok(mut data) = self.host_buffer(f.size) else {
                self.kernel.sim.limit_reached(format!(
                    "file {} of {:#x} bytes is over `[sim.limits] host_memory`",
                    f.name, f.size
                ));
                return;
            };
            f.pattern.fill(&mut data);
            if self.kernel.pwrite(id, 0, &data).await.is_err() {
                self.kernel
                    .sim
                    .stop(format!("file {} does not fit in memory", f.name));
            }
        }
        // Declared processes (and "main") exist from the start; forked ones appear at their fork.
        for p in &self.scn.processes {
            let pid = self.kernel.create_process();
            if let Some(&node) = self.scn.process_nodes.get(p) {
                self.kernel
                    .set_home_node(pid, node)
                    .expect("validated below the node count by the parser");
            }
            self.procs.borrow_mut().get_mut(p).expect("declared").pid = Some(pid);
        }
        for (i, t) in self.scn.threads.iter().enumerate() {
            let w = self.clone();
            self.kernel
                .sim
                .spawn(t.name.clone(), async move { w.thread(i).await });
        }
    }

    async fn thread(self: Rc<Self>, idx: usize) {
        let t = &self.scn.threads[idx];
        let procs = &self.procs;
        self.proc_wq
            .wait_event(|| {
                procs
                    .borrow()
                    .get(&t.process)
                    .is_some_and(|p| p.pid.is_some())
            })
            .await;
        let mut rng = self.kernel.sim.rng(&format!("thread.{}", t.name));
        for step in &t.steps {
            if self.procs.borrow()[&t.process].exited {
                break;
            }
            let start = self.kernel.sim.now();
            if let Some(kind) = step.expect.violation {
                self.kernel.expect_violation(kind);
            }
            self.current
                .borrow_mut()
                .insert(t.name.clone(), (step.loc, step.op.name()));
            let span = self
                .kernel
                .sim
                .span(step.op.name(), Track::Agent, || {
                    vec![
                        ("line", step.loc.line.into()),
                        ("process", t.process.as_str().into()),
                    ]
                })
                .with_histogram(format!("step.{}", step.op.name()));
            let before = self.observe(&t.process, &step.expect);
            let res = match self.count_step() {
                Ok(()) => self.step(&t.process, step, &mut rng).await,
                Err(e) => Err(e),
            };
            drop(span);
            let res = match res {
                Err(e) if e.misuse_errno().is_some() => Ok(StepResult {
                    errno: e.misuse_errno(),
                    misuse: Some(e.to_string()),
                    ..StepResult::default()
                }),
                other => other,
            };
            let observed = self.observed_since(&t.process, &step.expect, &before);
            self.check(&t.name, step, &res, start, &observed);
            self.sample_residency();
            if step.op.ends_thread() {
                break;
            }
        }
        let last = {
            let mut p = self.procs.borrow_mut();
            let st = p.get_mut(&t.process).expect("thread's process");
            st.live_threads -= 1;
            st.live_threads == 0 && !st.exited
        };
        if last || t.steps.last().is_some_and(|s| s.op.ends_thread()) {
            self.exit_process(&t.process).await;
        }
    }

    pub(crate) async fn exit_process(&self, name: &str) {
        let (pid, fds, sva) = {
            let mut p = self.procs.borrow_mut();
            let st = p.get_mut(name).expect("known process");
            if st.exited {
                return;
            }
            st.exited = true;
            // Pins and DMA handles are released with the process.
            st.pins.clear();
            st.handles.clear();
            (
                st.pid.expect("running process"),
                std::mem::take(&mut st.fds),
                std::mem::take(&mut st.sva_binds),
            )
        };
        for m in fds.into_values() {
            self.put_fd(m, Some(pid)).await;
        }
        self.kernel.exit(pid).await;
        // Closing the accelerator's file after the mm is gone: the SVA release already aborted its DMA.
        for dev in sva {
            if let Some(d) = self.sva.get(&dev) {
                let _ = d.unbind(pid).await;
            }
        }
        self.proc_wq.wake_up_all();
    }

    /// Drops one holder's reference to an open device file (`close`, or the holder's exit: `exiting` is
    /// then its pid): the file is released when no live process holds it any more, or when its opener exits.
    pub(crate) async fn put_fd(&self, m: Rc<Dmirror>, exiting: Option<Pid>) {
        let held_elsewhere = self
            .procs
            .borrow()
            .values()
            .any(|p| !p.exited && p.fds.values().any(|o| Rc::ptr_eq(o, &m)));
        if !held_elsewhere || exiting == Some(m.opener()) {
            m.close().await;
        }
    }

    /// Counts one step against `[sim.limits] steps`.
    fn count_step(&self) -> Result<(), RunError> {
        let mut n = self.steps_run.borrow_mut();
        *n += 1;
        let limit = self.scn.sim.limits.steps;
        if *n > limit {
            return Err(RunError::StepLimit { limit });
        }
        Ok(())
    }

    /// Returns a zeroed host buffer of `bytes` for a step's data, or the `[sim.limits] host_memory` error:
    /// no host allocation is sized by the input without this check.
    pub(crate) fn host_buffer(&self, bytes: u64) -> Result<Vec<u8>, RunError> {
        self.check_host(bytes)?;
        Ok(vec![
            0u8;
            usize::try_from(bytes).expect(
                "below the host memory limit, which fits usize"
            )
        ])
    }

    /// Returns `bytes` as a host length for a step that streams its data (no buffer of it is built, so
    /// `[sim.limits] host_memory` does not bound it), or the limit's error when it does not fit `usize`.
    pub(crate) fn streamed_len(&self, bytes: u64) -> Result<usize, RunError> {
        usize::try_from(bytes).map_err(|_| RunError::HostMemoryLimit {
            bytes,
            limit: self.scn.sim.limits.host_memory,
        })
    }

    /// Checks that a step may ask for `bytes` of host memory at once (`[sim.limits] host_memory`).
    pub(crate) fn check_host(&self, bytes: u64) -> Result<(), RunError> {
        let limit = self.scn.sim.limits.host_memory;
        if bytes > limit || usize::try_from(bytes).is_err() {
            return Err(RunError::HostMemoryLimit { bytes, limit });
        }
        Ok(())
    }

    /// Describes every pending agent: a scenario thread with the step it is in (`file:line:col`, op), any
    /// other agent (a device engine, a kernel worker) by name.
    fn pending_report(&self, pending: &[String]) -> String {
        let cur = self.current.borrow();
        pending
            .iter()
            .map(|name| match cur.get(name) {
                Some((loc, op)) => {
                    format!("thread `{name}` in `{op}` at {}:{loc}", self.scn.path)
                }
                None => format!("`{name}`"),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn pid(&self, proc_name: &str) -> Pid {
        self.procs.borrow()[proc_name]
            .pid
            .expect("a running thread's process has a pid")
    }

    /// Resolves an address expression in `proc_name`, with the length left in its mapping.
    pub(crate) fn resolve(
        &self,
        proc_name: &str,
        a: &AddrExpr,
    ) -> Result<(Va, Option<u64>), RunError> {
        match a {
            AddrExpr::Raw(v) => Ok((Va::from_raw(*v), None)),
            AddrExpr::Sym { name, offset } => {
                let p = self.procs.borrow();
                let (base, len) =
                    *p[proc_name]
                        .mappings
                        .get(name)
                        .ok_or_else(|| RunError::NoMapping {
                            name: name.clone(),
                            process: proc_name.to_owned(),
                        })?;
                let off = u64::try_from(*offset).map_err(|_| RunError::NegativeOffset {
                    name: name.clone(),
                    offset: *offset,
                })?;
                Ok((base.add(off), Some(len.saturating_sub(off))))
            }
        }
    }

    /// Runs one step of a thread of `proc_name`: the op's family module does the work ([`crate::ops`]).
    async fn step(
        &self,
        proc_name: &str,
        step: &Step,
        rng: &mut RngStream,
    ) -> Result<StepResult, RunError> {
        let mut cx = StepCx {
            world: self,
            proc_name,
            pid: self.pid(proc_name),
            rng,
        };
        step.op.run(&mut cx).await
    }

    /// Returns the state of a process a running thread belongs to.
    pub(crate) fn proc_mut(&self, proc_name: &str) -> std::cell::RefMut<'_, ProcState> {
        std::cell::RefMut::map(self.procs.borrow_mut(), |p| {
            p.get_mut(proc_name)
                .expect("a running thread's process is known")
        })
    }

    pub(crate) fn platform(&self) -> Result<Rc<Platform>, RunError> {
        self.platform.clone().ok_or(RunError::NoTopology)
    }

    /// Records a new mapping under `name` (or the errno).
    pub(crate) fn record_mapping(
        &self,
        out: &mut StepResult,
        proc_name: &str,
        name: &str,
        len: u64,
        res: Result<Va, Errno>,
    ) {
        match res {
            Ok(va) => {
                self.proc_mut(proc_name)
                    .mappings
                    .insert(name.to_owned(), (va, len));
            }
            Err(e) => out.errno = Some(e),
        }
    }

    /// Takes a handle out of its process for an access (so no borrow is held across the access's awaits)
    /// and returns it with the access length in bytes.
    pub(crate) fn take_handle(
        &self,
        proc_name: &str,
        handle: &str,
        offset: u64,
        len: Option<u64>,
    ) -> Result<(DmaSgHandle, usize), RunError> {
        let h = self
            .proc_mut(proc_name)
            .handles
            .remove(handle)
            .ok_or_else(|| RunError::NoHandle {
                handle: handle.to_owned(),
                process: proc_name.to_owned(),
            })?;
        let total = h.range().len();
        let bytes = len.unwrap_or(total.saturating_sub(offset));
        if offset.checked_add(bytes).is_none_or(|e| e > total) {
            self.put_handle(proc_name, handle, h);
            return Err(RunError::PastHandleEnd {
                handle: handle.to_owned(),
                offset,
                bytes,
                total,
            });
        }
        Ok((
            h,
            usize::try_from(bytes).expect("a handle's range fits memory"),
        ))
    }

    pub(crate) fn put_handle(&self, proc_name: &str, handle: &str, h: DmaSgHandle) {
        self.proc_mut(proc_name)
            .handles
            .insert(handle.to_owned(), h);
    }

    /// Records the result of a dmirror command that returns data, copying the data to `ptr` first when the
    /// step names one (the driver's `copy_to_user` into the selftests' `buffer.mirror`).
    pub(crate) async fn record_data(
        &self,
        out: &mut StepResult,
        pid: Pid,
        proc_name: &str,
        ptr: Option<&AddrExpr>,
        res: Result<DmirrorResult, Errno>,
    ) -> Result<(), RunError> {
        match res {
            Ok(mut res) => {
                if let Some(p) = ptr {
                    let (dst, _) = self.resolve(proc_name, p)?;
                    if let Err(e) = self.kernel.copy_to_user(pid, dst, &res.data).await {
                        out.errno = Some(e);
                    }
                }
                // The device's buffer moves to the step's data (no second copy of it); the step keeps
                // only the counts of the result.
                out.data = Some(std::mem::take(&mut res.data));
                out.dm = Some(res);
            }
            Err(e) => out.errno = Some(e),
        }
        Ok(())
    }

    pub(crate) fn fd(&self, proc_name: &str, fd: &str) -> Result<Rc<Dmirror>, RunError> {
        self.procs.borrow()[proc_name]
            .fds
            .get(fd)
            .cloned()
            .ok_or_else(|| RunError::FdNotOpen {
                fd: fd.to_owned(),
                process: proc_name.to_owned(),
            })
    }

    /// Samples the residency gauges: pages in use on each RAM node (series `residency.node<N>`) and the
    /// pages of each dmirror device's memory holding data (`residency.<device>`). Sampled after every step:
    /// *coarse*, changes inside a step are not seen.
    fn sample_residency(&self) {
        let sim = &self.kernel.sim;
        for (i, &bytes) in self.scn.sim.memory.iter().enumerate() {
            let node = u32::try_from(i).expect("few nodes");
            let used =
                (bytes / peerdma_core::PAGE_SIZE).saturating_sub(self.kernel.nr_free_node(node));
            sim.gauge(
                Track::device(format!("node{i}")),
                "residency",
                i64::try_from(used).unwrap_or(i64::MAX),
            );
        }
        for (name, d) in &self.devices {
            sim.gauge(
                Track::device(name.as_str()),
                "residency",
                i64::try_from(d.nr_resident()).unwrap_or(i64::MAX),
            );
        }
    }

    /// Adds each `pci` device's IOMMU statistics to the counters (`iommu.<device>.<stat>`, non-zero ones).
    fn count_iommu_stats(&self, sim: &Sim) {
        let Some(platform) = &self.platform else {
            return;
        };
        for (name, &id) in &self.pci {
            let Ok(d) = platform.device(id) else {
                continue;
            };
            let st = d.domain().stats().clone();
            for (stat, n) in [
                ("iotlb_hits", st.iotlb_hits),
                ("iotlb_misses", st.iotlb_misses),
                ("iotlb_evictions", st.iotlb_evictions),
                ("stale_hits", st.stale_hits),
                ("faults", st.faults),
                ("flushes", st.flushes),
                ("range_invalidations", st.range_invalidations),
                ("fq_queued", st.fq_queued),
                ("iova_allocs", st.iova_allocs),
            ] {
                if n > 0 {
                    sim.count(&format!("iommu.{name}.{stat}"), n);
                }
            }
        }
    }

    fn finish(&self, sim: &Sim, seed: u64, explore: bool, outcome: &RunOutcome) -> Report {
        self.count_iommu_stats(sim);
        let violations = self.kernel.oracle_violations();
        let failures = self.failures.borrow().clone();
        let outcome = if let Some(v) = violations.first() {
            let mut s = v.to_string();
            if let Some((loc, op)) = self.current.borrow().get(&v.agent) {
                let _ = write!(s, "\n  in step `{op}` at {}:{loc}", self.scn.path);
            }
            let pending = sim.pending();
            if !pending.is_empty() {
                let _ = write!(s, "\n  while pending: {}", self.pending_report(&pending));
            }
            Outcome::OracleViolation(s)
        } else {
            match outcome {
                RunOutcome::Completed if failures.is_empty() => Outcome::Passed,
                RunOutcome::Completed => Outcome::ExpectationFailed,
                RunOutcome::Deadlock { blocked } => Outcome::Deadlock(blocked.clone()),
                RunOutcome::TimeLimit { limit, pending } => Outcome::TimeLimit(format!(
                    "time limit {} (`[sim] time_limit`) reached; pending: {}",
                    SimDuration::from_nanos(limit.0),
                    self.pending_report(pending)
                )),
                RunOutcome::Limit(r) => {
                    let pending = sim.pending();
                    Outcome::Limit(if pending.is_empty() {
                        r.clone()
                    } else {
                        format!("{r}; pending: {}", self.pending_report(&pending))
                    })
                }
                RunOutcome::Stopped(r) => Outcome::Stopped(r.clone()),
            }
        };
        let trace = sim.take_trace();
        let counters = sim.metrics().counters;
        let measured = crate::report::Measured::new(sim.stats(), &counters);
        let agent_processes = self
            .scn
            .threads
            .iter()
            .map(|t| (t.name.clone(), t.process.clone()))
            .collect();
        Report {
            schema_version: crate::report::SCHEMA_VERSION,
            scenario: self.scn.path.clone(),
            seed,
            explore,
            time_mode: match self.scn.sim.time {
                TimeMode::Calibrated => "calibrated".into(),
                TimeMode::Zero => "zero".into(),
            },
            outcome,
            end_time: sim.now(),
            events: sim.events_delivered(),
            schedule_hash: sim.schedule_hash(),
            expectations: *self.expectations.borrow(),
            failures,
            metrics: counters,
            steps: self.records.borrow().clone(),
            latency: measured.latency,
            bandwidth: measured.bandwidth,
            iotlb: measured.iotlb,
            atc: measured.atc,
            trace_dropped: sim.trace_dropped(),
            trace,
            series: measured.series,
            agent_processes,
        }
    }
}
