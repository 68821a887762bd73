//! Benchmarks of the DMA layer: `get_user_dma_sg` of 64 RAM pages through a strict IOMMU domain (pin, map,
//! then release: unmap and unpin), and a device read of those pages through the handle; and the access
//! path's host cost per request with DMA in flight (a 4 MiB read: 1,024 requests, up to 256 in flight, in
//! calibrated time).
#![expect(clippy::unwrap_used, reason = "benchmark harness")]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use peerdma_core::{Bdf, DeviceId, PAGE_SIZE, Range};
use peerdma_dma::{DmaCosts, DmaSgFlags, Platform, get_user_dma_sg};
use peerdma_iommu::DomainConfig;
use peerdma_mm::{Kernel, MmCosts, MmapArgs, Prot};
use peerdma_pci::{TopologyBuilder, WhitelistEntry};
use peerdma_sim::{Sim, SimConfig};

const PAGES: u64 = 64;
const NIC: DeviceId = DeviceId(0);

fn platform(sim: &Sim) -> std::rc::Rc<Platform> {
    platform_with(sim, DmaCosts::zero())
}

fn platform_with(sim: &Sim, costs: DmaCosts) -> std::rc::Rc<Platform> {
    let kernel = Kernel::new(sim, 64 << 20, MmCosts::zero());
    let mut b = TopologyBuilder::new();
    b.host_bridge("hb0", WhitelistEntry::NotListed);
    b.root_port("rp0", "hb0").bdf(Bdf::new(0, 1, 0).unwrap());
    b.endpoint("nic0", "rp0", Bdf::new(1, 0, 0).unwrap());
    let topo = b.build().unwrap();
    let p = Platform::new(kernel, topo.clone(), costs);
    p.add_device(
        NIC,
        topo.lookup("nic0").unwrap(),
        "nic0",
        DomainConfig::default(),
    )
    .unwrap();
    p
}

/// One iteration: 16 rounds of get_user_dma_sg (64 pages, short-term, write) and release, plus one device
/// read of the 64 pages in each round.
fn pin_map_release(c: &mut Criterion) {
    c.bench_function("get_user_dma_sg_64_pages_x16", |b| {
        b.iter(|| {
            let sim = Sim::new(SimConfig {
                trace: false,
                ..SimConfig::default()
            });
            let p = platform(&sim);
            let p2 = p.clone();
            sim.spawn("bench", async move {
                let k = p2.kernel.clone();
                let pid = k.create_process();
                let args = MmapArgs {
                    len: PAGES * PAGE_SIZE,
                    prot: Prot::RW,
                    private: true,
                    anonymous: true,
                    populate: true,
                    ..MmapArgs::default()
                };
                let va = k.mmap(pid, &args).await.unwrap();
                let range = Range::from_len(va, PAGES * PAGE_SIZE).unwrap();
                for _ in 0..16 {
                    let h = get_user_dma_sg(&p2, pid, range, NIC, DmaSgFlags::WRITE)
                        .await
                        .unwrap();
                    black_box(h.read(0, 64 * 4096).await.unwrap());
                    h.release().await;
                }
            });
            black_box(sim.run());
        });
    });
}

/// One iteration: a fresh world, 4 MiB populated and pinned, then one device read of all of it through the
/// access path in calibrated time (1,024 requests pipelined up to 256 in flight), and release.
fn read_in_flight(c: &mut Criterion) {
    c.bench_function("dma_read_4mib_in_flight", |b| {
        b.iter(|| {
            let sim = Sim::new(SimConfig {
                trace: false,
                ..SimConfig::default()
            });
            let p = platform_with(&sim, DmaCosts::calibrated());
            let p2 = p.clone();
            sim.spawn("bench", async move {
                let k = p2.kernel.clone();
                let pid = k.create_process();
                let len = 1024 * PAGE_SIZE;
                let args = MmapArgs {
                    len,
                    prot: Prot::RW,
                    private: true,
                    anonymous: true,
                    populate: true,
                    ..MmapArgs::default()
                };
                let va = k.mmap(pid, &args).await.unwrap();
                let range = Range::from_len(va, len).unwrap();
                let h = get_user_dma_sg(&p2, pid, range, NIC, DmaSgFlags::empty())
                    .await
                    .unwrap();
                black_box(h.read(0, 1024 * 4096).await.unwrap());
                h.release().await;
            });
            black_box(sim.run());
        });
    });
}

criterion_group!(benches, pin_map_release, read_in_flight);
criterion_main!(benches);
