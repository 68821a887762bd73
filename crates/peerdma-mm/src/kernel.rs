//! The kernel facade: [`Kernel`] (one per simulation, shared as `Rc<Kernel>`), with construction, processes,
//! NUMA placement and the helpers every mechanism shares (VMA lookup and splitting, range checks).
//!
//! **Each subsystem owns its state, in a cell of its own.** `Kernel` holds one `RefCell` per subsystem and
//! lends each through a crate-private borrow: `Kernel::mms` (every `AddressSpace` — VMAs, page table,
//! interval notifiers — in the `Mms` table), `Kernel::phys` ([`PhysMem`]: frames, regions, the page
//! allocator), `Kernel::swap` ([`crate::vmscan::Swap`]: swap slots and LRU lists), `Kernel::files` (the page
//! cache, [`crate::file`]), `Kernel::p2p` ([`crate::p2pdma::P2pState`]) and `Kernel::oracle`
//! ([`crate::oracle::Oracle`]). There is no borrow of the whole state. Every state type keeps its fields
//! private and changes only through its own methods (`tests/state_privacy.rs` checks the sources); a
//! mechanism borrows just the subsystems it touches, and a helper that needs several takes them as parameters
//! (`Mms::zap_range(&mut PhysMem, &mut Swap, …)`), so its signature says what it changes. Two borrows of the
//! same cell at once would panic: a mechanism borrows each cell once per atomic step, and a helper never
//! borrows a cell itself.
//!
//! The mechanisms are `impl Kernel` / `impl Mms` blocks in one module each, named after Linux's mm/ files:
//! [`crate::memory`] (faults, COW, zap), [`crate::mmap`], [`crate::mprotect`], [`crate::mremap`],
//! [`crate::madvise`], [`crate::khugepaged`], [`crate::fork`] (fork and exit), [`crate::filemap`] (page cache,
//! truncate), [`crate::mmu_notifier`] (mmu interval notifiers), [`crate::rmap`], [`crate::gup`],
//! [`crate::hmm`], [`crate::migrate`], [`crate::migrate_device`], [`crate::vmscan`] (reclaim),
//! [`crate::p2pdma`], [`crate::device_access`] (the oracle's device checks) and [`crate::introspect`] (the
//! narrow read-only questions other crates may ask). Other crates never borrow any of the cells: the state
//! types and their accessors are crate-private.
//!
//! Every operation that can sleep in Linux is an `async fn` here, and sleeps at the same points: taking
//! `mmap_lock`, calling interval-notifier callbacks (which take driver locks), and the time the operation
//! costs. Between two `.await`s an operation is atomic; state lives in `RefCell`s that are never borrowed
//! across an `.await`.
//!
//! NUMA: RAM is one region per node ([`Kernel::new_numa`]). Each process has a home node (0 unless
//! [`Kernel::set_home_node`] says otherwise; a fork child inherits its parent's), standing for the node of the
//! CPU it runs on under the default local policy. Its faults, COW copies, swap-ins, THPs and driver pages
//! allocate from the home node first and fall back to the others ([`crate::phys`] module docs); page-cache
//! pages, which no one process owns, prefer node 0.
//!
//! Movable memory: a node made movable ([`Kernel::set_node_movable`]) is ZONE_MOVABLE. Anonymous pages
//! (faults, COW copies, THPs, swap-ins) may land there; kernel/driver pages, hugetlb pages and page-cache
//! pages never do ([`crate::phys::GfpZone::for_owner`]; hugetlb pages stay out because the model cannot
//! migrate them). While a long-term GUP runs on an address space it holds the `memalloc_pin_save` scope
//! (`AddressSpace::memalloc_pin`, [`Kernel::memalloc_pin_depth`]): that address space's anonymous
//! allocations then avoid movable nodes too (faults, COW copies, THPs and swap-ins). *Simplification:*
//! Linux's `PF_MEMALLOC_PIN` is a flag of the calling task; the model has no tasks and puts it on the
//! address space, so another agent faulting in the same address space meanwhile also
//! allocates outside movable memory (placement only, never correctness: the long-term loop re-checks).
//!
//! Lock order (DESIGN.md terms): `mmap_lock` → notifier sequence → driver lock. Notifier callbacks are called
//! between `range_start` and `range_end`, never from inside a page-table update step.

use std::cell::{RefCell, RefMut};
use std::collections::BTreeMap;
use std::rc::Rc;

use peerdma_core::{Errno, FrameId, PAGE_SIZE, Pid, Range, SimDuration, Va};
use peerdma_sim::{RwSem, Sim, WaitQueue};

use crate::costs::MmCosts;
use crate::file::PageCache;
use crate::mmu_notifier::{NotifierId, NotifierState};
use crate::oracle::{LogicalPage, Oracle};
use crate::p2pdma::P2pState;
use crate::pagetable::{Leaf, PageTable, Pte};
use crate::phys::{FrameOwner, GfpZone, MovableError, PhysMem};
use crate::vm_object::VmObjects;
use crate::vma::{Vma, VmaBacking};
use crate::vmscan::Swap;

/// Lowest address `mmap` hands out without a hint (`mmap_min_addr` is far lower; this keeps reports readable).
pub const MMAP_MIN: u64 = 0x1_0000_0000;
/// Where top-down `mmap` placement starts (`mmap_base`).
pub const MMAP_BASE: u64 = 0x7f00_0000_0000;
/// The end of user address space (`TASK_SIZE` for 47-bit x86-64).
pub const TASK_SIZE: u64 = 0x7fff_ffff_f000;

/// Transparent hugepage policy (`/sys/kernel/mm/transparent_hugepage/enabled`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ThpPolicy {
    /// THP for every eligible anonymous VMA without VM_NOHUGEPAGE.
    Always,
    /// THP only for VMAs with VM_HUGEPAGE (the common distribution default).
    #[default]
    Madvise,
    /// Never.
    Never,
}

/// How a CPU access ended when it could not complete, and the signal number it carries (defined in
/// `peerdma-core`).
pub use peerdma_core::{SigInfo, Signal};

/// Why a fault handler could not resolve a fault (Linux's `vm_fault_t` error bits), returned by
/// [`crate::DevicePagemapOps::migrate_to_ram`] and the swap-in path.
///
/// The fault path turns either into SIGBUS at the faulting address ([`VmFault::signal`]).
/// *Simplification:* Linux answers a user fault's `VM_FAULT_OOM` with `pagefault_out_of_memory` (the OOM
/// killer, then a retry); the model has no OOM killer and delivers SIGBUS instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmFault {
    /// `VM_FAULT_SIGBUS`: the page cannot be made accessible (the device is gone, the migration failed).
    Sigbus,
    /// `VM_FAULT_OOM`: no page could be allocated for it.
    Oom,
}

impl VmFault {
    /// Returns the signal a CPU access at `addr` gets for this fault result: SIGBUS for both (type docs).
    pub fn signal(self, addr: Va) -> SigInfo {
        match self {
            Self::Sigbus | Self::Oom => SigInfo::bus(addr),
        }
    }
}

/// One process address space (`struct mm_struct`).
#[derive(Debug)]
pub(crate) struct AddressSpace {
    /// The owning process.
    pid: Pid,
    /// VMAs by start address.
    vmas: BTreeMap<Va, Vma>,
    /// The CPU page table.
    pt: PageTable,
    /// Interval notifiers.
    notifiers: NotifierState,
    /// `mmap_lock`.
    mmap_lock: RwSem,
    /// False once the process exited.
    alive: bool,
    /// The NUMA node its allocations prefer (the default local policy's node).
    home_node: u32,
    /// Depth of `memalloc_pin_save` scopes open on it (long-term GUP): while non-zero its anonymous
    /// allocations avoid movable memory (module docs).
    memalloc_pin: u32,
}

impl AddressSpace {
    /// Returns the owning process.
    pub(crate) fn pid(&self) -> Pid {
        self.pid
    }

    /// Returns the VMAs by start address.
    pub(crate) fn vmas(&self) -> &BTreeMap<Va, Vma> {
        &self.vmas
    }

    /// Inserts `vma` (which must not overlap another; callers clear the range first).
    pub(crate) fn insert_vma(&mut self, vma: Vma) {
        debug_assert!(self.vmas_in(vma.range).is_empty(), "overlapping VMA");
        self.vmas.insert(vma.range.start, vma);
    }

    /// Returns the VMA starting at `start`, mutably (its flags or backing change; it may grow into a free
    /// gap).
    pub(crate) fn vma_mut(&mut self, start: Va) -> Option<&mut Vma> {
        self.vmas.get_mut(&start)
    }

    /// Removes every VMA (exit).
    pub(crate) fn clear_vmas(&mut self) {
        self.vmas.clear();
    }

    /// Returns the CPU page table.
    pub(crate) fn pt(&self) -> &PageTable {
        &self.pt
    }

    /// Returns the CPU page table, mutably.
    pub(crate) fn pt_mut(&mut self) -> &mut PageTable {
        &mut self.pt
    }

    /// Returns the interval-notifier state.
    pub(crate) fn notifiers(&self) -> &NotifierState {
        &self.notifiers
    }

    /// Returns the interval-notifier state, mutably.
    pub(crate) fn notifiers_mut(&mut self) -> &mut NotifierState {
        &mut self.notifiers
    }

    /// Returns whether the process is still alive (not exited).
    pub(crate) fn is_alive(&self) -> bool {
        self.alive
    }

    /// Marks the process exited (its mappings are gone).
    pub(crate) fn mark_exited(&mut self) {
        self.alive = false;
    }

    /// Returns the depth of `memalloc_pin_save` scopes open on it.
    pub(crate) fn memalloc_pin_depth(&self) -> u32 {
        self.memalloc_pin
    }

    /// Opens a `memalloc_pin_save` scope.
    pub(crate) fn memalloc_pin_save(&mut self) {
        self.memalloc_pin += 1;
    }

    /// Closes a `memalloc_pin_save` scope (`memalloc_pin_restore`).
    pub(crate) fn memalloc_pin_restore(&mut self) {
        self.memalloc_pin -= 1;
    }

    /// Returns the VMA containing `va` (`vma_lookup`).
    pub(crate) fn vma(&self, va: Va) -> Option<&Vma> {
        let (_, v) = self.vmas.range(..=va).next_back()?;
        v.range.contains(va).then_some(v)
    }

    /// Returns the VMAs intersecting `r`, in order.
    pub(crate) fn vmas_in(&self, r: Range<Va>) -> Vec<Vma> {
        let first = self
            .vmas
            .range(..=r.start)
            .next_back()
            .map_or(r.start, |(k, _)| *k);
        self.vmas
            .range(first..r.end)
            .map(|(_, v)| v)
            .filter(|v| v.range.overlaps(&r))
            .cloned()
            .collect()
    }

    /// Returns the end of the part of `r` that VMAs cover without a hole from `r.start` (`r.start` when the
    /// first page is unmapped): how far `mprotect` gets before its ENOMEM.
    pub(crate) fn mapped_prefix_end(&self, r: Range<Va>) -> Va {
        let mut cur = r.start;
        for v in self.vmas_in(r) {
            if v.range.start > cur {
                break;
            }
            cur = v.range.end;
        }
        cur.min(r.end)
    }

    /// Returns whether every page of `r` lies in some VMA.
    pub(crate) fn fully_mapped(&self, r: Range<Va>) -> bool {
        let mut cur = r.start;
        for v in self.vmas_in(r) {
            if v.range.start > cur {
                return false;
            }
            cur = v.range.end;
        }
        cur >= r.end
    }

    /// Returns the frame and write permission a *present* mapping gives `va`, if any.
    pub(crate) fn translate(&self, va: Va) -> Option<(FrameId, bool, Leaf)> {
        let leaf = self.pt.lookup(va)?;
        match leaf.pte {
            Pte::Present { write, .. } => Some((leaf.frame_at(va)?, write, leaf)),
            _ => None,
        }
    }
}

/// Every process address space, by pid (the model's task list as far as mm sees it), with the id counters
/// of processes and interval notifiers. Borrow it only between awaits.
#[derive(Debug)]
pub(crate) struct Mms {
    by_pid: BTreeMap<Pid, AddressSpace>,
    next_pid: u32,
    next_notifier: u64,
    /// Which address spaces may map a page ([`crate::rmap`]).
    scopes: crate::rmap::Scopes,
}

impl Mms {
    /// Creates an empty address space for a new process (running on `home_node`) and returns its pid.
    pub(crate) fn create(&mut self, sim: &Sim, home_node: u32) -> Pid {
        let pid = Pid(self.next_pid);
        self.next_pid += 1;
        let mm = AddressSpace {
            pid,
            vmas: BTreeMap::new(),
            pt: PageTable::new(),
            notifiers: NotifierState::default(),
            mmap_lock: RwSem::new(sim, "mmap_lock"),
            alive: true,
            home_node,
            memalloc_pin: 0,
        };
        self.by_pid.insert(pid, mm);
        pid
    }

    /// Returns the links from pages to the address spaces that may map them ([`crate::rmap`]).
    pub(crate) fn scopes(&self) -> &crate::rmap::Scopes {
        &self.scopes
    }

    /// Returns the links from pages to address spaces, mutably (fork, VMA insertion).
    pub(crate) fn scopes_mut(&mut self) -> &mut crate::rmap::Scopes {
        &mut self.scopes
    }

    /// Returns a fresh interval-notifier id.
    pub(crate) fn new_notifier_id(&mut self) -> NotifierId {
        let id = NotifierId(self.next_notifier);
        self.next_notifier += 1;
        id
    }

    /// Returns the address space of `pid`, if the process was created.
    pub(crate) fn get(&self, pid: Pid) -> Option<&AddressSpace> {
        self.by_pid.get(&pid)
    }

    /// Returns the address space of `pid` mutably, if the process was created.
    pub(crate) fn get_mut(&mut self, pid: Pid) -> Option<&mut AddressSpace> {
        self.by_pid.get_mut(&pid)
    }

    /// Returns the address spaces of live (not exited) processes, by pid.
    pub(crate) fn live(&self) -> impl Iterator<Item = &AddressSpace> {
        self.by_pid.values().filter(|mm| mm.alive)
    }

    /// Returns the address space of `pid`.
    ///
    /// # Panics
    /// Panics for an unknown pid (pids come from [`Kernel::create_process`] / [`Kernel::fork`]).
    pub(crate) fn mm(&self, pid: Pid) -> &AddressSpace {
        self.by_pid.get(&pid).expect("pid of a created process")
    }

    /// Returns the address space of `pid`, mutably.
    pub(crate) fn mm_mut(&mut self, pid: Pid) -> &mut AddressSpace {
        self.by_pid.get_mut(&pid).expect("pid of a created process")
    }

    /// Returns the home node of `pid` (0 for a pid with no address space).
    pub(crate) fn home_node(&self, pid: Pid) -> u32 {
        self.get(pid).map_or(0, |mm| mm.home_node)
    }

    /// Returns the zone limit of `pid`'s anonymous allocations: [`GfpZone::Movable`], or
    /// [`GfpZone::Normal`] inside a `memalloc_pin_save` scope (module docs).
    pub(crate) fn anon_zone(&self, pid: Pid) -> GfpZone {
        match self.get(pid) {
            Some(mm) if mm.memalloc_pin > 0 => GfpZone::Normal,
            _ => GfpZone::Movable,
        }
    }

    /// Allocates an anonymous RAM page for `pid`: its home node first, then fallback
    /// ([`PhysMem::alloc_node_in`]), within [`Mms::anon_zone`].
    pub(crate) fn alloc_anon_for(
        &self,
        phys: &mut PhysMem,
        pid: Pid,
    ) -> Result<FrameId, crate::phys::OutOfMemory> {
        let home = self.home_node(pid);
        let zone = self.anon_zone(pid);
        let f = phys.alloc_node_in(home, FrameOwner::Anon, zone)?;
        // folio_add_new_anon_rmap: the new page belongs to the faulting address space's anon_vma.
        phys.frame_mut(f).set_anon_vma(pid);
        Ok(f)
    }

    /// Returns the logical page the oracle tracks for `va` in `pid` (see [`LogicalPage`]).
    pub(crate) fn logical_page(&self, phys: &PhysMem, pid: Pid, va: Va) -> Option<LogicalPage> {
        let mm = self.get(pid)?;
        let vma = mm.vma(va)?;
        let vpn = va.page_number();
        match vma.backing {
            VmaBacking::Anon => Some(LogicalPage::Anon { pid, vpn }),
            VmaBacking::Driver
            | VmaBacking::P2pMem { .. }
            | VmaBacking::Mmio { .. }
            | VmaBacking::VmObject { .. } => None,
            VmaBacking::File { .. } => {
                let (file, pgoff) = vma.file_pgoff(va)?;
                if vma.is_shared() {
                    return Some(LogicalPage::File { file, pgoff });
                }
                // A private file mapping reads the file until the page is COWed into an anonymous page (which
                // may since have migrated to device memory: any entry naming an anonymous frame counts).
                let frame = mm.pt.lookup(va).and_then(|l| l.frame_at(va));
                match frame {
                    Some(f) if phys.frame(f).owner() == FrameOwner::Anon => {
                        Some(LogicalPage::Anon { pid, vpn })
                    }
                    _ => Some(LogicalPage::File { file, pgoff }),
                }
            }
        }
    }

    /// Removes `r` from the VMA map, splitting VMAs at its edges.
    pub(crate) fn remove_vmas(&mut self, pid: Pid, r: Range<Va>) {
        let mm = self.mm_mut(pid);
        for v in mm.vmas_in(r) {
            mm.vmas.remove(&v.range.start);
            if v.range.start < r.start {
                let left = v.slice(Range::new(v.range.start, r.start));
                mm.vmas.insert(left.range.start, left);
            }
            if v.range.end > r.end {
                let right = v.slice(Range::new(r.end, v.range.end));
                mm.vmas.insert(right.range.start, right);
            }
        }
    }

    /// Splits VMAs so that `r`'s edges are VMA boundaries (`split_vma`), returning the VMAs inside `r`.
    pub(crate) fn split_at(&mut self, pid: Pid, r: Range<Va>) -> Vec<Va> {
        let mm = self.mm_mut(pid);
        let mut inside = Vec::new();
        for v in mm.vmas_in(r) {
            let mid = v.range.intersection(&r).expect("overlapping");
            if mid == v.range {
                inside.push(v.range.start);
                continue;
            }
            mm.vmas.remove(&v.range.start);
            for part in [
                Range::new(v.range.start, mid.start),
                mid,
                Range::new(mid.end, v.range.end),
            ] {
                if !part.is_empty() {
                    let s = v.slice(part);
                    mm.vmas.insert(part.start, s);
                }
            }
            inside.push(mid.start);
        }
        inside
    }
}

/// The callbacks of each device memory region (`dev_pagemap`), by region index.
type Pgmaps = BTreeMap<usize, Rc<dyn crate::migrate::DevicePagemapOps>>;

/// The simulated kernel: one per simulation, shared by every agent as `Rc<Kernel>`.
#[derive(Debug)]
pub struct Kernel {
    /// The engine.
    pub sim: Sim,
    /// Timing parameters.
    pub costs: MmCosts,
    /// Every address space: VMAs, page tables, interval notifiers ([`Mms`]).
    mms: RefCell<Mms>,
    /// The coherence oracle: it watches the model and owns only its shadow records.
    oracle: RefCell<Oracle>,
    /// Physical memory: the frames (`struct page`s), their regions and the page allocator ([`crate::phys`]).
    phys: RefCell<PhysMem>,
    /// P2P memory regions' removal state and MMIO ranges without struct pages.
    p2p: RefCell<P2pState>,
    /// The swap device and the anonymous LRU lists ([`crate::vmscan`]).
    swap: RefCell<Swap>,
    /// The files and their page caches ([`crate::filemap`]).
    files: RefCell<PageCache>,
    /// Transparent hugepage policy (the default, [`ThpPolicy::Madvise`]; nothing changes it yet).
    thp: ThpPolicy,
    /// Wakes waiters for an invalidation to end (`mmu_interval_notifier_remove`, `mmu_interval_read_begin`).
    notifier_wq: WaitQueue,
    /// Wakes CPU accesses waiting on migration entries.
    migration_wq: WaitQueue,
    /// Wakes waiters for pins to drop (DAX truncate).
    pin_wq: WaitQueue,
    /// The callbacks of each device memory region (`dev_pagemap`), by region index.
    pgmaps: RefCell<Pgmaps>,
    /// Drivers' mapping objects and their fault handlers ([`crate::vm_object`]).
    vm_objects: RefCell<VmObjects>,
}

/// The outcome of a fault: the access can be retried, or it raised a signal.
pub(crate) type FaultResult = Result<(), SigInfo>;

impl Kernel {
    /// Creates a kernel with `ram_bytes` of RAM on node 0 (one NUMA node).
    pub fn new(sim: &Sim, ram_bytes: u64, costs: MmCosts) -> Rc<Self> {
        Self::new_numa(sim, &[ram_bytes], costs)
    }

    /// Creates a kernel with one RAM node per entry of `node_sizes` (bytes, each rounded down to 2 MiB, at
    /// least 2 MiB); node `n` is region `n`, and the zero page is on node 0.
    ///
    /// # Panics
    /// Panics when `node_sizes` is empty.
    pub fn new_numa(sim: &Sim, node_sizes: &[u64], costs: MmCosts) -> Rc<Self> {
        Rc::new(Self {
            sim: sim.clone(),
            costs,
            mms: RefCell::new(Mms {
                by_pid: BTreeMap::new(),
                next_pid: 1,
                next_notifier: 1,
                scopes: crate::rmap::Scopes::default(),
            }),
            oracle: RefCell::new(Oracle::new(sim.clone())),
            phys: RefCell::new(PhysMem::new_numa(node_sizes)),
            p2p: RefCell::new(P2pState::default()),
            swap: RefCell::new(Swap::default()),
            files: RefCell::new(PageCache::default()),
            thp: ThpPolicy::default(),
            notifier_wq: WaitQueue::new(sim),
            migration_wq: WaitQueue::new(sim),
            pin_wq: WaitQueue::new(sim),
            pgmaps: RefCell::new(BTreeMap::new()),
            vm_objects: RefCell::new(BTreeMap::new()),
        })
    }

    /// Returns the transparent hugepage policy.
    pub(crate) fn thp(&self) -> ThpPolicy {
        self.thp
    }

    /// Returns the wait queue of invalidation ends.
    pub(crate) fn notifier_wq(&self) -> &WaitQueue {
        &self.notifier_wq
    }

    /// Returns the wait queue of migration-entry waiters (woken when a migration finishes).
    pub(crate) fn migration_wq(&self) -> &WaitQueue {
        &self.migration_wq
    }

    /// Returns the wait queue of pin-drop waiters (DAX truncate).
    pub(crate) fn pin_wq(&self) -> &WaitQueue {
        &self.pin_wq
    }

    /// Ends the simulation for good: drops every driver callback the kernel holds (interval notifiers of
    /// every address space, device memory regions' `dev_pagemap` callbacks, drivers' mapping objects) and
    /// every agent's future ([`peerdma_sim::Sim::shutdown`]). A driver's callback holds the kernel (an open
    /// mirror's notifier, a device's pagemap), so without this a run that ends with a file still open keeps
    /// the kernel, its devices and its engine alive in a reference cycle. Call it once the results are read.
    pub fn shutdown(&self) {
        let notifiers: Vec<_> = {
            let mut mms = self.mms();
            mms.by_pid
                .values_mut()
                .map(|mm| mm.notifiers_mut().take_all())
                .collect()
        };
        let pgmaps = std::mem::take(&mut *self.pgmaps());
        let objects = std::mem::take(&mut *self.vm_objects());
        // Dropped outside the borrows: a callback's destructor may reach the kernel.
        drop((notifiers, pgmaps, objects));
        self.sim.shutdown();
    }

    /// Borrows the callbacks of each device memory region (`dev_pagemap`), by region index.
    pub(crate) fn pgmaps(&self) -> RefMut<'_, Pgmaps> {
        self.pgmaps.borrow_mut()
    }

    /// Borrows the drivers' mapping objects ([`crate::vm_object`]).
    pub(crate) fn vm_objects(&self) -> RefMut<'_, VmObjects> {
        self.vm_objects.borrow_mut()
    }

    /// Borrows the address spaces. Never hold the borrow across an `.await`.
    pub(crate) fn mms(&self) -> RefMut<'_, Mms> {
        self.mms.borrow_mut()
    }

    /// Borrows physical memory. Never hold the borrow across an `.await`.
    pub(crate) fn phys(&self) -> RefMut<'_, PhysMem> {
        self.phys.borrow_mut()
    }

    /// Borrows the coherence oracle. Never hold the borrow across an `.await`.
    pub(crate) fn oracle(&self) -> RefMut<'_, Oracle> {
        self.oracle.borrow_mut()
    }

    /// Borrows the P2P state ([`crate::p2pdma`]). Never hold the borrow across an `.await`.
    pub(crate) fn p2p(&self) -> RefMut<'_, P2pState> {
        self.p2p.borrow_mut()
    }

    /// Borrows the swap device and LRU lists ([`crate::vmscan`]). Never hold the borrow across an `.await`.
    pub(crate) fn swap(&self) -> RefMut<'_, Swap> {
        self.swap.borrow_mut()
    }

    /// Borrows the files and their page caches. Never hold the borrow across an `.await`.
    pub(crate) fn files(&self) -> RefMut<'_, PageCache> {
        self.files.borrow_mut()
    }

    /// Sleeps for `d` (jittered) in simulated time.
    pub async fn spend(&self, d: SimDuration) {
        if d.0 > 0 {
            let d = self.sim.jitter(d);
            self.sim.sleep(d).await;
        }
    }

    /// Creates a process with an empty address space.
    pub fn create_process(&self) -> Pid {
        self.mms().create(&self.sim, 0)
    }

    /// Returns the number of RAM (NUMA) nodes.
    pub fn nr_nodes(&self) -> u32 {
        self.phys().nr_nodes()
    }

    /// Sets the NUMA node `pid`'s allocations prefer from now on (the node of the CPU it runs on, under the
    /// default local policy); pages already allocated stay where they are.
    ///
    /// # Errors
    /// `EINVAL` when `node` is not below [`Kernel::nr_nodes`] (as `set_mempolicy` refuses an offline node).
    pub fn set_home_node(&self, pid: Pid, node: u32) -> Result<(), Errno> {
        let mut st = self.mms();
        let phys = self.phys();
        if node >= phys.nr_nodes() {
            return Err(Errno::EINVAL);
        }
        st.mm_mut(pid).home_node = node;
        Ok(())
    }

    /// Returns the NUMA node `pid`'s allocations prefer.
    pub fn home_node(&self, pid: Pid) -> u32 {
        self.mms().home_node(pid)
    }

    /// Chooses how page contents are kept ([`crate::phys::DataMode`]: bytes, or a version per page in
    /// token mode), before any page is written.
    ///
    /// # Errors
    /// [`crate::phys::DataModeError`] once a page was written.
    pub fn set_data_mode(
        &self,
        mode: crate::phys::DataMode,
    ) -> Result<(), crate::phys::DataModeError> {
        self.phys().set_data_mode(mode)
    }

    /// Returns how page contents are kept.
    pub fn data_mode(&self) -> crate::phys::DataMode {
        self.phys().data_mode()
    }

    /// Makes RAM node `node` movable (ZONE_MOVABLE; [`PhysMem::set_node_movable`]), before anything is
    /// allocated on it: from then on only anonymous pages land there, and long-term GUP migrates them out.
    ///
    /// # Errors
    /// [`MovableError`] for a node out of range, node 0, or a node already in use.
    pub fn set_node_movable(&self, node: u32) -> Result<(), MovableError> {
        self.phys().set_node_movable(node)
    }

    /// Returns whether frame `f` is in movable memory (`is_zone_movable_page`).
    pub fn is_zone_movable_page(&self, f: FrameId) -> bool {
        self.phys().is_zone_movable_page(f)
    }

    /// Allocates a zero-filled anonymous RAM page with the allocation policy of `pid` (its home node, then
    /// fallback, within `Mms::anon_zone`), or of node 0 when no process is known (`None`: device
    /// eviction, for instance; movable memory allowed, as `GFP_HIGHUSER_MOVABLE`). Device memory migrating
    /// back to RAM allocates here.
    pub fn alloc_ram_page(&self, pid: Option<Pid>) -> Option<FrameId> {
        let zone = pid.map_or(GfpZone::Movable, |p| self.mms().anon_zone(p));
        self.alloc_ram_page_in(pid, zone)
    }

    /// Allocates a zero-filled anonymous RAM page as [`Kernel::alloc_ram_page`] does, limited to `zone`
    /// ([`GfpZone::Normal`]: never from a movable node, the destination of a long-term GUP migration).
    pub fn alloc_ram_page_in(&self, pid: Option<Pid>, zone: GfpZone) -> Option<FrameId> {
        let st = self.mms();
        let mut phys = self.phys();
        let home = pid.map_or(0, |p| st.home_node(p));
        phys.alloc_node_in(home, FrameOwner::Anon, zone).ok()
    }

    /// Returns `pid`'s `mmap_lock`.
    pub fn mmap_lock(&self, pid: Pid) -> RwSem {
        self.mms().mm(pid).mmap_lock.clone()
    }

    // ------------------------------------------------------------------------------------------ notifiers

    // ------------------------------------------------------------------------------------------ syscalls

    /// Yields to every agent runnable now: a point where work on other CPUs interleaves with this one.
    /// With exploration on, it is also where the engine may preempt ([`peerdma_sim::Sim::preempt_point`]).
    pub async fn preempt_point(&self) {
        if self.sim.exploring() {
            self.sim.preempt_point().await;
        } else {
            self.sim.sleep(SimDuration::ZERO).await;
        }
    }

    // ------------------------------------------------------------------------------------------ CPU access
}

/// Validates a `[addr, addr + len)` range argument of munmap/mprotect/madvise (mm/mmap.c): the address page
/// aligned, the length non-zero once rounded up to pages, and the range inside user space.
pub(crate) fn check_range(addr: Va, len: u64) -> Result<Range<Va>, Errno> {
    if !addr.is_page_aligned() || len == 0 {
        return Err(Errno::EINVAL);
    }
    let len = len
        .checked_next_multiple_of(PAGE_SIZE)
        .ok_or(Errno::EINVAL)?;
    let r = Range::from_len(addr, len).ok_or(Errno::EINVAL)?;
    if r.end.raw() > TASK_SIZE {
        return Err(Errno::EINVAL);
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_fault_oom_is_delivered_as_sigbus_at_the_address() {
        let addr = Va::from_raw(0x1000);
        assert_eq!(VmFault::Oom.signal(addr), SigInfo::bus(addr));
    }

    #[test]
    fn vm_fault_sigbus_is_sigbus_at_the_address() {
        let addr = Va::from_raw(0x2000);
        assert_eq!(VmFault::Sigbus.signal(addr), SigInfo::bus(addr));
    }
}
