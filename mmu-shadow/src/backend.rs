//! The `MmuBackend` implementation: memslots, dirty logs, zap-all, vCPUs
//! (KVM: kvm_main.c's `kvm_set_memory_region`, `kvm_get_dirty_log_protect`,
//! and the VM-wide half of mmu.c).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use mmu_api::{
    BackendError, DirtyBitmap, Gfn, Gpa, Gva, HostVirtAddr, Hpa, Memslot, MemslotChange,
    MemslotError, MemslotFlags, MemslotGeneration, MmuBackend, MmuStats, MmuVcpu, PAGE_SIZE,
    SlotId, VcpuId, VcpuKick,
};

use crate::lock::{ExclusiveGuard, MmuLock, SharedGuard};
use crate::memslots::{DirtyLog, Memslots};
use crate::pool::{PoolError, PoolMem, ShadowPool};
use crate::spte::mmio;
use crate::state::MmuState;
use crate::vcpu::Requests;
use crate::vcpu::{ShadowVcpu, VcpuShared};
use crate::{Coherence, ShadowConfig, ZapMode};

/// The smallest page limit the backend accepts: enough for one 5-level
/// path plus its root, twice over.
pub const MIN_PAGE_LIMIT: u64 = 12;

/// State shared by the backend and its vCPUs.
#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) config: ShadowConfig,
    state: MmuLock,
    generation: AtomicU64,
    /// The pool's memory, for lock-free readers.
    pub(crate) pool: Arc<PoolMem>,
    /// The memslot snapshot, for lock-free readers.
    pub(crate) memslots: Arc<Memslots>,
    /// KVM's `mmu_invalidate_seq` ([`MmuState::invalidate_seq`]).
    pub(crate) invalidate_seq: Arc<AtomicU64>,
    /// Serializes zap-alls and memslot updates, whose reload handshake runs
    /// without the MMU lock.
    zap_serial: Mutex<()>,
}

impl Inner {
    /// Takes the MMU lock exclusively ([`MmuLock::lock`]).
    pub(crate) fn lock(&self) -> ExclusiveGuard<'_> {
        self.state.lock()
    }

    /// Takes the MMU lock shared for `vcpu` on its own thread, or `None`
    /// if it is held or wanted exclusively ([`MmuLock::read`]).
    pub(crate) fn read<'a>(&'a self, vcpu: &'a VcpuShared) -> Option<SharedGuard<'a>> {
        self.state.read(vcpu)
    }

    /// The published memslot generation.
    pub(crate) fn generation(&self) -> MemslotGeneration {
        MemslotGeneration(self.generation.load(Ordering::Acquire))
    }

    /// Generation bits in MMIO SPTEs, or `None` when MMIO caching is off.
    pub(crate) fn mmio_bits(&self) -> Option<u8> {
        self.config
            .mmio_caching
            .then_some(self.config.mmio_gen_bits)
    }

    /// Drops every translation: fast (generation bump, reload handshake
    /// without the lock, obsolete pages reclaimed later) or naive (zap and
    /// flush everything). The caller holds `zap_serial`.
    fn zap_all_locked_out(&self) {
        self.zap_all_then(self.lock(), |_| ());
    }

    /// As [`zap_all_locked_out`](Self::zap_all_locked_out), starting in the
    /// caller's critical section, and running `then` in it once every vCPU
    /// has been asked to reload or flush. A memslot change publishes its new
    /// snapshot there: a vCPU that sees the new memslots also sees the
    /// request, so it cannot enter with a translation through a slot that
    /// is gone, and no audit sees valid pages for it. The lock is dropped
    /// before any vCPU is waited for.
    fn zap_all_then<R>(
        &self,
        mut st: ExclusiveGuard<'_>,
        then: impl FnOnce(&mut MmuState) -> R,
    ) -> R {
        match self.config.zap {
            ZapMode::Fast => {
                let (vcpus, generation) = st.begin_fast_zap();
                let result = then(&mut st);
                drop(st);
                for v in vcpus {
                    v.wait_out_of_guest_or_ack(Requests::RELOAD_ROOT);
                }
                self.lock().finish_fast_zap(generation);
                result
            }
            ZapMode::Naive => {
                let flush = st.zap_all_pages();
                let commit = st.prepare_commit(flush);
                let result = then(&mut st);
                drop(st);
                self.finish_commit(commit);
                result
            }
        }
    }

    fn serial(&self) -> MutexGuard<'_, ()> {
        self.zap_serial.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets a vCPU that went away: its roots are released and its
    /// counters kept.
    pub(crate) fn remove_vcpu(&self, vcpu: &VcpuShared) {
        self.with_mmu(|st| {
            st.vcpus.retain(|v| v.id != vcpu.id);
            vcpu.stats.add_to(&mut st.counters);
            let mut flush = crate::zap::Flush::NONE;
            if let Some(cache) = st.roots.remove(&vcpu.id) {
                for e in cache.entries {
                    flush |= st.put_root(e.frame);
                }
            }
            ((), flush)
        });
    }

    /// Where the host window is, under [`Coherence::Replay`].
    pub(crate) fn window_gva(&self) -> Option<Gva> {
        match self.config.coherence {
            Coherence::Replay { window } => Some(window),
            Coherence::Direct => None,
        }
    }

    /// Finds or builds the root for `ctx` and makes it `vcpu`'s current
    /// root; reclaim, if the page limit needs it, is committed first.
    pub(crate) fn resolve_root(
        &self,
        vcpu: VcpuId,
        ctx: &mmu_api::PagingContext,
    ) -> Result<crate::pool::FrameId, mmu_api::VcpuError> {
        let mut reclaim = true;
        loop {
            if let Some(frame) = self.with_mmu(|st| st.resolve_root(vcpu, ctx, reclaim))? {
                return Ok(frame);
            }
            reclaim = false;
        }
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
        if !(1..=mmio::MAX_GEN_BITS).contains(&config.mmio_gen_bits) {
            return Err(PoolError::Config("MMIO generation bits must be 1 to 19"));
        }
        if !(32..=52).contains(&config.host_maxphyaddr) {
            return Err(PoolError::Config("host MAXPHYADDR must be 32 to 52"));
        }
        if config.mmio_caching && config.host_maxphyaddr > 51 {
            return Err(PoolError::Config(
                "MMIO caching needs a reserved address bit: host MAXPHYADDR at most 51",
            ));
        }
        let pool_end = config
            .pool_hpa
            .raw()
            .checked_add(u64::from(config.pool_pages) * PAGE_SIZE);
        if pool_end.is_none_or(|end| end > 1u64 << config.host_maxphyaddr) {
            return Err(PoolError::Base(config.pool_hpa));
        }
        let pool = ShadowPool::new(config.pool_pages, config.pool_hpa)?;
        let mut state = MmuState::new(&config, pool);
        if let Coherence::Replay { window } = config.coherence {
            let canonical = ((window.raw() as i64) << 16 >> 16) as u64 == window.raw();
            let aligned = window.raw() & ((1u64 << 39) - 1) == 0;
            if !canonical || !aligned || (window.raw() >> 39) & 0x1ff == 0 {
                return Err(PoolError::Config(
                    "the host window must be canonical, 512 GiB aligned and not in the first 512 GiB",
                ));
            }
            if u64::from(config.pool_pages) > 512 * 512 {
                return Err(PoolError::Config("a replayed pool holds at most 1 GiB"));
            }
            state
                .build_host_window(window)
                .map_err(|_| PoolError::Config("the pool is too small for its host window"))?;
        }
        Ok(ShadowBackend {
            inner: Arc::new(Inner {
                config,
                pool: state.pool.mem().clone(),
                memslots: state.memslots.clone(),
                invalidate_seq: state.invalidate_seq.clone(),
                state: MmuLock::new(state),
                generation: AtomicU64::new(0),
                zap_serial: Mutex::new(()),
            }),
        })
    }

    /// How this backend was built.
    pub fn config(&self) -> &ShadowConfig {
        &self.inner.config
    }

    /// The pool's host mapping, size, and the address the hardware sees it
    /// at: what a VMM registers with the hypervisor so the hardware can walk
    /// the shadow tables.
    pub fn pool_region(&self) -> (HostVirtAddr, u64, Hpa) {
        let (host, size) = self.inner.pool.host_region();
        (host, size, self.inner.pool.hpa_base())
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
            reading: Default::default(),
            kick,
            stats: Default::default(),
        });
        st.register_vcpu(shared.clone());
        Ok(ShadowVcpu::new(shared, self.inner.clone()))
    }

    fn publish(&self, generation: MemslotGeneration) {
        self.inner.generation.store(generation.0, Ordering::Release);
    }

    /// What a host that shadows the pool itself must be told, for
    /// [`Coherence::Replay`]: every present SPTE removed, narrowed or
    /// retargeted, and every zapped frame, since the last call, as
    /// addresses in the host window. The guest kit's CPL0 code re-asserts
    /// each entry's current value (a compare-and-exchange of the value with
    /// itself) and rewrites the first two bytes of each frame (a write KVM
    /// takes as misaligned, so it drops its whole shadow of the page),
    /// before CPL3 code runs again. A zapped frame is not reused until
    /// [`replay_done`](Self::replay_done) confirms a batch carrying it; a
    /// host with several vCPUs that each replay confirms the oldest batch
    /// all of them finished. Empty under [`Coherence::Direct`].
    pub fn take_replay(&self) -> ReplayBatch {
        let mut st = self.inner.lock();
        let Some(window) = st.window else {
            return ReplayBatch::default();
        };
        let batch = st.pool.take_journal();
        let base = window.gva.raw();
        let replay = ReplayBatch {
            epoch: batch.epoch,
            entries: batch
                .entries
                .into_iter()
                .map(|(frame, index)| Gva(base + u64::from(frame) * PAGE_SIZE + index as u64 * 8))
                .collect(),
            frames: batch
                .frames
                .into_iter()
                .map(|frame| Gva(base + u64::from(frame) * PAGE_SIZE))
                .collect(),
        };
        if !replay.is_empty() {
            st.counters.replays += 1;
            st.counters.replayed_entries += replay.entries.len() as u64;
            st.counters.replayed_frames += replay.frames.len() as u64;
        }
        replay
    }

    /// The host has acted on every [`take_replay`](Self::take_replay) batch
    /// up to `epoch`: the frames they carried can be reused.
    pub fn replay_done(&self, epoch: u64) {
        self.inner.lock().pool.confirm(epoch);
    }

    /// Zaps every obsolete page no vCPU can reach, in batches of
    /// `zap_batch` with the MMU lock dropped between batches, oldest first,
    /// and returns their frames to the pool. This is the on-demand
    /// reclaimer; allocation also takes obsolete pages first by itself.
    /// Returns the number of obsolete pages zapped.
    pub fn reclaim_obsolete(&self) -> u64 {
        let mut total = 0;
        loop {
            let mut st = self.inner.lock();
            let batch = st.zap_batch;
            let n = st.zap_obsolete_batch(batch);
            st.free_zapped_obsolete();
            drop(st);
            if n == 0 {
                return total;
            }
            total += n as u64;
            std::thread::yield_now();
        }
    }

    /// Publishes the end of a memslot update. When the generation bits MMIO
    /// SPTEs carry wrap around, every MMIO SPTE is dropped first (a zap-all,
    /// as KVM does), so no old SPTE can match a new generation.
    fn finish_update(&self, generation: MemslotGeneration) {
        let next = generation.finish_update();
        if let Some(bits) = self.inner.mmio_bits()
            && mmio::tag(next.count(), bits) == 0
        {
            self.inner.lock().counters.generation_wraps += 1;
            tracing::debug!(generation = next.count(), "MMIO generation wrapped");
            self.inner.zap_all_locked_out();
        }
        self.publish(next);
    }
}

/// One [`ShadowBackend::take_replay`] batch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplayBatch {
    /// Its number (0 for an empty batch); pass it to
    /// [`ShadowBackend::replay_done`] once the host acted on it.
    pub epoch: u64,
    /// Entries to re-assert, by their address in the host window.
    pub entries: Vec<Gva>,
    /// Zapped frames, by the address of their first byte in the host
    /// window.
    pub frames: Vec<Gva>,
}

impl ReplayBatch {
    /// Nothing to tell the host.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.frames.is_empty()
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
        let _serial = self.inner.serial();
        let host_limit = 1u64 << self.inner.config.host_maxphyaddr;
        if slot.backing.hpa.raw().saturating_add(slot.size) > host_limit {
            return Err(MemslotError::InvalidBacking(slot.id));
        }
        let pool_len = u64::from(self.inner.pool.capacity()) * PAGE_SIZE;
        if ranges_overlap(
            slot.backing.hpa.raw(),
            slot.size,
            self.inner.pool.hpa_base().raw(),
            pool_len,
        ) {
            return Err(MemslotError::OverlapsBackend(slot.id));
        }
        let mut st = self.inner.lock();
        let generation = self.memslot_generation();
        self.publish(generation.begin_update());
        let mut slots = (*st.slots).clone();
        let change = match slots.table.set(slot) {
            Ok(c) => c,
            Err(e) => {
                drop(st);
                self.publish(generation);
                return Err(e);
            }
        };
        let logs = slot.flags.contains(MemslotFlags::LOG_DIRTY);
        if logs {
            slots
                .dirty
                .entry(slot.id)
                .or_insert_with(|| Arc::new(DirtyLog::new(slot.pages())));
        } else {
            slots.dirty.remove(&slot.id);
        }
        let first = slot.base_gfn();
        let end = Gfn(first.raw() + slot.pages());
        let mut zap = false;
        let mut flush = crate::zap::Flush::NONE;
        st.counters.memslot_updates += 1;
        match change {
            // MMIO SPTEs for the new range carry an older generation: they
            // miss from now on, with no zap. Window leaves carry none.
            MemslotChange::Created => flush |= st.zap_window_range(first, end),
            MemslotChange::Moved { .. } => zap = true,
            MemslotChange::FlagsChanged { old } => {
                let newly_ro = !slot.is_writable() && old.is_writable();
                let newly_logging = logs && !old.flags.contains(MemslotFlags::LOG_DIRTY);
                if newly_ro || newly_logging {
                    flush |= st.write_protect_range(first, end);
                }
            }
            MemslotChange::Unchanged => {}
            // A change this backend does not know: zap, the safe answer.
            _ => zap = true,
        }
        let old = if zap {
            self.inner.zap_all_then(st, |st| st.publish_slots(slots))
        } else {
            let old = st.publish_slots(slots);
            let commit = st.prepare_commit(flush);
            drop(st);
            self.inner.finish_commit(commit);
            old
        };
        // A moved slot's old placement may still be in a lock-free walk.
        Memslots::wait_for_readers(old);
        tracing::debug!(
            slot = slot.id.0,
            base = slot.guest_base.raw(),
            size = slot.size,
            ?change,
            "memslot set"
        );
        self.finish_update(generation);
        Ok(change)
    }

    fn delete_memslot(&self, id: SlotId) -> Result<Memslot, MemslotError> {
        let _serial = self.inner.serial();
        let mut st = self.inner.lock();
        let generation = self.memslot_generation();
        self.publish(generation.begin_update());
        let mut slots = (*st.slots).clone();
        let deleted = match slots.table.delete(id) {
            Ok(s) => s,
            Err(e) => {
                drop(st);
                self.publish(generation);
                return Err(e);
            }
        };
        slots.dirty.remove(&id);
        st.counters.memslot_updates += 1;
        // As KVM by default: a delete zaps everything.
        let old = self.inner.zap_all_then(st, |st| st.publish_slots(slots));
        // The slot's backing stays valid until no lock-free reader can
        // still reach it through the old snapshot.
        Memslots::wait_for_readers(old);
        tracing::debug!(slot = id.0, "memslot deleted");
        self.finish_update(generation);
        Ok(deleted)
    }

    fn memslots(&self) -> Vec<Memslot> {
        self.inner.memslots.load().table.iter().copied().collect()
    }

    fn memslot_generation(&self) -> MemslotGeneration {
        MemslotGeneration(self.inner.generation.load(Ordering::Acquire))
    }

    fn zap_all(&self) {
        let _serial = self.inner.serial();
        self.inner.zap_all_locked_out();
    }

    fn get_dirty_log(&self, id: SlotId) -> Result<DirtyBitmap, MemslotError> {
        self.inner.with_mmu(|st| {
            let Some(slot) = st.slots.table.get(id).copied() else {
                return (Err(MemslotError::UnknownSlot(id)), crate::zap::Flush::NONE);
            };
            let log = st.slots.dirty.get(&id).cloned();
            let Some(log) = log.filter(|_| slot.flags.contains(MemslotFlags::LOG_DIRTY)) else {
                return (Err(MemslotError::NotLogging(id)), crate::zap::Flush::NONE);
            };
            let harvested = log.harvest();
            // The next write to any page of the slot must fault again and be
            // logged: write-protect and flush before returning.
            let first = slot.base_gfn();
            let flush = st.write_protect_range(first, Gfn(first.raw() + slot.pages()));
            st.counters.dirty_harvests += 1;
            (Ok(harvested), flush)
        })
    }

    fn note_host_write(&self, gpa: Gpa, len: u64) {
        if len == 0 {
            return;
        }
        self.inner.with_mmu(|st| {
            let first = gpa.gfn();
            let end = Gfn((gpa.raw().saturating_add(len - 1) >> 12) + 1);
            for g in first.raw()..end.raw() {
                st.mark_dirty(Gfn(g));
            }
            // The host may have rewritten guest page tables: drop their
            // shadows.
            let flush = st.zap_shadowed_range(first, end);
            st.counters.host_writes += 1;
            ((), flush)
        });
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
        let mut total = st.counters.clone();
        for v in &st.vcpus {
            v.stats.add_to(&mut total);
        }
        let mut counters = total.named(st.used_pages(), st.obsolete_pending);
        counters.push(("frames_quarantined", st.pool.quarantined()));
        MmuStats::new("shadow", counters)
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
        self.inner.with_mmu(|st| {
            st.page_limit = pages;
            let (_, flush) = st.make_pages_available(1);
            ((), flush)
        });
        Ok(())
    }
}
