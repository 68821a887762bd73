//! Simulated-time costs of IOMMU events, for the timing model (`spec/numbers.md` §2). The IOMMU itself
//! (drivers/iommu/*) has no notion of cost; this module is the model's calibration table.
//!
//! Only the IOTLB miss penalty is published (numbers.md §2, \[M\]: +226 ns on Haswell-EP to +293 ns on
//! Ivy Bridge-EP per read). The other figures are order-of-magnitude assumptions, kept configurable and never
//! asserted as constants.
//!
//! Each field is a named parameter ([`IommuCosts::PARAMS`], keys `iommu.*`) a scenario's `[timing]` table may
//! override ([`peerdma_core::timing`] states the rules).

use peerdma_core::SimDuration;
use peerdma_core::timing::{ParamSpec, Timing};

use crate::domain::{Translation, UnmapOutcome};
use crate::pagetable::IO_PAGE_TABLE_LEVELS;

const IOTLB_HIT: ParamSpec = ParamSpec::time(
    "iommu.iotlb_hit",
    0,
    "spec/numbers.md §2 (the base DMA latency already includes a hit)",
    "latency an IOTLB hit adds to a DMA read",
);
const IOTLB_MISS: ParamSpec = ParamSpec::time(
    "iommu.iotlb_miss",
    26,
    "spec/numbers.md §2 (miss ≈ +226 ns on Haswell-EP [M]: 26 + 4 levels × 50; the split is an assumption)",
    "fixed part of an IOTLB miss (detection, fill), on top of the walk",
);
const WALK_PER_LEVEL: ParamSpec = ParamSpec::time(
    "iommu.walk_per_level",
    50,
    "spec/numbers.md §2 (miss ≈ +226 ns on Haswell-EP [M]: 26 + 4 levels × 50; the split is an assumption)",
    "each IO page-table level walked on an IOTLB miss",
);
const INVALIDATE: ParamSpec = ParamSpec::time(
    "iommu.invalidate",
    1_000,
    "assumption (makes strict mode markedly slower per unmap, spec/numbers.md §2)",
    "a range IOTLB invalidation with its wait descriptor, paid by the CPU on a strict unmap",
);
const FLUSH_ALL: ParamSpec = ParamSpec::time(
    "iommu.flush_all",
    1_000,
    "assumption",
    "a whole-IOTLB flush (iommu_flush_iotlb_all), paid by the CPU that runs it",
);
const PTE_UPDATE: ParamSpec = ParamSpec::time(
    "iommu.pte_update",
    10,
    "assumption",
    "writing or clearing one IO page-table entry (map and unmap, per page)",
);

/// Costs of IOMMU events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IommuCosts {
    /// Latency an IOTLB hit adds to a DMA read (`iommu.iotlb_hit`; 0: numbers.md §2's base latency already
    /// includes it).
    pub iotlb_hit: SimDuration,
    /// The fixed part of a miss (detection, fill), on top of the walk (`iommu.iotlb_miss`).
    pub iotlb_miss: SimDuration,
    /// Each page-table level walked on a miss (`iommu.walk_per_level`).
    pub walk_per_level: SimDuration,
    /// A range IOTLB invalidation with its wait descriptor, paid by the CPU on a strict unmap
    /// (`iommu.invalidate`).
    pub invalidate: SimDuration,
    /// A whole-IOTLB flush (`iommu_flush_iotlb_all`), paid by the CPU that runs it (`iommu.flush_all`).
    pub flush_all: SimDuration,
    /// Writing or clearing one PTE (`iommu.pte_update`).
    pub pte_update: SimDuration,
}

impl IommuCosts {
    /// The parameters these costs are built from, in field order.
    pub const PARAMS: &[ParamSpec] = &[
        IOTLB_HIT,
        IOTLB_MISS,
        WALK_PER_LEVEL,
        INVALIDATE,
        FLUSH_ALL,
        PTE_UPDATE,
    ];

    /// Returns the costs `timing` gives.
    pub fn from_timing(timing: &Timing) -> Self {
        Self {
            iotlb_hit: timing.time(&IOTLB_HIT),
            iotlb_miss: timing.time(&IOTLB_MISS),
            walk_per_level: timing.time(&WALK_PER_LEVEL),
            invalidate: timing.time(&INVALIDATE),
            flush_all: timing.time(&FLUSH_ALL),
            pte_update: timing.time(&PTE_UPDATE),
        }
    }

    /// Returns the calibrated costs.
    ///
    /// A miss totals `iotlb_miss + 4 * walk_per_level` = 26 + 4 × 50 = **226 ns**, the Haswell-EP figure of
    /// numbers.md §2 (the newer of the two hosts measured; 293 ns is Ivy Bridge-EP). The split into a fixed
    /// part and per-level parts is an assumption; only the total is published.
    /// `invalidate` and `flush_all` (1 µs each) and `pte_update` (10 ns) are assumptions, not from
    /// numbers.md; they make strict mode markedly slower per unmap, as numbers.md §2 reports.
    pub fn calibrated() -> Self {
        Self::from_timing(&Timing::calibrated())
    }

    /// Returns all-zero costs, for tests that check behaviour only.
    pub fn zero() -> Self {
        Self::from_timing(&Timing::zero())
    }

    /// Returns the latency a translation adds to the device access. A fault is charged as a full walk.
    pub fn translation(&self, t: &Translation) -> SimDuration {
        match *t {
            Translation::Hit { .. } => self.iotlb_hit,
            Translation::Miss { levels, .. } => self.miss(levels),
            Translation::Fault(_) => self.miss(IO_PAGE_TABLE_LEVELS),
        }
    }

    /// Returns the cost of a miss that walks `levels` levels.
    pub fn miss(&self, levels: u32) -> SimDuration {
        self.iotlb_miss + self.walk_per_level.saturating_mul(u64::from(levels))
    }

    /// Returns the CPU time of mapping `nr_pages` pages.
    pub fn map(&self, nr_pages: u64) -> SimDuration {
        self.pte_update.saturating_mul(nr_pages)
    }

    /// Returns the CPU time an unmap took, from its outcome.
    pub fn unmap(&self, outcome: &UnmapOutcome) -> SimDuration {
        let mut t = self.pte_update.saturating_mul(outcome.nr_pages);
        if outcome.invalidated_range {
            t += self.invalidate;
        }
        if outcome.flushed {
            t += self.flush_all;
        }
        t
    }
}

impl Default for IommuCosts {
    fn default() -> Self {
        Self::calibrated()
    }
}

#[cfg(test)]
mod tests {
    use peerdma_core::Pa;

    use super::*;

    #[test]
    fn calibrated_miss_is_the_haswell_figure_of_numbers_md_section_2() {
        let c = IommuCosts::calibrated();
        let miss = Translation::Miss {
            pa: Pa::from_raw(0),
            levels: IO_PAGE_TABLE_LEVELS,
        };
        let hit = Translation::Hit {
            pa: Pa::from_raw(0),
            stale: false,
        };
        assert_eq!(
            c.translation(&miss).as_nanos() - c.translation(&hit).as_nanos(),
            226
        );
    }

    #[test]
    fn strict_unmap_pays_the_invalidation() {
        let c = IommuCosts::calibrated();
        let strict = UnmapOutcome {
            nr_pages: 2,
            invalidated_range: true,
            queued: false,
            flushed: false,
            freed_iovas: 1,
        };
        let lazy = UnmapOutcome {
            invalidated_range: false,
            queued: true,
            freed_iovas: 0,
            ..strict
        };
        assert_eq!(c.unmap(&strict).as_nanos(), 20 + 1_000);
        assert_eq!(c.unmap(&lazy).as_nanos(), 20);
        assert_eq!(IommuCosts::zero().unmap(&strict), SimDuration::ZERO);
    }

    #[test]
    fn each_param_reaches_its_field() {
        for spec in IommuCosts::PARAMS {
            let mut t = Timing::calibrated();
            t.set(spec.key, spec.default + 1);
            assert_ne!(
                IommuCosts::from_timing(&t),
                IommuCosts::calibrated(),
                "{}",
                spec.key
            );
        }
    }
}
