//! What the memory model sees of a device access to a frame: the oracle's checks at the two instants of a
//! DMA request — when it is issued (translated) and when its data lands — and the data movement itself.
//! The DMA layer's `DmaSpace` (`peerdma-dma`) drives these; no other crate touches frame bytes for a device.
//!
//! A device holds a translation to a frame ([`FrameTranslation`]) by one of three grants ([`DeviceGrant`]),
//! and the grant decides the rule (DESIGN.md §7):
//! 1. **Mirror** (a coherent translation, no reference held, the ODP/HMM pattern): at issue the CPU page
//!    table must map the frame at that address now, writable for a write (check 1). While the request is in
//!    flight the translation stays valid until the invalidation that removes it *completes*: at landing the
//!    page table must still map the frame — or an invalidation of that address must still be in progress
//!    (between `invalidate_range_start` and its end, the window in which a device may still use a cached
//!    translation). A correct driver's invalidation waits for its in-flight requests (the fence) before the
//!    page table changes; one that does not is caught here as a stale translation.
//! 2. **Pin** (a short- or long-term pin): the frame must be allocated and still pinned, at issue and at
//!    landing (check 3); the content record of the process page follows only while the process still maps
//!    that frame there.
//! 3. **Raw** (an address the device holds without any handle — stale or forged): nothing but the IOMMU and
//!    the fabric protect; the oracle checks only ownership and never updates content records, so a write
//!    behind a mapping's back is caught at the next read (check 4).
//!
//! **Ownership (check 2)**: every translation remembers the frame's allocation generation when it was made
//! (`Frame::generation`, bumped at each allocation). An access that reaches a free frame, or a frame freed
//! and reallocated since (a different generation), is a use after free — reads included.
//!
//! The checks themselves (`check_frame_owned`, `check_pinned_frame`, `check_mirror_current`) are
//! `Mms` methods at the end of this module.

use peerdma_core::{DeviceId, FrameId, Pa, Pid, Va};

use crate::kernel::{Kernel, Mms};
use crate::oracle::{Oracle, ViolationKind};
use crate::pagetable::Pte;
use crate::phys::PhysMem;

/// How a device came to hold the translation it uses (module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceGrant {
    /// A mirror entry for `va` of `pid`, holding no reference (coherent translation mirror).
    Mirror {
        /// The process mirrored.
        pid: Pid,
        /// The page's virtual address.
        va: Va,
    },
    /// A pin the device's driver took for `va` of `pid`.
    Pin {
        /// The process the pin was taken in.
        pid: Pid,
        /// The page's virtual address when it was pinned.
        va: Va,
    },
    /// A plain page reference (FOLL_GET, as `vmsplice` takes) the driver holds for `va` of `pid`: the frame
    /// stays allocated, but nothing keeps it in the mapping — a COW may replace it there, after which the
    /// reference still reaches the old frame, as in Linux.
    Ref {
        /// The process the reference was taken in.
        pid: Pid,
        /// The page's virtual address when it was taken.
        va: Va,
    },
    /// A raw DMA address with no handle behind it.
    Raw,
}

impl DeviceGrant {
    /// Returns the process and page a mirror or pin grant is for.
    pub fn page(self) -> Option<(Pid, Va)> {
        match self {
            Self::Mirror { pid, va } | Self::Pin { pid, va } | Self::Ref { pid, va } => {
                Some((pid, va))
            }
            Self::Raw => None,
        }
    }
}

/// A device's translation to one 4 KiB frame, as it stood when it was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameTranslation {
    /// The frame reached.
    pub frame: FrameId,
    /// The frame's allocation generation the translation saw.
    pub generation: u64,
    /// How the device holds it.
    pub grant: DeviceGrant,
}

/// The data of a device access: the buffer a read fills or the bytes a write stores (4 KiB).
#[derive(Debug)]
pub enum DeviceData<'a> {
    /// A read into this buffer.
    Read(&'a mut [u8]),
    /// A write of these bytes.
    Write(&'a [u8]),
}

impl Kernel {
    /// Returns the frame at physical address `pa` and its current allocation generation (`None` for MMIO
    /// without struct page or an address no region covers).
    pub fn frame_at_pa(&self, pa: Pa) -> Option<(FrameId, u64)> {
        let phys = self.phys();
        let f = phys.frame_at_pa(pa)?;
        Some((f, phys.frame(f).generation))
    }

    /// Returns the CPU physical address of `frame`.
    pub fn frame_pa(&self, frame: FrameId) -> Pa {
        self.phys().frame_pa(frame)
    }

    /// Reports a violation the DMA layer detected (a stale IOTLB hit, a routing error, a landing after a
    /// fence that did not wait) to the oracle, which stops the run unless the kind is armed as expected.
    pub fn report_violation(&self, kind: ViolationKind, detail: String) {
        self.oracle().violation(kind, detail);
    }

    /// Returns the generation of `frame` when it is allocated, `None` when it is free (or no such frame).
    pub fn frame_generation(&self, frame: FrameId) -> Option<u64> {
        let phys = self.phys();
        (phys.exists(frame) && phys.frame(frame).is_allocated())
            .then(|| phys.frame(frame).generation)
    }

    /// The oracle's checks when device `dev` issues an access through `t` (module docs); returns whether
    /// the access may go on. A violation stops the run (unless armed as expected).
    pub fn device_issue(&self, dev: DeviceId, t: &FrameTranslation, write: bool) -> bool {
        let st = self.mms();
        let phys = self.phys();
        let mut oracle = self.oracle();
        if !oracle.enabled() {
            return true;
        }
        if !check_frame_owned(&mut oracle, &phys, dev, t) {
            return false;
        }
        match t.grant {
            DeviceGrant::Mirror { pid, va } => {
                st.check_mirror_current(&mut oracle, dev, pid, va, t.frame, write)
            }
            DeviceGrant::Pin { .. } => check_pinned_frame(&mut oracle, &phys, dev, t.frame),
            DeviceGrant::Ref { .. } | DeviceGrant::Raw => true,
        }
    }

    /// The landing of a device access through `t`: the ownership (and pin) checks of the module docs, then
    /// the data moves and the content record follows a write (or checks a read). Returns whether the data
    /// moved.
    pub fn device_land(&self, dev: DeviceId, t: &FrameTranslation, data: DeviceData<'_>) -> bool {
        let st = self.mms();
        let mut phys = self.phys();
        let mut oracle = self.oracle();
        if oracle.enabled() {
            if let DeviceGrant::Mirror { pid, va } = t.grant
                && !st.check_mirror_in_flight(
                    &mut oracle,
                    dev,
                    pid,
                    va,
                    t.frame,
                    matches!(data, DeviceData::Write(_)),
                )
            {
                return false;
            }
            if !check_frame_owned(&mut oracle, &phys, dev, t) {
                return false;
            }
            if matches!(t.grant, DeviceGrant::Pin { .. })
                && !check_pinned_frame(&mut oracle, &phys, dev, t.frame)
            {
                return false;
            }
        }
        let frame = t.frame;
        let key = match t.grant {
            DeviceGrant::Mirror { pid, va } => st.logical_page(&phys, pid, va),
            DeviceGrant::Pin { pid, va } | DeviceGrant::Ref { pid, va } => {
                let mapped = st.mm(pid).translate(va).is_some_and(|(f, _, _)| f == frame);
                if mapped {
                    st.logical_page(&phys, pid, va)
                } else {
                    None
                }
            }
            DeviceGrant::Raw => None,
        };
        match data {
            DeviceData::Write(bytes) => {
                phys.write(frame, 0, bytes);
                if let Some(key) = key {
                    let h = phys.content_hash(frame);
                    oracle.record(key, h);
                }
            }
            DeviceData::Read(buf) => {
                phys.read(frame, 0, buf);
                if let Some(key) = key {
                    let h = phys.content_hash(frame);
                    oracle.check_read(key, h, || {
                        format!("device {} read of {frame} ({:?})", dev.0, t.grant)
                    });
                }
            }
        }
        true
    }
}

impl Mms {
    /// Oracle check 1 for a mirror translation at issue: the CPU page table maps `frame` at `va` now
    /// (device-private and device-exclusive entries included), writable for a write.
    pub(crate) fn check_mirror_current(
        &self,
        oracle: &mut Oracle,
        dev: DeviceId,
        pid: Pid,
        va: Va,
        frame: FrameId,
        write: bool,
    ) -> bool {
        let current = self.get(pid).and_then(|mm| {
            mm.translate(va).or_else(|| {
                let leaf = mm.pt().lookup(va)?;
                match leaf.pte {
                    Pte::DevicePrivate { write, .. } | Pte::DeviceExclusive { write, .. } => {
                        Some((leaf.frame_at(va)?, write, leaf))
                    }
                    _ => None,
                }
            })
        });
        match current {
            Some((f, w, _)) if f == frame && (w || !write) => {}
            other => {
                let now = match other {
                    Some((f, w, _)) => format!("{f} ({})", if w { "rw" } else { "ro" }),
                    None => "no present mapping".to_owned(),
                };
                oracle.violation(
                    ViolationKind::StaleTranslation,
                    format!(
                        "device {} {} {frame} for pid {} va {va}, but the CPU page table maps {now}",
                        dev.0,
                        if write { "wrote" } else { "read" },
                        pid.0
                    ),
                );
                return false;
            }
        }
        true
    }

    /// The mirror rule at landing (module docs, grant 1): the translation is still valid when the page
    /// table maps the frame, or while an invalidation of that address is in progress.
    pub(crate) fn check_mirror_in_flight(
        &self,
        oracle: &mut Oracle,
        dev: DeviceId,
        pid: Pid,
        va: Va,
        frame: FrameId,
        write: bool,
    ) -> bool {
        let invalidating = self
            .get(pid)
            .is_some_and(|mm| mm.notifiers().invalidating(va));
        invalidating || self.check_mirror_current(oracle, dev, pid, va, frame, write)
    }
}

/// Oracle check 2 for a device translation: the frame is allocated, in the generation the translation
/// saw (not freed and reallocated since).
fn check_frame_owned(
    oracle: &mut Oracle,
    phys: &PhysMem,
    dev: DeviceId,
    t: &FrameTranslation,
) -> bool {
    let frame = t.frame;
    let allocated = phys.exists(frame) && phys.frame(frame).is_allocated();
    if allocated && phys.frame(frame).generation == t.generation {
        return true;
    }
    let what = if allocated {
        format!(
            "{frame}, reallocated since the translation it used (generation {} then, {} now)",
            t.generation,
            phys.frame(frame).generation
        )
    } else {
        format!("freed {frame}")
    };
    oracle.violation(
        ViolationKind::UseAfterFree,
        format!("device {} reached {what} ({:?})", dev.0, t.grant),
    );
    false
}

/// Oracle check 3 for DMA through a pin: the frame must be allocated and still pinned.
fn check_pinned_frame(oracle: &mut Oracle, phys: &PhysMem, dev: DeviceId, frame: FrameId) -> bool {
    let fr = phys.frame(frame);
    if !fr.is_allocated() {
        oracle.violation(
            ViolationKind::UseAfterFree,
            format!("device {} accessed freed {frame} through a pin", dev.0),
        );
        return false;
    }
    if !fr.maybe_dma_pinned() {
        oracle.violation(
            ViolationKind::PinBroken,
            format!(
                "device {} accessed {frame} through a pin that no longer holds it",
                dev.0
            ),
        );
        return false;
    }
    true
}
