//! The page cache: files' pages (created zero-filled on demand), `pread` / `pwrite` through the cache,
//! `truncate` and `fallocate(PUNCH_HOLE)` removing pages (unmapping them from every process first, and
//! waiting for short-term pins on DAX pages).
//!
//! Linux counterpart: mm/filemap.c (`filemap_get_folio`, `filemap_read`, `generic_perform_write`) and
//! mm/truncate.c (`truncate_inode_pages_range`, `unmap_mapping_range`).

use peerdma_core::{Errno, PAGE_SIZE, Pid, Range, Va};

use crate::kernel::Kernel;
use crate::mmu_notifier::NotifierEvent;
use crate::oracle::LogicalPage;
use crate::phys::MemoryKind;
use crate::vma::VmaBacking;

impl Kernel {
    /// Creates an in-memory file of `size` bytes and returns its id.
    pub fn create_file(&self, name: &str, size: u64, shmem: bool) -> u32 {
        self.files().create(name, size, shmem)
    }

    /// Creates a DAX file of `size` bytes on a persistent-memory region of its own (MEMORY_DEVICE_FS_DAX): its
    /// blocks are frames with struct pages that mappings reach directly, with no page cache in between.
    pub fn create_dax_file(&self, name: &str, size: u64) -> u32 {
        let id = self.create_file(name, size, false);
        let mut phys = self.phys();
        let r = phys.add_region(
            MemoryKind::FsDax { file: id },
            size.div_ceil(PAGE_SIZE).max(1),
        );
        self.files().set_dax_region(id, r);
        id
    }

    /// `truncate(2)` to `size`: every mapping of the pages past the new end is zapped (inside a CLEAR
    /// invalidation, so mirrors drop them), then — for DAX — the call waits until no pin holds those blocks
    /// (`dax_layout_busy_page`) before they are freed for reuse.
    pub async fn truncate(&self, file: u32, size: u64) -> Result<(), Errno> {
        self.spend(self.costs.syscall).await;
        let first = size.div_ceil(PAGE_SIZE);
        let last = self.files().file(file).nr_pages();
        self.remove_file_pages(file, first, last.max(first)).await;
        self.files().set_size(file, size);
        Ok(())
    }

    /// `fallocate(FALLOC_FL_PUNCH_HOLE)` over `[offset, offset + len)`: like truncate for the whole pages inside.
    ///
    /// # Errors
    /// `EINVAL` for a range that overflows.
    pub async fn punch_hole(&self, file: u32, offset: u64, len: u64) -> Result<(), Errno> {
        self.spend(self.costs.syscall).await;
        let end = offset.checked_add(len).ok_or(Errno::EINVAL)?;
        self.remove_file_pages(file, offset.div_ceil(PAGE_SIZE), end / PAGE_SIZE)
            .await;
        Ok(())
    }

    /// Zaps every mapping of `file`'s pages `[first, last)` in every address space (`unmap_mapping_range`,
    /// COWed private copies included), waits for pins on DAX blocks to drop, then frees the pages.
    pub(crate) async fn remove_file_pages(&self, file: u32, first: u64, last: u64) {
        if first >= last {
            return;
        }
        // The i_mmap walk: every VMA of every process that maps this file range.
        let targets: Vec<(Pid, Range<Va>)> = {
            let st = self.mms();
            st.live()
                .flat_map(|mm| mm.vmas().values().map(move |v| (mm.pid(), v)))
                .filter_map(|(pid, v)| {
                    let VmaBacking::File { file: f, pgoff } = v.backing else {
                        return None;
                    };
                    if f != file {
                        return None;
                    }
                    let vpages = v.range.len() / PAGE_SIZE;
                    let lo = first.max(pgoff);
                    let hi = last.min(pgoff + vpages);
                    (lo < hi).then(|| {
                        let start = v.range.start.add((lo - pgoff) * PAGE_SIZE);
                        (pid, Range::new(start, start.add((hi - lo) * PAGE_SIZE)))
                    })
                })
                .collect()
        };
        for (pid, r) in targets {
            self.zap_notify(pid, r, NotifierEvent::Clear).await;
        }
        let frames = self.files().file(file).cached_pages(first, last);
        let dax = self.files().file(file).dax_region().is_some();
        if dax {
            // Only the file's own reference may remain before the blocks are reused.
            self.pin_wq()
                .wait_event(|| {
                    frames
                        .iter()
                        .all(|(_, f)| self.phys().frame(*f).refcount <= 1)
                })
                .await;
        }
        let mut phys = self.phys();
        let mut oracle = self.oracle();
        let mut files = self.files();
        for (pgoff, f) in frames {
            files.remove_page(file, pgoff);
            phys.put(f);
            oracle.record(LogicalPage::File { file, pgoff }, crate::phys::ZERO_HASH);
        }
    }

    /// Writes `data` into `file` at `offset` through the page cache (`pwrite`). Writes past EOF extend it.
    pub async fn pwrite(&self, file: u32, offset: u64, data: &[u8]) -> Result<(), Errno> {
        let mut copy = |pos: usize, chunk: &mut [u8]| {
            chunk.copy_from_slice(&data[pos..pos + chunk.len()]);
        };
        self.pwrite_with(file, offset, data.len(), &mut copy).await
    }

    /// [`Kernel::pwrite`] of `len` bytes that `fill` produces a page at a time: `fill(pos, chunk)` writes
    /// the bytes at positions `pos..pos + chunk.len()` of the write into `chunk` (zeroed first). The same
    /// write, time and errors, holding at most one page of host memory.
    ///
    /// # Errors
    /// As [`Kernel::pwrite`].
    pub async fn pwrite_with(
        &self,
        file: u32,
        offset: u64,
        len: usize,
        fill: &mut dyn FnMut(usize, &mut [u8]),
    ) -> Result<(), Errno> {
        self.spend(self.costs.syscall).await;
        let end = offset.checked_add(len as u64).ok_or(Errno::EINVAL)?;
        let mut chunk = [0u8; 4096];
        {
            let mut phys = self.phys();
            let mut oracle = self.oracle();
            let mut files = self.files();
            files.extend_to(file, end);
            let mut pos = 0usize;
            while pos < len {
                let off = offset + pos as u64;
                let (pgoff, in_page) = (
                    off / PAGE_SIZE,
                    usize::try_from(off % PAGE_SIZE).expect("< 4096"),
                );
                let n = (4096 - in_page).min(len - pos);
                let frame = files.page(&mut phys, file, pgoff).ok_or(Errno::ENOSPC)?;
                chunk[..n].fill(0);
                fill(pos, &mut chunk[..n]);
                phys.write(frame, in_page, &chunk[..n]);
                let h = phys.content_hash(frame);
                oracle.record(LogicalPage::File { file, pgoff }, h);
                pos += n;
            }
        }
        self.spend(
            self.costs
                .page_access
                .saturating_mul(len.div_ceil(4096) as u64),
        )
        .await;
        Ok(())
    }

    /// Reads `buf.len()` bytes of `file` at `offset` (`pread`); bytes past EOF read as zero here, and the
    /// count actually inside the file is returned.
    pub async fn pread(&self, file: u32, offset: u64, buf: &mut [u8]) -> Result<usize, Errno> {
        self.spend(self.costs.syscall).await;
        let n = {
            let mut phys = self.phys();
            let mut files = self.files();
            let size = files.file(file).size();
            let n = usize::try_from(size.saturating_sub(offset).min(buf.len() as u64))
                .expect("fits buffer");
            buf.fill(0);
            let mut pos = 0usize;
            while pos < n {
                let off = offset + pos as u64;
                let (pgoff, in_page) = (
                    off / PAGE_SIZE,
                    usize::try_from(off % PAGE_SIZE).expect("< 4096"),
                );
                let k = (4096 - in_page).min(n - pos);
                let frame = files.page(&mut phys, file, pgoff).ok_or(Errno::ENOMEM)?;
                phys.read(frame, in_page, &mut buf[pos..pos + k]);
                pos += k;
            }
            n
        };
        self.spend(
            self.costs
                .page_access
                .saturating_mul(n.div_ceil(4096) as u64),
        )
        .await;
        Ok(n)
    }
}
