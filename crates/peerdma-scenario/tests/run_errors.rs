//! Steps that parse but cannot run as written fail with a [`RunError`](peerdma_scenario::RunError) whose text
//! is the step's failure message: the reports show it, so the text is fixed here. A handle the process does
//! not hold (a pin, a DMA handle, a device file) is an errno outcome (`-EBADF`, `-EINVAL` past a handle's
//! end) that `expect` can name; unexpected, its message says which misuse it was.
#![expect(
    clippy::tests_outside_test_module,
    reason = "an integration-test crate is all tests"
)]

use peerdma_scenario::{RunOptions, parse, run};

/// Returns each failure of the run as `line:col op: message`, in the report's order.
fn failures(name: &str, text: &str) -> Vec<String> {
    let scn = parse(name, text).expect("the scenario parses");
    let report = run(&scn, &RunOptions::default());
    report
        .failures
        .iter()
        .map(|f| format!("{}:{} {}: {}", f.line, f.col, f.op, f.message))
        .collect()
}

#[test]
fn names_a_process_does_not_hold_are_run_errors_with_the_process() {
    let got = failures("run_errors.toml", include_str!("data/run_errors.toml"));
    assert_eq!(
        got,
        [
            "30:3 dmirror.read: expected success, got -EBADF (`d0` is not open in process `kid`)",
            "14:3 store: `store` at a raw address needs `len`",
            "15:3 load: mapping `kbuf` does not exist in process `main` at this point",
            "19:3 unpin: expected success, got -EBADF (pin `p` is not held by process `main`)",
            "20:3 dma.write: expected success, got -EBADF (pin `p` is not held by process `main`)",
        ]
    );
}

#[test]
fn dma_handles_not_held_or_too_short_are_run_errors() {
    let got = failures(
        "run_errors_dma.toml",
        include_str!("data/run_errors_dma.toml"),
    );
    assert_eq!(
        got,
        [
            "65:3 dma_sg.read: expected success, got -EINVAL (offset 0x4000 + 0x4000 bytes passes the end of handle `h` (0x4000 bytes))",
            "67:3 dma_sg.release: expected success, got -EBADF (dma handle `h` is not held by process `main`)",
        ]
    );
}
