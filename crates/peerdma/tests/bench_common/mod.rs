//! What the two `peerdma bench` test crates share: running the command and checking a figure.
#![expect(clippy::unwrap_used, reason = "test helpers")]

use std::process::{Command, Output};

use serde_json::Value;

/// Runs `peerdma bench` with `args` and returns its output; fails the test with its stderr when it fails.
pub(crate) fn run_bench(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_peerdma"))
        .arg("bench")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "peerdma bench {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Returns `v` as a number, failing the test (naming `what`) unless it is finite and positive.
pub(crate) fn positive(v: &Value, what: &str) -> f64 {
    let x = v
        .as_f64()
        .unwrap_or_else(|| panic!("{what} is not a number: {v}"));
    assert!(x.is_finite() && x > 0.0, "{what} = {x}");
    x
}
