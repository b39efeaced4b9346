//! The measuring path of `mmu-vmm bench` on KVM, on tiny guests: every
//! configuration of churn, mmio-rr and faults runs once and reports a
//! figure. Checks only that each was measured and that the guests did what
//! the host asked (the session checks every touched page); no timing is
//! asserted. Skips (and passes) where /dev/kvm cannot be opened.

use mmu_integration::testing::kvm_or_skip;

use std::time::Duration;

use mmu_bench::{BenchKind, BenchOptions, run_bench};

fn tiny() -> BenchOptions {
    BenchOptions {
        vcpus: Some(2),
        sizes: Some(vec![16 << 20]),
        runs: Some(1),
        ops: Some(20),
        slots: Some(vec![1, 8]),
        quick: true,
        time_limit: Duration::from_secs(60),
        ..BenchOptions::default()
    }
}

#[test]
fn every_kvm_bench_measures_every_configuration_on_tiny_guests() {
    if !kvm_or_skip("every_kvm_bench_measures_every_configuration_on_tiny_guests") {
        return;
    }
    let churn = run_bench(BenchKind::Churn, &tiny()).expect("churn");
    for config in ["shadow-fast", "shadow-naive", "ept"] {
        for metric in ["first_touch_ms", "call_ms", "resume_ms"] {
            let row = churn.row(config, "16MiB", metric);
            assert_eq!(row.map(|r| r.values.len()), Some(1), "{config} {metric}");
        }
    }
    // The fast zap defers its reclaim; ept has none of its own to measure.
    assert!(churn.row("shadow-fast", "16MiB", "reclaim_ms").is_some());
    assert!(churn.row("ept", "16MiB", "reclaim_ms").is_none());
    assert_eq!(churn.ratios.len(), 4);
    assert!(
        churn.ratios.iter().all(|r| r.value.is_some()),
        "{:?}",
        churn.ratios
    );

    let rr = run_bench(BenchKind::MmioRr, &tiny()).expect("mmio-rr");
    for config in [
        "shadow-cache-on",
        "shadow-cache-off",
        "ept-cache-on",
        "ept-cache-off",
    ] {
        for slots in ["1slots", "8slots"] {
            let median = rr.median(config, slots, "rr_per_s");
            assert!(median.is_some_and(|m| m > 0.0), "{config} {slots}");
            let service = rr.median(config, slots, "mmio_service_median_ns");
            assert!(service.is_some_and(|ns| ns > 0.0), "{config} {slots}");
        }
    }
    // With caching on, repeated MMIO to a page is served from the cache;
    // with it off, never.
    for backend in ["shadow", "ept"] {
        let on = format!("{backend}-cache-on");
        let off = format!("{backend}-cache-off");
        assert!(
            rr.median(&on, "1slots", "cached_median_ns").is_some(),
            "{on}"
        );
        assert!(
            rr.median(&off, "1slots", "cached_median_ns").is_none(),
            "{off}"
        );
        assert!(
            rr.median(&off, "1slots", "uncached_median_ns").is_some(),
            "{off}"
        );
    }

    let faults = run_bench(BenchKind::Faults, &tiny()).expect("faults");
    for config in [
        "shadow-prefetch-table",
        "shadow-prefetch-on",
        "shadow-prefetch-off",
        "ept",
    ] {
        assert!(faults.median(config, "16MiB", "first_touch_ms").is_some());
        assert!(faults.median(config, "16MiB", "retouch_ms").is_some());
    }
    let json = faults.json();
    assert!(json.starts_with("{\"bench\": \"faults\""), "{json}");
    println!("{}\n{}\n{}", churn.text(), rr.text(), faults.text());
}
