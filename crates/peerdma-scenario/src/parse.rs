//! TOML → [`Scenario`]: parsing and static validation.
//!
//! The file is read in three passes:
//! 1. `toml`'s spanned document parser ([`DeTable::parse`]) checks the TOML 1.1 syntax (including duplicate
//!    keys) and keeps the byte span of every key and value.
//! 2. A walk over that tree builds the model. Each table allows a fixed set of keys (per op for steps: the
//!    op's [`OpSpec`], whose family module in [`crate::ops`] also parses the step), so
//!    an unknown key is reported at the key itself with the keys that were expected; each value is
//!    converted (sizes, times, addresses, patterns...) and reported at the value on failure. Definitions
//!    (`[[file]]`, `[[device]]`, `[[process]]`, `mmap { name }`, `open { fd }`, `fork { child }`) are
//!    collected, and every use of a name is recorded with its span. `[topology]` is walked the same way
//!    (`parse/topology.rs`) into the `peerdma_pci` spec values, then built, and a tree error is reported
//!    at the declaration of the node at fault.
//! 3. Every recorded use is resolved against the definitions, in source order, so that a name may be used
//!    before (in the file) the step that defines it: a mapping used by one thread may be created by another.
//!
//! The first problem found stops the parse and becomes a [`ScenarioError`] at its `line:col`. Nothing here
//! panics on any input: every index into the text is clamped, every arithmetic step is checked.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::path::Path;

use peerdma_core::timing::ParamUnit;
use peerdma_core::{Errno, PAGE_SIZE, SimDuration};
use toml::Spanned;
use toml::de::{DeString, DeTable, DeValue};

use crate::ast::{
    AddrError, AddrExpr, DeviceDecl, DeviceKind, DeviceMemoryKind, Expect, ExportDecl, FileDecl,
    GpuDecl, IommuMode, Limits, Loc, P2pDecl, Prot, Scenario, Signal, SimSettings, Step, SvaDecl,
    ThreadDecl, TimeMode, Tolerance,
};
use crate::error::{LineIndex, ScenarioError};
use crate::ops::{self, OPS, Op, OpSpec};
use crate::params;
use crate::pattern::{Pattern, Segment};
use crate::units;

mod topology;

type Result<T> = std::result::Result<T, ScenarioError>;
pub(crate) type Value<'i> = Spanned<DeValue<'i>>;

/// Returns the scenario that `text` (read from `path`, used in error messages) describes.
///
/// # Errors
/// Returns the first input error: TOML syntax, unknown key, wrong type, bad unit, unknown name...
///
/// # Examples
/// ```
/// let text = r#"
/// [[thread]]
/// name = "t0"
/// steps = [
///   { op = "mmap", name = "buf", len = "2 pages", prot = "rw", flags = ["private", "anonymous"] },
///   { op = "store", at = "buf+4KiB", pattern = "u32:index" },
/// ]
/// "#;
/// let scenario = peerdma_scenario::parse("example.toml", text).unwrap();
/// assert_eq!(scenario.threads[0].steps.len(), 2);
///
/// let err = peerdma_scenario::parse("bad.toml", "[sim]\nseed = true\n").unwrap_err();
/// assert_eq!(err.to_string(), "bad.toml:2:8: expected an integer for `seed`, found a boolean");
/// ```
pub fn parse(path: &str, text: &str) -> Result<Scenario> {
    let doc = DeTable::parse(text).map_err(|e| {
        let offset = e.span().map_or(0, |span| span.start);
        let message = e.message().replace('\n', "; ");
        ScenarioError::at_offset(path, text, offset, format!("invalid TOML: {message}"))
    })?;
    let mut parser = Parser::new(path, text);
    let scenario = parser.document(doc.get_ref(), doc.span())?;
    parser.resolve()?;
    Ok(scenario)
}

/// Returns the scenario in the file at `path`.
///
/// # Errors
/// Returns a [`ScenarioError`] at line 0 when the file cannot be read, or the first input error of
/// [`parse`].
pub fn parse_file(path: &Path) -> Result<Scenario> {
    use std::io::Read as _;
    let shown = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|e| ScenarioError::io(&shown, &e))?;
    // Read at most one byte past the limit: a larger input (or `/dev/zero`) is refused, not read whole.
    let mut bytes = Vec::new();
    file.take(MAX_INPUT_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| ScenarioError::io(&shown, &e))?;
    if bytes.len() as u64 > MAX_INPUT_BYTES {
        return Err(ScenarioError::io(
            &shown,
            &std::io::Error::other(format!(
                "the file is larger than the input limit of {MAX_INPUT_BYTES} bytes"
            )),
        ));
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        ScenarioError::io(
            &shown,
            &std::io::Error::new(std::io::ErrorKind::InvalidData, e.utf8_error()),
        )
    })?;
    parse(&shown, &text)
}

/// The largest scenario file [`parse_file`] reads: 16 MiB (the biggest bundled scenario is a few KiB).
pub const MAX_INPUT_BYTES: u64 = 16 << 20;

/// The most NUMA nodes `[sim] memory` may list (`MAX_NUMNODES` of a kernel built with `NODES_SHIFT` 6).
const MAX_NODES: usize = 64;

/// Every key an `expect` table may have for some op.
const ALL_EXPECT_KEYS: &[&str] = &[
    "errno",
    "cpages",
    "faults",
    "data",
    "bytes",
    "value",
    "signal",
    "segments",
    "pinned",
    "dma_addr",
    "violation",
    "status",
    "atc_hit_pct",
    "translation_requests",
    "duration",
    "tolerance",
];

/// The `expect` keys every step may have, whatever its op: counters and notifier events are observed
/// around the step, not returned by it.
const EVERY_STEP_EXPECT_KEYS: &[&str] = &["counters", "events"];

/// The MMU notifier events `expect.events` names (`MMU_NOTIFY_*`, include/linux/mmu_notifier.h).
const NOTIFIER_EVENTS: &[(&str, peerdma_mm::NotifierEvent)] = &[
    ("unmap", peerdma_mm::NotifierEvent::Unmap),
    ("clear", peerdma_mm::NotifierEvent::Clear),
    ("protection_vma", peerdma_mm::NotifierEvent::ProtectionVma),
    ("protection_page", peerdma_mm::NotifierEvent::ProtectionPage),
    ("soft_dirty", peerdma_mm::NotifierEvent::SoftDirty),
    ("release", peerdma_mm::NotifierEvent::Release),
    ("migrate", peerdma_mm::NotifierEvent::Migrate),
    ("exclusive", peerdma_mm::NotifierEvent::Exclusive),
];

/// The `expect` keys every op takes: the step's simulated duration, and how close it must be.
const ANY_OP_EXPECT_KEYS: &[&str] = &["duration", "tolerance"];

/// What a missing required key should hold, for the "needs `key`" message.
fn key_hint(key: &str) -> &'static str {
    match key {
        "len" => "a size like `4KiB` or `16 pages`",
        "size" => "a size like `4MiB`",
        "at" | "ptr" => "an address like `buf+4KiB` or `0x7f0000000000`",
        "prot" => "`none`, `r`, `rw`, `rx`, `rwx` or `w`",
        "flags" => "a list like `[\"private\", \"anonymous\"]`",
        "pattern" => "a pattern like `u32:index`",
        "file" => "the name of a `[[file]]`",
        "dev" => "the name of a `[[device]]`",
        "fd" => "a name for the open device file",
        "child" => "a process name",
        "pages" => "an integer number of 4 KiB pages",
        "advice" => "`dontneed`, `hugepage` or `nohugepage`",
        "kind" => "`dmirror`",
        "steps" => "a list of steps like `[{ op = \"exit\" }]`",
        "op" => "an op name",
        _ => "a name",
    }
}

/// Returns "a string", "an integer"... for a value's type.
pub(crate) fn describe(v: &DeValue<'_>) -> &'static str {
    match v {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a date-time",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

/// Returns whether `s` is a name for a thread, process, device, file or fd: `[A-Za-z_][A-Za-z0-9_.-]*`.
fn is_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// Returns whether `s` is a mapping name, usable in an address expression: `[A-Za-z_][A-Za-z0-9_]*`.
pub(crate) fn is_mapping_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Returns `names` as `a, b, c`.
pub(crate) fn list<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    names.into_iter().collect::<Vec<_>>().join(", ")
}

/// A table's entries in source order, with a description for messages (`a `store` step`).
pub(crate) struct Table<'t, 'i> {
    entries: Vec<(&'t Spanned<DeString<'i>>, &'t Value<'i>)>,
    pub(crate) span: Range<usize>,
    what: String,
}

impl<'t, 'i> Table<'t, 'i> {
    fn new(table: &'t DeTable<'i>, span: Range<usize>, what: impl Into<String>) -> Self {
        let mut entries: Vec<_> = table.iter().collect();
        entries.sort_by_key(|(key, _)| key.span().start);
        Self {
            entries,
            span,
            what: what.into(),
        }
    }

    pub(crate) fn get(&self, key: &str) -> Option<&'t Value<'i>> {
        self.entries
            .iter()
            .find(|(k, _)| k.get_ref().as_ref() == key)
            .map(|&(_, v)| v)
    }
}

/// The range of a `dma_sg.read` or `dma_sg.write` step, to check against its handle's length.
pub(crate) struct HandleRange {
    pub(crate) handle: String,
    pub(crate) offset: u64,
    pub(crate) len: Option<u64>,
    pub(crate) offset_span: Option<Range<usize>>,
    pub(crate) len_span: Option<Range<usize>>,
    pub(crate) handle_span: Range<usize>,
}

/// What kind of name a use refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RefKind {
    /// A mapping, with the offset from its start.
    Mapping {
        offset: i64,
    },
    File,
    Device,
    Fd,
    /// A pin held by a `pin` step.
    Pin,
    /// A `pci` device.
    PciDevice,
    /// A BAR export of a `pci` device.
    Export,
    /// A handle held by a `dma.map` step.
    Handle,
    /// A `gpu` device.
    GpuDevice,
    /// A name a `gpu.*` step defined (`bo`, `attachment`, `range`).
    GpuName(&'static str),
    /// The process of a `[[thread]]`.
    Process,
    /// The child of a `wait` step.
    Child,
    /// A `kind = "sva"` device.
    SvaDevice,
    /// A job submitted by an `sva.submit` step.
    SvaJob,
}

/// A use of a name, resolved after the whole file is read.
#[derive(Debug)]
struct NameRef {
    kind: RefKind,
    name: String,
    /// The value as written (`buf+0x1000`), for messages.
    written: String,
    span: Range<usize>,
}

/// The walk's state: the definitions found so far and the uses to resolve.
pub(crate) struct Parser<'s> {
    path: &'s str,
    text: &'s str,
    lines: LineIndex,
    /// Mapping name → the largest `len` of the `mmap` steps that name it.
    mappings: BTreeMap<String, u64>,
    files: BTreeMap<String, Range<usize>>,
    devices: BTreeMap<String, Range<usize>>,
    threads: BTreeMap<String, Range<usize>>,
    /// Every process: `main`, the `[[process]]` ones and the `fork` children.
    processes: BTreeMap<String, Option<Range<usize>>>,
    pub(crate) children: BTreeSet<String>,
    pub(crate) fds: BTreeSet<String>,
    pub(crate) pins: BTreeSet<String>,
    /// The built `[topology]`, to check `pci` devices against.
    topo: Option<peerdma_pci::Topology>,
    pci_devices: BTreeSet<String>,
    /// `gpu` devices, and the names `gpu.*` steps define, by what they name (`bo`, `attachment`, `range`).
    pub(crate) gpu_devices: BTreeSet<String>,
    pub(crate) gpu_names: BTreeMap<&'static str, BTreeSet<String>>,
    /// Lengths of the GPU buffer objects defined so far (a `gpu.bo_mmap` mapping's length).
    pub(crate) gpu_bo_lens: BTreeMap<String, u64>,
    sva_devices: BTreeSet<String>,
    /// Jobs named by `sva.submit` steps.
    pub(crate) sva_jobs: BTreeSet<String>,
    /// The topology node of each `pci` device: node name -> device name.
    pci_nodes: BTreeMap<String, String>,
    exports: BTreeMap<String, Range<usize>>,
    pub(crate) handles: BTreeSet<String>,
    /// The longest `len` of the `dma.map` steps that name each handle.
    pub(crate) handle_lens: BTreeMap<String, u64>,
    /// `dma_sg.read`/`dma_sg.write` ranges, checked against their handle's length once the file is read.
    pub(crate) handle_ranges: Vec<HandleRange>,
    refs: Vec<NameRef>,
    /// `[sim.limits]`, read first: later sizes are checked against it.
    limits: Limits,
    /// `[sim] data = "token"`, read first: steps that compare bytes are refused.
    token: bool,
    /// Simulated memory declared so far (`[sim] memory`, devices, files), checked against `limits.memory`.
    sim_memory: u64,
}

impl<'s> Parser<'s> {
    fn new(path: &'s str, text: &'s str) -> Self {
        Self {
            path,
            text,
            lines: LineIndex::new(text),
            mappings: BTreeMap::new(),
            files: BTreeMap::new(),
            devices: BTreeMap::new(),
            threads: BTreeMap::new(),
            processes: BTreeMap::from([("main".to_owned(), None)]),
            children: BTreeSet::new(),
            fds: BTreeSet::new(),
            pins: BTreeSet::new(),
            topo: None,
            pci_devices: BTreeSet::new(),
            gpu_devices: BTreeSet::new(),
            gpu_names: BTreeMap::new(),
            gpu_bo_lens: BTreeMap::new(),
            sva_devices: BTreeSet::new(),
            sva_jobs: BTreeSet::new(),
            pci_nodes: BTreeMap::new(),
            exports: BTreeMap::new(),
            handles: BTreeSet::new(),
            handle_lens: BTreeMap::new(),
            handle_ranges: Vec::new(),
            refs: Vec::new(),
            limits: Limits::default(),
            sim_memory: 0,
            token: false,
        }
    }

    /// Adds `bytes` of simulated memory declared at `span` (`what`) and checks the total against
    /// `[sim.limits] memory`.
    fn add_sim_memory(&mut self, bytes: u64, span: &Range<usize>, what: &str) -> Result<()> {
        let total = self.sim_memory.saturating_add(bytes);
        if total > self.limits.memory {
            return Err(self.err(
                span,
                format!(
                    "{what} brings the simulated memory to {total:#x} bytes, over the limit of {:#x} \
                     (`[sim.limits] memory`)",
                    self.limits.memory
                ),
            ));
        }
        self.sim_memory = total;
        Ok(())
    }

    /// Returns an error at the start of `span`.
    pub(crate) fn err(&self, span: &Range<usize>, message: impl Into<String>) -> ScenarioError {
        ScenarioError::at_offset(self.path, self.text, span.start, message)
    }

    fn line_of(&self, span: &Range<usize>) -> usize {
        self.lines.line_col(self.text, span.start).0
    }

    // ----- structure -----

    fn table<'t, 'i>(&self, v: &'t Value<'i>, what: &str) -> Result<Table<'t, 'i>> {
        match v.get_ref() {
            DeValue::Table(table) => Ok(Table::new(table, v.span(), what)),
            other => Err(self.err(
                &v.span(),
                format!("expected {what}, found {}", describe(other)),
            )),
        }
    }

    /// Checks that every key of `t` is in `keys`.
    fn allow(&self, t: &Table<'_, '_>, keys: &[&str]) -> Result<()> {
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
    fn array_of_tables<'t, 'i>(
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
    fn opt_bool(&self, t: &Table<'_, '_>, key: &str, default: bool) -> Result<bool> {
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
    fn tolerance(&self, v: &Value<'_>) -> Result<Tolerance> {
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

    // ----- top level -----

    fn document(&mut self, doc: &DeTable<'_>, span: Range<usize>) -> Result<Scenario> {
        let top = Table::new(doc, span, "the top level");
        self.allow(
            &top,
            &[
                "sim", "timing", "topology", "file", "device", "process", "thread",
            ],
        )?;
        let sim = match top.get("sim") {
            Some(v) => self.sim(v)?,
            None => SimSettings::default(),
        };
        self.limits = sim.limits;
        self.token = sim.data == peerdma_mm::phys::DataMode::Token;
        self.sim_memory = sim.memory.iter().fold(0u64, |a, &m| a.saturating_add(m));
        let mut timing = BTreeMap::new();
        if let Some(v) = top.get("timing") {
            let t = self.table(v, "the `[timing]` table")?;
            self.timing(&t, "", &mut timing)?;
        }
        let topology = match top.get("topology") {
            Some(v) => {
                let (spec, topo) = self.topology(v)?;
                self.topo = Some(topo);
                Some(spec)
            }
            None => None,
        };
        let mut files = Vec::new();
        for t in self.array_of_tables(&top, "file")? {
            files.push(self.file(&t)?);
        }
        let mut devices = Vec::new();
        for t in self.array_of_tables(&top, "device")? {
            devices.push(self.device(&t)?);
        }
        let mut processes = vec!["main".to_owned()];
        let mut process_nodes = BTreeMap::new();
        for t in self.array_of_tables(&top, "process")? {
            let (name, node) = self.process(&t, sim.memory.len())?;
            if let Some(node) = node {
                process_nodes.insert(name.clone(), node);
            }
            processes.push(name);
        }
        let mut threads = Vec::new();
        for t in self.array_of_tables(&top, "thread")? {
            threads.push(self.thread(&t)?);
        }
        Ok(Scenario {
            path: self.path.to_owned(),
            sim,
            files,
            devices,
            processes,
            process_nodes,
            threads,
            topology,
            timing,
        })
    }

    /// The `[timing]` table (or one of its dotted-key groups, `prefix` being the keys above it): each entry
    /// is a parameter of the [`params`] registry, written as a quoted key (`"mm.cpu_fault" = "2us"`), a
    /// dotted key (`mm.cpu_fault = "2us"`) or inside a group table (`[timing.mm]`). A time takes a unit
    /// (no unit: nanoseconds), a count is an integer. Unknown keys (with the nearest key), wrong units,
    /// negative values and a parameter set twice are errors at the key or value.
    fn timing(
        &self,
        t: &Table<'_, '_>,
        prefix: &str,
        out: &mut BTreeMap<String, u64>,
    ) -> Result<()> {
        for (k, v) in &t.entries {
            let key = if prefix.is_empty() {
                k.get_ref().to_string()
            } else {
                format!("{prefix}.{}", k.get_ref())
            };
            let Some(spec) = params::find(&key) else {
                if params::is_group(&key) {
                    let what = format!(
                        "a group of timing parameters for `{key}` (like `{key}.<name> = \"1us\"`)"
                    );
                    let group = self.table(v, &what)?;
                    self.timing(&group, &key, out)?;
                    continue;
                }
                // Suggest the nearest key, else list the keys of the group written (`mm.*` for
                // `mm.xyz`), else every key.
                let group = key
                    .rsplit_once('.')
                    .map(|(g, _)| g)
                    .filter(|g| params::is_group(g));
                let in_group = |k: &&str| {
                    group.is_none_or(|g| k.strip_prefix(g).is_some_and(|r| r.starts_with('.')))
                };
                let hint = match params::nearest(&key) {
                    Some(near) => {
                        format!("did you mean `{near}`? (`peerdma params` lists them all)")
                    }
                    None => format!(
                        "expected one of: {}",
                        list(params::all_params().iter().map(|p| p.key).filter(in_group))
                    ),
                };
                return Err(self.err(
                    &k.span(),
                    format!("unknown timing parameter `{key}` in `[timing]`; {hint}"),
                ));
            };
            let value = match spec.unit {
                ParamUnit::Time => {
                    if let DeValue::String(s) = v.get_ref()
                        && s.trim_start().starts_with('-')
                    {
                        return Err(self.err(
                            &v.span(),
                            format!("expected a time of 0 or more for `{key}`, found `{s}`"),
                        ));
                    }
                    self.time(v, &key)?.as_nanos()
                }
                ParamUnit::Count => self.uint_as(v, &key, "an integer count")?,
            };
            if out.insert(key.clone(), value).is_some() {
                return Err(self.err(
                    &k.span(),
                    format!("timing parameter `{key}` is set twice in `[timing]`"),
                ));
            }
        }
        Ok(())
    }

    fn sim(&self, v: &Value<'_>) -> Result<SimSettings> {
        let t = self.table(v, "the `[sim]` table")?;
        self.allow(
            &t,
            &[
                "seed",
                "time",
                "explore",
                "jitter",
                "time_limit",
                "memory",
                "movable",
                "limits",
                "data",
            ],
        )?;
        let mut sim = SimSettings::default();
        if let Some(v) = t.get("data") {
            sim.data = self.keyword(
                v,
                "data",
                &[
                    ("bytes", peerdma_mm::phys::DataMode::Bytes),
                    ("token", peerdma_mm::phys::DataMode::Token),
                ],
            )?;
        }
        if let Some(v) = t.get("limits") {
            sim.limits = self.limits(v)?;
        }
        if let Some(v) = t.get("seed") {
            sim.seed = self.uint(v, "seed")?;
        }
        if let Some(v) = t.get("time") {
            sim.time = self.keyword(
                v,
                "time",
                &[
                    ("calibrated", TimeMode::Calibrated),
                    ("zero", TimeMode::Zero),
                ],
            )?;
        }
        if let Some(v) = t.get("explore") {
            sim.explore = self.boolean(v, "explore")?;
        }
        if let Some(v) = t.get("jitter") {
            sim.jitter = self.jitter(v)?;
        }
        if let Some(v) = t.get("time_limit") {
            sim.time_limit = self.time(v, "time_limit")?;
        }
        if let Some(v) = t.get("memory") {
            sim.memory = match v.get_ref() {
                DeValue::Array(items) => {
                    if items.is_empty() || items.len() > MAX_NODES {
                        return Err(self.err(
                            &v.span(),
                            format!(
                                "expected 1 to {MAX_NODES} node sizes for `memory`, found {}",
                                items.len()
                            ),
                        ));
                    }
                    items
                        .iter()
                        .map(|item| self.node_size(item))
                        .collect::<Result<Vec<_>>>()?
                }
                _ => vec![self.node_size(v)?],
            };
        }
        if let Some(v) = t.get("movable") {
            sim.movable = self.movable_nodes(v, sim.memory.len())?;
        }
        let total = sim.memory.iter().fold(0u64, |a, &m| a.saturating_add(m));
        if total > sim.limits.memory {
            let span = t.get("memory").map_or(0..0, Spanned::span);
            return Err(self.err(
                &span,
                format!(
                    "`memory` adds up to {total:#x} bytes, over the limit of {:#x} (`[sim.limits] memory`)",
                    sim.limits.memory
                ),
            ));
        }
        Ok(sim)
    }

    /// `[sim.limits]`: each key optional, each a size, a count or (`wall_time`) a time.
    fn limits(&self, v: &Value<'_>) -> Result<Limits> {
        let t = self.table(v, "the `[sim.limits]` table")?;
        self.allow(
            &t,
            &[
                "host_memory",
                "memory",
                "steps",
                "events",
                "trace",
                "wall_time",
            ],
        )?;
        let mut l = Limits::default();
        if let Some(v) = t.get("host_memory") {
            l.host_memory = self.size(v, "host_memory")?;
        }
        if let Some(v) = t.get("memory") {
            l.memory = self.size(v, "memory")?;
        }
        if let Some(v) = t.get("steps") {
            l.steps = self.uint(v, "steps")?;
        }
        if let Some(v) = t.get("events") {
            l.events = self.uint(v, "events")?;
        }
        if let Some(v) = t.get("trace") {
            l.trace = self.uint(v, "trace")?;
        }
        if let Some(v) = t.get("wall_time") {
            l.wall_time = self.time(v, "wall_time")?;
        }
        Ok(l)
    }

    /// `[sim] movable`: a list of NUMA node ids whose memory is ZONE_MOVABLE, each below the node count, not
    /// node 0 (the zero page and kernel memory live there) and listed once; returned ascending.
    fn movable_nodes(&self, v: &Value<'_>, nr_nodes: usize) -> Result<Vec<u32>> {
        let DeValue::Array(items) = v.get_ref() else {
            return Err(self.err(
                &v.span(),
                format!(
                    "expected a list of NUMA node ids for `movable`, found {}",
                    describe(v.get_ref())
                ),
            ));
        };
        let mut nodes = Vec::new();
        for item in items {
            let node = self.uint(item, "movable")?;
            if node >= nr_nodes as u64 {
                let nodes = if nr_nodes == 1 {
                    "the only node is 0".to_owned()
                } else {
                    format!("nodes are 0 to {}", nr_nodes - 1)
                };
                return Err(self.err(
                    &item.span(),
                    format!(
                        "expected a NUMA node below {nr_nodes} for `movable` ({nodes}: one per `[sim] \
                         memory` entry), found {node}"
                    ),
                ));
            }
            if node == 0 {
                return Err(self.err(
                    &item.span(),
                    "node 0 cannot be `movable`: it holds the zero page and kernel memory",
                ));
            }
            let node = u32::try_from(node).expect("below the node count");
            if nodes.contains(&node) {
                return Err(self.err(
                    &item.span(),
                    format!("node {node} is listed twice in `movable`"),
                ));
            }
            nodes.push(node);
        }
        nodes.sort_unstable();
        Ok(nodes)
    }

    /// One node's RAM size in `[sim] memory`: a non-zero multiple of the page size.
    fn node_size(&self, v: &Value<'_>) -> Result<u64> {
        let memory = self.size(v, "memory")?;
        if memory == 0 || memory % PAGE_SIZE != 0 {
            return Err(self.err(
                &v.span(),
                format!(
                    "expected a non-zero multiple of the 4 KiB page size for `memory`, found {memory:#x}"
                ),
            ));
        }
        Ok(memory)
    }

    fn jitter(&self, v: &Value<'_>) -> Result<f64> {
        let out_of_range = |shown: &str| {
            self.err(
                &v.span(),
                format!("expected `jitter` between 0.0 and 1.0, found {shown}"),
            )
        };
        match v.get_ref() {
            DeValue::Float(f) => {
                let value: f64 = f.as_str().parse().map_err(|_| out_of_range(f.as_str()))?;
                if (0.0..=1.0).contains(&value) {
                    Ok(value)
                } else {
                    Err(out_of_range(f.as_str()))
                }
            }
            DeValue::Integer(i) => match i.as_str() {
                "0" => Ok(0.0),
                "1" => Ok(1.0),
                other => Err(out_of_range(other)),
            },
            other => Err(self.err(
                &v.span(),
                format!(
                    "expected a number between 0.0 and 1.0 for `jitter`, found {}",
                    describe(other)
                ),
            )),
        }
    }

    /// Checks that `name` is not in `defs` yet (a second definition of the same name is an error).
    fn check_unique(
        &self,
        defs: &BTreeMap<String, Range<usize>>,
        name: &str,
        span: &Range<usize>,
        kind: &str,
    ) -> Result<()> {
        match defs.get(name) {
            Some(first) => Err(self.err(
                span,
                format!(
                    "duplicate {kind} name `{name}`; the first one is at line {}; expected a unique name",
                    self.line_of(first)
                ),
            )),
            None => Ok(()),
        }
    }

    fn file(&mut self, t: &Table<'_, '_>) -> Result<FileDecl> {
        self.allow(t, &["name", "size", "pattern", "dax", "tmpfs"])?;
        let name_v = self.required(t, "name")?;
        let name = self.name(name_v, "name")?;
        self.check_unique(&self.files, &name, &name_v.span(), "file")?;
        self.files.insert(name.clone(), name_v.span());
        let size_v = self.required(t, "size")?;
        let size = self.size(size_v, "size")?;
        // The file's contents are filled in host memory once (its `pattern`) and live in simulated memory.
        if size > self.limits.host_memory {
            return Err(self.err(
                &size_v.span(),
                format!(
                    "a file of {size:#x} bytes is over the host memory limit of {:#x} \
                     (`[sim.limits] host_memory`)",
                    self.limits.host_memory
                ),
            ));
        }
        self.add_sim_memory(size, &size_v.span(), "this file")?;
        let pattern = match t.get("pattern") {
            Some(v) => self.pattern(v, "pattern")?,
            None => Pattern::Zero,
        };
        let dax = match t.get("dax") {
            Some(v) => self.boolean(v, "dax")?,
            None => false,
        };
        let tmpfs = match t.get("tmpfs") {
            Some(v) => self.boolean(v, "tmpfs")?,
            None => false,
        };
        if dax && tmpfs {
            let v = t.get("tmpfs").expect("read above");
            return Err(self.err(&v.span(), "a file is either `dax` or `tmpfs`, not both"));
        }
        Ok(FileDecl {
            name,
            size,
            pattern,
            dax,
            tmpfs,
        })
    }

    fn device(&mut self, t: &Table<'_, '_>) -> Result<DeviceDecl> {
        self.allow(
            t,
            &[
                "name",
                "kind",
                "memory",
                "size",
                "node",
                "iommu",
                "p2p",
                "export",
                "p2p_queue",
                "vram",
                "bar",
                "bar_window",
                "managed",
                "beyond_mainline_p2p",
                "atc_sets",
                "atc_ways",
                "wq_depth",
                "prq_entries",
                "pasid_bits",
                "own_migrations",
            ],
        )?;
        let name_v = self.required(t, "name")?;
        let name = self.name(name_v, "name")?;
        self.check_unique(&self.devices, &name, &name_v.span(), "device")?;
        self.devices.insert(name.clone(), name_v.span());
        let kind = self.keyword(
            self.required(t, "kind")?,
            "kind",
            &[
                ("dmirror", DeviceKind::Dmirror),
                ("pci", DeviceKind::Pci),
                ("rnic", DeviceKind::Rnic),
                ("nvme", DeviceKind::Nvme),
                ("gpu", DeviceKind::Gpu),
                ("sva", DeviceKind::Sva),
            ],
        )?;
        if kind != DeviceKind::Gpu {
            for key in [
                "vram",
                "bar",
                "bar_window",
                "managed",
                "beyond_mainline_p2p",
            ] {
                if let Some(v) = t.get(key) {
                    return Err(self.err(
                        &v.span(),
                        format!("`{key}` is for a `kind = \"gpu\"` device"),
                    ));
                }
            }
        }
        if matches!(kind, DeviceKind::Dmirror | DeviceKind::Sva) {
            let what = if kind == DeviceKind::Sva {
                "an `sva`"
            } else {
                "a `dmirror`"
            };
            for key in ["node", "iommu", "p2p", "export", "p2p_queue"] {
                if let Some(v) = t.get(key) {
                    return Err(self.err(
                        &v.span(),
                        format!("`{key}` is for a `kind = \"pci\"` device, not {what}"),
                    ));
                }
            }
        }
        let mut sva = SvaDecl::default();
        for (key, field, lo, hi) in [
            ("atc_sets", &mut sva.atc_sets, 1, 1 << 16),
            ("atc_ways", &mut sva.atc_ways, 1, 1 << 10),
            ("wq_depth", &mut sva.wq_depth, 1, 1 << 12),
            ("prq_entries", &mut sva.prq_entries, 1, 1 << 16),
            ("pasid_bits", &mut sva.pasid_bits, 1, 20),
        ] {
            let Some(v) = t.get(key) else { continue };
            if kind != DeviceKind::Sva {
                return Err(self.err(
                    &v.span(),
                    format!("`{key}` is for a `kind = \"sva\"` device"),
                ));
            }
            let n = self.uint(v, key)?;
            if !(lo..=hi).contains(&n) {
                return Err(self.err(
                    &v.span(),
                    format!("expected {lo} to {hi} for `{key}`, found {n}"),
                ));
            }
            *field = n;
        }
        if kind == DeviceKind::Sva {
            self.sva_devices.insert(name.clone());
        }
        let memory = match t.get("memory") {
            Some(v) => self.keyword(
                v,
                "memory",
                &[
                    ("private", DeviceMemoryKind::Private),
                    ("coherent", DeviceMemoryKind::Coherent),
                ],
            )?,
            None => DeviceMemoryKind::Private,
        };
        let size = match t.get("size") {
            Some(v) => {
                let size = self.len(v, "size")?;
                if size % PAGE_SIZE != 0 {
                    return Err(self.err(
                        &v.span(),
                        format!(
                            "expected a whole number of 4 KiB pages for `size`, found {size} bytes"
                        ),
                    ));
                }
                self.add_sim_memory(size, &v.span(), "this device's `size`")?;
                size
            }
            None => 256 << 20,
        };
        let mut decl = DeviceDecl {
            name,
            kind,
            memory,
            size,
            node: None,
            iommu: IommuMode::default(),
            p2p: Vec::new(),
            exports: Vec::new(),
            p2p_queue: true,
            gpu: None,
            sva,
            invalidate_own_migrations: false,
        };
        if let Some(v) = t.get("own_migrations") {
            if kind != DeviceKind::Dmirror {
                return Err(self.err(
                    &v.span(),
                    "`own_migrations` is for a `kind = \"dmirror\"` device",
                ));
            }
            decl.invalidate_own_migrations = self.keyword(
                v,
                "own_migrations",
                &[("ignore", false), ("invalidate", true)],
            )?;
        }
        if let Some(v) = t.get("p2p_queue") {
            if kind != DeviceKind::Nvme {
                return Err(self.err(&v.span(), "`p2p_queue` is for a `kind = \"nvme\"` device"));
            }
            decl.p2p_queue = self.boolean(v, "p2p_queue")?;
        }
        if matches!(
            kind,
            DeviceKind::Pci | DeviceKind::Gpu | DeviceKind::Rnic | DeviceKind::Nvme
        ) {
            self.pci_device(t, &name_v.span(), &mut decl)?;
        }
        if kind == DeviceKind::Gpu {
            decl.gpu = Some(self.gpu_device(t, &name_v.span())?);
            self.gpu_devices.insert(decl.name.clone());
        }
        Ok(decl)
    }

    /// The `gpu` keys of a `[[device]]`: `vram` (required), `bar`, `bar_window`, `managed`.
    fn gpu_device(&mut self, t: &Table<'_, '_>, name_span: &Range<usize>) -> Result<GpuDecl> {
        let Some(v) = t.get("vram") else {
            return Err(self.err(name_span, "a `kind = \"gpu\"` device needs `vram`"));
        };
        let vram = self.len(v, "vram")?;
        let page = |this: &Self, v: &Value<'_>, key: &str, n: u64| -> Result<u64> {
            if n.is_multiple_of(PAGE_SIZE) {
                Ok(n)
            } else {
                Err(this.err(
                    &v.span(),
                    format!("expected a whole number of 4 KiB pages for `{key}`, found {n} bytes"),
                ))
            }
        };
        let vram = page(self, v, "vram", vram)?;
        let bar = match t.get("bar") {
            Some(v) => {
                let b = self.uint_as(v, "bar", "a BAR index 0-5")?;
                u8::try_from(b).ok().filter(|b| *b <= 5).ok_or_else(|| {
                    self.err(
                        &v.span(),
                        format!("expected a BAR index 0-5 for `bar`, found {b}"),
                    )
                })?
            }
            None => 0,
        };
        let window = match t.get("bar_window") {
            Some(v) => {
                let w = page(self, v, "bar_window", self.len(v, "bar_window")?)?;
                if w > vram {
                    return Err(self.err(
                        &v.span(),
                        format!(
                            "`bar_window` ({w:#x} bytes) is larger than `vram` ({vram:#x} bytes)"
                        ),
                    ));
                }
                Some(w)
            }
            None => None,
        };
        let managed = match t.get("managed") {
            Some(v) => page(self, v, "managed", self.len(v, "managed")?)?,
            None => vram,
        };
        let beyond_mainline_p2p = match t.get("beyond_mainline_p2p") {
            Some(v) => self.boolean(v, "beyond_mainline_p2p")?,
            None => false,
        };
        Ok(GpuDecl {
            vram,
            bar,
            window,
            managed,
            beyond_mainline_p2p,
            skip_peer_invalidation: false,
        })
    }

    /// The `pci` keys of a `[[device]]`: its topology node, IOMMU mode, P2P resources and BAR exports.
    fn pci_device(
        &mut self,
        t: &Table<'_, '_>,
        name_span: &Range<usize>,
        decl: &mut DeviceDecl,
    ) -> Result<()> {
        let Some(topo) = self.topo.clone() else {
            return Err(self.err(
                name_span,
                "a `kind = \"pci\"` device needs a `[topology]` with its PCI function",
            ));
        };
        let (node_name, node_span) = match t.get("node") {
            Some(v) => (self.string(v, "node")?.to_owned(), v.span()),
            None => (decl.name.clone(), name_span.clone()),
        };
        let Some(node) = topo.lookup(&node_name) else {
            let endpoints: Vec<&str> = topo.endpoints().map(|e| topo.name(e)).collect();
            return Err(self.err(
                &node_span,
                format!(
                    "no node `{node_name}` in `[topology]` for device `{}`; expected one of: {}",
                    decl.name,
                    list(endpoints)
                ),
            ));
        };
        if topo.node(node).kind() != peerdma_pci::NodeKind::Endpoint {
            return Err(self.err(
                &node_span,
                format!(
                    "node `{node_name}` is a {}, expected an endpoint for a `pci` device",
                    topo.node(node).kind().name()
                ),
            ));
        }
        if let Some(owner) = self.pci_nodes.get(&node_name) {
            return Err(self.err(
                &node_span,
                format!(
                    "node `{node_name}` already belongs to device `{owner}`; expected one `pci` device per PCI \
                     function"
                ),
            ));
        }
        self.pci_nodes.insert(node_name.clone(), decl.name.clone());
        decl.node = Some(node_name.clone());
        self.pci_devices.insert(decl.name.clone());
        if let Some(v) = t.get("iommu") {
            decl.iommu = self.keyword(
                v,
                "iommu",
                &[
                    ("identity", IommuMode::Identity),
                    ("dma", IommuMode::Dma),
                    ("dma-lazy", IommuMode::DmaLazy),
                ],
            )?;
        }
        // Returns the entry's BAR index and the BAR's size.
        let bar_of = |this: &Self, e: &Table<'_, '_>| -> Result<(u8, u64)> {
            let v = this.required(e, "bar")?;
            let bar = this.uint_as(v, "bar", "a BAR index 0-5")?;
            let Ok(bar @ 0..=5) = u8::try_from(bar) else {
                return Err(this.err(
                    &v.span(),
                    format!("expected a BAR index 0-5 for `bar`, found {bar}"),
                ));
            };
            let Some(b) = topo.node(node).bar(bar) else {
                let have: Vec<String> = topo
                    .node(node)
                    .bars()
                    .iter()
                    .map(|b| b.index.to_string())
                    .collect();
                let known = if have.is_empty() {
                    "it has no BARs (declare them in its `[[topology.endpoint]]` `bars`)".to_owned()
                } else {
                    format!("expected one of: {}", list(have.iter().map(String::as_str)))
                };
                return Err(this.err(
                    &v.span(),
                    format!("node `{node_name}` has no BAR {bar}; {known}"),
                ));
            };
            Ok((bar, b.size))
        };
        // Checks that `[offset, offset + len)` (len 0: to the end) lies inside the BAR, as
        // `pci_p2pdma_add_resource` and the exporter do; the error points at `offset` when it is past the end
        // of the BAR, else at the length.
        let fits = |this: &Self,
                    what: &str,
                    bar: u8,
                    bar_size: u64,
                    (offset, offset_v): (u64, Option<&Value<'_>>),
                    (len, len_v): (u64, Option<&Value<'_>>)|
         -> Result<()> {
            let end = if len == 0 {
                Some(bar_size)
            } else {
                offset.checked_add(len)
            };
            if offset < bar_size && end.is_some_and(|e| e <= bar_size) {
                return Ok(());
            }
            let span = if offset >= bar_size || len_v.is_none() {
                offset_v.or(len_v).map(Value::span)
            } else {
                len_v.map(Value::span)
            }
            .unwrap_or_else(|| name_span.clone());
            let len_text = if len == 0 {
                "to the end".to_owned()
            } else {
                format!("of {len:#x} bytes")
            };
            Err(this.err(
                &span,
                format!(
                    "{what} range at offset {offset:#x} {len_text} does not fit BAR {bar} of node `{node_name}` \
                     ({bar_size:#x} bytes)"
                ),
            ))
        };
        if let Some(v) = t.get("p2p") {
            for item in self.inline_tables(
                v,
                "p2p",
                "a P2P resource like `{ bar = 2, size = \"1MiB\" }`",
            )? {
                let mut item = item;
                "a `p2p` entry".clone_into(&mut item.what);
                self.allow(&item, &["bar", "size", "offset", "publish"])?;
                let (bar, bar_size) = bar_of(self, &item)?;
                let size = self.opt_size(&item, "size", 0)?;
                let offset = self.opt_size(&item, "offset", 0)?;
                fits(
                    self,
                    "p2p",
                    bar,
                    bar_size,
                    (offset, item.get("offset")),
                    (size, item.get("size")),
                )?;
                let publish = self.opt_bool(&item, "publish", true)?;
                decl.p2p.push(P2pDecl {
                    bar,
                    size,
                    offset,
                    publish,
                });
            }
        }
        if let Some(v) = t.get("export") {
            for item in self.inline_tables(
                v,
                "export",
                "a BAR export like `{ name = \"vram\", bar = 2 }`",
            )? {
                let mut item = item;
                "an `export` entry".clone_into(&mut item.what);
                self.allow(&item, &["name", "bar", "offset", "len", "revocable"])?;
                let name_v = self.required(&item, "name")?;
                let name = self.name(name_v, "name")?;
                self.check_unique(&self.exports, &name, &name_v.span(), "export")?;
                self.exports.insert(name.clone(), name_v.span());
                let (bar, bar_size) = bar_of(self, &item)?;
                let offset = self.opt_size(&item, "offset", 0)?;
                let len = self.opt_len(&item, "len", 0)?;
                for (key, n) in [("offset", offset), ("len", len)] {
                    if let Some(v) = item.get(key)
                        && n % PAGE_SIZE != 0
                    {
                        return Err(self.err(
                            &v.span(),
                            format!(
                                "expected a page-aligned `{key}` for a BAR export, found {n:#x}"
                            ),
                        ));
                    }
                }
                fits(
                    self,
                    "export",
                    bar,
                    bar_size,
                    (offset, item.get("offset")),
                    (len, item.get("len")),
                )?;
                let revocable = self.opt_bool(&item, "revocable", true)?;
                decl.exports.push(ExportDecl {
                    name,
                    bar,
                    offset,
                    len,
                    revocable,
                });
            }
        }
        Ok(())
    }

    /// The inline tables of an array value (`p2p = [{ ... }, ...]`).
    fn inline_tables<'t, 'i>(
        &self,
        v: &'t Value<'i>,
        key: &str,
        what: &str,
    ) -> Result<Vec<Table<'t, 'i>>> {
        let DeValue::Array(items) = v.get_ref() else {
            return Err(self.err(
                &v.span(),
                format!(
                    "expected a list of tables for `{key}`, found {}",
                    describe(v.get_ref())
                ),
            ));
        };
        items.iter().map(|item| self.table(item, what)).collect()
    }

    /// A new mapping's name (`name = "buf"`).
    pub(crate) fn mapping_name(&self, v: &Value<'_>) -> Result<String> {
        let name = self.string(v, "name")?;
        if !is_mapping_name(name) {
            return Err(self.err(
                &v.span(),
                format!("expected a mapping name (a letter or `_`, then letters, digits or `_`), found `{name}`"),
            ));
        }
        Ok(name.to_owned())
    }

    /// Adds a process (declared or forked), failing when the name is taken.
    pub(crate) fn define_process(&mut self, name: &str, span: Range<usize>) -> Result<()> {
        match self.processes.get(name) {
            Some(None) => Err(self.err(
                &span,
                format!(
                    "duplicate process name `{name}`: a process named `main` always exists; expected another \
                     name"
                ),
            )),
            Some(Some(first)) => Err(self.err(
                &span,
                format!(
                    "duplicate process name `{name}`; the first one is at line {}; expected a unique name",
                    self.line_of(first)
                ),
            )),
            None => {
                self.processes.insert(name.to_owned(), Some(span));
                Ok(())
            }
        }
    }

    /// A `[[process]]`: its name and, when it sets `node`, its home NUMA node (below `nr_nodes`, the number
    /// of `[sim] memory` entries).
    fn process(&mut self, t: &Table<'_, '_>, nr_nodes: usize) -> Result<(String, Option<u32>)> {
        self.allow(t, &["name", "node"])?;
        let name_v = self.required(t, "name")?;
        let name = self.name(name_v, "name")?;
        self.define_process(&name, name_v.span())?;
        let node = match t.get("node") {
            Some(v) => {
                let node = self.uint(v, "node")?;
                if node >= nr_nodes as u64 {
                    let nodes = if nr_nodes == 1 {
                        "the only node is 0".to_owned()
                    } else {
                        format!("nodes are 0 to {}", nr_nodes - 1)
                    };
                    return Err(self.err(
                        &v.span(),
                        format!(
                            "expected a NUMA node below {nr_nodes} for `node` ({nodes}: one per `[sim] \
                             memory` entry), found {node}"
                        ),
                    ));
                }
                Some(u32::try_from(node).expect("below the node count"))
            }
            None => None,
        };
        Ok((name, node))
    }

    fn thread(&mut self, t: &Table<'_, '_>) -> Result<ThreadDecl> {
        self.allow(t, &["name", "process", "steps"])?;
        let name_v = self.required(t, "name")?;
        let name = self.name(name_v, "name")?;
        self.check_unique(&self.threads, &name, &name_v.span(), "thread")?;
        self.threads.insert(name.clone(), name_v.span());
        let process = match t.get("process") {
            Some(v) => self.name_ref(v, "process", RefKind::Process)?,
            None => "main".to_owned(),
        };
        let steps_v = self.required(t, "steps")?;
        let DeValue::Array(items) = steps_v.get_ref() else {
            return Err(self.err(
                &steps_v.span(),
                format!(
                    "expected a list of steps like `[{{ op = \"exit\" }}]` for `steps`, found {}",
                    describe(steps_v.get_ref())
                ),
            ));
        };
        let steps = items
            .iter()
            .map(|item| self.step(item))
            .collect::<Result<Vec<_>>>()?;
        if let Some(i) = steps.iter().position(|s| s.op.ends_thread())
            && let Some(after) = items.get(i + 1)
        {
            return Err(self.err(
                &after.span(),
                format!(
                    "this step comes after the `exit` at line {} and would never run; expected `exit` to be \
                     the thread's last step",
                    steps[i].loc.line
                ),
            ));
        }
        Ok(ThreadDecl {
            name,
            process,
            steps,
        })
    }

    // ----- steps -----

    fn step(&mut self, v: &Value<'_>) -> Result<Step> {
        let DeValue::Table(table) = v.get_ref() else {
            return Err(self.err(
                &v.span(),
                format!(
                    "expected a step as an inline table like `{{ op = \"mmap\", ... }}`, found {}",
                    describe(v.get_ref())
                ),
            ));
        };
        let mut t = Table::new(table, v.span(), "a step");
        let op_v = t.get("op").ok_or_else(|| {
            self.err(
                &v.span(),
                format!(
                    "a step needs `op`; expected one of: {}",
                    list(OPS.iter().map(|s| s.name))
                ),
            )
        })?;
        let op_name = self.string(op_v, "op")?;
        let spec = ops::spec(op_name).ok_or_else(|| {
            self.err(
                &op_v.span(),
                format!(
                    "unknown op `{op_name}`; expected one of: {}{}",
                    list(OPS.iter().map(|s| s.name)),
                    params::did_you_mean(op_name, OPS.iter().map(|s| s.name))
                ),
            )
        })?;
        t.what = format!("a `{op_name}` step");
        let keys: Vec<&str> = std::iter::once("op")
            .chain(spec.keys.iter().copied())
            .chain(std::iter::once("expect"))
            .collect();
        self.allow(&t, &keys)?;
        let op = (spec.parse)(self, &t)?;
        let expect = match t.get("expect") {
            Some(e) => self.expect(e, spec, &op)?,
            None => Expect::default(),
        };
        let (line, col) = self.lines.line_col(self.text, v.span().start);
        Ok(Step {
            op,
            expect,
            loc: Loc { line, col },
        })
    }

    /// Records a mapping name; symbolic offsets are checked against the longest length it is given.
    pub(crate) fn define_mapping(&mut self, name: &str, len: u64) {
        let longest = self.mappings.entry(name.to_owned()).or_insert(len);
        *longest = (*longest).max(len);
    }

    // ----- expectations -----

    fn expect(&self, v: &Value<'_>, spec: &OpSpec, op: &Op) -> Result<Expect> {
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
    fn one_of(&self, v: &Value<'_>) -> Result<Vec<Pattern>> {
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
    fn bounds(&self, v: &Value<'_>, key: &str) -> Result<(u64, u64)> {
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
    fn segments(&self, v: &Value<'_>) -> Result<Vec<(String, u64)>> {
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

    fn errno(&self, v: &Value<'_>) -> Result<Option<Errno>> {
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

    fn bytes(&self, v: &Value<'_>) -> Result<Vec<u8>> {
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

    // ----- name resolution -----

    fn resolve(&mut self) -> Result<()> {
        let mut refs = std::mem::take(&mut self.refs);
        refs.sort_by_key(|r| r.span.start);
        for r in &refs {
            self.resolve_one(r)?;
        }
        for r in &self.handle_ranges {
            let Some(&total) = self.handle_lens.get(&r.handle) else {
                continue;
            };
            let bytes = r.len.unwrap_or(total.saturating_sub(r.offset));
            if r.offset.checked_add(bytes).is_some_and(|end| end <= total) && bytes > 0 {
                continue;
            }
            let span = if r.offset >= total || r.len_span.is_none() {
                r.offset_span.as_ref().or(r.len_span.as_ref())
            } else {
                r.len_span.as_ref()
            }
            .unwrap_or(&r.handle_span);
            return Err(self.err(
                span,
                format!(
                    "offset {:#x} + {bytes:#x} bytes passes the end of handle `{}` ({total:#x} bytes, the longest \
                     `dma.map` named `{}`); expected a range inside it",
                    r.offset, r.handle, r.handle
                ),
            ));
        }
        Ok(())
    }

    fn resolve_one(&self, r: &NameRef) -> Result<()> {
        let name = r.name.as_str();
        let unknown = |what: &str, defined: Vec<&str>, how: &str| {
            let known = if defined.is_empty() {
                format!("none is defined; {how}")
            } else {
                format!("expected one of: {}", list(defined))
            };
            Err(self.err(&r.span, format!("unknown {what} `{name}`; {known}")))
        };
        match r.kind {
            RefKind::Mapping { offset } => {
                let Some(&len) = self.mappings.get(name) else {
                    let defined: Vec<&str> = self.mappings.keys().map(String::as_str).collect();
                    let known = if defined.is_empty() {
                        "no `mmap` step has a `name`".to_owned()
                    } else {
                        format!("mappings defined: {}", list(defined))
                    };
                    return Err(self.err(
                        &r.span,
                        format!(
                            "unknown mapping `{name}` in address `{}`; {known}",
                            r.written
                        ),
                    ));
                };
                if offset < 0 {
                    return Err(self.err(
                        &r.span,
                        format!(
                            "address `{}` lies below the start of mapping `{name}`; expected an offset from 0 to \
                             {len:#x}",
                            r.written
                        ),
                    ));
                }
                if offset.unsigned_abs() > len {
                    return Err(self.err(
                        &r.span,
                        format!(
                            "address `{}` lies beyond the end of mapping `{name}` ({len:#x} bytes); expected an \
                             offset from 0 to {len:#x}",
                            r.written
                        ),
                    ));
                }
                Ok(())
            }
            RefKind::File if self.files.contains_key(name) => Ok(()),
            RefKind::File => unknown(
                "file",
                self.files.keys().map(String::as_str).collect(),
                "declare it with `[[file]]`",
            ),
            RefKind::Device if self.pci_devices.contains(name) => {
                let dmirrors: Vec<&str> = self
                    .devices
                    .keys()
                    .filter(|d| !self.pci_devices.contains(*d))
                    .map(String::as_str)
                    .collect();
                let known = if dmirrors.is_empty() {
                    "none is declared".to_owned()
                } else {
                    format!("expected one of: {}", list(dmirrors))
                };
                Err(self.err(
                    &r.span,
                    format!(
                        "device `{name}` is a `kind = \"pci\"` device, which has no device file; `open` needs a \
                         `dmirror` ({known})"
                    ),
                ))
            }
            RefKind::Device if self.devices.contains_key(name) => Ok(()),
            RefKind::Device => unknown(
                "device",
                self.devices.keys().map(String::as_str).collect(),
                "declare it with `[[device]]`",
            ),
            RefKind::Pin if self.pins.contains(name) => Ok(()),
            RefKind::Pin => unknown(
                "pin",
                self.pins.iter().map(String::as_str).collect(),
                "take one with `{ op = \"pin\", at = ..., pages = ..., flags = [...], name = ... }`",
            ),
            RefKind::PciDevice if self.pci_devices.contains(name) => Ok(()),
            RefKind::PciDevice if self.devices.contains_key(name) => {
                let known = if self.pci_devices.is_empty() {
                    "none is declared; declare one with `[[device]]` and `kind = \"pci\"`"
                        .to_owned()
                } else {
                    format!(
                        "expected one of: {}",
                        list(self.pci_devices.iter().map(String::as_str))
                    )
                };
                Err(self.err(
                    &r.span,
                    format!(
                        "device `{name}` is a `dmirror`, not a `kind = \"pci\"` device; {known}"
                    ),
                ))
            }
            RefKind::PciDevice => unknown(
                "pci device",
                self.pci_devices.iter().map(String::as_str).collect(),
                "declare it with `[[device]]` and `kind = \"pci\"`",
            ),
            RefKind::Export if self.exports.contains_key(name) => Ok(()),
            RefKind::Export => unknown(
                "export",
                self.exports.keys().map(String::as_str).collect(),
                "declare it in a `pci` device's `export = [...]`",
            ),
            RefKind::SvaDevice if self.sva_devices.contains(name) => Ok(()),
            RefKind::SvaDevice => unknown(
                "sva device",
                self.sva_devices.iter().map(String::as_str).collect(),
                "declare it with `[[device]]` and `kind = \"sva\"`",
            ),
            RefKind::SvaJob if self.sva_jobs.contains(name) => Ok(()),
            RefKind::SvaJob => unknown(
                "sva job",
                self.sva_jobs.iter().map(String::as_str).collect(),
                "submit one with `{ op = \"sva.submit\", dev = ..., job = ..., ... }`",
            ),
            RefKind::Handle if self.handles.contains(name) => Ok(()),
            RefKind::Handle => unknown(
                "dma handle",
                self.handles.iter().map(String::as_str).collect(),
                "take one with `{ op = \"dma.map\", dev = ..., at = ..., len = ..., name = ... }`",
            ),
            RefKind::GpuDevice if self.gpu_devices.contains(name) => Ok(()),
            RefKind::GpuDevice => unknown(
                "gpu device",
                self.gpu_devices.iter().map(String::as_str).collect(),
                "declare it with `[[device]]` and `kind = \"gpu\"`",
            ),
            RefKind::GpuName(what)
                if self.gpu_names.get(what).is_some_and(|s| s.contains(name)) =>
            {
                Ok(())
            }
            RefKind::GpuName(what) => unknown(
                what,
                self.gpu_names
                    .get(what)
                    .map(|s| s.iter().map(String::as_str).collect())
                    .unwrap_or_default(),
                "define it with a `gpu.*` step's `name`",
            ),
            RefKind::Fd if self.fds.contains(name) => Ok(()),
            RefKind::Fd => unknown(
                "fd",
                self.fds.iter().map(String::as_str).collect(),
                "open one with `{ op = \"open\", dev = ..., fd = ... }`",
            ),
            RefKind::Process if self.processes.contains_key(name) => Ok(()),
            RefKind::Process => unknown(
                "process",
                self.processes.keys().map(String::as_str).collect(),
                "declare it with `[[process]]` or create it with a `fork` step",
            ),
            RefKind::Child if self.children.contains(name) => Ok(()),
            RefKind::Child => unknown(
                "child process",
                self.children.iter().map(String::as_str).collect(),
                "create it with `{ op = \"fork\", child = ... }`",
            ),
        }
    }
}
