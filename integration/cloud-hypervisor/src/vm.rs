//! The `hypervisor::Vm` decorator.

use std::any::Any;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use hypervisor::arch::x86::VcpuMsrConfigUpdate;
use hypervisor::{
    ClockData, ClockRestoreMode, ClockState, DataMatch, HypervisorVmError, InterruptSourceConfig,
    IoEventAddress, IrqRoutingEntry,
};
use mmu_api::{MmuBackend, SlotId, VcpuId, VcpuKick};
use mmu_backends::{BackendConfig, BackendKind};
use mmu_integration::host::{
    GuestMmuPath, HostCoherence, HostError, HostMmu, HostOptions, ShadowBacking,
};
use mmu_integration::{ExitStats, SlotError, UserRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::ops::MmuOps;
use crate::regions::ChRegions;
use crate::vcpu::MmuVcpu;

type VmResult<T> = Result<T, HypervisorVmError>;

/// Makes vCPU `id` leave the guest (Cloud Hypervisor: a signal to its
/// thread plus `set_immediate_exit`).
pub type KickFactory = dyn Fn(u32) -> Arc<dyn VcpuKick> + Send + Sync;

/// How Cloud Hypervisor sets the MMU up for a VM.
#[derive(Clone)]
pub struct MmuConfig {
    /// `ept` or `shadow`.
    pub kind: BackendKind,
    /// The backend's configuration.
    pub backend: BackendConfig,
    /// The guest speaks the paravirtual MMU ABI (its #PF vector exits by
    /// port I/O; CR3 loads, INVLPG and TLB flushes are hypercalls), and
    /// the VMM hands those exits to the MMU. Without it shadow paging is
    /// refused: a stock guest's page faults and CR3 loads never reach the
    /// MMU.
    pub paravirtual_mmu: bool,
    /// Kicks for the vCPUs, which shadow paging needs (its zaps wait for
    /// every vCPU to leave the guest). The EPT backend never kicks.
    pub kick: Option<Arc<KickFactory>>,
}

impl fmt::Debug for MmuConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MmuConfig")
            .field("kind", &self.kind)
            .field("backend", &self.backend)
            .field("paravirtual_mmu", &self.paravirtual_mmu)
            .field("kick", &self.kick.is_some())
            .finish()
    }
}

impl MmuConfig {
    /// The `kind` backend with its default configuration, a stock guest
    /// and no kicks.
    pub fn new(kind: BackendKind) -> Self {
        MmuConfig {
            kind,
            backend: BackendConfig::default(),
            paravirtual_mmu: false,
            kick: None,
        }
    }
}

/// Why the MMU could not be set up for a Cloud Hypervisor VM.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdapterError {
    /// The MMU refused (shadow without a path for the guest's MMU events,
    /// a backend not compiled in, a hypervisor refusal).
    #[error("the MMU could not be set up")]
    Host(#[from] HostError),
    /// Shadow paging was asked for without vCPU kicks.
    #[error("shadow paging needs a way to kick the vCPUs out of the guest")]
    NoKick,
}

/// A kick for a backend that never asks for one (the EPT backend posts no
/// request that waits for a vCPU to leave the guest).
#[derive(Debug)]
struct NeverAsked;

impl VcpuKick for NeverAsked {
    fn kick(&self) {
        tracing::warn!("the MMU kicked a vCPU, but the host gave it no kick");
    }
}

/// A Cloud Hypervisor VM with the MMU in front of its memory, vCPUs and
/// dirty logging. Wrap the VM `create_hypervisor_vm` returns:
///
/// ```text
/// let vm = hypervisor.create_vm(config)?;
/// let vm: Arc<dyn hypervisor::Vm> = Arc::new(MmuVm::new(vm, &MmuConfig::new(kind))?);
/// ```
pub struct MmuVm {
    mmu: HostMmu<ChRegions, SlotError>,
    regions: Arc<ChRegions>,
    kick: Option<Arc<KickFactory>>,
    /// Every vCPU's `VmOps`, for the counters.
    vcpus: Mutex<BTreeMap<u32, Arc<MmuOps>>>,
}

impl fmt::Debug for MmuVm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MmuVm")
            .field("mmu", &self.mmu)
            .finish_non_exhaustive()
    }
}

impl MmuVm {
    /// Puts the MMU in front of `vm`, before any memory or vCPU is added.
    ///
    /// Refuses shadow paging unless `config.paravirtual_mmu` is set and a
    /// kick is given ([`HostError::NoGuestMmuPath`], [`AdapterError::NoKick`]).
    pub fn new(vm: Arc<dyn hypervisor::Vm>, config: &MmuConfig) -> Result<MmuVm, AdapterError> {
        let options = HostOptions {
            coherence: HostCoherence::Detect,
            guest_mmu: if config.paravirtual_mmu {
                GuestMmuPath::Paravirtual
            } else {
                GuestMmuPath::None
            },
            // Cloud Hypervisor's guest memory is private anonymous memory
            // unless `shared=on`, which the arena cannot map a second
            // time: mirror each memslot into a KVM memslot instead.
            shadow_backing: ShadowBacking::Mirror,
        };
        if config.kind == BackendKind::Shadow
            && options.guest_mmu == GuestMmuPath::Paravirtual
            && config.kick.is_none()
        {
            return Err(AdapterError::NoKick);
        }
        let regions = Arc::new(ChRegions::new(vm));
        let mmu =
            HostMmu::with_options(config.kind, &config.backend, Arc::clone(&regions), options)?;
        Ok(MmuVm {
            mmu,
            regions,
            kick: config.kick.clone(),
            vcpus: Mutex::new(BTreeMap::new()),
        })
    }

    /// The MMU (backend, memslot glue).
    pub fn mmu(&self) -> &HostMmu<ChRegions, SlotError> {
        &self.mmu
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<dyn MmuBackend> {
        self.mmu.backend()
    }

    /// The MMU exit counters of vCPU `id` (created with `VmOps`).
    pub fn vcpu_stats(&self, id: u32) -> Option<ExitStats> {
        self.lock_vcpus().get(&id).map(|ops| ops.stats())
    }

    /// The MMU exit counters of all vCPUs, summed.
    pub fn exit_stats(&self) -> ExitStats {
        let mut sum = ExitStats::default();
        for ops in self.lock_vcpus().values() {
            sum.add(&ops.stats());
        }
        sum
    }

    fn lock_vcpus(&self) -> MutexGuard<'_, BTreeMap<u32, Arc<MmuOps>>> {
        // Every critical section is one insert or a read.
        self.vcpus.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn inner(&self) -> &Arc<dyn hypervisor::Vm> {
        self.regions.vm()
    }
}

impl hypervisor::Vm for MmuVm {
    fn create_vcpu(
        &self,
        id: u32,
        vm_ops: Option<Arc<dyn hypervisor::VmOps>>,
        msr_config_update: Option<VcpuMsrConfigUpdate>,
    ) -> VmResult<Box<dyn hypervisor::Vcpu>> {
        let ops = match vm_ops {
            Some(inner) => {
                let kick = match &self.kick {
                    Some(factory) => factory(id),
                    None => Arc::new(NeverAsked),
                };
                let exits = self
                    .mmu
                    .create_vcpu(VcpuId(id), kick)
                    .map_err(|e| HypervisorVmError::CreateVcpu(e.into()))?;
                Some(Arc::new(MmuOps::new(inner, exits)))
            }
            None => None,
        };
        let as_ops = ops.clone().map(|o| o as Arc<dyn hypervisor::VmOps>);
        let vcpu = self.inner().create_vcpu(id, as_ops, msr_config_update)?;
        if let Some(ops) = &ops {
            self.lock_vcpus().insert(id, Arc::clone(ops));
        }
        Ok(Box::new(MmuVcpu::new(vcpu, ops)))
    }

    unsafe fn create_user_memory_region(
        &self,
        slot: u32,
        guest_phys_addr: u64,
        memory_size: usize,
        userspace_addr: *mut u8,
        readonly: bool,
        log_dirty_pages: bool,
    ) -> VmResult<()> {
        let region = UserRegion {
            slot,
            guest_phys_addr,
            memory_size: memory_size as u64,
            userspace_addr: userspace_addr as u64,
            readonly,
            log_dirty: log_dirty_pages,
        };
        // SAFETY: our caller guarantees the host range stays valid until
        // `remove_user_memory_region` for the slot, which deletes the slot
        // from the glue before it returns.
        unsafe { self.mmu.memslots().add_user_region(&region) }
            .map(drop)
            .map_err(|e| HypervisorVmError::CreateUserMemory(e.into()))
    }

    unsafe fn remove_user_memory_region(
        &self,
        slot: u32,
        _guest_phys_addr: u64,
        _memory_size: usize,
        _userspace_addr: *mut u8,
        _readonly: bool,
        _log_dirty_pages: bool,
    ) -> VmResult<()> {
        self.mmu
            .memslots()
            .delete(SlotId(slot))
            .map(drop)
            .map_err(|e| HypervisorVmError::RemoveUserMemory(e.into()))
    }

    fn start_dirty_log(&self) -> VmResult<()> {
        self.mmu
            .memslots()
            .start_dirty_log()
            .map_err(|e| HypervisorVmError::StartDirtyLog(e.into()))
    }

    fn stop_dirty_log(&self) -> VmResult<()> {
        self.mmu
            .memslots()
            .stop_dirty_log()
            .map_err(|e| HypervisorVmError::StopDirtyLog(e.into()))
    }

    fn get_dirty_log(&self, slot: u32, _base_gpa: u64, _memory_size: u64) -> VmResult<Vec<u64>> {
        self.mmu
            .memslots()
            .dirty_log(SlotId(slot))
            .map(|log| log.words().to_vec())
            .map_err(|e| HypervisorVmError::GetDirtyLog(e.into()))
    }

    fn set_identity_map_address(&self, address: u64) -> VmResult<()> {
        self.inner().set_identity_map_address(address)
    }
    fn set_tss_address(&self, offset: usize) -> VmResult<()> {
        self.inner().set_tss_address(offset)
    }
    fn create_irq_chip(&self) -> VmResult<()> {
        self.inner().create_irq_chip()
    }
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> VmResult<()> {
        self.inner().register_irqfd(fd, gsi)
    }
    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> VmResult<()> {
        self.inner().unregister_irqfd(fd, gsi)
    }
    fn register_ioevent(
        &self,
        fd: &EventFd,
        addr: &IoEventAddress,
        datamatch: Option<DataMatch>,
    ) -> VmResult<()> {
        self.inner().register_ioevent(fd, addr, datamatch)
    }
    fn unregister_ioevent(&self, fd: &EventFd, addr: &IoEventAddress) -> VmResult<()> {
        self.inner().unregister_ioevent(fd, addr)
    }
    fn make_routing_entry(&self, gsi: u32, config: &InterruptSourceConfig) -> IrqRoutingEntry {
        self.inner().make_routing_entry(gsi, config)
    }
    fn set_gsi_routing(&self, entries: &[IrqRoutingEntry]) -> VmResult<()> {
        self.inner().set_gsi_routing(entries)
    }
    fn enable_split_irq(&self) -> VmResult<()> {
        self.inner().enable_split_irq()
    }
    fn get_clock(&self) -> VmResult<ClockData> {
        self.inner().get_clock()
    }
    fn set_clock(&self, data: &ClockData) -> VmResult<()> {
        self.inner().set_clock(data)
    }
    fn snapshot_clock(&self, boot_vcpu: &dyn hypervisor::Vcpu) -> VmResult<Option<ClockState>> {
        self.inner().snapshot_clock(boot_vcpu)
    }
    fn restore_clock(
        &self,
        vcpus: &[&dyn hypervisor::Vcpu],
        state: &ClockState,
        mode: ClockRestoreMode,
    ) -> VmResult<()> {
        self.inner().restore_clock(vcpus, state, mode)
    }
    fn create_passthrough_device(&self) -> VmResult<vfio_ioctls::VfioDeviceFd> {
        self.inner().create_passthrough_device()
    }
    /// The wrapped VM, so Cloud Hypervisor's downcasts to its KVM or MSHV
    /// VM keep working.
    fn as_any(&self) -> &dyn Any {
        self.inner().as_any()
    }
    fn init(&self) -> VmResult<()> {
        self.inner().init()
    }
    fn pause(&self) -> VmResult<()> {
        self.inner().pause()
    }
    fn resume(&self) -> VmResult<()> {
        self.inner().resume()
    }
    #[cfg(feature = "kvm")]
    fn enable_x2apic_api(&self) -> VmResult<()> {
        self.inner().enable_x2apic_api()
    }
}
