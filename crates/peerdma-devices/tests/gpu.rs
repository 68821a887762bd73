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
    p: Rc<Platform>,
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
            // Twice the VRAM: room after the window for a managed pool the BAR shows (beyond mainline).
            size: 2 * vram_pages * PAGE_SIZE,
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
    World { sim, k, p, gpu }
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
    assert_eq!(
        u.sim.metrics().get("gpu.tlb_invalidations"),
        s.chunks_evicted,
        "one GPU TLB invalidation per evicted chunk"
    );
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

/// A page the CPU pulled back to RAM is no longer resident for the GPU: its next access faults and migrates
/// it again (UVM's view follows the GPU page table, which the CPU fault's notifier cleared).
#[test]
fn a_page_the_cpu_pulled_back_faults_again_on_the_gpu() {
    let u = uvm_world();
    let (first, second, kind) = u.run(|k, pool| async move {
        let pid = k.create_process();
        let r = ManagedRange::new(&k, &pool, pid, 4 * PAGE_SIZE, uvm_cfg(8 << 20, false))
            .await
            .unwrap();
        let mut rng = RngStream::new(1, "k");
        let spec = kernel(AccessPattern::Sequential, 4, 1, false);
        let first = r.run_kernel(&spec, &mut rng).await.unwrap();
        let mut buf = [0u8; 4];
        k.load(pid, r.start().add(PAGE_SIZE), &mut buf)
            .await
            .unwrap();
        let second = r.run_kernel(&spec, &mut rng).await.unwrap();
        let kind = k
            .translate(pid, r.start().add(PAGE_SIZE))
            .map(|(f, _)| k.memory_kind(f));
        (first, second, kind)
    });
    assert_eq!((first.faults, first.pages_migrated), (4, 4));
    assert_eq!(
        (second.faults, second.pages_migrated, second.local_hits),
        (1, 1, 4),
        "only the pulled-back page faults, and migrates again"
    );
    assert!(
        matches!(kind, None | Some(MemoryKind::DevicePrivate { .. })),
        "{kind:?}"
    );
    assert_eq!(u.sim.metrics().get("uvm.pulled_back_pages"), 1);
}

/// A peer's `hmm_range_fault` of a managed page the GPU holds migrates it back to RAM (mainline; the
/// beyond-mainline P2P translation is off by default).
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

// ------------------------------------------------------------ beyond mainline: P2P to device-private pages

/// The beyond-mainline option (the unmerged HMM P2P series): off by default, a peer's `hmm_range_fault` on a
/// managed page the GPU holds migrates it back to RAM and the peer maps RAM; on, the peer gets the page's
/// BAR (bus) address and the page stays in VRAM — and the GPU's eviction of its chunk invalidates the peer,
/// which then faults the page in from RAM, data intact, oracle clean.
#[test]
fn beyond_mainline_p2p_translation_of_device_private_pages() {
    let mut seen = Vec::new();
    for on in [false, true] {
        let wld = world(16, Some(8), 1);
        let plat = wld.p.clone();
        let out = wld.run_clean(move |gpu, k| async move {
            let pool = gpu
                .managed_pool(8 * PAGE_SIZE, DmirrorCosts::zero(), on)
                .unwrap();
            let pid = k.create_process();
            let managed = ManagedRange::new(
                &k,
                &pool,
                pid,
                1024 * PAGE_SIZE,
                uvm_cfg(4 * PAGE_SIZE, false),
            )
            .await
            .unwrap();
            k.store(pid, managed.start(), b"vram").await.unwrap();
            let mut rng = RngStream::new(1, "k");
            managed
                .run_kernel(&kernel(AccessPattern::Sequential, 4, 1, true), &mut rng)
                .await
                .unwrap();
            let kind = |k: &Kernel| {
                k.translate(pid, managed.start())
                    .map(|(f, _)| k.memory_kind(f))
            };
            let dev_private =
                |k: &Kernel| matches!(kind(k), None | Some(MemoryKind::DevicePrivate { .. }));
            assert!(dev_private(&k), "the kernel migrated the page to the GPU");
            let range = peerdma_core::Range::from_len(managed.start(), 4 * PAGE_SIZE).unwrap();
            let mirror =
                peerdma_dma::DmaMirror::register(&plat, plat.device(NIC).unwrap(), pid, range)
                    .unwrap();
            let mut buf = vec![0u8; PG];
            mirror.read_page(managed.start(), &mut buf).await.unwrap();
            assert_eq!(&buf[..4], b"vram");
            let stayed = dev_private(&k);
            let segs: Vec<SegKind> = mirror.segments().iter().map(|s| s.kind).collect();
            // Pages 0 and 512: the second is in another chunk and the pool is full — chunk 0 is evicted.
            let stats = managed
                .run_kernel(
                    &kernel(AccessPattern::Strided { stride: 512 }, 2, 1, false),
                    &mut rng,
                )
                .await
                .unwrap();
            let after_evict = mirror.nr_mapped();
            mirror.read_page(managed.start(), &mut buf).await.unwrap();
            assert_eq!(&buf[..4], b"vram");
            let segs_after: Vec<SegKind> = mirror.segments().iter().map(|s| s.kind).collect();
            (stayed, segs, stats.chunks_evicted, after_evict, segs_after)
        });
        seen.push(out);
    }
    let (off, on) = (&seen[0], &seen[1]);
    assert!(
        !off.0,
        "off (mainline): the peer's fault migrated the page back to RAM"
    );
    assert_eq!(off.1, [SegKind::Ram]);
    assert!(on.0, "on: the page stayed in VRAM");
    assert_eq!(
        on.1,
        [SegKind::P2pBusAddr],
        "on: the peer holds the page's bus address"
    );
    assert_eq!(on.2, 1, "the GPU evicted the chunk");
    assert_eq!(on.3, 0, "the eviction invalidated the peer's P2P entry");
    assert_eq!(on.4, [SegKind::Ram], "the peer refaulted the page in RAM");
}

/// The beyond-mainline option under races, over many seeds: a NIC reads a managed page by P2P while the GPU
/// moves its chunk out and back (explicit prefetches of the other chunk evict it; the migrations take their
/// calibrated time, the NIC's reads are spread over them); every read finds the data,
/// the NIC's entries follow the page (bus address while it is in VRAM, RAM after eviction), and the oracle
/// sees no stale translation.
#[test]
fn beyond_mainline_p2p_follows_evictions_over_many_seeds() {
    let mut kinds_seen = std::collections::BTreeSet::new();
    for seed in 0..24 {
        let wld = world(16, Some(8), seed);
        let plat = wld.p.clone();
        let seen = wld.run_clean(move |gpu, k| async move {
            let pool = gpu
                .managed_pool(8 * PAGE_SIZE, DmirrorCosts::calibrated(), true)
                .unwrap();
            let pid = k.create_process();
            let managed = ManagedRange::new(
                &k,
                &pool,
                pid,
                1024 * PAGE_SIZE,
                uvm_cfg(4 * PAGE_SIZE, false),
            )
            .await
            .unwrap();
            k.store(pid, managed.start(), b"vram").await.unwrap();
            managed.prefetch(0, 4).await.unwrap();
            let range = peerdma_core::Range::from_len(managed.start(), PAGE_SIZE).unwrap();
            let mirror = Rc::new(
                peerdma_dma::DmaMirror::register(&plat, plat.device(NIC).unwrap(), pid, range)
                    .unwrap(),
            );
            let seen = Rc::new(RefCell::new(Vec::new()));
            let (m, s, start) = (mirror.clone(), seen.clone(), managed.start());
            let m_k = k.clone();
            k.sim.spawn("nic", async move {
                for _ in 0..24 {
                    let mut buf = vec![0u8; PG];
                    m.read_page(start, &mut buf).await.unwrap();
                    let kinds: Vec<SegKind> = m.segments().iter().map(|g| g.kind).collect();
                    s.borrow_mut().push((buf[..4].to_vec(), kinds));
                    // Spread the reads over the GPU's moves.
                    m_k.sim
                        .sleep(peerdma_core::SimDuration::from_nanos(1_700))
                        .await;
                }
            });
            for _ in 0..4 {
                managed.prefetch(512, 4).await.unwrap();
                managed.prefetch(0, 4).await.unwrap();
            }
            seen
        });
        for (data, kinds) in seen.borrow().iter() {
            assert_eq!(data, b"vram", "seed {seed}");
            kinds_seen.extend(kinds.iter().copied());
        }
    }
    assert!(
        kinds_seen.contains(&SegKind::P2pBusAddr) && kinds_seen.contains(&SegKind::Ram),
        "the NIC's entry followed the page both ways: {kinds_seen:?}"
    );
}
