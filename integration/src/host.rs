//! VM-level setup over the ports: the backend, the memslot glue, the
//! shadow backend's hosting, and how faults are delivered ([`HostMmu`]).
//! [`kvm::KvmMmu`](crate::kvm::KvmMmu) is this over kvm-ioctls' `VmFd`;
//! a host that keeps its VM handle private implements
//! [`RegionPort`] over its own type and builds a [`HostMmu`] on it.

use std::fmt;
use std::sync::Arc;

use mmu_api::{MemslotError, MmuBackend, VcpuId, VcpuKick};
use mmu_backends::{BackendConfig, BackendKind, BackendParts};
use tracing::debug;

use crate::exits::VcpuExits;
#[cfg(feature = "shadow")]
use crate::memslots::UserRegion;
use crate::memslots::{Memslots, SlotError};
use crate::ports::{PortError, RegionPort};

/// How [`apply_action`](crate::apply_action) delivers a #PF, which depends
/// on whether the VM enabled exception payloads
/// ([`RegionPort::enable_exception_payload`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PageFaultDelivery {
    /// The exception is queued pending with CR2 as its payload; the
    /// hypervisor writes CR2 when it delivers it (what the architecture
    /// does, and what a nested hypervisor intercepting #PF needs).
    Payload,
    /// CR2 is written first, then the exception is injected (kernels
    /// without KVM's `KVM_CAP_EXCEPTION_PAYLOAD`).
    SetCr2,
}

/// Why an MMU backend could not be set up for a VM.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HostError {
    /// The registry could not build the backend.
    #[error("the MMU backend could not be created")]
    Create(#[from] mmu_backends::CreateError),
    /// The shadow backend's page pool could not be created.
    #[cfg(feature = "shadow")]
    #[error("the shadow page pool could not be created")]
    ShadowPool(#[source] mmu_backends::PoolError),
    /// The shadow backend's arena could not be set up.
    #[cfg(feature = "shadow")]
    #[error("the shadow backing arena could not be set up")]
    Arena(#[source] crate::arena::ArenaError),
    /// The hypervisor refused a setup step.
    #[error("{what} failed")]
    Port {
        /// What was being done.
        what: &'static str,
        /// The hypervisor's error.
        #[source]
        source: PortError,
    },
    /// Shadow paging was asked for on a host whose vCPU loop gives the MMU
    /// no way to see the guest's page faults and CR3 loads.
    #[error(
        "shadow paging needs the guest's page faults and CR3 loads, which this host does not pass \
         to the MMU: the guest must speak the paravirtual MMU ABI (and the host say so), or the VM \
         must use ept"
    )]
    NoGuestMmuPath,
}

/// Whether backend `kind` can be hosted by this build: a backend the build
/// was compiled without is refused as `mmu-backends` refuses it. Lets a VMM
/// fail before it creates anything.
pub fn check_hostable(kind: BackendKind) -> Result<(), HostError> {
    if !kind.is_compiled_in() {
        return Err(HostError::Create(
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

/// How a shadow backend makes its SPTE writes reach the hardware.
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

/// How the guest's own MMU events (#PF, CR3 loads, INVLPG) reach the
/// MMU. KVM never passes them to userspace, so shadow paging works only
/// where the guest reports them itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum GuestMmuPath {
    /// The guest speaks the paravirtual MMU ABI (its #PF vector is a stub
    /// that exits by port I/O; CR3 loads, INVLPG and TLB flushes are
    /// hypercalls), and the host's vCPU loop hands those exits to the MMU
    /// and can load a root into CR3. Shadow paging can run.
    #[default]
    Paravirtual,
    /// A stock guest: its page faults and CR3 writes never leave the
    /// hypervisor. Only ept can run; shadow is refused at VM creation
    /// ([`HostError::NoGuestMmuPath`]).
    None,
}

/// Where a shadow backend's memory (its page pool and the guest's
/// memslots) reaches the hypervisor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ShadowBacking {
    /// One fixed region, the [`Arena`](crate::arena::Arena), registered once
    /// at VM creation: the pool, then `room` bytes for the guest memslots'
    /// memory. A guest memslot change only maps or unmaps memory inside it
    /// and never reaches the hypervisor's memory map. Guest memory must be
    /// a shared mapping ([`shared_guest_memory`](crate::arena::shared_guest_memory));
    /// the guest runs only on the shadow tables (paging on).
    Arena {
        /// Bytes of room for the guest's memory, counted over the slots
        /// that exist at one time (a deleted slot's room is reused). The
        /// hypervisor keeps metadata for the whole region (KVM: 8 bytes per
        /// 4 KiB page with a shadow MMU), so size it to the VM.
        room: u64,
    },
    /// Each guest memslot is also a hypervisor region, at its
    /// guest-physical address ([`RegionMirror`](crate::ports::RegionMirror)),
    /// and the pool a region of its own: any guest memory will do, and a
    /// guest can run without paging, but every memslot change is also one
    /// of the hypervisor's (on KVM that zaps KVM's whole shadow).
    Mirror,
}

impl ShadowBacking {
    /// The arena's room when the host does not say: 16 GiB.
    pub const DEFAULT_ROOM: u64 = 16 << 30;
}

impl Default for ShadowBacking {
    fn default() -> Self {
        ShadowBacking::Arena {
            room: Self::DEFAULT_ROOM,
        }
    }
}

/// What a host says about itself when it sets the MMU up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct HostOptions {
    /// The shadow backend's coherence policy.
    pub coherence: HostCoherence,
    /// Whether the guest's MMU events reach the MMU.
    pub guest_mmu: GuestMmuPath,
    /// How the shadow backend's memory reaches the hypervisor.
    pub shadow_backing: ShadowBacking,
}

/// The memory-region slot of the shadow page pool (far above any slot a
/// VMM adds through the glue).
#[cfg(feature = "shadow")]
pub const SHADOW_POOL_SLOT: u32 = 0x7000;

/// Where the shadow backend's MMIO leaves point on KVM
/// (`ShadowConfig::mmio_window`): 32 TiB, above the arena, so a guest frame
/// below 32 TiB that no memslot backs is reached at `32 TiB + gpa`, where
/// KVM has no memory and exits with `KVM_EXIT_MMIO`.
#[cfg(feature = "shadow")]
pub const SHADOW_MMIO_WINDOW: mmu_api::Hpa = mmu_api::Hpa(1 << 45);

/// Where the shadow backend's host window sits in every root under
/// `Coherence::Replay`: the first 512 GiB of the upper half.
#[cfg(feature = "shadow")]
pub const SHADOW_HOST_WINDOW: mmu_api::Gva = mmu_api::Gva(0xffff_8000_0000_0000);

/// The shadow backend's hosting: the backend itself, and how its memory
/// reaches the hypervisor ([`ShadowBacking`]): the arena, or the pool as a
/// region of its own (removed when this is dropped, before the pool's
/// memory goes).
#[cfg(feature = "shadow")]
pub struct ShadowHosting<R: RegionPort + ?Sized = dyn RegionPort> {
    // Field order is drop order: the hypervisor lets go of the memory
    // before the backend (and its pool) can go.
    memory: HostedMemory,
    backend: mmu_backends::shadow::ShadowBackend,
    port: Arc<R>,
}

/// Where the shadow backend's memory is registered.
#[cfg(feature = "shadow")]
#[derive(Debug)]
enum HostedMemory {
    /// Pool and guest memory in one arena (which removes its region when
    /// the last reference, the glue's or ours, goes).
    Arena(Arc<crate::arena::Arena<dyn RegionPort>>),
    /// The pool's own region; guest slots are mirrored one by one.
    Pool(UserRegion),
}

#[cfg(feature = "shadow")]
impl<R: RegionPort + ?Sized> fmt::Debug for ShadowHosting<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShadowHosting")
            .field("backend", &self.backend)
            .field("memory", &self.memory)
            .finish_non_exhaustive()
    }
}

#[cfg(feature = "shadow")]
impl<R: RegionPort + ?Sized> ShadowHosting<R> {
    /// The backend and its memory registered through `port` (`dyn_port`
    /// is the same port, type-erased for the arena); returns the mirror
    /// the memslot glue maps guest memory with.
    fn new(
        mut config: mmu_backends::ShadowConfig,
        port: Arc<R>,
        dyn_port: Arc<dyn RegionPort>,
        options: &HostOptions,
    ) -> Result<(Self, Arc<dyn crate::memslots::HostMirror>), HostError> {
        let replay = match options.coherence {
            HostCoherence::Detect => host_shadows_page_tables(),
            HostCoherence::Replay => true,
            HostCoherence::Direct => false,
        };
        // MMIO leaves point into a window where KVM has no memory, above
        // the arena: the guest's access exits as KVM's own MMIO exit.
        config.mmio_window = Some(SHADOW_MMIO_WINDOW);
        config.coherence = if replay {
            mmu_backends::shadow::Coherence::Replay {
                window: SHADOW_HOST_WINDOW,
            }
        } else {
            mmu_backends::shadow::Coherence::Direct
        };
        let backend =
            mmu_backends::shadow::ShadowBackend::new(config).map_err(HostError::ShadowPool)?;
        let (host, size, hpa) = backend.pool_region();
        let (memory, mirror): (_, Arc<dyn crate::memslots::HostMirror>) = match options
            .shadow_backing
        {
            ShadowBacking::Arena { room } => {
                // SAFETY: the pool is a shared mapping of `size` bytes
                // that lives as long as `backend`, which outlives the
                // arena's use here (field order), and the arena's own
                // mapping of it keeps its pages alive beyond that.
                let arena = unsafe {
                    crate::arena::Arena::new(dyn_port, SHADOW_POOL_SLOT, hpa, host.0, size, room)
                }
                .map_err(HostError::Arena)?;
                let arena = Arc::new(arena);
                (HostedMemory::Arena(Arc::clone(&arena)), arena as _)
            }
            ShadowBacking::Mirror => {
                let pool = UserRegion {
                    slot: SHADOW_POOL_SLOT,
                    guest_phys_addr: hpa.raw(),
                    memory_size: size,
                    userspace_addr: host.0,
                    readonly: false,
                    log_dirty: false,
                };
                // SAFETY: the pool's mapping lives as long as `backend`,
                // which this struct holds; `Drop` removes the region
                // before the backend can go.
                unsafe { port.set_region(&pool) }.map_err(|source| HostError::Port {
                    what: "registering the shadow page pool",
                    source,
                })?;
                debug!(hpa = hpa.raw(), size, "shadow page pool registered");
                let mirror = Arc::new(crate::ports::RegionMirror::new(dyn_port));
                (HostedMemory::Pool(pool), mirror as _)
            }
        };
        Ok((
            ShadowHosting {
                memory,
                backend,
                port,
            },
            mirror,
        ))
    }

    /// The arena the backend's memory lives in, under
    /// [`ShadowBacking::Arena`].
    pub fn arena(&self) -> Option<&crate::arena::Arena<dyn RegionPort>> {
        match &self.memory {
            HostedMemory::Arena(arena) => Some(arena),
            HostedMemory::Pool(_) => None,
        }
    }
}

#[cfg(feature = "shadow")]
impl<R: RegionPort + ?Sized> ShadowHosting<R> {
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
impl<R: RegionPort + ?Sized> Drop for ShadowHosting<R> {
    fn drop(&mut self) {
        let HostedMemory::Pool(pool) = &self.memory else {
            return;
        };
        if let Err(e) = self.port.remove_region(pool) {
            // The hypervisor still maps the pool: never unmap it.
            tracing::warn!(error = %e, "cannot remove the shadow page pool from the hypervisor; leaking it");
            std::mem::forget(self.backend.clone());
        }
    }
}

/// A VM's MMU over a region port: the backend, the memslot glue, and how
/// faults are delivered. Built once per VM, before its vCPUs run; the one
/// place a VMM names the backend kind.
///
/// `E` is the error type of its [`Memslots`] (see there).
pub struct HostMmu<R: RegionPort + ?Sized + 'static, E = MemslotError> {
    kind: BackendKind,
    // Field order is drop order: the glue deletes its slots while the
    // backend is still alive, and the shadow pool leaves the hypervisor
    // before the backend (and its pool) can go.
    memslots: Memslots<E>,
    #[cfg(feature = "shadow")]
    shadow: Option<ShadowHosting<R>>,
    backend: Arc<dyn MmuBackend>,
    delivery: PageFaultDelivery,
    port: Arc<R>,
}

impl<R: RegionPort + ?Sized, E> fmt::Debug for HostMmu<R, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = f.debug_struct("HostMmu");
        s.field("kind", &self.kind)
            .field("memslots", &self.memslots)
            .field("delivery", &self.delivery);
        #[cfg(feature = "shadow")]
        s.field("shadow", &self.shadow);
        s.finish_non_exhaustive()
    }
}

impl<R: RegionPort + ?Sized + 'static> HostMmu<R, MemslotError> {
    /// Builds the `kind` backend for the VM behind `port`, configured by
    /// `config`. Either way the backend owns the VM's memslots from then
    /// on: add guest memory with [`memslots`](Self::memslots), not with
    /// the VM handle.
    ///
    /// The EPT backend gets [`RegionMemory`](crate::ports::RegionMemory)
    /// over `port`. The shadow backend's page pool and the guest's memory
    /// live in one memory region outside the guest's physical space,
    /// registered once ([`ShadowBacking::Arena`]; the guest reaches only
    /// what the shadow tables map), and the coherence policy is chosen
    /// from the host ([`host_shadows_page_tables`]). Enables exception
    /// payloads where the hypervisor has them.
    ///
    /// This is for a host whose vCPU loop serves the paravirtual MMU ABI
    /// (the reference VMM); [`with_options`](Self::with_options) says
    /// otherwise.
    pub fn new(kind: BackendKind, config: &BackendConfig, port: Arc<R>) -> Result<Self, HostError> {
        Self::with_options(kind, config, port, HostOptions::default())
    }

    /// As [`new`](Self::new), with the shadow backend's coherence policy
    /// chosen by the caller.
    pub fn with_coherence(
        kind: BackendKind,
        config: &BackendConfig,
        port: Arc<R>,
        coherence: HostCoherence,
    ) -> Result<Self, HostError> {
        let options = HostOptions {
            coherence,
            ..HostOptions::default()
        };
        Self::with_options(kind, config, port, options)
    }
}

impl<R: RegionPort + ?Sized + 'static, E: From<SlotError>> HostMmu<R, E> {
    /// As [`new`](HostMmu::new), with everything the host says about itself.
    /// Refuses shadow paging when the guest's MMU events cannot reach the
    /// MMU ([`HostError::NoGuestMmuPath`]).
    pub fn with_options(
        kind: BackendKind,
        config: &BackendConfig,
        port: Arc<R>,
        options: HostOptions,
    ) -> Result<Self, HostError> {
        check_hostable(kind)?;
        if kind == BackendKind::Shadow && options.guest_mmu == GuestMmuPath::None {
            return Err(HostError::NoGuestMmuPath);
        }
        let dyn_port: Arc<dyn RegionPort> = Arc::new(Arc::clone(&port));
        #[cfg(feature = "shadow")]
        let mut shadow = None;
        let (backend, memslots): (Arc<dyn MmuBackend>, _) = match kind {
            #[cfg(feature = "shadow")]
            BackendKind::Shadow => {
                let (hosting, mirror) = ShadowHosting::new(
                    config.shadow.clone(),
                    Arc::clone(&port),
                    Arc::clone(&dyn_port),
                    &options,
                )?;
                let backend: Arc<dyn MmuBackend> = Arc::new(hosting.backend.clone());
                shadow = Some(hosting);
                let memslots =
                    Memslots::for_host(Arc::clone(&backend), Some(mirror), Some(dyn_port));
                (backend, memslots)
            }
            _ => {
                let parts = BackendParts::new();
                #[cfg(feature = "ept")]
                let parts = parts.with_hypervisor_memory(Arc::new(
                    crate::ports::RegionMemory::new(Arc::clone(&dyn_port)),
                ));
                let backend = mmu_backends::create(kind, config, &parts)?;
                let memslots = Memslots::for_host(Arc::clone(&backend), None, Some(dyn_port));
                (backend, memslots)
            }
        };
        let delivery = match port.enable_exception_payload() {
            Ok(true) => PageFaultDelivery::Payload,
            Ok(false) => PageFaultDelivery::SetCr2,
            Err(source) => {
                return Err(HostError::Port {
                    what: "enabling exception payloads",
                    source,
                });
            }
        };
        debug!(
            backend = backend.name(),
            ?delivery,
            "MMU backend set up for a VM"
        );
        Ok(HostMmu {
            kind,
            memslots,
            #[cfg(feature = "shadow")]
            shadow,
            backend,
            delivery,
            port,
        })
    }
}

impl<R: RegionPort + ?Sized + 'static, E> HostMmu<R, E> {
    /// Which backend.
    pub fn kind(&self) -> BackendKind {
        self.kind
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<dyn MmuBackend> {
        &self.backend
    }

    /// The region port.
    pub fn port(&self) -> &Arc<R> {
        &self.port
    }

    /// The shadow backend's hosting, when this VM runs it.
    #[cfg(feature = "shadow")]
    pub fn shadow(&self) -> Option<&ShadowHosting<R>> {
        self.shadow.as_ref()
    }

    /// The memslot glue: where the VMM adds, moves and deletes guest
    /// memory.
    pub fn memslots(&self) -> &Memslots<E> {
        &self.memslots
    }

    /// How #PFs are delivered (pass it to [`apply_action`](crate::apply_action)).
    pub fn page_fault_delivery(&self) -> PageFaultDelivery {
        self.delivery
    }

    /// Creates vCPU `id`'s MMU and its exit handler; `kick` makes that vCPU
    /// leave the guest (on KVM: a signal plus `immediate_exit`).
    pub fn create_vcpu(
        &self,
        id: VcpuId,
        kick: Arc<dyn VcpuKick>,
    ) -> Result<VcpuExits, mmu_api::BackendError> {
        let mut exits = VcpuExits::new(self.backend.create_vcpu(id, kick)?);
        #[cfg(feature = "shadow")]
        if let Some(hosting) = &self.shadow {
            let config = hosting.backend.config();
            exits.set_mmio_window(config.mmio_window.filter(|_| config.mmio_caching));
        }
        Ok(exits)
    }
}

#[cfg(all(test, feature = "shadow"))]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// A region port that records what reached it.
    #[derive(Debug, Default)]
    struct Recording {
        calls: Mutex<Vec<u32>>,
    }

    impl RegionPort for Recording {
        unsafe fn set_region(&self, region: &UserRegion) -> Result<(), PortError> {
            self.calls.lock().unwrap().push(region.slot);
            Ok(())
        }
        fn remove_region(&self, region: &UserRegion) -> Result<(), PortError> {
            self.calls.lock().unwrap().push(region.slot);
            Ok(())
        }
        fn dirty_log(&self, _: &UserRegion) -> Result<Vec<u64>, PortError> {
            Err(PortError::Unsupported { op: "log" })
        }
    }

    #[test]
    fn shadow_is_refused_without_a_guest_mmu_path() {
        let port = Arc::new(Recording::default());
        let options = HostOptions {
            guest_mmu: GuestMmuPath::None,
            ..HostOptions::default()
        };
        let err = HostMmu::<Recording, SlotError>::with_options(
            BackendKind::Shadow,
            &BackendConfig::default(),
            Arc::clone(&port),
            options,
        )
        .unwrap_err();
        assert!(matches!(err, HostError::NoGuestMmuPath), "{err:?}");
        assert!(err.to_string().contains("paravirtual MMU ABI"), "{err}");
        // Refused before anything reached the hypervisor.
        assert!(port.calls.lock().unwrap().is_empty());

        // With the ABI declared, the pool is registered.
        let mut config = BackendConfig::default();
        config.shadow.pool_pages = 64;
        let mmu = HostMmu::<Recording, SlotError>::with_options(
            BackendKind::Shadow,
            &config,
            Arc::clone(&port),
            HostOptions {
                guest_mmu: GuestMmuPath::Paravirtual,
                ..options
            },
        )
        .unwrap();
        assert_eq!(*port.calls.lock().unwrap(), [SHADOW_POOL_SLOT]);
        drop(mmu);
        assert_eq!(
            *port.calls.lock().unwrap(),
            [SHADOW_POOL_SLOT, SHADOW_POOL_SLOT]
        );
    }

    #[cfg(feature = "ept")]
    #[test]
    fn ept_runs_without_a_guest_mmu_path() {
        let port = Arc::new(Recording::default());
        let options = HostOptions {
            guest_mmu: GuestMmuPath::None,
            ..HostOptions::default()
        };
        let mmu = HostMmu::<Recording>::with_options(
            BackendKind::Ept,
            &BackendConfig::default(),
            port,
            options,
        )
        .unwrap();
        assert_eq!(mmu.kind(), BackendKind::Ept);
        assert_eq!(mmu.page_fault_delivery(), PageFaultDelivery::SetCr2);
    }
}
