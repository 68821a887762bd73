//! No input makes the parser panic: random bytes and random edits of a valid scenario either parse or give a
//! located error whose position lies inside the text.
#![expect(
    clippy::tests_outside_test_module,
    reason = "an integration-test crate is all tests"
)]

use peerdma_scenario::parse;
use proptest::prelude::*;
use proptest::sample::Index;

const VALID: &str = include_str!("data/every_op.toml");

/// Characters that matter to TOML and to the scenario grammar, so that edits often reach deep validation.
const INTERESTING: &[char] = &[
    '{', '}', '[', ']', '=', ',', '"', '\'', '.', '+', '-', '0', '1', '9', 'x', 'f', 'K', 'i', 'B',
    ' ', '\n', '#', '_', 'µ', '\t', '\r',
];

/// Parses `text` and checks that any error points inside it and renders.
fn parse_is_total(text: &str) {
    if let Err(err) = parse("fuzz.toml", text) {
        let nr_lines = text.split('\n').count();
        assert!(err.line >= 1 && err.line <= nr_lines, "{err}");
        assert!(err.col >= 1, "{err}");
        assert!(!err.message.is_empty());
        assert!(err.render().contains('^'));
    }
}

/// One edit of a text, at a character position.
#[derive(Debug, Clone)]
enum Edit {
    Delete(Index),
    Insert(Index, char),
    Replace(Index, char),
    /// Removes everything after the position.
    Truncate(Index),
    /// Repeats the line at the position.
    DuplicateLine(Index),
}

fn edit_strategy() -> impl Strategy<Value = Edit> {
    let ch = prop_oneof![3 => proptest::sample::select(INTERESTING), 1 => any::<char>()];
    prop_oneof![
        any::<Index>().prop_map(Edit::Delete),
        (any::<Index>(), ch.clone()).prop_map(|(i, c)| Edit::Insert(i, c)),
        (any::<Index>(), ch).prop_map(|(i, c)| Edit::Replace(i, c)),
        any::<Index>().prop_map(Edit::Truncate),
        any::<Index>().prop_map(Edit::DuplicateLine),
    ]
}

fn apply(text: &str, edit: &Edit) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    if chars.is_empty() {
        return text.to_owned();
    }
    match edit {
        Edit::Delete(i) => {
            chars.remove(i.index(chars.len()));
        }
        Edit::Insert(i, c) => chars.insert(i.index(chars.len() + 1), *c),
        Edit::Replace(i, c) => {
            let i = i.index(chars.len());
            chars[i] = *c;
        }
        Edit::Truncate(i) => chars.truncate(i.index(chars.len())),
        Edit::DuplicateLine(i) => {
            let lines: Vec<&str> = text.split_inclusive('\n').collect();
            let n = i.index(lines.len());
            let mut out: String = lines[..=n].concat();
            out.push_str(lines[n]);
            out.push_str(&lines[n + 1..].concat());
            return out;
        }
    }
    chars.into_iter().collect()
}

// 256 cases each by default; set PROPTEST_CASES for a longer run.
proptest! {
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        parse_is_total(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn random_toml_like_text_never_panics(text in "[\\[\\]{}=,\"a-z0-9_.+\\- \n]{0,200}") {
        parse_is_total(&text);
    }

    #[test]
    fn edits_of_a_valid_scenario_never_panic(edits in proptest::collection::vec(edit_strategy(), 1..6)) {
        let mut text = VALID.to_owned();
        for edit in &edits {
            text = apply(&text, edit);
        }
        parse_is_total(&text);
    }
}

#[test]
fn the_fixture_parses() {
    parse("every_op.toml", VALID).unwrap();
}
