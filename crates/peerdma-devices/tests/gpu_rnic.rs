//! An RDMA NIC's dma-buf MR on a GPU buffer object (`ibv_reg_dmabuf_mr` on the dma-buf a GPU exported,
//! `ib_umem_dmabuf_get`: drivers/infiniband/core/umem_dmabuf.c): the MR follows the buffer through the GPU's
//! moves — RDMA WRITEs land in the BAR window while the buffer is there, in system RAM after an eviction, and
//! in the window again after it comes back — with every move zapping the MR's translations first
//! (`move_notify`). Over many seeds, with moves racing the WRITEs, the oracle stays clean; with the GPU's
//! test-only switch that skips the peer invalidation, it reports the NIC's use of a freed page.
#![expect(
    clippy::tests_outside_test_module,
    clippy::unwrap_used,
    reason = "an integration-test crate is all tests"
)]

mod common;

use std::cell::RefCell;
use std::future::Future;
use std::rc::Rc;

use peerdma_core::{Bdf, DeviceId, PAGE_SIZE, Pa, Va};
use peerdma_devices::gpu::{Gpu, GpuConfig, GpuCosts, GpuInjection, Placement};
use peerdma_devices::rnic::{
    Access, CqId, QpAttr, Rnic, RnicCosts, SendWr, Sge, WcStatus, WrOpcode,
};
use peerdma_dma::{DmaCosts, Platform};
use peerdma_iommu::{DomainConfig, DomainType};
use peerdma_mm::oracle::ViolationKind;
use peerdma_mm::{Kernel, MmCosts, MmapArgs, Prot};
use peerdma_pci::topology::{Bar, TopologyBuilder};
use peerdma_sim::{RunOutcome, Sim, SimConfig};

const NIC: DeviceId = DeviceId(1);
const GPU: DeviceId = DeviceId(2);
const REMOTE: DeviceId = DeviceId(3);
const PAGES: u64 = 4;
const RW: Access = Access(Access::LOCAL_WRITE.0 | Access::REMOTE_WRITE.0 | Access::REMOTE_READ.0);

struct World {
    sim: Sim,
    k: Rc<Kernel>,
    gpu: Rc<Gpu>,
    nic: Rc<Rnic>,
    remote: Rc<Rnic>,
}

/// hb0 ── rp0 ── up ─┬─ dn0 ── gpu (BAR0: an 8-page VRAM window)
///                   ├─ dn1 ── nic (the GPU's NIC, DMA domain)
///                   └─ dn2 ── remote (the requester's NIC)
fn world(seed: u64) -> World {
    let sim = Sim::new(SimConfig {
        seed,
        explore: true,
        ..SimConfig::default()
    });
    let k = Kernel::new(&sim, 64 << 20, MmCosts::zero());
    let mut b = TopologyBuilder::new();
    common::switch_fabric(&mut b);
    b.endpoint("gpu", "dn0", Bdf::new(3, 0, 0).unwrap())
        .bar(Bar {
            index: 0,
            size: 16 * PAGE_SIZE,
            phys: Pa::from_raw(0x40_0000_0000),
            bus_offset: 0,
            prefetchable: true,
        });
    b.endpoint("nic", "dn1", Bdf::new(4, 0, 0).unwrap());
    b.endpoint("remote", "dn2", Bdf::new(5, 0, 0).unwrap());
    let p = Platform::new(k.clone(), b.build().unwrap(), DmaCosts::zero());
    let node = |n: &str| p.topology().lookup(n).unwrap();
    let dom = || DomainConfig::with_type(DomainType::Dma);
    let nic_dev = p.add_device(NIC, node("nic"), "nic", dom()).unwrap();
    let remote_dev = p
        .add_device(REMOTE, node("remote"), "remote", dom())
        .unwrap();
    p.add_device(GPU, node("gpu"), "gpu", dom()).unwrap();
    let gpu = Gpu::new(
        &p,
        GPU,
        GpuConfig {
            vram: 16 * PAGE_SIZE,
            bar: 0,
            window: Some(8 * PAGE_SIZE),
            costs: GpuCosts::zero(),
        },
    )
    .unwrap();
    let nic = Rnic::new(&p, nic_dev, RnicCosts::zero());
    let remote = Rnic::new(&p, remote_dev, RnicCosts::zero());
    World {
        sim,
        k,
        gpu,
        nic,
        remote,
    }
}

impl World {
    /// Runs `f` as the only agent (it may spawn others); returns its result, the outcome and the oracle's
    /// violations.
    fn run<T: 'static, F: Future<Output = T> + 'static>(
        &self,
        f: impl FnOnce(Rc<Kernel>, Rc<Gpu>, Rc<Rnic>, Rc<Rnic>) -> F,
    ) -> (Option<T>, RunOutcome, Vec<ViolationKind>) {
        let out = Rc::new(RefCell::new(None));
        let (o, fut) = (
            out.clone(),
            f(
                self.k.clone(),
                self.gpu.clone(),
                self.nic.clone(),
                self.remote.clone(),
            ),
        );
        self.sim
            .spawn("test", async move { *o.borrow_mut() = Some(fut.await) });
        let outcome = self.sim.run();
        let v = self.k.oracle_violations().iter().map(|v| v.kind).collect();
        (out.borrow_mut().take(), outcome, v)
    }
}

fn pattern(salt: u8) -> Vec<u8> {
    (0..PAGES * PAGE_SIZE)
        .map(|i| u8::try_from(i % 251).unwrap() ^ salt)
        .collect()
}

/// The requester's side: a registered RAM buffer holding `pattern(salt)` for each salt, and a connected
/// QP to the GPU's NIC. Returns (lkey, the buffers' addresses, the QP, its CQ).
async fn requester(
    k: &Kernel,
    remote: &Rc<Rnic>,
    salts: &[u8],
) -> (u32, Vec<Va>, peerdma_devices::rnic::QpId, CqId) {
    let pid = k.create_process();
    let len = PAGES * PAGE_SIZE * salts.len() as u64;
    let src = k
        .mmap(
            pid,
            &MmapArgs {
                len,
                prot: Prot::RW,
                private: true,
                anonymous: true,
                populate: true,
                ..MmapArgs::default()
            },
        )
        .await
        .unwrap();
    let mut at = Vec::new();
    for (i, &s) in salts.iter().enumerate() {
        let va = src.add(i as u64 * PAGES * PAGE_SIZE);
        k.store(pid, va, &pattern(s)).await.unwrap();
        at.push(va);
    }
    let pd = remote.alloc_pd(pid);
    let mr = remote.reg_mr(pd, src, len, RW).await.unwrap();
    let cq = remote.create_cq();
    let qp = remote.create_qp(pd, cq, QpAttr::default()).unwrap();
    (mr.lkey, at, qp, cq)
}

/// RDMA WRITE of the requester's buffer `src` into the whole GPU MR.
fn write_wr(lkey: u32, src: Va, rkey: u32) -> SendWr {
    SendWr {
        wr_id: 1,
        opcode: WrOpcode::Write,
        sge: Sge {
            lkey,
            addr: src,
            len: PAGES * PAGE_SIZE,
        },
        remote_addr: Va::from_raw(0),
        rkey,
    }
}

/// The story, step by step: WRITEs land in the window, in RAM after the eviction, in the window again after
/// validation; each move zaps the MR (no pages mapped) and the next WRITE rebuilds it (a dma-buf fault).
#[test]
fn rdma_writes_follow_the_gpu_buffer_window_ram_window() {
    let w = world(1);
    let (r, outcome, v) = w.run(|k, gpu, nic, remote| async move {
        let bo = gpu.bo_create(PAGES * PAGE_SIZE).unwrap();
        let pid = k.create_process();
        let pd = nic.alloc_pd(pid);
        let mr = nic
            .reg_gpu_bo_mr(pd, &gpu, bo, PAGES * PAGE_SIZE, RW)
            .await
            .unwrap();
        let (lkey, src, qp, cq) = requester(&k, &remote, &[1, 2, 3]).await;
        let cqn = nic.create_cq();
        let rqp = nic.create_qp(pd, cqn, QpAttr::default()).unwrap();
        remote.connect(qp, &nic, rqp).unwrap();
        let mut log = Vec::new();
        for (i, step) in ["window", "evicted", "validated"].into_iter().enumerate() {
            match step {
                "evicted" => gpu.bo_evict(bo).await.unwrap(),
                "validated" => gpu.bo_validate(bo).await.unwrap(),
                _ => {}
            }
            let mapped_before = nic.mr_info(mr.lkey).unwrap().nr_mapped;
            remote
                .post_send(qp, write_wr(lkey, src[i], mr.rkey))
                .unwrap();
            let st = remote.wait_cq(cq, 1).await.unwrap()[0].status;
            let data_ok = gpu.bo_read(bo, 0, PAGES * PAGE_SIZE).await.unwrap()
                == pattern(u8::try_from(i + 1).unwrap());
            log.push((
                gpu.bo_placement(bo).unwrap(),
                mapped_before,
                st,
                data_ok,
                nic.mr_info(mr.lkey).unwrap().nr_mapped,
            ));
        }
        nic.dereg_mr(mr.lkey).await.unwrap();
        log
    });
    assert_eq!(outcome, RunOutcome::Completed);
    assert!(v.is_empty(), "{v:?}");
    let r = r.unwrap();
    assert_eq!(
        r,
        [
            (Placement::Window, PAGES, WcStatus::Success, true, PAGES),
            (Placement::System, 0, WcStatus::Success, true, PAGES),
            (Placement::Window, 0, WcStatus::Success, true, PAGES),
        ],
        "(placement, MR pages mapped before the WRITE, status, data, mapped after)"
    );
    let m = w.sim.metrics();
    assert_eq!(
        m.get("rnic.dmabuf_faults"),
        2,
        "one rebuild after each move"
    );
    assert_eq!(m.get("dmabuf.move_notify"), 2);
    assert!(m.get("dmabuf.mapped_pages.ram") > 0);
}

/// WRITEs racing the GPU's moves, over many seeds: every WRITE succeeds, the buffer holds the last one, and
/// the oracle stays clean; with the peer invalidation skipped the oracle reports a use after free.
fn racing(seed: u64, skip: bool) -> (Vec<WcStatus>, bool, Vec<ViolationKind>) {
    let w = world(seed);
    if skip {
        w.gpu.inject(GpuInjection::SkipPeerInvalidation);
    }
    let (r, _, v) = w.run(|k, gpu, nic, remote| async move {
        let bo = gpu.bo_create(PAGES * PAGE_SIZE).unwrap();
        let pid = k.create_process();
        let pd = nic.alloc_pd(pid);
        let mr = nic
            .reg_gpu_bo_mr(pd, &gpu, bo, PAGES * PAGE_SIZE, RW)
            .await
            .unwrap();
        let (lkey, src, qp, cq) = requester(&k, &remote, &[7]).await;
        let cqn = nic.create_cq();
        let rqp = nic.create_qp(pd, cqn, QpAttr::default()).unwrap();
        remote.connect(qp, &nic, rqp).unwrap();
        let g = gpu.clone();
        k.sim.spawn("gpu-moves", async move {
            for _ in 0..3 {
                g.bo_evict(bo).await.ok();
                g.bo_validate(bo).await.ok();
            }
        });
        let mut st = Vec::new();
        for _ in 0..6 {
            remote
                .post_send(qp, write_wr(lkey, src[0], mr.rkey))
                .unwrap();
            st.push(remote.wait_cq(cq, 1).await.unwrap()[0].status);
        }
        let ok = gpu.bo_read(bo, 0, PAGES * PAGE_SIZE).await.unwrap() == pattern(7);
        (st, ok)
    });
    let (st, ok) = r.unwrap_or_default();
    (st, ok, v)
}

#[test]
fn rdma_writes_racing_gpu_moves_are_clean_over_many_seeds() {
    for seed in 0..32 {
        let (st, ok, v) = racing(seed, false);
        assert!(v.is_empty(), "seed {seed}: {v:?}");
        assert_eq!(st, [WcStatus::Success; 6], "seed {seed}");
        assert!(ok, "seed {seed}: the buffer holds the WRITEs' data");
    }
}

#[test]
fn skipping_the_peer_invalidation_is_caught_when_writes_race_moves() {
    let caught = (0..32)
        .filter(|&seed| racing(seed, true).2.contains(&ViolationKind::UseAfterFree))
        .count();
    assert!(
        caught >= 16,
        "only {caught} of 32 seeds caught the stale dma-buf MR"
    );
}
