//! A full valid scenario that uses every op and every `expect` key parses into the expected model.
#![expect(
    clippy::tests_outside_test_module,
    reason = "an integration-test crate is all tests"
)]

use peerdma_core::{Errno, SimDuration};
use peerdma_scenario::ops::{DmaApiOp, DmirrorOp, FileOp, MemOp, P2pOp, ProcOp};
use peerdma_scenario::{
    AddrExpr, Advice, DeviceKind, DeviceMemoryKind, DmaMode, Expect, ExportDecl, IommuMode, Loc,
    MmapFlags, Op, P2pDecl, Pattern, Prot, Segment, Signal, SleepSpec, TimeMode, WriteSource,
    parse,
};

/// The fixture: every op, every `expect` key.
const FULL: &str = include_str!("data/every_op.toml");

#[test]
fn full_scenario_with_every_op_parses() {
    let s = parse("full.toml", FULL).unwrap();

    assert_eq!(s.path, "full.toml");
    assert_eq!(s.sim.seed, 7);
    assert_eq!(s.sim.time, TimeMode::Zero);
    assert!(s.sim.explore);
    assert!((s.sim.jitter - 0.25).abs() < f64::EPSILON);
    assert_eq!(s.sim.time_limit, SimDuration::from_millis(10_000));
    assert_eq!(s.sim.memory, [256 << 20]);

    assert_eq!(s.files.len(), 2);
    assert_eq!(s.files[0].size, 4 << 20);
    assert_eq!(s.files[0].pattern.to_string(), "u32:index");
    assert_eq!(s.files[1].pattern, Pattern::Zero);
    assert_eq!(s.devices[0].kind, DeviceKind::Dmirror);
    assert_eq!(s.devices[0].memory, DeviceMemoryKind::Private);
    assert_eq!(s.devices[1].memory, DeviceMemoryKind::Coherent);
    assert_eq!(s.processes, ["main", "app"]);
    assert_eq!(s.forked_processes(), ["kid"]);
    assert_eq!(s.threads.len(), 3);
    assert_eq!(s.threads[0].process, "main");
    assert_eq!(s.threads[1].process, "kid");
    assert_eq!(s.threads[2].process, "app");
    assert!(s.threads[2].steps.is_empty());

    let mut names: Vec<&str> = s
        .threads
        .iter()
        .flat_map(|t| &t.steps)
        .map(|st| st.op.name())
        .collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(
        names,
        [
            "close",
            "dmirror.mmap",
            "dmirror.read",
            "dmirror.snapshot",
            "dmirror.write",
            "exit",
            "fork",
            "load",
            "madvise",
            "mmap",
            "mprotect",
            "munmap",
            "open",
            "pread",
            "pwrite",
            "sleep",
            "store",
            "wait"
        ],
        "the scenario uses every op"
    );
}

#[test]
fn steps_keep_their_values_and_locations() {
    let s = parse("full.toml", FULL).unwrap();
    let steps = &s.threads[0].steps;

    assert_eq!(steps[0].loc, Loc { line: 36, col: 3 });
    assert_eq!(
        steps[0].op,
        Op::Mem(MemOp::Mmap {
            name: Some("buf".into()),
            len: 4 << 20,
            prot: Prot::RW,
            flags: MmapFlags {
                anonymous: true,
                ..MmapFlags::default()
            },
            at: None,
            file: None,
            offset: 0,
            align: None,
        })
    );
    assert!(steps[0].expect.is_default());
    assert!(
        matches!(&steps[1].op, Op::Mem(MemOp::Mmap { align: Some(0x20_0000), flags, .. }) if flags.populate)
    );
    assert!(matches!(
        &steps[2].op,
        Op::Mem(MemOp::Mmap { file: Some(f), offset: 4096, flags, .. }) if f == "data" && flags.shared
    ));
    assert_eq!(steps[3].loc, Loc { line: 41, col: 3 });
    assert!(matches!(
        &steps[3].op,
        Op::Mem(MemOp::Mmap { at: Some(AddrExpr::Raw(0x7f00_0000_0000)), flags, .. }) if flags.fixed_noreplace
    ));
    assert_eq!(steps[3].expect.errno, Some(Some(Errno::EEXIST)));
    assert_eq!(
        steps[4].op,
        Op::Mem(MemOp::Munmap {
            at: AddrExpr::Sym {
                name: "buf".into(),
                offset: 2 << 20
            },
            len: 1 << 20
        })
    );
    assert!(matches!(
        steps[6].op,
        Op::Mem(MemOp::Madvise {
            advice: Advice::HugePage,
            ..
        })
    ));
    assert_eq!(steps[8].expect.signal, Some(Signal::Segv));
    assert_eq!(steps[9].expect.value, Some(0xffff_fbfc));
    assert_eq!(
        steps[10].expect.data,
        Some(Pattern::Segments(vec![
            Segment {
                len: Some(4096),
                pattern: "u32:-index-3".parse().unwrap()
            },
            Segment {
                len: None,
                pattern: "u32:-index-3".parse().unwrap()
            },
        ]))
    );
    assert!(matches!(
        &steps[11].op,
        Op::File(FileOp::Pwrite {
            offset: 4096,
            len: 4096,
            pattern: Pattern::Byte(0x5a),
            ..
        })
    ));
    assert_eq!(
        steps[14].expect,
        Expect {
            cpages: Some(2),
            faults: Some(1),
            data: Some("u32:-index-3".parse().unwrap()),
            ..Expect::default()
        }
    );
    assert!(matches!(
        &steps[15].op,
        Op::Dmirror(DmirrorOp::Write {
            src: WriteSource::Pattern(_),
            pages: 1,
            ..
        })
    ));
    assert!(matches!(
        &steps[16].op,
        Op::Dmirror(DmirrorOp::Write {
            src: WriteSource::Ptr(AddrExpr::Sym { offset: 4096, .. }),
            ..
        })
    ));
    assert_eq!(steps[16].expect.errno, Some(None));
    assert_eq!(steps[17].expect.bytes, Some(vec![1, 0x0a, 0x11, 0]));
    assert_eq!(steps[18].expect.bytes, Some(vec![0xff, 0x0a]));
    assert_eq!(steps[18].expect.errno, Some(Some(Errno::EINVAL)));
    assert_eq!(
        steps[21].op,
        Op::Proc(ProcOp::Sleep(SleepSpec::Fixed(SimDuration::from_nanos(
            1_500
        ))))
    );
    assert_eq!(
        steps[22].op,
        Op::Proc(ProcOp::Sleep(SleepSpec::Random(
            SimDuration::from_micros(1),
            SimDuration::from_millis(2)
        )))
    );
    assert_eq!(s.threads[1].steps[0].expect.errno, Some(None));
}

#[test]
fn minimal_scenario_uses_the_documented_defaults() {
    let s = parse("min.toml", "").unwrap();
    assert_eq!(s.sim.seed, 0);
    assert_eq!(s.sim.time, TimeMode::Calibrated);
    assert!(!s.sim.explore);
    assert_eq!(s.sim.time_limit, SimDuration::from_millis(60_000));
    assert_eq!(s.sim.memory, [1 << 30]);
    assert_eq!(s.processes, ["main"]);
    assert!(s.threads.is_empty());
}

#[test]
fn mapping_may_be_named_in_another_thread_or_later_in_the_file() {
    let text = r#"
[[thread]]
name = "user"
steps = [{ op = "store", at = "shared_buf+1KiB", pattern = "zero" }]

[[thread]]
name = "maker"
steps = [{ op = "mmap", name = "shared_buf", len = "4KiB", prot = "rw", flags = ["shared", "anonymous"] }]
"#;
    let s = parse("order.toml", text).unwrap();
    assert_eq!(s.threads.len(), 2);
}

#[test]
fn parse_file_reads_from_disk_and_reports_io_errors() {
    let dir = std::env::temp_dir().join(format!("peerdma-scenario-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("ok.toml");
    std::fs::write(&path, "[sim]\nseed = 3\n").unwrap();
    assert_eq!(peerdma_scenario::parse_file(&path).unwrap().sim.seed, 3);

    let missing = dir.join("missing.toml");
    let err = peerdma_scenario::parse_file(&missing).unwrap_err();
    assert_eq!(err.line, 0);
    assert!(
        err.message.starts_with("cannot read the scenario file"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn topology_table_is_kept_as_its_spec_and_builds() {
    let text = r#"
[topology]
cpu_allows_all_host_bridges = true

[[topology.host_bridge]]
name = "hb0"

[[topology.root_port]]
name = "rp0"
parent = "hb0"

[[topology.endpoint]]
name = "nvme0"
parent = "rp0"
bdf = "01:00.0"
bars = [ { index = 2, size = "1MiB", phys = "0x1000_0000" } ]
"#;
    let scn = parse("t.toml", text).unwrap();
    let spec = scn.topology.expect("the [topology] table is kept");
    assert!(spec.cpu_allows_all_host_bridges);
    assert_eq!(spec.endpoints[0].bars[0].size, 1 << 20);
    let topo = spec.build().unwrap();
    assert!(topo.lookup("nvme0").is_some());
    assert!(parse("t.toml", "[sim]\n").unwrap().topology.is_none());
}

/// PCI domain numbers are an `int` in Linux: a VMD controller's domains start at 0x10000
/// (`drivers/pci/controller/vmd.c`), past the 16 bits of an ACPI segment; the same BDF may appear in
/// such a domain and in domain 0.
#[test]
fn pci_domains_take_32_bits_as_vmd_domains_do() {
    let text = r#"
[[topology.host_bridge]]
name = "hb0"

[[topology.host_bridge]]
name = "vmd0"
domain = 0x10000

[[topology.root_port]]
name = "rp0"
parent = "hb0"

[[topology.root_port]]
name = "vrp0"
parent = "vmd0"

[[topology.endpoint]]
name = "nvme0"
parent = "rp0"
bdf = "01:00.0"

[[topology.endpoint]]
name = "nvme1"
parent = "vrp0"
bdf = "01:00.0"
"#;
    let scn = parse("t.toml", text).unwrap();
    let topo = scn.topology.unwrap().build().unwrap();
    let nvme1 = topo.lookup("nvme1").unwrap();
    assert_eq!(topo.domain_of(nvme1), Some(0x10000));
    let bdf = peerdma_core::Bdf::new(1, 0, 0).unwrap();
    assert_eq!(topo.by_bdf(0x10000, bdf), Some(nvme1));
    assert_eq!(topo.by_bdf(0, bdf), topo.lookup("nvme0"));
    let err = parse(
        "t.toml",
        "[[topology.host_bridge]]\nname = \"hb0\"\ndomain = 0x100000000\n",
    )
    .unwrap_err();
    assert!(err.message.contains("expected u32"), "{err}");
}

#[test]
fn topology_build_errors_point_at_the_node() {
    let text = "[[topology.host_bridge]]\nname = \"hb0\"\n\n[[topology.root_port]]\nname = \"rp0\"\nparent = \"hb1\"\n";
    let err = parse("t.toml", text).unwrap_err();
    assert_eq!((err.line, err.col), (6, 10), "{err}");
    assert!(err.message.contains("parent `hb1` does not exist"), "{err}");
}

/// The P2P fixture: every `pci` device key, every P2P / DMA op and expect key.
const P2P: &str = include_str!("data/every_p2p_op.toml");

fn sym(name: &str, offset: i64) -> AddrExpr {
    AddrExpr::Sym {
        name: name.into(),
        offset,
    }
}

#[test]
fn pci_devices_and_p2p_ops_parse_with_their_defaults() {
    let s = parse("p2p.toml", P2P).unwrap();

    // Devices: explicit and default `node`, `iommu` (default identity), `p2p` (default publish, size 0 =
    // rest of the BAR is not used here) and `export` (default offset 0, len 0 = to the end, revocable).
    let [ssd, gpu, nic] = &s.devices[..] else {
        panic!("three devices: {:?}", s.devices)
    };
    assert_eq!(
        (ssd.kind, gpu.kind, nic.kind),
        (DeviceKind::Pci, DeviceKind::Pci, DeviceKind::Pci)
    );
    assert_eq!(ssd.node.as_deref(), Some("nvme0"));
    assert_eq!(
        gpu.node.as_deref(),
        Some("gpu0"),
        "node defaults to the device name"
    );
    assert_eq!(nic.node.as_deref(), Some("nic0"));
    assert_eq!(ssd.iommu, IommuMode::DmaLazy);
    assert_eq!(gpu.iommu, IommuMode::Identity, "iommu defaults to identity");
    assert_eq!(nic.iommu, IommuMode::Dma);
    assert_eq!(
        ssd.p2p,
        [
            P2pDecl {
                bar: 2,
                size: 1 << 20,
                offset: 0,
                publish: true
            },
            P2pDecl {
                bar: 2,
                size: 2 << 20,
                offset: 4 << 20,
                publish: false
            },
        ]
    );
    assert!(ssd.exports.is_empty() && gpu.p2p.is_empty() && nic.p2p.is_empty());
    assert_eq!(
        gpu.exports,
        [
            ExportDecl {
                name: "vram".into(),
                bar: 4,
                offset: 1 << 20,
                len: 2 << 20,
                revocable: true
            },
            ExportDecl {
                name: "pinned_vram".into(),
                bar: 4,
                offset: 0,
                len: 0,
                revocable: false
            },
        ]
    );

    let steps = &s.threads[0].steps;
    let ops: Vec<&Op> = steps.iter().map(|st| &st.op).collect();
    let rw = Prot::RW;
    assert_eq!(
        *ops[0],
        Op::P2p(P2pOp::P2pmemMmap {
            dev: "ssd".into(),
            name: "cmb".into(),
            len: 64 << 10,
            prot: rw,
            shared: true,
            offset: 0
        }),
        "p2pmem.mmap defaults: rw, shared, offset 0"
    );
    assert_eq!(
        *ops[1],
        Op::P2p(P2pOp::P2pmemMmap {
            dev: "ssd".into(),
            name: "cmb2".into(),
            len: 8 << 10,
            prot: Prot::READ,
            shared: false,
            offset: 4 << 10
        })
    );
    assert_eq!(steps[1].expect.errno, Some(Some(Errno::EINVAL)));
    assert_eq!(
        *ops[2],
        Op::P2p(P2pOp::BarMmap {
            export: "vram".into(),
            name: "bar".into(),
            offset: 0,
            len: 64 << 10,
            prot: rw
        })
    );
    assert_eq!(
        *ops[3],
        Op::P2p(P2pOp::BarMmap {
            export: "pinned_vram".into(),
            name: "bar2".into(),
            offset: 8 << 10,
            len: 4 << 10,
            prot: Prot::READ
        })
    );
    assert_eq!(
        *ops[5],
        Op::Dma(DmaApiOp::Map {
            dev: "nic".into(),
            at: sym("cmb", 0),
            len: 64 << 10,
            mode: DmaMode::ShortTerm,
            write: false,
            p2p: false,
            name: "h".into()
        }),
        "dma.map defaults: short-term, no flags"
    );
    assert!(steps[5].expect.is_default());
    assert_eq!(
        *ops[6],
        Op::Dma(DmaApiOp::Map {
            dev: "nic".into(),
            at: sym("cmb", 4 << 10),
            len: 8 << 10,
            mode: DmaMode::LongTerm,
            write: true,
            p2p: true,
            name: "lt".into()
        })
    );
    assert_eq!(
        steps[6].expect,
        Expect {
            segments: Some(vec![
                ("bus".into(), 4096),
                ("host-bridge".into(), 4096),
                ("ram".into(), 4096)
            ]),
            pinned: Some(2),
            dma_addr: Some(0x3800_0000_1000),
            ..Expect::default()
        }
    );
    assert!(matches!(
        ops[7],
        Op::Dma(DmaApiOp::Map {
            mode: DmaMode::Mirror,
            ..
        })
    ));
    assert_eq!(steps[7].expect.errno, Some(Some(Errno::EFAULT)));
    assert_eq!(
        *ops[8],
        Op::Dma(DmaApiOp::SgWrite {
            handle: "h".into(),
            offset: 0,
            len: None,
            pattern: "byte:0x5a".parse().unwrap()
        }),
        "dma_sg.write defaults: offset 0, to the end of the range"
    );
    assert_eq!(
        *ops[9],
        Op::Dma(DmaApiOp::SgWrite {
            handle: "h".into(),
            offset: 4 << 10,
            len: Some(8 << 10),
            pattern: "u32:index".parse().unwrap()
        })
    );
    assert_eq!(
        *ops[10],
        Op::Dma(DmaApiOp::SgRead {
            handle: "h".into(),
            offset: 0,
            len: None
        })
    );
    assert_eq!(steps[10].expect.data, Some("byte:0x5a".parse().unwrap()));
    assert_eq!(
        *ops[11],
        Op::Dma(DmaApiOp::SgRead {
            handle: "h".into(),
            offset: 8 << 10,
            len: Some(4 << 10)
        })
    );
    assert_eq!(steps[11].expect.errno, Some(Some(Errno::EIO)));
    assert_eq!(
        *ops[12],
        Op::Dma(DmaApiOp::SgRelease { handle: "h".into() })
    );
    assert_eq!(
        *ops[13],
        Op::P2p(P2pOp::DmabufMoveNotify {
            export: "vram".into()
        })
    );
    assert_eq!(
        *ops[14],
        Op::P2p(P2pOp::DeviceRemove { dev: "gpu0".into() })
    );
    assert_eq!(steps[15].expect.signal, Some(Signal::Bus));
    assert_eq!(steps.len(), 16);
    assert_eq!(steps[6].loc, Loc { line: 84, col: 3 });
}

#[test]
fn memory_takes_one_size_per_numa_node_and_a_process_its_home_node() {
    let s = parse(
        "numa.toml",
        r#"[sim]
memory = ["512MiB", 268435456]

[[process]]
name = "near"

[[process]]
name = "far"
node = 1
"#,
    )
    .unwrap();
    assert_eq!(s.sim.memory, [512 << 20, 256 << 20]);
    assert_eq!(s.processes, ["main", "near", "far"]);
    assert_eq!(
        s.process_nodes.iter().collect::<Vec<_>>(),
        [(&"far".to_owned(), &1)],
        "only processes that set `node` are listed"
    );
}

#[test]
fn movable_lists_the_zone_movable_nodes_ascending_and_defaults_to_none() {
    let s = parse(
        "movable.toml",
        "[sim]\nmemory = [\"4MiB\", \"4MiB\", \"4MiB\"]\nmovable = [2, 1]\n",
    )
    .unwrap();
    assert_eq!(s.sim.movable, [1, 2]);
    let d = parse("plain.toml", "[sim]\nmemory = [\"4MiB\", \"4MiB\"]\n").unwrap();
    assert!(d.sim.movable.is_empty());
}
