//! The scale scenarios of `scenarios/scale/`: each is checked (parsed and validated) by default; running
//! them takes minutes and gigabytes, so those tests are ignored — run them with
//! `cargo test --release -p peerdma --test scale -- --ignored --nocapture`.
#![expect(
    clippy::tests_outside_test_module,
    reason = "an integration-test crate is all tests"
)]

mod common;

use common::{peerdma, root};

const TERABYTE: &str = "scenarios/scale/terabyte.toml";

/// The terabyte scenario stays a valid file of the size its header states: token mode, 1,024 processes,
/// 64 PCI devices, and `[sim] memory` holding the 2^28 resident pages.
#[test]
fn terabyte_scale_scenario_is_valid() {
    let out = peerdma(&["check", TERABYTE]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let scn = peerdma_scenario::parse(
        TERABYTE,
        &std::fs::read_to_string(root().join(TERABYTE)).unwrap(),
    )
    .unwrap();
    assert_eq!(format!("{:?}", scn.sim.data), "Token");
    let procs = scn
        .processes
        .iter()
        .filter(|p| p.as_str() != "main")
        .count();
    assert_eq!(procs, 1024, "1,024 processes besides main");
    let pci = scn
        .devices
        .iter()
        .filter(|d| d.name.starts_with("pci"))
        .count();
    assert_eq!(pci, 64);
    assert!(scn.sim.memory.iter().sum::<u64>() >= 1 << 40);
}

/// Runs the terabyte scenario: 2^28 resident pages in token mode must pass, and the peak RSS
/// `--resources` reports must stay under the 24 GiB of the machine it is sized for. Several minutes on a
/// 2-core VM: `cargo test --release -p peerdma --test scale -- --ignored --nocapture`.
#[test]
#[ignore = "minutes and ~9 GiB of host memory; run with --ignored (module docs)"]
fn terabyte_scale_scenario_completes() {
    let out = peerdma(&["run", TERABYTE, "--resources"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    #[expect(
        clippy::print_stderr,
        reason = "the peak RSS and wall time are what the run is for"
    )]
    {
        eprintln!("{stderr}");
    }
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("result PASSED"), "{stdout}");
    let peak: u64 = stderr
        .split("bytes)")
        .next()
        .and_then(|s| s.rsplit('(').next())
        .and_then(|s| s.trim().parse().ok())
        .expect("a peak RSS in bytes");
    assert!(peak < 24 << 30, "peak RSS {peak} bytes");
}
