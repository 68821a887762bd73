//! The oracle's shadow: the content hash (token mode: the version) each logical page last had written, kept
//! in chunks of 64 consecutive pages with a presence mask, so a page costs 8 bytes plus its chunk's share.
//!
//! This is the oracle's own bookkeeping, not a Linux structure. Chunks are keyed by the logical page of
//! their first page (the page number divided by 64), in the order of [`LogicalPage`], so the range walks of
//! munmap, mremap and fork visit only the chunks of their range. The chunk used last is held out of the
//! map (`hot`), so a run of accesses to neighbouring pages — a fault loop, a streamed write — costs one
//! map operation per 64 pages.

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
    /// Every chunk but the hot one; no chunk is empty.
    chunks: BTreeMap<LogicalPage, Box<Chunk>>,
    /// The chunk used last, with its key (not in `chunks`; never empty).
    hot: Option<(LogicalPage, Box<Chunk>)>,
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
        let c = match &self.hot {
            Some((k, c)) if *k == key => c,
            _ => self.chunks.get(&key)?,
        };
        (c.present & (1 << i) != 0).then(|| c.hashes[i])
    }

    /// Makes `key`'s chunk the hot one (created empty if need be) and returns it.
    fn hot_mut(&mut self, key: LogicalPage) -> &mut Chunk {
        if self.hot.as_ref().is_none_or(|(k, _)| *k != key) {
            let c = self.chunks.remove(&key).unwrap_or_else(|| {
                Box::new(Chunk {
                    present: 0,
                    hashes: [0; CHUNK_LEN],
                })
            });
            if let Some((k, old)) = self.hot.replace((key, c)) {
                self.chunks.insert(k, old);
            }
        }
        &mut self.hot.as_mut().expect("just made hot").1
    }

    /// Puts the hot chunk back into the map (before the range walks).
    fn cool(&mut self) {
        if let Some((k, c)) = self.hot.take() {
            self.chunks.insert(k, c);
        }
    }

    /// Records `h` for `page`.
    pub(super) fn set(&mut self, page: LogicalPage, h: u64) {
        let (key, i) = split(page);
        let c = self.hot_mut(key);
        c.present |= 1 << i;
        c.hashes[i] = h;
    }

    /// Drops the record of `page`.
    pub(super) fn unset(&mut self, page: LogicalPage) {
        let (key, i) = split(page);
        if let Some((k, c)) = &mut self.hot
            && *k == key
        {
            c.present &= !(1 << i);
            if c.present == 0 {
                self.hot = None;
            }
            return;
        }
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

    /// The records of chunk `chunk` (`c`) inside pages `lo..hi`, appended to `out` ascending.
    fn chunk_records(c: &Chunk, chunk: u64, lo: u64, hi: u64, out: &mut Vec<(u64, u64)>) {
        let mut bits = c.present & Self::mask(chunk, lo, hi);
        while bits != 0 {
            let i = bits.trailing_zeros();
            bits &= bits - 1;
            out.push((chunk * CHUNK + u64::from(i), c.hashes[i as usize]));
        }
    }

    /// Returns `pid`'s anonymous records for pages `lo..hi`, ascending.
    pub(super) fn anon_in(&self, pid: Pid, lo: u64, hi: u64) -> Vec<(u64, u64)> {
        let Some(keys) = Self::anon_keys(pid, lo, hi) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (key, c) in self.chunks.range(keys.clone()) {
            let LogicalPage::Anon { vpn: chunk, .. } = *key else {
                continue;
            };
            Self::chunk_records(c, chunk, lo, hi, &mut out);
        }
        if let Some((key @ LogicalPage::Anon { vpn: chunk, .. }, c)) = &self.hot
            && keys.contains(key)
        {
            let mut hot = Vec::new();
            Self::chunk_records(c, *chunk, lo, hi, &mut hot);
            let at = out.partition_point(|&(v, _)| v < chunk * CHUNK);
            out.splice(at..at, hot);
        }
        out
    }

    /// Removes and returns `pid`'s anonymous records for pages `lo..hi`, ascending.
    pub(super) fn take_anon(&mut self, pid: Pid, lo: u64, hi: u64) -> Vec<(u64, u64)> {
        self.cool();
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
        let n = self.chunks.len() + usize::from(self.hot.is_some());
        (n * (size_of::<Chunk>() + size_of::<(LogicalPage, Box<Chunk>)>())) as u64
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

    /// Random interleavings of set, unset, get and the range walks agree with a plain map, whichever chunk
    /// is hot at the time.
    #[test]
    fn the_hot_chunk_is_invisible() {
        let mut s = Shadow::default();
        let mut m: BTreeMap<(u32, u64), u64> = BTreeMap::new();
        let mut x = 88_172_645_463_325_252u64;
        for step in 0..20_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let pid = Pid(u32::try_from(x % 2).unwrap());
            let vpn = (x >> 8) % 400;
            let page = LogicalPage::Anon { pid, vpn };
            match (x >> 40) % 6 {
                0..=2 => {
                    s.set(page, step + 1);
                    m.insert((pid.0, vpn), step + 1);
                }
                3 => {
                    s.unset(page);
                    m.remove(&(pid.0, vpn));
                }
                4 => {
                    let hi = vpn + (x >> 50) % 150;
                    let want: Vec<(u64, u64)> = m
                        .range((pid.0, vpn)..(pid.0, hi))
                        .map(|(&(_, v), &h)| (v, h))
                        .collect();
                    if x & 1 == 0 {
                        assert_eq!(s.anon_in(pid, vpn, hi), want);
                    } else {
                        assert_eq!(s.take_anon(pid, vpn, hi), want);
                        m.retain(|&(p, v), _| p != pid.0 || !(vpn..hi).contains(&v));
                    }
                }
                _ => assert_eq!(s.get(page), m.get(&(pid.0, vpn)).copied()),
            }
        }
    }
}
