//! The coherence oracle (DESIGN.md §7): checks every CPU and device access against the page tables and frame
//! states, and stops the run at the first violation with a report of what happened.
//!
//! Checks made here:
//! 1. **No stale translation** — a device reaches frame F for address v of process P only if P's page table
//!    maps v to F now, writable for a write, or the device holds a pin on F ([`crate::device_access`]:
//!    checked when a request is issued; while it is in flight the translation stays valid until the
//!    invalidation that removes it completes).
//! 2. **No use after free** — no CPU or device access reaches a free frame, nor (devices) a frame
//!    reallocated since the translation was made: frames carry an allocation generation
//!    ([`crate::device_access`]).
//! 3. **Pins hold** — a COW never replaces a pinned page in its mapping, and a device writing through a pin
//!    reaches a frame that is still allocated and pinned. Migration skips pinned pages and the allocator cannot
//!    free a frame whose refcount carries a pin bias, so those paths hold by construction.
//! 4. **Data integrity** — every read returns the last value written to that memory. The oracle keeps a
//!    content hash per *logical page* — `(process, virtual page)` for private anonymous memory and COWed
//!    pages, `(file, page offset)` for page-cache pages — updated on every write and carried over by fork
//!    (private pages) and COW; a read whose frame hashes differently from the logical page's record is a
//!    violation (a lost COW copy, a wrong frame, a torn migration). Unwritten anonymous memory must read zero.
//!    In token mode ([`crate::phys::DataMode::Token`]) the "hash" is the page's version stamp, so the same
//!    check compares versions. The records live in chunks of 64 logical pages (`oracle/shadow.rs`).
//! 6. **Protocol** — invalidations end as often as they start; a mirror never programs an entry after
//!    `read_retry` would have said retry ([`Oracle::mirror_install`]).
//! 7. **No access to a removed BAR** — after `revoke_mmio` no peer DMA may reach the MMIO range
//!    ([`crate::Kernel::mmio_read`] / `mmio_write`).

use std::fmt;

use peerdma_core::{Pid, Range, SimTime, Va};
use peerdma_sim::Sim;

use crate::phys::ZERO_HASH;

mod shadow;
use shadow::Shadow;

/// The identity of a page of memory independent of which frame holds it now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogicalPage {
    /// A private anonymous (or COWed) page of a process.
    Anon {
        /// The process.
        pid: Pid,
        /// Virtual page number.
        vpn: u64,
    },
    /// A page of a file or shmem object.
    File {
        /// The file.
        file: u32,
        /// Page offset.
        pgoff: u64,
    },
}

/// Which invariant was broken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ViolationKind {
    /// Check 1.
    StaleTranslation,
    /// Check 2.
    UseAfterFree,
    /// Check 3.
    PinBroken,
    /// Check 4.
    DataIntegrity,
    /// Check 5: a P2P access used an address or path its map type does not allow.
    Routing,
    /// Check 6.
    Protocol,
    /// An access reached a BAR after its provider removed (revoked) it (check 2 for memory without
    /// struct page).
    RemovedBar,
}

impl ViolationKind {
    /// Every kind, in check order.
    pub const ALL: &[ViolationKind] = &[
        ViolationKind::StaleTranslation,
        ViolationKind::UseAfterFree,
        ViolationKind::PinBroken,
        ViolationKind::DataIntegrity,
        ViolationKind::Routing,
        ViolationKind::Protocol,
        ViolationKind::RemovedBar,
    ];

    /// Returns the kind's identifier as scenario files write it (`stale_translation`).
    pub fn key(self) -> &'static str {
        match self {
            ViolationKind::StaleTranslation => "stale_translation",
            ViolationKind::UseAfterFree => "use_after_free",
            ViolationKind::PinBroken => "pin_broken",
            ViolationKind::DataIntegrity => "data_integrity",
            ViolationKind::Routing => "routing",
            ViolationKind::Protocol => "protocol",
            ViolationKind::RemovedBar => "removed_bar",
        }
    }
}

impl fmt::Display for ViolationKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ViolationKind::StaleTranslation => "stale translation",
            ViolationKind::UseAfterFree => "use after free",
            ViolationKind::PinBroken => "pin broken",
            ViolationKind::DataIntegrity => "data integrity",
            ViolationKind::Routing => "routing",
            ViolationKind::Protocol => "protocol",
            ViolationKind::RemovedBar => "removed bar",
        })
    }
}

/// One detected violation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// When.
    pub time: SimTime,
    /// The agent that made the access.
    pub agent: String,
    /// Which check.
    pub kind: ViolationKind,
    /// What happened: addresses, frames, where the translation came from.
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "oracle: {} at {} by {}: {}",
            self.kind, self.time, self.agent, self.detail
        )
    }
}

/// The oracle's state.
#[derive(Debug)]
pub struct Oracle {
    sim: Sim,
    enabled: bool,
    shadow: Shadow,
    violations: Vec<Violation>,
    /// The kind of violation a caller said is coming ([`Oracle::expect_violation`]).
    armed: Option<ViolationKind>,
    /// Violations of the armed kind seen while armed.
    expected: Vec<Violation>,
}

impl Oracle {
    /// Creates an enabled oracle.
    pub fn new(sim: Sim) -> Self {
        Self {
            sim,
            enabled: true,
            shadow: Shadow::default(),
            violations: Vec::new(),
            armed: None,
            expected: Vec::new(),
        }
    }

    /// Returns whether checks run.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Turns checks on or off (off for benchmarks of the model itself).
    pub fn set_enabled(&mut self, on: bool) {
        self.enabled = on;
    }

    /// Returns the violations found so far (the run stops at the first).
    pub fn violations(&self) -> &[Violation] {
        &self.violations
    }

    /// Records a violation and stops the simulation — unless it is of the kind armed with
    /// [`Oracle::expect_violation`], in which case it is kept apart as expected and the run goes on.
    pub fn violation(&mut self, kind: ViolationKind, detail: String) {
        let v = Violation {
            time: self.sim.now(),
            agent: self.sim.current_name(),
            kind,
            detail,
        };
        if self.armed == Some(kind) {
            self.expected.push(v);
            return;
        }
        self.sim.stop(v.to_string());
        self.violations.push(v);
    }

    /// Says that a violation of `kind` is coming (a scenario step that demonstrates what the oracle
    /// catches): until [`Oracle::take_expected`], violations of that kind are recorded as expected and do
    /// not stop the run; any other kind still does.
    pub fn expect_violation(&mut self, kind: ViolationKind) {
        self.armed = Some(kind);
        self.expected.clear();
    }

    /// Disarms [`Oracle::expect_violation`] and returns the expected violations seen since it was armed.
    pub fn take_expected(&mut self) -> Vec<Violation> {
        self.armed = None;
        std::mem::take(&mut self.expected)
    }

    /// Records that `page` now holds content with hash `h`.
    pub fn record(&mut self, page: LogicalPage, h: u64) {
        if h == ZERO_HASH && matches!(page, LogicalPage::Anon { .. }) {
            self.shadow.unset(page);
        } else {
            self.shadow.set(page, h);
        }
    }

    /// Returns the content hash `page` must have: anonymous pages never written are zero; file pages never
    /// recorded are unknown (`None`).
    pub fn expected(&self, page: LogicalPage) -> Option<u64> {
        match (self.shadow.get(page), page) {
            (Some(h), _) => Some(h),
            (None, LogicalPage::Anon { .. }) => Some(ZERO_HASH),
            (None, LogicalPage::File { .. }) => None,
        }
    }

    /// Checks a read of `page` that found content hash `h`.
    pub fn check_read(&mut self, page: LogicalPage, h: u64, what: impl FnOnce() -> String) {
        if !self.enabled {
            return;
        }
        if let Some(e) = self.expected(page)
            && e != h
        {
            self.violation(
                ViolationKind::DataIntegrity,
                format!(
                    "{}: content hash {h:#x}, last write left {e:#x} ({page:?})",
                    what()
                ),
            );
        }
    }

    /// Forgets private anonymous pages of `pid` inside `r` (munmap, MADV_DONTNEED, exit: they read zero again).
    pub fn forget_anon(&mut self, pid: Pid, r: Range<Va>) {
        self.shadow
            .take_anon(pid, r.start.page_number(), r.end.raw().div_ceil(4096));
    }

    /// Moves the private anonymous pages of `pid` in `from` to start at `to` (mremap).
    pub fn move_anon(&mut self, pid: Pid, from: Range<Va>, to: Va) {
        let moved =
            self.shadow
                .take_anon(pid, from.start.page_number(), from.end.raw().div_ceil(4096));
        let delta = to.page_number().wrapping_sub(from.start.page_number());
        for (vpn, h) in moved {
            self.shadow.set(
                LogicalPage::Anon {
                    pid,
                    vpn: vpn.wrapping_add(delta),
                },
                h,
            );
        }
    }

    /// Gives `child` a copy of `parent`'s private anonymous pages inside `r` (fork).
    pub fn copy_anon(&mut self, parent: Pid, child: Pid, r: Range<Va>) {
        let copies = self
            .shadow
            .anon_in(parent, r.start.page_number(), r.end.raw().div_ceil(4096));
        for (vpn, h) in copies {
            self.shadow.set(LogicalPage::Anon { pid: child, vpn }, h);
        }
    }

    /// Returns the host bytes the shadow holds (its chunks' payload; B-tree nodes not counted).
    pub fn host_bytes(&self) -> u64 {
        self.shadow.host_bytes()
    }

    /// Check 6: a mirror is about to program entries for a range whose subscription `retry` says must be
    /// retried.
    pub fn mirror_install(&mut self, retry: bool, what: impl FnOnce() -> String) {
        if self.enabled && retry {
            self.violation(
                ViolationKind::Protocol,
                format!("{} programmed device entries although read_retry says the range was invalidated", what()),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use peerdma_sim::SimConfig;

    /// An armed kind is kept apart and does not stop the run; any other kind still does; disarming returns
    /// what was seen.
    #[test]
    fn an_expected_violation_is_kept_apart_and_does_not_stop_the_run() {
        let sim = Sim::new(SimConfig::default());
        let mut o = Oracle::new(sim.clone());
        o.expect_violation(ViolationKind::StaleTranslation);
        o.violation(ViolationKind::StaleTranslation, "stale".into());
        assert!(o.violations().is_empty());
        assert!(sim.stopped().is_none());
        let seen = o.take_expected();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].kind, ViolationKind::StaleTranslation);
        o.violation(ViolationKind::StaleTranslation, "again".into());
        assert_eq!(o.violations().len(), 1, "disarmed: a violation again");
        assert!(sim.stopped().is_some());
    }

    #[test]
    fn another_kind_stops_the_run_while_armed() {
        let sim = Sim::new(SimConfig::default());
        let mut o = Oracle::new(sim.clone());
        o.expect_violation(ViolationKind::Routing);
        o.violation(ViolationKind::UseAfterFree, "uaf".into());
        assert_eq!(o.violations().len(), 1);
        assert!(o.take_expected().is_empty());
    }
}
