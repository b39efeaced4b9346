//! One vCPU's run: register setup, the exit loop, and the hooks a caller
//! plugs into it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_regs, kvm_sregs};
use kvm_ioctls::{VcpuExit, VcpuFd};
use mmu_api::{Gpa, VcpuId};
use mmu_integration::Action;
use mmu_integration::kvm::{PageFaultDelivery, Routed, apply_action};
use mmu_integration::shadow_host::{KvmVcpuContext, ReadExit, complete_read, read_exception_frame};
use tracing::{debug, trace};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::error::{GuestException, IoDirection, KvmError, VcpuError};
use crate::kick::{RunPageGuard, VcpuControl, request};
use crate::kit::Kernel;
use crate::kit::abi::{REPLAY_CAPACITY, REPLAY_ENTRY_SIZE, action, frame, hypercall, percpu};
use crate::layout::Layout;

/// A page-table operation the guest kernel asks the VMM to serve
/// (only under [`PagingOps::Paravirt`](crate::PagingOps::Paravirt)).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PagingOp {
    /// Load CR3 with this value.
    LoadCr3(u64),
    /// Invalidate the translation of this address.
    Invlpg(u64),
    /// Flush the TLB.
    FlushTlb,
}

/// What to do after a guest exception.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExceptionAction {
    /// Return to the guest with these [`action`](crate::kit::abi::action)
    /// bits for the kernel (0: retry the faulting instruction).
    Resume(u32),
    /// Resume the interrupted context at `rip` instead of the faulting
    /// instruction, with the other `action` bits in `actions`.
    Redirect {
        /// Where to resume.
        rip: u64,
        /// Further action bits (replay, flush).
        actions: u32,
    },
    /// Stop the vCPU with [`VcpuError::GuestException`].
    Fail,
}

/// A result the guest reported (the REPORT system call).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Report {
    /// The tag (RSI).
    pub tag: u64,
    /// The value (RDI).
    pub value: u64,
}

/// How a vCPU's run ended, when it did not fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VcpuOutcome {
    /// The program finished (EXIT system call or DONE hypercall).
    Done {
        /// Its exit code.
        exit_code: u64,
    },
    /// A [`Kicker::stop`](crate::Kicker::stop) ended the run.
    Stopped,
}

/// Exit counters of one vCPU run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ExitStats {
    /// Returns from `KVM_RUN` with an exit.
    pub exits: u64,
    /// Guest-kit hypercalls (a subset of `exits`).
    pub hypercalls: u64,
    /// Exceptions the kernel's stubs reported (a subset of `hypercalls`).
    pub exceptions: u64,
    /// Page-table hypercalls (a subset of `hypercalls`).
    pub paging_ops: u64,
    /// Port I/O served by the exit handler.
    pub device_io: u64,
    /// `KVM_RUN` returns with `EINTR` (kicks, signals).
    pub interrupted: u64,
    /// Exits the exit handler's [`kvm_exit`](ExitHandler::kvm_exit) served
    /// (a subset of `exits`; MMIO through an MMU backend).
    pub routed: u64,
}

/// One vCPU's result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VcpuReport {
    /// Which vCPU.
    pub id: VcpuId,
    /// How its run ended.
    pub outcome: VcpuOutcome,
    /// Every REPORT, in order.
    pub reports: Vec<Report>,
    /// Exit counters.
    pub stats: ExitStats,
    /// Wall time from its first entry to its end.
    pub elapsed: Duration,
}

impl VcpuReport {
    /// The value of the last report with `tag`.
    pub fn last(&self, tag: u32) -> Option<u64> {
        self.reports
            .iter()
            .rev()
            .find(|r| r.tag == u64::from(tag))
            .map(|r| r.value)
    }
}

/// Hooks into a vCPU's exit loop. Each vCPU thread owns one handler.
///
/// The defaults make a VM whose MMU is entirely KVM's: page-table
/// hypercalls are answered "execute the native instruction", exceptions
/// stop the vCPU, and no device ports or MMIO exist. A VMM-side MMU
/// backend overrides them.
pub trait ExitHandler: Send {
    /// Called before every guest entry (after kicks, too).
    fn prepare_entry(&mut self, vcpu: &mut VcpuContext<'_>) -> Result<(), VcpuError> {
        let _ = vcpu;
        Ok(())
    }

    /// Called right after every return from `KVM_RUN` (an exit, or an
    /// entry a kick interrupted), before the exit is looked at.
    fn left_guest(&mut self) {}

    /// Offered every exit straight from `KVM_RUN`, before the VMM decodes
    /// it: return [`Routed::Handled`] with what to do next, or the exit back
    /// ([`Routed::Unhandled`]) for the VMM's own handling. An MMU exit
    /// handler ([`mmu_integration::VcpuExits::handle_kvm_exit`]) plugs in here.
    /// The exit borrows the vCPU's `kvm_run` page, so the action is carried
    /// out afterwards, by [`complete_exit`](Self::complete_exit).
    fn kvm_exit<'e>(&mut self, exit: VcpuExit<'e>) -> Result<Routed<'e>, VcpuError> {
        Ok(Routed::Unhandled(exit))
    }

    /// Carries out what [`kvm_exit`](Self::kvm_exit) decided, once the exit
    /// no longer borrows the vCPU. By default with
    /// [`mmu_integration::kvm::apply_action`], delivering a #PF by setting CR2.
    fn complete_exit(
        &mut self,
        vcpu: &mut VcpuContext<'_>,
        action: Action,
    ) -> Result<(), VcpuError> {
        apply_action(vcpu.fd(), action, PageFaultDelivery::SetCr2)?;
        Ok(())
    }

    /// The guest took `exception`.
    fn exception(
        &mut self,
        vcpu: &mut VcpuContext<'_>,
        exception: &GuestException,
    ) -> Result<ExceptionAction, VcpuError> {
        let _ = (vcpu, exception);
        Ok(ExceptionAction::Fail)
    }

    /// The kernel asks for `op`; the answer is [`action`] bits.
    fn paging_op(&mut self, vcpu: &mut VcpuContext<'_>, op: PagingOp) -> Result<u32, VcpuError> {
        let _ = (vcpu, op);
        Ok(action::NATIVE)
    }

    /// The kernel asks for the guest's CR3 (a paravirtual kernel's
    /// READ_CR3). By default the hardware's.
    fn read_cr3(&mut self, vcpu: &mut VcpuContext<'_>) -> Result<u64, VcpuError> {
        Ok(vcpu.sregs()?.cr3)
    }

    /// The kernel's replay routine drained its queue and found
    /// [`percpu::REPLAY_PENDING`] set: refill the queue and set or clear
    /// it. By default there is nothing more: it is cleared.
    fn replay_refill(&mut self, vcpu: &mut VcpuContext<'_>) -> Result<(), VcpuError> {
        vcpu.write_u64(vcpu.kernel_page() + percpu::REPLAY_PENDING, 0)
    }

    /// The guest reported a result (it is recorded in the run's report too).
    fn report(&mut self, vcpu: &mut VcpuContext<'_>, report: Report) -> Result<(), VcpuError> {
        let _ = (vcpu, report);
        Ok(())
    }

    /// A port read outside the kit's ports. Fill `data` and return true,
    /// or return false if no device has the port.
    fn port_read(
        &mut self,
        vcpu: &mut VcpuContext<'_>,
        port: u16,
        data: &mut [u8],
    ) -> Result<bool, VcpuError> {
        let _ = (vcpu, port, data);
        Ok(false)
    }

    /// A port write outside the kit's ports. Return false if no device has
    /// the port.
    fn port_write(
        &mut self,
        vcpu: &mut VcpuContext<'_>,
        port: u16,
        data: &[u8],
    ) -> Result<bool, VcpuError> {
        let _ = (vcpu, port, data);
        Ok(false)
    }

    /// An MMIO read. Fill `data` and return true, or return false if no
    /// device has the address.
    fn mmio_read(
        &mut self,
        vcpu: &mut VcpuContext<'_>,
        gpa: u64,
        data: &mut [u8],
    ) -> Result<bool, VcpuError> {
        let _ = (vcpu, gpa, data);
        Ok(false)
    }

    /// An MMIO write. Return false if no device has the address.
    fn mmio_write(
        &mut self,
        vcpu: &mut VcpuContext<'_>,
        gpa: u64,
        data: &[u8],
    ) -> Result<bool, VcpuError> {
        let _ = (vcpu, gpa, data);
        Ok(false)
    }
}

/// The default [`ExitHandler`]: KVM owns the MMU, nothing else exists.
#[derive(Clone, Copy, Debug, Default)]
pub struct DefaultHandler;

impl ExitHandler for DefaultHandler {}

/// A handler borrowed for one run, so its state (an MMU vCPU) outlives
/// the run.
impl<H: ExitHandler + ?Sized> ExitHandler for &mut H {
    fn prepare_entry(&mut self, vcpu: &mut VcpuContext<'_>) -> Result<(), VcpuError> {
        (**self).prepare_entry(vcpu)
    }

    fn left_guest(&mut self) {
        (**self).left_guest();
    }

    fn kvm_exit<'e>(&mut self, exit: VcpuExit<'e>) -> Result<Routed<'e>, VcpuError> {
        (**self).kvm_exit(exit)
    }

    fn complete_exit(
        &mut self,
        vcpu: &mut VcpuContext<'_>,
        action: Action,
    ) -> Result<(), VcpuError> {
        (**self).complete_exit(vcpu, action)
    }

    fn exception(
        &mut self,
        vcpu: &mut VcpuContext<'_>,
        exception: &GuestException,
    ) -> Result<ExceptionAction, VcpuError> {
        (**self).exception(vcpu, exception)
    }

    fn paging_op(&mut self, vcpu: &mut VcpuContext<'_>, op: PagingOp) -> Result<u32, VcpuError> {
        (**self).paging_op(vcpu, op)
    }

    fn read_cr3(&mut self, vcpu: &mut VcpuContext<'_>) -> Result<u64, VcpuError> {
        (**self).read_cr3(vcpu)
    }

    fn replay_refill(&mut self, vcpu: &mut VcpuContext<'_>) -> Result<(), VcpuError> {
        (**self).replay_refill(vcpu)
    }

    fn report(&mut self, vcpu: &mut VcpuContext<'_>, report: Report) -> Result<(), VcpuError> {
        (**self).report(vcpu, report)
    }

    fn port_read(
        &mut self,
        vcpu: &mut VcpuContext<'_>,
        port: u16,
        data: &mut [u8],
    ) -> Result<bool, VcpuError> {
        (**self).port_read(vcpu, port, data)
    }

    fn port_write(
        &mut self,
        vcpu: &mut VcpuContext<'_>,
        port: u16,
        data: &[u8],
    ) -> Result<bool, VcpuError> {
        (**self).port_write(vcpu, port, data)
    }

    fn mmio_read(
        &mut self,
        vcpu: &mut VcpuContext<'_>,
        gpa: u64,
        data: &mut [u8],
    ) -> Result<bool, VcpuError> {
        (**self).mmio_read(vcpu, gpa, data)
    }

    fn mmio_write(
        &mut self,
        vcpu: &mut VcpuContext<'_>,
        gpa: u64,
        data: &[u8],
    ) -> Result<bool, VcpuError> {
        (**self).mmio_write(vcpu, gpa, data)
    }
}

/// What an [`ExitHandler`] may touch during an exit: the vCPU's registers,
/// guest memory, and the kernel page of this vCPU.
#[derive(Debug)]
pub struct VcpuContext<'a> {
    id: VcpuId,
    fd: &'a mut VcpuFd,
    memory: &'a GuestMemoryMmap,
    layout: &'a Layout,
    kernel: &'a Kernel,
    regs: Option<kvm_regs>,
}

impl<'a> VcpuContext<'a> {
    /// Which vCPU.
    pub fn id(&self) -> VcpuId {
        self.id
    }

    /// The general registers at this exit (read once per exit).
    pub fn regs(&mut self) -> Result<kvm_regs, VcpuError> {
        if let Some(regs) = self.regs {
            return Ok(regs);
        }
        let regs = self
            .fd
            .get_regs()
            .map_err(|e| KvmError::new("KVM_GET_REGS", e))?;
        self.regs = Some(regs);
        Ok(regs)
    }

    /// Replaces the general registers.
    pub fn set_regs(&mut self, regs: &kvm_regs) -> Result<(), VcpuError> {
        self.fd
            .set_regs(regs)
            .map_err(|e| KvmError::new("KVM_SET_REGS", e))?;
        self.regs = Some(*regs);
        Ok(())
    }

    /// The special registers (control registers, segments).
    pub fn sregs(&self) -> Result<kvm_sregs, VcpuError> {
        Ok(self
            .fd
            .get_sregs()
            .map_err(|e| KvmError::new("KVM_GET_SREGS", e))?)
    }

    /// The vCPU's file descriptor, for anything else (events, MSRs).
    pub fn fd(&mut self) -> &mut VcpuFd {
        self.fd
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        self.memory
    }

    /// Reads the u64 at `gpa`.
    pub fn read_u64(&self, gpa: u64) -> Result<u64, VcpuError> {
        self.memory
            .read_obj(GuestAddress(gpa))
            .map_err(|source| VcpuError::Memory {
                gpa: Gpa(gpa),
                source,
            })
    }

    /// Reads the byte at `gpa`.
    pub fn memory_byte(&self, gpa: u64) -> Result<u8, VcpuError> {
        self.memory
            .read_obj(GuestAddress(gpa))
            .map_err(|source| VcpuError::Memory {
                gpa: Gpa(gpa),
                source,
            })
    }

    /// Writes the u64 at `gpa` (guest data only: page-table edits made from
    /// the host are not seen by a KVM that shadows guest tables; queue them
    /// with [`queue_replay`](Self::queue_replay) instead).
    pub fn write_u64(&self, gpa: u64, value: u64) -> Result<(), VcpuError> {
        self.memory
            .write_obj(value, GuestAddress(gpa))
            .map_err(|source| VcpuError::Memory {
                gpa: Gpa(gpa),
                source,
            })
    }

    /// This vCPU's kernel page.
    pub fn kernel_page(&self) -> u64 {
        self.layout.kernel_page(self.id.0 as usize)
    }

    /// Appends (address, value) stores to this vCPU's replay queue; the
    /// kernel performs them at CPL0 when an answer carries
    /// [`action::REPLAY`]. Fails if the queue would overflow.
    pub fn queue_replay(&self, stores: &[(u64, u64)]) -> Result<(), VcpuError> {
        let page = self.kernel_page();
        let count = self.read_u64(page + percpu::REPLAY_COUNT)?;
        if count as usize + stores.len() > REPLAY_CAPACITY {
            return Err(VcpuError::Handler(format!(
                "replay queue overflow: {count} queued, {} more, capacity {REPLAY_CAPACITY}",
                stores.len()
            )));
        }
        let queue = self.layout.replay_queue(self.id.0 as usize);
        for (i, (address, value)) in stores.iter().enumerate() {
            let slot = queue + REPLAY_ENTRY_SIZE * (count + i as u64);
            self.write_u64(slot, *address)?;
            self.write_u64(slot + 8, *value)?;
        }
        self.write_u64(page + percpu::REPLAY_COUNT, count + stores.len() as u64)
    }

    /// Sets where an [`action::REDIRECT`] answer resumes.
    pub fn set_redirect(&self, rip: u64) -> Result<(), VcpuError> {
        self.write_u64(self.kernel_page() + percpu::REDIRECT_RIP, rip)
    }

    /// The guest kernel this vCPU runs (its fault-return addresses).
    pub fn kernel(&self) -> &Kernel {
        self.kernel
    }

    /// The answer that delivers the #PF the kit's stub reported
    /// (`exception`) to the guest, as a fault with `error_code` and `cr2`
    /// ([`action::DELIVER`]): the error code is written into the
    /// exception frame (and CR2 set, if it differs), so the guest logs
    /// what the architecture says it sees, not what the hardware under a
    /// shadow MMU reported.
    ///
    /// A CPL3 fault resumes the program at its fault handler; a CPL0 fault
    /// of a LOAD, STORE or CALL system call returns [`abi::FAULTED`](crate::kit::abi::FAULTED) from
    /// the call. Any other fault (no handler set, another CPL0 fault) has
    /// nowhere to go and gets [`ExceptionAction::Fail`], which ends the
    /// run.
    pub fn deliver_page_fault(
        &mut self,
        exception: &GuestException,
        error_code: u64,
        cr2: u64,
    ) -> Result<ExceptionAction, VcpuError> {
        let answer = if exception.cpl() == 3 {
            if self.read_u64(self.kernel_page() + percpu::FAULT_RIP)? == 0 {
                return Ok(ExceptionAction::Fail);
            }
            ExceptionAction::Resume(action::DELIVER)
        } else {
            // A CALL's fetch fault has the kernel's return address here;
            // a stack the VMM cannot read matches nothing.
            let stack_top = self.read_u64(exception.rsp).unwrap_or(0);
            match self
                .kernel
                .cpl0_fault_resume(exception.rip, exception.cr2, stack_top)
            {
                Some(rip) => ExceptionAction::Redirect {
                    rip,
                    actions: action::DELIVER,
                },
                None => return Ok(ExceptionAction::Fail),
            }
        };
        let rsp = self.regs()?.rsp;
        self.write_u64(rsp + frame::ERROR_CODE, error_code)?;
        if cr2 != exception.cr2 {
            let mut sregs = self.sregs()?;
            sregs.cr2 = cr2;
            self.fd
                .set_sregs(&sregs)
                .map_err(|e| KvmError::new("KVM_SET_SREGS", e))?;
        }
        Ok(answer)
    }
}

/// The shadow hosting of `mmu-integration` works on the vCPU through this
/// context ([`PvVcpu`](mmu_integration::shadow_host::PvVcpu)), sharing its
/// cached registers.
impl KvmVcpuContext for VcpuContext<'_> {
    type Memory = GuestMemoryMmap;

    fn kvm_parts(&mut self) -> (&mut VcpuFd, &mut Option<kvm_regs>, &GuestMemoryMmap) {
        (self.fd, &mut self.regs, self.memory)
    }
}

/// What the vCPU thread needs for one run.
#[derive(Debug)]
pub(crate) struct VcpuRun<'a> {
    pub(crate) id: VcpuId,
    pub(crate) fd: &'a mut VcpuFd,
    pub(crate) control: Arc<VcpuControl>,
    pub(crate) memory: &'a GuestMemoryMmap,
    pub(crate) layout: &'a Layout,
    pub(crate) kernel: &'a Kernel,
    pub(crate) sregs: kvm_sregs,
    pub(crate) regs: kvm_regs,
    pub(crate) limit: Duration,
}

/// An exit, copied out of `kvm_run` while `KVM_RUN`'s borrow of the vCPU
/// lasts, so the vCPU can be used again: every field is an owned value.
/// The answer to a read (port or MMIO) is written back with
/// [`complete_read`] through the vCPU itself, after the handler ran.
#[derive(Debug)]
enum Exit {
    /// The exit handler's `kvm_exit` served it; this is what remains to do.
    Routed(Action),
    /// A port read of `len` bytes: the guest waits for the data.
    IoIn {
        port: u16,
        len: usize,
    },
    /// A port write of `data`.
    IoOut {
        port: u16,
        data: Vec<u8>,
    },
    /// An MMIO read of `len` bytes: the guest waits for the data.
    MmioRead {
        gpa: u64,
        len: usize,
    },
    /// An MMIO write of `data`.
    MmioWrite {
        gpa: u64,
        data: Vec<u8>,
    },
    Shutdown,
    Hlt,
    InternalError,
    FailEntry(u64),
    Other(String),
}

impl Exit {
    fn name(&self) -> &'static str {
        match self {
            Exit::Routed(_) => "routed",
            Exit::IoIn { .. } => "io-in",
            Exit::IoOut { .. } => "io-out",
            Exit::MmioRead { .. } => "mmio-read",
            Exit::MmioWrite { .. } => "mmio-write",
            Exit::Shutdown => "shutdown",
            Exit::Hlt => "hlt",
            Exit::InternalError => "internal-error",
            Exit::FailEntry(_) => "fail-entry",
            Exit::Other(_) => "other",
        }
    }

    /// Copies what the VMM needs out of `exit`; the borrow of the vCPU
    /// ends with it.
    fn from_kvm(exit: VcpuExit<'_>) -> Exit {
        match exit {
            VcpuExit::IoIn(port, data) => Exit::IoIn {
                port,
                len: data.len(),
            },
            VcpuExit::IoOut(port, data) => Exit::IoOut {
                port,
                data: data.to_vec(),
            },
            VcpuExit::MmioRead(gpa, data) => Exit::MmioRead {
                gpa,
                len: data.len(),
            },
            VcpuExit::MmioWrite(gpa, data) => Exit::MmioWrite {
                gpa,
                data: data.to_vec(),
            },
            VcpuExit::Shutdown => Exit::Shutdown,
            VcpuExit::Hlt => Exit::Hlt,
            VcpuExit::InternalError => Exit::InternalError,
            VcpuExit::FailEntry(reason, _) => Exit::FailEntry(reason),
            other => Exit::Other(format!("{other:?}")),
        }
    }
}

/// Runs one vCPU until its program ends, it fails, or it is stopped.
pub(crate) fn run_vcpu<H: ExitHandler>(
    run: VcpuRun<'_>,
    handler: &mut H,
) -> Result<VcpuReport, VcpuError> {
    let VcpuRun {
        id,
        fd,
        control,
        memory,
        layout,
        kernel,
        sregs,
        regs,
        limit,
    } = run;
    complete_pending_io(fd)?;
    fd.set_sregs(&sregs)
        .map_err(|e| KvmError::new("KVM_SET_SREGS", e))?;
    fd.set_regs(&regs)
        .map_err(|e| KvmError::new("KVM_SET_REGS", e))?;
    let kernel_page = layout.kernel_page(id.0 as usize);
    for (offset, value) in [
        (percpu::INDEX, u64::from(id.0)),
        (percpu::REDIRECT_RIP, 0),
        (percpu::REPLAY_COUNT, 0),
        (percpu::REPLAY_PENDING, 0),
        (percpu::FAULT_RIP, 0),
        (percpu::FAULT_COUNT, 0),
    ] {
        memory
            .write_obj(value, GuestAddress(kernel_page + offset))
            .map_err(|source| VcpuError::Memory {
                gpa: Gpa(kernel_page + offset),
                source,
            })?;
    }

    let mut stats = ExitStats::default();
    let mut reports = Vec::new();
    let started = Instant::now();
    // The one raw pointer of the loop: the kick signal handler, which
    // cannot borrow anything, sets `immediate_exit` through it. It is
    // never used to read or write an exit (those go through `fd`), and
    // the guard unpublishes it before this function returns, while `fd`
    // (and so the mapping) is still borrowed.
    let run_page: *mut kvm_bindings::kvm_run = fd.get_kvm_run();
    let _published = RunPageGuard::new(run_page);
    fd.set_kvm_immediate_exit(0);
    debug!(vcpu = id.0, rip = regs.rip, "vCPU run starts");

    loop {
        let pending = control.take();
        if pending & request::ANY_STOP != 0 {
            debug!(vcpu = id.0, pending, "vCPU stop requested");
            return if pending & request::ABORT != 0 {
                Err(VcpuError::Aborted)
            } else if pending & request::TIMEOUT != 0 {
                Err(VcpuError::Timeout { limit })
            } else {
                Ok(VcpuReport {
                    id,
                    outcome: VcpuOutcome::Stopped,
                    reports,
                    stats,
                    elapsed: started.elapsed(),
                })
            };
        }
        let mut ctx = VcpuContext {
            id,
            fd: &mut *fd,
            memory,
            layout,
            kernel,
            regs: None,
        };
        handler.prepare_entry(&mut ctx)?;

        let result = fd.run();
        handler.left_guest();
        let exit = match result {
            Ok(exit) => match handler.kvm_exit(exit)? {
                Routed::Handled(action) => Exit::Routed(action),
                Routed::Unhandled(exit) => Exit::from_kvm(exit),
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                fd.set_kvm_immediate_exit(0);
                stats.interrupted += 1;
                trace!(vcpu = id.0, "KVM_RUN interrupted");
                continue;
            }
            Err(e) => return Err(KvmError::new("KVM_RUN", e).into()),
        };
        stats.exits += 1;
        let mut ctx = VcpuContext {
            id,
            fd: &mut *fd,
            memory,
            layout,
            kernel,
            regs: None,
        };
        trace!(vcpu = id.0, exit = exit.name(), "exit");
        match exit {
            Exit::Routed(action) => {
                stats.routed += 1;
                trace!(vcpu = id.0, ?action, "exit served by the exit handler");
                handler.complete_exit(&mut ctx, action)?;
            }
            Exit::IoIn { port, len } if (hypercall::BASE..hypercall::END).contains(&port) => {
                if len != 4 {
                    return Err(VcpuError::BadHypercall {
                        port,
                        direction: IoDirection::Read,
                        size: len,
                    });
                }
                stats.hypercalls += 1;
                let answer =
                    match serve_hypercall(&mut ctx, handler, port, &mut stats, &mut reports)? {
                        Served::Answer(answer) => answer,
                        Served::Done(exit_code) => {
                            debug!(vcpu = id.0, exit_code, "guest program done");
                            return Ok(VcpuReport {
                                id,
                                outcome: VcpuOutcome::Done { exit_code },
                                reports,
                                stats,
                                elapsed: started.elapsed(),
                            });
                        }
                    };
                complete_read(ctx.fd, ReadExit::Io, len, &answer.to_le_bytes())?;
            }
            Exit::IoOut { port, data } if (hypercall::BASE..hypercall::END).contains(&port) => {
                return Err(VcpuError::BadHypercall {
                    port,
                    direction: IoDirection::Write,
                    size: data.len(),
                });
            }
            Exit::IoIn { port, len } => {
                let mut buf = vec![0u8; len];
                if !handler.port_read(&mut ctx, port, &mut buf)? {
                    return Err(unknown_port(&mut ctx, port, IoDirection::Read, len));
                }
                stats.device_io += 1;
                complete_read(ctx.fd, ReadExit::Io, len, &buf)?;
            }
            Exit::IoOut { port, data } => {
                if !handler.port_write(&mut ctx, port, &data)? {
                    return Err(unknown_port(&mut ctx, port, IoDirection::Write, data.len()));
                }
                stats.device_io += 1;
            }
            Exit::MmioRead { gpa, len } => {
                let mut buf = vec![0u8; len];
                if !handler.mmio_read(&mut ctx, gpa, &mut buf)? {
                    return Err(VcpuError::UnknownMmio {
                        gpa: Gpa(gpa),
                        direction: IoDirection::Read,
                        size: len,
                    });
                }
                stats.device_io += 1;
                complete_read(ctx.fd, ReadExit::Mmio, len, &buf)?;
            }
            Exit::MmioWrite { gpa, data } => {
                if !handler.mmio_write(&mut ctx, gpa, &data)? {
                    return Err(VcpuError::UnknownMmio {
                        gpa: Gpa(gpa),
                        direction: IoDirection::Write,
                        size: data.len(),
                    });
                }
                stats.device_io += 1;
            }
            Exit::Shutdown => {
                let rip = ctx.regs().map(|r| r.rip).unwrap_or(0);
                debug!(vcpu = id.0, rip, "guest shutdown (triple fault)");
                return Err(VcpuError::TripleFault { rip });
            }
            Exit::Hlt => {
                let rip = ctx.regs().map(|r| r.rip).unwrap_or(0);
                return Err(VcpuError::Halted { rip });
            }
            Exit::InternalError => {
                let (suberror, data) = internal_error(ctx.fd);
                let rip = ctx.regs().map(|r| r.rip).unwrap_or(0);
                debug!(vcpu = id.0, suberror, rip, "KVM internal error");
                return Err(VcpuError::Internal {
                    suberror,
                    data,
                    rip,
                });
            }
            Exit::FailEntry(reason) => return Err(VcpuError::FailEntry { reason }),
            Exit::Other(exit) => {
                let rip = ctx.regs().map(|r| r.rip).unwrap_or(0);
                return Err(VcpuError::UnexpectedExit { exit, rip });
            }
        }
    }
}

/// Lets KVM finish an instruction left pending by the last exit of a
/// previous run (the kit's hypercalls are port reads, and a run ends on
/// one): KVM completes it on the next `KVM_RUN`, and would otherwise do so
/// on top of the registers the new run sets.
fn complete_pending_io(fd: &mut VcpuFd) -> Result<(), VcpuError> {
    mmu_integration::shadow_host::complete_pending_io(fd).map_err(|e| VcpuError::Hosting(e.into()))
}

/// The answer to a hypercall, or the end of the program.
enum Served {
    Answer(u32),
    Done(u64),
}

fn serve_hypercall<H: ExitHandler>(
    ctx: &mut VcpuContext<'_>,
    handler: &mut H,
    port: u16,
    stats: &mut ExitStats,
    reports: &mut Vec<Report>,
) -> Result<Served, VcpuError> {
    let regs = ctx.regs()?;
    trace!(
        vcpu = ctx.id.0,
        port,
        rdi = regs.rdi,
        rsi = regs.rsi,
        "hypercall"
    );
    match port {
        hypercall::DONE => Ok(Served::Done(regs.rdi)),
        hypercall::REPORT => {
            let report = Report {
                tag: regs.rsi,
                value: regs.rdi,
            };
            reports.push(report);
            handler.report(ctx, report)?;
            Ok(Served::Answer(0))
        }
        hypercall::EXCEPTION => {
            stats.exceptions += 1;
            let exception = read_exception(ctx)?;
            debug!(vcpu = ctx.id.0, %exception, "guest exception");
            match handler.exception(ctx, &exception)? {
                ExceptionAction::Resume(actions) => Ok(Served::Answer(actions & !action::REDIRECT)),
                ExceptionAction::Redirect { rip, actions } => {
                    ctx.set_redirect(rip)?;
                    Ok(Served::Answer(actions | action::REDIRECT))
                }
                ExceptionAction::Fail => Err(VcpuError::GuestException(exception)),
            }
        }
        hypercall::LOAD_CR3 | hypercall::INVLPG | hypercall::FLUSH_TLB => {
            stats.paging_ops += 1;
            let op = match port {
                hypercall::LOAD_CR3 => PagingOp::LoadCr3(regs.rdi),
                hypercall::INVLPG => PagingOp::Invlpg(regs.rdi),
                _ => PagingOp::FlushTlb,
            };
            let answer = handler.paging_op(ctx, op)?;
            trace!(vcpu = ctx.id.0, ?op, answer, "paging hypercall");
            Ok(Served::Answer(answer & (action::REPLAY | action::NATIVE)))
        }
        hypercall::READ_CR3 => {
            let cr3 = handler.read_cr3(ctx)?;
            Ok(Served::Answer(cr3 as u32))
        }
        hypercall::REPLAY_REFILL => {
            handler.replay_refill(ctx)?;
            Ok(Served::Answer(0))
        }
        hypercall::BAD_SYSCALL => Err(VcpuError::UnknownSyscall { number: regs.rax }),
        _ => Err(VcpuError::BadHypercall {
            port,
            direction: IoDirection::Read,
            size: 4,
        }),
    }
}

/// Reads the exception frame the kernel's stub left at RSP (see
/// [`abi::frame`](crate::kit::abi::frame)), and CR2.
fn read_exception(ctx: &mut VcpuContext<'_>) -> Result<GuestException, VcpuError> {
    Ok(read_exception_frame(ctx)?)
}

fn unknown_port(
    ctx: &mut VcpuContext<'_>,
    port: u16,
    direction: IoDirection,
    size: usize,
) -> VcpuError {
    let rip = ctx.regs().map(|r| r.rip).unwrap_or(0);
    debug!(vcpu = ctx.id.0, port, %direction, size, rip, "unknown port");
    VcpuError::UnknownPort {
        port,
        direction,
        size,
        rip,
    }
}

/// The sub-error and data words of a `KVM_EXIT_INTERNAL_ERROR`.
fn internal_error(fd: &mut VcpuFd) -> (u32, Vec<u64>) {
    let run = fd.get_kvm_run();
    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so KVM filled the
    // `internal` member of the union; it is plain integers.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let n = (internal.ndata as usize).min(internal.data.len());
    (internal.suberror, internal.data[..n].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_lookup_takes_the_last() {
        let r = VcpuReport {
            id: VcpuId(0),
            outcome: VcpuOutcome::Done { exit_code: 0 },
            reports: vec![
                Report { tag: 1, value: 5 },
                Report { tag: 2, value: 6 },
                Report { tag: 1, value: 7 },
            ],
            stats: ExitStats::default(),
            elapsed: Duration::ZERO,
        };
        assert_eq!(r.last(1), Some(7));
        assert_eq!(r.last(2), Some(6));
        assert_eq!(r.last(3), None);
    }

    #[test]
    fn abi_ports_are_distinct() {
        let ports = [
            hypercall::DONE,
            hypercall::REPORT,
            hypercall::EXCEPTION,
            hypercall::LOAD_CR3,
            hypercall::INVLPG,
            hypercall::FLUSH_TLB,
            hypercall::BAD_SYSCALL,
            hypercall::READ_CR3,
            hypercall::REPLAY_REFILL,
        ];
        for (i, p) in ports.iter().enumerate() {
            assert!((hypercall::BASE..hypercall::END).contains(p));
            assert!(!ports[i + 1..].contains(p));
        }
    }
}
