//! `mremap(2)`: growing and shrinking in place, moving (MREMAP_MAYMOVE / MREMAP_FIXED) the page-table
//! entries to a new range, and MREMAP_DONTUNMAP.
//!
//! Linux counterpart: mm/mremap.c (`mremap`, `move_vma`, `move_page_tables`).

use peerdma_core::{Errno, PAGE_SIZE, PMD_SIZE, PageSize, Pid, Range, Va};

use crate::kernel::{Kernel, TASK_SIZE};
use crate::mmu_notifier::NotifierEvent;
use crate::vma::VmFlags;

/// `mremap` flags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MremapFlags {
    /// MREMAP_MAYMOVE.
    pub maymove: bool,
    /// MREMAP_FIXED (with `new_addr`).
    pub fixed: bool,
    /// MREMAP_DONTUNMAP: keep the old VMA, empty.
    pub dontunmap: bool,
    /// The target of MREMAP_FIXED.
    pub new_addr: Option<Va>,
}

impl Kernel {
    /// `mremap(2)` with MREMAP_MAYMOVE, MREMAP_FIXED and MREMAP_DONTUNMAP (mm/mremap.c). Page-table entries
    /// move with the mapping — device-private entries included — inside an UNMAP invalidation of the old range.
    ///
    /// # Errors
    /// `EINVAL` for an unaligned address, a zero new length, FIXED or DONTUNMAP without MAYMOVE, DONTUNMAP with
    /// a size change, or overlapping ranges; `EFAULT` when the old range is not one mapped VMA; `ENOMEM` when
    /// growing in place is impossible without MAYMOVE.
    pub async fn mremap(
        &self,
        pid: Pid,
        old: Va,
        old_len: u64,
        new_len: u64,
        flags: MremapFlags,
    ) -> Result<Va, Errno> {
        self.spend(self.costs.syscall).await;
        let invalid = !old.is_page_aligned()
            || new_len == 0
            || (flags.fixed && !flags.maymove)
            || (flags.dontunmap && (!flags.maymove || old_len != new_len));
        if invalid {
            return Err(Errno::EINVAL);
        }
        let old_len = old_len
            .checked_next_multiple_of(PAGE_SIZE)
            .ok_or(Errno::EINVAL)?;
        let new_len = new_len
            .checked_next_multiple_of(PAGE_SIZE)
            .ok_or(Errno::EINVAL)?;
        let old_r = Range::from_len(old, old_len).ok_or(Errno::EINVAL)?;
        // The MREMAP_FIXED target's parameters are checked before the VMA is looked up (mm/mremap.c:
        // `check_mremap_params`, `mremap_to` in older kernels): an unaligned, out-of-range or overlapping
        // target is EINVAL even when the old range is not mapped.
        let fixed_target = match flags.new_addr.filter(|_| flags.fixed) {
            Some(to) => {
                let t = Range::from_len(to, new_len).ok_or(Errno::EINVAL)?;
                if !to.is_page_aligned() || t.overlaps(&old_r) || t.end.raw() > TASK_SIZE {
                    return Err(Errno::EINVAL);
                }
                Some(t)
            }
            None => None,
        };
        let lock = self.mmap_lock(pid);
        let _g = lock.write().await;
        let vma = self.mms().mm(pid).vma(old).cloned().ok_or(Errno::EFAULT)?;
        if !vma.range.contains_range(&old_r) {
            return Err(Errno::EFAULT);
        }
        // vma_to_resize (mm/mremap.c): a remap_pfn_range mapping (VM_PFNMAP, and VM_DONTEXPAND) cannot grow.
        if new_len > old_len && vma.flags.contains(VmFlags::PFNMAP) {
            return Err(Errno::EFAULT);
        }
        // MREMAP_DONTUNMAP always moves (`mremap_to`), to `new_addr` with MREMAP_FIXED or else to a fresh
        // unmapped area, leaving the old range mapped and empty.
        if !flags.fixed && !flags.dontunmap && new_len <= old_len {
            if new_len < old_len {
                let tail = Range::new(old.add(new_len), old_r.end);
                self.do_munmap(pid, tail).await;
            }
            return Ok(old);
        }
        let target = if let Some(t) = fixed_target {
            self.do_munmap(pid, t).await;
            t.start
        } else if flags.dontunmap {
            self.find_gap(pid, None, new_len, PAGE_SIZE)
                .ok_or(Errno::ENOMEM)?
        } else {
            let grow = Range::new(old_r.end, old.add(new_len));
            if vma.range.end == old_r.end
                && self.mms().mm(pid).vmas_in(grow).is_empty()
                && grow.end.raw() <= TASK_SIZE
            {
                let mut st = self.mms();
                let v = st
                    .mm_mut(pid)
                    .vma_mut(vma.range.start)
                    .expect("looked up above");
                v.range.end = grow.end;
                return Ok(old);
            }
            if !flags.maymove {
                return Err(Errno::ENOMEM);
            }
            self.find_gap(pid, None, new_len, PAGE_SIZE)
                .ok_or(Errno::ENOMEM)?
        };
        let moved = old_len.min(new_len);
        // A move that shrinks unmaps the old tail first (`mremap_to`, mm/mremap.c: after the FIXED target's
        // munmap, before `move_vma`), so its entries are zapped inside their own UNMAP invalidation rather
        // than left behind when the old VMA goes.
        if !flags.dontunmap && old_len > new_len {
            self.do_munmap(pid, Range::new(old.add(moved), old_r.end))
                .await;
        }
        let src = Range::from_len(old, moved).expect("inside old range");
        self.invalidate_range_start(pid, src, NotifierEvent::Unmap, None)
            .await;
        // move_page_tables: a PMD leaf moves whole only when it lies wholly inside the moved range and its
        // new place is 2 MiB aligned; any other is split first (`split_huge_pmd`, a CLEAR of its 2 MiB).
        let leaves = self.mms().mm(pid).pt().leaves(src.start, src.end);
        for leaf in leaves {
            if leaf.size == PageSize::Size4K {
                continue;
            }
            let inside = leaf.base >= src.start && leaf.base.add(PMD_SIZE) <= src.end;
            let aligned = inside && target.add(leaf.base.raw() - old.raw()).is_aligned(PMD_SIZE);
            if !aligned {
                self.split_huge_pmd(pid, leaf.base).await;
            }
        }
        {
            let mut st = self.mms();
            let mut oracle = self.oracle();
            for leaf in st.mm(pid).pt().leaves(src.start, src.end) {
                let off = leaf.base.raw() - old.raw();
                st.mm_mut(pid).pt_mut().clear(leaf.base);
                st.mm_mut(pid)
                    .pt_mut()
                    .set_leaf(target.add(off), leaf.size, leaf.pte);
            }
            let new_vma = vma.slice(Range::from_len(old, moved).expect("inside"));
            let mut nv = new_vma.clone();
            nv.range = Range::from_len(target, new_len).expect("checked above");
            if !flags.dontunmap {
                st.remove_vmas(pid, src);
            }
            st.insert_vma(pid, nv);
            oracle.move_anon(pid, src, target);
        }
        self.spend(self.costs.tlb_shootdown).await;
        self.invalidate_range_end(pid);
        self.sim
            .trace("mremap", || format!("pid {} {old_r} -> {target}", pid.0));
        Ok(target)
    }
}
