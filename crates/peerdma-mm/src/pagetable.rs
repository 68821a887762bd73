//! A 4-level x86-64 style page table with 4 KiB (PTE) and 2 MiB (PMD) leaves.
//!
//! Linux counterpart: the pgd/p4d→pud→pmd→pte hierarchy walked by `walk_page_range` and changed by the fault,
//! zap and protection paths. Levels are indexed by 9 bits each of the virtual page number; a level-2 entry is
//! either a leaf mapping 2 MiB or a pointer to a PTE table. Tables are allocated on demand and freed when empty.
//!
//! Entries hold [`Pte`] values: present mappings of frames, present raw-PFN mappings of MMIO without struct
//! page (`remap_pfn_range`), and the non-present kinds the kernel stores in a PTE (swap, migration,
//! device-private, device-exclusive). The table itself only stores and finds entries;
//! reference counting of the frames is the caller's (the fault and zap paths in `mm`).
//!
//! **Range walks go through a cursor** (the shape of Asterinas OSTD's `page_table::cursor`): a
//! [`CursorMut`] over a range, from [`PageTable::cursor_mut`], steps from leaf to leaf with
//! [`CursorMut::find_next`] and changes the leaf it stands on — [`CursorMut::unmap`] removes it,
//! [`CursorMut::protect`] rewrites its entry, [`CursorMut::set`] replaces it, [`CursorMut::split`] breaks a
//! 2 MiB leaf into base pages for the walk to visit — splitting a 2 MiB leaf that sticks out of the range first, so
//! an operation never touches a byte outside its range. [`Cursor`] (from [`PageTable::cursor`]) is the
//! read-only walk, and [`PageTable::leaves`] collects one, so every range walk in the crate (zap,
//! mprotect, fork's copy, mremap's move, khugepaged, P2P removal) goes through the one walker. Changing
//! walks: zap (`crate::memory`) and mprotect (`crate::mprotect`).
//!
//! **The table keeps a reverse index** of the frames its leaves name ([`rmap_index`]): the two places a leaf
//! changes (installing an entry, clearing one) update it, so [`crate::rmap`] finds a frame's mappings with
//! a lookup per address space instead of walking every leaf.

use peerdma_core::{FrameId, PAGE_SHIFT, PageSize, Range, Va};

use rmap_index::PtRmap;

pub(crate) mod rmap_index;

const LEVEL_BITS: u32 = 9;
const ENTRIES: usize = 1 << LEVEL_BITS;
const INDEX_MASK: u64 = (1 << LEVEL_BITS) - 1;

/// One page-table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pte {
    /// A present mapping of a frame (for a PMD leaf: the first of 512 frames).
    Present {
        /// The mapped frame.
        frame: FrameId,
        /// Writable by the CPU.
        write: bool,
        /// A raw PFN with no `struct page` semantics (VM_PFNMAP / `vm_normal_page` is NULL).
        special: bool,
    },
    /// A device-private entry (a non-present swap-type entry naming device memory).
    DevicePrivate {
        /// The device-private frame.
        frame: FrameId,
        /// Writable.
        write: bool,
    },
    /// A device-exclusive entry (restored on CPU access).
    DeviceExclusive {
        /// The frame.
        frame: FrameId,
        /// Writable once restored.
        write: bool,
    },
    /// A migration entry: the page is being migrated; accessors wait.
    Migration {
        /// The source frame.
        frame: FrameId,
        /// Writable when restored.
        write: bool,
    },
    /// A swap entry.
    Swap {
        /// Slot on the swap device.
        slot: u64,
        /// Writable when swapped back in (anon-exclusive).
        write: bool,
    },
    /// A present mapping of a raw page frame number with no `struct page` (`remap_pfn_range` into a
    /// VM_PFNMAP VMA; `pte_special`, `vm_normal_page` is NULL). The number is a CPU physical page number
    /// (`pa >> PAGE_SHIFT`), not a [`FrameId`]: nothing here names a frame of physical memory, so nothing
    /// takes or drops a reference through it.
    Pfn {
        /// The CPU physical page number.
        pfn: u64,
        /// Writable by the CPU.
        write: bool,
    },
}

impl Pte {
    /// Returns the frame the entry names, if any.
    pub fn frame(&self) -> Option<FrameId> {
        match *self {
            Pte::Present { frame, .. }
            | Pte::DevicePrivate { frame, .. }
            | Pte::DeviceExclusive { frame, .. }
            | Pte::Migration { frame, .. } => Some(frame),
            Pte::Swap { .. } | Pte::Pfn { .. } => None,
        }
    }

    /// Returns whether the entry is a present mapping of a frame ([`Pte::Present`]; a raw [`Pte::Pfn`] entry,
    /// which names no frame, is not counted).
    pub fn is_present(&self) -> bool {
        matches!(self, Pte::Present { .. })
    }

    /// Returns whether the entry allows writes (present or not).
    pub fn is_write(&self) -> bool {
        match *self {
            Pte::Present { write, .. }
            | Pte::DevicePrivate { write, .. }
            | Pte::DeviceExclusive { write, .. }
            | Pte::Migration { write, .. }
            | Pte::Swap { write, .. }
            | Pte::Pfn { write, .. } => write,
        }
    }

    /// Returns the entry with its write permission replaced.
    pub fn with_write(self, w: bool) -> Self {
        match self {
            Pte::Present { frame, special, .. } => Pte::Present {
                frame,
                write: w,
                special,
            },
            Pte::DevicePrivate { frame, .. } => Pte::DevicePrivate { frame, write: w },
            Pte::DeviceExclusive { frame, .. } => Pte::DeviceExclusive { frame, write: w },
            Pte::Migration { frame, .. } => Pte::Migration { frame, write: w },
            Pte::Swap { slot, .. } => Pte::Swap { slot, write: w },
            Pte::Pfn { pfn, .. } => Pte::Pfn { pfn, write: w },
        }
    }
}

/// A leaf found by a walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leaf {
    /// The entry.
    pub pte: Pte,
    /// What it maps.
    pub size: PageSize,
    /// Virtual address of the first byte the leaf maps.
    pub base: Va,
}

impl Leaf {
    /// Returns the frame backing `va` inside this leaf (sub-frame of a PMD leaf).
    pub fn frame_at(&self, va: Va) -> Option<FrameId> {
        let f = self.pte.frame()?;
        Some(FrameId(f.0 + (va.raw() - self.base.raw()) / 4096))
    }
}

#[derive(Clone, Debug, Default)]
enum Entry {
    #[default]
    Empty,
    Table(Box<Table>),
    Leaf(Pte),
}

#[derive(Clone, Debug)]
struct Table {
    entries: Vec<Entry>,
    used: usize,
}

impl Table {
    fn new() -> Self {
        Self {
            entries: vec![Entry::Empty; ENTRIES],
            used: 0,
        }
    }
}

/// The page table of one address space.
#[derive(Clone, Debug)]
pub struct PageTable {
    root: Table,
    nr_tables: usize,
    /// The reverse index of the frames the leaves name ([`crate::rmap`]), kept by `set_at` and `clear`.
    rmap: PtRmap,
}

impl Default for PageTable {
    fn default() -> Self {
        Self::new()
    }
}

fn index(va: Va, level: u32) -> usize {
    // level 4 = PGD … level 1 = PTE table.
    let shift = PAGE_SHIFT + LEVEL_BITS * (level - 1);
    usize::try_from((va.raw() >> shift) & INDEX_MASK).expect("9-bit index fits usize")
}

impl PageTable {
    /// Creates an empty page table.
    pub fn new() -> Self {
        Self {
            root: Table::new(),
            nr_tables: 1,
            rmap: PtRmap::default(),
        }
    }

    /// Returns the reverse index of the frames this table maps.
    pub(crate) fn rmap(&self) -> &PtRmap {
        &self.rmap
    }

    /// Returns the number of page-table pages (PGD included), the `mm->pgtables_bytes` / 4 KiB figure.
    pub fn nr_tables(&self) -> usize {
        self.nr_tables
    }

    /// Walks to the leaf that maps `va`, if any.
    pub fn lookup(&self, va: Va) -> Option<Leaf> {
        let mut table = &self.root;
        for level in (1..=4).rev() {
            match &table.entries[index(va, level)] {
                Entry::Empty => return None,
                Entry::Table(t) => table = t,
                Entry::Leaf(pte) => {
                    let size = match level {
                        1 => PageSize::Size4K,
                        2 => PageSize::Size2M,
                        _ => PageSize::Size1G,
                    };
                    return Some(Leaf {
                        pte: *pte,
                        size,
                        base: va.align_down(size.bytes()),
                    });
                }
            }
        }
        None
    }

    /// Installs a 4 KiB entry for `va`, allocating tables on the way. Returns the entry it replaced.
    ///
    /// # Panics
    /// Panics if a 2 MiB leaf covers `va`: the caller must split it first ([`PageTable::split_pmd`]).
    pub fn set_pte(&mut self, va: Va, pte: Pte) -> Option<Pte> {
        self.set_at(va, 1, pte)
    }

    /// Installs `pte` as a leaf of `size` at `va` (a PTE or a PMD leaf); returns the entry it replaced.
    ///
    /// # Panics
    /// As [`PageTable::set_pte`] / [`PageTable::set_pmd`]; 1 GiB leaves are not modelled.
    pub fn set_leaf(&mut self, va: Va, size: PageSize, pte: Pte) -> Option<Pte> {
        match size {
            PageSize::Size4K => self.set_pte(va, pte),
            PageSize::Size2M => self.set_pmd(va, pte),
            PageSize::Size1G => panic!("1 GiB leaves are not modelled"),
        }
    }

    /// Installs a 2 MiB leaf for the 2 MiB-aligned `va`.
    ///
    /// # Panics
    /// Panics if `va` is not 2 MiB aligned or if any 4 KiB entry exists under it.
    pub fn set_pmd(&mut self, va: Va, pte: Pte) -> Option<Pte> {
        assert!(
            va.is_aligned(PageSize::Size2M.bytes()),
            "unaligned PMD leaf"
        );
        self.set_at(va, 2, pte)
    }

    fn set_at(&mut self, va: Va, leaf_level: u32, pte: Pte) -> Option<Pte> {
        let mut nr_new = 0;
        let mut table = &mut self.root;
        for level in ((leaf_level + 1)..=4).rev() {
            let i = index(va, level);
            if matches!(table.entries[i], Entry::Empty) {
                table.entries[i] = Entry::Table(Box::new(Table::new()));
                table.used += 1;
                nr_new += 1;
            }
            table = match &mut table.entries[i] {
                Entry::Table(t) => t,
                Entry::Leaf(_) => panic!("a larger leaf covers {va}"),
                Entry::Empty => unreachable!("filled above"),
            };
        }
        let i = index(va, leaf_level);
        let old = std::mem::replace(&mut table.entries[i], Entry::Leaf(pte));
        let prev = match old {
            Entry::Empty => {
                table.used += 1;
                None
            }
            Entry::Leaf(p) => Some(p),
            Entry::Table(t) => {
                assert!(t.used == 0, "PMD leaf over a populated PTE table at {va}");
                table.used += 0;
                nr_new -= 1;
                None
            }
        };
        self.nr_tables = self.nr_tables.saturating_add_signed(nr_new);
        let size = leaf_size(leaf_level);
        let base = va.align_down(size.bytes());
        if let Some(p) = prev {
            self.rmap.remove(p, base, size);
        }
        self.rmap.add(pte, base, size);
        prev
    }

    /// Replaces the 2 MiB leaf covering `va` by 512 PTEs mapping the same frames with the same permissions
    /// (`__split_huge_pmd`). Does nothing if no PMD leaf covers `va`.
    pub fn split_pmd(&mut self, va: Va) {
        let Some(leaf) = self.lookup(va) else { return };
        if leaf.size != PageSize::Size2M {
            return;
        }
        self.clear(leaf.base);
        for i in 0..512u64 {
            let sub = match leaf.pte {
                Pte::Present {
                    frame,
                    write,
                    special,
                } => Pte::Present {
                    frame: FrameId(frame.0 + i),
                    write,
                    special,
                },
                Pte::DevicePrivate { frame, write } => Pte::DevicePrivate {
                    frame: FrameId(frame.0 + i),
                    write,
                },
                Pte::DeviceExclusive { frame, write } => Pte::DeviceExclusive {
                    frame: FrameId(frame.0 + i),
                    write,
                },
                Pte::Migration { frame, write } => Pte::Migration {
                    frame: FrameId(frame.0 + i),
                    write,
                },
                Pte::Swap { slot, write } => Pte::Swap {
                    slot: slot + i,
                    write,
                },
                Pte::Pfn { pfn, write } => Pte::Pfn {
                    pfn: pfn + i,
                    write,
                },
            };
            self.set_pte(leaf.base.add(i * 4096), sub);
        }
    }

    /// Removes the leaf covering `va` and returns it; frees tables left empty.
    pub fn clear(&mut self, va: Va) -> Option<Leaf> {
        let leaf = self.lookup(va)?;
        let level = match leaf.size {
            PageSize::Size4K => 1,
            PageSize::Size2M => 2,
            PageSize::Size1G => 3,
        };
        let freed = Self::clear_in(&mut self.root, va, 4, level);
        self.nr_tables -= freed;
        self.rmap.remove(leaf.pte, leaf.base, leaf.size);
        Some(leaf)
    }

    /// Clears the entry at `level` under `table`; returns how many tables became empty and were freed.
    fn clear_in(table: &mut Table, va: Va, level: u32, leaf_level: u32) -> usize {
        let i = index(va, level);
        if level == leaf_level {
            if matches!(table.entries[i], Entry::Leaf(_)) {
                table.entries[i] = Entry::Empty;
                table.used -= 1;
            }
            return 0;
        }
        let Entry::Table(child) = &mut table.entries[i] else {
            return 0;
        };
        let mut freed = Self::clear_in(child, va, level - 1, leaf_level);
        if child.used == 0 {
            table.entries[i] = Entry::Empty;
            table.used -= 1;
            freed += 1;
        }
        freed
    }

    /// Returns a read-only cursor over the leaves that map some address in `range`, in address order.
    pub fn cursor(&self, range: Range<Va>) -> Cursor<'_> {
        Cursor {
            pt: self,
            va: range.start.raw(),
            end: range.end.raw(),
        }
    }

    /// Returns a cursor over `range` that can change the leaves it finds (module docs).
    pub fn cursor_mut(&mut self, range: Range<Va>) -> CursorMut<'_> {
        CursorMut {
            pt: self,
            range,
            va: range.start.raw(),
            cur: None,
        }
    }

    /// Returns the first leaf (in address order) that maps some address in `[start, end)`. The scan of each
    /// table starts at the entry covering `start`, so a cursor step costs the depth of the table plus the
    /// empty entries it skips.
    fn first_leaf(table: &Table, level: u32, base: u64, start: u64, end: u64) -> Option<Leaf> {
        if table.used == 0 {
            return None;
        }
        let span = 1u64 << (PAGE_SHIFT + LEVEL_BITS * (level - 1));
        let first = usize::try_from(start.saturating_sub(base) / span).unwrap_or(ENTRIES);
        for (i, e) in table.entries.iter().enumerate().skip(first) {
            let lo = base + i as u64 * span;
            let hi = lo.saturating_add(span);
            if hi <= start || lo >= end {
                continue;
            }
            match e {
                Entry::Empty => {}
                Entry::Table(t) => {
                    if let Some(l) = Self::first_leaf(t, level - 1, lo, start, end) {
                        return Some(l);
                    }
                }
                Entry::Leaf(pte) => {
                    return Some(Leaf {
                        pte: *pte,
                        size: leaf_size(level),
                        base: Va::from_raw(lo),
                    });
                }
            }
        }
        None
    }

    /// Returns every leaf that maps some address in `[start, end)`, in address order: the walk of a read-only
    /// [`Cursor`], collected.
    pub fn leaves(&self, start: Va, end: Va) -> Vec<Leaf> {
        Cursor {
            pt: self,
            va: start.raw(),
            end: end.raw(),
        }
        .collect()
    }
}

/// The size a leaf at `level` maps.
fn leaf_size(level: u32) -> PageSize {
    match level {
        1 => PageSize::Size4K,
        2 => PageSize::Size2M,
        _ => PageSize::Size1G,
    }
}

/// A read-only walk over the leaves that map some address of a range, in address order (an iterator).
#[derive(Debug)]
pub struct Cursor<'a> {
    pt: &'a PageTable,
    /// The first address not yet walked past.
    va: u64,
    end: u64,
}

impl Iterator for Cursor<'_> {
    type Item = Leaf;

    fn next(&mut self) -> Option<Leaf> {
        if self.va >= self.end {
            return None;
        }
        let leaf = PageTable::first_leaf(&self.pt.root, 4, 0, self.va, self.end)?;
        self.va = leaf.base.raw().saturating_add(leaf.size.bytes());
        Some(leaf)
    }
}

/// A walk over the leaves of a range that may change them (module docs). The cursor stands on the leaf the
/// last [`CursorMut::find_next`] returned; [`CursorMut::unmap`] and [`CursorMut::protect`] act on it,
/// limited to the range, and the next `find_next` continues after it.
#[derive(Debug)]
pub struct CursorMut<'a> {
    pt: &'a mut PageTable,
    range: Range<Va>,
    /// The first address not yet walked past.
    va: u64,
    /// The leaf found last, as it was found.
    cur: Option<Leaf>,
}

impl CursorMut<'_> {
    /// Moves to the next leaf (in address order) that maps some address of the range and returns it; `None`
    /// when there is none left.
    pub fn find_next(&mut self) -> Option<Leaf> {
        let end = self.range.end.raw();
        self.cur = if self.va < end {
            PageTable::first_leaf(&self.pt.root, 4, 0, self.va, end)
        } else {
            None
        };
        if let Some(leaf) = self.cur {
            self.va = leaf.base.raw().saturating_add(leaf.size.bytes());
        }
        self.cur
    }

    /// The leaf the cursor stands on and the part of it inside the range (`None` when it lies wholly
    /// inside).
    fn current(&self) -> (Leaf, Option<Range<Va>>) {
        let leaf = self.cur.expect("find_next found a leaf");
        let leaf_range =
            Range::from_len(leaf.base, leaf.size.bytes()).expect("leaf inside user space");
        let part = (!self.range.contains_range(&leaf_range))
            .then(|| leaf_range.intersection(&self.range).expect("leaf overlaps"));
        (leaf, part)
    }

    /// Removes the mappings of the current leaf that lie inside the range and returns the removed leaves in
    /// address order: the leaf itself when it lies wholly inside, else (a 2 MiB leaf sticking out) the leaf is
    /// split and the 4 KiB entries inside the range are removed.
    ///
    /// # Panics
    /// Panics when the last `find_next` found nothing.
    pub fn unmap(&mut self) -> Vec<Leaf> {
        let (leaf, part) = self.current();
        let Some(part) = part else {
            return vec![self.pt.clear(leaf.base).expect("leaf found by find_next")];
        };
        self.pt.split_pmd(leaf.base);
        part.pages()
            .filter_map(|page| self.pt.clear(page))
            .collect()
    }

    /// Replaces the entry of the current leaf (same size, same place) with `pte`: a migration entry for the
    /// page it found, for instance.
    ///
    /// # Panics
    /// Panics when the last `find_next` found nothing.
    pub fn set(&mut self, pte: Pte) {
        let leaf = self.cur.expect("find_next found a leaf");
        self.pt.set_leaf(leaf.base, leaf.size, pte);
        self.cur = Some(Leaf { pte, ..leaf });
    }

    /// Splits the current 2 MiB leaf into 512 4 KiB entries and steps back so that the next `find_next`
    /// returns the first of them inside the range (`split_huge_pmd` in a walk that handles base pages only).
    ///
    /// # Panics
    /// Panics when the last `find_next` found nothing.
    pub fn split(&mut self) {
        let leaf = self.cur.expect("find_next found a leaf");
        if leaf.size == PageSize::Size2M {
            self.pt.split_pmd(leaf.base);
            self.va = leaf.base.raw().max(self.range.start.raw());
            self.cur = None;
        }
    }

    /// Rewrites the entries of the current leaf that lie inside the range with `op`: the leaf's entry when it
    /// lies wholly inside, else (a 2 MiB leaf sticking out) the leaf is split and each 4 KiB entry inside the
    /// range is rewritten.
    ///
    /// # Panics
    /// Panics when the last `find_next` found nothing.
    pub fn protect(&mut self, op: impl Fn(Pte) -> Pte) {
        let (leaf, part) = self.current();
        let Some(part) = part else {
            self.pt.set_leaf(leaf.base, leaf.size, op(leaf.pte));
            return;
        };
        self.pt.split_pmd(leaf.base);
        for page in part.pages() {
            if let Some(l) = self.pt.lookup(page) {
                self.pt.set_pte(page, op(l.pte));
            }
        }
    }
}

#[cfg(test)]
mod tests;
