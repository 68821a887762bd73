//! The mm side of PCI peer-to-peer memory: BAR memory with struct pages (MEMORY_DEVICE_PCI_P2PDMA) and BAR
//! memory without (VM_IO | VM_PFNMAP).
//!
//! Linux counterparts: drivers/pci/p2pdma.c (`pci_p2pdma_add_resource`, `p2pmem_alloc_mmap`,
//! `p2pdma_page_free`), mm/memremap.c (`memunmap_pages`), mm/memory.c (`vm_insert_page`, `remap_pfn_range`,
//! `unmap_mapping_range`, `follow_pfnmap_start`); spec/linux-p2p.md §1.1, §1.2, §1.7, §1.8 and §6.
//!
//! **P2P memory with struct pages** ([`Kernel::add_p2p_memory`]): a region of frames of kind
//! [`MemoryKind::P2pMem`] whose frames sit at the BAR's CPU physical addresses ([`PhysMem::frame_pa`]). Its
//! free frames are the provider's gen_pool; [`Kernel::mmap_p2pmem`] takes one contiguous run first-fit and
//! inserts every page eagerly, so the mapping owns each page's only reference. A page goes back to the pool
//! the moment its last reference drops (`p2pdma_page_free`): the pool is refilled page by page as mappings
//! disappear (munmap, exit, the unbind zap) and pins are released. Removal ([`Kernel::remove_p2p_memory`]),
//! in order:
//! 1. the region is marked removed, so a later `mmap` of the `allocate` file is `ENODEV`;
//! 2. every VMA backed by the region, in every process, has its entries zapped inside an MMU_NOTIFY_CLEAR
//!    invalidation (`unmap_mapping_range`); the VMAs stay, a later CPU access raises SIGBUS;
//! 3. the call sleeps on the pin wait queue until every page of the region is free again
//!    (`memunmap_pages` waiting for the pgmap references): an outstanding pin blocks the unbind.
//!
//! **BAR memory without struct pages** ([`Kernel::add_mmio`]): an MMIO range with real bytes (4 KiB pages
//! allocated on first write) that no frame describes. Its owner maps it with [`Kernel::mmap_pfnmap_mmio`]
//! (`remap_pfn_range`): the entries are [`Pte::Pfn`] raw page numbers, which no code path can mistake for a
//! frame, so GUP and `hmm_range_fault` refuse the VMA (its VM_IO | VM_PFNMAP flags). Peers reach the bytes by
//! physical address ([`Kernel::mmio_read`] / [`Kernel::mmio_write`]), the owner translates user addresses with
//! [`Kernel::follow_pfnmap`]. Revocation ([`Kernel::revoke_mmio`]), in order:
//! 1. the range is marked removed: a later `mmap` is `ENODEV`;
//! 2. every PFN entry into it, in every process, is zapped inside an MMU_NOTIFY_CLEAR invalidation; a later
//!    CPU access raises SIGBUS;
//! 3. any later peer access returns `ENODEV` and is an oracle violation ([`ViolationKind::RemovedBar`]): the
//!    exporter must have revoked every importer (dma-buf `move_notify`, spec §6) before removing the BAR.
//!
//! CPU loads and stores through either kind of mapping cost the ordinary per-page `page_access` (there is no
//! separate MMIO cost). Simplifications: `mremap` and `MADV_DONTNEED` are not refused on VM_PFNMAP VMAs as
//! Linux refuses them; a removed P2P region's frames stay in the physical map (never reused).

use std::collections::{BTreeMap, BTreeSet};

use peerdma_core::{DeviceId, Errno, FrameId, PAGE_SIZE, Pa, Pid, Range, Va};

use crate::kernel::{AddressSpace, Kernel};
use crate::mmu_notifier::NotifierEvent;
use crate::oracle::ViolationKind;
use crate::pagetable::Pte;
use crate::phys::{FrameOwner, MemoryKind, PhysMem};
use crate::vma::{Prot, VmFlags, VmaBacking};

const PAGE_BYTES: usize = 4096;

pub use crate::vma::MmioId;

/// One MMIO range (a BAR or part of one) without struct pages.
#[derive(Debug)]
pub struct Mmio {
    /// The device whose BAR it is.
    pub owner: DeviceId,
    /// The CPU physical range, page aligned.
    pub range: Range<Pa>,
    /// Whether the owner revoked it.
    pub removed: bool,
    /// Bytes of the pages written so far, by page index inside the range (absent: zero).
    pages: BTreeMap<u64, Box<[u8]>>,
}

/// The P2P state of the kernel: removed P2P regions and the MMIO ranges.
#[derive(Debug, Default)]
pub struct P2pState {
    removed_regions: BTreeSet<usize>,
    mmios: Vec<Mmio>,
}

impl P2pState {
    /// Returns the MMIO range `id`, if it was registered.
    pub fn mmio(&self, id: MmioId) -> Option<&Mmio> {
        self.mmios.get(id.0 as usize)
    }

    /// Returns whether P2P region `r` was removed.
    pub fn is_region_removed(&self, r: usize) -> bool {
        self.removed_regions.contains(&r)
    }

    /// Finds the MMIO range holding `pa`: a live one first, else a removed one.
    fn mmio_at(&self, pa: Pa) -> Option<(MmioId, &Mmio)> {
        let hit = |live: bool| {
            self.mmios
                .iter()
                .enumerate()
                .rev()
                .find(|(_, m)| m.removed != live && m.range.contains(pa))
                .map(|(i, m)| (MmioId(u32::try_from(i).expect("fewer than 2^32 ranges")), m))
        };
        hit(true).or_else(|| hit(false))
    }

    /// Copies MMIO bytes at `pa` into `buf` (all inside one page of a live range); false if none holds it.
    pub(crate) fn mmio_read_bytes(&self, pa: Pa, buf: &mut [u8]) -> bool {
        let Some((_, m)) = self.mmio_at(pa).filter(|(_, m)| !m.removed) else {
            return false;
        };
        let off = pa.raw() - m.range.start.raw();
        let in_page = usize::try_from(off % PAGE_SIZE).expect("< 4096");
        match m.pages.get(&(off / PAGE_SIZE)) {
            Some(d) => buf.copy_from_slice(&d[in_page..in_page + buf.len()]),
            None => buf.fill(0),
        }
        true
    }

    /// Copies `data` into MMIO bytes at `pa` (all inside one page of a live range); false if none holds it.
    pub(crate) fn mmio_write_bytes(&mut self, pa: Pa, data: &[u8]) -> bool {
        let Some((id, _)) = self.mmio_at(pa).filter(|(_, m)| !m.removed) else {
            return false;
        };
        let m = &mut self.mmios[id.0 as usize];
        let off = pa.raw() - m.range.start.raw();
        let in_page = usize::try_from(off % PAGE_SIZE).expect("< 4096");
        let page = m
            .pages
            .entry(off / PAGE_SIZE)
            .or_insert_with(|| vec![0u8; PAGE_BYTES].into_boxed_slice());
        page[in_page..in_page + data.len()].copy_from_slice(data);
        true
    }
}

/// Splits `[pa, pa + len)` into per-page pieces: (address, offset into the caller's buffer, length).
fn page_pieces(pa: Pa, len: usize) -> Vec<(Pa, usize, usize)> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos < len {
        let a = pa.add(pos as u64);
        let in_page = usize::try_from(a.raw() % PAGE_SIZE).expect("< 4096");
        let n = (PAGE_BYTES - in_page).min(len - pos);
        out.push((a, pos, n));
        pos += n;
    }
    out
}

impl Kernel {
    // ------------------------------------------------------------------------------ P2P memory (struct page)

    /// Publishes `len` bytes of a BAR of `provider` at CPU physical address `base` as P2P memory with struct
    /// pages (`pci_p2pdma_add_resource` + `devm_memremap_pages`, spec §1.2) and returns the region index. The
    /// region's free frames are the provider's pool. `base` is rounded down and `len` up to whole pages.
    pub fn add_p2p_memory(&self, provider: DeviceId, base: Pa, len: u64) -> usize {
        let mut phys = self.phys();
        let r = phys.add_region_at(
            MemoryKind::P2pMem { provider },
            len.div_ceil(PAGE_SIZE),
            base.align_down(PAGE_SIZE),
        );
        self.sim.trace("p2pdma.add_resource", || {
            format!(
                "provider {} region {r} at {:#x} ({len:#x} bytes)",
                provider.0,
                base.raw()
            )
        });
        r
    }

    /// Returns the number of free pages in the pool of P2P region `region` (`p2pmem/available` in pages).
    pub fn p2p_memory_free_pages(&self, region: usize) -> u64 {
        self.phys().nr_free(region)
    }

    /// `mmap` of the p2pmem `allocate` file of P2P region `region` (`p2pmem_alloc_mmap`, spec §1.7): takes
    /// one contiguous run of `len` bytes (rounded up to pages) from the pool, first fit, and inserts every
    /// page at once in a shared VMA (`vm_insert_page`), so the mapping holds each page's only reference.
    ///
    /// # Errors
    /// In the order of the spec table: `EINVAL` for a private mapping (`shared` false) or `pgoff != 0`;
    /// `ENODEV` when the region is not P2P memory or was removed (also when removal starts while the call
    /// sleeps); `EINVAL` for a zero length; `ENOMEM` when no gap in the address space fits or the pool has
    /// no contiguous `len`.
    pub async fn mmap_p2pmem(
        &self,
        pid: Pid,
        region: usize,
        len: u64,
        prot: Prot,
        shared: bool,
        pgoff: u64,
    ) -> Result<Va, Errno> {
        if !shared || pgoff != 0 {
            return Err(Errno::EINVAL);
        }
        if !self.p2p_region_live(region) {
            return Err(Errno::ENODEV);
        }
        let flags = VmFlags::from(prot) | VmFlags::SHARED | VmFlags::MIXEDMAP;
        let lock = self.mmap_lock(pid);
        let _g = lock.write().await;
        let range = self.insert_driver_vma(pid, len, flags).await?;
        let mut st = self.mms();
        let mut phys = self.phys();
        let p2p = self.p2p();
        // The pgmap reference is dead once unbinding started (spec §1.7 table, row 5).
        if p2p.is_region_removed(region) {
            st.remove_vmas(pid, range);
            return Err(Errno::ENODEV);
        }
        let nr = range.nr_pages();
        let Ok(first) = phys.alloc_contiguous(region, nr, FrameOwner::Kernel) else {
            st.remove_vmas(pid, range);
            return Err(Errno::ENOMEM);
        };
        st.mm_mut(pid)
            .vma_mut(range.start)
            .expect("inserted above")
            .backing = VmaBacking::P2pMem { region };
        for (i, page) in range.pages().enumerate() {
            let frame = FrameId(first.0 + i as u64);
            // The allocation's reference becomes the PTE's (refcount 1, mapcount 1).
            phys.frame_mut(frame).mapcount = 1;
            st.mm_mut(pid).pt_mut().set_pte(
                page,
                Pte::Present {
                    frame,
                    write: prot.write,
                    special: false,
                },
            );
        }
        drop(st);
        self.sim.trace("p2pmem.mmap", || {
            format!("pid {} {range} region {region} from {first}", pid.0)
        });
        Ok(range.start)
    }

    /// `pci_alloc_p2pmem`: takes `len` bytes (rounded up to pages) of P2P region `region` for in-kernel use
    /// (an NVMe-oF target's queues and data buffers), one contiguous run first fit. Each page holds one
    /// reference (the allocation's pgmap reference) until [`Kernel::free_p2pmem`], so an allocation blocks
    /// the provider's removal like a pin does. Returns the first frame, or `None` (the kernel's NULL) when
    /// the region is not live P2P memory or has no contiguous run.
    pub fn alloc_p2pmem(&self, region: usize, len: u64) -> Option<FrameId> {
        if !self.p2p_region_live(region) || len == 0 {
            return None;
        }
        let nr = len.div_ceil(PAGE_SIZE);
        let first = self
            .phys()
            .alloc_contiguous(region, nr, FrameOwner::Kernel)
            .ok()?;
        self.sim.count("p2pdma.alloc_pages", nr);
        Some(first)
    }

    /// `pci_free_p2pmem`: returns an allocation of `len` bytes at `first` to the pool (drops each page's
    /// reference; a page someone else still references goes back when that reference drops).
    pub fn free_p2pmem(&self, first: FrameId, len: u64) {
        let nr = len.div_ceil(PAGE_SIZE);
        {
            let mut phys = self.phys();
            for i in 0..nr {
                phys.put(FrameId(first.0 + i));
            }
        }
        self.pin_wq().wake_up_all();
    }

    fn p2p_region_live(&self, region: usize) -> bool {
        let phys = self.phys();
        let p2p = self.p2p();
        phys.regions()
            .get(region)
            .is_some_and(|r| matches!(r.kind, MemoryKind::P2pMem { .. }))
            && !p2p.is_region_removed(region)
    }

    /// Removes P2P region `region` as the provider's unbind does (see the module docs for the steps): marks it
    /// removed, zaps every user mapping of it inside a CLEAR invalidation, then sleeps until every page has
    /// returned to the pool — until every pin and reference on its pages is dropped. Does nothing for an
    /// index that is not a P2P region.
    pub async fn remove_p2p_memory(&self, region: usize) {
        let is_p2p = self
            .phys()
            .regions()
            .get(region)
            .is_some_and(|r| matches!(r.kind, MemoryKind::P2pMem { .. }));
        if !is_p2p {
            return;
        }
        self.p2p().removed_regions.insert(region);
        let nr_zapped = self
            .zap_backing(|b| b == VmaBacking::P2pMem { region })
            .await;
        let total = self.phys().regions()[region].nr_frames;
        self.pin_wq()
            .wait_event(|| self.phys().nr_free(region) == total)
            .await;
        self.sim.trace("p2pdma.remove", || {
            format!("region {region}: {nr_zapped} pages zapped, all {total} pages free")
        });
    }

    /// `unmap_mapping_range` over every VMA whose backing satisfies `which_fn`, in every live process, each
    /// under that process's `mmap_lock` (read) inside a CLEAR invalidation. Repeats until a pass finds no
    /// entry left (a fork during the walk copies entries into a new process). Returns the pages zapped.
    async fn zap_backing(&self, which_fn: impl Fn(VmaBacking) -> bool) -> u64 {
        let mut total = 0;
        loop {
            let pids: Vec<Pid> = self.mms().live().map(AddressSpace::pid).collect();
            let mut pass = 0;
            for pid in pids {
                let lock = self.mmap_lock(pid);
                let _g = lock.read().await;
                let targets: Vec<Range<Va>> = {
                    let st = self.mms();
                    let mm = st.mm(pid);
                    mm.vmas()
                        .values()
                        .filter(|v| which_fn(v.backing))
                        .filter(|v| !mm.pt().leaves(v.range.start, v.range.end).is_empty())
                        .map(|v| v.range)
                        .collect()
                };
                for r in targets {
                    pass += self.zap_notify(pid, r, NotifierEvent::Clear).await;
                }
            }
            if pass == 0 {
                return total;
            }
            total += pass;
        }
    }

    // ------------------------------------------------------------------------------ MMIO without struct page

    /// Registers an MMIO range of device `owner` without struct pages (a BAR the owner maps with
    /// `remap_pfn_range`) and returns its id. `range` is widened to whole pages. Its bytes read as zero until
    /// written.
    pub fn add_mmio(&self, owner: DeviceId, range: Range<Pa>) -> MmioId {
        let start = range.start.align_down(PAGE_SIZE);
        let end = Pa::from_raw(
            range
                .end
                .raw()
                .checked_next_multiple_of(PAGE_SIZE)
                .unwrap_or(u64::MAX - (PAGE_SIZE - 1)),
        );
        let mut p2p = self.p2p();
        let id = MmioId(u32::try_from(p2p.mmios.len()).expect("fewer than 2^32 ranges"));
        p2p.mmios.push(Mmio {
            owner,
            range: Range::new(start, end.max(start)),
            removed: false,
            pages: BTreeMap::new(),
        });
        id
    }

    /// The owner driver's `mmap` of `len` bytes of MMIO range `mmio` from byte `offset` on, with
    /// `remap_pfn_range`: a VM_IO | VM_PFNMAP | VM_SHARED | VM_DONTCOPY VMA whose entries are installed at
    /// once as raw [`Pte::Pfn`] entries (no struct page, no reference taken).
    ///
    /// # Errors
    /// `ENODEV` for an unknown or revoked range (also when revocation starts while the call sleeps);
    /// `EINVAL` for an unaligned offset, a zero length, or a range that does not fit inside the MMIO range;
    /// `ENOMEM` when no gap in the address space fits.
    pub async fn mmap_pfnmap_mmio(
        &self,
        pid: Pid,
        mmio: MmioId,
        offset: u64,
        len: u64,
        prot: Prot,
    ) -> Result<Va, Errno> {
        let bar = {
            let p2p = self.p2p();
            let m = p2p.mmio(mmio).ok_or(Errno::ENODEV)?;
            if m.removed {
                return Err(Errno::ENODEV);
            }
            m.range
        };
        let len_pages = len
            .checked_next_multiple_of(PAGE_SIZE)
            .ok_or(Errno::EINVAL)?;
        let fits = offset
            .checked_add(len_pages)
            .is_some_and(|end| end <= bar.len());
        if !offset.is_multiple_of(PAGE_SIZE) || len == 0 || !fits {
            return Err(Errno::EINVAL);
        }
        let flags = VmFlags::from(prot)
            | VmFlags::IO
            | VmFlags::PFNMAP
            | VmFlags::SHARED
            | VmFlags::DONTCOPY;
        let lock = self.mmap_lock(pid);
        let _g = lock.write().await;
        let range = self.insert_driver_vma(pid, len, flags).await?;
        let mut st = self.mms();
        let p2p = self.p2p();
        if p2p.mmio(mmio).is_none_or(|m| m.removed) {
            st.remove_vmas(pid, range);
            return Err(Errno::ENODEV);
        }
        st.mm_mut(pid)
            .vma_mut(range.start)
            .expect("inserted above")
            .backing = VmaBacking::Mmio {
            mmio,
            pgoff: offset / PAGE_SIZE,
        };
        let first_pfn = (bar.start.raw() + offset) / PAGE_SIZE;
        for (i, page) in range.pages().enumerate() {
            st.mm_mut(pid).pt_mut().set_pte(
                page,
                Pte::Pfn {
                    pfn: first_pfn + i as u64,
                    write: prot.write,
                },
            );
        }
        drop(st);
        self.sim.trace("remap_pfn_range", || {
            format!("pid {} {range} mmio {} +{offset:#x}", pid.0, mmio.0)
        });
        Ok(range.start)
    }

    /// Returns the MMIO range and CPU physical address a PFN entry maps `va` of `pid` to, as the owner driver
    /// translating a user address does (`follow_pfnmap_start`); `None` when `va` is not in a VM_PFNMAP VMA,
    /// has no entry (never mapped or zapped), or the range was revoked.
    pub fn follow_pfnmap(&self, pid: Pid, va: Va) -> Option<(MmioId, Pa)> {
        let st = self.mms();
        let p2p = self.p2p();
        let mm = st.get(pid)?;
        if !mm.vma(va)?.flags.contains(VmFlags::PFNMAP) {
            return None;
        }
        let leaf = mm.pt().lookup(va)?;
        let Pte::Pfn { pfn, .. } = leaf.pte else {
            return None;
        };
        let pa = Pa::from_raw(pfn * PAGE_SIZE + (va.raw() - leaf.base.raw()));
        let (id, m) = p2p.mmio_at(pa)?;
        (!m.removed).then_some((id, pa))
    }

    /// A peer device `dev` reads `buf.len()` bytes of MMIO at CPU physical address `pa` (its DMA reaching the
    /// BAR).
    ///
    /// # Errors
    /// `ENODEV` when the range was revoked (an oracle violation: nothing may reach a removed BAR); `EFAULT`
    /// when `pa` is in no MMIO range or the access runs past its end.
    pub fn mmio_read(&self, dev: DeviceId, pa: Pa, buf: &mut [u8]) -> Result<(), Errno> {
        self.check_mmio_access(dev, pa, buf.len(), false)?;
        let p2p = self.p2p();
        for (a, pos, n) in page_pieces(pa, buf.len()) {
            let ok = p2p.mmio_read_bytes(a, &mut buf[pos..pos + n]);
            debug_assert!(ok, "checked above");
        }
        Ok(())
    }

    /// A peer device `dev` writes `data` into MMIO at CPU physical address `pa`.
    ///
    /// # Errors
    /// As [`Kernel::mmio_read`].
    pub fn mmio_write(&self, dev: DeviceId, pa: Pa, data: &[u8]) -> Result<(), Errno> {
        self.check_mmio_access(dev, pa, data.len(), true)?;
        let mut p2p = self.p2p();
        for (a, pos, n) in page_pieces(pa, data.len()) {
            let ok = p2p.mmio_write_bytes(a, &data[pos..pos + n]);
            debug_assert!(ok, "checked above");
        }
        Ok(())
    }

    fn check_mmio_access(
        &self,
        dev: DeviceId,
        pa: Pa,
        len: usize,
        write: bool,
    ) -> Result<(), Errno> {
        let p2p = self.p2p();
        let mut oracle = self.oracle();
        let (id, removed, range, owner) = {
            let (id, m) = p2p.mmio_at(pa).ok_or(Errno::EFAULT)?;
            (id, m.removed, m.range, m.owner)
        };
        if removed {
            oracle.violation(
                ViolationKind::RemovedBar,
                format!(
                    "device {} {} {:#x} of revoked mmio {} (owner device {})",
                    dev.0,
                    if write { "wrote" } else { "read" },
                    pa.raw(),
                    id.0,
                    owner.0
                ),
            );
            return Err(Errno::ENODEV);
        }
        let end = pa.raw().checked_add(len as u64).ok_or(Errno::EFAULT)?;
        if end > range.end.raw() {
            return Err(Errno::EFAULT);
        }
        Ok(())
    }

    /// Revokes MMIO range `mmio` (the owner's `remove()`, see the module docs for the steps): marks it
    /// removed, then zaps every PFN entry into it in every process inside a CLEAR invalidation. A later CPU
    /// access raises SIGBUS, a later peer access is `ENODEV` and an oracle violation. Does nothing for an
    /// unknown or already revoked range.
    pub async fn revoke_mmio(&self, mmio: MmioId) {
        {
            let mut p2p = self.p2p();
            let Some(m) = p2p.mmios.get_mut(mmio.0 as usize) else {
                return;
            };
            if m.removed {
                return;
            }
            m.removed = true;
            m.pages.clear();
        }
        let nr = self
            .zap_backing(|b| matches!(b, VmaBacking::Mmio { mmio: m, .. } if m == mmio))
            .await;
        self.sim.trace("mmio.revoke", || {
            format!("mmio {}: {nr} pages zapped", mmio.0)
        });
    }
}

impl PhysMem {
    /// Returns whether `f` is a P2P memory page (`is_pci_p2pdma_page`).
    pub fn is_p2pdma_page(&self, f: FrameId) -> bool {
        self.exists(f) && matches!(self.kind(f), MemoryKind::P2pMem { .. })
    }
}
