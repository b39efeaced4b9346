//! Shadow page-table entries: real x86-64 entries the hardware walks
//! (KVM: spte.h / spte.c, `make_spte`, `make_nonleaf_spte`,
//! `make_mmio_spte`).

use mmu_api::Hpa;
use mmu_api::paging::PteFlags;

/// Bits 51:12: the frame an entry points to.
pub(crate) const SPTE_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// A shadow page-table entry.
///
/// The MMU creates entries with A (and D when writable) already set so the
/// hardware never has to write them back.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(transparent)]
pub(crate) struct Spte(pub u64);

impl Spte {
    /// A link to a lower-level shadow table. Links grant everything; the
    /// guest's rights are applied in the leaf, where `role.access` and the
    /// guest leaf meet.
    pub(crate) fn link(child: Hpa) -> Spte {
        Spte(
            (child.raw() & SPTE_ADDR_MASK)
                | (PteFlags::PRESENT | PteFlags::WRITABLE | PteFlags::USER | PteFlags::ACCESSED)
                    .bits(),
        )
    }

    /// A 4 KiB leaf mapping `frame` with the given rights.
    pub(crate) fn leaf(frame: Hpa, write: bool, user: bool, exec: bool) -> Spte {
        let mut f = PteFlags::PRESENT | PteFlags::ACCESSED;
        if write {
            f |= PteFlags::WRITABLE | PteFlags::DIRTY;
        }
        if user {
            f |= PteFlags::USER;
        }
        if !exec {
            f |= PteFlags::NO_EXECUTE;
        }
        Spte((frame.raw() & SPTE_ADDR_MASK) | f.bits())
    }

    /// The same entry carrying protection key `key` (bits 62:59), so the
    /// hardware checks the guest's key against PKRU.
    pub(crate) fn with_pkey(self, key: u8) -> Spte {
        let mask = mmu_api::paging::PKEY_MASK;
        Spte((self.0 & !mask) | ((u64::from(key) << mmu_api::paging::PKEY_SHIFT) & mask))
    }

    /// P.
    pub(crate) fn is_present(self) -> bool {
        self.0 & PteFlags::PRESENT.bits() != 0
    }

    /// R/W.
    pub(crate) fn is_writable(self) -> bool {
        self.0 & PteFlags::WRITABLE.bits() != 0
    }

    /// U/S.
    pub(crate) fn is_user(self) -> bool {
        self.0 & PteFlags::USER.bits() != 0
    }

    /// Not XD.
    pub(crate) fn is_executable(self) -> bool {
        self.0 & PteFlags::NO_EXECUTE.bits() == 0
    }

    /// The frame it points to.
    pub(crate) fn addr(self) -> Hpa {
        Hpa(self.0 & SPTE_ADDR_MASK)
    }

    /// The same entry without write access.
    pub(crate) fn write_protected(self) -> Spte {
        Spte(self.0 & !(PteFlags::WRITABLE | PteFlags::DIRTY).bits())
    }
}

impl core::fmt::Debug for Spte {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Spte({:#x})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaf_bits() {
        let s = Spte::leaf(Hpa(0x1234_5000), true, false, false);
        assert!(s.is_present() && s.is_writable() && !s.is_user() && !s.is_executable());
        assert_eq!(s.addr(), Hpa(0x1234_5000));
        let ro = s.write_protected();
        assert!(!ro.is_writable() && ro.is_present());
        let l = Spte::link(Hpa(0x9000));
        assert!(l.is_writable() && l.is_user() && l.is_executable());
    }
}

/// MMIO SPTEs: a leaf for a guest frame no memslot backs, built so the
/// hardware faults on it with RSVD set and the MMU can answer "MMIO at gpa"
/// from the SPTE alone.
///
/// Layout (KVM's, for legacy-format tables): P and bit 51 (reserved while
/// the host's MAXPHYADDR is at most 51) mark it; bits 50:12 hold the gfn;
/// the memslot generation's low bits sit in bits 10:3 and 62:52; R/W, U/S
/// and XD keep the rights the guest's walk granted, so a cached answer is
/// only given to an access the guest allows.
pub(crate) mod mmio {
    use mmu_api::{Gfn, Rights};

    /// Bit 51: reserved on hosts with MAXPHYADDR <= 51.
    pub(crate) const MARKER: u64 = 1 << 51;
    const GFN_MASK: u64 = ((1u64 << 51) - 1) & !0xfff;
    const GEN_LOW_SHIFT: u32 = 3;
    const GEN_LOW_BITS: u32 = 8;
    const GEN_HIGH_SHIFT: u32 = 52;
    /// Generation bits an MMIO SPTE can hold at most (8 low + 11 high).
    pub(crate) const MAX_GEN_BITS: u8 = 19;

    /// The MMIO SPTE for `gfn` with `rights`, tagged with the low `bits` bits
    /// of the memslot generation count `generation`.
    pub(crate) fn encode(gfn: Gfn, generation: u64, bits: u8, rights: Rights) -> u64 {
        let g = generation & ((1u64 << bits) - 1);
        let low = g & ((1 << GEN_LOW_BITS) - 1);
        let high = g >> GEN_LOW_BITS;
        let mut v = 1 | MARKER | ((gfn.raw() << 12) & GFN_MASK);
        v |= low << GEN_LOW_SHIFT;
        v |= high << GEN_HIGH_SHIFT;
        if rights.write {
            v |= 1 << 1;
        }
        if rights.user {
            v |= 1 << 2;
        }
        if !rights.exec {
            v |= 1 << 63;
        }
        v
    }

    /// True if `spte` is an MMIO SPTE.
    pub(crate) fn is_mmio(spte: u64) -> bool {
        spte & (1 | MARKER) == (1 | MARKER)
    }

    /// The gfn, generation tag and rights of an MMIO SPTE.
    pub(crate) fn decode(spte: u64) -> (Gfn, u64, Rights) {
        let low = (spte >> GEN_LOW_SHIFT) & ((1 << GEN_LOW_BITS) - 1);
        let high = (spte >> GEN_HIGH_SHIFT) & ((1 << 11) - 1);
        let rights = Rights {
            write: spte & (1 << 1) != 0,
            user: spte & (1 << 2) != 0,
            exec: spte & (1 << 63) == 0,
        };
        (
            Gfn((spte & GFN_MASK) >> 12),
            low | (high << GEN_LOW_BITS),
            rights,
        )
    }

    /// True if an MMIO SPTE can name `gfn`: its gpa fits below bit 51,
    /// the marker bit.
    pub(crate) fn fits(gfn: Gfn) -> bool {
        gfn.raw() < 1 << 39
    }

    /// The tag a generation count gets in `bits` bits.
    pub(crate) fn tag(generation: u64, bits: u8) -> u64 {
        generation & ((1u64 << bits) - 1)
    }
}

#[cfg(test)]
mod mmio_tests {
    use super::mmio;
    use mmu_api::{Gfn, Rights};

    #[test]
    fn round_trips_every_field() {
        for (gfn, generation, bits) in [
            (0u64, 0u64, 19u8),
            (0x7_ffff_ffff, (1 << 19) - 1, 19),
            (0x1234, 0x5_5aa5, 19),
            (42, 7, 2),
        ] {
            for rights in [
                Rights::ALL,
                Rights {
                    write: false,
                    user: true,
                    exec: false,
                },
            ] {
                let s = mmio::encode(Gfn(gfn), generation, bits, rights);
                assert!(mmio::is_mmio(s));
                let (g, t, r) = mmio::decode(s);
                assert_eq!(g, Gfn(gfn));
                assert_eq!(t, mmio::tag(generation, bits));
                assert_eq!(r, rights);
            }
        }
        // A leaf mapping memory is never taken for an MMIO SPTE.
        let leaf = super::Spte::leaf(mmu_api::Hpa(0x3f_ffff_f000), true, true, false);
        assert!(!mmio::is_mmio(leaf.0));
    }

    #[test]
    fn the_in_progress_bit_never_reaches_an_spte() {
        let busy = mmu_api::MemslotGeneration(5).begin_update();
        let s = mmio::encode(Gfn(1), busy.count(), mmio::MAX_GEN_BITS, Rights::ALL);
        assert_eq!(mmio::decode(s).1, 5);
    }
}
