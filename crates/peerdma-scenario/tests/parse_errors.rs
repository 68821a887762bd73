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
            "unknown key `simulation` in the top level; expected one of: sim, topology, file, device, process, thread",
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

#[test]
fn each_malformed_input_is_reported_at_its_token() {
    let mut failures = Vec::new();
    for row in rows() {
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
