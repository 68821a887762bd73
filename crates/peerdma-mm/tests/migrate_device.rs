//! Device memory migration by physical range (`migrate_device_range`, spec/linux-hmm.md §1.4): the races a
//! migration that takes no `mmap_lock` must survive — fork copying its migration entries, a CPU fault on a
//! page it holds locked.
#![expect(
    clippy::tests_outside_test_module,
    clippy::unwrap_used,
    reason = "an integration-test crate is all tests"
)]

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;

use peerdma_core::{DeviceId, FrameId, PAGE_SIZE, Pid, Range, SimDuration, Va};
use peerdma_mm::migrate::{
    MIGRATE_PFN_WRITE, MIGRATE_VMA_SELECT_SYSTEM, migrate_pfn, migrate_pfn_to_frame,
};
use peerdma_mm::pagetable::Pte;
use peerdma_mm::{
    DevicePagemapOps, IntervalNotifierOps, Kernel, MemoryKind, MigrateVma, MmCosts, MmapArgs,
    NotifierEvent, NotifierId, NotifierRange, Prot,
};
use peerdma_sim::{RunOutcome, Sim, SimConfig};

const OWNER: DeviceId = DeviceId(7);

/// A pagemap whose `migrate_to_ram` always fails (SIGBUS): a CPU access that reaches it is a test failure.
#[derive(Debug)]
struct NoMigrateToRam;

impl DevicePagemapOps for NoMigrateToRam {
    fn migrate_to_ram<'a>(
        &'a self,
        _pid: Pid,
        _va: Va,
        _frame: FrameId,
    ) -> Pin<Box<dyn Future<Output = Result<(), peerdma_mm::VmFault>> + 'a>> {
        Box::pin(async { Err(peerdma_mm::VmFault::Sigbus) })
    }
}

fn setup() -> (Sim, Rc<Kernel>, usize) {
    let sim = Sim::new(SimConfig::default());
    let k = Kernel::new(&sim, 64 << 20, MmCosts::zero());
    let r = k.add_device_memory(
        MemoryKind::DevicePrivate { owner: OWNER },
        2 << 20,
        Rc::new(NoMigrateToRam),
    );
    (sim, k, r)
}

fn anon_page() -> MmapArgs {
    MmapArgs {
        len: PAGE_SIZE,
        prot: Prot::RW,
        private: true,
        anonymous: true,
        ..MmapArgs::default()
    }
}

/// Maps one written page at a fresh address of `pid` and migrates it into region `r`; returns the address,
/// the data and the device frame.
async fn page_on_device(k: &Kernel, r: usize, pid: Pid) -> (Va, Vec<u8>, FrameId) {
    let va = k.mmap(pid, &anon_page()).await.unwrap();
    let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    k.store(pid, va, &data).await.unwrap();
    let page = Range::from_len(va, PAGE_SIZE).unwrap();
    let mut m = MigrateVma::new(pid, page, MIGRATE_VMA_SELECT_SYSTEM, OWNER);
    k.migrate_vma_setup(&mut m).await.unwrap();
    let src = migrate_pfn_to_frame(m.src[0]).unwrap();
    let dst = k.alloc_page(r).unwrap();
    k.copy_page(src, dst);
    m.dst[0] = migrate_pfn(dst) | (m.src[0] & MIGRATE_PFN_WRITE);
    k.migrate_vma_pages(&mut m).await;
    k.migrate_vma_finalize(&mut m);
    (va, data, dst)
}

/// Copies each collected page to a new RAM page and completes the migration.
fn complete(k: &Kernel, src: &mut [u64]) {
    let dst: Vec<u64> = src
        .iter()
        .map(|&s| {
            migrate_pfn_to_frame(s).map_or(0, |f| {
                let d = k.alloc_page(0).unwrap();
                k.copy_page(f, d);
                migrate_pfn(d)
            })
        })
        .collect();
    k.migrate_device_pages(src, &dst);
    k.migrate_device_finalize(src, &dst);
}

fn pte(k: &Kernel, pid: Pid, va: Va) -> Option<Pte> {
    k.pte_at(pid, va)
}

#[test]
fn fork_during_a_device_range_migration_copies_its_migration_entries() {
    let (sim, k, r) = setup();
    let k2 = k.clone();
    sim.spawn("test", async move {
        let k = k2;
        let parent = k.create_process();
        let (va, data, dev) = page_on_device(&k, r, parent).await;
        let mut src = [0u64];
        k.migrate_device_range(&mut src, dev, 1).await;
        assert_eq!(
            pte(&k, parent, va),
            Some(Pte::Migration {
                frame: dev,
                write: true
            })
        );

        let child = k.fork(parent).await.unwrap();
        let ro = Some(Pte::Migration {
            frame: dev,
            write: false,
        });
        assert_eq!((pte(&k, parent, va), pte(&k, child, va)), (ro, ro));
        complete(&k, &mut src);

        let Some(Pte::Present {
            frame: ram,
            write: false,
            ..
        }) = pte(&k, parent, va)
        else {
            panic!("parent not mapping the new page read-only");
        };
        assert_eq!(pte(&k, child, va), pte(&k, parent, va));
        {
            assert_eq!(
                (k.frame_info(ram).mapcount, k.frame_info(ram).refcount),
                (2, 2)
            );
            assert!(!k.frame_info(dev).allocated, "device page freed");
        }
        for pid in [parent, child] {
            let mut buf = vec![0u8; 4096];
            k.load(pid, va, &mut buf).await.unwrap();
            assert!(buf == data, "pid {}", pid.0);
        }
    });
    assert_eq!(sim.run(), RunOutcome::Completed);
}

/// Sleeps in every CLEAR invalidation, holding a device-range migration between taking its pages and
/// replacing their entries.
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

#[test]
fn a_cpu_fault_on_a_page_a_range_migration_holds_waits_for_it() {
    let (sim, k, r) = setup();
    let pid = k.create_process();
    let shared: Rc<Cell<Option<(Va, FrameId)>>> = Rc::default();
    let loaded: Rc<RefCell<Option<Vec<u8>>>> = Rc::default();
    let data: Rc<RefCell<Vec<u8>>> = Rc::default();
    {
        let (k, shared, data, s) = (k.clone(), shared.clone(), data.clone(), sim.clone());
        sim.spawn("evictor", async move {
            let (va, d, dev) = page_on_device(&k, r, pid).await;
            *data.borrow_mut() = d;
            k.interval_notifier_insert(
                pid,
                Va::from_raw(0),
                !(PAGE_SIZE - 1),
                Rc::new(SlowClear(s)),
            )
            .unwrap();
            shared.set(Some((va, dev)));
            let mut src = [0u64];
            k.migrate_device_range(&mut src, dev, 1).await;
            complete(&k, &mut src);
        });
    }
    {
        let (k, shared, loaded, s) = (k.clone(), shared.clone(), loaded.clone(), sim.clone());
        sim.spawn("cpu", async move {
            // Touch the page while it is locked but its entry is still device-private.
            let mut polls = 0;
            let va = loop {
                polls += 1;
                assert!(polls < 1000, "never saw the locked window");
                if let Some((va, dev)) = shared.get()
                    && k.frame_info(dev).locked
                    && matches!(pte(&k, pid, va), Some(Pte::DevicePrivate { .. }))
                {
                    break va;
                }
                s.sleep(SimDuration::from_nanos(100)).await;
            };
            let mut buf = vec![0u8; 4096];
            k.load(pid, va, &mut buf)
                .await
                .expect("the fault waited instead of reaching migrate_to_ram");
            *loaded.borrow_mut() = Some(buf);
        });
    }
    assert_eq!(sim.run(), RunOutcome::Completed);
    let got = loaded.borrow_mut().take().unwrap();
    assert!(got == *data.borrow(), "the load read the migrated data");
    let (va, _) = shared.get().unwrap();
    let Some(Pte::Present { frame, .. }) = pte(&k, pid, va) else {
        panic!("not present after the migration");
    };
    assert!(matches!(k.memory_kind(frame), MemoryKind::Ram { .. }));
}
