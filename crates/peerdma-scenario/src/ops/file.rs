//! File ops on a `[[file]]` (its page cache): `pwrite`, `pread`, `truncate`, `punch_hole`.
//!
//! They act on the file, not on a mapping: `truncate` and `punch_hole` zap every mapping of the pages they
//! free (`unmap_mapping_range`), and for a DAX file wait for pins on the freed blocks (`mm/filemap.c`,
//! `fs/dax.c`).

use super::{Op, OpSpec};
use crate::error::{RunError, ScenarioError};
use crate::parse::{Parser, RefKind, Table};
use crate::pattern::Pattern;
use crate::run::{StepCx, StepResult};

type Result<T> = std::result::Result<T, ScenarioError>;

/// `pwrite`.
pub(crate) const PWRITE: OpSpec = OpSpec {
    name: "pwrite",
    keys: &["file", "offset", "len", "pattern"],
    expect_keys: &["errno"],
    doc_keys: "`file`, `offset` (default 0), `len`, `pattern`",
    doc: "`pwrite(2)`: file I/O through the page cache",
    parse: |p, t| {
        let (file, offset, len) = io(p, t)?;
        let pattern = p.pattern(p.required(t, "pattern")?, "pattern")?;
        Ok(Op::File(FileOp::Pwrite {
            file,
            offset,
            len,
            pattern,
        }))
    },
};

/// `pread`.
pub(crate) const PREAD: OpSpec = OpSpec {
    name: "pread",
    keys: &["file", "offset", "len"],
    expect_keys: &["errno", "data"],
    doc_keys: "`file`, `offset` (default 0), `len`",
    doc: "`pread(2)`: file I/O through the page cache; check with `expect.data`",
    parse: |p, t| {
        let (file, offset, len) = io(p, t)?;
        Ok(Op::File(FileOp::Pread { file, offset, len }))
    },
};

/// `truncate`.
pub(crate) const TRUNCATE: OpSpec = OpSpec {
    name: "truncate",
    keys: &["file", "size"],
    expect_keys: &["errno"],
    doc_keys: "`file`, `size`",
    doc: "`truncate(2)`: zaps mappings past the new end; for a DAX file, waits for pins on the freed blocks",
    parse: |p, t| {
        Ok(Op::File(FileOp::Truncate {
            file: p.name_ref(p.required(t, "file")?, "file", RefKind::File)?,
            size: p.size(p.required(t, "size")?, "size")?,
        }))
    },
};

/// `punch_hole`.
pub(crate) const PUNCH_HOLE: OpSpec = OpSpec {
    name: "punch_hole",
    keys: &["file", "offset", "len"],
    expect_keys: &["errno"],
    doc_keys: "`file`, `offset`, `len`",
    doc: "`fallocate(FALLOC_FL_PUNCH_HOLE)` over the whole pages inside",
    parse: |p, t| {
        Ok(Op::File(FileOp::PunchHole {
            file: p.name_ref(p.required(t, "file")?, "file", RefKind::File)?,
            offset: p.size(p.required(t, "offset")?, "offset")?,
            len: p.len(p.required(t, "len")?, "len")?,
        }))
    },
};

/// The file ops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileOp {
    /// `pwrite(2)` on a `[[file]]`.
    Pwrite {
        /// The file's name.
        file: String,
        /// File offset in bytes (default 0).
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// What to write.
        pattern: Pattern,
    },
    /// `pread(2)` on a `[[file]]`.
    Pread {
        /// The file's name.
        file: String,
        /// File offset in bytes (default 0).
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// `truncate(2)` of a file to `size`.
    Truncate {
        /// The file.
        file: String,
        /// The new size.
        size: u64,
    },
    /// `fallocate(FALLOC_FL_PUNCH_HOLE)` over `[offset, offset + len)`.
    PunchHole {
        /// The file.
        file: String,
        /// Start of the hole.
        offset: u64,
        /// Its length.
        len: u64,
    },
}

/// Reads `file`, `offset` (default 0) and `len`, checking that the range ends below 2^64.
fn io(p: &mut Parser<'_>, t: &Table<'_, '_>) -> Result<(String, u64, u64)> {
    let file = p.name_ref(p.required(t, "file")?, "file", RefKind::File)?;
    let offset = match t.get("offset") {
        Some(v) => p.size(v, "offset")?,
        None => 0,
    };
    let len_v = p.required(t, "len")?;
    let len = p.len(len_v, "len")?;
    p.check_end(offset, len, len_v, "file offset")?;
    Ok((file, offset, len))
}

impl FileOp {
    /// Returns the op's name as written in `op = "..."`.
    pub const fn name(&self) -> &'static str {
        match self {
            Self::Pwrite { .. } => PWRITE.name,
            Self::Pread { .. } => PREAD.name,
            Self::Truncate { .. } => TRUNCATE.name,
            Self::PunchHole { .. } => PUNCH_HOLE.name,
        }
    }

    /// Runs the op.
    pub(crate) async fn run(
        &self,
        cx: &mut StepCx<'_>,
    ) -> std::result::Result<StepResult, RunError> {
        let w = cx.world;
        let kernel = &w.kernel;
        let mut out = StepResult::default();
        match self {
            Self::Pwrite {
                file,
                offset,
                len,
                pattern,
            } => {
                // Streamed a page at a time, as `store`: no host buffer of the whole write.
                let total = w.streamed_len(*len)?;
                let mut fill =
                    |pos: usize, chunk: &mut [u8]| pattern.fill_window(total, pos, chunk);
                out.errno = kernel
                    .pwrite_with(w.files[file], *offset, total, &mut fill)
                    .await
                    .err();
            }
            Self::Pread { file, offset, len } => {
                let mut data = w.host_buffer(*len)?;
                match kernel.pread(w.files[file], *offset, &mut data).await {
                    Ok(_) => out.data = Some(data),
                    Err(e) => out.errno = Some(e),
                }
            }
            Self::Truncate { file, size } => {
                out.errno = kernel.truncate(w.files[file], *size).await.err();
            }
            Self::PunchHole { file, offset, len } => {
                out.errno = kernel.punch_hole(w.files[file], *offset, *len).await.err();
            }
        }
        Ok(out)
    }
}
