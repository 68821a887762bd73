//! What the CLI's integration tests share: the repository root and the `peerdma` binary run from it.
#![expect(clippy::unwrap_used, reason = "test helpers")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root (where `scenarios/` and `examples/` are).
pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs the `peerdma` binary with `args` in the repository root.
pub(crate) fn peerdma(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_peerdma"))
        .current_dir(root())
        .args(args)
        .output()
        .unwrap()
}
