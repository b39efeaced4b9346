//! Roots: one per vCPU context, with a cache of recent ones, and the host
//! window every root links under [`Coherence::Replay`](crate::Coherence).
//!
//! KVM: mmu.c's `mmu_alloc_shadow_roots`, `kvm_mmu_free_roots`, the
//! `prev_roots` cache (`kvm_mmu_new_pgd`, `cached_root_find_and_keep_current`)
//! and `kvm_mmu_load`.

use std::collections::VecDeque;

use mmu_api::paging::GuestPhysMemory;
use mmu_api::{Gfn, Gpa, Gva, PagingContext, PagingMode, VcpuError, VcpuId};

use crate::page::{Access3, PtLevel, Role, ShadowPage, SpKey};
use crate::pool::{ENTRIES_PER_PAGE, FrameId};
use crate::spte::Spte;
use crate::state::MmuState;
use crate::zap::Flush;

/// One entry of a vCPU's root cache.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CachedRoot {
    /// The guest context the root was last loaded for (audits re-walk it).
    pub(crate) ctx: PagingContext,
    pub(crate) key: SpKey,
    pub(crate) pdptes: Option<[u64; 4]>,
    pub(crate) frame: FrameId,
}

/// A vCPU's roots: the current one first, then recent ones.
#[derive(Debug, Default)]
pub(crate) struct RootCache {
    pub(crate) entries: VecDeque<CachedRoot>,
}

/// How many roots a vCPU keeps (the current one and three recent CR3s).
pub(crate) const ROOT_CACHE_SIZE: usize = 4;

/// The host window: the pool mapped supervisor-only into every root.
#[derive(Clone, Copy, Debug)]
pub(crate) struct HostWindow {
    pub(crate) gva: Gva,
    pub(crate) l3: FrameId,
    pub(crate) l4: FrameId,
}

/// Root level of the shadow tables for a guest context.
pub(crate) fn root_level(ctx: &PagingContext) -> PtLevel {
    if ctx.mode() == PagingMode::Level5 {
        PtLevel::PML5
    } else {
        PtLevel::PML4
    }
}

/// True if `gva` falls in the top-level slot of a root of `level` that the
/// host window at `window` takes.
pub(crate) fn in_window(window: Option<Gva>, gva: Gva, level: PtLevel) -> bool {
    window.is_some_and(|w| {
        level.index(gva.raw()) == level.index(w.raw())
            && (level == PtLevel::PML5 || (gva.raw() >> 48) == (w.raw() >> 48))
    })
}

/// The key of the root page for a guest context (the guest's registers
/// alone: a PAE root's PDPTEs are kept beside the key).
pub(crate) fn root_page_key(ctx: &PagingContext) -> SpKey {
    let mut role = Role::base(ctx);
    role.level = root_level(ctx);
    match ctx.mode() {
        PagingMode::NoPaging => SpKey { gfn: Gfn(0), role },
        PagingMode::Bits32 => {
            role.passthrough = true;
            SpKey {
                gfn: Gfn((ctx.cr3 & 0xffff_f000) >> 12),
                role,
            }
        }
        PagingMode::Pae => {
            role.passthrough = true;
            let base = ctx.cr3 & 0xffff_ffe0;
            role.quadrant = ((base >> 5) & 0x7f) as u8;
            SpKey {
                gfn: Gfn(base >> 12),
                role,
            }
        }
        PagingMode::Level4 | PagingMode::Level5 => SpKey {
            gfn: Gfn((ctx.cr3 & ctx.phys_mask() & 0x000f_ffff_ffff_f000) >> 12),
            role,
        },
    }
}

impl MmuState {
    /// The root key for a guest context, and the PDPTEs for PAE guests.
    pub(crate) fn root_key(&self, ctx: &PagingContext) -> (SpKey, Option<[u64; 4]>) {
        let key = root_page_key(ctx);
        if ctx.mode() != PagingMode::Pae {
            return (key, None);
        }
        let base = ctx.cr3 & 0xffff_ffe0;
        let mem = self.slots.guest_mem();
        let mut pdptes = [0u64; 4];
        for (i, p) in pdptes.iter_mut().enumerate() {
            *p = mem.read_u64(Gpa(base + 8 * i as u64)).unwrap_or(0);
        }
        (key, Some(pdptes))
    }

    /// Finds or builds the root for `ctx` in `vcpu`'s root cache and makes
    /// it current. With `reclaim`, a miss first makes room under the page
    /// limit; if that zapped pages, `Ok(None)` asks the caller to commit the
    /// flush (without the lock) and call again without `reclaim`.
    pub(crate) fn resolve_root(
        &mut self,
        vcpu: VcpuId,
        ctx: &PagingContext,
        reclaim: bool,
    ) -> (Result<Option<FrameId>, VcpuError>, Flush) {
        let mut flush = Flush::NONE;
        let (key, pdptes) = self.root_key(ctx);
        let valid_gen = self.valid_gen;
        let cache = self.roots.entry(vcpu).or_default();
        // Drop cached roots that were zapped or are obsolete.
        let mut stale = Vec::new();
        let pages = &self.pages;
        cache.entries.retain(|e| {
            let invalid = pages[e.frame as usize]
                .as_ref()
                .is_none_or(|p| p.invalid || p.generation != valid_gen);
            if invalid {
                stale.push(e.frame);
            }
            !invalid
        });
        let hit = cache
            .entries
            .iter()
            .position(|e| e.key == key && e.pdptes == pdptes);
        if let Some(pos) = hit {
            let mut e = cache.entries.remove(pos).expect("position is valid");
            e.ctx = *ctx;
            cache.entries.push_front(e);
            for f in stale {
                flush |= self.put_root(f);
            }
            self.counters.root_cache_hits += 1;
            return (Ok(Some(e.frame)), flush);
        }
        for f in stale {
            flush |= self.put_root(f);
        }
        if reclaim {
            let (_, reclaimed) = self.make_pages_available(u64::from(root_level(ctx).get()) + 2);
            if reclaimed.is_owed() {
                return (Ok(None), flush | reclaimed);
            }
        }
        let (result, built) = self.build_root(vcpu, ctx, key, pdptes);
        (result.map(Some), flush | built)
    }

    /// The miss half of [`resolve_root`](Self::resolve_root).
    fn build_root(
        &mut self,
        vcpu: VcpuId,
        ctx: &PagingContext,
        key: SpKey,
        pdptes: Option<[u64; 4]>,
    ) -> (Result<FrameId, VcpuError>, Flush) {
        let mut flush = Flush::NONE;
        let frame = match self.lookup(&key) {
            Some(f) if self.page(f).pdptes == pdptes => Ok((f, Flush::NONE)),
            Some(f) => {
                // A PAE root built from other PDPTEs: the PDPTEs are loaded
                // at CR3 load, so rebuild it and its PDPT page.
                flush |= self.zap_page(f);
                let mut pdpt = key;
                pdpt.role.level = PtLevel::PDPT;
                if let Some(p) = self.lookup(&pdpt) {
                    flush |= self.zap_page(p);
                }
                self.alloc_page(key)
            }
            None => self.alloc_page(key),
        };
        let frame = match frame {
            Ok((f, wp)) => {
                flush |= wp;
                f
            }
            Err(e) => return (Err(e), flush),
        };
        if self.page(frame).root_count == 0
            && let Some(w) = self.window
        {
            let level = self.page(frame).key.role.level;
            if self.pool.load(frame, level.index(w.gva.raw())) == 0 {
                self.link_window(frame, level);
            }
        }
        let page = self.page_mut(frame);
        page.pdptes = pdptes;
        page.root_count += 1;
        let cache = self.roots.entry(vcpu).or_default();
        cache.entries.push_front(CachedRoot {
            ctx: *ctx,
            key,
            pdptes,
            frame,
        });
        let evicted = if cache.entries.len() > ROOT_CACHE_SIZE {
            cache.entries.pop_back()
        } else {
            None
        };
        if let Some(e) = evicted {
            flush |= self.put_root(e.frame);
        }
        self.counters.root_loads += 1;
        (Ok(frame), flush)
    }

    /// Drops one root reference; frees an invalid root nobody uses.
    pub(crate) fn put_root(&mut self, frame: FrameId) -> Flush {
        let p = self.page_mut(frame);
        p.root_count -= 1;
        if p.root_count == 0 && p.invalid {
            self.retire_frame(frame)
        } else {
            Flush::NONE
        }
    }

    /// Builds the host window: level-1 pages mapping every pool frame
    /// (supervisor, writable, not executable), one level-2 page, and the
    /// level-3 and level-4 pages roots link. Pinned: outside the active list
    /// and the hash. Journaling starts afterwards: nothing has walked the
    /// pool yet.
    pub(crate) fn build_host_window(&mut self, gva: Gva) -> Result<(), VcpuError> {
        let frames = self.pool.capacity();
        let l1_pages = frames.div_ceil(ENTRIES_PER_PAGE as u32);
        let alloc = |st: &mut Self, level: PtLevel| -> Result<FrameId, VcpuError> {
            let f = st.pool.alloc().ok_or(VcpuError::OutOfPages)?;
            let role = Role {
                level,
                direct: true,
                passthrough: true,
                access: Access3::ALL,
                cr0_wp: true,
                efer_nx: true,
                smep_andnot_wp: false,
                smap_andnot_wp: false,
                has_4_byte_gpte: false,
                quadrant: 0,
                guest_dirty: true,
                host_window: true,
                guest_levels: 0,
            };
            st.pages[f as usize] = Some(ShadowPage {
                key: SpKey { gfn: Gfn(0), role },
                generation: 0,
                seq: u64::MAX,
                root_count: 1,
                invalid: false,
                parents: Vec::new(),
                leaf_gfns: None,
                write_flooding: 0,
                pdptes: None,
                wp_epoch: 0,
            });
            Ok(f)
        };
        let l4 = alloc(self, PtLevel::PML4)?;
        let l3 = alloc(self, PtLevel::PDPT)?;
        let l2 = alloc(self, PtLevel::PD)?;
        for t in 0..l1_pages {
            let l1 = alloc(self, PtLevel::PT)?;
            for i in 0..ENTRIES_PER_PAGE as u32 {
                let frame = t * ENTRIES_PER_PAGE as u32 + i;
                if frame < frames {
                    let leaf = Spte::leaf(self.pool.hpa(frame), true, false, false);
                    self.pool.store(l1, i as usize, leaf.0);
                }
            }
            self.link(l2, t as usize, l1);
        }
        self.link(l3, PtLevel::PDPT.index(gva.raw()), l2);
        self.link(l4, PtLevel::PML4.index(gva.raw()), l3);
        self.window = Some(HostWindow { gva, l3, l4 });
        self.pool.enable_journal();
        Ok(())
    }

    /// Links the host window into a new root of `level`.
    pub(crate) fn link_window(&mut self, root: FrameId, level: PtLevel) {
        let Some(w) = self.window else { return };
        let child = if level == PtLevel::PML5 { w.l4 } else { w.l3 };
        self.link(root, level.index(w.gva.raw()), child);
    }
}
