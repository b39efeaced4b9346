//! The example's long-mode guest, which speaks the paravirtual MMU ABI
//! (`mmu_integration::shadow_host::abi`) so that the shadow backend sees
//! its page faults, and runs unchanged under ept.
//!
//! Everything is identity-mapped in the first 2 MiB with 4 KiB pages, by
//! page tables the host writes before the first entry. Below `SYSTEM_END`
//! is the system memory (a memslot that is never dirty-logged), above it
//! the program's:
//!
//! | guest-physical | what | guest mapping |
//! | --- | --- | --- |
//! | `GDT_GPA`, `IDT_GPA`, `TSS_GPA` | descriptor tables, the TSS | supervisor |
//! | `KERNEL_GPA` | the kernel: exception stubs, return path, replay routine | supervisor |
//! | `KERNEL_PAGE_GPA`, `REPLAY_QUEUE_GPA` | the ABI's kernel page and replay queue | supervisor |
//! | 0xa000 .. `KERNEL_STACK_TOP` | the kernel stack (TSS RSP0) | supervisor |
//! | `TABLES_GPA` | the page tables | supervisor |
//! | `USER_CODE_GPA`, `USER_STACK_GPA` | the CPL3 program and its stack | user |
//! | `TOUCH_GPA` .. | the pages the program writes | user |
//! | `DEVICE_GPA` | the MMIO device (no memory) | user |
//! | `ROM_GPA` .. | the ROM (a read-only memslot) | user, writable |
//!
//! The kernel is tiny, because guest CPL0 code is emulated on some hosts
//! (PVM): it starts the program with `iretq` and afterwards only runs when
//! the CPU delivers an exception. Every exception stub reports to the VMM
//! with the EXCEPTION hypercall; the REPLAY_VECTOR gate goes to the return
//! path, which runs the replay queue before every `iretq` to CPL3. The
//! program reports its results and its end through device registers
//! (MMIO), which reach the VMM from CPL3 under either backend.

use iced_x86::code_asm::*;
use iced_x86::{BlockEncoderOptions, IcedError};
use kvm_bindings::{kvm_dtable, kvm_regs, kvm_segment, kvm_sregs};
use mmu_api::{Gpa, Gva, PfErrorCode};
use mmu_integration::shadow_host::abi::{self, REPLAY_ENTRY_SIZE, action, hypercall, percpu};
use mmu_integration::shadow_host::{PvKernel, PvVcpuLayout};

use crate::guest::{DEVICE_GPA, RAM_SIZE, ROM_GPA, ROM_SIZE, TOUCH_GPA};

const PAGE: u64 = 4096;

/// The end of the system memory (descriptor tables, the kernel, its
/// pages and stack), which is a memslot of its own that is never
/// dirty-logged: a dirty-log harvest write-protects the pages of a logged
/// slot, and a #PF on the kernel stack would be a double fault.
pub(crate) const SYSTEM_END: u64 = 0x1_0000;
/// The GDT: null, kernel code, kernel data, user data, user code, TSS.
pub(crate) const GDT_GPA: u64 = 0x1000;
/// The IDT (256 gates).
pub(crate) const IDT_GPA: u64 = 0x2000;
/// The TSS (only RSP0 is used).
pub(crate) const TSS_GPA: u64 = 0x3000;
/// The kernel's code (two pages at most).
pub(crate) const KERNEL_GPA: u64 = 0x4000;
const KERNEL_MAX: u64 = 2 * PAGE;
/// The ABI's per-vCPU kernel page.
pub(crate) const KERNEL_PAGE_GPA: u64 = 0x8000;
/// The ABI's replay queue.
pub(crate) const REPLAY_QUEUE_GPA: u64 = 0x9000;
/// One past the top of the kernel stack, which starts at 0xa000 (the
/// TSS's RSP0).
pub(crate) const KERNEL_STACK_TOP: u64 = 0xc000;
/// The page tables: PML4, PDPT, PD, PT.
pub(crate) const TABLES_GPA: u64 = 0x5_0000;
/// The CPL3 program.
pub(crate) const USER_CODE_GPA: u64 = 0x6_0000;
/// The CPL3 stack page.
pub(crate) const USER_STACK_GPA: u64 = 0x6_1000;

const SEL_KERNEL_CODE: u16 = 0x08;
const SEL_KERNEL_DATA: u16 = 0x10;
const SEL_USER_DATA: u16 = 0x18 | 3;
const SEL_USER_CODE: u16 = 0x20 | 3;
const SEL_TSS: u16 = 0x28;
const TSS_LIMIT: u64 = 103;

/// RFLAGS of the program: bit 1 (always set).
const USER_RFLAGS: i32 = 0x2;

const PTE_P: u64 = 1;
const PTE_RW: u64 = 1 << 1;
const PTE_US: u64 = 1 << 2;

/// Where the kernel's routines are, for the hosting's restarts.
#[derive(Clone, Debug)]
pub(crate) struct GuestKernel {
    /// The machine code, at `KERNEL_GPA`.
    pub(crate) code: Vec<u8>,
    /// The entry: starts the program at CPL3.
    pub(crate) entry: u64,
    /// The IDT's handlers by vector (0 = not present).
    pub(crate) handlers: Vec<u64>,
    /// The return path's check.
    check: u64,
    /// Its `iretq`.
    iretq: u64,
    /// The replay routine.
    routine: std::ops::Range<u64>,
    /// Every CR3 reload: (the read of CR3, its write back).
    cr3_reloads: Vec<(u64, u64)>,
}

impl PvKernel for GuestKernel {
    /// Between the check of the queue and the `iretq`, the words were read
    /// already: check again.
    fn replay_restart_rip(&self, rip: u64) -> u64 {
        if rip > self.check && rip <= self.iretq {
            self.check
        } else {
            rip
        }
    }

    fn cr3_reload_restart(&self, rip: u64) -> Option<u64> {
        self.cr3_reloads
            .iter()
            .find(|&&(_, write)| write == rip)
            .map(|&(read, _)| read)
    }

    fn in_replay_routine(&self, rip: u64) -> bool {
        self.routine.contains(&rip)
    }
}

/// The guest's facts for the hosting: the pages the CPU needs to deliver
/// an exception (written: descriptor tables, TSS, kernel stack and pages;
/// fetched: the kernel), and where the kernel page and queue are.
pub(crate) fn vcpu_layout(kernel: &GuestKernel) -> PvVcpuLayout {
    let mut kernel_pages = vec![
        (Gva(GDT_GPA), PfErrorCode::WRITE),
        (Gva(IDT_GPA), PfErrorCode::WRITE),
        (Gva(TSS_GPA), PfErrorCode::WRITE),
    ];
    let mut code = KERNEL_GPA;
    while code < KERNEL_GPA + kernel.code.len() as u64 {
        kernel_pages.push((Gva(code), PfErrorCode::FETCH));
        code += PAGE;
    }
    let mut page = KERNEL_PAGE_GPA;
    while page < KERNEL_STACK_TOP {
        kernel_pages.push((Gva(page), PfErrorCode::WRITE));
        page += PAGE;
    }
    PvVcpuLayout {
        kernel_pages,
        kernel_page: Gpa(KERNEL_PAGE_GPA),
        replay_queue: Gpa(REPLAY_QUEUE_GPA),
    }
}

/// `mov rdx, cr3; mov cr3, rdx`, recorded: a new root given between the
/// two must restart at the read.
fn reload_cr3(
    a: &mut CodeAssembler,
    reloads: &mut Vec<(CodeLabel, CodeLabel)>,
) -> Result<(), IcedError> {
    let mut read = a.create_label();
    let mut write = a.create_label();
    a.set_label(&mut read)?;
    a.mov(rdx, cr3)?;
    a.set_label(&mut write)?;
    a.mov(cr3, rdx)?;
    reloads.push((read, write));
    Ok(())
}

/// `mov dx, port; in eax, dx`: a hypercall.
fn hypercall(a: &mut CodeAssembler, port: u16) -> Result<(), IcedError> {
    a.mov(dx, u32::from(port))?;
    a.in_(eax, dx)
}

/// Assembles the kernel at `KERNEL_GPA`.
pub(crate) fn kernel() -> Result<GuestKernel, Box<dyn std::error::Error>> {
    let kpage = |offset: u64| qword_ptr(KERNEL_PAGE_GPA + offset);
    let mut a = CodeAssembler::new(64)?;
    let mut reloads = Vec::new();
    let mut entry = a.create_label();
    let mut ret_user = a.create_label();
    let mut iretq = a.create_label();
    let mut replay = a.create_label();
    let mut replay_end = a.create_label();
    let mut exc_common = a.create_label();

    // The entry: an iret frame for the program, then the return path.
    a.set_label(&mut entry)?;
    a.push(i32::from(SEL_USER_DATA))?;
    a.push((USER_STACK_GPA + PAGE) as i32)?;
    a.push(USER_RFLAGS)?;
    a.push(i32::from(SEL_USER_CODE))?;
    a.push(USER_CODE_GPA as i32)?;
    a.jmp(ret_user)?;

    // The stubs of vectors 0..32 (REPLAY_VECTOR's goes to the return path).
    let mut stubs = Vec::new();
    for vector in 0..32u8 {
        let mut stub = a.create_label();
        a.set_label(&mut stub)?;
        if vector == abi::REPLAY_VECTOR {
            a.jmp(ret_user)?;
        } else {
            if !matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30) {
                a.push(0)?;
            }
            a.push(i32::from(vector))?;
            a.jmp(exc_common)?;
        }
        stubs.push(stub);
    }

    // The exception path: the frame of the ABI, the hypercall, its answer.
    let mut no_replay = a.create_label();
    let mut no_native = a.create_label();
    a.set_label(&mut exc_common)?;
    a.push(rax)?;
    a.push(rdx)?;
    hypercall(&mut a, hypercall::EXCEPTION)?;
    a.test(eax, action::REPLAY)?;
    a.jz(no_replay)?;
    a.call(replay)?;
    a.set_label(&mut no_replay)?;
    a.test(eax, action::NATIVE)?;
    a.jz(no_native)?;
    reload_cr3(&mut a, &mut reloads)?;
    a.set_label(&mut no_native)?;
    a.pop(rdx)?;
    a.pop(rax)?;
    a.add(rsp, 16)?;

    // The return path: replay whatever is queued or pending, then iretq.
    let mut slow = a.create_label();
    a.set_label(&mut ret_user)?;
    a.cmp(kpage(percpu::REPLAY_COUNT), 0)?;
    a.jne(slow)?;
    a.cmp(kpage(percpu::REPLAY_PENDING), 0)?;
    a.jne(slow)?;
    a.set_label(&mut iretq)?;
    a.iretq()?;
    a.set_label(&mut slow)?;
    a.call(replay)?;
    a.jmp(ret_user)?;

    // The replay routine: each entry stored or re-asserted at CPL0, the
    // count cleared, more asked for while the VMM has more, CR3 reloaded.
    let mut again = a.create_label();
    let mut next = a.create_label();
    let mut reassert = a.create_label();
    let mut reassert_retry = a.create_label();
    let mut frame = a.create_label();
    let mut frame_retry = a.create_label();
    let mut stored = a.create_label();
    let mut drained = a.create_label();
    let mut finish = a.create_label();
    a.set_label(&mut replay)?;
    a.push(rax)?;
    a.push(rcx)?;
    a.push(rdx)?;
    a.push(r8)?;
    a.push(r10)?;
    a.set_label(&mut again)?;
    a.mov(rcx, kpage(percpu::REPLAY_COUNT))?;
    a.mov(r8, REPLAY_QUEUE_GPA)?;
    a.test(rcx, rcx)?;
    a.jz(drained)?;
    a.set_label(&mut next)?;
    a.mov(r10, qword_ptr(r8))?;
    a.test(r10, abi::REASSERT as i32)?;
    a.jnz(reassert)?;
    a.test(r10, abi::REASSERT_FRAME as i32)?;
    a.jnz(frame)?;
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
    a.set_label(&mut frame)?;
    a.and(r10, -(PAGE as i32))?;
    a.mov(ax, word_ptr(r10))?;
    a.set_label(&mut frame_retry)?;
    a.mov(dx, ax)?;
    a.lock().cmpxchg(word_ptr(r10), dx)?;
    a.jne(frame_retry)?;
    a.set_label(&mut stored)?;
    a.add(r8, REPLAY_ENTRY_SIZE as i32)?;
    a.dec(rcx)?;
    a.jnz(next)?;
    a.set_label(&mut drained)?;
    a.mov(kpage(percpu::REPLAY_COUNT), 0)?;
    a.cmp(kpage(percpu::REPLAY_PENDING), 0)?;
    a.je(finish)?;
    hypercall(&mut a, hypercall::REPLAY_REFILL)?;
    a.jmp(again)?;
    a.set_label(&mut finish)?;
    a.pop(r10)?;
    reload_cr3(&mut a, &mut reloads)?;
    a.pop(r8)?;
    a.pop(rdx)?;
    a.pop(rcx)?;
    a.pop(rax)?;
    a.ret()?;
    a.set_label(&mut replay_end)?;
    a.nop()?;

    let result = a.assemble_options(
        KERNEL_GPA,
        BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
    )?;
    let code = result.inner.code_buffer.clone();
    if code.len() as u64 > KERNEL_MAX {
        return Err(format!(
            "the kernel is {} bytes, its pages hold {KERNEL_MAX}",
            code.len()
        )
        .into());
    }
    let mut handlers = vec![0; 256];
    for (vector, stub) in stubs.iter().enumerate() {
        handlers[vector] = result.label_ip(stub)?;
    }
    let cr3_reloads = reloads
        .iter()
        .map(|(read, write)| Ok((result.label_ip(read)?, result.label_ip(write)?)))
        .collect::<Result<Vec<_>, IcedError>>()?;
    Ok(GuestKernel {
        entry: result.label_ip(&entry)?,
        check: result.label_ip(&ret_user)?,
        iretq: result.label_ip(&iretq)?,
        routine: result.label_ip(&replay)?..result.label_ip(&replay_end)?,
        cr3_reloads,
        handlers,
        code,
    })
}

/// The CPL3 program:
///
/// 1. writes one word to each of `pages` pages from `TOUCH_GPA` (the
///    value is the count down, `pages` .. 1), writes the device's
///    checkpoint register (the host harvests the dirty log meanwhile),
///    and adds `SECOND_PASS` to each of those words;
/// 2. `requests` times, writes the request number to the device's
///    doorbell and adds its status register to a sum (MMIO);
/// 3. writes a byte to the ROM (an MMIO write to the device behind the
///    read-only memslot) and reads the ROM word (memory);
/// 4. reads the touched words back and sums them;
/// 5. writes the status sum, the ROM word and the sum of the touched
///    words to the device's report register, then its done register, and
///    waits there.
pub(crate) fn program(pages: u32, requests: u32) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut touch = a.create_label();
    let mut again = a.create_label();
    let mut request = a.create_label();
    let mut sum = a.create_label();
    let mut done = a.create_label();

    a.mov(rsi, DEVICE_GPA)?;
    a.mov(rax, TOUCH_GPA)?;
    a.mov(ecx, pages)?;
    a.set_label(&mut touch)?;
    a.mov(qword_ptr(rax), rcx)?;
    a.add(rax, PAGE as i32)?;
    a.dec(ecx)?;
    a.jnz(touch)?;
    a.mov(dword_ptr(rsi + 16), 1)?;
    a.mov(rax, TOUCH_GPA)?;
    a.mov(ecx, pages)?;
    a.set_label(&mut again)?;
    a.add(qword_ptr(rax), SECOND_PASS as i32)?;
    a.add(rax, PAGE as i32)?;
    a.dec(ecx)?;
    a.jnz(again)?;

    a.xor(ebx, ebx)?;
    a.mov(ecx, requests)?;
    a.set_label(&mut request)?;
    a.mov(dword_ptr(rsi), ecx)?;
    a.mov(eax, dword_ptr(rsi + 4))?;
    a.add(ebx, eax)?;
    a.dec(ecx)?;
    a.jnz(request)?;

    a.mov(rdi, ROM_GPA)?;
    a.mov(byte_ptr(rdi + 0x10), 0x55)?;
    a.movzx(r12d, word_ptr(rdi + 0x20))?;

    a.mov(rax, TOUCH_GPA)?;
    a.mov(ecx, pages)?;
    a.xor(r13d, r13d)?;
    a.set_label(&mut sum)?;
    a.add(r13, qword_ptr(rax))?;
    a.add(rax, PAGE as i32)?;
    a.dec(ecx)?;
    a.jnz(sum)?;

    a.mov(dword_ptr(rsi + 8), ebx)?;
    a.mov(dword_ptr(rsi + 8), r12d)?;
    a.mov(dword_ptr(rsi + 8), r13d)?;
    a.mov(dword_ptr(rsi + 12), 1)?;
    a.set_label(&mut done)?;
    a.jmp(done)?;
    a.assemble(USER_CODE_GPA)
}

/// What the second pass adds to each touched word.
const SECOND_PASS: u32 = 0x100;

/// What the program reports: the sum of the statuses (status = 2 *
/// request + 1, requests counted down from `requests` to 1), the ROM
/// word, and the sum of the words written (`pages` .. 1, each plus
/// `SECOND_PASS`).
pub(crate) fn expected_reports(pages: u32, requests: u32, rom_word: u16) -> [u32; 3] {
    let n = requests;
    [
        n * (n + 1) + n,
        u32::from(rom_word),
        pages * (pages + 1) / 2 + pages * SECOND_PASS,
    ]
}

/// The guest's page tables (PML4, PDPT, PD, one PT covering the first
/// 2 MiB) as (address, contents) pairs.
pub(crate) fn page_tables(pages: u32) -> Vec<(u64, [u64; 512])> {
    let table = |i: u64| TABLES_GPA + i * PAGE;
    let upper = PTE_P | PTE_RW | PTE_US;
    let mut pml4 = [0u64; 512];
    pml4[0] = table(1) | upper;
    let mut pdpt = [0u64; 512];
    pdpt[0] = table(2) | upper;
    let mut pd = [0u64; 512];
    pd[0] = table(3) | upper;
    let mut pt = [0u64; 512];
    let mut map = |from: u64, to: u64, flags: u64| {
        let mut gpa = from;
        while gpa < to {
            pt[(gpa / PAGE) as usize] = gpa | flags;
            gpa += PAGE;
        }
    };
    let kernel = PTE_P | PTE_RW;
    let user = PTE_P | PTE_RW | PTE_US;
    map(GDT_GPA, TSS_GPA + PAGE, kernel);
    map(KERNEL_GPA, KERNEL_GPA + KERNEL_MAX, kernel);
    map(KERNEL_PAGE_GPA, KERNEL_STACK_TOP, kernel);
    map(TABLES_GPA, table(4), kernel);
    map(USER_CODE_GPA, USER_CODE_GPA + PAGE, PTE_P | PTE_US);
    map(USER_STACK_GPA, USER_STACK_GPA + PAGE, user);
    map(TOUCH_GPA, TOUCH_GPA + u64::from(pages) * PAGE, user);
    map(DEVICE_GPA, DEVICE_GPA + PAGE, user);
    map(ROM_GPA, ROM_GPA + ROM_SIZE, user);
    debug_assert!(TOUCH_GPA + u64::from(pages) * PAGE <= RAM_SIZE);
    vec![
        (table(0), pml4),
        (table(1), pdpt),
        (table(2), pd),
        (table(3), pt),
    ]
}

/// The GDT's words.
pub(crate) fn gdt() -> [u64; 7] {
    let code = |dpl: u64| 0x00af_9b00_0000_ffff | (dpl << 45);
    let data = |dpl: u64| 0x00cf_9300_0000_ffff | (dpl << 45);
    let tss_low = TSS_LIMIT
        | ((TSS_GPA & 0xff_ffff) << 16)
        | (0x9 << 40)
        | (1 << 47)
        | (((TSS_GPA >> 24) & 0xff) << 56);
    [
        0,
        code(0),
        data(0),
        data(3),
        code(3),
        tss_low,
        TSS_GPA >> 32,
    ]
}

/// The IDT's words: an interrupt gate per handler that exists.
pub(crate) fn idt(kernel: &GuestKernel) -> Vec<u64> {
    let mut words = Vec::with_capacity(512);
    for &handler in &kernel.handlers {
        if handler == 0 {
            words.extend_from_slice(&[0, 0]);
            continue;
        }
        let low = (handler & 0xffff)
            | (u64::from(SEL_KERNEL_CODE) << 16)
            | (0xe << 40)
            | (1 << 47)
            | (((handler >> 16) & 0xffff) << 48);
        words.extend_from_slice(&[low, handler >> 32]);
    }
    words
}

/// The TSS: RSP0 at the kernel stack's top, no I/O bitmap.
pub(crate) fn tss() -> [u8; 104] {
    let mut tss = [0u8; 104];
    tss[4..12].copy_from_slice(&KERNEL_STACK_TOP.to_le_bytes());
    tss[102..104].copy_from_slice(&104u16.to_le_bytes());
    tss
}

fn segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl: (selector & 3) as u8,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        ..Default::default()
    }
}

/// Long mode at CPL0 with the guest's own tables, GDT, IDT and TSS.
pub(crate) fn long_mode_sregs(base: kvm_sregs) -> kvm_sregs {
    let mut sregs = base;
    sregs.cs = segment(SEL_KERNEL_CODE, true);
    let data = segment(SEL_KERNEL_DATA, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        base: TSS_GPA,
        limit: TSS_LIMIT as u32,
        selector: SEL_TSS,
        type_: 0xb,
        present: 1,
        ..Default::default()
    };
    sregs.ldt = kvm_segment {
        type_: 2,
        unusable: 1,
        ..Default::default()
    };
    sregs.gdt = kvm_dtable {
        base: GDT_GPA,
        limit: (7 * 8 - 1) as u16,
        ..Default::default()
    };
    sregs.idt = kvm_dtable {
        base: IDT_GPA,
        limit: 256 * 16 - 1,
        ..Default::default()
    };
    // PE, MP, ET, NE, WP, PG.
    sregs.cr0 = 1 | (1 << 1) | (1 << 4) | (1 << 5) | (1 << 16) | (1 << 31);
    sregs.cr3 = TABLES_GPA;
    // PAE, OSFXSR, OSXMMEXCPT.
    sregs.cr4 = (1 << 5) | (1 << 9) | (1 << 10);
    // LME, LMA, NXE.
    sregs.efer = (1 << 8) | (1 << 10) | (1 << 11);
    sregs
}

/// The kernel's entry with its stack.
pub(crate) fn start_regs(kernel: &GuestKernel) -> kvm_regs {
    kvm_regs {
        rip: kernel.entry,
        rsp: KERNEL_STACK_TOP,
        rflags: 2,
        ..Default::default()
    }
}
