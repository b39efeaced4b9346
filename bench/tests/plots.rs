//! Every bench's plot renders to SVG and to PNG (resvg, pure Rust), with
//! its text drawn in a real font. The KVM benches' reports are built by
//! hand here (their measurement is `bench_kvm.rs`'s); `reclaim` is
//! measured for real on the soft vCPU.

use mmu_bench::plot;
use mmu_bench::{BenchKind, BenchOptions, BenchReport, run_bench};

/// Reads a PNG's width and height from its IHDR chunk.
fn png_size(png: &[u8]) -> (u32, u32) {
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    let word = |at: usize| u32::from_be_bytes([png[at], png[at + 1], png[at + 2], png[at + 3]]);
    (word(16), word(20))
}

fn hand_made(bench: BenchKind) -> BenchReport {
    let mut r = BenchReport::new(bench);
    match bench {
        BenchKind::Churn => {
            r.configs = vec!["shadow-fast".into(), "shadow-naive".into(), "ept".into()];
            for (c, base) in [("shadow-fast", 0.2), ("shadow-naive", 3.0), ("ept", 0.1)] {
                for (size, scale) in [("64MiB", 1.0), ("256MiB", 4.0)] {
                    r.push(c, size, "call_ms", base * scale);
                    r.push(c, size, "resume_ms", base * scale * 3.0);
                }
            }
        }
        BenchKind::MmioRr => {
            r.configs = vec!["shadow-cache-on".into(), "ept-cache-on".into()];
            for (c, v) in [("shadow-cache-on", 7300.0), ("ept-cache-on", 5100.0)] {
                r.push(c, "1slots", "rr_per_s", v);
                r.push(c, "512slots", "rr_per_s", v * 0.9);
            }
        }
        _ => {
            r.configs = vec!["shadow-prefetch".into(), "ept".into()];
            for (c, v) in [("shadow-prefetch", 120.0), ("ept", 80.0)] {
                r.push(c, "128MiB", "first_touch_ms", v);
                r.push(c, "128MiB", "retouch_ms", v / 3.0);
            }
        }
    }
    r
}

#[test]
fn every_bench_plot_renders_to_png_with_text() {
    let reclaim = run_bench(
        BenchKind::Reclaim,
        &BenchOptions {
            quick: true,
            runs: Some(1),
            ..BenchOptions::default()
        },
    )
    .expect("reclaim on the soft vCPU");
    let reports = [
        hand_made(BenchKind::Churn),
        hand_made(BenchKind::MmioRr),
        hand_made(BenchKind::Faults),
        reclaim,
    ];
    let dir = std::env::temp_dir().join(format!("mmu-bench-plots-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for report in &reports {
        let svg = plot::svg(report).expect("svg");
        assert!(svg.contains("<text"), "{}: no text", report.bench);
        for config in &report.configs {
            assert!(
                svg.contains(config.as_str()),
                "{}: no legend entry {config}",
                report.bench
            );
        }
        let png = plot::png(&svg).expect("png");
        let (w, h) = png_size(&png);
        assert!(w >= 900 && h >= 500, "{}: {w}x{h}", report.bench);
        // The same through the file writer, by the name's extension.
        let path = dir.join(format!("{}.png", report.bench));
        plot::write(report, path.to_str().unwrap()).expect("write png");
        assert_eq!(std::fs::read(&path).unwrap(), png);
        let path = dir.join(format!("{}.svg", report.bench));
        plot::write(report, path.to_str().unwrap()).expect("write svg");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), svg);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn text_is_drawn_in_a_real_font() {
    // The same plot with its text and without: the text must change pixels.
    let report = hand_made(BenchKind::MmioRr);
    let svg = plot::svg(&report).unwrap();
    let blank = svg
        .split("<text")
        .enumerate()
        .map(|(i, part)| {
            if i == 0 {
                part.to_string()
            } else {
                // Drop the text element, keep what follows it.
                part.split_once("</text>")
                    .map_or(String::new(), |(_, rest)| rest.to_string())
            }
        })
        .collect::<String>();
    assert_ne!(plot::png(&svg).unwrap(), plot::png(&blank).unwrap());
}
