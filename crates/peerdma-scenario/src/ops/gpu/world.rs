//! The run-time state of a scenario's `gpu` devices: each GPU with its managed pool, and the buffer objects,
//! attachments and managed ranges its steps created, by name.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use peerdma_core::DeviceId;
use peerdma_core::timing::Timing;
use peerdma_devices::gpu::{
    BoAttach, BoId, Gpu, GpuConfig, GpuCosts, GpuInjection, ManagedRange, UvmCosts,
};
use peerdma_devices::{DmirrorCosts, DmirrorDevice};
use peerdma_dma::Platform;

use crate::ast::{DeviceKind, Scenario};
use crate::error::RunError;

/// A GPU of the running scenario and what its steps created.
#[derive(Debug)]
pub(crate) struct GpuDev {
    pub(super) gpu: Rc<Gpu>,
    pub(super) pool: Rc<DmirrorDevice>,
    /// Bytes of the managed pool.
    pub(super) managed: u64,
}

/// The GPUs of the running scenario and their buffers, attachments and managed ranges by name.
#[derive(Debug, Default)]
pub(crate) struct GpuWorld {
    pub(super) gpus: BTreeMap<String, GpuDev>,
    pub(super) bos: RefCell<BTreeMap<String, (String, BoId)>>,
    pub(super) attachments: RefCell<BTreeMap<String, (String, BoAttach)>>,
    pub(super) ranges: RefCell<BTreeMap<String, Rc<ManagedRange>>>,
    pub(super) uvm_costs: Option<UvmCosts>,
}

impl GpuWorld {
    /// Builds every `gpu` device of `scn` (already attached to the platform under `pci`).
    pub(crate) fn build(
        scn: &Scenario,
        platform: Option<&Rc<Platform>>,
        pci: &BTreeMap<String, DeviceId>,
        timing: &Timing,
    ) -> Result<Self, RunError> {
        let mut out = Self {
            uvm_costs: Some(UvmCosts::from_timing(timing)),
            ..Self::default()
        };
        let Some(platform) = platform else {
            return Ok(out);
        };
        for d in &scn.devices {
            let (DeviceKind::Gpu, Some(g)) = (d.kind, &d.gpu) else {
                continue;
            };
            let id = pci[&d.name];
            let gpu = Gpu::new(
                platform,
                id,
                GpuConfig {
                    vram: g.vram,
                    bar: g.bar,
                    window: g.window,
                    costs: GpuCosts::from_timing(timing),
                },
            )
            .map_err(|source| RunError::Gpu {
                device: d.name.clone(),
                source,
            })?;
            if g.skip_peer_invalidation {
                gpu.inject(GpuInjection::SkipPeerInvalidation);
            }
            let pool = gpu
                .managed_pool(
                    g.managed + 2 * (2 << 20),
                    DmirrorCosts::from_timing(timing),
                    g.beyond_mainline_p2p,
                )
                .map_err(|source| RunError::Gpu {
                    device: d.name.clone(),
                    source,
                })?;
            out.gpus.insert(
                d.name.clone(),
                GpuDev {
                    gpu,
                    pool,
                    managed: g.managed,
                },
            );
        }
        Ok(out)
    }

    /// Returns the GPU and the buffer object a `gpu.bo_create` step named `name`.
    pub(crate) fn bo(&self, name: &str) -> Result<(Rc<Gpu>, BoId), RunError> {
        let (dev, bo) =
            self.bos
                .borrow()
                .get(name)
                .cloned()
                .ok_or_else(|| RunError::NoGpuObject {
                    what: "bo",
                    name: name.to_owned(),
                })?;
        Ok((self.gpus[&dev].gpu.clone(), bo))
    }

    pub(super) fn attachment(&self, name: &str) -> Result<(Rc<Gpu>, BoAttach), RunError> {
        let (dev, a) = self
            .attachments
            .borrow()
            .get(name)
            .cloned()
            .ok_or_else(|| RunError::NoGpuObject {
                what: "attachment",
                name: name.to_owned(),
            })?;
        Ok((self.gpus[&dev].gpu.clone(), a))
    }

    pub(super) fn range(&self, name: &str) -> Result<Rc<ManagedRange>, RunError> {
        self.ranges
            .borrow()
            .get(name)
            .cloned()
            .ok_or_else(|| RunError::NoGpuObject {
                what: "managed range",
                name: name.to_owned(),
            })
    }
}
