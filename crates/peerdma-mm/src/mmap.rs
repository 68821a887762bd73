//! Creating and removing mappings: `mmap` (anonymous, shared, file, DAX, hugetlb, with MAP_FIXED and
//! MAP_POPULATE), driver mappings (`mmap_driver_pages`, `mmap_pfnmap`, `insert_driver_vma`), the free-gap
//! search, and `munmap`, which zaps under a downgraded `mmap_lock` as `do_vmi_align_munmap` does.
//!
//! Linux counterpart: mm/mmap.c (`do_mmap`, `get_unmapped_area`, `do_vmi_align_munmap`,
//! `unmap_region`) and mm/vma.c.

use peerdma_core::{Errno, PAGE_SIZE, PMD_SIZE, Pid, Range, Va};

use crate::kernel::{Kernel, MMAP_BASE, MMAP_MIN, TASK_SIZE, check_range};
use crate::mmu_notifier::NotifierEvent;
use crate::pagetable::Pte;
use crate::phys::{FrameOwner, GfpZone};
use crate::vma::{Prot, VmFlags, Vma, VmaBacking};

/// Arguments of [`Kernel::mmap`].
#[derive(Clone, Debug, Default)]
pub struct MmapArgs {
    /// Hint, or the exact address with `fixed`/`fixed_noreplace`.
    pub addr: Option<Va>,
    /// Length in bytes (rounded up to pages).
    pub len: u64,
    /// Protection.
    pub prot: Prot,
    /// MAP_SHARED (else MAP_PRIVATE).
    pub shared: bool,
    /// MAP_PRIVATE was given (exactly one of shared/private must be).
    pub private: bool,
    /// MAP_ANONYMOUS.
    pub anonymous: bool,
    /// MAP_FIXED.
    pub fixed: bool,
    /// MAP_FIXED_NOREPLACE.
    pub fixed_noreplace: bool,
    /// MAP_POPULATE.
    pub populate: bool,
    /// MAP_HUGETLB (2 MiB pages).
    pub hugetlb: bool,
    /// The file for a file mapping.
    pub file: Option<u32>,
    /// File offset in bytes (page aligned).
    pub offset: u64,
    /// A name for reports.
    pub name: Option<String>,
}

impl Kernel {
    /// `mmap(2)`.
    ///
    /// # Errors
    /// `EINVAL` for a zero length, an unaligned fixed address or offset, or neither/both of shared and
    /// private; `ENOMEM` when the length overflows or no gap fits; `EEXIST` for MAP_FIXED_NOREPLACE over a
    /// mapping; `EBADF` for a file mapping without a file.
    pub async fn mmap(&self, pid: Pid, args: &MmapArgs) -> Result<Va, Errno> {
        self.spend(self.costs.syscall).await;
        if args.len == 0 || args.shared == args.private || !args.offset.is_multiple_of(PAGE_SIZE) {
            return Err(Errno::EINVAL);
        }
        let align = if args.hugetlb { PMD_SIZE } else { PAGE_SIZE };
        let len = args
            .len
            .checked_next_multiple_of(align)
            .ok_or(Errno::ENOMEM)?;
        if len > TASK_SIZE {
            return Err(Errno::ENOMEM);
        }
        if !args.anonymous && args.file.is_none() {
            return Err(Errno::EBADF);
        }
        let fixed = args.fixed || args.fixed_noreplace;
        if fixed {
            let a = args.addr.ok_or(Errno::EINVAL)?;
            if !a.is_aligned(align) {
                return Err(Errno::EINVAL);
            }
            if a.raw().checked_add(len).is_none_or(|e| e > TASK_SIZE) {
                return Err(Errno::ENOMEM);
            }
        }
        let lock = self.mmap_lock(pid);
        let _g = lock.write().await;
        let start = if fixed {
            let a = args.addr.expect("checked above");
            let r = Range::from_len(a, len).expect("checked above");
            let overlaps = !self.mms().mm(pid).vmas_in(r).is_empty();
            if overlaps {
                if args.fixed_noreplace {
                    return Err(Errno::EEXIST);
                }
                self.do_munmap(pid, r).await;
            }
            a
        } else {
            self.find_gap(pid, args.addr, len, align)
                .ok_or(Errno::ENOMEM)?
        };
        let range = Range::from_len(start, len).expect("gap inside user space");
        let mut flags = VmFlags::from(args.prot);
        if args.shared {
            flags |= VmFlags::SHARED;
        }
        if args.hugetlb {
            flags |= VmFlags::HUGETLB;
        }
        if args.file.is_some_and(|f| {
            self.files()
                .get(f)
                .is_some_and(|f| f.dax_region().is_some())
        }) {
            flags |= VmFlags::DAX;
        }
        let backing = if args.anonymous {
            if args.shared {
                let f = self.create_file("shmem", len, true);
                VmaBacking::File { file: f, pgoff: 0 }
            } else {
                VmaBacking::Anon
            }
        } else {
            VmaBacking::File {
                file: args.file.expect("checked above"),
                pgoff: args.offset / PAGE_SIZE,
            }
        };
        self.mms().insert_vma(
            pid,
            Vma {
                range,
                flags,
                backing,
                name: args.name.clone(),
            },
        );
        self.sim.trace("mmap", || {
            let names: Vec<&str> = flags.iter_names().map(|(n, _)| n).collect();
            format!("pid {} {range} {}", pid.0, names.join("|"))
        });
        if args.populate {
            let write = args.prot.write;
            for page in range.pages() {
                if self.mms().mm(pid).translate(page).is_some() {
                    continue;
                }
                if self.handle_mm_fault(pid, page, write).await.is_err() {
                    break;
                }
            }
        }
        Ok(start)
    }

    /// Creates a VM_MIXEDMAP VMA whose pages are zeroed kernel pages inserted at mmap time
    /// (`vm_insert_page`), as a driver's `mmap` file operation does (lib/test_hmm.c `dmirror_fops_mmap`).
    pub async fn mmap_driver_pages(
        &self,
        pid: Pid,
        len: u64,
        prot: Prot,
        shared: bool,
    ) -> Result<Va, Errno> {
        let mut flags = VmFlags::from(prot) | VmFlags::MIXEDMAP;
        if shared {
            flags |= VmFlags::SHARED;
        }
        let lock = self.mmap_lock(pid);
        let _g = lock.write().await;
        let range = self.insert_driver_vma(pid, len, flags).await?;
        let mut st = self.mms();
        let mut phys = self.phys();
        let nr = range.nr_pages();
        // Kernel pages (GFP_KERNEL) never come from movable memory.
        if phys.nr_free_zone(GfpZone::Normal) < nr {
            st.remove_vmas(pid, range);
            return Err(Errno::ENOMEM);
        }
        let home = st.home_node(pid);
        for page in range.pages() {
            let frame = phys
                .alloc_node(home, FrameOwner::Kernel)
                .expect("counted free frames above");
            phys.frame_mut(frame).mapcount = 1;
            // vm_insert_page maps the page read-only in a private mapping; a write fault COWs it.
            let write = shared && prot.write;
            st.mm_mut(pid).pt_mut().set_pte(
                page,
                Pte::Present {
                    frame,
                    write,
                    special: false,
                },
            );
        }
        Ok(range.start)
    }

    /// Creates an empty VM_IO | VM_PFNMAP VMA, as a driver whose `mmap` installs no entries leaves it (a CPU
    /// access raises SIGBUS; GUP and `hmm_range_fault` refuse it). A BAR mapped with its entries is
    /// [`Kernel::mmap_pfnmap_mmio`] (`remap_pfn_range`).
    pub async fn mmap_pfnmap(&self, pid: Pid, len: u64, prot: Prot) -> Result<Va, Errno> {
        let flags = VmFlags::from(prot)
            | VmFlags::IO
            | VmFlags::PFNMAP
            | VmFlags::SHARED
            | VmFlags::DONTCOPY;
        let lock = self.mmap_lock(pid);
        let _g = lock.write().await;
        Ok(self.insert_driver_vma(pid, len, flags).await?.start)
    }

    /// Places and inserts a driver-backed VMA of `len` bytes (the caller holds `mmap_lock` for writing).
    pub(crate) async fn insert_driver_vma(
        &self,
        pid: Pid,
        len: u64,
        flags: VmFlags,
    ) -> Result<Range<Va>, Errno> {
        self.spend(self.costs.syscall).await;
        let len = len
            .checked_next_multiple_of(PAGE_SIZE)
            .ok_or(Errno::ENOMEM)?;
        if len == 0 {
            return Err(Errno::EINVAL);
        }
        let start = self
            .find_gap(pid, None, len, PAGE_SIZE)
            .ok_or(Errno::ENOMEM)?;
        let range = Range::from_len(start, len).expect("gap inside user space");
        self.mms().insert_vma(
            pid,
            Vma {
                range,
                flags,
                backing: VmaBacking::Driver,
                name: None,
            },
        );
        Ok(range)
    }

    pub(crate) fn find_gap(&self, pid: Pid, hint: Option<Va>, len: u64, align: u64) -> Option<Va> {
        let st = self.mms();
        let mm = st.mm(pid);
        if let Some(h) = hint
            && let Some(a) = h.align_up(align)
            && let Some(r) = Range::from_len(a, len)
            && r.start.raw() >= MMAP_MIN
            && r.end.raw() <= TASK_SIZE
            && mm.vmas_in(r).is_empty()
        {
            return Some(a);
        }
        // Top-down below MMAP_BASE (arch_get_unmapped_area_topdown).
        let mut top = MMAP_BASE;
        for (_, v) in mm.vmas().range(..Va::from_raw(MMAP_BASE)).rev() {
            let gap_start = v.range.end.raw();
            if let Some(cand) = top.checked_sub(len).map(|c| c & !(align - 1))
                && cand >= gap_start
            {
                return Some(Va::from_raw(cand));
            }
            top = top.min(v.range.start.raw());
        }
        let cand = top.checked_sub(len)? & !(align - 1);
        (cand >= MMAP_MIN).then_some(Va::from_raw(cand))
    }

    /// `munmap(2)`.
    ///
    /// # Errors
    /// `EINVAL` for an unaligned address, a zero length or a range outside user space.
    pub async fn munmap(&self, pid: Pid, addr: Va, len: u64) -> Result<(), Errno> {
        self.spend(self.costs.syscall).await;
        let r = check_range(addr, len)?;
        let lock = self.mmap_lock(pid);
        let g = lock.write().await;
        if self.mms().mm(pid).vmas_in(r).is_empty() {
            return Ok(());
        }
        // Detach the VMAs under the write lock, then downgrade and zap under the read lock, as
        // do_vmi_align_munmap does (mm/vma.c): device faults holding mmap_lock for reading can run alongside
        // the zap and its invalidation.
        self.mms().remove_vmas(pid, r);
        let _r = g.downgrade();
        self.unmap_region(pid, r).await;
        Ok(())
    }

    /// Unmaps `r` with the write lock held (MAP_FIXED over existing mappings).
    pub(crate) async fn do_munmap(&self, pid: Pid, r: Range<Va>) {
        if self.mms().mm(pid).vmas_in(r).is_empty() {
            return;
        }
        self.mms().remove_vmas(pid, r);
        self.unmap_region(pid, r).await;
    }

    /// `unmap_region`: notifier UNMAP, zap, TLB shootdown, notifier end. The VMAs are already detached; a
    /// THP the range cuts was split when its VMA was (`vma_adjust_trans_huge` → `split_huge_pmd_address`,
    /// a CLEAR over its whole 2 MiB before the UNMAP).
    pub(crate) async fn unmap_region(&self, pid: Pid, r: Range<Va>) {
        self.split_huge_pmds_cut_by(pid, r).await;
        let nr = self.zap_notify(pid, r, NotifierEvent::Unmap).await;
        self.sim
            .trace("munmap", || format!("pid {} {r} ({nr} pages)", pid.0));
    }
}
