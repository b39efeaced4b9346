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

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use mmu_api::paging::{GuestPhysMemory, PhysMemError, WalkError, WalkOptions, walk_with};
use mmu_api::{Access, AccessKind, Gpa, Gva, SlotId};
use mmu_integration::BusError;
use vm_memory::{Bytes, GuestAddress};

use crate::error::KitError;
use crate::kit::abi::{FAULTED, tag};
use crate::kit::workloads::{
    self, ACCESS_RECORD_WORDS, Lcg, MatrixOp, PT_EDIT_RECORD_WORDS, PtEditRecord, TouchKind, rr_reg,
};
use crate::kit::{FaultRecord, Program};
use crate::layout::{MIB2, PAGE_SIZE, pte};
use crate::mmu::Devices;
use crate::space::{SpaceBuilder, SpaceError};
use crate::vcpu::Report;
use crate::vm::{GuestPhys, VcpuArgs, Vm};
use crate::x86;

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

/// Where window B of `stress` starts in each vCPU's window.
const STRESS_WINDOW_B: u64 = 1 << 30;
/// Where the control page of `stress` is in each vCPU's window.
const STRESS_CONTROL: u64 = 2 << 30;

/// The largest guest memory the workloads support (their windows start
/// in PML4 slot 1).
pub const MAX_MEM_SIZE: u64 = CHURN_GPA;

/// Records of `pt-edit` per round: each faults at most once, so the fault
/// log never overflows.
const PT_EDIT_ROUND: usize = 160;
/// Records of `access` per round.
const ACCESS_ROUND: usize = 128;
/// Window pages of `pt-edit` (each with two candidate frames).
const PT_EDIT_WINDOW: u64 = 64;
/// Window pages of each `multi-as` address space (the last one shared).
const MULTI_AS_WINDOW: u64 = 16;
/// Most address spaces `multi-as` takes (their roots fill one page).
const MULTI_AS_MAX: u64 = 512;
/// Where the `access` matrix keeps a `ret` in each page.
const ACCESS_FETCH_OFFSET: u64 = 0x800;

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

/// SplitMix64, for generated inputs.
#[derive(Clone, Debug)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The seed of vCPU `index`: a SplitMix64 step from the run's seed, so
/// every bit differs between vCPUs.
fn vcpu_seed(seed: u64, index: usize) -> u64 {
    Rng(seed ^ (index as u64).wrapping_mul(0xd1b5_4a32_d192_ed03)).next()
}

/// Guest memory as the model sees it: the VM's, with the words the
/// modelled guest wrote laid over it.
struct Overlay<'a> {
    base: GuestPhys<'a>,
    words: HashMap<u64, u64>,
}

impl<'a> Overlay<'a> {
    fn new(vm: &'a Vm) -> Self {
        Overlay {
            base: GuestPhys(vm.memory()),
            words: HashMap::new(),
        }
    }

    fn read(&self, gpa: u64) -> u64 {
        self.read_u64(Gpa(gpa)).unwrap_or(0)
    }

    fn write(&mut self, gpa: u64, value: u64) {
        self.words.insert(gpa, value);
    }
}

impl GuestPhysMemory for Overlay<'_> {
    fn read_u64(&self, gpa: Gpa) -> Result<u64, PhysMemError> {
        match self.words.get(&gpa.raw()) {
            Some(v) => Ok(*v),
            None => self.base.read_u64(gpa),
        }
    }

    /// The model never sets A/D bits: it walks without updating them.
    fn compare_exchange_u64(
        &self,
        gpa: Gpa,
        current: u64,
        _new: u64,
    ) -> Result<Result<(), u64>, PhysMemError> {
        let actual = self.read_u64(gpa)?;
        Ok(if actual == current {
            Ok(())
        } else {
            Err(actual)
        })
    }
}

/// The reference walker's verdict on `access` at `gva` under `root`: the
/// guest-physical address, or the #PF the guest must see.
fn model_access(
    vm: &Vm,
    memory: &Overlay<'_>,
    root: u64,
    gva: u64,
    kind: AccessKind,
    cpl: u8,
) -> Result<Result<u64, FaultRecord>, PlanError> {
    let mut ctx = vm.paging_context(cpl);
    ctx.cr3 = root;
    let access = if cpl == 3 {
        Access::user(kind)
    } else {
        Access::supervisor(kind)
    };
    let options = WalkOptions::without_accessed_dirty();
    match walk_with(&ctx, memory, Gva(gva), access, options) {
        Ok(t) => Ok(Ok(t.gpa.raw())),
        Err(WalkError::PageFault(pf)) => Ok(Err(FaultRecord {
            vector: x86::VECTOR_PF,
            error_code: u64::from(pf.error_code.bits()),
            cr2: pf.address.raw(),
        })),
        Err(other) => Err(other.into()),
    }
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

/// The flags of an `access` matrix entry for combination `combo`
/// (bit 0: U, bit 1: W, bit 2: NX), present, A/D clear.
fn matrix_flags(combo: u64) -> u64 {
    let mut flags = pte::P;
    if combo & 1 != 0 {
        flags |= pte::U;
    }
    if combo & 2 != 0 {
        flags |= pte::W;
    }
    if combo & 4 != 0 {
        flags |= pte::NX;
    }
    flags
}

/// User read/write data, A/D clear.
const DATA_FLAGS: u64 = pte::P | pte::W | pte::U | pte::NX;

/// One vCPU's slice: its table pool, then its data frames.
struct Slice {
    index: usize,
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
            index,
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

/// Builds `workload` in `vm` (whose guest has not run yet) for every vCPU.
pub(crate) fn plan(vm: &Vm, workload: Workload, params: &Params) -> Result<Plan, PlanError> {
    match workload {
        Workload::Touch => plan_touch(vm, workload, params, params.touch),
        Workload::Churn => plan_touch(vm, workload, params, TouchKind::Write),
        Workload::PtEdit => plan_pt_edit(vm, params),
        Workload::MultiAs => plan_multi_as(vm, params),
        Workload::Access => plan_access(vm),
        Workload::MmioRr => plan_mmio_rr(vm, params),
        Workload::Dirty => plan_dirty(vm, params),
        Workload::Stress => plan_stress(vm, params),
    }
}

/// One round: every vCPU's arguments.
fn one_round(args: Vec<VcpuArgs>) -> Vec<Vec<VcpuArgs>> {
    vec![args]
}

fn report(tag: u32, value: u64) -> Report {
    Report {
        tag: u64::from(tag),
        value,
    }
}

/// The window's pages mapped to the slice's data frames, one to one.
fn map_window(
    space: &mut SpaceBuilder<'_>,
    root: u64,
    slice: &Slice,
    pages: u64,
) -> Result<(), PlanError> {
    for p in 0..pages {
        space.map_4k(
            root,
            window(slice.index) + p * PAGE_SIZE,
            slice.frame(p),
            DATA_FLAGS,
        )?;
    }
    Ok(())
}

fn plan_touch(
    vm: &Vm,
    workload: Workload,
    params: &Params,
    kind: TouchKind,
) -> Result<Plan, PlanError> {
    let default_passes = if workload == Workload::Churn { 10 } else { 1 };
    let passes = params.passes.unwrap_or(default_passes);
    let levels = vm.layout().levels();
    let slice_pages = Slice::pages_after(vm, 0);
    let tables = SpaceBuilder::frames_for(slice_pages, levels);
    let pages = slice_pages.saturating_sub(tables);
    let mut plan = Plan {
        program: workloads::touch(kind)?,
        rounds: Vec::new(),
        expect: Vec::new(),
        roots: vec![vm.root()],
        parameters: vec![("pages", pages), ("passes", passes)],
        stress: None,
    };
    let mut args = Vec::new();
    for index in 0..vm.vcpu_count() {
        let slice = Slice::new(vm, workload, index, tables, pages)?;
        let mut space = SpaceBuilder::new(vm, slice.tables.clone())?;
        let root = space.fork_identity()?;
        map_window(&mut space, root, &slice, pages)?;
        let base = window(index);
        let seed = vcpu_seed(params.seed, index);
        let mut expect = Expect::default();
        for p in 0..pages {
            let gva = base + p * PAGE_SIZE;
            let frame = slice.frame(p);
            let value = match kind {
                TouchKind::Read => {
                    vm.memory().write_obj(preset(gva), GuestAddress(frame))?;
                    preset(gva)
                }
                TouchKind::Write => {
                    if passes > 0 {
                        expect.written.insert(frame);
                    }
                    gva ^ seed
                }
            };
            if passes > 0 || kind == TouchKind::Read {
                expect.memory.push(Word::exact(frame, value));
            }
            expect.translations.push((gva, frame));
        }
        let checksum = workloads::touch_checksum(kind, base, pages, passes, seed, preset);
        expect.reports.push(report(tag::CHECKSUM, checksum));
        plan.expect.push(expect);
        plan.roots.push(root);
        args.push(VcpuArgs([base, pages, passes, seed, root, 0]));
    }
    plan.rounds = one_round(args);
    Ok(plan)
}

fn plan_pt_edit(vm: &Vm, params: &Params) -> Result<Plan, PlanError> {
    let workload = Workload::PtEdit;
    let edits = params.ops.unwrap_or(480);
    let levels = vm.layout().levels();
    let tables = SpaceBuilder::frames_for(PT_EDIT_WINDOW, levels);
    let frames = 2 * PT_EDIT_WINDOW;
    let script_pages = (edits * 8 * PT_EDIT_RECORD_WORDS).div_ceil(PAGE_SIZE);
    let mut plan = Plan {
        program: workloads::pt_edit()?,
        rounds: Vec::new(),
        expect: Vec::new(),
        roots: vec![vm.root()],
        parameters: vec![("edits", edits), ("window_pages", PT_EDIT_WINDOW)],
        stress: None,
    };
    let mut per_vcpu_args = Vec::new();
    for index in 0..vm.vcpu_count() {
        let slice = Slice::new(vm, workload, index, tables, frames + script_pages)?;
        let mut space = SpaceBuilder::new(vm, slice.tables.clone())?;
        let root = space.fork_identity()?;
        let base = window(index);
        let mut entries = Vec::new();
        for j in 0..PT_EDIT_WINDOW {
            entries.push(space.map_4k(root, base + j * PAGE_SIZE, slice.frame(j), DATA_FLAGS)?);
        }
        for f in 0..frames {
            fill_frame(vm, slice.frame(f), preset)?;
        }
        let script = slice.frame(frames);

        // Generate the edits and run them through the model.
        let mut rng = Rng(vcpu_seed(params.seed, index));
        let mut memory = Overlay::new(vm);
        let mut expect = Expect::default();
        let mut records = Vec::new();
        let mut checksum = 0u64;
        let mut faults = 0u64;
        for k in 0..edits {
            let j = rng.below(PT_EDIT_WINDOW);
            let current = memory.read(entries[j as usize]);
            let frame = if current & pte::P != 0 && rng.below(2) == 0 {
                current & pte::ADDR
            } else {
                slice.frame(rng.below(frames))
            };
            let entry = match rng.below(6) {
                0 => 0,
                1 | 2 => frame | DATA_FLAGS,
                3 => frame | pte::P | pte::U | pte::NX,
                4 => frame | pte::P | pte::W | pte::NX,
                _ => (current & pte::ADDR) | (current & pte::P) | pte::U | pte::NX,
            };
            let write = rng.below(2) == 0;
            let address = base + j * PAGE_SIZE + 8 * rng.below(PAGE_SIZE / 8);
            let value = rng.next();
            let record = PtEditRecord {
                entry_address: entries[j as usize],
                entry,
                address,
                write,
                value,
            };
            records.extend(record.words());
            memory.write(entries[j as usize], entry);
            expect
                .written
                .insert(entries[j as usize] & !(PAGE_SIZE - 1));
            let kind = if write {
                AccessKind::Write
            } else {
                AccessKind::Read
            };
            match model_access(vm, &memory, root, address, kind, 3)? {
                Ok(gpa) => {
                    if write {
                        memory.write(gpa, value);
                        expect.written.insert(gpa & !(PAGE_SIZE - 1));
                        checksum = checksum.wrapping_add(value);
                    } else {
                        checksum = checksum.wrapping_add(memory.read(gpa));
                    }
                }
                Err(fault) => {
                    expect.faults.push(fault);
                    faults += 1;
                }
            }
            if (k + 1) % PT_EDIT_ROUND as u64 == 0 || k + 1 == edits {
                expect.reports.push(report(tag::CHECKSUM, checksum));
                expect.reports.push(report(tag::FAULTS, faults));
                checksum = 0;
                faults = 0;
            }
        }
        write_words(vm, script, &records)?;
        // Every word the model wrote: data exactly, entries but their A/D.
        let entry_set: BTreeSet<u64> = entries.iter().copied().collect();
        let mut words: Vec<_> = memory.words.iter().map(|(&g, &v)| (g, v)).collect();
        words.sort_unstable();
        for (gpa, value) in words {
            expect.memory.push(if entry_set.contains(&gpa) {
                Word {
                    gpa,
                    value: value & !(pte::A | pte::D),
                    mask: !(pte::A | pte::D),
                }
            } else {
                Word::exact(gpa, value)
            });
        }
        let mut args = Vec::new();
        for (round, chunk) in records
            .chunks((PT_EDIT_ROUND as u64 * PT_EDIT_RECORD_WORDS) as usize)
            .enumerate()
        {
            let at = script + (round * PT_EDIT_ROUND) as u64 * 8 * PT_EDIT_RECORD_WORDS;
            let count = chunk.len() as u64 / PT_EDIT_RECORD_WORDS;
            args.push(VcpuArgs([root, at, count, 0, 0, 0]));
        }
        if args.is_empty() {
            args.push(VcpuArgs([root, script, 0, 0, 0, 0]));
            expect.reports = vec![report(tag::CHECKSUM, 0), report(tag::FAULTS, 0)];
        }
        per_vcpu_args.push(args);
        plan.expect.push(expect);
        plan.roots.push(root);
    }
    plan.rounds = transpose(per_vcpu_args);
    Ok(plan)
}

/// Per-vCPU lists of round arguments into per-round lists of vCPU
/// arguments (every vCPU has the same number of rounds).
fn transpose(per_vcpu: Vec<Vec<VcpuArgs>>) -> Vec<Vec<VcpuArgs>> {
    let rounds = per_vcpu.first().map_or(0, Vec::len);
    (0..rounds)
        .map(|r| per_vcpu.iter().map(|v| v[r]).collect())
        .collect()
}

fn plan_multi_as(vm: &Vm, params: &Params) -> Result<Plan, PlanError> {
    let workload = Workload::MultiAs;
    let spaces = params.ops.unwrap_or(16);
    let passes = params.passes.unwrap_or(4);
    if spaces == 0 || spaces > MULTI_AS_MAX {
        return Err(PlanError::Option {
            workload,
            what: "--ops (address spaces)",
            detail: format!("{spaces} is not in 1..={MULTI_AS_MAX}"),
        });
    }
    let levels = vm.layout().levels();
    let w = MULTI_AS_WINDOW;
    let tables = spaces * SpaceBuilder::frames_for(w, levels);
    // Private frames, the shared one, and the page of roots.
    let frames = spaces * (w - 1) + 1;
    let mut plan = Plan {
        program: workloads::multi_as()?,
        rounds: Vec::new(),
        expect: Vec::new(),
        roots: vec![vm.root()],
        parameters: vec![
            ("address_spaces", spaces),
            ("window_pages", w),
            ("passes", passes),
        ],
        stress: None,
    };
    let mut args = Vec::new();
    for index in 0..vm.vcpu_count() {
        let slice = Slice::new(vm, workload, index, tables, frames + 1)?;
        let mut space = SpaceBuilder::new(vm, slice.tables.clone())?;
        let base = window(index);
        let shared = slice.frame(frames - 1);
        let frame_of = |k: u64, j: u64| {
            if j == w - 1 {
                shared
            } else {
                slice.frame(k * (w - 1) + j)
            }
        };
        let mut roots = Vec::new();
        for k in 0..spaces {
            let root = space.fork_identity()?;
            for j in 0..w {
                space.map_4k(root, base + j * PAGE_SIZE, frame_of(k, j), DATA_FLAGS)?;
            }
            roots.push(root);
        }
        let roots_at = slice.frame(frames);
        write_words(vm, roots_at, &roots)?;
        let mut memory = HashMap::new();
        for n in 0..frames {
            let frame = slice.frame(n);
            vm.memory().write_obj(preset(frame), GuestAddress(frame))?;
            memory.insert(frame, preset(frame));
        }
        let mut checksum = 0u64;
        for pass in 0..passes {
            for k in 0..spaces {
                for j in 0..w {
                    let slot = memory.entry(frame_of(k, j)).or_insert(0);
                    *slot = workloads::multi_as_value(*slot, pass, k, j);
                    checksum = checksum.wrapping_add(*slot);
                }
            }
        }
        let mut expect = Expect::default();
        expect.reports.push(report(tag::CHECKSUM, checksum));
        let mut words: Vec<_> = memory.into_iter().collect();
        words.sort_unstable();
        for (frame, value) in words {
            expect.memory.push(Word::exact(frame, value));
            if passes > 0 {
                expect.written.insert(frame);
            }
        }
        if passes > 0 {
            // The last space loaded stays the vCPU's context.
            for j in 0..w {
                expect
                    .translations
                    .push((base + j * PAGE_SIZE, frame_of(spaces - 1, j)));
            }
        }
        plan.expect.push(expect);
        plan.roots.extend(&roots);
        args.push(VcpuArgs([roots_at, spaces, passes, base, w, 0]));
    }
    plan.rounds = one_round(args);
    Ok(plan)
}

fn plan_access(vm: &Vm) -> Result<Plan, PlanError> {
    let workload = Workload::Access;
    // 8 PDE combinations, each over a PT with the 8 PTE combinations.
    const COMBOS: u64 = 8;
    let pages = COMBOS * COMBOS;
    let records = pages * MatrixOp::ALL.len() as u64;
    let levels = vm.layout().levels();
    let tables = SpaceBuilder::frames_for(1, levels) - 1 + COMBOS;
    let record_pages = (records * 8 * ACCESS_RECORD_WORDS).div_ceil(PAGE_SIZE);
    let result_pages = (records * 8).div_ceil(PAGE_SIZE);
    let mut plan = Plan {
        program: workloads::access_matrix()?,
        rounds: Vec::new(),
        expect: Vec::new(),
        roots: vec![vm.root()],
        parameters: vec![("pages", pages), ("accesses", records)],
        stress: None,
    };
    let mut per_vcpu_args = Vec::new();
    for index in 0..vm.vcpu_count() {
        let slice = Slice::new(
            vm,
            workload,
            index,
            tables,
            pages + record_pages + result_pages,
        )?;
        let mut space = SpaceBuilder::new(vm, slice.tables.clone())?;
        let root = space.fork_identity()?;
        let base = window(index);
        let gva_of = |d: u64, l: u64| base + d * MIB2 + l * PAGE_SIZE;
        for d in 0..COMBOS {
            for l in 0..COMBOS {
                let frame = slice.frame(d * COMBOS + l);
                space.map_4k(root, gva_of(d, l), frame, matrix_flags(l))?;
                fill_frame(vm, frame, |gpa| preset(gpa) | 1)?;
                vm.memory()
                    .write_obj(0xc3u8, GuestAddress(frame + ACCESS_FETCH_OFFSET))?;
            }
            space.set_flags(root, gva_of(d, 0), 2, matrix_flags(d))?;
        }
        let record_at = slice.frame(pages);
        let results_at = record_at + record_pages * PAGE_SIZE;

        let mut memory = Overlay::new(vm);
        let mut expect = Expect::default();
        let mut words = Vec::new();
        let mut results = Vec::new();
        let mut checksum = 0u64;
        let mut faults = 0u64;
        let mut n = 0usize;
        for d in 0..COMBOS {
            for l in 0..COMBOS {
                for op in MatrixOp::ALL {
                    let kind = op.kind();
                    let address = gva_of(d, l)
                        + match kind {
                            AccessKind::Read => 0,
                            AccessKind::Write => 8,
                            AccessKind::Fetch => ACCESS_FETCH_OFFSET,
                            other => unreachable!("the matrix has no {other:?} access"),
                        };
                    let value = address ^ ((op as u64) << 56);
                    words.extend([address, op as u64, value]);
                    let result = match model_access(vm, &memory, root, address, kind, op.cpl())? {
                        Ok(gpa) => match kind {
                            AccessKind::Read => {
                                let v = memory.read(gpa);
                                checksum = checksum.wrapping_add(v);
                                v
                            }
                            AccessKind::Write => {
                                memory.write(gpa, value);
                                expect.written.insert(gpa & !(PAGE_SIZE - 1));
                                0
                            }
                            AccessKind::Fetch => 0,
                            other => unreachable!("the matrix has no {other:?} access"),
                        },
                        Err(fault) => {
                            expect.faults.push(fault);
                            faults += 1;
                            FAULTED
                        }
                    };
                    results.push(result);
                    n += 1;
                    if n.is_multiple_of(ACCESS_ROUND) || n as u64 == records {
                        expect.reports.push(report(tag::CHECKSUM, checksum));
                        expect.reports.push(report(tag::FAULTS, faults));
                        checksum = 0;
                        faults = 0;
                    }
                }
            }
        }
        write_words(vm, record_at, &words)?;
        for (i, result) in results.iter().enumerate() {
            let gpa = results_at + 8 * i as u64;
            expect.memory.push(Word::exact(gpa, *result));
            expect.written.insert(gpa & !(PAGE_SIZE - 1));
        }
        let mut written: Vec<_> = memory.words.iter().map(|(&g, &v)| (g, v)).collect();
        written.sort_unstable();
        expect
            .memory
            .extend(written.into_iter().map(|(g, v)| Word::exact(g, v)));
        let mut args = Vec::new();
        for start in (0..records as usize).step_by(ACCESS_ROUND) {
            let count = ACCESS_ROUND.min(records as usize - start) as u64;
            args.push(VcpuArgs([
                root,
                record_at + start as u64 * 8 * ACCESS_RECORD_WORDS,
                count,
                results_at + start as u64 * 8,
                0,
                0,
            ]));
        }
        per_vcpu_args.push(args);
        plan.expect.push(expect);
        plan.roots.push(root);
    }
    plan.rounds = transpose(per_vcpu_args);
    Ok(plan)
}

fn plan_mmio_rr(vm: &Vm, params: &Params) -> Result<Plan, PlanError> {
    let workload = Workload::MmioRr;
    let transactions = params.ops.unwrap_or(1000);
    let levels = vm.layout().levels();
    let tables = SpaceBuilder::frames_for(1, levels);
    let mut plan = Plan {
        program: workloads::mmio_rr()?,
        rounds: Vec::new(),
        expect: Vec::new(),
        roots: vec![vm.root()],
        parameters: vec![("transactions", transactions)],
        stress: None,
    };
    let mut args = Vec::new();
    for index in 0..vm.vcpu_count() {
        let slice = Slice::new(vm, workload, index, tables, 1)?;
        let mut space = SpaceBuilder::new(vm, slice.tables.clone())?;
        let root = space.fork_identity()?;
        let base = window(index);
        space.map_4k(root, base, mmio_page(index), DATA_FLAGS)?;
        let first_id = first_request(params.seed, index);
        let (checksum, polls) = rr_model(first_id, transactions);
        plan.expect.push(Expect {
            reports: vec![
                report(tag::CHECKSUM, checksum),
                report(tag::TRANSACTIONS, transactions),
                report(tag::POLLS, polls),
            ],
            ..Expect::default()
        });
        plan.roots.push(root);
        args.push(VcpuArgs([root, transactions, base, first_id, 0, 0]));
    }
    plan.rounds = one_round(args);
    Ok(plan)
}

/// The first request id vCPU `index` sends.
fn first_request(seed: u64, index: usize) -> u64 {
    (vcpu_seed(seed, index) & 0xffff_ffff) | ((index as u64) << 40)
}

/// The checksum and status reads of `transactions` transactions from
/// request `first_id` on.
pub fn rr_model(first_id: u64, transactions: u64) -> (u64, u64) {
    (0..transactions).fold((0u64, 0u64), |(sum, polls), t| {
        let id = first_id.wrapping_add(t);
        (
            sum.wrapping_add(workloads::rr_response(id)),
            polls + workloads::rr_busy_reads(id) + 1,
        )
    })
}

fn plan_dirty(vm: &Vm, params: &Params) -> Result<Plan, PlanError> {
    let workload = Workload::Dirty;
    let writes = params.ops.unwrap_or(65536);
    let levels = vm.layout().levels();
    let slice_pages = Slice::pages_after(vm, 0);
    let tables = SpaceBuilder::frames_for(slice_pages, levels);
    let pages = slice_pages.saturating_sub(tables).min(u64::from(u32::MAX));
    let mut plan = Plan {
        program: workloads::dirty()?,
        rounds: Vec::new(),
        expect: Vec::new(),
        roots: vec![vm.root()],
        parameters: vec![("pages", pages), ("writes", writes)],
        stress: None,
    };
    let mut args = Vec::new();
    for index in 0..vm.vcpu_count() {
        let slice = Slice::new(vm, workload, index, tables, pages)?;
        let mut space = SpaceBuilder::new(vm, slice.tables.clone())?;
        let root = space.fork_identity()?;
        map_window(&mut space, root, &slice, pages)?;
        let base = window(index);
        let seed = vcpu_seed(params.seed, index);
        let mut lcg = Lcg(seed);
        let mut last = HashMap::new();
        let mut checksum = 0u64;
        let mut expect = Expect::default();
        for _ in 0..writes {
            let x = lcg.next_value();
            let (page, offset) = workloads::dirty_target(x, pages);
            let frame = slice.frame(page);
            last.insert(frame + offset, x);
            expect.written.insert(frame);
            checksum = checksum.wrapping_add(x);
        }
        let mut words: Vec<_> = last.into_iter().collect();
        words.sort_unstable();
        expect.memory = words.into_iter().map(|(g, v)| Word::exact(g, v)).collect();
        expect.reports.push(report(tag::CHECKSUM, checksum));
        expect.translations = (0..pages)
            .map(|p| (base + p * PAGE_SIZE, slice.frame(p)))
            .collect();
        plan.expect.push(expect);
        plan.roots.push(root);
        args.push(VcpuArgs([root, base, pages, writes, seed, 0]));
    }
    plan.rounds = one_round(args);
    Ok(plan)
}

fn plan_stress(vm: &Vm, params: &Params) -> Result<Plan, PlanError> {
    let workload = Workload::Stress;
    let pages = params.ops.unwrap_or(16);
    let vcpus = vm.vcpu_count() as u64;
    let slot_pages = STRESS_SIZE / PAGE_SIZE;
    if pages == 0 || pages * vcpus > slot_pages {
        return Err(PlanError::Option {
            workload,
            what: "--ops (pages per vCPU)",
            detail: format!(
                "{pages} x {vcpus} vCPUs is not in 1..={slot_pages} (the stress memslot's pages)"
            ),
        });
    }
    let levels = vm.layout().levels();
    // Windows A and B and the control page sit in three 1 GiB regions.
    let tables = 3 * SpaceBuilder::frames_for(pages, levels);
    let mut plan = Plan {
        program: workloads::stress()?,
        rounds: Vec::new(),
        expect: Vec::new(),
        roots: vec![vm.root()],
        parameters: vec![
            ("pages", pages),
            ("cycles", params.passes.unwrap_or(STRESS_CYCLES)),
        ],
        stress: None,
    };
    let mut args = Vec::new();
    let mut controls = Vec::new();
    for index in 0..vm.vcpu_count() {
        let slice = Slice::new(vm, workload, index, tables, 1)?;
        let mut space = SpaceBuilder::new(vm, slice.tables.clone())?;
        let root = space.fork_identity()?;
        let base = window(index);
        let first = index as u64 * pages * PAGE_SIZE;
        for p in 0..pages {
            let offset = first + p * PAGE_SIZE;
            space.map_4k(
                root,
                base + p * PAGE_SIZE,
                STRESS_GPA_A + offset,
                DATA_FLAGS,
            )?;
            space.map_4k(
                root,
                base + STRESS_WINDOW_B + p * PAGE_SIZE,
                STRESS_GPA_B + offset,
                DATA_FLAGS,
            )?;
        }
        let control = slice.frame(0);
        space.map_4k(root, base + STRESS_CONTROL, control, DATA_FLAGS)?;
        fill_frame(vm, control, |_| 0)?;
        plan.expect.push(Expect {
            translations: vec![(base + STRESS_CONTROL, control)],
            ..Expect::default()
        });
        plan.roots.push(root);
        controls.push(control);
        args.push(VcpuArgs([
            root,
            base + STRESS_CONTROL,
            base,
            base + STRESS_WINDOW_B,
            pages,
            0,
        ]));
    }
    plan.stress = Some((controls, pages));
    plan.rounds = one_round(args);
    Ok(plan)
}

/// The counters of one vCPU's `mmio-rr` device.
#[derive(Debug, Default)]
pub struct RrCounters {
    /// Requests written to the doorbell.
    pub doorbells: AtomicU64,
    /// Status reads.
    pub status_reads: AtomicU64,
    /// Status reads with no request pending (a guest that lost track).
    pub idle_reads: AtomicU64,
}

impl RrCounters {
    /// (doorbells, status reads, idle reads) now.
    pub fn snapshot(&self) -> (u64, u64, u64) {
        (
            self.doorbells.load(Ordering::Relaxed),
            self.status_reads.load(Ordering::Relaxed),
            self.idle_reads.load(Ordering::Relaxed),
        )
    }
}

/// The `mmio-rr` device of one vCPU: a doorbell and a status register
/// ([`rr_reg`]) in one page no memslot covers. A doorbell write starts a
/// request; the status reads "busy" (0) [`rr_busy_reads`](workloads::rr_busy_reads)
/// times, then [`READY`](rr_reg::READY) | [`rr_response`](workloads::rr_response)
/// once.
#[derive(Debug)]
pub struct RrDevice {
    page: u64,
    pending: Option<(u64, u64)>,
    counters: Arc<RrCounters>,
}

impl RrDevice {
    /// The device at guest-physical page `page`, counting into `counters`.
    pub fn new(page: u64, counters: Arc<RrCounters>) -> Self {
        RrDevice {
            page,
            pending: None,
            counters,
        }
    }

    /// The register at `gpa` for an 8-byte access, or None.
    fn register(&self, gpa: Gpa, len: usize) -> Option<u64> {
        let offset = gpa.raw().checked_sub(self.page)?;
        (offset < PAGE_SIZE && len == 8).then_some(offset)
    }
}

impl Devices for RrDevice {
    fn mmio_read(&mut self, gpa: Gpa, data: &mut [u8]) -> Result<(), BusError> {
        if self.register(gpa, data.len()) != Some(rr_reg::STATUS) {
            return Err(BusError::NoDevice(gpa));
        }
        self.counters.status_reads.fetch_add(1, Ordering::Relaxed);
        let value = match self.pending {
            Some((id, 0)) => {
                self.pending = None;
                rr_reg::READY | workloads::rr_response(id)
            }
            Some((id, busy)) => {
                self.pending = Some((id, busy - 1));
                0
            }
            None => {
                self.counters.idle_reads.fetch_add(1, Ordering::Relaxed);
                0
            }
        };
        data.copy_from_slice(&value.to_le_bytes());
        Ok(())
    }

    fn mmio_write(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), BusError> {
        if self.register(gpa, data.len()) != Some(rr_reg::DOORBELL) {
            return Err(BusError::NoDevice(gpa));
        }
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(data);
        let id = u64::from_le_bytes(bytes);
        self.counters.doorbells.fetch_add(1, Ordering::Relaxed);
        self.pending = Some((id, workloads::rr_busy_reads(id)));
        Ok(())
    }
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
    fn the_rr_device_answers_after_its_busy_reads() {
        let counters = Arc::new(RrCounters::default());
        let page = mmio_page(0);
        let mut device = RrDevice::new(page, Arc::clone(&counters));
        let id = 5u64; // two busy reads
        device
            .mmio_write(Gpa(page + rr_reg::DOORBELL), &id.to_le_bytes())
            .unwrap();
        let mut reads = Vec::new();
        for _ in 0..4 {
            let mut data = [0u8; 8];
            device
                .mmio_read(Gpa(page + rr_reg::STATUS), &mut data)
                .unwrap();
            reads.push(u64::from_le_bytes(data));
        }
        assert_eq!(
            reads,
            [
                0,
                0,
                rr_reg::READY | workloads::rr_response(5),
                0 // idle
            ]
        );
        assert_eq!(counters.snapshot(), (1, 4, 1));
        // Wrong registers and sizes are bus errors, not panics.
        assert!(device.mmio_read(Gpa(page), &mut [0u8; 8]).is_err());
        assert!(
            device
                .mmio_read(Gpa(page + rr_reg::STATUS), &mut [0u8; 4])
                .is_err()
        );
        assert!(device.mmio_write(Gpa(page + 16), &[0u8; 8]).is_err());
        assert!(device.mmio_write(Gpa(page - 8), &[0u8; 8]).is_err());
        // The model counts the same reads.
        assert_eq!(rr_model(5, 1), (workloads::rr_response(5), 3));
        let (sum, polls) = rr_model(3, 3);
        assert_eq!(polls, 1 + 2 + 3);
        assert_eq!(
            sum,
            workloads::rr_response(3)
                .wrapping_add(workloads::rr_response(4))
                .wrapping_add(workloads::rr_response(5))
        );
    }

    #[test]
    fn rounds_transpose_per_vcpu_lists() {
        let a = |x| VcpuArgs([x, 0, 0, 0, 0, 0]);
        let rounds = transpose(vec![vec![a(1), a(2)], vec![a(3), a(4)]]);
        assert_eq!(rounds, [vec![a(1), a(3)], vec![a(2), a(4)]]);
        assert!(transpose(Vec::new()).is_empty());
    }

    #[test]
    fn matrix_flags_cover_every_combination() {
        assert_eq!(matrix_flags(0), pte::P);
        assert_eq!(matrix_flags(7), pte::P | pte::U | pte::W | pte::NX);
        assert_eq!(matrix_flags(1) & (pte::A | pte::D), 0);
    }
}
