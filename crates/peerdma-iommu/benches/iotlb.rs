//! Benchmarks of the IOMMU model's hot paths: an IOTLB hit, a miss with its page-table walk, and a
//! map + unmap round trip (strict and with the flush queue).
#![expect(clippy::unwrap_used, reason = "benchmark harness")]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use peerdma_core::{PAGE_SIZE, Pa, SimTime};
use peerdma_iommu::{DomainConfig, DomainType, IommuDomain, IommuProt};

const PAGES: u64 = 1024;

/// A domain with `PAGES` pages mapped at one IOVA range; returns it and the range's base.
fn mapped(domain_type: DomainType) -> (IommuDomain, peerdma_core::Iova) {
    let mut d = IommuDomain::new(DomainConfig::with_type(domain_type));
    let iova = d.alloc_iova(PAGES * PAGE_SIZE).unwrap();
    d.map(
        iova,
        Pa::from_raw(1 << 30),
        PAGES * PAGE_SIZE,
        IommuProt::READ_WRITE,
    )
    .unwrap();
    (d, iova)
}

/// 1024 translations of one page: after the first, IOTLB hits.
fn iotlb_hit(c: &mut Criterion) {
    let (mut d, iova) = mapped(DomainType::Dma);
    c.bench_function("iotlb_hit_1024", |b| {
        b.iter(|| {
            for _ in 0..PAGES {
                black_box(d.translate(black_box(iova), false));
            }
        });
    });
}

/// 1024 translations striding over 1024 pages with a 64-entry IOTLB: every one misses and walks.
fn iotlb_miss(c: &mut Criterion) {
    let (mut d, iova) = mapped(DomainType::Dma);
    c.bench_function("iotlb_miss_walk_1024", |b| {
        b.iter(|| {
            for i in 0..PAGES {
                black_box(d.translate(iova.add(i * PAGE_SIZE), false));
            }
        });
    });
}

/// Allocate, map and unmap one 16-page list, 64 times: strict (invalidate per unmap) and lazy (flush queue).
fn map_unmap(c: &mut Criterion) {
    for (name, t) in [
        ("map_unmap_16_pages_x64_strict", DomainType::Dma),
        ("map_unmap_16_pages_x64_lazy", DomainType::DmaFq),
    ] {
        c.bench_function(name, |b| {
            b.iter(|| {
                let mut d = IommuDomain::new(DomainConfig::with_type(t));
                for i in 0..64u64 {
                    let iova = d.alloc_iova(16 * PAGE_SIZE).unwrap();
                    d.map(
                        iova,
                        Pa::from_raw(i << 20),
                        16 * PAGE_SIZE,
                        IommuProt::READ_WRITE,
                    )
                    .unwrap();
                    black_box(d.unmap(iova, 16 * PAGE_SIZE, SimTime(i * 1000)).unwrap());
                }
            });
        });
    }
}

criterion_group!(benches, iotlb_hit, iotlb_miss, map_unmap);
criterion_main!(benches);
