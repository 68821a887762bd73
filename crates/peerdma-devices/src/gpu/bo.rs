//! Buffer objects, TTM-style (drivers/gpu/drm/ttm/ttm_bo.c, drivers/gpu/drm/amd/amdgpu/amdgpu_dma_buf.c,
//! drivers/dma-buf/dma-buf.c), and the dma-buf importers that follow them when they move.
//!
//! A buffer object lives in one [`Placement`]: VRAM inside the BAR window, VRAM outside it, or system pages
//! (TTM's GTT/system domain, after eviction). It is exported as a dma-buf: an importer attaches dynamically
//! (it has `move_notify`) or pinned.
//!
//! A move (eviction, validation back into VRAM, a window move), as numbered steps:
//! 1. **Invalidate the peers** (`dma_buf_move_notify` under the reservation lock, as amdgpu's
//!    `amdgpu_bo_move_notify` does): every dynamic importer loses its mapping — its DMA addresses are
//!    unmapped now — and maps again at its next access, at the new place; a pinned importer is **revoked**
//!    (unmapped, and its later accesses get `ENODEV`), because the exporter is taking the memory it pinned.
//! 2. **Invalidate the GPU's TLB** (its own page table points at the new place after the move).
//! 3. **Copy** with the copy engine through the GPU's access path: read every source page, write every
//!    destination page.
//! 4. **Free** the source pages: a window page returns to the P2P pool, a system page to the page
//!    allocator, so a device that kept an old address reaches a freed (or reallocated) frame and the oracle
//!    reports use after free.
//!
//! Where a dynamic importer maps again (`dma_buf_map_attachment`): a buffer in the window maps to PCI bus
//! addresses (or through the host bridge, as the topology decides); a buffer in system pages maps to IOVAs
//! through the importer's IOMMU domain; a buffer in VRAM outside the window is first moved into the window
//! (TTM validates it into CPU/peer-visible VRAM, evicting the least recently used window buffer to
//! invisible VRAM when the window is full).
//!
//! *Coarse:* the CPU's mapping of a buffer (TTM's `ttm_bo_vm_fault` over a VM_PFNMAP VMA, zapped by
//! `unmap_mapping_range` on every move) is not modelled: the CPU and the GPU reach a buffer through
//! [`crate::gpu::Gpu::bo_write`] / [`crate::gpu::Gpu::bo_read`], which always see the current placement. Moves
//! and importer accesses are serialized by the reservation lock (`dma_resv`): an importer's DMA holds it from
//! its mapping to its completion, so a move waits for the importer's DMA in flight as TTM waits for the
//! buffer's fences (*coarse:* one lock per GPU, and an importer waits for a move instead of pipelining
//! behind its fence).

use std::collections::BTreeMap;

use peerdma_core::{DeviceId, Errno, FrameId, PAGE_SIZE, Pa};
use peerdma_dma::{
    DeviceAddr, DmaAddr, DmaOp, DmaRequest, DmaSegment, ImporterKind, MappedSg, SegKind,
};
use peerdma_mm::DeviceGrant;

use super::{Gpu, GpuError, GpuInjection, Result};

/// Bytes in a page, as a length.
const PAGE: usize = 4096;

/// Frames with their generations, and the bytes of a buffer's invisible-VRAM pages.
type Contents = (Vec<(FrameId, u64)>, Option<Vec<Vec<u8>>>);

/// Identifies a buffer object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct BoId(pub u64);

/// Identifies one importer's attachment to a buffer object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct BoAttach(pub u64);

/// Where a buffer object's pages are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Placement {
    /// VRAM the BAR window shows (CPU- and peer-visible).
    Window,
    /// VRAM outside the window (only the GPU reaches it).
    Hidden,
    /// System pages (evicted; TTM's GTT domain).
    System,
}

impl Placement {
    /// Returns the name reports print.
    pub fn name(self) -> &'static str {
        match self {
            Self::Window => "vram-window",
            Self::Hidden => "vram-hidden",
            Self::System => "system",
        }
    }
}

/// One page of a buffer.
#[derive(Debug)]
enum BoPage {
    /// A frame with its allocation generation (window P2P page or system page).
    Frame(FrameId, u64),
    /// Device-internal VRAM.
    Hidden(Box<[u8]>),
}

#[derive(Debug)]
struct Importer {
    dev: DeviceId,
    kind: ImporterKind,
    write: bool,
    sg: Option<MappedSg>,
    revoked: bool,
}

#[derive(Debug)]
struct Bo {
    placement: Placement,
    pages: Vec<BoPage>,
    importers: BTreeMap<BoAttach, Importer>,
    last_use: u64,
}

/// Every buffer object of a GPU.
#[derive(Debug, Default)]
pub(crate) struct BoState {
    bos: BTreeMap<BoId, Bo>,
    attach: BTreeMap<BoAttach, BoId>,
    next: u64,
    tick: u64,
    window_used: u64,
    hidden_used: u64,
}

impl BoState {
    fn bo(&mut self, id: BoId) -> Result<&mut Bo> {
        self.tick += 1;
        let t = self.tick;
        let b = self.bos.get_mut(&id).ok_or(GpuError::UnknownBo(id.0))?;
        b.last_use = t;
        Ok(b)
    }
}

impl Gpu {
    fn room(&self, st: &BoState, p: Placement, nr: u64) -> bool {
        match p {
            Placement::Window => st.window_used + nr <= self.window_pages,
            Placement::Hidden => st.hidden_used + nr <= self.hidden_pages,
            Placement::System => true,
        }
    }

    /// `amdgpu_bo_create` + `ttm_bo_init_reserved`: creates a zero-filled buffer of `len` bytes in VRAM —
    /// the window first, then invisible VRAM, then system pages (no eviction at creation).
    ///
    /// # Errors
    /// [`GpuError::BadRange`] for a length that is zero or not page aligned; `ENOMEM` when no placement can
    /// hold it.
    pub fn bo_create(&self, len: u64) -> Result<BoId> {
        if len == 0 || !len.is_multiple_of(PAGE_SIZE) {
            return Err(GpuError::BadRange {
                offset: 0,
                len,
                size: len,
            });
        }
        let nr = len / PAGE_SIZE;
        let place = {
            let st = self.bo.borrow();
            [Placement::Window, Placement::Hidden, Placement::System]
                .into_iter()
                .find(|&p| self.room(&st, p, nr))
                .expect("system always has room")
        };
        let pages = self.alloc_pages(place, nr)?;
        let mut st = self.bo.borrow_mut();
        st.next += 1;
        st.tick += 1;
        let id = BoId(st.next);
        let last_use = st.tick;
        st.bos.insert(
            id,
            Bo {
                placement: place,
                pages,
                importers: BTreeMap::new(),
                last_use,
            },
        );
        self.platform.kernel.sim.count("gpu.bo_created", 1);
        Ok(id)
    }

    /// Allocates `nr` pages in `p` and accounts them (`ENOMEM` when the pool runs dry).
    fn alloc_pages(&self, p: Placement, nr: u64) -> Result<Vec<BoPage>> {
        let k = &self.platform.kernel;
        let mut out = Vec::new();
        for _ in 0..nr {
            let page = match p {
                Placement::Window => k.alloc_p2pmem(self.window_region, PAGE_SIZE),
                Placement::System => k.alloc_ram_page(None),
                Placement::Hidden => {
                    out.push(BoPage::Hidden(vec![0u8; PAGE].into_boxed_slice()));
                    continue;
                }
            };
            let Some(f) = page else {
                self.free_pages(p, std::mem::take(&mut out));
                return Err(GpuError::Errno(Errno::ENOMEM));
            };
            let g = k.frame_generation(f).expect("just allocated");
            out.push(BoPage::Frame(f, g));
        }
        let mut st = self.bo.borrow_mut();
        match p {
            Placement::Window => st.window_used += nr,
            Placement::Hidden => st.hidden_used += nr,
            Placement::System => {}
        }
        Ok(out)
    }

    fn free_pages(&self, p: Placement, pages: Vec<BoPage>) {
        let k = &self.platform.kernel;
        let nr = pages.len() as u64;
        for page in pages {
            if let BoPage::Frame(f, _) = page {
                match p {
                    Placement::Window => k.free_p2pmem(f, PAGE_SIZE),
                    _ => k.free_driver_page(f),
                }
            }
        }
        let mut st = self.bo.borrow_mut();
        match p {
            Placement::Window => st.window_used = st.window_used.saturating_sub(nr),
            Placement::Hidden => st.hidden_used = st.hidden_used.saturating_sub(nr),
            Placement::System => {}
        }
    }

    /// Returns where a buffer is.
    ///
    /// # Errors
    /// [`GpuError::UnknownBo`].
    pub fn bo_placement(&self, bo: BoId) -> Result<Placement> {
        self.bo
            .borrow()
            .bos
            .get(&bo)
            .map(|b| b.placement)
            .ok_or(GpuError::UnknownBo(bo.0))
    }

    /// Returns the size of a buffer in bytes.
    ///
    /// # Errors
    /// [`GpuError::UnknownBo`].
    pub fn bo_size(&self, bo: BoId) -> Result<u64> {
        self.bo
            .borrow()
            .bos
            .get(&bo)
            .map(|b| b.pages.len() as u64 * PAGE_SIZE)
            .ok_or(GpuError::UnknownBo(bo.0))
    }

    /// Returns the CPU physical address of page `i` of a buffer in the window or in system pages.
    fn page_pa(&self, p: &BoPage) -> Option<Pa> {
        match p {
            BoPage::Frame(f, _) => Some(self.platform.kernel.frame_pa(*f)),
            BoPage::Hidden(_) => None,
        }
    }

    /// The GPU's own access to a buffer's pages through its access path (the copy engine and shader
    /// loads/stores); `data` = `None` reads.
    async fn gpu_pages(
        &self,
        frames: &[(FrameId, u64)],
        data: Option<&[Vec<u8>]>,
    ) -> Result<Vec<u8>> {
        if frames.is_empty() {
            return Ok(Vec::new());
        }
        let reqs = frames
            .iter()
            .enumerate()
            .map(|(i, &(frame, generation))| DmaRequest {
                addr: DeviceAddr::Frame { frame, generation },
                grant: DeviceGrant::Raw,
                op: match data {
                    Some(d) => DmaOp::Write(d[i].clone()),
                    None => DmaOp::Read,
                },
            })
            .collect();
        Ok(self.platform.dma(&self.dev, reqs).await.into_result()?)
    }

    /// Reads a whole buffer as the GPU sees it (wherever it is).
    async fn bo_contents(&self, bo: BoId) -> Result<Vec<Vec<u8>>> {
        let (frames, hidden): Contents = {
            let mut st = self.bo.borrow_mut();
            let b = st.bo(bo)?;
            if b.placement == Placement::Hidden {
                let h = b
                    .pages
                    .iter()
                    .map(|p| match p {
                        BoPage::Hidden(d) => d.to_vec(),
                        BoPage::Frame(..) => unreachable!("a hidden buffer has hidden pages"),
                    })
                    .collect();
                (Vec::new(), Some(h))
            } else {
                let f = b
                    .pages
                    .iter()
                    .filter_map(|p| match p {
                        BoPage::Frame(f, g) => Some((*f, *g)),
                        BoPage::Hidden(_) => None,
                    })
                    .collect();
                (f, None)
            }
        };
        if let Some(h) = hidden {
            return Ok(h);
        }
        let flat = self.gpu_pages(&frames, None).await?;
        Ok(flat.chunks(PAGE).map(<[u8]>::to_vec).collect())
    }

    /// Writes `data` at `offset` of a buffer as the GPU (or the CPU through its mapping) would: the bytes land
    /// wherever the buffer is now. `offset` and `data.len()` are page multiples.
    ///
    /// # Errors
    /// [`GpuError::BadRange`] outside the buffer; `EFAULT` when the access path refuses.
    pub async fn bo_write(&self, bo: BoId, offset: u64, data: &[u8]) -> Result<()> {
        let size = self.bo_size(bo)?;
        let len = data.len() as u64;
        check_range(offset, len, size)?;
        let _resv = self.resv.lock().await;
        let first = usize::try_from(offset / PAGE_SIZE).expect("fits");
        let chunks: Vec<Vec<u8>> = data.chunks(PAGE).map(<[u8]>::to_vec).collect();
        let frames: Vec<(FrameId, u64)> = {
            let mut st = self.bo.borrow_mut();
            let b = st.bo(bo)?;
            let mut frames = Vec::new();
            for (i, c) in chunks.iter().enumerate() {
                match &mut b.pages[first + i] {
                    BoPage::Hidden(d) => d.copy_from_slice(c),
                    BoPage::Frame(f, g) => frames.push((*f, *g)),
                }
            }
            frames
        };
        if !frames.is_empty() {
            self.gpu_pages(&frames, Some(&chunks)).await?;
        }
        Ok(())
    }

    /// Reads `len` bytes at `offset` of a buffer wherever it is (page multiples).
    ///
    /// # Errors
    /// As [`Gpu::bo_write`].
    pub async fn bo_read(&self, bo: BoId, offset: u64, len: u64) -> Result<Vec<u8>> {
        let size = self.bo_size(bo)?;
        check_range(offset, len, size)?;
        let _resv = self.resv.lock().await;
        let all = self.bo_contents(bo).await?;
        let first = usize::try_from(offset / PAGE_SIZE).expect("fits");
        let n = usize::try_from(len / PAGE_SIZE).expect("fits");
        Ok(all[first..first + n].concat())
    }

    /// `dma_buf_dynamic_attach` (dynamic) or `dma_buf_attach` + `dma_buf_pin` (pinned) of device `importer`
    /// to a buffer, mapped at once (`dma_buf_map_attachment`).
    ///
    /// # Errors
    /// [`GpuError::UnknownBo`]; the map's errno (`EREMOTEIO` when the importer cannot reach the window).
    pub async fn bo_attach(
        &self,
        bo: BoId,
        importer: DeviceId,
        kind: ImporterKind,
        write: bool,
    ) -> Result<BoAttach> {
        self.platform.device(importer)?;
        let id = {
            let mut st = self.bo.borrow_mut();
            st.bo(bo)?;
            st.next += 1;
            let id = BoAttach(st.next);
            st.attach.insert(id, bo);
            st.bos.get_mut(&bo).expect("checked").importers.insert(
                id,
                Importer {
                    dev: importer,
                    kind,
                    write,
                    sg: None,
                    revoked: false,
                },
            );
            id
        };
        self.platform.kernel.sim.count("dmabuf.attach", 1);
        let resv = self.resv.lock().await;
        let res = self.importer_map(id).await;
        drop(resv);
        if let Err(e) = res {
            self.bo_detach(id);
            return Err(e);
        }
        Ok(id)
    }

    /// `dma_buf_detach`: drops an attachment and its mapping.
    pub fn bo_detach(&self, att: BoAttach) {
        let imp = {
            let mut st = self.bo.borrow_mut();
            let Some(bo) = st.attach.remove(&att) else {
                return;
            };
            st.bos.get_mut(&bo).and_then(|b| b.importers.remove(&att))
        };
        if let Some(mut imp) = imp
            && let Some(sg) = imp.sg.as_mut()
        {
            let _ = self.platform.unmap_sg(imp.dev, sg);
        }
    }

    /// Maps an attachment at its buffer's current place when it has no mapping (the dynamic importer's
    /// "map again at the next access"); moves an invisible buffer into the window first. The reservation
    /// lock is held.
    async fn importer_map(&self, att: BoAttach) -> Result<()> {
        let bo = {
            let st = self.bo.borrow();
            let bo = *st.attach.get(&att).ok_or(GpuError::UnknownAttach(att.0))?;
            let imp = &st.bos[&bo].importers[&att];
            if imp.revoked {
                return Err(GpuError::Errno(Errno::ENODEV));
            }
            if imp.sg.is_some() {
                return Ok(());
            }
            bo
        };
        if self.bo_placement(bo)? == Placement::Hidden {
            self.bo_move(bo, Placement::Window).await?;
        }
        let (dev, write, pas) = {
            let st = self.bo.borrow();
            let b = &st.bos[&bo];
            let imp = &b.importers[&att];
            let pas: Vec<Pa> = b.pages.iter().filter_map(|p| self.page_pa(p)).collect();
            (imp.dev, imp.write, pas)
        };
        let sg = self.platform.map_sg(dev, &pas, write)?;
        let k = &self.platform.kernel;
        k.sim.count("dmabuf.map", 1);
        for s in sg.segments() {
            k.sim.count(
                match s.kind {
                    SegKind::P2pBusAddr => "dmabuf.mapped_pages.bus",
                    SegKind::P2pThruHostBridge => "dmabuf.mapped_pages.host-bridge",
                    SegKind::Ram => "dmabuf.mapped_pages.ram",
                },
                s.len / PAGE_SIZE,
            );
        }
        let mut st = self.bo.borrow_mut();
        if let Some(imp) = st.bos.get_mut(&bo).and_then(|b| b.importers.get_mut(&att)) {
            imp.sg = Some(sg);
        }
        Ok(())
    }

    /// Returns whether an attachment holds a mapping now.
    pub fn bo_is_mapped(&self, att: BoAttach) -> bool {
        let st = self.bo.borrow();
        st.attach
            .get(&att)
            .and_then(|bo| st.bos[bo].importers.get(&att))
            .is_some_and(|i| i.sg.is_some())
    }

    /// Returns whether an attachment was revoked.
    pub fn bo_is_revoked(&self, att: BoAttach) -> bool {
        let st = self.bo.borrow();
        st.attach
            .get(&att)
            .and_then(|bo| st.bos[bo].importers.get(&att))
            .is_some_and(|i| i.revoked)
    }

    /// Returns the size of an attachment's buffer in bytes.
    ///
    /// # Errors
    /// [`GpuError::UnknownAttach`].
    pub fn bo_attach_size(&self, att: BoAttach) -> Result<u64> {
        let bo = *self
            .bo
            .borrow()
            .attach
            .get(&att)
            .ok_or(GpuError::UnknownAttach(att.0))?;
        self.bo_size(bo)
    }

    /// Returns the merged segments of an attachment's current mapping (empty when it has none).
    pub fn bo_segments(&self, att: BoAttach) -> Vec<DmaSegment> {
        let st = self.bo.borrow();
        st.attach
            .get(&att)
            .and_then(|bo| st.bos[bo].importers.get(&att))
            .and_then(|i| i.sg.as_ref())
            .map(MappedSg::segments)
            .unwrap_or_default()
    }

    /// The importer's DMA of `len` bytes at `offset` of the buffer, page by page through the importer's
    /// access path; `data` = `Some` writes. A dynamic importer without a mapping maps again first (at the
    /// buffer's current place). Returns the bytes read (empty for a write).
    ///
    /// # Errors
    /// `ENODEV` for a revoked importer; [`GpuError::BadRange`]; `EFAULT` when the access path refuses.
    pub async fn bo_dma(
        &self,
        att: BoAttach,
        offset: u64,
        len: u64,
        data: Option<&[u8]>,
    ) -> Result<Vec<u8>> {
        let bo = *self
            .bo
            .borrow()
            .attach
            .get(&att)
            .ok_or(GpuError::UnknownAttach(att.0))?;
        check_range(offset, len, self.bo_size(bo)?)?;
        // The reservation lock, held until the DMA completes: a move waits for it (the importer's fence).
        let _resv = self.resv.lock().await;
        self.importer_map(att).await?;
        let (dev, addrs): (DeviceId, Vec<DmaAddr>) = {
            let mut st = self.bo.borrow_mut();
            let b = st.bo(bo)?;
            let imp = &b.importers[&att];
            let sg = imp.sg.as_ref().expect("mapped above");
            let first = usize::try_from(offset / PAGE_SIZE).expect("fits");
            let n = usize::try_from(len / PAGE_SIZE).expect("fits");
            (
                imp.dev,
                (first..first + n)
                    .map(|i| sg.page_addr(i).expect("every page is mapped"))
                    .collect(),
            )
        };
        let d = self.platform.device(dev)?;
        let reqs = addrs
            .iter()
            .enumerate()
            .map(|(i, &a)| DmaRequest {
                addr: DeviceAddr::Dma(a),
                grant: DeviceGrant::Raw,
                op: match data {
                    Some(bytes) => DmaOp::Write(bytes[i * PAGE..(i + 1) * PAGE].to_vec()),
                    None => DmaOp::Read,
                },
            })
            .collect();
        let out = self.platform.dma(&d, reqs).await.into_result()?;
        Ok(if data.is_some() { Vec::new() } else { out })
    }

    /// TTM eviction (`ttm_bo_evict`): moves a buffer to system pages.
    ///
    /// # Errors
    /// [`GpuError::UnknownBo`]; `ENOMEM`; `EFAULT` from the copy.
    pub async fn bo_evict(&self, bo: BoId) -> Result<()> {
        let _resv = self.resv.lock().await;
        self.bo_move(bo, Placement::System).await
    }

    /// `ttm_bo_validate` into VRAM: brings a buffer back, into the window when it has room, else into
    /// invisible VRAM; when VRAM is full, evicts the least recently used other buffers to system pages first
    /// (TTM's LRU eviction).
    ///
    /// # Errors
    /// As [`Gpu::bo_evict`]; `ENOMEM` when VRAM cannot hold the buffer even empty.
    pub async fn bo_validate(&self, bo: BoId) -> Result<()> {
        let nr = self.bo_size(bo)? / PAGE_SIZE;
        let _resv = self.resv.lock().await;
        if self.bo_placement(bo)? != Placement::System {
            return Ok(());
        }
        loop {
            let target = {
                let st = self.bo.borrow();
                [Placement::Window, Placement::Hidden]
                    .into_iter()
                    .find(|&p| self.room(&st, p, nr))
            };
            if let Some(p) = target {
                return self.bo_move(bo, p).await;
            }
            let victim = self.lru_victim(bo, &[Placement::Window, Placement::Hidden]);
            let Some(v) = victim else {
                return Err(GpuError::Errno(Errno::ENOMEM));
            };
            self.platform.kernel.sim.count("gpu.bo_lru_evictions", 1);
            self.bo_move(v, Placement::System).await?;
        }
    }

    /// Moves a buffer into (`visible`) or out of the BAR window; moving in evicts the least recently used
    /// window buffers to invisible VRAM when the window is full.
    ///
    /// # Errors
    /// As [`Gpu::bo_evict`]; `ENOMEM` when invisible VRAM cannot take a buffer.
    pub async fn bo_set_visible(&self, bo: BoId, visible: bool) -> Result<()> {
        let _resv = self.resv.lock().await;
        let place = self.bo_placement(bo)?;
        match (visible, place) {
            (true, Placement::Hidden | Placement::System) => {
                self.bo_move(bo, Placement::Window).await
            }
            (false, Placement::Window) => self.bo_move(bo, Placement::Hidden).await,
            _ => Ok(()),
        }
    }

    fn lru_victim(&self, except: BoId, from: &[Placement]) -> Option<BoId> {
        let st = self.bo.borrow();
        st.bos
            .iter()
            .filter(|(id, b)| **id != except && from.contains(&b.placement))
            .min_by_key(|(_, b)| b.last_use)
            .map(|(id, _)| *id)
    }

    /// Moves a buffer to `to` (module docs, steps 1–4), the reservation lock held; makes room in the window by moving its least
    /// recently used buffers to invisible VRAM, or to system pages when that is full too.
    async fn bo_move(&self, bo: BoId, to: Placement) -> Result<()> {
        let nr = self.bo_size(bo)? / PAGE_SIZE;
        let from = self.bo_placement(bo)?;
        if from == to {
            return Ok(());
        }
        while !self.room(&self.bo.borrow(), to, nr) {
            let Some(v) = self.lru_victim(bo, &[to]) else {
                return Err(GpuError::Errno(Errno::ENOMEM));
            };
            let dest =
                if to == Placement::Window && self.room(&self.bo.borrow(), Placement::Hidden, nr) {
                    Placement::Hidden
                } else {
                    Placement::System
                };
            Box::pin(self.bo_move(v, dest)).await?;
        }
        let k = self.platform.kernel.clone();
        k.sim.trace("gpu.bo_move", || {
            format!("bo {} {} -> {}", bo.0, from.name(), to.name())
        });
        k.sim.count(
            match to {
                Placement::System => "gpu.bo_evictions",
                Placement::Window => "gpu.bo_moves_into_window",
                Placement::Hidden => "gpu.bo_moves_out_of_window",
            },
            1,
        );
        // Step 1: the peers.
        self.invalidate_importers(bo);
        // Step 2: the GPU's own TLB.
        self.tlb_invalidate().await;
        // Step 3: copy.
        k.spend(self.cfg.costs.copy_setup).await;
        let contents = self.bo_contents(bo).await?;
        let mut dst = self.alloc_pages(to, nr)?;
        let frames: Vec<(FrameId, u64)> = dst
            .iter_mut()
            .zip(&contents)
            .filter_map(|(p, c)| match p {
                BoPage::Hidden(d) => {
                    d.copy_from_slice(c);
                    None
                }
                BoPage::Frame(f, g) => Some((*f, *g)),
            })
            .collect();
        if !frames.is_empty() {
            self.gpu_pages(&frames, Some(&contents)).await?;
        }
        k.sim.count("gpu.pages_copied", nr);
        // Step 4: free the source.
        let old = {
            let mut st = self.bo.borrow_mut();
            let b = st.bos.get_mut(&bo).expect("checked");
            b.placement = to;
            std::mem::replace(&mut b.pages, dst)
        };
        self.free_pages(from, old);
        Ok(())
    }

    /// Step 1 of a move: `move_notify` to dynamic importers, revocation of pinned ones.
    fn invalidate_importers(&self, bo: BoId) {
        let k = &self.platform.kernel;
        if self.injection.get() == GpuInjection::SkipPeerInvalidation {
            k.sim.count("gpu.injected_skipped_invalidations", 1);
            return;
        }
        let mut dropped = Vec::new();
        let (mut notified, mut revoked) = (0, 0);
        {
            let mut st = self.bo.borrow_mut();
            let b = st.bos.get_mut(&bo).expect("checked by the caller");
            for imp in b.importers.values_mut() {
                match imp.kind {
                    ImporterKind::Dynamic => notified += 1,
                    ImporterKind::Pinned => {
                        if !imp.revoked {
                            revoked += 1;
                        }
                        imp.revoked = true;
                    }
                }
                if let Some(sg) = imp.sg.take() {
                    dropped.push((imp.dev, sg));
                }
            }
        }
        for (dev, mut sg) in dropped {
            let _ = self.platform.unmap_sg(dev, &mut sg);
        }
        k.sim.count("dmabuf.move_notify", notified);
        k.sim.count("dmabuf.revoked_importers", revoked);
    }
}

fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
    if len == 0
        || !offset.is_multiple_of(PAGE_SIZE)
        || !len.is_multiple_of(PAGE_SIZE)
        || offset.checked_add(len).is_none_or(|e| e > size)
    {
        return Err(GpuError::BadRange { offset, len, size });
    }
    Ok(())
}
