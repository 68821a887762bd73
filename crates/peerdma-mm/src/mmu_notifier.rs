//! `mmu_interval_notifier`: the sequence protocol that keeps device mirrors coherent with CPU page tables.
//!
//! Linux counterpart: mm/mmu_notifier.c (interval-tree API), spec/linux-hmm.md §1.3. Per address space:
//! - `invalidate_seq` is even when idle (it starts at 2) and odd while an invalidation that hits at least one
//!   interval is in progress; `active` counts the invalidations in progress.
//! - Invalidation protocol, as numbered steps (driven by [`crate::Kernel`]):
//!   1. `range_start`: collect every subscription whose interval intersects the range; if any, force the
//!      sequence odd and call each one's [`IntervalNotifierOps::invalidate`] with that odd `cur_seq`. The driver
//!      takes its lock, calls `set_seq(cur_seq)` and tears down its mappings.
//!   2. The CPU page tables change.
//!   3. `range_end`: the last end makes the sequence even again and wakes `read_begin` sleepers.
//! - `read_begin` sleeps while the subscription's sequence equals the address space's current odd sequence
//!   (it is being invalidated now); `read_retry` (under the driver lock) says whether the subscription's
//!   sequence moved since `read_begin`.
//! - A subscription inserted during an invalidation starts with the current odd sequence, so its first
//!   `read_begin` waits; one inserted while idle starts at `seq - 1` (odd, different), so `read_retry` after
//!   any later invalidation differs.
//!
//! The [`Kernel`] API over that state lives here too: `interval_notifier_insert` / `_remove`,
//! `interval_read_begin` / `_read_retry` / `_set_seq`, `invalidate_range_start` / `_end` (calling the
//! subscriptions outside any page-table update) and `zap_notify` (an invalidation around a zap).

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;

use peerdma_core::{DeviceId, Errno, Pid, Range, Va};

use peerdma_sim::{TraceArg, Track};

use crate::kernel::Kernel;
use crate::oracle::ViolationKind;

/// Why an invalidation happens (`enum mmu_notifier_event`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotifierEvent {
    /// MMU_NOTIFY_UNMAP: munmap or VMA teardown.
    Unmap,
    /// MMU_NOTIFY_CLEAR: page-table entries cleared, VMA kept (MADV_DONTNEED, COW break, reclaim).
    Clear,
    /// MMU_NOTIFY_PROTECTION_VMA: mprotect.
    ProtectionVma,
    /// MMU_NOTIFY_PROTECTION_PAGE: per-page write protection (COW at fork).
    ProtectionPage,
    /// MMU_NOTIFY_SOFT_DIRTY.
    SoftDirty,
    /// MMU_NOTIFY_RELEASE: address-space teardown, delivered as `[0, ULONG_MAX)`.
    Release,
    /// MMU_NOTIFY_MIGRATE, with `range->owner` = the migrating driver's `pgmap_owner`.
    Migrate,
    /// MMU_NOTIFY_EXCLUSIVE, with the owner given to `make_device_exclusive` (or none on revocation).
    Exclusive,
}

/// What an invalidation callback is told (`struct mmu_notifier_range`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotifierRange {
    /// The address space.
    pub mm: Pid,
    /// The range being invalidated.
    pub range: Range<Va>,
    /// Why.
    pub event: NotifierEvent,
    /// The owner for MIGRATE / EXCLUSIVE events.
    pub owner: Option<DeviceId>,
    /// MMU_NOTIFIER_RANGE_BLOCKABLE: the callback may sleep.
    pub blockable: bool,
}

/// Identifies one interval subscription.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NotifierId(pub u64);

/// The driver side of an interval notifier (`struct mmu_interval_notifier_ops`).
pub trait IntervalNotifierOps {
    /// Invalidates the driver's mappings of `range` (`ops->invalidate`). The driver must take its lock
    /// (blocking only if `range.blockable`), call [`crate::Kernel::interval_set_seq`] with `cur_seq` and tear
    /// down its entries. Returns `false` only when non-blockable and the lock was contended.
    fn invalidate<'a>(
        &'a self,
        id: NotifierId,
        range: &'a NotifierRange,
        cur_seq: u64,
    ) -> Pin<Box<dyn Future<Output = bool> + 'a>>;

    /// Returns a name for traces.
    fn name(&self) -> String;
}

/// A subscription an invalidation must call: its id and its callbacks.
pub type NotifierHit = (NotifierId, Rc<dyn IntervalNotifierOps>);

/// One subscription.
#[derive(Clone)]
pub struct Subscription {
    /// The interval `[start, end)`.
    range: Range<Va>,
    /// The subscription's own sequence (`mni->invalidate_seq`).
    seq: u64,
    /// The driver callbacks.
    ops: Rc<dyn IntervalNotifierOps>,
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("range", &self.range)
            .field("seq", &self.seq)
            .field("ops", &self.ops.name())
            .finish()
    }
}

/// The notifier state of one address space (`struct mmu_notifier_subscriptions`).
#[derive(Debug)]
pub struct NotifierState {
    /// `invalidate_seq`.
    seq: u64,
    /// `active_invalidate_ranges`.
    active: u32,
    /// The ranges of the invalidations started since `active` was last zero (the oracle's "an
    /// invalidation of this address is in progress"; cleared when the last one ends, so a range that
    /// ended while another is still active counts until then — a conservative simplification).
    active_ranges: Vec<Range<Va>>,
    /// The interval tree (kept sorted by id; lookups scan, intervals are few).
    subs: BTreeMap<NotifierId, Subscription>,
}

impl Default for NotifierState {
    fn default() -> Self {
        Self {
            seq: 2,
            active: 0,
            active_ranges: Vec::new(),
            subs: BTreeMap::new(),
        }
    }
}

impl NotifierState {
    /// Removes every subscription and returns their callbacks (the kernel's shutdown drops them).
    pub(crate) fn take_all(&mut self) -> Vec<Rc<dyn IntervalNotifierOps>> {
        std::mem::take(&mut self.subs)
            .into_values()
            .map(|s| s.ops)
            .collect()
    }

    /// Inserts a subscription with the sequence rules of `mmu_interval_notifier_insert`.
    pub fn insert(&mut self, id: NotifierId, range: Range<Va>, ops: Rc<dyn IntervalNotifierOps>) {
        let seq = if self.active > 0 {
            self.seq |= 1;
            self.seq
        } else {
            self.seq - 1
        };
        self.subs.insert(id, Subscription { range, seq, ops });
    }

    /// Step 1 of an invalidation: returns the subscriptions to call and the odd `cur_seq` (`None` when no
    /// interval intersects: nothing to call, the sequence stays even).
    pub fn range_start(&mut self, range: Range<Va>) -> (Vec<NotifierHit>, u64) {
        self.active += 1;
        self.active_ranges.push(range);
        let hits: Vec<NotifierHit> = self
            .subs
            .iter()
            .filter(|(_, s)| s.range.overlaps(&range))
            .map(|(id, s)| (*id, s.ops.clone()))
            .collect();
        if !hits.is_empty() {
            self.seq |= 1;
        }
        (hits, self.seq)
    }

    /// Step 3: returns whether this was the last active invalidation (the sequence is even again and
    /// sleepers must be woken).
    pub fn range_end(&mut self) -> bool {
        self.active -= 1;
        if self.active == 0 {
            self.active_ranges.clear();
            if self.seq & 1 == 1 {
                self.seq += 1;
            }
            return true;
        }
        false
    }

    /// Returns whether an invalidation whose range contains `va` is in progress (see `active_ranges`).
    pub fn invalidating(&self, va: Va) -> bool {
        self.active_ranges.iter().any(|r| r.contains(va))
    }

    /// Returns whether `read_begin` on `id` must sleep now.
    pub fn read_begin_must_wait(&self, id: NotifierId) -> bool {
        self.subs
            .get(&id)
            .is_some_and(|s| s.seq == self.seq && self.seq & 1 == 1)
    }
}

impl Kernel {
    /// Registers an interval notifier over `[start, start + len)` of `pid` (`mmu_interval_notifier_insert`).
    ///
    /// # Errors
    /// `EOVERFLOW` for a zero length or a range that wraps; `EINVAL` when the process has exited (no
    /// `mm_users` reference).
    pub fn interval_notifier_insert(
        &self,
        pid: Pid,
        start: Va,
        len: u64,
        ops: Rc<dyn IntervalNotifierOps>,
    ) -> Result<NotifierId, Errno> {
        let range = match Range::from_len(start, len) {
            Some(r) if len > 0 => r,
            _ => return Err(Errno::EOVERFLOW),
        };
        let mut st = self.mms();
        if !st.mm(pid).is_alive() {
            return Err(Errno::EINVAL);
        }
        let id = st.new_notifier_id();
        st.mm_mut(pid).notifiers_mut().insert(id, range, ops);
        Ok(id)
    }

    /// Removes an interval notifier (`mmu_interval_notifier_remove`). If an invalidation is in progress it
    /// waits for it to end, so that once this returns no callback runs or will run.
    pub async fn interval_notifier_remove(&self, pid: Pid, id: NotifierId) {
        self.notifier_wq()
            .wait_event(|| self.mms().mm(pid).notifiers().active == 0)
            .await;
        self.mms().mm_mut(pid).notifiers_mut().subs.remove(&id);
    }

    /// `mmu_interval_read_begin`: sleeps while the subscription is being invalidated, then returns its sequence.
    pub async fn interval_read_begin(&self, pid: Pid, id: NotifierId) -> u64 {
        self.notifier_wq()
            .wait_event(|| !self.mms().mm(pid).notifiers().read_begin_must_wait(id))
            .await;
        self.mms()
            .mm(pid)
            .notifiers()
            .subs
            .get(&id)
            .map_or(0, |s| s.seq)
    }

    /// `mmu_interval_read_retry`: whether the subscription was invalidated since `read_begin` returned `seq`.
    /// Call it under the driver lock that the invalidate callback also takes.
    pub fn interval_read_retry(&self, pid: Pid, id: NotifierId, seq: u64) -> bool {
        self.mms()
            .mm(pid)
            .notifiers()
            .subs
            .get(&id)
            .is_none_or(|s| s.seq != seq)
    }

    /// `mmu_interval_set_seq`: called by the invalidate callback, under the driver lock.
    pub fn interval_set_seq(&self, pid: Pid, id: NotifierId, cur_seq: u64) {
        if peerdma_core::mutation::active(peerdma_core::mutation::Mutation::SkipSeqBump) {
            return;
        }
        if let Some(s) = self.mms().mm_mut(pid).notifiers_mut().subs.get_mut(&id) {
            s.seq = cur_seq;
        }
    }

    /// Runs step 1 of an invalidation (see [`crate::mmu_notifier`]): calls every intersecting subscription.
    pub async fn invalidate_range_start(
        &self,
        pid: Pid,
        range: Range<Va>,
        event: NotifierEvent,
        owner: Option<DeviceId>,
    ) {
        let (hits, cur_seq) = self.mms().mm_mut(pid).notifiers_mut().range_start(range);
        // Exploration may preempt here: the sequence is odd, the callbacks have not run yet.
        self.sim.preempt_point().await;
        let _span = self.sim.span("mmu_notifier.invalidate", Track::Agent, || {
            vec![
                ("pid", pid.0.into()),
                ("start", TraceArg::Hex(range.start.raw())),
                ("end", TraceArg::Hex(range.end.raw())),
                ("event", format!("{event:?}").into()),
                ("seq", cur_seq.into()),
                ("subscriptions", hits.len().into()),
            ]
        });
        let nr = NotifierRange {
            mm: pid,
            range,
            event,
            owner,
            blockable: true,
        };
        for (id, ops) in hits {
            let ok = ops.invalidate(id, &nr, cur_seq).await;
            if !ok {
                // A false return in blockable context is a driver bug in Linux (WARN); the model reports it.
                self.oracle().violation(
                    ViolationKind::Protocol,
                    format!(
                        "notifier {} refused a blockable invalidation of {range}",
                        ops.name()
                    ),
                );
            }
        }
    }

    /// Runs step 3 of an invalidation: the last end makes the sequence even and wakes sleepers.
    pub fn invalidate_range_end(&self, pid: Pid) {
        let last = self.mms().mm_mut(pid).notifiers_mut().range_end();
        if last {
            self.notifier_wq().wake_up_all();
        }
    }

    /// Zaps every entry of `r` inside an invalidation of kind `event` (start, zap, TLB shootdown, end);
    /// returns the number of base pages zapped. Private anonymous contents are forgotten (they read zero again).
    pub(crate) async fn zap_notify(&self, pid: Pid, r: Range<Va>, event: NotifierEvent) -> u64 {
        let early = peerdma_core::mutation::active(peerdma_core::mutation::Mutation::EarlyFree)
            .then(|| {
                self.mms()
                    .zap_range(&mut self.phys(), &mut self.swap(), pid, r)
            });
        self.invalidate_range_start(pid, r, event, None).await;
        // zap_pmd_range: a PMD leaf the range cuts is split first, inside its own CLEAR of the whole 2 MiB.
        self.split_huge_pmds_cut_by(pid, r).await;
        let nr = {
            let mut st = self.mms();
            let mut phys = self.phys();
            let mut swap = self.swap();
            let mut oracle = self.oracle();
            let nr = early.unwrap_or_else(|| st.zap_range(&mut phys, &mut swap, pid, r));
            oracle.forget_anon(pid, r);
            nr
        };
        if nr > 0 {
            self.spend(self.costs.tlb_shootdown).await;
        }
        self.invalidate_range_end(pid);
        nr
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Nop;
    impl IntervalNotifierOps for Nop {
        fn invalidate<'a>(
            &'a self,
            _id: NotifierId,
            _range: &'a NotifierRange,
            _cur_seq: u64,
        ) -> Pin<Box<dyn Future<Output = bool> + 'a>> {
            Box::pin(async { true })
        }
        fn name(&self) -> String {
            "nop".into()
        }
    }

    fn r(a: u64, b: u64) -> Range<Va> {
        Range::new(Va::from_raw(a), Va::from_raw(b))
    }

    #[test]
    fn sequence_is_even_when_idle_and_odd_during_a_hitting_invalidation() {
        let mut st = NotifierState::default();
        st.insert(NotifierId(1), r(0x1000, 0x2000), Rc::new(Nop));
        assert_eq!(st.seq, 2);
        assert_eq!(
            st.subs[&NotifierId(1)].seq,
            1,
            "idle insert starts at seq - 1"
        );
        let (hits, cur) = st.range_start(r(0x1800, 0x3000));
        assert_eq!(hits.len(), 1);
        assert_eq!(cur, 3);
        st.subs.get_mut(&NotifierId(1)).unwrap().seq = cur; // the driver's set_seq
        assert!(st.read_begin_must_wait(NotifierId(1)));
        assert!(st.range_end());
        assert_eq!(st.seq, 4);
        assert!(!st.read_begin_must_wait(NotifierId(1)));
    }

    #[test]
    fn a_missing_invalidation_leaves_the_sequence_even() {
        let mut st = NotifierState::default();
        st.insert(NotifierId(1), r(0x1000, 0x2000), Rc::new(Nop));
        let (hits, cur) = st.range_start(r(0x5000, 0x6000));
        assert!(hits.is_empty());
        assert_eq!(cur, 2);
        st.range_end();
        assert_eq!(st.seq, 2);
    }

    #[test]
    fn insert_during_invalidation_waits_for_its_end() {
        let mut st = NotifierState::default();
        let _ = st.range_start(r(0, 0x1000));
        st.insert(NotifierId(7), r(0x8000, 0x9000), Rc::new(Nop));
        assert!(st.read_begin_must_wait(NotifierId(7)));
        st.range_end();
        assert!(!st.read_begin_must_wait(NotifierId(7)));
    }

    #[test]
    fn nested_invalidations_end_once() {
        let mut st = NotifierState::default();
        st.insert(NotifierId(1), r(0, 0x10000), Rc::new(Nop));
        let (_, a) = st.range_start(r(0, 0x1000));
        let (_, b) = st.range_start(r(0x2000, 0x3000));
        assert_eq!(a, b);
        assert!(!st.range_end());
        assert!(st.range_end());
        assert_eq!(st.seq, a + 1);
    }
}
