//! Virtual memory areas (`struct vm_area_struct`) and their flags.
//!
//! VMAs live in an ordered map keyed by start address and are never merged implicitly (DESIGN.md §3), so a
//! `munmap`/`mprotect` in the middle of a VMA splits it into up to three, as `split_vma` does.

use bitflags::bitflags;
use peerdma_core::{Range, Va};

/// An MMIO range without struct pages registered with [`crate::kernel::Kernel::add_mmio`] (defined here,
/// below [`crate::p2pdma`], because a PFNMAP VMA's backing names it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MmioId(pub u32);

/// A driver's mapping object registered with [`crate::kernel::Kernel::register_vm_object`] (defined here,
/// below [`crate::vm_object`], because a VMA's backing names it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VmObjectId(pub u32);

bitflags! {
    /// `vm_flags` bits the model uses (include/linux/mm.h).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct VmFlags: u32 {
        /// VM_READ.
        const READ = 1 << 0;
        /// VM_WRITE.
        const WRITE = 1 << 1;
        /// VM_EXEC.
        const EXEC = 1 << 2;
        /// VM_SHARED.
        const SHARED = 1 << 3;
        /// VM_IO: memory-mapped I/O.
        const IO = 1 << 4;
        /// VM_PFNMAP: raw PFNs without `struct page` semantics.
        const PFNMAP = 1 << 5;
        /// VM_MIXEDMAP: may hold both `struct page` pages and raw PFNs.
        const MIXEDMAP = 1 << 6;
        /// VM_HUGEPAGE (MADV_HUGEPAGE).
        const HUGEPAGE = 1 << 7;
        /// VM_NOHUGEPAGE (MADV_NOHUGEPAGE).
        const NOHUGEPAGE = 1 << 8;
        /// VM_HUGETLB.
        const HUGETLB = 1 << 9;
        /// VM_DONTCOPY: not inherited by fork.
        const DONTCOPY = 1 << 10;
        /// A filesystem-DAX mapping (`vma_is_fsdax`).
        const DAX = 1 << 11;
        /// Not a `vm_flags` bit: the VMA has an `anon_vma` (`vma->anon_vma`), which `anon_vma_prepare` sets
        /// up when the first anonymous page goes into a private mapping (a write fault, a COW, a private
        /// hugetlb fault) and which stays for the VMA's life; split and moved VMAs keep it. fork copies the
        /// page tables only of a mapping that has one (or is PFNMAP/MIXEDMAP): `vma_needs_copy`.
        const ANON_VMA = 1 << 12;
    }
}

impl VmFlags {
    /// The protection bits.
    pub const PROT: VmFlags = VmFlags::READ.union(VmFlags::WRITE).union(VmFlags::EXEC);
}

/// Memory protection as `mmap`/`mprotect` take it (defined in `peerdma-core`, shared with the scenario
/// language).
pub use peerdma_core::Prot;

impl From<Prot> for VmFlags {
    /// Returns the VMA flags for a protection. On x86-64 PROT_WRITE and PROT_EXEC imply read access
    /// (`protection_map`), so they set VM_READ too.
    fn from(prot: Prot) -> Self {
        let mut f = VmFlags::empty();
        if prot.read || prot.write || prot.exec {
            f |= VmFlags::READ;
        }
        if prot.write {
            f |= VmFlags::WRITE;
        }
        if prot.exec {
            f |= VmFlags::EXEC;
        }
        f
    }
}

/// What backs a VMA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmaBacking {
    /// Anonymous memory (private: `vma_is_anonymous`).
    Anon,
    /// A file (or, for shared anonymous memory, a shmem object) at a page offset of its start.
    File {
        /// The file.
        file: u32,
        /// Page offset of the VMA start in the file.
        pgoff: u64,
    },
    /// A driver mapping whose pages were inserted at mmap time (`vm_insert_page`, VM_MIXEDMAP).
    Driver,
    /// The p2pmem `allocate` file of a P2P memory region (drivers/pci/p2pdma.c `p2pmem_alloc_mmap`): pages
    /// of that region inserted at mmap time, shared only.
    P2pMem {
        /// The region (index into the physical memory's regions).
        region: usize,
    },
    /// A BAR range without struct pages mapped by its owner driver with `remap_pfn_range` (VM_IO |
    /// VM_PFNMAP): raw PFN entries from `pgoff` pages into the MMIO range on.
    Mmio {
        /// The MMIO range.
        mmio: MmioId,
        /// Page offset of the VMA start inside the MMIO range.
        pgoff: u64,
    },
    /// A driver's mapping object whose pages its fault handler inserts where they are now (TTM's
    /// `ttm_bo_vm_fault`, VM_MIXEDMAP; [`crate::vm_object`]).
    VmObject {
        /// The object.
        obj: VmObjectId,
        /// Page offset of the VMA start inside the object.
        pgoff: u64,
    },
}

/// One VMA.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vma {
    /// `[vm_start, vm_end)`.
    pub range: Range<Va>,
    /// `vm_flags`.
    pub flags: VmFlags,
    /// What backs it.
    pub backing: VmaBacking,
    /// Name for reports (the scenario's mapping name, if any).
    pub name: Option<String>,
}

impl Vma {
    /// Returns whether the VMA is private anonymous memory (`vma_is_anonymous`).
    pub fn is_anonymous(&self) -> bool {
        matches!(self.backing, VmaBacking::Anon)
    }

    /// Returns whether writes are shared with other mappings (VM_SHARED).
    pub fn is_shared(&self) -> bool {
        self.flags.contains(VmFlags::SHARED)
    }

    /// Returns the file page offset of `va`, for file-backed VMAs.
    pub fn file_pgoff(&self, va: Va) -> Option<(u32, u64)> {
        match self.backing {
            VmaBacking::File { file, pgoff } => {
                Some((file, pgoff + (va.raw() - self.range.start.raw()) / 4096))
            }
            _ => None,
        }
    }

    /// Returns the part of this VMA inside `[start, end)` as a new VMA, fixing the file offset.
    pub fn slice(&self, r: Range<Va>) -> Vma {
        let mut v = self.clone();
        v.range = r;
        if let VmaBacking::File { file, pgoff } = self.backing {
            v.backing = VmaBacking::File {
                file,
                pgoff: pgoff + (r.start.raw() - self.range.start.raw()) / 4096,
            };
        }
        if let VmaBacking::Mmio { mmio, pgoff } = self.backing {
            v.backing = VmaBacking::Mmio {
                mmio,
                pgoff: pgoff + (r.start.raw() - self.range.start.raw()) / 4096,
            };
        }
        v
    }
}
