//! The region port over Cloud Hypervisor's `Vm` trait.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use mmu_integration::UserRegion;
use mmu_integration::ports::{DirtyLogMode, PortError, RegionPort};
use tracing::trace;

/// [`RegionPort`] over an `Arc<dyn hypervisor::Vm>`: regions through
/// `create_user_memory_region` / `remove_user_memory_region` (six
/// arguments each), dirty logs through `get_dirty_log`, and logging
/// switched VM-wide ([`DirtyLogMode::VmWide`]) with `start_dirty_log` /
/// `stop_dirty_log` over the regions created with `log_dirty`.
///
/// Cloud Hypervisor cannot change a region in place: a move or a
/// read-only change removes and re-creates it. A change of the logging
/// wish alone changes nothing in the VM (logging is VM-wide there).
pub struct ChRegions {
    vm: Arc<dyn hypervisor::Vm>,
    /// The regions created, as created.
    regions: Mutex<BTreeMap<u32, UserRegion>>,
}

impl fmt::Debug for ChRegions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChRegions")
            .field("regions", &*self.lock())
            .finish_non_exhaustive()
    }
}

impl ChRegions {
    /// The port over `vm`.
    pub fn new(vm: Arc<dyn hypervisor::Vm>) -> Self {
        ChRegions {
            vm,
            regions: Mutex::new(BTreeMap::new()),
        }
    }

    /// The wrapped VM.
    pub fn vm(&self) -> &Arc<dyn hypervisor::Vm> {
        &self.vm
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<u32, UserRegion>> {
        // Every critical section is a lookup plus one insert or remove.
        self.regions.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// # Safety
    ///
    /// As [`RegionPort::set_region`].
    unsafe fn create(&self, region: &UserRegion) -> Result<(), PortError> {
        let size = usize::try_from(region.memory_size)
            .map_err(|e| PortError::failed("create_user_memory_region", e))?;
        trace!(?region, "create_user_memory_region");
        // SAFETY: our caller guarantees the host range is valid for reads
        // and writes of `memory_size` bytes until the region is removed,
        // which is `create_user_memory_region`'s contract.
        unsafe {
            self.vm.create_user_memory_region(
                region.slot,
                region.guest_phys_addr,
                size,
                region.userspace_addr as *mut u8,
                region.readonly,
                region.log_dirty,
            )
        }
        .map_err(|e| PortError::failed("create_user_memory_region", e))
    }

    fn remove(&self, region: &UserRegion) -> Result<(), PortError> {
        let size = usize::try_from(region.memory_size)
            .map_err(|e| PortError::failed("remove_user_memory_region", e))?;
        trace!(?region, "remove_user_memory_region");
        // SAFETY: the region was created with exactly these arguments and
        // its host range is still valid (the glue removes a region before
        // it lets the memory go).
        unsafe {
            self.vm.remove_user_memory_region(
                region.slot,
                region.guest_phys_addr,
                size,
                region.userspace_addr as *mut u8,
                region.readonly,
                region.log_dirty,
            )
        }
        .map_err(|e| PortError::failed("remove_user_memory_region", e))
    }
}

impl RegionPort for ChRegions {
    unsafe fn set_region(&self, region: &UserRegion) -> Result<(), PortError> {
        let mut regions = self.lock();
        match regions.get(&region.slot).copied() {
            None => {
                // SAFETY: forwarded from our caller.
                unsafe { self.create(region) }?;
            }
            Some(old)
                if UserRegion {
                    log_dirty: region.log_dirty,
                    ..old
                } == *region =>
            {
                // Only the logging wish changed: logging is VM-wide here.
                trace!(
                    slot = region.slot,
                    "log_dirty change kept for the VM-wide switch"
                );
            }
            Some(old) => {
                self.remove(&old)?;
                // SAFETY: forwarded from our caller.
                if let Err(e) = unsafe { self.create(region) } {
                    // Put the old region back, so the VM is as it was.
                    // SAFETY: the old region's host range is the slot's,
                    // still valid (a live slot keeps its backing).
                    if unsafe { self.create(&old) }.is_err() {
                        regions.remove(&region.slot);
                    }
                    return Err(e);
                }
            }
        }
        regions.insert(region.slot, *region);
        Ok(())
    }

    fn remove_region(&self, region: &UserRegion) -> Result<(), PortError> {
        let mut regions = self.lock();
        let created = regions.get(&region.slot).copied().unwrap_or(*region);
        self.remove(&created)?;
        regions.remove(&region.slot);
        Ok(())
    }

    fn dirty_log(&self, region: &UserRegion) -> Result<Vec<u64>, PortError> {
        self.vm
            .get_dirty_log(region.slot, region.guest_phys_addr, region.memory_size)
            .map_err(|e| PortError::failed("get_dirty_log", e))
    }

    fn dirty_log_mode(&self) -> DirtyLogMode {
        DirtyLogMode::VmWide
    }

    fn start_dirty_log(&self) -> Result<(), PortError> {
        self.vm
            .start_dirty_log()
            .map_err(|e| PortError::failed("start_dirty_log", e))
    }

    fn stop_dirty_log(&self) -> Result<(), PortError> {
        self.vm
            .stop_dirty_log()
            .map_err(|e| PortError::failed("stop_dirty_log", e))
    }
}
