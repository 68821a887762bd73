//! The `gpu` device's managed memory: UVM fault servicing (gpu/uvm.rs steps 1–8), peers of managed pages, and
//! the beyond-mainline P2P option.
#![expect(
    clippy::tests_outside_test_module,
    clippy::unwrap_used,
    reason = "an integration-test crate is all tests"
)]

mod common;

use std::cell::RefCell;
use std::future::Future;
use std::rc::Rc;

use peerdma_core::{DeviceId, Errno, PAGE_SIZE};
use peerdma_devices::gpu::{AccessPattern, GpuError, ManagedRange};
use peerdma_devices::{DmirrorCosts, DmirrorDevice, DmirrorMemory};
use peerdma_dma::SegKind;
use peerdma_mm::{Kernel, MemoryKind, MmCosts};
use peerdma_sim::{RngStream, RunOutcome, Sim, SimConfig};

use common::*;

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

/// A page the CPU pulls back from a GPU's managed pool costs the GPU one TLB invalidation (its entry is
/// unmapped before the copy); the migration to the GPU costs none.
#[test]
fn a_cpu_pull_back_invalidates_the_gpu_tlb() {
    let wld = world(16, Some(8), 1);
    let (after_kernel, after_load) = wld.run_clean(move |gpu, k| async move {
        let pool = gpu
            .managed_pool(8 * PAGE_SIZE, DmirrorCosts::zero(), false)
            .unwrap();
        let pid = k.create_process();
        let managed = ManagedRange::new(&k, &pool, pid, 4 * PAGE_SIZE, uvm_cfg(8 << 20, false))
            .await
            .unwrap();
        let mut rng = RngStream::new(1, "k");
        managed
            .run_kernel(&kernel(AccessPattern::Sequential, 4, 1, false), &mut rng)
            .await
            .unwrap();
        let tlb = |k: &Kernel| k.sim.metrics().get("gpu.tlb_invalidations");
        let after_kernel = tlb(&k);
        let mut buf = [0u8; 4];
        k.load(pid, managed.start().add(PAGE_SIZE), &mut buf)
            .await
            .unwrap();
        (after_kernel, tlb(&k))
    });
    assert_eq!(after_kernel, 0);
    assert_eq!(after_load, 1);
}
