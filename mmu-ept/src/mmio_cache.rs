//! The per-vCPU MMIO classification cache.
//!
//! An MMIO exit gives a guest-physical address; classifying it means
//! searching the memslots. Devices are hit again and again on the same few
//! pages (a NIC's doorbell, a virtio notify register), so each vCPU keeps
//! the answer per guest frame, tagged with the memslot generation it was
//! computed under. An answer is trusted only while that generation is still
//! current and no memslot update is in progress, which is the rule KVM
//! applies to its MMIO SPTEs and per-vCPU MMIO cache.

use mmu_api::{Gfn, MemslotGeneration, MmioClass, SlotId};

/// What the memslots say about one guest frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum FrameKind {
    /// No memslot: device memory.
    Mmio,
    /// Memory of `slot`; `writable` is false for READONLY slots.
    Memory {
        /// The covering slot.
        slot: SlotId,
        /// Guest writes allowed.
        writable: bool,
    },
}

impl FrameKind {
    /// The classification of an access of this direction to the frame.
    pub(crate) fn classify(self, is_write: bool) -> MmioClass {
        match self {
            FrameKind::Mmio => MmioClass::Mmio,
            FrameKind::Memory {
                slot,
                writable: false,
            } if is_write => MmioClass::ReadOnlyWrite { slot },
            FrameKind::Memory { slot, .. } => MmioClass::Memory { slot },
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    gfn: Gfn,
    generation: MemslotGeneration,
    kind: FrameKind,
}

/// A direct-mapped cache of [`FrameKind`] by guest frame. Owned by one vCPU
/// thread, so it needs no lock.
#[derive(Debug)]
pub(crate) struct MmioCache {
    entries: Box<[Option<Entry>]>,
}

impl MmioCache {
    /// A cache of `size` entries (a power of two, or 0 for no cache).
    pub(crate) fn new(size: usize) -> Self {
        debug_assert!(size == 0 || size.is_power_of_two());
        Self {
            entries: vec![None; size].into_boxed_slice(),
        }
    }

    /// True when the cache holds no entries at all (turned off).
    pub(crate) fn is_disabled(&self) -> bool {
        self.entries.is_empty()
    }

    fn index(&self, gfn: Gfn) -> usize {
        // MMIO pages cluster in BARs, so consecutive frames spread over
        // consecutive entries.
        (gfn.raw() as usize) & (self.entries.len() - 1)
    }

    /// The cached kind of `gfn`, if it was computed under `current` and
    /// `current` has no update in progress.
    pub(crate) fn lookup(&self, gfn: Gfn, current: MemslotGeneration) -> Option<FrameKind> {
        if self.is_disabled() || current.update_in_progress() {
            return None;
        }
        match self.entries[self.index(gfn)] {
            Some(e) if e.gfn == gfn && e.generation == current => Some(e.kind),
            _ => None,
        }
    }

    /// Remembers `kind` for `gfn`, computed from the memslots after reading
    /// `generation`. Answers computed during an update are not kept: the
    /// update may change them before it publishes a new generation.
    pub(crate) fn insert(&mut self, gfn: Gfn, generation: MemslotGeneration, kind: FrameKind) {
        if self.is_disabled() || generation.update_in_progress() {
            return;
        }
        let idx = self.index(gfn);
        self.entries[idx] = Some(Entry {
            gfn,
            generation,
            kind,
        });
    }

    /// Forgets everything (zap-all).
    pub(crate) fn clear(&mut self) {
        self.entries.fill(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: MemslotGeneration = MemslotGeneration(7);

    #[test]
    fn hit_only_under_the_same_generation() {
        let mut c = MmioCache::new(8);
        c.insert(Gfn(0x100), G, FrameKind::Mmio);
        assert_eq!(c.lookup(Gfn(0x100), G), Some(FrameKind::Mmio));
        assert_eq!(c.lookup(Gfn(0x101), G), None, "another frame");
        assert_eq!(c.lookup(Gfn(0x100), G.begin_update().finish_update()), None);
    }

    #[test]
    fn update_in_progress_is_never_trusted_nor_cached() {
        let mut c = MmioCache::new(8);
        c.insert(Gfn(1), G, FrameKind::Mmio);
        assert_eq!(c.lookup(Gfn(1), G.begin_update()), None);
        // An answer computed during the update is dropped, even if the
        // caller later compares against the same in-progress value.
        c.insert(Gfn(2), G.begin_update(), FrameKind::Mmio);
        assert_eq!(c.lookup(Gfn(2), G.begin_update()), None);
        assert_eq!(c.lookup(Gfn(2), G), None);
    }

    #[test]
    fn direct_mapped_conflicts_evict_and_size_zero_is_off() {
        let mut c = MmioCache::new(4);
        c.insert(Gfn(1), G, FrameKind::Mmio);
        c.insert(Gfn(5), G, FrameKind::Mmio); // same index as frame 1
        assert_eq!(c.lookup(Gfn(1), G), None);
        assert_eq!(c.lookup(Gfn(5), G), Some(FrameKind::Mmio));
        c.clear();
        assert_eq!(c.lookup(Gfn(5), G), None);
        let mut off = MmioCache::new(0);
        off.insert(Gfn(1), G, FrameKind::Mmio);
        assert_eq!(off.lookup(Gfn(1), G), None);
    }

    #[test]
    fn read_only_frames_classify_by_direction() {
        let ro = FrameKind::Memory {
            slot: SlotId(2),
            writable: false,
        };
        assert_eq!(ro.classify(false), MmioClass::Memory { slot: SlotId(2) });
        assert_eq!(
            ro.classify(true),
            MmioClass::ReadOnlyWrite { slot: SlotId(2) }
        );
        let rw = FrameKind::Memory {
            slot: SlotId(3),
            writable: true,
        };
        assert_eq!(rw.classify(true), MmioClass::Memory { slot: SlotId(3) });
        assert_eq!(FrameKind::Mmio.classify(true), MmioClass::Mmio);
    }
}
