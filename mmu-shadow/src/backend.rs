//! The `MmuBackend` implementation: memslots, dirty logs, zap-all, vCPUs.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use mmu_api::{
    BackendError, DirtyBitmap, Gfn, Gpa, HostVirtAddr, Hpa, Memslot, MemslotChange, MemslotError,
    MemslotFlags, MemslotGeneration, MmuBackend, MmuStats, MmuVcpu, PAGE_SIZE, SlotId, VcpuId,
    VcpuKick,
};

use crate::ShadowConfig;
use crate::pool::{PoolError, ShadowPool};
use crate::state::MmuState;
use crate::vcpu::{ShadowVcpu, VcpuShared};

/// The smallest page limit the backend accepts: enough for one 5-level
/// path plus its root, twice over.
pub const MIN_PAGE_LIMIT: u64 = 12;

/// State shared by the backend and its vCPUs.
#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) config: ShadowConfig,
    state: Mutex<MmuState>,
    generation: AtomicU64,
}

impl Inner {
    /// Takes the MMU lock.
    pub(crate) fn lock(&self) -> MutexGuard<'_, MmuState> {
        // A panic under the lock is a bug that already failed its thread;
        // the state is still the best there is for teardown.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets a vCPU that went away: its roots are released.
    pub(crate) fn remove_vcpu(&self, id: VcpuId) {
        let mut st = self.lock();
        st.vcpus.retain(|v| v.id != id);
        if let Some(cache) = st.roots.remove(&id) {
            for e in cache.entries {
                st.put_root(e.frame);
            }
        }
        st.commit_zap();
    }
}

/// The shadow paging backend of one VM.
///
/// Cheap to clone (a handle); every clone is the same backend.
#[derive(Debug, Clone)]
pub struct ShadowBackend {
    pub(crate) inner: Arc<Inner>,
}

impl ShadowBackend {
    /// A backend with its own shadow page pool.
    pub fn new(config: ShadowConfig) -> Result<Self, PoolError> {
        if let Some(limit) = config.page_limit
            && limit < MIN_PAGE_LIMIT
        {
            return Err(PoolError::Size(limit));
        }
        let pool = ShadowPool::new(config.pool_pages, config.pool_hpa)?;
        let state = MmuState::new(&config, pool, config.gpa_width);
        Ok(ShadowBackend {
            inner: Arc::new(Inner {
                config,
                state: Mutex::new(state),
                generation: AtomicU64::new(0),
            }),
        })
    }

    /// The pool's host mapping, size, and the address the hardware sees it
    /// at: what a VMM registers with the hypervisor so the hardware can walk
    /// the shadow tables.
    pub fn pool_region(&self) -> (HostVirtAddr, u64, Hpa) {
        let st = self.inner.lock();
        let (host, size) = st.pool.host_region();
        (host, size, st.pool.hpa_base())
    }

    /// Creates vCPU `id` with its concrete type (which also offers
    /// [`ShadowVcpu::write_guest`]).
    pub fn create_shadow_vcpu(
        &self,
        id: VcpuId,
        kick: Arc<dyn VcpuKick>,
    ) -> Result<ShadowVcpu, BackendError> {
        let mut st = self.inner.lock();
        if st.vcpus.iter().any(|v| v.id == id) {
            return Err(BackendError::VcpuExists(id));
        }
        let shared = Arc::new(VcpuShared {
            id,
            requests: AtomicU32::new(0),
            in_guest: AtomicBool::new(false),
            kick,
        });
        st.register_vcpu(shared.clone());
        Ok(ShadowVcpu::new(shared, self.inner.clone()))
    }

    fn publish(&self, generation: MemslotGeneration) {
        self.inner.generation.store(generation.0, Ordering::Release);
    }
}

fn ranges_overlap(a: u64, a_len: u64, b: u64, b_len: u64) -> bool {
    a < b.saturating_add(b_len) && b < a.saturating_add(a_len)
}

impl MmuBackend for ShadowBackend {
    fn name(&self) -> &'static str {
        "shadow"
    }

    unsafe fn set_memslot(&self, slot: Memslot) -> Result<MemslotChange, MemslotError> {
        let mut st = self.inner.lock();
        let pool_len = u64::from(st.pool.capacity()) * PAGE_SIZE;
        if ranges_overlap(
            slot.backing.hpa.raw(),
            slot.size,
            st.pool.hpa_base().raw(),
            pool_len,
        ) {
            return Err(MemslotError::OverlapsBackend(slot.id));
        }
        let generation = self.memslot_generation();
        self.publish(generation.begin_update());
        let change = match st.slots.set(slot) {
            Ok(c) => c,
            Err(e) => {
                self.publish(generation);
                return Err(e);
            }
        };
        let logs = slot.flags.contains(MemslotFlags::LOG_DIRTY);
        let first = slot.base_gfn();
        let end = Gfn(first.raw() + slot.pages());
        match change {
            MemslotChange::Created => {}
            MemslotChange::Moved { .. } => st.zap_all_pages(),
            MemslotChange::FlagsChanged { old } => {
                let newly_ro = !slot.is_writable() && old.is_writable();
                let newly_logging = logs && !old.flags.contains(MemslotFlags::LOG_DIRTY);
                if newly_ro || newly_logging {
                    st.write_protect_range(first, end);
                }
            }
            MemslotChange::Unchanged => {}
        }
        if logs {
            st.dirty
                .entry(slot.id)
                .or_insert_with(|| DirtyBitmap::new(slot.pages()));
        } else {
            st.dirty.remove(&slot.id);
        }
        st.commit_zap();
        st.counters.memslot_updates += 1;
        tracing::debug!(
            slot = slot.id.0,
            base = slot.guest_base.raw(),
            size = slot.size,
            ?change,
            "memslot set"
        );
        self.publish(generation.finish_update());
        Ok(change)
    }

    fn delete_memslot(&self, id: SlotId) -> Result<Memslot, MemslotError> {
        let mut st = self.inner.lock();
        let generation = self.memslot_generation();
        self.publish(generation.begin_update());
        let old = match st.slots.delete(id) {
            Ok(s) => s,
            Err(e) => {
                self.publish(generation);
                return Err(e);
            }
        };
        // As KVM by default: a delete zaps everything.
        st.zap_all_pages();
        st.commit_zap();
        st.dirty.remove(&id);
        st.counters.memslot_updates += 1;
        tracing::debug!(slot = id.0, "memslot deleted");
        self.publish(generation.finish_update());
        Ok(old)
    }

    fn memslots(&self) -> Vec<Memslot> {
        self.inner.lock().slots.iter().copied().collect()
    }

    fn memslot_generation(&self) -> MemslotGeneration {
        MemslotGeneration(self.inner.generation.load(Ordering::Acquire))
    }

    fn zap_all(&self) {
        let mut st = self.inner.lock();
        st.zap_all_pages();
        st.commit_zap();
    }

    fn get_dirty_log(&self, id: SlotId) -> Result<DirtyBitmap, MemslotError> {
        let mut st = self.inner.lock();
        let slot = *st.slots.get(id).ok_or(MemslotError::UnknownSlot(id))?;
        if !slot.flags.contains(MemslotFlags::LOG_DIRTY) {
            return Err(MemslotError::NotLogging(id));
        }
        let harvested = st
            .dirty
            .insert(id, DirtyBitmap::new(slot.pages()))
            .unwrap_or_else(|| DirtyBitmap::new(slot.pages()));
        // The next write to any page of the slot must fault again and be
        // logged: write-protect and flush before returning.
        let first = slot.base_gfn();
        st.write_protect_range(first, Gfn(first.raw() + slot.pages()));
        st.commit_zap();
        st.counters.dirty_harvests += 1;
        Ok(harvested)
    }

    fn note_host_write(&self, gpa: Gpa, len: u64) {
        if len == 0 {
            return;
        }
        let mut st = self.inner.lock();
        let first = gpa.gfn();
        let end = Gfn((gpa.raw().saturating_add(len - 1) >> 12) + 1);
        for g in first.raw()..end.raw() {
            st.mark_dirty(Gfn(g));
        }
        // The host may have rewritten guest page tables: drop their shadows.
        st.zap_shadowed_range(first, end);
        st.commit_zap();
        st.counters.host_writes += 1;
    }

    fn create_vcpu(
        &self,
        id: VcpuId,
        kick: Arc<dyn VcpuKick>,
    ) -> Result<Box<dyn MmuVcpu>, BackendError> {
        Ok(Box::new(self.create_shadow_vcpu(id, kick)?))
    }

    fn stats(&self) -> MmuStats {
        let st = self.inner.lock();
        MmuStats {
            backend: "shadow",
            counters: st.counters.named(st.used_pages()),
        }
    }

    fn page_limit(&self) -> Option<u64> {
        self.inner.lock().page_limit
    }

    fn set_page_limit(&self, pages: Option<u64>) -> Result<(), BackendError> {
        if let Some(n) = pages
            && n < MIN_PAGE_LIMIT
        {
            return Err(BackendError::PageLimitTooLow {
                requested: n,
                minimum: MIN_PAGE_LIMIT,
            });
        }
        let mut st = self.inner.lock();
        st.page_limit = pages;
        st.make_pages_available(1);
        Ok(())
    }
}
