//! Driver mappings faulted in by the driver (`vm_operations_struct->fault`), and their invalidation by
//! `unmap_mapping_range`: the CPU mapping of a GPU buffer object.
//!
//! Linux counterparts: drivers/gpu/drm/ttm/ttm_bo_vm.c (`ttm_bo_mmap_obj`, `ttm_bo_vm_fault_reserved`),
//! mm/memory.c (`vmf_insert_pfn_prot`, `unmap_mapping_range`), drivers/gpu/drm/drm_vma_manager.c (one
//! mmap offset per object, so each object has its own range of its device file's `address_space`).
//!
//! A driver registers a **mapping object** ([`Kernel::register_vm_object`]) with its fault handler
//! ([`VmObjectOps`]). A process maps it ([`Kernel::mmap_vm_object`]): a VM_SHARED | VM_MIXEDMAP VMA with no
//! entries (TTM refuses private mappings and sets VM_MIXEDMAP). A CPU access to a page without an entry calls
//! the handler, which finds where the object's page is *now* and inserts it with
//! [`Kernel::vmf_insert_frame`] (`vmf_insert_pfn_prot`): a special entry (`pte_special`, `vm_normal_page` is
//! NULL), so GUP and `hmm_range_fault` refuse it and no page reference or mapcount is taken. Before the driver
//! moves the object's pages it calls [`Kernel::unmap_mapping_range`]: every entry of every VMA mapping those
//! pages, in every process, is zapped inside an MMU_NOTIFY_CLEAR invalidation (interval notifiers over the
//! range fire), and the next CPU access faults again, at the new place.
//!
//! *Coarse:* `unmap_mapping_range` walks the processes' VMAs instead of the file's i_mmap tree; like Linux it
//! takes no `mmap_lock`. The handler's frame is inserted as a special present entry whatever memory it is
//! (TTM inserts both BAR pages and system pages by PFN).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;

use peerdma_core::{Errno, FrameId, PAGE_SIZE, Pid, Range, Va};

use crate::kernel::{FaultResult, Kernel, SigInfo, VmFault};
use crate::mmu_notifier::NotifierEvent;
use crate::pagetable::Pte;
use crate::vma::{Prot, VmFlags, VmaBacking};

pub use crate::vma::VmObjectId;

/// The driver side of a mapping object (`vm_operations_struct`).
pub trait VmObjectOps: std::fmt::Debug {
    /// The `fault` handler for page `pgoff` of the object, reached at `va` of `pid` (`write`: a store). It
    /// inserts the page where it is now with [`Kernel::vmf_insert_frame`], or fails. Called from the CPU fault
    /// path with `mmap_lock` held for reading; it may sleep (TTM takes the buffer's reservation lock and may
    /// move the buffer into CPU-visible memory first).
    ///
    /// # Errors
    /// The `vm_fault_t` error the access ends with (SIGBUS).
    fn fault<'a>(
        &'a self,
        pid: Pid,
        va: Va,
        pgoff: u64,
        write: bool,
    ) -> Pin<Box<dyn Future<Output = Result<(), VmFault>> + 'a>>;
}

/// The registered mapping objects.
pub(crate) type VmObjects = BTreeMap<VmObjectId, Rc<dyn VmObjectOps>>;

impl Kernel {
    /// Registers a driver's mapping object with its fault handler (`drm_vma_offset_add`) and returns its id.
    pub fn register_vm_object(&self, ops: Rc<dyn VmObjectOps>) -> VmObjectId {
        let mut objs = self.vm_objects();
        let id = VmObjectId(
            objs.keys()
                .next_back()
                .map_or(0, |k| k.0.checked_add(1).expect("fewer than 2^32 objects")),
        );
        objs.insert(id, ops);
        id
    }

    /// `mmap` of `len` bytes of mapping object `obj` from page `pgoff` (TTM's `ttm_bo_mmap_obj`): a
    /// VM_SHARED | VM_MIXEDMAP VMA without entries; its pages are faulted in by the object's handler.
    ///
    /// # Errors
    /// `EINVAL` for a private mapping (`shared` false: TTM refuses copy-on-write mappings) or a zero length;
    /// `ENODEV` for an unknown object; `ENOMEM` when no gap fits.
    pub async fn mmap_vm_object(
        &self,
        pid: Pid,
        obj: VmObjectId,
        pgoff: u64,
        len: u64,
        prot: Prot,
        shared: bool,
    ) -> Result<Va, Errno> {
        if !shared || len == 0 {
            return Err(Errno::EINVAL);
        }
        if !self.vm_objects().contains_key(&obj) {
            return Err(Errno::ENODEV);
        }
        let flags = VmFlags::from(prot) | VmFlags::SHARED | VmFlags::MIXEDMAP;
        let lock = self.mmap_lock(pid);
        let _g = lock.write().await;
        let range = self.insert_driver_vma(pid, len, flags).await?;
        self.mms()
            .mm_mut(pid)
            .vma_mut(range.start)
            .expect("inserted above")
            .backing = VmaBacking::VmObject { obj, pgoff };
        self.sim.trace("vm_object.mmap", || {
            format!("pid {} {range} obj {} pgoff {pgoff}", pid.0, obj.0)
        });
        Ok(range.start)
    }

    /// `vmf_insert_pfn_prot` from a fault handler: maps `frame` at `va` of `pid` as a special entry, writable
    /// when the VMA is. Does nothing when `va` already has an entry (another fault won) or is no longer in a
    /// VMA of a mapping object.
    pub fn vmf_insert_frame(&self, pid: Pid, va: Va, frame: FrameId) {
        let va = va.align_down(PAGE_SIZE);
        let mut st = self.mms();
        let Some(mm) = st.get(pid) else { return };
        let Some(vma) = mm.vma(va) else { return };
        if !matches!(vma.backing, VmaBacking::VmObject { .. }) || mm.pt().lookup(va).is_some() {
            return;
        }
        let write = vma.flags.contains(VmFlags::WRITE);
        st.mm_mut(pid).pt_mut().set_pte(
            va,
            Pte::Present {
                frame,
                write,
                special: true,
            },
        );
    }

    /// The CPU fault on a page of a mapping object without an entry: calls the object's handler.
    pub(crate) async fn do_vm_object_fault(
        &self,
        pid: Pid,
        va: Va,
        obj: VmObjectId,
        pgoff: u64,
        write: bool,
    ) -> FaultResult {
        let ops = self.vm_objects().get(&obj).cloned();
        let Some(ops) = ops else {
            return Err(SigInfo::bus(va));
        };
        self.sim.count("vm_object.faults", 1);
        ops.fault(pid, va, pgoff, write)
            .await
            .map_err(|f| f.signal(va))
    }

    /// `unmap_mapping_range` over pages `[first, first + nr)` of mapping object `obj`: zaps every entry of
    /// them in every VMA of every live process inside an MMU_NOTIFY_CLEAR invalidation; returns the pages
    /// zapped. Takes no `mmap_lock` (Linux walks the file's i_mmap tree under its own lock), so a driver may
    /// call it from a fault handler.
    pub async fn unmap_mapping_range(&self, obj: VmObjectId, first: u64, nr: u64) -> u64 {
        let targets: Vec<(Pid, Range<Va>)> = {
            let st = self.mms();
            let mut out = Vec::new();
            for mm in st.live() {
                for v in mm.vmas().values() {
                    let VmaBacking::VmObject { obj: o, pgoff } = v.backing else {
                        continue;
                    };
                    if o != obj {
                        continue;
                    }
                    let vma_pages = v.range.nr_pages();
                    let lo = first.max(pgoff);
                    let hi = (first.saturating_add(nr)).min(pgoff + vma_pages);
                    if lo >= hi {
                        continue;
                    }
                    let r = Range::new(
                        v.range.start.add((lo - pgoff) * PAGE_SIZE),
                        v.range.start.add((hi - pgoff) * PAGE_SIZE),
                    );
                    if !mm.pt().leaves(r.start, r.end).is_empty() {
                        out.push((mm.pid(), r));
                    }
                }
            }
            out
        };
        let mut total = 0;
        for (pid, r) in targets {
            if self.mms().get(pid).is_none() {
                continue;
            }
            total += self.zap_notify(pid, r, NotifierEvent::Clear).await;
        }
        self.sim.count("vm_object.unmap_mapping_range", 1);
        total
    }
}
