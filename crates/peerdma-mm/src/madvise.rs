//! `madvise(2)`: MADV_DONTNEED (zap inside a CLEAR invalidation), MADV_FREE, MADV_HUGEPAGE /
//! MADV_NOHUGEPAGE (VMA flags) and MADV_COLLAPSE (handed to [`crate::khugepaged`]).
//!
//! Linux counterpart: mm/madvise.c (`madvise_dontneed_free`, `madvise_behavior`).

use peerdma_core::{Errno, Pid, Va};

use crate::kernel::{Kernel, check_range};
use crate::mmu_notifier::NotifierEvent;
use crate::vma::VmFlags;

/// `madvise` advice values the model implements (defined in `peerdma-core`).
pub use peerdma_core::Advice;

impl Kernel {
    /// `madvise(2)` with MADV_DONTNEED, MADV_HUGEPAGE or MADV_NOHUGEPAGE.
    ///
    /// # Errors
    /// `EINVAL` for an unaligned address; `ENOMEM` when part of the range is not mapped (MADV_DONTNEED still
    /// zaps the mapped parts, as mm/madvise.c does).
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
            }
            Advice::Collapse => {
                let _g = lock.read().await;
                if !self.mms().mm(pid).fully_mapped(r) {
                    return Err(Errno::ENOMEM);
                }
                self.collapse_range(pid, r).await;
            }
            Advice::HugePage | Advice::NoHugePage => {
                let _g = lock.write().await;
                if !self.mms().mm(pid).fully_mapped(r) {
                    return Err(Errno::ENOMEM);
                }
                let mut st = self.mms();
                for start in st.split_at(pid, r) {
                    let v = st
                        .mm_mut(pid)
                        .vma_mut(start)
                        .expect("split_at returns VMA starts");
                    if advice == Advice::HugePage {
                        v.flags = (v.flags - VmFlags::NOHUGEPAGE) | VmFlags::HUGEPAGE;
                    } else {
                        v.flags = (v.flags - VmFlags::HUGEPAGE) | VmFlags::NOHUGEPAGE;
                    }
                }
            }
        }
        Ok(())
    }
}
