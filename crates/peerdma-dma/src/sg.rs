//! `get_user_dma_sg(mm, range, initiator, flags)`: a VA range and the device that will DMA to it in, a
//! DMA-addressable list out, whatever backs each VMA (DESIGN.md §4.6; `spec/linux-p2p.md` §7, §9 item 7).
//!
//! Linux never merged it; it composes what did land: `pin_user_pages` (mm/gup.c) + `dma_map_sg` for struct-page
//! memory, a dma-buf attachment for BARs without struct page, an ODP-style interval-notifier mirror for the
//! long-term coherent discipline.
//!
//! Dispatch, per VMA piece of the range (the rows of DESIGN.md §4.6):
//! | backing | short-term | long-term pin | mirror |
//! |---|---|---|---|
//! | RAM (anon, shmem, file) | pin + map | pin LONGTERM + map | register, fault on demand |
//! | device-coherent | pin + map | GUP migrates to RAM, then pins | mirror |
//! | device-private (other owner) | GUP's fault migrates it to RAM, then pin | same | fault migrates it back |
//! | P2P memory (struct page) | needs [`DmaSgFlags::P2P`] (else `EREMOTEIO`, GUP's rule); map type decides | `EINVAL` (never long-term) | mirror with P2P map types |
//! | BAR without struct page | dma-buf attach through its exporter; map type decides | only if the export is revocable, else `EOPNOTSUPP` | through the owner: each faulted page a dynamic attachment; revocation invalidates (then `EFAULT`) |
//! | FsDax | pin + map | `EOPNOTSUPP` (GUP) | mirror |
//! | hole, PROT_NONE, write to read-only | `EFAULT` (GUP) | same | registration succeeds; the device's fault gets `EFAULT`/`EPERM` |
//!
//! Rules:
//! 1. The range must be page-aligned and non-empty (`EINVAL`).
//! 2. The whole call is all or nothing: on any error, everything taken so far is released before returning.
//! 3. The returned [`DmaSgHandle`] owns what it took: dropping it (or [`DmaSgHandle::release`]) unmaps every
//!    list, unpins every page, detaches every importer and unregisters the mirror.
//! 4. Mixed lists are fine: a range spanning RAM and several providers gives segments of several kinds.

use std::fmt;
use std::rc::Rc;

use bitflags::bitflags;
use peerdma_core::{DeviceId, Errno, PAGE_SIZE, Pid, Range, SimDuration, Va};
use peerdma_mm::gup::{GupFlags, PinnedPages};
use peerdma_mm::phys::MemoryKind;
use peerdma_mm::vma::VmFlags;
use peerdma_mm::{DeviceGrant, MmioId};

use crate::dmabuf::{AttachId, ImporterKind};
use crate::error::DmaError;
use crate::map::{DmaSegment, MappedPage, MappedSg};
use crate::mirror::DmaMirror;
use crate::platform::{DmaDevice, Platform};
use crate::space::{DeviceAddr, DmaOp, DmaRequest};

bitflags! {
    /// How the caller will use the translation.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct DmaSgFlags: u32 {
        /// The device will write (FOLL_WRITE; IOMMU write permission).
        const WRITE = 1 << 0;
        /// A long-term pin (RDMA MR, VFIO): FOLL_LONGTERM placement rules.
        const LONGTERM = 1 << 1;
        /// A coherent mirror instead of a pin (ODP): nothing pinned, faults on demand.
        const MIRROR = 1 << 2;
        /// The caller accepts P2P memory (FOLL_PCI_P2PDMA).
        const P2P = 1 << 3;
    }
}

enum Piece {
    Pinned {
        start: Va,
        pins: PinnedPages,
        sg: MappedSg,
    },
    Bar {
        start: Va,
        nr_pages: u64,
        mmio: MmioId,
        att: AttachId,
    },
}

/// What `get_user_dma_sg` took (rule 3).
pub struct DmaSgHandle {
    platform: Rc<Platform>,
    dev: Rc<DmaDevice>,
    pid: Pid,
    range: Range<Va>,
    pieces: Vec<Piece>,
    mirror: Option<DmaMirror>,
}

impl fmt::Debug for DmaSgHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaSgHandle")
            .field("dev", &self.dev.name)
            .field("range", &self.range)
            .field("pieces", &self.pieces.len())
            .field("mirror", &self.mirror.is_some())
            .finish_non_exhaustive()
    }
}

/// Translates `range` of `pid` for DMA by `initiator` (module docs).
///
/// # Errors
/// The errno of the first piece that fails (module table); `EINVAL` for a bad range; `ENODEV` for an
/// unknown device.
pub async fn get_user_dma_sg(
    platform: &Rc<Platform>,
    pid: Pid,
    range: Range<Va>,
    initiator: DeviceId,
    flags: DmaSgFlags,
) -> Result<DmaSgHandle, DmaError> {
    let dev = platform.device(initiator)?;
    if range.is_empty() || !range.start.is_page_aligned() || !range.end.is_page_aligned() {
        return Err(Errno::EINVAL.into());
    }
    let mut h = DmaSgHandle {
        platform: platform.clone(),
        dev: dev.clone(),
        pid,
        range,
        pieces: Vec::new(),
        mirror: None,
    };
    if flags.contains(DmaSgFlags::MIRROR) {
        h.mirror = Some(DmaMirror::register(platform, dev, pid, range)?);
        platform.kernel.sim.count("dma_sg.mirror", 1);
        return Ok(h);
    }
    let mut va = range.start;
    while va < range.end {
        let vma = platform.kernel.vma_at(pid, va);
        let Some(vma) = vma else {
            return Err(Errno::EFAULT.into());
        };
        let end = vma.range.end.min(range.end);
        let piece = Range::new(va, end);
        let p = if vma.flags.intersects(VmFlags::PFNMAP | VmFlags::IO) {
            let p = bar_piece(platform, &dev, pid, piece, vma.flags, flags)?;
            // The attachment's mapping (IO PTE writes) is CPU time of this call.
            if let Piece::Bar { mmio, att, .. } = &p {
                let cost = platform.dmabuf_map_cost(*mmio, *att);
                platform.kernel.spend(cost).await;
            }
            p
        } else {
            pinned_piece(platform, &dev, pid, piece, flags).await?
        };
        h.pieces.push(p);
        va = end;
    }
    platform.kernel.sim.count(
        if flags.contains(DmaSgFlags::LONGTERM) {
            "dma_sg.longterm"
        } else {
            "dma_sg.short_term"
        },
        1,
    );
    Ok(h)
}

/// A PFNMAP piece: translated by the BAR's owner (its dma-buf export).
fn bar_piece(
    platform: &Rc<Platform>,
    dev: &DmaDevice,
    pid: Pid,
    piece: Range<Va>,
    vm_flags: VmFlags,
    flags: DmaSgFlags,
) -> Result<Piece, DmaError> {
    // The exporter translates the user address with the access checked, as VFIO's `follow_fault_pfn` does
    // (drivers/vfio/vfio_iommu_type1.c: a write fault on a PFN entry that is not writable is -EFAULT) and as
    // GUP's `check_vma_flags` does for struct-page memory (spec/linux-p2p.md §2.3): a device write needs
    // VM_WRITE, any access needs VM_READ (a PROT_NONE mapping has no usable entry).
    if !vm_flags.contains(VmFlags::READ)
        || (flags.contains(DmaSgFlags::WRITE) && !vm_flags.contains(VmFlags::WRITE))
    {
        return Err(Errno::EFAULT.into());
    }
    let mut pas = Vec::new();
    let mut mmio = None;
    for va in piece.pages() {
        let (m, pa) = platform
            .kernel
            .follow_pfnmap(pid, va)
            .ok_or(DmaError::Errno(Errno::EFAULT))?;
        if mmio.is_some_and(|x| x != m) {
            return Err(Errno::EFAULT.into());
        }
        mmio = Some(m);
        pas.push(pa);
    }
    let mmio = mmio.ok_or(DmaError::Errno(Errno::EFAULT))?;
    let revocable = platform
        .export_revocable(mmio)
        .ok_or(DmaError::Errno(Errno::EFAULT))?;
    if flags.contains(DmaSgFlags::LONGTERM) && !revocable {
        return Err(Errno::EOPNOTSUPP.into());
    }
    let kind = if revocable {
        ImporterKind::Dynamic
    } else {
        ImporterKind::Pinned
    };
    let att = platform.dmabuf_attach(mmio, dev.id, kind, pas, flags.contains(DmaSgFlags::WRITE))?;
    Ok(Piece::Bar {
        start: piece.start,
        nr_pages: piece.nr_pages(),
        mmio,
        att,
    })
}

/// A struct-page piece: GUP pin, then `map_sg`.
async fn pinned_piece(
    platform: &Rc<Platform>,
    dev: &DmaDevice,
    pid: Pid,
    piece: Range<Va>,
    flags: DmaSgFlags,
) -> Result<Piece, DmaError> {
    let k = &platform.kernel;
    let longterm = flags.contains(DmaSgFlags::LONGTERM);
    // P2P memory is never pinned long-term: FOLL_LONGTERM | FOLL_PCI_P2PDMA is EINVAL (mm/gup.c
    // is_valid_gup_args), so the pgmap can always be hot-unplugged.
    if longterm && piece_is_p2p(platform, pid, piece) {
        return Err(Errno::EINVAL.into());
    }
    let mut gup = GupFlags::PIN;
    if flags.contains(DmaSgFlags::WRITE) {
        gup |= GupFlags::WRITE;
    }
    if longterm {
        gup |= GupFlags::LONGTERM;
    } else if flags.contains(DmaSgFlags::P2P) {
        gup |= GupFlags::PCI_P2PDMA;
    }
    let nr = piece.nr_pages();
    let pins = k.get_user_pages(pid, piece.start, nr, gup).await?;
    if let Some(e) = pins.stopped_by() {
        // A partial pin: the errno is the one of the first page GUP could not take.
        return Err(e.into());
    }
    let pas: Vec<_> = pins.pages().iter().map(|p| p.pa).collect();
    let sg = platform.map_sg(dev.id, &pas, flags.contains(DmaSgFlags::WRITE))?;
    k.spend(sg.cost).await;
    Ok(Piece::Pinned {
        start: piece.start,
        pins,
        sg,
    })
}

fn piece_is_p2p(platform: &Platform, pid: Pid, piece: Range<Va>) -> bool {
    let k = &platform.kernel;
    piece.pages().any(|va| {
        k.translate(pid, va)
            .is_some_and(|(f, _)| matches!(k.memory_kind(f), MemoryKind::P2pMem { .. }))
    })
}

impl DmaSgHandle {
    /// Returns the translated range.
    pub fn range(&self) -> Range<Va> {
        self.range
    }

    /// Returns whether the handle is a mirror registration (nothing pinned).
    pub fn is_mirror(&self) -> bool {
        self.mirror.is_some()
    }

    /// Returns the current DMA segments: the pinned and attached lists in VA order, or the mirror's current
    /// entries. A revoked BAR piece contributes nothing.
    pub fn segments(&self) -> Vec<DmaSegment> {
        if let Some(m) = &self.mirror {
            return m.segments();
        }
        let mut all = MappedSg::default();
        for p in &self.pieces {
            match p {
                Piece::Pinned { sg, .. } => all.pages.extend(sg.pages.iter().copied()),
                Piece::Bar { mmio, att, .. } => {
                    if self.platform.dmabuf_is_mapped(*mmio, *att)
                        && let Ok(pages) = self.platform.dmabuf_mapping(*mmio, *att)
                    {
                        all.pages.extend(pages);
                    }
                }
            }
        }
        all.segments()
    }

    /// Returns the number of pages pinned by this handle.
    pub fn nr_pinned(&self) -> usize {
        self.pieces
            .iter()
            .map(|p| match p {
                Piece::Pinned { pins, .. } => pins.len(),
                Piece::Bar { .. } => 0,
            })
            .sum()
    }

    /// The device writes `data` (whole pages) at byte `offset` of the range, through its access path
    /// ([`crate::space`]): the pages are issued in order and pipelined up to the device's outstanding limit.
    ///
    /// # Errors
    /// `EINVAL` outside the range or not page-sized; `ENODEV` once a BAR piece is revoked; the mirror's
    /// fault errnos; `EFAULT` when the IOMMU faults.
    pub async fn write(&self, offset: u64, data: &[u8]) -> Result<(), DmaError> {
        let nr = self.check(offset, data.len())?;
        if let Some(m) = &self.mirror {
            let ops = data
                .chunks(4096)
                .map(|c| DmaOp::Write(c.to_vec()))
                .collect();
            m.access(self.range.start.add(offset), ops).await?;
            return Ok(());
        }
        let reqs = (0..nr)
            .map(|i| {
                let va = self.range.start.add(offset + i as u64 * PAGE_SIZE);
                self.request(va, DmaOp::Write(data[i * 4096..(i + 1) * 4096].to_vec()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.platform.dma(&self.dev, reqs).await.into_result()?;
        Ok(())
    }

    /// The device reads `len` bytes (whole pages) at byte `offset` of the range (see
    /// [`DmaSgHandle::write`]).
    ///
    /// # Errors
    /// As [`DmaSgHandle::write`].
    pub async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, DmaError> {
        let nr = self.check(offset, len)?;
        if let Some(m) = &self.mirror {
            let ops = (0..nr).map(|_| DmaOp::Read).collect();
            return Ok(m.access(self.range.start.add(offset), ops).await?);
        }
        let reqs = (0..nr)
            .map(|i| {
                let va = self.range.start.add(offset + i as u64 * PAGE_SIZE);
                self.request(va, DmaOp::Read)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(self.platform.dma(&self.dev, reqs).await.into_result()?)
    }

    /// Checks that `len` bytes at `offset` are whole pages inside the range; returns the page count.
    fn check(&self, offset: u64, len: usize) -> Result<usize, DmaError> {
        let size = self.range.len();
        let bad = DmaError::BadRange {
            offset,
            len: len as u64,
            size,
        };
        let end = offset.checked_add(len as u64).ok_or(bad)?;
        if !offset.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(4096) || end > size {
            return Err(bad);
        }
        Ok(len / 4096)
    }

    /// The device's request for the page at `va`: through the DMA address its pin (or its attachment to a
    /// BAR export) gave it.
    fn request(&self, va: Va, op: DmaOp) -> Result<DmaRequest, DmaError> {
        let mp = self.page(va)?;
        Ok(DmaRequest {
            addr: DeviceAddr::Dma(mp.addr),
            grant: DeviceGrant::Pin { pid: self.pid, va },
            op,
        })
    }

    /// Returns the mapped page for `va`.
    fn page(&self, va: Va) -> Result<MappedPage, DmaError> {
        for p in &self.pieces {
            match p {
                Piece::Pinned { start, pins, sg } => {
                    if va < *start {
                        continue;
                    }
                    let i = usize::try_from(va.offset_from(*start) / PAGE_SIZE)
                        .expect("page index fits usize");
                    if i < pins.len() {
                        return Ok(sg.pages[i]);
                    }
                }
                Piece::Bar {
                    start,
                    nr_pages,
                    mmio,
                    att,
                } => {
                    if va >= *start && va.offset_from(*start) / PAGE_SIZE < *nr_pages {
                        let i = usize::try_from(va.offset_from(*start) / PAGE_SIZE)
                            .expect("page index fits usize");
                        let pages = self.platform.dmabuf_mapping(*mmio, *att)?;
                        return Ok(pages[i]);
                    }
                }
            }
        }
        Err(Errno::EINVAL.into())
    }

    /// Releases everything (rule 3), waiting for the mirror's notifier removal and spending the unmaps'
    /// CPU time (a strict domain's IOTLB invalidations).
    pub async fn release(mut self) {
        if let Some(m) = self.mirror.take() {
            m.unregister().await;
        }
        let cost = self.release_pieces();
        self.platform.kernel.spend(cost).await;
    }

    /// Unmaps, unpins and detaches every piece; returns the unmaps' CPU time (dropped, with the handle, by
    /// `Drop`, which cannot wait).
    fn release_pieces(&mut self) -> SimDuration {
        let mut cost = SimDuration::ZERO;
        for p in self.pieces.drain(..) {
            match p {
                Piece::Pinned { mut sg, pins, .. } => {
                    cost += self
                        .platform
                        .unmap_sg(self.dev.id, &mut sg)
                        .unwrap_or(SimDuration::ZERO);
                    drop(pins);
                }
                Piece::Bar { mmio, att, .. } => {
                    cost += self.platform.dmabuf_detach(mmio, att);
                }
            }
        }
        cost
    }
}

impl Drop for DmaSgHandle {
    fn drop(&mut self) {
        let _ = self.release_pieces();
        if let Some(m) = self.mirror.take() {
            // Removing an interval notifier may wait for an invalidation in progress: let an agent do it.
            let sim = self.platform.kernel.sim.clone();
            sim.spawn("dma_sg.release", async move { m.unregister().await });
        }
    }
}
