//! The `gpu` device in scenarios: `examples/nic-follows-gpu.toml` (a NIC's dma-buf attachment follows a GPU
//! buffer through eviction and back, clean over many interleavings, and caught by the oracle when the
//! eviction skips the peer invalidation) and `examples/gpu-oversubscription.toml` (the prefetcher's effect).
#![expect(
    clippy::tests_outside_test_module,
    clippy::unwrap_used,
    reason = "an integration-test crate is all tests"
)]

use peerdma_scenario::ast::{DeviceKind, Scenario};
use peerdma_scenario::{Outcome, Report, RunOptions, parse, run};

fn example(name: &str) -> Scenario {
    let path = format!("{}/../../examples/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap();
    parse(name, &text).unwrap()
}

fn run_steps(scn: &Scenario, seed: Option<u64>, explore: bool) -> Report {
    run(
        scn,
        &RunOptions {
            seed,
            explore: Some(explore),
            step_log: true,
            ..Default::default()
        },
    )
}

/// The segments the `app` thread's `gpu.dmabuf_dma` steps went through, in order (`bus`, `ram`).
fn app_segment_kinds(r: &Report) -> Vec<String> {
    r.steps
        .iter()
        .filter(|s| s.thread == "app" && s.op == "gpu.dmabuf_dma")
        .map(|s| {
            let seg = s.result.split("segments=[").nth(1).unwrap();
            seg.split(':').next().unwrap().to_owned()
        })
        .collect()
}

#[test]
fn nic_segments_follow_the_gpu_buffer_bus_then_ram_then_bus() {
    let r = run_steps(&example("nic-follows-gpu.toml"), None, false);
    assert_eq!(r.outcome, Outcome::Passed, "{}", r.render_text());
    assert_eq!(
        app_segment_kinds(&r),
        ["bus", "bus", "ram", "ram", "bus", "bus"]
    );
    // The process's mapping of the buffer followed too: zapped at each move, refaulted at the new place.
    assert!(r.metrics["gpu.bo_cpu_pages_unmapped"] > 0);
    assert!(r.metrics["vm_object.faults"] > 0);
    assert!(r.metrics["dmabuf.mapped_pages.ram"] > 0);
    assert!(r.metrics["dmabuf.move_notify"] >= 2);
    // The RDMA NIC's dma-buf MR on gpu1's buffer: each of the two moves zapped it and the next WRITE
    // rebuilt it; every WRITE completed and its data was read back by the GPU (the steps' expectations).
    assert_eq!(r.metrics["rnic.dmabuf_faults"], 2);
    assert_eq!(r.metrics["rnic.wc.success"], 3);
}

/// `rdma.reg_mr` on a GPU buffer object: `bo` excludes `export`, `implicit` and `offset`.
#[test]
fn rdma_reg_mr_on_a_bo_rejects_export_and_offset() {
    let base = std::fs::read_to_string(format!(
        "{}/../../examples/nic-follows-gpu.toml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let line = r#"{ op = "rdma.reg_mr", dev = "rnic0", bo = "frame", len = "16KiB","#;
    assert!(base.contains(line));
    for (extra, msg) in [
        (" offset = 4096,", "`offset` is for an `export` MR"),
        (" implicit = true,", "not with `implicit` or `export`"),
    ] {
        let text = base.replace(line, &format!("{line}{extra}"));
        let e = parse("t.toml", &text).unwrap_err().to_string();
        assert!(e.contains(msg), "{e}");
    }
}

#[test]
fn nic_follows_gpu_is_clean_over_many_seeds() {
    let scn = example("nic-follows-gpu.toml");
    for seed in 0..48 {
        let r = run_steps(&scn, Some(seed), true);
        assert_eq!(
            r.outcome,
            Outcome::Passed,
            "seed {seed}: {}",
            r.render_text()
        );
    }
}

#[test]
fn skipping_the_peer_invalidation_on_eviction_is_a_violation() {
    let mut scn = example("nic-follows-gpu.toml");
    for d in &mut scn.devices {
        if d.kind == DeviceKind::Gpu {
            d.gpu.as_mut().unwrap().skip_peer_invalidation = true;
        }
    }
    for seed in 0..8 {
        let r = run_steps(&scn, Some(seed), true);
        let Outcome::OracleViolation(v) = &r.outcome else {
            panic!("seed {seed}: expected a violation, got {:?}", r.outcome);
        };
        assert!(v.contains("use after free"), "{v}");
    }
}

/// Returns the `key=N` figure of the `gpu.kernel` step of `thread`.
fn figure(r: &Report, thread: &str, key: &str) -> u64 {
    let s = r
        .steps
        .iter()
        .find(|s| s.thread == thread && s.op == "gpu.kernel")
        .unwrap();
    let f = s
        .result
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap();
    f.trim_end_matches("ns").parse().unwrap()
}

/// The directions UVM studies report (docs/gpu.md): the tree prefetcher cuts far faults and batches, and
/// the kernel runs faster, even at 150% oversubscription where every version evicts; larger batches (more
/// warps faulting at once) mean fewer batches and a shorter kernel.
#[test]
fn oversubscription_prefetch_lowers_faults_batches_and_kernel_time() {
    let r = run_steps(&example("gpu-oversubscription.toml"), None, false);
    assert_eq!(r.outcome, Outcome::Passed, "{}", r.render_text());
    let (off, on) = ("no-prefetch", "prefetch");
    assert!(figure(&r, on, "faults") * 4 < figure(&r, off, "faults"));
    assert!(figure(&r, on, "batches") < figure(&r, off, "batches"));
    assert!(figure(&r, on, "time") < figure(&r, off, "time"));
    assert!(figure(&r, off, "evicted_chunks") > 0);
    assert!(figure(&r, on, "evicted_chunks") > 0);
    assert_eq!(figure(&r, off, "prefetched"), 0);
    // Twice the warps put twice the faults in each batch: the same faults in half the batches, faster (the
    // direction of Kim et al.'s batch-size result).
    let more = "more-warps";
    assert_eq!(figure(&r, more, "faults"), figure(&r, off, "faults"));
    assert_eq!(figure(&r, more, "batches") * 2, figure(&r, off, "batches"));
    assert!(figure(&r, more, "time") < figure(&r, off, "time"));
}

#[test]
fn gpu_keys_on_another_kind_of_device_are_input_errors() {
    let text = r#"
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
[[device]]
name = "nic0"
kind = "pci"
vram = "1MiB"
"#;
    let e = parse("t.toml", text).unwrap_err().to_string();
    assert!(e.contains("`vram` is for a `kind = \"gpu\"` device"), "{e}");
}

#[test]
fn a_window_larger_than_vram_is_an_input_error() {
    let text = std::fs::read_to_string(format!(
        "{}/../../examples/nic-follows-gpu.toml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
    .replace("bar_window = \"256KiB\"", "bar_window = \"1MiB\"");
    let e = parse("t.toml", &text).unwrap_err().to_string();
    assert!(e.contains("larger than `vram`"), "{e}");
}

/// The beyond-mainline option is off by default: a NIC mirroring a managed range the GPU holds migrates the
/// pages back to RAM and maps them through its IOMMU; with `beyond_mainline_p2p = true` it maps their bus
/// addresses (no IOVA) and nothing migrates back; the data is the same either way.
#[test]
fn beyond_mainline_p2p_is_off_by_default_and_maps_bus_addresses_when_on() {
    let text = include_str!("data/beyond-mainline-p2p.toml");
    let on = parse("beyond-mainline-p2p.toml", text).unwrap();
    let default = parse(
        "default.toml",
        &text.replace("beyond_mainline_p2p = true\n", ""),
    )
    .unwrap();
    assert!(
        on.devices
            .iter()
            .any(|d| d.gpu.as_ref().is_some_and(|g| g.beyond_mainline_p2p))
    );
    assert!(
        default
            .devices
            .iter()
            .all(|d| d.gpu.as_ref().is_none_or(|g| !g.beyond_mainline_p2p))
    );
    let m = |scn: &Scenario, k: &str| {
        let r = run_steps(scn, None, false);
        assert_eq!(r.outcome, Outcome::Passed, "{}", r.render_text());
        r.metrics.get(k).copied().unwrap_or(0)
    };
    assert_eq!(m(&default, "cpu.migrate_to_ram"), 16);
    // The mirror reserves its range's IOVA once either way (hmm_dma_map_alloc); what differs is whether
    // pages are linked into it.
    assert_eq!(m(&default, "dma.iova_linked_pages"), 16);
    assert_eq!(m(&default, "gpu.beyond_mainline_p2p"), 0);
    assert_eq!(m(&on, "cpu.migrate_to_ram"), 0, "the pages stayed in VRAM");
    assert_eq!(
        m(&on, "dma.iova_linked_pages"),
        0,
        "bus addresses, no IOVA linked"
    );
    assert_eq!(
        m(&on, "gpu.beyond_mainline_p2p"),
        1,
        "the report counts the option"
    );
    let banner = |scn: &Scenario| {
        run_steps(scn, None, false)
            .render_text()
            .contains("BEYOND MAINLINE")
    };
    assert!(banner(&on), "the report names the option");
    assert!(!banner(&default));
}
