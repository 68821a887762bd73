//! Reclaim and swap: when free RAM falls below a watermark, the oldest anonymous pages are written to a swap
//! device and their PTEs become swap entries; a later access swaps them back in.
//!
//! Linux counterparts: mm/vmscan.c (shrink_folio_list), mm/rmap.c (try_to_unmap), mm/swapfile.c, do_swap_page.
//! The reclaim pass, as numbered steps (run by the faulting task, like direct reclaim):
//! 1. Take victims from the head of the anonymous LRU (allocation order: the oldest first). Pages that may be
//!    DMA-pinned are rotated back (reclaim cannot unmap a pinned exclusive page), THP-mapped and freed ones
//!    are dropped from the list.
//! 2. Find every mapping of the victims by walking the page tables of all address spaces (the model has no
//!    rmap; MGLRU walks page tables too), and replace each mapping inside a CLEAR invalidation, so mirrors drop
//!    their translations before the page goes.
//! 3. Write the page to a swap slot (shared by every mapping, with a count) and free it.
//!
//! Simplifications: only private anonymous pages are reclaimed (clean page-cache pages are not dropped yet);
//! the LRU is a single FIFO (no active/inactive aging); there is no swap cache — each mapping that faults a
//! shared slot back in gets its own copy, read-only while the slot is still shared.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use peerdma_core::{FrameId, PAGE_SIZE, PageSize, Pid, Range, SimDuration, Va};

use crate::kernel::Kernel;
use crate::notifier::NotifierEvent;
use crate::pagetable::Pte;
use crate::phys::FrameOwner;

/// Free RAM pages below which a fault reclaims first.
pub const LOW_WATERMARK: u64 = 64;
/// Pages reclaimed per pass.
pub const RECLAIM_BATCH: u64 = 32;

/// One swap slot.
#[derive(Debug, Clone)]
struct Slot {
    data: Option<Box<[u8]>>,
    count: u32,
}

/// The swap device and the anonymous LRU.
#[derive(Debug, Default)]
pub struct Swap {
    slots: BTreeMap<u64, Slot>,
    next: u64,
    /// Anonymous pages in allocation order (head = oldest).
    pub(crate) lru: VecDeque<FrameId>,
}

impl Swap {
    /// Returns the number of slots in use.
    pub fn nr_slots(&self) -> usize {
        self.slots.len()
    }

    /// Adds a reference to `slot` (fork copying a swap entry).
    pub(crate) fn dup(&mut self, slot: u64) {
        if let Some(s) = self.slots.get_mut(&slot) {
            s.count += 1;
        }
    }

    /// Drops a reference to `slot` (a swap entry zapped or swapped in); frees it at zero.
    pub(crate) fn free(&mut self, slot: u64) {
        if let Some(s) = self.slots.get_mut(&slot) {
            s.count -= 1;
            if s.count == 0 {
                self.slots.remove(&slot);
            }
        }
    }

    /// Returns the slot's reference count.
    pub(crate) fn count(&self, slot: u64) -> u32 {
        self.slots.get(&slot).map_or(0, |s| s.count)
    }
}

/// Swap-device latency per 4 KiB page (spec/numbers.md §5: a major fault from NVMe is 80–200 µs [B]; the
/// write-out side is modelled with the same figure).
pub const SWAP_IO: SimDuration = SimDuration::from_micros(80);

impl Kernel {
    /// Runs a reclaim pass if free RAM is below [`LOW_WATERMARK`] (direct reclaim from the fault path).
    pub async fn reclaim_if_low(&self) {
        let free = self.state().phys.nr_free(0);
        if free < LOW_WATERMARK {
            self.reclaim(RECLAIM_BATCH).await;
        }
    }

    /// Reclaims up to `nr` anonymous pages to swap; returns how many were swapped out.
    pub async fn reclaim(&self, nr: u64) -> u64 {
        // Step 1: victims from the LRU head.
        let victims: BTreeSet<FrameId> = {
            let mut st = self.state();
            let mut victims = BTreeSet::new();
            let mut rotated = Vec::new();
            let budget = st.swap.lru.len();
            for _ in 0..budget {
                if victims.len() as u64 >= nr {
                    break;
                }
                let Some(f) = st.swap.lru.pop_front() else {
                    break;
                };
                let fr = st.phys.frame(f);
                if !fr.is_allocated() || fr.owner() != FrameOwner::Anon {
                    continue;
                }
                if fr.maybe_dma_pinned() {
                    rotated.push(f);
                    continue;
                }
                victims.insert(f);
            }
            st.swap.lru.extend(rotated);
            victims
        };
        if victims.is_empty() {
            return 0;
        }
        // Step 2: every 4 KiB mapping of a victim, in every address space.
        let mappings: Vec<(Pid, Va, FrameId, bool)> = {
            let st = self.state();
            let mut out = Vec::new();
            for mm in st.mms.values().filter(|m| m.alive) {
                for leaf in mm.pt.leaves(Va::from_raw(0), Va::from_raw(u64::MAX)) {
                    if let Pte::Present {
                        frame,
                        write,
                        special: false,
                    } = leaf.pte
                        && leaf.size == PageSize::Size4K
                        && victims.contains(&frame)
                    {
                        out.push((mm.pid, leaf.base, frame, write));
                    }
                }
            }
            out
        };
        let mut slots: BTreeMap<FrameId, u64> = BTreeMap::new();
        let mut swapped = 0;
        for (pid, va, frame, write) in mappings {
            let page = Range::from_len(va, PAGE_SIZE).expect("page in user space");
            self.invalidate_range_start(pid, page, NotifierEvent::Clear, None)
                .await;
            {
                let mut st = self.state();
                // The entry may have changed while the invalidation slept.
                let still = st
                    .mm(pid)
                    .pt
                    .lookup(va)
                    .is_some_and(|l| l.pte.frame() == Some(frame) && l.pte.is_present());
                if still && !st.phys.frame(frame).maybe_dma_pinned() {
                    let slot = if let Some(&s) = slots.get(&frame) {
                        st.swap.dup(s);
                        s
                    } else {
                        let s = st.swap.next;
                        st.swap.next += 1;
                        let data = st.phys.data(frame).map(|d| d.to_vec().into_boxed_slice());
                        st.swap.slots.insert(s, Slot { data, count: 1 });
                        slots.insert(frame, s);
                        swapped += 1;
                        s
                    };
                    st.mm_mut(pid).pt.set_pte(va, Pte::Swap { slot, write });
                    let fr = st.phys.frame_mut(frame);
                    fr.mapcount = fr.mapcount.saturating_sub(1);
                    st.phys.put(frame);
                }
            }
            self.invalidate_range_end(pid);
        }
        // Step 3: the writes to the swap device.
        self.spend(SWAP_IO.saturating_mul(swapped)).await;
        self.sim.count("swap.out", swapped);
        swapped
    }

    /// `do_swap_page`: brings the page of `slot` back for `va` of `pid`.
    pub(crate) async fn swap_in(&self, pid: Pid, va: Va, slot: u64, write: bool) -> Result<(), ()> {
        self.reclaim_if_low().await;
        self.spend(SWAP_IO).await;
        let mut st = self.state();
        // Another agent may have swapped it in meanwhile.
        if st.mm(pid).pt.lookup(va).map(|l| l.pte) != Some(Pte::Swap { slot, write }) {
            return Ok(());
        }
        let frame = st.phys.alloc(0, FrameOwner::Anon).map_err(|_| ())?;
        if let Some(d) = st.swap.slots.get(&slot).and_then(|s| s.data.clone()) {
            st.phys.write(frame, 0, &d);
        }
        let exclusive = st.swap.count(slot) == 1;
        st.phys.frame_mut(frame).mapcount = 1;
        st.mm_mut(pid).pt.set_pte(
            va,
            Pte::Present {
                frame,
                write: write && exclusive,
                special: false,
            },
        );
        st.swap.free(slot);
        st.swap.lru.push_back(frame);
        drop(st);
        self.sim.count("swap.in", 1);
        Ok(())
    }
}
