//! The Linux side of `peerdma bench`: the real kernel's own costs on this machine, measured on real
//! anonymous memory (`memmap2`), for the ratios against the simulated figures.
//!
//! - anonymous write fault: one byte stored into each page of a fresh private anonymous mapping
//!   (mm/memory.c `do_anonymous_page` per page);
//! - anonymous fault of a whole page: a 4 KiB copy into each page of a fresh mapping (the fault, the
//!   kernel's zeroing of the new page, then the copy over it);
//! - munmap: dropping that mapping with every page resident (mm/vma.c `do_vmi_munmap` → `unmap_vmas` and
//!   the page frees), per page;
//! - MADV_DONTNEED: over a fully resident mapping (mm/madvise.c `madvise_dontneed_free` →
//!   `zap_page_range_single`), per page;
//! - memcpy bandwidth: one copy between two resident buffers of the size the migration figure moves.
//!
//! This module holds the workspace's only `unsafe` block (the MADV_DONTNEED advice, which memmap2 marks
//! unsafe because later reads of the range see zeroes); `crates/peerdma/tests/unsafe_audit.rs` fails if
//! `unsafe` appears anywhere else.

use std::hint::black_box;

use memmap2::{MmapMut, UncheckedAdvice};

use super::sim::{BenchResult, host_now, per};

/// The host's page size as the mappings are touched (the simulated pages are 4 KiB too).
const PAGE: usize = 4096;

/// A fresh private anonymous mapping of `pages` pages, nothing resident yet.
fn map(pages: u64) -> BenchResult<MmapMut> {
    let len = usize::try_from(pages)
        .ok()
        .and_then(|p| p.checked_mul(PAGE))
        .ok_or("mapping too large")?;
    MmapMut::map_anon(len).map_err(|e| format!("mmap: {e}"))
}

/// Writes one byte into every page of `m` (one write fault each when nothing is resident).
fn touch(m: &mut MmapMut) {
    for (i, b) in m.iter_mut().step_by(PAGE).enumerate() {
        *b = black_box(u8::try_from(i & 0x7f).unwrap_or(1) | 1);
    }
}

/// Linux's anonymous write fault and munmap, ns per page.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FaultMunmap {
    /// One write fault per page.
    pub(crate) fault: f64,
    /// munmap of the resident mapping, per page.
    pub(crate) munmap: f64,
}

/// Faults `pages` pages in by one store each, then unmaps them.
pub(crate) fn fault_munmap(pages: u64) -> BenchResult<FaultMunmap> {
    let mut m = map(pages)?;
    let t = host_now();
    touch(&mut m);
    let fault = per(t.elapsed(), pages);
    black_box(m.first().copied());
    let t = host_now();
    drop(m);
    let munmap = per(t.elapsed(), pages);
    Ok(FaultMunmap { fault, munmap })
}

/// Copies a whole 4 KiB page into each of `pages` pages of a fresh mapping (one write fault each, then the
/// rest of the page written), ns per page.
pub(crate) fn fault_full_page(pages: u64) -> BenchResult<f64> {
    let mut m = map(pages)?;
    let mut src = vec![1u8; PAGE];
    let t = host_now();
    for (i, page) in m.chunks_exact_mut(PAGE).enumerate() {
        src[..8].copy_from_slice(&i.to_le_bytes());
        page.copy_from_slice(black_box(&src));
    }
    let ns = per(t.elapsed(), pages);
    black_box(m.first().copied());
    Ok(ns)
}

/// MADV_DONTNEED over `pages` resident pages, ns per page.
pub(crate) fn dontneed(pages: u64) -> BenchResult<f64> {
    let mut m = map(pages)?;
    touch(&mut m);
    let t = host_now();
    let r = dontneed_all(&m);
    let ns = per(t.elapsed(), pages);
    r.map_err(|e| format!("madvise(MADV_DONTNEED): {e}"))?;
    // A private anonymous page read after DONTNEED is a fresh zero page.
    if m.iter().step_by(PAGE).any(|&b| b != 0) {
        return Err("MADV_DONTNEED left data in place".to_owned());
    }
    Ok(ns)
}

/// `madvise(MADV_DONTNEED)` over the whole of `m`.
#[expect(
    unsafe_code,
    reason = "the one audited unsafe block of the workspace: memmap2 marks MADV_DONTNEED unsafe"
)]
fn dontneed_all(m: &MmapMut) -> std::io::Result<()> {
    // SAFETY: memmap2 makes this advice unsafe because it changes what the memory holds behind Rust's back
    // (a private anonymous page reads as zeroes afterwards). `m` is a private anonymous mapping this module
    // created and owns: no other mapping, file or process shares it, and the shared borrow `&MmapMut`
    // proves no `&mut` slice into it is alive during the call; nothing keeps a reference to its old bytes
    // across it. Zero-filled pages are valid `u8`s, so every later read is sound.
    unsafe { m.unchecked_advise(UncheckedAdvice::DontNeed) }
}

/// memcpy bandwidth in GB/s (10^9 bytes per second) between two resident buffers of `pages` pages: one
/// warm-up copy, then the median of three timed copies.
pub(crate) fn memcpy_gbps(pages: u64) -> BenchResult<f64> {
    let mut src = map(pages)?;
    let mut dst = map(pages)?;
    touch(&mut src);
    touch(&mut dst);
    dst.copy_from_slice(&src);
    let mut ns: Vec<f64> = (0..3)
        .map(|_| {
            let t = host_now();
            dst.copy_from_slice(black_box(&src));
            black_box(dst.last().copied());
            per(t.elapsed(), 1)
        })
        .collect();
    ns.sort_by(f64::total_cmp);
    #[expect(clippy::cast_precision_loss, reason = "a byte count far below 2^52")]
    let bytes = src.len() as f64;
    Ok(bytes / ns[1].max(1.0))
}
