//! `madvise(2)`: MADV_DONTNEED (zap inside a CLEAR invalidation), MADV_FREE (a CLEAR invalidation; the pages
//! stay), MADV_COLD / MADV_PAGEOUT (handed to [`crate::vmscan`]), MADV_HUGEPAGE / MADV_NOHUGEPAGE and
//! MADV_DONTFORK / MADV_DOFORK (VMA flags) and MADV_COLLAPSE (handed to [`crate::khugepaged`]).
//!
//! Linux counterpart: mm/madvise.c (`madvise_dontneed_free`, `madvise_behavior`).

use peerdma_core::{Errno, Pid, Va};

use crate::kernel::{Kernel, check_range};
use crate::mmu_notifier::NotifierEvent;
use crate::vma::VmFlags;

/// `madvise` advice values the model implements (defined in `peerdma-core`).
pub use peerdma_core::Advice;

impl Kernel {
    /// `madvise(2)` with one of the [`Advice`] values.
    ///
    /// # Errors
    /// `EINVAL` for an unaligned address, for MADV_DONTNEED of a PFNMAP mapping, MADV_FREE outside private
    /// anonymous memory, MADV_COLD / MADV_PAGEOUT of a PFNMAP or hugetlb mapping and MADV_DOFORK of a VM_IO
    /// one; `ENOMEM` when part of the range is not mapped (MADV_DONTNEED still zaps the mapped parts, as
    /// mm/madvise.c does).
    pub async fn madvise(&self, pid: Pid, addr: Va, len: u64, advice: Advice) -> Result<(), Errno> {
        self.spend(self.costs.syscall).await;
        let r = check_range(addr, len)?;
        let lock = self.mmap_lock(pid);
        match advice {
            Advice::DontNeed => {
                let _g = lock.read().await;
                let vmas = self.mms().mm(pid).vmas_in(r);
                if vmas.is_empty() {
                    return Err(Errno::ENOMEM);
                }
                // madvise_dontneed_free_valid_vma (mm/madvise.c): raw PFN mappings cannot be zapped this way.
                if vmas.iter().any(|v| v.flags.contains(VmFlags::PFNMAP)) {
                    return Err(Errno::EINVAL);
                }
                // madvise_walk_vmas: every VMA in the range is zapped; a hole only makes the result ENOMEM.
                let fully = self.mms().mm(pid).fully_mapped(r);
                for v in vmas {
                    let part = peerdma_core::Range::new(
                        v.range.start.max(r.start),
                        v.range.end.min(r.end),
                    );
                    self.zap_notify(pid, part, NotifierEvent::Clear).await;
                }
                if !fully {
                    return Err(Errno::ENOMEM);
                }
            }
            Advice::Free => {
                let _g = lock.read().await;
                if !self.mms().mm(pid).fully_mapped(r) {
                    return Err(Errno::ENOMEM);
                }
                // madvise_free_single_vma: private anonymous memory only.
                if self
                    .mms()
                    .mm(pid)
                    .vmas_in(r)
                    .iter()
                    .any(|v| !v.is_anonymous() || v.is_shared())
                {
                    return Err(Errno::EINVAL);
                }
                // The pages stay mapped (clean, lazily freeable: *coarse*, the model never reclaims them
                // as lazyfree), but the walk runs under an MMU_NOTIFY_CLEAR invalidation of the range, so
                // mirrors drop it.
                self.invalidate_range_start(pid, r, NotifierEvent::Clear, None)
                    .await;
                self.split_huge_pmds_cut_by(pid, r).await;
                self.invalidate_range_end(pid);
            }
            Advice::Cold | Advice::PageOut => {
                let _g = lock.read().await;
                if !self.mms().mm(pid).fully_mapped(r) {
                    return Err(Errno::ENOMEM);
                }
                // can_madv_lru_vma (mm/madvise.c): VM_LOCKED (not modelled), VM_PFNMAP and hugetlb are refused.
                if self
                    .mms()
                    .mm(pid)
                    .vmas_in(r)
                    .iter()
                    .any(|v| v.flags.intersects(VmFlags::PFNMAP | VmFlags::HUGETLB))
                {
                    return Err(Errno::EINVAL);
                }
                self.cold_or_pageout(pid, r, advice == Advice::PageOut)
                    .await;
            }
            Advice::Collapse => {
                let _g = lock.read().await;
                if !self.mms().mm(pid).fully_mapped(r) {
                    return Err(Errno::ENOMEM);
                }
                self.collapse_range(pid, r).await;
            }
            Advice::HugePage | Advice::NoHugePage | Advice::DontFork | Advice::DoFork => {
                let _g = lock.write().await;
                if !self.mms().mm(pid).fully_mapped(r) {
                    return Err(Errno::ENOMEM);
                }
                // madvise_vma_behavior: MADV_DOFORK cannot clear VM_DONTCOPY of a VM_IO mapping.
                if advice == Advice::DoFork
                    && self
                        .mms()
                        .mm(pid)
                        .vmas_in(r)
                        .iter()
                        .any(|v| v.flags.contains(VmFlags::IO))
                {
                    return Err(Errno::EINVAL);
                }
                let mut st = self.mms();
                for start in st.split_at(pid, r) {
                    let v = st
                        .mm_mut(pid)
                        .vma_mut(start)
                        .expect("split_at returns VMA starts");
                    v.flags = match advice {
                        Advice::HugePage => (v.flags - VmFlags::NOHUGEPAGE) | VmFlags::HUGEPAGE,
                        Advice::NoHugePage => (v.flags - VmFlags::HUGEPAGE) | VmFlags::NOHUGEPAGE,
                        Advice::DontFork => v.flags | VmFlags::DONTCOPY,
                        _ => v.flags - VmFlags::DONTCOPY,
                    };
                }
            }
        }
        Ok(())
    }
}
