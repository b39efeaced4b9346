//! The access-matrix conformance test: `mmu-api`'s reference walker
//! against KVM, in the spirit of kvm-unit-tests' `x86/access.c`.
//!
//! Each case is a 4-level chain of entries (PML4E, PDPTE, PDE, PTE) for
//! one test address, with P, W, U, A, D, XD and PS varied per level and at
//! most one reserved bit set; CR0.WP and EFER.NXE; and one access (read,
//! write or fetch) from CPL0 or CPL3. The guest's CPL0 code writes each
//! case's entries itself (the SWAP_ENTRIES system call, which also reloads
//! CR3) because KVM does not see entries the VMM writes from the host; the
//! same system call saves the entries as the previous case left them, so
//! the A/D bits KVM set are read back for every level. CPL3 accesses run
//! natively (KVM's shadow MMU and the hardware decide them); CPL0 accesses
//! are made by the kernel (KVM's instruction emulator decides them, on
//! PVM). The VMM records every #PF (error code, CR2) through the kit's
//! exception stub and resumes the runner after the access.
//!
//! The same cases go through [`mmu_api::paging::walk`] over the same
//! memory, with a paging context carrying the vCPU's CPUID features, and
//! every difference in fault, error code, CR2, value read and entry values
//! afterwards is a mismatch. Features KVM's CPUID does not offer (SMEP,
//! SMAP, PKU, 1 GiB pages on PVM) are not generated; PS in a PDPTE then is
//! a reserved-bit fault, which is checked.

use std::cell::RefCell;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use iced_x86::code_asm::*;
use mmu_api::paging::{
    AccessKind, CpuFeatures, Cr0, Efer, GuestPhysMemory, PhysMemError, WalkError, walk,
};
use mmu_api::{Access, Gpa, Gva};

use crate::error::{GuestException, KitError, RunError, SetupError, VcpuError};
use crate::kit::abi::{FAULTED, syscall};
use crate::kit::{Program, Ring, emit};
use crate::layout::{MIB2, PAGE_SIZE, pte};
use crate::rng::Rng;
use crate::vcpu::{ExceptionAction, ExitHandler, VcpuContext};
use crate::vm::{GuestPhys, VcpuArgs, Vm, VmConfig};
use crate::{PagingOps, x86};

/// Options of a conformance run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// Number of cases in all.
    pub cases: usize,
    /// Seed of the case generator.
    pub seed: u64,
    /// Paging levels to run under (the cases are split evenly).
    pub levels: Vec<u8>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            cases: 100_000,
            seed: 1,
            levels: vec![4, 5],
        }
    }
}

/// Why a conformance run could not be completed (mismatches are results,
/// not errors).
#[derive(Debug, thiserror::Error)]
pub enum ConformanceError {
    /// Building the VM failed.
    #[error("cannot build the conformance VM")]
    Setup(#[from] SetupError),
    /// Assembling the runner failed.
    #[error("cannot assemble the conformance runner")]
    Kit(#[from] KitError),
    /// A batch of cases failed to run.
    #[error("a batch of cases failed to run")]
    Run(#[from] RunError),
    /// Writing cases into guest memory failed.
    #[error("cannot write cases into guest memory")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// The access a case makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CaseAccess {
    /// Read, write or fetch.
    pub kind: AccessKind,
    /// 0 or 3.
    pub cpl: u8,
}

/// One case.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Case {
    /// PML4E, PDPTE, PDE, PTE values.
    pub entries: [u64; 4],
    /// The access.
    pub access: CaseAccess,
    /// CR0.WP.
    pub wp: bool,
    /// EFER.NXE.
    pub nxe: bool,
    /// Paging levels of the VM (4 or 5).
    pub levels: u8,
}

/// What an access did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Outcome {
    /// `Some((vector, error code, cr2))` if it faulted.
    pub fault: Option<(u8, u64, u64)>,
    /// The value a non-faulting read returned.
    pub value: Option<u64>,
    /// PML4E, PDPTE, PDE, PTE after the access.
    pub entries: [u64; 4],
}

/// A case where KVM and the walker disagree.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Mismatch {
    /// The case.
    pub case: Case,
    /// What the walker predicts.
    pub expected: Outcome,
    /// What KVM did.
    pub actual: Outcome,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = &self.case;
        write!(
            f,
            "{}-level {:?} at CPL{} wp={} nxe={} entries {:#x?}: expected {:x?}, KVM {:x?}",
            c.levels,
            c.access.kind,
            c.access.cpl,
            c.wp,
            c.nxe,
            c.entries,
            self.expected,
            self.actual
        )
    }
}

/// The result of a conformance run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    /// Cases run.
    pub cases: usize,
    /// Cases that faulted on KVM.
    pub faults: usize,
    /// Every mismatch.
    pub mismatches: Vec<Mismatch>,
    /// Paging levels asked for that this host's KVM cannot run, and why.
    pub skipped: Vec<(u8, String)>,
    /// Wall time.
    pub elapsed: Duration,
}

/// Where the cases' tables and pages live.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    gva: u64,
    /// Guest-physical address of each level's entry (L4, L3, L2, L1).
    entry_gpa: [u64; 4],
    /// The tables the entries point to: L3 table, L2 table, L1 table.
    tables: [u64; 3],
    page_4k: u64,
    page_2m: u64,
    page_1g: u64,
    records: u64,
}

const TEST_OFFSET_READ: u64 = 0x100;
const TEST_OFFSET_WRITE: u64 = 0x108;
const TEST_OFFSET_FETCH: u64 = 0x200;
const RECORD_WORDS: u64 = 16;
const RECORD_BYTES: u64 = RECORD_WORDS * 8;
const BATCH: usize = 4096;
const EFER_MSR: u32 = 0xc000_0080;

/// Word offsets in a case record.
mod rec {
    pub(super) const OP: u64 = 0;
    pub(super) const GVA: u64 = 1;
    pub(super) const TRIPLES: u64 = 2;
    pub(super) const VALUE: u64 = 14;
}

/// Op word bits.
mod op {
    pub(super) const READ: u64 = 0;
    pub(super) const WRITE: u64 = 1;
    pub(super) const FETCH: u64 = 2;
    pub(super) const NONE: u64 = 3;
    pub(super) const CPL0: u64 = 4;
    pub(super) const WP: u64 = 8;
    pub(super) const NXE: u64 = 16;
}

/// Runs the conformance test.
pub fn run(options: &Options) -> Result<Summary, ConformanceError> {
    let started = Instant::now();
    let mut summary = Summary {
        cases: 0,
        faults: 0,
        mismatches: Vec::new(),
        skipped: Vec::new(),
        elapsed: Duration::ZERO,
    };
    let mut vms = Vec::new();
    for &levels in &options.levels {
        match conformance_vm(levels) {
            Ok(vm) => vms.push(vm),
            Err(e @ (SetupError::La57Rejected(_) | SetupError::La57Unavailable)) => {
                summary.skipped.push((levels, e.to_string()))
            }
            Err(e) => return Err(e.into()),
        }
    }
    let modes = vms.len().max(1);
    let mut rng = Rng(options.seed);
    for (i, vm) in vms.iter_mut().enumerate() {
        let share = options.cases / modes + usize::from(i < options.cases % modes);
        run_mode(vm, share, &mut rng, &mut summary)?;
    }
    summary.elapsed = started.elapsed();
    Ok(summary)
}

/// A VM for the cases: no XD in its identity tables, so that the cases
/// may clear EFER.NXE.
fn conformance_vm(levels: u8) -> Result<Vm, SetupError> {
    Vm::new(VmConfig {
        vcpus: 1,
        mem_size: 64 << 20,
        paging_ops: PagingOps::Native,
        paging_levels: levels,
        identity_nx: false,
    })
}

fn run_mode(
    vm: &mut Vm,
    cases: usize,
    rng: &mut Rng,
    summary: &mut Summary,
) -> Result<(), ConformanceError> {
    let levels = vm.layout().levels();
    let geometry = geometry(vm)?;
    prepare_pages(vm, &geometry)?;
    let runner = runner()?;
    let features = vm.cpu().features;
    let maxphyaddr = vm.cpu().maxphyaddr;

    let mut done = 0;
    while done < cases {
        let n = BATCH.min(cases - done);
        let mut batch: Vec<Case> = (0..n)
            .map(|_| generate(rng, &geometry, features, maxphyaddr, levels))
            .collect();
        // Few CR0/EFER switches: group by (WP, NXE).
        batch.sort_by_key(|c| (c.wp, c.nxe));
        write_batch(vm, &geometry, &batch)?;
        let mut handler = Handler {
            kinds: batch.iter().map(|c| c.access).collect(),
            gva: geometry.gva,
            fault_return: vm.kernel().fault_return(),
            call_fault_return: vm.kernel().call_fault_return(),
            faults: HashMap::new(),
        };
        let args = VcpuArgs([geometry.records, batch.len() as u64 + 1, 0, 0, 0, 0]);
        vm.run_with(
            &runner,
            &[args],
            Duration::from_secs(600),
            vec![&mut handler],
        )?;
        let faults = std::mem::take(&mut handler.faults);
        for (i, case) in batch.iter().enumerate() {
            let actual = actual_outcome(vm, &geometry, i, faults.get(&(i as u64)).copied())?;
            let expected = expected_outcome(vm, &geometry, case);
            summary.cases += 1;
            summary.faults += usize::from(actual.fault.is_some());
            if actual != expected {
                summary.mismatches.push(Mismatch {
                    case: *case,
                    expected,
                    actual,
                });
            }
        }
        done += n;
    }
    Ok(())
}

fn geometry(vm: &Vm) -> Result<Geometry, ConformanceError> {
    let data = vm.layout().data();
    // Test address: PML4 slot 1 (512 GiB), below it every index is 0.
    let gva = 1u64 << 39;
    let pml4 = if vm.layout().levels() == 5 {
        vm.read_u64(vm.root())? & pte::ADDR
    } else {
        vm.root()
    };
    let tables = [
        data.start,
        data.start + PAGE_SIZE,
        data.start + 2 * PAGE_SIZE,
    ];
    let page_4k = data.start + 3 * PAGE_SIZE;
    let page_2m = (data.start + 4 * PAGE_SIZE).next_multiple_of(MIB2);
    let records = page_2m + MIB2;
    Ok(Geometry {
        gva,
        entry_gpa: [pml4 + 8, tables[0], tables[1], tables[2]],
        tables,
        page_4k,
        page_2m,
        // A 1 GiB page at 0 (only generated if KVM offers 1 GiB pages).
        page_1g: 0,
        records,
    })
}

/// Distinct markers in each possible target, and `ret` where fetches land.
fn prepare_pages(vm: &Vm, g: &Geometry) -> Result<(), ConformanceError> {
    for (page, marker) in [
        (g.page_4k, 0x4444_0000_0000_0004u64),
        (g.page_2m, 0x2222_0000_0000_0002),
        (g.page_1g, 0x1111_0000_0000_0001),
    ] {
        vm.write_u64(page + TEST_OFFSET_READ, marker)?;
        vm.write_u64(page + TEST_OFFSET_FETCH, 0xc3c3_c3c3_c3c3_c3c3)?;
    }
    for table in g.tables {
        for i in 0..512 {
            vm.write_u64(table + 8 * i, 0)?;
        }
    }
    Ok(())
}

fn generate(
    rng: &mut Rng,
    g: &Geometry,
    features: CpuFeatures,
    maxphyaddr: u8,
    levels: u8,
) -> Case {
    let kind = match rng.below(3) {
        0 => AccessKind::Read,
        1 => AccessKind::Write,
        _ => AccessKind::Fetch,
    };
    let cpl = if rng.chance(50) { 3 } else { 0 };
    let nxe = features.contains(CpuFeatures::NX) && rng.chance(50);
    let wp = rng.chance(50);
    let mut entries = [0u64; 4];
    for entry in entries.iter_mut() {
        let mut flags = 0;
        for (bit, percent) in [
            (pte::P, 93),
            (pte::W, 75),
            (pte::U, 75),
            (pte::A, 50),
            (pte::D, 50),
            (pte::NX, 15),
        ] {
            if rng.chance(percent) {
                flags |= bit;
            }
        }
        *entry = flags;
    }
    // PS: L3 (1 GiB, reserved without the feature) and L2 (2 MiB).
    let ps_l3 = rng.chance(8);
    let ps_l2 = rng.chance(30);
    const PS: u64 = 1 << 7;
    entries[0] |= g.tables[0];
    entries[1] |= if ps_l3 { PS | g.page_1g } else { g.tables[1] };
    entries[2] |= if ps_l2 { PS | g.page_2m } else { g.tables[2] };
    entries[3] |= g.page_4k;
    // At most one reserved bit.
    if rng.chance(15) {
        let level = rng.below(4) as usize;
        let high = u64::from(maxphyaddr) + rng.below(52 - u64::from(maxphyaddr));
        let bit = match (level, rng.below(3)) {
            // PS is reserved in a PML4E.
            (0, 0) => 7,
            // Bits 13..=20 of a 2 MiB PDE.
            (2, 0) if ps_l2 => 13 + rng.below(8),
            _ => high,
        };
        if bit < 52 || maxphyaddr < 52 {
            entries[level] |= 1 << bit;
        }
    }
    Case {
        entries,
        access: CaseAccess { kind, cpl },
        wp,
        nxe,
        levels,
    }
}

fn write_batch(vm: &Vm, g: &Geometry, batch: &[Case]) -> Result<(), ConformanceError> {
    let mut previous_controls = 0;
    for (i, case) in batch.iter().enumerate() {
        let mut op = match case.access.kind {
            AccessKind::Read => op::READ,
            AccessKind::Write => op::WRITE,
            AccessKind::Fetch => op::FETCH,
            other => unreachable!("cases are generated as read, write or fetch, not {other:?}"),
        };
        if case.access.cpl == 0 {
            op |= op::CPL0;
        }
        let controls = if case.wp { op::WP } else { 0 } | if case.nxe { op::NXE } else { 0 };
        previous_controls = controls;
        let offset = match case.access.kind {
            AccessKind::Read => TEST_OFFSET_READ,
            AccessKind::Write => TEST_OFFSET_WRITE,
            AccessKind::Fetch => TEST_OFFSET_FETCH,
            other => unreachable!("cases are generated as read, write or fetch, not {other:?}"),
        };
        write_record(vm, g, i, op | controls, g.gva + offset, &case.entries)?;
    }
    // The sentinel clears the entries, which saves the last case's.
    write_record(
        vm,
        g,
        batch.len(),
        op::NONE | previous_controls,
        g.gva,
        &[0; 4],
    )
}

fn write_record(
    vm: &Vm,
    g: &Geometry,
    index: usize,
    op_word: u64,
    gva: u64,
    entries: &[u64; 4],
) -> Result<(), ConformanceError> {
    let base = g.records + index as u64 * RECORD_BYTES;
    let mut words = [0u64; RECORD_WORDS as usize];
    words[rec::OP as usize] = op_word;
    words[rec::GVA as usize] = gva;
    for (level, (gpa, value)) in g.entry_gpa.iter().zip(entries).enumerate() {
        let t = rec::TRIPLES as usize + 3 * level;
        words[t] = *gpa;
        words[t + 1] = *value;
        words[t + 2] = 0;
    }
    words[rec::VALUE as usize] = FAULTED;
    for (i, w) in words.iter().enumerate() {
        vm.write_u64(base + 8 * i as u64, *w)?;
    }
    Ok(())
}

fn actual_outcome(
    vm: &Vm,
    g: &Geometry,
    index: usize,
    fault: Option<GuestException>,
) -> Result<Outcome, ConformanceError> {
    let base = g.records + index as u64 * RECORD_BYTES;
    let next = base + RECORD_BYTES;
    let mut entries = [0u64; 4];
    for (level, entry) in entries.iter_mut().enumerate() {
        *entry = vm.read_u64(next + 8 * (rec::TRIPLES + 3 * level as u64 + 2))?;
    }
    let op_word = vm.read_u64(base)?;
    let value = (fault.is_none() && op_word & 3 == op::READ)
        .then(|| vm.read_u64(base + 8 * rec::VALUE))
        .transpose()?;
    Ok(Outcome {
        fault: fault.map(|e| (e.vector, e.error_code, e.cr2)),
        value,
        entries,
    })
}

/// The walker's prediction over guest memory with the case's entries
/// overlaid.
fn expected_outcome(vm: &Vm, g: &Geometry, case: &Case) -> Outcome {
    let overlay = Overlay {
        base: GuestPhys(vm.memory()),
        words: RefCell::new(
            g.entry_gpa
                .iter()
                .copied()
                .zip(case.entries.iter().copied())
                .collect(),
        ),
    };
    let mut ctx = vm.paging_context(case.access.cpl);
    ctx.cr0.set(Cr0::WP, case.wp);
    ctx.efer.set(Efer::NXE, case.nxe);
    let access = if case.access.cpl == 3 {
        Access::user(case.access.kind)
    } else {
        Access::supervisor(case.access.kind)
    };
    let offset = match case.access.kind {
        AccessKind::Read => TEST_OFFSET_READ,
        AccessKind::Write => TEST_OFFSET_WRITE,
        AccessKind::Fetch => TEST_OFFSET_FETCH,
        other => unreachable!("cases are generated as read, write or fetch, not {other:?}"),
    };
    let gva = g.gva + offset;
    let result = walk(&ctx, &overlay, Gva(gva), access);
    let (fault, value) = match result {
        Ok(t) => {
            let value = (case.access.kind == AccessKind::Read)
                .then(|| overlay.base.read_u64(t.gpa).unwrap_or(u64::MAX));
            (None, value)
        }
        Err(WalkError::PageFault(pf)) => (
            Some((x86::VECTOR_PF, u64::from(pf.error_code.bits()), gva)),
            None,
        ),
        // #GP-class results: not generated by these cases; shown as such.
        Err(_) => (Some((x86::VECTOR_GP, 0, 0)), None),
    };
    let words = overlay.words.borrow();
    let entries = g.entry_gpa.map(|gpa| words.get(&gpa).copied().unwrap_or(0));
    Outcome {
        fault,
        value,
        entries,
    }
}

/// Guest memory with some words replaced; the walker's A/D updates land
/// in the overlay, never in guest memory.
struct Overlay<'a> {
    base: GuestPhys<'a>,
    words: RefCell<HashMap<u64, u64>>,
}

impl GuestPhysMemory for Overlay<'_> {
    fn read_u64(&self, gpa: Gpa) -> Result<u64, PhysMemError> {
        if let Some(v) = self.words.borrow().get(&gpa.raw()) {
            return Ok(*v);
        }
        self.base.read_u64(gpa)
    }

    fn compare_exchange_u64(
        &self,
        gpa: Gpa,
        current: u64,
        new: u64,
    ) -> Result<Result<(), u64>, PhysMemError> {
        let actual = self.read_u64(gpa)?;
        if actual != current {
            return Ok(Err(actual));
        }
        self.words.borrow_mut().insert(gpa.raw(), new);
        Ok(Ok(()))
    }
}

/// Records faults by case index (R15 of the runner) and resumes after
/// the access.
struct Handler {
    kinds: Vec<CaseAccess>,
    gva: u64,
    fault_return: u64,
    call_fault_return: u64,
    faults: HashMap<u64, GuestException>,
}

impl ExitHandler for &mut Handler {
    fn exception(
        &mut self,
        vcpu: &mut VcpuContext<'_>,
        exception: &GuestException,
    ) -> Result<ExceptionAction, VcpuError> {
        let regs = vcpu.regs()?;
        let index = regs.r15;
        let Some(access) = self.kinds.get(index as usize).copied() else {
            return Ok(ExceptionAction::Fail);
        };
        if self.faults.insert(index, *exception).is_some() {
            // A second exception for the same case: the runner is lost.
            return Ok(ExceptionAction::Fail);
        }
        let in_test_page = |rip: u64| rip & !(PAGE_SIZE - 1) == self.gva;
        let rip = match (exception.cpl(), access.kind) {
            (3, _) => regs.r14,
            (0, AccessKind::Fetch) if in_test_page(exception.rip) => self.call_fault_return,
            (0, AccessKind::Read | AccessKind::Write) => self.fault_return,
            _ => return Ok(ExceptionAction::Fail),
        };
        Ok(ExceptionAction::Redirect { rip, actions: 0 })
    }
}

/// The CPL3 runner: RDI = first record, RSI = records (cases + sentinel).
fn runner() -> Result<Program, KitError> {
    Program::assemble("conformance", Ring::User, |a| {
        let mut next = a.create_label();
        let mut same_controls = a.create_label();
        let mut recover = a.create_label();
        let mut wp_off = a.create_label();
        let mut nxe_off = a.create_label();
        let mut ops: Vec<CodeLabel> = (0..8).map(|_| a.create_label()).collect();

        a.mov(rbx, rdi)?;
        a.mov(r12, rsi)?;
        a.xor(r15d, r15d)?;
        a.mov(r13, -1i64)?;
        a.lea(r14, ptr(recover))?;
        a.mov(rbp, rsp)?;

        a.set_label(&mut next)?;
        a.mov(rax, qword_ptr(rbx))?;
        a.and(eax, (op::WP | op::NXE) as u32)?;
        a.cmp(rax, r13)?;
        a.je(same_controls)?;
        a.mov(r13, rax)?;
        // CR0.WP
        emit::syscall(a, syscall::READ_CR0)?;
        a.btr(rax, 16)?;
        a.test(r13, op::WP as i32)?;
        a.jz(wp_off)?;
        a.bts(rax, 16)?;
        a.set_label(&mut wp_off)?;
        a.mov(rdi, rax)?;
        emit::syscall(a, syscall::WRITE_CR0)?;
        // EFER.NXE
        a.mov(edi, EFER_MSR)?;
        emit::syscall(a, syscall::RDMSR)?;
        a.btr(rax, 11)?;
        a.test(r13, op::NXE as i32)?;
        a.jz(nxe_off)?;
        a.bts(rax, 11)?;
        a.set_label(&mut nxe_off)?;
        a.mov(rsi, rax)?;
        a.mov(edi, EFER_MSR)?;
        emit::syscall(a, syscall::WRMSR)?;

        a.set_label(&mut same_controls)?;
        a.lea(rdi, qword_ptr(rbx + (8 * rec::TRIPLES) as i32))?;
        a.mov(esi, 4u32)?;
        emit::syscall(a, syscall::SWAP_ENTRIES)?;
        a.mov(rdi, qword_ptr(rbx + (8 * rec::GVA) as i32))?;
        a.mov(rax, qword_ptr(rbx))?;
        a.and(eax, 7u32)?;
        for (value, label) in ops.iter().enumerate() {
            a.cmp(eax, value as u32)?;
            a.je(*label)?;
        }
        a.jmp(recover)?;

        let value_slot = qword_ptr(rbx + (8 * rec::VALUE) as i32);
        // User read, write, fetch, none.
        a.set_label(&mut ops[op::READ as usize])?;
        a.mov(rax, qword_ptr(rdi))?;
        a.mov(value_slot, rax)?;
        a.jmp(recover)?;
        a.set_label(&mut ops[op::WRITE as usize])?;
        a.mov(qword_ptr(rdi), r15)?;
        a.jmp(recover)?;
        a.set_label(&mut ops[op::FETCH as usize])?;
        a.call(rdi)?;
        a.jmp(recover)?;
        a.set_label(&mut ops[op::NONE as usize])?;
        a.jmp(recover)?;
        // Kernel read, write, fetch (through system calls); 7 is unused.
        a.set_label(&mut ops[(op::CPL0 | op::READ) as usize])?;
        emit::syscall(a, syscall::LOAD)?;
        a.mov(value_slot, rax)?;
        a.jmp(recover)?;
        a.set_label(&mut ops[(op::CPL0 | op::WRITE) as usize])?;
        a.mov(rsi, r15)?;
        emit::syscall(a, syscall::STORE)?;
        a.jmp(recover)?;
        a.set_label(&mut ops[(op::CPL0 | op::FETCH) as usize])?;
        emit::syscall(a, syscall::CALL)?;
        a.jmp(recover)?;
        a.set_label(&mut ops[7])?;
        a.jmp(recover)?;

        a.set_label(&mut recover)?;
        a.mov(rsp, rbp)?;
        a.add(rbx, RECORD_BYTES as i32)?;
        a.inc(r15)?;
        a.dec(r12)?;
        a.jnz(next)?;
        emit::exit(a, 0)
    })
}

/// Prints a summary the way the `mmu-vmm conformance` command does.
pub fn print(summary: &Summary, json: bool) {
    if json {
        let mismatches: Vec<String> = summary
            .mismatches
            .iter()
            .take(100)
            .map(|m| crate::json::string(&m.to_string()))
            .collect();
        let skipped: Vec<String> = summary
            .skipped
            .iter()
            .map(|(levels, why)| {
                format!(
                    "{{\"levels\": {levels}, \"reason\": {}}}",
                    crate::json::string(why)
                )
            })
            .collect();
        println!(
            "{{\"cases\": {}, \"mismatches\": {}, \"faults\": {}, \"elapsed_s\": {:.3}, \"skipped\": [{}], \"first_mismatches\": [{}], \"checks\": [{{\"what\": \"walker matches KVM\", \"ok\": {}}}]}}",
            summary.cases,
            summary.mismatches.len(),
            summary.faults,
            summary.elapsed.as_secs_f64(),
            skipped.join(", "),
            mismatches.join(", "),
            summary.mismatches.is_empty()
        );
    } else {
        for m in &summary.mismatches {
            println!("mismatch: {m}");
        }
        for (levels, why) in &summary.skipped {
            println!("skipped {levels}-level paging: {why}");
        }
        println!(
            "conformance: {} cases ({} of them faulted on KVM) in {}",
            summary.cases,
            summary.faults,
            crate::units::duration(summary.elapsed)
        );
        if summary.mismatches.is_empty() {
            println!("walker matches KVM: ok");
        } else {
            println!(
                "walker matches KVM: FAILED ({} mismatches)",
                summary.mismatches.len()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runner_assembles() {
        let p = runner().unwrap();
        assert_eq!(p.ring(), Ring::User);
    }

    #[test]
    fn generator_is_deterministic() {
        let g = Geometry {
            gva: 1 << 39,
            entry_gpa: [0x1008, 0x2000, 0x3000, 0x4000],
            tables: [0x2000, 0x3000, 0x4000],
            page_4k: 0x5000,
            page_2m: 0x20_0000,
            page_1g: 0,
            records: 0x40_0000,
        };
        let mut a = Rng(7);
        let mut b = Rng(7);
        for _ in 0..100 {
            let ca = generate(&mut a, &g, CpuFeatures::NX, 46, 4);
            let cb = generate(&mut b, &g, CpuFeatures::NX, 46, 4);
            assert_eq!(ca, cb);
            assert_eq!(ca.entries[0] & pte::ADDR & ((1 << 46) - 1), 0x2000);
        }
    }
}
