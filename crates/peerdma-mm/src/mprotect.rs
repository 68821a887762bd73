//! `mprotect(2)`: changing a range's protection, splitting VMAs at its edges and write-protecting the
//! page-table entries inside a PROTECTION_VMA invalidation.
//!
//! Linux counterpart: mm/mprotect.c (`do_mprotect_pkey`, `mprotect_fixup`, `change_protection`).

use peerdma_core::{Errno, Pid, Range, Va};

use crate::kernel::{Kernel, check_range};
use crate::notifier::NotifierEvent;
use crate::vma::{Prot, VmFlags};

impl Kernel {
    /// `mprotect(2)`.
    ///
    /// # Errors
    /// `EINVAL` for an unaligned address or a range outside user space; `ENOMEM` when part of the range is
    /// not mapped.
    pub async fn mprotect(&self, pid: Pid, addr: Va, len: u64, prot: Prot) -> Result<(), Errno> {
        self.spend(self.costs.syscall).await;
        if len == 0 && addr.is_page_aligned() {
            return Ok(());
        }
        let r = check_range(addr, len)?;
        let lock = self.mmap_lock(pid);
        let _g = lock.write().await;
        if !self.state().mm(pid).fully_mapped(r) {
            return Err(Errno::ENOMEM);
        }
        let has_leaves = !self.state().mm(pid).pt.leaves(r.start, r.end).is_empty();
        if has_leaves {
            self.invalidate_range_start(pid, r, NotifierEvent::ProtectionVma, None)
                .await;
        }
        {
            let mut st = self.state();
            for start in st.split_at(pid, r) {
                let mm = st.mm_mut(pid);
                let v = mm
                    .vmas
                    .get_mut(&start)
                    .expect("split_at returns VMA starts");
                v.flags = (v.flags - VmFlags::PROT) | prot.vm_flags();
            }
            // change_protection: removing write permission write-protects the entries; adding it does not make
            // them writable (the next write fault decides, COW included).
            if !prot.write {
                for leaf in st.mm(pid).pt.leaves(r.start, r.end) {
                    let leaf_range =
                        Range::from_len(leaf.base, leaf.size.bytes()).expect("in user space");
                    if r.contains_range(&leaf_range) {
                        st.mm_mut(pid).pt.set_leaf(
                            leaf.base,
                            leaf.size,
                            leaf.pte.with_write(false),
                        );
                    } else {
                        st.mm_mut(pid).pt.split_pmd(leaf.base);
                        for page in leaf_range.intersection(&r).expect("overlaps").pages() {
                            if let Some(l) = st.mm(pid).pt.lookup(page) {
                                st.mm_mut(pid).pt.set_pte(page, l.pte.with_write(false));
                            }
                        }
                    }
                }
            }
        }
        if has_leaves {
            self.spend(self.costs.tlb_shootdown).await;
            self.invalidate_range_end(pid);
        }
        self.sim
            .trace("mprotect", || format!("pid {} {r} {prot:?}", pid.0));
        Ok(())
    }
}
