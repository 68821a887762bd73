//! The `expect` tables of steps: outcomes, errnos, counters, events, durations with tolerances, bytes and
//! patterns a step must produce.

use peerdma_core::Errno;
use toml::de::DeValue;

use crate::ast::{Expect, Signal};
use crate::ops::{Op, OpSpec};
use crate::params;
use crate::pattern::Pattern;
use crate::units;

use super::{
    ALL_EXPECT_KEYS, ANY_OP_EXPECT_KEYS, EVERY_STEP_EXPECT_KEYS, NOTIFIER_EVENTS, Parser, Result,
    Value, describe, list,
};

impl Parser<'_> {
    pub(super) fn expect(&self, v: &Value<'_>, spec: &OpSpec, op: &Op) -> Result<Expect> {
        let t = self.table(v, "an `expect` table like `{ errno = \"EFAULT\" }`")?;
        let allowed = spec.expect_keys;
        for (key, _) in &t.entries {
            let key_name: &str = key.get_ref().as_ref();
            if self.token && matches!(key_name, "data" | "value") {
                return Err(self.err(
                    &key.span(),
                    format!(
                        "`expect.{key_name}` compares the bytes read, but `[sim] data = \"token\"` keeps a \
                         version per page instead of bytes (reads return zeros); the oracle still checks \
                         every read against the last write"
                    ),
                ));
            }
            if allowed.contains(&key_name)
                || EVERY_STEP_EXPECT_KEYS.contains(&key_name)
                || ANY_OP_EXPECT_KEYS.contains(&key_name)
            {
                continue;
            }
            let message = if ALL_EXPECT_KEYS.contains(&key_name) {
                format!(
                    "`expect.{key_name}` is not checked for a `{}` step; expected one of: {}",
                    spec.name,
                    list(allowed.iter().copied())
                )
            } else {
                format!(
                    "unknown key `{key_name}` in `expect`; expected one of: {}{}",
                    list(allowed.iter().copied()),
                    params::did_you_mean(
                        key_name,
                        allowed.iter().chain(ANY_OP_EXPECT_KEYS).copied()
                    )
                )
            };
            return Err(self.err(&key.span(), message));
        }
        let mut expect = Expect::default();
        if let Some(v) = t.get("errno") {
            if matches!(v.get_ref(), DeValue::String(s) if s.trim() == "any") {
                expect.any_errno = true;
            } else {
                expect.errno = Some(self.errno(v)?);
            }
        }
        if let Some(v) = t.get("cpages") {
            expect.cpages = Some(self.uint(v, "cpages")?);
        }
        if let Some(v) = t.get("faults") {
            expect.faults = Some(self.uint(v, "faults")?);
        }
        if let Some(v) = t.get("data") {
            if let DeValue::Table(_) = v.get_ref() {
                expect.data_one_of = self.one_of(v)?;
            } else {
                expect.data = Some(self.pattern(v, "data")?);
            }
        }
        if let Some(v) = t.get("counters") {
            let c = self.table(v, "a table of counters like `{ \"cpu.cow_copy\" = 1 }`")?;
            for (key, v) in &c.entries {
                let name: &str = key.get_ref().as_ref();
                expect.counters.push((name.to_owned(), self.uint(v, name)?));
            }
        }
        if let Some(v) = t.get("events") {
            let e = self.table(v, "a table of device files like `{ m = [\"clear\"] }`")?;
            for (key, v) in &e.entries {
                let fd: &str = key.get_ref().as_ref();
                let DeValue::Array(items) = v.get_ref() else {
                    return Err(self.err(
                        &v.span(),
                        format!(
                            "expected a list of notifier events like `[\"clear\"]` for `events.{fd}`, found {}",
                            describe(v.get_ref())
                        ),
                    ));
                };
                let mut events = Vec::with_capacity(items.len());
                for item in items {
                    events.push(self.keyword(item, "events", NOTIFIER_EVENTS)?);
                }
                expect.events.push((fd.to_owned(), events));
            }
        }
        if let Some(v) = t.get("bytes") {
            expect.bytes = Some(self.bytes(v)?);
        }
        if let Some(v) = t.get("value") {
            let value = self.uint(v, "value")?;
            let len = op.load_len();
            let Some(len @ (1 | 2 | 4 | 8)) = len else {
                let found = len.map_or_else(|| "no `len`".to_owned(), |l| format!("len {l}"));
                return Err(self.err(
                    &v.span(),
                    format!("`expect.value` needs a `load` with `len` of 1, 2, 4 or 8 bytes, found {found}"),
                ));
            };
            if len < 8 && value >> (len * 8) != 0 {
                return Err(self.err(
                    &v.span(),
                    format!(
                        "expected a value that fits in {len} bytes for `value`, found {value:#x}"
                    ),
                ));
            }
            expect.value = Some(value);
        }
        if let Some(v) = t.get("signal") {
            expect.signal = Some(self.keyword(
                v,
                "signal",
                &[("SIGSEGV", Signal::Segv), ("SIGBUS", Signal::Bus)],
            )?);
        }
        if let Some(v) = t.get("segments") {
            expect.segments = Some(self.segments(v)?);
        }
        if let Some(v) = t.get("pinned") {
            expect.pinned = Some(self.uint(v, "pinned")?);
        }
        if let Some(v) = t.get("dma_addr") {
            expect.dma_addr = Some(self.uint(v, "dma_addr")?);
        }
        if let Some(v) = t.get("violation") {
            let kinds: Vec<(&str, peerdma_mm::ViolationKind)> = peerdma_mm::ViolationKind::ALL
                .iter()
                .map(|&k| (k.key(), k))
                .collect();
            expect.violation = Some(self.keyword(v, "violation", &kinds)?);
        }
        if let Some(v) = t.get("status") {
            expect.status = Some(self.string(v, "status")?.to_owned());
        }
        for (key, field) in [
            ("atc_hit_pct", &mut expect.atc_hit_pct),
            ("translation_requests", &mut expect.translation_requests),
        ] {
            if let Some(v) = t.get(key) {
                *field = Some(self.bounds(v, key)?);
            }
        }
        if let Some(v) = t.get("duration") {
            expect.duration = Some(self.time(v, "duration")?);
        }
        if let Some(v) = t.get("tolerance") {
            if expect.duration.is_none() {
                return Err(self.err(
                    &v.span(),
                    "`expect.tolerance` needs `expect.duration` (the value it is a tolerance of)"
                        .to_owned(),
                ));
            }
            expect.tolerance = self.tolerance(v)?;
        }
        Ok(expect)
    }

    /// `expect.data = { one_of = ["u32:1", "u32:2"] }`: at least one pattern.
    pub(super) fn one_of(&self, v: &Value<'_>) -> Result<Vec<Pattern>> {
        let t = self.table(v, "a pattern or `{ one_of = [PATTERN, ...] }`")?;
        self.allow(&t, &["one_of"])?;
        let Some(list) = t.get("one_of") else {
            return Err(self.err(
                &t.span,
                "expected `one_of = [PATTERN, ...]` in `data`, found an empty table",
            ));
        };
        let DeValue::Array(items) = list.get_ref() else {
            return Err(self.err(
                &list.span(),
                format!(
                    "expected a list of patterns like `[\"byte:0x1\", \"byte:0x2\"]` for `one_of`, found {}",
                    describe(list.get_ref())
                ),
            ));
        };
        if items.is_empty() {
            return Err(self.err(
                &list.span(),
                "expected at least one pattern in `one_of`, found an empty list",
            ));
        }
        items.iter().map(|i| self.pattern(i, "one_of")).collect()
    }

    /// An inclusive `[MIN, MAX]` pair of integers.
    pub(super) fn bounds(&self, v: &Value<'_>, key: &str) -> Result<(u64, u64)> {
        let hint = format!("expected `[MIN, MAX]` (two integers, MIN <= MAX) for `{key}`");
        let DeValue::Array(items) = v.get_ref() else {
            return Err(self.err(&v.span(), hint));
        };
        let (Some(lo), Some(hi), 2) = (items.first(), items.get(1), items.len()) else {
            return Err(self.err(&v.span(), hint));
        };
        let (lo, hi) = (self.uint(lo, key)?, self.uint(hi, key)?);
        if lo > hi {
            return Err(self.err(&v.span(), hint));
        }
        Ok((lo, hi))
    }

    /// `expect.segments`: `["bus:64KiB", "ram:8KiB"]`.
    pub(super) fn segments(&self, v: &Value<'_>) -> Result<Vec<(String, u64)>> {
        const KINDS: [&str; 3] = ["ram", "bus", "host-bridge"];
        let hint = "expected a list of `kind:len` strings like `[\"bus:64KiB\", \"ram:4KiB\"]` (kinds: `ram`, \
                    `bus`, `host-bridge`)";
        let DeValue::Array(items) = v.get_ref() else {
            return Err(self.err(
                &v.span(),
                format!("{hint}, found {}", describe(v.get_ref())),
            ));
        };
        let mut out = Vec::new();
        for item in items {
            let text = self.string(item, "segments")?;
            let Some((kind, len)) = text.split_once(':') else {
                return Err(self.err(
                    &item.span(),
                    format!(
                        "expected a segment `kind:len` like `bus:64KiB` in `segments`, found `{text}` (kinds: \
                         `ram`, `bus`, `host-bridge`)"
                    ),
                ));
            };
            let kind = kind.trim();
            if !KINDS.contains(&kind) {
                return Err(self.err(
                    &item.span(),
                    format!(
                        "unknown segment kind `{kind}` in `{text}`; expected one of: {}",
                        list(KINDS)
                    ),
                ));
            }
            let len = units::parse_size(len.trim()).map_err(|e| {
                self.err(&item.span(), format!("bad length in segment `{text}`: {e}"))
            })?;
            if len == 0 {
                return Err(self.err(
                    &item.span(),
                    format!("expected a non-zero length in segment `{text}`"),
                ));
            }
            out.push((kind.to_owned(), len));
        }
        Ok(out)
    }

    pub(super) fn errno(&self, v: &Value<'_>) -> Result<Option<Errno>> {
        let expected =
            "expected an errno name like `EFAULT` or `EINVAL`, `ok` (or `0`) for success, or `any`";
        match v.get_ref() {
            DeValue::Integer(i) if i.as_str() == "0" => Ok(None),
            DeValue::String(s) => {
                let s = s.trim();
                if s == "ok" || s == "0" {
                    return Ok(None);
                }
                let name = s.strip_prefix('-').unwrap_or(s);
                Errno::from_name(name).map(Some).ok_or_else(|| {
                    self.err(
                        &v.span(),
                        format!(
                            "unknown errno `{s}`; {expected}; known: {}",
                            list(Errno::ALL.iter().map(|e| e.name()))
                        ),
                    )
                })
            }
            other => Err(self.err(&v.span(), format!("{expected}, found {}", describe(other)))),
        }
    }

    pub(super) fn bytes(&self, v: &Value<'_>) -> Result<Vec<u8>> {
        match v.get_ref() {
            DeValue::Array(items) => items
                .iter()
                .map(|item| {
                    let b = self.uint_as(item, "bytes", "a byte")?;
                    u8::try_from(b).map_err(|_| {
                        self.err(
                            &item.span(),
                            format!("expected a byte from 0 to 0xff in `bytes`, found {b:#x}"),
                        )
                    })
                })
                .collect(),
            DeValue::String(s) => s
                .split_whitespace()
                .map(|token| {
                    let digits = token
                        .strip_prefix("0x")
                        .or_else(|| token.strip_prefix("0X"))
                        .unwrap_or(token);
                    if (1..=2).contains(&digits.len())
                        && let Ok(b) = u8::from_str_radix(digits, 16)
                    {
                        return Ok(b);
                    }
                    Err(self.err(
                        &v.span(),
                        format!(
                            "expected hexadecimal bytes separated by spaces like \"ff 0a 01\" in `bytes`, \
                             found `{token}`"
                        ),
                    ))
                })
                .collect(),
            other => Err(self.err(
                &v.span(),
                format!(
                    "expected a list of bytes like `[0x01, 0xff]` or a string like \"01 ff\" for `bytes`, found {}",
                    describe(other)
                ),
            )),
        }
    }
}
