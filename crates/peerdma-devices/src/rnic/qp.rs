//! Queue pairs and completion queues: RC WRITE, READ and SEND, RNR and transport retries, completions
//! (drivers/infiniband/hw/mlx5/qp.c, cq.c; the InfiniBand RC transport rules).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;

use peerdma_core::{Errno, PAGE_SIZE, Range, SimDuration, Va};
use peerdma_sim::SimMutex;

use super::verbs::{
    Access, CqId, PdId, QpAttr, QpId, QpState, SendWr, Sge, Wc, WcStatus, WrOpcode,
};
use super::{Answer, Miss, Mr, Qp, RNR_RETRY_INFINITE, Rnic, RnicError, page_range};
impl Rnic {
    /// `ibv_create_cq`.
    pub fn create_cq(&self) -> CqId {
        let mut st = self.st.borrow_mut();
        let cq = CqId(st.next_cq);
        st.next_cq += 1;
        st.cqs.insert(cq, VecDeque::new());
        cq
    }

    /// `ibv_create_qp` (RC) on `pd`, completing on `cq`; it starts in RTS once connected.
    ///
    /// # Errors
    /// Unknown PD or CQ; `EINVAL` for `rnr_retry` or `retry_cnt` above 7 or `max_send_wr` 0.
    pub fn create_qp(&self, pd: PdId, cq: CqId, attr: QpAttr) -> Result<QpId, RnicError> {
        self.pd_pid(pd)?;
        if attr.rnr_retry > 7 || attr.retry_cnt > 7 || attr.max_send_wr == 0 {
            return Err(Errno::EINVAL.into());
        }
        let mut st = self.st.borrow_mut();
        if !st.cqs.contains_key(&cq) {
            return Err(RnicError::UnknownCq(cq.0));
        }
        let qp = QpId(st.next_qp);
        st.next_qp += 1;
        st.qps.insert(
            qp,
            Rc::new(Qp {
                pd,
                cq,
                attr,
                state: Cell::new(QpState::Rts),
                outstanding: Cell::new(0),
                remote: RefCell::new(None),
                recv: RefCell::default(),
                sq: SimMutex::new(&self.platform.kernel.sim, "rnic.sq"),
            }),
        );
        Ok(qp)
    }

    pub(super) fn qp(&self, qp: QpId) -> Result<Rc<Qp>, RnicError> {
        self.st
            .borrow()
            .qps
            .get(&qp)
            .cloned()
            .ok_or(RnicError::UnknownQp(qp.0))
    }

    /// Connects `qp` of this NIC with `rqp` of `remote` (both directions; `remote` may be this NIC).
    ///
    /// # Errors
    /// Unknown QPs.
    pub fn connect(
        self: &Rc<Self>,
        qp: QpId,
        remote: &Rc<Self>,
        rqp: QpId,
    ) -> Result<(), RnicError> {
        let a = self.qp(qp)?;
        let b = remote.qp(rqp)?;
        *a.remote.borrow_mut() = Some((Rc::downgrade(remote), rqp));
        *b.remote.borrow_mut() = Some((Rc::downgrade(self), qp));
        Ok(())
    }

    /// Returns a QP's state.
    ///
    /// # Errors
    /// [`RnicError::UnknownQp`].
    pub fn qp_state(&self, qp: QpId) -> Result<QpState, RnicError> {
        Ok(self.qp(qp)?.state.get())
    }

    /// `ibv_post_recv`: queues a receive buffer for SENDs.
    ///
    /// # Errors
    /// Unknown QP; `EINVAL` when the QP is in Error (the WR would be flushed).
    pub fn post_recv(&self, qp: QpId, wr_id: u64, sge: Sge) -> Result<(), RnicError> {
        let q = self.qp(qp)?;
        if q.state.get() == QpState::Error {
            return Err(Errno::EINVAL.into());
        }
        q.recv.borrow_mut().push_back((wr_id, sge));
        Ok(())
    }

    /// `ibv_post_send`: queues `wr`; it runs in the background, in order with the QP's other WRs, and
    /// completes on the QP's CQ.
    ///
    /// # Errors
    /// Unknown QP; [`RnicError::NotConnected`]; `ENOMEM` when `max_send_wr` WRs are outstanding.
    pub fn post_send(self: &Rc<Self>, qp: QpId, wr: SendWr) -> Result<(), RnicError> {
        let q = self.qp(qp)?;
        if q.remote.borrow().is_none() {
            return Err(RnicError::NotConnected(qp.0));
        }
        if q.outstanding.get() >= q.attr.max_send_wr {
            return Err(Errno::ENOMEM.into());
        }
        q.outstanding.set(q.outstanding.get() + 1);
        let me = self.clone();
        self.k()
            .sim
            .spawn(format!("rnic.{}.qp{}", self.dev.name, qp.0), async move {
                let g = q.sq.lock().await;
                let (status, bytes) = me.execute(&q, &wr).await;
                drop(g);
                q.outstanding.set(q.outstanding.get() - 1);
                me.complete(
                    q.cq,
                    Wc {
                        wr_id: wr.wr_id,
                        status,
                        opcode: Some(wr.opcode),
                        bytes,
                        at: me.k().sim.now(),
                    },
                );
            });
        Ok(())
    }

    pub(super) fn complete(&self, cq: CqId, wc: Wc) {
        self.k().sim.trace("rnic.wc", || {
            format!(
                "{} cq{} wr {} {}",
                self.dev.name,
                cq.0,
                wc.wr_id,
                wc.status.name()
            )
        });
        self.count(&format!("rnic.wc.{}", wc.status.name()), 1);
        if let Some(q) = self.st.borrow_mut().cqs.get_mut(&cq) {
            q.push_back(wc);
        }
        self.cq_wq.wake_up_all();
    }

    /// `ibv_poll_cq`: takes up to `max` completions.
    ///
    /// # Errors
    /// [`RnicError::UnknownCq`].
    pub fn poll_cq(&self, cq: CqId, max: usize) -> Result<Vec<Wc>, RnicError> {
        let mut st = self.st.borrow_mut();
        let q = st.cqs.get_mut(&cq).ok_or(RnicError::UnknownCq(cq.0))?;
        let n = max.min(q.len());
        Ok(q.drain(..n).collect())
    }

    /// Waits until `cq` holds at least `n` completions, then takes `n` of them.
    ///
    /// # Errors
    /// [`RnicError::UnknownCq`].
    pub async fn wait_cq(&self, cq: CqId, n: usize) -> Result<Vec<Wc>, RnicError> {
        if !self.st.borrow().cqs.contains_key(&cq) {
            return Err(RnicError::UnknownCq(cq.0));
        }
        self.cq_wq
            .wait_event(|| self.st.borrow().cqs.get(&cq).is_none_or(|q| q.len() >= n))
            .await;
        self.poll_cq(cq, n)
    }

    /// Checks a local SGE for `qp` (key, PD, range, local write for a destination).
    pub(super) fn local_mr(&self, q: &Qp, sge: &Sge, dest: bool) -> Option<(Rc<Mr>, Range<Va>)> {
        let mr = self.mr(sge.lkey).ok()?;
        let r = page_range(sge.addr, sge.len).ok()?;
        let ok = mr.pd == q.pd
            && mr.range.contains_range(&r)
            && (!dest || mr.access.contains(Access::LOCAL_WRITE));
        ok.then_some((mr, r))
    }

    pub(super) fn to_error(&self, q: &Qp) {
        if q.state.get() != QpState::Error {
            q.state.set(QpState::Error);
            self.count("rnic.qp_errors", 1);
        }
    }

    pub(super) async fn wire(&self, pages: u64) {
        let t = self.costs.wire_latency + self.costs.wire_page.saturating_mul(pages);
        self.k().sim.sleep(self.k().sim.jitter(t)).await;
    }

    /// Runs one send WR as the requester (module docs); returns its status and the bytes moved.
    pub(super) async fn execute(&self, q: &Qp, wr: &SendWr) -> (WcStatus, u64) {
        if q.state.get() == QpState::Error {
            return (WcStatus::WrFlushErr, 0);
        }
        let Some((remote, rqp)) = q
            .remote
            .borrow()
            .as_ref()
            .and_then(|(w, r)| w.upgrade().map(|w| (w, *r)))
        else {
            self.to_error(q);
            return (WcStatus::RetryExcErr, 0);
        };
        let dest = wr.opcode == WrOpcode::Read;
        let Some((mr, r)) = self.local_mr(q, &wr.sge, dest) else {
            self.to_error(q);
            return (WcStatus::LocProtErr, 0);
        };
        let pages = r.nr_pages();
        // The requester reads its source (WRITE, SEND): a requester fault stalls the QP until resolved.
        let payload = if dest {
            None
        } else {
            let Ok(d) = self.access(&mr, r.start, pages, None, Miss::Fault).await else {
                self.to_error(q);
                return (WcStatus::LocProtErr, 0);
            };
            Some(d)
        };
        let mut rnr_left = q.attr.rnr_retry;
        let mut retry_left = q.attr.retry_cnt;
        loop {
            // Request packet(s) out.
            self.wire(if dest { 0 } else { pages }).await;
            let answer = remote.respond(rqp, wr, pages, payload.as_deref()).await;
            match answer {
                Answer::Ack(data) => {
                    // The ACK, or the READ response's data.
                    self.wire(if dest { pages } else { 0 }).await;
                    if dest
                        && self
                            .access(&mr, r.start, pages, Some(&data), Miss::Fault)
                            .await
                            .is_err()
                    {
                        self.to_error(q);
                        return (WcStatus::LocProtErr, 0);
                    }
                    return (WcStatus::Success, r.len());
                }
                Answer::Rnr => {
                    self.count("rnic.rnr_naks", 1);
                    self.wire(0).await;
                    if q.attr.rnr_retry != RNR_RETRY_INFINITE {
                        if rnr_left == 0 {
                            self.to_error(q);
                            return (WcStatus::RnrRetryExcErr, 0);
                        }
                        rnr_left -= 1;
                    }
                    let t = self.costs.rnr_timer.max(SimDuration::from_nanos(1));
                    self.k().sim.sleep(t).await;
                }
                Answer::Drop => {
                    self.count("rnic.transport_retries", 1);
                    if retry_left == 0 {
                        self.to_error(q);
                        return (WcStatus::RetryExcErr, 0);
                    }
                    retry_left -= 1;
                    let t = self.costs.ack_timeout.max(SimDuration::from_nanos(1));
                    self.k().sim.sleep(t).await;
                }
                Answer::AccessErr => {
                    self.count("rnic.remote_access_errors", 1);
                    self.wire(0).await;
                    self.to_error(q);
                    if let Ok(rq) = remote.qp(rqp) {
                        remote.to_error(&rq);
                    }
                    return (WcStatus::RemAccessErr, 0);
                }
            }
        }
    }

    /// The responder's handling of one request packet of `wr` on its QP `qp`.
    pub(super) async fn respond(
        &self,
        qp: QpId,
        wr: &SendWr,
        pages: u64,
        payload: Option<&[u8]>,
    ) -> Answer {
        let Ok(q) = self.qp(qp) else {
            return Answer::AccessErr;
        };
        if q.state.get() == QpState::Error {
            return Answer::AccessErr;
        }
        let (mr, r, right) = match wr.opcode {
            WrOpcode::Send => {
                let Some(&(_, sge)) = q.recv.borrow().front() else {
                    self.count("rnic.rnr_no_recv", 1);
                    return Answer::Rnr;
                };
                if sge.len < pages * PAGE_SIZE {
                    return Answer::AccessErr;
                }
                let Some((mr, _)) = self.local_mr(&q, &sge, true) else {
                    return Answer::AccessErr;
                };
                let r = Range::from_len(sge.addr, pages * PAGE_SIZE).expect("checked");
                (mr, r, Access::LOCAL_WRITE)
            }
            WrOpcode::Write | WrOpcode::Read => {
                let Ok(mr) = self.mr(wr.rkey) else {
                    return Answer::AccessErr;
                };
                let right = if wr.opcode == WrOpcode::Write {
                    Access::REMOTE_WRITE
                } else {
                    Access::REMOTE_READ
                };
                let Some(r) = Range::from_len(wr.remote_addr, pages * PAGE_SIZE) else {
                    return Answer::AccessErr;
                };
                if mr.pd != q.pd
                    || !mr.range.contains_range(&r)
                    || !wr.remote_addr.is_page_aligned()
                {
                    return Answer::AccessErr;
                }
                (mr, r, right)
            }
        };
        if !mr.access.contains(right) {
            return Answer::AccessErr;
        }
        // A fault of this range failed earlier: the driver resumed the QP with error.
        let failed = mr
            .failed
            .borrow()
            .range(r.start.page_number()..r.end.page_number())
            .next()
            .is_some();
        if failed {
            mr.failed.borrow_mut().clear();
            return Answer::AccessErr;
        }
        let is_read = wr.opcode == WrOpcode::Read;
        match self.access(&mr, r.start, pages, payload, Miss::Stop).await {
            Ok(data) => {
                if wr.opcode == WrOpcode::Send {
                    let (wr_id, _) = q.recv.borrow_mut().pop_front().expect("checked");
                    self.complete(
                        q.cq,
                        Wc {
                            wr_id,
                            status: WcStatus::Success,
                            opcode: None,
                            bytes: r.len(),
                            at: self.k().sim.now(),
                        },
                    );
                }
                Answer::Ack(data)
            }
            Err(Errno::EAGAIN) => {
                self.count("rnic.responder_faults", 1);
                self.background_fault(&mr, r, !is_read);
                if is_read { Answer::Drop } else { Answer::Rnr }
            }
            Err(_) => Answer::AccessErr,
        }
    }

    /// Starts the page-fault work of a responder fault (one at a time per MR); a failure is remembered.
    pub(super) fn background_fault(&self, mr: &Rc<Mr>, r: Range<Va>, write: bool) {
        if mr.pending.get() > 0 {
            return;
        }
        mr.pending.set(1);
        let mr = mr.clone();
        let me_k = self.platform.kernel.clone();
        let service = self.costs.fault_service;
        // Resolve the umems now (a child is created even by a fault that then fails).
        let mut umems = Vec::new();
        let mut va = r.start;
        while va < r.end {
            match self.umem_for(&mr, va) {
                Ok(u) => {
                    let end = r.end.min(u.umem().range.end);
                    umems.push((u, Range::new(va, end)));
                    va = end;
                }
                Err(e) => {
                    mr.failed.borrow_mut().insert(va.page_number(), e);
                    mr.pending.set(0);
                    return;
                }
            }
        }
        self.count("rnic.odp_faults", 1);
        let name = format!("rnic.{}.page_fault", self.dev.name);
        self.k().sim.spawn(name, async move {
            me_k.sim.sleep(service).await;
            for (u, rr) in umems {
                match u.fault(rr, write).await {
                    Ok(()) | Err(Errno::EAGAIN) => {}
                    Err(e) => {
                        mr.failed.borrow_mut().insert(rr.start.page_number(), e);
                        break;
                    }
                }
            }
            mr.pending.set(0);
        });
    }
}
