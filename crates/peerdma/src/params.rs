//! `peerdma params`: every timing-model parameter of the workspace (the registry of
//! `peerdma_scenario::params`), as a text table or as JSON.

use std::fmt::Write as _;

use peerdma_core::timing::{ParamSpec, ParamUnit};
use serde_json::json;

/// Returns `ns` in the largest unit it reaches, exactly (`80us`, `1.5us`, `115ns`, `0ns`), as `[timing]`
/// accepts it.
fn exact_time(ns: u64) -> String {
    for (unit, scale, digits) in [
        ("s", 1_000_000_000, 9),
        ("ms", 1_000_000, 6),
        ("us", 1_000, 3),
    ] {
        if ns >= scale {
            let frac = ns % scale;
            if frac == 0 {
                return format!("{}{unit}", ns / scale);
            }
            let frac = format!("{frac:0digits$}");
            return format!("{}.{}{unit}", ns / scale, frac.trim_end_matches('0'));
        }
    }
    format!("{ns}ns")
}

/// Returns a parameter's default with its unit, as a scenario would write it.
fn default_text(p: &ParamSpec) -> String {
    match p.unit {
        ParamUnit::Time => exact_time(p.default),
        ParamUnit::Count => p.default.to_string(),
    }
}

/// Returns the text table: key, default with unit, description and source, one parameter per row, then how
/// to override them.
pub(crate) fn render_text(params: &[ParamSpec]) -> String {
    let key_w = params.iter().map(|p| p.key.len()).max().unwrap_or(0).max(3);
    let def_w = params
        .iter()
        .map(|p| default_text(p).len())
        .max()
        .unwrap_or(0)
        .max(7);
    let mut s = format!(
        "{:key_w$}  {:>def_w$}  DESCRIPTION — SOURCE\n",
        "KEY", "DEFAULT"
    );
    for p in params {
        let _ = writeln!(
            s,
            "{:key_w$}  {:>def_w$}  {} — {}",
            p.key,
            default_text(p),
            p.doc,
            p.source
        );
    }
    s.push_str(
        "\nTimes are overridden in a scenario's [timing] table with units (mm.cpu_fault = \"2us\"), counts as \
         integers;\ntime = \"zero\" makes every time 0 and ignores those overrides.\n",
    );
    s
}

/// Returns the JSON array: one `{key, unit, default, source, doc}` per parameter (`unit` is `"ns"` or
/// `"count"`; `default` is in that unit).
pub(crate) fn render_json(params: &[ParamSpec]) -> String {
    let rows: Vec<_> = params
        .iter()
        .map(|p| {
            json!({
                "key": p.key,
                "unit": p.unit.name(),
                "default": p.default,
                "source": p.source,
                "doc": p.doc,
            })
        })
        .collect();
    serde_json::to_string_pretty(&rows).expect("a JSON value always serializes") + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_print_in_the_largest_exact_unit() {
        assert_eq!(exact_time(0), "0ns");
        assert_eq!(exact_time(115), "115ns");
        assert_eq!(exact_time(1_500), "1.5us");
        assert_eq!(exact_time(1_000_001), "1.000001ms");
        assert_eq!(exact_time(80_000), "80us");
        assert_eq!(exact_time(10_000_000), "10ms");
    }
}
