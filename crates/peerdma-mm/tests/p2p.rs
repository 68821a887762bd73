//! P2P memory in user space: the p2pmem `allocate` file (spec/linux-p2p.md §1.7) with struct pages, GUP's
//! per-page P2PDMA rule (§2.4), provider removal (§1.2 lifecycle rule), and BAR memory without struct pages
//! mapped with `remap_pfn_range` and revoked by its owner (§1.8 (a), §6).
#![expect(
    clippy::tests_outside_test_module,
    clippy::unwrap_used,
    reason = "an integration-test crate is all tests"
)]

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;

use peerdma_core::{DeviceId, Errno, FrameId, PAGE_SIZE, Pa, Pid, Range, SimDuration, Va};
use peerdma_mm::hmm::{
    HMM_PFN_REQ_FAULT, HMM_PFN_VALID, HMM_PFN_WRITE, HmmRange, hmm_pfn_to_frame,
};
use peerdma_mm::{
    GupFlags as F, IntervalNotifierOps, Kernel, MmCosts, MmapArgs, NotifierEvent, NotifierId,
    NotifierRange, PinnedPages, Prot, SigInfo, Signal, ViolationKind,
};
use peerdma_sim::{RunOutcome, Sim, SimConfig};

const PROVIDER: DeviceId = DeviceId(7);
const BAR: u64 = 0x38_0000_0000;

/// Runs `f` as the only agent of a fresh simulation; returns its result and how the run ended.
fn run_outcome<T: 'static, F2: Future<Output = T> + 'static>(
    f: impl FnOnce(Rc<Kernel>) -> F2,
) -> (Option<T>, RunOutcome) {
    let sim = Sim::new(SimConfig::default());
    let k = Kernel::new(&sim, 64 << 20, MmCosts::zero());
    let out = Rc::new(RefCell::new(None));
    let (o, fut) = (out.clone(), f(k));
    sim.spawn("test", async move { *o.borrow_mut() = Some(fut.await) });
    let outcome = sim.run();
    let v = out.borrow_mut().take();
    (v, outcome)
}

fn run<T: 'static, F2: Future<Output = T> + 'static>(f: impl FnOnce(Rc<Kernel>) -> F2) -> T {
    let (v, outcome) = run_outcome(f);
    assert_eq!(outcome, RunOutcome::Completed);
    v.unwrap()
}

fn pages(n: u64) -> u64 {
    n * PAGE_SIZE
}

fn p2p_region(k: &Kernel, nr_pages: u64) -> usize {
    k.add_p2p_memory(PROVIDER, Pa::from_raw(BAR), pages(nr_pages))
}

fn frame_of(k: &Kernel, pid: Pid, va: Va) -> Option<FrameId> {
    k.translate(pid, va).map(|(f, _)| f)
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

/// Hands a recorder and the address it watches from one agent to the test.
type RecorderSlot = Rc<RefCell<Option<(Rc<Recorder>, Va)>>>;

fn recorder(k: &Rc<Kernel>, pid: Pid, start: Va, len: u64) -> (Rc<Recorder>, NotifierId) {
    let rec = Rc::new(Recorder::default());
    *rec.1.borrow_mut() = Some(k.clone());
    let id = k
        .interval_notifier_insert(pid, start, len, rec.clone())
        .unwrap();
    (rec, id)
}

// ---------------------------------------------------------------------------------------------- part A

/// spec §1.7 `mmap` table, one row per case, in the table's order.
#[test]
fn p2pmem_mmap_follows_the_allocate_file_table() {
    let rows = run(|k| async move {
        let pid = k.create_process();
        let r = p2p_region(&k, 8);
        let other = p2p_region(&k, 4);
        k.remove_p2p_memory(other).await;
        vec![
            k.mmap_p2pmem(pid, r, pages(1), Prot::RW, false, 0).await,
            k.mmap_p2pmem(pid, r, pages(1), Prot::RW, true, 1).await,
            k.mmap_p2pmem(pid, other, pages(1), Prot::RW, true, 0).await,
            k.mmap_p2pmem(pid, 0, pages(1), Prot::RW, true, 0).await, // RAM: no provider state
            k.mmap_p2pmem(pid, r, pages(9), Prot::RW, true, 0).await,
            k.mmap_p2pmem(pid, r, 0, Prot::RW, true, 0).await,
        ]
    });
    assert_eq!(
        rows,
        [
            Err(Errno::EINVAL), // not VM_MAYSHARE
            Err(Errno::EINVAL), // vm_pgoff != 0
            Err(Errno::ENODEV), // provider state gone (removed)
            Err(Errno::ENODEV), // not P2P memory at all
            Err(Errno::ENOMEM), // no contiguous 9 pages in an 8-page pool
            Err(Errno::EINVAL), // zero length (mmap itself)
        ]
    );
}

#[test]
fn p2pmem_mmap_inserts_every_page_eagerly_from_one_contiguous_run() {
    let (va_frames, counts, free, pa0) = run(|k| async move {
        let pid = k.create_process();
        let r = p2p_region(&k, 8);
        let va = k
            .mmap_p2pmem(pid, r, pages(3), Prot::RW, true, 0)
            .await
            .unwrap();
        let frames: Vec<FrameId> = (0..3)
            .map(|i| frame_of(&k, pid, va.add(pages(i))).unwrap())
            .collect();
        let counts: Vec<(u32, u32)> = frames
            .iter()
            .map(|f| {
                let info = k.frame_info(*f);
                (info.refcount, info.mapcount)
            })
            .collect();
        let pa0 = k.frame_pa(frames[0]);
        (frames, counts, k.p2p_memory_free_pages(r), pa0)
    });
    assert_eq!(va_frames[1].0, va_frames[0].0 + 1);
    assert_eq!(va_frames[2].0, va_frames[0].0 + 2);
    assert_eq!(
        counts,
        [(1, 1); 3],
        "the mapping owns each page's only reference"
    );
    assert_eq!(free, 5);
    assert_eq!(
        pa0,
        Pa::from_raw(BAR),
        "first fit: the pool's lowest address"
    );
}

#[test]
fn p2pmem_pages_return_to_the_pool_page_by_page_as_mappings_go() {
    let free = run(|k| async move {
        let pid = k.create_process();
        let r = p2p_region(&k, 8);
        let va = k
            .mmap_p2pmem(pid, r, pages(4), Prot::RW, true, 0)
            .await
            .unwrap();
        let mut free = vec![k.p2p_memory_free_pages(r)];
        k.munmap(pid, va.add(pages(1)), pages(2)).await.unwrap();
        free.push(k.p2p_memory_free_pages(r));
        k.munmap(pid, va, pages(1)).await.unwrap();
        free.push(k.p2p_memory_free_pages(r));
        k.exit(pid).await;
        free.push(k.p2p_memory_free_pages(r));
        free
    });
    assert_eq!(free, [4, 6, 7, 8]);
}

#[test]
fn p2pmem_fork_shares_the_pages_and_the_pool_gets_them_back_when_both_are_gone() {
    let (shared, counts, free, child_reads) = run(|k| async move {
        let pid = k.create_process();
        let r = p2p_region(&k, 4);
        let va = k
            .mmap_p2pmem(pid, r, pages(2), Prot::RW, true, 0)
            .await
            .unwrap();
        k.store(pid, va, b"peer").await.unwrap();
        let child = k.fork(pid).await.unwrap();
        let f = frame_of(&k, pid, va).unwrap();
        let shared = frame_of(&k, child, va) == Some(f);
        let counts = {
            let info = k.frame_info(f);
            (info.refcount, info.mapcount)
        };
        k.store(child, va.add(4), b"!").await.unwrap();
        let mut free = vec![k.p2p_memory_free_pages(r)];
        k.munmap(pid, va, pages(2)).await.unwrap();
        free.push(k.p2p_memory_free_pages(r));
        let mut b = [0u8; 5];
        k.load(child, va, &mut b).await.unwrap();
        k.exit(child).await;
        free.push(k.p2p_memory_free_pages(r));
        (shared, counts, free, b)
    });
    assert!(
        shared,
        "a shared VMA: the child maps the same pages, no COW"
    );
    assert_eq!(counts, (2, 2));
    assert_eq!(free, [2, 2, 4]);
    assert_eq!(&child_reads, b"peer!");
}

#[test]
fn p2pmem_cpu_load_and_store_reach_the_bar_bytes() {
    let (read, via_frame) = run(|k| async move {
        let pid = k.create_process();
        let r = p2p_region(&k, 2);
        let va = k
            .mmap_p2pmem(pid, r, pages(2), Prot::RW, true, 0)
            .await
            .unwrap();
        k.store(pid, va.add(PAGE_SIZE - 2), &[1, 2, 3, 4])
            .await
            .unwrap();
        let mut b = [0u8; 4];
        k.load(pid, va.add(PAGE_SIZE - 2), &mut b).await.unwrap();
        let f = frame_of(&k, pid, va.add(PAGE_SIZE)).unwrap();
        let mut d = [0u8; 2];
        k.read_frame(f, 0, &mut d);
        (b, d)
    });
    assert_eq!(read, [1, 2, 3, 4]);
    assert_eq!(via_frame, [3, 4], "the bytes live in the P2P page");
}

#[test]
fn gup_of_p2pmem_needs_foll_pci_p2pdma_and_a_later_p2p_page_ends_the_walk() {
    let rows = run(|k| async move {
        let pid = k.create_process();
        let r = p2p_region(&k, 4);
        let p2p = k
            .mmap_p2pmem(pid, r, pages(2), Prot::RW, true, 0)
            .await
            .unwrap();
        // Anonymous memory right below it, so one range runs from RAM into P2P memory.
        let anon = MmapArgs {
            addr: Some(Va::from_raw(p2p.raw() - pages(2))),
            len: pages(2),
            prot: Prot::RW,
            private: true,
            anonymous: true,
            fixed_noreplace: true,
            populate: true,
            ..MmapArgs::default()
        };
        let low = k.mmap(pid, &anon).await.unwrap();
        let mut out = Vec::new();
        for (va, n, flags) in [
            (p2p, 2, F::GET),
            (p2p, 2, F::PIN),
            (p2p, 2, F::PIN | F::WRITE | F::PCI_P2PDMA),
            (p2p, 2, F::GET | F::PCI_P2PDMA),
            (low, 4, F::PIN | F::WRITE),
            (low, 4, F::PIN | F::WRITE | F::PCI_P2PDMA),
        ] {
            let f = frame_of(&k, pid, p2p).unwrap();
            let refs_before = k.frame_info(f).refcount;
            let got = k.get_user_pages(pid, va, n, flags).await;
            let refs_held = k.frame_info(f).refcount;
            out.push((got.map(|p| p.len()), refs_held - refs_before));
        }
        out
    });
    assert_eq!(
        rows,
        [
            (Err(Errno::EREMOTEIO), 0), // first page P2P, no flag: the errno
            (Err(Errno::EREMOTEIO), 0),
            (Ok(2), 1024), // a short-term pin with the flag: bias per page
            (Ok(2), 1),
            (Ok(2), 0), // RAM pages pinned, the P2P page ends the walk (partial)
            (Ok(4), 1024),
        ]
    );
}

#[test]
fn hmm_range_fault_reports_p2pmem_pages_as_ordinary_valid_pfns() {
    let (words, frames) = run(|k| async move {
        let pid = k.create_process();
        let r = p2p_region(&k, 2);
        let va = k
            .mmap_p2pmem(pid, r, pages(2), Prot::RW, true, 0)
            .await
            .unwrap();
        let (_rec, n) = recorder(&k, pid, va, pages(2));
        let seq = k.interval_read_begin(pid, n).await;
        let mut range = HmmRange::new(
            pid,
            n,
            seq,
            Range::from_len(va, pages(2)).unwrap(),
            HMM_PFN_REQ_FAULT,
        );
        let lock = k.mmap_lock(pid);
        let g = lock.read().await;
        k.hmm_range_fault(&mut range).await.unwrap();
        drop(g);
        let frames = [
            frame_of(&k, pid, va).unwrap(),
            frame_of(&k, pid, va.add(PAGE_SIZE)).unwrap(),
        ];
        (range.hmm_pfns, frames)
    });
    for (w, f) in words.iter().zip(frames) {
        assert_eq!(
            w & (HMM_PFN_VALID | HMM_PFN_WRITE),
            HMM_PFN_VALID | HMM_PFN_WRITE
        );
        assert_eq!(hmm_pfn_to_frame(*w), f);
    }
}

/// spec §1.2 lifecycle: unbind zaps every mapping in a CLEAR invalidation, then waits for pins.
#[test]
fn removing_p2p_memory_zaps_mappings_and_waits_for_pins_to_drop() {
    let sim = Sim::new(SimConfig::default());
    let k = Kernel::new(&sim, 64 << 20, MmCosts::zero());
    let r = p2p_region(&k, 4);
    let pid = k.create_process();
    let log: Rc<RefCell<Vec<String>>> = Rc::default();
    let slot: Rc<RefCell<Option<PinnedPages>>> = Rc::default();
    let rec_slot: RecorderSlot = Rc::default();
    {
        let (k, log, slot, rec_slot, s) = (
            k.clone(),
            log.clone(),
            slot.clone(),
            rec_slot.clone(),
            sim.clone(),
        );
        sim.spawn("app", async move {
            let va = k
                .mmap_p2pmem(pid, r, pages(3), Prot::RW, true, 0)
                .await
                .unwrap();
            let (rec, _) = recorder(&k, pid, va, pages(3));
            *rec_slot.borrow_mut() = Some((rec, va));
            let pin = k
                .get_user_pages(pid, va.add(PAGE_SIZE), 1, F::PIN | F::PCI_P2PDMA)
                .await
                .unwrap();
            *slot.borrow_mut() = Some(pin);
            s.sleep(SimDuration::from_micros(10)).await;
            k.remove_p2p_memory(r).await;
            log.borrow_mut().push(format!(
                "removed at {} free {}",
                s.now().0,
                k.p2p_memory_free_pages(r)
            ));
        });
    }
    {
        let (k, log, slot, s) = (k.clone(), log.clone(), slot.clone(), sim.clone());
        sim.spawn("io", async move {
            s.sleep(SimDuration::from_micros(20)).await;
            // Mid-removal: the mappings are gone, the pinned page is still out of the pool.
            let va = k.vmas(pid)[0].range.start;
            let mut b = [0u8; 1];
            let sig = k.load(pid, va, &mut b).await;
            let again = k.mmap_p2pmem(pid, r, pages(1), Prot::RW, true, 0).await;
            log.borrow_mut().push(format!(
                "during: {sig:?} {again:?} free {}",
                k.p2p_memory_free_pages(r)
            ));
            s.sleep(SimDuration::from_micros(30)).await;
            drop(slot.borrow_mut().take());
            log.borrow_mut().push(format!("unpinned at {}", s.now().0));
        });
    }
    assert_eq!(sim.run(), RunOutcome::Completed);
    let (rec, va) = rec_slot.borrow_mut().take().unwrap();
    assert_eq!(
        *log.borrow(),
        [
            format!("during: Err(SigInfo {{ signo: Bus, addr: {va:?} }}) Err(ENODEV) free 3"),
            "unpinned at 50000".to_owned(),
            "removed at 50000 free 4".to_owned(),
        ]
    );
    assert_eq!(
        *rec.0.borrow(),
        [(NotifierEvent::Clear, Range::from_len(va, pages(3)).unwrap())]
    );
    assert_eq!(k.vmas(pid).len(), 1, "the VMA stays");
}

#[test]
fn removing_p2p_memory_zaps_every_process_that_maps_it() {
    let free = run(|k| async move {
        let pid = k.create_process();
        let r = p2p_region(&k, 4);
        k.mmap_p2pmem(pid, r, pages(2), Prot::RW, true, 0)
            .await
            .unwrap();
        let _child = k.fork(pid).await.unwrap();
        let other = k.create_process();
        k.mmap_p2pmem(other, r, pages(1), Prot::READ, true, 0)
            .await
            .unwrap();
        let before = k.p2p_memory_free_pages(r);
        k.remove_p2p_memory(r).await;
        (before, k.p2p_memory_free_pages(r))
    });
    assert_eq!(free, (1, 4));
}

// ---------------------------------------------------------------------------------------------- part B

fn mmio_bar(k: &Kernel, nr_pages: u64) -> peerdma_mm::MmioId {
    let start = Pa::from_raw(BAR + 0x1000_0000);
    k.add_mmio(PROVIDER, Range::from_len(start, pages(nr_pages)).unwrap())
}

#[test]
fn pfnmap_mmio_maps_raw_pfns_that_cpu_and_peers_share() {
    let (cpu_sees, peer_sees, follow, pte_frame) = run(|k| async move {
        let pid = k.create_process();
        let bar = mmio_bar(&k, 4);
        let va = k
            .mmap_pfnmap_mmio(pid, bar, pages(1), pages(2), Prot::RW)
            .await
            .unwrap();
        let bar_pa = Pa::from_raw(BAR + 0x1000_0000);
        // The first VMA page is BAR page 1.
        k.store(pid, va.add(PAGE_SIZE - 1), &[0xaa, 0xbb])
            .await
            .unwrap();
        let mut peer = [0u8; 2];
        k.mmio_read(DeviceId(3), bar_pa.add(pages(2) - 1), &mut peer)
            .unwrap();
        k.mmio_write(DeviceId(3), bar_pa.add(pages(2) + 8), &[0xcc])
            .unwrap();
        let mut cpu = [0u8; 1];
        k.load(pid, va.add(PAGE_SIZE + 8), &mut cpu).await.unwrap();
        let follow = k.follow_pfnmap(pid, va.add(PAGE_SIZE + 8));
        let pte = k.pte_at(pid, va).unwrap();
        (
            cpu,
            peer,
            follow.map(|(id, pa)| (id == bar, pa == bar_pa.add(pages(2) + 8))),
            pte.frame(),
        )
    });
    assert_eq!(cpu_sees, [0xcc], "a peer's DMA write is what the CPU reads");
    assert_eq!(peer_sees, [0xaa, 0xbb], "a CPU store is what a peer reads");
    assert_eq!(follow, Some((true, true)));
    assert_eq!(pte_frame, None, "a PFN entry names no frame");
}

#[test]
fn pfnmap_mmio_rejects_ranges_outside_the_bar() {
    let rows = run(|k| async move {
        let pid = k.create_process();
        let bar = mmio_bar(&k, 4);
        vec![
            k.mmap_pfnmap_mmio(pid, bar, 0, pages(4), Prot::RW)
                .await
                .is_ok(),
            k.mmap_pfnmap_mmio(pid, bar, pages(3), pages(2), Prot::RW)
                .await
                == Err(Errno::EINVAL),
            k.mmap_pfnmap_mmio(pid, bar, 0, pages(5), Prot::RW).await == Err(Errno::EINVAL),
            k.mmap_pfnmap_mmio(pid, bar, 100, pages(1), Prot::RW).await == Err(Errno::EINVAL),
            k.mmap_pfnmap_mmio(pid, bar, 0, 0, Prot::RW).await == Err(Errno::EINVAL),
            k.mmap_pfnmap_mmio(pid, peerdma_mm::MmioId(9), 0, pages(1), Prot::RW)
                .await
                == Err(Errno::ENODEV),
            k.mmio_read(
                DeviceId(3),
                Pa::from_raw(BAR + 0x1000_0000 + pages(4) - 1),
                &mut [0; 2],
            ) == Err(Errno::EFAULT),
        ]
    });
    assert_eq!(rows, [true; 7]);
}

#[test]
fn gup_and_hmm_refuse_a_pfnmap_mmio_vma_and_fork_does_not_copy_it() {
    let (gup, hmm, child) = run(|k| async move {
        let pid = k.create_process();
        let bar = mmio_bar(&k, 2);
        let va = k
            .mmap_pfnmap_mmio(pid, bar, 0, pages(2), Prot::RW)
            .await
            .unwrap();
        let gup = k
            .get_user_pages(pid, va, 1, F::PIN | F::PCI_P2PDMA)
            .await
            .map(|p| p.len());
        let (_rec, n) = recorder(&k, pid, va, pages(2));
        let seq = k.interval_read_begin(pid, n).await;
        let mut range = HmmRange::new(
            pid,
            n,
            seq,
            Range::from_len(va, pages(2)).unwrap(),
            HMM_PFN_REQ_FAULT,
        );
        let hmm = {
            let lock = k.mmap_lock(pid);
            let _g = lock.read().await;
            k.hmm_range_fault(&mut range).await
        };
        let child = k.fork(pid).await.unwrap();
        let mut b = [0u8; 1];
        let c = k.load(child, va, &mut b).await;
        (gup, hmm, c)
    });
    assert_eq!(gup, Err(Errno::EFAULT));
    assert_eq!(hmm, Err(Errno::EFAULT));
    assert!(
        matches!(
            child,
            Err(SigInfo {
                signo: Signal::Segv,
                ..
            })
        ),
        "VM_DONTCOPY"
    );
}

#[test]
fn revoking_mmio_zaps_pfn_entries_and_a_later_peer_access_is_a_violation() {
    let (v, outcome) = run_outcome(|k| async move {
        let pid = k.create_process();
        let bar = mmio_bar(&k, 2);
        let va = k
            .mmap_pfnmap_mmio(pid, bar, 0, pages(2), Prot::RW)
            .await
            .unwrap();
        k.store(pid, va, &[1]).await.unwrap();
        let (rec, _) = recorder(&k, pid, va, pages(2));
        k.revoke_mmio(bar).await;
        let events = rec.0.borrow().clone();
        let mut b = [0u8; 1];
        let cpu = k.load(pid, va, &mut b).await;
        let again = k.mmap_pfnmap_mmio(pid, bar, 0, pages(1), Prot::RW).await;
        let follow = k.follow_pfnmap(pid, va);
        let vmas = k.vmas(pid).len();
        let peer = k.mmio_read(DeviceId(3), Pa::from_raw(BAR + 0x1000_0000), &mut b);
        let kinds: Vec<ViolationKind> = k.oracle_violations().iter().map(|v| v.kind).collect();
        (events, cpu, again, follow, vmas, peer, kinds, va)
    });
    let (events, cpu, again, follow, vmas, peer, kinds, va) = v.unwrap();
    assert_eq!(
        events,
        [(NotifierEvent::Clear, Range::from_len(va, pages(2)).unwrap())]
    );
    assert_eq!(cpu, Err(SigInfo::bus(va)));
    assert_eq!(again, Err(Errno::ENODEV));
    assert_eq!(follow, None);
    assert_eq!(vmas, 1, "the VMA stays");
    assert_eq!(peer, Err(Errno::ENODEV));
    assert_eq!(kinds, [ViolationKind::RemovedBar]);
    assert!(
        matches!(outcome, RunOutcome::Stopped(_)),
        "the oracle stops the run"
    );
}

/// mm/madvise.c `madvise_dontneed_free_valid_vma` and mm/mremap.c `vma_to_resize`: a `remap_pfn_range`
/// mapping can be neither zapped by MADV_DONTNEED (EINVAL) nor grown by mremap (EFAULT); its entries stay.
#[test]
fn pfnmap_mmio_refuses_dontneed_and_growing_mremap() {
    let (dontneed, grow, still_mapped) = run(|k| async move {
        let pid = k.create_process();
        let bar = mmio_bar(&k, 4);
        let va = k
            .mmap_pfnmap_mmio(pid, bar, 0, pages(2), Prot::RW)
            .await
            .unwrap();
        let dontneed = k
            .madvise(pid, va, pages(2), peerdma_mm::Advice::DontNeed)
            .await;
        let grow = k
            .mremap(
                pid,
                va,
                pages(2),
                pages(4),
                peerdma_mm::MremapFlags {
                    maymove: true,
                    ..peerdma_mm::MremapFlags::default()
                },
            )
            .await;
        let still = k.follow_pfnmap(pid, va).is_some();
        (dontneed, grow, still)
    });
    assert_eq!(dontneed, Err(Errno::EINVAL));
    assert_eq!(grow, Err(Errno::EFAULT));
    assert!(still_mapped);
}
