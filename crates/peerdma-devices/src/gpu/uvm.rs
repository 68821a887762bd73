//! Managed memory with UVM-style replayable fault servicing (NVIDIA open-gpu-kernel-modules
//! `kernel-open/nvidia-uvm/uvm_gpu_replayable_faults.c`, `uvm_perf_prefetch.c`, `uvm_va_policy.c`; the
//! migration itself is mm/migrate_device.c through the mirroring device of [`crate::dmirror`], as
//! drivers/gpu/drm/nouveau/nouveau_dmem.c does).
//!
//! The allocator creates the VMA: [`ManagedRange::new`] maps anonymous memory in the process
//! (`cudaMallocManaged`), and the GPU mirrors it through the one mirror loop. Pages migrate to the GPU's
//! device-private memory on first touch; a CPU access (or a peer's `hmm_range_fault`) migrates them back
//! through the device-private page's `migrate_to_ram`.
//!
//! A kernel ([`ManagedRange::run_kernel`]) runs, as numbered steps:
//! 1. Every warp issues its next page access. A page the GPU maps (resident, read-duplicated for a read,
//!    remote-mapped) is a hit and costs a local or a remote access; any other access **faults**: the fault
//!    goes into the **fault buffer** and the warp stalls. A full buffer drops the fault (**overflow**); the
//!    warp faults again after the next replay.
//! 2. When every warp has stalled or finished, the driver fetches a **batch** (up to `batch_size` entries)
//!    and pays the per-batch overhead.
//! 3. **De-duplication**: faults to one page are serviced once.
//! 4. A fault outside the managed range is **fatal**: the fault is **cancelled** and the context torn down —
//!    the kernel stops, later kernels on the range get `ENODEV`.
//! 5. Per page, the policy decides: **remote mapping** (accessed-by: the GPU maps the system page, nothing
//!    moves); **read duplication** (a read fault copies the page and leaves the CPU's copy in place; a write
//!    fault to a duplicated page first invalidates the duplicate); otherwise **migration**.
//! 6. The **tree prefetcher** (when on) widens the migration inside each 2 MiB region: a 4 KiB fault fetches
//!    its 64 KiB leaf, and every subtree that would then be at least half resident is fetched whole.
//! 7. **Eviction**: when the managed pool cannot take the pages, the least recently used 2 MiB chunk is
//!    migrated back to system memory, whole.
//! 8. Migration (`migrate_vma` per contiguous run), the per-page servicing cost, then **replay**: the stalled
//!    warps run again.
//!
//! *Coarse:* hits are costed, not moved through the access path one by one (a kernel's hits would dominate
//! the run time for no observable gain); the warps' hit time is divided by their number (they run side by
//! side). Read duplicates and remote mappings are UVM-level states: their data stays in the CPU's page, which
//! is what a read of either returns, and the CPU's writes to a duplicated page are not seen by the model
//! (UVM makes such a page read-only on the CPU). UVM's residency view is not updated when the CPU pulls a
//! page back behind its back; the next GPU access then counts as a hit.

use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use peerdma_core::timing::{ParamSpec, Timing};
use peerdma_core::{Errno, PAGE_SIZE, Pid, SimDuration, Va};
use peerdma_mm::vma::Prot;
use peerdma_mm::{Kernel, MmapArgs};
use peerdma_sim::RngStream;

use super::pattern::{Access, KernelSpec};
use super::{GpuError, Result};
use crate::dmirror::{Dmirror, DmirrorDevice};

/// Pages in a 2 MiB chunk (UVM's VA block and eviction unit).
pub const CHUNK_PAGES: u64 = 512;
/// Pages in a 64 KiB prefetcher leaf.
pub const LEAF_PAGES: u64 = 16;

const BATCH_OVERHEAD: ParamSpec = ParamSpec::time(
    "uvm.batch_overhead",
    20_000,
    "far-fault cost of 20–50 µs per fault batch on PCIe GPUs (Zheng et al., HPCA'16; Kim et al., ASPLOS'20)",
    "the fixed cost of servicing one fault batch (fetch, sort, interrupt, replay set-up)",
);
const FAULT_PAGE: ParamSpec = ParamSpec::time(
    "uvm.fault_page",
    1_000,
    "assumption",
    "servicing one de-duplicated faulted page (block lookup, state update, PTE write)",
);
const REPLAY: ParamSpec = ParamSpec::time(
    "uvm.replay",
    2_000,
    "assumption",
    "one fault replay (the replay method pushed to the GPU and its completion)",
);
const LOCAL_ACCESS: ParamSpec = ParamSpec::time(
    "uvm.local_access",
    10,
    "assumption (≈ 400 GB/s device memory for a 4 KiB page)",
    "a warp's 4 KiB access to resident device memory",
);
const REMOTE_ACCESS: ParamSpec = ParamSpec::time(
    "uvm.remote_access",
    300,
    "≈ 16 GB/s PCIe 3 x16 for a 4 KiB page (UVM simulators' figure)",
    "a warp's 4 KiB access to a remote-mapped system page over PCIe",
);

/// UVM's servicing costs (`uvm.*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UvmCosts {
    /// Per batch (`uvm.batch_overhead`).
    pub batch_overhead: SimDuration,
    /// Per serviced page (`uvm.fault_page`).
    pub fault_page: SimDuration,
    /// Per replay (`uvm.replay`).
    pub replay: SimDuration,
    /// A hit in device memory (`uvm.local_access`).
    pub local_access: SimDuration,
    /// A hit on a remote-mapped page (`uvm.remote_access`).
    pub remote_access: SimDuration,
}

impl UvmCosts {
    /// The parameters these costs are built from, in field order.
    pub const PARAMS: &[ParamSpec] = &[
        BATCH_OVERHEAD,
        FAULT_PAGE,
        REPLAY,
        LOCAL_ACCESS,
        REMOTE_ACCESS,
    ];

    /// Returns the costs `timing` gives.
    pub fn from_timing(timing: &Timing) -> Self {
        Self {
            batch_overhead: timing.time(&BATCH_OVERHEAD),
            fault_page: timing.time(&FAULT_PAGE),
            replay: timing.time(&REPLAY),
            local_access: timing.time(&LOCAL_ACCESS),
            remote_access: timing.time(&REMOTE_ACCESS),
        }
    }

    /// Calibrated defaults.
    pub fn calibrated() -> Self {
        Self::from_timing(&Timing::calibrated())
    }
}

/// The policies and sizes of a managed range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UvmConfig {
    /// Bytes of device memory the range may occupy (the managed pool).
    pub capacity: u64,
    /// Fault-buffer entries.
    pub fault_buffer: usize,
    /// Faults fetched per batch.
    pub batch_size: usize,
    /// The tree prefetcher.
    pub prefetch: bool,
    /// Read duplication (`cudaMemAdviseSetReadMostly`).
    pub read_duplication: bool,
    /// Remote mapping instead of migration (`cudaMemAdviseSetAccessedBy` the GPU, pages kept in system
    /// memory).
    pub accessed_by: bool,
    /// The costs.
    pub costs: UvmCosts,
}

impl UvmConfig {
    /// A configuration with UVM's usual sizes: a 256-entry batch, a buffer of 1024 entries, prefetcher on.
    pub fn new(capacity: u64, costs: UvmCosts) -> Self {
        Self {
            capacity,
            fault_buffer: 1024,
            batch_size: 256,
            prefetch: true,
            read_duplication: false,
            accessed_by: false,
            costs,
        }
    }
}

/// What a kernel (or a prefetch) did: the UVM counters of one run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelStats {
    /// Faults written to the fault buffer.
    pub faults: u64,
    /// Faults merged with another fault to the same page in a batch.
    pub duplicate_faults: u64,
    /// Faults dropped because the buffer was full.
    pub overflows: u64,
    /// Batches serviced.
    pub batches: u64,
    /// Replays.
    pub replays: u64,
    /// Pages migrated to the GPU (faulted and prefetched).
    pub pages_migrated: u64,
    /// Of those, pages the prefetcher added.
    pub pages_prefetched: u64,
    /// 2 MiB chunks evicted.
    pub chunks_evicted: u64,
    /// Pages migrated back to system memory by eviction.
    pub pages_evicted: u64,
    /// Pages read-duplicated.
    pub read_dup_pages: u64,
    /// Read duplicates invalidated by a write.
    pub read_dup_invalidations: u64,
    /// Pages remote-mapped (accessed-by).
    pub remote_maps: u64,
    /// Hits in device memory (or on a duplicate).
    pub local_hits: u64,
    /// Hits on remote-mapped pages.
    pub remote_hits: u64,
    /// Whether a fatal fault cancelled the context.
    pub cancelled: bool,
    /// Simulated time the kernel took.
    pub time: SimDuration,
}

/// A managed allocation of one process, mirrored by the GPU (module docs).
#[derive(Debug)]
pub struct ManagedRange {
    kernel: Rc<Kernel>,
    dm: Rc<Dmirror>,
    start: Va,
    nr_pages: u64,
    cfg: UvmConfig,
    st: std::cell::RefCell<UvmState>,
}

#[derive(Debug, Default)]
struct UvmState {
    resident: BTreeSet<u64>,
    dup: BTreeSet<u64>,
    remote: BTreeSet<u64>,
    chunk_use: BTreeMap<u64, u64>,
    tick: u64,
    cancelled: bool,
}

impl ManagedRange {
    /// `cudaMallocManaged`: maps `len` bytes of anonymous memory in `pid` and opens the GPU's mirror on it
    /// (`pool` is the GPU's device-private memory).
    ///
    /// # Errors
    /// The errnos of `mmap` and of opening the mirror.
    pub async fn new(
        kernel: &Rc<Kernel>,
        pool: &Rc<DmirrorDevice>,
        pid: Pid,
        len: u64,
        cfg: UvmConfig,
    ) -> Result<Self> {
        let start = kernel
            .mmap(
                pid,
                &MmapArgs {
                    len,
                    prot: Prot::RW,
                    private: true,
                    anonymous: true,
                    name: Some("managed".into()),
                    ..MmapArgs::default()
                },
            )
            .await?;
        let dm = Dmirror::open(pool, pid)?;
        Ok(Self {
            kernel: kernel.clone(),
            dm,
            start,
            nr_pages: len.div_ceil(PAGE_SIZE),
            cfg,
            st: std::cell::RefCell::new(UvmState::default()),
        })
    }

    /// Returns the range's first address.
    pub fn start(&self) -> Va {
        self.start
    }

    /// Returns the number of pages of the range.
    pub fn nr_pages(&self) -> u64 {
        self.nr_pages
    }

    /// Returns the pages the UVM view holds resident on the GPU.
    pub fn nr_resident(&self) -> u64 {
        self.st.borrow().resident.len() as u64
    }

    /// Returns whether page `i` is read-duplicated.
    pub fn is_duplicated(&self, i: u64) -> bool {
        self.st.borrow().dup.contains(&i)
    }

    /// Returns whether a fatal fault tore the context down.
    pub fn is_cancelled(&self) -> bool {
        self.st.borrow().cancelled
    }

    fn capacity_pages(&self) -> u64 {
        self.cfg.capacity / PAGE_SIZE
    }

    /// Explicit prefetch (`cudaMemPrefetchAsync` to the GPU) of `npages` pages from page `first`.
    ///
    /// # Errors
    /// `ENODEV` after a cancel; `EINVAL` outside the range; the migration's errno.
    pub async fn prefetch(&self, first: u64, npages: u64) -> Result<KernelStats> {
        if self.is_cancelled() {
            return Err(GpuError::Errno(Errno::ENODEV));
        }
        if first.checked_add(npages).is_none_or(|e| e > self.nr_pages) || npages == 0 {
            return Err(GpuError::Errno(Errno::EINVAL));
        }
        let t0 = self.kernel.sim.now();
        let mut stats = KernelStats::default();
        let pages: BTreeSet<u64> = (first..first + npages).collect();
        self.migrate(&pages, &BTreeSet::new(), &mut stats).await?;
        self.kernel.sim.count("uvm.explicit_prefetch_pages", npages);
        stats.time = self.kernel.sim.now() - t0;
        Ok(stats)
    }

    /// Runs a kernel over the range (module docs, steps 1–8) and returns its counters.
    ///
    /// # Errors
    /// `ENODEV` when the context was torn down by an earlier fatal fault; the migration's errno.
    pub async fn run_kernel(&self, spec: &KernelSpec, rng: &mut RngStream) -> Result<KernelStats> {
        if self.is_cancelled() {
            return Err(GpuError::Errno(Errno::ENODEV));
        }
        let k = self.kernel.clone();
        let c = self.cfg.costs.clone();
        let t0 = k.sim.now();
        let streams = spec.streams(self.nr_pages, rng);
        let warps = streams.len();
        let mut pos = vec![0usize; warps];
        let mut stalled = vec![false; warps];
        let mut buffer: Vec<Access> = Vec::new();
        let mut stats = KernelStats::default();
        let mut hit_time = SimDuration::ZERO;
        loop {
            // Step 1: the warps run until each has stalled or finished.
            let mut progress = true;
            while progress {
                progress = false;
                for w in 0..warps {
                    if stalled[w] || pos[w] >= streams[w].len() {
                        continue;
                    }
                    let (page, write) = streams[w][pos[w]];
                    if let Some(remote) = self.hit(page, write) {
                        if remote {
                            stats.remote_hits += 1;
                            hit_time += c.remote_access;
                        } else {
                            stats.local_hits += 1;
                            hit_time += c.local_access;
                        }
                        pos[w] += 1;
                        progress = true;
                    } else {
                        if buffer.len() < self.cfg.fault_buffer {
                            buffer.push((page, write));
                            stats.faults += 1;
                        } else {
                            stats.overflows += 1;
                        }
                        stalled[w] = true;
                    }
                }
            }
            let warps_div = u64::try_from(warps).expect("few warps").max(1);
            k.spend(SimDuration::from_nanos(hit_time.as_nanos() / warps_div))
                .await;
            hit_time = SimDuration::ZERO;
            if buffer.is_empty() {
                break;
            }
            // Steps 2–8: one batch, then replay.
            let n = self.cfg.batch_size.max(1).min(buffer.len());
            let batch: Vec<Access> = buffer.drain(..n).collect();
            if !self.service_batch(&batch, &mut stats).await? {
                stats.cancelled = true;
                k.sim.count("uvm.cancelled_faults", buffer.len() as u64 + 1);
                break;
            }
            if buffer.is_empty() {
                stats.replays += 1;
                k.spend(c.replay).await;
                stalled.fill(false);
            }
        }
        stats.time = k.sim.now() - t0;
        for (name, v) in [
            ("uvm.faults", stats.faults),
            ("uvm.duplicate_faults", stats.duplicate_faults),
            ("uvm.overflows", stats.overflows),
            ("uvm.batches", stats.batches),
            ("uvm.replays", stats.replays),
            ("uvm.pages_migrated", stats.pages_migrated),
            ("uvm.pages_prefetched", stats.pages_prefetched),
            ("uvm.chunks_evicted", stats.chunks_evicted),
            ("uvm.read_dup_pages", stats.read_dup_pages),
            ("uvm.read_dup_invalidations", stats.read_dup_invalidations),
            ("uvm.remote_maps", stats.remote_maps),
        ] {
            k.sim.count(name, v);
        }
        Ok(stats)
    }

    /// Step 1's lookup: `Some(remote)` when the GPU maps the page for this access.
    fn hit(&self, page: u64, write: bool) -> Option<bool> {
        let mut st = self.st.borrow_mut();
        if st.resident.contains(&page) {
            st.tick += 1;
            let t = st.tick;
            st.chunk_use.insert(page / CHUNK_PAGES, t);
            return Some(false);
        }
        if !write && st.dup.contains(&page) {
            return Some(false);
        }
        if st.remote.contains(&page) {
            return Some(true);
        }
        None
    }

    /// Steps 2–8 for one batch; returns `false` when a fatal fault cancelled the context.
    async fn service_batch(&self, batch: &[Access], stats: &mut KernelStats) -> Result<bool> {
        let k = &self.kernel;
        let c = &self.cfg.costs;
        stats.batches += 1;
        k.spend(c.batch_overhead).await;
        // Step 3: de-duplicate (a page written by any of its faults is a write fault).
        let mut unique: BTreeMap<u64, bool> = BTreeMap::new();
        for &(page, write) in batch {
            *unique.entry(page).or_default() |= write;
        }
        stats.duplicate_faults += batch.len() as u64 - unique.len() as u64;
        // Step 4: a fault outside the range is fatal.
        if unique.contains_key(&u64::MAX) {
            self.st.borrow_mut().cancelled = true;
            k.sim.trace("uvm.cancel", || {
                "fatal fault outside the managed range: context torn down".into()
            });
            return Ok(false);
        }
        // Step 5: the policy of each page.
        let mut migrate = BTreeSet::new();
        {
            let mut st = self.st.borrow_mut();
            for (&page, &write) in &unique {
                if self.cfg.accessed_by {
                    st.remote.insert(page);
                    stats.remote_maps += 1;
                } else if self.cfg.read_duplication && !write {
                    st.dup.insert(page);
                    stats.read_dup_pages += 1;
                } else {
                    if st.dup.remove(&page) {
                        stats.read_dup_invalidations += 1;
                    }
                    migrate.insert(page);
                }
            }
        }
        // Step 6: the prefetcher.
        let wanted = if self.cfg.prefetch {
            self.tree_prefetch(&migrate)
        } else {
            migrate.clone()
        };
        // Steps 7–8.
        self.migrate(&wanted, &migrate, stats).await?;
        k.spend(c.fault_page.saturating_mul(unique.len() as u64))
            .await;
        Ok(true)
    }

    /// Step 6: the tree prefetcher over each 2 MiB region that has faulted pages.
    fn tree_prefetch(&self, faulted: &BTreeSet<u64>) -> BTreeSet<u64> {
        let st = self.st.borrow();
        let mut out = faulted.clone();
        let regions: BTreeSet<u64> = faulted.iter().map(|p| p / CHUNK_PAGES).collect();
        for r in regions {
            let base = r * CHUNK_PAGES;
            let end = (base + CHUNK_PAGES).min(self.nr_pages);
            // The faulted pages' leaves.
            for &p in faulted.iter().filter(|&&p| p / CHUNK_PAGES == r) {
                let leaf = p / LEAF_PAGES * LEAF_PAGES;
                out.extend(leaf..(leaf + LEAF_PAGES).min(end));
            }
            // Up the tree: a subtree at least half resident-or-fetched is fetched whole.
            let mut size = LEAF_PAGES * 2;
            while size <= CHUNK_PAGES {
                let mut node = base;
                while node < end {
                    let top = (node + size).min(end);
                    let have = (node..top)
                        .filter(|p| out.contains(p) || st.resident.contains(p))
                        .count() as u64;
                    if have > 0 && have * 2 >= top - node {
                        out.extend(node..top);
                    }
                    node += size;
                }
                size *= 2;
            }
        }
        out.retain(|p| !st.resident.contains(p));
        out
    }

    /// Steps 7–8: evicts LRU chunks to make room, then migrates `pages` to the GPU (`faulted` ⊆ `pages` are
    /// the demanded ones, the rest counts as prefetched).
    async fn migrate(
        &self,
        pages: &BTreeSet<u64>,
        faulted: &BTreeSet<u64>,
        stats: &mut KernelStats,
    ) -> Result<()> {
        let k = &self.kernel;
        let cap = self.capacity_pages();
        let mut pages: Vec<u64> = {
            let st = self.st.borrow();
            pages
                .iter()
                .copied()
                .filter(|p| !st.resident.contains(p))
                .collect()
        };
        if pages.len() as u64 > cap {
            // More than the pool holds: keep the demanded pages first.
            pages.sort_by_key(|p| (!faulted.contains(p), *p));
            pages.truncate(usize::try_from(cap).expect("fits"));
            pages.sort_unstable();
        }
        let needed_chunks: BTreeSet<u64> = pages.iter().map(|p| p / CHUNK_PAGES).collect();
        // Step 7: eviction by LRU chunk.
        loop {
            let victim = {
                let st = self.st.borrow();
                if st.resident.len() as u64 + pages.len() as u64 <= cap {
                    None
                } else {
                    st.chunk_use
                        .iter()
                        .filter(|(ch, _)| !needed_chunks.contains(ch))
                        .min_by_key(|(_, t)| **t)
                        .or_else(|| st.chunk_use.iter().min_by_key(|(_, t)| **t))
                        .map(|(ch, _)| *ch)
                }
            };
            let Some(ch) = victim else { break };
            let base = ch * CHUNK_PAGES;
            let n = CHUNK_PAGES.min(self.nr_pages - base);
            self.dm
                .migrate_to_sys(self.start.add(base * PAGE_SIZE), n)
                .await?;
            let mut st = self.st.borrow_mut();
            let before = st.resident.len();
            st.resident.retain(|p| p / CHUNK_PAGES != ch);
            st.chunk_use.remove(&ch);
            stats.chunks_evicted += 1;
            stats.pages_evicted += (before - st.resident.len()) as u64;
            k.sim
                .trace("uvm.evict", || format!("chunk {ch} ({n} pages)"));
        }
        // Step 8: migrate contiguous runs.
        let mut i = 0;
        while i < pages.len() {
            let mut j = i + 1;
            while j < pages.len()
                && pages[j] == pages[j - 1] + 1
                && pages[j] / CHUNK_PAGES == pages[i] / CHUNK_PAGES
            {
                j += 1;
            }
            let first = pages[i];
            let n = (j - i) as u64;
            self.dm
                .migrate_to_dev(self.start.add(first * PAGE_SIZE), n)
                .await?;
            i = j;
        }
        let mut st = self.st.borrow_mut();
        st.tick += 1;
        let t = st.tick;
        for &p in &pages {
            st.resident.insert(p);
            st.chunk_use.insert(p / CHUNK_PAGES, t);
        }
        stats.pages_migrated += pages.len() as u64;
        stats.pages_prefetched += pages.iter().filter(|p| !faulted.contains(p)).count() as u64;
        Ok(())
    }
}
