//! The registry of every timing-model parameter of the workspace: the one list a scenario's `[timing]` table
//! is checked against and `peerdma params` prints.
//!
//! Each cost table owns its parameters (`PARAMS` on [`MmCosts`], [`IommuCosts`], [`DmaCosts`],
//! [`DmirrorCosts`] and [`SvaCosts`]); this module only concatenates them, in that order. Keys are unique across the
//! workspace (a unit test checks it). [`peerdma_core::timing`] states how a [`Timing`] turns defaults and
//! overrides into values.

use peerdma_core::timing::{ParamSpec, Timing};
use peerdma_devices::nvme::NvmeCosts;
use peerdma_devices::rnic::RnicCosts;
use peerdma_devices::{DmirrorCosts, SvaCosts};
use peerdma_dma::DmaCosts;
use peerdma_iommu::IommuCosts;
use peerdma_mm::MmCosts;

/// Returns every parameter of the workspace: memory management, IOMMU, DMA, the dmirror device, the RDMA
/// NIC, the NVMe controller, the gpu device and its UVM fault servicing, then the SVA accelerator and its
/// IOMMU side.
pub fn all_params() -> Vec<ParamSpec> {
    [
        MmCosts::PARAMS,
        IommuCosts::PARAMS,
        DmaCosts::PARAMS,
        DmirrorCosts::PARAMS,
        RnicCosts::PARAMS,
        NvmeCosts::PARAMS,
        peerdma_devices::gpu::GpuCosts::PARAMS,
        peerdma_devices::gpu::UvmCosts::PARAMS,
        SvaCosts::PARAMS,
    ]
    .concat()
}

/// Returns the parameter named `key`.
pub fn find(key: &str) -> Option<ParamSpec> {
    all_params().into_iter().find(|p| p.key == key)
}

/// Returns the key closest to `key` by edit distance when it is close enough to be a likely typo (at most
/// a third of its length, and at least 2, edits away).
pub fn nearest(key: &str) -> Option<&'static str> {
    nearest_in(key, all_params().iter().map(|p| p.key))
}

/// Returns the candidate closest to `word` by edit distance when it is close enough to be a likely typo
/// (at most a third of its length, and at least 2, edits away), for "did you mean" hints (ops, keys).
pub fn nearest_in<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).max(2);
    candidates
        .into_iter()
        .filter(|&c| c != word)
        .map(|c| (edit_distance(word, c), c))
        .filter(|&(d, _)| d <= limit)
        .min()
        .map(|(_, c)| c)
}

/// Returns ` (did you mean `X`?)` for the candidate nearest `word`, or nothing.
pub(crate) fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> String {
    nearest_in(word, candidates).map_or_else(String::new, |n| format!(" (did you mean `{n}`?)"))
}

/// Returns whether some parameter's key starts with `prefix` followed by a dot (`mm` for `mm.cpu_fault`).
pub fn is_group(prefix: &str) -> bool {
    all_params().iter().any(|p| {
        p.key
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('.'))
    })
}

/// The cost tables a [`Timing`] builds, together (to compare two timings).
#[derive(Clone, Debug, PartialEq)]
pub struct CostTables {
    /// Memory management.
    pub mm: MmCosts,
    /// The DMA layer, its IOMMU costs included.
    pub dma: DmaCosts,
    /// The dmirror device.
    pub dmirror: DmirrorCosts,
    /// The RDMA NIC.
    pub rnic: RnicCosts,
    /// The NVMe controller.
    pub nvme: NvmeCosts,
    /// The gpu device.
    pub gpu: peerdma_devices::gpu::GpuCosts,
    /// The gpu device's UVM fault servicing.
    pub uvm: peerdma_devices::gpu::UvmCosts,
    /// The SVA accelerator and its IOMMU side.
    pub sva: SvaCosts,
}

impl CostTables {
    /// Returns every cost table `timing` gives.
    pub fn from_timing(timing: &Timing) -> Self {
        Self {
            mm: MmCosts::from_timing(timing),
            dma: DmaCosts::from_timing(timing),
            dmirror: DmirrorCosts::from_timing(timing),
            rnic: RnicCosts::from_timing(timing),
            nvme: NvmeCosts::from_timing(timing),
            gpu: peerdma_devices::gpu::GpuCosts::from_timing(timing),
            uvm: peerdma_devices::gpu::UvmCosts::from_timing(timing),
            sva: SvaCosts::from_timing(timing),
        }
    }
}

/// Levenshtein distance over chars.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, &cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use peerdma_core::timing::ParamUnit;

    use super::*;

    #[test]
    fn every_key_is_unique_and_dotted() {
        let params = all_params();
        let keys: BTreeSet<_> = params.iter().map(|p| p.key).collect();
        assert_eq!(keys.len(), params.len());
        for p in &params {
            assert!(p.key.contains('.'), "{}", p.key);
            assert!(!p.doc.is_empty() && !p.source.is_empty(), "{}", p.key);
        }
    }

    #[test]
    fn every_parameter_reaches_a_cost_table() {
        for p in all_params() {
            let mut t = Timing::calibrated();
            t.set(p.key, p.default + 1);
            assert_ne!(
                CostTables::from_timing(&t),
                CostTables::from_timing(&Timing::calibrated()),
                "{} changes no cost table",
                p.key
            );
        }
    }

    #[test]
    fn zero_mode_zeroes_every_time_parameter_but_keeps_counts() {
        let mut t = Timing::zero();
        for p in all_params() {
            t.set(p.key, p.default + 1);
        }
        for p in all_params() {
            match p.unit {
                ParamUnit::Time => assert_eq!(t.value(&p), 0, "{}", p.key),
                ParamUnit::Count => assert_eq!(t.value(&p), p.default + 1, "{}", p.key),
            }
        }
        assert_eq!(CostTables::from_timing(&Timing::zero()).mm, MmCosts::zero());
    }

    #[test]
    fn the_announced_parameters_are_registered() {
        for key in [
            "mm.cpu_fault",
            "mm.swap_io",
            "iommu.iotlb_miss",
            "dma.hop",
            "dmirror.ioctl",
            "dma.pin_page",
        ] {
            assert_eq!(find(key).map(|p| p.unit), Some(ParamUnit::Time), "{key}");
        }
        let tags = find("dma.max_outstanding").unwrap();
        assert_eq!((tags.unit, tags.default), (ParamUnit::Count, 256));
    }

    #[test]
    fn a_typo_of_an_op_or_key_suggests_the_nearest_one() {
        let ops = crate::OPS.iter().map(|s| s.name);
        assert_eq!(
            nearest_in("dmirror.raed", ops.clone()),
            Some("dmirror.read")
        );
        assert_eq!(nearest_in("mlock", ops), None);
        assert_eq!(
            did_you_mean("patern", ["op", "at", "pattern"]),
            " (did you mean `pattern`?)"
        );
        assert_eq!(did_you_mean("zzzzzz", ["op", "at"]), "");
    }

    #[test]
    fn a_typo_suggests_the_nearest_key() {
        assert_eq!(nearest("mm.cpu_faults"), Some("mm.cpu_fault"));
        assert_eq!(nearest("iommu.iotlb_mis"), Some("iommu.iotlb_miss"));
        assert_eq!(nearest("nothing.like.it"), None);
        assert!(is_group("mm") && is_group("iommu") && !is_group("mm.cpu"));
    }
}
