//! The runner: builds a world from a parsed [`Scenario`], runs every thread as a simulated agent, checks each
//! step's `expect`, and returns a [`Report`].
//!
//! Threads start when their process exists (a forked child's threads start at the `fork`). A process exits
//! when its last thread finishes or a thread runs `exit`; `wait` in the parent returns then. Mapping names are
//! per process and inherited by a forked child; device files (`open`) are per process and not inherited (a
//! child opens its own, as the HMM selftests do: the mirror binds to the opener's address space).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::rc::Rc;

use peerdma_core::{DeviceId, Errno, PAGE_SIZE, Pid, Range, SimDuration, SimTime, Va};
use peerdma_devices::{Dmirror, DmirrorCosts, DmirrorDevice, DmirrorMemory, DmirrorResult};
use peerdma_dma::{DmaCosts, DmaOp, DmaSgFlags, DmaSgHandle, DmaSpace, Platform, get_user_dma_sg};
use peerdma_iommu::{DomainConfig, DomainType};
use peerdma_mm::{
    Advice as MmAdvice, DeviceGrant, FrameTranslation, Kernel, MmCosts, MmapArgs, Prot as MmProt,
    Signal as MmSignal,
};
use peerdma_sim::{RngStream, RunOutcome, Sim, SimConfig, WaitQueue};

use crate::ast::{
    AddrExpr, Advice, DeviceKind, DeviceMemoryKind, DmaMode, Expect, IommuMode, Op, Scenario,
    Signal, SleepSpec, Step, TimeMode, WriteSource,
};
use crate::report::{ExpectFailure, Outcome, Report, StepRecord};

/// The device id DMA through `pin`s is attributed to (a generic DMA engine, not a declared device).
const DMA_ENGINE: DeviceId = DeviceId(u32::MAX);

/// Command-line overrides of the scenario's `[sim]` table.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Overrides `sim.seed`.
    pub seed: Option<u64>,
    /// Overrides `sim.explore`.
    pub explore: Option<bool>,
    /// Record the step log in the report.
    pub step_log: bool,
}

/// What a step produced, compared against its `expect`.
#[derive(Clone, Debug, Default)]
struct StepResult {
    errno: Option<Errno>,
    signal: Option<MmSignal>,
    dm: Option<DmirrorResult>,
    data: Option<Vec<u8>>,
    /// A `dma.map` handle's merged segments (`kind`, bytes) and first DMA address.
    segments: Option<Vec<(String, u64)>>,
    dma_addr: Option<u64>,
    /// Pages a `dma.map` step pinned.
    pinned: Option<u64>,
}

#[derive(Debug, Default)]
struct ProcState {
    pid: Option<Pid>,
    mappings: BTreeMap<String, (Va, u64)>,
    fds: BTreeMap<String, Rc<Dmirror>>,
    pins: BTreeMap<String, (peerdma_mm::PinnedPages, Va)>,
    handles: BTreeMap<String, DmaSgHandle>,
    live_threads: usize,
    exited: bool,
}

#[derive(Debug)]
struct World {
    kernel: Rc<Kernel>,
    scn: Scenario,
    procs: RefCell<BTreeMap<String, ProcState>>,
    files: BTreeMap<String, u32>,
    devices: BTreeMap<String, Rc<DmirrorDevice>>,
    /// The DMA platform, when the scenario has a `[topology]`.
    platform: Option<Rc<Platform>>,
    /// `pci` devices by name.
    pci: BTreeMap<String, DeviceId>,
    /// BAR exports by name.
    exports: BTreeMap<String, peerdma_mm::MmioId>,
    dma_page_cost: SimDuration,
    /// The access path of the scenario's DMA engine (`dma.write` through a pin).
    dma_engine: DmaSpace,
    proc_wq: WaitQueue,
    records: RefCell<Vec<StepRecord>>,
    failures: RefCell<Vec<ExpectFailure>>,
    expectations: RefCell<u64>,
    step_log: bool,
}

/// Runs `scn` to completion and returns its report.
pub fn run(scn: &Scenario, opts: &RunOptions) -> Report {
    let seed = opts.seed.unwrap_or(scn.sim.seed);
    let explore = opts.explore.unwrap_or(scn.sim.explore);
    let sim = Sim::new(SimConfig {
        seed,
        explore,
        jitter: scn.sim.jitter,
        time_limit: SimTime(scn.sim.time_limit.as_nanos()),
        trace: true,
    });
    // Every cost table comes from one timing: `[sim] time` with the `[timing]` overrides.
    let timing = scn.timing();
    let mm_costs = MmCosts::from_timing(&timing);
    let dm_costs = DmirrorCosts::from_timing(&timing);
    let kernel = Kernel::new_numa(&sim, &scn.sim.memory, mm_costs);
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
            kernel.create_file(&f.name, f.size, false)
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
            (
                d.name.clone(),
                DmirrorDevice::new(&kernel, id, mem, d.size, dm_costs.clone()),
            )
        })
        .collect();
    let dma_costs = DmaCosts::from_timing(&timing);
    let (platform, pci, exports) = match build_platform(scn, &kernel, dma_costs) {
        Ok(p) => p,
        Err(msg) => {
            sim.stop(msg);
            (None, BTreeMap::new(), BTreeMap::new())
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
        dma_engine: DmaSpace::new(&kernel, DMA_ENGINE, "dma_engine", 1),
        devices,
        platform,
        pci,
        exports,
        proc_wq: WaitQueue::new(&sim),
        records: RefCell::new(Vec::new()),
        failures: RefCell::new(Vec::new()),
        expectations: RefCell::new(0),
        step_log: opts.step_log,
    });
    {
        let w = world.clone();
        sim.spawn("init", async move { w.init().await });
    }
    let outcome = sim.run();
    world.finish(&sim, seed, explore, &outcome)
}

type PlatformParts = (
    Option<Rc<Platform>>,
    BTreeMap<String, DeviceId>,
    BTreeMap<String, peerdma_mm::MmioId>,
);

/// Builds the DMA platform from `[topology]` and the `pci` devices: attaches each to its PCI function with
/// its IOMMU domain, adds its P2P resources and its BAR exports. An error is a run-time refusal of the
/// kernel (a resource that does not fit its BAR), reported as the run's stop reason.
fn build_platform(
    scn: &Scenario,
    kernel: &Rc<Kernel>,
    costs: DmaCosts,
) -> Result<PlatformParts, String> {
    let Some(spec) = &scn.topology else {
        return Ok((None, BTreeMap::new(), BTreeMap::new()));
    };
    let topo = spec.build().map_err(|e| e.to_string())?;
    let platform = Platform::new(kernel.clone(), topo, costs);
    let mut pci = BTreeMap::new();
    let mut exports = BTreeMap::new();
    for (i, d) in scn.devices.iter().enumerate() {
        if d.kind != DeviceKind::Pci {
            continue;
        }
        let id = DeviceId(u32::try_from(i).expect("few devices"));
        let node_name = d.node.as_deref().unwrap_or(&d.name);
        let node = platform
            .topology()
            .lookup(node_name)
            .ok_or_else(|| format!("device {}: no node {node_name}", d.name))?;
        let domain = DomainConfig::with_type(match d.iommu {
            IommuMode::Identity => DomainType::Identity,
            IommuMode::Dma => DomainType::Dma,
            IommuMode::DmaLazy => DomainType::DmaFq,
        });
        platform
            .add_device(id, node, &d.name, domain)
            .map_err(|e| format!("device {}: {}", d.name, e.name()))?;
        for r in &d.p2p {
            platform
                .p2p_add_resource(id, r.bar, r.size, r.offset)
                .map_err(|e| {
                    format!(
                        "device {}: pci_p2pdma_add_resource(bar {}, size {:#x}, offset {:#x}) failed with -{}",
                        d.name,
                        r.bar,
                        r.size,
                        r.offset,
                        e.name()
                    )
                })?;
            platform
                .p2p_publish(id, r.publish)
                .map_err(|e| e.name().to_owned())?;
        }
        for x in &d.exports {
            let mmio = platform
                .export_bar(id, x.bar, x.offset, x.len, x.revocable)
                .map_err(|e| {
                    format!(
                        "device {}: export `{}` does not fit BAR {}: -{}",
                        d.name,
                        x.name,
                        x.bar,
                        e.name()
                    )
                })?;
            exports.insert(x.name.clone(), mmio);
        }
        pci.insert(d.name.clone(), id);
    }
    Ok((Some(platform), pci, exports))
}

impl World {
    async fn init(self: Rc<Self>) {
        for f in &self.scn.files {
            let id = self.files[&f.name];
            let mut data = vec![0u8; usize::try_from(f.size).expect("file fits memory")];
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
            let res = self.step(&t.process, step, &mut rng).await;
            self.check(&t.name, step, &res, start);
            if matches!(step.op, Op::Exit) {
                break;
            }
        }
        let last = {
            let mut p = self.procs.borrow_mut();
            let st = p.get_mut(&t.process).expect("thread's process");
            st.live_threads -= 1;
            st.live_threads == 0 && !st.exited
        };
        if last || matches!(t.steps.last().map(|s| &s.op), Some(Op::Exit)) {
            self.exit_process(&t.process).await;
        }
    }

    async fn exit_process(&self, name: &str) {
        let (pid, fds) = {
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
            )
        };
        for m in fds.values() {
            m.close().await;
        }
        self.kernel.exit(pid).await;
        self.proc_wq.wake_up_all();
    }

    fn pid(&self, proc_name: &str) -> Pid {
        self.procs.borrow()[proc_name]
            .pid
            .expect("a running thread's process has a pid")
    }

    /// Resolves an address expression in `proc_name`, with the length left in its mapping.
    fn resolve(&self, proc_name: &str, a: &AddrExpr) -> Result<(Va, Option<u64>), String> {
        match a {
            AddrExpr::Raw(v) => Ok((Va::from_raw(*v), None)),
            AddrExpr::Sym { name, offset } => {
                let p = self.procs.borrow();
                let (base, len) = *p[proc_name].mappings.get(name).ok_or_else(|| {
                    format!(
                        "mapping `{name}` does not exist in process `{proc_name}` at this point"
                    )
                })?;
                let off = u64::try_from(*offset)
                    .map_err(|_| format!("negative offset {offset} from `{name}`"))?;
                Ok((base.add(off), Some(len.saturating_sub(off))))
            }
        }
    }

    #[expect(
        clippy::too_many_lines,
        reason = "one arm per operation reads best in one place"
    )]
    async fn step(
        &self,
        proc_name: &str,
        step: &Step,
        rng: &mut RngStream,
    ) -> Result<StepResult, String> {
        let kernel = &self.kernel;
        let pid = self.pid(proc_name);
        let mut out = StepResult::default();
        match &step.op {
            Op::Mmap {
                name,
                len,
                prot,
                flags,
                at,
                file,
                offset,
                align,
            } => {
                let addr = match at {
                    Some(a) => Some(self.resolve(proc_name, a)?.0),
                    None => None,
                };
                let extra = align.unwrap_or(0);
                let args = MmapArgs {
                    addr,
                    len: len.saturating_add(extra),
                    prot: mm_prot(*prot),
                    shared: flags.shared,
                    private: !flags.shared,
                    anonymous: flags.anonymous,
                    fixed: flags.fixed,
                    fixed_noreplace: flags.fixed_noreplace,
                    populate: flags.populate,
                    hugetlb: flags.hugetlb,
                    file: file.as_ref().map(|f| self.files[f]),
                    offset: *offset,
                    name: name.clone(),
                };
                match kernel.mmap(pid, &args).await {
                    Ok(va) => {
                        let va = match align {
                            Some(a) if *a > 0 => va.align_up(*a).expect("inside the reservation"),
                            _ => va,
                        };
                        if let Some(n) = name {
                            self.proc_mut(proc_name)
                                .mappings
                                .insert(n.clone(), (va, *len));
                        }
                    }
                    Err(e) => out.errno = Some(e),
                }
            }
            Op::Munmap { at, len } => {
                let (va, _) = self.resolve(proc_name, at)?;
                out.errno = kernel.munmap(pid, va, *len).await.err();
            }
            Op::Mprotect { at, len, prot } => {
                let (va, _) = self.resolve(proc_name, at)?;
                out.errno = kernel.mprotect(pid, va, *len, mm_prot(*prot)).await.err();
            }
            Op::Madvise { at, len, advice } => {
                let (va, _) = self.resolve(proc_name, at)?;
                let a = match advice {
                    Advice::DontNeed => MmAdvice::DontNeed,
                    Advice::HugePage => MmAdvice::HugePage,
                    Advice::NoHugePage => MmAdvice::NoHugePage,
                    Advice::Free => MmAdvice::Free,
                    Advice::Collapse => MmAdvice::Collapse,
                };
                out.errno = kernel.madvise(pid, va, *len, a).await.err();
            }
            Op::Store { at, len, pattern } => {
                let (va, rest) = self.resolve(proc_name, at)?;
                let n = len.or(rest).ok_or("`store` at a raw address needs `len`")?;
                let mut data = vec![0u8; usize::try_from(n).map_err(|_| "length too large")?];
                pattern.fill(&mut data);
                out.signal = kernel.store(pid, va, &data).await.err();
            }
            Op::Load { at, len } => {
                let (va, rest) = self.resolve(proc_name, at)?;
                let n = len.or(rest).ok_or("`load` at a raw address needs `len`")?;
                let mut data = vec![0u8; usize::try_from(n).map_err(|_| "length too large")?];
                match kernel.load(pid, va, &mut data).await {
                    Ok(()) => out.data = Some(data),
                    Err(s) => out.signal = Some(s),
                }
            }
            Op::Pwrite {
                file,
                offset,
                len,
                pattern,
            } => {
                let mut data = vec![0u8; usize::try_from(*len).map_err(|_| "length too large")?];
                pattern.fill(&mut data);
                out.errno = kernel.pwrite(self.files[file], *offset, &data).await.err();
            }
            Op::Pread { file, offset, len } => {
                let mut data = vec![0u8; usize::try_from(*len).map_err(|_| "length too large")?];
                match kernel.pread(self.files[file], *offset, &mut data).await {
                    Ok(_) => out.data = Some(data),
                    Err(e) => out.errno = Some(e),
                }
            }
            Op::Fork { child } => match kernel.fork(pid).await {
                Ok(cpid) => {
                    let mappings = self.procs.borrow()[proc_name].mappings.clone();
                    let no_threads = {
                        let mut procs = self.procs.borrow_mut();
                        let st = procs.entry(child.clone()).or_default();
                        st.pid = Some(cpid);
                        st.mappings = mappings;
                        st.live_threads == 0
                    };
                    self.proc_wq.wake_up_all();
                    if no_threads {
                        self.exit_process(child).await;
                    }
                }
                Err(e) => out.errno = Some(e),
            },
            Op::Wait { child } => {
                let procs = &self.procs;
                self.proc_wq
                    .wait_event(|| procs.borrow().get(child).is_some_and(|p| p.exited))
                    .await;
            }
            Op::Exit => self.exit_process(proc_name).await,
            Op::Sleep(s) => {
                let d = match s {
                    SleepSpec::Fixed(d) => *d,
                    SleepSpec::Random(lo, hi) => {
                        SimDuration(rng.between(lo.as_nanos(), hi.as_nanos()))
                    }
                };
                kernel.sim.sleep(d).await;
            }
            Op::Open { dev, fd } => match Dmirror::open(&self.devices[dev], pid) {
                Ok(m) => {
                    self.proc_mut(proc_name).fds.insert(fd.clone(), m);
                }
                Err(e) => out.errno = Some(e),
            },
            Op::Close { fd } => {
                let m = self.proc_mut(proc_name).fds.remove(fd);
                match m {
                    Some(m) => m.close().await,
                    None => out.errno = Some(Errno::EBADF),
                }
            }
            Op::DmirrorRead { fd, at, pages, ptr } => {
                let m = self.fd(proc_name, fd)?;
                let (va, _) = self.resolve(proc_name, at)?;
                let res = m.read(va, *pages).await;
                self.record_data(&mut out, pid, proc_name, ptr.as_ref(), res)
                    .await?;
            }
            Op::DmirrorWrite { fd, at, pages, src } => {
                let m = self.fd(proc_name, fd)?;
                let (va, _) = self.resolve(proc_name, at)?;
                let n = usize::try_from(pages.saturating_mul(PAGE_SIZE))
                    .map_err(|_| "too many pages")?;
                let mut data = vec![0u8; n.min(1 << 30)];
                let copied = match src {
                    WriteSource::Pattern(p) => {
                        p.fill(&mut data);
                        Ok(())
                    }
                    WriteSource::Ptr(p) => {
                        let (srcva, _) = self.resolve(proc_name, p)?;
                        kernel.copy_from_user(pid, srcva, &mut data).await
                    }
                };
                match copied {
                    Err(e) => out.errno = Some(e),
                    Ok(()) => match m.write(va, *pages, &data).await {
                        Ok(res) => out.dm = Some(res),
                        Err(e) => out.errno = Some(e),
                    },
                }
            }
            Op::DmirrorMmap {
                fd,
                name,
                len,
                prot,
            } => {
                self.fd(proc_name, fd)?;
                match kernel
                    .mmap_driver_pages(pid, *len, mm_prot(*prot), false)
                    .await
                {
                    Ok(va) => {
                        self.proc_mut(proc_name)
                            .mappings
                            .insert(name.clone(), (va, *len));
                    }
                    Err(e) => out.errno = Some(e),
                }
            }
            Op::DmirrorMigrateToDev { fd, at, pages, ptr } => {
                let m = self.fd(proc_name, fd)?;
                let (va, _) = self.resolve(proc_name, at)?;
                let res = m.migrate_to_dev(va, *pages).await;
                self.record_data(&mut out, pid, proc_name, ptr.as_ref(), res)
                    .await?;
            }
            Op::DmirrorMigrateToSys { fd, at, pages } => {
                let m = self.fd(proc_name, fd)?;
                let (va, _) = self.resolve(proc_name, at)?;
                match m.migrate_to_sys(va, *pages).await {
                    Ok(res) => out.dm = Some(res),
                    Err(e) => out.errno = Some(e),
                }
            }
            Op::DmirrorExclusive { fd, at, pages } => {
                let m = self.fd(proc_name, fd)?;
                let (va, _) = self.resolve(proc_name, at)?;
                let res = m.exclusive(va, *pages).await;
                self.record_data(&mut out, pid, proc_name, None, res)
                    .await?;
            }
            Op::DmirrorCheckExclusive { fd, at, pages } => {
                let m = self.fd(proc_name, fd)?;
                let (va, _) = self.resolve(proc_name, at)?;
                if let Err(e) = m.check_exclusive(va, *pages).await {
                    out.errno = Some(e);
                }
            }
            Op::Mremap {
                at,
                len,
                new_len,
                flags,
                to,
                name,
            } => {
                let (va, _) = self.resolve(proc_name, at)?;
                let mut flags = *flags;
                if let Some(t) = to {
                    flags.new_addr = Some(self.resolve(proc_name, t)?.0);
                }
                match kernel.mremap(pid, va, *len, *new_len, flags).await {
                    Ok(nva) => {
                        self.proc_mut(proc_name)
                            .mappings
                            .insert(name.clone(), (nva, *new_len));
                    }
                    Err(e) => out.errno = Some(e),
                }
            }
            Op::Pin {
                at,
                pages,
                flags,
                name,
            } => {
                let (va, _) = self.resolve(proc_name, at)?;
                match kernel.get_user_pages(pid, va, *pages, *flags).await {
                    Ok(pinned) => {
                        out.dm = Some(DmirrorResult {
                            cpages: pinned.len() as u64,
                            ..DmirrorResult::default()
                        });
                        self.proc_mut(proc_name)
                            .pins
                            .insert(name.clone(), (pinned, va));
                    }
                    Err(e) => out.errno = Some(e),
                }
            }
            Op::Unpin { pin } => {
                let p = self.proc_mut(proc_name).pins.remove(pin);
                if p.is_none() {
                    return Err(format!("pin `{pin}` is not held by process `{proc_name}`"));
                }
            }
            Op::DmaWrite { pin, pattern } => {
                let (frames, va) = {
                    let procs = self.procs.borrow();
                    let (p, va) = procs[proc_name].pins.get(pin).ok_or_else(|| {
                        format!("pin `{pin}` is not held by process `{proc_name}`")
                    })?;
                    (p.frames().to_vec(), *va)
                };
                let mut data = vec![0u8; frames.len() * 4096];
                pattern.fill(&mut data);
                // The scenario's DMA engine writes through its pins one page at a time (one tag), each
                // page landing `dma_page` after the previous one (peerdma_dma::space).
                let mut ids = Vec::with_capacity(frames.len());
                for (i, f) in frames.iter().enumerate() {
                    let page_va = va.add(i as u64 * PAGE_SIZE);
                    let t = FrameTranslation {
                        frame: *f,
                        generation: kernel.frame_generation(*f).unwrap_or(0),
                        grant: DeviceGrant::Pin { pid, va: page_va },
                    };
                    let op = DmaOp::Write(data[i * 4096..(i + 1) * 4096].to_vec());
                    match self
                        .dma_engine
                        .submit_frame(t, op, self.dma_page_cost)
                        .await
                    {
                        Ok(id) => ids.push(id),
                        Err(_) => break,
                    }
                }
                for id in ids {
                    // A refused landing is the oracle's to report; the step itself has no errno.
                    let _ = self.dma_engine.wait(id).await;
                }
            }
            Op::DmirrorFlags { fd, fail_alloc } => {
                self.fd(proc_name, fd)?.set_flags(*fail_alloc);
            }
            Op::Truncate { file, size } => {
                out.errno = kernel.truncate(self.files[file], *size).await.err();
            }
            Op::PunchHole { file, offset, len } => {
                out.errno = kernel
                    .punch_hole(self.files[file], *offset, *len)
                    .await
                    .err();
            }
            Op::Gup { at, pages, flags } => {
                let (va, _) = self.resolve(proc_name, at)?;
                match kernel.get_user_pages(pid, va, *pages, *flags).await {
                    Ok(pinned) => {
                        out.dm = Some(DmirrorResult {
                            cpages: pinned.len() as u64,
                            ..DmirrorResult::default()
                        });
                    }
                    Err(e) => out.errno = Some(e),
                }
            }
            Op::P2pmemMmap {
                dev,
                name,
                len,
                prot,
                shared,
                offset,
            } => {
                let platform = self.platform()?;
                let pgoff = if offset % PAGE_SIZE == 0 {
                    offset / PAGE_SIZE
                } else {
                    u64::MAX
                };
                let res = if pgoff == u64::MAX {
                    Err(Errno::EINVAL)
                } else {
                    platform
                        .p2pmem_mmap(pid, self.pci[dev], *len, mm_prot(*prot), *shared, pgoff)
                        .await
                };
                self.record_mapping(&mut out, proc_name, name, *len, res);
            }
            Op::BarMmap {
                export,
                name,
                offset,
                len,
                prot,
            } => {
                let platform = self.platform()?;
                let res = platform
                    .mmap_bar(pid, self.exports[export], *offset, *len, mm_prot(*prot))
                    .await;
                self.record_mapping(&mut out, proc_name, name, *len, res);
            }
            Op::DmaMap {
                dev,
                at,
                len,
                mode,
                write,
                p2p,
                name,
            } => {
                let platform = self.platform()?;
                let (va, _) = self.resolve(proc_name, at)?;
                let range = Range::from_len(va, *len)
                    .ok_or_else(|| format!("range at {va} of {len:#x} bytes wraps"))?;
                let mut flags = DmaSgFlags::empty();
                flags.set(DmaSgFlags::WRITE, *write);
                flags.set(DmaSgFlags::P2P, *p2p);
                flags.set(DmaSgFlags::LONGTERM, *mode == DmaMode::LongTerm);
                flags.set(DmaSgFlags::MIRROR, *mode == DmaMode::Mirror);
                match get_user_dma_sg(&platform, pid, range, self.pci[dev], flags).await {
                    Ok(h) => {
                        let segs = h.segments();
                        out.dma_addr = segs.first().map(|s| s.addr.raw());
                        out.segments = Some(
                            segs.iter()
                                .map(|s| (s.kind.name().to_owned(), s.len))
                                .collect(),
                        );
                        out.pinned = Some(h.nr_pinned() as u64);
                        self.proc_mut(proc_name).handles.insert(name.clone(), h);
                    }
                    Err(e) => out.errno = Some(e),
                }
            }
            Op::DmaSgWrite {
                handle,
                offset,
                len,
                pattern,
            } => {
                let (h, bytes) = self.take_handle(proc_name, handle, *offset, *len)?;
                let mut data = vec![0u8; bytes];
                pattern.fill(&mut data);
                out.errno = h.write(*offset, &data).await.err();
                self.put_handle(proc_name, handle, h);
            }
            Op::DmaSgRead {
                handle,
                offset,
                len,
            } => {
                let (h, bytes) = self.take_handle(proc_name, handle, *offset, *len)?;
                match h.read(*offset, bytes).await {
                    Ok(d) => out.data = Some(d),
                    Err(e) => out.errno = Some(e),
                }
                self.put_handle(proc_name, handle, h);
            }
            Op::DmaSgRelease { handle } => {
                let h = self
                    .proc_mut(proc_name)
                    .handles
                    .remove(handle)
                    .ok_or_else(|| {
                        format!("dma handle `{handle}` is not held by process `{proc_name}`")
                    })?;
                h.release().await;
            }
            Op::DeviceRemove { dev } => {
                let platform = self.platform()?;
                out.errno = platform.remove_device(self.pci[dev]).await.err();
            }
            Op::DmabufMoveNotify { export } => {
                self.platform()?.dmabuf_move_notify(self.exports[export]);
            }
            Op::DmaRaw {
                dev,
                addr,
                len,
                pattern,
            } => {
                let platform = self.platform()?;
                let bytes = usize::try_from(*len).map_err(|_| format!("len {len:#x} too large"))?;
                let mut buf = vec![0u8; bytes];
                let data = pattern.as_ref().map(|p| {
                    let mut d = vec![0u8; bytes];
                    p.fill(&mut d);
                    d
                });
                match platform
                    .raw_dma(self.pci[dev], *addr, data.as_deref(), &mut buf)
                    .await
                {
                    Ok(()) if data.is_none() => out.data = Some(buf),
                    Ok(()) => {}
                    Err(e) => out.errno = Some(e),
                }
            }
            Op::DmirrorRelease { fd } => {
                if let Err(e) = self.fd(proc_name, fd)?.release().await {
                    out.errno = Some(e);
                }
            }
            Op::DmirrorSnapshot { fd, at, pages } => {
                let m = self.fd(proc_name, fd)?;
                let (va, _) = self.resolve(proc_name, at)?;
                let res = m.snapshot(va, *pages).await;
                self.record_data(&mut out, pid, proc_name, None, res)
                    .await?;
            }
        }
        Ok(out)
    }

    /// Returns the state of a process a running thread belongs to.
    fn proc_mut(&self, proc_name: &str) -> std::cell::RefMut<'_, ProcState> {
        std::cell::RefMut::map(self.procs.borrow_mut(), |p| {
            p.get_mut(proc_name)
                .expect("a running thread's process is known")
        })
    }

    fn platform(&self) -> Result<Rc<Platform>, String> {
        self.platform
            .clone()
            .ok_or_else(|| "this step needs a `[topology]`".to_owned())
    }

    /// Records a new mapping under `name` (or the errno).
    fn record_mapping(
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
    fn take_handle(
        &self,
        proc_name: &str,
        handle: &str,
        offset: u64,
        len: Option<u64>,
    ) -> Result<(DmaSgHandle, usize), String> {
        let h = self
            .proc_mut(proc_name)
            .handles
            .remove(handle)
            .ok_or_else(|| format!("dma handle `{handle}` is not held by process `{proc_name}`"))?;
        let total = h.range().len();
        let bytes = len.unwrap_or(total.saturating_sub(offset));
        if offset.checked_add(bytes).is_none_or(|e| e > total) {
            let msg = format!(
                "offset {offset:#x} + {bytes:#x} bytes passes the end of handle `{handle}` ({total:#x} bytes)"
            );
            self.put_handle(proc_name, handle, h);
            return Err(msg);
        }
        Ok((
            h,
            usize::try_from(bytes).expect("a handle's range fits memory"),
        ))
    }

    fn put_handle(&self, proc_name: &str, handle: &str, h: DmaSgHandle) {
        self.proc_mut(proc_name)
            .handles
            .insert(handle.to_owned(), h);
    }

    /// Records the result of a dmirror command that returns data, copying the data to `ptr` first when the
    /// step names one (the driver's `copy_to_user` into the selftests' `buffer.mirror`).
    async fn record_data(
        &self,
        out: &mut StepResult,
        pid: Pid,
        proc_name: &str,
        ptr: Option<&AddrExpr>,
        res: Result<DmirrorResult, Errno>,
    ) -> Result<(), String> {
        match res {
            Ok(res) => {
                if let Some(p) = ptr {
                    let (dst, _) = self.resolve(proc_name, p)?;
                    if let Err(e) = self.kernel.copy_to_user(pid, dst, &res.data).await {
                        out.errno = Some(e);
                    }
                }
                out.data = Some(res.data.clone());
                out.dm = Some(res);
            }
            Err(e) => out.errno = Some(e),
        }
        Ok(())
    }

    fn fd(&self, proc_name: &str, fd: &str) -> Result<Rc<Dmirror>, String> {
        self.procs.borrow()[proc_name]
            .fds
            .get(fd)
            .cloned()
            .ok_or_else(|| format!("`{fd}` is not open in process `{proc_name}`"))
    }

    /// Checks a step's result against its `expect` and records the outcome.
    fn check(&self, thread: &str, step: &Step, res: &Result<StepResult, String>, start: SimTime) {
        let mut fails = Vec::new();
        let e: &Expect = &step.expect;
        // Disarm the oracle whatever happened; what it saw is checked below.
        let seen = e.violation.map(|_| self.kernel.take_expected_violations());
        let summary;
        match res {
            Err(msg) => {
                summary = format!("error: {msg}");
                fails.push(msg.clone());
            }
            Ok(r) => {
                summary = summarize(r);
                if let (Some(kind), Some(seen)) = (e.violation, &seen) {
                    if seen.is_empty() {
                        fails.push(format!(
                            "expected the oracle to report a {kind} violation, it reported none"
                        ));
                    } else {
                        self.kernel
                            .sim
                            .count("oracle.expected_violations", seen.len() as u64);
                    }
                }
                let want_errno = e.errno.unwrap_or(None);
                *self.expectations.borrow_mut() += 1;
                if r.errno != want_errno && !e.any_errno {
                    fails.push(format!(
                        "expected {}, got {}",
                        errno_text(want_errno),
                        errno_text(r.errno)
                    ));
                }
                match (e.signal, r.signal) {
                    (None, Some(s)) => fails.push(format!("unexpected {}", signal_text(s))),
                    (Some(want), None) => {
                        fails.push(format!("expected {}, the access completed", want.name()));
                    }
                    (Some(want), Some(got)) if !signal_matches(want, got) => {
                        fails.push(format!(
                            "expected {}, got {}",
                            want.name(),
                            signal_text(got)
                        ));
                    }
                    _ => {}
                }
                if r.errno.is_none() {
                    if let Some(want) = e.cpages {
                        let got = r.dm.as_ref().map_or(0, |d| d.cpages);
                        if got != want {
                            fails.push(format!("expected cpages = {want}, got {got}"));
                        }
                    }
                    if let Some(want) = e.faults {
                        let got = r.dm.as_ref().map_or(0, |d| d.faults);
                        if got != want {
                            fails.push(format!("expected faults = {want}, got {got}"));
                        }
                    }
                    if let (Some(p), Some(d)) = (&e.data, &r.data)
                        && let Err(m) = p.check(d)
                    {
                        fails.push(format!(
                            "data differs from `{p}` at byte {:#x}: expected {:02x?}, found {:02x?}",
                            m.offset, m.expected, m.found
                        ));
                    }
                    if let (Some(want), Some(d)) = (&e.bytes, &r.data)
                        && want != d
                    {
                        let i = want
                            .iter()
                            .zip(d)
                            .position(|(a, b)| a != b)
                            .unwrap_or(want.len().min(d.len()));
                        fails.push(format!(
                            "snapshot byte {i}: expected {}, got {} (expected {} bytes, got {})",
                            want.get(i).map_or("none".into(), |b| format!("{b:#04x}")),
                            d.get(i).map_or("none".into(), |b| format!("{b:#04x}")),
                            want.len(),
                            d.len()
                        ));
                    }
                    if let Some(want) = &e.segments {
                        let got = r.segments.clone().unwrap_or_default();
                        if *want != got {
                            let show = |v: &[(String, u64)]| {
                                v.iter()
                                    .map(|(k, l)| format!("{k}:{l:#x}"))
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            };
                            fails.push(format!(
                                "expected segments [{}], got [{}]",
                                show(want),
                                show(&got)
                            ));
                        }
                    }
                    if let Some(want) = e.pinned {
                        let got = r.pinned.unwrap_or(0);
                        if got != want {
                            fails.push(format!("expected pinned = {want}, got {got}"));
                        }
                    }
                    if let Some(want) = e.dma_addr
                        && r.dma_addr != Some(want)
                    {
                        fails.push(format!(
                            "expected dma_addr {want:#x}, got {}",
                            r.dma_addr
                                .map_or_else(|| "no segment".to_owned(), |a| format!("{a:#x}"))
                        ));
                    }
                    if let (Some(want), Some(d)) = (e.value, &r.data) {
                        let mut w = [0u8; 8];
                        let n = d.len().min(8);
                        w[..n].copy_from_slice(&d[..n]);
                        let got = u64::from_le_bytes(w);
                        if got != want {
                            fails.push(format!("expected value {want:#x}, got {got:#x}"));
                        }
                    }
                }
            }
        }
        let sim = &self.kernel.sim;
        for message in &fails {
            self.failures.borrow_mut().push(ExpectFailure {
                line: step.loc.line,
                col: step.loc.col,
                thread: thread.to_owned(),
                op: step.op.name().to_owned(),
                time: sim.now(),
                message: message.clone(),
            });
        }
        if self.step_log {
            self.records.borrow_mut().push(StepRecord {
                start,
                end: sim.now(),
                thread: thread.to_owned(),
                op: step.op.name().to_owned(),
                line: step.loc.line,
                result: summary,
                ok: fails.is_empty(),
            });
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
            Outcome::OracleViolation(v.to_string())
        } else {
            match outcome {
                RunOutcome::Completed if failures.is_empty() => Outcome::Passed,
                RunOutcome::Completed => Outcome::ExpectationFailed,
                RunOutcome::Deadlock { blocked } => Outcome::Deadlock(blocked.clone()),
                RunOutcome::TimeLimit => Outcome::TimeLimit,
                RunOutcome::Stopped(r) => Outcome::Stopped(r.clone()),
            }
        };
        let trace = sim.take_trace();
        Report {
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
            expectations: *self.expectations.borrow(),
            failures,
            metrics: sim.metrics().counters,
            steps: self.records.borrow().clone(),
            trace,
        }
    }
}

fn mm_prot(p: crate::ast::Prot) -> MmProt {
    MmProt {
        read: p.read,
        write: p.write,
        exec: p.exec,
    }
}

fn errno_text(e: Option<Errno>) -> String {
    e.map_or_else(|| "success".to_owned(), |e| format!("-{}", e.name()))
}

fn signal_text(s: MmSignal) -> String {
    match s {
        MmSignal::Segv { addr } => format!("SIGSEGV at {addr}"),
        MmSignal::Bus { addr } => format!("SIGBUS at {addr}"),
    }
}

fn signal_matches(want: Signal, got: MmSignal) -> bool {
    matches!(
        (want, got),
        (Signal::Segv, MmSignal::Segv { .. }) | (Signal::Bus, MmSignal::Bus { .. })
    )
}

fn summarize(r: &StepResult) -> String {
    let mut s = errno_text(r.errno);
    if let Some(sig) = r.signal {
        s = signal_text(sig);
    }
    if let Some(d) = &r.dm {
        let _ = write!(s, " cpages={} faults={}", d.cpages, d.faults);
    }
    if let Some(segs) = &r.segments {
        let _ = write!(s, " pinned={} segments=[", r.pinned.unwrap_or(0));
        for (i, (k, l)) in segs.iter().enumerate() {
            let _ = write!(s, "{}{k}:{l:#x}", if i == 0 { "" } else { ", " });
        }
        s.push(']');
        if let Some(a) = r.dma_addr {
            let _ = write!(s, " dma_addr={a:#x}");
        }
    }
    s
}
