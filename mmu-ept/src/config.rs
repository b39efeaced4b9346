//! Per-VM configuration of the EPT backend.

use mmu_api::{DEFAULT_MAX_SLOTS, paging::MAX_MAXPHYADDR};

/// The largest per-vCPU cache the backend builds; bigger requests are
/// clamped, so a typo in a configuration cannot eat the host's memory.
pub const MAX_CACHE_ENTRIES: usize = 1 << 16;

/// How one VM's EPT backend is set up. Start from [`Default`] and change
/// fields.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct EptConfig {
    /// Guest-physical address width (the vCPUs' MAXPHYADDR) that memslots
    /// must fit in; clamped to 32..=52.
    pub gpa_width: u8,
    /// Most memslots the VM may hold (KVM's per-address-space limit by
    /// default).
    pub max_slots: usize,
    /// Entries in each vCPU's MMIO classification cache (direct-mapped by
    /// guest frame, rounded up to a power of two). Zero turns the cache off:
    /// every MMIO exit searches the memslots, the "before" of a bench.
    pub mmio_cache_entries: usize,
    /// Entries in each vCPU's software TLB (direct-mapped by linear page,
    /// rounded up to a power of two). Zero turns it off: every translation
    /// walks the guest's tables (each walk counts as a TLB miss).
    pub tlb_entries: usize,
}

impl Default for EptConfig {
    fn default() -> Self {
        Self {
            gpa_width: MAX_MAXPHYADDR,
            max_slots: DEFAULT_MAX_SLOTS,
            mmio_cache_entries: 256,
            tlb_entries: 64,
        }
    }
}

impl EptConfig {
    /// The same configuration with the MMIO cache on (default size) or off.
    pub fn with_mmio_cache(mut self, on: bool) -> Self {
        self.mmio_cache_entries = if on {
            Self::default().mmio_cache_entries
        } else {
            0
        };
        self
    }
}

/// The size a per-vCPU cache really gets: 0 stays 0 (off), anything else
/// becomes the next power of two, at most [`MAX_CACHE_ENTRIES`].
pub(crate) fn cache_size(requested: usize) -> usize {
    match requested {
        0 => 0,
        n => n.min(MAX_CACHE_ENTRIES).next_power_of_two(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_sizes_round_up_and_clamp() {
        assert_eq!(cache_size(0), 0);
        assert_eq!(cache_size(1), 1);
        assert_eq!(cache_size(3), 4);
        assert_eq!(cache_size(64), 64);
        assert_eq!(cache_size(usize::MAX), MAX_CACHE_ENTRIES);
    }

    #[test]
    fn mmio_cache_switch() {
        let off = EptConfig::default().with_mmio_cache(false);
        assert_eq!(off.mmio_cache_entries, 0);
        assert_eq!(off.with_mmio_cache(true), EptConfig::default());
    }
}
