//! The coherent DMA mirror (mirror.rs fault steps 1–3 and invalidate steps 1–3; DESIGN.md §4.4): CPU-side
//! changes zap the device's entries, the next device access faults them back, P2P pages are mapped by map
//! type, and nothing is ever pinned.
#![expect(
    clippy::tests_outside_test_module,
    clippy::unwrap_used,
    reason = "an integration-test crate is all tests"
)]

mod common;

use common::*;
use peerdma_core::{Errno, PAGE_SIZE};
use peerdma_dma::{DmaAddr, DmaMirror, SegKind};
use peerdma_iommu::DomainType;
use peerdma_mm::{Advice, Prot};

#[test]
fn munmap_of_a_mirrored_page_zaps_its_entry_and_unmaps_its_iova() {
    let w = world(DomainType::Dma);
    let (faulted, after, mapped, invalidated) = w.run(|k, p| async move {
        let pid = k.create_process();
        let va = anon(&k, pid, 3, Prot::RW).await;
        let m = DmaMirror::register(&p, p.device(NIC).unwrap(), pid, range(va, 3)).unwrap();
        m.fault(range(va, 3), true).await.unwrap();
        let faulted = (
            m.nr_mapped(),
            p.device(NIC).unwrap().domain().mapped_pages(),
        );
        k.munmap(pid, va.add(PAGE_SIZE), PAGE_SIZE).await.unwrap();
        let after = m.nr_mapped();
        let mapped = p.device(NIC).unwrap().domain().mapped_pages();
        m.unregister().await;
        (
            faulted,
            after,
            mapped,
            k.sim.metrics().get("mirror.invalidated_pages"),
        )
    });
    assert_eq!(faulted, (3, 3));
    assert_eq!(after, 2);
    assert_eq!(mapped, 2, "the zapped entry's IOVA is unmapped too");
    assert_eq!(
        invalidated, 1,
        "the notifier zapped exactly the unmapped page"
    );
    assert_eq!(w.nic_mapped_pages(), 0);
}

#[test]
fn dontneed_zaps_the_entry_and_the_next_device_access_faults_it_back() {
    let w = world(DomainType::Dma);
    let (steps, data, faults) = w.run(|k, p| async move {
        let pid = k.create_process();
        let va = anon(&k, pid, 1, Prot::RW).await;
        let m = DmaMirror::register(&p, p.device(NIC).unwrap(), pid, range(va, 1)).unwrap();
        m.write_page(va, &page_of(0xee)).await.unwrap();
        let mut steps = vec![m.nr_mapped()];
        k.madvise(pid, va, PAGE_SIZE, Advice::DontNeed)
            .await
            .unwrap();
        steps.push(m.nr_mapped());
        let mut buf = page_of(0x11);
        m.read_page(va, &mut buf).await.unwrap();
        steps.push(m.nr_mapped());
        m.unregister().await;
        (steps, buf, k.sim.metrics().get("mirror.faults"))
    });
    assert_eq!(steps, [1, 0, 1]);
    assert_eq!(
        data,
        page_of(0),
        "DONTNEED dropped the anonymous page: the refault reads zeroes"
    );
    assert_eq!(faults, 2, "one fault per access without an entry");
}

#[test]
fn device_write_through_the_mirror_is_seen_by_the_cpu_and_vice_versa() {
    let w = world(DomainType::Dma);
    let (cpu_sees, dev_sees) = w.run(|k, p| async move {
        let pid = k.create_process();
        let va = anon(&k, pid, 2, Prot::RW).await;
        let m = DmaMirror::register(&p, p.device(NIC).unwrap(), pid, range(va, 2)).unwrap();
        m.write_page(va, &page_of(0x42)).await.unwrap();
        let mut b = [0u8; 3];
        k.load(pid, va.add(100), &mut b).await.unwrap();
        k.store(pid, va.add(PAGE_SIZE), b"cpu").await.unwrap();
        let mut buf = page_of(0);
        m.read_page(va.add(PAGE_SIZE), &mut buf).await.unwrap();
        m.unregister().await;
        (b, buf[..3].to_vec())
    });
    assert_eq!(cpu_sees, [0x42; 3]);
    assert_eq!(dev_sees, b"cpu");
}

#[test]
fn mirror_over_p2p_pages_uses_their_map_types() {
    let w = world(DomainType::Dma);
    let (nvme_segs, gpu_segs, acc, mapped) = w.run(|k, p| async move {
        let pid = k.create_process();
        let nic = p.device(NIC).unwrap();
        let mut out = Vec::new();
        for prov in [NVME, GPU, ACC] {
            let va = p
                .p2pmem_mmap(pid, prov, pages(2), Prot::RW, true, 0)
                .await
                .unwrap();
            let m = DmaMirror::register(&p, nic.clone(), pid, range(va, 2)).unwrap();
            out.push((m.fault(range(va, 2), false).await, m.segments(), m));
        }
        let mapped = nic.domain().mapped_pages();
        let [(r0, s0, m0), (r1, s1, m1), (r2, _, m2)] = <[_; 3]>::try_from(out).unwrap();
        r0.unwrap();
        r1.unwrap();
        for m in [m0, m1, m2] {
            m.unregister().await;
        }
        (s0, s1, r2, mapped)
    });
    assert_eq!(nvme_segs.len(), 1);
    assert_eq!(nvme_segs[0].kind, SegKind::P2pBusAddr);
    assert_eq!(nvme_segs[0].addr.raw(), NVME_BAR0 + 0x1000_0000);
    assert_eq!(nvme_segs[0].len, pages(2));
    assert!(
        gpu_segs
            .iter()
            .all(|s| s.kind == SegKind::P2pThruHostBridge && matches!(s.addr, DmaAddr::Iova(_)))
    );
    assert_eq!(gpu_segs.iter().map(|s| s.len).sum::<u64>(), pages(2));
    assert_eq!(acc, Err(Errno::EREMOTEIO));
    assert_eq!(mapped, 2, "only the host-bridge pages took IOVAs");
}

#[test]
fn mirror_never_pins_so_the_pages_can_migrate_and_be_freed() {
    let w = world(DomainType::Dma);
    let (any_pinned, entries_after_migrate, refs) = w.run(|k, p| async move {
        let pid = k.create_process();
        let va = anon(&k, pid, 2, Prot::RW).await;
        let m = DmaMirror::register(&p, p.device(NIC).unwrap(), pid, range(va, 2)).unwrap();
        m.fault(range(va, 2), true).await.unwrap();
        let frames = [frame_of(&k, pid, va), frame_of(&k, pid, va.add(PAGE_SIZE))];
        let any_pinned = frames.iter().any(|&f| pinned(&k, f));
        let refs: Vec<u32> = frames.iter().map(|&f| k.frame_info(f).refcount).collect();
        let r = add_devmem(&k, false, 4);
        assert_eq!(migrate_to_device(&k, pid, range(va, 2), r).await, 2);
        let entries = m.nr_mapped();
        m.unregister().await;
        (any_pinned, entries, refs)
    });
    assert!(!any_pinned);
    assert_eq!(refs, [1, 1], "the mapping holds the only reference");
    assert_eq!(
        entries_after_migrate, 0,
        "the migration's invalidation zapped both entries"
    );
}

/// Mirror fault steps 1–2 against a concurrent invalidation, over many schedules (exploration mode): a
/// device write through the mirror races a DONTNEED and a CPU store of the same page. Whatever the order,
/// the oracle sees no stale translation and no lost write, and the final bytes are the last writer's.
#[test]
#[expect(
    clippy::many_single_char_names,
    reason = "w, k, p, m, b, d: the harness names used in every test"
)]
fn mirror_fault_racing_an_invalidation_never_installs_a_stale_entry() {
    let mut outcomes = std::collections::BTreeSet::new();
    let mut retries = 0;
    for seed in 0..48 {
        let w = world_explore(DomainType::Dma, seed);
        let k = w.k.clone();
        let pid = k.create_process();
        let done: std::rc::Rc<std::cell::RefCell<Vec<&str>>> = std::rc::Rc::default();
        let setup = w.run(move |k, p| async move {
            let va = anon(&k, pid, 1, Prot::RW).await;
            let m = DmaMirror::register(&p, p.device(NIC).unwrap(), pid, range(va, 1)).unwrap();
            (va, std::rc::Rc::new(m))
        });
        let (va, m) = setup;
        {
            let (m, done) = (m.clone(), done.clone());
            w.sim.spawn("device", async move {
                m.write_page(va, &page_of(b'D')).await.unwrap();
                done.borrow_mut().push("D");
            });
        }
        {
            let (k, done) = (k.clone(), done.clone());
            w.sim.spawn("cpu", async move {
                k.madvise(pid, va, PAGE_SIZE, Advice::DontNeed)
                    .await
                    .unwrap();
                k.store(pid, va, b"C").await.unwrap();
                k.sim.trace("test.cpu_store", String::new);
                done.borrow_mut().push("C");
            });
        }
        assert_eq!(
            w.sim.run(),
            peerdma_sim::RunOutcome::Completed,
            "seed {seed}"
        );
        w.assert_no_violation();
        // The last writer is the last to reach memory: the CPU's store, or the device write's landing
        // (its issuer learns of it later, so `done` may list "D" after a store that followed the landing).
        let last = w
            .sim
            .take_trace()
            .iter()
            .rev()
            .find_map(|e| match e.kind {
                "test.cpu_store" => Some("C"),
                "dma.land"
                    if e.args
                        .iter()
                        .any(|(k, v)| *k == "op" && *v == peerdma_sim::TraceArg::from("write")) =>
                {
                    Some("D")
                }
                _ => None,
            })
            .unwrap();
        let (cpu, dev) = w.run(move |k, _p| async move {
            let mut b = [0u8; 1];
            k.load(pid, va, &mut b).await.unwrap();
            let mut d = page_of(0);
            m.read_page(va, &mut d).await.unwrap();
            m.unregister().await;
            (b[0], d[0])
        });
        assert_eq!(cpu, dev, "seed {seed}: the device and the CPU see one page");
        outcomes.insert((done.borrow().clone(), cpu));
        assert_eq!(
            cpu,
            last.as_bytes()[0],
            "seed {seed}: the last writer's byte"
        );
        retries += w.sim.metrics().get("mirror.retries");
    }
    assert!(outcomes.len() > 1, "the schedules differ: {outcomes:?}");
    assert!(retries > 0, "some schedule hit read_retry (fault step 2)");
}

/// fork write-protects the parent's private pages with an invalidation (copy_page_range's
/// `mmu_notifier_invalidate_range_start`), so a mirror's writable entry cannot keep writing into a page
/// the child now shares: the device's next write faults, breaks COW in the parent, and the child keeps its
/// bytes.
#[test]
fn fork_invalidates_the_mirror_so_device_writes_do_not_reach_the_child() {
    let w = world(DomainType::Dma);
    let (after_fork, parent, child) = w.run(|k, p| async move {
        let pid = k.create_process();
        let va = anon(&k, pid, 1, Prot::RW).await;
        k.store(pid, va, b"P").await.unwrap();
        let m = DmaMirror::register(&p, p.device(NIC).unwrap(), pid, range(va, 1)).unwrap();
        m.fault(range(va, 1), true).await.unwrap();
        let child = k.fork(pid).await.unwrap();
        let after_fork = m.nr_mapped();
        m.write_page(va, &page_of(b'D')).await.unwrap();
        let (mut a, mut b) = ([0u8; 1], [0u8; 1]);
        k.load(pid, va, &mut a).await.unwrap();
        k.load(child, va, &mut b).await.unwrap();
        m.unregister().await;
        (after_fork, a[0], b[0])
    });
    assert_eq!(after_fork, 0);
    assert_eq!(parent, b'D');
    assert_eq!(child, b'P');
}

#[test]
fn mirror_fault_outside_its_range_or_empty_is_einval() {
    let w = world(DomainType::Dma);
    let rows = w.run(|k, p| async move {
        let pid = k.create_process();
        let va = anon(&k, pid, 3, Prot::RW).await;
        let m = DmaMirror::register(&p, p.device(NIC).unwrap(), pid, range(va.add(PAGE_SIZE), 1))
            .unwrap();
        let rows = vec![
            m.fault(range(va, 1), false).await,
            m.fault(range(va, 2), false).await,
            m.fault(
                peerdma_core::Range::new(va.add(PAGE_SIZE), va.add(PAGE_SIZE)),
                false,
            )
            .await,
            m.fault(range(va.add(PAGE_SIZE), 1), false).await,
        ];
        m.unregister().await;
        rows
    });
    assert_eq!(
        rows,
        [
            Err(Errno::EINVAL),
            Err(Errno::EINVAL),
            Err(Errno::EINVAL),
            Ok(())
        ]
    );
}
