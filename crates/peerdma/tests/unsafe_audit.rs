//! The workspace's `unsafe` audit: every `.rs` file of the repository is scanned, and the only `unsafe`
//! allowed is the one audited block of `crates/peerdma/src/bench/real.rs` (the MADV_DONTNEED advice of
//! `peerdma bench`), behind its `expect(unsafe_code)` attribute and `// SAFETY:` comment. The workspace
//! lint `unsafe_code = "deny"` stops it at compile time too; this test also covers crates that could
//! opt out of the workspace lints, build scripts and the fuzz targets.
#![expect(
    clippy::tests_outside_test_module,
    clippy::unwrap_used,
    reason = "an integration-test crate is all tests"
)]

use std::path::{Path, PathBuf};

/// The keyword, spelled in two halves so that this file does not contain it.
const KEYWORD: &str = concat!("un", "safe");

/// The file allowed to hold the one audited block, relative to the repository root.
const AUDITED: &str = "crates/peerdma/src/bench/real.rs";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .unwrap()
        .to_path_buf()
}

/// Every `.rs` file under `dir`, skipping build outputs and hidden directories.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if e.file_type().unwrap().is_dir() {
            if name != "target" && !name.starts_with('.') {
                rust_files(&p, out);
            }
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The source with comments, string and character literals blanked out (lines kept), so that only code
/// is searched: prose about the keyword is fine, code using it is not.
fn code_only(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < b.len() {
        let rest = &src[i..];
        if rest.starts_with("//") {
            let end = rest.find('\n').unwrap_or(rest.len());
            i += end;
        } else if rest.starts_with("/*") {
            let end = rest.find("*/").map_or(rest.len(), |e| e + 2);
            out.extend(rest[..end].chars().filter(|&c| c == '\n'));
            i += end;
        } else if let Some(hashes) = raw_string_start(rest) {
            let close = format!("\"{}", "#".repeat(hashes));
            let body = hashes + 2;
            let end = rest[body..]
                .find(&close)
                .map_or(rest.len(), |e| body + e + close.len());
            out.extend(rest[..end].chars().filter(|&c| c == '\n'));
            i += end;
        } else if b[i] == b'"' {
            let mut j = i + 1;
            while j < b.len() && b[j] != b'"' {
                j += if b[j] == b'\\' { 2 } else { 1 };
            }
            out.extend(src[i..(j + 1).min(b.len())].chars().filter(|&c| c == '\n'));
            out.push(' ');
            i = j + 1;
        } else if b[i] == b'\''
            && rest.len() >= 3
            && (rest.as_bytes()[2] == b'\'' || rest.as_bytes()[1] == b'\\')
        {
            // A char literal ('x' or '\n'); a lifetime has no closing quote right after one char.
            let end = rest[1..].find('\'').map_or(1, |e| e + 2);
            out.push(' ');
            i += end;
        } else {
            let c = rest.chars().next().unwrap();
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// `r"` / `r#"` at the start of `s` (not inside an identifier): the number of hashes.
fn raw_string_start(s: &str) -> Option<usize> {
    let rest = s.strip_prefix('r').or_else(|| s.strip_prefix("br"))?;
    let hashes = rest.bytes().take_while(|&c| c == b'#').count();
    (rest.as_bytes().get(hashes) == Some(&b'"')).then_some(hashes)
}

/// The (1-based) lines of `code` where the keyword appears as a whole identifier.
fn keyword_lines(code: &str) -> Vec<usize> {
    let mut lines = Vec::new();
    for (n, line) in code.lines().enumerate() {
        let idents = line.split(|c: char| !(c.is_alphanumeric() || c == '_'));
        if idents.into_iter().any(|w| w == KEYWORD) {
            lines.push(n + 1);
        }
    }
    lines
}

#[test]
fn the_scanner_sees_code_and_skips_prose() {
    let kw = KEYWORD;
    let src = format!(
        "// {kw} in a comment\n/* {kw} */ fn a() {{}}\nlet s = \"{kw} {{\";\nlet r = r#\"{kw}\"#;\n{kw} {{ x() }}\nlet c = '\"'; {kw} fn f() {{}}\nlet n = {kw}_code;\n"
    );
    assert_eq!(keyword_lines(&code_only(&src)), [5, 6]);
}

#[test]
fn unsafe_appears_only_in_the_one_audited_block() {
    let root = repo_root();
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    assert!(
        files.len() > 50,
        "the scan found only {} files under {}",
        files.len(),
        root.display()
    );
    let mut found = Vec::new();
    let mut audited = Vec::new();
    for f in &files {
        let src = std::fs::read_to_string(f).unwrap();
        let rel = f
            .strip_prefix(&root)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        for line in keyword_lines(&code_only(&src)) {
            if rel == AUDITED {
                audited.push((
                    line,
                    src.lines().nth(line - 1).unwrap_or("").trim().to_owned(),
                ));
            } else {
                found.push(format!("{rel}:{line}"));
            }
        }
    }
    assert!(found.is_empty(), "`{KEYWORD}` outside {AUDITED}: {found:?}");
    assert_eq!(
        audited.len(),
        1,
        "{AUDITED} must hold exactly one `{KEYWORD}` block: {audited:?}"
    );
    let (line, text) = &audited[0];
    assert!(
        text.starts_with(&format!("{KEYWORD} {{")),
        "the audited use must be a block, found `{text}`"
    );
    let src = std::fs::read_to_string(root.join(AUDITED)).unwrap();
    let before: Vec<&str> = src.lines().take(line - 1).collect();
    let comment_above = before
        .iter()
        .rev()
        .take_while(|l| l.trim_start().starts_with("//"))
        .any(|l| l.trim_start().starts_with("// SAFETY:"));
    assert!(
        comment_above,
        "the audited block needs a `// SAFETY:` comment right above it"
    );
    let lint = format!("{KEYWORD}_code");
    let code = code_only(&src);
    let opt_outs = code
        .split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .filter(|w| *w == lint)
        .count();
    assert_eq!(
        opt_outs, 1,
        "exactly one item of {AUDITED} may opt out of the lint"
    );
}
