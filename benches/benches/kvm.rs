//! Benches on real KVM guests, through the measuring code of `mmu-bench`
//! (`mmu_bench`, the same code as `mmu-vmm bench`):
//!
//! - `memslot_churn/<config>/<size>`: every vCPU has written every 4 KiB
//!   page of its slice from CPL3 and waits (asleep in the host, as idle
//!   vCPUs halt); the time is one memslot delete + add, the host call.
//!   Shadow fast zap, shadow naive zap, ept (on this host KVM's
//!   own shadow MMU and its own fast zap: the anchor). Each iteration
//!   touches all memory again first (untimed).
//! - `mmio_rr/<config>/<slots>`: MMIO request/response transactions (doorbell
//!   write, status polls), throughput in transactions per second; MMIO
//!   caching on / off in both backends, with 1 and 512 memslots.
//! - `faults_first_touch/<config>/<size>` and `faults_retouch/<config>/<size>`:
//!   the first touch of the guest's memory (a fresh guest per iteration), and
//!   the touch after a memslot delete + add; shadow prefetch on / off, ept.
//!
//! Without `--bench` (`cargo test -p benches --benches`, the CI smoke) every
//! bench runs once on tiny guests (16 MiB, 2 vCPUs). Where /dev/kvm cannot
//! be opened each bench prints `SKIPPED (no /dev/kvm): <bench>` and does
//! nothing (or fails, when `MMU_REQUIRE_KVM=1`). After the criterion output, a table gives each configuration's
//! time until every vCPU ran CPL3 again after the churn, and the deferred
//! reclaim of the fast zap, which criterion's number (the host call) leaves
//! out. No bench asserts anything about time.

use std::sync::Mutex;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use mmu_bench::{
    Configuration, Step, StepResult, TouchVm, WaitMode, rr_vm, size_param, slots_param,
};

/// Hang protection for every wait on a guest.
const LIMIT: Duration = Duration::from_secs(600);

/// Lines for the table printed after criterion's output.
static NOTES: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn note(line: String) {
    NOTES.lock().unwrap_or_else(|e| e.into_inner()).push(line);
}

/// Sizes and vCPUs: the full sizes under `cargo bench`, tiny in the smoke.
struct Scale {
    churn_sizes: Vec<u64>,
    fault_sizes: Vec<u64>,
    vcpus: usize,
    transactions: u64,
}

impl Scale {
    fn new(full: bool) -> Self {
        if full {
            Scale {
                churn_sizes: vec![256 << 20, 1 << 30, 2 << 30, 4 << 30],
                fault_sizes: vec![512 << 20],
                vcpus: 6,
                transactions: 2000,
            }
        } else {
            Scale {
                churn_sizes: vec![16 << 20],
                fault_sizes: vec![16 << 20],
                vcpus: 2,
                transactions: 50,
            }
        }
    }
}

/// True if /dev/kvm can be used; otherwise prints
/// `SKIPPED (no /dev/kvm): <bench>` and returns false, or panics where KVM
/// is required (`MMU_REQUIRE_KVM=1`, see `mmu_integration::testing`).
fn kvm_or_skip(bench: &str) -> bool {
    use mmu_integration::testing::{KvmGate, gate};
    match gate() {
        KvmGate::Run => true,
        KvmGate::Skip => {
            println!("SKIPPED (no /dev/kvm): {bench}");
            false
        }
        KvmGate::Fail(why) => panic!("bench {bench} cannot run: {why}"),
    }
}

fn sum_churn(
    results: &[StepResult],
    mut pick: impl FnMut(&mmu_bench::ChurnSample) -> Duration,
) -> Duration {
    results
        .iter()
        .filter_map(|r| match r {
            StepResult::Churn(c) => Some(pick(c)),
            StepResult::Touch(_) => None,
        })
        .sum()
}

fn memslot_churn(c: &mut Criterion, scale: &Scale) {
    const GROUP: &str = "memslot_churn";
    if !kvm_or_skip(GROUP) {
        return;
    }
    let mut g = c.benchmark_group(GROUP);
    g.sample_size(10).sampling_mode(SamplingMode::Flat);
    for &size in &scale.churn_sizes {
        for config in Configuration::churn() {
            let param = size_param(size);
            let mut vm =
                TouchVm::new(&config, scale.vcpus, size, WaitMode::Halt).expect("the churn guest");
            // The first touch, untimed.
            vm.session(&[Step::Touch], LIMIT).expect("first touch");
            let mut resume = Vec::new();
            let mut reclaim = Vec::new();
            g.bench_function(BenchmarkId::new(config.name, &param), |b| {
                b.iter_custom(|iters| {
                    let steps: Vec<Step> = (0..iters)
                        .flat_map(|_| [Step::Touch, Step::Churn])
                        .collect();
                    let results = vm.session(&steps, LIMIT).expect("churn session");
                    for r in &results {
                        if let StepResult::Churn(c) = r {
                            resume.push(c.resume.as_secs_f64() * 1e3);
                            if let Some(d) = c.reclaim {
                                reclaim.push(d.as_secs_f64() * 1e3);
                            }
                        }
                    }
                    sum_churn(&results, |c| c.call)
                });
            });
            let med = |v: &[f64]| {
                mmu_bench::median(v).map_or_else(|| "-".to_string(), |m| format!("{m:.2}"))
            };
            note(format!(
                "| {GROUP}/{}/{param} | until all vCPUs at CPL3: median {} ms | deferred reclaim + replay: median {} ms | {} churns |",
                config.name,
                med(&resume),
                med(&reclaim),
                resume.len()
            ));
        }
    }
    g.finish();
}

fn mmio_rr(c: &mut Criterion, scale: &Scale) {
    const GROUP: &str = "mmio_rr";
    if !kvm_or_skip(GROUP) {
        return;
    }
    let mut g = c.benchmark_group(GROUP);
    g.sample_size(10).sampling_mode(SamplingMode::Flat);
    g.throughput(Throughput::Elements(scale.transactions));
    for slots in [1, 512] {
        for config in Configuration::mmio_rr() {
            let mut vm = rr_vm(&config, 1, scale.transactions, slots).expect("the mmio-rr guest");
            g.bench_function(BenchmarkId::new(config.name, slots_param(slots)), |b| {
                b.iter_custom(|iters| {
                    (0..iters)
                        .map(|_| vm.run(LIMIT).expect("mmio-rr run").elapsed)
                        .sum()
                });
            });
        }
    }
    g.finish();
}

fn faults(c: &mut Criterion, scale: &Scale) {
    for (group, retouch) in [("faults_first_touch", false), ("faults_retouch", true)] {
        if !kvm_or_skip(group) {
            continue;
        }
        let mut g = c.benchmark_group(group);
        g.sample_size(10).sampling_mode(SamplingMode::Flat);
        for &size in &scale.fault_sizes {
            g.throughput(Throughput::Bytes(size));
            for config in Configuration::faults() {
                let param = size_param(size);
                let mut kept = None;
                g.bench_function(BenchmarkId::new(config.name, &param), |b| {
                    b.iter_custom(|iters| {
                        let mut total = Duration::ZERO;
                        if retouch {
                            let vm = kept.get_or_insert_with(|| {
                                let mut vm =
                                    TouchVm::new(&config, scale.vcpus, size, WaitMode::Halt)
                                        .expect("the fault guest");
                                vm.session(&[Step::Touch], LIMIT).expect("first touch");
                                vm
                            });
                            let steps: Vec<Step> = (0..iters)
                                .flat_map(|_| [Step::Churn, Step::Touch])
                                .collect();
                            for r in vm.session(&steps, LIMIT).expect("re-touch session") {
                                if let StepResult::Touch(t) = r {
                                    total += t;
                                }
                            }
                        } else {
                            for _ in 0..iters {
                                let mut vm =
                                    TouchVm::new(&config, scale.vcpus, size, WaitMode::Halt)
                                        .expect("the fault guest");
                                for r in vm.session(&[Step::Touch], LIMIT).expect("first touch") {
                                    if let StepResult::Touch(t) = r {
                                        total += t;
                                    }
                                }
                            }
                        }
                        total
                    });
                });
            }
        }
        g.finish();
    }
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` does not, and
    // then every bench runs once on tiny guests.
    let full = std::env::args().any(|a| a == "--bench");
    let scale = Scale::new(full);
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    memslot_churn(&mut c, &scale);
    mmio_rr(&mut c, &scale);
    faults(&mut c, &scale);
    c.final_summary();
    let notes = NOTES.lock().unwrap_or_else(|e| e.into_inner());
    if !notes.is_empty() {
        println!("\nBeyond the host call (the figure criterion timed):\n");
        println!("| benchmark | resume | deferred | runs |\n| --- | --- | --- | --- |");
        for line in notes.iter() {
            println!("{line}");
        }
    }
}
