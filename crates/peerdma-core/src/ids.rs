//! Identifiers: processes, PASIDs, PCI functions, devices and physical frames.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A process id. Each process owns one address space (its `mm_struct`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Pid(pub u32);

/// A PCIe Process Address Space ID (20 bits), binding a device context to an address space (SVA).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Pasid(pub u32);

/// A device id inside one simulation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DeviceId(pub u32);

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A physical frame number: the index of a 4 KiB frame in the model's physical memory
/// (`Pa = FrameId << PAGE_SHIFT` for frames of the simulated physical map).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct FrameId(pub u64);

impl FrameId {
    /// Returns the physical address of the frame's first byte.
    pub const fn pa(self) -> crate::Pa {
        crate::Pa::from_raw(self.0 << crate::PAGE_SHIFT)
    }
}

impl fmt::Debug for FrameId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pfn {:#x}", self.0)
    }
}

impl fmt::Display for FrameId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pfn {:#x}", self.0)
    }
}

/// A PCI function address: bus, device (0–31), function (0–7), printed as `bb:dd.f`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Bdf {
    /// Bus number.
    pub bus: u8,
    /// Device number, 0–31.
    pub dev: u8,
    /// Function number, 0–7.
    pub func: u8,
}

impl Bdf {
    /// Creates a BDF, or `None` when the device or function number is out of range.
    pub const fn new(bus: u8, dev: u8, func: u8) -> Option<Self> {
        if dev > 31 || func > 7 {
            return None;
        }
        Some(Self { bus, dev, func })
    }
}

impl fmt::Debug for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.dev, self.func)
    }
}

impl std::str::FromStr for Bdf {
    type Err = String;

    /// Parses `bb:dd.f` (hexadecimal bus and device, decimal function).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || format!("expected a BDF like `01:00.0`, found `{s}`");
        let (bus, rest) = s.split_once(':').ok_or_else(err)?;
        let (dev, func) = rest.split_once('.').ok_or_else(err)?;
        let bus = u8::from_str_radix(bus, 16).map_err(|_| err())?;
        let dev = u8::from_str_radix(dev, 16).map_err(|_| err())?;
        let func = func.parse::<u8>().map_err(|_| err())?;
        Self::new(bus, dev, func).ok_or_else(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bdf_round_trips_through_text() {
        let bdf: Bdf = "3b:1f.7".parse().unwrap();
        assert_eq!(bdf, Bdf::new(0x3b, 0x1f, 7).unwrap());
        assert_eq!(bdf.to_string(), "3b:1f.7");
    }

    #[test]
    fn bdf_rejects_out_of_range_device() {
        "00:20.0".parse::<Bdf>().unwrap_err();
        "00:00.8".parse::<Bdf>().unwrap_err();
        "0000".parse::<Bdf>().unwrap_err();
    }
}
