//! GUP's decision tables of spec/linux-p2p.md §2 as table-driven tests, one case per row: §2.2 argument
//! validation (the LONGTERM | PCI_P2PDMA row end to end), §2.3 `check_vma_flags`, §2.4 `try_grab_folio` and
//! the `folio_is_longterm_pinnable` table. Each row names what it checks; a failing row is reported by name.
#![expect(
    clippy::tests_outside_test_module,
    clippy::unwrap_used,
    reason = "an integration-test crate is all tests"
)]

use std::cell::RefCell;
use std::future::Future;
use std::rc::Rc;

use peerdma_core::{DeviceId, Errno, FrameId, PAGE_SIZE, Pa, Pid, Range, Va};
use peerdma_mm::migrate::{MIGRATE_PFN_WRITE, MIGRATE_VMA_SELECT_SYSTEM, migrate_pfn};
use peerdma_mm::{
    GupFlags as F, Kernel, MemoryKind, MigrateVma, MmCosts, MmapArgs, Prot,
    folio_is_longterm_pinnable,
};
use peerdma_sim::{RunOutcome, Sim, SimConfig};

fn run<T: 'static, Fut: Future<Output = T> + 'static>(f: impl FnOnce(Rc<Kernel>) -> Fut) -> T {
    let sim = Sim::new(SimConfig::default());
    let k = Kernel::new(&sim, 64 << 20, MmCosts::zero());
    let out = Rc::new(RefCell::new(None));
    let (o, fut) = (out.clone(), f(k));
    sim.spawn("test", async move { *o.borrow_mut() = Some(fut.await) });
    assert_eq!(sim.run(), RunOutcome::Completed);
    out.borrow_mut().take().unwrap()
}

fn pages(n: u64) -> u64 {
    n * PAGE_SIZE
}

fn anon(n: u64, prot: Prot) -> MmapArgs {
    MmapArgs {
        len: pages(n),
        prot,
        private: true,
        anonymous: true,
        ..MmapArgs::default()
    }
}

fn file_map(file: u32, n: u64, prot: Prot, shared: bool) -> MmapArgs {
    MmapArgs {
        len: pages(n),
        prot,
        shared,
        private: !shared,
        file: Some(file),
        ..MmapArgs::default()
    }
}

fn frame_of(k: &Kernel, pid: Pid, va: Va) -> Option<FrameId> {
    k.translate(pid, va).map(|(f, _)| f)
}

/// Every kind of mapping the tables need, in one address space.
struct Maps {
    pid: Pid,
    anon_rw: Va,
    anon_ro: Va,
    anon_none: Va,
    shmem: Va,
    file_shared: Va,
    file_shared_ro: Va,
    file_private_ro: Va,
    dax: Va,
    pfnmap_lazy: Va,
    pfnmap_mmio: Va,
    p2p: Va,
    zero: Va,
    coherent: Va,
    hole: Va,
}

async fn maps(k: &Rc<Kernel>) -> Maps {
    let pid = k.create_process();
    let anon_rw = k.mmap(pid, &anon(2, Prot::RW)).await.unwrap();
    k.store(pid, anon_rw, &[1]).await.unwrap();
    let anon_ro = k.mmap(pid, &anon(1, Prot::READ)).await.unwrap();
    let anon_none = k.mmap(pid, &anon(1, Prot::NONE)).await.unwrap();
    let shmem = k
        .mmap(
            pid,
            &MmapArgs {
                len: PAGE_SIZE,
                prot: Prot::RW,
                shared: true,
                anonymous: true,
                ..MmapArgs::default()
            },
        )
        .await
        .unwrap();
    let file = k.create_file("f", pages(1), false);
    let file_shared = k
        .mmap(pid, &file_map(file, 1, Prot::RW, true))
        .await
        .unwrap();
    let file_shared_ro = k
        .mmap(pid, &file_map(file, 1, Prot::READ, true))
        .await
        .unwrap();
    let file_private_ro = k
        .mmap(pid, &file_map(file, 1, Prot::READ, false))
        .await
        .unwrap();
    let dax_file = k.create_dax_file("pmem", pages(1));
    let dax = k
        .mmap(pid, &file_map(dax_file, 1, Prot::RW, true))
        .await
        .unwrap();
    let pfnmap_lazy = k.mmap_pfnmap(pid, PAGE_SIZE, Prot::RW).await.unwrap();
    let bar = k.add_mmio(
        DeviceId(5),
        Range::from_len(Pa::from_raw(0x40_0000_0000), pages(1)).unwrap(),
    );
    let pfnmap_mmio = k
        .mmap_pfnmap_mmio(pid, bar, 0, PAGE_SIZE, Prot::RW)
        .await
        .unwrap();
    let region = k.add_p2p_memory(DeviceId(5), Pa::from_raw(0x41_0000_0000), pages(2));
    let p2p = k
        .mmap_p2pmem(pid, region, PAGE_SIZE, Prot::RW, true, 0)
        .await
        .unwrap();
    // A read fault of private anonymous memory maps the shared zero page.
    let zero = k.mmap(pid, &anon(1, Prot::RW)).await.unwrap();
    k.load(pid, zero, &mut [0u8; 1]).await.unwrap();
    let coherent = coherent_page(k, pid).await;
    Maps {
        pid,
        anon_rw,
        anon_ro,
        anon_none,
        shmem,
        file_shared,
        file_shared_ro,
        file_private_ro,
        dax,
        pfnmap_lazy,
        pfnmap_mmio,
        p2p,
        zero,
        coherent,
        // Below MMAP_MIN: never inside a VMA.
        hole: Va::from_raw(0x1000_0000),
    }
}

/// Pagemap callbacks for device-coherent memory: the CPU reaches it directly, so `migrate_to_ram` is never
/// called.
#[derive(Debug)]
struct NoPagemapOps;

impl peerdma_mm::DevicePagemapOps for NoPagemapOps {
    fn migrate_to_ram<'a>(
        &'a self,
        _pid: Pid,
        _va: Va,
        _frame: FrameId,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<(), peerdma_mm::VmFault>> + 'a>> {
        unreachable!("device-coherent memory never faults to RAM")
    }
}

/// Maps one anonymous page and migrates it into device-coherent memory (MIGRATE_VMA_SELECT_SYSTEM).
async fn coherent_page(k: &Rc<Kernel>, pid: Pid) -> Va {
    let owner = DeviceId(6);
    let r = k.add_device_memory(
        MemoryKind::DeviceCoherent { owner },
        16 * PAGE_SIZE,
        Rc::new(NoPagemapOps),
    );
    let va = k.mmap(pid, &anon(1, Prot::RW)).await.unwrap();
    k.store(pid, va, &[0x5a]).await.unwrap();
    let mut m = MigrateVma::new(
        pid,
        Range::from_len(va, PAGE_SIZE).unwrap(),
        MIGRATE_VMA_SELECT_SYSTEM,
        owner,
    );
    {
        let lock = k.mmap_lock(pid);
        let _g = lock.read().await;
        k.migrate_vma_setup(&mut m).await.unwrap();
        let src = frame_of(k, pid, va);
        let dst = k.alloc_page(r).unwrap();
        assert!(src.is_none(), "setup installed a migration entry");
        let old = peerdma_mm::migrate::migrate_pfn_to_frame(m.src[0]).unwrap();
        k.copy_page(old, dst);
        m.dst[0] = migrate_pfn(dst) | MIGRATE_PFN_WRITE;
        k.migrate_vma_pages(&mut m).await;
        k.migrate_vma_finalize(&mut m);
    }
    let f = frame_of(k, pid, va).unwrap();
    assert!(matches!(
        k.memory_kind(f),
        MemoryKind::DeviceCoherent { .. }
    ));
    va
}

/// One GUP case: the call, what it must return, and (for §2.4) how much the first page's refcount grows
/// while the pages are held.
struct Row {
    name: &'static str,
    va: fn(&Maps) -> Va,
    nr: u64,
    flags: F,
    want: Result<usize, Errno>,
    delta: Option<u32>,
}

const fn row(
    name: &'static str,
    va: fn(&Maps) -> Va,
    nr: u64,
    flags: F,
    want: Result<usize, Errno>,
) -> Row {
    Row {
        name,
        va,
        nr,
        flags,
        want,
        delta: None,
    }
}

const fn grab(
    name: &'static str,
    va: fn(&Maps) -> Va,
    flags: F,
    want: Result<usize, Errno>,
    delta: u32,
) -> Row {
    Row {
        name,
        va,
        nr: 1,
        flags,
        want,
        delta: Some(delta),
    }
}

/// Runs every row in a fresh simulation and panics listing the rows that did not behave.
fn check(rows: Vec<Row>) {
    let failures = run(|k| async move {
        let m = maps(&k).await;
        let mut failures = Vec::new();
        for r in rows {
            let va = (r.va)(&m);
            let frame = frame_of(&k, m.pid, va);
            let before = frame.map(|f| k.frame_info(f).refcount);
            let got = k.get_user_pages(m.pid, va, r.nr, r.flags).await;
            let held = frame.map(|f| k.frame_info(f).refcount);
            let got_len = got
                .as_ref()
                .map(peerdma_mm::PinnedPages::len)
                .map_err(|e| *e);
            let delta = before.zip(held).map(|(b, h)| h - b);
            if got_len != r.want || (r.delta.is_some() && delta != r.delta) {
                failures.push(format!(
                    "{}: got {got_len:?} (refcount +{delta:?}), want {:?} (+{:?})",
                    r.name, r.want, r.delta
                ));
            }
            drop(got);
            let after = frame.map(|f| k.frame_info(f).refcount);
            if after != before && r.delta.is_some() {
                failures.push(format!("{}: refcount not restored on release", r.name));
            }
        }
        failures
    });
    assert!(failures.is_empty(), "rows failed:\n{}", failures.join("\n"));
}

/// spec §2.3 `check_vma_flags`, one row per table line (plus the line's "unless" counterpart, so each
/// check must be the one that decides).
#[test]
fn gup_per_vma_table() {
    check(vec![
        row(
            "VM_IO|VM_PFNMAP (lazy remap) is EFAULT",
            |m| m.pfnmap_lazy,
            1,
            F::GET,
            Err(Errno::EFAULT),
        ),
        row(
            "VM_IO|VM_PFNMAP (remap_pfn_range) is EFAULT",
            |m| m.pfnmap_mmio,
            1,
            F::GET,
            Err(Errno::EFAULT),
        ),
        row(
            "VM_PFNMAP is EFAULT even with PCI_P2PDMA",
            |m| m.pfnmap_mmio,
            1,
            F::PIN | F::PCI_P2PDMA,
            Err(Errno::EFAULT),
        ),
        row(
            "FOLL_ANON on shmem is EFAULT",
            |m| m.shmem,
            1,
            F::GET | F::ANON,
            Err(Errno::EFAULT),
        ),
        row(
            "FOLL_ANON on a shared file is EFAULT",
            |m| m.file_shared,
            1,
            F::GET | F::ANON,
            Err(Errno::EFAULT),
        ),
        row(
            "FOLL_ANON on private anon is fine",
            |m| m.anon_rw,
            1,
            F::GET | F::ANON,
            Ok(1),
        ),
        row(
            "LONGTERM on fsdax is EOPNOTSUPP",
            |m| m.dax,
            1,
            F::PIN | F::LONGTERM,
            Err(Errno::EOPNOTSUPP),
        ),
        row(
            "short-term pin of fsdax is fine",
            |m| m.dax,
            1,
            F::PIN,
            Ok(1),
        ),
        row(
            "write to a VMA without VM_WRITE is EFAULT",
            |m| m.anon_ro,
            1,
            F::GET | F::WRITE,
            Err(Errno::EFAULT),
        ),
        row(
            "... FORCE on a private mapping is allowed",
            |m| m.anon_ro,
            1,
            F::GET | F::WRITE | F::FORCE,
            Ok(1),
        ),
        row(
            "... FORCE on a private file mapping is allowed",
            |m| m.file_private_ro,
            1,
            F::GET | F::WRITE | F::FORCE,
            Ok(1),
        ),
        row(
            "... FORCE on a shared mapping is still EFAULT",
            |m| m.file_shared_ro,
            1,
            F::GET | F::WRITE | F::FORCE,
            Err(Errno::EFAULT),
        ),
        row(
            "read without VM_READ is EFAULT",
            |m| m.anon_none,
            1,
            F::GET,
            Err(Errno::EFAULT),
        ),
        row("read with VM_READ is fine", |m| m.anon_ro, 1, F::GET, Ok(1)),
        row(
            "long-term writable pin of a dirty-tracked shared file is EFAULT",
            |m| m.file_shared,
            1,
            F::PIN | F::LONGTERM | F::WRITE,
            Err(Errno::EFAULT),
        ),
        row(
            "... shmem is fine",
            |m| m.shmem,
            1,
            F::PIN | F::LONGTERM | F::WRITE,
            Ok(1),
        ),
        row(
            "... a short-term writable pin of the file is fine",
            |m| m.file_shared,
            1,
            F::PIN | F::WRITE,
            Ok(1),
        ),
        row(
            "... a long-term read-only pin of the file is fine",
            |m| m.file_shared,
            1,
            F::PIN | F::LONGTERM,
            Ok(1),
        ),
        row(
            "no VMA is EFAULT",
            |m| m.hole,
            1,
            F::GET,
            Err(Errno::EFAULT),
        ),
        row(
            "a hole after the first page is a partial result",
            |m| m.anon_rw.add(PAGE_SIZE),
            2,
            F::GET,
            Ok(1),
        ),
    ]);
}

/// spec §2.4 `try_grab_folio`, one row per step (and per flag where the step depends on it).
#[test]
fn gup_per_page_grab_table() {
    const BIAS: u32 = 1024;
    check(vec![
        grab("GET adds 1", |m| m.anon_rw, F::GET, Ok(1), 1),
        grab(
            "PIN adds GUP_PIN_COUNTING_BIAS",
            |m| m.anon_rw,
            F::PIN | F::WRITE,
            Ok(1),
            BIAS,
        ),
        grab(
            "PIN|LONGTERM of RAM adds the bias in place",
            |m| m.anon_rw,
            F::PIN | F::LONGTERM | F::WRITE,
            Ok(1),
            BIAS,
        ),
        grab(
            "the zero page is never pin-counted",
            |m| m.zero,
            F::PIN,
            Ok(1),
            0,
        ),
        grab(
            "P2P page without PCI_P2PDMA (GET) is EREMOTEIO",
            |m| m.p2p,
            F::GET,
            Err(Errno::EREMOTEIO),
            0,
        ),
        grab(
            "P2P page without PCI_P2PDMA (PIN) is EREMOTEIO",
            |m| m.p2p,
            F::PIN,
            Err(Errno::EREMOTEIO),
            0,
        ),
        grab(
            "P2P page, PIN|LONGTERM without PCI_P2PDMA is EREMOTEIO (pinnable, but not accepted)",
            |m| m.p2p,
            F::PIN | F::LONGTERM,
            Err(Errno::EREMOTEIO),
            0,
        ),
        grab(
            "P2P page with PCI_P2PDMA (GET) adds 1",
            |m| m.p2p,
            F::GET | F::PCI_P2PDMA,
            Ok(1),
            1,
        ),
        grab(
            "P2P page with PCI_P2PDMA (PIN) adds the bias",
            |m| m.p2p,
            F::PIN | F::WRITE | F::PCI_P2PDMA,
            Ok(1),
            BIAS,
        ),
        grab(
            "PCI_P2PDMA on RAM changes nothing",
            |m| m.anon_rw,
            F::PIN | F::PCI_P2PDMA,
            Ok(1),
            BIAS,
        ),
    ]);
}

/// spec §2.4 step 1: a page whose refcount is 0 cannot be grabbed (`ENOMEM`), and that check comes before
/// the P2PDMA one. The model never maps a frame with refcount 0, so the state is made by hand.
#[test]
fn gup_grab_of_a_page_with_refcount_zero_is_enomem_before_the_p2p_check() {
    let rows = run(|k| async move {
        let m = maps(&k).await;
        let mut out = Vec::new();
        for (va, flags) in [(m.anon_rw, F::GET), (m.p2p, F::GET), (m.p2p, F::PIN)] {
            let f = frame_of(&k, m.pid, va).unwrap();
            let saved = k.set_frame_refcount(f, 0);
            let got = k.get_user_pages(m.pid, va, 1, flags).await.map(|p| p.len());
            k.set_frame_refcount(f, saved);
            out.push(got);
        }
        out
    });
    assert_eq!(rows, [Err(Errno::ENOMEM); 3]);
}

/// spec §2.2, the row that concerns P2P memory, through the public entry point: LONGTERM with PCI_P2PDMA is
/// `EINVAL` before any VMA is looked at, whatever the range holds.
#[test]
fn gup_longterm_with_pci_p2pdma_is_einval_table() {
    let lt_p2p = F::PIN | F::LONGTERM | F::PCI_P2PDMA;
    check(vec![
        row("on P2P memory", |m| m.p2p, 1, lt_p2p, Err(Errno::EINVAL)),
        row("on RAM", |m| m.anon_rw, 1, lt_p2p, Err(Errno::EINVAL)),
        row(
            "on no VMA (not EFAULT)",
            |m| m.hole,
            1,
            lt_p2p,
            Err(Errno::EINVAL),
        ),
        row(
            "on PFNMAP (not EFAULT)",
            |m| m.pfnmap_mmio,
            1,
            lt_p2p,
            Err(Errno::EINVAL),
        ),
        row(
            "with WRITE too",
            |m| m.p2p,
            1,
            lt_p2p | F::WRITE,
            Err(Errno::EINVAL),
        ),
        row(
            "PIN|PCI_P2PDMA alone is fine",
            |m| m.p2p,
            1,
            F::PIN | F::PCI_P2PDMA,
            Ok(1),
        ),
    ]);
}

/// spec §2.4 `folio_is_longterm_pinnable`, one row per folio kind.
#[test]
fn folio_is_longterm_pinnable_table() {
    let dev = DeviceId(1);
    // (row, kind, is the zero page, in ZONE_MOVABLE, long-term pinnable)
    let rows = [
        ("RAM", MemoryKind::Ram { node: 0 }, false, false, true),
        (
            "RAM of another node",
            MemoryKind::Ram { node: 1 },
            false,
            false,
            true,
        ),
        (
            "RAM of a movable node (ZONE_MOVABLE)",
            MemoryKind::Ram { node: 1 },
            false,
            true,
            false,
        ),
        (
            "the zero page",
            MemoryKind::Ram { node: 0 },
            true,
            false,
            true,
        ),
        (
            "device-coherent",
            MemoryKind::DeviceCoherent { owner: dev },
            false,
            false,
            false,
        ),
        ("fsdax", MemoryKind::FsDax { file: 0 }, false, false, false),
        (
            "P2PDMA pgmap page",
            MemoryKind::P2pMem { provider: dev },
            false,
            false,
            true,
        ),
        (
            "device-private (never reached: GUP migrates it to RAM first)",
            MemoryKind::DevicePrivate { owner: dev },
            false,
            false,
            true,
        ),
    ];
    let wrong: Vec<&str> = rows
        .iter()
        .filter(|(_, kind, zero, movable, want)| {
            folio_is_longterm_pinnable(*kind, *zero, *movable) != *want
        })
        .map(|(name, ..)| *name)
        .collect();
    assert!(wrong.is_empty(), "rows failed: {wrong:?}");
}

/// The long-term loop acts on the table: a device-coherent page is migrated to RAM and the range re-pinned;
/// a pinnable page is pinned where it is.
#[test]
fn longterm_pin_migrates_only_unpinnable_folios() {
    let (coherent, ram) = run(|k| async move {
        let m = maps(&k).await;
        let mut out = Vec::new();
        for va in [m.coherent, m.anon_rw] {
            let before = frame_of(&k, m.pid, va).unwrap();
            let pin = k
                .get_user_pages(m.pid, va, 1, F::PIN | F::LONGTERM | F::WRITE)
                .await
                .unwrap();
            let f = pin.frames()[0];
            let mut b = [0u8; 1];
            k.read_frame(f, 0, &mut b);
            out.push((f == before, k.memory_kind(f), b[0]));
        }
        (out[0], out[1])
    });
    assert_eq!(
        coherent,
        (false, MemoryKind::Ram { node: 0 }, 0x5a),
        "moved to RAM, bytes kept"
    );
    assert_eq!(
        ram,
        (true, MemoryKind::Ram { node: 0 }, 1),
        "pinned in place"
    );
}
