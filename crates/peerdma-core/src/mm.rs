//! The user-visible words of memory management: page protections (`PROT_*`), `madvise` advice (`MADV_*`) and
//! the signals a CPU access can end with (`SIGSEGV`, `SIGBUS`, with the faulting address as `siginfo`
//! carries it).
//!
//! One type per concept: the model (`peerdma-mm`, which re-exports them) and the scenario language
//! (`peerdma-scenario`, which parses their spellings) share these. Nothing here models behaviour.

use std::fmt;

use crate::Va;

/// Memory protection as `mmap`/`mprotect` take it (`PROT_READ | PROT_WRITE | PROT_EXEC`).
///
/// Displays as the scenario spelling: `none`, `r`, `rw`, `rx`, `rwx`...
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Prot {
    /// PROT_READ.
    pub read: bool,
    /// PROT_WRITE.
    pub write: bool,
    /// PROT_EXEC.
    pub exec: bool,
}

impl Prot {
    /// PROT_NONE.
    pub const NONE: Self = Self {
        read: false,
        write: false,
        exec: false,
    };
    /// PROT_READ.
    pub const READ: Self = Self {
        read: true,
        write: false,
        exec: false,
    };
    /// PROT_READ | PROT_WRITE.
    pub const RW: Self = Self {
        read: true,
        write: true,
        exec: false,
    };
}

impl fmt::Display for Prot {
    /// Prints `none`, or the set bits in `rwx` order (`r`, `rw`, `rx`, `rwx`, `w`...).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == Self::NONE {
            return f.write_str("none");
        }
        for (set, c) in [(self.read, 'r'), (self.write, 'w'), (self.exec, 'x')] {
            if set {
                write!(f, "{c}")?;
            }
        }
        Ok(())
    }
}

/// `madvise` advice values the model implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Advice {
    /// MADV_DONTNEED.
    DontNeed,
    /// MADV_HUGEPAGE.
    HugePage,
    /// MADV_NOHUGEPAGE.
    NoHugePage,
    /// MADV_FREE: the pages may be discarded lazily. The model keeps them (reclaim does not discard clean lazily
    /// freed pages yet), which only makes their contents last longer than Linux guarantees.
    Free,
    /// MADV_COLLAPSE: collapse each fully mapped, 2 MiB-aligned block of anonymous pages into a THP.
    Collapse,
    /// MADV_DONTFORK: the range is not inherited by a child (VM_DONTCOPY).
    DontFork,
    /// MADV_DOFORK: undo MADV_DONTFORK (`EINVAL` on a VM_IO mapping).
    DoFork,
    /// MADV_COLD: deactivate the private pages of the range (they go first at the next reclaim).
    Cold,
    /// MADV_PAGEOUT: reclaim the private pages of the range now (anonymous pages go to swap).
    PageOut,
}

/// A signal a CPU access can raise (the signal number, `si_signo`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Signal {
    /// SIGSEGV: no VMA, or the VMA forbids the access.
    Segv,
    /// SIGBUS: the VMA exists but nothing can back the page (beyond EOF, hugetlb pool empty, OOM, memory that
    /// is gone such as a revoked BAR).
    Bus,
}

impl Signal {
    /// Returns the signal's name (`"SIGSEGV"`).
    pub const fn name(self) -> &'static str {
        match self {
            Self::Segv => "SIGSEGV",
            Self::Bus => "SIGBUS",
        }
    }
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How a CPU access ended when it could not complete: the signal and the faulting address (`siginfo_t`'s
/// `si_signo` and `si_addr`).
///
/// Displays as `SIGSEGV at 0x…`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SigInfo {
    /// The signal.
    pub signo: Signal,
    /// The faulting address.
    pub addr: Va,
}

impl SigInfo {
    /// Returns SIGSEGV at `addr`.
    pub const fn segv(addr: Va) -> Self {
        Self {
            signo: Signal::Segv,
            addr,
        }
    }

    /// Returns SIGBUS at `addr`.
    pub const fn bus(addr: Va) -> Self {
        Self {
            signo: Signal::Bus,
            addr,
        }
    }
}

impl fmt::Display for SigInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at {}", self.signo, self.addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prot_prints_the_scenario_spelling() {
        assert_eq!(Prot::NONE.to_string(), "none");
        assert_eq!(Prot::READ.to_string(), "r");
        assert_eq!(Prot::RW.to_string(), "rw");
        let wx = Prot {
            read: false,
            write: true,
            exec: true,
        };
        assert_eq!(wx.to_string(), "wx");
    }

    #[test]
    fn siginfo_prints_signal_and_address() {
        let addr = Va::from_raw(0x7f00_0000_1000);
        assert_eq!(SigInfo::bus(addr).to_string(), format!("SIGBUS at {addr}"));
        assert_eq!(SigInfo::segv(addr).signo.name(), "SIGSEGV");
    }
}
