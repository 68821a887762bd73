//! The RAM allocator over [`PhysMem`]'s nodes: NUMA placement, zonelist fallback, watermarks and movable
//! memory (mm/page_alloc.c, mm/mempolicy.c, mm/memory_hotplug.c).
//!
//! RAM allocation follows Linux's default local policy with zonelist fallback (mm/mempolicy.c: with no
//! policy set a task allocates on its local node; mm/page_alloc.c `get_page_from_freelist` walks the
//! zonelist): [`PhysMem::alloc_node`] takes the first node, in [`PhysMem::fallback_order`] from the
//! preferred (home) node, whose free pages are at or above [`LOW_WATERMARK`] — the fast path's
//! `ALLOC_WMARK_LOW` check, and a node below it is skipped rather than reclaimed because
//! `node_reclaim_mode` is 0 by default —, then the first at or above [`MIN_WATERMARK`] (the slow path's
//! `ALLOC_WMARK_MIN`), then the first with any free page. Fallback order is the home node, then the nodes
//! above it in ascending id, wrapping round to node 0 and up (for node 1 of 3: 1, 2, 0): every remote
//! node is at the same distance in the model (a SLIT of 10 local, 20 remote), and `find_next_best_node`
//! (mm/page_alloc.c) breaks equal distances by penalising nodes below the local one ("prefer the next
//! node"); its `node_load` round-robin between zonelists is not modelled. Reclaim, which
//! runs only when the walk finds no node above a watermark, is [`crate::vmscan`]'s.
//!
//! A RAM node can be **movable** ([`PhysMem::set_node_movable`], [`super::Region::movable`]): all its memory is
//! ZONE_MOVABLE, as with the `movable_node` boot option or memory hotplugged and onlined movable
//! (mm/page_alloc.c, mm/memory_hotplug.c). `MemoryKind::Ram { node }` stays as it is; the zone is a
//! property of the region ([`PhysMem::is_zone_movable_page`], include/linux/mm.h `is_zone_movable_page`).
//! Which allocations may use it is the zone part of their gfp mask ([`GfpZone`], include/linux/gfp.h
//! `gfp_zone`): an allocation limited to [`GfpZone::Normal`] walks the same fallback order with the
//! movable nodes left out (a zonelist of a movable-only node holds no populated zone at or below
//! ZONE_NORMAL, so such a request falls through to the next node). The rule by owner
//! ([`GfpZone::for_owner`]):
//! 1. anonymous user pages (faults, COW copies, swap-ins, THPs: `GFP_HIGHUSER_MOVABLE`,
//!    `GFP_TRANSHUGE`) may come from movable memory;
//! 2. kernel/driver pages ([`FrameOwner::Kernel`], `GFP_KERNEL`) and the zero page never do; node 0,
//!    which holds the zero page and stands for the boot node holding the kernel image, cannot be made
//!    movable;
//! 3. page-cache pages do not either. *Deviation:* Linux's default `mapping_gfp_mask` is
//!    `GFP_HIGHUSER_MOVABLE`, so its page cache may sit in ZONE_MOVABLE; the model keeps it out because
//!    its long-term GUP migration ([`crate::gup`]) moves anonymous pages only (`migrate_vma`), and a
//!    page-cache page it could not move would be pinned in ZONE_MOVABLE for good;
//! 4. an allocation made inside a long-term pin's `memalloc_pin_save` scope, and every destination of a
//!    long-term migration, is limited to [`GfpZone::Normal`] (include/linux/sched/mm.h
//!    `memalloc_pin_save`, `current_gfp_context` clearing `__GFP_MOVABLE`).

use peerdma_core::FrameId;

use super::{
    FrameOwner, GfpZone, LOW_WATERMARK, MIN_WATERMARK, MemoryKind, MovableError, OutOfMemory,
    PhysMem,
};

impl PhysMem {
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
        if self.regions[r].free.len() != self.regions[r].nr_frames {
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
        // The usual answer without building the list: `home` heads its zonelist when the zone allows it, so
        // at or above the low watermark it is the walk's first hit.
        assert!(home < self.nr_nodes, "node {home} of {}", self.nr_nodes);
        if (zone == GfpZone::Movable || !self.is_node_movable(home))
            && self.nr_free_node(home) >= LOW_WATERMARK
        {
            return Some(home);
        }
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
}
