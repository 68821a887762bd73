//! Vocabulary shared by every peerdma layer: address newtypes, half-open ranges, page sizes, identifiers,
//! simulated time, the named timing-model parameters, the kernel's errno values and the user-visible words of
//! memory management (protections, `madvise` advice, signals).
//!
//! Nothing here models behaviour; it only gives the other crates one set of words, so that a `Va` is never
//! confused with a `Pa` and an error compares one-to-one with what Linux returns.

pub mod addr;
pub mod errno;
pub mod ids;
pub mod mm;
pub mod mutation;
pub mod page;
pub mod time;
pub mod timing;

pub use addr::{Address, BusAddr, Iova, Pa, Range, Va};
pub use errno::Errno;
pub use ids::{Bdf, DeviceId, FrameId, Pasid, Pid};
pub use mm::{Advice, Prot, SigInfo, Signal};
pub use page::{PAGE_SHIFT, PAGE_SIZE, PMD_SHIFT, PMD_SIZE, PUD_SHIFT, PUD_SIZE, PageSize};
pub use time::{SimDuration, SimTime};
pub use timing::{ParamSpec, ParamUnit, Timing};
