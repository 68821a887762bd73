//! Data patterns: what a step writes (`store`, `pwrite`, `dmirror.write`, a file's initial contents) and what
//! an expectation reads back (`expect.data`).
//!
//! A pattern is a function from a byte position to a byte value; [`Pattern::fill`] writes it into a buffer and
//! [`Pattern::check`] compares a buffer against it and reports the first difference.
//!
//! Invariants:
//! - Positions count from the start of the buffer passed to `fill`/`check` (the operation's range), never
//!   from an address: the same pattern gives the same bytes wherever the buffer lies.
//! - The `u32` patterns are little-endian 32-bit words at positions `4k..4k+4` of the buffer; a buffer whose
//!   length is not a multiple of 4 ends with the first bytes of the last word. Word values wrap like C
//!   `unsigned int` arithmetic (`-index` is two's complement, as the kernel's hmm-tests write `ptr[i] = -i`).
//! - In a segment list every segment is laid out at its own position in the buffer, and `u32:index` inside a
//!   segment keeps counting from the start of the *whole* buffer (so `[{ len = "4KiB", pattern = "zero" },
//!   { pattern = "u32:index" }]` equals `u32:index` except for a zeroed first page). Bytes past the last
//!   segment (when every segment has a `len`) are neither written nor checked.

use std::fmt;
use std::str::FromStr;

use crate::units::{UnitError, parse_number};

/// A data pattern, as written in a scenario file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    /// `"zero"`: every byte 0.
    Zero,
    /// `"byte:0xNN"`: every byte the same value.
    Byte(u8),
    /// `"u32:index"`, `"u32:index+N"`, `"u32:-index"`, `"u32:-index-N"`: the u32 at index k holds `k + add`,
    /// or `-(k + add)` when `negate` is set (wrapping).
    U32Index {
        /// Whether the value is negated (`-index`).
        negate: bool,
        /// The constant added to the index before negation.
        add: u32,
    },
    /// `"u32:N"`: the constant N in every u32.
    U32(u32),
    /// A list of segments laid out in order from the start of the buffer.
    Segments(Vec<Segment>),
}

/// One part of a segment list: `{ len = SIZE, pattern = PATTERN }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// Length in bytes; `None` (only on the last segment) takes the rest of the buffer.
    pub len: Option<u64>,
    /// The pattern of this segment's bytes.
    pub pattern: Pattern,
}

/// The first place where a buffer differs from a pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// Offset from the start of the buffer of the first reported byte: the start of the differing u32 for the
    /// `u32` patterns (clipped to the buffer and segment), the differing byte otherwise.
    pub offset: u64,
    /// The bytes the pattern expects at `offset` (1 to 4 bytes).
    pub expected: Vec<u8>,
    /// The bytes found at `offset` (same length as `expected`).
    pub found: Vec<u8>,
}

/// A malformed pattern; the message says what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct PatternError {
    /// What was expected and what was found.
    pub message: String,
}

impl PatternError {
    fn expected(found: &str) -> Self {
        Self {
            message: format!(
                "expected a pattern: `zero`, `byte:0xNN`, `u32:index`, `u32:index+N`, `u32:-index`, \
                 `u32:-index-N` or `u32:N`, found `{found}`"
            ),
        }
    }
}

impl Pattern {
    /// Returns whether the pattern is a segment list.
    pub fn is_segments(&self) -> bool {
        matches!(self, Self::Segments(_))
    }

    /// Writes the pattern into `buf`, positions counted from `buf[0]`.
    ///
    /// # Examples
    /// ```
    /// use peerdma_scenario::Pattern;
    /// let mut buf = [0u8; 8];
    /// "u32:-index".parse::<Pattern>().unwrap().fill(&mut buf);
    /// assert_eq!(buf, [0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
    /// ```
    pub fn fill(&self, buf: &mut [u8]) {
        self.fill_at(buf, 0);
    }

    /// Writes bytes `offset..offset + out.len()` of the pattern laid over a buffer of `total` bytes into
    /// `out`: the same bytes [`Pattern::fill`] of the whole buffer puts there (bytes no segment covers are
    /// left as they are), without the whole buffer — a streamed `store` fills one page at a time.
    ///
    /// # Examples
    /// ```
    /// use peerdma_scenario::Pattern;
    /// let p: Pattern = "u32:index".parse().unwrap();
    /// let mut whole = [0u8; 16];
    /// p.fill(&mut whole);
    /// let mut part = [0u8; 6];
    /// p.fill_window(16, 5, &mut part);
    /// assert_eq!(part, whole[5..11]);
    /// ```
    pub fn fill_window(&self, total: usize, offset: usize, out: &mut [u8]) {
        self.window_at(total, 0, offset, out);
    }

    /// [`Pattern::fill_window`] of a pattern whose buffer starts at position `base` of the whole buffer.
    fn window_at(&self, total: usize, base: usize, offset: usize, out: &mut [u8]) {
        match self {
            Self::Segments(segments) => {
                let end = offset.saturating_add(out.len());
                for (start, stop, pattern) in layout(segments, total) {
                    let (lo, hi) = (start.max(offset), stop.min(end));
                    if lo < hi {
                        pattern.window_at(
                            stop - start,
                            base.wrapping_add(start),
                            lo - start,
                            &mut out[lo - offset..hi - offset],
                        );
                    }
                }
            }
            _ => self.fill_at(out, base.wrapping_add(offset)),
        }
    }

    /// Compares `buf` against the pattern, positions counted from `buf[0]`.
    ///
    /// # Errors
    /// Returns the first [`Mismatch`] (lowest offset).
    pub fn check(&self, buf: &[u8]) -> Result<(), Mismatch> {
        self.check_at(buf, 0)
    }

    /// Fills `buf`, whose first byte is at position `base` of the whole buffer.
    fn fill_at(&self, buf: &mut [u8], base: usize) {
        match self {
            Self::Zero => buf.fill(0),
            Self::Byte(b) => buf.fill(*b),
            Self::U32Index { .. } | Self::U32(_) => {
                let mut i = 0;
                while i < buf.len() {
                    let pos = base.wrapping_add(i);
                    let skip = pos % 4;
                    let n = (4 - skip).min(buf.len() - i);
                    let word = self.word(pos / 4).to_le_bytes();
                    buf[i..i + n].copy_from_slice(&word[skip..skip + n]);
                    i += n;
                }
            }
            Self::Segments(segments) => {
                for (start, end, pattern) in layout(segments, buf.len()) {
                    pattern.fill_at(&mut buf[start..end], base.wrapping_add(start));
                }
            }
        }
    }

    /// Checks `buf`, whose first byte is at position `base` of the whole buffer; offsets in the mismatch are
    /// relative to `buf`.
    fn check_at(&self, buf: &[u8], base: usize) -> Result<(), Mismatch> {
        match self {
            Self::Zero | Self::Byte(_) => {
                let want = if let Self::Byte(b) = self { *b } else { 0 };
                match buf.iter().position(|&b| b != want) {
                    None => Ok(()),
                    Some(i) => Err(Mismatch {
                        offset: i as u64,
                        expected: vec![want],
                        found: vec![buf[i]],
                    }),
                }
            }
            Self::U32Index { .. } | Self::U32(_) => {
                let mut i = 0;
                while i < buf.len() {
                    let pos = base.wrapping_add(i);
                    let skip = pos % 4;
                    let n = (4 - skip).min(buf.len() - i);
                    let word = self.word(pos / 4).to_le_bytes();
                    if buf[i..i + n] != word[skip..skip + n] {
                        return Err(Mismatch {
                            offset: i as u64,
                            expected: word[skip..skip + n].to_vec(),
                            found: buf[i..i + n].to_vec(),
                        });
                    }
                    i += n;
                }
                Ok(())
            }
            Self::Segments(segments) => {
                for (start, end, pattern) in layout(segments, buf.len()) {
                    pattern
                        .check_at(&buf[start..end], base.wrapping_add(start))
                        .map_err(|m| Mismatch {
                            offset: m.offset + start as u64,
                            ..m
                        })?;
                }
                Ok(())
            }
        }
    }

    /// Returns the u32 at word index `k` for the `u32` patterns (0 for the others).
    fn word(&self, k: usize) -> u32 {
        #[expect(
            clippy::cast_possible_truncation,
            reason = "the index wraps like a C `unsigned int` counter"
        )]
        let k = k as u32;
        match *self {
            Self::U32Index { negate, add } => {
                let v = k.wrapping_add(add);
                if negate { v.wrapping_neg() } else { v }
            }
            Self::U32(v) => v,
            Self::Zero | Self::Byte(_) | Self::Segments(_) => 0,
        }
    }
}

/// Returns `(start, end, pattern)` for each segment clipped to a buffer of `len` bytes.
fn layout(segments: &[Segment], len: usize) -> impl Iterator<Item = (usize, usize, &Pattern)> {
    let mut start = 0usize;
    segments.iter().map_while(move |segment| {
        if start >= len {
            return None;
        }
        let seg_len = segment
            .len
            .map_or(usize::MAX, |l| usize::try_from(l).unwrap_or(usize::MAX));
        let end = start.saturating_add(seg_len).min(len);
        let item = (start, end, &segment.pattern);
        start = end;
        Some(item)
    })
}

impl FromStr for Pattern {
    type Err = PatternError;

    /// Parses a single pattern (`"zero"`, `"byte:0x5a"`, `"u32:index+3"`...); segment lists are TOML arrays
    /// and are built by the scenario parser.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let s = text.trim();
        if s == "zero" {
            return Ok(Self::Zero);
        }
        if let Some(value) = s.strip_prefix("byte:") {
            let v = parse_number(value).map_err(|_| PatternError::expected(text))?;
            return u8::try_from(v).map(Self::Byte).map_err(|_| PatternError {
                message: format!(
                    "expected a byte value from 0 to 0xff in `byte:`, found `{}`",
                    value.trim()
                ),
            });
        }
        let Some(body) = s.strip_prefix("u32:") else {
            return Err(PatternError::expected(text));
        };
        let body = body.trim();
        let (negate, rest) = match body.strip_prefix('-') {
            Some(rest) => (true, rest.trim_start()),
            None => (false, body),
        };
        let Some(after) = rest.strip_prefix("index") else {
            if negate {
                return Err(PatternError::expected(text));
            }
            return u32_operand(body, text).map(Self::U32);
        };
        let after = after.trim();
        if after.is_empty() {
            return Ok(Self::U32Index { negate, add: 0 });
        }
        // `index+N` and `-index-N` (the latter is -(k + N)).
        let sign = if negate { '-' } else { '+' };
        let operand = after
            .strip_prefix(sign)
            .ok_or_else(|| PatternError::expected(text))?;
        let add = u32_operand(operand, text)?;
        Ok(Self::U32Index { negate, add })
    }
}

/// Parses the N of a `u32:` pattern.
fn u32_operand(operand: &str, text: &str) -> Result<u32, PatternError> {
    let v = match parse_number(operand) {
        Ok(v) => v,
        Err(UnitError::Overflow(_)) => u64::MAX,
        Err(_) => return Err(PatternError::expected(text)),
    };
    u32::try_from(v).map_err(|_| PatternError {
        message: format!(
            "expected a value up to 0xffffffff in `u32:` pattern, found `{}`",
            operand.trim()
        ),
    })
}

/// Writes a u32 operand the way a person would: decimal when small, hexadecimal when large.
fn write_operand(f: &mut fmt::Formatter<'_>, v: u32) -> fmt::Result {
    if v < 0x1_0000 {
        write!(f, "{v}")
    } else {
        write!(f, "{v:#x}")
    }
}

impl fmt::Display for Pattern {
    /// Prints the pattern in scenario syntax; parsing the output gives the same pattern.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Zero => write!(f, "zero"),
            Self::Byte(b) => write!(f, "byte:{b:#04x}"),
            Self::U32Index { negate, add } => {
                write!(f, "u32:{}index", if *negate { "-" } else { "" })?;
                if *add != 0 {
                    write!(f, "{}", if *negate { "-" } else { "+" })?;
                    write_operand(f, *add)?;
                }
                Ok(())
            }
            Self::U32(v) => {
                write!(f, "u32:")?;
                write_operand(f, *v)
            }
            Self::Segments(segments) => {
                write!(f, "[")?;
                for (i, segment) in segments.iter().enumerate() {
                    if i > 0 {
                        write!(f, ", ")?;
                    }
                    write!(f, "{{ ")?;
                    if let Some(len) = segment.len {
                        write!(f, "len = {len}, ")?;
                    }
                    match &segment.pattern {
                        nested @ Self::Segments(_) => write!(f, "pattern = {nested} }}")?,
                        simple => write!(f, "pattern = \"{simple}\" }}")?,
                    }
                }
                write!(f, "]")
            }
        }
    }
}

impl fmt::Display for Mismatch {
    /// Prints `at offset 0x1000: expected 00 00 00 00, found 01 00 00 00`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hex = |bytes: &[u8]| {
            bytes
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        write!(
            f,
            "at offset {:#x}: expected {}, found {}",
            self.offset,
            hex(&self.expected),
            hex(&self.found)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(text: &str) -> Pattern {
        text.parse().unwrap()
    }

    fn filled(p: &Pattern, len: usize) -> Vec<u8> {
        let mut buf = vec![0xaa; len];
        p.fill(&mut buf);
        buf
    }

    fn words(buf: &[u8]) -> Vec<u32> {
        buf.chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    #[test]
    fn simple_patterns_parse() {
        assert_eq!(pattern("zero"), Pattern::Zero);
        assert_eq!(pattern("byte:0x5a"), Pattern::Byte(0x5a));
        assert_eq!(pattern("byte:7"), Pattern::Byte(7));
        assert_eq!(
            pattern("u32:index"),
            Pattern::U32Index {
                negate: false,
                add: 0
            }
        );
        assert_eq!(
            pattern("u32:index+5"),
            Pattern::U32Index {
                negate: false,
                add: 5
            }
        );
        assert_eq!(
            pattern("u32:-index"),
            Pattern::U32Index {
                negate: true,
                add: 0
            }
        );
        assert_eq!(
            pattern("u32:-index-3"),
            Pattern::U32Index {
                negate: true,
                add: 3
            }
        );
        assert_eq!(pattern("u32:3"), Pattern::U32(3));
        assert_eq!(pattern("u32:0xdeadbeef"), Pattern::U32(0xdead_beef));
    }

    #[test]
    fn malformed_patterns_say_what_was_expected() {
        for bad in [
            "",
            "zeros",
            "byte:",
            "byte:x",
            "u32:",
            "u32:idx",
            "u32:index-3",
            "u32:-index+3",
            "u32:-3",
            "u32:index+",
            "u32:index+1.5",
            "u64:3",
        ] {
            let err = bad.parse::<Pattern>().unwrap_err();
            assert!(
                err.message.starts_with("expected a pattern"),
                "{bad}: {err}"
            );
        }
        let err = "byte:0x100".parse::<Pattern>().unwrap_err();
        assert!(err.message.contains("0 to 0xff"), "{err}");
        let err = "u32:0x100000000".parse::<Pattern>().unwrap_err();
        assert!(err.message.contains("up to 0xffffffff"), "{err}");
    }

    #[test]
    fn u32_index_counts_words_from_buffer_start() {
        let buf = filled(&pattern("u32:index"), 16);
        assert_eq!(words(&buf), [0, 1, 2, 3]);
        let buf = filled(&pattern("u32:index+10"), 8);
        assert_eq!(words(&buf), [10, 11]);
    }

    #[test]
    fn u32_negative_index_is_twos_complement() {
        let buf = filled(&pattern("u32:-index"), 12);
        assert_eq!(words(&buf), [0, u32::MAX, u32::MAX - 1]);
        let buf = filled(&pattern("u32:-index-3"), 8);
        assert_eq!(
            words(&buf),
            [(-3i32).cast_unsigned(), (-4i32).cast_unsigned()]
        );
    }

    #[test]
    fn partial_last_word_gets_its_low_bytes() {
        let buf = filled(&pattern("u32:0x04030201"), 6);
        assert_eq!(buf, [1, 2, 3, 4, 1, 2]);
    }

    #[test]
    fn fill_then_check_round_trips() {
        for text in ["zero", "byte:0xff", "u32:index", "u32:-index-3", "u32:7"] {
            let p = pattern(text);
            for len in [0, 1, 3, 4, 5, 4096, 4099] {
                let buf = filled(&p, len);
                assert_eq!(p.check(&buf), Ok(()), "{text} len {len}");
            }
        }
    }

    #[test]
    fn check_reports_first_differing_word() {
        let p = pattern("u32:index");
        let mut buf = filled(&p, 64);
        buf[22] ^= 0x80;
        buf[40] ^= 1;
        let m = p.check(&buf).unwrap_err();
        assert_eq!(m.offset, 20);
        assert_eq!(m.expected, vec![5, 0, 0, 0]);
        assert_eq!(m.found, vec![5, 0, 0x80, 0]);
        assert_eq!(
            m.to_string(),
            "at offset 0x14: expected 05 00 00 00, found 05 00 80 00"
        );
    }

    #[test]
    fn check_reports_first_differing_byte() {
        let p = pattern("byte:0x11");
        let mut buf = filled(&p, 10);
        buf[7] = 0;
        let m = p.check(&buf).unwrap_err();
        assert_eq!(
            m,
            Mismatch {
                offset: 7,
                expected: vec![0x11],
                found: vec![0]
            }
        );
    }

    #[test]
    fn segments_are_laid_out_in_order() {
        let p = Pattern::Segments(vec![
            Segment {
                len: Some(8),
                pattern: Pattern::Byte(0xee),
            },
            Segment {
                len: Some(4),
                pattern: Pattern::Zero,
            },
            Segment {
                len: None,
                pattern: pattern("u32:index"),
            },
        ]);
        let buf = filled(&p, 20);
        assert_eq!(&buf[..8], &[0xee; 8]);
        assert_eq!(&buf[8..12], &[0; 4]);
        // u32:index keeps counting from the start of the whole buffer.
        assert_eq!(words(&buf[12..]), [3, 4]);
        assert_eq!(p.check(&buf), Ok(()));
    }

    #[test]
    fn segment_mismatch_offset_is_relative_to_buffer() {
        let p = Pattern::Segments(vec![
            Segment {
                len: Some(4096),
                pattern: Pattern::Zero,
            },
            Segment {
                len: None,
                pattern: pattern("u32:-index"),
            },
        ]);
        let mut buf = filled(&p, 8192);
        buf[4096 + 9] = 0x42;
        let m = p.check(&buf).unwrap_err();
        assert_eq!(m.offset, 4096 + 8);
        assert_eq!(m.expected, (-1026i32).to_le_bytes().to_vec());
    }

    #[test]
    fn bytes_past_the_last_segment_are_left_alone() {
        let p = Pattern::Segments(vec![Segment {
            len: Some(2),
            pattern: Pattern::Zero,
        }]);
        let buf = filled(&p, 4);
        assert_eq!(buf, [0, 0, 0xaa, 0xaa]);
        assert_eq!(p.check(&[0, 0, 1, 2]), Ok(()));
    }

    #[test]
    fn display_round_trips_through_parse() {
        for text in [
            "zero",
            "byte:0x05",
            "u32:index",
            "u32:index+7",
            "u32:-index",
            "u32:-index-3",
            "u32:12",
            "u32:0xdeadbeef",
        ] {
            assert_eq!(pattern(text).to_string(), text);
        }
        let p = Pattern::Segments(vec![
            Segment {
                len: Some(4096),
                pattern: Pattern::Zero,
            },
            Segment {
                len: None,
                pattern: pattern("u32:index"),
            },
        ]);
        assert_eq!(
            p.to_string(),
            r#"[{ len = 4096, pattern = "zero" }, { pattern = "u32:index" }]"#
        );
    }
    /// Every window of every chunk size, at unaligned offsets, equals the same bytes of the whole fill —
    /// including segment lists (nested, with and without a tail, and bytes past the last segment, which
    /// neither writes).
    #[test]
    fn fill_window_equals_the_same_bytes_of_the_whole_fill() {
        let inner = Pattern::Segments(vec![
            Segment {
                len: Some(3),
                pattern: pattern("byte:0x11"),
            },
            Segment {
                len: None,
                pattern: pattern("u32:-index-2"),
            },
        ]);
        let seg = |tail: bool| {
            Pattern::Segments(vec![
                Segment {
                    len: Some(4099),
                    pattern: pattern("u32:index+7"),
                },
                Segment {
                    len: Some(10),
                    pattern: inner.clone(),
                },
                Segment {
                    len: if tail { None } else { Some(4097) },
                    pattern: pattern("byte:0x5a"),
                },
            ])
        };
        let patterns = [
            pattern("zero"),
            pattern("byte:0x3c"),
            pattern("u32:index"),
            pattern("u32:-index-9"),
            pattern("u32:0xdeadbeef"),
            seg(true),
            seg(false),
        ];
        for p in &patterns {
            for total in [1, 5, 4096, 3 * 4096 + 3, 16_385] {
                let whole = filled(p, total);
                for chunk in [1, 3, 4096, 4093] {
                    for start in [0, 1, 2, 4098] {
                        let mut got = vec![0xaa; start.min(total)];
                        got.copy_from_slice(&whole[..start.min(total)]);
                        let mut off = start.min(total);
                        while off < total {
                            let n = chunk.min(total - off);
                            let mut buf = vec![0xaa; n];
                            p.fill_window(total, off, &mut buf);
                            got.extend_from_slice(&buf);
                            off += n;
                        }
                        assert_eq!(got, whole, "{p} total {total} chunk {chunk} from {start}");
                    }
                }
            }
        }
    }
}
