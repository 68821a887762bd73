//! `[timing]` overrides reach exactly the kernel paths that pay them, and zero mode zeroes every cost
//! (swap I/O included). Each test runs one scenario twice and compares the step log (`StepRecord` start and
//! end) or the end time.
#![expect(
    clippy::tests_outside_test_module,
    clippy::unwrap_used,
    reason = "an integration-test crate is all tests"
)]

use peerdma_scenario::report::StepRecord;
use peerdma_scenario::{Outcome, Report, RunOptions, parse, run};

/// A NIC behind a strict IOMMU (`iommu = "dma"`) maps 16 pages a CPU store faulted in, reads them, and
/// releases the handle. `{timing}` is replaced by a `[timing]` table.
const DMA: &str = r#"
[sim]
seed = 1
{timing}
[topology]
[[topology.socket]]
name = "s0"
[[topology.host_bridge]]
name = "hb0"
socket = "s0"
[[topology.root_port]]
name = "rp0"
parent = "hb0"
bdf = "00:01.0"
[[topology.endpoint]]
name = "nic0"
parent = "rp0"
bdf = "01:00.0"
link = { gen = 3, width = 16 }

[[device]]
name = "nic0"
kind = "pci"
iommu = "dma"

[[thread]]
name = "app"
steps = [
  { op = "mmap", name = "buf", len = "16 pages", prot = "rw", flags = ["private", "anonymous"] },
  { op = "store", at = "buf", pattern = "u32:index" },
  { op = "dma.map", dev = "nic0", at = "buf", len = "16 pages", name = "h", expect = { pinned = 16 } },
  { op = "dma_sg.read", handle = "h", expect = { data = "u32:index" } },
  { op = "dma_sg.release", handle = "h" },
]
"#;

const NR_PAGES: u64 = 16;

fn run_with(template: &str, timing: &str) -> Report {
    let text = template.replace("{timing}", timing);
    let scn = parse("timing.toml", &text).unwrap();
    let report = run(
        &scn,
        &RunOptions {
            step_log: true,
            ..RunOptions::default()
        },
    );
    assert_eq!(report.outcome, Outcome::Passed, "{}", report.render_text());
    report
}

/// Returns each step's (op, simulated duration in ns).
fn durations(steps: &[StepRecord]) -> Vec<(String, u64)> {
    steps
        .iter()
        .map(|s| (s.op.clone(), s.end.as_nanos() - s.start.as_nanos()))
        .collect()
}

/// Returns, per step, how much longer it took with `timing` than with the defaults.
fn step_deltas(timing: &str) -> Vec<(String, i128)> {
    let base = durations(&run_with(DMA, "").steps);
    let changed = durations(&run_with(DMA, timing).steps);
    assert_eq!(base.len(), changed.len());
    base.iter()
        .zip(&changed)
        .map(|((op, a), (_, b))| (op.clone(), i128::from(*b) - i128::from(*a)))
        .collect()
}

fn expected(deltas: &[(&str, i128)]) -> Vec<(String, i128)> {
    deltas.iter().map(|&(op, d)| (op.to_owned(), d)).collect()
}

#[test]
fn cpu_fault_override_slows_only_the_faulting_store_by_4us_per_page() {
    // 1 µs → 5 µs: the store faults each of the 16 pages in; nothing else faults.
    let deltas = step_deltas("[timing]\nmm.cpu_fault = \"5us\"\n");
    let per_page = 4_000 * i128::from(NR_PAGES);
    assert_eq!(
        deltas,
        expected(&[
            ("mmap", 0),
            ("store", per_page),
            ("dma.map", 0),
            ("dma_sg.read", 0),
            ("dma_sg.release", 0),
        ])
    );
}

#[test]
fn pin_page_override_slows_only_the_pinning_dma_map() {
    // 50 ns → 1 µs per page GUP pins.
    let deltas = step_deltas("[timing]\n\"dma.pin_page\" = \"1us\"\n");
    assert_eq!(
        deltas,
        expected(&[
            ("mmap", 0),
            ("store", 0),
            ("dma.map", 950 * i128::from(NR_PAGES)),
            ("dma_sg.read", 0),
            ("dma_sg.release", 0),
        ])
    );
}

#[test]
fn outstanding_limit_override_changes_only_the_device_read() {
    // 256 tags → 1: the 16-page read no longer pipelines (each page waits for the previous landing, so the
    // hop latency and IOTLB misses are paid in series); nothing else issues device requests.
    let deltas = step_deltas("[timing]\ndma.max_outstanding = 1\n");
    let read = deltas.iter().find(|(op, _)| op == "dma_sg.read").unwrap().1;
    // At least one hop (115 ns) per page but the first comes out of the shadow of the wire time.
    assert!(
        read >= 115 * i128::from(NR_PAGES - 1),
        "read slower by {read} ns"
    );
    assert_eq!(
        deltas,
        expected(&[
            ("mmap", 0),
            ("store", 0),
            ("dma.map", 0),
            ("dma_sg.read", read),
            ("dma_sg.release", 0),
        ])
    );
}

#[test]
fn pte_update_override_slows_only_the_iommu_map_and_unmap() {
    // 10 ns → 1010 ns per IO PTE written (dma.map) and cleared (dma_sg.release).
    let deltas = step_deltas("[timing.iommu]\npte_update = 1010\n");
    let per_page = 1_000 * i128::from(NR_PAGES);
    assert_eq!(
        deltas,
        expected(&[
            ("mmap", 0),
            ("store", 0),
            ("dma.map", per_page),
            ("dma_sg.read", 0),
            ("dma_sg.release", per_page),
        ])
    );
}

#[test]
fn dma_map_costs_its_pins_and_io_pte_writes() {
    // 16 pages: 16 × 50 ns of GUP and 16 × 10 ns of IO PTE writes; the pages are already faulted in.
    let steps = durations(&run_with(DMA, "").steps);
    assert_eq!(steps[2], ("dma.map".to_owned(), 16 * 50 + 16 * 10));
}

/// `scenarios/oversubscribe.toml`: 16 MiB of anonymous memory in 8 MiB of RAM, so it swaps out and in.
fn oversubscribe(time: &str, timing: &str) -> Report {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../scenarios/oversubscribe.toml"
    );
    let text = std::fs::read_to_string(path)
        .unwrap()
        .replace("time = \"calibrated\"", &format!("time = \"{time}\""));
    let scn = parse("oversubscribe.toml", &format!("{text}\n{timing}")).unwrap();
    let report = run(&scn, &RunOptions::default());
    assert_eq!(report.outcome, Outcome::Passed, "{}", report.render_text());
    report
}

#[test]
fn zero_mode_spends_no_time_even_when_swapping_and_ignores_overrides() {
    let report = oversubscribe(
        "zero",
        "[timing]\nmm.swap_io = \"1ms\"\nmm.cpu_fault = \"5us\"\n",
    );
    assert!(report.metrics["swap.out"] > 0 && report.metrics["swap.in"] > 0);
    assert_eq!(report.end_time.as_nanos(), 0);
}

#[test]
fn swap_io_override_costs_each_page_swapped_out_and_in() {
    let base = oversubscribe("calibrated", "");
    let slow = oversubscribe("calibrated", "[timing]\nmm.swap_io = \"100us\"\n");
    assert_eq!(base.metrics, slow.metrics);
    let swapped = base.metrics["swap.out"] + base.metrics["swap.in"];
    assert_eq!(
        slow.end_time.as_nanos() - base.end_time.as_nanos(),
        swapped * 20_000
    );
}
