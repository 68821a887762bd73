//! RELEASE and eviction by physical range (`dmirror_device_evict_chunk` → `migrate_device_range`,
//! spec/linux-hmm.md §1.4 and §2.5): every mapping of a device page moves, pinned pages stay, free pages are
//! skipped.
#![expect(
    clippy::tests_outside_test_module,
    clippy::unwrap_used,
    reason = "an integration-test crate is all tests"
)]

use std::cell::RefCell;
use std::future::Future;
use std::rc::Rc;

use peerdma_core::{DeviceId, FrameId, PAGE_SIZE, Pid, SimTime, Va};
use peerdma_devices::{Dmirror, DmirrorCosts, DmirrorDevice, DmirrorMemory};
use peerdma_mm::migrate::{MIGRATE_PFN_MIGRATE, migrate_pfn};
use peerdma_mm::pagetable::Pte;
use peerdma_mm::{GupFlags, Kernel, MemoryKind, MmCosts, MmapArgs, Prot};
use peerdma_sim::{RunOutcome, Sim, SimConfig};

fn anon(len: u64) -> MmapArgs {
    MmapArgs {
        len,
        prot: Prot::RW,
        private: true,
        anonymous: true,
        ..MmapArgs::default()
    }
}

fn u32_index(n_bytes: u64) -> Vec<u8> {
    (0..u32::try_from(n_bytes / 4).unwrap())
        .flat_map(u32::to_le_bytes)
        .collect()
}

/// Runs `f` with a kernel and one device of the given flavour, as the only agent.
fn with_device<T: 'static, F: Future<Output = T> + 'static>(
    mem: DmirrorMemory,
    f: impl FnOnce(Rc<Kernel>, Rc<DmirrorDevice>) -> F,
) -> T {
    let sim = Sim::new(SimConfig {
        time_limit: SimTime(10_000_000_000),
        ..SimConfig::default()
    });
    let k = Kernel::new(&sim, 64 << 20, MmCosts::zero());
    let d0 = DmirrorDevice::new(&k, DeviceId(0), mem, 16 << 20, DmirrorCosts::zero());
    let out = Rc::new(RefCell::new(None));
    let (o, fut) = (out.clone(), f(k, d0));
    sim.spawn("test", async move {
        let r = fut.await;
        *o.borrow_mut() = Some(r);
    });
    assert_eq!(sim.run(), RunOutcome::Completed);
    out.borrow_mut().take().unwrap()
}

fn pte(k: &Kernel, pid: Pid, va: Va) -> Pte {
    k.pte_at(pid, va).unwrap()
}

async fn load(k: &Kernel, pid: Pid, va: Va, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; usize::try_from(len).unwrap()];
    k.load(pid, va, &mut buf).await.unwrap();
    buf
}

#[test]
fn release_moves_a_page_shared_after_fork_to_one_read_only_ram_page_in_both_processes() {
    with_device(DmirrorMemory::Private, |k, d0| async move {
        let parent = k.create_process();
        let buf = k.mmap(parent, &anon(2 * PAGE_SIZE)).await.unwrap();
        let data = u32_index(2 * PAGE_SIZE);
        k.store(parent, buf, &data).await.unwrap();
        let m = Dmirror::open(&d0, parent).unwrap();
        assert_eq!(m.migrate_to_dev(buf, 2).await.unwrap().cpages, 2);
        let child = k.fork(parent).await.unwrap();
        let Pte::DevicePrivate { frame: dev, .. } = pte(&k, parent, buf) else {
            panic!("not on the device");
        };
        assert_eq!(
            pte(&k, child, buf),
            Pte::DevicePrivate {
                frame: dev,
                write: false
            },
            "fork shares the device page read-only"
        );

        m.release().await.unwrap();

        assert_eq!(m.nr_mirrored(), 0, "the mirror lost its entries");
        for page in 0..2 {
            let va = buf.add(page * PAGE_SIZE);
            let Pte::Present {
                frame: ram,
                write: false,
                ..
            } = pte(&k, parent, va)
            else {
                panic!("page {page} not read-only present in the parent");
            };
            assert_eq!(pte(&k, child, va), pte(&k, parent, va), "page {page}");
            assert!(matches!(k.memory_kind(ram), MemoryKind::Ram { .. }));
            let fr = k.frame_info(ram);
            assert_eq!((fr.mapcount, fr.refcount), (2, 2), "page {page}");
        }
        assert!(!k.frame_info(dev).allocated, "device page freed");
        assert!(load(&k, parent, buf, 2 * PAGE_SIZE).await == data);
        assert!(load(&k, child, buf, 2 * PAGE_SIZE).await == data);

        // A write in the child copies; the parent keeps the shared page, then reuses it for its own write.
        let Pte::Present { frame: ram, .. } = pte(&k, parent, buf) else {
            unreachable!()
        };
        k.store(child, buf, &[0xaa; 4]).await.unwrap();
        let Pte::Present {
            frame: copy,
            write: true,
            ..
        } = pte(&k, child, buf)
        else {
            panic!("child not writable after its write");
        };
        assert_ne!(copy, ram, "the child's write copied the page");
        assert!(load(&k, parent, buf, 2 * PAGE_SIZE).await == data);
        k.store(parent, buf, &[0xbb; 4]).await.unwrap();
        assert_eq!(
            pte(&k, parent, buf),
            Pte::Present {
                frame: ram,
                write: true,
                special: false
            },
            "the parent, now the only mapping, reuses the page"
        );
        let mut want = data.clone();
        want[..4].copy_from_slice(&[0xaa; 4]);
        assert!(load(&k, child, buf, 2 * PAGE_SIZE).await == want);
        m.close().await;
    });
}

#[test]
fn release_leaves_a_pinned_coherent_page_in_device_memory() {
    with_device(DmirrorMemory::Coherent, |k, d0| async move {
        let pid = k.create_process();
        let buf = k.mmap(pid, &anon(2 * PAGE_SIZE)).await.unwrap();
        let data = u32_index(2 * PAGE_SIZE);
        k.store(pid, buf, &data).await.unwrap();
        let m = Dmirror::open(&d0, pid).unwrap();
        assert_eq!(m.migrate_to_dev(buf, 2).await.unwrap().cpages, 2);
        let pin = k.get_user_pages(pid, buf, 1, GupFlags::PIN).await.unwrap();
        let pinned = pin.frames()[0];
        assert!(matches!(
            k.memory_kind(pinned),
            MemoryKind::DeviceCoherent { .. }
        ));

        m.release().await.unwrap();

        assert_eq!(
            pte(&k, pid, buf),
            Pte::Present {
                frame: pinned,
                write: true,
                special: false
            },
            "the pinned page and its mapping stay"
        );
        let Pte::Present { frame: other, .. } = pte(&k, pid, buf.add(PAGE_SIZE)) else {
            panic!("second page not present");
        };
        assert!(matches!(k.memory_kind(other), MemoryKind::Ram { .. }));
        assert!(!k.frame_info(pinned).locked, "unlocked again");
        assert!(load(&k, pid, buf, 2 * PAGE_SIZE).await == data);

        drop(pin);
        m.release().await.unwrap();
        let Pte::Present { frame: now, .. } = pte(&k, pid, buf) else {
            panic!("first page not present");
        };
        assert!(matches!(k.memory_kind(now), MemoryKind::Ram { .. }));
        assert!(load(&k, pid, buf, 2 * PAGE_SIZE).await == data);
        m.close().await;
    });
}

#[test]
fn migrate_device_range_skips_free_device_pages_and_restores_declined_ones() {
    with_device(DmirrorMemory::Private, |k, d0| async move {
        let pid = k.create_process();
        let buf = k.mmap(pid, &anon(2 * PAGE_SIZE)).await.unwrap();
        let data = u32_index(2 * PAGE_SIZE);
        k.store(pid, buf, &data).await.unwrap();
        let m = Dmirror::open(&d0, pid).unwrap();
        assert_eq!(m.migrate_to_dev(buf, 2).await.unwrap().cpages, 2);
        let frames: Vec<FrameId> = (0..2)
            .map(|i| pte(&k, pid, buf.add(i * PAGE_SIZE)).frame().unwrap())
            .collect();
        let start = k.region_frames(k.region_of(frames[0])).0;
        let mut src = vec![0u64; 8];

        k.migrate_device_range(&mut src, start, 8).await;

        for (i, &s) in (0u64..).zip(&src) {
            let f = FrameId(start.0 + i);
            if frames.contains(&f) {
                assert_eq!(s, migrate_pfn(f) | MIGRATE_PFN_MIGRATE, "{f}");
            } else {
                assert_eq!(s, 0, "free {f} is skipped");
                assert!(!k.frame_info(f).allocated, "{f} left free");
            }
        }
        for (i, &f) in (0u64..).zip(&frames) {
            assert_eq!(
                pte(&k, pid, buf.add(i * PAGE_SIZE)),
                Pte::Migration {
                    frame: f,
                    write: true
                }
            );
        }
        assert_eq!(
            m.nr_mirrored(),
            0,
            "the CLEAR invalidations reached the mirror"
        );

        // The driver declines every page: the device entries come back.
        let dst = vec![0u64; 8];
        k.migrate_device_pages(&mut src, &dst);
        assert!(src.iter().all(|&s| s & MIGRATE_PFN_MIGRATE == 0));
        k.migrate_device_finalize(&src, &dst);
        for (i, &f) in (0u64..).zip(&frames) {
            assert_eq!(
                pte(&k, pid, buf.add(i * PAGE_SIZE)),
                Pte::DevicePrivate {
                    frame: f,
                    write: true
                }
            );
            let fr = k.frame_info(f);
            assert_eq!((fr.refcount, fr.mapcount, fr.locked), (1, 1, false));
        }
        let r = m.read(buf, 2).await.unwrap();
        assert_eq!((r.cpages, r.faults), (2, 1));
        assert!(r.data == data);
        m.close().await;
    });
}
