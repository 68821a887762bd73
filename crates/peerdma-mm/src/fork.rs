//! `fork` and `exit`: copying an address space (VMAs and page-table leaves, COW write-protection inside a
//! PROTECTION_PAGE invalidation, the copy of pinned anonymous pages, swap and migration entries) and
//! tearing one down.
//!
//! Linux counterpart: kernel/fork.c `dup_mm` → mm/mmap.c `dup_mmap` → mm/memory.c `copy_page_range` /
//! `copy_present_pte` (with `folio_try_dup_anon_rmap` refusing to share a maybe-pinned page), and
//! kernel/exit.c → mm/mmap.c `exit_mmap`.

use std::collections::BTreeSet;

use peerdma_core::{Errno, FrameId, PMD_SIZE, PageSize, Pid, Range, Va};

use crate::kernel::{Kernel, Mms, TASK_SIZE};
use crate::mmu_notifier::NotifierEvent;
use crate::pagetable::{Leaf, Pte};
use crate::phys::{FRAMES_PER_PMD, FrameOwner, GfpZone, PhysMem};
use crate::vma::{VmFlags, Vma, VmaBacking};
use crate::vmscan::Swap;

impl Kernel {
    /// `fork(2)`: copies the address space with copy-on-write for private mappings. Returns the child's pid.
    ///
    /// Private writable pages are write-protected in the parent, which fires MMU_NOTIFY_PROTECTION_PAGE over
    /// each COW VMA whose page tables must be copied (mm/memory.c `copy_page_range`; hugetlb's copy fires
    /// MMU_NOTIFY_CLEAR). An anonymous exclusive page that may be DMA-pinned is copied for the child at once
    /// instead (`copy_present_page`), so the pinned page stays the parent's — a pinned THP is split and
    /// copied (`copy_huge_pmd`), a pinned hugetlb page copied whole (`copy_hugetlb_page_range`).
    pub async fn fork(&self, pid: Pid) -> Result<Pid, Errno> {
        self.spend(self.costs.syscall).await;
        let lock = self.mmap_lock(pid);
        let _g = lock.write().await;
        // The child runs where the parent ran: it inherits the home node (and Linux's mempolicy).
        let home = self.home_node(pid);
        let child = self.mms().create(&self.sim, home);
        self.mms().scopes_mut().note_fork(pid, child);
        let vmas: Vec<Vma> = self.mms().mm(pid).vmas().values().cloned().collect();
        let mut copies = 0u64;
        for vma in vmas {
            if vma.flags.contains(VmFlags::DONTCOPY) {
                continue;
            }
            self.mms().insert_vma(child, vma.clone());
            // vma_needs_copy (mm/memory.c): only a mapping with an anon_vma, or a PFNMAP/MIXEDMAP one, has
            // its page tables copied; any other (a private file mapping never written, anonymous memory only
            // ever read, shmem) is refaulted by the child, and fork tells its notifiers nothing.
            let needs_copy = vma
                .flags
                .intersects(VmFlags::ANON_VMA | VmFlags::PFNMAP | VmFlags::MIXEDMAP)
                || !matches!(vma.backing, VmaBacking::Anon | VmaBacking::File { .. });
            if !needs_copy {
                continue;
            }
            let cow = !vma.is_shared();
            let hugetlb = vma.flags.contains(VmFlags::HUGETLB);
            // copy_page_range fires MMU_NOTIFY_PROTECTION_PAGE over a COW mapping whether or not a page in
            // it is still writable; copy_hugetlb_page_range fires MMU_NOTIFY_CLEAR.
            let event = cow.then_some(if hugetlb {
                NotifierEvent::Clear
            } else {
                NotifierEvent::ProtectionPage
            });
            if let Some(event) = event {
                self.invalidate_range_start(pid, vma.range, event, None)
                    .await;
            }
            // copy_huge_pmd: a THP that may be pinned cannot be shared with the child; its PMD is split and
            // its pages are copied for the child one by one (the pin counts for the whole folio).
            let mut pinned_thps = BTreeSet::new();
            if cow && !hugetlb {
                let huge: Vec<Va> = {
                    let st = self.mms();
                    let phys = self.phys();
                    st.mm(pid)
                        .pt()
                        .leaves(vma.range.start, vma.range.end)
                        .into_iter()
                        .filter(|l| l.size == PageSize::Size2M && thp_maybe_pinned(&phys, *l))
                        .map(|l| l.base)
                        .collect()
                };
                for base in huge {
                    self.split_huge_pmd(pid, base).await;
                    pinned_thps.insert(base);
                }
            }
            let leaves = self
                .mms()
                .mm(pid)
                .pt()
                .leaves(vma.range.start, vma.range.end);
            {
                let mut st = self.mms();
                let mut phys = self.phys();
                let mut swap = self.swap();
                let mut oracle = self.oracle();
                for leaf in leaves {
                    let force = pinned_thps.contains(&leaf.base.align_down(PMD_SIZE));
                    copies += st.copy_leaf(&mut phys, &mut swap, pid, child, &vma, leaf, force);
                }
                if cow {
                    oracle.copy_anon(pid, child, vma.range);
                }
            }
            if event.is_some() {
                self.invalidate_range_end(pid);
            }
        }
        self.spend(self.costs.page_copy.saturating_mul(copies))
            .await;
        self.sim
            .trace("fork", || format!("pid {} -> {}", pid.0, child.0));
        Ok(child)
    }

    /// Tears the address space down at exit: MMU_NOTIFY_RELEASE to every interval, then every mapping goes.
    pub async fn exit(&self, pid: Pid) {
        let lock = self.mmap_lock(pid);
        let _g = lock.write().await;
        if !self.mms().mm(pid).is_alive() {
            return;
        }
        let all = Range::new(Va::from_raw(0), Va::from_raw(u64::MAX));
        self.invalidate_range_start(pid, all, NotifierEvent::Release, None)
            .await;
        {
            let mut st = self.mms();
            let mut phys = self.phys();
            let mut swap = self.swap();
            let mut oracle = self.oracle();
            st.zap_range(
                &mut phys,
                &mut swap,
                pid,
                Range::new(Va::from_raw(0), Va::from_raw(TASK_SIZE)),
            );
            st.mm_mut(pid).clear_vmas();
            st.mm_mut(pid).mark_exited();
            oracle.forget_anon(pid, all);
        }
        self.invalidate_range_end(pid);
        self.sim.trace("exit", || format!("pid {}", pid.0));
    }
}

/// Returns whether some page of the anonymous PMD-mapped folio of `leaf` may be DMA-pinned
/// (`folio_maybe_dma_pinned` of the whole folio).
fn thp_maybe_pinned(phys: &PhysMem, leaf: Leaf) -> bool {
    let Some(head) = leaf.pte.frame() else {
        return false;
    };
    matches!(leaf.pte, Pte::Present { special: false, .. })
        && (0..FRAMES_PER_PMD).any(|i| {
            let f = phys.frame(FrameId(head.0 + i));
            f.owner() == FrameOwner::Anon && f.maybe_dma_pinned()
        })
}

impl Mms {
    /// Copies one leaf from `parent` to `child` for fork; returns the number of pages copied eagerly.
    /// `force`: the page belongs to a folio that may be pinned, so an exclusive anonymous page is copied
    /// for the child even if this page itself holds no pin.
    #[expect(
        clippy::too_many_arguments,
        reason = "the cells fork borrows, the two processes, the VMA, the leaf and the folio's pin state"
    )]
    pub(crate) fn copy_leaf(
        &mut self,
        phys: &mut PhysMem,
        swap: &mut Swap,
        parent: Pid,
        child: Pid,
        vma: &Vma,
        leaf: Leaf,
        force: bool,
    ) -> u64 {
        if let Pte::Swap { slot, write } = leaf.pte {
            // A swap entry is shared by parent and child (swap_duplicate), read-only for COW.
            swap.dup(slot);
            let cow = !vma.is_shared();
            self.mm_mut(child).pt_mut().set_pte(
                leaf.base,
                Pte::Swap {
                    slot,
                    write: write && !cow,
                },
            );
            if cow && write {
                self.mm_mut(parent)
                    .pt_mut()
                    .set_pte(leaf.base, Pte::Swap { slot, write: false });
            }
            return 0;
        }
        let mut leaf = leaf;
        if let Pte::DeviceExclusive { frame, write } = leaf.pte {
            // Current kernels restore a device-exclusive entry before copying it (spec §1.7); fork's
            // PROTECTION_PAGE invalidation has already told the device.
            let pte = Pte::Present {
                frame,
                write,
                special: false,
            };
            self.mm_mut(parent).pt_mut().set_pte(leaf.base, pte);
            leaf.pte = pte;
        }
        if let Pte::DevicePrivate { frame, write } | Pte::Migration { frame, write } = leaf.pte {
            // copy_nonpresent_pte: device-private entries are copied as such (spec §1.6), and so are the
            // migration entries a migration that reaches this process through the rmap walk, without its
            // mmap_lock (crate::migrate_device, migrate_vma's unmap step), leaves for fork to meet (its finalize
            // finds both through the rmap walk). For COW both sides become read-only.
            for i in 0..leaf.size.nr_pages() {
                phys.map_frame(FrameId(frame.0 + i));
            }
            let cow = !vma.is_shared();
            self.mm_mut(child).pt_mut().set_leaf(
                leaf.base,
                leaf.size,
                leaf.pte.with_write(write && !cow),
            );
            if cow && write {
                self.mm_mut(parent).pt_mut().set_leaf(
                    leaf.base,
                    leaf.size,
                    leaf.pte.with_write(false),
                );
            }
            return 0;
        }
        let Pte::Present {
            frame,
            write,
            special,
        } = leaf.pte
        else {
            // Other non-present entries are not produced by fork's callers yet.
            return 0;
        };
        if special {
            self.mm_mut(child).pt_mut().set_pte(leaf.base, leaf.pte);
            return 0;
        }
        let cow = !vma.is_shared();
        if cow
            && leaf.size == PageSize::Size2M
            && vma.flags.contains(VmFlags::HUGETLB)
            && thp_maybe_pinned(phys, leaf)
        {
            // copy_hugetlb_page_range: a private hugetlb page that may be pinned is copied into a new
            // hugetlb page for the child at once; the parent keeps its entry as it was.
            let home = self.home_node(child);
            if let Ok(new) = phys.alloc_pmd_node_in(home, FrameOwner::Anon, GfpZone::Normal) {
                for i in 0..FRAMES_PER_PMD {
                    phys.copy_frame(FrameId(frame.0 + i), FrameId(new.0 + i));
                    let f = phys.frame_mut(FrameId(new.0 + i));
                    f.mapcount = 1;
                    f.set_anon_vma(child);
                }
                self.mm_mut(child).pt_mut().set_pmd(
                    leaf.base,
                    Pte::Present {
                        frame: new,
                        write,
                        special: false,
                    },
                );
                return FRAMES_PER_PMD;
            }
        }
        if cow && leaf.size == PageSize::Size4K {
            let f = phys.frame(frame);
            let pinned = f.maybe_dma_pinned()
                && !peerdma_core::mutation::active(
                    peerdma_core::mutation::Mutation::SkipPinCheckCow,
                );
            if f.owner() == FrameOwner::Anon && (force || pinned) && f.mapcount == 1 {
                // copy_present_page: the pinned page stays the parent's; the child gets a copy now.
                if let Ok(new) = self.alloc_anon_for(phys, child) {
                    phys.copy_frame(frame, new);
                    phys.frame_mut(new).mapcount = 1;
                    self.mm_mut(child).pt_mut().set_pte(
                        leaf.base,
                        Pte::Present {
                            frame: new,
                            write,
                            special: false,
                        },
                    );
                    return 1;
                }
            }
        }
        for i in 0..leaf.size.nr_pages() {
            phys.map_frame(FrameId(frame.0 + i));
        }
        let new_write = write && !cow;
        let child_pte = Pte::Present {
            frame,
            write: new_write,
            special: false,
        };
        let wp = leaf.pte.with_write(false);
        self.mm_mut(child)
            .pt_mut()
            .set_leaf(leaf.base, leaf.size, child_pte);
        if cow && write {
            self.mm_mut(parent)
                .pt_mut()
                .set_leaf(leaf.base, leaf.size, wp);
        }
        0
    }
}
