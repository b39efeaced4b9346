//! The shadow backend hosted on KVM: what one vCPU's exit handler does
//! when the tables the hardware walks are the shadow MMU's, for a guest
//! that speaks the paravirtual MMU ABI ([`abi`], version
//! [`abi::PV_MMU_ABI_VERSION`]).
//!
//! KVM never passes a guest #PF, a CR3 write or INVLPG to userspace, so
//! a shadow MMU in the VMM only sees them if the guest reports them: its
//! #PF vector is a stub that exits by port I/O, and CR3 loads, INVLPG and
//! TLB flushes are hypercalls. [`ShadowVcpuHost`] is the VMM's half of
//! that conversation for one vCPU:
//!
//! - **Roots**: the vCPU's real CR3 is the shadow root the MMU gives; the
//!   guest's own CR3 lives here ([`ShadowVcpuHost::guest_cr3`]) and is
//!   what the guest's READ_CR3 hypercall answers. A new root gets the
//!   kernel's own pages (code, descriptor tables, TSS, this vCPU's kernel
//!   area: [`PvVcpuLayout::kernel_pages`]) faulted in at once: the CPU
//!   delivers exceptions through them, and a #PF there would be a double
//!   fault.
//! - **Coherence** (`Coherence::Replay`, a host whose KVM shadows guest
//!   tables, as PVM does): KVM does not see the VMM's writes to the pool.
//!   Every vCPU keeps the set of journaled records it has not replayed
//!   ([`ReplayHub`]); before its CPL3 code runs again its kernel replays
//!   them from its queue at CPL0 (the return path does so whenever the
//!   queue is not empty, and a vCPU kicked at CPL3 is sent there with
//!   [`abi::REPLAY_VECTOR`], unless it stopped between a system call's
//!   trap and the kernel entry, which PVM then holds where the VMM cannot
//!   see it: [`PvKernel::syscall_entry_pending`]). Each journaled change
//!   also posted a remote flush, which kicked every vCPU, so no vCPU runs
//!   CPL3 code on a stale KVM entry. When a vCPU has replayed everything
//!   up to a batch, the frames that batch carried leave quarantine.
//! - **Emulation**: an MMIO access (the reserved-bit #PF) and a write to a
//!   write-protected guest page table are decoded at the faulting RIP
//!   ([`insn`]) and carried out against the device bus or through the
//!   MMU, and RIP advances.
//!
//! # In a host's vCPU loop
//!
//! What the guest's kernel looks like comes in from the VMM: a
//! [`PvVcpuLayout`] per vCPU (where its kernel page and replay queue are,
//! which pages every root must map) and a [`PvKernel`] (restart points of
//! the replay routine, how to recognise a pending system-call entry). The
//! vCPU itself is a [`PvVcpu`] ([`KvmPvVcpu`] over a `VcpuFd` and guest
//! memory). Then, around `KVM_RUN`:
//!
//! | when | call |
//! | --- | --- |
//! | before every entry | [`ShadowVcpuHost::prepare_entry`] |
//! | after every return from `KVM_RUN` | [`ShadowVcpuHost::exit_guest`] |
//! | MMIO and other exits | [`VcpuExits::handle_kvm_exit`] as under any backend |
//! | a read of a port in [`abi::hypercall`] | [`ShadowVcpuHost::hypercall`], whose answer is the value read |
//!
//! The `host_vmm` example of this crate does exactly this with a minimal
//! long-mode guest.

pub mod abi;
mod emulate;
pub mod insn;
mod replay;
#[cfg(all(test, feature = "ept"))]
mod tests;
mod vcpu;

use std::fmt;
use std::sync::Arc;

use kvm_bindings::kvm_regs;
use mmu_api::paging::{Cr0, Cr4, Efer, WalkError};
use mmu_api::{Gpa, Gva, PagingContext, PfErrorCode};
use mmu_backends::shadow::{Coherence, ShadowBackend};

pub use abi::ExceptionFrame;
pub use insn::EmulateError;
pub use replay::ReplayHub;
pub use vcpu::{KvmPvVcpu, KvmVcpuContext, PvVcpu, ReadExit, complete_pending_io, complete_read};

use crate::bus::MmioBus;
use crate::error::ExitError;
use crate::exits::{Action, VcpuExits};
use crate::ports::PortError;
use emulate::Emulation;

/// RFLAGS.AC: alignment check (and, with SMAP, supervisor access to user
/// pages).
const RFLAGS_AC: u64 = 1 << 18;

/// Why the shadow hosting could not serve an exit.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HostingError {
    /// A vCPU register or event operation failed.
    #[error(transparent)]
    Vcpu(#[from] PortError),
    /// Guest memory could not be read or written on the guest's behalf.
    #[error("cannot access guest memory at {gpa}")]
    Memory {
        /// Where.
        gpa: Gpa,
        /// What vm-memory reported.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The MMU exit handler failed.
    #[error("the MMU exit handler failed")]
    Exit(#[from] ExitError),
    /// The instruction to emulate could not be read through the guest's
    /// tables.
    #[error("cannot fetch the instruction at {rip:#x}")]
    Fetch {
        /// Where the instruction is.
        rip: u64,
        /// Why the walk failed.
        #[source]
        source: WalkError,
    },
    /// The faulting instruction is not one the emulator handles.
    #[error("cannot emulate the faulting instruction")]
    Emulate(#[from] EmulateError),
    /// The MMU took a read for a write to a page table it protects.
    #[error("a read at {gpa} faulted as a page-table write at rip {rip:#x}")]
    ReadAsTableWrite {
        /// The address read.
        gpa: Gpa,
        /// The instruction.
        rip: u64,
    },
    /// The MMU answered a page fault with an action the hosting has no
    /// way to carry out.
    #[error("the MMU answered a page fault with {action:?}, which the hosting cannot carry out")]
    UnexpectedAction {
        /// The action.
        action: Action,
    },
    /// The vCPU's last exit is not the read an answer was given for.
    #[error("the vCPU no longer holds the {kind:?} read exit of {len} bytes it is answered for")]
    NoReadExit {
        /// The kind of read answered.
        kind: ReadExit,
        /// Its size in bytes.
        len: usize,
    },
    /// A port in the hypercall range was read that this contract does not
    /// define (one of those left to the VMM).
    #[error("port {port:#x} is not a hypercall of the paravirtual MMU ABI")]
    NotAHypercall {
        /// The port.
        port: u16,
    },
}

/// Where one vCPU's kernel keeps what the hosting reads and writes, and
/// the pages every shadow root must map before the vCPU runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PvVcpuLayout {
    /// Pages the CPU uses to deliver an exception or reach the kernel
    /// (code, GDT, IDT, TSS, this vCPU's kernel stack and pages), with the
    /// error code of the access the CPU makes there (a write for data the
    /// CPU updates or pushes to, a fetch for code). Every new root gets
    /// them faulted in. They must stay writable while the guest runs: keep
    /// them out of dirty-logged memslots (a harvest write-protects a
    /// logged slot's pages, and a #PF on the kernel stack is a double
    /// fault).
    pub kernel_pages: Vec<(Gva, PfErrorCode)>,
    /// The guest-physical address of the vCPU's kernel page (offsets in
    /// [`abi::percpu`]).
    pub kernel_page: Gpa,
    /// The guest-physical address of the vCPU's replay queue page.
    pub replay_queue: Gpa,
}

/// What the hosting must know about the guest kernel's code: where it may
/// move a vCPU that it interrupted inside the kernel, and how to recognise
/// a CPL3 program stopped on its way into the kernel.
pub trait PvKernel: Send + Sync + fmt::Debug {
    /// Where a vCPU at CPL0 with RIP `rip` must resume after the VMM
    /// queued replay work, so that the work is done before the kernel
    /// returns to CPL3: the return path's check again if the vCPU already
    /// read the queue count, else `rip`.
    fn replay_restart_rip(&self, rip: u64) -> u64;

    /// Where a vCPU at CPL0 with RIP `rip` must resume after the VMM gave
    /// it a new root: the read of CR3 again if it is about to write back a
    /// CR3 value it read before (the old root). `None` elsewhere.
    fn cr3_reload_restart(&self, rip: u64) -> Option<u64>;

    /// True if `rip` is inside the replay routine, which is reading the
    /// queue: new work must go through
    /// [`REPLAY_PENDING`](abi::percpu::REPLAY_PENDING).
    fn in_replay_routine(&self, rip: u64) -> bool;

    /// How many bytes before RIP [`syscall_entry_pending`](Self::syscall_entry_pending)
    /// looks at (0, the default: the guest has no system call that traps
    /// at CPL3).
    fn syscall_bytes_len(&self) -> usize {
        0
    }

    /// True if a vCPU stopped at CPL3 with registers `regs`, the bytes
    /// before RIP being `before_rip`, has executed a system call's trap
    /// but not yet entered the kernel. PVM can stop a vCPU there with the
    /// exception it owes the guest held where `KVM_GET_VCPU_EVENTS` does
    /// not show it, and an exception the VMM injects then replaces it.
    fn syscall_entry_pending(&self, before_rip: &[u8], regs: &kvm_regs) -> bool {
        let _ = (before_rip, regs);
        false
    }
}

/// What a page fault the guest's stub reported comes to, once the hosting
/// served it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PageFaultAnswer {
    /// Served (an SPTE installed, or the instruction emulated and RIP
    /// moved past it): resume the interrupted context (answer 0).
    Resume,
    /// The fault is the guest's: deliver a #PF with this error code and
    /// CR2 (how is the VMM's: [`abi::action::DELIVER`] after writing the
    /// error code into the frame, or ending the run).
    DeliverPageFault {
        /// The architectural error code.
        error_code: PfErrorCode,
        /// The faulting address.
        cr2: Gva,
    },
    /// The access raises #GP(0) in the guest.
    GeneralProtection,
}

/// What a hypercall of the ABI comes to ([`ShadowVcpuHost::hypercall`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HypercallAnswer {
    /// Complete the port read with this value.
    Answer(u32),
    /// An exception hypercall whose page fault belongs to the guest (see
    /// [`PageFaultAnswer::DeliverPageFault`]); `frame` is what the stub
    /// reported.
    DeliverPageFault {
        /// The stub's frame.
        frame: ExceptionFrame,
        /// The architectural error code.
        error_code: PfErrorCode,
        /// The faulting address.
        cr2: Gva,
    },
    /// An exception hypercall the hosting does not serve: a vector other
    /// than #PF, or a #GP the MMU decided on. The VMM decides (typically:
    /// the guest crashed).
    Unhandled(ExceptionFrame),
}

/// The #PF vector.
const VECTOR_PF: u8 = 14;

/// The paging context of the interrupted guest context: `base` (MAXPHYADDR,
/// CPUID features) with the control registers, EFER, CPL and RFLAGS.AC
/// read from `vcpu`, and CR3 `cr3` if given.
pub fn current_context(
    base: &PagingContext,
    vcpu: &mut dyn PvVcpu,
    cr3: Option<u64>,
) -> Result<PagingContext, PortError> {
    let sregs = vcpu.get_sregs()?;
    let rflags = vcpu.get_regs()?.rflags;
    let mut ctx = *base;
    ctx.cr0 = Cr0::from_bits_truncate(sregs.cr0);
    ctx.cr3 = cr3.unwrap_or(sregs.cr3);
    ctx.cr4 = Cr4::from_bits_truncate(sregs.cr4);
    ctx.efer = Efer::from_bits_truncate(sregs.efer);
    ctx.cpl = (sregs.cs.selector & 3) as u8;
    ctx.eflags_ac = rflags & RFLAGS_AC != 0;
    Ok(ctx)
}

/// Reads the exception frame the guest's stub left at the kernel's RSP
/// (see [`abi`]), and CR2.
pub fn read_exception_frame(vcpu: &mut dyn PvVcpu) -> Result<ExceptionFrame, HostingError> {
    use abi::frame;
    let at = vcpu.get_regs()?.rsp;
    let mut word = |offset: u64| vcpu.read_guest_u64(Gpa(at + offset));
    let vector = word(frame::VECTOR)?;
    let error_code = word(frame::ERROR_CODE)?;
    let rip = word(frame::RIP)?;
    let cs = word(frame::CS)?;
    let rflags = word(frame::RFLAGS)?;
    let rsp = word(frame::RSP)?;
    let cr2 = vcpu.get_sregs()?.cr2;
    Ok(ExceptionFrame {
        at,
        vector: vector as u8,
        error_code,
        cr2,
        rip,
        cs: cs as u16,
        rsp,
        rflags,
    })
}

/// True if `backend` needs the guest to replay its table writes
/// (`Coherence::Replay`): then its vCPUs share a [`ReplayHub`].
pub fn needs_replay(backend: &ShadowBackend) -> bool {
    matches!(backend.config().coherence, Coherence::Replay { .. })
}

/// What one vCPU's exit handler needs to host the shadow backend.
#[derive(Debug)]
pub struct ShadowVcpuHost {
    index: usize,
    backend: ShadowBackend,
    hub: Option<Arc<ReplayHub>>,
    kernel: Arc<dyn PvKernel>,
    /// The pool's hardware addresses: a CR3 outside is the guest's own (a
    /// new run set it).
    pool: std::ops::Range<u64>,
    guest_cr3: u64,
    layout: PvVcpuLayout,
    /// The VM's paging context (MAXPHYADDR, CPUID features).
    base: PagingContext,
    /// The replay queue was brought up to date since the vCPU last left
    /// the guest.
    replay_settled: bool,
}

impl ShadowVcpuHost {
    /// The host of vCPU `index` of `backend`. `hub` is shared by the VM's
    /// vCPUs (`None` when the hardware walks the pool itself: see
    /// [`ReplayHub::for_backend`]); `base` is the VM's paging context,
    /// whose CR3 is the guest's first.
    pub fn new(
        index: usize,
        backend: ShadowBackend,
        hub: Option<Arc<ReplayHub>>,
        layout: PvVcpuLayout,
        kernel: Arc<dyn PvKernel>,
        base: PagingContext,
    ) -> Self {
        let (_, size, hpa) = backend.pool_region();
        ShadowVcpuHost {
            index,
            backend,
            hub,
            kernel,
            pool: hpa.raw()..hpa.raw() + size,
            guest_cr3: base.cr3,
            layout,
            base,
            replay_settled: false,
        }
    }

    /// The guest's own CR3 (what its READ_CR3 hypercall answers).
    pub fn guest_cr3(&self) -> u64 {
        self.guest_cr3
    }

    /// True if `cr3` is a shadow root rather than the guest's own tables.
    pub fn is_root(&self, cr3: u64) -> bool {
        self.pool.contains(&cr3)
    }

    /// The vCPU left the guest (after every return from `KVM_RUN`, kicks
    /// included): calls [`VcpuExits::exit_guest`] too.
    pub fn exit_guest(&mut self, exits: &mut VcpuExits) {
        exits.exit_guest();
        self.replay_settled = false;
    }

    /// Before an entry: a new run's CR3 (the guest's own tables, set by
    /// the VMM) becomes the guest's context, the MMU's root goes into the
    /// hardware CR3, and the vCPU's replay records are queued.
    pub fn prepare_entry(
        &mut self,
        vcpu: &mut dyn PvVcpu,
        exits: &mut VcpuExits,
    ) -> Result<(), HostingError> {
        let sregs = vcpu.get_sregs()?;
        if !self.is_root(sregs.cr3) {
            // A new run loaded the guest's own tables.
            self.new_run(sregs.cr3);
            let ctx = current_context(&self.base, vcpu, Some(sregs.cr3))?;
            exits.set_paging_context(&ctx)?;
        }
        // `prepare_entry` marks the vCPU as in guest mode, where another
        // thread's remote flush only kicks it and waits: nothing that takes
        // the MMU lock may run then. So take the requests, leave guest mode
        // again for the work (root, prefaults, replay queue), and repeat
        // until an entry finds nothing new.
        loop {
            let action = exits.prepare_entry()?;
            let (root, flush) = match action {
                Action::LoadRoot(load) => (load.root.map(|r| r.raw()), load.flush_tlb),
                _ => (None, false),
            };
            let current = vcpu.get_sregs()?;
            if root.is_none_or(|r| r == current.cr3) && !flush && self.replay_settled {
                return Ok(());
            }
            exits.exit_guest();
            self.load_action_root(vcpu, exits, action)?;
            let sregs = vcpu.get_sregs()?;
            self.prepare_replay(vcpu, exits, &sregs)?;
            self.replay_settled = true;
        }
    }

    /// The guest's LOAD_CR3 hypercall: `cr3` becomes the guest's context
    /// and the MMU's root for it goes into the hardware CR3. Answers the
    /// [`abi::action`] bits (none: the kernel must not load `cr3` itself).
    pub fn load_cr3(
        &mut self,
        vcpu: &mut dyn PvVcpu,
        exits: &mut VcpuExits,
        cr3: u64,
    ) -> Result<u32, HostingError> {
        let guest = self.guest_cr3;
        self.guest_cr3 = cr3;
        let ctx = match current_context(&self.base, vcpu, Some(cr3)) {
            Ok(ctx) => ctx,
            Err(e) => {
                self.guest_cr3 = guest;
                return Err(e.into());
            }
        };
        let action = exits.set_paging_context(&ctx)?;
        self.load_action_root(vcpu, exits, action)?;
        Ok(0)
    }

    /// The guest's INVLPG hypercall. Answers [`abi::action::NATIVE`]: the
    /// native INVLPG still runs (it makes KVM drop what it cached from the
    /// pool).
    pub fn invlpg(&mut self, exits: &mut VcpuExits, gva: Gva) -> u32 {
        exits.invlpg(gva);
        abi::action::NATIVE
    }

    /// The guest's FLUSH_TLB hypercall. Answers [`abi::action::NATIVE`].
    pub fn flush_tlb(&mut self, exits: &mut VcpuExits) -> u32 {
        exits.flush_tlb(false);
        abi::action::NATIVE
    }

    /// A #PF the guest's stub reported (`frame`): the MMU serves it, and an
    /// access it answers with MMIO (on `bus`) or with the emulation of a
    /// page-table write is emulated here, RIP moving past it.
    pub fn page_fault(
        &mut self,
        vcpu: &mut dyn PvVcpu,
        exits: &mut VcpuExits,
        bus: &mut dyn MmioBus,
        frame: &ExceptionFrame,
    ) -> Result<PageFaultAnswer, HostingError> {
        let error_code = PfErrorCode::from_bits_retain(frame.error_code as u32);
        let action = exits.page_fault(Gva(frame.cr2), error_code)?;
        let target = match action {
            Action::Resume => return Ok(PageFaultAnswer::Resume),
            Action::EmulateMmio { gpa } => Emulation::Mmio(gpa),
            Action::EmulateWrite { gpa } => Emulation::PageTableWrite(gpa),
            Action::InjectPageFault { error_code, cr2 } => {
                return Ok(PageFaultAnswer::DeliverPageFault { error_code, cr2 });
            }
            Action::InjectGeneralProtection => return Ok(PageFaultAnswer::GeneralProtection),
            action => return Err(HostingError::UnexpectedAction { action }),
        };
        emulate::emulate(vcpu, exits, bus, frame, target)?;
        Ok(PageFaultAnswer::Resume)
    }

    /// Serves a read of hypercall port `port` ([`abi::hypercall`]) with
    /// the arguments in the vCPU's registers. An exception other than a
    /// #PF, and a #PF that belongs to the guest, go back to the VMM.
    pub fn hypercall(
        &mut self,
        vcpu: &mut dyn PvVcpu,
        exits: &mut VcpuExits,
        bus: &mut dyn MmioBus,
        port: u16,
    ) -> Result<HypercallAnswer, HostingError> {
        use abi::hypercall;
        let answer = match port {
            hypercall::EXCEPTION => {
                let frame = read_exception_frame(vcpu)?;
                if frame.vector != VECTOR_PF {
                    return Ok(HypercallAnswer::Unhandled(frame));
                }
                match self.page_fault(vcpu, exits, bus, &frame)? {
                    PageFaultAnswer::Resume => 0,
                    PageFaultAnswer::DeliverPageFault { error_code, cr2 } => {
                        return Ok(HypercallAnswer::DeliverPageFault {
                            frame,
                            error_code,
                            cr2,
                        });
                    }
                    PageFaultAnswer::GeneralProtection => {
                        return Ok(HypercallAnswer::Unhandled(frame));
                    }
                }
            }
            hypercall::LOAD_CR3 => {
                let cr3 = vcpu.get_regs()?.rdi;
                self.load_cr3(vcpu, exits, cr3)?
            }
            hypercall::INVLPG => {
                let gva = vcpu.get_regs()?.rdi;
                self.invlpg(exits, Gva(gva))
            }
            hypercall::FLUSH_TLB => self.flush_tlb(exits),
            hypercall::READ_CR3 => self.guest_cr3 as u32,
            hypercall::REPLAY_REFILL => {
                self.replay_refill(vcpu)?;
                0
            }
            port => return Err(HostingError::NotAHypercall { port }),
        };
        Ok(HypercallAnswer::Answer(answer))
    }

    /// Loads the root `action` names (if any) into the hardware CR3.
    fn load_action_root(
        &mut self,
        vcpu: &mut dyn PvVcpu,
        exits: &mut VcpuExits,
        action: Action,
    ) -> Result<(), HostingError> {
        let Action::LoadRoot(load) = action else {
            return Ok(());
        };
        let Some(root) = load.root else {
            return Ok(());
        };
        let mut sregs = vcpu.get_sregs()?;
        self.load_root(vcpu, exits, &mut sregs, root.raw(), load.flush_tlb)
    }

    /// Loads `root` into the hardware CR3 if it is not there, and faults
    /// the kernel's pages into it.
    fn load_root(
        &mut self,
        vcpu: &mut dyn PvVcpu,
        exits: &mut VcpuExits,
        sregs: &mut kvm_bindings::kvm_sregs,
        root: u64,
        flush: bool,
    ) -> Result<(), HostingError> {
        let direct_flush = flush && self.hub.is_none();
        if sregs.cr3 == root && !direct_flush {
            return Ok(());
        }
        // The exit may be a hypercall KVM has yet to complete; changing the
        // special registers under a pending port read goes wrong under PVM.
        vcpu.complete_pending_io()?;
        *sregs = vcpu.get_sregs()?;
        sregs.cr3 = root;
        vcpu.set_sregs(sregs)?;
        if sregs.cs.selector & 3 == 0 {
            // Stopped between a CR3 read and its write back: the write
            // would load the old root again. Read the new one first.
            let mut regs = vcpu.get_regs()?;
            if let Some(rip) = self.kernel.cr3_reload_restart(regs.rip) {
                regs.rip = rip;
                vcpu.set_regs(&regs)?;
            }
        }
        for &(gva, code) in &self.layout.kernel_pages {
            // Only the fault's side effect matters: a page the guest's
            // tables do not map stays unmapped, as on hardware.
            exits.page_fault(gva, code)?;
        }
        Ok(())
    }
}
