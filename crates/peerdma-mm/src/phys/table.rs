//! The frame table: [`Frame`] metadata of every frame, in chunks of 512 (2 MiB of frames) allocated when a
//! frame of the chunk is first allocated.
//!
//! Linux counterpart: the memmap (`mem_map` / the sparse-memory sections of `struct page`). Linux allocates
//! `struct page` for all memory at boot (64 bytes per 4 KiB); the model allocates it per 2 MiB on first use,
//! so a configured but never-used frame costs one pointer per 512 frames, and a frame that was never
//! allocated reads as free with generation 0.

use super::Frame;

/// Frames per chunk (2 MiB of frames, the alignment of every region).
pub(super) const CHUNK: usize = 512;

/// What a frame of a never-allocated chunk reads as.
static FREE_FRAME: Frame = Frame::FREE;

/// The frame table (module docs).
#[derive(Clone, Debug, Default)]
pub(super) struct FrameTable {
    chunks: Vec<Option<Box<[Frame; CHUNK]>>>,
    /// The region each chunk belongs to (regions are 2 MiB aligned, so a chunk is in exactly one).
    region: Vec<u32>,
}

fn split(f: u64) -> (usize, usize) {
    let f = usize::try_from(f).expect("frame index fits usize");
    (f / CHUNK, f % CHUNK)
}

impl FrameTable {
    /// Returns the number of frames the table covers.
    pub(super) fn len(&self) -> u64 {
        (self.chunks.len() * CHUNK) as u64
    }

    /// Extends the table to `end` frames (a multiple of [`CHUNK`]), the new ones in region `region`.
    pub(super) fn grow(&mut self, end: u64, region: u32) {
        let n = usize::try_from(end).expect("frame count fits usize") / CHUNK;
        if n > self.chunks.len() {
            self.chunks.reserve_exact(n - self.chunks.len());
            self.region.reserve_exact(n - self.region.len());
            self.chunks.resize_with(n, || None);
            self.region.resize(n, region);
        }
    }

    /// Returns the region of frame `f`.
    ///
    /// # Panics
    /// Panics when `f` is outside the table (an internal invariant: frame ids come from the allocator).
    pub(super) fn region(&self, f: u64) -> u32 {
        self.region[split(f).0]
    }

    /// Returns frame `f`'s metadata.
    ///
    /// # Panics
    /// Panics when `f` is outside the table.
    pub(super) fn get(&self, f: u64) -> &Frame {
        let (c, i) = split(f);
        match &self.chunks[c] {
            Some(ch) => &ch[i],
            None => &FREE_FRAME,
        }
    }

    /// Returns frame `f`'s metadata mutably, allocating its chunk on first use.
    ///
    /// # Panics
    /// Panics when `f` is outside the table.
    pub(super) fn get_mut(&mut self, f: u64) -> &mut Frame {
        let (c, i) = split(f);
        &mut self.chunks[c].get_or_insert_with(|| Box::new([Frame::FREE; CHUNK]))[i]
    }

    /// Host bytes held: the chunk pointers, the region of each chunk, and the chunks allocated.
    pub(super) fn host_bytes(&self) -> u64 {
        let table = self.chunks.capacity() * size_of::<Option<Box<[Frame; CHUNK]>>>()
            + self.region.capacity() * size_of::<u32>();
        let chunks = self.chunks.iter().flatten().count() * size_of::<[Frame; CHUNK]>();
        (table + chunks) as u64
    }
}
