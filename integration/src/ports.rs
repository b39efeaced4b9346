//! The two small ports the MMU's hosting needs from a hypervisor, so a host
//! that keeps its VM and vCPU handles private (Cloud Hypervisor keeps
//! kvm-ioctls' `VmFd` and `VcpuFd` inside its `hypervisor` crate)
//! implements them over its own types:
//!
//! - [`RegionPort`], per VM: guest memory regions, their dirty logs, and
//!   how dirty logging is switched ([`DirtyLogMode`]).
//! - [`VcpuPort`], per vCPU: the registers and events the MMU's
//!   [`Action`](crate::Action)s touch (CR3 for a new root, CR2 and a
//!   queued exception for a fault given back to the guest).
//!
//! With feature `kvm`, kvm-ioctls' `VmFd` and `VcpuFd` implement them.
//! [`RegionMemory`] turns a region port into the EPT backend's
//! memory-region port; [`RegionMirror`] into the mirror a shadow backend's
//! memslots need.

use std::error::Error;
use std::fmt;
use std::sync::Arc;

use mmu_api::{Memslot, MemslotFlags};
use tracing::trace;

use crate::memslots::{HostMirror, UserRegion};

/// A port operation that failed. The hypervisor's own error is kept as
/// the source; [`raw_os_error`](Self::raw_os_error) finds the errno in it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PortError {
    /// The hypervisor refused or failed the operation.
    #[error("{op} failed")]
    Failed {
        /// What was being done (an ioctl name, or the host's call).
        op: &'static str,
        /// The hypervisor's error.
        #[source]
        source: Box<dyn Error + Send + Sync>,
    },
    /// The host has no way to do this (Cloud Hypervisor's `Vcpu` trait
    /// cannot queue an exception).
    #[error("the host cannot {op}")]
    Unsupported {
        /// What was asked.
        op: &'static str,
    },
}

impl PortError {
    /// A failed `op`, with the hypervisor's error as the source.
    pub fn failed(op: &'static str, source: impl Into<Box<dyn Error + Send + Sync>>) -> Self {
        PortError::Failed {
            op,
            source: source.into(),
        }
    }

    /// The operation that failed or is missing.
    pub fn op(&self) -> &'static str {
        match self {
            PortError::Failed { op, .. } | PortError::Unsupported { op } => op,
        }
    }

    /// The operating-system error number somewhere in the source chain
    /// (an `io::Error`, or vmm-sys-util's errno type that kvm-ioctls
    /// returns), if there is one.
    pub fn raw_os_error(&self) -> Option<i32> {
        let PortError::Failed { source, .. } = self else {
            return None;
        };
        errno_in(&**source)
    }

    /// The error as an `io::Error` for interfaces that take one: the errno
    /// if there is one, otherwise this error wrapped.
    pub fn into_io(self) -> std::io::Error {
        match self.raw_os_error() {
            Some(errno) => std::io::Error::from_raw_os_error(errno),
            None => std::io::Error::other(self),
        }
    }
}

/// The errno in `error` or its sources.
pub(crate) fn errno_in(error: &(dyn Error + 'static)) -> Option<i32> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(errno) = io.raw_os_error()
        {
            return Some(errno);
        }
        #[cfg(feature = "kvm")]
        if let Some(errno) = e.downcast_ref::<vmm_sys_util::errno::Error>() {
            return Some(errno.errno());
        }
        next = e.source();
    }
    None
}

/// How a hypervisor switches dirty logging.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DirtyLogMode {
    /// Per region, any time (KVM's `KVM_MEM_LOG_DIRTY_PAGES` flag): a
    /// region asked for with `log_dirty` logs from the start, and
    /// [`Memslots::set_dirty_logging`](crate::Memslots::set_dirty_logging)
    /// switches one slot.
    #[default]
    PerSlot,
    /// VM-wide (Cloud Hypervisor): `log_dirty` only records a region as
    /// one to log; logging runs for all recorded regions between
    /// [`RegionPort::start_dirty_log`] and [`RegionPort::stop_dirty_log`],
    /// and a region cannot be both read-only and logged.
    VmWide,
}

/// Guest memory regions of one VM, as the hypervisor sees them.
///
/// `UserRegion::guest_phys_addr` is where the hypervisor maps the memory
/// (for a shadow backend's mirror: the slot's host-physical address).
pub trait RegionPort: Send + Sync {
    /// Creates region `region.slot`, or changes its flags if the slot
    /// exists at the same place (KVM's semantics; a port over a host that
    /// cannot change a region in place removes and re-creates it).
    ///
    /// # Safety
    ///
    /// `region.userspace_addr` must be valid for reads and writes of
    /// `region.memory_size` bytes until [`remove_region`](Self::remove_region)
    /// for the slot has returned.
    unsafe fn set_region(&self, region: &UserRegion) -> Result<(), PortError>;

    /// Removes the region (its slot, base, size and host address as it was
    /// created).
    fn remove_region(&self, region: &UserRegion) -> Result<(), PortError>;

    /// The region's dirty pages since the last call (one bit per page),
    /// and a clean log from then on.
    fn dirty_log(&self, region: &UserRegion) -> Result<Vec<u64>, PortError>;

    /// How this hypervisor switches dirty logging.
    fn dirty_log_mode(&self) -> DirtyLogMode {
        DirtyLogMode::PerSlot
    }

    /// Turns dirty logging on for every region created with `log_dirty`
    /// ([`DirtyLogMode::VmWide`] hosts; a per-slot host needs nothing).
    fn start_dirty_log(&self) -> Result<(), PortError> {
        Ok(())
    }

    /// Turns it off again.
    fn stop_dirty_log(&self) -> Result<(), PortError> {
        Ok(())
    }

    /// Asks the hypervisor to deliver a queued #PF with CR2 as its payload
    /// (KVM's `KVM_CAP_EXCEPTION_PAYLOAD`), before any vCPU runs. Returns
    /// whether it will; `false` (the default) means CR2 is written first.
    fn enable_exception_payload(&self) -> Result<bool, PortError> {
        Ok(false)
    }
}

/// An exception queued for the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Exception {
    /// The vector.
    pub vector: u8,
    /// The error code, for the vectors that push one.
    pub error_code: Option<u32>,
    /// Delivered pending with this payload (CR2 for a #PF), which the
    /// hypervisor writes when it delivers the exception; `None` injects
    /// it as is.
    pub payload: Option<u64>,
}

/// The registers and events of one vCPU that the MMU's actions touch.
pub trait VcpuPort {
    /// Sets CR3 (the hypervisor resets its MMU context for the vCPU,
    /// dropping the old root's translations).
    fn set_cr3(&self, cr3: u64) -> Result<(), PortError>;
    /// Sets CR2.
    fn set_cr2(&self, cr2: u64) -> Result<(), PortError>;
    /// Queues `exception` for delivery on the next entry.
    fn queue_exception(&self, exception: &Exception) -> Result<(), PortError>;
}

impl<P: RegionPort + ?Sized> RegionPort for Arc<P> {
    unsafe fn set_region(&self, region: &UserRegion) -> Result<(), PortError> {
        // SAFETY: forwarded from our caller.
        unsafe { (**self).set_region(region) }
    }
    fn remove_region(&self, region: &UserRegion) -> Result<(), PortError> {
        (**self).remove_region(region)
    }
    fn dirty_log(&self, region: &UserRegion) -> Result<Vec<u64>, PortError> {
        (**self).dirty_log(region)
    }
    fn dirty_log_mode(&self) -> DirtyLogMode {
        (**self).dirty_log_mode()
    }
    fn start_dirty_log(&self) -> Result<(), PortError> {
        (**self).start_dirty_log()
    }
    fn stop_dirty_log(&self) -> Result<(), PortError> {
        (**self).stop_dirty_log()
    }
    fn enable_exception_payload(&self) -> Result<bool, PortError> {
        (**self).enable_exception_payload()
    }
}

/// The region a memslot is at its guest-physical base.
pub fn guest_region(slot: &Memslot, size: u64) -> UserRegion {
    UserRegion {
        slot: slot.id.0,
        guest_phys_addr: slot.guest_base.raw(),
        memory_size: size,
        userspace_addr: slot.backing.host_addr.0,
        readonly: slot.flags.contains(MemslotFlags::READONLY),
        log_dirty: slot.flags.contains(MemslotFlags::LOG_DIRTY),
    }
}

/// The EPT backend's memory-region port over any [`RegionPort`]: each
/// memslot is a region at its guest-physical base.
#[cfg(feature = "ept")]
pub struct RegionMemory<R: ?Sized> {
    port: Arc<R>,
}

#[cfg(feature = "ept")]
impl<R: ?Sized> fmt::Debug for RegionMemory<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegionMemory")
            .field("port", &std::any::type_name::<R>())
            .finish()
    }
}

#[cfg(feature = "ept")]
impl<R: RegionPort + ?Sized> RegionMemory<R> {
    /// The EPT backend's port over `port`.
    pub fn new(port: Arc<R>) -> Self {
        RegionMemory { port }
    }

    /// The region port.
    pub fn port(&self) -> &Arc<R> {
        &self.port
    }
}

#[cfg(feature = "ept")]
impl<R: RegionPort + ?Sized> mmu_backends::HypervisorMemory for RegionMemory<R> {
    /// One region with the slot's number, base, size, host address and
    /// flags. A known slot number is a move or a flag change; turning
    /// logging on starts a clean log (on a per-slot host).
    ///
    /// # Safety
    ///
    /// As the trait's: the host range stays valid until the region is
    /// deleted.
    unsafe fn set_user_memory_region(&self, slot: &Memslot) -> std::io::Result<()> {
        let region = guest_region(slot, slot.size);
        trace!(?region, "memory region set");
        // SAFETY: our caller guarantees that the host range is valid for
        // reads and writes until the region is deleted (this trait's
        // contract), which is the port's contract.
        unsafe { self.port.set_region(&region) }.map_err(PortError::into_io)
    }

    /// The region removed.
    fn delete_user_memory_region(&self, slot: &Memslot) -> std::io::Result<()> {
        let region = guest_region(slot, slot.size);
        trace!(slot = region.slot, "memory region removed");
        self.port.remove_region(&region).map_err(PortError::into_io)
    }

    /// The region's dirty log, which the read clears.
    fn get_dirty_log(&self, slot: &Memslot) -> std::io::Result<Vec<u64>> {
        self.port
            .dirty_log(&guest_region(slot, slot.size))
            .map_err(PortError::into_io)
    }
}

/// Maps a shadow backend's memslots for the hardware through a
/// [`RegionPort`]: each slot's memory becomes a region at the slot's
/// host-physical address, which is what the shadow tables point at.
pub struct RegionMirror<R: ?Sized> {
    port: Arc<R>,
}

impl<R: ?Sized> fmt::Debug for RegionMirror<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegionMirror")
            .field("port", &std::any::type_name::<R>())
            .finish()
    }
}

impl<R: RegionPort + ?Sized> RegionMirror<R> {
    /// The mirror over `port`.
    pub fn new(port: Arc<R>) -> Self {
        RegionMirror { port }
    }

    /// The region that mirrors `slot`. A read-only slot is read-only for
    /// the hypervisor too (the shadow tables already map it so, and a
    /// guest running without them, in real mode, then still cannot write
    /// it); a logged slot is logged by the hypervisor too (the backend's
    /// log misses what a guest writes without its tables, and the glue
    /// merges both).
    pub fn region(slot: &Memslot, size: u64) -> UserRegion {
        UserRegion {
            guest_phys_addr: slot.backing.hpa.raw(),
            ..guest_region(slot, size)
        }
    }
}

impl<R: RegionPort + ?Sized> HostMirror for RegionMirror<R> {
    unsafe fn map(&self, slot: &Memslot) -> std::io::Result<()> {
        let region = Self::region(slot, slot.size);
        trace!(?region, "memory region set (shadow mirror)");
        // SAFETY: our caller guarantees the host range stays valid until
        // `unmap` for the slot returns.
        unsafe { self.port.set_region(&region) }.map_err(PortError::into_io)
    }

    fn dirty_log(&self, slot: &Memslot) -> std::io::Result<Option<Vec<u64>>> {
        if !slot.flags.contains(MemslotFlags::LOG_DIRTY) {
            return Ok(None);
        }
        self.port
            .dirty_log(&Self::region(slot, slot.size))
            .map(Some)
            .map_err(PortError::into_io)
    }

    fn unmap(&self, slot: &Memslot) -> std::io::Result<()> {
        let region = Self::region(slot, slot.size);
        trace!(slot = region.slot, "memory region removed (shadow mirror)");
        self.port.remove_region(&region).map_err(PortError::into_io)
    }
}
