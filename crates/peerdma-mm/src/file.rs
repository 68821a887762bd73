//! In-memory files: a page cache with no backing store beyond it (tmpfs-like), used for file-backed and
//! shared anonymous (shmem) mappings.
//!
//! Linux counterpart: `struct address_space` and shmem. A page that was never written is created zero-filled
//! when first needed. Writeback is modelled as clearing the dirty bit (there is no slower medium yet).

use std::collections::BTreeMap;

use peerdma_core::FrameId;

use crate::phys::{FrameOwner, LruState, PhysMem};

/// One file.
#[derive(Clone, Debug, Default)]
pub struct File {
    /// Name for reports.
    name: String,
    /// Size in bytes (`i_size`).
    size: u64,
    /// The page cache: page offset → frame.
    pages: BTreeMap<u64, FrameId>,
    /// A shmem object backing shared anonymous memory (not visible by name).
    shmem: bool,
    /// For a DAX file: the persistent-memory region whose frames are its blocks.
    dax_region: Option<usize>,
}

impl File {
    /// Returns the file's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Returns the file size in bytes (`i_size`).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Returns the number of pages covering the file size.
    pub fn nr_pages(&self) -> u64 {
        self.size.div_ceil(4096)
    }

    /// Returns whether the file is a shmem object (shared anonymous memory).
    pub fn is_shmem(&self) -> bool {
        self.shmem
    }

    /// Returns the persistent-memory region of a DAX file.
    pub fn dax_region(&self) -> Option<usize> {
        self.dax_region
    }

    /// Returns the cached pages with offsets in `[first, last)`, in order.
    pub fn cached_pages(&self, first: u64, last: u64) -> Vec<(u64, FrameId)> {
        self.pages
            .range(first..last)
            .map(|(k, v)| (*k, *v))
            .collect()
    }
}

/// Every file of the simulation, by id (the inode table with each inode's `address_space`). The frames it
/// names hold one page-cache reference each, taken by [`PageCache::page`] and dropped by the caller of
/// [`PageCache::remove_page`].
#[derive(Debug, Default)]
pub(crate) struct PageCache {
    files: Vec<File>,
}

impl PageCache {
    /// Creates a file of `size` bytes and returns its id.
    pub(crate) fn create(&mut self, name: &str, size: u64, shmem: bool) -> u32 {
        let id = u32::try_from(self.files.len()).expect("fewer than 2^32 files");
        self.files.push(File {
            name: name.to_owned(),
            size,
            pages: BTreeMap::new(),
            shmem,
            dax_region: None,
        });
        id
    }

    /// Returns file `id`, if it exists.
    pub(crate) fn get(&self, id: u32) -> Option<&File> {
        self.files.get(id as usize)
    }

    /// Returns file `id`.
    ///
    /// # Panics
    /// Panics for an unknown id (ids come from [`PageCache::create`]).
    pub(crate) fn file(&self, id: u32) -> &File {
        &self.files[id as usize]
    }

    fn file_mut(&mut self, id: u32) -> &mut File {
        &mut self.files[id as usize]
    }

    /// Makes file `id` a DAX file whose blocks are the frames of region `region`.
    pub(crate) fn set_dax_region(&mut self, id: u32, region: usize) {
        self.file_mut(id).dax_region = Some(region);
    }

    /// Sets the size of file `id` (its pages past the end must be removed first).
    pub(crate) fn set_size(&mut self, id: u32, size: u64) {
        self.file_mut(id).size = size;
    }

    /// Extends file `id` to at least `size` bytes.
    pub(crate) fn extend_to(&mut self, id: u32, size: u64) {
        let f = self.file_mut(id);
        f.size = f.size.max(size);
    }

    /// Removes page `pgoff` from file `id`'s cache, returning its frame (whose page-cache reference the caller
    /// now holds).
    pub(crate) fn remove_page(&mut self, id: u32, pgoff: u64) -> Option<FrameId> {
        self.file_mut(id).pages.remove(&pgoff)
    }

    /// Returns (creating zero-filled on demand) the page-cache frame of `file` at `pgoff`; `None` beyond EOF
    /// or when memory is exhausted (`filemap_get_folio` with `FGP_CREAT`).
    pub(crate) fn page(&mut self, phys: &mut PhysMem, file: u32, pgoff: u64) -> Option<FrameId> {
        let f = self.file(file);
        if pgoff >= f.nr_pages() {
            return None;
        }
        if let Some(&frame) = f.pages.get(&pgoff) {
            return Some(frame);
        }
        let owner = FrameOwner::File { file, pgoff };
        // A page-cache page belongs to no one process: node 0 first, then fallback.
        let frame = match f.dax_region {
            Some(region) => phys.alloc(region, owner),
            None => phys.alloc_node(0, owner),
        }
        .ok()?;
        phys.frame_mut(frame).lru = LruState::Inactive;
        self.file_mut(file).pages.insert(pgoff, frame);
        Some(frame)
    }
}
