//! `mmu-vmm run`: a guest workload under a chosen MMU backend, with what
//! the guest did, what the VMM checked, and the backend's stats.
//!
//! The VM is an [`MmuVm`]: the backend owns its memslots (on KVM the EPT
//! backend mirrors them with `KVM_SET_USER_MEMORY_REGION`) and every exit
//! goes through `integration`'s handler. After the run the VMM checks, for
//! `touch`:
//!
//! - each vCPU's checksum against the host's model of the workload;
//! - the backend's dirty log of the data area (KVM's log merged with the
//!   VMM's own writes): every page the guest wrote must be in it;
//! - every page each vCPU touched, translated guest-virtual to
//!   guest-physical by the backend (the reference walker over the guest's
//!   own page tables, as a debugger would) and read back: the address and
//!   the value must be what the guest used.
//!
//! The `shadow` backend is refused before anything is created: hosting it
//! on KVM is not available yet.

use std::fmt::Write as _;
use std::str::FromStr;
use std::time::Duration;

use backends::{BackendConfig, BackendKind};
use integration::ExitStats;
use integration::kvm::{KvmHostError, check_hostable};
use mmu_api::paging::WalkOptions;
use mmu_api::{Access, AccessKind, Gva, MmuStats};

use crate::error::{KitError, RunError, SetupError};
use crate::kit::abi::tag;
use crate::kit::workloads::{self, TouchKind};
use crate::layout::PAGE_SIZE;
use crate::mmu::{DATA_SLOT, MmuVm, MmuVmConfig};
use crate::vcpu::VcpuOutcome;
use crate::vm::{VcpuArgs, VmConfig};
use crate::{PagingOps, VcpuReport};

/// A workload `run` knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Workload {
    /// Every vCPU touches each 4 KiB page of its slice of the data area
    /// from CPL3 ([`workloads::touch`]).
    Touch,
}

impl Workload {
    /// Every workload, in the order `--help` lists them.
    pub const ALL: [Workload; 1] = [Workload::Touch];

    /// Its name on the command line.
    pub const fn name(self) -> &'static str {
        match self {
            Workload::Touch => "touch",
        }
    }
}

impl FromStr for Workload {
    type Err = RunCommandError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Workload::ALL
            .into_iter()
            .find(|w| w.name() == s)
            .ok_or_else(|| RunCommandError::UnknownWorkload(s.to_string()))
    }
}

/// What `run` does.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// The MMU backend.
    pub mmu: BackendKind,
    /// The backends' configuration.
    pub backend: BackendConfig,
    /// The workload.
    pub workload: Workload,
    /// vCPUs (each on its own thread).
    pub vcpus: usize,
    /// Guest memory in bytes (a multiple of 2 MiB).
    pub mem_size: u64,
    /// Read or write each page.
    pub touch: TouchKind,
    /// Passes over the pages.
    pub passes: u64,
    /// Hang protection.
    pub time_limit: Duration,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            mmu: BackendKind::Ept,
            backend: BackendConfig::default(),
            workload: Workload::Touch,
            vcpus: 2,
            mem_size: 64 << 20,
            touch: TouchKind::Write,
            passes: 1,
            time_limit: Duration::from_secs(60),
        }
    }
}

/// Why `run` failed (a check that did not hold is not an error: see
/// [`RunSummary::ok`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunCommandError {
    /// Not a workload `run` knows.
    #[error("unknown workload {0:?}: this build has touch")]
    UnknownWorkload(String),
    /// The backend cannot be hosted on KVM (the shadow backend, for now).
    #[error("the {mmu} MMU backend cannot run guests here")]
    NotHostable {
        /// The backend asked for.
        mmu: BackendKind,
        /// Why.
        #[source]
        source: KvmHostError,
    },
    /// Building the VM failed.
    #[error("cannot build the VM")]
    Setup(#[from] SetupError),
    /// Assembling the workload failed.
    #[error("cannot assemble the workload")]
    Kit(#[from] KitError),
    /// The guest run failed.
    #[error("the guest run failed")]
    Run(#[from] RunError),
    /// Reading guest memory or the backend's state after the run failed.
    #[error("cannot inspect the guest after the run: {0}")]
    Inspect(String),
}

/// One vCPU's part of a run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VcpuSummary {
    /// The vCPU's report (outcome, reports, exit counters, time).
    pub report: VcpuReport,
    /// First page it touched.
    pub base: u64,
    /// Pages it touched per pass.
    pub pages: u64,
    /// The checksum the host's model expects.
    pub expected: u64,
    /// Pages whose translation by the backend, or whose value read back
    /// through it, differed from what the guest used.
    pub translation_mismatches: u64,
}

impl VcpuSummary {
    /// The checksum the guest reported.
    pub fn checksum(&self) -> Option<u64> {
        self.report.last(tag::CHECKSUM)
    }

    /// True if the guest finished and its checksum is the expected one.
    pub fn checksum_ok(&self) -> bool {
        matches!(self.report.outcome, VcpuOutcome::Done { exit_code: 0 })
            && self.checksum() == Some(self.expected)
    }
}

/// The dirty log of the data area after the run.
///
/// Completeness is what is checked: every page the guest wrote must be
/// logged. The log may hold more: KVM logs a page when it maps it
/// writable, and on the PVM host here a read-only `touch` run logs every
/// page it read (the identity tables preset the D bit, so a read fault can
/// map the page writable).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirtySummary {
    /// Pages in the log.
    pub dirty_pages: u64,
    /// Pages the guest wrote (all the touched pages of a write run; none
    /// of a read run).
    pub written_pages: u64,
    /// Pages the guest wrote that the log lacks (must be 0).
    pub missing: u64,
}

/// Everything `run` reports.
#[derive(Clone, Debug)]
pub struct RunSummary {
    /// What was run.
    pub options: RunOptions,
    /// Per vCPU.
    pub vcpus: Vec<VcpuSummary>,
    /// The data area's dirty log.
    pub dirty: DirtySummary,
    /// The backend's counters.
    pub backend: MmuStats,
    /// The exit handler's counters, summed over the vCPUs.
    pub exits: ExitStats,
    /// Wall time of the guest run.
    pub elapsed: Duration,
}

impl RunSummary {
    /// True if every check held: checksums, dirty-log completeness,
    /// translations.
    pub fn ok(&self) -> bool {
        self.dirty.missing == 0
            && self
                .vcpus
                .iter()
                .all(|v| v.checksum_ok() && v.translation_mismatches == 0)
    }

    /// Pages translated through the backend after the run.
    pub fn translated_pages(&self) -> u64 {
        self.vcpus.iter().map(|v| v.pages).sum()
    }

    /// The summary as lines of text.
    pub fn text(&self) -> String {
        let o = &self.options;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "run: {} under the {} MMU backend, {} vCPUs, {} MiB, {:?}, {} passes, in {:?}",
            o.workload.name(),
            o.mmu,
            o.vcpus,
            o.mem_size >> 20,
            o.touch,
            o.passes,
            self.elapsed
        );
        for v in &self.vcpus {
            let r = &v.report;
            let _ = writeln!(
                out,
                "  {}: {:?}, touched {} pages from {:#x}, checksum {:#x} ({}), {} exits, {:?}",
                r.id,
                r.outcome,
                v.pages,
                v.base,
                v.checksum().unwrap_or(0),
                if v.checksum_ok() { "ok" } else { "MISMATCH" },
                r.stats.exits,
                r.elapsed
            );
        }
        let d = &self.dirty;
        let _ = writeln!(
            out,
            "dirty log of the data area: {} pages; {} written by the guest, {} of them missing",
            d.dirty_pages, d.written_pages, d.missing
        );
        let mismatches: u64 = self.vcpus.iter().map(|v| v.translation_mismatches).sum();
        let _ = writeln!(
            out,
            "translated through the backend: {} guest-virtual pages, {} mismatches",
            self.translated_pages(),
            mismatches
        );
        let _ = writeln!(out, "backend stats: {}", self.backend);
        let _ = writeln!(out, "exit handler: {}", self.exits);
        let _ = write!(out, "result: {}", if self.ok() { "ok" } else { "FAILED" });
        out
    }

    /// The summary as one JSON object.
    pub fn json(&self) -> String {
        let o = &self.options;
        let vcpus: Vec<String> = self
            .vcpus
            .iter()
            .map(|v| {
                let r = &v.report;
                let (outcome, exit_code) = match r.outcome {
                    VcpuOutcome::Done { exit_code } => ("done", exit_code),
                    VcpuOutcome::Stopped => ("stopped", 0),
                };
                format!(
                    "{{\"id\": {}, \"outcome\": \"{outcome}\", \"exit_code\": {exit_code}, \"base\": {}, \"pages\": {}, \"checksum\": {}, \"expected\": {}, \"checksum_ok\": {}, \"translation_mismatches\": {}, \"exits\": {}, \"hypercalls\": {}, \"routed_exits\": {}, \"elapsed_s\": {:.6}}}",
                    r.id.0,
                    v.base,
                    v.pages,
                    v.checksum().map_or("null".to_string(), |c| c.to_string()),
                    v.expected,
                    v.checksum_ok(),
                    v.translation_mismatches,
                    r.stats.exits,
                    r.stats.hypercalls,
                    r.stats.routed,
                    r.elapsed.as_secs_f64()
                )
            })
            .collect();
        let counters = |pairs: &[(&str, u64)]| {
            pairs
                .iter()
                .map(|(name, value)| format!("\"{name}\": {value}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let d = &self.dirty;
        format!(
            "{{\"mmu\": \"{}\", \"workload\": \"{}\", \"touch\": \"{}\", \"vcpus\": {}, \"mem_bytes\": {}, \"passes\": {}, \"elapsed_s\": {:.6}, \"ok\": {}, \"guest\": [{}], \"dirty_log\": {{\"slot\": {}, \"dirty_pages\": {}, \"written_pages\": {}, \"missing\": {}}}, \"translated_pages\": {}, \"backend\": {{\"name\": \"{}\", \"counters\": {{{}}}}}, \"exit_handler\": {{{}}}}}",
            o.mmu,
            o.workload.name(),
            match o.touch {
                TouchKind::Read => "read",
                TouchKind::Write => "write",
            },
            o.vcpus,
            o.mem_size,
            o.passes,
            self.elapsed.as_secs_f64(),
            self.ok(),
            vcpus.join(", "),
            DATA_SLOT.0,
            d.dirty_pages,
            d.written_pages,
            d.missing,
            self.translated_pages(),
            self.backend.backend,
            counters(&self.backend.counters),
            counters(&self.exits.counters()),
        )
    }
}

/// The value of the first quadword of a data page before a read run.
fn preset(address: u64) -> u64 {
    address.rotate_left(17)
}

/// Runs `options.workload` under `options.mmu` on KVM and checks it.
pub fn run(options: RunOptions) -> Result<RunSummary, RunCommandError> {
    check_hostable(options.mmu).map_err(|source| RunCommandError::NotHostable {
        mmu: options.mmu,
        source,
    })?;
    let Workload::Touch = options.workload;
    let mut vm = MmuVm::new(MmuVmConfig {
        kind: options.mmu,
        backend: options.backend.clone(),
        vm: VmConfig {
            vcpus: options.vcpus,
            mem_size: options.mem_size,
            paging_ops: PagingOps::Paravirt,
            ..VmConfig::default()
        },
        log_dirty_data: true,
        coherence: integration::kvm::HostCoherence::Detect,
    })?;
    let vcpus = options.vcpus;
    let seed = 0x5eed_0000_0000u64;
    let mut args = Vec::with_capacity(vcpus);
    for i in 0..vcpus {
        let slice = vm.vm().layout().data_slice(i, vcpus);
        let pages = (slice.end - slice.start) / PAGE_SIZE;
        if options.touch == TouchKind::Read {
            for p in 0..pages {
                let address = slice.start + p * PAGE_SIZE;
                vm.vm()
                    .write_u64(address, preset(address))
                    .map_err(|e| RunCommandError::Inspect(e.to_string()))?;
            }
        }
        args.push(VcpuArgs([
            slice.start,
            pages,
            options.passes,
            seed + i as u64,
            0,
            0,
        ]));
    }
    // The VMM's own writes above are not guest writes: start the log now.
    vm.memslots()
        .dirty_log(DATA_SLOT)
        .map_err(|e| RunCommandError::Inspect(e.to_string()))?;

    let program = workloads::touch(options.touch)?;
    let report = vm.run(&program, &args, options.time_limit)?;

    let log = vm
        .memslots()
        .dirty_log(DATA_SLOT)
        .map_err(|e| RunCommandError::Inspect(e.to_string()))?;
    let data_base = vm.vm().layout().data().start;
    let mut dirty = DirtySummary {
        dirty_pages: log.count(),
        written_pages: 0,
        missing: 0,
    };
    let mut summaries = Vec::with_capacity(vcpus);
    for (i, (vcpu_report, arg)) in report.vcpus.into_iter().zip(&args).enumerate() {
        let [base, pages, passes, seed, ..] = arg.0;
        let expected = workloads::touch_checksum(options.touch, base, pages, passes, seed, preset);
        let wrote = options.touch == TouchKind::Write && passes > 0;
        let mut mismatches = 0;
        let handler = vm
            .handler(i)
            .ok_or_else(|| RunCommandError::Inspect(format!("no handler for vCPU {i}")))?;
        let mut translated = Vec::with_capacity(pages as usize);
        for p in 0..pages {
            let gva = base + p * PAGE_SIZE;
            let segments = handler.exits().mmu().translate(
                Gva(gva),
                8,
                Access::user(AccessKind::Read),
                WalkOptions {
                    set_accessed_dirty: false,
                },
            );
            translated.push((gva, segments.ok().and_then(|s| s.first().map(|s| s.gpa))));
        }
        for (gva, gpa) in translated {
            let want = if wrote { gva ^ seed } else { preset(gva) };
            let got = match gpa {
                Some(gpa) if gpa.raw() == gva => vm.vm().read_u64(gpa.raw()).ok(),
                _ => None,
            };
            if got != Some(want) {
                mismatches += 1;
            }
            if wrote {
                dirty.written_pages += 1;
                if !log.is_dirty((gva - data_base) / PAGE_SIZE) {
                    dirty.missing += 1;
                }
            }
        }
        summaries.push(VcpuSummary {
            report: vcpu_report,
            base,
            pages,
            expected,
            translation_mismatches: mismatches,
        });
    }
    let mut exits = ExitStats::default();
    for stats in vm.exit_stats() {
        exits.add(&stats);
    }
    Ok(RunSummary {
        options,
        vcpus: summaries,
        dirty,
        backend: vm.backend().stats(),
        exits,
        elapsed: report.elapsed,
    })
}

/// Parses a memory size: bytes, or a number with `K`, `M`, `G` (or
/// `KiB`, `MiB`, `GiB`; powers of two).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    let value: u64 = number
        .parse()
        .map_err(|_| format!("invalid size {s:?}: expected a number with an optional K, M or G"))?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" | "kb" => 10,
        "m" | "mib" | "mb" => 20,
        "g" | "gib" | "gb" => 30,
        _ => return Err(format!("invalid size {s:?}: unknown unit {unit:?}")),
    };
    value
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("invalid size {s:?}: too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert!(parse_size("").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("99999999999999G").is_err());
    }

    #[test]
    fn workloads_parse() {
        assert_eq!("touch".parse::<Workload>().unwrap(), Workload::Touch);
        let err = "mmio-rr".parse::<Workload>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown workload \"mmio-rr\": this build has touch"
        );
    }

    #[test]
    fn summaries_render_as_one_json_object() {
        let report = VcpuReport {
            id: mmu_api::VcpuId(0),
            outcome: VcpuOutcome::Done { exit_code: 0 },
            reports: vec![crate::Report {
                tag: u64::from(tag::CHECKSUM),
                value: 42,
            }],
            stats: crate::ExitStats::default(),
            elapsed: Duration::from_millis(3),
        };
        let summary = RunSummary {
            options: RunOptions::default(),
            vcpus: vec![VcpuSummary {
                report,
                base: 0x40_0000,
                pages: 3,
                expected: 42,
                translation_mismatches: 0,
            }],
            dirty: DirtySummary {
                dirty_pages: 3,
                written_pages: 3,
                missing: 0,
            },
            backend: MmuStats {
                backend: "ept",
                counters: vec![("translations", 3), ("tlb_hits", 0)],
            },
            exits: ExitStats::default(),
            elapsed: Duration::from_millis(5),
        };
        assert!(summary.ok());
        let json = summary.json();
        assert!(
            json.starts_with("{\"mmu\": \"ept\", \"workload\": \"touch\""),
            "{json}"
        );
        assert!(json.contains("\"ok\": true"), "{json}");
        assert!(
            json.contains("\"checksum\": 42, \"expected\": 42, \"checksum_ok\": true"),
            "{json}"
        );
        assert!(
            json.contains("\"counters\": {\"translations\": 3, \"tlb_hits\": 0}"),
            "{json}"
        );
        assert!(
            json.contains("\"exit_handler\": {\"mmio_exits\": 0"),
            "{json}"
        );
        assert_eq!(json.matches('{').count(), json.matches('}').count());
        assert!(!json.contains('\n'));

        let mut bad = summary.clone();
        bad.dirty.missing = 1;
        assert!(!bad.ok());
        assert!(bad.text().ends_with("result: FAILED"));
        bad = summary;
        bad.vcpus[0].expected = 41;
        assert!(!bad.ok());
        assert!(bad.json().contains("\"checksum_ok\": false"));
    }
}
