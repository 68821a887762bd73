//! Unit tests of the page table and its cursors.

use super::*;

fn present(f: u64) -> Pte {
    Pte::Present {
        frame: FrameId(f),
        write: true,
        special: false,
    }
}

#[test]
fn set_and_lookup_a_4k_entry() {
    let mut pt = PageTable::new();
    let va = Va::from_raw(0x7f12_3456_7000);
    assert!(pt.lookup(va).is_none());
    pt.set_pte(va, present(42));
    let leaf = pt.lookup(va.add(0x123)).unwrap();
    assert_eq!(leaf.pte, present(42));
    assert_eq!(leaf.size, PageSize::Size4K);
    assert_eq!(leaf.base, va);
    assert_eq!(pt.nr_tables(), 4);
}

#[test]
fn pmd_leaf_covers_2m_and_reports_sub_frames() {
    let mut pt = PageTable::new();
    let base = Va::from_raw(0x4000_0000);
    pt.set_pmd(base, present(512));
    let leaf = pt.lookup(base.add(0x3000)).unwrap();
    assert_eq!(leaf.size, PageSize::Size2M);
    assert_eq!(leaf.frame_at(base.add(0x3000)), Some(FrameId(515)));
    assert!(pt.lookup(base.add(0x20_0000)).is_none());
}

#[test]
fn split_pmd_keeps_every_translation() {
    let mut pt = PageTable::new();
    let base = Va::from_raw(0x4000_0000);
    pt.set_pmd(
        base,
        Pte::Present {
            frame: FrameId(1024),
            write: false,
            special: false,
        },
    );
    pt.split_pmd(base.add(0x5000));
    for i in [0u64, 5, 511] {
        let leaf = pt.lookup(base.add(i * 4096)).unwrap();
        assert_eq!(leaf.size, PageSize::Size4K);
        assert_eq!(
            leaf.pte,
            Pte::Present {
                frame: FrameId(1024 + i),
                write: false,
                special: false
            }
        );
    }
}

#[test]
fn clearing_the_last_entry_frees_the_tables() {
    let mut pt = PageTable::new();
    let va = Va::from_raw(0x1000);
    pt.set_pte(va, present(1));
    pt.set_pte(va.add(0x1000), present(2));
    assert_eq!(pt.clear(va).unwrap().pte, present(1));
    assert_eq!(pt.nr_tables(), 4);
    pt.clear(va.add(0x1000));
    assert_eq!(pt.nr_tables(), 1);
    assert!(
        pt.leaves(Va::from_raw(0), Va::from_raw(u64::MAX))
            .is_empty()
    );
}

#[test]
fn leaves_lists_mappings_in_order_within_bounds() {
    let mut pt = PageTable::new();
    for (i, a) in [0x5000u64, 0x1000, 0x20_0000_0000].iter().enumerate() {
        pt.set_pte(Va::from_raw(*a), present(i as u64));
    }
    let found: Vec<u64> = pt
        .leaves(Va::from_raw(0x1000), Va::from_raw(0x6000))
        .iter()
        .map(|l| l.base.raw())
        .collect();
    assert_eq!(found, vec![0x1000, 0x5000]);
}

/// The reference walk the cursor is checked against: every leaf overlapping `[start, end)`, by recursion.
fn collect(table: &Table, level: u32, base: u64, start: u64, end: u64, out: &mut Vec<Leaf>) {
    if table.used == 0 {
        return;
    }
    let span = 1u64 << (PAGE_SHIFT + LEVEL_BITS * (level - 1));
    for (i, e) in table.entries.iter().enumerate() {
        let lo = base + i as u64 * span;
        let hi = lo.saturating_add(span);
        if hi <= start || lo >= end {
            continue;
        }
        match e {
            Entry::Empty => {}
            Entry::Table(t) => collect(t, level - 1, lo, start, end, out),
            Entry::Leaf(pte) => out.push(Leaf {
                pte: *pte,
                size: leaf_size(level),
                base: Va::from_raw(lo),
            }),
        }
    }
}

fn reference_leaves(pt: &PageTable, r: Range<Va>) -> Vec<Leaf> {
    let mut out = Vec::new();
    collect(&pt.root, 4, 0, r.start.raw(), r.end.raw(), &mut out);
    out
}

/// A table with 4 KiB leaves on both sides of a PMD leaf, in two different PGD slots.
fn mixed() -> (PageTable, Va) {
    let mut pt = PageTable::new();
    let pmd = Va::from_raw(0x4000_0000);
    pt.set_pte(Va::from_raw(0x3fff_e000), present(1));
    pt.set_pmd(pmd, present(512));
    pt.set_pte(pmd.add(0x20_0000), present(2));
    pt.set_pte(Va::from_raw(0x7f00_0000_0000), present(3));
    (pt, pmd)
}

fn range(start: u64, end: u64) -> Range<Va> {
    Range::new(Va::from_raw(start), Va::from_raw(end))
}

#[test]
fn the_cursor_finds_every_leaf_a_full_recursive_walk_finds() {
    let (pt, pmd) = mixed();
    for r in [
        range(0, u64::MAX >> 16),
        range(0x3fff_f000, 0x4000_1000),
        range(pmd.raw() + 0x1000, pmd.raw() + 0x20_1000),
        range(0x5000_0000, 0x7f00_0000_1000),
        range(0x1000, 0x2000),
    ] {
        let listed = reference_leaves(&pt, r);
        assert_eq!(pt.cursor(r).collect::<Vec<_>>(), listed, "{r}");
        assert_eq!(pt.leaves(r.start, r.end), listed, "{r}");
        let mut copy = pt.clone();
        let mut c = copy.cursor_mut(r);
        let mut found = Vec::new();
        while let Some(l) = c.find_next() {
            found.push(l);
        }
        assert_eq!(found, listed, "{r}");
    }
}

#[test]
fn unmap_splits_a_pmd_leaf_sticking_out_and_removes_only_the_range() {
    let (mut pt, pmd) = mixed();
    let r = range(pmd.raw() + 0x1f_e000, pmd.raw() + 0x20_1000);
    let mut c = pt.cursor_mut(r);
    let mut removed = Vec::new();
    while c.find_next().is_some() {
        removed.extend(c.unmap());
    }
    let bases: Vec<u64> = removed.iter().map(|l| l.base.raw()).collect();
    assert_eq!(
        bases,
        [
            pmd.raw() + 0x1f_e000,
            pmd.raw() + 0x1f_f000,
            pmd.raw() + 0x20_0000
        ]
    );
    assert!(removed.iter().all(|l| l.size == PageSize::Size4K));
    assert_eq!(removed[0].pte, present(512 + 510));
    assert_eq!(
        pt.lookup(pmd.add(0x1f_d000)).unwrap().pte,
        present(512 + 509)
    );
    assert_eq!(pt.leaves(r.start, r.end), []);
}

#[test]
fn protect_rewrites_a_whole_leaf_or_the_part_inside_the_range() {
    let (mut pt, pmd) = mixed();
    let ro = |p: Pte| p.with_write(false);
    let mut c = pt.cursor_mut(range(pmd.raw(), pmd.raw() + 0x20_0000));
    while c.find_next().is_some() {
        c.protect(ro);
    }
    let leaf = pt.lookup(pmd).unwrap();
    assert_eq!((leaf.size, leaf.pte), (PageSize::Size2M, ro(present(512))));
    // Now a range that cuts the PMD leaf: it is split, the part outside keeps its entry.
    pt.set_pmd(pmd, present(512));
    let mut c = pt.cursor_mut(range(pmd.raw() + 0x1000, pmd.raw() + 0x3000));
    while c.find_next().is_some() {
        c.protect(ro);
    }
    assert_eq!(pt.lookup(pmd).unwrap().pte, present(512));
    assert_eq!(pt.lookup(pmd.add(0x1000)).unwrap().pte, ro(present(513)));
    assert_eq!(pt.lookup(pmd.add(0x2000)).unwrap().pte, ro(present(514)));
    assert_eq!(pt.lookup(pmd.add(0x3000)).unwrap().pte, present(515));
}
