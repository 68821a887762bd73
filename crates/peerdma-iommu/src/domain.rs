//! An IOMMU domain as the DMA API uses it (drivers/iommu/iommu.c domain types and `iommu_map` /
//! `iommu_unmap`; drivers/iommu/dma-iommu.c `iommu_dma_alloc_iova`, `__iommu_dma_unmap` and the flush
//! queue `queue_iova` / `fq_flush_timeout`; drivers/iommu/iova.c for the allocator).
//!
//! A domain is one of three types ([`DomainType`]):
//! - **Identity** (`IOMMU_DOMAIN_IDENTITY`, `iommu.passthrough=1`): DMA address = physical address; no
//!   IOVA allocator, no page table, no IOTLB. `alloc_iova`, `map`, `unmap` and `reserve_iova` return
//!   [`Error::IdentityDomain`] (EINVAL, as `iommu_map` does for a non-paging domain).
//! - **Dma** (`IOMMU_DOMAIN_DMA`, `iommu.strict=1`): every unmap invalidates the IOTLB for its range and
//!   frees the IOVA before it returns.
//! - **DmaFq** (`IOMMU_DOMAIN_DMA_FQ`, `iommu.strict=0`, "lazy"): unmap clears the PTEs but defers both the
//!   IOTLB invalidation and the IOVA free to the flush queue.
//!
//! The DMA-API mapping protocol, as dma-iommu runs it:
//! 1. [`IommuDomain::alloc_iova`] reserves IOVA space (top-down from a cached node, size-aligned; see
//!    [`crate::iova`]). The DMA layer may first try [`IommuDomain::alloc_iova_limit`] below 4 GiB and
//!    fall back to the full aperture, as `iommu_dma_alloc_iova` does for PCI devices unless
//!    `iommu.forcedac=1`.
//! 2. [`IommuDomain::map`] writes the PTEs. The range must lie inside one live IOVA allocation (one not
//!    freed and not waiting on the flush queue); this is the model's use-after-free check on IOVAs.
//!    On failure the DMA layer gives the space back with [`IommuDomain::free_iova`].
//! 3. Devices access memory through [`IommuDomain::translate`] (IOTLB, then a page-table walk).
//! 4. [`IommuDomain::unmap`] clears the PTEs of a whole allocation (`__iommu_dma_unmap`), then:
//!    - Dma: invalidates the IOTLB for the range and frees the IOVA;
//!    - DmaFq: queues the allocation on the flush queue. Until the next flush the IOVA stays allocated
//!      and **stale IOTLB entries keep translating** ([`Translation::Hit`] with `stale: true`).
//! 5. A flush ([`IommuDomain::flush_all`], or automatic) invalidates the whole IOTLB
//!    (`iommu_flush_iotlb_all`) and then frees every queued IOVA. It happens automatically
//!    - when an unmap brings the queue to `fq_size` entries (that unmap's own range is included), and
//!    - when [`IommuDomain::tick`] (or the next `unmap`) runs at or after the *first queued entry's* time
//!      plus `fq_timeout`; [`IommuDomain::fq_deadline`] tells the simulator when to schedule the tick.
//!
//! Differences from Linux, on purpose: Linux's flush queue is per CPU with a ring of `fq_size` slots that
//! holds at most `fq_size - 1` entries, so the unmap that finds it full flushes the older entries and
//! keeps its own IOVA queued until the following flush; here there is one queue and the `fq_size`-th unmap
//! flushes itself too. Linux arms its 10 ms timer when an entry is queued while the timer is idle and does
//! not re-arm it after a full-queue flush; here the deadline always follows the oldest queued entry.
//!
//! Stats ([`IommuStats`]) count every event the timing model needs; [`crate::IommuCosts`] turns outcomes into
//! simulated time.

use std::collections::{BTreeSet, VecDeque};

use peerdma_core::{Iova, PAGE_SHIFT, PAGE_SIZE, Pa, Range, SimDuration, SimTime};

use crate::iotlb::Iotlb;
use crate::iova::{IovaAllocator, SlotError};
use crate::pagetable::{
    IO_PAGE_TABLE_LEVELS, IOVA_BITS, IoPageTable, IoPte, IommuProt, PteConflict,
};
use crate::{Error, Result};

/// The kind of translation a domain performs (include/linux/iommu.h `IOMMU_DOMAIN_*`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DomainType {
    /// `IOMMU_DOMAIN_IDENTITY`: DMA address = physical address.
    Identity,
    /// `IOMMU_DOMAIN_DMA`: IOVA + page table, strict invalidation on every unmap.
    #[default]
    Dma,
    /// `IOMMU_DOMAIN_DMA_FQ`: IOVA + page table, invalidation deferred to the flush queue.
    DmaFq,
}

/// The first IOVA a DMA domain hands out: page 0 is never allocated (dma-iommu starts the IOVA domain at
/// `max(1, aperture_start >> shift)`), so a DMA address of 0 never appears.
pub const DEFAULT_APERTURE_START: u64 = PAGE_SIZE;

/// The end of the default aperture: the 48-bit IOVA space of a 4-level IO page table.
pub const DEFAULT_APERTURE_END: u64 = 1 << IOVA_BITS;

/// The default IOTLB size: numbers.md §2, "IOTLB reach ≈ 64 entries of 4 KiB".
pub const DEFAULT_IOTLB_ENTRIES: usize = 64;

/// The default flush-queue size: dma-iommu.c `IOVA_DEFAULT_FQ_SIZE` (numbers.md §2 quotes the older
/// "250 entries").
pub const DEFAULT_FQ_SIZE: usize = 256;

/// The flush-queue size dma-iommu uses when the IOMMU has one queue for all CPUs
/// (`IOVA_SINGLE_FQ_SIZE`), for configs that want it.
pub const SINGLE_FQ_SIZE: usize = 32768;

/// The default flush-queue timeout: dma-iommu.c `IOVA_FQ_TIMEOUT`, 10 ms (numbers.md §2).
pub const DEFAULT_FQ_TIMEOUT: SimDuration = SimDuration::from_millis(10);

/// How a domain is set up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainConfig {
    /// Identity, strict DMA or deferred (flush-queue) DMA.
    pub domain_type: DomainType,
    /// The usable IOVA window, page aligned, inside `[0, 1 << 48)`. Default
    /// `[DEFAULT_APERTURE_START, DEFAULT_APERTURE_END)` = `[4 KiB, 256 TiB)`. Ignored by identity domains.
    pub aperture: Range<Iova>,
    /// IOTLB capacity in 4 KiB entries (default 64); 0 disables caching.
    pub iotlb_entries: usize,
    /// Flush-queue length that forces a flush (DmaFq only; default 256; must be at least 1).
    pub fq_size: usize,
    /// Age of the oldest queued entry that forces a flush (DmaFq only; default 10 ms).
    pub fq_timeout: SimDuration,
}

impl Default for DomainConfig {
    fn default() -> Self {
        Self {
            domain_type: DomainType::Dma,
            aperture: Range::new(
                Iova::from_raw(DEFAULT_APERTURE_START),
                Iova::from_raw(DEFAULT_APERTURE_END),
            ),
            iotlb_entries: DEFAULT_IOTLB_ENTRIES,
            fq_size: DEFAULT_FQ_SIZE,
            fq_timeout: DEFAULT_FQ_TIMEOUT,
        }
    }
}

impl DomainConfig {
    /// Returns the default config with another domain type.
    pub fn with_type(domain_type: DomainType) -> Self {
        Self {
            domain_type,
            ..Self::default()
        }
    }
}

/// Why a device access faulted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FaultReason {
    /// No PTE maps the page (and no IOTLB entry caches it).
    NotMapped,
    /// The translation (cached or walked) does not permit the access.
    Permission,
}

/// A DMA remapping fault: what the IOMMU reports in its fault log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IommuFault {
    /// The faulting IOVA, as the device emitted it.
    pub iova: Iova,
    /// Whether the access was a write.
    pub write: bool,
    /// Why it faulted.
    pub reason: FaultReason,
}

/// The outcome of one device access through the domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Translation {
    /// The IOTLB held the page. `stale` is true when the cached translation no longer matches the IO
    /// page table (the deferred-flush window). Identity domains report every access as a non-stale hit.
    Hit {
        /// The physical address the access goes to.
        pa: Pa,
        /// Whether the cached entry disagrees with the page table.
        stale: bool,
    },
    /// The IOTLB missed; the page table was walked and the translation cached.
    Miss {
        /// The physical address the access goes to.
        pa: Pa,
        /// Page-table levels walked (always [`IO_PAGE_TABLE_LEVELS`] in this model).
        levels: u32,
    },
    /// The access was refused.
    Fault(IommuFault),
}

impl Translation {
    /// Returns the physical address, or `None` for a fault.
    pub fn pa(&self) -> Option<Pa> {
        match *self {
            Self::Hit { pa, .. } | Self::Miss { pa, .. } => Some(pa),
            Self::Fault(_) => None,
        }
    }
}

/// What one [`IommuDomain::unmap`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnmapOutcome {
    /// PTEs cleared.
    pub nr_pages: u64,
    /// Whether the IOTLB was invalidated for the range (strict mode).
    pub invalidated_range: bool,
    /// Whether the range went onto the flush queue (DmaFq).
    pub queued: bool,
    /// Whether the whole IOTLB was flushed during the call (full queue or overdue timeout).
    pub flushed: bool,
    /// IOVA allocations released during the call (1 in strict mode; every queued one on a flush).
    pub freed_iovas: usize,
}

/// Event counters of a domain.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IommuStats {
    /// Accesses served by the IOTLB (stale ones and permission faults on cached entries included).
    pub iotlb_hits: u64,
    /// IOTLB hits whose entry no longer matched the page table.
    pub stale_hits: u64,
    /// Accesses the IOTLB missed.
    pub iotlb_misses: u64,
    /// IOTLB entries evicted to make room.
    pub iotlb_evictions: u64,
    /// Page-table walks (one per miss).
    pub walks: u64,
    /// Translation faults.
    pub faults: u64,
    /// Whole-IOTLB flushes (`iommu_flush_iotlb_all`), whatever triggered them.
    pub flushes: u64,
    /// Flushes forced by a full queue.
    pub fq_full_flushes: u64,
    /// Flushes forced by the queue timeout.
    pub fq_timeout_flushes: u64,
    /// Range invalidations (strict unmaps).
    pub range_invalidations: u64,
    /// Unmaps that went onto the flush queue.
    pub fq_queued: u64,
    /// IOVA allocations made.
    pub iova_allocs: u64,
    /// IOVA allocations freed.
    pub iova_frees: u64,
    /// Pages currently mapped in the IO page table.
    pub mapped_pages: u64,
    /// Accesses through an identity domain.
    pub identity_translations: u64,
}

/// A queued (unmapped, not yet flushed) IOVA allocation.
#[derive(Clone, Copy, Debug)]
struct FqEntry {
    start_pfn: u64,
    queued_at: SimTime,
}

/// One IOMMU domain: IOVA allocator, IO page table, IOTLB and flush queue.
#[derive(Clone, Debug)]
pub struct IommuDomain {
    cfg: DomainConfig,
    iovad: IovaAllocator,
    pt: IoPageTable,
    iotlb: Iotlb,
    fq: VecDeque<FqEntry>,
    queued: BTreeSet<u64>,
    stats: IommuStats,
}

fn pfn_to_iova(pfn: u64) -> Iova {
    Iova::from_raw(pfn << PAGE_SHIFT)
}

fn pfn_range(start_pfn: u64, end_pfn: u64) -> Range<Iova> {
    Range::new(pfn_to_iova(start_pfn), pfn_to_iova(end_pfn))
}

impl IommuDomain {
    /// Creates a domain.
    ///
    /// # Panics
    /// Panics if the config is invalid (see [`IommuDomain::try_new`]).
    pub fn new(cfg: DomainConfig) -> Self {
        Self::try_new(cfg).expect("invalid IOMMU domain config")
    }

    /// Creates a domain, checking the config: for paging domains the aperture must be page aligned,
    /// non-empty and inside the 48-bit IOVA space, and a DmaFq domain needs `fq_size >= 1`.
    pub fn try_new(cfg: DomainConfig) -> Result<Self> {
        if cfg.domain_type != DomainType::Identity {
            let ap = cfg.aperture;
            if !ap.start.is_page_aligned() || !ap.end.is_page_aligned() {
                return Err(Error::InvalidConfig {
                    reason: "aperture is not page aligned",
                });
            }
            if ap.is_empty() {
                return Err(Error::InvalidConfig {
                    reason: "aperture is empty",
                });
            }
            if ap.end.raw() > DEFAULT_APERTURE_END {
                return Err(Error::InvalidConfig {
                    reason: "aperture ends above the 48-bit iova space",
                });
            }
            if cfg.domain_type == DomainType::DmaFq && cfg.fq_size == 0 {
                return Err(Error::InvalidConfig {
                    reason: "flush queue size is zero",
                });
            }
        }
        // dma-iommu never hands out IOVA page 0.
        let start_pfn = cfg.aperture.start.page_number().max(1);
        let end_pfn = cfg.aperture.end.page_number();
        Ok(Self {
            iovad: IovaAllocator::new(start_pfn, end_pfn),
            pt: IoPageTable::new(),
            iotlb: Iotlb::new(cfg.iotlb_entries),
            fq: VecDeque::new(),
            queued: BTreeSet::new(),
            stats: IommuStats::default(),
            cfg,
        })
    }

    /// Returns the domain type.
    pub fn domain_type(&self) -> DomainType {
        self.cfg.domain_type
    }

    /// Returns the config the domain was created with.
    pub fn config(&self) -> &DomainConfig {
        &self.cfg
    }

    /// Returns the IOTLB, for inspection.
    pub fn iotlb(&self) -> &Iotlb {
        &self.iotlb
    }

    /// Returns the event counters.
    pub fn stats(&self) -> &IommuStats {
        &self.stats
    }

    /// Returns the number of pages mapped in the IO page table.
    pub fn mapped_pages(&self) -> u64 {
        self.pt.nr_present()
    }

    /// Returns the number of unmapped allocations waiting on the flush queue.
    pub fn fq_len(&self) -> usize {
        self.fq.len()
    }

    /// Returns when the flush-queue timeout expires (first queued entry's time + `fq_timeout`), or `None`
    /// when the queue is empty.
    pub fn fq_deadline(&self) -> Option<SimTime> {
        self.fq.front().map(|e| e.queued_at + self.cfg.fq_timeout)
    }

    /// Returns the number of live IOVA allocations, queued ones included.
    pub fn nr_iova_allocations(&self) -> usize {
        self.iovad.nr_allocations()
    }

    fn paging(&self, op: &'static str) -> Result<()> {
        if self.cfg.domain_type == DomainType::Identity {
            Err(Error::IdentityDomain { op })
        } else {
            Ok(())
        }
    }

    /// Allocates IOVA space for `size` bytes anywhere in the aperture (iova.c `alloc_iova_fast`):
    /// `size` is rounded up to whole pages, then below 32 pages to a power of two; the range is
    /// size-aligned and the highest one that fits below iova.c's cached node, retried from the aperture
    /// end when that search fails (see [`crate::iova`]; no per-CPU rcache).
    ///
    /// # Errors
    /// [`Error::IdentityDomain`] for identity domains, [`Error::ZeroSize`], and
    /// [`Error::IovaExhausted`] (ENOMEM) when no hole fits.
    pub fn alloc_iova(&mut self, size: u64) -> Result<Iova> {
        self.alloc_iova_limit(size, self.cfg.aperture.end)
    }

    /// Allocates like [`IommuDomain::alloc_iova`], but the whole range lies below `limit` (exclusive);
    /// e.g. `Iova::from_raw(1 << 32)` for dma-iommu's 32-bit-first attempt or a device's DMA mask + 1.
    pub fn alloc_iova_limit(&mut self, size: u64, limit: Iova) -> Result<Iova> {
        self.paging("iova allocator")?;
        if size == 0 {
            return Err(Error::ZeroSize);
        }
        let nr_pages = size.div_ceil(PAGE_SIZE);
        let limit_pfn = limit.raw() >> PAGE_SHIFT;
        match self.iovad.alloc(nr_pages, limit_pfn) {
            Some((pfn, _)) => {
                self.stats.iova_allocs += 1;
                Ok(pfn_to_iova(pfn))
            }
            None => Err(Error::IovaExhausted { nr_pages, limit }),
        }
    }

    /// Frees an IOVA allocation that has no mapped page (dma-iommu's `iommu_dma_free_iova` on a failed
    /// map). `iova` is the address [`IommuDomain::alloc_iova`] returned.
    ///
    /// # Errors
    /// [`Error::NotAllocated`] if no live allocation starts there (queued ones included),
    /// [`Error::StillMapped`] (EBUSY) if a page of it is mapped.
    pub fn free_iova(&mut self, iova: Iova) -> Result<()> {
        self.paging("iova allocator")?;
        let start_pfn = iova.page_number();
        let nr = self
            .iovad
            .allocation_at(start_pfn)
            .filter(|_| iova.is_page_aligned() && !self.queued.contains(&start_pfn))
            .ok_or(Error::NotAllocated {
                range: Range::new(iova, iova),
            })?;
        if let Some(pfn) = self.pt.first_present(start_pfn, start_pfn + nr) {
            return Err(Error::StillMapped {
                iova: pfn_to_iova(pfn),
            });
        }
        self.iovad
            .free(start_pfn)
            .expect("allocation checked above");
        self.stats.iova_frees += 1;
        Ok(())
    }

    /// Reserves an IOVA range so it is never allocated (iova.c `reserve_iova`; dma-iommu reserves the MSI
    /// window and the PCI host-bridge windows this way, so a DMA address never aliases a peer's BAR on the
    /// bus). The range is rounded outwards to pages; the part outside the aperture is ignored.
    ///
    /// # Errors
    /// [`Error::Overlap`] (EBUSY) when it overlaps an allocation or an earlier reservation.
    pub fn reserve_iova(&mut self, range: Range<Iova>) -> Result<()> {
        self.paging("iova allocator")?;
        let start_pfn = range.start.page_number();
        let end_pfn = range.end.raw().div_ceil(PAGE_SIZE);
        self.iovad
            .reserve(start_pfn, end_pfn - start_pfn)
            .map_err(|e| match e {
                SlotError::Overlap {
                    start_pfn: s,
                    nr_pages,
                } => Error::Overlap {
                    range,
                    existing: pfn_range(s, s + nr_pages),
                },
                SlotError::NotAllocated | SlotError::Reserved => {
                    unreachable!("reserve only reports overlaps")
                }
            })
    }

    /// Maps `[iova, iova + len)` to `[pa, pa + len)` with `prot` (iommu.c `iommu_map`), 4 KiB at a time.
    ///
    /// # Errors
    /// [`Error::IdentityDomain`]; [`Error::ZeroSize`]; [`Error::Unaligned`] unless `iova`, `pa` and `len`
    /// are page aligned; [`Error::NoAccess`] when `prot` grants neither read nor write;
    /// [`Error::OutsideAperture`] (EFAULT); [`Error::NotAllocated`] unless the range lies inside one live
    /// IOVA allocation; [`Error::AlreadyMapped`] (EEXIST) when any page is mapped already. On error nothing
    /// is mapped.
    pub fn map(&mut self, iova: Iova, pa: Pa, len: u64, prot: IommuProt) -> Result<()> {
        self.paging("page table")?;
        if len == 0 {
            return Err(Error::ZeroSize);
        }
        if !iova.is_page_aligned() || !pa.is_page_aligned() || !len.is_multiple_of(PAGE_SIZE) {
            return Err(Error::Unaligned { iova, pa, len });
        }
        if !prot.read && !prot.write {
            return Err(Error::NoAccess);
        }
        let range = self.checked_range(iova, len)?;
        let start_pfn = iova.page_number();
        let nr_pages = len / PAGE_SIZE;
        let live = self
            .iovad
            .allocation_containing(start_pfn)
            .filter(|&(lo, n)| start_pfn + nr_pages <= lo + n && !self.queued.contains(&lo));
        if live.is_none() {
            return Err(Error::NotAllocated { range });
        }
        self.pt
            .map(start_pfn, pa.page_number(), nr_pages, prot)
            .map_err(|c| match c {
                PteConflict::Present(pfn) | PteConflict::Absent(pfn) => Error::AlreadyMapped {
                    iova: pfn_to_iova(pfn),
                },
            })?;
        self.stats.mapped_pages = self.pt.nr_present();
        Ok(())
    }

    fn checked_range(&self, iova: Iova, len: u64) -> Result<Range<Iova>> {
        let aperture = self.cfg.aperture;
        let range = Range::from_len(iova, len).ok_or(Error::OutsideAperture {
            range: Range::new(iova, Iova::from_raw(u64::MAX)),
            aperture,
        })?;
        if aperture.contains_range(&range) {
            Ok(range)
        } else {
            Err(Error::OutsideAperture { range, aperture })
        }
    }

    /// Unmaps a DMA mapping and releases its IOVA, as dma-iommu's `__iommu_dma_unmap` does. `iova` may
    /// carry the page offset of the original DMA address: the range is rounded outwards to pages, and
    /// its first page must be the start of an IOVA allocation that holds the whole range. Every page of
    /// the range must be mapped, and no page of the allocation may stay mapped after it.
    ///
    /// Strict (Dma): clears the PTEs, invalidates the IOTLB for the range, frees the IOVA. DmaFq: first
    /// runs an overdue flush-queue timeout (`tick(now)`), clears the PTEs and queues the allocation,
    /// flushing if the queue reaches `fq_size`. See the module docs, step 4–5.
    ///
    /// # Errors
    /// [`Error::IdentityDomain`]; [`Error::ZeroSize`]; [`Error::OutsideAperture`];
    /// [`Error::NotMapped`] (ENOENT) naming the first unmapped page; [`Error::NotAllocated`] when the range
    /// does not start at, or does not fit in, one allocation; [`Error::StillMapped`] (EBUSY) when pages of
    /// the allocation past the range are still mapped. On error nothing changes.
    pub fn unmap(&mut self, iova: Iova, len: u64, now: SimTime) -> Result<UnmapOutcome> {
        self.paging("page table")?;
        if len == 0 {
            return Err(Error::ZeroSize);
        }
        let start = iova.align_down(PAGE_SIZE);
        let end_raw = iova
            .raw()
            .checked_add(len)
            .and_then(|e| Iova::from_raw(e).align_up(PAGE_SIZE))
            .ok_or(Error::OutsideAperture {
                range: Range::new(start, Iova::from_raw(u64::MAX)),
                aperture: self.cfg.aperture,
            })?;
        let range = self.checked_range(start, end_raw.offset_from(start))?;
        let start_pfn = start.page_number();
        let end_pfn = end_raw.page_number();
        if let Some(pfn) = (start_pfn..end_pfn).find(|&p| self.pt.get(p).is_none()) {
            return Err(Error::NotMapped {
                iova: pfn_to_iova(pfn),
            });
        }
        let alloc_nr = self
            .iovad
            .allocation_at(start_pfn)
            .filter(|&n| end_pfn <= start_pfn + n)
            .ok_or(Error::NotAllocated { range })?;
        // (A range that ends where its allocation ends has nothing past it to look at.)
        if let Some(pfn) = (end_pfn < start_pfn + alloc_nr)
            .then(|| self.pt.first_present(end_pfn, start_pfn + alloc_nr))
            .flatten()
        {
            return Err(Error::StillMapped {
                iova: pfn_to_iova(pfn),
            });
        }

        let mut outcome = UnmapOutcome {
            nr_pages: end_pfn - start_pfn,
            invalidated_range: false,
            queued: false,
            flushed: false,
            freed_iovas: 0,
        };
        if self.cfg.domain_type == DomainType::DmaFq
            && let Some(freed) = self.run_fq_timer(now)
        {
            outcome.flushed = true;
            outcome.freed_iovas += freed;
        }
        self.pt.clear_checked(start_pfn, end_pfn - start_pfn);
        self.stats.mapped_pages = self.pt.nr_present();

        match self.cfg.domain_type {
            DomainType::Dma => {
                if !peerdma_core::mutation::active(
                    peerdma_core::mutation::Mutation::SkipStrictFlush,
                ) {
                    self.iotlb.invalidate_range(start_pfn, end_pfn);
                }
                self.stats.range_invalidations += 1;
                self.iovad
                    .free(start_pfn)
                    .expect("allocation checked above");
                self.stats.iova_frees += 1;
                outcome.invalidated_range = true;
                outcome.freed_iovas += 1;
            }
            DomainType::DmaFq => {
                self.fq.push_back(FqEntry {
                    start_pfn,
                    queued_at: now,
                });
                self.queued.insert(start_pfn);
                self.stats.fq_queued += 1;
                outcome.queued = true;
                if self.fq.len() >= self.cfg.fq_size {
                    outcome.freed_iovas += self.flush_queue();
                    self.stats.fq_full_flushes += 1;
                    outcome.flushed = true;
                }
            }
            DomainType::Identity => unreachable!("checked by paging()"),
        }
        Ok(outcome)
    }

    /// Unlinks `[iova, iova + len)` from a live IOVA allocation and keeps the allocation (dma-iommu.c
    /// `dma_iova_unlink`, i.e. `__iommu_dma_iova_unlink` with `free_iova = false`): clears the PTEs and
    /// syncs the IOTLB for the range before returning, in every paging domain — the flush queue is used
    /// only when the IOVA is freed in the same call (`iotlb_gather.queued = free_iova && fq_domain`), so a
    /// DmaFq domain invalidates here as a strict one does. The range may start anywhere inside the
    /// allocation (a page of a `dma_iova_try_alloc` reservation); [`IommuDomain::free_iova`] releases the
    /// allocation once nothing of it is linked (`dma_iova_free`).
    ///
    /// # Errors
    /// [`Error::IdentityDomain`]; [`Error::ZeroSize`]; [`Error::Unaligned`] unless `iova` and `len` are
    /// page aligned; [`Error::OutsideAperture`]; [`Error::NotAllocated`] unless the range lies inside one
    /// live allocation; [`Error::NotMapped`] naming the first page not linked. On error nothing changes.
    pub fn unlink(&mut self, iova: Iova, len: u64) -> Result<UnmapOutcome> {
        self.paging("page table")?;
        if len == 0 {
            return Err(Error::ZeroSize);
        }
        if !iova.is_page_aligned() || !len.is_multiple_of(PAGE_SIZE) {
            return Err(Error::Unaligned {
                iova,
                pa: Pa::from_raw(0),
                len,
            });
        }
        let range = self.checked_range(iova, len)?;
        let start_pfn = iova.page_number();
        let end_pfn = start_pfn + len / PAGE_SIZE;
        let live = self
            .iovad
            .allocation_containing(start_pfn)
            .filter(|&(lo, n)| end_pfn <= lo + n && !self.queued.contains(&lo));
        if live.is_none() {
            return Err(Error::NotAllocated { range });
        }
        if let Some(pfn) = (start_pfn..end_pfn).find(|&p| self.pt.get(p).is_none()) {
            return Err(Error::NotMapped {
                iova: pfn_to_iova(pfn),
            });
        }
        self.pt.clear_checked(start_pfn, end_pfn - start_pfn);
        self.stats.mapped_pages = self.pt.nr_present();
        if !peerdma_core::mutation::active(peerdma_core::mutation::Mutation::SkipStrictFlush) {
            self.iotlb.invalidate_range(start_pfn, end_pfn);
        }
        self.stats.range_invalidations += 1;
        Ok(UnmapOutcome {
            nr_pages: end_pfn - start_pfn,
            invalidated_range: true,
            queued: false,
            flushed: false,
            freed_iovas: 0,
        })
    }

    /// Runs the flush-queue timer (dma-iommu `fq_flush_timeout`): if the first queued entry was queued at
    /// least `fq_timeout` before `now`, flushes. Returns whether it flushed. Strict and identity domains
    /// never flush here.
    pub fn tick(&mut self, now: SimTime) -> bool {
        self.cfg.domain_type == DomainType::DmaFq && self.run_fq_timer(now).is_some()
    }

    fn run_fq_timer(&mut self, now: SimTime) -> Option<usize> {
        let deadline = self.fq_deadline()?;
        if now < deadline {
            return None;
        }
        let freed = self.flush_queue();
        self.stats.fq_timeout_flushes += 1;
        Some(freed)
    }

    /// Flushes the whole IOTLB (`iommu_flush_iotlb_all`) and frees every queued IOVA. A no-op on identity
    /// domains.
    pub fn flush_all(&mut self) {
        if self.cfg.domain_type != DomainType::Identity {
            self.flush_queue();
        }
    }

    /// Flushes the IOTLB, then frees the queue; returns the number of IOVAs freed.
    fn flush_queue(&mut self) -> usize {
        self.iotlb.flush_all();
        self.stats.flushes += 1;
        let freed = self.fq.len();
        for e in self.fq.drain(..) {
            self.iovad
                .free(e.start_pfn)
                .expect("a queued IOVA stays allocated until its flush");
            self.stats.iova_frees += 1;
        }
        self.queued.clear();
        freed
    }

    /// Translates one device access at `iova` (a write when `write`).
    ///
    /// 1. Identity domains: `Hit { pa: iova, stale: false }`; nothing is cached or counted as a hit.
    /// 2. IOTLB hit: the cached translation, even if the page table has changed since (`stale: true`);
    ///    the cached permissions decide, so a refused access is `Fault(Permission)`.
    /// 3. IOTLB miss: walk the page table ([`IO_PAGE_TABLE_LEVELS`] levels). No PTE →
    ///    `Fault(NotMapped)`; PTE without the permission → `Fault(Permission)`; otherwise the translation
    ///    is cached (evicting the LRU entry when full) and returned as `Miss`.
    pub fn translate(&mut self, iova: Iova, write: bool) -> Translation {
        if self.cfg.domain_type == DomainType::Identity {
            self.stats.identity_translations += 1;
            return Translation::Hit {
                pa: Pa::from_raw(iova.raw()),
                stale: false,
            };
        }
        let pfn = iova.page_number();
        let offset = iova.page_offset();
        let fault = |reason| {
            Translation::Fault(IommuFault {
                iova,
                write,
                reason,
            })
        };
        if let Some(entry) = self.iotlb.lookup(pfn) {
            self.stats.iotlb_hits += 1;
            let current = IoPte {
                pa_pfn: entry.pa_pfn,
                prot: entry.prot,
            };
            let stale = self.pt.get(pfn) != Some(current);
            if stale {
                self.stats.stale_hits += 1;
            }
            if !entry.prot.allows(write) {
                self.stats.faults += 1;
                return fault(FaultReason::Permission);
            }
            return Translation::Hit {
                pa: Pa::from_raw((entry.pa_pfn << PAGE_SHIFT) | offset),
                stale,
            };
        }
        self.stats.iotlb_misses += 1;
        self.stats.walks += 1;
        match self.pt.get(pfn) {
            None => {
                self.stats.faults += 1;
                fault(FaultReason::NotMapped)
            }
            Some(pte) if !pte.prot.allows(write) => {
                self.stats.faults += 1;
                fault(FaultReason::Permission)
            }
            Some(pte) => {
                if self.iotlb.insert(pfn, pte.pa_pfn, pte.prot).is_some() {
                    self.stats.iotlb_evictions += 1;
                }
                Translation::Miss {
                    pa: Pa::from_raw((pte.pa_pfn << PAGE_SHIFT) | offset),
                    levels: IO_PAGE_TABLE_LEVELS,
                }
            }
        }
    }

    /// Returns what the IO page table maps `iova` to (with its page offset) and the permissions; the IOTLB
    /// is neither consulted nor changed. Identity domains return `(iova as pa, READ_WRITE)`.
    pub fn lookup(&self, iova: Iova) -> Option<(Pa, IommuProt)> {
        if self.cfg.domain_type == DomainType::Identity {
            return Some((Pa::from_raw(iova.raw()), IommuProt::READ_WRITE));
        }
        self.pt.get(iova.page_number()).map(|pte| {
            (
                Pa::from_raw((pte.pa_pfn << PAGE_SHIFT) | iova.page_offset()),
                pte.prot,
            )
        })
    }
}

#[cfg(test)]
mod tests;
