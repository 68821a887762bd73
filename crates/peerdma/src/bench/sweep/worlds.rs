//! The worlds of `peerdma bench --sweep`: each function builds one fresh world in zero-time mode (every
//! model cost zero, oracle on, no trace) and token data mode (a version per page instead of its bytes,
//! `[sim] data = "token"`, so that 4 GiB of simulated memory fits the host), times its operations on the
//! host clock and returns host nanoseconds per operation. Only the operations are timed; building and
//! populating the world is not.
//!
//! This is a host-side tool; it models no kernel mechanism itself. The operations are those of the
//! library (`peerdma-mm`, `peerdma-dma`, `peerdma-pci`, `peerdma-devices`), called as `bench::sim` does.

use std::hint::black_box;
use std::rc::Rc;

use peerdma_core::{Bdf, DeviceId, PAGE_SIZE, Pid, Range, Va};
use peerdma_devices::{Dmirror, DmirrorCosts, DmirrorDevice, DmirrorMemory};
use peerdma_dma::{DmaCosts, DmaMirror, Platform};
use peerdma_iommu::DomainConfig;
use peerdma_mm::phys::DataMode;
use peerdma_mm::{Advice, Kernel, MmCosts};
use peerdma_pci::{NodeId, Topology, TopologyBuilder, WhitelistEntry};
use peerdma_sim::Sim;

use super::super::sim::{BenchResult, anon, per, run_agent, sim};
use super::{Op, Stopwatch};

/// The dmirror device of the migration worlds.
const DMIRROR: DeviceId = DeviceId(1000);
/// Endpoints per switch of the device tree.
const FANOUT: usize = 8;
/// Pages per mirror fault when a mirror is populated before the timed part.
const PREFAULT_CHUNK: u64 = 512;

/// A kernel in token data mode with `ram` bytes of RAM.
pub(super) fn token_kernel(sim: &Sim, ram: u64) -> BenchResult<Rc<Kernel>> {
    let k = Kernel::new(sim, ram, MmCosts::zero());
    k.set_data_mode(DataMode::Token)
        .map_err(|e| format!("token data mode: {e}"))?;
    Ok(k)
}

/// RAM for `pages` resident pages plus 64 MiB of headroom above the watermarks (no reclaim runs unless
/// the world asks for it).
pub(super) fn ram(pages: u64) -> u64 {
    pages * PAGE_SIZE + (64 << 20)
}

/// Bus `n` (0..=255) as a `Bdf` with device `dev`.
fn bdf(bus: usize, dev: usize) -> BenchResult<Bdf> {
    let (b, d) = (
        u8::try_from(bus).map_err(|_| "too many PCI buses")?,
        u8::try_from(dev).map_err(|_| "too many PCI devices")?,
    );
    Bdf::new(b, d, 0).ok_or_else(|| format!("bad BDF {bus}:{dev}.0"))
}

/// A switch tree with `n` endpoints (`ep0`…): one root port, an upstream switch whose downstream ports
/// each lead to a second switch of up to [`FANOUT`] endpoints. Returns the topology and the endpoints.
pub(super) fn switch_tree(n: usize) -> BenchResult<(Topology, Vec<NodeId>)> {
    let mut b = TopologyBuilder::new();
    b.host_bridge("hb0", WhitelistEntry::NotListed);
    b.root_port("rp0", "hb0").bdf(bdf(0, 1)?);
    b.switch_upstream("up", "rp0").bdf(bdf(1, 0)?);
    let mut bus = 3;
    for g in 0..n.div_ceil(FANOUT) {
        let (dn, sup) = (format!("dn{g}"), format!("sup{g}"));
        b.switch_downstream(&dn, "up").bdf(bdf(2, g)?);
        b.switch_upstream(&sup, &dn).bdf(bdf(bus, 0)?);
        let ports = bus + 1;
        bus += 2;
        for e in 0..FANOUT.min(n - g * FANOUT) {
            let sdn = format!("sdn{g}_{e}");
            b.switch_downstream(&sdn, &sup).bdf(bdf(ports, e)?);
            b.endpoint(&format!("ep{}", g * FANOUT + e), &sdn, bdf(bus, 0)?);
            bus += 1;
        }
    }
    let topo = b.build().map_err(|e| format!("topology: {e}"))?;
    let eps = (0..n)
        .map(|i| topo.lookup(&format!("ep{i}")).ok_or("endpoint missing"))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((topo, eps))
}

/// A platform over a token-mode kernel with `ram` bytes and `n` devices (`DeviceId(0..n)`) behind
/// [`switch_tree`], each in its own strict DMA domain.
pub(super) fn platform(sim: &Sim, ram: u64, n: usize) -> BenchResult<(Rc<Platform>, Vec<NodeId>)> {
    let k = token_kernel(sim, ram)?;
    let (topo, eps) = switch_tree(n)?;
    let p = Platform::new(k, topo, DmaCosts::zero());
    for (i, &node) in eps.iter().enumerate() {
        let id = DeviceId(u32::try_from(i).map_err(|_| "too many devices")?);
        p.add_device(id, node, &format!("ep{i}"), DomainConfig::default())
            .map_err(|e| format!("add_device: {e}"))?;
    }
    Ok((p, eps))
}

/// Faults every page of `r` into mirror `m`, [`PREFAULT_CHUNK`] pages per fault (untimed set-up).
pub(super) async fn prefault(m: &DmaMirror, r: Range<Va>) -> BenchResult<()> {
    let pages = r.len() / PAGE_SIZE;
    let mut done = 0;
    while done < pages {
        let n = PREFAULT_CHUNK.min(pages - done);
        let c = Range::from_len(r.start.add(done * PAGE_SIZE), n * PAGE_SIZE).ok_or("range")?;
        m.fault(c, true)
            .await
            .map_err(|e| format!("mirror fault: {e}"))?;
        done += n;
    }
    Ok(())
}

/// Stores one byte to each of `pages` pages from `buf` (each a demand-zero write fault the first time).
pub(super) async fn touch(k: &Kernel, pid: Pid, buf: Va, pages: u64) -> BenchResult<()> {
    for i in 0..pages {
        k.store(pid, buf.add(i * PAGE_SIZE), &[1])
            .await
            .map_err(|e| format!("store: {e:?}"))?;
    }
    Ok(())
}

/// Reclaims at least `pages` pages to swap in passes of 32 (direct reclaim's batch), stopping after four
/// passes in a row that write nothing; returns ns per page written.
pub(super) async fn reclaim(k: &Kernel, pages: u64) -> BenchResult<f64> {
    let t = Stopwatch::start();
    let (mut out, mut idle) = (0, 0);
    while out < pages && idle < 4 {
        let n = k.reclaim(32).await;
        out += n;
        idle = if n == 0 { idle + 1 } else { 0 };
    }
    if out == 0 {
        return Err("reclaim wrote no page to swap".to_owned());
    }
    Ok(per(t.elapsed(), out))
}

/// Pages: `pages` CPU write faults in one process, then reclaim of as many pages to swap.
pub(super) fn fault_reclaim(pages: u64) -> BenchResult<Vec<Op>> {
    let sim = sim();
    let k = token_kernel(&sim, ram(pages))?;
    run_agent(&sim, async move {
        let pid = k.create_process();
        let buf = anon(&k, pid, pages, false).await?;
        let t = Stopwatch::start();
        touch(&k, pid, buf, pages).await?;
        let fault = per(t.elapsed(), pages);
        let rec = reclaim(&k, pages).await?;
        k.exit(pid).await;
        Ok(vec![Op::new("cpu_fault", fault), Op::new("reclaim", rec)])
    })
}

/// Pages: one device fault per page through a DMA mirror, then MADV_DONTNEED of the range (the mirror's
/// invalidation and the CPU zap), per page.
pub(super) fn mirror(pages: u64) -> BenchResult<Vec<Op>> {
    let sim = sim();
    let (p, _) = platform(&sim, ram(pages), 1)?;
    run_agent(&sim, async move {
        let k = p.kernel.clone();
        let pid = k.create_process();
        let va = anon(&k, pid, pages, true).await?;
        let all = Range::from_len(va, pages * PAGE_SIZE).ok_or("range overflow")?;
        let dev = p.device(DeviceId(0)).map_err(|e| format!("device: {e}"))?;
        let m = DmaMirror::register(&p, dev, pid, all).map_err(|e| format!("register: {e}"))?;
        let t = Stopwatch::start();
        for i in 0..pages {
            let one = Range::from_len(va.add(i * PAGE_SIZE), PAGE_SIZE).ok_or("range overflow")?;
            m.fault(one, true)
                .await
                .map_err(|e| format!("mirror fault: {e}"))?;
        }
        let fault = per(t.elapsed(), pages);
        let t = Stopwatch::start();
        k.madvise(pid, va, pages * PAGE_SIZE, Advice::DontNeed)
            .await
            .map_err(|e| format!("madvise: {e}"))?;
        let inval = per(t.elapsed(), pages);
        if m.nr_mapped() != 0 {
            return Err("DONTNEED left mirror entries in place".to_owned());
        }
        m.unregister().await;
        k.exit(pid).await;
        Ok(vec![
            Op::new("mirror_fault", fault),
            Op::new("mirror_invalidate", inval),
        ])
    })
}

/// A dmirror device with device-private memory for `pages` pages on `k`.
pub(super) fn dmirror(k: &Rc<Kernel>, pages: u64) -> Rc<DmirrorDevice> {
    DmirrorDevice::new(
        k,
        DMIRROR,
        DmirrorMemory::Private,
        pages * PAGE_SIZE + (16 << 20),
        DmirrorCosts::zero(),
    )
}

/// Migrates the `pages` written pages at `buf` of `pid` to `dev`'s private memory and back; returns ns
/// per page each way.
pub(super) async fn round_trip(
    k: &Kernel,
    dev: &Rc<DmirrorDevice>,
    pid: Pid,
    buf: Va,
    pages: u64,
) -> BenchResult<(f64, f64)> {
    k.madvise(pid, buf, pages * PAGE_SIZE, Advice::NoHugePage)
        .await
        .map_err(|e| format!("madvise: {e}"))?;
    let m = Dmirror::open(dev, pid).map_err(|e| format!("dmirror open: {e}"))?;
    let t = Stopwatch::start();
    let r = m
        .migrate_to_dev(buf, pages)
        .await
        .map_err(|e| format!("migrate_to_dev: {e}"))?;
    let to_dev = per(t.elapsed(), pages);
    if r.cpages != pages {
        return Err(format!("migrate_to_dev moved {} of {pages}", r.cpages));
    }
    let t = Stopwatch::start();
    let r = m
        .migrate_to_sys(buf, pages)
        .await
        .map_err(|e| format!("migrate_to_sys: {e}"))?;
    let to_sys = per(t.elapsed(), pages);
    if r.cpages != pages {
        return Err(format!("migrate_to_sys moved {} of {pages}", r.cpages));
    }
    m.close().await;
    Ok((to_dev, to_sys))
}

/// Pages: migration of `pages` written pages to device-private memory and back, per page.
pub(super) fn migration(pages: u64) -> BenchResult<Vec<Op>> {
    let sim = sim();
    let k = token_kernel(&sim, ram(pages))?;
    let dev = dmirror(&k, pages);
    run_agent(&sim, async move {
        let pid = k.create_process();
        let buf = anon(&k, pid, pages, false).await?;
        touch(&k, pid, buf, pages).await?;
        let (to_dev, to_sys) = round_trip(&k, &dev, pid, buf, pages).await?;
        k.exit(pid).await;
        Ok(vec![
            Op::new("migrate_to_dev", to_dev),
            Op::new("migrate_to_sys", to_sys),
        ])
    })
}

/// Pages: `pages` single-page `dma_map_sg` calls on one device (each IOVA allocation and IO PTE stays
/// live, so the last call searches an IOVA space holding `pages - 1` ranges), then their unmaps.
pub(super) fn iova(pages: u64) -> BenchResult<Vec<Op>> {
    let sim = sim();
    let (p, _) = platform(&sim, ram(pages), 1)?;
    run_agent(&sim, async move {
        let k = p.kernel.clone();
        let pas = (0..pages)
            .map(|_| k.alloc_ram_page(None).map(|f| k.frame_pa(f)))
            .collect::<Option<Vec<_>>>()
            .ok_or("out of RAM frames")?;
        let dev = DeviceId(0);
        let t = Stopwatch::start();
        let mut sgs = Vec::with_capacity(pas.len());
        for pa in &pas {
            sgs.push(
                p.map_sg(dev, std::slice::from_ref(pa), true)
                    .map_err(|e| format!("map_sg: {e}"))?,
            );
        }
        let map = per(t.elapsed(), pages);
        let t = Stopwatch::start();
        for sg in &mut sgs {
            black_box(p.unmap_sg(dev, sg).map_err(|e| format!("unmap_sg: {e}"))?);
        }
        let unmap = per(t.elapsed(), pages);
        Ok(vec![
            Op::new("dma_map_page", map),
            Op::new("dma_unmap_page", unmap),
        ])
    })
}

#[cfg(test)]
mod tests {
    use peerdma_pci::{MapType, p2p_distance};

    use super::switch_tree;

    #[test]
    fn the_switch_tree_has_n_endpoints_at_one_depth_and_neighbours_are_nearer_than_strangers() {
        for n in [1, 4, 16, 64] {
            let (topo, eps) = switch_tree(n).unwrap();
            assert_eq!(eps.len(), n);
            let mut bdfs: Vec<_> = eps.iter().map(|&e| topo.node(e).bdf()).collect();
            bdfs.sort();
            bdfs.dedup();
            assert_eq!(bdfs.len(), n, "every endpoint has its own BDF");
            let depth = topo.upstream_chain(eps[0]).len();
            for &e in &eps {
                assert_eq!(topo.upstream_chain(e).len(), depth, "all at one depth");
            }
        }
        let (topo, eps) = switch_tree(64).unwrap();
        // ep0 and ep1 share a second-level switch; ep0 and ep63 meet only at the top switch.
        let near = p2p_distance(&topo, eps[0], eps[1]);
        let far = p2p_distance(&topo, eps[0], eps[63]);
        assert_eq!(near.map_type, MapType::BusAddr);
        assert_eq!(far.map_type, MapType::BusAddr);
        assert!(near.distance < far.distance, "{near:?} {far:?}");
    }
}
