//! One open file of the dmirror device (`struct dmirror`) and its ioctls: READ, WRITE, MIGRATE_TO_DEV /
//! TO_SYS, SNAPSHOT, EXCLUSIVE, CHECK_EXCLUSIVE, RELEASE (lib/test_hmm.c).

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use peerdma_core::{
    DeviceId, Errno, FrameId, PAGE_SHIFT, PAGE_SIZE, PMD_SHIFT, PUD_SHIFT, Pid, Range, Va,
};
use peerdma_dma::hmm_mirror::HmmMirror;
use peerdma_mm::hmm::{
    HMM_PFN_ERROR, HMM_PFN_VALID, HMM_PFN_WRITE, HmmRange, hmm_pfn_to_frame, hmm_pfn_to_map_order,
};
use peerdma_mm::migrate::{
    MIGRATE_PFN_COMPOUND, MIGRATE_PFN_MIGRATE, MIGRATE_PFN_VALID, MIGRATE_PFN_WRITE,
    MIGRATE_VMA_SELECT_COMPOUND, MIGRATE_VMA_SELECT_SYSTEM, migrate_pfn, migrate_pfn_to_frame,
};
use peerdma_mm::{DeviceData, MemoryKind, MigrateVma, NotifierEvent, NotifierId, VmFlags, Vma};
use peerdma_sim::{SimMutex, TraceArg, Track};

use super::device::{DmirrorDevice, PageOwner};
use super::tables::DevicePt;
use super::{
    CHUNK_PAGES, DmirrorMemory, DmirrorResult, EVICT_BATCH, FaultInjection, PtEntry, RANGE_TIMEOUT,
    Shared, SnapshotOps, Tag, errno_arg, prot,
};

/// One open file of a dmirror device (`struct dmirror`).
#[derive(Debug)]
pub struct Dmirror {
    pub(super) sh: Rc<Shared>,
    pub(super) memory: DmirrorMemory,
    pub(super) mirror: HmmMirror<Shared>,
    pub(super) closed: Cell<bool>,
    pub(super) fail_alloc: Cell<bool>,
}

impl Dmirror {
    /// Opens `device` from process `pid`: registers the mirror's notifier over the whole address space
    /// `[0, ULONG_MAX & PAGE_MASK)`.
    ///
    /// # Errors
    /// `EINVAL` when the process has exited.
    pub fn open(device: &Rc<DmirrorDevice>, pid: Pid) -> Result<Rc<Self>, Errno> {
        let kernel = &device.kernel;
        let sh = Rc::new(Shared {
            kernel: kernel.clone(),
            device: device.clone(),
            dev: device.id,
            pid,
            lock: SimMutex::new(&kernel.sim, "dmirror.mutex"),
            pt: RefCell::new(DevicePt::default()),
            costs: device.costs.clone(),
            injection: Cell::new(FaultInjection::None),
            events: RefCell::new(Vec::new()),
        });
        let mirror = HmmMirror::register(
            sh.clone(),
            Va::from_raw(0),
            !(PAGE_SIZE - 1), // ULONG_MAX & PAGE_MASK
        )?;
        Ok(Rc::new(Self {
            sh,
            memory: device.memory,
            mirror,
            closed: Cell::new(false),
            fail_alloc: Cell::new(false),
        }))
    }

    /// Returns the device this file is open on.
    pub fn device(&self) -> DeviceId {
        self.sh.dev
    }

    /// Returns the memory flavour.
    pub fn memory(&self) -> DmirrorMemory {
        self.memory
    }

    /// Injects a driver bug (tests of the oracle only).
    pub fn inject(&self, f: FaultInjection) {
        self.sh.injection.set(f);
    }

    /// Returns the process whose address space this file mirrors: the opener's, also when the file is
    /// used from a child that inherited it across `fork` (the notifier was registered on the opener's mm).
    pub fn opener(&self) -> Pid {
        self.sh.pid
    }

    /// Returns every MMU notifier event the mirror has acted on (erased its range for), in order; the
    /// driver's own MIGRATE events, which it ignores, are not among them.
    pub fn events(&self) -> Vec<NotifierEvent> {
        self.sh.events.borrow().clone()
    }

    /// Returns the number of entries in the device page table.
    pub fn nr_mirrored(&self) -> usize {
        self.sh.pt.borrow().len()
    }

    /// Returns whether the device page table has an entry for the page at `va`.
    pub fn maps(&self, va: Va) -> bool {
        self.sh.pt.borrow().contains(va.page_number())
    }

    /// Returns the device page-table entries in address order: `(va, frame, writable)`, `writable` for
    /// WRITE and ATOMIC entries (introspection, for tests of what a mirror may hold).
    pub fn entries(&self) -> Vec<(Va, FrameId, bool)> {
        self.sh
            .pt
            .borrow()
            .iter()
            .map(|(vpn, e)| (Va::from_raw(vpn << PAGE_SHIFT), e.frame, e.tag != Tag::Read))
            .collect()
    }

    /// Closes the file: removes the notifier (waiting for a running invalidation) and drops the mirror.
    pub async fn close(&self) {
        if self.closed.replace(true) {
            return;
        }
        self.mirror.remove().await;
        self.sh.pt.borrow_mut().clear();
    }

    /// Validates `addr`/`npages` (spec §2.4) and returns the range.
    pub(super) fn check(&self, addr: Va, npages: u64) -> Result<Range<Va>, Errno> {
        if self.closed.get() || !addr.is_page_aligned() || npages == 0 {
            return Err(Errno::EINVAL);
        }
        let len = npages.checked_mul(PAGE_SIZE).ok_or(Errno::EINVAL)?;
        let r = Range::from_len(addr, len).ok_or(Errno::EINVAL)?;
        if !self.sh.kernel.is_alive(self.sh.pid) {
            return Err(Errno::EINVAL);
        }
        Ok(r)
    }

    /// HMM_DMIRROR_READ: the device reads `npages` at `addr`, faulting what its page table lacks.
    pub async fn read(&self, addr: Va, npages: u64) -> Result<DmirrorResult, Errno> {
        let k = &self.sh.kernel;
        k.spend(self.sh.costs.ioctl).await;
        let r = self.check(addr, npages)?;
        let mut bounce = vec![0u8; usize::try_from(r.len()).map_err(|_| Errno::ENOMEM)?];
        let mut res = DmirrorResult::default();
        let mut start = r.start;
        loop {
            let done = {
                let _g = self.sh.lock.lock().await;
                self.do_read(r, start, &mut bounce, &mut res.cpages)
            };
            self.dma_time(res.cpages).await;
            if done {
                break;
            }
            start = r.start.add(res.cpages * PAGE_SIZE);
            self.fault(Range::new(start, r.end), false).await?;
            res.faults += 1;
        }
        res.data = bounce;
        k.sim.count("dmirror.read", 1);
        Ok(res)
    }

    /// Copies pages from `start` while `pt` has entries; returns whether the whole range was read.
    pub(super) fn do_read(
        &self,
        r: Range<Va>,
        start: Va,
        bounce: &mut [u8],
        cpages: &mut u64,
    ) -> bool {
        let pt = self.sh.pt.borrow();
        for va in Range::new(start, r.end).pages() {
            let Some(e) = pt.get(va.page_number()) else {
                return false;
            };
            let off = usize::try_from(va.raw() - r.start.raw()).expect("inside the bounce buffer");
            self.sh.device.space.copy(
                &self.sh.translation(va, e),
                DeviceData::Read(&mut bounce[off..off + 4096]),
            );
            *cpages += 1;
        }
        true
    }

    /// HMM_DMIRROR_WRITE: the device writes `data` (`npages` pages) at `addr`, write-faulting as needed.
    pub async fn write(&self, addr: Va, npages: u64, data: &[u8]) -> Result<DmirrorResult, Errno> {
        let k = &self.sh.kernel;
        k.spend(self.sh.costs.ioctl).await;
        let r = self.check(addr, npages)?;
        if data.len() as u64 != r.len() {
            return Err(Errno::EINVAL);
        }
        let mut res = DmirrorResult::default();
        let mut start = r.start;
        loop {
            let done = {
                let _g = self.sh.lock.lock().await;
                self.do_write(r, start, data, &mut res.cpages)
            };
            self.dma_time(res.cpages).await;
            if done {
                break;
            }
            start = r.start.add(res.cpages * PAGE_SIZE);
            self.fault(Range::new(start, r.end), true).await?;
            res.faults += 1;
        }
        k.sim.count("dmirror.write", 1);
        Ok(res)
    }

    pub(super) fn do_write(&self, r: Range<Va>, start: Va, data: &[u8], cpages: &mut u64) -> bool {
        let pt = self.sh.pt.borrow();
        for va in Range::new(start, r.end).pages() {
            let Some(e) = pt.get(va.page_number()) else {
                return false;
            };
            if e.tag == Tag::Read {
                return false;
            }
            let off = usize::try_from(va.raw() - r.start.raw()).expect("inside the data");
            self.sh.device.space.copy(
                &self.sh.translation(va, e),
                DeviceData::Write(&data[off..off + 4096]),
            );
            *cpages += 1;
        }
        true
    }

    pub(super) async fn dma_time(&self, pages: u64) {
        self.sh
            .kernel
            .spend(self.sh.costs.dma_page.saturating_mul(pages))
            .await;
    }

    /// `dmirror_fault`: faults `r` in 64-page chunks through the shared mirror loop
    /// ([`HmmMirror::range_fault`], `dmirror_range_fault`).
    pub(super) async fn fault(&self, r: Range<Va>, write: bool) -> Result<(), Errno> {
        let k = &self.sh.kernel;
        k.sim.count("dmirror.faults", 1);
        let track = Track::device(self.sh.device.space.name());
        let mut span = k.sim.span("device.fault", track.clone(), || {
            vec![
                ("va", TraceArg::Hex(r.start.raw())),
                ("pages", (r.len() / PAGE_SIZE).into()),
                ("write", write.into()),
            ]
        });
        let nr = k.sim.counter("dmirror.faults");
        k.sim.gauge(
            track.clone(),
            "device.faults",
            i64::try_from(nr).unwrap_or(i64::MAX),
        );
        let flow = k.sim.flow_begin("device.fault", track);
        let mut addr = r.start;
        let mut res = Ok(());
        while addr < r.end {
            let next = addr.add(CHUNK_PAGES * PAGE_SIZE).min(r.end);
            res = self.mirror.range_fault(Range::new(addr, next), write).await;
            if res.is_err() {
                break;
            }
            addr = next;
        }
        // The fault resolves in the faulting thread's context (hmm_range_fault ran there).
        k.sim.flow_end(flow, Track::Agent);
        span.add_end_args(|| vec![("result", errno_arg(res))]);
        res
    }

    /// HMM_DMIRROR_MIGRATE_TO_DEV: migrates `npages` at `addr` into this device's memory, then reads the
    /// range from the device page table without faulting (`-ENOENT` if any page is not there).
    pub async fn migrate_to_dev(&self, addr: Va, npages: u64) -> Result<DmirrorResult, Errno> {
        let k = &self.sh.kernel;
        let _span = k.sim.span(
            "migrate.to_device",
            Track::device(self.sh.device.space.name()),
            || vec![("va", TraceArg::Hex(addr.raw())), ("pages", npages.into())],
        );
        k.spend(self.sh.costs.ioctl).await;
        let r = self.check(addr, npages)?;
        let dev = &self.sh.device;
        // test_hmm.c programs the device page table from the migration's arrays before finalize
        // (`dmirror_migrate_finalize_and_map`). That is racy: a MADV_DONTNEED that zaps the chunk's migration
        // entries after setup makes finalize free a destination page already programmed (test_hmm.c's third
        // race; no sequence read after setup can see it, as the zap may end before the read). A driver that
        // invalidates its own migrations maps the range afterwards through its ordinary fault path
        // instead (hmm_range_fault with its own device-private pages, the sequence check under the driver
        // lock), as drivers that mirror after migrating do (nouveau, amdgpu).
        let program = !dev.invalidate_own.get();
        {
            let lock = k.mmap_lock(self.sh.pid);
            let _m = lock.read().await;
            let mut addr = r.start;
            while addr < r.end {
                let vma = self.readable_vma(addr)?;
                // The THP version sizes its arrays for a whole PMD; chunks follow PMD boundaries so a THP lies
                // inside one chunk.
                let next = addr
                    .align_down(peerdma_core::PMD_SIZE)
                    .add(peerdma_core::PMD_SIZE)
                    .min(r.end)
                    .min(vma.range.end);
                let mut m = MigrateVma::new(
                    self.sh.pid,
                    Range::new(addr, next),
                    // FAIL_ALLOC is one-shot: the large allocation fails, so this chunk migrates base pages.
                    if self.fail_alloc.replace(false) {
                        MIGRATE_VMA_SELECT_SYSTEM
                    } else {
                        MIGRATE_VMA_SELECT_SYSTEM | MIGRATE_VMA_SELECT_COMPOUND
                    },
                    dev.id,
                );
                k.migrate_vma_setup(&mut m).await?;
                let mut copied = 0;
                for i in 0..m.src.len() {
                    if m.src[i] & MIGRATE_PFN_MIGRATE == 0 {
                        continue;
                    }
                    let src = migrate_pfn_to_frame(m.src[i]);
                    if src.is_some_and(|f| !matches!(k.memory_kind(f), MemoryKind::Ram { .. })) {
                        continue;
                    }
                    if m.src[i] & MIGRATE_PFN_COMPOUND != 0 {
                        // A whole THP: a 2 MiB block of device memory (declined if none is free).
                        let mut head = k.alloc_pmd_page(dev.region.get());
                        if head.is_none() {
                            dev.evict_oldest(512).await;
                            head = k.alloc_pmd_page(dev.region.get());
                        }
                        let (Some(head), Some(src)) = (head, src) else {
                            continue;
                        };
                        for j in 0..512 {
                            k.copy_page(FrameId(src.0 + j), FrameId(head.0 + j));
                        }
                        copied += 512;
                        m.dst[i] = migrate_pfn(head)
                            | MIGRATE_PFN_COMPOUND
                            | (m.src[i] & MIGRATE_PFN_WRITE);
                        continue;
                    }
                    let dst = if let Some(d) = k.alloc_page(dev.region.get()) {
                        d
                    } else {
                        // Device memory is full: evict the oldest device pages, then try again.
                        dev.evict_oldest(EVICT_BATCH).await;
                        let Some(d) = k.alloc_page(dev.region.get()) else {
                            continue;
                        };
                        d
                    };
                    if let Some(src) = src {
                        k.copy_page(src, dst);
                        copied += 1;
                    }
                    let write = m.src[i] & MIGRATE_PFN_WRITE != 0
                        || (src.is_none() && vma.flags.contains(VmFlags::WRITE));
                    m.dst[i] = migrate_pfn(dst) | if write { MIGRATE_PFN_WRITE } else { 0 };
                }
                k.spend(self.sh.costs.dma_page.saturating_mul(copied)).await;
                k.migrate_vma_pages(&mut m).await;
                {
                    let _g = self.sh.lock.lock().await;
                    let mut pt = self.sh.pt.borrow_mut();
                    let mut owners = dev.owners.borrow_mut();
                    let mut lru = dev.lru.borrow_mut();
                    for i in 0..m.src.len() {
                        if m.src[i] & MIGRATE_PFN_MIGRATE == 0 {
                            continue;
                        }
                        let Some(dst) = migrate_pfn_to_frame(m.dst[i]) else {
                            continue;
                        };
                        let tag = if m.dst[i] & MIGRATE_PFN_WRITE != 0 {
                            Tag::Write
                        } else {
                            Tag::Read
                        };
                        let nr = if m.dst[i] & MIGRATE_PFN_COMPOUND != 0 {
                            512
                        } else {
                            1
                        };
                        for j in 0..nr {
                            let (frame, va) = (FrameId(dst.0 + j), m.va(i).add(j * PAGE_SIZE));
                            if program {
                                let generation = k.frame_generation(frame).unwrap_or(0);
                                pt.insert(
                                    va.page_number(),
                                    PtEntry {
                                        frame,
                                        generation,
                                        tag,
                                    },
                                );
                            }
                            let owner = PageOwner {
                                fd: Rc::downgrade(&self.sh),
                            };
                            owners.insert(frame, owner);
                            lru.push_back(frame);
                        }
                    }
                }
                k.migrate_vma_finalize(&mut m);
                addr = next;
            }
        }
        if !program {
            // What the range holds now, mapped through the fault path; a page it cannot map (unmapped
            // since) is missing from the device page table, and the read-back below says ENOENT.
            let _ = self.fault(r, false).await;
        }
        let res = self.read_back(r, npages).await?;
        k.sim.count("dmirror.migrate_to_dev", 1);
        Ok(res)
    }

    /// Reads the whole range from the device page table without faulting (the tail of MIGRATE_TO_DEV and
    /// EXCLUSIVE): `ENOENT` if any page is missing.
    pub(super) async fn read_back(
        &self,
        r: Range<Va>,
        npages: u64,
    ) -> Result<DmirrorResult, Errno> {
        let mut bounce = vec![0u8; usize::try_from(r.len()).map_err(|_| Errno::ENOMEM)?];
        let mut cpages = 0;
        let done = {
            let _g = self.sh.lock.lock().await;
            self.do_read(r, r.start, &mut bounce, &mut cpages)
        };
        if !done {
            return Err(Errno::ENOENT);
        }
        Ok(DmirrorResult {
            cpages: npages,
            faults: 0,
            data: bounce,
        })
    }

    /// Returns the VMA at `addr` if it is readable: the per-chunk check of the migrate commands
    /// (`vma_lookup` + VM_READ, `EINVAL` otherwise — it also rejects holes).
    pub(super) fn readable_vma(&self, addr: Va) -> Result<Vma, Errno> {
        let vma = self.sh.kernel.vma_at(self.sh.pid, addr);
        vma.filter(|v| v.flags.contains(VmFlags::READ))
            .ok_or(Errno::EINVAL)
    }

    /// HMM_DMIRROR_MIGRATE_TO_SYS: migrates this device's pages in the range back to system memory;
    /// `cpages` counts the pages migrated.
    pub async fn migrate_to_sys(&self, addr: Va, npages: u64) -> Result<DmirrorResult, Errno> {
        let k = &self.sh.kernel;
        let _span = k.sim.span(
            "migrate.to_ram",
            Track::device(self.sh.device.space.name()),
            || vec![("va", TraceArg::Hex(addr.raw())), ("pages", npages.into())],
        );
        k.spend(self.sh.costs.ioctl).await;
        let r = self.check(addr, npages)?;
        let dev = &self.sh.device;
        let lock = k.mmap_lock(self.sh.pid);
        let _m = lock.read().await;
        let mut res = DmirrorResult::default();
        let mut addr = r.start;
        while addr < r.end {
            let vma = self.readable_vma(addr)?;
            let next = addr
                .add(CHUNK_PAGES * PAGE_SIZE)
                .min(r.end)
                .min(vma.range.end);
            let mut m = MigrateVma::new(
                self.sh.pid,
                Range::new(addr, next),
                dev.select_flag(),
                dev.id,
            );
            k.migrate_vma_setup(&mut m).await?;
            k.reclaim_if_low_for(self.sh.pid).await;
            let n = dev.copy_to_sys(&mut m);
            k.spend(self.sh.costs.dma_page.saturating_mul(n)).await;
            k.migrate_vma_pages(&mut m).await;
            res.cpages += m
                .src
                .iter()
                .filter(|&&w| {
                    w & (MIGRATE_PFN_VALID | MIGRATE_PFN_MIGRATE)
                        == MIGRATE_PFN_VALID | MIGRATE_PFN_MIGRATE
                })
                .count() as u64;
            k.migrate_vma_finalize(&mut m);
            addr = next;
        }
        k.sim.count("dmirror.migrate_to_sys", 1);
        Ok(res)
    }

    /// HMM_DMIRROR_EXCLUSIVE: makes every page of the range device-exclusive (`make_device_exclusive` with
    /// no owner, so this mirror's own invalidation clears the old entry) and maps it ATOMIC, then reads the
    /// range from the device page table.
    pub async fn exclusive(&self, addr: Va, npages: u64) -> Result<DmirrorResult, Errno> {
        let k = &self.sh.kernel;
        k.spend(self.sh.costs.ioctl).await;
        let r = self.check(addr, npages)?;
        {
            let lock = k.mmap_lock(self.sh.pid);
            let _m = lock.read().await;
            for va in r.pages() {
                let frame = k.make_device_exclusive(self.sh.pid, va, None).await?;
                let _g = self.sh.lock.lock().await;
                self.sh.pt.borrow_mut().insert(
                    va.page_number(),
                    PtEntry {
                        frame,
                        generation: self.sh.kernel.frame_generation(frame).unwrap_or(0),
                        tag: Tag::Atomic,
                    },
                );
            }
        }
        let res = self.read_back(r, npages).await?;
        k.sim.count("dmirror.exclusive", 1);
        Ok(res)
    }

    /// HMM_DMIRROR_CHECK_EXCLUSIVE: `EPERM` if any page of the range is still mapped ATOMIC.
    pub async fn check_exclusive(&self, addr: Va, npages: u64) -> Result<DmirrorResult, Errno> {
        self.sh.kernel.spend(self.sh.costs.ioctl).await;
        let r = self.check(addr, npages)?;
        let _g = self.sh.lock.lock().await;
        let pt = self.sh.pt.borrow();
        let atomic = pt
            .range(r.start.page_number(), r.end.page_number())
            .any(|(_, e)| e.tag == Tag::Atomic);
        if atomic {
            Err(Errno::EPERM)
        } else {
            Ok(DmirrorResult::default())
        }
    }

    /// HMM_DMIRROR_FLAGS with HMM_DMIRROR_FLAG_FAIL_ALLOC: the next large (THP) allocation fails. The model
    /// migrates base pages only, so the flag never finds a large allocation to fail; it is recorded and reported.
    pub fn set_flags(&self, fail_alloc: bool) {
        self.fail_alloc.set(fail_alloc);
        self.sh.kernel.sim.count("dmirror.flags", 1);
    }

    /// HMM_DMIRROR_RELEASE: evicts all of this device's memory (for every open file) back to system memory.
    pub async fn release(&self) -> Result<DmirrorResult, Errno> {
        self.sh.kernel.spend(self.sh.costs.ioctl).await;
        if self.closed.get() {
            return Err(Errno::EINVAL);
        }
        self.sh.device.evict_all().await;
        self.sh.kernel.sim.count("dmirror.release", 1);
        Ok(DmirrorResult::default())
    }

    /// HMM_DMIRROR_SNAPSHOT: one byte per page describing the CPU mapping, without faulting.
    pub async fn snapshot(&self, addr: Va, npages: u64) -> Result<DmirrorResult, Errno> {
        let k = &self.sh.kernel;
        k.spend(self.sh.costs.ioctl).await;
        let r = self.check(addr, npages)?;
        let mut res = DmirrorResult::default();
        let mut start = r.start;
        while start < r.end {
            let next = start.add(CHUNK_PAGES * PAGE_SIZE).min(r.end);
            let chunk = Range::new(start, next);
            let id = k.interval_notifier_insert(
                self.sh.pid,
                chunk.start,
                chunk.len(),
                Rc::new(SnapshotOps(self.sh.clone())),
            )?;
            let out = self.snapshot_chunk(id, chunk).await;
            k.interval_notifier_remove(self.sh.pid, id).await;
            let bytes = out?;
            res.cpages += bytes.len() as u64;
            res.data.extend(bytes);
            start = next;
        }
        k.sim.count("dmirror.snapshot", 1);
        Ok(res)
    }

    pub(super) async fn snapshot_chunk(
        &self,
        id: NotifierId,
        chunk: Range<Va>,
    ) -> Result<Vec<u8>, Errno> {
        let k = &self.sh.kernel;
        let deadline = k.sim.now() + RANGE_TIMEOUT;
        let lock = k.mmap_lock(self.sh.pid);
        let mut range = HmmRange::new(self.sh.pid, id, 0, chunk, 0);
        range.dev_private_owner = Some(self.sh.dev);
        loop {
            if k.sim.now() > deadline {
                return Err(Errno::EBUSY);
            }
            range.notifier_seq = k.interval_read_begin(self.sh.pid, id).await;
            let ret = {
                let _m = lock.read().await;
                k.hmm_range_fault(&mut range).await
            };
            match ret {
                Err(Errno::EBUSY) => continue,
                Err(e) => return Err(e),
                Ok(()) => {}
            }
            let _g = self.sh.lock.lock().await;
            if k.interval_read_retry(self.sh.pid, id, range.notifier_seq) {
                continue;
            }
            let zero = k.zero_page();
            return Ok(range
                .hmm_pfns
                .iter()
                .map(|&w| {
                    let kind = if w & HMM_PFN_VALID != 0 {
                        k.memory_kind(hmm_pfn_to_frame(w))
                    } else {
                        MemoryKind::Ram { node: 0 }
                    };
                    self.mkentry(w, zero, kind)
                })
                .collect());
        }
    }

    /// `dmirror_mkentry`: the snapshot byte for one pfn word.
    pub(super) fn mkentry(&self, w: u64, zero: FrameId, kind: MemoryKind) -> u8 {
        if w & HMM_PFN_ERROR != 0 {
            return prot::ERROR;
        }
        if w & HMM_PFN_VALID == 0 {
            return prot::NONE;
        }
        let frame = hmm_pfn_to_frame(w);
        let mut b = match kind {
            MemoryKind::DevicePrivate { owner } if owner == self.sh.dev => prot::DEV_PRIVATE_LOCAL,
            MemoryKind::DevicePrivate { .. } => prot::DEV_PRIVATE_REMOTE,
            MemoryKind::DeviceCoherent { owner } if owner == self.sh.dev => {
                prot::DEV_COHERENT_LOCAL
            }
            MemoryKind::DeviceCoherent { .. } => prot::DEV_COHERENT_REMOTE,
            MemoryKind::Ram { .. } if frame == zero => prot::ZERO,
            MemoryKind::Ram { .. } | MemoryKind::FsDax { .. } | MemoryKind::P2pMem { .. } => {
                prot::NONE
            }
        };
        b |= if w & HMM_PFN_WRITE != 0 {
            prot::WRITE
        } else {
            prot::READ
        };
        let shift = hmm_pfn_to_map_order(w) + PAGE_SHIFT;
        if shift == PMD_SHIFT {
            b |= prot::PMD;
        } else if shift == PUD_SHIFT {
            b |= prot::PUD;
        }
        b
    }
}
