//! Cost per page of the mm paths that find a page's mappings (the reverse map) and walk the LRU, at several
//! populations: migration of an anonymous range to device-private memory and back (`migrate_vma` in chunks
//! of 512 pages to the device, one CPU fault per page back through `migrate_to_ram`), and reclaim to swap.
//!
//! Each population is built once, before the timed loop; an iteration moves every page of it (to the device
//! and back, or out to swap and in again) and the time reported is that of the measured half only, divided
//! by the number of pages (criterion's figure is per iteration: read it as per page). The kernel runs in
//! zero-time mode (`MmCosts::zero`) with the oracle as configured by default.
//!
//! `PEERDMA_MM_BENCH_MAX_PAGES=<n>` skips populations above `n` pages (default 65,536; the quadratic code
//! cannot run the large ones in reasonable time). `PEERDMA_MM_BENCH_ONESHOT=<k>` skips criterion and prints
//! the per-page times of `k` round trips at each population instead (for code too slow for criterion's ten
//! samples). `PEERDMA_MM_BENCH_UNRELATED=<n>` (default 0) adds `n` unrelated processes, each with
//! [`UNRELATED_PAGES`] written shared anonymous pages (mapped, and left alone by reclaim), created before the measured one: a reverse map that visits only
//! the address spaces that may map a page costs the same with or without them.
#![expect(clippy::unwrap_used, reason = "benchmark harness")]
#![expect(
    clippy::disallowed_methods,
    reason = "a benchmark measures wall-clock time (CONVENTIONS: benches may opt out)"
)]

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group};
use peerdma_core::{DeviceId, FrameId, PAGE_SIZE, Pid, Range, Va};
use peerdma_mm::migrate::{
    MIGRATE_PFN_MIGRATE, MIGRATE_PFN_WRITE, MIGRATE_VMA_SELECT_DEVICE_PRIVATE,
    MIGRATE_VMA_SELECT_SYSTEM, migrate_pfn, migrate_pfn_to_frame,
};
use peerdma_mm::{DevicePagemapOps, Kernel, MemoryKind, MigrateVma, MmCosts, MmapArgs, Prot};
use peerdma_sim::{Sim, SimConfig};

const OWNER: DeviceId = DeviceId(7);
/// Pages per `migrate_vma` call to the device (a driver's chunk).
const CHUNK: u64 = 512;
const SIZES: [u64; 5] = [1 << 10, 1 << 14, 1 << 16, 1 << 18, 1 << 20];

/// Written pages of each unrelated process (`PEERDMA_MM_BENCH_UNRELATED`).
const UNRELATED_PAGES: u64 = 4;

fn unrelated() -> u64 {
    std::env::var("PEERDMA_MM_BENCH_UNRELATED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn max_pages() -> u64 {
    std::env::var("PEERDMA_MM_BENCH_MAX_PAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1 << 16)
}

/// Migrates `range` of `pid` with `flags`, copying each collected page into a new page of region `r`.
async fn migrate(k: &Kernel, pid: Pid, range: Range<Va>, flags: u32, r: usize) {
    let mut m = MigrateVma::new(pid, range, flags, OWNER);
    k.migrate_vma_setup(&mut m).await.unwrap();
    for i in 0..m.src.len() {
        if m.src[i] & MIGRATE_PFN_MIGRATE == 0 {
            continue;
        }
        let Some(src) = migrate_pfn_to_frame(m.src[i]) else {
            continue;
        };
        let dst = k.alloc_page(r).unwrap();
        k.copy_page(src, dst);
        m.dst[i] = migrate_pfn(dst) | (m.src[i] & MIGRATE_PFN_WRITE);
    }
    k.migrate_vma_pages(&mut m).await;
    k.migrate_vma_finalize(&mut m);
}

/// The device's `migrate_to_ram`: migrates the faulting page back to RAM (region 0).
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
    ) -> Pin<Box<dyn Future<Output = Result<(), peerdma_mm::VmFault>> + 'a>> {
        Box::pin(async move {
            let k = self.kernel.borrow().upgrade().unwrap();
            let page = Range::from_len(va.align_down(PAGE_SIZE), PAGE_SIZE).unwrap();
            migrate(&k, pid, page, MIGRATE_VMA_SELECT_DEVICE_PRIVATE, 0).await;
            Ok(())
        })
    }
}

/// A kernel with `pages` written anonymous pages in one process (and, for migration, a device-private region
/// as large).
struct World {
    sim: Sim,
    k: Rc<Kernel>,
    pid: Pid,
    buf: Va,
    dev: usize,
}

fn world(pages: u64, ram_pages: u64, device: bool) -> World {
    let sim = Sim::new(SimConfig {
        trace: false,
        ..SimConfig::default()
    });
    let others = unrelated();
    let ram_pages = ram_pages + others * UNRELATED_PAGES;
    let k = Kernel::new(&sim, ram_pages * PAGE_SIZE, MmCosts::zero());
    let dev = if device {
        let ops = Rc::new(ToRam::default());
        *ops.kernel.borrow_mut() = Rc::downgrade(&k);
        k.add_device_memory(
            MemoryKind::DevicePrivate { owner: OWNER },
            (pages + CHUNK) * PAGE_SIZE,
            ops,
        )
    } else {
        0
    };
    let out = Rc::new(Cell::new((Pid(0), Va::from_raw(0))));
    let (o, k2) = (out.clone(), k.clone());
    sim.spawn("setup", async move {
        for _ in 0..others {
            let other = k2.create_process();
            // Shared anonymous (shmem) pages: mapped, but never on the anonymous LRU, so reclaim leaves them.
            let args = MmapArgs {
                len: UNRELATED_PAGES * PAGE_SIZE,
                prot: Prot::RW,
                shared: true,
                anonymous: true,
                ..MmapArgs::default()
            };
            let b = k2.mmap(other, &args).await.unwrap();
            for i in 0..UNRELATED_PAGES {
                k2.store(other, b.add(i * PAGE_SIZE), &[2]).await.unwrap();
            }
        }
        let pid = k2.create_process();
        let args = MmapArgs {
            len: pages * PAGE_SIZE,
            prot: Prot::RW,
            private: true,
            anonymous: true,
            ..MmapArgs::default()
        };
        let buf = k2.mmap(pid, &args).await.unwrap();
        for i in 0..pages {
            k2.store(pid, buf.add(i * PAGE_SIZE), &[1 + (i % 251) as u8])
                .await
                .unwrap();
        }
        o.set((pid, buf));
    });
    sim.run();
    let (pid, buf) = out.get();
    World {
        sim,
        k,
        pid,
        buf,
        dev,
    }
}

impl World {
    /// Runs `f` as one agent to completion; returns what it measured.
    fn run<F: Future<Output = Duration> + 'static>(&self, f: F) -> Duration {
        let out = Rc::new(Cell::new(Duration::ZERO));
        let o = out.clone();
        self.sim.spawn("bench", async move { o.set(f.await) });
        self.sim.run();
        out.get()
    }

    /// Moves every page to the device and back; returns (time to the device, time back).
    fn round_trip(&self, pages: u64) -> (Duration, Duration) {
        let (k, pid, buf, dev) = (self.k.clone(), self.pid, self.buf, self.dev);
        let back = Rc::new(Cell::new(Duration::ZERO));
        let b = back.clone();
        let to = self.run(async move {
            let t0 = Instant::now();
            let mut done = 0;
            while done < pages {
                let n = CHUNK.min(pages - done);
                let r = Range::from_len(buf.add(done * PAGE_SIZE), n * PAGE_SIZE).unwrap();
                migrate(&k, pid, r, MIGRATE_VMA_SELECT_SYSTEM, dev).await;
                done += n;
            }
            let to = t0.elapsed();
            let t1 = Instant::now();
            let mut byte = [0u8; 1];
            for i in 0..pages {
                k.load(pid, buf.add(i * PAGE_SIZE), &mut byte)
                    .await
                    .unwrap();
            }
            b.set(t1.elapsed());
            to
        });
        (to, back.get())
    }

    /// Reclaims every page to swap, then faults them back in; returns the reclaim time and the pages
    /// written.
    fn reclaim_all(&self, pages: u64) -> (Duration, u64) {
        let (k, pid, buf) = (self.k.clone(), self.pid, self.buf);
        let swapped = Rc::new(Cell::new(0u64));
        let s = swapped.clone();
        let t = self.run(async move {
            let t0 = Instant::now();
            let mut out = 0;
            // Passes of 32 pages, as direct reclaim runs them; the first look only clears young bits.
            let mut idle = 0;
            while out < pages && idle < 4 {
                let n = k.reclaim(32).await;
                out += n;
                idle = if n == 0 { idle + 1 } else { 0 };
            }
            let t = t0.elapsed();
            s.set(out);
            let mut byte = [0u8; 1];
            for i in 0..pages {
                k.load(pid, buf.add(i * PAGE_SIZE), &mut byte)
                    .await
                    .unwrap();
            }
            t
        });
        (t, swapped.get())
    }
}

fn per_page(d: Duration, pages: u64) -> Duration {
    d / u32::try_from(pages.max(1)).unwrap()
}

fn migration(crit: &mut Criterion) {
    let mut group = crit.benchmark_group("migrate_per_page");
    group.sample_size(10);
    for pages in SIZES.into_iter().filter(|&p| p <= max_pages()) {
        let setup = world(pages, 2 * pages + 8192, true);
        group.bench_with_input(
            BenchmarkId::new("to_device", pages),
            &pages,
            |bencher, &n| {
                bencher.iter_custom(|iters| {
                    (0..iters)
                        .map(|_| per_page(setup.round_trip(n).0, n))
                        .sum::<Duration>()
                });
            },
        );
        group.bench_with_input(
            BenchmarkId::new("back_by_fault", pages),
            &pages,
            |bencher, &n| {
                bencher.iter_custom(|iters| {
                    (0..iters)
                        .map(|_| per_page(setup.round_trip(n).1, n))
                        .sum::<Duration>()
                });
            },
        );
    }
    group.finish();
}

fn reclaim(crit: &mut Criterion) {
    let mut group = crit.benchmark_group("reclaim_per_page");
    group.sample_size(10);
    for pages in SIZES.into_iter().filter(|&p| p <= max_pages()) {
        // RAM for the population plus headroom above the watermarks: faults back in never reclaim.
        let setup = world(pages, pages + 8192, false);
        group.bench_with_input(
            BenchmarkId::new("swap_out", pages),
            &pages,
            |bencher, &n| {
                bencher.iter_custom(|iters| {
                    (0..iters)
                        .map(|_| {
                            let (t, out) = setup.reclaim_all(n);
                            assert_eq!(out, n, "every page reclaimed");
                            per_page(t, out)
                        })
                        .sum::<Duration>()
                });
            },
        );
    }
    group.finish();
}

/// Times `k` round trips and `k` full reclaims at each population, printing each per-page figure.
#[expect(clippy::print_stdout, reason = "the one-shot mode's report")]
fn oneshot(k: u32) {
    for pages in SIZES.into_iter().filter(|&p| p <= max_pages()) {
        let w = world(pages, 2 * pages + 8192, true);
        for _ in 0..k {
            let (to, back) = w.round_trip(pages);
            println!(
                "pages {pages}: to_device {:?}/page, back_by_fault {:?}/page",
                per_page(to, pages),
                per_page(back, pages)
            );
        }
        drop(w);
        let w = world(pages, pages + 8192, false);
        for _ in 0..k {
            let (t, n) = w.reclaim_all(pages);
            println!(
                "pages {pages}: swap_out {:?}/page ({n} pages)",
                per_page(t, n)
            );
        }
    }
}

criterion_group!(benches, migration, reclaim);

fn main() {
    if let Some(k) = std::env::var("PEERDMA_MM_BENCH_ONESHOT")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        oneshot(k);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
