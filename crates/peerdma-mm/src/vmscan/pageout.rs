//! MADV_COLD and MADV_PAGEOUT: a process tells reclaim which of its pages it will not need soon.
//!
//! Linux counterparts: mm/madvise.c (`madvise_cold_or_pageout_pte_range`), mm/swap.c (`folio_deactivate`,
//! `lru_deactivate`), mm/vmscan.c (`reclaim_pages`, `shrink_folio_list` with `ignore_references`).
//!
//! The walk over the range, in order:
//! 1. **Huge PMDs.** A THP that another process maps too (`folio_maybe_mapped_shared`: after fork) is left
//!    alone, not even split. One the range covers only in part is split (`split_folio`: a CLEAR over its
//!    2 MiB) and its base pages are treated as below. One the range covers whole is deactivated as a folio
//!    by MADV_COLD (the model's THPs are on no LRU list, so only its young and referenced bits are
//!    cleared) and reclaimed by MADV_PAGEOUT, which the model does by splitting the PMD and reclaiming the
//!    base pages (Linux's `try_to_unmap` splits the PMD of an anonymous THP it swaps out too).
//! 2. **Base pages.** Skipped: holes, non-present entries, the zero page, device memory and pages another
//!    process maps (`mapcount > 1`). Each page left loses its `referenced` mark (`folio_clear_referenced`).
//!    - MADV_COLD also clears the PTE young bit, and moves a page on the **active** list to the head of the
//!      inactive list (`folio_deactivate` leaves an inactive page where it is), counted by
//!      `lru.deactivate`.
//!    - MADV_PAGEOUT isolates the page and reclaims it whatever its young bit says (`reclaim_pages` asks
//!      `shrink_folio_list` to ignore references): a page a migration holds locked goes back to the
//!      inactive list (the trylock fails), a page that may be DMA-pinned is activated (`try_to_unmap`
//!      refuses it: `activate_locked`), every other one is unmapped everywhere inside CLEAR invalidations
//!      and written to swap (`swap.out`). A page still allocated after that (a pin taken meanwhile) is
//!      activated too. Activations count in `lru.activate`.
//!
//! *Coarse:* only private anonymous pages are on the model's LRU lists, so page-cache pages (which Linux
//! deactivates, and reclaims when the process may write the file) and shmem pages are skipped. The model
//! keeps the pages of a THP (and a few others, such as fork's copies of pinned pages) on no list: MADV_COLD
//! moves none of them, MADV_PAGEOUT reclaims them all the same.

use std::collections::BTreeMap;

use peerdma_core::{FrameId, PMD_SIZE, PageSize, Pid, Range, Va};

use crate::kernel::Kernel;
use crate::pagetable::Pte;
use crate::phys::{FRAMES_PER_PMD, FrameOwner, LruState};

impl Kernel {
    /// MADV_COLD (`pageout` false) or MADV_PAGEOUT (`pageout` true) over `r` of `pid`, the caller holding
    /// `mmap_lock` for reading (the module docs give the rules). Returns the pages written to swap.
    pub(crate) async fn cold_or_pageout(&self, pid: Pid, r: Range<Va>, pageout: bool) -> u64 {
        self.cold_or_pageout_huge(pid, r, pageout).await;
        let mut victims: BTreeMap<FrameId, u64> = BTreeMap::new();
        let (mut deactivated, mut activated) = (0, 0);
        {
            let st = self.mms();
            let mut phys = self.phys();
            let mut swap = self.swap();
            let zero = phys.zero_page();
            for leaf in st.mm(pid).pt().leaves(r.start, r.end) {
                let Pte::Present {
                    frame,
                    special: false,
                    ..
                } = leaf.pte
                else {
                    continue;
                };
                // vm_normal_folio: no zero page; folio_is_zone_device: no device memory.
                if leaf.size != PageSize::Size4K || frame == zero {
                    continue;
                }
                let Some(node) = phys.node_of(frame) else {
                    continue;
                };
                let fr = phys.frame_mut(frame);
                // folio_maybe_mapped_shared: do not interfere with other mappings.
                if fr.owner() != FrameOwner::Anon || fr.mapcount > 1 {
                    continue;
                }
                fr.referenced = false;
                let lru = swap.lru.entry(node).or_default();
                if !pageout {
                    fr.accessed = false;
                    if lru.is_active(fr, frame) {
                        lru.add_head(fr, frame, false);
                        deactivated += 1;
                    }
                } else if fr.locked {
                    // reclaim_pages clears PG_active; shrink_folio_list's trylock fails: put back.
                    lru.add_head(fr, frame, false);
                } else if fr.maybe_dma_pinned() {
                    lru.add_head(fr, frame, true);
                    activated += 1;
                } else {
                    lru.remove(frame);
                    fr.lru = LruState::None;
                    victims.insert(frame, fr.generation);
                }
            }
        }
        let swapped = if victims.is_empty() {
            0
        } else {
            self.swap_out(&victims).await
        };
        {
            let mut phys = self.phys();
            let mut swap = self.swap();
            for (&frame, &generation) in &victims {
                let Some(node) = phys.node_of(frame) else {
                    continue;
                };
                let fr = phys.frame_mut(frame);
                if fr.owner() == FrameOwner::Anon
                    && fr.generation == generation
                    && fr.lru == LruState::None
                {
                    swap.lru.entry(node).or_default().add_head(fr, frame, true);
                    activated += 1;
                }
            }
        }
        self.spend(self.costs.swap_io.saturating_mul(swapped)).await;
        for (name, n) in [
            ("lru.deactivate", deactivated),
            ("lru.activate", activated),
            ("swap.out", swapped),
        ] {
            if n > 0 {
                self.sim.count(name, n);
            }
        }
        swapped
    }

    /// Step 1 of the module docs: the huge PMDs of `r`.
    async fn cold_or_pageout_huge(&self, pid: Pid, r: Range<Va>, pageout: bool) {
        let huge: Vec<(Va, FrameId)> = self
            .mms()
            .mm(pid)
            .pt()
            .leaves(r.start, r.end)
            .into_iter()
            .filter(|l| l.size == PageSize::Size2M)
            .filter_map(|l| match l.pte {
                Pte::Present {
                    frame,
                    special: false,
                    ..
                } => Some((l.base, frame)),
                _ => None,
            })
            .collect();
        for (base, head) in huge {
            let frames = (0..FRAMES_PER_PMD).map(|i| FrameId(head.0 + i));
            {
                let phys = self.phys();
                let fr = phys.frame(head);
                if fr.owner() != FrameOwner::Anon
                    || frames.clone().any(|f| phys.frame(f).mapcount > 1)
                {
                    continue;
                }
            }
            let whole = r.start <= base && base.raw() + PMD_SIZE <= r.end.raw();
            if whole && !pageout {
                let mut phys = self.phys();
                for f in frames {
                    let fr = phys.frame_mut(f);
                    fr.accessed = false;
                    fr.referenced = false;
                }
                continue;
            }
            self.split_huge_pmd(pid, base).await;
        }
    }
}
