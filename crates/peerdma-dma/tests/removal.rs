//! Provider removal (platform.rs step 4; `spec/linux-p2p.md` §1.2 lifecycle rule, §6 revoke) and the
//! determinism of provider selection (`pci_p2pmem_find_many` ties broken by the seeded stream).
#![expect(
    clippy::tests_outside_test_module,
    clippy::unwrap_used,
    reason = "an integration-test crate is all tests"
)]

mod common;

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::rc::Rc;

use common::*;
use peerdma_core::{Bdf, DeviceId, Errno, PAGE_SIZE, Pa, SimDuration, Va};
use peerdma_dma::{
    DmaCosts, DmaSgFlags as S, DmaSgHandle, ImporterKind, Platform, get_user_dma_sg,
};
use peerdma_iommu::{DomainConfig, DomainType};
use peerdma_mm::{Kernel, MmCosts, Prot, SigInfo, Signal};
use peerdma_pci::topology::{Bar, TopologyBuilder, WhitelistEntry};
use peerdma_sim::{RunOutcome, Sim, SimConfig};

/// The acceptance case: a process maps the provider's p2pmem, a device has it DMA-mapped through a
/// short-term handle, and the provider is removed. Removal zaps the mapping at once (SIGBUS), revokes the
/// BAR export's importer, waits for the handle's pins, and only then frees the provider state; the pages
/// go back to the pool and the oracle sees no violation.
#[test]
#[expect(
    clippy::many_single_char_names,
    reason = "w, k, p, b: the harness names used in every test"
)]
fn remove_device_waits_for_the_dma_handle_and_zaps_the_process_mapping() {
    let w = world(DomainType::Dma);
    let (sim, k, p) = (w.sim.clone(), w.k.clone(), w.p.clone());
    let region = p.p2p_regions(NVME)[0];
    let pid = k.create_process();
    let log: Rc<RefCell<Vec<String>>> = Rc::default();
    let slot: Rc<RefCell<Option<DmaSgHandle>>> = Rc::default();
    let va_slot: Rc<RefCell<Option<Va>>> = Rc::default();
    let mmio = p.export_bar(NVME, 2, 0, pages(1), true).unwrap();
    let att = p
        .dmabuf_attach(
            mmio,
            NIC,
            ImporterKind::Dynamic,
            vec![Pa::from_raw(NVME_BAR2)],
            true,
        )
        .unwrap();
    {
        let (k, p, slot, va_slot, log) = (
            k.clone(),
            p.clone(),
            slot.clone(),
            va_slot.clone(),
            log.clone(),
        );
        sim.spawn("app", async move {
            let va = p
                .p2pmem_mmap(pid, NVME, pages(3), Prot::RW, true, 0)
                .await
                .unwrap();
            k.store(pid, va, b"cmb").await.unwrap();
            let h = get_user_dma_sg(&p, pid, range(va, 2), NIC, S::WRITE | S::P2P)
                .await
                .unwrap();
            h.write(PAGE_SIZE, &page_of(0xd0)).await.unwrap();
            let data = h.read(0, 4096).await.unwrap();
            log.borrow_mut()
                .push(format!("dma read {:?}", std::str::from_utf8(&data[..3])));
            *slot.borrow_mut() = Some(h);
            *va_slot.borrow_mut() = Some(va);
        });
    }
    {
        let (k, p, log) = (k.clone(), p.clone(), log.clone());
        sim.spawn("unbind", async move {
            k.sim.sleep(SimDuration::from_micros(10)).await;
            p.remove_device(NVME).await.unwrap();
            log.borrow_mut().push(format!(
                "removed at {} free {}",
                k.sim.now().0,
                k.p2p_memory_free_pages(region)
            ));
        });
    }
    {
        let (k, p, slot, va_slot, log) = (
            k.clone(),
            p.clone(),
            slot.clone(),
            va_slot.clone(),
            log.clone(),
        );
        sim.spawn("driver", async move {
            k.sim.sleep(SimDuration::from_micros(20)).await;
            let va = va_slot.borrow().unwrap();
            let mut b = [0u8; 1];
            let sig = k.load(pid, va, &mut b).await;
            log.borrow_mut().push(format!(
                "during: bus {} importer mapped {} free {}",
                matches!(sig, Err(SigInfo { signo: Signal::Bus, addr }) if addr == va),
                p.dmabuf_is_mapped(mmio, att),
                k.p2p_memory_free_pages(region)
            ));
            k.sim.sleep(SimDuration::from_micros(30)).await;
            let h = slot.borrow_mut().take().unwrap();
            h.release().await;
            log.borrow_mut()
                .push(format!("released at {}", k.sim.now().0));
        });
    }
    assert_eq!(sim.run(), RunOutcome::Completed);
    assert_eq!(
        *log.borrow(),
        [
            "dma read Ok(\"cmb\")".to_owned(),
            // The mapping is zapped (its 3 references gone) but the two pinned pages are still out.
            "during: bus true importer mapped false free 14".to_owned(),
            "released at 50000".to_owned(),
            "removed at 50000 free 16".to_owned(),
        ]
    );
    w.assert_no_violation();
    assert_eq!(w.nic_mapped_pages(), 0);
    let later = w.run(move |_k, p| async move {
        (
            p.p2pmem_mmap(pid, NVME, pages(1), Prot::RW, true, 0)
                .await
                .map(|_| ()),
            p.p2p_find_many(&[NIC]).unwrap(),
        )
    });
    assert_eq!(
        later.0,
        Err(Errno::ENODEV.into()),
        "the provider state is gone"
    );
    assert_ne!(later.1, Some(NVME), "a removed provider is never found");
    assert_eq!(w.sim.metrics().get("p2pdma.removals"), 1);
}

/// Removal with nothing holding the pages completes at once.
#[test]
fn remove_device_without_users_completes_without_waiting() {
    let w = world(DomainType::Dma);
    let t = w.run(|k, p| async move {
        let pid = k.create_process();
        let va = p
            .p2pmem_mmap(pid, GPU, pages(2), Prot::RW, true, 0)
            .await
            .unwrap();
        p.remove_device(GPU).await.unwrap();
        let mut b = [0u8; 1];
        (k.sim.now().0, k.load(pid, va, &mut b).await)
    });
    assert_eq!(t.0, 0);
    assert!(matches!(
        t.1,
        Err(SigInfo {
            signo: Signal::Bus,
            ..
        })
    ));
}

/// Three published providers under one switch with the client: all at distance 4.
fn tied_platform(seed: u64) -> (Sim, Rc<Platform>) {
    let sim = Sim::new(SimConfig {
        seed,
        ..SimConfig::default()
    });
    let k = Kernel::new(&sim, 16 << 20, MmCosts::zero());
    let mut b = TopologyBuilder::new();
    b.host_bridge("hb0", WhitelistEntry::NotListed);
    b.root_port("rp0", "hb0").bdf(Bdf::new(0, 1, 0).unwrap());
    b.switch_upstream("up", "rp0")
        .bdf(Bdf::new(1, 0, 0).unwrap());
    for i in 0..4u8 {
        b.switch_downstream(&format!("dn{i}"), "up")
            .bdf(Bdf::new(2, i, 0).unwrap());
        b.endpoint(
            &format!("ep{i}"),
            &format!("dn{i}"),
            Bdf::new(3 + i, 0, 0).unwrap(),
        )
        .bar(Bar {
            index: 0,
            size: 0x10_0000,
            phys: Pa::from_raw(0x1_0000_0000 + u64::from(i) * 0x10_0000),
            bus_offset: 0,
            prefetchable: true,
        });
    }
    let p = Platform::new(k, b.build().unwrap(), DmaCosts::zero());
    for i in 0..4u8 {
        let id = DeviceId(u32::from(i));
        let node = p.topology().lookup(&format!("ep{i}")).unwrap();
        p.add_device(
            id,
            node,
            &format!("ep{i}"),
            DomainConfig::with_type(DomainType::Identity),
        )
        .unwrap();
        if i < 3 {
            p.p2p_add_resource(id, 0, pages(4), 0).unwrap();
            p.p2p_publish(id, true).unwrap();
        }
    }
    (sim, p)
}

#[test]
fn find_many_breaks_ties_by_the_seed_and_only_by_it() {
    let client = DeviceId(3);
    let pick = |seed| {
        let (_sim, p) = tied_platform(seed);
        (0..4)
            .map(|_| p.p2p_find_many(&[client]).unwrap().unwrap())
            .collect::<Vec<_>>()
    };
    let mut distinct = BTreeSet::new();
    for seed in 0..16 {
        let a = pick(seed);
        assert_eq!(a, pick(seed), "seed {seed}: same seed, same picks");
        assert!(
            a.iter().all(|d| d.0 < 3),
            "seed {seed}: a published provider"
        );
        distinct.extend(a);
    }
    assert!(
        distinct.len() > 1,
        "the tie is really broken by the random stream: {distinct:?}"
    );
}

/// A mirror of the provider's p2pmem holds no pin: removal does not wait for it, the notifier zaps the
/// device's entries, and the device's next fault finds nothing to map (EFAULT), with no oracle violation.
#[test]
fn remove_device_zaps_a_mirror_of_its_p2p_memory_without_waiting() {
    let w = world(DomainType::Dma);
    let (at, entries, refault) = w.run(|k, p| async move {
        let pid = k.create_process();
        let va = p
            .p2pmem_mmap(pid, NVME, pages(2), Prot::RW, true, 0)
            .await
            .unwrap();
        let m = peerdma_dma::DmaMirror::register(&p, p.device(NIC).unwrap(), pid, range(va, 2))
            .unwrap();
        m.fault(range(va, 2), true).await.unwrap();
        p.remove_device(NVME).await.unwrap();
        let at = k.sim.now().0;
        let entries = m.nr_mapped();
        let refault = m.fault(range(va, 1), false).await;
        m.unregister().await;
        (at, entries, refault)
    });
    assert_eq!(at, 0, "no pin to wait for");
    assert_eq!(entries, 0);
    assert_eq!(refault, Err(Errno::EFAULT));
}

/// platform.rs step 3 (`spec/linux-p2p.md` §1.7): the allocate file's errnos through the platform, and a
/// provider with two resources serving from the second once the first is exhausted.
#[test]
fn p2pmem_mmap_tries_each_resource_in_order_and_keeps_the_allocate_file_errnos() {
    let w = world(DomainType::Dma);
    w.p.p2p_add_resource(GPU, 0, pages(4), 0x8_0000).unwrap();
    let rows = w.run(|k, p| async move {
        let pid = k.create_process();
        let pa_of = |k: &Kernel, va: Va| {
            let f = frame_of(k, pid, va);
            k.frame_pa(f).raw()
        };
        let first = p
            .p2pmem_mmap(pid, GPU, P2P_LEN, Prot::RW, true, 0)
            .await
            .map(|va| pa_of(&k, va));
        let second = p
            .p2pmem_mmap(pid, GPU, pages(4), Prot::RW, true, 0)
            .await
            .map(|va| pa_of(&k, va));
        let errs: Vec<_> = [
            p.p2pmem_mmap(pid, GPU, pages(1), Prot::RW, true, 0).await, // both pools empty
            p.p2pmem_mmap(pid, NVME, pages(17), Prot::RW, true, 0).await, // larger than the pool
            p.p2pmem_mmap(pid, NVME, pages(1), Prot::RW, false, 0).await, // private
            p.p2pmem_mmap(pid, NVME, pages(1), Prot::RW, true, 1).await, // offset
            p.p2pmem_mmap(pid, NIC, pages(1), Prot::RW, true, 0).await, // no P2P memory
            p.p2pmem_mmap(pid, DeviceId(99), pages(1), Prot::RW, true, 0)
                .await,
        ]
        .into_iter()
        .map(|r| r.map(|_| ()).map_err(|e| e.errno()))
        .collect();
        (first, second, errs)
    });
    assert_eq!(rows.0, Ok(GPU_BAR0));
    assert_eq!(rows.1, Ok(GPU_BAR0 + 0x8_0000), "the second resource");
    assert_eq!(
        rows.2,
        [
            Err(Errno::ENOMEM),
            Err(Errno::ENOMEM),
            Err(Errno::EINVAL),
            Err(Errno::EINVAL),
            Err(Errno::ENODEV),
            Err(Errno::ENODEV),
        ]
    );
}
