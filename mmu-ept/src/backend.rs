//! The VM-wide half: memslots, the memslot generation, dirty logging,
//! zap-all, vCPU creation and stats.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use mmu_api::{
    BackendError, DirtyBitmap, Gpa, HypervisorError, Memslot, MemslotChange, MemslotError,
    MemslotFlags, MemslotGeneration, MemslotTable, MmuBackend, MmuStats, MmuVcpu, PAGE_SHIFT,
    SlotId, VcpuId, VcpuKick,
};

use crate::config::EptConfig;
use crate::dirty::HostDirtyLog;
use crate::port::HypervisorMemory;
use crate::stats::{VcpuCounters, VmCounters};
use crate::vcpu::EptVcpu;

/// The name this backend reports ([`MmuBackend::name`], [`MmuStats::backend`]).
pub const BACKEND_NAME: &str = "ept";

/// The memslots as the backend sees them, changed only under the write
/// lock of [`Shared::slots`].
pub(crate) struct SlotState {
    /// Validated, sorted memslots.
    pub(crate) table: MemslotTable,
    /// Pages the VMM wrote, one log per LOG_DIRTY slot.
    host_dirty: HashMap<SlotId, HostDirtyLog>,
}

/// Everything the backend and its vCPUs share.
pub(crate) struct Shared {
    pub(crate) config: EptConfig,
    hypervisor: Arc<dyn HypervisorMemory>,
    /// Readers: vCPU walks (which dereference the slots' host mappings), MMIO
    /// cache misses, dirty logging. Writer: memslot updates, for the instant
    /// they swap the table in. A delete therefore returns only once no walk
    /// can still be reading the slot's host memory.
    slots: RwLock<SlotState>,
    /// The memslot generation, with its update-in-progress bit.
    generation: AtomicU64,
    /// Bumped by zap-all; each vCPU drops its TLB and MMIO cache when it
    /// sees a new value.
    pub(crate) zap_epoch: AtomicU64,
    /// Serializes memslot updates (the VMM promises to, this makes sure).
    updates: Mutex<()>,
    /// Every vCPU created, with its counters (kept after the vCPU is
    /// dropped so stats stay monotonic).
    vcpus: Mutex<Vec<(VcpuId, Arc<VcpuCounters>)>>,
    counters: VmCounters,
}

/// Recovers a guard from a poisoned lock. Every critical section in this
/// crate either only reads, or swaps in values built beforehand, so a panic
/// inside one cannot leave the protected data half-updated.
fn unpoison<G>(result: Result<G, PoisonError<G>>) -> G {
    result.unwrap_or_else(PoisonError::into_inner)
}

impl SlotState {
    /// Marks every page of `[gpa, gpa + len)` that lies in a LOG_DIRTY slot
    /// as written by the VMM.
    pub(crate) fn note_write(&self, gpa: Gpa, len: u64) {
        let end = gpa.raw().saturating_add(len);
        let mut cur = gpa.raw();
        while cur < end {
            if let Some(slot) = self.table.find(Gpa(cur)) {
                let stop = end.min(slot.end().raw());
                if let Some(log) = self.host_dirty.get(&slot.id) {
                    let base = slot.guest_base.raw();
                    log.mark((cur - base) >> PAGE_SHIFT, (stop - 1 - base) >> PAGE_SHIFT);
                }
                cur = stop;
            } else {
                // A hole: skip to the next slot above it, if any.
                match self.table.iter().find(|s| s.guest_base.raw() > cur) {
                    Some(next) => cur = next.guest_base.raw(),
                    None => break,
                }
            }
        }
    }
}

impl Shared {
    /// Marks every page of `[gpa, gpa + len)` that lies in a LOG_DIRTY slot
    /// as written by the VMM.
    pub(crate) fn note_write(&self, gpa: Gpa, len: u64) {
        self.read_slots().note_write(gpa, len);
    }

    pub(crate) fn read_slots(&self) -> RwLockReadGuard<'_, SlotState> {
        unpoison(self.slots.read())
    }

    fn write_slots(&self) -> RwLockWriteGuard<'_, SlotState> {
        unpoison(self.slots.write())
    }

    fn lock_updates(&self) -> MutexGuard<'_, ()> {
        unpoison(self.updates.lock())
    }

    /// The current memslot generation. Acquire: a reader that sees a
    /// completed generation also sees the table that generation published.
    pub(crate) fn generation(&self) -> MemslotGeneration {
        MemslotGeneration(self.generation.load(Ordering::Acquire))
    }

    /// Publishes the update-in-progress bit before anything changes, and
    /// returns the generation to finish or restore.
    fn begin_update(&self) -> MemslotGeneration {
        // Only updaters store, and they hold `updates`.
        let before = MemslotGeneration(self.generation.load(Ordering::Relaxed));
        self.generation
            .store(before.begin_update().0, Ordering::Release);
        before
    }

    /// Publishes the next generation once the new table is in place.
    fn finish_update(&self, before: MemslotGeneration) -> MemslotGeneration {
        let next = before.finish_update();
        self.generation.store(next.0, Ordering::Release);
        next
    }

    /// Puts the old generation back after the hypervisor refused the
    /// change: the table did not change, so answers cached under it are
    /// still right, and nothing was cached while the bit was set.
    fn abort_update(&self, before: MemslotGeneration) {
        self.generation.store(before.0, Ordering::Release);
    }
}

/// The EPT-passthrough backend for one VM.
///
/// The hypervisor owns the second stage (KVM's EPT/NPT); this backend owns
/// what the VMM still has to decide itself: the memslots (mirrored into the
/// hypervisor through a [`HypervisorMemory`] port), the classification of
/// MMIO exits, dirty logging that includes the VMM's own writes, and
/// guest-virtual translation for instruction emulation.
pub struct EptBackend {
    shared: Arc<Shared>,
}

impl fmt::Debug for EptBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EptBackend")
            .field("config", &self.shared.config)
            .field("generation", &self.shared.generation())
            .field("memslots", &self.shared.read_slots().table.len())
            .field("hypervisor", &self.shared.hypervisor)
            .finish_non_exhaustive()
    }
}

impl EptBackend {
    /// A backend with no memslots that mirrors them into `hypervisor`.
    pub fn new(config: EptConfig, hypervisor: Arc<dyn HypervisorMemory>) -> Self {
        let table = MemslotTable::new(config.gpa_width, config.max_slots);
        Self {
            shared: Arc::new(Shared {
                config,
                hypervisor,
                slots: RwLock::new(SlotState {
                    table,
                    host_dirty: HashMap::new(),
                }),
                generation: AtomicU64::new(0),
                zap_epoch: AtomicU64::new(0),
                updates: Mutex::new(()),
                vcpus: Mutex::new(Vec::new()),
                counters: VmCounters::default(),
            }),
        }
    }

    /// The configuration the backend was built with.
    pub fn config(&self) -> &EptConfig {
        &self.shared.config
    }

    fn refused(what: &'static str, slot: &Memslot, err: io::Error) -> MemslotError {
        MemslotError::Hypervisor(HypervisorError::new(RegionRefused {
            what,
            slot: slot.id,
            guest_base: slot.guest_base,
            size: slot.size,
            source: err,
        }))
    }

    fn trace_update(what: &'static str, slot: &Memslot, generation: MemslotGeneration) {
        tracing::debug!(
            backend = BACKEND_NAME,
            slot = slot.id.0,
            base = slot.guest_base.raw(),
            size = slot.size,
            flags = slot.flags.bits(),
            generation = generation.0,
            "memslot {what}"
        );
    }
}

fn logs_dirty(slot: &Memslot) -> bool {
    slot.flags.contains(MemslotFlags::LOG_DIRTY)
}

impl MmuBackend for EptBackend {
    fn name(&self) -> &'static str {
        BACKEND_NAME
    }

    /// Validates the change with [`MemslotTable::set`], then, in this
    /// order: publishes the update-in-progress generation, applies the
    /// change in the hypervisor, swaps the new table in, and publishes the
    /// next generation. A refused change restores the old generation and
    /// changes nothing. An [`Unchanged`](MemslotChange::Unchanged) slot
    /// touches neither the hypervisor nor the generation (there is no
    /// change to publish, as KVM does).
    ///
    /// No translation the backend holds can outlive the change: vCPUs drop
    /// their software TLB when they see the new generation, and every
    /// cached MMIO answer is tagged with the generation it was made under.
    /// The hypervisor's own second-stage mappings are its business (KVM
    /// zaps them inside the ioctl).
    ///
    /// # Safety
    ///
    /// As [`MmuBackend::set_memslot`]: the slot's host range must stay valid
    /// until [`delete_memslot`](MmuBackend::delete_memslot) for it returns.
    /// The backend relies on it twice: the hypervisor port lets the guest
    /// access that memory directly, and vCPU walks read guest page tables
    /// through it (under the read lock the delete waits for).
    unsafe fn set_memslot(&self, slot: Memslot) -> Result<MemslotChange, MemslotError> {
        let shared = &self.shared;
        let _serial = shared.lock_updates();
        let (next, change) = {
            let state = shared.read_slots();
            let mut next = state.table.clone();
            let change = next.set(slot)?;
            (next, change)
        };
        if change == MemslotChange::Unchanged {
            return Ok(change);
        }
        let before = shared.begin_update();
        // SAFETY: our caller guarantees (set_memslot's contract) that the
        // slot's host range stays valid for reads and writes until
        // delete_memslot for the slot returns, and delete_memslot removes
        // the region from the hypervisor before it returns: that is the
        // port's contract. A change to an existing slot keeps its host
        // range (MemslotTable::set refuses anything else).
        let applied = unsafe { shared.hypervisor.set_user_memory_region(&slot) };
        if let Err(err) = applied {
            shared.abort_update(before);
            return Err(Self::refused("setting", &slot, err));
        }
        {
            let mut state = shared.write_slots();
            state.table = next;
            let wanted = logs_dirty(&slot);
            let had = state.host_dirty.contains_key(&slot.id);
            if wanted && !had {
                state
                    .host_dirty
                    .insert(slot.id, HostDirtyLog::new(slot.pages()));
            } else if !wanted && had {
                state.host_dirty.remove(&slot.id);
            }
            // A move keeps the log: its pages are slot-relative.
        }
        let generation = shared.finish_update(before);
        VmCounters::add(&shared.counters.memslot_updates, 1);
        let what = match change {
            MemslotChange::Created => "created",
            MemslotChange::Moved { .. } => "moved",
            MemslotChange::FlagsChanged { .. } => "flags changed",
            MemslotChange::Unchanged => "unchanged",
            _ => "changed",
        };
        Self::trace_update(what, &slot, generation);
        Ok(change)
    }

    /// Same protocol as [`set_memslot`](Self::set_memslot). On return the
    /// hypervisor has dropped the region and no vCPU walk can still be
    /// reading the slot's host memory (the table swap waits for them), so
    /// the VMM may unmap it. Host writes noted for the slot but not yet
    /// harvested go with it, as the hypervisor's log does.
    fn delete_memslot(&self, id: SlotId) -> Result<Memslot, MemslotError> {
        let shared = &self.shared;
        let _serial = shared.lock_updates();
        let (next, old) = {
            let state = shared.read_slots();
            let mut next = state.table.clone();
            let old = next.delete(id)?;
            (next, old)
        };
        let before = shared.begin_update();
        if let Err(err) = shared.hypervisor.delete_user_memory_region(&old) {
            shared.abort_update(before);
            return Err(Self::refused("deleting", &old, err));
        }
        {
            let mut state = shared.write_slots();
            state.table = next;
            state.host_dirty.remove(&id);
        }
        let generation = shared.finish_update(before);
        VmCounters::add(&shared.counters.memslot_updates, 1);
        Self::trace_update("deleted", &old, generation);
        Ok(old)
    }

    fn memslots(&self) -> Vec<Memslot> {
        self.shared.read_slots().table.iter().copied().collect()
    }

    fn memslot_generation(&self) -> MemslotGeneration {
        self.shared.generation()
    }

    /// The backend built no table the hardware walks, so there is no root
    /// to reload and nobody to kick: bumping the zap epoch makes every vCPU
    /// drop its software TLB and MMIO cache before it next uses either
    /// (each use checks the epoch).
    fn zap_all(&self) {
        self.shared.zap_epoch.fetch_add(1, Ordering::AcqRel);
        VmCounters::add(&self.shared.counters.zap_alls, 1);
    }

    /// Merges the hypervisor's log (the guest's writes) with the VMM's own
    /// noted writes, clearing both. The hypervisor's log is read first and
    /// the noted writes taken only if that succeeded, so a refused harvest
    /// loses nothing; a write noted while this runs lands in this harvest or
    /// the next.
    ///
    /// A slot without LOG_DIRTY is refused with
    /// [`MemslotError::NotLogging`], as KVM refuses `KVM_GET_DIRTY_LOG` for
    /// it (`ENOENT`).
    fn get_dirty_log(&self, id: SlotId) -> Result<DirtyBitmap, MemslotError> {
        let state = self.shared.read_slots();
        let slot = *state.table.get(id).ok_or(MemslotError::UnknownSlot(id))?;
        let Some(host_log) = state.host_dirty.get(&id) else {
            return Err(MemslotError::NotLogging(id));
        };
        let guest_words = self
            .shared
            .hypervisor
            .get_dirty_log(&slot)
            .map_err(|err| Self::refused("reading the dirty log of", &slot, err))?;
        let mut bitmap = DirtyBitmap::from_words(slot.pages(), guest_words);
        bitmap.merge(&DirtyBitmap::from_words(slot.pages(), host_log.take()));
        VmCounters::add(&self.shared.counters.dirty_pages_harvested, bitmap.count());
        Ok(bitmap)
    }

    /// Marks every page of `[gpa, gpa + len)` that lies in a LOG_DIRTY slot;
    /// the rest (MMIO, slots without logging) is ignored.
    fn note_host_write(&self, gpa: Gpa, len: u64) {
        if len == 0 {
            return;
        }
        VmCounters::add(&self.shared.counters.host_writes_noted, 1);
        self.shared.note_write(gpa, len);
    }

    /// The EPT backend never kicks: no request it posts has to wait for a
    /// vCPU to leave guest mode (see [`zap_all`](Self::zap_all)), so `kick`
    /// is not kept.
    fn create_vcpu(
        &self,
        id: VcpuId,
        kick: Arc<dyn VcpuKick>,
    ) -> Result<Box<dyn MmuVcpu>, BackendError> {
        drop(kick);
        let mut vcpus = unpoison(self.shared.vcpus.lock());
        if vcpus.iter().any(|(existing, _)| *existing == id) {
            return Err(BackendError::VcpuExists(id));
        }
        let counters = Arc::new(VcpuCounters::default());
        vcpus.push((id, Arc::clone(&counters)));
        Ok(Box::new(EptVcpu::new(
            id,
            Arc::clone(&self.shared),
            counters,
        )))
    }

    /// Per-vCPU counters summed over every vCPU ever created, then the
    /// VM-wide ones.
    fn stats(&self) -> MmuStats {
        let mut counters: Vec<(&'static str, u64)> = VcpuCounters::default()
            .snapshot()
            .iter()
            .map(|&(name, _)| (name, 0))
            .collect();
        for (_, vcpu) in unpoison(self.shared.vcpus.lock()).iter() {
            for (sum, (_, value)) in counters.iter_mut().zip(vcpu.snapshot()) {
                sum.1 += value;
            }
        }
        counters.extend(self.shared.counters.snapshot());
        MmuStats::new(BACKEND_NAME, counters)
    }

    /// Not applicable: the backend holds no table pages.
    fn page_limit(&self) -> Option<u64> {
        None
    }

    /// Only `None` (no limit) is accepted: the hypervisor sizes its own
    /// second-stage tables.
    fn set_page_limit(&self, pages: Option<u64>) -> Result<(), BackendError> {
        match pages {
            None => Ok(()),
            Some(_) => Err(BackendError::Unsupported {
                backend: BACKEND_NAME,
                what: "a page limit",
            }),
        }
    }
}

/// The hypervisor port refused a region change; the errno is in `source`.
#[derive(Debug, thiserror::Error)]
#[error("{what} {slot} at {guest_base} ({size:#x} bytes)")]
struct RegionRefused {
    what: &'static str,
    slot: SlotId,
    guest_base: Gpa,
    size: u64,
    source: io::Error,
}
