//! Model-based tests (proptest sequences against naive references):
//! 1. the address space (mm/mmap.c, mm/mprotect.c, mm/mremap.c, mm/madvise.c, kernel/fork.c, the fault
//!    path) against a reference that keeps, per page of a small window and per process, whether it is
//!    mapped, its protection and its contents, over mmap, munmap, mprotect, mremap, madvise(DONTNEED), fork,
//!    load and store;
//! 2. the interval notifier + mirror pair (mm/mmu_notifier.c, mm/hmm.c, lib/test_hmm.c) against the rule of
//!    what a mirror may hold: after every operation each entry of the dmirror device page table equals the
//!    CPU page table's current translation of its address (present, device-private or device-exclusive;
//!    writable for a write entry), or is absent.
//!
//! Each runs as one simulated agent, so operations are sequential; the exploration tests cover the races.
#![expect(
    clippy::tests_outside_test_module,
    clippy::unwrap_used,
    reason = "an integration-test crate is all tests"
)]

use std::cell::RefCell;
use std::future::Future;
use std::rc::Rc;

use peerdma_core::{Advice, DeviceId, Errno, PAGE_SIZE, Pid, Prot, Va};
use peerdma_devices::dmirror::{Dmirror, DmirrorCosts, DmirrorDevice, DmirrorMemory};
use peerdma_mm::mmap::MmapArgs;
use peerdma_mm::mremap::MremapFlags;
use peerdma_mm::pagetable::Pte;
use peerdma_mm::{Kernel, MmCosts};
use peerdma_sim::{RunOutcome, Sim, SimConfig};
use proptest::prelude::*;

/// Pages in the window every operation works in.
const NPAGES: u64 = 12;
const BASE: u64 = 0x7f00_0000_0000;

fn va(page: u64) -> Va {
    Va::from_raw(BASE + page * PAGE_SIZE)
}

/// Runs `f` as the only agent of a fresh simulation.
fn run<F: Future<Output = ()> + 'static>(f: impl FnOnce(Rc<Kernel>) -> F) {
    let sim = Sim::new(SimConfig::default());
    let k = Kernel::new(&sim, 16 << 20, MmCosts::zero());
    let done = Rc::new(RefCell::new(false));
    let (d, fut) = (done.clone(), f(k));
    sim.spawn("test", async move {
        fut.await;
        *d.borrow_mut() = true;
    });
    assert_eq!(sim.run(), RunOutcome::Completed);
    assert!(*done.borrow(), "the agent did not finish");
}

fn prot_of(p: u8) -> Prot {
    [Prot::NONE, Prot::READ, Prot::RW][usize::from(p % 3)]
}

fn fixed_anon(page: u64, pages: u64, prot: Prot) -> MmapArgs {
    MmapArgs {
        addr: Some(va(page)),
        len: pages * PAGE_SIZE,
        prot,
        private: true,
        anonymous: true,
        fixed: true,
        ..MmapArgs::default()
    }
}

/// A page of the reference: its protection and the byte every one of its bytes holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RefPage {
    prot: Prot,
    byte: u8,
}

type RefSpace = Vec<Option<RefPage>>;

#[derive(Clone, Debug)]
enum Op {
    Mmap {
        page: u64,
        pages: u64,
        prot: u8,
    },
    Munmap {
        page: u64,
        pages: u64,
    },
    Mprotect {
        page: u64,
        pages: u64,
        prot: u8,
    },
    DontNeed {
        page: u64,
        pages: u64,
    },
    Mremap {
        page: u64,
        pages: u64,
        to: u64,
        new_pages: u64,
    },
    Fork,
    Load {
        proc: usize,
        page: u64,
        pages: u64,
    },
    Store {
        proc: usize,
        page: u64,
        pages: u64,
        byte: u8,
    },
}

/// A range `[page, page + pages)` inside the window.
fn range() -> impl Strategy<Value = (u64, u64)> {
    (0..NPAGES).prop_flat_map(|p| (Just(p), 1..=(NPAGES - p).min(5)))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (range(), any::<u8>()).prop_map(|((page, pages), prot)| Op::Mmap { page, pages, prot }),
        2 => range().prop_map(|(page, pages)| Op::Munmap { page, pages }),
        2 => (range(), any::<u8>()).prop_map(|((page, pages), prot)| Op::Mprotect { page, pages, prot }),
        2 => range().prop_map(|(page, pages)| Op::DontNeed { page, pages }),
        2 => (range(), 0..NPAGES, 1u64..4)
            .prop_map(|((page, pages), to, new_pages)| Op::Mremap { page, pages, to, new_pages }),
        1 => Just(Op::Fork),
        4 => (any::<usize>(), range()).prop_map(|(proc, (page, pages))| Op::Load { proc, page, pages }),
        4 => (any::<usize>(), range(), 1u8..=255)
            .prop_map(|(proc, (page, pages), byte)| Op::Store { proc, page, pages, byte }),
    ]
}

/// Applies `op` to the model (process `pids[i]`) and to the reference `refs[i]`, checking each result.
#[expect(clippy::too_many_lines, reason = "one arm per operation")]
async fn step(k: &Kernel, pids: &mut Vec<Pid>, refs: &mut Vec<RefSpace>, op: &Op) {
    // Structural operations act on the first process; loads and stores pick one.
    let main = pids[0];
    match *op {
        Op::Mmap { page, pages, prot } => {
            let got = k.mmap(main, &fixed_anon(page, pages, prot_of(prot))).await;
            assert_eq!(got, Ok(va(page)), "{op:?}");
            for p in page..page + pages {
                refs[0][usize::try_from(p).unwrap()] = Some(RefPage {
                    prot: prot_of(prot),
                    byte: 0,
                });
            }
        }
        Op::Munmap { page, pages } => {
            assert_eq!(k.munmap(main, va(page), pages * PAGE_SIZE).await, Ok(()));
            for p in page..page + pages {
                refs[0][usize::try_from(p).unwrap()] = None;
            }
        }
        Op::Mprotect { page, pages, prot } => {
            let got = k
                .mprotect(main, va(page), pages * PAGE_SIZE, prot_of(prot))
                .await;
            // mm/mprotect.c: VMAs before the first hole change; a hole is ENOMEM.
            let mut hole = false;
            for p in page..page + pages {
                let Some(rp) = &mut refs[0][usize::try_from(p).unwrap()] else {
                    hole = true;
                    break;
                };
                rp.prot = prot_of(prot);
            }
            assert_eq!(
                got,
                if hole { Err(Errno::ENOMEM) } else { Ok(()) },
                "{op:?}"
            );
        }
        Op::DontNeed { page, pages } => {
            let got = k
                .madvise(main, va(page), pages * PAGE_SIZE, Advice::DontNeed)
                .await;
            // mm/madvise.c: the mapped parts are zapped (private anonymous memory reads zero again);
            // unmapped parts make the call ENOMEM.
            let mut hole = false;
            for p in page..page + pages {
                match &mut refs[0][usize::try_from(p).unwrap()] {
                    Some(rp) => rp.byte = 0,
                    None => hole = true,
                }
            }
            assert_eq!(
                got,
                if hole { Err(Errno::ENOMEM) } else { Ok(()) },
                "{op:?}"
            );
        }
        Op::Mremap {
            page,
            pages,
            to,
            new_pages,
        } => {
            let flags = MremapFlags {
                maymove: true,
                fixed: true,
                dontunmap: false,
                new_addr: Some(va(to)),
            };
            let to_end = to + new_pages;
            let got = k
                .mremap(
                    main,
                    va(page),
                    pages * PAGE_SIZE,
                    new_pages * PAGE_SIZE,
                    flags,
                )
                .await;
            let old: Vec<Option<RefPage>> = (page..page + pages)
                .map(|p| refs[0][usize::try_from(p).unwrap()])
                .collect();
            let overlap = to < page + pages && page < to_end;
            let uniform = old
                .iter()
                .all(|p| p.is_some_and(|rp| rp.prot == old[0].unwrap().prot));
            if to_end > NPAGES || overlap {
                // Outside the window (the model may move there; the reference cannot follow) or EINVAL.
                if overlap {
                    assert_eq!(got, Err(Errno::EINVAL), "{op:?}");
                } else if got.is_ok() {
                    for p in page..page + pages {
                        refs[0][usize::try_from(p).unwrap()] = None;
                    }
                    for p in to..NPAGES {
                        refs[0][usize::try_from(p).unwrap()] = None;
                    }
                    // Unmap the whole target (it runs past the window) so the reference can stay exact.
                    k.munmap(main, va(to), new_pages * PAGE_SIZE).await.unwrap();
                }
                return;
            }
            if !uniform {
                // A hole or several VMAs with different protections: never one VMA.
                assert_eq!(got, Err(Errno::EFAULT), "{op:?}");
                return;
            }
            // Fully mapped with one protection: one VMA unless the model kept two of them unmerged.
            match got {
                Ok(at) => {
                    assert_eq!(at, va(to), "{op:?}");
                    let prot = old[0].unwrap().prot;
                    for p in page..page + pages {
                        refs[0][usize::try_from(p).unwrap()] = None;
                    }
                    for (i, p) in (to..to_end).enumerate() {
                        let moved = old.get(i).copied().flatten();
                        refs[0][usize::try_from(p).unwrap()] =
                            Some(moved.unwrap_or(RefPage { prot, byte: 0 }));
                    }
                }
                Err(Errno::EFAULT) => {}
                Err(e) => panic!("{op:?}: {e:?}"),
            }
        }
        Op::Fork => {
            if pids.len() < 3 {
                let child = k.fork(main).await.unwrap();
                pids.push(child);
                refs.push(refs[0].clone());
            }
        }
        Op::Load { proc, page, pages } => {
            let i = proc % pids.len();
            let mut buf = vec![0u8; usize::try_from(pages * PAGE_SIZE).unwrap()];
            let got = k.load(pids[i], va(page), &mut buf).await;
            let first_bad = (page..page + pages)
                .find(|&p| refs[i][usize::try_from(p).unwrap()].is_none_or(|rp| !rp.prot.read));
            match (got, first_bad) {
                (Ok(()), None) => {
                    for (j, p) in (page..page + pages).enumerate() {
                        let want = refs[i][usize::try_from(p).unwrap()].unwrap().byte;
                        let chunk = &buf[j * 4096..(j + 1) * 4096];
                        assert!(
                            chunk.iter().all(|&b| b == want),
                            "{op:?}: page {p} of process {i} reads {:#x}, want {want:#x}",
                            chunk[0]
                        );
                    }
                }
                (Err(sig), Some(p)) => assert_eq!(sig.addr, va(p), "{op:?}"),
                (got, bad) => {
                    panic!("{op:?} in process {i}: {got:?}, reference's first bad page {bad:?}")
                }
            }
        }
        Op::Store {
            proc,
            page,
            pages,
            byte,
        } => {
            let i = proc % pids.len();
            let data = vec![byte; usize::try_from(pages * PAGE_SIZE).unwrap()];
            let got = k.store(pids[i], va(page), &data).await;
            let mut first_bad = None;
            for p in page..page + pages {
                match &mut refs[i][usize::try_from(p).unwrap()] {
                    Some(rp) if rp.prot.write => rp.byte = byte,
                    _ => {
                        first_bad = Some(p);
                        break;
                    }
                }
            }
            match (got, first_bad) {
                (Ok(()), None) => {}
                (Err(sig), Some(p)) => assert_eq!(sig.addr, va(p), "{op:?}"),
                (got, bad) => {
                    panic!("{op:?} in process {i}: {got:?}, reference's first bad page {bad:?}")
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn address_space_matches_a_naive_reference(ops in proptest::collection::vec(op(), 1..40)) {
        run(move |k| async move {
            let main = k.create_process();
            let mut pids = vec![main];
            let mut refs: Vec<RefSpace> = vec![vec![None; usize::try_from(NPAGES).unwrap()]];
            for op in &ops {
                step(&k, &mut pids, &mut refs, op).await;
            }
        });
    }
}

#[derive(Clone, Debug)]
enum MirrorOp {
    Read { page: u64, pages: u64 },
    Write { page: u64, pages: u64 },
    Exclusive { page: u64, pages: u64 },
    MigrateToDev { page: u64, pages: u64 },
    MigrateToSys { page: u64, pages: u64 },
    Mm(Op),
    Reclaim(u64),
}

fn mirror_op() -> impl Strategy<Value = MirrorOp> {
    prop_oneof![
        4 => range().prop_map(|(page, pages)| MirrorOp::Read { page, pages }),
        3 => range().prop_map(|(page, pages)| MirrorOp::Write { page, pages }),
        1 => range().prop_map(|(page, pages)| MirrorOp::Exclusive { page, pages }),
        2 => range().prop_map(|(page, pages)| MirrorOp::MigrateToDev { page, pages }),
        1 => range().prop_map(|(page, pages)| MirrorOp::MigrateToSys { page, pages }),
        6 => op().prop_map(MirrorOp::Mm),
        1 => (1u64..16).prop_map(MirrorOp::Reclaim),
    ]
}

/// The rule of what a mirror may hold: every entry equals the CPU page table's current translation of its
/// address — a present, device-private or device-exclusive entry for that frame, writable for a write
/// entry — and nothing else (not a swap, migration or empty entry, not another frame).
fn check_mirror(k: &Kernel, pid: Pid, m: &Dmirror, after: &MirrorOp) {
    for (at, frame, writable) in m.entries() {
        let cpu = match k.pte_at(pid, at) {
            Some(
                Pte::Present { frame, write, .. }
                | Pte::DevicePrivate { frame, write }
                | Pte::DeviceExclusive { frame, write },
            ) => Some((frame, write)),
            _ => None,
        };
        let ok = cpu.is_some_and(|(f, w)| f == frame && (w || !writable));
        assert!(
            ok,
            "after {after:?}: the mirror holds {frame} ({}) for {at}, the CPU page table {:?}",
            if writable { "rw" } else { "ro" },
            k.pte_at(pid, at)
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn a_mirror_holds_only_current_translations(ops in proptest::collection::vec(mirror_op(), 1..40)) {
        run(move |k| async move {
            let main = k.create_process();
            let dev = DmirrorDevice::new(&k, DeviceId(0), DmirrorMemory::Private, 1 << 20, DmirrorCosts::zero());
            let m = Dmirror::open(&dev, main).unwrap();
            let mut pids = vec![main];
            let mut refs: Vec<RefSpace> = vec![vec![None; usize::try_from(NPAGES).unwrap()]];
            // Start with the window mapped so device operations find memory.
            step(&k, &mut pids, &mut refs, &Op::Mmap { page: 0, pages: NPAGES, prot: 2 }).await;
            for op in &ops {
                // Device results depend on the state; only the rule after each is checked.
                match *op {
                    MirrorOp::Read { page, pages } => drop(m.read(va(page), pages).await),
                    MirrorOp::Write { page, pages } => {
                        let data = vec![0x5a; usize::try_from(pages * PAGE_SIZE).unwrap()];
                        drop(m.write(va(page), pages, &data).await);
                    }
                    MirrorOp::Exclusive { page, pages } => drop(m.exclusive(va(page), pages).await),
                    MirrorOp::MigrateToDev { page, pages } => drop(m.migrate_to_dev(va(page), pages).await),
                    MirrorOp::MigrateToSys { page, pages } => drop(m.migrate_to_sys(va(page), pages).await),
                    MirrorOp::Mm(ref mm) => mm_only(&k, main, mm).await,
                    MirrorOp::Reclaim(n) => {
            let _ = k.reclaim(n).await;
        }
                }
                check_mirror(&k, main, &m, op);
            }
        });
    }
}

/// Runs an address-space operation without the reference (device operations change contents behind its
/// back): its result is whatever the model says.
async fn mm_only(k: &Kernel, pid: Pid, op: &Op) {
    match *op {
        Op::Mmap { page, pages, prot } => {
            let _ = k.mmap(pid, &fixed_anon(page, pages, prot_of(prot))).await;
        }
        Op::Munmap { page, pages } => {
            let _ = k.munmap(pid, va(page), pages * PAGE_SIZE).await;
        }
        Op::Mprotect { page, pages, prot } => {
            let _ = k
                .mprotect(pid, va(page), pages * PAGE_SIZE, prot_of(prot))
                .await;
        }
        Op::DontNeed { page, pages } => {
            let _ = k
                .madvise(pid, va(page), pages * PAGE_SIZE, Advice::DontNeed)
                .await;
        }
        Op::Mremap {
            page,
            pages,
            to,
            new_pages,
        } => {
            let flags = MremapFlags {
                maymove: true,
                fixed: true,
                dontunmap: false,
                new_addr: Some(va(to)),
            };
            let _ = k
                .mremap(
                    pid,
                    va(page),
                    pages * PAGE_SIZE,
                    new_pages * PAGE_SIZE,
                    flags,
                )
                .await;
        }
        Op::Fork => {
            let _ = k.fork(pid).await;
        }
        Op::Load { page, pages, .. } => {
            let mut buf = vec![0u8; usize::try_from(pages * PAGE_SIZE).unwrap()];
            let _ = k.load(pid, va(page), &mut buf).await;
        }
        Op::Store {
            page, pages, byte, ..
        } => {
            let data = vec![byte; usize::try_from(pages * PAGE_SIZE).unwrap()];
            let _ = k.store(pid, va(page), &data).await;
        }
    }
}
