//! Memslots: ranges of guest-physical memory backed by host memory.
//!
//! [`MemslotTable`] holds the validation and lookup every backend needs
//! (alignment, overlap, size, the legal kinds of change), so the two
//! backends cannot disagree about what a valid memslot set is.

use bitflags::bitflags;

use crate::addr::{Gfn, Gpa, Hpa, PAGE_SHIFT, PAGE_SIZE, SlotId};
use crate::error::MemslotError;

bitflags! {
    /// Memslot flags.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct MemslotFlags: u32 {
        /// Guest writes are not allowed: they exit as MMIO writes, and no
        /// SPTE ever maps the slot writable.
        const READONLY = 1 << 0;
        /// Record every page the guest writes, for [`crate::MmuBackend::get_dirty_log`].
        const LOG_DIRTY = 1 << 1;
    }
}

/// A host virtual address: where the VMM reads and writes guest memory.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Debug)]
#[repr(transparent)]
pub struct HostVirtAddr(pub u64);

/// The host memory behind a memslot, seen two ways.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct HostBacking {
    /// Address of the slot's first byte as the hardware walking the tables
    /// sees it (what a leaf SPTE points to).
    pub hpa: Hpa,
    /// Address of the slot's first byte in the VMM's address space.
    pub host_addr: HostVirtAddr,
}

/// One memslot.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[non_exhaustive]
pub struct Memslot {
    /// The VMM's id for the slot.
    pub id: SlotId,
    /// First guest-physical address.
    pub guest_base: Gpa,
    /// Size in bytes (a multiple of 4 KiB, non-zero).
    pub size: u64,
    /// Host memory behind it.
    pub backing: HostBacking,
    /// READONLY, LOG_DIRTY.
    pub flags: MemslotFlags,
}

impl Memslot {
    /// Slot `id`: `size` bytes of guest-physical memory from `guest_base`,
    /// backed by `backing`, with `flags`. Checked when it is added to a
    /// [`MemslotTable`], not here.
    pub const fn new(
        id: SlotId,
        guest_base: Gpa,
        size: u64,
        backing: HostBacking,
        flags: MemslotFlags,
    ) -> Self {
        Self {
            id,
            guest_base,
            size,
            backing,
            flags,
        }
    }

    /// Number of 4 KiB pages.
    pub const fn pages(&self) -> u64 {
        self.size >> PAGE_SHIFT
    }

    /// First frame.
    pub const fn base_gfn(&self) -> Gfn {
        self.guest_base.gfn()
    }

    /// One past the last guest-physical address.
    pub const fn end(&self) -> Gpa {
        Gpa(self.guest_base.raw() + self.size)
    }

    /// True if `gpa` lies inside the slot.
    pub const fn contains(&self, gpa: Gpa) -> bool {
        gpa.raw() >= self.guest_base.raw() && gpa.raw() - self.guest_base.raw() < self.size
    }

    /// Hardware address of `gpa`, which must be inside the slot.
    pub fn hpa_of(&self, gpa: Gpa) -> Option<Hpa> {
        self.contains(gpa)
            .then(|| Hpa(self.backing.hpa.raw() + (gpa.raw() - self.guest_base.raw())))
    }

    /// Host virtual address of `gpa`, which must be inside the slot.
    pub fn host_addr_of(&self, gpa: Gpa) -> Option<HostVirtAddr> {
        self.contains(gpa)
            .then(|| HostVirtAddr(self.backing.host_addr.0 + (gpa.raw() - self.guest_base.raw())))
    }

    /// True if the guest may write through the slot.
    pub const fn is_writable(&self) -> bool {
        !self.flags.contains(MemslotFlags::READONLY)
    }
}

/// What a [`MemslotTable::set`] did, so backends zap what they must.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[non_exhaustive]
pub enum MemslotChange {
    /// A new slot.
    Created,
    /// An existing slot moved to a new guest base; the old placement is
    /// given. Every translation of the old range must go.
    Moved {
        /// The slot as it was.
        old: Memslot,
    },
    /// Only the flags changed.
    FlagsChanged {
        /// The slot as it was.
        old: Memslot,
    },
    /// Nothing changed.
    Unchanged,
}

/// The memslot generation, with KVM's update-in-progress bit.
///
/// The low 63 bits count completed updates. Bit 63 is set while an update
/// is being applied: a cached MMIO answer tagged with a generation that has
/// the bit set must never be trusted, and the bit is never stored in an SPTE.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
#[repr(transparent)]
pub struct MemslotGeneration(pub u64);

impl MemslotGeneration {
    /// Bit 63: an update is in progress.
    pub const UPDATE_IN_PROGRESS: u64 = 1 << 63;

    /// The count of completed updates (without the in-progress bit).
    pub const fn count(self) -> u64 {
        self.0 & !Self::UPDATE_IN_PROGRESS
    }

    /// True while an update is being applied.
    pub const fn update_in_progress(self) -> bool {
        self.0 & Self::UPDATE_IN_PROGRESS != 0
    }

    /// The generation to publish when an update starts.
    pub const fn begin_update(self) -> Self {
        Self(self.0 | Self::UPDATE_IN_PROGRESS)
    }

    /// The generation to publish when the update is complete: the count
    /// advances and the in-progress bit clears.
    pub const fn finish_update(self) -> Self {
        Self(self.count().wrapping_add(1) & !Self::UPDATE_IN_PROGRESS)
    }
}

/// KVM's limit on user memslots per address space.
pub const DEFAULT_MAX_SLOTS: usize = 32764;

/// A validated, sorted set of memslots with lookup by address.
#[derive(Clone, Debug)]
pub struct MemslotTable {
    /// Sorted by guest base; never overlapping.
    slots: Vec<Memslot>,
    gpa_width: u8,
    max_slots: usize,
}

impl MemslotTable {
    /// An empty table for a guest-physical space of `gpa_width` bits
    /// (clamped to 32..=52) holding at most `max_slots` slots.
    pub fn new(gpa_width: u8, max_slots: usize) -> Self {
        Self {
            slots: Vec::new(),
            gpa_width: gpa_width.clamp(32, 52),
            max_slots,
        }
    }

    /// The guest-physical address width in bits.
    pub fn gpa_width(&self) -> u8 {
        self.gpa_width
    }

    /// Validates `slot` on its own (alignment, size, backing).
    pub fn check_shape(&self, slot: &Memslot) -> Result<(), MemslotError> {
        let id = slot.id;
        if slot.size == 0 {
            return Err(MemslotError::ZeroSize(id));
        }
        let aligned = |v: u64| v.is_multiple_of(PAGE_SIZE);
        if !aligned(slot.guest_base.raw())
            || !aligned(slot.size)
            || !aligned(slot.backing.hpa.raw())
            || !aligned(slot.backing.host_addr.0)
        {
            return Err(MemslotError::Unaligned(id));
        }
        let limit = 1u64 << self.gpa_width;
        let end = slot.guest_base.raw().saturating_add(slot.size);
        if end > limit {
            return Err(MemslotError::TooLarge {
                slot: id,
                end,
                width: self.gpa_width,
            });
        }
        if slot.backing.host_addr.0 == 0
            || slot.backing.hpa.raw().checked_add(slot.size).is_none()
            || slot.backing.host_addr.0.checked_add(slot.size).is_none()
        {
            return Err(MemslotError::InvalidBacking(id));
        }
        Ok(())
    }

    /// Adds a slot, or changes an existing one (same id) by moving it or
    /// changing its flags. Changing size or backing of a live slot is
    /// refused, as KVM refuses it: delete and re-add instead.
    pub fn set(&mut self, slot: Memslot) -> Result<MemslotChange, MemslotError> {
        self.check_shape(&slot)?;
        let existing = self.get(slot.id).copied();
        if let Some(old) = existing {
            if old.size != slot.size || old.backing != slot.backing {
                return Err(MemslotError::IllegalChange(slot.id));
            }
            if old == slot {
                return Ok(MemslotChange::Unchanged);
            }
            if old.guest_base != slot.guest_base && old.flags != slot.flags {
                return Err(MemslotError::IllegalChange(slot.id));
            }
        } else if self.slots.len() >= self.max_slots {
            return Err(MemslotError::TooManySlots(self.max_slots));
        }
        if let Some(other) = self
            .slots
            .iter()
            .find(|s| s.id != slot.id && s.guest_base < slot.end() && slot.guest_base < s.end())
        {
            return Err(MemslotError::Overlap {
                slot: slot.id,
                other: other.id,
                at: Gpa(slot.guest_base.raw().max(other.guest_base.raw())),
            });
        }
        self.slots.retain(|s| s.id != slot.id);
        let pos = self
            .slots
            .partition_point(|s| s.guest_base < slot.guest_base);
        self.slots.insert(pos, slot);
        Ok(match existing {
            None => MemslotChange::Created,
            Some(old) if old.guest_base != slot.guest_base => MemslotChange::Moved { old },
            Some(old) => MemslotChange::FlagsChanged { old },
        })
    }

    /// Removes slot `id` and returns it.
    pub fn delete(&mut self, id: SlotId) -> Result<Memslot, MemslotError> {
        let pos = self
            .slots
            .iter()
            .position(|s| s.id == id)
            .ok_or(MemslotError::UnknownSlot(id))?;
        Ok(self.slots.remove(pos))
    }

    /// The slot with this id.
    pub fn get(&self, id: SlotId) -> Option<&Memslot> {
        self.slots.iter().find(|s| s.id == id)
    }

    /// The slot containing `gpa` (binary search).
    pub fn find(&self, gpa: Gpa) -> Option<&Memslot> {
        let pos = self.slots.partition_point(|s| s.guest_base <= gpa);
        let slot = self.slots.get(pos.checked_sub(1)?)?;
        slot.contains(gpa).then_some(slot)
    }

    /// The slot containing frame `gfn`.
    pub fn find_gfn(&self, gfn: Gfn) -> Option<&Memslot> {
        self.find(gfn.gpa())
    }

    /// All slots, sorted by guest base.
    pub fn iter(&self) -> impl Iterator<Item = &Memslot> {
        self.slots.iter()
    }

    /// Number of slots.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// True if there is no slot.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

/// A dirty bitmap for one memslot: bit `i` is page `i` of the slot, in
/// 64-bit words, the layout KVM's `KVM_GET_DIRTY_LOG` uses.
#[derive(Clone, PartialEq, Eq, Hash, Debug, Default)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    pages: u64,
}

impl DirtyBitmap {
    /// A clean bitmap for `pages` pages.
    pub fn new(pages: u64) -> Self {
        Self {
            words: vec![0; pages.div_ceil(64) as usize],
            pages,
        }
    }

    /// A bitmap from KVM-layout words.
    pub fn from_words(pages: u64, mut words: Vec<u64>) -> Self {
        words.resize(pages.div_ceil(64) as usize, 0);
        if !pages.is_multiple_of(64)
            && let Some(last) = words.last_mut()
        {
            *last &= (1u64 << (pages % 64)) - 1;
        }
        Self { words, pages }
    }

    /// Number of pages covered.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Marks page `page` dirty; out-of-range pages are ignored.
    pub fn set(&mut self, page: u64) {
        if page < self.pages {
            self.words[(page / 64) as usize] |= 1 << (page % 64);
        }
    }

    /// True if page `page` is dirty.
    pub fn is_dirty(&self, page: u64) -> bool {
        page < self.pages && self.words[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// ORs `other` into `self` (both must cover the same slot).
    pub fn merge(&mut self, other: &DirtyBitmap) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= *b;
        }
    }

    /// The dirty page indices, ascending.
    pub fn iter_dirty(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let mut w = w;
            core::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let bit = w.trailing_zeros();
                w &= w - 1;
                Some(i as u64 * 64 + u64::from(bit))
            })
        })
    }

    /// The raw words.
    pub fn words(&self) -> &[u64] {
        &self.words
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(id: u32, base: u64, size: u64) -> Memslot {
        Memslot {
            id: SlotId(id),
            guest_base: Gpa(base),
            size,
            backing: HostBacking {
                hpa: Hpa(0x1_0000_0000 + base),
                host_addr: HostVirtAddr(0x7f00_0000_0000 + base),
            },
            flags: MemslotFlags::empty(),
        }
    }

    #[test]
    fn lookup_finds_the_right_slot() {
        let mut t = MemslotTable::new(46, 8);
        t.set(slot(1, 0x10_0000, 0x1000)).unwrap();
        t.set(slot(0, 0, 0x10_0000)).unwrap();
        assert_eq!(t.find(Gpa(0xfffff)).unwrap().id, SlotId(0));
        assert_eq!(t.find(Gpa(0x10_0fff)).unwrap().id, SlotId(1));
        assert!(t.find(Gpa(0x10_1000)).is_none());
        let s = t.find_gfn(Gfn(0x100)).unwrap();
        assert_eq!(s.hpa_of(Gpa(0x10_0008)), Some(Hpa(0x1_0010_0008)));
    }

    #[test]
    fn bad_slots_get_typed_errors() {
        let mut t = MemslotTable::new(36, 2);
        assert_eq!(t.set(slot(0, 0, 0)), Err(MemslotError::ZeroSize(SlotId(0))));
        assert_eq!(
            t.set(slot(0, 0x800, 0x1000)),
            Err(MemslotError::Unaligned(SlotId(0)))
        );
        assert!(matches!(
            t.set(slot(0, 1 << 36, 0x1000)),
            Err(MemslotError::TooLarge { .. })
        ));
        t.set(slot(0, 0, 0x2000)).unwrap();
        assert_eq!(
            t.set(slot(1, 0x1000, 0x2000)),
            Err(MemslotError::Overlap {
                slot: SlotId(1),
                other: SlotId(0),
                at: Gpa(0x1000)
            })
        );
        t.set(slot(1, 0x2000, 0x1000)).unwrap();
        assert_eq!(
            t.set(slot(2, 0x4000, 0x1000)),
            Err(MemslotError::TooManySlots(2))
        );
        assert_eq!(
            t.delete(SlotId(9)),
            Err(MemslotError::UnknownSlot(SlotId(9)))
        );
        let mut grown = slot(1, 0x2000, 0x2000);
        grown.backing = slot(1, 0x2000, 0x1000).backing;
        assert_eq!(t.set(grown), Err(MemslotError::IllegalChange(SlotId(1))));
    }

    #[test]
    fn move_and_flag_change_are_reported() {
        let mut t = MemslotTable::new(46, 8);
        let s = slot(3, 0x4000, 0x1000);
        assert_eq!(t.set(s), Ok(MemslotChange::Created));
        assert_eq!(t.set(s), Ok(MemslotChange::Unchanged));
        let mut moved = s;
        moved.guest_base = Gpa(0x8000);
        assert_eq!(t.set(moved), Ok(MemslotChange::Moved { old: s }));
        let mut ro = moved;
        ro.flags = MemslotFlags::READONLY;
        assert_eq!(t.set(ro), Ok(MemslotChange::FlagsChanged { old: moved }));
        assert!(!t.find(Gpa(0x8000)).unwrap().is_writable());
        assert!(t.find(Gpa(0x4000)).is_none());
    }

    #[test]
    fn generation_in_progress_bit() {
        let g = MemslotGeneration(41);
        let busy = g.begin_update();
        assert!(busy.update_in_progress());
        assert_eq!(busy.count(), 41);
        let done = busy.finish_update();
        assert_eq!(done, MemslotGeneration(42));
        assert!(!done.update_in_progress());
    }

    #[test]
    fn dirty_bitmap_ops() {
        let mut b = DirtyBitmap::new(70);
        b.set(0);
        b.set(65);
        b.set(70); // ignored
        assert_eq!(b.count(), 2);
        assert_eq!(b.iter_dirty().collect::<Vec<_>>(), vec![0, 65]);
        let other = DirtyBitmap::from_words(70, vec![0b10, u64::MAX]);
        b.merge(&other);
        assert_eq!(b.count(), 1 + 1 + 6);
        assert!(b.is_dirty(69) && !b.is_dirty(70));
    }
}
