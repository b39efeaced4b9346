//! The paravirtual MMU ABI, version [`PV_MMU_ABI_VERSION`]: what a guest
//! kernel and the shadow hosting ([`super::ShadowVcpuHost`]) say to each
//! other, so that a shadow MMU in the VMM sees the guest's page faults and
//! CR3 loads, which KVM never passes to userspace.
//!
//! A guest that speaks it runs unchanged under the `ept` backend (the VMM
//! then answers every call "execute the native instruction"), which is
//! what makes differential tests between the backends possible.
//!
//! # Hypercalls
//!
//! The guest kernel (CPL0) calls the VMM with a 4-byte port read,
//! `in eax, dx`, on one port per hypercall ([`hypercall`]). The VMM reads
//! the arguments from the vCPU's registers (RDI, RSI) and, for exceptions,
//! from the kernel stack; its 32-bit answer is the value read into EAX. A
//! port read of another size, or a write, to these ports is a malformed
//! hypercall. Ports [`hypercall::BASE`] to [`hypercall::END`] are reserved;
//! the ones this contract does not name ([`hypercall::BASE`],
//! `BASE + 1`, `BASE + 6`) are left to the VMM and its guest (for
//! example "the program is done" and "report a result").
//!
//! Page-table hypercalls ([`hypercall::LOAD_CR3`], [`hypercall::INVLPG`],
//! [`hypercall::FLUSH_TLB`]) and [`hypercall::EXCEPTION`] answer with
//! [`action`] bits, which the kernel carries out in this order: replay the
//! queue, execute the native instruction, deliver the fault, resume
//! elsewhere.
//!
//! # Exceptions
//!
//! Every IDT vector the guest does not handle itself (and not
//! [`REPLAY_VECTOR`], whose gate goes straight to the kernel's return
//! path) has a stub that pushes a zero error code (if the CPU pushed
//! none) and the vector number, saves RAX and RDX, and makes the
//! [`hypercall::EXCEPTION`] hypercall. At that exit RSP points to this
//! frame (8-byte words, offsets in [`frame`]):
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
//! The VMM may change the frame before it answers: an emulated instruction
//! moves the saved RIP past itself and writes the registers it loads
//! (RAX and RDX in the frame, RSP in the frame, the others in the vCPU).
//!
//! # Faults delivered to the guest
//!
//! A fault that belongs to the guest (the MMU gives it back) is answered
//! [`action::DELIVER`]: the kernel appends (vector, error code, CR2) from
//! the frame to the vCPU's fault log ([`percpu::FAULT_COUNT`],
//! [`percpu::FAULT_LOG`]) and, if the fault interrupted CPL3 and
//! [`percpu::FAULT_RIP`] is not 0, resumes the program there with every
//! register as it was at the fault (RSP included). The VMM first writes
//! into the frame's error-code word the error code the guest must see
//! (under a shadow MMU the hardware's differs from the architectural one),
//! and CR2 if it differs.
//!
//! # The per-vCPU kernel page and the replay queue
//!
//! Each vCPU has a kernel page (offsets in [`percpu`]) and a replay queue
//! page: up to [`REPLAY_CAPACITY`] entries of two words, (guest-virtual
//! address, value). Where they are is the VMM's choice, told to the
//! hosting in [`PvVcpuLayout`](super::PvVcpuLayout). The kernel runs the
//! queue before every return from the kernel to CPL3 (and on
//! [`action::REPLAY`]): it stores each value at its address with a CPL0
//! 64-bit store, in order, then clears [`percpu::REPLAY_COUNT`], then
//! reloads CR3. An address with [`REASSERT`] (bit 0) set asks for a
//! re-assertion instead: the kernel reads the entry and writes the value
//! it read back with `lock cmpxchg`, retrying until no concurrent change
//! came in between, so KVM learns the entry's current value and no newer
//! value is ever overwritten; [`REASSERT_FRAME`] (bit 1) re-asserts the
//! first two bytes of a zapped shadow page, which makes KVM drop its whole
//! shadow of the page. This is how a VMM-side shadow MMU on a host whose
//! KVM shadows guest tables (PVM, or KVM without EPT/NPT) makes its table
//! writes visible to KVM: KVM tracks guest CPL0 writes, not host writes.
//! The addresses are in the shadow MMU's host window, which every shadow
//! root maps (supervisor-only) in the upper half.
//!
//! When the queue is drained and [`percpu::REPLAY_PENDING`] is set, the
//! routine makes the [`hypercall::REPLAY_REFILL`] hypercall and runs the
//! queue again. The return path checks the count and `REPLAY_PENDING` and
//! then executes `iretq`; a VMM that queues work while the vCPU is between
//! that check and the `iretq` moves RIP back to the check (the restart
//! points the guest gives in [`PvKernel`](super::PvKernel)). A vCPU
//! stopped at CPL3 is sent into the kernel with [`REPLAY_VECTOR`].
//!
//! # Versions
//!
//! | version | change |
//! | --- | --- |
//! | 1 | the first contract: the hypercalls, frame, kernel page and queue above |

/// The version of the contract this crate speaks. A change a guest built
/// for an older version cannot follow bumps it.
pub const PV_MMU_ABI_VERSION: u32 = 1;

/// Hypercall ports (4-byte `in eax, dx` from CPL0).
pub mod hypercall {
    /// The first reserved port. The VMM and its guest may use it (for
    /// example: the program is done).
    pub const BASE: u16 = 0x0500;
    /// An exception; frame on the stack (see the module docs). Answer:
    /// [`action`](super::action) bits.
    pub const EXCEPTION: u16 = BASE + 2;
    /// Load CR3: RDI = new CR3. Answer: [`action`](super::action) bits.
    pub const LOAD_CR3: u16 = BASE + 3;
    /// INVLPG: RDI = address. Answer: [`action`](super::action) bits.
    pub const INVLPG: u16 = BASE + 4;
    /// Flush the TLB (non-global entries). Answer:
    /// [`action`](super::action) bits.
    pub const FLUSH_TLB: u16 = BASE + 5;
    /// Read CR3 (the guest's own, which under a shadow MMU is not the one
    /// the hardware uses). Answer: its low 32 bits (the guest's page
    /// tables live below 4 GiB).
    pub const READ_CR3: u16 = BASE + 7;
    /// The replay routine drained its queue and found
    /// [`REPLAY_PENDING`](super::percpu::REPLAY_PENDING) set: the VMM
    /// refills the queue and sets or clears `REPLAY_PENDING`. Answer 0.
    pub const REPLAY_REFILL: u16 = BASE + 8;
    /// One past the last reserved port.
    pub const END: u16 = BASE + 9;
}

/// Answer bits of the page-table and exception hypercalls.
pub mod action {
    /// Replay the vCPU's queue first.
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
    /// replay routine asks for it with
    /// [`REPLAY_REFILL`](super::hypercall::REPLAY_REFILL).
    pub const REPLAY_PENDING: u64 = 24;
    /// Where [`DELIVER`](super::action::DELIVER) resumes a CPL3 program
    /// (0: nowhere).
    pub const FAULT_RIP: u64 = 32;
    /// Faults delivered since the run started; can exceed
    /// [`FAULT_CAPACITY`](super::FAULT_CAPACITY) (only the count grows then).
    pub const FAULT_COUNT: u64 = 40;
    /// The fault log: entries of three words (vector, error code, CR2)
    /// from here to the end of the page.
    pub const FAULT_LOG: u64 = 64;
}

/// Byte offsets of the words of the exception frame at the kernel's RSP
/// during an [`EXCEPTION`](hypercall::EXCEPTION) hypercall.
pub mod frame {
    /// The interrupted context's RDX.
    pub const RDX: u64 = 0;
    /// The interrupted context's RAX.
    pub const RAX: u64 = 8;
    /// The vector.
    pub const VECTOR: u64 = 16;
    /// The error code (0 for vectors without one).
    pub const ERROR_CODE: u64 = 24;
    /// The interrupted RIP.
    pub const RIP: u64 = 32;
    /// The interrupted CS.
    pub const CS: u64 = 40;
    /// The interrupted RFLAGS.
    pub const RFLAGS: u64 = 48;
    /// The interrupted RSP.
    pub const RSP: u64 = 56;
    /// The interrupted SS.
    pub const SS: u64 = 64;
}

/// Words of one fault-log entry.
pub const FAULT_ENTRY_WORDS: u64 = 3;

/// Entries the fault log holds (the rest of the kernel page).
pub const FAULT_CAPACITY: u64 = (mmu_api::PAGE_SIZE - percpu::FAULT_LOG) / (8 * FAULT_ENTRY_WORDS);

/// Entries the replay queue page holds.
pub const REPLAY_CAPACITY: usize = 256;

/// Bytes of one replay-queue entry (address word, value word).
pub const REPLAY_ENTRY_SIZE: u64 = 16;

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

/// The exception the guest's stub reported, read from its frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ExceptionFrame {
    /// Where the frame is (the kernel's RSP at the hypercall).
    pub at: u64,
    /// The vector (14 for #PF).
    pub vector: u8,
    /// The error code the CPU pushed (0 for vectors without one).
    pub error_code: u64,
    /// CR2 when the stub exited (the faulting address for a #PF).
    pub cr2: u64,
    /// RIP of the interrupted instruction.
    pub rip: u64,
    /// CS of the interrupted context; its low two bits are the CPL.
    pub cs: u16,
    /// RSP of the interrupted context.
    pub rsp: u64,
    /// RFLAGS of the interrupted context.
    pub rflags: u64,
}

impl ExceptionFrame {
    /// The privilege level the exception interrupted.
    pub fn cpl(&self) -> u8 {
        (self.cs & 3) as u8
    }

    /// The vector's mnemonic (`#PF`), or `vector N` for others.
    pub fn name(&self) -> String {
        vector_name(self.vector)
    }
}

impl std::fmt::Display for ExceptionFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} error code {:#x} at rip {:#x} (CPL{})",
            self.name(),
            self.error_code,
            self.rip,
            self.cpl()
        )?;
        if self.vector == 14 {
            write!(f, ", cr2 {:#x}", self.cr2)?;
        }
        Ok(())
    }
}

/// The mnemonic of an architectural exception vector, or `vector N`.
pub fn vector_name(vector: u8) -> String {
    const NAMES: [&str; 22] = [
        "#DE",
        "#DB",
        "NMI",
        "#BP",
        "#OF",
        "#BR",
        "#UD",
        "#NM",
        "#DF",
        "vector 9",
        "#TS",
        "#NP",
        "#SS",
        "#GP",
        "#PF",
        "vector 15",
        "#MF",
        "#AC",
        "#MC",
        "#XM",
        "#VE",
        "#CP",
    ];
    match NAMES.get(usize::from(vector)) {
        Some(name) => (*name).to_string(),
        None => format!("vector {vector}"),
    }
}
