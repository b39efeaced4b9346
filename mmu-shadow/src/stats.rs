//! Counters that show each mechanism working.

/// The backend's counters (behind the MMU lock).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Counters {
    pub(crate) faults: u64,
    pub(crate) faults_fixed: u64,
    pub(crate) faults_injected: u64,
    pub(crate) faults_mmio: u64,
    pub(crate) write_protect_hits: u64,
    pub(crate) emulated_writes: u64,
    pub(crate) flooding_zaps: u64,
    pub(crate) prefetched: u64,
    pub(crate) sps_allocated: u64,
    pub(crate) sps_zapped: u64,
    pub(crate) sps_freed: u64,
    pub(crate) reclaimed: u64,
    pub(crate) pages_over_limit_max: u64,
    pub(crate) zap_all: u64,
    pub(crate) remote_flushes: u64,
    pub(crate) root_loads: u64,
    pub(crate) root_cache_hits: u64,
    pub(crate) memslot_updates: u64,
    pub(crate) dirty_pages_logged: u64,
    pub(crate) dirty_harvests: u64,
    pub(crate) host_writes: u64,
}

impl Counters {
    /// Name and value of each counter, in a stable order.
    pub(crate) fn named(&self, used: u64) -> Vec<(&'static str, u64)> {
        vec![
            ("faults", self.faults),
            ("faults_fixed", self.faults_fixed),
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
            ("reclaimed", self.reclaimed),
            ("pages_over_limit_max", self.pages_over_limit_max),
            ("zap_all", self.zap_all),
            ("remote_flushes", self.remote_flushes),
            ("root_loads", self.root_loads),
            ("root_cache_hits", self.root_cache_hits),
            ("memslot_updates", self.memslot_updates),
            ("dirty_pages_logged", self.dirty_pages_logged),
            ("dirty_harvests", self.dirty_harvests),
            ("host_writes", self.host_writes),
        ]
    }
}
