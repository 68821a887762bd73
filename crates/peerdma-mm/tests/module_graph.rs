//! The module graph of `peerdma-mm` has no cycles (DESIGN.md §2, "Inside `mm`: one module per kernel
//! mechanism, each owning its state").
//!
//! The test reads every `src/*.rs`, collects the modules each one names through a `crate::X` path (in `use`
//! items, grouped `use crate::{X::…, Y::…}` items and inline paths; comments, doc links included, are
//! skipped) and asserts the graph is acyclic.
//!
//! **The one exception is the `kernel` facade.** `kernel.rs` defines `Kernel` and `Mms`; every
//! mechanism module adds its own `impl Kernel` / `impl Mms` block and so names `crate::kernel`, and
//! `Kernel` holds the state of the lower modules (`phys`, `vmscan`, `oracle`, `mmu_notifier`, …) and so names
//! them. Edges into and out of `kernel` are therefore left out. Calls between mechanisms go through methods
//! of `Kernel` / `Mms` (e.g. `madvise` calling `collapse_range`, defined in `khugepaged`), which name no
//! module and are not edges either: the graph is the one of *items* (types, constants, free functions) a
//! module takes from another, and that one must stay a DAG, so a shared item lives in the lower module.
//!
//! `lib.rs` (the crate root, re-exporting everything) is not a module of the graph.

#![allow(
    clippy::tests_outside_test_module,
    clippy::unwrap_used,
    reason = "an integration-test crate is all tests"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module pairs allowed to reference each other in a cycle, with the reason. Empty: there is none. A new cycle
/// fails the test; add an entry here only with a comment saying why the shared item cannot move down.
const ALLOWED: &[(&str, &str)] = &[];

/// The facade module every module may name and that names every module (module docs).
const FACADE: &str = "kernel";

/// Removes `//` comments (line, doc and inner-doc comments) from Rust source. Block comments are not used in
/// this crate's sources.
fn strip_comments(src: &str) -> String {
    src.lines()
        .map(|l| {
            // A `//` inside a string literal would cut the line short; the crate has none on a line that
            // also names a module.
            l.find("//").map_or(l, |i| &l[..i])
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn ident_at(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// Returns the first path segment of each top-level entry of a `{…}` use group starting at `s` (just after
/// the `{`).
fn group_heads(s: &str) -> Vec<&str> {
    let mut heads = Vec::new();
    let mut depth = 0usize;
    let mut at_entry = true;
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => at_entry = true,
            c if at_entry && !c.is_whitespace() => {
                at_entry = false;
                heads.push(ident_at(&s[i..]));
            }
            _ => {}
        }
    }
    heads
}

/// Returns the modules `src` names through `crate::` paths.
fn referenced(src: &str) -> BTreeSet<String> {
    let code = strip_comments(src);
    let mut out = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            out.extend(group_heads(group).into_iter().map(str::to_owned));
        } else {
            out.insert(ident_at(rest).to_owned());
        }
    }
    out
}

/// Module name → the modules it names (self, the facade, and names that are not modules left out).
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut sources = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "rs") {
            let name = path.file_stem().unwrap().to_str().unwrap().to_owned();
            if name != "lib" {
                sources.insert(name, std::fs::read_to_string(&path).unwrap());
            }
        }
    }
    let modules: BTreeSet<String> = sources.keys().cloned().collect();
    sources
        .iter()
        .map(|(name, src)| {
            let deps = referenced(src)
                .into_iter()
                .filter(|d| d != name && d != FACADE && modules.contains(d))
                .collect();
            (name.clone(), deps)
        })
        .collect()
}

fn allowed(a: &str, b: &str) -> bool {
    ALLOWED
        .iter()
        .any(|&(x, y)| (x, y) == (a, b) || (x, y) == (b, a))
}

/// Returns one cycle (as a path that starts and ends at the same module) if the graph without the facade
/// and without the allowed edges has one.
fn find_cycle(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        OnStack,
        Done,
    }
    fn visit(
        g: &BTreeMap<String, BTreeSet<String>>,
        v: &str,
        marks: &mut BTreeMap<String, Mark>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        marks.insert(v.to_owned(), Mark::OnStack);
        stack.push(v.to_owned());
        for w in g.get(v).into_iter().flatten() {
            if allowed(v, w) {
                continue;
            }
            match marks.get(w).copied().unwrap_or(Mark::New) {
                Mark::OnStack => {
                    let from = stack.iter().position(|s| s == w).unwrap();
                    let mut cycle = stack[from..].to_vec();
                    cycle.push(w.clone());
                    return Some(cycle);
                }
                Mark::New => {
                    if let Some(c) = visit(g, w, marks, stack) {
                        return Some(c);
                    }
                }
                Mark::Done => {}
            }
        }
        stack.pop();
        marks.insert(v.to_owned(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for v in g.keys() {
        if marks.get(v).copied().unwrap_or(Mark::New) == Mark::New {
            let mut stack = Vec::new();
            if let Some(c) = visit(g, v, &mut marks, &mut stack) {
                return Some(c);
            }
        }
    }
    None
}

#[test]
fn mm_modules_form_a_dag_apart_from_the_kernel_facade() {
    let g = graph();
    // The reader sees the crate: the mechanism modules are there and name what they use.
    for m in [
        "kernel",
        "memory",
        "mmap",
        "fork",
        "phys",
        "vma",
        "mmu_notifier",
        "vmscan",
        "p2pdma",
    ] {
        assert!(g.contains_key(m), "module {m} not found in {g:?}");
    }
    assert!(g["memory"].contains("pagetable"), "{:?}", g["memory"]);
    if let Some(cycle) = find_cycle(&g) {
        panic!(
            "import cycle among peerdma-mm modules: {}\n(move the shared item to the lower module; the graph: {g:#?})",
            cycle.join(" -> ")
        );
    }
}

#[test]
fn the_reader_finds_grouped_inline_and_plain_paths_and_skips_comments() {
    let src = "use crate::phys::Frame;\nuse crate::{vma::Vma, pagetable::{Pte, Leaf}};\n\
               fn f() { crate::oracle::check(); } // crate::swap is only mentioned\n\
               /// [`crate::p2p`]\n";
    let got: Vec<String> = referenced(src).into_iter().collect();
    assert_eq!(got, ["oracle", "pagetable", "phys", "vma"]);
}

#[test]
fn a_cycle_is_found_and_an_allowed_table_entry_would_be_needed_to_pass_it() {
    let g: BTreeMap<String, BTreeSet<String>> = [
        ("a", &["b"][..]),
        ("b", &["c"][..]),
        ("c", &["a"][..]),
        ("d", &[][..]),
    ]
    .into_iter()
    .map(|(k, v)| {
        (
            k.to_owned(),
            v.iter().map(|s| (*s).to_owned()).collect::<BTreeSet<_>>(),
        )
    })
    .collect();
    assert_eq!(
        find_cycle(&g),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
}
