//! `peerdma ops`: every op a scenario step can use (the registry `peerdma_scenario::ops::OPS`): its keys,
//! the `expect` keys it checks and what it does, as text, as JSON, or as the steps table of
//! `docs/scenario-format.md`.

use std::fmt::Write as _;

use peerdma_scenario::OpSpec;
use serde_json::json;

/// Returns the text listing: per op, its name, keys, `expect` keys and meaning (Markdown as in the format
/// doc).
pub(crate) fn render_text(ops: &[OpSpec]) -> String {
    let mut s = String::new();
    for op in ops {
        let keys = if op.keys.is_empty() {
            "-".to_owned()
        } else {
            op.keys.join(", ")
        };
        let _ = writeln!(s, "{}", op.name);
        let _ = writeln!(s, "  keys:   {keys}");
        let _ = writeln!(s, "  expect: {}", op.expect_keys.join(", "));
        let _ = writeln!(s, "  {}", op.doc);
    }
    s.push_str("\nEvery step is `{ op = NAME, KEY = VALUE, ..., expect = { ... } }`; see docs/scenario-format.md.\n");
    s
}

/// Returns the JSON array: one `{name, keys, expect_keys, doc_keys, doc}` per op, in registry order.
pub(crate) fn render_json(ops: &[OpSpec]) -> String {
    let rows: Vec<_> = ops
        .iter()
        .map(|op| {
            json!({
                "name": op.name,
                "keys": op.keys,
                "expect_keys": op.expect_keys,
                "doc_keys": op.doc_keys,
                "doc": op.doc,
            })
        })
        .collect();
    serde_json::to_string_pretty(&rows).expect("a JSON value always serializes") + "\n"
}
