//! The worlds of `peerdma bench --sweep` whose size is a count of things rather than of pages: mirrors of
//! one range, devices behind a switch tree, live processes, and processes bound to an SVA device (one
//! PASID each). Same conventions as [`super::worlds`]: zero-time mode, token data mode, only the
//! operations timed, host nanoseconds per operation.
//!
//! This is a host-side tool; it models no kernel mechanism itself.

use std::hint::black_box;

use peerdma_core::{DeviceId, PAGE_SIZE, Range};
use peerdma_devices::{CompletionStatus, Descriptor, SvaAccel, SvaAccelConfig, SvaCosts, SvaIommu};
use peerdma_dma::DmaMirror;
use peerdma_iommu::{AtcConfig, SvaDeviceInfo};
use peerdma_mm::Advice;
use peerdma_pci::{P2pCache, distance_many, p2p_distance};

use super::super::sim::{BenchResult, anon, per, run_agent, sim};
use super::worlds::{dmirror, platform, prefault, ram, reclaim, round_trip, token_kernel, touch};
use super::{Op, Stopwatch};

/// `u32` id of device `i`.
fn dev_id(i: usize) -> BenchResult<DeviceId> {
    Ok(DeviceId(u32::try_from(i).map_err(|_| "too many devices")?))
}

/// Mirrors: `n` devices mirror the same `pages` populated pages of one process (each faulted in whole
/// before the timed part); MADV_DONTNEED of the range, per page per mirror.
pub(super) fn mirrors(n: usize, pages: u64) -> BenchResult<Vec<Op>> {
    let sim = sim();
    let (p, _) = platform(&sim, ram(pages), n)?;
    run_agent(&sim, async move {
        let k = p.kernel.clone();
        let pid = k.create_process();
        let va = anon(&k, pid, pages, true).await?;
        let all = Range::from_len(va, pages * PAGE_SIZE).ok_or("range overflow")?;
        let mut ms = Vec::with_capacity(n);
        for i in 0..n {
            let dev = p.device(dev_id(i)?).map_err(|e| format!("device: {e}"))?;
            let m = DmaMirror::register(&p, dev, pid, all).map_err(|e| format!("register: {e}"))?;
            prefault(&m, all).await?;
            ms.push(m);
        }
        let t = Stopwatch::start();
        k.madvise(pid, va, pages * PAGE_SIZE, Advice::DontNeed)
            .await
            .map_err(|e| format!("madvise: {e}"))?;
        let inval = per(t.elapsed(), pages * n as u64);
        for m in ms {
            if m.nr_mapped() != 0 {
                return Err("DONTNEED left mirror entries in place".to_owned());
            }
            m.unregister().await;
        }
        k.exit(pid).await;
        Ok(vec![Op::new("mirror_invalidate", inval)])
    })
}

/// Devices: `n` devices behind a two-level switch tree. Times `calls` single-page `dma_map_sg` +
/// `dma_unmap_sg` pairs spread round-robin over the devices; `calls` P2P distance computations
/// (`calc_map_type_and_dist`, uncached) between pairs of endpoints; one `pci_p2pdma_distance_many` from
/// endpoint 0 to all `n` endpoints with a fresh cache, per client; and one device fault per page of
/// `pages` pages, each device mirroring its own slice of one process's range.
pub(super) fn devices(count: usize, pages: u64, calls: u64) -> BenchResult<Vec<Op>> {
    let sim = sim();
    let (plat, eps) = platform(&sim, ram(pages) + calls * PAGE_SIZE, count)?;
    run_agent(&sim, async move {
        let kern = plat.kernel.clone();
        let pa = kern
            .alloc_ram_page(None)
            .map(|f| kern.frame_pa(f))
            .ok_or("out of RAM frames")?;
        let n64 = count as u64;
        let t = Stopwatch::start();
        for c in 0..calls {
            let dev = dev_id(usize::try_from(c % n64).unwrap_or(0))?;
            let mut sg = plat
                .map_sg(dev, std::slice::from_ref(&pa), true)
                .map_err(|e| format!("map_sg: {e}"))?;
            black_box(
                plat.unmap_sg(dev, &mut sg)
                    .map_err(|e| format!("unmap_sg: {e}"))?,
            );
        }
        let map = per(t.elapsed(), calls);

        let topo = plat.topology();
        let t = Stopwatch::start();
        for c in 0..calls {
            let from = usize::try_from(c % n64).unwrap_or(0);
            let to = usize::try_from((c * 7 + 3) % n64).unwrap_or(0);
            black_box(p2p_distance(topo, eps[from], eps[to]));
        }
        let dist = per(t.elapsed(), calls);

        let rounds = (calls / n64).max(1);
        let t = Stopwatch::start();
        for _ in 0..rounds {
            let mut cache = P2pCache::new();
            black_box(distance_many(topo, &mut cache, eps[0], &eps));
        }
        let many = per(t.elapsed(), rounds * n64);

        let pid = kern.create_process();
        let va = anon(&kern, pid, pages, true).await?;
        let slice = pages / n64;
        let mut ms = Vec::with_capacity(count);
        for i in 0..count {
            let dev = plat
                .device(dev_id(i)?)
                .map_err(|e| format!("device: {e}"))?;
            let r = Range::from_len(va.add(i as u64 * slice * PAGE_SIZE), slice * PAGE_SIZE)
                .ok_or("range overflow")?;
            ms.push(DmaMirror::register(&plat, dev, pid, r).map_err(|e| format!("register: {e}"))?);
        }
        let t = Stopwatch::start();
        for j in 0..slice {
            for (i, m) in ms.iter().enumerate() {
                let page = va.add((i as u64 * slice + j) * PAGE_SIZE);
                let one = Range::from_len(page, PAGE_SIZE).ok_or("range overflow")?;
                m.fault(one, true)
                    .await
                    .map_err(|e| format!("mirror fault: {e}"))?;
            }
        }
        let fault = per(t.elapsed(), slice * n64);
        for m in ms {
            m.unregister().await;
        }
        kern.exit(pid).await;
        Ok(vec![
            Op::new("dma_map_unmap", map),
            Op::new("p2p_distance", dist),
            Op::new("p2p_distance_many", many),
            Op::new("mirror_fault", fault),
        ])
    })
}

/// Processes: `n - 1` processes with `other` resident anonymous pages each, then in one more process
/// `pages` CPU write faults, their migration to device-private memory and back, and reclaim of `pages`
/// pages to swap (the LRU's oldest pages: the other processes'), each per page.
pub(super) fn processes(n: usize, pages: u64, other: u64) -> BenchResult<Vec<Op>> {
    let sim = sim();
    let k = token_kernel(&sim, ram(pages + (n as u64 - 1) * other))?;
    let dev = dmirror(&k, pages);
    run_agent(&sim, async move {
        let mut others = Vec::with_capacity(n.saturating_sub(1));
        for _ in 1..n {
            let pid = k.create_process();
            let buf = anon(&k, pid, other, false).await?;
            touch(&k, pid, buf, other).await?;
            others.push(pid);
        }
        let pid = k.create_process();
        let buf = anon(&k, pid, pages, false).await?;
        let t = Stopwatch::start();
        touch(&k, pid, buf, pages).await?;
        let fault = per(t.elapsed(), pages);
        let (to_dev, to_sys) = round_trip(&k, &dev, pid, buf, pages).await?;
        let rec = reclaim(&k, pages).await?;
        k.exit(pid).await;
        for o in others {
            k.exit(o).await;
        }
        Ok(vec![
            Op::new("cpu_fault", fault),
            Op::new("migrate_to_dev", to_dev),
            Op::new("migrate_to_sys", to_sys),
            Op::new("reclaim", rec),
        ])
    })
}

/// PASIDs: `n` processes, each with `pages` unpopulated pages and a completion page, bound to one SVA
/// accelerator (`iommu_sva_bind_device`, one PASID each; the figure is the mean over the `n` binds).
/// Then the last process's device fills its pages twice: the first pass takes one I/O page fault per
/// page (PRI, `handle_mm_fault`, response), the second finds them present (ATS translation through the
/// ATC), each per page.
pub(super) fn pasids(n: usize, pages: u64) -> BenchResult<Vec<Op>> {
    let sim = sim();
    let k = token_kernel(&sim, ram(n as u64 * (pages + 1)))?;
    let iommu = SvaIommu::new(&k, SvaCosts::zero(), 1 << 20);
    let dev = SvaAccel::new(
        &iommu,
        DeviceId(1),
        "sva1",
        SvaAccelConfig {
            info: SvaDeviceInfo {
                group: Some(0),
                iommu: 0,
                max_pasids: 1 << 20,
                domain_alloc_sva: true,
            },
            atc: AtcConfig::default(),
            wq_depth: 8,
        },
    )
    .map_err(|e| format!("SVA device: {e}"))?;
    run_agent(&sim, async move {
        let mut procs = Vec::with_capacity(n);
        for _ in 0..n {
            let pid = k.create_process();
            let buf = anon(&k, pid, pages, false).await?;
            let comp = anon(&k, pid, 1, false).await?;
            procs.push((pid, buf, comp));
        }
        let t = Stopwatch::start();
        for &(pid, _, _) in &procs {
            dev.bind(pid).map_err(|e| format!("bind: {e}"))?;
        }
        let bind = per(t.elapsed(), n as u64);
        let &(pid, buf, comp) = procs.last().ok_or("no process")?;
        let mut passes = [0.0; 2];
        for (pass, slot) in passes.iter_mut().enumerate() {
            let t = Stopwatch::start();
            let desc = Descriptor::Fill {
                dst: buf,
                len: pages * PAGE_SIZE,
                pattern: 0x5a5a_0000 + pass as u64,
            };
            let j = dev
                .submit(pid, desc, comp, true)
                .map_err(|e| format!("submit: {e}"))?;
            let rec = dev.wait(j).await.map_err(|e| format!("wait: {e}"))?;
            *slot = per(t.elapsed(), pages);
            if rec.status != CompletionStatus::Success {
                return Err(format!("SVA fill ended {:?}", rec.status));
            }
        }
        for &(pid, _, _) in &procs {
            dev.unbind(pid).await.map_err(|e| format!("unbind: {e}"))?;
            k.exit(pid).await;
        }
        Ok(vec![
            Op::new("sva_bind", bind),
            Op::new("sva_fault", passes[0]),
            Op::new("sva_translate", passes[1]),
        ])
    })
}
