//! Run statistics kept whether or not a trace is: latency distributions (HDR histograms), bytes moved per
//! device and access path, and sampled time series (residency, DMA in flight).
//!
//! Host-side measurement, not a kernel mechanism; it plays the part `perf` histograms and gem5's stats play
//! for real systems. Model code feeds it through [`crate::Sim`]: a [`crate::Span`] records its duration
//! under its kind when it ends, [`crate::Sim::latency`] records one duration, [`crate::Sim::transfer`] one
//! transfer, [`crate::Sim::gauge`] one sample. Histograms keep 3 significant digits (values within 0.1 %),
//! in nanoseconds of simulated time.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use peerdma_core::{SimDuration, SimTime};

/// Samples one gauge series keeps; later samples are counted, not stored.
pub const SERIES_CAP: usize = 100_000;

/// Bytes moved by one device over one access path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transfer {
    /// Bytes landed.
    pub bytes: u64,
    /// Requests landed.
    pub requests: u64,
    /// When the first of them was issued.
    pub first: Option<SimTime>,
    /// When the last of them landed.
    pub last: SimTime,
}

impl Transfer {
    /// Returns the bandwidth in GB/s (10^9 bytes per second) over the time from the first issue to the last
    /// landing (0 for an instant). *Coarse:* idle gaps between bursts count as time.
    pub fn gbps(&self) -> f64 {
        let span = self
            .first
            .map_or(0, |f| self.last.as_nanos().saturating_sub(f.as_nanos()));
        if span == 0 {
            return 0.0;
        }
        #[expect(clippy::cast_precision_loss, reason = "a rate for display")]
        let r = self.bytes as f64 / span as f64;
        r
    }
}

/// One sampled series: `(time, value)` in time order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Series {
    /// The samples kept (at most [`SERIES_CAP`]).
    pub points: Vec<(SimTime, i64)>,
    /// Samples dropped past the cap.
    pub dropped: u64,
}

/// Every statistic of a run (module docs).
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Duration distributions by kind (`cpu.fault`, `dma.request`), in nanoseconds.
    pub latencies: BTreeMap<String, Histogram<u64>>,
    /// Bytes moved, by (device, path).
    pub transfers: BTreeMap<(String, &'static str), Transfer>,
    /// Sampled series by name (`residency.mirror0`, `dma.outstanding.nic0`).
    pub series: BTreeMap<String, Series>,
}

impl Stats {
    /// Records one duration under `name`.
    pub fn record_latency(&mut self, name: &str, d: SimDuration) {
        let h = match self.latencies.get_mut(name) {
            Some(h) => h,
            None => self.latencies.entry(name.to_owned()).or_insert_with(|| {
                Histogram::new(3).expect("3 significant digits is a valid precision")
            }),
        };
        // An auto-resizing histogram grows to any u64; should growing fail, the value is clamped.
        if h.record(d.as_nanos()).is_err() {
            h.saturating_record(d.as_nanos());
        }
    }

    /// Records one transfer of `bytes` by `device` over `path`, issued at `start` and landed at `end`.
    pub fn record_transfer(
        &mut self,
        device: &str,
        path: &'static str,
        bytes: u64,
        start: SimTime,
        end: SimTime,
    ) {
        let t = self.transfers.entry((device.to_owned(), path)).or_default();
        t.bytes += bytes;
        t.requests += 1;
        t.first = Some(t.first.map_or(start, |f| f.min(start)));
        t.last = t.last.max(end);
    }

    /// Records one sample of series `name`.
    pub fn record_sample(&mut self, name: &str, at: SimTime, value: i64) {
        let s = match self.series.get_mut(name) {
            Some(s) => s,
            None => self.series.entry(name.to_owned()).or_default(),
        };
        if s.points.len() < SERIES_CAP {
            s.points.push((at, value));
        } else {
            s.dropped += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_keep_their_percentiles() {
        let mut s = Stats::default();
        for ns in 1..=1000 {
            s.record_latency("x", SimDuration::from_nanos(ns * 10));
        }
        let h = &s.latencies["x"];
        assert_eq!(h.len(), 1000);
        let p50 = h.value_at_quantile(0.5);
        assert!((4995..=5005).contains(&p50), "{p50}");
        assert!(h.max() >= 9990 && h.max() <= 10_010);
    }

    #[test]
    fn transfers_sum_bytes_and_span_their_time() {
        let mut s = Stats::default();
        s.record_transfer("nic", "iommu", 4096, SimTime(100), SimTime(1100));
        s.record_transfer("nic", "iommu", 4096, SimTime(50), SimTime(2098));
        let t = s.transfers[&("nic".to_owned(), "iommu")];
        assert_eq!(
            (t.bytes, t.requests, t.first, t.last),
            (8192, 2, Some(SimTime(50)), SimTime(2098))
        );
        assert!((t.gbps() - 4.0).abs() < 1e-9);
    }

    #[test]
    fn a_series_stops_storing_at_its_cap() {
        let mut s = Stats::default();
        for i in 0..(SERIES_CAP + 5) {
            s.record_sample("r", SimTime(i as u64), 1);
        }
        assert_eq!(s.series["r"].points.len(), SERIES_CAP);
        assert_eq!(s.series["r"].dropped, 5);
    }
}
