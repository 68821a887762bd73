//! `examples/nvme-to-gpu.toml`: NVMe into peer memory through a switch, the refused host-bridge path and
//! the bounce fallback; the same with a queue that lacks P2P support fails at the pin.
#![expect(
    clippy::tests_outside_test_module,
    reason = "an integration-test crate is all tests"
)]

use peerdma_scenario::{Outcome, RunOptions, parse, run};

const EXAMPLE: &str = include_str!("../../../examples/nvme-to-gpu.toml");

#[test]
fn nvme_to_peer_memory_example_passes() {
    let r = run(
        &parse("nvme-to-gpu.toml", EXAMPLE).unwrap(),
        &RunOptions::default(),
    );
    assert_eq!(r.outcome, Outcome::Passed, "{:?}", r.failures);
    assert_eq!(r.metrics["nvme.map_einval"], 1);
    assert_eq!(r.metrics["nvme.reads"], 3);
}

#[test]
fn a_queue_without_p2p_support_refuses_peer_memory_at_the_pin() {
    let text = EXAMPLE
        .replacen("size = \"64MiB\"", "size = \"64MiB\"\np2p_queue = false", 1)
        .replacen(
            "{ op = \"nvme.read\", dev = \"nvme0\", at = \"cmb0\", len = \"256KiB\" }",
            "{ op = \"nvme.read\", dev = \"nvme0\", at = \"cmb0\", len = \"256KiB\", expect = { errno = \"EREMOTEIO\" } }",
            1,
        )
        .replacen("expect = { data = \"u32:index\" } },\n  { op = \"dma_sg.release\", handle = \"h0\" }", "},\n  { op = \"dma_sg.release\", handle = \"h0\" }", 1)
        .replacen("expect = { errno = \"EINVAL\" }", "expect = { errno = \"EREMOTEIO\" }", 1);
    let r = run(
        &parse("nvme-no-p2p.toml", &text).unwrap(),
        &RunOptions::default(),
    );
    assert_eq!(r.outcome, Outcome::Passed, "{:?}", r.failures);
    assert_eq!(r.metrics.get("nvme.map_einval"), None);
    assert_eq!(r.metrics["nvme.errors"], 2);
}
