//! The world the `gpu` integration tests share: a GPU, a NIC and an NVMe device under one PCIe switch, and
//! the helpers its tests use.
#![allow(
    dead_code,
    unreachable_pub,
    reason = "each test crate that includes this module uses a part of it"
)]

use std::cell::RefCell;
use std::future::Future;
use std::rc::Rc;

use peerdma_core::timing::Timing;
use peerdma_core::{Bdf, DeviceId, PAGE_SIZE, Pa};
use peerdma_devices::gpu::{
    AccessPattern, Gpu, GpuConfig, GpuCosts, KernelSpec, UvmConfig, UvmCosts,
};
use peerdma_dma::{DmaCosts, Platform, SegKind};
use peerdma_iommu::{DomainConfig, DomainType};
use peerdma_mm::{Kernel, MmCosts};
use peerdma_pci::topology::{Bar, TopologyBuilder, WhitelistEntry};
use peerdma_sim::{RunOutcome, Sim, SimConfig};

pub const NIC: DeviceId = DeviceId(1);
pub const GPU: DeviceId = DeviceId(2);
pub const NVME: DeviceId = DeviceId(3);
pub const BAR_PHYS: u64 = 0x40_0000_0000;
pub const PG: usize = 4096;

pub struct World {
    pub sim: Sim,
    pub k: Rc<Kernel>,
    pub p: Rc<Platform>,
    pub gpu: Rc<Gpu>,
}

/// Declares the fabric every test world here shares: host bridge `hb0`, root port `rp0`, a switch (`up`)
/// with three downstream ports `dn0`, `dn1`, `dn2` for the endpoints.
pub fn switch_fabric(b: &mut TopologyBuilder) {
    b.host_bridge("hb0", WhitelistEntry::Unrestricted);
    b.root_port("rp0", "hb0").bdf(Bdf::new(0, 1, 0).unwrap());
    b.switch_upstream("up", "rp0")
        .bdf(Bdf::new(1, 0, 0).unwrap());
    for (i, n) in ["dn0", "dn1", "dn2"].iter().enumerate() {
        b.switch_downstream(n, "up")
            .bdf(Bdf::new(2, u8::try_from(i).unwrap(), 0).unwrap());
    }
}

/// hb0 ── rp0 ── up ─┬─ dn0 ── gpu (BAR0: the VRAM window)
///                   ├─ dn1 ── nic (DMA domain)
///                   └─ dn2 ── nvme (identity domain)
pub fn world(vram_pages: u64, window_pages: Option<u64>, seed: u64) -> World {
    let sim = Sim::new(SimConfig {
        seed,
        explore: true,
        ..SimConfig::default()
    });
    let k = Kernel::new(&sim, 64 << 20, MmCosts::zero());
    let mut b = TopologyBuilder::new();
    switch_fabric(&mut b);
    b.endpoint("gpu", "dn0", Bdf::new(3, 0, 0).unwrap())
        .bar(Bar {
            index: 0,
            // Twice the VRAM: room after the window for a managed pool the BAR shows (beyond mainline).
            size: 2 * vram_pages * PAGE_SIZE,
            phys: Pa::from_raw(BAR_PHYS),
            bus_offset: 0,
            prefetchable: true,
        });
    b.endpoint("nic", "dn1", Bdf::new(4, 0, 0).unwrap());
    b.endpoint("nvme", "dn2", Bdf::new(5, 0, 0).unwrap());
    let p = Platform::new(k.clone(), b.build().unwrap(), DmaCosts::zero());
    let node = |n: &str| p.topology().lookup(n).unwrap();
    p.add_device(
        NIC,
        node("nic"),
        "nic",
        DomainConfig::with_type(DomainType::Dma),
    )
    .unwrap();
    p.add_device(
        NVME,
        node("nvme"),
        "nvme",
        DomainConfig::with_type(DomainType::Identity),
    )
    .unwrap();
    p.add_device(
        GPU,
        node("gpu"),
        "gpu",
        DomainConfig::with_type(DomainType::Identity),
    )
    .unwrap();
    let gpu = Gpu::new(
        &p,
        GPU,
        GpuConfig {
            vram: vram_pages * PAGE_SIZE,
            bar: 0,
            window: window_pages.map(|w| w * PAGE_SIZE),
            costs: GpuCosts::zero(),
        },
    )
    .unwrap();
    World { sim, k, p, gpu }
}

impl World {
    /// Runs `f` as the only agent and returns its result and the run's outcome.
    pub fn run<T: 'static, F: Future<Output = T> + 'static>(
        &self,
        f: impl FnOnce(Rc<Gpu>, Rc<Kernel>) -> F,
    ) -> (Option<T>, RunOutcome) {
        let out = Rc::new(RefCell::new(None));
        let (o, fut) = (out.clone(), f(self.gpu.clone(), self.k.clone()));
        self.sim
            .spawn("test", async move { *o.borrow_mut() = Some(fut.await) });
        let outcome = self.sim.run();
        (out.borrow_mut().take(), outcome)
    }

    pub fn run_clean<T: 'static, F: Future<Output = T> + 'static>(
        &self,
        f: impl FnOnce(Rc<Gpu>, Rc<Kernel>) -> F,
    ) -> T {
        let (v, outcome) = self.run(f);
        assert_eq!(outcome, RunOutcome::Completed);
        let violations = self.k.oracle_violations();
        assert!(violations.is_empty(), "oracle: {violations:?}");
        v.unwrap()
    }

    pub fn count(&self, name: &str) -> u64 {
        self.sim.metrics().get(name)
    }
}

pub fn pattern(n: u64, salt: u8) -> Vec<u8> {
    (0..n * PAGE_SIZE).map(|i| (i % 251) as u8 ^ salt).collect()
}

pub fn kinds(gpu: &Gpu, att: peerdma_devices::gpu::BoAttach) -> Vec<SegKind> {
    gpu.bo_segments(att).iter().map(|s| s.kind).collect()
}

pub fn uvm_cfg(capacity: u64, prefetch: bool) -> UvmConfig {
    let mut c = UvmConfig::new(capacity, UvmCosts::from_timing(&Timing::zero()));
    c.prefetch = prefetch;
    c
}

pub fn kernel(pattern: AccessPattern, nr_accesses: u64, warps: u32, write: bool) -> KernelSpec {
    KernelSpec {
        pattern,
        nr_accesses,
        warps,
        write,
        fatal_at: None,
    }
}
