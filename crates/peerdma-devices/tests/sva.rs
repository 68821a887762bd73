//! End-to-end tests of the SVA accelerator against the kernel model: ATS translation, PRI responses, the
//! secondary-TLB flush waiting for the ATC invalidation, exit and unbind ordering, and the checkers catching
//! the injected bugs.
#![expect(
    clippy::tests_outside_test_module,
    clippy::unwrap_used,
    clippy::many_single_char_names,
    reason = "an integration-test crate is all tests"
)]

use std::cell::RefCell;
use std::rc::Rc;

use peerdma_core::{DeviceId, Errno, PAGE_SIZE, Pid, SimDuration, SimTime, Va};
use peerdma_devices::{
    CompletionRecord, CompletionStatus, Descriptor, SvaAccel, SvaAccelConfig, SvaCosts,
    SvaDevError, SvaInjection, SvaIommu,
};
use peerdma_iommu::{AtcConfig, Pasid, SvaDeviceInfo};
use peerdma_mm::{Kernel, MmCosts, MmapArgs, Prot};
use peerdma_sim::{RunOutcome, Sim, SimConfig};

fn setup(seed: u64, explore: bool) -> (Sim, Rc<Kernel>, SvaIommu) {
    let sim = Sim::new(SimConfig {
        seed,
        explore,
        time_limit: SimTime(10_000_000_000),
        ..SimConfig::default()
    });
    let k = Kernel::new(&sim, 256 << 20, MmCosts::calibrated());
    let iommu = SvaIommu::new(&k, SvaCosts::calibrated(), 1 << 20);
    (sim, k, iommu)
}

fn accel(iommu: &SvaIommu, id: u32, group: u32) -> SvaAccel {
    SvaAccel::new(
        iommu,
        DeviceId(id),
        &format!("sva{id}"),
        SvaAccelConfig {
            info: SvaDeviceInfo {
                group: Some(group),
                iommu: 0,
                max_pasids: 1 << 20,
                domain_alloc_sva: true,
            },
            atc: AtcConfig::default(),
            wq_depth: 8,
        },
    )
    .unwrap()
}

fn anon(len: u64, prot: Prot, populate: bool) -> MmapArgs {
    MmapArgs {
        len,
        prot,
        private: true,
        anonymous: true,
        populate,
        ..MmapArgs::default()
    }
}

fn page(b: Va, i: u64) -> Va {
    b.add(i * PAGE_SIZE)
}

/// Runs `f` as the only agent and returns what it returned.
fn run_one<T: 'static>(sim: &Sim, f: impl AsyncFnOnce() -> T + 'static) -> T {
    let out: Rc<RefCell<Option<T>>> = Rc::default();
    let o = out.clone();
    sim.spawn("main", async move {
        *o.borrow_mut() = Some(f().await);
    });
    assert_eq!(sim.run(), RunOutcome::Completed);
    out.borrow_mut().take().unwrap()
}

async fn load_u64(k: &Kernel, pid: Pid, va: Va) -> u64 {
    let mut b = [0u8; 8];
    k.load(pid, va, &mut b).await.unwrap();
    u64::from_le_bytes(b)
}

#[test]
fn fill_and_copy_through_pri_and_the_atc_land_in_user_memory_with_completion_records() {
    let (sim, k, iommu) = setup(0, false);
    let dev = accel(&iommu, 1, 0);
    let (k2, d2) = (k.clone(), dev.clone());
    let (fill, copy, value, status_byte) = run_one(&sim, async move || {
        let pid = k2.create_process();
        // Nothing populated: every first touch is a page request.
        let buf = k2
            .mmap(pid, &anon(16 * PAGE_SIZE, Prot::RW, false))
            .await
            .unwrap();
        let dst = k2
            .mmap(pid, &anon(16 * PAGE_SIZE, Prot::RW, false))
            .await
            .unwrap();
        let comp = k2
            .mmap(pid, &anon(PAGE_SIZE, Prot::RW, false))
            .await
            .unwrap();
        d2.bind(pid).unwrap();
        let j = d2
            .submit(
                pid,
                Descriptor::Fill {
                    dst: buf,
                    len: 16 * PAGE_SIZE,
                    pattern: 0x1122_3344_5566_7788,
                },
                comp,
                true,
            )
            .unwrap();
        let fill = d2.wait(j).await.unwrap();
        let j = d2
            .submit(
                pid,
                Descriptor::Copy {
                    src: buf,
                    dst,
                    len: 16 * PAGE_SIZE,
                },
                comp,
                true,
            )
            .unwrap();
        let copy = d2.wait(j).await.unwrap();
        let value = load_u64(&k2, pid, page(dst, 15)).await;
        let mut status = [0u8; 1];
        k2.load(pid, comp, &mut status).await.unwrap();
        d2.unbind(pid).await.unwrap();
        (fill, copy, value, status[0])
    });
    let ok = CompletionRecord {
        status: CompletionStatus::Success,
        bytes_completed: 16 * PAGE_SIZE,
        fault_addr: None,
    };
    assert_eq!((fill, copy), (ok, ok));
    assert_eq!(value, 0x1122_3344_5566_7788);
    assert_eq!(status_byte, CompletionStatus::Success.code());
    let m = sim.metrics();
    // 16 pages of buf + 16 of dst + the completion page fault in once each.
    assert_eq!(m.get("sva.pri_success"), 33);
    assert!(
        m.get("sva.atc_hits") >= 16,
        "the copy's source pages hit the ATC"
    );
    assert_eq!(k.oracle_violations(), vec![]);
}

#[test]
fn a_fault_outside_any_vma_is_invalid_and_completes_with_page_fault() {
    let (sim, k, iommu) = setup(0, false);
    let dev = accel(&iommu, 1, 0);
    let (rec, buf) = run_one(&sim, async move || {
        let pid = k.create_process();
        let buf = k
            .mmap(pid, &anon(5 * PAGE_SIZE, Prot::RW, true))
            .await
            .unwrap();
        k.munmap(pid, page(buf, 3), 2 * PAGE_SIZE).await.unwrap();
        dev.bind(pid).unwrap();
        let j = dev
            .submit(
                pid,
                Descriptor::Fill {
                    dst: page(buf, 1),
                    len: 4 * PAGE_SIZE,
                    pattern: 7,
                },
                buf,
                true,
            )
            .unwrap();
        (dev.wait(j).await.unwrap(), buf)
    });
    assert_eq!(rec.status, CompletionStatus::PageFault);
    assert_eq!(rec.bytes_completed, 2 * PAGE_SIZE);
    assert_eq!(rec.fault_addr, Some(page(buf, 3)));
    assert_eq!(sim.metrics().get("sva.pri_invalid"), 1);
}

#[test]
fn a_write_request_on_a_read_only_vma_is_invalid() {
    let (sim, k, iommu) = setup(0, false);
    let dev = accel(&iommu, 1, 0);
    let rec = run_one(&sim, async move || {
        let pid = k.create_process();
        let ro = k
            .mmap(pid, &anon(PAGE_SIZE, Prot::READ, true))
            .await
            .unwrap();
        let comp = k.mmap(pid, &anon(PAGE_SIZE, Prot::RW, true)).await.unwrap();
        dev.bind(pid).unwrap();
        let j = dev
            .submit(
                pid,
                Descriptor::Fill {
                    dst: ro,
                    len: PAGE_SIZE,
                    pattern: 1,
                },
                comp,
                true,
            )
            .unwrap();
        dev.wait(j).await.unwrap()
    });
    assert_eq!(
        (rec.status, rec.bytes_completed),
        (CompletionStatus::PageFault, 0)
    );
    assert_eq!(sim.metrics().get("sva.pri_invalid"), 1);
}

#[test]
fn a_group_the_fault_worker_cannot_take_is_answered_failure() {
    let (sim, k, iommu) = setup(0, false);
    iommu.set_iopf_limit(Some(0));
    let dev = accel(&iommu, 1, 0);
    let rec = run_one(&sim, async move || {
        let pid = k.create_process();
        let buf = k
            .mmap(pid, &anon(PAGE_SIZE, Prot::RW, false))
            .await
            .unwrap();
        let comp = k.mmap(pid, &anon(PAGE_SIZE, Prot::RW, true)).await.unwrap();
        dev.bind(pid).unwrap();
        let j = dev
            .submit(
                pid,
                Descriptor::Fill {
                    dst: buf,
                    len: PAGE_SIZE,
                    pattern: 1,
                },
                comp,
                true,
            )
            .unwrap();
        dev.wait(j).await.unwrap()
    });
    assert_eq!(rec.status, CompletionStatus::PageFault);
    assert_eq!(sim.metrics().get("sva.pri_failure"), 1);
}

#[test]
fn without_block_on_fault_a_missing_page_completes_at_once_without_pri() {
    let (sim, k, iommu) = setup(0, false);
    let dev = accel(&iommu, 1, 0);
    let rec = run_one(&sim, async move || {
        let pid = k.create_process();
        let buf = k
            .mmap(pid, &anon(2 * PAGE_SIZE, Prot::RW, false))
            .await
            .unwrap();
        let comp = k.mmap(pid, &anon(PAGE_SIZE, Prot::RW, true)).await.unwrap();
        k.store(pid, buf, &[1]).await.unwrap();
        dev.bind(pid).unwrap();
        let j = dev
            .submit(
                pid,
                Descriptor::Fill {
                    dst: buf,
                    len: 2 * PAGE_SIZE,
                    pattern: 1,
                },
                comp,
                false,
            )
            .unwrap();
        dev.wait(j).await.unwrap()
    });
    assert_eq!(rec.status, CompletionStatus::PageFault);
    assert_eq!(rec.bytes_completed, PAGE_SIZE);
    assert_eq!(sim.metrics().get("sva.pri_requests"), 0);
}

#[test]
fn a_full_work_queue_refuses_with_eagain() {
    let (sim, k, iommu) = setup(0, false);
    let dev = accel(&iommu, 1, 0);
    let errs = run_one(&sim, async move || {
        let pid = k.create_process();
        let buf = k
            .mmap(pid, &anon(64 * PAGE_SIZE, Prot::RW, true))
            .await
            .unwrap();
        dev.bind(pid).unwrap();
        let mut jobs = Vec::new();
        let mut errs = Vec::new();
        for i in 0..10 {
            match dev.submit(
                pid,
                Descriptor::Fill {
                    dst: page(buf, i * 4 + 1),
                    len: 3 * PAGE_SIZE,
                    pattern: i,
                },
                page(buf, i * 4),
                true,
            ) {
                Ok(j) => jobs.push(j),
                Err(e) => errs.push(e),
            }
        }
        for j in jobs {
            assert_eq!(dev.wait(j).await.unwrap().status, CompletionStatus::Success);
        }
        errs
    });
    assert_eq!(
        errs,
        vec![SvaDevError::Errno(Errno::EAGAIN); 2],
        "8 fit the queue"
    );
}

#[test]
fn the_same_process_binds_to_the_same_pasid_and_another_gets_its_own() {
    let (sim, k, iommu) = setup(0, false);
    let a = accel(&iommu, 1, 0);
    let b = accel(&iommu, 2, 1);
    let pasids = run_one(&sim, async move || {
        let p1 = k.create_process();
        let p2 = k.create_process();
        let x = a.bind(p1).unwrap();
        let y = a.bind(p1).unwrap();
        let z = b.bind(p1).unwrap();
        let w = a.bind(p2).unwrap();
        a.unbind(p1).await.unwrap();
        a.unbind(p1).await.unwrap();
        let e = a.unbind(p1).await;
        (x, y, z, w, e)
    });
    assert_eq!(
        (pasids.0, pasids.1, pasids.2),
        (Pasid(1), Pasid(1), Pasid(1))
    );
    assert_eq!(pasids.3, Pasid(2));
    assert_eq!(pasids.4, Err(SvaDevError::NotBound(1)));
}

/// The accelerator streams fills over a buffer while the process munmaps, mprotects, forks and re-maps
/// parts of it. Returns the run's outcome.
fn munmap_race(seed: u64, injection: SvaInjection) -> (RunOutcome, Rc<Kernel>) {
    let (sim, k, iommu) = setup(seed, true);
    iommu.inject(injection);
    let dev = accel(&iommu, 1, 0);
    let pages = 32u64;
    let buf: Rc<RefCell<Option<(Pid, Va)>>> = Rc::default();
    {
        let (k, buf, dev) = (k.clone(), buf.clone(), dev.clone());
        sim.spawn("streamer", async move {
            let pid = k.create_process();
            let b = k
                .mmap(pid, &anon(pages * PAGE_SIZE, Prot::RW, true))
                .await
                .unwrap();
            let comp = k.mmap(pid, &anon(PAGE_SIZE, Prot::RW, true)).await.unwrap();
            dev.bind(pid).unwrap();
            *buf.borrow_mut() = Some((pid, b));
            for round in 0..4 {
                let j = dev
                    .submit(
                        pid,
                        Descriptor::Copy {
                            src: b,
                            dst: b.add(pages / 2 * PAGE_SIZE),
                            len: pages / 2 * PAGE_SIZE,
                        },
                        comp,
                        true,
                    )
                    .unwrap();
                let _ = dev.wait(j).await;
                let j = dev
                    .submit(
                        pid,
                        Descriptor::Fill {
                            dst: b,
                            len: pages * PAGE_SIZE,
                            pattern: round,
                        },
                        comp,
                        true,
                    )
                    .unwrap();
                let _ = dev.wait(j).await;
            }
            dev.unbind(pid).await.unwrap();
        });
    }
    {
        let (k, buf) = (k.clone(), buf.clone());
        let mut rng = sim.rng("cpu");
        let s = sim.clone();
        sim.spawn("cpu", async move {
            let (pid, b) = loop {
                if let Some(x) = *buf.borrow() {
                    break x;
                }
                s.sleep(SimDuration::from_nanos(100)).await;
            };
            for _ in 0..3 {
                s.sleep(SimDuration::from_nanos(rng.between(0, 20_000)))
                    .await;
                let at = rng.between(0, pages - 4);
                match rng.between(0, 3) {
                    0 => {
                        k.munmap(pid, page(b, at), 2 * PAGE_SIZE).await.unwrap();
                        // Reuse freed frames at once, so a stale translation reaches other data.
                        let o = k
                            .mmap(pid, &anon(4 * PAGE_SIZE, Prot::RW, true))
                            .await
                            .unwrap();
                        k.store(pid, o, &[0xa5; 4096]).await.unwrap();
                    }
                    1 => {
                        k.mprotect(pid, page(b, at), 2 * PAGE_SIZE, Prot::READ)
                            .await
                            .unwrap();
                    }
                    _ => {
                        let child = k.fork(pid).await.unwrap();
                        // The page may be read-only or gone by now: a SIGSEGV is fine.
                        let _ = k.store(pid, page(b, at), &[1]).await;
                        k.exit(child).await;
                    }
                }
            }
        });
    }
    (sim.run(), k)
}

#[test]
fn the_munmap_mprotect_fork_race_is_clean_on_every_seed() {
    for seed in 0..40 {
        let (outcome, k) = munmap_race(seed, SvaInjection::None);
        assert_eq!(
            outcome,
            RunOutcome::Completed,
            "seed {seed}: {:?}",
            k.oracle_violations()
        );
    }
}

#[test]
fn skipping_the_atc_invalidation_wait_is_caught_within_1000_seeds() {
    let caught = (0..1000).find(|&seed| {
        matches!(
            munmap_race(seed, SvaInjection::SkipAtcWait).0,
            RunOutcome::Stopped(r) if r.contains("stale translation") || r.contains("use after free")
        )
    });
    eprintln!("skip-wait caught at seed {caught:?}");
    assert!(
        caught.is_some(),
        "no seed exposed the missing ATC invalidation wait"
    );
}

#[test]
fn answering_a_page_group_twice_is_caught_within_1000_seeds() {
    let caught = (0..1000).find(|&seed| {
        matches!(munmap_race(seed, SvaInjection::RespondTwice).0, RunOutcome::Stopped(r) if r.contains("rotocol"))
    });
    eprintln!("double response caught at seed {caught:?}");
    assert!(caught.is_some(), "no seed exposed the double response");
}

#[test]
fn exit_while_the_device_runs_aborts_its_dma_and_keeps_the_pasid_until_unbind() {
    let (sim, k, iommu) = setup(0, false);
    let dev = accel(&iommu, 1, 0);
    let out: Rc<RefCell<Vec<String>>> = Rc::default();
    let (k2, d2, o2, io2) = (k.clone(), dev.clone(), out.clone(), iommu.clone());
    sim.spawn("main", async move {
        let pid = k2.create_process();
        let buf = k2
            .mmap(pid, &anon(256 * PAGE_SIZE, Prot::RW, true))
            .await
            .unwrap();
        let pasid = d2.bind(pid).unwrap();
        let j = d2
            .submit(
                pid,
                Descriptor::Fill {
                    dst: page(buf, 1),
                    len: 255 * PAGE_SIZE,
                    pattern: 3,
                },
                buf,
                true,
            )
            .unwrap();
        k2.sim.sleep(SimDuration::from_micros(20)).await;
        k2.exit(pid).await;
        let rec = d2.wait(j).await.unwrap();
        o2.borrow_mut().push(format!("{:?}", rec.status));
        // The PASID is still held: a new process gets another one.
        let p2 = k2.create_process();
        let p = d2.bind(p2).unwrap();
        o2.borrow_mut().push(format!("{}", p != pasid));
        d2.unbind(p2).await.unwrap();
        d2.unbind(pid).await.unwrap();
        o2.borrow_mut()
            .push(format!("{}", io2.mm_pasid(pid).is_none()));
        let p3 = k2.create_process();
        o2.borrow_mut()
            .push(format!("{}", d2.bind(p3).unwrap() == pasid));
    });
    assert_eq!(sim.run(), RunOutcome::Completed);
    assert_eq!(*out.borrow(), vec!["Aborted", "true", "true", "true"]);
    assert_eq!(iommu.stats().aborts, 1);
    assert_eq!(k.oracle_violations(), vec![]);
}

#[test]
fn an_invalidation_waits_for_the_atc_invalidation_to_complete() {
    // munmap of pages the device is writing returns only after the device's requests landed.
    let (sim, k, iommu) = setup(0, false);
    let dev = accel(&iommu, 1, 0);
    let (k2, d2) = (k.clone(), dev.clone());
    let (t_start, t_end, inflight_after) = run_one(&sim, async move || {
        let pid = k2.create_process();
        let buf = k2
            .mmap(pid, &anon(64 * PAGE_SIZE, Prot::RW, true))
            .await
            .unwrap();
        let comp = k2
            .mmap(pid, &anon(PAGE_SIZE, Prot::RW, true))
            .await
            .unwrap();
        d2.bind(pid).unwrap();
        let j = d2
            .submit(
                pid,
                Descriptor::Fill {
                    dst: buf,
                    len: 64 * PAGE_SIZE,
                    pattern: 9,
                },
                comp,
                true,
            )
            .unwrap();
        // Let it get going, then unmap everything under it.
        while d2.space().nr_in_flight() == 0 {
            k2.sim.sleep(SimDuration::from_nanos(10)).await;
        }
        let t0 = k2.sim.now();
        k2.munmap(pid, buf, 64 * PAGE_SIZE).await.unwrap();
        let t1 = k2.sim.now();
        let after = d2
            .space()
            .nr_in_flight_in(pid, peerdma_core::Range::new(buf, buf.add(64 * PAGE_SIZE)));
        let rec = d2.wait(j).await.unwrap();
        assert_eq!(rec.status, CompletionStatus::PageFault);
        (t0, t1, after)
    });
    assert_eq!(
        inflight_after, 0,
        "no request of the range is in flight once munmap returned"
    );
    assert!(
        t_end.0 - t_start.0 >= SvaCosts::calibrated().ats_invalidation.as_nanos(),
        "munmap waited for the ATC invalidation's completion"
    );
    assert!(sim.metrics().get("sva.atc_invalidations") >= 1);
    assert_eq!(k.oracle_violations(), vec![]);
}

#[test]
fn a_large_flush_becomes_a_whole_pasid_flush() {
    let (sim, k, iommu) = setup(0, false);
    let dev = accel(&iommu, 1, 0);
    let io = iommu.clone();
    let (k2, d2) = (k.clone(), dev.clone());
    run_one(&sim, async move || {
        let pid = k2.create_process();
        let small = k2
            .mmap(pid, &anon(4 * PAGE_SIZE, Prot::RW, true))
            .await
            .unwrap();
        let big = k2
            .mmap(pid, &anon(1024 * PAGE_SIZE, Prot::RW, true))
            .await
            .unwrap();
        d2.bind(pid).unwrap();
        let j = d2
            .submit(
                pid,
                Descriptor::Fill {
                    dst: small.add(PAGE_SIZE),
                    len: 3 * PAGE_SIZE,
                    pattern: 1,
                },
                small,
                true,
            )
            .unwrap();
        d2.wait(j).await.unwrap();
        assert_eq!(d2.atc_len(), 4);
        k2.munmap(pid, big, 1024 * PAGE_SIZE).await.unwrap();
        assert_eq!(d2.atc_len(), 0, "the whole PASID was flushed");
        assert_eq!(io.stats().full_flushes, 1);
    });
}

#[test]
fn two_busy_devices_overflow_the_unit_queue_and_still_complete() {
    let (sim, k, iommu) = setup(0, false);
    iommu.set_prq_entries(2);
    let a = accel(&iommu, 1, 0);
    let b = accel(&iommu, 2, 1);
    let io = iommu.clone();
    let recs = run_one(&sim, async move || {
        let pid = k.create_process();
        let buf = k
            .mmap(pid, &anon(64 * PAGE_SIZE, Prot::RW, false))
            .await
            .unwrap();
        let comp = k
            .mmap(pid, &anon(16 * PAGE_SIZE, Prot::RW, true))
            .await
            .unwrap();
        a.bind(pid).unwrap();
        b.bind(pid).unwrap();
        let mut jobs = Vec::new();
        for i in 0..8 {
            let d = if i % 2 == 0 { &a } else { &b };
            let j = d
                .submit(
                    pid,
                    Descriptor::Fill {
                        dst: page(buf, i * 8),
                        len: 8 * PAGE_SIZE,
                        pattern: i,
                    },
                    page(comp, i),
                    true,
                )
                .unwrap();
            jobs.push((d.clone(), j));
        }
        let mut recs = Vec::new();
        for (d, j) in jobs {
            recs.push(d.wait(j).await.unwrap().status);
        }
        recs
    });
    assert!(
        recs.iter().all(|s| *s == CompletionStatus::Success),
        "{recs:?}"
    );
    let st = io.pri_stats(0);
    assert!(st.overflows >= 1 && st.dropped >= 1, "{st:?}");
    assert!(sim.metrics().get("sva.pri_auto_responses") >= 1);
}

#[test]
fn a_device_write_to_a_cow_shared_page_raises_a_write_page_request_that_breaks_cow() {
    let (sim, k, iommu) = setup(0, false);
    let dev = accel(&iommu, 1, 0);
    let (k2, d2) = (k.clone(), dev.clone());
    let (parent, child, frames_differ) = run_one(&sim, async move || {
        let pid = k2.create_process();
        let buf = k2
            .mmap(pid, &anon(2 * PAGE_SIZE, Prot::RW, true))
            .await
            .unwrap();
        k2.store(pid, buf, &7u64.to_le_bytes()).await.unwrap();
        d2.bind(pid).unwrap();
        // The device caches a translation of the page; fork write-protects it and the flush drops the entry,
        // so the device's next write misses, finds the PTE read-only and sends a write page request.
        let j = d2
            .submit(
                pid,
                Descriptor::Copy {
                    src: buf,
                    dst: page(buf, 1),
                    len: PAGE_SIZE,
                },
                page(buf, 1),
                true,
            )
            .unwrap();
        d2.wait(j).await.unwrap();
        let child = k2.fork(pid).await.unwrap();
        let j = d2
            .submit(
                pid,
                Descriptor::Fill {
                    dst: buf,
                    len: PAGE_SIZE,
                    pattern: 9,
                },
                page(buf, 1),
                true,
            )
            .unwrap();
        assert_eq!(d2.wait(j).await.unwrap().status, CompletionStatus::Success);
        let differ = k2.translate(pid, buf).unwrap().0 != k2.translate(child, buf).unwrap().0;
        (
            load_u64(&k2, pid, buf).await,
            load_u64(&k2, child, buf).await,
            differ,
        )
    });
    assert_eq!(
        (parent, child),
        (9, 7),
        "the device's write went to the parent's own copy"
    );
    assert!(frames_differ);
    let m = sim.metrics();
    assert_eq!(
        m.get("sva.pri_success"),
        2,
        "write page requests broke COW of the data page and of the completion record's page"
    );
    assert!(
        m.get("sva.iotlb_invalidations") >= 1,
        "fork's write-protect flushed the PASID"
    );
    assert_eq!(k.oracle_violations(), vec![]);
}

#[test]
fn an_atc_invalidation_timeout_proceeds_and_the_later_stale_use_is_flagged() {
    let (sim, k, iommu) = setup(0, false);
    let dev = accel(&iommu, 1, 0);
    let io = iommu.clone();
    let (k2, d2) = (k.clone(), dev.clone());
    sim.spawn("main", async move {
        let pid = k2.create_process();
        let buf = k2
            .mmap(pid, &anon(PAGE_SIZE, Prot::RW, true))
            .await
            .unwrap();
        let comp = k2
            .mmap(pid, &anon(PAGE_SIZE, Prot::RW, true))
            .await
            .unwrap();
        d2.bind(pid).unwrap();
        let fill = Descriptor::Fill {
            dst: buf,
            len: PAGE_SIZE,
            pattern: 1,
        };
        let j = d2.submit(pid, fill, comp, true).unwrap();
        d2.wait(j).await.unwrap();
        io.inject(SvaInjection::IgnoreAtcInvalidation);
        let t0 = k2.sim.now();
        k2.munmap(pid, buf, PAGE_SIZE).await.unwrap();
        assert!(k2.sim.now().0 - t0.0 >= peerdma_devices::sva::ATC_INV_TIMEOUT.as_nanos());
        // The device still holds the entry: its next write reaches a page the process no longer maps.
        let j = d2.submit(pid, fill, comp, true).unwrap();
        let _ = d2.wait(j).await;
    });
    let outcome = sim.run();
    assert!(
        matches!(&outcome, RunOutcome::Stopped(r) if r.contains("stale translation") || r.contains("use after free")),
        "{outcome:?}"
    );
    assert_eq!(sim.metrics().get("sva.atc_inv_timeouts"), 1);
}
