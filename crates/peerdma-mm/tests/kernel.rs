//! Kernel-level behaviour: hmm_range_fault cases of spec/linux-hmm.md §1.1, notifier events of fork/COW
//! (§1.3), VMA splitting and fork isolation.
#![expect(
    clippy::tests_outside_test_module,
    clippy::unwrap_used,
    reason = "an integration-test crate is all tests"
)]

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;

use peerdma_core::{Errno, PAGE_SIZE, Range, Va};
use peerdma_mm::hmm::{
    HMM_PFN_ERROR, HMM_PFN_REQ_FAULT, HMM_PFN_REQ_WRITE, HMM_PFN_VALID, HMM_PFN_WRITE, HmmRange,
};
use peerdma_mm::{
    IntervalNotifierOps, Kernel, MmCosts, MmapArgs, NotifierEvent, NotifierId, NotifierRange, Prot,
    SigInfo, Signal,
};
use peerdma_sim::{RunOutcome, Sim, SimConfig};

/// Runs `f` as the only agent of a fresh simulation and returns its result.
fn run<T: 'static, F: Future<Output = T> + 'static>(f: impl FnOnce(Rc<Kernel>) -> F) -> T {
    let sim = Sim::new(SimConfig::default());
    let k = Kernel::new(&sim, 64 << 20, MmCosts::zero());
    let out = Rc::new(RefCell::new(None));
    let (o, fut) = (out.clone(), f(k));
    sim.spawn("test", async move { *o.borrow_mut() = Some(fut.await) });
    assert_eq!(sim.run(), RunOutcome::Completed);
    out.borrow_mut().take().unwrap()
}

fn anon(pages: u64, prot: Prot) -> MmapArgs {
    MmapArgs {
        len: pages * PAGE_SIZE,
        prot,
        private: true,
        anonymous: true,
        ..MmapArgs::default()
    }
}

/// Records every invalidation event it sees.
#[derive(Default)]
struct Recorder(
    RefCell<Vec<(NotifierEvent, Range<Va>)>>,
    RefCell<Option<Rc<Kernel>>>,
);

impl IntervalNotifierOps for Recorder {
    fn invalidate<'a>(
        &'a self,
        id: NotifierId,
        r: &'a NotifierRange,
        seq: u64,
    ) -> Pin<Box<dyn Future<Output = bool> + 'a>> {
        self.0.borrow_mut().push((r.event, r.range));
        let k = self.1.borrow().clone().unwrap();
        k.interval_set_seq(r.mm, id, seq);
        Box::pin(async { true })
    }
    fn name(&self) -> String {
        "recorder".into()
    }
}

async fn hmm(
    k: &Kernel,
    pid: peerdma_core::Pid,
    n: NotifierId,
    r: Range<Va>,
    flags: u64,
) -> Result<Vec<u64>, Errno> {
    let seq = k.interval_read_begin(pid, n).await;
    let mut range = HmmRange::new(pid, n, seq, r, flags);
    let lock = k.mmap_lock(pid);
    let _g = lock.read().await;
    k.hmm_range_fault(&mut range).await.map(|()| range.hmm_pfns)
}

#[test]
fn hmm_range_fault_reports_pfnmap_and_holes_as_error_and_refuses_to_fault_them() {
    let (snap, faulted, hole) = run(|k| async move {
        let pid = k.create_process();
        let io = k.mmap_pfnmap(pid, 2 * PAGE_SIZE, Prot::RW).await.unwrap();
        let n = k
            .interval_notifier_insert(pid, Va::from_raw(0), 1 << 47, Rc::new(Recorder::default()))
            .unwrap();
        let r = Range::from_len(io, 2 * PAGE_SIZE).unwrap();
        let snap = hmm(&k, pid, n, r, 0).await.unwrap();
        let faulted = hmm(&k, pid, n, r, HMM_PFN_REQ_FAULT).await;
        let hole = hmm(
            &k,
            pid,
            n,
            Range::from_len(io.add(8 * PAGE_SIZE), PAGE_SIZE).unwrap(),
            HMM_PFN_REQ_FAULT,
        )
        .await;
        (snap, faulted, hole)
    });
    assert_eq!(snap, vec![HMM_PFN_ERROR, HMM_PFN_ERROR]);
    assert_eq!(faulted, Err(Errno::EFAULT));
    assert_eq!(hole, Err(Errno::EFAULT));
}

#[test]
fn hmm_write_request_on_read_only_vma_is_eperm_and_zero_page_reads_valid_read_only() {
    let (eperm, read) = run(|k| async move {
        let pid = k.create_process();
        let buf = k.mmap(pid, &anon(4, Prot::READ)).await.unwrap();
        let n = k
            .interval_notifier_insert(pid, Va::from_raw(0), 1 << 47, Rc::new(Recorder::default()))
            .unwrap();
        let r = Range::from_len(buf, 4 * PAGE_SIZE).unwrap();
        let eperm = hmm(&k, pid, n, r, HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE).await;
        let read = hmm(&k, pid, n, r, HMM_PFN_REQ_FAULT).await.unwrap();
        (eperm, read)
    });
    assert_eq!(eperm, Err(Errno::EPERM));
    assert!(
        read.iter()
            .all(|w| w & HMM_PFN_VALID != 0 && w & HMM_PFN_WRITE == 0)
    );
}

#[test]
fn fork_write_protects_with_protection_page_and_cow_break_clears_one_page() {
    let events = run(|k| async move {
        let pid = k.create_process();
        let buf = k.mmap(pid, &anon(4, Prot::RW)).await.unwrap();
        k.store(pid, buf, &vec![7u8; 4 * 4096]).await.unwrap();
        let rec = Rc::new(Recorder::default());
        *rec.1.borrow_mut() = Some(k.clone());
        k.interval_notifier_insert(pid, Va::from_raw(0), 1 << 47, rec.clone())
            .unwrap();
        let child = k.fork(pid).await.unwrap();
        // The parent writes page 1: COW copy, CLEAR invalidation of exactly that page.
        k.store(pid, buf.add(PAGE_SIZE), &[1]).await.unwrap();
        // The child still sees the old bytes; the parent its new one.
        let mut c = [0u8; 1];
        k.load(child, buf.add(PAGE_SIZE), &mut c).await.unwrap();
        let mut p = [0u8; 1];
        k.load(pid, buf.add(PAGE_SIZE), &mut p).await.unwrap();
        assert_eq!((c[0], p[0]), (7, 1));
        rec.0.borrow().clone()
    });
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0].0, NotifierEvent::ProtectionPage);
    assert_eq!(events[1].0, NotifierEvent::Clear);
    assert_eq!(events[1].1.len(), PAGE_SIZE);
}

#[test]
fn munmap_in_the_middle_splits_the_vma_and_later_access_faults_with_sigsegv() {
    let (nr_vmas, sig, ok) = run(|k| async move {
        let pid = k.create_process();
        let buf = k.mmap(pid, &anon(8, Prot::RW)).await.unwrap();
        k.munmap(pid, buf.add(2 * PAGE_SIZE), 2 * PAGE_SIZE)
            .await
            .unwrap();
        let nr = k.vmas(pid).len();
        let sig = k.store(pid, buf.add(2 * PAGE_SIZE), &[1]).await;
        let ok = k.store(pid, buf.add(5 * PAGE_SIZE), &[1]).await;
        (nr, sig, ok)
    });
    assert_eq!(nr_vmas, 2);
    assert!(matches!(
        sig,
        Err(SigInfo {
            signo: Signal::Segv,
            ..
        })
    ));
    assert_eq!(ok, Ok(()));
}

#[test]
fn fixed_noreplace_over_a_mapping_is_eexist_and_zero_length_is_einval() {
    let (eexist, einval) = run(|k| async move {
        let pid = k.create_process();
        let buf = k.mmap(pid, &anon(4, Prot::RW)).await.unwrap();
        let mut a = anon(1, Prot::RW);
        a.addr = Some(buf);
        a.fixed_noreplace = true;
        let eexist = k.mmap(pid, &a).await;
        let einval = k.mmap(pid, &anon(0, Prot::RW)).await;
        (eexist, einval)
    });
    assert_eq!(eexist, Err(Errno::EEXIST));
    assert_eq!(einval, Err(Errno::EINVAL));
}

/// spec/linux-p2p.md §2.3, one row per per-VMA check, plus the partial result of a range crossing a hole.
#[test]
fn gup_per_vma_checks_and_partial_results() {
    use peerdma_mm::GupFlags as F;
    let results = run(|k| async move {
        let pid = k.create_process();
        let rw = k.mmap(pid, &anon(4, Prot::RW)).await.unwrap();
        let ro = k.mmap(pid, &anon(4, Prot::READ)).await.unwrap();
        let none = k.mmap(pid, &anon(1, Prot::NONE)).await.unwrap();
        let io = k.mmap_pfnmap(pid, PAGE_SIZE, Prot::RW).await.unwrap();
        let shared = MmapArgs {
            len: PAGE_SIZE,
            prot: Prot::RW,
            shared: true,
            anonymous: true,
            ..MmapArgs::default()
        };
        let shm = k.mmap(pid, &shared).await.unwrap();
        let file = k.create_file("f", PAGE_SIZE, false);
        let fargs = MmapArgs {
            len: PAGE_SIZE,
            prot: Prot::RW,
            shared: true,
            file: Some(file),
            ..MmapArgs::default()
        };
        let fmap = k.mmap(pid, &fargs).await.unwrap();
        k.munmap(pid, rw.add(2 * PAGE_SIZE), PAGE_SIZE)
            .await
            .unwrap();
        let cases = [
            (io, 1, F::GET),
            (ro, 1, F::GET | F::WRITE),
            (ro, 1, F::GET | F::WRITE | F::FORCE),
            (none, 1, F::GET),
            (shm, 1, F::GET | F::ANON),
            (fmap, 1, F::PIN | F::LONGTERM | F::WRITE),
            (shm, 1, F::PIN | F::LONGTERM | F::WRITE),
            (rw, 4, F::PIN | F::WRITE),
            (rw.add(2 * PAGE_SIZE), 1, F::PIN),
        ];
        let mut out = Vec::new();
        for (va, n, flags) in cases {
            out.push(k.get_user_pages(pid, va, n, flags).await.map(|p| p.len()));
        }
        out
    });
    assert_eq!(
        results,
        [
            Err(Errno::EFAULT), // VM_IO | VM_PFNMAP: no struct page
            Err(Errno::EFAULT), // write to a VMA without VM_WRITE
            Ok(1),              // ... unless FORCE on a private mapping
            Err(Errno::EFAULT), // read from a VMA without VM_READ
            Err(Errno::EFAULT), // FOLL_ANON on a shmem VMA
            Err(Errno::EFAULT), // long-term writable pin of a dirty-tracked file mapping
            Ok(1),              // ... shmem is fine
            Ok(2),              // a hole after two pages: partial result
            Err(Errno::EFAULT), // a hole at the first page
        ]
    );
}

#[test]
fn pins_use_the_bias_release_on_drop_and_make_fork_copy_for_the_child() {
    use peerdma_mm::GupFlags as F;
    let (pinned, after_drop, parent_kept, child_copy) = run(|k| async move {
        let pid = k.create_process();
        let buf = k.mmap(pid, &anon(1, Prot::RW)).await.unwrap();
        k.store(pid, buf, &[9]).await.unwrap();
        let pin = k
            .get_user_pages(pid, buf, 1, F::PIN | F::LONGTERM | F::WRITE)
            .await
            .unwrap();
        let frame = pin.frames()[0];
        let pinned = k.frame_info(frame).maybe_dma_pinned;
        let child = k.fork(pid).await.unwrap();
        let (pf, cf) = (
            k.translate(pid, buf).unwrap(),
            k.translate(child, buf).unwrap(),
        );
        let mut b = [0u8; 1];
        k.load(child, buf, &mut b).await.unwrap();
        drop(pin);
        let after_drop = k.frame_info(frame).maybe_dma_pinned;
        (
            pinned,
            after_drop,
            pf.0 == frame && pf.1,
            cf.0 != frame && b[0] == 9,
        )
    });
    assert!(pinned, "a FOLL_PIN adds the bias");
    assert!(!after_drop, "dropping the pin releases it");
    assert!(parent_kept, "the parent keeps the pinned page, writable");
    assert!(child_copy, "the child gets a copy with the same bytes");
}

#[test]
fn read_only_pin_of_a_cow_shared_page_unshares_it_so_dma_survives_the_parents_write() {
    use peerdma_mm::GupFlags as F;
    let (child_sees, parent_sees, violations) = run(|k| async move {
        let pid = k.create_process();
        let buf = k.mmap(pid, &anon(1, Prot::RW)).await.unwrap();
        k.store(pid, buf, &[1]).await.unwrap();
        let child = k.fork(pid).await.unwrap();
        // The page is COW-shared now; a read-only pin must unshare it first (gup_must_unshare).
        let pin = k.get_user_pages(pid, buf, 1, F::PIN).await.unwrap();
        let frame = pin.frames()[0];
        // The parent writes: without the unshare this COW would replace the pinned page (oracle check 3).
        k.store(pid, buf.add(8), &[2]).await.unwrap();
        let t = peerdma_mm::FrameTranslation {
            frame,
            generation: k.frame_generation(frame).unwrap(),
            grant: peerdma_mm::DeviceGrant::Pin { pid, va: buf },
        };
        let dev = peerdma_core::DeviceId(9);
        assert!(k.device_issue(dev, &t, true));
        assert!(k.device_land(dev, &t, peerdma_mm::DeviceData::Write(&[5u8; 4096])));
        let mut c = [0u8; 1];
        k.load(child, buf, &mut c).await.unwrap();
        let mut p = [0u8; 1];
        k.load(pid, buf, &mut p).await.unwrap();
        drop(pin);
        let v = k.oracle_violations().len();
        (c[0], p[0], v)
    });
    assert_eq!((child_sees, parent_sees, violations), (1, 5, 0));
}

#[test]
fn dax_truncate_waits_for_short_term_pins_and_long_term_pins_are_refused() {
    use peerdma_mm::GupFlags as F;
    let sim = Sim::new(SimConfig::default());
    let k = Kernel::new(&sim, 64 << 20, MmCosts::zero());
    let file = k.create_dax_file("pmem", 8 * PAGE_SIZE);
    let pid = k.create_process();
    let log: Rc<RefCell<Vec<(&str, u64)>>> = Rc::default();
    let pin_slot: Rc<RefCell<Option<peerdma_mm::PinnedPages>>> = Rc::default();
    {
        let (k, log, slot, s) = (k.clone(), log.clone(), pin_slot.clone(), sim.clone());
        sim.spawn("app", async move {
            let args = MmapArgs {
                len: 8 * PAGE_SIZE,
                prot: Prot::RW,
                shared: true,
                file: Some(file),
                ..MmapArgs::default()
            };
            let buf = k.mmap(pid, &args).await.unwrap();
            let lt = k.get_user_pages(pid, buf, 1, F::PIN | F::LONGTERM).await;
            assert_eq!(lt.unwrap_err(), Errno::EOPNOTSUPP);
            *slot.borrow_mut() = Some(
                k.get_user_pages(pid, buf.add(6 * PAGE_SIZE), 1, F::PIN)
                    .await
                    .unwrap(),
            );
            k.truncate(file, 4 * PAGE_SIZE).await.unwrap();
            log.borrow_mut().push(("truncated", s.now().0));
        });
    }
    {
        let (log, slot, s) = (log.clone(), pin_slot.clone(), sim.clone());
        sim.spawn("io", async move {
            s.sleep(peerdma_core::SimDuration::from_micros(50)).await;
            drop(slot.borrow_mut().take());
            log.borrow_mut().push(("unpinned", s.now().0));
        });
    }
    assert_eq!(sim.run(), RunOutcome::Completed);
    assert_eq!(*log.borrow(), [("unpinned", 50_000), ("truncated", 50_000)]);
}

#[test]
fn anonymous_memory_twice_the_ram_swaps_out_and_back_in_intact() {
    let sim = Sim::new(SimConfig::default());
    let k = Kernel::new(&sim, 4 << 20, MmCosts::zero());
    let out: Rc<RefCell<Option<(bool, u64, usize)>>> = Rc::default();
    {
        let (k, out) = (k.clone(), out.clone());
        sim.spawn("app", async move {
            let pid = k.create_process();
            let n = 2048u64;
            let buf = k.mmap(pid, &anon(n, Prot::RW)).await.unwrap();
            let data: Vec<u8> = (0..n * 1024)
                .flat_map(|i| u32::try_from(i).unwrap().to_le_bytes())
                .collect();
            let stored = k.store(pid, buf, &data).await;
            let mut back = vec![0u8; data.len()];
            let loaded = k.load(pid, buf, &mut back).await;
            let free = k.nr_free_node(0);
            let slots = k.nr_swap_slots();
            *out.borrow_mut() = Some((
                stored.is_ok() && loaded.is_ok() && back == data,
                free,
                slots,
            ));
        });
    }
    assert_eq!(sim.run(), RunOutcome::Completed);
    let (intact, _free, slots) = out.borrow_mut().take().unwrap();
    assert!(intact, "data lost through swap");
    assert!(
        slots > 0,
        "nothing is swapped out while the working set is twice the RAM"
    );
    assert!(sim.metrics().get("swap.in") > 0);
}
