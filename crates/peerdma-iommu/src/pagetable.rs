//! The IO page table of a paging domain (drivers/iommu/iommu.c `iommu_map` / `iommu_unmap`, and the
//! per-vendor page-table formats behind them: drivers/iommu/intel/iommu.c, drivers/iommu/amd/io_pgtable.c,
//! drivers/iommu/io-pgtable-arm.c).
//!
//! The table maps 4 KiB IOVA pages to 4 KiB physical pages with [`IommuProt`] permissions. Its leaf entries
//! sit in last-level tables of 512 (one 4 KiB table page each), found by table number; the upper levels are
//! not stored, and a walk is reported as [`IO_PAGE_TABLE_LEVELS`] levels, the depth of the 4-level (48-bit)
//! x86 and Arm formats. A last-level table, once allocated, stays when its entries are cleared (as an
//! unmap leaves the table pages in place).
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

/// Leaf PTEs per last-level table: 512 entries of 8 bytes in a 4 KiB page, as in the x86 IO page tables.
const PTES_PER_TABLE: u64 = SLOTS as u64;
/// [`PTES_PER_TABLE`] as an array length.
const SLOTS: usize = 512;

/// One last-level table: its 512 leaf slots and how many of them are present.
#[derive(Clone, Debug)]
struct LeafTable {
    slots: Box<[Option<IoPte>; SLOTS]>,
    present: u32,
}

impl LeafTable {
    fn new() -> Self {
        Self {
            slots: Box::new([None; SLOTS]),
            present: 0,
        }
    }
}

/// Returns the table number and the slot of IOVA page `pfn`.
fn split(pfn: u64) -> (u64, usize) {
    let slot = usize::try_from(pfn % PTES_PER_TABLE).expect("a slot index fits usize");
    (pfn / PTES_PER_TABLE, slot)
}

/// A model of a 4-level IO page table: the walk's levels are counted ([`IO_PAGE_TABLE_LEVELS`]), the leaf
/// entries are kept in last-level tables of 512 (allocated on first use and kept once allocated, as an
/// unmap leaves the table pages in place), indexed by table number, so a lookup, a map or a clear of one
/// page is one index probe plus one slot access.
#[derive(Clone, Debug, Default)]
pub struct IoPageTable {
    tables: BTreeMap<u64, LeafTable>,
    present: u64,
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
        if let Some(pfn) = self.first_present(iova_pfn, end) {
            return Err(PteConflict::Present(pfn));
        }
        let mut pfn = iova_pfn;
        while pfn < end {
            let (t, first) = split(pfn);
            let table = self.tables.entry(t).or_insert_with(LeafTable::new);
            let n = (PTES_PER_TABLE - first as u64).min(end - pfn);
            for i in 0..n {
                let slot = first + usize::try_from(i).expect("a slot index fits usize");
                table.slots[slot] = Some(IoPte {
                    pa_pfn: pa_pfn + (pfn - iova_pfn) + i,
                    prot,
                });
            }
            table.present += u32::try_from(n).expect("at most 512 slots");
            self.present += n;
            pfn += n;
        }
        Ok(())
    }

    /// Clears the `nr_pages` PTEs from IOVA page `iova_pfn`; every one of them must be present.
    pub fn unmap(&mut self, iova_pfn: u64, nr_pages: u64) -> Result<(), PteConflict> {
        let end = iova_pfn + nr_pages;
        if let Some(p) = (iova_pfn..end).find(|&p| self.get(p).is_none()) {
            return Err(PteConflict::Absent(p));
        }
        self.clear_checked(iova_pfn, nr_pages);
        Ok(())
    }

    /// Clears the `nr_pages` PTEs from IOVA page `iova_pfn`, which the caller has checked are all present
    /// (the domain's unmap checks them first, to name the first absent page before changing anything).
    pub(crate) fn clear_checked(&mut self, iova_pfn: u64, nr_pages: u64) {
        let end = iova_pfn + nr_pages;
        let mut pfn = iova_pfn;
        while pfn < end {
            let (t, first) = split(pfn);
            let n = (PTES_PER_TABLE - first as u64).min(end - pfn);
            let table = self.tables.get_mut(&t);
            debug_assert!(table.is_some(), "IO PTE {pfn:#x} was checked present");
            if let Some(table) = table {
                for i in 0..n {
                    let slot = first + usize::try_from(i).expect("a slot index fits usize");
                    let was = table.slots[slot].take();
                    debug_assert!(was.is_some(), "IO PTE {:#x} was checked present", pfn + i);
                    if was.is_some() {
                        table.present -= 1;
                        self.present -= 1;
                    }
                }
            }
            pfn += n;
        }
    }

    /// Returns the leaf PTE for IOVA page `iova_pfn`.
    pub fn get(&self, iova_pfn: u64) -> Option<IoPte> {
        let (t, slot) = split(iova_pfn);
        self.tables.get(&t).and_then(|table| table.slots[slot])
    }

    /// Returns the first present PTE's IOVA page number in `[start_pfn, end_pfn)`.
    pub fn first_present(&self, start_pfn: u64, end_pfn: u64) -> Option<u64> {
        if start_pfn >= end_pfn {
            return None;
        }
        let (t0, _) = split(start_pfn);
        let (t1, _) = split(end_pfn - 1);
        self.tables
            .range(t0..=t1)
            .filter(|(_, table)| table.present > 0)
            .find_map(|(&t, table)| {
                let lo = (t * PTES_PER_TABLE).max(start_pfn);
                let hi = ((t + 1) * PTES_PER_TABLE).min(end_pfn);
                (lo..hi).find(|&p| table.slots[split(p).1].is_some())
            })
    }

    /// Returns the number of present leaf PTEs.
    pub fn nr_present(&self) -> u64 {
        self.present
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
    fn ranges_across_last_level_tables_map_find_and_clear_page_by_page() {
        let mut t = IoPageTable::new();
        // 4 pages straddling the boundary between tables 0 and 1 (pages 510..514).
        t.map(510, 7, 4, IommuProt::READ_WRITE).unwrap();
        assert_eq!(t.nr_present(), 4);
        assert_eq!(t.get(513).map(|p| p.pa_pfn), Some(10));
        assert_eq!(t.first_present(0, 2000), Some(510));
        assert_eq!(t.first_present(512, 2000), Some(512));
        assert_eq!(t.first_present(514, 2000), None);
        assert_eq!(
            t.map(400, 0, 111, IommuProt::READ),
            Err(PteConflict::Present(510))
        );
        t.unmap(511, 2).unwrap();
        assert_eq!((t.get(511), t.get(512)), (None, None));
        assert_eq!(t.first_present(511, 2000), Some(513));
        assert_eq!(t.nr_present(), 2);
        // A table emptied and refilled, and a range far away.
        t.unmap(510, 1).unwrap();
        t.unmap(513, 1).unwrap();
        assert_eq!(t.first_present(0, u64::MAX >> 12), None);
        t.map(1 << 30, 5, 1, IommuProt::READ).unwrap();
        assert_eq!(t.first_present(0, u64::MAX >> 12), Some(1 << 30));
        assert_eq!(t.nr_present(), 1);
    }

    #[test]
    fn prot_allows_by_direction() {
        assert!(IommuProt::READ.allows(false));
        assert!(!IommuProt::READ.allows(true));
        assert!(IommuProt::WRITE.allows(true));
        assert!(!IommuProt::WRITE.allows(false));
    }
}
