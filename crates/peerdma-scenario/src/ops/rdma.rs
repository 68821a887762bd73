//! RDMA verbs ops on `kind = "rnic"` devices ([`peerdma_devices::rnic`]): `rdma.reg_mr`,
//! `rdma.dereg_mr`, `rdma.advise`, `rdma.qp`, `rdma.connect`, `rdma.post`, `rdma.post_recv`, `rdma.poll`,
//! and the test-only `rdma.skip_fence`.
//!
//! Names are scenario-wide: an MR (`name` of `rdma.reg_mr`) and a QP (`name` of `rdma.qp`) can be used by
//! any thread, so a peer process can write into another process's MR. Each process has one protection
//! domain per NIC, made at its first use. Addresses of a remote MR (`remote_at`) are resolved in the
//! process that registered it.

use std::collections::BTreeMap;
use std::rc::Rc;

use peerdma_core::{Errno, Pid, Va};
use peerdma_devices::rnic::{
    Access, Advice, CqId, PdId, QpAttr, QpId, Rnic, RnicError, SendWr, Sge, WrOpcode,
};
use toml::de::DeValue;

use super::{Op, OpSpec};
use crate::ast::AddrExpr;
use crate::error::{RunError, ScenarioError};
use crate::parse::{Parser, RefKind, Table, describe};
use crate::run::{StepCx, StepResult, World};

type Result<T> = std::result::Result<T, ScenarioError>;

/// The RDMA objects the steps named (scenario-wide).
#[derive(Debug, Default)]
pub(crate) struct RdmaNames {
    pds: BTreeMap<(String, Pid), PdId>,
    /// MR name → (device, lkey, start, registering process, length).
    mrs: BTreeMap<String, (String, u32, Va, String, u64)>,
    /// QP name → (device, QP, CQ).
    qps: BTreeMap<String, (String, QpId, CqId)>,
}

/// `rdma.reg_mr`.
pub(crate) const REG_MR: OpSpec = OpSpec {
    name: "rdma.reg_mr",
    keys: &[
        "dev", "at", "len", "implicit", "export", "offset", "access", "name",
    ],
    expect_keys: &["errno"],
    doc_keys: "`dev` (an `rnic`), `at` and `len` (a user range), or `implicit = true` (the whole address \
               space), or `export` with `offset` and `len` (a dma-buf MR); `access` (`\"local_write\"`, \
               `\"remote_write\"`, `\"remote_read\"`, `\"on_demand\"`, `\"hugetlb\"`), `name`",
    doc: "`ibv_reg_mr` / `ibv_reg_dmabuf_mr`: pinned, ODP (`on_demand`), implicit ODP, or dma-buf; the \
          registration errnos of the verbs",
    parse: |p, t| {
        let dev = p.name_ref(p.required(t, "dev")?, "dev", RefKind::PciDevice)?;
        let implicit = match t.get("implicit") {
            Some(v) => p.boolean(v, "implicit")?,
            None => false,
        };
        let export = match t.get("export") {
            Some(v) => Some(p.name_ref(v, "export", RefKind::Export)?),
            None => None,
        };
        let at = match (implicit, &export, t.get("at")) {
            (false, None, _) => Some(p.addr(p.required(t, "at")?, "at")?),
            (_, _, Some(v)) => {
                return Err(p.err(
                    &v.span(),
                    "`at` is for a user-range MR, not an implicit or dma-buf one",
                ));
            }
            _ => None,
        };
        let len = match (implicit, t.get("len")) {
            (true, _) => u64::MAX,
            (false, _) => p.len(p.required(t, "len")?, "len")?,
        };
        let offset = match t.get("offset") {
            Some(v) => p.uint(v, "offset")?,
            None => 0,
        };
        let access = access(p, t)?;
        let name = p.name(p.required(t, "name")?, "name")?;
        Ok(Op::Rdma(RdmaOp::RegMr {
            dev,
            at,
            len,
            export,
            offset,
            access,
            name,
        }))
    },
};

/// `rdma.dereg_mr`.
pub(crate) const DEREG_MR: OpSpec = OpSpec {
    name: "rdma.dereg_mr",
    keys: &["mr"],
    expect_keys: &["errno"],
    doc_keys: "`mr`",
    doc: "`ibv_dereg_mr`: unpin, or zap and remove the ODP notifiers, or detach",
    parse: |p, t| {
        Ok(Op::Rdma(RdmaOp::DeregMr {
            mr: p.name(p.required(t, "mr")?, "mr")?,
        }))
    },
};

/// `rdma.advise`.
pub(crate) const ADVISE: OpSpec = OpSpec {
    name: "rdma.advise",
    keys: &["mr", "advice", "at", "len", "flush"],
    expect_keys: &["errno"],
    doc_keys: "`mr`, `advice` (`\"prefetch\"`, `\"prefetch_write\"`, `\"no_fault\"`), `at`, `len`, `flush` \
               (default true: synchronous)",
    doc: "`ibv_advise_mr`: prefetch an ODP MR's pages into the NIC",
    parse: |p, t| {
        let mr = p.name(p.required(t, "mr")?, "mr")?;
        let advice = p.keyword(
            p.required(t, "advice")?,
            "advice",
            &[
                ("prefetch", Advice::Prefetch),
                ("prefetch_write", Advice::PrefetchWrite),
                ("no_fault", Advice::PrefetchNoFault),
            ],
        )?;
        let at = p.addr(p.required(t, "at")?, "at")?;
        let len = p.len(p.required(t, "len")?, "len")?;
        let flush = match t.get("flush") {
            Some(v) => p.boolean(v, "flush")?,
            None => true,
        };
        Ok(Op::Rdma(RdmaOp::Advise {
            mr,
            advice,
            at,
            len,
            flush,
        }))
    },
};

/// `rdma.qp`.
pub(crate) const QP: OpSpec = OpSpec {
    name: "rdma.qp",
    keys: &["dev", "name", "rnr_retry", "retry_cnt", "max_send_wr"],
    expect_keys: &["errno"],
    doc_keys: "`dev`, `name`, `rnr_retry` (0–7, 7 infinite; default 7), `retry_cnt` (0–7, default 7), \
               `max_send_wr` (default 16)",
    doc: "an RC queue pair with its own completion queue, in the acting process's protection domain",
    parse: |p, t| {
        let dev = p.name_ref(p.required(t, "dev")?, "dev", RefKind::PciDevice)?;
        let name = p.name(p.required(t, "name")?, "name")?;
        let mut attr = QpAttr::default();
        if let Some(v) = t.get("rnr_retry") {
            attr.rnr_retry = u8::try_from(p.uint(v, "rnr_retry")?).unwrap_or(u8::MAX);
        }
        if let Some(v) = t.get("retry_cnt") {
            attr.retry_cnt = u8::try_from(p.uint(v, "retry_cnt")?).unwrap_or(u8::MAX);
        }
        if let Some(v) = t.get("max_send_wr") {
            attr.max_send_wr = u32::try_from(p.uint(v, "max_send_wr")?).unwrap_or(u32::MAX);
        }
        Ok(Op::Rdma(RdmaOp::Qp { dev, name, attr }))
    },
};

/// `rdma.connect`.
pub(crate) const CONNECT: OpSpec = OpSpec {
    name: "rdma.connect",
    keys: &["qp", "peer"],
    expect_keys: &["errno"],
    doc_keys: "`qp`, `peer` (another QP, on any NIC)",
    doc: "connects the two QPs (both to RTS)",
    parse: |p, t| {
        Ok(Op::Rdma(RdmaOp::Connect {
            qp: p.name(p.required(t, "qp")?, "qp")?,
            peer: p.name(p.required(t, "peer")?, "peer")?,
        }))
    },
};

/// `rdma.post`.
pub(crate) const POST: OpSpec = OpSpec {
    name: "rdma.post",
    keys: &[
        "qp",
        "opcode",
        "mr",
        "at",
        "len",
        "remote_mr",
        "remote_at",
        "wr_id",
        "count",
        "random",
    ],
    expect_keys: &["errno"],
    doc_keys: "`qp`, `opcode` (`\"write\"`, `\"read\"`, `\"send\"`), `mr` and `at` (the local buffer; `at` \
               defaults to the MR's start), `len`, `remote_mr` and `remote_at` (WRITE and READ; `remote_at` \
               is resolved in the MR owner's process, default its start), `wr_id`, `count` (post it so many \
               times, default 1), `random` (each WR at a random whole-`len` offset of the remote MR, from the \
               thread's random stream)",
    doc: "`ibv_post_send`: the WR runs in the background; `ENOMEM` when `max_send_wr` are outstanding",
    parse: |p, t| {
        let qp = p.name(p.required(t, "qp")?, "qp")?;
        let opcode = p.keyword(
            p.required(t, "opcode")?,
            "opcode",
            &[
                ("write", WrOpcode::Write),
                ("read", WrOpcode::Read),
                ("send", WrOpcode::Send),
            ],
        )?;
        let mr = p.name(p.required(t, "mr")?, "mr")?;
        let at = opt_addr(p, t, "at")?;
        let len = p.len(p.required(t, "len")?, "len")?;
        let (remote_mr, remote_at) = if opcode == WrOpcode::Send {
            (None, None)
        } else {
            (
                Some(p.name(p.required(t, "remote_mr")?, "remote_mr")?),
                opt_addr(p, t, "remote_at")?,
            )
        };
        let wr_id = t.get("wr_id").map(|v| p.uint(v, "wr_id")).transpose()?;
        let count = t.get("count").map(|v| p.uint(v, "count")).transpose()?;
        let random = match t.get("random") {
            Some(v) => p.boolean(v, "random")?,
            None => false,
        };
        Ok(Op::Rdma(RdmaOp::Post {
            random,
            qp,
            opcode,
            mr,
            at,
            len,
            remote_mr,
            remote_at,
            wr_id: wr_id.unwrap_or(0),
            count: count.unwrap_or(1),
        }))
    },
};

/// `rdma.post_recv`.
pub(crate) const POST_RECV: OpSpec = OpSpec {
    name: "rdma.post_recv",
    keys: &["qp", "mr", "at", "len", "wr_id"],
    expect_keys: &["errno"],
    doc_keys: "`qp`, `mr`, `at` (default the MR's start), `len`, `wr_id`",
    doc: "`ibv_post_recv`: a receive buffer for one SEND",
    parse: |p, t| {
        let qp = p.name(p.required(t, "qp")?, "qp")?;
        let mr = p.name(p.required(t, "mr")?, "mr")?;
        let at = opt_addr(p, t, "at")?;
        let len = p.len(p.required(t, "len")?, "len")?;
        let wr_id = t.get("wr_id").map(|v| p.uint(v, "wr_id")).transpose()?;
        Ok(Op::Rdma(RdmaOp::PostRecv {
            qp,
            mr,
            at,
            len,
            wr_id: wr_id.unwrap_or(0),
        }))
    },
};

/// `rdma.poll`.
pub(crate) const POLL: OpSpec = OpSpec {
    name: "rdma.poll",
    keys: &["qp", "count"],
    expect_keys: &["errno", "status"],
    doc_keys: "`qp`, `count` (default 1)",
    doc: "waits for `count` completions on the QP's CQ; `expect.status` checks their statuses, comma-separated \
          (`\"success\"`, `\"loc_prot_err\"`, `\"rem_access_err\"`, `\"rnr_retry_exc_err\"`, \
          `\"retry_exc_err\"`, `\"wr_flush_err\"`)",
    parse: |p, t| {
        let qp = p.name(p.required(t, "qp")?, "qp")?;
        let count = t.get("count").map(|v| p.uint(v, "count")).transpose()?;
        Ok(Op::Rdma(RdmaOp::Poll {
            qp,
            count: count.unwrap_or(1),
        }))
    },
};

/// `rdma.skip_fence`.
pub(crate) const SKIP_FENCE: OpSpec = OpSpec {
    name: "rdma.skip_fence",
    keys: &["dev"],
    expect_keys: &["errno"],
    doc_keys: "`dev`",
    doc: "test-only driver bug: the NIC's invalidations no longer wait for its in-flight DMA (the oracle \
          reports what lands after)",
    parse: |p, t| {
        Ok(Op::Rdma(RdmaOp::SkipFence {
            dev: p.name_ref(p.required(t, "dev")?, "dev", RefKind::PciDevice)?,
        }))
    },
};

fn opt_addr(p: &mut Parser<'_>, t: &Table<'_, '_>, key: &str) -> Result<Option<AddrExpr>> {
    t.get(key).map(|v| p.addr(v, key)).transpose()
}

fn access(p: &Parser<'_>, t: &Table<'_, '_>) -> Result<Access> {
    let mut a = Access::default();
    let Some(v) = t.get("access") else {
        return Ok(a);
    };
    let DeValue::Array(items) = v.get_ref() else {
        return Err(p.err(
            &v.span(),
            format!(
                "expected a list of access flags like `[\"local_write\", \"on_demand\"]`, found {}",
                describe(v.get_ref())
            ),
        ));
    };
    for item in items {
        a = a | p.keyword(
            item,
            "access",
            &[
                ("local_write", Access::LOCAL_WRITE),
                ("remote_write", Access::REMOTE_WRITE),
                ("remote_read", Access::REMOTE_READ),
                ("remote_atomic", Access::REMOTE_ATOMIC),
                ("on_demand", Access::ON_DEMAND),
                ("hugetlb", Access::HUGETLB),
            ],
        )?;
    }
    Ok(a)
}

/// The RDMA ops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RdmaOp {
    /// `rdma.reg_mr`.
    RegMr {
        /// The NIC.
        dev: String,
        /// A user range's start (`None`: implicit or dma-buf).
        at: Option<AddrExpr>,
        /// Length (`u64::MAX` for implicit).
        len: u64,
        /// A dma-buf MR's export.
        export: Option<String>,
        /// Offset in the export.
        offset: u64,
        /// Access flags.
        access: Access,
        /// The MR's name.
        name: String,
    },
    /// `rdma.dereg_mr`.
    DeregMr {
        /// The MR.
        mr: String,
    },
    /// `rdma.advise`.
    Advise {
        /// The MR.
        mr: String,
        /// The advice.
        advice: Advice,
        /// Start.
        at: AddrExpr,
        /// Length.
        len: u64,
        /// Synchronous.
        flush: bool,
    },
    /// `rdma.qp`.
    Qp {
        /// The NIC.
        dev: String,
        /// The QP's name.
        name: String,
        /// Its attributes.
        attr: QpAttr,
    },
    /// `rdma.connect`.
    Connect {
        /// This QP.
        qp: String,
        /// The other.
        peer: String,
    },
    /// `rdma.post`.
    Post {
        /// The QP.
        qp: String,
        /// The operation.
        opcode: WrOpcode,
        /// The local MR.
        mr: String,
        /// The local buffer's start (default the MR's).
        at: Option<AddrExpr>,
        /// Bytes.
        len: u64,
        /// The remote MR (WRITE, READ).
        remote_mr: Option<String>,
        /// The remote address (default the remote MR's start).
        remote_at: Option<AddrExpr>,
        /// The WR id.
        wr_id: u64,
        /// Times to post it.
        count: u64,
        /// Each WR at a random offset of the remote MR.
        random: bool,
    },
    /// `rdma.post_recv`.
    PostRecv {
        /// The QP.
        qp: String,
        /// The MR.
        mr: String,
        /// Start (default the MR's).
        at: Option<AddrExpr>,
        /// Bytes.
        len: u64,
        /// The WR id.
        wr_id: u64,
    },
    /// `rdma.poll`.
    Poll {
        /// The QP.
        qp: String,
        /// Completions to wait for.
        count: u64,
    },
    /// `rdma.skip_fence`.
    SkipFence {
        /// The NIC.
        dev: String,
    },
}

fn unknown(what: &'static str, name: &str) -> RunError {
    RunError::Rdma {
        what: format!("no {what} `{name}` at this point"),
    }
}

impl World {
    fn rnic(&self, dev: &str) -> std::result::Result<Rc<Rnic>, RunError> {
        self.rnics.get(dev).cloned().ok_or_else(|| RunError::Rdma {
            what: format!("device `{dev}` is not a `kind = \"rnic\"` device"),
        })
    }

    fn pd(&self, dev: &str, pid: Pid) -> std::result::Result<PdId, RunError> {
        let nic = self.rnic(dev)?;
        let mut names = self.rdma.borrow_mut();
        Ok(*names
            .pds
            .entry((dev.to_owned(), pid))
            .or_insert_with(|| nic.alloc_pd(pid)))
    }

    fn mr_named(&self, mr: &str) -> std::result::Result<(String, u32, Va, String, u64), RunError> {
        self.rdma
            .borrow()
            .mrs
            .get(mr)
            .cloned()
            .ok_or_else(|| unknown("MR", mr))
    }

    fn qp_named(&self, qp: &str) -> std::result::Result<(String, QpId, CqId), RunError> {
        self.rdma
            .borrow()
            .qps
            .get(qp)
            .cloned()
            .ok_or_else(|| unknown("QP", qp))
    }
}

/// Splits a NIC result into the step's errno or its value; an API misuse is a run error.
fn verbs<T>(r: std::result::Result<T, RnicError>) -> std::result::Result<Result2<T>, RunError> {
    match r {
        Ok(v) => Ok(Ok(v)),
        Err(RnicError::Errno(e)) => Ok(Err(e)),
        Err(e) => Err(RunError::Rdma {
            what: e.to_string(),
        }),
    }
}

type Result2<T> = std::result::Result<T, Errno>;

impl RdmaOp {
    /// Returns the op's name.
    pub const fn name(&self) -> &'static str {
        match self {
            Self::RegMr { .. } => REG_MR.name,
            Self::DeregMr { .. } => DEREG_MR.name,
            Self::Advise { .. } => ADVISE.name,
            Self::Qp { .. } => QP.name,
            Self::Connect { .. } => CONNECT.name,
            Self::Post { .. } => POST.name,
            Self::PostRecv { .. } => POST_RECV.name,
            Self::Poll { .. } => POLL.name,
            Self::SkipFence { .. } => SKIP_FENCE.name,
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
            Self::RegMr {
                dev,
                at,
                len,
                export,
                offset,
                access,
                name,
            } => {
                let nic = w.rnic(dev)?;
                let pd = w.pd(dev, pid)?;
                let (r, start) = if let Some(x) = export {
                    (
                        nic.reg_dmabuf_mr(pd, w.exports[x], *offset, *len, *access),
                        Va::from_raw(0),
                    )
                } else {
                    let va = match at {
                        Some(a) => w.resolve(proc_name, a)?.0,
                        None => Va::from_raw(0),
                    };
                    (nic.reg_mr(pd, va, *len, *access).await, va)
                };
                match verbs(r)? {
                    Ok(keys) => {
                        w.rdma.borrow_mut().mrs.insert(
                            name.clone(),
                            (dev.clone(), keys.lkey, start, proc_name.to_owned(), *len),
                        );
                    }
                    Err(e) => out.errno = Some(e),
                }
            }
            Self::DeregMr { mr } => {
                let (dev, lkey, _, _, _) = w.mr_named(mr)?;
                w.rdma.borrow_mut().mrs.remove(mr);
                out.errno = verbs(w.rnic(&dev)?.dereg_mr(lkey).await)?.err();
            }
            Self::Advise {
                mr,
                advice,
                at,
                len,
                flush,
            } => {
                let (dev, lkey, _, _, _) = w.mr_named(mr)?;
                let nic = w.rnic(&dev)?;
                let pd = w.pd(&dev, pid)?;
                let addr = w.resolve(proc_name, at)?.0;
                let sge = Sge {
                    lkey,
                    addr,
                    len: *len,
                };
                out.errno = verbs(nic.advise_mr(pd, *advice, *flush, &[sge]).await)?.err();
            }
            Self::Qp { dev, name, attr } => {
                let nic = w.rnic(dev)?;
                let pd = w.pd(dev, pid)?;
                let cq = nic.create_cq();
                match verbs(nic.create_qp(pd, cq, *attr))? {
                    Ok(qp) => {
                        w.rdma
                            .borrow_mut()
                            .qps
                            .insert(name.clone(), (dev.clone(), qp, cq));
                    }
                    Err(e) => out.errno = Some(e),
                }
            }
            Self::Connect { qp, peer } => {
                let (da, qa, _) = w.qp_named(qp)?;
                let (db, qb, _) = w.qp_named(peer)?;
                let (a, b) = (w.rnic(&da)?, w.rnic(&db)?);
                out.errno = verbs(a.connect(qa, &b, qb))?.err();
            }
            Self::Post {
                qp,
                opcode,
                mr,
                at,
                len,
                remote_mr,
                remote_at,
                wr_id,
                count,
                random,
            } => {
                let (dev, q, _) = w.qp_named(qp)?;
                let nic = w.rnic(&dev)?;
                let (_, lkey, start, _, _) = w.mr_named(mr)?;
                let addr = match at {
                    Some(a) => w.resolve(proc_name, a)?.0,
                    None => start,
                };
                let (remote_addr, rkey, rlen) = match remote_mr {
                    Some(rm) => {
                        let (_, rkey, rstart, owner, rlen) = w.mr_named(rm)?;
                        let ra = match remote_at {
                            Some(a) => w.resolve(&owner, a)?.0,
                            None => rstart,
                        };
                        (ra, rkey, rlen)
                    }
                    None => (Va::from_raw(0), 0, 0),
                };
                let slots = (rlen / len.max(&1)).max(1);
                for _ in 0..*count {
                    let remote_addr = if *random {
                        remote_addr.add(cx.rng.below(slots) * len)
                    } else {
                        remote_addr
                    };
                    let wr = SendWr {
                        wr_id: *wr_id,
                        opcode: *opcode,
                        sge: Sge {
                            lkey,
                            addr,
                            len: *len,
                        },
                        remote_addr,
                        rkey,
                    };
                    if let Err(e) = verbs(nic.post_send(q, wr))? {
                        out.errno = Some(e);
                        break;
                    }
                }
            }
            Self::PostRecv {
                qp,
                mr,
                at,
                len,
                wr_id,
            } => {
                let (dev, q, _) = w.qp_named(qp)?;
                let nic = w.rnic(&dev)?;
                let (_, lkey, start, _, _) = w.mr_named(mr)?;
                let addr = match at {
                    Some(a) => w.resolve(proc_name, a)?.0,
                    None => start,
                };
                let sge = Sge {
                    lkey,
                    addr,
                    len: *len,
                };
                out.errno = verbs(nic.post_recv(q, *wr_id, sge))?.err();
            }
            Self::Poll { qp, count } => {
                let (dev, _, cq) = w.qp_named(qp)?;
                let nic = w.rnic(&dev)?;
                let n = usize::try_from(*count).unwrap_or(usize::MAX);
                let wcs = verbs(nic.wait_cq(cq, n).await)?.unwrap_or_default();
                out.status = Some(
                    wcs.iter()
                        .map(|c| c.status.name())
                        .collect::<Vec<_>>()
                        .join(","),
                );
            }
            Self::SkipFence { dev } => w.rnic(dev)?.inject_skip_fence(true),
        }
        Ok(out)
    }
}
