//! The platform: link timing of DMA through get_user_dma_sg (DESIGN.md §6: a transfer takes the bottleneck
//! link's effective bandwidth plus per-hop latency, and concurrent flows on one link divide its bandwidth),
//! and the in-kernel P2P orchestration API (`pci_p2pmem_find_many`, `pci_alloc_p2pmem`, removal).
#![expect(
    clippy::tests_outside_test_module,
    clippy::unwrap_used,
    reason = "an integration-test crate is all tests"
)]

use std::cell::Cell;
use std::rc::Rc;

use peerdma_core::{Bdf, DeviceId, Pa, Range, SimTime};
use peerdma_dma::{DmaCosts, DmaSgFlags, Platform, get_user_dma_sg};
use peerdma_iommu::DomainConfig;
use peerdma_mm::{Kernel, MmCosts, Prot};
use peerdma_pci::{Bar, LinkSpec, TopologyBuilder, WhitelistEntry};
use peerdma_sim::{RunOutcome, Sim, SimConfig};

const NVME: DeviceId = DeviceId(0);
const NIC0: DeviceId = DeviceId(1);
const NIC1: DeviceId = DeviceId(2);
const LEN: u64 = 64 << 10;

/// nvme0 (Gen3 x4, the narrowest link) and two NICs (Gen4 x16) under one switch.
fn platform(sim: &Sim) -> Rc<Platform> {
    let kernel = Kernel::new(sim, 64 << 20, MmCosts::zero());
    let mut b = TopologyBuilder::new();
    b.host_bridge("hb0", WhitelistEntry::NotListed);
    b.root_port("rp0", "hb0").bdf(Bdf::new(0, 1, 0).unwrap());
    b.switch_upstream("up", "rp0")
        .bdf(Bdf::new(1, 0, 0).unwrap())
        .link(LinkSpec::new(4, 16));
    for (i, n) in ["d0", "d1", "d2"].iter().enumerate() {
        b.switch_downstream(n, "up")
            .bdf(Bdf::new(2, u8::try_from(i).unwrap(), 0).unwrap());
    }
    b.endpoint("nvme0", "d0", Bdf::new(3, 0, 0).unwrap())
        .link(LinkSpec::new(3, 4))
        .bar(Bar {
            index: 2,
            size: 1 << 28,
            phys: Pa::from_raw(0x3800_0000_0000),
            bus_offset: 0,
            prefetchable: true,
        });
    b.endpoint("nic0", "d1", Bdf::new(4, 0, 0).unwrap())
        .link(LinkSpec::new(4, 16));
    b.endpoint("nic1", "d2", Bdf::new(5, 0, 0).unwrap())
        .link(LinkSpec::new(4, 16));
    let topo = b.build().unwrap();
    let p = Platform::new(kernel, topo.clone(), DmaCosts::calibrated());
    for (id, name) in [(NVME, "nvme0"), (NIC0, "nic0"), (NIC1, "nic1")] {
        p.add_device(
            id,
            topo.lookup(name).unwrap(),
            name,
            DomainConfig::default(),
        )
        .unwrap();
    }
    p.p2p_add_resource(NVME, 2, 1 << 20, 0).unwrap();
    p
}

/// Returns how long each NIC's read of the whole CMB mapping took, the NICs starting together when
/// `concurrent`, one after the other otherwise.
fn read_times(concurrent: bool) -> (u64, u64) {
    let sim = Sim::new(SimConfig::default());
    let p = platform(&sim);
    let times = Rc::new([Cell::new(0u64), Cell::new(0u64)]);
    let (p2, t2, s2) = (p.clone(), times.clone(), sim.clone());
    sim.spawn("test", async move {
        let k = p2.kernel.clone();
        let pid = k.create_process();
        let rw = Prot {
            read: true,
            write: true,
            exec: false,
        };
        let va = p2.p2pmem_mmap(pid, NVME, LEN, rw, true, 0).await.unwrap();
        let range = Range::from_len(va, LEN).unwrap();
        let mut handles = Vec::new();
        for nic in [NIC0, NIC1] {
            handles.push(
                get_user_dma_sg(&p2, pid, range, nic, DmaSgFlags::P2P)
                    .await
                    .unwrap(),
            );
        }
        let len = usize::try_from(LEN).unwrap();
        for (i, h) in handles.into_iter().enumerate() {
            let (t3, s3) = (t2.clone(), s2.clone());
            let read = async move {
                let start = s3.now();
                h.read(0, len).await.unwrap();
                t3[i].set(s3.now().0 - start.0);
            };
            if concurrent {
                s2.spawn(format!("nic{i}"), read);
            } else {
                read.await;
            }
        }
    });
    assert_eq!(sim.run(), RunOutcome::Completed);
    assert!(sim.now() > SimTime(0));
    (times[0].get(), times[1].get())
}

#[test]
fn a_transfer_alone_takes_the_bottleneck_links_time() {
    let (a, b) = read_times(false);
    assert_eq!(a, b, "the two NICs have the same path to the CMB");
    // 16 pages over nvme0's Gen3 x4 link: 4 KiB reads at its effective read bandwidth, plus two hops.
    let gen3x4 = peerdma_pci::LinkConfig::from_spec(&LinkSpec::new(3, 4)).unwrap();
    let page = peerdma_pci::link::time_at_gbps(4096, gen3x4.effective_read_gbps(4096)).as_nanos();
    assert!(a >= 16 * page, "{a} ns < 16 x {page} ns");
    assert!(
        a < 16 * page + 16 * 1000,
        "{a} ns: far more than the link time"
    );
}

#[test]
fn concurrent_flows_divide_a_shared_link() {
    let (alone, _) = read_times(false);
    let (a, b) = read_times(true);
    // Both flows cross nvme0's upstream link: each gets a share, so each takes markedly longer than alone
    // (the first page of the first flow starts at full rate; every later page is shared).
    assert!(
        a.min(b) * 10 > alone * 15,
        "alone {alone} ns, together {a} / {b} ns"
    );
    assert!(
        a.max(b) <= alone * 2 + 2000,
        "alone {alone} ns, together {a} / {b} ns"
    );
}

#[test]
fn an_in_kernel_p2pmem_allocation_blocks_removal_until_freed() {
    let sim = Sim::new(SimConfig::default());
    let p = platform(&sim);
    let done_at = Rc::new(Cell::new(None));
    let (p2, d2, s2) = (p.clone(), done_at.clone(), sim.clone());
    sim.spawn("orchestrator", async move {
        // pci_p2pmem_find_many for the two NICs, then pci_alloc_p2pmem from the provider it found.
        assert_eq!(
            p2.p2p_find_many(&[NIC0, NIC1]).unwrap(),
            None,
            "not published yet"
        );
        p2.p2p_publish(NVME, true).unwrap();
        assert_eq!(p2.p2p_find_many(&[NIC0, NIC1]).unwrap(), Some(NVME));
        let a = p2.p2pmem_alloc(NVME, 8192).unwrap();
        assert_eq!(a.start, Pa::from_raw(0x3800_0000_0000));
        assert_eq!(a.len(), 8192);
        assert_eq!(
            p2.p2pmem_virt_to_bus(a.start)
                .map(peerdma_core::BusAddr::raw),
            Some(0x3800_0000_0000)
        );
        assert_eq!(
            p2.p2pmem_alloc(NVME, 2 << 20),
            Err(peerdma_core::Errno::ENOMEM.into())
        );
        let (p3, s3) = (p2.clone(), s2.clone());
        s2.spawn("driver", async move {
            s3.sleep(peerdma_core::SimDuration::from_nanos(5_000)).await;
            p3.p2pmem_free(a);
        });
        p2.remove_device(NVME).await.unwrap();
        d2.set(Some(s2.now()));
        assert_eq!(
            p2.p2pmem_alloc(NVME, 4096),
            Err(peerdma_core::Errno::ENODEV.into())
        );
        assert_eq!(p2.p2p_find_many(&[NIC0]).unwrap(), None);
    });
    assert_eq!(sim.run(), RunOutcome::Completed);
    assert_eq!(
        done_at.get(),
        Some(SimTime(5_000)),
        "removal waited for the free"
    );
    assert!(p.kernel.oracle_violations().is_empty());
}

/// Returns the simulated time of 8 rounds of get_user_dma_sg + release of 16 RAM pages for a NIC whose
/// domain is `domain_type`.
fn map_release_time(domain_type: peerdma_iommu::DomainType) -> u64 {
    let sim = Sim::new(SimConfig::default());
    let kernel = Kernel::new(&sim, 64 << 20, MmCosts::zero());
    let mut b = TopologyBuilder::new();
    b.host_bridge("hb0", WhitelistEntry::NotListed);
    b.root_port("rp0", "hb0").bdf(Bdf::new(0, 1, 0).unwrap());
    b.endpoint("nic0", "rp0", Bdf::new(1, 0, 0).unwrap());
    let topo = b.build().unwrap();
    let p = Platform::new(kernel, topo.clone(), DmaCosts::calibrated());
    p.add_device(
        NIC0,
        topo.lookup("nic0").unwrap(),
        "nic0",
        DomainConfig::with_type(domain_type),
    )
    .unwrap();
    let p2 = p.clone();
    sim.spawn("test", async move {
        let k = p2.kernel.clone();
        let pid = k.create_process();
        let args = peerdma_mm::MmapArgs {
            len: 16 << 12,
            prot: Prot::RW,
            private: true,
            anonymous: true,
            populate: true,
            ..peerdma_mm::MmapArgs::default()
        };
        let va = k.mmap(pid, &args).await.unwrap();
        let range = Range::from_len(va, 16 << 12).unwrap();
        for _ in 0..8 {
            let h = get_user_dma_sg(&p2, pid, range, NIC0, DmaSgFlags::WRITE)
                .await
                .unwrap();
            h.release().await;
        }
    });
    assert_eq!(sim.run(), RunOutcome::Completed);
    sim.now().0
}

/// spec/numbers.md §2: a strict domain pays an IOTLB invalidation at every unmap; the flush queue defers
/// them (no flush within 8 unmaps of a 256-entry queue), so the same work takes less CPU time.
#[test]
fn strict_unmaps_pay_an_invalidation_each_and_lazy_ones_defer_it() {
    let strict = map_release_time(peerdma_iommu::DomainType::Dma);
    let lazy = map_release_time(peerdma_iommu::DomainType::DmaFq);
    let inv = peerdma_iommu::IommuCosts::calibrated()
        .invalidate
        .as_nanos();
    assert_eq!(strict - lazy, 8 * inv, "strict {strict} ns, lazy {lazy} ns");
}
