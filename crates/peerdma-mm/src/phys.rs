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
//! - RAM allocation follows Linux's default local policy with zonelist fallback (mm/mempolicy.c: with no
//!   policy set a task allocates on its local node; mm/page_alloc.c `get_page_from_freelist` walks the
//!   zonelist): [`PhysMem::alloc_node`] takes the first node, in [`PhysMem::fallback_order`] from the
//!   preferred (home) node, whose free pages are at or above [`LOW_WATERMARK`] — the fast path's
//!   `ALLOC_WMARK_LOW` check, and a node below it is skipped rather than reclaimed because
//!   `node_reclaim_mode` is 0 by default —, then the first at or above [`MIN_WATERMARK`] (the slow path's
//!   `ALLOC_WMARK_MIN`), then the first with any free page. Fallback order is the home node, then the nodes
//!   above it in ascending id, wrapping round to node 0 and up (for node 1 of 3: 1, 2, 0): every remote
//!   node is at the same distance in the model (a SLIT of 10 local, 20 remote), and `find_next_best_node`
//!   (mm/page_alloc.c) breaks equal distances by penalising nodes below the local one ("prefer the next
//!   node"); its `node_load` round-robin between zonelists is not modelled. Reclaim, which
//!   runs only when the walk finds no node above a watermark, is [`crate::vmscan`]'s.
//! - A RAM node can be **movable** ([`PhysMem::set_node_movable`], [`Region::movable`]): all its memory is
//!   ZONE_MOVABLE, as with the `movable_node` boot option or memory hotplugged and onlined movable
//!   (mm/page_alloc.c, mm/memory_hotplug.c). `MemoryKind::Ram { node }` stays as it is; the zone is a
//!   property of the region ([`PhysMem::is_zone_movable_page`], include/linux/mm.h `is_zone_movable_page`).
//!   Which allocations may use it is the zone part of their gfp mask ([`GfpZone`], include/linux/gfp.h
//!   `gfp_zone`): an allocation limited to [`GfpZone::Normal`] walks the same fallback order with the
//!   movable nodes left out (a zonelist of a movable-only node holds no populated zone at or below
//!   ZONE_NORMAL, so such a request falls through to the next node). The rule by owner
//!   ([`GfpZone::for_owner`]):
//!   1. anonymous user pages (faults, COW copies, swap-ins, THPs: `GFP_HIGHUSER_MOVABLE`,
//!      `GFP_TRANSHUGE`) may come from movable memory;
//!   2. kernel/driver pages ([`FrameOwner::Kernel`], `GFP_KERNEL`) and the zero page never do; node 0,
//!      which holds the zero page and stands for the boot node holding the kernel image, cannot be made
//!      movable;
//!   3. page-cache pages do not either. *Deviation:* Linux's default `mapping_gfp_mask` is
//!      `GFP_HIGHUSER_MOVABLE`, so its page cache may sit in ZONE_MOVABLE; the model keeps it out because
//!      its long-term GUP migration ([`crate::gup`]) moves anonymous pages only (`migrate_vma`), and a
//!      page-cache page it could not move would be pinned in ZONE_MOVABLE for good;
//!   4. an allocation made inside a long-term pin's `memalloc_pin_save` scope, and every destination of a
//!      long-term migration, is limited to [`GfpZone::Normal`] (include/linux/sched/mm.h
//!      `memalloc_pin_save`, `current_gfp_context` clearing `__GFP_MOVABLE`).
//! - A THP is 512 frames allocated together at a 2 MiB-aligned frame number. Each sub-frame keeps its own
//!   counts (a PMD mapping adds one mapping to each), so a partial unmap frees sub-frames individually. This
//!   collapses Linux's folio/split machinery into per-page accounting; it is a documented simplification.
//! - Each allocation bumps the frame's `generation`, so a translation that recorded (frame, generation) can tell
//!   a reused frame from the one it mapped (the oracle's use-after-free check).

use std::collections::BTreeSet;

use peerdma_core::{DeviceId, FrameId, PAGE_SIZE, PMD_SIZE, Pa};

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

    /// Returns the number of RAM (NUMA) nodes.
    pub fn nr_nodes(&self) -> u32 {
        self.nr_nodes
    }

    /// Returns the region index of RAM node `node` (the same number).
    ///
    /// # Panics
    /// Panics when `node` is not below [`PhysMem::nr_nodes`].
    pub fn node_region(&self, node: u32) -> usize {
        assert!(node < self.nr_nodes, "node {node} of {}", self.nr_nodes);
        node as usize
    }

    /// Returns the RAM node frame `f` is on, or `None` for device memory.
    pub fn node_of(&self, f: FrameId) -> Option<u32> {
        match self.kind(f) {
            MemoryKind::Ram { node } => Some(node),
            _ => None,
        }
    }

    /// Makes RAM node `node` movable: all its memory becomes ZONE_MOVABLE (the `movable_node` boot option,
    /// or hotplugged memory onlined movable), so only anonymous pages are allocated there (module docs).
    ///
    /// # Errors
    /// [`MovableError`] for a node out of range, node 0 (the zero page and kernel memory live there), or a
    /// node that already has allocated pages.
    pub fn set_node_movable(&mut self, node: u32) -> Result<(), MovableError> {
        if node >= self.nr_nodes {
            return Err(MovableError::NoSuchNode {
                node,
                nr_nodes: self.nr_nodes,
            });
        }
        if node == 0 {
            return Err(MovableError::BootNode);
        }
        let r = self.node_region(node);
        if self.regions[r].free.len() as u64 != self.regions[r].nr_frames {
            return Err(MovableError::InUse { node });
        }
        self.regions[r].movable = true;
        Ok(())
    }

    /// Returns whether RAM node `node` is movable (its memory is ZONE_MOVABLE).
    ///
    /// # Panics
    /// Panics when `node` is not below [`PhysMem::nr_nodes`].
    pub fn is_node_movable(&self, node: u32) -> bool {
        self.regions[self.node_region(node)].movable
    }

    /// Returns whether frame `f` is in ZONE_MOVABLE (include/linux/mm.h `is_zone_movable_page`).
    pub fn is_zone_movable_page(&self, f: FrameId) -> bool {
        self.regions[self.region_of(f)].movable
    }

    /// Returns the number of free frames on the nodes an allocation limited to `zone` may use.
    pub fn nr_free_zone(&self, zone: GfpZone) -> u64 {
        (0..self.nr_nodes)
            .filter(|&n| zone == GfpZone::Movable || !self.is_node_movable(n))
            .map(|n| self.nr_free_node(n))
            .sum()
    }

    /// Returns the number of free frames on RAM node `node` (`NR_FREE_PAGES` of the node).
    pub fn nr_free_node(&self, node: u32) -> u64 {
        self.nr_free(self.node_region(node))
    }

    /// Returns the number of free RAM frames over all nodes.
    pub fn nr_free_ram(&self) -> u64 {
        (0..self.nr_nodes).map(|n| self.nr_free_node(n)).sum()
    }

    /// Returns the nodes an allocation preferring `home` tries, in order: `home`, then the nodes above it,
    /// then those below it, each in ascending id (the zonelist of the module docs).
    ///
    /// # Panics
    /// Panics when `home` is not below [`PhysMem::nr_nodes`].
    pub fn fallback_order(&self, home: u32) -> impl Iterator<Item = u32> + use<> {
        assert!(home < self.nr_nodes, "node {home} of {}", self.nr_nodes);
        (home..self.nr_nodes).chain(0..home)
    }

    /// Returns the nodes an allocation preferring `home` and limited to `zone` tries, in order: the
    /// [`PhysMem::fallback_order`], without the movable nodes for [`GfpZone::Normal`] (the zonelist).
    ///
    /// # Panics
    /// Panics when `home` is not below [`PhysMem::nr_nodes`].
    pub fn zonelist(&self, home: u32, zone: GfpZone) -> Vec<u32> {
        self.fallback_order(home)
            .filter(|&n| zone == GfpZone::Movable || !self.is_node_movable(n))
            .collect()
    }

    /// Returns the node an allocation preferring `home` takes its page from: the first in fallback order at
    /// or above [`LOW_WATERMARK`] free pages, else the first at or above [`MIN_WATERMARK`], else the first
    /// with any free page (module docs); `None` when all RAM is allocated. Movable nodes count
    /// ([`GfpZone::Movable`]); [`PhysMem::pick_node_in`] takes the zone limit.
    pub fn pick_node(&self, home: u32) -> Option<u32> {
        self.pick_node_in(home, GfpZone::Movable)
    }

    /// Returns the node [`PhysMem::pick_node`] would, over the [`PhysMem::zonelist`] of `home` and `zone`.
    pub fn pick_node_in(&self, home: u32, zone: GfpZone) -> Option<u32> {
        let nodes = self.zonelist(home, zone);
        [LOW_WATERMARK, MIN_WATERMARK, 1]
            .into_iter()
            .find_map(|wmark| {
                nodes
                    .iter()
                    .copied()
                    .find(|&n| self.nr_free_node(n) >= wmark)
            })
    }

    /// Returns whether some node in `home`'s fallback order has at least `wmark` free pages (the
    /// watermark check of the allocator's zonelist walk).
    pub fn any_node_above(&self, home: u32, wmark: u64) -> bool {
        self.fallback_order(home)
            .any(|n| self.nr_free_node(n) >= wmark)
    }

    /// Allocates one zero-filled RAM frame with refcount 1, preferring node `home` and falling back as the
    /// module docs say ([`PhysMem::pick_node_in`]), over the nodes `owner`'s zone limit allows
    /// ([`GfpZone::for_owner`]).
    ///
    /// # Errors
    /// [`OutOfMemory`] (naming `home`'s region) when every node allowed is full.
    pub fn alloc_node(&mut self, home: u32, owner: FrameOwner) -> Result<FrameId, OutOfMemory> {
        self.alloc_node_in(home, owner, GfpZone::for_owner(owner))
    }

    /// Allocates one frame as [`PhysMem::alloc_node`] does, limited to `zone` whatever the owner (a
    /// [`GfpZone::Normal`] request never takes a page from a movable node).
    ///
    /// # Errors
    /// [`OutOfMemory`] (naming `home`'s region) when every node allowed is full.
    pub fn alloc_node_in(
        &mut self,
        home: u32,
        owner: FrameOwner,
        zone: GfpZone,
    ) -> Result<FrameId, OutOfMemory> {
        let node = self.pick_node_in(home, zone).ok_or(OutOfMemory {
            region: self.node_region(home),
        })?;
        self.alloc(self.node_region(node), owner)
    }

    /// Allocates a THP (512 aligned contiguous frames, see [`PhysMem::alloc_pmd`]) from the first node in
    /// `home`'s fallback order that has a free 2 MiB block and that `owner`'s zone limit allows
    /// ([`GfpZone::for_owner`]); returns the head.
    ///
    /// # Errors
    /// [`OutOfMemory`] (naming `home`'s region) when no node allowed has a free 2 MiB block.
    pub fn alloc_pmd_node(&mut self, home: u32, owner: FrameOwner) -> Result<FrameId, OutOfMemory> {
        self.alloc_pmd_node_in(home, owner, GfpZone::for_owner(owner))
    }

    /// Allocates a THP as [`PhysMem::alloc_pmd_node`] does, limited to `zone` whatever the owner.
    ///
    /// # Errors
    /// [`OutOfMemory`] (naming `home`'s region) when no node allowed has a free 2 MiB block.
    pub fn alloc_pmd_node_in(
        &mut self,
        home: u32,
        owner: FrameOwner,
        zone: GfpZone,
    ) -> Result<FrameId, OutOfMemory> {
        self.zonelist(home, zone)
            .into_iter()
            .find_map(|n| self.alloc_pmd(self.node_region(n), owner).ok())
            .ok_or(OutOfMemory {
                region: self.node_region(home),
            })
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
        fr.lru = LruState::None;
        fr.accessed = false;
        fr.referenced = false;
        fr.dirty = false;
        fr.data = None;
        let region = fr.region as usize;
        self.regions[region].free.insert(f.0);
        true
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

/// Hashes a page of bytes (FNV-1a, 8 bytes at a time); an all-zero page hashes to [`ZERO_HASH`].
pub fn hash_bytes(d: &[u8]) -> u64 {
    if d.iter().all(|&b| b == 0) {
        return ZERO_HASH;
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for chunk in d.chunks(8) {
        let mut w = [0u8; 8];
        w[..chunk.len()].copy_from_slice(chunk);
        h ^= u64::from_le_bytes(w);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h | 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_page_is_reserved_and_reads_zero() {
        let pm = PhysMem::new(4 * PMD_SIZE);
        let z = pm.zero_page();
        assert_eq!(pm.frame(z).owner(), FrameOwner::Zero);
        let mut buf = [1u8; 16];
        pm.read(z, 0, &mut buf);
        assert_eq!(buf, [0u8; 16]);
    }

    #[test]
    fn put_to_zero_frees_and_realloc_bumps_generation() {
        let mut pm = PhysMem::new(4 * PMD_SIZE);
        let f = pm.alloc(0, FrameOwner::Anon).unwrap();
        let gen0 = pm.frame(f).generation;
        pm.write(f, 0, &[7]);
        pm.get(f);
        assert!(!pm.put(f));
        assert!(pm.put(f));
        assert!(!pm.frame(f).is_allocated());
        let g = pm.alloc(0, FrameOwner::Anon).unwrap();
        assert_eq!(g, f, "lowest free frame is reused first");
        assert!(pm.frame(g).generation > gen0);
        let mut b = [9u8; 1];
        pm.read(g, 0, &mut b);
        assert_eq!(b, [0], "a reallocated frame is zero-filled");
    }

    #[test]
    fn pmd_allocation_is_aligned_and_contiguous() {
        let mut pm = PhysMem::new(8 * PMD_SIZE);
        let head = pm.alloc_pmd(0, FrameOwner::Anon).unwrap();
        assert_eq!(head.0 % FRAMES_PER_PMD, 0);
        assert_ne!(head, FrameId(0), "block 0 holds the zero page");
        for i in 0..FRAMES_PER_PMD {
            assert_eq!(pm.frame(FrameId(head.0 + i)).refcount, 1);
        }
    }

    #[test]
    fn pin_bias_marks_maybe_dma_pinned() {
        let mut pm = PhysMem::new(2 * PMD_SIZE);
        let f = pm.alloc(0, FrameOwner::Anon).unwrap();
        assert!(!pm.frame(f).maybe_dma_pinned());
        pm.frame_mut(f).refcount += GUP_PIN_COUNTING_BIAS;
        assert!(pm.frame(f).maybe_dma_pinned());
    }

    #[test]
    fn bar_region_frames_sit_at_the_bar_address_and_ram_frames_at_their_number() {
        let mut pm = PhysMem::new(2 * PMD_SIZE);
        let base = Pa::from_raw(0xe000_0000);
        let r = pm.add_region_at(
            MemoryKind::P2pMem {
                provider: DeviceId(1),
            },
            3,
            base,
        );
        assert_eq!(pm.nr_free(r), 3, "padding frames are not allocatable");
        let first = FrameId(pm.regions()[r].start);
        assert_eq!(pm.frame_pa(first), base);
        assert_eq!(pm.frame_pa(FrameId(first.0 + 2)), base.add(2 * PAGE_SIZE));
        assert_eq!(
            pm.frame_at_pa(base.add(2 * PAGE_SIZE + 5)),
            Some(FrameId(first.0 + 2))
        );
        assert_eq!(pm.frame_at_pa(base.add(3 * PAGE_SIZE)), None);
        assert_eq!(pm.frame_pa(FrameId(7)), FrameId(7).pa());
        assert_eq!(pm.frame_at_pa(FrameId(7).pa()), Some(FrameId(7)));
    }

    #[test]
    fn contiguous_allocation_is_first_fit_lowest_address() {
        let mut pm = PhysMem::new(2 * PMD_SIZE);
        let r = pm.add_region_at(
            MemoryKind::P2pMem {
                provider: DeviceId(1),
            },
            8,
            Pa::from_raw(0),
        );
        let start = pm.regions()[r].start;
        let first = pm.alloc_contiguous(r, 2, FrameOwner::Kernel).unwrap();
        let second = pm.alloc_contiguous(r, 3, FrameOwner::Kernel).unwrap();
        assert_eq!((first.0, second.0), (start, start + 2));
        pm.put(first);
        pm.put(FrameId(first.0 + 1));
        // The 2-frame hole at the bottom is too small for 3; the run after b fits.
        let third = pm.alloc_contiguous(r, 3, FrameOwner::Kernel).unwrap();
        assert_eq!(third.0, start + 5);
        let fourth = pm.alloc_contiguous(r, 2, FrameOwner::Kernel).unwrap();
        assert_eq!(fourth.0, start, "the lowest fitting hole first");
        assert_eq!(
            pm.alloc_contiguous(r, 1, FrameOwner::Kernel),
            Err(OutOfMemory { region: r })
        );
    }

    #[test]
    fn fallback_order_is_home_then_the_next_nodes_wrapping_round() {
        let pm = PhysMem::new_numa(&[PMD_SIZE, PMD_SIZE, PMD_SIZE]);
        assert_eq!(pm.fallback_order(0).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(pm.fallback_order(1).collect::<Vec<_>>(), [1, 2, 0]);
        assert_eq!(pm.fallback_order(2).collect::<Vec<_>>(), [2, 0, 1]);
        assert_eq!(
            (0..3).map(|n| pm.regions()[n].kind).collect::<Vec<_>>(),
            (0..3)
                .map(|node| MemoryKind::Ram { node })
                .collect::<Vec<_>>(),
            "region n is node n"
        );
    }

    #[test]
    fn node_choice_steps_down_the_watermarks_before_taking_the_last_pages() {
        let mut pm = PhysMem::new_numa(&[PMD_SIZE, PMD_SIZE]);
        let take = |pm: &mut PhysMem, node: u32, keep: u64| {
            while pm.nr_free_node(node) > keep {
                pm.alloc(pm.node_region(node), FrameOwner::Anon).unwrap();
            }
        };
        // Home node 1 below low, node 0 above it: node 0.
        take(&mut pm, 1, LOW_WATERMARK - 1);
        assert_eq!(pm.pick_node(1), Some(0));
        // Both below low, node 0 also below min: home node 1 (above min) is next.
        take(&mut pm, 0, MIN_WATERMARK - 1);
        assert_eq!(pm.pick_node(1), Some(1));
        assert_eq!(
            pm.pick_node(0),
            Some(1),
            "node 0 is below min, node 1 above"
        );
        // Both below min: the home node while it has any page, then the other.
        take(&mut pm, 1, 1);
        assert_eq!(pm.pick_node(1), Some(1));
        take(&mut pm, 1, 0);
        assert_eq!(pm.pick_node(1), Some(0));
        let f = pm.alloc_node(1, FrameOwner::Anon).unwrap();
        assert_eq!(pm.node_of(f), Some(0));
        take(&mut pm, 0, 0);
        assert_eq!(
            pm.alloc_node(1, FrameOwner::Anon),
            Err(OutOfMemory { region: 1 })
        );
    }

    #[test]
    fn a_thp_falls_back_to_the_next_node_with_a_free_block() {
        let mut pm = PhysMem::new_numa(&[PMD_SIZE, 2 * PMD_SIZE]);
        // Node 0's only block holds the zero page.
        let head = pm.alloc_pmd_node(0, FrameOwner::Anon).unwrap();
        assert_eq!(pm.node_of(head), Some(1));
    }

    #[test]
    fn kernel_and_page_cache_pages_skip_movable_nodes_and_anonymous_pages_do_not() {
        let mut pm = PhysMem::new_numa(&[2 * PMD_SIZE, PMD_SIZE, PMD_SIZE]);
        pm.set_node_movable(1).unwrap();
        assert_eq!(pm.zonelist(1, GfpZone::Movable), [1, 2, 0]);
        assert_eq!(pm.zonelist(1, GfpZone::Normal), [2, 0]);
        let node = |pm: &mut PhysMem, owner| {
            let f = pm.alloc_node(1, owner).unwrap();
            (pm.node_of(f), pm.is_zone_movable_page(f))
        };
        assert_eq!(node(&mut pm, FrameOwner::Anon), (Some(1), true));
        assert_eq!(node(&mut pm, FrameOwner::Kernel), (Some(2), false));
        assert_eq!(
            node(&mut pm, FrameOwner::File { file: 0, pgoff: 0 }),
            (Some(2), false)
        );
        let thp = pm.alloc_pmd_node(1, FrameOwner::Anon).unwrap();
        assert_eq!(
            pm.node_of(thp),
            Some(0),
            "node 1 and 2 have no free 2 MiB block"
        );
        assert_eq!(
            pm.alloc_pmd_node_in(1, FrameOwner::Anon, GfpZone::Normal),
            Err(OutOfMemory { region: 1 })
        );
        assert_eq!(
            pm.nr_free_zone(GfpZone::Movable) - pm.nr_free_zone(GfpZone::Normal),
            pm.nr_free_node(1)
        );
    }

    #[test]
    fn exhaustion_is_reported_not_panicked() {
        let mut pm = PhysMem::new(PMD_SIZE);
        for _ in 0..FRAMES_PER_PMD - 1 {
            pm.alloc(0, FrameOwner::Anon).unwrap();
        }
        assert_eq!(
            pm.alloc(0, FrameOwner::Anon),
            Err(OutOfMemory { region: 0 })
        );
    }
}
