//! What a frame holds: real bytes, or (token mode) a 64-bit version stamp, stored once per written page in
//! chunks allocated on first write.
//!
//! Linux counterpart: the page's contents themselves (what `copy_highpage` copies and the shared zero page
//! stands in for while nothing was written). The model keeps them apart from the frame metadata so that a
//! frame that was never written costs nothing here:
//! - **bytes** mode: a table of 512 16-byte slots per 2 MiB of frames (allocated when a page of those 2 MiB
//!   is first written); a page never written reads as zeros. A page whose non-zero bytes all lie within one
//!   window of at most [`SMALL_MAX`] bytes (a counter, a flag, a one-byte store) keeps that window inline in
//!   its slot, with no buffer — what it reads, copies and hashes is exactly the whole page's, zeros around
//!   the window; any other written page has a 4 KiB buffer.
//!   A buffer's content hash ([`hash_bytes`], what the oracle compares) is kept with its bytes: computed on
//!   the first hash after a write, reused until the next write, and copied with the page; an inline page's
//!   hash is computed from its window alone ([`hash_window`]: the zero words around it advance the hash's
//!   lanes by a precomputed power of the multiplier), the same value [`hash_bytes`] gives for the whole page. The buffers of
//!   freed pages are kept for reuse, up to [`SPARE_MAX`] of them (2 MiB), so a migration or a COW that
//!   frees one page as it fills another copies into a buffer already there instead of going through the
//!   host allocator for every page (they count in [`Store::host_bytes`]).
//! - **token** mode (DESIGN.md §3, for terabyte runs): no bytes at all. Each page holds a 64-bit version,
//!   0 while never written; every write stamps the page with a fresh version from one counter (so two writes
//!   never leave the same stamp), and copies — COW, migration, swap, khugepaged — carry the stamp. Reads
//!   return zeros, and the oracle compares versions where bytes mode compares content hashes
//!   ([`super::PhysMem::content_hash`]). *Coarse:* a device or CPU copy made by reading bytes and writing
//!   them elsewhere stamps the destination with a new version instead of carrying the source's.

use std::cell::Cell;

/// Frames per content chunk (2 MiB of frames).
pub(super) const CHUNK: usize = 512;

/// Bytes per page.
pub(crate) const PAGE_BYTES: usize = 4096;

/// Freed page buffers kept for reuse (one 2 MiB chunk's worth: a `migrate_vma` chunk frees as many).
pub(super) const SPARE_MAX: usize = 512;

/// How page contents are modelled (`[sim] data`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DataMode {
    /// Real bytes, allocated per written page.
    #[default]
    Bytes,
    /// A 64-bit version per page instead of bytes (module docs).
    Token,
}

/// The contents of one page taken out of a frame and put back later (swap-out and swap-in): bytes or a
/// version, whichever the memory's [`DataMode`] keeps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PageContent {
    /// Never written: zeros (bytes mode) or version 0 (token mode).
    Zero,
    /// A page of bytes.
    Bytes(Box<[u8; PAGE_BYTES]>),
    /// A version stamp (token mode).
    Token(u64),
}

/// The hash slot of a page whose hash is not known: even and non-zero, which [`hash_bytes`] never returns.
const HASH_UNKNOWN: u64 = 2;

/// A written page: its bytes and their [`hash_bytes`], computed on the first read after a write and kept
/// until the next write (the oracle hashes a page on every access; most accesses are reads).
#[derive(Clone, Debug)]
pub(super) struct PageBuf {
    bytes: [u8; PAGE_BYTES],
    hash: Cell<u64>,
}

type PageBox = Box<PageBuf>;

/// The most bytes a page keeps inline (module docs): what fits a 16-byte slot beside its tag, offset and
/// length.
pub(super) const SMALL_MAX: usize = 12;

/// What a bytes-mode frame holds (module docs).
#[derive(Clone, Debug, Default)]
pub(super) enum Slot {
    /// Never written since allocated (or written only with zeros): reads as zeros.
    #[default]
    Empty,
    /// Zeros except for `bytes[..len]` at byte `off` of the page (`len` ≤ [`SMALL_MAX`]; the window may
    /// hold zeros too).
    Small {
        /// Bytes of the window in use.
        len: u8,
        /// Where the window starts in the page.
        off: u16,
        /// The window.
        bytes: [u8; SMALL_MAX],
    },
    /// A whole page of bytes.
    Full(PageBox),
}

const _: () = assert!(size_of::<Slot>() == 16, "a slot is 16 bytes");

impl Slot {
    /// The slot for a page that is zero except for `data` at byte `off`, if it fits inline: the
    /// non-zero part of `data` is kept ([`Slot::Empty`] when there is none); `None` when it spans more
    /// than [`SMALL_MAX`] bytes.
    fn small(off: usize, data: &[u8]) -> Option<Slot> {
        let Some(first) = data.iter().position(|&b| b != 0) else {
            return Some(Slot::Empty);
        };
        let last = data.iter().rposition(|&b| b != 0).expect("a non-zero byte");
        let len = last + 1 - first;
        if len > SMALL_MAX {
            return None;
        }
        let mut bytes = [0u8; SMALL_MAX];
        bytes[..len].copy_from_slice(&data[first..=last]);
        Some(Slot::Small {
            len: u8::try_from(len).expect("<= SMALL_MAX"),
            off: u16::try_from(off + first).expect("inside a page"),
            bytes,
        })
    }
}

/// The contents of all frames (module docs).
#[derive(Clone, Debug)]
pub(super) enum Store {
    /// The chunk tables, and the buffers of freed pages kept for reuse (at most [`SPARE_MAX`]).
    Bytes(Vec<Option<Box<[Slot; CHUNK]>>>, Vec<PageBox>),
    Token(Vec<Option<Box<[u64; CHUNK]>>>),
}

fn split(f: u64) -> (usize, usize) {
    let f = usize::try_from(f).expect("frame index fits usize");
    (f / CHUNK, f % CHUNK)
}

/// A buffer for a page's bytes: a spare one zero-filled, or a fresh zeroed one.
fn take_buf(spare: &mut Vec<PageBox>) -> PageBox {
    match spare.pop() {
        Some(mut p) => {
            p.bytes.fill(0);
            p
        }
        None => Box::new(PageBuf {
            bytes: [0; PAGE_BYTES],
            hash: Cell::new(ZERO_HASH),
        }),
    }
}

/// Keeps a freed buffer for reuse while there are fewer than [`SPARE_MAX`].
fn give_back(spare: &mut Vec<PageBox>, slot: Slot) {
    if let Slot::Full(p) = slot
        && spare.len() < SPARE_MAX
    {
        spare.push(p);
    }
}

/// The slot of frame `f` in `chunks`, `None` when its chunk table was never allocated.
fn slot(chunks: &[Option<Box<[Slot; CHUNK]>>], f: u64) -> Option<&Slot> {
    let (c, i) = split(f);
    chunks.get(c)?.as_ref().map(|ch| &ch[i])
}

/// The slot of frame `f` in `chunks` for writing, its chunk table allocated if need be.
fn slot_mut(chunks: &mut Vec<Option<Box<[Slot; CHUNK]>>>, f: u64) -> &mut Slot {
    let (c, i) = split(f);
    if chunks.len() <= c {
        chunks.resize_with(c + 1, || None);
    }
    &mut chunks[c].get_or_insert_with(|| Box::new(std::array::from_fn(|_| Slot::Empty)))[i]
}

impl Store {
    pub(super) fn new(mode: DataMode) -> Self {
        match mode {
            DataMode::Bytes => Store::Bytes(Vec::new(), Vec::new()),
            DataMode::Token => Store::Token(Vec::new()),
        }
    }

    pub(super) fn mode(&self) -> DataMode {
        match self {
            Store::Bytes(..) => DataMode::Bytes,
            Store::Token(_) => DataMode::Token,
        }
    }

    /// Whether frame `f` holds bytes that were written (`false` when it reads as zeros without any, and
    /// always in token mode).
    pub(super) fn has_bytes(&self, f: u64) -> bool {
        match self {
            Store::Bytes(chunks, _) => slot(chunks, f).is_some_and(|s| !matches!(s, Slot::Empty)),
            Store::Token(_) => false,
        }
    }

    /// Copies the `buf.len()` bytes of frame `f` at `offset` into `buf` (zeros where nothing was written,
    /// and always in token mode).
    pub(super) fn read(&self, f: u64, offset: usize, buf: &mut [u8]) {
        let s = match self {
            Store::Bytes(chunks, _) => slot(chunks, f),
            Store::Token(_) => None,
        };
        match s {
            Some(Slot::Full(p)) => buf.copy_from_slice(&p.bytes[offset..offset + buf.len()]),
            Some(Slot::Small { len, off, bytes }) => {
                buf.fill(0);
                // The overlap of the window and the bytes asked for.
                let (w0, w1) = (usize::from(*off), usize::from(*off) + usize::from(*len));
                let (r0, r1) = (offset, offset + buf.len());
                let (lo, hi) = (w0.max(r0), w1.min(r1));
                if lo < hi {
                    buf[lo - r0..hi - r0].copy_from_slice(&bytes[lo - w0..hi - w0]);
                }
            }
            Some(Slot::Empty) | None => buf.fill(0),
        }
    }

    /// Writes `data` into frame `f` at `offset` (bytes mode; ignored in token mode): inline while the
    /// page's non-zero bytes fit [`SMALL_MAX`], in a buffer from then on.
    pub(super) fn write(&mut self, f: u64, offset: usize, data: &[u8]) {
        let Store::Bytes(chunks, spare) = self else {
            return;
        };
        if data.is_empty() {
            return;
        }
        let end = offset + data.len();
        // An absent chunk table is an empty slot: zeros allocate nothing.
        if slot(chunks, f).is_none_or(|s| matches!(s, Slot::Empty)) {
            match Slot::small(offset, data) {
                Some(Slot::Empty) => {}
                Some(s) => *slot_mut(chunks, f) = s,
                None => {
                    let mut p = take_buf(spare);
                    p.bytes[offset..end].copy_from_slice(data);
                    p.hash.set(HASH_UNKNOWN);
                    *slot_mut(chunks, f) = Slot::Full(p);
                }
            }
            return;
        }
        let s = slot_mut(chunks, f);
        match s {
            Slot::Full(p) => {
                p.bytes[offset..end].copy_from_slice(data);
                p.hash.set(HASH_UNKNOWN);
            }
            Slot::Small { len, off, bytes } => {
                // The page after the write: the old window where the write does not reach, then `data`.
                let (w0, w1) = (usize::from(*off), usize::from(*off) + usize::from(*len));
                let old = |p: usize| {
                    if (w0..w1).contains(&p) && !(offset..end).contains(&p) {
                        bytes[p - w0]
                    } else {
                        0
                    }
                };
                // Its non-zero bytes: those of `data`, and those the window keeps.
                let kept = (w0..w1).filter(|&p| old(p) != 0);
                let lo = data
                    .iter()
                    .position(|&b| b != 0)
                    .map(|i| offset + i)
                    .into_iter()
                    .chain(kept.clone().next())
                    .min();
                let hi = data
                    .iter()
                    .rposition(|&b| b != 0)
                    .map(|i| offset + i)
                    .into_iter()
                    .chain(kept.clone().next_back())
                    .max();
                match (lo, hi) {
                    (Some(lo), Some(hi)) if hi + 1 - lo <= SMALL_MAX => {
                        let mut w = [0u8; SMALL_MAX];
                        for (p, x) in (lo..=hi).zip(w.iter_mut()) {
                            *x = if (offset..end).contains(&p) {
                                data[p - offset]
                            } else {
                                old(p)
                            };
                        }
                        *s = Slot::Small {
                            len: u8::try_from(hi + 1 - lo).expect("<= SMALL_MAX"),
                            off: u16::try_from(lo).expect("inside a page"),
                            bytes: w,
                        };
                    }
                    (None, _) | (_, None) => *s = Slot::Empty,
                    _ => {
                        let mut p = take_buf(spare);
                        p.bytes[w0..w1].copy_from_slice(&bytes[..w1 - w0]);
                        p.bytes[offset..end].copy_from_slice(data);
                        p.hash.set(HASH_UNKNOWN);
                        *s = Slot::Full(p);
                    }
                }
            }
            Slot::Empty => unreachable!("handled above"),
        }
    }

    /// The version of frame `f` (0 when never written, and always 0 in bytes mode).
    pub(super) fn version(&self, f: u64) -> u64 {
        let (c, i) = split(f);
        match self {
            Store::Token(chunks) => chunks.get(c).and_then(Option::as_ref).map_or(0, |ch| ch[i]),
            Store::Bytes(..) => 0,
        }
    }

    /// The [`hash_bytes`] of frame `f`'s bytes ([`ZERO_HASH`] when never written), from the page's cache
    /// when no write came since it was last computed.
    pub(super) fn bytes_hash(&self, f: u64) -> u64 {
        let Store::Bytes(chunks, _) = self else {
            return ZERO_HASH;
        };
        match slot(chunks, f) {
            Some(Slot::Full(page)) => {
                let h = page.hash.get();
                if h != HASH_UNKNOWN {
                    return h;
                }
                let h = hash_bytes(&page.bytes);
                page.hash.set(h);
                h
            }
            Some(Slot::Small { len, off, bytes }) => {
                hash_window(usize::from(*off), &bytes[..usize::from(*len)])
            }
            Some(Slot::Empty) | None => ZERO_HASH,
        }
    }

    /// Copies frame `src`'s contents over frame `dst`'s, the cached hash with them (into `dst`'s buffer or a
    /// spare one when there is one).
    pub(super) fn copy(&mut self, src: u64, dst: u64) {
        if src == dst {
            return;
        }
        let Store::Bytes(chunks, spare) = self else {
            let v = self.version(src);
            if v == 0 {
                self.clear(dst);
            } else {
                self.set_version(dst, v);
            }
            return;
        };
        let (dc, di) = split(dst);
        let old = chunks
            .get_mut(dc)
            .and_then(Option::as_mut)
            .map(|ch| std::mem::take(&mut ch[di]))
            .unwrap_or_default();
        let page = match slot(chunks, src) {
            None | Some(Slot::Empty) => {
                give_back(spare, old);
                return;
            }
            Some(Slot::Small { len, off, bytes }) => {
                let s = Slot::Small {
                    len: *len,
                    off: *off,
                    bytes: *bytes,
                };
                give_back(spare, old);
                s
            }
            Some(Slot::Full(s)) => {
                // Into `dst`'s buffer or a spare one (no need to zero it first), else a new one.
                let reuse = match old {
                    Slot::Full(p) => Some(p),
                    _ => spare.pop(),
                };
                Slot::Full(match reuse {
                    Some(mut p) => {
                        p.bytes = s.bytes;
                        p.hash.set(s.hash.get());
                        p
                    }
                    None => Box::new(PageBuf {
                        bytes: s.bytes,
                        hash: Cell::new(s.hash.get()),
                    }),
                })
            }
        };
        *slot_mut(chunks, dst) = page;
    }

    /// Sets the version of frame `f` (token mode; ignored in bytes mode).
    pub(super) fn set_version(&mut self, f: u64, v: u64) {
        let (c, i) = split(f);
        let Store::Token(chunks) = self else {
            return;
        };
        if v == 0 && chunks.get(c).is_none_or(Option::is_none) {
            return;
        }
        if chunks.len() <= c {
            chunks.resize_with(c + 1, || None);
        }
        chunks[c].get_or_insert_with(|| Box::new([0; CHUNK]))[i] = v;
    }

    /// Forgets the contents of frame `f` (freed or reallocated: it reads as zeros again).
    pub(super) fn clear(&mut self, f: u64) {
        let (c, i) = split(f);
        match self {
            Store::Bytes(chunks, spare) => {
                if let Some(Some(ch)) = chunks.get_mut(c) {
                    give_back(spare, std::mem::take(&mut ch[i]));
                }
            }
            Store::Token(chunks) => {
                if let Some(Some(ch)) = chunks.get_mut(c) {
                    ch[i] = 0;
                }
            }
        }
    }

    /// Returns the contents of frame `f` as a value.
    pub(super) fn content(&self, f: u64) -> PageContent {
        match self {
            Store::Bytes(..) => {
                if !self.has_bytes(f) {
                    return PageContent::Zero;
                }
                let mut b = Box::new([0u8; PAGE_BYTES]);
                self.read(f, 0, &mut b[..]);
                PageContent::Bytes(b)
            }
            Store::Token(_) => match self.version(f) {
                0 => PageContent::Zero,
                v => PageContent::Token(v),
            },
        }
    }

    /// Replaces the contents of frame `f` with `c` (bytes are ignored in token mode and versions in bytes
    /// mode: each mode only ever hands out its own kind).
    pub(super) fn set_content(&mut self, f: u64, c: PageContent) {
        match c {
            PageContent::Zero => self.clear(f),
            PageContent::Bytes(b) => {
                if self.mode() == DataMode::Bytes {
                    self.clear(f);
                    self.write(f, 0, &b[..]);
                }
            }
            PageContent::Token(v) => self.set_version(f, v),
        }
    }

    /// Host bytes held for contents: chunk tables plus page buffers (an estimate of the heap blocks, for
    /// [`super::PhysMem::host_bytes`]).
    pub(super) fn host_bytes(&self) -> u64 {
        match self {
            Store::Bytes(chunks, spare) => {
                let table = chunks.capacity() * size_of::<Option<Box<[Slot; CHUNK]>>>()
                    + spare.capacity() * size_of::<PageBox>()
                    + spare.len() * size_of::<PageBuf>();
                let inner: usize = chunks
                    .iter()
                    .flatten()
                    .map(|ch| {
                        size_of::<[Slot; CHUNK]>()
                            + ch.iter().filter(|s| matches!(s, Slot::Full(_))).count()
                                * size_of::<PageBuf>()
                    })
                    .sum();
                (table + inner) as u64
            }
            Store::Token(chunks) => {
                let table = chunks.capacity() * size_of::<Option<Box<[u64; CHUNK]>>>();
                let inner = chunks.iter().flatten().count() * size_of::<[u64; CHUNK]>();
                (table + inner) as u64
            }
        }
    }
}

/// The content hash of an all-zero page.
pub const ZERO_HASH: u64 = 0;

/// The multiplier of each lane of [`hash_bytes`] (FNV-1a's 64-bit prime).
const HASH_PRIME: u64 = 0x0100_0000_01b3;

/// Hashes a page of bytes; an all-zero page hashes to [`ZERO_HASH`], any other to an odd value.
///
/// Four independent FNV-1a-style lanes over 8-byte words (word `i` goes to lane `i % 4`), so the
/// multiplications of neighbouring words do not wait for each other, and the all-zero test is an OR over
/// the same words in the same pass (no second scan). The lanes are folded together at the end. The oracle
/// compares these hashes only for equality, within one run: any well-mixed 64-bit function serves.
pub fn hash_bytes(d: &[u8]) -> u64 {
    let mut lanes = LANES;
    let mut any = 0u64;
    let word = |b: &[u8]| {
        let mut w = [0u8; 8];
        w[..b.len()].copy_from_slice(b);
        u64::from_le_bytes(w)
    };
    let mut blocks = d.chunks_exact(32);
    for block in &mut blocks {
        for (lane, w) in lanes.iter_mut().zip(block.chunks_exact(8)) {
            let w = word(w);
            any |= w;
            *lane = (*lane ^ w).wrapping_mul(HASH_PRIME);
        }
    }
    for (lane, w) in lanes.iter_mut().zip(blocks.remainder().chunks(8)) {
        let w = word(w);
        any |= w;
        *lane = (*lane ^ w).wrapping_mul(HASH_PRIME);
    }
    if any == 0 {
        return ZERO_HASH;
    }
    fold(lanes, u64::try_from(d.len()).unwrap_or(u64::MAX))
}

/// The starting states of [`hash_bytes`]' four lanes.
const LANES: [u64; 4] = [
    0xcbf2_9ce4_8422_2325,
    0x8422_2325_cbf2_9ce4,
    0x9e37_79b9_7f4a_7c15,
    0x7f4a_7c15_9e37_79b9,
];

/// Folds the lanes of a non-zero input of `len` bytes into [`hash_bytes`]' result.
fn fold(lanes: [u64; 4], len: u64) -> u64 {
    let h = lanes
        .iter()
        .zip([0u32, 16, 32, 48])
        .fold(len, |h, (&l, r)| {
            (h ^ l.rotate_left(r)).wrapping_mul(HASH_PRIME)
        });
    (h ^ (h >> 29)) | 1
}

/// 8-byte words per page.
const PAGE_WORDS: usize = PAGE_BYTES / 8;

/// `POWERS[k]` = [`HASH_PRIME`]^k: a lane of [`hash_bytes`] that takes `k` zero words is multiplied by it.
const POWERS: [u64; PAGE_WORDS / 4 + 1] = {
    let mut p = [1u64; PAGE_WORDS / 4 + 1];
    let mut k = 1;
    while k < p.len() {
        p[k] = p[k - 1].wrapping_mul(HASH_PRIME);
        k += 1;
    }
    p
};

/// [`hash_bytes`] of a page that is zero except for `window` at byte `off`, computed from the window's
/// words alone: a zero word only multiplies its lane by [`HASH_PRIME`], so each run of zero words a lane
/// takes is one multiplication by a power from [`POWERS`].
pub(super) fn hash_window(off: usize, window: &[u8]) -> u64 {
    if window.iter().all(|&b| b == 0) {
        return ZERO_HASH;
    }
    let mut lanes = LANES;
    // The next word index each lane takes (lane `j` takes words `j`, `j + 4`, ...).
    let mut next = [0usize, 1, 2, 3];
    let (first, last) = (off / 8, (off + window.len() - 1) / 8);
    for w in first..=last {
        let mut word = [0u8; 8];
        for (k, b) in word.iter_mut().enumerate() {
            let p = w * 8 + k;
            if (off..off + window.len()).contains(&p) {
                *b = window[p - off];
            }
        }
        let j = w % 4;
        lanes[j] = (lanes[j].wrapping_mul(POWERS[(w - next[j]) / 4]) ^ u64::from_le_bytes(word))
            .wrapping_mul(HASH_PRIME);
        next[j] = w + 4;
    }
    for (l, n) in lanes.iter_mut().zip(next) {
        *l = l.wrapping_mul(POWERS[(PAGE_WORDS - n.min(PAGE_WORDS)).div_ceil(4)]);
    }
    fold(lanes, PAGE_BYTES as u64)
}
