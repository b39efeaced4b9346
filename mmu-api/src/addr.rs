//! Address and identifier newtypes.
//!
//! Guest-virtual, guest-physical and host-physical addresses are different
//! spaces; mixing them up is the classic MMU bug, so each has its own type and
//! conversions between them are explicit.

use core::fmt;

/// log2 of the base page size.
pub const PAGE_SHIFT: u32 = 12;
/// The base page size, 4 KiB.
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
/// Mask of the offset bits inside a base page.
pub const PAGE_OFFSET_MASK: u64 = PAGE_SIZE - 1;

macro_rules! address_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        #[repr(transparent)]
        pub struct $name(pub u64);

        impl $name {
            /// The address `raw`. There is deliberately no `From<u64>`: a
            /// raw number becomes an address only where the code says which
            /// space it is in.
            #[inline]
            pub const fn new(raw: u64) -> Self {
                Self(raw)
            }

            /// The raw address.
            #[inline]
            pub const fn raw(self) -> u64 {
                self.0
            }

            /// The offset of this address inside its 4 KiB page.
            #[inline]
            pub const fn page_offset(self) -> u64 {
                self.0 & PAGE_OFFSET_MASK
            }

            /// The address rounded down to its 4 KiB page.
            #[inline]
            pub const fn page_base(self) -> Self {
                Self(self.0 & !PAGE_OFFSET_MASK)
            }

            /// True if the address is aligned to `align` (a power of two).
            #[inline]
            pub const fn is_aligned(self, align: u64) -> bool {
                self.0 & (align - 1) == 0
            }

            /// `self + offset`, or `None` on overflow.
            #[inline]
            pub const fn checked_add(self, offset: u64) -> Option<Self> {
                match self.0.checked_add(offset) {
                    Some(v) => Some(Self(v)),
                    None => None,
                }
            }

            /// `self + offset`, wrapping at 2^64.
            #[inline]
            pub const fn wrapping_add(self, offset: u64) -> Self {
                Self(self.0.wrapping_add(offset))
            }
        }

        impl From<$name> for u64 {
            #[inline]
            fn from(addr: $name) -> u64 {
                addr.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({:#x})"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }

        impl fmt::LowerHex for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::LowerHex::fmt(&self.0, f)
            }
        }
    };
}

address_type!(
    /// A guest-virtual (linear) address: what guest code dereferences.
    Gva
);
address_type!(
    /// A guest-physical address: the output of the guest's own page tables.
    Gpa
);
address_type!(
    /// A host-physical address as the hardware walking the tables sees it.
    ///
    /// On a host where the backend's tables are themselves a guest of another
    /// hypervisor (the shadow pool hosted in a KVM memslot), this is the
    /// address in that hypervisor's guest-physical space.
    Hpa
);

/// A guest frame number: a guest-physical address shifted right by 12.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[repr(transparent)]
pub struct Gfn(pub u64);

impl Gfn {
    /// The raw frame number.
    #[inline]
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// The guest-physical address of the first byte of this frame.
    #[inline]
    pub const fn gpa(self) -> Gpa {
        Gpa(self.0 << PAGE_SHIFT)
    }

    /// `self + n`, or `None` on overflow.
    #[inline]
    pub const fn checked_add(self, n: u64) -> Option<Self> {
        match self.0.checked_add(n) {
            Some(v) => Some(Self(v)),
            None => None,
        }
    }
}

impl fmt::Debug for Gfn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Gfn({:#x})", self.0)
    }
}

impl fmt::Display for Gfn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl Gpa {
    /// The frame that holds this address.
    #[inline]
    pub const fn gfn(self) -> Gfn {
        Gfn(self.0 >> PAGE_SHIFT)
    }
}

impl From<Gpa> for Gfn {
    #[inline]
    fn from(gpa: Gpa) -> Gfn {
        gpa.gfn()
    }
}

impl From<Gfn> for Gpa {
    #[inline]
    fn from(gfn: Gfn) -> Gpa {
        gfn.gpa()
    }
}

impl Gva {
    /// The guest-virtual page number (address >> 12).
    #[inline]
    pub const fn page_number(self) -> u64 {
        self.0 >> PAGE_SHIFT
    }
}

/// Identifies a memslot, as chosen by the VMM (KVM's slot number).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
#[repr(transparent)]
pub struct SlotId(pub u32);

impl fmt::Display for SlotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "slot {}", self.0)
    }
}

/// Identifies a vCPU inside its VM (0-based, dense).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
#[repr(transparent)]
pub struct VcpuId(pub u32);

impl fmt::Display for VcpuId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "vcpu {}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpa_gfn_round_trip() {
        let gpa = Gpa(0x1234_5678);
        assert_eq!(gpa.gfn(), Gfn(0x12345));
        assert_eq!(gpa.gfn().gpa(), Gpa(0x1234_5000));
        assert_eq!(gpa.page_offset(), 0x678);
        assert_eq!(Gpa::from(Gfn(3)), Gpa(0x3000));
    }

    #[test]
    fn checked_add_overflows_to_none() {
        assert_eq!(Gva(u64::MAX).checked_add(1), None);
        assert_eq!(Gva(1).checked_add(1), Some(Gva(2)));
        assert_eq!(Gva(u64::MAX).wrapping_add(2), Gva(1));
    }

    #[test]
    fn formatting_is_hex() {
        assert_eq!(format!("{:?}", Hpa(0x1000)), "Hpa(0x1000)");
        assert_eq!(format!("{}", Gfn(0x10)), "0x10");
        assert_eq!(format!("{}", SlotId(2)), "slot 2");
    }
}
