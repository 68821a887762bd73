//! Checking a step against its `expect`: the counters and notifier events observed around it, its
//! outcome (errno, signal, data, segments...) and the one-line summary the report shows.

use std::fmt::Write as _;

use peerdma_core::{Errno, SimTime};

use crate::ast::{Expect, Step};
use crate::error::RunError;
use crate::report::{ExpectFailure, StepRecord};

use super::{StepResult, World};

/// What a step's `expect.counters` / `expect.events` look at: counter values and mirrors' event logs
/// (before the step), or their growth (after it), plus what could not be observed.
#[derive(Debug, Default)]
pub(crate) struct Observed {
    counters: Vec<u64>,
    events: Vec<Vec<peerdma_mm::NotifierEvent>>,
    errors: Vec<String>,
}

/// Prints events as `expect.events` spells them: `[clear, protection_page]`.
pub(super) fn events_text(events: &[peerdma_mm::NotifierEvent]) -> String {
    let names: Vec<&str> = events
        .iter()
        .map(|e| match e {
            peerdma_mm::NotifierEvent::Unmap => "unmap",
            peerdma_mm::NotifierEvent::Clear => "clear",
            peerdma_mm::NotifierEvent::ProtectionVma => "protection_vma",
            peerdma_mm::NotifierEvent::ProtectionPage => "protection_page",
            peerdma_mm::NotifierEvent::SoftDirty => "soft_dirty",
            peerdma_mm::NotifierEvent::Release => "release",
            peerdma_mm::NotifierEvent::Migrate => "migrate",
            peerdma_mm::NotifierEvent::Exclusive => "exclusive",
        })
        .collect();
    format!("[{}]", names.join(", "))
}

impl World {
    /// What `expect.counters` and `expect.events` compare, read before the step runs: each named counter's
    /// value and the number of events each named device file's mirror had seen.
    pub(super) fn observe(&self, proc_name: &str, e: &Expect) -> Observed {
        if e.counters.is_empty() && e.events.is_empty() {
            return Observed::default();
        }
        let m = self.kernel.sim.metrics();
        Observed {
            counters: e.counters.iter().map(|(n, _)| m.get(n)).collect(),
            events: e
                .events
                .iter()
                .map(|(fd, _)| {
                    let procs = self.procs.borrow();
                    procs[proc_name]
                        .fds
                        .get(fd)
                        .map(|f| f.events())
                        .unwrap_or_default()
                })
                .collect(),
            errors: Vec::new(),
        }
    }

    /// The counters' growth and the events seen since `before` (same order as the expectation's lists).
    pub(super) fn observed_since(
        &self,
        proc_name: &str,
        e: &Expect,
        before: &Observed,
    ) -> Observed {
        if e.counters.is_empty() && e.events.is_empty() {
            return Observed::default();
        }
        let now = self.observe(proc_name, e);
        let mut errors = Vec::new();
        let events = e
            .events
            .iter()
            .zip(now.events.iter().zip(&before.events))
            .map(|((fd, _), (now, then))| {
                let known = self.procs.borrow()[proc_name].fds.contains_key(fd);
                if !known {
                    errors.push(format!(
                        "`events.{fd}`: no open device file `{fd}` in `{proc_name}`"
                    ));
                }
                now.get(then.len()..).unwrap_or_default().to_vec()
            })
            .collect();
        Observed {
            counters: now
                .counters
                .iter()
                .zip(&before.counters)
                .map(|(n, b)| n.saturating_sub(*b))
                .collect(),
            events,
            errors,
        }
    }

    /// Checks a step's result against its `expect` and records the outcome.
    pub(super) fn check(
        &self,
        thread: &str,
        step: &Step,
        res: &Result<StepResult, RunError>,
        start: SimTime,
        observed: &Observed,
    ) {
        let mut fails = Vec::new();
        fails.extend(observed.errors.iter().cloned());
        for ((name, want), got) in step.expect.counters.iter().zip(&observed.counters) {
            if got != want {
                fails.push(format!(
                    "expected counter `{name}` to grow by {want}, it grew by {got}"
                ));
            }
        }
        for ((fd, want), got) in step.expect.events.iter().zip(&observed.events) {
            if got != want {
                fails.push(format!(
                    "expected the mirror of `{fd}` to see {}, it saw {}",
                    events_text(want),
                    events_text(got)
                ));
            }
        }
        let e: &Expect = &step.expect;
        // Disarm the oracle whatever happened; what it saw is checked below.
        let seen = e.violation.map(|_| self.kernel.take_expected_violations());
        let summary;
        match res {
            Err(err) => {
                summary = format!("error: {err}");
                if err.is_limit() {
                    self.kernel.sim.limit_reached(format!(
                        "{}:{}: step `{}` of thread `{thread}`: {err}",
                        self.scn.path,
                        step.loc,
                        step.op.name()
                    ));
                }
                fails.push(err.to_string());
            }
            Ok(r) => {
                summary = summarize(r);
                if let (Some(kind), Some(seen)) = (e.violation, &seen) {
                    if seen.is_empty() {
                        fails.push(format!(
                            "expected the oracle to report a {kind} violation, it reported none"
                        ));
                    } else {
                        self.kernel
                            .sim
                            .count("oracle.expected_violations", seen.len() as u64);
                    }
                }
                let want_errno = e.errno.unwrap_or(None);
                *self.expectations.borrow_mut() += 1;
                if r.errno != want_errno && !e.any_errno {
                    let why = r
                        .misuse
                        .as_ref()
                        .map_or_else(String::new, |m| format!(" ({m})"));
                    fails.push(format!(
                        "expected {}, got {}{why}",
                        errno_text(want_errno),
                        errno_text(r.errno)
                    ));
                }
                match (e.signal, r.signal) {
                    (None, Some(s)) => fails.push(format!("unexpected {s}")),
                    (Some(want), None) => {
                        fails.push(format!("expected {}, the access completed", want.name()));
                    }
                    (Some(want), Some(got)) if want != got.signo => {
                        fails.push(format!("expected {}, got {got}", want.name()));
                    }
                    _ => {}
                }
                if r.errno.is_none() {
                    if let Some(want) = e.cpages {
                        let got = r.dm.as_ref().map_or(0, |d| d.cpages);
                        if got != want {
                            fails.push(format!("expected cpages = {want}, got {got}"));
                        }
                    }
                    if let Some(want) = e.faults {
                        let got = r.dm.as_ref().map_or(0, |d| d.faults);
                        if got != want {
                            fails.push(format!("expected faults = {want}, got {got}"));
                        }
                    }
                    if let Some(d) = &r.data
                        && !e.data_one_of.is_empty()
                        && !e.data_one_of.iter().any(|p| p.check(d).is_ok())
                    {
                        let names: Vec<String> =
                            e.data_one_of.iter().map(|p| format!("`{p}`")).collect();
                        fails.push(format!(
                            "data matches none of {} (first bytes {:02x?})",
                            names.join(", "),
                            &d[..d.len().min(8)]
                        ));
                    }
                    if let (Some(p), Some(d)) = (&e.data, &r.data)
                        && let Err(m) = p.check(d)
                    {
                        fails.push(format!(
                            "data differs from `{p}` at byte {:#x}: expected {:02x?}, found {:02x?}",
                            m.offset, m.expected, m.found
                        ));
                    }
                    if let (Some(want), Some(d)) = (&e.bytes, &r.data)
                        && want != d
                    {
                        let i = want
                            .iter()
                            .zip(d)
                            .position(|(a, b)| a != b)
                            .unwrap_or(want.len().min(d.len()));
                        fails.push(format!(
                            "snapshot byte {i}: expected {}, got {} (expected {} bytes, got {})",
                            want.get(i).map_or("none".into(), |b| format!("{b:#04x}")),
                            d.get(i).map_or("none".into(), |b| format!("{b:#04x}")),
                            want.len(),
                            d.len()
                        ));
                    }
                    if let Some(want) = &e.segments {
                        let got = r.segments.clone().unwrap_or_default();
                        if *want != got {
                            let show = |v: &[(String, u64)]| {
                                v.iter()
                                    .map(|(k, l)| format!("{k}:{}", crate::units::format_size(*l)))
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            };
                            fails.push(format!(
                                "expected segments [{}], got [{}]",
                                show(want),
                                show(&got)
                            ));
                        }
                    }
                    if let Some(want) = e.pinned {
                        let got = r.pinned.unwrap_or(0);
                        if got != want {
                            fails.push(format!("expected pinned = {want}, got {got}"));
                        }
                    }
                    for (key, bounds, got) in [
                        ("atc_hit_pct", e.atc_hit_pct, r.sva_stats.map(|s| s.0)),
                        (
                            "translation_requests",
                            e.translation_requests,
                            r.sva_stats.map(|s| s.1),
                        ),
                    ] {
                        if let Some((lo, hi)) = bounds {
                            let got = got.unwrap_or(0);
                            if !(lo..=hi).contains(&got) {
                                fails.push(format!("expected {key} in [{lo}, {hi}], got {got}"));
                            }
                        }
                    }
                    if let Some(want) = e.dma_addr
                        && r.dma_addr != Some(want)
                    {
                        fails.push(format!(
                            "expected dma_addr {want:#x}, got {}",
                            r.dma_addr
                                .map_or_else(|| "no segment".to_owned(), |a| format!("{a:#x}"))
                        ));
                    }
                    if let Some(want) = &e.status
                        && r.status.as_ref() != Some(want)
                    {
                        fails.push(format!(
                            "expected status {want}, got {}",
                            r.status.as_deref().unwrap_or("none")
                        ));
                    }
                    if let (Some(want), Some(d)) = (e.value, &r.data) {
                        let mut w = [0u8; 8];
                        let n = d.len().min(8);
                        w[..n].copy_from_slice(&d[..n]);
                        let got = u64::from_le_bytes(w);
                        if got != want {
                            fails.push(format!("expected value {want:#x}, got {got:#x}"));
                        }
                    }
                }
            }
        }
        let sim = &self.kernel.sim;
        if let Some(want) = e.duration {
            let got = sim.now() - start;
            if !e.tolerance.accepts(want.as_nanos(), got.as_nanos()) {
                fails.push(format!(
                    "expected a duration of {want} ({}), took {got}",
                    e.tolerance
                ));
            }
        }
        for message in &fails {
            self.failures.borrow_mut().push(ExpectFailure {
                line: step.loc.line,
                col: step.loc.col,
                thread: thread.to_owned(),
                op: step.op.name().to_owned(),
                time: sim.now(),
                message: message.clone(),
            });
        }
        if self.step_log {
            self.records.borrow_mut().push(StepRecord {
                start,
                end: sim.now(),
                thread: thread.to_owned(),
                op: step.op.name().to_owned(),
                line: step.loc.line,
                result: summary,
                ok: fails.is_empty(),
            });
        }
    }
}

pub(super) fn errno_text(e: Option<Errno>) -> String {
    e.map_or_else(|| "success".to_owned(), |e| format!("-{}", e.name()))
}

pub(super) fn summarize(r: &StepResult) -> String {
    let mut s = errno_text(r.errno);
    if let Some(sig) = r.signal {
        s = sig.to_string();
    }
    if let Some(d) = &r.dm {
        let _ = write!(s, " cpages={} faults={}", d.cpages, d.faults);
    }
    if let Some(segs) = &r.segments {
        let _ = write!(s, " pinned={} segments=[", r.pinned.unwrap_or(0));
        for (i, (k, l)) in segs.iter().enumerate() {
            let _ = write!(
                s,
                "{}{k}:{}",
                if i == 0 { "" } else { ", " },
                crate::units::format_size(*l)
            );
        }
        s.push(']');
        if let Some(a) = r.dma_addr {
            let _ = write!(s, " dma_addr={a:#x}");
        }
    }
    if let Some(st) = &r.status {
        let _ = write!(s, " status={st}");
    }
    if let Some(n) = &r.note {
        let _ = write!(s, " {n}");
    }
    s
}
