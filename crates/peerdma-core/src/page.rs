//! Page sizes of the modelled x86-64 MMU (4-level paging): 4 KiB base pages, 2 MiB PMD leaves, 1 GiB PUD leaves.

use serde::{Deserialize, Serialize};

/// log2 of the base page size.
pub const PAGE_SHIFT: u32 = 12;
/// The base page size, 4 KiB.
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
/// log2 of the size a PMD leaf maps.
pub const PMD_SHIFT: u32 = 21;
/// The size a PMD leaf maps, 2 MiB.
pub const PMD_SIZE: u64 = 1 << PMD_SHIFT;
/// log2 of the size a PUD leaf maps.
pub const PUD_SHIFT: u32 = 30;
/// The size a PUD leaf maps, 1 GiB.
pub const PUD_SIZE: u64 = 1 << PUD_SHIFT;

/// The size of one page-table leaf mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PageSize {
    /// A 4 KiB PTE.
    Size4K,
    /// A 2 MiB PMD leaf (THP or hugetlb).
    Size2M,
    /// A 1 GiB PUD leaf.
    Size1G,
}

impl PageSize {
    /// Returns the size in bytes.
    pub const fn bytes(self) -> u64 {
        match self {
            Self::Size4K => PAGE_SIZE,
            Self::Size2M => PMD_SIZE,
            Self::Size1G => PUD_SIZE,
        }
    }

    /// Returns the mapping order in base pages (`hmm_pfn_to_map_order`): 0, 9 or 18.
    pub const fn order(self) -> u32 {
        match self {
            Self::Size4K => 0,
            Self::Size2M => PMD_SHIFT - PAGE_SHIFT,
            Self::Size1G => PUD_SHIFT - PAGE_SHIFT,
        }
    }

    /// Returns the number of base pages the leaf covers.
    pub const fn nr_pages(self) -> u64 {
        1 << self.order()
    }
}
