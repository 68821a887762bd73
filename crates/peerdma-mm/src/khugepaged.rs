//! Collapsing 512 base pages into a transparent huge page (`MADV_COLLAPSE`; there is no background
//! khugepaged thread in the model).
//!
//! Linux counterpart: mm/khugepaged.c (`madvise_collapse`, `collapse_huge_page`).

use peerdma_core::{FrameId, PAGE_SIZE, PMD_SIZE, PageSize, Pid, Range, Va};

use crate::kernel::Kernel;
use crate::mmu_notifier::NotifierEvent;
use crate::pagetable::Pte;
use crate::phys::FrameOwner;

impl Kernel {
    /// `MADV_COLLAPSE` (mm/khugepaged.c): every 2 MiB-aligned block inside `r` of a private anonymous VMA whose
    /// 512 entries are all present, normal, exclusive anonymous pages is copied into a new THP and remapped by a
    /// PMD leaf, inside a CLEAR invalidation. Blocks that do not qualify are left as they are.
    pub(crate) async fn collapse_range(&self, pid: Pid, r: Range<Va>) {
        let mut block = r.start.align_up(PMD_SIZE).unwrap_or(r.end);
        while block.raw().saturating_add(PMD_SIZE) <= r.end.raw() {
            let b = Range::from_len(block, PMD_SIZE).expect("inside r");
            let frames: Option<Vec<FrameId>> = {
                let st = self.mms();
                let phys = self.phys();
                let mm = st.mm(pid);
                let anon = mm
                    .vma(block)
                    .is_some_and(|v| v.is_anonymous() && v.range.contains_range(&b));
                let leaves = mm.pt().leaves(b.start, b.end);
                let ok = anon
                    && leaves.len() == 512
                    && leaves.iter().all(|l| {
                        l.size == PageSize::Size4K
                            && matches!(l.pte, Pte::Present { frame, special: false, .. }
                                if phys.frame(frame).owner() == FrameOwner::Anon
                                    && phys.frame(frame).mapcount == 1
                                    && phys.frame(frame).refcount == 1)
                    });
                ok.then(|| leaves.iter().filter_map(|l| l.pte.frame()).collect())
            };
            if let Some(frames) = frames {
                let head = {
                    let st = self.mms();
                    let mut phys = self.phys();
                    let home = st.home_node(pid);
                    let zone = st.anon_zone(pid);
                    phys.alloc_pmd_node_in(home, FrameOwner::Anon, zone)
                };
                if let Ok(head) = head {
                    self.invalidate_range_start(pid, b, NotifierEvent::Clear, None)
                        .await;
                    {
                        let mut st = self.mms();
                        let mut phys = self.phys();
                        for (i, f) in frames.iter().enumerate() {
                            let dst = FrameId(head.0 + i as u64);
                            phys.copy_frame(*f, dst);
                            let d = phys.frame_mut(dst);
                            d.mapcount = 1;
                            d.set_anon_vma(pid);
                            st.mm_mut(pid)
                                .pt_mut()
                                .clear(block.add(i as u64 * PAGE_SIZE));
                            phys.unmap_frame(*f);
                        }
                        st.mm_mut(pid).pt_mut().set_pmd(
                            block,
                            Pte::Present {
                                frame: head,
                                write: true,
                                special: false,
                            },
                        );
                    }
                    self.spend(self.costs.page_copy.saturating_mul(512)).await;
                    self.invalidate_range_end(pid);
                    self.sim.count("thp.collapse", 1);
                }
            }
            block = block.add(PMD_SIZE);
        }
    }
}
