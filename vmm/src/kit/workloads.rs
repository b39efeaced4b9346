//! Ready-made guest programs.
//!
//! CPL3 workloads take their arguments in RDI, RSI, RDX, RCX, R8 and R9
//! (per vCPU, from [`VcpuArgs`](crate::VcpuArgs)), report through the
//! REPORT system call and end with EXIT 0. The CPL0 programs exist to
//! exercise the VMM's failure paths.
//!
//! The workloads of `mmu-vmm run` and `diff` keep their hot loops at CPL3
//! (on PVM, CPL0 code is emulated) and take a CR3 to load first: their
//! data lives in an address space of their own
//! ([`space`](crate::space)), whose A/D bits they set. Next to each
//! program is the host's model of what it reports, where the model is a
//! pure function; the rest of each model is in [`workload`](crate::workload).

use iced_x86::code_asm::*;

use super::abi::{FAULTED, syscall, tag};
use super::{Program, Ring, emit};
use crate::error::KitError;
use crate::layout::PAGE_SIZE;

/// Loads the CR3 in `reg` (if not 0) with the LOAD_CR3 system call;
/// preserves every register but RAX and R11.
fn load_cr3_from(a: &mut CodeAssembler, reg: AsmRegister64) -> Result<(), IcedError> {
    let mut skip = a.create_label();
    a.test(reg, reg)?;
    a.jz(skip)?;
    a.mov(r11, rdi)?;
    a.mov(rdi, reg)?;
    emit::syscall(a, syscall::LOAD_CR3)?;
    a.mov(rdi, r11)?;
    a.set_label(&mut skip)?;
    Ok(())
}

/// Sets the program's fault handler to `label` (SET_FAULT_HANDLER);
/// clobbers RDI and RAX.
fn set_fault_handler(a: &mut CodeAssembler, label: CodeLabel) -> Result<(), IcedError> {
    a.lea(rdi, ptr(label))?;
    emit::syscall(a, syscall::SET_FAULT_HANDLER)
}

/// What [`touch`] does to each page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TouchKind {
    /// Read the first quadword of each page and add it to the checksum.
    Read,
    /// Write `address ^ seed` to the first quadword of each page and add
    /// that to the checksum.
    Write,
}

impl std::str::FromStr for TouchKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "read" => Ok(TouchKind::Read),
            "write" => Ok(TouchKind::Write),
            other => Err(format!(
                "unknown touch kind {other:?}: expected read or write"
            )),
        }
    }
}

/// `touch`: walks `pages` 4 KiB pages from `base`, `passes` times, reading
/// or writing the first quadword of each, then reports the wrapping sum
/// (tag [`tag::CHECKSUM`]).
///
/// Arguments: RDI = base (page aligned), RSI = pages, RDX = passes,
/// RCX = seed (used by [`TouchKind::Write`]), R8 = a CR3 to load first
/// (0: keep the identity tables).
pub fn touch(kind: TouchKind) -> Result<Program, KitError> {
    let name = match kind {
        TouchKind::Read => "touch-read",
        TouchKind::Write => "touch-write",
    };
    Program::assemble(name, Ring::User, |a| {
        let mut pass = a.create_label();
        let mut page = a.create_label();
        let mut done = a.create_label();
        load_cr3_from(a, r8)?;
        a.xor(r12d, r12d)?; // checksum
        a.test(rsi, rsi)?;
        a.jz(done)?;
        a.test(rdx, rdx)?;
        a.jz(done)?;
        a.set_label(&mut pass)?;
        a.mov(rbx, rdi)?;
        a.mov(r8, rsi)?;
        a.set_label(&mut page)?;
        match kind {
            TouchKind::Read => a.add(r12, qword_ptr(rbx))?,
            TouchKind::Write => {
                a.mov(rax, rbx)?;
                a.xor(rax, rcx)?;
                a.mov(qword_ptr(rbx), rax)?;
                a.add(r12, rax)?;
            }
        }
        a.add(rbx, PAGE_SIZE as i32)?;
        a.dec(r8)?;
        a.jnz(page)?;
        a.dec(rdx)?;
        a.jnz(pass)?;
        a.set_label(&mut done)?;
        a.mov(rdi, r12)?;
        emit::report_rdi(a, tag::CHECKSUM)?;
        emit::exit(a, 0)
    })
}

/// The checksum [`touch`] reports, given the value of the first quadword
/// of each page before the run (`read_first_qword(page_address)`).
pub fn touch_checksum(
    kind: TouchKind,
    base: u64,
    pages: u64,
    passes: u64,
    seed: u64,
    mut read_first_qword: impl FnMut(u64) -> u64,
) -> u64 {
    let mut one_pass = 0u64;
    for i in 0..pages {
        let address = base + i * PAGE_SIZE;
        let value = match kind {
            TouchKind::Read => read_first_qword(address),
            TouchKind::Write => address ^ seed,
        };
        one_pass = one_pass.wrapping_add(value);
    }
    one_pass.wrapping_mul(passes)
}

/// Words of a [`pt_edit`] record.
pub const PT_EDIT_RECORD_WORDS: u64 = 5;

/// One step of [`pt_edit`]: the guest's CPL0 code stores `entry` at
/// `entry_address` (a page-table entry), invalidates `address`, then the
/// program reads the quadword at `address` or writes `value` there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PtEditRecord {
    /// Guest-virtual address of the entry to store (the STORE system call).
    pub entry_address: u64,
    /// The entry's new value.
    pub entry: u64,
    /// The address accessed (and invalidated) after the store.
    pub address: u64,
    /// Write `value` there instead of reading it.
    pub write: bool,
    /// What a write stores.
    pub value: u64,
}

impl PtEditRecord {
    /// The record as the program reads it.
    pub fn words(&self) -> [u64; PT_EDIT_RECORD_WORDS as usize] {
        [
            self.entry_address,
            self.entry,
            self.address,
            u64::from(self.write),
            self.value,
        ]
    }
}

/// `pt-edit`: page-table edits made by the guest's own CPL0 code, each
/// followed by INVLPG and an access from CPL3: map, unmap, remap and
/// change rights, the way a guest kernel does.
///
/// For each [`PtEditRecord`]: STORE the entry, INVLPG the address, then
/// read (adding the value to the checksum) or write (adding the value
/// written). An access that faults is delivered to the program, which
/// counts it and goes on. Reports the checksum ([`tag::CHECKSUM`]) and
/// the faults ([`tag::FAULTS`]).
///
/// Arguments: RDI = CR3 to load, RSI = the records, RDX = their number.
pub fn pt_edit() -> Result<Program, KitError> {
    Program::assemble("pt-edit", Ring::User, |a| {
        let mut next = a.create_label();
        let mut write = a.create_label();
        let mut fault = a.create_label();
        let mut after = a.create_label();
        let mut done = a.create_label();
        a.mov(r12, rsi)?;
        a.mov(r13, rdx)?;
        a.xor(r14d, r14d)?; // checksum
        a.xor(r15d, r15d)?; // faults
        load_cr3_from(a, rdi)?;
        set_fault_handler(a, fault)?;
        a.test(r13, r13)?;
        a.jz(done)?;
        a.set_label(&mut next)?;
        a.mov(rdi, qword_ptr(r12))?;
        a.mov(rsi, qword_ptr(r12 + 8))?;
        emit::syscall(a, syscall::STORE)?;
        a.mov(rdi, qword_ptr(r12 + 16))?;
        emit::syscall(a, syscall::INVLPG)?;
        a.mov(rbx, qword_ptr(r12 + 16))?;
        a.cmp(qword_ptr(r12 + 24), 0)?;
        a.jne(write)?;
        a.mov(rax, qword_ptr(rbx))?;
        a.add(r14, rax)?;
        a.jmp(after)?;
        a.set_label(&mut write)?;
        a.mov(rax, qword_ptr(r12 + 32))?;
        a.mov(qword_ptr(rbx), rax)?;
        a.add(r14, rax)?;
        a.jmp(after)?;
        // Faults resume here, registers as at the fault.
        a.set_label(&mut fault)?;
        a.inc(r15)?;
        a.set_label(&mut after)?;
        a.add(r12, (8 * PT_EDIT_RECORD_WORDS) as i32)?;
        a.dec(r13)?;
        a.jnz(next)?;
        a.set_label(&mut done)?;
        a.mov(rdi, r14)?;
        emit::report_rdi(a, tag::CHECKSUM)?;
        a.mov(rdi, r15)?;
        emit::report_rdi(a, tag::FAULTS)?;
        emit::exit(a, 0)
    })
}

/// The value [`multi_as`] writes over `old` in address space `space`,
/// page `page`, pass `pass`.
pub fn multi_as_value(old: u64, pass: u64, space: u64, page: u64) -> u64 {
    old.rotate_left(7)
        .wrapping_add((((pass << 20) + space) << 20) + page + 1)
}

/// `multi-as`: many address spaces, switched with LOAD_CR3. Each pass
/// loads every root in turn and rewrites the first quadword of each page
/// of the window (the same guest-virtual range in every space, different
/// frames behind it) with [`multi_as_value`], adding the values to the
/// checksum ([`tag::CHECKSUM`]).
///
/// Arguments: RDI = the roots (an array of CR3 values), RSI = their
/// number, RDX = passes, RCX = the window's first page, R8 = its pages.
pub fn multi_as() -> Result<Program, KitError> {
    Program::assemble("multi-as", Ring::User, |a| {
        let mut pass = a.create_label();
        let mut space = a.create_label();
        let mut page = a.create_label();
        let mut done = a.create_label();
        a.mov(r12, rdi)?;
        a.mov(r13, rsi)?;
        a.mov(r14, rdx)?;
        a.mov(r15, rcx)?;
        a.mov(rbp, r8)?;
        a.xor(ebx, ebx)?; // checksum
        a.xor(r9d, r9d)?; // pass
        for reg in [r13, r14, rbp] {
            a.test(reg, reg)?;
            a.jz(done)?;
        }
        a.set_label(&mut pass)?;
        a.xor(r10d, r10d)?; // space
        a.set_label(&mut space)?;
        a.mov(rdi, qword_ptr(r12 + r10 * 8))?;
        emit::syscall(a, syscall::LOAD_CR3)?;
        a.mov(rcx, r15)?;
        a.xor(r11d, r11d)?; // page
        a.set_label(&mut page)?;
        a.mov(rdx, r9)?;
        a.shl(rdx, 20)?;
        a.add(rdx, r10)?;
        a.shl(rdx, 20)?;
        a.add(rdx, r11)?;
        a.inc(rdx)?;
        a.mov(rax, qword_ptr(rcx))?;
        a.rol(rax, 7)?;
        a.add(rax, rdx)?;
        a.mov(qword_ptr(rcx), rax)?;
        a.add(rbx, rax)?;
        a.add(rcx, PAGE_SIZE as i32)?;
        a.inc(r11)?;
        a.cmp(r11, rbp)?;
        a.jb(page)?;
        a.inc(r10)?;
        a.cmp(r10, r13)?;
        a.jb(space)?;
        a.inc(r9)?;
        a.cmp(r9, r14)?;
        a.jb(pass)?;
        a.set_label(&mut done)?;
        a.mov(rdi, rbx)?;
        emit::report_rdi(a, tag::CHECKSUM)?;
        emit::exit(a, 0)
    })
}

/// Words of an [`access_matrix`] record.
pub const ACCESS_RECORD_WORDS: u64 = 3;

/// One access of [`access_matrix`]: at which privilege and of which kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MatrixOp {
    /// A CPL3 load.
    UserRead = 0,
    /// A CPL3 store.
    UserWrite = 1,
    /// A CPL3 call (the page holds a `ret` there).
    UserFetch = 2,
    /// A CPL0 load (the LOAD system call).
    KernelRead = 4,
    /// A CPL0 store (STORE).
    KernelWrite = 5,
    /// A CPL0 call (CALL).
    KernelFetch = 6,
}

impl MatrixOp {
    /// Every access, in the order the matrix makes them on a page.
    pub const ALL: [MatrixOp; 6] = [
        MatrixOp::UserRead,
        MatrixOp::UserWrite,
        MatrixOp::UserFetch,
        MatrixOp::KernelRead,
        MatrixOp::KernelWrite,
        MatrixOp::KernelFetch,
    ];

    /// The CPL it is made at.
    pub fn cpl(self) -> u8 {
        if (self as u8) & 4 == 0 { 3 } else { 0 }
    }

    /// Read, write or fetch.
    pub fn kind(self) -> mmu_api::AccessKind {
        match (self as u8) & 3 {
            0 => mmu_api::AccessKind::Read,
            1 => mmu_api::AccessKind::Write,
            _ => mmu_api::AccessKind::Fetch,
        }
    }
}

/// `access`: a permission matrix. For each record (address, op, value),
/// the program sets its result word to [`FAULTED`], makes the access of
/// the [`MatrixOp`] (a write stores the value), and then stores the
/// result: the value read, or 0. CPL3 faults are delivered to the
/// program and CPL0 faults return FAULTED from the system call; both are
/// counted. Reports the sum of the values read ([`tag::CHECKSUM`]) and
/// the faults ([`tag::FAULTS`]).
///
/// Arguments: RDI = CR3 to load, RSI = the records, RDX = their number,
/// RCX = the result words (one per record).
pub fn access_matrix() -> Result<Program, KitError> {
    Program::assemble("access", Ring::User, |a| {
        let mut next = a.create_label();
        let mut fault = a.create_label();
        let mut kernel_fault = a.create_label();
        let mut after = a.create_label();
        let mut done = a.create_label();
        let mut ops: Vec<CodeLabel> = MatrixOp::ALL.iter().map(|_| a.create_label()).collect();
        a.mov(rbx, rsi)?;
        a.mov(r12, rdx)?;
        a.mov(r13, rcx)?;
        a.xor(r14d, r14d)?; // faults
        a.xor(r15d, r15d)?; // checksum
        load_cr3_from(a, rdi)?;
        set_fault_handler(a, fault)?;
        a.mov(rbp, rsp)?;
        a.test(r12, r12)?;
        a.jz(done)?;
        a.set_label(&mut next)?;
        a.mov(rax, FAULTED)?;
        a.mov(qword_ptr(r13), rax)?;
        a.mov(rdi, qword_ptr(rbx))?;
        a.mov(rsi, qword_ptr(rbx + 16))?;
        a.mov(rax, qword_ptr(rbx + 8))?;
        for (op, label) in MatrixOp::ALL.iter().zip(&ops) {
            a.cmp(eax, *op as u32)?;
            a.je(*label)?;
        }
        a.jmp(after)?;
        for (op, label) in MatrixOp::ALL.iter().zip(ops.iter_mut()) {
            a.set_label(label)?;
            match op {
                MatrixOp::UserRead => {
                    a.mov(rax, qword_ptr(rdi))?;
                    a.mov(qword_ptr(r13), rax)?;
                    a.add(r15, rax)?;
                    a.jmp(after)?;
                }
                MatrixOp::UserWrite => {
                    a.mov(qword_ptr(rdi), rsi)?;
                    a.mov(qword_ptr(r13), 0)?;
                    a.jmp(after)?;
                }
                MatrixOp::UserFetch => {
                    a.call(rdi)?;
                    a.mov(qword_ptr(r13), 0)?;
                    a.jmp(after)?;
                }
                MatrixOp::KernelRead | MatrixOp::KernelWrite | MatrixOp::KernelFetch => {
                    emit::syscall(
                        a,
                        match op {
                            MatrixOp::KernelRead => syscall::LOAD,
                            MatrixOp::KernelWrite => syscall::STORE,
                            _ => syscall::CALL,
                        },
                    )?;
                    a.mov(qword_ptr(r13), rax)?;
                    a.cmp(rax, -1)?;
                    a.je(kernel_fault)?;
                    if *op == MatrixOp::KernelRead {
                        a.add(r15, rax)?;
                    }
                    a.jmp(after)?;
                }
            }
        }
        // CPL3 faults resume here (a faulting call left its return
        // address on the stack: RBP has the stack as it was).
        a.set_label(&mut fault)?;
        a.mov(rsp, rbp)?;
        a.set_label(&mut kernel_fault)?;
        a.inc(r14)?;
        a.set_label(&mut after)?;
        a.add(rbx, (8 * ACCESS_RECORD_WORDS) as i32)?;
        a.add(r13, 8)?;
        a.dec(r12)?;
        a.jnz(next)?;
        a.set_label(&mut done)?;
        a.mov(rdi, r15)?;
        emit::report_rdi(a, tag::CHECKSUM)?;
        a.mov(rdi, r14)?;
        emit::report_rdi(a, tag::FAULTS)?;
        emit::exit(a, 0)
    })
}

/// The registers of the [`mmio_rr`] device, as offsets in its page.
pub mod rr_reg {
    /// Write a request id (8 bytes) to start a transaction.
    pub const DOORBELL: u64 = 0;
    /// Read (8 bytes): 0 while busy, then [`READY`] | the response, once.
    pub const STATUS: u64 = 8;
    /// The status bit that says the response is there.
    pub const READY: u64 = 1 << 63;
}

/// The response the [`mmio_rr`] device gives to request `id` (below
/// [`rr_reg::READY`]).
pub fn rr_response(id: u64) -> u64 {
    let mut z = id ^ 0x9e37_79b9_7f4a_7c15;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    (z ^ (z >> 27)) & !rr_reg::READY
}

/// Status reads the [`mmio_rr`] device answers "busy" to before the
/// response to request `id` is there.
pub fn rr_busy_reads(id: u64) -> u64 {
    id % 3
}

/// `mmio-rr`: request/response over an MMIO device, like netperf's
/// TCP_RR. Each transaction writes the request id to the doorbell, then
/// reads the status register until [`rr_reg::READY`] is set, adding the
/// response to the checksum. Reports the checksum ([`tag::CHECKSUM`]),
/// the transactions ([`tag::TRANSACTIONS`]) and the status reads
/// ([`tag::POLLS`]).
///
/// Arguments: RDI = CR3 to load, RSI = transactions, RDX = the device
/// page's guest-virtual address, RCX = the first request id (ids count up).
pub fn mmio_rr() -> Result<Program, KitError> {
    Program::assemble("mmio-rr", Ring::User, |a| {
        let mut next = a.create_label();
        let mut poll = a.create_label();
        let mut done = a.create_label();
        a.mov(r12, rsi)?;
        a.mov(r13, rdx)?;
        a.mov(r14, rcx)?;
        a.xor(r15d, r15d)?; // checksum
        a.xor(ebx, ebx)?; // polls
        a.xor(ebp, ebp)?; // transactions
        load_cr3_from(a, rdi)?;
        a.test(r12, r12)?;
        a.jz(done)?;
        a.set_label(&mut next)?;
        a.mov(qword_ptr(r13 + rr_reg::DOORBELL as i32), r14)?;
        a.set_label(&mut poll)?;
        a.inc(rbx)?;
        a.mov(rax, qword_ptr(r13 + rr_reg::STATUS as i32))?;
        // READY is the sign bit.
        a.test(rax, rax)?;
        a.jns(poll)?;
        a.btr(rax, 63)?;
        a.add(r15, rax)?;
        a.inc(rbp)?;
        a.inc(r14)?;
        a.dec(r12)?;
        a.jnz(next)?;
        a.set_label(&mut done)?;
        a.mov(rdi, r15)?;
        emit::report_rdi(a, tag::CHECKSUM)?;
        a.mov(rdi, rbp)?;
        emit::report_rdi(a, tag::TRANSACTIONS)?;
        a.mov(rdi, rbx)?;
        emit::report_rdi(a, tag::POLLS)?;
        emit::exit(a, 0)
    })
}

/// The generator of [`dirty`] (Knuth's MMIX LCG).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Lcg(pub u64);

impl Lcg {
    /// The multiplier.
    pub const A: u64 = 6_364_136_223_846_793_005;
    /// The increment.
    pub const C: u64 = 1_442_695_040_888_963_407;

    /// Steps the state and returns it.
    pub fn next_value(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(Self::A).wrapping_add(Self::C);
        self.0
    }
}

/// Where [`dirty`] writes the LCG state `x`, as (page index, byte offset)
/// in a window of `pages` pages.
pub fn dirty_target(x: u64, pages: u64) -> (u64, u64) {
    (((x >> 32) * pages) >> 32, (x >> 16) & 0xff8)
}

/// `dirty`: pseudo-random writes. Steps an [`Lcg`] `writes` times and
/// stores its state at [`dirty_target`] in the window, adding it to the
/// checksum ([`tag::CHECKSUM`]).
///
/// Arguments: RDI = CR3 to load, RSI = the window's first page, RDX = its
/// pages (below 2^32), RCX = writes, R8 = the LCG's seed.
pub fn dirty() -> Result<Program, KitError> {
    Program::assemble("dirty", Ring::User, |a| {
        let mut next = a.create_label();
        let mut done = a.create_label();
        a.mov(r12, rsi)?;
        a.mov(r13, rdx)?;
        a.mov(r14, rcx)?;
        a.mov(r15, r8)?;
        a.xor(ebx, ebx)?; // checksum
        load_cr3_from(a, rdi)?;
        a.test(r14, r14)?;
        a.jz(done)?;
        a.test(r13, r13)?;
        a.jz(done)?;
        a.mov(rbp, Lcg::A)?;
        a.mov(r9, Lcg::C)?;
        a.set_label(&mut next)?;
        a.imul_2(r15, rbp)?;
        a.add(r15, r9)?;
        a.mov(rax, r15)?;
        a.shr(rax, 32)?;
        a.imul_2(rax, r13)?;
        a.shr(rax, 32)?;
        a.shl(rax, 12)?;
        a.add(rax, r12)?;
        a.mov(rdx, r15)?;
        a.shr(rdx, 16)?;
        a.and(edx, 0xff8)?;
        a.mov(qword_ptr(rax + rdx), r15)?;
        a.add(rbx, r15)?;
        a.dec(r14)?;
        a.jnz(next)?;
        a.set_label(&mut done)?;
        a.mov(rdi, rbx)?;
        emit::report_rdi(a, tag::CHECKSUM)?;
        emit::exit(a, 0)
    })
}

/// The words the host and the [`stress()`] program share.
///
/// The host publishes a control word (one per vCPU, one atomic store
/// each): the harvest epoch, the placement generation of the stress
/// memslot (bumped by every add, move and delete) and where the slot is.
/// Every page of the slot holds, at byte 8, an identity word the host
/// writes before it publishes a placement: [`identity`](stress::identity)
/// of that placement. A guest read that the host must answer as MMIO (no
/// memslot there) returns [`ABSENT`](stress::ABSENT).
pub mod stress {
    /// Bit of the control word that ends the program.
    pub const STOP: u64 = 1 << 63;
    /// Bits of the control word that hold the epoch.
    pub const EPOCH_MASK: u64 = 0xff_ffff;
    /// Bits of the control word (and of an identity word) that hold the
    /// placement generation.
    pub const PLACEMENT_MASK: u64 = 0xff_ffff << 24;
    /// The high bits of every identity word.
    pub const IDENTITY_MAGIC: u64 = 0x1de7 << 48;
    /// What the VMM answers to a read where no memslot is.
    pub const ABSENT: u64 = 0xab5e_0000_ab5e_0000;
    /// The program probes the other location every this many iterations
    /// (plus one).
    pub const PROBE_MASK: u32 = 63;
    /// Bit 63 of the page word of a bad-read record: it was a probe of
    /// the other location.
    pub const PROBE_BIT: u64 = 1 << 63;

    /// Where the stress memslot is, as the control word says.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub enum State {
        /// At its first location (window A).
        AtA = 0,
        /// At its second location (window B).
        AtB = 1,
        /// Deleted: every access is MMIO.
        Absent = 2,
        /// The host is changing it: reads are not judged.
        Changing = 3,
    }

    /// The control word.
    pub const fn control(epoch: u64, placement: u64, state: State) -> u64 {
        (epoch & EPOCH_MASK) | ((placement << 24) & PLACEMENT_MASK) | ((state as u64) << 48)
    }

    /// The identity word of every page of the slot while placement
    /// `placement` has it at `state` ([`State::AtA`] or [`State::AtB`]).
    pub const fn identity(placement: u64, state: State) -> u64 {
        IDENTITY_MAGIC | ((placement << 24) & PLACEMENT_MASK) | state as u64
    }

    /// The epoch of a tag the program wrote (0: never written).
    pub const fn tag_epoch(tag: u64) -> u64 {
        tag >> 40
    }
}

/// `stress`: writes and checked reads while the host deletes, re-adds
/// and moves the memslot underneath and harvests its dirty log.
///
/// Each iteration reads the control word (stopping at
/// [`stress::STOP`]), picks the window of the slot's current location (A
/// unless the word says B), and in page `i` of it (round robin) reads the
/// identity word at byte 8 and writes the tag `(epoch << 40) + iteration`
/// at byte 0. It then reads the control word again: if it changed, the
/// read is not judged (counted as unchecked). Otherwise the read must be
/// exactly the identity of the published placement (slot present) or
/// [`stress::ABSENT`] (slot deleted); anything else is a stale or wrong
/// read. Every [`stress::PROBE_MASK`] + 1 iterations, with the slot
/// present, it also reads the same page through the other window, which
/// must be [`stress::ABSENT`]. A bad read is counted and recorded at
/// words 1 to 3 of the control page (control word, value read, page
/// index with [`stress::PROBE_BIT`] for a probe).
///
/// Reports [`tag::WRITES`], [`tag::READS_CHECKED`], [`tag::STALE`],
/// [`tag::ABSENT`] and [`tag::UNCHECKED`].
///
/// Arguments: RDI = CR3 to load, RSI = the control page, RDX = window A,
/// RCX = window B, R8 = pages.
pub fn stress() -> Result<Program, KitError> {
    Program::assemble("stress", Ring::User, |a| {
        let mut top = a.create_label();
        let mut absent = a.create_label();
        let mut bad = a.create_label();
        let mut unchecked = a.create_label();
        let mut probe = a.create_label();
        let mut other_a = a.create_label();
        let mut bad_probe = a.create_label();
        let mut next = a.create_label();
        let mut done = a.create_label();
        a.mov(r12, rsi)?;
        a.mov(r13, rdx)?;
        a.mov(r14, rcx)?;
        a.mov(r15, r8)?;
        load_cr3_from(a, rdi)?;
        a.xor(ebx, ebx)?; // page
        a.xor(ebp, ebp)?; // iteration
        a.xor(r8d, r8d)?; // checked reads
        a.xor(r9d, r9d)?; // bad reads
        a.xor(r10d, r10d)?; // absent reads
        a.xor(r11d, r11d)?; // unchecked reads
        a.test(r15, r15)?;
        a.jz(done)?;
        a.set_label(&mut top)?;
        a.mov(rsi, qword_ptr(r12))?;
        a.bt(rsi, 63)?;
        a.jc(done)?;
        a.mov(rax, rsi)?;
        a.shr(rax, 48)?;
        a.and(eax, 3)?; // state
        a.mov(rcx, r13)?;
        a.cmp(eax, stress::State::AtB as u32)?;
        a.cmove(rcx, r14)?;
        a.mov(rdx, rbx)?;
        a.shl(rdx, 12)?;
        a.add(rcx, rdx)?;
        a.mov(rdx, qword_ptr(rcx + 8))?; // identity
        a.mov(rdi, rsi)?;
        a.shl(rdi, 40)?;
        a.add(rdi, rbp)?;
        a.mov(qword_ptr(rcx), rdi)?; // tag
        a.cmp(rsi, qword_ptr(r12))?;
        a.jne(unchecked)?;
        a.cmp(eax, stress::State::Absent as u32)?;
        a.je(absent)?;
        a.ja(unchecked)?;
        a.mov(rdi, stress::PLACEMENT_MASK)?;
        a.and(rdi, rsi)?;
        a.or(rdi, rax)?;
        a.mov(rcx, stress::IDENTITY_MAGIC)?;
        a.or(rdi, rcx)?;
        a.cmp(rdx, rdi)?;
        a.jne(bad)?;
        a.inc(r8)?;
        a.jmp(probe)?;
        a.set_label(&mut absent)?;
        a.mov(rcx, stress::ABSENT)?;
        a.cmp(rdx, rcx)?;
        a.jne(bad)?;
        a.inc(r8)?;
        a.inc(r10)?;
        a.jmp(next)?;
        a.set_label(&mut bad)?;
        a.inc(r9)?;
        a.mov(qword_ptr(r12 + 8), rsi)?;
        a.mov(qword_ptr(r12 + 16), rdx)?;
        a.mov(qword_ptr(r12 + 24), rbx)?;
        a.jmp(next)?;
        a.set_label(&mut unchecked)?;
        a.inc(r11)?;
        a.jmp(next)?;
        // The slot is present (state A or B in EAX): the other window
        // must be MMIO.
        a.set_label(&mut probe)?;
        a.test(ebp, stress::PROBE_MASK)?;
        a.jnz(next)?;
        a.mov(rcx, r14)?;
        a.test(eax, eax)?;
        a.jz(other_a)?;
        a.mov(rcx, r13)?;
        a.set_label(&mut other_a)?;
        a.mov(rdx, rbx)?;
        a.shl(rdx, 12)?;
        a.add(rcx, rdx)?;
        a.mov(rdx, qword_ptr(rcx + 8))?;
        a.cmp(rsi, qword_ptr(r12))?;
        a.jne(unchecked)?;
        a.mov(rcx, stress::ABSENT)?;
        a.cmp(rdx, rcx)?;
        a.jne(bad_probe)?;
        a.inc(r8)?;
        a.inc(r10)?;
        a.jmp(next)?;
        a.set_label(&mut bad_probe)?;
        a.inc(r9)?;
        a.mov(qword_ptr(r12 + 8), rsi)?;
        a.mov(qword_ptr(r12 + 16), rdx)?;
        a.mov(rdi, stress::PROBE_BIT)?;
        a.or(rdi, rbx)?;
        a.mov(qword_ptr(r12 + 24), rdi)?;
        a.set_label(&mut next)?;
        a.inc(rbp)?;
        a.inc(rbx)?;
        a.cmp(rbx, r15)?;
        a.jb(top)?;
        a.xor(ebx, ebx)?;
        a.jmp(top)?;
        a.set_label(&mut done)?;
        // Counters out of the registers a system call may use.
        a.mov(r13, r11)?;
        a.mov(r14, r10)?;
        a.mov(r15, r9)?;
        a.mov(r12, r8)?;
        a.mov(rdi, rbp)?;
        emit::report_rdi(a, tag::WRITES)?;
        a.mov(rdi, r12)?;
        emit::report_rdi(a, tag::READS_CHECKED)?;
        a.mov(rdi, r15)?;
        emit::report_rdi(a, tag::STALE)?;
        a.mov(rdi, r14)?;
        emit::report_rdi(a, tag::ABSENT)?;
        a.mov(rdi, r13)?;
        emit::report_rdi(a, tag::UNCHECKED)?;
        emit::exit(a, 0)
    })
}

/// `spin`: a CPL3 busy loop that never ends by itself.
pub fn spin() -> Result<Program, KitError> {
    Program::assemble("spin", Ring::User, |a| {
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.pause()?;
        a.jmp(top)
    })
}

/// What [`access`] does at its address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AccessOp {
    /// Load the quadword and report it (tag [`tag::VALUE`]).
    Read,
    /// Store RSI there.
    Write,
    /// Call it (the code there must return).
    Fetch,
}

/// `access`: one CPL3 access at RDI (storing RSI for a write), then EXIT 0.
/// Used to provoke a #PF the VMM must see.
pub fn access(op: AccessOp) -> Result<Program, KitError> {
    Program::assemble("access", Ring::User, |a| {
        match op {
            AccessOp::Read => {
                a.mov(rdi, qword_ptr(rdi))?;
                emit::report_rdi(a, tag::VALUE)?;
            }
            AccessOp::Write => a.mov(qword_ptr(rdi), rsi)?,
            AccessOp::Fetch => a.call(rdi)?,
        }
        emit::exit(a, 0)
    })
}

/// `remap`: the kernel stores RSI at RDI (a page-table entry, through the
/// STORE system call), invalidates the page at RDX (INVLPG), then the
/// program reads the quadword at RDX and reports it (tag [`tag::VALUE`]).
/// With a not-present entry the read takes a #PF: the test that page-table
/// edits made by guest CPL0 code reach the CPL3 walk.
pub fn remap() -> Result<Program, KitError> {
    Program::assemble("remap", Ring::User, |a| {
        a.mov(rbx, rdx)?;
        emit::syscall(a, syscall::STORE)?;
        a.mov(rdi, rbx)?;
        emit::syscall(a, syscall::INVLPG)?;
        a.mov(rdi, qword_ptr(rbx))?;
        emit::report_rdi(a, tag::VALUE)?;
        emit::exit(a, 0)
    })
}

/// `paging-calls`: READ_CR3, LOAD_CR3 of that value, INVLPG of RDI,
/// FLUSH_TLB, then reports CR3 (tag [`tag::VALUE`]) and a read of the
/// quadword at RDI (tag [`tag::CHECKSUM`]). Exercises every page-table
/// system call under either [`PagingOps`](super::PagingOps).
pub fn paging_calls() -> Result<Program, KitError> {
    Program::assemble("paging-calls", Ring::User, |a| {
        a.mov(rbx, rdi)?;
        emit::syscall(a, syscall::READ_CR3)?;
        a.mov(r12, rax)?;
        a.mov(rdi, rax)?;
        emit::syscall(a, syscall::LOAD_CR3)?;
        a.mov(rdi, rbx)?;
        emit::syscall(a, syscall::INVLPG)?;
        emit::syscall(a, syscall::FLUSH_TLB)?;
        a.mov(rdi, r12)?;
        emit::report_rdi(a, tag::VALUE)?;
        a.mov(rdi, qword_ptr(rbx))?;
        emit::report_rdi(a, tag::CHECKSUM)?;
        emit::exit(a, 0)
    })
}

/// `port-out`: CPL0 program that writes AL to the port in DI.
pub fn port_out() -> Result<Program, KitError> {
    Program::assemble("port-out", Ring::Kernel, |a| {
        a.mov(edx, edi)?;
        a.out(dx, al)?;
        emit::hypercall(a, super::abi::hypercall::DONE)
    })
}

/// `triple-fault`: CPL0 program that points RSP at the unmapped page 0 and
/// executes UD2. Delivering the #UD needs the stack, which raises #PF;
/// delivering that raises #DF, whose delivery fails too: a shutdown.
pub fn triple_fault() -> Result<Program, KitError> {
    Program::assemble("triple-fault", Ring::Kernel, |a| {
        a.mov(esp, PAGE_SIZE as u32)?;
        a.ud2()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workloads_assemble() {
        for p in [
            touch(TouchKind::Read).unwrap(),
            touch(TouchKind::Write).unwrap(),
            spin().unwrap(),
            access(AccessOp::Read).unwrap(),
            access(AccessOp::Write).unwrap(),
            access(AccessOp::Fetch).unwrap(),
            remap().unwrap(),
            paging_calls().unwrap(),
            pt_edit().unwrap(),
            multi_as().unwrap(),
            access_matrix().unwrap(),
            mmio_rr().unwrap(),
            dirty().unwrap(),
            stress().unwrap(),
        ] {
            assert_eq!(p.ring(), Ring::User, "{}", p.name());
            assert!(!p.code().is_empty());
        }
        assert_eq!(port_out().unwrap().ring(), Ring::Kernel);
        assert_eq!(triple_fault().unwrap().ring(), Ring::Kernel);
    }

    #[test]
    fn touch_checksum_model() {
        let w = touch_checksum(TouchKind::Write, 0x1000, 2, 3, 0xff, |_| 0);
        assert_eq!(w, 3 * ((0x1000 ^ 0xff) + (0x2000 ^ 0xff)));
        let r = touch_checksum(TouchKind::Read, 0x1000, 2, 1, 0, |a| a * 2);
        assert_eq!(r, 0x2000 + 0x4000);
        assert_eq!(touch_checksum(TouchKind::Read, 0, 0, 5, 0, |_| 1), 0);
    }

    #[test]
    fn small_models() {
        // The LCG and where dirty writes land.
        let mut lcg = Lcg(1);
        assert_eq!(lcg.next_value(), Lcg::A.wrapping_add(Lcg::C));
        for x in [0, u64::MAX, 0x1234_5678_9abc_def0] {
            let (page, offset) = dirty_target(x, 7);
            assert!(page < 7);
            assert!(offset <= PAGE_SIZE - 8 && offset % 8 == 0);
        }
        assert_eq!(dirty_target(u64::MAX, 7).0, 6);
        // Responses never carry READY; busy reads cycle 0, 1, 2.
        for id in 0..100 {
            assert_eq!(rr_response(id) & rr_reg::READY, 0);
        }
        assert_ne!(rr_response(1), rr_response(2));
        assert_eq!((rr_busy_reads(3), rr_busy_reads(4)), (0, 1));
        // multi-as keys differ by pass, space and page.
        let v = |p, s, g| multi_as_value(0, p, s, g);
        assert_ne!(v(0, 0, 1), v(0, 1, 0));
        assert_ne!(v(1, 0, 0), v(0, 1, 0));
        assert_eq!(v(0, 0, 0), 1);
        // The matrix ops decode to their CPL and kind.
        assert_eq!(MatrixOp::UserFetch.cpl(), 3);
        assert_eq!(MatrixOp::KernelWrite.cpl(), 0);
        assert_eq!(MatrixOp::KernelWrite.kind(), mmu_api::AccessKind::Write);
        assert_eq!(MatrixOp::UserFetch.kind(), mmu_api::AccessKind::Fetch);
        let record = PtEditRecord {
            entry_address: 1,
            entry: 2,
            address: 3,
            write: true,
            value: 5,
        };
        assert_eq!(record.words(), [1, 2, 3, 1, 5]);
        // Stress words: the identity the program expects is the one the
        // host writes; the absent marker is no identity and no tag.
        use stress::State;
        let c = stress::control(7, 3, State::AtB);
        assert_eq!(c & stress::EPOCH_MASK, 7);
        assert_eq!(
            stress::IDENTITY_MAGIC | (c & stress::PLACEMENT_MASK) | ((c >> 48) & 3),
            stress::identity(3, State::AtB)
        );
        assert_ne!(
            stress::identity(3, State::AtA),
            stress::identity(3, State::AtB)
        );
        assert_ne!(
            stress::identity(3, State::AtA),
            stress::identity(4, State::AtA)
        );
        assert_ne!(
            stress::ABSENT & stress::IDENTITY_MAGIC,
            stress::IDENTITY_MAGIC
        );
        assert_eq!(stress::tag_epoch((c << 40) + 12345), 7);
        assert_eq!(stress::control(1, 1, State::AtA) & stress::STOP, 0);
    }
}
