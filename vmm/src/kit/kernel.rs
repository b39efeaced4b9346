//! The guest kit's CPL0 kernel.

use iced_x86::code_asm::*;
use iced_x86::{BlockEncoderOptions, IcedError};

use super::PagingOps;
use super::abi::{self, action, hypercall, percpu, syscall};
use crate::error::KitError;
use crate::layout::{
    KERNEL_AREA_SIZE, KERNEL_CODE_GPA, KERNEL_CODE_SIZE, PAGE_SIZE, REPLAY_QUEUE_OFFSET,
};
use crate::x86::{RFLAGS_FIXED, SEL_USER_CODE, SEL_USER_DATA, vector_has_error_code};

/// The assembled kernel and the addresses the VMM needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kernel {
    ops: PagingOps,
    code: Vec<u8>,
    enter_user: u64,
    syscall_entry: u64,
    fault_return: u64,
    call_fault_return: u64,
    load_access: u64,
    store_access: u64,
    call_return: u64,
    vectors: Vec<u64>,
    restart: ReplayRestart,
}

/// Addresses in the kernel's return path and replay routine a VMM needs to
/// queue replay work safely while a vCPU is in the kernel (see
/// [`Kernel::replay_restart`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplayRestart {
    /// The start of the return path's check.
    pub check: u64,
    /// The instruction after the `push rdx` that opens the check.
    pub after_push: u64,
    /// The `pop rdx` after both words were read.
    pub pop: u64,
    /// The conditional jump after it.
    pub jump: u64,
    /// The `iretq`.
    pub iretq: u64,
    /// The replay routine: `[start, end)`.
    pub routine: std::ops::Range<u64>,
    /// Every CR3 reload in the kernel: (the read of CR3, its write back).
    pub cr3_reloads: Vec<(u64, u64)>,
}

impl ReplayRestart {
    /// Where a vCPU at CPL0 with RIP `rip` must resume after the VMM queued
    /// replay work, so that the work is done before the kernel returns:
    /// the check again if the vCPU already read the words, else `rip`.
    pub fn restart_rip(&self, rip: u64) -> u64 {
        if rip == self.pop {
            self.after_push
        } else if rip == self.jump || rip == self.iretq {
            self.check
        } else {
            rip
        }
    }

    /// Where a vCPU at CPL0 with RIP `rip` must resume after the VMM gave
    /// it a new CR3: the read of CR3 again if it is about to write back
    /// the value it read before, which is the old root. `None` elsewhere.
    pub fn cr3_reload_restart(&self, rip: u64) -> Option<u64> {
        self.cr3_reloads
            .iter()
            .find(|&&(_, write)| write == rip)
            .map(|&(read, _)| read)
    }

    /// True if `rip` is inside the replay routine, which is reading the
    /// queue: new work must go through `REPLAY_PENDING`.
    pub fn in_routine(&self, rip: u64) -> bool {
        self.routine.contains(&rip)
    }
}

/// What the shadow hosting of `mmu-integration` needs to know about the
/// kit's kernel: these restart points, and the kit's system calls
/// ([`abi::syscall_entry_pending`]).
impl mmu_integration::shadow_host::PvKernel for ReplayRestart {
    fn replay_restart_rip(&self, rip: u64) -> u64 {
        self.restart_rip(rip)
    }

    fn cr3_reload_restart(&self, rip: u64) -> Option<u64> {
        ReplayRestart::cr3_reload_restart(self, rip)
    }

    fn in_replay_routine(&self, rip: u64) -> bool {
        self.in_routine(rip)
    }

    fn syscall_bytes_len(&self) -> usize {
        abi::syscall_bytes(0).len()
    }

    fn syscall_entry_pending(&self, before_rip: &[u8], regs: &kvm_bindings::kvm_regs) -> bool {
        abi::syscall_entry_pending(before_rip, regs.rax, regs.rflags)
    }
}

/// Labels of the kernel's shared routines.
struct Labels {
    replay: CodeLabel,
    replay_end: CodeLabel,
    exc_common: CodeLabel,
    fault_return: CodeLabel,
    call_fault_return: CodeLabel,
    ret_user: CodeLabel,
    after_push: CodeLabel,
    pop: CodeLabel,
    jump: CodeLabel,
    iretq: CodeLabel,
    load_access: CodeLabel,
    store_access: CodeLabel,
    call_return: CodeLabel,
    /// The `mov cr3, rdx` of each CR3 reload (the 3-byte `mov rdx, cr3`
    /// is right before it).
    cr3_writes: Vec<CodeLabel>,
}

impl Kernel {
    /// Assembles the kernel at [`KERNEL_CODE_GPA`] with `ops` deciding how it
    /// loads CR3, invalidates and flushes.
    pub fn assemble(ops: PagingOps) -> Result<Kernel, KitError> {
        let asm_error = |source| KitError::Asm {
            what: "the kernel".to_string(),
            source,
        };
        let mut a = CodeAssembler::new(64).map_err(asm_error)?;
        let mut labels = Labels {
            replay: a.create_label(),
            replay_end: a.create_label(),
            exc_common: a.create_label(),
            fault_return: a.create_label(),
            call_fault_return: a.create_label(),
            ret_user: a.create_label(),
            after_push: a.create_label(),
            pop: a.create_label(),
            jump: a.create_label(),
            iretq: a.create_label(),
            load_access: a.create_label(),
            store_access: a.create_label(),
            call_return: a.create_label(),
            cr3_writes: Vec::new(),
        };

        let mut enter_user = a.create_label();
        a.set_label(&mut enter_user).map_err(asm_error)?;
        emit_enter_user(&mut a, &labels).map_err(asm_error)?;

        let mut syscall_entry = a.create_label();
        a.set_label(&mut syscall_entry).map_err(asm_error)?;
        emit_syscalls(&mut a, ops, &mut labels).map_err(asm_error)?;

        let mut stubs = Vec::with_capacity(256);
        for vector in 0..=255u8 {
            if vector == abi::SYSCALL_VECTOR {
                stubs.push(None);
                continue;
            }
            let mut stub = a.create_label();
            a.set_label(&mut stub).map_err(asm_error)?;
            if vector == abi::REPLAY_VECTOR {
                // Straight to the return path, which runs the queue.
                a.jmp(labels.ret_user).map_err(asm_error)?;
                stubs.push(Some(stub));
                continue;
            }
            if !vector_has_error_code(vector) {
                a.push(0).map_err(asm_error)?;
            }
            a.push(i32::from(vector)).map_err(asm_error)?;
            a.jmp(labels.exc_common).map_err(asm_error)?;
            stubs.push(Some(stub));
        }
        emit_exception_common(&mut a, &mut labels).map_err(asm_error)?;
        emit_return(&mut a, &mut labels).map_err(asm_error)?;
        emit_replay(&mut a, &mut labels).map_err(asm_error)?;

        let result = a
            .assemble_options(
                KERNEL_CODE_GPA,
                BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
            )
            .map_err(asm_error)?;
        let code = result.inner.code_buffer.clone();
        if code.len() as u64 > KERNEL_CODE_SIZE {
            return Err(KitError::TooLarge {
                what: "the kernel".to_string(),
                size: code.len(),
                limit: KERNEL_CODE_SIZE as usize,
            });
        }
        let syscall_entry = result.label_ip(&syscall_entry).map_err(asm_error)?;
        let ip = |label: &CodeLabel| result.label_ip(label).map_err(asm_error);
        let restart = ReplayRestart {
            check: ip(&labels.ret_user)?,
            after_push: ip(&labels.after_push)?,
            pop: ip(&labels.pop)?,
            jump: ip(&labels.jump)?,
            iretq: ip(&labels.iretq)?,
            routine: ip(&labels.replay)?..ip(&labels.replay_end)?,
            cr3_reloads: labels
                .cr3_writes
                .iter()
                .map(|write| Ok((ip(write)? - MOV_RDX_CR3_LEN, ip(write)?)))
                .collect::<Result<_, KitError>>()?,
        };
        let mut vectors = Vec::with_capacity(256);
        for stub in &stubs {
            vectors.push(match stub {
                Some(label) => result.label_ip(label).map_err(asm_error)?,
                None => syscall_entry,
            });
        }
        Ok(Kernel {
            ops,
            enter_user: result.label_ip(&enter_user).map_err(asm_error)?,
            fault_return: result.label_ip(&labels.fault_return).map_err(asm_error)?,
            call_fault_return: result
                .label_ip(&labels.call_fault_return)
                .map_err(asm_error)?,
            load_access: result.label_ip(&labels.load_access).map_err(asm_error)?,
            store_access: result.label_ip(&labels.store_access).map_err(asm_error)?,
            call_return: result.label_ip(&labels.call_return).map_err(asm_error)?,
            syscall_entry,
            vectors,
            code,
            restart,
        })
    }

    /// The return path's and replay routine's addresses (see
    /// [`ReplayRestart`]).
    pub fn replay_restart(&self) -> &ReplayRestart {
        &self.restart
    }

    /// How this kernel implements the page-table operations.
    pub fn ops(&self) -> PagingOps {
        self.ops
    }

    /// The machine code, to be loaded at [`KERNEL_CODE_GPA`].
    pub fn code(&self) -> &[u8] {
        &self.code
    }

    /// Where a vCPU starts to enter a CPL3 program: R12 = program entry,
    /// R13 = user stack top; RDI, RSI, RDX, RCX, R8, R9 pass through.
    pub fn enter_user(&self) -> u64 {
        self.enter_user
    }

    /// The system-call entry (the gate of [`abi::SYSCALL_VECTOR`]).
    pub fn syscall_entry(&self) -> u64 {
        self.syscall_entry
    }

    /// Where the VMM resumes (with [`action::REDIRECT`]) a LOAD or STORE
    /// system call whose CPL0 access faulted: the call returns
    /// [`abi::FAULTED`].
    pub fn fault_return(&self) -> u64 {
        self.fault_return
    }

    /// Like [`fault_return`](Self::fault_return), for a CALL system call
    /// whose fetch faulted (it also drops the pushed return address).
    pub fn call_fault_return(&self) -> u64 {
        self.call_fault_return
    }

    /// Where a #PF taken at CPL0 by the access of a LOAD, STORE or CALL
    /// system call resumes ([`fault_return`](Self::fault_return) or
    /// [`call_fault_return`](Self::call_fault_return)), or None if the
    /// fault is not one of those. `rip` and `fault_address` (CR2) are the fault's,
    /// `stack_top` the word at the interrupted RSP (a CALL's fetch fault
    /// has the kernel's return address there). Lets a VMM hand such a fault
    /// to the program (the call returns [`abi::FAULTED`]) instead of ending
    /// the run.
    pub fn cpl0_fault_resume(&self, rip: u64, fault_address: u64, stack_top: u64) -> Option<u64> {
        if rip == self.load_access || rip == self.store_access {
            Some(self.fault_return)
        } else if rip == fault_address && stack_top == self.call_return {
            Some(self.call_fault_return)
        } else {
            None
        }
    }

    /// The handler address of IDT vector `vector`.
    pub fn vector_handler(&self, vector: u8) -> u64 {
        self.vectors[usize::from(vector)]
    }
}

/// `enter_user`: build an iret frame from R12/R13 and drop to CPL3.
fn emit_enter_user(a: &mut CodeAssembler, labels: &Labels) -> Result<(), IcedError> {
    a.push(i32::from(SEL_USER_DATA))?;
    a.push(r13)?;
    a.push(RFLAGS_FIXED as i32)?;
    a.push(i32::from(SEL_USER_CODE))?;
    a.push(r12)?;
    a.xor(r12d, r12d)?;
    a.xor(r13d, r13d)?;
    a.jmp(labels.ret_user)
}

/// The system-call dispatcher and its handlers.
fn emit_syscalls(
    a: &mut CodeAssembler,
    ops: PagingOps,
    labels: &mut Labels,
) -> Result<(), IcedError> {
    let mut exit = a.create_label();
    let mut report = a.create_label();
    let mut load_cr3 = a.create_label();
    let mut invlpg = a.create_label();
    let mut flush = a.create_label();
    let mut read_cr3 = a.create_label();
    let mut call = a.create_label();
    let mut swap = a.create_label();
    let mut read_cr0 = a.create_label();
    let mut write_cr0 = a.create_label();
    let mut rdmsr = a.create_label();
    let mut wrmsr = a.create_label();
    let mut set_fault = a.create_label();
    let mut unknown = a.create_label();

    // CF set in the frame says "entry not made yet" to the VMM
    // (`abi::syscall_entry_pending`); every return clears it.
    a.and(qword_ptr(rsp + 16), -2)?;

    // Most frequent first: REPORT, then the page-table operations.
    let table = [
        (syscall::REPORT, report),
        (syscall::STORE, labels.store_access),
        (syscall::INVLPG, invlpg),
        (syscall::LOAD_CR3, load_cr3),
        (syscall::FLUSH_TLB, flush),
        (syscall::LOAD, labels.load_access),
        (syscall::SWAP_ENTRIES, swap),
        (syscall::CALL, call),
        (syscall::READ_CR3, read_cr3),
        (syscall::READ_CR0, read_cr0),
        (syscall::WRITE_CR0, write_cr0),
        (syscall::RDMSR, rdmsr),
        (syscall::WRMSR, wrmsr),
        (syscall::SET_FAULT_HANDLER, set_fault),
        (syscall::EXIT, exit),
    ];
    for (number, label) in table {
        a.cmp(rax, number as i32)?;
        a.je(label)?;
    }
    a.jmp(unknown)?;

    a.set_label(&mut report)?;
    a.push(rdx)?;
    super::emit::hypercall(a, hypercall::REPORT)?;
    a.pop(rdx)?;
    a.jmp(labels.ret_user)?;

    // STORE and LOAD: their first instruction is the access
    // (`cpl0_fault_resume` knows it by its address).
    a.set_label(&mut labels.store_access)?;
    a.mov(qword_ptr(rdi), rsi)?;
    a.xor(eax, eax)?;
    a.jmp(labels.ret_user)?;

    a.set_label(&mut labels.load_access)?;
    a.mov(rax, qword_ptr(rdi))?;
    a.jmp(labels.ret_user)?;

    a.set_label(&mut read_cr3)?;
    match ops {
        PagingOps::Native => a.mov(rax, cr3)?,
        PagingOps::Paravirt => {
            // The hardware's CR3 may be a shadow root: ask the VMM.
            a.push(rdx)?;
            super::emit::hypercall(a, hypercall::READ_CR3)?;
            a.pop(rdx)?;
        }
    }
    a.jmp(labels.ret_user)?;

    a.set_label(&mut call)?;
    a.call(rdi)?;
    a.set_label(&mut labels.call_return)?;
    a.xor(eax, eax)?;
    a.jmp(labels.ret_user)?;

    // Faulted CPL0 accesses resume here (the VMM redirects them).
    a.set_label(&mut labels.call_fault_return)?;
    a.add(rsp, 8)?;
    a.set_label(&mut labels.fault_return)?;
    a.mov(rax, abi::FAULTED)?;
    a.jmp(labels.ret_user)?;

    a.set_label(&mut read_cr0)?;
    a.mov(rax, cr0)?;
    a.jmp(labels.ret_user)?;

    a.set_label(&mut write_cr0)?;
    a.mov(cr0, rdi)?;
    a.xor(eax, eax)?;
    a.jmp(labels.ret_user)?;

    a.set_label(&mut rdmsr)?;
    a.push(rcx)?;
    a.push(rdx)?;
    a.mov(ecx, edi)?;
    a.rdmsr()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    a.pop(rdx)?;
    a.pop(rcx)?;
    a.jmp(labels.ret_user)?;

    a.set_label(&mut set_fault)?;
    a.push(rdx)?;
    a.mov(rdx, rsp)?;
    a.and(rdx, -(KERNEL_AREA_SIZE as i32))?;
    a.mov(qword_ptr(rdx + percpu::FAULT_RIP as i32), rdi)?;
    a.pop(rdx)?;
    a.xor(eax, eax)?;
    a.jmp(labels.ret_user)?;

    a.set_label(&mut wrmsr)?;
    a.push(rcx)?;
    a.push(rdx)?;
    a.mov(ecx, edi)?;
    a.mov(rax, rsi)?;
    a.mov(rdx, rsi)?;
    a.shr(rdx, 32)?;
    a.wrmsr()?;
    a.pop(rdx)?;
    a.pop(rcx)?;
    a.xor(eax, eax)?;
    a.jmp(labels.ret_user)?;

    // SWAP_ENTRIES: exchange, then continue into FLUSH_TLB.
    let mut swap_next = a.create_label();
    let mut swap_done = a.create_label();
    a.set_label(&mut swap)?;
    a.push(rdi)?;
    a.push(rsi)?;
    a.push(rcx)?;
    a.test(rsi, rsi)?;
    a.jz(swap_done)?;
    a.set_label(&mut swap_next)?;
    a.mov(rcx, qword_ptr(rdi))?;
    a.mov(rax, qword_ptr(rcx))?;
    a.mov(qword_ptr(rdi + 16), rax)?;
    a.mov(rax, qword_ptr(rdi + 8))?;
    a.mov(qword_ptr(rcx), rax)?;
    a.add(rdi, 24)?;
    a.dec(rsi)?;
    a.jnz(swap_next)?;
    a.set_label(&mut swap_done)?;
    a.pop(rcx)?;
    a.pop(rsi)?;
    a.pop(rdi)?;
    a.jmp(flush)?;

    a.set_label(&mut load_cr3)?;
    paging_op(a, ops, hypercall::LOAD_CR3, labels, |a, _| a.mov(cr3, rdi))?;

    a.set_label(&mut invlpg)?;
    paging_op(a, ops, hypercall::INVLPG, labels, |a, _| {
        a.invlpg(byte_ptr(rdi))
    })?;

    a.set_label(&mut flush)?;
    paging_op(a, ops, hypercall::FLUSH_TLB, labels, reload_cr3)?;

    a.set_label(&mut exit)?;
    super::emit::hypercall(a, hypercall::DONE)?;
    // The VMM never resumes after DONE; should it, report again.
    a.jmp(exit)?;

    a.set_label(&mut unknown)?;
    super::emit::hypercall(a, hypercall::BAD_SYSCALL)?;
    a.jmp(unknown)
}

/// `mov rdx, cr3; mov cr3, rdx`: a TLB flush. Recorded in the labels,
/// because a VMM that gives the vCPU a new CR3 between the two must move
/// it back to the read ([`ReplayRestart::cr3_reload_restart`]), or the
/// write would put the old root back.
fn reload_cr3(a: &mut CodeAssembler, labels: &mut Labels) -> Result<(), IcedError> {
    let mut write = a.create_label();
    a.mov(rdx, cr3)?;
    a.set_label(&mut write)?;
    a.mov(cr3, rdx)?;
    labels.cr3_writes.push(write);
    Ok(())
}

/// The length of `mov rdx, cr3` (0F 20 DA).
const MOV_RDX_CR3_LEN: u64 = 3;

/// One page-table system call: the native instruction, or the hypercall
/// followed by what the VMM answers. Preserves every register but RAX
/// (which returns 0).
fn paging_op(
    a: &mut CodeAssembler,
    ops: PagingOps,
    port: u16,
    labels: &mut Labels,
    native: impl Fn(&mut CodeAssembler, &mut Labels) -> Result<(), IcedError>,
) -> Result<(), IcedError> {
    a.push(rdx)?;
    match ops {
        PagingOps::Native => native(a, labels)?,
        PagingOps::Paravirt => {
            super::emit::hypercall(a, port)?;
            let mut no_replay = a.create_label();
            let mut done = a.create_label();
            a.test(al, action::REPLAY as i32)?;
            a.jz(no_replay)?;
            a.call(labels.replay)?;
            a.set_label(&mut no_replay)?;
            a.test(al, action::NATIVE as i32)?;
            a.jz(done)?;
            native(a, labels)?;
            a.set_label(&mut done)?;
        }
    }
    a.pop(rdx)?;
    a.xor(eax, eax)?;
    a.jmp(labels.ret_user)
}

/// The common exception path: exit to the VMM, then carry out its answer.
fn emit_exception_common(a: &mut CodeAssembler, labels: &mut Labels) -> Result<(), IcedError> {
    let mut actions = a.create_label();
    let mut ret = a.create_label();
    let mut no_replay = a.create_label();
    let mut no_native = a.create_label();
    let mut no_deliver = a.create_label();

    a.set_label(&mut labels.exc_common)?;
    a.push(rax)?;
    a.push(rdx)?;
    super::emit::hypercall(a, hypercall::EXCEPTION)?;
    a.test(eax, eax)?;
    a.jnz(actions)?;
    a.set_label(&mut ret)?;
    a.pop(rdx)?;
    a.pop(rax)?;
    a.add(rsp, 16)?;
    a.jmp(labels.ret_user)?;

    a.set_label(&mut actions)?;
    a.test(al, action::REPLAY as i32)?;
    a.jz(no_replay)?;
    a.call(labels.replay)?;
    a.set_label(&mut no_replay)?;
    a.test(al, action::NATIVE as i32)?;
    a.jz(no_native)?;
    reload_cr3(a, labels)?;
    a.set_label(&mut no_native)?;
    a.test(al, action::DELIVER as i32)?;
    a.jz(no_deliver)?;
    emit_deliver(a)?;
    a.set_label(&mut no_deliver)?;
    a.test(al, action::REDIRECT as i32)?;
    a.jz(ret)?;
    a.mov(rdx, rsp)?;
    a.and(rdx, -(KERNEL_AREA_SIZE as i32))?;
    a.mov(rdx, qword_ptr(rdx + percpu::REDIRECT_RIP as i32))?;
    a.mov(qword_ptr(rsp + abi::frame::RIP as i32), rdx)?;
    a.jmp(ret)
}

/// DELIVER, inline in the exception path (RSP at the frame, AL the
/// answer, RDX free): log (vector, error code, CR2), then resume a CPL3
/// program at its fault handler if it has one. Preserves RAX and RCX.
fn emit_deliver(a: &mut CodeAssembler) -> Result<(), IcedError> {
    // The frame's words, with RCX pushed on top of it.
    let frame = |word: i32| qword_ptr(rsp + 8 + 8 * word);
    let mut logged = a.create_label();
    let mut done = a.create_label();
    a.push(rcx)?;
    a.mov(rdx, rsp)?;
    a.and(rdx, -(KERNEL_AREA_SIZE as i32))?;
    a.mov(rcx, qword_ptr(rdx + percpu::FAULT_COUNT as i32))?;
    a.inc(qword_ptr(rdx + percpu::FAULT_COUNT as i32))?;
    a.cmp(rcx, abi::FAULT_CAPACITY as i32)?;
    a.jae(logged)?;
    // RCX = the page + 24 * index; the entry is at RCX + FAULT_LOG.
    a.lea(rcx, qword_ptr(rcx + rcx * 2))?;
    a.lea(rcx, qword_ptr(rdx + rcx * 8))?;
    let entry = |word: i32| qword_ptr(rcx + percpu::FAULT_LOG as i32 + 8 * word);
    a.mov(rdx, frame(2))?;
    a.mov(entry(0), rdx)?;
    a.mov(rdx, frame(3))?;
    a.mov(entry(1), rdx)?;
    a.mov(rdx, cr2)?;
    a.mov(entry(2), rdx)?;
    a.set_label(&mut logged)?;
    a.test(byte_ptr(rsp + 8 + 8 * 5), 3)?;
    a.jz(done)?;
    a.mov(rdx, rsp)?;
    a.and(rdx, -(KERNEL_AREA_SIZE as i32))?;
    a.mov(rcx, qword_ptr(rdx + percpu::FAULT_RIP as i32))?;
    a.test(rcx, rcx)?;
    a.jz(done)?;
    a.mov(frame(4), rcx)?;
    a.set_label(&mut done)?;
    a.pop(rcx)
}

/// The one way out of the kernel: run the replay queue if the VMM filled
/// it or has more ([`percpu::REPLAY_PENDING`]), then `iretq`. The VMM
/// restarts the check when it queues work after the words were read
/// ([`ReplayRestart`]).
fn emit_return(a: &mut CodeAssembler, labels: &mut Labels) -> Result<(), IcedError> {
    let mut queued = a.create_label();
    let mut slow = a.create_label();
    a.set_label(&mut labels.ret_user)?;
    a.push(rdx)?;
    a.set_label(&mut labels.after_push)?;
    a.mov(rdx, rsp)?;
    a.and(rdx, -(KERNEL_AREA_SIZE as i32))?;
    a.cmp(qword_ptr(rdx + percpu::REPLAY_COUNT as i32), 0)?;
    a.jne(queued)?;
    a.cmp(qword_ptr(rdx + percpu::REPLAY_PENDING as i32), 0)?;
    a.set_label(&mut labels.pop)?;
    a.pop(rdx)?;
    a.set_label(&mut labels.jump)?;
    a.jne(slow)?;
    a.set_label(&mut labels.iretq)?;
    a.iretq()?;
    a.set_label(&mut queued)?;
    a.pop(rdx)?;
    a.set_label(&mut slow)?;
    a.call(labels.replay)?;
    a.jmp(labels.ret_user)
}

/// `replay`: apply the vCPU's queue, then clear it; ask the VMM for more
/// while [`percpu::REPLAY_PENDING`] is set; then reload CR3. A plain
/// address gets the queued value stored; an address with
/// [`abi::REASSERT`] gets its current 64-bit value written back, and one
/// with [`abi::REASSERT_FRAME`] the current first two bytes of its page,
/// each with `lock cmpxchg` retried until it succeeds. Preserves every register.
fn emit_replay(a: &mut CodeAssembler, labels: &mut Labels) -> Result<(), IcedError> {
    let mut again = a.create_label();
    let mut next = a.create_label();
    let mut drained = a.create_label();
    let mut reassert = a.create_label();
    let mut reassert_retry = a.create_label();
    let mut frame_reassert = a.create_label();
    let mut frame_retry = a.create_label();
    let mut stored = a.create_label();
    let mut finish = a.create_label();
    a.set_label(&mut labels.replay)?;
    a.push(rax)?;
    a.push(rcx)?;
    a.push(rdx)?;
    a.push(r8)?;
    a.push(r9)?;
    a.push(r10)?;
    a.mov(r9, rsp)?;
    a.and(r9, -(KERNEL_AREA_SIZE as i32))?;
    a.set_label(&mut again)?;
    a.mov(rcx, qword_ptr(r9 + percpu::REPLAY_COUNT as i32))?;
    a.lea(r8, qword_ptr(r9 + REPLAY_QUEUE_OFFSET as i32))?;
    a.test(rcx, rcx)?;
    a.jz(drained)?;
    a.set_label(&mut next)?;
    a.mov(r10, qword_ptr(r8))?;
    a.test(r10, abi::REASSERT as i32)?;
    a.jnz(reassert)?;
    a.test(r10, abi::REASSERT_FRAME as i32)?;
    a.jnz(frame_reassert)?;
    a.mov(rdx, qword_ptr(r8 + 8))?;
    a.mov(qword_ptr(r10), rdx)?;
    a.jmp(stored)?;
    a.set_label(&mut reassert)?;
    a.and(r10, -4)?;
    a.mov(rax, qword_ptr(r10))?;
    a.set_label(&mut reassert_retry)?;
    a.mov(rdx, rax)?;
    a.lock().cmpxchg(qword_ptr(r10), rdx)?;
    a.jne(reassert_retry)?;
    a.jmp(stored)?;
    // A zapped frame: its first two bytes re-asserted. A write of fewer
    // than 4 bytes is misaligned for KVM, which then drops its whole
    // shadow of the page: nothing of it survives into the frame's next use.
    a.set_label(&mut frame_reassert)?;
    a.and(r10, -(PAGE_SIZE as i32))?;
    a.mov(ax, word_ptr(r10))?;
    a.set_label(&mut frame_retry)?;
    a.mov(dx, ax)?;
    a.lock().cmpxchg(word_ptr(r10), dx)?;
    a.jne(frame_retry)?;
    a.set_label(&mut stored)?;
    a.add(r8, abi::REPLAY_ENTRY_SIZE as i32)?;
    a.dec(rcx)?;
    a.jnz(next)?;
    a.set_label(&mut drained)?;
    a.mov(qword_ptr(r9 + percpu::REPLAY_COUNT as i32), 0)?;
    a.cmp(qword_ptr(r9 + percpu::REPLAY_PENDING as i32), 0)?;
    a.je(finish)?;
    super::emit::hypercall(a, hypercall::REPLAY_REFILL)?;
    a.jmp(again)?;
    a.set_label(&mut finish)?;
    reload_cr3(a, labels)?;
    a.pop(r10)?;
    a.pop(r9)?;
    a.pop(r8)?;
    a.pop(rdx)?;
    a.pop(rcx)?;
    a.pop(rax)?;
    a.ret()?;
    a.set_label(&mut labels.replay_end)?;
    a.nop()
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Code, Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};

    fn decode_at(kernel: &Kernel, ip: u64, count: usize) -> Vec<Instruction> {
        let offset = (ip - KERNEL_CODE_GPA) as usize;
        let mut d = Decoder::with_ip(64, &kernel.code()[offset..], ip, DecoderOptions::NONE);
        d.iter().take(count).collect()
    }

    fn has_mnemonic(kernel: &Kernel, mnemonic: Mnemonic) -> bool {
        let mut d = Decoder::with_ip(64, kernel.code(), KERNEL_CODE_GPA, DecoderOptions::NONE);
        d.iter().any(|i| i.mnemonic() == mnemonic)
    }

    #[test]
    fn stubs_push_vector_and_error_code() {
        let k = Kernel::assemble(PagingOps::Native).unwrap();
        assert_eq!(abi::SYSCALL_VECTOR, 3);
        // #UD: no error code, so a zero is pushed first.
        let ud = decode_at(&k, k.vector_handler(6), 3);
        assert_eq!(ud[0].mnemonic(), Mnemonic::Push);
        assert_eq!(ud[0].immediate(0), 0);
        assert_eq!(ud[1].immediate(0), 6);
        assert_eq!(ud[2].mnemonic(), Mnemonic::Jmp);
        // #PF: the CPU pushed the error code; only the vector is pushed.
        let pf = decode_at(&k, k.vector_handler(14), 2);
        assert_eq!(pf[0].immediate(0), 14);
        assert_eq!(pf[1].mnemonic(), Mnemonic::Jmp);
        assert_eq!(pf[1].near_branch_target(), ud[2].near_branch_target());
        assert_eq!(k.vector_handler(abi::SYSCALL_VECTOR), k.syscall_entry());
        // Vector 255 has a stub too (the catch-all).
        assert_eq!(decode_at(&k, k.vector_handler(255), 2)[1].immediate(0), 255);
    }

    #[test]
    fn exception_path_exits_on_its_port() {
        let k = Kernel::assemble(PagingOps::Native).unwrap();
        let common = decode_at(&k, k.vector_handler(14), 2)[1].near_branch_target();
        let path = decode_at(&k, common, 4);
        assert_eq!(path[2].mnemonic(), Mnemonic::Mov);
        assert_eq!(path[2].op0_register(), Register::EDX);
        assert_eq!(path[2].immediate(1), u64::from(hypercall::EXCEPTION));
        assert_eq!(path[3].mnemonic(), Mnemonic::In);
        assert_eq!(path[3].op0_register(), Register::EAX);
        assert_eq!(path[3].op1_register(), Register::DX);
    }

    #[test]
    fn cpl0_faults_of_system_calls_resume_at_their_returns() {
        let k = Kernel::assemble(PagingOps::Paravirt).unwrap();
        let load = k.load_access;
        let store = k.store_access;
        // The sites are the accesses themselves.
        let at_load = decode_at(&k, load, 1)[0];
        assert_eq!(at_load.mnemonic(), Mnemonic::Mov);
        assert_eq!(at_load.op1_kind(), OpKind::Memory);
        let at_store = decode_at(&k, store, 1)[0];
        assert_eq!(at_store.op0_kind(), OpKind::Memory);
        assert_eq!(k.cpl0_fault_resume(load, 0x5000, 0), Some(k.fault_return()));
        assert_eq!(
            k.cpl0_fault_resume(store, 0x5000, 0),
            Some(k.fault_return())
        );
        // A CALL's fetch fault: RIP is the faulting address and the return
        // address into the kernel is on the stack.
        assert_eq!(
            k.cpl0_fault_resume(0x40_0000, 0x40_0000, k.call_return),
            Some(k.call_fault_return())
        );
        assert_eq!(k.cpl0_fault_resume(0x40_0000, 0x40_0000, 0), None);
        assert_eq!(k.cpl0_fault_resume(k.enter_user(), 0x5000, 0), None);
    }

    #[test]
    fn deliver_logs_and_resumes_from_the_kernel_page() {
        let k = Kernel::assemble(PagingOps::Native).unwrap();
        let mut d = Decoder::with_ip(64, k.code(), KERNEL_CODE_GPA, DecoderOptions::NONE);
        let code: Vec<Instruction> = d.iter().collect();
        let displacements: Vec<u64> = code
            .iter()
            .filter(|i| i.memory_base() != Register::None)
            .map(|i| i.memory_displacement64())
            .collect();
        for offset in [percpu::FAULT_COUNT, percpu::FAULT_RIP, percpu::FAULT_LOG] {
            assert!(displacements.contains(&offset), "{offset}");
        }
        assert!(
            code.iter()
                .any(|i| i.mnemonic() == Mnemonic::Test && i.immediate8() == action::DELIVER as u8)
        );
    }

    #[test]
    fn paging_ops_choose_native_or_hypercall() {
        let native = Kernel::assemble(PagingOps::Native).unwrap();
        let para = Kernel::assemble(PagingOps::Paravirt).unwrap();
        assert!(has_mnemonic(&native, Mnemonic::Invlpg));
        assert!(has_mnemonic(&para, Mnemonic::Invlpg));
        let ports = |k: &Kernel| -> Vec<u64> {
            let mut d = Decoder::with_ip(64, k.code(), KERNEL_CODE_GPA, DecoderOptions::NONE);
            d.iter()
                .filter(|i| {
                    i.mnemonic() == Mnemonic::Mov
                        && i.op0_register() == Register::EDX
                        && i.op1_kind() == OpKind::Immediate32
                })
                .map(|i| i.immediate(1))
                .collect()
        };
        let np = ports(&native);
        let pp = ports(&para);
        for port in [hypercall::LOAD_CR3, hypercall::INVLPG, hypercall::FLUSH_TLB] {
            assert!(
                !np.contains(&u64::from(port)),
                "native kernel calls {port:#x}"
            );
            assert!(
                pp.contains(&u64::from(port)),
                "paravirt kernel lacks {port:#x}"
            );
        }
        assert_eq!(native.enter_user(), KERNEL_CODE_GPA);
        assert!(native.code().len() < KERNEL_CODE_SIZE as usize);
    }

    #[test]
    fn every_cr3_reload_restarts_at_its_read() {
        let k = Kernel::assemble(PagingOps::Paravirt).unwrap();
        let restart = k.replay_restart();
        // The flush hypercall's native step, the exception path's and the
        // end of the replay routine.
        assert_eq!(restart.cr3_reloads.len(), 3);
        for &(read, write) in &restart.cr3_reloads {
            let pair = decode_at(&k, read, 2);
            assert_eq!(pair[0].code(), Code::Mov_r64_cr, "at {read:#x}");
            assert_eq!(pair[0].op0_register(), Register::RDX);
            assert_eq!(pair[1].ip(), write);
            assert_eq!(pair[1].code(), Code::Mov_cr_r64, "at {write:#x}");
            assert_eq!(pair[1].op1_register(), Register::RDX);
            assert_eq!(restart.cr3_reload_restart(write), Some(read));
            assert_eq!(restart.cr3_reload_restart(read), None);
        }
        assert!(
            restart
                .cr3_reloads
                .iter()
                .any(|&(_, w)| restart.routine.contains(&w))
        );
    }

    #[test]
    fn system_calls_clear_cf_on_entry() {
        let k = Kernel::assemble(PagingOps::Paravirt).unwrap();
        let first = decode_at(&k, k.syscall_entry(), 1)[0];
        assert_eq!(first.mnemonic(), Mnemonic::And);
        assert_eq!(first.memory_base(), Register::RSP);
        assert_eq!(first.memory_displacement64(), 16);
        assert_eq!(first.immediate(1) as i64, -2);
    }
}
