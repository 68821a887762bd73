//! NVMe ops on `kind = "nvme"` devices ([`peerdma_devices::nvme`]): `nvme.read` and `nvme.write`, an
//! O_DIRECT `pread`/`pwrite` of the namespace into or out of a user range of the acting process — RAM, or
//! peer memory mapped from a provider's p2pmem `allocate` file (`p2pmem.mmap`).

use peerdma_devices::nvme::NvmeError;

use super::{Op, OpSpec};
use crate::ast::AddrExpr;
use crate::error::{RunError, ScenarioError};
use crate::parse::{Parser, RefKind, Table};
use crate::run::{StepCx, StepResult};

type Result<T> = std::result::Result<T, ScenarioError>;

/// `nvme.read`.
pub(crate) const READ: OpSpec = OpSpec {
    name: "nvme.read",
    keys: &["dev", "at", "len", "offset"],
    expect_keys: &["errno"],
    doc_keys: "`dev` (an `nvme`), `at`, `len` (whole pages), `offset` (bytes in the namespace, page-aligned, \
               default 0)",
    doc: "`pread` with `O_DIRECT`: the controller DMAs the blocks into `[at, at + len)`, RAM or peer memory \
          (`EREMOTEIO` at the pin on a queue without P2P support; `EINVAL` for a NOT_SUPPORTED peer, Linux \
          6.17+)",
    parse: |p, t| parse_io(p, t, true),
};

/// `nvme.write`.
pub(crate) const WRITE: OpSpec = OpSpec {
    name: "nvme.write",
    keys: &["dev", "at", "len", "offset"],
    expect_keys: &["errno"],
    doc_keys: "as `nvme.read`",
    doc: "`pwrite` with `O_DIRECT`: the controller DMAs `[at, at + len)` into the blocks",
    parse: |p, t| parse_io(p, t, false),
};

fn parse_io(p: &mut Parser<'_>, t: &Table<'_, '_>, read: bool) -> Result<Op> {
    let dev = p.name_ref(p.required(t, "dev")?, "dev", RefKind::PciDevice)?;
    let at = p.addr(p.required(t, "at")?, "at")?;
    let len_v = p.required(t, "len")?;
    let len = p.len(len_v, "len")?;
    p.check_range(&at, len, len_v)?;
    let offset = t.get("offset").map(|v| p.uint(v, "offset")).transpose()?;
    Ok(Op::Nvme(NvmeOp {
        read,
        dev,
        at,
        len,
        offset: offset.unwrap_or(0),
    }))
}

/// An O_DIRECT command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvmeOp {
    /// `nvme.read` (else `nvme.write`).
    pub read: bool,
    /// The controller.
    pub dev: String,
    /// The user buffer.
    pub at: AddrExpr,
    /// Bytes.
    pub len: u64,
    /// Byte offset in the namespace.
    pub offset: u64,
}

impl NvmeOp {
    /// Returns the op's name.
    pub const fn name(&self) -> &'static str {
        if self.read { READ.name } else { WRITE.name }
    }

    /// Runs the op.
    pub(crate) async fn run(
        &self,
        cx: &mut StepCx<'_>,
    ) -> std::result::Result<StepResult, RunError> {
        let (w, proc_name, pid) = (cx.world, cx.proc_name, cx.pid);
        let n = w
            .nvmes
            .get(&self.dev)
            .cloned()
            .ok_or_else(|| RunError::Nvme {
                what: format!("device `{}` is not a `kind = \"nvme\"` device", self.dev),
            })?;
        let (va, _) = w.resolve(proc_name, &self.at)?;
        let r = if self.read {
            n.read(pid, va, self.offset, self.len).await
        } else {
            n.write(pid, va, self.offset, self.len).await
        };
        let mut out = StepResult::default();
        match r {
            Ok(()) => {}
            Err(NvmeError::Errno(e)) => out.errno = Some(e),
            Err(e) => {
                return Err(RunError::Nvme {
                    what: e.to_string(),
                });
            }
        }
        Ok(out)
    }
}
