use peerdma_core::{Errno, Iova, PAGE_SIZE, Pa, Range, SimDuration, SimTime};

use super::*;

const PA: u64 = 0x8000_0000;

fn domain(domain_type: DomainType) -> IommuDomain {
    IommuDomain::new(DomainConfig::with_type(domain_type))
}

fn fq_domain(fq_size: usize) -> IommuDomain {
    IommuDomain::new(DomainConfig {
        fq_size,
        ..DomainConfig::with_type(DomainType::DmaFq)
    })
}

/// Allocates and maps `nr_pages` pages read-write at `PA + pa_off`.
fn mapped(dom: &mut IommuDomain, nr_pages: u64, pa_off: u64) -> Iova {
    let iova = dom.alloc_iova(nr_pages * PAGE_SIZE).unwrap();
    dom.map(
        iova,
        Pa::from_raw(PA + pa_off),
        nr_pages * PAGE_SIZE,
        IommuProt::READ_WRITE,
    )
    .unwrap();
    iova
}

fn at_ms(ms: u64) -> SimTime {
    SimTime::ZERO + SimDuration::from_millis(ms)
}

#[test]
fn default_config_is_strict_with_documented_defaults() {
    let cfg = DomainConfig::default();
    assert_eq!(cfg.domain_type, DomainType::Dma);
    assert_eq!(cfg.aperture.start.raw(), PAGE_SIZE);
    assert_eq!(cfg.aperture.end.raw(), 1 << 48);
    assert_eq!(cfg.iotlb_entries, 64);
    assert_eq!(cfg.fq_size, 256);
    assert_eq!(cfg.fq_timeout, SimDuration::from_millis(10));
}

#[test]
fn invalid_configs_are_rejected() {
    let unaligned = DomainConfig {
        aperture: Range::new(Iova::from_raw(0x1001), Iova::from_raw(0x10_0000)),
        ..DomainConfig::default()
    };
    let too_wide = DomainConfig {
        aperture: Range::new(Iova::from_raw(0x1000), Iova::from_raw(1 << 49)),
        ..DomainConfig::default()
    };
    let no_queue = DomainConfig {
        fq_size: 0,
        ..DomainConfig::with_type(DomainType::DmaFq)
    };
    for cfg in [unaligned, too_wide, no_queue] {
        let err = IommuDomain::try_new(cfg).unwrap_err();
        assert_eq!(err.errno(), Errno::EINVAL);
    }
}

#[test]
fn iova_allocation_is_top_down_from_the_aperture_end() {
    let mut dom = domain(DomainType::Dma);
    let a = dom.alloc_iova(PAGE_SIZE).unwrap();
    let b = dom.alloc_iova(100).unwrap();
    assert_eq!(a.raw(), (1 << 48) - PAGE_SIZE);
    assert_eq!(b.raw(), (1 << 48) - 2 * PAGE_SIZE);
    assert_eq!(dom.stats().iova_allocs, 2);
}

#[test]
fn iova_allocation_is_size_aligned() {
    let mut dom = domain(DomainType::Dma);
    dom.alloc_iova(PAGE_SIZE).unwrap();
    // 3 pages round up to 4 and align to 16 KiB; 33 pages align to 64 pages (256 KiB).
    let three = dom.alloc_iova(3 * PAGE_SIZE).unwrap();
    let big = dom.alloc_iova(33 * PAGE_SIZE).unwrap();
    assert!(three.is_aligned(4 * PAGE_SIZE));
    assert_eq!(three.raw(), (1 << 48) - 8 * PAGE_SIZE);
    assert!(big.is_aligned(64 * PAGE_SIZE));
    assert_eq!(big.raw(), (1 << 48) - 64 * PAGE_SIZE);
}

#[test]
fn iova_limit_keeps_the_allocation_below_4_gib() {
    let mut dom = domain(DomainType::Dma);
    let iova = dom
        .alloc_iova_limit(2 * PAGE_SIZE, Iova::from_raw(1 << 32))
        .unwrap();
    assert_eq!(iova.raw(), (1 << 32) - 2 * PAGE_SIZE);
}

#[test]
fn exhausted_iova_space_is_enomem() {
    // 15 usable pages: [4 KiB, 64 KiB).
    let mut dom = IommuDomain::new(DomainConfig {
        aperture: Range::new(Iova::from_raw(0), Iova::from_raw(16 * PAGE_SIZE)),
        ..DomainConfig::default()
    });
    assert_eq!(dom.alloc_iova(8 * PAGE_SIZE).unwrap().raw(), 8 * PAGE_SIZE);
    let err = dom.alloc_iova(8 * PAGE_SIZE).unwrap_err();
    assert_eq!(err.errno(), Errno::ENOMEM);
    // Page 0 is never handed out: 7 single pages fit, the 8th does not.
    for _ in 0..7 {
        assert_ne!(dom.alloc_iova(PAGE_SIZE).unwrap().raw(), 0);
    }
    assert_eq!(
        dom.alloc_iova(PAGE_SIZE).unwrap_err().errno(),
        Errno::ENOMEM
    );
}

#[test]
fn freed_iova_is_reused() {
    let mut dom = domain(DomainType::Dma);
    let a = dom.alloc_iova(PAGE_SIZE).unwrap();
    dom.free_iova(a).unwrap();
    assert_eq!(dom.alloc_iova(PAGE_SIZE).unwrap(), a);
    assert_eq!(dom.stats().iova_frees, 1);
}

#[test]
fn freeing_a_mapped_iova_is_ebusy() {
    let mut dom = domain(DomainType::Dma);
    let iova = mapped(&mut dom, 1, 0);
    assert_eq!(dom.free_iova(iova).unwrap_err().errno(), Errno::EBUSY);
    assert_eq!(
        dom.free_iova(iova.add(PAGE_SIZE)).unwrap_err().errno(),
        Errno::EINVAL
    );
}

#[test]
fn reserved_iova_is_never_allocated() {
    let mut dom = IommuDomain::new(DomainConfig {
        aperture: Range::new(Iova::from_raw(0), Iova::from_raw(16 * PAGE_SIZE)),
        ..DomainConfig::default()
    });
    dom.reserve_iova(Range::new(
        Iova::from_raw(8 * PAGE_SIZE),
        Iova::from_raw(16 * PAGE_SIZE),
    ))
    .unwrap();
    assert_eq!(dom.alloc_iova(PAGE_SIZE).unwrap().raw(), 7 * PAGE_SIZE);
    let overlap = dom.reserve_iova(Range::new(
        Iova::from_raw(7 * PAGE_SIZE),
        Iova::from_raw(8 * PAGE_SIZE),
    ));
    assert_eq!(overlap.unwrap_err().errno(), Errno::EBUSY);
}

#[test]
fn map_then_lookup_and_translate_keep_the_page_offset() {
    let mut dom = domain(DomainType::Dma);
    let iova = mapped(&mut dom, 2, 0);
    let second = iova.add(PAGE_SIZE + 0x10);
    assert_eq!(
        dom.lookup(second),
        Some((Pa::from_raw(PA + PAGE_SIZE + 0x10), IommuProt::READ_WRITE))
    );
    assert_eq!(dom.iotlb().len(), 0, "lookup must not fill the IOTLB");
    assert_eq!(
        dom.translate(second, false),
        Translation::Miss {
            pa: Pa::from_raw(PA + PAGE_SIZE + 0x10),
            levels: 4
        }
    );
    assert_eq!(dom.mapped_pages(), 2);
    assert_eq!(dom.stats().mapped_pages, 2);
}

#[test]
fn double_map_is_eexist_and_maps_nothing() {
    let mut dom = domain(DomainType::Dma);
    let iova = dom.alloc_iova(4 * PAGE_SIZE).unwrap();
    dom.map(
        iova.add(PAGE_SIZE),
        Pa::from_raw(PA),
        PAGE_SIZE,
        IommuProt::READ,
    )
    .unwrap();
    let err = dom
        .map(iova, Pa::from_raw(PA), 2 * PAGE_SIZE, IommuProt::READ)
        .unwrap_err();
    assert_eq!(err.errno(), Errno::EEXIST);
    assert_eq!(
        err,
        Error::AlreadyMapped {
            iova: iova.add(PAGE_SIZE)
        }
    );
    assert_eq!(dom.lookup(iova), None);
    assert_eq!(dom.mapped_pages(), 1);
}

#[test]
fn map_outside_a_live_allocation_is_refused() {
    let mut dom = domain(DomainType::Dma);
    let iova = dom.alloc_iova(PAGE_SIZE).unwrap();
    let past = dom.map(iova, Pa::from_raw(PA), 2 * PAGE_SIZE, IommuProt::READ);
    assert_eq!(
        past.unwrap_err().errno(),
        Errno::EFAULT,
        "past the aperture end"
    );
    let below = dom.map(
        iova.align_down(1 << 20),
        Pa::from_raw(PA),
        PAGE_SIZE,
        IommuProt::READ,
    );
    assert!(matches!(below, Err(Error::NotAllocated { .. })));
}

#[test]
fn map_rejects_unaligned_and_no_access_requests() {
    let mut dom = domain(DomainType::Dma);
    let iova = dom.alloc_iova(PAGE_SIZE).unwrap();
    let unaligned = dom.map(iova, Pa::from_raw(PA + 8), PAGE_SIZE, IommuProt::READ);
    assert!(matches!(unaligned, Err(Error::Unaligned { .. })));
    let none = dom.map(iova, Pa::from_raw(PA), PAGE_SIZE, IommuProt::default());
    assert_eq!(none, Err(Error::NoAccess));
}

#[test]
fn unmap_of_an_unmapped_range_is_enoent() {
    let mut dom = domain(DomainType::Dma);
    let iova = dom.alloc_iova(2 * PAGE_SIZE).unwrap();
    dom.map(iova, Pa::from_raw(PA), PAGE_SIZE, IommuProt::READ)
        .unwrap();
    let err = dom.unmap(iova, 2 * PAGE_SIZE, SimTime::ZERO).unwrap_err();
    assert_eq!(
        err,
        Error::NotMapped {
            iova: iova.add(PAGE_SIZE)
        }
    );
    assert_eq!(err.errno(), Errno::ENOENT);
    assert_eq!(dom.mapped_pages(), 1, "a failed unmap changes nothing");
}

#[test]
fn unmap_must_cover_the_allocation_from_its_start() {
    let mut dom = domain(DomainType::Dma);
    let iova = mapped(&mut dom, 2, 0);
    let middle = dom.unmap(iova.add(PAGE_SIZE), PAGE_SIZE, SimTime::ZERO);
    assert!(matches!(middle, Err(Error::NotAllocated { .. })));
    let head = dom.unmap(iova, PAGE_SIZE, SimTime::ZERO);
    assert_eq!(head.unwrap_err().errno(), Errno::EBUSY);
    assert_eq!(dom.mapped_pages(), 2);
}

#[test]
fn unmap_accepts_the_dma_address_with_its_page_offset() {
    let mut dom = domain(DomainType::Dma);
    let iova = mapped(&mut dom, 2, 0);
    let out = dom
        .unmap(iova.add(0x80), 2 * PAGE_SIZE - 0x80, SimTime::ZERO)
        .unwrap();
    assert_eq!(out.nr_pages, 2);
    assert_eq!(dom.mapped_pages(), 0);
}

#[test]
fn iotlb_hits_after_a_miss() {
    let mut dom = domain(DomainType::Dma);
    let iova = mapped(&mut dom, 1, 0);
    assert!(matches!(
        dom.translate(iova, false),
        Translation::Miss { .. }
    ));
    assert_eq!(
        dom.translate(iova.add(8), true),
        Translation::Hit {
            pa: Pa::from_raw(PA + 8),
            stale: false
        }
    );
    let s = dom.stats();
    assert_eq!((s.iotlb_misses, s.walks, s.iotlb_hits), (1, 1, 1));
}

#[test]
fn iotlb_is_bounded_and_evicts_the_least_recently_used_page() {
    let mut dom = IommuDomain::new(DomainConfig {
        iotlb_entries: 2,
        ..DomainConfig::default()
    });
    let iova = mapped(&mut dom, 3, 0);
    let page = |i: u64| iova.add(i * PAGE_SIZE);
    dom.translate(page(0), false);
    dom.translate(page(1), false);
    dom.translate(page(0), false); // page 1 is now the LRU entry
    dom.translate(page(2), false);
    assert_eq!(dom.iotlb().len(), 2);
    assert!(dom.iotlb().contains(page(0).page_number()));
    assert!(!dom.iotlb().contains(page(1).page_number()));
    assert!(matches!(
        dom.translate(page(0), false),
        Translation::Hit { .. }
    ));
    assert!(matches!(
        dom.translate(page(1), false),
        Translation::Miss { .. }
    ));
    assert_eq!(dom.stats().iotlb_evictions, 2);
}

#[test]
fn write_to_a_read_only_mapping_faults_and_is_not_cached() {
    let mut dom = domain(DomainType::Dma);
    let iova = dom.alloc_iova(PAGE_SIZE).unwrap();
    dom.map(iova, Pa::from_raw(PA), PAGE_SIZE, IommuProt::READ)
        .unwrap();
    let expected = Translation::Fault(IommuFault {
        iova,
        write: true,
        reason: FaultReason::Permission,
    });
    assert_eq!(dom.translate(iova, true), expected);
    assert!(dom.iotlb().is_empty());
    // Once the read caches the entry, the cached permissions still refuse the write.
    dom.translate(iova, false);
    assert_eq!(dom.translate(iova, true), expected);
    assert_eq!(dom.stats().faults, 2);
}

#[test]
fn translate_of_an_unmapped_iova_faults_not_mapped() {
    let mut dom = domain(DomainType::Dma);
    let t = dom.translate(Iova::from_raw(0x1234_5000), false);
    assert_eq!(
        t,
        Translation::Fault(IommuFault {
            iova: Iova::from_raw(0x1234_5000),
            write: false,
            reason: FaultReason::NotMapped
        })
    );
    assert_eq!(t.pa(), None);
}

#[test]
fn strict_unmap_faults_immediately_and_frees_the_iova() {
    let mut dom = domain(DomainType::Dma);
    let iova = mapped(&mut dom, 1, 0);
    dom.translate(iova, false);
    let out = dom.unmap(iova, PAGE_SIZE, SimTime::ZERO).unwrap();
    assert_eq!(
        out,
        UnmapOutcome {
            nr_pages: 1,
            invalidated_range: true,
            queued: false,
            flushed: false,
            freed_iovas: 1
        }
    );
    assert!(matches!(
        dom.translate(iova, false),
        Translation::Fault(IommuFault {
            reason: FaultReason::NotMapped,
            ..
        })
    ));
    assert_eq!(dom.stats().range_invalidations, 1);
    assert_eq!(dom.stats().flushes, 0);
    assert_eq!(dom.alloc_iova(PAGE_SIZE).unwrap(), iova, "freed at once");
}

#[test]
fn deferred_unmap_leaves_stale_iotlb_entries_usable_until_the_flush() {
    let mut dom = domain(DomainType::DmaFq);
    let iova = mapped(&mut dom, 2, 0);
    dom.translate(iova, true); // caches page 0 only
    let out = dom.unmap(iova, 2 * PAGE_SIZE, SimTime::ZERO).unwrap();
    assert!(out.queued && !out.flushed && !out.invalidated_range);
    assert_eq!(out.freed_iovas, 0);
    assert_eq!(
        dom.translate(iova, true),
        Translation::Hit {
            pa: Pa::from_raw(PA),
            stale: true
        }
    );
    // The uncached page walks the cleared table and faults.
    assert!(matches!(
        dom.translate(iova.add(PAGE_SIZE), false),
        Translation::Fault(_)
    ));
    assert_eq!(dom.stats().stale_hits, 1);
    dom.flush_all();
    assert!(matches!(dom.translate(iova, true), Translation::Fault(_)));
}

#[test]
fn deferred_iova_is_not_reusable_until_flushed() {
    let mut dom = domain(DomainType::DmaFq);
    let iova = mapped(&mut dom, 1, 0);
    dom.unmap(iova, PAGE_SIZE, SimTime::ZERO).unwrap();
    let other = dom.alloc_iova(PAGE_SIZE).unwrap();
    assert_ne!(other, iova);
    let remap = dom.map(iova, Pa::from_raw(PA), PAGE_SIZE, IommuProt::READ);
    assert!(matches!(remap, Err(Error::NotAllocated { .. })));
    assert!(matches!(
        dom.free_iova(iova),
        Err(Error::NotAllocated { .. })
    ));
    dom.free_iova(other).unwrap();
    dom.flush_all();
    assert_eq!(dom.alloc_iova(PAGE_SIZE).unwrap(), iova);
}

#[test]
fn flush_queue_flushes_exactly_at_the_fq_size_th_unmap() {
    let mut dom = fq_domain(4);
    let iovas: Vec<Iova> = (0..4).map(|i| mapped(&mut dom, 1, i * PAGE_SIZE)).collect();
    dom.translate(iovas[0], false);
    for &iova in &iovas[..3] {
        let out = dom.unmap(iova, PAGE_SIZE, SimTime::ZERO).unwrap();
        assert!(!out.flushed);
    }
    assert_eq!(dom.fq_len(), 3);
    assert!(matches!(
        dom.translate(iovas[0], false),
        Translation::Hit { stale: true, .. }
    ));
    let out = dom.unmap(iovas[3], PAGE_SIZE, SimTime::ZERO).unwrap();
    assert!(out.flushed);
    assert_eq!(out.freed_iovas, 4);
    assert_eq!(dom.fq_len(), 0);
    assert_eq!(dom.nr_iova_allocations(), 0);
    assert!(matches!(
        dom.translate(iovas[0], false),
        Translation::Fault(_)
    ));
    let s = dom.stats();
    assert_eq!((s.fq_queued, s.fq_full_flushes, s.flushes), (4, 1, 1));
}

#[test]
fn flush_queue_flushes_when_tick_reaches_the_timeout() {
    let mut dom = domain(DomainType::DmaFq);
    let iova = mapped(&mut dom, 1, 0);
    dom.translate(iova, false);
    dom.unmap(iova, PAGE_SIZE, at_ms(1)).unwrap();
    assert_eq!(dom.fq_deadline(), Some(at_ms(11)));
    assert!(!dom.tick(SimTime(at_ms(11).as_nanos() - 1)));
    assert!(matches!(
        dom.translate(iova, false),
        Translation::Hit { stale: true, .. }
    ));
    assert!(dom.tick(at_ms(11)));
    assert!(matches!(dom.translate(iova, false), Translation::Fault(_)));
    assert_eq!(dom.fq_deadline(), None);
    assert_eq!(dom.stats().fq_timeout_flushes, 1);
    assert!(!dom.tick(at_ms(30)), "nothing left to flush");
}

#[test]
fn an_overdue_timeout_flushes_before_the_next_unmap_is_queued() {
    let mut dom = domain(DomainType::DmaFq);
    let a = mapped(&mut dom, 1, 0);
    let b = mapped(&mut dom, 1, PAGE_SIZE);
    dom.unmap(a, PAGE_SIZE, at_ms(0)).unwrap();
    let out = dom.unmap(b, PAGE_SIZE, at_ms(20)).unwrap();
    assert!(out.flushed && out.queued);
    assert_eq!(out.freed_iovas, 1);
    assert_eq!(dom.fq_len(), 1);
    assert_eq!(dom.fq_deadline(), Some(at_ms(30)));
}

#[test]
fn strict_domains_never_flush_on_tick() {
    let mut dom = domain(DomainType::Dma);
    let iova = mapped(&mut dom, 1, 0);
    dom.unmap(iova, PAGE_SIZE, SimTime::ZERO).unwrap();
    assert!(!dom.tick(at_ms(100)));
    assert_eq!(dom.stats().flushes, 0);
}

#[test]
fn identity_domain_translates_iova_to_the_same_pa() {
    let mut dom = domain(DomainType::Identity);
    let iova = Iova::from_raw(0x1234_5678);
    assert_eq!(
        dom.translate(iova, true),
        Translation::Hit {
            pa: Pa::from_raw(0x1234_5678),
            stale: false
        }
    );
    assert!(dom.iotlb().is_empty());
    assert_eq!(dom.stats().identity_translations, 1);
    assert_eq!(dom.stats().iotlb_hits, 0);
    assert_eq!(
        dom.alloc_iova(PAGE_SIZE).unwrap_err(),
        Error::IdentityDomain {
            op: "iova allocator"
        }
    );
    assert_eq!(
        dom.map(
            iova.align_down(PAGE_SIZE),
            Pa::from_raw(0),
            PAGE_SIZE,
            IommuProt::READ
        )
        .unwrap_err()
        .errno(),
        Errno::EINVAL
    );
}

#[test]
fn unlink_clears_a_page_inside_an_allocation_syncs_at_once_and_keeps_the_iova() {
    for ty in [DomainType::Dma, DomainType::DmaFq] {
        let mut dom = domain(ty);
        let base = mapped(&mut dom, 4, 0);
        // Cache page 2's translation, then unlink it alone (not the allocation's first page).
        let page2 = base.add(2 * PAGE_SIZE);
        assert!(matches!(
            dom.translate(page2, false),
            Translation::Miss { .. }
        ));
        let out = dom.unlink(page2, PAGE_SIZE).unwrap();
        assert_eq!(out.nr_pages, 1);
        assert!(
            out.invalidated_range,
            "{ty:?}: dma_iova_unlink always syncs"
        );
        assert!(!out.queued && out.freed_iovas == 0, "{ty:?}");
        assert_eq!(dom.fq_len(), 0, "{ty:?}: nothing goes on the flush queue");
        assert!(
            matches!(dom.translate(page2, false), Translation::Fault(_)),
            "{ty:?}: the IOTLB entry went with the PTE"
        );
        assert_eq!(dom.mapped_pages(), 3);
        assert_eq!(dom.nr_iova_allocations(), 1, "the reservation stays");
        // Linked again at the same IOVA, then everything unlinked and the reservation freed.
        dom.map(page2, Pa::from_raw(PA), PAGE_SIZE, IommuProt::READ_WRITE)
            .unwrap();
        assert_eq!(
            dom.free_iova(base).unwrap_err(),
            Error::StillMapped { iova: base }
        );
        dom.unlink(base, 4 * PAGE_SIZE).unwrap();
        dom.free_iova(base).unwrap();
        assert_eq!(dom.nr_iova_allocations(), 0);
    }
}

#[test]
fn unlink_refuses_what_is_not_linked_in_a_live_allocation() {
    let mut dom = domain(DomainType::Dma);
    let base = dom.alloc_iova(4 * PAGE_SIZE).unwrap();
    assert_eq!(
        dom.unlink(base, PAGE_SIZE).unwrap_err().errno(),
        Errno::ENOENT
    );
    let outside = Iova::from_raw(base.raw() - PAGE_SIZE);
    assert!(matches!(
        dom.unlink(outside, PAGE_SIZE),
        Err(Error::NotAllocated { .. })
    ));
    assert!(matches!(
        dom.unlink(base.add(1), PAGE_SIZE),
        Err(Error::Unaligned { .. })
    ));
    assert!(matches!(
        domain(DomainType::Identity).unlink(base, PAGE_SIZE),
        Err(Error::IdentityDomain { .. })
    ));
}
