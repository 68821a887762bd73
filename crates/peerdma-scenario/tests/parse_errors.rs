//! Every kind of input error is reported at the exact `line:col` of the offending token, with a message that
//! says what was expected. One row per malformed input.
#![expect(
    clippy::tests_outside_test_module,
    reason = "an integration-test crate is all tests"
)]

use peerdma_scenario::parse;

/// Lines 1–13 declare a device, a file and the start of a thread that maps `buf` (4 MiB) and opens fd `m`;
/// a row's steps start on line 14.
const PRELUDE: &str = r#"[[device]]
name = "mirror0"
kind = "dmirror"

[[file]]
name = "data"
size = "4MiB"

[[thread]]
name = "t0"
steps = [
  { op = "mmap", name = "buf", len = "4MiB", prot = "rw", flags = ["private", "anonymous"] },
  { op = "open", dev = "mirror0", fd = "m" },
"#;

/// Returns the prelude followed by `steps` (each on its own line, from line 14) and the end of the list.
fn steps(steps: &[&str]) -> String {
    let mut text = PRELUDE.to_owned();
    for step in steps {
        text.push_str("  ");
        text.push_str(step);
        text.push_str(",\n");
    }
    text.push_str("]\n");
    text
}

struct Row {
    name: &'static str,
    text: String,
    line: usize,
    col: usize,
    message: &'static str,
}

fn row(
    name: &'static str,
    text: impl Into<String>,
    line: usize,
    col: usize,
    message: &'static str,
) -> Row {
    Row {
        name,
        text: text.into(),
        line,
        col,
        message,
    }
}

fn rows() -> Vec<Row> {
    vec![
        // TOML syntax
        row(
            "toml syntax error",
            steps(&[r#"{ op = "exit" "x" }"#]),
            14,
            17,
            "invalid TOML",
        ),
        row(
            "toml duplicate key",
            "[sim]\nseed = 1\nseed = 2\n",
            3,
            1,
            "invalid TOML: duplicate key",
        ),
        // unknown keys
        row(
            "unknown top-level key",
            "[sim]\nseed = 1\n\n[simulation]\nseed = 2\n",
            4,
            2,
            "unknown key `simulation` in the top level; expected one of: sim, timing, topology, file, device, process, thread",
        ),
        // [timing]
        row(
            "unknown timing parameter (dotted key), nearest suggested",
            "[sim]\nseed = 1\n\n[timing]\nmm.cpu_faults = \"2us\"\n",
            5,
            4,
            "unknown timing parameter `mm.cpu_faults` in `[timing]`; did you mean `mm.cpu_fault`?",
        ),
        row(
            "unknown timing parameter (quoted key), its group listed",
            "[timing]\n\"iommu.pte\" = \"1us\"\n",
            2,
            1,
            "unknown timing parameter `iommu.pte` in `[timing]`; expected one of: iommu.iotlb_hit, \
             iommu.iotlb_miss, iommu.walk_per_level, iommu.invalidate, iommu.flush_all, iommu.pte_update",
        ),
        row(
            "unknown timing group",
            "[timing]\nmx.cpu_fault = \"2us\"\n",
            2,
            1,
            "unknown timing parameter `mx` in `[timing]`; expected one of: mm.syscall, mm.cpu_fault",
        ),
        row(
            "timing parameter under a [timing.group] header",
            "[timing.dmirror]\nioctl = \"1us\"\nioctls = 3\n",
            3,
            1,
            "unknown timing parameter `dmirror.ioctls` in `[timing]`; did you mean `dmirror.ioctl`?",
        ),
        row(
            "timing parameter with a size unit",
            "[timing]\nmm.cpu_fault = \"2KiB\"\n",
            2,
            16,
            "expected a time like `250ns`, `1.5us`, `2ms` or `1s` (units: ns, us, ms, s), found `2KiB`",
        ),
        row(
            "negative timing parameter (string)",
            "[timing]\nmm.swap_io = \"-80us\"\n",
            2,
            14,
            "expected a time of 0 or more for `mm.swap_io`, found `-80us`",
        ),
        row(
            "negative timing parameter (integer)",
            "[timing]\niommu.iotlb_miss = -5\n",
            2,
            20,
            "expected a time of 0 or more for `iommu.iotlb_miss`, found -5",
        ),
        row(
            "count parameter given a time",
            "[timing]\ndma.max_outstanding = \"2us\"\n",
            2,
            23,
            "expected an integer count for `dma.max_outstanding`, found a string",
        ),
        row(
            "timing parameter set twice (quoted and dotted)",
            "[timing]\n\"mm.cpu_fault\" = \"1us\"\nmm.cpu_fault = \"2us\"\n",
            3,
            4,
            "timing parameter `mm.cpu_fault` is set twice in `[timing]`",
        ),
        row(
            "timing group given a value",
            "[timing]\nmm = 3\n",
            2,
            6,
            "expected a group of timing parameters for `mm`",
        ),
        row(
            "[timing] not a table",
            "timing = 3\n",
            1,
            10,
            "expected the `[timing]` table, found an integer",
        ),
        row(
            "unknown key in [sim]",
            "[sim]\nsed = 1\n",
            2,
            1,
            "unknown key `sed` in the `[sim]` table; expected one of: seed, time",
        ),
        row(
            "unknown key in a step",
            steps(&[r#"{ op = "store", at = "buf", patern = "zero" }"#]),
            14,
            31,
            "unknown key `patern` in a `store` step; expected one of: op, at, len, pattern, expect",
        ),
        row(
            "key of another op in a step",
            steps(&[r#"{ op = "load", at = "buf", pattern = "zero" }"#]),
            14,
            30,
            "unknown key `pattern` in a `load` step",
        ),
        row(
            "unknown key in expect",
            steps(&[r#"{ op = "load", at = "buf", expect = { erno = "EFAULT" } }"#]),
            14,
            41,
            "unknown key `erno` in `expect`; expected one of: errno, data, value, signal",
        ),
        row(
            "expect key not checked for this op",
            steps(&[
                r#"{ op = "dmirror.snapshot", fd = "m", at = "buf", pages = 1, expect = { data = "zero" } }"#,
            ]),
            14,
            74,
            "`expect.data` is not checked for a `dmirror.snapshot` step; expected one of: errno, cpages, faults, bytes",
        ),
        // wrong types and missing keys
        row(
            "wrong type",
            "[sim]\nseed = \"7\"\n",
            2,
            8,
            "expected an integer for `seed`, found a string",
        ),
        row(
            "pages must be an integer",
            steps(&[r#"{ op = "dmirror.read", fd = "m", at = "buf", pages = "2" }"#]),
            14,
            56,
            "expected an integer number of pages for `pages`, found a string",
        ),
        row(
            "step is not a table",
            steps(&[r#""mmap""#]),
            14,
            3,
            "expected a step as an inline table like `{ op = \"mmap\", ... }`, found a string",
        ),
        row(
            "missing required key",
            steps(&[r#"{ op = "munmap", at = "buf" }"#]),
            14,
            3,
            "a `munmap` step needs `len` (a size like `4KiB` or `16 pages`)",
        ),
        row(
            "missing op",
            steps(&[r#"{ at = "buf" }"#]),
            14,
            3,
            "a step needs `op`; expected one of: mmap, munmap",
        ),
        row(
            "unknown op",
            steps(&[r#"{ op = "mlock" }"#]),
            14,
            10,
            "unknown op `mlock`; expected one of: mmap",
        ),
        row(
            "file section is not an array of tables",
            "[file]\nname = \"x\"\n",
            1,
            1,
            "expected `[[file]]` tables (an array of tables), found a table",
        ),
        row(
            "[sim] is not a table",
            "sim = 5\n",
            1,
            7,
            "expected the `[sim]` table, found an integer",
        ),
        row(
            "expect is not a table",
            steps(&[r#"{ op = "exit", expect = "EFAULT" }"#]),
            14,
            27,
            "expected an `expect` table like `{ errno = \"EFAULT\" }`, found a string",
        ),
        row(
            "anonymous file mapping",
            steps(&[
                r#"{ op = "mmap", len = 4096, prot = "r", flags = ["shared", "anonymous"], file = "data" }"#,
            ]),
            14,
            82,
            "a file mapping cannot be `anonymous`",
        ),
        row(
            "sleep with two durations",
            steps(&[r#"{ op = "sleep", for = "1us", random = ["1us", "2us"] }"#]),
            14,
            3,
            "a `sleep` step needs exactly one of `for = TIME` or `random = [MIN, MAX]`",
        ),
        row(
            "dmirror.write with two sources",
            steps(&[
                r#"{ op = "dmirror.write", fd = "m", at = "buf", pages = 1, ptr = "buf", pattern = "zero" }"#,
            ]),
            14,
            3,
            "a `dmirror.write` step needs exactly one source",
        ),
        // units
        row(
            "bad size unit",
            steps(&[r#"{ op = "munmap", at = "buf", len = "4 KB B" }"#]),
            14,
            38,
            "expected a size like `4KiB`, `0x1000` or `16 pages` (units: B, KiB, MiB, GiB, TiB, KB, MB, GB, page, \
             pages), found `4 KB B`",
        ),
        row(
            "size that is not a whole number of bytes",
            steps(&[r#"{ op = "munmap", at = "buf", len = "0.3B" }"#]),
            14,
            38,
            "expected a whole number of bytes, found `0.3B`",
        ),
        row(
            "bad time unit",
            steps(&[r#"{ op = "sleep", for = "1 hour" }"#]),
            14,
            25,
            "expected a time like `250ns`, `1.5us`, `2ms` or `1s` (units: ns, us, ms, s), found `1 hour`",
        ),
        row(
            "bad offset unit in an address",
            steps(&[r#"{ op = "store", at = "buf+4 KB B", pattern = "zero" }"#]),
            14,
            24,
            "bad offset in address `buf+4 KB B`: expected a size like `4KiB`",
        ),
        // names
        row(
            "unknown mapping name",
            steps(&[r#"{ op = "store", at = "bfu+4KiB", pattern = "zero" }"#]),
            14,
            24,
            "unknown mapping `bfu` in address `bfu+4KiB`; mappings defined: buf",
        ),
        row(
            "symbolic address beyond its mapping",
            steps(&[r#"{ op = "load", at = "buf+0x400001", len = 1 }"#]),
            14,
            23,
            "address `buf+0x400001` lies beyond the end of mapping `buf` (0x400000 bytes); expected an offset from 0 \
             to 0x400000",
        ),
        row(
            "symbolic address below its mapping",
            steps(&[r#"{ op = "dmirror.read", fd = "m", at = "buf-4KiB", pages = 1 }"#]),
            14,
            41,
            "address `buf-4KiB` lies below the start of mapping `buf`",
        ),
        row(
            "unknown device",
            steps(&[r#"{ op = "open", dev = "mirror9", fd = "m2" }"#]),
            14,
            24,
            "unknown device `mirror9`; expected one of: mirror0",
        ),
        row(
            "unknown fd",
            steps(&[r#"{ op = "close", fd = "mm" }"#]),
            14,
            24,
            "unknown fd `mm`; expected one of: m",
        ),
        row(
            "unknown file",
            steps(&[r#"{ op = "pread", file = "dta", len = 4 }"#]),
            14,
            26,
            "unknown file `dta`; expected one of: data",
        ),
        row(
            "unknown process of a thread",
            "[[thread]]\nname = \"t\"\nprocess = \"ghost\"\nsteps = []\n",
            3,
            11,
            "unknown process `ghost`; expected one of: main",
        ),
        row(
            "unknown child of a wait",
            steps(&[
                r#"{ op = "fork", child = "kid" }"#,
                r#"{ op = "wait", child = "kdi" }"#,
            ]),
            15,
            26,
            "unknown child process `kdi`; expected one of: kid",
        ),
        row(
            "duplicate thread name",
            "[[thread]]\nname = \"t\"\nsteps = []\n\n[[thread]]\nname = \"t\"\nsteps = []\n",
            6,
            8,
            "duplicate thread name `t`; the first one is at line 2",
        ),
        row(
            "duplicate device name",
            format!("{PRELUDE}]\n[[device]]\nname = \"mirror0\"\nkind = \"dmirror\"\n"),
            16,
            8,
            "duplicate device name `mirror0`; the first one is at line 2",
        ),
        row(
            "fork child reuses a process name",
            steps(&[r#"{ op = "fork", child = "main" }"#]),
            14,
            26,
            "duplicate process name `main`: a process named `main` always exists",
        ),
        // lengths and addresses
        row(
            "zero length",
            steps(&[r#"{ op = "munmap", at = "buf", len = 0 }"#]),
            14,
            38,
            "expected a non-zero length for `len`, found 0",
        ),
        row(
            "overflowing length",
            steps(&[r#"{ op = "munmap", at = "buf", len = "16777216TiB" }"#]),
            14,
            38,
            "expected a value below 2^64, found `16777216TiB`, which overflows",
        ),
        row(
            "overflowing address range",
            steps(&[r#"{ op = "munmap", at = 0xffff_ffff_ffff_f000, len = "8KiB" }"#]),
            14,
            54,
            "address 0xfffffffffffff000 + length 0x2000 overflows; expected a range that ends below 2^64",
        ),
        row(
            "overflowing raw address",
            steps(&[r#"{ op = "munmap", at = "0x10000000000000000", len = 1 }"#]),
            14,
            25,
            "expected an address below 2^64, found `0x10000000000000000`, which overflows",
        ),
        // errno, patterns, expectations
        row(
            "bad errno name",
            steps(&[r#"{ op = "munmap", at = "buf", len = 1, expect = { errno = "EFOO" } }"#]),
            14,
            60,
            "unknown errno `EFOO`; expected an errno name like `EFAULT`",
        ),
        row(
            "bad pattern",
            steps(&[r#"{ op = "store", at = "buf", pattern = "u32:idx" }"#]),
            14,
            41,
            "expected a pattern: `zero`, `byte:0xNN`, `u32:index`, `u32:index+N`, `u32:-index`, `u32:-index-N` or \
             `u32:N`, found `u32:idx`",
        ),
        row(
            "segment without len before the last one",
            steps(&[
                r#"{ op = "store", at = "buf", pattern = [{ pattern = "zero" }, { pattern = "u32:index" }] }"#,
            ]),
            14,
            42,
            "only the last segment may omit `len`",
        ),
        row(
            "byte value above 0xff",
            steps(&[
                r#"{ op = "dmirror.snapshot", fd = "m", at = "buf", pages = 2, expect = { bytes = [1, 0x100] } }"#,
            ]),
            14,
            86,
            "expected a byte from 0 to 0xff in `bytes`, found 0x100",
        ),
        row(
            "value needs a small load",
            steps(&[r#"{ op = "load", at = "buf", len = "4KiB", expect = { value = 1 } }"#]),
            14,
            63,
            "`expect.value` needs a `load` with `len` of 1, 2, 4 or 8 bytes, found len 4096",
        ),
        row(
            "random with min above max",
            steps(&[r#"{ op = "sleep", random = ["2ms", "1ms"] }"#]),
            14,
            28,
            "expected MIN <= MAX in `random`, found [2.000ms, 1.000ms]",
        ),
        row(
            "jitter out of range",
            "[sim]\njitter = 1.5\n",
            2,
            10,
            "expected `jitter` between 0.0 and 1.0, found 1.5",
        ),
        row(
            "a bad node size in a memory list",
            "[sim]\nmemory = [\"512MiB\", \"3KiB\"]\n",
            2,
            21,
            "expected a non-zero multiple of the 4 KiB page size for `memory`, found 0xc00",
        ),
        row(
            "a node size of the wrong type in a memory list",
            "[sim]\nmemory = [\"4MiB\", true]\n",
            2,
            19,
            "expected a size like `4KiB` or `16 pages` (or an integer number of bytes) for `memory`, found a boolean",
        ),
        row(
            "an empty memory list",
            "[sim]\nmemory = []\n",
            2,
            10,
            "expected 1 to 64 node sizes for `memory`, found 0",
        ),
        row(
            "a process node beyond the memory list",
            "[sim]\nmemory = [\"4MiB\", \"4MiB\"]\n\n[[process]]\nname = \"far\"\nnode = 2\n",
            6,
            8,
            "expected a NUMA node below 2 for `node` (nodes are 0 to 1: one per `[sim] memory` entry), found 2",
        ),
        row(
            "a movable node beyond the memory list",
            "[sim]\nmemory = [\"4MiB\", \"4MiB\"]\nmovable = [2]\n",
            3,
            12,
            "expected a NUMA node below 2 for `movable` (nodes are 0 to 1: one per `[sim] memory` entry), found 2",
        ),
        row(
            "node 0 movable",
            "[sim]\nmemory = [\"4MiB\", \"4MiB\"]\nmovable = [0]\n",
            3,
            12,
            "node 0 cannot be `movable`: it holds the zero page and kernel memory",
        ),
        row(
            "a movable node listed twice",
            "[sim]\nmemory = [\"4MiB\", \"4MiB\", \"4MiB\"]\nmovable = [2, 1, 2]\n",
            3,
            18,
            "node 2 is listed twice in `movable`",
        ),
        row(
            "movable not a list",
            "[sim]\nmemory = [\"4MiB\", \"4MiB\"]\nmovable = 1\n",
            3,
            11,
            "expected a list of NUMA node ids for `movable`, found an integer",
        ),
        row(
            "a process node with one node",
            "[[process]]\nname = \"far\"\nnode = 1\n",
            3,
            8,
            "expected a NUMA node below 1 for `node` (the only node is 0",
        ),
        row(
            "a negative process node",
            "[[process]]\nname = \"far\"\nnode = -1\n",
            3,
            8,
            "expected an integer of 0 or more for `node`, found -1",
        ),
        row(
            "mmap without private or shared",
            steps(&[r#"{ op = "mmap", len = "4KiB", prot = "rw", flags = ["anonymous"] }"#]),
            14,
            53,
            "expected exactly one of `private` or `shared` in `flags`",
        ),
        row(
            "bad protection",
            steps(&[r#"{ op = "mprotect", at = "buf", len = 4096, prot = "wr" }"#]),
            14,
            53,
            "expected a protection `none`, `r`, `rw`, `rx`, `rwx` or `w` for `prot`, found `wr`",
        ),
        row(
            "bad mapping name",
            steps(&[
                r#"{ op = "mmap", name = "my-buf", len = "4KiB", prot = "rw", flags = ["private", "anonymous"] }"#,
            ]),
            14,
            25,
            "expected a mapping name (a letter or `_`, then letters, digits or `_`) for `name`, found `my-buf`",
        ),
    ]
}

/// A PCIe tree for the `pci` device rows: `nvme0` (BAR 2, 256 MiB) and `nic0` (no BAR) under the two
/// downstream ports of switch `sw0`.
const TOPOLOGY: &str = r#"[topology]

[[topology.socket]]
name = "s0"

[[topology.host_bridge]]
name = "hb0"
socket = "s0"

[[topology.root_port]]
name = "rp0"
parent = "hb0"
bdf = "00:01.0"

[[topology.switch]]
name = "sw0"
parent = "rp0"
bdf = "01:00.0"
downstream = [
  { name = "sw0.d0", bdf = "02:00.0" },
  { name = "sw0.d1", bdf = "02:01.0" },
]

[[topology.endpoint]]
name = "nvme0"
parent = "sw0.d0"
bdf = "03:00.0"
bars = [ { index = 2, size = "256MiB", phys = "0x3800_0000_0000", prefetchable = true } ]

[[topology.endpoint]]
name = "nic0"
parent = "sw0.d1"
bdf = "04:00.0"

"#;

/// A P2P provider with a BAR export, a client behind an IOMMU and a dmirror, then a thread that maps `buf`
/// (64 KiB), maps `cmb` from the provider's p2pmem and holds the `dma.map` handle `h`.
const PCI_DEVICES: &str = r#"[[device]]
name = "nvme0"
kind = "pci"
p2p = [ { bar = 2, size = "1MiB" } ]
export = [ { name = "vram", bar = 2, offset = "1MiB", len = "1MiB" } ]

[[device]]
name = "nic0"
kind = "pci"
iommu = "dma"

[[device]]
name = "mirror0"
kind = "dmirror"

[[thread]]
name = "t0"
steps = [
  { op = "mmap", name = "buf", len = "64KiB", prot = "rw", flags = ["private", "anonymous"] },
  { op = "p2pmem.mmap", dev = "nvme0", name = "cmb", len = "64KiB" },
  { op = "dma.map", dev = "nic0", at = "buf", len = "64KiB", name = "h" },
"#;

/// The `pci` scenario with `steps` appended to the thread.
fn pci(steps: &[&str]) -> String {
    let mut text = format!("{TOPOLOGY}{PCI_DEVICES}");
    for step in steps {
        text.push_str("  ");
        text.push_str(step);
        text.push_str(",\n");
    }
    text.push_str("]\n");
    text
}

/// `text` with its one occurrence of `from` replaced by `to`.
fn edit(text: &str, from: &str, to: &str) -> String {
    assert_eq!(text.matches(from).count(), 1, "`{from}` must occur once");
    text.replacen(from, to, 1)
}

/// The 1-based line and column of the `^` in `needle`, which (without the `^`) must occur exactly once in
/// `text`: `dev = ^"nic9"` is the column of the opening quote of `"nic9"`.
fn locate(text: &str, needle: &str) -> (usize, usize) {
    let marker = needle.find('^').expect("needle has a ^");
    let plain = needle.replacen('^', "", 1);
    assert_eq!(
        text.matches(&plain).count(),
        1,
        "`{plain}` must occur exactly once"
    );
    let at = text.find(&plain).expect("counted once") + marker;
    let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    (
        text[..at].matches('\n').count() + 1,
        text[line_start..at].chars().count() + 1,
    )
}

/// A row whose error is expected at the `^` of `needle`.
fn row_at(name: &'static str, text: impl Into<String>, needle: &str, message: &'static str) -> Row {
    let text = text.into();
    let (line, col) = locate(&text, needle);
    row(name, text, line, col, message)
}

/// Rows for the `pci` device keys and the P2P / DMA ops.
fn pci_rows() -> Vec<Row> {
    let base = pci(&[]);
    vec![
        // dma.raw and expect.violation
        row_at(
            "dma.raw at an unaligned address",
            pci(&[r#"{ op = "dma.raw", dev = "nic0", addr = 0x1234 }"#]),
            "addr = ^0x1234",
            "expected a page-aligned DMA address for `addr`, found 0x1234",
        ),
        row_at(
            "dma.raw of a partial page",
            pci(&[r#"{ op = "dma.raw", dev = "nic0", addr = 0x1000, len = "100" }"#]),
            r#"len = ^"100""#,
            "expected a whole number of 4 KiB pages for `len`, found 100 bytes",
        ),
        row_at(
            "an unknown violation kind",
            pci(&[
                r#"{ op = "dma.raw", dev = "nic0", addr = 0x1000, expect = { violation = "stale" } }"#,
            ]),
            r#"violation = ^"stale""#,
            "stale_translation",
        ),
        row_at(
            "expect.violation on an op that does not check it",
            pci(&[
                r#"{ op = "dma.map", dev = "nic0", at = "buf", len = "4KiB", name = "h2", expect = { violation = "routing" } }"#,
            ]),
            "^violation",
            "`expect.violation` is not checked for a `dma.map` step",
        ),
        // dangling or wrong-kind references
        row_at(
            "dma.map of an unknown device",
            pci(&[r#"{ op = "dma.map", dev = "nic9", at = "buf", len = "4KiB", name = "h2" }"#]),
            r#"dev = ^"nic9""#,
            "unknown pci device `nic9`; expected one of: nic0, nvme0",
        ),
        row_at(
            "dma.map by a dmirror",
            pci(&[r#"{ op = "dma.map", dev = "mirror0", at = "buf", len = "4KiB", name = "h2" }"#]),
            r#"dev = ^"mirror0""#,
            "device `mirror0` is a `dmirror`, not a `kind = \"pci\"` device; expected one of: nic0, nvme0",
        ),
        row_at(
            "p2pmem.mmap of an unknown device",
            pci(&[r#"{ op = "p2pmem.mmap", dev = "ssd", name = "p", len = "4KiB" }"#]),
            r#"dev = ^"ssd""#,
            "unknown pci device `ssd`",
        ),
        row_at(
            "p2pmem.mmap of a dmirror",
            pci(&[r#"{ op = "p2pmem.mmap", dev = "mirror0", name = "p", len = "4KiB" }"#]),
            r#"dev = ^"mirror0""#,
            "device `mirror0` is a `dmirror`, not a `kind = \"pci\"` device",
        ),
        row_at(
            "device.remove of an unknown device",
            pci(&[r#"{ op = "device.remove", dev = "gpu0" }"#]),
            r#"dev = ^"gpu0""#,
            "unknown pci device `gpu0`",
        ),
        row_at(
            "bar.mmap of an unknown export",
            pci(&[r#"{ op = "bar.mmap", export = "vrma", name = "v", len = "4KiB" }"#]),
            r#"export = ^"vrma""#,
            "unknown export `vrma`; expected one of: vram",
        ),
        row_at(
            "dmabuf.move_notify of an unknown export",
            pci(&[r#"{ op = "dmabuf.move_notify", export = "fb" }"#]),
            r#"export = ^"fb""#,
            "unknown export `fb`",
        ),
        row_at(
            "dma_sg.read of an unknown handle",
            pci(&[r#"{ op = "dma_sg.read", handle = "hh" }"#]),
            r#"handle = ^"hh""#,
            "unknown dma handle `hh`; expected one of: h",
        ),
        row_at(
            "dma_sg.write of an unknown handle",
            pci(&[r#"{ op = "dma_sg.write", handle = "g", pattern = "zero" }"#]),
            r#"handle = ^"g""#,
            "unknown dma handle `g`",
        ),
        row_at(
            "dma_sg.release of an unknown handle",
            pci(&[r#"{ op = "dma_sg.release", handle = "k" }"#]),
            r#"handle = ^"k""#,
            "unknown dma handle `k`",
        ),
        row_at(
            "open of a pci device",
            pci(&[r#"{ op = "open", dev = "nic0", fd = "f" }"#]),
            r#"{ op = "open", dev = ^"nic0""#,
            "device `nic0` is a `kind = \"pci\"` device, which has no device file; `open` needs a `dmirror` \
             (expected one of: mirror0)",
        ),
        row_at(
            "a handle used with no dma.map at all",
            steps(&[r#"{ op = "dma_sg.release", handle = "h" }"#]),
            r#"handle = ^"h""#,
            "unknown dma handle `h`; none is defined",
        ),
        // `pci` device declarations
        row_at(
            "pci device without a topology",
            "[[device]]\nname = \"nvme0\"\nkind = \"pci\"\n",
            r#"name = ^"nvme0""#,
            "a `kind = \"pci\"` device needs a `[topology]` with its PCI function",
        ),
        row_at(
            "pci device whose name is not a topology node",
            edit(
                &base,
                r#"name = "nic0"
kind"#,
                r#"name = "nic1"
kind"#,
            ),
            r#"name = ^"nic1""#,
            "no node `nic1` in `[topology]` for device `nic1`; expected one of: nvme0, nic0",
        ),
        row_at(
            "node not in the topology",
            edit(&base, r#"iommu = "dma""#, r#"node = "nic7""#),
            r#"node = ^"nic7""#,
            "no node `nic7` in `[topology]` for device `nic0`",
        ),
        row_at(
            "node that is a switch port",
            edit(&base, r#"iommu = "dma""#, r#"node = "sw0.d1""#),
            r#"node = ^"sw0.d1""#,
            "node `sw0.d1` is a switch downstream port, expected an endpoint for a `pci` device",
        ),
        row_at(
            "node that is a root port",
            edit(&base, r#"iommu = "dma""#, r#"node = "rp0""#),
            r#"node = ^"rp0""#,
            "expected an endpoint for a `pci` device",
        ),
        row_at(
            "two pci devices on one node",
            edit(&base, r#"iommu = "dma""#, r#"node = "nvme0""#),
            r#"node = ^"nvme0""#,
            "node `nvme0` already belongs to device `nvme0`",
        ),
        row_at(
            "bad iommu keyword",
            edit(&base, r#"iommu = "dma""#, r#"iommu = "strict""#),
            r#"iommu = ^"strict""#,
            "expected one of `identity`, `dma`, `dma-lazy` for `iommu`, found `strict`",
        ),
        row_at(
            "node on a dmirror",
            edit(
                &base,
                "kind = \"dmirror\"\n",
                "kind = \"dmirror\"\nnode = \"nic0\"\n",
            ),
            r#"node = ^"nic0""#,
            "`node` is for a `kind = \"pci\"` device, not a `dmirror`",
        ),
        row_at(
            "iommu on a dmirror",
            edit(
                &base,
                "kind = \"dmirror\"\n",
                "kind = \"dmirror\"\niommu = \"dma-lazy\"\n",
            ),
            r#"iommu = ^"dma-lazy""#,
            "`iommu` is for a `kind = \"pci\"` device, not a `dmirror`",
        ),
        row_at(
            "own_migrations on a pci device",
            edit(&base, r#"iommu = "dma""#, r#"own_migrations = "ignore""#),
            r#"own_migrations = ^"ignore""#,
            "`own_migrations` is for a `kind = \"dmirror\"` device",
        ),
        row_at(
            "bad own_migrations keyword",
            edit(
                &base,
                "kind = \"dmirror\"\n",
                "kind = \"dmirror\"\nown_migrations = \"skip\"\n",
            ),
            r#"own_migrations = ^"skip""#,
            "expected one of `ignore`, `invalidate` for `own_migrations`, found `skip`",
        ),
        row_at(
            "p2p BAR the node does not have",
            edit(&base, r"p2p = [ { bar = 2,", r"p2p = [ { bar = 4,"),
            "bar = ^4",
            "node `nvme0` has no BAR 4; expected one of: 2",
        ),
        row_at(
            "export BAR the node does not have",
            edit(&base, r#""vram", bar = 2"#, r#""vram", bar = 0"#),
            "bar = ^0",
            "node `nvme0` has no BAR 0; expected one of: 2",
        ),
        row_at(
            "BAR index above 5",
            edit(&base, r"p2p = [ { bar = 2,", r"p2p = [ { bar = 300,"),
            "bar = ^300",
            "expected a BAR index 0-5 for `bar`, found 300",
        ),
        row_at(
            "BAR on a node without BARs",
            edit(&base, r#"iommu = "dma""#, r"p2p = [ { bar = 2 } ]"),
            "p2p = [ { bar = ^2 } ]",
            "node `nic0` has no BAR 2; it has no BARs (declare them in its `[[topology.endpoint]]` `bars`)",
        ),
        row_at(
            "p2p range beyond the BAR",
            edit(
                &base,
                r#"size = "1MiB" }"#,
                r#"size = "1MiB", offset = "256MiB" }"#,
            ),
            r#"offset = ^"256MiB""#,
            "p2p range at offset 0x10000000 of 0x100000 bytes does not fit BAR 2 of node `nvme0` (0x10000000 bytes)",
        ),
        row_at(
            "export range beyond the BAR",
            edit(&base, r#"len = "1MiB" }"#, r#"len = "512MiB" }"#),
            r#"len = ^"512MiB""#,
            "export range at offset 0x100000 of 0x20000000 bytes does not fit BAR 2 of node `nvme0` (0x10000000 bytes)",
        ),
        row_at(
            "unaligned export offset",
            edit(&base, r#"offset = "1MiB", len"#, r#"offset = "1000", len"#),
            r#"offset = ^"1000""#,
            "expected a page-aligned `offset` for a BAR export, found 0x3e8",
        ),
        row_at(
            "duplicate export name",
            edit(
                &base,
                r#"len = "1MiB" }"#,
                r#"len = "1MiB" }, { name = "vram", bar = 2 }"#,
            ),
            r#"}, { name = ^"vram""#,
            "duplicate export name `vram`",
        ),
        row_at(
            "unknown key in a p2p entry",
            edit(&base, r#"size = "1MiB" }"#, r#"sise = "1MiB" }"#),
            "^sise",
            "unknown key `sise` in a `p2p` entry; expected one of: bar, size, offset, publish",
        ),
        row_at(
            "unknown key in an export entry",
            edit(&base, r#"len = "1MiB" }"#, r#"length = "1MiB" }"#),
            "^length",
            "unknown key `length` in an `export` entry; expected one of: name, bar, offset, len, revocable",
        ),
        row_at(
            "p2p entry that is not a table",
            edit(
                &base,
                r#"p2p = [ { bar = 2, size = "1MiB" } ]"#,
                "p2p = [ 2 ]",
            ),
            "p2p = [ ^2 ]",
            "expected a P2P resource like `{ bar = 2, size = \"1MiB\" }`, found an integer",
        ),
        // op keywords
        row_at(
            "bad dma.map mode",
            pci(&[
                r#"{ op = "dma.map", dev = "nic0", at = "buf", len = "4KiB", mode = "longterm", name = "h2" }"#,
            ]),
            r#"mode = ^"longterm""#,
            "expected one of `short-term`, `long-term`, `mirror` for `mode`, found `longterm`",
        ),
        row_at(
            "bad dma.map flag",
            pci(&[
                r#"{ op = "dma.map", dev = "nic0", at = "buf", len = "4KiB", flags = ["read"], name = "h2" }"#,
            ]),
            r#"flags = [^"read"]"#,
            "expected one of `write`, `p2p` for `flags`, found `read`",
        ),
        row_at(
            "bad p2pmem.mmap flag",
            pci(&[
                r#"{ op = "p2pmem.mmap", dev = "nvme0", name = "p", len = "4KiB", flags = ["anonymous"] }"#,
            ]),
            r#"flags = [^"anonymous"]"#,
            "expected one of `shared`, `private` for `flags`, found `anonymous`",
        ),
        row_at(
            "p2pmem.mmap both shared and private",
            pci(&[
                r#"{ op = "p2pmem.mmap", dev = "nvme0", name = "p", len = "4KiB", flags = ["shared", "private"] }"#,
            ]),
            r#"flags = ^["shared", "private"]"#,
            "expected exactly one of `shared` or `private` in `flags`",
        ),
        row_at(
            "p2pmem.mmap empty flags",
            pci(&[
                r#"{ op = "p2pmem.mmap", dev = "nvme0", name = "p", len = "4KiB", flags = [] }"#,
            ]),
            "flags = ^[]",
            "expected exactly one of `shared` or `private` in `flags`",
        ),
        // expect.segments
        row_at(
            "segment without a length",
            pci(&[
                r#"{ op = "dma.map", dev = "nic0", at = "buf", len = "4KiB", name = "h2", expect = { segments = ["bus"] } }"#,
            ]),
            r#"segments = [^"bus"]"#,
            "expected a segment `kind:len` like `bus:64KiB` in `segments`, found `bus`",
        ),
        row_at(
            "segment of an unknown kind",
            pci(&[
                r#"{ op = "dma.map", dev = "nic0", at = "buf", len = "4KiB", name = "h2", expect = { segments = ["disk:4KiB"] } }"#,
            ]),
            r#"segments = [^"disk:4KiB"]"#,
            "unknown segment kind `disk` in `disk:4KiB`; expected one of: ram, bus, host-bridge",
        ),
        row_at(
            "segment with a bad length",
            pci(&[
                r#"{ op = "dma.map", dev = "nic0", at = "buf", len = "4KiB", name = "h2", expect = { segments = ["ram:4KiB", "bus:lots"] } }"#,
            ]),
            r#", ^"bus:lots"]"#,
            "bad length in segment `bus:lots`: expected a size",
        ),
        row_at(
            "segment of zero length",
            pci(&[
                r#"{ op = "dma.map", dev = "nic0", at = "buf", len = "4KiB", name = "h2", expect = { segments = ["ram:0"] } }"#,
            ]),
            r#"segments = [^"ram:0"]"#,
            "expected a non-zero length in segment `ram:0`",
        ),
        row_at(
            "segments not a list",
            pci(&[
                r#"{ op = "dma.map", dev = "nic0", at = "buf", len = "4KiB", name = "h2", expect = { segments = "bus:4KiB" } }"#,
            ]),
            r#"segments = ^"bus:4KiB""#,
            "expected a list of `kind:len` strings",
        ),
        row_at(
            "expect.pinned on a dma_sg.read",
            pci(&[r#"{ op = "dma_sg.read", handle = "h", expect = { pinned = 1 } }"#]),
            "expect = { ^pinned",
            "`expect.pinned` is not checked for a `dma_sg.read` step; expected one of: errno, data",
        ),
        row_at(
            "expect.pinned on a load",
            pci(&[r#"{ op = "load", at = "buf", expect = { pinned = 1 } }"#]),
            "expect = { ^pinned",
            "`expect.pinned` is not checked for a `load` step",
        ),
        row_at(
            "bad signal",
            pci(&[r#"{ op = "load", at = "cmb", expect = { signal = "SIGKILL" } }"#]),
            r#"signal = ^"SIGKILL""#,
            "expected one of `SIGSEGV`, `SIGBUS` for `signal`, found `SIGKILL`",
        ),
        // dma_sg offsets and lengths
        row_at(
            "unaligned dma_sg.read offset",
            pci(&[r#"{ op = "dma_sg.read", handle = "h", offset = 100 }"#]),
            "offset = ^100",
            "expected a page-aligned `offset`, found 0x64",
        ),
        row_at(
            "partial-page dma_sg.write len",
            pci(&[r#"{ op = "dma_sg.write", handle = "h", len = 6000, pattern = "zero" }"#]),
            "len = ^6000",
            "expected a whole number of 4 KiB pages for `len`, found 6000 bytes",
        ),
        row_at(
            "zero dma_sg.read len",
            pci(&[r#"{ op = "dma_sg.read", handle = "h", len = 0 }"#]),
            "len = ^0",
            "non-zero length",
        ),
        row_at(
            "dma_sg.read offset at the end of the handle",
            pci(&[r#"{ op = "dma_sg.read", handle = "h", offset = "64KiB" }"#]),
            r#"offset = ^"64KiB" }"#,
            "offset 0x10000 + 0x0 bytes passes the end of handle `h` (0x10000 bytes",
        ),
        row_at(
            "dma_sg.write len past the end of the handle",
            pci(&[
                r#"{ op = "dma_sg.write", handle = "h", offset = "60KiB", len = "8KiB", pattern = "zero" }"#,
            ]),
            r#"len = ^"8KiB", pattern"#,
            "offset 0xf000 + 0x2000 bytes passes the end of handle `h` (0x10000 bytes",
        ),
        // ranges
        row_at(
            "dma.map starting beyond its mapping",
            pci(&[
                r#"{ op = "dma.map", dev = "nic0", at = "buf+128KiB", len = "4KiB", name = "h2" }"#,
            ]),
            r#"at = ^"buf+128KiB""#,
            "address `buf+128KiB` lies beyond the end of mapping `buf`",
        ),
        row_at(
            "dma.map of a raw range that wraps",
            pci(&[
                r#"{ op = "dma.map", dev = "nic0", at = "0xffffffffffff0000", len = "1MiB", name = "h2" }"#,
            ]),
            r#"len = ^"1MiB", name = "h2""#,
            "overflows",
        ),
        row_at(
            "dma.map without a name",
            pci(&[r#"{ op = "dma.map", dev = "nic0", at = "buf", len = "4KiB" }"#]),
            r#"^{ op = "dma.map", dev = "nic0", at = "buf", len = "4KiB" }"#,
            "a `dma.map` step needs `name`",
        ),
        row_at(
            "unknown key in a dma.map step",
            pci(&[
                r#"{ op = "dma.map", dev = "nic0", at = "buf", len = "4KiB", name = "h2", pages = 1 }"#,
            ]),
            "^pages = 1",
            "unknown key `pages` in a `dma.map` step; expected one of: op, dev, at, len, mode, flags, name, expect",
        ),
    ]
}

/// Rows for `[topology]`: its keys, values and tree, each reported at its token with the wording it has
/// always had.
fn topology_rows() -> Vec<Row> {
    let base = pci(&[]);
    let nic_bdf = r#"bdf = "04:00.0""#;
    vec![
        row_at(
            "unknown key in a topology node",
            edit(
                &base,
                nic_bdf,
                "bdf = \"04:00.0\"\nlnk = { gen = 3, width = 8 }",
            ),
            "^lnk = ",
            "invalid `[topology]`: unknown field `lnk`, expected one of `name`, `parent`, `bdf`, `acs`, `link`, `bars`",
        ),
        row_at(
            "unknown table in the topology",
            edit(&base, "[[topology.socket]]", "[[topology.sockets]]"),
            "[[topology.^sockets]]",
            "invalid `[topology]`: unknown field `sockets`, expected one of `cpu_allows_all_host_bridges`, `socket`, \
             `host_bridge`, `root_port`, `switch`, `endpoint`, `non_pci`",
        ),
        row_at(
            "a topology list written as a table",
            edit(&base, "[[topology.socket]]", "[topology.socket]"),
            "^[topology.socket]",
            "invalid `[topology]`: invalid type: map, expected a sequence",
        ),
        row_at(
            "wrong type for a node name",
            edit(&base, "name = \"nic0\"\nparent", "name = 5\nparent"),
            "name = ^5",
            "invalid `[topology]`: invalid type: integer `5`, expected a string",
        ),
        row_at(
            "the keys of a topology table are read in sorted order",
            edit(
                &base,
                "name = \"nic0\"\nparent",
                "name = 5\naaa = 1\nparent",
            ),
            "^aaa = 1",
            "invalid `[topology]`: unknown field `aaa`, expected one of",
        ),
        row_at(
            "wrong type for the cpu flag",
            edit(
                &base,
                "[topology]\n",
                "[topology]\ncpu_allows_all_host_bridges = \"yes\"\n",
            ),
            "cpu_allows_all_host_bridges = ^\"yes\"",
            "invalid `[topology]`: invalid type: string \"yes\", expected a boolean",
        ),
        row_at(
            "topology node without a name",
            edit(
                &base,
                "[[topology.socket]]\nname = \"s0\"\n",
                "[[topology.socket]]\n",
            ),
            "^[[topology.socket]]",
            "invalid `[topology]`: missing field `name`",
        ),
        row_at(
            "bad bdf",
            edit(&base, nic_bdf, r#"bdf = "04:00""#),
            r#"bdf = ^"04:00""#,
            "invalid `[topology]`: expected a BDF like `01:00.0`, found `04:00`",
        ),
        row_at(
            "link generation out of range",
            edit(
                &base,
                nic_bdf,
                "bdf = \"04:00.0\"\nlink = { gen = 9, width = 8 }",
            ),
            "link = ^{ gen = 9",
            "invalid `[topology]`: invalid link of node `nic0`: generation 9, expected 1..=7",
        ),
        row_at(
            "link generation beyond a byte",
            edit(
                &base,
                nic_bdf,
                "bdf = \"04:00.0\"\nlink = { gen = 300, width = 8 }",
            ),
            "gen = ^300",
            "invalid `[topology]`: invalid value: integer `300`, expected u8",
        ),
        row_at(
            "link without a width",
            edit(&base, nic_bdf, "bdf = \"04:00.0\"\nlink = { gen = 4 }"),
            "link = ^{ gen = 4 }",
            "invalid `[topology]`: missing field `width`",
        ),
        row_at(
            "duplicate node name",
            edit(&base, "name = \"nic0\"\nparent", "name = \"nvme0\"\nparent"),
            "name = ^\"nvme0\"\nparent = \"sw0.d1\"",
            "invalid `[topology]`: duplicate node name `nvme0`",
        ),
        row_at(
            "unknown parent",
            edit(&base, r#"parent = "sw0.d1""#, r#"parent = "sw0.d7""#),
            r#"parent = ^"sw0.d7""#,
            "invalid `[topology]`: node `nic0`: parent `sw0.d7` does not exist",
        ),
        row_at(
            "unknown socket of a host bridge",
            edit(&base, r#"socket = "s0""#, r#"socket = "s9""#),
            r#"socket = ^"s9""#,
            "invalid `[topology]`: node `hb0`: parent `s9` does not exist",
        ),
        row_at(
            "bad size unit in a bar",
            edit(&base, r#"size = "256MiB""#, r#"size = "256MB""#),
            r#"size = ^"256MB""#,
            "invalid `[topology]`: invalid size or address `256MB`",
        ),
        row_at(
            "bar without an index",
            edit(&base, "{ index = 2, size", "{ size"),
            "bars = [ ^{ size",
            "invalid `[topology]`: missing field `index`",
        ),
        row_at(
            "bar index out of range",
            edit(&base, "index = 2,", "index = 7,"),
            "bars = [ ^{ index = 7",
            "invalid `[topology]`: node `nvme0`: bar 7: index is not in 0..=5",
        ),
        row_at(
            "unknown key in a downstream port",
            edit(
                &base,
                r#"{ name = "sw0.d1", bdf = "02:01.0" }"#,
                r#"{ name = "sw0.d1", bdf = "02:01.0", link = 1 }"#,
            ),
            "^link = 1",
            "invalid `[topology]`: unknown field `link`, expected one of `name`, `bdf`, `acs`, `bars`",
        ),
        row_at(
            "unknown key in an acs table",
            edit(
                &base,
                r#"bdf = "00:01.0""#,
                "bdf = \"00:01.0\"\nacs = { rr = true, xx = true }",
            ),
            "^xx = true",
            "invalid `[topology]`: unknown field `xx`, expected one of `rr`, `cr`, `ec`",
        ),
        row_at(
            "unknown whitelist entry",
            edit(
                &base,
                r#"socket = "s0""#,
                "socket = \"s0\"\nwhitelist = \"open\"",
            ),
            r#"whitelist = ^"open""#,
            "invalid `[topology]`: unknown variant `open`, expected one of `not-listed`, `same-host-bridge-only`, \
             `unrestricted`",
        ),
    ]
}

#[test]
fn each_malformed_topology_is_reported_at_its_token() {
    check_rows(topology_rows());
}

#[test]
fn each_malformed_pci_input_is_reported_at_its_token() {
    check_rows(pci_rows());
}

#[test]
fn the_pci_rows_are_valid_without_their_defect() {
    parse(
        "ok.toml",
        &pci(&[
            r#"{ op = "dma.map", dev = "nic0", at = "buf", len = "4KiB", flags = ["write", "p2p"], name = "h2", expect = { segments = ["ram:4KiB"] } }"#,
            r#"{ op = "dma_sg.read", handle = "h", offset = "4KiB", len = "8KiB" }"#,
            r#"{ op = "bar.mmap", export = "vram", name = "v", len = "4KiB" }"#,
            r#"{ op = "load", at = "v", expect = { signal = "SIGBUS" } }"#,
        ]),
    )
    .unwrap();
}

#[test]
fn each_malformed_input_is_reported_at_its_token() {
    check_rows(rows());
}

/// Parses each row and checks that it fails at the row's `line:col` with its message fragment.
fn check_rows(rows: Vec<Row>) {
    let mut failures = Vec::new();
    for row in rows {
        match parse("bad.toml", &row.text) {
            Ok(_) => failures.push(format!("{}: parsed without error", row.name)),
            Err(err) => {
                if (err.line, err.col) != (row.line, row.col) || !err.message.contains(row.message)
                {
                    failures.push(format!(
                        "{}: expected {}:{} containing {:?}, got\n{}",
                        row.name,
                        row.line,
                        row.col,
                        row.message,
                        err.render()
                    ));
                }
                assert_eq!(err.path, "bad.toml", "{}", row.name);
                assert!(err.source_line.is_some(), "{}", row.name);
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn rows_are_valid_without_their_defect() {
    // The prelude and the row helpers themselves parse, so each row fails only because of its defect.
    parse("ok.toml", &steps(&[r#"{ op = "store", at = "buf+4MiB", pattern = "zero", expect = { signal = "SIGSEGV" } }"#]))
        .unwrap();
}

#[test]
fn display_and_render_point_at_the_token() {
    let err = parse(
        "s.toml",
        &steps(&[r#"{ op = "store", at = "bfu", pattern = "zero" }"#]),
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "s.toml:14:24: unknown mapping `bfu` in address `bfu`; mappings defined: buf"
    );
    let rendered = err.render();
    let lines: Vec<&str> = rendered.lines().collect();
    assert_eq!(lines[1], "  --> s.toml:14:24");
    assert_eq!(
        lines[3],
        r#"14 |   { op = "store", at = "bfu", pattern = "zero" },"#
    );
    assert_eq!(lines[4], "   |                        ^");
}
