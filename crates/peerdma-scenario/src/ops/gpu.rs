//! `gpu.*` ops: buffer objects that move under their dma-buf importers, and managed memory run by kernels
//! (`peerdma_devices::gpu`).
//!
//! A `kind = "gpu"` device has `vram` behind a BAR window (`bar_window`, default: a resizable BAR showing it
//! all) and a managed pool (`managed`). `gpu.bo_create` allocates a buffer object; `gpu.dmabuf_attach` attaches
//! a `pci` device to it as a dynamic or pinned importer; `gpu.dmabuf_dma` is that importer's DMA, whose step
//! log shows the segments it went through (`bus`, `ram`, `host-bridge`); `gpu.bo_evict`, `gpu.bo_validate`
//! and `gpu.bo_window` move the buffer. `gpu.managed_alloc` creates a managed range (a mapping of the acting
//! process, so `store`/`load` reach it too); `gpu.kernel` runs an access pattern over it and `gpu.prefetch`
//! migrates part of it explicitly.

use std::rc::Rc;

use peerdma_core::{Errno, PAGE_SIZE};
use peerdma_devices::gpu::{
    AccessPattern, BoAttach, BoId, Gpu, GpuError, KernelSpec, KernelStats, ManagedRange, UvmConfig,
};
use peerdma_dma::ImporterKind;
use peerdma_mm::vma::Prot;

use super::{Op, OpSpec};
use crate::error::{RunError, ScenarioError};
use crate::parse::{Parser, RefKind, Table};
use crate::pattern::Pattern;
use crate::run::{StepCx, StepResult};

type Result<T> = std::result::Result<T, ScenarioError>;

/// The most page accesses one `gpu.kernel` step may make (its streams are built up front).
const MAX_ACCESSES: u64 = 1 << 24;

const BO: RefKind = RefKind::GpuName("bo");
const ATTACH: RefKind = RefKind::GpuName("attachment");
const RANGE: RefKind = RefKind::GpuName("managed range");

mod world;

pub(crate) use world::GpuWorld;

/// `gpu.bo_create`.
pub(crate) const BO_CREATE: OpSpec = OpSpec {
    name: "gpu.bo_create",
    keys: &["dev", "name", "len"],
    expect_keys: &["errno"],
    doc_keys: "`dev` (a `gpu` device), `name`, `len`",
    doc: "`amdgpu_bo_create`: a zero-filled buffer object in VRAM — the BAR window first, then VRAM outside \
          it, then system pages",
    parse: |p, t| {
        let dev = p.name_ref(p.required(t, "dev")?, "dev", RefKind::GpuDevice)?;
        let name = define(p, t, "bo")?;
        let len = page_len(p, t, "len")?;
        p.gpu_bo_lens.insert(name.clone(), len);
        Ok(Op::Gpu(GpuOp::BoCreate { dev, name, len }))
    },
};

/// `gpu.bo_write`.
pub(crate) const BO_WRITE: OpSpec = OpSpec {
    name: "gpu.bo_write",
    keys: &["bo", "pattern", "offset", "len"],
    expect_keys: &["errno"],
    doc_keys: "`bo`, `pattern`, `offset` (default 0), `len` (default: to the end)",
    doc: "the GPU writes the buffer where it is now (its copy engine through its access path)",
    parse: |p, t| {
        let bo = p.name_ref(p.required(t, "bo")?, "bo", BO)?;
        let pattern = p.pattern(p.required(t, "pattern")?, "pattern")?;
        let (offset, len) = offset_len(p, t)?;
        Ok(Op::Gpu(GpuOp::BoWrite {
            bo,
            pattern,
            offset,
            len,
        }))
    },
};

/// `gpu.bo_read`.
pub(crate) const BO_READ: OpSpec = OpSpec {
    name: "gpu.bo_read",
    keys: &["bo", "offset", "len"],
    expect_keys: &["errno", "data"],
    doc_keys: "`bo`, `offset` (default 0), `len` (default: to the end)",
    doc: "the GPU reads the buffer where it is now; `expect.data` checks the bytes",
    parse: |p, t| {
        let bo = p.name_ref(p.required(t, "bo")?, "bo", BO)?;
        let (offset, len) = offset_len(p, t)?;
        Ok(Op::Gpu(GpuOp::BoRead { bo, offset, len }))
    },
};

/// `gpu.bo_evict`.
pub(crate) const BO_EVICT: OpSpec = OpSpec {
    name: "gpu.bo_evict",
    keys: &["bo"],
    expect_keys: &["errno"],
    doc_keys: "`bo`",
    doc: "TTM eviction to system pages: the CPU mappings zapped (`unmap_mapping_range`), `move_notify` to \
          every dynamic importer, revocation of pinned ones, GPU TLB invalidation, copy, free the VRAM",
    parse: |p, t| {
        Ok(Op::Gpu(GpuOp::BoEvict {
            bo: p.name_ref(p.required(t, "bo")?, "bo", BO)?,
        }))
    },
};

/// `gpu.bo_validate`.
pub(crate) const BO_VALIDATE: OpSpec = OpSpec {
    name: "gpu.bo_validate",
    keys: &["bo"],
    expect_keys: &["errno"],
    doc_keys: "`bo`",
    doc: "`ttm_bo_validate` back into VRAM (the window when it has room), evicting the least recently used \
          buffers when VRAM is full; importers are told as for an eviction",
    parse: |p, t| {
        Ok(Op::Gpu(GpuOp::BoValidate {
            bo: p.name_ref(p.required(t, "bo")?, "bo", BO)?,
        }))
    },
};

/// `gpu.bo_window`.
pub(crate) const BO_WINDOW: OpSpec = OpSpec {
    name: "gpu.bo_window",
    keys: &["bo", "visible"],
    expect_keys: &["errno"],
    doc_keys: "`bo`, `visible` (bool)",
    doc: "moves the buffer into (`visible = true`, evicting the window's least recently used buffers to VRAM \
          outside it) or out of the BAR window; importers are told",
    parse: |p, t| {
        let bo = p.name_ref(p.required(t, "bo")?, "bo", BO)?;
        let visible = p.boolean(p.required(t, "visible")?, "visible")?;
        Ok(Op::Gpu(GpuOp::BoWindow { bo, visible }))
    },
};

/// `gpu.bo_mmap`.
pub(crate) const BO_MMAP: OpSpec = OpSpec {
    name: "gpu.bo_mmap",
    keys: &["bo", "name"],
    expect_keys: &["errno"],
    doc_keys: "`bo`, `name` (a mapping of the acting process)",
    doc: "the process maps the whole buffer (TTM's `ttm_bo_mmap_obj`: shared, VM_MIXEDMAP): a CPU access faults \
          the page in where it is now (`ttm_bo_vm_fault`: the BAR window page, or the system page after \
          eviction); every move zaps the mapping first (`unmap_mapping_range`, notifiers fire)",
    parse: |p, t| {
        let bo = p.name_ref(p.required(t, "bo")?, "bo", BO)?;
        let v = p.required(t, "name")?;
        let name = p.name(v, "name")?;
        let len = p.gpu_bo_lens.get(&bo).copied().unwrap_or(0);
        p.define_mapping(&name, len);
        Ok(Op::Gpu(GpuOp::BoMmap { bo, name }))
    },
};

/// `gpu.dmabuf_attach`.
pub(crate) const DMABUF_ATTACH: OpSpec = OpSpec {
    name: "gpu.dmabuf_attach",
    keys: &["bo", "dev", "name", "mode"],
    expect_keys: &["errno", "segments"],
    doc_keys: "`bo`, `dev` (a `pci` device, the importer), `name`, `mode` (`\"dynamic\"`, default, or \
               `\"pinned\"`)",
    doc: "`dma_buf_dynamic_attach` (or `dma_buf_attach` + `dma_buf_pin`) and `dma_buf_map_attachment`: the \
          importer's DMA addresses of the buffer where it is now; `expect.segments` checks them",
    parse: |p, t| {
        let bo = p.name_ref(p.required(t, "bo")?, "bo", BO)?;
        let dev = p.name_ref(p.required(t, "dev")?, "dev", RefKind::PciDevice)?;
        let name = define(p, t, "attachment")?;
        let pinned = match t.get("mode") {
            Some(v) => p.keyword(v, "mode", &[("dynamic", false), ("pinned", true)])?,
            None => false,
        };
        Ok(Op::Gpu(GpuOp::DmabufAttach {
            bo,
            dev,
            name,
            pinned,
        }))
    },
};

/// `gpu.dmabuf_dma`.
pub(crate) const DMABUF_DMA: OpSpec = OpSpec {
    name: "gpu.dmabuf_dma",
    keys: &["attachment", "offset", "len", "pattern"],
    expect_keys: &["errno", "data", "segments", "violation"],
    doc_keys: "`attachment`, `offset` (default 0), `len` (default: to the end), `pattern` (writes; else reads)",
    doc: "the importer's DMA through its attachment: a dynamic importer that lost its mapping maps again at \
          the buffer's new place first; the step log shows the segments used; `ENODEV` once revoked",
    parse: |p, t| {
        let attachment = p.name_ref(p.required(t, "attachment")?, "attachment", ATTACH)?;
        let (offset, len) = offset_len(p, t)?;
        let pattern = match t.get("pattern") {
            Some(v) => Some(p.pattern(v, "pattern")?),
            None => None,
        };
        Ok(Op::Gpu(GpuOp::DmabufDma {
            attachment,
            offset,
            len,
            pattern,
        }))
    },
};

/// `gpu.managed_alloc`.
pub(crate) const MANAGED_ALLOC: OpSpec = OpSpec {
    name: "gpu.managed_alloc",
    keys: &[
        "dev",
        "name",
        "len",
        "prefetch",
        "read_duplication",
        "accessed_by",
        "fault_buffer",
        "batch_size",
    ],
    expect_keys: &["errno"],
    doc_keys: "`dev` (a `gpu`), `name` (a mapping too), `len`, `prefetch` (tree prefetcher, default true), \
               `read_duplication`, `accessed_by` (default false), `fault_buffer` (default 1024), `batch_size` \
               (default 256)",
    doc: "`cudaMallocManaged`: anonymous memory in the acting process that the GPU mirrors and faults in from \
          its managed pool (UVM fault servicing)",
    parse: |p, t| {
        let dev = p.name_ref(p.required(t, "dev")?, "dev", RefKind::GpuDevice)?;
        let name = define(p, t, "managed range")?;
        let len = page_len(p, t, "len")?;
        p.define_mapping(&name, len);
        let flag = |p: &Parser<'_>, key: &str, default: bool| -> Result<bool> {
            match t.get(key) {
                Some(v) => p.boolean(v, key),
                None => Ok(default),
            }
        };
        let count = |p: &Parser<'_>, key: &str, default: u64| -> Result<u64> {
            match t.get(key) {
                Some(v) => Ok(p.uint(v, key)?.max(1)),
                None => Ok(default),
            }
        };
        Ok(Op::Gpu(GpuOp::ManagedAlloc {
            dev,
            name,
            len,
            prefetch: flag(p, "prefetch", true)?,
            read_duplication: flag(p, "read_duplication", false)?,
            accessed_by: flag(p, "accessed_by", false)?,
            fault_buffer: count(p, "fault_buffer", 1024)?,
            batch_size: count(p, "batch_size", 256)?,
        }))
    },
};

/// `gpu.kernel`.
pub(crate) const KERNEL: OpSpec = OpSpec {
    name: "gpu.kernel",
    keys: &[
        "range",
        "pattern",
        "accesses",
        "warps",
        "write",
        "stride",
        "hot_pages",
        "hot_percent",
    ],
    expect_keys: &["errno"],
    doc_keys: "`range`, `pattern` (`\"sequential\"`, `\"strided\"`, `\"random\"`, `\"hot-set\"`), `accesses` (at most 2^24), \
               `warps` (default 32), `write` (default false), `stride` (pages), `hot_pages`, `hot_percent`",
    doc: "runs a kernel as a page-access stream over a managed range: faults serviced by batches from the \
          fault buffer, prefetch, eviction of 2 MiB chunks; the step log shows its UVM counters and time",
    parse: |p, t| {
        let range = p.name_ref(p.required(t, "range")?, "range", RANGE)?;
        let get = |p: &Parser<'_>, key: &str, default: u64| -> Result<u64> {
            match t.get(key) {
                Some(v) => p.uint(v, key),
                None => Ok(default),
            }
        };
        let pattern = match p.keyword(
            p.required(t, "pattern")?,
            "pattern",
            &[
                ("sequential", 0u8),
                ("strided", 1),
                ("random", 2),
                ("hot-set", 3),
            ],
        )? {
            0 => AccessPattern::Sequential,
            1 => AccessPattern::Strided {
                stride: get(p, "stride", 16)?.max(1),
            },
            2 => AccessPattern::Random,
            _ => AccessPattern::HotSet {
                hot_pages: get(p, "hot_pages", 512)?.max(1),
                hot_percent: get(p, "hot_percent", 90)?.min(100),
            },
        };
        let write = match t.get("write") {
            Some(v) => p.boolean(v, "write")?,
            None => false,
        };
        let warps = u32::try_from(get(p, "warps", 32)?.clamp(1, 4096)).expect("clamped");
        let accesses = get(p, "accesses", 0)?;
        if accesses > MAX_ACCESSES {
            let v = p.required(t, "accesses")?;
            return Err(p.err(
                &v.span(),
                format!("expected at most {MAX_ACCESSES} accesses, found {accesses}"),
            ));
        }
        Ok(Op::Gpu(GpuOp::Kernel {
            range,
            spec: KernelSpec {
                pattern,
                nr_accesses: accesses,
                warps,
                write,
                fatal_at: None,
            },
        }))
    },
};

/// `gpu.prefetch`.
pub(crate) const PREFETCH: OpSpec = OpSpec {
    name: "gpu.prefetch",
    keys: &["range", "offset", "len"],
    expect_keys: &["errno"],
    doc_keys: "`range`, `offset` (default 0), `len` (default: to the end)",
    doc: "`cudaMemPrefetchAsync` to the GPU: migrates the pages now, evicting chunks as needed",
    parse: |p, t| {
        let range = p.name_ref(p.required(t, "range")?, "range", RANGE)?;
        let (offset, len) = offset_len(p, t)?;
        Ok(Op::Gpu(GpuOp::Prefetch { range, offset, len }))
    },
};

/// The `gpu.*` ops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuOp {
    /// `gpu.bo_create`.
    BoCreate {
        /// The GPU.
        dev: String,
        /// The buffer's name.
        name: String,
        /// Bytes.
        len: u64,
    },
    /// `gpu.bo_write`.
    BoWrite {
        /// The buffer.
        bo: String,
        /// What to write.
        pattern: Pattern,
        /// Offset.
        offset: u64,
        /// Bytes (`None`: to the end).
        len: Option<u64>,
    },
    /// `gpu.bo_read`.
    BoRead {
        /// The buffer.
        bo: String,
        /// Offset.
        offset: u64,
        /// Bytes (`None`: to the end).
        len: Option<u64>,
    },
    /// `gpu.bo_evict`.
    BoEvict {
        /// The buffer.
        bo: String,
    },
    /// `gpu.bo_validate`.
    BoValidate {
        /// The buffer.
        bo: String,
    },
    /// `gpu.bo_window`.
    BoWindow {
        /// The buffer.
        bo: String,
        /// Into the window (else out).
        visible: bool,
    },
    /// `gpu.bo_mmap`.
    BoMmap {
        /// The buffer.
        bo: String,
        /// The mapping's name.
        name: String,
    },
    /// `gpu.dmabuf_attach`.
    DmabufAttach {
        /// The buffer.
        bo: String,
        /// The importer.
        dev: String,
        /// The attachment's name.
        name: String,
        /// A pinned importer (else dynamic).
        pinned: bool,
    },
    /// `gpu.dmabuf_dma`.
    DmabufDma {
        /// The attachment.
        attachment: String,
        /// Offset.
        offset: u64,
        /// Bytes (`None`: to the end).
        len: Option<u64>,
        /// Written bytes (`None`: a read).
        pattern: Option<Pattern>,
    },
    /// `gpu.managed_alloc`.
    ManagedAlloc {
        /// The GPU.
        dev: String,
        /// The range's (and mapping's) name.
        name: String,
        /// Bytes.
        len: u64,
        /// Tree prefetcher.
        prefetch: bool,
        /// Read duplication.
        read_duplication: bool,
        /// Remote mapping (accessed-by).
        accessed_by: bool,
        /// Fault-buffer entries.
        fault_buffer: u64,
        /// Batch size.
        batch_size: u64,
    },
    /// `gpu.kernel`.
    Kernel {
        /// The managed range.
        range: String,
        /// The kernel.
        spec: KernelSpec,
    },
    /// `gpu.prefetch`.
    Prefetch {
        /// The managed range.
        range: String,
        /// Offset.
        offset: u64,
        /// Bytes (`None`: to the end).
        len: Option<u64>,
    },
}

/// Reads and defines a step's `name` as a `what`.
fn define(p: &mut Parser<'_>, t: &Table<'_, '_>, what: &'static str) -> Result<String> {
    let v = p.required(t, "name")?;
    let name = p.name(v, "name")?;
    p.gpu_names.entry(what).or_default().insert(name.clone());
    Ok(name)
}

fn page_len(p: &Parser<'_>, t: &Table<'_, '_>, key: &str) -> Result<u64> {
    let v = p.required(t, key)?;
    let len = p.len(v, key)?;
    if !len.is_multiple_of(PAGE_SIZE) {
        return Err(p.err(
            &v.span(),
            format!("expected a whole number of 4 KiB pages for `{key}`, found {len} bytes"),
        ));
    }
    Ok(len)
}

fn offset_len(p: &Parser<'_>, t: &Table<'_, '_>) -> Result<(u64, Option<u64>)> {
    let offset = p.opt_size(t, "offset", 0)?;
    let len = match t.get("len") {
        Some(_) => Some(page_len(p, t, "len")?),
        None => None,
    };
    Ok((offset, len))
}

/// Splits a model refusal: a Linux errno is the step's outcome, anything else a run error.
fn outcome(dev: &str, e: GpuError) -> std::result::Result<Errno, RunError> {
    match e {
        GpuError::Errno(e) => Ok(e),
        source => Err(RunError::Gpu {
            device: dev.to_owned(),
            source,
        }),
    }
}

fn stats_note(s: &KernelStats) -> String {
    format!(
        "faults={} dup={} overflows={} batches={} migrated={} prefetched={} evicted_chunks={} \
         read_dup={} remote_maps={} cancelled={} time={}ns",
        s.faults,
        s.duplicate_faults,
        s.overflows,
        s.batches,
        s.pages_migrated,
        s.pages_prefetched,
        s.chunks_evicted,
        s.read_dup_pages,
        s.remote_maps,
        s.cancelled,
        s.time.as_nanos()
    )
}

impl GpuOp {
    /// Returns the op's name as written in `op = "..."`.
    pub const fn name(&self) -> &'static str {
        match self {
            Self::BoCreate { .. } => BO_CREATE.name,
            Self::BoWrite { .. } => BO_WRITE.name,
            Self::BoRead { .. } => BO_READ.name,
            Self::BoEvict { .. } => BO_EVICT.name,
            Self::BoValidate { .. } => BO_VALIDATE.name,
            Self::BoWindow { .. } => BO_WINDOW.name,
            Self::BoMmap { .. } => BO_MMAP.name,
            Self::DmabufAttach { .. } => DMABUF_ATTACH.name,
            Self::DmabufDma { .. } => DMABUF_DMA.name,
            Self::ManagedAlloc { .. } => MANAGED_ALLOC.name,
            Self::Kernel { .. } => KERNEL.name,
            Self::Prefetch { .. } => PREFETCH.name,
        }
    }

    /// Runs the op.
    pub(crate) async fn run(
        &self,
        cx: &mut StepCx<'_>,
    ) -> std::result::Result<StepResult, RunError> {
        let world = cx.world;
        let gw = &world.gpu;
        let mut out = StepResult::default();
        let len_or_rest = |gpu: &Gpu, bo: BoId, offset: u64, len: Option<u64>| {
            len.unwrap_or_else(|| gpu.bo_size(bo).unwrap_or(0).saturating_sub(offset))
        };
        match self {
            Self::BoCreate { dev, name, len } => match gw.gpus[dev].gpu.bo_create(*len) {
                Ok(bo) => {
                    gw.bos.borrow_mut().insert(name.clone(), (dev.clone(), bo));
                }
                Err(e) => out.errno = Some(outcome(dev, e)?),
            },
            Self::BoWrite {
                bo,
                pattern,
                offset,
                len,
            } => {
                let (gpu, id) = gw.bo(bo)?;
                let n = len_or_rest(&gpu, id, *offset, *len);
                let mut data =
                    vec![0u8; usize::try_from(n).map_err(|_| RunError::LenTooLarge { len: n })?];
                pattern.fill(&mut data);
                if let Err(e) = gpu.bo_write(id, *offset, &data).await {
                    out.errno = Some(outcome(bo, e)?);
                }
            }
            Self::BoRead { bo, offset, len } => {
                let (gpu, id) = gw.bo(bo)?;
                let n = len_or_rest(&gpu, id, *offset, *len);
                match gpu.bo_read(id, *offset, n).await {
                    Ok(d) => out.data = Some(d),
                    Err(e) => out.errno = Some(outcome(bo, e)?),
                }
            }
            Self::BoEvict { bo } | Self::BoValidate { bo } | Self::BoWindow { bo, .. } => {
                let (gpu, id) = gw.bo(bo)?;
                let res = match self {
                    Self::BoEvict { .. } => gpu.bo_evict(id).await,
                    Self::BoValidate { .. } => gpu.bo_validate(id).await,
                    Self::BoWindow { visible, .. } => gpu.bo_set_visible(id, *visible).await,
                    _ => unreachable!("matched above"),
                };
                if let Err(e) = res {
                    out.errno = Some(outcome(bo, e)?);
                }
                if let Ok(p) = gpu.bo_placement(id) {
                    out.note = Some(format!("placement={}", p.name()));
                }
            }
            Self::BoMmap { bo, name } => {
                let (gpu, id) = gw.bo(bo)?;
                let len = gpu.bo_size(id).unwrap_or(0);
                match gpu.bo_mmap(cx.pid, id, Prot::RW).await {
                    Ok(va) => world.record_mapping(&mut out, cx.proc_name, name, len, Ok(va)),
                    Err(e) => out.errno = Some(outcome(bo, e)?),
                }
            }
            Self::DmabufAttach {
                bo,
                dev,
                name,
                pinned,
            } => {
                let (gpu, id) = gw.bo(bo)?;
                let kind = if *pinned {
                    ImporterKind::Pinned
                } else {
                    ImporterKind::Dynamic
                };
                match gpu.bo_attach(id, world.pci[dev], kind, true).await {
                    Ok(a) => {
                        record_segments(&mut out, &gpu, a);
                        let gpu_name = gw.bos.borrow()[bo].0.clone();
                        gw.attachments
                            .borrow_mut()
                            .insert(name.clone(), (gpu_name, a));
                    }
                    Err(e) => out.errno = Some(outcome(bo, e)?),
                }
            }
            Self::DmabufDma {
                attachment,
                offset,
                len,
                pattern,
            } => {
                let (gpu, att) = gw.attachment(attachment)?;
                let n = len.unwrap_or_else(|| {
                    gpu.bo_attach_size(att).unwrap_or(0).saturating_sub(*offset)
                });
                let data = pattern.as_ref().map(|p| {
                    let mut d = vec![0u8; usize::try_from(n).unwrap_or(0)];
                    p.fill(&mut d);
                    d
                });
                match gpu.bo_dma(att, *offset, n, data.as_deref()).await {
                    Ok(d) if data.is_none() => out.data = Some(d),
                    Ok(_) => {}
                    Err(e) => out.errno = Some(outcome(attachment, e)?),
                }
                record_segments(&mut out, &gpu, att);
            }
            Self::ManagedAlloc {
                dev,
                name,
                len,
                prefetch,
                read_duplication,
                accessed_by,
                fault_buffer,
                batch_size,
            } => {
                let d = &gw.gpus[dev];
                let mut cfg =
                    UvmConfig::new(d.managed, gw.uvm_costs.clone().expect("built with costs"));
                cfg.prefetch = *prefetch;
                cfg.read_duplication = *read_duplication;
                cfg.accessed_by = *accessed_by;
                cfg.fault_buffer = usize::try_from(*fault_buffer).unwrap_or(usize::MAX);
                cfg.batch_size = usize::try_from(*batch_size).unwrap_or(usize::MAX);
                match ManagedRange::new(&world.kernel, &d.pool, cx.pid, *len, cfg).await {
                    Ok(range) => {
                        let start = range.start();
                        gw.ranges.borrow_mut().insert(name.clone(), Rc::new(range));
                        world.record_mapping(&mut out, cx.proc_name, name, *len, Ok(start));
                    }
                    Err(e) => out.errno = Some(outcome(dev, e)?),
                }
            }
            Self::Kernel { range, spec } => {
                let managed = gw.range(range)?;
                match managed.run_kernel(spec, cx.rng).await {
                    Ok(s) => out.note = Some(stats_note(&s)),
                    Err(e) => out.errno = Some(outcome(range, e)?),
                }
            }
            Self::Prefetch { range, offset, len } => {
                let managed = gw.range(range)?;
                let first = offset / PAGE_SIZE;
                let n = len.map_or_else(
                    || managed.nr_pages().saturating_sub(first),
                    |l| l / PAGE_SIZE,
                );
                match managed.prefetch(first, n).await {
                    Ok(s) => out.note = Some(stats_note(&s)),
                    Err(e) => out.errno = Some(outcome(range, e)?),
                }
            }
        }
        Ok(out)
    }
}

fn record_segments(out: &mut StepResult, gpu: &Gpu, a: BoAttach) {
    let segs = gpu.bo_segments(a);
    out.dma_addr = segs.first().map(|s| s.addr.raw());
    out.segments = Some(
        segs.iter()
            .map(|s| (s.kind.name().to_owned(), s.len))
            .collect(),
    );
}
