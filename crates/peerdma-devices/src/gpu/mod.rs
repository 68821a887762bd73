//! `gpu`: a discrete GPU on the PCIe tree whose memory moves while peers use it (DESIGN.md §4.7).
//!
//! The device has **VRAM** of a given size and a **BAR window** through which the CPU and peer devices
//! reach part of it (a resizable BAR makes the window the whole VRAM). Two mainline mechanisms move its
//! memory, and this module models both:
//! - [`bo`]: **buffer objects**, TTM-style as amdgpu does (drivers/gpu/drm/ttm/ttm_bo.c,
//!   drivers/gpu/drm/amd/amdgpu/amdgpu_dma_buf.c): a buffer lives in the window, in VRAM outside it, or in
//!   system pages after eviction; every move first tells the buffer's dma-buf importers (`move_notify` for
//!   dynamic ones, which map again at their next access at the new place; revocation for pinned ones) and
//!   invalidates the GPU's own TLB, then copies with the copy engine.
//! - [`uvm`]: **managed memory**, as NVIDIA UVM and nouveau do (mm/migrate_device.c,
//!   drivers/gpu/drm/nouveau/nouveau_dmem.c, NVIDIA open-gpu-kernel-modules `uvm_gpu_replayable_faults.c`):
//!   device-private pages reached only by the GPU, faulted in by batches from a bounded fault buffer,
//!   prefetched, evicted by 2 MiB chunks, migrated back to RAM when the CPU or a peer touches them.
//!
//! How the model maps to the rest of peerdma:
//! 1. The window is registered as P2P memory with struct pages (`pci_p2pdma_add_resource` on the BAR):
//!    importers map window pages with `map_sg`, which hands out PCI bus addresses where the topology
//!    allows, and the oracle's frame generations cover them. *Coarse:* amdgpu's VRAM has no struct pages
//!    and exports bus addresses through the dma-buf's sg table; observers see the same addresses.
//! 2. VRAM outside the window is device-internal (bytes held by the model: no physical address, no struct
//!    page), as invisible VRAM is to everyone but the GPU.
//! 3. Every copy the GPU makes goes through its [`peerdma_dma::DmaSpace`] (the copy engine), every
//!    importer access through the importer's.
//! 4. The managed pool is a carve-out of VRAM separate from the buffer objects' (*coarse*: a real driver
//!    shares one allocator between both).

pub mod bo;
pub mod pattern;
pub mod uvm;

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use peerdma_core::timing::{ParamSpec, Timing};
use peerdma_core::{DeviceId, Errno, PAGE_SIZE, SimDuration};
use peerdma_dma::{DmaDevice, DmaError, Platform};
use peerdma_sim::SimMutex;

pub use bo::{BoAttach, BoId, Placement};
pub use pattern::{AccessPattern, KernelSpec};
pub use uvm::{KernelStats, ManagedRange, UvmConfig, UvmCosts};

/// Misuse of the GPU model's API, or a Linux errno the operation ends with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GpuError {
    /// No buffer object with this id.
    #[error("unknown buffer object {0}")]
    UnknownBo(u64),
    /// No importer attachment with this id.
    #[error("unknown dma-buf attachment {0}")]
    UnknownAttach(u64),
    /// A BAR window larger than VRAM or than the BAR.
    #[error("BAR window of {window:#x} bytes does not fit (VRAM {vram:#x}, BAR {bar:#x})")]
    WindowTooLarge {
        /// Requested window.
        window: u64,
        /// VRAM size.
        vram: u64,
        /// BAR size.
        bar: u64,
    },
    /// An offset or length outside the buffer, or not page aligned.
    #[error("range {offset:#x}+{len:#x} outside a buffer of {size:#x} bytes")]
    BadRange {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Buffer size.
        size: u64,
    },
    /// An outcome Linux reports with this errno (`ENOMEM` when nothing can hold a buffer, `ENODEV` for a
    /// revoked importer, `EFAULT` for a failed DMA).
    #[error("{0}")]
    Errno(Errno),
    /// A misuse of the DMA layer's API (an importer that is not attached to the platform, …).
    #[error(transparent)]
    Dma(DmaError),
}

impl From<Errno> for GpuError {
    fn from(e: Errno) -> Self {
        Self::Errno(e)
    }
}

impl From<DmaError> for GpuError {
    fn from(e: DmaError) -> Self {
        match e {
            DmaError::Errno(e) => Self::Errno(e),
            misuse => Self::Dma(misuse),
        }
    }
}

/// The result type of this module.
pub type Result<T> = std::result::Result<T, GpuError>;

pub(crate) const TLB_INVALIDATE: ParamSpec = ParamSpec::time(
    "gpu.tlb_invalidate",
    2_000,
    "assumption (order of a GPU TLB invalidate + membar round trip)",
    "one GPU TLB invalidation after its page table changes (a move, an eviction)",
);
const COPY_SETUP: ParamSpec = ParamSpec::time(
    "gpu.copy_setup",
    5_000,
    "assumption",
    "setting up one copy-engine job (push buffer, semaphore release); its pages then stream through the \
     GPU's access path",
);

/// The GPU's costs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuCosts {
    /// One GPU TLB invalidation (`gpu.tlb_invalidate`).
    pub tlb_invalidate: SimDuration,
    /// Setting up one copy-engine job (`gpu.copy_setup`).
    pub copy_setup: SimDuration,
}

impl GpuCosts {
    /// The parameters these costs are built from, in field order.
    pub const PARAMS: &[ParamSpec] = &[TLB_INVALIDATE, COPY_SETUP];

    /// Returns the costs `timing` gives.
    pub fn from_timing(timing: &Timing) -> Self {
        Self {
            tlb_invalidate: timing.time(&TLB_INVALIDATE),
            copy_setup: timing.time(&COPY_SETUP),
        }
    }

    /// Calibrated defaults.
    pub fn calibrated() -> Self {
        Self::from_timing(&Timing::calibrated())
    }

    /// Every cost zero.
    pub fn zero() -> Self {
        Self::from_timing(&Timing::zero())
    }
}

/// How a GPU is built.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuConfig {
    /// VRAM bytes (page multiple).
    pub vram: u64,
    /// The BAR that exposes VRAM.
    pub bar: u8,
    /// Bytes of VRAM the BAR window shows; `None`: a resizable BAR showing the whole VRAM.
    pub window: Option<u64>,
    /// The costs.
    pub costs: GpuCosts,
}

/// Test-only fault injection that breaks the invalidation rules, so tests can show the oracle catches it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GpuInjection {
    /// Correct behaviour.
    #[default]
    None,
    /// A buffer move skips telling its importers (no `move_notify`, no revocation): they keep their old
    /// addresses.
    SkipPeerInvalidation,
    /// A buffer move skips zapping the CPU's mappings of the buffer (no `unmap_mapping_range`): processes
    /// keep reaching the old pages.
    SkipCpuUnmap,
}

/// A GPU on the platform (module docs).
#[derive(Debug)]
pub struct Gpu {
    platform: Rc<Platform>,
    dev: Rc<DmaDevice>,
    cfg: GpuConfig,
    /// The P2P region of the window.
    window_region: usize,
    window_pages: u64,
    hidden_pages: u64,
    bo: RefCell<bo::BoState>,
    /// The buffers' reservation lock (`dma_resv`): held by an importer's DMA from its mapping to its
    /// completion and by every move, so a move waits for the DMA in flight (*coarse:* one lock for all
    /// buffers of the GPU).
    resv: SimMutex,
    injection: Cell<GpuInjection>,
}

impl Gpu {
    /// Creates the GPU `id`, already attached to the platform (`Platform::add_device`): registers its BAR
    /// window as P2P memory.
    ///
    /// # Errors
    /// [`GpuError::WindowTooLarge`] for a window bigger than VRAM or the BAR; the platform's errno for an
    /// unknown device or BAR.
    pub fn new(platform: &Rc<Platform>, id: DeviceId, cfg: GpuConfig) -> Result<Rc<Self>> {
        let dev = platform.device(id)?;
        let bar_size = platform
            .topology()
            .node(dev.node)
            .bar(cfg.bar)
            .ok_or(Errno::EINVAL)?
            .size;
        let window = cfg.window.unwrap_or(cfg.vram);
        if window > cfg.vram
            || window > bar_size
            || window == 0
            || !window.is_multiple_of(PAGE_SIZE)
            || !cfg.vram.is_multiple_of(PAGE_SIZE)
        {
            return Err(GpuError::WindowTooLarge {
                window,
                vram: cfg.vram,
                bar: bar_size,
            });
        }
        platform.p2p_add_resource(id, cfg.bar, window, 0)?;
        let window_region = *platform
            .p2p_regions(id)
            .last()
            .expect("p2p_add_resource added a region");
        Ok(Rc::new(Self {
            platform: platform.clone(),
            dev,
            window_pages: window / PAGE_SIZE,
            hidden_pages: (cfg.vram - window) / PAGE_SIZE,
            cfg,
            window_region,
            bo: RefCell::new(bo::BoState::default()),
            resv: SimMutex::new(&platform.kernel.sim, "gpu.resv"),
            injection: Cell::new(GpuInjection::None),
        }))
    }

    /// Returns the device id.
    pub fn id(&self) -> DeviceId {
        self.dev.id
    }

    /// Returns the configuration.
    pub fn config(&self) -> &GpuConfig {
        &self.cfg
    }

    /// Returns the number of VRAM pages the BAR window shows.
    pub fn window_pages(&self) -> u64 {
        self.window_pages
    }

    /// Arms a test-only fault injection.
    pub fn inject(&self, f: GpuInjection) {
        self.injection.set(f);
    }

    /// Creates the GPU's managed pool: `bytes` of device-private VRAM (a carve-out, [`uvm`]). With
    /// `beyond_mainline_p2p` the pool sits in the BAR right after the buffer objects' window (registered as a
    /// P2P provider range without struct pages), so a peer's `hmm_range_fault` on a resident managed page gets
    /// its BAR address instead of migrating it (the unmerged HMM P2P series; off by default).
    ///
    /// # Errors
    /// [`GpuError::WindowTooLarge`] when the BAR cannot show the pool after the window; the platform's errno.
    pub fn managed_pool(
        &self,
        bytes: u64,
        costs: crate::DmirrorCosts,
        beyond_mainline_p2p: bool,
    ) -> Result<Rc<crate::DmirrorDevice>> {
        let k = &self.platform.kernel;
        let base = if beyond_mainline_p2p {
            let window = self.window_pages * PAGE_SIZE;
            let bar = self
                .platform
                .topology()
                .node(self.dev.node)
                .bar(self.cfg.bar)
                .ok_or(Errno::EINVAL)?
                .size;
            let bytes = bytes.next_multiple_of(PAGE_SIZE);
            if window.checked_add(bytes).is_none_or(|end| end > bar) {
                return Err(GpuError::WindowTooLarge {
                    window: window.saturating_add(bytes),
                    vram: self.cfg.vram,
                    bar,
                });
            }
            let res = self
                .platform
                .p2p_add_window(self.dev.id, self.cfg.bar, bytes, window)?;
            k.sim.count("gpu.beyond_mainline_p2p", 1);
            k.sim.trace("gpu.beyond_mainline_p2p", || {
                format!(
                    "managed pool at BAR {:#x} ({bytes:#x} bytes)",
                    res.phys.start.raw()
                )
            });
            Some(res.phys.start)
        } else {
            None
        };
        let pool = crate::DmirrorDevice::new_at(
            k,
            self.dev.id,
            crate::DmirrorMemory::Private,
            bytes,
            costs,
            base,
        );
        pool.set_tlb_invalidate(self.cfg.costs.tlb_invalidate);
        // A GPU driver skips none of its own migrations' invalidations and maps after migrating through
        // its fault path (as nouveau does): test_hmm.c's rule would give the GPU test_hmm.c's races (a
        // CPU fault pulling a page back while the GPU reads it, found at seed 2613 of
        // scenarios/protocol/gpu-migrate.toml's 100,000-seed exploration).
        pool.set_invalidate_own_migrations(true);
        Ok(pool)
    }

    /// Invalidates the GPU's TLB after a page-table change (its cost is spent on the calling agent).
    async fn tlb_invalidate(&self) {
        let k = &self.platform.kernel;
        k.sim.count("gpu.tlb_invalidations", 1);
        k.spend(self.cfg.costs.tlb_invalidate).await;
    }
}
