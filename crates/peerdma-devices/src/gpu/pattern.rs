//! GPU kernels as page-access streams: sequential, strided, random and hot-set patterns spread over a number
//! of concurrent warps (the access side of the UVM studies' workloads; no instruction is modelled).
//!
//! A kernel makes `nr_accesses` page accesses in all; access `i` of the global stream belongs to warp
//! `i % warps`, so the warps walk the stream side by side as a GPU's concurrently resident warps do.

use peerdma_sim::RngStream;

/// The shape of a kernel's page-access stream over a managed range of `nr_pages` pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessPattern {
    /// Pages 0, 1, 2, ... (wrapping).
    Sequential,
    /// Pages 0, s, 2s, ... (wrapping with an offset of one page per lap, so every page is reached).
    Strided {
        /// Stride in pages (at least 1).
        stride: u64,
    },
    /// Uniformly random pages.
    Random,
    /// `hot_percent` % of accesses go to the first `hot_pages` pages, the rest anywhere.
    HotSet {
        /// Size of the hot set in pages.
        hot_pages: u64,
        /// Share of accesses that hit the hot set (0–100).
        hot_percent: u64,
    },
}

/// A kernel: its pattern, size and concurrency.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelSpec {
    /// The access pattern.
    pub pattern: AccessPattern,
    /// Page accesses in all.
    pub nr_accesses: u64,
    /// Concurrent warps (at least 1).
    pub warps: u32,
    /// Whether accesses write (else read).
    pub write: bool,
    /// Test hook: access number `n` goes outside the managed range (a fatal fault: the context is torn down).
    pub fatal_at: Option<u64>,
}

/// One access of a warp: a page index of the range (`u64::MAX`: outside it) and whether it writes.
pub(crate) type Access = (u64, bool);

impl KernelSpec {
    /// Returns each warp's access stream over a range of `nr_pages` pages.
    pub(crate) fn streams(&self, nr_pages: u64, rng: &mut RngStream) -> Vec<Vec<Access>> {
        let warps = self.warps.max(1) as usize;
        let mut out = vec![Vec::new(); warps];
        let n = nr_pages.max(1);
        for i in 0..self.nr_accesses {
            let page = if self.fatal_at == Some(i) {
                u64::MAX
            } else {
                match self.pattern {
                    AccessPattern::Sequential => i % n,
                    AccessPattern::Strided { stride } => {
                        let s = stride.max(1);
                        let per_lap = n.div_ceil(s);
                        let lap = i / per_lap;
                        ((i % per_lap) * s + lap) % n
                    }
                    AccessPattern::Random => rng.below(n),
                    AccessPattern::HotSet {
                        hot_pages,
                        hot_percent,
                    } => {
                        if rng.below(100) < hot_percent {
                            rng.below(hot_pages.clamp(1, n))
                        } else {
                            rng.below(n)
                        }
                    }
                }
            };
            let w = usize::try_from(i % warps as u64).expect("below the warp count");
            out[w].push((page, self.write));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_pattern_reaches_every_page() {
        let k = KernelSpec {
            pattern: AccessPattern::Strided { stride: 4 },
            nr_accesses: 16,
            warps: 1,
            write: false,
            fatal_at: None,
        };
        let mut rng = RngStream::new(1, "t");
        let mut pages: Vec<u64> = k.streams(16, &mut rng)[0].iter().map(|a| a.0).collect();
        assert_eq!(&pages[..4], &[0, 4, 8, 12]);
        pages.sort_unstable();
        pages.dedup();
        assert_eq!(pages.len(), 16);
    }

    #[test]
    fn accesses_are_dealt_round_robin_to_warps() {
        let k = KernelSpec {
            pattern: AccessPattern::Sequential,
            nr_accesses: 10,
            warps: 3,
            write: true,
            fatal_at: Some(4),
        };
        let mut rng = RngStream::new(1, "t");
        let s = k.streams(100, &mut rng);
        assert_eq!(s[0].iter().map(|a| a.0).collect::<Vec<_>>(), [0, 3, 6, 9]);
        assert_eq!(s[1][1].0, u64::MAX, "access 4 is the fatal one");
    }
}
