//! Benchmarks of the IOVA allocator (iova.c `alloc_iova` / `free_iova`) with 1 Ki to 1 Mi live
//! single-page allocations: each iteration is one free + one allocation, so the time per iteration is the
//! cost of one such pair at that population.
//!
//! - `iova_lifo`: the most recent allocation is freed and a page allocated again (stack-like DMA
//!   map/unmap, the common streaming case).
//! - `iova_random`: a pseudo-randomly chosen live allocation is freed, then a page allocated.
//! - `iova_fill`: the allocator is filled top-down to N live pages; one iteration allocates one more page
//!   below them and frees it again (growth at the bottom of a dense region).
//! - `btree_random_floor`: not the allocator: the same random sequence of one removal and one insertion on
//!   a plain `BTreeMap` of N page numbers, the floor that any ordered index pays at that population
//!   (mostly cache misses), to tell the allocator's growth from the memory hierarchy's.
#![expect(clippy::unwrap_used, reason = "benchmark harness")]

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use peerdma_iommu::iova::IovaAllocator;

/// The live populations measured, with their labels.
const SIZES: [(usize, &str); 4] = [
    (1 << 10, "1k"),
    (1 << 14, "16k"),
    (1 << 18, "256k"),
    (1 << 20, "1M"),
];

/// A 48-bit IOVA window in 4 KiB pages, like a DMA domain's default aperture.
const END_PFN: u64 = 1 << 36;

/// An allocator holding `n` single-page allocations made top-down, and their page numbers.
fn populated(n: usize) -> (IovaAllocator, Vec<u64>) {
    let mut a = IovaAllocator::new(1, END_PFN);
    let live = (0..n).map(|_| a.alloc(1, u64::MAX).unwrap().0).collect();
    (a, live)
}

/// A small deterministic xorshift generator, so that every run frees the same sequence.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// The populations to run: all of [`SIZES`], or those up to `PEERDMA_IOVA_BENCH_MAX_LIVE` (a quadratic
/// allocator cannot even build the largest ones).
fn sizes() -> impl Iterator<Item = (usize, &'static str)> {
    let max = std::env::var("PEERDMA_IOVA_BENCH_MAX_LIVE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(usize::MAX);
    SIZES.into_iter().filter(move |&(n, _)| n <= max)
}

fn iova(c: &mut Criterion) {
    let mut g = c.benchmark_group("iova_lifo");
    for (n, label) in sizes() {
        let (mut a, mut live) = populated(n);
        g.bench_with_input(BenchmarkId::from_parameter(label), &n, |b, _| {
            b.iter(|| {
                let pfn = live.pop().unwrap();
                a.free(pfn).unwrap();
                live.push(black_box(a.alloc(1, u64::MAX).unwrap().0));
            });
        });
    }
    g.finish();

    let mut g = c.benchmark_group("iova_random");
    for (n, label) in sizes() {
        let (mut a, mut live) = populated(n);
        let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
        g.bench_with_input(BenchmarkId::from_parameter(label), &n, |b, _| {
            b.iter(|| {
                let i = usize::try_from(next(&mut rng) % live.len() as u64).unwrap();
                a.free(live[i]).unwrap();
                live[i] = black_box(a.alloc(1, u64::MAX).unwrap().0);
            });
        });
    }
    g.finish();

    let mut g = c.benchmark_group("btree_random_floor");
    for (n, label) in sizes() {
        let (_, mut live) = populated(n);
        let mut map: std::collections::BTreeMap<u64, u64> = live.iter().map(|&p| (p, 1)).collect();
        let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
        g.bench_with_input(BenchmarkId::from_parameter(label), &n, |b, _| {
            b.iter(|| {
                let i = usize::try_from(next(&mut rng) % live.len() as u64).unwrap();
                let pfn = live[i];
                map.remove(&pfn).unwrap();
                map.insert(pfn, 1);
                live[i] = black_box(pfn);
            });
        });
    }
    g.finish();

    let mut g = c.benchmark_group("iova_fill");
    for (n, label) in sizes() {
        let (mut a, _) = populated(n);
        g.bench_with_input(BenchmarkId::from_parameter(label), &n, |b, _| {
            b.iter(|| {
                let pfn = black_box(a.alloc(1, u64::MAX).unwrap().0);
                a.free(pfn).unwrap();
            });
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    targets = iova
}
criterion_main!(benches);
