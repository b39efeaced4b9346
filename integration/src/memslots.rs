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
use std::marker::PhantomData;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use mmu_api::{
    DirtyBitmap, Gpa, HostBacking, HostVirtAddr, Hpa, HypervisorError, Memslot, MemslotChange,
    MemslotError, MemslotFlags, MmuBackend, SlotId,
};
use tracing::{debug, warn};
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemoryRegion, GuestRegionMmap};

use crate::ports::{DirtyLogMode, PortError, RegionPort};

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

/// Why the glue could not change a memslot or read its log, with the
/// hypervisor's own error kept as the source.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SlotError {
    /// The backend refused (or its own hypervisor port failed: the port's
    /// error is the source of [`MemslotError::Hypervisor`]).
    #[error(transparent)]
    Backend(#[from] MemslotError),
    /// The hypervisor refused what the glue asked of it directly (the
    /// mirror of a shadow backend's slot, a VM-wide dirty-log switch).
    #[error("the hypervisor could not {what} {slot}")]
    Hypervisor {
        /// What was being done.
        what: &'static str,
        /// The slot (the lowest recorded one for a VM-wide switch).
        slot: SlotId,
        /// The hypervisor's error.
        #[source]
        source: PortError,
    },
    /// The host switches dirty logging for the whole VM
    /// ([`DirtyLogMode::VmWide`]): a slot is logged if it was added so,
    /// and logging runs between [`Memslots::start_dirty_log`] and
    /// [`Memslots::stop_dirty_log`].
    #[error("{0} cannot switch dirty logging alone: this host switches it for the whole VM")]
    VmWideLogging(SlotId),
    /// The host cannot log a read-only region.
    #[error("{0} is read-only and dirty-logged, which this host refuses")]
    ReadOnlyLogged(SlotId),
}

impl SlotError {
    /// The operating-system error number behind a hypervisor failure.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            SlotError::Hypervisor { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

impl From<SlotError> for MemslotError {
    /// The error for callers of `Memslots<MemslotError>`: a hypervisor
    /// failure is kept whole as the source of
    /// [`MemslotError::Hypervisor`] (errno included).
    fn from(error: SlotError) -> MemslotError {
        match error {
            SlotError::Backend(e) => e,
            SlotError::Hypervisor { .. } => MemslotError::Hypervisor(HypervisorError::new(error)),
            SlotError::VmWideLogging(slot) | SlotError::ReadOnlyLogged(slot) => {
                MemslotError::IllegalChange(slot)
            }
        }
    }
}

/// Keeps a region's host mapping alive while the backend may use it.
type KeepAlive = Arc<dyn Any + Send + Sync>;

/// What the glue keeps for one slot.
struct Entry {
    /// The region's host mapping, when the glue keeps it alive.
    keep: Option<KeepAlive>,
    /// The VMM asked for its writes to be logged.
    logged: bool,
}

/// The slots and the VM-wide dirty-log state, under one lock.
#[derive(Default)]
struct Table {
    slots: BTreeMap<SlotId, Entry>,
    /// Logging runs (between `start_dirty_log` and `stop_dirty_log`).
    logging: bool,
}

impl Table {
    /// The slots the VMM asked to have logged.
    fn logged(&self) -> Vec<SlotId> {
        self.slots
            .iter()
            .filter(|(_, e)| e.logged)
            .map(|(id, _)| *id)
            .collect()
    }
}

/// The memslots a VMM registered through this glue, and the host mappings
/// behind them.
///
/// Memory added from vm-memory regions ([`add_region`](Self::add_region),
/// [`add_memory`](Self::add_memory)) is kept mapped until its slot is
/// deleted, so those calls are safe. Dropping the glue deletes every slot
/// it added (the backend then no longer reaches the memory), then lets the
/// mappings go.
///
/// `E` is the error its methods return: [`MemslotError`] (the default; a
/// hypervisor's error is flattened into its message) or [`SlotError`],
/// which keeps the hypervisor's error, errno included, as its source.
///
/// Dirty logging follows the host's [`DirtyLogMode`]: per slot (KVM: a
/// slot logs from when it is added or switched on with
/// [`set_dirty_logging`](Self::set_dirty_logging)), or VM-wide (Cloud
/// Hypervisor: slots added with logging are recorded, and
/// [`start_dirty_log`](Self::start_dirty_log) /
/// [`stop_dirty_log`](Self::stop_dirty_log) switch all of them).
pub struct Memslots<E = MemslotError> {
    backend: Arc<dyn MmuBackend>,
    /// Where the slots are also mapped for the hardware, if anywhere.
    mirror: Option<Arc<dyn HostMirror>>,
    /// The hypervisor's VM-wide dirty-log switch, if it has one.
    switch: Option<Arc<dyn RegionPort>>,
    mode: DirtyLogMode,
    table: Mutex<Table>,
    error: PhantomData<fn() -> E>,
}

impl<E> Memslots<E> {
    fn lock(&self) -> MutexGuard<'_, Table> {
        // Every critical section leaves the table consistent before it
        // can fail.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<E> fmt::Debug for Memslots<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let table = self.lock();
        f.debug_struct("Memslots")
            .field("backend", &self.backend.name())
            .field("slots", &table.slots.keys().collect::<Vec<_>>())
            .field("mode", &self.mode)
            .field("logging", &table.logging)
            .finish()
    }
}

/// Where a backend's memory must also be mapped for the hardware to reach
/// it: a shadow backend's SPTEs point at each slot's host-physical address
/// ([`mmu_api::HostBacking::hpa`]), so on a hypervisor those addresses
/// must be mapped by the hypervisor itself (on KVM: a memory region at
/// that address, outside the MMU's control, which decides what the guest
/// reaches). [`RegionMirror`](crate::ports::RegionMirror) implements it
/// over any region port.
pub trait HostMirror: Send + Sync + fmt::Debug {
    /// The host-physical address a new `slot` is to have: where this
    /// mirror will map its memory. By default the slot's own.
    fn place(&self, slot: &Memslot) -> std::io::Result<Hpa> {
        Ok(slot.backing.hpa)
    }

    /// Maps `slot`'s host memory at its host-physical address, or, for a
    /// slot already mapped, changes its flags (dirty logging).
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

fn mirror_error(what: &'static str, slot: SlotId) -> impl FnOnce(std::io::Error) -> SlotError {
    move |e| SlotError::Hypervisor {
        what,
        slot,
        source: PortError::failed("the shadow mirror's memory region", e),
    }
}

impl Memslots<MemslotError> {
    /// Glue for `backend`, with no slots yet.
    pub fn new(backend: Arc<dyn MmuBackend>) -> Self {
        Self::for_host(backend, None, None)
    }

    /// Glue for `backend` whose slots `mirror` also maps at their
    /// host-physical addresses (a shadow backend hosted on a hypervisor).
    pub fn with_mirror(backend: Arc<dyn MmuBackend>, mirror: Arc<dyn HostMirror>) -> Self {
        Self::for_host(backend, Some(mirror), None)
    }
}

impl<E: From<SlotError>> Memslots<E> {
    /// Glue for `backend` on a host: `mirror` maps the slots for the
    /// hardware (a shadow backend), `port` is the hypervisor's region port,
    /// whose [`DirtyLogMode`] the glue follows and whose VM-wide switch it
    /// calls.
    pub fn for_host(
        backend: Arc<dyn MmuBackend>,
        mirror: Option<Arc<dyn HostMirror>>,
        port: Option<Arc<dyn RegionPort>>,
    ) -> Self {
        let mode = port
            .as_ref()
            .map_or(DirtyLogMode::PerSlot, |p| p.dirty_log_mode());
        Memslots {
            backend,
            mirror,
            switch: port,
            mode,
            table: Mutex::new(Table::default()),
            error: PhantomData,
        }
    }

    /// The backend the slots go to.
    pub fn backend(&self) -> &Arc<dyn MmuBackend> {
        &self.backend
    }

    /// How this glue switches dirty logging.
    pub fn dirty_log_mode(&self) -> DirtyLogMode {
        self.mode
    }

    /// Adds a vm-memory region as slot `id` at its own guest address, and
    /// keeps its mapping alive until the slot is deleted.
    pub fn add_region<B>(
        &self,
        id: SlotId,
        region: &GuestRegionMmap<B>,
        flags: MemslotFlags,
    ) -> Result<MemslotChange, E>
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
        // We store `keep`, a clone of the Arc that owns the mapping, in the
        // table below; it is dropped only after `delete_memslot` for this
        // slot has returned (in `delete` and `Drop`), or never.
        unsafe { self.add(user.memslot(), Some(keep)) }.map_err(E::from)
    }

    /// Adds every region of `memory` as one slot each, with ids from
    /// `first_id` up, at their own guest addresses. Returns the ids.
    pub fn add_memory<B>(
        &self,
        memory: &vm_memory::GuestRegionCollection<GuestRegionMmap<B>>,
        first_id: u32,
        flags: MemslotFlags,
    ) -> Result<Vec<SlotId>, E>
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
    pub unsafe fn add_user_region(&self, region: &UserRegion) -> Result<MemslotChange, E> {
        // SAFETY: forwarded from our caller.
        unsafe { self.add(region.memslot(), None) }.map_err(E::from)
    }

    /// Adds or changes a slot the VMM asked for (`slot.flags` as asked):
    /// records whether it is to be logged, and gives the backend the flags
    /// the dirty-log mode calls for.
    ///
    /// # Safety
    ///
    /// As [`MmuBackend::set_memslot`], until the slot is deleted through
    /// this glue or the glue is dropped; `keep` (if any) keeps the memory
    /// mapped that long.
    unsafe fn add(
        &self,
        mut slot: Memslot,
        keep: Option<KeepAlive>,
    ) -> Result<MemslotChange, SlotError> {
        let logged = slot.flags.contains(MemslotFlags::LOG_DIRTY);
        if self.mode == DirtyLogMode::VmWide
            && logged
            && slot.flags.contains(MemslotFlags::READONLY)
        {
            return Err(SlotError::ReadOnlyLogged(slot.id));
        }
        let mut table = self.lock();
        // A per-slot host logs a recorded slot while a VM-wide start is in
        // force even if the VMM re-adds it without the flag.
        if self.mode == DirtyLogMode::PerSlot
            && table.logging
            && table.slots.get(&slot.id).is_some_and(|e| e.logged)
        {
            slot.flags.insert(MemslotFlags::LOG_DIRTY);
        }
        // SAFETY: forwarded from our caller.
        let change = unsafe { self.set(&mut table, slot, keep) }?;
        if let Some(entry) = table.slots.get_mut(&slot.id) {
            entry.logged = logged;
        }
        Ok(change)
    }

    /// The backend's copy of slot `id`.
    fn backend_slot(&self, id: SlotId) -> Result<Memslot, SlotError> {
        self.backend
            .memslots()
            .into_iter()
            .find(|s| s.id == id)
            .ok_or(SlotError::Backend(MemslotError::UnknownSlot(id)))
    }

    /// Gives the backend (and the mirror) `slot` as it is to be now.
    ///
    /// # Safety
    ///
    /// As [`MmuBackend::set_memslot`], until the slot is deleted through
    /// this glue or the glue is dropped; `keep` (if any) keeps the memory
    /// mapped that long.
    unsafe fn set(
        &self,
        table: &mut Table,
        mut slot: Memslot,
        keep: Option<KeepAlive>,
    ) -> Result<MemslotChange, SlotError> {
        let old = if table.slots.contains_key(&slot.id) {
            Some(self.backend_slot(slot.id)?)
        } else {
            None
        };
        if let Some(mirror) = &self.mirror {
            slot.backing.hpa = match old {
                // A live slot keeps where its memory is mapped (the backend
                // refuses a new backing for it).
                Some(old) => old.backing.hpa,
                None => mirror
                    .place(&slot)
                    .map_err(mirror_error("place", slot.id))?,
            };
        }
        // The hardware must reach the memory before any SPTE can map it,
        // and must log it before the backend hands out writable SPTEs
        // that rely on the hardware's log.
        let mirrored = match (&self.mirror, old) {
            (Some(mirror), None) => {
                // SAFETY: forwarded from our caller; the mirror is removed
                // in `delete` before the slot's memory is released.
                unsafe { mirror.map(&slot) }.map_err(mirror_error("map", slot.id))?;
                true
            }
            (Some(mirror), Some(old)) if old.flags != slot.flags => {
                // The same host range at the same host-physical address:
                // the hypervisor changes the region's flags in place.
                // SAFETY: as above; the slot keeps its host range (the
                // backend refuses a new backing for a live slot, and the
                // mirror is only touched here when the backend has it).
                unsafe { mirror.map(&slot) }
                    .map_err(mirror_error("change the flags of", slot.id))?;
                true
            }
            _ => false,
        };
        // SAFETY: forwarded from our caller.
        let change = match unsafe { self.backend.set_memslot(slot) } {
            Ok(change) => change,
            Err(e) => {
                if mirrored && let Some(mirror) = &self.mirror {
                    let undone = match old {
                        // SAFETY: the old slot's host range, which the
                        // backend still holds.
                        Some(old) => unsafe { mirror.map(&old) },
                        None => mirror.unmap(&slot),
                    };
                    if let Err(undo) = undone {
                        warn!(slot = slot.id.0, error = %undo, "cannot undo the mirror change of a refused memslot");
                    }
                }
                return Err(SlotError::Backend(e));
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
        // A move or flag change keeps the backing, hence the mapping.
        table.slots.entry(slot.id).or_insert(Entry {
            keep,
            logged: slot.flags.contains(MemslotFlags::LOG_DIRTY),
        });
        Ok(change)
    }

    /// Moves slot `id` to `guest_base` (same size and memory).
    pub fn move_slot(&self, id: SlotId, guest_base: Gpa) -> Result<MemslotChange, E> {
        let mut table = self.lock();
        let mut slot = self.known(&table, id)?;
        slot.guest_base = guest_base;
        // SAFETY: `slot` was added through this glue (`known` checks), so
        // its host range is valid until it is deleted through the glue; a
        // move keeps the host range (the backend refuses a new backing).
        unsafe { self.set(&mut table, slot, None) }.map_err(E::from)
    }

    /// Turns dirty logging of slot `id` on or off (a migration starting or
    /// ending) on a per-slot host. Turning it on starts a clean log.
    ///
    /// A host that switches logging VM-wide refuses
    /// ([`SlotError::VmWideLogging`]).
    pub fn set_dirty_logging(&self, id: SlotId, on: bool) -> Result<MemslotChange, E> {
        if self.mode == DirtyLogMode::VmWide {
            return Err(E::from(SlotError::VmWideLogging(id)));
        }
        let mut table = self.lock();
        let change = self.switch_logging(&mut table, id, on).map_err(E::from)?;
        if let Some(entry) = table.slots.get_mut(&id) {
            entry.logged = on;
        }
        Ok(change)
    }

    fn switch_logging(
        &self,
        table: &mut Table,
        id: SlotId,
        on: bool,
    ) -> Result<MemslotChange, SlotError> {
        let mut slot = self.known(table, id)?;
        slot.flags.set(MemslotFlags::LOG_DIRTY, on);
        // SAFETY: as in `move_slot`: a slot of this glue, same host range.
        unsafe { self.set(table, slot, None) }
    }

    /// Starts dirty logging of every slot added with logging (or switched
    /// on): a migration's first pass. Each log starts clean.
    ///
    /// On a per-slot host the slots are switched one by one; on a VM-wide
    /// host the hypervisor's switch is thrown once, and what the backend
    /// logged before is discarded.
    pub fn start_dirty_log(&self) -> Result<(), E> {
        let mut table = self.lock();
        self.start(&mut table).map_err(E::from)
    }

    fn start(&self, table: &mut Table) -> Result<(), SlotError> {
        let logged = table.logged();
        match self.mode {
            DirtyLogMode::PerSlot => {
                for &id in &logged {
                    self.switch_logging(table, id, false)?;
                    self.switch_logging(table, id, true)?;
                }
            }
            DirtyLogMode::VmWide => {
                if let Some(port) = &self.switch {
                    port.start_dirty_log()
                        .map_err(|source| SlotError::Hypervisor {
                            what: "start dirty logging with",
                            slot: logged.first().copied().unwrap_or(SlotId(0)),
                            source,
                        })?;
                }
                for &id in &logged {
                    // The backend logged this slot's emulated writes since
                    // it was added: start from a clean log.
                    self.harvest(id)?;
                }
            }
        }
        table.logging = true;
        debug!(slots = logged.len(), mode = ?self.mode, "dirty logging started");
        Ok(())
    }

    /// Stops dirty logging of every logged slot (the slots stay recorded
    /// for the next start).
    pub fn stop_dirty_log(&self) -> Result<(), E> {
        let mut table = self.lock();
        let logged = table.logged();
        match self.mode {
            DirtyLogMode::PerSlot => {
                for &id in &logged {
                    self.switch_logging(&mut table, id, false)
                        .map_err(E::from)?;
                }
            }
            DirtyLogMode::VmWide => {
                if let Some(port) = &self.switch {
                    port.stop_dirty_log()
                        .map_err(|source| SlotError::Hypervisor {
                            what: "stop dirty logging with",
                            slot: logged.first().copied().unwrap_or(SlotId(0)),
                            source,
                        })
                        .map_err(E::from)?;
                }
            }
        }
        table.logging = false;
        debug!(slots = logged.len(), mode = ?self.mode, "dirty logging stopped");
        Ok(())
    }

    /// Whether a VM-wide [`start_dirty_log`](Self::start_dirty_log) is in
    /// force.
    pub fn is_logging(&self) -> bool {
        self.lock().logging
    }

    /// The backend's slot `id`, if it was added through this glue.
    fn known(&self, table: &Table, id: SlotId) -> Result<Memslot, SlotError> {
        if !table.slots.contains_key(&id) {
            return Err(SlotError::Backend(MemslotError::UnknownSlot(id)));
        }
        self.backend_slot(id)
    }

    /// Deletes slot `id`; once the backend has let go of it, its mapping
    /// (if the glue kept it) is released.
    pub fn delete(&self, id: SlotId) -> Result<Memslot, E> {
        let mut table = self.lock();
        if !table.slots.contains_key(&id) {
            return Err(E::from(SlotError::Backend(MemslotError::UnknownSlot(id))));
        }
        let old = self
            .backend
            .delete_memslot(id)
            .map_err(|e| E::from(SlotError::Backend(e)))?;
        // The backend dropped every SPTE mapping it: now the hardware
        // mapping can go.
        if let Some(mirror) = &self.mirror {
            mirror
                .unmap(&old)
                .map_err(mirror_error("unmap", id))
                .map_err(E::from)?;
        }
        debug!(
            backend = self.backend.name(),
            slot = id.0,
            "memslot deleted"
        );
        table.slots.remove(&id);
        Ok(old)
    }

    /// The pages of slot `id` written since the last call (guest writes and
    /// the VMM's own noted writes).
    ///
    /// On a VM-wide host, a slot is logged only between
    /// [`start_dirty_log`](Self::start_dirty_log) and
    /// [`stop_dirty_log`](Self::stop_dirty_log); outside that it is
    /// [`MemslotError::NotLogging`].
    pub fn dirty_log(&self, id: SlotId) -> Result<DirtyBitmap, E> {
        let table = self.lock();
        if !table.slots.contains_key(&id) {
            return Err(E::from(SlotError::Backend(MemslotError::UnknownSlot(id))));
        }
        if self.mode == DirtyLogMode::VmWide && !table.logging {
            return Err(E::from(SlotError::Backend(MemslotError::NotLogging(id))));
        }
        self.harvest(id).map_err(E::from)
    }

    fn harvest(&self, id: SlotId) -> Result<DirtyBitmap, SlotError> {
        let mut log = self.backend.get_dirty_log(id)?;
        if let Some(mirror) = &self.mirror {
            let slot = self.backend_slot(id)?;
            let words = mirror
                .dirty_log(&slot)
                .map_err(mirror_error("read the dirty log of", id))?;
            if let Some(words) = words {
                log.merge(&DirtyBitmap::from_words(slot.pages(), words));
            }
        }
        Ok(log)
    }

    /// The ids of the slots added through this glue, ascending.
    pub fn ids(&self) -> Vec<SlotId> {
        self.lock().slots.keys().copied().collect()
    }
}

impl<E> Drop for Memslots<E> {
    fn drop(&mut self) {
        let slots = std::mem::take(
            &mut self
                .table
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner)
                .slots,
        );
        for (id, entry) in slots {
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
                std::mem::forget(entry.keep);
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

#[cfg(all(test, feature = "ept"))]
mod vm_wide_tests {
    use std::sync::Mutex;

    use mmu_api::{Gpa, MemslotFlags, SlotId};
    use mmu_backends::{BackendConfig, BackendKind, BackendParts};
    use mmu_ept::testing::GuestRam;

    use super::*;
    use crate::ports::{RegionMemory, RegionPort};

    /// A hypervisor that switches dirty logging VM-wide, as Cloud
    /// Hypervisor does: it records the regions created with `log_dirty`
    /// and logs them only between start and stop.
    #[derive(Debug, Default)]
    struct VmWideHost {
        calls: Mutex<Vec<String>>,
        logging: Mutex<bool>,
        /// Pages the "guest" wrote while logging, per slot.
        written: Mutex<BTreeMap<u32, Vec<u64>>>,
    }

    impl VmWideHost {
        fn call(&self, what: String) {
            self.calls.lock().unwrap().push(what);
        }
        fn guest_writes(&self, slot: u32, page: u64) {
            if *self.logging.lock().unwrap() {
                self.written
                    .lock()
                    .unwrap()
                    .entry(slot)
                    .or_default()
                    .push(page);
            }
        }
    }

    impl RegionPort for VmWideHost {
        unsafe fn set_region(&self, region: &UserRegion) -> Result<(), PortError> {
            self.call(format!("set {} log={}", region.slot, region.log_dirty));
            Ok(())
        }
        fn remove_region(&self, region: &UserRegion) -> Result<(), PortError> {
            self.call(format!("remove {}", region.slot));
            Ok(())
        }
        fn dirty_log(&self, region: &UserRegion) -> Result<Vec<u64>, PortError> {
            if !*self.logging.lock().unwrap() {
                return Err(PortError::failed(
                    "get_dirty_log",
                    std::io::Error::from_raw_os_error(libc::ENOENT),
                ));
            }
            let mut words = vec![0u64; region.memory_size.div_ceil(4096 * 64) as usize];
            for page in self
                .written
                .lock()
                .unwrap()
                .remove(&region.slot)
                .unwrap_or_default()
            {
                words[(page / 64) as usize] |= 1 << (page % 64);
            }
            Ok(words)
        }
        fn dirty_log_mode(&self) -> DirtyLogMode {
            DirtyLogMode::VmWide
        }
        fn start_dirty_log(&self) -> Result<(), PortError> {
            self.call("start".into());
            *self.logging.lock().unwrap() = true;
            Ok(())
        }
        fn stop_dirty_log(&self) -> Result<(), PortError> {
            self.call("stop".into());
            *self.logging.lock().unwrap() = false;
            Ok(())
        }
    }

    fn ram() -> &'static GuestRam {
        Box::leak(Box::new(GuestRam::new(0x4_0000)))
    }

    fn region(ram: &GuestRam, slot: u32, base: u64, readonly: bool, log_dirty: bool) -> UserRegion {
        let memslot = ram.memslot(SlotId(slot), Gpa(base), MemslotFlags::empty());
        UserRegion {
            slot,
            guest_phys_addr: base,
            memory_size: memslot.size,
            userspace_addr: memslot.backing.host_addr.0,
            readonly,
            log_dirty,
        }
    }

    #[test]
    fn vm_wide_logging_runs_between_start_and_stop() {
        let host = Arc::new(VmWideHost::default());
        let port: Arc<dyn RegionPort> = Arc::new(Arc::clone(&host));
        let parts = BackendParts::new()
            .with_hypervisor_memory(Arc::new(RegionMemory::new(Arc::clone(&port))));
        let backend =
            mmu_backends::create(BackendKind::Ept, &BackendConfig::default(), &parts).unwrap();
        let glue = Memslots::<SlotError>::for_host(Arc::clone(&backend), None, Some(port));
        assert_eq!(glue.dirty_log_mode(), DirtyLogMode::VmWide);

        let (logged, plain) = (ram(), ram());
        // SAFETY: both rams are leaked: valid for the whole process.
        unsafe { glue.add_user_region(&region(logged, 0, 0, false, true)) }.unwrap();
        // SAFETY: as above.
        unsafe { glue.add_user_region(&region(plain, 1, 0x10_0000, false, false)) }.unwrap();
        // The host sees the logging wish at creation (it records it).
        assert_eq!(
            *host.calls.lock().unwrap(),
            ["set 0 log=true", "set 1 log=false"]
        );

        // Not logging before the VM-wide start; no per-slot switch.
        assert!(matches!(
            glue.dirty_log(SlotId(0)),
            Err(SlotError::Backend(MemslotError::NotLogging(SlotId(0))))
        ));
        assert!(matches!(
            glue.set_dirty_logging(SlotId(0), true),
            Err(SlotError::VmWideLogging(SlotId(0)))
        ));
        // A write the VMM makes before the start is not in the first log.
        let mut vcpu = crate::test_support::vcpu(&*backend, 0);
        vcpu.write_guest(Gpa(0x1000), &[1]).unwrap();

        glue.start_dirty_log().unwrap();
        assert!(glue.is_logging());
        host.guest_writes(0, 5);
        vcpu.write_guest(Gpa(0x7008), &[2]).unwrap();
        let log = glue.dirty_log(SlotId(0)).unwrap();
        assert_eq!(log.iter_dirty().collect::<Vec<_>>(), [5, 7]);
        assert_eq!(glue.dirty_log(SlotId(0)).unwrap().count(), 0);

        glue.stop_dirty_log().unwrap();
        assert!(matches!(
            glue.dirty_log(SlotId(0)),
            Err(SlotError::Backend(MemslotError::NotLogging(SlotId(0))))
        ));
        assert_eq!(
            host.calls.lock().unwrap()[2..],
            ["start".to_string(), "stop".to_string()]
        );

        // Read-only and logged is refused before anything reaches the host.
        let rom = ram();
        // SAFETY: as above.
        let err =
            unsafe { glue.add_user_region(&region(rom, 2, 0x20_0000, true, true)) }.unwrap_err();
        assert!(
            matches!(err, SlotError::ReadOnlyLogged(SlotId(2))),
            "{err:?}"
        );
        assert_eq!(host.calls.lock().unwrap().len(), 4);
        // The flattened form, for `Memslots<MemslotError>` callers.
        assert_eq!(
            MemslotError::from(err),
            MemslotError::IllegalChange(SlotId(2))
        );
    }

    #[test]
    fn hypervisor_errors_keep_their_errno() {
        let err = SlotError::Hypervisor {
            what: "map",
            slot: SlotId(3),
            source: PortError::failed(
                "KVM_SET_USER_MEMORY_REGION",
                std::io::Error::from_raw_os_error(libc::EEXIST),
            ),
        };
        assert_eq!(err.raw_os_error(), Some(libc::EEXIST));
        assert_eq!(err.to_string(), "the hypervisor could not map slot 3");
        let flat = MemslotError::from(err);
        let MemslotError::Hypervisor(kept) = &flat else {
            panic!("{flat:?}");
        };
        assert_eq!(kept.raw_os_error(), Some(libc::EEXIST));
        assert_eq!(kept.to_string(), "the hypervisor could not map slot 3");
        let source = std::error::Error::source(kept).expect("the port's error");
        assert!(
            source
                .to_string()
                .contains("KVM_SET_USER_MEMORY_REGION failed"),
            "{source}"
        );
    }
}
