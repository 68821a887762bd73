//! The migration figures of `peerdma bench` (`crates/peerdma/src/bench/sim.rs`, `migration`) as a criterion
//! benchmark, for profiling one direction on its own: N written anonymous pages (no THP) migrated to a
//! dmirror device's private memory (`to_device`) and back (`to_system`), in zero-time mode with the oracle
//! on. Only the timed ioctl is measured; building and filling the world is not.
//! `PEERDMA_MIGRATE_BENCH_PAGES=<n>` sets N (default 16,384, the bench's size).
#![expect(clippy::unwrap_used, reason = "benchmark harness")]

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use peerdma_core::{DeviceId, PAGE_SIZE};
use peerdma_devices::{Dmirror, DmirrorCosts, DmirrorDevice, DmirrorMemory};
use peerdma_mm::{Advice, Kernel, MmCosts, MmapArgs, Prot};
use peerdma_sim::{RunOutcome, Sim, SimConfig};

/// Which direction is timed.
#[derive(Clone, Copy)]
enum Dir {
    ToDevice,
    ToSystem,
}

/// Builds the world, migrates `pages` pages there and back, returns the time of the `dir` ioctl.
#[expect(clippy::disallowed_methods, reason = "a benchmark measures host time")]
fn one(pages: u64, dir: Dir) -> Duration {
    let sim = Sim::new(SimConfig {
        trace: false,
        ..SimConfig::default()
    });
    let k = Kernel::new(&sim, pages * PAGE_SIZE * 2 + (64 << 20), MmCosts::zero());
    let dev = DmirrorDevice::new(
        &k,
        DeviceId(1),
        DmirrorMemory::Private,
        pages * PAGE_SIZE + (16 << 20),
        DmirrorCosts::zero(),
    );
    let out = Rc::new(Cell::new(Duration::ZERO));
    let result = out.clone();
    sim.spawn("bench", async move {
        let pid = k.create_process();
        let args = MmapArgs {
            len: pages * PAGE_SIZE,
            prot: Prot::RW,
            private: true,
            anonymous: true,
            ..MmapArgs::default()
        };
        let buf = k.mmap(pid, &args).await.unwrap();
        k.madvise(pid, buf, pages * PAGE_SIZE, Advice::NoHugePage)
            .await
            .unwrap();
        let mut page = vec![0u8; 4096];
        for i in 0..pages {
            page[..8].copy_from_slice(&i.to_le_bytes());
            page[4088..].copy_from_slice(&(!i).to_le_bytes());
            k.store(pid, buf.add(i * PAGE_SIZE), &page).await.unwrap();
        }
        let m = Dmirror::open(&dev, pid).unwrap();
        let start = Instant::now();
        let r = m.migrate_to_dev(buf, pages).await.unwrap();
        let to_dev = start.elapsed();
        assert_eq!(r.cpages, pages);
        let start = Instant::now();
        let r = m.migrate_to_sys(buf, pages).await.unwrap();
        let to_sys = start.elapsed();
        assert_eq!(r.cpages, pages);
        m.close().await;
        result.set(match dir {
            Dir::ToDevice => to_dev,
            Dir::ToSystem => to_sys,
        });
    });
    assert_eq!(sim.run(), RunOutcome::Completed);
    out.get()
}

fn migrate_per_page(c: &mut Criterion) {
    let pages: u64 = std::env::var("PEERDMA_MIGRATE_BENCH_PAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16_384);
    let mut g = c.benchmark_group("migrate_per_page");
    for (name, dir) in [("to_device", Dir::ToDevice), ("to_system", Dir::ToSystem)] {
        g.bench_function(format!("{name}/{pages}"), |b| {
            b.iter_custom(|iters| {
                // One world per iteration, each timing `pages` pages: report the time per page.
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += one(pages, dir) / u32::try_from(pages).unwrap();
                }
                total
            });
        });
    }
    g.finish();
}

criterion_group!(benches, migrate_per_page);
criterion_main!(benches);
