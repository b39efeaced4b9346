//! SVG plots of bench reports (plotters' SVG backend only: no font or
//! system library is needed).
//!
//! - `churn`: delete + add latency against guest size, per configuration
//!   (the host call solid, until every vCPU runs CPL3 again dashed-dotted);
//! - `mmio-rr`: transactions per second per configuration and memslot
//!   count, as bars;
//! - `faults`: first touch and re-touch time per configuration, as bars;
//! - `reclaim`: faults and pages zapped over time per policy.

use plotters::prelude::*;

use super::{BenchError, BenchReport};

const COLORS: [RGBColor; 6] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
];

fn color(i: usize) -> RGBColor {
    COLORS[i % COLORS.len()]
}

/// Writes the plot of `report` to `path` (an `.svg` file).
pub fn write_svg(report: &BenchReport, path: &str) -> Result<(), BenchError> {
    let fail = |e: &dyn std::fmt::Display| BenchError::Plot {
        path: path.to_string(),
        detail: e.to_string(),
    };
    let result = match report.bench.as_str() {
        "churn" => churn(report, path),
        "reclaim" => reclaim(report, path),
        "mmio-rr" => bars(report, path, &["rr_per_s"], "transactions / s"),
        _ => bars(report, path, &["first_touch_ms", "retouch_ms"], "ms"),
    };
    result.map_err(|e| fail(&e))
}

type PlotResult = Result<(), Box<dyn std::error::Error>>;

/// A polyline of (x, y) points.
type Line = Vec<(f64, f64)>;

fn mib(param: &str) -> Option<f64> {
    param.strip_suffix("MiB")?.parse().ok()
}

fn churn(report: &BenchReport, path: &str) -> PlotResult {
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut points: Vec<(String, &str, Line)> = Vec::new();
    for config in &report.configs {
        for metric in ["call_ms", "resume_ms"] {
            let mut line: Vec<(f64, f64)> = report
                .rows
                .iter()
                .filter(|r| &r.config == config && r.metric == metric)
                .filter_map(|r| Some((mib(&r.param)?, r.median()?.max(1e-3))))
                .collect();
            line.sort_by(|a, b| a.0.total_cmp(&b.0));
            points.push((config.clone(), metric, line));
        }
    }
    let all = points.iter().flat_map(|p| p.2.iter());
    let (mut xmax, mut ymin, mut ymax) = (1.0f64, f64::MAX, 1e-3f64);
    for &(x, y) in all {
        xmax = xmax.max(x);
        ymin = ymin.min(y);
        ymax = ymax.max(y);
    }
    let ymin = if ymin == f64::MAX { 1e-3 } else { ymin / 2.0 };
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "memslot delete + add with every vCPU waiting",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..xmax * 1.1, (ymin..ymax * 2.0).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("guest memory (MiB)")
        .y_desc("ms (log scale)")
        .draw()?;
    for (i, (config, metric, line)) in points.into_iter().enumerate() {
        let c = color(i / 2);
        let label = format!(
            "{config}: {}",
            if metric == "call_ms" {
                "host call"
            } else {
                "until all vCPUs at CPL3"
            }
        );
        let style = if metric == "call_ms" {
            c.stroke_width(2)
        } else {
            c.stroke_width(1)
        };
        chart
            .draw_series(LineSeries::new(line.clone(), style))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
        chart.draw_series(line.into_iter().map(|p| Circle::new(p, 3, c.filled())))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    Ok(())
}

fn reclaim(report: &BenchReport, path: &str) -> PlotResult {
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let xmax = report
        .timelines
        .iter()
        .map(|t| t.last().accesses)
        .max()
        .unwrap_or(1) as f64;
    let ymax = report
        .timelines
        .iter()
        .map(|t| t.last().faults.max(t.last().zapped))
        .max()
        .unwrap_or(1) as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "shadow pages at a 64-page limit: faults and pages zapped over time",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..xmax, 0f64..ymax * 1.05)?;
    chart
        .configure_mesh()
        .x_desc("guest reads")
        .y_desc("so far")
        .draw()?;
    for (i, t) in report.timelines.iter().enumerate() {
        let c = color(i);
        let series: [(&str, u32, Line); 3] = [
            (
                "faults (pages referenced again)",
                2,
                t.points
                    .iter()
                    .map(|p| (p.accesses as f64, p.faults as f64))
                    .collect(),
            ),
            (
                "pages zapped",
                1,
                t.points
                    .iter()
                    .map(|p| (p.accesses as f64, p.zapped as f64))
                    .collect(),
            ),
            (
                "directory pages zapped (in use)",
                3,
                t.points
                    .iter()
                    .map(|p| (p.accesses as f64, p.zapped_directories as f64))
                    .collect(),
            ),
        ];
        for (what, width, line) in series {
            let style = c.stroke_width(width);
            chart
                .draw_series(LineSeries::new(line, style))?
                .label(format!("{}: {what}", t.config))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    Ok(())
}

/// One bar per (configuration, parameter, metric) median.
fn bars(report: &BenchReport, path: &str, metrics: &[&str], unit: &str) -> PlotResult {
    let root = SVGBackend::new(path, (1000, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut items: Vec<(String, f64, usize)> = Vec::new();
    for (m, metric) in metrics.iter().enumerate() {
        for param in report.params() {
            for (c, config) in report.configs.iter().enumerate() {
                if let Some(v) = report.median(config, &param, metric) {
                    items.push((
                        format!("{config} {param} {metric}"),
                        v,
                        c + m * report.configs.len(),
                    ));
                }
            }
        }
    }
    let ymax = items.iter().map(|i| i.1).fold(1e-9, f64::max);
    let n = items.len().max(1);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{}: medians per configuration", report.bench),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(20)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..n as f64, 0f64..ymax * 1.25)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc(unit)
        .draw()?;
    for (i, (label, v, c)) in items.into_iter().enumerate() {
        let x = i as f64;
        let col = color(c);
        chart.draw_series(std::iter::once(Rectangle::new(
            [(x + 0.1, 0.0), (x + 0.9, v)],
            col.filled(),
        )))?;
        chart.draw_series(std::iter::once(Text::new(
            format!("{label}: {v:.1}"),
            (x + 0.15, v + ymax * 0.02),
            ("sans-serif", 11)
                .into_font()
                .transform(FontTransform::Rotate270),
        )))?;
    }
    root.present()?;
    Ok(())
}
