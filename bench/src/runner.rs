//! The benches as `mmu-vmm bench` and `compare` run them: every
//! configuration alternated within one run, medians and ratios.

use std::io::IsTerminal as _;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use super::kvm::{Step, StepResult, TouchVm, WaitMode, rr_vm};
use super::reclaim::reclaim_timeline;
use super::{BenchError, BenchKind, BenchReport, Configuration, size_param, slots_param};

/// How a bench runs. `None` takes the bench's default (or its quick
/// default under [`BenchOptions::quick`]).
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// vCPUs of each guest (churn and faults 6, mmio-rr 1; quick: 2, 2, 1).
    pub vcpus: Option<usize>,
    /// Guest sizes (churn 2 GiB, faults 2 GiB; quick: 64 and 256 MiB,
    /// 128 MiB).
    pub sizes: Option<Vec<u64>>,
    /// Runs of each configuration (churn 10, mmio-rr 10, faults 3,
    /// reclaim 5 seeds; quick: 5, 5, 3, 5).
    pub runs: Option<usize>,
    /// mmio-rr transactions per vCPU and run (2000; quick 1000); reclaim
    /// rounds (20; quick 10).
    pub ops: Option<u64>,
    /// mmio-rr memslot counts (1 and 512).
    pub slots: Option<Vec<u32>>,
    /// How the vCPUs of churn and faults wait between commands.
    pub wait: WaitMode,
    /// Smaller defaults, for `compare --quick` and smoke tests.
    pub quick: bool,
    /// Bounds every wait for the guest.
    pub time_limit: Duration,
    /// Show progress on stderr: a bar on a terminal, else a plain line
    /// every few seconds.
    pub progress: bool,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            vcpus: None,
            sizes: None,
            runs: None,
            ops: None,
            slots: None,
            wait: WaitMode::Halt,
            quick: false,
            time_limit: Duration::from_secs(300),
            progress: false,
        }
    }
}

impl BenchOptions {
    fn vcpus(&self, bench: BenchKind) -> usize {
        self.vcpus.unwrap_or(match (bench, self.quick) {
            (BenchKind::MmioRr, _) => 1,
            (_, true) => 2,
            _ => 6,
        })
    }

    fn sizes(&self, bench: BenchKind) -> Vec<u64> {
        self.sizes.clone().unwrap_or(match (bench, self.quick) {
            (BenchKind::Churn, true) => vec![64 << 20, 256 << 20],
            (BenchKind::Faults, true) => vec![128 << 20],
            _ => vec![2 << 30],
        })
    }

    fn runs(&self, bench: BenchKind) -> usize {
        self.runs
            .unwrap_or(match (bench, self.quick) {
                (BenchKind::Faults, _) => 3,
                (BenchKind::Reclaim, _) => 5,
                (_, true) => 5,
                _ => 10,
            })
            .max(1)
    }

    fn ops(&self, bench: BenchKind) -> u64 {
        self.ops.unwrap_or(match (bench, self.quick) {
            (BenchKind::Reclaim, true) => 10,
            (BenchKind::Reclaim, false) => 20,
            (_, true) => 1000,
            _ => 2000,
        })
    }

    fn slots(&self) -> Vec<u32> {
        self.slots.clone().unwrap_or_else(|| vec![1, 512])
    }
}

fn progress(options: &BenchOptions, bench: BenchKind, total: u64) -> Progress {
    if !options.progress {
        return Progress::Bar(ProgressBar::hidden());
    }
    if !std::io::stderr().is_terminal() {
        return Progress::Lines(Mutex::new(Lines {
            bench,
            total,
            done: 0,
            message: String::new(),
            started: Instant::now(),
            printed: None,
        }));
    }
    let bar = ProgressBar::new(total);
    if let Ok(style) =
        ProgressStyle::with_template("{prefix:>8} [{bar:32}] {pos}/{len} {msg} ({elapsed})")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(bench.name());
    Progress::Bar(bar)
}

/// How often the plain progress lines are printed at most.
const LINE_EVERY: Duration = Duration::from_secs(3);

/// A bench's progress on stderr: a bar on a terminal (indicatif draws
/// nothing elsewhere), else a plain line per step, every few seconds at
/// most.
#[derive(Debug)]
enum Progress {
    Bar(ProgressBar),
    Lines(Mutex<Lines>),
}

/// The state of the plain progress lines.
#[derive(Debug)]
struct Lines {
    bench: BenchKind,
    total: u64,
    done: u64,
    message: String,
    started: Instant,
    printed: Option<Instant>,
}

impl Lines {
    fn print(&mut self, force: bool) {
        if !force && self.printed.is_some_and(|t| t.elapsed() < LINE_EVERY) {
            return;
        }
        self.printed = Some(Instant::now());
        eprintln!(
            "bench {}: {}/{} {} ({} so far)",
            self.bench,
            self.done,
            self.total,
            self.message,
            mmu_vmm::units::duration(self.started.elapsed())
        );
    }
}

impl Progress {
    fn set_message(&self, message: String) {
        match self {
            Progress::Bar(bar) => bar.set_message(message),
            Progress::Lines(lines) => {
                if let Ok(mut l) = lines.lock() {
                    l.message = message;
                    l.print(false);
                }
            }
        }
    }

    fn inc(&self, n: u64) {
        match self {
            Progress::Bar(bar) => bar.inc(n),
            Progress::Lines(lines) => {
                if let Ok(mut l) = lines.lock() {
                    l.done += n;
                }
            }
        }
    }

    fn finish_and_clear(&self) {
        match self {
            Progress::Bar(bar) => bar.finish_and_clear(),
            Progress::Lines(lines) => {
                if let Ok(mut l) = lines.lock() {
                    l.message = "done".to_string();
                    l.print(true);
                }
            }
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Runs one bench.
pub fn run_bench(bench: BenchKind, options: &BenchOptions) -> Result<BenchReport, BenchError> {
    let started = Instant::now();
    let mut report = match bench {
        BenchKind::Churn => churn(options)?,
        BenchKind::MmioRr => mmio_rr(options)?,
        BenchKind::Faults => faults(options)?,
        BenchKind::Reclaim => reclaim(options)?,
    };
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Runs every bench (`mmu-vmm compare`).
pub fn compare(options: &BenchOptions) -> Result<Vec<BenchReport>, BenchError> {
    BenchKind::ALL
        .into_iter()
        .map(|b| run_bench(b, options))
        .collect()
}

fn settings(report: &mut BenchReport, options: &BenchOptions, bench: BenchKind) {
    let sizes: Vec<String> = options.sizes(bench).into_iter().map(size_param).collect();
    report.settings = vec![
        ("vcpus", options.vcpus(bench).to_string()),
        ("sizes", sizes.join(",")),
        ("runs", options.runs(bench).to_string()),
        ("wait", options.wait.name().to_string()),
    ];
}

/// What a bench over guest sizes starts with: its report (settings and
/// configurations filled in), its progress bar and its dimensions.
struct SizedBench {
    report: BenchReport,
    bar: Progress,
    vcpus: usize,
    sizes: Vec<u64>,
    runs: usize,
}

impl SizedBench {
    fn start(options: &BenchOptions, bench: BenchKind, configs: &[Configuration]) -> Self {
        let (vcpus, sizes, runs) = (
            options.vcpus(bench),
            options.sizes(bench),
            options.runs(bench),
        );
        let mut report = BenchReport::new(bench);
        settings(&mut report, options, bench);
        report.configs = configs.iter().map(|c| c.name.to_string()).collect();
        let bar = progress(options, bench, (sizes.len() * runs * configs.len()) as u64);
        SizedBench {
            report,
            bar,
            vcpus,
            sizes,
            runs,
        }
    }
}

fn churn(options: &BenchOptions) -> Result<BenchReport, BenchError> {
    let configs = Configuration::churn();
    let SizedBench {
        mut report,
        bar,
        vcpus,
        sizes,
        runs,
    } = SizedBench::start(options, BenchKind::Churn, &configs);
    for &size in &sizes {
        let param = size_param(size);
        bar.set_message(format!("{param}: building the guests"));
        let mut vms = configs
            .iter()
            .map(|c| TouchVm::new(c, vcpus, size, options.wait))
            .collect::<Result<Vec<_>, _>>()?;
        for run in 0..runs {
            for vm in &mut vms {
                bar.set_message(format!("{param} run {} {}", run + 1, vm.config()));
                let results = vm.session(&[Step::Touch, Step::Churn], options.time_limit)?;
                for r in results {
                    match r {
                        StepResult::Touch(t) => {
                            let metric = if run == 0 {
                                "first_touch_ms"
                            } else {
                                "retouch_ms"
                            };
                            report.push(vm.config(), &param, metric, ms(t));
                        }
                        StepResult::Churn(c) => {
                            report.push(vm.config(), &param, "call_ms", ms(c.call));
                            report.push(vm.config(), &param, "resume_ms", ms(c.resume));
                            if let Some(r) = c.reclaim {
                                report.push(vm.config(), &param, "reclaim_ms", ms(r));
                            }
                        }
                    }
                }
                bar.inc(1);
            }
        }
        for metric in ["call_ms", "resume_ms"] {
            report.add_ratio("shadow-naive", "shadow-fast", &param, metric);
            report.add_ratio("shadow-fast", "ept", &param, metric);
        }
    }
    if let (Some(first), Some(last)) = (sizes.first(), sizes.last())
        && sizes.len() > 1
    {
        for metric in ["call_ms", "resume_ms"] {
            for config in ["shadow-fast", "ept"] {
                report.add_growth(config, &size_param(*first), &size_param(*last), metric);
            }
        }
    }
    bar.finish_and_clear();
    report.notes.push(
        "each run: every vCPU writes every page of its slice from CPL3 (4 KiB pages), waits at \
         CPL3, then one memslot delete + add; retouch_ms is the touch after the previous run's churn"
            .to_string(),
    );
    report.notes.push(
        "shadow-fast defers freeing the obsolete pages: reclaim_ms is reclaim_obsolete plus the \
         replay of the zapped frames by every vCPU's emulated CPL0 code (host coherence Replay on \
         PVM), which shadow-naive pays inside resume_ms"
            .to_string(),
    );
    Ok(report)
}

fn mmio_rr(options: &BenchOptions) -> Result<BenchReport, BenchError> {
    let bench = BenchKind::MmioRr;
    let configs = Configuration::mmio_rr();
    let (vcpus, runs, ops, slot_counts) = (
        options.vcpus(bench),
        options.runs(bench),
        options.ops(bench),
        options.slots(),
    );
    let mut report = BenchReport::new(bench);
    report.settings = vec![
        ("vcpus", vcpus.to_string()),
        ("transactions", ops.to_string()),
        (
            "slots",
            slot_counts
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(","),
        ),
        ("runs", runs.to_string()),
    ];
    report.configs = configs.iter().map(|c| c.name.to_string()).collect();
    let bar = progress(
        options,
        bench,
        (slot_counts.len() * runs * configs.len()) as u64,
    );
    for &slots in &slot_counts {
        let param = slots_param(slots);
        let mut vms = configs
            .iter()
            .map(|c| rr_vm(c, vcpus, ops, slots))
            .collect::<Result<Vec<_>, _>>()?;
        for run in 0..runs {
            for vm in &mut vms {
                bar.set_message(format!("{param} run {} {}", run + 1, vm.config()));
                let sample = vm.run(options.time_limit)?;
                report.push(vm.config(), &param, "rr_per_s", sample.rate());
                push_service_times(&mut report, vm.config(), &param, &sample.mmio_service);
                bar.inc(1);
            }
        }
        report.add_ratio("shadow-cache-on", "shadow-cache-off", &param, "rr_per_s");
        report.add_ratio("ept-cache-on", "ept-cache-off", &param, "rr_per_s");
        report.add_ratio("shadow-cache-on", "ept-cache-on", &param, "rr_per_s");
        // The MMU's own service time, which the exit's cost hides in the
        // end-to-end rate: cache off over cache on.
        for backend in ["shadow", "ept"] {
            report.add_ratio(
                &format!("{backend}-cache-off"),
                &format!("{backend}-cache-on"),
                &param,
                "mmio_service_median_ns",
            );
        }
    }
    bar.finish_and_clear();
    report.notes.push(
        "1slots is guest RAM alone (its two memslots); N slots adds N - 2 one-page memslots. \
         Ratios of rates: above 1 means the first configuration is faster"
            .to_string(),
    );
    Ok(report)
}

/// One run's MMIO service times: the median over every access, and the
/// median and 99th percentile of each cache path that served any.
fn push_service_times(
    report: &mut BenchReport,
    config: &str,
    param: &str,
    times: &mmu_integration::MmioServiceTimes,
) {
    let all: Vec<u64> = times.all_ns().collect();
    let paths: [(&[u64], &'static str, &'static str); 3] = [
        (&all, "mmio_service_median_ns", ""),
        (&times.cached_ns, "cached_median_ns", "cached_p99_ns"),
        (&times.uncached_ns, "uncached_median_ns", "uncached_p99_ns"),
    ];
    for (samples, median, p99) in paths {
        if let Some(m) = percentile(samples, 50.0) {
            report.push(config, param, median, m as f64);
        }
        if !p99.is_empty()
            && let Some(p) = percentile(samples, 99.0)
        {
            report.push(config, param, p99, p as f64);
        }
    }
}

/// The `pct`-th percentile of `samples` (nearest rank), if any.
fn percentile(samples: &[u64], pct: f64) -> Option<u64> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let rank = ((pct / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn faults(options: &BenchOptions) -> Result<BenchReport, BenchError> {
    let configs = Configuration::faults();
    let SizedBench {
        mut report,
        bar,
        vcpus,
        sizes,
        runs,
    } = SizedBench::start(options, BenchKind::Faults, &configs);
    for &size in &sizes {
        let param = size_param(size);
        for run in 0..runs {
            for config in &configs {
                bar.set_message(format!("{param} run {} {}", run + 1, config.name));
                let mut vm = TouchVm::new(config, vcpus, size, options.wait)?;
                let results =
                    vm.session(&[Step::Touch, Step::Churn, Step::Touch], options.time_limit)?;
                let touches: Vec<Duration> = results
                    .iter()
                    .filter_map(|r| match r {
                        StepResult::Touch(t) => Some(*t),
                        StepResult::Churn(_) => None,
                    })
                    .collect();
                if let [first, again] = touches[..] {
                    report.push(config.name, &param, "first_touch_ms", ms(first));
                    report.push(config.name, &param, "retouch_ms", ms(again));
                }
                drop(vm);
                bar.inc(1);
            }
        }
        for metric in ["first_touch_ms", "retouch_ms"] {
            report.add_ratio("shadow-prefetch-off", "shadow-prefetch-on", &param, metric);
            report.add_ratio(
                "shadow-prefetch-on",
                "shadow-prefetch-table",
                &param,
                metric,
            );
            report.add_ratio("shadow-prefetch-on", "ept", &param, metric);
            report.add_ratio("shadow-prefetch-table", "ept", &param, metric);
        }
    }
    bar.finish_and_clear();
    report.notes.push(
        "a fresh guest per run: first touch of every page, one memslot delete + add (shadow: \
         reclaim and replay included, untimed), then the re-touch"
            .to_string(),
    );
    Ok(report)
}

fn reclaim(options: &BenchOptions) -> Result<BenchReport, BenchError> {
    let bench = BenchKind::Reclaim;
    let (runs, rounds) = (options.runs(bench), options.ops(bench));
    let policies = Configuration::reclaim();
    let mut report = BenchReport::new(bench);
    report.settings = vec![
        ("page_limit", super::reclaim::PAGE_LIMIT.to_string()),
        ("rounds", rounds.to_string()),
        ("runs", runs.to_string()),
        ("path", "soft vCPU (no KVM)".to_string()),
    ];
    report.configs = policies.iter().map(|p| p.0.to_string()).collect();
    let param = "limit64";
    for run in 0..runs {
        // Distinct odd seeds (xorshift needs a non-zero state).
        let seed = 0x9e37_79b9_7f4a_7c15u64.wrapping_add(0x2545_f491_4f6c_dd1e * run as u64);
        for &(name, policy) in &policies {
            let t = reclaim_timeline(name, policy, rounds as usize, seed)?;
            let last = t.last();
            report.push(name, param, "faults", last.faults as f64);
            report.push(name, param, "zapped", last.zapped as f64);
            report.push(
                name,
                param,
                "zapped_directories",
                last.zapped_directories as f64,
            );
            if run == 0 {
                report.timelines.push(t);
            }
        }
    }
    for metric in ["faults", "zapped", "zapped_directories"] {
        report.add_ratio("fifo", "parent-aware", param, metric);
    }
    report.notes.push(
        "the soft vCPU path: the shadow backend on mmu_shadow::soft::SoftVcpu, 86 shadow pages \
         of working set at a 64-page limit, page tables visited in a fresh shuffled order each \
         round (the same orders for both policies); a zapped directory was in use"
            .to_string(),
    );
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[7], 99.0), Some(7));
        let samples: Vec<u64> = (1..=100).rev().collect();
        assert_eq!(percentile(&samples, 50.0), Some(50));
        assert_eq!(percentile(&samples, 99.0), Some(99));
        assert_eq!(percentile(&samples, 100.0), Some(100));
    }

    #[test]
    fn service_times_become_rows_per_path() {
        let mut report = BenchReport::new(BenchKind::MmioRr);
        let times = mmu_integration::MmioServiceTimes {
            cached_ns: vec![100, 200, 300],
            uncached_ns: vec![5000],
        };
        push_service_times(&mut report, "shadow-cache-on", "1 memslot", &times);
        let median = |m| report.median("shadow-cache-on", "1 memslot", m);
        assert_eq!(median("mmio_service_median_ns"), Some(200.0));
        assert_eq!(median("cached_median_ns"), Some(200.0));
        assert_eq!(median("cached_p99_ns"), Some(300.0));
        assert_eq!(median("uncached_median_ns"), Some(5000.0));
        // A path that served nothing has no row.
        push_service_times(
            &mut report,
            "ept-cache-off",
            "1 memslot",
            &Default::default(),
        );
        assert!(
            report
                .row("ept-cache-off", "1 memslot", "cached_median_ns")
                .is_none()
        );
    }

    #[test]
    fn defaults_follow_the_bench_and_quick() {
        let o = BenchOptions::default();
        assert_eq!(o.vcpus(BenchKind::Churn), 6);
        assert_eq!(o.sizes(BenchKind::Churn), [2 << 30]);
        assert_eq!(o.runs(BenchKind::Churn), 10);
        assert_eq!(o.vcpus(BenchKind::MmioRr), 1);
        assert_eq!(o.slots(), [1, 512]);
        let q = BenchOptions {
            quick: true,
            ..BenchOptions::default()
        };
        assert_eq!(q.vcpus(BenchKind::Churn), 2);
        assert_eq!(q.sizes(BenchKind::Churn), [64 << 20, 256 << 20]);
        assert_eq!(q.runs(BenchKind::Faults), 3);
        let set = BenchOptions {
            vcpus: Some(3),
            runs: Some(0),
            ..q
        };
        assert_eq!(set.vcpus(BenchKind::MmioRr), 3);
        assert_eq!(set.runs(BenchKind::Churn), 1);
    }

    #[test]
    fn reclaim_reports_both_policies_with_ratios() {
        let report = run_bench(
            BenchKind::Reclaim,
            &BenchOptions {
                quick: true,
                runs: Some(2),
                ..BenchOptions::default()
            },
        )
        .unwrap();
        assert_eq!(report.configs, ["fifo", "parent-aware"]);
        assert_eq!(report.timelines.len(), 2);
        let row = report.row("fifo", "limit64", "zapped").unwrap();
        assert_eq!(row.values.len(), 2);
        assert_eq!(report.ratios.len(), 3);
        assert!(
            report
                .ratios
                .iter()
                .all(|r| r.name == "fifo / parent-aware")
        );
        let json = report.json();
        assert!(
            json.contains("\"timelines\": [{\"config\": \"fifo\""),
            "{json}"
        );
    }
}
