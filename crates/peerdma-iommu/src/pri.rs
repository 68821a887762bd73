//! PCIe PRI page requests and the I/O page-fault queue, **VT-d flavour** (drivers/iommu/intel/prq.c feeding
//! drivers/iommu/io-pgfault.c; AMD's PPR log works alike). Mainline SMMUv3 recovers device faults by
//! *stalling* the transaction instead of PRI; that flavour is not modelled.
//!
//! Protocol, as numbered steps:
//! 1. **Post** (device → IOMMU): a page request carries (device, PASID, address, access, group id,
//!    last-in-group). One hardware page-request queue per IOMMU unit ([`PRQ_ENTRIES`] = 2,048 entries on
//!    VT-d; any one device may fill all of it). A request that finds the queue full is lost and the
//!    queue's *overflow* bit is set; when the lost request was the last of its group the hardware answers
//!    the group itself with SUCCESS (VT-d's automatic response), so the device retries its translation
//!    and faults again.
//! 2. **Report** (the driver's queue thread, `iommu_report_device_fault`): a request that is not last in
//!    its group is kept on its device's *partial* list, with no response; the last one gathers every
//!    partial request of the same device and group id into a **group**, which becomes *pending*.
//! 3. After draining the queue, if the overflow bit was set, the driver discards the partial lists of
//!    **every device on that unit** (`iopf_queue_discard_partial`: their last pages may have been lost) and
//!    clears the bit. Those devices get no response for the discarded requests; they time out or see the
//!    automatic response and retry.
//! 4. **Handle** (the fault worker; the device layer calls the mm's fault path): the group's requests are
//!    handled in order; the first non-SUCCESS result is sticky and stops the walk.
//! 5. **Respond**: exactly **one response per group** ([`PageResponseCode`]), only while it is pending; a
//!    second answer is a protocol error ([`PriError::NotPending`]).
//! 6. **Drain at unbind** (`iopf_queue_remove_device`, after the hardware queue was flushed of the
//!    device's requests): partial requests are freed and every pending group of the device is answered
//!    INVALID.

use std::collections::{BTreeMap, VecDeque};

use peerdma_core::{DeviceId, Va};

use crate::sva::Pasid;

/// Entries of the VT-d page-request queue (`PRQ_DEPTH`: `PRQ_ORDER` 4, i.e. 16 pages = 64 KiB of 32-byte
/// descriptors → 2,048 entries; drivers/iommu/intel/iommu.h, used by drivers/iommu/intel/prq.c).
pub const PRQ_ENTRIES: usize = 2048;

/// One PCIe page request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRequest {
    /// The requester.
    pub dev: DeviceId,
    /// Its PASID (`None`: no PASID prefix, which SVA cannot handle).
    pub pasid: Option<Pasid>,
    /// The page's address (page aligned).
    pub addr: Va,
    /// Write access requested (read is always requested).
    pub write: bool,
    /// The page request group index.
    pub grpid: u16,
    /// Last request of its group (`IOMMU_FAULT_PAGE_REQUEST_LAST_PAGE`).
    pub last: bool,
}

/// `enum iommu_page_response_code`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PageResponseCode {
    /// Page tables populated: retry the translation.
    Success,
    /// Could not handle: do not retry this access.
    Invalid,
    /// General failure: the device should stop sending page requests.
    Failure,
}

/// A response to a page group (what goes back to the device).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageResponse {
    /// The device answered.
    pub dev: DeviceId,
    /// The PASID of the group's last request.
    pub pasid: Option<Pasid>,
    /// The group id.
    pub grpid: u16,
    /// The code.
    pub code: PageResponseCode,
    /// Whether the hardware answered by itself (overflow, step 1).
    pub automatic: bool,
}

/// Identifies a pending group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupId(pub u64);

/// A complete page group ready for the fault worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PriGroup {
    /// Its id (to respond).
    pub id: GroupId,
    /// Its requests, in arrival order, the last-in-group one last.
    pub faults: Vec<PageRequest>,
}

/// What posting a request did (step 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PostOutcome {
    /// Queued for the driver.
    Queued,
    /// Lost to a full queue; `Some` is the automatic response the hardware sent (last-in-group).
    Dropped(Option<PageResponse>),
}

/// A misuse of the page-request protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PriError {
    /// The group was already answered (or drained): a second response.
    #[error("page group {0:?} is not pending (answered twice?)")]
    NotPending(GroupId),
}

/// Counters of one queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PriStats {
    /// Requests posted.
    pub requests: u64,
    /// Requests lost to overflow.
    pub dropped: u64,
    /// Times the overflow bit was set.
    pub overflows: u64,
    /// Partial requests discarded after an overflow or at drain.
    pub discarded: u64,
    /// Groups formed.
    pub groups: u64,
    /// Responses per code (SUCCESS, INVALID, FAILURE), automatic ones included.
    pub responses: [u64; 3],
}

/// The page-request queue of one IOMMU unit and the IOPF queue state behind it (module docs).
#[derive(Clone, Debug)]
pub struct PriQueue {
    capacity: usize,
    hw: VecDeque<PageRequest>,
    overflow: bool,
    partial: BTreeMap<DeviceId, Vec<PageRequest>>,
    pending: BTreeMap<GroupId, PageRequest>,
    next_group: u64,
    stats: PriStats,
}

impl PriQueue {
    /// Creates a queue of `capacity` entries (VT-d: [`PRQ_ENTRIES`]).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            hw: VecDeque::new(),
            overflow: false,
            partial: BTreeMap::new(),
            pending: BTreeMap::new(),
            next_group: 1,
            stats: PriStats::default(),
        }
    }

    /// Returns the counters.
    pub fn stats(&self) -> PriStats {
        self.stats
    }

    /// Returns whether the overflow bit is set.
    pub fn overflowed(&self) -> bool {
        self.overflow
    }

    /// Returns the number of requests in the hardware queue.
    pub fn len(&self) -> usize {
        self.hw.len()
    }

    /// Returns whether the hardware queue is empty.
    pub fn is_empty(&self) -> bool {
        self.hw.is_empty()
    }

    /// Returns the number of pending groups.
    pub fn nr_pending(&self) -> usize {
        self.pending.len()
    }

    fn count(&mut self, code: PageResponseCode) {
        let i = match code {
            PageResponseCode::Success => 0,
            PageResponseCode::Invalid => 1,
            PageResponseCode::Failure => 2,
        };
        self.stats.responses[i] += 1;
    }

    /// Step 1: the device posts a request.
    pub fn post(&mut self, req: PageRequest) -> PostOutcome {
        self.stats.requests += 1;
        if self.hw.len() < self.capacity {
            self.hw.push_back(req);
            return PostOutcome::Queued;
        }
        self.stats.dropped += 1;
        if !self.overflow {
            self.overflow = true;
            self.stats.overflows += 1;
        }
        let auto = req.last.then(|| {
            self.count(PageResponseCode::Success);
            PageResponse {
                dev: req.dev,
                pasid: req.pasid,
                grpid: req.grpid,
                code: PageResponseCode::Success,
                automatic: true,
            }
        });
        PostOutcome::Dropped(auto)
    }

    /// Steps 2–3: the driver drains the hardware queue; returns the groups completed, in order. If the
    /// overflow bit was set, every device's partial requests are discarded and the bit cleared.
    pub fn drain_hw(&mut self) -> Vec<PriGroup> {
        let mut groups = Vec::new();
        while let Some(req) = self.hw.pop_front() {
            if !req.last {
                self.partial.entry(req.dev).or_default().push(req);
                continue;
            }
            let mut faults = Vec::new();
            if let Some(list) = self.partial.get_mut(&req.dev) {
                let (same, rest): (Vec<_>, Vec<_>) = list
                    .drain(..)
                    .partition(|p| p.grpid == req.grpid && p.pasid == req.pasid);
                faults = same;
                *list = rest;
            }
            faults.push(req);
            let id = GroupId(self.next_group);
            self.next_group += 1;
            self.pending.insert(id, req);
            self.stats.groups += 1;
            groups.push(PriGroup { id, faults });
        }
        if self.overflow {
            let n: usize = self.partial.values().map(Vec::len).sum();
            self.stats.discarded += n as u64;
            self.partial.clear();
            self.overflow = false;
        }
        groups
    }

    /// Step 5: answers pending group `id` with `code`.
    ///
    /// # Errors
    /// [`PriError::NotPending`] when the group was already answered or drained.
    pub fn respond(
        &mut self,
        id: GroupId,
        code: PageResponseCode,
    ) -> Result<PageResponse, PriError> {
        let last = self.pending.remove(&id).ok_or(PriError::NotPending(id))?;
        self.count(code);
        Ok(PageResponse {
            dev: last.dev,
            pasid: last.pasid,
            grpid: last.grpid,
            code,
            automatic: false,
        })
    }

    /// Step 6: removes `dev`'s requests for `pasid` (all PASIDs with `None`): the hardware queue is flushed of
    /// them, its partial requests are freed and each pending group is answered INVALID (returned).
    pub fn remove_device(&mut self, dev: DeviceId, pasid: Option<Pasid>) -> Vec<PageResponse> {
        let hit = |r: &PageRequest| r.dev == dev && (pasid.is_none() || r.pasid == pasid);
        let before = self.hw.len();
        self.hw.retain(|r| !hit(r));
        let mut discarded = (before - self.hw.len()) as u64;
        if let Some(list) = self.partial.get_mut(&dev) {
            let n = list.len();
            list.retain(|r| !hit(r));
            discarded += (n - list.len()) as u64;
        }
        self.stats.discarded += discarded;
        let ids: Vec<GroupId> = self
            .pending
            .iter()
            .filter(|(_, r)| hit(r))
            .map(|(id, _)| *id)
            .collect();
        ids.into_iter()
            .map(|id| {
                self.respond(id, PageResponseCode::Invalid)
                    .expect("listed as pending")
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: DeviceId = DeviceId(1);
    const B: DeviceId = DeviceId(2);

    fn req(dev: DeviceId, page: u64, grpid: u16, last: bool) -> PageRequest {
        PageRequest {
            dev,
            pasid: Some(Pasid(1)),
            addr: Va::from_raw(page << 12),
            write: false,
            grpid,
            last,
        }
    }

    #[test]
    fn a_group_forms_at_its_last_request_and_gets_exactly_one_response() {
        let mut q = PriQueue::new(PRQ_ENTRIES);
        q.post(req(A, 1, 5, false));
        q.post(req(A, 2, 6, true));
        q.post(req(A, 3, 5, true));
        let groups = q.drain_hw();
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].faults.len(), 1, "group 6 alone");
        let pages: Vec<u64> = groups[1]
            .faults
            .iter()
            .map(|f| f.addr.raw() >> 12)
            .collect();
        assert_eq!(pages, vec![1, 3], "group 5 gathers its partial page first");
        let r = q.respond(groups[1].id, PageResponseCode::Success).unwrap();
        assert_eq!((r.grpid, r.code), (5, PageResponseCode::Success));
        assert_eq!(
            q.respond(groups[1].id, PageResponseCode::Success),
            Err(PriError::NotPending(groups[1].id))
        );
    }

    #[test]
    fn every_response_code_is_counted() {
        let mut q = PriQueue::new(8);
        for g in 0..3 {
            q.post(req(A, g.into(), g, true));
        }
        let groups = q.drain_hw();
        let codes = [
            PageResponseCode::Success,
            PageResponseCode::Invalid,
            PageResponseCode::Failure,
        ];
        for (g, code) in groups.iter().zip(codes) {
            assert_eq!(q.respond(g.id, code).unwrap().code, code);
        }
        assert_eq!(q.stats().responses, [1, 1, 1]);
        assert_eq!(q.nr_pending(), 0);
    }

    #[test]
    fn two_devices_overflow_the_unit_queue_and_lose_their_partial_groups() {
        let mut q = PriQueue::new(4);
        // A posts a partial group and B fills the queue.
        q.post(req(A, 1, 1, false));
        q.post(req(B, 2, 1, false));
        q.post(req(B, 3, 2, true));
        q.post(req(A, 4, 3, true));
        // Full: A's last-in-group request of group 1 is lost and the hardware answers it SUCCESS.
        let lost = q.post(req(A, 5, 1, true));
        let PostOutcome::Dropped(Some(auto)) = lost else {
            panic!("expected an automatic response, got {lost:?}");
        };
        assert!(auto.automatic && auto.code == PageResponseCode::Success);
        assert_eq!(q.post(req(B, 6, 4, false)), PostOutcome::Dropped(None));
        assert!(q.overflowed());
        let groups = q.drain_hw();
        assert_eq!(groups.len(), 2, "the complete groups still form");
        assert!(!q.overflowed(), "the driver clears the bit");
        assert_eq!(
            q.stats().discarded,
            2,
            "A's and B's partial requests are gone"
        );
        assert_eq!(q.stats().dropped, 2);
        // A's later retry forms a group of its own: nothing stale is gathered.
        q.post(req(A, 5, 1, true));
        assert_eq!(q.drain_hw()[0].faults.len(), 1);
    }

    #[test]
    fn removing_a_device_answers_its_pending_groups_invalid_and_frees_partials() {
        let mut q = PriQueue::new(16);
        q.post(req(A, 1, 1, true));
        q.post(req(B, 2, 1, true));
        q.post(req(A, 3, 2, false));
        let groups = q.drain_hw();
        q.post(req(A, 4, 3, true)); // still in the hardware queue
        let answered = q.remove_device(A, Some(Pasid(1)));
        assert_eq!(answered.len(), 1);
        assert_eq!(answered[0].code, PageResponseCode::Invalid);
        assert_eq!(q.stats().discarded, 2);
        assert!(q.is_empty());
        q.respond(groups[0].id, PageResponseCode::Success)
            .unwrap_err();
        q.respond(groups[1].id, PageResponseCode::Success).unwrap(); // B untouched
    }
}
