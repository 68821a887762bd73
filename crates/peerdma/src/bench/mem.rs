//! The memory figures of `peerdma bench`: host bytes the model holds per resident simulated page and per
//! configured (not yet used) frame, measured as the growth of the resident set (`/proc/self/statm`) of a
//! fresh child process (`peerdma bench-memory`, hidden) that builds one world and keeps it alive. A child
//! per measurement, so that memory freed by earlier measurements and kept by the allocator cannot hide
//! any growth.

use std::process::Command;

use peerdma_core::PAGE_SIZE;
use peerdma_mm::{Kernel, MmCosts, MmapArgs, Prot};
use peerdma_sim::{Sim, SimConfig};

use super::sim::BenchResult;

/// What a child measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum MemWhat {
    /// Bytes per resident page written once in full, its 4 KiB of data included (bytes data mode).
    Resident,
    /// Bytes per configured RAM frame of a kernel with nothing resident.
    Configured,
    /// Bytes per resident page in token data mode (a version per page instead of bytes).
    Token,
}

/// This process's resident set in bytes (`/proc/self/statm`, second field, in 4 KiB pages on the
/// machines this runs on).
fn rss_bytes() -> BenchResult<u64> {
    let s = std::fs::read_to_string("/proc/self/statm")
        .map_err(|e| format!("cannot read /proc/self/statm: {e}"))?;
    let pages: u64 = s
        .split_whitespace()
        .nth(1)
        .and_then(|f| f.parse().ok())
        .ok_or("unexpected /proc/self/statm")?;
    Ok(pages * 4096)
}

/// The kernel of a token-mode world (DESIGN §3, `[sim] data = "token"`: a 64-bit version per page instead
/// of its bytes); `None` if the library refuses the mode.
fn token_kernel(sim: &Sim, ram: u64) -> Option<std::rc::Rc<Kernel>> {
    let k = Kernel::new(sim, ram, MmCosts::zero());
    k.set_data_mode(peerdma_mm::phys::DataMode::Token).ok()?;
    Some(k)
}

/// Whether this build has token data mode (see [`token_kernel`]).
pub(crate) fn token_mode_available() -> bool {
    let sim = Sim::new(SimConfig::default());
    token_kernel(&sim, 4 << 20).is_some()
}

/// Runs in the child: builds the world `what` names over `pages` pages, and returns the resident-set
/// growth per page (or per frame), in bytes.
pub(crate) fn child(pages: u64, what: MemWhat) -> BenchResult<f64> {
    let before = rss_bytes()?;
    let sim = Sim::new(SimConfig {
        trace: false,
        ..SimConfig::default()
    });
    // RAM just above the resident set (rounded down to 2 MiB by the kernel), so the figure carries the
    // frame table of (nearly) the resident frames only; `Configured` measures frames on their own.
    let (ram, touch, units) = match what {
        MemWhat::Resident | MemWhat::Token => (pages * PAGE_SIZE + (4 << 20), pages, pages),
        MemWhat::Configured => (4 * pages * PAGE_SIZE + (4 << 20), 0, 4 * pages),
    };
    let k = if what == MemWhat::Token {
        token_kernel(&sim, ram).ok_or("token data mode is not available in this build")?
    } else {
        Kernel::new(&sim, ram, MmCosts::zero())
    };
    let k2 = k.clone();
    let result = std::rc::Rc::new(std::cell::RefCell::new(Ok(())));
    let r2 = result.clone();
    sim.spawn("bench-memory", async move {
        let pid = k2.create_process();
        let args = MmapArgs {
            len: pages.max(1) * PAGE_SIZE,
            prot: Prot::RW,
            private: true,
            anonymous: true,
            ..MmapArgs::default()
        };
        let buf = match k2.mmap(pid, &args).await {
            Ok(b) => b,
            Err(e) => {
                *r2.borrow_mut() = Err(format!("mmap: {e}"));
                return;
            }
        };
        // Bytes mode: every byte of the page non-zero, so the page needs its whole 4 KiB (a page
        // written in a few bytes is kept inline without them, `peerdma_mm::phys`); token mode keeps a
        // version whatever the write.
        let page = [1u8; 4096];
        let data: &[u8] = if what == MemWhat::Token {
            &page[..1]
        } else {
            &page
        };
        for i in 0..touch {
            if let Err(e) = k2.store(pid, buf.add(i * PAGE_SIZE), data).await {
                *r2.borrow_mut() = Err(format!("store: {e:?}"));
                return;
            }
        }
    });
    sim.run();
    result.borrow().clone()?;
    let after = rss_bytes()?;
    // The world is alive until here: its memory is part of `after`.
    drop(k);
    #[expect(clippy::cast_precision_loss, reason = "byte counts far below 2^52")]
    let per = (after.saturating_sub(before)) as f64 / units.max(1) as f64;
    Ok(per)
}

/// Runs `peerdma bench-memory` in a fresh process and returns its figure.
pub(crate) fn measure(pages: u64, what: MemWhat) -> BenchResult<f64> {
    // /proc/self/exe runs this very binary even if the file was replaced (rebuilt) since it started.
    let proc_exe = std::path::PathBuf::from("/proc/self/exe");
    let exe = if proc_exe.exists() {
        proc_exe
    } else {
        std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?
    };
    let name = match what {
        MemWhat::Resident => "resident",
        MemWhat::Configured => "configured",
        MemWhat::Token => "token",
    };
    let out = Command::new(exe)
        .args([
            "bench-memory",
            "--pages",
            &pages.to_string(),
            "--what",
            name,
        ])
        .output()
        .map_err(|e| format!("cannot run bench-memory: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "bench-memory failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(|e| format!("bench-memory printed no number: {e}"))
}
