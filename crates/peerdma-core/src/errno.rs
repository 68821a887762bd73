//! The kernel's error vocabulary (include/uapi/asm-generic/errno-base.h and errno.h), so that a model result
//! compares one-to-one with what Linux returns.

use std::fmt;

use serde::{Deserialize, Serialize};

macro_rules! errnos {
    ($($name:ident = $val:literal, $desc:literal;)*) => {
        /// A Linux errno value. The model returns these where the kernel would return `-E...`.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, thiserror::Error)]
        pub enum Errno {
            $(
                #[doc = $desc]
                #[error("{}", stringify!($name))]
                $name,
            )*
        }

        impl Errno {
            /// Every errno the model knows, in declaration order.
            pub const ALL: &[Errno] = &[$(Errno::$name,)*];

            /// Returns the positive numeric value on x86-64 Linux.
            pub const fn code(self) -> i32 {
                match self { $(Errno::$name => $val,)* }
            }

            /// Returns the symbolic name (`"EFAULT"`).
            pub const fn name(self) -> &'static str {
                match self { $(Errno::$name => stringify!($name),)* }
            }

            /// Returns the one-line description (`strerror`).
            pub const fn description(self) -> &'static str {
                match self { $(Errno::$name => $desc,)* }
            }

            /// Looks an errno up by its symbolic name.
            pub fn from_name(name: &str) -> Option<Self> {
                match name { $(stringify!($name) => Some(Errno::$name),)* _ => None }
            }
        }
    };
}

errnos! {
    EPERM = 1, "Operation not permitted";
    ENOENT = 2, "No such file or directory";
    EINTR = 4, "Interrupted system call";
    EIO = 5, "Input/output error";
    EBADF = 9, "Bad file descriptor";
    EAGAIN = 11, "Resource temporarily unavailable";
    ENOMEM = 12, "Cannot allocate memory";
    EACCES = 13, "Permission denied";
    EFAULT = 14, "Bad address";
    EBUSY = 16, "Device or resource busy";
    EEXIST = 17, "File exists";
    ENODEV = 19, "No such device";
    EINVAL = 22, "Invalid argument";
    ENOSPC = 28, "No space left on device";
    EMLINK = 31, "Too many links";
    ERANGE = 34, "Numerical result out of range";
    EOVERFLOW = 75, "Value too large for defined data type";
    EOPNOTSUPP = 95, "Operation not supported";
    EREMOTEIO = 121, "Remote I/O error";
}

impl Errno {
    /// Returns the negative value a kernel function would return (`-EFAULT` is -14).
    pub const fn neg(self) -> i32 {
        -self.code()
    }
}

/// Prints `-EFAULT (-14)`, the form used in reports.
#[derive(Debug)]
pub struct Neg(pub Errno);

impl fmt::Display for Neg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "-{} ({})", self.0.name(), self.0.neg())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_match_linux_x86_64() {
        assert_eq!(Errno::EFAULT.code(), 14);
        assert_eq!(Errno::EREMOTEIO.code(), 121);
        assert_eq!(Errno::EOPNOTSUPP.code(), 95);
        assert_eq!(Errno::EBUSY.neg(), -16);
    }

    #[test]
    fn names_round_trip() {
        for &e in Errno::ALL {
            assert_eq!(Errno::from_name(e.name()), Some(e));
        }
        assert_eq!(Errno::from_name("EWHATEVER"), None);
    }
}
