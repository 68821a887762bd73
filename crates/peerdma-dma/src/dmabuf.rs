//! BAR memory without `struct page`, exported by its owner device the dma-buf way, and the importers that
//! DMA into it (`spec/linux-p2p.md` §1.8 (a), §6; DESIGN.md §4.6 row "BAR without struct page").
//!
//! Linux counterparts: drivers/dma-buf/dma-buf.c (`dma_buf_dynamic_attach`, `dma_buf_map_attachment`,
//! `dma_buf_move_notify`, `dma_buf_pin`), drivers/vfio/pci/vfio_pci_dmabuf.c (a BAR exported as a dma-buf,
//! revoked at removal) and the "naked `p2pdma_provider`" layer of Documentation/driver-api/pci/p2pdma.rst.
//!
//! Rules:
//! 1. The exporter computes the map type for (its device, the importer) with the P2P subsystem: BUS_ADDR
//!    needs no IOVA, THRU_HOST_BRIDGE maps an IOVA with the MMIO attribute, NOT_SUPPORTED refuses
//!    (`EREMOTEIO` here, where VFIO answers `EINVAL`: the DMA API's "cannot reach" errno is what
//!    `get_user_dma_sg` callers compare with).
//! 2. A **dynamic** importer (it has `move_notify`) may lose its mapping at any time: `move_notify` unmaps
//!    it, and its next access maps again (the "fault and rebuild" of RDMA dma-buf MRs). A **pinned** importer
//!    (`dma_buf_pin`) never sees `move_notify`.
//! 3. Revocation (the exporter's `remove()`): the export is marked revoked, every importer — dynamic or
//!    pinned — is DMA-unmapped synchronously, user PFNMAP mappings are zapped, and a later attach or access
//!    gets `ENODEV` without touching the BAR. An access that reaches the BAR anyway is an oracle violation.
//! 4. An export may be declared not revocable (a legacy `remap_pfn_range` BAR with no dma-buf): long-term
//!    users are refused with `EOPNOTSUPP`, because nothing could take the memory back.
//!
//! *Coarse:* the dma-buf reservation lock is not modelled as a separate lock: every step here is atomic in
//! simulated time, which is what holding `dma_resv` around map and `move_notify` guarantees.

use std::collections::BTreeMap;

use peerdma_core::{DeviceId, Errno, PAGE_SIZE, Pa, Pid, Range, SimDuration, Va};
use peerdma_mm::MmioId;
use peerdma_mm::vma::Prot;

use crate::error::DmaError;
use crate::map::{MapTarget, MappedSg};
use crate::platform::Platform;

/// Identifies one importer's attachment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct AttachId(pub u64);

/// How an importer handles moves (rule 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImporterKind {
    /// Has `move_notify`: can lose and rebuild its mapping.
    Dynamic,
    /// Pins the buffer: never sees `move_notify`.
    Pinned,
}

#[derive(Debug)]
struct Attachment {
    importer: DeviceId,
    kind: ImporterKind,
    pas: Vec<Pa>,
    write: bool,
    sg: Option<MappedSg>,
}

#[derive(Debug)]
struct Export {
    owner: DeviceId,
    range: Range<Pa>,
    revocable: bool,
    revoked: bool,
    attachments: BTreeMap<AttachId, Attachment>,
}

/// Every BAR export of the platform.
#[derive(Debug, Default)]
pub(crate) struct Exports {
    by_mmio: BTreeMap<MmioId, Export>,
    next_attach: u64,
}

impl Platform {
    /// Exports `len` bytes at `offset` of BAR `bar` of `owner` as memory without struct page (the MMIO
    /// becomes known to the memory model with real bytes). `revocable` says whether it is a dma-buf export
    /// that can take the memory back (rule 4).
    ///
    /// # Errors
    /// `EINVAL` when the BAR does not exist or the range does not fit in it; `ENODEV` for an unknown device.
    pub fn export_bar(
        &self,
        owner: DeviceId,
        bar: u8,
        offset: u64,
        len: u64,
        revocable: bool,
    ) -> Result<MmioId, DmaError> {
        let d = self.device(owner)?;
        let b = *self
            .topology()
            .node(d.node)
            .bar(bar)
            .ok_or(DmaError::NoSuchBar { device: owner, bar })?;
        let len = if len == 0 {
            b.size.saturating_sub(offset)
        } else {
            len
        };
        if len == 0
            || offset.checked_add(len).is_none_or(|e| e > b.size)
            || !offset.is_multiple_of(PAGE_SIZE)
            || !len.is_multiple_of(PAGE_SIZE)
        {
            return Err(Errno::EINVAL.into());
        }
        let range =
            Range::from_len(b.phys.add(offset), len).ok_or(DmaError::Errno(Errno::EINVAL))?;
        let mmio = self.kernel.add_mmio(owner, range);
        self.exports.borrow_mut().by_mmio.insert(
            mmio,
            Export {
                owner,
                range,
                revocable,
                revoked: false,
                attachments: BTreeMap::new(),
            },
        );
        Ok(mmio)
    }

    /// Maps `len` bytes at `offset` of an exported BAR into `pid` (the owner driver's mmap with
    /// `remap_pfn_range`: a VM_IO | VM_PFNMAP VMA).
    ///
    /// # Errors
    /// The memory model's errnos (`EINVAL` out of range, `ENODEV` after revocation).
    pub async fn mmap_bar(
        &self,
        pid: Pid,
        mmio: MmioId,
        offset: u64,
        len: u64,
        prot: Prot,
    ) -> Result<Va, DmaError> {
        Ok(self
            .kernel
            .mmap_pfnmap_mmio(pid, mmio, offset, len, prot)
            .await?)
    }

    /// Returns the physical range of an export.
    pub fn export_range(&self, mmio: MmioId) -> Option<Range<Pa>> {
        self.exports.borrow().by_mmio.get(&mmio).map(|e| e.range)
    }

    /// Returns whether `pa` lies in an export that has not been revoked (rule 3).
    pub(crate) fn export_live_at(&self, pa: Pa) -> bool {
        self.exports
            .borrow()
            .by_mmio
            .values()
            .any(|e| !e.revoked && e.range.contains(pa))
    }

    /// Returns whether the export is revocable (rule 4).
    pub(crate) fn export_revocable(&self, mmio: MmioId) -> Option<bool> {
        self.exports
            .borrow()
            .by_mmio
            .get(&mmio)
            .map(|e| e.revocable)
    }

    /// Attaches `importer` to the pages `pas` of an export and maps them for it (`dma_buf_dynamic_attach` or
    /// `dma_buf_attach` + `dma_buf_pin`, then `dma_buf_map_attachment`; rule 1).
    ///
    /// # Errors
    /// `ENODEV` for a revoked or unknown export, `EREMOTEIO` when the importer cannot reach the BAR,
    /// `EINVAL` for pages outside the export.
    pub fn dmabuf_attach(
        &self,
        mmio: MmioId,
        importer: DeviceId,
        kind: ImporterKind,
        pas: Vec<Pa>,
        write: bool,
    ) -> Result<AttachId, DmaError> {
        let (owner, range) = {
            let ex = self.exports.borrow();
            let e = ex
                .by_mmio
                .get(&mmio)
                .ok_or(DmaError::Errno(Errno::ENODEV))?;
            if e.revoked {
                return Err(Errno::ENODEV.into());
            }
            (e.owner, e.range)
        };
        if pas.iter().any(|&p| !range.contains(p)) {
            return Err(Errno::EINVAL.into());
        }
        let sg = self.map_export_pages(owner, importer, &pas, write)?;
        let mut ex = self.exports.borrow_mut();
        let id = AttachId(ex.next_attach);
        ex.next_attach += 1;
        ex.by_mmio
            .get_mut(&mmio)
            .expect("checked above")
            .attachments
            .insert(
                id,
                Attachment {
                    importer,
                    kind,
                    pas,
                    write,
                    sg: Some(sg),
                },
            );
        self.kernel.sim.count("dmabuf.attach", 1);
        Ok(id)
    }

    fn map_export_pages(
        &self,
        owner: DeviceId,
        importer: DeviceId,
        pas: &[Pa],
        write: bool,
    ) -> Result<MappedSg, DmaError> {
        let own = self.device(owner)?;
        let imp = self.device(importer)?;
        let off = self
            .topology()
            .node(own.node)
            .bars()
            .iter()
            .find(|b| pas.first().is_some_and(|&p| b.contains(p)))
            .map_or(0, |b| b.bus_offset);
        let mt = self
            .providers
            .borrow_mut()
            .provider_map_type(self.topology(), own.node, imp.node);
        let targets: Vec<MapTarget> = pas
            .iter()
            .map(|&pa| MapTarget {
                pa,
                class: Some((mt, off)),
                mmio: true,
            })
            .collect();
        self.map_targets(&imp, &targets, write)
    }

    /// Returns the DMA-mapped list of an attachment, mapping it again first for a dynamic importer that lost
    /// it to `move_notify` (rule 2).
    ///
    /// # Errors
    /// `ENODEV` once the export is revoked (rule 3); the map errnos of [`Platform::dmabuf_attach`].
    pub(crate) fn dmabuf_mapping(
        &self,
        mmio: MmioId,
        att: AttachId,
    ) -> Result<Vec<crate::map::MappedPage>, DmaError> {
        let (owner, importer, pas, write) = {
            let ex = self.exports.borrow();
            let e = ex
                .by_mmio
                .get(&mmio)
                .ok_or(DmaError::Errno(Errno::ENODEV))?;
            if e.revoked {
                return Err(Errno::ENODEV.into());
            }
            let a = e
                .attachments
                .get(&att)
                .ok_or(DmaError::Errno(Errno::ENODEV))?;
            if let Some(sg) = &a.sg {
                return Ok(sg.pages.clone());
            }
            (e.owner, a.importer, a.pas.clone(), a.write)
        };
        let sg = self.map_export_pages(owner, importer, &pas, write)?;
        let pages = sg.pages.clone();
        self.kernel.sim.count("dmabuf.remap", 1);
        let mut ex = self.exports.borrow_mut();
        if let Some(a) = ex
            .by_mmio
            .get_mut(&mmio)
            .and_then(|e| e.attachments.get_mut(&att))
        {
            a.sg = Some(sg);
        }
        Ok(pages)
    }

    /// Returns the DMA address of page `i` of an attachment, mapping it again first for a dynamic importer
    /// that lost its mapping to `move_notify` (an importer's fault path, e.g. an RDMA dma-buf MR).
    ///
    /// # Errors
    /// As `dmabuf_mapping`; `EINVAL` for a page outside the attachment.
    pub fn dmabuf_page_addr(
        &self,
        mmio: MmioId,
        att: AttachId,
        i: usize,
    ) -> Result<crate::map::DmaAddr, Errno> {
        let pages = self.dmabuf_mapping(mmio, att)?;
        pages.get(i).map(|p| p.addr).ok_or(Errno::EINVAL)
    }

    /// Returns the CPU time the current mapping of an attachment took (its IO PTE writes; 0 for an unknown
    /// or unmapped attachment), for the async caller of [`Platform::dmabuf_attach`] to spend.
    pub fn dmabuf_map_cost(&self, mmio: MmioId, att: AttachId) -> SimDuration {
        self.exports
            .borrow()
            .by_mmio
            .get(&mmio)
            .and_then(|e| e.attachments.get(&att))
            .and_then(|a| a.sg.as_ref())
            .map_or(SimDuration::ZERO, |sg| sg.cost)
    }

    /// Detaches an importer (`dma_buf_unmap_attachment` + `dma_buf_detach`); returns the unmap's CPU time
    /// (IO PTE clears, a strict domain's IOTLB invalidation) for the caller to spend.
    pub fn dmabuf_detach(&self, mmio: MmioId, att: AttachId) -> SimDuration {
        let a = self
            .exports
            .borrow_mut()
            .by_mmio
            .get_mut(&mmio)
            .and_then(|e| e.attachments.remove(&att));
        if let Some(mut a) = a
            && let Some(sg) = a.sg.as_mut()
        {
            return self.unmap_sg(a.importer, sg).unwrap_or(SimDuration::ZERO);
        }
        SimDuration::ZERO
    }

    /// `dma_buf_move_notify`: every dynamic importer loses its mapping (pinned importers are left alone).
    /// Returns the number of importers notified.
    pub fn dmabuf_move_notify(&self, mmio: MmioId) -> u64 {
        let mut dropped = Vec::new();
        {
            let mut ex = self.exports.borrow_mut();
            let Some(e) = ex.by_mmio.get_mut(&mmio) else {
                return 0;
            };
            for a in e.attachments.values_mut() {
                if a.kind == ImporterKind::Dynamic
                    && let Some(sg) = a.sg.take()
                {
                    dropped.push((a.importer, sg));
                }
            }
        }
        let n = dropped.len() as u64;
        for (imp, mut sg) in dropped {
            let _ = self.unmap_sg(imp, &mut sg);
        }
        self.kernel.sim.count("dmabuf.move_notify", n);
        n
    }

    /// Revokes every export of `owner` (rule 3): importers unmapped, user mappings zapped.
    pub(crate) async fn revoke_exports(&self, owner: DeviceId) {
        let mut unmaps = Vec::new();
        let mmios: Vec<MmioId> = {
            let mut ex = self.exports.borrow_mut();
            let mut v = Vec::new();
            for (&m, e) in &mut ex.by_mmio {
                if e.owner != owner || e.revoked {
                    continue;
                }
                e.revoked = true;
                for a in e.attachments.values_mut() {
                    if let Some(sg) = a.sg.take() {
                        unmaps.push((a.importer, sg));
                    }
                }
                v.push(m);
            }
            v
        };
        self.kernel
            .sim
            .count("dmabuf.revoked_importers", unmaps.len() as u64);
        let mut cost = SimDuration::ZERO;
        for (imp, mut sg) in unmaps {
            cost += self.unmap_sg(imp, &mut sg).unwrap_or(SimDuration::ZERO);
        }
        // The importers' unmaps (IO PTE clears, strict IOTLB invalidations) run on the removing CPU.
        self.kernel.spend(cost).await;
        for m in mmios {
            self.kernel.revoke_mmio(m).await;
        }
    }

    /// Returns whether an importer attachment still holds a mapping (tests and reports).
    pub fn dmabuf_is_mapped(&self, mmio: MmioId, att: AttachId) -> bool {
        self.exports
            .borrow()
            .by_mmio
            .get(&mmio)
            .and_then(|e| e.attachments.get(&att))
            .is_some_and(|a| a.sg.is_some())
    }
}
