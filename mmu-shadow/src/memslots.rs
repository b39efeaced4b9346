//! Memslots as the fault path reads them: an immutable snapshot published
//! RCU-style, so a vCPU walks the guest tables and looks up slots without
//! the MMU lock; and the dirty logs, set with atomic bit operations.
//!
//! KVM: kvm_main.c's `struct kvm_memslots` read under SRCU,
//! `synchronize_srcu_expedited` after a slot goes away, and
//! `mark_page_dirty_in_slot` on the slot's `dirty_bitmap`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use mmu_api::paging::SlotMemory;
use mmu_api::{DirtyBitmap, Gfn, Gpa, Memslot, MemslotFlags, MemslotTable, SlotId};

/// One published state of the memslots and their dirty logs.
#[derive(Clone, Debug)]
pub(crate) struct Slots {
    pub(crate) table: MemslotTable,
    /// The dirty log of each logging slot. A log outlives snapshots: a new
    /// snapshot of a slot that keeps logging shares it.
    pub(crate) dirty: HashMap<SlotId, Arc<DirtyLog>>,
}

impl Slots {
    /// No slots, for guest-physical addresses of `gpa_width` bits.
    pub(crate) fn new(gpa_width: u8) -> Self {
        Slots {
            table: MemslotTable::new(gpa_width, mmu_api::DEFAULT_MAX_SLOTS),
            dirty: HashMap::new(),
        }
    }

    /// The guest memory port over these slots.
    pub(crate) fn guest_mem(&self) -> SlotMemory<'_> {
        // SAFETY: every slot in the table was registered through
        // `MmuBackend::set_memslot`, whose contract keeps its host mapping
        // valid until `delete_memslot` returns; `delete_memslot` waits until
        // no reader holds a snapshot with the slot (`Memslots::wait_for_readers`),
        // and the port borrows this snapshot.
        unsafe { SlotMemory::new(&self.table) }
    }

    /// The slot backing `gpa`.
    pub(crate) fn find(&self, gpa: Gpa) -> Option<Memslot> {
        self.table.find(gpa).copied()
    }

    /// Marks `gfn` dirty in its slot's log, if the slot logs. Returns true
    /// if the page was clean.
    pub(crate) fn mark_dirty(&self, gfn: Gfn) -> bool {
        let Some(slot) = self.table.find_gfn(gfn) else {
            return false;
        };
        if !slot.flags.contains(MemslotFlags::LOG_DIRTY) {
            return false;
        }
        self.dirty
            .get(&slot.id)
            .is_some_and(|log| log.set(gfn.raw() - slot.base_gfn().raw()))
    }

    /// True if `gfn` is logged dirty in its slot.
    pub(crate) fn is_dirty(&self, slot: &Memslot, gfn: Gfn) -> bool {
        self.dirty
            .get(&slot.id)
            .is_some_and(|log| log.is_dirty(gfn.raw() - slot.base_gfn().raw()))
    }
}

/// A dirty log: one bit per page of a slot, set and harvested atomically.
#[derive(Debug)]
pub(crate) struct DirtyLog {
    words: Box<[AtomicU64]>,
    pages: u64,
}

impl DirtyLog {
    /// A clean log for `pages` pages.
    pub(crate) fn new(pages: u64) -> Self {
        DirtyLog {
            words: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            pages,
        }
    }

    /// Marks page `page` dirty; returns true if it was clean.
    pub(crate) fn set(&self, page: u64) -> bool {
        if page >= self.pages {
            return false;
        }
        let bit = 1u64 << (page % 64);
        self.words[(page / 64) as usize].fetch_or(bit, Ordering::AcqRel) & bit == 0
    }

    /// True if page `page` is dirty.
    pub(crate) fn is_dirty(&self, page: u64) -> bool {
        page < self.pages
            && self.words[(page / 64) as usize].load(Ordering::Acquire) & (1 << (page % 64)) != 0
    }

    /// Takes the log, leaving it clean, a word at a time.
    pub(crate) fn harvest(&self) -> DirtyBitmap {
        let words = self
            .words
            .iter()
            .map(|w| w.swap(0, Ordering::AcqRel))
            .collect();
        DirtyBitmap::from_words(self.pages, words)
    }
}

/// The published snapshot.
#[derive(Debug)]
pub(crate) struct Memslots {
    current: ArcSwap<Slots>,
}

impl Memslots {
    /// Publishes `initial`.
    pub(crate) fn new(initial: Arc<Slots>) -> Self {
        Memslots {
            current: ArcSwap::new(initial),
        }
    }

    /// The current snapshot, for a reader that does not hold the MMU lock.
    /// The reader must drop it before it waits for anything.
    pub(crate) fn load(&self) -> arc_swap::Guard<Arc<Slots>> {
        self.current.load()
    }

    /// Publishes `new`; returns the snapshot it replaces.
    pub(crate) fn publish(&self, new: Arc<Slots>) -> Arc<Slots> {
        self.current.swap(new)
    }

    /// Waits until no reader holds `old` any more (a grace period): after
    /// `publish`, every reader of `old` holds a counted reference, so the
    /// count falls to ours alone once the last in-flight reader is done.
    /// Readers never wait while holding a snapshot, so this ends.
    pub(crate) fn wait_for_readers(old: Arc<Slots>) {
        while Arc::strong_count(&old) > 1 {
            std::thread::yield_now();
        }
    }
}
