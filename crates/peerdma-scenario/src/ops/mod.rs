//! The steps' ops: one module per op family, tied together by one registry, [`OPS`].
//!
//! Each family module holds everything about its ops, so that an op lives in one place:
//! 1. its **syntax**: the keys a step of it accepts and the `expect` keys it can check (an [`OpSpec`]);
//! 2. its **documentation**: the op's row of the steps table of `docs/scenario-format.md` (keys and meaning),
//!    which a test checks against the file, and which [`markdown_table`] prints;
//! 3. its **parsing** into the AST: the family's enum ([`mem::MemOp`], [`dmirror::DmirrorOp`]...), one
//!    variant per op, wrapped in [`Op`];
//! 4. its **execution**: the family enum's `run`, called by the runner with the acting thread's context.
//!
//! Adding an op to a family is a variant, a parse function, an `OpSpec` and a `run` arm in the family module,
//! plus its line in [`OPS`] (and its row in the format doc, which the test asks for). A new family is a new
//! module, its variant of [`Op`] and its arms in [`Op::name`] and `Op::run`.
//!
//! The order of [`OPS`] is the order in which error messages list the ops (`expected one of: mmap, ...`).

pub mod dma;
pub mod dmirror;
pub mod file;
pub mod gpu;
pub mod gup;
pub mod mem;
pub mod nvme;
pub mod p2p;
pub mod proc;
pub mod rdma;
pub mod sva;

pub use dma::DmaApiOp;
pub use dmirror::DmirrorOp;
pub use file::FileOp;
pub use gpu::GpuOp;
pub use gup::GupOp;
pub use mem::MemOp;
pub use nvme::NvmeOp;
pub use p2p::P2pOp;
pub use proc::ProcOp;
pub use rdma::RdmaOp;
pub use sva::SvaOp;

use crate::error::{RunError, ScenarioError};
use crate::parse::{Parser, Table};
use crate::run::{StepCx, StepResult};

/// Parses a step's table (its keys already checked against [`OpSpec::keys`]) into its op.
pub(crate) type ParseFn = fn(&mut Parser<'_>, &Table<'_, '_>) -> Result<Op, ScenarioError>;

/// One op: its name, syntax and documentation, and its parser.
#[derive(Clone, Copy)]
pub struct OpSpec {
    /// The name written in `op = "..."`.
    pub name: &'static str,
    /// The keys a step of this op may have (besides `op` and `expect`).
    pub keys: &'static [&'static str],
    /// The `expect` keys a step of this op may have.
    pub expect_keys: &'static [&'static str],
    /// The "keys" column of the op's row in the steps table of `docs/scenario-format.md` (Markdown).
    pub doc_keys: &'static str,
    /// The "meaning" column of that row (Markdown).
    pub doc: &'static str,
    /// The parser.
    pub(crate) parse: ParseFn,
}

impl std::fmt::Debug for OpSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpSpec")
            .field("name", &self.name)
            .field("keys", &self.keys)
            .field("expect_keys", &self.expect_keys)
            .finish_non_exhaustive()
    }
}

impl OpSpec {
    /// Returns the op's row of the steps table of `docs/scenario-format.md`.
    pub fn markdown_row(&self) -> String {
        format!("| `{}` | {} | {} |", self.name, self.doc_keys, self.doc)
    }
}

/// The registry: every op, one line each, in the order error messages list them.
pub const OPS: &[OpSpec] = &[
    mem::MMAP,
    mem::MUNMAP,
    mem::MPROTECT,
    mem::MADVISE,
    mem::STORE,
    mem::LOAD,
    file::PWRITE,
    file::PREAD,
    proc::FORK,
    proc::WAIT,
    proc::EXIT,
    proc::SLEEP,
    dmirror::OPEN,
    dmirror::CLOSE,
    dmirror::READ,
    dmirror::WRITE,
    dmirror::SNAPSHOT,
    dmirror::MMAP,
    dmirror::MIGRATE_TO_DEV,
    dmirror::MIGRATE_TO_SYS,
    dmirror::RELEASE,
    dmirror::EXCLUSIVE,
    dmirror::CHECK_EXCLUSIVE,
    gup::GUP,
    mem::MREMAP,
    gup::PIN,
    gup::UNPIN,
    gup::DMA_WRITE,
    file::TRUNCATE,
    file::PUNCH_HOLE,
    dmirror::FLAGS,
    p2p::P2PMEM_MMAP,
    p2p::BAR_MMAP,
    dma::DMA_MAP,
    dma::DMA_SG_WRITE,
    dma::DMA_SG_READ,
    dma::DMA_SG_RELEASE,
    p2p::DEVICE_REMOVE,
    p2p::DMABUF_MOVE_NOTIFY,
    dma::DMA_RAW,
    mem::RECLAIM,
    rdma::REG_MR,
    rdma::DEREG_MR,
    rdma::ADVISE,
    rdma::QP,
    rdma::CONNECT,
    rdma::POST,
    rdma::POST_RECV,
    rdma::POLL,
    rdma::SKIP_FENCE,
    nvme::READ,
    nvme::WRITE,
    gpu::BO_CREATE,
    gpu::BO_WRITE,
    gpu::BO_READ,
    gpu::BO_EVICT,
    gpu::BO_VALIDATE,
    gpu::BO_WINDOW,
    gpu::BO_MMAP,
    gpu::DMABUF_ATTACH,
    gpu::DMABUF_DMA,
    gpu::MANAGED_ALLOC,
    gpu::KERNEL,
    gpu::PREFETCH,
    gup::DMA_READ,
    sva::BIND,
    sva::UNBIND,
    sva::SUBMIT,
    sva::WAIT,
    sva::STATS,
];

/// Returns the op named `name` (as written in `op = "..."`).
pub fn spec(name: &str) -> Option<&'static OpSpec> {
    OPS.iter().find(|s| s.name == name)
}

/// Returns the steps table of `docs/scenario-format.md` (header and one row per op, in registry order).
pub fn markdown_table() -> String {
    let mut out = String::from("| op | keys | meaning |\n|---|---|---|\n");
    for s in OPS {
        out.push_str(&s.markdown_row());
        out.push('\n');
    }
    out
}

/// An operation: one variant per op family, each holding that family's ops. Lengths are in bytes and
/// non-zero.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Address-space and CPU-access ops ([`mem`]).
    Mem(MemOp),
    /// File ops ([`mod@file`]).
    File(FileOp),
    /// Process and time ops ([`proc`]).
    Proc(ProcOp),
    /// Device-file and `dmirror.*` ops ([`dmirror`]).
    Dmirror(DmirrorOp),
    /// GUP and pin ops ([`gup`]).
    Gup(GupOp),
    /// DMA API ops ([`dma`]).
    Dma(DmaApiOp),
    /// P2P provider and BAR-export ops ([`p2p`]).
    P2p(P2pOp),
    /// RDMA verbs ops ([`rdma`]).
    Rdma(RdmaOp),
    /// NVMe O_DIRECT ops ([`nvme`]).
    Nvme(NvmeOp),
    /// GPU buffer-object and managed-memory ops ([`gpu`]).
    Gpu(GpuOp),
    /// SVA accelerator ops ([`sva`]).
    Sva(SvaOp),
}

impl Op {
    /// Returns the op's name as written in `op = "..."`.
    pub const fn name(&self) -> &'static str {
        match self {
            Self::Mem(o) => o.name(),
            Self::File(o) => o.name(),
            Self::Proc(o) => o.name(),
            Self::Dmirror(o) => o.name(),
            Self::Gup(o) => o.name(),
            Self::Dma(o) => o.name(),
            Self::P2p(o) => o.name(),
            Self::Rdma(o) => o.name(),
            Self::Nvme(o) => o.name(),
            Self::Gpu(o) => o.name(),
            Self::Sva(o) => o.name(),
        }
    }

    /// Returns whether the op ends its thread (`exit`).
    pub(crate) const fn ends_thread(&self) -> bool {
        matches!(self, Self::Proc(ProcOp::Exit))
    }

    /// Returns the length of a `load` (for `expect.value`), `None` for any other op or a `load` without one.
    pub(crate) const fn load_len(&self) -> Option<u64> {
        match self {
            Self::Mem(o) => o.load_len(),
            _ => None,
        }
    }

    /// Runs the op for the thread of `cx`.
    pub(crate) async fn run(&self, cx: &mut StepCx<'_>) -> Result<StepResult, RunError> {
        match self {
            Self::Mem(o) => o.run(cx).await,
            Self::File(o) => o.run(cx).await,
            Self::Proc(o) => o.run(cx).await,
            Self::Dmirror(o) => o.run(cx).await,
            Self::Gup(o) => o.run(cx).await,
            Self::Dma(o) => o.run(cx).await,
            Self::P2p(o) => o.run(cx).await,
            Self::Rdma(o) => o.run(cx).await,
            Self::Nvme(o) => o.run(cx).await,
            Self::Gpu(o) => o.run(cx).await,
            Self::Sva(o) => o.run(cx).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn op_names_are_unique_and_each_parses_to_itself() {
        let mut names: Vec<&str> = OPS.iter().map(|s| s.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), OPS.len(), "an op is registered twice");
        for s in OPS {
            let found = spec(s.name).expect("registered");
            assert_eq!((found.name, found.keys), (s.name, s.keys));
        }
    }

    #[test]
    fn every_registered_op_has_its_row_in_the_format_doc() {
        let doc = include_str!("../../../../docs/scenario-format.md");
        let rows: Vec<&str> = doc
            .lines()
            .skip_while(|l| !l.starts_with("| op | keys | meaning |"))
            .skip(2)
            .take_while(|l| l.starts_with('|'))
            .collect();
        for s in OPS {
            let row = s.markdown_row();
            assert!(
                rows.contains(&row.as_str()),
                "docs/scenario-format.md lacks the row of `{}` (or it differs from the registry's):\n{row}",
                s.name
            );
        }
        assert_eq!(
            rows.len(),
            OPS.len(),
            "the steps table of docs/scenario-format.md has rows for ops the registry does not have"
        );
    }

    #[test]
    fn expect_keys_always_allow_errno() {
        for s in OPS {
            assert_eq!(s.expect_keys.first(), Some(&"errno"), "{}", s.name);
        }
    }
}
