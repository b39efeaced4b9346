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
//! # Hypercalls, exceptions, the kernel page and the replay queue
//!
//! The kernel speaks the paravirtual MMU ABI of `mmu-integration`
//! (version [`PV_MMU_ABI_VERSION`]): its hypercalls ([`hypercall`]),
//! answer bits ([`action`]), exception frame ([`frame`]), per-vCPU kernel
//! page ([`percpu`]) and replay queue ([`REPLAY_CAPACITY`], [`REASSERT`],
//! [`REASSERT_FRAME`], [`REPLAY_VECTOR`]) are that contract's, re-exported
//! here; see [`mmu_integration::shadow_host::abi`] for what each means. The
//! kit adds three hypercalls in the range the contract leaves to the VMM
//! ([`hypercall::DONE`], [`hypercall::REPORT`], [`hypercall::BAD_SYSCALL`]).
//! Ports outside the hypercall range belong to devices, and an access
//! nothing serves stops the vCPU with
//! [`VcpuError::UnknownPort`](crate::VcpuError::UnknownPort).
//!
//! The kit's kernel makes the page-table hypercalls only under
//! [`PagingOps::Paravirt`](super::PagingOps::Paravirt). A CPL0 fault of a
//! LOAD, STORE or CALL system call is answered [`action::DELIVER`]
//! together with [`action::REDIRECT`] to
//! [`Kernel::fault_return`](super::Kernel::fault_return): logged, and the
//! call returns [`FAULTED`]. A CPL3 program sets where delivered faults
//! resume it ([`percpu::FAULT_RIP`]) with [`syscall::SET_FAULT_HANDLER`].
//!
//! Each vCPU's kernel stack sits in a [`KERNEL_AREA_SIZE`]-aligned area
//! whose first page is the vCPU's kernel page (the kernel finds it by
//! rounding RSP down) and whose second page is its replay queue. The
//! return path's restart points are
//! [`Kernel::replay_restart`](super::Kernel::replay_restart).

pub use mmu_integration::shadow_host::abi::{
    ExceptionFrame, FAULT_CAPACITY, FAULT_ENTRY_WORDS, PV_MMU_ABI_VERSION, REASSERT,
    REASSERT_FRAME, REPLAY_CAPACITY, REPLAY_ENTRY_SIZE, REPLAY_VECTOR, action, frame, percpu,
};

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

/// Hypercall ports (4-byte `in`): the contract's, and the kit's own in
/// the range it leaves to the VMM.
pub mod hypercall {
    pub use mmu_integration::shadow_host::abi::hypercall::*;

    /// The program is done: RDI = exit code. The VMM does not resume the vCPU.
    pub const DONE: u16 = BASE;
    /// A result: RDI = value, RSI = tag. Answer 0.
    pub const REPORT: u16 = BASE + 1;
    /// A CPL3 program made an unknown system call: RAX = its number. The
    /// VMM does not resume the vCPU.
    pub const BAD_SYSCALL: u16 = BASE + 6;
}

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
