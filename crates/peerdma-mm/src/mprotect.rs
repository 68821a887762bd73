//! `mprotect(2)`: changing a range's protection, splitting VMAs at its edges and write-protecting the
//! page-table entries inside a PROTECTION_VMA invalidation.
//!
//! Linux counterpart: mm/mprotect.c (`do_mprotect_pkey`, `mprotect_fixup`, `change_protection`).

use peerdma_core::{Errno, Pid, Va};

use crate::file::PageCache;
use crate::kernel::{Kernel, Mms, check_range};
use crate::mmu_notifier::NotifierEvent;
use crate::pagetable::Pte;
use crate::phys::{FrameOwner, PhysMem};
use crate::vma::{Prot, VmFlags, VmaBacking};

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
            // change_pmd_range: a THP the range cuts is split (inside a CLEAR of its whole 2 MiB).
            self.split_huge_pmds_cut_by(pid, r).await;
        }
        {
            let mut st = self.mms();
            for start in st.split_at(pid, r) {
                let mm = st.mm_mut(pid);
                let v = mm.vma_mut(start).expect("split_at returns VMA starts");
                v.flags = (v.flags - VmFlags::PROT) | VmFlags::from(prot);
            }
            // change_pte_range: removing write permission write-protects the entries. A writable
            // device-private or migration entry becomes read-only whatever the new protection (the next
            // device write faults again).
            let mut cursor = st.mm_mut(pid).pt_mut().cursor_mut(r);
            while cursor.find_next().is_some() {
                cursor.protect(|pte| match pte {
                    Pte::DevicePrivate { .. } | Pte::Migration { .. } => pte.with_write(false),
                    _ if !prot.write => pte.with_write(false),
                    _ => pte,
                });
            }
            // Adding write permission (MM_CP_TRY_CHANGE_WRITABLE, `can_change_pte_writable`): a present
            // entry becomes writable at once where no write fault is needed — an exclusive anonymous page of
            // a private mapping, any page of a shared mapping without write-notify (shmem); others wait for
            // the next write fault (COW, or the file system's dirty tracking).
            if prot.write {
                st.make_writable_where_no_fault_needed(&self.phys(), &self.files(), pid, r);
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

impl Mms {
    /// The MM_CP_TRY_CHANGE_WRITABLE pass of `change_pte_range` over `r` of `pid` (mm/mprotect.c): makes
    /// writable each present, read-only entry that `can_change_pte_writable` allows — in a private mapping
    /// an exclusive anonymous page (not the zero page, not a page-cache page, not one shared after fork);
    /// in a shared mapping of a file without dirty tracking (shmem, tmpfs, shared anonymous memory), every
    /// page. A PMD leaf is made writable only when all of its pages qualify.
    fn make_writable_where_no_fault_needed(
        &mut self,
        phys: &PhysMem,
        files: &PageCache,
        pid: Pid,
        r: peerdma_core::Range<Va>,
    ) {
        let zero = phys.zero_page();
        let leaves = self.mm(pid).pt().leaves(r.start, r.end);
        for leaf in leaves {
            let Pte::Present {
                frame,
                write: false,
                special: false,
            } = leaf.pte
            else {
                continue;
            };
            let Some(vma) = self.mm(pid).vma(leaf.base).cloned() else {
                continue;
            };
            // hugetlb_change_protection has no such pass: a private hugetlb page waits for its fault.
            if !vma.flags.contains(VmFlags::WRITE)
                || (vma.flags.contains(VmFlags::HUGETLB) && !vma.is_shared())
            {
                continue;
            }
            let ok = if vma.is_shared() {
                matches!(vma.backing, VmaBacking::File { file, .. } if files.file(file).is_shmem())
            } else {
                let nr = leaf.size.bytes() / peerdma_core::PAGE_SIZE;
                (0..nr).all(|i| {
                    let f = peerdma_core::FrameId(frame.0 + i);
                    f != zero
                        && phys.frame(f).owner() == FrameOwner::Anon
                        && phys.frame(f).mapcount <= 1
                })
            };
            if ok {
                self.mm_mut(pid)
                    .pt_mut()
                    .set_leaf(leaf.base, leaf.size, leaf.pte.with_write(true));
            }
        }
    }
}
