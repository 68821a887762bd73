//! The CPU's mapping of a buffer object (TTM's `ttm_bo_mmap_obj`, `ttm_bo_vm_fault_reserved`,
//! `ttm_bo_unmap_virtual`; drivers/gpu/drm/ttm/ttm_bo_vm.c): a VM_SHARED | VM_MIXEDMAP VMA over peerdma-mm's
//! `vm_object` whose fault handler inserts the page where the buffer is now, and the zap every move starts
//! with (step 0 of [`super`]'s moves: `unmap_mapping_range`, an MMU_NOTIFY_CLEAR invalidation).

use std::future::Future;
use std::pin::Pin;
use std::rc::{Rc, Weak};

use peerdma_core::{Errno, Pid, Va};
use peerdma_mm::VmFault;
use peerdma_mm::VmObjectOps;
use peerdma_mm::vma::Prot;

use super::{BoId, BoPage, Placement};
use crate::gpu::{Gpu, GpuError, GpuInjection, Result};

impl Gpu {
    /// Step 0 of a move: zaps every CPU mapping of the buffer (`ttm_bo_unmap_virtual`).
    pub(super) async fn unmap_cpu(&self, bo: BoId) {
        let (obj, nr) = {
            let st = self.bo.borrow();
            let b = &st.bos[&bo];
            (b.vm_obj, b.pages.len() as u64)
        };
        let Some(obj) = obj else { return };
        if self.injection.get() == GpuInjection::SkipCpuUnmap {
            self.platform
                .kernel
                .sim
                .count("gpu.injected_skipped_cpu_unmaps", 1);
            return;
        }
        let nr = self.platform.kernel.unmap_mapping_range(obj, 0, nr).await;
        self.platform
            .kernel
            .sim
            .count("gpu.bo_cpu_pages_unmapped", nr);
    }

    /// `mmap` of a buffer by process `pid` (TTM's `ttm_bo_mmap_obj` through the DRM file's mmap offset): a
    /// shared VM_MIXEDMAP VMA over the whole buffer whose pages fault in at the buffer's current place.
    ///
    /// # Errors
    /// [`GpuError::UnknownBo`]; the mmap's errno (`ENOMEM` when no gap fits).
    pub async fn bo_mmap(self: &Rc<Self>, pid: Pid, bo: BoId, prot: Prot) -> Result<Va> {
        let size = self.bo_size(bo)?;
        let obj = {
            let existing = self.bo.borrow().bos[&bo].vm_obj;
            if let Some(o) = existing {
                o
            } else {
                let o = self.platform.kernel.register_vm_object(Rc::new(BoVmOps {
                    gpu: Rc::downgrade(self),
                    bo,
                }));
                self.bo
                    .borrow_mut()
                    .bos
                    .get_mut(&bo)
                    .expect("checked")
                    .vm_obj = Some(o);
                o
            }
        };
        Ok(self
            .platform
            .kernel
            .mmap_vm_object(pid, obj, 0, size, prot, true)
            .await?)
    }

    /// `ttm_bo_vm_fault_reserved` for page `pgoff` of a buffer, at `va` of `pid`: under the reservation
    /// lock, moves a buffer in invisible VRAM into the window, then inserts the page where it is.
    async fn bo_vm_fault(&self, pid: Pid, va: Va, bo: BoId, pgoff: u64) -> Result<()> {
        let _resv = self.resv.lock().await;
        if self.bo_placement(bo)? == Placement::Hidden {
            self.platform.kernel.sim.count("gpu.bo_fault_moves", 1);
            self.bo_move(bo, Placement::Window).await?;
        }
        let frame = {
            let mut st = self.bo.borrow_mut();
            let b = st.bo(bo)?;
            let i = usize::try_from(pgoff).map_err(|_| Errno::EFAULT)?;
            match b.pages.get(i) {
                Some(BoPage::Frame(f, _)) => *f,
                _ => return Err(GpuError::Errno(Errno::EFAULT)),
            }
        };
        self.platform.kernel.vmf_insert_frame(pid, va, frame);
        Ok(())
    }
}

/// A buffer's `vm_operations_struct` (`ttm_bo_vm_ops`).
#[derive(Debug)]
struct BoVmOps {
    gpu: Weak<Gpu>,
    bo: BoId,
}

impl VmObjectOps for BoVmOps {
    fn fault<'a>(
        &'a self,
        pid: Pid,
        va: Va,
        pgoff: u64,
        _write: bool,
    ) -> Pin<Box<dyn Future<Output = std::result::Result<(), VmFault>> + 'a>> {
        Box::pin(async move {
            let gpu = self.gpu.upgrade().ok_or(VmFault::Sigbus)?;
            gpu.bo_vm_fault(pid, va, self.bo, pgoff)
                .await
                .map_err(|e| match e {
                    GpuError::Errno(Errno::ENOMEM) => VmFault::Oom,
                    _ => VmFault::Sigbus,
                })
        })
    }
}
