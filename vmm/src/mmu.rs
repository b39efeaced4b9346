//! Guests whose MMU is a pluggable backend (`mmu-backends` + `mmu-integration`).
//!
//! [`MmuVm`] is a [`Vm`] whose guest memory is owned by an MMU backend
//! chosen at creation ([`BackendKind`]): the memslots go through the
//! backend (the EPT backend mirrors them into KVM with its port; the
//! shadow backend's live in its backing arena, one KVM memslot), and every
//! vCPU's exits go through an [`MmuHandler`], which hands them to
//! `mmu-integration`'s exit handler: MMIO exits are classified by the backend
//! and served on the VM's [`Devices`]; guest #PFs the kit reports and the
//! paravirtual paging calls reach the vCPU's `MmuVcpu`.
//!
//! Guest memory has two memslots: [`SYSTEM_SLOT`] (descriptors, kernel,
//! per-vCPU areas, page tables) and [`DATA_SLOT`] (the workload data area),
//! which logs dirty pages when [`MmuVmConfig::log_dirty_data`] is set.
//!
//! Under the `shadow` backend the hardware walks the MMU's tables: each
//! handler then hosts it with `mmu-integration`'s
//! [`ShadowVcpuHost`] (roots, the host-coherence replay, the instruction
//! emulation), told where the kit's kernel keeps its pages
//! ([`PvVcpuLayout`]) and where its replay routine restarts
//! ([`ReplayRestart`](crate::kit::ReplayRestart)).

use std::sync::Arc;
use std::time::Duration;

use kvm_ioctls::VcpuExit;
use mmu_api::{Gpa, Gva, MemslotFlags, MmuBackend, PagingContext, PfErrorCode, SlotId, VcpuId};
use mmu_backends::{BackendConfig, BackendKind};
use mmu_integration::host::{HostOptions, ShadowBacking};
use mmu_integration::kvm::{HostCoherence, KvmMmu, PageFaultDelivery, Routed, apply_action};
use mmu_integration::shadow_host::{
    ExceptionFrame, PageFaultAnswer, PvVcpuLayout, ReplayHub, ShadowVcpuHost, current_context,
};
use mmu_integration::{Action, BusError, ExitStats, Memslots, MmioBus, VcpuExits};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::error::{GuestException, RunError, SetupError, VcpuError};
use crate::kit::Program;
use crate::kit::abi::action;
use crate::layout::{GDT_GPA, IDT_GPA, KERNEL_AREA_SIZE, KERNEL_CODE_GPA, Layout, PAGE_SIZE};
use crate::vcpu::{ExceptionAction, ExitHandler, PagingOp, VcpuContext};
use crate::vm::{RunReport, VcpuArgs, Vm, VmConfig};
use crate::x86;

/// The memslot of the system area (below [`Layout::data`](crate::layout::Layout::data)).
pub const SYSTEM_SLOT: SlotId = SlotId(0);
/// The memslot of the data area.
pub const DATA_SLOT: SlotId = SlotId(1);

/// Room in the shadow backend's arena beyond the guest's memory, for the
/// memslots a VMM adds and deletes while the guest runs (churn, stress,
/// the benches' extra slots).
pub const ARENA_HEADROOM: u64 = 64 << 20;

/// MMIO devices of an [`MmuVm`] vCPU. Guest memory the MMU needs is
/// served by the VM itself.
pub trait Devices: Send {
    /// A guest read of `data.len()` bytes at `gpa`.
    fn mmio_read(&mut self, gpa: Gpa, data: &mut [u8]) -> Result<(), BusError>;
    /// A guest write at `gpa`.
    fn mmio_write(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), BusError>;

    /// A guest read at `gpa` that exited as MMIO but, by the time the MMU
    /// classified it, hits memory the VMM added outside guest RAM (a
    /// memslot added or moved there meanwhile): fill `data` from that
    /// memory. By default no such memory exists.
    fn memory_read(&mut self, gpa: Gpa, _data: &mut [u8]) -> Result<(), BusError> {
        Err(BusError::NoDevice(gpa))
    }
}

/// No devices: every MMIO access fails with [`BusError::NoDevice`].
#[derive(Clone, Copy, Debug, Default)]
pub struct NoDevices;

impl Devices for NoDevices {
    fn mmio_read(&mut self, gpa: Gpa, _data: &mut [u8]) -> Result<(), BusError> {
        Err(BusError::NoDevice(gpa))
    }

    fn mmio_write(&mut self, gpa: Gpa, _data: &[u8]) -> Result<(), BusError> {
        Err(BusError::NoDevice(gpa))
    }
}

/// One vCPU's bus: its devices, and guest memory for MMIO exits that raced
/// a memslot change.
struct VcpuBus {
    memory: GuestMemoryMmap,
    devices: Box<dyn Devices>,
}

impl MmioBus for VcpuBus {
    fn mmio_read(&mut self, gpa: Gpa, data: &mut [u8]) -> Result<(), BusError> {
        self.devices.mmio_read(gpa, data)
    }

    fn mmio_write(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), BusError> {
        self.devices.mmio_write(gpa, data)
    }

    /// Guest RAM, or memory the devices added beyond it.
    fn memory_read(&mut self, gpa: Gpa, data: &mut [u8]) -> Result<(), BusError> {
        use vm_memory::GuestMemoryBackend;
        if !self.memory.address_in_range(GuestAddress(gpa.raw())) {
            return self.devices.memory_read(gpa, data);
        }
        self.memory
            .read_slice(data, GuestAddress(gpa.raw()))
            .map_err(BusError::failed)
    }
}

/// The [`ExitHandler`] of one vCPU of an [`MmuVm`]: its `mmu-integration`
/// exit handler (which owns the vCPU's `MmuVcpu`) and its bus.
pub struct MmuHandler {
    exits: VcpuExits,
    bus: VcpuBus,
    delivery: PageFaultDelivery,
    /// The VM's paging context (MAXPHYADDR, CPUID features); the control
    /// registers are read from the vCPU when the guest changes them.
    base: PagingContext,
    /// The shadow backend's hosting, when this VM runs it.
    shadow: Option<ShadowVcpuHost>,
}

impl std::fmt::Debug for MmuHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmuHandler")
            .field("exits", &self.exits)
            .field("delivery", &self.delivery)
            .finish_non_exhaustive()
    }
}

impl MmuHandler {
    /// The vCPU's exit handler (its MMU, its counters).
    pub fn exits(&mut self) -> &mut VcpuExits {
        &mut self.exits
    }

    /// The paging context of the interrupted guest context, from its
    /// registers.
    fn current_context(
        &self,
        vcpu: &mut VcpuContext<'_>,
        cr3: Option<u64>,
    ) -> Result<PagingContext, VcpuError> {
        current_context(&self.base, vcpu, cr3).map_err(|e| VcpuError::Hosting(e.into()))
    }
}

impl ExitHandler for MmuHandler {
    fn prepare_entry(&mut self, vcpu: &mut VcpuContext<'_>) -> Result<(), VcpuError> {
        if let Some(host) = self.shadow.as_mut() {
            return Ok(host.prepare_entry(vcpu, &mut self.exits)?);
        }
        let action = self.exits.prepare_entry()?;
        apply_action(vcpu.fd(), action, self.delivery)?;
        Ok(())
    }

    fn left_guest(&mut self) {
        match self.shadow.as_mut() {
            Some(host) => host.exit_guest(&mut self.exits),
            None => self.exits.exit_guest(),
        }
    }

    fn read_cr3(&mut self, vcpu: &mut VcpuContext<'_>) -> Result<u64, VcpuError> {
        match &self.shadow {
            Some(host) => Ok(host.guest_cr3()),
            None => Ok(vcpu.sregs()?.cr3),
        }
    }

    fn replay_refill(&mut self, vcpu: &mut VcpuContext<'_>) -> Result<(), VcpuError> {
        match self.shadow.as_mut() {
            Some(host) => Ok(host.replay_refill(vcpu)?),
            None => vcpu.write_u64(
                vcpu.kernel_page() + crate::kit::abi::percpu::REPLAY_PENDING,
                0,
            ),
        }
    }

    fn kvm_exit<'e>(&mut self, exit: VcpuExit<'e>) -> Result<Routed<'e>, VcpuError> {
        Ok(self.exits.handle_kvm_exit(exit, &mut self.bus)?)
    }

    fn complete_exit(
        &mut self,
        vcpu: &mut VcpuContext<'_>,
        action: Action,
    ) -> Result<(), VcpuError> {
        apply_action(vcpu.fd(), action, self.delivery)?;
        Ok(())
    }

    /// A #PF the kit's stub reported goes to the vCPU's MMU. A fault the
    /// MMU gives back to the guest is delivered to it with the MMU's error
    /// code and CR2 ([`VcpuContext::deliver_page_fault`]: logged, and the
    /// program resumes at its fault handler); without a handler it ends
    /// the run, as every other exception does.
    fn exception(
        &mut self,
        vcpu: &mut VcpuContext<'_>,
        exception: &GuestException,
    ) -> Result<ExceptionAction, VcpuError> {
        if exception.vector != x86::VECTOR_PF {
            return Ok(ExceptionAction::Fail);
        }
        if let Some(host) = self.shadow.as_mut() {
            let frame = exception_frame(vcpu, exception)?;
            return match host.page_fault(vcpu, &mut self.exits, &mut self.bus, &frame)? {
                PageFaultAnswer::Resume => Ok(ExceptionAction::Resume(0)),
                PageFaultAnswer::DeliverPageFault { error_code, cr2 } => {
                    vcpu.deliver_page_fault(exception, u64::from(error_code.bits()), cr2.raw())
                }
                PageFaultAnswer::GeneralProtection => Ok(ExceptionAction::Fail),
            };
        }
        let error_code = PfErrorCode::from_bits_retain(exception.error_code as u32);
        let action = self.exits.page_fault(Gva(exception.cr2), error_code)?;
        match action {
            Action::Resume => Ok(ExceptionAction::Resume(0)),
            Action::LoadRoot(load) => {
                apply_action(vcpu.fd(), Action::LoadRoot(load), self.delivery)?;
                Ok(ExceptionAction::Resume(0))
            }
            Action::InjectPageFault { error_code, cr2 } => {
                vcpu.deliver_page_fault(exception, u64::from(error_code.bits()), cr2.raw())
            }
            Action::InjectGeneralProtection => Ok(ExceptionAction::Fail),
            other => Err(mmu_integration::kvm::ApplyError::NeedsEmulation { action: other }.into()),
        }
    }

    /// The paravirtual paging calls reach the vCPU's MMU. Under `ept` the
    /// native instruction still runs (the hardware walks the guest's own
    /// tables); under `shadow` a CR3 load installs the MMU's root instead,
    /// and INVLPG and flushes still run natively.
    fn paging_op(&mut self, vcpu: &mut VcpuContext<'_>, op: PagingOp) -> Result<u32, VcpuError> {
        if let Some(host) = self.shadow.as_mut() {
            // The hardware walks the shadow tables: a CR3 load is the MMU's
            // root; INVLPG and flushes still run natively (they make KVM drop
            // what it cached from the pool).
            return Ok(match op {
                PagingOp::LoadCr3(cr3) => host.load_cr3(vcpu, &mut self.exits, cr3)?,
                PagingOp::Invlpg(gva) => host.invlpg(&mut self.exits, Gva(gva)),
                PagingOp::FlushTlb => host.flush_tlb(&mut self.exits),
            });
        }
        match op {
            PagingOp::LoadCr3(cr3) => {
                let ctx = self.current_context(vcpu, Some(cr3))?;
                let action = self.exits.set_paging_context(&ctx)?;
                apply_action(vcpu.fd(), action, self.delivery)?;
            }
            PagingOp::Invlpg(gva) => self.exits.invlpg(Gva(gva)),
            PagingOp::FlushTlb => self.exits.flush_tlb(false),
        }
        Ok(action::NATIVE)
    }
}

/// The exception frame the kit's stub left at the kernel's RSP, as the
/// shadow hosting reads it.
fn exception_frame(
    vcpu: &mut VcpuContext<'_>,
    exception: &GuestException,
) -> Result<ExceptionFrame, VcpuError> {
    Ok(ExceptionFrame {
        at: vcpu.regs()?.rsp,
        vector: exception.vector,
        error_code: exception.error_code,
        cr2: exception.cr2,
        rip: exception.rip,
        cs: exception.cs,
        rsp: exception.rsp,
        rflags: exception.rflags,
    })
}

/// Where vCPU `index` of a kit guest keeps its kernel page and replay
/// queue, and the pages every shadow root must map for it: the GDT, the
/// IDT and its TSS (written by the CPU), the kernel's code (fetched), and
/// its kernel area (stack, kernel page, queue).
fn kit_vcpu_layout(layout: &Layout, index: usize, kernel_code_len: u64) -> PvVcpuLayout {
    let write = PfErrorCode::WRITE;
    let fetch = PfErrorCode::FETCH;
    let mut pages = vec![
        (Gva(GDT_GPA), write),
        (Gva(IDT_GPA), write),
        (Gva(layout.tss(index) & !(PAGE_SIZE - 1)), write),
    ];
    let mut code = KERNEL_CODE_GPA;
    while code < KERNEL_CODE_GPA + kernel_code_len {
        pages.push((Gva(code), fetch));
        code += PAGE_SIZE;
    }
    let area = layout.kernel_page(index);
    let mut page = area;
    while page < area + KERNEL_AREA_SIZE {
        pages.push((Gva(page), write));
        page += PAGE_SIZE;
    }
    PvVcpuLayout {
        kernel_pages: pages,
        kernel_page: Gpa(area),
        replay_queue: Gpa(layout.replay_queue(index)),
    }
}

/// How an [`MmuVm`] is built.
#[derive(Clone, Debug)]
pub struct MmuVmConfig {
    /// Which backend.
    pub kind: BackendKind,
    /// The backends' configuration.
    pub backend: BackendConfig,
    /// The VM.
    pub vm: VmConfig,
    /// Log dirty pages of [`DATA_SLOT`].
    pub log_dirty_data: bool,
    /// The shadow backend's host-coherence policy (detected by default).
    pub coherence: HostCoherence,
}

/// A [`Vm`] whose memory and exits go through an MMU backend.
pub struct MmuVm {
    // Field order is drop order: the vCPUs' MMUs, then the backend and its
    // memslots (deleted while KVM and the memory still exist), then the VM.
    handlers: Vec<MmuHandler>,
    mmu: KvmMmu,
    vm: Vm,
}

impl std::fmt::Debug for MmuVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmuVm")
            .field("mmu", &self.mmu)
            .field("vm", &self.vm)
            .finish_non_exhaustive()
    }
}

impl MmuVm {
    /// Builds the VM with the backend of `config.kind` and no devices.
    pub fn new(config: MmuVmConfig) -> Result<MmuVm, SetupError> {
        Self::with_devices(config, |_| Box::new(NoDevices))
    }

    /// Builds the VM; `devices(id)` gives vCPU `id` its MMIO devices.
    pub fn with_devices(
        config: MmuVmConfig,
        mut devices: impl FnMut(VcpuId) -> Box<dyn Devices>,
    ) -> Result<MmuVm, SetupError> {
        let MmuVmConfig {
            kind,
            backend,
            vm,
            log_dirty_data,
            coherence,
        } = config;
        let (vm, mmu) = Vm::new_with_memory(vm, |vm_fd, memory| {
            use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
            let options = HostOptions {
                coherence,
                // Room for the guest's memory and the memslots the
                // workloads add beside it.
                shadow_backing: ShadowBacking::Arena {
                    room: memory.iter().map(|r| r.len()).sum::<u64>() + ARENA_HEADROOM,
                },
                ..HostOptions::default()
            };
            let mmu = KvmMmu::with_options(kind, &backend, Arc::clone(vm_fd), options)?;
            let glue = mmu.memslots();
            let regions: Vec<_> = memory.iter().collect();
            let [system, data] = regions[..] else {
                return Err(SetupError::Config(format!(
                    "guest memory has {} regions, expected 2",
                    regions.len()
                )));
            };
            glue.add_region(SYSTEM_SLOT, system, MemslotFlags::empty())?;
            let data_flags = if log_dirty_data {
                MemslotFlags::LOG_DIRTY
            } else {
                MemslotFlags::empty()
            };
            glue.add_region(DATA_SLOT, data, data_flags)?;
            Ok(mmu)
        })?;
        let hosting = mmu.shadow().map(|h| h.backend().clone());
        if hosting.is_some() && vm.kernel().ops() != crate::PagingOps::Paravirt {
            return Err(SetupError::Config(
                "the shadow backend needs the kit's paravirtual paging calls (PagingOps::Paravirt)"
                    .to_string(),
            ));
        }
        let hub = hosting
            .as_ref()
            .and_then(|b| ReplayHub::for_backend(b, vm.vcpu_count()));
        let kit_kernel = Arc::new(vm.kernel().replay_restart().clone());
        let mut handlers = Vec::with_capacity(vm.vcpu_count());
        for index in 0..vm.vcpu_count() {
            let kicker = vm
                .kicker(index)
                .ok_or_else(|| SetupError::Config(format!("vCPU {index} has no kicker")))?;
            let id = kicker.vcpu();
            let mut exits = mmu.create_vcpu(id, Arc::new(kicker))?;
            let base = vm.paging_context(0);
            exits
                .set_paging_context(&base)
                .map_err(SetupError::MmuContext)?;
            let shadow = hosting.as_ref().map(|backend| {
                ShadowVcpuHost::new(
                    index,
                    backend.clone(),
                    hub.clone(),
                    kit_vcpu_layout(vm.layout(), index, vm.kernel().code().len() as u64),
                    kit_kernel.clone(),
                    base,
                )
            });
            handlers.push(MmuHandler {
                exits,
                bus: VcpuBus {
                    memory: vm.memory().clone(),
                    devices: devices(id),
                },
                delivery: mmu.page_fault_delivery(),
                base,
                shadow,
            });
        }
        Ok(MmuVm { handlers, mmu, vm })
    }

    /// Which backend.
    pub fn kind(&self) -> BackendKind {
        self.mmu.kind()
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<dyn MmuBackend> {
        self.mmu.backend()
    }

    /// The shadow backend, when this VM runs it (for its hosting calls and
    /// [`audit`](mmu_backends::shadow::ShadowBackend::audit)).
    pub fn shadow_backend(&self) -> Option<&mmu_backends::shadow::ShadowBackend> {
        self.mmu.shadow().map(|h| h.backend())
    }

    /// The memslot glue (add, move, delete memory; dirty logs).
    pub fn memslots(&self) -> &Memslots {
        self.mmu.memslots()
    }

    /// The VM underneath (layout, memory, kickers).
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// vCPU `index`'s handler (its MMU and exit counters).
    pub fn handler(&mut self, index: usize) -> Option<&mut MmuHandler> {
        self.handlers.get_mut(index)
    }

    /// The VM, every vCPU's handler and the memslot glue at once: a host
    /// thread can change memslots while the vCPUs run
    /// ([`Vm::run_with`] with the handlers), as a VMM's memory-management
    /// thread does.
    pub fn parts(&mut self) -> (&mut Vm, &mut [MmuHandler], &Memslots) {
        (&mut self.vm, &mut self.handlers, self.mmu.memslots())
    }

    /// Every vCPU's exit counters, by vCPU index.
    pub fn exit_stats(&self) -> Vec<ExitStats> {
        self.handlers.iter().map(|h| h.exits.stats()).collect()
    }

    /// Runs `program` on vCPUs `0..args.len()` as [`Vm::run`] does, with
    /// every exit going through the vCPUs' MMU handlers.
    pub fn run(
        &mut self,
        program: &Program,
        args: &[VcpuArgs],
        limit: Duration,
    ) -> Result<RunReport, RunError> {
        if args.len() > self.handlers.len() {
            return Err(RunError::Request(format!(
                "{} vCPUs requested, the VM has {}",
                args.len(),
                self.handlers.len()
            )));
        }
        let handlers: Vec<&mut MmuHandler> = self.handlers.iter_mut().take(args.len()).collect();
        self.vm.run_with(program, args, limit, handlers)
    }
}
