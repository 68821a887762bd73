//! Each mm subsystem owns its state (DESIGN.md §2, "Inside `mm`: one module per kernel mechanism, each owning
//! its state"): the `Kernel` facade holds every subsystem in a cell of its own (`RefCell<PhysMem>`,
//! `RefCell<Mms>`, …), lends each one only through a crate-private borrow, and no state type has a `pub` or
//! `pub(crate)` field, so a mechanism changes a subsystem only through the methods that keep its invariants.
//!
//! The test reads the sources of `src/`, finds each state type's definition and asserts its fields are
//! private, that every cell of `Kernel` holds one of those types, and that no accessor hands out more than one
//! subsystem (there is no whole-state borrow such as the former `Kernel::state()`).

#![allow(
    clippy::tests_outside_test_module,
    clippy::unwrap_used,
    reason = "an integration-test crate is all tests"
)]

use std::path::Path;

/// The state types, with the file that defines each. A type held in a `Kernel` cell must be listed here.
const STATE_TYPES: &[(&str, &str)] = &[
    ("kernel.rs", "Mms"),
    ("kernel.rs", "AddressSpace"),
    ("phys.rs", "PhysMem"),
    ("vmscan.rs", "Swap"),
    ("vmscan/lru.rs", "AnonLru"),
    ("p2pdma.rs", "P2pState"),
    ("oracle.rs", "Oracle"),
    ("mmu_notifier.rs", "NotifierState"),
    ("mmu_notifier.rs", "Subscription"),
    ("pagetable.rs", "PageTable"),
    ("file.rs", "PageCache"),
    ("file.rs", "File"),
    ("kernel.rs", "Kernel"),
];

/// Public fields allowed on a state type, with the reason: the engine handle and the timing parameters of
/// `Kernel` are shared configuration that other crates read (and never state any mechanism keeps).
const ALLOWED_PUBLIC: &[(&str, &str)] = &[("Kernel", "sim"), ("Kernel", "costs")];

fn src(file: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("src").join(file);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Returns the lines of the body of `struct name { … }` in `code` (the fields and their comments), or `None`
/// when `code` has no such braced struct.
fn struct_body<'a>(code: &'a str, name: &str) -> Option<Vec<&'a str>> {
    let mut lines = code.lines();
    lines.find(|l| {
        let t = l.trim_start();
        let t = t
            .strip_prefix("pub(crate) ")
            .or_else(|| t.strip_prefix("pub "))
            .unwrap_or(t);
        t.strip_prefix("struct ")
            .and_then(|r| r.strip_prefix(name))
            .is_some_and(|r| r.starts_with(" {") || r.starts_with('<'))
    })?;
    Some(lines.take_while(|l| !l.starts_with('}')).collect())
}

/// Returns the names of the fields of a struct body declared with any `pub` visibility.
fn public_fields<'a>(body: &[&'a str]) -> Vec<&'a str> {
    body.iter()
        .map(|l| l.trim_start())
        .filter(|l| l.starts_with("pub ") || l.starts_with("pub("))
        .filter_map(|l| {
            let rest = l.split_once(' ')?.1;
            Some(rest.split(':').next()?.trim())
        })
        .collect()
}

#[test]
fn state_types_have_only_private_fields() {
    let mut offenders = Vec::new();
    for &(file, ty) in STATE_TYPES {
        let code = src(file);
        let body =
            struct_body(&code, ty).unwrap_or_else(|| panic!("struct {ty} not found in {file}"));
        for field in public_fields(&body) {
            if !ALLOWED_PUBLIC.contains(&(ty, field)) {
                offenders.push(format!("{file}: {ty}::{field}"));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "state types must keep their fields private (give the subsystem a method instead): {offenders:#?}"
    );
}

#[test]
fn every_kernel_cell_holds_one_listed_subsystem_and_no_accessor_lends_the_whole_state() {
    let code = src("kernel.rs");
    let body = struct_body(&code, "Kernel").unwrap();
    let cells: Vec<&str> = body
        .iter()
        .filter_map(|l| l.split_once(": RefCell<").map(|(_, t)| t))
        .map(|t| t.trim_end_matches(">,").trim_end_matches('>'))
        .collect();
    assert!(cells.len() >= 6, "Kernel's cells: {cells:?}");
    for t in &cells {
        let listed = STATE_TYPES.iter().any(|&(_, s)| s == *t);
        // The dev_pagemap and vm-object registries are maps of driver callbacks, not state types of their own.
        assert!(
            listed || *t == "Pgmaps" || *t == "VmObjects",
            "Kernel holds RefCell<{t}>, which is not a listed state type"
        );
    }
    // The former whole-state borrow and its type are gone.
    assert!(!code.contains("fn state("), "Kernel::state() is back");
    assert!(!code.contains("KernelState"), "KernelState is back");
    // Each accessor lends one cell: `RefMut<'_, T>` with T one subsystem.
    for l in code.lines().filter(|l| l.contains("-> RefMut<'_, ")) {
        assert!(
            l.trim_start().starts_with("pub(crate) fn "),
            "a cell accessor must stay crate-private: {l}"
        );
    }
}

#[test]
fn the_reader_finds_public_fields_and_skips_private_ones() {
    let code = "/// Doc.\npub struct S {\n    /// A.\n    pub a: u32,\n    pub(crate) b: u8,\n    c: u8,\n}\n";
    let body = struct_body(code, "S").unwrap();
    assert_eq!(public_fields(&body), ["a", "b"]);
    assert!(struct_body(code, "T").is_none());
}
