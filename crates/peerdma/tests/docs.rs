//! Docs that resolve: every repository file path that the README, ARCHITECTURE.md, `docs/` and the CLI's
//! `--help` texts cite exists in the repository, so someone with only the repository can follow each one.
//!
//! A cited path is a Markdown link target, or a token with a `/` ending in `.md`, `.toml`, `.json`, `.rs` or
//! `.sh`. Not checked: URLs, globs and placeholders (`*`, `<`, `{`), names in double quotes (a doc naming an
//! old citation form it explains), kernel sources (`.c`, `.h`: they are in Linux, not here).
#![expect(
    clippy::tests_outside_test_module,
    reason = "an integration-test crate is all tests"
)]

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

const EXTS: [&str; 5] = [".md", ".toml", ".json", ".rs", ".sh"];

fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric()
        || matches!(
            c,
            '_' | '.' | '/' | '-' | '*' | '<' | '>' | '{' | '}' | '%' | '#'
        )
}

/// The paths `text` cites, with whether each is a Markdown link target (resolved against the citing file's
/// directory first).
fn cited(text: &str) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    // Markdown link targets.
    let mut rest = text;
    while let Some(i) = rest.find("](") {
        let after = &rest[i + 2..];
        if let Some(end) = after.find(')') {
            let target = after[..end].split('#').next().unwrap_or("");
            if !target.is_empty() && !target.contains("://") && !target.starts_with('#') {
                out.push((target.to_owned(), true));
            }
        }
        rest = &rest[i + 2..];
    }
    // Plain tokens, outside double quotes.
    for line in text.lines() {
        let mut in_quotes = false;
        let mut token = String::new();
        for c in line.chars().chain(std::iter::once(' ')) {
            if c == '"' {
                in_quotes = !in_quotes;
                token.clear();
                continue;
            }
            if is_path_char(c) {
                token.push(c);
                continue;
            }
            let t = token.trim_end_matches(['.', '#']).to_owned();
            token.clear();
            if in_quotes || c == '(' && t.is_empty() {
                continue;
            }
            let t = t.split('#').next().unwrap_or("").to_owned();
            if t.contains('/')
                && EXTS.iter().any(|e| t.ends_with(e))
                && !t.contains(['*', '<', '>', '{', '}', '%'])
                && !t.starts_with("//")
                && !line.contains(&format!("://{t}"))
                && !line.contains(&format!("]({t}"))
            {
                out.push((t, false));
            }
        }
    }
    out
}

fn check(name: &str, dir: &Path, text: &str, missing: &mut Vec<String>) {
    for (p, link) in cited(text) {
        let from_dir = dir.join(&p);
        let from_root = root().join(&p);
        let ok = if link {
            from_dir.exists()
        } else {
            from_root.exists() || from_dir.exists()
        };
        if !ok {
            missing.push(format!("{name}: {p}"));
        }
    }
}

#[test]
fn every_path_the_readme_and_docs_cite_exists() {
    let mut missing = Vec::new();
    let mut files = vec![root().join("README.md"), root().join("ARCHITECTURE.md")];
    for e in std::fs::read_dir(root().join("docs")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "md") {
            files.push(p);
        }
    }
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        check(
            &f.display().to_string(),
            f.parent().unwrap(),
            &text,
            &mut missing,
        );
    }
    assert!(
        missing.is_empty(),
        "cited paths that do not exist:\n{}",
        missing.join("\n")
    );
}

#[test]
fn every_path_the_help_texts_cite_exists() {
    let mut missing = Vec::new();
    for sub in [
        "",
        "run",
        "check",
        "sweep",
        "link",
        "params",
        "ops",
        "topo",
        "completions",
    ] {
        let mut args: Vec<&str> = sub.split_whitespace().collect();
        args.push("--help");
        let out = Command::new(env!("CARGO_BIN_EXE_peerdma"))
            .current_dir(root())
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "peerdma {sub} --help");
        let text = String::from_utf8_lossy(&out.stdout);
        check(
            &format!("peerdma {sub} --help"),
            &root(),
            &text,
            &mut missing,
        );
    }
    assert!(
        missing.is_empty(),
        "cited paths that do not exist:\n{}",
        missing.join("\n")
    );
}

#[test]
fn the_checker_finds_paths_and_skips_what_it_should() {
    let c = cited(
        "see `docs/a.md` and [b](b.md#x), not \"spec/old.md §1\", `mm/gup.c`, `results/*.jsonl`, \
         https://x.org/y.md",
    );
    let got: Vec<&str> = c.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(got, ["b.md", "docs/a.md"]);
}
