//! The shadow page: its role, its hash, allocation and lookup.
//!
//! KVM: mmu.c's `kvm_mmu_get_shadow_page` (hash lookup, then
//! `kvm_mmu_alloc_shadow_page`), `union kvm_mmu_page_role` and the
//! `active_mmu_pages` list.

use std::sync::atomic::{AtomicU64, Ordering};

use mmu_api::{Gfn, PagingContext, PagingMode, Rights, VcpuError};

use crate::pool::{ENTRIES_PER_PAGE, FrameId};
use crate::rmap::SptePtr;
use crate::state::MmuState;
use crate::zap::Flush;

/// The MMU's hash tables (shadow pages, rmap, shadowed guest tables):
/// keyed by gfns and roles, hashed with a multiply-rotate hash as KVM
/// hashes gfns (`kvm_page_table_hashfn`), not SipHash: they are looked up
/// under the MMU lock on every fault.
pub(crate) type FastMap<K, V> =
    std::collections::HashMap<K, V, std::hash::BuildHasherDefault<GfnHasher>>;

/// The hasher of [`FastMap`].
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct GfnHasher(u64);

impl GfnHasher {
    fn add(&mut self, word: u64) {
        const K: u64 = 0x517c_c1b7_2722_0a95;
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(K);
    }
}

impl std::hash::Hasher for GfnHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
    }

    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    fn write_u16(&mut self, i: u16) {
        self.add(u64::from(i));
    }

    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }

    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
}

/// A level of the shadow tables: 1 is a page table (PT), 5 a PML5.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct PtLevel(u8);

impl PtLevel {
    /// A page table: its entries map 4 KiB pages.
    pub(crate) const PT: PtLevel = PtLevel(1);
    /// A page directory.
    pub(crate) const PD: PtLevel = PtLevel(2);
    /// A page-directory-pointer table.
    pub(crate) const PDPT: PtLevel = PtLevel(3);
    /// The 4-level root.
    pub(crate) const PML4: PtLevel = PtLevel(4);
    /// The 5-level root.
    pub(crate) const PML5: PtLevel = PtLevel(5);

    /// The level numbered `level` (1..=5).
    pub(crate) fn new(level: u8) -> Option<PtLevel> {
        (1..=5).contains(&level).then_some(PtLevel(level))
    }

    /// Its number, 1..=5.
    pub(crate) fn get(self) -> u8 {
        self.0
    }

    /// The index of `gva` in a table of this level (4/5-level layout).
    pub(crate) fn index(self, gva: u64) -> usize {
        ((gva >> (12 + 9 * (u32::from(self.0) - 1))) & 0x1ff) as usize
    }

    /// Bytes one table of this level covers.
    pub(crate) fn coverage(self) -> u64 {
        1u64 << (12 + 9 * u32::from(self.0))
    }

    /// The level below (`None` for a page table).
    pub(crate) fn below(self) -> Option<PtLevel> {
        PtLevel::new(self.0 - 1)
    }

    /// True for a page table, whose entries are leaves.
    pub(crate) fn is_pt(self) -> bool {
        self == PtLevel::PT
    }
}

impl core::fmt::Display for PtLevel {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The part of a shadow page's identity beyond its gfn. Two shadow pages of
/// the same guest table with different roles are different pages (KVM's
/// `kvm_mmu_page_role`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Role {
    /// Level in the shadow tables.
    pub(crate) level: PtLevel,
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
            level: PtLevel::PT,
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

/// The gfn each leaf of a level-1 page maps, by index. Atomic because a
/// fault installing a leaf into an empty entry records its gfn holding the
/// MMU lock shared ([`MmuState::install_leaf_shared`]); each such fault
/// writes only the entry whose SPTE it installed, and everyone else
/// reads or writes the gfns holding the lock exclusively.
#[derive(Debug)]
pub(crate) struct LeafGfns(Box<[AtomicU64]>);

impl LeafGfns {
    /// Every entry gfn 0.
    fn new() -> Self {
        LeafGfns((0..ENTRIES_PER_PAGE).map(|_| AtomicU64::new(0)).collect())
    }

    /// The gfn of entry `index`.
    pub(crate) fn get(&self, index: usize) -> Gfn {
        Gfn(self.0[index].load(Ordering::Relaxed))
    }

    /// Records the gfn of entry `index`. The MMU lock, held exclusively or
    /// shared by the only writer of this entry, orders it for readers.
    pub(crate) fn set(&self, index: usize, gfn: Gfn) {
        self.0[index].store(gfn.raw(), Ordering::Relaxed);
    }
}

/// Metadata of one shadow page (one pool frame).
#[derive(Debug)]
pub(crate) struct ShadowPage {
    pub(crate) key: SpKey,
    /// The valid generation when the page was made. A page of an older
    /// generation is obsolete: never found by a lookup, never linked again.
    pub(crate) generation: u64,
    /// Position in the active list: larger is younger.
    pub(crate) seq: u64,
    /// vCPU root caches holding this page as a root.
    pub(crate) root_count: u32,
    /// Zapped while still a root: out of the hash, freed when the last root
    /// user lets go.
    pub(crate) invalid: bool,
    /// SPTEs in other shadow pages that link to this one.
    pub(crate) parents: Vec<SptePtr>,
    /// For level-1 pages: the gfn each present leaf maps.
    pub(crate) leaf_gfns: Option<LeafGfns>,
    /// Emulated writes to the shadowed guest table since it was last used.
    pub(crate) write_flooding: u8,
    /// PAE roots: the PDPTEs the root was built from.
    pub(crate) pdptes: Option<[u64; 4]>,
    /// Shadowing the guest table write-protected it and owed a flush: the
    /// write-protection epoch of that flush ([`MmuState::wp_requested`]),
    /// 0 if none. Until a flush of that epoch is done, a vCPU may still
    /// write the table through a stale TLB entry, so no fault trusts the
    /// guest entries it read from it.
    pub(crate) wp_epoch: u64,
}

impl MmuState {
    pub(crate) fn page(&self, frame: FrameId) -> &ShadowPage {
        self.pages[frame as usize]
            .as_ref()
            .expect("frame holds a shadow page")
    }

    pub(crate) fn page_mut(&mut self, frame: FrameId) -> &mut ShadowPage {
        self.pages[frame as usize]
            .as_mut()
            .expect("frame holds a shadow page")
    }

    /// Looks up a page of the valid generation.
    pub(crate) fn lookup(&self, key: &SpKey) -> Option<FrameId> {
        self.hash.get(&(*key, self.valid_gen)).copied()
    }

    /// True if the page is of an old generation or was zapped as a root.
    /// Host-window pages are never obsolete.
    pub(crate) fn is_obsolete(&self, frame: FrameId) -> bool {
        self.pages[frame as usize].as_ref().is_none_or(|p| {
            p.invalid || (p.generation != self.valid_gen && !p.key.role.host_window)
        })
    }

    /// Allocates a shadow page for `key`. The caller made pages available
    /// first ([`make_pages_available`](Self::make_pages_available)).
    /// Shadowing a guest table write-protects it, which may owe a flush.
    pub(crate) fn alloc_page(&mut self, key: SpKey) -> Result<(FrameId, Flush), VcpuError> {
        let reusable = self
            .zapped_obsolete
            .iter()
            .rposition(|&f| !self.pool.is_quarantined(f));
        let frame = match reusable.map(|i| self.zapped_obsolete.swap_remove(i)) {
            // Zapped pages have every entry cleared already.
            Some(f) => {
                self.counters.obsolete_reused += 1;
                f
            }
            None => self.pool.alloc().ok_or(VcpuError::OutOfPages)?,
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        let leaf_gfns = key.role.level.is_pt().then(LeafGfns::new);
        self.pages[frame as usize] = Some(ShadowPage {
            key,
            generation: self.valid_gen,
            seq,
            root_count: 0,
            invalid: false,
            parents: Vec::new(),
            leaf_gfns,
            write_flooding: 0,
            pdptes: None,
            wp_epoch: 0,
        });
        self.hash.insert((key, self.valid_gen), frame);
        self.active.insert(seq, frame);
        self.counters.sps_allocated += 1;
        let used = self.used_pages();
        if used > self.effective_limit() {
            self.counters.pages_over_limit_max = self
                .counters
                .pages_over_limit_max
                .max(used - self.effective_limit());
        }
        let mut flush = Flush::NONE;
        if key.role.shadows_guest_table() {
            let list = self.gfn_pages.entry(key.gfn).or_default();
            list.push(frame);
            if list.len() == 1 {
                let wp = self.write_protect_gfn(key.gfn);
                if wp.is_owed() {
                    self.wp_requested += 1;
                    self.page_mut(frame).wp_epoch = self.wp_requested;
                }
                flush |= wp;
            }
        }
        tracing::trace!(
            frame,
            gfn = key.gfn.raw(),
            level = key.role.level.get(),
            "shadow page allocated"
        );
        Ok((frame, flush))
    }

    /// Finds or creates the shadow page for `key`.
    pub(crate) fn get_or_create(&mut self, key: SpKey) -> Result<(FrameId, Flush), VcpuError> {
        match self.lookup(&key) {
            Some(f) => Ok((f, Flush::NONE)),
            None => self.alloc_page(key),
        }
    }

    /// Moves a page to the young end of the active list.
    pub(crate) fn make_young(&mut self, frame: FrameId) {
        let seq = self.next_seq;
        let page = self.pages[frame as usize].as_mut().expect("live page");
        if page.invalid || self.active.remove(&page.seq).is_none() {
            return;
        }
        page.seq = seq;
        self.next_seq += 1;
        self.active.insert(seq, frame);
    }
}
