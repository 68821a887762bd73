//! The IO page table of a paging domain (drivers/iommu/iommu.c `iommu_map` / `iommu_unmap`, and the
//! per-vendor page-table formats behind them: drivers/iommu/intel/iommu.c, drivers/iommu/amd/io_pgtable.c,
//! drivers/iommu/io-pgtable-arm.c).
//!
//! The table maps 4 KiB IOVA pages to 4 KiB physical pages with [`IommuProt`] permissions. It is stored
//! flat, one `BTreeMap` entry per present leaf PTE keyed by IOVA page number; a walk is reported as
//! [`IO_PAGE_TABLE_LEVELS`] levels, the depth of the 4-level (48-bit) x86 and Arm formats.
//!
//! Invariants:
//! 1. A leaf is either absent or present with at least one of `read` / `write`.
//! 2. [`IoPageTable::map`] and [`IoPageTable::unmap`] are all-or-nothing: they check the whole range before
//!    changing any PTE, so an error leaves the table untouched (Linux unwinds a failed `iommu_map`).
//!
//! Coarse: no large (2 MiB / 1 GiB) IO leaves, no intermediate tables and so no early-terminated walks, no
//! page-walk cache, and no page-table memory accounting.

use std::collections::BTreeMap;

/// The depth of the modelled IO page table: 4 levels, 48-bit IOVA (VT-d 4-level / AMD v1 / Arm LPAE 4 KiB).
pub const IO_PAGE_TABLE_LEVELS: u32 = 4;

/// The IOVA width the 4-level table translates, in bits.
pub const IOVA_BITS: u32 = 48;

/// Access permissions of an IO mapping (include/linux/iommu.h: `IOMMU_READ`, `IOMMU_WRITE`, `IOMMU_MMIO`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IommuProt {
    /// The device may read (DMA to the device, `DMA_TO_DEVICE`).
    pub read: bool,
    /// The device may write (DMA from the device, `DMA_FROM_DEVICE`).
    pub write: bool,
    /// The target is MMIO (a peer's BAR); recorded, it does not change translation.
    pub mmio: bool,
}

impl IommuProt {
    /// Read-only access (`IOMMU_READ`).
    pub const READ: Self = Self {
        read: true,
        write: false,
        mmio: false,
    };
    /// Write-only access (`IOMMU_WRITE`).
    pub const WRITE: Self = Self {
        read: false,
        write: true,
        mmio: false,
    };
    /// Read and write access (`IOMMU_READ | IOMMU_WRITE`, `DMA_BIDIRECTIONAL`).
    pub const READ_WRITE: Self = Self {
        read: true,
        write: true,
        mmio: false,
    };

    /// Returns the same permissions with the MMIO attribute set (`IOMMU_MMIO`).
    pub const fn with_mmio(self) -> Self {
        Self { mmio: true, ..self }
    }

    /// Returns whether an access (a write when `write`, else a read) is permitted.
    pub const fn allows(self, write: bool) -> bool {
        if write { self.write } else { self.read }
    }
}

/// A present leaf PTE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoPte {
    /// The physical page number it maps to.
    pub pa_pfn: u64,
    /// Its permissions.
    pub prot: IommuProt,
}

/// What stopped an all-or-nothing table update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PteConflict {
    /// This IOVA page is already mapped (map).
    Present(u64),
    /// This IOVA page is not mapped (unmap).
    Absent(u64),
}

/// A flat model of a 4-level IO page table.
#[derive(Clone, Debug, Default)]
pub struct IoPageTable {
    ptes: BTreeMap<u64, IoPte>,
}

impl IoPageTable {
    /// Creates an empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `nr_pages` pages from IOVA page `iova_pfn` to physical page `pa_pfn` onwards.
    pub fn map(
        &mut self,
        iova_pfn: u64,
        pa_pfn: u64,
        nr_pages: u64,
        prot: IommuProt,
    ) -> Result<(), PteConflict> {
        let end = iova_pfn + nr_pages;
        if let Some((&pfn, _)) = self.ptes.range(iova_pfn..end).next() {
            return Err(PteConflict::Present(pfn));
        }
        for i in 0..nr_pages {
            self.ptes.insert(
                iova_pfn + i,
                IoPte {
                    pa_pfn: pa_pfn + i,
                    prot,
                },
            );
        }
        Ok(())
    }

    /// Clears the `nr_pages` PTEs from IOVA page `iova_pfn`; every one of them must be present.
    pub fn unmap(&mut self, iova_pfn: u64, nr_pages: u64) -> Result<(), PteConflict> {
        let end = iova_pfn + nr_pages;
        let present = self.ptes.range(iova_pfn..end).count();
        if u64::try_from(present).expect("count fits u64") != nr_pages {
            let first_absent = (iova_pfn..end)
                .find(|p| !self.ptes.contains_key(p))
                .expect("a page is absent when fewer PTEs than pages are present");
            return Err(PteConflict::Absent(first_absent));
        }
        for pfn in iova_pfn..end {
            self.ptes.remove(&pfn);
        }
        Ok(())
    }

    /// Clears the `nr_pages` PTEs from IOVA page `iova_pfn`, which the caller has checked are all present
    /// (the domain's unmap checks them first, to name the first absent page before changing anything).
    pub(crate) fn clear_checked(&mut self, iova_pfn: u64, nr_pages: u64) {
        for pfn in iova_pfn..iova_pfn + nr_pages {
            let was = self.ptes.remove(&pfn);
            debug_assert!(was.is_some(), "IO PTE {pfn:#x} was checked present");
        }
    }

    /// Returns the leaf PTE for IOVA page `iova_pfn`.
    pub fn get(&self, iova_pfn: u64) -> Option<IoPte> {
        self.ptes.get(&iova_pfn).copied()
    }

    /// Returns the first present PTE's IOVA page number in `[start_pfn, end_pfn)`.
    pub fn first_present(&self, start_pfn: u64, end_pfn: u64) -> Option<u64> {
        self.ptes.range(start_pfn..end_pfn).next().map(|(&p, _)| p)
    }

    /// Returns the number of present leaf PTEs.
    pub fn nr_present(&self) -> u64 {
        u64::try_from(self.ptes.len()).expect("count fits u64")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_is_all_or_nothing() {
        let mut t = IoPageTable::new();
        t.map(10, 100, 2, IommuProt::READ).unwrap();
        assert_eq!(
            t.map(8, 200, 4, IommuProt::READ),
            Err(PteConflict::Present(10))
        );
        assert_eq!(t.get(8), None);
        assert_eq!(t.nr_present(), 2);
    }

    #[test]
    fn unmap_requires_every_page_present() {
        let mut t = IoPageTable::new();
        t.map(10, 100, 2, IommuProt::READ_WRITE).unwrap();
        assert_eq!(t.unmap(10, 3), Err(PteConflict::Absent(12)));
        assert_eq!(t.nr_present(), 2);
        t.unmap(10, 2).unwrap();
        assert_eq!(t.nr_present(), 0);
    }

    #[test]
    fn prot_allows_by_direction() {
        assert!(IommuProt::READ.allows(false));
        assert!(!IommuProt::READ.allows(true));
        assert!(IommuProt::WRITE.allows(true));
        assert!(!IommuProt::WRITE.allows(false));
    }
}
