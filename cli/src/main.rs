//! `mmu-vmm`: the reference VMM's command line.
//!
//! ```text
//! mmu-vmm info
//! mmu-vmm touch [--vcpus N] [--pages N] [--passes N] [--mem-mib N]
//!               [--read] [--ops native|paravirt] [--levels 4|5] [--time-limit SECS]
//! mmu-vmm conformance [--cases N] [--seed S] [--levels 4|5] [--json]
//! mmu-vmm run --mmu shadow|ept --workload W [--vcpus N] [--mem SIZE]
//!             [--read] [--passes N] [--ops N] [--seed S] [--time-limit SECS] [--stats] [--json]
//! mmu-vmm diff --workload W [--a shadow|ept] [--b shadow|ept] [run's options]
//! mmu-vmm bench churn|mmio-rr|faults|reclaim [--vcpus N] [--mem SIZE[,SIZE...]]
//!               [--runs N] [--ops N] [--slots N[,N...]] [--wait halt|spin]
//!               [--quick] [--json] [--plot FILE.svg|FILE.png]
//! mmu-vmm compare [--quick] [--out DIR] [--json]
//! ```
//!
//! Exit status: 0 when everything ran and every check held, 1 when a check
//! failed or the run itself failed, 2 for a usage error (a bad option or
//! value, an output path that cannot be written); usage errors are found
//! before any guest is built.

mod args;
mod output;
mod progress;

use std::process::ExitCode;

use clap::Parser;
use mmu_vmm::kit::abi::tag;
use mmu_vmm::kit::workloads::{self, TouchKind};
use mmu_vmm::layout::{Layout, MIB2, PAGE_SIZE};
use mmu_vmm::units;
use mmu_vmm::{PagingOps, VcpuArgs, Vm, VmConfig};

use args::{
    BenchArgs, Cli, Command, CompareArgs, ConformanceArgs, DiffArgs, RunArgs, TouchArgs,
    WorkloadArgs,
};
use progress::Ticker;

/// Why the command failed, and so its exit status.
#[derive(Debug)]
enum Failure {
    /// A bad option, value or output path (exit status 2).
    Usage(String),
    /// A check failed or the work itself failed (exit status 1).
    Failed(String),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return args::report_parse_error(&e),
    };
    let result = match cli.command {
        Command::Info => info(),
        Command::Touch(a) => touch(&a),
        Command::Conformance(a) => conformance(&a),
        Command::Run(a) => run(&a),
        Command::Diff(a) => diff(&a),
        Command::Bench(a) => bench(&a),
        Command::Compare(a) => compare(&a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(message)) => {
            eprintln!("mmu-vmm: {message}");
            ExitCode::from(2)
        }
        Err(Failure::Failed(message)) => {
            eprintln!("mmu-vmm: {message}");
            ExitCode::FAILURE
        }
    }
}

/// An error and its sources, one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}

fn failed(e: &dyn std::error::Error) -> Failure {
    Failure::Failed(error_chain(e))
}

fn info() -> Result<(), Failure> {
    let vm = Vm::new(VmConfig::default()).map_err(|e| failed(&e))?;
    let cpu = vm.cpu();
    let features: Vec<&str> = cpu.features.iter_names().map(|(name, _)| name).collect();
    println!("kvm api version: {}", vm.kvm().get_api_version());
    println!("pvm: {}", if cpu.pvm { "yes" } else { "no" });
    println!("maxphyaddr: {} bits", cpu.maxphyaddr);
    println!("paging features: {}", features.join(", "));
    println!("max vcpus: {}", vm.kvm().get_max_vcpus());
    Ok(())
}

/// The smallest guest (a multiple of 2 MiB) whose data area gives each
/// of `vcpus` vCPUs `pages` pages.
fn touch_mem_size(vcpus: usize, pages: u64, levels: u8) -> Result<u64, Failure> {
    let too_big = || {
        Failure::Usage(format!(
            "{vcpus} vCPUs x {pages} pages do not fit in any guest this VMM can build"
        ))
    };
    let data = (vcpus as u64)
        .checked_mul(pages)
        .and_then(|p| p.checked_mul(PAGE_SIZE))
        .ok_or_else(too_big)?;
    let mut size = (data + (16 << 20)).next_multiple_of(MIB2);
    // The page tables grow with the guest: grow it until the slices fit.
    for _ in 0..4096 {
        let layout = Layout::new(vcpus, size, levels).map_err(|_| too_big())?;
        let slice = layout.data_slice(vcpus - 1, vcpus);
        let first = layout.data_slice(0, vcpus);
        let fits = |s: &std::ops::Range<u64>| (s.end - s.start) / PAGE_SIZE >= pages;
        if fits(&slice) && fits(&first) {
            return Ok(size);
        }
        size += MIB2.max(data / 64).next_multiple_of(MIB2);
    }
    Err(too_big())
}

fn touch(a: &TouchArgs) -> Result<(), Failure> {
    let kind = if a.read {
        TouchKind::Read
    } else {
        TouchKind::Write
    };
    let needed = touch_mem_size(a.vcpus, a.pages, a.levels)?;
    let mem_size = match a.mem_mib {
        Some(mib) if (mib << 20) < needed => {
            return Err(Failure::Usage(format!(
                "--mem-mib {mib}: {} vCPUs x {} pages need at least {} MiB",
                a.vcpus,
                a.pages,
                needed >> 20
            )));
        }
        Some(mib) => mib << 20,
        None => needed,
    };
    let ticker = Ticker::start("touch");
    let mut vm = Vm::new(VmConfig {
        vcpus: a.vcpus,
        mem_size,
        paging_ops: a.ops,
        paging_levels: a.levels,
        ..VmConfig::default()
    })
    .map_err(|e| failed(&e))?;
    let seed = 0x5eed_0000_0000;
    let mut vcpu_args = Vec::with_capacity(a.vcpus);
    for i in 0..a.vcpus {
        let slice = vm.layout().data_slice(i, a.vcpus);
        if kind == TouchKind::Read {
            for p in 0..a.pages {
                let address = slice.start + p * PAGE_SIZE;
                vm.write_u64(address, address.rotate_left(17))
                    .map_err(|e| failed(&e))?;
            }
        }
        vcpu_args.push(VcpuArgs([
            slice.start,
            a.pages,
            a.passes,
            seed + i as u64,
            0,
            0,
        ]));
    }
    let program = workloads::touch(kind).map_err(|e| failed(&e))?;
    let report = vm
        .run(&program, &vcpu_args, a.time_limit)
        .map_err(|e| failed(&e))?;
    drop(ticker);
    let mut bad = 0;
    for (vcpu, arg) in report.vcpus.iter().zip(&vcpu_args) {
        let [base, pages, passes, seed, ..] = arg.0;
        let expected =
            workloads::touch_checksum(kind, base, pages, passes, seed, |a| a.rotate_left(17));
        let got = vcpu.last(tag::CHECKSUM);
        let ok = got == Some(expected);
        bad += usize::from(!ok);
        println!(
            "vCPU {}: {}, checksum {:#x} ({}), {} in the guest, {} exits",
            vcpu.id.0,
            mmu_vmm::run::outcome_text(&vcpu.outcome),
            got.unwrap_or(0),
            if ok { "ok" } else { "MISMATCH" },
            units::duration(vcpu.elapsed),
            vcpu.stats.exits
        );
    }
    println!(
        "touch: {} vCPUs x {} pages x {} passes ({}, {} paging ops, {} MiB) in {}",
        a.vcpus,
        a.pages,
        a.passes,
        if kind == TouchKind::Read {
            "read"
        } else {
            "write"
        },
        match a.ops {
            PagingOps::Native => "native",
            PagingOps::Paravirt => "paravirt",
        },
        mem_size >> 20,
        units::duration(report.elapsed)
    );
    println!(
        "checksums: {}",
        if bad == 0 {
            "ok".to_string()
        } else {
            format!("FAILED ({bad} of {} vCPUs)", a.vcpus)
        }
    );
    if bad > 0 {
        return Err(Failure::Failed(format!("{bad} checksum mismatches")));
    }
    Ok(())
}

fn conformance(a: &ConformanceArgs) -> Result<(), Failure> {
    let defaults = mmu_vmm::conformance::Options::default();
    let options = mmu_vmm::conformance::Options {
        cases: a.cases.unwrap_or(defaults.cases),
        seed: a.seed.unwrap_or(defaults.seed),
        levels: a.levels.map_or(defaults.levels, |l| vec![l]),
    };
    let ticker = Ticker::start("conformance");
    let summary = mmu_vmm::conformance::run(&options).map_err(|e| failed(&e))?;
    drop(ticker);
    mmu_vmm::conformance::print(&summary, a.json);
    if !summary.mismatches.is_empty() {
        return Err(Failure::Failed(format!(
            "{} mismatches",
            summary.mismatches.len()
        )));
    }
    Ok(())
}

/// The options `run` and `diff` share, for a run under `mmu`.
fn run_options(w: &WorkloadArgs, mmu: mmu_backends::BackendKind) -> mmu_vmm::run::RunOptions {
    let defaults = mmu_vmm::run::RunOptions::default();
    mmu_vmm::run::RunOptions {
        mmu,
        workload: w.workload,
        vcpus: w.vcpus.unwrap_or(defaults.vcpus),
        mem_size: w.mem.unwrap_or(defaults.mem_size),
        params: mmu_vmm::workload::Params {
            touch: if w.read {
                TouchKind::Read
            } else {
                TouchKind::Write
            },
            passes: w.passes,
            ops: w.ops,
            seed: w.seed.unwrap_or(defaults.params.seed),
        },
        time_limit: w.time_limit.unwrap_or(defaults.time_limit),
        ..defaults
    }
}

fn run(a: &RunArgs) -> Result<(), Failure> {
    let options = run_options(&a.workload, a.mmu);
    let what = format!("run {} under {}", options.workload, options.mmu);
    let ticker = Ticker::start(&what);
    let summary = mmu_vmm::run::run_with_progress(options, &|step| ticker.step(&step.to_string()))
        .map_err(|e| failed(&e))?;
    drop(ticker);
    if a.workload.json {
        println!("{}", summary.json());
    } else if a.stats {
        println!("{}", summary.text_with_stats());
    } else {
        println!("{}", summary.text());
    }
    if !summary.ok() {
        return Err(Failure::Failed("a check failed (see above)".to_string()));
    }
    Ok(())
}

fn diff(a: &DiffArgs) -> Result<(), Failure> {
    let options = mmu_vmm::diff::DiffOptions {
        a: a.a,
        b: a.b,
        run: run_options(&a.workload, a.a),
    };
    let ticker = Ticker::start(&format!(
        "diff {} ({} against {})",
        a.workload.workload, a.a, a.b
    ));
    let summary = mmu_vmm::diff::diff(options).map_err(|e| failed(&e))?;
    drop(ticker);
    if a.workload.json {
        println!("{}", summary.json());
    } else {
        println!("{}", summary.text());
    }
    if !summary.identical() {
        return Err(Failure::Failed(
            "the backends differ (see above)".to_string(),
        ));
    }
    if !summary.ok() {
        return Err(Failure::Failed("a check failed (see above)".to_string()));
    }
    Ok(())
}

fn bench(a: &BenchArgs) -> Result<(), Failure> {
    if let Some(path) = &a.plot {
        output::check_file(path).map_err(Failure::Usage)?;
    }
    let kind = a.bench;
    if kind != mmu_bench::BenchKind::Reclaim && !mmu_vmm::kvm_available() {
        return Err(Failure::Failed(format!(
            "bench {kind} needs /dev/kvm, which cannot be opened"
        )));
    }
    let options = mmu_bench::BenchOptions {
        vcpus: a.vcpus,
        sizes: a.mem.clone().map(|l| l.0),
        runs: a.runs,
        ops: a.ops,
        slots: a.slots.clone().map(|l| l.0),
        wait: a.wait,
        quick: a.quick,
        progress: true,
        ..mmu_bench::BenchOptions::default()
    };
    let report = mmu_bench::run_bench(kind, &options).map_err(|e| failed(&e))?;
    if a.json {
        println!("{}", report.json());
    } else {
        println!("{}", report.text());
    }
    if let Some(path) = &a.plot {
        mmu_bench::plot::write(&report, &path.to_string_lossy()).map_err(|e| failed(&e))?;
        eprintln!("plot written to {}", path.display());
    }
    Ok(())
}

fn compare(a: &CompareArgs) -> Result<(), Failure> {
    if let Some(dir) = &a.out {
        output::check_dir(dir).map_err(Failure::Usage)?;
    }
    if !mmu_vmm::kvm_available() {
        return Err(Failure::Failed(
            "compare needs /dev/kvm, which cannot be opened".to_string(),
        ));
    }
    let options = mmu_bench::BenchOptions {
        quick: a.quick,
        progress: true,
        ..mmu_bench::BenchOptions::default()
    };
    let started = std::time::Instant::now();
    let mut reports = Vec::new();
    for kind in mmu_bench::BenchKind::ALL {
        let report = mmu_bench::run_bench(kind, &options).map_err(|e| failed(&e))?;
        if !a.json {
            println!("{}\n", report.text());
        }
        reports.push(report);
    }
    let elapsed = started.elapsed();
    let json = mmu_bench::compare_json(a.quick, &reports, elapsed);
    if a.json {
        println!("{json}");
    } else {
        println!(
            "compare: {} benches in {}",
            reports.len(),
            units::duration(elapsed)
        );
    }
    if let Some(dir) = &a.out {
        write_compare(dir, &reports, &json)?;
        eprintln!("tables, JSON and plots written to {}", dir.display());
    }
    Ok(())
}

/// Writes each bench's table, JSON and plot, and `compare.json`, into `dir`.
fn write_compare(
    dir: &std::path::Path,
    reports: &[mmu_bench::BenchReport],
    json: &str,
) -> Result<(), Failure> {
    let write_error =
        |e: std::io::Error| Failure::Failed(format!("cannot write into {}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(write_error)?;
    for r in reports {
        let base = dir.join(&r.bench);
        std::fs::write(base.with_extension("txt"), r.text() + "\n").map_err(write_error)?;
        std::fs::write(base.with_extension("json"), r.json() + "\n").map_err(write_error)?;
        let svg = base.with_extension("svg");
        mmu_bench::plot::write_svg(r, &svg.to_string_lossy()).map_err(|e| failed(&e))?;
    }
    std::fs::write(dir.join("compare.json"), json.to_string() + "\n").map_err(write_error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn touch_sizes_its_guest_to_fit_its_pages() {
        for (vcpus, pages) in [(1, 1), (2, 1024), (2, 1_000_000), (6, 300_000)] {
            let size = touch_mem_size(vcpus, pages, 4).unwrap();
            assert_eq!(size % MIB2, 0);
            let layout = Layout::new(vcpus, size, 4).unwrap();
            for i in 0..vcpus {
                let slice = layout.data_slice(i, vcpus);
                assert!(
                    (slice.end - slice.start) / PAGE_SIZE >= pages,
                    "{vcpus} {pages}"
                );
            }
            // Not far too big either.
            assert!(size <= (vcpus as u64 * pages * PAGE_SIZE) * 11 / 10 + (64 << 20));
        }
        assert!(matches!(
            touch_mem_size(32, u64::MAX / 4096, 4),
            Err(Failure::Usage(_))
        ));
    }
}
