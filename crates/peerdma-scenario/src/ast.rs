//! The parsed and statically validated model of a scenario file (see `docs/scenario-format.md`).
//!
//! Everything here has passed the static checks of [`crate::parse()`]: sizes are in bytes, times in
//! nanoseconds, every `len` is non-zero, and every name a step uses (file, device, fd, mapping, process) is
//! defined somewhere in the file. What can only be known at run time is left to the runner:
//! - a symbolic address (`buf+0x1000`) is resolved against the mapping that `mmap { name = "buf" }` created
//!   *in the acting process* (the static check only proves that some `mmap` step names `buf` and that the
//!   offset lies within `[0, len]` of that step's length, the largest one when several steps share a name);
//! - a `fd` names the device file that an `open` step opened in the acting process;
//! - a `fork` child's threads start when the `fork` step runs.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use peerdma_core::{Errno, SimDuration};

pub use crate::ops::Op;
use crate::pattern::Pattern;
use crate::units::{self, UnitError};

/// The words of the scenario language that name kernel vocabulary: `prot` (`"none"`, `"r"`, `"rw"`, `"rx"`,
/// `"rwx"`, `"w"`...; the `Display` of [`Prot`] is this spelling), `madvise`'s `advice` and `expect.signal`
/// (`"SIGSEGV"`, `"SIGBUS"`). They are `peerdma-core`'s types; the parser maps the spellings to them.
pub use peerdma_core::{Advice, Prot, Signal};

/// A whole scenario: settings, declarations and threads, in file order.
#[derive(Debug, Clone, PartialEq)]
pub struct Scenario {
    /// The path the scenario was read from (as given to [`crate::parse()`]).
    pub path: String,
    /// The `[sim]` table.
    pub sim: SimSettings,
    /// The `[[file]]` tables.
    pub files: Vec<FileDecl>,
    /// The `[[device]]` tables.
    pub devices: Vec<DeviceDecl>,
    /// The processes that exist when the simulation starts: always `"main"` first, then each `[[process]]`.
    /// Processes created by `fork` steps are not listed here; they come into being when the step runs.
    pub processes: Vec<String>,
    /// The home NUMA node of each `[[process]]` that sets `node`, by name (each below the number of
    /// [`SimSettings::memory`] nodes). Every other process starts on node 0; a forked child inherits its
    /// parent's node.
    pub process_nodes: BTreeMap<String, u32>,
    /// The `[[thread]]` tables.
    pub threads: Vec<ThreadDecl>,
    /// The `[topology]` table: the PCIe tree, validated (it builds into a [`peerdma_pci::Topology`]).
    pub topology: Option<peerdma_pci::TopologySpec>,
    /// The `[timing]` table: parameter overrides by key (each a key of [`crate::params::all_params`]), in the
    /// parameter's unit (nanoseconds for a time). Ignored for time parameters in zero mode.
    pub timing: BTreeMap<String, u64>,
}

impl Scenario {
    /// Checks that the scenario has something to run: an empty file, or one without any `[[thread]]`, is an
    /// error for `peerdma run`, `check` and `explore` (it would "pass" having checked nothing). A file with
    /// only a `[topology]` is still valid input for `peerdma topo`.
    ///
    /// # Errors
    /// A [`crate::ScenarioError`] at line 1 when there is no thread.
    pub fn check_runnable(&self) -> Result<(), crate::ScenarioError> {
        if self.threads.is_empty() {
            return Err(crate::ScenarioError::whole_file(
                &self.path,
                "the scenario has no `[[thread]]`: nothing to run; expected at least one `[[thread]]` \
                 with `steps`",
            ));
        }
        Ok(())
    }

    /// Returns the timing every cost table of the run is built from: the `[sim] time` mode with the
    /// `[timing]` overrides (which zero mode ignores for time parameters).
    pub fn timing(&self) -> peerdma_core::Timing {
        let mut t = match self.sim.time {
            TimeMode::Calibrated => peerdma_core::Timing::calibrated(),
            TimeMode::Zero => peerdma_core::Timing::zero(),
        };
        for (key, &value) in &self.timing {
            t.set(key.clone(), value);
        }
        t
    }

    /// Returns the declared file named `name`.
    pub fn file(&self, name: &str) -> Option<&FileDecl> {
        self.files.iter().find(|f| f.name == name)
    }

    /// Returns the declared device named `name`.
    pub fn device(&self, name: &str) -> Option<&DeviceDecl> {
        self.devices.iter().find(|d| d.name == name)
    }

    /// Returns the names of the processes created by `fork` steps, in file order.
    pub fn forked_processes(&self) -> Vec<&str> {
        self.threads
            .iter()
            .flat_map(|t| &t.steps)
            .filter_map(|s| match &s.op {
                Op::Proc(crate::ops::proc::ProcOp::Fork { child }) => Some(child.as_str()),
                _ => None,
            })
            .collect()
    }
}

/// The `[sim]` settings.
#[derive(Debug, Clone, PartialEq)]
pub struct SimSettings {
    /// The random seed (`--seed` overrides it). Default 0.
    pub seed: u64,
    /// The timing model. Default [`TimeMode::Calibrated`].
    pub time: TimeMode,
    /// Whether agents ready at the same instant run in a random order. Default false.
    pub explore: bool,
    /// Relative latency jitter, in `0.0..=1.0`. Default 0.
    pub jitter: f64,
    /// The simulation stops with an error when simulated time passes this. Default 60 s.
    pub time_limit: SimDuration,
    /// RAM size of each NUMA node in bytes, node 0 first (`memory = "1GiB"` is one node, a list is one entry
    /// per node): at least one entry, each non-zero and a multiple of the page size. Default one node of
    /// 1 GiB.
    pub memory: Vec<u64>,
    /// The NUMA nodes whose memory is ZONE_MOVABLE (`movable = [1]`: the `movable_node` boot option, or
    /// memory hotplugged and onlined movable), ascending and without duplicates; each is a
    /// [`SimSettings::memory`] node other than 0 (node 0 holds the zero page and kernel memory). Only
    /// anonymous user pages are allocated there; kernel/driver, hugetlb and page-cache pages never are, and a
    /// FOLL_LONGTERM pin migrates pages out of them first. Default none.
    pub movable: Vec<u32>,
    /// What one run may use (`[sim.limits]`).
    pub limits: Limits,
}

impl Default for SimSettings {
    fn default() -> Self {
        Self {
            seed: 0,
            time: TimeMode::Calibrated,
            explore: false,
            jitter: 0.0,
            time_limit: SimDuration::from_millis(60_000),
            memory: vec![1 << 30],
            movable: Vec::new(),
            limits: Limits::default(),
        }
    }
}

/// The resources one run may use (`[sim.limits]`): every size, length and count of a scenario is checked
/// against them, at parse time where the value is written in the file and at run time otherwise, so that
/// no input makes the tool allocate without bound, run away or crash. Reaching one at run time stops the run
/// with [`crate::Outcome::Limit`], naming the limit and the step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `host_memory`: the most bytes of host memory one step may ask for at once (a `load`'s or a device
    /// read's buffer, a `[[file]]`'s contents; a `store` streams its pattern a page at a time and needs no
    /// buffer). Default 1 GiB.
    pub host_memory: u64,
    /// `memory`: the most simulated memory (the sum of `[sim] memory`, each device's and file's `size`).
    /// Default 64 GiB (the model keeps per-frame metadata for all of it).
    pub memory: u64,
    /// `steps`: the most steps all threads may run together. Default 10,000,000.
    pub steps: u64,
    /// `events`: the most engine events. Default 100,000,000.
    pub events: u64,
    /// `trace`: the most trace events recorded. Default 10,000,000.
    pub trace: u64,
    /// `wall_time`: the most host (wall-clock) time one run may take, in nanoseconds; `0` means no limit.
    /// Default 10 minutes. A run stopped by it is the one outcome that depends on the host.
    pub wall_time: SimDuration,
}

impl Limits {
    /// The default `host_memory`: 1 GiB.
    pub const DEFAULT_HOST_MEMORY: u64 = 1 << 30;
    /// The default simulated `memory`: 64 GiB.
    pub const DEFAULT_MEMORY: u64 = 64 << 30;
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            host_memory: Self::DEFAULT_HOST_MEMORY,
            memory: Self::DEFAULT_MEMORY,
            steps: 10_000_000,
            events: 100_000_000,
            trace: 10_000_000,
            wall_time: SimDuration::from_millis(600_000),
        }
    }
}

/// How simulated operations cost time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeMode {
    /// `"calibrated"`: the timing model.
    Calibrated,
    /// `"zero"`: every cost is zero.
    Zero,
}

/// A `[[file]]`: an in-memory file for file-backed mappings and `pread`/`pwrite`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileDecl {
    /// Its name, unique among files.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its initial contents, from offset 0. Default [`Pattern::Zero`].
    pub pattern: Pattern,
    /// A DAX file on persistent memory (`dax = true`) instead of a page-cache file.
    pub dax: bool,
    /// A tmpfs (shmem) file (`tmpfs = true`): no dirty tracking, so shared mappings need no write-notify
    /// (a read fault maps the page writable) and long-term write pins of shared mappings are allowed.
    /// Without it a file is on a file system with dirty tracking.
    pub tmpfs: bool,
}

/// A `[[device]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceDecl {
    /// Its name, unique among devices.
    pub name: String,
    /// The kind of device.
    pub kind: DeviceKind,
    /// The kind of device memory it migrates to.
    pub memory: DeviceMemoryKind,
    /// Its device memory in bytes (`size`; default 256 MiB, test_hmm.c's chunk).
    pub size: u64,
    /// A `pci` device's PCI function in `[topology]` (`node`, default the device's name).
    pub node: Option<String>,
    /// A `pci` device's IOMMU domain.
    pub iommu: IommuMode,
    /// BAR ranges a `pci` device adds as P2P memory with struct pages (`p2p = [...]`).
    pub p2p: Vec<P2pDecl>,
    /// BAR ranges a `pci` device exports as memory without struct page (`export = [...]`).
    pub exports: Vec<ExportDecl>,
    /// An `nvme` device's queue accepts P2P memory (`QUEUE_FLAG_PCI_P2PDMA`; `p2p_queue`, default true).
    pub p2p_queue: bool,
    /// A `gpu` device's memory and BAR window.
    pub gpu: Option<GpuDecl>,
    /// An `sva` device's geometry.
    pub sva: SvaDecl,
    /// A `dmirror` device's notifier handles its own MIGRATE events like any other invalidation
    /// (`own_migrations = "invalidate"`) instead of ignoring them as lib/test_hmm.c does (`"ignore"`, the
    /// default; [`peerdma_devices::dmirror::DmirrorDevice::set_invalidate_own_migrations`]).
    pub invalidate_own_migrations: bool,
}

/// The `gpu` keys of a `[[device]]` (`kind = "gpu"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuDecl {
    /// VRAM bytes for buffer objects (`vram`).
    pub vram: u64,
    /// The BAR that exposes VRAM (`bar`, default 0).
    pub bar: u8,
    /// Bytes the BAR window shows (`bar_window`); `None`: a resizable BAR showing all of `vram`.
    pub window: Option<u64>,
    /// Device memory for managed ranges (`managed`, default `vram`).
    pub managed: u64,
    /// **Beyond mainline** (`beyond_mainline_p2p`, default false): the managed pool sits in the BAR after the
    /// window and peers' `hmm_range_fault` on its resident pages get their bus addresses (the unmerged HMM
    /// P2P series) instead of migrating them.
    pub beyond_mainline_p2p: bool,
    /// Test-only, never parsed: buffer moves skip their importers' invalidation
    /// (`peerdma_devices::gpu::GpuInjection::SkipPeerInvalidation`), so tests can show the oracle catches it.
    pub skip_peer_invalidation: bool,
}

/// The keys of a `kind = "sva"` device (the accelerator of `peerdma_devices::sva`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SvaDecl {
    /// `atc_sets`: ATC sets.
    pub atc_sets: u64,
    /// `atc_ways`: ATC ways per set.
    pub atc_ways: u64,
    /// `wq_depth`: descriptors outstanding at most.
    pub wq_depth: u64,
    /// `prq_entries`: the page-request queue of the (one, shared) IOMMU unit; the smallest given wins.
    pub prq_entries: u64,
    /// `pasid_bits`: the device supports PASIDs below `1 << pasid_bits`.
    pub pasid_bits: u64,
}

impl Default for SvaDecl {
    fn default() -> Self {
        Self {
            atc_sets: 16,
            atc_ways: 4,
            wq_depth: 8,
            prq_entries: 2048,
            pasid_bits: 20,
        }
    }
}

/// How a `pci` device's DMA is translated (`iommu = "..."`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IommuMode {
    /// `"identity"`: DMA address = physical address (IOMMU_DOMAIN_IDENTITY, or no IOMMU).
    #[default]
    Identity,
    /// `"dma"`: IOVA domain with strict invalidation (IOMMU_DOMAIN_DMA, `iommu.strict=1`).
    Dma,
    /// `"dma-lazy"`: IOVA domain with the deferred flush queue (IOMMU_DOMAIN_DMA_FQ).
    DmaLazy,
}

/// One `p2p = [...]` entry: `pci_p2pdma_add_resource(dev, bar, size, offset)` and optionally publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct P2pDecl {
    /// The BAR index.
    pub bar: u8,
    /// Bytes (0: to the end of the BAR).
    pub size: u64,
    /// Offset in the BAR.
    pub offset: u64,
    /// `pci_p2pmem_publish` (default true).
    pub publish: bool,
}

/// One `export = [...]` entry: a BAR range without struct page the device exports (dma-buf style).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportDecl {
    /// The name `bar.mmap` and `dmabuf.move_notify` steps use, unique among exports.
    pub name: String,
    /// The BAR index.
    pub bar: u8,
    /// Offset in the BAR.
    pub offset: u64,
    /// Bytes (0: to the end of the BAR).
    pub len: u64,
    /// Whether importers can be revoked (a dma-buf export); `false` refuses long-term users.
    pub revocable: bool,
}

/// The discipline of a `dma.map` step (`get_user_dma_sg` flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmaMode {
    /// `"short-term"`: pin, map, DMA, unmap, unpin.
    ShortTerm,
    /// `"long-term"`: a FOLL_LONGTERM pin (RDMA MR, VFIO).
    LongTerm,
    /// `"mirror"`: a coherent mirror, no pins (ODP).
    Mirror,
}

/// The kinds of device a scenario can declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// `"dmirror"`: the kernel's `test_hmm` mirror device.
    Dmirror,
    /// `"pci"`: a PCI function in `[topology]` with a DMA engine (a NIC, an NVMe controller, a GPU's copy
    /// engine: modelled alike), optionally providing P2P memory or exporting BARs.
    Pci,
    /// `"rnic"`: a `pci` device that is also an RDMA NIC (`peerdma_devices::rnic`): memory regions, queue
    /// pairs, completion queues (`rdma.*` ops).
    Rnic,
    /// `"nvme"`: a `pci` device that is also an NVMe controller (`peerdma_devices::nvme`): a namespace of
    /// `size` bytes and O_DIRECT commands (`nvme.*` ops); its `p2p` entries are its CMB.
    Nvme,
    /// `"gpu"`: a PCI function with VRAM behind a BAR window, buffer objects and managed memory
    /// (`peerdma_devices::gpu`).
    Gpu,
    /// `"sva"`: an SVA accelerator (work queues of copy/fill descriptors over user VAs, an ATS ATC, PRI).
    Sva,
}

/// The kind of `ZONE_DEVICE` memory a device has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceMemoryKind {
    /// `"private"`: `MEMORY_DEVICE_PRIVATE`, not CPU-addressable.
    Private,
    /// `"coherent"`: `MEMORY_DEVICE_COHERENT`, CPU-addressable.
    Coherent,
}

/// A `[[thread]]`: a list of steps run in order by one simulated thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadDecl {
    /// Its name, unique among threads.
    pub name: String,
    /// The process it belongs to: `"main"`, a `[[process]]`, or a child created by a `fork` step.
    pub process: String,
    /// Its steps, in order.
    pub steps: Vec<Step>,
}

/// A position in the scenario file (1-based line and character column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Loc {
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub col: usize,
}

impl fmt::Display for Loc {
    /// Prints `line:col`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.col)
    }
}

/// One step of a thread: an operation and what it must produce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// The operation.
    pub op: Op,
    /// What the operation must produce; the default means "must succeed".
    pub expect: Expect,
    /// Where the step's table starts in the file (its `{`).
    pub loc: Loc,
}

/// What a step must produce (`expect = { ... }`). Only the keys the step's op allows are ever set.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Expect {
    /// `errno`: `Some(None)` expects success, `Some(Some(e))` expects `-e`. `None` (not written) also means
    /// success is required, unless `signal` is set.
    pub errno: Option<Option<Errno>>,
    /// `errno = "any"`: success or any error is accepted (counters and data are then not checked on error).
    pub any_errno: bool,
    /// `cpages`: the dmirror command's `cpages` counter (checked on success only).
    pub cpages: Option<u64>,
    /// `faults`: the dmirror command's `faults` counter (checked on success only).
    pub faults: Option<u64>,
    /// `data`: the bytes read (`load`, `pread`, `dmirror.read`).
    pub data: Option<Pattern>,
    /// `bytes`: the snapshot bytes, one per page (`dmirror.snapshot`).
    pub bytes: Option<Vec<u8>>,
    /// `value`: the little-endian value read by a `load` of 1, 2, 4 or 8 bytes.
    pub value: Option<u64>,
    /// `signal`: the CPU access (`load`/`store`) faults with this signal.
    pub signal: Option<Signal>,
    /// `segments`: a `dma.map` handle's merged DMA segments as `kind:len` (`bus:64KiB`, `ram:8KiB`,
    /// `host-bridge:4KiB`), in order.
    pub segments: Option<Vec<(String, u64)>>,
    /// `pinned`: the number of pages a `dma.map` step pinned.
    pub pinned: Option<u64>,
    /// `dma_addr`: the first DMA address of a `dma.map` handle.
    pub dma_addr: Option<u64>,
    /// `violation`: the oracle must report a violation of this kind while the step runs (a step that
    /// demonstrates what the oracle catches); it is then expected and the run goes on.
    pub violation: Option<peerdma_mm::ViolationKind>,
    /// `data = { one_of = [...] }`: the bytes read must match one of these patterns (racing steps under
    /// exploration, whose outcome depends on the order).
    pub data_one_of: Vec<Pattern>,
    /// `counters = { "cpu.cow_copy" = 1 }`: how much each named metric counter grew while the step ran
    /// (any step; other threads' work in that time counts too).
    pub counters: Vec<(String, u64)>,
    /// `events = { m = ["clear"] }`: the MMU notifier events (in order) that the mirror of each named
    /// device file acted on while the step ran (any step; `[]` expects none).
    pub events: Vec<(String, Vec<peerdma_mm::NotifierEvent>)>,
    /// `status`: an `rdma.poll`'s completion statuses, comma-separated.
    pub status: Option<String>,
    /// `atc_hit_pct = [MIN, MAX]`: an `sva.stats` step's ATC hit rate in percent, inclusive bounds.
    pub atc_hit_pct: Option<(u64, u64)>,
    /// `translation_requests = [MIN, MAX]`: an `sva.stats` step's ATS translation requests, inclusive bounds.
    pub translation_requests: Option<(u64, u64)>,
    /// `duration`: the step's simulated duration (from its start to its end), checked within `tolerance`
    /// (any op; a calibration scenario states the figure it reproduces this way).
    pub duration: Option<SimDuration>,
    /// `tolerance`: how far the duration may be from `duration` (exact when not written).
    pub tolerance: Tolerance,
}

/// How far a measured value may be from the expected one (`expect.tolerance`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Tolerance {
    /// Exactly the expected value.
    #[default]
    Exact,
    /// Within this many nanoseconds either way (`tolerance = "10ns"`).
    Absolute(SimDuration),
    /// Within this many parts per million of the expected value either way (`tolerance = "2%"` is
    /// 20 000).
    RelativePpm(u64),
}

impl Tolerance {
    /// Returns whether `got` is within this tolerance of `want`.
    pub fn accepts(self, want: u64, got: u64) -> bool {
        let diff = want.abs_diff(got);
        match self {
            Self::Exact => diff == 0,
            Self::Absolute(d) => diff <= d.as_nanos(),
            Self::RelativePpm(ppm) => {
                u128::from(diff) * 1_000_000 <= u128::from(ppm) * u128::from(want)
            }
        }
    }
}

impl fmt::Display for Tolerance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact => f.write_str("exactly"),
            Self::Absolute(d) => write!(f, "within {d}"),
            Self::RelativePpm(ppm) => {
                let pct = format!("{}.{:04}", ppm / 10_000, ppm % 10_000);
                write!(
                    f,
                    "within {}%",
                    pct.trim_end_matches('0').trim_end_matches('.')
                )
            }
        }
    }
}

impl Expect {
    /// Returns whether nothing but success is expected (no `expect` table, or an empty one).
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// An address: raw, or relative to a named mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddrExpr {
    /// A raw virtual address (`0x7f0000000000`).
    Raw(u64),
    /// `NAME`, `NAME+OFFSET` or `NAME-OFFSET`: the start of mapping `name` plus `offset` bytes. Statically
    /// `0 <= offset <= len` of the mapping.
    Sym {
        /// The mapping's name (`mmap { name = ... }`).
        name: String,
        /// The byte offset from the mapping's start.
        offset: i64,
    },
}

impl fmt::Display for AddrExpr {
    /// Prints `0x7f0000000000`, `buf`, `buf+0x1000` or `buf-0x1000`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Raw(addr) => write!(f, "{addr:#x}"),
            Self::Sym { name, offset: 0 } => write!(f, "{name}"),
            Self::Sym { name, offset } if *offset < 0 => {
                write!(f, "{name}-{:#x}", offset.unsigned_abs())
            }
            Self::Sym { name, offset } => write!(f, "{name}+{offset:#x}"),
        }
    }
}

/// A malformed address expression; the message says what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct AddrError {
    /// What was expected and what was found.
    pub message: String,
}

impl FromStr for AddrExpr {
    type Err = AddrError;

    /// Parses `0x7f0000000000` (or a decimal number), `NAME`, `NAME+OFFSET` or `NAME-OFFSET`, where NAME is
    /// `[A-Za-z_][A-Za-z0-9_]*` and OFFSET a size (`4KiB`, `0x1000`, `3 pages`). Whitespace around the
    /// operator is allowed. Whether NAME exists is not checked here.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let expected = || AddrError {
            message: format!(
                "expected an address like `buf`, `buf+4KiB`, `buf-0x1000` or `0x7f0000000000`, found `{text}`"
            ),
        };
        let trimmed = text.trim();
        if trimmed.starts_with(|c: char| c.is_ascii_digit()) {
            return units::parse_number(trimmed)
                .map(Self::Raw)
                .map_err(|e| match e {
                    UnitError::Overflow(_) => AddrError {
                        message: format!(
                            "expected an address below 2^64, found `{text}`, which overflows"
                        ),
                    },
                    _ => expected(),
                });
        }
        let name_end = trimmed
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(trimmed.len());
        let (name, rest) = trimmed.split_at(name_end);
        if !name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
            return Err(expected());
        }
        let rest = rest.trim_start();
        if rest.is_empty() {
            return Ok(Self::Sym {
                name: name.to_owned(),
                offset: 0,
            });
        }
        let (negative, size_text) = if let Some(r) = rest.strip_prefix('+') {
            (false, r)
        } else if let Some(r) = rest.strip_prefix('-') {
            (true, r)
        } else {
            return Err(expected());
        };
        let magnitude = units::parse_size(size_text).map_err(|e| AddrError {
            message: format!("bad offset in address `{text}`: {e}"),
        })?;
        let magnitude = i64::try_from(magnitude).map_err(|_| AddrError {
            message: format!(
                "expected an offset up to {:#x} in address `{text}`, found {magnitude:#x}, which overflows",
                i64::MAX
            ),
        })?;
        Ok(Self::Sym {
            name: name.to_owned(),
            offset: if negative { -magnitude } else { magnitude },
        })
    }
}

/// `mmap` flags. Exactly one of `private`/`shared` was written (`shared == false` means `MAP_PRIVATE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MmapFlags {
    /// `MAP_SHARED` (else `MAP_PRIVATE`).
    pub shared: bool,
    /// `MAP_ANONYMOUS`.
    pub anonymous: bool,
    /// `MAP_FIXED`.
    pub fixed: bool,
    /// `MAP_FIXED_NOREPLACE`.
    pub fixed_noreplace: bool,
    /// `MAP_POPULATE`.
    pub populate: bool,
    /// `MAP_HUGETLB`.
    pub hugetlb: bool,
}

/// How long a `sleep` step sleeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SleepSpec {
    /// `for = TIME`.
    Fixed(SimDuration),
    /// `random = [MIN, MAX]`: uniformly in `[MIN, MAX]` (MIN <= MAX), drawn from the simulation's RNG.
    Random(SimDuration, SimDuration),
}

/// The source of a `dmirror.write`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteSource {
    /// `ptr`: the data is copied from this address of the process.
    Ptr(AddrExpr),
    /// `pattern`: the data is this pattern.
    Pattern(Pattern),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addr_expr_prints_as_written() {
        assert_eq!(
            AddrExpr::Raw(0x7f00_0000_0000).to_string(),
            "0x7f0000000000"
        );
        let sym = |offset| AddrExpr::Sym {
            name: "buf".into(),
            offset,
        };
        assert_eq!(sym(0).to_string(), "buf");
        assert_eq!(sym(0x1000).to_string(), "buf+0x1000");
        assert_eq!(sym(-0x1000).to_string(), "buf-0x1000");
        assert_eq!(sym(i64::MIN).to_string(), "buf-0x8000000000000000");
    }

    fn sym(name: &str, offset: i64) -> AddrExpr {
        AddrExpr::Sym {
            name: name.into(),
            offset,
        }
    }

    #[test]
    fn raw_addresses_parse_as_hex_or_decimal() {
        assert_eq!(
            "0x7f0000000000".parse(),
            Ok(AddrExpr::Raw(0x7f00_0000_0000))
        );
        assert_eq!("4096".parse(), Ok(AddrExpr::Raw(4096)));
        assert_eq!(" 0x10 ".parse(), Ok(AddrExpr::Raw(0x10)));
    }

    #[test]
    fn symbolic_addresses_take_a_size_offset() {
        assert_eq!("buf".parse(), Ok(sym("buf", 0)));
        assert_eq!("buf+2MiB".parse(), Ok(sym("buf", 2 << 20)));
        assert_eq!("buf+0x1000".parse(), Ok(sym("buf", 0x1000)));
        assert_eq!("buf + 3 pages".parse(), Ok(sym("buf", 3 * 4096)));
        assert_eq!("_m2-4KiB".parse(), Ok(sym("_m2", -4096)));
        assert_eq!("buf+0".parse(), Ok(sym("buf", 0)));
    }

    #[test]
    fn malformed_addresses_say_what_was_expected() {
        for bad in [
            "", "+0x10", "buf*2", "buf 4KiB", "0xzz", "-buf", "b.u.f", "1.5",
        ] {
            let err = bad.parse::<AddrExpr>().unwrap_err();
            assert!(
                err.message.starts_with("expected an address like"),
                "{bad}: {err}"
            );
        }
        let err = "buf+4 KB B".parse::<AddrExpr>().unwrap_err();
        assert!(
            err.message
                .starts_with("bad offset in address `buf+4 KB B`: expected a size"),
            "{err}"
        );
    }

    #[test]
    fn address_overflow_is_rejected() {
        let err = "0x10000000000000000".parse::<AddrExpr>().unwrap_err();
        assert!(err.message.contains("overflows"), "{err}");
        let err = "buf+0x8000000000000000".parse::<AddrExpr>().unwrap_err();
        assert!(err.message.contains("overflows"), "{err}");
        assert_eq!("buf-0x7fffffffffffffff".parse(), Ok(sym("buf", -i64::MAX)));
    }

    #[test]
    fn addr_expr_display_round_trips() {
        for text in ["0x1000", "buf", "buf+0x2000", "buf-0x1000"] {
            assert_eq!(text.parse::<AddrExpr>().unwrap().to_string(), text);
        }
    }

    #[test]
    fn prot_prints_scenario_spelling() {
        assert_eq!(Prot::NONE.to_string(), "none");
        assert_eq!(Prot::RW.to_string(), "rw");
        let rx = Prot {
            read: true,
            write: false,
            exec: true,
        };
        assert_eq!(rx.to_string(), "rx");
    }

    #[test]
    fn default_settings_match_the_format_doc() {
        let s = SimSettings::default();
        assert_eq!(s.time_limit, SimDuration::from_nanos(60_000_000_000));
        assert_eq!(s.memory, [1 << 30]);
        assert_eq!(s.time, TimeMode::Calibrated);
    }
}
