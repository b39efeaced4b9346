//! Counters: per-vCPU ones that only their vCPU thread writes, and VM-wide
//! ones for operations any thread may make.

use std::sync::atomic::{AtomicU64, Ordering};

/// Adds one to a counter that only the calling thread writes: a plain load
/// and store, no locked read-modify-write on the vCPU's hot path.
fn bump_owned(counter: &AtomicU64) {
    counter.store(counter.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
}

/// The counters of one vCPU. Written by its thread only; read by
/// [`mmu_api::MmuBackend::stats`] from any thread. Aligned to a cache line
/// so vCPUs do not share one.
#[derive(Debug, Default)]
#[repr(align(64))]
pub(crate) struct VcpuCounters {
    pub(crate) mmio_cache_hits: AtomicU64,
    pub(crate) mmio_cache_misses: AtomicU64,
    pub(crate) translations: AtomicU64,
    pub(crate) tlb_hits: AtomicU64,
    pub(crate) tlb_misses: AtomicU64,
    pub(crate) tlb_flushes: AtomicU64,
    pub(crate) page_faults_reflected: AtomicU64,
}

/// One vCPU counter, named.
#[derive(Clone, Copy, Debug)]
pub(crate) enum VcpuCounter {
    MmioCacheHit,
    MmioCacheMiss,
    Translation,
    TlbHit,
    TlbMiss,
    TlbFlush,
    PageFaultReflected,
}

impl VcpuCounters {
    fn cell(&self, which: VcpuCounter) -> &AtomicU64 {
        match which {
            VcpuCounter::MmioCacheHit => &self.mmio_cache_hits,
            VcpuCounter::MmioCacheMiss => &self.mmio_cache_misses,
            VcpuCounter::Translation => &self.translations,
            VcpuCounter::TlbHit => &self.tlb_hits,
            VcpuCounter::TlbMiss => &self.tlb_misses,
            VcpuCounter::TlbFlush => &self.tlb_flushes,
            VcpuCounter::PageFaultReflected => &self.page_faults_reflected,
        }
    }

    /// Counts one event. Only the owning vCPU thread may call this.
    pub(crate) fn bump(&self, which: VcpuCounter) {
        bump_owned(self.cell(which));
    }

    /// Name and value of every counter, in the order stats report them.
    pub(crate) fn snapshot(&self) -> [(&'static str, u64); 7] {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("mmio_cache_hits", get(&self.mmio_cache_hits)),
            ("mmio_cache_misses", get(&self.mmio_cache_misses)),
            ("translations", get(&self.translations)),
            ("tlb_hits", get(&self.tlb_hits)),
            ("tlb_misses", get(&self.tlb_misses)),
            ("tlb_flushes", get(&self.tlb_flushes)),
            ("page_faults_reflected", get(&self.page_faults_reflected)),
        ]
    }
}

/// VM-wide counters.
#[derive(Debug, Default)]
pub(crate) struct VmCounters {
    pub(crate) memslot_updates: AtomicU64,
    pub(crate) dirty_pages_harvested: AtomicU64,
    pub(crate) host_writes_noted: AtomicU64,
    pub(crate) zap_alls: AtomicU64,
}

impl VmCounters {
    /// Adds `n` to a VM-wide counter (any thread).
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Name and value of every counter, in the order stats report them.
    pub(crate) fn snapshot(&self) -> [(&'static str, u64); 4] {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("memslot_updates", get(&self.memslot_updates)),
            ("dirty_pages_harvested", get(&self.dirty_pages_harvested)),
            ("host_writes_noted", get(&self.host_writes_noted)),
            ("zap_alls", get(&self.zap_alls)),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpu_counters_count_each_event_separately() {
        let c = VcpuCounters::default();
        c.bump(VcpuCounter::TlbHit);
        c.bump(VcpuCounter::TlbHit);
        c.bump(VcpuCounter::MmioCacheMiss);
        let snap = c.snapshot();
        assert!(snap.contains(&("tlb_hits", 2)));
        assert!(snap.contains(&("mmio_cache_misses", 1)));
        assert_eq!(snap.iter().map(|(_, v)| v).sum::<u64>(), 3);
    }
}
