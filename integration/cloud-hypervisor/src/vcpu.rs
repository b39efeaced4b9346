//! The `hypervisor::Vcpu` decorator.

use std::sync::Arc;

use hypervisor::arch::x86::{CpuIdEntry, FpuState, LapicState, MsrEntry, SpecialRegisters};
use hypervisor::{
    CpuState, HypervisorCpuError, HypervisorType, MpState, StandardRegisters, VmExit,
};
use mmu_integration::host::PageFaultDelivery;
use mmu_integration::ports::{Exception, PortError, VcpuPort};
use mmu_integration::{Action, ExitStats, apply_action};
use vm_memory::GuestAddress;

use crate::ops::MmuOps;

type CpuResult<T> = Result<T, HypervisorCpuError>;

/// A Cloud Hypervisor vCPU with the MMU around `run()`: before it, the
/// MMU's `prepare_entry` (through [`MmuOps`], which may have run it inside
/// the last `run()` already) and whatever root load it asks for; after it,
/// `exit_guest`. Every other call goes straight to the wrapped vCPU.
///
/// A root load needs `set_sregs` (and reads `get_sregs`), which Cloud
/// Hypervisor's vCPU seccomp filter does not allow: only shadow paging
/// asks for one, and [`MmuVm`](crate::MmuVm) runs shadow only for a
/// guest that speaks the paravirtual MMU ABI, on a host that allows
/// `KVM_GET_SREGS` / `KVM_SET_SREGS` on vCPU threads.
pub struct MmuVcpu {
    inner: Box<dyn hypervisor::Vcpu>,
    ops: Option<Arc<MmuOps>>,
}

impl std::fmt::Debug for MmuVcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmuVcpu")
            .field("ops", &self.ops)
            .finish_non_exhaustive()
    }
}

impl MmuVcpu {
    /// Wraps `inner`, created with `ops` as its `VmOps` (or without any).
    pub fn new(inner: Box<dyn hypervisor::Vcpu>, ops: Option<Arc<MmuOps>>) -> Self {
        MmuVcpu { inner, ops }
    }

    /// The vCPU's MMU counters (zero without `VmOps`).
    pub fn stats(&self) -> ExitStats {
        self.ops.as_ref().map(|o| o.stats()).unwrap_or_default()
    }

    /// The MMU's `VmOps` for this vCPU.
    pub fn ops(&self) -> Option<&Arc<MmuOps>> {
        self.ops.as_ref()
    }
}

/// CR3 and CR2 through the `Vcpu` trait's special registers; Cloud
/// Hypervisor's `Vcpu` has no call that queues an exception.
struct Registers<'a>(&'a dyn hypervisor::Vcpu);

impl VcpuPort for Registers<'_> {
    fn set_cr3(&self, cr3: u64) -> Result<(), PortError> {
        let mut sregs = self
            .0
            .get_sregs()
            .map_err(|e| PortError::failed("get_sregs", e))?;
        sregs.cr3 = cr3;
        self.0
            .set_sregs(&sregs)
            .map_err(|e| PortError::failed("set_sregs", e))
    }

    fn set_cr2(&self, cr2: u64) -> Result<(), PortError> {
        let mut sregs = self
            .0
            .get_sregs()
            .map_err(|e| PortError::failed("get_sregs", e))?;
        sregs.cr2 = cr2;
        self.0
            .set_sregs(&sregs)
            .map_err(|e| PortError::failed("set_sregs", e))
    }

    fn queue_exception(&self, _exception: &Exception) -> Result<(), PortError> {
        Err(PortError::Unsupported {
            op: "queue an exception through Cloud Hypervisor's Vcpu trait",
        })
    }
}

impl hypervisor::Vcpu for MmuVcpu {
    fn run(&mut self) -> Result<VmExit, HypervisorCpuError> {
        if let Some(ops) = &self.ops {
            let action = ops
                .decorator()
                .enter()
                .map_err(|e| HypervisorCpuError::RunVcpu(e.into()))?;
            if action != Action::Resume {
                apply_action(&Registers(&*self.inner), action, PageFaultDelivery::SetCr2)
                    .map_err(|e| HypervisorCpuError::RunVcpu(e.into()))?;
            }
        }
        let exit = self.inner.run();
        if let Some(ops) = &self.ops {
            ops.decorator().leave();
        }
        exit
    }

    fn create_standard_regs(&self) -> StandardRegisters {
        self.inner.create_standard_regs()
    }
    fn get_regs(&self) -> CpuResult<StandardRegisters> {
        self.inner.get_regs()
    }
    fn set_regs(&self, regs: &StandardRegisters) -> CpuResult<()> {
        self.inner.set_regs(regs)
    }
    fn get_sregs(&self) -> CpuResult<SpecialRegisters> {
        self.inner.get_sregs()
    }
    fn set_sregs(&self, sregs: &SpecialRegisters) -> CpuResult<()> {
        self.inner.set_sregs(sregs)
    }
    fn get_fpu(&self) -> CpuResult<FpuState> {
        self.inner.get_fpu()
    }
    fn set_fpu(&self, fpu: &FpuState) -> CpuResult<()> {
        self.inner.set_fpu(fpu)
    }
    fn set_cpuid2(&self, cpuid: &[CpuIdEntry]) -> CpuResult<()> {
        self.inner.set_cpuid2(cpuid)
    }
    fn enable_hyperv_synic(&self) -> CpuResult<()> {
        self.inner.enable_hyperv_synic()
    }
    fn get_cpuid2(&self, num_entries: usize) -> CpuResult<Vec<CpuIdEntry>> {
        self.inner.get_cpuid2(num_entries)
    }
    fn get_lapic(&self) -> CpuResult<LapicState> {
        self.inner.get_lapic()
    }
    fn set_lapic(&self, lapic: &LapicState) -> CpuResult<()> {
        self.inner.set_lapic(lapic)
    }
    fn get_msrs(&self, msrs: &mut Vec<MsrEntry>) -> CpuResult<usize> {
        self.inner.get_msrs(msrs)
    }
    fn set_msrs(&self, msrs: &[MsrEntry]) -> CpuResult<usize> {
        self.inner.set_msrs(msrs)
    }
    fn get_mp_state(&self) -> CpuResult<MpState> {
        self.inner.get_mp_state()
    }
    fn set_mp_state(&self, mp_state: MpState) -> CpuResult<()> {
        self.inner.set_mp_state(mp_state)
    }
    fn notify_guest_clock_paused(&self) -> CpuResult<()> {
        self.inner.notify_guest_clock_paused()
    }
    fn set_guest_debug(&self, addrs: &[GuestAddress], singlestep: bool) -> CpuResult<()> {
        self.inner.set_guest_debug(addrs, singlestep)
    }
    fn state(&self) -> CpuResult<CpuState> {
        self.inner.state()
    }
    fn set_state(&self, state: &CpuState) -> CpuResult<()> {
        self.inner.set_state(state)
    }
    fn translate_gva(&self, gva: u64, flags: u64) -> CpuResult<(u64, u32)> {
        self.inner.translate_gva(gva, flags)
    }
    fn set_immediate_exit(&mut self, exit: bool) {
        self.inner.set_immediate_exit(exit);
    }
    fn boot_msr_entries(&self) -> Vec<MsrEntry> {
        self.inner.boot_msr_entries()
    }
    fn tsc_khz(&self) -> CpuResult<Option<u32>> {
        self.inner.tsc_khz()
    }
    fn set_tsc_khz(&self, freq: u32) -> CpuResult<()> {
        self.inner.set_tsc_khz(freq)
    }
    fn tsc_offset(&self) -> CpuResult<Option<u64>> {
        self.inner.tsc_offset()
    }
    fn set_tsc_offset(&self, offset: u64) -> CpuResult<()> {
        self.inner.set_tsc_offset(offset)
    }
    fn get_cpuid_values(
        &self,
        function: u32,
        index: u32,
        xfem: u64,
        xss: u64,
    ) -> CpuResult<[u32; 4]> {
        self.inner.get_cpuid_values(function, index, xfem, xss)
    }
    fn nmi(&self) -> CpuResult<()> {
        self.inner.nmi()
    }
    fn hypervisor_type(&self) -> HypervisorType {
        self.inner.hypervisor_type()
    }
}
