//! CPU faults and CPU access to user memory: `load` / `store` (and `copy_from_user` / `copy_to_user`)
//! walk the page table and fault on a miss; `handle_mm_fault` dispatches on the entry it finds (none:
//! `do_missing_page` — anonymous, shmem/file, hugetlb and THP faults; swap: swap-in; migration: wait;
//! device-private: `migrate_to_ram`; write to a read-only present page: `do_wp_page`, the COW rules with
//! the pinned-page and exclusive-anon reuse checks); zapping a range of the page table (`zap_range`).
//!
//! Linux counterpart: mm/memory.c (`handle_mm_fault`, `do_anonymous_page`, `do_fault`, `do_wp_page`,
//! `do_swap_page`, `zap_pte_range`), mm/huge_memory.c (`do_huge_pmd_anonymous_page`) and mm/hugetlb.c
//! (`hugetlb_fault`); spec/linux-hmm.md §1.6 for the device-private fault.

use peerdma_core::{Errno, FrameId, PAGE_SIZE, PMD_SIZE, PageSize, Pid, Range, Va};

use peerdma_sim::{TraceArg, Track};

use crate::kernel::{FaultResult, Kernel, Mms, SigInfo, ThpPolicy};
use crate::mmu_notifier::NotifierEvent;
use crate::oracle::{LogicalPage, Oracle, ViolationKind};
use crate::pagetable::{Leaf, Pte};
use crate::phys::{FRAMES_PER_PMD, FrameOwner, GfpZone, PhysMem};
use crate::vma::{VmFlags, Vma, VmaBacking};
use crate::vmscan::Swap;

pub(crate) enum Access<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
    /// A write of `len` bytes produced a page at a time: `fill(pos, chunk)` writes the bytes at positions
    /// `pos..pos + chunk.len()` of the whole write into `chunk` (zeroed first), so no buffer of the whole
    /// write exists.
    Fill {
        len: usize,
        fill: &'a mut dyn FnMut(usize, &mut [u8]),
    },
}

impl Access<'_> {
    pub(crate) fn len(&self) -> usize {
        match self {
            Access::Read(b) => b.len(),
            Access::Write(d) => d.len(),
            Access::Fill { len, .. } => *len,
        }
    }
}

impl Kernel {
    /// `__split_huge_pmd` (mm/huge_memory.c): splits the PMD leaf covering `va`, if any, into 512 PTEs inside
    /// an MMU_NOTIFY_CLEAR invalidation of its whole 2 MiB — so a mirror drops the entries of the part an
    /// operation does not touch too. Returns whether a leaf was split.
    pub(crate) async fn split_huge_pmd(&self, pid: Pid, va: Va) -> bool {
        let leaf = self.mms().mm(pid).pt().lookup(va);
        let Some(leaf) = leaf.filter(|l| l.size == PageSize::Size2M) else {
            return false;
        };
        let huge = Range::from_len(leaf.base, PMD_SIZE).expect("a mapped PMD leaf fits");
        self.invalidate_range_start(pid, huge, NotifierEvent::Clear, None)
            .await;
        self.mms().mm_mut(pid).pt_mut().split_pmd(leaf.base);
        self.invalidate_range_end(pid);
        true
    }

    /// Splits (with [`Kernel::split_huge_pmd`]) every PMD leaf that `r` cuts: one that covers `r.start` or
    /// `r.end` without starting there (`split_huge_pmd_address` at a VMA split, `zap_pmd_range` of part of
    /// a PMD).
    pub(crate) async fn split_huge_pmds_cut_by(&self, pid: Pid, r: Range<Va>) {
        for edge in [r.start, r.end] {
            let cut = self
                .mms()
                .mm(pid)
                .pt()
                .lookup(edge)
                .is_some_and(|l| l.size == PageSize::Size2M && l.base != edge);
            if cut {
                self.split_huge_pmd(pid, edge).await;
            }
        }
    }

    /// CPU load of `buf.len()` bytes at `addr` (faulting pages in as needed).
    pub async fn load(&self, pid: Pid, addr: Va, buf: &mut [u8]) -> Result<(), SigInfo> {
        self.cpu_access(pid, addr, Access::Read(buf)).await
    }

    /// CPU store of `data` at `addr`.
    pub async fn store(&self, pid: Pid, addr: Va, data: &[u8]) -> Result<(), SigInfo> {
        self.cpu_access(pid, addr, Access::Write(data)).await
    }

    /// CPU store of `len` bytes at `addr` whose contents `fill` produces a page at a time: `fill(pos, chunk)`
    /// writes the bytes at positions `pos..pos + chunk.len()` of the store into `chunk` (zeroed first). The
    /// same store as [`Kernel::store`] of the whole buffer — same faults, same lock, same time — without
    /// the buffer: a streamed write holds at most one page of host memory.
    pub async fn store_with(
        &self,
        pid: Pid,
        addr: Va,
        len: usize,
        fill: &mut dyn FnMut(usize, &mut [u8]),
    ) -> Result<(), SigInfo> {
        self.cpu_access(pid, addr, Access::Fill { len, fill }).await
    }

    pub(crate) async fn cpu_access(
        &self,
        pid: Pid,
        addr: Va,
        mut access: Access<'_>,
    ) -> Result<(), SigInfo> {
        let lock = self.mmap_lock(pid);
        let _g = lock.read().await;
        let len = access.len();
        let write = !matches!(access, Access::Read(_));
        let mut pos = 0usize;
        let mut pages = 0u64;
        let mut chunk = [0u8; 4096];
        while pos < len {
            let va = addr.checked_add(pos as u64).ok_or(SigInfo::segv(addr))?;
            let in_page = usize::try_from(va.page_offset()).expect("< 4096");
            let n = (4096 - in_page).min(len - pos);
            let page = va.align_down(PAGE_SIZE);
            // The bytes a write puts in this page.
            let src: &[u8] = match &mut access {
                Access::Read(_) => &[],
                Access::Write(data) => {
                    let data: &[u8] = data;
                    &data[pos..pos + n]
                }
                Access::Fill { fill, .. } => {
                    chunk[..n].fill(0);
                    fill(pos, &mut chunk[..n]);
                    &chunk[..n]
                }
            };
            loop {
                let hit = {
                    let st = self.mms();
                    let mut phys = self.phys();
                    let mut p2p = self.p2p();
                    let mut oracle = self.oracle();
                    let allowed = st.mm(pid).vma(page).is_some_and(|v| {
                        if write {
                            v.flags.contains(VmFlags::WRITE)
                        } else {
                            v.flags.contains(VmFlags::READ)
                        }
                    });
                    // One walk serves both kinds of entry the access can go through.
                    let leaf = st.mm(pid).pt().lookup(page);
                    let pfn_leaf = leaf.filter(|l| matches!(l.pte, Pte::Pfn { .. }));
                    if let Some(leaf) = pfn_leaf {
                        // A raw PFN entry: the access goes to MMIO bytes, not a frame.
                        let Pte::Pfn { pfn, write: w } = leaf.pte else {
                            unreachable!("filtered above")
                        };
                        if allowed && (w || !write) {
                            let pa = peerdma_core::Pa::from_raw(
                                pfn * PAGE_SIZE + (page.raw() - leaf.base.raw()) + in_page as u64,
                            );
                            let ok = match &mut access {
                                Access::Read(buf) => {
                                    p2p.mmio_read_bytes(pa, &mut buf[pos..pos + n])
                                }
                                Access::Write(_) | Access::Fill { .. } => {
                                    p2p.mmio_write_bytes(pa, src)
                                }
                            };
                            if !ok {
                                return Err(SigInfo::bus(va));
                            }
                            true
                        } else {
                            false
                        }
                    } else {
                        // `AddressSpace::translate` of the entry walked above.
                        let present = leaf.and_then(|l| match l.pte {
                            Pte::Present { write: w, .. } => Some((l.frame_at(page)?, w)),
                            _ => None,
                        });
                        match present {
                            Some((frame, w)) if allowed && (w || !write) => {
                                // The MMU sets the PTE young bit (crate::vmscan: one bit per frame).
                                phys.frame_mut(frame).accessed = true;
                                match &mut access {
                                    Access::Read(buf) => {
                                        st.oracle_check_cpu(
                                            &mut oracle,
                                            &phys,
                                            pid,
                                            page,
                                            frame,
                                            false,
                                        );
                                        phys.read(frame, in_page, &mut buf[pos..pos + n]);
                                    }
                                    Access::Write(_) | Access::Fill { .. } => {
                                        phys.write(frame, in_page, src);
                                        st.oracle_check_cpu(
                                            &mut oracle,
                                            &phys,
                                            pid,
                                            page,
                                            frame,
                                            true,
                                        );
                                    }
                                }
                                true
                            }
                            _ => false,
                        }
                    }
                };
                if hit {
                    break;
                }
                self.handle_mm_fault(pid, page, write).await?;
            }
            pos += n;
            pages += 1;
        }
        self.spend(self.costs.page_access.saturating_mul(pages))
            .await;
        Ok(())
    }

    /// `anon_vma_prepare`: once an anonymous page (not the shared zero page) backs `va` in a private
    /// mapping, its VMA has an anon_vma ([`VmFlags::ANON_VMA`]) for good.
    pub(crate) fn note_anon_vma(&self, pid: Pid, va: Va) {
        let mut st = self.mms();
        // A shared VMA never gets one, and one that has it keeps it (every fault after the first of a
        // VMA): nothing to look at.
        let Some(start) = st
            .mm(pid)
            .vma(va)
            .filter(|v| !v.is_shared() && !v.flags.contains(VmFlags::ANON_VMA))
            .map(|v| v.range.start)
        else {
            return;
        };
        let phys = self.phys();
        let zero = phys.zero_page();
        let anon = match st.mm(pid).pt().lookup(va).map(|l| (l, l.pte)) {
            Some((l, Pte::Present { .. })) => l
                .frame_at(va)
                .is_some_and(|f| f != zero && phys.frame(f).owner() == FrameOwner::Anon),
            Some((_, Pte::DevicePrivate { .. } | Pte::Swap { .. })) => true,
            _ => false,
        };
        if !anon {
            return;
        }
        if let Some(v) = st.mm_mut(pid).vma_mut(start) {
            v.flags |= VmFlags::ANON_VMA;
        }
    }

    /// Resolves a CPU fault on `va` (`handle_mm_fault`): demand-zero, page-cache, huge page and
    /// copy-on-write faults. Returns once the access can be retried, or with the signal the access raises.
    pub async fn handle_mm_fault(&self, pid: Pid, va: Va, write: bool) -> FaultResult {
        let res = self.handle_mm_fault_inner(pid, va, write).await;
        if res.is_ok() {
            self.note_anon_vma(pid, va);
        }
        res
    }

    async fn handle_mm_fault_inner(&self, pid: Pid, va: Va, write: bool) -> FaultResult {
        let va = va.align_down(PAGE_SIZE);
        self.sim.count("cpu.faults", 1);
        let n = self.sim.counter("cpu.faults");
        self.sim.gauge(
            Track::Agent,
            "cpu.faults",
            i64::try_from(n).unwrap_or(i64::MAX),
        );
        let _span = self.sim.span("cpu.fault", Track::Agent, || {
            vec![
                ("pid", pid.0.into()),
                ("va", TraceArg::Hex(va.raw())),
                ("write", write.into()),
            ]
        });
        self.spend(self.costs.cpu_fault).await;
        let vma = self
            .mms()
            .mm(pid)
            .vma(va)
            .cloned()
            .ok_or(SigInfo::segv(va))?;
        let need = if write { VmFlags::WRITE } else { VmFlags::READ };
        if !vma.flags.contains(need) {
            return Err(SigInfo::segv(va));
        }
        let leaf = self.mms().mm(pid).pt().lookup(va);
        match leaf {
            None if let VmaBacking::VmObject { obj, pgoff } = vma.backing => {
                // vma->vm_ops->fault (crate::vm_object).
                let idx = pgoff + (va.raw() - vma.range.start.raw()) / PAGE_SIZE;
                self.do_vm_object_fault(pid, va, obj, idx, write).await
            }
            None => {
                self.reclaim_if_low_for(pid).await;
                self.do_missing_page(pid, &vma, va, write)
            }
            Some(leaf) => match leaf.pte {
                Pte::Present { write: true, .. } => Ok(()),
                Pte::Present { write: false, .. } if !write => Ok(()),
                Pte::Present { .. } => self.do_wp_page(pid, &vma, va, leaf).await,
                Pte::DevicePrivate { frame, .. } => {
                    self.do_device_private_fault(pid, va, frame).await
                }
                Pte::DeviceExclusive { .. } => {
                    // restore_exclusive_pte: the device loses its atomic mapping through an EXCLUSIVE
                    // invalidation with no owner, then the original PTE comes back (spec §1.7).
                    let page = Range::from_len(va, PAGE_SIZE).expect("page in user space");
                    self.invalidate_range_start(pid, page, NotifierEvent::Exclusive, None)
                        .await;
                    {
                        let mut st = self.mms();
                        if let Some(Pte::DeviceExclusive { frame, write }) =
                            st.mm(pid).pt().lookup(va).map(|l| l.pte)
                        {
                            st.mm_mut(pid).pt_mut().set_pte(
                                va,
                                Pte::Present {
                                    frame,
                                    write,
                                    special: false,
                                },
                            );
                        }
                    }
                    self.invalidate_range_end(pid);
                    Ok(())
                }
                Pte::Migration { .. } => {
                    // Wait for the migration to finish, then let the access retry (migration_entry_wait).
                    self.migration_wq()
                        .wait_event(|| {
                            !matches!(
                                self.mms().mm(pid).pt().lookup(va).map(|l| l.pte),
                                Some(Pte::Migration { .. })
                            )
                        })
                        .await;
                    Ok(())
                }
                Pte::Swap { slot, write } => self
                    .swap_in(pid, va, slot, write)
                    .await
                    .map_err(|f| f.signal(va)),
                Pte::Pfn { write: w, .. } => {
                    // wp_pfn_shared: a PFNMAP VMA is shared, so a write fault just makes the entry writable.
                    if write && !w {
                        let mut st = self.mms();
                        st.mm_mut(pid)
                            .pt_mut()
                            .set_pte(va, leaf.pte.with_write(true));
                    }
                    Ok(())
                }
            },
        }
    }

    /// A CPU access to a device-private entry: the owning pagemap migrates the page back to RAM
    /// (`do_swap_page` → `pgmap->ops->migrate_to_ram`, spec §1.6); the access then retries.
    pub(crate) async fn do_device_private_fault(
        &self,
        pid: Pid,
        va: Va,
        frame: FrameId,
    ) -> FaultResult {
        if self.phys().frame(frame).locked {
            // A migration holds the page (crate::migrate, crate::migrate_device): do_swap_page's trylock fails;
            // wait for the unlock, then the access retries against whatever entry is there now.
            self.migration_wq()
                .wait_event(|| !self.phys().frame(frame).locked)
                .await;
            return Ok(());
        }
        let region = self.phys().region_of(frame);
        let ops = self.pgmaps().get(&region).cloned();
        let Some(ops) = ops else {
            return Err(SigInfo::bus(va));
        };
        self.sim.count("cpu.migrate_to_ram", 1);
        let _span = self.sim.span("migrate.to_ram", Track::Agent, || {
            vec![("pid", pid.0.into()), ("va", TraceArg::Hex(va.raw()))]
        });
        ops.migrate_to_ram(pid, va, frame)
            .await
            .map_err(|f| f.signal(va))
    }

    /// A fault on a none entry: anonymous zero page or new page (THP where eligible), page-cache page, or
    /// COW copy of a page-cache page for a write to a private file mapping.
    pub(crate) fn do_missing_page(&self, pid: Pid, vma: &Vma, va: Va, write: bool) -> FaultResult {
        let mut st = self.mms();
        let mut phys = self.phys();
        let mut swap = self.swap();
        let mut oracle = self.oracle();
        let mut files = self.files();
        match vma.backing {
            // Driver, P2P memory and PFNMAP VMAs are populated at mmap time and have no fault handler: an entry
            // that is gone (zapped at unbind or revoke) stays gone.
            VmaBacking::Driver | VmaBacking::P2pMem { .. } | VmaBacking::Mmio { .. } => {
                Err(SigInfo::bus(va))
            }
            // Faulted in by the driver's handler before this point (handle_mm_fault).
            VmaBacking::VmObject { .. } => Err(SigInfo::bus(va)),
            VmaBacking::Anon => {
                if vma.flags.contains(VmFlags::HUGETLB) {
                    return st.hugetlb_fault(&mut phys, pid, vma, va);
                }
                if !write {
                    let zero = phys.zero_page();
                    st.mm_mut(pid).pt_mut().set_pte(
                        va,
                        Pte::Present {
                            frame: zero,
                            write: false,
                            special: false,
                        },
                    );
                    return Ok(());
                }
                if st.thp_eligible(self.thp(), pid, vma, va) {
                    let base = va.align_down(PMD_SIZE);
                    let home = st.home_node(pid);
                    let zone = st.anon_zone(pid);
                    if let Ok(head) = phys.alloc_pmd_node_in(home, FrameOwner::Anon, zone) {
                        for i in 0..FRAMES_PER_PMD {
                            let f = phys.frame_mut(FrameId(head.0 + i));
                            f.mapcount = 1;
                            f.set_anon_vma(pid);
                            f.lru = crate::phys::LruState::Active;
                        }
                        st.mm_mut(pid).pt_mut().set_pmd(
                            base,
                            Pte::Present {
                                frame: head,
                                write: true,
                                special: false,
                            },
                        );
                        self.sim.count("thp.fault_alloc", 1);
                        return Ok(());
                    }
                    self.sim.count("thp.fault_fallback", 1);
                }
                let frame = st
                    .alloc_anon_for(&mut phys, pid)
                    .map_err(|_| SigInfo::bus(va))?;
                phys.frame_mut(frame).mapcount = 1;
                swap.lru_add_new_anon(&mut phys, frame);
                st.mm_mut(pid).pt_mut().set_pte(
                    va,
                    Pte::Present {
                        frame,
                        write: true,
                        special: false,
                    },
                );
                Ok(())
            }
            VmaBacking::File { .. } => {
                let (file, pgoff) = vma.file_pgoff(va).expect("file VMA");
                let cache = files.page(&mut phys, file, pgoff).ok_or(SigInfo::bus(va))?;
                if write && !vma.is_shared() {
                    // Private file write fault: COW from the page cache into a new anonymous page.
                    let frame = st
                        .alloc_anon_for(&mut phys, pid)
                        .map_err(|_| SigInfo::bus(va))?;
                    phys.copy_frame(cache, frame);
                    phys.frame_mut(frame).mapcount = 1;
                    swap.lru_add_new_anon(&mut phys, frame);
                    st.mm_mut(pid).pt_mut().set_pte(
                        va,
                        Pte::Present {
                            frame,
                            write: true,
                            special: false,
                        },
                    );
                    if let Some(e) = oracle.expected(LogicalPage::File { file, pgoff }) {
                        oracle.record(
                            LogicalPage::Anon {
                                pid,
                                vpn: va.page_number(),
                            },
                            e,
                        );
                    }
                    return Ok(());
                }
                phys.map_frame(cache);
                // A shared mapping's page is writable at once after a write fault, and after a read fault
                // too where the mapping needs no write-notify (`vma_wants_writenotify` is false for shmem:
                // `vm_page_prot` then allows writes); a file system with dirty tracking maps it read-only
                // until the first write fault.
                let no_writenotify = files.file(file).is_shmem();
                let w = vma.is_shared()
                    && (write || (no_writenotify && vma.flags.contains(VmFlags::WRITE)));
                st.mm_mut(pid).pt_mut().set_pte(
                    va,
                    Pte::Present {
                        frame: cache,
                        write: w,
                        special: false,
                    },
                );
                Ok(())
            }
        }
    }

    /// A write fault on a present read-only entry (`do_wp_page`): make a shared mapping writable, reuse an
    /// exclusive anonymous page, or copy (firing MMU_NOTIFY_CLEAR on the page being replaced).
    pub(crate) async fn do_wp_page(&self, pid: Pid, vma: &Vma, va: Va, leaf: Leaf) -> FaultResult {
        if vma.is_shared() {
            let mut st = self.mms();
            st.mm_mut(pid)
                .pt_mut()
                .set_leaf(leaf.base, leaf.size, leaf.pte.with_write(true));
            return Ok(());
        }
        if leaf.size != PageSize::Size4K {
            let mut st = self.mms();
            let phys = self.phys();
            let head = leaf.pte.frame().expect("present");
            let exclusive = (0..FRAMES_PER_PMD).all(|i| {
                let f = phys.frame(FrameId(head.0 + i));
                f.refcount == 1 && f.owner() == FrameOwner::Anon
            });
            if exclusive {
                st.mm_mut(pid)
                    .pt_mut()
                    .set_pmd(leaf.base, leaf.pte.with_write(true));
                return Ok(());
            }
            // Shared THP: split the PMD mapping and COW only the faulting base page (do_huge_pmd_wp_page).
            st.mm_mut(pid).pt_mut().split_pmd(va);
        }
        let (frame, zero, reuse) = {
            let st = self.mms();
            let phys = self.phys();
            let (frame, _, _) = st.mm(pid).translate(va).expect("present entry");
            let f = phys.frame(frame);
            let zero = frame == phys.zero_page();
            // wp_can_reuse_anon_folio: reuse an exclusive anonymous page. The model's "exclusive" is one
            // mapping and no references beyond pins (fork never shares a pinned exclusive page: it copies it for
            // the child), so a pinned page is reused, never replaced under its DMA.
            let exclusive = f.owner() == FrameOwner::Anon
                && f.mapcount <= 1
                && f.refcount % crate::phys::GUP_PIN_COUNTING_BIAS == 1;
            (frame, zero, !zero && exclusive)
        };
        if reuse {
            let mut st = self.mms();
            st.mm_mut(pid).pt_mut().set_pte(
                va,
                Pte::Present {
                    frame,
                    write: true,
                    special: false,
                },
            );
            self.sim.count("cpu.cow_reuse", 1);
            return Ok(());
        }
        // Oracle check 3: a COW must never replace a page a device may be writing through a pin.
        {
            let phys = self.phys();
            let mut oracle = self.oracle();
            if oracle.enabled() && !zero && phys.frame(frame).maybe_dma_pinned() {
                oracle.violation(
                    ViolationKind::PinBroken,
                    format!("COW replaced pinned {frame} at pid {} va {va}: DMA through the pin is lost", pid.0),
                );
            }
        }
        // wp_page_copy: allocate, copy, then replace the entry inside a CLEAR invalidation.
        let new = self
            .mms()
            .alloc_anon_for(&mut self.phys(), pid)
            .map_err(|_| SigInfo::bus(va))?;
        if !zero {
            self.phys().copy_frame(frame, new);
            self.spend(self.costs.page_copy).await;
        }
        let page = Range::from_len(va, PAGE_SIZE).expect("page in user space");
        self.invalidate_range_start(pid, page, NotifierEvent::Clear, None)
            .await;
        {
            let mut st = self.mms();
            let mut phys = self.phys();
            let mut swap = self.swap();
            let mut oracle = self.oracle();
            // pte_same: if the entry changed while we slept, drop the copy and let the access retry.
            let same = st
                .mm(pid)
                .translate(va)
                .is_some_and(|(f, w, _)| f == frame && !w);
            if same {
                // A COW of a page-cache page moves the page's identity from the file to this process.
                if let FrameOwner::File { file, pgoff } = phys.frame(frame).owner()
                    && let Some(e) = oracle.expected(LogicalPage::File { file, pgoff })
                {
                    oracle.record(
                        LogicalPage::Anon {
                            pid,
                            vpn: va.page_number(),
                        },
                        e,
                    );
                }
                phys.frame_mut(new).mapcount = 1;
                swap.lru_add_new_anon(&mut phys, new);
                st.mm_mut(pid).pt_mut().set_pte(
                    va,
                    Pte::Present {
                        frame: new,
                        write: true,
                        special: false,
                    },
                );
                phys.unmap_frame(frame);
                self.sim.count("cpu.cow_copy", 1);
            } else {
                phys.put(new);
            }
        }
        self.invalidate_range_end(pid);
        Ok(())
    }

    /// Copies `buf.len()` bytes from user memory (`copy_from_user`): a fault that cannot be resolved is EFAULT.
    pub async fn copy_from_user(&self, pid: Pid, addr: Va, buf: &mut [u8]) -> Result<(), Errno> {
        self.load(pid, addr, buf).await.map_err(|_| Errno::EFAULT)
    }

    /// Copies `data` to user memory (`copy_to_user`).
    pub async fn copy_to_user(&self, pid: Pid, addr: Va, data: &[u8]) -> Result<(), Errno> {
        self.store(pid, addr, data).await.map_err(|_| Errno::EFAULT)
    }
}

impl Mms {
    /// Removes every leaf of `pid` inside `r` (splitting PMD leaves that stick out), dropping frame
    /// references; returns the number of base pages zapped. `keep_file` leaves page-cache pages cached.
    pub(crate) fn zap_range(
        &mut self,
        phys: &mut PhysMem,
        swap: &mut Swap,
        pid: Pid,
        r: Range<Va>,
    ) -> u64 {
        // The page-table walk first (the cursor borrows the table), then the references, in the same order.
        let mut removed = Vec::new();
        let mut cursor = self.mm_mut(pid).pt_mut().cursor_mut(r);
        while cursor.find_next().is_some() {
            removed.extend(cursor.unmap());
        }
        let mut nr = 0;
        for l in &removed {
            nr += l.size.nr_pages();
            Self::drop_leaf_refs(phys, swap, l);
        }
        nr
    }

    pub(crate) fn drop_leaf_refs(phys: &mut PhysMem, swap: &mut Swap, l: &Leaf) {
        if let Pte::Swap { slot, .. } = l.pte {
            swap.free(slot);
            return;
        }
        let special = matches!(l.pte, Pte::Present { special: true, .. });
        if special {
            return;
        }
        if let Some(f) = l.pte.frame() {
            for i in 0..l.size.nr_pages() {
                phys.unmap_frame(FrameId(f.0 + i));
            }
        }
    }

    pub(crate) fn thp_eligible(&self, thp: ThpPolicy, pid: Pid, vma: &Vma, va: Va) -> bool {
        let wanted = match thp {
            ThpPolicy::Always => !vma.flags.contains(VmFlags::NOHUGEPAGE),
            ThpPolicy::Madvise => vma.flags.contains(VmFlags::HUGEPAGE),
            ThpPolicy::Never => false,
        };
        if !wanted {
            return false;
        }
        let base = va.align_down(PMD_SIZE);
        let r = Range::from_len(base, PMD_SIZE).expect("in user space");
        vma.range.contains_range(&r) && self.mm(pid).pt().leaves(r.start, r.end).is_empty()
    }

    pub(crate) fn hugetlb_fault(
        &mut self,
        phys: &mut PhysMem,
        pid: Pid,
        vma: &Vma,
        va: Va,
    ) -> FaultResult {
        let base = va.align_down(PMD_SIZE);
        if !self
            .mm(pid)
            .pt()
            .leaves(base, base.add(PMD_SIZE))
            .is_empty()
        {
            return Ok(());
        }
        let home = self.home_node(pid);
        // Hugetlb pool pages stay out of movable memory: the model cannot migrate them.
        let head = phys
            .alloc_pmd_node_in(home, FrameOwner::Anon, GfpZone::Normal)
            .map_err(|_| SigInfo::bus(va))?;
        for i in 0..FRAMES_PER_PMD {
            let f = phys.frame_mut(FrameId(head.0 + i));
            f.mapcount = 1;
            f.set_anon_vma(pid);
        }
        let write = vma.flags.contains(VmFlags::WRITE);
        self.mm_mut(pid).pt_mut().set_pmd(
            base,
            Pte::Present {
                frame: head,
                write,
                special: false,
            },
        );
        Ok(())
    }

    /// Oracle checks on a CPU access of `frame` at `va` (after the write for stores).
    pub(crate) fn oracle_check_cpu(
        &self,
        oracle: &mut Oracle,
        phys: &PhysMem,
        pid: Pid,
        va: Va,
        frame: FrameId,
        write: bool,
    ) {
        if !oracle.enabled() {
            return;
        }
        if !phys.frame(frame).is_allocated() {
            oracle.violation(
                ViolationKind::UseAfterFree,
                format!("CPU access of freed {frame} at {va}"),
            );
            return;
        }
        let Some(key) = self.logical_page(phys, pid, va) else {
            return;
        };
        let h = phys.content_hash(frame);
        if write {
            oracle.record(key, h);
        } else {
            oracle.check_read(key, h, || {
                format!("CPU read of pid {} va {va} ({frame})", pid.0)
            });
        }
    }
}
