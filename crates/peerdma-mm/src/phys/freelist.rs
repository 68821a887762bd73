//! The free frames of one region, kept as ranges: a bump pointer over the never-allocated tail plus an
//! ordered map of the runs of frames freed below it.
//!
//! Linux counterpart: the buddy allocator's free lists (mm/page_alloc.c), which also cost nothing per free
//! page beyond the `struct page` itself. The model hands frames out in one fixed order — lowest free frame
//! first, THPs at the lowest free 2 MiB-aligned block, contiguous runs first fit — and this structure keeps
//! exactly that order while a configured but never-used frame costs no host memory: every frame at or above
//! `next` is free, and `runs` holds the free frames below it as maximal runs (`start -> end`, exclusive), so
//! a THP or a process's memory freed in address order is one entry. The frame just below `next` is always in
//! use (a run freed up to `next` pulls `next` down), so a free run never reaches `next`.

use std::collections::BTreeMap;

/// The free frames of a region (module docs).
#[derive(Clone, Debug)]
pub(super) struct FreeFrames {
    /// First frame of the region.
    start: u64,
    /// Every frame in `next..end` is free.
    next: u64,
    /// One past the last allocatable frame.
    end: u64,
    /// Maximal runs of free frames below `next`: start -> end (exclusive), not touching each other.
    runs: BTreeMap<u64, u64>,
    /// Frames in `runs`.
    nr_runs_frames: u64,
}

impl FreeFrames {
    /// All of `start..end` free.
    pub(super) fn new(start: u64, end: u64) -> Self {
        Self {
            start,
            next: start,
            end,
            runs: BTreeMap::new(),
            nr_runs_frames: 0,
        }
    }

    /// Makes `end` the new end (never above the old one); frames at or above it are never handed out.
    /// Only used on a fresh region.
    pub(super) fn truncate(&mut self, end: u64) {
        debug_assert!(self.runs.is_empty() && self.next == self.start);
        self.end = self.end.min(end).max(self.next);
    }

    /// Host bytes held: two `u64` per run of freed frames (B-tree node overhead aside).
    pub(super) fn host_bytes(&self) -> u64 {
        (self.runs.len() * 2 * size_of::<u64>()) as u64
    }

    /// Returns the number of free frames.
    pub(super) fn len(&self) -> u64 {
        self.end - self.next + self.nr_runs_frames
    }

    /// Takes the lowest free frame.
    pub(super) fn pop_first(&mut self) -> Option<u64> {
        if let Some((s, e)) = self.runs.pop_first() {
            if s + 1 < e {
                self.runs.insert(s + 1, e);
            }
            self.nr_runs_frames -= 1;
            return Some(s);
        }
        (self.next < self.end).then(|| {
            self.next += 1;
            self.next - 1
        })
    }

    /// Returns frame `f` (in use, inside the region) to the free frames.
    pub(super) fn insert(&mut self, f: u64) {
        debug_assert!(f >= self.start && f < self.next);
        let mut s = f;
        let mut e = f + 1;
        if let Some((&ps, &pe)) = self.runs.range(..=f).next_back() {
            debug_assert!(pe <= f, "frame {f} freed twice");
            if pe == f {
                s = ps;
                self.runs.remove(&ps);
            }
        }
        if let Some(ne) = self.runs.remove(&e) {
            e = ne;
        }
        self.nr_runs_frames += 1;
        if e == self.next {
            self.next = s;
            self.nr_runs_frames -= e - s;
        } else {
            self.runs.insert(s, e);
        }
    }

    /// Takes the `n` frames `first..first + n`, all free (found by [`FreeFrames::first_run`] or
    /// [`FreeFrames::first_aligned_block`]).
    fn take(&mut self, first: u64, n: u64) {
        if first >= self.next {
            // The frames skipped between the bump pointer and the run stay free below it.
            if first > self.next {
                self.runs.insert(self.next, first);
                self.nr_runs_frames += first - self.next;
            }
            self.next = first + n;
            return;
        }
        let (&s, &e) = self
            .runs
            .range(..=first)
            .next_back()
            .expect("a run below the bump pointer holds the frames");
        debug_assert!(first + n <= e, "frames {first}+{n} not free");
        self.runs.remove(&s);
        if s < first {
            self.runs.insert(s, first);
        }
        if first + n < e {
            self.runs.insert(first + n, e);
        }
        self.nr_runs_frames -= n;
    }

    /// Takes the lowest run of `n` (≥ 1) contiguous free frames, first fit; returns its first frame.
    pub(super) fn take_first_run(&mut self, n: u64) -> Option<u64> {
        let first = self.first_run(n)?;
        self.take(first, n);
        Some(first)
    }

    fn first_run(&self, n: u64) -> Option<u64> {
        self.runs
            .iter()
            .find(|&(&s, &e)| e - s >= n)
            .map(|(&s, _)| s)
            .or_else(|| (self.end - self.next >= n).then_some(self.next))
    }

    /// Takes the lowest fully free block of `n` frames starting at a multiple of `n` (a THP); returns its
    /// first frame.
    pub(super) fn take_first_aligned_block(&mut self, n: u64) -> Option<u64> {
        let first = self.first_aligned_block(n)?;
        self.take(first, n);
        Some(first)
    }

    fn first_aligned_block(&self, n: u64) -> Option<u64> {
        self.runs
            .iter()
            .map(|(&s, &e)| (s.next_multiple_of(n), e))
            .find(|&(b, e)| b + n <= e)
            .map(|(b, _)| b)
            .or_else(|| {
                let block = self.next.next_multiple_of(n);
                (block + n <= self.end).then_some(block)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

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
            f.runs.is_empty(),
            "freeing the top coalesces into the bump pointer"
        );
        assert_eq!(f.next, 0);
    }

    /// Frames freed in address order below the bump pointer are one run, whatever their number.
    #[test]
    fn frames_freed_in_order_are_one_run() {
        let mut f = FreeFrames::new(0, 1 << 20);
        let first = f.take_first_aligned_block(512).unwrap();
        let second = f.take_first_aligned_block(512).unwrap();
        assert_eq!((first, second), (0, 512));
        for fr in first..first + 512 {
            f.insert(fr);
        }
        assert_eq!(f.runs.len(), 1);
        assert_eq!(f.host_bytes(), 16);
        assert_eq!(f.len(), (1 << 20) - 512);
        assert_eq!(
            f.take_first_aligned_block(512),
            Some(0),
            "the freed block is reused first"
        );
    }
}
