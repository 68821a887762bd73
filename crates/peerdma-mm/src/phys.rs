//! Physical memory: regions of frames with `struct page`-like metadata and real bytes.
//!
//! Linux counterpart: the memmap (`struct page` / `struct folio`), the buddy allocator and the shared zero page.
//!
//! - Each 4 KiB frame has a refcount, a mapcount (page-table mappings), a pin count kept the GUP way — a FOLL_PIN
//!   adds [`GUP_PIN_COUNTING_BIAS`] to the refcount (mm/gup.c) and `maybe_dma_pinned` tests refcount ≥ bias —,
//!   a dirty bit, an LRU state with the two aging bits reclaim reads (`accessed`, `referenced`; see
//!   [`crate::vmscan`]), and who owns it (anonymous or a file's page cache).
//! - Data is real bytes, allocated lazily: a frame never written reads as zeros and holds no buffer, and a
//!   page whose non-zero bytes fit a 12-byte window keeps them inline without a 4 KiB buffer. In
//!   token mode ([`DataMode::Token`], DESIGN.md §3) a page holds a 64-bit version instead of bytes
//!   (`phys/content.rs`).
//! - Memory is allocated as it is used, not when it is configured (Linux allocates the whole memmap at
//!   boot; the model's figures do not depend on it): frame metadata lives in chunks of 512 frames allocated
//!   on a frame's first allocation (`phys/table.rs`), a [`Frame`] is 32 bytes, page contents are kept apart per
//!   written page (`phys/content.rs`), and each region's free frames are ranges — a bump pointer plus the frames
//!   freed below it (`phys/freelist.rs`) — so configured but never-used memory costs 12 bytes per 2 MiB. The
//!   allocation order is the one a sorted set of free frames gives: lowest free frame first, THPs at the
//!   lowest free 2 MiB block, contiguous runs first fit.
//! - RAM is one region per NUMA node (`MemoryKind::Ram { node }`): regions `0..nr_nodes` are the nodes, region
//!   `n` is node `n`, and device regions come after them. Frame 0 of node 0 is the shared zero page: always
//!   allocated, never written, never freed.
//! - RAM allocation (the NUMA fallback order, the watermarks and movable memory) is [`page_alloc`]'s.
//! - A THP is 512 frames allocated together at a 2 MiB-aligned frame number. Each sub-frame keeps its own
//!   counts (a PMD mapping adds one mapping to each), so a partial unmap frees sub-frames individually. This
//!   collapses Linux's folio/split machinery into per-page accounting; it is a documented simplification.
//! - Each allocation bumps the frame's `generation`, so a translation that recorded (frame, generation) can tell
//!   a reused frame from the one it mapped (the oracle's use-after-free check).

use peerdma_core::{DeviceId, FrameId, PAGE_SIZE, PMD_SIZE, Pa, Pid};

mod content;
mod freelist;
pub mod page_alloc;
mod table;

use content::Store;
pub use content::{DataMode, PageContent, ZERO_HASH, hash_bytes};
use freelist::FreeFrames;
use table::FrameTable;

/// Refcount added by one FOLL_PIN (include/linux/mm.h `GUP_PIN_COUNTING_BIAS`).
pub const GUP_PIN_COUNTING_BIAS: u32 = 1024;

/// Free RAM pages below which a fault reclaims first (the node's low watermark; reclaim is
/// [`crate::vmscan`]'s, the allocator's zonelist walk uses it here).
pub const LOW_WATERMARK: u64 = 64;
/// Free RAM pages below which [`crate::kernel::Kernel::reclaim_if_low`] runs further passes until one frees
/// a page (the node's min watermark).
pub const MIN_WATERMARK: u64 = 16;

/// Frames per 2 MiB block.
pub const FRAMES_PER_PMD: u64 = PMD_SIZE / PAGE_SIZE;

/// What kind of memory a region is (DESIGN.md §3 table).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum MemoryKind {
    /// System RAM of a NUMA node.
    Ram {
        /// The node.
        node: u32,
    },
    /// MEMORY_DEVICE_PRIVATE: the CPU cannot address it.
    DevicePrivate {
        /// The owning device (`pgmap->owner`).
        owner: DeviceId,
    },
    /// MEMORY_DEVICE_COHERENT: CPU-addressable device memory.
    DeviceCoherent {
        /// The owning device.
        owner: DeviceId,
    },
    /// MEMORY_DEVICE_FS_DAX: persistent memory a DAX file maps directly (struct pages, direct CPU access).
    FsDax {
        /// The DAX file it backs.
        file: u32,
    },
    /// MEMORY_DEVICE_PCI_P2PDMA: a PCI BAR range published for peer-to-peer DMA, with struct pages
    /// (drivers/pci/p2pdma.c `pci_p2pdma_add_resource`). The CPU reaches it only as MMIO.
    P2pMem {
        /// The PCI device whose BAR it is.
        provider: DeviceId,
    },
}

/// The highest zone an allocation may use (include/linux/gfp.h `gfp_zone`): whether ZONE_MOVABLE, the memory
/// of movable nodes, is allowed (module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum GfpZone {
    /// Up to ZONE_NORMAL: never movable memory (`GFP_KERNEL`, `GFP_USER`, or any request under
    /// `memalloc_pin_save`).
    Normal,
    /// Up to ZONE_MOVABLE: movable nodes too (`__GFP_MOVABLE`: `GFP_HIGHUSER_MOVABLE`, `GFP_TRANSHUGE`).
    Movable,
}

impl GfpZone {
    /// Returns the zone limit of an allocation for a frame of `owner` (module docs, rules 1–3): anonymous
    /// pages may use movable memory; kernel pages, the zero page and page-cache pages may not.
    pub fn for_owner(owner: FrameOwner) -> Self {
        match owner {
            FrameOwner::Anon | FrameOwner::Free => GfpZone::Movable,
            FrameOwner::Zero | FrameOwner::File { .. } | FrameOwner::Kernel => GfpZone::Normal,
        }
    }
}

/// Why a node could not be made movable ([`PhysMem::set_node_movable`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MovableError {
    /// The node does not exist.
    #[error("node {node} out of range (the machine has {nr_nodes} nodes)")]
    NoSuchNode {
        /// The node asked for.
        node: u32,
        /// Nodes there are.
        nr_nodes: u32,
    },
    /// Node 0 holds the zero page and stands for the boot node: it cannot be movable.
    #[error("node 0 holds the zero page and kernel memory and cannot be movable")]
    BootNode,
    /// The node already has allocated pages (memory is onlined movable before use).
    #[error("node {node} already has allocated pages")]
    InUse {
        /// The node.
        node: u32,
    },
}

/// Who a frame belongs to while allocated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum FrameOwner {
    /// Not allocated.
    Free,
    /// The shared zero page.
    Zero,
    /// An anonymous page.
    Anon,
    /// A page-cache page of a file at a page offset.
    File {
        /// The file.
        file: u32,
        /// Page offset inside the file.
        pgoff: u64,
    },
    /// A kernel/driver page (e.g. inserted into a VM_MIXEDMAP VMA).
    Kernel,
}

/// LRU list membership (mm/vmscan.c; `PG_lru` + `PG_active`). Anonymous 4 KiB pages are on the lists of
/// [`crate::vmscan`] (a page isolated by reclaim is on none); page-cache pages and THPs carry a state but sit on
/// no list, as they are not reclaimed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LruState {
    /// Not on an LRU list (free, zero page, device memory).
    #[default]
    None,
    /// The active list.
    Active,
    /// The inactive list.
    Inactive,
}

/// A read-only snapshot of one frame's metadata, as other crates and tests see it (the model's
/// `/proc/kpagecount` + `/proc/kpageflags`, fs/proc/page.c): a value, so holding it borrows nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameInfo {
    /// What memory the frame is in.
    pub kind: MemoryKind,
    /// The RAM node, or `None` for device memory.
    pub node: Option<u32>,
    /// Whether the frame is in ZONE_MOVABLE.
    pub zone_movable: bool,
    /// Whether the frame is allocated.
    pub allocated: bool,
    /// Who owns it ([`FrameOwner::Free`] when free).
    pub owner: FrameOwner,
    /// References (mappings, page cache, pins with their bias, transient gets).
    pub refcount: u32,
    /// Page-table mappings.
    pub mapcount: u32,
    /// `page_maybe_dma_pinned`.
    pub maybe_dma_pinned: bool,
    /// `PG_locked` ([`Frame::locked`]).
    pub locked: bool,
    /// Dirty since last written back.
    pub dirty: bool,
    /// LRU membership.
    pub lru: LruState,
}

/// The metadata of one 4 KiB frame: 32 bytes (the owner packed into its tag, file and page offset).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    /// References (mappings, page cache, pins with their bias, transient gets).
    pub refcount: u32,
    /// Page-table mappings of the frame.
    pub mapcount: u32,
    /// Dirty since last written back.
    pub dirty: bool,
    /// LRU membership.
    pub lru: LruState,
    /// The accessed ("young") bit of the page's PTEs, merged into one bit per frame: set by a CPU access
    /// through any mapping, tested and cleared by reclaim (`folio_referenced`). A simplification of the
    /// per-PTE hardware bit: a page young in two mappings counts once.
    pub accessed: bool,
    /// `PG_referenced`: reclaim saw the page young once already (the "look twice" mark of
    /// `folio_check_references`, mm/vmscan.c).
    pub referenced: bool,
    /// Allocation counter; bumped at each allocation.
    pub generation: u64,
    /// `PG_locked`, as far as the model needs it: set while a migration (`migrate_vma`, [`crate::migrate`], or
    /// a device-range one, [`crate::migrate_device`]) holds the page, so another migration skips it and a CPU
    /// fault on it waits.
    pub locked: bool,
    /// [`FrameOwner`] variant: 0 free, 1 zero page, 2 anonymous, 3 file, 4 kernel.
    owner_tag: u8,
    /// Page offset bits 32..48 of a file owner.
    owner_pgoff_hi: u16,
    /// The file of a file owner; for an anonymous page, its anon_vma ([`Frame::anon_vma`]) as pid + 1, or 0
    /// while it has none.
    owner_file: u32,
    /// Page offset bits 0..32 of a file owner.
    owner_pgoff_lo: u32,
}

impl Default for Frame {
    fn default() -> Self {
        Self::FREE
    }
}

impl Frame {
    /// A free frame that was never allocated.
    pub const FREE: Frame = Frame {
        refcount: 0,
        mapcount: 0,
        dirty: false,
        lru: LruState::None,
        accessed: false,
        referenced: false,
        generation: 0,
        locked: false,
        owner_tag: 0,
        owner_pgoff_hi: 0,
        owner_file: 0,
        owner_pgoff_lo: 0,
    };

    /// The largest page offset a file owner can record: 2^48 pages (2^60 bytes).
    pub const MAX_FILE_PGOFF: u64 = (1 << 48) - 1;

    /// Returns who owns the frame.
    pub fn owner(&self) -> FrameOwner {
        match self.owner_tag {
            1 => FrameOwner::Zero,
            2 => FrameOwner::Anon,
            3 => FrameOwner::File {
                file: self.owner_file,
                pgoff: (u64::from(self.owner_pgoff_hi) << 32) | u64::from(self.owner_pgoff_lo),
            },
            4 => FrameOwner::Kernel,
            _ => FrameOwner::Free,
        }
    }

    /// Sets who owns the frame.
    ///
    /// # Panics
    /// Panics for a file page offset above [`Frame::MAX_FILE_PGOFF`] (a file of more than 2^60 bytes).
    fn set_owner(&mut self, owner: FrameOwner) {
        let (tag, file, pgoff) = match owner {
            FrameOwner::Free => (0, 0, 0),
            FrameOwner::Zero => (1, 0, 0),
            FrameOwner::Anon => (2, 0, 0),
            FrameOwner::File { file, pgoff } => (3, file, pgoff),
            FrameOwner::Kernel => (4, 0, 0),
        };
        assert!(
            pgoff <= Self::MAX_FILE_PGOFF,
            "file page offset {pgoff:#x} beyond 2^48 pages"
        );
        self.owner_tag = tag;
        self.owner_file = file;
        self.owner_pgoff_lo = (pgoff & 0xffff_ffff) as u32;
        self.owner_pgoff_hi = u16::try_from(pgoff >> 32).expect("checked above");
    }

    /// Returns the anon_vma of an anonymous page (`folio->mapping` of an anonymous folio, mm/rmap.c), named by
    /// the address space it was created for: the page can be mapped only there and in the address spaces
    /// forked from it since ([`crate::rmap`]). `None` for a page that is not anonymous or was never given one
    /// (the reverse map then visits every address space).
    pub fn anon_vma(&self) -> Option<Pid> {
        (self.owner_tag == 2 && self.owner_file != 0).then(|| Pid(self.owner_file - 1))
    }

    /// Sets the anon_vma of an anonymous page (`__folio_set_anon`); no effect on any other frame.
    pub(crate) fn set_anon_vma(&mut self, anon_vma: Pid) {
        if self.owner_tag == 2 {
            self.owner_file = anon_vma.0.saturating_add(1);
        }
    }

    /// Returns whether the frame is allocated.
    pub fn is_allocated(&self) -> bool {
        self.owner_tag != 0
    }

    /// Returns whether the frame may be DMA-pinned (`folio_maybe_dma_pinned`, bias rule).
    pub fn maybe_dma_pinned(&self) -> bool {
        self.refcount >= GUP_PIN_COUNTING_BIAS
    }
}

/// A contiguous range of frames of one kind.
#[derive(Clone, Debug)]
pub struct Region {
    /// The kind of memory.
    pub kind: MemoryKind,
    /// First frame.
    pub start: u64,
    /// Number of frames.
    pub nr_frames: u64,
    /// The CPU physical address of the first frame, for regions backing a device BAR (P2P memory); `None`
    /// for regions of the simulated physical map, whose frame `f` is at `f.pa()`.
    pub base_pa: Option<Pa>,
    /// The region is ZONE_MOVABLE: a movable RAM node ([`PhysMem::set_node_movable`]). Only anonymous pages
    /// are allocated here (module docs), and long-term GUP migrates them out before pinning.
    pub movable: bool,
    free: FreeFrames,
}

/// All physical memory of a simulation.
#[derive(Debug)]
pub struct PhysMem {
    frames: FrameTable,
    regions: Vec<Region>,
    zero: FrameId,
    nr_nodes: u32,
    store: Store,
    /// The last version stamped on a page (token mode).
    last_version: u64,
    /// Frames freed while on an LRU list, not yet taken off it: Linux's final `folio_put` takes a folio off
    /// its lruvec (`__page_cache_release` → `lruvec_del_folio`); the model logs it here and
    /// [`crate::vmscan`] drains the log, so the LRU never walks its lists to find freed pages.
    lru_freed: Vec<FrameId>,
}

/// The data mode cannot change: pages were written already ([`PhysMem::set_data_mode`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the data mode is chosen before any page is written")]
pub struct DataModeError;

/// An allocation request could not be met.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("out of memory in region {region}")]
pub struct OutOfMemory {
    /// The region that was full.
    pub region: usize,
}

impl PhysMem {
    /// Creates physical memory with one RAM region of `ram_bytes` on node 0 (rounded down to 2 MiB, at least
    /// 2 MiB). Frame 0 becomes the zero page.
    pub fn new(ram_bytes: u64) -> Self {
        Self::new_numa(&[ram_bytes])
    }

    /// Creates physical memory with one RAM region per NUMA node, node `n` of `node_sizes[n]` bytes (each
    /// rounded down to 2 MiB, at least 2 MiB); region `n` is node `n`. Frame 0 (on node 0) becomes the zero
    /// page. Contents are bytes ([`DataMode::Bytes`]).
    ///
    /// # Panics
    /// Panics when `node_sizes` is empty: a machine has at least one node.
    pub fn new_numa(node_sizes: &[u64]) -> Self {
        Self::with_mode(node_sizes, DataMode::Bytes)
    }

    /// Creates physical memory as [`PhysMem::new_numa`] does, with page contents kept as `mode` says.
    ///
    /// # Panics
    /// Panics when `node_sizes` is empty: a machine has at least one node.
    pub fn with_mode(node_sizes: &[u64], mode: DataMode) -> Self {
        assert!(!node_sizes.is_empty(), "at least one RAM node");
        let mut pm = Self {
            frames: FrameTable::default(),
            regions: Vec::new(),
            zero: FrameId(0),
            nr_nodes: u32::try_from(node_sizes.len()).expect("fewer than 2^32 nodes"),
            store: Store::new(mode),
            last_version: 0,
            lru_freed: Vec::new(),
        };
        for (node, &bytes) in (0u32..).zip(node_sizes) {
            let nr = (bytes / PMD_SIZE).max(1) * FRAMES_PER_PMD;
            let r = pm.add_region(MemoryKind::Ram { node }, nr);
            debug_assert_eq!(r, node as usize, "region n is node n");
        }
        let zero = pm.regions[0]
            .free
            .pop_first()
            .expect("a fresh region has free frames");
        let f = pm.frames.get_mut(zero);
        f.set_owner(FrameOwner::Zero);
        f.refcount = 1;
        f.generation = 1;
        pm.zero = FrameId(zero);
        pm
    }

    /// Returns how page contents are kept.
    pub fn data_mode(&self) -> DataMode {
        self.store.mode()
    }

    /// Chooses how page contents are kept, before any page is written (a scenario's `[sim] data`).
    ///
    /// # Errors
    /// [`DataModeError`] once a page was written: its contents could not be carried over.
    pub fn set_data_mode(&mut self, mode: DataMode) -> Result<(), DataModeError> {
        if mode == self.store.mode() {
            return Ok(());
        }
        if self.store.host_bytes() != 0 {
            return Err(DataModeError);
        }
        self.store = Store::new(mode);
        Ok(())
    }

    /// Returns an estimate of the host memory the frame metadata, the free lists and the page contents
    /// hold, in bytes (heap blocks counted at their payload size, allocator overhead not included).
    pub fn host_bytes(&self) -> u64 {
        let free: u64 = self
            .regions
            .iter()
            .map(|r| r.free.host_bytes())
            .sum::<u64>();
        self.frames.host_bytes() + self.store.host_bytes() + free
    }

    /// Adds a region of `nr_frames` frames (rounded up to whole 2 MiB blocks) and returns its index.
    pub fn add_region(&mut self, kind: MemoryKind, nr_frames: u64) -> usize {
        let nr = nr_frames.div_ceil(FRAMES_PER_PMD) * FRAMES_PER_PMD;
        // Keep regions 2 MiB aligned in frame space so THP allocation can align.
        let start = self.frames.len().div_ceil(FRAMES_PER_PMD) * FRAMES_PER_PMD;
        let idx = self.regions.len();
        let region = u32::try_from(idx).expect("fewer than 2^32 regions");
        self.frames.grow(start + nr, region);
        self.regions.push(Region {
            kind,
            start,
            nr_frames: nr,
            base_pa: None,
            movable: false,
            free: FreeFrames::new(start, start + nr),
        });
        idx
    }

    /// Adds a region of exactly `nr_frames` frames whose first frame sits at CPU physical address `base`
    /// (a device BAR range: `devm_memremap_pages` over it), and returns its index. Frame numbers stay 2 MiB
    /// aligned as for [`PhysMem::add_region`]; the padding frames up to the next 2 MiB block are never
    /// allocatable.
    pub fn add_region_at(&mut self, kind: MemoryKind, nr_frames: u64, base: Pa) -> usize {
        let idx = self.add_region(kind, nr_frames);
        let region = &mut self.regions[idx];
        let end = region.start + nr_frames;
        region.free.truncate(end);
        region.nr_frames = nr_frames;
        region.base_pa = Some(base);
        idx
    }
    /// Returns the CPU physical address of frame `f`: `f.pa()` in the simulated physical map, or the BAR
    /// address for frames of a region with a [`Region::base_pa`].
    pub fn frame_pa(&self, f: FrameId) -> Pa {
        let region = &self.regions[self.region_of(f)];
        match region.base_pa {
            Some(base) => base.add((f.0 - region.start) * PAGE_SIZE),
            None => f.pa(),
        }
    }

    /// Returns the frame holding CPU physical address `pa`, if any (the inverse of [`PhysMem::frame_pa`]).
    /// BAR-backed regions are looked up first, then the simulated physical map.
    pub fn frame_at_pa(&self, pa: Pa) -> Option<FrameId> {
        let in_bar = self.regions.iter().find_map(|r| {
            let base = r.base_pa?;
            let off = pa.raw().checked_sub(base.raw())? / PAGE_SIZE;
            (off < r.nr_frames).then_some(FrameId(r.start + off))
        });
        if in_bar.is_some() {
            return in_bar;
        }
        let pfn = pa.raw() / PAGE_SIZE;
        self.regions
            .iter()
            .find(|r| r.base_pa.is_none() && (r.start..r.start + r.nr_frames).contains(&pfn))
            .map(|_| FrameId(pfn))
    }

    /// Allocates `nr_frames` contiguous zero-filled frames from region `r`, lowest address first (first fit,
    /// as `gen_pool_alloc` does for the P2P pool); returns the first. Each frame gets refcount 1.
    ///
    /// # Errors
    /// [`OutOfMemory`] when no run of `nr_frames` free frames exists (or `nr_frames` is zero).
    pub fn alloc_contiguous(
        &mut self,
        r: usize,
        nr_frames: u64,
        owner: FrameOwner,
    ) -> Result<FrameId, OutOfMemory> {
        let oom = OutOfMemory { region: r };
        if nr_frames == 0 {
            return Err(oom);
        }
        let first = self.regions[r].free.take_first_run(nr_frames).ok_or(oom)?;
        for pfn in first..first + nr_frames {
            self.init_frame(FrameId(pfn), owner);
        }
        Ok(FrameId(first))
    }

    /// Returns the shared zero page.
    pub fn zero_page(&self) -> FrameId {
        self.zero
    }

    /// Returns the frame's metadata.
    ///
    /// # Panics
    /// Panics if the frame does not exist (an internal invariant: frame ids come from this allocator).
    pub fn frame(&self, f: FrameId) -> &Frame {
        self.frames.get(f.0)
    }

    /// Returns the frame's metadata, mutably.
    pub fn frame_mut(&mut self, f: FrameId) -> &mut Frame {
        self.frames.get_mut(f.0)
    }

    /// Returns whether `f` names a frame of this memory.
    pub fn exists(&self, f: FrameId) -> bool {
        f.0 < self.frames.len()
    }

    /// Returns a snapshot of frame `f`'s metadata.
    pub fn frame_info(&self, f: FrameId) -> FrameInfo {
        let fr = self.frame(f);
        FrameInfo {
            kind: self.kind(f),
            node: self.node_of(f),
            zone_movable: self.is_zone_movable_page(f),
            allocated: fr.is_allocated(),
            owner: fr.owner(),
            refcount: fr.refcount,
            mapcount: fr.mapcount,
            maybe_dma_pinned: fr.maybe_dma_pinned(),
            locked: fr.locked,
            dirty: fr.dirty,
            lru: fr.lru,
        }
    }

    /// Returns the kind of memory the frame is in.
    pub fn kind(&self, f: FrameId) -> MemoryKind {
        self.regions[self.region_of(f)].kind
    }

    /// Returns the index of the region holding `f`.
    pub fn region_of(&self, f: FrameId) -> usize {
        self.frames.region(f.0) as usize
    }

    /// Returns the regions.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Returns the number of free frames in region `r`.
    pub fn nr_free(&self, r: usize) -> u64 {
        self.regions[r].free.len()
    }

    /// Allocates one zero-filled frame from region `r` with refcount 1 (lowest free frame first).
    pub fn alloc(&mut self, r: usize, owner: FrameOwner) -> Result<FrameId, OutOfMemory> {
        let pfn = self.regions[r]
            .free
            .pop_first()
            .ok_or(OutOfMemory { region: r })?;
        let f = FrameId(pfn);
        self.init_frame(f, owner);
        Ok(f)
    }

    /// Allocates 512 contiguous, 2 MiB-aligned zero-filled frames (a THP) from region `r`; returns the head.
    /// Each sub-frame gets refcount 1.
    pub fn alloc_pmd(&mut self, r: usize, owner: FrameOwner) -> Result<FrameId, OutOfMemory> {
        let head = self.regions[r]
            .free
            .take_first_aligned_block(FRAMES_PER_PMD)
            .ok_or(OutOfMemory { region: r })?;
        for pfn in head..head + FRAMES_PER_PMD {
            self.init_frame(FrameId(pfn), owner);
        }
        Ok(FrameId(head))
    }

    fn init_frame(&mut self, f: FrameId, owner: FrameOwner) {
        self.store.clear(f.0);
        let fr = self.frame_mut(f);
        fr.set_owner(owner);
        fr.refcount = 1;
        fr.mapcount = 0;
        fr.dirty = false;
        fr.lru = LruState::None;
        fr.accessed = false;
        fr.referenced = false;
        fr.generation += 1;
    }

    /// Takes a reference (`get_page`).
    pub fn get(&mut self, f: FrameId) {
        if f != self.zero {
            self.frame_mut(f).refcount += 1;
        }
    }

    /// Drops a reference (`put_page`); the frame returns to its region's free list at zero. Returns whether the
    /// frame was freed.
    ///
    /// # Panics
    /// Panics if the refcount is already zero: a double free is a broken model invariant.
    pub fn put(&mut self, f: FrameId) -> bool {
        if f == self.zero {
            return false;
        }
        let fr = self.frame_mut(f);
        assert!(fr.refcount > 0, "put on a frame with refcount 0 ({f})");
        fr.refcount -= 1;
        if fr.refcount > 0 {
            return false;
        }
        fr.set_owner(FrameOwner::Free);
        fr.mapcount = 0;
        let on_lru = fr.lru != LruState::None;
        fr.lru = LruState::None;
        fr.accessed = false;
        fr.referenced = false;
        fr.dirty = false;
        self.store.clear(f.0);
        let region = self.region_of(f);
        self.regions[region].free.insert(f.0);
        if on_lru {
            self.lru_freed.push(f);
        }
        true
    }

    /// Takes the log of frames freed while on an LRU list (the `lru_freed` field).
    pub(crate) fn take_lru_freed(&mut self) -> Vec<FrameId> {
        std::mem::take(&mut self.lru_freed)
    }

    /// Returns the log of frames freed while on an LRU list, not yet taken.
    pub(crate) fn lru_freed(&self) -> &[FrameId] {
        &self.lru_freed
    }

    /// Adds one page-table mapping of `frame`: a reference and a mapcount (`folio_add_*_rmap` with the
    /// mapping's `folio_get`); the zero page is not counted.
    pub fn map_frame(&mut self, frame: FrameId) {
        if frame == self.zero {
            return;
        }
        self.get(frame);
        self.frame_mut(frame).mapcount += 1;
    }

    /// Drops one page-table mapping of `frame` (mapcount and reference; the last reference frees it).
    pub fn unmap_frame(&mut self, frame: FrameId) {
        if frame == self.zero {
            return;
        }
        let fr = self.frame_mut(frame);
        fr.mapcount = fr.mapcount.saturating_sub(1);
        self.put(frame);
    }

    /// Sets who owns an allocated frame (the page cache adopting a page, for instance).
    pub fn set_owner(&mut self, f: FrameId, owner: FrameOwner) {
        self.frame_mut(f).set_owner(owner);
    }

    /// Returns a copy of the frame's 4 KiB of bytes (`None` means all zero; always `None` in token mode).
    pub fn data(&self, f: FrameId) -> Option<Vec<u8>> {
        self.store.has_bytes(f.0).then(|| {
            let mut b = vec![0u8; content::PAGE_BYTES];
            self.store.read(f.0, 0, &mut b);
            b
        })
    }

    /// Returns the frame's version stamp (token mode; 0 while never written, and always 0 in bytes mode).
    pub fn version(&self, f: FrameId) -> u64 {
        self.store.version(f.0)
    }

    /// Returns the frame's contents as a value: what swap-out keeps and [`PhysMem::set_content`] puts back.
    pub fn content(&self, f: FrameId) -> PageContent {
        self.store.content(f.0)
    }

    /// Replaces the frame's contents with `c` (swap-in) and marks it dirty.
    ///
    /// # Panics
    /// Panics when writing the zero page (a broken model invariant).
    pub fn set_content(&mut self, f: FrameId, c: PageContent) {
        assert!(f != self.zero, "write to the shared zero page");
        self.frame_mut(f).dirty = true;
        self.store.set_content(f.0, c);
    }

    /// Copies `buf.len()` bytes at `offset` inside the frame into `buf` (zeros in token mode).
    pub fn read(&self, f: FrameId, offset: usize, buf: &mut [u8]) {
        self.store.read(f.0, offset, buf);
    }

    /// Copies `buf` into the frame at `offset` and marks it dirty; in token mode, stamps the frame with a
    /// new version instead.
    ///
    /// # Panics
    /// Panics when writing the zero page: the fault path must have replaced it (a broken model invariant).
    pub fn write(&mut self, f: FrameId, offset: usize, buf: &[u8]) {
        assert!(f != self.zero, "write to the shared zero page");
        self.frame_mut(f).dirty = true;
        if self.store.mode() == DataMode::Token {
            self.last_version += 1;
            self.store.set_version(f.0, self.last_version);
            return;
        }
        self.store.write(f.0, offset, buf);
    }

    /// Copies the whole contents of `src` into `dst` (`copy_highpage`; in token mode the version).
    pub fn copy_frame(&mut self, src: FrameId, dst: FrameId) {
        self.store.copy(src.0, dst.0);
        self.frame_mut(dst).dirty = true;
    }

    /// Returns a 64-bit content hash of the frame: [`hash_bytes`] of its bytes (all-zero frames hash to
    /// [`ZERO_HASH`]), or in token mode its version (0, [`ZERO_HASH`], while never written).
    pub fn content_hash(&self, f: FrameId) -> u64 {
        match self.store.mode() {
            DataMode::Token => self.store.version(f.0),
            DataMode::Bytes => self.store.bytes_hash(f.0),
        }
    }
}

#[cfg(test)]
mod tests;
