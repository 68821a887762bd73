//! The platform every integration test of the DMA layer runs on, and small helpers to drive it.
//!
//! Topology (one whitelisted host bridge `hb0`, one that is not whitelisted `hb1`):
//! ```text
//! hb0 (Unrestricted) ── rp0 ── up ─┬─ dn0 ── nvme   BAR0: P2P memory, bus offset +0x1000_0000
//!                      │           │                 BAR2: exported BAR without struct page
//!                      │           └─ dn1 ── nic    the DMA initiator (client)
//!                      └─ rp1 ── gpu                BAR0: P2P memory (host-bridge path to nic)
//!                                                   BAR2: exported BAR without struct page
//! hb1 (NotListed) ──── rp2 ── acc                   BAR0: P2P memory (nic cannot reach it)
//! ```
#![allow(
    dead_code,
    unreachable_pub,
    reason = "each test crate uses a different part of the harness"
)]

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::{Rc, Weak};

use peerdma_core::{Bdf, DeviceId, Errno, FrameId, PAGE_SIZE, Pa, Pid, Range, Va};
use peerdma_dma::{DmaCosts, Platform};
use peerdma_iommu::{DomainConfig, DomainType};
use peerdma_mm::migrate::{
    MIGRATE_PFN_MIGRATE, MIGRATE_PFN_WRITE, MIGRATE_VMA_SELECT_DEVICE_PRIVATE,
    MIGRATE_VMA_SELECT_SYSTEM, migrate_pfn, migrate_pfn_to_frame,
};
use peerdma_mm::{DevicePagemapOps, Kernel, MemoryKind, MigrateVma, MmCosts, MmapArgs, Prot};
use peerdma_pci::LinkSpec;
use peerdma_pci::topology::{Bar, TopologyBuilder, WhitelistEntry};
use peerdma_sim::{RunOutcome, Sim, SimConfig};

/// The initiator of every DMA in the tests.
pub const NIC: DeviceId = DeviceId(1);
/// The provider under the same switch as the NIC.
pub const NVME: DeviceId = DeviceId(2);
/// The provider behind another root port of the same (whitelisted) host bridge.
pub const GPU: DeviceId = DeviceId(3);
/// The provider under a host bridge that is not whitelisted.
pub const ACC: DeviceId = DeviceId(4);
/// The owner of device memory (device-private or device-coherent), not a PCI device of the platform.
pub const DEVMEM_OWNER: DeviceId = DeviceId(9);

/// NVMe BAR0 (P2P memory).
pub const NVME_BAR0: u64 = 0x1_0000_0000;
/// NVMe BAR0's bus offset: bus address = phys + this.
pub const NVME_BUS_OFFSET: i64 = 0x1000_0000;
/// NVMe BAR2 (exported BAR without struct page).
pub const NVME_BAR2: u64 = 0x1_0100_0000;
/// GPU BAR0 (P2P memory).
pub const GPU_BAR0: u64 = 0x2_0000_0000;
/// GPU BAR2 (exported BAR without struct page; host-bridge path to nic).
pub const GPU_BAR2: u64 = 0x2_0100_0000;
/// ACC BAR0 (P2P memory).
pub const ACC_BAR0: u64 = 0x3_0000_0000;
/// Bytes of P2P memory each provider adds.
pub const P2P_LEN: u64 = 16 * PAGE_SIZE;

fn bar(index: u8, phys: u64, size: u64, bus_offset: i64) -> Bar {
    Bar {
        index,
        size,
        phys: Pa::from_raw(phys),
        bus_offset,
        prefetchable: true,
    }
}

/// A test world: the simulation, the kernel and the platform.
pub struct World {
    pub sim: Sim,
    pub k: Rc<Kernel>,
    pub p: Rc<Platform>,
}

/// Builds the world with `nic_domain` for the NIC (every provider gets an identity domain). Every provider's
/// P2P memory is added and published.
pub fn world(nic_domain: DomainType) -> World {
    world_seeded(nic_domain, 0)
}

/// As [`world`], with a seed.
pub fn world_seeded(nic_domain: DomainType, seed: u64) -> World {
    world_with(nic_domain, seed, DmaCosts::zero())
}

/// As [`world`], with the DMA layer's costs.
pub fn world_with(nic_domain: DomainType, seed: u64, costs: DmaCosts) -> World {
    world_sim(
        nic_domain,
        SimConfig {
            seed,
            ..SimConfig::default()
        },
        costs,
    )
}

/// As [`world`], in the engine's exploration mode (ready agents ordered by the seed).
pub fn world_explore(nic_domain: DomainType, seed: u64) -> World {
    world_sim(
        nic_domain,
        SimConfig {
            seed,
            explore: true,
            ..SimConfig::default()
        },
        DmaCosts::zero(),
    )
}

/// As [`world_explore`], with the DMA layer's costs and a latency jitter (so transfers take time and
/// their landings move with the seed).
pub fn world_explore_timed(nic_domain: DomainType, seed: u64, costs: DmaCosts) -> World {
    world_sim(
        nic_domain,
        SimConfig {
            seed,
            explore: true,
            jitter: 0.3,
            ..SimConfig::default()
        },
        costs,
    )
}

/// As [`world`], with the whole config of the NIC's domain (an aperture of its own, say).
pub fn world_nic(nic: DomainConfig, costs: DmaCosts) -> World {
    world_nic_sim(nic, SimConfig::default(), costs)
}

fn world_sim(nic_domain: DomainType, cfg: SimConfig, costs: DmaCosts) -> World {
    world_nic_sim(DomainConfig::with_type(nic_domain), cfg, costs)
}

fn world_nic_sim(nic: DomainConfig, cfg: SimConfig, costs: DmaCosts) -> World {
    let sim = Sim::new(cfg);
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
        .link(LinkSpec::new(3, 4))
        .bar(bar(0, NVME_BAR0, 0x10_0000, NVME_BUS_OFFSET))
        .bar(bar(2, NVME_BAR2, 0x10_0000, NVME_BUS_OFFSET));
    b.endpoint("nic", "dn1", Bdf::new(4, 0, 0).unwrap())
        .link(LinkSpec::new(4, 8))
        .bar(bar(0, 0x1_0200_0000, 0x10_0000, 0));
    b.endpoint("gpu", "rp1", Bdf::new(5, 0, 0).unwrap())
        .bar(bar(0, GPU_BAR0, 0x10_0000, 0))
        .bar(bar(2, GPU_BAR2, 0x10_0000, 0));
    b.endpoint("acc", "rp2", Bdf::new(1, 0, 0).unwrap())
        .bar(bar(0, ACC_BAR0, 0x10_0000, 0));
    let topo = b.build().unwrap();
    let p = Platform::new(k.clone(), topo, costs);
    let node = |n: &str| p.topology().lookup(n).unwrap();
    p.add_device(NIC, node("nic"), "nic", nic).unwrap();
    for (id, name) in [(NVME, "nvme"), (GPU, "gpu"), (ACC, "acc")] {
        p.add_device(
            id,
            node(name),
            name,
            DomainConfig::with_type(DomainType::Identity),
        )
        .unwrap();
        p.p2p_add_resource(id, 0, P2P_LEN, 0).unwrap();
        p.p2p_publish(id, true).unwrap();
    }
    World { sim, k, p }
}

impl World {
    /// Runs `f` as the only agent; asserts the run completes and the oracle saw nothing; returns its result.
    pub fn run<T: 'static, F: Future<Output = T> + 'static>(
        &self,
        f: impl FnOnce(Rc<Kernel>, Rc<Platform>) -> F,
    ) -> T {
        let out = Rc::new(RefCell::new(None));
        let (o, fut) = (out.clone(), f(self.k.clone(), self.p.clone()));
        self.sim
            .spawn("test", async move { *o.borrow_mut() = Some(fut.await) });
        assert_eq!(self.sim.run(), RunOutcome::Completed);
        self.assert_no_violation();
        out.borrow_mut().take().unwrap()
    }

    /// Asserts the oracle has recorded no violation.
    pub fn assert_no_violation(&self) {
        let violations = self.k.oracle_violations();
        assert!(violations.is_empty(), "oracle: {violations:?}");
    }

    /// Returns the number of IOVA pages mapped in the NIC's domain.
    pub fn nic_mapped_pages(&self) -> u64 {
        self.p.device(NIC).unwrap().domain().mapped_pages()
    }
}

/// Returns `n` pages in bytes.
pub fn pages(n: u64) -> u64 {
    n * PAGE_SIZE
}

/// Returns `[va, va + n pages)`.
pub fn range(va: Va, n: u64) -> Range<Va> {
    Range::from_len(va, pages(n)).unwrap()
}

/// Maps `n` pages of private anonymous memory, populated.
pub async fn anon(k: &Kernel, pid: Pid, n: u64, prot: Prot) -> Va {
    k.mmap(
        pid,
        &MmapArgs {
            len: pages(n),
            prot,
            private: true,
            anonymous: true,
            populate: true,
            ..MmapArgs::default()
        },
    )
    .await
    .unwrap()
}

/// Maps `n` pages at exactly `addr` (anonymous private, populated).
pub async fn anon_at(k: &Kernel, pid: Pid, addr: Va, n: u64, prot: Prot) -> Va {
    k.mmap(
        pid,
        &MmapArgs {
            addr: Some(addr),
            len: pages(n),
            prot,
            private: true,
            anonymous: true,
            fixed_noreplace: true,
            populate: true,
            ..MmapArgs::default()
        },
    )
    .await
    .unwrap()
}

/// Maps `n` pages of a file with a shared mapping, populated.
pub async fn file_shared(k: &Kernel, pid: Pid, file: u32, n: u64) -> Va {
    k.mmap(
        pid,
        &MmapArgs {
            len: pages(n),
            prot: Prot::RW,
            shared: true,
            file: Some(file),
            populate: true,
            ..MmapArgs::default()
        },
    )
    .await
    .unwrap()
}

/// Returns the frame mapped at `va`.
pub fn frame_of(k: &Kernel, pid: Pid, va: Va) -> FrameId {
    k.translate(pid, va).map(|(f, _)| f).unwrap()
}

/// Returns the kind of the frame mapped at `va` (or the frame a device-private entry names).
pub fn kind_at(k: &Kernel, pid: Pid, va: Va) -> MemoryKind {
    let f = frame_of(k, pid, va);
    k.memory_kind(f)
}

/// Returns whether the frame may be DMA-pinned (`page_maybe_dma_pinned`).
pub fn pinned(k: &Kernel, f: FrameId) -> bool {
    k.frame_info(f).maybe_dma_pinned
}

/// A device memory region whose `migrate_to_ram` copies the page back to RAM (node 0).
#[derive(Debug)]
pub struct DevMem {
    k: Weak<Kernel>,
    region: RefCell<usize>,
}

impl DevicePagemapOps for DevMem {
    fn migrate_to_ram<'a>(
        &'a self,
        pid: Pid,
        va: Va,
        _frame: FrameId,
    ) -> Pin<Box<dyn Future<Output = Result<(), peerdma_mm::VmFault>> + 'a>> {
        Box::pin(async move {
            let k = self.k.upgrade().ok_or(peerdma_mm::VmFault::Sigbus)?;
            let page = Range::from_len(va.align_down(PAGE_SIZE), PAGE_SIZE)
                .ok_or(peerdma_mm::VmFault::Sigbus)?;
            let mut m = MigrateVma::new(pid, page, MIGRATE_VMA_SELECT_DEVICE_PRIVATE, DEVMEM_OWNER);
            k.migrate_vma_setup(&mut m)
                .await
                .map_err(|_| peerdma_mm::VmFault::Sigbus)?;
            for i in 0..m.src.len() {
                if m.src[i] & MIGRATE_PFN_MIGRATE == 0 {
                    continue;
                }
                let Some(src) = migrate_pfn_to_frame(m.src[i]) else {
                    continue;
                };
                let dst = k.alloc_page(0).ok_or(peerdma_mm::VmFault::Sigbus)?;
                k.copy_page(src, dst);
                m.dst[i] = migrate_pfn(dst) | (m.src[i] & MIGRATE_PFN_WRITE);
            }
            k.migrate_vma_pages(&mut m).await;
            k.migrate_vma_finalize(&mut m);
            Ok(())
        })
    }
}

/// Adds `n` pages of device memory of `kind` owned by [`DEVMEM_OWNER`]; returns its region.
pub fn add_devmem(k: &Rc<Kernel>, private: bool, n: u64) -> usize {
    let kind = if private {
        MemoryKind::DevicePrivate {
            owner: DEVMEM_OWNER,
        }
    } else {
        MemoryKind::DeviceCoherent {
            owner: DEVMEM_OWNER,
        }
    };
    let ops = Rc::new(DevMem {
        k: Rc::downgrade(k),
        region: RefCell::new(0),
    });
    let r = k.add_device_memory(kind, pages(n), ops.clone());
    *ops.region.borrow_mut() = r;
    r
}

/// Migrates the (populated, RAM) pages of `r` into device memory region `region` (`migrate_vma` with
/// SELECT_SYSTEM); returns how many moved.
pub async fn migrate_to_device(k: &Kernel, pid: Pid, r: Range<Va>, region: usize) -> usize {
    let lock = k.mmap_lock(pid);
    let _m = lock.read().await;
    let mut m = MigrateVma::new(pid, r, MIGRATE_VMA_SELECT_SYSTEM, DEVMEM_OWNER);
    k.migrate_vma_setup(&mut m).await.unwrap();
    let mut moved = 0;
    for i in 0..m.src.len() {
        if m.src[i] & MIGRATE_PFN_MIGRATE == 0 {
            continue;
        }
        let Some(src) = migrate_pfn_to_frame(m.src[i]) else {
            continue;
        };
        let dst = k.alloc_page(region).unwrap();
        k.copy_page(src, dst);
        m.dst[i] = migrate_pfn(dst) | (m.src[i] & MIGRATE_PFN_WRITE);
        moved += 1;
    }
    k.migrate_vma_pages(&mut m).await;
    k.migrate_vma_finalize(&mut m);
    moved
}

/// Returns a page of `byte`.
pub fn page_of(byte: u8) -> Vec<u8> {
    vec![byte; 4096]
}

/// Asserts `r` is `Err(e)` (for results whose `Ok` type is not `PartialEq`).
#[track_caller]
pub fn assert_errno<T: std::fmt::Debug>(r: Result<T, Errno>, e: Errno) {
    match r {
        Err(got) => assert_eq!(got, e),
        Ok(v) => panic!("expected {e:?}, got Ok({v:?})"),
    }
}
