//! The value readers of the scenario parser: tables and their allowed keys, strings, names, keywords,
//! integers, sizes, times, addresses, protections and patterns, each reported at the value on failure.

use peerdma_core::SimDuration;
use toml::de::DeValue;

use crate::ast::{AddrError, AddrExpr, Prot, Tolerance};
use crate::params;
use crate::pattern::{Pattern, Segment};
use crate::units;

use super::{NameRef, Parser, RefKind, Result, Table, Value, describe, is_name, key_hint, list};

impl Parser<'_> {
    /// A NUMA node number for `key`: an integer below `nr_nodes` (one node per `[sim] memory` entry).
    pub(super) fn numa_node(&self, v: &Value<'_>, key: &str, nr_nodes: usize) -> Result<u32> {
        let node = self.uint(v, key)?;
        if node >= nr_nodes as u64 {
            let nodes = if nr_nodes == 1 {
                "the only node is 0".to_owned()
            } else {
                format!("nodes are 0 to {}", nr_nodes - 1)
            };
            return Err(self.err(
                &v.span(),
                format!(
                    "expected a NUMA node below {nr_nodes} for `{key}` ({nodes}: one per `[sim] memory` \
                     entry), found {node}"
                ),
            ));
        }
        Ok(u32::try_from(node).expect("below the node count"))
    }

    pub(super) fn table<'t, 'i>(&self, v: &'t Value<'i>, what: &str) -> Result<Table<'t, 'i>> {
        match v.get_ref() {
            DeValue::Table(table) => Ok(Table::new(table, v.span(), what)),
            other => Err(self.err(
                &v.span(),
                format!("expected {what}, found {}", describe(other)),
            )),
        }
    }

    /// Checks that every key of `t` is in `keys`.
    pub(super) fn allow(&self, t: &Table<'_, '_>, keys: &[&str]) -> Result<()> {
        for (key, _) in &t.entries {
            if !keys.contains(&key.get_ref().as_ref()) {
                return Err(self.err(
                    &key.span(),
                    format!(
                        "unknown key `{}` in {}; expected one of: {}{}",
                        key.get_ref(),
                        t.what,
                        list(keys.iter().copied()),
                        params::did_you_mean(key.get_ref(), keys.iter().copied())
                    ),
                ));
            }
        }
        Ok(())
    }

    pub(crate) fn required<'t, 'i>(&self, t: &Table<'t, 'i>, key: &str) -> Result<&'t Value<'i>> {
        t.get(key).ok_or_else(|| {
            self.err(
                &t.span,
                format!("{} needs `{key}` ({})", t.what, key_hint(key)),
            )
        })
    }

    /// Returns the tables of an array of tables (`[[thread]]`), or none when the key is absent.
    pub(super) fn array_of_tables<'t, 'i>(
        &self,
        top: &Table<'t, 'i>,
        key: &str,
    ) -> Result<Vec<Table<'t, 'i>>> {
        let Some(v) = top.get(key) else {
            return Ok(Vec::new());
        };
        let what = format!("a `[[{key}]]` table");
        let DeValue::Array(items) = v.get_ref() else {
            return Err(self.err(
                &v.span(),
                format!(
                    "expected `[[{key}]]` tables (an array of tables), found {}",
                    describe(v.get_ref())
                ),
            ));
        };
        items.iter().map(|item| self.table(item, &what)).collect()
    }

    // ----- scalar values -----

    pub(crate) fn string<'v>(&self, v: &'v Value<'_>, key: &str) -> Result<&'v str> {
        match v.get_ref() {
            DeValue::String(s) => Ok(s.as_ref()),
            other => Err(self.err(
                &v.span(),
                format!("expected a string for `{key}`, found {}", describe(other)),
            )),
        }
    }

    /// A name being defined (thread, process, device, file, fd).
    pub(crate) fn name(&self, v: &Value<'_>, key: &str) -> Result<String> {
        let s = self.string(v, key)?;
        if is_name(s) {
            Ok(s.to_owned())
        } else {
            Err(self.err(
                &v.span(),
                format!(
                    "expected a name (a letter or `_`, then letters, digits, `_`, `-` or `.`) for `{key}`, \
                     found `{s}`"
                ),
            ))
        }
    }

    /// A name being used: recorded to be resolved once the whole file is read.
    pub(crate) fn name_ref(&mut self, v: &Value<'_>, key: &str, kind: RefKind) -> Result<String> {
        let s = self.string(v, key)?.to_owned();
        self.refs.push(NameRef {
            kind,
            name: s.clone(),
            written: s.clone(),
            span: v.span(),
        });
        Ok(s)
    }

    pub(crate) fn keyword<T: Copy>(
        &self,
        v: &Value<'_>,
        key: &str,
        choices: &[(&str, T)],
    ) -> Result<T> {
        let expected = || {
            choices
                .iter()
                .map(|(name, _)| format!("`{name}`"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let DeValue::String(s) = v.get_ref() else {
            return Err(self.err(
                &v.span(),
                format!(
                    "expected one of {} for `{key}`, found {}",
                    expected(),
                    describe(v.get_ref())
                ),
            ));
        };
        choices
            .iter()
            .find(|(name, _)| *name == s.as_ref())
            .map(|&(_, value)| value)
            .ok_or_else(|| {
                self.err(
                    &v.span(),
                    format!("expected one of {} for `{key}`, found `{s}`", expected()),
                )
            })
    }

    pub(crate) fn boolean(&self, v: &Value<'_>, key: &str) -> Result<bool> {
        match v.get_ref() {
            DeValue::Boolean(b) => Ok(*b),
            other => Err(self.err(
                &v.span(),
                format!(
                    "expected a boolean (`true` or `false`) for `{key}`, found {}",
                    describe(other)
                ),
            )),
        }
    }

    /// A non-negative integer; `what` describes it ("an integer", "an integer number of pages").
    pub(crate) fn uint_as(&self, v: &Value<'_>, key: &str, what: &str) -> Result<u64> {
        let DeValue::Integer(int) = v.get_ref() else {
            return Err(self.err(
                &v.span(),
                format!(
                    "expected {what} for `{key}`, found {}",
                    describe(v.get_ref())
                ),
            ));
        };
        match i128::from_str_radix(int.as_str(), int.radix()) {
            Ok(n) if n < 0 => Err(self.err(
                &v.span(),
                format!("expected {what} of 0 or more for `{key}`, found {n}"),
            )),
            Ok(n) => u64::try_from(n).map_err(|_| {
                self.err(
                    &v.span(),
                    format!("expected {what} below 2^64 for `{key}`, found {n}, which overflows"),
                )
            }),
            Err(_) => Err(self.err(
                &v.span(),
                format!("expected {what} below 2^64 for `{key}`, found `{int}`, which overflows"),
            )),
        }
    }

    pub(crate) fn uint(&self, v: &Value<'_>, key: &str) -> Result<u64> {
        self.uint_as(v, key, "an integer")
    }

    /// A size: an integer (bytes) or a string with a unit.
    pub(crate) fn size(&self, v: &Value<'_>, key: &str) -> Result<u64> {
        match v.get_ref() {
            DeValue::Integer(_) => self.uint_as(v, key, "a size"),
            DeValue::String(s) => units::parse_size(s).map_err(|e| self.err(&v.span(), e.to_string())),
            other => Err(self.err(
                &v.span(),
                format!(
                    "expected a size like `4KiB` or `16 pages` (or an integer number of bytes) for `{key}`, \
                     found {}",
                    describe(other)
                ),
            )),
        }
    }

    /// A `len`: a size that is not zero.
    pub(crate) fn len(&self, v: &Value<'_>, key: &str) -> Result<u64> {
        let len = self.size(v, key)?;
        if len == 0 {
            return Err(self.err(
                &v.span(),
                format!("expected a non-zero length for `{key}`, found 0"),
            ));
        }
        Ok(len)
    }

    /// A time: an integer (nanoseconds) or a string with a unit.
    /// An optional size `key` of `t`, or `default`.
    pub(crate) fn opt_size(&self, t: &Table<'_, '_>, key: &str, default: u64) -> Result<u64> {
        t.get(key).map_or(Ok(default), |v| self.size(v, key))
    }

    /// An optional non-zero length `key` of `t`, or `default`.
    pub(crate) fn opt_len(&self, t: &Table<'_, '_>, key: &str, default: u64) -> Result<u64> {
        t.get(key).map_or(Ok(default), |v| self.len(v, key))
    }

    /// An optional boolean `key` of `t`, or `default`.
    pub(super) fn opt_bool(&self, t: &Table<'_, '_>, key: &str, default: bool) -> Result<bool> {
        t.get(key).map_or(Ok(default), |v| self.boolean(v, key))
    }

    pub(crate) fn time(&self, v: &Value<'_>, key: &str) -> Result<SimDuration> {
        match v.get_ref() {
            DeValue::Integer(_) => self
                .uint_as(v, key, "a time")
                .map(SimDuration::from_nanos),
            DeValue::String(s) => units::parse_time(s).map_err(|e| self.err(&v.span(), e.to_string())),
            other => Err(self.err(
                &v.span(),
                format!(
                    "expected a time like `250ns` or `2ms` (or an integer number of nanoseconds) for `{key}`, \
                     found {}",
                    describe(other)
                ),
            )),
        }
    }

    /// `expect.tolerance`: a percentage (`"2%"`, `"0.5%"`) or a time (`"10ns"`).
    pub(super) fn tolerance(&self, v: &Value<'_>) -> Result<Tolerance> {
        if let DeValue::String(s) = v.get_ref()
            && let Some(pct) = s.trim().strip_suffix('%')
        {
            let bad = || {
                self.err(
                    &v.span(),
                    format!("expected a percentage like `2%` or a time like `10ns` for `tolerance`, found `{s}`"),
                )
            };
            let (int, frac) = pct.trim().split_once('.').unwrap_or((pct.trim(), ""));
            if int.is_empty() && frac.is_empty() || frac.len() > 4 {
                return Err(bad());
            }
            let whole: u64 = if int.is_empty() {
                0
            } else {
                int.parse().map_err(|_| bad())?
            };
            let mut f = frac.to_owned();
            while f.len() < 4 {
                f.push('0');
            }
            let part: u64 = f.parse().map_err(|_| bad())?;
            // 1% = 10 000 ppm; four decimals of a percent are whole ppm.
            let ppm = whole
                .checked_mul(10_000)
                .and_then(|w| w.checked_add(part))
                .ok_or_else(bad)?;
            return Ok(Tolerance::RelativePpm(ppm));
        }
        Ok(Tolerance::Absolute(self.time(v, "tolerance")?))
    }

    /// An address: a raw one (integer or number string), or a symbolic one recorded for resolution.
    pub(crate) fn addr(&mut self, v: &Value<'_>, key: &str) -> Result<AddrExpr> {
        const EXPECTED: &str =
            "expected an address like `buf`, `buf+4KiB`, `buf-0x1000` or `0x7f0000000000`";
        let s = match v.get_ref() {
            DeValue::Integer(_) => return self.uint_as(v, key, "an address").map(AddrExpr::Raw),
            DeValue::String(s) => s.as_ref(),
            other => {
                return Err(self.err(
                    &v.span(),
                    format!("{EXPECTED} for `{key}`, found {}", describe(other)),
                ));
            }
        };
        let expr: AddrExpr = s
            .parse()
            .map_err(|e: AddrError| self.err(&v.span(), e.message))?;
        let AddrExpr::Sym { name, offset } = &expr else {
            return Ok(expr);
        };
        let (name, offset) = (name.clone(), *offset);
        self.refs.push(NameRef {
            kind: RefKind::Mapping { offset },
            name,
            written: s.to_owned(),
            span: v.span(),
        });
        Ok(expr)
    }

    pub(crate) fn prot(&self, v: &Value<'_>) -> Result<Prot> {
        let s = match v.get_ref() {
            DeValue::String(s) => s.as_ref(),
            other => {
                return Err(self.err(
                    &v.span(),
                    format!(
                        "expected a protection `none`, `r`, `rw`, `rx`, `rwx` or `w` for `prot`, found {}",
                        describe(other)
                    ),
                ));
            }
        };
        let prot = match s {
            "none" => Some(Prot::NONE),
            "" => None,
            _ => {
                // Any in-order subset of `rwx`.
                let rest = s;
                let (read, rest) = rest.strip_prefix('r').map_or((false, rest), |r| (true, r));
                let (write, rest) = rest.strip_prefix('w').map_or((false, rest), |r| (true, r));
                let (exec, rest) = rest.strip_prefix('x').map_or((false, rest), |r| (true, r));
                rest.is_empty().then_some(Prot { read, write, exec })
            }
        };
        prot.ok_or_else(|| {
            self.err(
                &v.span(),
                format!(
                    "expected a protection `none`, `r`, `rw`, `rx`, `rwx` or `w` for `prot`, found `{s}`"
                ),
            )
        })
    }

    pub(crate) fn pattern(&self, v: &Value<'_>, key: &str) -> Result<Pattern> {
        match v.get_ref() {
            DeValue::String(s) => s
                .parse::<Pattern>()
                .map_err(|e| self.err(&v.span(), e.message)),
            DeValue::Array(items) => {
                if items.is_empty() {
                    return Err(self.err(
                        &v.span(),
                        format!(
                            "expected at least one segment `{{ len = SIZE, pattern = PATTERN }}` in `{key}`, \
                             found an empty list"
                        ),
                    ));
                }
                let last = items.len() - 1;
                let mut segments = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    let t = self.table(item, "a pattern segment `{ len = SIZE, pattern = PATTERN }`")?;
                    self.allow(&t, &["len", "pattern"])?;
                    let len = match t.get("len") {
                        Some(len) => Some(self.len(len, "len")?),
                        None if i == last => None,
                        None => {
                            return Err(self.err(
                                &t.span,
                                "only the last segment may omit `len`; expected `len = SIZE` here",
                            ));
                        }
                    };
                    let p = self.required(&t, "pattern")?;
                    let DeValue::String(s) = p.get_ref() else {
                        return Err(self.err(
                            &p.span(),
                            format!(
                                "expected a pattern string like `u32:index` in a segment, found {}",
                                describe(p.get_ref())
                            ),
                        ));
                    };
                    let pattern = s
                        .parse::<Pattern>()
                        .map_err(|e| self.err(&p.span(), e.message))?;
                    segments.push(Segment { len, pattern });
                }
                Ok(Pattern::Segments(segments))
            }
            other => Err(self.err(
                &v.span(),
                format!(
                    "expected a pattern like `u32:index` or a list of segments for `{key}`, found {}",
                    describe(other)
                ),
            )),
        }
    }

    /// Checks that `base + len` fits in 64 bits.
    pub(crate) fn check_end(
        &self,
        base: u64,
        len: u64,
        len_v: &Value<'_>,
        what: &str,
    ) -> Result<()> {
        if base.checked_add(len).is_none() {
            return Err(self.err(
                &len_v.span(),
                format!(
                    "{what} {base:#x} + length {len:#x} overflows; expected a range that ends below 2^64"
                ),
            ));
        }
        Ok(())
    }

    /// Checks a raw `at` + `len` for overflow (symbolic addresses are checked against their mapping).
    pub(crate) fn check_range(&self, at: &AddrExpr, len: u64, len_v: &Value<'_>) -> Result<()> {
        match at {
            AddrExpr::Raw(base) => self.check_end(*base, len, len_v, "address"),
            AddrExpr::Sym { .. } => Ok(()),
        }
    }
}
