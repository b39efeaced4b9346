//! Shadow page-table entries: real x86-64 entries the hardware walks.

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
