//! Guest page-table entry bits.

use bitflags::bitflags;

bitflags! {
    /// Bits of an x86 paging-structure entry, in the 64-bit (PAE / IA-32e)
    /// layout. 32-bit paging uses the low 32 bits with the same meaning,
    /// except that it has no XD bit and no protection keys.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct PteFlags: u64 {
        /// P: the entry maps something; when clear, every other bit is ignored.
        const PRESENT = 1 << 0;
        /// R/W: writes are allowed through this entry.
        const WRITABLE = 1 << 1;
        /// U/S: user-mode (CPL3) accesses are allowed through this entry.
        const USER = 1 << 2;
        /// PWT: page-level write-through.
        const WRITE_THROUGH = 1 << 3;
        /// PCD: page-level cache disable.
        const CACHE_DISABLE = 1 << 4;
        /// A: set by the CPU when the entry is used for a translation.
        const ACCESSED = 1 << 5;
        /// D: set by the CPU on the first write through a leaf entry.
        const DIRTY = 1 << 6;
        /// PS: in a PDE or PDPTE, the entry maps a large page. (In a 4 KiB
        /// PTE this bit is PAT.)
        const PAGE_SIZE = 1 << 7;
        /// G: a global translation, kept across CR3 loads when CR4.PGE is set.
        const GLOBAL = 1 << 8;
        /// PAT bit of a large-page entry (bit 12).
        const PAT_LARGE = 1 << 12;
        /// XD: instruction fetches are not allowed (with EFER.NXE).
        const NO_EXECUTE = 1 << 63;
    }
}

/// Bits 62:59 of a leaf entry: its protection key (IA-32e with CR4.PKE).
pub const PKEY_SHIFT: u32 = 59;
/// Mask of the protection-key field.
pub const PKEY_MASK: u64 = 0xf << PKEY_SHIFT;

/// A guest paging-structure entry, as read from guest memory.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(transparent)]
pub struct GuestPte(pub u64);

impl GuestPte {
    /// The raw value.
    #[inline]
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// The flag bits (unknown bits dropped).
    #[inline]
    pub const fn flags(self) -> PteFlags {
        PteFlags::from_bits_truncate(self.0)
    }

    /// True if every bit of `flags` is set.
    #[inline]
    pub const fn has(self, flags: PteFlags) -> bool {
        self.0 & flags.bits() == flags.bits()
    }

    /// P.
    #[inline]
    pub const fn is_present(self) -> bool {
        self.has(PteFlags::PRESENT)
    }

    /// The protection key of a leaf entry.
    #[inline]
    pub const fn pkey(self) -> u8 {
        ((self.0 & PKEY_MASK) >> PKEY_SHIFT) as u8
    }
}

impl core::fmt::Debug for GuestPte {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "GuestPte({:#018x} {:?})", self.0, self.flags())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_and_pkey() {
        let pte = GuestPte(0x7800_0000_0000_1067 | (5 << PKEY_SHIFT));
        assert!(pte.is_present());
        assert!(pte.has(PteFlags::WRITABLE | PteFlags::USER | PteFlags::ACCESSED));
        assert!(pte.has(PteFlags::DIRTY));
        assert!(!pte.has(PteFlags::NO_EXECUTE));
        assert_eq!(pte.pkey(), 0xf);
        assert_eq!(GuestPte(5 << PKEY_SHIFT).pkey(), 5);
    }
}
