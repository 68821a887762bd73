//! P2P provider and BAR-export ops: `p2pmem.mmap`, `bar.mmap`, `device.remove`, `dmabuf.move_notify`.
//!
//! A `pci` device's P2P memory (struct pages, `drivers/pci/p2pdma.c`) is mapped into a process with
//! `p2pmem.mmap`; a BAR range it exports without struct pages with `bar.mmap` (VM_IO | VM_PFNMAP, the
//! dma-buf exporter's side). `device.remove` unbinds the driver (revoke, zap, wait for references, free);
//! `dmabuf.move_notify` moves an export's buffer under its dynamic importers.

use peerdma_core::{Errno, PAGE_SIZE};
use toml::de::DeValue;

use super::{Op, OpSpec};
use crate::ast::Prot;
use crate::error::{RunError, ScenarioError};
use crate::parse::{Parser, RefKind, Table, describe};
use crate::run::{StepCx, StepResult};

type Result<T> = std::result::Result<T, ScenarioError>;

/// `p2pmem.mmap`.
pub(crate) const P2PMEM_MMAP: OpSpec = OpSpec {
    name: "p2pmem.mmap",
    keys: &["dev", "name", "len", "prot", "flags", "offset"],
    expect_keys: &["errno"],
    doc_keys: "`dev` (a `pci` device with `p2p`), `name`, `len`, `prot` (default `\"rw\"`), `flags` \
               (`[\"shared\"]`, the default, or `[\"private\"]`), `offset` (default 0)",
    doc: "`mmap` of `/sys/bus/pci/devices/<bdf>/p2pmem/allocate` (`p2pmem_alloc_mmap`): one contiguous \
          allocation from the provider's pool, every page inserted at once; errors below",
    parse: parse_p2pmem_mmap,
};

/// `bar.mmap`.
pub(crate) const BAR_MMAP: OpSpec = OpSpec {
    name: "bar.mmap",
    keys: &["export", "name", "offset", "len", "prot"],
    expect_keys: &["errno"],
    doc_keys: "`export`, `name`, `len`, `offset` (in the export, default 0), `prot` (default `\"rw\"`)",
    doc: "the exporting driver's mmap of a BAR without struct page (`remap_pfn_range`: VM_IO \\| VM_PFNMAP); \
          `EINVAL` outside the export, `ENODEV` once revoked",
    parse: |p, t| {
        let export = p.name_ref(p.required(t, "export")?, "export", RefKind::Export)?;
        let name = p.mapping_name(p.required(t, "name")?)?;
        let len = p.len(p.required(t, "len")?, "len")?;
        let offset = p.opt_size(t, "offset", 0)?;
        let prot = default_rw(p, t)?;
        p.define_mapping(&name, len);
        Ok(Op::P2p(P2pOp::BarMmap {
            export,
            name,
            offset,
            len,
            prot,
        }))
    },
};

/// `device.remove`.
pub(crate) const DEVICE_REMOVE: OpSpec = OpSpec {
    name: "device.remove",
    keys: &["dev"],
    expect_keys: &["errno"],
    doc_keys: "`dev` (a `pci` device)",
    doc: "unbinds the driver: revokes the importers of its exports, zaps every user mapping of its BARs and \
          P2P pages, waits for every page reference to drop (an outstanding pin blocks it), frees its P2P \
          memory",
    parse: |p, t| {
        Ok(Op::P2p(P2pOp::DeviceRemove {
            dev: p.name_ref(p.required(t, "dev")?, "dev", RefKind::PciDevice)?,
        }))
    },
};

/// `dmabuf.move_notify`.
pub(crate) const DMABUF_MOVE_NOTIFY: OpSpec = OpSpec {
    name: "dmabuf.move_notify",
    keys: &["export"],
    expect_keys: &["errno"],
    doc_keys: "`export`",
    doc: "`dma_buf_move_notify`: the exporter moves the buffer; every dynamic importer loses its mapping and \
          maps it again on its next access, pinned importers keep theirs",
    parse: |p, t| {
        Ok(Op::P2p(P2pOp::DmabufMoveNotify {
            export: p.name_ref(p.required(t, "export")?, "export", RefKind::Export)?,
        }))
    },
};

/// The P2P provider and BAR-export ops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum P2pOp {
    /// `p2pmem.mmap`: mmap of a provider's `/sys/bus/pci/devices/<bdf>/p2pmem/allocate`.
    P2pmemMmap {
        /// The provider device.
        dev: String,
        /// Name of the mapping.
        name: String,
        /// Length in bytes.
        len: u64,
        /// Protections.
        prot: Prot,
        /// MAP_SHARED (p2pmem refuses MAP_PRIVATE).
        shared: bool,
        /// The mmap offset (p2pmem refuses a non-zero one).
        offset: u64,
    },
    /// `bar.mmap`: the exporting driver's mmap of a BAR without struct page (VM_IO | VM_PFNMAP).
    BarMmap {
        /// The export.
        export: String,
        /// Name of the mapping.
        name: String,
        /// Offset in the export.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// Protections.
        prot: Prot,
    },
    /// `device.remove`: unbind a `pci` device (revoke importers, zap mappings, wait for page references).
    DeviceRemove {
        /// The device.
        dev: String,
    },
    /// `dmabuf.move_notify`: the exporter moves the buffer; dynamic importers lose their mappings.
    DmabufMoveNotify {
        /// The export.
        export: String,
    },
}

/// Reads `prot`; a device file's mmap defaults to PROT_READ | PROT_WRITE.
fn default_rw(p: &Parser<'_>, t: &Table<'_, '_>) -> Result<Prot> {
    t.get("prot").map_or(Ok(Prot::RW), |v| p.prot(v))
}

fn parse_p2pmem_mmap(p: &mut Parser<'_>, t: &Table<'_, '_>) -> Result<Op> {
    let dev = p.name_ref(p.required(t, "dev")?, "dev", RefKind::PciDevice)?;
    let name = p.mapping_name(p.required(t, "name")?)?;
    let len = p.len(p.required(t, "len")?, "len")?;
    let prot = default_rw(p, t)?;
    let shared = match t.get("flags") {
        Some(v) => {
            let DeValue::Array(items) = v.get_ref() else {
                return Err(p.err(
                    &v.span(),
                    format!(
                        "expected `[\"shared\"]` or `[\"private\"]` for `flags`, found {}",
                        describe(v.get_ref())
                    ),
                ));
            };
            let mut chosen = Vec::with_capacity(items.len());
            for item in items {
                chosen.push(p.keyword(item, "flags", &[("shared", true), ("private", false)])?);
            }
            let [shared] = chosen[..] else {
                return Err(p.err(
                    &v.span(),
                    "expected exactly one of `shared` or `private` in `flags`",
                ));
            };
            shared
        }
        None => true,
    };
    let offset = p.opt_size(t, "offset", 0)?;
    p.define_mapping(&name, len);
    Ok(Op::P2p(P2pOp::P2pmemMmap {
        dev,
        name,
        len,
        prot,
        shared,
        offset,
    }))
}

impl P2pOp {
    /// Returns the op's name as written in `op = "..."`.
    pub const fn name(&self) -> &'static str {
        match self {
            Self::P2pmemMmap { .. } => P2PMEM_MMAP.name,
            Self::BarMmap { .. } => BAR_MMAP.name,
            Self::DeviceRemove { .. } => DEVICE_REMOVE.name,
            Self::DmabufMoveNotify { .. } => DMABUF_MOVE_NOTIFY.name,
        }
    }

    /// Runs the op.
    pub(crate) async fn run(
        &self,
        cx: &mut StepCx<'_>,
    ) -> std::result::Result<StepResult, RunError> {
        let (w, proc_name, pid) = (cx.world, cx.proc_name, cx.pid);
        let mut out = StepResult::default();
        match self {
            Self::P2pmemMmap {
                dev,
                name,
                len,
                prot,
                shared,
                offset,
            } => {
                let platform = w.platform()?;
                let pgoff = if offset % PAGE_SIZE == 0 {
                    offset / PAGE_SIZE
                } else {
                    u64::MAX
                };
                let res = if pgoff == u64::MAX {
                    Err(Errno::EINVAL)
                } else {
                    platform
                        .p2pmem_mmap(pid, w.pci[dev], *len, *prot, *shared, pgoff)
                        .await
                        .map_err(|e| e.errno())
                };
                w.record_mapping(&mut out, proc_name, name, *len, res);
            }
            Self::BarMmap {
                export,
                name,
                offset,
                len,
                prot,
            } => {
                let platform = w.platform()?;
                let res = platform
                    .mmap_bar(pid, w.exports[export], *offset, *len, *prot)
                    .await
                    .map_err(|e| e.errno());
                w.record_mapping(&mut out, proc_name, name, *len, res);
            }
            Self::DeviceRemove { dev } => {
                let platform = w.platform()?;
                out.errno = platform
                    .remove_device(w.pci[dev])
                    .await
                    .err()
                    .map(|e| e.errno());
            }
            Self::DmabufMoveNotify { export } => {
                w.platform()?.dmabuf_move_notify(w.exports[export]);
            }
        }
        Ok(out)
    }
}
