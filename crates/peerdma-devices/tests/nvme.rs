//! The NVMe model: O_DIRECT reads and writes into RAM and into peer memory, the refusal of a queue without
//! P2P support, a NOT_SUPPORTED path (both kernels' errnos), a whitelisted host bridge, the queue depth.
//!
//! ```text
//! hb0 (whitelisted) ── rp0 ── up ─┬─ dn0 ── nvme    (the controller)
//!                     │           └─ dn1 ── near    BAR0: P2P memory (a CMB under the same switch)
//!                     └─ rp1 ── far                 BAR0: P2P memory (through the host bridge)
//! hb1 (not listed) ── rp2 ── acc                    BAR0: P2P memory (NOT_SUPPORTED from nvme)
//! ```
#![expect(
    clippy::tests_outside_test_module,
    clippy::unwrap_used,
    clippy::many_single_char_names,
    reason = "an integration-test crate is all tests"
)]

use std::cell::RefCell;
use std::future::Future;
use std::rc::Rc;

use peerdma_core::{Bdf, DeviceId, Errno, PAGE_SIZE, Pa, Pid, SimDuration, Va};
use peerdma_devices::nvme::{Nvme, NvmeCosts, NvmeError};
use peerdma_dma::{DmaCosts, Platform};
use peerdma_iommu::{DomainConfig, DomainType};
use peerdma_mm::{Kernel, MmCosts, MmapArgs, Prot};
use peerdma_pci::LinkSpec;
use peerdma_pci::topology::{Bar, TopologyBuilder, WhitelistEntry};
use peerdma_sim::{RunOutcome, Sim, SimConfig};

const NEAR: DeviceId = DeviceId(2);
const FAR: DeviceId = DeviceId(3);
const ACC: DeviceId = DeviceId(4);

fn bar(phys: u64) -> Bar {
    Bar {
        index: 0,
        size: 0x10_0000,
        phys: Pa::from_raw(phys),
        bus_offset: 0,
        prefetchable: true,
    }
}

fn world(p2p_queue: bool, costs: NvmeCosts) -> (Sim, Rc<Kernel>, Rc<Platform>, Rc<Nvme>) {
    let sim = Sim::new(SimConfig::default());
    let k = Kernel::new(&sim, 64 << 20, MmCosts::zero());
    let mut b = TopologyBuilder::new();
    b.host_bridge("hb0", WhitelistEntry::Unrestricted);
    b.host_bridge("hb1", WhitelistEntry::NotListed).domain(1);
    b.root_port("rp0", "hb0").bdf(Bdf::new(0, 1, 0).unwrap());
    b.root_port("rp1", "hb0").bdf(Bdf::new(0, 2, 0).unwrap());
    b.root_port("rp2", "hb1").bdf(Bdf::new(0, 1, 0).unwrap());
    b.switch_upstream("up", "rp0")
        .bdf(Bdf::new(1, 0, 0).unwrap());
    b.switch_downstream("dn0", "up")
        .bdf(Bdf::new(2, 0, 0).unwrap());
    b.switch_downstream("dn1", "up")
        .bdf(Bdf::new(2, 1, 0).unwrap());
    b.endpoint("nvme", "dn0", Bdf::new(3, 0, 0).unwrap())
        .link(LinkSpec::new(4, 4));
    b.endpoint("near", "dn1", Bdf::new(4, 0, 0).unwrap())
        .bar(bar(0x1_0000_0000));
    b.endpoint("far", "rp1", Bdf::new(5, 0, 0).unwrap())
        .bar(bar(0x2_0000_0000));
    b.endpoint("acc", "rp2", Bdf::new(1, 0, 0).unwrap())
        .bar(bar(0x3_0000_0000));
    let p = Platform::new(k.clone(), b.build().unwrap(), DmaCosts::calibrated());
    let node = |n: &str| p.topology().lookup(n).unwrap();
    let dom = || DomainConfig::with_type(DomainType::Dma);
    let d = p
        .add_device(DeviceId(1), node("nvme"), "nvme", dom())
        .unwrap();
    for (id, n) in [(NEAR, "near"), (FAR, "far"), (ACC, "acc")] {
        p.add_device(id, node(n), n, dom()).unwrap();
        p.p2p_add_resource(id, 0, 16 * PAGE_SIZE, 0).unwrap();
        p.p2p_publish(id, true).unwrap();
    }
    let nvme = Nvme::new(&p, d, costs, 1 << 20, p2p_queue);
    (sim, k, p, nvme)
}

fn run<T: 'static, F: Future<Output = T> + 'static>(
    p2p_queue: bool,
    costs: NvmeCosts,
    f: impl FnOnce(Rc<Kernel>, Rc<Platform>, Rc<Nvme>) -> F,
) -> T {
    let (sim, k, p, n) = world(p2p_queue, costs);
    let out = Rc::new(RefCell::new(None));
    let (o, fut) = (out.clone(), f(k.clone(), p, n));
    sim.spawn("test", async move { *o.borrow_mut() = Some(fut.await) });
    assert_eq!(sim.run(), RunOutcome::Completed);
    assert!(
        k.oracle_violations().is_empty(),
        "{:?}",
        k.oracle_violations()
    );
    out.borrow_mut().take().unwrap()
}

async fn ram(k: &Kernel, pid: Pid, pages: u64) -> Va {
    k.mmap(
        pid,
        &MmapArgs {
            len: pages * PAGE_SIZE,
            prot: Prot::RW,
            private: true,
            anonymous: true,
            populate: true,
            ..MmapArgs::default()
        },
    )
    .await
    .unwrap()
}

/// Writes a pattern from RAM to blocks 0..4, reads them into `provider`'s P2P memory, writes that to
/// blocks 8..12, reads those back into RAM: the bytes that come back went through the peer memory.
fn through_peer(
    p2p_queue: bool,
    provider: DeviceId,
    old_kernel: bool,
) -> Result<Vec<u8>, NvmeError> {
    run(
        p2p_queue,
        NvmeCosts::calibrated(),
        move |k, p, n| async move {
            n.set_kernel_6_16(old_kernel);
            let pid = k.create_process();
            let src = ram(&k, pid, 4).await;
            k.store(pid, src, &[0x3c; 4 * 4096]).await.unwrap();
            n.write(pid, src, 0, 4 * PAGE_SIZE).await.unwrap();
            let peer = p
                .p2pmem_mmap(pid, provider, 4 * PAGE_SIZE, Prot::RW, true, 0)
                .await
                .unwrap();
            n.read(pid, peer, 0, 4 * PAGE_SIZE).await?;
            n.write(pid, peer, 8 * PAGE_SIZE, 4 * PAGE_SIZE).await?;
            let back = ram(&k, pid, 4).await;
            n.read(pid, back, 8 * PAGE_SIZE, 4 * PAGE_SIZE).await?;
            let mut buf = vec![0u8; 4 * 4096];
            k.load(pid, back, &mut buf).await.unwrap();
            Ok(buf)
        },
    )
}

#[test]
fn o_direct_into_peer_memory_under_a_switch_and_through_a_whitelisted_host_bridge() {
    assert_eq!(
        through_peer(true, NEAR, false).unwrap(),
        vec![0x3c; 4 * 4096]
    );
    assert_eq!(
        through_peer(true, FAR, false).unwrap(),
        vec![0x3c; 4 * 4096]
    );
}

#[test]
fn a_queue_without_p2p_support_fails_at_the_pin() {
    assert_eq!(
        through_peer(false, NEAR, false),
        Err(NvmeError::Errno(Errno::EREMOTEIO))
    );
}

#[test]
fn a_not_supported_segment_fails_the_io_with_the_kernels_errno() {
    assert_eq!(
        through_peer(true, ACC, false),
        Err(NvmeError::Errno(Errno::EINVAL)),
        "6.17+: BLK_STS_INVAL"
    );
    assert_eq!(
        through_peer(true, ACC, true),
        Err(NvmeError::Errno(Errno::EREMOTEIO)),
        "through 6.16"
    );
}

#[test]
fn bad_arguments() {
    let r = run(true, NvmeCosts::zero(), |k, _, n| async move {
        let pid = k.create_process();
        let buf = ram(&k, pid, 1).await;
        (
            n.read(pid, buf, 512, PAGE_SIZE).await.err(),
            n.read(pid, buf, 1 << 20, PAGE_SIZE).await.err(),
            n.read(pid, buf.add(64 * PAGE_SIZE), 0, PAGE_SIZE)
                .await
                .err(),
        )
    });
    assert_eq!(r.0, Some(NvmeError::Errno(Errno::EINVAL)));
    assert!(matches!(r.1, Some(NvmeError::BeyondNamespace { .. })));
    assert_eq!(r.2, Some(NvmeError::Errno(Errno::EFAULT)));
}

/// Four concurrent one-block reads: the simulated time they take with queue depth `qd`.
fn four_reads(qd: u32) -> u64 {
    let costs = NvmeCosts {
        queue_depth: qd,
        ..NvmeCosts::calibrated()
    };
    run(true, costs, |k, _, n| async move {
        let pid = k.create_process();
        let buf = ram(&k, pid, 4).await;
        let t0 = k.sim.now();
        let done = Rc::new(RefCell::new(0));
        for i in 0..4u64 {
            let (n, d) = (n.clone(), done.clone());
            k.sim.spawn(format!("io{i}"), async move {
                n.read(pid, buf.add(i * PAGE_SIZE), i * PAGE_SIZE, PAGE_SIZE)
                    .await
                    .unwrap();
                *d.borrow_mut() += 1;
            });
        }
        while *done.borrow() < 4 {
            k.sim.sleep(SimDuration::from_micros(1)).await;
        }
        k.sim.now().0 - t0.0
    })
}

#[test]
fn queue_depth_bounds_commands_in_flight() {
    let (one, four) = (four_reads(1), four_reads(4));
    let lat = NvmeCosts::calibrated().read_latency.as_nanos();
    assert!(one >= 4 * lat, "qd 1 serialises: {one}");
    assert!(four < 2 * lat, "qd 4 overlaps: {four}");
}
