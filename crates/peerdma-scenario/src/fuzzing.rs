//! Entry points for fuzzing (the `fuzz/` cargo-fuzz targets, the corpus replay test and the stable
//! in-process fuzz loop): each takes arbitrary bytes and must return without panicking, aborting or running
//! away, whatever the bytes. This is host-side tooling, not a model of a kernel mechanism.
//!
//! - [`parse_and_run`]: the bytes as a scenario file: parsed, and when valid run under tight
//!   `[sim.limits]` (so a valid but huge scenario stops at a limit instead of running for minutes).
//! - [`op_sequence`]: the bytes as a structured program: each byte pair picks one operation of the model
//!   (mmap, munmap, mprotect, madvise, mremap, store, load, fork, reclaim, pins, DMA through pins, dmirror
//!   reads, writes and migrations) with small arguments in a fixed window of addresses, on two threads of one
//!   process, each with its own dmirror device (`t0` opens `mirror0`, `t1` opens `mirror1`, as the kernel
//!   selftests' `hmm2` fixture does); every step accepts any errno, so only a panic, a limit or an oracle
//!   violation is news. Returns the report so a caller can look for violations.
//!
//!   The devices are `own_migrations = "invalidate"`: Linux's lib/test_hmm.c ignores a MIGRATE invalidation
//!   whose owner is the device, which has two races of that driver (a second file on the device keeps
//!   entries to freed pages; a fault programs an entry for a page a CPU fault is migrating back), reproduced
//!   faithfully by the default and reported by the oracle (`fuzz/regressions/`); the fuzz programs test the
//!   kernel side instead.

use std::fmt::Write as _;

use crate::ast::{Limits, Scenario};
use crate::parse::parse;
use crate::report::Report;
use crate::run::{RunOptions, run};

/// The limits a fuzzed scenario runs under.
pub fn fuzz_limits() -> Limits {
    Limits {
        host_memory: 16 << 20,
        memory: 1 << 30,
        steps: 10_000,
        events: 200_000,
        trace: 100_000,
        wall_time: peerdma_core::SimDuration::from_millis(5_000),
    }
}

/// Runs `scn` under [`fuzz_limits`] and a simulated time limit of at most 100 ms.
pub fn run_limited(mut scn: Scenario) -> Report {
    scn.sim.limits = fuzz_limits();
    scn.sim.time_limit = scn
        .sim
        .time_limit
        .min(peerdma_core::SimDuration::from_millis(100));
    run(&scn, &RunOptions::default())
}

/// Parses `bytes` as a scenario and, when it is valid and its simulated memory is small, runs it. Returns
/// the report of the run, if there was one.
pub fn parse_and_run(bytes: &[u8]) -> Option<Report> {
    let text = String::from_utf8_lossy(bytes);
    let scn = parse("fuzz.toml", &text).ok()?;
    // Keep fuzzed runs small (a fuzzed step over gigabytes of memory runs for long).
    let total: u64 = scn.sim.memory.iter().fold(0, |a, &m| a.saturating_add(m));
    if total > 256 << 20 || scn.devices.iter().any(|d| d.size > 256 << 20) {
        return None;
    }
    Some(run_limited(scn))
}

/// The base of the address window [`op_sequence`] works in.
const BASE: u64 = 0x7f00_0000_0000;

/// Returns the step a pair of bytes stands for (`op`, `arg`), as scenario text.
fn step(fd: &str, op: u8, arg: u8) -> String {
    let page = u64::from(arg % 16);
    let pages = u64::from(arg / 16 % 8) + 1;
    let at = format!("\"{:#x}\"", BASE + page * 4096);
    let len = format!("\"{pages} pages\"");
    let any = "expect = { errno = \"any\" }";
    match op % 16 {
        0 => format!(
            "{{ op = \"mmap\", at = {at}, len = {len}, prot = \"rw\", flags = [\"private\", \"anonymous\", \"fixed\"], {any} }}"
        ),
        1 => format!("{{ op = \"munmap\", at = {at}, len = {len}, {any} }}"),
        2 => format!(
            "{{ op = \"mprotect\", at = {at}, len = {len}, prot = \"{}\", {any} }}",
            ["r", "rw", "none"][usize::from(arg % 3)]
        ),
        3 => format!(
            "{{ op = \"madvise\", at = {at}, len = {len}, advice = \"{}\", {any} }}",
            ["dontneed", "free", "hugepage"][usize::from(arg % 3)]
        ),
        4 | 5 => format!(
            "{{ op = \"store\", at = {at}, len = {}, pattern = \"byte:{arg:#x}\", {any} }}",
            pages * 4096
        ),
        6 => format!(
            "{{ op = \"load\", at = {at}, len = {}, {any} }}",
            pages * 4096
        ),
        7 => {
            format!("{{ op = \"dmirror.read\", fd = \"{fd}\", at = {at}, pages = {pages}, {any} }}")
        }
        8 => format!(
            "{{ op = \"dmirror.write\", fd = \"{fd}\", at = {at}, pages = {pages}, pattern = \"u32:index\", {any} }}"
        ),
        9 => format!(
            "{{ op = \"dmirror.migrate_to_dev\", fd = \"{fd}\", at = {at}, pages = {pages}, {any} }}"
        ),
        10 => format!(
            "{{ op = \"dmirror.migrate_to_sys\", fd = \"{fd}\", at = {at}, pages = {pages}, {any} }}"
        ),
        11 => format!("{{ op = \"reclaim\", pages = {pages}, {any} }}"),
        12 => format!(
            "{{ op = \"mremap\", at = {at}, len = \"1 page\", new_len = {len}, flags = [\"maymove\"], name = \"r{arg}\", {any} }}"
        ),
        13 => format!("{{ op = \"sleep\", for = \"{}ns\" }}", u64::from(arg) * 100),
        14 => format!(
            "{{ op = \"dmirror.snapshot\", fd = \"{fd}\", at = {at}, pages = {pages}, {any} }}"
        ),
        _ => format!(
            "{{ op = \"dmirror.exclusive\", fd = \"{fd}\", at = {at}, pages = {pages}, {any} }}"
        ),
    }
}

/// Returns the scenario text [`op_sequence`] runs for `bytes`.
pub fn op_sequence_text(bytes: &[u8]) -> String {
    let mut threads = [Vec::new(), Vec::new()];
    for (i, pair) in bytes.chunks(3).take(200).enumerate() {
        let (t, op, arg) = match *pair {
            [t, op, arg] => (t, op, arg),
            [op, arg] => (0, op, arg),
            [op] => (0, op, 0),
            _ => continue,
        };
        let _ = i;
        let t = usize::from(t % 2);
        threads[t].push(step(["m0", "m1"][t], op, arg));
    }
    let mut text = String::from(
        "[sim]\nmemory = \"16MiB\"\nexplore = true\n\n[[device]]\nname = \"mirror0\"\nkind = \"dmirror\"\nsize = \"4MiB\"\nown_migrations = \"invalidate\"\n\n[[device]]\nname = \"mirror1\"\nkind = \"dmirror\"\nsize = \"4MiB\"\nown_migrations = \"invalidate\"\n",
    );
    for (i, steps) in threads.iter().enumerate() {
        let _ = write!(text, "\n[[thread]]\nname = \"t{i}\"\nsteps = [\n");
        if i == 0 {
            let _ = writeln!(
                text,
                "  {{ op = \"mmap\", at = \"{BASE:#x}\", len = \"16 pages\", prot = \"rw\", flags = [\"private\", \"anonymous\", \"fixed\"] }},"
            );
        }
        let _ = writeln!(
            text,
            "  {{ op = \"open\", dev = \"mirror{i}\", fd = \"m{i}\" }},"
        );
        for s in steps {
            text.push_str("  ");
            text.push_str(s);
            text.push_str(",\n");
        }
        text.push_str("]\n");
    }
    text
}

/// Runs the structured operation sequence `bytes` stands for ([`op_sequence_text`]) and returns its
/// report.
///
/// # Panics
/// Panics if the generated text does not parse (a bug of the generator, not of the input).
pub fn op_sequence(bytes: &[u8]) -> Report {
    let text = op_sequence_text(bytes);
    let scn = parse("ops.toml", &text).unwrap_or_else(|e| panic!("{}\n{text}", e.render()));
    run_limited(scn)
}
