//! The RDMA examples explored over seeds: the ODP munmap race is clean, and the test-only `rdma.skip_fence`
//! makes the oracle report it; the ODP-vs-pinned example gives the shape of spec/numbers.md §3.
#![expect(
    clippy::tests_outside_test_module,
    clippy::unwrap_used,
    reason = "an integration-test crate is all tests"
)]

use peerdma_scenario::{Outcome, RunOptions, parse, run};

const MUNMAP: &str = include_str!("../../../examples/rdma-odp-munmap.toml");

fn explore(text: &str, seed: u64) -> peerdma_scenario::Report {
    let scn = parse("rdma-odp-munmap.toml", text).unwrap();
    run(
        &scn,
        &RunOptions {
            seed: Some(seed),
            explore: Some(true),
            step_log: false,
            ..Default::default()
        },
    )
}

#[test]
fn odp_munmap_example_is_clean_over_many_seeds_and_its_fence_is_exercised() {
    let mut waited = 0;
    for seed in 0..60 {
        let r = explore(MUNMAP, seed);
        assert_eq!(r.outcome, Outcome::Passed, "seed {seed}: {:?}", r.failures);
        assert!(r.metrics.get("rnic.wc.success").copied().unwrap_or(0) >= 2);
        waited += u64::from(r.metrics.get("dma.fence_waits").copied().unwrap_or(0) > 0);
    }
    assert!(
        waited > 6,
        "the munmap rarely met DMA in flight ({waited} seeds)"
    );
}

#[test]
fn skipping_the_mrs_fence_is_reported_within_1000_seeds() {
    let broken = MUNMAP.replacen(
        "  { op = \"mmap\", name = \"buf\"",
        "  { op = \"rdma.skip_fence\", dev = \"nic1\" },\n  { op = \"mmap\", name = \"buf\"",
        1,
    );
    assert_ne!(broken, MUNMAP);
    let found =
        (0..1000).find(|&s| matches!(explore(&broken, s).outcome, Outcome::OracleViolation(_)));
    assert!(found.is_some(), "no seed showed the skipped fence");
}

#[test]
fn odp_vs_pinned_example_has_the_published_shape() {
    let text = include_str!("../../../examples/rdma-odp-vs-pinned.toml");
    let scn = parse("rdma-odp-vs-pinned.toml", text).unwrap();
    let r = run(
        &scn,
        &RunOptions {
            step_log: true,
            ..RunOptions::default()
        },
    );
    assert_eq!(r.outcome, Outcome::Passed, "{:?}", r.failures);
    // Durations of the example's registrations (dst, pinned, odp) and polls (pinned, ODP first touch, ODP
    // after prefetch), in step order.
    let took = |op: &str| -> Vec<u64> {
        r.steps
            .iter()
            .filter(|s| s.op == op)
            .map(|s| s.end.0 - s.start.0)
            .collect()
    };
    let (regs, polls) = (took("rdma.reg_mr"), took("rdma.poll"));
    let (reg_pinned, reg_odp) = (regs[1], regs[2]);
    let (pinned64, first4, odp64) = (polls[0], polls[1], polls[2]);
    assert!(reg_odp * 100 < reg_pinned, "{reg_odp} vs {reg_pinned}");
    assert!(
        first4 / 4 > 1_000 * (pinned64 / 64),
        "{first4} vs {pinned64}"
    );
    assert!(
        odp64.abs_diff(pinned64) * 10 < pinned64,
        "{odp64} vs {pinned64}"
    );
    assert_eq!(r.metrics["rnic.transport_retries"], 4);
}
