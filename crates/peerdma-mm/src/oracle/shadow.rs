//! The oracle's shadow: the content hash (token mode: the version) each logical page last had written, kept
//! in chunks of 64 consecutive pages with a presence mask, so a page costs 8 bytes plus its chunk's share.
//!
//! This is the oracle's own bookkeeping, not a Linux structure. Chunks are keyed by the logical page of
//! their first page (the page number divided by 64), in the order of [`LogicalPage`], so the range walks of
//! munmap, mremap and fork visit only the chunks of their range.

use std::collections::BTreeMap;

use peerdma_core::Pid;

use super::LogicalPage;

/// Pages per chunk.
const CHUNK: u64 = 64;
/// [`CHUNK`] as an array length.
const CHUNK_LEN: usize = 64;

#[derive(Clone, Debug)]
struct Chunk {
    /// Bit `i`: page `i` of the chunk has a record.
    present: u64,
    hashes: [u64; CHUNK_LEN],
}

/// The shadow (module docs).
#[derive(Clone, Debug, Default)]
pub(super) struct Shadow {
    chunks: BTreeMap<LogicalPage, Box<Chunk>>,
}

/// Splits a logical page into its chunk's key and its index in the chunk.
fn split(page: LogicalPage) -> (LogicalPage, usize) {
    match page {
        LogicalPage::Anon { pid, vpn } => (
            LogicalPage::Anon {
                pid,
                vpn: vpn / CHUNK,
            },
            (vpn % CHUNK) as usize,
        ),
        LogicalPage::File { file, pgoff } => (
            LogicalPage::File {
                file,
                pgoff: pgoff / CHUNK,
            },
            (pgoff % CHUNK) as usize,
        ),
    }
}

impl Shadow {
    /// Returns the record of `page`.
    pub(super) fn get(&self, page: LogicalPage) -> Option<u64> {
        let (key, i) = split(page);
        let c = self.chunks.get(&key)?;
        (c.present & (1 << i) != 0).then(|| c.hashes[i])
    }

    /// Records `h` for `page`.
    pub(super) fn set(&mut self, page: LogicalPage, h: u64) {
        let (key, i) = split(page);
        let c = self.chunks.entry(key).or_insert_with(|| {
            Box::new(Chunk {
                present: 0,
                hashes: [0; CHUNK_LEN],
            })
        });
        c.present |= 1 << i;
        c.hashes[i] = h;
    }

    /// Drops the record of `page`.
    pub(super) fn unset(&mut self, page: LogicalPage) {
        let (key, i) = split(page);
        if let Some(c) = self.chunks.get_mut(&key) {
            c.present &= !(1 << i);
            if c.present == 0 {
                self.chunks.remove(&key);
            }
        }
    }

    /// The chunk keys of `pid`'s anonymous pages `lo..hi` (`None` when empty).
    fn anon_keys(pid: Pid, lo: u64, hi: u64) -> Option<std::ops::RangeInclusive<LogicalPage>> {
        (lo < hi).then(|| {
            LogicalPage::Anon {
                pid,
                vpn: lo / CHUNK,
            }..=LogicalPage::Anon {
                pid,
                vpn: (hi - 1) / CHUNK,
            }
        })
    }

    /// The bits of chunk `chunk` that fall inside pages `lo..hi`.
    fn mask(chunk: u64, lo: u64, hi: u64) -> u64 {
        let first = chunk * CHUNK;
        let from = lo.saturating_sub(first).min(CHUNK);
        let to = hi.saturating_sub(first).min(CHUNK);
        let upto = |n: u64| {
            if n >= CHUNK {
                u64::MAX
            } else {
                (1u64 << n) - 1
            }
        };
        upto(to) & !upto(from)
    }

    /// Returns `pid`'s anonymous records for pages `lo..hi`, ascending.
    pub(super) fn anon_in(&self, pid: Pid, lo: u64, hi: u64) -> Vec<(u64, u64)> {
        let Some(keys) = Self::anon_keys(pid, lo, hi) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (key, c) in self.chunks.range(keys) {
            let LogicalPage::Anon { vpn: chunk, .. } = *key else {
                continue;
            };
            let mut bits = c.present & Self::mask(chunk, lo, hi);
            while bits != 0 {
                let i = bits.trailing_zeros();
                bits &= bits - 1;
                out.push((chunk * CHUNK + u64::from(i), c.hashes[i as usize]));
            }
        }
        out
    }

    /// Removes and returns `pid`'s anonymous records for pages `lo..hi`, ascending.
    pub(super) fn take_anon(&mut self, pid: Pid, lo: u64, hi: u64) -> Vec<(u64, u64)> {
        let out = self.anon_in(pid, lo, hi);
        let Some(keys) = Self::anon_keys(pid, lo, hi) else {
            return out;
        };
        let mut empty = Vec::new();
        for (key, c) in self.chunks.range_mut(keys) {
            let LogicalPage::Anon { vpn: chunk, .. } = *key else {
                continue;
            };
            c.present &= !Self::mask(chunk, lo, hi);
            if c.present == 0 {
                empty.push(*key);
            }
        }
        for k in empty {
            self.chunks.remove(&k);
        }
        out
    }

    /// Host bytes of the chunks and their keys.
    pub(super) fn host_bytes(&self) -> u64 {
        (self.chunks.len() * (size_of::<Chunk>() + size_of::<(LogicalPage, Box<Chunk>)>())) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Range removal, lookup and overwrite agree with a plain map over pages of several chunks.
    #[test]
    fn chunked_records_match_a_plain_map() {
        let mut s = Shadow::default();
        let mut m = BTreeMap::new();
        let pid = Pid(3);
        for vpn in (0..400u64).filter(|v| v % 3 != 0) {
            s.set(LogicalPage::Anon { pid, vpn }, vpn * 7 + 1);
            m.insert(vpn, vpn * 7 + 1);
        }
        s.set(
            LogicalPage::Anon {
                pid: Pid(4),
                vpn: 5,
            },
            99,
        );
        let got = s.take_anon(pid, 60, 200);
        let want: Vec<(u64, u64)> = m.range(60..200).map(|(&k, &v)| (k, v)).collect();
        assert_eq!(got, want);
        m.retain(|&k, _| !(60..200).contains(&k));
        assert_eq!(
            s.anon_in(pid, 0, 1 << 40),
            m.into_iter().collect::<Vec<_>>()
        );
        assert_eq!(
            s.get(LogicalPage::Anon {
                pid: Pid(4),
                vpn: 5
            }),
            Some(99)
        );
        assert_eq!(s.get(LogicalPage::Anon { pid, vpn: 61 }), None);
        assert!(
            s.take_anon(pid, 5, 5).is_empty(),
            "an empty range takes nothing"
        );
        s.unset(LogicalPage::Anon {
            pid: Pid(4),
            vpn: 5,
        });
        assert_eq!(
            s.get(LogicalPage::Anon {
                pid: Pid(4),
                vpn: 5
            }),
            None
        );
    }
}
