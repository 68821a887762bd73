//! The free frames of one region, kept as ranges: a bump pointer over the never-allocated tail plus an
//! ordered set of the frames freed below it.
//!
//! Linux counterpart: the buddy allocator's free lists (mm/page_alloc.c), which also cost nothing per free
//! page beyond the `struct page` itself. The model hands frames out in one fixed order — lowest free frame
//! first, THPs at the lowest free 2 MiB-aligned block, contiguous runs first fit — and this structure keeps
//! exactly that order while a configured but never-used frame costs no host memory: every frame at or above
//! `next` is free, and `freed` holds the free frames below it. The frame just below `next` is always in use
//! (a frame freed there pulls `next` down, and with it every freed frame adjacent below), so a free run never
//! straddles `next`.

use std::collections::BTreeSet;

/// The free frames of a region (module docs).
#[derive(Clone, Debug)]
pub(super) struct FreeFrames {
    /// First frame of the region.
    start: u64,
    /// Every frame in `next..end` is free and has never been handed out since it was last coalesced.
    next: u64,
    /// One past the last allocatable frame.
    end: u64,
    /// The free frames below `next`.
    freed: BTreeSet<u64>,
}

impl FreeFrames {
    /// All of `start..end` free.
    pub(super) fn new(start: u64, end: u64) -> Self {
        Self {
            start,
            next: start,
            end,
            freed: BTreeSet::new(),
        }
    }

    /// Makes `end` the new end (never above the old one); frames at or above it are never handed out.
    pub(super) fn truncate(&mut self, end: u64) {
        self.end = self.end.min(end).max(self.next);
        self.freed.retain(|&f| f < end);
    }

    /// Host bytes held: one `u64` per frame freed below the bump pointer (B-tree node overhead aside).
    pub(super) fn host_bytes(&self) -> u64 {
        (self.freed.len() * size_of::<u64>()) as u64
    }

    /// Returns the number of free frames.
    pub(super) fn len(&self) -> u64 {
        self.end - self.next + self.freed.len() as u64
    }

    /// Takes the lowest free frame.
    pub(super) fn pop_first(&mut self) -> Option<u64> {
        if let Some(f) = self.freed.pop_first() {
            return Some(f);
        }
        (self.next < self.end).then(|| {
            self.next += 1;
            self.next - 1
        })
    }

    /// Returns frame `f` (in use, inside the region) to the free frames.
    pub(super) fn insert(&mut self, f: u64) {
        debug_assert!(f >= self.start && f < self.next && !self.freed.contains(&f));
        if f + 1 != self.next {
            self.freed.insert(f);
            return;
        }
        self.next = f;
        while self.next > self.start && self.freed.last() == Some(&(self.next - 1)) {
            self.freed.pop_last();
            self.next -= 1;
        }
    }

    /// Takes the `n` frames `first..first + n`, all free (found by [`FreeFrames::first_run`] or
    /// [`FreeFrames::first_aligned_block`]).
    fn take(&mut self, first: u64, n: u64) {
        if first >= self.next {
            // The frames skipped between the bump pointer and the run stay free below it.
            self.freed.extend(self.next..first);
            self.next = first + n;
        } else {
            for f in first..first + n {
                let was_free = self.freed.remove(&f);
                debug_assert!(was_free, "frame {f} taken twice");
            }
        }
    }

    /// Takes the lowest run of `n` (≥ 1) contiguous free frames, first fit; returns its first frame.
    pub(super) fn take_first_run(&mut self, n: u64) -> Option<u64> {
        let first = self.first_run(n)?;
        self.take(first, n);
        Some(first)
    }

    fn first_run(&self, n: u64) -> Option<u64> {
        let mut run_start = 0;
        let mut run_len = 0u64;
        let mut prev: Option<u64> = None;
        for &f in &self.freed {
            if prev.is_some_and(|p| p + 1 == f) {
                run_len += 1;
            } else {
                run_start = f;
                run_len = 1;
            }
            prev = Some(f);
            if run_len == n {
                return Some(run_start);
            }
        }
        (self.end - self.next >= n).then_some(self.next)
    }

    /// Takes the lowest fully free block of `n` frames starting at a multiple of `n` (a THP); returns its
    /// first frame.
    pub(super) fn take_first_aligned_block(&mut self, n: u64) -> Option<u64> {
        let first = self.first_aligned_block(n)?;
        self.take(first, n);
        Some(first)
    }

    fn first_aligned_block(&self, n: u64) -> Option<u64> {
        let mut from = self.start;
        while let Some(&f) = self.freed.range(from..).next() {
            let block = f.next_multiple_of(n);
            if block + n > self.next {
                break;
            }
            if self.freed.range(block..block + n).count() as u64 == n {
                return Some(block);
            }
            // The next candidate block starts at or above `block + n`.
            from = block + n;
        }
        let block = self.next.next_multiple_of(n);
        (block + n <= self.end).then_some(block)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plain ordered set with the allocator's original rules: the reference the ranges must match.
    struct Reference(BTreeSet<u64>);

    impl Reference {
        fn run(&self, n: u64) -> Option<u64> {
            let v: Vec<u64> = self.0.iter().copied().collect();
            let n = usize::try_from(n).unwrap();
            (0..v.len()).find_map(|i| {
                let s = v[i];
                (v.len() - i >= n && v[i + n - 1] == s + n as u64 - 1).then_some(s)
            })
        }

        fn block(&self, start: u64, end: u64, n: u64) -> Option<u64> {
            (start..end)
                .step_by(usize::try_from(n).unwrap())
                .find(|&b| self.0.range(b..b + n).count() as u64 == n)
        }
    }

    /// Random allocations, frees, runs and aligned blocks hand out exactly the frames a plain ordered set
    /// of free frames would, in the same order.
    #[test]
    fn ranges_hand_out_the_same_frames_as_an_ordered_set() {
        let (start, end) = (64u64, 64 + 1024);
        let mut f = FreeFrames::new(start, end);
        let mut r = Reference((start..end).collect());
        let mut used: Vec<u64> = Vec::new();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            match x % 8 {
                0..=2 => {
                    let got = f.pop_first();
                    assert_eq!(got, r.0.pop_first());
                    used.extend(got);
                }
                3..=5 if !used.is_empty() => {
                    let i = (x >> 8) as usize % used.len();
                    let fr = used.swap_remove(i);
                    f.insert(fr);
                    r.0.insert(fr);
                }
                6 => {
                    let n = 1 + (x >> 8) % 9;
                    let want = r.run(n);
                    assert_eq!(f.take_first_run(n), want, "run of {n}");
                    for fr in want.into_iter().flat_map(|s| s..s + n) {
                        r.0.remove(&fr);
                        used.push(fr);
                    }
                }
                _ => {
                    let n = 16;
                    let want = r.block(start, end, n);
                    assert_eq!(f.take_first_aligned_block(n), want, "block");
                    for fr in want.into_iter().flat_map(|s| s..s + n) {
                        r.0.remove(&fr);
                        used.push(fr);
                    }
                }
            }
            assert_eq!(f.len(), r.0.len() as u64);
        }
    }

    #[test]
    fn a_never_used_region_holds_no_entries() {
        let mut f = FreeFrames::new(0, 1 << 40);
        assert_eq!(f.len(), 1 << 40);
        let a = f.pop_first().unwrap();
        let b = f.pop_first().unwrap();
        f.insert(b);
        f.insert(a);
        assert!(
            f.freed.is_empty(),
            "freeing the top coalesces into the bump pointer"
        );
        assert_eq!(f.next, 0);
    }
}
