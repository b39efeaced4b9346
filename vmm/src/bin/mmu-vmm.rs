//! `mmu-vmm`: the reference VMM's command line.
//!
//! ```text
//! mmu-vmm info
//! mmu-vmm touch [--vcpus N] [--pages N] [--passes N] [--mem-mib N]
//!               [--read] [--ops native|paravirt] [--levels 4|5] [--time-limit SECS]
//! mmu-vmm conformance [--cases N] [--seed S] [--json]
//! mmu-vmm run --mmu shadow|ept --workload W [--vcpus N] [--mem SIZE]
//!             [--read] [--passes N] [--ops N] [--seed S] [--time-limit SECS] [--json]
//! mmu-vmm diff --workload W [--a shadow|ept] [--b shadow|ept] [same options]
//! mmu-vmm bench churn|mmio-rr|faults|reclaim [--vcpus N] [--mem SIZE[,SIZE...]]
//!               [--runs N] [--ops N] [--slots N[,N...]] [--wait halt|spin]
//!               [--quick] [--json] [--plot FILE.svg]
//! mmu-vmm compare [--quick] [--out DIR] [--json]
//! ```
//!
//! W is one of touch, pt-edit, multi-as, access, mmio-rr, dirty, churn.

use std::process::ExitCode;
use std::time::Duration;

use mmu_vmm::kit::abi::tag;
use mmu_vmm::kit::workloads::{self, TouchKind};
use mmu_vmm::{PagingOps, VcpuArgs, Vm, VmConfig};

const USAGE: &str = "usage:
  mmu-vmm info
      what the host's KVM offers guests
  mmu-vmm touch [--vcpus N] [--pages N] [--passes N] [--mem-mib N] [--read]
                [--ops native|paravirt] [--levels 4|5] [--time-limit SECS]
      every vCPU touches its own N 4 KiB pages from CPL3 and reports a checksum,
      which is checked against the host's model
  mmu-vmm conformance [--cases N] [--seed S] [--levels 4|5] [--json]
      access-matrix test of mmu-api's walker against KVM
  mmu-vmm run --mmu shadow|ept --workload W [--vcpus N] [--mem SIZE] [--read]
              [--passes N] [--ops N] [--seed S] [--time-limit SECS] [--json]
      runs workload W (touch, pt-edit, multi-as, access, mmio-rr, dirty, churn,
      stress)
      on N vCPUs (default 2) with the chosen MMU backend owning guest memory and
      serving exits (SIZE: bytes or K/M/G, a multiple of 2 MiB; default 64M);
      checks the guest's reports, faults and memory against the host's model,
      the backend's dirty log and translations; prints the backend's stats.
      --passes: touch 1, multi-as 4, churn 10, stress host cycles (50);
      --ops: pt-edit edits (480), multi-as address spaces (16), mmio-rr
      transactions (1000), dirty writes (65536), stress pages per vCPU (16);
      --read: touch reads instead of writing
  mmu-vmm diff --workload W [--a shadow|ept] [--b shadow|ept] [run's options]
      runs W (not stress, which depends on timing) under backends a (default
      shadow) and b (default ept) with the same inputs and compares what the guest observed: memory, page tables
      and their A/D bits, fault logs, reports; exits non-zero on a difference
  mmu-vmm bench churn|mmio-rr|faults|reclaim [--vcpus N] [--mem SIZE[,SIZE...]]
                [--runs N] [--ops N] [--slots N[,N...]] [--wait halt|spin]
                [--quick] [--json] [--plot FILE.svg]
      measures the backends side by side, every configuration alternated
      within the run, and prints each one's median and the ratios:
      churn: memslot delete + add with every vCPU waiting at CPL3 (shadow fast
        zap, shadow naive zap, ept; default 6 vCPUs, 2G, 10 runs);
      mmio-rr: MMIO request/response transactions per second (MMIO caching
        on/off in both backends; --slots 1,512; --ops transactions, 2000);
      faults: first touch and re-touch after a churn (shadow prefetch on/off,
        ept; 6 vCPUs, 2G, 3 runs);
      reclaim: faults and pages zapped at a 64-page limit, FIFO against
        parent-aware, on the soft vCPU (--ops rounds, 20);
      --wait: between commands the vCPUs of churn and faults sleep in the host
        after each turn of their CPL3 wait loop (halt, the default: idle
        vCPUs) or spin at CPL3 (spin); --quick: small sizes and few runs;
        --plot: an SVG plot
  mmu-vmm compare [--quick] [--out DIR] [--json]
      every bench in one run (--quick: under 3 minutes here); --out writes
      each bench's table, JSON and SVG plot into DIR";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("info") => info(),
        Some("touch") => touch(&args[1..]),
        Some("conformance") => conformance(&args[1..]),
        Some("run") => run(&args[1..]),
        Some("diff") => diff(&args[1..]),
        Some("bench") => bench(&args[1..]),
        Some("compare") => compare(&args[1..]),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(())
        }
        _ => Err(format!("missing or unknown command\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("mmu-vmm: {message}");
            ExitCode::FAILURE
        }
    }
}

/// `--name value` options.
struct Options<'a> {
    args: &'a [String],
}

impl<'a> Options<'a> {
    fn new(args: &'a [String], known: &[&str], flags: &[&str]) -> Result<Self, String> {
        let mut i = 0;
        while i < args.len() {
            let arg = args[i].as_str();
            if flags.contains(&arg) {
                i += 1;
            } else if known.contains(&arg) {
                if i + 1 >= args.len() {
                    return Err(format!("{arg} needs a value"));
                }
                i += 2;
            } else {
                return Err(format!("unknown option {arg}\n{USAGE}"));
            }
        }
        Ok(Self { args })
    }

    fn flag(&self, name: &str) -> bool {
        self.args.iter().any(|a| a == name)
    }

    fn raw(&self, name: &str) -> Option<&str> {
        self.args
            .iter()
            .position(|a| a == name)
            .map(|i| self.args[i + 1].as_str())
    }

    fn value<T: std::str::FromStr>(&self, name: &str, default: T) -> Result<T, String>
    where
        T::Err: std::fmt::Display,
    {
        match self.args.iter().position(|a| a == name) {
            Some(i) => self.args[i + 1]
                .parse()
                .map_err(|e| format!("{name} {}: {e}", self.args[i + 1])),
            None => Ok(default),
        }
    }
}

fn info() -> Result<(), String> {
    let vm = Vm::new(VmConfig::default()).map_err(|e| error_chain(&e))?;
    let cpu = vm.cpu();
    println!("kvm api version: {}", vm.kvm().get_api_version());
    println!("pvm: {}", cpu.pvm);
    println!("maxphyaddr: {}", cpu.maxphyaddr);
    println!("paging features: {:?}", cpu.features);
    println!("max vcpus: {}", vm.kvm().get_max_vcpus());
    Ok(())
}

fn touch(args: &[String]) -> Result<(), String> {
    let opts = Options::new(
        args,
        &[
            "--vcpus",
            "--pages",
            "--passes",
            "--mem-mib",
            "--ops",
            "--levels",
            "--time-limit",
        ],
        &["--read"],
    )?;
    let vcpus: usize = opts.value("--vcpus", 2)?;
    let pages: u64 = opts.value("--pages", 1024)?;
    let passes: u64 = opts.value("--passes", 1)?;
    let ops: PagingOps = opts.value("--ops", PagingOps::Native)?;
    let levels: u8 = opts.value("--levels", 4)?;
    let limit = Duration::from_secs_f64(opts.value("--time-limit", 60.0)?);
    let kind = if opts.flag("--read") {
        TouchKind::Read
    } else {
        TouchKind::Write
    };
    // Enough memory for every vCPU's pages, plus the fixed areas.
    let needed_mib = (vcpus as u64 * pages * 4096).div_ceil(1 << 20) + 16;
    let mem_mib: u64 = opts.value("--mem-mib", needed_mib.next_multiple_of(2))?;

    let mut vm = Vm::new(VmConfig {
        vcpus,
        mem_size: mem_mib << 20,
        paging_ops: ops,
        paging_levels: levels,
        ..VmConfig::default()
    })
    .map_err(|e| error_chain(&e))?;
    let seed = 0x5eed_0000_0000;
    let mut vcpu_args = Vec::with_capacity(vcpus);
    for i in 0..vcpus {
        let slice = vm.layout().data_slice(i, vcpus);
        if (slice.end - slice.start) / 4096 < pages {
            return Err(format!(
                "{pages} pages per vCPU do not fit in {mem_mib} MiB; raise --mem-mib"
            ));
        }
        if kind == TouchKind::Read {
            for p in 0..pages {
                let address = slice.start + p * 4096;
                vm.write_u64(address, address.rotate_left(17))
                    .map_err(|e| error_chain(&e))?;
            }
        }
        vcpu_args.push(VcpuArgs([
            slice.start,
            pages,
            passes,
            seed + i as u64,
            0,
            0,
        ]));
    }
    let program = workloads::touch(kind).map_err(|e| error_chain(&e))?;
    let report = vm
        .run(&program, &vcpu_args, limit)
        .map_err(|e| error_chain(&e))?;
    let mut bad = 0;
    for (vcpu, arg) in report.vcpus.iter().zip(&vcpu_args) {
        let [base, pages, passes, seed, ..] = arg.0;
        let expected =
            workloads::touch_checksum(kind, base, pages, passes, seed, |a| a.rotate_left(17));
        let got = vcpu.last(tag::CHECKSUM);
        let ok = got == Some(expected);
        bad += usize::from(!ok);
        println!(
            "{}: {:?} checksum {:#x} ({}) in {:?}, {} exits",
            vcpu.id,
            vcpu.outcome,
            got.unwrap_or(0),
            if ok { "ok" } else { "MISMATCH" },
            vcpu.elapsed,
            vcpu.stats.exits
        );
    }
    println!(
        "touch: {vcpus} vCPUs x {pages} pages x {passes} passes ({kind:?}, {ops:?}) in {:?}",
        report.elapsed
    );
    if bad > 0 {
        return Err(format!("{bad} checksum mismatches"));
    }
    Ok(())
}

fn conformance(args: &[String]) -> Result<(), String> {
    let opts = Options::new(args, &["--cases", "--seed", "--levels"], &["--json"])?;
    let defaults = mmu_vmm::conformance::Options::default();
    let levels = match opts.value::<u8>("--levels", 0)? {
        0 => defaults.levels,
        n => vec![n],
    };
    let options = mmu_vmm::conformance::Options {
        cases: opts.value("--cases", defaults.cases)?,
        seed: opts.value("--seed", defaults.seed)?,
        levels,
    };
    let summary = mmu_vmm::conformance::run(&options).map_err(|e| error_chain(&e))?;
    mmu_vmm::conformance::print(&summary, opts.flag("--json"));
    if !summary.mismatches.is_empty() {
        return Err(format!("{} mismatches", summary.mismatches.len()));
    }
    Ok(())
}

/// The options `run` and `diff` share.
const WORKLOAD_OPTIONS: [&str; 7] = [
    "--workload",
    "--vcpus",
    "--mem",
    "--passes",
    "--ops",
    "--seed",
    "--time-limit",
];

/// Parses the options `run` and `diff` share; `mmu` is the backend `run`
/// names (`diff` replaces it).
fn run_options(
    opts: &Options<'_>,
    mmu: mmu_backends::BackendKind,
) -> Result<mmu_vmm::run::RunOptions, String> {
    let defaults = mmu_vmm::run::RunOptions::default();
    let Some(workload) = opts.raw("--workload") else {
        return Err(format!(
            "--workload is needed: one of {}\n{USAGE}",
            mmu_vmm::workload::Workload::names()
        ));
    };
    let workload: mmu_vmm::workload::Workload = workload.parse().map_err(|e| error_chain(&e))?;
    let mem_size = match opts.raw("--mem") {
        Some(size) => mmu_vmm::run::parse_size(size)?,
        None => defaults.mem_size,
    };
    let optional = |name: &str| -> Result<Option<u64>, String> {
        opts.raw(name)
            .map(|v| v.parse().map_err(|e| format!("{name} {v}: {e}")))
            .transpose()
    };
    let params = mmu_vmm::workload::Params {
        touch: if opts.flag("--read") {
            TouchKind::Read
        } else {
            TouchKind::Write
        },
        passes: optional("--passes")?,
        ops: optional("--ops")?,
        seed: opts.value("--seed", defaults.params.seed)?,
    };
    Ok(mmu_vmm::run::RunOptions {
        mmu,
        workload,
        vcpus: opts.value("--vcpus", defaults.vcpus)?,
        mem_size,
        params,
        time_limit: Duration::from_secs_f64(
            opts.value("--time-limit", defaults.time_limit.as_secs_f64())?,
        ),
        ..defaults
    })
}

fn run(args: &[String]) -> Result<(), String> {
    let mut known = vec!["--mmu"];
    known.extend(WORKLOAD_OPTIONS);
    let opts = Options::new(args, &known, &["--json", "--read"])?;
    let Some(mmu) = opts.raw("--mmu") else {
        return Err(format!("run needs --mmu shadow|ept\n{USAGE}"));
    };
    let mmu: mmu_backends::BackendKind = mmu.parse().map_err(|e| error_chain(&e))?;
    let options = run_options(&opts, mmu)?;
    let summary = mmu_vmm::run::run(options).map_err(|e| error_chain(&e))?;
    if opts.flag("--json") {
        println!("{}", summary.json());
    } else {
        println!("{}", summary.text());
    }
    if !summary.ok() {
        return Err("a check failed (see above)".to_string());
    }
    Ok(())
}

fn diff(args: &[String]) -> Result<(), String> {
    let mut known = vec!["--a", "--b"];
    known.extend(WORKLOAD_OPTIONS);
    let opts = Options::new(args, &known, &["--json", "--read"])?;
    let defaults = mmu_vmm::diff::DiffOptions::default();
    let backend = |name: &str, default| -> Result<mmu_backends::BackendKind, String> {
        match opts.raw(name) {
            Some(kind) => kind.parse().map_err(|e| error_chain(&e)),
            None => Ok(default),
        }
    };
    let a = backend("--a", defaults.a)?;
    let b = backend("--b", defaults.b)?;
    let options = mmu_vmm::diff::DiffOptions {
        a,
        b,
        run: run_options(&opts, a)?,
    };
    let summary = mmu_vmm::diff::diff(options).map_err(|e| error_chain(&e))?;
    if opts.flag("--json") {
        println!("{}", summary.json());
    } else {
        println!("{}", summary.text());
    }
    if !summary.identical() {
        return Err("the backends differ (see above)".to_string());
    }
    if !summary.ok() {
        return Err("a check failed (see above)".to_string());
    }
    Ok(())
}

/// The options of `bench` (and the sizes `compare` takes from them).
fn bench_options(opts: &Options<'_>) -> Result<mmu_vmm::bench::BenchOptions, String> {
    let optional = |name: &str| -> Result<Option<u64>, String> {
        opts.raw(name)
            .map(|v| v.parse().map_err(|e| format!("{name} {v}: {e}")))
            .transpose()
    };
    Ok(mmu_vmm::bench::BenchOptions {
        vcpus: optional("--vcpus")?.map(|v| v as usize),
        sizes: opts
            .raw("--mem")
            .map(mmu_vmm::bench::parse_sizes)
            .transpose()?,
        runs: optional("--runs")?.map(|v| v as usize),
        ops: optional("--ops")?,
        slots: opts
            .raw("--slots")
            .map(mmu_vmm::bench::parse_slots)
            .transpose()?,
        wait: opts.value("--wait", mmu_vmm::bench::WaitMode::Halt)?,
        quick: opts.flag("--quick"),
        progress: true,
        ..mmu_vmm::bench::BenchOptions::default()
    })
}

fn bench(args: &[String]) -> Result<(), String> {
    let Some(which) = args.first() else {
        return Err(format!(
            "bench needs churn, mmio-rr, faults or reclaim\n{USAGE}"
        ));
    };
    let kind: mmu_vmm::bench::BenchKind = which.parse().map_err(|e| error_chain(&e))?;
    let opts = Options::new(
        &args[1..],
        &[
            "--vcpus", "--mem", "--runs", "--ops", "--slots", "--wait", "--plot",
        ],
        &["--json", "--quick"],
    )?;
    let options = bench_options(&opts)?;
    if kind != mmu_vmm::bench::BenchKind::Reclaim && !mmu_vmm::kvm_available() {
        return Err(format!(
            "bench {kind} needs /dev/kvm, which cannot be opened"
        ));
    }
    let report = mmu_vmm::bench::run_bench(kind, &options).map_err(|e| error_chain(&e))?;
    if let Some(path) = opts.raw("--plot") {
        mmu_vmm::bench::plot::write_svg(&report, path).map_err(|e| error_chain(&e))?;
        eprintln!("plot written to {path}");
    }
    if opts.flag("--json") {
        println!("{}", report.json());
    } else {
        println!("{}", report.text());
    }
    Ok(())
}

fn compare(args: &[String]) -> Result<(), String> {
    let opts = Options::new(args, &["--out"], &["--json", "--quick"])?;
    let quick = opts.flag("--quick");
    if !mmu_vmm::kvm_available() {
        return Err("compare needs /dev/kvm, which cannot be opened".to_string());
    }
    let options = mmu_vmm::bench::BenchOptions {
        quick,
        progress: true,
        ..mmu_vmm::bench::BenchOptions::default()
    };
    let started = std::time::Instant::now();
    let mut reports = Vec::new();
    for kind in mmu_vmm::bench::BenchKind::ALL {
        let report = mmu_vmm::bench::run_bench(kind, &options).map_err(|e| error_chain(&e))?;
        if !opts.flag("--json") {
            println!("{}\n", report.text());
        }
        reports.push(report);
    }
    let elapsed = started.elapsed();
    let json = mmu_vmm::bench::compare_json(quick, &reports, elapsed);
    if let Some(dir) = opts.raw("--out") {
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {dir}: {e}"))?;
        for r in &reports {
            let base = std::path::Path::new(dir).join(&r.bench);
            let svg = base.with_extension("svg");
            mmu_vmm::bench::plot::write_svg(r, &svg.to_string_lossy())
                .map_err(|e| error_chain(&e))?;
            std::fs::write(base.with_extension("txt"), r.text() + "\n")
                .map_err(|e| format!("cannot write into {dir}: {e}"))?;
            std::fs::write(base.with_extension("json"), r.json() + "\n")
                .map_err(|e| format!("cannot write into {dir}: {e}"))?;
        }
        std::fs::write(
            std::path::Path::new(dir).join("compare.json"),
            json.clone() + "\n",
        )
        .map_err(|e| format!("cannot write into {dir}: {e}"))?;
        eprintln!("tables, JSON and plots written to {dir}");
    }
    if opts.flag("--json") {
        println!("{json}");
    } else {
        println!(
            "compare: {} benches in {:.1} s",
            reports.len(),
            elapsed.as_secs_f64()
        );
    }
    Ok(())
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
