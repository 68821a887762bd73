//! `hmm_range_fault`: snapshot or fault a range of a process's page table for a mirroring device.
//!
//! Linux counterpart: mm/hmm.c and include/linux/hmm.h (spec/linux-hmm.md §1.1). The per-page output word has
//! the kernel's layout: bit 63 VALID (REQ_FAULT on input), bit 62 WRITE (REQ_WRITE), bit 61 ERROR, bits 58–60
//! sticky DMA flags preserved from input, bits 53–57 the CPU mapping order, the frame number below.
//!
//! Algorithm (numbered as the walk runs):
//! 1. `last = start`. Loop: if the notifier sequence moved since `notifier_seq`, return `EBUSY` to the caller.
//! 2. Walk from `last`: per VMA, holes and VM_IO/VM_PFNMAP/!VM_READ VMAs fill ERROR, or fail with `EFAULT` if
//!    any page there requests a fault; present entries report frame, VALID, WRITE and order.
//! 3. A page whose request is not met (`hmm_pte_need_fault`) records `last`, is faulted with
//!    `handle_mm_fault` (a write request on a VMA without VM_WRITE is `EPERM` before any fault; a fault error
//!    is `EFAULT`), and the walk restarts at step 1 — entries below `last` keep their output.

use peerdma_core::{DeviceId, Errno, FrameId, PAGE_SIZE, PageSize, Pid, Range, Va};

use peerdma_sim::{TraceArg, Track};

use crate::kernel::{Kernel, Mms};
use crate::mmu_notifier::NotifierId;
use crate::pagetable::{Leaf, Pte};
use crate::phys::{MemoryKind, PhysMem};
use crate::vma::VmFlags;

/// HMM_PFN_VALID; as input, HMM_PFN_REQ_FAULT.
pub const HMM_PFN_VALID: u64 = 1 << 63;
/// HMM_PFN_WRITE; as input, HMM_PFN_REQ_WRITE.
pub const HMM_PFN_WRITE: u64 = 1 << 62;
/// HMM_PFN_ERROR.
pub const HMM_PFN_ERROR: u64 = 1 << 61;
/// HMM_PFN_DMA_MAPPED (sticky).
pub const HMM_PFN_DMA_MAPPED: u64 = 1 << 60;
/// HMM_PFN_P2PDMA (sticky).
pub const HMM_PFN_P2PDMA: u64 = 1 << 59;
/// HMM_PFN_P2PDMA_BUS (sticky).
pub const HMM_PFN_P2PDMA_BUS: u64 = 1 << 58;
/// The sticky in/out bits, preserved from input in every branch.
pub const HMM_PFN_INOUT_FLAGS: u64 = HMM_PFN_DMA_MAPPED | HMM_PFN_P2PDMA | HMM_PFN_P2PDMA_BUS;
/// HMM_PFN_REQ_FAULT.
pub const HMM_PFN_REQ_FAULT: u64 = HMM_PFN_VALID;
/// HMM_PFN_REQ_WRITE.
pub const HMM_PFN_REQ_WRITE: u64 = HMM_PFN_WRITE;
/// HMM_PFN_ORDER_SHIFT.
pub const HMM_PFN_ORDER_SHIFT: u32 = 53;
/// Every flag bit (`HMM_PFN_FLAGS`).
pub const HMM_PFN_FLAGS: u64 = !((1 << HMM_PFN_ORDER_SHIFT) - 1);

/// Returns the frame in an output word (`hmm_pfn_to_page`).
pub fn hmm_pfn_to_frame(word: u64) -> FrameId {
    FrameId(word & !HMM_PFN_FLAGS)
}

/// Returns the CPU mapping order in an output word (`hmm_pfn_to_map_order`).
pub fn hmm_pfn_to_map_order(word: u64) -> u32 {
    u32::try_from((word >> HMM_PFN_ORDER_SHIFT) & 0x1f).expect("5-bit field")
}

/// `struct hmm_range`.
#[derive(Clone, Debug)]
pub struct HmmRange {
    /// The address space walked (the notifier's mm).
    pub pid: Pid,
    /// The interval notifier covering the range.
    pub notifier: NotifierId,
    /// What `read_begin` returned.
    pub notifier_seq: u64,
    /// Page-aligned start.
    pub start: Va,
    /// Page-aligned end (exclusive).
    pub end: Va,
    /// One word per page: input requests, output results.
    pub hmm_pfns: Vec<u64>,
    /// Request flags applied to every page.
    pub default_flags: u64,
    /// Which bits of each page's own input word are honoured.
    pub pfn_flags_mask: u64,
    /// Device-private pages of this owner are reported, not faulted.
    pub dev_private_owner: Option<DeviceId>,
}

impl HmmRange {
    /// Creates a range with zeroed input words.
    pub fn new(
        pid: Pid,
        notifier: NotifierId,
        seq: u64,
        range: Range<Va>,
        default_flags: u64,
    ) -> Self {
        let n = usize::try_from(range.len() / PAGE_SIZE).expect("page count fits usize");
        Self {
            pid,
            notifier,
            notifier_seq: seq,
            start: range.start,
            end: range.end,
            hmm_pfns: vec![0; n],
            default_flags,
            pfn_flags_mask: 0,
            dev_private_owner: None,
        }
    }
}

/// What the walk decided for one page.
enum PageResult {
    /// The output word (flags and frame, without the sticky bits).
    Out(u64),
    /// Needs a fault (write fault if true).
    Fault(bool),
    /// `EFAULT`.
    Efault,
}

/// `hmm_pte_need_fault`: whether the request in `req` is unmet by `cpu` flags; `Some(true)` for a write fault.
fn need_fault(req: u64, cpu: u64) -> Option<bool> {
    if req & HMM_PFN_REQ_FAULT == 0 {
        return None;
    }
    if req & HMM_PFN_REQ_WRITE != 0 && cpu & HMM_PFN_WRITE == 0 {
        return Some(true);
    }
    if cpu & HMM_PFN_VALID == 0 {
        return Some(false);
    }
    None
}

/// Classifies the page at `va`, whose page-table leaf (if any) is `leaf` (`hmm_vma_walk_pmd` /
/// `hmm_vma_handle_pte` for one page).
fn classify(
    st: &Mms,
    phys: &PhysMem,
    pid: Pid,
    va: Va,
    leaf: Option<Leaf>,
    req: u64,
    dev_owner: Option<DeviceId>,
) -> PageResult {
    let mm = st.mm(pid);
    let wants_fault = req & HMM_PFN_REQ_FAULT != 0;
    let unusable = match mm.vma(va) {
        None => true,
        Some(v) => {
            v.flags.intersects(VmFlags::IO | VmFlags::PFNMAP) || !v.flags.contains(VmFlags::READ)
        }
    };
    if unusable {
        return if wants_fault {
            PageResult::Efault
        } else {
            PageResult::Out(HMM_PFN_ERROR)
        };
    }
    let Some(leaf) = leaf else {
        return match need_fault(req, 0) {
            Some(w) => PageResult::Fault(w),
            None => PageResult::Out(0),
        };
    };
    match leaf.pte {
        Pte::Present { special: true, .. } => {
            if wants_fault {
                PageResult::Efault
            } else {
                PageResult::Out(HMM_PFN_ERROR)
            }
        }
        Pte::Present { write, .. } => {
            let cpu = HMM_PFN_VALID | if write { HMM_PFN_WRITE } else { 0 };
            if let Some(w) = need_fault(req, cpu) {
                return PageResult::Fault(w);
            }
            let frame = leaf.frame_at(va).expect("present entry has a frame");
            let order = u64::from(leaf.size.order()) << HMM_PFN_ORDER_SHIFT;
            PageResult::Out(frame.0 | cpu | order)
        }
        Pte::DevicePrivate { frame, write }
            if dev_owner
                .is_some_and(|owner| phys.kind(frame) == MemoryKind::DevicePrivate { owner }) =>
        {
            // A device-private page of the caller's own device is reported, never faulted — except a write
            // request on a read-only entry (spec §1.1). A PMD-level entry reports order 9 (≥ v6.19).
            let cpu = HMM_PFN_VALID | if write { HMM_PFN_WRITE } else { 0 };
            if let Some(w) = need_fault(req, cpu) {
                PageResult::Fault(w)
            } else {
                let f = leaf.frame_at(va).expect("device-private entry has a frame");
                let order = u64::from(leaf.size.order()) << HMM_PFN_ORDER_SHIFT;
                PageResult::Out(f.0 | cpu | order)
            }
        }
        // Swap, migration, device-exclusive and other-owner device-private entries read as "not present";
        // a fault request faults them in.
        _ => match need_fault(req, 0) {
            Some(w) => PageResult::Fault(w),
            None => PageResult::Out(0),
        },
    }
}

impl Kernel {
    /// `hmm_range_fault(range)`. The caller holds `range.pid`'s `mmap_lock` for reading.
    ///
    /// # Errors
    /// `EBUSY` if the range was invalidated since `read_begin` (restart with a new sequence); `EFAULT` for a
    /// requested page that cannot be made valid; `EPERM` for a write request on a VMA without VM_WRITE.
    pub async fn hmm_range_fault(&self, range: &mut HmmRange) -> Result<(), Errno> {
        debug_assert!(
            self.mmap_lock(range.pid).readers() > 0 || self.mmap_lock(range.pid).is_write_locked(),
            "hmm_range_fault without mmap_lock"
        );
        let _span = self.sim.span("hmm_range_fault", Track::Agent, || {
            vec![
                ("pid", range.pid.0.into()),
                ("start", TraceArg::Hex(range.start.raw())),
                ("end", TraceArg::Hex(range.end.raw())),
            ]
        });
        let mut last = range.start;
        loop {
            if self.interval_read_retry(range.pid, range.notifier, range.notifier_seq) {
                return Err(Errno::EBUSY);
            }
            match self.hmm_walk(range, &mut last).await {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// One walk from `last`; `Ok(false)` after a fault (re-walk), `Ok(true)` when the range is done.
    async fn hmm_walk(&self, range: &mut HmmRange, last: &mut Va) -> Result<bool, Errno> {
        // The walk proper: one page-table cursor pass from `last` (`walk_page_range`), classifying every
        // page — the holes between the cursor's leaves included — until one needs a fault or fails.
        let (walked, stop) = {
            let st = self.mms();
            let phys = self.phys();
            let mut cursor = st.mm(range.pid).pt().cursor(Range::new(*last, range.end));
            let mut next_leaf = cursor.next();
            let mut va = *last;
            let mut walked = 0u64;
            let mut stop = None;
            while va < range.end {
                while next_leaf.is_some_and(|l| l.base.add(l.size.bytes()) <= va) {
                    next_leaf = cursor.next();
                }
                let leaf = next_leaf.filter(|l| l.base <= va);
                let idx = usize::try_from((va.raw() - range.start.raw()) / PAGE_SIZE)
                    .expect("index fits usize");
                let req = (range.hmm_pfns[idx] & range.pfn_flags_mask) | range.default_flags;
                walked += 1;
                match classify(
                    &st,
                    &phys,
                    range.pid,
                    va,
                    leaf,
                    req,
                    range.dev_private_owner,
                ) {
                    PageResult::Out(word) => {
                        range.hmm_pfns[idx] = (range.hmm_pfns[idx] & HMM_PFN_INOUT_FLAGS) | word;
                        va = va.add(PAGE_SIZE);
                    }
                    other => {
                        stop = Some((va, other));
                        break;
                    }
                }
            }
            (walked, stop)
        };
        if let Some((va, result)) = stop {
            match result {
                PageResult::Out(_) => unreachable!("the walk stops only on a fault or an error"),
                PageResult::Efault => return Err(Errno::EFAULT),
                PageResult::Fault(write) => {
                    *last = va;
                    let vma_write = self
                        .mms()
                        .mm(range.pid)
                        .vma(va)
                        .is_some_and(|v| v.flags.contains(VmFlags::WRITE));
                    if write && !vma_write {
                        return Err(Errno::EPERM);
                    }
                    self.spend(self.costs.hmm_walk_page.saturating_mul(walked))
                        .await;
                    // Fault the run of pages up to the next PMD boundary that need it, as the walk does.
                    let pmd_end = va
                        .align_down(PageSize::Size2M.bytes())
                        .add(PageSize::Size2M.bytes())
                        .min(range.end);
                    let mut page = va;
                    while page < pmd_end {
                        let i = usize::try_from((page.raw() - range.start.raw()) / PAGE_SIZE)
                            .expect("fits");
                        let req = (range.hmm_pfns[i] & range.pfn_flags_mask) | range.default_flags;
                        let r = {
                            let st = self.mms();
                            let phys = self.phys();
                            let leaf = st.mm(range.pid).pt().lookup(page);
                            classify(
                                &st,
                                &phys,
                                range.pid,
                                page,
                                leaf,
                                req,
                                range.dev_private_owner,
                            )
                        };
                        match r {
                            PageResult::Fault(w) => {
                                if w && !vma_write {
                                    break;
                                }
                                self.handle_mm_fault(range.pid, page, w)
                                    .await
                                    .map_err(|_| Errno::EFAULT)?;
                            }
                            _ => break,
                        }
                        page = page.add(PAGE_SIZE);
                    }
                    return Ok(false);
                }
            }
        }
        self.spend(self.costs.hmm_walk_page.saturating_mul(walked))
            .await;
        Ok(true)
    }
}
