//! The `gpu` device: buffer objects that move under their dma-buf importers (gpu/bo.rs steps 1–4) and
//! managed memory with UVM fault servicing (gpu/uvm.rs steps 1–8).
#![expect(
    clippy::tests_outside_test_module,
    clippy::unwrap_used,
    reason = "an integration-test crate is all tests"
)]

use std::cell::RefCell;
use std::future::Future;
use std::rc::Rc;

use peerdma_core::timing::Timing;
use peerdma_core::{Bdf, DeviceId, Errno, PAGE_SIZE, Pa};
use peerdma_devices::gpu::{
    AccessPattern, Gpu, GpuConfig, GpuCosts, GpuError, GpuInjection, KernelSpec, ManagedRange,
    Placement, UvmConfig, UvmCosts,
};
use peerdma_devices::{DmirrorCosts, DmirrorDevice, DmirrorMemory};
use peerdma_dma::{DmaCosts, ImporterKind, Platform, SegKind};
use peerdma_iommu::{DomainConfig, DomainType};
use peerdma_mm::oracle::ViolationKind;
use peerdma_mm::{Kernel, MemoryKind, MmCosts};
use peerdma_pci::topology::{Bar, TopologyBuilder, WhitelistEntry};
use peerdma_sim::{RngStream, RunOutcome, Sim, SimConfig};

const NIC: DeviceId = DeviceId(1);
const GPU: DeviceId = DeviceId(2);
const NVME: DeviceId = DeviceId(3);
const BAR_PHYS: u64 = 0x40_0000_0000;
const PG: usize = 4096;

struct World {
    sim: Sim,
    k: Rc<Kernel>,
    gpu: Rc<Gpu>,
}

/// hb0 ── rp0 ── up ─┬─ dn0 ── gpu (BAR0: the VRAM window)
///                   ├─ dn1 ── nic (DMA domain)
///                   └─ dn2 ── nvme (identity domain)
fn world(vram_pages: u64, window_pages: Option<u64>, seed: u64) -> World {
    let sim = Sim::new(SimConfig {
        seed,
        explore: true,
        ..SimConfig::default()
    });
    let k = Kernel::new(&sim, 64 << 20, MmCosts::zero());
    let mut b = TopologyBuilder::new();
    b.host_bridge("hb0", WhitelistEntry::Unrestricted);
    b.root_port("rp0", "hb0").bdf(Bdf::new(0, 1, 0).unwrap());
    b.switch_upstream("up", "rp0")
        .bdf(Bdf::new(1, 0, 0).unwrap());
    for (i, n) in ["dn0", "dn1", "dn2"].iter().enumerate() {
        b.switch_downstream(n, "up")
            .bdf(Bdf::new(2, u8::try_from(i).unwrap(), 0).unwrap());
    }
    b.endpoint("gpu", "dn0", Bdf::new(3, 0, 0).unwrap())
        .bar(Bar {
            index: 0,
            size: vram_pages * PAGE_SIZE,
            phys: Pa::from_raw(BAR_PHYS),
            bus_offset: 0,
            prefetchable: true,
        });
    b.endpoint("nic", "dn1", Bdf::new(4, 0, 0).unwrap());
    b.endpoint("nvme", "dn2", Bdf::new(5, 0, 0).unwrap());
    let p = Platform::new(k.clone(), b.build().unwrap(), DmaCosts::zero());
    let node = |n: &str| p.topology().lookup(n).unwrap();
    p.add_device(
        NIC,
        node("nic"),
        "nic",
        DomainConfig::with_type(DomainType::Dma),
    )
    .unwrap();
    p.add_device(
        NVME,
        node("nvme"),
        "nvme",
        DomainConfig::with_type(DomainType::Identity),
    )
    .unwrap();
    p.add_device(
        GPU,
        node("gpu"),
        "gpu",
        DomainConfig::with_type(DomainType::Identity),
    )
    .unwrap();
    let gpu = Gpu::new(
        &p,
        GPU,
        GpuConfig {
            vram: vram_pages * PAGE_SIZE,
            bar: 0,
            window: window_pages.map(|w| w * PAGE_SIZE),
            costs: GpuCosts::zero(),
        },
    )
    .unwrap();
    World { sim, k, gpu }
}

impl World {
    /// Runs `f` as the only agent and returns its result and the run's outcome.
    fn run<T: 'static, F: Future<Output = T> + 'static>(
        &self,
        f: impl FnOnce(Rc<Gpu>, Rc<Kernel>) -> F,
    ) -> (Option<T>, RunOutcome) {
        let out = Rc::new(RefCell::new(None));
        let (o, fut) = (out.clone(), f(self.gpu.clone(), self.k.clone()));
        self.sim
            .spawn("test", async move { *o.borrow_mut() = Some(fut.await) });
        let outcome = self.sim.run();
        (out.borrow_mut().take(), outcome)
    }

    fn run_clean<T: 'static, F: Future<Output = T> + 'static>(
        &self,
        f: impl FnOnce(Rc<Gpu>, Rc<Kernel>) -> F,
    ) -> T {
        let (v, outcome) = self.run(f);
        assert_eq!(outcome, RunOutcome::Completed);
        let violations = self.k.oracle_violations();
        assert!(violations.is_empty(), "oracle: {violations:?}");
        v.unwrap()
    }

    fn count(&self, name: &str) -> u64 {
        self.sim.metrics().get(name)
    }
}

fn pattern(n: u64, salt: u8) -> Vec<u8> {
    (0..n * PAGE_SIZE).map(|i| (i % 251) as u8 ^ salt).collect()
}

fn kinds(gpu: &Gpu, att: peerdma_devices::gpu::BoAttach) -> Vec<SegKind> {
    gpu.bo_segments(att).iter().map(|s| s.kind).collect()
}

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

// ---- managed memory (UVM) ----

struct Uvm {
    sim: Sim,
    k: Rc<Kernel>,
    pool: Rc<DmirrorDevice>,
}

fn uvm_world() -> Uvm {
    let sim = Sim::new(SimConfig::default());
    let k = Kernel::new(&sim, 128 << 20, MmCosts::zero());
    let pool = DmirrorDevice::new(
        &k,
        DeviceId(7),
        DmirrorMemory::Private,
        16 << 20,
        DmirrorCosts::zero(),
    );
    Uvm { sim, k, pool }
}

fn uvm_cfg(capacity: u64, prefetch: bool) -> UvmConfig {
    let mut c = UvmConfig::new(capacity, UvmCosts::from_timing(&Timing::zero()));
    c.prefetch = prefetch;
    c
}

fn kernel(pattern: AccessPattern, nr_accesses: u64, warps: u32, write: bool) -> KernelSpec {
    KernelSpec {
        pattern,
        nr_accesses,
        warps,
        write,
        fatal_at: None,
    }
}

impl Uvm {
    fn run<T: 'static, F: Future<Output = T> + 'static>(
        &self,
        f: impl FnOnce(Rc<Kernel>, Rc<DmirrorDevice>) -> F,
    ) -> T {
        let out = Rc::new(RefCell::new(None));
        let (o, fut) = (out.clone(), f(self.k.clone(), self.pool.clone()));
        self.sim
            .spawn("test", async move { *o.borrow_mut() = Some(fut.await) });
        assert_eq!(self.sim.run(), RunOutcome::Completed);
        let violations = self.k.oracle_violations();
        assert!(violations.is_empty(), "oracle: {violations:?}");
        out.borrow_mut().take().unwrap()
    }
}

/// Step 3: N faults to one page in a batch are serviced once, then one replay lets every warp through.
#[test]
fn faults_to_one_page_are_serviced_once() {
    let u = uvm_world();
    let s = u.run(|k, pool| async move {
        let pid = k.create_process();
        let r = ManagedRange::new(&k, &pool, pid, 64 * PAGE_SIZE, uvm_cfg(8 << 20, false))
            .await
            .unwrap();
        let hot = AccessPattern::HotSet {
            hot_pages: 1,
            hot_percent: 100,
        };
        let mut rng = RngStream::new(1, "k");
        r.run_kernel(&kernel(hot, 32, 8, false), &mut rng)
            .await
            .unwrap()
    });
    assert_eq!(s.faults, 8, "each warp faults once on the page");
    assert_eq!(s.duplicate_faults, 7);
    assert_eq!(s.pages_migrated, 1);
    assert_eq!(s.batches, 1);
    assert_eq!(s.replays, 1);
    assert_eq!(s.local_hits, 32);
}

/// Step 4: a fatal fault cancels the context: the kernel stops and later kernels get `ENODEV`.
#[test]
fn fatal_fault_cancels_the_context() {
    let u = uvm_world();
    let (s, next) = u.run(|k, pool| async move {
        let pid = k.create_process();
        let r = ManagedRange::new(&k, &pool, pid, 64 * PAGE_SIZE, uvm_cfg(8 << 20, false))
            .await
            .unwrap();
        let mut spec = kernel(AccessPattern::Sequential, 64, 4, false);
        spec.fatal_at = Some(2);
        let mut rng = RngStream::new(1, "k");
        let s = r.run_kernel(&spec, &mut rng).await.unwrap();
        let next = r
            .run_kernel(&kernel(AccessPattern::Sequential, 4, 1, false), &mut rng)
            .await;
        (s, next)
    });
    assert!(s.cancelled);
    assert!(s.local_hits < 64, "the kernel did not finish");
    assert_eq!(next.unwrap_err(), GpuError::Errno(Errno::ENODEV));
}

/// Step 6: the tree prefetcher lowers the fault count of a sequential kernel.
#[test]
fn prefetch_lowers_the_fault_count() {
    let run = |prefetch: bool| {
        let u = uvm_world();
        u.run(move |k, pool| async move {
            let pid = k.create_process();
            let r = ManagedRange::new(&k, &pool, pid, 1024 * PAGE_SIZE, uvm_cfg(8 << 20, prefetch))
                .await
                .unwrap();
            let mut rng = RngStream::new(1, "k");
            r.run_kernel(&kernel(AccessPattern::Sequential, 1024, 4, false), &mut rng)
                .await
                .unwrap()
        })
    };
    let (off, on) = (run(false), run(true));
    assert_eq!(off.faults, 1024);
    assert!(
        on.faults < off.faults / 4,
        "prefetch {} vs {}",
        on.faults,
        off.faults
    );
    assert!(on.pages_prefetched > 0);
    assert_eq!(on.pages_migrated, 1024);
}

/// Step 7: a kernel over more than the pool evicts whole 2 MiB chunks, least recently used first.
#[test]
fn oversubscription_evicts_lru_chunks() {
    let u = uvm_world();
    let (s, resident) = u.run(|k, pool| async move {
        let pid = k.create_process();
        let r = ManagedRange::new(&k, &pool, pid, 3 * 512 * PAGE_SIZE, uvm_cfg(4 << 20, true))
            .await
            .unwrap();
        let mut rng = RngStream::new(1, "k");
        let s = r
            .run_kernel(
                &kernel(AccessPattern::Sequential, 3 * 512, 8, true),
                &mut rng,
            )
            .await
            .unwrap();
        (s, r.nr_resident())
    });
    assert!(s.chunks_evicted >= 1);
    assert_eq!(s.pages_evicted, 512 * s.chunks_evicted);
    assert!(resident <= 1024);
}

/// Step 1: a full fault buffer drops faults (overflow); the warps fault again after the replay.
#[test]
fn full_fault_buffer_overflows_and_warps_refault() {
    let u = uvm_world();
    let s = u.run(|k, pool| async move {
        let pid = k.create_process();
        let mut cfg = uvm_cfg(8 << 20, false);
        cfg.fault_buffer = 4;
        let r = ManagedRange::new(&k, &pool, pid, 64 * PAGE_SIZE, cfg)
            .await
            .unwrap();
        let mut rng = RngStream::new(1, "k");
        r.run_kernel(&kernel(AccessPattern::Sequential, 16, 16, false), &mut rng)
            .await
            .unwrap()
    });
    // Four faults fit per round, the rest overflow and fault again after the replay: 12 + 8 + 4.
    assert_eq!(s.overflows, 24);
    assert_eq!(
        s.faults, 16,
        "every page faults into the buffer once in the end"
    );
    assert_eq!(s.replays, 4);
    assert_eq!(s.batches, 4);
}

/// Step 5: read duplication copies read-faulted pages; a write to one invalidates its duplicate.
#[test]
fn read_duplicate_is_invalidated_by_a_write() {
    let u = uvm_world();
    let (read, write, dup_after) = u.run(|k, pool| async move {
        let pid = k.create_process();
        let mut cfg = uvm_cfg(8 << 20, false);
        cfg.read_duplication = true;
        let r = ManagedRange::new(&k, &pool, pid, 16 * PAGE_SIZE, cfg)
            .await
            .unwrap();
        let mut rng = RngStream::new(1, "k");
        let read = r
            .run_kernel(&kernel(AccessPattern::Sequential, 16, 2, false), &mut rng)
            .await
            .unwrap();
        assert!(r.is_duplicated(3));
        let write = r
            .run_kernel(&kernel(AccessPattern::Sequential, 4, 1, true), &mut rng)
            .await
            .unwrap();
        (read, write, r.is_duplicated(3))
    });
    assert_eq!(read.read_dup_pages, 16);
    assert_eq!(read.pages_migrated, 0);
    assert_eq!(write.read_dup_invalidations, 4);
    assert_eq!(write.pages_migrated, 4);
    assert!(!dup_after);
}

/// Step 5: accessed-by maps system pages remotely; nothing migrates and later hits are remote.
#[test]
fn accessed_by_maps_remotely_without_migrating() {
    let u = uvm_world();
    let s = u.run(|k, pool| async move {
        let pid = k.create_process();
        let mut cfg = uvm_cfg(8 << 20, false);
        cfg.accessed_by = true;
        let r = ManagedRange::new(&k, &pool, pid, 8 * PAGE_SIZE, cfg)
            .await
            .unwrap();
        let mut rng = RngStream::new(1, "k");
        r.run_kernel(&kernel(AccessPattern::Sequential, 32, 1, false), &mut rng)
            .await
            .unwrap()
    });
    assert_eq!(s.remote_maps, 8);
    assert_eq!(s.pages_migrated, 0);
    assert_eq!(s.remote_hits, 32);
}

/// Managed pages migrate to device-private memory on first touch, and a CPU access brings one back.
#[test]
fn first_touch_migrates_and_cpu_access_migrates_back() {
    let u = uvm_world();
    let (on_gpu, back, bytes) = u.run(|k, pool| async move {
        let pid = k.create_process();
        let r = ManagedRange::new(&k, &pool, pid, 4 * PAGE_SIZE, uvm_cfg(8 << 20, false))
            .await
            .unwrap();
        k.store(pid, r.start(), b"cpu").await.unwrap();
        let mut rng = RngStream::new(1, "k");
        r.run_kernel(&kernel(AccessPattern::Sequential, 4, 1, false), &mut rng)
            .await
            .unwrap();
        let kind = |k: &Kernel| k.translate(pid, r.start()).map(|(f, _)| k.memory_kind(f));
        let on_gpu = kind(&k);
        let mut buf = [0u8; 3];
        k.load(pid, r.start(), &mut buf).await.unwrap();
        (on_gpu, kind(&k), buf)
    });
    assert!(
        matches!(on_gpu, None | Some(MemoryKind::DevicePrivate { .. })),
        "{on_gpu:?}"
    );
    assert!(matches!(back, Some(MemoryKind::Ram { .. })), "{back:?}");
    assert_eq!(&bytes, b"cpu");
}

/// A peer's `hmm_range_fault` of a managed page the GPU holds migrates it back to RAM (mainline; the
/// beyond-mainline P2P translation is not modelled).
#[test]
fn peer_mirror_fault_migrates_a_managed_page_back() {
    let u = uvm_world();
    let (before, after, data) = u.run(|k, pool| async move {
        let pid = k.create_process();
        let r = ManagedRange::new(&k, &pool, pid, 4 * PAGE_SIZE, uvm_cfg(8 << 20, false))
            .await
            .unwrap();
        k.store(pid, r.start(), b"peer").await.unwrap();
        let mut rng = RngStream::new(1, "k");
        r.run_kernel(&kernel(AccessPattern::Sequential, 4, 1, false), &mut rng)
            .await
            .unwrap();
        let kind = |k: &Kernel| k.translate(pid, r.start()).map(|(f, _)| k.memory_kind(f));
        let before = kind(&k);
        let peer = DmirrorDevice::new(
            &k,
            DeviceId(8),
            DmirrorMemory::Private,
            1 << 20,
            DmirrorCosts::zero(),
        );
        let fd = peerdma_devices::Dmirror::open(&peer, pid).unwrap();
        let res = fd.read(r.start(), 1).await.unwrap();
        (before, kind(&k), res.data[..4].to_vec())
    });
    assert!(
        matches!(before, None | Some(MemoryKind::DevicePrivate { .. })),
        "{before:?}"
    );
    assert!(matches!(after, Some(MemoryKind::Ram { .. })), "{after:?}");
    assert_eq!(data, b"peer");
}

/// Migration to the GPU and eviction back under a live peer mirror: the GPU's migration invalidates the
/// peer's entries (notifiers fire), eviction brings the chunk back to RAM, the peer faults again and finds
/// the data, and the oracle stays clean.
#[test]
fn gpu_migration_and_eviction_invalidate_a_live_peer_mirror() {
    let u = uvm_world();
    let (before, after_migrate, evicted, data) = u.run(|k, pool| async move {
        let pid = k.create_process();
        // A pool of four pages: touching a second chunk evicts the first.
        let r = ManagedRange::new(
            &k,
            &pool,
            pid,
            1024 * PAGE_SIZE,
            uvm_cfg(4 * PAGE_SIZE, false),
        )
        .await
        .unwrap();
        k.store(pid, r.start(), b"shared").await.unwrap();
        let peer = DmirrorDevice::new(
            &k,
            DeviceId(8),
            DmirrorMemory::Private,
            1 << 20,
            DmirrorCosts::zero(),
        );
        let fd = peerdma_devices::Dmirror::open(&peer, pid).unwrap();
        fd.read(r.start(), 4).await.unwrap();
        let before = fd.nr_mirrored();
        let mut rng = RngStream::new(1, "k");
        r.run_kernel(&kernel(AccessPattern::Sequential, 4, 1, true), &mut rng)
            .await
            .unwrap();
        let after_migrate = fd.nr_mirrored();
        // Pages 0 and 512: the second is in another chunk, and the pool is full.
        let s = r
            .run_kernel(
                &kernel(AccessPattern::Strided { stride: 512 }, 2, 1, false),
                &mut rng,
            )
            .await
            .unwrap();
        let res = fd.read(r.start(), 1).await.unwrap();
        (
            before,
            after_migrate,
            s.chunks_evicted,
            res.data[..6].to_vec(),
        )
    });
    assert_eq!(before, 4);
    assert_eq!(
        after_migrate, 0,
        "the migration invalidated every peer entry of the pages"
    );
    assert_eq!(evicted, 1);
    assert_eq!(data, b"shared");
}
