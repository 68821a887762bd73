//! Benchmarks of the coherent DMA mirror ([`DmaMirror`]) at several populations, zero-time mode, oracle
//! on, strict IOMMU domain:
//! - `mirror_fault/<pages>`: a fresh mirror of `<pages>` present anonymous pages faults all of them into
//!   the device, 512 pages per `fault` call (the `hmm_range_fault` chunk of an ODP prefetch); the figure is
//!   the time per page;
//! - `mirror_invalidate/<pages>`: `MADV_DONTNEED` of all `<pages>` mirrored pages in one call (the CPU
//!   zap, the notifier, the device zap, the fence and the DMA unmaps); per page, one mirror. The pages are
//!   faulted back (untimed) before the next repetition;
//! - `mirror_access_hit`: 1,024 device reads through a mirror whose entries are all present (device
//!   translation hit, IOMMU translation, the access and the oracle's check); the figure is the time per
//!   access.
//!
//! Each sample builds its own world (untimed) and times only the repetitions inside it.
//! `PEERDMA_MIRROR_BENCH_MAX_PAGES=<n>` skips the populations above `n`.
#![expect(clippy::unwrap_used, reason = "benchmark harness")]
#![expect(
    clippy::disallowed_methods,
    reason = "a benchmark times the host's wall clock around one part of a run (the world's setup is not \
              timed), so it reads Instant::now itself"
)]

use std::cell::Cell;
use std::hint::black_box;
use std::rc::Rc;
use std::time::{Duration, Instant};

use criterion::{
    BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};
use peerdma_core::{Bdf, DeviceId, PAGE_SIZE, Pid, Range, Va};
use peerdma_dma::{DmaCosts, DmaMirror, DmaOp, Platform};
use peerdma_iommu::DomainConfig;
use peerdma_mm::{Advice, Kernel, MmCosts, MmapArgs, Prot};
use peerdma_pci::{TopologyBuilder, WhitelistEntry};
use peerdma_sim::{Sim, SimConfig};

const NIC: DeviceId = DeviceId(0);
/// Pages per `fault` call.
const CHUNK: u64 = 512;

fn sizes() -> Vec<u64> {
    let max = std::env::var("PEERDMA_MIRROR_BENCH_MAX_PAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(u64::MAX);
    [1 << 10, 1 << 14, 1 << 16, 1 << 18, 1 << 20]
        .into_iter()
        .filter(|&n| n <= max)
        .collect()
}

/// A world with `pages` of RAM beyond a small margin, and the NIC behind a strict IOMMU domain.
fn platform(sim: &Sim, pages: u64) -> Rc<Platform> {
    let kernel = Kernel::new(sim, (pages + 4096) * PAGE_SIZE, MmCosts::zero());
    let mut b = TopologyBuilder::new();
    b.host_bridge("hb0", WhitelistEntry::NotListed);
    b.root_port("rp0", "hb0").bdf(Bdf::new(0, 1, 0).unwrap());
    b.endpoint("nic0", "rp0", Bdf::new(1, 0, 0).unwrap());
    let topo = b.build().unwrap();
    let p = Platform::new(kernel, topo.clone(), DmaCosts::zero());
    p.add_device(
        NIC,
        topo.lookup("nic0").unwrap(),
        "nic0",
        DomainConfig::default(),
    )
    .unwrap();
    p
}

/// Runs `body` with a process holding `pages` present anonymous pages at `va`; returns what `body` timed.
fn with_pages<F, Fut>(pages: u64, body: F) -> Duration
where
    F: FnOnce(Rc<Platform>, Pid, Va) -> Fut + 'static,
    Fut: Future<Output = Duration> + 'static,
{
    let sim = Sim::new(SimConfig {
        trace: false,
        max_events: u64::MAX,
        ..SimConfig::default()
    });
    let p = platform(&sim, pages);
    let out = Rc::new(Cell::new(Duration::ZERO));
    let o = out.clone();
    sim.spawn("bench", async move {
        let k = p.kernel.clone();
        let pid = k.create_process();
        let args = MmapArgs {
            len: pages * PAGE_SIZE,
            prot: Prot::RW,
            private: true,
            anonymous: true,
            populate: true,
            ..MmapArgs::default()
        };
        let va = k.mmap(pid, &args).await.unwrap();
        o.set(body(p, pid, va).await);
    });
    black_box(sim.run());
    out.get()
}

/// Faults all of `m` into the device, `CHUNK` pages at a time.
async fn fault_all(m: &DmaMirror, va: Va, pages: u64) {
    let mut at = 0;
    while at < pages {
        let n = CHUNK.min(pages - at);
        let r = Range::from_len(va.add(at * PAGE_SIZE), n * PAGE_SIZE).unwrap();
        m.fault(r, true).await.unwrap();
        at += n;
    }
}

fn mirror_fault(c: &mut Criterion) {
    let mut g = c.benchmark_group("mirror_fault");
    g.sampling_mode(SamplingMode::Flat).sample_size(10);
    for pages in sizes() {
        g.throughput(Throughput::Elements(pages));
        g.bench_function(BenchmarkId::from_parameter(pages), |b| {
            b.iter_custom(|iters| {
                with_pages(pages, move |p, pid, va| async move {
                    let range = Range::from_len(va, pages * PAGE_SIZE).unwrap();
                    let mut t = Duration::ZERO;
                    for _ in 0..iters {
                        let dev = p.device(NIC).unwrap();
                        let m = DmaMirror::register(&p, dev, pid, range).unwrap();
                        let t0 = Instant::now();
                        fault_all(&m, va, pages).await;
                        t += t0.elapsed();
                        m.unregister().await;
                    }
                    t
                })
            });
        });
    }
    g.finish();
}

fn mirror_invalidate(c: &mut Criterion) {
    let mut g = c.benchmark_group("mirror_invalidate");
    g.sampling_mode(SamplingMode::Flat).sample_size(10);
    for pages in sizes() {
        g.throughput(Throughput::Elements(pages));
        g.bench_function(BenchmarkId::from_parameter(pages), |b| {
            b.iter_custom(|iters| {
                with_pages(pages, move |p, pid, va| async move {
                    let range = Range::from_len(va, pages * PAGE_SIZE).unwrap();
                    let dev = p.device(NIC).unwrap();
                    let m = DmaMirror::register(&p, dev, pid, range).unwrap();
                    let mut t = Duration::ZERO;
                    for _ in 0..iters {
                        fault_all(&m, va, pages).await;
                        assert_eq!(m.nr_mapped() as u64, pages);
                        let t0 = Instant::now();
                        p.kernel
                            .madvise(pid, va, pages * PAGE_SIZE, Advice::DontNeed)
                            .await
                            .unwrap();
                        t += t0.elapsed();
                        assert_eq!(m.nr_mapped(), 0);
                    }
                    m.unregister().await;
                    t
                })
            });
        });
    }
    g.finish();
}

fn mirror_access_hit(c: &mut Criterion) {
    const PAGES: u64 = 1024;
    let mut g = c.benchmark_group("mirror_access_hit");
    g.sampling_mode(SamplingMode::Flat).sample_size(10);
    g.throughput(Throughput::Elements(PAGES));
    g.bench_function(BenchmarkId::from_parameter(PAGES), |b| {
        b.iter_custom(|iters| {
            with_pages(PAGES, move |p, pid, va| async move {
                let range = Range::from_len(va, PAGES * PAGE_SIZE).unwrap();
                let dev = p.device(NIC).unwrap();
                let m = DmaMirror::register(&p, dev, pid, range).unwrap();
                fault_all(&m, va, PAGES).await;
                let mut t = Duration::ZERO;
                for _ in 0..iters {
                    let ops = vec![DmaOp::Read; usize::try_from(PAGES).unwrap()];
                    let t0 = Instant::now();
                    black_box(m.access(va, ops).await.unwrap());
                    t += t0.elapsed();
                }
                m.unregister().await;
                t
            })
        });
    });
    g.finish();
}

criterion_group!(benches, mirror_fault, mirror_invalidate, mirror_access_hit);
criterion_main!(benches);
