//! GUP and pin ops: `gup`, `pin`, `unpin`, `dma.write`, `dma.read`.
//!
//! `gup` takes references with FOLL_* flags and drops them at once (the kernel's `gup_test` ioctls); `pin`
//! holds them under a name until `unpin` or the process exits (`mm/gup.c`: `pin_user_pages`,
//! `__gup_longterm_locked`'s migration out of ZONE_MOVABLE). With `flags = ["get"]` a `pin` holds plain
//! FOLL_GET references, as `vmsplice` does: no pin bias, so COW and fork treat the pages as unpinned.
//! `dma.write` and `dma.read` are the short-term pin discipline: the scenario's generic DMA engine writes or
//! reads through a held pin's (or reference's) frames, one page at a time — what a reader of the pipe, or
//! a device holding the pin, sees after the CPU has written.

use peerdma_core::PAGE_SIZE;
use peerdma_devices::DmirrorResult;
use peerdma_dma::DmaOp;
use peerdma_mm::{DeviceGrant, FrameTranslation, GupFlags};
use toml::de::DeValue;

use super::{Op, OpSpec};
use crate::ast::AddrExpr;
use crate::error::{RunError, ScenarioError};
use crate::parse::{Parser, RefKind, Table, Value, describe, list};
use crate::pattern::Pattern;
use crate::run::{StepCx, StepResult};

type Result<T> = std::result::Result<T, ScenarioError>;

/// `gup`.
pub(crate) const GUP: OpSpec = OpSpec {
    name: "gup",
    keys: &["at", "pages", "flags"],
    expect_keys: &["errno", "cpages"],
    doc_keys: "`at`, `pages`, `flags` (FOLL_* names: `get`, `pin`, `longterm`, `write`, `force`, `pci_p2pdma`, \
               `nofault`, `anon`)",
    doc: "get/pin_user_pages, released at once (gup_test); `cpages` = pages taken; invalid combinations are \
          `EINVAL` outcomes",
    parse: |p, t| {
        let (at, pages, flags) = at_pages_flags(p, t)?;
        Ok(Op::Gup(GupOp::Gup { at, pages, flags }))
    },
};

/// `pin`.
pub(crate) const PIN: OpSpec = OpSpec {
    name: "pin",
    keys: &["at", "pages", "flags", "name"],
    expect_keys: &["errno", "cpages"],
    doc_keys: "`at`, `pages`, `flags` (as `gup`), `name`",
    doc: "get/pin_user_pages held until `unpin` or exit; `cpages` = pages taken",
    parse: |p, t| {
        let (at, pages, flags) = at_pages_flags(p, t)?;
        let name = p.string(p.required(t, "name")?, "name")?.to_owned();
        p.pins.insert(name.clone());
        Ok(Op::Gup(GupOp::Pin {
            at,
            pages,
            flags,
            name,
        }))
    },
};

/// `unpin`.
pub(crate) const UNPIN: OpSpec = OpSpec {
    name: "unpin",
    keys: &["pin"],
    expect_keys: &["errno"],
    doc_keys: "`pin`",
    doc: "releases a held pin (`unpin_user_pages`)",
    parse: |p, t| {
        Ok(Op::Gup(GupOp::Unpin {
            pin: p.name_ref(p.required(t, "pin")?, "pin", RefKind::Pin)?,
        }))
    },
};

/// `dma.write`.
pub(crate) const DMA_WRITE: OpSpec = OpSpec {
    name: "dma.write",
    keys: &["pin", "pattern"],
    expect_keys: &["errno"],
    doc_keys: "`pin`, `pattern`",
    doc: "a DMA engine writes the pattern through a held pin (short-term pin discipline)",
    parse: |p, t| {
        let pin = p.name_ref(p.required(t, "pin")?, "pin", RefKind::Pin)?;
        let v = p.required(t, "pattern")?;
        let text = p.string(v, "pattern")?;
        let pattern = text
            .parse::<Pattern>()
            .map_err(|e| p.err(&v.span(), e.to_string()))?;
        Ok(Op::Gup(GupOp::DmaWrite { pin, pattern }))
    },
};

/// `dma.read`.
pub(crate) const DMA_READ: OpSpec = OpSpec {
    name: "dma.read",
    keys: &["pin"],
    expect_keys: &["errno", "data"],
    doc_keys: "`pin`",
    doc: "a DMA engine reads every page of a held pin or FOLL_GET reference (the frames it holds, whatever \
          the page tables map now); check with `expect.data`",
    parse: |p, t| {
        let pin = p.name_ref(p.required(t, "pin")?, "pin", RefKind::Pin)?;
        Ok(Op::Gup(GupOp::DmaRead { pin }))
    },
};

/// The GUP and pin ops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GupOp {
    /// `gup`: take references on `pages` pages at `at` with FOLL_* `flags` and release them at once, as the
    /// kernel's gup_test ioctls do; `cpages` checks how many pages were taken.
    Gup {
        /// Start address.
        at: AddrExpr,
        /// Number of 4 KiB pages.
        pages: u64,
        /// FOLL_* flags.
        flags: GupFlags,
    },
    /// `pin`: `pin_user_pages` (or `get_user_pages`) held under `name` until `unpin` or process exit.
    Pin {
        /// Start address.
        at: AddrExpr,
        /// Number of 4 KiB pages.
        pages: u64,
        /// FOLL_* flags.
        flags: GupFlags,
        /// The pin's name.
        name: String,
    },
    /// `unpin`: release a held pin.
    Unpin {
        /// The pin's name.
        pin: String,
    },
    /// `dma.write`: a DMA engine writes `pattern` into every page of a held pin (short-term pin discipline).
    DmaWrite {
        /// The pin's name.
        pin: String,
        /// What to write, laid out over the pinned pages in order.
        pattern: Pattern,
    },
    /// `dma.read`: a DMA engine reads every page of a held pin or reference.
    DmaRead {
        /// The pin's name.
        pin: String,
    },
}

/// Reads `at`, `pages` and `flags`.
fn at_pages_flags(p: &mut Parser<'_>, t: &Table<'_, '_>) -> Result<(AddrExpr, u64, GupFlags)> {
    let at = p.addr(p.required(t, "at")?, "at")?;
    let pages = p.uint_as(
        p.required(t, "pages")?,
        "pages",
        "an integer number of pages",
    )?;
    let flags = gup_flags(p, p.required(t, "flags")?)?;
    Ok((at, pages, flags))
}

/// Reads a `gup` step's `flags`: FOLL_* names. Combinations Linux rejects (`get` with `pin`, `longterm`
/// without `pin`) are run-time `EINVAL` outcomes, not input errors.
fn gup_flags(p: &Parser<'_>, v: &Value<'_>) -> Result<GupFlags> {
    const NAMES: &[(&str, GupFlags)] = &[
        ("get", GupFlags::GET),
        ("pin", GupFlags::PIN),
        ("longterm", GupFlags::LONGTERM),
        ("write", GupFlags::WRITE),
        ("force", GupFlags::FORCE),
        ("pci_p2pdma", GupFlags::PCI_P2PDMA),
        ("nofault", GupFlags::NOFAULT),
        ("anon", GupFlags::ANON),
    ];
    let DeValue::Array(items) = v.get_ref() else {
        return Err(p.err(
            &v.span(),
            format!(
                "expected a list of FOLL_* names like `[\"pin\", \"write\"]` for `flags`, found {}",
                describe(v.get_ref())
            ),
        ));
    };
    let mut flags = GupFlags::empty();
    for item in items {
        let found = match item.get_ref() {
            DeValue::String(s) => NAMES
                .iter()
                .find(|(n, _)| *n == s.as_ref())
                .map(|(_, f)| *f),
            _ => None,
        };
        let Some(f) = found else {
            return Err(p.err(
                &item.span(),
                format!(
                    "expected a FOLL_* flag name; one of: {}",
                    list(NAMES.iter().map(|(n, _)| *n))
                ),
            ));
        };
        flags |= f;
    }
    Ok(flags)
}

impl GupOp {
    /// Returns the op's name as written in `op = "..."`.
    pub const fn name(&self) -> &'static str {
        match self {
            Self::Gup { .. } => GUP.name,
            Self::Pin { .. } => PIN.name,
            Self::Unpin { .. } => UNPIN.name,
            Self::DmaWrite { .. } => DMA_WRITE.name,
            Self::DmaRead { .. } => DMA_READ.name,
        }
    }

    /// Runs the op.
    pub(crate) async fn run(
        &self,
        cx: &mut StepCx<'_>,
    ) -> std::result::Result<StepResult, RunError> {
        let (w, proc_name, pid) = (cx.world, cx.proc_name, cx.pid);
        let kernel = &w.kernel;
        let mut out = StepResult::default();
        match self {
            Self::Gup { at, pages, flags } => {
                let (va, _) = w.resolve(proc_name, at)?;
                match kernel.get_user_pages(pid, va, *pages, *flags).await {
                    Ok(pinned) => {
                        out.dm = Some(DmirrorResult {
                            cpages: pinned.len() as u64,
                            ..DmirrorResult::default()
                        });
                    }
                    Err(e) => out.errno = Some(e),
                }
            }
            Self::Pin {
                at,
                pages,
                flags,
                name,
            } => {
                let (va, _) = w.resolve(proc_name, at)?;
                match kernel.get_user_pages(pid, va, *pages, *flags).await {
                    Ok(pinned) => {
                        out.dm = Some(DmirrorResult {
                            cpages: pinned.len() as u64,
                            ..DmirrorResult::default()
                        });
                        w.proc_mut(proc_name)
                            .pins
                            .insert(name.clone(), (pinned, va));
                    }
                    Err(e) => out.errno = Some(e),
                }
            }
            Self::Unpin { pin } => {
                let p = w.proc_mut(proc_name).pins.remove(pin);
                if p.is_none() {
                    return Err(RunError::NoPin {
                        pin: pin.clone(),
                        process: proc_name.to_owned(),
                    });
                }
            }
            Self::DmaRead { pin } => {
                let (frames, va, is_pin) = held(cx, pin)?;
                let mut ids = Vec::with_capacity(frames.len());
                for (i, f) in frames.iter().enumerate() {
                    let t = FrameTranslation {
                        frame: *f,
                        generation: kernel.frame_generation(*f).unwrap_or(0),
                        grant: grant(is_pin, pid, va.add(i as u64 * PAGE_SIZE)),
                    };
                    match w
                        .dma_engine
                        .submit_frame(t, DmaOp::Read, w.dma_page_cost)
                        .await
                    {
                        Ok(id) => ids.push(id),
                        Err(e) => {
                            out.errno = Some(e);
                            break;
                        }
                    }
                }
                let mut data = Vec::with_capacity(frames.len() * 4096);
                for id in ids {
                    match w.dma_engine.wait(id).await {
                        Ok(d) => data.extend_from_slice(&d),
                        Err(e) => {
                            out.errno.get_or_insert(e);
                        }
                    }
                }
                out.data = Some(data);
            }
            Self::DmaWrite { pin, pattern } => {
                let (frames, va, is_pin) = held(cx, pin)?;
                let mut data = w.host_buffer(frames.len() as u64 * 4096)?;
                pattern.fill(&mut data);
                // The scenario's DMA engine writes through its pins one page at a time (one tag), each
                // page landing `dma_page` after the previous one (peerdma_dma::space).
                let mut ids = Vec::with_capacity(frames.len());
                for (i, f) in frames.iter().enumerate() {
                    let page_va = va.add(i as u64 * PAGE_SIZE);
                    let t = FrameTranslation {
                        frame: *f,
                        generation: kernel.frame_generation(*f).unwrap_or(0),
                        grant: grant(is_pin, pid, page_va),
                    };
                    let op = DmaOp::Write(data[i * 4096..(i + 1) * 4096].to_vec());
                    match w.dma_engine.submit_frame(t, op, w.dma_page_cost).await {
                        Ok(id) => ids.push(id),
                        Err(_) => break,
                    }
                }
                for id in ids {
                    // A refused landing is the oracle's to report; the step itself has no errno.
                    let _ = w.dma_engine.wait(id).await;
                }
            }
        }
        Ok(out)
    }
}

/// Returns the frames of the held pin `pin` of the acting process, the address it was taken at and
/// whether it is a pin (not a FOLL_GET reference).
fn held(
    cx: &StepCx<'_>,
    pin: &str,
) -> std::result::Result<(Vec<peerdma_core::FrameId>, peerdma_core::Va, bool), RunError> {
    let procs = cx.world.procs.borrow();
    let (p, va) = procs[cx.proc_name]
        .pins
        .get(pin)
        .ok_or_else(|| RunError::NoPin {
            pin: pin.to_owned(),
            process: cx.proc_name.to_owned(),
        })?;
    Ok((p.frames().to_vec(), *va, p.is_pin()))
}

/// The grant a DMA through a held pin (or FOLL_GET reference) of page `va` of `pid` uses.
fn grant(pin: bool, pid: peerdma_core::Pid, va: peerdma_core::Va) -> DeviceGrant {
    if pin {
        DeviceGrant::Pin { pid, va }
    } else {
        DeviceGrant::Ref { pid, va }
    }
}
