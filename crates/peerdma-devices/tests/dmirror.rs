//! End-to-end tests of the dmirror model against the kernel model: counters of spec/linux-hmm.md §3 and the
//! oracle catching a broken mirror.
#![expect(
    clippy::tests_outside_test_module,
    clippy::unwrap_used,
    reason = "an integration-test crate is all tests"
)]

use std::cell::RefCell;
use std::rc::Rc;

use peerdma_core::{DeviceId, Errno, PAGE_SIZE, SimDuration, SimTime, Va};
use peerdma_devices::{
    Dmirror, DmirrorCosts, DmirrorDevice, DmirrorMemory, DmirrorResult, FaultInjection,
};
use peerdma_mm::{Kernel, MmCosts, MmapArgs, Prot};
use peerdma_sim::{RunOutcome, Sim, SimConfig};

const N: u64 = 1024;

fn setup(seed: u64, explore: bool, calibrated: bool) -> (Sim, Rc<Kernel>) {
    let sim = Sim::new(SimConfig {
        seed,
        explore,
        time_limit: SimTime(10_000_000_000),
        ..SimConfig::default()
    });
    let costs = if calibrated {
        MmCosts::calibrated()
    } else {
        MmCosts::zero()
    };
    let k = Kernel::new(&sim, 256 << 20, costs);
    (sim, k)
}

fn anon(len: u64, prot: Prot) -> MmapArgs {
    MmapArgs {
        len,
        prot,
        private: true,
        anonymous: true,
        ..MmapArgs::default()
    }
}

fn u32_index(n_bytes: u64, f: impl Fn(u32) -> u32) -> Vec<u8> {
    (0..u32::try_from(n_bytes / 4).unwrap())
        .flat_map(|i| f(i).to_le_bytes())
        .collect()
}

#[test]
fn anon_read_faults_once_and_reads_what_the_cpu_wrote() {
    let (sim, k) = setup(0, false, false);
    let out: Rc<RefCell<Option<Result<DmirrorResult, Errno>>>> = Rc::default();
    let (k2, o2) = (k.clone(), out.clone());
    sim.spawn("app", async move {
        let pid = k2.create_process();
        let buf = k2.mmap(pid, &anon(N * PAGE_SIZE, Prot::RW)).await.unwrap();
        let data = u32_index(N * PAGE_SIZE, |i| i);
        // Everything but the first two pages (hmm.anon_read).
        k2.store(pid, buf.add(2 * PAGE_SIZE), &data[2 * 4096..])
            .await
            .unwrap();
        k2.mprotect(pid, buf, N * PAGE_SIZE, Prot::READ)
            .await
            .unwrap();
        let mut v = [0u8; 4];
        k2.load(pid, buf.add(PAGE_SIZE), &mut v).await.unwrap();
        let m = Dmirror::open(
            &DmirrorDevice::new(
                &k2,
                DeviceId(0),
                DmirrorMemory::Private,
                64 << 20,
                DmirrorCosts::zero(),
            ),
            pid,
        )
        .unwrap();
        let r = m.read(buf, N).await;
        *o2.borrow_mut() = Some(r);
        m.close().await;
    });
    assert_eq!(sim.run(), RunOutcome::Completed);
    let res = out.borrow_mut().take().unwrap().unwrap();
    assert_eq!((res.cpages, res.faults), (N, 1));
    let expected = u32_index(N * PAGE_SIZE, |i| if i < 2048 { 0 } else { i });
    assert!(res.data == expected, "mirror data differs");
}

#[test]
fn device_read_of_a_prot_none_range_is_efault_and_write_to_read_only_is_eperm() {
    let (sim, k) = setup(0, false, false);
    let out: Rc<RefCell<Vec<Result<DmirrorResult, Errno>>>> = Rc::default();
    let (k2, o2) = (k.clone(), out.clone());
    sim.spawn("app", async move {
        let pid = k2.create_process();
        let buf = k2.mmap(pid, &anon(16 * PAGE_SIZE, Prot::RW)).await.unwrap();
        let m = Dmirror::open(
            &DmirrorDevice::new(
                &k2,
                DeviceId(0),
                DmirrorMemory::Private,
                64 << 20,
                DmirrorCosts::zero(),
            ),
            pid,
        )
        .unwrap();
        k2.mprotect(pid, buf, 16 * PAGE_SIZE, Prot::NONE)
            .await
            .unwrap();
        let r = m.read(buf, 16).await;
        o2.borrow_mut().push(r);
        k2.mprotect(pid, buf, 16 * PAGE_SIZE, Prot::READ)
            .await
            .unwrap();
        let r = m.write(buf, 16, &vec![1u8; 16 * 4096]).await;
        o2.borrow_mut().push(r);
        let r = m.read(Va::from_raw(0x1000), 1).await;
        o2.borrow_mut().push(r);
        let r = m.read(buf.add(1), 1).await;
        o2.borrow_mut().push(r);
    });
    assert_eq!(sim.run(), RunOutcome::Completed);
    let errs: Vec<Errno> = out
        .borrow()
        .iter()
        .map(|r| r.clone().unwrap_err())
        .collect();
    assert_eq!(
        errs,
        [Errno::EFAULT, Errno::EPERM, Errno::EFAULT, Errno::EINVAL]
    );
}

/// Runs the teardown race (hmm.anon_teardown): a device READ of the whole buffer while another thread unmaps
/// the second half after a random delay. Returns the run outcome.
fn teardown_race(seed: u64, injection: FaultInjection) -> RunOutcome {
    let (sim, k) = setup(seed, true, true);
    let pid = k.create_process();
    let buf: Rc<RefCell<Option<Va>>> = Rc::default();
    let mirror = Dmirror::open(
        &DmirrorDevice::new(
            &k,
            DeviceId(0),
            DmirrorMemory::Private,
            64 << 20,
            DmirrorCosts::calibrated(),
        ),
        pid,
    )
    .unwrap();
    mirror.inject(injection);
    let pages = 64u64;
    {
        let (k, buf, m) = (k.clone(), buf.clone(), mirror.clone());
        sim.spawn("reader", async move {
            let b = k
                .mmap(pid, &anon(pages * PAGE_SIZE, Prot::RW))
                .await
                .unwrap();
            k.store(pid, b, &u32_index(pages * PAGE_SIZE, |i| i))
                .await
                .unwrap();
            *buf.borrow_mut() = Some(b);
            let _ = m.read(b, pages).await;
        });
    }
    {
        let (k, buf) = (k.clone(), buf.clone());
        let mut rng = sim.rng("unmapper");
        let s = sim.clone();
        sim.spawn("unmapper", async move {
            loop {
                if let Some(b) = *buf.borrow() {
                    let _ = b;
                    break;
                }
                s.sleep(SimDuration::from_nanos(100)).await;
            }
            s.sleep(SimDuration::from_nanos(rng.between(0, 32_000)))
                .await;
            let b = buf.borrow().unwrap();
            // Reuse the freed frames at once, as a busy system would, so a stale mirror sees other data.
            k.munmap(pid, b.add(pages / 2 * PAGE_SIZE), pages / 2 * PAGE_SIZE)
                .await
                .unwrap();
            let other = k
                .mmap(pid, &anon(pages * PAGE_SIZE, Prot::RW))
                .await
                .unwrap();
            k.store(
                pid,
                other,
                &vec![0xa5; usize::try_from(pages * PAGE_SIZE).unwrap()],
            )
            .await
            .unwrap();
        });
    }
    sim.run()
}

#[test]
fn correct_mirror_survives_the_teardown_race_on_every_seed() {
    for seed in 0..64 {
        let outcome = teardown_race(seed, FaultInjection::None);
        assert_eq!(outcome, RunOutcome::Completed, "seed {seed}");
    }
}

#[test]
fn oracle_catches_a_mirror_that_skips_read_retry() {
    let caught: Vec<u64> = (0..64)
        .filter(|&seed| {
            matches!(
                teardown_race(seed, FaultInjection::SkipReadRetry),
                RunOutcome::Stopped(_)
            )
        })
        .collect();
    assert!(!caught.is_empty(), "no seed exposed the missing read_retry");
}

type Devs = (Rc<Kernel>, Rc<DmirrorDevice>, Rc<DmirrorDevice>);

/// Runs `f` with a kernel and two devices of the given flavour, as the only agent.
fn with_devices<T: 'static, F: Future<Output = T> + 'static>(
    mem: DmirrorMemory,
    f: impl FnOnce(Devs) -> F,
) -> T {
    let (sim, k) = setup(0, false, false);
    let d0 = DmirrorDevice::new(&k, DeviceId(0), mem, 64 << 20, DmirrorCosts::zero());
    let d1 = DmirrorDevice::new(&k, DeviceId(1), mem, 64 << 20, DmirrorCosts::zero());
    let out = Rc::new(RefCell::new(None));
    let (o, fut) = (out.clone(), f((k, d0, d1)));
    sim.spawn("test", async move {
        let r = fut.await;
        *o.borrow_mut() = Some(r);
    });
    assert_eq!(sim.run(), RunOutcome::Completed);
    out.borrow_mut().take().unwrap()
}

#[test]
fn migrate_then_cpu_fault_back_then_migrate_again() {
    // hmm.migrate_fault (spec §3.2 #14), private variant.
    let (first, back, second) = with_devices(DmirrorMemory::Private, |(k, d0, _)| async move {
        let pid = k.create_process();
        let buf = k.mmap(pid, &anon(N * PAGE_SIZE, Prot::RW)).await.unwrap();
        let data = u32_index(N * PAGE_SIZE, |i| i);
        k.store(pid, buf, &data).await.unwrap();
        let m = Dmirror::open(&d0, pid).unwrap();
        let first = m.migrate_to_dev(buf, N).await.unwrap();
        assert!(first.data == data);
        let mut half = vec![0u8; usize::try_from(N / 2 * PAGE_SIZE).unwrap()];
        k.load(pid, buf, &mut half).await.unwrap();
        let back = half == data[..half.len()];
        let second = m.migrate_to_dev(buf, N).await.unwrap();
        assert!(second.data == data);
        (first.cpages, back, second.cpages)
    });
    assert_eq!((first, back, second), (N, true, N));
}

#[test]
fn migrating_shared_anonymous_memory_is_enoent() {
    // hmm.migrate_shared (§3.2 #16).
    let r = with_devices(DmirrorMemory::Private, |(k, d0, _)| async move {
        let pid = k.create_process();
        let args = MmapArgs {
            len: N * PAGE_SIZE,
            prot: Prot::RW,
            shared: true,
            anonymous: true,
            ..MmapArgs::default()
        };
        let buf = k.mmap(pid, &args).await.unwrap();
        let m = Dmirror::open(&d0, pid).unwrap();
        m.migrate_to_dev(buf, N).await
    });
    assert_eq!(r.unwrap_err(), Errno::ENOENT);
}

#[test]
fn double_map_faults_the_other_devices_private_pages_back() {
    // hmm2.double_map (§3.2 #24), private variant.
    let counters = with_devices(DmirrorMemory::Private, |(k, d0, d1)| async move {
        let pid = k.create_process();
        let buf = k.mmap(pid, &anon(6 * PAGE_SIZE, Prot::RW)).await.unwrap();
        let data = u32_index(6 * PAGE_SIZE, |i| i);
        k.store(pid, buf, &data).await.unwrap();
        k.mprotect(pid, buf, 6 * PAGE_SIZE, Prot::READ)
            .await
            .unwrap();
        let (m0, m1) = (
            Dmirror::open(&d0, pid).unwrap(),
            Dmirror::open(&d1, pid).unwrap(),
        );
        let a = m0.read(buf, 6).await.unwrap();
        let b = m1.read(buf, 6).await.unwrap();
        let c = m1.migrate_to_dev(buf, 6).await.unwrap();
        let d = m0.read(buf, 6).await.unwrap();
        assert!(d.data == data);
        [
            (a.cpages, a.faults),
            (b.cpages, b.faults),
            (c.cpages, 0),
            (d.cpages, d.faults),
        ]
    });
    assert_eq!(counters, [(6, 1), (6, 1), (6, 0), (6, 1)]);
}

#[test]
fn snapshot_tells_local_and_remote_device_pages_apart() {
    // The device pages of hmm2.snapshot (§3.2 #22): m5 local, m6 another device's.
    for (mem, want) in [
        (DmirrorMemory::Private, [0x22u8, 0x00]),
        (DmirrorMemory::Coherent, [0x42, 0x52]),
    ] {
        let bytes = with_devices(mem, |(k, d0, d1)| async move {
            let pid = k.create_process();
            let buf = k.mmap(pid, &anon(2 * PAGE_SIZE, Prot::RW)).await.unwrap();
            let (m0, m1) = (
                Dmirror::open(&d0, pid).unwrap(),
                Dmirror::open(&d1, pid).unwrap(),
            );
            assert_eq!(m0.migrate_to_dev(buf, 1).await.unwrap().cpages, 1);
            assert_eq!(
                m1.migrate_to_dev(buf.add(PAGE_SIZE), 1)
                    .await
                    .unwrap()
                    .cpages,
                1
            );
            m0.snapshot(buf, 2).await.unwrap().data
        });
        assert_eq!(bytes, want, "{mem:?}");
    }
}

#[test]
fn migrating_a_pfnmap_range_is_einval() {
    // migrate_vma_setup refuses VM_IO | VM_PFNMAP VMAs (spec/linux-hmm.md §1.4): memory without struct page.
    let r = with_devices(DmirrorMemory::Private, |(k, d0, _)| async move {
        let pid = k.create_process();
        let io = k.mmap_pfnmap(pid, 4 * PAGE_SIZE, Prot::RW).await.unwrap();
        let m = Dmirror::open(&d0, pid).unwrap();
        (m.migrate_to_dev(io, 4).await, m.read(io, 1).await)
    });
    assert_eq!(r.0.unwrap_err(), Errno::EINVAL);
    assert_eq!(
        r.1.unwrap_err(),
        Errno::EFAULT,
        "hmm_range_fault refuses to fault PFNMAP pages"
    );
}

/// Returns the PTE of `pid` at `va`.
fn pte(k: &Kernel, pid: peerdma_core::Pid, va: Va) -> Option<peerdma_mm::pagetable::Pte> {
    k.pte_at(pid, va)
}

#[test]
fn after_fork_migrate_to_sys_or_a_cpu_fault_in_the_parent_moves_the_child_too() {
    // migrate_vma_unmap → try_to_migrate (spec §1.4 step 3, §1.6): the device-private pages the parent
    // migrated before fork are mapped by both; bringing the parent's back brings the child's to the same
    // RAM pages, and the child's mirror on the same device loses them through a CLEAR invalidation.
    const NP: u64 = 4;
    for via_fault in [false, true] {
        let (moved, child_mirrored, child_after, parent_after) =
            with_devices(DmirrorMemory::Private, |(k, d0, _)| async move {
                let parent = k.create_process();
                let buf = k
                    .mmap(parent, &anon(NP * PAGE_SIZE, Prot::RW))
                    .await
                    .unwrap();
                let data = u32_index(NP * PAGE_SIZE, |i| i ^ 0x5a5a);
                k.store(parent, buf, &data).await.unwrap();
                let m = Dmirror::open(&d0, parent).unwrap();
                assert_eq!(m.migrate_to_dev(buf, NP).await.unwrap().cpages, NP);
                let child = k.fork(parent).await.unwrap();
                let mc = Dmirror::open(&d0, child).unwrap();
                let r = mc.read(buf, NP).await.unwrap();
                assert!(r.data == data);
                let child_mirrored = mc.nr_mirrored();
                let dev_frames: Vec<_> = (0..NP)
                    .map(|i| match pte(&k, child, buf.add(i * PAGE_SIZE)) {
                        Some(peerdma_mm::pagetable::Pte::DevicePrivate { frame, .. }) => frame,
                        other => panic!("child page {i} not device-private: {other:?}"),
                    })
                    .collect();

                let moved = if via_fault {
                    let mut got = vec![0u8; data.len()];
                    k.load(parent, buf, &mut got).await.unwrap();
                    assert!(got == data);
                    NP
                } else {
                    m.migrate_to_sys(buf, NP).await.unwrap().cpages
                };

                for i in 0..NP {
                    let va = buf.add(i * PAGE_SIZE);
                    let p = pte(&k, parent, va);
                    assert!(
                        matches!(
                            p,
                            Some(peerdma_mm::pagetable::Pte::Present { write: false, .. })
                        ),
                        "parent page {i}: {p:?}"
                    );
                    assert_eq!(pte(&k, child, va), p, "child page {i} on another page");
                }
                assert!(
                    dev_frames.iter().all(|&f| !k.frame_info(f).allocated),
                    "device pages not freed"
                );
                let mut got = vec![0u8; data.len()];
                k.load(child, buf, &mut got).await.unwrap();
                assert!(got == data, "child data");
                let (child_after, parent_after) = (mc.nr_mirrored(), m.nr_mirrored());
                mc.close().await;
                m.close().await;
                (moved, child_mirrored, child_after, parent_after)
            });
        let np = usize::try_from(NP).unwrap();
        assert_eq!(
            (moved, child_mirrored, child_after, parent_after),
            (NP, np, 0, 0),
            "via_fault = {via_fault}"
        );
    }
}
