//! Timing-model parameters of the memory-management paths, with their sources.
//!
//! Every value is a default that a scenario may override; `zero` mode sets them all to zero.

use peerdma_core::SimDuration;

/// Costs of CPU-side memory management.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MmCosts {
    /// Entering and leaving a system call.
    pub syscall: SimDuration,
    /// A minor anonymous fault, zero-fill included (spec/numbers.md §5: median ≈ 1.0 µs \[B\]).
    pub cpu_fault: SimDuration,
    /// Copying one 4 KiB page between RAM pages (≈ 10 GB/s memcpy, \[R\]; used for COW and fork copies).
    pub page_copy: SimDuration,
    /// CPU load/store of one 4 KiB page worth of data once translated (same memcpy bandwidth).
    pub page_access: SimDuration,
    /// A TLB shootdown after unmap/protect (spec/numbers.md §5: ≈ 1–3 µs IPI round trip \[B\]).
    pub tlb_shootdown: SimDuration,
    /// Walking the page table for one page inside `hmm_range_fault`.
    pub hmm_walk_page: SimDuration,
}

impl MmCosts {
    /// The calibrated defaults.
    pub fn calibrated() -> Self {
        Self {
            syscall: SimDuration::from_nanos(100),
            cpu_fault: SimDuration::from_nanos(1_000),
            page_copy: SimDuration::from_nanos(400),
            page_access: SimDuration::from_nanos(400),
            tlb_shootdown: SimDuration::from_nanos(1_500),
            hmm_walk_page: SimDuration::from_nanos(20),
        }
    }

    /// Every cost zero (functional runs).
    pub fn zero() -> Self {
        Self {
            syscall: SimDuration::ZERO,
            cpu_fault: SimDuration::ZERO,
            page_copy: SimDuration::ZERO,
            page_access: SimDuration::ZERO,
            tlb_shootdown: SimDuration::ZERO,
            hmm_walk_page: SimDuration::ZERO,
        }
    }
}
