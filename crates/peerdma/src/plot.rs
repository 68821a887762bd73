//! `--plot DIR`: SVG charts of a run (latency CDFs, DMA throughput, fault counts and residency over
//! simulated time) and of a sweep (a metric against the swept parameter), drawn with `plotters`' SVG
//! backend. Host-side tooling: it only draws what the report measured.

use std::path::{Path, PathBuf};

use peerdma_scenario::Report;
use plotters::prelude::*;

/// An error while drawing, as text.
type PlotResult<T> = Result<T, String>;

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

const SIZE: (u32, u32) = (900, 540);

/// The palette lines cycle through.
fn color(i: usize) -> RGBColor {
    const C: [RGBColor; 8] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
    ];
    C[i % C.len()]
}

/// One named line of `(x, y)` points.
struct Line {
    name: String,
    points: Vec<(f64, f64)>,
}

/// Draws `lines` into `path` as one chart; nothing is written when there is nothing to draw. `step`
/// draws each line as a staircase (a counter that holds its value until the next sample).
fn chart(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    lines: &[Line],
    step: bool,
) -> PlotResult<bool> {
    let all = || lines.iter().flat_map(|l| l.points.iter());
    if all().next().is_none() {
        return Ok(false);
    }
    let (mut x0, mut x1, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, 0f64);
    for &(x, y) in all() {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y1 = y1.max(y);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if y1 <= 0.0 {
        y1 = 1.0;
    }
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut c = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(x0..x1, 0f64..y1 * 1.05)
            .map_err(err)?;
        c.configure_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .draw()
            .map_err(err)?;
        for (i, l) in lines.iter().enumerate() {
            let col = color(i);
            let pts: Vec<(f64, f64)> = if step {
                let mut v = Vec::with_capacity(l.points.len() * 2);
                for w in l.points.windows(2) {
                    v.push(w[0]);
                    v.push((w[1].0, w[0].1));
                }
                v.extend(l.points.last());
                v
            } else {
                l.points.clone()
            };
            c.draw_series(LineSeries::new(pts, col.stroke_width(2)))
                .map_err(err)?
                .label(l.name.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], col.stroke_width(2))
                });
        }
        c.configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    std::fs::write(path, svg).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(true)
}

#[expect(clippy::cast_precision_loss, reason = "plot coordinates")]
fn f(v: u64) -> f64 {
    v as f64
}

#[expect(clippy::cast_precision_loss, reason = "plot coordinates")]
fn fi(v: i64) -> f64 {
    v as f64
}

/// Writes the run's charts into `dir` (created if missing); returns the files written. A chart with no
/// data (no DMA in the run, no devices) is not written.
pub(crate) fn run_plots(report: &Report, dir: &Path) -> PlotResult<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut written = Vec::new();
    let mut out = |name: &str, drew: bool| {
        if drew {
            written.push(dir.join(name));
        }
    };
    // Latency CDFs of the protocol phases (steps aside), x in microseconds.
    let cdfs: Vec<Line> = report
        .latency
        .iter()
        .filter(|(k, l)| !k.starts_with("step.") && l.max_ns > 0)
        .map(|(k, l)| Line {
            name: format!("{k} ({})", l.count),
            points: std::iter::once((f(l.min_ns) / 1000.0, 0.0))
                .chain(l.cdf.iter().map(|&(v, p)| (f(v) / 1000.0, p)))
                .collect(),
        })
        .collect();
    out(
        "latency-cdf.svg",
        chart(
            &dir.join("latency-cdf.svg"),
            "Latency CDF",
            "latency (us)",
            "fraction",
            &cdfs,
            true,
        )?,
    );
    let series = |prefix: &str, scale: f64| -> Vec<Line> {
        report
            .series
            .iter()
            .filter(|(k, s)| k.starts_with(prefix) && !s.points.is_empty())
            .map(|(k, s)| Line {
                name: k.clone(),
                points: s
                    .points
                    .iter()
                    .map(|&(t, v)| (f(t.as_nanos()) / 1000.0, fi(v) * scale))
                    .collect(),
            })
            .collect()
    };
    // Throughput: the derivative of each device's landed bytes, in 100 windows of the run.
    let end_us = (f(report.end_time.as_nanos()) / 1000.0).max(1.0);
    let throughput: Vec<Line> = series("dma.bytes.", 1.0)
        .into_iter()
        .map(|l| {
            let bins = 100usize;
            let w = end_us / f(bins as u64);
            let mut landed = vec![0f64; bins];
            let mut prev = 0.0;
            for &(t, total) in &l.points {
                #[expect(
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss,
                    reason = "a bin index in 0..bins"
                )]
                let b = ((t / w) as usize).min(bins - 1);
                landed[b] += total - prev;
                prev = total;
            }
            Line {
                name: l.name.trim_start_matches("dma.bytes.").to_owned(),
                // bytes per microsecond = MB/s; / 1000 = GB/s
                points: landed
                    .iter()
                    .enumerate()
                    .map(|(i, &b)| (f(i as u64) * w + w / 2.0, b / w / 1000.0))
                    .collect(),
            }
        })
        .collect();
    out(
        "throughput.svg",
        chart(
            &dir.join("throughput.svg"),
            "DMA throughput",
            "simulated time (us)",
            "GB/s",
            &throughput,
            false,
        )?,
    );
    let mut faults = series("cpu.faults", 1.0);
    faults.extend(series("device.faults.", 1.0));
    out(
        "faults.svg",
        chart(
            &dir.join("faults.svg"),
            "Faults (cumulative)",
            "simulated time (us)",
            "faults",
            &faults,
            true,
        )?,
    );
    let residency = series("residency.", 1.0);
    out(
        "residency.svg",
        chart(
            &dir.join("residency.svg"),
            "Residency",
            "simulated time (us)",
            "pages",
            &residency,
            true,
        )?,
    );
    let outstanding = series("dma.outstanding.", 1.0);
    out(
        "dma-outstanding.svg",
        chart(
            &dir.join("dma-outstanding.svg"),
            "DMA requests in flight",
            "simulated time (us)",
            "requests",
            &outstanding,
            true,
        )?,
    );
    Ok(written)
}

/// Writes `sweep.svg` into `dir`: each run's simulated end time (µs) against the first swept parameter,
/// one line per seed.
pub(crate) fn sweep_plot(
    dir: &Path,
    param: &str,
    points: &[(u64, u64, u64)],
) -> PlotResult<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut seeds: Vec<u64> = points.iter().map(|p| p.1).collect();
    seeds.sort_unstable();
    seeds.dedup();
    let lines: Vec<Line> = seeds
        .iter()
        .map(|&s| {
            let mut pts: Vec<(f64, f64)> = points
                .iter()
                .filter(|p| p.1 == s)
                .map(|p| (f(p.0), f(p.2) / 1000.0))
                .collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            Line {
                name: format!("seed {s}"),
                points: pts,
            }
        })
        .collect();
    let path = dir.join("sweep.svg");
    let drew = chart(
        &path,
        &format!("Simulated run time against {param}"),
        param,
        "simulated time (us)",
        &lines,
        false,
    )?;
    Ok(if drew { vec![path] } else { Vec::new() })
}
