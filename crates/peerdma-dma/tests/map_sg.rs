//! `map_sg` / `unmap_sg` with per-segment P2P classification (map.rs steps 1–4; `spec/linux-p2p.md` §1.6),
//! and how the IOMMU domain behind the DMA API releases a mapping (strict vs flush queue).
#![expect(
    clippy::tests_outside_test_module,
    clippy::unwrap_used,
    reason = "an integration-test crate is all tests"
)]

mod common;

use common::*;
use peerdma_core::{Errno, Iova, PAGE_SIZE, Pa, SimDuration};
use peerdma_dma::{DmaAddr, DmaError, DmaSgFlags as S, SegKind, get_user_dma_sg};
use peerdma_iommu::DomainType;
use peerdma_mm::Prot;

/// Two RAM pages around one page of each reachable provider.
fn mixed(w: &World) -> Vec<Pa> {
    w.run(|k, _p| async move {
        let pid = k.create_process();
        let va = anon(&k, pid, 2, Prot::RW).await;
        let ram = [frame_of(&k, pid, va), frame_of(&k, pid, va.add(PAGE_SIZE))];
        vec![
            k.frame_pa(ram[0]),
            Pa::from_raw(NVME_BAR0 + PAGE_SIZE),
            Pa::from_raw(GPU_BAR0),
            k.frame_pa(ram[1]),
        ]
    })
}

#[test]
fn mixed_list_gets_per_segment_kinds_in_order() {
    for dt in [DomainType::Identity, DomainType::Dma] {
        let w = world(dt);
        let pas = mixed(&w);
        let sg = w.p.map_sg(NIC, &pas, true).unwrap();
        let kinds: Vec<SegKind> = sg.segments().iter().map(|s| s.kind).collect();
        assert_eq!(
            kinds,
            [
                SegKind::Ram,
                SegKind::P2pBusAddr,
                SegKind::P2pThruHostBridge,
                SegKind::Ram
            ],
            "{dt:?}"
        );
        assert_eq!(sg.nr_pages(), 4, "{dt:?}");
        assert_eq!(
            sg.page_addr(1),
            Some(DmaAddr::Bus(peerdma_core::BusAddr::from_raw(
                NVME_BAR0 + PAGE_SIZE + 0x1000_0000
            ))),
            "{dt:?}: bus address = phys + bus offset in any domain"
        );
    }
}

#[test]
fn dma_domain_maps_only_the_non_bus_pages_and_unmap_releases_them() {
    let w = world(DomainType::Dma);
    let pas = mixed(&w);
    let mut sg = w.p.map_sg(NIC, &pas, true).unwrap();
    let d = w.p.device(NIC).unwrap();
    assert_eq!(d.domain().mapped_pages(), 3, "RAM, host-bridge, RAM");
    assert_eq!(
        d.domain().nr_iova_allocations(),
        1,
        "one IOVA range for the list"
    );
    // The IOVA pages are consecutive in list order, skipping the bus-address page.
    let iova = |i| match sg.page_addr(i).unwrap() {
        DmaAddr::Iova(a) => a,
        DmaAddr::Bus(b) => panic!("page {i} is a bus address {b:?}"),
    };
    let base = iova(0);
    assert_eq!(iova(2), base.add(PAGE_SIZE));
    assert_eq!(iova(3), base.add(2 * PAGE_SIZE));
    let looked: Vec<_> = [0, 2, 3]
        .iter()
        .map(|&i| d.domain().lookup(iova(i)).map(|(pa, prot)| (pa, prot.mmio)))
        .collect();
    assert_eq!(
        looked,
        [
            Some((pas[0], false)),
            Some((pas[2], true)),
            Some((pas[3], false))
        ],
        "the host-bridge page carries the MMIO attribute"
    );
    w.p.unmap_sg(NIC, &mut sg).unwrap();
    assert_eq!(d.domain().mapped_pages(), 0);
    assert_eq!(
        d.domain().nr_iova_allocations(),
        0,
        "strict: the IOVA is freed now"
    );
    assert_eq!(d.domain().lookup(base), None);
    assert_eq!(sg.nr_pages(), 0);
}

#[test]
fn identity_domain_returns_physical_addresses() {
    let w = world(DomainType::Identity);
    let pas = mixed(&w);
    let sg = w.p.map_sg(NIC, &pas, false).unwrap();
    let addrs: Vec<u64> = (0..4).map(|i| sg.page_addr(i).unwrap().raw()).collect();
    assert_eq!(
        addrs,
        [
            pas[0].raw(),
            pas[1].raw() + 0x1000_0000,
            pas[2].raw(),
            pas[3].raw()
        ]
    );
    assert_eq!(
        w.nic_mapped_pages(),
        0,
        "nothing goes through an IO page table"
    );
}

#[test]
fn not_supported_anywhere_in_the_list_is_eremoteio_with_nothing_mapped() {
    for at in 0..3 {
        let w = world(DomainType::Dma);
        let mut pas = mixed(&w);
        pas.insert(at, Pa::from_raw(ACC_BAR0));
        assert_eq!(
            w.p.map_sg(NIC, &pas, true).map(|sg| sg.nr_pages()),
            Err(Errno::EREMOTEIO.into()),
            "unreachable page at {at}"
        );
        let d = w.p.device(NIC).unwrap();
        assert_eq!(d.domain().mapped_pages(), 0, "at {at}");
        assert_eq!(d.domain().nr_iova_allocations(), 0, "at {at}");
        assert_eq!(w.sim.metrics().get("dma.map_sg_eremoteio"), 1);
    }
}

#[test]
fn map_sg_for_an_unknown_device_is_a_typed_misuse_with_enodev() {
    let w = world(DomainType::Dma);
    let err =
        w.p.map_sg(peerdma_core::DeviceId(77), &[Pa::from_raw(0)], false)
            .unwrap_err();
    assert_eq!(err, DmaError::UnknownDevice(peerdma_core::DeviceId(77)));
    assert!(err.is_misuse());
    assert_eq!(err.errno(), Errno::ENODEV);
    assert_eq!(err.to_string(), "device 77 is not attached to the platform");
}

// ------------------------------------------------------------------------------ IOMMU through DMA

/// Maps one RAM page short-term, lets the device read it (filling the IOTLB), drops the handle; returns
/// the IOVA.
fn map_touch_release(w: &World) -> Iova {
    w.run(|k, p| async move {
        let pid = k.create_process();
        let va = anon(&k, pid, 1, Prot::RW).await;
        let h = get_user_dma_sg(&p, pid, range(va, 1), NIC, S::WRITE)
            .await
            .unwrap();
        h.read(0, 4096).await.unwrap();
        let iova = Iova::from_raw(h.segments()[0].addr.raw());
        drop(h);
        iova
    })
}

#[test]
fn strict_domain_drops_the_translation_when_the_handle_goes() {
    let w = world(DomainType::Dma);
    let iova = map_touch_release(&w);
    let d = w.p.device(NIC).unwrap();
    let dom = d.domain();
    assert_eq!(dom.lookup(iova), None);
    assert!(
        !dom.iotlb().contains(iova.page_number()),
        "IOTLB invalidated"
    );
    assert_eq!(dom.stats().range_invalidations, 1);
    assert_eq!(dom.stats().fq_queued, 0);
    assert_eq!(dom.nr_iova_allocations(), 0);
}

/// A device access after release is unreachable through the public API (the handle is consumed), so the
/// lazy domain is checked by its flush-queue state: the IOTLB entry stays until the 10 ms timer, which the
/// next use of the domain runs (map.rs *Coarse*).
#[test]
fn lazy_domain_queues_the_release_and_flushes_on_the_next_use_after_the_timeout() {
    let w = world(DomainType::DmaFq);
    let iova = map_touch_release(&w);
    let d = w.p.device(NIC).unwrap();
    {
        let dom = d.domain();
        assert_eq!(dom.lookup(iova), None, "the PTE goes at once");
        assert!(
            dom.iotlb().contains(iova.page_number()),
            "the IOTLB entry waits for the flush"
        );
        assert_eq!(dom.stats().fq_queued, 1);
        assert_eq!(dom.fq_len(), 1);
        assert_eq!(dom.nr_iova_allocations(), 1, "the IOVA is not reusable yet");
        assert_eq!(dom.stats().range_invalidations, 0);
    }
    // Before the timeout another map leaves the queue alone; after it, the next map flushes.
    let flushes = w.run(|k, p| async move {
        let pid = k.create_process();
        let va = anon(&k, pid, 1, Prot::RW).await;
        let f = frame_of(&k, pid, va);
        let pa = k.frame_pa(f);
        let d = p.device(NIC).unwrap();
        let mut out = Vec::new();
        for wait_ms in [1, 10] {
            k.sim.sleep(SimDuration::from_millis(wait_ms)).await;
            let mut sg = p.map_sg(NIC, &[pa], false).unwrap();
            out.push((d.domain().stats().fq_timeout_flushes, d.domain().fq_len()));
            p.unmap_sg(NIC, &mut sg).unwrap();
        }
        out
    });
    assert_eq!(flushes, [(0, 1), (1, 0)]);
    let dom = d.domain();
    assert!(!dom.iotlb().contains(iova.page_number()));
}

// ------------------------------------------------------------------------------------------ timing

/// One page written by the NIC into each target, with calibrated costs; returns the simulated time of each.
fn dma_times() -> [u64; 3] {
    let w = world_with(DomainType::Dma, 0, peerdma_dma::DmaCosts::calibrated());
    w.run(|k, p| async move {
        let pid = k.create_process();
        let p2p = p
            .p2pmem_mmap(pid, NVME, pages(1), Prot::RW, true, 0)
            .await
            .unwrap();
        let mmio = p.export_bar(NVME, 2, 0, pages(1), true).unwrap();
        let bar = p.mmap_bar(pid, mmio, 0, pages(1), Prot::RW).await.unwrap();
        let ram = anon(&k, pid, 1, Prot::RW).await;
        let mut out = [0; 3];
        for (i, (va, f)) in [(p2p, S::P2P), (bar, S::empty()), (ram, S::empty())]
            .into_iter()
            .enumerate()
        {
            let h = get_user_dma_sg(&p, pid, range(va, 1), NIC, f | S::WRITE)
                .await
                .unwrap();
            let t0 = k.sim.now();
            h.write(0, &page_of(1)).await.unwrap();
            out[i] = k.sim.now().0 - t0.0;
        }
        out
    })
}

/// The link time of a DMA into a BAR follows the owner–client path whether the BAR is P2P memory or an
/// exported BAR without struct page: both cross the NVMe's own (slowest) link.
#[test]
fn dma_into_an_exported_bar_takes_the_same_path_as_p2p_memory_of_that_device() {
    let [p2p, bar, ram] = dma_times();
    assert!(p2p > 0);
    assert_eq!(bar, p2p);
    assert_ne!(ram, p2p, "RAM goes up to the host bridge instead");
}

/// `export_bar` validation (dmabuf.rs; the VFIO dma-buf range checks): the BAR must exist and the range
/// must be page-aligned and fit; a zero length means the rest of the BAR.
#[test]
fn export_bar_checks_the_bar_and_the_range() {
    type Row = (u8, u64, u64, Result<(u64, u64), DmaError>);
    let no_bar_1 = DmaError::NoSuchBar {
        device: NVME,
        bar: 1,
    };
    let rows: &[Row] = &[
        (1, 0, 0, Err(no_bar_1)),                               // no BAR 1
        (2, 0, 0x10_1000, Err(DmaError::Errno(Errno::EINVAL))), // longer than the BAR
        (
            2,
            0xf_f000,
            2 * PAGE_SIZE,
            Err(DmaError::Errno(Errno::EINVAL)),
        ), // runs past its end
        (2, 8, PAGE_SIZE, Err(DmaError::Errno(Errno::EINVAL))), // unaligned offset
        (2, 0, 100, Err(DmaError::Errno(Errno::EINVAL))),       // unaligned length
        (2, 0xf_e000, 0, Ok((NVME_BAR2 + 0xf_e000, 2 * PAGE_SIZE))), // the rest of the BAR
        (
            2,
            PAGE_SIZE,
            PAGE_SIZE,
            Ok((NVME_BAR2 + PAGE_SIZE, PAGE_SIZE)),
        ),
    ];
    for &(bar, offset, len, want) in rows {
        let w = world(DomainType::Dma);
        let got =
            w.p.export_bar(NVME, bar, offset, len, true)
                .map(|m| w.p.export_range(m).unwrap())
                .map(|r| (r.start.raw(), r.len()));
        assert_eq!(got, want, "bar {bar} offset {offset:#x} len {len:#x}");
    }
}

#[test]
fn add_device_refuses_a_non_function_node_and_a_taken_id_or_node() {
    let w = world(DomainType::Dma);
    let topo = w.p.topology();
    let cfg = || peerdma_iommu::DomainConfig::with_type(DomainType::Identity);
    let sw = topo.lookup("hb0").unwrap();
    let nic = topo.lookup("nic").unwrap();
    let gpu = topo.lookup("gpu").unwrap();
    assert_eq!(
        w.p.add_device(peerdma_core::DeviceId(50), sw, "hb", cfg())
            .map(|_| ()),
        Err(DmaError::NotPciFunction(sw))
    );
    assert_eq!(
        w.p.add_device(NIC, gpu, "again", cfg()).map(|_| ()),
        Err(DmaError::AlreadyAttached { id: NIC, node: gpu })
    );
    let twin =
        w.p.add_device(peerdma_core::DeviceId(51), nic, "twin", cfg())
            .map(|_| ())
            .unwrap_err();
    assert_eq!(twin.errno(), Errno::EEXIST);
    assert_eq!(
        twin,
        DmaError::AlreadyAttached {
            id: peerdma_core::DeviceId(51),
            node: nic
        }
    );
}
