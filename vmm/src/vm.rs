//! The VM: KVM objects, guest memory, the guest image, and runs.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, kvm_fpu, kvm_regs, kvm_sregs, kvm_userspace_memory_region,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use mmu_api::paging::{CpuFeatures, CpuidLeaf, GuestPhysMemory, PagingContext, PhysMemError};
use mmu_api::{Gpa, VcpuId};
use mmu_integration::arena::shared_guest_memory;
use tracing::debug;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, VolatileMemory,
};

use crate::error::{KvmError, RunError, SetupError, VcpuError};
use crate::kick::{Kicker, VcpuControl, install_handler, request};
use crate::kit::{FaultLog, Kernel, PagingOps, Program, Ring};
use crate::layout::{GDT_GPA, IDT_GPA, KERNEL_CODE_GPA, Layout, PAGE_SIZE, PROGRAM_CODE_GPA};
use crate::tables::TableBuilder;
use crate::vcpu::{DefaultHandler, ExitHandler, VcpuReport, VcpuRun, run_vcpu};
use crate::x86;

/// How to build a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// Number of vCPUs (1..=[`MAX_VCPUS`](crate::layout::MAX_VCPUS)).
    pub vcpus: usize,
    /// Guest memory in bytes (a multiple of 2 MiB).
    pub mem_size: u64,
    /// How the guest kernel loads CR3, invalidates and flushes.
    pub paging_ops: PagingOps,
    /// Levels of the identity page tables: 4, or 5 (needs LA57).
    pub paging_levels: u8,
    /// Set XD in the identity tables' entries for data. Turn it off for
    /// guests that clear EFER.NXE (XD is a reserved bit then).
    pub identity_nx: bool,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            vcpus: 1,
            mem_size: 64 << 20,
            paging_ops: PagingOps::Native,
            paging_levels: 4,
            identity_nx: true,
        }
    }
}

/// What the host's KVM offers the guest, from its supported CPUID.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuInfo {
    /// The guest's physical-address width (CPUID 0x80000008 EAX bits 7:0).
    pub maxphyaddr: u8,
    /// Paging features the vCPUs have.
    pub features: CpuFeatures,
    /// True when `/dev/kvm` is served by PVM (KVM's shadow MMU, CPL0 guest
    /// code emulated).
    pub pvm: bool,
}

impl CpuInfo {
    fn from_cpuid(cpuid: &CpuId) -> Self {
        let leaves: Vec<CpuidLeaf> = cpuid
            .as_slice()
            .iter()
            .map(|e| CpuidLeaf::new(e.function, e.index, [e.eax, e.ebx, e.ecx, e.edx]))
            .collect();
        let features = CpuFeatures::from_cpuid(&leaves);
        let maxphyaddr = CpuidLeaf::maxphyaddr(&leaves);
        CpuInfo {
            maxphyaddr,
            features,
            pvm: std::path::Path::new("/sys/module/kvm_pvm").exists(),
        }
    }
}

/// The registers a program starts with on one vCPU: RDI, RSI, RDX, RCX,
/// R8, R9.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VcpuArgs(pub [u64; 6]);

/// The result of a successful run: one report per vCPU that ran.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunReport {
    /// Per-vCPU results, by vCPU index.
    pub vcpus: Vec<VcpuReport>,
    /// Wall time of the whole run.
    pub elapsed: Duration,
}

#[derive(Debug)]
struct VcpuSlot {
    id: VcpuId,
    fd: VcpuFd,
    control: Arc<VcpuControl>,
}

/// A KVM VM with guest memory, vCPUs, and the guest kit's kernel loaded.
///
/// The VMM builds, before the first run: the identity page tables (see
/// [`layout`](crate::layout)), the GDT with ring-0 and ring-3 segments and
/// one TSS per vCPU (RSP0 = that vCPU's kernel stack), the IDT pointing at
/// the kernel's stubs, and the kernel itself. Each [`run`](Vm::run) loads a
/// program and runs it on some vCPUs, each on its own thread, until every
/// one ends, one fails, or the time limit passes. Dropping the VM closes
/// the vCPUs, the VM, then unmaps guest memory.
#[derive(Debug)]
pub struct Vm {
    // Field order is drop order: vCPUs, then the VM, then memory.
    vcpus: Vec<VcpuSlot>,
    vm: Arc<VmFd>,
    kvm: Kvm,
    memory: GuestMemoryMmap,
    layout: Layout,
    kernel: Kernel,
    root: u64,
    cpu: CpuInfo,
    cpuid: CpuId,
}

/// True if `/dev/kvm` can be opened by this process and answers as KVM
/// (API version 12).
pub fn kvm_available() -> bool {
    Kvm::new().is_ok_and(|kvm| kvm.get_api_version() == kvm_bindings::KVM_API_VERSION as i32)
}

impl Vm {
    /// Creates the VM, its memory and vCPUs, and writes the guest image.
    /// Guest memory is registered with KVM directly (one memslot per
    /// region of [`memory`](Vm::memory)).
    pub fn new(config: VmConfig) -> Result<Vm, SetupError> {
        Self::new_with_memory(config, register_with_kvm).map(|(vm, ())| vm)
    }

    /// Like [`new`](Vm::new), but `register` makes guest memory known to
    /// KVM instead (an MMU backend that owns the memslots does it through
    /// its port). It is called once, after the VM and its memory exist and
    /// before the guest image is written or any vCPU is created; whatever
    /// it returns is handed back with the VM. Whatever keeps a clone of the
    /// VM fd must keep the memory it registers mapped for as long (the
    /// `mmu-integration` memslot glue does: it holds each region's mapping
    /// until it has deleted the region's memslot).
    ///
    /// Guest memory has two regions: the system area (descriptors, kernel,
    /// per-vCPU areas, page tables) below [`Layout::data`]'s start, and the
    /// data area from there to the end.
    pub fn new_with_memory<R>(
        config: VmConfig,
        register: impl FnOnce(&Arc<VmFd>, &GuestMemoryMmap) -> Result<R, SetupError>,
    ) -> Result<(Vm, R), SetupError> {
        let layout = Layout::new(config.vcpus, config.mem_size, config.paging_levels)?;
        install_handler()?;
        let kvm = Kvm::new().map_err(SetupError::OpenKvm)?;
        if !kvm.check_extension(Cap::ImmediateExit) {
            return Err(SetupError::MissingCapability("KVM_CAP_IMMEDIATE_EXIT"));
        }
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| KvmError::new("KVM_GET_SUPPORTED_CPUID", e))?;
        let cpu = CpuInfo::from_cpuid(&cpuid);
        if config.paging_levels == 5 && !cpu.features.contains(CpuFeatures::LA57) {
            return Err(SetupError::La57Unavailable);
        }
        let vm = Arc::new(
            kvm.create_vm()
                .map_err(|e| KvmError::new("KVM_CREATE_VM", e))?,
        );

        let data = layout.data().start;
        // Shared, so a shadow backend's arena can map it a second time.
        let memory = shared_guest_memory(&[
            (GuestAddress(0), data as usize),
            (GuestAddress(data), (config.mem_size - data) as usize),
        ])
        .map_err(|source| SetupError::AllocateMemory {
            size: config.mem_size,
            source,
        })?;
        let registered = register(&vm, &memory)?;

        let kernel = Kernel::assemble(config.paging_ops)?;
        let mut this = Vm {
            vcpus: Vec::new(),
            vm,
            kvm,
            memory,
            layout,
            kernel,
            root: 0,
            cpu,
            cpuid,
        };
        this.write_image(config.identity_nx)?;
        for index in 0..config.vcpus {
            this.create_vcpu(index)?;
        }
        // Check now that KVM accepts the state every run starts with.
        for (index, slot) in this.vcpus.iter().enumerate() {
            let base = slot
                .fd
                .get_sregs()
                .map_err(|e| KvmError::new("KVM_GET_SREGS", e))?;
            let sregs = this.initial_sregs(index, base);
            slot.fd.set_sregs(&sregs).map_err(|e| {
                if config.paging_levels == 5 && e.errno() == libc::EINVAL {
                    SetupError::La57Rejected(e)
                } else {
                    SetupError::from(KvmError::new("KVM_SET_SREGS", e))
                }
            })?;
        }
        debug!(
            vcpus = config.vcpus,
            mem_size = config.mem_size,
            ops = ?config.paging_ops,
            root = this.root,
            "VM created"
        );
        Ok((this, registered))
    }

    fn write(&self, gpa: u64, bytes: &[u8]) -> Result<(), SetupError> {
        self.memory
            .write_slice(bytes, GuestAddress(gpa))
            .map_err(|source| SetupError::WriteImage {
                gpa: Gpa(gpa),
                source,
            })
    }

    fn write_words(&self, gpa: u64, words: &[u64]) -> Result<(), SetupError> {
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        self.write(gpa, &bytes)
    }

    /// Writes tables, descriptors and the kernel into guest memory.
    fn write_image(&mut self, identity_nx: bool) -> Result<(), SetupError> {
        let layout = &self.layout;
        let mut tables = TableBuilder::new(layout.page_tables(), layout.levels())?;
        let mut gpa = 0;
        while gpa < layout.mem_size() {
            let mut flags = layout.protection(gpa).leaf_flags();
            if !identity_nx {
                flags &= !crate::layout::pte::NX;
            }
            if flags != 0 {
                tables.map_4k(gpa, gpa, flags)?;
            }
            gpa += PAGE_SIZE;
        }
        for (frame, entries) in tables.frames() {
            self.write_words(frame, entries)?;
        }
        self.root = tables.root();

        let gdt = x86::gdt_entries(layout.vcpus(), |i| layout.tss(i));
        self.write_words(GDT_GPA, &gdt)?;
        for i in 0..layout.vcpus() {
            self.write(layout.tss(i), &x86::tss_image(layout.kernel_stack_top(i)))?;
        }
        let mut idt = Vec::with_capacity(512);
        for vector in 0..=255u8 {
            let dpl = if vector == crate::kit::abi::SYSCALL_VECTOR {
                3
            } else {
                0
            };
            idt.extend_from_slice(&x86::interrupt_gate(
                self.kernel.vector_handler(vector),
                x86::SEL_KERNEL_CODE,
                dpl,
            ));
        }
        self.write_words(IDT_GPA, &idt)?;
        self.write(KERNEL_CODE_GPA, self.kernel.code())?;
        Ok(())
    }

    fn create_vcpu(&mut self, index: usize) -> Result<(), SetupError> {
        let fd = self
            .vm
            .create_vcpu(index as u64)
            .map_err(|e| KvmError::new("KVM_CREATE_VCPU", e))?;
        let mut cpuid = self.cpuid.clone();
        for entry in cpuid.as_mut_slice() {
            match entry.function {
                // Initial APIC id.
                1 => entry.ebx = (entry.ebx & 0x00ff_ffff) | ((index as u32) << 24),
                // x2APIC id.
                0xb | 0x1f => entry.edx = index as u32,
                _ => {}
            }
        }
        fd.set_cpuid2(&cpuid)
            .map_err(|e| KvmError::new("KVM_SET_CPUID2", e))?;
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        fd.set_fpu(&fpu)
            .map_err(|e| KvmError::new("KVM_SET_FPU", e))?;
        self.vcpus.push(VcpuSlot {
            id: VcpuId(index as u32),
            fd,
            control: Arc::new(VcpuControl::default()),
        });
        Ok(())
    }

    /// The special registers vCPU `index` starts every run with: long
    /// mode, CPL0, this VM's tables, GDT, IDT and its TSS.
    fn initial_sregs(&self, index: usize, base: kvm_sregs) -> kvm_sregs {
        let layout = &self.layout;
        let mut sregs = base;
        sregs.cs = x86::code_segment(x86::SEL_KERNEL_CODE);
        let data = x86::data_segment(x86::SEL_KERNEL_DATA);
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = x86::task_segment(x86::tss_selector(index), layout.tss(index));
        sregs.ldt = x86::unusable_ldt();
        let gdt_len = x86::gdt_entries(layout.vcpus(), |_| 0).len() * 8;
        sregs.gdt = x86::dtable(GDT_GPA, (gdt_len - 1) as u16);
        sregs.idt = x86::dtable(IDT_GPA, 256 * 16 - 1);
        sregs.cr0 =
            x86::CR0_PE | x86::CR0_MP | x86::CR0_ET | x86::CR0_NE | x86::CR0_WP | x86::CR0_PG;
        sregs.cr2 = 0;
        sregs.cr3 = self.root;
        sregs.cr4 = x86::CR4_PAE | x86::CR4_OSFXSR | x86::CR4_OSXMMEXCPT;
        if layout.levels() == 5 {
            sregs.cr4 |= x86::CR4_LA57;
        }
        sregs.efer = x86::EFER_LME | x86::EFER_LMA | x86::EFER_NXE;
        sregs
    }

    /// The general registers vCPU `index` starts `program` with.
    fn initial_regs(&self, index: usize, program: &Program, args: &VcpuArgs) -> kvm_regs {
        let [rdi, rsi, rdx, rcx, r8, r9] = args.0;
        let mut regs = kvm_regs {
            rdi,
            rsi,
            rdx,
            rcx,
            r8,
            r9,
            rflags: x86::RFLAGS_FIXED,
            rsp: self.layout.kernel_stack_top(index),
            ..Default::default()
        };
        match program.ring() {
            Ring::User => {
                regs.rip = self.kernel.enter_user();
                regs.r12 = program.entry();
                regs.r13 = self.layout.user_stack_top(index);
            }
            Ring::Kernel => regs.rip = program.entry(),
        }
        regs
    }

    /// Runs `program` on vCPUs `0..args.len()` (vCPU i gets `args[i]`) with
    /// the [`DefaultHandler`], until every vCPU ends, one fails, or `limit`
    /// passes.
    pub fn run(
        &mut self,
        program: &Program,
        args: &[VcpuArgs],
        limit: Duration,
    ) -> Result<RunReport, RunError> {
        let handlers = vec![DefaultHandler; args.len()];
        self.run_with(program, args, limit, handlers)
    }

    /// Like [`run`](Vm::run), with one exit handler per running vCPU.
    ///
    /// Every vCPU runs on its own thread. When one fails, the others are
    /// kicked and stopped, and the first failure is returned. When `limit`
    /// passes, every vCPU still running is kicked and reports
    /// [`VcpuError::Timeout`].
    pub fn run_with<H: ExitHandler>(
        &mut self,
        program: &Program,
        args: &[VcpuArgs],
        limit: Duration,
        handlers: Vec<H>,
    ) -> Result<RunReport, RunError> {
        if args.is_empty() || args.len() > self.vcpus.len() {
            return Err(RunError::Request(format!(
                "{} vCPUs requested, the VM has {}",
                args.len(),
                self.vcpus.len()
            )));
        }
        if handlers.len() != args.len() {
            return Err(RunError::Request(format!(
                "{} handlers for {} vCPUs",
                handlers.len(),
                args.len()
            )));
        }
        self.write(PROGRAM_CODE_GPA, program.code())?;
        let mut starts = Vec::with_capacity(args.len());
        for (index, arg) in args.iter().enumerate() {
            let base = self.vcpus[index]
                .fd
                .get_sregs()
                .map_err(|e| SetupError::from(KvmError::new("KVM_GET_SREGS", e)))?;
            starts.push((
                self.initial_sregs(index, base),
                self.initial_regs(index, program, arg),
            ));
        }
        debug!(
            program = program.name(),
            vcpus = args.len(),
            ?limit,
            "run starts"
        );

        let started = Instant::now();
        let memory = &self.memory;
        let layout = &self.layout;
        let kernel = &self.kernel;
        let results = std::thread::scope(|scope| {
            let (done_tx, done_rx) = mpsc::channel::<(usize, bool)>();
            let mut threads = Vec::with_capacity(args.len());
            let controls: Vec<Arc<VcpuControl>> = self
                .vcpus
                .iter()
                .take(args.len())
                .map(|slot| Arc::clone(&slot.control))
                .collect();
            for ((slot, (sregs, regs)), mut handler) in
                self.vcpus.iter_mut().zip(starts).zip(handlers)
            {
                let thread_tx = done_tx.clone();
                let index = slot.id.0 as usize;
                let run = VcpuRun {
                    id: slot.id,
                    fd: &mut slot.fd,
                    control: Arc::clone(&slot.control),
                    memory,
                    layout,
                    kernel,
                    sregs,
                    regs,
                    limit,
                };
                let control = Arc::clone(&slot.control);
                let thread = std::thread::Builder::new()
                    .name(format!("vcpu{index}"))
                    .spawn_scoped(scope, move || {
                        let mut notify = Notify {
                            tx: thread_tx,
                            index,
                            failed: true,
                        };
                        control.attach_current_thread();
                        let result = run_vcpu(run, &mut handler);
                        control.detach_thread();
                        notify.failed = result.is_err();
                        result
                    });
                match thread {
                    Ok(thread) => threads.push(thread),
                    Err(e) => {
                        // Stop the ones already started, then report.
                        for control in &controls {
                            control.post(request::ABORT);
                        }
                        drop(done_tx);
                        let joined: Vec<_> = threads.into_iter().map(|t| t.join()).collect();
                        drop(joined);
                        return Err(RunError::Request(format!(
                            "cannot spawn a vCPU thread: {e}"
                        )));
                    }
                }
            }
            drop(done_tx);
            let order = supervise(&done_rx, &controls, started + limit);
            let mut results = Vec::with_capacity(threads.len());
            for thread in threads {
                match thread.join() {
                    Ok(result) => results.push(result),
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            }
            Ok((results, order))
        });
        let (results, order) = results?;
        let elapsed = started.elapsed();
        for control in self.vcpus.iter().map(|s| &s.control) {
            // Stale stop reasons must not leak into the next run.
            control.clear(request::TIMEOUT | request::ABORT);
        }

        let failed = order
            .iter()
            .copied()
            .find(|&i| matches!(&results[i], Err(e) if !matches!(e, VcpuError::Aborted)));
        let mut reports = Vec::with_capacity(results.len());
        let mut first_error = None;
        for (index, result) in results.into_iter().enumerate() {
            match result {
                Ok(report) => reports.push(report),
                Err(e) if Some(index) == failed || (failed.is_none() && first_error.is_none()) => {
                    first_error = Some((index, e));
                }
                Err(_) => {}
            }
        }
        if let Some((index, source)) = first_error {
            debug!(vcpu = index, error = %source, "run failed");
            return Err(RunError::Vcpu {
                vcpu: VcpuId(index as u32),
                source,
            });
        }
        debug!(program = program.name(), ?elapsed, "run done");
        Ok(RunReport {
            vcpus: reports,
            elapsed,
        })
    }

    /// A handle that kicks or stops vCPU `index` from any thread.
    pub fn kicker(&self, index: usize) -> Option<Kicker> {
        self.vcpus
            .get(index)
            .map(|slot| Kicker::new(slot.id, Arc::clone(&slot.control)))
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// The guest-physical layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The root of the identity page tables (the CR3 every run starts with).
    pub fn root(&self) -> u64 {
        self.root
    }

    /// The kernel loaded into this VM.
    pub fn kernel(&self) -> &Kernel {
        &self.kernel
    }

    /// What KVM offers the guest.
    pub fn cpu(&self) -> CpuInfo {
        self.cpu
    }

    /// The KVM system handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The KVM VM handle (memslots, dirty logs).
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    /// Reads the u64 at `gpa`.
    pub fn read_u64(&self, gpa: u64) -> Result<u64, vm_memory::GuestMemoryError> {
        self.memory.read_obj(GuestAddress(gpa))
    }

    /// vCPU `index`'s fault log: the faults delivered to the guest
    /// ([`action::DELIVER`](crate::kit::abi::action::DELIVER)) since its
    /// last run started, read from its kernel page.
    pub fn fault_log(&self, index: usize) -> Result<FaultLog, vm_memory::GuestMemoryError> {
        let page = self.layout.kernel_page(index);
        if index >= self.vcpus.len() {
            return Err(vm_memory::GuestMemoryError::InvalidGuestAddress(
                GuestAddress(page),
            ));
        }
        let mut bytes = vec![0u8; PAGE_SIZE as usize];
        self.memory.read_slice(&mut bytes, GuestAddress(page))?;
        let words: Vec<u64> = bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        Ok(FaultLog::from_kernel_page(&words))
    }

    /// Writes the u64 at `gpa`. For guest data only: once the guest has
    /// run, a KVM that shadows guest tables does not see page-table edits
    /// made this way.
    pub fn write_u64(&self, gpa: u64, value: u64) -> Result<(), vm_memory::GuestMemoryError> {
        self.memory.write_obj(value, GuestAddress(gpa))
    }

    /// The paging context every run starts with, at CPL `cpl`.
    pub fn paging_context(&self, cpl: u8) -> PagingContext {
        use mmu_api::paging::{Cr0, Cr4, Efer};
        let mut cr4 = Cr4::PAE;
        if self.layout.levels() == 5 {
            cr4 |= Cr4::LA57;
        }
        let mut ctx = PagingContext::new(self.cpu.features, self.cpu.maxphyaddr);
        ctx.cr0 = Cr0::PE | Cr0::WP | Cr0::PG;
        ctx.cr3 = self.root;
        ctx.cr4 = cr4;
        ctx.efer = Efer::LME | Efer::LMA | Efer::NXE;
        ctx.cpl = cpl;
        ctx
    }

    /// Where the leaf (4 KiB) entry mapping `va` lives in the identity
    /// tables, found with `mmu-api`'s reference walker (no A/D update).
    pub fn leaf_entry_gpa(&self, va: u64) -> Option<u64> {
        use mmu_api::paging::{AccessKind, WalkOptions, walk_with};
        let ctx = self.paging_context(0);
        let options = WalkOptions::without_accessed_dirty();
        let access = mmu_api::Access::supervisor(AccessKind::Read);
        walk_with(
            &ctx,
            &GuestPhys(&self.memory),
            mmu_api::Gva(va),
            access,
            options,
        )
        .ok()
        .and_then(|t| t.leaf().map(|s| s.entry_gpa.raw()))
    }
}

/// Registers every region of `memory` with KVM as its own memslot (slot
/// numbers from 0), without flags.
fn register_with_kvm(vm: &Arc<VmFd>, memory: &GuestMemoryMmap) -> Result<(), SetupError> {
    for (slot, region) in memory.iter().enumerate() {
        let host = memory
            .get_host_address(region.start_addr())
            .map_err(|source| SetupError::WriteImage {
                gpa: Gpa(region.start_addr().0),
                source,
            })?;
        let mapping = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live anonymous mapping of `memory_size`
        // bytes owned by `memory`, which the Vm keeps until after the VM
        // and vCPU fds are closed (field order); this function keeps no
        // clone of the VM fd, so the Vm's is the only one.
        unsafe { vm.set_user_memory_region(mapping) }
            .map_err(|e| KvmError::new("KVM_SET_USER_MEMORY_REGION", e))?;
    }
    Ok(())
}

/// Tells the supervisor a vCPU thread ended, even if it panicked.
struct Notify {
    tx: mpsc::Sender<(usize, bool)>,
    index: usize,
    failed: bool,
}

impl Drop for Notify {
    fn drop(&mut self) {
        // The supervisor outlives every vCPU thread (scoped threads), so
        // the receiver is alive; an error here is impossible in practice.
        let _ = self.tx.send((self.index, self.failed));
    }
}

/// Waits for the vCPU threads; stops the others when one fails and all of
/// them when `deadline` passes. Returns the indices that failed, in the
/// order they failed.
fn supervise(
    done: &mpsc::Receiver<(usize, bool)>,
    controls: &[Arc<VcpuControl>],
    deadline: Instant,
) -> Vec<usize> {
    const REKICK: Duration = Duration::from_millis(100);
    let mut running = vec![true; controls.len()];
    let mut failures = Vec::new();
    let mut aborting = false;
    let mut timed_out = false;
    while running.iter().any(|r| *r) {
        let now = Instant::now();
        let wait = if timed_out || aborting {
            REKICK
        } else {
            deadline.saturating_duration_since(now)
        };
        match done.recv_timeout(wait) {
            Ok((index, failed)) => {
                running[index] = false;
                if failed {
                    failures.push(index);
                    if !aborting && !timed_out {
                        aborting = true;
                        for (i, control) in controls.iter().enumerate() {
                            if running[i] {
                                control.post(request::ABORT);
                            }
                        }
                    }
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                // Past the deadline (or a stop still pending): kick every
                // vCPU still running; repeat until each has left.
                let bits = if aborting && !timed_out {
                    request::ABORT
                } else {
                    timed_out = true;
                    request::TIMEOUT
                };
                for (i, control) in controls.iter().enumerate() {
                    if running[i] {
                        control.post(bits);
                    }
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    failures
}

/// `mmu-api`'s guest-physical memory port over vm-memory.
#[derive(Debug)]
pub struct GuestPhys<'a>(pub &'a GuestMemoryMmap);

impl GuestPhys<'_> {
    fn with_atomic<R>(
        &self,
        gpa: Gpa,
        op: impl FnOnce(&AtomicU64) -> R,
    ) -> Result<R, PhysMemError> {
        if !gpa.raw().is_multiple_of(8) {
            return Err(PhysMemError::Misaligned(gpa));
        }
        let slice = self
            .0
            .get_slice(GuestAddress(gpa.raw()), 8)
            .map_err(|_| PhysMemError::Unbacked(gpa))?;
        let atomic: &AtomicU64 = slice
            .get_atomic_ref(0)
            .map_err(|_| PhysMemError::Misaligned(gpa))?;
        Ok(op(atomic))
    }
}

impl GuestPhysMemory for GuestPhys<'_> {
    fn read_u64(&self, gpa: Gpa) -> Result<u64, PhysMemError> {
        self.with_atomic(gpa, |a| a.load(std::sync::atomic::Ordering::SeqCst))
    }

    fn compare_exchange_u64(
        &self,
        gpa: Gpa,
        current: u64,
        new: u64,
    ) -> Result<Result<(), u64>, PhysMemError> {
        self.with_atomic(gpa, |a| {
            a.compare_exchange(
                current,
                new,
                std::sync::atomic::Ordering::SeqCst,
                std::sync::atomic::Ordering::SeqCst,
            )
            .map(|_| ())
        })
    }
}
