//! `mmu-vmm run`: a guest workload under a chosen MMU backend, with what
//! the guest did, what the VMM checked, and the backend's stats.
//!
//! The VM is an [`MmuVm`]: the backend owns its memslots (on KVM the EPT
//! backend mirrors them with `KVM_SET_USER_MEMORY_REGION`) and every exit
//! goes through `integration`'s handler. The guest kernel uses the
//! paravirtual paging calls ([`PagingOps::Paravirt`]), so the same guest
//! binary runs under every backend. The workload ([`workload`]) builds
//! its address spaces and data, and predicts what each vCPU must report.
//! After the run the VMM checks, per vCPU:
//!
//! - the reports (checksums, counts) against the host's model;
//! - the fault log against the faults the model predicts (vector, error
//!   code, CR2);
//! - guest memory the workload wrote, word by word;
//! - the backend's dirty log of the data area (KVM's log merged with the
//!   VMM's own writes): every page the guest wrote must be in it;
//! - the backend's guest-virtual translations of the workload's window
//!   (the reference walker over the guest's own tables, as a debugger
//!   would);
//! - and the workload's own host-side checks (device counters, churn).
//!
//! It also collects what the guest can observe ([`Observation`]) for
//! [`diff`](crate::diff).
//!
//! The `shadow` backend is refused before anything is created while its
//! KVM hosting is not available.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use mmu_api::paging::WalkOptions;
use mmu_api::{Access, AccessKind, Gva, MemslotFlags, MmuBackend, MmuStats, VcpuId};
use mmu_backends::{BackendConfig, BackendKind};
use mmu_integration::ExitStats;
use mmu_integration::arena::shared_guest_memory;
use mmu_integration::kvm::{KvmHostError, check_hostable};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::error::{KitError, RunError, SetupError};
use crate::json::{self, Object};
use crate::kit::FaultLog;
use crate::kit::abi::tag;
use crate::kit::workloads;
use crate::layout::{MAX_VCPUS, PAGE_SIZE};
use crate::mmu::{DATA_SLOT, Devices, MmuVm, MmuVmConfig, NoDevices};
use crate::observe::{Observation, VcpuObservation, observe};
use crate::stress::{Audit, StressDevice, StressHost, StressShared, StressStats};
use crate::units;
use crate::vcpu::{Report, VcpuOutcome};
use crate::vm::{RunReport, VcpuArgs, VmConfig};
use crate::workload::{
    self, CHURN_GPA, CHURN_SIZE, CHURN_SLOT, MAX_MEM_SIZE, Params, PlanError, RrCounters, RrDevice,
    STRESS_CYCLES,
};

/// The tags `stress` reports, in order.
const STRESS_TAGS: [u32; 5] = [
    tag::WRITES,
    tag::READS_CHECKED,
    tag::STALE,
    tag::ABSENT,
    tag::UNCHECKED,
];
use crate::{PagingOps, Program};

pub use crate::workload::{UnknownWorkload, Workload};

/// What `run` does.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// The MMU backend.
    pub mmu: BackendKind,
    /// The backends' configuration.
    pub backend: BackendConfig,
    /// The workload.
    pub workload: Workload,
    /// vCPUs (each on its own thread, on its own slice of the data area).
    pub vcpus: usize,
    /// Guest memory in bytes (a multiple of 2 MiB).
    pub mem_size: u64,
    /// The workload's knobs.
    pub params: Params,
    /// Hang protection, per round of the workload.
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
            params: Params::default(),
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
    #[error(transparent)]
    UnknownWorkload(#[from] UnknownWorkload),
    /// The options do not describe a run this VMM can make.
    #[error("invalid run options: {0}")]
    Options(String),
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
    /// Setting up the workload failed.
    #[error("cannot set up the workload")]
    Plan(#[from] PlanError),
    /// Assembling the workload failed.
    #[error("cannot assemble the workload")]
    Kit(#[from] KitError),
    /// The guest run failed.
    #[error("the guest run failed")]
    Run(#[from] RunError),
    /// A memslot change of the host failed.
    #[error("a memslot change failed")]
    Memslot(#[from] mmu_api::MemslotError),
    /// The `stress` host loop failed.
    #[error("the stress host loop failed")]
    Stress(#[from] crate::stress::StressError),
    /// Reading guest memory or the backend's state after the run failed.
    #[error("cannot inspect the guest after the run: {0}")]
    Inspect(String),
}

/// One check of the host against the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    /// What was checked (`vCPU 0 reports`).
    pub what: String,
    /// Whether it held.
    pub ok: bool,
    /// What was found, when it did not hold (or a count when it did).
    pub detail: String,
}

impl Check {
    fn new(what: String, ok: bool, detail: String) -> Check {
        Check { what, ok, detail }
    }
}

/// One vCPU's part of a run, over every round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VcpuSummary {
    /// Which vCPU.
    pub id: VcpuId,
    /// How its last round ended.
    pub outcome: VcpuOutcome,
    /// Every REPORT, in order.
    pub reports: Vec<Report>,
    /// Every fault delivered to it.
    pub faults: FaultLog,
    /// Exit counters, summed over the rounds.
    pub stats: crate::ExitStats,
    /// Time in the guest, summed over the rounds.
    pub elapsed: Duration,
}

impl VcpuSummary {
    /// The wrapping sum of the values reported with `tag` (over rounds).
    pub fn total(&self, tag: u32) -> Option<u64> {
        self.reports
            .iter()
            .filter(|r| r.tag == u64::from(tag))
            .map(|r| r.value)
            .reduce(u64::wrapping_add)
    }

    /// The checksum the guest reported (summed over rounds).
    pub fn checksum(&self) -> Option<u64> {
        self.total(tag::CHECKSUM)
    }

    fn absorb(&mut self, report: crate::VcpuReport, faults: FaultLog) {
        self.outcome = report.outcome;
        self.reports.extend(report.reports);
        self.faults.append(faults);
        let (s, r) = (&mut self.stats, report.stats);
        s.exits += r.exits;
        s.hypercalls += r.hypercalls;
        s.exceptions += r.exceptions;
        s.paging_ops += r.paging_ops;
        s.device_io += r.device_io;
        s.interrupted += r.interrupted;
        s.routed += r.routed;
        self.elapsed += report.elapsed;
    }
}

/// The dirty log of the data area after the run.
///
/// Completeness is what is checked: every page the guest wrote must be
/// logged. The log may hold more: KVM logs a page when it maps it
/// writable, and on the PVM host here a read-only `touch` run logs every
/// page it read (a read fault can map a page writable when its D bit is
/// already set).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirtySummary {
    /// Pages in the log.
    pub dirty_pages: u64,
    /// Pages the guest wrote, by the model.
    pub written_pages: u64,
    /// Pages the guest wrote that the log lacks (must be 0).
    pub missing: u64,
}

/// Everything `run` reports.
#[derive(Clone, Debug)]
pub struct RunSummary {
    /// What was run.
    pub options: RunOptions,
    /// The sizes the workload chose (pages per vCPU, edits, spaces).
    pub parameters: Vec<(&'static str, u64)>,
    /// Rounds the workload ran in (see [`workload`]).
    pub rounds: usize,
    /// Per vCPU.
    pub vcpus: Vec<VcpuSummary>,
    /// Every check, passed or not.
    pub checks: Vec<Check>,
    /// The data area's dirty log.
    pub dirty: DirtySummary,
    /// The host's own figures (device counters, memslot churn).
    pub host: Vec<(&'static str, u64)>,
    /// The backend's counters.
    pub backend: MmuStats,
    /// The exit handler's counters, summed over the vCPUs.
    pub exits: ExitStats,
    /// Wall time of the guest runs.
    pub elapsed: Duration,
    /// What the guest can observe, for [`diff`](crate::diff).
    pub observation: Observation,
}

impl RunSummary {
    /// True if every check held (each vCPU finished, and everything it
    /// reported and left behind is what the host's model says).
    pub fn ok(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }

    /// The checks that did not hold.
    pub fn failed_checks(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| !c.ok)
    }

    fn parameters_text(&self) -> String {
        self.parameters
            .iter()
            .map(|(name, value)| format!("{name}={value}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The summary as lines of text: the run, each vCPU, every check by
    /// name, and the non-zero counters by group.
    pub fn text(&self) -> String {
        self.render(false)
    }

    /// [`text`](Self::text) with every counter of the backend and the exit
    /// handler, zeros included, each group with a line saying what it
    /// counts.
    pub fn text_with_stats(&self) -> String {
        self.render(true)
    }

    fn render(&self, all_counters: bool) -> String {
        let o = &self.options;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "run: {} under the {} MMU backend, {} vCPUs, {} MiB, {} ({} {}), {}",
            o.workload,
            o.mmu,
            o.vcpus,
            o.mem_size >> 20,
            self.parameters_text(),
            self.rounds,
            if self.rounds == 1 { "round" } else { "rounds" },
            units::duration(self.elapsed)
        );
        for v in &self.vcpus {
            let _ = writeln!(
                out,
                "  vCPU {}: {}, {}, {} faults delivered, {} exits, {} in the guest",
                v.id.0,
                outcome_text(&v.outcome),
                reports_text(&v.reports),
                v.faults.count,
                v.stats.exits,
                units::duration(v.elapsed)
            );
        }
        let passed = self.checks.iter().filter(|c| c.ok).count();
        let _ = writeln!(
            out,
            "checks: {passed} passed, {} failed",
            self.checks.len() - passed
        );
        for c in &self.checks {
            if c.ok {
                let _ = writeln!(out, "  {}: ok", c.what);
            } else {
                let _ = writeln!(out, "  {}: FAILED ({})", c.what, c.detail);
            }
        }
        let d = &self.dirty;
        let _ = writeln!(
            out,
            "dirty log of the data area: {} pages logged; {} written by the guest, {} of them missing",
            d.dirty_pages, d.written_pages, d.missing
        );
        if !self.host.is_empty() {
            let _ = writeln!(out, "host: {}", counters_text(self.host.iter().copied()));
        }
        let obs = &self.observation;
        let _ = writeln!(
            out,
            "observed by the guest: data hash {:#018x}, tables hash {:#018x} ({} frames from {} roots), A/D bits of {} entries",
            obs.data_hash(),
            obs.tables_hash(),
            obs.tables.len(),
            obs.roots.len(),
            obs.ad.len()
        );
        let _ = writeln!(
            out,
            "counters of the {} backend and the exit handler{}:",
            self.backend.backend,
            if all_counters {
                ""
            } else {
                " (non-zero; --stats for all)"
            }
        );
        let mut counters: Vec<(&str, u64)> = self.backend.counters.clone();
        counters.extend(exit_counters(&self.exits));
        for group in GROUPS {
            let members: Vec<(&str, u64)> = counters
                .iter()
                .copied()
                .filter(|&(name, value)| {
                    group_of(name).name == group.name && (all_counters || value != 0)
                })
                .collect();
            if members.is_empty() {
                continue;
            }
            if all_counters {
                let _ = writeln!(out, "  {}: {}", group.name, group.legend);
                let _ = writeln!(out, "    {}", counters_text(members));
            } else {
                let _ = writeln!(out, "  {}: {}", group.name, counters_text(members));
            }
        }
        let _ = write!(out, "result: {}", if self.ok() { "ok" } else { "FAILED" });
        out
    }

    /// The summary as one JSON object.
    pub fn json(&self) -> String {
        self.json_object().finish()
    }

    pub(crate) fn json_object(&self) -> Object {
        let o = &self.options;
        let vcpus = self.vcpus.iter().map(|v| {
            let (outcome, exit_code) = match v.outcome {
                VcpuOutcome::Done { exit_code } => ("done", exit_code),
                VcpuOutcome::Stopped => ("stopped", 0),
            };
            let log = v.faults.entries.iter().take(JSON_FAULTS).map(|f| {
                Object::new()
                    .num("vector", u64::from(f.vector))
                    .num("error_code", f.error_code)
                    .num("cr2", f.cr2)
                    .finish()
            });
            Object::new()
                .num("id", u64::from(v.id.0))
                .str("outcome", outcome)
                .num("exit_code", exit_code)
                .raw("reports", reports_json(&v.reports))
                .num("faults", v.faults.count)
                .raw("fault_log", json::array(log))
                .num("exits", v.stats.exits)
                .num("hypercalls", v.stats.hypercalls)
                .num("exceptions", v.stats.exceptions)
                .num("paging_ops", v.stats.paging_ops)
                .num("routed_exits", v.stats.routed)
                .float("elapsed_s", v.elapsed.as_secs_f64())
                .finish()
        });
        let failed = self.failed_checks().map(|c| {
            Object::new()
                .str("what", &c.what)
                .str("detail", &c.detail)
                .finish()
        });
        let all = self.checks.iter().map(|c| {
            Object::new()
                .str("what", &c.what)
                .bool("ok", c.ok)
                .str("detail", &c.detail)
                .finish()
        });
        let d = &self.dirty;
        let obs = &self.observation;
        Object::new()
            .str("mmu", &o.mmu.to_string())
            .str("workload", o.workload.name())
            .num("vcpus", o.vcpus as u64)
            .num("mem_bytes", o.mem_size)
            .num("seed", o.params.seed)
            .counters("parameters", self.parameters.iter().copied())
            .num("rounds", self.rounds as u64)
            .float("elapsed_s", self.elapsed.as_secs_f64())
            .bool("ok", self.ok())
            .raw("guest", json::array(vcpus))
            .raw(
                "checks",
                Object::new()
                    .num("passed", self.checks.iter().filter(|c| c.ok).count() as u64)
                    .raw("failed", json::array(failed))
                    .raw("all", json::array(all))
                    .finish(),
            )
            .raw(
                "dirty_log",
                Object::new()
                    .num("slot", u64::from(DATA_SLOT.0))
                    .num("dirty_pages", d.dirty_pages)
                    .num("written_pages", d.written_pages)
                    .num("missing", d.missing)
                    .finish(),
            )
            .counters("host", self.host.iter().copied())
            .raw(
                "observed",
                Object::new()
                    .str("data_hash", &format!("{:#018x}", obs.data_hash()))
                    .str("tables_hash", &format!("{:#018x}", obs.tables_hash()))
                    .num("table_frames", obs.tables.len() as u64)
                    .num("roots", obs.roots.len() as u64)
                    .num("ad_entries", obs.ad.len() as u64)
                    .num(
                        "accessed",
                        obs.ad.iter().filter(|e| e.bits & 1 != 0).count() as u64,
                    )
                    .num(
                        "dirty",
                        obs.ad.iter().filter(|e| e.bits & 2 != 0).count() as u64,
                    )
                    .finish(),
            )
            .raw(
                "backend",
                Object::new()
                    .str("name", self.backend.backend)
                    .counters("counters", self.backend.counters.iter().copied())
                    .finish(),
            )
            .counters("exit_handler", exit_counters(&self.exits))
    }
}

/// Fault-log entries per vCPU the JSON output lists (the count is always
/// there).
const JSON_FAULTS: usize = 32;

/// How long the churn thread waits between two cycles, so the vCPUs make
/// progress on a small host.
const CHURN_PAUSE: Duration = Duration::from_millis(1);

/// The longest the churn thread waits, under shadow, for the vCPUs to fix
/// faults after an update before it starts the next one.
const CHURN_PROGRESS_WAIT: Duration = Duration::from_millis(200);

/// Faults per vCPU the shadow backend fixes between two churn cycles.
/// One is not enough: a vCPU whose fault is fixed must also get to re-run
/// its access before the next zap takes the mapping away again.
const CHURN_FAULTS_PER_VCPU: u64 = 32;

/// The shadow backend's count of faults it fixed.
fn faults_fixed(shadow: &mmu_backends::shadow::ShadowBackend) -> u64 {
    shadow.stats().get("faults_fixed").unwrap_or(0)
}

/// How a vCPU's run ended, in words (`exited 0`, `stopped`).
pub fn outcome_text(outcome: &VcpuOutcome) -> String {
    match outcome {
        VcpuOutcome::Done { exit_code } => format!("exited {exit_code}"),
        VcpuOutcome::Stopped => "stopped before it exited".to_string(),
    }
}

/// `name=value` pairs.
fn counters_text<'a>(counters: impl IntoIterator<Item = (&'a str, u64)>) -> String {
    counters
        .into_iter()
        .map(|(name, value)| format!("{name}={value}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The exit handler's counters under names that say what they count (the
/// backend has a `root_loads` of its own).
fn exit_counters(exits: &ExitStats) -> Vec<(&'static str, u64)> {
    exits
        .counters()
        .into_iter()
        .map(|(name, value)| match name {
            "root_loads" => ("entries_needing_root_or_flush", value),
            "unhandled" => ("exits_for_the_vmm", value),
            _ => (name, value),
        })
        .collect()
}

/// A group of counters in the text output.
#[derive(Clone, Copy, Debug)]
struct Group {
    name: &'static str,
    legend: &'static str,
}

/// The groups, in the order they are printed.
const GROUPS: [Group; 10] = [
    Group {
        name: "exits",
        legend: "exits the MMU exit handler saw, by what they needed; exits_for_the_vmm are port I/O and hypercalls it left to the VMM (not errors)",
    },
    Group {
        name: "faults",
        legend: "guest page faults the backend handled: fixed, given back to the guest, MMIO, write-protected, prefetched entries",
    },
    Group {
        name: "shadow pages",
        legend: "shadow page-table pages allocated, zapped, freed and in use",
    },
    Group {
        name: "zaps",
        legend: "shadow pages torn down: fast (generation) and naive zaps, obsolete pages waiting, zapped, reused and freed",
    },
    Group {
        name: "reclaim",
        legend: "shadow pages reclaimed at the page limit, by kind",
    },
    Group {
        name: "mmio",
        legend: "MMIO accesses recognised from cached entries, and cache misses",
    },
    Group {
        name: "roots and tlb",
        legend: "page-table roots loaded and found cached, TLB hits, misses and flushes, translations",
    },
    Group {
        name: "memslots and dirty log",
        legend: "memslot updates, pages logged dirty and harvests, host writes noted",
    },
    Group {
        name: "replay",
        legend: "guest page-table writes replayed into the host's view of the tables",
    },
    Group {
        name: "other",
        legend: "counters of no group above",
    },
];

/// The group a counter belongs to.
fn group_of(name: &str) -> Group {
    let index = if [
        "mmio_exits",
        "device_reads",
        "device_writes",
        "rom_writes",
        "memory_races",
        "page_faults",
        "faults_for_guest",
        "emulations",
        "entries_needing_root_or_flush",
        "exits_for_the_vmm",
    ]
    .contains(&name)
    {
        0
    } else if name.contains("reclaim") || name.contains("over_limit") || name.contains("quarantin")
    {
        4
    } else if name.starts_with("mmio") {
        5
    } else if name.contains("fault")
        || name.contains("write_protect")
        || name.contains("emulated")
        || name.contains("prefetch")
    {
        1
    } else if name.starts_with("sps_") {
        2
    } else if name.contains("zap") || name.contains("obsolete") || name.contains("generation") {
        3
    } else if name.contains("root")
        || name.contains("tlb")
        || name.contains("flush")
        || name == "translations"
    {
        6
    } else if name.contains("memslot") || name.contains("dirty") || name.contains("host_writes") {
        7
    } else if name.contains("replay") {
        8
    } else {
        9
    };
    GROUPS[index]
}

fn tag_name(tag: u64) -> String {
    tag::name(tag).map_or_else(|| format!("tag{tag}"), str::to_string)
}

/// Reports as `name=value` pairs (hexadecimal checksums).
pub(crate) fn reports_text(reports: &[Report]) -> String {
    if reports.is_empty() {
        return "no reports".to_string();
    }
    reports
        .iter()
        .map(|r| {
            if r.tag == u64::from(tag::CHECKSUM) {
                format!("{}={:#x}", tag_name(r.tag), r.value)
            } else {
                format!("{}={}", tag_name(r.tag), r.value)
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn reports_json(reports: &[Report]) -> String {
    json::array(reports.iter().map(|r| {
        Object::new()
            .str("tag", &tag_name(r.tag))
            .num("value", r.value)
            .finish()
    }))
}

/// The churn thread's figures.
#[derive(Clone, Debug, Default)]
struct ChurnStats {
    cycles: u64,
    during_run: u64,
    times: Vec<Duration>,
    /// Obsolete shadow pages the reclaimer freed (shadow backend only).
    reclaimed: u64,
}

/// Deletes and re-adds [`CHURN_SLOT`] until `done`, at least once.
fn churn_loop(
    memslots: &mmu_integration::Memslots,
    memory: &GuestMemoryMmap,
    reclaimer: Option<&mmu_backends::shadow::ShadowBackend>,
    vcpus: usize,
    done: &AtomicBool,
) -> Result<ChurnStats, RunCommandError> {
    let region = memory
        .iter()
        .next()
        .ok_or_else(|| RunCommandError::Inspect("the churn memory has no region".to_string()))?;
    let mut stats = ChurnStats::default();
    loop {
        let during = !done.load(Ordering::Acquire);
        let started = Instant::now();
        memslots.delete(CHURN_SLOT)?;
        memslots.add_region(CHURN_SLOT, region, MemslotFlags::empty())?;
        stats.times.push(started.elapsed());
        stats.cycles += 1;
        // The on-demand reclaimer: the delete left the old generation's
        // pages on the obsolete list; free them in lock-breaking batches,
        // off the memslot update's critical path.
        let fixed_at_update = reclaimer.map(faults_fixed);
        if let Some(shadow) = reclaimer {
            stats.reclaimed += shadow.reclaim_obsolete();
        }
        stats.during_run += u64::from(during);
        if done.load(Ordering::Acquire) {
            return Ok(stats);
        }
        std::thread::sleep(CHURN_PAUSE);
        // After a shadow fast zap every vCPU reloads its root, replays the
        // zapped frames and faults its working set back in. Where that
        // takes longer than a cycle (a loaded host, a debug build),
        // back-to-back updates would starve the vCPUs: let them fix a few
        // faults each first, for a bounded time.
        if let (Some(shadow), Some(fixed)) = (reclaimer, fixed_at_update) {
            let deadline = Instant::now() + CHURN_PROGRESS_WAIT;
            while faults_fixed(shadow) < fixed + vcpus as u64 * CHURN_FAULTS_PER_VCPU
                && Instant::now() < deadline
                && !done.load(Ordering::Acquire)
            {
                std::thread::sleep(CHURN_PAUSE);
            }
        }
    }
}

/// One round on every vCPU, with the churn thread running beside it.
fn run_churning(
    vm: &mut MmuVm,
    program: &Program,
    args: &[VcpuArgs],
    limit: Duration,
    churn_memory: &GuestMemoryMmap,
) -> Result<(RunReport, ChurnStats), RunCommandError> {
    let reclaimer = vm.shadow_backend().cloned();
    let (vm, handlers, memslots) = vm.parts();
    beside_host_thread(vm, handlers, program, args, limit, "churn", |done| {
        churn_loop(memslots, churn_memory, reclaimer.as_ref(), args.len(), done)
    })
}

/// Runs one round of `program` on vCPUs `0..args.len()` while `host`
/// runs on a thread of its own; `host` is told to stop (the flag it is
/// given) when the vCPUs are done.
fn beside_host_thread<T: Send>(
    vm: &mut crate::vm::Vm,
    handlers: &mut [crate::mmu::MmuHandler],
    program: &Program,
    args: &[VcpuArgs],
    limit: Duration,
    what: &str,
    host: impl FnOnce(&AtomicBool) -> Result<T, RunCommandError> + Send,
) -> Result<(RunReport, T), RunCommandError> {
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let thread = scope.spawn(|| host(&done));
        let report = vm.run_with(
            program,
            args,
            limit,
            handlers.iter_mut().take(args.len()).collect(),
        );
        done.store(true, Ordering::Release);
        let hosted = thread
            .join()
            .map_err(|_| RunCommandError::Inspect(format!("the {what} thread panicked")))?;
        Ok((report?, hosted?))
    })
}

/// One round on every vCPU, with the `stress` host loop beside it.
fn run_stressing(
    vm: &mut MmuVm,
    program: &Program,
    args: &[VcpuArgs],
    limit: Duration,
    stress: (&[u64], u64, u64, &Arc<StressShared>),
) -> Result<(RunReport, StressStats), RunCommandError> {
    let (controls, pages, cycles, shared) = stress;
    // Under the shadow backend: its audit, while the vCPUs run.
    let audit: Option<Audit<'_>> = vm
        .shadow_backend()
        .cloned()
        .map(|shadow| Box::new(move || shadow.audit().map_err(|e| e.to_string())) as Audit<'_>);
    let (vm, handlers, memslots) = vm.parts();
    let guest = vm.memory().clone();
    let host = StressHost::start(
        memslots,
        &guest,
        controls.to_vec(),
        pages,
        Arc::clone(shared),
        audit,
    )?;
    beside_host_thread(vm, handlers, program, args, limit, "stress", |done| {
        Ok(host.run(cycles, done)?)
    })
}

fn options_error(message: String) -> RunCommandError {
    RunCommandError::Options(message)
}

fn inspect(e: impl std::fmt::Display) -> RunCommandError {
    RunCommandError::Inspect(e.to_string())
}

/// What `run` is doing, for a progress display.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Step {
    /// Building the VM, the backend and the workload.
    Setup,
    /// Running round `round` (from 1) of `rounds` on every vCPU.
    Round {
        /// This round.
        round: usize,
        /// Rounds in all.
        rounds: usize,
    },
    /// Checking what the guest did against the host's model.
    Check,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Setup => f.write_str("building the VM and the workload"),
            Step::Round { round, rounds } => write!(f, "running round {round} of {rounds}"),
            Step::Check => f.write_str("checking the guest against the host's model"),
        }
    }
}

/// Runs `options.workload` under `options.mmu` on KVM and checks it.
pub fn run(options: RunOptions) -> Result<RunSummary, RunCommandError> {
    run_with_progress(options, &|_| {})
}

/// [`run`], telling `progress` each [`Step`] as it starts.
pub fn run_with_progress(
    options: RunOptions,
    progress: &dyn Fn(Step),
) -> Result<RunSummary, RunCommandError> {
    validate(&options)?;
    progress(Step::Setup);
    let mut setup = setup(&options)?;
    let executed = execute(&mut setup, &options, progress)?;
    progress(Step::Check);
    let checked = check(&mut setup, &executed)?;
    Ok(summarize(setup, options, executed, checked))
}

/// Refuses what cannot run before anything is created.
fn validate(options: &RunOptions) -> Result<(), RunCommandError> {
    check_hostable(options.mmu).map_err(|source| RunCommandError::NotHostable {
        mmu: options.mmu,
        source,
    })?;
    if options.vcpus == 0 || options.vcpus > MAX_VCPUS {
        return Err(options_error(format!(
            "{} vCPUs requested; 1..={MAX_VCPUS} are supported",
            options.vcpus
        )));
    }
    if options.mem_size > MAX_MEM_SIZE {
        return Err(options_error(format!(
            "{} bytes of memory requested; the workloads support up to {MAX_MEM_SIZE}",
            options.mem_size
        )));
    }
    Ok(())
}

/// The VM, its devices and the workload, ready to run.
struct Setup {
    workload: Workload,
    vm: MmuVm,
    plan: workload::Plan,
    /// mmio-rr: each vCPU's device counters.
    counters: Vec<Arc<RrCounters>>,
    stress_shared: Arc<StressShared>,
    /// churn: the memory of the memslot the host deletes and re-adds.
    churn_memory: Option<GuestMemoryMmap>,
}

/// Builds the VM under the backend, its devices, and the workload.
fn setup(options: &RunOptions) -> Result<Setup, RunCommandError> {
    let workload = options.workload;
    let counters: Vec<Arc<RrCounters>> = (0..options.vcpus)
        .map(|_| Arc::new(RrCounters::default()))
        .collect();
    let stress_shared = StressShared::new(options.vcpus);
    let config = MmuVmConfig {
        kind: options.mmu,
        backend: options.backend.clone(),
        vm: VmConfig {
            vcpus: options.vcpus,
            mem_size: options.mem_size,
            paging_ops: PagingOps::Paravirt,
            ..VmConfig::default()
        },
        log_dirty_data: true,
        coherence: mmu_integration::kvm::HostCoherence::Detect,
    };
    let vm = MmuVm::with_devices(config, |id| -> Box<dyn Devices> {
        let index = id.0 as usize;
        match (workload, counters.get(index)) {
            (Workload::MmioRr, Some(c)) => {
                Box::new(RrDevice::new(workload::mmio_page(index), Arc::clone(c)))
            }
            (Workload::Stress, _) => Box::new(StressDevice::new(index, Arc::clone(&stress_shared))),
            _ => Box::new(NoDevices),
        }
    })?;
    let plan = workload::plan(vm.vm(), workload, &options.params)?;
    let churn_memory = if workload == Workload::Churn {
        let memory = shared_guest_memory(&[(GuestAddress(CHURN_GPA), CHURN_SIZE as usize)])
            .map_err(|source| SetupError::AllocateMemory {
                size: CHURN_SIZE,
                source,
            })?;
        let region = memory
            .iter()
            .next()
            .ok_or_else(|| inspect("the churn memory has no region"))?;
        vm.memslots()
            .add_region(CHURN_SLOT, region, MemslotFlags::empty())?;
        Some(memory)
    } else {
        None
    };
    // The VMM's own writes are not guest writes: start the log now.
    vm.memslots().dirty_log(DATA_SLOT)?;
    Ok(Setup {
        workload,
        vm,
        plan,
        counters,
        stress_shared,
        churn_memory,
    })
}

/// What the rounds left: per vCPU, and the host threads' figures.
struct Executed {
    vcpus: Vec<VcpuSummary>,
    churn: Option<ChurnStats>,
    stress: Option<StressStats>,
    elapsed: Duration,
}

/// Runs every round of the workload (beside the churn or stress host
/// thread where it has one).
fn execute(
    setup: &mut Setup,
    options: &RunOptions,
    progress: &dyn Fn(Step),
) -> Result<Executed, RunCommandError> {
    let mut executed = Executed {
        vcpus: (0..options.vcpus)
            .map(|i| VcpuSummary {
                id: VcpuId(i as u32),
                outcome: VcpuOutcome::Stopped,
                reports: Vec::new(),
                faults: FaultLog::default(),
                stats: crate::ExitStats::default(),
                elapsed: Duration::ZERO,
            })
            .collect(),
        churn: None,
        stress: None,
        elapsed: Duration::ZERO,
    };
    let Setup {
        vm,
        plan,
        churn_memory,
        stress_shared,
        ..
    } = setup;
    let rounds = plan.rounds.len();
    for (round, args) in plan.rounds.iter().enumerate() {
        progress(Step::Round {
            round: round + 1,
            rounds,
        });
        let report = match (&*churn_memory, &plan.stress) {
            (Some(memory), _) => {
                let (report, stats) =
                    run_churning(vm, &plan.program, args, options.time_limit, memory)?;
                executed.churn = Some(stats);
                report
            }
            (None, Some((controls, pages))) => {
                let cycles = options.params.passes.unwrap_or(STRESS_CYCLES);
                let (report, stats) = run_stressing(
                    vm,
                    &plan.program,
                    args,
                    options.time_limit,
                    (controls, *pages, cycles, stress_shared),
                )?;
                executed.stress = Some(stats);
                report
            }
            (None, None) => vm.run(&plan.program, args, options.time_limit)?,
        };
        executed.elapsed += report.elapsed;
        for (i, (summary, report)) in executed.vcpus.iter_mut().zip(report.vcpus).enumerate() {
            let faults = vm.vm().fault_log(i).map_err(inspect)?;
            summary.absorb(report, faults);
        }
    }
    Ok(executed)
}

/// Every check, the dirty log's figures and the host's own figures.
struct Checked {
    checks: Vec<Check>,
    dirty: DirtySummary,
    host: Vec<(&'static str, u64)>,
}

/// Checks what the guest did, and the backend, against the host's model.
fn check(setup: &mut Setup, executed: &Executed) -> Result<Checked, RunCommandError> {
    let log = setup.vm.memslots().dirty_log(DATA_SLOT)?;
    let mut checked = Checked {
        checks: Vec::new(),
        dirty: DirtySummary {
            dirty_pages: log.count(),
            ..DirtySummary::default()
        },
        host: Vec::new(),
    };
    for (i, summary) in executed.vcpus.iter().enumerate() {
        check_vcpu(setup, i, summary, &log, &mut checked)?;
    }
    if setup.workload == Workload::MmioRr {
        check_devices(setup, &mut checked);
    }
    if let Some(stats) = &executed.churn {
        check_churn(stats, &mut checked);
    }
    if let Some(shadow) = setup.vm.shadow_backend() {
        check_shadow(shadow, &mut checked.checks);
    }
    if let Some(stats) = &executed.stress {
        check_stress(setup, &executed.vcpus, stats, &mut checked)?;
    }
    Ok(checked)
}

/// One vCPU: finished, reports, fault log, memory, dirty log and
/// translations.
fn check_vcpu(
    setup: &mut Setup,
    i: usize,
    summary: &VcpuSummary,
    log: &mmu_api::DirtyBitmap,
    checked: &mut Checked,
) -> Result<(), RunCommandError> {
    let expect = &setup.plan.expect[i];
    let vm = &mut setup.vm;
    let checks = &mut checked.checks;
    let name = |what: &str| format!("vCPU {i} {what}");
    checks.push(Check::new(
        name("finished"),
        summary.outcome == VcpuOutcome::Done { exit_code: 0 },
        outcome_text(&summary.outcome),
    ));
    checks.push(reports_check(
        name("reports"),
        setup.workload,
        &summary.reports,
        &expect.reports,
    ));
    checks.push(fault_check(
        name("fault log"),
        &summary.faults,
        &expect.faults,
    ));
    let mut wrong = Vec::new();
    for word in &expect.memory {
        let got = vm.vm().read_u64(word.gpa).map_err(inspect)?;
        if got & word.mask != word.value & word.mask {
            wrong.push((word.gpa, word.value, got));
        }
    }
    checks.push(Check::new(
        name("memory"),
        wrong.is_empty(),
        match wrong.first() {
            Some((gpa, want, got)) => format!(
                "{} of {} words differ; first at {gpa:#x}: expected {want:#x}, got {got:#x}",
                wrong.len(),
                expect.memory.len()
            ),
            None => format!("{} words as expected", expect.memory.len()),
        },
    ));
    let data_base = vm.vm().layout().data().start;
    let missing = expect
        .written
        .iter()
        .filter(|page| {
            !page
                .checked_sub(data_base)
                .is_some_and(|offset| log.is_dirty(offset / PAGE_SIZE))
        })
        .count() as u64;
    checked.dirty.written_pages += expect.written.len() as u64;
    checked.dirty.missing += missing;
    checks.push(Check::new(
        name("dirty log"),
        missing == 0,
        format!(
            "{missing} of {} written pages missing",
            expect.written.len()
        ),
    ));
    if !expect.translations.is_empty() {
        let handler = vm
            .handler(i)
            .ok_or_else(|| inspect(format!("no handler for vCPU {i}")))?;
        checks.push(translation_check(
            name("translations"),
            handler,
            &expect.translations,
        ));
    }
    Ok(())
}

/// The REPORTs: exactly the model's for a deterministic workload, each
/// stress tag once, in order, for `stress`.
fn reports_check(what: String, workload: Workload, got: &[Report], want: &[Report]) -> Check {
    if workload.deterministic() {
        return Check::new(
            what,
            got == want,
            format!("expected {}, got {}", reports_text(want), reports_text(got)),
        );
    }
    // Counts that depend on timing: each tag once, in order.
    let tags: Vec<u64> = got.iter().map(|r| r.tag).collect();
    let want: Vec<u64> = STRESS_TAGS.iter().map(|&t| u64::from(t)).collect();
    Check::new(
        what,
        tags == want,
        format!(
            "expected the tags {}, got {}",
            STRESS_TAGS.map(|t| tag_name(u64::from(t))).join(" "),
            reports_text(got)
        ),
    )
}

/// The backend's guest-virtual translations of the workload's window.
fn translation_check(
    what: String,
    handler: &mut crate::mmu::MmuHandler,
    translations: &[(u64, u64)],
) -> Check {
    let mut bad = Vec::new();
    for &(gva, gpa) in translations {
        let segments = handler.exits().mmu().translate(
            Gva(gva),
            8,
            Access::user(AccessKind::Read),
            WalkOptions::without_accessed_dirty(),
        );
        let got = segments.ok().and_then(|s| s.first().map(|s| s.gpa.raw()));
        if got != Some(gpa) {
            bad.push((gva, gpa, got));
        }
    }
    Check::new(
        what,
        bad.is_empty(),
        match bad.first() {
            Some((gva, want, got)) => format!(
                "{} of {} differ; first {gva:#x}: expected {want:#x}, got {}",
                bad.len(),
                translations.len(),
                got.map_or_else(|| "no translation".to_string(), |g| format!("{g:#x}"))
            ),
            None => format!("{} pages", translations.len()),
        },
    )
}

/// mmio-rr: what each vCPU's device counted against what the guest
/// reported.
fn check_devices(setup: &Setup, checked: &mut Checked) {
    let (mut doorbells, mut reads, mut idle) = (0, 0, 0);
    for (i, (c, expect)) in setup.counters.iter().zip(&setup.plan.expect).enumerate() {
        let (d, r, n) = c.snapshot();
        let find = |t: u32| {
            expect
                .reports
                .iter()
                .find(|r| r.tag == u64::from(t))
                .map_or(0, |r| r.value)
        };
        let want = (find(tag::TRANSACTIONS), find(tag::POLLS), 0);
        checked.checks.push(Check::new(
            format!("vCPU {i} device"),
            (d, r, n) == want,
            format!(
                "expected {} doorbells, {} status reads and {} idle reads; the device counted {d}, {r} and {n}",
                want.0, want.1, want.2
            ),
        ));
        doorbells += d;
        reads += r;
        idle += n;
    }
    checked.host.extend([
        ("doorbells", doorbells),
        ("status_reads", reads),
        ("idle_reads", idle),
    ]);
}

/// churn: the memslot changed while the guest ran.
fn check_churn(stats: &ChurnStats, checked: &mut Checked) {
    let mut times = stats.times.clone();
    times.sort_unstable();
    let micros = |d: Option<&Duration>| d.map_or(0, |d| d.as_micros() as u64);
    checked.host.extend([
        ("churn_cycles", stats.cycles),
        ("churn_cycles_during_run", stats.during_run),
        ("churn_median_us", micros(times.get(times.len() / 2))),
        ("churn_max_us", micros(times.last())),
        ("churn_obsolete_reclaimed", stats.reclaimed),
    ]);
    checked.checks.push(Check::new(
        "memslot churned while the guest ran".to_string(),
        stats.during_run > 0,
        format!(
            "{} of {} cycles during the run",
            stats.during_run, stats.cycles
        ),
    ));
}

/// The shadow backend's own audit and reclaim order.
fn check_shadow(shadow: &mmu_backends::shadow::ShadowBackend, checks: &mut Vec<Check>) {
    let audit = shadow.audit();
    checks.push(Check::new(
        "shadow MMU audit".to_string(),
        audit.is_ok(),
        match audit {
            Ok(()) => "every shadow page, rmap and counter consistent".to_string(),
            Err(e) => e.to_string(),
        },
    ));
    let early = shadow
        .stats()
        .get("valid_reclaimed_with_obsolete_pending")
        .unwrap_or(0);
    checks.push(Check::new(
        "no valid page reclaimed while obsolete pages wait".to_string(),
        early == 0,
        format!("{early} valid pages reclaimed with obsolete pages pending"),
    ));
}

/// stress: no stale read, no lost dirty page, and the memslot changes
/// happened while the guest ran.
fn check_stress(
    setup: &Setup,
    vcpus: &[VcpuSummary],
    stats: &StressStats,
    checked: &mut Checked,
) -> Result<(), RunCommandError> {
    let Some((controls, _)) = &setup.plan.stress else {
        return Ok(());
    };
    for (i, (v, &control)) in vcpus.iter().zip(controls).enumerate() {
        let stale = v.total(tag::STALE).unwrap_or(0);
        let detail = if stale == 0 {
            "0 stale reads".to_string()
        } else {
            let word = |k: u64| setup.vm.vm().read_u64(control + 8 * k).map_err(inspect);
            let (ctl, value, page) = (word(1)?, word(2)?, word(3)?);
            format!(
                "{stale} stale or wrong reads; the last: {value:#x} from page {} of window {} under control word {ctl:#x}",
                page & !workloads::stress::PROBE_BIT,
                if page & workloads::stress::PROBE_BIT != 0 {
                    "not holding the slot (probe)"
                } else {
                    "holding the slot"
                }
            )
        };
        checked.checks.push(Check::new(
            format!("vCPU {i} stale reads"),
            stale == 0,
            detail,
        ));
    }
    let verified = stats.verified_exact + stats.verified_late;
    checked.checks.extend([
        Check::new(
            "stress: no lost dirty page".to_string(),
            stats.lost == 0,
            match &stats.first_lost {
                Some(first) => format!(
                    "{} of {verified} checked writes missing ({} of them in the next harvest); first: {first}",
                    stats.lost, stats.lost_logged_next
                ),
                None => format!("{verified} checked writes logged"),
            },
        ),
        Check::new(
            "stress: memslot changes while the guest ran".to_string(),
            stats.deletes > 0 && stats.moves > 0 && stats.harvests > 0,
            format!(
                "{} harvests, {} moves, {} deletes",
                stats.harvests, stats.moves, stats.deletes
            ),
        ),
        Check::new(
            "stress: each deleted backing unmapped at once".to_string(),
            stats.unmapped == stats.deletes,
            format!("{} of {} deletes", stats.unmapped, stats.deletes),
        ),
    ]);
    checked.host.extend(stress_figures(vcpus, stats));
    Ok(())
}

/// The stress host loop's figures and the guest's totals.
fn stress_figures(vcpus: &[VcpuSummary], stats: &StressStats) -> [(&'static str, u64); 22] {
    let total = |t: u32| vcpus.iter().filter_map(|v| v.total(t)).sum::<u64>();
    [
        ("stress_cycles", stats.cycles),
        ("harvests", stats.harvests),
        ("moves", stats.moves),
        ("deletes", stats.deletes),
        ("adds", stats.adds),
        ("backings_unmapped", stats.unmapped),
        ("deletes_seen_by_every_vcpu", stats.absent_seen),
        ("writes", total(tag::WRITES)),
        (
            "dirty_pages_verified",
            stats.verified_exact + stats.verified_late,
        ),
        ("verified_in_own_interval", stats.verified_exact),
        ("verified_late", stats.verified_late),
        ("lost", stats.lost),
        ("lost_but_in_next_harvest", stats.lost_logged_next),
        ("reads_checked", total(tag::READS_CHECKED)),
        ("absent_reads_checked", total(tag::ABSENT)),
        ("stale", total(tag::STALE)),
        ("reads_unchecked", total(tag::UNCHECKED)),
        ("mmio_absent_reads", stats.absent_reads),
        ("mmio_absent_writes", stats.absent_writes),
        ("mmio_raced_reads", stats.raced_reads),
        ("max_memslot_change_us", stats.max_change_us),
        ("backend_audits", stats.audits),
    ]
}

/// Puts the summary together: what the guest can observe, the backend's
/// and the exit handler's counters.
fn summarize(
    setup: Setup,
    options: RunOptions,
    executed: Executed,
    checked: Checked,
) -> RunSummary {
    let Setup { vm, plan, .. } = setup;
    let observation = observe(
        vm.vm(),
        &plan.roots,
        executed
            .vcpus
            .iter()
            .map(|v| VcpuObservation {
                outcome: v.outcome,
                reports: v.reports.clone(),
                faults: v.faults.clone(),
            })
            .collect(),
    );
    let mut exits = ExitStats::default();
    for stats in vm.exit_stats() {
        exits.add(&stats);
    }
    RunSummary {
        options,
        parameters: plan.parameters,
        rounds: plan.rounds.len(),
        vcpus: executed.vcpus,
        checks: checked.checks,
        dirty: checked.dirty,
        host: checked.host,
        backend: vm.backend().stats(),
        exits,
        elapsed: executed.elapsed,
        observation,
    }
}

/// A workload built in a VM for other drivers of the guest (the benches):
/// the program, its rounds and what each vCPU must report.
#[derive(Clone, Debug)]
pub struct GuestPlan {
    /// The guest program.
    pub program: Program,
    /// Per round, each vCPU's arguments.
    pub rounds: Vec<Vec<VcpuArgs>>,
    /// Per vCPU, the REPORTs the host's model predicts.
    pub reports: Vec<Vec<Report>>,
}

/// Builds `workload` in `vm` (whose guest has not run yet), as `run` does,
/// for a caller that runs the guest itself.
pub fn guest_plan(
    vm: &crate::Vm,
    workload: Workload,
    params: &Params,
) -> Result<GuestPlan, PlanError> {
    let plan = workload::plan(vm, workload, params)?;
    Ok(GuestPlan {
        program: plan.program,
        rounds: plan.rounds,
        reports: plan.expect.into_iter().map(|e| e.reports).collect(),
    })
}

/// Compares a fault log with the faults the model predicts.
fn fault_check(what: String, got: &FaultLog, expected: &[crate::kit::FaultRecord]) -> Check {
    let count_ok = got.count == expected.len() as u64;
    let first_wrong = got.entries.iter().zip(expected).position(|(g, e)| g != e);
    let detail = match first_wrong {
        Some(i) => format!(
            "fault {i}: expected {}, got {}",
            expected[i], got.entries[i]
        ),
        None if !count_ok => format!(
            "expected {} faults, {} were delivered",
            expected.len(),
            got.count
        ),
        None => format!("{} faults as expected", got.count),
    };
    Check::new(what, count_ok && first_wrong.is_none(), detail)
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
pub(crate) mod tests {
    use super::*;
    use crate::kit::FaultRecord;

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
    fn bad_sizes_are_refused_before_anything_is_created() {
        for options in [
            RunOptions {
                vcpus: 0,
                ..RunOptions::default()
            },
            RunOptions {
                vcpus: MAX_VCPUS + 1,
                ..RunOptions::default()
            },
            RunOptions {
                mem_size: MAX_MEM_SIZE + (2 << 20),
                ..RunOptions::default()
            },
        ] {
            let err = run(options).unwrap_err();
            assert!(matches!(err, RunCommandError::Options(_)), "{err:?}");
        }
    }

    fn pf(error_code: u64, address: u64) -> FaultRecord {
        FaultRecord {
            vector: 14,
            error_code,
            cr2: address,
        }
    }

    #[test]
    fn fault_checks_name_the_first_difference() {
        let log = FaultLog {
            count: 2,
            entries: vec![pf(4, 0x1000), pf(7, 0x2000)],
        };
        assert!(fault_check("f".into(), &log, &[pf(4, 0x1000), pf(7, 0x2000)]).ok);
        let c = fault_check("f".into(), &log, &[pf(4, 0x1000), pf(6, 0x2000)]);
        assert!(!c.ok);
        assert_eq!(
            c.detail,
            "fault 1: expected #PF error code 0x6 cr2 0x2000, got #PF error code 0x7 cr2 0x2000"
        );
        let c = fault_check("f".into(), &log, &[pf(4, 0x1000)]);
        assert_eq!(c.detail, "expected 1 faults, 2 were delivered");
    }

    pub(crate) fn summary() -> RunSummary {
        let vcpu = VcpuSummary {
            id: VcpuId(0),
            outcome: VcpuOutcome::Done { exit_code: 0 },
            reports: vec![
                Report {
                    tag: u64::from(tag::CHECKSUM),
                    value: 40,
                },
                Report {
                    tag: u64::from(tag::CHECKSUM),
                    value: 2,
                },
                Report {
                    tag: u64::from(tag::FAULTS),
                    value: 1,
                },
            ],
            faults: FaultLog {
                count: 1,
                entries: vec![pf(7, 0x8000_0000_1000)],
            },
            stats: crate::ExitStats::default(),
            elapsed: Duration::from_millis(3),
        };
        RunSummary {
            options: RunOptions::default(),
            parameters: vec![("pages", 3), ("passes", 1)],
            rounds: 2,
            vcpus: vec![vcpu],
            checks: vec![Check::new("vCPU 0 reports".into(), true, String::new())],
            dirty: DirtySummary {
                dirty_pages: 3,
                written_pages: 3,
                missing: 0,
            },
            host: vec![("churn_cycles", 4)],
            backend: MmuStats::new("ept", vec![("translations", 3), ("tlb_hits", 0)]),
            exits: ExitStats::default(),
            elapsed: Duration::from_millis(5),
            observation: Observation {
                data_base: 0x20_0000,
                data_pages: vec![1, 2],
                tables: [(0x1000, 5)].into_iter().collect(),
                ad: Vec::new(),
                roots: vec![0x1000],
                vcpus: Vec::new(),
            },
        }
    }

    #[test]
    fn summaries_render_as_one_json_object() {
        let summary = summary();
        assert!(summary.ok());
        assert_eq!(summary.vcpus[0].checksum(), Some(42));
        assert_eq!(summary.vcpus[0].total(tag::POLLS), None);
        let json = summary.json();
        assert!(
            json.starts_with("{\"mmu\": \"ept\", \"workload\": \"touch\", \"vcpus\": 2"),
            "{json}"
        );
        assert!(json.contains("\"ok\": true"), "{json}");
        assert!(
            json.contains("\"reports\": [{\"tag\": \"checksum\", \"value\": 40}, {\"tag\": \"checksum\", \"value\": 2}, {\"tag\": \"faults\", \"value\": 1}]"),
            "{json}"
        );
        assert!(
            json.contains(
                "\"fault_log\": [{\"vector\": 14, \"error_code\": 7, \"cr2\": 140737488359424}]"
            ),
            "{json}"
        );
        assert!(
            json.contains("\"counters\": {\"translations\": 3, \"tlb_hits\": 0}"),
            "{json}"
        );
        assert!(json.contains("\"parameters\": {\"pages\": 3, \"passes\": 1}"));
        assert!(json.contains("\"host\": {\"churn_cycles\": 4}"), "{json}");
        assert!(
            json.contains("\"exit_handler\": {\"mmio_exits\": 0"),
            "{json}"
        );
        assert!(json.contains(
            "\"checks\": {\"passed\": 1, \"failed\": [], \"all\": [{\"what\": \"vCPU 0 reports\", \"ok\": true"
        ));
        assert_eq!(json.matches('{').count(), json.matches('}').count());
        assert!(!json.contains('\n'));

        let mut bad = summary.clone();
        bad.checks.push(Check::new(
            "vCPU 0 memory".into(),
            false,
            "1 of 3 words differ".into(),
        ));
        assert!(!bad.ok());
        let text = bad.text();
        assert!(text.ends_with("result: FAILED"), "{text}");
        assert!(
            text.contains("  vCPU 0 memory: FAILED (1 of 3 words differ)"),
            "{text}"
        );
        assert!(text.contains("  vCPU 0 reports: ok"), "{text}");
        assert!(text.contains("vCPU 0: exited 0, "), "{text}");
        assert!(!text.contains("Done {"), "{text}");
        assert!(text.contains("  roots and tlb: translations=3\n"), "{text}");
        let all = bad.text_with_stats();
        assert!(all.contains("tlb_hits=0"), "{all}");
        assert!(all.contains("exits_for_the_vmm=0"), "{all}");
        assert!(
            text.contains("checksum=0x28 checksum=0x2 faults=1"),
            "{text}"
        );
        assert!(bad.json().contains(
            "\"failed\": [{\"what\": \"vCPU 0 memory\", \"detail\": \"1 of 3 words differ\"}]"
        ));
    }
}
