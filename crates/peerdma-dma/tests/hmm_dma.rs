//! Range-at-a-time DMA mapping of a mirror (`crate::hmm_dma`; mm/hmm.c `hmm_dma_map_*` over dma-iommu.c
//! `dma_iova_try_alloc` / `dma_iova_link` / `dma_iova_unlink` / `dma_iova_free`): one IOVA reservation per
//! registered range, page `i` at `base + i * PAGE_SIZE`, invalidations unlink with a sync per page and keep
//! the reservation, unregistration frees it, and a device without one maps page by page.
#![expect(
    clippy::tests_outside_test_module,
    clippy::unwrap_used,
    reason = "an integration-test crate is all tests"
)]

mod common;

use common::*;
use peerdma_core::{Errno, Iova, PAGE_SIZE, Range};
use peerdma_dma::{DmaCosts, DmaMirror};
use peerdma_iommu::{DomainConfig, DomainType};
use peerdma_mm::{Advice, Prot};

#[test]
fn registration_reserves_the_whole_range_and_page_i_is_linked_at_base_plus_i_pages() {
    let w = world(DomainType::Dma);
    let (res, allocs, addrs, linked) = w.run(|k, p| async move {
        let pid = k.create_process();
        let va = anon(&k, pid, 8, Prot::RW).await;
        let m = DmaMirror::register(&p, p.device(NIC).unwrap(), pid, range(va, 8)).unwrap();
        let res = m.iova_reservation();
        let before = p.device(NIC).unwrap().domain().nr_iova_allocations();
        // Out of order, one page at a time: the addresses follow the page index, not the fault order.
        for i in [5, 0, 7, 2] {
            m.fault(range(va.add(i * PAGE_SIZE), 1), false)
                .await
                .unwrap();
        }
        let after = p.device(NIC).unwrap().domain().nr_iova_allocations();
        let addrs: Vec<u64> = m.segments().iter().map(|s| s.addr.raw()).collect();
        m.unregister().await;
        (
            res,
            (before, after),
            addrs,
            k.sim.metrics().get("dma.iova_linked_pages"),
        )
    });
    let (base, len) = res.unwrap();
    assert_eq!(len, pages(8));
    assert_eq!(allocs, (1, 1), "one IOVA allocation, made at registration");
    let b = base.raw();
    assert_eq!(
        addrs,
        [b, b + pages(2), b + pages(5), b + pages(7)],
        "page i at base + i pages"
    );
    assert_eq!(linked, 4);
}

#[test]
fn invalidation_unlinks_each_page_with_its_own_iotlb_sync_and_keeps_the_reservation() {
    for ty in [DomainType::Dma, DomainType::DmaFq] {
        let w = world_nic(DomainConfig::with_type(ty), DmaCosts::calibrated());
        let (first, again, syncs, spent, fq, allocs) = w.run(|k, p| async move {
            let pid = k.create_process();
            let va = anon(&k, pid, 4, Prot::RW).await;
            let nic = p.device(NIC).unwrap();
            let m = DmaMirror::register(&p, nic.clone(), pid, range(va, 4)).unwrap();
            m.fault(range(va, 4), true).await.unwrap();
            let first = m.segments()[0].addr;
            let syncs0 = nic.domain().stats().range_invalidations;
            let t0 = k.sim.now();
            k.madvise(pid, va, pages(4), Advice::DontNeed)
                .await
                .unwrap();
            let spent = k.sim.now() - t0;
            let syncs = nic.domain().stats().range_invalidations - syncs0;
            let fq = (nic.domain().fq_len(), nic.domain().stats().fq_queued);
            let allocs = nic.domain().nr_iova_allocations();
            m.fault(range(va, 1), false).await.unwrap();
            let again = m.segments()[0].addr;
            m.unregister().await;
            (first, again, syncs, spent, fq, allocs)
        });
        assert_eq!(syncs, 4, "{ty:?}: dma_iova_unlink syncs each page");
        assert_eq!(fq, (0, 0), "{ty:?}: nothing went through the flush queue");
        assert_eq!(allocs, 1, "{ty:?}: the reservation outlives the unlinks");
        assert_eq!(again, first, "{ty:?}: the refault links at the same IOVA");
        let c = DmaCosts::calibrated().iommu;
        assert_eq!(
            spent,
            (c.pte_update + c.invalidate).saturating_mul(4),
            "{ty:?}: a PTE clear and an IOTLB invalidation per page (the CPU side costs nothing here)"
        );
    }
}

#[test]
fn unregister_frees_the_reservation() {
    let w = world(DomainType::Dma);
    let (during, after, res_after) = w.run(|k, p| async move {
        let pid = k.create_process();
        let va = anon(&k, pid, 3, Prot::RW).await;
        let nic = p.device(NIC).unwrap();
        let m = DmaMirror::register(&p, nic.clone(), pid, range(va, 3)).unwrap();
        m.fault(range(va, 3), true).await.unwrap();
        let during = (
            nic.domain().nr_iova_allocations(),
            nic.domain().mapped_pages(),
        );
        m.unregister().await;
        let after = (
            nic.domain().nr_iova_allocations(),
            nic.domain().mapped_pages(),
        );
        (during, after, m.iova_reservation())
    });
    assert_eq!(during, (1, 3));
    assert_eq!(after, (0, 0));
    assert_eq!(res_after, None);
}

#[test]
fn a_write_fault_of_a_mapped_page_keeps_its_mapping() {
    let w = world(DomainType::Dma);
    let (before, after, linked, data) = w.run(|k, p| async move {
        let pid = k.create_process();
        let va = anon(&k, pid, 1, Prot::RW).await;
        let m = DmaMirror::register(&p, p.device(NIC).unwrap(), pid, range(va, 1)).unwrap();
        m.fault(range(va, 1), false).await.unwrap();
        let before = m.segments();
        m.write_page(va, &page_of(0x5c)).await.unwrap();
        let after = m.segments();
        let mut b = [0u8; 2];
        k.load(pid, va, &mut b).await.unwrap();
        m.unregister().await;
        (
            before,
            after,
            k.sim.metrics().get("dma.iova_linked_pages"),
            b,
        )
    });
    assert_eq!(before, after);
    assert_eq!(
        linked, 1,
        "hmm_dma_map_pfn does not link a DMA-mapped pfn again"
    );
    assert_eq!(data, [0x5c; 2]);
}

#[test]
fn without_a_translating_domain_the_mirror_maps_physical_addresses() {
    let w = world(DomainType::Identity);
    let (res, addr, pa, data) = w.run(|k, p| async move {
        let pid = k.create_process();
        let va = anon(&k, pid, 2, Prot::RW).await;
        let m = DmaMirror::register(&p, p.device(NIC).unwrap(), pid, range(va, 2)).unwrap();
        m.write_page(va.add(PAGE_SIZE), &page_of(0x21))
            .await
            .unwrap();
        let addr = m.segments()[0].addr.raw();
        let pa = k.frame_pa(frame_of(&k, pid, va.add(PAGE_SIZE))).raw();
        k.madvise(pid, va, pages(2), Advice::DontNeed)
            .await
            .unwrap();
        let mut buf = page_of(1);
        m.read_page(va.add(PAGE_SIZE), &mut buf).await.unwrap();
        m.unregister().await;
        (m.iova_reservation(), addr, pa, buf)
    });
    assert_eq!(res, None);
    assert_eq!(
        addr, pa,
        "an identity domain's DMA address is the physical one"
    );
    assert_eq!(
        data,
        page_of(0),
        "DONTNEED dropped the page; the refault reads zeroes"
    );
}

#[test]
fn a_range_the_iova_space_cannot_hold_falls_back_to_per_page_mapping() {
    // 16 pages of IOVA space; the mirror covers 32.
    let aperture = Range::new(Iova::from_raw(PAGE_SIZE), Iova::from_raw(17 * PAGE_SIZE));
    let cfg = DomainConfig {
        aperture,
        ..DomainConfig::with_type(DomainType::Dma)
    };
    let w = world_nic(cfg, DmaCosts::zero());
    let (res, fallbacks, faulted, allocs, too_many, after) = w.run(|k, p| async move {
        let pid = k.create_process();
        let va = anon(&k, pid, 32, Prot::RW).await;
        let nic = p.device(NIC).unwrap();
        let m = DmaMirror::register(&p, nic.clone(), pid, range(va, 32)).unwrap();
        let fallbacks = k.sim.metrics().get("dma.iova_reservation_fallbacks");
        m.fault(range(va, 4), true).await.unwrap();
        let faulted = m.nr_mapped();
        let allocs = nic.domain().nr_iova_allocations();
        // 12 more pages fit; the 17th mapped page finds the space full.
        let too_many = m.fault(range(va.add(pages(4)), 13), true).await;
        k.madvise(pid, va, pages(32), Advice::DontNeed)
            .await
            .unwrap();
        let after = nic.domain().nr_iova_allocations();
        m.unregister().await;
        (
            m.iova_reservation(),
            fallbacks,
            faulted,
            allocs,
            too_many,
            after,
        )
    });
    assert_eq!(res, None, "dma_iova_try_alloc failed: no reservation");
    assert_eq!(fallbacks, 1, "registration went on without one");
    assert_eq!(faulted, 4);
    assert_eq!(allocs, 4, "one IOVA allocation per mapped page");
    assert_eq!(too_many, Err(Errno::ENOMEM));
    assert_eq!(after, 0, "a strict unmap frees each page's IOVA");
}
