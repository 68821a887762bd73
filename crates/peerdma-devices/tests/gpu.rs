//! The `gpu` device's buffer objects: moves under their dma-buf importers (gpu/bo.rs steps 1–4) and under the
//! CPU's mappings of them (step 0, gpu/bo/mmap.rs).
#![expect(
    clippy::tests_outside_test_module,
    clippy::unwrap_used,
    reason = "an integration-test crate is all tests"
)]

mod common;

use std::cell::RefCell;
use std::future::Future;
use std::rc::Rc;

use peerdma_core::{DeviceId, Errno, PAGE_SIZE, Pa};
use peerdma_devices::gpu::{GpuError, GpuInjection, Placement};
use peerdma_devices::{DmirrorCosts, DmirrorDevice, DmirrorMemory};
use peerdma_dma::{ImporterKind, SegKind};
use peerdma_mm::oracle::ViolationKind;
use peerdma_mm::{Kernel, MemoryKind};
use peerdma_sim::RunOutcome;

use common::*;

/// Steps 1–4 and the remap rule: a dynamic importer's segments go bus address → RAM → bus address as the
/// buffer is evicted and validated back, and the data follows.
#[test]
fn dynamic_importer_follows_eviction_and_return() {
    let w = world(16, Some(8), 1);
    let (k0, k1, k2, data) = w.run_clean(|gpu, _| async move {
        let bo = gpu.bo_create(4 * PAGE_SIZE).unwrap();
        gpu.bo_write(bo, 0, &pattern(4, 1)).await.unwrap();
        let att = gpu
            .bo_attach(bo, NIC, ImporterKind::Dynamic, true)
            .await
            .unwrap();
        let k0 = kinds(&gpu, att);
        gpu.bo_dma(att, 0, PAGE_SIZE, Some(&pattern(1, 7)))
            .await
            .unwrap();
        gpu.bo_evict(bo).await.unwrap();
        assert!(!gpu.bo_is_mapped(att), "move_notify dropped the mapping");
        let read = gpu.bo_dma(att, 0, 4 * PAGE_SIZE, None).await.unwrap();
        let k1 = kinds(&gpu, att);
        let mut want = pattern(4, 1);
        want[..PG].copy_from_slice(&pattern(1, 7));
        assert_eq!(read, want, "the importer's write moved with the buffer");
        gpu.bo_dma(att, PAGE_SIZE, PAGE_SIZE, Some(&pattern(1, 9)))
            .await
            .unwrap();
        gpu.bo_validate(bo).await.unwrap();
        assert_eq!(gpu.bo_placement(bo).unwrap(), Placement::Window);
        let data = gpu.bo_dma(att, 0, 4 * PAGE_SIZE, None).await.unwrap();
        let k2 = kinds(&gpu, att);
        want[PG..2 * PG].copy_from_slice(&pattern(1, 9));
        assert_eq!(data, want);
        (k0, k1, k2, data)
    });
    assert_eq!(k0, [SegKind::P2pBusAddr]);
    assert_eq!(k1, [SegKind::Ram]);
    assert_eq!(k2, [SegKind::P2pBusAddr]);
    assert_eq!(data.len(), 4 * PG);
    assert_eq!(w.count("dmabuf.move_notify"), 2);
    assert_eq!(w.count("gpu.tlb_invalidations"), 2);
}

/// The test-only switch: an eviction that skips the importer's invalidation leaves the NIC a bus address of
/// a freed window page, and the oracle reports its next access.
#[test]
fn skipping_peer_invalidation_on_eviction_is_caught_by_the_oracle() {
    let w = world(16, Some(8), 1);
    w.gpu.inject(GpuInjection::SkipPeerInvalidation);
    let (_, outcome) = w.run(|gpu, _| async move {
        let bo = gpu.bo_create(2 * PAGE_SIZE).unwrap();
        let att = gpu
            .bo_attach(bo, NIC, ImporterKind::Dynamic, true)
            .await
            .unwrap();
        gpu.bo_evict(bo).await.unwrap();
        let _ = gpu.bo_dma(att, 0, PAGE_SIZE, Some(&pattern(1, 3))).await;
    });
    assert_ne!(
        outcome,
        RunOutcome::Completed,
        "the violation stops the run"
    );
    let v = w.k.oracle_violations();
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(v[0].kind, ViolationKind::UseAfterFree);
}

/// A window move invalidates every peer mapping of the pages that left the window, and the GPU's TLB.
#[test]
fn window_move_invalidates_peer_mappings_of_the_buffer_that_left() {
    let w = world(16, Some(4), 1);
    let (a_kind_after, b_placement, a_placement) = w.run_clean(|gpu, _| async move {
        let a = gpu.bo_create(4 * PAGE_SIZE).unwrap();
        let b = gpu.bo_create(4 * PAGE_SIZE).unwrap();
        assert_eq!(gpu.bo_placement(a).unwrap(), Placement::Window);
        assert_eq!(gpu.bo_placement(b).unwrap(), Placement::Hidden);
        gpu.bo_write(a, 0, &pattern(4, 5)).await.unwrap();
        let att_a = gpu
            .bo_attach(a, NIC, ImporterKind::Dynamic, false)
            .await
            .unwrap();
        let att_n = gpu
            .bo_attach(a, NVME, ImporterKind::Dynamic, false)
            .await
            .unwrap();
        gpu.bo_set_visible(b, true).await.unwrap();
        assert!(!gpu.bo_is_mapped(att_a), "the NIC's mapping of A is gone");
        assert!(!gpu.bo_is_mapped(att_n), "the NVMe's mapping of A is gone");
        let b_placement = gpu.bo_placement(b).unwrap();
        // The importer's next access brings A back into the window (B leaves it).
        let data = gpu.bo_dma(att_a, 0, 4 * PAGE_SIZE, None).await.unwrap();
        assert_eq!(data, pattern(4, 5));
        (
            kinds(&gpu, att_a),
            b_placement,
            gpu.bo_placement(a).unwrap(),
        )
    });
    assert_eq!(b_placement, Placement::Window);
    assert_eq!(a_placement, Placement::Window);
    assert_eq!(a_kind_after, [SegKind::P2pBusAddr]);
    assert_eq!(
        w.count("dmabuf.move_notify"),
        4,
        "A's two importers at each of A's two moves (out, back in); B has none"
    );
    assert_eq!(w.count("gpu.bo_moves_out_of_window"), 2);
}

/// A pinned importer is revoked when its buffer is evicted: unmapped, and `ENODEV` afterwards.
#[test]
fn pinned_importer_is_revoked_by_eviction() {
    let w = world(16, Some(8), 1);
    let (mapped, revoked, err) = w.run_clean(|gpu, _| async move {
        let bo = gpu.bo_create(2 * PAGE_SIZE).unwrap();
        let att = gpu
            .bo_attach(bo, NIC, ImporterKind::Pinned, true)
            .await
            .unwrap();
        gpu.bo_dma(att, 0, PAGE_SIZE, None).await.unwrap();
        gpu.bo_evict(bo).await.unwrap();
        let err = gpu.bo_dma(att, 0, PAGE_SIZE, None).await.unwrap_err();
        (gpu.bo_is_mapped(att), gpu.bo_is_revoked(att), err)
    });
    assert!(!mapped);
    assert!(revoked);
    assert_eq!(err, GpuError::Errno(Errno::ENODEV));
    assert_eq!(w.count("dmabuf.revoked_importers"), 1);
}

/// `ttm_bo_validate` under oversubscription evicts the least recently used buffer, whose importer then
/// follows it to RAM.
#[test]
fn validation_under_oversubscription_evicts_the_lru_buffer() {
    let w = world(8, None, 1);
    let (a_place, b_place, kind) = w.run_clean(|gpu, _| async move {
        let a = gpu.bo_create(4 * PAGE_SIZE).unwrap();
        let b = gpu.bo_create(4 * PAGE_SIZE).unwrap();
        let c = gpu.bo_create(4 * PAGE_SIZE).unwrap();
        assert_eq!(gpu.bo_placement(c).unwrap(), Placement::System, "VRAM full");
        gpu.bo_write(b, 0, &pattern(4, 2)).await.unwrap(); // B is more recently used than A
        let att = gpu
            .bo_attach(a, NIC, ImporterKind::Dynamic, false)
            .await
            .unwrap();
        gpu.bo_write(b, 0, &pattern(4, 2)).await.unwrap();
        gpu.bo_validate(c).await.unwrap();
        let _ = gpu.bo_dma(att, 0, PAGE_SIZE, None).await.unwrap();
        (
            gpu.bo_placement(a).unwrap(),
            gpu.bo_placement(b).unwrap(),
            kinds(&gpu, att),
        )
    });
    assert_eq!(a_place, Placement::System);
    assert_eq!(b_place, Placement::Window);
    assert_eq!(kind, [SegKind::Ram]);
    assert_eq!(w.count("gpu.bo_lru_evictions"), 1);
}

/// A resizable BAR shows the whole VRAM: nothing is ever invisible.
#[test]
fn resizable_bar_window_is_the_whole_vram() {
    let w = world(8, None, 1);
    assert_eq!(w.gpu.window_pages(), 8);
    let placements = w.run_clean(|gpu, _| async move {
        let a = gpu.bo_create(8 * PAGE_SIZE).unwrap();
        gpu.bo_placement(a).unwrap()
    });
    assert_eq!(placements, Placement::Window);
}

/// Eviction under a live dynamic importer, explored over many seeds with DMA in flight: clean.
#[test]
fn eviction_under_importer_is_clean_over_many_seeds() {
    for seed in 0..16 {
        let w = world(16, Some(8), seed);
        w.run_clean(|gpu, _| async move {
            let bo = gpu.bo_create(4 * PAGE_SIZE).unwrap();
            gpu.bo_write(bo, 0, &pattern(4, 1)).await.unwrap();
            let att = gpu
                .bo_attach(bo, NIC, ImporterKind::Dynamic, true)
                .await
                .unwrap();
            for round in 0..3u8 {
                gpu.bo_dma(att, 0, 4 * PAGE_SIZE, Some(&pattern(4, round)))
                    .await
                    .unwrap();
                gpu.bo_evict(bo).await.unwrap();
                assert_eq!(
                    gpu.bo_dma(att, 0, 4 * PAGE_SIZE, None).await.unwrap(),
                    pattern(4, round)
                );
                gpu.bo_validate(bo).await.unwrap();
            }
        });
    }
}

// ------------------------------------------------------------------ the CPU mapping of a buffer (bo.rs step 0)

/// A test notifier: records each invalidation's event and range.
struct Recorder(
    Rc<RefCell<Vec<(peerdma_mm::NotifierEvent, u64)>>>,
    Rc<Kernel>,
);

impl peerdma_mm::IntervalNotifierOps for Recorder {
    fn invalidate<'a>(
        &'a self,
        id: peerdma_mm::NotifierId,
        range: &'a peerdma_mm::NotifierRange,
        cur_seq: u64,
    ) -> std::pin::Pin<Box<dyn Future<Output = bool> + 'a>> {
        Box::pin(async move {
            self.1.interval_set_seq(range.mm, id, cur_seq);
            self.0
                .borrow_mut()
                .push((range.event, range.range.len() / PAGE_SIZE));
            true
        })
    }
    fn name(&self) -> String {
        "recorder".into()
    }
}

/// The CPU's mapping of a buffer follows it: stores through the mapping land in the window page, an eviction
/// zaps the mapping (the notifier over it fires, CLEAR) and the next load faults in the system page with the
/// data intact; a window move (another buffer takes the window) zaps it again and the next access faults
/// the buffer back into the window.
#[test]
fn cpu_mapping_follows_eviction_and_window_moves() {
    let w = world(16, Some(4), 1);
    let (phases, events, retry) = w.run_clean(|gpu, k| async move {
        let pid = k.create_process();
        let a = gpu.bo_create(4 * PAGE_SIZE).unwrap();
        let b = gpu.bo_create(4 * PAGE_SIZE).unwrap();
        let va = gpu.bo_mmap(pid, a, peerdma_mm::Prot::RW).await.unwrap();
        let seen = Rc::new(RefCell::new(Vec::new()));
        let nid = k
            .interval_notifier_insert(
                pid,
                va,
                4 * PAGE_SIZE,
                Rc::new(Recorder(seen.clone(), k.clone())),
            )
            .unwrap();
        let seq = k.interval_read_begin(pid, nid).await;
        let where_is = |k: &Kernel| {
            k.translate(pid, va)
                .map(|(f, _)| (k.memory_kind(f), k.frame_pa(f)))
        };
        k.store(pid, va, &pattern(4, 2)).await.unwrap();
        let in_window = where_is(&k);
        assert_eq!(
            gpu.bo_read(a, 0, 4 * PAGE_SIZE).await.unwrap(),
            pattern(4, 2)
        );
        gpu.bo_evict(a).await.unwrap();
        assert!(
            k.translate(pid, va).is_none(),
            "the eviction zapped the CPU mapping"
        );
        let retry = k.interval_read_retry(pid, nid, seq);
        let mut buf = vec![0u8; 4 * PG];
        k.load(pid, va, &mut buf).await.unwrap();
        assert_eq!(buf, pattern(4, 2), "the data moved with the buffer");
        let in_system = where_is(&k);
        k.store(pid, va.add(PAGE_SIZE), &pattern(1, 6))
            .await
            .unwrap();
        gpu.bo_validate(a).await.unwrap();
        assert!(k.translate(pid, va).is_none());
        k.load(pid, va, &mut buf).await.unwrap();
        let back = where_is(&k);
        // B takes the window: A leaves it, its mapping is zapped; a CPU access faults A back in.
        gpu.bo_set_visible(b, true).await.unwrap();
        assert_eq!(gpu.bo_placement(a).unwrap(), Placement::Hidden);
        assert!(
            k.translate(pid, va).is_none(),
            "the window move zapped the CPU mapping"
        );
        k.load(pid, va, &mut buf).await.unwrap();
        let mut want = pattern(4, 2);
        want[PG..2 * PG].copy_from_slice(&pattern(1, 6));
        assert_eq!(buf, want);
        let refaulted = (gpu.bo_placement(a).unwrap(), gpu.bo_placement(b).unwrap());
        let ev = seen.borrow().clone();
        ((in_window, in_system, back, refaulted), ev, retry)
    });
    let (in_window, in_system, back, refaulted) = phases;
    let is_window = |x: Option<(MemoryKind, Pa)>| matches!(x, Some((MemoryKind::P2pMem { .. }, pa)) if pa.raw() >= BAR_PHYS && pa.raw() < BAR_PHYS + 4 * PAGE_SIZE);
    assert!(is_window(in_window), "{in_window:?}");
    assert!(
        matches!(in_system, Some((MemoryKind::Ram { .. }, _))),
        "{in_system:?}"
    );
    assert!(is_window(back), "{back:?}");
    assert_eq!(refaulted, (Placement::Window, Placement::Hidden));
    assert!(
        retry,
        "the notifier's sequence moved: a mirror of the range must retry"
    );
    assert!(
        events.len() == 3
            && events
                .iter()
                .all(|(e, _)| *e == peerdma_mm::NotifierEvent::Clear),
        "{events:?}"
    );
    assert_eq!(
        w.count("vm_object.faults"),
        4 * 4,
        "every page faults after the mapping and after each of the three moves"
    );
    assert_eq!(
        w.count("gpu.bo_fault_moves"),
        1,
        "the last fault brought A back into the window"
    );
}

/// A window move invalidates every CPU and peer mapping of the pages that left the window — and only
/// those: A (least recently used) leaves the window for B; A's CPU mappings in two processes are zapped and
/// its three importer attachments unmapped, while C, which stays in the window, keeps its CPU entry and its
/// importer's mapping. Every stale holder then refaults at A's new place with the data intact.
#[test]
fn window_move_invalidates_every_cpu_and_peer_mapping_of_the_pages_that_left() {
    let w = world(16, Some(8), 1);
    let (a_gone, c_kept, a_back) = w.run_clean(|gpu, k| async move {
        let (p1, p2) = (k.create_process(), k.create_process());
        let a = gpu.bo_create(4 * PAGE_SIZE).unwrap();
        let c = gpu.bo_create(4 * PAGE_SIZE).unwrap();
        let b = gpu.bo_create(4 * PAGE_SIZE).unwrap();
        assert_eq!(gpu.bo_placement(b).unwrap(), Placement::Hidden);
        let va1 = gpu.bo_mmap(p1, a, peerdma_mm::Prot::RW).await.unwrap();
        let va2 = gpu.bo_mmap(p2, a, peerdma_mm::Prot::RW).await.unwrap();
        let vc = gpu.bo_mmap(p1, c, peerdma_mm::Prot::RW).await.unwrap();
        k.store(p1, va1, &pattern(4, 3)).await.unwrap();
        let mut buf = vec![0u8; 4 * PG];
        k.load(p2, va2, &mut buf).await.unwrap();
        let mut a_atts = Vec::new();
        for (dev, write) in [(NIC, true), (NVME, false), (NIC, false)] {
            let att = gpu
                .bo_attach(a, dev, ImporterKind::Dynamic, write)
                .await
                .unwrap();
            gpu.bo_dma(att, 0, 4 * PAGE_SIZE, None).await.unwrap();
            a_atts.push(att);
        }
        let c_att = gpu
            .bo_attach(c, NIC, ImporterKind::Dynamic, false)
            .await
            .unwrap();
        gpu.bo_dma(c_att, 0, PAGE_SIZE, None).await.unwrap();
        k.store(p1, vc, &pattern(1, 9)).await.unwrap();
        // B takes the window: A (least recently used) leaves it.
        gpu.bo_set_visible(b, true).await.unwrap();
        assert_eq!(gpu.bo_placement(a).unwrap(), Placement::Hidden);
        assert_eq!(gpu.bo_placement(c).unwrap(), Placement::Window);
        let a_gone = (
            (0..4).all(|i| k.translate(p1, va1.add(i * PAGE_SIZE)).is_none()),
            (0..4).all(|i| k.translate(p2, va2.add(i * PAGE_SIZE)).is_none()),
            a_atts.iter().all(|&att| !gpu.bo_is_mapped(att)),
        );
        let c_kept = (
            k.translate(p1, vc).is_some(),
            gpu.bo_is_mapped(c_att),
            k.sim.metrics().get("dmabuf.move_notify"),
        );
        // Every stale holder refaults at A's new place, the data intact.
        let mut back = Vec::new();
        for &att in &a_atts {
            back.push(gpu.bo_dma(att, 0, 4 * PAGE_SIZE, None).await.unwrap() == pattern(4, 3));
        }
        k.load(p2, va2, &mut buf).await.unwrap();
        back.push(buf == pattern(4, 3));
        (a_gone, c_kept, back)
    });
    assert_eq!(
        a_gone,
        (true, true, true),
        "A's CPU mappings (both processes) and importers"
    );
    assert_eq!(
        c_kept,
        (true, true, 3),
        "C stayed in the window: untouched; A's three importers were told, C's not"
    );
    assert!(a_back.iter().all(|&ok| ok), "{a_back:?}");
}

/// A buffer pushed out of the window goes to invisible VRAM only when that has room for it; otherwise to
/// system pages, and the buffers in invisible VRAM stay (amdgpu_evict_flags).
#[test]
fn window_victim_goes_to_invisible_vram_only_when_it_fits() {
    let w = world(8, Some(4), 1);
    let places = w.run_clean(|gpu, _| async move {
        let a = gpu.bo_create(4 * PAGE_SIZE).unwrap();
        let x = gpu.bo_create(2 * PAGE_SIZE).unwrap();
        let b = gpu.bo_create(2 * PAGE_SIZE).unwrap();
        gpu.bo_evict(b).await.unwrap();
        // Invisible VRAM has two free pages: B (two pages) would fit there, A (four) does not.
        gpu.bo_set_visible(b, true).await.unwrap();
        [a, x, b].map(|bo| gpu.bo_placement(bo).unwrap())
    });
    assert_eq!(
        places,
        [Placement::System, Placement::Hidden, Placement::Window]
    );
    assert_eq!(w.count("gpu.bo_evictions"), 2, "B's eviction, then A's");
}

/// The buffer's CPU entries are special (`vmf_insert_pfn_prot`): GUP refuses them, and a mirror's
/// `hmm_range_fault` reports them as errors, so the mirror holds nothing of them; its notifier still fires.
#[test]
fn cpu_mapping_of_a_buffer_is_not_gupable() {
    let w = world(16, Some(8), 1);
    let r = w.run_clean(|gpu, k| async move {
        let pid = k.create_process();
        let a = gpu.bo_create(2 * PAGE_SIZE).unwrap();
        let va = gpu.bo_mmap(pid, a, peerdma_mm::Prot::RW).await.unwrap();
        k.store(pid, va, b"x").await.unwrap();
        let peer = DmirrorDevice::new(
            &k,
            DeviceId(8),
            DmirrorMemory::Private,
            1 << 20,
            DmirrorCosts::zero(),
        );
        let fd = peerdma_devices::Dmirror::open(&peer, pid).unwrap();
        fd.read(va, 1)
            .await
            .map(|_| ())
            .map_err(|e| format!("{e:?}"))
    });
    assert!(r.is_err(), "{r:?}");
}

/// The test-only switch: a move that skips zapping the CPU mapping leaves the process a stale entry to a
/// freed window page, and the oracle reports its next access.
#[test]
fn skipping_the_cpu_unmap_is_caught_by_the_oracle() {
    let w = world(16, Some(8), 1);
    w.gpu.inject(GpuInjection::SkipCpuUnmap);
    let (_, outcome) = w.run(|gpu, k| async move {
        let pid = k.create_process();
        let a = gpu.bo_create(2 * PAGE_SIZE).unwrap();
        let va = gpu.bo_mmap(pid, a, peerdma_mm::Prot::RW).await.unwrap();
        k.store(pid, va, b"x").await.unwrap();
        gpu.bo_evict(a).await.unwrap();
        let mut b = [0u8; 1];
        let _ = k.load(pid, va, &mut b).await;
    });
    assert_ne!(outcome, RunOutcome::Completed);
    let v = w.k.oracle_violations();
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(v[0].kind, ViolationKind::UseAfterFree);
}
