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
/// Every `pci` device key and P2P / DMA op, so that edits reach the topology-dependent checks too.
const VALID_P2P: &str = include_str!("data/every_p2p_op.toml");

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

    #[test]
    fn edits_of_a_valid_p2p_scenario_never_panic(edits in proptest::collection::vec(edit_strategy(), 1..6)) {
        let mut text = VALID_P2P.to_owned();
        for edit in &edits {
            text = apply(&text, edit);
        }
        parse_is_total(&text);
    }

    /// Swaps the value of one `key = "..."` in the P2P fixture for another word the grammar knows, so that
    /// references, keywords and sizes meet each other's values.
    #[test]
    fn swapped_words_in_a_p2p_scenario_never_panic(
        swaps in proptest::collection::vec((any::<Index>(), proptest::sample::select(WORDS)), 1..4),
    ) {
        let mut text = VALID_P2P.to_owned();
        for (at, word) in &swaps {
            let quotes: Vec<usize> = text.match_indices(" = \"").map(|(i, _)| i + 4).collect();
            let start = quotes[at.index(quotes.len())];
            let end = start + text[start..].find('"').unwrap_or(0);
            text.replace_range(start..end, word);
        }
        parse_is_total(&text);
    }
}

/// Values that are valid somewhere in a scenario: op names, device, export, handle and mapping names,
/// keywords and sizes.
const WORDS: &[&str] = &[
    "p2pmem.mmap",
    "bar.mmap",
    "dma.map",
    "dma_sg.write",
    "dma_sg.read",
    "dma_sg.release",
    "device.remove",
    "dmabuf.move_notify",
    "mmap",
    "load",
    "ssd",
    "gpu0",
    "nic",
    "nvme0",
    "nic0",
    "sw0.d0",
    "rp0",
    "vram",
    "pinned_vram",
    "h",
    "lt",
    "cmb",
    "bar",
    "ram",
    "pci",
    "dmirror",
    "dma",
    "dma-lazy",
    "identity",
    "short-term",
    "long-term",
    "mirror",
    "shared",
    "private",
    "write",
    "p2p",
    "SIGBUS",
    "bus:4KiB",
    "0",
    "4KiB",
    "1MiB",
    "0x3800_0000_0000",
    "",
];

#[test]
fn the_fixture_parses() {
    parse("every_op.toml", VALID).unwrap();
}
