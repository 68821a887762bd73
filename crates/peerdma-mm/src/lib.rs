//! The memory-management model: physical frames with real bytes, process address spaces with VMAs and a
//! multi-level page table, the system calls that change them (`mmap`, `munmap`, `mprotect`, `madvise`,
//! `fork`, exit), CPU faults with copy-on-write, interval notifiers and `hmm_range_fault`, and the coherence
//! oracle that checks every access.
//!
//! Linux counterparts: mm/memory.c (faults, COW, zap), mm/mmap.c and mm/mprotect.c (VMAs), mm/mmu_notifier.c,
//! mm/hmm.c. The behavioural reference is spec/linux-hmm.md; section numbers are cited where they apply.
//!
//! Everything lives in one [`Kernel`] shared by the simulation's agents as `Rc<Kernel>`; its operations are
//! `async` and yield to other agents exactly where Linux can sleep (see [`kernel`]).
//!
//! One module per kernel mechanism, named after its Linux file: [`memory`] (faults, COW, zap), [`mmap`],
//! [`mprotect`], [`mremap`], [`madvise`], [`khugepaged`], [`fork`], [`filemap`], [`mmu_notifier`]
//! (interval notifiers), [`hmm`], [`gup`], [`migrate`], [`migrate_device`], [`rmap`], [`vmscan`] (reclaim
//! and swap), [`p2pdma`], [`oracle`], with [`pagetable`] (the table and its range cursor), [`phys`] and [`vma`]
//! below them. [`kernel`] is the facade over them; other crates ask it narrow questions ([`introspect`]) and
//! never borrow its state. `tests/module_graph.rs` keeps the modules' imports acyclic.

pub mod costs;
pub mod device_access;
pub mod driver_page;
pub mod file;
pub mod filemap;
pub mod fork;
pub mod gup;
pub mod hmm;
pub mod introspect;
pub mod kernel;
pub mod khugepaged;
pub mod madvise;
pub mod memory;
pub mod migrate;
pub mod migrate_device;
pub mod mmap;
pub mod mmu_notifier;
pub mod mprotect;
pub mod mremap;
pub mod oracle;
pub mod p2pdma;
pub mod pagetable;
pub mod phys;
pub mod rmap;
pub mod vma;
pub mod vmscan;

pub use costs::MmCosts;
pub use device_access::{DeviceData, DeviceGrant, FrameTranslation};
pub use gup::{GupFlags, PinnedPage, PinnedPages, folio_is_longterm_pinnable};
pub use kernel::{Kernel, SigInfo, Signal, ThpPolicy, VmFault};
pub use madvise::Advice;
pub use migrate::{DevicePagemapOps, MigrateVma};
pub use mmap::MmapArgs;
pub use mmu_notifier::{IntervalNotifierOps, NotifierEvent, NotifierId, NotifierRange};
pub use mremap::MremapFlags;
pub use oracle::{LogicalPage, Violation, ViolationKind};
pub use phys::{FrameInfo, GfpZone, LruState, MemoryKind, MovableError};
pub use vma::{MmioId, Prot, VmFlags, Vma, VmaBacking};
