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
//! The walk is split by what it reads: `parse/settings.rs` (`[sim]`, `[timing]`), `parse/decls.rs`
//! (`[[file]]`, `[[device]]`, `[[process]]`, `[[thread]]`), `parse/topology.rs`, the steps here and their
//! `expect` tables in `parse/expect.rs`, the value readers every table uses in `parse/values.rs`, and pass 3
//! in `parse/resolve.rs`.
//!
//! The first problem found stops the parse and becomes a [`ScenarioError`] at its `line:col`. Nothing here
//! panics on any input: every index into the text is clamped, every arithmetic step is checked.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::path::Path;

use toml::Spanned;
use toml::de::{DeString, DeTable, DeValue};

use crate::ast::{Expect, Limits, Loc, Scenario, SimSettings, Step};
use crate::error::{LineIndex, ScenarioError};
use crate::ops::{self, OPS};
use crate::params;

mod decls;
mod expect;
mod resolve;
mod settings;
mod topology;
mod values;

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
}
