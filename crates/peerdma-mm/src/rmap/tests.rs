//! The reverse index against the walk of every leaf it replaced ([`Mms::rmap_walk_all_leaves`]), over random
//! sequences of the operations that change mappings: new unrelated processes, mmap (private, shared,
//! THP-eligible), faults, fork, exit, mremap, munmap, mprotect, MADV_DONTNEED, MADV_COLLAPSE, migration to device-private memory and back
//! (by CPU fault and by device-range eviction), reclaim to swap and swap-in, and THP splits (partial
//! munmap / mprotect / DONTNEED of a 2 MiB leaf, migration of a THP's sub-page). The same runs check the LRU's
//! log of freed frames against a walk of every LRU entry ([`crate::vmscan::Swap::check_lru`]).

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::rc::{Rc, Weak};

use peerdma_core::{Advice, DeviceId, FrameId, PAGE_SIZE, PageSize, Pid, Range, Va};
use proptest::prelude::*;

use crate::kernel::Mms;
use crate::migrate::{
    MIGRATE_PFN_MIGRATE, MIGRATE_PFN_WRITE, MIGRATE_VMA_SELECT_DEVICE_PRIVATE,
    MIGRATE_VMA_SELECT_SYSTEM, migrate_pfn, migrate_pfn_to_frame,
};
use crate::pagetable::Pte;
use crate::phys::PhysMem;
use crate::{
    DevicePagemapOps, Kernel, MemoryKind, MigrateVma, MmCosts, MmapArgs, MremapFlags, Prot, VmFault,
};
use peerdma_sim::{Sim, SimConfig};

const OWNER: DeviceId = DeviceId(3);
/// Pages of device-private memory.
const DEVICE_PAGES: u64 = 1024;

/// Migrates `range` of `pid` with `flags` into region `r` (as many pages as it has room for).
async fn migrate(k: &Kernel, pid: Pid, range: Range<Va>, flags: u32, r: usize) {
    let mut m = MigrateVma::new(pid, range, flags, OWNER);
    if k.migrate_vma_setup(&mut m).await.is_err() {
        return;
    }
    for i in 0..m.src.len() {
        if m.src[i] & MIGRATE_PFN_MIGRATE == 0 {
            continue;
        }
        let (Some(src), Some(dst)) = (migrate_pfn_to_frame(m.src[i]), k.alloc_page(r)) else {
            continue;
        };
        k.copy_page(src, dst);
        m.dst[i] = migrate_pfn(dst) | (m.src[i] & MIGRATE_PFN_WRITE);
    }
    k.migrate_vma_pages(&mut m).await;
    k.migrate_vma_finalize(&mut m);
}

/// `migrate_to_ram`: the faulting page goes back to RAM (region 0).
#[derive(Debug, Default)]
struct ToRam {
    kernel: RefCell<Weak<Kernel>>,
}

impl DevicePagemapOps for ToRam {
    fn migrate_to_ram<'a>(
        &'a self,
        pid: Pid,
        va: Va,
        _frame: FrameId,
    ) -> Pin<Box<dyn Future<Output = Result<(), VmFault>> + 'a>> {
        Box::pin(async move {
            let k = self.kernel.borrow().upgrade().ok_or(VmFault::Sigbus)?;
            let page =
                Range::from_len(va.align_down(PAGE_SIZE), PAGE_SIZE).ok_or(VmFault::Sigbus)?;
            migrate(&k, pid, page, MIGRATE_VMA_SELECT_DEVICE_PRIVATE, 0).await;
            Ok(())
        })
    }
}

/// One step of a sequence; `p` and `v` pick a process and one of its mappings modulo how many there are.
#[derive(Clone, Debug)]
enum Op {
    Mmap {
        pages: u64,
        shared: bool,
        huge: bool,
    },
    Touch {
        p: usize,
        v: usize,
        page: u64,
        write: bool,
    },
    TouchAll {
        p: usize,
        v: usize,
    },
    Fork {
        p: usize,
    },
    /// A new process, unrelated to the others (later `Mmap`s map into it).
    Spawn,
    Exit {
        p: usize,
    },
    Mremap {
        p: usize,
        v: usize,
        pages: u64,
    },
    Munmap {
        p: usize,
        v: usize,
        page: u64,
        pages: u64,
    },
    Mprotect {
        p: usize,
        v: usize,
        page: u64,
        pages: u64,
        write: bool,
    },
    DontNeed {
        p: usize,
        v: usize,
        page: u64,
        pages: u64,
    },
    Collapse {
        p: usize,
        v: usize,
    },
    ToDevice {
        p: usize,
        v: usize,
        page: u64,
        pages: u64,
    },
    Evict {
        first: u64,
        pages: u64,
    },
    Reclaim {
        nr: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let p = 0usize..8;
    let v = 0usize..8;
    prop_oneof![
        (1u64..16, any::<bool>(), any::<bool>()).prop_map(|(pages, shared, huge)| Op::Mmap {
            pages,
            shared,
            huge
        }),
        (p.clone(), v.clone(), 0u64..1024, any::<bool>())
            .prop_map(|(p, v, page, write)| Op::Touch { p, v, page, write }),
        (p.clone(), v.clone()).prop_map(|(p, v)| Op::TouchAll { p, v }),
        p.clone().prop_map(|p| Op::Fork { p }),
        Just(Op::Spawn),
        p.clone().prop_map(|p| Op::Exit { p }),
        (p.clone(), v.clone(), 1u64..24).prop_map(|(p, v, pages)| Op::Mremap { p, v, pages }),
        (p.clone(), v.clone(), 0u64..1024, 1u64..8).prop_map(|(p, v, page, pages)| Op::Munmap {
            p,
            v,
            page,
            pages
        }),
        (p.clone(), v.clone(), 0u64..1024, 1u64..8, any::<bool>()).prop_map(
            |(p, v, page, pages, write)| Op::Mprotect {
                p,
                v,
                page,
                pages,
                write
            }
        ),
        (p.clone(), v.clone(), 0u64..1024, 1u64..8).prop_map(|(p, v, page, pages)| Op::DontNeed {
            p,
            v,
            page,
            pages
        }),
        (p.clone(), v.clone()).prop_map(|(p, v)| Op::Collapse { p, v }),
        (p, v, 0u64..1024, 1u64..64).prop_map(|(p, v, page, pages)| Op::ToDevice {
            p,
            v,
            page,
            pages
        }),
        (0u64..DEVICE_PAGES, 1u64..64).prop_map(|(first, pages)| Op::Evict { first, pages }),
        (1u64..64).prop_map(|nr| Op::Reclaim { nr }),
    ]
}

/// The processes of a run and the ranges they mapped (which may have been unmapped since: operations on
/// them then fail or find nothing, which is fine).
#[derive(Default)]
struct Procs(Vec<(Pid, Vec<(Va, u64)>)>);

impl Procs {
    fn pick(&self, p: usize) -> Option<usize> {
        (!self.0.is_empty()).then(|| p % self.0.len())
    }

    /// The process, the start of its `v`-th mapping and its length in pages.
    fn vma(&self, p: usize, v: usize) -> Option<(Pid, usize, Va, u64)> {
        let i = self.pick(p)?;
        let (pid, vmas) = &self.0[i];
        let j = (!vmas.is_empty()).then(|| v % vmas.len())?;
        let (va, pages) = vmas[j];
        Some((*pid, j, va, pages))
    }

    /// `page .. page + pages` of the `v`-th mapping, clipped to it.
    fn part(&self, p: usize, v: usize, page: u64, pages: u64) -> Option<(Pid, Range<Va>)> {
        let (pid, _, va, len) = self.vma(p, v)?;
        let first = page % len;
        let n = pages.min(len - first);
        Some((
            pid,
            Range::from_len(va.add(first * PAGE_SIZE), n * PAGE_SIZE)?,
        ))
    }
}

async fn apply(k: &Rc<Kernel>, dev: usize, dev_first: FrameId, procs: &mut Procs, op: &Op) {
    match *op {
        Op::Mmap {
            pages,
            shared,
            huge,
        } => {
            if procs.0.is_empty() {
                procs.0.push((k.create_process(), Vec::new()));
            }
            let pages = if huge { pages * 512 / 4 } else { pages };
            let i = procs.0.len() - 1;
            let pid = procs.0[i].0;
            let args = MmapArgs {
                len: pages * PAGE_SIZE,
                prot: Prot::RW,
                shared,
                private: !shared,
                anonymous: true,
                ..MmapArgs::default()
            };
            if let Ok(va) = k.mmap(pid, &args).await {
                if huge {
                    let _ = k
                        .madvise(pid, va, pages * PAGE_SIZE, Advice::HugePage)
                        .await;
                }
                procs.0[i].1.push((va, pages));
            }
        }
        Op::Touch { p, v, page, write } => {
            if let Some((pid, r)) = procs.part(p, v, page, 1) {
                if write {
                    let _ = k.store(pid, r.start, &[7]).await;
                } else {
                    let _ = k.load(pid, r.start, &mut [0]).await;
                }
            }
        }
        Op::TouchAll { p, v } => {
            if let Some((pid, _, va, len)) = procs.vma(p, v) {
                for i in 0..len {
                    let _ = k.store(pid, va.add(i * PAGE_SIZE), &[1]).await;
                }
            }
        }
        Op::Fork { p } => {
            if let Some(i) = procs.pick(p)
                && procs.0.len() < 4
                && let Ok(child) = k.fork(procs.0[i].0).await
            {
                let vmas = procs.0[i].1.clone();
                procs.0.push((child, vmas));
            }
        }
        Op::Spawn => {
            if procs.0.len() < 6 {
                procs.0.push((k.create_process(), Vec::new()));
            }
        }
        Op::Exit { p } => {
            if let Some(i) = procs.pick(p) {
                let (pid, _) = procs.0.remove(i);
                k.exit(pid).await;
            }
        }
        Op::Mremap { p, v, pages } => {
            if let Some((pid, j, va, len)) = procs.vma(p, v) {
                let flags = MremapFlags {
                    maymove: true,
                    ..MremapFlags::default()
                };
                if let Ok(new) = k
                    .mremap(pid, va, len * PAGE_SIZE, pages * PAGE_SIZE, flags)
                    .await
                {
                    let i = procs.pick(p).expect("picked above");
                    procs.0[i].1[j] = (new, pages);
                }
            }
        }
        Op::Munmap { p, v, page, pages } => {
            if let Some((pid, r)) = procs.part(p, v, page, pages) {
                let _ = k.munmap(pid, r.start, r.len()).await;
            }
        }
        Op::Mprotect {
            p,
            v,
            page,
            pages,
            write,
        } => {
            if let Some((pid, r)) = procs.part(p, v, page, pages) {
                let prot = if write { Prot::RW } else { Prot::READ };
                let _ = k.mprotect(pid, r.start, r.len(), prot).await;
            }
        }
        Op::DontNeed { p, v, page, pages } => {
            if let Some((pid, r)) = procs.part(p, v, page, pages) {
                let _ = k.madvise(pid, r.start, r.len(), Advice::DontNeed).await;
            }
        }
        Op::Collapse { p, v } => {
            if let Some((pid, _, va, len)) = procs.vma(p, v) {
                let _ = k.madvise(pid, va, len * PAGE_SIZE, Advice::Collapse).await;
            }
        }
        Op::ToDevice { p, v, page, pages } => {
            if let Some((pid, r)) = procs.part(p, v, page, pages) {
                migrate(k, pid, r, MIGRATE_VMA_SELECT_SYSTEM, dev).await;
            }
        }
        Op::Evict { first, pages } => {
            let n = pages.min(DEVICE_PAGES - first);
            let mut src = vec![0u64; usize::try_from(n).expect("small")];
            k.migrate_device_range(&mut src, FrameId(dev_first.0 + first), n)
                .await;
            let dst: Vec<u64> = src
                .iter()
                .map(|&s| {
                    migrate_pfn_to_frame(s)
                        .filter(|_| s & MIGRATE_PFN_MIGRATE != 0)
                        .and_then(|f| {
                            let d = k.alloc_page(0)?;
                            k.copy_page(f, d);
                            Some(migrate_pfn(d))
                        })
                        .unwrap_or(0)
                })
                .collect();
            k.migrate_device_pages(&mut src, &dst);
            k.migrate_device_finalize(&src, &dst);
        }
        Op::Reclaim { nr } => {
            k.reclaim(nr).await;
        }
    }
}

/// Compares the index-based walk with the all-leaves walk for every frame mapped now or before, and for a
/// few single frames. Returns a description of the first difference.
fn check(
    st: &Mms,
    phys: &PhysMem,
    seen: &mut BTreeSet<FrameId>,
    step: usize,
) -> Result<(), String> {
    seen.extend(st.rmap_walk_all_leaves(|_| true).iter().map(|m| m.frame));
    let old = st.rmap_walk_all_leaves(|f| seen.contains(&f));
    let new = st.rmap_walk(phys, seen.iter().copied());
    if old != new {
        return Err(format!("step {step}: all frames\nold {old:?}\nnew {new:?}"));
    }
    for &f in seen.iter().step_by(61) {
        let old = st.rmap_walk_all_leaves(|g| g == f);
        let new = st.rmap_walk(phys, [f, f]);
        if old != new {
            return Err(format!("step {step}: frame {f}\nold {old:?}\nnew {new:?}"));
        }
    }
    let indexed: usize = st.live().map(|mm| mm.pt().rmap().len()).sum();
    let leaves: usize = st
        .live()
        .map(|mm| {
            mm.pt()
                .leaves(Va::from_raw(0), Va::from_raw(u64::MAX))
                .iter()
                .filter(|l| {
                    l.pte.frame().is_some() && !matches!(l.pte, Pte::Present { special: true, .. })
                })
                .count()
        })
        .sum();
    if indexed != leaves {
        return Err(format!("step {step}: {indexed} indexed, {leaves} leaves"));
    }
    Ok(())
}

/// A fresh engine and kernel with 32 MiB of RAM and a device-private region of [`DEVICE_PAGES`] whose
/// `migrate_to_ram` is [`ToRam`]; returns the region's index and first frame too.
fn world() -> (Sim, Rc<Kernel>, usize, FrameId) {
    let sim = Sim::new(SimConfig {
        trace: false,
        ..SimConfig::default()
    });
    let k = Kernel::new(&sim, 32 << 20, MmCosts::zero());
    let ops_dev = Rc::new(ToRam::default());
    *ops_dev.kernel.borrow_mut() = Rc::downgrade(&k);
    let dev = k.add_device_memory(
        MemoryKind::DevicePrivate { owner: OWNER },
        DEVICE_PAGES * PAGE_SIZE,
        ops_dev,
    );
    let dev_first = FrameId(k.phys().regions()[dev].start);
    (sim, k, dev, dev_first)
}

/// Runs `ops` on a fresh kernel with 32 MiB of RAM and a device-private region, checking after each;
/// returns the kinds of mapping seen along the way.
fn run(ops: &[Op]) -> Result<BTreeSet<&'static str>, String> {
    let (sim, k, dev, dev_first) = world();
    let out = Rc::new(RefCell::new(Ok(BTreeSet::new())));
    let (o, k2, ops) = (out.clone(), k.clone(), ops.to_vec());
    sim.spawn("ops", async move {
        let mut procs = Procs::default();
        let mut seen = BTreeSet::new();
        let mut seen_kinds = BTreeSet::new();
        for (step, op) in ops.iter().enumerate() {
            apply(&k2, dev, dev_first, &mut procs, op).await;
            let st = k2.mms();
            let lru = k2.swap().check_lru(&mut k2.phys());
            if let Err(e) = lru.and_then(|()| check(&st, &k2.phys(), &mut seen, step)) {
                *o.borrow_mut() = Err(format!("{e}\nops {ops:?}"));
                return;
            }
            let all = st.rmap_walk_all_leaves(|_| true);
            for m in &all {
                seen_kinds.insert(match m.leaf.pte {
                    _ if m.leaf.size != PageSize::Size4K => "pmd",
                    Pte::DevicePrivate { .. } => "device-private",
                    _ => "4k",
                });
            }
            if all
                .iter()
                .any(|m| all.iter().any(|n| n.frame == m.frame && n.pid != m.pid))
            {
                seen_kinds.insert("shared across processes");
            }
            if k2.swap().nr_slots() > 0 {
                seen_kinds.insert("swap");
            }
        }
        *o.borrow_mut() = Ok(seen_kinds);
    });
    sim.run();
    out.replace(Ok(BTreeSet::new()))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn the_index_finds_what_a_walk_of_every_leaf_finds(ops in prop::collection::vec(op(), 1..40)) {
        let r = run(&ops);
        prop_assert!(r.is_ok(), "{}", r.unwrap_err());
    }
}

/// A fixed sequence through every kind of operation, so that the property above cannot pass on sequences
/// that never map anything: it must find mappings of every entry kind along the way.
#[test]
fn a_fixed_sequence_maps_thp_device_and_shared_pages() {
    let ops = [
        Op::Mmap {
            pages: 8,
            shared: false,
            huge: true,
        },
        Op::TouchAll { p: 0, v: 0 },
        Op::Mmap {
            pages: 8,
            shared: true,
            huge: false,
        },
        Op::TouchAll { p: 0, v: 1 },
        Op::Fork { p: 0 },
        Op::Munmap {
            p: 1,
            v: 0,
            page: 3,
            pages: 2,
        },
        Op::ToDevice {
            p: 0,
            v: 0,
            page: 0,
            pages: 16,
        },
        Op::Touch {
            p: 1,
            v: 0,
            page: 1,
            write: true,
        },
        Op::Touch {
            p: 0,
            v: 0,
            page: 2,
            write: false,
        },
        Op::Mremap {
            p: 0,
            v: 1,
            pages: 12,
        },
        Op::Mprotect {
            p: 1,
            v: 1,
            page: 2,
            pages: 3,
            write: false,
        },
        Op::Reclaim { nr: 32 },
        Op::Reclaim { nr: 32 },
        Op::TouchAll { p: 1, v: 1 },
        Op::Evict {
            first: 0,
            pages: 16,
        },
        Op::DontNeed {
            p: 0,
            v: 0,
            page: 5,
            pages: 4,
        },
        Op::Spawn,
        Op::Mmap {
            pages: 8,
            shared: false,
            huge: false,
        },
        Op::TouchAll { p: 2, v: 0 },
        Op::Reclaim { nr: 32 },
        Op::Exit { p: 0 },
    ];
    let kinds = run(&ops).unwrap();
    assert_eq!(
        kinds.into_iter().collect::<Vec<_>>(),
        [
            "4k",
            "device-private",
            "pmd",
            "shared across processes",
            "swap"
        ]
    );
}

/// The overflow of a frame mapped at several addresses of one table, 2 MiB sub-frames and special entries,
/// at the page-table level (the operations above rarely map one frame twice in one address space).
#[test]
fn the_index_follows_a_frame_mapped_twice_a_pmd_leaf_and_skips_special_entries() {
    use crate::pagetable::PageTable;

    fn found(pt: &PageTable, f: u64) -> Vec<u64> {
        let mut out = Vec::new();
        pt.rmap().find(FrameId(f), &mut out);
        let mut v: Vec<u64> = out.iter().map(|(va, _)| va.raw()).collect();
        v.sort_unstable();
        v
    }
    let present = |f: u64| Pte::Present {
        frame: FrameId(f),
        write: true,
        special: false,
    };
    let mut pt = PageTable::new();
    let (a, b, c) = (0x10_0000u64, 0x20_0000u64 + 0x3000, 0x30_0000u64);
    for va in [b, a, c] {
        pt.set_pte(Va::from_raw(va), present(5));
    }
    assert_eq!(found(&pt, 5), [a, b, c]);
    pt.clear(Va::from_raw(a));
    assert_eq!(found(&pt, 5), [b, c]);
    pt.set_pte(
        Va::from_raw(b),
        Pte::Swap {
            slot: 1,
            write: true,
        },
    );
    assert_eq!(found(&pt, 5), [c]);
    pt.set_pte(
        Va::from_raw(c),
        Pte::Migration {
            frame: FrameId(6),
            write: true,
        },
    );
    assert_eq!(found(&pt, 5), Vec::<u64>::new());
    assert_eq!(found(&pt, 6), [c]);
    pt.set_pte(
        Va::from_raw(a),
        Pte::Present {
            frame: FrameId(7),
            write: true,
            special: true,
        },
    );
    assert_eq!(found(&pt, 7), Vec::<u64>::new());

    let base = 0x4000_0000u64;
    pt.set_leaf(Va::from_raw(base), PageSize::Size2M, present(1024));
    assert_eq!(found(&pt, 1030), [base + 6 * PAGE_SIZE]);
    assert_eq!(found(&pt, 1023), Vec::<u64>::new());
    assert_eq!(found(&pt, 1024 + 512), Vec::<u64>::new());
    pt.split_pmd(Va::from_raw(base + 6 * PAGE_SIZE));
    assert_eq!(found(&pt, 1030), [base + 6 * PAGE_SIZE]);
    assert_eq!(found(&pt, 1024 + 511), [base + 511 * PAGE_SIZE]);
    assert_eq!(pt.rmap().len(), 1 + 512);
}

/// The walk visits the address spaces of a page's family, not every live one: moving a forked process's pages
/// to device-private memory and back (by CPU fault and by device-range eviction) visits as many address
/// spaces with 48 unrelated processes alive, each with pages of its own, as with none. The walk over every
/// live address space that the reverse map replaced visits 50 per page with them.
#[test]
fn the_walk_visits_no_unrelated_address_space() {
    fn visits(unrelated: usize) -> u64 {
        let (sim, k, dev, dev_first) = world();
        let out = Rc::new(RefCell::new(0));
        let (o, k2) = (out.clone(), k.clone());
        sim.spawn("visits", async move {
            let args = |pages: u64| MmapArgs {
                len: pages * PAGE_SIZE,
                prot: Prot::RW,
                private: true,
                anonymous: true,
                ..MmapArgs::default()
            };
            let pid = k2.create_process();
            let va = k2.mmap(pid, &args(16)).await.unwrap();
            for i in 0..16 {
                k2.store(pid, va.add(i * PAGE_SIZE), &[1]).await.unwrap();
            }
            let child = k2.fork(pid).await.unwrap();
            for _ in 0..unrelated {
                let other = k2.create_process();
                let b = k2.mmap(other, &args(4)).await.unwrap();
                for i in 0..4 {
                    k2.store(other, b.add(i * PAGE_SIZE), &[2]).await.unwrap();
                }
            }
            let before = k2.rmap_visits();
            let r = Range::from_len(va, 16 * PAGE_SIZE).unwrap();
            migrate(&k2, pid, r, MIGRATE_VMA_SELECT_SYSTEM, dev).await;
            for i in 0..16 {
                k2.load(child, va.add(i * PAGE_SIZE), &mut [0])
                    .await
                    .unwrap();
            }
            migrate(&k2, pid, r, MIGRATE_VMA_SELECT_SYSTEM, dev).await;
            apply(
                &k2,
                dev,
                dev_first,
                &mut Procs::default(),
                &Op::Evict {
                    first: 0,
                    pages: DEVICE_PAGES,
                },
            )
            .await;
            for i in 0..16 {
                let mut b = [0];
                k2.load(pid, va.add(i * PAGE_SIZE), &mut b).await.unwrap();
                assert_eq!(b, [1], "page {i} survived the round trips");
            }
            *o.borrow_mut() = k2.rmap_visits() - before;
        });
        sim.run();
        out.replace(0)
    }
    let alone = visits(0);
    assert!(alone > 0, "the migrations walked the reverse map");
    assert_eq!(visits(48), alone);
}
