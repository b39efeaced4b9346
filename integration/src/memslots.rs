//! Memslot-change glue: the VMM's guest memory map, mirrored into the
//! backend.
//!
//! A host VMM calls [`Memslots`] wherever it changes what guest-physical
//! memory is (Cloud Hypervisor: `create_user_memory_region` /
//! `remove_user_memory_region`; crosvm: `add_memory_region` /
//! `remove_memory_region`; dirty logging switched on for migration). The
//! backend then owns the hypervisor's memslots (the EPT backend, through
//! its port) or builds its tables from them (the shadow backend).

use std::any::Any;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use mmu_api::{
    DirtyBitmap, Gpa, HostBacking, HostVirtAddr, Hpa, HypervisorError, Memslot, MemslotChange,
    MemslotError, MemslotFlags, MmuBackend, SlotId,
};
use tracing::{debug, warn};
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemoryRegion, GuestRegionMmap};

/// A guest memory region as hypervisors describe it (KVM's
/// `kvm_userspace_memory_region`, Cloud Hypervisor's `UserMemoryRegion`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UserRegion {
    /// The slot number.
    pub slot: u32,
    /// First guest-physical address.
    pub guest_phys_addr: u64,
    /// Size in bytes.
    pub memory_size: u64,
    /// Where the memory is mapped in the VMM.
    pub userspace_addr: u64,
    /// Guest writes exit as MMIO writes (`KVM_MEM_READONLY`).
    pub readonly: bool,
    /// Log guest writes (`KVM_MEM_LOG_DIRTY_PAGES`).
    pub log_dirty: bool,
}

impl UserRegion {
    /// The memslot for this region.
    ///
    /// Its hardware address is `guest_phys_addr`: on a hypervisor the
    /// memory is seen by the guest's hardware at its guest-physical address
    /// in the hypervisor's memslot, which is what a backend that builds
    /// tables for that hardware must point them to. The EPT backend does
    /// not use it. A later move keeps it (a backing never changes).
    pub fn memslot(&self) -> Memslot {
        let mut flags = MemslotFlags::empty();
        flags.set(MemslotFlags::READONLY, self.readonly);
        flags.set(MemslotFlags::LOG_DIRTY, self.log_dirty);
        Memslot::new(
            SlotId(self.slot),
            Gpa(self.guest_phys_addr),
            self.memory_size,
            HostBacking {
                hpa: Hpa(self.guest_phys_addr),
                host_addr: HostVirtAddr(self.userspace_addr),
            },
            flags,
        )
    }
}

/// Keeps a region's host mapping alive while the backend may use it.
type KeepAlive = Arc<dyn Any + Send + Sync>;

/// The memslots a VMM registered through this glue, and the host mappings
/// behind them.
///
/// Memory added from vm-memory regions ([`add_region`](Self::add_region),
/// [`add_memory`](Self::add_memory)) is kept mapped until its slot is
/// deleted, so those calls are safe. Dropping the glue deletes every slot
/// it added (the backend then no longer reaches the memory), then lets the
/// mappings go.
pub struct Memslots {
    backend: Arc<dyn MmuBackend>,
    /// Where the slots are also mapped for the hardware, if anywhere.
    mirror: Option<Arc<dyn HostMirror>>,
    /// Slots added through this glue; `Some` for the ones whose mapping we
    /// keep alive.
    added: Mutex<BTreeMap<SlotId, Option<KeepAlive>>>,
}

impl fmt::Debug for Memslots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Memslots")
            .field("backend", &self.backend.name())
            .field("slots", &self.lock().keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Where a backend's memory must also be mapped for the hardware to reach
/// it: a shadow backend's SPTEs point at each slot's host-physical address
/// ([`mmu_api::HostBacking::hpa`]), so on a hypervisor those addresses
/// must be mapped by the hypervisor itself (on KVM: a memory region at
/// that address, outside the MMU's control, which decides what the guest
/// reaches).
pub trait HostMirror: Send + Sync + fmt::Debug {
    /// Maps `slot`'s host memory at its host-physical address.
    ///
    /// # Safety
    ///
    /// As [`MmuBackend::set_memslot`]: the host range must stay valid until
    /// [`unmap`](Self::unmap) for the slot has returned.
    unsafe fn map(&self, slot: &Memslot) -> std::io::Result<()>;

    /// Removes the mapping [`map`](Self::map) made.
    fn unmap(&self, slot: &Memslot) -> std::io::Result<()>;

    /// Pages of a dirty-logging `slot` the hypervisor saw written since
    /// the last call (one bit per page), for writes that reached memory
    /// without the backend's tables (a guest running without paging).
    /// `None` if the mirror does not log.
    fn dirty_log(&self, slot: &Memslot) -> std::io::Result<Option<Vec<u64>>> {
        let _ = slot;
        Ok(None)
    }
}

impl Memslots {
    /// Glue for `backend`, with no slots yet.
    pub fn new(backend: Arc<dyn MmuBackend>) -> Self {
        Memslots {
            backend,
            mirror: None,
            added: Mutex::new(BTreeMap::new()),
        }
    }

    /// Glue for `backend` whose slots `mirror` also maps at their
    /// host-physical addresses (a shadow backend hosted on a hypervisor).
    pub fn with_mirror(backend: Arc<dyn MmuBackend>, mirror: Arc<dyn HostMirror>) -> Self {
        Memslots {
            backend,
            mirror: Some(mirror),
            added: Mutex::new(BTreeMap::new()),
        }
    }

    /// The backend the slots go to.
    pub fn backend(&self) -> &Arc<dyn MmuBackend> {
        &self.backend
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<SlotId, Option<KeepAlive>>> {
        // Every critical section is a single insert or remove.
        self.added.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a vm-memory region as slot `id` at its own guest address, and
    /// keeps its mapping alive until the slot is deleted.
    pub fn add_region<B>(
        &self,
        id: SlotId,
        region: &GuestRegionMmap<B>,
        flags: MemslotFlags,
    ) -> Result<MemslotChange, MemslotError>
    where
        B: Bitmap + Send + Sync + 'static,
    {
        let mapping = region.get_mmap();
        let user = UserRegion {
            slot: id.0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: mapping.as_ptr() as u64,
            readonly: flags.contains(MemslotFlags::READONLY),
            log_dirty: flags.contains(MemslotFlags::LOG_DIRTY),
        };
        let keep: KeepAlive = mapping;
        // SAFETY: the host range is `mapping`'s whole mmap'd range, readable
        // and writable (vm-memory maps guest memory PROT_READ | PROT_WRITE).
        // We store `keep`, a clone of the Arc that owns the mapping, in
        // `added` below; it is dropped only after `delete_memslot` for this
        // slot has returned (in `delete` and `Drop`), or never.
        unsafe { self.set(user.memslot(), Some(keep)) }
    }

    /// Adds every region of `memory` as one slot each, with ids from
    /// `first_id` up, at their own guest addresses. Returns the ids.
    pub fn add_memory<B>(
        &self,
        memory: &vm_memory::GuestRegionCollection<GuestRegionMmap<B>>,
        first_id: u32,
        flags: MemslotFlags,
    ) -> Result<Vec<SlotId>, MemslotError>
    where
        B: Bitmap + Send + Sync + 'static,
    {
        use vm_memory::GuestMemoryBackend;
        let mut ids = Vec::new();
        for (i, region) in memory.iter().enumerate() {
            let id = SlotId(first_id + i as u32);
            self.add_region(id, region, flags)?;
            ids.push(id);
        }
        Ok(ids)
    }

    /// Adds (or moves, or changes the flags of) a slot whose host memory
    /// the caller manages, as Cloud Hypervisor's
    /// `create_user_memory_region` does.
    ///
    /// # Safety
    ///
    /// `region.userspace_addr` must be valid for reads and writes of
    /// `region.memory_size` bytes until [`delete`](Self::delete) for the
    /// slot has returned, or until this glue is dropped.
    pub unsafe fn add_user_region(
        &self,
        region: &UserRegion,
    ) -> Result<MemslotChange, MemslotError> {
        // SAFETY: forwarded from our caller.
        unsafe { self.set(region.memslot(), None) }
    }

    /// # Safety
    ///
    /// As [`MmuBackend::set_memslot`], until the slot is deleted through
    /// this glue or the glue is dropped; `keep` (if any) keeps the memory
    /// mapped that long.
    unsafe fn set(
        &self,
        slot: Memslot,
        keep: Option<KeepAlive>,
    ) -> Result<MemslotChange, MemslotError> {
        let mut added = self.lock();
        let new = !added.contains_key(&slot.id);
        // The hardware must reach the memory before any SPTE can map it.
        if new && let Some(mirror) = &self.mirror {
            // SAFETY: forwarded from our caller; the mirror is removed in
            // `delete` before the slot's memory is released.
            unsafe { mirror.map(&slot) }
                .map_err(|e| MemslotError::Hypervisor(HypervisorError::new(e)))?;
        }
        // SAFETY: forwarded from our caller.
        let change = match unsafe { self.backend.set_memslot(slot) } {
            Ok(change) => change,
            Err(e) => {
                if new && let Some(mirror) = &self.mirror {
                    let _ = mirror.unmap(&slot);
                }
                return Err(e);
            }
        };
        debug!(
            backend = self.backend.name(),
            slot = slot.id.0,
            base = slot.guest_base.raw(),
            size = slot.size,
            flags = slot.flags.bits(),
            ?change,
            "memslot set"
        );
        match added.get_mut(&slot.id) {
            // A move or flag change keeps the backing, hence the mapping.
            Some(_) => {}
            None => {
                added.insert(slot.id, keep);
            }
        }
        Ok(change)
    }

    /// Moves slot `id` to `guest_base` (same size and memory).
    pub fn move_slot(&self, id: SlotId, guest_base: Gpa) -> Result<MemslotChange, MemslotError> {
        let mut slot = self.slot(id)?;
        slot.guest_base = guest_base;
        // SAFETY: `slot` was added through this glue (`self.slot` checks),
        // so its host range is valid until it is deleted through the glue;
        // a move keeps the host range (the table refuses a new backing).
        unsafe { self.set(slot, None) }
    }

    /// Turns dirty logging of slot `id` on or off (a migration starting or
    /// ending). Turning it on starts a clean log.
    pub fn set_dirty_logging(&self, id: SlotId, on: bool) -> Result<MemslotChange, MemslotError> {
        let mut slot = self.slot(id)?;
        slot.flags.set(MemslotFlags::LOG_DIRTY, on);
        // SAFETY: as in `move_slot`: a slot of this glue, same host range.
        unsafe { self.set(slot, None) }
    }

    /// The backend's slot `id`, if it was added through this glue.
    fn slot(&self, id: SlotId) -> Result<Memslot, MemslotError> {
        if !self.lock().contains_key(&id) {
            return Err(MemslotError::UnknownSlot(id));
        }
        self.backend
            .memslots()
            .into_iter()
            .find(|s| s.id == id)
            .ok_or(MemslotError::UnknownSlot(id))
    }

    /// Deletes slot `id`; once the backend has let go of it, its mapping
    /// (if the glue kept it) is released.
    pub fn delete(&self, id: SlotId) -> Result<Memslot, MemslotError> {
        let mut added = self.lock();
        if !added.contains_key(&id) {
            return Err(MemslotError::UnknownSlot(id));
        }
        let old = self.backend.delete_memslot(id)?;
        // The backend dropped every SPTE mapping it: now the hardware
        // mapping can go.
        if let Some(mirror) = &self.mirror {
            mirror
                .unmap(&old)
                .map_err(|e| MemslotError::Hypervisor(HypervisorError::new(e)))?;
        }
        debug!(
            backend = self.backend.name(),
            slot = id.0,
            "memslot deleted"
        );
        added.remove(&id);
        Ok(old)
    }

    /// The pages of slot `id` written since the last call (guest writes and
    /// the VMM's own noted writes).
    pub fn dirty_log(&self, id: SlotId) -> Result<DirtyBitmap, MemslotError> {
        let mut log = self.backend.get_dirty_log(id)?;
        if let Some(mirror) = &self.mirror {
            let slot = self.slot(id)?;
            let words = mirror
                .dirty_log(&slot)
                .map_err(|e| MemslotError::Hypervisor(HypervisorError::new(e)))?;
            if let Some(words) = words {
                log.merge(&DirtyBitmap::from_words(slot.pages(), words));
            }
        }
        Ok(log)
    }

    /// The ids of the slots added through this glue, ascending.
    pub fn ids(&self) -> Vec<SlotId> {
        self.lock().keys().copied().collect()
    }
}

impl Drop for Memslots {
    fn drop(&mut self) {
        let added = std::mem::take(&mut *self.lock());
        for (id, keep) in added {
            let unmapped = match self.backend.delete_memslot(id) {
                Ok(old) => match &self.mirror {
                    Some(mirror) => mirror.unmap(&old).map_err(|e| e.to_string()),
                    None => Ok(()),
                },
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = unmapped {
                warn!(backend = self.backend.name(), slot = id.0, error = %e, "cannot delete a memslot; its memory stays mapped");
                // The backend or the hardware may still reach the memory:
                // never unmap it.
                std::mem::forget(keep);
            }
        }
    }
}

#[cfg(all(test, feature = "ept"))]
mod tests {
    use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

    use super::*;
    use crate::test_support::ept;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x10_0000),
            (GuestAddress(0x100_0000), 0x2_0000),
        ])
        .unwrap()
    }

    #[test]
    fn user_regions_become_memslots() {
        let region = UserRegion {
            slot: 3,
            guest_phys_addr: 0x20_0000,
            memory_size: 0x1000,
            userspace_addr: 0x7f12_3456_7000,
            readonly: true,
            log_dirty: false,
        };
        let slot = region.memslot();
        assert_eq!(slot.id, SlotId(3));
        assert_eq!(slot.guest_base, Gpa(0x20_0000));
        assert_eq!(slot.backing.hpa, Hpa(0x20_0000));
        assert_eq!(slot.backing.host_addr, HostVirtAddr(0x7f12_3456_7000));
        assert_eq!(slot.flags, MemslotFlags::READONLY);
        let logging = UserRegion {
            readonly: false,
            log_dirty: true,
            ..region
        };
        assert_eq!(logging.memslot().flags, MemslotFlags::LOG_DIRTY);
    }

    #[test]
    fn vm_memory_regions_are_added_moved_and_deleted() {
        let (port, backend) = ept();
        let mem = memory();
        let glue = Memslots::new(Arc::clone(&backend));
        let ids = glue.add_memory(&mem, 10, MemslotFlags::empty()).unwrap();
        assert_eq!(ids, [SlotId(10), SlotId(11)]);
        assert_eq!(glue.ids(), ids);
        let regions = port.regions();
        assert_eq!(regions.len(), 2);
        let host = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
        assert_eq!(regions[0].backing.host_addr, HostVirtAddr(host));
        assert_eq!(regions[1].guest_base, Gpa(0x100_0000));

        // Dirty logging on, a write through the hypervisor, harvest.
        glue.set_dirty_logging(SlotId(11), true).unwrap();
        port.guest_write(Gpa(0x100_1000), 8);
        let log = glue.dirty_log(SlotId(11)).unwrap();
        assert_eq!(log.iter_dirty().collect::<Vec<_>>(), [1]);
        glue.set_dirty_logging(SlotId(11), false).unwrap();
        assert_eq!(
            glue.dirty_log(SlotId(11)).unwrap_err(),
            MemslotError::NotLogging(SlotId(11))
        );

        let change = glue.move_slot(SlotId(11), Gpa(0x200_0000)).unwrap();
        assert!(matches!(change, MemslotChange::Moved { .. }), "{change:?}");
        assert_eq!(port.regions()[1].guest_base, Gpa(0x200_0000));
        // Moving onto the other slot is refused and changes nothing.
        assert!(matches!(
            glue.move_slot(SlotId(11), Gpa(0x8_0000)),
            Err(MemslotError::Overlap { .. })
        ));

        let old = glue.delete(SlotId(10)).unwrap();
        assert_eq!(old.guest_base, Gpa(0));
        assert_eq!(glue.ids(), [SlotId(11)]);
        assert_eq!(
            glue.delete(SlotId(10)).unwrap_err(),
            MemslotError::UnknownSlot(SlotId(10))
        );
        assert_eq!(
            glue.move_slot(SlotId(99), Gpa(0)).unwrap_err(),
            MemslotError::UnknownSlot(SlotId(99))
        );

        // Dropping the glue deletes what is left.
        drop(glue);
        assert!(port.regions().is_empty());
        assert!(backend.memslots().is_empty());
    }

    #[test]
    fn mappings_outlive_the_callers_memory_object() {
        let (port, backend) = ept();
        let glue = Memslots::new(Arc::clone(&backend));
        {
            let mem = memory();
            glue.add_memory(&mem, 0, MemslotFlags::empty()).unwrap();
        }
        // The caller's GuestMemoryMmap is gone; the glue keeps the
        // mappings, so the backend can still write through them.
        let mut vcpu = crate::test_support::vcpu(&*backend, 0);
        vcpu.write_guest(Gpa(0x100_0008), &[1, 2, 3, 4]).unwrap();
        assert_eq!(port.regions().len(), 2);
    }

    #[test]
    fn refused_slots_are_not_recorded() {
        let (port, backend) = ept();
        let glue = Memslots::new(backend);
        let mem = memory();
        port.refuse_next(libc::ENOMEM);
        let err = glue.add_memory(&mem, 0, MemslotFlags::empty()).unwrap_err();
        assert!(matches!(err, MemslotError::Hypervisor(_)), "{err:?}");
        assert!(glue.ids().is_empty());
        assert!(port.regions().is_empty());
    }
}
