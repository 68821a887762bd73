//! The fuzz corpus replayed as a normal test (the `fuzz/` targets need nightly; this runs on stable): every
//! bundled scenario and example, every file of `fuzz/corpus/*/` and `fuzz/regressions/`, through both fuzz
//! entry points ([`peerdma_scenario::fuzzing`]). Plus, behind `#[ignore]`, the stable in-process
//! random-mutation fuzz loop used where cargo-fuzz is not installed:
//!
//! ```text
//! FUZZ_SECS=600 FUZZ_TARGET=parse_and_run cargo test --release -p peerdma-scenario --test fuzz_corpus -- --ignored --nocapture
//! FUZZ_SECS=600 FUZZ_TARGET=op_sequence   cargo test --release -p peerdma-scenario --test fuzz_corpus -- --ignored --nocapture
//! ```
#![expect(
    clippy::tests_outside_test_module,
    clippy::print_stdout,
    clippy::unwrap_used,
    reason = "an integration-test crate is all tests; the fuzz loop prints its figures"
)]

use std::path::{Path, PathBuf};

use peerdma_scenario::Outcome;
use peerdma_scenario::fuzzing::{op_sequence, parse_and_run};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<PathBuf> = rd.map(|e| e.unwrap().path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            files_under(&p, out);
        } else {
            out.push(p);
        }
    }
}

fn corpus() -> Vec<PathBuf> {
    let mut files = Vec::new();
    for d in ["scenarios", "examples", "fuzz/corpus", "fuzz/regressions"] {
        files_under(&root().join(d), &mut files);
    }
    files
}

#[test]
fn corpus_replays_without_panic_through_both_targets() {
    let files = corpus();
    assert!(files.len() > 20, "{} corpus files", files.len());
    let mut violations = Vec::new();
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        let _ = parse_and_run(&bytes);
        // The structured driver takes any bytes; a corpus file is as good a program as any. Its steps
        // accept any errno (not signals), so only a panic, a limit or an oracle violation is news.
        let program = &bytes[..bytes.len().min(300)];
        let r = op_sequence(program);
        if matches!(r.outcome, Outcome::OracleViolation(_)) {
            violations.push(f.display().to_string());
        }
    }
    // The driver's devices invalidate their own migrations: with test_hmm.c's rule, 5 of the 97 programs
    // (two files on one device) and then 1 of 109 (one file per device) hit that driver's own races (the
    // two tests below); with it, none may be flagged.
    assert!(
        violations.is_empty(),
        "{} of {} op_sequence programs flagged by the oracle: {violations:?}",
        violations.len(),
        files.len()
    );
}

fn run_text(name: &str, text: &str) -> peerdma_scenario::Report {
    let scn = peerdma_scenario::parse(name, text).unwrap_or_else(|e| panic!("{}", e.render()));
    peerdma_scenario::fuzzing::run_limited(scn)
}

/// The op-sequence driver's finding, minimised (`fuzz/regressions/dmirror-two-opens-migrate-uaf.toml`):
/// with two files open on ONE dmirror device, a migration by one file is ignored by the other file's
/// notifier (test_hmm.c compares the MIGRATE event's owner with the device, not the file), so the other
/// file reads a freed page — Linux's test driver has this use after free, the model reproduces it and the
/// oracle must report it, at the second read. With the second file on another device the run is clean.
#[test]
fn dmirror_two_opens_of_one_device_miss_each_others_migrations() {
    let path = "fuzz/regressions/dmirror-two-opens-migrate-uaf.toml";
    let text = std::fs::read_to_string(root().join(path)).unwrap();
    let r = run_text(path, &text);
    match &r.outcome {
        Outcome::OracleViolation(v) => {
            assert!(v.contains("use after free"), "{v}");
            assert!(v.contains("device 0 reached freed"), "{v}");
            let lines: Vec<&str> = text.lines().collect();
            let second_read = lines
                .iter()
                .rposition(|l| l.contains("dmirror.read"))
                .unwrap()
                + 1;
            assert!(
                v.contains(&format!(":{second_read}:3")),
                "the second `dmirror.read`: {v}"
            );
        }
        other => panic!("the oracle missed test_hmm.c's stale entry: {other:?}"),
    }
    let two_devices = text.replace(
        r#"dev = "mirror0", fd = "m1""#,
        r#"dev = "mirror1", fd = "m1""#,
    );
    assert_ne!(two_devices, text);
    let r = run_text(path, &two_devices);
    assert_eq!(r.outcome, Outcome::Passed, "{}", r.render_text());
    let r = run_text(path, &invalidating_own_migrations(&text));
    assert_eq!(r.outcome, Outcome::Passed, "{}", r.render_text());
}

/// `text` with every dmirror device set to `own_migrations = "invalidate"`.
fn invalidating_own_migrations(text: &str) -> String {
    let out = text.replace(
        "kind = \"dmirror\"\n",
        "kind = \"dmirror\"\nown_migrations = \"invalidate\"\n",
    );
    assert_ne!(out, text);
    out
}

/// The other test_hmm.c race the op-sequence driver found, minimised
/// (`fuzz/regressions/dmirror-fault-vs-migrate-back.toml`), with one file on the device: a device fault
/// returns its own device page as it is, a CPU fault migrates that page back meanwhile, and the MIGRATE
/// event test_hmm.c ignores sets no sequence, so the fault programs the page about to be freed. The
/// oracle must report the device read of the freed device page; with `own_migrations = "invalidate"` the
/// fault retries and the run is clean.
#[test]
fn dmirror_fault_programs_a_page_a_cpu_fault_is_migrating_back() {
    let v = test_hmm_race_reported_then_clean(
        "fuzz/regressions/dmirror-fault-vs-migrate-back.toml",
        "fault/migration",
    );
    assert!(v.contains("dmirror.read"), "{v}");
}

/// Runs the regression at `path`: with test_hmm.c's rule the oracle must report a device use after free of
/// device 0's freed page (the report is returned for more checks); with `own_migrations = "invalidate"` the
/// run must pass.
fn test_hmm_race_reported_then_clean(path: &str, race: &str) -> String {
    let text = std::fs::read_to_string(root().join(path)).unwrap();
    let r = run_text(path, &text);
    let Outcome::OracleViolation(v) = r.outcome else {
        panic!(
            "the oracle missed test_hmm.c's {race} race: {:?}",
            r.outcome
        );
    };
    assert!(v.contains("use after free"), "{v}");
    assert!(v.contains("device 0 reached freed"), "{v}");
    let r = run_text(path, &invalidating_own_migrations(&text));
    assert_eq!(r.outcome, Outcome::Passed, "{}", r.render_text());
    v
}

/// A third test_hmm.c race, found by the random op-sequence loop and minimised
/// (`fuzz/regressions/dmirror-migrate-vs-dontneed.toml`): a MADV_DONTNEED zaps the migration entries of a
/// MIGRATE_TO_DEV in progress, `dmirror_migrate_finalize_and_map` still programs the device pages (no
/// `read_retry`), and `migrate_vma_finalize` frees them. The oracle must report the read-back with
/// test_hmm.c's rule; a driver that invalidates its own migrations (`own_migrations = "invalidate"`) maps
/// the migrated range through its fault path after finalize instead, and is clean.
#[test]
fn dmirror_migrate_to_dev_programs_pages_a_dontneed_zapped() {
    let path = "fuzz/regressions/dmirror-migrate-vs-dontneed.toml";
    let v = test_hmm_race_reported_then_clean(path, "migrate/DONTNEED");
    assert!(v.contains("by t0"), "the migrating thread's read-back: {v}");
    // The step is named even though it was the thread's last (the thread ends with it).
    assert!(
        v.contains(&format!("in step `dmirror.migrate_to_dev` at {path}:")),
        "{v}"
    );
}

/// The programs the random op-sequence loop flagged (`fuzz/regressions/op-sequence-*.toml`), replayed:
/// none may be flagged any more. `op-sequence-1` was a model bug: `migrate_vma_pages` inserted the new page
/// over a hole's zero page with no MMU_NOTIFY_MIGRATE invalidation, so a mirror that had mapped the zero
/// page after setup kept it (`__migrate_device_pages`, mm/migrate_device.c, opens one); the others were
/// the migrate/DONTNEED race above, or the same zero-page race.
#[test]
fn the_op_sequence_findings_replay_clean() {
    let mut files = Vec::new();
    files_under(&root().join("fuzz/regressions"), &mut files);
    files.retain(|f| {
        f.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("op-sequence-"))
    });
    assert!(files.len() >= 8, "{files:?}");
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let r = run_text(&f.display().to_string(), &text);
        assert!(
            !matches!(r.outcome, Outcome::OracleViolation(_)),
            "{}: {}",
            f.display(),
            r.render_text()
        );
    }
}

/// A tiny xorshift generator: the loop needs no quality, only speed and a seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % (n.max(1) as u64)).unwrap()
    }
}

/// Tokens that matter to TOML and to the scenario grammar.
const TOKENS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    "=",
    ",",
    "\"",
    ".",
    "+",
    "-",
    "0",
    "1",
    "4096",
    "0x7f0000000000",
    "\n",
    "18446744073709551615",
    "\"1TiB\"",
    "\"4KiB\"",
    "\"2 pages\"",
    "op",
    "len",
    "pages",
    "at",
    "exit",
    "[[thread]]",
    "[[device]]",
    "[sim]",
    "[sim.limits]",
    "steps",
    "name",
    "\"mmap\"",
    "\"store\"",
    "\"dmirror.read\"",
    "\"fork\"",
    "\"sleep\"",
    "\"any\"",
    "expect",
    "errno",
    "memory",
    "size",
];

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..=rng.below(8) {
        let at = rng.below(v.len() + 1);
        match rng.below(6) {
            0 if !v.is_empty() => {
                let end = (at + rng.below(16)).min(v.len());
                v.drain(at.min(end)..end);
            }
            1 => {
                let t = TOKENS[rng.below(TOKENS.len())].as_bytes();
                v.splice(at..at, t.iter().copied());
            }
            2 if at < v.len() => v[at] = u8::try_from(rng.next() & 0xff).unwrap(),
            3 => {
                let start = rng.below(v.len() + 1);
                let end = (start + rng.below(64)).min(v.len());
                let chunk: Vec<u8> = v[start..end].to_vec();
                v.splice(at..at, chunk);
            }
            4 => v.truncate(at),
            _ => {
                let n = rng.below(32);
                let junk: Vec<u8> = (0..n)
                    .map(|_| u8::try_from(rng.next() & 0xff).unwrap())
                    .collect();
                v.splice(at..at, junk);
            }
        }
    }
    v.truncate(64 << 10);
    v
}

#[test]
#[ignore = "a long fuzz run: FUZZ_SECS seconds (default 600) of FUZZ_TARGET (parse_and_run or op_sequence)"]
fn stable_fuzz_loop() {
    let secs: u64 = std::env::var("FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let target = std::env::var("FUZZ_TARGET").unwrap_or_else(|_| "parse_and_run".to_owned());
    let seeds: Vec<Vec<u8>> = corpus().iter().map(|f| std::fs::read(f).unwrap()).collect();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    #[expect(
        clippy::disallowed_methods,
        reason = "the fuzz loop's own budget, not the model's"
    )]
    let start = std::time::Instant::now();
    let (mut inputs, mut ran, mut violations) = (0u64, 0u64, 0u64);
    while start.elapsed().as_secs() < secs {
        let seed = &seeds[rng.below(seeds.len())];
        let input = if target == "op_sequence" {
            let n = rng.below(300);
            (0..n)
                .map(|_| u8::try_from(rng.next() & 0xff).unwrap())
                .collect()
        } else {
            mutate(&mut rng, seed)
        };
        inputs += 1;
        if target == "op_sequence" {
            let r = op_sequence(&input);
            ran += 1;
            if matches!(r.outcome, Outcome::OracleViolation(_)) {
                violations += 1;
                println!("VIOLATION for input {input:?}:\n{}", r.render_text());
            }
        } else if parse_and_run(&input).is_some() {
            ran += 1;
        }
    }
    println!(
        "fuzz {target}: {inputs} inputs in {:.0} s, {ran} ran, {violations} oracle violations, no panic",
        start.elapsed().as_secs_f64()
    );
    assert_eq!(violations, 0);
}
