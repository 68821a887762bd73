//! Mutation switches: test-only faults that each remove one step of a kernel protocol, so that the test suite
//! can prove the oracle and the exploration catch the bug the step prevents (mutation testing of the model).
//!
//! Each switch is read with one cheap check, [`active`], at the protocol step it cuts; with no switch on
//! (always, outside tests and the hidden `--mutate` flag of the command line) the check is one thread-local
//! load. The set is **per host thread**, so tests and exploration workers running side by side do not see
//! each other's switches; a simulation is one host thread, so a switch set before a run holds for all of it.
//!
//! | switch | protocol step removed | kernel reference |
//! |---|---|---|
//! | `skip_read_retry` | a mirror installs its entries without `mmu_interval_read_retry` | `mm/hmm.c` users, `lib/test_hmm.c` |
//! | `skip_seq_bump` | `invalidate_range_start` does not bump the interval's sequence | `mm/mmu_notifier.c` `mn_itree_inv_start_range` |
//! | `skip_fence` | the device fence does not wait for DMA in flight | driver invalidate callbacks |
//! | `early_free` | unmapping frees the frames before the invalidation completes | `mm/mmu_gather.c` (`tlb_finish_mmu` after the notifier) |
//! | `skip_pin_check_migrate` | migration moves a pinned page | `mm/migrate.c` `folio_migrate_mapping` ref check |
//! | `skip_pin_check_cow` | fork shares a pinned anonymous page copy-on-write | `mm/memory.c` `folio_needs_cow_for_dma` |
//! | `route_not_supported` | a P2P transfer whose map type is NOT_SUPPORTED is routed anyway | `drivers/pci/p2pdma.c` |
//! | `skip_strict_flush` | a strict unmap does not flush the IOTLB | `drivers/iommu/iommu.c` `iommu_unmap` → `iotlb_sync` |

use std::cell::Cell;

/// One protocol step a test may remove.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mutation {
    /// A mirror installs its entries without checking `mmu_interval_read_retry`.
    SkipReadRetry,
    /// `invalidate_range_start` does not bump the interval notifier's sequence.
    SkipSeqBump,
    /// The device fence does not wait for requests in flight.
    SkipFence,
    /// Unmapping frees the frames before the invalidation (notifiers, fence) completes.
    EarlyFree,
    /// Migration does not refuse a pinned page.
    SkipPinCheckMigrate,
    /// Fork shares a pinned anonymous page copy-on-write instead of copying it.
    SkipPinCheckCow,
    /// A P2P transfer whose map type is NOT_SUPPORTED is routed anyway.
    RouteNotSupported,
    /// A strict-mode IOMMU unmap does not invalidate the IOTLB.
    SkipStrictFlush,
}

impl Mutation {
    /// Every switch, in declaration order.
    pub const ALL: [Mutation; 8] = [
        Mutation::SkipReadRetry,
        Mutation::SkipSeqBump,
        Mutation::SkipFence,
        Mutation::EarlyFree,
        Mutation::SkipPinCheckMigrate,
        Mutation::SkipPinCheckCow,
        Mutation::RouteNotSupported,
        Mutation::SkipStrictFlush,
    ];

    /// Returns the switch's name on the command line (`--mutate NAME`).
    pub const fn name(self) -> &'static str {
        match self {
            Mutation::SkipReadRetry => "skip_read_retry",
            Mutation::SkipSeqBump => "skip_seq_bump",
            Mutation::SkipFence => "skip_fence",
            Mutation::EarlyFree => "early_free",
            Mutation::SkipPinCheckMigrate => "skip_pin_check_migrate",
            Mutation::SkipPinCheckCow => "skip_pin_check_cow",
            Mutation::RouteNotSupported => "route_not_supported",
            Mutation::SkipStrictFlush => "skip_strict_flush",
        }
    }

    /// Returns the switch named `name`.
    pub fn from_name(name: &str) -> Option<Mutation> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }

    const fn bit(self) -> u32 {
        1 << self as u32
    }
}

thread_local! {
    static ACTIVE: Cell<u32> = const { Cell::new(0) };
}

/// Returns whether switch `m` is on in this host thread: the one check a protocol step makes.
#[inline]
pub fn active(m: Mutation) -> bool {
    ACTIVE.with(|a| a.get() & m.bit() != 0)
}

/// Turns on exactly the switches of `set` in this host thread (an empty set turns them all off).
pub fn set(set: &[Mutation]) {
    ACTIVE.with(|a| a.set(set.iter().fold(0, |acc, m| acc | m.bit())));
}

/// Turns `m` on in this host thread until the returned guard is dropped (then no switch is on).
#[must_use = "the switch is off again once the guard is dropped"]
pub fn enable(m: Mutation) -> Guard {
    set(&[m]);
    Guard(())
}

/// Turns every switch off when dropped ([`enable`]).
#[derive(Debug)]
pub struct Guard(());

impl Drop for Guard {
    fn drop(&mut self) {
        set(&[]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_switch_is_on_only_inside_its_guard_and_only_in_its_thread() {
        assert!(!active(Mutation::SkipFence));
        {
            let _g = enable(Mutation::SkipFence);
            assert!(active(Mutation::SkipFence));
            assert!(!active(Mutation::SkipReadRetry));
            let other = std::thread::spawn(|| active(Mutation::SkipFence));
            assert!(!other.join().unwrap());
        }
        assert!(!active(Mutation::SkipFence));
    }

    #[test]
    fn names_round_trip() {
        for m in Mutation::ALL {
            assert_eq!(Mutation::from_name(m.name()), Some(m));
        }
        assert_eq!(Mutation::from_name("nope"), None);
    }
}
