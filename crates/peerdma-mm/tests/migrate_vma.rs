//! `migrate_vma` after `fork` (spec/linux-hmm.md §1.4 step 3, §1.6): the unmap step reaches every mapping of
//! each collected page through the rmap walk (`migrate_vma_unmap` → `try_to_migrate`, mm/migrate_device.c and
//! mm/rmap.c), so parent and child move to the one new page; a page with extra references is restored
//! everywhere; the other process's mirrors see a CLEAR invalidation with no owner.
#![expect(
    clippy::tests_outside_test_module,
    clippy::unwrap_used,
    reason = "an integration-test crate is all tests"
)]

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::{Rc, Weak};

use peerdma_core::{DeviceId, FrameId, PAGE_SIZE, Pid, Range, SimDuration, Va};
use peerdma_mm::migrate::{
    MIGRATE_PFN_MIGRATE, MIGRATE_PFN_WRITE, MIGRATE_VMA_SELECT_DEVICE_PRIVATE,
    MIGRATE_VMA_SELECT_SYSTEM, migrate_pfn, migrate_pfn_to_frame,
};
use peerdma_mm::pagetable::Pte;
use peerdma_mm::{
    DevicePagemapOps, GupFlags, IntervalNotifierOps, Kernel, MemoryKind, MigrateVma, MmCosts,
    MmapArgs, NotifierEvent, NotifierId, NotifierRange, Prot,
};
use peerdma_sim::{RunOutcome, Sim, SimConfig};

const OWNER: DeviceId = DeviceId(7);

/// Migrates `[range)` of `pid` with `flags`, copying each collected page into a new page of region `r`, as a
/// driver does (`dst` keeps the source's WRITE bit). Returns the `src` array after `migrate_vma_pages`.
async fn migrate(k: &Kernel, pid: Pid, range: Range<Va>, flags: u32, r: usize) -> Vec<u64> {
    let mut m = MigrateVma::new(pid, range, flags, OWNER);
    k.migrate_vma_setup(&mut m).await.unwrap();
    for i in 0..m.src.len() {
        if m.src[i] & MIGRATE_PFN_MIGRATE == 0 {
            continue;
        }
        let Some(src) = migrate_pfn_to_frame(m.src[i]) else {
            continue;
        };
        let dst = k.alloc_page(r).unwrap();
        k.copy_page(src, dst);
        m.dst[i] = migrate_pfn(dst) | (m.src[i] & MIGRATE_PFN_WRITE);
    }
    k.migrate_vma_pages(&mut m).await;
    let src = m.src.clone();
    k.migrate_vma_finalize(&mut m);
    src
}

/// The device's `migrate_to_ram`: migrates the faulting page back to system RAM (`dmirror_devmem_fault`).
#[derive(Debug, Default)]
struct ToRam {
    kernel: RefCell<Weak<Kernel>>,
}

impl DevicePagemapOps for ToRam {
    fn migrate_to_ram<'a>(
        &'a self,
        pid: Pid,
        va: Va,
        _frame: FrameId,
    ) -> Pin<Box<dyn Future<Output = Result<(), peerdma_mm::VmFault>> + 'a>> {
        Box::pin(async move {
            let k = self
                .kernel
                .borrow()
                .upgrade()
                .ok_or(peerdma_mm::VmFault::Sigbus)?;
            let page = Range::from_len(va.align_down(PAGE_SIZE), PAGE_SIZE)
                .ok_or(peerdma_mm::VmFault::Sigbus)?;
            migrate(&k, pid, page, MIGRATE_VMA_SELECT_DEVICE_PRIVATE, 0).await;
            Ok(())
        })
    }
}

/// One invalidation as a recorder saw it: event, owner, range.
type Seen = (NotifierEvent, Option<DeviceId>, Range<Va>);

/// Records every invalidation it sees.
#[derive(Debug, Default)]
struct Recorder(RefCell<Vec<Seen>>);

impl IntervalNotifierOps for Recorder {
    fn invalidate<'a>(
        &'a self,
        _id: NotifierId,
        r: &'a NotifierRange,
        _seq: u64,
    ) -> Pin<Box<dyn Future<Output = bool> + 'a>> {
        self.0.borrow_mut().push((r.event, r.owner, r.range));
        Box::pin(async { true })
    }

    fn name(&self) -> String {
        "recorder".to_owned()
    }
}

/// Runs `f` with a kernel whose device-private region (index returned) migrates back on CPU faults.
fn run<F: Future<Output = ()> + 'static>(f: impl FnOnce(Rc<Kernel>, usize) -> F) {
    let sim = Sim::new(SimConfig::default());
    let k = Kernel::new(&sim, 64 << 20, MmCosts::zero());
    let ops = Rc::new(ToRam::default());
    *ops.kernel.borrow_mut() = Rc::downgrade(&k);
    let r = k.add_device_memory(
        MemoryKind::DevicePrivate { owner: OWNER },
        2 << 20,
        ops.clone(),
    );
    sim.spawn("test", f(k, r));
    assert_eq!(sim.run(), RunOutcome::Completed);
}

fn pte(k: &Kernel, pid: Pid, va: Va) -> Option<Pte> {
    k.pte_at(pid, va)
}

/// Maps one written anonymous page of `pid`; returns its address and data.
async fn written_page(k: &Kernel, pid: Pid) -> (Va, Vec<u8>) {
    let args = MmapArgs {
        len: PAGE_SIZE,
        prot: Prot::RW,
        private: true,
        anonymous: true,
        ..MmapArgs::default()
    };
    let va = k.mmap(pid, &args).await.unwrap();
    let data: Vec<u8> = (0..4096u32).map(|i| (i % 253) as u8).collect();
    k.store(pid, va, &data).await.unwrap();
    (va, data)
}

/// Forks `parent` after moving its page at a fresh address to the device; returns (child, va, data, device
/// frame).
async fn forked_device_page(k: &Kernel, r: usize, parent: Pid) -> (Pid, Va, Vec<u8>, FrameId) {
    let (va, data) = written_page(k, parent).await;
    let page = Range::from_len(va, PAGE_SIZE).unwrap();
    migrate(k, parent, page, MIGRATE_VMA_SELECT_SYSTEM, r).await;
    let Some(Pte::DevicePrivate { frame: dev, .. }) = pte(k, parent, va) else {
        panic!("page not on the device");
    };
    let child = k.fork(parent).await.unwrap();
    let ro = Some(Pte::DevicePrivate {
        frame: dev,
        write: false,
    });
    assert_eq!((pte(k, parent, va), pte(k, child, va)), (ro, ro));
    (child, va, data, dev)
}

/// Asserts that parent and child both map one read-only RAM page holding `data` (two mappings, two
/// references) and that `dev` was freed.
async fn both_on_one_ram_page(
    k: &Kernel,
    parent: Pid,
    child: Pid,
    va: Va,
    data: &[u8],
    dev: FrameId,
) {
    let Some(Pte::Present {
        frame: ram,
        write: false,
        ..
    }) = pte(k, parent, va)
    else {
        panic!(
            "parent not mapping a read-only present page: {:?}",
            pte(k, parent, va)
        );
    };
    assert!(matches!(k.memory_kind(ram), MemoryKind::Ram { .. }));
    assert_eq!(
        pte(k, child, va),
        pte(k, parent, va),
        "child on another page"
    );
    {
        assert_eq!(
            (k.frame_info(ram).mapcount, k.frame_info(ram).refcount),
            (2, 2)
        );
        assert!(!k.frame_info(dev).allocated, "device page not freed");
        assert!(!k.frame_info(dev).locked);
    }
    for pid in [parent, child] {
        let mut buf = vec![0u8; 4096];
        k.load(pid, va, &mut buf).await.unwrap();
        assert!(buf == data, "pid {} reads other data", pid.0);
    }
}

#[test]
fn parent_cpu_fault_after_fork_moves_parent_and_child_to_one_ram_page() {
    run(|k, r| async move {
        let parent = k.create_process();
        let (child, va, data, dev) = forked_device_page(&k, r, parent).await;
        let rec = Rc::new(Recorder::default());
        k.interval_notifier_insert(child, va, PAGE_SIZE, rec.clone())
            .unwrap();

        let mut buf = vec![0u8; 4096];
        k.load(parent, va, &mut buf).await.unwrap();
        assert!(buf == data);

        both_on_one_ram_page(&k, parent, child, va, &data, dev).await;
        // The child's mirrors lost the device page through a CLEAR with no owner (try_to_migrate_one), not
        // the MIGRATE with the device as owner that the device's own mirrors skip.
        let page = Range::from_len(va, PAGE_SIZE).unwrap();
        assert_eq!(
            *rec.0.borrow(),
            [(NotifierEvent::Clear, None, page)],
            "child invalidations"
        );
    });
}

#[test]
fn child_cpu_fault_after_fork_moves_the_parent_too() {
    run(|k, r| async move {
        let parent = k.create_process();
        let (child, va, data, dev) = forked_device_page(&k, r, parent).await;
        let rec = Rc::new(Recorder::default());
        k.interval_notifier_insert(parent, va, PAGE_SIZE, rec.clone())
            .unwrap();

        let mut buf = vec![0u8; 4096];
        k.load(child, va, &mut buf).await.unwrap();
        assert!(buf == data);

        both_on_one_ram_page(&k, parent, child, va, &data, dev).await;
        let page = Range::from_len(va, PAGE_SIZE).unwrap();
        assert_eq!(*rec.0.borrow(), [(NotifierEvent::Clear, None, page)]);
    });
}

#[test]
fn parent_write_after_fork_migrates_both_then_breaks_cow_in_the_parent_only() {
    run(|k, r| async move {
        let parent = k.create_process();
        let (child, va, data, dev) = forked_device_page(&k, r, parent).await;

        k.store(parent, va, &[0xAA; 16]).await.unwrap();

        // migrate_to_ram moved both mappings to one RAM page; the write then copied it for the parent.
        let Some(Pte::Present {
            frame: mine,
            write: true,
            ..
        }) = pte(&k, parent, va)
        else {
            panic!("parent not writable after its COW fault");
        };
        let Some(Pte::Present {
            frame: theirs,
            write: false,
            ..
        }) = pte(&k, child, va)
        else {
            panic!("child left on the device page: {:?}", pte(&k, child, va));
        };
        assert_ne!(mine, theirs);
        assert!(!k.frame_info(dev).allocated);
        let mut buf = vec![0u8; 4096];
        k.load(child, va, &mut buf).await.unwrap();
        assert!(buf == data, "the child sees the parent's write");
        k.load(parent, va, &mut buf).await.unwrap();
        assert_eq!(buf[..16], [0xAA; 16]);
        assert!(buf[16..] == data[16..]);
    });
}

#[test]
fn migrating_a_page_shared_after_fork_to_the_device_moves_both_mappings() {
    run(|k, r| async move {
        let parent = k.create_process();
        let (va, data) = written_page(&k, parent).await;
        let child = k.fork(parent).await.unwrap();

        let src = migrate(
            &k,
            parent,
            Range::from_len(va, PAGE_SIZE).unwrap(),
            MIGRATE_VMA_SELECT_SYSTEM,
            r,
        )
        .await;
        assert_ne!(src[0] & MIGRATE_PFN_MIGRATE, 0);

        let Some(Pte::DevicePrivate {
            frame: dev,
            write: false,
        }) = pte(&k, parent, va)
        else {
            panic!("parent not on the device: {:?}", pte(&k, parent, va));
        };
        assert_eq!(pte(&k, child, va), pte(&k, parent, va));
        let old = migrate_pfn_to_frame(src[0]).unwrap();
        {
            assert!(!k.frame_info(old).allocated, "old RAM page not freed");
            assert_eq!(
                (k.frame_info(dev).mapcount, k.frame_info(dev).refcount),
                (2, 2)
            );
        }
        // Back again through a CPU fault in the child: one RAM page for both.
        let mut buf = vec![0u8; 4096];
        k.load(child, va, &mut buf).await.unwrap();
        both_on_one_ram_page(&k, parent, child, va, &data, dev).await;
    });
}

#[test]
fn a_page_with_a_gup_reference_is_restored_in_every_mapping() {
    run(|k, r| async move {
        let parent = k.create_process();
        let (va, data) = written_page(&k, parent).await;
        let child = k.fork(parent).await.unwrap();
        let Some(before) = pte(&k, parent, va) else {
            panic!("not mapped");
        };
        let rec = Rc::new(Recorder::default());
        k.interval_notifier_insert(child, va, PAGE_SIZE, rec.clone())
            .unwrap();
        let got = k
            .get_user_pages(parent, va, 1, GupFlags::GET)
            .await
            .unwrap();

        let src = migrate(
            &k,
            parent,
            Range::from_len(va, PAGE_SIZE).unwrap(),
            MIGRATE_VMA_SELECT_SYSTEM,
            r,
        )
        .await;

        // The reference check of migrate_vma_unmap: not migrated, both mappings back on the old page.
        assert_eq!(src[0], 0);
        assert_eq!(
            (pte(&k, parent, va), pte(&k, child, va)),
            (Some(before), Some(before))
        );
        let Pte::Present { frame, .. } = before else {
            panic!("not present");
        };
        {
            assert_eq!(
                (k.frame_info(frame).mapcount, k.frame_info(frame).refcount),
                (2, 3)
            );
            assert!(!k.frame_info(frame).locked);
        }
        // The child's mapping was unmapped (CLEAR) before the check restored it.
        assert_eq!(rec.0.borrow().len(), 1);
        assert_eq!(rec.0.borrow()[0].0, NotifierEvent::Clear);
        drop(got);
        let mut buf = vec![0u8; 4096];
        k.load(child, va, &mut buf).await.unwrap();
        assert!(buf == data);
    });
}

#[test]
fn a_pinned_page_is_not_migrated() {
    run(|k, r| async move {
        let pid = k.create_process();
        let (va, data) = written_page(&k, pid).await;
        let before = pte(&k, pid, va);
        let pin = k
            .get_user_pages(pid, va, 1, GupFlags::PIN | GupFlags::WRITE)
            .await
            .unwrap();

        let src = migrate(
            &k,
            pid,
            Range::from_len(va, PAGE_SIZE).unwrap(),
            MIGRATE_VMA_SELECT_SYSTEM,
            r,
        )
        .await;

        assert_eq!(src[0], 0);
        assert_eq!(pte(&k, pid, va), before);
        let Some(Pte::Present { frame, .. }) = before else {
            panic!("not present");
        };
        assert!(!k.frame_info(frame).locked);
        drop(pin);
        let mut buf = vec![0u8; 4096];
        k.load(pid, va, &mut buf).await.unwrap();
        assert!(buf == data);
    });
}

/// Sleeps in every CLEAR invalidation: holds a migration between collecting its pages and unmapping their
/// other mappings.
struct SlowClear(Sim);

impl IntervalNotifierOps for SlowClear {
    fn invalidate<'a>(
        &'a self,
        _id: NotifierId,
        r: &'a NotifierRange,
        _seq: u64,
    ) -> Pin<Box<dyn Future<Output = bool> + 'a>> {
        Box::pin(async move {
            if r.event == NotifierEvent::Clear {
                self.0.sleep(SimDuration::from_micros(1)).await;
            }
            true
        })
    }

    fn name(&self) -> String {
        "slow-clear".to_owned()
    }
}

/// Parent, child, the shared page's address and its device frame.
type Forked = (Pid, Pid, Va, FrameId);

#[test]
fn a_child_fault_while_the_parent_migrates_the_page_waits_and_lands_on_the_same_page() {
    let sim = Sim::new(SimConfig::default());
    let k = Kernel::new(&sim, 64 << 20, MmCosts::zero());
    let ops = Rc::new(ToRam::default());
    *ops.kernel.borrow_mut() = Rc::downgrade(&k);
    let r = k.add_device_memory(MemoryKind::DevicePrivate { owner: OWNER }, 2 << 20, ops);
    let shared: Rc<Cell<Option<Forked>>> = Rc::default();
    let data: Rc<RefCell<Vec<u8>>> = Rc::default();
    let loaded: Rc<RefCell<Option<Vec<u8>>>> = Rc::default();
    {
        let (k, shared, data, s) = (k.clone(), shared.clone(), data.clone(), sim.clone());
        sim.spawn("parent", async move {
            let parent = k.create_process();
            let (child, va, d, dev) = forked_device_page(&k, r, parent).await;
            *data.borrow_mut() = d;
            k.interval_notifier_insert(child, va, PAGE_SIZE, Rc::new(SlowClear(s)))
                .unwrap();
            shared.set(Some((parent, child, va, dev)));
            let mut buf = vec![0u8; 4096];
            k.load(parent, va, &mut buf).await.unwrap();
        });
    }
    {
        let (k, shared, loaded, s) = (k.clone(), shared.clone(), loaded.clone(), sim.clone());
        sim.spawn("child", async move {
            // Touch the page while the parent's migration holds it locked but the child's entry is still
            // device-private: the fault must wait rather than start a second migration.
            let mut polls = 0;
            let (child, va) = loop {
                polls += 1;
                assert!(polls < 1000, "never saw the locked window");
                if let Some((_, child, va, dev)) = shared.get()
                    && k.frame_info(dev).locked
                    && matches!(pte(&k, child, va), Some(Pte::DevicePrivate { .. }))
                {
                    break (child, va);
                }
                s.sleep(SimDuration::from_nanos(100)).await;
            };
            let mut buf = vec![0u8; 4096];
            k.load(child, va, &mut buf).await.unwrap();
            *loaded.borrow_mut() = Some(buf);
        });
    }
    assert_eq!(sim.run(), RunOutcome::Completed);
    assert!(loaded.borrow_mut().take().unwrap() == *data.borrow());
    let (parent, child, va, dev) = shared.get().unwrap();
    let Some(Pte::Present { frame: ram, .. }) = pte(&k, parent, va) else {
        panic!("parent not present");
    };
    assert_eq!(pte(&k, child, va), pte(&k, parent, va));
    assert_eq!(k.frame_info(ram).mapcount, 2);
    assert!(!k.frame_info(dev).allocated);
}

/// A hole and a zero-page mapping have no source page: `migrate_vma_pages` inserts their new device pages
/// itself, and so opens one MMU_NOTIFY_MIGRATE invalidation (with the migration's owner) from the first such
/// address to the end of the range (`__migrate_device_pages`, mm/migrate_device.c). A mirror that mapped the
/// zero page after setup's invalidation ended must see it.
#[test]
fn inserting_over_a_hole_or_the_zero_page_invalidates_the_mirrors() {
    run(|k, r| async move {
        let pid = k.create_process();
        let args = MmapArgs {
            len: 3 * PAGE_SIZE,
            prot: Prot::RW,
            private: true,
            anonymous: true,
            ..MmapArgs::default()
        };
        let va = k.mmap(pid, &args).await.unwrap();
        // Page 0 written (a source page), page 1 read (the zero page), page 2 never touched (a hole).
        k.store(pid, va, &[7u8; 16]).await.unwrap();
        let mut buf = [0u8; 16];
        k.load(pid, va.add(PAGE_SIZE), &mut buf).await.unwrap();
        let rec = Rc::new(Recorder::default());
        k.interval_notifier_insert(pid, va, 3 * PAGE_SIZE, rec.clone())
            .unwrap();
        let range = Range::from_len(va, 3 * PAGE_SIZE).unwrap();
        let mut m = MigrateVma::new(pid, range, MIGRATE_VMA_SELECT_SYSTEM, OWNER);
        k.migrate_vma_setup(&mut m).await.unwrap();
        assert_eq!(m.cpages, 3, "the page, the zero page and the hole");
        assert_eq!(rec.0.borrow().len(), 1, "setup's own invalidation");
        for i in 0..3 {
            let dst = k.alloc_page(r).unwrap();
            if let Some(src) = migrate_pfn_to_frame(m.src[i]) {
                k.copy_page(src, dst);
            }
            m.dst[i] = migrate_pfn(dst) | MIGRATE_PFN_WRITE;
        }
        k.migrate_vma_pages(&mut m).await;
        assert_eq!(
            rec.0.borrow()[1..],
            [(
                NotifierEvent::Migrate,
                Some(OWNER),
                Range::new(va.add(PAGE_SIZE), va.add(3 * PAGE_SIZE))
            )],
            "one MIGRATE invalidation from the zero page to the end"
        );
        k.migrate_vma_finalize(&mut m);
        for i in 0..3 {
            assert!(
                matches!(
                    pte(&k, pid, va.add(i * PAGE_SIZE)),
                    Some(Pte::DevicePrivate { write: true, .. })
                ),
                "page {i} not on the device"
            );
        }
        // With only source pages, `migrate_vma_pages` opens no invalidation.
        let (va2, _) = written_page(&k, pid).await;
        let before = rec.0.borrow().len();
        migrate(
            &k,
            pid,
            Range::from_len(va2, PAGE_SIZE).unwrap(),
            MIGRATE_VMA_SELECT_SYSTEM,
            r,
        )
        .await;
        assert_eq!(
            rec.0.borrow().len(),
            before,
            "outside the notifier's range: nothing"
        );
    });
}
