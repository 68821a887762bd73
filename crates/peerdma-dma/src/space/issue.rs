//! Steps 1–4 of the access path for a device of the [`Platform`]: translate a request's address (identity,
//! IOVA through the device's IOMMU domain and IOTLB, bus address, or the frame the device holds), route it,
//! apply the oracle at issue and put it in flight in the device's [`DmaSpace`](super::DmaSpace) (see the
//! `space` module docs).

use peerdma_core::{Errno, SimDuration};
use peerdma_iommu::DomainType;
use peerdma_mm::oracle::ViolationKind;
use peerdma_mm::{DeviceGrant, FrameTranslation, MemoryKind};
use peerdma_pci::link::{fair_share_gbps, time_at_gbps};

use crate::map::DmaAddr;
use crate::platform::{DmaDevice, Platform};

use super::{DeviceAddr, DmaOutcome, DmaRequest, Issue, REQUEST_BYTES, RequestId, Target, path};

impl Platform {
    /// Steps 1–4 for one request of device `d`: translate, route, the oracle at issue, in flight.
    ///
    /// # Errors
    /// `EFAULT` when the IOMMU faults, nothing answers the address, or the oracle refused the access.
    pub fn dma_issue(&self, d: &DmaDevice, req: DmaRequest) -> Result<RequestId, Errno> {
        let k = &self.kernel;
        let write = req.op.is_write();
        // Step 1: translate.
        let translated = d.domain().domain_type() != DomainType::Identity;
        let (target, pa, cost) = match req.addr {
            DeviceAddr::Dma(addr) => {
                let res = self.resolve(d, addr, write).ok_or(Errno::EFAULT)?;
                let target = match k.frame_at_pa(res.pa) {
                    Some((frame, now_gen)) => {
                        let generation = match d.space.issued(addr.raw()) {
                            Some((f0, g0)) if f0 == frame => g0,
                            Some((f0, _)) if req.grant != DeviceGrant::Raw => {
                                self.violation(
                                    ViolationKind::StaleTranslation,
                                    format!(
                                        "{} reached {frame} through {:#x}, which was mapped for {f0}",
                                        d.name,
                                        addr.raw()
                                    ),
                                );
                                return Err(Errno::EFAULT);
                            }
                            _ => now_gen,
                        };
                        Target::Frame(FrameTranslation {
                            frame,
                            generation,
                            grant: req.grant,
                        })
                    }
                    None => Target::Mmio(res.pa),
                };
                (target, res.pa, res.cost)
            }
            DeviceAddr::Frame { frame, generation } => {
                let t = FrameTranslation {
                    frame,
                    generation,
                    grant: req.grant,
                };
                (Target::Frame(t), k.frame_pa(frame), SimDuration::ZERO)
            }
        };
        // Step 3: the oracle at issue.
        if let Target::Frame(t) = &target
            && !k.device_issue(d.id, t, write)
        {
            return Err(Errno::EFAULT);
        }
        // Steps 2 and 4: route, then the closed-form landing.
        let topo = self.topology();
        let provider = topo.bar_at(pa).map(|(owner, _)| owner);
        let links = self.path_links(provider, d.node);
        let access_path = match (req.addr, provider) {
            (DeviceAddr::Dma(DmaAddr::Bus(_)), _) => path::P2P_BUS_ADDR,
            (DeviceAddr::Dma(DmaAddr::Iova(_)), Some(_)) => path::P2P_HOST_BRIDGE,
            (DeviceAddr::Dma(DmaAddr::Iova(_)), None) if translated => path::IOMMU,
            _ => path::LOCAL,
        };
        let shares = d.space.register_links(&links);
        let (wire, latency) = if self.costs.timed {
            let gbps = links
                .iter()
                .zip(shares)
                .map(|(&n, nr)| {
                    let l = topo.node(n).link().expect("path_links keeps linked nodes");
                    let full = if write {
                        l.effective_write_gbps(REQUEST_BYTES as u64)
                    } else {
                        l.effective_read_gbps(REQUEST_BYTES as u64)
                    };
                    fair_share_gbps(full, nr)
                })
                .fold(f64::INFINITY, f64::min);
            let wire = if gbps.is_finite() {
                k.sim.jitter(time_at_gbps(REQUEST_BYTES as u64, gbps))
            } else {
                SimDuration::ZERO
            };
            let hops = u64::try_from(links.len()).expect("few links");
            // RAM on another NUMA node than the device's: the request crosses the socket interconnect.
            let remote = match &target {
                Target::Frame(t) => match (k.memory_kind(t.frame), d.numa_node) {
                    (MemoryKind::Ram { node }, Some(dev_node)) if node != dev_node => {
                        self.costs.remote_socket
                    }
                    _ => SimDuration::ZERO,
                },
                Target::Mmio(_) => SimDuration::ZERO,
            };
            (wire, self.costs.hop.saturating_mul(hops) + remote)
        } else {
            (SimDuration::ZERO, SimDuration::ZERO)
        };
        Ok(d.space.issue(Issue {
            target,
            grant: req.grant,
            op: req.op,
            ready: k.sim.now() + cost,
            wire,
            latency,
            links,
            path: access_path,
        }))
    }

    /// Device `d` runs a batch of requests through its access path (module docs): issues them in order as
    /// tags free up, stops issuing at the first translation failure, and waits for everything in flight.
    pub async fn dma(&self, d: &DmaDevice, reqs: Vec<DmaRequest>) -> DmaOutcome {
        let ops = reqs.iter().map(|r| r.op.clone()).collect();
        d.space
            .run_batch(ops, async |i, op| {
                let req = DmaRequest {
                    addr: reqs[i].addr,
                    grant: reqs[i].grant,
                    op,
                };
                self.dma_issue(d, req)
            })
            .await
    }
}
