//! SVA binding: PASIDs, SVA domains and attach handles (drivers/iommu/iommu-sva.c, current mainline).
//!
//! Shared virtual addressing lets a device use a process's virtual addresses: the IOMMU translates
//! requests tagged with a PASID by walking that process's CPU page table. This module is the bookkeeping
//! of `iommu_sva_bind_device` / `iommu_sva_unbind_device`; the translation itself, the device ATC and the
//! page requests live in [`crate::ats`], [`crate::pri`] and the device layer.
//!
//! Rules (`iommu_sva_bind_device`), checked **in this order**, each failing with Linux's errno:
//! 1. the device has no IOMMU group → `ENODEV`;
//! 2. the mm's page tables are not usable by the IOMMU (`arch_pgtable_dma_compat`, e.g. x86 LAM) → `EBUSY`;
//! 3. **one global PASID per mm**: if the mm already has one and it is `>= max_pasids` of this device →
//!    `EOVERFLOW`; if it has none, one is allocated from the global allocator below the device's
//!    `max_pasids` (`iommu_alloc_global_pasid`) → `ENOSPC` when none is free. The PASID then stays with the
//!    mm until the mm is torn down *and* no SVA domain holds it (the domain's `mmgrab`), so a PASID is never
//!    reused while a translation through it may remain;
//! 4. an attach handle already exists for (group, PASID): held by a non-SVA domain (or another mm) →
//!    `EBUSY`; same mm → its `users` count grows and the **same handle** comes back;
//! 5. otherwise the mm's existing SVA domain for this IOMMU instance is attached, or a new one is allocated
//!    (`domain_alloc_sva`, `EOPNOTSUPP` when the driver has none). SVA domains are per (IOMMU instance,
//!    mm) and shared by every device of that instance bound to the mm.
//!
//! Unbind drops a user; at zero the PASID is detached from the group (its PASID-table entry goes) and the
//! domain loses a user, being freed at zero. *Precondition* (the PCIe PASID stop protocol): the device has
//! stopped issuing requests with that PASID and its page requests were drained — the device layer does that.
//!
//! Process exit (`release` of the SVA mm notifier): every PASID-table entry of the mm's domains becomes an
//! entry that faults everything, so later requests abort ([`PasidEntry::Aborting`]).

use std::collections::{BTreeMap, BTreeSet};

use peerdma_core::{DeviceId, Errno, Pid};

/// A process address space identifier (PCIe PASID, 20 bits at most).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pasid(pub u32);

/// `IOMMU_NO_PASID`: PASID 0 is the device's requests without a PASID; global PASIDs start at 1
/// (`IOMMU_FIRST_GLOBAL_PASID`).
pub const FIRST_GLOBAL_PASID: u32 = 1;

/// Identifies an attach handle (an SVA bond) returned by [`Sva::bind`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SvaHandle(pub u64);

/// Identifies an SVA domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SvaDomainId(pub u64);

/// A misuse of the SVA API. Linux's own failures are [`SvaError::Errno`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SvaError {
    /// A failure `iommu_sva_bind_device` returns in Linux (module docs).
    #[error("sva bind failed: {0}")]
    Errno(Errno),
    /// The device was never added with [`Sva::add_device`].
    #[error("unknown device {0:?}")]
    UnknownDevice(DeviceId),
    /// No such attach handle (already unbound).
    #[error("unknown sva handle {0:?}")]
    UnknownHandle(SvaHandle),
    /// A device was added twice.
    #[error("device {0:?} added twice")]
    DuplicateDevice(DeviceId),
}

/// Result alias of this module.
pub type SvaResult<T> = Result<T, SvaError>;

/// What the IOMMU knows about one device (the knobs the errnos of the module docs need).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SvaDeviceInfo {
    /// Its IOMMU group (`None`: no group → `ENODEV`).
    pub group: Option<u32>,
    /// The IOMMU instance (unit) it sits behind.
    pub iommu: u32,
    /// `dev->iommu->max_pasids` (PASIDs the device supports: `1 << pasid_bits`).
    pub max_pasids: u32,
    /// Whether the IOMMU driver implements `domain_alloc_sva` (`EOPNOTSUPP` otherwise).
    pub domain_alloc_sva: bool,
}

/// A PASID-table entry as the IOMMU sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PasidEntry {
    /// Translates through the page table of this process.
    Valid(Pid),
    /// The process is gone: every request with this PASID aborts (the "fault everything" CD / PASID entry
    /// written at `release`).
    Aborting(Pid),
}

/// One bond: the attach handle of (group, PASID).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SvaBond {
    /// The handle.
    pub handle: SvaHandle,
    /// The mm's PASID (`iommu_sva_get_pasid`).
    pub pasid: Pasid,
    /// The SVA domain attached.
    pub domain: SvaDomainId,
    /// `true` when this bind created the handle, `false` when it took one more user of an existing one.
    pub new: bool,
}

#[derive(Clone, Debug)]
struct Handle {
    group: u32,
    pasid: Pasid,
    mm: Pid,
    domain: SvaDomainId,
    users: u32,
}

#[derive(Clone, Debug)]
struct Domain {
    iommu: u32,
    mm: Pid,
    /// Attached (group, PASID) slots.
    users: u32,
}

/// The SVA state of a machine: the global PASID allocator, the mms' PASIDs, SVA domains, attach handles
/// and PASID tables (module docs).
#[derive(Clone, Debug)]
pub struct Sva {
    /// Global PASIDs available: `[FIRST_GLOBAL_PASID, pasid_limit)`.
    pasid_limit: u32,
    /// The global PASIDs in use (`iommu_global_pasid_ida`): an IDA hands out the lowest free ID, so only the
    /// used ones are kept (the free space is `1 << 20` IDs).
    used_pasids: BTreeSet<u32>,
    devices: BTreeMap<DeviceId, SvaDeviceInfo>,
    /// `mm->iommu_mm->pasid`.
    mm_pasid: BTreeMap<Pid, Pasid>,
    /// Processes whose mm was released (exit) but whose PASID a domain still holds.
    released: BTreeSet<Pid>,
    /// Mms whose page tables the IOMMU cannot walk (`arch_pgtable_dma_compat` fails).
    incompatible: BTreeSet<Pid>,
    /// (group, PASID) slots held by a non-SVA domain (e.g. a driver's own PASID domain).
    foreign_slots: BTreeSet<(u32, Pasid)>,
    handles: BTreeMap<SvaHandle, Handle>,
    by_slot: BTreeMap<(u32, Pasid), SvaHandle>,
    domains: BTreeMap<SvaDomainId, Domain>,
    next_id: u64,
    /// PASID-table entries per (group, PASID).
    table: BTreeMap<(u32, Pasid), PasidEntry>,
}

impl Sva {
    /// Creates the state with a global PASID space of `nr_pasids` (PASIDs `1..nr_pasids`; PCIe allows
    /// `1 << 20`).
    pub fn new(nr_pasids: u32) -> Self {
        Self {
            pasid_limit: nr_pasids,
            used_pasids: BTreeSet::new(),
            devices: BTreeMap::new(),
            mm_pasid: BTreeMap::new(),
            released: BTreeSet::new(),
            incompatible: BTreeSet::new(),
            foreign_slots: BTreeSet::new(),
            handles: BTreeMap::new(),
            by_slot: BTreeMap::new(),
            domains: BTreeMap::new(),
            next_id: 1,
            table: BTreeMap::new(),
        }
    }

    /// Adds a device (`iommu_probe_device` with its PASID capability).
    ///
    /// # Errors
    /// [`SvaError::DuplicateDevice`] when it was added before.
    pub fn add_device(&mut self, dev: DeviceId, info: SvaDeviceInfo) -> SvaResult<()> {
        if self.devices.insert(dev, info).is_some() {
            return Err(SvaError::DuplicateDevice(dev));
        }
        Ok(())
    }

    /// Returns what the IOMMU knows about `dev`.
    pub fn device(&self, dev: DeviceId) -> Option<SvaDeviceInfo> {
        self.devices.get(&dev).copied()
    }

    /// Marks `mm`'s page tables as unusable by the IOMMU (x86 LAM in use: `arch_pgtable_dma_compat`).
    pub fn set_mm_incompatible(&mut self, mm: Pid, incompatible: bool) {
        if incompatible {
            self.incompatible.insert(mm);
        } else {
            self.incompatible.remove(&mm);
        }
    }

    /// Attaches a non-SVA domain to (group, PASID) (a driver's own PASID use), so an SVA bind that lands
    /// on that slot fails with `EBUSY`.
    pub fn attach_non_sva(&mut self, group: u32, pasid: Pasid) {
        self.foreign_slots.insert((group, pasid));
    }

    /// Returns the PASID `mm` holds, if any.
    pub fn mm_pasid(&self, mm: Pid) -> Option<Pasid> {
        self.mm_pasid.get(&mm).copied()
    }

    /// Returns the number of global PASIDs free.
    pub fn nr_free_pasids(&self) -> usize {
        let space = self.pasid_limit.saturating_sub(FIRST_GLOBAL_PASID) as usize;
        space - self.used_pasids.len()
    }

    /// Returns the number of SVA domains.
    pub fn nr_domains(&self) -> usize {
        self.domains.len()
    }

    /// `iommu_sva_bind_device(dev, mm)` (module docs, steps 1–5).
    ///
    /// # Errors
    /// [`SvaError::Errno`] with `ENODEV`, `EBUSY`, `EOVERFLOW`, `ENOSPC` or `EOPNOTSUPP` as Linux returns
    /// them; [`SvaError::UnknownDevice`] for a device never added.
    pub fn bind(&mut self, dev: DeviceId, mm: Pid) -> SvaResult<SvaBond> {
        let info = self.device(dev).ok_or(SvaError::UnknownDevice(dev))?;
        let errno = |e| Err(SvaError::Errno(e));
        // Step 1.
        let Some(group) = info.group else {
            return errno(Errno::ENODEV);
        };
        // Step 2.
        if self.incompatible.contains(&mm) {
            return errno(Errno::EBUSY);
        }
        // Step 3.
        let pasid = match self.mm_pasid(mm) {
            Some(p) if p.0 >= info.max_pasids => return errno(Errno::EOVERFLOW),
            Some(p) => p,
            None => {
                let limit = info.max_pasids.min(self.pasid_limit);
                let Some(p) = self.lowest_free_pasid(limit) else {
                    return errno(Errno::ENOSPC);
                };
                self.used_pasids.insert(p);
                self.mm_pasid.insert(mm, Pasid(p));
                Pasid(p)
            }
        };
        // Step 4.
        if self.foreign_slots.contains(&(group, pasid)) {
            return errno(Errno::EBUSY);
        }
        if let Some(&h) = self.by_slot.get(&(group, pasid)) {
            let handle = self.handles.get_mut(&h).expect("by_slot follows handles");
            if handle.mm != mm {
                return errno(Errno::EBUSY);
            }
            handle.users += 1;
            return Ok(SvaBond {
                handle: h,
                pasid,
                domain: handle.domain,
                new: false,
            });
        }
        // Step 5.
        let existing = self
            .domains
            .iter()
            .find(|(_, d)| d.mm == mm && d.iommu == info.iommu)
            .map(|(id, _)| *id);
        let domain = match existing {
            Some(id) => id,
            None if !info.domain_alloc_sva => return errno(Errno::EOPNOTSUPP),
            None => {
                let id = SvaDomainId(self.next_id);
                self.next_id += 1;
                self.domains.insert(
                    id,
                    Domain {
                        iommu: info.iommu,
                        mm,
                        users: 0,
                    },
                );
                id
            }
        };
        self.domains
            .get_mut(&domain)
            .expect("found or inserted")
            .users += 1;
        let h = SvaHandle(self.next_id);
        self.next_id += 1;
        self.handles.insert(
            h,
            Handle {
                group,
                pasid,
                mm,
                domain,
                users: 1,
            },
        );
        self.by_slot.insert((group, pasid), h);
        let entry = if self.released.contains(&mm) {
            PasidEntry::Aborting(mm)
        } else {
            PasidEntry::Valid(mm)
        };
        self.table.insert((group, pasid), entry);
        Ok(SvaBond {
            handle: h,
            pasid,
            domain,
            new: true,
        })
    }

    /// `iommu_sva_unbind_device`: drops one user of `handle`; returns `true` when that was the last one and
    /// the PASID was detached from the group (the caller drained the device's requests first).
    ///
    /// # Errors
    /// [`SvaError::UnknownHandle`] for a handle already gone.
    pub fn unbind(&mut self, handle: SvaHandle) -> SvaResult<bool> {
        let h = self
            .handles
            .get_mut(&handle)
            .ok_or(SvaError::UnknownHandle(handle))?;
        h.users -= 1;
        if h.users > 0 {
            return Ok(false);
        }
        let h = self.handles.remove(&handle).expect("just seen");
        self.by_slot.remove(&(h.group, h.pasid));
        self.table.remove(&(h.group, h.pasid));
        let d = self
            .domains
            .get_mut(&h.domain)
            .expect("a handle holds its domain");
        d.users -= 1;
        if d.users == 0 {
            self.domains.remove(&h.domain);
            self.maybe_drop_pasid(h.mm);
        }
        Ok(true)
    }

    /// The SVA mm notifier's `release` (process exit): every PASID-table entry of `mm` now faults
    /// everything. Returns the (group, PASID) entries changed. The PASID is freed once no domain holds the
    /// mm (`mm_pasid_drop` after the last `mmdrop`).
    pub fn mm_release(&mut self, mm: Pid) -> Vec<(u32, Pasid)> {
        self.released.insert(mm);
        let mut changed = Vec::new();
        for (slot, e) in &mut self.table {
            if *e == PasidEntry::Valid(mm) {
                *e = PasidEntry::Aborting(mm);
                changed.push(*slot);
            }
        }
        self.maybe_drop_pasid(mm);
        changed
    }

    /// The lowest global PASID below `limit` not in use (`ida_alloc_range`'s choice), if any.
    fn lowest_free_pasid(&self, limit: u32) -> Option<u32> {
        let mut candidate = FIRST_GLOBAL_PASID;
        for &used in self.used_pasids.range(FIRST_GLOBAL_PASID..) {
            if used != candidate {
                break;
            }
            candidate += 1;
        }
        (candidate < limit.min(self.pasid_limit)).then_some(candidate)
    }

    fn maybe_drop_pasid(&mut self, mm: Pid) {
        if !self.released.contains(&mm) || self.domains.values().any(|d| d.mm == mm) {
            return;
        }
        self.released.remove(&mm);
        if let Some(p) = self.mm_pasid.remove(&mm) {
            self.used_pasids.remove(&p.0);
        }
    }

    /// Returns the PASID-table entry a request of `dev` with `pasid` finds (`None`: no entry, the request
    /// faults).
    pub fn entry(&self, dev: DeviceId, pasid: Pasid) -> Option<PasidEntry> {
        let group = self.devices.get(&dev)?.group?;
        self.table.get(&(group, pasid)).copied()
    }

    /// Returns the users count of `handle` (0 when gone).
    pub fn handle_users(&self, handle: SvaHandle) -> u32 {
        self.handles.get(&handle).map_or(0, |h| h.users)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: DeviceId = DeviceId(1);
    const B: DeviceId = DeviceId(2);
    const P1: Pid = Pid(1);
    const P2: Pid = Pid(2);

    fn info(group: u32, iommu: u32, max_pasids: u32) -> SvaDeviceInfo {
        SvaDeviceInfo {
            group: Some(group),
            iommu,
            max_pasids,
            domain_alloc_sva: true,
        }
    }

    fn sva_with(devs: &[(DeviceId, SvaDeviceInfo)]) -> Sva {
        let mut s = Sva::new(1 << 20);
        for (d, i) in devs {
            s.add_device(*d, *i).unwrap();
        }
        s
    }

    fn errno(r: SvaResult<SvaBond>) -> Errno {
        match r {
            Err(SvaError::Errno(e)) => e,
            other => panic!("expected an errno, got {other:?}"),
        }
    }

    #[test]
    fn bind_without_iommu_group_is_enodev() {
        let mut s = sva_with(&[(
            A,
            SvaDeviceInfo {
                group: None,
                ..info(0, 0, 16)
            },
        )]);
        assert_eq!(errno(s.bind(A, P1)), Errno::ENODEV);
        assert_eq!(
            s.mm_pasid(P1),
            None,
            "nothing allocated before the group check"
        );
    }

    #[test]
    fn bind_of_an_mm_the_iommu_cannot_walk_is_ebusy() {
        let mut s = sva_with(&[(A, info(0, 0, 16))]);
        s.set_mm_incompatible(P1, true);
        assert_eq!(errno(s.bind(A, P1)), Errno::EBUSY);
        s.set_mm_incompatible(P1, false);
        s.bind(A, P1).unwrap();
    }

    #[test]
    fn an_mm_pasid_beyond_the_device_max_pasids_is_eoverflow() {
        let mut s = sva_with(&[(A, info(0, 0, 1 << 20)), (B, info(1, 0, 2))]);
        // P1 takes PASID 1, P2 takes PASID 2 on the wide device; B supports PASIDs 0..2 only.
        s.bind(A, P1).unwrap();
        let b2 = s.bind(A, P2).unwrap();
        assert_eq!(b2.pasid, Pasid(2));
        assert_eq!(errno(s.bind(B, P2)), Errno::EOVERFLOW);
        s.bind(B, P1).unwrap(); // PASID 1 fits below 2
    }

    #[test]
    fn an_exhausted_global_pasid_space_is_enospc() {
        let mut s = Sva::new(3); // PASIDs 1 and 2
        s.add_device(A, info(0, 0, 1 << 20)).unwrap();
        s.bind(A, P1).unwrap();
        s.bind(A, P2).unwrap();
        assert_eq!(errno(s.bind(A, Pid(3))), Errno::ENOSPC);
        assert_eq!(s.nr_free_pasids(), 0);
    }

    #[test]
    fn a_pasid_slot_held_by_a_non_sva_domain_is_ebusy() {
        let mut s = sva_with(&[(A, info(7, 0, 16))]);
        s.attach_non_sva(7, Pasid(1));
        assert_eq!(errno(s.bind(A, P1)), Errno::EBUSY);
        assert_eq!(
            s.mm_pasid(P1),
            Some(Pasid(1)),
            "the PASID stays with the mm"
        );
    }

    #[test]
    fn a_driver_without_domain_alloc_sva_is_eopnotsupp() {
        let mut s = sva_with(&[(
            A,
            SvaDeviceInfo {
                domain_alloc_sva: false,
                ..info(0, 0, 16)
            },
        )]);
        assert_eq!(errno(s.bind(A, P1)), Errno::EOPNOTSUPP);
    }

    #[test]
    fn unknown_device_and_handle_are_typed_misuse_errors() {
        let mut s = Sva::new(16);
        assert_eq!(s.bind(A, P1), Err(SvaError::UnknownDevice(A)));
        assert_eq!(
            s.unbind(SvaHandle(99)),
            Err(SvaError::UnknownHandle(SvaHandle(99)))
        );
    }

    #[test]
    fn binding_the_same_mm_again_returns_the_same_handle_with_one_more_user() {
        let mut s = sva_with(&[(A, info(0, 0, 16))]);
        let a = s.bind(A, P1).unwrap();
        let b = s.bind(A, P1).unwrap();
        assert_eq!((a.handle, a.pasid), (b.handle, b.pasid));
        assert!(a.new && !b.new);
        assert_eq!(s.handle_users(a.handle), 2);
        assert!(!s.unbind(a.handle).unwrap(), "one user left");
        assert_eq!(s.entry(A, a.pasid), Some(PasidEntry::Valid(P1)));
        assert!(s.unbind(a.handle).unwrap());
        assert_eq!(s.entry(A, a.pasid), None, "the PASID is detached");
    }

    #[test]
    fn a_second_process_on_the_same_device_gets_its_own_pasid() {
        let mut s = sva_with(&[(A, info(0, 0, 16))]);
        let a = s.bind(A, P1).unwrap();
        let b = s.bind(A, P2).unwrap();
        assert_ne!(a.pasid, b.pasid);
        assert_ne!(a.handle, b.handle);
        assert_ne!(a.domain, b.domain);
    }

    #[test]
    fn devices_behind_one_iommu_share_the_mm_domain_and_others_get_their_own() {
        let c = DeviceId(3);
        let mut s = sva_with(&[
            (A, info(0, 0, 16)),
            (B, info(1, 0, 16)),
            (c, info(2, 1, 16)),
        ]);
        let a = s.bind(A, P1).unwrap();
        let b = s.bind(B, P1).unwrap();
        let other = s.bind(c, P1).unwrap();
        assert_eq!(a.domain, b.domain);
        assert_ne!(a.domain, other.domain);
        assert_eq!(
            (a.pasid, b.pasid, other.pasid),
            (Pasid(1), Pasid(1), Pasid(1))
        );
        assert_eq!(s.nr_domains(), 2);
        s.unbind(a.handle).unwrap();
        assert_eq!(s.nr_domains(), 2, "B still uses the shared domain");
        s.unbind(b.handle).unwrap();
        assert_eq!(s.nr_domains(), 1);
    }

    #[test]
    fn the_pasid_lives_as_long_as_the_mm_not_the_bond() {
        let mut s = sva_with(&[(A, info(0, 0, 16))]);
        let a = s.bind(A, P1).unwrap();
        s.unbind(a.handle).unwrap();
        assert_eq!(s.mm_pasid(P1), Some(a.pasid), "unbind keeps the mm's PASID");
        s.mm_release(P1);
        assert_eq!(s.mm_pasid(P1), None, "mm teardown frees it");
        assert_eq!(s.bind(A, P2).unwrap().pasid, a.pasid, "and it is reused");
    }

    #[test]
    fn a_freed_pasid_in_the_middle_is_the_next_one_handed_out() {
        // The IDA hands out the lowest free ID, wherever the gap is (ida_alloc_range).
        let mut s = sva_with(&[(A, info(0, 0, 16))]);
        let pasids: Vec<Pasid> = (1..=3).map(|p| s.bind(A, Pid(p)).unwrap().pasid).collect();
        assert_eq!(pasids, vec![Pasid(1), Pasid(2), Pasid(3)]);
        let free_before = s.nr_free_pasids();
        s.mm_release(Pid(2));
        let h = s
            .handles
            .iter()
            .find(|(_, h)| h.pasid == Pasid(2))
            .map(|(k, _)| *k);
        s.unbind(h.unwrap()).unwrap();
        assert_eq!(s.nr_free_pasids(), free_before + 1);
        assert_eq!(s.bind(A, Pid(4)).unwrap().pasid, Pasid(2));
        assert_eq!(s.bind(A, Pid(5)).unwrap().pasid, Pasid(4));
    }

    #[test]
    fn exit_while_bound_aborts_requests_and_keeps_the_pasid_until_unbind() {
        let mut s = sva_with(&[(A, info(0, 0, 16))]);
        let a = s.bind(A, P1).unwrap();
        assert_eq!(s.mm_release(P1), vec![(0, a.pasid)]);
        assert_eq!(s.entry(A, a.pasid), Some(PasidEntry::Aborting(P1)));
        assert_eq!(
            s.bind(A, P2).unwrap().pasid,
            Pasid(2),
            "PASID 1 is not reused yet"
        );
        s.unbind(a.handle).unwrap();
        assert_eq!(s.mm_pasid(P1), None);
        assert!(
            !s.used_pasids.contains(&a.pasid.0),
            "freed after the last unbind"
        );
    }
}
