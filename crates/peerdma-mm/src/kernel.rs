//! The kernel object: physical memory, address spaces, files and the oracle, and the system calls and fault
//! paths that change them.
//!
//! Every operation that can sleep in Linux is an `async fn` here, and sleeps at the same points: taking
//! `mmap_lock`, calling interval-notifier callbacks (which take driver locks), and the time the operation
//! costs. Between two `.await`s an operation is atomic; state lives in a `RefCell` that is never borrowed
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
//! (`AddressSpace::memalloc_pin`, [`Kernel::memalloc_pin_depth`]): that address space's anonymous allocations then avoid movable nodes
//! too (faults, COW copies, THPs and swap-ins). *Simplification:* Linux's `PF_MEMALLOC_PIN` is a flag of the calling task; the model has no tasks
//! and puts it on the address space, so another agent faulting in the same address space meanwhile also
//! allocates outside movable memory (placement only, never correctness: the long-term loop re-checks).
//!
//! Lock order (DESIGN.md terms): `mmap_lock` → notifier sequence → driver lock. Notifier callbacks are called
//! between `range_start` and `range_end`, never from inside a page-table update step.

use std::cell::{RefCell, RefMut};
use std::collections::BTreeMap;
use std::rc::Rc;

use peerdma_core::{
    DeviceId, Errno, FrameId, PAGE_SIZE, PMD_SIZE, PageSize, Pid, Range, SimDuration, Va,
};
use peerdma_sim::{RwSem, Sim, WaitQueue};

use crate::costs::MmCosts;
use crate::device_access::FrameTranslation;
use crate::file::File;
use crate::notifier::{
    IntervalNotifierOps, NotifierEvent, NotifierId, NotifierRange, NotifierState,
};
use crate::oracle::{LogicalPage, Oracle, ViolationKind};
use crate::pagetable::{Leaf, PageTable, Pte};
use crate::phys::{FRAMES_PER_PMD, FrameOwner, GfpZone, MemoryKind, MovableError, PhysMem};
use crate::vma::{Prot, VmFlags, Vma, VmaBacking};

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

/// How a CPU access ended when it could not complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// SIGSEGV: no VMA, or the VMA forbids the access.
    Segv {
        /// The faulting address.
        addr: Va,
    },
    /// SIGBUS: the VMA exists but nothing can back the page (beyond EOF, hugetlb pool empty, OOM).
    Bus {
        /// The faulting address.
        addr: Va,
    },
}

/// Arguments of [`Kernel::mmap`].
#[derive(Clone, Debug, Default)]
pub struct MmapArgs {
    /// Hint, or the exact address with `fixed`/`fixed_noreplace`.
    pub addr: Option<Va>,
    /// Length in bytes (rounded up to pages).
    pub len: u64,
    /// Protection.
    pub prot: Prot,
    /// MAP_SHARED (else MAP_PRIVATE).
    pub shared: bool,
    /// MAP_PRIVATE was given (exactly one of shared/private must be).
    pub private: bool,
    /// MAP_ANONYMOUS.
    pub anonymous: bool,
    /// MAP_FIXED.
    pub fixed: bool,
    /// MAP_FIXED_NOREPLACE.
    pub fixed_noreplace: bool,
    /// MAP_POPULATE.
    pub populate: bool,
    /// MAP_HUGETLB (2 MiB pages).
    pub hugetlb: bool,
    /// The file for a file mapping.
    pub file: Option<u32>,
    /// File offset in bytes (page aligned).
    pub offset: u64,
    /// A name for reports.
    pub name: Option<String>,
}

/// One process address space (`struct mm_struct`).
#[derive(Debug)]
pub(crate) struct AddressSpace {
    /// The owning process.
    pub(crate) pid: Pid,
    /// VMAs by start address.
    pub(crate) vmas: BTreeMap<Va, Vma>,
    /// The CPU page table.
    pub(crate) pt: PageTable,
    /// Interval notifiers.
    pub(crate) notifiers: NotifierState,
    /// `mmap_lock`.
    pub(crate) mmap_lock: RwSem,
    /// False once the process exited.
    pub(crate) alive: bool,
    /// The NUMA node its allocations prefer (the default local policy's node).
    pub(crate) home_node: u32,
    /// Depth of `memalloc_pin_save` scopes open on it (long-term GUP): while non-zero its anonymous
    /// allocations avoid movable memory (module docs).
    pub(crate) memalloc_pin: u32,
}

impl AddressSpace {
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

    /// Returns whether every byte of `r` lies in some VMA.
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

/// Mutable kernel state. Borrow it only between awaits.
#[derive(Debug)]
pub(crate) struct KernelState {
    /// Physical memory.
    pub(crate) phys: PhysMem,
    /// Address spaces by pid.
    pub(crate) mms: BTreeMap<Pid, AddressSpace>,
    /// Files by id.
    pub(crate) files: Vec<File>,
    /// The coherence oracle.
    pub(crate) oracle: Oracle,
    /// Transparent hugepage policy.
    pub(crate) thp: ThpPolicy,
    /// The swap device and the anonymous LRU.
    pub(crate) swap: crate::swap::Swap,
    /// P2P memory regions' removal state and MMIO ranges without struct pages.
    pub(crate) p2p: crate::p2p::P2pState,
    next_pid: u32,
    next_notifier: u64,
}

impl KernelState {
    /// Returns the address space of `pid`.
    ///
    /// # Panics
    /// Panics for an unknown pid (pids come from [`Kernel::create_process`] / [`Kernel::fork`]).
    pub(crate) fn mm(&self, pid: Pid) -> &AddressSpace {
        self.mms.get(&pid).expect("pid of a created process")
    }

    /// Returns the address space of `pid`, mutably.
    pub(crate) fn mm_mut(&mut self, pid: Pid) -> &mut AddressSpace {
        self.mms.get_mut(&pid).expect("pid of a created process")
    }

    /// Returns the home node of `pid` (0 for a pid with no address space).
    pub(crate) fn home_node(&self, pid: Pid) -> u32 {
        self.mms.get(&pid).map_or(0, |mm| mm.home_node)
    }

    /// Returns the zone limit of `pid`'s anonymous allocations: [`GfpZone::Movable`], or
    /// [`GfpZone::Normal`] inside a `memalloc_pin_save` scope (module docs).
    pub(crate) fn anon_zone(&self, pid: Pid) -> GfpZone {
        match self.mms.get(&pid) {
            Some(mm) if mm.memalloc_pin > 0 => GfpZone::Normal,
            _ => GfpZone::Movable,
        }
    }

    /// Allocates an anonymous RAM page for `pid`: its home node first, then fallback
    /// ([`PhysMem::alloc_node_in`]), within [`KernelState::anon_zone`].
    pub(crate) fn alloc_anon_for(&mut self, pid: Pid) -> Result<FrameId, crate::phys::OutOfMemory> {
        let home = self.home_node(pid);
        let zone = self.anon_zone(pid);
        self.phys.alloc_node_in(home, FrameOwner::Anon, zone)
    }

    /// Returns the logical page the oracle tracks for `va` in `pid` (see [`LogicalPage`]).
    pub(crate) fn logical_page(&self, pid: Pid, va: Va) -> Option<LogicalPage> {
        let mm = self.mms.get(&pid)?;
        let vma = mm.vma(va)?;
        let vpn = va.page_number();
        match vma.backing {
            VmaBacking::Anon => Some(LogicalPage::Anon { pid, vpn }),
            VmaBacking::Driver | VmaBacking::P2pMem { .. } | VmaBacking::Mmio { .. } => None,
            VmaBacking::File { .. } => {
                let (file, pgoff) = vma.file_pgoff(va)?;
                if vma.is_shared() {
                    return Some(LogicalPage::File { file, pgoff });
                }
                // A private file mapping reads the file until the page is COWed into an anonymous page (which
                // may since have migrated to device memory: any entry naming an anonymous frame counts).
                let frame = mm.pt.lookup(va).and_then(|l| l.frame_at(va));
                match frame {
                    Some(f) if self.phys.frame(f).owner() == FrameOwner::Anon => {
                        Some(LogicalPage::Anon { pid, vpn })
                    }
                    _ => Some(LogicalPage::File { file, pgoff }),
                }
            }
        }
    }

    /// Returns (creating zero-filled on demand) the page-cache frame of `file` at `pgoff`; `None` beyond EOF
    /// or when memory is exhausted.
    pub(crate) fn file_page(&mut self, file: u32, pgoff: u64) -> Option<FrameId> {
        let f = &self.files[file as usize];
        if pgoff >= f.nr_pages() {
            return None;
        }
        if let Some(&frame) = f.pages.get(&pgoff) {
            return Some(frame);
        }
        let owner = FrameOwner::File { file, pgoff };
        // A page-cache page belongs to no one process: node 0 first, then fallback.
        let frame = match f.dax_region {
            Some(region) => self.phys.alloc(region, owner),
            None => self.phys.alloc_node(0, owner),
        }
        .ok()?;
        self.phys.frame_mut(frame).lru = crate::phys::LruState::Inactive;
        self.files[file as usize].pages.insert(pgoff, frame);
        Some(frame)
    }

    /// Drops one mapping of `frame` (mapcount and reference).
    fn unmap_frame(&mut self, frame: FrameId) {
        if frame == self.phys.zero_page() {
            return;
        }
        let fr = self.phys.frame_mut(frame);
        fr.mapcount = fr.mapcount.saturating_sub(1);
        self.phys.put(frame);
    }

    /// Adds one mapping of `frame`.
    fn map_frame(&mut self, frame: FrameId) {
        if frame == self.phys.zero_page() {
            return;
        }
        self.phys.get(frame);
        self.phys.frame_mut(frame).mapcount += 1;
    }

    /// Removes every leaf of `pid` inside `r` (splitting PMD leaves that stick out), dropping frame
    /// references; returns the number of base pages zapped. `keep_file` leaves page-cache pages cached.
    fn zap_range(&mut self, pid: Pid, r: Range<Va>) -> u64 {
        let leaves = self.mm(pid).pt.leaves(r.start, r.end);
        let mut nr = 0;
        for leaf in leaves {
            let leaf_range =
                Range::from_len(leaf.base, leaf.size.bytes()).expect("leaf inside user space");
            if !r.contains_range(&leaf_range) {
                self.mm_mut(pid).pt.split_pmd(leaf.base);
                for page in leaf_range.intersection(&r).expect("leaf overlaps").pages() {
                    if let Some(l) = self.mm_mut(pid).pt.clear(page) {
                        nr += 1;
                        self.drop_leaf_refs(&l);
                    }
                }
                continue;
            }
            let l = self
                .mm_mut(pid)
                .pt
                .clear(leaf.base)
                .expect("leaf listed above");
            nr += l.size.nr_pages();
            self.drop_leaf_refs(&l);
        }
        nr
    }

    fn drop_leaf_refs(&mut self, l: &Leaf) {
        if let Pte::Swap { slot, .. } = l.pte {
            self.swap.free(slot);
            return;
        }
        let special = matches!(l.pte, Pte::Present { special: true, .. });
        if special {
            return;
        }
        if let Some(f) = l.pte.frame() {
            for i in 0..l.size.nr_pages() {
                self.unmap_frame(FrameId(f.0 + i));
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
    fn split_at(&mut self, pid: Pid, r: Range<Va>) -> Vec<Va> {
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

/// The simulated kernel: one per simulation, shared by every agent as `Rc<Kernel>`.
#[derive(Debug)]
pub struct Kernel {
    /// The engine.
    pub sim: Sim,
    /// Timing parameters.
    pub costs: MmCosts,
    state: RefCell<KernelState>,
    notifier_wq: WaitQueue,
    /// Wakes CPU accesses waiting on migration entries.
    pub(crate) migration_wq: WaitQueue,
    /// Wakes waiters for pins to drop (DAX truncate).
    pub(crate) pin_wq: WaitQueue,
    /// The callbacks of each device memory region (`dev_pagemap`), by region index.
    pub(crate) pgmaps: RefCell<BTreeMap<usize, Rc<dyn crate::migrate::DevicePagemapOps>>>,
}

/// The outcome of a fault: the access can be retried, or it raised a signal.
type FaultResult = Result<(), Signal>;

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
            state: RefCell::new(KernelState {
                phys: PhysMem::new_numa(node_sizes),
                mms: BTreeMap::new(),
                files: Vec::new(),
                oracle: Oracle::new(sim.clone()),
                thp: ThpPolicy::default(),
                swap: crate::swap::Swap::default(),
                p2p: crate::p2p::P2pState::default(),
                next_pid: 1,
                next_notifier: 1,
            }),
            notifier_wq: WaitQueue::new(sim),
            migration_wq: WaitQueue::new(sim),
            pin_wq: WaitQueue::new(sim),
            pgmaps: RefCell::new(BTreeMap::new()),
        })
    }

    /// Borrows the kernel state. Never hold the borrow across an `.await`.
    pub(crate) fn state(&self) -> RefMut<'_, KernelState> {
        self.state.borrow_mut()
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
        let mut st = self.state();
        let pid = Pid(st.next_pid);
        st.next_pid += 1;
        let mm = AddressSpace {
            pid,
            vmas: BTreeMap::new(),
            pt: PageTable::new(),
            notifiers: NotifierState::default(),
            mmap_lock: RwSem::new(&self.sim, "mmap_lock"),
            alive: true,
            home_node: 0,
            memalloc_pin: 0,
        };
        st.mms.insert(pid, mm);
        pid
    }

    /// Returns the number of RAM (NUMA) nodes.
    pub fn nr_nodes(&self) -> u32 {
        self.state().phys.nr_nodes()
    }

    /// Sets the NUMA node `pid`'s allocations prefer from now on (the node of the CPU it runs on, under the
    /// default local policy); pages already allocated stay where they are.
    ///
    /// # Errors
    /// `EINVAL` when `node` is not below [`Kernel::nr_nodes`] (as `set_mempolicy` refuses an offline node).
    pub fn set_home_node(&self, pid: Pid, node: u32) -> Result<(), Errno> {
        let mut st = self.state();
        if node >= st.phys.nr_nodes() {
            return Err(Errno::EINVAL);
        }
        st.mm_mut(pid).home_node = node;
        Ok(())
    }

    /// Returns the NUMA node `pid`'s allocations prefer.
    pub fn home_node(&self, pid: Pid) -> u32 {
        self.state().home_node(pid)
    }

    /// Makes RAM node `node` movable (ZONE_MOVABLE; [`PhysMem::set_node_movable`]), before anything is
    /// allocated on it: from then on only anonymous pages land there, and long-term GUP migrates them out.
    ///
    /// # Errors
    /// [`MovableError`] for a node out of range, node 0, or a node already in use.
    pub fn set_node_movable(&self, node: u32) -> Result<(), MovableError> {
        self.state().phys.set_node_movable(node)
    }

    /// Returns whether frame `f` is in movable memory (`is_zone_movable_page`).
    pub fn is_zone_movable_page(&self, f: FrameId) -> bool {
        self.state().phys.is_zone_movable_page(f)
    }

    /// Allocates a zero-filled anonymous RAM page with the allocation policy of `pid` (its home node, then
    /// fallback, within `KernelState::anon_zone`), or of node 0 when no process is known (`None`: device
    /// eviction, for instance; movable memory allowed, as `GFP_HIGHUSER_MOVABLE`). Device memory migrating
    /// back to RAM allocates here.
    pub fn alloc_ram_page(&self, pid: Option<Pid>) -> Option<FrameId> {
        let zone = pid.map_or(GfpZone::Movable, |p| self.state().anon_zone(p));
        self.alloc_ram_page_in(pid, zone)
    }

    /// Allocates a zero-filled anonymous RAM page as [`Kernel::alloc_ram_page`] does, limited to `zone`
    /// ([`GfpZone::Normal`]: never from a movable node, the destination of a long-term GUP migration).
    pub fn alloc_ram_page_in(&self, pid: Option<Pid>, zone: GfpZone) -> Option<FrameId> {
        let mut st = self.state();
        let home = pid.map_or(0, |p| st.home_node(p));
        st.phys.alloc_node_in(home, FrameOwner::Anon, zone).ok()
    }

    /// Returns `pid`'s `mmap_lock`.
    pub fn mmap_lock(&self, pid: Pid) -> RwSem {
        self.state().mm(pid).mmap_lock.clone()
    }

    /// Creates an in-memory file of `size` bytes and returns its id.
    pub fn create_file(&self, name: &str, size: u64, shmem: bool) -> u32 {
        let mut st = self.state();
        let id = u32::try_from(st.files.len()).expect("fewer than 2^32 files");
        st.files.push(File {
            name: name.to_owned(),
            size,
            pages: BTreeMap::new(),
            shmem,
            dax_region: None,
        });
        id
    }

    /// Creates a DAX file of `size` bytes on a persistent-memory region of its own (MEMORY_DEVICE_FS_DAX): its
    /// blocks are frames with struct pages that mappings reach directly, with no page cache in between.
    pub fn create_dax_file(&self, name: &str, size: u64) -> u32 {
        let id = self.create_file(name, size, false);
        let mut st = self.state();
        let r = st.phys.add_region(
            MemoryKind::FsDax { file: id },
            size.div_ceil(PAGE_SIZE).max(1),
        );
        st.files[id as usize].dax_region = Some(r);
        id
    }

    /// `truncate(2)` to `size`: every mapping of the pages past the new end is zapped (inside a CLEAR
    /// invalidation, so mirrors drop them), then — for DAX — the call waits until no pin holds those blocks
    /// (`dax_layout_busy_page`) before they are freed for reuse.
    pub async fn truncate(&self, file: u32, size: u64) -> Result<(), Errno> {
        self.spend(self.costs.syscall).await;
        let first = size.div_ceil(PAGE_SIZE);
        let last = self.state().files[file as usize].nr_pages();
        self.remove_file_pages(file, first, last.max(first)).await;
        self.state().files[file as usize].size = size;
        Ok(())
    }

    /// `fallocate(FALLOC_FL_PUNCH_HOLE)` over `[offset, offset + len)`: like truncate for the whole pages inside.
    ///
    /// # Errors
    /// `EINVAL` for a range that overflows.
    pub async fn punch_hole(&self, file: u32, offset: u64, len: u64) -> Result<(), Errno> {
        self.spend(self.costs.syscall).await;
        let end = offset.checked_add(len).ok_or(Errno::EINVAL)?;
        self.remove_file_pages(file, offset.div_ceil(PAGE_SIZE), end / PAGE_SIZE)
            .await;
        Ok(())
    }

    /// Zaps every mapping of `file`'s pages `[first, last)` in every address space (`unmap_mapping_range`,
    /// COWed private copies included), waits for pins on DAX blocks to drop, then frees the pages.
    async fn remove_file_pages(&self, file: u32, first: u64, last: u64) {
        if first >= last {
            return;
        }
        // The i_mmap walk: every VMA of every process that maps this file range.
        let targets: Vec<(Pid, Range<Va>)> = {
            let st = self.state();
            st.mms
                .values()
                .filter(|mm| mm.alive)
                .flat_map(|mm| mm.vmas.values().map(move |v| (mm.pid, v)))
                .filter_map(|(pid, v)| {
                    let VmaBacking::File { file: f, pgoff } = v.backing else {
                        return None;
                    };
                    if f != file {
                        return None;
                    }
                    let vpages = v.range.len() / PAGE_SIZE;
                    let lo = first.max(pgoff);
                    let hi = last.min(pgoff + vpages);
                    (lo < hi).then(|| {
                        let start = v.range.start.add((lo - pgoff) * PAGE_SIZE);
                        (pid, Range::new(start, start.add((hi - lo) * PAGE_SIZE)))
                    })
                })
                .collect()
        };
        for (pid, r) in targets {
            self.zap_notify(pid, r, NotifierEvent::Clear).await;
        }
        let frames: Vec<(u64, FrameId)> = self.state().files[file as usize]
            .pages
            .range(first..last)
            .map(|(k, v)| (*k, *v))
            .collect();
        let dax = self.state().files[file as usize].dax_region.is_some();
        if dax {
            // Only the file's own reference may remain before the blocks are reused.
            let st = &self.state;
            self.pin_wq
                .wait_event(|| {
                    frames
                        .iter()
                        .all(|(_, f)| st.borrow().phys.frame(*f).refcount <= 1)
                })
                .await;
        }
        let mut st = self.state();
        for (pgoff, f) in frames {
            st.files[file as usize].pages.remove(&pgoff);
            st.phys.put(f);
            st.oracle
                .record(LogicalPage::File { file, pgoff }, crate::phys::ZERO_HASH);
        }
    }

    /// Writes `data` into `file` at `offset` through the page cache (`pwrite`). Writes past EOF extend it.
    pub async fn pwrite(&self, file: u32, offset: u64, data: &[u8]) -> Result<(), Errno> {
        self.spend(self.costs.syscall).await;
        let end = offset.checked_add(data.len() as u64).ok_or(Errno::EINVAL)?;
        {
            let mut st = self.state();
            if st.files[file as usize].size < end {
                st.files[file as usize].size = end;
            }
            let mut pos = 0usize;
            while pos < data.len() {
                let off = offset + pos as u64;
                let (pgoff, in_page) = (
                    off / PAGE_SIZE,
                    usize::try_from(off % PAGE_SIZE).expect("< 4096"),
                );
                let n = (4096 - in_page).min(data.len() - pos);
                let frame = st.file_page(file, pgoff).ok_or(Errno::ENOSPC)?;
                st.phys.write(frame, in_page, &data[pos..pos + n]);
                let h = st.phys.content_hash(frame);
                st.oracle.record(LogicalPage::File { file, pgoff }, h);
                pos += n;
            }
        }
        self.spend(
            self.costs
                .page_access
                .saturating_mul(data.len().div_ceil(4096) as u64),
        )
        .await;
        Ok(())
    }

    /// Reads `buf.len()` bytes of `file` at `offset` (`pread`); bytes past EOF read as zero here, and the
    /// count actually inside the file is returned.
    pub async fn pread(&self, file: u32, offset: u64, buf: &mut [u8]) -> Result<usize, Errno> {
        self.spend(self.costs.syscall).await;
        let n = {
            let mut st = self.state();
            let size = st.files[file as usize].size;
            let n = usize::try_from(size.saturating_sub(offset).min(buf.len() as u64))
                .expect("fits buffer");
            buf.fill(0);
            let mut pos = 0usize;
            while pos < n {
                let off = offset + pos as u64;
                let (pgoff, in_page) = (
                    off / PAGE_SIZE,
                    usize::try_from(off % PAGE_SIZE).expect("< 4096"),
                );
                let k = (4096 - in_page).min(n - pos);
                let frame = st.file_page(file, pgoff).ok_or(Errno::ENOMEM)?;
                st.phys.read(frame, in_page, &mut buf[pos..pos + k]);
                pos += k;
            }
            n
        };
        self.spend(
            self.costs
                .page_access
                .saturating_mul(n.div_ceil(4096) as u64),
        )
        .await;
        Ok(n)
    }

    // ------------------------------------------------------------------------------------------ notifiers

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
        let mut st = self.state();
        if !st.mm(pid).alive {
            return Err(Errno::EINVAL);
        }
        let id = NotifierId(st.next_notifier);
        st.next_notifier += 1;
        st.mm_mut(pid).notifiers.insert(id, range, ops);
        Ok(id)
    }

    /// Removes an interval notifier (`mmu_interval_notifier_remove`). If an invalidation is in progress it
    /// waits for it to end, so that once this returns no callback runs or will run.
    pub async fn interval_notifier_remove(&self, pid: Pid, id: NotifierId) {
        let st = &self.state;
        self.notifier_wq
            .wait_event(|| st.borrow().mm(pid).notifiers.active == 0)
            .await;
        self.state().mm_mut(pid).notifiers.subs.remove(&id);
    }

    /// `mmu_interval_read_begin`: sleeps while the subscription is being invalidated, then returns its sequence.
    pub async fn interval_read_begin(&self, pid: Pid, id: NotifierId) -> u64 {
        let st = &self.state;
        self.notifier_wq
            .wait_event(|| !st.borrow().mm(pid).notifiers.read_begin_must_wait(id))
            .await;
        self.state()
            .mm(pid)
            .notifiers
            .subs
            .get(&id)
            .map_or(0, |s| s.seq)
    }

    /// `mmu_interval_read_retry`: whether the subscription was invalidated since `read_begin` returned `seq`.
    /// Call it under the driver lock that the invalidate callback also takes.
    pub fn interval_read_retry(&self, pid: Pid, id: NotifierId, seq: u64) -> bool {
        self.state()
            .mm(pid)
            .notifiers
            .subs
            .get(&id)
            .is_none_or(|s| s.seq != seq)
    }

    /// `mmu_interval_set_seq`: called by the invalidate callback, under the driver lock.
    pub fn interval_set_seq(&self, pid: Pid, id: NotifierId, cur_seq: u64) {
        if let Some(s) = self.state().mm_mut(pid).notifiers.subs.get_mut(&id) {
            s.seq = cur_seq;
        }
    }

    /// Runs step 1 of an invalidation (see [`crate::notifier`]): calls every intersecting subscription.
    pub async fn invalidate_range_start(
        &self,
        pid: Pid,
        range: Range<Va>,
        event: NotifierEvent,
        owner: Option<DeviceId>,
    ) {
        let (hits, cur_seq) = self.state().mm_mut(pid).notifiers.range_start(range);
        self.sim.trace("mmu_notifier.start", || {
            format!("pid {} {range} {event:?} seq {cur_seq}", pid.0)
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
                self.state().oracle.violation(
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
        let last = self.state().mm_mut(pid).notifiers.range_end();
        if last {
            self.notifier_wq.wake_up_all();
        }
    }

    // ------------------------------------------------------------------------------------------ syscalls

    /// `mmap(2)`.
    ///
    /// # Errors
    /// `EINVAL` for a zero length, an unaligned fixed address or offset, or neither/both of shared and
    /// private; `ENOMEM` when the length overflows or no gap fits; `EEXIST` for MAP_FIXED_NOREPLACE over a
    /// mapping; `EBADF` for a file mapping without a file.
    pub async fn mmap(&self, pid: Pid, args: &MmapArgs) -> Result<Va, Errno> {
        self.spend(self.costs.syscall).await;
        if args.len == 0 || args.shared == args.private || !args.offset.is_multiple_of(PAGE_SIZE) {
            return Err(Errno::EINVAL);
        }
        let align = if args.hugetlb { PMD_SIZE } else { PAGE_SIZE };
        let len = args
            .len
            .checked_next_multiple_of(align)
            .ok_or(Errno::ENOMEM)?;
        if len > TASK_SIZE {
            return Err(Errno::ENOMEM);
        }
        if !args.anonymous && args.file.is_none() {
            return Err(Errno::EBADF);
        }
        let fixed = args.fixed || args.fixed_noreplace;
        if fixed {
            let a = args.addr.ok_or(Errno::EINVAL)?;
            if !a.is_aligned(align) {
                return Err(Errno::EINVAL);
            }
            if a.raw().checked_add(len).is_none_or(|e| e > TASK_SIZE) {
                return Err(Errno::ENOMEM);
            }
        }
        let lock = self.mmap_lock(pid);
        let _g = lock.write().await;
        let start = if fixed {
            let a = args.addr.expect("checked above");
            let r = Range::from_len(a, len).expect("checked above");
            let overlaps = !self.state().mm(pid).vmas_in(r).is_empty();
            if overlaps {
                if args.fixed_noreplace {
                    return Err(Errno::EEXIST);
                }
                self.do_munmap(pid, r).await;
            }
            a
        } else {
            self.find_gap(pid, args.addr, len, align)
                .ok_or(Errno::ENOMEM)?
        };
        let range = Range::from_len(start, len).expect("gap inside user space");
        let mut flags = args.prot.vm_flags();
        if args.shared {
            flags |= VmFlags::SHARED;
        }
        if args.hugetlb {
            flags |= VmFlags::HUGETLB;
        }
        if args.file.is_some_and(|f| {
            self.state()
                .files
                .get(f as usize)
                .is_some_and(|f| f.dax_region.is_some())
        }) {
            flags |= VmFlags::DAX;
        }
        let backing = if args.anonymous {
            if args.shared {
                let f = self.create_file("shmem", len, true);
                VmaBacking::File { file: f, pgoff: 0 }
            } else {
                VmaBacking::Anon
            }
        } else {
            VmaBacking::File {
                file: args.file.expect("checked above"),
                pgoff: args.offset / PAGE_SIZE,
            }
        };
        self.state().mm_mut(pid).vmas.insert(
            start,
            Vma {
                range,
                flags,
                backing,
                name: args.name.clone(),
            },
        );
        self.sim
            .trace("mmap", || format!("pid {} {range} {flags:?}", pid.0));
        if args.populate {
            let write = args.prot.write;
            for page in range.pages() {
                if self.state().mm(pid).translate(page).is_some() {
                    continue;
                }
                if self.handle_mm_fault(pid, page, write).await.is_err() {
                    break;
                }
            }
        }
        Ok(start)
    }

    /// Creates a VM_MIXEDMAP VMA whose pages are zeroed kernel pages inserted at mmap time
    /// (`vm_insert_page`), as a driver's `mmap` file operation does (lib/test_hmm.c `dmirror_fops_mmap`).
    pub async fn mmap_driver_pages(
        &self,
        pid: Pid,
        len: u64,
        prot: Prot,
        shared: bool,
    ) -> Result<Va, Errno> {
        let mut flags = prot.vm_flags() | VmFlags::MIXEDMAP;
        if shared {
            flags |= VmFlags::SHARED;
        }
        let lock = self.mmap_lock(pid);
        let _g = lock.write().await;
        let range = self.insert_driver_vma(pid, len, flags).await?;
        let mut st = self.state();
        let nr = range.nr_pages();
        // Kernel pages (GFP_KERNEL) never come from movable memory.
        if st.phys.nr_free_zone(GfpZone::Normal) < nr {
            st.remove_vmas(pid, range);
            return Err(Errno::ENOMEM);
        }
        let home = st.home_node(pid);
        for page in range.pages() {
            let frame = st
                .phys
                .alloc_node(home, FrameOwner::Kernel)
                .expect("counted free frames above");
            st.phys.frame_mut(frame).mapcount = 1;
            // vm_insert_page maps the page read-only in a private mapping; a write fault COWs it.
            let write = shared && prot.write;
            st.mm_mut(pid).pt.set_pte(
                page,
                Pte::Present {
                    frame,
                    write,
                    special: false,
                },
            );
        }
        Ok(range.start)
    }

    /// Creates an empty VM_IO | VM_PFNMAP VMA, as a driver whose `mmap` installs no entries leaves it (a CPU
    /// access raises SIGBUS; GUP and `hmm_range_fault` refuse it). A BAR mapped with its entries is
    /// [`Kernel::mmap_pfnmap_mmio`] (`remap_pfn_range`).
    pub async fn mmap_pfnmap(&self, pid: Pid, len: u64, prot: Prot) -> Result<Va, Errno> {
        let flags =
            prot.vm_flags() | VmFlags::IO | VmFlags::PFNMAP | VmFlags::SHARED | VmFlags::DONTCOPY;
        let lock = self.mmap_lock(pid);
        let _g = lock.write().await;
        Ok(self.insert_driver_vma(pid, len, flags).await?.start)
    }

    /// Places and inserts a driver-backed VMA of `len` bytes (the caller holds `mmap_lock` for writing).
    pub(crate) async fn insert_driver_vma(
        &self,
        pid: Pid,
        len: u64,
        flags: VmFlags,
    ) -> Result<Range<Va>, Errno> {
        self.spend(self.costs.syscall).await;
        let len = len
            .checked_next_multiple_of(PAGE_SIZE)
            .ok_or(Errno::ENOMEM)?;
        if len == 0 {
            return Err(Errno::EINVAL);
        }
        let start = self
            .find_gap(pid, None, len, PAGE_SIZE)
            .ok_or(Errno::ENOMEM)?;
        let range = Range::from_len(start, len).expect("gap inside user space");
        self.state().mm_mut(pid).vmas.insert(
            start,
            Vma {
                range,
                flags,
                backing: VmaBacking::Driver,
                name: None,
            },
        );
        Ok(range)
    }

    fn find_gap(&self, pid: Pid, hint: Option<Va>, len: u64, align: u64) -> Option<Va> {
        let st = self.state();
        let mm = st.mm(pid);
        if let Some(h) = hint
            && let Some(a) = h.align_up(align)
            && let Some(r) = Range::from_len(a, len)
            && r.start.raw() >= MMAP_MIN
            && r.end.raw() <= TASK_SIZE
            && mm.vmas_in(r).is_empty()
        {
            return Some(a);
        }
        // Top-down below MMAP_BASE (arch_get_unmapped_area_topdown).
        let mut top = MMAP_BASE;
        for (_, v) in mm.vmas.range(..Va::from_raw(MMAP_BASE)).rev() {
            let gap_start = v.range.end.raw();
            if let Some(cand) = top.checked_sub(len).map(|c| c & !(align - 1))
                && cand >= gap_start
            {
                return Some(Va::from_raw(cand));
            }
            top = top.min(v.range.start.raw());
        }
        let cand = top.checked_sub(len)? & !(align - 1);
        (cand >= MMAP_MIN).then_some(Va::from_raw(cand))
    }

    /// `munmap(2)`.
    ///
    /// # Errors
    /// `EINVAL` for an unaligned address, a zero length or a range outside user space.
    pub async fn munmap(&self, pid: Pid, addr: Va, len: u64) -> Result<(), Errno> {
        self.spend(self.costs.syscall).await;
        let r = check_range(addr, len)?;
        let lock = self.mmap_lock(pid);
        let g = lock.write().await;
        if self.state().mm(pid).vmas_in(r).is_empty() {
            return Ok(());
        }
        // Detach the VMAs under the write lock, then downgrade and zap under the read lock, as
        // do_vmi_align_munmap does (mm/vma.c): device faults holding mmap_lock for reading can run alongside
        // the zap and its invalidation.
        self.state().remove_vmas(pid, r);
        let _r = g.downgrade();
        self.unmap_region(pid, r).await;
        Ok(())
    }

    /// Yields to every agent runnable now: a point where work on other CPUs interleaves with this one.
    pub async fn preempt_point(&self) {
        self.sim.sleep(SimDuration::ZERO).await;
    }

    /// Unmaps `r` with the write lock held (MAP_FIXED over existing mappings).
    async fn do_munmap(&self, pid: Pid, r: Range<Va>) {
        if self.state().mm(pid).vmas_in(r).is_empty() {
            return;
        }
        self.state().remove_vmas(pid, r);
        self.unmap_region(pid, r).await;
    }

    /// Zaps every entry of `r` inside an invalidation of kind `event` (start, zap, TLB shootdown, end);
    /// returns the number of base pages zapped. Private anonymous contents are forgotten (they read zero again).
    pub(crate) async fn zap_notify(&self, pid: Pid, r: Range<Va>, event: NotifierEvent) -> u64 {
        self.invalidate_range_start(pid, r, event, None).await;
        let nr = {
            let mut st = self.state();
            let nr = st.zap_range(pid, r);
            st.oracle.forget_anon(pid, r);
            nr
        };
        if nr > 0 {
            self.spend(self.costs.tlb_shootdown).await;
        }
        self.invalidate_range_end(pid);
        nr
    }

    /// `unmap_region`: notifier UNMAP, zap, TLB shootdown, notifier end. The VMAs are already detached.
    async fn unmap_region(&self, pid: Pid, r: Range<Va>) {
        let nr = self.zap_notify(pid, r, NotifierEvent::Unmap).await;
        self.sim
            .trace("munmap", || format!("pid {} {r} ({nr} pages)", pid.0));
    }

    /// `mremap(2)` with MREMAP_MAYMOVE, MREMAP_FIXED and MREMAP_DONTUNMAP (mm/mremap.c). Page-table entries
    /// move with the mapping — device-private entries included — inside an UNMAP invalidation of the old range.
    ///
    /// # Errors
    /// `EINVAL` for an unaligned address, a zero new length, FIXED or DONTUNMAP without MAYMOVE, DONTUNMAP with
    /// a size change, or overlapping ranges; `EFAULT` when the old range is not one mapped VMA; `ENOMEM` when
    /// growing in place is impossible without MAYMOVE.
    pub async fn mremap(
        &self,
        pid: Pid,
        old: Va,
        old_len: u64,
        new_len: u64,
        flags: MremapFlags,
    ) -> Result<Va, Errno> {
        self.spend(self.costs.syscall).await;
        let invalid = !old.is_page_aligned()
            || new_len == 0
            || (flags.fixed && !flags.maymove)
            || (flags.dontunmap && (!flags.maymove || old_len != new_len));
        if invalid {
            return Err(Errno::EINVAL);
        }
        let old_len = old_len
            .checked_next_multiple_of(PAGE_SIZE)
            .ok_or(Errno::EINVAL)?;
        let new_len = new_len
            .checked_next_multiple_of(PAGE_SIZE)
            .ok_or(Errno::EINVAL)?;
        let old_r = Range::from_len(old, old_len).ok_or(Errno::EINVAL)?;
        let lock = self.mmap_lock(pid);
        let _g = lock.write().await;
        let vma = self
            .state()
            .mm(pid)
            .vma(old)
            .cloned()
            .ok_or(Errno::EFAULT)?;
        if !vma.range.contains_range(&old_r) {
            return Err(Errno::EFAULT);
        }
        // vma_to_resize (mm/mremap.c): a remap_pfn_range mapping (VM_PFNMAP, and VM_DONTEXPAND) cannot grow.
        if new_len > old_len && vma.flags.contains(VmFlags::PFNMAP) {
            return Err(Errno::EFAULT);
        }
        if !flags.fixed && new_len <= old_len {
            if new_len < old_len {
                let tail = Range::new(old.add(new_len), old_r.end);
                self.do_munmap(pid, tail).await;
            }
            return Ok(old);
        }
        let target = if let Some(to) = flags.new_addr.filter(|_| flags.fixed) {
            let t = Range::from_len(to, new_len).ok_or(Errno::EINVAL)?;
            if !to.is_page_aligned() || t.overlaps(&old_r) || t.end.raw() > TASK_SIZE {
                return Err(Errno::EINVAL);
            }
            self.do_munmap(pid, t).await;
            to
        } else {
            let grow = Range::new(old_r.end, old.add(new_len));
            if vma.range.end == old_r.end
                && self.state().mm(pid).vmas_in(grow).is_empty()
                && grow.end.raw() <= TASK_SIZE
            {
                let mut st = self.state();
                let v = st
                    .mm_mut(pid)
                    .vmas
                    .get_mut(&vma.range.start)
                    .expect("looked up above");
                v.range.end = grow.end;
                return Ok(old);
            }
            if !flags.maymove {
                return Err(Errno::ENOMEM);
            }
            self.find_gap(pid, None, new_len, PAGE_SIZE)
                .ok_or(Errno::ENOMEM)?
        };
        let moved = old_len.min(new_len);
        let src = Range::from_len(old, moved).expect("inside old range");
        self.invalidate_range_start(pid, src, NotifierEvent::Unmap, None)
            .await;
        {
            let mut st = self.state();
            // move_page_tables: PMD leaves move whole only when both ends are 2 MiB aligned.
            for leaf in st.mm(pid).pt.leaves(src.start, src.end) {
                let off = leaf.base.raw() - old.raw();
                if leaf.size != PageSize::Size4K && !target.add(off).is_aligned(PMD_SIZE) {
                    st.mm_mut(pid).pt.split_pmd(leaf.base);
                }
            }
            for leaf in st.mm(pid).pt.leaves(src.start, src.end) {
                let off = leaf.base.raw() - old.raw();
                st.mm_mut(pid).pt.clear(leaf.base);
                st.mm_mut(pid)
                    .pt
                    .set_leaf(target.add(off), leaf.size, leaf.pte);
            }
            let new_vma = vma.slice(Range::from_len(old, moved).expect("inside"));
            let mut nv = new_vma.clone();
            nv.range = Range::from_len(target, new_len).expect("checked above");
            if !flags.dontunmap {
                st.remove_vmas(pid, old_r);
            }
            st.mm_mut(pid).vmas.insert(target, nv);
            st.oracle.move_anon(pid, src, target);
        }
        self.spend(self.costs.tlb_shootdown).await;
        self.invalidate_range_end(pid);
        if !flags.dontunmap && old_len > new_len {
            self.do_munmap(pid, Range::new(old.add(moved), old_r.end))
                .await;
        }
        self.sim
            .trace("mremap", || format!("pid {} {old_r} -> {target}", pid.0));
        Ok(target)
    }

    /// `mprotect(2)`.
    ///
    /// # Errors
    /// `EINVAL` for an unaligned address or a range outside user space; `ENOMEM` when part of the range is
    /// not mapped.
    pub async fn mprotect(&self, pid: Pid, addr: Va, len: u64, prot: Prot) -> Result<(), Errno> {
        self.spend(self.costs.syscall).await;
        if len == 0 && addr.is_page_aligned() {
            return Ok(());
        }
        let r = check_range(addr, len)?;
        let lock = self.mmap_lock(pid);
        let _g = lock.write().await;
        if !self.state().mm(pid).fully_mapped(r) {
            return Err(Errno::ENOMEM);
        }
        let has_leaves = !self.state().mm(pid).pt.leaves(r.start, r.end).is_empty();
        if has_leaves {
            self.invalidate_range_start(pid, r, NotifierEvent::ProtectionVma, None)
                .await;
        }
        {
            let mut st = self.state();
            for start in st.split_at(pid, r) {
                let mm = st.mm_mut(pid);
                let v = mm
                    .vmas
                    .get_mut(&start)
                    .expect("split_at returns VMA starts");
                v.flags = (v.flags - VmFlags::PROT) | prot.vm_flags();
            }
            // change_protection: removing write permission write-protects the entries; adding it does not make
            // them writable (the next write fault decides, COW included).
            if !prot.write {
                for leaf in st.mm(pid).pt.leaves(r.start, r.end) {
                    let leaf_range =
                        Range::from_len(leaf.base, leaf.size.bytes()).expect("in user space");
                    if r.contains_range(&leaf_range) {
                        st.mm_mut(pid).pt.set_leaf(
                            leaf.base,
                            leaf.size,
                            leaf.pte.with_write(false),
                        );
                    } else {
                        st.mm_mut(pid).pt.split_pmd(leaf.base);
                        for page in leaf_range.intersection(&r).expect("overlaps").pages() {
                            if let Some(l) = st.mm(pid).pt.lookup(page) {
                                st.mm_mut(pid).pt.set_pte(page, l.pte.with_write(false));
                            }
                        }
                    }
                }
            }
        }
        if has_leaves {
            self.spend(self.costs.tlb_shootdown).await;
            self.invalidate_range_end(pid);
        }
        self.sim
            .trace("mprotect", || format!("pid {} {r} {prot:?}", pid.0));
        Ok(())
    }

    /// `madvise(2)` with MADV_DONTNEED, MADV_HUGEPAGE or MADV_NOHUGEPAGE.
    ///
    /// # Errors
    /// `EINVAL` for an unaligned address; `ENOMEM` when part of the range is not mapped.
    pub async fn madvise(&self, pid: Pid, addr: Va, len: u64, advice: Advice) -> Result<(), Errno> {
        self.spend(self.costs.syscall).await;
        let r = check_range(addr, len)?;
        let lock = self.mmap_lock(pid);
        match advice {
            Advice::DontNeed => {
                let _g = lock.read().await;
                if !self.state().mm(pid).fully_mapped(r) {
                    return Err(Errno::ENOMEM);
                }
                // madvise_dontneed_free_valid_vma (mm/madvise.c): raw PFN mappings cannot be zapped this way.
                if self
                    .state()
                    .mm(pid)
                    .vmas_in(r)
                    .iter()
                    .any(|v| v.flags.contains(VmFlags::PFNMAP))
                {
                    return Err(Errno::EINVAL);
                }
                self.zap_notify(pid, r, NotifierEvent::Clear).await;
            }
            Advice::Free => {
                let _g = lock.read().await;
                if !self.state().mm(pid).fully_mapped(r) {
                    return Err(Errno::ENOMEM);
                }
            }
            Advice::Collapse => {
                let _g = lock.read().await;
                if !self.state().mm(pid).fully_mapped(r) {
                    return Err(Errno::ENOMEM);
                }
                self.collapse_range(pid, r).await;
            }
            Advice::HugePage | Advice::NoHugePage => {
                let _g = lock.write().await;
                if !self.state().mm(pid).fully_mapped(r) {
                    return Err(Errno::ENOMEM);
                }
                let mut st = self.state();
                for start in st.split_at(pid, r) {
                    let v = st
                        .mm_mut(pid)
                        .vmas
                        .get_mut(&start)
                        .expect("split_at returns VMA starts");
                    if advice == Advice::HugePage {
                        v.flags = (v.flags - VmFlags::NOHUGEPAGE) | VmFlags::HUGEPAGE;
                    } else {
                        v.flags = (v.flags - VmFlags::HUGEPAGE) | VmFlags::NOHUGEPAGE;
                    }
                }
            }
        }
        Ok(())
    }

    /// `MADV_COLLAPSE` (mm/khugepaged.c): every 2 MiB-aligned block inside `r` of a private anonymous VMA whose
    /// 512 entries are all present, normal, exclusive anonymous pages is copied into a new THP and remapped by a
    /// PMD leaf, inside a CLEAR invalidation. Blocks that do not qualify are left as they are.
    async fn collapse_range(&self, pid: Pid, r: Range<Va>) {
        let mut block = r.start.align_up(PMD_SIZE).unwrap_or(r.end);
        while block.raw().saturating_add(PMD_SIZE) <= r.end.raw() {
            let b = Range::from_len(block, PMD_SIZE).expect("inside r");
            let frames: Option<Vec<FrameId>> = {
                let st = self.state();
                let mm = st.mm(pid);
                let anon = mm
                    .vma(block)
                    .is_some_and(|v| v.is_anonymous() && v.range.contains_range(&b));
                let leaves = mm.pt.leaves(b.start, b.end);
                let ok = anon
                    && leaves.len() == 512
                    && leaves.iter().all(|l| {
                        l.size == PageSize::Size4K
                            && matches!(l.pte, Pte::Present { frame, special: false, .. }
                                if st.phys.frame(frame).owner() == FrameOwner::Anon
                                    && st.phys.frame(frame).mapcount == 1
                                    && st.phys.frame(frame).refcount == 1)
                    });
                ok.then(|| leaves.iter().filter_map(|l| l.pte.frame()).collect())
            };
            if let Some(frames) = frames {
                let head = {
                    let mut st = self.state();
                    let home = st.home_node(pid);
                    let zone = st.anon_zone(pid);
                    st.phys.alloc_pmd_node_in(home, FrameOwner::Anon, zone)
                };
                if let Ok(head) = head {
                    self.invalidate_range_start(pid, b, NotifierEvent::Clear, None)
                        .await;
                    {
                        let mut st = self.state();
                        for (i, f) in frames.iter().enumerate() {
                            let dst = FrameId(head.0 + i as u64);
                            st.phys.copy_frame(*f, dst);
                            st.phys.frame_mut(dst).mapcount = 1;
                            st.mm_mut(pid).pt.clear(block.add(i as u64 * PAGE_SIZE));
                            st.unmap_frame(*f);
                        }
                        st.mm_mut(pid).pt.set_pmd(
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

    /// `fork(2)`: copies the address space with copy-on-write for private mappings. Returns the child's pid.
    ///
    /// Private writable pages are write-protected in the parent, which fires MMU_NOTIFY_PROTECTION_PAGE over
    /// each COW VMA (mm/memory.c `copy_page_range`). An anonymous exclusive page that may be DMA-pinned is
    /// copied for the child at once instead (`copy_present_page`), so the pinned page stays the parent's.
    pub async fn fork(&self, pid: Pid) -> Result<Pid, Errno> {
        self.spend(self.costs.syscall).await;
        let lock = self.mmap_lock(pid);
        let _g = lock.write().await;
        let child = self.create_process();
        {
            // The child runs where the parent ran: it inherits the home node (and Linux's mempolicy).
            let mut st = self.state();
            let home = st.home_node(pid);
            st.mm_mut(child).home_node = home;
        }
        let vmas: Vec<Vma> = self.state().mm(pid).vmas.values().cloned().collect();
        let mut copies = 0u64;
        for vma in vmas {
            if vma.flags.contains(VmFlags::DONTCOPY) {
                continue;
            }
            let cow = !vma.is_shared();
            let leaves = self
                .state()
                .mm(pid)
                .pt
                .leaves(vma.range.start, vma.range.end);
            let needs_wp = cow && leaves.iter().any(|l| l.pte.is_write());
            if needs_wp {
                self.invalidate_range_start(pid, vma.range, NotifierEvent::ProtectionPage, None)
                    .await;
            }
            {
                let mut st = self.state();
                st.mm_mut(child).vmas.insert(vma.range.start, vma.clone());
                for leaf in leaves {
                    copies += st.copy_leaf(pid, child, &vma, leaf);
                }
                if cow {
                    st.oracle.copy_anon(pid, child, vma.range);
                }
            }
            if needs_wp {
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
        if !self.state().mm(pid).alive {
            return;
        }
        let all = Range::new(Va::from_raw(0), Va::from_raw(u64::MAX));
        self.invalidate_range_start(pid, all, NotifierEvent::Release, None)
            .await;
        {
            let mut st = self.state();
            st.zap_range(pid, Range::new(Va::from_raw(0), Va::from_raw(TASK_SIZE)));
            st.mm_mut(pid).vmas.clear();
            st.mm_mut(pid).alive = false;
            st.oracle.forget_anon(pid, all);
        }
        self.invalidate_range_end(pid);
        self.sim.trace("exit", || format!("pid {}", pid.0));
    }

    // ------------------------------------------------------------------------------------------ CPU access

    /// CPU load of `buf.len()` bytes at `addr` (faulting pages in as needed).
    pub async fn load(&self, pid: Pid, addr: Va, buf: &mut [u8]) -> Result<(), Signal> {
        self.cpu_access(pid, addr, Access::Read(buf)).await
    }

    /// CPU store of `data` at `addr`.
    pub async fn store(&self, pid: Pid, addr: Va, data: &[u8]) -> Result<(), Signal> {
        self.cpu_access(pid, addr, Access::Write(data)).await
    }

    async fn cpu_access(&self, pid: Pid, addr: Va, mut access: Access<'_>) -> Result<(), Signal> {
        let lock = self.mmap_lock(pid);
        let _g = lock.read().await;
        let len = access.len();
        let write = matches!(access, Access::Write(_));
        let mut pos = 0usize;
        let mut pages = 0u64;
        while pos < len {
            let va = addr.checked_add(pos as u64).ok_or(Signal::Segv { addr })?;
            let in_page = usize::try_from(va.page_offset()).expect("< 4096");
            let n = (4096 - in_page).min(len - pos);
            let page = va.align_down(PAGE_SIZE);
            loop {
                let hit = {
                    let mut st = self.state();
                    let allowed = st.mm(pid).vma(page).is_some_and(|v| {
                        if write {
                            v.flags.contains(VmFlags::WRITE)
                        } else {
                            v.flags.contains(VmFlags::READ)
                        }
                    });
                    let pfn_leaf = st
                        .mm(pid)
                        .pt
                        .lookup(page)
                        .filter(|l| matches!(l.pte, Pte::Pfn { .. }));
                    if let Some(leaf) = pfn_leaf {
                        // A raw PFN entry: the access goes to MMIO bytes, not a frame.
                        let Pte::Pfn { pfn, write: w } = leaf.pte else {
                            unreachable!("filtered above")
                        };
                        if allowed && (w || !write) {
                            let pa = peerdma_core::Pa::from_raw(
                                pfn * PAGE_SIZE + (page.raw() - leaf.base.raw()) + in_page as u64,
                            );
                            let ok = match &mut access {
                                Access::Read(buf) => {
                                    st.p2p.mmio_read_bytes(pa, &mut buf[pos..pos + n])
                                }
                                Access::Write(data) => {
                                    st.p2p.mmio_write_bytes(pa, &data[pos..pos + n])
                                }
                            };
                            if !ok {
                                return Err(Signal::Bus { addr: va });
                            }
                            true
                        } else {
                            false
                        }
                    } else {
                        match st.mm(pid).translate(page) {
                            Some((frame, w, _)) if allowed && (w || !write) => {
                                // The MMU sets the PTE young bit (crate::swap: one bit per frame).
                                st.phys.frame_mut(frame).accessed = true;
                                match &mut access {
                                    Access::Read(buf) => {
                                        st.oracle_check_cpu(pid, page, frame, false);
                                        st.phys.read(frame, in_page, &mut buf[pos..pos + n]);
                                    }
                                    Access::Write(data) => {
                                        st.phys.write(frame, in_page, &data[pos..pos + n]);
                                        st.oracle_check_cpu(pid, page, frame, true);
                                    }
                                }
                                true
                            }
                            _ => false,
                        }
                    }
                };
                if hit {
                    break;
                }
                self.handle_mm_fault(pid, page, write).await?;
            }
            pos += n;
            pages += 1;
        }
        self.spend(self.costs.page_access.saturating_mul(pages))
            .await;
        Ok(())
    }

    /// Resolves a CPU fault on `va` (`handle_mm_fault`): demand-zero, page-cache, huge page and
    /// copy-on-write faults. Returns once the access can be retried, or with the signal the access raises.
    pub async fn handle_mm_fault(&self, pid: Pid, va: Va, write: bool) -> FaultResult {
        let va = va.align_down(PAGE_SIZE);
        self.sim.count("cpu.faults", 1);
        self.spend(self.costs.cpu_fault).await;
        let vma = self
            .state()
            .mm(pid)
            .vma(va)
            .cloned()
            .ok_or(Signal::Segv { addr: va })?;
        let need = if write { VmFlags::WRITE } else { VmFlags::READ };
        if !vma.flags.contains(need) {
            return Err(Signal::Segv { addr: va });
        }
        let leaf = self.state().mm(pid).pt.lookup(va);
        match leaf {
            None => {
                self.reclaim_if_low_for(pid).await;
                self.do_missing_page(pid, &vma, va, write)
            }
            Some(leaf) => match leaf.pte {
                Pte::Present { write: true, .. } => Ok(()),
                Pte::Present { write: false, .. } if !write => Ok(()),
                Pte::Present { .. } => self.do_wp_page(pid, &vma, va, leaf).await,
                Pte::DevicePrivate { frame, .. } => {
                    self.do_device_private_fault(pid, va, frame).await
                }
                Pte::DeviceExclusive { .. } => {
                    // restore_exclusive_pte: the device loses its atomic mapping through an EXCLUSIVE
                    // invalidation with no owner, then the original PTE comes back (spec §1.7).
                    let page = Range::from_len(va, PAGE_SIZE).expect("page in user space");
                    self.invalidate_range_start(pid, page, NotifierEvent::Exclusive, None)
                        .await;
                    {
                        let mut st = self.state();
                        if let Some(Pte::DeviceExclusive { frame, write }) =
                            st.mm(pid).pt.lookup(va).map(|l| l.pte)
                        {
                            st.mm_mut(pid).pt.set_pte(
                                va,
                                Pte::Present {
                                    frame,
                                    write,
                                    special: false,
                                },
                            );
                        }
                    }
                    self.invalidate_range_end(pid);
                    Ok(())
                }
                Pte::Migration { .. } => {
                    // Wait for the migration to finish, then let the access retry (migration_entry_wait).
                    let st = &self.state;
                    self.migration_wq
                        .wait_event(|| {
                            !matches!(
                                st.borrow().mm(pid).pt.lookup(va).map(|l| l.pte),
                                Some(Pte::Migration { .. })
                            )
                        })
                        .await;
                    Ok(())
                }
                Pte::Swap { slot, write } => self
                    .swap_in(pid, va, slot, write)
                    .await
                    .map_err(|()| Signal::Bus { addr: va }),
                Pte::Pfn { write: w, .. } => {
                    // wp_pfn_shared: a PFNMAP VMA is shared, so a write fault just makes the entry writable.
                    if write && !w {
                        let mut st = self.state();
                        st.mm_mut(pid).pt.set_pte(va, leaf.pte.with_write(true));
                    }
                    Ok(())
                }
            },
        }
    }

    /// A CPU access to a device-private entry: the owning pagemap migrates the page back to RAM
    /// (`do_swap_page` → `pgmap->ops->migrate_to_ram`, spec §1.6); the access then retries.
    async fn do_device_private_fault(&self, pid: Pid, va: Va, frame: FrameId) -> FaultResult {
        if self.state().phys.frame(frame).locked {
            // A migration holds the page (crate::migrate, crate::migrate_device): do_swap_page's trylock fails;
            // wait for the unlock, then the access retries against whatever entry is there now.
            let st = &self.state;
            self.migration_wq
                .wait_event(|| !st.borrow().phys.frame(frame).locked)
                .await;
            return Ok(());
        }
        let region = self.state().phys.region_of(frame);
        let ops = self.pgmaps.borrow().get(&region).cloned();
        let Some(ops) = ops else {
            return Err(Signal::Bus { addr: va });
        };
        self.sim.count("cpu.migrate_to_ram", 1);
        ops.migrate_to_ram(pid, va, frame)
            .await
            .map_err(|()| Signal::Bus { addr: va })
    }

    /// A fault on a none entry: anonymous zero page or new page (THP where eligible), page-cache page, or
    /// COW copy of a page-cache page for a write to a private file mapping.
    fn do_missing_page(&self, pid: Pid, vma: &Vma, va: Va, write: bool) -> FaultResult {
        let mut st = self.state();
        match vma.backing {
            // Driver, P2P memory and PFNMAP VMAs are populated at mmap time and have no fault handler: an entry
            // that is gone (zapped at unbind or revoke) stays gone.
            VmaBacking::Driver | VmaBacking::P2pMem { .. } | VmaBacking::Mmio { .. } => {
                Err(Signal::Bus { addr: va })
            }
            VmaBacking::Anon => {
                if vma.flags.contains(VmFlags::HUGETLB) {
                    return st.hugetlb_fault(pid, vma, va);
                }
                if !write {
                    let zero = st.phys.zero_page();
                    st.mm_mut(pid).pt.set_pte(
                        va,
                        Pte::Present {
                            frame: zero,
                            write: false,
                            special: false,
                        },
                    );
                    return Ok(());
                }
                if st.thp_eligible(pid, vma, va) {
                    let base = va.align_down(PMD_SIZE);
                    let home = st.home_node(pid);
                    let zone = st.anon_zone(pid);
                    if let Ok(head) = st.phys.alloc_pmd_node_in(home, FrameOwner::Anon, zone) {
                        for i in 0..FRAMES_PER_PMD {
                            let f = st.phys.frame_mut(FrameId(head.0 + i));
                            f.mapcount = 1;
                            f.lru = crate::phys::LruState::Active;
                        }
                        st.mm_mut(pid).pt.set_pmd(
                            base,
                            Pte::Present {
                                frame: head,
                                write: true,
                                special: false,
                            },
                        );
                        self.sim.count("thp.fault_alloc", 1);
                        return Ok(());
                    }
                    self.sim.count("thp.fault_fallback", 1);
                }
                let frame = st
                    .alloc_anon_for(pid)
                    .map_err(|_| Signal::Bus { addr: va })?;
                st.phys.frame_mut(frame).mapcount = 1;
                st.lru_add_new_anon(frame);
                st.mm_mut(pid).pt.set_pte(
                    va,
                    Pte::Present {
                        frame,
                        write: true,
                        special: false,
                    },
                );
                Ok(())
            }
            VmaBacking::File { .. } => {
                let (file, pgoff) = vma.file_pgoff(va).expect("file VMA");
                let cache = st.file_page(file, pgoff).ok_or(Signal::Bus { addr: va })?;
                if write && !vma.is_shared() {
                    // Private file write fault: COW from the page cache into a new anonymous page.
                    let frame = st
                        .alloc_anon_for(pid)
                        .map_err(|_| Signal::Bus { addr: va })?;
                    st.phys.copy_frame(cache, frame);
                    st.phys.frame_mut(frame).mapcount = 1;
                    st.lru_add_new_anon(frame);
                    st.mm_mut(pid).pt.set_pte(
                        va,
                        Pte::Present {
                            frame,
                            write: true,
                            special: false,
                        },
                    );
                    if let Some(e) = st.oracle.expected(LogicalPage::File { file, pgoff }) {
                        st.oracle.record(
                            LogicalPage::Anon {
                                pid,
                                vpn: va.page_number(),
                            },
                            e,
                        );
                    }
                    return Ok(());
                }
                st.map_frame(cache);
                let w = write && vma.is_shared();
                st.mm_mut(pid).pt.set_pte(
                    va,
                    Pte::Present {
                        frame: cache,
                        write: w,
                        special: false,
                    },
                );
                Ok(())
            }
        }
    }

    /// A write fault on a present read-only entry (`do_wp_page`): make a shared mapping writable, reuse an
    /// exclusive anonymous page, or copy (firing MMU_NOTIFY_CLEAR on the page being replaced).
    pub(crate) async fn do_wp_page(&self, pid: Pid, vma: &Vma, va: Va, leaf: Leaf) -> FaultResult {
        if vma.is_shared() {
            let mut st = self.state();
            st.mm_mut(pid)
                .pt
                .set_leaf(leaf.base, leaf.size, leaf.pte.with_write(true));
            return Ok(());
        }
        if leaf.size != PageSize::Size4K {
            let mut st = self.state();
            let head = leaf.pte.frame().expect("present");
            let exclusive = (0..FRAMES_PER_PMD).all(|i| {
                let f = st.phys.frame(FrameId(head.0 + i));
                f.refcount == 1 && f.owner() == FrameOwner::Anon
            });
            if exclusive {
                st.mm_mut(pid)
                    .pt
                    .set_pmd(leaf.base, leaf.pte.with_write(true));
                return Ok(());
            }
            // Shared THP: split the PMD mapping and COW only the faulting base page (do_huge_pmd_wp_page).
            st.mm_mut(pid).pt.split_pmd(va);
        }
        let (frame, zero, reuse) = {
            let st = self.state();
            let (frame, _, _) = st.mm(pid).translate(va).expect("present entry");
            let f = st.phys.frame(frame);
            let zero = frame == st.phys.zero_page();
            // wp_can_reuse_anon_folio: reuse an exclusive anonymous page. The model's "exclusive" is one
            // mapping and no references beyond pins (fork never shares a pinned exclusive page: it copies it for
            // the child), so a pinned page is reused, never replaced under its DMA.
            let exclusive = f.owner() == FrameOwner::Anon
                && f.mapcount <= 1
                && f.refcount % crate::phys::GUP_PIN_COUNTING_BIAS == 1;
            (frame, zero, !zero && exclusive)
        };
        if reuse {
            let mut st = self.state();
            st.mm_mut(pid).pt.set_pte(
                va,
                Pte::Present {
                    frame,
                    write: true,
                    special: false,
                },
            );
            self.sim.count("cpu.cow_reuse", 1);
            return Ok(());
        }
        // Oracle check 3: a COW must never replace a page a device may be writing through a pin.
        {
            let mut st = self.state();
            if st.oracle.enabled() && !zero && st.phys.frame(frame).maybe_dma_pinned() {
                st.oracle.violation(
                    ViolationKind::PinBroken,
                    format!("COW replaced pinned {frame} at pid {} va {va}: DMA through the pin is lost", pid.0),
                );
            }
        }
        // wp_page_copy: allocate, copy, then replace the entry inside a CLEAR invalidation.
        let new = self
            .state()
            .alloc_anon_for(pid)
            .map_err(|_| Signal::Bus { addr: va })?;
        if !zero {
            self.state().phys.copy_frame(frame, new);
            self.spend(self.costs.page_copy).await;
        }
        let page = Range::from_len(va, PAGE_SIZE).expect("page in user space");
        self.invalidate_range_start(pid, page, NotifierEvent::Clear, None)
            .await;
        {
            let mut st = self.state();
            // pte_same: if the entry changed while we slept, drop the copy and let the access retry.
            let same = st
                .mm(pid)
                .translate(va)
                .is_some_and(|(f, w, _)| f == frame && !w);
            if same {
                // A COW of a page-cache page moves the page's identity from the file to this process.
                if let FrameOwner::File { file, pgoff } = st.phys.frame(frame).owner()
                    && let Some(e) = st.oracle.expected(LogicalPage::File { file, pgoff })
                {
                    st.oracle.record(
                        LogicalPage::Anon {
                            pid,
                            vpn: va.page_number(),
                        },
                        e,
                    );
                }
                st.phys.frame_mut(new).mapcount = 1;
                st.lru_add_new_anon(new);
                st.mm_mut(pid).pt.set_pte(
                    va,
                    Pte::Present {
                        frame: new,
                        write: true,
                        special: false,
                    },
                );
                st.unmap_frame(frame);
                self.sim.count("cpu.cow_copy", 1);
            } else {
                st.phys.put(new);
            }
        }
        self.invalidate_range_end(pid);
        Ok(())
    }

    /// Copies `buf.len()` bytes from user memory (`copy_from_user`): a fault that cannot be resolved is EFAULT.
    pub async fn copy_from_user(&self, pid: Pid, addr: Va, buf: &mut [u8]) -> Result<(), Errno> {
        self.load(pid, addr, buf).await.map_err(|_| Errno::EFAULT)
    }

    /// Copies `data` to user memory (`copy_to_user`).
    pub async fn copy_to_user(&self, pid: Pid, addr: Va, data: &[u8]) -> Result<(), Errno> {
        self.store(pid, addr, data).await.map_err(|_| Errno::EFAULT)
    }
}

enum Access<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
}

impl Access<'_> {
    fn len(&self) -> usize {
        match self {
            Access::Read(b) => b.len(),
            Access::Write(d) => d.len(),
        }
    }
}

/// `mremap` flags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MremapFlags {
    /// MREMAP_MAYMOVE.
    pub maymove: bool,
    /// MREMAP_FIXED (with `new_addr`).
    pub fixed: bool,
    /// MREMAP_DONTUNMAP: keep the old VMA, empty.
    pub dontunmap: bool,
    /// The target of MREMAP_FIXED.
    pub new_addr: Option<Va>,
}

/// `madvise` advice values the model implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Advice {
    /// MADV_DONTNEED.
    DontNeed,
    /// MADV_HUGEPAGE.
    HugePage,
    /// MADV_NOHUGEPAGE.
    NoHugePage,
    /// MADV_FREE: the pages may be discarded lazily. The model keeps them (reclaim does not discard clean lazily
    /// freed pages yet), which only makes their contents last longer than Linux guarantees.
    Free,
    /// MADV_COLLAPSE: collapse each fully mapped, 2 MiB-aligned block of anonymous pages into a THP.
    Collapse,
}

/// Validates a `[addr, addr + len)` range argument of munmap/mprotect/madvise (mm/mmap.c): the address page
/// aligned, the length non-zero once rounded up to pages, and the range inside user space.
fn check_range(addr: Va, len: u64) -> Result<Range<Va>, Errno> {
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

impl KernelState {
    fn thp_eligible(&self, pid: Pid, vma: &Vma, va: Va) -> bool {
        let wanted = match self.thp {
            ThpPolicy::Always => !vma.flags.contains(VmFlags::NOHUGEPAGE),
            ThpPolicy::Madvise => vma.flags.contains(VmFlags::HUGEPAGE),
            ThpPolicy::Never => false,
        };
        if !wanted {
            return false;
        }
        let base = va.align_down(PMD_SIZE);
        let r = Range::from_len(base, PMD_SIZE).expect("in user space");
        vma.range.contains_range(&r) && self.mm(pid).pt.leaves(r.start, r.end).is_empty()
    }

    fn hugetlb_fault(&mut self, pid: Pid, vma: &Vma, va: Va) -> FaultResult {
        let base = va.align_down(PMD_SIZE);
        if !self.mm(pid).pt.leaves(base, base.add(PMD_SIZE)).is_empty() {
            return Ok(());
        }
        let home = self.home_node(pid);
        // Hugetlb pool pages stay out of movable memory: the model cannot migrate them.
        let head = self
            .phys
            .alloc_pmd_node_in(home, FrameOwner::Anon, GfpZone::Normal)
            .map_err(|_| Signal::Bus { addr: va })?;
        for i in 0..FRAMES_PER_PMD {
            self.phys.frame_mut(FrameId(head.0 + i)).mapcount = 1;
        }
        let write = vma.flags.contains(VmFlags::WRITE);
        self.mm_mut(pid).pt.set_pmd(
            base,
            Pte::Present {
                frame: head,
                write,
                special: false,
            },
        );
        Ok(())
    }

    /// Copies one leaf from `parent` to `child` for fork; returns the number of pages copied eagerly.
    fn copy_leaf(&mut self, parent: Pid, child: Pid, vma: &Vma, leaf: Leaf) -> u64 {
        if let Pte::Swap { slot, write } = leaf.pte {
            // A swap entry is shared by parent and child (swap_duplicate), read-only for COW.
            self.swap.dup(slot);
            let cow = !vma.is_shared();
            self.mm_mut(child).pt.set_pte(
                leaf.base,
                Pte::Swap {
                    slot,
                    write: write && !cow,
                },
            );
            if cow && write {
                self.mm_mut(parent)
                    .pt
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
            self.mm_mut(parent).pt.set_pte(leaf.base, pte);
            leaf.pte = pte;
        }
        if let Pte::DevicePrivate { frame, write } | Pte::Migration { frame, write } = leaf.pte {
            // copy_nonpresent_pte: device-private entries are copied as such (spec §1.6), and so are the
            // migration entries a migration that reaches this process through the rmap walk, without its
            // mmap_lock (crate::migrate_device, migrate_vma's unmap step), leaves for fork to meet (its finalize
            // finds both through the rmap walk). For COW both sides become read-only.
            for i in 0..leaf.size.nr_pages() {
                self.map_frame(FrameId(frame.0 + i));
            }
            let cow = !vma.is_shared();
            self.mm_mut(child).pt.set_leaf(
                leaf.base,
                leaf.size,
                leaf.pte.with_write(write && !cow),
            );
            if cow && write {
                self.mm_mut(parent)
                    .pt
                    .set_leaf(leaf.base, leaf.size, leaf.pte.with_write(false));
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
            self.mm_mut(child).pt.set_pte(leaf.base, leaf.pte);
            return 0;
        }
        let cow = !vma.is_shared();
        if cow && leaf.size == PageSize::Size4K {
            let f = self.phys.frame(frame);
            if f.owner() == FrameOwner::Anon && f.maybe_dma_pinned() && f.mapcount == 1 {
                // copy_present_page: the pinned page stays the parent's; the child gets a copy now.
                if let Ok(new) = self.alloc_anon_for(child) {
                    self.phys.copy_frame(frame, new);
                    self.phys.frame_mut(new).mapcount = 1;
                    self.mm_mut(child).pt.set_pte(
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
            self.map_frame(FrameId(frame.0 + i));
        }
        let new_write = write && !cow;
        let child_pte = Pte::Present {
            frame,
            write: new_write,
            special: false,
        };
        let wp = leaf.pte.with_write(false);
        self.mm_mut(child)
            .pt
            .set_leaf(leaf.base, leaf.size, child_pte);
        if cow && write {
            self.mm_mut(parent).pt.set_leaf(leaf.base, leaf.size, wp);
        }
        0
    }

    /// Oracle checks on a CPU access of `frame` at `va` (after the write for stores).
    fn oracle_check_cpu(&mut self, pid: Pid, va: Va, frame: FrameId, write: bool) {
        if !self.oracle.enabled() {
            return;
        }
        if !self.phys.frame(frame).is_allocated() {
            self.oracle.violation(
                ViolationKind::UseAfterFree,
                format!("CPU access of freed {frame} at {va}"),
            );
            return;
        }
        let Some(key) = self.logical_page(pid, va) else {
            return;
        };
        let h = self.phys.content_hash(frame);
        if write {
            self.oracle.record(key, h);
        } else {
            self.oracle.check_read(key, h, || {
                format!("CPU read of pid {} va {va} ({frame})", pid.0)
            });
        }
    }

    /// Oracle check 2 for a device translation: the frame is allocated, in the generation the translation
    /// saw (not freed and reallocated since).
    pub(crate) fn check_frame_owned(&mut self, dev: DeviceId, t: &FrameTranslation) -> bool {
        let frame = t.frame;
        let allocated = self.phys.exists(frame) && self.phys.frame(frame).is_allocated();
        if allocated && self.phys.frame(frame).generation == t.generation {
            return true;
        }
        let what = if allocated {
            format!(
                "{frame}, reallocated since the translation it used (generation {} then, {} now)",
                t.generation,
                self.phys.frame(frame).generation
            )
        } else {
            format!("freed {frame}")
        };
        self.oracle.violation(
            ViolationKind::UseAfterFree,
            format!("device {} reached {what} ({:?})", dev.0, t.grant),
        );
        false
    }

    /// Oracle check 3 for DMA through a pin: the frame must be allocated and still pinned.
    pub(crate) fn check_pinned_frame(&mut self, dev: DeviceId, frame: FrameId) -> bool {
        let fr = self.phys.frame(frame);
        if !fr.is_allocated() {
            self.oracle.violation(
                ViolationKind::UseAfterFree,
                format!("device {} accessed freed {frame} through a pin", dev.0),
            );
            return false;
        }
        if !fr.maybe_dma_pinned() {
            self.oracle.violation(
                ViolationKind::PinBroken,
                format!(
                    "device {} accessed {frame} through a pin that no longer holds it",
                    dev.0
                ),
            );
            return false;
        }
        true
    }

    /// Oracle check 1 for a mirror translation at issue: the CPU page table maps `frame` at `va` now
    /// (device-private and device-exclusive entries included), writable for a write.
    pub(crate) fn check_mirror_current(
        &mut self,
        dev: DeviceId,
        pid: Pid,
        va: Va,
        frame: FrameId,
        write: bool,
    ) -> bool {
        let current = self.mms.get(&pid).and_then(|mm| {
            mm.translate(va).or_else(|| {
                let leaf = mm.pt.lookup(va)?;
                match leaf.pte {
                    Pte::DevicePrivate { write, .. } | Pte::DeviceExclusive { write, .. } => {
                        Some((leaf.frame_at(va)?, write, leaf))
                    }
                    _ => None,
                }
            })
        });
        match current {
            Some((f, w, _)) if f == frame && (w || !write) => {}
            other => {
                let now = match other {
                    Some((f, w, _)) => format!("{f} ({})", if w { "rw" } else { "ro" }),
                    None => "no present mapping".to_owned(),
                };
                self.oracle.violation(
                    ViolationKind::StaleTranslation,
                    format!(
                        "device {} {} {frame} for pid {} va {va}, but the CPU page table maps {now}",
                        dev.0,
                        if write { "wrote" } else { "read" },
                        pid.0
                    ),
                );
                return false;
            }
        }
        true
    }
}
