//! Timing-model parameters of the memory-management paths, with their sources.
//!
//! Each field is a named parameter ([`MmCosts::PARAMS`]) with a default a scenario's `[timing]` table may
//! override; `zero` mode sets them all to zero ([`peerdma_core::timing`] states the rules).

use peerdma_core::SimDuration;
use peerdma_core::timing::{ParamSpec, Timing};

const SYSCALL: ParamSpec = ParamSpec::time(
    "mm.syscall",
    100,
    "assumption",
    "entering and leaving a system call",
);
const CPU_FAULT: ParamSpec = ParamSpec::time(
    "mm.cpu_fault",
    1_000,
    "spec/numbers.md §5 (minor anonymous fault, median ≈ 1.0 µs [B])",
    "a minor anonymous CPU fault, zero-fill included",
);
const PAGE_COPY: ParamSpec = ParamSpec::time(
    "mm.page_copy",
    400,
    "assumption (≈ 10 GB/s memcpy [R])",
    "copying one 4 KiB page between RAM pages (COW, fork copies, migration)",
);
const PAGE_ACCESS: ParamSpec = ParamSpec::time(
    "mm.page_access",
    400,
    "assumption (≈ 10 GB/s memcpy [R])",
    "CPU load/store of one 4 KiB page worth of data once translated",
);
const TLB_SHOOTDOWN: ParamSpec = ParamSpec::time(
    "mm.tlb_shootdown",
    1_500,
    "spec/numbers.md §5 (IPI round trip ≈ 1–3 µs [B])",
    "a TLB shootdown after unmap/protect",
);
const HMM_WALK_PAGE: ParamSpec = ParamSpec::time(
    "mm.hmm_walk_page",
    20,
    "assumption",
    "walking the page table for one page inside hmm_range_fault",
);
const SWAP_IO: ParamSpec = ParamSpec::time(
    "mm.swap_io",
    80_000,
    "spec/numbers.md §5 (major fault from NVMe 80–200 µs [B]; write-out assumed alike)",
    "swap-device I/O of one 4 KiB page, swap-out or swap-in",
);
const PIN_PAGE: ParamSpec = ParamSpec::time(
    "dma.pin_page",
    50,
    "assumption (order of a page-table walk + an atomic refcount update)",
    "GUP taking one page (pin_user_pages / get_user_pages), faults aside",
);

/// Costs of CPU-side memory management.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MmCosts {
    /// Entering and leaving a system call (`mm.syscall`).
    pub syscall: SimDuration,
    /// A minor anonymous fault, zero-fill included (`mm.cpu_fault`; spec/numbers.md §5: median ≈ 1.0 µs
    /// \[B\]).
    pub cpu_fault: SimDuration,
    /// Copying one 4 KiB page between RAM pages (`mm.page_copy`; ≈ 10 GB/s memcpy, \[R\]; used for COW and
    /// fork copies).
    pub page_copy: SimDuration,
    /// CPU load/store of one 4 KiB page worth of data once translated (`mm.page_access`; same memcpy
    /// bandwidth).
    pub page_access: SimDuration,
    /// A TLB shootdown after unmap/protect (`mm.tlb_shootdown`; spec/numbers.md §5: ≈ 1–3 µs IPI round trip
    /// \[B\]).
    pub tlb_shootdown: SimDuration,
    /// Walking the page table for one page inside `hmm_range_fault` (`mm.hmm_walk_page`).
    pub hmm_walk_page: SimDuration,
    /// Swap-device latency per 4 KiB page, write-out and read-in alike (`mm.swap_io`; spec/numbers.md §5: a
    /// major fault from NVMe is 80–200 µs \[B\]).
    pub swap_io: SimDuration,
    /// GUP taking one page, `FOLL_GET` or `FOLL_PIN` alike (`dma.pin_page`; an assumption of 50 ns: a
    /// page-table walk and an atomic refcount update). Faults GUP triggers are charged separately.
    pub pin_page: SimDuration,
}

impl MmCosts {
    /// The parameters these costs are built from, in field order.
    pub const PARAMS: &[ParamSpec] = &[
        SYSCALL,
        CPU_FAULT,
        PAGE_COPY,
        PAGE_ACCESS,
        TLB_SHOOTDOWN,
        HMM_WALK_PAGE,
        SWAP_IO,
        PIN_PAGE,
    ];

    /// Returns the costs `timing` gives.
    pub fn from_timing(timing: &Timing) -> Self {
        Self {
            syscall: timing.time(&SYSCALL),
            cpu_fault: timing.time(&CPU_FAULT),
            page_copy: timing.time(&PAGE_COPY),
            page_access: timing.time(&PAGE_ACCESS),
            tlb_shootdown: timing.time(&TLB_SHOOTDOWN),
            hmm_walk_page: timing.time(&HMM_WALK_PAGE),
            swap_io: timing.time(&SWAP_IO),
            pin_page: timing.time(&PIN_PAGE),
        }
    }

    /// The calibrated defaults.
    pub fn calibrated() -> Self {
        Self::from_timing(&Timing::calibrated())
    }

    /// Every cost zero (functional runs).
    pub fn zero() -> Self {
        Self::from_timing(&Timing::zero())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calibrated_defaults_are_the_published_figures() {
        let c = MmCosts::calibrated();
        assert_eq!(c.cpu_fault, SimDuration::from_micros(1));
        assert_eq!(c.swap_io, SimDuration::from_micros(80));
        assert_eq!(c.pin_page, SimDuration::from_nanos(50));
    }

    #[test]
    fn zero_zeroes_every_cost_swap_io_included() {
        let c = MmCosts::zero();
        assert_eq!(c.swap_io, SimDuration::ZERO);
        assert_eq!(c.pin_page, SimDuration::ZERO);
        assert_eq!(c.cpu_fault, SimDuration::ZERO);
    }

    #[test]
    fn each_param_reaches_its_field() {
        for spec in MmCosts::PARAMS {
            let mut t = Timing::calibrated();
            t.set(spec.key, spec.default + 1);
            assert_ne!(
                MmCosts::from_timing(&t),
                MmCosts::calibrated(),
                "{}",
                spec.key
            );
        }
    }
}
