//! `mprotect(2)`: changing a range's protection, splitting VMAs at its edges and write-protecting the
//! page-table entries inside a PROTECTION_VMA invalidation.
//!
//! Linux counterpart: mm/mprotect.c (`do_mprotect_pkey`, `mprotect_fixup`, `change_protection`).

use peerdma_core::{Errno, Pid, Va};

use crate::kernel::{Kernel, check_range};
use crate::mmu_notifier::NotifierEvent;
use crate::vma::{Prot, VmFlags};

impl Kernel {
    /// `mprotect(2)`.
    ///
    /// # Errors
    /// `EINVAL` for an unaligned address or a range outside user space; `ENOMEM` when part of the range is
    /// not mapped (after changing the VMAs before the first hole, as mm/mprotect.c does).
    pub async fn mprotect(&self, pid: Pid, addr: Va, len: u64, prot: Prot) -> Result<(), Errno> {
        self.spend(self.costs.syscall).await;
        if len == 0 && addr.is_page_aligned() {
            return Ok(());
        }
        let r = check_range(addr, len)?;
        let lock = self.mmap_lock(pid);
        let _g = lock.write().await;
        // do_mprotect_pkey: ENOMEM at once when the first page is unmapped; otherwise the VMAs up to the
        // first hole change and the call still fails with ENOMEM.
        let end = self.mms().mm(pid).mapped_prefix_end(r);
        if end == r.start {
            return Err(Errno::ENOMEM);
        }
        let hole = end < r.end;
        let r = peerdma_core::Range::new(r.start, end);
        let has_leaves = self.mms().mm(pid).pt().cursor(r).next().is_some();
        if has_leaves {
            self.invalidate_range_start(pid, r, NotifierEvent::ProtectionVma, None)
                .await;
        }
        {
            let mut st = self.mms();
            for start in st.split_at(pid, r) {
                let mm = st.mm_mut(pid);
                let v = mm.vma_mut(start).expect("split_at returns VMA starts");
                v.flags = (v.flags - VmFlags::PROT) | VmFlags::from(prot);
            }
            // change_protection: removing write permission write-protects the entries; adding it does not make
            // them writable (the next write fault decides, COW included).
            if !prot.write {
                let mut cursor = st.mm_mut(pid).pt_mut().cursor_mut(r);
                while cursor.find_next().is_some() {
                    cursor.protect(|pte| pte.with_write(false));
                }
            }
        }
        if has_leaves {
            self.spend(self.costs.tlb_shootdown).await;
            self.invalidate_range_end(pid);
        }
        self.sim
            .trace("mprotect", || format!("pid {} {r} {prot}", pid.0));
        if hole { Err(Errno::ENOMEM) } else { Ok(()) }
    }
}
