//! Measurements of the MMU backends on real guests, shared by
//! `mmu-vmm bench` / `mmu-vmm compare` and the criterion benches of the
//! `benches` crate. The guests run on the reference VMM ([`mmu_vmm`]).
//!
//! | bench | what is timed | configurations |
//! | --- | --- | --- |
//! | [`BenchKind::Churn`] | vCPUs have written every 4 KiB page of their slice from CPL3 and spin at CPL3; one memslot delete + add: the host call, and the time until every vCPU runs CPL3 again | shadow fast zap, shadow naive zap, ept |
//! | [`BenchKind::MmioRr`] | request/response transactions per second through an MMIO doorbell and status register (netperf TCP_RR style) | shadow MMIO caching on / off, ept MMIO classification cache on / off; 1 and 512 memslots |
//! | [`BenchKind::Faults`] | first touch of the guest's memory, and a re-touch after a memslot churn | shadow prefetch on / off, ept |
//! | [`BenchKind::Reclaim`] | shadow pages referenced and zapped over time at a 64-page limit, on the soft vCPU | FIFO, parent-aware |
//!
//! Configurations are alternated within one run (A B C A B C ...), so a
//! drift of the shared machine hits each of them alike; each reports the
//! median of its runs, and [`BenchReport`] adds the ratios the claims rest
//! on. Nothing here asserts anything about time.
//!
//! On the host here `ept` means that KVM owns the second stage: with PVM it
//! is KVM's own in-kernel shadow MMU with its own fast zap, which makes it
//! the anchor the shadow backend is measured against.
#![deny(missing_docs)]

use std::fmt::Write as _;
use std::str::FromStr;
use std::time::Duration;

use mmu_backends::shadow::{ReclaimPolicy, ZapMode};
use mmu_backends::{BackendConfig, BackendKind, EptConfig};

use mmu_vmm::json::{self, Object};

pub mod guest;
mod kvm;
pub mod memory;
pub mod plot;
mod reclaim;
mod runner;
pub mod slots;

pub use kvm::{ChurnSample, RrSample, RrVm, Step, StepResult, TouchVm, WAIT_TAG, WaitMode, rr_vm};
pub use reclaim::{
    PAGE_LIMIT as SHADOW_PAGE_LIMIT, ReclaimPoint, ReclaimTimeline, reclaim_timeline,
};
pub use runner::{BenchOptions, compare, run_bench};

/// A bench of `mmu-vmm bench`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BenchKind {
    /// Memslot delete + add with every vCPU waiting.
    Churn,
    /// MMIO request/response rate.
    MmioRr,
    /// First touch, and re-touch after a churn.
    Faults,
    /// Reclaim policies at a 64-page limit.
    Reclaim,
}

impl BenchKind {
    /// Every bench, in the order `compare` runs them.
    pub const ALL: [BenchKind; 4] = [
        BenchKind::Churn,
        BenchKind::MmioRr,
        BenchKind::Faults,
        BenchKind::Reclaim,
    ];

    /// Its name on the command line.
    pub const fn name(self) -> &'static str {
        match self {
            BenchKind::Churn => "churn",
            BenchKind::MmioRr => "mmio-rr",
            BenchKind::Faults => "faults",
            BenchKind::Reclaim => "reclaim",
        }
    }
}

impl std::fmt::Display for BenchKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A bench name nobody knows.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown bench {name:?}: expected churn, mmio-rr, faults or reclaim")]
pub struct UnknownBench {
    /// The name given.
    pub name: String,
}

impl FromStr for BenchKind {
    type Err = UnknownBench;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        BenchKind::ALL
            .into_iter()
            .find(|b| b.name() == s)
            .ok_or_else(|| UnknownBench {
                name: s.to_string(),
            })
    }
}

/// Why a bench could not be measured.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BenchError {
    /// The options do not describe a bench this VMM can run.
    #[error("invalid bench options: {0}")]
    Options(String),
    /// Building the VM failed.
    #[error("cannot build the VM")]
    Setup(#[from] mmu_vmm::SetupError),
    /// Assembling the guest program failed.
    #[error("cannot assemble the guest program")]
    Kit(#[from] mmu_vmm::KitError),
    /// Setting up the workload failed.
    #[error("cannot set up the workload")]
    Plan(#[from] mmu_vmm::workload::PlanError),
    /// The guest run failed.
    #[error("the guest run failed")]
    Run(#[from] mmu_vmm::RunError),
    /// A memslot change failed.
    #[error("a memslot change failed")]
    Memslot(#[from] mmu_api::MemslotError),
    /// Guest memory could not be read or written.
    #[error("guest memory access failed")]
    Memory(#[from] vm_memory::GuestMemoryError),
    /// The guest did not do what the bench asked in time.
    #[error("the guest did not {what} within {limit:?}")]
    Timeout {
        /// What was waited for.
        what: String,
        /// How long.
        limit: Duration,
    },
    /// The guest's results are not what the host's model says.
    #[error("the guest's results are wrong: {0}")]
    Check(String),
    /// The soft-vCPU simulation failed.
    #[error("the soft vCPU simulation failed: {0}")]
    Soft(String),
    /// Writing a plot failed.
    #[error("cannot write the plot {path}: {detail}")]
    Plot {
        /// The file.
        path: String,
        /// Why.
        detail: String,
    },
}

/// One configuration of a bench: a backend and its settings.
#[derive(Clone, Debug)]
pub struct Configuration {
    /// Its name in tables, plots and JSON (`shadow-fast`).
    pub name: &'static str,
    /// The backend.
    pub kind: BackendKind,
    /// Its settings.
    pub backend: BackendConfig,
}

impl Configuration {
    fn shadow(name: &'static str, change: impl FnOnce(&mut mmu_backends::ShadowConfig)) -> Self {
        let mut backend = BackendConfig::default();
        change(&mut backend.shadow);
        Configuration {
            name,
            kind: BackendKind::Shadow,
            backend,
        }
    }

    fn ept(name: &'static str, config: EptConfig) -> Self {
        let mut backend = BackendConfig::default();
        backend.ept = config;
        Configuration {
            name,
            kind: BackendKind::Ept,
            backend,
        }
    }

    /// `churn`: shadow with the generation (fast) zap, shadow with the naive
    /// zap, and ept (KVM's own zap).
    pub fn churn() -> Vec<Configuration> {
        vec![
            Configuration::shadow("shadow-fast", |c| c.zap = ZapMode::Fast),
            Configuration::shadow("shadow-naive", |c| c.zap = ZapMode::Naive),
            Configuration::ept("ept", EptConfig::default()),
        ]
    }

    /// `mmio-rr`: MMIO caching on and off in both backends.
    pub fn mmio_rr() -> Vec<Configuration> {
        vec![
            Configuration::shadow("shadow-cache-on", |c| c.mmio_caching = true),
            Configuration::shadow("shadow-cache-off", |c| c.mmio_caching = false),
            Configuration::ept("ept-cache-on", EptConfig::default().with_mmio_cache(true)),
            Configuration::ept("ept-cache-off", EptConfig::default().with_mmio_cache(false)),
        ]
    }

    /// `faults`: shadow prefetching the whole guest table (every present,
    /// accessed entry of the 512), 8 neighbours (KVM's choice) and none,
    /// and ept (KVM's own fault path, which has its own prefetch).
    pub fn faults() -> Vec<Configuration> {
        vec![
            Configuration::shadow("shadow-prefetch-table", |c| c.prefetch = 512),
            Configuration::shadow("shadow-prefetch-on", |c| c.prefetch = 8),
            Configuration::shadow("shadow-prefetch-off", |c| c.prefetch = 0),
            Configuration::ept("ept", EptConfig::default()),
        ]
    }

    /// The reclaim policies `reclaim` compares.
    pub fn reclaim() -> Vec<(&'static str, ReclaimPolicy)> {
        vec![
            ("fifo", ReclaimPolicy::Fifo),
            ("parent-aware", ReclaimPolicy::ParentAware),
        ]
    }
}

/// The median of `values` (the mean of the middle two for an even count),
/// or None for none. NaNs sort last.
pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let n = sorted.len();
    Some(if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    })
}

/// `a / b`, or None when either is missing or `b` is not positive.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

/// One measured quantity of one configuration at one parameter (a guest
/// size, a memslot count), over the runs.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// The configuration.
    pub config: String,
    /// The parameter (`2048MiB`, `512slots`).
    pub param: String,
    /// What was measured (`call_ms`).
    pub metric: &'static str,
    /// Each run's value, in run order.
    pub values: Vec<f64>,
}

impl Row {
    /// The median over the runs.
    pub fn median(&self) -> Option<f64> {
        median(&self.values)
    }
}

/// A ratio of two medians.
#[derive(Clone, Debug, PartialEq)]
pub struct Ratio {
    /// What it compares (`shadow-naive / shadow-fast`).
    pub name: String,
    /// The parameter.
    pub param: String,
    /// The metric.
    pub metric: &'static str,
    /// The ratio (None if a median is missing or zero).
    pub value: Option<f64>,
}

/// What a metric means, for tables.
pub fn metric_description(metric: &str) -> &'static str {
    match metric {
        "call_ms" => "memslot delete + add, host call (ms)",
        "resume_ms" => "delete + add until every vCPU runs CPL3 again (ms)",
        "reclaim_ms" => "deferred: reclaim_obsolete + replay until CPL3 (ms)",
        "touch_ms" => "touch of every page (ms)",
        "first_touch_ms" => "first touch of every page (ms)",
        "retouch_ms" => "re-touch after a delete + add (ms)",
        "rr_per_s" => "MMIO transactions per second",
        "mmio_service_median_ns" => "MMU service of an MMIO access, median (ns, exit excluded)",
        "cached_median_ns" => {
            "MMIO served from the cache (MMIO SPTE / classification), median (ns)"
        }
        "cached_p99_ns" => "MMIO served from the cache, 99th percentile (ns)",
        "uncached_median_ns" => "MMIO served by walk and memslot search, median (ns)",
        "uncached_p99_ns" => "MMIO served by walk and memslot search, 99th percentile (ns)",
        "faults" => "faults the backend served",
        "zapped" => "shadow pages zapped",
        "zapped_directories" => "directory pages zapped (still in use)",
        _ => "",
    }
}

/// Everything one bench measured.
#[derive(Clone, Debug, Default)]
pub struct BenchReport {
    /// Which bench (`churn`).
    pub bench: String,
    /// The settings it ran with (vCPUs, sizes, runs).
    pub settings: Vec<(&'static str, String)>,
    /// The configurations, in the order they were alternated.
    pub configs: Vec<String>,
    /// Every measured quantity.
    pub rows: Vec<Row>,
    /// The ratios of medians.
    pub ratios: Vec<Ratio>,
    /// Reclaim timelines (only `reclaim`).
    pub timelines: Vec<ReclaimTimeline>,
    /// Notes on what the figures mean here.
    pub notes: Vec<String>,
    /// Wall time of the bench.
    pub elapsed: Duration,
}

impl BenchReport {
    /// A report for `bench`, empty.
    pub fn new(bench: BenchKind) -> Self {
        BenchReport {
            bench: bench.name().to_string(),
            ..BenchReport::default()
        }
    }

    /// Appends `value` to the row of (config, param, metric), creating it.
    pub fn push(&mut self, config: &str, param: &str, metric: &'static str, value: f64) {
        match self
            .rows
            .iter_mut()
            .find(|r| r.config == config && r.param == param && r.metric == metric)
        {
            Some(row) => row.values.push(value),
            None => self.rows.push(Row {
                config: config.to_string(),
                param: param.to_string(),
                metric,
                values: vec![value],
            }),
        }
    }

    /// The row of (config, param, metric).
    pub fn row(&self, config: &str, param: &str, metric: &str) -> Option<&Row> {
        self.rows
            .iter()
            .find(|r| r.config == config && r.param == param && r.metric == metric)
    }

    /// The median of (config, param, metric).
    pub fn median(&self, config: &str, param: &str, metric: &str) -> Option<f64> {
        self.row(config, param, metric).and_then(Row::median)
    }

    /// Adds the ratio of two configurations' medians at `param`.
    pub fn add_ratio(&mut self, a: &str, b: &str, param: &str, metric: &'static str) {
        let value = ratio(self.median(a, param, metric), self.median(b, param, metric));
        self.ratios.push(Ratio {
            name: format!("{a} / {b}"),
            param: param.to_string(),
            metric,
            value,
        });
    }

    /// Adds the ratio of one configuration's medians at two parameters
    /// (growth with size).
    pub fn add_growth(&mut self, config: &str, from: &str, to: &str, metric: &'static str) {
        let value = ratio(
            self.median(config, to, metric),
            self.median(config, from, metric),
        );
        self.ratios.push(Ratio {
            name: format!("{config} {to} / {from}"),
            param: to.to_string(),
            metric,
            value,
        });
    }

    /// The parameters, in the order first measured.
    pub fn params(&self) -> Vec<String> {
        let mut params: Vec<String> = Vec::new();
        for r in &self.rows {
            if !params.contains(&r.param) {
                params.push(r.param.clone());
            }
        }
        params
    }

    /// The report as a text table: one line per (metric, parameter,
    /// configuration) with the median and the runs, then the ratios.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let settings: Vec<String> = self
            .settings
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let _ = writeln!(
            out,
            "bench {}: {} (in {})",
            self.bench,
            settings.join(" "),
            mmu_vmm::units::duration(self.elapsed)
        );
        let _ = writeln!(
            out,
            "{:<22} {:<10} {:<20} {:>12} {:>5}  runs",
            "metric", "param", "config", "median", "n"
        );
        for r in &self.rows {
            let runs: Vec<String> = r.values.iter().map(|v| fmt_value(*v)).collect();
            let _ = writeln!(
                out,
                "{:<22} {:<10} {:<20} {:>12} {:>5}  {}",
                r.metric,
                r.param,
                r.config,
                r.median().map_or_else(|| "-".to_string(), fmt_value),
                r.values.len(),
                runs.join(" ")
            );
        }
        if !self.ratios.is_empty() {
            let _ = writeln!(out, "ratios of medians:");
            for r in &self.ratios {
                let _ = writeln!(
                    out,
                    "  {:<44} {:<10} {:<14} {}",
                    r.name,
                    r.param,
                    r.metric,
                    r.value.map_or_else(
                        || "-".to_string(),
                        |v| format!("{}x", mmu_vmm::units::sig3(v))
                    )
                );
            }
        }
        for t in &self.timelines {
            let last = t.points.last().copied().unwrap_or_default();
            let _ = writeln!(
                out,
                "timeline {}: {} accesses, {} faults, {} pages zapped ({} directories)",
                t.config, last.accesses, last.faults, last.zapped, last.zapped_directories
            );
        }
        for n in &self.notes {
            let _ = writeln!(out, "note: {n}");
        }
        let _ = writeln!(out, "metrics:");
        let mut seen = Vec::new();
        for r in &self.rows {
            if !seen.contains(&r.metric) {
                seen.push(r.metric);
                let _ = writeln!(out, "  {:<20} {}", r.metric, metric_description(r.metric));
            }
        }
        out.trim_end().to_string()
    }

    pub(crate) fn json_object(&self) -> Object {
        let rows = self.rows.iter().map(|r| {
            let mut o = Object::new()
                .str("config", &r.config)
                .str("param", &r.param)
                .str("metric", r.metric);
            o = match r.median() {
                Some(m) => o.float("median", m),
                None => o.raw("median", "null"),
            };
            o.raw(
                "runs",
                json::array(r.values.iter().map(|v| format!("{v:.6}"))),
            )
            .finish()
        });
        let ratios = self.ratios.iter().map(|r| {
            let o = Object::new()
                .str("name", &r.name)
                .str("param", &r.param)
                .str("metric", r.metric);
            match r.value {
                Some(v) => o.float("value", v),
                None => o.raw("value", "null"),
            }
            .finish()
        });
        let timelines = self.timelines.iter().map(ReclaimTimeline::json);
        let mut settings = Object::new();
        for (k, v) in &self.settings {
            settings = settings.str(k, v);
        }
        Object::new()
            .str("bench", &self.bench)
            .raw("settings", settings.finish())
            .raw(
                "configs",
                json::array(self.configs.iter().map(|c| json::string(c))),
            )
            .raw("results", json::array(rows))
            .raw("ratios", json::array(ratios))
            .raw("timelines", json::array(timelines))
            .raw(
                "notes",
                json::array(self.notes.iter().map(|n| json::string(n))),
            )
            .float("elapsed_s", self.elapsed.as_secs_f64())
    }

    /// The report as one JSON object on one line.
    pub fn json(&self) -> String {
        self.json_object().finish()
    }
}

/// `compare`'s reports as one JSON object.
pub fn compare_json(quick: bool, reports: &[BenchReport], elapsed: Duration) -> String {
    Object::new()
        .str("command", "compare")
        .bool("quick", quick)
        .raw(
            "benches",
            json::array(reports.iter().map(|r| r.json_object().finish())),
        )
        .float("elapsed_s", elapsed.as_secs_f64())
        .finish()
}

/// A value for tables: three significant digits or so.
/// A measured value: a whole number as it is, else to three significant
/// figures.
pub(crate) fn fmt_value(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        mmu_vmm::units::sig3(v)
    }
}

/// A guest size as a table parameter (`2048MiB`).
pub fn size_param(bytes: u64) -> String {
    format!("{}MiB", bytes >> 20)
}

/// A memslot count as a table parameter (`512slots`).
pub fn slots_param(slots: u32) -> String {
    format!("{slots}slots")
}

/// Parses a comma-separated list of sizes (`256M,1G`).
pub fn parse_sizes(s: &str) -> Result<Vec<u64>, String> {
    let sizes = s
        .split(',')
        .map(mmu_vmm::run::parse_size)
        .collect::<Result<Vec<u64>, String>>()?;
    if sizes.is_empty() || sizes.iter().any(|&s| s == 0 || s % (2 << 20) != 0) {
        return Err(format!(
            "invalid sizes {s:?}: each must be a non-zero multiple of 2 MiB"
        ));
    }
    Ok(sizes)
}

/// Parses a comma-separated list of memslot counts (`1,512`).
pub fn parse_slots(s: &str) -> Result<Vec<u32>, String> {
    let slots = s
        .split(',')
        .map(|v| {
            v.trim()
                .parse::<u32>()
                .map_err(|e| format!("invalid memslot count {v:?}: {e}"))
        })
        .collect::<Result<Vec<u32>, String>>()?;
    if slots.iter().any(|&n| n == 0 || n > kvm::MAX_SLOTS) {
        return Err(format!(
            "invalid memslot counts {s:?}: each must be 1..={}",
            kvm::MAX_SLOTS
        ));
    }
    Ok(slots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_of_odd_even_and_empty() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[2.0, f64::NAN, 1.0]), Some(2.0));
    }

    #[test]
    fn ratios_need_two_positive_medians() {
        assert_eq!(ratio(Some(6.0), Some(3.0)), Some(2.0));
        assert_eq!(ratio(Some(6.0), Some(0.0)), None);
        assert_eq!(ratio(None, Some(1.0)), None);
        assert_eq!(ratio(Some(1.0), None), None);
    }

    #[test]
    fn benches_and_lists_parse() {
        for b in BenchKind::ALL {
            assert_eq!(b.name().parse::<BenchKind>(), Ok(b));
        }
        assert_eq!(
            "tlb".parse::<BenchKind>().unwrap_err().to_string(),
            "unknown bench \"tlb\": expected churn, mmio-rr, faults or reclaim"
        );
        assert_eq!(
            parse_sizes("256M,1G,2G"),
            Ok(vec![256 << 20, 1 << 30, 2 << 30])
        );
        assert!(parse_sizes("3M").is_err());
        assert!(parse_sizes("0").is_err());
        assert!(parse_sizes("1G,,2G").is_err());
        assert_eq!(parse_slots("1,512"), Ok(vec![1, 512]));
        assert!(parse_slots("0").is_err());
        assert!(parse_slots("x").is_err());
        assert_eq!(size_param(2 << 30), "2048MiB");
        assert_eq!(slots_param(512), "512slots");
    }

    fn report() -> BenchReport {
        let mut r = BenchReport::new(BenchKind::Churn);
        r.settings.push(("vcpus", "6".to_string()));
        r.configs = vec!["a".into(), "b".into()];
        for v in [1.0, 3.0, 2.0] {
            r.push("a", "256MiB", "call_ms", v);
        }
        for v in [40.0, 44.0] {
            r.push("b", "256MiB", "call_ms", v);
        }
        r.push("a", "4096MiB", "call_ms", 3.0);
        r.add_ratio("b", "a", "256MiB", "call_ms");
        r.add_ratio("b", "a", "4096MiB", "call_ms");
        r.add_growth("a", "256MiB", "4096MiB", "call_ms");
        r.elapsed = Duration::from_millis(1500);
        r
    }

    #[test]
    fn reports_keep_runs_per_row_and_take_ratios_of_medians() {
        let r = report();
        assert_eq!(
            r.row("a", "256MiB", "call_ms").unwrap().values,
            [1.0, 3.0, 2.0]
        );
        assert_eq!(r.median("b", "256MiB", "call_ms"), Some(42.0));
        assert_eq!(r.ratios[0].value, Some(21.0));
        assert_eq!(r.ratios[0].name, "b / a");
        // b was not measured at 4 GiB.
        assert_eq!(r.ratios[1].value, None);
        assert_eq!(r.ratios[2].name, "a 4096MiB / 256MiB");
        assert_eq!(r.ratios[2].value, Some(1.5));
        assert_eq!(r.params(), ["256MiB", "4096MiB"]);
        let text = r.text();
        assert!(
            text.starts_with("bench churn: vcpus=6 (in 1.50 s)"),
            "{text}"
        );
        assert!(text.contains("b / a"), "{text}");
        assert!(text.contains("21.0x"), "{text}");
        assert!(text.contains("  1 3 2\n"), "{text}");
    }

    #[test]
    fn reports_render_as_one_json_object() {
        let json = report().json();
        assert!(!json.contains('\n'));
        assert!(
            json.starts_with(
                "{\"bench\": \"churn\", \"settings\": {\"vcpus\": \"6\"}, \"configs\": [\"a\", \"b\"], \"results\": ["
            ),
            "{json}"
        );
        assert!(
            json.contains("{\"config\": \"a\", \"param\": \"256MiB\", \"metric\": \"call_ms\", \"median\": 2.000000, \"runs\": [1.000000, 3.000000, 2.000000]}"),
            "{json}"
        );
        assert!(
            json.contains("{\"name\": \"b / a\", \"param\": \"256MiB\", \"metric\": \"call_ms\", \"value\": 21.000000}"),
            "{json}"
        );
        assert!(json.contains("\"value\": null"), "{json}");
        assert!(json.ends_with("\"elapsed_s\": 1.500000}"), "{json}");
        assert_eq!(json.matches('{').count(), json.matches('}').count());
        let all = compare_json(true, &[report(), report()], Duration::from_secs(2));
        assert!(all.starts_with(
            "{\"command\": \"compare\", \"quick\": true, \"benches\": [{\"bench\": \"churn\""
        ));
        assert_eq!(all.matches("\"bench\": \"churn\"").count(), 2);
    }
}
