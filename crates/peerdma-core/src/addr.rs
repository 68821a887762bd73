//! Address newtypes and half-open ranges.
//!
//! Every address space in the model has its own type — CPU virtual (`Va`), CPU physical (`Pa`), I/O virtual
//! (`Iova`) and PCI bus (`BusAddr`) — so that a translation is always an explicit, named conversion.
//!
//! **Ranges are half-open, `[start, end)`, everywhere in peerdma.** There is no inclusive range type.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::page::PAGE_SIZE;

macro_rules! address_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
        pub struct $name(u64);

        impl $name {
            /// Creates an address from its raw 64-bit value.
            pub const fn from_raw(raw: u64) -> Self {
                Self(raw)
            }

            /// Returns the raw 64-bit value.
            pub const fn raw(self) -> u64 {
                self.0
            }

            /// Returns the address `offset` bytes above this one, or `None` on overflow.
            pub const fn checked_add(self, offset: u64) -> Option<Self> {
                match self.0.checked_add(offset) {
                    Some(v) => Some(Self(v)),
                    None => None,
                }
            }

            /// Returns the address `offset` bytes above this one.
            ///
            /// # Panics
            /// Panics on overflow; callers add offsets already validated against a range.
            pub const fn add(self, offset: u64) -> Self {
                match self.0.checked_add(offset) {
                    Some(v) => Self(v),
                    None => panic!("address overflow"),
                }
            }

            /// Returns the distance in bytes from `base` up to this address.
            ///
            /// # Panics
            /// Panics if `base` is above `self`.
            pub const fn offset_from(self, base: Self) -> u64 {
                match self.0.checked_sub(base.0) {
                    Some(v) => v,
                    None => panic!("offset_from: base above address"),
                }
            }

            /// Returns the address rounded down to a multiple of `align` (a power of two).
            pub const fn align_down(self, align: u64) -> Self {
                Self(self.0 & !(align - 1))
            }

            /// Returns the address rounded up to a multiple of `align` (a power of two), or `None` on overflow.
            pub const fn align_up(self, align: u64) -> Option<Self> {
                match self.0.checked_add(align - 1) {
                    Some(v) => Some(Self(v & !(align - 1))),
                    None => None,
                }
            }

            /// Returns whether the address is a multiple of `align` (a power of two).
            pub const fn is_aligned(self, align: u64) -> bool {
                self.0 & (align - 1) == 0
            }

            /// Returns whether the address is 4 KiB page aligned.
            pub const fn is_page_aligned(self) -> bool {
                self.is_aligned(PAGE_SIZE)
            }

            /// Returns the page frame / page number (`addr >> PAGE_SHIFT`).
            pub const fn page_number(self) -> u64 {
                self.0 >> crate::page::PAGE_SHIFT
            }

            /// Returns the byte offset inside the 4 KiB page.
            pub const fn page_offset(self) -> u64 {
                self.0 & (PAGE_SIZE - 1)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({:#x})"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }

        impl fmt::LowerHex for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::LowerHex::fmt(&self.0, f)
            }
        }
    };
}

address_type!(
    /// A CPU virtual address inside one process address space.
    Va
);
address_type!(
    /// A CPU physical address (what a `struct page` or a BAR resource describes).
    Pa
);
address_type!(
    /// An I/O virtual address: what a device emits when an IOMMU DMA domain translates for it.
    Iova
);
address_type!(
    /// A PCI bus address: a physical address as seen from the bus (phys + the host bridge's bus offset).
    BusAddr
);

/// A half-open address range `[start, end)`.
///
/// An empty range has `start == end`. A range never has `end < start`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Range<A> {
    /// First address inside the range.
    pub start: A,
    /// First address past the range.
    pub end: A,
}

/// What every address newtype offers, so that [`Range`] is written once.
pub trait Address: Copy + Ord + fmt::Debug {
    /// Creates the address from its raw value.
    fn from_raw_value(raw: u64) -> Self;
    /// Returns the raw value.
    fn raw_value(self) -> u64;
}

macro_rules! address_trait {
    ($($name:ident),*) => {$(
        impl Address for $name {
            fn from_raw_value(raw: u64) -> Self {
                Self(raw)
            }
            fn raw_value(self) -> u64 {
                self.0
            }
        }
    )*};
}

address_trait!(Va, Pa, Iova, BusAddr);

impl<A: Address> Range<A> {
    /// Creates `[start, end)`.
    ///
    /// # Panics
    /// Panics if `end < start`; use [`Range::from_len`] for untrusted input.
    pub fn new(start: A, end: A) -> Self {
        assert!(start <= end, "range end below start");
        Self { start, end }
    }

    /// Creates `[start, start + len)`, or `None` when that overflows.
    pub fn from_len(start: A, len: u64) -> Option<Self> {
        let end = start.raw_value().checked_add(len)?;
        Some(Self {
            start,
            end: A::from_raw_value(end),
        })
    }

    /// Returns the length in bytes.
    pub fn len(&self) -> u64 {
        self.end.raw_value() - self.start.raw_value()
    }

    /// Returns whether the range holds no address.
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Returns whether `addr` lies inside the range.
    pub fn contains(&self, addr: A) -> bool {
        self.start <= addr && addr < self.end
    }

    /// Returns whether `other` lies entirely inside this range.
    pub fn contains_range(&self, other: &Self) -> bool {
        self.start <= other.start && other.end <= self.end
    }

    /// Returns whether the two ranges share at least one address.
    pub fn overlaps(&self, other: &Self) -> bool {
        self.start < other.end && other.start < self.end
    }

    /// Returns the common part of two ranges, or `None` when they do not overlap.
    pub fn intersection(&self, other: &Self) -> Option<Self> {
        let start = self.start.max(other.start);
        let end = self.end.min(other.end);
        (start < end).then_some(Self { start, end })
    }

    /// Returns the number of 4 KiB pages the range spans (start and end rounded outwards).
    pub fn nr_pages(&self) -> u64 {
        if self.is_empty() {
            return 0;
        }
        let first = self.start.raw_value() >> crate::page::PAGE_SHIFT;
        let last = (self.end.raw_value() - 1) >> crate::page::PAGE_SHIFT;
        last - first + 1
    }

    /// Returns an iterator over the start address of every 4 KiB page in a page-aligned range.
    pub fn pages(&self) -> impl Iterator<Item = A> + use<A> {
        let (start, end) = (self.start.raw_value(), self.end.raw_value());
        (start..end)
            .step_by(usize::try_from(PAGE_SIZE).expect("page size fits usize"))
            .map(A::from_raw_value)
    }
}

impl<A: Address> fmt::Debug for Range<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[{:#x}, {:#x})",
            self.start.raw_value(),
            self.end.raw_value()
        )
    }
}

impl<A: Address> fmt::Display for Range<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[{:#x}, {:#x})",
            self.start.raw_value(),
            self.end.raw_value()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_is_half_open() {
        let r = Range::new(Va::from_raw(0x1000), Va::from_raw(0x3000));
        assert!(r.contains(Va::from_raw(0x1000)));
        assert!(r.contains(Va::from_raw(0x2fff)));
        assert!(!r.contains(Va::from_raw(0x3000)));
        assert_eq!(r.len(), 0x2000);
        assert_eq!(r.nr_pages(), 2);
    }

    #[test]
    fn adjacent_ranges_do_not_overlap() {
        let a = Range::new(Va::from_raw(0), Va::from_raw(0x1000));
        let b = Range::new(Va::from_raw(0x1000), Va::from_raw(0x2000));
        assert!(!a.overlaps(&b));
        assert_eq!(a.intersection(&b), None);
    }

    #[test]
    fn from_len_rejects_overflow() {
        assert!(Range::from_len(Va::from_raw(u64::MAX - 10), 11).is_none());
        assert!(Range::from_len(Va::from_raw(u64::MAX - 10), 10).is_some());
    }

    #[test]
    fn pages_iterates_each_page_start() {
        let r = Range::new(Va::from_raw(0x2000), Va::from_raw(0x5000));
        let pages: Vec<u64> = r.pages().map(Va::raw).collect();
        assert_eq!(pages, vec![0x2000, 0x3000, 0x4000]);
    }

    #[test]
    fn alignment_helpers_round_correctly() {
        let a = Va::from_raw(0x20_1234);
        assert_eq!(a.align_down(0x20_0000).raw(), 0x20_0000);
        assert_eq!(a.align_up(0x20_0000).unwrap().raw(), 0x40_0000);
        assert!(!a.is_page_aligned());
        assert_eq!(Va::from_raw(u64::MAX).align_up(0x1000), None);
    }
}
