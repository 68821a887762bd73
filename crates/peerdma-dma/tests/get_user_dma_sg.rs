//! `get_user_dma_sg`: one test per row × column of the DESIGN.md §4.6 table (the sg.rs module table), and
//! the module's rules 1–3.
#![expect(
    clippy::tests_outside_test_module,
    clippy::unwrap_used,
    reason = "an integration-test crate is all tests"
)]

mod common;

use common::*;
use peerdma_core::{Errno, PAGE_SIZE, Va};
use peerdma_dma::{DmaAddr, DmaError, DmaSgFlags as S, SegKind, get_user_dma_sg};
use peerdma_iommu::DomainType;
use peerdma_mm::{MemoryKind, MmapArgs, Prot};

const SHORT: S = S::WRITE;
const LONG: S = S::WRITE.union(S::LONGTERM);

/// The RAM backings of the first row.
#[derive(Clone, Copy, Debug)]
enum Ram {
    Anon,
    Shmem,
    File,
}

async fn map_ram(k: &peerdma_mm::Kernel, pid: peerdma_core::Pid, b: Ram, n: u64) -> Va {
    match b {
        Ram::Anon => anon(k, pid, n, Prot::RW).await,
        Ram::Shmem => k
            .mmap(
                pid,
                &MmapArgs {
                    len: pages(n),
                    prot: Prot::RW,
                    shared: true,
                    anonymous: true,
                    populate: true,
                    ..MmapArgs::default()
                },
            )
            .await
            .unwrap(),
        Ram::File => {
            let f = k.create_file("data", pages(n), false);
            file_shared(k, pid, f, n).await
        }
    }
}

// ------------------------------------------------------------------------------------------ row: RAM

/// Row "RAM (anon, shmem, file)", short-term and long-term columns: every page pinned (GUP bias) and
/// mapped into one IOVA range; the device's write lands in the page the process sees.
#[test]
fn ram_is_pinned_and_mapped_short_and_long_term() {
    let b = "RAM is pinned and mapped short and long term";
    for backing in [Ram::Anon, Ram::Shmem, Ram::File] {
        for (col, flags) in [("short", SHORT), ("long", LONG)] {
            let w = world(DomainType::Dma);
            let (segs, nr_pinned, all_pinned, mapped, seen, after) =
                w.run(move |k, p| async move {
                    let pid = k.create_process();
                    let va = map_ram(&k, pid, backing, 3).await;
                    let flags = if matches!(backing, Ram::File) && flags.contains(S::LONGTERM) {
                        // FOLL_LONGTERM | FOLL_WRITE on a writeback file mapping is EFAULT (§2.3): read-only.
                        S::LONGTERM
                    } else {
                        flags
                    };
                    let h = get_user_dma_sg(&p, pid, range(va, 3), NIC, flags)
                        .await
                        .unwrap();
                    let frames: Vec<_> = (0..3)
                        .map(|i| frame_of(&k, pid, va.add(pages(i))))
                        .collect();
                    let all_pinned = frames.iter().all(|&f| pinned(&k, f));
                    let mapped = p.device(NIC).unwrap().domain().mapped_pages();
                    let mut seen = [0u8; 4];
                    if flags.contains(S::WRITE) {
                        h.write(PAGE_SIZE, &page_of(0xab)).await.unwrap();
                        k.load(pid, va.add(PAGE_SIZE), &mut seen).await.unwrap();
                    }
                    let segs = h.segments();
                    let nr = h.nr_pinned();
                    drop(h);
                    let after = frames.iter().any(|&f| pinned(&k, f));
                    (segs, nr, all_pinned, mapped, seen, after)
                });
            let what = format!("{b}: {backing:?} {col}");
            assert_eq!(segs.len(), 1, "{what}: one merged IOVA segment");
            assert_eq!(segs[0].kind, SegKind::Ram, "{what}");
            assert_eq!(segs[0].len, pages(3), "{what}");
            assert!(matches!(segs[0].addr, DmaAddr::Iova(_)), "{what}");
            assert_eq!(nr_pinned, 3, "{what}");
            assert!(all_pinned, "{what}: maybe_dma_pinned on every page");
            assert_eq!(mapped, 3, "{what}: three IOVA pages in the domain");
            if !(matches!(backing, Ram::File) && col == "long") {
                assert_eq!(
                    seen, [0xab; 4],
                    "{what}: the device wrote the process's page"
                );
            }
            assert!(!after, "{what}: rule 3, dropping the handle unpins");
            assert_eq!(w.nic_mapped_pages(), 0, "{what}: rule 3, and unmaps");
        }
    }
}

/// With an identity domain the DMA address of a RAM page is its physical address.
#[test]
fn ram_in_identity_domain_gets_its_physical_address() {
    let w = world(DomainType::Identity);
    let (segs, pa) = w.run(|k, p| async move {
        let pid = k.create_process();
        let va = anon(&k, pid, 1, Prot::RW).await;
        let h = get_user_dma_sg(&p, pid, range(va, 1), NIC, SHORT)
            .await
            .unwrap();
        let f = frame_of(&k, pid, va);
        let pa = k.frame_pa(f);
        (h.segments(), pa)
    });
    assert_eq!(segs.len(), 1);
    assert_eq!(segs[0].addr.raw(), pa.raw());
    assert_eq!(segs[0].kind, SegKind::Ram);
}

/// Row "RAM", mirror column: registration pins and maps nothing; the device's access faults the page in.
#[test]
fn ram_mirror_registers_without_pins_and_faults_on_demand() {
    for backing in [Ram::Anon, Ram::Shmem, Ram::File] {
        let w = world(DomainType::Dma);
        let (before, after, nr_pinned, any_pinned, seen, is_mirror) =
            w.run(move |k, p| async move {
                let pid = k.create_process();
                let va = map_ram(&k, pid, backing, 2).await;
                let h = get_user_dma_sg(&p, pid, range(va, 2), NIC, S::MIRROR | S::WRITE)
                    .await
                    .unwrap();
                let before = h.segments().len();
                h.write(0, &page_of(0x5a)).await.unwrap();
                let after = h.segments();
                let mut seen = [0u8; 2];
                k.load(pid, va, &mut seen).await.unwrap();
                let f = frame_of(&k, pid, va);
                (
                    before,
                    after,
                    h.nr_pinned(),
                    pinned(&k, f),
                    seen,
                    h.is_mirror(),
                )
            });
        assert!(is_mirror, "{backing:?}");
        assert_eq!(before, 0, "{backing:?}: nothing faulted at registration");
        assert_eq!(after.len(), 1, "{backing:?}: the touched page only");
        assert_eq!(after[0].len, PAGE_SIZE, "{backing:?}");
        assert_eq!(after[0].kind, SegKind::Ram, "{backing:?}");
        assert_eq!(nr_pinned, 0, "{backing:?}");
        assert!(!any_pinned, "{backing:?}: a mirror never pins");
        assert_eq!(seen, [0x5a; 2], "{backing:?}");
    }
}

// ------------------------------------------------------------------------------- row: device-coherent

#[test]
fn device_coherent_short_term_is_pinned_in_place() {
    let w = world(DomainType::Dma);
    let (kind, was_pinned, nr) = w.run(|k, p| async move {
        let pid = k.create_process();
        let va = anon(&k, pid, 2, Prot::RW).await;
        let r = add_devmem(&k, false, 4);
        assert_eq!(migrate_to_device(&k, pid, range(va, 2), r).await, 2);
        let h = get_user_dma_sg(&p, pid, range(va, 2), NIC, SHORT)
            .await
            .unwrap();
        let f = frame_of(&k, pid, va);
        (kind_at(&k, pid, va), pinned(&k, f), h.nr_pinned())
    });
    assert_eq!(
        kind,
        MemoryKind::DeviceCoherent {
            owner: DEVMEM_OWNER
        }
    );
    assert!(was_pinned);
    assert_eq!(nr, 2);
}

#[test]
fn device_coherent_long_term_is_migrated_to_ram_then_pinned() {
    let w = world(DomainType::Dma);
    let (kind, was_pinned, nr, data) = w.run(|k, p| async move {
        let pid = k.create_process();
        let va = anon(&k, pid, 2, Prot::RW).await;
        k.store(pid, va, b"coherent").await.unwrap();
        let r = add_devmem(&k, false, 4);
        migrate_to_device(&k, pid, range(va, 2), r).await;
        let h = get_user_dma_sg(&p, pid, range(va, 2), NIC, LONG)
            .await
            .unwrap();
        let f = frame_of(&k, pid, va);
        let data = h.read(0, 4096).await.unwrap();
        (kind_at(&k, pid, va), pinned(&k, f), h.nr_pinned(), data)
    });
    assert_eq!(kind, MemoryKind::Ram { node: 0 });
    assert!(was_pinned);
    assert_eq!(nr, 2);
    assert_eq!(&data[..8], b"coherent", "the migration kept the bytes");
}

#[test]
fn device_coherent_mirror_reaches_the_page_in_place() {
    let w = world(DomainType::Dma);
    let (kind, data, nr) = w.run(|k, p| async move {
        let pid = k.create_process();
        let va = anon(&k, pid, 1, Prot::RW).await;
        k.store(pid, va, b"coh").await.unwrap();
        let r = add_devmem(&k, false, 4);
        migrate_to_device(&k, pid, range(va, 1), r).await;
        let h = get_user_dma_sg(&p, pid, range(va, 1), NIC, S::MIRROR)
            .await
            .unwrap();
        let data = h.read(0, 4096).await.unwrap();
        (kind_at(&k, pid, va), data, h.nr_pinned())
    });
    assert_eq!(
        kind,
        MemoryKind::DeviceCoherent {
            owner: DEVMEM_OWNER
        }
    );
    assert_eq!(&data[..3], b"coh");
    assert_eq!(nr, 0);
}

// ------------------------------------------------------------------ row: device-private (other owner)

#[test]
fn device_private_is_migrated_to_ram_then_pinned_short_and_long_term() {
    for (col, flags) in [("short", SHORT), ("long", LONG)] {
        let w = world(DomainType::Dma);
        let (before, after, was_pinned, data) = w.run(move |k, p| async move {
            let pid = k.create_process();
            let va = anon(&k, pid, 1, Prot::RW).await;
            k.store(pid, va, b"private").await.unwrap();
            let r = add_devmem(&k, true, 4);
            migrate_to_device(&k, pid, range(va, 1), r).await;
            let before = k.translate(pid, va).map(|(f, _)| k.memory_kind(f));
            let h = get_user_dma_sg(&p, pid, range(va, 1), NIC, flags)
                .await
                .unwrap();
            let f = frame_of(&k, pid, va);
            let data = h.read(0, 4096).await.unwrap();
            (before, kind_at(&k, pid, va), pinned(&k, f), data)
        });
        assert_ne!(
            before,
            Some(MemoryKind::Ram { node: 0 }),
            "{col}: set-up moved it"
        );
        assert_eq!(after, MemoryKind::Ram { node: 0 }, "{col}");
        assert!(was_pinned, "{col}");
        assert_eq!(&data[..7], b"private", "{col}");
    }
}

#[test]
fn device_private_mirror_fault_migrates_it_back() {
    let w = world(DomainType::Dma);
    let (kind, data, nr) = w.run(|k, p| async move {
        let pid = k.create_process();
        let va = anon(&k, pid, 1, Prot::RW).await;
        k.store(pid, va, b"private").await.unwrap();
        let r = add_devmem(&k, true, 4);
        migrate_to_device(&k, pid, range(va, 1), r).await;
        let h = get_user_dma_sg(&p, pid, range(va, 1), NIC, S::MIRROR)
            .await
            .unwrap();
        let data = h.read(0, 4096).await.unwrap();
        (kind_at(&k, pid, va), data, h.nr_pinned())
    });
    assert_eq!(kind, MemoryKind::Ram { node: 0 });
    assert_eq!(&data[..7], b"private");
    assert_eq!(nr, 0);
}

// ------------------------------------------------------------------------------------ row: P2P memory

#[test]
fn p2p_short_term_without_the_p2p_flag_is_eremoteio() {
    let w = world(DomainType::Dma);
    let r = w.run(|k, p| async move {
        let pid = k.create_process();
        let va = p
            .p2pmem_mmap(pid, NVME, pages(2), Prot::RW, true, 0)
            .await
            .unwrap();
        get_user_dma_sg(&p, pid, range(va, 2), NIC, SHORT)
            .await
            .map(|_| ())
    });
    assert_eq!(r, Err(Errno::EREMOTEIO.into()));
    assert_eq!(w.nic_mapped_pages(), 0);
}

#[test]
fn p2p_under_a_switch_gets_bus_addresses_at_phys_plus_bus_offset() {
    let w = world(DomainType::Dma);
    let (segs, pa, mapped, nr) = w.run(|k, p| async move {
        let pid = k.create_process();
        let va = p
            .p2pmem_mmap(pid, NVME, pages(2), Prot::RW, true, 0)
            .await
            .unwrap();
        let h = get_user_dma_sg(&p, pid, range(va, 2), NIC, SHORT | S::P2P)
            .await
            .unwrap();
        let f = frame_of(&k, pid, va);
        let pa = k.frame_pa(f);
        let mapped = p.device(NIC).unwrap().domain().mapped_pages();
        (h.segments(), pa, mapped, h.nr_pinned())
    });
    assert_eq!(pa.raw(), NVME_BAR0, "first fit in the pool");
    assert_eq!(segs.len(), 1);
    assert_eq!(segs[0].kind, SegKind::P2pBusAddr);
    assert_eq!(
        segs[0].addr.raw(),
        NVME_BAR0 + 0x1000_0000,
        "bus address = phys + bus offset"
    );
    assert!(matches!(segs[0].addr, DmaAddr::Bus(_)));
    assert_eq!(segs[0].len, pages(2));
    assert_eq!(mapped, 0, "bus addresses take no IOVA");
    assert_eq!(nr, 2, "the P2P pages are pinned (short term)");
}

#[test]
fn p2p_through_a_whitelisted_host_bridge_gets_an_iova() {
    let w = world(DomainType::Dma);
    let (segs, mapped, iova_pa) = w.run(|k, p| async move {
        let pid = k.create_process();
        let va = p
            .p2pmem_mmap(pid, GPU, pages(2), Prot::RW, true, 0)
            .await
            .unwrap();
        let h = get_user_dma_sg(&p, pid, range(va, 2), NIC, SHORT | S::P2P)
            .await
            .unwrap();
        let segs = h.segments();
        let d = p.device(NIC).unwrap();
        let lookup = d
            .domain()
            .lookup(peerdma_core::Iova::from_raw(segs[0].addr.raw()))
            .map(|(pa, prot)| (pa, prot.mmio));
        (segs, d.domain().mapped_pages(), lookup)
    });
    assert_eq!(segs.len(), 1);
    assert_eq!(segs[0].kind, SegKind::P2pThruHostBridge);
    assert!(matches!(segs[0].addr, DmaAddr::Iova(_)));
    assert_ne!(
        segs[0].addr.raw(),
        GPU_BAR0,
        "an IOVA, not the physical address"
    );
    assert_eq!(mapped, 2);
    assert_eq!(
        iova_pa,
        Some((peerdma_core::Pa::from_raw(GPU_BAR0), true)),
        "mapped to the BAR with the MMIO attribute"
    );
}

#[test]
fn p2p_behind_a_host_bridge_not_whitelisted_is_eremoteio_with_nothing_held() {
    let w = world(DomainType::Dma);
    let (r, still_pinned) = w.run(|k, p| async move {
        let pid = k.create_process();
        let va = p
            .p2pmem_mmap(pid, ACC, pages(2), Prot::RW, true, 0)
            .await
            .unwrap();
        let r = get_user_dma_sg(&p, pid, range(va, 2), NIC, SHORT | S::P2P)
            .await
            .map(|_| ());
        let f = frame_of(&k, pid, va);
        (r, pinned(&k, f))
    });
    assert_eq!(r, Err(Errno::EREMOTEIO.into()));
    assert!(!still_pinned);
    assert_eq!(w.nic_mapped_pages(), 0);
}

#[test]
fn p2p_long_term_is_einval() {
    for flags in [LONG, LONG | S::P2P] {
        let w = world(DomainType::Dma);
        let r = w.run(move |k, p| async move {
            let pid = k.create_process();
            let va = p
                .p2pmem_mmap(pid, NVME, pages(1), Prot::RW, true, 0)
                .await
                .unwrap();
            get_user_dma_sg(&p, pid, range(va, 1), NIC, flags)
                .await
                .map(|_| ())
        });
        assert_eq!(r, Err(Errno::EINVAL.into()), "{flags:?}");
    }
}

// ------------------------------------------------------------------------- row: BAR without struct page

#[test]
fn bar_export_short_term_and_long_term_when_revocable() {
    for (col, flags) in [("short", SHORT), ("long", LONG)] {
        let w = world(DomainType::Dma);
        let (segs, nr, mmio_bytes) = w.run(move |k, p| async move {
            let pid = k.create_process();
            let mmio = p.export_bar(NVME, 2, 0, pages(4), true).unwrap();
            let va = p.mmap_bar(pid, mmio, 0, pages(2), Prot::RW).await.unwrap();
            let h = get_user_dma_sg(&p, pid, range(va, 2), NIC, flags)
                .await
                .unwrap();
            h.write(PAGE_SIZE, &page_of(0x77)).await.unwrap();
            let mut b = [0u8; 4];
            k.load(pid, va.add(PAGE_SIZE), &mut b).await.unwrap();
            (h.segments(), h.nr_pinned(), b)
        });
        assert_eq!(segs.len(), 1, "{col}");
        assert_eq!(
            segs[0].kind,
            SegKind::P2pBusAddr,
            "{col}: nvme and nic share a switch"
        );
        assert_eq!(segs[0].addr.raw(), NVME_BAR2 + 0x1000_0000, "{col}");
        assert_eq!(segs[0].len, pages(2), "{col}");
        assert_eq!(nr, 0, "{col}: no struct page, nothing pinned");
        assert_eq!(mmio_bytes, [0x77; 4], "{col}: the device wrote the BAR");
    }
}

#[test]
fn bar_export_not_revocable_is_refused_long_term_only() {
    let w = world(DomainType::Dma);
    let (short, long) = w.run(|k, p| async move {
        let pid = k.create_process();
        let mmio = p.export_bar(NVME, 2, 0, pages(4), false).unwrap();
        let va = p.mmap_bar(pid, mmio, 0, pages(2), Prot::RW).await.unwrap();
        let short = get_user_dma_sg(&p, pid, range(va, 2), NIC, SHORT)
            .await
            .map(|h| h.segments().len());
        let long = get_user_dma_sg(&p, pid, range(va, 2), NIC, LONG)
            .await
            .map(|_| ());
        (short, long)
    });
    assert_eq!(short, Ok(1));
    assert_eq!(long, Err(Errno::EOPNOTSUPP.into()));
}

#[test]
fn pfnmap_without_an_export_is_efault() {
    for flags in [SHORT, LONG] {
        let w = world(DomainType::Dma);
        let r = w.run(move |k, p| async move {
            let pid = k.create_process();
            let va = k.mmap_pfnmap(pid, pages(2), Prot::RW).await.unwrap();
            get_user_dma_sg(&p, pid, range(va, 2), NIC, flags)
                .await
                .map(|_| ())
        });
        assert_eq!(r, Err(Errno::EFAULT.into()), "{flags:?}");
    }
}

/// DESIGN.md §4.6, BAR row, mirror column: "mirror through the provider; revocation invalidates". No pin;
/// the device's fault attaches the page to the export; the revocation's PFNMAP zap invalidates the entry,
/// and the next fault finds no translation.
#[test]
fn bar_mirror_goes_through_the_export_and_revocation_invalidates_it() {
    let w = world(DomainType::Dma);
    let (reg, before, segs, after) = w.run(|k, p| async move {
        let pid = k.create_process();
        let mmio = p.export_bar(NVME, 2, 0, pages(4), true).unwrap();
        let va = p.mmap_bar(pid, mmio, 0, pages(1), Prot::RW).await.unwrap();
        k.store(pid, va, &page_of(0x5c)).await.unwrap();
        let h = get_user_dma_sg(&p, pid, range(va, 1), NIC, S::MIRROR)
            .await
            .unwrap();
        let before = h.read(0, 4096).await.map(|d| d[4095]);
        let segs = h.segments().iter().map(|s| s.kind).collect::<Vec<_>>();
        p.remove_device(NVME).await.unwrap();
        let after = h.read(0, 4096).await.map(|_| ());
        ((h.is_mirror(), h.nr_pinned()), before, segs, after)
    });
    assert_eq!(reg, (true, 0));
    assert_eq!(
        before,
        Ok(0x5c),
        "the device read the BAR through the owner's translation"
    );
    assert_eq!(segs, vec![SegKind::P2pBusAddr]);
    assert_eq!(
        after,
        Err(Errno::EFAULT.into()),
        "revoked: the PFNMAP entry is gone"
    );
}

// ----------------------------------------------------------------------------------------- row: FsDax

#[test]
fn fsdax_short_term_pins_and_long_term_is_eopnotsupp() {
    let w = world(DomainType::Dma);
    let (kind, short, long, mirror) = w.run(|k, p| async move {
        let pid = k.create_process();
        let f = k.create_dax_file("pmem", pages(2));
        let va = file_shared(&k, pid, f, 2).await;
        let short = get_user_dma_sg(&p, pid, range(va, 2), NIC, SHORT)
            .await
            .map(|h| (h.nr_pinned(), h.segments()[0].kind));
        let long = get_user_dma_sg(&p, pid, range(va, 2), NIC, LONG)
            .await
            .map(|_| ());
        let m = get_user_dma_sg(&p, pid, range(va, 2), NIC, S::MIRROR | S::WRITE)
            .await
            .unwrap();
        m.write(0, &page_of(3)).await.unwrap();
        let mut b = [0u8; 1];
        k.load(pid, va, &mut b).await.unwrap();
        (kind_at(&k, pid, va), short, long, (m.nr_pinned(), b[0]))
    });
    assert!(matches!(kind, MemoryKind::FsDax { .. }));
    assert_eq!(short, Ok((2, SegKind::Ram)));
    assert_eq!(long, Err(Errno::EOPNOTSUPP.into()));
    assert_eq!(
        mirror,
        (0, 3),
        "the mirror column: no pins, the write reaches the DAX page"
    );
}

// ---------------------------------------------------------------- row: hole / PROT_NONE / read-only

/// The last row, pin columns: every case is EFAULT, short-term and long-term alike.
#[test]
fn hole_prot_none_and_write_to_read_only_are_efault_when_pinning() {
    #[derive(Clone, Copy, Debug)]
    enum Case {
        Hole,
        ProtNone,
        WriteReadOnly,
    }
    for case in [Case::Hole, Case::ProtNone, Case::WriteReadOnly] {
        for flags in [SHORT, LONG] {
            let w = world(DomainType::Dma);
            let r = w.run(move |k, p| async move {
                let pid = k.create_process();
                let va = match case {
                    Case::Hole => {
                        let va = anon(&k, pid, 1, Prot::RW).await;
                        k.munmap(pid, va, pages(1)).await.unwrap();
                        va
                    }
                    Case::ProtNone => anon(&k, pid, 1, Prot::NONE).await,
                    Case::WriteReadOnly => anon(&k, pid, 1, Prot::READ).await,
                };
                get_user_dma_sg(&p, pid, range(va, 1), NIC, flags)
                    .await
                    .map(|_| ())
            });
            assert_eq!(r, Err(Errno::EFAULT.into()), "{case:?} {flags:?}");
        }
    }
}

/// The last row, mirror column: registration succeeds; the device's access gets `hmm_range_fault`'s errno.
#[test]
fn hole_prot_none_and_read_only_mirror_registers_and_faults_with_efault_or_eperm() {
    let w = world(DomainType::Dma);
    let rows = w.run(|k, p| async move {
        let pid = k.create_process();
        let hole = anon(&k, pid, 1, Prot::RW).await;
        k.munmap(pid, hole, pages(1)).await.unwrap();
        let none = anon(&k, pid, 1, Prot::NONE).await;
        let ro = anon(&k, pid, 1, Prot::READ).await;
        let mut out = Vec::new();
        for (va, write) in [(hole, false), (none, false), (ro, true), (ro, false)] {
            let h = get_user_dma_sg(&p, pid, range(va, 1), NIC, S::MIRROR | S::WRITE)
                .await
                .unwrap();
            let r = if write {
                h.write(0, &page_of(1)).await
            } else {
                h.read(0, 4096).await.map(|_| ())
            };
            out.push(r.map_err(|e| e.errno()));
            h.release().await;
        }
        out
    });
    assert_eq!(
        rows,
        [
            Err(Errno::EFAULT), // hole
            Err(Errno::EFAULT), // PROT_NONE
            Err(Errno::EPERM),  // write to a read-only VMA
            Ok(()),             // a read of it is fine
        ]
    );
}

// ---------------------------------------------------------------------------------------- rules 1–3

#[test]
fn misaligned_or_empty_range_is_einval() {
    let w = world(DomainType::Dma);
    let rows = w.run(|k, p| async move {
        let pid = k.create_process();
        let va = anon(&k, pid, 2, Prot::RW).await;
        let mut out = Vec::new();
        for r in [
            peerdma_core::Range::new(va, va),
            peerdma_core::Range::new(va.add(8), va.add(PAGE_SIZE)),
            peerdma_core::Range::new(va, va.add(PAGE_SIZE + 8)),
        ] {
            for flags in [SHORT, LONG, S::MIRROR] {
                out.push(
                    get_user_dma_sg(&p, pid, r, NIC, flags)
                        .await
                        .map(|_| ())
                        .map_err(|e| e.errno()),
                );
            }
        }
        out
    });
    assert_eq!(rows, [Err(Errno::EINVAL); 9]);
}

/// Rule 2: RAM followed by a hole fails with EFAULT and leaves no page pinned and no IOVA mapped.
#[test]
fn ram_then_hole_fails_with_nothing_pinned_or_mapped() {
    let w = world(DomainType::Dma);
    let (r, refs_before, refs_after, pinned_after) = w.run(|k, p| async move {
        let pid = k.create_process();
        let va = anon(&k, pid, 4, Prot::RW).await;
        k.munmap(pid, va.add(pages(2)), pages(2)).await.unwrap();
        let frames: Vec<_> = (0..2)
            .map(|i| frame_of(&k, pid, va.add(pages(i))))
            .collect();
        let refs = |k: &peerdma_mm::Kernel| -> Vec<u32> {
            frames.iter().map(|&f| k.frame_info(f).refcount).collect()
        };
        let before = refs(&k);
        let r = get_user_dma_sg(&p, pid, range(va, 4), NIC, SHORT)
            .await
            .map(|_| ());
        let after = refs(&k);
        let any = frames.iter().any(|&f| pinned(&k, f));
        (r, before, after, any)
    });
    assert_eq!(r, Err(Errno::EFAULT.into()));
    assert_eq!(refs_after, refs_before);
    assert!(!pinned_after);
    assert_eq!(w.nic_mapped_pages(), 0);
}

/// Rule 2 again, where the failing piece (unreachable P2P memory) comes after a RAM piece, a P2P piece and
/// a BAR piece that were taken: everything is released, pins, IOVAs and the dma-buf attachment.
#[test]
fn ram_p2p_bar_then_unreachable_p2p_fail_with_everything_released() {
    let w = world(DomainType::Dma);
    let (r, held, attached, detached_all) = w.run(|k, p| async move {
        let pid = k.create_process();
        // Top-down placement: each mapping lands right below the previous one.
        let acc = p
            .p2pmem_mmap(pid, ACC, pages(1), Prot::RW, true, 0)
            .await
            .unwrap();
        let mmio = p.export_bar(NVME, 2, 0, pages(1), true).unwrap();
        let bar = p.mmap_bar(pid, mmio, 0, pages(1), Prot::RW).await.unwrap();
        let nvme = p
            .p2pmem_mmap(pid, NVME, pages(1), Prot::RW, true, 0)
            .await
            .unwrap();
        let ram = anon_at(&k, pid, Va::from_raw(nvme.raw() - PAGE_SIZE), 1, Prot::RW).await;
        assert_eq!(
            [bar.raw() - nvme.raw(), acc.raw() - bar.raw()],
            [PAGE_SIZE, PAGE_SIZE],
            "the four VMAs are adjacent"
        );
        let r = get_user_dma_sg(&p, pid, range(ram, 4), NIC, SHORT | S::P2P)
            .await
            .map(|_| ());
        let held = [ram, nvme].map(|va| pinned(&k, frame_of(&k, pid, va)));
        let m = k.sim.metrics();
        (r, held, m.get("dmabuf.attach"), m.get("dma.unmap_sg"))
    });
    assert_eq!(r, Err(Errno::EREMOTEIO.into()));
    assert_eq!(held, [false, false], "RAM and NVMe pages unpinned");
    assert_eq!(attached, 1, "the BAR piece was attached before the failure");
    assert_eq!(detached_all, 3, "and unmapped with the two pinned pieces");
    assert_eq!(w.nic_mapped_pages(), 0);
}

/// Rule 2 inside one VMA: GUP pins the first page and stops at the second (beyond the file's end); the
/// partial pin is dropped and the errno is the second page's.
#[test]
fn partial_pin_inside_one_vma_is_released_and_fails_with_efault() {
    let w = world(DomainType::Dma);
    let (r, first_pinned) = w.run(|k, p| async move {
        let pid = k.create_process();
        let f = k.create_file("short", PAGE_SIZE, false);
        let va = k
            .mmap(
                pid,
                &MmapArgs {
                    len: pages(2),
                    prot: Prot::RW,
                    shared: true,
                    file: Some(f),
                    ..MmapArgs::default()
                },
            )
            .await
            .unwrap();
        let r = get_user_dma_sg(&p, pid, range(va, 2), NIC, SHORT)
            .await
            .map(|_| ());
        let fr = frame_of(&k, pid, va);
        (r, pinned(&k, fr))
    });
    assert_eq!(r, Err(Errno::EFAULT.into()));
    assert!(!first_pinned);
    assert_eq!(w.nic_mapped_pages(), 0);
}

/// The last row for a BAR piece: the exporter translates the user address as `follow_pfnmap` with the
/// access checked (VFIO `follow_fault_pfn`: a write to a read-only PFN entry is EFAULT), so a device write
/// through a read-only BAR mapping, or any access through a PROT_NONE one, is refused like the GUP rule.
#[test]
fn bar_mapped_read_only_or_prot_none_is_efault_for_the_refused_access() {
    let w = world(DomainType::Dma);
    let rows = w.run(|k, p| async move {
        let pid = k.create_process();
        let mmio = p.export_bar(NVME, 2, 0, pages(4), true).unwrap();
        let ro = p
            .mmap_bar(pid, mmio, 0, pages(1), Prot::READ)
            .await
            .unwrap();
        let none = p
            .mmap_bar(pid, mmio, PAGE_SIZE, pages(1), Prot::NONE)
            .await
            .unwrap();
        let mut out = Vec::new();
        for (va, flags) in [
            (ro, SHORT),
            (ro, LONG),
            (ro, S::empty()),
            (none, S::empty()),
        ] {
            out.push(
                get_user_dma_sg(&p, pid, range(va, 1), NIC, flags)
                    .await
                    .map(|h| h.segments().len())
                    .map_err(|e| e.errno()),
            );
        }
        out
    });
    assert_eq!(
        rows,
        [
            Err(Errno::EFAULT), // device write, read-only mapping
            Err(Errno::EFAULT),
            Ok(1),              // a device read of a read-only mapping is fine
            Err(Errno::EFAULT), // PROT_NONE
        ]
    );
}

#[test]
fn unknown_initiator_is_a_typed_misuse_with_enodev() {
    let w = world(DomainType::Dma);
    let r = w.run(|k, p| async move {
        let pid = k.create_process();
        let va = anon(&k, pid, 1, Prot::RW).await;
        get_user_dma_sg(&p, pid, range(va, 1), peerdma_core::DeviceId(99), SHORT)
            .await
            .map(|_| ())
    });
    assert_eq!(r, Err(DmaError::UnknownDevice(peerdma_core::DeviceId(99))));
    assert_eq!(r.unwrap_err().errno(), Errno::ENODEV);
}

/// Rule 3 per handle: each handle owns its own pins, so dropping one leaves the other's in place.
#[test]
fn two_handles_on_one_page_hold_separate_pins() {
    let w = world(DomainType::Dma);
    let (both, one, none) = w.run(|k, p| async move {
        let pid = k.create_process();
        let va = anon(&k, pid, 1, Prot::RW).await;
        let f = frame_of(&k, pid, va);
        let refs = |k: &peerdma_mm::Kernel| k.frame_info(f).refcount;
        let a = get_user_dma_sg(&p, pid, range(va, 1), NIC, SHORT)
            .await
            .unwrap();
        let b = get_user_dma_sg(&p, pid, range(va, 1), NIC, LONG)
            .await
            .unwrap();
        let both = (refs(&k), p.device(NIC).unwrap().domain().mapped_pages());
        drop(a);
        let one = (refs(&k), pinned(&k, f));
        b.release().await;
        (both, one, (refs(&k), pinned(&k, f)))
    });
    assert_eq!(
        both,
        (1 + 2 * 1024, 2),
        "GUP_PIN_COUNTING_BIAS per pin, one IOVA each"
    );
    assert_eq!(one, (1 + 1024, true));
    assert_eq!(none, (1, false));
    assert_eq!(w.nic_mapped_pages(), 0);
}

/// Rule 3 for a mirror: dropping the handle unregisters the notifier (in an agent), so later CPU changes
/// invalidate nothing.
#[test]
fn dropping_a_mirror_handle_unregisters_it() {
    let w = world(DomainType::Dma);
    let (invalidated, mapped) = w.run(|k, p| async move {
        let pid = k.create_process();
        let va = anon(&k, pid, 2, Prot::RW).await;
        let h = get_user_dma_sg(&p, pid, range(va, 2), NIC, S::MIRROR)
            .await
            .unwrap();
        h.read(0, pages(2).try_into().unwrap()).await.unwrap();
        drop(h);
        k.sim.sleep(peerdma_core::SimDuration::from_micros(1)).await;
        let mapped = p.device(NIC).unwrap().domain().mapped_pages();
        k.munmap(pid, va, pages(2)).await.unwrap();
        (k.sim.metrics().get("mirror.invalidated_pages"), mapped)
    });
    assert_eq!(invalidated, 0, "no notifier left to call");
    assert_eq!(mapped, 0, "the entries' IOVAs went with it");
}

#[test]
fn device_access_outside_the_range_or_not_page_sized_is_a_bad_range() {
    let w = world(DomainType::Dma);
    let rows = w.run(|k, p| async move {
        let pid = k.create_process();
        let va = anon(&k, pid, 2, Prot::RW).await;
        let h = get_user_dma_sg(&p, pid, range(va, 2), NIC, SHORT)
            .await
            .unwrap();
        vec![
            h.read(PAGE_SIZE, 8192).await.map(|_| ()),
            h.read(8, 4096).await.map(|_| ()),
            h.write(0, &[0u8; 100]).await,
            h.read(PAGE_SIZE, 4096).await.map(|_| ()),
        ]
    });
    let bad = |offset, len| {
        Err(DmaError::BadRange {
            offset,
            len,
            size: 2 * PAGE_SIZE,
        })
    };
    assert_eq!(
        rows,
        [bad(PAGE_SIZE, 8192), bad(8, 4096), bad(0, 100), Ok(())]
    );
    assert_eq!(bad(8, 4096).unwrap_err().errno(), Errno::EINVAL);
}

/// Row "RAM (file)", long-term column with write: FOLL_LONGTERM | FOLL_WRITE on a file mapping that needs
/// dirty tracking is EFAULT (spec/linux-p2p.md §2.3); shmem is fine (covered above).
#[test]
fn long_term_write_pin_of_a_writeback_file_mapping_is_efault() {
    let w = world(DomainType::Dma);
    let r = w.run(|k, p| async move {
        let pid = k.create_process();
        let va = map_ram(&k, pid, Ram::File, 1).await;
        get_user_dma_sg(&p, pid, range(va, 1), NIC, LONG)
            .await
            .map(|_| ())
    });
    assert_eq!(r, Err(Errno::EFAULT.into()));
    assert_eq!(w.nic_mapped_pages(), 0);
}

/// Row "BAR without struct page": the same map-type rule as P2P memory, so an initiator that cannot
/// reach the exporter is refused with EREMOTEIO and nothing stays attached.
#[test]
fn bar_export_unreachable_from_the_initiator_is_eremoteio() {
    let w = world(DomainType::Dma);
    let (r, attached) = w.run(|k, p| async move {
        let pid = k.create_process();
        let mmio = p.export_bar(NVME, 2, 0, pages(1), true).unwrap();
        let va = p.mmap_bar(pid, mmio, 0, pages(1), Prot::RW).await.unwrap();
        let r = get_user_dma_sg(&p, pid, range(va, 1), ACC, SHORT)
            .await
            .map(|_| ());
        (r, k.sim.metrics().get("dmabuf.attach"))
    });
    assert_eq!(r, Err(Errno::EREMOTEIO.into()));
    assert_eq!(attached, 0);
}
