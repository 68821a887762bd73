//! What a frame holds: real bytes, or (token mode) a 64-bit version stamp, stored once per written page in
//! chunks allocated on first write.
//!
//! Linux counterpart: the page's contents themselves (what `copy_highpage` copies and the shared zero page
//! stands in for while nothing was written). The model keeps them apart from the frame metadata so that a
//! frame that was never written costs nothing here:
//! - **bytes** mode: a 4 KiB buffer per written page, reached from a table of 512 pointers per 2 MiB of
//!   frames (allocated when a page of those 2 MiB is first written); a page never written reads as zeros.
//!   The page's content hash ([`hash_bytes`], what the oracle compares) is kept with its bytes: computed on
//!   the first hash after a write, reused until the next write, and copied with the page. The buffers of
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
pub(super) const PAGE_BYTES: usize = 4096;

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

/// The contents of all frames (module docs).
#[derive(Clone, Debug)]
pub(super) enum Store {
    /// The chunk tables, and the buffers of freed pages kept for reuse (at most [`SPARE_MAX`]).
    Bytes(Vec<Option<Box<[Option<PageBox>; CHUNK]>>>, Vec<PageBox>),
    Token(Vec<Option<Box<[u64; CHUNK]>>>),
}

fn split(f: u64) -> (usize, usize) {
    let f = usize::try_from(f).expect("frame index fits usize");
    (f / CHUNK, f % CHUNK)
}

fn zero_page() -> PageBox {
    Box::new(PageBuf {
        bytes: [0; PAGE_BYTES],
        hash: Cell::new(ZERO_HASH),
    })
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

    /// The bytes of frame `f`, `None` when never written (or in token mode).
    pub(super) fn bytes(&self, f: u64) -> Option<&[u8; PAGE_BYTES]> {
        let (c, i) = split(f);
        match self {
            Store::Bytes(chunks, _) => chunks.get(c)?.as_ref()?[i].as_deref().map(|p| &p.bytes),
            Store::Token(_) => None,
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

    /// The bytes of frame `f` for writing, allocated (zero-filled) if need be; `None` in token mode.
    pub(super) fn bytes_mut(&mut self, f: u64) -> Option<&mut [u8; PAGE_BYTES]> {
        let (c, i) = split(f);
        let Store::Bytes(chunks, spare) = self else {
            return None;
        };
        if chunks.len() <= c {
            chunks.resize_with(c + 1, || None);
        }
        let chunk = chunks[c].get_or_insert_with(|| Box::new(std::array::from_fn(|_| None)));
        let page = chunk[i].get_or_insert_with(|| match spare.pop() {
            Some(mut p) => {
                p.bytes.fill(0);
                p
            }
            None => zero_page(),
        });
        page.hash.set(HASH_UNKNOWN);
        Some(&mut page.bytes)
    }

    /// The [`hash_bytes`] of frame `f`'s bytes ([`ZERO_HASH`] when never written), from the page's cache
    /// when no write came since it was last computed.
    pub(super) fn bytes_hash(&self, f: u64) -> u64 {
        let (c, i) = split(f);
        let Store::Bytes(chunks, _) = self else {
            return ZERO_HASH;
        };
        let Some(page) = chunks
            .get(c)
            .and_then(Option::as_ref)
            .and_then(|ch| ch[i].as_deref())
        else {
            return ZERO_HASH;
        };
        let h = page.hash.get();
        if h != HASH_UNKNOWN {
            return h;
        }
        let h = hash_bytes(&page.bytes);
        page.hash.set(h);
        h
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
        let (sc, si) = split(src);
        let (dc, di) = split(dst);
        let old = chunks
            .get_mut(dc)
            .and_then(Option::as_mut)
            .and_then(|ch| ch[di].take());
        let page = match chunks
            .get(sc)
            .and_then(Option::as_ref)
            .and_then(|ch| ch[si].as_deref())
        {
            None => {
                if let Some(p) = old
                    && spare.len() < SPARE_MAX
                {
                    spare.push(p);
                }
                return;
            }
            Some(s) => match old.or_else(|| spare.pop()) {
                Some(mut p) => {
                    p.bytes = s.bytes;
                    p.hash.set(s.hash.get());
                    p
                }
                None => Box::new(s.clone()),
            },
        };
        if chunks.len() <= dc {
            chunks.resize_with(dc + 1, || None);
        }
        chunks[dc].get_or_insert_with(|| Box::new(std::array::from_fn(|_| None)))[di] = Some(page);
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
                if let Some(Some(ch)) = chunks.get_mut(c)
                    && let Some(p) = ch[i].take()
                    && spare.len() < SPARE_MAX
                {
                    spare.push(p);
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
            Store::Bytes(..) => self
                .bytes(f)
                .map_or(PageContent::Zero, |b| PageContent::Bytes(Box::new(*b))),
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
                if let Some(d) = self.bytes_mut(f) {
                    *d = *b;
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
                let table = chunks.capacity() * size_of::<Option<Box<[Option<PageBox>; CHUNK]>>>()
                    + spare.capacity() * size_of::<PageBox>()
                    + spare.len() * size_of::<PageBuf>();
                let inner: usize = chunks
                    .iter()
                    .flatten()
                    .map(|ch| {
                        size_of::<[Option<PageBox>; CHUNK]>()
                            + ch.iter().flatten().count() * size_of::<PageBuf>()
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
    let mut lanes: [u64; 4] = [
        0xcbf2_9ce4_8422_2325,
        0x8422_2325_cbf2_9ce4,
        0x9e37_79b9_7f4a_7c15,
        0x7f4a_7c15_9e37_79b9,
    ];
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
    let len = u64::try_from(d.len()).unwrap_or(u64::MAX);
    let h = lanes
        .iter()
        .zip([0u32, 16, 32, 48])
        .fold(len, |h, (&l, r)| {
            (h ^ l.rotate_left(r)).wrapping_mul(HASH_PRIME)
        });
    (h ^ (h >> 29)) | 1
}
