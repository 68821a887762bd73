//! The simulated side of `peerdma bench`: each function builds a fresh world in zero-time mode (every model
//! cost zero, oracle on, tracing off), times one operation over `pages` pages on the host clock and returns
//! host nanoseconds per page (or per request). Only the operation is timed; building the world and
//! populating it is not.
//!
//! The worlds are those of the crates' own criterion benchmarks (`crates/peerdma-mm/benches/mm.rs`,
//! `crates/peerdma-dma/benches/dma_sg.rs`, `crates/peerdma-devices/benches/thp_migration.rs`): a kernel
//! with RAM for the run, a NIC behind a root port in a strict DMA IOMMU domain, a dmirror device with
//! device-private memory.

use std::cell::RefCell;
use std::future::Future;
use std::hint::black_box;
use std::rc::Rc;
use std::time::Instant;

use peerdma_core::{Bdf, DeviceId, FrameId, PAGE_SIZE, Pid, Range, Va};
use peerdma_devices::{Dmirror, DmirrorCosts, DmirrorDevice, DmirrorMemory};
use peerdma_dma::{DmaCosts, DmaMirror, DmaOp, Platform};
use peerdma_iommu::DomainConfig;
use peerdma_mm::pagetable::{PageTable, Pte};
use peerdma_mm::{Advice, Kernel, MmCosts, MmapArgs, Prot};
use peerdma_pci::{TopologyBuilder, WhitelistEntry};
use peerdma_sim::{RunOutcome, Sim, SimConfig};

/// The NIC that mirrors the process in the mirror world.
const NIC: DeviceId = DeviceId(0);
/// The dmirror device of the migration world.
const DMIRROR: DeviceId = DeviceId(1);
/// Pages of the window the translation-hit figure reads over and over: within the IOTLB's 64 entries
/// (`peerdma_iommu::DomainConfig::default`), so every request hits the mirror's entry and the IOTLB.
pub(crate) const HIT_WINDOW: u64 = 32;

/// A bench failure: the model refused an operation it should have done.
pub(crate) type BenchResult<T> = Result<T, String>;

/// The host clock (the bench measures host time, not simulated time: the one place the CLI reads it).
#[expect(
    clippy::disallowed_methods,
    reason = "the bench measures host time; simulated time is not what it reports"
)]
pub(crate) fn host_now() -> Instant {
    Instant::now()
}

/// Nanoseconds per unit of `elapsed` over `units`.
pub(crate) fn per(elapsed: std::time::Duration, units: u64) -> f64 {
    #[expect(
        clippy::cast_precision_loss,
        reason = "a timing figure; 2^52 ns or units are far beyond any run"
    )]
    let v = elapsed.as_nanos() as f64 / units.max(1) as f64;
    v
}

/// A fresh engine in zero-time mode without a trace.
pub(super) fn sim() -> Sim {
    Sim::new(SimConfig {
        trace: false,
        ..SimConfig::default()
    })
}

/// Runs `body` as the only agent of `sim` and returns what it produced.
pub(super) fn run_agent<T: 'static>(
    sim: &Sim,
    body: impl Future<Output = BenchResult<T>> + 'static,
) -> BenchResult<T> {
    let out: Rc<RefCell<Option<BenchResult<T>>>> = Rc::new(RefCell::new(None));
    let o = out.clone();
    sim.spawn("bench", async move {
        let r = body.await;
        *o.borrow_mut() = Some(r);
    });
    let outcome = sim.run();
    if outcome != RunOutcome::Completed {
        return Err(format!("the simulation did not complete: {outcome:?}"));
    }
    out.borrow_mut()
        .take()
        .unwrap_or_else(|| Err("the bench agent did not finish".to_owned()))
}

/// Drops the engine of a finished world and checks that its kernel went with it: a kernel still alive
/// once every handle is gone is kept by a reference cycle, and each repetition would leak a whole world
/// (its page data included).
fn check_freed(sim: Sim, kernel: &std::rc::Weak<Kernel>, world: &'static str) {
    drop(sim);
    if kernel.upgrade().is_some() {
        LEAKED_WORLDS.with(|n| n.borrow_mut().push(world));
    }
}

thread_local! {
    /// Worlds whose kernel outlived every handle (see [`check_freed`]).
    static LEAKED_WORLDS: RefCell<Vec<&'static str>> = const { RefCell::new(Vec::new()) };
}

/// The simulated worlds of this run that were not freed (`cpu_fault`, `cpu_fault_full_page`, `mirror`,
/// `migration`), one entry
/// per world.
pub(crate) fn leaked_worlds() -> Vec<&'static str> {
    LEAKED_WORLDS.with(|n| n.borrow().clone())
}

/// RAM for a world that holds `pages` resident pages: twice that plus 64 MiB, so reclaim never runs.
pub(super) fn ram_for(pages: u64) -> u64 {
    pages * PAGE_SIZE * 2 + (64 << 20)
}

/// A private anonymous read-write mapping of `pages` pages.
pub(super) async fn anon(k: &Kernel, pid: Pid, pages: u64, populate: bool) -> BenchResult<Va> {
    let args = MmapArgs {
        len: pages * PAGE_SIZE,
        prot: Prot::RW,
        private: true,
        anonymous: true,
        populate,
        ..MmapArgs::default()
    };
    k.mmap(pid, &args).await.map_err(|e| format!("mmap: {e}"))
}

/// One CPU anonymous write fault per page: a one-byte store to each of `pages` untouched pages (demand-zero
/// fault, page allocation, PTE install, oracle shadow). Returns ns per fault.
pub(crate) fn cpu_fault(pages: u64) -> BenchResult<f64> {
    store_per_page(pages, 1, "cpu_fault")
}

/// [`cpu_fault`] with a whole 4 KiB page stored into each untouched page: the fault, then the page's data
/// written and hashed in full (a one-byte store leaves a mostly-zero page, which the model keeps without a
/// 4 KiB buffer). Returns ns per page.
pub(crate) fn cpu_fault_full_page(pages: u64) -> BenchResult<f64> {
    store_per_page(pages, PAGE_SIZE, "cpu_fault_full_page")
}

/// Stores `bytes` (at most a page; byte `j` of page `i` is `i + j`, never all zero) at the start of each
/// of `pages` untouched anonymous pages and returns ns per page; `world` names the world in the leak check.
fn store_per_page(pages: u64, bytes: u64, world: &'static str) -> BenchResult<f64> {
    let sim = sim();
    let k = Kernel::new(&sim, ram_for(pages), MmCosts::zero());
    let weak = Rc::downgrade(&k);
    let len = usize::try_from(bytes.min(PAGE_SIZE)).map_err(|_| "page size overflow")?;
    let r = run_agent(&sim, async move {
        let pid = k.create_process();
        let buf = anon(&k, pid, pages, false).await?;
        let mut data = vec![1u8; len];
        let t = host_now();
        for i in 0..pages {
            if len > 1 {
                // Different data per page, as a real workload's (prepared outside the store, cheaply).
                data[..8].copy_from_slice(&i.to_le_bytes());
            }
            k.store(pid, buf.add(i * PAGE_SIZE), &data)
                .await
                .map_err(|e| format!("store: {e:?}"))?;
        }
        let ns = per(t.elapsed(), pages);
        k.munmap(pid, buf, pages * PAGE_SIZE)
            .await
            .map_err(|e| format!("munmap: {e}"))?;
        Ok(ns)
    });
    check_freed(sim, &weak, world);
    r
}

/// One page-table walk (`PageTable::lookup`) per probe, `pages` probes spread over a table of `pages`
/// present 4 KiB entries. Returns ns per walk.
pub(crate) fn pagetable_walk(pages: u64) -> f64 {
    let mut pt = PageTable::new();
    let base = 0x7f00_0000_0000u64;
    for i in 0..pages {
        pt.set_pte(
            Va::from_raw(base + i * PAGE_SIZE),
            Pte::Present {
                frame: FrameId(i),
                write: true,
                special: false,
            },
        );
    }
    let t = host_now();
    let mut hits = 0u64;
    for i in 0..pages {
        // A stride coprime with any power of two: every entry once, in a cache-unfriendly order.
        let va = Va::from_raw(base + ((i * 7919) % pages) * PAGE_SIZE);
        if pt.lookup(black_box(va)).is_some() {
            hits += 1;
        }
    }
    let ns = per(t.elapsed(), pages);
    black_box(hits);
    ns
}

/// The mirror world's three figures, ns each.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MirrorFigures {
    /// One device (ODP) fault of one page through the mirror: `hmm_range_fault`, DMA map, program.
    pub(crate) fault_per_page: f64,
    /// One device request through an existing entry: translation hit (mirror entry, IOTLB), the access,
    /// the oracle's check of the request.
    pub(crate) access_per_request: f64,
    /// MADV_DONTNEED over the mirrored range, per page and mirror: the notifier invalidation (zap, fence,
    /// unmap) plus the zap of the CPU page table.
    pub(crate) invalidate_per_page: f64,
}

/// A kernel and platform with one NIC in a strict DMA domain (as `crates/peerdma-dma/benches/dma_sg.rs`).
fn nic_platform(sim: &Sim, pages: u64) -> BenchResult<Rc<Platform>> {
    let kernel = Kernel::new(sim, ram_for(pages), MmCosts::zero());
    let mut b = TopologyBuilder::new();
    b.host_bridge("hb0", WhitelistEntry::NotListed);
    let rp = Bdf::new(0, 1, 0).ok_or("bad root port BDF")?;
    let ep = Bdf::new(1, 0, 0).ok_or("bad endpoint BDF")?;
    b.root_port("rp0", "hb0").bdf(rp);
    b.endpoint("nic0", "rp0", ep);
    let topo = b.build().map_err(|e| format!("topology: {e}"))?;
    let node = topo.lookup("nic0").ok_or("no nic0 in the topology")?;
    let p = Platform::new(kernel, topo, DmaCosts::zero());
    p.add_device(NIC, node, "nic0", DomainConfig::default())
        .map_err(|e| format!("add_device: {e}"))?;
    Ok(p)
}

/// `pages` populated anonymous pages mirrored by one NIC: each page faulted into the device on its own
/// (the ODP device page-fault path faults the page a request misses), then `requests` device reads
/// through a window of [`HIT_WINDOW`] mirrored pages, then MADV_DONTNEED of the whole range.
pub(crate) fn mirror(pages: u64, requests: u64) -> BenchResult<MirrorFigures> {
    let sim = sim();
    let p = nic_platform(&sim, pages)?;
    let weak = Rc::downgrade(&p.kernel);
    let r = run_agent(&sim, async move {
        let k = p.kernel.clone();
        let pid = k.create_process();
        let va = anon(&k, pid, pages, true).await?;
        let all = Range::from_len(va, pages * PAGE_SIZE).ok_or("range overflow")?;
        let dev = p.device(NIC).map_err(|e| format!("device: {e}"))?;
        let m = DmaMirror::register(&p, dev, pid, all).map_err(|e| format!("register: {e}"))?;

        let t = host_now();
        for i in 0..pages {
            let one = Range::from_len(va.add(i * PAGE_SIZE), PAGE_SIZE).ok_or("range overflow")?;
            m.fault(one, true)
                .await
                .map_err(|e| format!("mirror fault: {e}"))?;
        }
        let fault_per_page = per(t.elapsed(), pages);

        let window = HIT_WINDOW.min(pages);
        let rounds = requests.div_ceil(window).max(1);
        let t = host_now();
        for _ in 0..rounds {
            let ops = (0..window).map(|_| DmaOp::Read).collect();
            black_box(
                m.access(va, ops)
                    .await
                    .map_err(|e| format!("device access: {e}"))?,
            );
        }
        let access_per_request = per(t.elapsed(), rounds * window);

        let t = host_now();
        k.madvise(pid, va, pages * PAGE_SIZE, Advice::DontNeed)
            .await
            .map_err(|e| format!("madvise: {e}"))?;
        let invalidate_per_page = per(t.elapsed(), pages);
        if m.nr_mapped() != 0 {
            return Err(format!(
                "DONTNEED left {} mirror entries in place",
                m.nr_mapped()
            ));
        }
        m.unregister().await;
        Ok(MirrorFigures {
            fault_per_page,
            access_per_request,
            invalidate_per_page,
        })
    });
    check_freed(sim, &weak, "mirror");
    r
}

/// Migration to device-private memory and back, ns per page each way, data copy included.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MigrationFigures {
    /// `migrate_to_dev` (HMM_DMIRROR_MIGRATE_TO_DEV), per page.
    pub(crate) to_dev_per_page: f64,
    /// `migrate_to_sys` (HMM_DMIRROR_MIGRATE_TO_SYS), per page.
    pub(crate) to_sys_per_page: f64,
}

/// `pages` written anonymous pages migrated to a dmirror device's private memory and back (as
/// `crates/peerdma-devices/benches/thp_migration.rs`, without THP).
pub(crate) fn migration(pages: u64) -> BenchResult<MigrationFigures> {
    let sim = sim();
    let k = Kernel::new(&sim, ram_for(pages), MmCosts::zero());
    let dev = DmirrorDevice::new(
        &k,
        DMIRROR,
        DmirrorMemory::Private,
        pages * PAGE_SIZE + (16 << 20),
        DmirrorCosts::zero(),
    );
    let weak = Rc::downgrade(&k);
    let r = run_agent(&sim, async move {
        let pid = k.create_process();
        let buf = anon(&k, pid, pages, false).await?;
        k.madvise(pid, buf, pages * PAGE_SIZE, Advice::NoHugePage)
            .await
            .map_err(|e| format!("madvise: {e}"))?;
        let mut page = vec![0u8; usize::try_from(PAGE_SIZE).unwrap_or(4096)];
        for i in 0..pages {
            page[..8].copy_from_slice(&i.to_le_bytes());
            page[4088..].copy_from_slice(&(!i).to_le_bytes());
            k.store(pid, buf.add(i * PAGE_SIZE), &page)
                .await
                .map_err(|e| format!("store: {e:?}"))?;
        }
        let m = Dmirror::open(&dev, pid).map_err(|e| format!("dmirror open: {e}"))?;
        let t = host_now();
        let r = m
            .migrate_to_dev(buf, pages)
            .await
            .map_err(|e| format!("migrate_to_dev: {e}"))?;
        let to_dev_per_page = per(t.elapsed(), pages);
        if r.cpages != pages {
            return Err(format!(
                "migrate_to_dev moved {} of {pages} pages",
                r.cpages
            ));
        }
        let t = host_now();
        let r = m
            .migrate_to_sys(buf, pages)
            .await
            .map_err(|e| format!("migrate_to_sys: {e}"))?;
        let to_sys_per_page = per(t.elapsed(), pages);
        if r.cpages != pages {
            return Err(format!(
                "migrate_to_sys moved {} of {pages} pages",
                r.cpages
            ));
        }
        // Closing the file unregisters its notifier (the kernel would otherwise keep the file, and the
        // file the device and the kernel: a reference cycle).
        m.close().await;
        Ok(MigrationFigures {
            to_dev_per_page,
            to_sys_per_page,
        })
    });
    check_freed(sim, &weak, "migration");
    r
}
