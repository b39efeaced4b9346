//! KVM: exits from kvm-ioctls, actions applied to a `VcpuFd`, the
//! memory-region port over a `VmFd`, and VM-level setup ([`KvmMmu`]).
//!
//! A host vCPU loop on KVM looks like this (the `host_vmm` example runs
//! it):
//!
//! ```text
//! loop {
//!     apply_action(&vcpu_fd, exits.prepare_entry()?, delivery)?;
//!     let result = vcpu_fd.run();
//!     exits.exit_guest();
//!     match exits.handle_kvm_exit(result?, &mut bus)? {
//!         Routed::Handled(action) => apply_action(&vcpu_fd, action, delivery)?,
//!         Routed::Unhandled(VcpuExit::IoOut(port, data)) => { /* the VMM's own */ }
//!         Routed::Unhandled(other) => { /* ... */ }
//!     }
//! }
//! ```
//!
//! `VcpuExit` borrows the vCPU's `kvm_run` page, so the handler serves an
//! MMIO read in place (the data goes straight into the page) and returns
//! an owned [`Action`]; the loop applies it once the borrow has ended.

use std::io;
use std::sync::Arc;

use kvm_bindings::{KVM_CAP_EXCEPTION_PAYLOAD, KVM_VCPUEVENT_VALID_PAYLOAD, kvm_enable_cap};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use mmu_api::{Gpa, MmuBackend, RootLoad, VcpuId, VcpuKick};
use mmu_backends::{BackendConfig, BackendKind, BackendParts};
use tracing::{debug, trace};

use crate::bus::MmioBus;
use crate::error::ExitError;
use crate::exits::{Action, VcpuExits};
use crate::memslots::Memslots;

/// The x86 #PF vector.
const PF_VECTOR: u8 = 14;
/// The x86 #GP vector.
const GP_VECTOR: u8 = 13;

fn os_error(e: kvm_ioctls::Error) -> io::Error {
    io::Error::from_raw_os_error(e.errno())
}

/// What [`VcpuExits::handle_kvm_exit`] did with an exit.
#[derive(Debug)]
pub enum Routed<'a> {
    /// The MMU served it; apply the action ([`apply_action`]).
    Handled(Action),
    /// Not the MMU's business (port I/O, HLT, shutdown, ...): the exit,
    /// untouched, for the VMM's own loop.
    Unhandled(VcpuExit<'a>),
}

impl VcpuExits {
    /// Routes one KVM exit: `KVM_EXIT_MMIO` is classified by the MMU and
    /// served through `bus` (a read fills the exit's data in place, so it
    /// is complete when this returns); every other exit comes back
    /// [`Routed::Unhandled`].
    ///
    /// On KVM the kernel has already emulated the instruction behind an
    /// MMIO exit, so the action for one is always [`Action::Resume`].
    pub fn handle_kvm_exit<'a>(
        &mut self,
        exit: VcpuExit<'a>,
        bus: &mut dyn MmioBus,
    ) -> Result<Routed<'a>, ExitError> {
        match exit {
            VcpuExit::MmioRead(addr, data) => {
                trace!(
                    vcpu = self.id().0,
                    gpa = addr,
                    len = data.len(),
                    "KVM_EXIT_MMIO read"
                );
                self.mmio_read(Gpa(addr), data, bus)?;
                Ok(Routed::Handled(Action::Resume))
            }
            VcpuExit::MmioWrite(addr, data) => {
                trace!(
                    vcpu = self.id().0,
                    gpa = addr,
                    len = data.len(),
                    "KVM_EXIT_MMIO write"
                );
                self.mmio_write(Gpa(addr), data, bus)?;
                Ok(Routed::Handled(Action::Resume))
            }
            other => {
                self.count_unhandled();
                Ok(Routed::Unhandled(other))
            }
        }
    }
}

/// How [`apply_action`] delivers a #PF, which depends on whether the VM
/// enabled `KVM_CAP_EXCEPTION_PAYLOAD` ([`enable_exception_payload`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PageFaultDelivery {
    /// The exception is queued pending with CR2 as its payload; KVM writes
    /// CR2 when it delivers it (what the architecture does, and what a
    /// nested hypervisor intercepting #PF needs).
    Payload,
    /// CR2 is written with `KVM_SET_SREGS` first, then the exception is
    /// injected (kernels without the capability).
    SetCr2,
}

/// Enables `KVM_CAP_EXCEPTION_PAYLOAD` on the VM if KVM has it (before any
/// vCPU runs), and says how #PFs will be delivered.
pub fn enable_exception_payload(vm: &VmFd) -> io::Result<PageFaultDelivery> {
    if vm.check_extension_raw(u64::from(KVM_CAP_EXCEPTION_PAYLOAD)) <= 0 {
        return Ok(PageFaultDelivery::SetCr2);
    }
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_EXCEPTION_PAYLOAD,
        ..Default::default()
    };
    cap.args[0] = 1;
    vm.enable_cap(&cap).map_err(os_error)?;
    debug!("KVM_CAP_EXCEPTION_PAYLOAD enabled");
    Ok(PageFaultDelivery::Payload)
}

/// Why [`apply_action`] could not carry an action out.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApplyError {
    /// A KVM ioctl failed.
    #[error("{ioctl} failed")]
    Kvm {
        /// The ioctl.
        ioctl: &'static str,
        /// Its error.
        #[source]
        source: io::Error,
    },
    /// The action needs an instruction emulator, which this crate does not
    /// have: the VMM must decode and perform the instruction at RIP.
    #[error("the instruction at RIP must be emulated by the VMM ({action:?})")]
    NeedsEmulation {
        /// The action (EmulateMmio or EmulateWrite).
        action: Action,
    },
    /// A TLB flush without a new root: KVM has no ioctl that flushes a
    /// vCPU's guest TLB alone.
    #[error("KVM cannot flush a vCPU's TLB without loading a new root")]
    FlushWithoutRoot,
}

fn kvm_failed(ioctl: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> ApplyError {
    move |e| ApplyError::Kvm {
        ioctl,
        source: os_error(e),
    }
}

/// Carries out `action` on a KVM vCPU, before its next `KVM_RUN`.
///
/// - [`Action::Resume`] needs nothing.
/// - [`Action::LoadRoot`] with a root: CR3 is set to it with
///   `KVM_SET_SREGS` (KVM resets its MMU context when CR3 changes, which
///   drops the translations of the old root).
/// - [`Action::InjectPageFault`] / [`Action::InjectGeneralProtection`]:
///   the exception is queued with `KVM_SET_VCPU_EVENTS` (see
///   [`PageFaultDelivery`]); KVM delivers it on entry, after completing an
///   instruction an exit left pending.
/// - [`Action::EmulateMmio`] / [`Action::EmulateWrite`]:
///   [`ApplyError::NeedsEmulation`].
pub fn apply_action(
    fd: &VcpuFd,
    action: Action,
    delivery: PageFaultDelivery,
) -> Result<(), ApplyError> {
    match action {
        Action::Resume => Ok(()),
        Action::LoadRoot(RootLoad {
            root: Some(root), ..
        }) => {
            let mut sregs = fd.get_sregs().map_err(kvm_failed("KVM_GET_SREGS"))?;
            sregs.cr3 = root.raw();
            fd.set_sregs(&sregs).map_err(kvm_failed("KVM_SET_SREGS"))?;
            debug!(root = root.raw(), "new root loaded into CR3");
            Ok(())
        }
        Action::LoadRoot(RootLoad { root: None, .. }) => Err(ApplyError::FlushWithoutRoot),
        Action::InjectPageFault { error_code, cr2 } => {
            let mut events = fd
                .get_vcpu_events()
                .map_err(kvm_failed("KVM_GET_VCPU_EVENTS"))?;
            events.exception.nr = PF_VECTOR;
            events.exception.has_error_code = 1;
            events.exception.error_code = error_code.bits();
            match delivery {
                PageFaultDelivery::Payload => {
                    events.exception.pending = 1;
                    events.exception.injected = 0;
                    events.exception_has_payload = 1;
                    events.exception_payload = cr2.raw();
                    events.flags |= KVM_VCPUEVENT_VALID_PAYLOAD;
                }
                PageFaultDelivery::SetCr2 => {
                    let mut sregs = fd.get_sregs().map_err(kvm_failed("KVM_GET_SREGS"))?;
                    sregs.cr2 = cr2.raw();
                    fd.set_sregs(&sregs).map_err(kvm_failed("KVM_SET_SREGS"))?;
                    events.exception.injected = 1;
                    events.exception.pending = 0;
                }
            }
            fd.set_vcpu_events(&events)
                .map_err(kvm_failed("KVM_SET_VCPU_EVENTS"))?;
            debug!(
                error_code = error_code.bits(),
                cr2 = cr2.raw(),
                ?delivery,
                "#PF queued for the guest"
            );
            Ok(())
        }
        Action::InjectGeneralProtection => {
            let mut events = fd
                .get_vcpu_events()
                .map_err(kvm_failed("KVM_GET_VCPU_EVENTS"))?;
            events.exception.nr = GP_VECTOR;
            events.exception.has_error_code = 1;
            events.exception.error_code = 0;
            events.exception.injected = 1;
            events.exception.pending = 0;
            events.exception_has_payload = 0;
            events.flags &= !KVM_VCPUEVENT_VALID_PAYLOAD;
            fd.set_vcpu_events(&events)
                .map_err(kvm_failed("KVM_SET_VCPU_EVENTS"))?;
            debug!("#GP(0) queued for the guest");
            Ok(())
        }
        Action::EmulateMmio { .. } | Action::EmulateWrite { .. } => {
            Err(ApplyError::NeedsEmulation { action })
        }
    }
}

/// The EPT backend's memory-region port on KVM: `KVM_SET_USER_MEMORY_REGION`
/// and `KVM_GET_DIRTY_LOG` on a VM fd the VMM shares with it.
#[cfg(feature = "ept")]
#[derive(Debug)]
pub struct KvmMemory {
    vm: Arc<VmFd>,
}

#[cfg(feature = "ept")]
impl KvmMemory {
    /// The port over `vm`.
    pub fn new(vm: Arc<VmFd>) -> Self {
        KvmMemory { vm }
    }

    fn region(slot: &mmu_api::Memslot, size: u64) -> kvm_bindings::kvm_userspace_memory_region {
        use mmu_api::MemslotFlags;
        let mut flags = 0;
        if slot.flags.contains(MemslotFlags::LOG_DIRTY) {
            flags |= kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES;
        }
        if slot.flags.contains(MemslotFlags::READONLY) {
            flags |= kvm_bindings::KVM_MEM_READONLY;
        }
        kvm_bindings::kvm_userspace_memory_region {
            slot: slot.id.0,
            flags,
            guest_phys_addr: slot.guest_base.raw(),
            memory_size: size,
            userspace_addr: slot.backing.host_addr.0,
        }
    }
}

#[cfg(feature = "ept")]
impl mmu_backends::HypervisorMemory for KvmMemory {
    /// One `KVM_SET_USER_MEMORY_REGION` with the slot's number, base, size,
    /// host address and `KVM_MEM_LOG_DIRTY_PAGES` / `KVM_MEM_READONLY`.
    /// KVM itself treats a known slot number as a move or a flag change,
    /// starts a clean log when logging is turned on and drops it when it is
    /// turned off.
    ///
    /// # Safety
    ///
    /// As the trait's: the host range stays valid until the region is
    /// deleted.
    unsafe fn set_user_memory_region(&self, slot: &mmu_api::Memslot) -> io::Result<()> {
        let region = Self::region(slot, slot.size);
        trace!(
            slot = region.slot,
            base = region.guest_phys_addr,
            size = region.memory_size,
            flags = region.flags,
            "KVM_SET_USER_MEMORY_REGION"
        );
        // SAFETY: our caller guarantees that `userspace_addr` is valid for
        // reads and writes of `memory_size` bytes until the region is
        // deleted (this trait's contract), which is what KVM needs.
        unsafe { self.vm.set_user_memory_region(region) }.map_err(os_error)
    }

    /// The same ioctl with size zero.
    fn delete_user_memory_region(&self, slot: &mmu_api::Memslot) -> io::Result<()> {
        let region = Self::region(slot, 0);
        trace!(slot = region.slot, "KVM_SET_USER_MEMORY_REGION (delete)");
        // SAFETY: a region of size zero deletes the slot; KVM maps nothing
        // and keeps no pointer to the host range.
        unsafe { self.vm.set_user_memory_region(region) }.map_err(os_error)
    }

    /// `KVM_GET_DIRTY_LOG`, which returns and clears the slot's log.
    fn get_dirty_log(&self, slot: &mmu_api::Memslot) -> io::Result<Vec<u64>> {
        let size =
            usize::try_from(slot.size).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        self.vm.get_dirty_log(slot.id.0, size).map_err(os_error)
    }
}

/// Why an MMU backend could not be set up for a KVM VM.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KvmHostError {
    /// The registry could not build the backend.
    #[error("the MMU backend could not be created")]
    Create(#[from] mmu_backends::CreateError),
    /// The shadow backend's page pool could not be created.
    #[cfg(feature = "shadow")]
    #[error("the shadow page pool could not be created")]
    ShadowPool(#[source] mmu_backends::PoolError),
    /// A KVM ioctl failed.
    #[error("{what} failed")]
    Kvm {
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// Whether backend `kind` can be hosted on KVM by this build: a backend the
/// build was compiled without is refused as `mmu-backends` refuses it. Lets a
/// VMM fail before it creates anything.
pub fn check_hostable(kind: BackendKind) -> Result<(), KvmHostError> {
    if !kind.is_compiled_in() {
        return Err(KvmHostError::Create(
            mmu_backends::CreateError::NotCompiledIn {
                kind,
                compiled_in: mmu_backends::KindList(BackendKind::compiled_in()),
            },
        ));
    }
    Ok(())
}

/// True if this host's KVM shadows guest page tables itself instead of
/// walking them in hardware: PVM (`/sys/module/kvm_pvm`), or VMX/SVM with
/// EPT/NPT switched off. Then KVM does not see page-table writes the VMM
/// makes from the host, and a shadow backend hosted here needs
/// `Coherence::Replay`.
pub fn host_shadows_page_tables() -> bool {
    let param_off = |path: &str| {
        std::fs::read_to_string(path)
            .map(|v| matches!(v.trim(), "N" | "0"))
            .unwrap_or(false)
    };
    std::path::Path::new("/sys/module/kvm_pvm").exists()
        || param_off("/sys/module/kvm_intel/parameters/ept")
        || param_off("/sys/module/kvm_amd/parameters/npt")
}

/// How a shadow backend hosted on KVM makes its SPTE writes reach the
/// hardware.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum HostCoherence {
    /// Chosen from the host at VM creation ([`host_shadows_page_tables`]).
    #[default]
    Detect,
    /// Replay through the guest kit (needed where KVM shadows page tables).
    Replay,
    /// Nothing beyond a TLB flush (enough where the hardware walks the
    /// pool). On a host that shadows page tables this runs guests on stale
    /// entries: only a test that shows so should ask for it there.
    Direct,
}

/// The KVM memslot id of the shadow page pool (far above any slot a VMM
/// adds through the glue).
#[cfg(feature = "shadow")]
pub const SHADOW_POOL_SLOT: u32 = 0x7000;

/// Where the shadow backend's host window sits in every root under
/// `Coherence::Replay`: the first 512 GiB of the upper half.
#[cfg(feature = "shadow")]
pub const SHADOW_HOST_WINDOW: mmu_api::Gva = mmu_api::Gva(0xffff_8000_0000_0000);

/// Maps memslots for a shadow backend hosted on KVM: each slot's memory
/// becomes a KVM memory region at the slot's host-physical address, which
/// is what the shadow tables point at. The guest reaches only what the
/// shadow tables map.
#[cfg(feature = "shadow")]
#[derive(Debug)]
struct KvmMirror {
    vm: Arc<VmFd>,
}

#[cfg(feature = "shadow")]
impl KvmMirror {
    fn region(slot: &mmu_api::Memslot, size: u64) -> kvm_bindings::kvm_userspace_memory_region {
        // A read-only slot is read-only for KVM too: the shadow tables
        // already map it so, and a guest KVM runs without them (real mode)
        // then still cannot write it.
        let mut flags = 0;
        if slot.flags.contains(mmu_api::MemslotFlags::READONLY) {
            flags |= kvm_bindings::KVM_MEM_READONLY;
        }
        // KVM logs writes too: the backend's log misses what a guest
        // writes without its tables, and the glue merges both.
        if slot.flags.contains(mmu_api::MemslotFlags::LOG_DIRTY) {
            flags |= kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES;
        }
        kvm_bindings::kvm_userspace_memory_region {
            slot: slot.id.0,
            flags,
            guest_phys_addr: slot.backing.hpa.raw(),
            memory_size: size,
            userspace_addr: slot.backing.host_addr.0,
        }
    }
}

#[cfg(feature = "shadow")]
impl crate::HostMirror for KvmMirror {
    unsafe fn map(&self, slot: &mmu_api::Memslot) -> io::Result<()> {
        let region = Self::region(slot, slot.size);
        trace!(
            slot = region.slot,
            hpa = region.guest_phys_addr,
            size = region.memory_size,
            "KVM_SET_USER_MEMORY_REGION (shadow mirror)"
        );
        // SAFETY: our caller guarantees the host range stays valid until
        // `unmap` for the slot returns.
        unsafe { self.vm.set_user_memory_region(region) }.map_err(os_error)
    }

    fn dirty_log(&self, slot: &mmu_api::Memslot) -> io::Result<Option<Vec<u64>>> {
        if !slot.flags.contains(mmu_api::MemslotFlags::LOG_DIRTY) {
            return Ok(None);
        }
        let size =
            usize::try_from(slot.size).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        self.vm
            .get_dirty_log(slot.id.0, size)
            .map(Some)
            .map_err(os_error)
    }

    fn unmap(&self, slot: &mmu_api::Memslot) -> io::Result<()> {
        let region = Self::region(slot, 0);
        trace!(
            slot = region.slot,
            "KVM_SET_USER_MEMORY_REGION (shadow mirror delete)"
        );
        // SAFETY: a zero-sized region deletes the slot; no memory is named.
        unsafe { self.vm.set_user_memory_region(region) }.map_err(os_error)
    }
}

/// The shadow backend's hosting on KVM: the backend itself, and the pool
/// registered as a KVM memory region (removed when this is dropped, before
/// the pool's memory goes).
#[cfg(feature = "shadow")]
#[derive(Debug)]
pub struct ShadowHosting {
    backend: mmu_backends::shadow::ShadowBackend,
    vm: Arc<VmFd>,
    pool: kvm_bindings::kvm_userspace_memory_region,
}

#[cfg(feature = "shadow")]
impl ShadowHosting {
    fn new(
        mut config: mmu_backends::ShadowConfig,
        vm: Arc<VmFd>,
        coherence: HostCoherence,
    ) -> Result<Self, KvmHostError> {
        let replay = match coherence {
            HostCoherence::Detect => host_shadows_page_tables(),
            HostCoherence::Replay => true,
            HostCoherence::Direct => false,
        };
        config.coherence = if replay {
            mmu_backends::shadow::Coherence::Replay {
                window: SHADOW_HOST_WINDOW,
            }
        } else {
            mmu_backends::shadow::Coherence::Direct
        };
        let backend =
            mmu_backends::shadow::ShadowBackend::new(config).map_err(KvmHostError::ShadowPool)?;
        let (host, size, hpa) = backend.pool_region();
        let pool = kvm_bindings::kvm_userspace_memory_region {
            slot: SHADOW_POOL_SLOT,
            flags: 0,
            guest_phys_addr: hpa.raw(),
            memory_size: size,
            userspace_addr: host.0,
        };
        // SAFETY: the pool's mapping lives as long as `backend`, which this
        // struct holds; `Drop` deletes the region before the backend can go.
        unsafe { vm.set_user_memory_region(pool) }.map_err(|e| KvmHostError::Kvm {
            what: "registering the shadow page pool with KVM",
            source: os_error(e),
        })?;
        debug!(
            hpa = hpa.raw(),
            size, "shadow page pool registered with KVM"
        );
        Ok(ShadowHosting { backend, vm, pool })
    }

    /// The shadow backend, with its hosting calls
    /// ([`take_replay`](mmu_backends::shadow::ShadowBackend::take_replay) and
    /// friends).
    pub fn backend(&self) -> &mmu_backends::shadow::ShadowBackend {
        &self.backend
    }

    /// How this host sees the SPTEs the backend writes.
    pub fn coherence(&self) -> mmu_backends::shadow::Coherence {
        self.backend.config().coherence
    }
}

#[cfg(feature = "shadow")]
impl Drop for ShadowHosting {
    fn drop(&mut self) {
        let mut region = self.pool;
        region.memory_size = 0;
        // SAFETY: a zero-sized region deletes the slot; no memory is named.
        if let Err(e) = unsafe { self.vm.set_user_memory_region(region) } {
            // KVM still maps the pool: never unmap it.
            tracing::warn!(error = %e, "cannot remove the shadow page pool from KVM; leaking it");
            std::mem::forget(self.backend.clone());
        }
    }
}

/// A KVM VM's MMU: the backend, the memslot glue, and how faults are
/// delivered. Built once per VM, before its vCPUs run; the one place a
/// KVM-based VMM names the backend kind.
#[derive(Debug)]
pub struct KvmMmu {
    kind: BackendKind,
    // Field order is drop order: the glue deletes its slots while the
    // backend is still alive, and the shadow pool leaves KVM before the
    // backend (and its pool) can go.
    memslots: Memslots,
    #[cfg(feature = "shadow")]
    shadow: Option<ShadowHosting>,
    backend: Arc<dyn MmuBackend>,
    delivery: PageFaultDelivery,
}

impl KvmMmu {
    /// Builds the `kind` backend for the KVM VM `vm`, configured by
    /// `config`. Either way the backend owns the VM's memslots from then
    /// on: add guest memory with [`memslots`](Self::memslots), not with
    /// the VM fd.
    ///
    /// The EPT backend gets [`KvmMemory`] over `vm`. The shadow backend's
    /// page pool becomes a KVM memory region outside the guest's
    /// physical space, each memslot is also mapped by KVM at its
    /// host-physical address (the guest reaches only what the shadow
    /// tables map), and the coherence policy is chosen from the host
    /// ([`host_shadows_page_tables`]). Enables `KVM_CAP_EXCEPTION_PAYLOAD`
    /// where KVM has it.
    pub fn new(
        kind: BackendKind,
        config: &BackendConfig,
        vm: Arc<VmFd>,
    ) -> Result<KvmMmu, KvmHostError> {
        Self::with_coherence(kind, config, vm, HostCoherence::Detect)
    }

    /// As [`new`](Self::new), with the shadow backend's coherence policy
    /// chosen by the caller.
    pub fn with_coherence(
        kind: BackendKind,
        config: &BackendConfig,
        vm: Arc<VmFd>,
        coherence: HostCoherence,
    ) -> Result<KvmMmu, KvmHostError> {
        check_hostable(kind)?;
        let _ = coherence;
        #[cfg(feature = "shadow")]
        let mut shadow = None;
        let (backend, memslots): (Arc<dyn MmuBackend>, _) = match kind {
            #[cfg(feature = "shadow")]
            BackendKind::Shadow => {
                let hosting =
                    ShadowHosting::new(config.shadow.clone(), Arc::clone(&vm), coherence)?;
                let backend: Arc<dyn MmuBackend> = Arc::new(hosting.backend.clone());
                let mirror = Arc::new(KvmMirror {
                    vm: Arc::clone(&vm),
                });
                shadow = Some(hosting);
                let memslots = Memslots::with_mirror(Arc::clone(&backend), mirror);
                (backend, memslots)
            }
            _ => {
                let parts = BackendParts::new();
                #[cfg(feature = "ept")]
                let parts = parts.with_hypervisor_memory(Arc::new(KvmMemory::new(Arc::clone(&vm))));
                let backend = mmu_backends::create(kind, config, &parts)?;
                let memslots = Memslots::new(Arc::clone(&backend));
                (backend, memslots)
            }
        };
        let delivery = enable_exception_payload(&vm).map_err(|source| KvmHostError::Kvm {
            what: "enabling KVM_CAP_EXCEPTION_PAYLOAD",
            source,
        })?;
        debug!(
            backend = backend.name(),
            ?delivery,
            "MMU backend set up for a KVM VM"
        );
        Ok(KvmMmu {
            kind,
            memslots,
            #[cfg(feature = "shadow")]
            shadow,
            backend,
            delivery,
        })
    }

    /// Which backend.
    pub fn kind(&self) -> BackendKind {
        self.kind
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<dyn MmuBackend> {
        &self.backend
    }

    /// The shadow backend's hosting, when this VM runs it.
    #[cfg(feature = "shadow")]
    pub fn shadow(&self) -> Option<&ShadowHosting> {
        self.shadow.as_ref()
    }

    /// The memslot glue: where the VMM adds, moves and deletes guest
    /// memory.
    pub fn memslots(&self) -> &Memslots {
        &self.memslots
    }

    /// How #PFs are delivered (pass it to [`apply_action`]).
    pub fn page_fault_delivery(&self) -> PageFaultDelivery {
        self.delivery
    }

    /// Creates vCPU `id`'s MMU and its exit handler; `kick` makes that vCPU
    /// leave `KVM_RUN` (a signal plus `immediate_exit`).
    pub fn create_vcpu(
        &self,
        id: VcpuId,
        kick: Arc<dyn VcpuKick>,
    ) -> Result<VcpuExits, mmu_api::BackendError> {
        Ok(VcpuExits::new(self.backend.create_vcpu(id, kick)?))
    }
}

#[cfg(all(test, feature = "ept"))]
mod tests {
    use super::*;
    use crate::test_support::{Call, RecordingBus, ept, vcpu};

    #[test]
    fn mmio_exits_are_served_in_place() {
        let (_port, backend) = ept();
        let mut exits = vcpu(&*backend, 0);
        let mut bus = RecordingBus::default();
        // The data area of the exit, as it sits in the kvm_run page.
        let mut run_data = [0u8; 8];
        let exit = VcpuExit::MmioRead(0xfee0_0020, &mut run_data[..4]);
        let routed = exits.handle_kvm_exit(exit, &mut bus).unwrap();
        assert!(
            matches!(routed, Routed::Handled(Action::Resume)),
            "{routed:?}"
        );
        assert_eq!(run_data, [0xa0, 0xa1, 0xa2, 0xa3, 0, 0, 0, 0]);
        let exit = VcpuExit::MmioWrite(0xfee0_00b0, &[0, 0, 0, 0]);
        assert!(matches!(
            exits.handle_kvm_exit(exit, &mut bus).unwrap(),
            Routed::Handled(Action::Resume)
        ));
        assert_eq!(
            bus.calls,
            [
                Call::MmioRead(Gpa(0xfee0_0020), 4),
                Call::MmioWrite(Gpa(0xfee0_00b0), vec![0; 4])
            ]
        );
        assert_eq!(exits.stats().mmio_exits, 2);
    }

    #[test]
    fn other_exits_come_back_untouched() {
        let (_port, backend) = ept();
        let mut exits = vcpu(&*backend, 0);
        let mut bus = RecordingBus::default();
        let mut port_data = [0x55u8; 2];
        let exit = VcpuExit::IoIn(0x3f8, &mut port_data);
        match exits.handle_kvm_exit(exit, &mut bus).unwrap() {
            Routed::Unhandled(VcpuExit::IoIn(port, data)) => {
                assert_eq!(port, 0x3f8);
                data[0] = 0x42;
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(port_data, [0x42, 0x55]);
        match exits.handle_kvm_exit(VcpuExit::Hlt, &mut bus).unwrap() {
            Routed::Unhandled(VcpuExit::Hlt) => {}
            other => panic!("{other:?}"),
        }
        assert!(bus.calls.is_empty());
        assert_eq!(exits.stats().unhandled, 2);
        assert_eq!(exits.stats().mmio_exits, 0);
    }

    #[test]
    fn kvm_memory_regions_carry_the_flags() {
        use mmu_api::{HostBacking, HostVirtAddr, Hpa, Memslot, MemslotFlags, SlotId};
        let slot = Memslot::new(
            SlotId(7),
            Gpa(0x10_0000),
            0x20_0000,
            HostBacking {
                hpa: Hpa(0x10_0000),
                host_addr: HostVirtAddr(0x7f00_0000_0000),
            },
            MemslotFlags::LOG_DIRTY | MemslotFlags::READONLY,
        );
        let region = KvmMemory::region(&slot, slot.size);
        assert_eq!(region.slot, 7);
        assert_eq!(region.guest_phys_addr, 0x10_0000);
        assert_eq!(region.memory_size, 0x20_0000);
        assert_eq!(region.userspace_addr, 0x7f00_0000_0000);
        assert_eq!(
            region.flags,
            kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES | kvm_bindings::KVM_MEM_READONLY
        );
        let delete = KvmMemory::region(
            &{
                let mut m = slot;
                m.flags = MemslotFlags::empty();
                m
            },
            0,
        );
        assert_eq!((delete.memory_size, delete.flags), (0, 0));
    }

    #[test]
    fn compiled_in_backends_are_hostable() {
        assert!(check_hostable(BackendKind::Ept).is_ok());
        #[cfg(feature = "shadow")]
        assert!(check_hostable(BackendKind::Shadow).is_ok());
        #[cfg(not(feature = "shadow"))]
        assert!(matches!(
            check_hostable(BackendKind::Shadow),
            Err(KvmHostError::Create(
                mmu_backends::CreateError::NotCompiledIn { .. }
            ))
        ));
    }

    #[test]
    fn host_errors_say_what_is_missing() {
        let message = ApplyError::NeedsEmulation {
            action: Action::EmulateMmio { gpa: Gpa(0x1000) },
        }
        .to_string();
        assert!(message.contains("must be emulated by the VMM"), "{message}");
    }
}
