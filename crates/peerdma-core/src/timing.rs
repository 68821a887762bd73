//! Named timing-model parameters: the vocabulary every cost table of the workspace is built from.
//!
//! Each cost of the model (a CPU fault, an IOTLB miss, a PCIe hop...) is a [`ParamSpec`]: a dotted key
//! (`mm.cpu_fault`), a [`ParamUnit`], a default, the source of that default (a `spec/numbers.md` section, a
//! kernel or hardware figure, or "assumption") and a one-line description. Each crate's cost struct lists its
//! specs in a `PARAMS` constant and builds itself from a [`Timing`] (`MmCosts::from_timing`); the scenario
//! crate concatenates every `PARAMS` into the one registry the CLI prints (`peerdma params`).
//!
//! A [`Timing`] is the time mode plus the overrides a scenario's `[timing]` table gives. The rules, in order:
//! 1. In **zero** mode ([`Timing::zero`]) every [`ParamUnit::Time`] parameter is 0, whatever the overrides say
//!    (overrides are ignored: zero mode is for functional runs). [`ParamUnit::Count`] parameters are not
//!    costs: they keep their override or default, so zero mode changes no behaviour.
//! 2. In **calibrated** mode ([`Timing::calibrated`]) an override replaces the default.
//! 3. Otherwise the parameter is its default.
//!
//! A `Timing` stores overrides by key without checking them against any registry (it does not know the
//! other crates' parameters); the scenario parser rejects unknown keys, at their location in the file.

use std::collections::BTreeMap;
use std::fmt;

use crate::SimDuration;

/// What a parameter's value measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ParamUnit {
    /// Simulated time, in nanoseconds. Zero mode sets it to 0.
    Time,
    /// A plain count (entries, outstanding requests...). Zero mode leaves it alone.
    Count,
}

impl ParamUnit {
    /// Returns the unit's name as `peerdma params --json` prints it: `"ns"` or `"count"`.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Time => "ns",
            Self::Count => "count",
        }
    }
}

impl fmt::Display for ParamUnit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One named parameter of the timing model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParamSpec {
    /// The dotted key a scenario's `[timing]` table uses (`mm.cpu_fault`): the subsystem, then the cost.
    pub key: &'static str,
    /// What the value measures.
    pub unit: ParamUnit,
    /// The default: nanoseconds for [`ParamUnit::Time`], the count itself for [`ParamUnit::Count`].
    pub default: u64,
    /// Where the default comes from: a `spec/numbers.md` section, a kernel or hardware figure, or
    /// "assumption".
    pub source: &'static str,
    /// A one-line description of what the parameter costs or bounds.
    pub doc: &'static str,
}

impl ParamSpec {
    /// Creates a time parameter of `default_ns` nanoseconds.
    pub const fn time(
        key: &'static str,
        default_ns: u64,
        source: &'static str,
        doc: &'static str,
    ) -> Self {
        Self {
            key,
            unit: ParamUnit::Time,
            default: default_ns,
            source,
            doc,
        }
    }

    /// Creates a count parameter.
    pub const fn count(
        key: &'static str,
        default: u64,
        source: &'static str,
        doc: &'static str,
    ) -> Self {
        Self {
            key,
            unit: ParamUnit::Count,
            default,
            source,
            doc,
        }
    }
}

/// The time mode and overrides every cost table is built from (module docs: the rules).
///
/// # Examples
/// ```
/// use peerdma_core::timing::{ParamSpec, Timing};
/// use peerdma_core::SimDuration;
///
/// const FAULT: ParamSpec = ParamSpec::time("mm.cpu_fault", 1_000, "assumption", "a fault");
/// let mut t = Timing::calibrated();
/// assert_eq!(t.time(&FAULT), SimDuration::from_nanos(1_000));
/// t.set("mm.cpu_fault", 5_000);
/// assert_eq!(t.time(&FAULT), SimDuration::from_nanos(5_000));
/// assert_eq!(t.clone().into_zero().time(&FAULT), SimDuration::ZERO);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Timing {
    zero: bool,
    overrides: BTreeMap<String, u64>,
}

impl Timing {
    /// Returns the calibrated timing with no overrides: every parameter is its default.
    pub fn calibrated() -> Self {
        Self::default()
    }

    /// Returns the zero timing: every time parameter 0, counts at their defaults.
    pub fn zero() -> Self {
        Self {
            zero: true,
            overrides: BTreeMap::new(),
        }
    }

    /// Returns this timing in zero mode (its overrides kept, but ignored for time parameters).
    pub fn into_zero(mut self) -> Self {
        self.zero = true;
        self
    }

    /// Returns whether this is zero mode.
    pub fn is_zero(&self) -> bool {
        self.zero
    }

    /// Overrides parameter `key` with `value` (nanoseconds for a time, the count itself for a count).
    /// The key is not checked here; a later `set` of the same key wins.
    pub fn set(&mut self, key: impl Into<String>, value: u64) {
        self.overrides.insert(key.into(), value);
    }

    /// Returns the overrides, by key.
    pub fn overrides(&self) -> &BTreeMap<String, u64> {
        &self.overrides
    }

    /// Returns the value of `spec` under the module's rules, in its own unit.
    pub fn value(&self, spec: &ParamSpec) -> u64 {
        if self.zero && spec.unit == ParamUnit::Time {
            return 0;
        }
        self.overrides
            .get(spec.key)
            .copied()
            .unwrap_or(spec.default)
    }

    /// Returns the value of the time parameter `spec`.
    ///
    /// # Panics
    /// When `spec` is not a [`ParamUnit::Time`] parameter (a cost table reading its own spec wrongly).
    pub fn time(&self, spec: &ParamSpec) -> SimDuration {
        assert_eq!(spec.unit, ParamUnit::Time, "{} is not a time", spec.key);
        SimDuration::from_nanos(self.value(spec))
    }

    /// Returns the value of the count parameter `spec`.
    ///
    /// # Panics
    /// When `spec` is not a [`ParamUnit::Count`] parameter.
    pub fn count(&self, spec: &ParamSpec) -> u64 {
        assert_eq!(spec.unit, ParamUnit::Count, "{} is not a count", spec.key);
        self.value(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: ParamSpec = ParamSpec::time("x.t", 100, "assumption", "a time");
    const C: ParamSpec = ParamSpec::count("x.c", 256, "assumption", "a count");

    #[test]
    fn calibrated_gives_defaults() {
        let t = Timing::calibrated();
        assert_eq!(t.time(&T), SimDuration::from_nanos(100));
        assert_eq!(t.count(&C), 256);
    }

    #[test]
    fn an_override_replaces_the_default_in_calibrated_mode() {
        let mut t = Timing::calibrated();
        t.set("x.t", 7);
        t.set("x.c", 8);
        assert_eq!(t.time(&T), SimDuration::from_nanos(7));
        assert_eq!(t.count(&C), 8);
    }

    #[test]
    fn zero_mode_zeroes_times_but_not_counts_and_ignores_time_overrides() {
        let mut t = Timing::zero();
        t.set("x.t", 7);
        assert_eq!(t.time(&T), SimDuration::ZERO);
        assert_eq!(t.count(&C), 256);
        t.set("x.c", 8);
        assert_eq!(t.count(&C), 8);
    }

    #[test]
    fn units_print_as_the_json_names() {
        assert_eq!(ParamUnit::Time.to_string(), "ns");
        assert_eq!(ParamUnit::Count.to_string(), "count");
    }
}
