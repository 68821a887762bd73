//! In-memory files: a page cache with no backing store beyond it (tmpfs-like), used for file-backed and
//! shared anonymous (shmem) mappings.
//!
//! Linux counterpart: `struct address_space` and shmem. A page that was never written is created zero-filled
//! when first needed. Writeback is modelled as clearing the dirty bit (there is no slower medium yet).

use std::collections::BTreeMap;

use peerdma_core::FrameId;

/// One file.
#[derive(Clone, Debug, Default)]
pub struct File {
    /// Name for reports.
    pub name: String,
    /// Size in bytes (`i_size`).
    pub size: u64,
    /// The page cache: page offset → frame.
    pub pages: BTreeMap<u64, FrameId>,
    /// A shmem object backing shared anonymous memory (not visible by name).
    pub shmem: bool,
    /// For a DAX file: the persistent-memory region whose frames are its blocks.
    pub dax_region: Option<usize>,
}

impl File {
    /// Returns the number of pages covering the file size.
    pub fn nr_pages(&self) -> u64 {
        self.size.div_ceil(4096)
    }
}
