//! Memory regions: registration (pinned, ODP, implicit ODP, dma-buf of a BAR export or of a GPU buffer
//! object), deregistration, the NIC's access
//! path through an MR, and prefetch (drivers/infiniband/core/umem*.c, uverbs_cmd.c; mlx5 mr.c, odp.c).

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;

use peerdma_core::{Errno, PAGE_SIZE, Pid, Range, SimDuration, Va};
use peerdma_dma::{
    DeviceAddr, DmaOp, DmaRequest, DmaSgFlags, ImporterKind, RequestId, get_user_dma_sg,
};
use peerdma_mm::{DeviceGrant, MmioId};

use super::odp::OdpUmem;
use super::verbs::{Access, Advice, MrInfo, MrKeys, PdId, Sge};
use super::{
    IMPLICIT_CHILD_SIZE, Miss, Mr, MrBacking, PAGE_BYTES, Rnic, RnicError, TASK_SIZE, page_range,
};
impl Rnic {
    pub(super) fn insert_mr(
        &self,
        pd: PdId,
        pid: Pid,
        access: Access,
        range: Range<Va>,
        backing: MrBacking,
    ) -> MrKeys {
        let mut st = self.st.borrow_mut();
        st.next_key += 0x100;
        let key = st.next_key;
        st.mrs.insert(
            key,
            Rc::new(Mr {
                pd,
                pid,
                access,
                range,
                backing,
                failed: RefCell::default(),
                pending: Cell::new(0),
            }),
        );
        MrKeys {
            lkey: key,
            rkey: key,
        }
    }

    /// `ibv_reg_mr(pd, addr, len, access)`: pinned, ODP, or implicit ODP (`addr = 0, len = u64::MAX` with
    /// `ON_DEMAND`) by the flags (module docs, registration rules).
    ///
    /// # Errors
    /// `EINVAL`, `EOVERFLOW` by the rules; the long-term pin's errnos for a pinned MR.
    pub async fn reg_mr(
        &self,
        pd: PdId,
        addr: Va,
        len: u64,
        access: Access,
    ) -> Result<MrKeys, RnicError> {
        let pid = self.pd_pid(pd)?;
        if access.intersects(Access::REMOTE_WRITE | Access::REMOTE_ATOMIC)
            && !access.contains(Access::LOCAL_WRITE)
        {
            return Err(Errno::EINVAL.into());
        }
        let implicit = addr.raw() == 0 && len == u64::MAX;
        if access.contains(Access::ON_DEMAND) {
            if implicit {
                if access.contains(Access::HUGETLB) {
                    return Err(Errno::EINVAL.into());
                }
                let children = Rc::new(RefCell::new(BTreeMap::new()));
                self.count("rnic.reg_mr.implicit", 1);
                let range = Range::new(Va::from_raw(0), Va::from_raw(TASK_SIZE));
                return Ok(self.insert_mr(pd, pid, access, range, MrBacking::Implicit(children)));
            }
            let end = addr
                .raw()
                .checked_add(len)
                .and_then(|e| Va::from_raw(e).align_up(PAGE_SIZE))
                .ok_or(Errno::EOVERFLOW)?;
            let start = addr.align_down(PAGE_SIZE);
            if end <= start {
                return Err(Errno::EINVAL.into());
            }
            let range = Range::new(start, end);
            let umem = OdpUmem::new(
                &self.platform,
                &self.dev,
                pid,
                range,
                access.writable(),
                None,
            )?;
            self.count("rnic.reg_mr.odp", 1);
            // mlx5_ib_init_odp_mr: one snapshot pass maps the pages already present, faulting nothing.
            if self.snapshot(&umem, pid, range).await.is_err() {
                self.count("rnic.snapshot_errors", 1);
            }
            return Ok(self.insert_mr(pd, pid, access, range, MrBacking::Odp(umem)));
        }
        // ib_umem_get.
        let end = addr
            .raw()
            .checked_add(len)
            .and_then(|e| Va::from_raw(e).align_up(PAGE_SIZE))
            .ok_or(Errno::EINVAL)?;
        if len == 0 {
            return Err(Errno::EINVAL.into());
        }
        let range = Range::new(addr.align_down(PAGE_SIZE), end);
        let mut flags = DmaSgFlags::LONGTERM;
        if access.writable() {
            flags |= DmaSgFlags::WRITE;
        }
        let h = get_user_dma_sg(&self.platform, pid, range, self.dev.id, flags).await?;
        self.count("rnic.reg_mr.pinned", 1);
        Ok(self.insert_mr(pd, pid, access, range, MrBacking::Pinned(h)))
    }

    /// `ibv_reg_dmabuf_mr(pd, offset, len, iova = 0, fd, access)`: a dynamic importer of `len` bytes at
    /// `offset` of the BAR export `mmio`; the MR's addresses are `[0, len)`.
    ///
    /// # Errors
    /// `EINVAL` for a range outside the export or a bad access; the attach's errnos (`ENODEV`,
    /// `EREMOTEIO`).
    pub fn reg_dmabuf_mr(
        &self,
        pd: PdId,
        mmio: MmioId,
        offset: u64,
        len: u64,
        access: Access,
    ) -> Result<MrKeys, RnicError> {
        let pid = self.pd_pid(pd)?;
        if access.intersects(Access::REMOTE_WRITE | Access::REMOTE_ATOMIC)
            && !access.contains(Access::LOCAL_WRITE)
        {
            return Err(Errno::EINVAL.into());
        }
        let ex = self.platform.export_range(mmio).ok_or(Errno::ENODEV)?;
        let r = page_range(Va::from_raw(offset), len)?;
        if r.end.raw() > ex.len() {
            return Err(Errno::EINVAL.into());
        }
        let pas = (0..r.nr_pages())
            .map(|i| ex.start.add(offset + i * PAGE_SIZE))
            .collect();
        let att = self.platform.dmabuf_attach(
            mmio,
            self.dev.id,
            ImporterKind::Dynamic,
            pas,
            access.writable(),
        )?;
        self.count("rnic.reg_mr.dmabuf", 1);
        let range = Range::new(Va::from_raw(0), Va::from_raw(len));
        Ok(self.insert_mr(pd, pid, access, range, MrBacking::DmaBuf { mmio, att }))
    }

    /// `ibv_reg_dmabuf_mr` on the dma-buf a GPU exported for buffer object `bo` (`ib_umem_dmabuf_get`: a
    /// dynamic importer with `move_notify`, mapped now): `len` bytes from the buffer's start; the MR's
    /// addresses are `[0, len)`. Every move of the buffer zaps the MR's translations (its `move_notify`);
    /// the NIC's next access maps the buffer again where it is then ([`crate::gpu::Gpu::bo_dma`]).
    ///
    /// # Errors
    /// `EINVAL` for a bad access or a length beyond the buffer; [`RnicError::UnknownBo`];
    /// the attach's errnos (`EREMOTEIO` when the NIC cannot reach the window).
    pub async fn reg_gpu_bo_mr(
        &self,
        pd: PdId,
        gpu: &Rc<crate::gpu::Gpu>,
        bo: crate::gpu::BoId,
        len: u64,
        access: Access,
    ) -> Result<MrKeys, RnicError> {
        let pid = self.pd_pid(pd)?;
        if access.intersects(Access::REMOTE_WRITE | Access::REMOTE_ATOMIC)
            && !access.contains(Access::LOCAL_WRITE)
        {
            return Err(Errno::EINVAL.into());
        }
        let r = page_range(Va::from_raw(0), len)?;
        if r.end.raw() > gpu.bo_size(bo)? {
            return Err(Errno::EINVAL.into());
        }
        let att = gpu
            .bo_attach(bo, self.dev.id, ImporterKind::Dynamic, access.writable())
            .await?;
        self.count("rnic.reg_mr.dmabuf", 1);
        let range = Range::new(Va::from_raw(0), Va::from_raw(len));
        Ok(self.insert_mr(
            pd,
            pid,
            access,
            range,
            MrBacking::GpuBo {
                gpu: gpu.clone(),
                att,
            },
        ))
    }

    pub(super) fn mr(&self, key: u32) -> Result<Rc<Mr>, RnicError> {
        self.st
            .borrow()
            .mrs
            .get(&key)
            .cloned()
            .ok_or(RnicError::UnknownMr(key))
    }

    /// `ibv_dereg_mr`: unpins, or zaps and removes every ODP notifier, or detaches.
    ///
    /// # Errors
    /// [`RnicError::UnknownMr`].
    pub async fn dereg_mr(&self, lkey: u32) -> Result<(), RnicError> {
        let mr = self
            .st
            .borrow_mut()
            .mrs
            .remove(&lkey)
            .ok_or(RnicError::UnknownMr(lkey))?;
        let Ok(mr) = Rc::try_unwrap(mr) else {
            // A WR still uses it: its access ends with the MR gone from the table; the backing goes with
            // the last reference (coarse: Linux waits for the mkey's users).
            return Ok(());
        };
        match mr.backing {
            MrBacking::Pinned(h) => h.release().await,
            MrBacking::Odp(u) => {
                u.mirror.unmap_range(u.umem().range).await;
                u.mirror.remove().await;
                u.umem().free_map();
            }
            MrBacking::Implicit(children) => {
                let all: Vec<Rc<OdpUmem>> = std::mem::take(&mut *children.borrow_mut())
                    .into_values()
                    .collect();
                for c in all {
                    c.umem().dead.set(true);
                    c.mirror.unmap_range(c.umem().range).await;
                    c.mirror.remove().await;
                    c.umem().free_map();
                }
            }
            MrBacking::DmaBuf { mmio, att } => {
                let cost = self.platform.dmabuf_detach(mmio, att);
                self.k().spend(cost).await;
            }
            MrBacking::GpuBo { gpu, att } => gpu.bo_detach(att),
        }
        Ok(())
    }

    /// Returns a snapshot of MR `lkey`.
    ///
    /// # Errors
    /// [`RnicError::UnknownMr`].
    pub fn mr_info(&self, lkey: u32) -> Result<MrInfo, RnicError> {
        let mr = self.mr(lkey)?;
        let (nr_mapped, children) = match &mr.backing {
            MrBacking::Pinned(h) => (h.nr_pinned() as u64, Vec::new()),
            MrBacking::Odp(u) => (u.umem().entries.borrow().len() as u64, Vec::new()),
            MrBacking::Implicit(c) => {
                let c = c.borrow();
                (
                    c.values()
                        .map(|u| u.umem().entries.borrow().len() as u64)
                        .sum(),
                    c.keys()
                        .map(|s| Va::from_raw(s * IMPLICIT_CHILD_SIZE))
                        .collect(),
                )
            }
            MrBacking::DmaBuf { mmio, att } => (
                if self.platform.dmabuf_is_mapped(*mmio, *att) {
                    mr.range.nr_pages()
                } else {
                    0
                },
                Vec::new(),
            ),
            MrBacking::GpuBo { gpu, att } => (
                if gpu.bo_is_mapped(*att) {
                    mr.range.nr_pages()
                } else {
                    0
                },
                Vec::new(),
            ),
        };
        Ok(MrInfo {
            kind: mr.kind(),
            pd: mr.pd,
            access: mr.access,
            nr_mapped,
            children,
        })
    }

    /// Returns the umem that serves `va` of an ODP MR, creating an implicit child on demand.
    pub(super) fn umem_for(&self, mr: &Mr, va: Va) -> Result<Rc<OdpUmem>, Errno> {
        match &mr.backing {
            MrBacking::Odp(u) => Ok(u.clone()),
            MrBacking::Implicit(children) => {
                if va.raw() >= TASK_SIZE {
                    return Err(Errno::EFAULT);
                }
                let slot = va.raw() / IMPLICIT_CHILD_SIZE;
                if let Some(c) = children.borrow().get(&slot) {
                    return Ok(c.clone());
                }
                let start = Va::from_raw(slot * IMPLICIT_CHILD_SIZE);
                let range = Range::new(start, start.add(IMPLICIT_CHILD_SIZE));
                let c = OdpUmem::new(
                    &self.platform,
                    &self.dev,
                    mr.pid,
                    range,
                    mr.access.writable(),
                    Some((Rc::downgrade(children), slot)),
                )?;
                children.borrow_mut().insert(slot, c.clone());
                self.count("rnic.implicit_children_created", 1);
                Ok(c)
            }
            _ => Err(Errno::EINVAL),
        }
    }

    /// The NIC accesses `[va, va + pages)` of `mr` through its device path, one request per page:
    /// `data` is `Some` for a write. Returns the bytes read.
    ///
    /// An ODP page without a (writable) translation is faulted (`Miss::Fault`: `rnic.fault_service` plus
    /// the mirror's fault of the rest of the access inside the umem) or stops the access with `EAGAIN`
    /// (`Miss::Stop`). The MTT lookup and the issue of a page happen together, as the hardware does.
    pub(super) async fn access(
        &self,
        mr: &Mr,
        va: Va,
        pages: u64,
        data: Option<&[u8]>,
        miss: Miss,
    ) -> Result<Vec<u8>, Errno> {
        let write = data.is_some();
        let op = |i: u64| match data {
            Some(d) => {
                let o = usize::try_from(i * PAGE_SIZE).expect("fits");
                DmaOp::Write(d[o..o + PAGE_BYTES].to_vec())
            }
            None => DmaOp::Read,
        };
        match &mr.backing {
            MrBacking::Pinned(h) => {
                let off = va.offset_from(mr.range.start);
                return match data {
                    Some(d) => h
                        .write(off, d)
                        .await
                        .map(|()| Vec::new())
                        .map_err(|e| e.errno()),
                    None => h
                        .read(off, usize::try_from(pages * PAGE_SIZE).expect("fits"))
                        .await
                        .map_err(|e| e.errno()),
                };
            }
            MrBacking::DmaBuf { mmio, att } => {
                if !self.platform.dmabuf_is_mapped(*mmio, *att) {
                    // The MTTs were zapped by move_notify: this access faults and the mapping is rebuilt.
                    self.count("rnic.dmabuf_faults", 1);
                }
                let first = va.offset_from(mr.range.start) / PAGE_SIZE;
                let mut reqs = Vec::new();
                for i in 0..pages {
                    let idx = usize::try_from(first + i).expect("fits");
                    let addr = self.platform.dmabuf_page_addr(*mmio, *att, idx)?;
                    reqs.push(DmaRequest {
                        addr: DeviceAddr::Dma(addr),
                        grant: DeviceGrant::Raw,
                        op: op(i),
                    });
                }
                return self.platform.dma(&self.dev, reqs).await.into_result();
            }
            MrBacking::GpuBo { gpu, att } => {
                if !gpu.bo_is_mapped(*att) {
                    // The MTTs were zapped by move_notify: this access faults and the mapping is rebuilt
                    // at the buffer's current place (under the buffer's reservation lock).
                    self.count("rnic.dmabuf_faults", 1);
                }
                let off = va.offset_from(mr.range.start);
                return gpu
                    .bo_dma(*att, off, pages * PAGE_SIZE, data)
                    .await
                    .map_err(|e| RnicError::from(e).errno());
            }
            MrBacking::Odp(_) | MrBacking::Implicit(_) => {}
        }
        // ODP.
        let space = &self.dev.space;
        let mut issued: VecDeque<(u64, RequestId)> = VecDeque::new();
        let mut out = vec![
            0u8;
            if write {
                0
            } else {
                usize::try_from(pages * PAGE_SIZE).expect("fits")
            }
        ];
        let mut todo: VecDeque<u64> = (0..pages).collect();
        let mut result = Ok(());
        while let Some(i) = todo.pop_front() {
            let pva = va.add(i * PAGE_SIZE);
            // The device's tags.
            while space.nr_in_flight() >= space.max_outstanding() && !issued.is_empty() {
                let (j, id) = issued.pop_front().expect("non-empty");
                Self::land(&mut out, j, space.wait(id).await, &mut todo, &mut result);
            }
            let umem = match self.umem_for(mr, pva) {
                Ok(u) => u,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            let Some(addr) = umem.lookup(pva, write) else {
                if miss == Miss::Stop {
                    result = Err(Errno::EAGAIN);
                    break;
                }
                let end = va.add(pages * PAGE_SIZE).min(umem.umem().range.end);
                self.count("rnic.odp_faults", 1);
                self.k().sim.sleep(self.costs.fault_service).await;
                match umem.fault(Range::new(pva, end), write).await {
                    Ok(()) | Err(Errno::EAGAIN) => {}
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
                todo.push_front(i);
                continue;
            };
            let req = DmaRequest {
                addr: DeviceAddr::Dma(addr),
                grant: DeviceGrant::Mirror {
                    pid: mr.pid,
                    va: pva,
                },
                op: op(i),
            };
            match self.platform.dma_issue(&self.dev, req) {
                Ok(id) => issued.push_back((i, id)),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
            self.k().sim.sleep(SimDuration::ZERO).await;
        }
        // What was issued still lands.
        while let Some((j, id)) = issued.pop_front() {
            Self::land(&mut out, j, space.wait(id).await, &mut todo, &mut result);
        }
        if result.is_ok() && !todo.is_empty() {
            // Requests a fence aborted: issue them again.
            let again: Vec<u64> = todo.into_iter().collect();
            for i in again {
                let d = data.map(|d| &d[usize::try_from(i * PAGE_SIZE).expect("fits")..]);
                let d = d.map(|d| &d[..PAGE_BYTES]);
                let page = Box::pin(self.access(mr, va.add(i * PAGE_SIZE), 1, d, miss)).await?;
                if !write {
                    let o = usize::try_from(i * PAGE_SIZE).expect("fits");
                    out[o..o + PAGE_BYTES].copy_from_slice(&page);
                }
            }
        }
        result.map(|()| out)
    }

    pub(super) fn land(
        out: &mut [u8],
        i: u64,
        r: Result<Vec<u8>, Errno>,
        todo: &mut VecDeque<u64>,
        result: &mut Result<(), Errno>,
    ) {
        match r {
            Ok(page) => {
                if !page.is_empty() {
                    let o = usize::try_from(i * PAGE_SIZE).expect("fits");
                    out[o..o + PAGE_BYTES].copy_from_slice(&page);
                }
            }
            Err(Errno::EAGAIN) => todo.push_back(i),
            Err(e) => {
                if result.is_ok() {
                    *result = Err(e);
                }
            }
        }
    }

    /// `ibv_advise_mr(pd, advice, flags, sge[])`; `flush` makes it synchronous
    /// (`IB_UVERBS_ADVISE_MR_FLAG_FLUSH`) and returns the first error; otherwise the work runs in the
    /// background and its failures are only counted (`rnic.prefetch_errors`).
    ///
    /// # Errors
    /// Per SGE: `ENOENT` for an unknown key or a non-ODP MR, `EPERM` for another PD or a
    /// `PrefetchWrite` of a read-only MR, `EINVAL` for a bad range; with `flush`, the fault's errno.
    pub async fn advise_mr(
        self: &Rc<Self>,
        pd: PdId,
        advice: Advice,
        flush: bool,
        sges: &[Sge],
    ) -> Result<(), RnicError> {
        self.pd_pid(pd)?;
        let mut work = Vec::new();
        for s in sges {
            let mr = self.mr(s.lkey).map_err(|_| Errno::ENOENT)?;
            if !matches!(mr.backing, MrBacking::Odp(_) | MrBacking::Implicit(_)) {
                return Err(Errno::ENOENT.into());
            }
            if mr.pd != pd {
                return Err(Errno::EPERM.into());
            }
            if advice == Advice::PrefetchWrite && !mr.access.writable() {
                return Err(Errno::EPERM.into());
            }
            let r = page_range(s.addr, s.len)?;
            if !mr.range.contains_range(&r) {
                return Err(Errno::EINVAL.into());
            }
            work.push((mr, r));
        }
        self.count("rnic.prefetch", 1);
        if flush {
            for (mr, r) in work {
                self.prefetch(&mr, r, advice).await?;
            }
            return Ok(());
        }
        let me = self.clone();
        self.k()
            .sim
            .spawn(format!("rnic.{}.prefetch", self.dev.name), async move {
                for (mr, r) in work {
                    if me.prefetch(&mr, r, advice).await.is_err() {
                        me.count("rnic.prefetch_errors", 1);
                    }
                }
            });
        Ok(())
    }

    /// The snapshot mode of a fault (`MLX5_PF_FLAGS_SNAPSHOT`): maps, read-only, the runs of pages of `r`
    /// that the CPU page table already has and the NIC has not, faulting nothing in.
    pub(super) async fn snapshot(
        &self,
        umem: &OdpUmem,
        pid: Pid,
        r: Range<Va>,
    ) -> Result<(), Errno> {
        let wanted =
            |p: Va| self.k().translate(pid, p).is_some() && umem.lookup(p, false).is_none();
        let mut p = r.start;
        while p < r.end {
            if !wanted(p) {
                p = p.add(PAGE_SIZE);
                continue;
            }
            let start = p;
            while p < r.end && wanted(p) {
                p = p.add(PAGE_SIZE);
            }
            match umem.fault(Range::new(start, p), false).await {
                Ok(()) | Err(Errno::EAGAIN) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    pub(super) async fn prefetch(
        &self,
        mr: &Mr,
        r: Range<Va>,
        advice: Advice,
    ) -> Result<(), Errno> {
        let write = advice == Advice::PrefetchWrite;
        let mut va = r.start;
        while va < r.end {
            let umem = self.umem_for(mr, va)?;
            let end = r.end.min(umem.umem().range.end);
            if advice == Advice::PrefetchNoFault {
                self.snapshot(&umem, mr.pid, Range::new(va, end)).await?;
            } else {
                match umem.fault(Range::new(va, end), write).await {
                    Ok(()) | Err(Errno::EAGAIN) => {}
                    Err(e) => return Err(e),
                }
            }
            va = end;
        }
        Ok(())
    }
}
