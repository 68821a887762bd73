//! Input errors located at `file:line:col`.
//!
//! Every problem with a scenario file — TOML syntax, an unknown key, a wrong type, a bad unit, an unknown
//! name — becomes one [`ScenarioError`] that points at the offending token. Lines and columns are 1-based and
//! columns count characters (not bytes), like rustc. Line 0 means the error has no position in the text
//! (the file could not be read).
//!
//! A scenario that parses can still meet errors only the run can see: a step naming a mapping, pin, DMA
//! handle or open file its process does not hold at that moment, or a kernel refusal while the DMA platform
//! is built from `[topology]`. Those are [`RunError`]s; the runner renders one as the failed step's message
//! (or the run's stop reason), so its text is part of the report format.

use std::fmt::Write as _;

use peerdma_core::{Errno, Va};

/// Why a step could not run, or why the run's DMA platform could not be built: the runner's error, rendered
/// as an expectation failure of the step (or the run's stop reason for the platform).
///
/// The static checks of [`crate::parse()`] prove that every name is defined *somewhere* in the file; these
/// are the cases only the run can see — the acting process does not hold the mapping, pin, handle or open
/// file at this point — and the kernel's refusals while the platform is assembled from `[topology]`.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// An `nvme.*` step misuses the controller (a range beyond the namespace, a device of another kind).
    #[error("{what}")]
    Nvme {
        /// What went wrong.
        what: String,
    },
    /// An `rdma.*` step names something that does not exist, or misuses the NIC's API.
    #[error("{what}")]
    Rdma {
        /// What went wrong.
        what: String,
    },
    /// A symbolic address names a mapping the acting process does not have (yet, or any more).
    #[error("mapping `{name}` does not exist in process `{process}` at this point")]
    NoMapping {
        /// The mapping name.
        name: String,
        /// The acting process.
        process: String,
    },
    /// A symbolic address with a negative offset.
    #[error("negative offset {offset} from `{name}`")]
    NegativeOffset {
        /// The mapping name.
        name: String,
        /// The offset as written.
        offset: i64,
    },
    /// A `store` or `load` at a raw address without `len` (no mapping to take the length from).
    #[error("`{op}` at a raw address needs `len`")]
    RawAddressNeedsLen {
        /// The op's name.
        op: &'static str,
    },
    /// A length that does not fit the host's memory.
    #[error("length too large")]
    LengthTooLarge,
    /// A page count whose bytes do not fit the host's memory.
    #[error("too many pages")]
    TooManyPages,
    /// A `dma.raw` length that does not fit the host's memory.
    #[error("len {len:#x} too large")]
    LenTooLarge {
        /// The length in bytes.
        len: u64,
    },
    /// A step asks for more host memory at once than `[sim.limits] host_memory` allows.
    #[error(
        "the step needs {bytes:#x} bytes of host memory, over the limit of {limit:#x} (`[sim.limits] host_memory`)"
    )]
    HostMemoryLimit {
        /// The bytes asked for.
        bytes: u64,
        /// The limit.
        limit: u64,
    },
    /// The threads ran more steps than `[sim.limits] steps` allows.
    #[error("step limit reached: {limit} steps run (`[sim.limits] steps`)")]
    StepLimit {
        /// The limit.
        limit: u64,
    },
    /// A pin the acting process does not hold.
    #[error("pin `{pin}` is not held by process `{process}`")]
    NoPin {
        /// The pin's name.
        pin: String,
        /// The acting process.
        process: String,
    },
    /// A `gpu.*` step names a buffer, attachment or managed range no earlier step created.
    #[error("{what} `{name}` does not exist at this point")]
    NoGpuObject {
        /// What kind of object (`bo`, `attachment`, `range`).
        what: &'static str,
        /// Its name.
        name: String,
    },
    /// The GPU model refused a step's arguments or the device's declaration.
    #[error("gpu `{device}`")]
    Gpu {
        /// The device.
        device: String,
        /// The refusal.
        #[source]
        source: peerdma_devices::gpu::GpuError,
    },
    /// An `sva` job the acting process did not submit (or already waited for).
    #[error("sva job `{job}` is not pending in process `{process}`")]
    NoSvaJob {
        /// The job's name.
        job: String,
        /// The acting process.
        process: String,
    },
    /// A DMA handle the acting process does not hold.
    #[error("dma handle `{handle}` is not held by process `{process}`")]
    NoHandle {
        /// The handle's name.
        handle: String,
        /// The acting process.
        process: String,
    },
    /// A `dma_sg` access past the end of its handle's range.
    #[error(
        "offset {offset:#x} + {bytes:#x} bytes passes the end of handle `{handle}` ({total:#x} bytes)"
    )]
    PastHandleEnd {
        /// The handle's name.
        handle: String,
        /// The access's offset in the range.
        offset: u64,
        /// The access's length.
        bytes: u64,
        /// The handle's length.
        total: u64,
    },
    /// A device file the acting process has not opened (or has closed).
    #[error("`{fd}` is not open in process `{process}`")]
    FdNotOpen {
        /// The fd's name.
        fd: String,
        /// The acting process.
        process: String,
    },
    /// A `dma.map` range that wraps around the address space.
    #[error("range at {va} of {len:#x} bytes wraps")]
    RangeWraps {
        /// The start address.
        va: Va,
        /// The length in bytes.
        len: u64,
    },
    /// A step that needs the DMA platform in a scenario without `[topology]`.
    #[error("this step needs a `[topology]`")]
    NoTopology,
    /// `[topology]` does not build.
    #[error(transparent)]
    Topology(#[from] peerdma_pci::Error),
    /// A `pci` device's node is not in the topology.
    #[error("device {device}: no node {node}")]
    NoNode {
        /// The device.
        device: String,
        /// The topology node it names.
        node: String,
    },
    /// The platform refused to attach a `pci` device.
    #[error("device {device}: {}", errno.name())]
    AddDevice {
        /// The device.
        device: String,
        /// The refusal.
        errno: Errno,
    },
    /// `pci_p2pdma_add_resource` refused a `p2p` entry.
    #[error(
        "device {device}: pci_p2pdma_add_resource(bar {bar}, size {size:#x}, offset {offset:#x}) failed with -{}",
        errno.name()
    )]
    P2pAddResource {
        /// The device.
        device: String,
        /// The BAR index.
        bar: u8,
        /// The resource's size.
        size: u64,
        /// Its offset in the BAR.
        offset: u64,
        /// The refusal.
        errno: Errno,
    },
    /// `pci_p2pmem_publish` refused.
    #[error("{}", errno.name())]
    P2pPublish {
        /// The device.
        device: String,
        /// The refusal.
        errno: Errno,
    },
    /// A BAR export does not fit its BAR.
    #[error("device {device}: export `{export}` does not fit BAR {bar}: -{}", errno.name())]
    ExportDoesNotFit {
        /// The device.
        device: String,
        /// The export's name.
        export: String,
        /// The BAR index.
        bar: u8,
        /// The refusal.
        errno: Errno,
    },
}

impl RunError {
    /// Returns whether this error is a resource limit of `[sim.limits]` (the run stops, naming it).
    pub fn is_limit(&self) -> bool {
        matches!(self, Self::HostMemoryLimit { .. } | Self::StepLimit { .. })
    }

    /// Returns the errno a kernel would give for this misuse of a handle the process does not hold (a second
    /// unpin, a DMA handle used after its release, a closed device file: `EBADF`; an access past a handle's
    /// end: `EINVAL`), so that a step's `expect = { errno = ... }` can name it. `None` for other errors.
    pub fn misuse_errno(&self) -> Option<Errno> {
        match self {
            Self::NoPin { .. } | Self::NoHandle { .. } | Self::FdNotOpen { .. } => {
                Some(Errno::EBADF)
            }
            Self::PastHandleEnd { .. } => Some(Errno::EINVAL),
            _ => None,
        }
    }
}

/// An input error in a scenario file, at a 1-based line and column.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}:{line}:{col}: {message}")]
pub struct ScenarioError {
    /// The scenario's path, as given to [`crate::parse()`].
    pub path: String,
    /// 1-based line; 0 when the error has no position (I/O error).
    pub line: usize,
    /// 1-based column in characters; 0 when the error has no position.
    pub col: usize,
    /// What was wrong and what was expected (lowercase, no trailing period).
    pub message: String,
    /// The text of the offending line, without its line terminator.
    pub source_line: Option<String>,
}

impl ScenarioError {
    /// Creates an error at byte `offset` of `text` (clamped to the text and to a character boundary).
    pub fn at_offset(path: &str, text: &str, offset: usize, message: impl Into<String>) -> Self {
        let pos = Position::of(text, offset);
        Self {
            path: path.to_owned(),
            line: pos.line,
            col: pos.col,
            message: message.into(),
            source_line: Some(pos.source_line.to_owned()),
        }
    }

    /// Creates an error about the file as a whole (line 1, column 1, no source line), such as a scenario
    /// with nothing to run.
    pub fn whole_file(path: &str, message: impl Into<String>) -> Self {
        Self {
            path: path.to_owned(),
            line: 1,
            col: 1,
            message: message.into(),
            source_line: None,
        }
    }

    /// Creates the error for a scenario file that could not be read (line 0, no source line).
    pub fn io(path: &str, err: &std::io::Error) -> Self {
        Self {
            path: path.to_owned(),
            line: 0,
            col: 0,
            message: format!("cannot read the scenario file: {err}"),
            source_line: None,
        }
    }

    /// Returns a rustc-style report: the message, the location, and the source line with a `^` under the
    /// column.
    ///
    /// ```text
    /// error: unknown mapping `bfu`; mappings named by `mmap` steps: buf
    ///   --> scenario.toml:12:26
    ///    |
    /// 12 |   { op = "store", at = "bfu", pattern = "zero" },
    ///    |                        ^
    /// ```
    pub fn render(&self) -> String {
        let mut out = format!("error: {}\n", self.message);
        let Some(source_line) = self.source_line.as_deref().filter(|_| self.line > 0) else {
            let _ = writeln!(out, "  --> {}", self.path);
            return out;
        };
        let number = self.line.to_string();
        let gutter = " ".repeat(number.len());
        let _ = writeln!(out, "{gutter}--> {}:{}:{}", self.path, self.line, self.col);
        let _ = writeln!(out, "{gutter} |");
        let _ = writeln!(out, "{number} | {source_line}");
        // Keep tabs so that the caret lines up with the character above it.
        let pad: String = source_line
            .chars()
            .take(self.col.saturating_sub(1))
            .map(|c| if c == '\t' { '\t' } else { ' ' })
            .collect();
        let _ = writeln!(out, "{gutter} | {pad}^");
        out
    }
}

/// A resolved position in a text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Position<'a> {
    /// 1-based line.
    pub(crate) line: usize,
    /// 1-based column in characters.
    pub(crate) col: usize,
    /// The whole line, without `\n` or `\r\n`.
    pub(crate) source_line: &'a str,
}

impl<'a> Position<'a> {
    /// Returns the line and column of byte `offset` in `text`.
    pub(crate) fn of(text: &'a str, offset: usize) -> Self {
        let mut offset = offset.min(text.len());
        while !text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &text[..offset];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let line_end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
        Self {
            line: before.matches('\n').count() + 1,
            col: text[line_start..offset].chars().count() + 1,
            source_line: text[line_start..line_end].trim_end_matches('\r'),
        }
    }
}

/// The start offset of every line of a text, to turn many byte offsets into `line:col` in `O(log n)` each.
#[derive(Debug, Clone)]
pub(crate) struct LineIndex {
    starts: Vec<usize>,
}

impl LineIndex {
    /// Creates the index of `text`.
    pub(crate) fn new(text: &str) -> Self {
        let starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Self { starts }
    }

    /// Returns the 1-based line and character column of byte `offset` of `text` (the indexed text), with the
    /// same clamping as [`Position::of`].
    pub(crate) fn line_col(&self, text: &str, offset: usize) -> (usize, usize) {
        let mut offset = offset.min(text.len());
        while !text.is_char_boundary(offset) {
            offset -= 1;
        }
        let line = self.starts.partition_point(|&start| start <= offset).max(1);
        let start = self.starts[line - 1].min(offset);
        (line, text[start..offset].chars().count() + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_map_to_one_based_lines_and_columns() {
        let text = "a = 1\nbb = 2\n";
        let p = Position::of(text, 6);
        assert_eq!((p.line, p.col, p.source_line), (2, 1, "bb = 2"));
        let p = Position::of(text, 11);
        assert_eq!((p.line, p.col), (2, 6));
        let p = Position::of(text, 0);
        assert_eq!((p.line, p.col, p.source_line), (1, 1, "a = 1"));
    }

    #[test]
    fn offset_at_end_of_text_is_on_the_last_line() {
        let p = Position::of("a = 1\n", 6);
        assert_eq!((p.line, p.col, p.source_line), (2, 1, ""));
        let p = Position::of("a = [", 500);
        assert_eq!((p.line, p.col), (1, 6));
    }

    #[test]
    fn columns_count_characters_not_bytes() {
        let text = "x = \"µµ\" y";
        let p = Position::of(text, text.find('y').unwrap());
        assert_eq!(p.col, 10);
        // Inside a multi-byte character: clamped back to its start.
        let p = Position::of(text, 6);
        assert_eq!(p.col, 6);
    }

    #[test]
    fn line_index_agrees_with_position() {
        let text = "a = 1\r\n\nx = \"µµ\" y\n\nlast";
        let index = LineIndex::new(text);
        for offset in 0..=text.len() + 3 {
            let p = Position::of(text, offset);
            assert_eq!(
                index.line_col(text, offset),
                (p.line, p.col),
                "offset {offset}"
            );
        }
        let empty = LineIndex::new("");
        assert_eq!(empty.line_col("", 7), (1, 1));
    }

    #[test]
    fn crlf_is_stripped_from_the_source_line() {
        let p = Position::of("a = 1\r\nb = 2\r\n", 8);
        assert_eq!((p.line, p.col, p.source_line), (2, 2, "b = 2"));
    }

    #[test]
    fn display_is_path_line_col_message() {
        let err = ScenarioError::at_offset("s.toml", "a = 1\nb = x\n", 10, "expected a value");
        assert_eq!(err.to_string(), "s.toml:2:5: expected a value");
    }

    #[test]
    fn render_puts_a_caret_under_the_column() {
        let err = ScenarioError::at_offset("s.toml", "a = 1\n\tb = x\n", 11, "bad");
        assert_eq!(
            err.render(),
            "error: bad\n --> s.toml:2:6\n  |\n2 | \tb = x\n  | \t    ^\n"
        );
    }

    #[test]
    fn io_errors_have_no_position() {
        let err = ScenarioError::io(
            "missing.toml",
            &std::io::Error::from(std::io::ErrorKind::NotFound),
        );
        assert_eq!(err.line, 0);
        assert!(err.to_string().starts_with("missing.toml:0:0: cannot read"));
        assert_eq!(
            err.render(),
            format!("error: {}\n  --> missing.toml\n", err.message)
        );
    }
}
