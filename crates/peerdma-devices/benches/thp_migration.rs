//! hmm.benchmark_thp_migration (spec/linux-hmm.md §3.2 #38) as a benchmark: for each size, with and without
//! MADV_HUGEPAGE, write the buffer, then migrate_to_dev + migrate_to_sys. Measures the model's host cost of one
//! round trip (simulated time is reported by the scenarios, not here). Every call must succeed.
#![expect(clippy::unwrap_used, reason = "benchmark harness")]

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use peerdma_core::{DeviceId, PAGE_SIZE, PMD_SIZE};
use peerdma_devices::{Dmirror, DmirrorCosts, DmirrorDevice, DmirrorMemory};
use peerdma_mm::{Advice, Kernel, MmCosts, MmapArgs, Prot};
use peerdma_sim::{RunOutcome, Sim, SimConfig};

fn round_trip(size: u64, thp: bool) {
    let sim = Sim::new(SimConfig {
        trace: false,
        ..SimConfig::default()
    });
    let k = Kernel::new(&sim, 64 << 20, MmCosts::zero());
    let dev = DmirrorDevice::new(
        &k,
        DeviceId(0),
        DmirrorMemory::Private,
        64 << 20,
        DmirrorCosts::zero(),
    );
    let k2 = k.clone();
    sim.spawn("bench", async move {
        let pid = k2.create_process();
        let args = MmapArgs {
            len: size + PMD_SIZE,
            prot: Prot::RW,
            private: true,
            anonymous: true,
            ..MmapArgs::default()
        };
        let raw = k2.mmap(pid, &args).await.unwrap();
        let buf = raw.align_up(PMD_SIZE).unwrap();
        let advice = if thp {
            Advice::HugePage
        } else {
            Advice::NoHugePage
        };
        k2.madvise(pid, buf, size, advice).await.unwrap();
        let data: Vec<u8> = (0..size).map(|i| (i / 4).to_le_bytes()[0]).collect();
        k2.store(pid, buf, &data).await.unwrap();
        let m = Dmirror::open(&dev, pid).unwrap();
        let pages = size / PAGE_SIZE;
        m.migrate_to_dev(buf, pages).await.unwrap();
        m.migrate_to_sys(buf, pages).await.unwrap();
    });
    assert_eq!(sim.run(), RunOutcome::Completed);
}

fn thp_migration(c: &mut Criterion) {
    let mut g = c.benchmark_group("thp_migration_round_trip");
    for size in [
        PMD_SIZE / 4,
        PMD_SIZE / 2,
        PMD_SIZE,
        2 * PMD_SIZE,
        4 * PMD_SIZE,
    ] {
        for thp in [true, false] {
            let id = BenchmarkId::new(if thp { "thp" } else { "nothp" }, size / 1024);
            g.bench_with_input(id, &size, |b, &s| b.iter(|| round_trip(black_box(s), thp)));
        }
    }
    g.finish();
}

criterion_group!(benches, thp_migration);
criterion_main!(benches);
