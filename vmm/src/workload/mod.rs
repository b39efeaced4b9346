//! The workloads of `mmu-vmm run` and `diff`: what the host sets up for
//! each (address spaces, data, devices, a memslot to churn) and its model
//! of what the guest must report.
//!
//! Every vCPU works on its own slice of the data area
//! ([`Layout::data_slice`](crate::layout::Layout::data_slice)): the first
//! frames of the slice hold the page tables of its address spaces (built
//! by [`SpaceBuilder`] before the run), the rest its data. Its window,
//! where the workload's pages are mapped, starts at [`window`]`(i)`, PML4
//! slot i + 1. So the vCPUs share nothing and the result does not depend
//! on how their threads interleave: the same inputs give the same guest
//! memory, fault logs, A/D bits and reports under any backend.
//!
//! | workload | what each vCPU does (hot loop at CPL3) | host model |
//! | --- | --- | --- |
//! | `touch` | reads or writes each 4 KiB page of its window, `passes` times | checksum, memory, dirty log, translations |
//! | `pt-edit` | `ops` edits of its own PTEs from CPL0 (STORE + INVLPG): map, unmap, remap, read-only, supervisor-only; an access after each | the reference walker over the edited tables: checksum, faults with error codes, memory, final PTEs |
//! | `multi-as` | `ops` address spaces mapping one window to different frames (one shared); `passes` rounds of LOAD_CR3 to each and a rewrite of its pages | checksum, memory |
//! | `access` | the U/W/NX matrix at PDE and PTE level, read/write/fetch from CPL3 and (LOAD/STORE/CALL) CPL0 | the reference walker: each access's fault and error code, values read, memory |
//! | `mmio-rr` | `ops` request/response transactions on an MMIO device: doorbell write, status polls | checksum of responses, polls, the device's counters |
//! | `dirty` | `ops` LCG-random 8-byte writes over its window | checksum, last value of every written word, dirty log |
//! | `churn` | `touch` (write) for `passes` passes while a host thread deletes and re-adds a memslot | as `touch`, and at least one churn cycle during the run |
//! | `stress` | tagged writes and checked reads in a memslot of its own until the host stops it, while a host thread harvests the slot's dirty log and deletes, re-adds and moves it (`passes` cycles) | every write the memory shows against the harvest of its interval (no lost dirty page), no stale read, the backing unmapped at each delete ([`crate::stress`]) |
//!
//! `churn` churns a memslot of its own ([`CHURN_SLOT`], outside guest RAM
//! and unmapped by the guest): deleting a memslot zaps every shadow page
//! (KVM's fast zap, or the shadow backend's generation bump), so every
//! vCPU refaults its working set after each cycle, while no guest access
//! can ever hit a missing slot. Churning the data slot itself would turn
//! some guest accesses into MMIO exits depending on timing: the guest's
//! view would no longer be deterministic, and nothing could compare it
//! between backends.
//!
//! Faults are delivered to the program
//! ([`DELIVER`](crate::kit::abi::action::DELIVER)); a run is split into
//! rounds (each a `Vm` run) small enough that no vCPU's fault log
//! overflows ([`FAULT_CAPACITY`](crate::kit::abi::FAULT_CAPACITY)), and the host reads the
//! log after each round.
//!
//! Every workload is planned the same way, in a module of its own whose
//! documentation says what it does and checks: the module says what each
//! vCPU needs (`Shape`: the program, the frames of its slice that go to
//! page tables and to data), and the shared prologue (`build`) carves
//! each vCPU's slice, starts a [`SpaceBuilder`] on the slice's table pool,
//! hands the module the vCPU's setup (slice, builder, window, seed) and
//! collects what the module returns (the model's expectations, the roots,
//! the arguments of each round) into the plan `run` executes.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use mmu_api::SlotId;
use mmu_api::paging::WalkError;
use vm_memory::{Bytes, GuestAddress};

use crate::error::KitError;
use crate::kit::workloads::TouchKind;
use crate::kit::{FaultRecord, Program};
use crate::layout::{MIB2, PAGE_SIZE, pte};
use crate::rng::Rng;
use crate::space::{SpaceBuilder, SpaceError};
use crate::vcpu::Report;
use crate::vm::{VcpuArgs, Vm};

mod access;
mod dirty;
mod mmio_rr;
mod model;
mod multi_as;
mod pt_edit;
mod stress;
mod touch;

pub use mmio_rr::{RrCounters, RrDevice, rr_model};

/// A workload of `run` and `diff`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Workload {
    /// Read or write every page of the window.
    Touch,
    /// Page-table edits by the guest's CPL0 code, each with INVLPG and an access.
    PtEdit,
    /// Many address spaces, switched with CR3 loads.
    MultiAs,
    /// The permission matrix.
    Access,
    /// Request/response on an MMIO device.
    MmioRr,
    /// Random writes, checked against the dirty log.
    Dirty,
    /// `touch` while the host deletes and re-adds a memslot.
    Churn,
    /// Writes and checked reads in a memslot the host deletes, re-adds,
    /// moves and harvests meanwhile.
    Stress,
}

impl Workload {
    /// Every workload, in the order `--help` lists them.
    pub const ALL: [Workload; 8] = [
        Workload::Touch,
        Workload::PtEdit,
        Workload::MultiAs,
        Workload::Access,
        Workload::MmioRr,
        Workload::Dirty,
        Workload::Churn,
        Workload::Stress,
    ];

    /// Its name on the command line.
    pub const fn name(self) -> &'static str {
        match self {
            Workload::Touch => "touch",
            Workload::PtEdit => "pt-edit",
            Workload::MultiAs => "multi-as",
            Workload::Access => "access",
            Workload::MmioRr => "mmio-rr",
            Workload::Dirty => "dirty",
            Workload::Churn => "churn",
            Workload::Stress => "stress",
        }
    }

    /// True if the same inputs give the same guest-visible results under
    /// any backend and any thread timing (what `diff` compares). `stress`
    /// is not: how far each vCPU gets between two memslot changes is
    /// timing.
    pub const fn deterministic(self) -> bool {
        !matches!(self, Workload::Stress)
    }

    /// The names of every workload, for messages.
    pub fn names() -> String {
        Workload::ALL.map(Workload::name).join(", ")
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A workload name nobody knows.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown workload {name:?}: this build has {known}", known = Workload::names())]
pub struct UnknownWorkload {
    /// The name given.
    pub name: String,
}

impl FromStr for Workload {
    type Err = UnknownWorkload;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Workload::ALL
            .into_iter()
            .find(|w| w.name() == s)
            .ok_or_else(|| UnknownWorkload {
                name: s.to_string(),
            })
    }
}

/// A workload's knobs (the same for every vCPU; each vCPU's seed is
/// derived from `seed`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Params {
    /// Read or write (`touch`; `churn` always writes).
    pub touch: TouchKind,
    /// Passes (`touch` 1, `multi-as` 4, `churn` 10 by default); `stress`:
    /// host cycles (each: harvests, a move there and back, a delete and a
    /// re-add; 50 by default).
    pub passes: Option<u64>,
    /// Operations per vCPU: edits (`pt-edit`, 480), address spaces
    /// (`multi-as`, 16), transactions (`mmio-rr`, 1000), writes (`dirty`,
    /// 65536); `stress`: pages per vCPU (16).
    pub ops: Option<u64>,
    /// Seed of the generated inputs.
    pub seed: u64,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            touch: TouchKind::Write,
            passes: None,
            ops: None,
            seed: 0x5eed_0000_0000,
        }
    }
}

/// Where vCPU `index`'s window starts: PML4 slot `index + 1`, which the
/// identity tables leave empty (guest memory ends below 512 GiB).
pub const fn window(index: usize) -> u64 {
    (index as u64 + 1) << 39
}

/// The guest-physical page of vCPU `index`'s `mmio-rr` device; no memslot
/// covers it.
pub const fn mmio_page(index: usize) -> u64 {
    MMIO_BASE + index as u64 * PAGE_SIZE
}

/// The first `mmio-rr` device page.
pub const MMIO_BASE: u64 = 1 << 40;

/// The memslot `churn` deletes and re-adds.
pub const CHURN_SLOT: SlotId = SlotId(2);

/// Where [`CHURN_SLOT`] lives: above guest RAM, which must end below.
pub const CHURN_GPA: u64 = 1 << 39;

/// The size of [`CHURN_SLOT`].
pub const CHURN_SIZE: u64 = MIB2;

/// The memslot `stress` deletes, re-adds, moves and harvests (never at
/// the same time as `churn`'s).
pub const STRESS_SLOT: SlotId = CHURN_SLOT;

/// Where `stress` adds its memslot (location A).
pub const STRESS_GPA_A: u64 = CHURN_GPA;

/// Where `stress` moves its memslot (location B).
pub const STRESS_GPA_B: u64 = CHURN_GPA + 2 * STRESS_SIZE;

/// Host cycles of `stress` unless [`Params::passes`] says otherwise.
pub const STRESS_CYCLES: u64 = 50;

/// The size of [`STRESS_SLOT`].
pub const STRESS_SIZE: u64 = MIB2;

/// The largest guest memory the workloads support (their windows start
/// in PML4 slot 1).
pub const MAX_MEM_SIZE: u64 = CHURN_GPA;

/// Why a workload could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// A vCPU's slice of the data area is too small.
    #[error(
        "{workload} needs {needed} pages per vCPU but each vCPU's slice has {available}: raise --mem or lower --ops"
    )]
    TooSmall {
        /// The workload.
        workload: Workload,
        /// Pages it needs.
        needed: u64,
        /// Pages a slice has.
        available: u64,
    },
    /// An option is out of range.
    #[error("invalid {what} for {workload}: {detail}")]
    Option {
        /// The workload.
        workload: Workload,
        /// Which option.
        what: &'static str,
        /// Why.
        detail: String,
    },
    /// Building the workload's tables failed.
    #[error("cannot build the workload's page tables")]
    Space(#[from] SpaceError),
    /// Writing its data failed.
    #[error("cannot write the workload's data")]
    Memory(#[from] vm_memory::GuestMemoryError),
    /// Assembling its program failed.
    #[error("cannot assemble the workload")]
    Kit(#[from] KitError),
    /// The host model could not walk the workload's tables.
    #[error("the host model's walk failed")]
    Walk(#[from] WalkError),
}

/// A guest-memory word the run must leave as the model says: `value` in
/// the bits of `mask`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Word {
    pub(crate) gpa: u64,
    pub(crate) value: u64,
    pub(crate) mask: u64,
}

impl Word {
    fn exact(gpa: u64, value: u64) -> Word {
        Word {
            gpa,
            value,
            mask: u64::MAX,
        }
    }
}

/// What one vCPU must report and leave behind.
#[derive(Clone, Debug, Default)]
pub(crate) struct Expect {
    /// Every REPORT, in order, over all rounds.
    pub(crate) reports: Vec<Report>,
    /// Every fault delivered, in order.
    pub(crate) faults: Vec<FaultRecord>,
    /// Memory words after the run.
    pub(crate) memory: Vec<Word>,
    /// Guest-physical pages the guest writes (the dirty log must have them).
    pub(crate) written: BTreeSet<u64>,
    /// (guest-virtual, guest-physical) page pairs the backend must
    /// translate in the vCPU's final paging context.
    pub(crate) translations: Vec<(u64, u64)>,
}

/// Everything a run of a workload needs, built in the VM's memory.
#[derive(Debug)]
pub(crate) struct Plan {
    pub(crate) program: Program,
    /// Per round, per vCPU.
    pub(crate) rounds: Vec<Vec<VcpuArgs>>,
    /// Per vCPU.
    pub(crate) expect: Vec<Expect>,
    /// Every CR3 the guest uses (the identity root first).
    pub(crate) roots: Vec<u64>,
    /// The sizes chosen, for the summary.
    pub(crate) parameters: Vec<(&'static str, u64)>,
    /// `stress`: each vCPU's control page (guest-physical), and the pages
    /// each vCPU uses in the stress memslot.
    pub(crate) stress: Option<(Vec<u64>, u64)>,
}

/// The value of a data word the host writes before a run.
pub fn preset(gpa: u64) -> u64 {
    gpa.rotate_left(17) ^ 0x0da7_a000_0000_0000
}

/// The seed of vCPU `index`: a SplitMix64 step from the run's seed, so
/// every bit differs between vCPUs.
fn vcpu_seed(seed: u64, index: usize) -> u64 {
    Rng(seed ^ (index as u64).wrapping_mul(0xd1b5_4a32_d192_ed03)).next()
}

/// Writes `value(gpa)` into every word of the frame at `frame`.
fn fill_frame(vm: &Vm, frame: u64, value: impl Fn(u64) -> u64) -> Result<(), PlanError> {
    let bytes: Vec<u8> = (0..PAGE_SIZE / 8)
        .flat_map(|i| value(frame + 8 * i).to_le_bytes())
        .collect();
    vm.memory().write_slice(&bytes, GuestAddress(frame))?;
    Ok(())
}

/// Writes `words` from `gpa` on.
fn write_words(vm: &Vm, gpa: u64, words: &[u64]) -> Result<(), PlanError> {
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    vm.memory().write_slice(&bytes, GuestAddress(gpa))?;
    Ok(())
}

/// User read/write data, A/D clear.
const DATA_FLAGS: u64 = pte::P | pte::W | pte::U | pte::NX;

/// One vCPU's slice: its table pool, then its data frames.
struct Slice {
    tables: std::ops::Range<u64>,
    data: std::ops::Range<u64>,
}

impl Slice {
    /// vCPU `index`'s slice with `table_frames` frames for tables; fails
    /// if fewer than `data_pages` data pages remain.
    fn new(
        vm: &Vm,
        workload: Workload,
        index: usize,
        table_frames: u64,
        data_pages: u64,
    ) -> Result<Slice, PlanError> {
        let slice = vm.layout().data_slice(index, vm.vcpu_count());
        let available = (slice.end - slice.start) / PAGE_SIZE;
        let needed = table_frames + data_pages;
        if needed > available || data_pages == 0 {
            return Err(PlanError::TooSmall {
                workload,
                needed: needed.max(table_frames + 1),
                available,
            });
        }
        let split = slice.start + table_frames * PAGE_SIZE;
        Ok(Slice {
            tables: slice.start..split,
            data: split..slice.end,
        })
    }

    /// Pages a slice has when `table_frames` go to tables.
    fn pages_after(vm: &Vm, table_frames: u64) -> u64 {
        let slice = vm.layout().data_slice(0, vm.vcpu_count());
        ((slice.end - slice.start) / PAGE_SIZE).saturating_sub(table_frames)
    }

    fn frame(&self, n: u64) -> u64 {
        self.data.start + n * PAGE_SIZE
    }
}

/// What a workload needs of every vCPU: its program, the parameters it
/// reports, and how its slice splits into table frames and data pages.
struct Shape {
    program: Program,
    parameters: Vec<(&'static str, u64)>,
    /// Frames of each vCPU's slice set aside for its page tables.
    table_frames: u64,
    /// Data pages each vCPU's slice must have after its tables.
    data_pages: u64,
}

/// One vCPU's part of the prologue, handed to the workload's module: its
/// slice, a table builder over the slice's table pool (no root forked
/// yet), its window and its seed.
struct VcpuSetup<'a> {
    index: usize,
    slice: Slice,
    space: SpaceBuilder<'a>,
    /// Where its window starts ([`window`]).
    base: u64,
    /// Its seed ([`vcpu_seed`] of the run's seed).
    seed: u64,
}

impl VcpuSetup<'_> {
    /// The window's first `pages` pages mapped, one to one, to the slice's
    /// data frames under `root`, as user read/write data.
    fn map_window(&mut self, root: u64, pages: u64) -> Result<(), PlanError> {
        for p in 0..pages {
            self.space.map_4k(
                root,
                self.base + p * PAGE_SIZE,
                self.slice.frame(p),
                DATA_FLAGS,
            )?;
        }
        Ok(())
    }
}

/// What a workload's module plans for one vCPU.
struct VcpuPlan {
    /// What the vCPU must report and leave behind.
    expect: Expect,
    /// The CR3 values it uses, in order.
    roots: Vec<u64>,
    /// Its arguments, one per round (every vCPU has as many rounds).
    rounds: Vec<VcpuArgs>,
}

/// The prologue every workload shares: for each vCPU, its slice (split
/// as `shape` says, or [`PlanError::TooSmall`]), a table builder on the
/// slice's pool, its window and seed; `vcpu` plans the vCPU from them.
/// The plan's roots are the identity root, then each vCPU's; its rounds
/// are the vCPUs' round arguments side by side.
fn build<'a>(
    vm: &'a Vm,
    workload: Workload,
    params: &Params,
    shape: Shape,
    mut vcpu: impl FnMut(&mut VcpuSetup<'a>) -> Result<VcpuPlan, PlanError>,
) -> Result<Plan, PlanError> {
    let mut plan = Plan {
        program: shape.program,
        rounds: Vec::new(),
        expect: Vec::new(),
        roots: vec![vm.root()],
        parameters: shape.parameters,
        stress: None,
    };
    let mut per_vcpu = Vec::new();
    for index in 0..vm.vcpu_count() {
        let slice = Slice::new(vm, workload, index, shape.table_frames, shape.data_pages)?;
        let space = SpaceBuilder::new(vm, slice.tables.clone())?;
        let mut setup = VcpuSetup {
            index,
            slice,
            space,
            base: window(index),
            seed: vcpu_seed(params.seed, index),
        };
        let planned = vcpu(&mut setup)?;
        plan.expect.push(planned.expect);
        plan.roots.extend(planned.roots);
        per_vcpu.push(planned.rounds);
    }
    plan.rounds = transpose(per_vcpu);
    Ok(plan)
}

/// Builds `workload` in `vm` (whose guest has not run yet) for every vCPU.
pub(crate) fn plan(vm: &Vm, workload: Workload, params: &Params) -> Result<Plan, PlanError> {
    match workload {
        Workload::Touch => touch::plan(vm, workload, params, params.touch),
        Workload::Churn => touch::plan(vm, workload, params, TouchKind::Write),
        Workload::PtEdit => pt_edit::plan(vm, params),
        Workload::MultiAs => multi_as::plan(vm, params),
        Workload::Access => access::plan(vm, params),
        Workload::MmioRr => mmio_rr::plan(vm, params),
        Workload::Dirty => dirty::plan(vm, params),
        Workload::Stress => stress::plan(vm, params),
    }
}

fn report(tag: u32, value: u64) -> Report {
    Report {
        tag: u64::from(tag),
        value,
    }
}

/// Per-vCPU lists of round arguments into per-round lists of vCPU
/// arguments (every vCPU has the same number of rounds).
fn transpose(per_vcpu: Vec<Vec<VcpuArgs>>) -> Vec<Vec<VcpuArgs>> {
    let rounds = per_vcpu.first().map_or(0, Vec::len);
    (0..rounds)
        .map(|r| per_vcpu.iter().map(|v| v[r]).collect())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workloads_parse_by_name() {
        for w in Workload::ALL {
            assert_eq!(w.name().parse::<Workload>(), Ok(w));
            assert_eq!(w.to_string(), w.name());
        }
        let err = "netperf".parse::<Workload>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown workload \"netperf\": this build has touch, pt-edit, multi-as, access, mmio-rr, dirty, churn, stress"
        );
    }

    #[test]
    fn windows_and_devices_stay_clear_of_memory() {
        assert_eq!(window(0), 1 << 39);
        assert_eq!(window(1) - window(0), 1 << 39);
        // The last vCPU's window is still canonical.
        assert!(window(crate::layout::MAX_VCPUS) < 1 << 47);
        assert!(mmio_page(crate::layout::MAX_VCPUS) < 1 << 46);
        const {
            assert!(CHURN_GPA + CHURN_SIZE <= MMIO_BASE);
            assert!(STRESS_GPA_B >= STRESS_GPA_A + STRESS_SIZE);
            assert!(STRESS_GPA_B + STRESS_SIZE <= MMIO_BASE);
            assert!(MAX_MEM_SIZE <= CHURN_GPA);
        }
    }

    #[test]
    fn rounds_transpose_per_vcpu_lists() {
        let a = |x| VcpuArgs([x, 0, 0, 0, 0, 0]);
        let rounds = transpose(vec![vec![a(1), a(2)], vec![a(3), a(4)]]);
        assert_eq!(rounds, [vec![a(1), a(3)], vec![a(2), a(4)]]);
        assert!(transpose(Vec::new()).is_empty());
    }
}
