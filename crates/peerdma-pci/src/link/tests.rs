//! Unit tests of the parent module.

use super::*;

fn reference_link(generation: u8, width: u8) -> LinkConfig {
    // numbers.md §1 reference: MPS 256, MRRS 512, 64-bit addresses, no ECRC, RCB 64, split at MPS.
    LinkConfig::new(generation, width, 256, 512).unwrap()
}

/// numbers.md §1, every reference row: (gen, width, payload, write Gb/s, read Gb/s).
const REFERENCE: &[(u8, u8, u64, f64, f64)] = &[
    (3, 8, 64, 42.10, 44.10),
    (3, 8, 128, 48.75, 50.06),
    (3, 8, 256, 52.92, 53.69),
    (3, 8, 512, 52.92, 53.69),
    (3, 8, 1024, 52.92, 53.69),
    (3, 8, 4096, 52.92, 53.69),
    (3, 8, 65536, 52.92, 53.69),
    (3, 8, 1500, 52.81, 53.60),
    (4, 16, 256, 207.91, 210.92),
    (5, 16, 256, 415.82, 421.84),
];

#[test]
fn numbers_md_section_1_reference_rows_reproduce_within_a_hundredth() {
    for &(generation, width, size, write, read) in REFERENCE {
        let link = reference_link(generation, width);
        let w = link.effective_write_gbps(size);
        let r = link.effective_read_gbps(size);
        assert!(
            (w - write).abs() < 0.01 && ((w * 100.0).round() / 100.0 - write).abs() < 1e-9,
            "Gen{generation} x{width} {size} B write: got {w}, want {write}"
        );
        assert!(
            (r - read).abs() < 0.01 && ((r * 100.0).round() / 100.0 - read).abs() < 1e-9,
            "Gen{generation} x{width} {size} B read: got {r}, want {read}"
        );
    }
}

#[test]
fn embedded_dll_tables_cover_every_generation_width_and_mps() {
    let t = parse_tables(DLL_TABLES_TOML).unwrap();
    assert_eq!(
        (t.dllp_bytes, t.skip_interval_bytes, t.skip_length_bytes),
        (8, 1538, 4)
    );
    for generation in 1..=7 {
        for width in WIDTHS {
            for m in 0..6 {
                let mps = 128u32 << m;
                assert!(t.ack_limit.lookup(generation, width, mps).is_some());
                assert!(t.fc_update.lookup(generation, width, mps).is_some());
                LinkConfig::new(generation, width, mps, 4096).unwrap();
            }
        }
    }
    // Spot checks against the spec file.
    assert_eq!(t.ack_limit.lookup(3, 8, 256), Some(203));
    assert_eq!(t.fc_update.lookup(1, 32, 2048), Some(248));
    assert_eq!(t.ack_limit.lookup(1, 32, 2048), Some(148));
}

#[test]
fn incomplete_dll_table_is_reported() {
    let text = DLL_TABLES_TOML.replace("x16 = { mps128 = 144", "x16 = { mps127 = 144");
    let err = parse_tables(&text).unwrap_err();
    assert!(err.contains("missing"), "{err}");
}

#[test]
fn raw_rate_uses_the_generation_encoding() {
    assert!((LinkConfig::new(1, 1, 128, 128).unwrap().raw_gbps() - 2.0).abs() < 1e-12);
    assert!((LinkConfig::new(2, 4, 128, 128).unwrap().raw_gbps() - 16.0).abs() < 1e-12);
    let g3 = LinkConfig::new(3, 8, 128, 128).unwrap().raw_gbps();
    assert!((g3 - 64.0 * 128.0 / 130.0).abs() < 1e-12);
    let g6 = LinkConfig::new(6, 16, 128, 128).unwrap().raw_gbps();
    assert!((g6 - 1024.0 * 242.0 / 256.0).abs() < 1e-9);
    let g7 = LinkConfig::new(7, 1, 128, 128).unwrap().raw_gbps();
    assert!((g7 - 128.0 * 242.0 / 256.0).abs() < 1e-9);
}

#[test]
fn usable_rate_deducts_ack_fc_and_skip() {
    let link = reference_link(3, 8);
    let want = link.raw_gbps() * (1.0 - (16.0 / 203.0 + 4.0 / 1538.0));
    assert!((link.usable_tlp_gbps() - want).abs() < 1e-12);
}

#[test]
fn overheads_follow_addressing_and_ecrc() {
    let link = reference_link(3, 8);
    assert_eq!(link.request_overhead_bytes(), 24);
    assert_eq!(link.completion_overhead_bytes(), 20);
    let l32 = link.with_addr64(false).with_ecrc(true);
    assert_eq!(l32.request_overhead_bytes(), 8 + 4 + 8 + 4);
    assert_eq!(l32.completion_overhead_bytes(), 8 + 4 + 8 + 4);
    assert!(link.with_ecrc(true).effective_write_gbps(64) < link.effective_write_gbps(64));
}

#[test]
fn completions_split_at_rcb_when_asked() {
    let link = reference_link(3, 8);
    assert_eq!(link.completions(512), 2);
    let rcb = link.with_completion_split(CompletionSplit::Rcb);
    assert_eq!(rcb.completions(512), 8);
    assert!(rcb.effective_read_gbps(512) < link.effective_read_gbps(512));
}

#[test]
fn completions_never_span_read_requests_when_mrrs_is_below_mps() {
    let link = LinkConfig::new(3, 8, 512, 128).unwrap();
    assert_eq!(link.read_requests(1024), 8);
    assert_eq!(link.completions(1024), 8);
}

#[test]
fn zero_bytes_cost_nothing() {
    let link = reference_link(3, 8);
    assert!(link.effective_write_gbps(0) == 0.0);
    assert_eq!(link.write_time(0), SimDuration::ZERO);
    assert_eq!(link.read_time(0), SimDuration::ZERO);
}

#[test]
fn transfer_time_matches_the_effective_rate() {
    let link = reference_link(3, 8);
    let size: u32 = 1 << 20;
    let t = link.write_time(size.into()).as_nanos();
    let want = f64::from(size) * 8.0 / link.effective_write_gbps(size.into());
    let diff = (f64::from(u32::try_from(t).unwrap()) - want).abs();
    assert!(diff <= 1.0, "{t} vs {want}");
    assert!(link.read_time(size.into()) < link.write_time(size.into()));
}

#[test]
fn impossible_links_are_rejected_with_the_parameter() {
    let cases: &[(u8, u8, u32, u32, LinkParam)] = &[
        (0, 8, 256, 512, LinkParam::Generation),
        (8, 8, 256, 512, LinkParam::Generation),
        (3, 3, 256, 512, LinkParam::Width),
        (3, 12, 256, 512, LinkParam::Width),
        (3, 8, 100, 512, LinkParam::Mps),
        (3, 8, 64, 512, LinkParam::Mps),
        (3, 8, 8192, 512, LinkParam::Mps),
        (3, 8, 256, 384, LinkParam::Mrrs),
        (3, 8, 256, 8192, LinkParam::Mrrs),
    ];
    for &(g, w, mps, mrrs, want) in cases {
        match LinkConfig::new(g, w, mps, mrrs) {
            Err(Error::InvalidLink {
                node: None, param, ..
            }) => assert_eq!(param, want),
            other => panic!("gen {g} x{w} mps {mps} mrrs {mrrs}: {other:?}"),
        }
    }
    let err = reference_link(3, 8).with_rcb(32).unwrap_err();
    assert!(matches!(
        err,
        Error::InvalidLink {
            param: LinkParam::Rcb,
            ..
        }
    ));
    assert_eq!(
        err.to_string(),
        "invalid link: rcb 32, expected one of 64, 128, 256, 512"
    );
}

#[test]
fn spec_round_trips_through_toml() {
    let spec: LinkSpec = toml::from_str("gen = 4\nwidth = 16\nmps = 512\necrc = true").unwrap();
    assert_eq!(spec.mrrs, DEFAULT_MRRS);
    let link = LinkConfig::from_spec(&spec).unwrap();
    assert_eq!(link.spec(), spec);
    toml::from_str::<LinkSpec>("gen = 4\nwidth = 16\nspeed = 1").unwrap_err();
}

#[test]
fn shared_link_divides_capacity_equally() {
    let mut link = SharedLink::new(60.0);
    assert!((link.per_flow_gbps() - 60.0).abs() < 1e-12);
    link.join();
    let share = link.join();
    assert!((share - 30.0).abs() < 1e-12);
    let mut other = SharedLink::new(100.0);
    for _ in 0..4 {
        other.join();
    }
    assert!((SharedLink::bottleneck_gbps([&link, &other]) - 25.0).abs() < 1e-12);
    assert!(link.leave() && link.leave());
    assert!(!link.leave());
    assert_eq!(link.nr_flows(), 0);
}

#[test]
fn hop_latency_scales_with_hops() {
    assert_eq!(
        path_latency(4, DEFAULT_HOP_LATENCY),
        SimDuration::from_nanos(460)
    );
    assert_eq!(time_at_gbps(1000, 8.0), SimDuration::from_nanos(1000));
    assert_eq!(time_at_gbps(1, 0.0).as_nanos(), u64::MAX);
}
