//! The command line: subcommands, options and their value parsers.
//!
//! Every value is checked while parsing, so a bad one ends the command
//! with a one-line error and exit status 2 before any guest is built.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use mmu_backends::BackendKind;
use mmu_bench::{BenchKind, WaitMode};
use mmu_vmm::PagingOps;
use mmu_vmm::workload::Workload;

/// The reference VMM on KVM, with pluggable MMU backends.
#[derive(Debug, Parser)]
#[command(
    name = "mmu-vmm",
    about = "The reference VMM on KVM: guest workloads under the shadow or EPT MMU backend, \
             conformance of the reference walker against KVM, and benches.",
    after_help = "Exit status: 0 ok, 1 a check or the run failed, 2 a usage error.\n\
                  Run `mmu-vmm <COMMAND> --help` for a command's options.",
    subcommand_required = true,
    arg_required_else_help = true,
    disable_help_subcommand = true
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// What the host's KVM offers guests.
    Info,
    /// Every vCPU touches its own pages from CPL3; the checksums are
    /// checked against the host's model.
    Touch(TouchArgs),
    /// Access-matrix test of mmu-api's reference walker against KVM.
    Conformance(ConformanceArgs),
    /// A guest workload under an MMU backend, checked against the host's
    /// model.
    #[command(long_about = RUN_ABOUT)]
    Run(RunArgs),
    /// A workload under two backends, and every difference the guest could
    /// observe.
    #[command(long_about = DIFF_ABOUT)]
    Diff(DiffArgs),
    /// Measures the backends side by side on one bench.
    #[command(long_about = BENCH_ABOUT)]
    Bench(BenchArgs),
    /// Every bench in one run.
    #[command(
        long_about = "Every bench in one run (churn, mmio-rr, faults, reclaim), each \
                      printed as it finishes; --quick takes under 3 minutes on a 2-core \
                      PVM host."
    )]
    Compare(CompareArgs),
}

const RUN_ABOUT: &str = "Runs workload W on N vCPUs with the chosen MMU backend owning guest \
memory and serving exits; checks the guest's reports, faults and memory against the host's \
model, the backend's dirty log and translations; prints the backend's and the exit handler's \
counters (grouped, with --stats).

Workloads: touch, pt-edit, multi-as, access, mmio-rr, dirty, churn, stress.";

const DIFF_ABOUT: &str = "Runs W (not stress, which depends on timing) under backends a \
(default shadow) and b (default ept) with the same inputs and compares what the guest \
observed: memory, page tables and their A/D bits, fault logs, reports. Exits with status 1 \
on a difference.";

const BENCH_ABOUT: &str = "Measures the backends side by side, every configuration \
alternated within the run, and prints each one's median and the ratios.

  churn:   memslot delete + add with every vCPU waiting at CPL3 (shadow fast zap, shadow
           naive zap, ept; default 6 vCPUs, 2G, 10 runs)
  mmio-rr: MMIO request/response transactions per second (MMIO caching on/off in both
           backends; --slots 1,512; --ops transactions, 2000)
  faults:  first touch and re-touch after a churn (shadow prefetch on/off, ept; 6 vCPUs,
           2G, 3 runs)
  reclaim: faults and pages zapped at a 64-page limit, FIFO against parent-aware, on the
           soft vCPU (--ops rounds, 20)";

/// `touch`'s options.
#[derive(Debug, Args)]
#[command(allow_negative_numbers = true)]
pub(crate) struct TouchArgs {
    /// vCPUs, each on its own thread and slice of guest memory.
    #[arg(long, value_name = "N", default_value = "2", value_parser = vcpus)]
    pub(crate) vcpus: usize,
    /// 4 KiB pages each vCPU touches.
    #[arg(long, value_name = "N", default_value = "1024", value_parser = count)]
    pub(crate) pages: u64,
    /// Passes over the pages.
    #[arg(long, value_name = "N", default_value = "1", value_parser = count)]
    pub(crate) passes: u64,
    /// Guest memory in MiB (default: just enough for the pages).
    #[arg(long, value_name = "N", value_parser = count)]
    pub(crate) mem_mib: Option<u64>,
    /// Read the pages (the host fills them first) instead of writing them.
    #[arg(long)]
    pub(crate) read: bool,
    /// How the guest kernel changes paging: native instructions or
    /// hypercalls.
    #[arg(long, value_name = "native|paravirt", default_value = "native", value_parser = paging_ops)]
    pub(crate) ops: PagingOps,
    /// Paging levels.
    #[arg(long, value_name = "4|5", default_value = "4", value_parser = levels)]
    pub(crate) levels: u8,
    /// Seconds before a guest that has not finished is stopped.
    #[arg(long, value_name = "SECS", default_value = "60", value_parser = seconds)]
    pub(crate) time_limit: Duration,
}

/// `conformance`'s options.
#[derive(Debug, Args)]
#[command(allow_negative_numbers = true)]
pub(crate) struct ConformanceArgs {
    /// Cases in all (default 100000), split evenly over the paging levels.
    #[arg(long, value_name = "N", value_parser = count_usize)]
    pub(crate) cases: Option<usize>,
    /// Seed of the case generator.
    #[arg(long, value_name = "S", value_parser = seed)]
    pub(crate) seed: Option<u64>,
    /// Paging levels (default: 4 and 5 where the host has LA57).
    #[arg(long, value_name = "4|5", value_parser = levels)]
    pub(crate) levels: Option<u8>,
    /// One JSON object instead of text.
    #[arg(long)]
    pub(crate) json: bool,
}

/// The options `run` and `diff` share.
#[derive(Debug, Args)]
pub(crate) struct WorkloadArgs {
    /// The workload: touch, pt-edit, multi-as, access, mmio-rr, dirty,
    /// churn or stress.
    #[arg(long, value_name = "W", value_parser = workload)]
    pub(crate) workload: Workload,
    /// vCPUs (default 2).
    #[arg(long, value_name = "N", value_parser = vcpus)]
    pub(crate) vcpus: Option<usize>,
    /// Guest memory: bytes or K/M/G, a multiple of 2 MiB (default 64M).
    #[arg(long, value_name = "SIZE", value_parser = guest_size)]
    pub(crate) mem: Option<u64>,
    /// touch reads its pages instead of writing them.
    #[arg(long)]
    pub(crate) read: bool,
    /// Passes: touch 1, multi-as 4, churn 10; stress: host cycles (50).
    #[arg(long, value_name = "N", value_parser = count)]
    pub(crate) passes: Option<u64>,
    /// Operations per vCPU: pt-edit edits (480), multi-as address spaces
    /// (16), mmio-rr transactions (1000), dirty writes (65536), stress
    /// pages per vCPU (16).
    #[arg(long, value_name = "N", value_parser = count)]
    pub(crate) ops: Option<u64>,
    /// Seed of the generated inputs.
    #[arg(long, value_name = "S", value_parser = seed)]
    pub(crate) seed: Option<u64>,
    /// Seconds each round of the workload may take (default 60).
    #[arg(long, value_name = "SECS", value_parser = seconds)]
    pub(crate) time_limit: Option<Duration>,
    /// One JSON object instead of text.
    #[arg(long)]
    pub(crate) json: bool,
}

/// `run`'s options.
#[derive(Debug, Args)]
#[command(allow_negative_numbers = true)]
pub(crate) struct RunArgs {
    /// The MMU backend: shadow or ept.
    #[arg(long, value_name = "shadow|ept", value_parser = backend)]
    pub(crate) mmu: BackendKind,
    #[command(flatten)]
    pub(crate) workload: WorkloadArgs,
    /// Every counter of the backend and the exit handler, zeros included,
    /// grouped, each group with a line saying what it counts.
    #[arg(long)]
    pub(crate) stats: bool,
}

/// `diff`'s options.
#[derive(Debug, Args)]
#[command(allow_negative_numbers = true)]
pub(crate) struct DiffArgs {
    /// The first backend.
    #[arg(long, value_name = "shadow|ept", default_value = "shadow", value_parser = backend)]
    pub(crate) a: BackendKind,
    /// The second backend.
    #[arg(long, value_name = "shadow|ept", default_value = "ept", value_parser = backend)]
    pub(crate) b: BackendKind,
    #[command(flatten)]
    pub(crate) workload: WorkloadArgs,
}

/// `bench`'s options.
#[derive(Debug, Args)]
#[command(allow_negative_numbers = true)]
pub(crate) struct BenchArgs {
    /// The bench: churn, mmio-rr, faults or reclaim.
    #[arg(value_name = "BENCH", value_parser = bench_kind)]
    pub(crate) bench: BenchKind,
    /// vCPUs of each guest.
    #[arg(long, value_name = "N", value_parser = vcpus)]
    pub(crate) vcpus: Option<usize>,
    /// Guest sizes, comma-separated (each a multiple of 2 MiB).
    #[arg(long, value_name = "SIZE[,SIZE...]", value_parser = sizes)]
    pub(crate) mem: Option<List<u64>>,
    /// Runs of each configuration.
    #[arg(long, value_name = "N", value_parser = count_usize)]
    pub(crate) runs: Option<usize>,
    /// mmio-rr transactions per vCPU and run; reclaim rounds.
    #[arg(long, value_name = "N", value_parser = count)]
    pub(crate) ops: Option<u64>,
    /// mmio-rr memslot counts, comma-separated.
    #[arg(long, value_name = "N[,N...]", value_parser = slots)]
    pub(crate) slots: Option<List<u32>>,
    /// Between commands the vCPUs of churn and faults sleep in the host
    /// after each turn of their CPL3 wait loop (halt: idle vCPUs) or spin
    /// at CPL3 (spin).
    #[arg(long, value_name = "halt|spin", default_value = "halt", value_parser = wait)]
    pub(crate) wait: WaitMode,
    /// Small sizes and few runs.
    #[arg(long)]
    pub(crate) quick: bool,
    /// One JSON object instead of the table.
    #[arg(long)]
    pub(crate) json: bool,
    /// Also write a plot to FILE: PNG if its name ends in .png, else SVG
    /// (the path is checked before the bench starts).
    #[arg(long, value_name = "FILE")]
    pub(crate) plot: Option<PathBuf>,
}

/// `compare`'s options.
#[derive(Debug, Args)]
pub(crate) struct CompareArgs {
    /// Small sizes and few runs.
    #[arg(long)]
    pub(crate) quick: bool,
    /// Write each bench's table, JSON and SVG plot into DIR (checked before
    /// the benches start).
    #[arg(long, value_name = "DIR")]
    pub(crate) out: Option<PathBuf>,
    /// One JSON object instead of the tables.
    #[arg(long)]
    pub(crate) json: bool,
}

/// Prints a parse error as one line (or the help, which is no error) and
/// gives the exit status.
pub(crate) fn report_parse_error(e: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            ExitCode::SUCCESS
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            ExitCode::from(2)
        }
        _ => {
            eprintln!("mmu-vmm: {}", one_line(&e.render().to_string()));
            ExitCode::from(2)
        }
    }
}

/// clap's message up to its usage and tips, on one line.
fn one_line(rendered: &str) -> String {
    let first = rendered.split("\n\n").next().unwrap_or(rendered);
    let text = first
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    let text = text.strip_prefix("error: ").unwrap_or(&text).to_string();
    format!("{text} (see --help)")
}

/// A whole number of at least 1.
fn count(s: &str) -> Result<u64, String> {
    match s.trim().parse::<u64>() {
        Ok(0) => Err("must be at least 1".to_string()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{s:?} is not a whole number of at least 1")),
    }
}

fn count_usize(s: &str) -> Result<usize, String> {
    let n = count(s)?;
    usize::try_from(n).map_err(|_| "too large".to_string())
}

fn vcpus(s: &str) -> Result<usize, String> {
    let max = mmu_vmm::layout::MAX_VCPUS;
    match count_usize(s) {
        Ok(n) if n <= max => Ok(n),
        _ => Err(format!("expected a vCPU count from 1 to {max}")),
    }
}

fn seed(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let parsed = match t.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => t.parse(),
    };
    parsed.map_err(|_| format!("{s:?} is not a seed (a whole number, decimal or 0x hex)"))
}

/// Seconds: finite and above zero.
fn seconds(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !secs.is_finite() || secs <= 0.0 {
        return Err("must be a finite number of seconds above 0".to_string());
    }
    Duration::try_from_secs_f64(secs).map_err(|_| "too long".to_string())
}

fn levels(s: &str) -> Result<u8, String> {
    match s.trim() {
        "4" => Ok(4),
        "5" => Ok(5),
        _ => Err("expected 4 or 5".to_string()),
    }
}

fn paging_ops(s: &str) -> Result<PagingOps, String> {
    s.parse::<PagingOps>()
        .map_err(|_| "expected native or paravirt".to_string())
}

fn backend(s: &str) -> Result<BackendKind, String> {
    s.parse::<BackendKind>()
        .map_err(|_| "expected shadow or ept".to_string())
}

fn workload(s: &str) -> Result<Workload, String> {
    s.parse::<Workload>()
        .map_err(|_| format!("expected one of {}", Workload::names()))
}

fn bench_kind(s: &str) -> Result<BenchKind, String> {
    s.parse::<BenchKind>()
        .map_err(|_| "expected churn, mmio-rr, faults or reclaim".to_string())
}

fn wait(s: &str) -> Result<WaitMode, String> {
    s.parse::<WaitMode>()
        .map_err(|_| "expected halt or spin".to_string())
}

/// A guest size: bytes or K/M/G, a non-zero multiple of 2 MiB.
fn guest_size(s: &str) -> Result<u64, String> {
    let size = mmu_vmm::run::parse_size(s)?;
    if size == 0 || size % mmu_vmm::layout::MIB2 != 0 {
        return Err(format!("{s:?} is not a non-zero multiple of 2 MiB"));
    }
    Ok(size)
}

/// A comma-separated list given as one value (`--mem 256M,4G`). A newtype,
/// so clap takes the parsed list as the option's one value instead of
/// expecting the option once per element.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct List<T>(pub(crate) Vec<T>);

fn sizes(s: &str) -> Result<List<u64>, String> {
    mmu_bench::parse_sizes(s).map(List)
}

fn slots(s: &str) -> Result<List<u32>, String> {
    mmu_bench::parse_slots(s).map(List)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every option of every subcommand parses to the type its field has
    /// (clap checks that only when a value is read, with a panic).
    #[test]
    fn lists_parse_to_their_field_types() {
        use clap::Parser;
        let cli = Cli::try_parse_from([
            "mmu-vmm", "bench", "faults", "--mem", "256M,4G", "--slots", "1,512", "--runs", "2",
        ])
        .expect("valid options");
        let Command::Bench(bench) = cli.command else {
            panic!("not bench: {:?}", cli.command);
        };
        assert_eq!(bench.mem, Some(List(vec![256 << 20, 4 << 30])));
        assert_eq!(bench.slots, Some(List(vec![1, 512])));
        assert_eq!(bench.runs, Some(2));
    }

    /// clap's own consistency checks of the whole command tree.
    #[test]
    fn the_command_tree_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn values_are_checked() {
        assert_eq!(count("3"), Ok(3));
        assert!(count("0").is_err());
        assert!(count("-1").is_err());
        assert!(seconds("-1").is_err());
        assert!(seconds("NaN").is_err());
        assert!(seconds("inf").is_err());
        assert!(seconds("0").is_err());
        assert!(seconds("1e300").is_err());
        assert_eq!(seconds("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(guest_size("16M"), Ok(16 << 20));
        assert!(guest_size("3M").is_err());
        assert!(guest_size("0").is_err());
        assert_eq!(seed("0x10"), Ok(16));
        assert!(vcpus("0").is_err());
        assert!(vcpus("33").is_err());
        assert!(levels("3").is_err());
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn errors_are_one_line() {
        let e = Cli::try_parse_from(["mmu-vmm", "run", "--mmu", "ept"]).unwrap_err();
        let line = one_line(&e.render().to_string());
        assert!(!line.contains('\n'), "{line}");
        assert!(line.contains("--workload"), "{line}");
        let e = Cli::try_parse_from([
            "mmu-vmm",
            "run",
            "--mmu",
            "ept",
            "--mmu",
            "ept",
            "--workload",
            "touch",
        ])
        .unwrap_err();
        let line = one_line(&e.render().to_string());
        assert!(line.contains("cannot be used multiple times"), "{line}");
        let cli = Cli::try_parse_from(["mmu-vmm", "run", "--mmu=ept", "--workload", "touch"])
            .expect("--mmu=ept");
        assert!(matches!(cli.command, Command::Run(ref r) if r.mmu == BackendKind::Ept));
    }
}
