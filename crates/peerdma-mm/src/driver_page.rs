//! Pages a device driver allocates for its own use and frees again, outside any process mapping: the system
//! pages a GPU driver moves an evicted buffer object into (TTM's `ttm_tt` pages, drivers/gpu/drm/ttm/
//! ttm_tt.c and ttm_pool.c `ttm_pool_alloc` / `ttm_pool_free`).
//!
//! A driver allocates with [`Kernel::alloc_ram_page`] (`None` for the process: kernel memory) and frees with
//! [`Kernel::free_driver_page`]. Freeing drops the allocation's reference, so the frame's next allocation
//! carries a new generation and a device that still holds a translation of it trips the oracle's
//! use-after-free check.

use peerdma_core::FrameId;

use crate::kernel::Kernel;

impl Kernel {
    /// Frees a page a driver allocated for itself (drops the allocation's reference; the frame returns to the
    /// free list when no other reference is left).
    pub fn free_driver_page(&self, frame: FrameId) {
        self.phys().put(frame);
        self.pin_wq().wake_up_all();
    }
}
