//! SVA accelerator ops: `sva.bind`, `sva.unbind`, `sva.submit`, `sva.wait`, `sva.stats`.
//!
//! A `kind = "sva"` device ([`peerdma_devices::sva`]) works on the acting process's virtual addresses by
//! PASID: `sva.bind` is `iommu_sva_bind_device` (through the device's driver), `sva.submit` enqueues a copy or
//! fill descriptor (ENQCMD to a shared work queue: `EAGAIN` when it is full), `sva.wait` waits for the
//! descriptor's completion record. A process's bonds are released when it exits, after its mm is torn
//! down (closing the device file).

use peerdma_core::{Errno, PAGE_SIZE};
use peerdma_devices::{CompletionStatus, Descriptor, DmirrorResult, Order, SvaDevError};
use toml::de::DeValue;

use super::{Op, OpSpec};
use crate::ast::AddrExpr;
use crate::error::RunError;
use crate::parse::RefKind;
use crate::run::{StepCx, StepResult};

/// `sva.bind`.
pub(crate) const BIND: OpSpec = OpSpec {
    name: "sva.bind",
    keys: &["dev"],
    expect_keys: &["errno"],
    doc_keys: "`dev` (a `kind = \"sva\"` device)",
    doc: "`iommu_sva_bind_device`: the process's mm gets its PASID on the device (bind errnos: `ENODEV`, \
          `EBUSY`, `EOVERFLOW`, `ENOSPC`, `EOPNOTSUPP`); binding again takes one more reference",
    parse: |p, t| {
        Ok(Op::Sva(SvaOp::Bind {
            dev: p.name_ref(p.required(t, "dev")?, "dev", RefKind::SvaDevice)?,
        }))
    },
};

/// `sva.unbind`.
pub(crate) const UNBIND: OpSpec = OpSpec {
    name: "sva.unbind",
    keys: &["dev"],
    expect_keys: &["errno"],
    doc_keys: "`dev`",
    doc: "`iommu_sva_unbind_device`: at the last reference, waits for the PASID's descriptors, drains its page \
          requests, flushes the ATC, detaches (`EINVAL` when not bound)",
    parse: |p, t| {
        Ok(Op::Sva(SvaOp::Unbind {
            dev: p.name_ref(p.required(t, "dev")?, "dev", RefKind::SvaDevice)?,
        }))
    },
};

/// `sva.submit`.
pub(crate) const SUBMIT: OpSpec = OpSpec {
    name: "sva.submit",
    keys: &[
        "dev",
        "job",
        "desc",
        "src",
        "dst",
        "len",
        "pattern",
        "completion",
        "order",
        "block_on_fault",
    ],
    expect_keys: &["errno"],
    doc_keys: "`dev`, `job` (a name), `desc` (`\"copy\"` with `src`, or `\"fill\"` with `pattern`, an integer \
               repeated as 8 bytes), `dst`, `len` (whole pages), `completion` (page-aligned address of the \
               completion record), `order` (`\"sequential\"`, `\"random\"` or `\"stride:N\"`; default \
               sequential), `block_on_fault` (default true: faults go through PRI)",
    doc: "enqueue a descriptor on the accelerator's work queue (`EAGAIN` when full, `EINVAL` when not bound or \
          not page-aligned)",
    parse: |p, t| {
        let dev = p.name_ref(p.required(t, "dev")?, "dev", RefKind::SvaDevice)?;
        let job = p.name(p.required(t, "job")?, "job")?;
        p.sva_jobs.insert(job.clone());
        let desc_v = p.required(t, "desc")?;
        let kind = p.string(desc_v, "desc")?;
        let dst = p.addr(p.required(t, "dst")?, "dst")?;
        let len = p.len(p.required(t, "len")?, "len")?;
        let completion = p.addr(p.required(t, "completion")?, "completion")?;
        let src = match (kind, t.get("src"), t.get("pattern")) {
            ("copy", Some(v), None) => SvaSource::Copy(p.addr(v, "src")?),
            ("fill", None, Some(v)) => SvaSource::Fill(p.uint(v, "pattern")?),
            _ => {
                return Err(p.err(
                    &desc_v.span(),
                    "expected `desc = \"copy\"` with `src`, or `desc = \"fill\"` with `pattern`",
                ));
            }
        };
        let order = match t.get("order") {
            None => Order::Sequential,
            Some(v) => {
                let text = p.string(v, "order")?;
                match text {
                    "sequential" => Order::Sequential,
                    "random" => Order::Random,
                    _ => match text.strip_prefix("stride:").map(str::parse::<u64>) {
                        Some(Ok(n)) if n > 0 => Order::Strided(n),
                        _ => {
                            return Err(p.err(
                                &v.span(),
                                format!(
                                    "expected `\"sequential\"`, `\"random\"` or `\"stride:N\"` (N > 0) for \
                                     `order`, found `{text}`"
                                ),
                            ));
                        }
                    },
                }
            }
        };
        let block_on_fault = match t.get("block_on_fault") {
            None => true,
            Some(v) => match v.get_ref() {
                DeValue::Boolean(b) => *b,
                _ => {
                    return Err(p.err(&v.span(), "expected `true` or `false` for `block_on_fault`"));
                }
            },
        };
        Ok(Op::Sva(SvaOp::Submit {
            dev,
            job,
            src,
            dst,
            len,
            completion,
            order,
            block_on_fault,
        }))
    },
};

/// `sva.wait`.
pub(crate) const WAIT: OpSpec = OpSpec {
    name: "sva.wait",
    keys: &["job"],
    expect_keys: &["errno", "cpages"],
    doc_keys: "`job`",
    doc: "wait for the descriptor's completion record: success, `EFAULT` (page fault status), `EIO` (aborted: \
          the process exited under it); `cpages` = pages completed",
    parse: |p, t| {
        Ok(Op::Sva(SvaOp::Wait {
            job: p.name_ref(p.required(t, "job")?, "job", RefKind::SvaJob)?,
        }))
    },
};

/// `sva.stats`.
pub(crate) const STATS: OpSpec = OpSpec {
    name: "sva.stats",
    keys: &["dev"],
    expect_keys: &["errno", "atc_hit_pct", "translation_requests"],
    doc_keys: "`dev`",
    doc: "check the device's ATC counters so far: `atc_hit_pct = [MIN, MAX]` (percent of lookups that hit), \
          `translation_requests = [MIN, MAX]`",
    parse: |p, t| {
        Ok(Op::Sva(SvaOp::Stats {
            dev: p.name_ref(p.required(t, "dev")?, "dev", RefKind::SvaDevice)?,
        }))
    },
};

/// Where a descriptor's data comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SvaSource {
    /// Copy from this address.
    Copy(AddrExpr),
    /// Fill with this 8-byte pattern.
    Fill(u64),
}

/// The SVA accelerator ops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SvaOp {
    /// `sva.bind`.
    Bind {
        /// The device.
        dev: String,
    },
    /// `sva.unbind`.
    Unbind {
        /// The device.
        dev: String,
    },
    /// `sva.submit`.
    Submit {
        /// The device.
        dev: String,
        /// The job's name.
        job: String,
        /// Copy source or fill pattern.
        src: SvaSource,
        /// Destination.
        dst: AddrExpr,
        /// Bytes.
        len: u64,
        /// The completion record's address.
        completion: AddrExpr,
        /// The page order.
        order: Order,
        /// Page faults go through PRI.
        block_on_fault: bool,
    },
    /// `sva.wait`.
    Wait {
        /// The job.
        job: String,
    },
    /// `sva.stats`.
    Stats {
        /// The device.
        dev: String,
    },
}

/// The errno an SVA device outcome is reported as.
fn errno(e: SvaDevError) -> Errno {
    match e {
        SvaDevError::Errno(e) => e,
        _ => Errno::EINVAL,
    }
}

impl SvaOp {
    /// Returns the op's name as written in `op = "..."`.
    pub const fn name(&self) -> &'static str {
        match self {
            Self::Bind { .. } => BIND.name,
            Self::Unbind { .. } => UNBIND.name,
            Self::Submit { .. } => SUBMIT.name,
            Self::Wait { .. } => WAIT.name,
            Self::Stats { .. } => STATS.name,
        }
    }

    /// Runs the op.
    pub(crate) async fn run(&self, cx: &mut StepCx<'_>) -> Result<StepResult, RunError> {
        let (w, proc_name, pid) = (cx.world, cx.proc_name, cx.pid);
        let mut out = StepResult::default();
        match self {
            Self::Bind { dev } => match w.sva[dev].bind(pid) {
                Ok(_) => w.proc_mut(proc_name).sva_binds.push(dev.clone()),
                Err(e) => out.errno = Some(errno(e)),
            },
            Self::Unbind { dev } => match w.sva[dev].unbind(pid).await {
                Ok(()) => {
                    let mut p = w.proc_mut(proc_name);
                    if let Some(i) = p.sva_binds.iter().position(|d| d == dev) {
                        p.sva_binds.remove(i);
                    }
                }
                Err(e) => out.errno = Some(errno(e)),
            },
            Self::Submit {
                dev,
                job,
                src,
                dst,
                len,
                completion,
                order,
                block_on_fault,
            } => {
                let (dst, _) = w.resolve(proc_name, dst)?;
                let (completion, _) = w.resolve(proc_name, completion)?;
                let desc = match src {
                    SvaSource::Copy(a) => Descriptor::Copy {
                        src: w.resolve(proc_name, a)?.0,
                        dst,
                        len: *len,
                    },
                    SvaSource::Fill(pattern) => Descriptor::Fill {
                        dst,
                        len: *len,
                        pattern: *pattern,
                    },
                };
                let d = &w.sva[dev];
                match d.submit_ordered(pid, desc, *order, completion, *block_on_fault) {
                    Ok(id) => {
                        w.proc_mut(proc_name)
                            .sva_jobs
                            .insert(job.clone(), (dev.clone(), id));
                    }
                    Err(e) => out.errno = Some(errno(e)),
                }
            }
            Self::Wait { job } => {
                let (dev, id) = w.proc_mut(proc_name).sva_jobs.remove(job).ok_or_else(|| {
                    RunError::NoSvaJob {
                        job: job.clone(),
                        process: proc_name.to_owned(),
                    }
                })?;
                match w.sva[&dev].wait(id).await {
                    Ok(rec) => {
                        out.errno = match rec.status {
                            CompletionStatus::Success => None,
                            CompletionStatus::PageFault => Some(Errno::EFAULT),
                            CompletionStatus::Aborted => Some(Errno::EIO),
                        };
                        out.dm = Some(DmirrorResult {
                            cpages: rec.bytes_completed / PAGE_SIZE,
                            ..DmirrorResult::default()
                        });
                    }
                    Err(e) => out.errno = Some(errno(e)),
                }
            }
            Self::Stats { dev } => {
                let s = w.sva[dev].atc_stats();
                let lookups = s.hits + s.misses;
                let pct = (s.hits * 100).checked_div(lookups).unwrap_or(0);
                out.sva_stats = Some((pct, s.misses));
            }
        }
        Ok(out)
    }
}
