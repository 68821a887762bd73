//! dma-buf BAR exports and their importers (dmabuf.rs rules 1–4; `spec/linux-p2p.md` §6).
#![expect(
    clippy::tests_outside_test_module,
    clippy::unwrap_used,
    reason = "an integration-test crate is all tests"
)]

mod common;

use common::*;
use peerdma_core::{Errno, PAGE_SIZE, Pa};
use peerdma_dma::{DmaSgFlags as S, ImporterKind, SegKind, get_user_dma_sg};
use peerdma_iommu::DomainType;
use peerdma_mm::{Prot, SigInfo, Signal};

fn bar2_pages(base: u64, n: u64) -> Vec<Pa> {
    (0..n).map(|i| Pa::from_raw(base + i * PAGE_SIZE)).collect()
}

/// Rule 2: `move_notify` unmaps dynamic importers only and says how many it notified.
#[test]
fn move_notify_unmaps_dynamic_importers_and_leaves_pinned_ones() {
    let w = world(DomainType::Dma);
    let mmio = w.p.export_bar(GPU, 2, 0, pages(2), true).unwrap();
    let pas = bar2_pages(GPU_BAR2, 2);
    let dynamic =
        w.p.dmabuf_attach(mmio, NIC, ImporterKind::Dynamic, pas.clone(), true)
            .unwrap();
    let pinned =
        w.p.dmabuf_attach(mmio, NVME, ImporterKind::Pinned, pas, true)
            .unwrap();
    assert_eq!(
        w.nic_mapped_pages(),
        2,
        "host-bridge path: IOVAs in the NIC's domain"
    );
    assert_eq!(w.p.dmabuf_move_notify(mmio), 1);
    assert!(!w.p.dmabuf_is_mapped(mmio, dynamic));
    assert!(w.p.dmabuf_is_mapped(mmio, pinned));
    assert_eq!(
        w.nic_mapped_pages(),
        0,
        "the dynamic importer's IOVAs are gone"
    );
    assert_eq!(w.sim.metrics().get("dmabuf.move_notify"), 1);
}

/// Rule 2: a dynamic importer (a revocable export through `get_user_dma_sg`) maps again on its next access.
#[test]
fn dynamic_importer_remaps_on_next_access_after_move_notify() {
    let w = world(DomainType::Dma);
    let (before, during, after, data, remaps, mapped) = w.run(|k, p| async move {
        let pid = k.create_process();
        let mmio = p.export_bar(GPU, 2, 0, pages(2), true).unwrap();
        let va = p.mmap_bar(pid, mmio, 0, pages(2), Prot::RW).await.unwrap();
        k.store(pid, va.add(PAGE_SIZE), b"bar bytes").await.unwrap();
        let h = get_user_dma_sg(&p, pid, range(va, 2), NIC, S::WRITE)
            .await
            .unwrap();
        let before = h.segments();
        assert_eq!(p.dmabuf_move_notify(mmio), 1);
        let during = h.segments();
        let data = h.read(PAGE_SIZE, 4096).await.unwrap();
        let after = h.segments();
        let mapped = p.device(NIC).unwrap().domain().mapped_pages();
        (
            before,
            during,
            after,
            data,
            k.sim.metrics().get("dmabuf.remap"),
            mapped,
        )
    });
    assert_eq!(before.len(), 1);
    assert_eq!(before[0].kind, SegKind::P2pThruHostBridge);
    assert_eq!(before[0].len, pages(2));
    assert!(during.is_empty(), "move_notify took the mapping");
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].kind, SegKind::P2pThruHostBridge);
    assert_eq!(&data[..9], b"bar bytes");
    assert_eq!(remaps, 1);
    assert_eq!(mapped, 2);
}

/// Rule 2, pinned importer: a non-revocable export is attached pinned and never loses its mapping.
#[test]
fn pinned_importer_never_sees_move_notify() {
    let w = world(DomainType::Dma);
    let (notified, segs_before, segs_after, remaps) = w.run(|k, p| async move {
        let pid = k.create_process();
        let mmio = p.export_bar(GPU, 2, 0, pages(2), false).unwrap();
        let va = p.mmap_bar(pid, mmio, 0, pages(2), Prot::RW).await.unwrap();
        let h = get_user_dma_sg(&p, pid, range(va, 2), NIC, S::WRITE)
            .await
            .unwrap();
        let before = h.segments();
        let n = p.dmabuf_move_notify(mmio);
        h.write(0, &page_of(9)).await.unwrap();
        let mapped = p.device(NIC).unwrap().domain().mapped_pages();
        (
            n,
            before,
            h.segments(),
            (k.sim.metrics().get("dmabuf.remap"), mapped),
        )
    });
    assert_eq!(notified, 0);
    assert_eq!(segs_after, segs_before);
    assert_eq!(remaps, (0, 2), "no remap, the IOVAs stayed");
}

/// Rule 1: an importer that cannot reach the exporter is refused with EREMOTEIO.
#[test]
fn attach_from_an_unreachable_importer_is_eremoteio() {
    let w = world(DomainType::Dma);
    let mmio = w.p.export_bar(NVME, 2, 0, pages(1), true).unwrap();
    assert_eq!(
        w.p.dmabuf_attach(
            mmio,
            ACC,
            ImporterKind::Dynamic,
            bar2_pages(NVME_BAR2, 1),
            false
        ),
        Err(Errno::EREMOTEIO.into())
    );
    assert_eq!(
        w.p.dmabuf_attach(
            mmio,
            NIC,
            ImporterKind::Dynamic,
            bar2_pages(NVME_BAR2 + PAGE_SIZE, 1),
            false
        ),
        Err(Errno::EINVAL.into()),
        "a page outside the export"
    );
}

/// Rule 3: after the owner's removal every importer is unmapped, attach and access get ENODEV, the user
/// mapping is zapped (SIGBUS), and nothing reached the BAR (no oracle violation).
#[test]
fn removing_the_owner_revokes_importers_and_zaps_the_user_mapping() {
    let w = world(DomainType::Dma);
    let (mapped_after, attach, access, cpu, revoked) = w.run(|k, p| async move {
        let pid = k.create_process();
        let mmio = p.export_bar(GPU, 2, 0, pages(2), true).unwrap();
        let va = p.mmap_bar(pid, mmio, 0, pages(2), Prot::RW).await.unwrap();
        let h = get_user_dma_sg(&p, pid, range(va, 2), NIC, S::WRITE)
            .await
            .unwrap();
        let direct = p
            .dmabuf_attach(
                mmio,
                NVME,
                ImporterKind::Pinned,
                bar2_pages(GPU_BAR2, 1),
                false,
            )
            .unwrap();
        p.remove_device(GPU).await.unwrap();
        let mapped_after = (
            p.dmabuf_is_mapped(mmio, direct),
            h.segments().len(),
            p.device(NIC).unwrap().domain().mapped_pages(),
        );
        let attach = p
            .dmabuf_attach(
                mmio,
                NIC,
                ImporterKind::Dynamic,
                bar2_pages(GPU_BAR2, 1),
                false,
            )
            .map(|_| ());
        let access = h.read(0, 4096).await.map(|_| ());
        let mut b = [0u8; 1];
        let cpu = k.load(pid, va, &mut b).await;
        drop(h);
        (
            mapped_after,
            attach,
            access,
            cpu,
            k.sim.metrics().get("dmabuf.revoked_importers"),
        )
    });
    assert_eq!(mapped_after, (false, 0, 0));
    assert_eq!(attach, Err(Errno::ENODEV.into()));
    assert_eq!(access, Err(Errno::ENODEV.into()));
    assert!(
        matches!(
            cpu,
            Err(SigInfo {
                signo: Signal::Bus,
                ..
            })
        ),
        "{cpu:?}"
    );
    assert_eq!(revoked, 2, "the dynamic and the pinned importer");
}

/// Rule 1 with an exporter that has no P2P provider state (the "naked `p2pdma_provider`" of
/// `spec/linux-p2p.md` §1.8 (a)): the importer's bus-address DMA is the access its map type allows, so it
/// reaches the BAR with no routing violation.
#[test]
fn bus_address_dma_into_an_export_of_a_device_without_p2p_memory_is_routed() {
    let w = world(DomainType::Dma);
    let (segs, dma, cpu) = w.run(|k, p| async move {
        let pid = k.create_process();
        // The NIC's BAR0: exported, never added as P2P memory. NVMe (same switch) DMAs into it.
        let mmio = p.export_bar(NIC, 0, 0, pages(1), true).unwrap();
        let va = p.mmap_bar(pid, mmio, 0, pages(1), Prot::RW).await.unwrap();
        let h = get_user_dma_sg(&p, pid, range(va, 1), NVME, S::WRITE)
            .await
            .unwrap();
        let dma = h.write(0, &page_of(0x3c)).await;
        let mut b = [0u8; 2];
        k.load(pid, va, &mut b).await.unwrap();
        (h.segments(), dma, b)
    });
    assert_eq!(segs.len(), 1);
    assert_eq!(segs[0].kind, SegKind::P2pBusAddr);
    assert_eq!(segs[0].addr.raw(), 0x1_0200_0000, "bus offset 0");
    assert_eq!(dma, Ok(()));
    assert_eq!(cpu, [0x3c; 2]);
}

/// Rule 3 of sg.rs for a BAR piece: dropping the handle detaches the importer and unmaps its IOVAs.
#[test]
fn dropping_the_handle_detaches_the_bar_importer() {
    let w = world(DomainType::Dma);
    let (held, after) = w.run(|k, p| async move {
        let pid = k.create_process();
        let mmio = p.export_bar(GPU, 2, 0, pages(2), true).unwrap();
        let va = p.mmap_bar(pid, mmio, 0, pages(2), Prot::RW).await.unwrap();
        let h = get_user_dma_sg(&p, pid, range(va, 2), NIC, S::WRITE)
            .await
            .unwrap();
        let held = p.device(NIC).unwrap().domain().mapped_pages();
        drop(h);
        let after = p.device(NIC).unwrap().domain().mapped_pages();
        // Nothing is left to notify.
        (held, (after, p.dmabuf_move_notify(mmio)))
    });
    assert_eq!(held, 2);
    assert_eq!(after, (0, 0));
}
