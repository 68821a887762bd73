//! The RDMA NIC model: registration rules, keys and access checks, QP errors, RNR and transport retries,
//! implicit ODP children, prefetch, dma-buf MRs, invalidation (fence, dirty) and the oracle.
//!
//! Two NICs under one switch (`nic0`, `nic1`), a GPU-like BAR exporter (`gpu`) for dma-buf MRs.
#![expect(
    clippy::tests_outside_test_module,
    clippy::unwrap_used,
    clippy::many_single_char_names,
    reason = "a test harness: short names for the world's parts, panics are failures"
)]

use std::cell::RefCell;
use std::future::Future;
use std::rc::Rc;

use peerdma_core::{Bdf, DeviceId, Errno, PAGE_SIZE, Pa, Pid, Va};
use peerdma_devices::rnic::{
    Access, Advice, MrKind, QpAttr, QpId, QpState, Rnic, RnicCosts, RnicError, SendWr, Sge,
    WcStatus, WrOpcode,
};
use peerdma_dma::{DmaCosts, Platform};
use peerdma_iommu::{DomainConfig, DomainType};
use peerdma_mm::{Kernel, MmCosts, MmapArgs, Prot};
use peerdma_pci::LinkSpec;
use peerdma_pci::topology::{Bar, TopologyBuilder, WhitelistEntry};
use peerdma_sim::{RunOutcome, Sim, SimConfig};

const GPU: DeviceId = DeviceId(3);

struct World {
    sim: Sim,
    k: Rc<Kernel>,
    p: Rc<Platform>,
    a: Rc<Rnic>,
    b: Rc<Rnic>,
}

fn world_cfg(cfg: SimConfig, costs: RnicCosts) -> World {
    world_dma(cfg, costs, DmaCosts::zero())
}

fn world_dma(cfg: SimConfig, costs: RnicCosts, dma: DmaCosts) -> World {
    let sim = Sim::new(cfg);
    let mm = if dma.timed {
        MmCosts::calibrated()
    } else {
        MmCosts::zero()
    };
    let k = Kernel::new(&sim, 64 << 20, mm);
    let mut t = TopologyBuilder::new();
    t.host_bridge("hb0", WhitelistEntry::Unrestricted);
    t.root_port("rp0", "hb0").bdf(Bdf::new(0, 1, 0).unwrap());
    t.switch_upstream("up", "rp0")
        .bdf(Bdf::new(1, 0, 0).unwrap());
    for (i, n) in ["dn0", "dn1", "dn2"].iter().enumerate() {
        t.switch_downstream(n, "up")
            .bdf(Bdf::new(2, u8::try_from(i).unwrap(), 0).unwrap());
    }
    for (i, (n, parent)) in [("nic0", "dn0"), ("nic1", "dn1"), ("gpu", "dn2")]
        .iter()
        .enumerate()
    {
        let bus = 3 + u8::try_from(i).unwrap();
        t.endpoint(n, parent, Bdf::new(bus, 0, 0).unwrap())
            .link(LinkSpec::new(3, 8))
            .bar(Bar {
                index: 2,
                size: 0x10_0000,
                phys: Pa::from_raw(0x1_0000_0000 + (i as u64) * 0x100_0000),
                bus_offset: 0,
                prefetchable: true,
            });
    }
    let topo = t.build().unwrap();
    let p = Platform::new(k.clone(), topo, dma);
    let node = |n: &str| p.topology().lookup(n).unwrap();
    let dom = || DomainConfig::with_type(DomainType::Dma);
    let d0 = p
        .add_device(DeviceId(1), node("nic0"), "nic0", dom())
        .unwrap();
    let d1 = p
        .add_device(DeviceId(2), node("nic1"), "nic1", dom())
        .unwrap();
    p.add_device(GPU, node("gpu"), "gpu", dom()).unwrap();
    let a = Rnic::new(&p, d0, costs.clone());
    let b = Rnic::new(&p, d1, costs);
    World { sim, k, p, a, b }
}

fn world() -> World {
    world_cfg(SimConfig::default(), RnicCosts::zero())
}

impl World {
    fn run<T: 'static, F: Future<Output = T> + 'static>(
        &self,
        f: impl FnOnce(Rc<Kernel>, Rc<Rnic>, Rc<Rnic>, Rc<Platform>) -> F,
    ) -> T {
        let out = Rc::new(RefCell::new(None));
        let (o, fut) = (
            out.clone(),
            f(
                self.k.clone(),
                self.a.clone(),
                self.b.clone(),
                self.p.clone(),
            ),
        );
        self.sim
            .spawn("test", async move { *o.borrow_mut() = Some(fut.await) });
        assert_eq!(self.sim.run(), RunOutcome::Completed);
        let v = self.k.oracle_violations();
        assert!(v.is_empty(), "oracle: {v:?}");
        out.borrow_mut().take().unwrap()
    }
}

async fn anon(k: &Kernel, pid: Pid, pages: u64, populate: bool) -> Va {
    k.mmap(
        pid,
        &MmapArgs {
            len: pages * PAGE_SIZE,
            prot: Prot::RW,
            private: true,
            anonymous: true,
            populate,
            ..MmapArgs::default()
        },
    )
    .await
    .unwrap()
}

const RW: Access = Access(Access::LOCAL_WRITE.0 | Access::REMOTE_WRITE.0 | Access::REMOTE_READ.0);

fn odp() -> Access {
    RW | Access::ON_DEMAND
}

fn sge(lkey: u32, addr: Va, pages: u64) -> Sge {
    Sge {
        lkey,
        addr,
        len: pages * PAGE_SIZE,
    }
}

fn wr(opcode: WrOpcode, sge: Sge, remote_addr: Va, rkey: u32) -> SendWr {
    SendWr {
        wr_id: 7,
        opcode,
        sge,
        remote_addr,
        rkey,
    }
}

/// A connected QP pair a → b with `attr` on both sides.
fn qps(a: &Rc<Rnic>, b: &Rc<Rnic>, pa: u32, pb: u32, attr: QpAttr) -> (QpId, QpId, u32, u32) {
    let (cqa, cqb) = (a.create_cq(), b.create_cq());
    let pda = peerdma_devices::rnic::PdId(pa);
    let pdb = peerdma_devices::rnic::PdId(pb);
    let qa = a.create_qp(pda, cqa, attr).unwrap();
    let qb = b.create_qp(pdb, cqb, attr).unwrap();
    a.connect(qa, b, qb).unwrap();
    (qa, qb, cqa.0, cqb.0)
}

#[test]
fn registration_rules_and_errnos() {
    let w = world();
    let r = w.run(|k, a, _, _| async move {
        let pid = k.create_process();
        let pd = a.alloc_pd(pid);
        let va = anon(&k, pid, 4, true).await;
        let mut out = Vec::new();
        // Remote write without local write.
        out.push(
            a.reg_mr(pd, va, PAGE_SIZE, Access::REMOTE_WRITE)
                .await
                .err(),
        );
        // ODP wrapping interval.
        out.push(
            a.reg_mr(pd, Va::from_raw(u64::MAX - 10), 100, odp())
                .await
                .err(),
        );
        // ODP zero length.
        out.push(a.reg_mr(pd, va, 0, odp()).await.err());
        // Implicit with HUGETLB.
        out.push(
            a.reg_mr(pd, Va::from_raw(0), u64::MAX, odp() | Access::HUGETLB)
                .await
                .err(),
        );
        // Pinned over a hole.
        out.push(
            a.reg_mr(pd, va.add(16 * PAGE_SIZE), PAGE_SIZE, RW)
                .await
                .err(),
        );
        // Pinned zero length, pinned wrap.
        out.push(a.reg_mr(pd, va, 0, RW).await.err());
        out.push(
            a.reg_mr(pd, Va::from_raw(u64::MAX - 10), 100, RW)
                .await
                .err(),
        );
        // Unknown PD.
        out.push(
            a.reg_mr(peerdma_devices::rnic::PdId(99), va, PAGE_SIZE, RW)
                .await
                .err(),
        );
        // ODP over an unmapped range registers (nothing is faulted), as does implicit ODP.
        let o = a
            .reg_mr(pd, va.add(64 * PAGE_SIZE), PAGE_SIZE, odp())
            .await
            .unwrap();
        let i = a
            .reg_mr(pd, Va::from_raw(0), u64::MAX, odp())
            .await
            .unwrap();
        let p = a.reg_mr(pd, va, 4 * PAGE_SIZE, RW).await.unwrap();
        let kinds = (
            a.mr_info(o.lkey).unwrap(),
            a.mr_info(i.lkey).unwrap().kind,
            a.mr_info(p.lkey).unwrap(),
        );
        // A PD in use cannot go.
        let busy = a.dealloc_pd(pd).err();
        (out, kinds, busy, o.lkey == o.rkey)
    });
    let (errs, (o, ikind, p), busy, same) = r;
    let e = |x: Errno| Some(RnicError::Errno(x));
    assert_eq!(
        errs,
        vec![
            e(Errno::EINVAL),
            e(Errno::EOVERFLOW),
            e(Errno::EINVAL),
            e(Errno::EINVAL),
            e(Errno::EFAULT),
            e(Errno::EINVAL),
            e(Errno::EINVAL),
            Some(RnicError::UnknownPd(99)),
        ]
    );
    assert_eq!(
        (o.kind, o.nr_mapped),
        (MrKind::Odp, 0),
        "ODP pins and faults nothing"
    );
    assert_eq!(ikind, MrKind::ImplicitOdp);
    assert_eq!((p.kind, p.nr_mapped), (MrKind::Pinned, 4));
    assert_eq!(busy, Some(RnicError::Errno(Errno::EBUSY)));
    assert!(same);
}

/// Runs one WR from a to b and returns (status, a's QP state, b's QP state, b's buffer first byte).
fn one_wr(
    opcode: WrOpcode,
    remote_access: Access,
    same_pd: bool,
    bad_key: bool,
    out_of_range: bool,
) -> (WcStatus, QpState, QpState, u8) {
    let w = world();
    w.run(move |k, a, b, _| async move {
        let pid = k.create_process();
        let pda = a.alloc_pd(pid);
        let pdb = b.alloc_pd(pid);
        let _other = b.alloc_pd(pid);
        let src = anon(&k, pid, 2, true).await;
        k.store(pid, src, &[0xab; 4096]).await.unwrap();
        let dst = anon(&k, pid, 2, true).await;
        let la = a.reg_mr(pda, src, 2 * PAGE_SIZE, RW).await.unwrap();
        let mrb = b
            .reg_mr(
                if same_pd {
                    pdb
                } else {
                    peerdma_devices::rnic::PdId(1)
                },
                dst,
                2 * PAGE_SIZE,
                remote_access,
            )
            .await
            .unwrap();
        let (qa, qb, cqa, _) = qps(&a, &b, pda.0, pdb.0, QpAttr::default());
        let rkey = if bad_key { 0xdead } else { mrb.rkey };
        let at = if out_of_range {
            dst.add(PAGE_SIZE)
        } else {
            dst
        };
        let pages = if out_of_range { 2 } else { 1 };
        a.post_send(qa, wr(opcode, sge(la.lkey, src, pages), at, rkey))
            .unwrap();
        let wc = a
            .wait_cq(peerdma_devices::rnic::CqId(cqa), 1)
            .await
            .unwrap();
        let mut byte = [0u8; 1];
        k.load(pid, dst, &mut byte).await.unwrap();
        (
            wc[0].status,
            a.qp_state(qa).unwrap(),
            b.qp_state(qb).unwrap(),
            byte[0],
        )
    })
}

#[test]
fn rdma_write_lands_and_key_pd_right_and_range_checks_give_remote_access_errors() {
    assert_eq!(
        one_wr(WrOpcode::Write, RW, true, false, false),
        (WcStatus::Success, QpState::Rts, QpState::Rts, 0xab)
    );
    let err = (WcStatus::RemAccessErr, QpState::Error, QpState::Error, 0);
    // No REMOTE_WRITE.
    assert_eq!(
        one_wr(
            WrOpcode::Write,
            Access::LOCAL_WRITE | Access::REMOTE_READ,
            true,
            false,
            false
        ),
        err
    );
    // Other PD, bad rkey, beyond the MR.
    assert_eq!(one_wr(WrOpcode::Write, RW, false, false, false), err);
    assert_eq!(one_wr(WrOpcode::Write, RW, true, true, false), err);
    assert_eq!(one_wr(WrOpcode::Write, RW, true, false, true), err);
    // READ needs REMOTE_READ.
    assert_eq!(
        one_wr(
            WrOpcode::Read,
            Access::LOCAL_WRITE | Access::REMOTE_WRITE,
            true,
            false,
            false
        )
        .0,
        WcStatus::RemAccessErr
    );
}

#[test]
fn local_key_errors_complete_with_loc_prot_err_and_later_wrs_are_flushed() {
    let w = world();
    let (s1, s2, st) = w.run(|k, a, b, _| async move {
        let pid = k.create_process();
        let pda = a.alloc_pd(pid);
        let pdb = b.alloc_pd(pid);
        let va = anon(&k, pid, 2, true).await;
        let mrb = b.reg_mr(pdb, va, PAGE_SIZE, RW).await.unwrap();
        // A read-only local MR as the destination of a READ.
        let la = a
            .reg_mr(pda, va, PAGE_SIZE, Access::REMOTE_READ)
            .await
            .unwrap();
        let (qa, _, cqa, _) = qps(&a, &b, pda.0, pdb.0, QpAttr::default());
        let cq = peerdma_devices::rnic::CqId(cqa);
        a.post_send(qa, wr(WrOpcode::Read, sge(la.lkey, va, 1), va, mrb.rkey))
            .unwrap();
        let s1 = a.wait_cq(cq, 1).await.unwrap()[0].status;
        a.post_send(qa, wr(WrOpcode::Write, sge(la.lkey, va, 1), va, mrb.rkey))
            .unwrap();
        let s2 = a.wait_cq(cq, 1).await.unwrap()[0].status;
        (s1, s2, a.qp_state(qa).unwrap())
    });
    assert_eq!(
        (s1, s2, st),
        (WcStatus::LocProtErr, WcStatus::WrFlushErr, QpState::Error)
    );
}

#[test]
fn outstanding_wrs_are_bounded_per_qp() {
    let w = world();
    let errs = w.run(|k, a, b, _| async move {
        let pid = k.create_process();
        let (pda, pdb) = (a.alloc_pd(pid), b.alloc_pd(pid));
        let va = anon(&k, pid, 1, true).await;
        let la = a.reg_mr(pda, va, PAGE_SIZE, RW).await.unwrap();
        let mrb = b.reg_mr(pdb, va, PAGE_SIZE, RW).await.unwrap();
        let attr = QpAttr {
            max_send_wr: 2,
            ..QpAttr::default()
        };
        let (qa, _, cqa, _) = qps(&a, &b, pda.0, pdb.0, attr);
        let w1 = wr(WrOpcode::Write, sge(la.lkey, va, 1), va, mrb.rkey);
        let r: Vec<_> = (0..3).map(|_| a.post_send(qa, w1).err()).collect();
        a.wait_cq(peerdma_devices::rnic::CqId(cqa), 2)
            .await
            .unwrap();
        (r, a.post_send(qa, w1).err())
    });
    assert_eq!(
        errs,
        (
            vec![None, None, Some(RnicError::Errno(Errno::ENOMEM))],
            None
        )
    );
}

/// A WRITE into an ODP MR whose pages are not yet mapped in the NIC: `rnr` RNR NAKs while the responder
/// faults, then success, unless `rnr_retry` runs out first.
fn odp_write(rnr_retry: u8, populate: bool, unmapped: bool) -> (WcStatus, u64, u64) {
    let w = world_cfg(SimConfig::default(), RnicCosts::calibrated());
    let st = w.run(move |k, a, b, _| async move {
        let pid = k.create_process();
        let (pda, pdb) = (a.alloc_pd(pid), b.alloc_pd(pid));
        let src = anon(&k, pid, 4, true).await;
        let dst = anon(&k, pid, 4, populate).await;
        if unmapped {
            k.munmap(pid, dst, 4 * PAGE_SIZE).await.unwrap();
        }
        let la = a.reg_mr(pda, src, 4 * PAGE_SIZE, RW).await.unwrap();
        let mrb = b.reg_mr(pdb, dst, 4 * PAGE_SIZE, odp()).await.unwrap();
        let attr = QpAttr {
            rnr_retry,
            ..QpAttr::default()
        };
        let (qa, _, cqa, _) = qps(&a, &b, pda.0, pdb.0, attr);
        a.post_send(qa, wr(WrOpcode::Write, sge(la.lkey, src, 4), dst, mrb.rkey))
            .unwrap();
        a.wait_cq(peerdma_devices::rnic::CqId(cqa), 1)
            .await
            .unwrap()[0]
            .status
    });
    let m = w.sim.metrics();
    (st, m.get("rnic.rnr_naks"), m.get("rnic.responder_faults"))
}

#[test]
fn responder_fault_on_write_is_rnr_nak_then_retry_and_rnr_retry_limits_it() {
    let (st, naks, faults) = odp_write(RNR_INF, true, false);
    assert_eq!(st, WcStatus::Success);
    assert_eq!(
        (naks, faults),
        (1, 1),
        "one RNR NAK while the responder faulted"
    );
    // rnr_retry = 0: the first RNR NAK ends the WR.
    let (st, naks, _) = odp_write(0, true, false);
    assert_eq!((st, naks), (WcStatus::RnrRetryExcErr, 1));
    // A hole: the background fault fails, the retransmission gets a remote access error.
    let (st, _, _) = odp_write(RNR_INF, true, true);
    assert_eq!(st, WcStatus::RemAccessErr);
}

const RNR_INF: u8 = peerdma_devices::rnic::RNR_RETRY_INFINITE;

#[test]
fn responder_fault_on_read_is_recovered_by_transport_retry_bounded_by_retry_cnt() {
    let run = |retry_cnt: u8| {
        let w = world_cfg(SimConfig::default(), RnicCosts::calibrated());
        let (st, data) = w.run(move |k, a, b, _| async move {
            let pid = k.create_process();
            let (pda, pdb) = (a.alloc_pd(pid), b.alloc_pd(pid));
            let dst = anon(&k, pid, 1, true).await;
            let src = anon(&k, pid, 1, false).await;
            let la = a.reg_mr(pda, dst, PAGE_SIZE, RW).await.unwrap();
            // Registered before the CPU touches it: the snapshot maps nothing.
            let mrb = b.reg_mr(pdb, src, PAGE_SIZE, odp()).await.unwrap();
            k.store(pid, src, &[0x5c; 16]).await.unwrap();
            let attr = QpAttr {
                retry_cnt,
                ..QpAttr::default()
            };
            let (qa, _, cqa, _) = qps(&a, &b, pda.0, pdb.0, attr);
            a.post_send(qa, wr(WrOpcode::Read, sge(la.lkey, dst, 1), src, mrb.rkey))
                .unwrap();
            let st = a
                .wait_cq(peerdma_devices::rnic::CqId(cqa), 1)
                .await
                .unwrap()[0]
                .status;
            let mut b0 = [0u8; 1];
            k.load(pid, dst, &mut b0).await.unwrap();
            (st, b0[0])
        });
        (
            st,
            data,
            w.sim.metrics().get("rnic.transport_retries"),
            w.sim.metrics().get("rnic.rnr_naks"),
        )
    };
    assert_eq!(
        run(7),
        (WcStatus::Success, 0x5c, 1, 0),
        "no RNR NAK for a READ"
    );
    assert_eq!(run(0), (WcStatus::RetryExcErr, 0, 1, 0));
}

#[test]
fn send_without_a_receive_is_rnr_and_with_one_lands() {
    let w = world_cfg(SimConfig::default(), RnicCosts::calibrated());
    let (st0, st1, recv) = w.run(|k, a, b, _| async move {
        let pid = k.create_process();
        let (pda, pdb) = (a.alloc_pd(pid), b.alloc_pd(pid));
        let src = anon(&k, pid, 1, true).await;
        let dst = anon(&k, pid, 1, true).await;
        let la = a.reg_mr(pda, src, PAGE_SIZE, RW).await.unwrap();
        let lb = b.reg_mr(pdb, dst, PAGE_SIZE, RW).await.unwrap();
        let attr = QpAttr {
            rnr_retry: 2,
            ..QpAttr::default()
        };
        let (qa, qb, cqa, cqb) = qps(&a, &b, pda.0, pdb.0, attr);
        let s = wr(WrOpcode::Send, sge(la.lkey, src, 1), Va::from_raw(0), 0);
        a.post_send(qa, s).unwrap();
        let cq = peerdma_devices::rnic::CqId(cqa);
        let st0 = a.wait_cq(cq, 1).await.unwrap()[0].status;
        // A fresh pair: this time a receive is posted.
        let (qa, qb2, cqa, cqb2) = qps(&a, &b, pda.0, pdb.0, attr);
        let _ = (qb, cqb);
        b.post_recv(qb2, 99, sge(lb.lkey, dst, 1)).unwrap();
        a.post_send(qa, s).unwrap();
        let st1 = a
            .wait_cq(peerdma_devices::rnic::CqId(cqa), 1)
            .await
            .unwrap()[0]
            .status;
        let r = b
            .wait_cq(peerdma_devices::rnic::CqId(cqb2), 1)
            .await
            .unwrap()[0];
        (st0, st1, (r.wr_id, r.opcode, r.status))
    });
    assert_eq!(st0, WcStatus::RnrRetryExcErr);
    assert_eq!(
        w.sim.metrics().get("rnic.rnr_naks"),
        3,
        "rnr_retry = 2: three NAKs"
    );
    assert_eq!(st1, WcStatus::Success);
    assert_eq!(recv, (99, None, WcStatus::Success));
}

#[test]
fn implicit_children_are_made_on_demand_even_by_failing_faults_and_die_when_emptied() {
    let w = world();
    let (after_write, after_hole, after_unmap, never) = w.run(|k, a, b, _| async move {
        let pid = k.create_process();
        let (pda, pdb) = (a.alloc_pd(pid), b.alloc_pd(pid));
        let src = anon(&k, pid, 2, true).await;
        let dst = anon(&k, pid, 2, true).await;
        let la = a.reg_mr(pda, src, 2 * PAGE_SIZE, RW).await.unwrap();
        let imr = b
            .reg_mr(pdb, Va::from_raw(0), u64::MAX, odp())
            .await
            .unwrap();
        let (qa, _, cqa, _) = qps(&a, &b, pda.0, pdb.0, QpAttr::default());
        let cq = peerdma_devices::rnic::CqId(cqa);
        a.post_send(qa, wr(WrOpcode::Write, sge(la.lkey, src, 2), dst, imr.rkey))
            .unwrap();
        assert_eq!(a.wait_cq(cq, 1).await.unwrap()[0].status, WcStatus::Success);
        let after_write = b.mr_info(imr.lkey).unwrap();
        // A fault in an empty slot far away creates a child and fails.
        let hole = Va::from_raw(5 << 30);
        let (qa2, _, cqa2, _) = qps(&a, &b, pda.0, pdb.0, QpAttr::default());
        a.post_send(
            qa2,
            wr(WrOpcode::Write, sge(la.lkey, src, 1), hole, imr.rkey),
        )
        .unwrap();
        let st = a
            .wait_cq(peerdma_devices::rnic::CqId(cqa2), 1)
            .await
            .unwrap()[0]
            .status;
        assert_eq!(st, WcStatus::RemAccessErr);
        let after_hole = b.mr_info(imr.lkey).unwrap().children;
        // Unmapping the written pages empties the first child: it is destroyed; the never-mapped one stays.
        k.munmap(pid, dst, 2 * PAGE_SIZE).await.unwrap();
        k.sim.sleep(peerdma_core::SimDuration::from_micros(1)).await;
        let after_unmap = b.mr_info(imr.lkey).unwrap().children;
        let never = after_unmap.contains(&Va::from_raw(5 << 30));
        b.dereg_mr(imr.lkey).await.unwrap();
        (after_write, after_hole, after_unmap, never)
    });
    let slot = |va: u64| Va::from_raw(va & !((1 << 30) - 1));
    assert_eq!(after_write.nr_mapped, 2);
    assert_eq!(after_write.children.len(), 1);
    assert_eq!(
        after_hole.len(),
        2,
        "the failing fault made a child: {after_hole:?}"
    );
    assert_eq!(after_unmap, vec![slot(5 << 30)]);
    assert!(never);
    assert_eq!(w.sim.metrics().get("rnic.implicit_children_destroyed"), 1);
}

#[test]
fn prefetch_rules_and_modes() {
    let w = world();
    let r = w.run(|k, a, _, _| async move {
        let pid = k.create_process();
        let pd = a.alloc_pd(pid);
        let other = a.alloc_pd(pid);
        let va = anon(&k, pid, 8, false).await;
        // Only page 0 is present in the CPU page table.
        k.store(pid, va, &[1]).await.unwrap();
        let o = a.reg_mr(pd, va, 8 * PAGE_SIZE, odp()).await.unwrap();
        let ro = a
            .reg_mr(
                pd,
                va,
                8 * PAGE_SIZE,
                Access::REMOTE_READ | Access::ON_DEMAND,
            )
            .await
            .unwrap();
        let pinned = a.reg_mr(pd, va, PAGE_SIZE, RW).await.unwrap();
        let s = |key| [sge(key, va, 8)];
        let errs = vec![
            a.advise_mr(pd, Advice::Prefetch, true, &s(0x7777))
                .await
                .err(),
            a.advise_mr(pd, Advice::Prefetch, true, &[sge(pinned.lkey, va, 1)])
                .await
                .err(),
            a.advise_mr(other, Advice::Prefetch, true, &s(o.lkey))
                .await
                .err(),
            a.advise_mr(pd, Advice::PrefetchWrite, true, &s(ro.lkey))
                .await
                .err(),
        ];
        let snapshot = a.mr_info(o.lkey).unwrap().nr_mapped;
        // The CPU touches page 1 after registration; NO_FAULT maps it (and nothing else).
        k.store(pid, va.add(PAGE_SIZE), &[1]).await.unwrap();
        a.advise_mr(pd, Advice::PrefetchNoFault, true, &s(o.lkey))
            .await
            .unwrap();
        let no_fault = (snapshot, a.mr_info(o.lkey).unwrap().nr_mapped);
        a.advise_mr(pd, Advice::Prefetch, true, &s(o.lkey))
            .await
            .unwrap();
        let read = a.mr_info(o.lkey).unwrap().nr_mapped;
        // Asynchronous: returns at once, maps later.
        a.advise_mr(
            pd,
            Advice::PrefetchWrite,
            false,
            &s(ro.lkey.wrapping_add(0)),
        )
        .await
        .ok();
        a.advise_mr(pd, Advice::Prefetch, false, &s(ro.lkey))
            .await
            .unwrap();
        let before = a.mr_info(ro.lkey).unwrap().nr_mapped;
        k.sim.sleep(peerdma_core::SimDuration::from_micros(1)).await;
        let after = a.mr_info(ro.lkey).unwrap().nr_mapped;
        (errs, no_fault, read, before, after)
    });
    let e = |x: Errno| Some(RnicError::Errno(x));
    assert_eq!(
        r.0,
        vec![
            e(Errno::ENOENT),
            e(Errno::ENOENT),
            e(Errno::EPERM),
            e(Errno::EPERM)
        ]
    );
    assert_eq!(
        r.1,
        (1, 2),
        "registration's snapshot maps page 0; NO_FAULT then maps only page 1"
    );
    assert_eq!(r.2, 8);
    assert_eq!(
        (r.3, r.4),
        (1, 8),
        "asynchronous: only the snapshot before it runs"
    );
}

#[test]
fn dmabuf_mr_loses_its_mapping_on_move_notify_and_the_next_access_rebuilds_it() {
    let w = world();
    let r = w.run(|k, a, b, p| async move {
        let pid = k.create_process();
        let (pda, pdb) = (a.alloc_pd(pid), b.alloc_pd(pid));
        let mmio = p.export_bar(GPU, 2, 0, 4 * PAGE_SIZE, true).unwrap();
        let mrb = b.reg_dmabuf_mr(pdb, mmio, 0, 4 * PAGE_SIZE, RW).unwrap();
        let src = anon(&k, pid, 1, true).await;
        k.store(pid, src, &[0x42; 8]).await.unwrap();
        let la = a.reg_mr(pda, src, PAGE_SIZE, RW).await.unwrap();
        let (qa, _, cqa, _) = qps(&a, &b, pda.0, pdb.0, QpAttr::default());
        let cq = peerdma_devices::rnic::CqId(cqa);
        let mapped0 = b.mr_info(mrb.lkey).unwrap().nr_mapped;
        let n = p.dmabuf_move_notify(mmio);
        let mapped1 = b.mr_info(mrb.lkey).unwrap().nr_mapped;
        a.post_send(
            qa,
            wr(
                WrOpcode::Write,
                sge(la.lkey, src, 1),
                Va::from_raw(PAGE_SIZE),
                mrb.rkey,
            ),
        )
        .unwrap();
        let st = a.wait_cq(cq, 1).await.unwrap()[0].status;
        let mapped2 = b.mr_info(mrb.lkey).unwrap().nr_mapped;
        let mut buf = [0u8; 1];
        let pa = p.export_range(mmio).unwrap().start.add(PAGE_SIZE);
        k.mmio_read(DeviceId(0), pa, &mut buf).ok();
        (mapped0, n, mapped1, st, mapped2, buf[0])
    });
    assert_eq!(r, (4, 1, 0, WcStatus::Success, 4, 0x42));
    assert_eq!(w.sim.metrics().get("rnic.dmabuf_faults"), 1);
}

/// Prefetches (for read) two pages of a mapping with `prot`, then drops them; returns the pages dirtied at
/// the DMA unmap and the pages left mapped.
fn dirtied(prot: Prot) -> (u64, u64) {
    let w = world();
    let left = w.run(move |k, a, _, _| async move {
        let pid = k.create_process();
        let pd = a.alloc_pd(pid);
        let va = anon(&k, pid, 2, true).await;
        k.mprotect(pid, va, 2 * PAGE_SIZE, prot).await.unwrap();
        let o = a.reg_mr(pd, va, 2 * PAGE_SIZE, odp()).await.unwrap();
        a.advise_mr(pd, Advice::Prefetch, true, &[sge(o.lkey, va, 2)])
            .await
            .unwrap();
        k.madvise(pid, va, 2 * PAGE_SIZE, peerdma_mm::Advice::DontNeed)
            .await
            .unwrap();
        a.mr_info(o.lkey).unwrap().nr_mapped
    });
    (w.sim.metrics().get("rnic.dirtied_pages"), left)
}

#[test]
fn invalidation_marks_cpu_writable_pages_dirty_even_if_only_read() {
    assert_eq!(
        dirtied(Prot::RW),
        (2, 0),
        "read-only NIC entries of writable CPU pages"
    );
    assert_eq!(dirtied(Prot::READ), (0, 0));
}

/// The munmap race of `examples/rdma-odp-munmap.toml` at the library level: a peer WRITEs into an ODP MR
/// while the owner unmaps it; explored over seeds with jittered timing.
fn munmap_race(seed: u64, skip_fence: bool) -> Vec<String> {
    let mut costs = RnicCosts::calibrated();
    costs.wire_latency = peerdma_core::SimDuration::from_nanos(500);
    let w = world_dma(
        SimConfig {
            seed,
            explore: true,
            jitter: 0.5,
            ..SimConfig::default()
        },
        costs,
        DmaCosts::calibrated(),
    );
    w.b.inject_skip_fence(skip_fence);
    let (k, a, b) = (w.k.clone(), w.a.clone(), w.b.clone());
    w.sim.spawn("test", async move {
        let pid = k.create_process();
        let (pda, pdb) = (a.alloc_pd(pid), b.alloc_pd(pid));
        let src = anon(&k, pid, 16, true).await;
        let dst = anon(&k, pid, 16, true).await;
        let la = a.reg_mr(pda, src, 16 * PAGE_SIZE, RW).await.unwrap();
        let mrb = b.reg_mr(pdb, dst, 16 * PAGE_SIZE, odp()).await.unwrap();
        b.advise_mr(pdb, Advice::PrefetchWrite, true, &[sge(mrb.lkey, dst, 16)])
            .await
            .unwrap();
        let (qa, _, cqa, _) = qps(&a, &b, pda.0, pdb.0, QpAttr::default());
        a.post_send(
            qa,
            wr(WrOpcode::Write, sge(la.lkey, src, 16), dst, mrb.rkey),
        )
        .unwrap();
        let k2 = k.clone();
        k.sim.spawn("unmapper", async move {
            k2.sim
                .sleep(peerdma_core::SimDuration::from_nanos(
                    12_000 + (seed * 97) % 16_000,
                ))
                .await;
            k2.munmap(pid, dst, 16 * PAGE_SIZE).await.unwrap();
        });
        let _ = a.wait_cq(peerdma_devices::rnic::CqId(cqa), 1).await;
    });
    let _ = w.sim.run();
    w.k.oracle_violations()
        .iter()
        .map(|v| format!("{v:?}"))
        .collect()
}

#[test]
fn odp_munmap_race_is_clean_over_seeds_and_skipping_the_fence_is_caught() {
    for seed in 0..40 {
        let v = munmap_race(seed, false);
        assert!(v.is_empty(), "seed {seed}: {v:?}");
    }
    let caught = (0..1000).find(|&s| !munmap_race(s, true).is_empty());
    assert!(caught.is_some(), "no seed showed the missing fence");
}

/// The shape of spec/numbers.md §3 (run with `--ignored --nocapture`): registration time, first-touch
/// latency and steady-state time of 1-page RDMA READs from a 4 MiB MR, pinned vs ODP, in simulated time.
#[test]
#[ignore = "prints figures; run by hand"]
fn figures_odp_vs_pinned() {
    for on_demand in [false, true] {
        let w = world_dma(
            SimConfig::default(),
            RnicCosts::calibrated(),
            DmaCosts::calibrated(),
        );
        let r = w.run(move |k, a, b, _| async move {
            let pid = k.create_process();
            let (pda, pdb) = (a.alloc_pd(pid), b.alloc_pd(pid));
            let pages_n: u64 = 1024;
            let big = anon(&k, pid, pages_n, true).await;
            let dst = anon(&k, pid, 1, true).await;
            let la = a.reg_mr(pda, dst, PAGE_SIZE, RW).await.unwrap();
            let t0 = k.sim.now();
            let acc = if on_demand { odp() } else { RW };
            let mr = b.reg_mr(pdb, big, pages_n * PAGE_SIZE, acc).await.unwrap();
            let reg = k.sim.now().0 - t0.0;
            let (qa, _, cqa, _) = qps(&a, &b, pda.0, pdb.0, QpAttr::default());
            let cq = peerdma_devices::rnic::CqId(cqa);
            let mut rng: u64;
            let mut lat = Vec::new();
            for round in 0..2 {
                rng = 12345;
                let t = k.sim.now();
                for _ in 0..64 {
                    rng = rng
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    let page = (rng >> 33) % pages_n;
                    let at = big.add(page * PAGE_SIZE);
                    a.post_send(qa, wr(WrOpcode::Read, sge(la.lkey, dst, 1), at, mr.rkey))
                        .unwrap();
                    a.wait_cq(cq, 1).await.unwrap();
                    if round == 0 {
                        lat.push(0);
                    }
                }
                lat.push(k.sim.now().0 - t.0);
            }
            (reg, lat[64], lat[65])
        });
        eprintln!(
            "{}: registration {} ns, 64 first-touch reads {} ns ({} ns each), 64 reads after {} ns",
            if on_demand { "odp" } else { "pinned" },
            r.0,
            r.1,
            r.1 / 64,
            r.2
        );
    }
}

/// An ODP umem reserves the IOVA of its whole range at registration (`ib_init_umem_odp` →
/// `hmm_dma_map_alloc`), links pages into it (a write upgrade of a mapped page links nothing again),
/// unlinks them on invalidation without freeing it, and gives it back at deregistration.
#[test]
fn an_odp_umem_reserves_its_iova_at_registration_and_dereg_frees_it() {
    let w = world();
    let r = w.run(|k, a, _, p| async move {
        let nic = p.device(DeviceId(1)).unwrap();
        let dom = |nic: &peerdma_dma::DmaDevice| {
            (
                nic.domain().nr_iova_allocations(),
                nic.domain().mapped_pages(),
            )
        };
        let pid = k.create_process();
        let pd = a.alloc_pd(pid);
        let va = anon(&k, pid, 8, true).await;
        let before = dom(&nic);
        let o = a.reg_mr(pd, va, 8 * PAGE_SIZE, odp()).await.unwrap();
        let registered = dom(&nic);
        a.advise_mr(pd, Advice::PrefetchWrite, true, &[sge(o.lkey, va, 8)])
            .await
            .unwrap();
        let prefetched = dom(&nic);
        let linked = k.sim.metrics().get("dma.iova_linked_pages");
        k.madvise(pid, va, 8 * PAGE_SIZE, peerdma_mm::Advice::DontNeed)
            .await
            .unwrap();
        let invalidated = dom(&nic);
        a.dereg_mr(o.lkey).await.unwrap();
        (
            before,
            registered,
            prefetched,
            linked,
            invalidated,
            dom(&nic),
        )
    });
    assert_eq!(r.0, (0, 0));
    assert_eq!(
        r.1,
        (1, 8),
        "one reservation; the snapshot linked the 8 present pages"
    );
    assert_eq!(r.2, (1, 8), "the write prefetch kept every mapping");
    assert_eq!(r.3, 8, "no page was linked twice");
    assert_eq!(
        r.4,
        (1, 0),
        "the invalidation unlinked every page, the reservation stays"
    );
    assert_eq!(r.5, (0, 0), "deregistration freed it");
}
