//! Counters that show each mechanism working (KVM: `kvm_vm_stat` and
//! `kvm_vcpu_stat`).

use std::sync::atomic::{AtomicU64, Ordering};

/// The backend's counters (behind the MMU lock).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Counters {
    pub(crate) faults: u64,
    pub(crate) faults_fixed: u64,
    pub(crate) faults_fixed_shared: u64,
    pub(crate) faults_injected: u64,
    pub(crate) faults_mmio: u64,
    pub(crate) write_protect_hits: u64,
    pub(crate) emulated_writes: u64,
    pub(crate) flooding_zaps: u64,
    pub(crate) prefetched: u64,
    pub(crate) sps_allocated: u64,
    pub(crate) sps_zapped: u64,
    pub(crate) sps_freed: u64,
    pub(crate) reclaimed_valid: u64,
    pub(crate) reclaimed_leaf_pages: u64,
    pub(crate) reclaimed_directory_pages: u64,
    pub(crate) valid_reclaimed_with_obsolete_pending: u64,
    pub(crate) fast_zaps: u64,
    pub(crate) naive_zaps: u64,
    pub(crate) obsolete_zapped: u64,
    pub(crate) obsolete_reused: u64,
    pub(crate) obsolete_freed: u64,
    pub(crate) mmio_sptes: u64,
    pub(crate) mmio_fast_hits: u64,
    pub(crate) mmio_stale: u64,
    pub(crate) generation_wraps: u64,
    pub(crate) pages_over_limit_max: u64,
    pub(crate) zap_all: u64,
    pub(crate) remote_flushes: u64,
    pub(crate) root_loads: u64,
    pub(crate) root_cache_hits: u64,
    pub(crate) memslot_updates: u64,
    pub(crate) dirty_pages_logged: u64,
    pub(crate) dirty_harvests: u64,
    pub(crate) host_writes: u64,
    pub(crate) replays: u64,
    pub(crate) replayed_entries: u64,
    pub(crate) replayed_frames: u64,
    pub(crate) fault_walk_retries: u64,
}

/// The counters a vCPU bumps on its fault path: its lock-free parts and
/// what it does holding the MMU lock shared. Only the vCPU's own thread
/// writes them, on its own cache lines, so vCPUs faulting side by side
/// write no counter line in common; [`stats`](mmu_api::MmuBackend::stats)
/// sums them.
#[derive(Debug, Default)]
pub(crate) struct LocalCounters {
    pub(crate) faults: AtomicU64,
    /// Bumped under the MMU lock, but kept here so the fault path writes no
    /// shared line it does not need.
    pub(crate) faults_fixed: AtomicU64,
    /// Of those, fixed holding the MMU lock shared.
    pub(crate) faults_fixed_shared: AtomicU64,
    pub(crate) faults_injected: AtomicU64,
    pub(crate) faults_mmio: AtomicU64,
    pub(crate) mmio_fast_hits: AtomicU64,
    pub(crate) mmio_stale: AtomicU64,
    /// Lock-free work thrown away because the invalidation count moved.
    pub(crate) lockless_retries: AtomicU64,
    /// SPTEs prefetched by faults holding the MMU lock shared.
    pub(crate) prefetched: AtomicU64,
}

impl LocalCounters {
    /// Adds one (single writer: no read-modify-write needed).
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.store(counter.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }

    /// Adds these counters to `total`.
    pub(crate) fn add_to(&self, total: &mut Counters) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        total.faults += get(&self.faults);
        total.faults_fixed += get(&self.faults_fixed);
        total.faults_fixed_shared += get(&self.faults_fixed_shared);
        total.faults_injected += get(&self.faults_injected);
        total.faults_mmio += get(&self.faults_mmio);
        total.mmio_fast_hits += get(&self.mmio_fast_hits);
        total.mmio_stale += get(&self.mmio_stale);
        total.fault_walk_retries += get(&self.lockless_retries);
        total.prefetched += get(&self.prefetched);
    }
}

impl Counters {
    /// Name and value of each counter, in a stable order.
    pub(crate) fn named(&self, used: u64, obsolete_pending: u64) -> Vec<(&'static str, u64)> {
        vec![
            ("faults", self.faults),
            ("faults_fixed", self.faults_fixed),
            ("faults_fixed_shared", self.faults_fixed_shared),
            ("faults_injected", self.faults_injected),
            ("faults_mmio", self.faults_mmio),
            ("write_protect_hits", self.write_protect_hits),
            ("emulated_writes", self.emulated_writes),
            ("flooding_zaps", self.flooding_zaps),
            ("prefetched_sptes", self.prefetched),
            ("sps_allocated", self.sps_allocated),
            ("sps_zapped", self.sps_zapped),
            ("sps_freed", self.sps_freed),
            ("sps_in_use", used),
            ("reclaimed_valid", self.reclaimed_valid),
            ("reclaimed_leaf_pages", self.reclaimed_leaf_pages),
            ("reclaimed_directory_pages", self.reclaimed_directory_pages),
            (
                "valid_reclaimed_with_obsolete_pending",
                self.valid_reclaimed_with_obsolete_pending,
            ),
            ("fast_zaps", self.fast_zaps),
            ("naive_zaps", self.naive_zaps),
            ("obsolete_pending", obsolete_pending),
            ("obsolete_zapped", self.obsolete_zapped),
            ("obsolete_reused", self.obsolete_reused),
            ("obsolete_freed", self.obsolete_freed),
            ("mmio_sptes", self.mmio_sptes),
            ("mmio_fast_hits", self.mmio_fast_hits),
            ("mmio_stale", self.mmio_stale),
            ("generation_wraps", self.generation_wraps),
            ("pages_over_limit_max", self.pages_over_limit_max),
            ("zap_all", self.zap_all),
            ("remote_flushes", self.remote_flushes),
            ("root_loads", self.root_loads),
            ("root_cache_hits", self.root_cache_hits),
            ("memslot_updates", self.memslot_updates),
            ("dirty_pages_logged", self.dirty_pages_logged),
            ("dirty_harvests", self.dirty_harvests),
            ("host_writes", self.host_writes),
            ("replays", self.replays),
            ("replayed_entries", self.replayed_entries),
            ("replayed_frames", self.replayed_frames),
            ("fault_walk_retries", self.fault_walk_retries),
        ]
    }
}
