//! Plots of bench reports: SVG from plotters' SVG backend, and PNG by
//! rendering that SVG with resvg (pure Rust; the text needs a TrueType
//! font, see [`write_png`]).
//!
//! - `churn`: delete + add latency against guest size, per configuration
//!   (the host call solid, until every vCPU runs CPL3 again dashed), on a
//!   log scale;
//! - `mmio-rr`: transactions per second per configuration, grouped by
//!   memslot count, as bars with their values;
//! - `faults`: first touch and re-touch time per configuration, grouped by
//!   guest size, as bars with their values;
//! - `reclaim`: panels over the guest's reads, one line per policy:
//!   faults so far; directory pages zapped so far (the in-use pages a
//!   policy should not zap), on a scale of its own; and, one panel per
//!   policy, the shadow pages in use: a saw-tooth that climbs to the
//!   limit and drops at each reclaim.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::{BenchError, BenchReport};

const COLORS: [RGBColor; 6] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
];

/// The font of every text: plotters names the family, the SVG renderer
/// maps it to a real font.
const FONT: &str = "sans-serif";

/// Where [`write_png`] looks for fonts first.
pub const FONT_DIR: &str = "/usr/share/fonts/truetype/dejavu";

fn color(i: usize) -> RGBColor {
    COLORS[i % COLORS.len()]
}

/// Writes the plot of `report` to `path`: PNG if the name ends in `.png`,
/// else SVG.
pub fn write(report: &BenchReport, path: &str) -> Result<(), BenchError> {
    if path.to_ascii_lowercase().ends_with(".png") {
        write_png(report, path)
    } else {
        write_svg(report, path)
    }
}

/// Writes the plot of `report` to `path` as SVG.
pub fn write_svg(report: &BenchReport, path: &str) -> Result<(), BenchError> {
    let svg = svg(report)?;
    std::fs::write(path, svg).map_err(|e| plot_error(path, &e))
}

/// Writes the plot of `report` to `path` as PNG: the SVG rendered with
/// resvg, text in DejaVu Sans from [`FONT_DIR`] if it is there, else in
/// the system's sans-serif font.
pub fn write_png(report: &BenchReport, path: &str) -> Result<(), BenchError> {
    let png = png(&svg(report)?).map_err(|e| plot_error(path, &e))?;
    std::fs::write(path, png).map_err(|e| plot_error(path, &e))
}

fn plot_error(path: &str, e: &dyn std::fmt::Display) -> BenchError {
    BenchError::Plot {
        path: path.to_string(),
        detail: e.to_string(),
    }
}

/// The plot of `report` as SVG text.
pub fn svg(report: &BenchReport) -> Result<String, BenchError> {
    let mut svg = String::new();
    let result =
        {
            let size = if report.bench == "reclaim" {
                (1000, 900)
            } else {
                (1000, 600)
            };
            let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
            match report.bench.as_str() {
            "churn" => churn(report, &root),
            "reclaim" => reclaim(report, &root),
            "mmio-rr" => bars(
                report,
                &root,
                &[("rr_per_s", "")],
                "mmio-rr: MMIO request/response transactions per second (median), by memslot count",
                "transactions per second",
                "memslots in the VM",
            ),
            _ => bars(
                report,
                &root,
                &[("first_touch_ms", "first touch"), ("retouch_ms", "re-touch")],
                "faults: time to touch every page of the guest (median)",
                "milliseconds for all vCPUs",
                "guest memory, and first touch or re-touch after a memslot churn",
            ),
        }
        .and_then(|()| root.present().map_err(Into::into))
        };
    result.map_err(|e| plot_error(&format!("({} plot)", report.bench), &e))?;
    Ok(svg)
}

/// Renders SVG text to PNG bytes.
pub fn png(svg: &str) -> Result<Vec<u8>, String> {
    use resvg::{tiny_skia, usvg};
    let mut options = usvg::Options::default();
    let fonts = options.fontdb_mut();
    if Path::new(FONT_DIR).is_dir() {
        fonts.load_fonts_dir(FONT_DIR);
    }
    if fonts.is_empty() {
        fonts.load_system_fonts();
    }
    if fonts.is_empty() {
        return Err(format!(
            "no font found in {FONT_DIR} or the system's font directories"
        ));
    }
    let sans = fonts
        .faces()
        .find(|f| f.families.iter().any(|(name, _)| name == "DejaVu Sans"))
        .or_else(|| fonts.faces().next())
        .and_then(|f| f.families.first().map(|(name, _)| name.clone()));
    if let Some(family) = sans {
        fonts.set_sans_serif_family(family.clone());
        options.font_family = family;
    }
    let tree = usvg::Tree::from_str(svg, &options).map_err(|e| e.to_string())?;
    let size = tree.size().to_int_size();
    let mut pixmap = tiny_skia::Pixmap::new(size.width(), size.height())
        .ok_or_else(|| "the plot has no area".to_string())?;
    pixmap.fill(tiny_skia::Color::WHITE);
    resvg::render(&tree, tiny_skia::Transform::default(), &mut pixmap.as_mut());
    pixmap.encode_png().map_err(|e| e.to_string())
}

type PlotResult = Result<(), Box<dyn std::error::Error>>;

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

/// A polyline of (x, y) points.
type Line = Vec<(f64, f64)>;

fn mib(param: &str) -> Option<f64> {
    param.strip_suffix("MiB")?.parse().ok()
}

/// Powers of ten (and 2 and 5 times them) for a log axis.
fn log_label(v: &f64) -> String {
    crate::fmt_value(*v)
}

fn churn(report: &BenchReport, root: &Area<'_>) -> PlotResult {
    root.fill(&WHITE)?;
    let mut points: Vec<(usize, String, &str, Line)> = Vec::new();
    for (c, config) in report.configs.iter().enumerate() {
        for metric in ["call_ms", "resume_ms"] {
            let mut line: Vec<(f64, f64)> = report
                .rows
                .iter()
                .filter(|r| &r.config == config && r.metric == metric)
                .filter_map(|r| Some((mib(&r.param)?, r.median()?.max(1e-3))))
                .collect();
            line.sort_by(|a, b| a.0.total_cmp(&b.0));
            points.push((c, config.clone(), metric, line));
        }
    }
    let all = points.iter().flat_map(|p| p.3.iter());
    let (mut xmin, mut xmax, mut ymin, mut ymax) = (f64::MAX, 1.0f64, f64::MAX, 1e-3f64);
    for &(x, y) in all {
        xmin = xmin.min(x);
        xmax = xmax.max(x);
        ymin = ymin.min(y);
        ymax = ymax.max(y);
    }
    let xmin = if xmin == f64::MAX { 0.0 } else { xmin };
    let ymin = if ymin == f64::MAX { 1e-3 } else { ymin / 2.0 };
    let xpad = ((xmax - xmin) * 0.08).max(16.0);
    let mut chart = ChartBuilder::on(root)
        .caption(
            "churn: one memslot delete + add while every vCPU waits (median)",
            (FONT, 22),
        )
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(
            (xmin - xpad).max(0.0)..xmax + xpad,
            (ymin..ymax * 4.0).log_scale(),
        )?;
    chart
        .configure_mesh()
        .x_desc("guest memory (MiB)")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_desc("milliseconds (log scale)")
        .y_label_formatter(&log_label)
        .axis_desc_style((FONT, 16))
        .label_style((FONT, 14))
        .draw()?;
    for (c, config, metric, line) in points {
        let col = color(c);
        let call = metric == "call_ms";
        let label = format!(
            "{config}: {}",
            if call {
                "host call"
            } else {
                "until every vCPU runs CPL3 again"
            }
        );
        let style = col.stroke_width(if call { 3 } else { 2 });
        if call {
            chart
                .draw_series(LineSeries::new(line.clone(), style))?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], style));
        } else {
            chart
                .draw_series(DashedLineSeries::new(line.clone(), 8, 5, style))?
                .label(label)
                .legend(move |(x, y)| {
                    EmptyElement::at((x, y))
                        + PathElement::new(vec![(0, 0), (9, 0)], style)
                        + PathElement::new(vec![(15, 0), (24, 0)], style)
                });
        }
        chart.draw_series(line.into_iter().map(|p| Circle::new(p, 4, col.filled())))?;
    }
    chart
        .configure_series_labels()
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    Ok(())
}

/// One panel of the reclaim plot: one line per policy in `timelines`.
fn reclaim_panel(
    area: &Area<'_>,
    timelines: &[(usize, &super::ReclaimTimeline)],
    title: &str,
    y_desc: &str,
    value: &dyn Fn(&[super::ReclaimPoint], usize) -> f64,
) -> PlotResult {
    let lines: Vec<Line> = timelines
        .iter()
        .map(|(_, t)| {
            (0..t.points.len())
                .map(|i| (t.points[i].accesses as f64, value(&t.points, i)))
                .collect()
        })
        .collect();
    let xmax = lines
        .iter()
        .flat_map(|l| l.iter().map(|p| p.0))
        .fold(1.0, f64::max);
    let ymax = lines
        .iter()
        .flat_map(|l| l.iter().map(|p| p.1))
        .fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FONT, 17))
        .margin(10)
        .x_label_area_size(42)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..xmax, 0f64..ymax * 1.2)?;
    chart
        .configure_mesh()
        .x_desc("guest page reads so far")
        .y_desc(y_desc)
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .axis_desc_style((FONT, 15))
        .label_style((FONT, 13))
        .draw()?;
    // A panel of one policy names it in its title: no legend, and the
    // area under the line filled.
    let single = timelines.len() == 1;
    for ((c, t), line) in timelines.iter().zip(lines) {
        let col = color(*c);
        let style = col.stroke_width(2);
        if single {
            chart.draw_series(AreaSeries::new(line, 0.0, col.mix(0.12)).border_style(style))?;
            continue;
        }
        chart
            .draw_series(LineSeries::new(line, style))?
            .label(t.config.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], style));
    }
    if single {
        return Ok(());
    }
    chart
        .configure_series_labels()
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    Ok(())
}

fn reclaim(report: &BenchReport, root: &Area<'_>) -> PlotResult {
    root.fill(&WHITE)?;
    let root = root.titled(
        &format!(
            "reclaim: shadow pages at a {}-page limit on the soft vCPU, by reclaim policy",
            super::SHADOW_PAGE_LIMIT
        ),
        (FONT, 22),
    )?;
    let all: Vec<(usize, &super::ReclaimTimeline)> = report.timelines.iter().enumerate().collect();
    let rows = root.split_evenly((3, 1));
    reclaim_panel(
        &rows[0],
        &all,
        "faults so far (guest pages the MMU had to map again)",
        "faults",
        &|p, i| p[i].faults as f64,
    )?;
    reclaim_panel(
        &rows[1],
        &all,
        "directory pages zapped so far (each was in use: its tables are read every round)",
        "directory pages",
        &|p, i| p[i].zapped_directories as f64,
    )?;
    // One panel per policy: their saw-teeth would hide each other.
    let teeth = rows[2].split_evenly((1, all.len().max(1)));
    for (area, one) in teeth.iter().zip(&all) {
        reclaim_panel(
            area,
            std::slice::from_ref(one),
            &format!(
                "{}: shadow pages in use (each drop is a reclaim)",
                one.1.config
            ),
            "shadow pages",
            &|p, i| p[i].in_use as f64,
        )?;
    }
    Ok(())
}

/// Bars of medians: one group per (metric, parameter), one bar per
/// configuration (its color in the legend), each labelled with its value.
fn bars(
    report: &BenchReport,
    root: &Area<'_>,
    metrics: &[(&str, &str)],
    title: &str,
    y_desc: &str,
    x_desc: &str,
) -> PlotResult {
    root.fill(&WHITE)?;
    let configs = &report.configs;
    let mut groups: Vec<(String, Vec<Option<f64>>)> = Vec::new();
    for (metric, what) in metrics {
        for param in report.params() {
            let values: Vec<Option<f64>> = configs
                .iter()
                .map(|c| report.median(c, &param, metric))
                .collect();
            if values.iter().any(Option::is_some) {
                let label = if what.is_empty() {
                    match param.strip_suffix("slots") {
                        Some("1") => "1 memslot".to_string(),
                        Some(n) => format!("{n} memslots"),
                        None => param.replace("MiB", " MiB"),
                    }
                } else {
                    format!("{}, {what}", param.replace("MiB", " MiB"))
                };
                groups.push((label, values));
            }
        }
    }
    let ymax = groups
        .iter()
        .flat_map(|g| g.1.iter().flatten())
        .fold(1e-9_f64, |a, &b| a.max(b));
    let n = groups.len().max(1);
    let mut chart = ChartBuilder::on(root)
        .caption(title, (FONT, 20))
        .margin(16)
        .x_label_area_size(60)
        .y_label_area_size(90)
        .build_cartesian_2d(0f64..n as f64, 0f64..ymax * 1.3)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .x_desc(x_desc)
        .y_desc(y_desc)
        .y_label_formatter(&|v| crate::fmt_value(*v))
        .axis_desc_style((FONT, 16))
        .label_style((FONT, 14))
        .draw()?;
    let width = 0.8 / configs.len().max(1) as f64;
    for (c, config) in configs.iter().enumerate() {
        let col = color(c);
        let rects: Vec<Rectangle<(f64, f64)>> = groups
            .iter()
            .enumerate()
            .filter_map(|(g, (_, values))| {
                let v = values[c]?;
                let x = g as f64 + 0.1 + c as f64 * width;
                Some(Rectangle::new(
                    [(x + width * 0.08, 0.0), (x + width * 0.92, v)],
                    col.filled(),
                ))
            })
            .collect();
        chart
            .draw_series(rects)?
            .label(config.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], col.filled()));
        let labels: Vec<Text<'_, (f64, f64), String>> = groups
            .iter()
            .enumerate()
            .filter_map(|(g, (_, values))| {
                let v = values[c]?;
                let x = g as f64 + 0.1 + (c as f64 + 0.5) * width;
                Some(Text::new(
                    crate::fmt_value(v),
                    (x, v),
                    TextStyle::from((FONT, 13).into_font())
                        .pos(Pos::new(HPos::Center, VPos::Bottom)),
                ))
            })
            .collect();
        chart.draw_series(labels)?;
    }
    // The group names under the x axis, centred under their bars.
    for (g, (label, _)) in groups.iter().enumerate() {
        let (x, y) = chart.backend_coord(&(g as f64 + 0.5, 0.0));
        root.draw(&Text::new(
            label.clone(),
            (x, y + 8),
            TextStyle::from((FONT, 15).into_font()).pos(Pos::new(HPos::Center, VPos::Top)),
        ))?;
    }
    chart
        .configure_series_labels()
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    Ok(())
}
