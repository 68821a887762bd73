//! DMA API ops: `dma.map`, `dma_sg.write`, `dma_sg.read`, `dma_sg.release`, `dma.raw`.
//!
//! `dma.map` is `get_user_dma_sg` (`peerdma_dma::sg`): the range translated for a `pci` device's DMA,
//! held in the acting process under a handle name; `dma_sg.*` access or drop it. A handle is taken out of its
//! process for the duration of an access (so no borrow is held across the access's awaits) and put back.
//! `dma.raw` DMAs at a raw address with no handle, which the oracle judges. Every access is DMA in flight
//! (see "P2P and DMA ops" in `docs/scenario-format.md`).

use peerdma_core::{PAGE_SIZE, Range};
use peerdma_dma::{DmaSgFlags, DmaSgHandle, get_user_dma_sg};
use toml::de::DeValue;

use super::{Op, OpSpec};
use crate::ast::{AddrExpr, DmaMode};
use crate::error::{RunError, ScenarioError};
use crate::parse::{HandleRange, Parser, RefKind, Table, Value, describe};
use crate::pattern::Pattern;
use crate::run::{StepCx, StepResult};

type Result<T> = std::result::Result<T, ScenarioError>;

/// `dma.map`.
pub(crate) const DMA_MAP: OpSpec = OpSpec {
    name: "dma.map",
    keys: &["dev", "at", "len", "mode", "flags", "name"],
    expect_keys: &["errno", "segments", "pinned", "dma_addr"],
    doc_keys: "`dev` (a `pci` device), `at`, `len`, `mode` (`\"short-term\"`, default, `\"long-term\"`, \
               `\"mirror\"`), `flags` (`\"write\"`, `\"p2p\"`), `name` (the handle)",
    doc: "`get_user_dma_sg(mm, [at, at + len), dev, flags)`: the range translated for `dev`'s DMA, held under \
          `name` until `dma_sg.release` or exit; `expect.segments`/`pinned`/`dma_addr` check the result",
    parse: parse_dma_map,
};

/// `dma_sg.write`.
pub(crate) const DMA_SG_WRITE: OpSpec = OpSpec {
    name: "dma_sg.write",
    keys: &["handle", "offset", "len", "pattern"],
    expect_keys: &["errno", "violation", "segments", "dma_addr"],
    doc_keys: "`handle`, `offset` (default 0), `len` (default: to the end of the range), `pattern`",
    doc: "the device writes the pattern through the handle (IOMMU and fabric routing applied); for a mirror \
          handle the report shows, and `expect.segments`/`dma_addr` check, the DMA addresses the mirror has \
          programmed after the access",
    parse: |p, t| {
        let (handle, offset, len) = handle_range(p, t)?;
        let pattern = p.pattern(p.required(t, "pattern")?, "pattern")?;
        Ok(Op::Dma(DmaApiOp::SgWrite {
            handle,
            offset,
            len,
            pattern,
        }))
    },
};

/// `dma_sg.read`.
pub(crate) const DMA_SG_READ: OpSpec = OpSpec {
    name: "dma_sg.read",
    keys: &["handle", "offset", "len"],
    expect_keys: &["errno", "data", "violation", "segments", "dma_addr"],
    doc_keys: "`handle`, `offset` (default 0), `len` (default: to the end)",
    doc: "the device reads through the handle; `expect.data` checks the bytes; for a mirror handle, as for \
          `dma_sg.write`, the DMA addresses the mirror has programmed",
    parse: |p, t| {
        let (handle, offset, len) = handle_range(p, t)?;
        Ok(Op::Dma(DmaApiOp::SgRead {
            handle,
            offset,
            len,
        }))
    },
};

/// `dma_sg.release`.
pub(crate) const DMA_SG_RELEASE: OpSpec = OpSpec {
    name: "dma_sg.release",
    keys: &["handle"],
    expect_keys: &["errno"],
    doc_keys: "`handle`",
    doc: "drops the handle: unmaps every list, unpins every page, detaches every importer, unregisters the \
          mirror",
    parse: |p, t| {
        Ok(Op::Dma(DmaApiOp::SgRelease {
            handle: p.name_ref(p.required(t, "handle")?, "handle", RefKind::Handle)?,
        }))
    },
};

/// `dma.raw`.
pub(crate) const DMA_RAW: OpSpec = OpSpec {
    name: "dma.raw",
    keys: &["dev", "addr", "len", "pattern"],
    expect_keys: &["errno", "data", "violation"],
    doc_keys: "`dev`, `addr` (a page-aligned DMA address), `len` (whole pages, default 4 KiB), `pattern` (write \
               it; without one the device reads, check with `expect.data`)",
    doc: "the device DMAs at a raw address with no handle — a stale or forged address. A peer BAR's bus \
          address the device reaches BUS_ADDR goes peer to peer; anything else goes through its IOMMU domain: \
          `EFAULT` when the IOMMU faults; a translation that succeeds reaches whatever is there, which the \
          oracle judges (stale IOTLB entry, freed frame, data changed behind a mapping)",
    parse: parse_dma_raw,
};

/// The DMA API ops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DmaApiOp {
    /// `dma.map`: `get_user_dma_sg(mm, [at, at + len), dev, flags)`, held under `name`.
    Map {
        /// The initiating device.
        dev: String,
        /// Start address.
        at: AddrExpr,
        /// Length in bytes.
        len: u64,
        /// Discipline.
        mode: DmaMode,
        /// The device writes.
        write: bool,
        /// The caller accepts P2P memory (FOLL_PCI_P2PDMA).
        p2p: bool,
        /// The handle's name.
        name: String,
    },
    /// `dma_sg.write`: the device writes `pattern` at `offset` of a `dma.map` handle's range.
    SgWrite {
        /// The handle.
        handle: String,
        /// Byte offset in the range (page-aligned).
        offset: u64,
        /// Bytes (whole pages); `None`: to the end of the range.
        len: Option<u64>,
        /// What to write.
        pattern: Pattern,
    },
    /// `dma_sg.read`: the device reads at `offset` of a handle's range; `expect.data` checks it.
    SgRead {
        /// The handle.
        handle: String,
        /// Byte offset in the range (page-aligned).
        offset: u64,
        /// Bytes (whole pages); `None`: to the end of the range.
        len: Option<u64>,
    },
    /// `dma_sg.release`: drop a handle (unmap, unpin, detach, unregister).
    SgRelease {
        /// The handle.
        handle: String,
    },
    /// `dma.raw`: the device DMAs at a raw DMA address with no handle (a stale or forged address): writes
    /// `pattern`, or reads (`expect.data`) without one.
    Raw {
        /// The device.
        dev: String,
        /// The DMA address (IOVA, physical address under an identity domain, or a peer's bus address).
        addr: u64,
        /// Bytes (whole pages).
        len: u64,
        /// What to write; `None` reads.
        pattern: Option<Pattern>,
    },
}

fn parse_dma_map(p: &mut Parser<'_>, t: &Table<'_, '_>) -> Result<Op> {
    let dev = p.name_ref(p.required(t, "dev")?, "dev", RefKind::PciDevice)?;
    let at = p.addr(p.required(t, "at")?, "at")?;
    let len_v = p.required(t, "len")?;
    let len = p.len(len_v, "len")?;
    p.check_range(&at, len, len_v)?;
    let mode = match t.get("mode") {
        Some(v) => p.keyword(
            v,
            "mode",
            &[
                ("short-term", DmaMode::ShortTerm),
                ("long-term", DmaMode::LongTerm),
                ("mirror", DmaMode::Mirror),
            ],
        )?,
        None => DmaMode::ShortTerm,
    };
    let (mut write, mut p2p) = (false, false);
    if let Some(v) = t.get("flags") {
        let DeValue::Array(items) = v.get_ref() else {
            return Err(p.err(
                &v.span(),
                format!(
                    "expected a list of `dma.map` flags like `[\"write\", \"p2p\"]`, found {}",
                    describe(v.get_ref())
                ),
            ));
        };
        for item in items {
            match p.keyword(item, "flags", &[("write", 0u8), ("p2p", 1u8)])? {
                0 => write = true,
                _ => p2p = true,
            }
        }
    }
    let name = p.name(p.required(t, "name")?, "name")?;
    p.handles.insert(name.clone());
    let longest = p.handle_lens.entry(name.clone()).or_insert(0);
    *longest = (*longest).max(len);
    Ok(Op::Dma(DmaApiOp::Map {
        dev,
        at,
        len,
        mode,
        write,
        p2p,
        name,
    }))
}

/// Reads a `dma_sg` access's `handle`, `offset` (page-aligned, default 0) and `len` (whole pages, default to
/// the end), and records the range to check against the handle's length once the file is read.
fn handle_range(p: &mut Parser<'_>, t: &Table<'_, '_>) -> Result<(String, u64, Option<u64>)> {
    let handle = p.name_ref(p.required(t, "handle")?, "handle", RefKind::Handle)?;
    let offset_v = t.get("offset");
    let offset = offset_v
        .map(|v| p.size(v, "offset"))
        .transpose()?
        .unwrap_or(0);
    if let Some(v) = offset_v
        && offset % PAGE_SIZE != 0
    {
        return Err(p.err(
            &v.span(),
            format!("expected a page-aligned `offset`, found {offset:#x}"),
        ));
    }
    let len_v = t.get("len");
    let len = len_v.map(|v| p.len(v, "len")).transpose()?;
    if let (Some(v), Some(l)) = (len_v, len)
        && l % PAGE_SIZE != 0
    {
        return Err(p.err(
            &v.span(),
            format!("expected a whole number of 4 KiB pages for `len`, found {l} bytes"),
        ));
    }
    p.handle_ranges.push(HandleRange {
        handle: handle.clone(),
        offset,
        len,
        offset_span: offset_v.map(Value::span),
        len_span: len_v.map(Value::span),
        handle_span: t.get("handle").map(Value::span).unwrap_or_default(),
    });
    Ok((handle, offset, len))
}

fn parse_dma_raw(p: &mut Parser<'_>, t: &Table<'_, '_>) -> Result<Op> {
    let dev = p.name_ref(p.required(t, "dev")?, "dev", RefKind::PciDevice)?;
    let addr_v = p.required(t, "addr")?;
    let addr = p.uint(addr_v, "addr")?;
    if addr % PAGE_SIZE != 0 {
        return Err(p.err(
            &addr_v.span(),
            format!("expected a page-aligned DMA address for `addr`, found {addr:#x}"),
        ));
    }
    let len = p.opt_len(t, "len", PAGE_SIZE)?;
    if len % PAGE_SIZE != 0 {
        let span = t.get("len").map_or_else(|| t.span.clone(), Value::span);
        return Err(p.err(
            &span,
            format!("expected a whole number of 4 KiB pages for `len`, found {len} bytes"),
        ));
    }
    let pattern = t
        .get("pattern")
        .map(|v| p.pattern(v, "pattern"))
        .transpose()?;
    Ok(Op::Dma(DmaApiOp::Raw {
        dev,
        addr,
        len,
        pattern,
    }))
}

impl DmaApiOp {
    /// Returns the op's name as written in `op = "..."`.
    pub const fn name(&self) -> &'static str {
        match self {
            Self::Map { .. } => DMA_MAP.name,
            Self::SgWrite { .. } => DMA_SG_WRITE.name,
            Self::SgRead { .. } => DMA_SG_READ.name,
            Self::SgRelease { .. } => DMA_SG_RELEASE.name,
            Self::Raw { .. } => DMA_RAW.name,
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
            Self::Map {
                dev,
                at,
                len,
                mode,
                write,
                p2p,
                name,
            } => {
                let platform = w.platform()?;
                let (va, _) = w.resolve(proc_name, at)?;
                let range =
                    Range::from_len(va, *len).ok_or(RunError::RangeWraps { va, len: *len })?;
                let mut flags = DmaSgFlags::empty();
                flags.set(DmaSgFlags::WRITE, *write);
                flags.set(DmaSgFlags::P2P, *p2p);
                flags.set(DmaSgFlags::LONGTERM, *mode == DmaMode::LongTerm);
                flags.set(DmaSgFlags::MIRROR, *mode == DmaMode::Mirror);
                match get_user_dma_sg(&platform, pid, range, w.pci[dev], flags).await {
                    Ok(h) => {
                        record_segments(&mut out, &h);
                        out.pinned = Some(h.nr_pinned() as u64);
                        w.proc_mut(proc_name).handles.insert(name.clone(), h);
                    }
                    Err(e) => out.errno = Some(e.errno()),
                }
            }
            Self::SgWrite {
                handle,
                offset,
                len,
                pattern,
            } => {
                let (h, bytes) = w.take_handle(proc_name, handle, *offset, *len)?;
                let mut data = match w.host_buffer(bytes as u64) {
                    Ok(d) => d,
                    Err(e) => {
                        w.put_handle(proc_name, handle, h);
                        return Err(e);
                    }
                };
                pattern.fill(&mut data);
                out.errno = h.write(*offset, &data).await.err().map(|e| e.errno());
                mirror_segments(&mut out, &h);
                w.put_handle(proc_name, handle, h);
            }
            Self::SgRead {
                handle,
                offset,
                len,
            } => {
                let (h, bytes) = w.take_handle(proc_name, handle, *offset, *len)?;
                if let Err(e) = w.check_host(bytes as u64) {
                    w.put_handle(proc_name, handle, h);
                    return Err(e);
                }
                match h.read(*offset, bytes).await {
                    Ok(d) => out.data = Some(d),
                    Err(e) => out.errno = Some(e.errno()),
                }
                mirror_segments(&mut out, &h);
                w.put_handle(proc_name, handle, h);
            }
            Self::SgRelease { handle } => {
                let h = w
                    .proc_mut(proc_name)
                    .handles
                    .remove(handle)
                    .ok_or_else(|| RunError::NoHandle {
                        handle: handle.clone(),
                        process: proc_name.to_owned(),
                    })?;
                h.release().await;
            }
            Self::Raw {
                dev,
                addr,
                len,
                pattern,
            } => {
                let platform = w.platform()?;
                let mut buf = w.host_buffer(*len)?;
                let data = match pattern {
                    Some(p) => {
                        let mut d = w.host_buffer(*len)?;
                        p.fill(&mut d);
                        Some(d)
                    }
                    None => None,
                };
                match platform
                    .raw_dma(w.pci[dev], *addr, data.as_deref(), &mut buf)
                    .await
                {
                    Ok(()) if data.is_none() => out.data = Some(buf),
                    Ok(()) => {}
                    Err(e) => out.errno = Some(e.errno()),
                }
            }
        }
        Ok(out)
    }
}

/// Records a handle's current merged segments and first DMA address in the step's result.
fn record_segments(out: &mut StepResult, h: &DmaSgHandle) {
    let segs = h.segments();
    out.dma_addr = segs.first().map(|s| s.addr.raw());
    out.segments = Some(
        segs.iter()
            .map(|s| (s.kind.name().to_owned(), s.len))
            .collect(),
    );
}

/// For a mirror handle, records the DMA addresses its mirror has programmed so far (after a device access
/// faulted them in): what the device would use, shown in the step's report.
fn mirror_segments(out: &mut StepResult, h: &DmaSgHandle) {
    if h.is_mirror() {
        record_segments(out, h);
    }
}
