//! Physical memory: regions of frames with `struct page`-like metadata and real bytes.
//!
//! Linux counterpart: the memmap (`struct page` / `struct folio`), the buddy allocator and the shared zero page.
//!
//! - Each 4 KiB frame has a refcount, a mapcount (page-table mappings), a pin count kept the GUP way — a FOLL_PIN
//!   adds [`GUP_PIN_COUNTING_BIAS`] to the refcount (mm/gup.c) and `maybe_dma_pinned` tests refcount ≥ bias —,
//!   a dirty bit, an LRU state with the two aging bits reclaim reads (`accessed`, `referenced`; see
//!   [`crate::vmscan`]), and who owns it (anonymous or a file's page cache).
//! - Data is real bytes, allocated lazily: a frame never written reads as zeros and holds no buffer.
//! - RAM is one region per NUMA node (`MemoryKind::Ram { node }`): regions `0..nr_nodes` are the nodes, region
//!   `n` is node `n`, and device regions come after them. Frame 0 of node 0 is the shared zero page: always
//!   allocated, never written, never freed.
//! - RAM allocation (the NUMA fallback order, the watermarks and movable memory) is [`page_alloc`]'s.
//! - A THP is 512 frames allocated together at a 2 MiB-aligned frame number. Each sub-frame keeps its own
//!   counts (a PMD mapping adds one mapping to each), so a partial unmap frees sub-frames individually. This
//!   collapses Linux's folio/split machinery into per-page accounting; it is a documented simplification.
//! - Each allocation bumps the frame's `generation`, so a translation that recorded (frame, generation) can tell
//!   a reused frame from the one it mapped (the oracle's use-after-free check).

use std::collections::BTreeSet;

use peerdma_core::{DeviceId, FrameId, PAGE_SIZE, PMD_SIZE, Pa};

pub mod page_alloc;

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

const PAGE_BYTES: usize = 4096;

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

/// The metadata of one 4 KiB frame.
#[derive(Clone, Debug, Default)]
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
    owner: Option<FrameOwner>,
    region: u32,
    data: Option<Box<[u8]>>,
}

impl Frame {
    /// Returns who owns the frame.
    pub fn owner(&self) -> FrameOwner {
        self.owner.unwrap_or(FrameOwner::Free)
    }

    /// Returns whether the frame is allocated.
    pub fn is_allocated(&self) -> bool {
        !matches!(self.owner(), FrameOwner::Free)
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
    free: BTreeSet<u64>,
}

/// All physical memory of a simulation.
#[derive(Debug)]
pub struct PhysMem {
    frames: Vec<Frame>,
    regions: Vec<Region>,
    zero: FrameId,
    nr_nodes: u32,
    /// Frames freed while on an LRU list, not yet taken off it: Linux's final `folio_put` takes a folio off
    /// its lruvec (`__page_cache_release` → `lruvec_del_folio`); the model logs it here and
    /// [`crate::vmscan`] drains the log, so the LRU never walks its lists to find freed pages.
    lru_freed: Vec<FrameId>,
}

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
    /// page.
    ///
    /// # Panics
    /// Panics when `node_sizes` is empty: a machine has at least one node.
    pub fn new_numa(node_sizes: &[u64]) -> Self {
        assert!(!node_sizes.is_empty(), "at least one RAM node");
        let mut pm = Self {
            frames: Vec::new(),
            regions: Vec::new(),
            zero: FrameId(0),
            nr_nodes: u32::try_from(node_sizes.len()).expect("fewer than 2^32 nodes"),
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
        let f = &mut pm.frames[usize::try_from(zero).expect("frame index fits usize")];
        f.owner = Some(FrameOwner::Zero);
        f.refcount = 1;
        f.generation = 1;
        pm.zero = FrameId(zero);
        pm
    }

    /// Adds a region of `nr_frames` frames (rounded up to whole 2 MiB blocks) and returns its index.
    pub fn add_region(&mut self, kind: MemoryKind, nr_frames: u64) -> usize {
        let nr = nr_frames.div_ceil(FRAMES_PER_PMD) * FRAMES_PER_PMD;
        // Keep regions 2 MiB aligned in frame space so THP allocation can align.
        let start = (self.frames.len() as u64).div_ceil(FRAMES_PER_PMD) * FRAMES_PER_PMD;
        let idx = self.regions.len();
        let end = usize::try_from(start + nr).expect("frame count fits usize");
        let region = u32::try_from(idx).expect("fewer than 2^32 regions");
        self.frames.resize_with(end, || Frame {
            region,
            ..Frame::default()
        });
        self.regions.push(Region {
            kind,
            start,
            nr_frames: nr,
            base_pa: None,
            movable: false,
            free: (start..start + nr).collect(),
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
        region.free.retain(|&pfn| pfn < end);
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
        let mut run_start = None;
        let mut run_len = 0u64;
        let mut prev = None;
        for &pfn in &self.regions[r].free {
            if prev.is_some_and(|p: u64| p + 1 == pfn) {
                run_len += 1;
            } else {
                run_start = Some(pfn);
                run_len = 1;
            }
            prev = Some(pfn);
            if run_len == nr_frames {
                break;
            }
        }
        let first = run_start.filter(|_| run_len == nr_frames).ok_or(oom)?;
        for pfn in first..first + nr_frames {
            self.regions[r].free.remove(&pfn);
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
        &self.frames[usize::try_from(f.0).expect("frame index fits usize")]
    }

    /// Returns the frame's metadata, mutably.
    pub fn frame_mut(&mut self, f: FrameId) -> &mut Frame {
        &mut self.frames[usize::try_from(f.0).expect("frame index fits usize")]
    }

    /// Returns whether `f` names a frame of this memory.
    pub fn exists(&self, f: FrameId) -> bool {
        f.0 < self.frames.len() as u64
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
        self.regions[self.frame(f).region as usize].kind
    }

    /// Returns the index of the region holding `f`.
    pub fn region_of(&self, f: FrameId) -> usize {
        self.frame(f).region as usize
    }

    /// Returns the regions.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Returns the number of free frames in region `r`.
    pub fn nr_free(&self, r: usize) -> u64 {
        self.regions[r].free.len() as u64
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
        let region = &self.regions[r];
        let mut head = None;
        let mut block = region.start;
        while block < region.start + region.nr_frames {
            if region.free.range(block..block + FRAMES_PER_PMD).count() as u64 == FRAMES_PER_PMD {
                head = Some(block);
                break;
            }
            block += FRAMES_PER_PMD;
        }
        let head = head.ok_or(OutOfMemory { region: r })?;
        for pfn in head..head + FRAMES_PER_PMD {
            self.regions[r].free.remove(&pfn);
            self.init_frame(FrameId(pfn), owner);
        }
        Ok(FrameId(head))
    }

    fn init_frame(&mut self, f: FrameId, owner: FrameOwner) {
        let fr = self.frame_mut(f);
        fr.owner = Some(owner);
        fr.refcount = 1;
        fr.mapcount = 0;
        fr.dirty = false;
        fr.lru = LruState::None;
        fr.accessed = false;
        fr.referenced = false;
        fr.generation += 1;
        fr.data = None;
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
        fr.owner = Some(FrameOwner::Free);
        fr.mapcount = 0;
        let on_lru = fr.lru != LruState::None;
        fr.lru = LruState::None;
        fr.accessed = false;
        fr.referenced = false;
        fr.dirty = false;
        fr.data = None;
        let region = fr.region as usize;
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
        self.frame_mut(f).owner = Some(owner);
    }

    /// Returns the frame's bytes (`None` means all zero).
    pub fn data(&self, f: FrameId) -> Option<&[u8]> {
        self.frame(f).data.as_deref()
    }

    /// Copies `buf.len()` bytes at `offset` inside the frame into `buf`.
    pub fn read(&self, f: FrameId, offset: usize, buf: &mut [u8]) {
        match &self.frame(f).data {
            Some(d) => buf.copy_from_slice(&d[offset..offset + buf.len()]),
            None => buf.fill(0),
        }
    }

    /// Copies `buf` into the frame at `offset` and marks it dirty.
    ///
    /// # Panics
    /// Panics when writing the zero page: the fault path must have replaced it (a broken model invariant).
    pub fn write(&mut self, f: FrameId, offset: usize, buf: &[u8]) {
        assert!(f != self.zero, "write to the shared zero page");
        let fr = self.frame_mut(f);
        fr.dirty = true;
        if fr.data.is_none() {
            if buf.iter().all(|&b| b == 0) {
                return;
            }
            fr.data = Some(vec![0u8; PAGE_BYTES].into_boxed_slice());
        }
        let d = fr.data.as_mut().expect("allocated above");
        d[offset..offset + buf.len()].copy_from_slice(buf);
    }

    /// Copies the whole contents of `src` into `dst` (`copy_highpage`).
    pub fn copy_frame(&mut self, src: FrameId, dst: FrameId) {
        let data = self.frame(src).data.clone();
        let fr = self.frame_mut(dst);
        fr.data = data;
        fr.dirty = true;
    }

    /// Returns a 64-bit content hash of the frame (FNV-1a over the bytes; all-zero frames hash to [`ZERO_HASH`]).
    pub fn content_hash(&self, f: FrameId) -> u64 {
        match &self.frame(f).data {
            None => ZERO_HASH,
            Some(d) => hash_bytes(d),
        }
    }
}

/// The content hash of an all-zero page.
pub const ZERO_HASH: u64 = 0;

/// The multiplier of each lane of [`hash_bytes`] (FNV-1a's 64-bit prime).
const HASH_PRIME: u64 = 0x0100_0000_01b3;

/// Hashes a page of bytes; an all-zero page hashes to [`ZERO_HASH`], any other to an odd value.
///
/// Four independent FNV-1a-style lanes over 8-byte words (word `i` goes to lane `i % 4`), so the
/// multiplications of neighbouring words do not wait for each other, and the all-zero test is an OR over
/// the same words in the same pass (no second scan). The lanes are folded together at the end. The oracle
/// compares these hashes only for equality, within one run: any well-mixed 64-bit function serves.
pub fn hash_bytes(d: &[u8]) -> u64 {
    let mut lanes: [u64; 4] = [
        0xcbf2_9ce4_8422_2325,
        0x8422_2325_cbf2_9ce4,
        0x9e37_79b9_7f4a_7c15,
        0x7f4a_7c15_9e37_79b9,
    ];
    let mut any = 0u64;
    let word = |b: &[u8]| {
        let mut w = [0u8; 8];
        w[..b.len()].copy_from_slice(b);
        u64::from_le_bytes(w)
    };
    let mut blocks = d.chunks_exact(32);
    for block in &mut blocks {
        for (lane, w) in lanes.iter_mut().zip(block.chunks_exact(8)) {
            let w = word(w);
            any |= w;
            *lane = (*lane ^ w).wrapping_mul(HASH_PRIME);
        }
    }
    for (lane, w) in lanes.iter_mut().zip(blocks.remainder().chunks(8)) {
        let w = word(w);
        any |= w;
        *lane = (*lane ^ w).wrapping_mul(HASH_PRIME);
    }
    if any == 0 {
        return ZERO_HASH;
    }
    let len = u64::try_from(d.len()).unwrap_or(u64::MAX);
    let h = lanes
        .iter()
        .zip([0u32, 16, 32, 48])
        .fold(len, |h, (&l, r)| {
            (h ^ l.rotate_left(r)).wrapping_mul(HASH_PRIME)
        });
    (h ^ (h >> 29)) | 1
}

#[cfg(test)]
mod tests;
