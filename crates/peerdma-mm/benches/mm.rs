//! Benchmarks of the mm model's hot paths: the CPU anonymous fault path, a page-table walk and the oracle's
//! page content hash.
#![expect(clippy::unwrap_used, reason = "benchmark harness")]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use peerdma_core::{FrameId, PAGE_SIZE, Va};
use peerdma_mm::pagetable::{PageTable, Pte};
use peerdma_mm::{Kernel, MmCosts, MmapArgs, Prot};
use peerdma_sim::{Sim, SimConfig};

const PAGES: u64 = 1024;

/// Faults in 1024 anonymous pages with one store each (demand-zero fault, page allocation, PTE install),
/// then unmaps them. Reported per iteration = 1024 faults.
fn anon_fault(c: &mut Criterion) {
    c.bench_function("cpu_anon_fault_1024_pages", |b| {
        b.iter(|| {
            let sim = Sim::new(SimConfig {
                trace: false,
                ..SimConfig::default()
            });
            let k = Kernel::new(&sim, 64 << 20, MmCosts::zero());
            let k2 = k.clone();
            sim.spawn("bench", async move {
                let pid = k2.create_process();
                let args = MmapArgs {
                    len: PAGES * PAGE_SIZE,
                    prot: Prot::RW,
                    private: true,
                    anonymous: true,
                    ..MmapArgs::default()
                };
                let buf = k2.mmap(pid, &args).await.unwrap();
                for i in 0..PAGES {
                    k2.store(pid, buf.add(i * PAGE_SIZE), &[1]).await.unwrap();
                }
                k2.munmap(pid, buf, PAGES * PAGE_SIZE).await.unwrap();
            });
            black_box(sim.run());
        });
    });
}

/// Looks up 1024 random-ish addresses in a page table holding 64 Ki 4 KiB entries.
fn pagetable_walk(c: &mut Criterion) {
    let mut pt = PageTable::new();
    let base = 0x7f00_0000_0000u64;
    for i in 0..65_536u64 {
        pt.set_pte(
            Va::from_raw(base + i * PAGE_SIZE),
            Pte::Present {
                frame: FrameId(i),
                write: true,
                special: false,
            },
        );
    }
    c.bench_function("pagetable_lookup_1024", |b| {
        b.iter(|| {
            let mut hits = 0u64;
            for i in 0..1024u64 {
                let va = Va::from_raw(base + ((i * 7919) % 65_536) * PAGE_SIZE);
                if pt.lookup(black_box(va)).is_some() {
                    hits += 1;
                }
            }
            black_box(hits)
        });
    });
}

/// Hashes one 4 KiB page the way the oracle does at every CPU or device access: a page of data, and the
/// all-zero page (which must hash to the zero hash).
fn page_hash(c: &mut Criterion) {
    let data: Vec<u8> = (0..PAGE_SIZE)
        .map(|i| u8::try_from(i * 31 % 251).unwrap())
        .collect();
    let zero = vec![0u8; 4096];
    c.bench_function("hash_page_data", |b| {
        b.iter(|| black_box(peerdma_mm::phys::hash_bytes(black_box(&data))));
    });
    c.bench_function("hash_page_zero", |b| {
        b.iter(|| black_box(peerdma_mm::phys::hash_bytes(black_box(&zero))));
    });
}

criterion_group!(benches, anon_fault, pagetable_walk, page_hash);
criterion_main!(benches);
