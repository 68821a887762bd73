//! Building a run's world from the scenario: the PCI platform with its IOMMU domains and BAR exports,
//! the NIC, NVMe and SVA device models, and the host wall-clock watchdog.

use std::collections::BTreeMap;
use std::rc::Rc;

use peerdma_core::{DeviceId, SimDuration};
use peerdma_devices::{SvaAccel, SvaAccelConfig, SvaIommu};
use peerdma_dma::{DmaCosts, Platform};
use peerdma_iommu::{AtcConfig, DomainConfig, DomainType, SvaDeviceInfo};
use peerdma_mm::Kernel;

use crate::ast::{DeviceKind, IommuMode, Scenario};
use crate::error::RunError;

/// Makes the NIC model of every `rnic` device (after the platform attached it).
pub(super) fn rnics(
    scn: &Scenario,
    platform: Option<&Rc<Platform>>,
    timing: &peerdma_core::Timing,
) -> BTreeMap<String, Rc<peerdma_devices::rnic::Rnic>> {
    let mut out = BTreeMap::new();
    let Some(p) = platform else {
        return out;
    };
    let costs = peerdma_devices::rnic::RnicCosts::from_timing(timing);
    for (i, d) in scn.devices.iter().enumerate() {
        let id = DeviceId(u32::try_from(i).expect("few devices"));
        if d.kind == DeviceKind::Rnic
            && let Ok(dev) = p.device(id)
        {
            out.insert(
                d.name.clone(),
                peerdma_devices::rnic::Rnic::new(p, dev, costs.clone()),
            );
        }
    }
    out
}

/// Makes the controller model of every `nvme` device (after the platform attached it).
pub(super) fn nvmes(
    scn: &Scenario,
    platform: Option<&Rc<Platform>>,
    timing: &peerdma_core::Timing,
) -> BTreeMap<String, Rc<peerdma_devices::nvme::Nvme>> {
    let mut out = BTreeMap::new();
    let Some(p) = platform else {
        return out;
    };
    let costs = peerdma_devices::nvme::NvmeCosts::from_timing(timing);
    for (i, d) in scn.devices.iter().enumerate() {
        let id = DeviceId(u32::try_from(i).expect("few devices"));
        if d.kind == DeviceKind::Nvme
            && let Ok(dev) = p.device(id)
        {
            out.insert(
                d.name.clone(),
                peerdma_devices::nvme::Nvme::new(p, dev, costs.clone(), d.size, d.p2p_queue),
            );
        }
    }
    out
}

/// Creates the `sva` devices, all behind one IOMMU unit (unit 0), each in its own IOMMU group; the unit's
/// page-request queue is the smallest `prq_entries` given.
pub(super) fn build_sva(scn: &Scenario, iommu: &SvaIommu) -> BTreeMap<String, SvaAccel> {
    let svas: Vec<(usize, &crate::ast::DeviceDecl)> = scn
        .devices
        .iter()
        .enumerate()
        .filter(|(_, d)| d.kind == DeviceKind::Sva)
        .collect();
    if let Some(prq) = svas.iter().map(|(_, d)| d.sva.prq_entries).min() {
        iommu.set_prq_entries(usize::try_from(prq).unwrap_or(usize::MAX));
    }
    svas.into_iter()
        .map(|(i, d)| {
            let id = u32::try_from(i).expect("few devices");
            let cfg = SvaAccelConfig {
                info: SvaDeviceInfo {
                    group: Some(id),
                    iommu: 0,
                    max_pasids: 1 << d.sva.pasid_bits,
                    domain_alloc_sva: true,
                },
                atc: AtcConfig {
                    sets: usize::try_from(d.sva.atc_sets).unwrap_or(1),
                    ways: usize::try_from(d.sva.atc_ways).unwrap_or(1),
                },
                wq_depth: usize::try_from(d.sva.wq_depth).unwrap_or(1),
            };
            let dev = SvaAccel::new(iommu, DeviceId(id), &d.name, cfg)
                .expect("device ids are the declaration indices, each used once");
            (d.name.clone(), dev)
        })
        .collect()
}

/// Returns the watchdog that stops a run past `limit` of host time (`[sim.limits] wall_time`; 0: none).
/// The model never reads the host clock; only this check, between events, does.
pub(super) fn wall_clock_watchdog(limit: SimDuration) -> Option<peerdma_sim::Watchdog> {
    if limit.as_nanos() == 0 {
        return None;
    }
    #[expect(
        clippy::disallowed_methods,
        reason = "the wall-time limit is about the host, not the model; it only ever stops a run"
    )]
    let start = std::time::Instant::now();
    let limit = std::time::Duration::from_nanos(limit.as_nanos());
    Some(peerdma_sim::Watchdog(Rc::new(move || {
        (start.elapsed() > limit).then(|| {
            format!(
                "wall-time limit of {} s reached (`[sim.limits] wall_time`)",
                limit.as_secs_f64()
            )
        })
    })))
}

pub(super) type PlatformParts = (
    Option<Rc<Platform>>,
    BTreeMap<String, DeviceId>,
    BTreeMap<String, peerdma_mm::MmioId>,
);

/// Builds the DMA platform from `[topology]` and the `pci` devices: attaches each to its PCI function with
/// its IOMMU domain, adds its P2P resources and its BAR exports. An error is a run-time refusal of the
/// kernel (a resource that does not fit its BAR), reported as the run's stop reason.
pub(super) fn build_platform(
    scn: &Scenario,
    kernel: &Rc<Kernel>,
    costs: DmaCosts,
) -> Result<PlatformParts, RunError> {
    let Some(spec) = &scn.topology else {
        return Ok((None, BTreeMap::new(), BTreeMap::new()));
    };
    let topo = spec.build()?;
    let platform = Platform::new(kernel.clone(), topo, costs);
    let mut pci = BTreeMap::new();
    let mut exports = BTreeMap::new();
    for (i, d) in scn.devices.iter().enumerate() {
        if !matches!(
            d.kind,
            DeviceKind::Pci | DeviceKind::Rnic | DeviceKind::Nvme | DeviceKind::Gpu
        ) {
            continue;
        }
        let id = DeviceId(u32::try_from(i).expect("few devices"));
        let node_name = d.node.as_deref().unwrap_or(&d.name);
        let node = platform
            .topology()
            .lookup(node_name)
            .ok_or_else(|| RunError::NoNode {
                device: d.name.clone(),
                node: node_name.to_owned(),
            })?;
        let domain = DomainConfig::with_type(match d.iommu {
            IommuMode::Identity => DomainType::Identity,
            IommuMode::Dma => DomainType::Dma,
            IommuMode::DmaLazy => DomainType::DmaFq,
        });
        platform
            .add_device(id, node, &d.name, domain)
            .map_err(|e| RunError::AddDevice {
                device: d.name.clone(),
                errno: e.errno(),
            })?;
        for r in &d.p2p {
            platform
                .p2p_add_resource(id, r.bar, r.size, r.offset)
                .map_err(|e| RunError::P2pAddResource {
                    device: d.name.clone(),
                    bar: r.bar,
                    size: r.size,
                    offset: r.offset,
                    errno: e.errno(),
                })?;
            platform
                .p2p_publish(id, r.publish)
                .map_err(|e| RunError::P2pPublish {
                    device: d.name.clone(),
                    errno: e.errno(),
                })?;
        }
        for x in &d.exports {
            let mmio = platform
                .export_bar(id, x.bar, x.offset, x.len, x.revocable)
                .map_err(|e| RunError::ExportDoesNotFit {
                    device: d.name.clone(),
                    export: x.name.clone(),
                    bar: x.bar,
                    errno: e.errno(),
                })?;
            exports.insert(x.name.clone(), mmio);
        }
        pci.insert(d.name.clone(), id);
    }
    Ok((Some(platform), pci, exports))
}
