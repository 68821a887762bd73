//! Reclaim and swap: the anonymous active/inactive LRU, direct reclaim below a watermark, a swap device
//! whose pages come back on fault.
//!
//! Linux counterparts: mm/vmscan.c (`shrink_lruvec`, `shrink_inactive_list`, `shrink_folio_list`,
//! `folio_check_references`, `shrink_active_list`, `inactive_is_low`), mm/swap.c (`folio_add_lru`),
//! mm/rmap.c (`folio_referenced`, `try_to_unmap`), mm/swapfile.c, mm/memory.c (`do_swap_page`). The rules
//! follow the classic two-list LRU of Linux 6.x with `CONFIG_LRU_GEN` off (MGLRU is not modelled).
//!
//! # The LRU
//!
//! Each RAM node (`[sim] memory` sets their sizes) has its own anonymous `lruvec` (the per-node lruvec of
//! `pglist_data`): an inactive and an active list, each ordered from its tail (oldest) to its head (newest).
//! A page is on the lists of the node its frame is on. A frame's [`LruState`] says which
//! list it is on; a page isolated by a reclaim pass is on none. Two bits per frame drive aging:
//! - `accessed` stands for the PTE young bit. A fresh PTE is young (x86's user page protections carry
//!   `_PAGE_ACCESSED`) and every CPU load or store through a mapping sets it again; reclaim tests and
//!   clears it (`folio_referenced`). It is one bit per frame, not per PTE, so a page young in two mappings
//!   counts once (Linux activates it on `referenced_ptes > 1`). Device accesses through a mirror do not set
//!   it: a secondary MMU's accesses reach aging only through `mmu_notifier_clear_young`, which test_hmm's
//!   device does not implement.
//! - `referenced` is `PG_referenced`, the mark of a first look.
//!
//! Rules:
//! 1. A new anonymous page (demand fault, COW copy, swap-in, migration back to RAM) goes to the head of the
//!    **inactive** list: since Linux 5.9 ("mm/vmscan: protect the workingset on anonymous LRU")
//!    `folio_add_lru_vma` no longer sets `PG_active` for new anonymous pages (with MGLRU off,
//!    `folio_add_lru` leaves it clear), so one-shot pages cannot push the working set off the active list. The refault (workingset) activation of 5.9
//!    needs shadow entries in the swap cache and is not modelled: a swapped-in page starts inactive too.
//! 2. A reclaim pass scans the inactive list from its tail, each page once, until it has isolated its
//!    batch. Each scanned page goes through `folio_check_references`: young and already `referenced`
//!    (seen young before) — **activate** (to the active head); young only — set `referenced` and **rotate**
//!    (back to the inactive head, "another trip"); not young — reclaim (clearing `referenced`).
//! 3. A page locked by a migration in progress (`PG_locked`; `shrink_folio_list`'s `folio_trylock` fails)
//!    is put back on the inactive list untouched. A reclaim candidate that may be DMA-pinned is activated
//!    instead: `try_to_unmap` refuses to unmap a
//!    pinned exclusive anonymous page (`folio_try_share_anon_rmap_pte`), and `shrink_folio_list` sends
//!    pages it failed to unmap to `activate_locked`. The same happens to an isolated page still allocated
//!    after step 5 (a pin taken while an invalidation slept, or no 4 KiB mapping to replace).
//! 4. After the scan, if the inactive list is low against the active one (`inactive_is_low`: inactive ×
//!    ratio < active, where ratio is `int_sqrt(10 × GiB of the two lists)`, 1 below 1 GiB), up to
//!    [`SWAP_CLUSTER_MAX`] pages move from the active tail to the inactive head (`shrink_active_list` at
//!    the end of `shrink_lruvec`). Their young bit is cleared and their `referenced` mark kept; anonymous
//!    pages are deactivated whether or not they were young (only executable file pages stay active).
//!
//! # The reclaim pass
//!
//! Run by the faulting task, like direct reclaim, as numbered steps:
//! 1. Drop the list entries of frames freed since they were added: Linux takes a page off its list when it
//!    is freed; the model's [`PhysMem::put`] logs such frames and the pass (and every addition) drains the
//!    log, one lookup per freed frame, so no pass walks the lists.
//! 2. Scan the inactive tail (rules 2 and 3 above), isolating the reclaim candidates.
//! 3. Age the active list (rule 4).
//! 4. Find every mapping of the candidates with the model's rmap walk ([`crate::rmap`]: each address space's
//!    reverse index, a lookup per candidate, not a walk of the page tables).
//! 5. Replace each mapping inside a CLEAR invalidation, so mirrors drop their translations before the page
//!    goes, and write the page to a swap slot (shared by every mapping, with a count); the last mapping
//!    frees the frame.
//! 6. Put back the candidates that survived (rule 3), then spend the swap device's write time.
//!
//! A pass works on one node's lists ([`Kernel::reclaim_node`], `shrink_node`); the rmap walk and the swap
//! device are shared by all nodes.
//!
//! # When reclaim runs (NUMA)
//!
//! [`Kernel::reclaim_if_low_for`] runs before an allocation for a process, with that process's home node
//! (node 0 where no process is known: [`Kernel::reclaim_if_low`]). Following Linux's allocator with the
//! default `node_reclaim_mode` 0 (mm/page_alloc.c `get_page_from_freelist`, `__alloc_pages_slowpath`), the
//! allocation first falls back to other nodes' free memory and reclaims only when that fails too:
//! 1. If some node in the home node's fallback order ([`crate::phys::PhysMem::fallback_order`]) has at least
//!    [`LOW_WATERMARK`] free pages, nothing is reclaimed: the allocation takes its page from the first such
//!    node. A node below its low watermark is skipped, not reclaimed, while another node has room.
//! 2. Otherwise a pass runs on the home node; if it frees nothing, on the next node in fallback order, and so
//!    on, stopping at the first node that yields pages (direct reclaim, `shrink_zones`, walks the same
//!    zonelist; Linux shrinks every node of it, the model stops early).
//! 3. Further passes run while no node in the fallback order has [`MIN_WATERMARK`] free pages, up to
//!    [`MAX_RECLAIM_PASSES`] passes in all, until one frees a page: a pass that only rotated young pages
//!    leaves them ready for the next, as Linux's falling scan priority does.
//!
//! With one node this is one pass below [`LOW_WATERMARK`] (so the task's accesses between two faults can
//! re-reference pages between two looks) and more below [`MIN_WATERMARK`]. Watermarks are per node and the
//! same on every node; counters (`lru.*`, `swap.*`) are global.
//!
//! # Counters
//!
//! `lru.scan` (vmstat `pgscan_direct`), `lru.steal` (`pgsteal_direct`), `lru.activate` (`pgactivate`),
//! `lru.deactivate` (`pgdeactivate`), `lru.rotate` (`FOLIOREF_KEEP`: kept on the inactive list for another
//! trip; Linux has no vmstat for it — its `pgrotated` counts pages rotated at writeback end), `swap.out`
//! (pages written to swap) and `swap.in`.
//!
//! MADV_COLD and MADV_PAGEOUT act on these lists from a process's side (the `pageout` submodule:
//! `folio_deactivate`, `reclaim_pages`). The lists themselves are intrusive doubly linked lists through a
//! dense per-frame table (the `lru` submodule), so adding, rotating, isolating and removing are O(1).
//!
//! Simplifications: only private anonymous 4 KiB pages are on the lists and reclaimed (THPs and clean
//! page-cache pages are not); scanning costs no simulated time; there is no swap cache — each mapping that
//! faults a shared slot back in gets its own copy, read-only while the slot is still shared. Device memory
//! under pressure is evicted back to RAM by its driver (`peerdma-devices` dmirror), not by this module.

use std::collections::{BTreeMap, BTreeSet};

use peerdma_core::{FrameId, PAGE_SIZE, PageSize, Pid, Range, Va};

use crate::kernel::{Kernel, VmFault};
use crate::mmu_notifier::NotifierEvent;
use crate::pagetable::Pte;
use crate::phys::{Frame, FrameOwner, LruState, PhysMem};

pub use crate::phys::{LOW_WATERMARK, MIN_WATERMARK};

mod lru;
mod pageout;

pub use lru::AnonLru;

/// Pages reclaimed per pass.
pub const RECLAIM_BATCH: u64 = 32;
/// Pages moved from the active to the inactive list per pass (include/linux/swap.h `SWAP_CLUSTER_MAX`).
pub const SWAP_CLUSTER_MAX: u64 = 32;
/// Reclaim passes [`Kernel::reclaim_if_low`] runs at most.
pub const MAX_RECLAIM_PASSES: u32 = 3;

/// Returns whether the inactive list is low against the active one (mm/vmscan.c `inactive_is_low`): the
/// inactive list should hold at least `1 / int_sqrt(10 × GiB)` of the two lists, and as much as the active
/// one below 1 GiB.
pub fn inactive_is_low(nr_inactive: u64, nr_active: u64) -> bool {
    let gib = ((nr_inactive + nr_active) * PAGE_SIZE) >> 30;
    let ratio = if gib > 0 { (10 * gib).isqrt() } else { 1 };
    nr_inactive * ratio < nr_active
}

/// One slot.
#[derive(Debug, Clone)]
struct Slot {
    data: crate::phys::PageContent,
    count: u32,
}

/// The swap device and the anonymous LRU.
#[derive(Debug, Default)]
pub struct Swap {
    slots: BTreeMap<u64, Slot>,
    next: u64,
    /// The anonymous active and inactive lists of each RAM node, by node.
    lru: BTreeMap<u32, AnonLru>,
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

impl Swap {
    /// Adds a new anonymous page, just mapped by a young PTE, to the head of its node's inactive list
    /// (`folio_add_lru_vma`, rule 1 of the module docs).
    ///
    /// # Panics
    /// Panics when `frame` is not RAM: only RAM pages go on an LRU list.
    pub(crate) fn lru_add_new_anon(&mut self, phys: &mut PhysMem, frame: FrameId) {
        let node = phys
            .node_of(frame)
            .expect("only RAM pages go on an LRU list");
        self.drain_freed(phys);
        let fr = phys.frame_mut(frame);
        fr.accessed = true;
        self.lru.entry(node).or_default().add_head(fr, frame, false);
    }

    /// Takes the entries of the frames freed while on a list off their lists (the log [`PhysMem::put`]
    /// keeps; Linux's `lruvec_del_folio` at the final put). Each logged frame costs one lookup.
    pub(crate) fn drain_freed(&mut self, phys: &mut PhysMem) {
        for f in phys.take_lru_freed() {
            if let Some(lru) = phys.node_of(f).and_then(|n| self.lru.get_mut(&n)) {
                lru.forget_freed(phys, f);
            }
        }
    }

    /// Returns the number of pages of RAM node `node` on the active (`LruState::Active`) or inactive list;
    /// `LruState::None` counts nothing.
    pub(crate) fn nr_lru_pages_node(&self, phys: &PhysMem, node: u32, list: LruState) -> u64 {
        let active = match list {
            LruState::None => return 0,
            LruState::Active => true,
            LruState::Inactive => false,
        };
        let Some(lru) = self.lru.get(&node) else {
            return 0;
        };
        // The lists less the entries of logged frames not drained yet (each frame once).
        let stale = phys
            .lru_freed()
            .iter()
            .filter(|&&f| phys.node_of(f) == Some(node))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .filter(|&&f| {
                lru.entry(f)
                    .is_some_and(|e| e.active == active && !AnonLru::current(phys, f, e))
            })
            .count() as u64;
        lru.len(active) - stale
    }

    /// Returns the number of pages on the active (`LruState::Active`) or inactive list; `LruState::None`
    /// counts nothing.
    pub(crate) fn nr_lru_pages(&self, phys: &PhysMem, list: LruState) -> u64 {
        (0..phys.nr_nodes())
            .map(|n| self.nr_lru_pages_node(phys, n, list))
            .sum()
    }
}

/// What `folio_check_references` decides for a scanned inactive page.
enum References {
    Activate,
    Keep,
    Reclaim,
}

/// `folio_check_references` (mm/vmscan.c) for a mapped anonymous page, with the young bit of all its PTEs
/// merged into `accessed`: tests and clears it (`folio_referenced`) and `referenced`.
fn check_references(fr: &mut Frame) -> References {
    let young = std::mem::take(&mut fr.accessed);
    let referenced = std::mem::take(&mut fr.referenced);
    if young {
        // Kept for activated pages too, so a deactivated page in use comes back at once.
        fr.referenced = true;
        if referenced {
            References::Activate
        } else {
            References::Keep
        }
    } else {
        References::Reclaim
    }
}

/// What one pass did, for the counters.
#[derive(Debug, Default)]
struct PassStats {
    scan: u64,
    activate: u64,
    deactivate: u64,
    rotate: u64,
}

impl Kernel {
    /// Runs direct reclaim before an allocation where no process is known (device eviction, for instance):
    /// [`Kernel::reclaim_if_low_for`] with node 0 as the home node.
    pub async fn reclaim_if_low(&self) {
        self.reclaim_if_low_from(0).await;
    }

    /// Runs direct reclaim before an allocation for `pid`, from its home node ("When reclaim runs" in the
    /// module docs): nothing while a node in the fallback order has [`LOW_WATERMARK`] free pages; otherwise
    /// passes over the nodes in fallback order, home first, and below [`MIN_WATERMARK`] up to
    /// [`MAX_RECLAIM_PASSES`] passes until one frees a page.
    pub async fn reclaim_if_low_for(&self, pid: Pid) {
        let home = self.home_node(pid);
        self.reclaim_if_low_from(home).await;
    }

    async fn reclaim_if_low_from(&self, home: u32) {
        let mut order: Vec<u32> = Vec::new();
        for pass in 0..MAX_RECLAIM_PASSES {
            let watermark = if pass == 0 {
                LOW_WATERMARK
            } else {
                MIN_WATERMARK
            };
            if self.phys().any_node_above(home, watermark) {
                return;
            }
            if order.is_empty() {
                order = self.phys().fallback_order(home).collect();
            }
            for &node in &order {
                if self.reclaim_node(node, RECLAIM_BATCH).await > 0 {
                    return;
                }
            }
        }
    }

    /// Runs one reclaim pass on node 0 ([`Kernel::reclaim_node`]); returns how many pages were written to
    /// swap.
    pub async fn reclaim(&self, nr: u64) -> u64 {
        self.reclaim_node(0, nr).await
    }

    /// Runs one reclaim pass (the numbered steps of the module docs) on the lists of RAM node `node`
    /// (`shrink_node`), aiming at `nr` pages; returns how many pages were written to swap.
    pub async fn reclaim_node(&self, node: u32, nr: u64) -> u64 {
        let mut stats = PassStats::default();
        let victims = {
            let mut phys = self.phys();
            let mut swap = self.swap();
            // Step 1: forget freed frames.
            swap.drain_freed(&mut phys);
            let lru = swap.lru.entry(node).or_default();
            // Step 2: shrink_inactive_list — scan the inactive tail, each page once.
            let mut victims: BTreeMap<FrameId, u64> = BTreeMap::new();
            for _ in 0..lru.len(false) {
                if victims.len() as u64 >= nr {
                    break;
                }
                let Some((frame, e)) = lru.pop_tail(false) else {
                    break;
                };
                if !AnonLru::current(&phys, frame, e) {
                    continue;
                }
                stats.scan += 1;
                let fr = phys.frame_mut(frame);
                // shrink_folio_list trylocks each folio: one a migration holds locked is kept for later.
                if fr.locked {
                    lru.add_head(fr, frame, false);
                    stats.rotate += 1;
                    continue;
                }
                match check_references(fr) {
                    References::Activate => {
                        lru.add_head(fr, frame, true);
                        stats.activate += 1;
                    }
                    References::Keep => {
                        lru.add_head(fr, frame, false);
                        stats.rotate += 1;
                    }
                    References::Reclaim if fr.maybe_dma_pinned() => {
                        // try_to_unmap fails on a pinned exclusive page: activate_locked.
                        lru.add_head(fr, frame, true);
                        stats.activate += 1;
                    }
                    References::Reclaim => {
                        // Isolated: on no list until it is freed or put back.
                        fr.lru = LruState::None;
                        victims.insert(frame, fr.generation);
                    }
                }
            }
            // Step 3: shrink_active_list when the inactive list is low.
            while stats.deactivate < SWAP_CLUSTER_MAX
                && inactive_is_low(lru.len(false), lru.len(true))
            {
                let Some((frame, e)) = lru.pop_tail(true) else {
                    break;
                };
                if !AnonLru::current(&phys, frame, e) {
                    continue;
                }
                let fr = phys.frame_mut(frame);
                // folio_referenced clears the young bits; an anonymous page is deactivated regardless.
                fr.accessed = false;
                lru.add_head(fr, frame, false);
                stats.deactivate += 1;
            }
            victims
        };
        let swapped = if victims.is_empty() {
            0
        } else {
            self.swap_out(&victims).await
        };
        // Step 6: put back what could not be freed (unmap failed: activate_locked).
        let mut steal = 0;
        {
            let mut phys = self.phys();
            let mut swap = self.swap();
            for (&frame, &generation) in &victims {
                let fr = phys.frame_mut(frame);
                if fr.owner() == FrameOwner::Anon
                    && fr.generation == generation
                    && fr.lru == LruState::None
                {
                    swap.lru.entry(node).or_default().add_head(fr, frame, true);
                    stats.activate += 1;
                } else {
                    steal += 1;
                }
            }
        }
        self.spend(self.costs.swap_io.saturating_mul(swapped)).await;
        for (name, n) in [
            ("lru.scan", stats.scan),
            ("lru.steal", steal),
            ("lru.activate", stats.activate),
            ("lru.deactivate", stats.deactivate),
            ("lru.rotate", stats.rotate),
            ("swap.out", swapped),
        ] {
            if n > 0 {
                self.sim.count(name, n);
            }
        }
        swapped
    }

    /// Steps 4 and 5 of a reclaim pass: unmaps every 4 KiB mapping of the isolated `victims` inside CLEAR
    /// invalidations and writes them to swap slots; returns how many pages were written.
    async fn swap_out(&self, victims: &BTreeMap<FrameId, u64>) -> u64 {
        // Step 4: every 4 KiB mapping of a victim, in every address space.
        let mappings: Vec<(Pid, Va, FrameId, bool)> = self
            .mms()
            .rmap_walk(&self.phys(), victims.keys().copied())
            .into_iter()
            .filter_map(|m| match m.leaf.pte {
                Pte::Present {
                    write,
                    special: false,
                    ..
                } if m.leaf.size == PageSize::Size4K => Some((m.pid, m.va, m.frame, write)),
                _ => None,
            })
            .collect();
        // Step 5: replace each mapping with a swap entry.
        let mut slots: BTreeMap<FrameId, u64> = BTreeMap::new();
        let mut swapped = 0;
        for (pid, va, frame, write) in mappings {
            let page = Range::from_len(va, PAGE_SIZE).expect("page in user space");
            self.invalidate_range_start(pid, page, NotifierEvent::Clear, None)
                .await;
            {
                let mut st = self.mms();
                let mut phys = self.phys();
                let mut swap = self.swap();
                // The entry may have changed while the invalidation slept.
                let still = st
                    .mm(pid)
                    .pt()
                    .lookup(va)
                    .is_some_and(|l| l.pte.frame() == Some(frame) && l.pte.is_present());
                if still && !phys.frame(frame).maybe_dma_pinned() {
                    let slot = if let Some(&s) = slots.get(&frame) {
                        swap.dup(s);
                        s
                    } else {
                        let s = swap.next;
                        swap.next += 1;
                        let data = phys.content(frame);
                        swap.slots.insert(s, Slot { data, count: 1 });
                        slots.insert(frame, s);
                        swapped += 1;
                        s
                    };
                    st.mm_mut(pid)
                        .pt_mut()
                        .set_pte(va, Pte::Swap { slot, write });
                    let fr = phys.frame_mut(frame);
                    fr.mapcount = fr.mapcount.saturating_sub(1);
                    phys.put(frame);
                }
            }
            self.invalidate_range_end(pid);
        }
        swapped
    }

    /// `do_swap_page`: brings the page of `slot` back for `va` of `pid`, on a node chosen from `pid`'s home
    /// node ([`crate::phys::PhysMem::alloc_node`]).
    ///
    /// # Errors
    /// [`VmFault::Oom`] when no page can be allocated for it.
    pub(crate) async fn swap_in(
        &self,
        pid: Pid,
        va: Va,
        slot: u64,
        write: bool,
    ) -> Result<(), VmFault> {
        self.reclaim_if_low_for(pid).await;
        self.spend(self.costs.swap_io).await;
        let mut st = self.mms();
        let mut phys = self.phys();
        let mut swap = self.swap();
        // Another agent may have swapped it in meanwhile.
        if st.mm(pid).pt().lookup(va).map(|l| l.pte) != Some(Pte::Swap { slot, write }) {
            return Ok(());
        }
        // Within the process's zone: a swap-in under a long-term pin's memalloc_pin scope avoids movable memory.
        let frame = st
            .alloc_anon_for(&mut phys, pid)
            .map_err(|_| VmFault::Oom)?;
        if let Some(d) = swap
            .slots
            .get(&slot)
            .map(|s| s.data.clone())
            .filter(|d| *d != crate::phys::PageContent::Zero)
        {
            phys.set_content(frame, d);
        }
        let exclusive = swap.count(slot) == 1;
        phys.frame_mut(frame).mapcount = 1;
        if !exclusive {
            // __folio_set_anon: other address spaces still hold the swap entry and will map this page, so it
            // belongs to the oldest anon_vma of the family (`anon_vma->root`), which reaches all of them.
            let root = st.scopes().family_root(pid);
            phys.frame_mut(frame).set_anon_vma(root);
        }
        st.mm_mut(pid).pt_mut().set_pte(
            va,
            Pte::Present {
                frame,
                write: write && exclusive,
                special: false,
            },
        );
        swap.free(slot);
        swap.lru_add_new_anon(&mut phys, frame);
        drop((st, phys, swap));
        self.sim.count("swap.in", 1);
        Ok(())
    }
}

#[cfg(test)]
impl Swap {
    /// Checks the LRU against a walk of every entry (the purge the log of freed frames replaced): the counts
    /// [`Swap::nr_lru_pages_node`] gives equal the current entries of each list, and once the log is drained
    /// every entry is current. Returns a description of the first difference.
    pub(crate) fn check_lru(&mut self, phys: &mut PhysMem) -> Result<(), String> {
        for node in 0..phys.nr_nodes() {
            for (list, active) in [(LruState::Inactive, false), (LruState::Active, true)] {
                let walk = self.lru.get(&node).map_or(0, |lru| {
                    lru.entries()
                        .into_iter()
                        .filter(|&(f, e)| e.active == active && AnonLru::current(phys, f, e))
                        .count() as u64
                });
                let counted = self.nr_lru_pages_node(phys, node, list);
                if walk != counted {
                    return Err(format!(
                        "node {node} {list:?}: {counted} counted, {walk} current"
                    ));
                }
            }
        }
        self.drain_freed(phys);
        for (node, lru) in &self.lru {
            if lru.entries().len() as u64 != lru.len(false) + lru.len(true) {
                return Err(format!("node {node}: index and lists differ"));
            }
            if let Some((f, _)) = lru
                .entries()
                .into_iter()
                .find(|&(f, e)| !AnonLru::current(phys, f, e))
            {
                return Err(format!("node {node}: stale entry of {f} after the drain"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB_PAGES: u64 = (1 << 30) / PAGE_SIZE;

    #[test]
    fn inactive_is_low_uses_ratio_one_below_a_gib() {
        assert!(inactive_is_low(3, 4));
        assert!(!inactive_is_low(4, 4));
        assert!(!inactive_is_low(0, 0));
    }

    #[test]
    fn inactive_is_low_ratio_is_int_sqrt_of_ten_per_gib() {
        // 1 GiB: int_sqrt(10) = 3, so a quarter inactive is enough.
        let quarter = GIB_PAGES / 4;
        assert!(!inactive_is_low(quarter, GIB_PAGES - quarter));
        assert!(inactive_is_low(quarter - 1, GIB_PAGES - quarter + 1));
        // 10 GiB: int_sqrt(100) = 10.
        let total = 10 * GIB_PAGES;
        assert!(!inactive_is_low(total / 11 + 1, total - total / 11 - 1));
        assert!(inactive_is_low(total / 12, total - total / 12));
    }

    #[test]
    fn check_references_looks_twice_before_activating() {
        let mut fr = Frame::default();
        fr.accessed = true;
        assert!(matches!(check_references(&mut fr), References::Keep));
        assert!(fr.referenced && !fr.accessed, "marked, young bit cleared");
        fr.accessed = true;
        assert!(matches!(check_references(&mut fr), References::Activate));
        assert!(fr.referenced, "kept for activated pages");
        assert!(matches!(check_references(&mut fr), References::Reclaim));
        assert!(!fr.referenced, "a reclaimed page loses its mark");
    }
}
