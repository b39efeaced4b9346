//! The vCPU state that decides how a guest-virtual address is translated.

use bitflags::bitflags;

use crate::error::ContextError;

bitflags! {
    /// The CR0 bits that matter to address translation.
    ///
    /// Unknown bits are kept (`from_bits_retain`) so a context round-trips
    /// the register value the VMM gave.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct Cr0: u64 {
        /// Protection enable: protected mode; paging requires it.
        const PE = 1 << 0;
        /// Write protect: supervisor writes honour read-only pages.
        const WP = 1 << 16;
        /// Paging enable.
        const PG = 1 << 31;
    }
}

bitflags! {
    /// The CR4 bits that matter to address translation.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct Cr4: u64 {
        /// Page size extensions: 4 MiB pages under 32-bit paging.
        const PSE = 1 << 4;
        /// Physical address extension: 64-bit entries (PAE or 4/5-level).
        const PAE = 1 << 5;
        /// Global pages: translations with G=1 survive a CR3 load.
        const PGE = 1 << 7;
        /// 57-bit linear addresses (5-level paging) in long mode.
        const LA57 = 1 << 12;
        /// Supervisor-mode execution prevention.
        const SMEP = 1 << 20;
        /// Supervisor-mode access prevention.
        const SMAP = 1 << 21;
        /// Protection keys for user-mode pages.
        const PKE = 1 << 22;
    }
}

bitflags! {
    /// The EFER bits that matter to address translation.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct Efer: u64 {
        /// Long mode enable (requested by software).
        const LME = 1 << 8;
        /// Long mode active (set by the CPU once paging is on with LME).
        const LMA = 1 << 10;
        /// No-execute enable: bit 63 of PAE-format entries is XD.
        const NXE = 1 << 11;
    }
}

bitflags! {
    /// Paging features the vCPU has (from its CPUID), which change which
    /// entry bits are reserved and which CR4 bits may be set.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct CpuFeatures: u32 {
        /// CPUID.1:EDX.PSE: 4 MiB pages with 32-bit paging.
        const PSE = 1 << 0;
        /// CPUID.1:EDX.PSE-36: 4 MiB pages may map above 4 GiB.
        const PSE36 = 1 << 1;
        /// CPUID.80000001:EDX.NX: the execute-disable bit exists.
        const NX = 1 << 2;
        /// CPUID.80000001:EDX.Page1GB: PS in a PDPTE maps a 1 GiB page.
        const PAGE_1G = 1 << 3;
        /// CPUID.7:EBX.SMEP.
        const SMEP = 1 << 4;
        /// CPUID.7:EBX.SMAP.
        const SMAP = 1 << 5;
        /// CPUID.7:ECX.PKU: protection keys for user-mode pages.
        const PKU = 1 << 6;
        /// CPUID.7:ECX.LA57: 5-level paging.
        const LA57 = 1 << 7;
    }
}

impl CpuFeatures {
    /// A CPU with none of the optional paging features: no large pages
    /// beyond what the mode itself defines, no NX, SMEP, SMAP, PKU or
    /// 5-level paging. The safe starting point for a vCPU whose CPUID is
    /// not known.
    pub const fn bare() -> Self {
        Self::empty()
    }

    /// The paging features a CPU reports through CPUID (leaves 1, 7.0 and
    /// 0x80000001). A leaf missing from `leaves` reports no features.
    pub fn from_cpuid(leaves: &[CpuidLeaf]) -> Self {
        let leaf = |function, index| CpuidLeaf::find(leaves, function, index);
        let l1 = leaf(1, 0);
        let l7 = leaf(7, 0);
        let ext1 = leaf(0x8000_0001, 0);
        let mut features = Self::empty();
        for (present, feature) in [
            (l1.edx & (1 << 3) != 0, Self::PSE),
            (l1.edx & (1 << 17) != 0, Self::PSE36),
            (ext1.edx & (1 << 20) != 0, Self::NX),
            (ext1.edx & (1 << 26) != 0, Self::PAGE_1G),
            (l7.ebx & (1 << 7) != 0, Self::SMEP),
            (l7.ebx & (1 << 20) != 0, Self::SMAP),
            (l7.ecx & (1 << 3) != 0, Self::PKU),
            (l7.ecx & (1 << 16) != 0, Self::LA57),
        ] {
            if present {
                features |= feature;
            }
        }
        features
    }
}

/// One CPUID leaf as a CPU (or a hypervisor's supported-CPUID list)
/// reports it: the function (EAX in), the index (ECX in) and the four
/// output registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CpuidLeaf {
    /// The leaf (EAX on input).
    pub function: u32,
    /// The sub-leaf (ECX on input); 0 for leaves without sub-leaves.
    pub index: u32,
    /// EAX on output.
    pub eax: u32,
    /// EBX on output.
    pub ebx: u32,
    /// ECX on output.
    pub ecx: u32,
    /// EDX on output.
    pub edx: u32,
}

impl CpuidLeaf {
    /// A leaf with its output registers `[eax, ebx, ecx, edx]`.
    pub const fn new(function: u32, index: u32, regs: [u32; 4]) -> Self {
        let [eax, ebx, ecx, edx] = regs;
        Self {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
        }
    }

    /// Leaf `function`.`index` of `leaves`, or all-zero registers when it
    /// is absent (which reports no features).
    fn find(leaves: &[Self], function: u32, index: u32) -> Self {
        leaves
            .iter()
            .find(|l| l.function == function && l.index == index)
            .copied()
            .unwrap_or_default()
    }

    /// MAXPHYADDR as `leaves` report it: CPUID.80000008:EAX\[7:0\], or 36
    /// when that leaf is absent and the CPU has PAE (32 otherwise), as the
    /// architecture defines.
    pub fn maxphyaddr(leaves: &[Self]) -> u8 {
        match Self::find(leaves, 0x8000_0008, 0).eax & 0xff {
            0 if Self::find(leaves, 1, 0).edx & (1 << 6) != 0 => 36,
            0 => 32,
            bits => bits as u8,
        }
    }
}

/// How linear addresses are translated, derived from CR0, CR4 and EFER.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PagingMode {
    /// CR0.PG = 0: linear addresses are physical addresses.
    NoPaging,
    /// 32-bit paging: two levels of 4-byte entries, 4 MiB pages with PSE.
    Bits32,
    /// PAE paging: four PDPTEs, then two levels of 8-byte entries.
    Pae,
    /// 4-level paging (IA-32e, 48-bit linear addresses).
    Level4,
    /// 5-level paging (IA-32e with CR4.LA57, 57-bit linear addresses).
    Level5,
}

impl PagingMode {
    /// Number of table levels walked (0 without paging; PAE counts its PDPT).
    pub const fn levels(self) -> u8 {
        match self {
            PagingMode::NoPaging => 0,
            PagingMode::Bits32 => 2,
            PagingMode::Pae => 3,
            PagingMode::Level4 => 4,
            PagingMode::Level5 => 5,
        }
    }

    /// True for the IA-32e modes (4- and 5-level).
    pub const fn is_long(self) -> bool {
        matches!(self, PagingMode::Level4 | PagingMode::Level5)
    }

    /// Number of significant linear-address bits.
    pub const fn linear_bits(self) -> u32 {
        match self {
            PagingMode::NoPaging | PagingMode::Bits32 | PagingMode::Pae => 32,
            PagingMode::Level4 => 48,
            PagingMode::Level5 => 57,
        }
    }
}

/// Smallest MAXPHYADDR a context may carry.
pub const MIN_MAXPHYADDR: u8 = 32;
/// Largest MAXPHYADDR the architecture defines.
pub const MAX_MAXPHYADDR: u8 = 52;

/// Everything about a vCPU that decides a translation: control registers,
/// privilege, EFLAGS.AC, PKRU, and the CPU's physical-address width and
/// paging features.
///
/// Built from the vCPU's CPUID with [`PagingContext::from_cpuid`], or with
/// [`PagingContext::new`] and an explicit feature set; then registers are
/// set field by field and checked with [`PagingContext::validate`].
/// [`PagingContext::for_mode`] builds a validated context for a paging mode.
/// The features are never assumed: a walk with features the CPU lacks
/// succeeds where the CPU would fault (1 GiB pages, for one).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct PagingContext {
    /// CR0.
    pub cr0: Cr0,
    /// CR3 as loaded (PCID and flag bits are ignored by the walk).
    pub cr3: u64,
    /// CR4.
    pub cr4: Cr4,
    /// IA32_EFER.
    pub efer: Efer,
    /// Current privilege level, 0..=3.
    pub cpl: u8,
    /// EFLAGS.AC, which lets explicit supervisor accesses reach user pages
    /// under SMAP.
    pub eflags_ac: bool,
    /// PKRU: two bits (access-disable, write-disable) per protection key.
    pub pkru: u32,
    /// The CPU's physical-address width in bits (CPUID.80000008:EAX bits 7:0).
    pub maxphyaddr: u8,
    /// The vCPU's paging features.
    pub features: CpuFeatures,
}

impl Default for PagingContext {
    /// A vCPU out of reset into protected mode (CPL0, paging off) on a CPU
    /// with no optional paging feature ([`CpuFeatures::bare`]) and
    /// MAXPHYADDR 52: a placeholder until the vCPU's real state is loaded.
    fn default() -> Self {
        Self::new(CpuFeatures::bare(), MAX_MAXPHYADDR)
    }
}

impl PagingContext {
    /// A CPL0 vCPU in protected mode with paging off, on a CPU with
    /// `features` and a `maxphyaddr`-bit physical address space.
    pub const fn new(features: CpuFeatures, maxphyaddr: u8) -> Self {
        Self {
            cr0: Cr0::PE,
            cr3: 0,
            cr4: Cr4::empty(),
            efer: Efer::empty(),
            cpl: 0,
            eflags_ac: false,
            pkru: 0,
            maxphyaddr,
            features,
        }
    }

    /// [`new`](Self::new) with the features and MAXPHYADDR the CPUID
    /// `leaves` report (e.g. KVM's supported CPUID, or the vCPU's).
    pub fn from_cpuid(leaves: &[CpuidLeaf]) -> Result<Self, ContextError> {
        let ctx = Self::new(
            CpuFeatures::from_cpuid(leaves),
            CpuidLeaf::maxphyaddr(leaves),
        );
        ctx.validate()?;
        Ok(ctx)
    }

    /// A validated context for `mode` at CPL0, with the given CR3, on a CPU
    /// with `features`: CR0.WP set; EFER.NXE set when the CPU has NX; CR4.PSE
    /// set for 32-bit paging when it has PSE. 5-level paging needs
    /// [`CpuFeatures::LA57`]. Adjust fields and call
    /// [`validate`](Self::validate) after.
    pub fn for_mode(
        mode: PagingMode,
        cr3: u64,
        maxphyaddr: u8,
        features: CpuFeatures,
    ) -> Result<Self, ContextError> {
        let mut ctx = Self::new(features, maxphyaddr);
        ctx.cr3 = cr3;
        if features.contains(CpuFeatures::NX) {
            ctx.efer |= Efer::NXE;
        }
        match mode {
            PagingMode::NoPaging => {}
            PagingMode::Bits32 => {
                ctx.cr0 |= Cr0::PG | Cr0::WP;
                if features.contains(CpuFeatures::PSE) {
                    ctx.cr4 |= Cr4::PSE;
                }
            }
            PagingMode::Pae => {
                ctx.cr0 |= Cr0::PG | Cr0::WP;
                ctx.cr4 |= Cr4::PAE;
            }
            PagingMode::Level4 | PagingMode::Level5 => {
                ctx.cr0 |= Cr0::PG | Cr0::WP;
                ctx.cr4 |= Cr4::PAE;
                ctx.efer |= Efer::LME | Efer::LMA;
                if mode == PagingMode::Level5 {
                    ctx.cr4 |= Cr4::LA57;
                }
            }
        }
        ctx.validate()?;
        Ok(ctx)
    }

    /// Checks that the register combination is one a CPU can be in, with
    /// the features the vCPU has.
    pub fn validate(&self) -> Result<(), ContextError> {
        if !(MIN_MAXPHYADDR..=MAX_MAXPHYADDR).contains(&self.maxphyaddr) {
            return Err(ContextError::MaxPhyAddr(self.maxphyaddr));
        }
        if self.cpl > 3 {
            return Err(ContextError::Cpl(self.cpl));
        }
        if self.cr0.contains(Cr0::PG) && !self.cr0.contains(Cr0::PE) {
            return Err(ContextError::PagingWithoutProtection);
        }
        if self.efer.contains(Efer::LMA) {
            if !self.cr0.contains(Cr0::PG) || !self.cr4.contains(Cr4::PAE) {
                return Err(ContextError::LongModeWithoutPae);
            }
        } else if self.cr4.contains(Cr4::LA57) && self.cr0.contains(Cr0::PG) {
            return Err(ContextError::La57OutsideLongMode);
        }
        let needs = [
            (self.cr4.contains(Cr4::LA57), CpuFeatures::LA57, "CR4.LA57"),
            (self.cr4.contains(Cr4::SMEP), CpuFeatures::SMEP, "CR4.SMEP"),
            (self.cr4.contains(Cr4::SMAP), CpuFeatures::SMAP, "CR4.SMAP"),
            (self.cr4.contains(Cr4::PKE), CpuFeatures::PKU, "CR4.PKE"),
            (self.cr4.contains(Cr4::PSE), CpuFeatures::PSE, "CR4.PSE"),
            (self.efer.contains(Efer::NXE), CpuFeatures::NX, "EFER.NXE"),
        ];
        for (set, feature, name) in needs {
            if set && !self.features.contains(feature) {
                return Err(ContextError::MissingFeature(name));
            }
        }
        Ok(())
    }

    /// The paging mode these registers select.
    pub fn mode(&self) -> PagingMode {
        if !self.cr0.contains(Cr0::PG) {
            PagingMode::NoPaging
        } else if !self.cr4.contains(Cr4::PAE) {
            PagingMode::Bits32
        } else if !self.efer.contains(Efer::LMA) {
            PagingMode::Pae
        } else if self.cr4.contains(Cr4::LA57) {
            PagingMode::Level5
        } else {
            PagingMode::Level4
        }
    }

    /// CR0.WP.
    pub fn wp(&self) -> bool {
        self.cr0.contains(Cr0::WP)
    }

    /// EFER.NXE, which only has effect with 64-bit (PAE-format) entries.
    pub fn nx_enabled(&self) -> bool {
        self.efer.contains(Efer::NXE) && self.mode() != PagingMode::Bits32
    }

    /// CR4.SMEP.
    pub fn smep(&self) -> bool {
        self.cr4.contains(Cr4::SMEP)
    }

    /// CR4.SMAP.
    pub fn smap(&self) -> bool {
        self.cr4.contains(Cr4::SMAP)
    }

    /// True when protection keys are checked: CR4.PKE in an IA-32e mode.
    pub fn pke_active(&self) -> bool {
        self.cr4.contains(Cr4::PKE) && self.mode().is_long()
    }

    /// Mask of the physical-address bits below MAXPHYADDR.
    pub fn phys_mask(&self) -> u64 {
        (1u64 << self.maxphyaddr) - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_follow_registers() {
        for mode in [
            PagingMode::NoPaging,
            PagingMode::Bits32,
            PagingMode::Pae,
            PagingMode::Level4,
            PagingMode::Level5,
        ] {
            let ctx = PagingContext::for_mode(mode, 0x1000, 46, CpuFeatures::all()).unwrap();
            assert_eq!(ctx.mode(), mode);
        }
    }

    #[test]
    fn impossible_contexts_are_rejected() {
        let mut ctx =
            PagingContext::for_mode(PagingMode::Level4, 0, 46, CpuFeatures::all()).unwrap();
        ctx.maxphyaddr = 60;
        assert_eq!(ctx.validate(), Err(ContextError::MaxPhyAddr(60)));
        ctx.maxphyaddr = 31;
        assert_eq!(ctx.validate(), Err(ContextError::MaxPhyAddr(31)));
        ctx.maxphyaddr = 46;
        ctx.cr4.remove(Cr4::PAE);
        assert_eq!(ctx.validate(), Err(ContextError::LongModeWithoutPae));
        ctx.cr4.insert(Cr4::PAE | Cr4::SMEP);
        ctx.features.remove(CpuFeatures::SMEP);
        assert_eq!(
            ctx.validate(),
            Err(ContextError::MissingFeature("CR4.SMEP"))
        );
        ctx.cr4.remove(Cr4::SMEP);
        ctx.cpl = 4;
        assert_eq!(ctx.validate(), Err(ContextError::Cpl(4)));
    }

    #[test]
    fn nxe_is_inert_with_32_bit_entries() {
        let ctx = PagingContext::for_mode(PagingMode::Bits32, 0, 40, CpuFeatures::all()).unwrap();
        assert!(ctx.efer.contains(Efer::NXE));
        assert!(!ctx.nx_enabled());
    }

    /// Leaf 1 EDX: PSE (3), PAE (6), PSE-36 (17); leaf 7.0 EBX: SMEP (7),
    /// SMAP (20); ECX: PKU (3), LA57 (16); 0x80000001 EDX: NX (20),
    /// Page1GB (26); 0x80000008 EAX[7:0]: MAXPHYADDR.
    #[test]
    fn features_and_maxphyaddr_come_from_cpuid() {
        let leaves = [
            CpuidLeaf::new(1, 0, [0, 0, 0, (1 << 3) | (1 << 6) | (1 << 17)]),
            CpuidLeaf::new(7, 0, [0, 1 << 7, 1 << 16, 0]),
            CpuidLeaf::new(7, 1, [0, 1 << 20, 1 << 3, 0]),
            CpuidLeaf::new(0x8000_0001, 0, [0, 0, 0, 1 << 20]),
            CpuidLeaf::new(0x8000_0008, 0, [0x3027, 0, 0, 0]),
        ];
        let ctx = PagingContext::from_cpuid(&leaves).unwrap();
        // Sub-leaf 7.1 is not 7.0: no SMAP, no PKU; no 1 GiB pages.
        assert_eq!(
            ctx.features,
            CpuFeatures::PSE
                | CpuFeatures::PSE36
                | CpuFeatures::NX
                | CpuFeatures::SMEP
                | CpuFeatures::LA57
        );
        assert_eq!(ctx.maxphyaddr, 39);
        assert_eq!(ctx.mode(), PagingMode::NoPaging);
        // Without leaf 0x80000008: 36 bits with PAE, 32 without.
        assert_eq!(CpuidLeaf::maxphyaddr(&leaves[..4]), 36);
        assert_eq!(CpuidLeaf::maxphyaddr(&[]), 32);
        assert_eq!(CpuFeatures::from_cpuid(&[]), CpuFeatures::bare());
    }

    #[test]
    fn for_mode_sets_only_what_the_cpu_has() {
        let bare = PagingContext::for_mode(PagingMode::Level4, 0, 46, CpuFeatures::bare()).unwrap();
        assert!(!bare.efer.contains(Efer::NXE));
        let b32 = PagingContext::for_mode(PagingMode::Bits32, 0, 32, CpuFeatures::bare()).unwrap();
        assert!(!b32.cr4.contains(Cr4::PSE));
        assert_eq!(
            PagingContext::for_mode(PagingMode::Level5, 0, 46, CpuFeatures::bare()),
            Err(ContextError::MissingFeature("CR4.LA57"))
        );
        // A context from a CPUID without leaf 0x80000008 or PAE reports
        // 32 bits, which a walk then honours.
        assert_eq!(PagingContext::from_cpuid(&[]).unwrap().maxphyaddr, 32);
    }
}
