//! `DmaSpace`: the one path every device access takes (DESIGN.md §4.8), and DMA in flight.
//!
//! Like vm-memory's `IommuMemory` (translate first, then hand off to memory; misses come back as data), a
//! device access goes, per request of one 4 KiB page:
//! 1. **translate** — identity / IOVA through the device's IOMMU domain and IOTLB / bus address through the
//!    provider's BAR (`Platform::resolve`), or the frame the device holds itself (a device page table
//!    like dmirror's); the translation remembers the frame's allocation generation: the one recorded when
//!    the DMA address was handed to the device (`map_sg`), else the current one;
//! 2. **route** — the links between the device and the memory (the map-type decision's path);
//! 3. **oracle at issue** — the grant's rule ([`peerdma_mm::device_access`]): a mirror translation must
//!    match the CPU page table, a pin must hold, and an IOVA that now reaches another frame than the one it
//!    was mapped for is a stale translation;
//! 4. **transfer** — the request's landing time in closed form (below); one engine event per request;
//! 5. **memory + oracle at landing** — the data moves when the request lands (reads sample memory then,
//!    writes store then), after the landing checks: a mirror translation stays valid until the invalidation
//!    that removes it completes — a request still in flight when its invalidation's fence returned is a
//!    stale translation, and the page table must still map the frame unless an invalidation of the
//!    address is in progress ([`peerdma_mm::device_access`]) —, and the frame must not have been freed or
//!    reallocated since the translation (a use after free, reads included).
//!
//! Steps 1–4 for a device of the platform are [`Platform::dma_issue`](crate::Platform::dma_issue)
//! (`space/issue.rs`); steps 4–5, the requests in flight and the fence, are [`DmaSpace`].
//!
//! Failures come back as data ([`DmaOutcome::faults`]: which request failed, with what errno): a device
//! stops issuing at the first one, and what it had in flight still lands.
//!
//! **DMA in flight.** Each device has at most [`crate::DmaCosts::max_outstanding`] requests in flight (tags);
//! issuing one more waits for a landing. A request's landing time is closed-form:
//! `start = max(now + translation cost, the device's pipe free time for that direction)`,
//! `land = start + wire time + hops × hop latency (+ the remote-socket delta for RAM on another NUMA node
//! than the device's)`, where the wire time is 4 KiB at the smallest fair share,
//! among the links crossed, of the link's effective bandwidth for 4 KiB payloads (`peerdma_pci::link`): a
//! link shared by N devices with requests in flight gives each 1/N. So one device pipelines up to its
//! bottleneck link's bandwidth, translation and hop latencies hide behind the data, and several devices
//! divide a shared link. The issuer yields after each request, so devices issuing at the same instant
//! interleave. *Coarse:* a request's rate is fixed when it is issued (no re-sharing mid-flight); whole
//! pages only.
//!
//! **The fence** ([`DmaSpace::fence`]): an invalidation of a range a device mirrors returns only after every
//! in-flight request holding a mirror translation of that range has landed ([`FenceMode::Drain`]) or been
//! aborted ([`FenceMode::Abort`]); the device model chooses. [`FenceInjection::SkipWait`] is a test-only
//! driver bug: the fence returns at once, and the requests it left in flight are reported as stale
//! translations when they land (any fence that returns with covering requests in flight is caught the
//! same way, whatever its bug).

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
#[expect(
    clippy::disallowed_types,
    reason = "looked up by key only, never iterated into output; PageHasher has no random seed"
)]
use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::rc::Rc;

use peerdma_core::{DeviceId, Errno, FrameId, PAGE_SIZE, Pa, Pid, Range, SimDuration, SimTime, Va};
use peerdma_mm::oracle::ViolationKind;
use peerdma_mm::{DeviceData, DeviceGrant, FrameTranslation, Kernel};
use peerdma_pci::NodeId;
use peerdma_sim::{TraceArg, TraceArgs, Track, WaitQueue};

use crate::map::DmaAddr;

mod issue;

/// Bytes one request moves (the model's DMA granule: one page).
pub const REQUEST_BYTES: usize = 4096;

/// Where a device sends a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceAddr {
    /// A DMA address, translated by the device's IOMMU domain or routed by the fabric.
    Dma(DmaAddr),
    /// A frame the device holds itself (its own page table, no IOMMU), with the generation it saw.
    Frame {
        /// The frame.
        frame: FrameId,
        /// Its allocation generation when the device's entry was made.
        generation: u64,
    },
}

/// What a request does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DmaOp {
    /// Reads one page.
    Read,
    /// Writes these 4 KiB.
    Write(Vec<u8>),
}

impl DmaOp {
    /// Returns whether it writes memory.
    pub fn is_write(&self) -> bool {
        matches!(self, Self::Write(_))
    }
}

/// One device request of one page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DmaRequest {
    /// Where it goes.
    pub addr: DeviceAddr,
    /// How the device holds the translation.
    pub grant: DeviceGrant,
    /// Read or write.
    pub op: DmaOp,
}

/// A request that failed: its index in the batch and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaFault {
    /// Index of the request in the batch.
    pub index: usize,
    /// `EFAULT` (IOMMU fault, nothing answers, an oracle violation), `ENODEV` (a removed BAR), `EAGAIN`
    /// (aborted by an invalidation's fence).
    pub errno: Errno,
}

/// What a batch of requests did (failures as data).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DmaOutcome {
    /// The bytes read, 4 KiB per read request in batch order (zero for a request that did not land).
    pub data: Vec<u8>,
    /// Requests that landed.
    pub landed: usize,
    /// Requests that failed, in batch order; the device issued nothing after the first translation failure.
    pub faults: Vec<DmaFault>,
}

impl DmaOutcome {
    /// Returns the data read, or the errno of the first failed request.
    ///
    /// # Errors
    /// The first fault's errno.
    pub fn into_result(self) -> Result<Vec<u8>, Errno> {
        match self.faults.first() {
            Some(f) => Err(f.errno),
            None => Ok(self.data),
        }
    }
}

/// What an invalidation's fence does with a device's in-flight requests of the range.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FenceMode {
    /// Waits until they land (block and flush).
    #[default]
    Drain,
    /// Aborts them: they never land and their issuer sees `EAGAIN` (the device retries after a fault).
    Abort,
}

/// A deliberate driver bug, so tests can prove the oracle catches it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FenceInjection {
    /// A correct fence.
    #[default]
    None,
    /// The fence returns without waiting for in-flight requests.
    SkipWait,
}

/// Identifies a request in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RequestId(u64);

/// What the memory at the far end of a request is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    /// A frame with struct page.
    Frame(FrameTranslation),
    /// MMIO without struct page (a BAR), at this CPU physical address.
    Mmio(Pa),
}

/// A translated request, ready to go in flight.
#[derive(Debug)]
pub(crate) struct Issue {
    pub(crate) target: Target,
    pub(crate) grant: DeviceGrant,
    pub(crate) op: DmaOp,
    /// When translation is done.
    pub(crate) ready: SimTime,
    /// Its time on the wire.
    pub(crate) wire: SimDuration,
    /// Hop latency after the wire.
    pub(crate) latency: SimDuration,
    /// The links it crosses (registered with [`DmaSpace::register_links`]).
    pub(crate) links: Rc<[NodeId]>,
    /// The access path it takes, for the per-path byte counts ([`path`]).
    pub(crate) path: &'static str,
}

/// Names of the access paths a request can take (the report's bandwidth-per-path rows).
pub mod path {
    /// A frame the device reaches without translation by the IOMMU: its own page table's frame, a pin
    /// without topology, or RAM through an identity (passthrough) domain.
    pub const LOCAL: &str = "local";
    /// RAM through an IOMMU-translated (DMA or DMA-FQ) domain.
    pub const IOMMU: &str = "iommu";
    /// Peer memory by PCI bus address, turning around at a common switch (P2PDMA `BUS_ADDR`).
    pub const P2P_BUS_ADDR: &str = "p2p_bus_addr";
    /// Peer memory through the host bridge (P2PDMA `THRU_HOST_BRIDGE`: a CPU physical address or IOVA).
    pub const P2P_HOST_BRIDGE: &str = "p2p_host_bridge";
}

/// How a request ended.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Landing {
    Read(Vec<u8>),
    Written,
    Failed(Errno),
}

#[derive(Debug)]
struct InFlight {
    target: Target,
    grant: DeviceGrant,
    op: DmaOp,
    land_at: SimTime,
    links: Rc<[NodeId]>,
    /// The invalidation that removed its translation completed while it was in flight.
    stale: bool,
    /// When it was issued.
    issued_at: SimTime,
    /// Its access path ([`path`]).
    path: &'static str,
}

#[derive(Debug, Default)]
struct SpaceState {
    next_id: u64,
    inflight: BTreeMap<RequestId, InFlight>,
    done: BTreeMap<RequestId, Landing>,
    /// When the device's pipe is free again, per direction (0: reads, 1: writes).
    pipe_free: [SimTime; 2],
    /// This device's requests in flight per link.
    link_users: BTreeMap<NodeId, u32>,
    /// The frame and generation each DMA address page was last handed to the device for (a hash table:
    /// only looked up, never iterated, so its order cannot reach any output).
    issued: PageHashMap<(FrameId, u64)>,
    /// Bytes landed so far (the `dma.bytes` gauge).
    landed_bytes: u64,
    /// Page buffers reads land in, given back after use ([`DmaSpace::recycle`]).
    spare: Vec<Vec<u8>>,
}

/// A hash table keyed by page number with [`PageHasher`]; its iteration order is deterministic but
/// meaningless, and it is only looked up by key (CONVENTIONS).
#[expect(
    clippy::disallowed_types,
    reason = "looked up by key only, never iterated into output; PageHasher has no random seed"
)]
type PageHashMap<V> = HashMap<u64, V, BuildHasherDefault<PageHasher>>;

/// A hasher for page numbers: one multiply by the 64-bit golden ratio (Fibonacci hashing), enough for keys
/// that are page numbers, much cheaper than the default SipHash on the per-page paths.
#[derive(Default)]
struct PageHasher(u64);

impl Hasher for PageHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// Returns whether `f` holds a mirror translation of `range` of `pid`.
fn covers(f: &InFlight, pid: Pid, range: Range<Va>) -> bool {
    matches!(f.grant, DeviceGrant::Mirror { pid: p, va } if p == pid && range.contains(va))
}

/// Devices with requests in flight, per link (the node whose upstream link it is), shared by every device
/// of a platform.
pub(crate) type LinkFlows = Rc<RefCell<BTreeMap<NodeId, u32>>>;

struct SpaceInner {
    kernel: Rc<Kernel>,
    dev: DeviceId,
    name: String,
    /// The name of each request's landing agent (`<name>.dma`), spelled once.
    landing_name: String,
    max_outstanding: usize,
    flows: LinkFlows,
    st: RefCell<SpaceState>,
    wq: WaitQueue,
    fence_mode: Cell<FenceMode>,
    injection: Cell<FenceInjection>,
}

/// One device's access path and its requests in flight (module docs). Cloning shares it.
#[derive(Clone)]
pub struct DmaSpace(Rc<SpaceInner>);

impl fmt::Debug for DmaSpace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaSpace")
            .field("dev", &self.0.name)
            .field("in_flight", &self.0.st.borrow().inflight.len())
            .finish_non_exhaustive()
    }
}

impl DmaSpace {
    /// Creates the access path of device `dev` with at most `max_outstanding` requests in flight.
    pub fn new(kernel: &Rc<Kernel>, dev: DeviceId, name: &str, max_outstanding: u32) -> Self {
        Self::with_flows(kernel, dev, name, max_outstanding, LinkFlows::default())
    }

    pub(crate) fn with_flows(
        kernel: &Rc<Kernel>,
        dev: DeviceId,
        name: &str,
        max_outstanding: u32,
        flows: LinkFlows,
    ) -> Self {
        Self(Rc::new(SpaceInner {
            wq: WaitQueue::new(&kernel.sim),
            kernel: kernel.clone(),
            dev,
            name: name.to_owned(),
            landing_name: format!("{name}.dma"),
            max_outstanding: usize::try_from(max_outstanding.max(1)).expect("u32 fits usize"),
            flows,
            st: RefCell::default(),
            fence_mode: Cell::new(FenceMode::Drain),
            injection: Cell::new(FenceInjection::None),
        }))
    }

    /// Returns the device.
    pub fn device(&self) -> DeviceId {
        self.0.dev
    }

    /// Returns the device's name (its trace track and its rows in the report's per-path bandwidth).
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// Samples the `dma.outstanding` gauge of this device (requests in flight).
    fn sample_outstanding(&self, n: usize) {
        self.0.kernel.sim.gauge_device(
            &self.0.name,
            "dma.outstanding",
            i64::try_from(n).unwrap_or(i64::MAX),
        );
    }

    /// Returns the outstanding-request limit.
    pub fn max_outstanding(&self) -> usize {
        self.0.max_outstanding
    }

    /// Returns the number of requests in flight.
    pub fn nr_in_flight(&self) -> usize {
        self.0.st.borrow().inflight.len()
    }

    /// Returns the number of requests in flight that hold a mirror translation of `range` of `pid`.
    pub fn nr_in_flight_in(&self, pid: Pid, range: Range<Va>) -> usize {
        self.0
            .st
            .borrow()
            .inflight
            .values()
            .filter(|f| covers(f, pid, range))
            .count()
    }

    /// Sets what the fence does with in-flight requests (the device model's choice).
    pub fn set_fence_mode(&self, mode: FenceMode) {
        self.0.fence_mode.set(mode);
    }

    /// Injects a fence bug (tests of the oracle only).
    pub fn inject(&self, f: FenceInjection) {
        self.0.injection.set(f);
    }

    /// A device that copies with the CPU under its driver lock (dmirror) accesses one page through `t`:
    /// translate, oracle, memory at once, no transfer (its caller charges its CPU copy cost). Returns
    /// whether the data moved.
    pub fn copy(&self, t: &FrameTranslation, data: DeviceData<'_>) -> bool {
        let k = &self.0.kernel;
        let write = matches!(data, DeviceData::Write(_));
        k.device_issue(self.0.dev, t, write) && k.device_land(self.0.dev, t, data)
    }

    /// Records that DMA address page `addr` was handed to the device for `frame` in its current generation
    /// (step 1: a later access through the address remembers what it was for).
    pub(crate) fn record_issued(&self, addr: u64, frame: FrameId, generation: u64) {
        self.0
            .st
            .borrow_mut()
            .issued
            .insert(addr / PAGE_SIZE, (frame, generation));
    }

    /// Returns what DMA address page `addr` was last handed to the device for.
    pub(crate) fn issued(&self, addr: u64) -> Option<(FrameId, u64)> {
        self.0.st.borrow().issued.get(&(addr / PAGE_SIZE)).copied()
    }

    /// Waits until the device has a free tag.
    pub(crate) async fn wait_tag(&self) {
        let inner = &self.0;
        inner
            .wq
            .wait_event(|| inner.st.borrow().inflight.len() < inner.max_outstanding)
            .await;
    }

    /// Registers a new request of the device on `links` (flow accounting of the module docs); returns, per
    /// link, the number of devices that now have requests in flight on it.
    pub(crate) fn register_links(&self, links: &[NodeId]) -> Vec<u32> {
        let mut st = self.0.st.borrow_mut();
        let mut flows = self.0.flows.borrow_mut();
        links
            .iter()
            .map(|&n| {
                let users = st.link_users.entry(n).or_insert(0);
                *users += 1;
                let nr = flows.entry(n).or_insert(0);
                if *users == 1 {
                    *nr += 1;
                }
                *nr
            })
            .collect()
    }

    /// Step 4: puts a translated request in flight and spawns its landing. Returns its id.
    pub(crate) fn issue(&self, req: Issue) -> RequestId {
        let inner = &self.0;
        let sim = &inner.kernel.sim;
        let (id, land_at) = {
            let mut st = inner.st.borrow_mut();
            let dir = usize::from(req.op.is_write());
            let start = req.ready.max(st.pipe_free[dir]);
            let end = start + req.wire;
            st.pipe_free[dir] = end;
            let land_at = end + req.latency;
            let id = RequestId(st.next_id);
            st.next_id += 1;
            st.inflight.insert(
                id,
                InFlight {
                    target: req.target,
                    grant: req.grant,
                    op: req.op,
                    land_at,
                    links: req.links,
                    stale: false,
                    issued_at: sim.now(),
                    path: req.path,
                },
            );
            (id, land_at)
        };
        self.sample_outstanding(self.nr_in_flight());
        let space = self.clone();
        sim.spawn_at(land_at, inner.landing_name.clone(), async move {
            space.land(id);
        });
        id
    }

    /// Issues a request to a frame the device holds itself, with no topology (a device without a PCI
    /// function: the scenario's `dma.write` through a pin): the oracle at issue, then a landing `wire`
    /// later. `Err` when the oracle refused it at issue.
    pub async fn submit_frame(
        &self,
        t: FrameTranslation,
        op: DmaOp,
        wire: SimDuration,
    ) -> Result<RequestId, Errno> {
        self.wait_tag().await;
        let k = &self.0.kernel;
        if !k.device_issue(self.0.dev, &t, op.is_write()) {
            return Err(Errno::EFAULT);
        }
        let id = self.issue(Issue {
            target: Target::Frame(t),
            grant: t.grant,
            op,
            ready: k.sim.now(),
            wire: k.sim.jitter(wire),
            latency: SimDuration::ZERO,
            links: Rc::from([]),
            path: path::LOCAL,
        });
        k.sim.sleep(SimDuration::ZERO).await;
        Ok(id)
    }

    /// Runs a batch of one-page requests, `ops[i]` for page `i`, through `issue_fn` (which translates and
    /// issues page `i`'s request: the caller's way of finding its DMA address): issues them in order as tags
    /// free up, yielding after each so devices issuing at the same instant interleave, stops issuing at the
    /// first failure, waits for everything in flight, and issues again the requests a fence aborted.
    pub(crate) async fn run_batch(
        &self,
        ops: Vec<DmaOp>,
        mut issue_fn: impl AsyncFnMut(usize, DmaOp) -> Result<RequestId, Errno>,
    ) -> DmaOutcome {
        let mut read_at = Vec::with_capacity(ops.len());
        let mut nr_reads = 0;
        for op in &ops {
            read_at.push((!op.is_write()).then_some(nr_reads));
            nr_reads += usize::from(!op.is_write());
        }
        let mut out = DmaOutcome {
            data: vec![0; nr_reads * REQUEST_BYTES],
            ..DmaOutcome::default()
        };
        let sim = self.0.kernel.sim.clone();
        let nr_writes = ops.iter().filter(|op| op.is_write()).count();
        let mut span = sim.span("dma.transfer", Track::device(self.0.name.as_str()), || {
            vec![
                ("requests", ops.len().into()),
                ("reads", nr_reads.into()),
                ("writes", nr_writes.into()),
            ]
        });
        let mut pending: Vec<(usize, DmaOp)> = ops.into_iter().enumerate().collect();
        while !pending.is_empty() {
            let mut issued = Vec::with_capacity(pending.len());
            for (i, op) in pending.drain(..) {
                self.wait_tag().await;
                match issue_fn(i, op.clone()).await {
                    Ok(id) => issued.push((i, op, id)),
                    Err(errno) => {
                        out.faults.push(DmaFault { index: i, errno });
                        break;
                    }
                }
                sim.sleep(SimDuration::ZERO).await;
            }
            for (i, op, id) in issued {
                match self.wait(id).await {
                    Ok(page) => {
                        out.landed += 1;
                        if let Some(j) = read_at[i] {
                            out.data[j * REQUEST_BYTES..(j + 1) * REQUEST_BYTES]
                                .copy_from_slice(&page);
                        }
                        self.recycle(page);
                    }
                    // Aborted by an invalidation's fence: issue it again (a mirror faults it back in).
                    Err(Errno::EAGAIN) => pending.push((i, op)),
                    Err(errno) => out.faults.push(DmaFault { index: i, errno }),
                }
            }
            if !out.faults.is_empty() {
                break;
            }
        }
        out.faults.sort_by_key(|f| f.index);
        span.add_end_args(|| {
            vec![
                ("landed", out.landed.into()),
                ("faults", out.faults.len().into()),
            ]
        });
        out
    }

    /// Gives a page buffer [`DmaSpace::wait`] returned back to the device's spare ones (at most one per
    /// outstanding request are kept).
    fn recycle(&self, page: Vec<u8>) {
        let mut st = self.0.st.borrow_mut();
        if page.len() == REQUEST_BYTES && st.spare.len() < self.0.max_outstanding {
            st.spare.push(page);
        }
    }

    /// Waits for request `id` to land; returns the page it read (empty for a write).
    ///
    /// # Errors
    /// The errno the request failed with at landing (`EFAULT` for an oracle violation, `ENODEV` for a
    /// removed BAR, `EAGAIN` when a fence aborted it).
    pub async fn wait(&self, id: RequestId) -> Result<Vec<u8>, Errno> {
        let inner = &self.0;
        inner
            .wq
            .wait_event(|| inner.st.borrow().done.contains_key(&id))
            .await;
        match inner.st.borrow_mut().done.remove(&id) {
            Some(Landing::Read(d)) => Ok(d),
            Some(Landing::Written) => Ok(Vec::new()),
            Some(Landing::Failed(e)) => Err(e),
            None => unreachable!("waited for it"),
        }
    }

    /// The fence of an invalidation of `range` of `pid` (module docs): returns once no request holding a
    /// mirror translation of the range is in flight.
    pub async fn fence(&self, pid: Pid, range: Range<Va>) {
        let inner = &self.0;
        let covers = |f: &InFlight| covers(f, pid, range);
        match (inner.injection.get(), inner.fence_mode.get()) {
            _ if peerdma_core::mutation::active(peerdma_core::mutation::Mutation::SkipFence) => {}
            (FenceInjection::SkipWait, _) => {}
            (FenceInjection::None, FenceMode::Abort) => {
                let aborted: Vec<RequestId> = inner
                    .st
                    .borrow()
                    .inflight
                    .iter()
                    .filter(|(_, f)| covers(f))
                    .map(|(id, _)| *id)
                    .collect();
                for id in aborted {
                    if self.take(id).is_some() {
                        inner
                            .st
                            .borrow_mut()
                            .done
                            .insert(id, Landing::Failed(Errno::EAGAIN));
                        inner.kernel.sim.count("dma.aborted", 1);
                    }
                }
                inner.wq.wake_up_all();
            }
            (FenceInjection::None, FenceMode::Drain) => {
                let waited = inner.st.borrow().inflight.values().any(&covers);
                inner
                    .wq
                    .wait_event(|| !inner.st.borrow().inflight.values().any(&covers))
                    .await;
                if waited {
                    inner.kernel.sim.count("dma.fence_waits", 1);
                }
            }
        }
        // The invalidation that removed these translations completes when its fence returns: a request that
        // still holds one lands through a stale translation (reported at landing).
        for f in inner.st.borrow_mut().inflight.values_mut() {
            if covers(f) {
                f.stale = true;
            }
        }
    }

    /// Removes request `id` from the in-flight set and releases its links.
    fn take(&self, id: RequestId) -> Option<InFlight> {
        let inner = &self.0;
        let mut st = inner.st.borrow_mut();
        let f = st.inflight.remove(&id)?;
        let mut flows = inner.flows.borrow_mut();
        for n in f.links.iter() {
            let users = st.link_users.get_mut(n).expect("registered at issue");
            *users -= 1;
            if *users == 0 {
                st.link_users.remove(n);
                if let Some(nr) = flows.get_mut(n) {
                    *nr -= 1;
                }
            }
        }
        Some(f)
    }

    /// Step 5: request `id` lands (nothing happens if a fence aborted it).
    fn land(&self, id: RequestId) {
        let Some(f) = self.take(id) else {
            return;
        };
        let inner = &self.0;
        let k = &inner.kernel;
        debug_assert_eq!(
            f.land_at,
            k.sim.now(),
            "a request lands at its landing time"
        );
        // A read lands in a page buffer from the device's spare ones (given back by `run_batch` once it
        // has copied the page out), not a fresh allocation per request.
        let mut page = if f.op.is_write() {
            Vec::new()
        } else {
            inner
                .st
                .borrow_mut()
                .spare
                .pop()
                .unwrap_or_else(|| vec![0u8; REQUEST_BYTES])
        };
        let moved = match (f.target, &f.op) {
            _ if f.stale => {
                k.report_violation(
                    ViolationKind::StaleTranslation,
                    format!(
                        "{} request ({:?}) landed after the invalidation that removed its translation \
                         completed (its fence did not wait for it)",
                        inner.name, f.grant
                    ),
                );
                Err(Errno::EFAULT)
            }
            (Target::Frame(t), op) => {
                let data = match op {
                    DmaOp::Write(d) => DeviceData::Write(d),
                    DmaOp::Read => DeviceData::Read(&mut page),
                };
                k.device_land(inner.dev, &t, data)
                    .then_some(())
                    .ok_or(Errno::EFAULT)
            }
            (Target::Mmio(pa), DmaOp::Write(d)) => k.mmio_write(inner.dev, pa, d),
            (Target::Mmio(pa), DmaOp::Read) => k.mmio_read(inner.dev, pa, &mut page),
        };
        let landing = match (moved, &f.op) {
            (Err(e), _) => Landing::Failed(e),
            (Ok(()), DmaOp::Read) => Landing::Read(page),
            (Ok(()), DmaOp::Write(_)) => Landing::Written,
        };
        // (The trace record only: its track is not built for an untraced run.)
        if k.sim.tracing() {
            k.sim
                .instant("dma.land", Track::device(inner.name.as_str()), || {
                    let mut args: TraceArgs = vec![
                        ("op", if f.op.is_write() { "write" } else { "read" }.into()),
                        ("path", f.path.into()),
                    ];
                    match f.target {
                        Target::Frame(t) => args.push(("frame", t.frame.to_string().into())),
                        Target::Mmio(pa) => args.push(("mmio", TraceArg::Hex(pa.raw()))),
                    }
                    match f.grant {
                        DeviceGrant::Mirror { pid, va } => {
                            args.extend([
                                ("grant", "mirror".into()),
                                ("pid", pid.0.into()),
                                ("va", TraceArg::Hex(va.raw())),
                            ]);
                        }
                        DeviceGrant::Pin { pid, va } => {
                            args.extend([
                                ("grant", "pin".into()),
                                ("pid", pid.0.into()),
                                ("va", TraceArg::Hex(va.raw())),
                            ]);
                        }
                        DeviceGrant::Ref { pid, va } => {
                            args.extend([
                                ("grant", "ref".into()),
                                ("pid", pid.0.into()),
                                ("va", TraceArg::Hex(va.raw())),
                            ]);
                        }
                        DeviceGrant::Raw => args.push(("grant", "raw".into())),
                    }
                    if let Landing::Failed(e) = &landing {
                        args.push(("error", e.name().into()));
                    }
                    args
                });
        }
        if !matches!(landing, Landing::Failed(_)) {
            k.sim.count("dma.bytes", REQUEST_BYTES as u64);
            k.sim
                .transfer(&inner.name, f.path, REQUEST_BYTES as u64, f.issued_at);
            let landed = {
                let mut st = inner.st.borrow_mut();
                st.landed_bytes += REQUEST_BYTES as u64;
                st.landed_bytes
            };
            k.sim.gauge_device(
                &inner.name,
                "dma.bytes",
                i64::try_from(landed).unwrap_or(i64::MAX),
            );
        }
        k.sim.latency("dma.request", k.sim.now() - f.issued_at);
        inner.st.borrow_mut().done.insert(id, landing);
        self.sample_outstanding(self.nr_in_flight());
        inner.wq.wake_up_all();
    }
}
