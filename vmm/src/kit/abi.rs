//! The guest kit's ABI: system calls (CPL3 -> kernel), hypercalls
//! (kernel -> VMM) and the per-vCPU kernel page.
//!
//! # System calls
//!
//! A CPL3 program calls the kernel with `stc; int3` ([`SYSCALL_VECTOR`], a
//! DPL3 interrupt gate): the number in EAX, arguments in RDI and RSI, the
//! result in RAX, CF clear on return. Every other register is preserved.
//! See [`syscall`] and [`syscall_entry_pending`].
//!
//! Why `int3` and not `int 0x80`: under PVM, a two-byte `int n` executed
//! at CPL3 raises #UD in the guest instead of going through the IDT; the
//! one-byte `int3` (and `int1`) are delivered through the IDT as usual.
//! The price is that #BP is not available as a breakpoint trap.
//!
//! # Hypercalls
//!
//! The kernel calls the VMM with a 4-byte port read, `in eax, dx`, on one
//! port per hypercall ([`hypercall`]). The VMM reads the arguments from
//! the vCPU's registers (RDI, RSI) and, for exceptions, from the kernel
//! stack; its 32-bit answer is the value read into EAX. A port read of
//! another size, or a write, to these ports is a malformed hypercall;
//! other ports belong to devices, and an access nothing serves stops the
//! vCPU with [`VcpuError::UnknownPort`](crate::VcpuError::UnknownPort).
//!
//! Page-table hypercalls ([`hypercall::LOAD_CR3`], [`hypercall::INVLPG`],
//! [`hypercall::FLUSH_TLB`], made only under
//! [`PagingOps::Paravirt`](super::PagingOps::Paravirt)) and
//! [`hypercall::EXCEPTION`] answer with [`action`] bits, which the kernel
//! carries out in this order: replay the queue, execute the native
//! instruction, deliver the fault to the program, resume elsewhere.
//!
//! # Exceptions
//!
//! Every IDT vector but [`SYSCALL_VECTOR`] and [`REPLAY_VECTOR`] (whose gate
//! jumps straight to the return path) has a stub that pushes a zero error code (if
//! the CPU pushed none) and the vector number, saves RAX and RDX, and makes
//! the [`hypercall::EXCEPTION`] hypercall. At that exit RSP points to
//! this frame (8-byte words):
//!
//! | RSP + | word |
//! | --- | --- |
//! | 0 | saved RDX |
//! | 8 | saved RAX |
//! | 16 | vector |
//! | 24 | error code |
//! | 32 | RIP of the interrupted context |
//! | 40 | CS |
//! | 48 | RFLAGS |
//! | 56 | RSP |
//! | 64 | SS |
//!
//! and CR2 still holds the faulting address of a #PF. After the answer the
//! stub restores RAX and RDX and returns with `iretq`, to the faulting
//! instruction unless [`action::DELIVER`] or [`action::REDIRECT`] moved it.
//!
//! # Faults delivered to the program
//!
//! A fault that belongs to the guest (the MMU gives it back) is delivered
//! to the guest itself when the VMM answers [`action::DELIVER`]: the
//! kernel appends (vector, error code, CR2) from the frame to the vCPU's
//! fault log ([`percpu::FAULT_COUNT`], [`percpu::FAULT_LOG`]) and, if the
//! fault interrupted CPL3 and the program set a handler with
//! [`syscall::SET_FAULT_HANDLER`], resumes the program there with every
//! register as it was at the fault (RSP included). The VMM first writes
//! into the frame's error-code word the error code the guest must see
//! (under a shadow MMU the hardware's differs from the architectural
//! one). A CPL0 fault of a LOAD, STORE or CALL system call is answered
//! DELIVER together with [`action::REDIRECT`] to
//! [`Kernel::fault_return`](super::Kernel::fault_return): logged, and the
//! call returns [`FAULTED`].
//!
//! # The per-vCPU kernel page
//!
//! Each vCPU's kernel stack sits in a [`KERNEL_AREA_SIZE`]-aligned area
//! whose first page holds the vCPU's kernel variables (the kernel finds it
//! by rounding RSP down) and whose second page is the replay queue: up to
//! [`REPLAY_CAPACITY`] entries of two words, (guest-virtual address,
//! value). The kernel runs the queue before every return from the kernel
//! (and on [`action::REPLAY`]): it stores each value at its address with a
//! CPL0 64-bit store, in order, then clears the count, then reloads CR3.
//! An address with [`REASSERT`] (bit 0) set asks for a re-assertion
//! instead: the kernel reads the entry and writes the value it read back
//! with `lock cmpxchg`, retrying until no concurrent change came in
//! between, so KVM learns the entry's current value and no newer value is
//! ever overwritten; [`REASSERT_FRAME`] (bit 1) re-asserts the first two
//! bytes of a zapped shadow page, which makes KVM drop its whole shadow
//! of the page. This is how a
//! VMM-side shadow MMU on a host whose KVM shadows guest tables (PVM)
//! makes its table writes visible to KVM: KVM tracks guest CPL0 writes,
//! not host writes.
//!
//! The return path checks the count and [`percpu::REPLAY_PENDING`] and
//! then executes `iretq`; a VMM that queues work while the vCPU is between
//! that check and the `iretq` moves RIP back to the check
//! ([`Kernel::replay_restart`](super::Kernel::replay_restart)). A vCPU at
//! CPL3 is sent into the kernel with [`REPLAY_VECTOR`].

pub use crate::layout::KERNEL_AREA_SIZE;

/// The vector of the system-call gate (#BP, entered with `int3`).
pub const SYSCALL_VECTOR: u8 = 3;

/// The bytes of a system call of number `number` as
/// [`emit::syscall`](super::emit::syscall) writes them: `mov eax, number`,
/// `stc`, `int3`.
pub fn syscall_bytes(number: u32) -> [u8; 7] {
    let n = number.to_le_bytes();
    [0xb8, n[0], n[1], n[2], n[3], 0xf9, 0xcc]
}

/// True if a vCPU stopped at CPL3 has executed a system call's `int3`
/// but not yet entered the kernel: `before_rip` (the 7 bytes before RIP)
/// are a system call, RAX still holds its number and CF is still set (the
/// kernel clears CF in the frame it returns through).
///
/// PVM can stop a vCPU there with the #BP it owes the guest held where
/// `KVM_GET_VCPU_EVENTS` does not show it, and an exception the VMM
/// injects then replaces it: the system call would be lost. A pending
/// entry needs no injection anyway, since the kernel runs before CPL3
/// code does.
pub fn syscall_entry_pending(before_rip: &[u8], rax: u64, rflags: u64) -> bool {
    rflags & crate::x86::RFLAGS_CF != 0
        && u32::try_from(rax).is_ok_and(|n| before_rip == syscall_bytes(n))
}

/// System-call numbers (in EAX).
pub mod syscall {
    /// End the program: RDI = exit code. Does not return.
    pub const EXIT: u32 = 0;
    /// Report a result to the VMM: RDI = value, RSI = tag. Returns 0.
    pub const REPORT: u32 = 1;
    /// Load CR3: RDI = new CR3. Returns 0.
    pub const LOAD_CR3: u32 = 2;
    /// Invalidate the TLB entry for the address in RDI. Returns 0.
    pub const INVLPG: u32 = 3;
    /// Flush the TLB (non-global entries, as a CR3 reload does). Returns 0.
    pub const FLUSH_TLB: u32 = 4;
    /// Store the 64-bit RSI at the address in RDI from CPL0 (for example a
    /// page-table entry the program may not write itself). Returns 0.
    pub const STORE: u32 = 5;
    /// Load 64 bits from the address in RDI at CPL0. Returns the value.
    pub const LOAD: u32 = 6;
    /// Read CR3. Returns its value.
    pub const READ_CR3: u32 = 7;
    /// Call the code at RDI from CPL0 (it must return with `ret`).
    /// Returns 0.
    pub const CALL: u32 = 8;
    /// Exchange entries, then flush the TLB as [`FLUSH_TLB`] does: RDI
    /// points to RSI triples of words (address, new value, old value);
    /// for each, in order, the kernel reads the word at the address into
    /// the triple's third word and stores the new value there. Returns 0.
    pub const SWAP_ENTRIES: u32 = 9;
    /// Read CR0. Returns its value.
    pub const READ_CR0: u32 = 10;
    /// Write CR0 with RDI. Returns 0.
    pub const WRITE_CR0: u32 = 11;
    /// Read the MSR numbered RDI. Returns its value.
    pub const RDMSR: u32 = 12;
    /// Write RSI to the MSR numbered RDI. Returns 0.
    pub const WRMSR: u32 = 13;
    /// Where faults delivered to the program resume it: RDI = a CPL3
    /// address, or 0 for none (the run then ends on such a fault). Sets
    /// [`percpu::FAULT_RIP`](super::percpu::FAULT_RIP). Returns 0.
    pub const SET_FAULT_HANDLER: u32 = 14;
}

/// What a CPL0 access made for a system call (LOAD, STORE, CALL) returns
/// when the VMM resumed it at [`Kernel::fault_return`](super::Kernel::fault_return)
/// after a fault.
pub const FAULTED: u64 = u64::MAX;

/// Hypercall ports (4-byte `in`).
pub mod hypercall {
    /// The first hypercall port.
    pub const BASE: u16 = 0x0500;
    /// The program is done: RDI = exit code. The VMM does not resume the vCPU.
    pub const DONE: u16 = BASE;
    /// A result: RDI = value, RSI = tag. Answer 0.
    pub const REPORT: u16 = BASE + 1;
    /// An exception; frame on the stack (see the module docs). Answer:
    /// [`action`](super::action) bits.
    pub const EXCEPTION: u16 = BASE + 2;
    /// Load CR3: RDI = new CR3. Answer: [`action`](super::action) bits.
    pub const LOAD_CR3: u16 = BASE + 3;
    /// INVLPG: RDI = address. Answer: [`action`](super::action) bits.
    pub const INVLPG: u16 = BASE + 4;
    /// Flush the TLB. Answer: [`action`](super::action) bits.
    pub const FLUSH_TLB: u16 = BASE + 5;
    /// A CPL3 program made an unknown system call: RAX = its number. The
    /// VMM does not resume the vCPU.
    pub const BAD_SYSCALL: u16 = BASE + 6;
    /// Read CR3 (the guest's own, which under a shadow MMU is not the one
    /// the hardware uses). Answer: its low 32 bits (the kit's page tables
    /// live below 4 GiB).
    pub const READ_CR3: u16 = BASE + 7;
    /// The replay routine drained its queue and found
    /// [`REPLAY_PENDING`](super::percpu::REPLAY_PENDING) set: the VMM
    /// refills the queue and sets or clears `REPLAY_PENDING`. Answer 0.
    pub const REPLAY_REFILL: u16 = BASE + 8;
    /// One past the last hypercall port.
    pub const END: u16 = BASE + 9;
}

/// Answer bits of the page-table and exception hypercalls.
pub mod action {
    /// Replay the vCPU's queue of page-table writes first.
    pub const REPLAY: u32 = 1 << 0;
    /// Then execute the native instruction: `mov cr3, rdi` for LOAD_CR3,
    /// `invlpg [rdi]` for INVLPG, a CR3 reload for FLUSH_TLB and
    /// EXCEPTION.
    pub const NATIVE: u32 = 1 << 1;
    /// EXCEPTION only: resume at the address in the kernel page's
    /// [`REDIRECT_RIP`](super::percpu::REDIRECT_RIP) instead of the
    /// faulting instruction.
    pub const REDIRECT: u32 = 1 << 2;
    /// EXCEPTION only, carried out after NATIVE and before REDIRECT: the
    /// fault is the guest's. Append (vector, error code, CR2) to the fault
    /// log; if the fault came from CPL3 and
    /// [`FAULT_RIP`](super::percpu::FAULT_RIP) is not 0, resume the
    /// program there instead of at the faulting instruction.
    pub const DELIVER: u32 = 1 << 3;
    /// Every defined bit.
    pub const ALL: u32 = REPLAY | NATIVE | REDIRECT | DELIVER;
}

/// Offsets in the per-vCPU kernel page.
pub mod percpu {
    /// The vCPU's index (written by the VMM).
    pub const INDEX: u64 = 0;
    /// Where [`REDIRECT`](super::action::REDIRECT) resumes.
    pub const REDIRECT_RIP: u64 = 8;
    /// Number of valid replay-queue entries.
    pub const REPLAY_COUNT: u64 = 16;
    /// Non-zero: the VMM has more replay work than the queue holds; the
    /// replay routine asks for it with [`REPLAY_REFILL`](super::hypercall::REPLAY_REFILL).
    pub const REPLAY_PENDING: u64 = 24;
    /// Where [`DELIVER`](super::action::DELIVER) resumes a CPL3 program
    /// (0: nowhere). Set by [`SET_FAULT_HANDLER`](super::syscall::SET_FAULT_HANDLER).
    pub const FAULT_RIP: u64 = 32;
    /// Faults delivered since the run started; can exceed
    /// [`FAULT_CAPACITY`](super::FAULT_CAPACITY) (only the count grows then).
    pub const FAULT_COUNT: u64 = 40;
    /// The fault log: entries of three words (vector, error code, CR2)
    /// from here to the end of the page.
    pub const FAULT_LOG: u64 = 64;
}

/// Words of one fault-log entry.
pub const FAULT_ENTRY_WORDS: u64 = 3;

/// Entries the fault log holds (the rest of the kernel page).
pub const FAULT_CAPACITY: u64 =
    (crate::layout::PAGE_SIZE - percpu::FAULT_LOG) / (8 * FAULT_ENTRY_WORDS);

/// Entries the replay queue page holds.
pub const REPLAY_CAPACITY: usize = 256;

/// Bit 0 of a replay-queue address: re-assert the 64-bit entry there
/// instead of storing a value. See the module docs.
pub const REASSERT: u64 = 1;

/// Bit 1 of a replay-queue address: the page there is a zapped shadow
/// page; re-assert its first two bytes. KVM takes a write of fewer than
/// 4 bytes to a page it shadows as a page table as misaligned and drops
/// its whole shadow of the page, so nothing of the old contents survives
/// into the frame's next use (one emulated write instead of one per
/// entry). See the module docs.
pub const REASSERT_FRAME: u64 = 2;

/// The vector the VMM injects to make a vCPU at CPL3 run its replay queue:
/// its gate goes straight to the kernel's return path, which replays the
/// queue before it returns (a reserved exception vector, so it never
/// collides with a real one).
pub const REPLAY_VECTOR: u8 = 22;

/// Conventional report tags used by the kit's workloads.
pub mod tag {
    /// A workload checksum.
    pub const CHECKSUM: u32 = 1;
    /// A value read by an access workload.
    pub const VALUE: u32 = 2;
    /// Faults the program took (and survived).
    pub const FAULTS: u32 = 3;
    /// Request/response transactions completed.
    pub const TRANSACTIONS: u32 = 4;
    /// Status-register reads made while waiting for responses.
    pub const POLLS: u32 = 5;
    /// Writes a workload made (`stress`: one per iteration).
    pub const WRITES: u32 = 6;
    /// Reads a workload checked against what it expected (`stress`).
    pub const READS_CHECKED: u32 = 7;
    /// Reads that returned stale or wrong data (`stress`; must be 0).
    pub const STALE: u32 = 8;
    /// Checked reads the VMM answered as MMIO because no memslot was
    /// there (`stress`).
    pub const ABSENT: u32 = 9;
    /// Reads a workload could not judge because the host changed the
    /// memory map meanwhile (`stress`).
    pub const UNCHECKED: u32 = 10;

    /// The tag's name in reports (`checksum`), or None for a tag the kit
    /// does not define.
    pub fn name(tag: u64) -> Option<&'static str> {
        [
            (CHECKSUM, "checksum"),
            (VALUE, "value"),
            (FAULTS, "faults"),
            (TRANSACTIONS, "transactions"),
            (POLLS, "polls"),
            (WRITES, "writes"),
            (READS_CHECKED, "reads_checked"),
            (STALE, "stale"),
            (ABSENT, "absent"),
            (UNCHECKED, "unchecked"),
        ]
        .into_iter()
        .find(|&(t, _)| u64::from(t) == tag)
        .map(|(_, name)| name)
    }
}
