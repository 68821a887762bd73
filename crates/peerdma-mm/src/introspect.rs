//! What other crates and tests may see of the kernel: narrow, read-only questions answered with values
//! (never a borrow of kernel state), the oracle's arming hooks, and a few documented test-support setters.
//!
//! Linux counterparts: the `/proc` views of mm state — `/proc/kpagecount` and `/proc/kpageflags`
//! (fs/proc/page.c) for [`Kernel::frame_info`], `/proc/<pid>/maps` and `/proc/<pid>/pagemap`
//! (fs/proc/task_mmu.c) for [`Kernel::vma_at`], [`Kernel::pte_at`] and [`Kernel::translate`], `/proc/meminfo`
//! and `/proc/vmstat` for the counters. Everything here borrows the kernel state only for the duration of
//! the call, so a caller can never hold it across an `.await` or reach past the kernel's own operations.

use peerdma_core::{FrameId, Pid, Va};

use crate::kernel::{AddressSpace, Kernel};
use crate::oracle::{Violation, ViolationKind};
use crate::pagetable::Pte;
use crate::phys::{FrameInfo, LruState};
use crate::vma::Vma;

/// Processes and their address spaces.
impl Kernel {
    /// Returns whether `pid` is a created process that has not exited.
    pub fn is_alive(&self, pid: Pid) -> bool {
        self.mms().get(pid).is_some_and(AddressSpace::is_alive)
    }

    /// Returns how many address spaces the reverse map's walks (reclaim, migration) have visited since boot:
    /// a cost figure, independent of processes unrelated to the pages walked ([`crate::rmap`]).
    pub fn rmap_visits(&self) -> u64 {
        self.mms().rmap_visits()
    }

    /// Returns (a copy of) the VMA of `pid` containing `va` (`vma_lookup`).
    ///
    /// # Panics
    /// Panics for an unknown pid.
    pub fn vma_at(&self, pid: Pid, va: Va) -> Option<Vma> {
        self.mms().mm(pid).vma(va).cloned()
    }

    /// Returns (copies of) every VMA of `pid`, in address order (`/proc/<pid>/maps`).
    ///
    /// # Panics
    /// Panics for an unknown pid.
    pub fn vmas(&self, pid: Pid) -> Vec<Vma> {
        self.mms().mm(pid).vmas().values().cloned().collect()
    }

    /// Returns the CPU page-table entry of the leaf covering `va` in `pid`, if any (`/proc/<pid>/pagemap`).
    ///
    /// # Panics
    /// Panics for an unknown pid.
    pub fn pte_at(&self, pid: Pid, va: Va) -> Option<Pte> {
        self.mms().mm(pid).pt().lookup(va).map(|l| l.pte)
    }

    /// Returns the frame a *present* mapping gives `va` in `pid`, and whether it is writable.
    ///
    /// # Panics
    /// Panics for an unknown pid.
    pub fn translate(&self, pid: Pid, va: Va) -> Option<(FrameId, bool)> {
        self.mms()
            .mm(pid)
            .translate(va)
            .map(|(f, write, _)| (f, write))
    }

    /// Returns the depth of `memalloc_pin_save` scopes open on `pid`'s address space (0 for an unknown pid).
    pub fn memalloc_pin_depth(&self, pid: Pid) -> u32 {
        self.mms()
            .get(pid)
            .map_or(0, AddressSpace::memalloc_pin_depth)
    }
}

/// Physical memory.
impl Kernel {
    /// Returns a snapshot of frame `frame`'s metadata.
    pub fn frame_info(&self, frame: FrameId) -> FrameInfo {
        self.phys().frame_info(frame)
    }

    /// `set_page_dirty`: a driver that held a writable DMA mapping of `frame` marks it dirty when it unmaps
    /// it (drivers/infiniband/core/umem_odp.c `ib_umem_odp_unmap_dma_pages`).
    pub fn set_page_dirty(&self, frame: FrameId) {
        self.phys().frame_mut(frame).dirty = true;
    }

    /// Returns the shared zero page.
    pub fn zero_page(&self) -> FrameId {
        self.phys().zero_page()
    }

    /// Returns the region `frame` is in.
    pub fn region_of(&self, frame: FrameId) -> usize {
        self.phys().region_of(frame)
    }

    /// Returns the first frame of region `region` and its number of frames.
    ///
    /// # Panics
    /// Panics for an unknown region.
    pub fn region_frames(&self, region: usize) -> (FrameId, u64) {
        let phys = self.phys();
        let r = &phys.regions()[region];
        (FrameId(r.start), r.nr_frames)
    }

    /// Returns the region holding RAM node `node`'s memory.
    ///
    /// # Panics
    /// Panics when `node` is not below [`Kernel::nr_nodes`].
    pub fn node_region(&self, node: u32) -> usize {
        self.phys().node_region(node)
    }

    /// Returns the number of free frames on RAM node `node` (`NR_FREE_PAGES` of the node).
    pub fn nr_free_node(&self, node: u32) -> u64 {
        self.phys().nr_free_node(node)
    }

    /// Returns whether RAM node `node` is movable (its memory is ZONE_MOVABLE).
    pub fn is_node_movable(&self, node: u32) -> bool {
        self.phys().is_node_movable(node)
    }

    /// Reads `buf.len()` bytes of frame `frame` at `offset` directly, as `/dev/mem` would: no page table, no
    /// oracle.
    pub fn read_frame(&self, frame: FrameId, offset: usize, buf: &mut [u8]) {
        self.phys().read(frame, offset, buf);
    }

    /// Returns the number of swap slots in use.
    pub fn nr_swap_slots(&self) -> usize {
        self.swap().nr_slots()
    }

    /// Returns the number of anonymous pages on the active or inactive list (`LruState::None` counts
    /// nothing).
    pub fn nr_lru_pages(&self, list: LruState) -> u64 {
        self.swap().nr_lru_pages(&self.phys(), list)
    }

    /// Returns the number of anonymous pages of RAM node `node` on the active or inactive list.
    pub fn nr_lru_pages_node(&self, node: u32, list: LruState) -> u64 {
        self.swap().nr_lru_pages_node(&self.phys(), node, list)
    }
}

/// The oracle.
impl Kernel {
    /// Returns the violations the oracle found so far (the run stops at the first).
    pub fn oracle_violations(&self) -> Vec<Violation> {
        self.oracle().violations().to_vec()
    }

    /// Arms the oracle for a violation of `kind` that is coming (a scenario step demonstrating what the
    /// oracle catches): until [`Kernel::take_expected_violations`], violations of that kind are kept apart as
    /// expected and do not stop the run.
    pub fn expect_violation(&self, kind: ViolationKind) {
        self.oracle().expect_violation(kind);
    }

    /// Disarms the oracle and returns the expected violations it recorded since
    /// [`Kernel::expect_violation`].
    pub fn take_expected_violations(&self) -> Vec<Violation> {
        self.oracle().take_expected()
    }

    /// The oracle's check 6: a mirror is about to program device entries for a range whose subscription
    /// `retry` says must be retried (`what` names the fault for the report).
    pub fn mirror_install(&self, retry: bool, what: impl FnOnce() -> String) {
        self.oracle().mirror_install(retry, what);
    }
}

/// Test support: states the model reaches only transiently, set by hand.
impl Kernel {
    /// Sets or clears frame `frame`'s `PG_locked` (`folio_lock` / `folio_unlock` without waiting). The model
    /// holds the bit only while a migration holds the page; a test uses this to hold it longer.
    pub fn set_frame_locked(&self, frame: FrameId, locked: bool) {
        self.phys().frame_mut(frame).locked = locked;
    }

    /// Sets frame `frame`'s reference count to `refcount` and returns the previous count. The model never
    /// maps a frame whose count is 0 (a folio being freed); a test uses this to make that state, and must
    /// restore the count.
    pub fn set_frame_refcount(&self, frame: FrameId, refcount: u32) -> u32 {
        std::mem::replace(&mut self.phys().frame_mut(frame).refcount, refcount)
    }
}
