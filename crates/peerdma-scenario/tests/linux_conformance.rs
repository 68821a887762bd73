//! The differences found by running Linux's own selftests and small C programs on a 6.18 kernel next to the
//! same steps in a scenario (issue 10), one test per numbered difference, each named after the kernel
//! rule, plus the scenario-language features those tests need. Each scenario states what Linux does; the
//! kernel file where the rule lives is named above each test.
#![expect(
    clippy::tests_outside_test_module,
    reason = "an integration-test crate is all tests"
)]

use peerdma_scenario::{Outcome, Report, RunOptions, parse, run};

/// A dmirror device of the private flavour, then `steps` in the `main` process's thread `t`.
fn with_dmirror(steps: &str) -> String {
    format!(
        "[sim]\ntime = \"zero\"\n\n[[device]]\nname = \"dmirror0\"\nkind = \"dmirror\"\n\n\
         [[thread]]\nname = \"t\"\nsteps = [\n{steps}\n]\n"
    )
}

/// Runs `text` and asserts that every expectation held and the oracle found nothing.
fn passes(name: &str, text: &str) -> Report {
    let scn = parse(name, text).unwrap_or_else(|e| panic!("{}", e.render()));
    let report = run(&scn, &RunOptions::default());
    assert_eq!(report.outcome, Outcome::Passed, "{}", report.render_text());
    report
}

// ----- scenario-language features -----

/// `expect.counters` checks how much a counter grew during the step: the child's first store to a page
/// shared after fork copies it once.
#[test]
fn expect_counters_checks_each_counters_growth_over_the_step() {
    passes(
        "counters.toml",
        r#"
[sim]
time = "zero"

[[thread]]
name = "t"
steps = [
  { op = "mmap", name = "buf", len = "4KiB", prot = "rw", flags = ["private", "anonymous"] },
  { op = "store", at = "buf", pattern = "byte:0x11", expect = { counters = { "cpu.faults" = 1, "cpu.cow_copy" = 0 } } },
  { op = "fork", child = "kid" },
  { op = "wait", child = "kid" },
]

[[thread]]
name = "k"
process = "kid"
steps = [
  { op = "store", at = "buf", pattern = "byte:0x22", expect = { counters = { "cpu.cow_copy" = 1 } } },
  { op = "store", at = "buf", pattern = "byte:0x33", expect = { counters = { "cpu.cow_copy" = 0, "cpu.faults" = 0 } } },
]
"#,
    );
    let text = with_dmirror(
        r#"  { op = "mmap", name = "buf", len = "4KiB", prot = "rw", flags = ["private", "anonymous"] },
  { op = "store", at = "buf", pattern = "zero", expect = { counters = { "cpu.faults" = 2 } } },"#,
    );
    let scn = parse("counters_fail.toml", &text).unwrap();
    let report = run(&scn, &RunOptions::default());
    assert_eq!(report.outcome, Outcome::ExpectationFailed);
    assert!(
        report.failures[0]
            .message
            .contains("expected counter `cpu.faults` to grow by 2, it grew by 1"),
        "{}",
        report.render_text()
    );
}

/// `expect.events` lists the notifier events a mirror acted on during the step; `[]` expects none.
#[test]
fn expect_events_lists_what_the_mirror_saw() {
    passes(
        "events.toml",
        &with_dmirror(
            r#"  { op = "open", dev = "dmirror0", fd = "m" },
  { op = "mmap", name = "buf", len = "4 pages", prot = "rw", flags = ["private", "anonymous"] },
  { op = "store", at = "buf", pattern = "u32:index", expect = { events = { m = [] } } },
  { op = "dmirror.read", fd = "m", at = "buf", pages = 4, expect = { cpages = 4, events = { m = [] } } },
  { op = "mprotect", at = "buf", len = "4 pages", prot = "r", expect = { events = { m = ["protection_vma"] } } },
  { op = "munmap", at = "buf", len = "4 pages", expect = { events = { m = ["unmap"] } } },"#,
        ),
    );
}

/// `data = { one_of = [...] }` accepts any of several outcomes (racing steps).
#[test]
fn expect_data_one_of_accepts_any_listed_pattern() {
    passes(
        "one_of.toml",
        &with_dmirror(
            r#"  { op = "mmap", name = "buf", len = "4KiB", prot = "rw", flags = ["private", "anonymous"] },
  { op = "store", at = "buf", pattern = "byte:0x22" },
  { op = "load", at = "buf", expect = { data = { one_of = ["byte:0x11", "byte:0x22"] } } },"#,
        ),
    );
    let text = with_dmirror(
        r#"  { op = "mmap", name = "buf", len = "4KiB", prot = "rw", flags = ["private", "anonymous"] },
  { op = "load", at = "buf", expect = { data = { one_of = ["byte:0x11", "byte:0x22"] } } },"#,
    );
    let report = run(
        &parse("one_of_fail.toml", &text).unwrap(),
        &RunOptions::default(),
    );
    assert_eq!(report.outcome, Outcome::ExpectationFailed);
    assert!(report.failures[0].message.contains("data matches none of"));
}

/// A plain FOLL_GET reference held across steps (what vmsplice holds) is no pin: a CPU write after fork
/// copies the page away from it, and `dma.read` through the reference sees the old page.
#[test]
fn get_references_are_held_across_steps_and_read_through() {
    passes(
        "get_ref.toml",
        r#"
[sim]
time = "zero"

[[thread]]
name = "t"
steps = [
  { op = "mmap", name = "buf", len = "4KiB", prot = "rw", flags = ["private", "anonymous"] },
  { op = "store", at = "buf", pattern = "byte:0x11" },
  { op = "pin", at = "buf", pages = 1, flags = ["get"], name = "ref" },
  { op = "fork", child = "kid" },
  { op = "wait", child = "kid" },
  { op = "store", at = "buf", pattern = "byte:0x22", expect = { counters = { "cpu.cow_copy" = 1 } } },
  { op = "dma.read", pin = "ref", expect = { data = "byte:0x11" } },
  { op = "load", at = "buf", expect = { data = "byte:0x22" } },
  { op = "unpin", pin = "ref" },
]

[[thread]]
name = "k"
process = "kid"
steps = [
  { op = "load", at = "buf", expect = { data = "byte:0x11" } },
]
"#,
    );
}

/// A child inherits the parent's open dmirror file; it still mirrors the opener's address space.
#[test]
fn an_inherited_device_file_mirrors_the_openers_address_space() {
    passes(
        "inherit_fd.toml",
        r#"
[sim]
time = "zero"

[[device]]
name = "dmirror0"
kind = "dmirror"

[[thread]]
name = "t"
steps = [
  { op = "open", dev = "dmirror0", fd = "m" },
  { op = "mmap", name = "buf", len = "4KiB", prot = "rw", flags = ["private", "anonymous"] },
  { op = "store", at = "buf", pattern = "byte:0x11" },
  { op = "fork", child = "kid" },
  { op = "wait", child = "kid" },
  { op = "load", at = "buf", expect = { data = "byte:0x33" } },
  { op = "close", fd = "m" },
]

[[thread]]
name = "k"
process = "kid"
steps = [
  { op = "store", at = "buf", pattern = "byte:0x22" },
  # The device reads and writes the parent's page, not the child's.
  { op = "dmirror.read", fd = "m", at = "buf", pages = 1, expect = { cpages = 1, data = "byte:0x11" } },
  { op = "dmirror.write", fd = "m", at = "buf", pages = 1, pattern = "byte:0x33", expect = { cpages = 1 } },
  { op = "load", at = "buf", expect = { data = "byte:0x22" } },
  { op = "close", fd = "m" },
]
"#,
    );
}

/// A mirror-mode `dma.map` programs nothing until the device faults; `dma_sg.read` / `dma_sg.write` on a
/// mirror handle report the DMA addresses programmed so far. The mirror reserved the IOVA of its whole
/// range at registration (`hmm_dma_map_alloc`) and links page i at base + i pages, so the pages faulted so
/// far form one contiguous segment.
#[test]
fn mirror_handles_report_the_dma_addresses_they_programmed() {
    passes(
        "mirror_addrs.toml",
        r#"
[sim]
time = "zero"

[[topology.host_bridge]]
name = "hb0"

[[topology.root_port]]
name = "rp0"
parent = "hb0"

[[topology.endpoint]]
name = "nic0"
parent = "rp0"
bdf = "01:00.0"

[[device]]
name = "nic0"
kind = "pci"
iommu = "dma"

[[thread]]
name = "t"
steps = [
  { op = "mmap", name = "buf", len = "4 pages", prot = "rw", flags = ["private", "anonymous"] },
  { op = "store", at = "buf", pattern = "u32:index" },
  { op = "dma.map", dev = "nic0", at = "buf", len = "4 pages", mode = "mirror", name = "m",
    expect = { segments = [], pinned = 0 } },
  { op = "dma_sg.read", handle = "m", len = "8KiB", expect = { data = "u32:index", segments = ["ram:8KiB"] } },
  { op = "dma_sg.write", handle = "m", offset = "8KiB", pattern = "byte:0x11",
    expect = { segments = ["ram:16KiB"] } },
  { op = "dma_sg.release", handle = "m" },
]
"#,
    );
}

/// MADV_DONTFORK keeps a range from the child (VM_DONTCOPY), MADV_DOFORK undoes it (mm/madvise.c).
#[test]
fn madvise_dontfork_and_dofork() {
    passes(
        "dontfork.toml",
        r#"
[sim]
time = "zero"

[[thread]]
name = "t"
steps = [
  { op = "mmap", name = "a", len = "2 pages", prot = "rw", flags = ["private", "anonymous"] },
  { op = "mmap", name = "b", len = "2 pages", prot = "rw", flags = ["private", "anonymous"] },
  { op = "store", at = "a", pattern = "byte:0x11" },
  { op = "store", at = "b", pattern = "byte:0x22" },
  { op = "madvise", at = "a+4KiB", len = "4KiB", advice = "dontfork" },
  { op = "madvise", at = "b", len = "2 pages", advice = "dontfork" },
  { op = "madvise", at = "b", len = "2 pages", advice = "dofork" },
  { op = "fork", child = "kid" },
  { op = "wait", child = "kid" },
]

[[thread]]
name = "k"
process = "kid"
steps = [
  { op = "load", at = "a", len = "4KiB", expect = { data = "byte:0x11" } },
  { op = "load", at = "a+4KiB", len = "4KiB", expect = { signal = "SIGSEGV" } },
  { op = "load", at = "b", expect = { data = "byte:0x22" } },
]
"#,
    );
}

/// MADV_PAGEOUT reclaims the private anonymous pages of a range now — a THP too (split first) — under CLEAR
/// invalidations, skipping pages another process maps; MADV_COLD only deactivates them (mm/madvise.c).
#[test]
fn madvise_pageout_reclaims_private_pages_now_and_cold_only_deactivates() {
    let report = passes(
        "pageout.toml",
        r#"
[sim]
time = "zero"

[[device]]
name = "dmirror0"
kind = "dmirror"

[[thread]]
name = "t"
steps = [
  { op = "open", dev = "dmirror0", fd = "m" },
  { op = "mmap", name = "thp", len = "2MiB", align = "2MiB", prot = "rw", flags = ["private", "anonymous"] },
  { op = "madvise", at = "thp", len = "2MiB", advice = "hugepage" },
  { op = "store", at = "thp", pattern = "u32:index" },
  { op = "mmap", name = "sh", len = "2 pages", prot = "rw", flags = ["private", "anonymous"] },
  { op = "store", at = "sh", pattern = "byte:0x11" },
  { op = "mmap", name = "thp2", len = "2MiB", align = "2MiB", prot = "rw", flags = ["private", "anonymous"] },
  { op = "madvise", at = "thp2", len = "2MiB", advice = "hugepage" },
  { op = "store", at = "thp2", pattern = "byte:0x22" },
  { op = "fork", child = "kid" },
  # Pages the child maps too are left alone: no swap, no split of the shared THP (the mirror keeps it).
  { op = "madvise", at = "sh", len = "2 pages", advice = "pageout", expect = { counters = { "swap.out" = 0 } } },
  { op = "madvise", at = "sh", len = "2 pages", advice = "cold", expect = { counters = { "swap.out" = 0 } } },
  { op = "dmirror.read", fd = "m", at = "thp2", pages = 512, expect = { cpages = 512 } },
  { op = "madvise", at = "thp2", len = "2MiB", advice = "pageout", expect = { counters = { "swap.out" = 0 } } },
  { op = "dmirror.read", fd = "m", at = "thp2", pages = 512, expect = { cpages = 512, faults = 0 } },
  { op = "dmirror.read", fd = "m", at = "thp", pages = 512, expect = { cpages = 512 } },
  { op = "wait", child = "kid" },
  { op = "madvise", at = "thp", len = "2MiB", advice = "pageout", expect = { counters = { "swap.out" = 512 } } },
  { op = "load", at = "thp", expect = { data = "u32:index", counters = { "swap.in" = 512 } } },
  # The invalidations dropped the mirror's entries: the device faults again.
  { op = "dmirror.read", fd = "m", at = "thp", pages = 512, expect = { cpages = 512, faults = 1 } },
]

[[thread]]
name = "k"
process = "kid"
steps = [
  { op = "sleep", for = "1ms" },
  { op = "load", at = "sh", expect = { data = "byte:0x11" } },
]
"#,
    );
    assert!(report.metrics.get("lru.deactivate").copied().unwrap_or(0) == 0);
}

// ----- the numbered differences -----

/// Item 1, mm/internal.h `gup_must_unshare` (since 6.2): a read-only FOLL_LONGTERM pin in a COW mapping
/// (private, may write) of the shared zero page or a page-cache page first gives the process its own
/// anonymous page, so a later CPU write is seen through the pin.
#[test]
fn readonly_longterm_pin_unshares_the_zero_page_and_page_cache_pages() {
    passes(
        "unshare.toml",
        r#"
[sim]
time = "zero"

[[file]]
name = "f"
size = "8KiB"
pattern = "byte:0x11"

[[thread]]
name = "t"
steps = [
  { op = "mmap", name = "anon", len = "4KiB", prot = "rw", flags = ["private", "anonymous"] },
  { op = "load", at = "anon", expect = { data = "zero" } },
  { op = "pin", at = "anon", pages = 1, flags = ["pin", "longterm"], name = "p0" },
  { op = "store", at = "anon", pattern = "byte:0x22", expect = { counters = { "cpu.cow_copy" = 0 } } },
  { op = "dma.read", pin = "p0", expect = { data = "byte:0x22" } },
  # A private file mapping, read-only now but may-write: still a COW mapping.
  { op = "mmap", name = "fm", len = "8KiB", prot = "r", flags = ["private"], file = "f" },
  { op = "load", at = "fm", expect = { data = "byte:0x11" } },
  { op = "pin", at = "fm", pages = 1, flags = ["pin", "longterm"], name = "p1" },
  { op = "mprotect", at = "fm", len = "8KiB", prot = "rw" },
  { op = "store", at = "fm", len = "4KiB", pattern = "byte:0x33" },
  { op = "dma.read", pin = "p1", expect = { data = "byte:0x33" } },
  { op = "pread", file = "f", len = "4KiB", expect = { data = "byte:0x11" } },
  # A short-term read-only pin does not unshare.
  { op = "pin", at = "fm+4KiB", pages = 1, flags = ["pin"], name = "p2" },
  { op = "unpin", pin = "p2" },
  { op = "store", at = "fm+4KiB", len = "4KiB", pattern = "byte:0x44", expect = { counters = { "cpu.cow_copy" = 1 } } },
]
"#,
    );
}

/// Item 2, mm/huge_memory.c `copy_huge_pmd` and mm/hugetlb.c `copy_hugetlb_page_range`: fork copies a
/// pinned THP or hugetlb page for the child, so the parent keeps writing its pinned page and the child
/// never writes into it.
#[test]
fn fork_copies_pinned_huge_pages_for_the_child() {
    passes(
        "fork_pinned_huge.toml",
        r#"
[sim]
time = "zero"

[[thread]]
name = "t"
steps = [
  { op = "mmap", name = "thp", len = "2MiB", align = "2MiB", prot = "rw", flags = ["private", "anonymous"] },
  { op = "madvise", at = "thp", len = "2MiB", advice = "hugepage" },
  { op = "store", at = "thp", pattern = "byte:0x11" },
  { op = "pin", at = "thp", pages = 1, flags = ["pin", "longterm", "write"], name = "p" },
  { op = "mmap", name = "htlb", len = "2MiB", prot = "rw", flags = ["private", "anonymous", "hugetlb"] },
  { op = "store", at = "htlb", pattern = "byte:0x11" },
  { op = "pin", at = "htlb", pages = 1, flags = ["pin", "longterm", "write"], name = "q" },
  { op = "fork", child = "kid" },
  { op = "wait", child = "kid" },
  { op = "store", at = "thp", len = "4KiB", pattern = "byte:0x33", expect = { counters = { "cpu.cow_copy" = 0 } } },
  { op = "dma.read", pin = "p", expect = { data = "byte:0x33" } },
  { op = "store", at = "htlb", len = "4KiB", pattern = "byte:0x33", expect = { counters = { "cpu.cow_copy" = 0 } } },
  { op = "dma.read", pin = "q", expect = { data = "byte:0x33" } },
]

[[thread]]
name = "k"
process = "kid"
steps = [
  { op = "store", at = "thp", len = "4KiB", pattern = "byte:0x22" },
  { op = "store", at = "htlb", len = "4KiB", pattern = "byte:0x22" },
  { op = "load", at = "thp", len = "4KiB", expect = { data = "byte:0x22" } },
]
"#,
    );
}

/// Item 3, mm/mremap.c (`move_pgt_entry`, `split_huge_pmd`): moving part of a 2 MiB THP splits the PMD and
/// moves only that part.
#[test]
fn partial_mremap_of_a_thp_splits_the_pmd() {
    passes(
        "mremap_thp.toml",
        r#"
[sim]
time = "zero"

[[thread]]
name = "t"
steps = [
  { op = "mmap", name = "thp", len = "2MiB", align = "2MiB", prot = "rw", flags = ["private", "anonymous"] },
  { op = "madvise", at = "thp", len = "2MiB", advice = "hugepage" },
  { op = "store", at = "thp", len = "1MiB", pattern = "byte:0x11" },
  { op = "store", at = "thp+1MiB", len = "1MiB", pattern = "byte:0x22" },
  { op = "mmap", name = "dst", len = "4MiB", align = "2MiB", prot = "rw", flags = ["private", "anonymous"] },
  # The upper half to an unaligned place.
  { op = "mremap", at = "thp+1MiB", len = "1MiB", new_len = "1MiB", flags = ["maymove", "fixed"], to = "dst+1MiB", name = "hi" },
  { op = "load", at = "hi", len = "1MiB", expect = { data = "byte:0x22" } },
  { op = "load", at = "thp", len = "1MiB", expect = { data = "byte:0x11" } },
  # The lower half to an aligned target: only 1 MiB moves.
  { op = "mremap", at = "thp", len = "1MiB", new_len = "1MiB", flags = ["maymove", "fixed"], to = "dst+2MiB", name = "lo" },
  { op = "load", at = "lo", len = "1MiB", expect = { data = "byte:0x11" } },
  { op = "load", at = "hi", len = "1MiB", expect = { data = "byte:0x22" } },
  { op = "load", at = "dst+3MiB", len = "1MiB", expect = { data = "zero" } },
]
"#,
    );
}

/// Item 4, mm/mremap.c: MREMAP_DONTUNMAP without MREMAP_FIXED moves the pages to a new address and leaves
/// the old range mapped (a private anonymous range then reads zeros).
#[test]
fn mremap_dontunmap_without_fixed_moves_to_a_new_address() {
    passes(
        "dontunmap.toml",
        r#"
[sim]
time = "zero"

[[thread]]
name = "t"
steps = [
  { op = "mmap", name = "buf", len = "4 pages", prot = "rw", flags = ["private", "anonymous"] },
  { op = "store", at = "buf", pattern = "byte:0x11" },
  { op = "mremap", at = "buf", len = "4 pages", new_len = "4 pages", flags = ["maymove", "dontunmap"], name = "moved" },
  { op = "load", at = "moved", expect = { data = "byte:0x11" } },
  { op = "load", at = "buf", expect = { data = "zero" } },
  { op = "store", at = "moved", pattern = "byte:0x22" },
  { op = "load", at = "buf", expect = { data = "zero" } },
]
"#,
    );
}

/// Item 5, mm/madvise.c `madvise_free_single_vma`: MADV_FREE runs under an MMU_NOTIFY_CLEAR invalidation.
#[test]
fn madv_free_invalidates_mirrors_with_clear() {
    passes(
        "madv_free.toml",
        &with_dmirror(
            r#"  { op = "open", dev = "dmirror0", fd = "m" },
  { op = "mmap", name = "buf", len = "4 pages", prot = "rw", flags = ["private", "anonymous"] },
  { op = "store", at = "buf", pattern = "u32:index" },
  { op = "dmirror.read", fd = "m", at = "buf", pages = 4, expect = { cpages = 4 } },
  { op = "madvise", at = "buf", len = "4 pages", advice = "free", expect = { events = { m = ["clear"] } } },"#,
        ),
    );
}

/// Item 6, mm/mprotect.c `can_change_pte_writable`: after `r` then `rw`, an exclusive anonymous page is
/// writable at once (no write fault).
#[test]
fn mprotect_makes_exclusive_anonymous_ptes_writable_at_once() {
    passes(
        "mprotect_upgrade.toml",
        &with_dmirror(
            r#"  { op = "open", dev = "dmirror0", fd = "m" },
  { op = "mmap", name = "buf", len = "1 page", prot = "rw", flags = ["private", "anonymous"] },
  { op = "store", at = "buf", pattern = "byte:0x11" },
  { op = "mprotect", at = "buf", len = "1 page", prot = "r" },
  { op = "mprotect", at = "buf", len = "1 page", prot = "rw" },
  { op = "dmirror.snapshot", fd = "m", at = "buf", pages = 1, expect = { bytes = [0x02] } },
  { op = "store", at = "buf", pattern = "byte:0x22", expect = { counters = { "cpu.faults" = 0 } } },"#,
        ),
    );
}

/// Item 7, mm/mprotect.c `change_pte_range`: a writable device-private entry becomes read-only whatever the
/// new protection (`rw` → `rwx` too); the next device write faults again.
#[test]
fn mprotect_downgrades_writable_device_private_entries() {
    passes(
        "mprotect_devpriv.toml",
        &with_dmirror(
            r#"  { op = "open", dev = "dmirror0", fd = "m" },
  { op = "mmap", name = "buf", len = "1 page", prot = "rw", flags = ["private", "anonymous"] },
  { op = "store", at = "buf", pattern = "byte:0x11" },
  { op = "dmirror.migrate_to_dev", fd = "m", at = "buf", pages = 1, expect = { cpages = 1 } },
  { op = "dmirror.snapshot", fd = "m", at = "buf", pages = 1, expect = { bytes = [0x22] } },
  { op = "mprotect", at = "buf", len = "1 page", prot = "rwx" },
  { op = "dmirror.snapshot", fd = "m", at = "buf", pages = 1, expect = { bytes = [0x21] } },"#,
        ),
    );
}

/// Item 8, mm/gup.c via `make_device_exclusive`: the page is taken with FOLL_GET | FOLL_WRITE |
/// FOLL_SPLIT_PMD, so GUP's rules apply: a PFNMAP mapping is `EFAULT`.
#[test]
fn device_exclusive_of_a_pfnmap_is_efault() {
    passes(
        "exclusive_pfnmap.toml",
        &exclusive_on_bar("bar.mmap", "EFAULT"),
    );
}

/// Item 8: P2P memory is `EREMOTEIO` (GUP without FOLL_PCI_P2PDMA).
#[test]
fn device_exclusive_of_p2p_memory_is_eremoteio() {
    passes(
        "exclusive_p2p.toml",
        &exclusive_on_bar("p2pmem.mmap", "EREMOTEIO"),
    );
}

/// Item 8: a page that is not anonymous, or is hugetlb, is `EOPNOTSUPP`.
#[test]
fn device_exclusive_of_file_and_hugetlb_pages_is_eopnotsupp() {
    passes(
        "exclusive_file.toml",
        r#"
[sim]
time = "zero"

[[file]]
name = "f"
size = "4KiB"

[[device]]
name = "dmirror0"
kind = "dmirror"

[[thread]]
name = "t"
steps = [
  { op = "open", dev = "dmirror0", fd = "m" },
  { op = "mmap", name = "fm", len = "4KiB", prot = "rw", flags = ["shared"], file = "f" },
  { op = "dmirror.exclusive", fd = "m", at = "fm", pages = 1, expect = { errno = "EOPNOTSUPP" } },
  { op = "mmap", name = "h", len = "2MiB", prot = "rw", flags = ["private", "anonymous", "hugetlb"] },
  { op = "store", at = "h", pattern = "byte:0x11" },
  { op = "dmirror.exclusive", fd = "m", at = "h", pages = 1, expect = { errno = "EOPNOTSUPP" } },
]
"#,
    );
}

/// A scenario with a dmirror and a PCI device exporting a BAR and publishing P2P memory; `mmap_op` maps one
/// page of it and `dmirror.exclusive` of that page must fail with `errno`.
fn exclusive_on_bar(mmap_op: &str, errno: &str) -> String {
    let map = if mmap_op == "bar.mmap" {
        r#"{ op = "bar.mmap", export = "vram", name = "x", len = "4KiB" }"#
    } else {
        r#"{ op = "p2pmem.mmap", dev = "gpu0", name = "x", len = "4KiB" }"#
    };
    format!(
        r#"
[sim]
time = "zero"
time_limit = "1ms"

[[topology.host_bridge]]
name = "hb0"

[[topology.root_port]]
name = "rp0"
parent = "hb0"

[[topology.endpoint]]
name = "gpu0"
parent = "rp0"
bdf = "01:00.0"
bars = [ {{ index = 2, size = "1MiB", phys = "0x3800_0000_0000", prefetchable = true }} ]

[[device]]
name = "gpu0"
kind = "pci"
p2p = [ {{ bar = 2, size = "512KiB" }} ]
export = [ {{ name = "vram", bar = 2, offset = "512KiB", len = "64KiB" }} ]

[[device]]
name = "dmirror0"
kind = "dmirror"

[[thread]]
name = "t"
steps = [
  {{ op = "open", dev = "dmirror0", fd = "m" }},
  {map},
  {{ op = "dmirror.exclusive", fd = "m", at = "x", pages = 1, expect = {{ errno = "{errno}" }} }},
]
"#
    )
}

/// Item 9: shmem, tmpfs and shared anonymous memory need no write-notify, so a read fault on MAP_SHARED
/// maps the page writable: a device READ then WRITE takes no second fault.
#[test]
fn shared_shmem_read_faults_map_writable() {
    passes(
        "shmem_writable.toml",
        &with_dmirror(
            r#"  { op = "open", dev = "dmirror0", fd = "m" },
  { op = "mmap", name = "buf", len = "4 pages", prot = "rw", flags = ["shared", "anonymous"] },
  { op = "dmirror.read", fd = "m", at = "buf", pages = 4, expect = { cpages = 4, faults = 1 } },
  { op = "dmirror.snapshot", fd = "m", at = "buf", pages = 1, expect = { bytes = [0x02] } },
  { op = "dmirror.write", fd = "m", at = "buf", pages = 4, pattern = "byte:0x11", expect = { cpages = 4, faults = 0 } },"#,
        ),
    );
}

/// Item 9 for named files: a tmpfs file's shared mapping is writable after a read fault, a dirty-tracked
/// file's is not (its first write faults again, `do_page_mkwrite`).
#[test]
fn tmpfs_files_need_no_write_notify_other_files_do() {
    passes(
        "tmpfs.toml",
        r#"
[sim]
time = "zero"

[[file]]
name = "shm"
size = "1 page"
tmpfs = true

[[file]]
name = "ext4"
size = "1 page"

[[device]]
name = "dmirror0"
kind = "dmirror"

[[thread]]
name = "t"
steps = [
  { op = "open", dev = "dmirror0", fd = "m" },
  { op = "mmap", name = "a", len = "1 page", prot = "rw", flags = ["shared"], file = "shm" },
  { op = "mmap", name = "b", len = "1 page", prot = "rw", flags = ["shared"], file = "ext4" },
  { op = "load", at = "a" },
  { op = "load", at = "b" },
  { op = "dmirror.snapshot", fd = "m", at = "a", pages = 1, expect = { bytes = [0x02] } },
  { op = "dmirror.snapshot", fd = "m", at = "b", pages = 1, expect = { bytes = [0x01] } },
  { op = "store", at = "a", pattern = "byte:0x11", expect = { counters = { "cpu.faults" = 0 } } },
  { op = "store", at = "b", pattern = "byte:0x11", expect = { counters = { "cpu.faults" = 1 } } },
]
"#,
    );
}

/// Item 10, mm/huge_memory.c `__split_huge_pmd`: splitting a huge PMD fires MMU_NOTIFY_CLEAR over the whole
/// 2 MiB, so a partial munmap of a mirrored THP invalidates the untouched half too.
#[test]
fn splitting_a_huge_pmd_clears_the_whole_2mib() {
    passes(
        "split_clear.toml",
        &with_dmirror(
            r#"  { op = "open", dev = "dmirror0", fd = "m" },
  { op = "mmap", name = "thp", len = "2MiB", align = "2MiB", prot = "rw", flags = ["private", "anonymous"] },
  { op = "madvise", at = "thp", len = "2MiB", advice = "hugepage" },
  { op = "store", at = "thp", pattern = "byte:0x11" },
  { op = "dmirror.read", fd = "m", at = "thp", pages = 512, expect = { cpages = 512 } },
  { op = "munmap", at = "thp+1MiB", len = "1MiB", expect = { events = { m = ["clear", "unmap"] } } },
  { op = "dmirror.read", fd = "m", at = "thp", pages = 256, expect = { cpages = 256, faults = 1 } },"#,
        ),
    );
}

/// Item 11, mm/memory.c `copy_page_range` / `vma_needs_copy`: a mapping that needs no copy (no anon_vma:
/// anonymous memory only ever read, a private file mapping never written) fires nothing at fork and its
/// mirror survives; the child refaults the same contents.
#[test]
fn fork_of_a_mapping_that_needs_no_copy_notifies_nothing() {
    passes(
        "fork_no_copy.toml",
        r#"
[sim]
time = "zero"

[[file]]
name = "f"
size = "4 pages"
pattern = "byte:0x11"

[[device]]
name = "dmirror0"
kind = "dmirror"

[[thread]]
name = "t"
steps = [
  { op = "open", dev = "dmirror0", fd = "m" },
  { op = "mmap", name = "buf", len = "4 pages", prot = "rw", flags = ["private", "anonymous"] },
  { op = "mmap", name = "fm", len = "4 pages", prot = "rw", flags = ["private"], file = "f" },
  { op = "dmirror.read", fd = "m", at = "buf", pages = 4, expect = { cpages = 4 } },
  { op = "dmirror.read", fd = "m", at = "fm", pages = 4, expect = { cpages = 4, data = "byte:0x11" } },
  { op = "fork", child = "kid", expect = { events = { m = [] } } },
  { op = "dmirror.read", fd = "m", at = "buf", pages = 4, expect = { cpages = 4, faults = 0 } },
  { op = "dmirror.read", fd = "m", at = "fm", pages = 4, expect = { cpages = 4, faults = 0 } },
  { op = "wait", child = "kid" },
]

[[thread]]
name = "k"
process = "kid"
steps = [
  { op = "load", at = "buf", expect = { data = "zero" } },
  { op = "load", at = "fm", expect = { data = "byte:0x11" } },
]
"#,
    );
}

/// Item 11: a COW mapping that must be copied fires MMU_NOTIFY_PROTECTION_PAGE also when none of its pages is
/// writable any more.
#[test]
fn fork_of_a_readonly_cow_mapping_still_fires_protection_page() {
    passes(
        "fork_ro_cow.toml",
        &with_dmirror(
            r#"  { op = "open", dev = "dmirror0", fd = "m" },
  { op = "mmap", name = "buf", len = "4 pages", prot = "rw", flags = ["private", "anonymous"] },
  { op = "store", at = "buf", pattern = "byte:0x11" },
  { op = "mprotect", at = "buf", len = "4 pages", prot = "r" },
  { op = "dmirror.read", fd = "m", at = "buf", pages = 4, expect = { cpages = 4 } },
  { op = "fork", child = "kid", expect = { events = { m = ["protection_page"] } } },"#,
        ),
    );
}

/// Item 11: hugetlb's copy (`copy_hugetlb_page_range`) fires MMU_NOTIFY_CLEAR.
#[test]
fn fork_of_private_hugetlb_fires_clear() {
    passes(
        "fork_hugetlb.toml",
        &with_dmirror(
            r#"  { op = "open", dev = "dmirror0", fd = "m" },
  { op = "mmap", name = "h", len = "2MiB", prot = "rw", flags = ["private", "anonymous", "hugetlb"] },
  { op = "store", at = "h", pattern = "byte:0x11" },
  { op = "dmirror.read", fd = "m", at = "h", pages = 1, expect = { cpages = 1 } },
  { op = "fork", child = "kid", expect = { events = { m = ["clear"] } } },"#,
        ),
    );
}

/// Item 14: in `time = "zero"` every cost is zero, swap I/O included (every cost belongs to the table).
#[test]
fn zero_time_charges_no_swap_io() {
    let report = passes(
        "zero_swap.toml",
        r#"
[sim]
time = "zero"
memory = "8MiB"

[[thread]]
name = "t"
steps = [
  { op = "mmap", name = "buf", len = "12MiB", prot = "rw", flags = ["private", "anonymous"] },
  { op = "store", at = "buf", pattern = "u32:index" },
  { op = "load", at = "buf", expect = { data = "u32:index" } },
]
"#,
    );
    assert!(
        report.metrics.get("swap.out").copied().unwrap_or(0) > 0,
        "it swapped"
    );
    assert!(
        report.metrics.get("swap.in").copied().unwrap_or(0) > 0,
        "it swapped in"
    );
    assert_eq!(report.end_time.0, 0, "{}", report.render_text());
}
