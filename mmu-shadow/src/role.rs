//! Shadow page roles: what a shadow page means besides the frame it shadows.

use mmu_api::{Gfn, PagingContext, PagingMode, Rights};

/// The part of a shadow page's identity beyond its gfn. Two shadow pages of
/// the same guest table with different roles are different pages (KVM's
/// `kvm_mmu_page_role`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Role {
    /// 1 = PT ... 5 = PML5 of the shadow tables.
    pub(crate) level: u8,
    /// Maps a guest-physical range directly (no guest table behind it):
    /// no-paging guests and the pieces of guest large pages.
    pub(crate) direct: bool,
    /// Stands in for a guest level that has no table in memory (the upper
    /// levels above a 32-bit or PAE guest's tables).
    pub(crate) passthrough: bool,
    /// Rights granted by the guest levels above this page (R/W, U/S, !XD).
    pub(crate) access: Access3,
    /// CR0.WP when the page was made.
    pub cr0_wp: bool,
    /// Guest NX enabled (EFER.NXE in a PAE-format mode).
    pub(crate) efer_nx: bool,
    /// CR4.SMEP and not CR0.WP (supervisor writes to read-only user pages
    /// are mapped kernel-only; SMEP then needs NX in those entries).
    pub(crate) smep_andnot_wp: bool,
    /// CR4.SMAP and not CR0.WP.
    pub(crate) smap_andnot_wp: bool,
    /// Guest entries are 4 bytes (32-bit paging).
    pub has_4_byte_gpte: bool,
    /// Which part of the guest table this page shadows: for 32-bit guests a
    /// guest table has 1024 entries and is shadowed by 2 (PT) or 4 (PD)
    /// pages; for PAE roots, which 32-byte PDPT inside the frame.
    pub(crate) quadrant: u8,
    /// Direct pages mapping a guest large page: the guest entry's D bit.
    /// True for every other page.
    pub(crate) guest_dirty: bool,
    /// A page of the host window (the pool's own mapping for replay):
    /// pinned, never reclaimed, never obsolete.
    pub(crate) host_window: bool,
    /// Levels of the guest's paging mode (0 = no paging), so tables of
    /// guests in different modes never share a page.
    pub(crate) guest_levels: u8,
}

/// Rights as three bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Access3 {
    /// R/W.
    pub(crate) write: bool,
    /// U/S.
    pub(crate) user: bool,
    /// Not XD.
    pub(crate) exec: bool,
}

impl Access3 {
    /// All rights.
    pub(crate) const ALL: Access3 = Access3 {
        write: true,
        user: true,
        exec: true,
    };
}

impl From<Rights> for Access3 {
    fn from(r: Rights) -> Self {
        Access3 {
            write: r.write,
            user: r.user,
            exec: r.exec,
        }
    }
}

impl Role {
    /// The role fields that come from the vCPU's registers.
    pub(crate) fn base(ctx: &PagingContext) -> Role {
        let mode = ctx.mode();
        let paging = mode != PagingMode::NoPaging;
        Role {
            level: 0,
            direct: !paging,
            passthrough: false,
            access: Access3::ALL,
            cr0_wp: ctx.wp(),
            efer_nx: ctx.nx_enabled(),
            smep_andnot_wp: ctx.smep() && !ctx.wp(),
            smap_andnot_wp: ctx.smap() && !ctx.wp(),
            has_4_byte_gpte: mode == PagingMode::Bits32,
            quadrant: 0,
            guest_dirty: true,
            host_window: false,
            guest_levels: mode.levels(),
        }
    }

    /// True if the page shadows a guest page table in memory, which must
    /// then be write-protected.
    pub(crate) fn shadows_guest_table(&self) -> bool {
        !self.direct && !self.passthrough
    }
}

/// A shadow page's identity: the hash key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct SpKey {
    /// The guest frame it shadows (or the first frame it maps, if direct).
    pub(crate) gfn: Gfn,
    /// Its role.
    pub(crate) role: Role,
}
