//! The one mirror loop every device uses (DESIGN.md §4.4): the HMM/ODP pattern by which a device keeps a
//! coherent copy of part of a process's page table without pinning anything.
//!
//! Linux counterparts: mm/hmm.c (`hmm_range_fault`), Documentation/mm/hmm.rst ("Address space mirroring
//! implementation and API": the `read_begin` / `read_retry` loop and the `invalidate` callback),
//! lib/test_hmm.c (`dmirror_range_fault`, `dmirror_do_fault`, `dmirror_interval_invalidate`) and
//! drivers/infiniband/core/umem_odp.c (`ib_umem_odp_map_dma_and_lock`, `ib_umem_odp_unmap_dma_pages`, with
//! drivers/infiniband/hw/mlx5/odp.c `mlx5_ib_invalidate_range`). Linux once had a `struct hmm_mirror` for
//! exactly this (removed in 5.6 in favour of open-coding the loop around `mmu_interval_notifier`); here the
//! loop is written once, in [`HmmMirror`], and a device supplies only what differs through
//! [`MirrorDevice`]: how it programs, zaps, fences and releases its entries.
//!
//! Fault ([`HmmMirror::range_fault`]), as numbered steps:
//! 1. If the 1 s HMM timeout ([`HMM_RANGE_DEFAULT_TIMEOUT`]) has passed since the fault began, give up with
//!    `EBUSY`.
//! 2. `seq = mmu_interval_read_begin` (sleeps while an invalidation of this mirror is in progress).
//! 3. Take `mmap_lock` for reading; `hmm_range_fault` with REQ_FAULT (and REQ_WRITE for a write, and the
//!    device's `dev_private_owner`); drop `mmap_lock`. `EBUSY` goes back to 1; any other errno is the
//!    fault's result (`EFAULT` for a hole, `EPERM` for a write to a read-only VMA).
//! 4. [`Kernel::preempt_point`]: between `mmap_read_unlock` and `mutex_lock` another CPU may run a whole
//!    invalidation — the window `read_retry` exists for.
//! 5. Take the driver lock ([`MirrorDevice::driver_lock`]). If `mmu_interval_read_retry(seq)`, drop it,
//!    count `<prefix>.retries` and go back to 1 (a device with [`MirrorDevice::skip_read_retry`] set — a
//!    deliberately broken driver — goes on instead).
//! 6. Tell the oracle the entries are being installed (`mirror_install(retry, ..)`; it reports a stale
//!    install).
//! 7. Program the device entries from the pfns ([`MirrorDevice::program`], device-specific: a device page
//!    table, DMA mappings); spend [`ProgramCost::locked`], drop the driver lock, spend
//!    [`ProgramCost::unlocked`].
//!
//! Invalidate (the [`IntervalNotifierOps`] callback this module owns), as numbered steps:
//! 1. The device's filter ([`MirrorDevice::ignores`]): dmirror skips the MIGRATE events it owns.
//! 2. Take the driver lock; a non-blockable invalidation that finds it held returns `false`
//!    ([`lock_and_set_seq`]).
//! 3. `mmu_interval_set_seq(cur_seq)`: every fault that read the old sequence now retries.
//! 4. Zap the device entries of the range ([`MirrorDevice::zap`]), which returns what it removed; the
//!    device traces or counts the invalidation ([`MirrorDevice::invalidated`]).
//! 5. Fence ([`MirrorDevice::fence`], DESIGN.md §4.8): wait until every in-flight DMA request of the device
//!    holding a translation of the range has completed or aborted. The device must stop using the addresses
//!    before their mappings go.
//! 6. DMA-unmap the zapped entries ([`MirrorDevice::release`]), spend its CPU time, drop the driver lock.
//!    *Not modelled:* marking written pages dirty (`set_page_dirty` for writable entries, as
//!    `ib_umem_odp_unmap_dma_pages` does); the page's data is written in place, so nothing is lost.
//!
//! Lock order: `mmap_lock` → notifier sequence → driver lock; the driver lock is never held across
//! `hmm_range_fault`. Nothing pins: once an invalidation returns, its pages are free to migrate, swap or COW.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;

use peerdma_core::{DeviceId, Errno, Pid, Range, SimDuration, Va};
use peerdma_mm::Kernel;
use peerdma_mm::hmm::{HMM_PFN_REQ_FAULT, HMM_PFN_REQ_WRITE, HmmRange};
use peerdma_mm::notifier::{IntervalNotifierOps, NotifierId, NotifierRange};
use peerdma_sim::{MutexGuard, SimMutex};

/// `HMM_RANGE_DEFAULT_TIMEOUT`: the fault loop gives up with `EBUSY` after this long (1 s).
pub const HMM_RANGE_DEFAULT_TIMEOUT: SimDuration = SimDuration::from_millis(1_000);

/// The CPU time of programming device entries (fault step 7), by whether the driver lock is held while it
/// passes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProgramCost {
    /// Spent under the driver lock (ODP: the DMA mappings are made under `umem_mutex`).
    pub locked: SimDuration,
    /// Spent after the driver lock is dropped (dmirror: the device page-table writes).
    pub unlocked: SimDuration,
}

/// The device side of a mirror: what differs between devices around the one loop of this module.
///
/// The device owns its entries and its driver lock; [`HmmMirror`] owns the notifier and the protocol.
pub trait MirrorDevice: 'static {
    /// What [`MirrorDevice::zap`] removed, held until [`MirrorDevice::release`] after the fence.
    type Zapped;

    /// The prefix of the mirror's metric counters (`<prefix>.retries`), e.g. `"dmirror"` or `"mirror"`.
    const COUNTER_PREFIX: &'static str;

    /// Returns the kernel.
    fn kernel(&self) -> &Kernel;

    /// Returns the mirrored process.
    fn pid(&self) -> Pid;

    /// Returns the driver lock, taken by the fault loop and by the invalidate callback.
    fn driver_lock(&self) -> &SimMutex;

    /// Returns the notifier's name for traces.
    fn notifier_name(&self) -> String;

    /// Returns how the oracle names this mirror's faults (`"<label> fault of <va>"`).
    fn fault_label(&self) -> String;

    /// Returns the `dev_private_owner` of the device's `hmm_range_fault` calls: device-private pages of
    /// this owner are returned as they are instead of being migrated back to RAM.
    fn dev_private_owner(&self) -> Option<DeviceId> {
        None
    }

    /// Returns whether to program entries without honouring `read_retry` (a deliberately broken driver,
    /// for tests of the oracle only).
    fn skip_read_retry(&self) -> bool {
        false
    }

    /// Returns whether the invalidation of `range` concerns this device at all (invalidate step 1).
    fn ignores(&self, range: &NotifierRange) -> bool {
        let _ = range;
        false
    }

    /// Programs the device entries of the faulted `range` (fault step 7, under the driver lock); returns
    /// the CPU time it took.
    ///
    /// # Errors
    /// Device-specific (e.g. `EREMOTEIO` for P2P memory the device cannot reach); the lock is dropped and
    /// no cost is spent.
    fn program(&self, range: &HmmRange) -> Result<ProgramCost, Errno>;

    /// Removes the device entries of `range` (invalidate step 4, under the driver lock) and returns them;
    /// their DMA mappings stay until [`MirrorDevice::release`].
    fn zap(&self, range: Range<Va>) -> Self::Zapped;

    /// Traces or counts a notifier invalidation that zapped `zapped` (after invalidate step 4; not called
    /// for [`HmmMirror::unmap_range`]).
    fn invalidated(&self, range: &NotifierRange, zapped: &Self::Zapped) {
        let _ = (range, zapped);
    }

    /// Waits until every in-flight DMA request of this device holding a translation of `range` has
    /// completed or aborted (invalidate step 5, DESIGN.md §4.8). The default has nothing in flight.
    fn fence<'a>(&'a self, range: Range<Va>) -> Pin<Box<dyn Future<Output = ()> + 'a>> {
        let _ = range;
        Box::pin(std::future::ready(()))
    }

    /// DMA-unmaps (or otherwise releases) the zapped entries (invalidate step 6); returns the CPU time of
    /// the zap and the unmaps, spent under the driver lock.
    fn release(&self, zapped: Self::Zapped) -> SimDuration;
}

/// Takes `dev`'s driver lock (waiting only if `range.blockable`) and sets the notifier's sequence: the
/// opening of every interval-notifier callback (invalidate steps 2–3). `None` when non-blockable and the
/// lock is held: the callback must return `false`.
pub async fn lock_and_set_seq<D: MirrorDevice + ?Sized>(
    dev: &D,
    id: NotifierId,
    range: &NotifierRange,
    cur_seq: u64,
) -> Option<MutexGuard> {
    let guard = dev.driver_lock().lock_if_blockable(range.blockable).await?;
    dev.kernel().interval_set_seq(dev.pid(), id, cur_seq);
    Some(guard)
}

/// Runs invalidate steps 4–6 with the driver lock held: zap, fence, release, spend.
async fn zap_fence_release<D: MirrorDevice>(
    dev: &D,
    range: Range<Va>,
    notified: Option<&NotifierRange>,
) {
    let zapped = dev.zap(range);
    if let Some(nr) = notified {
        dev.invalidated(nr, &zapped);
    }
    dev.fence(range).await;
    let cost = dev.release(zapped);
    dev.kernel().spend(cost).await;
}

/// The interval-notifier callbacks of an [`HmmMirror`].
struct MirrorOps<D>(Rc<D>);

impl<D: MirrorDevice> IntervalNotifierOps for MirrorOps<D> {
    fn invalidate<'a>(
        &'a self,
        id: NotifierId,
        range: &'a NotifierRange,
        cur_seq: u64,
    ) -> Pin<Box<dyn Future<Output = bool> + 'a>> {
        Box::pin(async move {
            let dev = &*self.0;
            if dev.ignores(range) {
                return true;
            }
            let Some(_g) = lock_and_set_seq(dev, id, range, cur_seq).await else {
                return false;
            };
            zap_fence_release(dev, range.range, Some(range)).await;
            true
        })
    }

    fn name(&self) -> String {
        self.0.notifier_name()
    }
}

/// A device's mirror of part of one process's address space: the device and the interval notifier that
/// keeps it coherent (module docs).
pub struct HmmMirror<D: MirrorDevice> {
    dev: Rc<D>,
    notifier: NotifierId,
}

impl<D: MirrorDevice> fmt::Debug for HmmMirror<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HmmMirror")
            .field("name", &self.dev.notifier_name())
            .field("notifier", &self.notifier)
            .finish_non_exhaustive()
    }
}

impl<D: MirrorDevice> HmmMirror<D> {
    /// Registers `dev`'s mirror of `[start, start + len)` of its process (`mmu_interval_notifier_insert`
    /// with this module's callbacks); nothing is faulted or pinned.
    ///
    /// # Errors
    /// `EOVERFLOW` for a zero length or a range that wraps; `EINVAL` when the process has exited.
    pub fn register(dev: Rc<D>, start: Va, len: u64) -> Result<Self, Errno> {
        let notifier = dev.kernel().interval_notifier_insert(
            dev.pid(),
            start,
            len,
            Rc::new(MirrorOps(dev.clone())),
        )?;
        Ok(Self { dev, notifier })
    }

    /// Returns the device.
    pub fn device(&self) -> &Rc<D> {
        &self.dev
    }

    /// Returns the interval notifier.
    pub fn notifier(&self) -> NotifierId {
        self.notifier
    }

    /// Faults `r` (page-aligned) into the device: fault steps 1–7 of the module docs.
    ///
    /// # Errors
    /// The errnos of `hmm_range_fault` (`EFAULT`, `EPERM`, ...), `EBUSY` after
    /// [`HMM_RANGE_DEFAULT_TIMEOUT`], or [`MirrorDevice::program`]'s.
    pub async fn range_fault(&self, r: Range<Va>, write: bool) -> Result<(), Errno> {
        let dev = &*self.dev;
        let k = dev.kernel();
        let pid = dev.pid();
        let flags = HMM_PFN_REQ_FAULT | if write { HMM_PFN_REQ_WRITE } else { 0 };
        let mut range = HmmRange::new(pid, self.notifier, 0, r, flags);
        range.dev_private_owner = dev.dev_private_owner();
        let deadline = k.sim.now() + HMM_RANGE_DEFAULT_TIMEOUT;
        let lock = k.mmap_lock(pid);
        let guard = loop {
            // Step 1.
            if k.sim.now() > deadline {
                return Err(Errno::EBUSY);
            }
            // Steps 2–3.
            range.notifier_seq = k.interval_read_begin(pid, self.notifier).await;
            let ret = {
                let _m = lock.read().await;
                k.hmm_range_fault(&mut range).await
            };
            match ret {
                Err(Errno::EBUSY) => continue,
                Err(e) => return Err(e),
                Ok(()) => {}
            }
            // Step 4.
            k.preempt_point().await;
            // Step 5.
            let g = dev.driver_lock().lock().await;
            let retry = k.interval_read_retry(pid, self.notifier, range.notifier_seq);
            if retry && !dev.skip_read_retry() {
                drop(g);
                k.sim.count(&format!("{}.retries", D::COUNTER_PREFIX), 1);
                continue;
            }
            // Step 6.
            k.state().oracle.mirror_install(retry, || {
                format!("{} fault of {:#x}", dev.fault_label(), range.start)
            });
            break g;
        };
        // Step 7.
        match dev.program(&range) {
            Ok(cost) => {
                k.spend(cost.locked).await;
                drop(guard);
                k.spend(cost.unlocked).await;
                Ok(())
            }
            Err(e) => {
                drop(guard);
                Err(e)
            }
        }
    }

    /// Zaps, fences and releases every device entry of `r` under the driver lock (invalidate steps 4–6
    /// without a notifier event): the teardown of an unregistering mirror (`ib_umem_odp_release`).
    pub async fn unmap_range(&self, r: Range<Va>) {
        let _g = self.dev.driver_lock().lock().await;
        zap_fence_release(&*self.dev, r, None).await;
    }

    /// Removes the interval notifier (`mmu_interval_notifier_remove`), waiting for a running invalidation;
    /// once this returns no callback runs or will run.
    pub async fn remove(&self) {
        self.dev
            .kernel()
            .interval_notifier_remove(self.dev.pid(), self.notifier)
            .await;
    }
}
