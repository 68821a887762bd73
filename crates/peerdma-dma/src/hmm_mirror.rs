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
use peerdma_mm::mmu_notifier::{IntervalNotifierOps, NotifierId, NotifierRange};
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

    /// Returns whether the device's `hmm_range_fault` calls ask for P2P translations of other devices'
    /// device-private pages inside a BAR window (beyond mainline: [`HmmRange::allow_p2p`]).
    fn allow_p2p(&self) -> bool {
        false
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
        range.allow_p2p = dev.allow_p2p();
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
            if retry
                && !dev.skip_read_retry()
                && !peerdma_core::mutation::active(peerdma_core::mutation::Mutation::SkipReadRetry)
            {
                drop(g);
                k.sim.count(&format!("{}.retries", D::COUNTER_PREFIX), 1);
                continue;
            }
            // Step 6.
            k.mirror_install(retry, || {
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

#[cfg(test)]
mod tests {
    use std::cell::{Cell, RefCell};
    use std::collections::BTreeMap;

    use peerdma_core::{FrameId, PAGE_SIZE};
    use peerdma_mm::hmm::hmm_pfn_to_frame;
    use peerdma_mm::{Advice, MmCosts, MmapArgs, Prot};
    use peerdma_sim::{RunOutcome, Sim, SimConfig};

    use super::*;

    /// A device that only records what the loop asks of it.
    struct TestDev {
        kernel: Rc<Kernel>,
        pid: Pid,
        lock: SimMutex,
        entries: RefCell<BTreeMap<u64, FrameId>>,
        log: RefCell<Vec<String>>,
        skip_read_retry: Cell<bool>,
    }

    impl MirrorDevice for TestDev {
        type Zapped = Vec<u64>;

        const COUNTER_PREFIX: &'static str = "test";

        fn kernel(&self) -> &Kernel {
            &self.kernel
        }

        fn pid(&self) -> Pid {
            self.pid
        }

        fn driver_lock(&self) -> &SimMutex {
            &self.lock
        }

        fn notifier_name(&self) -> String {
            "test".to_owned()
        }

        fn fault_label(&self) -> String {
            "test".to_owned()
        }

        fn skip_read_retry(&self) -> bool {
            self.skip_read_retry.get()
        }

        fn program(&self, range: &HmmRange) -> Result<ProgramCost, Errno> {
            let mut e = self.entries.borrow_mut();
            for (i, &w) in range.hmm_pfns.iter().enumerate() {
                e.insert(range.start.page_number() + i as u64, hmm_pfn_to_frame(w));
            }
            self.log
                .borrow_mut()
                .push(format!("program {}", range.hmm_pfns.len()));
            Ok(ProgramCost::default())
        }

        fn zap(&self, range: Range<Va>) -> Vec<u64> {
            let mut e = self.entries.borrow_mut();
            let keys: Vec<u64> = e
                .range(range.start.page_number()..range.end.page_number())
                .map(|(k, _)| *k)
                .collect();
            for k in &keys {
                e.remove(k);
            }
            self.log.borrow_mut().push(format!("zap {}", keys.len()));
            keys
        }

        fn fence<'a>(&'a self, _range: Range<Va>) -> Pin<Box<dyn Future<Output = ()> + 'a>> {
            Box::pin(async move {
                // What the fence sees: the entries already zapped, none released yet.
                let left = self.entries.borrow().len();
                self.log.borrow_mut().push(format!("fence {left}"));
                // Holds the driver lock a while, as a drain of in-flight requests would.
                self.kernel.sim.sleep(SimDuration::from_nanos(1_000)).await;
            })
        }

        fn release(&self, zapped: Vec<u64>) -> SimDuration {
            self.log
                .borrow_mut()
                .push(format!("release {}", zapped.len()));
            SimDuration::ZERO
        }
    }

    const PAGES: u64 = 4;

    /// Runs `body` as the only agent (it may spawn others) with a process holding `PAGES` populated
    /// anonymous pages and a test device mirroring all of them; returns the device's log, its entries,
    /// the `test.retries` counter and the run's outcome.
    fn run<F, Fut>(skip_read_retry: bool, body: F) -> (Vec<String>, usize, u64, RunOutcome)
    where
        F: FnOnce(Rc<Kernel>, HmmMirror<TestDev>, Va) -> Fut + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        let sim = Sim::new(SimConfig::default());
        let kernel = Kernel::new(&sim, 64 << 20, MmCosts::zero());
        let pid = kernel.create_process();
        let dev = Rc::new(TestDev {
            kernel: kernel.clone(),
            pid,
            lock: SimMutex::new(&sim, "test.mutex"),
            entries: RefCell::default(),
            log: RefCell::default(),
            skip_read_retry: Cell::new(skip_read_retry),
        });
        let d = dev.clone();
        sim.spawn("app", async move {
            let args = MmapArgs {
                len: PAGES * PAGE_SIZE,
                prot: Prot::RW,
                private: true,
                anonymous: true,
                ..MmapArgs::default()
            };
            let va = kernel.mmap(pid, &args).await.unwrap();
            let data = vec![0x5a; usize::try_from(PAGES * PAGE_SIZE).unwrap()];
            kernel.store(pid, va, &data).await.unwrap();
            let m = HmmMirror::register(d, va, PAGES * PAGE_SIZE).unwrap();
            body(kernel, m, va).await;
        });
        let outcome = sim.run();
        let log = dev.log.borrow().clone();
        let nr = dev.entries.borrow().len();
        (log, nr, sim.metrics().get("test.retries"), outcome)
    }

    fn pages(va: Va, from: u64, to: u64) -> Range<Va> {
        Range::new(va.add(from * PAGE_SIZE), va.add(to * PAGE_SIZE))
    }

    #[test]
    fn fault_installs_entries_and_invalidation_zaps_then_fences_then_releases() {
        let (log, nr, retries, outcome) = run(false, |k, m, va| async move {
            m.range_fault(pages(va, 0, 2), false).await.unwrap();
            k.madvise(m.device().pid, va, PAGE_SIZE, Advice::DontNeed)
                .await
                .unwrap();
        });
        assert_eq!(outcome, RunOutcome::Completed);
        assert_eq!(
            log,
            ["program 2", "zap 1", "fence 1", "release 1"],
            "the fence runs after the zap (one entry left) and before the DMA-unmap"
        );
        assert_eq!(nr, 1);
        assert_eq!(retries, 0);
    }

    /// An invalidation runs in the window between `hmm_range_fault` and the driver lock (fault step 4): it
    /// holds the driver lock through its fence, and the fault then finds `read_retry` set.
    fn fault_racing_an_invalidation(
        skip_read_retry: bool,
    ) -> (Vec<String>, usize, u64, RunOutcome) {
        run(skip_read_retry, |k, m, va| async move {
            let (k2, pid) = (k.clone(), m.device().pid);
            // Page 3: inside the notifier's interval, outside the faulted range.
            k.sim.spawn("madvise", async move {
                k2.madvise(pid, va.add(3 * PAGE_SIZE), PAGE_SIZE, Advice::DontNeed)
                    .await
                    .unwrap();
            });
            m.range_fault(pages(va, 0, 2), false).await.unwrap();
        })
    }

    #[test]
    fn fault_racing_an_invalidation_retries() {
        let (log, nr, retries, outcome) = fault_racing_an_invalidation(false);
        assert_eq!(outcome, RunOutcome::Completed);
        assert_eq!(log, ["zap 0", "fence 0", "release 0", "program 2"]);
        assert_eq!(nr, 2);
        assert_eq!(retries, 1, "the fault retried once, then programmed");
    }

    #[test]
    fn skipping_read_retry_programs_at_once_and_the_oracle_reports_it() {
        let (log, _, retries, outcome) = fault_racing_an_invalidation(true);
        assert_eq!(retries, 0);
        assert_eq!(log, ["zap 0", "fence 0", "release 0", "program 2"]);
        let RunOutcome::Stopped(why) = outcome else {
            panic!("the oracle did not stop the run: {outcome:?}");
        };
        assert!(why.contains("test fault of"), "{why}");
    }
}
