//! An NVMe controller: a namespace of 4 KiB blocks, O_DIRECT read and write commands that DMA straight
//! into (or out of) a user VA range — RAM or peer memory — and a controller memory buffer (CMB) that the
//! platform publishes as a P2P provider.
//!
//! Linux counterparts: drivers/nvme/host/pci.c (the CMB as P2P memory: `nvme_map_cmb` →
//! `pci_p2pdma_add_resource` + `pci_p2pmem_publish`; `QUEUE_FLAG_PCI_P2PDMA` on queues of controllers that
//! support it), block/ (`iov_iter_extract_pages` passes `FOLL_PCI_P2PDMA` only for a queue with that flag;
//! `blk_rq_dma_map_iter_start` maps the request), drivers/pci/p2pdma.c (the map type).
//!
//! A command, as numbered steps:
//! 1. Wait for a free tag: at most `queue_depth` commands in flight (blk-mq tags).
//! 2. Pin the user pages short-term with `FOLL_PCI_P2PDMA` when the queue supports P2P
//!    ([`peerdma_dma::get_user_dma_sg`] with [`DmaSgFlags::P2P`]); a queue without it pins without the
//!    flag and GUP refuses P2P pages: `EREMOTEIO`, the I/O fails at the pin.
//! 3. DMA-map: a NOT_SUPPORTED P2P segment fails the I/O. Mainline has no fallback. The errno depends on
//!    the kernel: `EREMOTEIO` through 6.16 (the old `dma_map_sgtable` path returns it), `EINVAL` from 6.17
//!    (`blk_rq_dma_map_iter_start` fails the request with `BLK_STS_INVAL`). The model gives 6.17's
//!    `EINVAL` by default; [`Nvme::set_kernel_6_16`] gives the older one. A bounce through RAM is the
//!    application's own steps. A THRU_HOST_BRIDGE segment (a whitelisted host bridge) maps like RAM.
//! 4. The controller's media time (`nvme.read_latency` / `nvme.write_latency`), then the data moves
//!    through the device's access path ([`peerdma_dma::DmaSpace`]), one request per page, over the links
//!    of the topology (the device's link bandwidth, P2P through a switch or the root complex).
//! 5. Unpin.
//!
//! *Coarse (stated):* the namespace holds whole 4 KiB blocks in memory (no FTL, no media bandwidth model
//! beyond the fixed per-command latency); one submission queue; no interrupt coalescing; O_DIRECT needs
//! page-aligned buffers, offsets and lengths here (Linux accepts 512-byte alignment).

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::fmt;
use std::rc::Rc;

use peerdma_core::timing::{ParamSpec, Timing};
use peerdma_core::{Errno, PAGE_SIZE, Pid, Range, SimDuration, Va};
use peerdma_dma::{DmaDevice, DmaSgFlags, Platform, get_user_dma_sg};
use peerdma_sim::WaitQueue;

const READ_LATENCY: ParamSpec = ParamSpec::time(
    "nvme.read_latency",
    80_000,
    "assumption: a TLC NAND page read ≈ 50–100 µs (datacenter SSD datasheets quote ≈ 80 µs 4 KiB QD1 reads)",
    "media time of one NVMe read command, before its data DMA",
);
const WRITE_LATENCY: ParamSpec = ParamSpec::time(
    "nvme.write_latency",
    20_000,
    "assumption: a write absorbed by the SSD's write cache ≈ 10–30 µs at QD1 (datasheets)",
    "media time of one NVMe write command, after its data DMA",
);
const QUEUE_DEPTH: ParamSpec = ParamSpec::count(
    "nvme.queue_depth",
    64,
    "assumption: a modest blk-mq queue (NVMe allows up to 64 Ki entries per queue; Linux defaults to 1023)",
    "commands one NVMe controller keeps in flight; more wait for a tag",
);

/// Timing of the NVMe model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NvmeCosts {
    /// Media time of a read (`nvme.read_latency`).
    pub read_latency: SimDuration,
    /// Media time of a write (`nvme.write_latency`).
    pub write_latency: SimDuration,
    /// Commands in flight (`nvme.queue_depth`).
    pub queue_depth: u32,
}

impl NvmeCosts {
    /// The parameters these costs are built from, in field order.
    pub const PARAMS: &[ParamSpec] = &[READ_LATENCY, WRITE_LATENCY, QUEUE_DEPTH];

    /// Returns the costs `timing` gives.
    pub fn from_timing(timing: &Timing) -> Self {
        Self {
            read_latency: timing.time(&READ_LATENCY),
            write_latency: timing.time(&WRITE_LATENCY),
            queue_depth: u32::try_from(timing.count(&QUEUE_DEPTH))
                .unwrap_or(u32::MAX)
                .max(1),
        }
    }

    /// The calibrated defaults.
    pub fn calibrated() -> Self {
        Self::from_timing(&Timing::calibrated())
    }

    /// Every cost zero.
    pub fn zero() -> Self {
        Self::from_timing(&Timing::zero())
    }
}

/// Misuse of the controller's API, or an errno Linux returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NvmeError {
    /// The byte range lies beyond the namespace.
    #[error("blocks {start}..{end} lie beyond the namespace of {blocks} blocks")]
    BeyondNamespace {
        /// First block.
        start: u64,
        /// One past the last block.
        end: u64,
        /// The namespace's size in blocks.
        blocks: u64,
    },
    /// An outcome Linux gives as an errno.
    #[error(transparent)]
    Errno(#[from] Errno),
}

/// An NVMe controller on the platform (module docs).
pub struct Nvme {
    platform: Rc<Platform>,
    dev: Rc<DmaDevice>,
    costs: NvmeCosts,
    p2p_queue: bool,
    kernel_6_16: Cell<bool>,
    blocks: u64,
    media: RefCell<BTreeMap<u64, Vec<u8>>>,
    inflight: Cell<u32>,
    wq: WaitQueue,
}

impl fmt::Debug for Nvme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Nvme")
            .field("dev", &self.dev.name)
            .field("p2p_queue", &self.p2p_queue)
            .field("blocks", &self.blocks)
            .finish_non_exhaustive()
    }
}

impl Nvme {
    /// Creates the controller of platform device `dev` with a namespace of `size` bytes; `p2p_queue` says
    /// whether its queue has `QUEUE_FLAG_PCI_P2PDMA`.
    pub fn new(
        platform: &Rc<Platform>,
        dev: Rc<DmaDevice>,
        costs: NvmeCosts,
        size: u64,
        p2p_queue: bool,
    ) -> Rc<Self> {
        Rc::new(Self {
            wq: WaitQueue::new(&platform.kernel.sim),
            platform: platform.clone(),
            dev,
            costs,
            p2p_queue,
            kernel_6_16: Cell::new(false),
            blocks: size / PAGE_SIZE,
            media: RefCell::default(),
            inflight: Cell::new(0),
        })
    }

    /// Returns the platform device.
    pub fn device(&self) -> &Rc<DmaDevice> {
        &self.dev
    }

    /// Models a kernel through 6.16: a NOT_SUPPORTED segment fails the I/O with `EREMOTEIO` instead of
    /// 6.17's `EINVAL`.
    pub fn set_kernel_6_16(&self, old: bool) {
        self.kernel_6_16.set(old);
    }

    fn check(&self, offset: u64, len: u64) -> Result<(u64, u64), NvmeError> {
        if !offset.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) || len == 0 {
            return Err(Errno::EINVAL.into());
        }
        let start = offset / PAGE_SIZE;
        let end = start.checked_add(len / PAGE_SIZE).ok_or(Errno::EINVAL)?;
        if end > self.blocks {
            return Err(NvmeError::BeyondNamespace {
                start,
                end,
                blocks: self.blocks,
            });
        }
        Ok((start, end))
    }

    /// `pread(fd, buf, len, offset)` with `O_DIRECT`: the controller DMAs blocks `[offset, offset + len)`
    /// into `[buf, buf + len)` of `pid` (module docs, steps 1–5).
    ///
    /// # Errors
    /// `EINVAL` for unaligned arguments or (6.17+) a NOT_SUPPORTED segment; `EREMOTEIO` for P2P memory on a
    /// queue without P2P support (or a NOT_SUPPORTED segment through 6.16); the pin's errnos (`EFAULT`).
    pub async fn read(&self, pid: Pid, buf: Va, offset: u64, len: u64) -> Result<(), NvmeError> {
        let (start, end) = self.check(offset, len)?;
        let data: Vec<u8> = {
            let m = self.media.borrow();
            (start..end)
                .flat_map(|b| m.get(&b).cloned().unwrap_or_else(|| vec![0; 4096]))
                .collect()
        };
        self.command(pid, buf, len, Some(data)).await.map(drop)
    }

    /// `pwrite(fd, buf, len, offset)` with `O_DIRECT`: the controller DMAs `[buf, buf + len)` of `pid`
    /// into blocks `[offset, offset + len)`.
    ///
    /// # Errors
    /// As [`Nvme::read`].
    pub async fn write(&self, pid: Pid, buf: Va, offset: u64, len: u64) -> Result<(), NvmeError> {
        let (start, _) = self.check(offset, len)?;
        let data = self.command(pid, buf, len, None).await?;
        let mut m = self.media.borrow_mut();
        for (i, c) in data.chunks(4096).enumerate() {
            m.insert(start + i as u64, c.to_vec());
        }
        Ok(())
    }

    /// Steps 1–5 of one command: `to_memory` is the data a read DMAs into the buffer; a write returns the
    /// data it DMAed out of it.
    async fn command(
        &self,
        pid: Pid,
        buf: Va,
        len: u64,
        to_memory: Option<Vec<u8>>,
    ) -> Result<Vec<u8>, NvmeError> {
        let k = &self.platform.kernel;
        let range = Range::from_len(buf, len).ok_or(Errno::EINVAL)?;
        // Step 1.
        self.wq
            .wait_event(|| self.inflight.get() < self.costs.queue_depth)
            .await;
        self.inflight.set(self.inflight.get() + 1);
        let res = async {
            // Steps 2–3.
            let mut flags = DmaSgFlags::empty();
            if to_memory.is_some() {
                flags |= DmaSgFlags::WRITE;
            }
            if self.p2p_queue {
                flags |= DmaSgFlags::P2P;
            }
            let h = match get_user_dma_sg(&self.platform, pid, range, self.dev.id, flags)
                .await
                .map_err(|e| e.errno())
            {
                Ok(h) => h,
                Err(Errno::EREMOTEIO) if self.p2p_queue && !self.kernel_6_16.get() => {
                    k.sim.count("nvme.map_einval", 1);
                    return Err(Errno::EINVAL);
                }
                Err(e) => return Err(e),
            };
            // Step 4.
            let out = if let Some(data) = &to_memory {
                k.sim.sleep(k.sim.jitter(self.costs.read_latency)).await;
                h.write(0, data)
                    .await
                    .map(|()| Vec::new())
                    .map_err(|e| e.errno())
            } else {
                let d = h
                    .read(0, usize::try_from(len).map_err(|_| Errno::EINVAL)?)
                    .await
                    .map_err(|e| e.errno());
                k.sim.sleep(k.sim.jitter(self.costs.write_latency)).await;
                d
            };
            // Step 5.
            h.release().await;
            out
        }
        .await;
        self.inflight.set(self.inflight.get() - 1);
        self.wq.wake_up_all();
        k.sim.count(
            if to_memory.is_some() {
                "nvme.reads"
            } else {
                "nvme.writes"
            },
            1,
        );
        if res.is_err() {
            k.sim.count("nvme.errors", 1);
        }
        Ok(res?)
    }
}
