//! The per-vCPU software TLB used for guest-virtual translation.
//!
//! Instruction emulation translates the same few pages over and over (the
//! instruction's own page, its stack, its operand); a walk costs four or five
//! guest-memory reads. The TLB keeps the outcome of successful walks, as the
//! hardware TLB does, and follows the same rules so that a guest that
//! invalidates correctly can never observe it:
//!
//! - Only walks that set A bits are kept (the hardware caches a translation
//!   only once A is set on every level), so a hit never has to set A.
//! - An entry remembers which accesses (read, write, fetch; user,
//!   supervisor, implicit supervisor) its walk allowed. A hit needs that
//!   very access to have been allowed; anything else walks again, so every
//!   fault is the walker's fault, with its exact error code.
//! - A write through an entry whose leaf was not dirty walks again, so the
//!   guest's D bit gets set, as hardware re-walks to set D.
//! - A translation of a large page is cached per 4 KiB page, but INVLPG of
//!   any address inside the large page drops all of them.
//! - Global entries survive a non-global flush (a CR3 load with CR4.PGE).

use mmu_api::paging::{AccessKind, AccessMode, PteFlags, Translation};
use mmu_api::{Access, Gpa, PAGE_SHIFT, PAGE_SIZE, Rights};

/// The bit of `access` in [`TlbEntry::allowed`].
fn access_bit(access: Access) -> u16 {
    let kind = match access.kind {
        AccessKind::Read => 0,
        AccessKind::Write => 1,
        AccessKind::Fetch => 2,
        // A new kind of access is never cached as allowed.
        _ => return 0,
    };
    let mode = match access.mode {
        AccessMode::User => 0,
        AccessMode::Supervisor => 1,
        AccessMode::ImplicitSupervisor => 2,
        _ => return 0,
    };
    1 << (kind * 3 + mode)
}

/// One cached translation of one 4 KiB linear page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct TlbEntry {
    /// Linear page number (the key).
    vpn: u64,
    /// The guest frame the linear page maps to.
    frame: Gpa,
    /// Linear base of the page the walk mapped (large pages: the whole page).
    page_base: u64,
    /// Size of that page minus one.
    page_mask: u64,
    /// Rights of the whole walk.
    rights: Rights,
    /// The leaf's protection key.
    pkey: Option<u8>,
    /// G in the leaf with CR4.PGE.
    global: bool,
    /// Accesses a walk allowed through this translation.
    allowed: u16,
    /// D was set in the leaf when the entry was filled.
    dirty: bool,
}

impl TlbEntry {
    fn same_translation(&self, other: &TlbEntry) -> bool {
        (
            self.vpn,
            self.frame,
            self.page_base,
            self.page_mask,
            self.rights,
            self.pkey,
            self.global,
        ) == (
            other.vpn,
            other.frame,
            other.page_base,
            other.page_mask,
            other.rights,
            other.pkey,
            other.global,
        )
    }

    fn covers(&self, linear: u64) -> bool {
        linear & !self.page_mask == self.page_base
    }
}

/// What a lookup found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TlbLookup {
    /// The access may use this guest-physical address without a walk.
    Hit(Gpa),
    /// Walk the guest's tables.
    Miss,
}

/// A direct-mapped software TLB keyed by linear page. Owned by one vCPU.
#[derive(Debug)]
pub(crate) struct SoftTlb {
    entries: Box<[Option<TlbEntry>]>,
}

impl SoftTlb {
    /// A TLB of `size` entries (a power of two, or 0 for none).
    pub(crate) fn new(size: usize) -> Self {
        debug_assert!(size == 0 || size.is_power_of_two());
        Self {
            entries: vec![None; size].into_boxed_slice(),
        }
    }

    /// True when the TLB holds no entries at all (turned off).
    pub(crate) fn is_disabled(&self) -> bool {
        self.entries.is_empty()
    }

    fn index(&self, vpn: u64) -> usize {
        (vpn as usize) & (self.entries.len() - 1)
    }

    /// Looks up the translation of `linear` (already reduced to the mode's
    /// linear-address width) for `access`. `sets_dirty` says the caller
    /// wants A/D semantics, so a write through a clean leaf must walk.
    pub(crate) fn lookup(&self, linear: u64, access: Access, sets_dirty: bool) -> TlbLookup {
        if self.is_disabled() {
            return TlbLookup::Miss;
        }
        let vpn = linear >> PAGE_SHIFT;
        match self.entries[self.index(vpn)] {
            Some(e)
                if e.vpn == vpn
                    && e.allowed & access_bit(access) != 0
                    && !(access.is_write() && sets_dirty && !e.dirty) =>
            {
                TlbLookup::Hit(Gpa(e.frame.raw() | (linear & (PAGE_SIZE - 1))))
            }
            _ => TlbLookup::Miss,
        }
    }

    /// Records the successful walk `t` of `linear` for `access`. The caller
    /// only passes walks that set A/D bits.
    pub(crate) fn insert(&mut self, linear: u64, access: Access, t: &Translation) {
        if self.is_disabled() {
            return;
        }
        let vpn = linear >> PAGE_SHIFT;
        let page_mask = t.page_size.bytes() - 1;
        let new = TlbEntry {
            vpn,
            frame: t.gpa.page_base(),
            page_base: linear & !page_mask,
            page_mask,
            rights: t.rights,
            pkey: t.pkey,
            global: t.global,
            allowed: access_bit(access),
            dirty: t.leaf().is_none_or(|s| s.entry.has(PteFlags::DIRTY)),
        };
        let idx = self.index(vpn);
        let slot = &mut self.entries[idx];
        match slot {
            // The same translation seen again (the guest did not change
            // it): it now also allows this access.
            Some(old) if old.same_translation(&new) => {
                old.allowed |= new.allowed;
                old.dirty |= new.dirty;
            }
            _ => *slot = Some(new),
        }
    }

    /// INVLPG: drops every entry for the page that holds `linear`,
    /// global or not, including the 4 KiB pieces of a large page.
    pub(crate) fn invalidate(&mut self, linear: u64) {
        for slot in self.entries.iter_mut() {
            if slot.is_some_and(|e| e.covers(linear)) {
                *slot = None;
            }
        }
    }

    /// Drops non-global entries, and global ones too if `include_global`.
    pub(crate) fn flush(&mut self, include_global: bool) {
        for slot in self.entries.iter_mut() {
            if slot.is_some_and(|e| include_global || !e.global) {
                *slot = None;
            }
        }
    }

    /// Number of entries held (for tests and debugging).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.iter().flatten().count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mmu_api::paging::{Cr4, GuestPhysMemory, SparseMemory, walk};
    use mmu_api::{Gfn, Gva, PagingContext, PagingMode};

    const P: u64 = 1;
    const W: u64 = 2;
    const U: u64 = 4;
    const D: u64 = 0x40;
    const PS: u64 = 0x80;
    const G: u64 = 0x100;

    /// 4-level tables at 0x1000..: gva 0 -> `pte0`, gva 0x1000 -> `pte1`,
    /// and a 2 MiB page at gva 0x20_0000 -> gpa 0x40_0000 with `pde1` flags.
    fn tables(pte0: u64, pte1: u64, pde1: u64) -> SparseMemory {
        let mem = SparseMemory::new();
        for f in 1..=4 {
            mem.add_frame(Gfn(f));
        }
        mem.write_u64(Gpa(0x1000), 0x2000 | P | W | U).unwrap();
        mem.write_u64(Gpa(0x2000), 0x3000 | P | W | U).unwrap();
        mem.write_u64(Gpa(0x3000), 0x4000 | P | W | U).unwrap();
        mem.write_u64(Gpa(0x3008), 0x40_0000 | PS | pde1).unwrap();
        mem.write_u64(Gpa(0x4000), pte0).unwrap();
        mem.write_u64(Gpa(0x4008), pte1).unwrap();
        mem
    }

    fn ctx() -> PagingContext {
        let mut ctx = PagingContext::for_mode(
            PagingMode::Level4,
            0x1000,
            46,
            mmu_api::paging::CpuFeatures::all(),
        )
        .unwrap();
        ctx.cr4 |= Cr4::PGE;
        ctx
    }

    fn read() -> Access {
        Access::supervisor(AccessKind::Read)
    }

    fn write() -> Access {
        Access::supervisor(AccessKind::Write)
    }

    fn cached(tlb: &mut SoftTlb, mem: &SparseMemory, gva: u64, access: Access) {
        let t = walk(&ctx(), mem, Gva(gva), access).unwrap();
        tlb.insert(gva, access, &t);
    }

    #[test]
    fn hit_needs_the_same_access_to_have_been_allowed() {
        let mem = tables(0x9000 | P | W, 0, 0);
        let mut tlb = SoftTlb::new(64);
        cached(&mut tlb, &mem, 0, read());
        assert_eq!(tlb.lookup(0x123, read(), true), TlbLookup::Hit(Gpa(0x9123)));
        assert_eq!(tlb.lookup(0x123, write(), true), TlbLookup::Miss);
        assert_eq!(
            tlb.lookup(0x123, Access::user(AccessKind::Read), true),
            TlbLookup::Miss,
            "a user read was never allowed (U clear)"
        );
        assert_eq!(tlb.lookup(0x1000, read(), true), TlbLookup::Miss);
    }

    #[test]
    fn write_through_clean_leaf_walks_until_dirty() {
        let mem = tables(0x9000 | P | W, 0, 0);
        let mut tlb = SoftTlb::new(64);
        let ro_walk = walk(&ctx(), &mem, Gva(0), read()).unwrap();
        // Pretend the write had been allowed through the read's clean leaf.
        tlb.insert(0, write(), &ro_walk);
        assert_eq!(tlb.lookup(0, write(), true), TlbLookup::Miss, "D not set");
        assert_eq!(
            tlb.lookup(0, write(), false),
            TlbLookup::Hit(Gpa(0x9000)),
            "a debug write sets no D, so the clean entry serves it"
        );
        cached(&mut tlb, &mem, 0, write());
        assert_eq!(mem.read_u64(Gpa(0x4000)).unwrap() & D, D);
        assert_eq!(tlb.lookup(0, write(), true), TlbLookup::Hit(Gpa(0x9000)));
        assert_eq!(tlb.len(), 1, "the dirty walk merged into the entry");
    }

    #[test]
    fn changed_translation_replaces_the_entry() {
        let mem = tables(0x9000 | P | W, 0, 0);
        let mut tlb = SoftTlb::new(64);
        cached(&mut tlb, &mem, 0, write());
        mem.write_u64(Gpa(0x4000), 0xa000 | P).unwrap();
        cached(&mut tlb, &mem, 0, read());
        assert_eq!(tlb.lookup(0, read(), true), TlbLookup::Hit(Gpa(0xa000)));
        assert_eq!(
            tlb.lookup(0, write(), true),
            TlbLookup::Miss,
            "the old entry's write right did not carry over"
        );
    }

    #[test]
    fn invlpg_inside_a_large_page_drops_all_its_pieces() {
        let mem = tables(0x9000 | P, 0xa000 | P, P | W);
        let mut tlb = SoftTlb::new(64);
        for gva in [0x20_0000, 0x20_1000, 0x3f_f000, 0, 0x1000] {
            cached(&mut tlb, &mem, gva, read());
        }
        assert_eq!(
            tlb.lookup(0x3f_f008, read(), true),
            TlbLookup::Hit(Gpa(0x5f_f008))
        );
        tlb.invalidate(0x2a_b123);
        assert_eq!(tlb.len(), 2, "only the two 4 KiB pages are left");
        assert_eq!(tlb.lookup(0x20_0000, read(), true), TlbLookup::Miss);
        tlb.invalidate(0x1fff);
        assert_eq!(tlb.lookup(0x1000, read(), true), TlbLookup::Miss);
        assert_eq!(tlb.lookup(0, read(), true), TlbLookup::Hit(Gpa(0x9000)));
    }

    #[test]
    fn global_entries_survive_non_global_flushes_only() {
        let mem = tables(0x9000 | P | G, 0xa000 | P, 0);
        let mut tlb = SoftTlb::new(64);
        cached(&mut tlb, &mem, 0, read());
        cached(&mut tlb, &mem, 0x1000, read());
        tlb.flush(false);
        assert_eq!(tlb.lookup(0, read(), true), TlbLookup::Hit(Gpa(0x9000)));
        assert_eq!(tlb.lookup(0x1000, read(), true), TlbLookup::Miss);
        tlb.invalidate(0);
        assert_eq!(
            tlb.lookup(0, read(), true),
            TlbLookup::Miss,
            "INVLPG drops G"
        );
        cached(&mut tlb, &mem, 0, read());
        tlb.flush(true);
        assert_eq!(tlb.len(), 0);
    }

    #[test]
    fn size_zero_is_off() {
        let mem = tables(0x9000 | P, 0, 0);
        let mut tlb = SoftTlb::new(0);
        cached(&mut tlb, &mem, 0, read());
        assert_eq!(tlb.lookup(0, read(), true), TlbLookup::Miss);
        assert_eq!(tlb.len(), 0);
    }

    #[test]
    fn access_bits_are_distinct() {
        let mut seen = 0u16;
        for kind in [AccessKind::Read, AccessKind::Write, AccessKind::Fetch] {
            for mode in [
                AccessMode::User,
                AccessMode::Supervisor,
                AccessMode::ImplicitSupervisor,
            ] {
                let bit = access_bit(Access { kind, mode });
                assert_eq!(seen & bit, 0);
                seen |= bit;
            }
        }
        assert_eq!(seen.count_ones(), 9);
    }
}
