//! The MMU state behind the VM's MMU lock: shadow pages, their hash, the
//! rmap, parent lists, the active list, memslots and dirty logs.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use mmu_api::paging::SlotMemory;
use mmu_api::{DirtyBitmap, Gfn, Gpa, MemslotFlags, MemslotTable, SlotId, VcpuError, VcpuId};

use crate::pool::{ENTRIES_PER_PAGE, FrameId, ShadowPool};
use crate::role::SpKey;
use crate::spte::Spte;
use crate::stats::Counters;
use crate::vcpu::{Requests, VcpuShared};
use crate::{ReclaimPolicy, ShadowConfig};

/// Where one SPTE lives: shadow page and index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct SptePtr {
    pub(crate) sp: FrameId,
    pub(crate) index: u16,
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
    pub(crate) leaf_gfns: Option<Box<[Gfn]>>,
    /// Emulated writes to the shadowed guest table since it was last used.
    pub(crate) write_flooding: u8,
    /// PAE roots: the PDPTEs the root was built from.
    pub(crate) pdptes: Option<[u64; 4]>,
}

/// One entry of a vCPU's root cache.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CachedRoot {
    /// The guest context the root was last loaded for (audits re-walk it).
    pub(crate) ctx: mmu_api::PagingContext,
    pub(crate) key: SpKey,
    pub(crate) pdptes: Option<[u64; 4]>,
    pub(crate) frame: FrameId,
}

/// A vCPU's roots: the current one first, then recent ones.
#[derive(Debug, Default)]
pub(crate) struct RootCache {
    pub(crate) entries: VecDeque<CachedRoot>,
}

/// Everything behind the MMU lock.
#[derive(Debug)]
pub(crate) struct MmuState {
    pub(crate) pool: ShadowPool,
    pub(crate) pages: Vec<Option<ShadowPage>>,
    /// Pages by (gfn, role) and generation: an obsolete page stays under its
    /// own generation, where no lookup looks.
    pub(crate) hash: HashMap<(SpKey, u64), FrameId>,
    /// Leaf SPTEs mapping each gfn.
    pub(crate) rmap: HashMap<Gfn, Vec<SptePtr>>,
    /// Shadow pages shadowing each guest table frame (write-protected).
    pub(crate) gfn_pages: HashMap<Gfn, Vec<FrameId>>,
    /// Active pages by age (FIFO: oldest first).
    pub(crate) active: BTreeMap<u64, FrameId>,
    pub(crate) next_seq: u64,
    pub(crate) slots: MemslotTable,
    pub(crate) dirty: HashMap<SlotId, DirtyBitmap>,
    pub(crate) counters: Counters,
    pub(crate) page_limit: Option<u64>,
    /// Zapped pages waiting for the remote TLB flush before reuse.
    pub(crate) pending_free: Vec<FrameId>,
    /// A present SPTE was removed or narrowed since the last flush.
    pub(crate) need_flush: bool,
    /// A root was zapped since the last reload request.
    pub(crate) need_reload: bool,
    pub(crate) vcpus: Vec<Arc<VcpuShared>>,
    pub(crate) roots: HashMap<VcpuId, RootCache>,
    /// The valid generation.
    pub(crate) valid_gen: u64,
    /// Pages of a generation below this one are out of every vCPU's reach
    /// (the reload handshake finished): they can be zapped with no flush.
    pub(crate) safe_gen: u64,
    /// Obsolete pages not yet zapped. While any are pending, the page count
    /// may exceed the limit and no valid page is reclaimed.
    pub(crate) obsolete_pending: u64,
    /// Frames of zapped obsolete pages: allocation takes these first.
    pub(crate) zapped_obsolete: Vec<FrameId>,
    pub(crate) policy: ReclaimPolicy,
    pub(crate) zap_batch: usize,
    /// MMIO caching is on. Only then is an SPTE with bit 51 an MMIO SPTE:
    /// with it off the host may have MAXPHYADDR 52, where bit 51 is an
    /// address bit of ordinary leaves.
    pub(crate) mmio_enabled: bool,
    /// Replay coherence: the window address and its level-3 and level-4
    /// pages, which every 4-level (resp. 5-level) root links.
    pub(crate) window: Option<HostWindow>,
}

/// The host window: the pool mapped supervisor-only into every root.
#[derive(Clone, Copy, Debug)]
pub(crate) struct HostWindow {
    pub(crate) gva: mmu_api::Gva,
    pub(crate) l3: FrameId,
    pub(crate) l4: FrameId,
}

/// How many roots a vCPU keeps (the current one and three recent CR3s).
pub(crate) const ROOT_CACHE_SIZE: usize = 4;

impl MmuState {
    pub(crate) fn new(config: &ShadowConfig, pool: ShadowPool, gpa_width: u8) -> Self {
        let frames = pool.capacity() as usize;
        MmuState {
            page_limit: config.page_limit,
            pool,
            pages: (0..frames).map(|_| None).collect(),
            hash: HashMap::new(),
            rmap: HashMap::new(),
            gfn_pages: HashMap::new(),
            active: BTreeMap::new(),
            next_seq: 0,
            slots: MemslotTable::new(gpa_width, mmu_api::DEFAULT_MAX_SLOTS),
            dirty: HashMap::new(),
            counters: Counters::default(),
            pending_free: Vec::new(),
            need_flush: false,
            need_reload: false,
            vcpus: Vec::new(),
            roots: HashMap::new(),
            valid_gen: 0,
            safe_gen: 0,
            obsolete_pending: 0,
            zapped_obsolete: Vec::new(),
            policy: config.reclaim,
            zap_batch: config.zap_batch.max(1),
            mmio_enabled: config.mmio_caching,
            window: None,
        }
    }

    /// The guest memory port over the current memslots.
    pub(crate) fn guest_mem(&self) -> SlotMemory<'_> {
        // SAFETY: every slot in the table was registered through
        // `MmuBackend::set_memslot`, whose contract keeps its host mapping
        // valid until `delete_memslot` returns; deletion takes this lock, so
        // no slot leaves the table while the port borrows it.
        unsafe { SlotMemory::new(&self.slots) }
    }

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

    /// Shadow pages currently allocated (including invalid roots and pages
    /// waiting for their flush).
    pub(crate) fn used_pages(&self) -> u64 {
        u64::from(self.pool.capacity() - self.pool.free_frames())
    }

    /// The limit in force: the configured one, capped by the pool.
    pub(crate) fn effective_limit(&self) -> u64 {
        let cap = u64::from(self.pool.capacity());
        self.page_limit.map_or(cap, |l| l.min(cap))
    }

    /// True if `gfn` holds a guest page table some shadow page shadows.
    pub(crate) fn is_write_protected(&self, gfn: Gfn) -> bool {
        self.gfn_pages.get(&gfn).is_some_and(|v| !v.is_empty())
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

    /// Builds the host window: level-1 pages mapping every pool frame
    /// (supervisor, writable, not executable), one level-2 page, and the
    /// level-3 and level-4 pages roots link. Pinned: outside the active list
    /// and the hash. Journaling starts afterwards: nothing has walked the
    /// pool yet.
    pub(crate) fn build_host_window(&mut self, gva: mmu_api::Gva) -> Result<(), VcpuError> {
        use crate::role::{Access3, Role};
        let frames = self.pool.capacity();
        let l1_pages = frames.div_ceil(ENTRIES_PER_PAGE as u32);
        let alloc = |st: &mut Self, level: u8| -> Result<FrameId, VcpuError> {
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
            });
            Ok(f)
        };
        let l4 = alloc(self, 4)?;
        let l3 = alloc(self, 3)?;
        let l2 = alloc(self, 2)?;
        for t in 0..l1_pages {
            let l1 = alloc(self, 1)?;
            for i in 0..ENTRIES_PER_PAGE as u32 {
                let frame = t * ENTRIES_PER_PAGE as u32 + i;
                if frame < frames {
                    let leaf = Spte::leaf(self.pool.hpa(frame), true, false, false);
                    self.pool.store(l1, i as usize, leaf.0);
                }
            }
            self.link(l2, t as usize, l1);
        }
        self.link(l3, ((gva.raw() >> 30) & 0x1ff) as usize, l2);
        self.link(l4, ((gva.raw() >> 39) & 0x1ff) as usize, l3);
        self.window = Some(HostWindow { gva, l3, l4 });
        self.pool.enable_journal();
        Ok(())
    }

    /// Links the host window into a new root of `level`.
    pub(crate) fn link_window(&mut self, root: FrameId, level: u8) {
        let Some(w) = self.window else { return };
        let (index, child) = if level == 5 {
            (((w.gva.raw() >> 48) & 0x1ff) as usize, w.l4)
        } else {
            (((w.gva.raw() >> 39) & 0x1ff) as usize, w.l3)
        };
        self.link(root, index, child);
    }

    /// True if `gva` falls in the host window's top-level slot of a root of
    /// `level`.
    pub(crate) fn in_window(&self, gva: mmu_api::Gva, level: u8) -> bool {
        self.window.is_some_and(|w| {
            let shift = 12 + 9 * (u32::from(level) - 1);
            (gva.raw() >> shift) & 0x1ff == (w.gva.raw() >> shift) & 0x1ff
                && (level == 5 || (gva.raw() >> 48) == (w.gva.raw() >> 48))
        })
    }

    /// Allocates a shadow page for `key`. The caller made pages available
    /// first ([`make_pages_available`](Self::make_pages_available)).
    pub(crate) fn alloc_page(&mut self, key: SpKey) -> Result<FrameId, VcpuError> {
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
        let leaf_gfns =
            (key.role.level == 1).then(|| vec![Gfn(0); ENTRIES_PER_PAGE].into_boxed_slice());
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
        if key.role.shadows_guest_table() {
            let list = self.gfn_pages.entry(key.gfn).or_default();
            list.push(frame);
            if list.len() == 1 {
                self.write_protect_gfn(key.gfn);
            }
        }
        tracing::trace!(
            frame,
            gfn = key.gfn.raw(),
            level = key.role.level,
            "shadow page allocated"
        );
        Ok(frame)
    }

    /// Finds or creates the shadow page for `key`.
    pub(crate) fn get_or_create(&mut self, key: SpKey) -> Result<FrameId, VcpuError> {
        match self.lookup(&key) {
            Some(f) => Ok(f),
            None => self.alloc_page(key),
        }
    }

    /// Removes write access from every leaf SPTE mapping `gfn`.
    pub(crate) fn write_protect_gfn(&mut self, gfn: Gfn) {
        let Some(ptrs) = self.rmap.get(&gfn) else {
            return;
        };
        for p in ptrs {
            let spte = Spte(self.pool.load(p.sp, usize::from(p.index)));
            if spte.is_writable() {
                self.pool
                    .store(p.sp, usize::from(p.index), spte.write_protected().0);
                self.need_flush = true;
            }
        }
    }

    /// Moves a page to the young end of the active list.
    fn make_young(&mut self, frame: FrameId) {
        let seq = self.next_seq;
        let page = self.pages[frame as usize].as_mut().expect("live page");
        if page.invalid || self.active.remove(&page.seq).is_none() {
            return;
        }
        page.seq = seq;
        self.next_seq += 1;
        self.active.insert(seq, frame);
    }

    /// Writes a link from `parent[index]` to `child`. Under parent-aware
    /// reclaim the parent becomes young: it now holds a fresh table.
    pub(crate) fn link(&mut self, parent: FrameId, index: usize, child: FrameId) {
        if self.policy == ReclaimPolicy::ParentAware {
            self.make_young(parent);
        }
        let hpa = self.pool.hpa(child);
        self.pool.store(parent, index, Spte::link(hpa).0);
        self.page_mut(child).parents.push(SptePtr {
            sp: parent,
            index: index as u16,
        });
    }

    /// Installs a leaf SPTE in level-1 page `sp` mapping `gfn`.
    pub(crate) fn set_leaf(&mut self, sp: FrameId, index: usize, gfn: Gfn, spte: Spte) {
        let old = Spte(self.pool.load(sp, index));
        if old.is_present() {
            let old_gfn = self.page(sp).leaf_gfns.as_ref().expect("level 1")[index];
            if old_gfn != gfn || self.is_mmio_spte(old.0) {
                self.drop_spte(sp, index);
            } else if old.is_writable() && !spte.is_writable() {
                self.need_flush = true;
            }
        }
        let was_present = Spte(self.pool.load(sp, index)).is_present();
        self.pool.store(sp, index, spte.0);
        self.page_mut(sp).leaf_gfns.as_mut().expect("level 1")[index] = gfn;
        if !was_present {
            self.rmap.entry(gfn).or_default().push(SptePtr {
                sp,
                index: index as u16,
            });
        }
    }

    /// Clears one SPTE, unlinking a child or dropping an rmap entry.
    pub(crate) fn drop_spte(&mut self, sp: FrameId, index: usize) {
        let spte = Spte(self.pool.load(sp, index));
        if !spte.is_present() {
            return;
        }
        let ptr = SptePtr {
            sp,
            index: index as u16,
        };
        if self.page(sp).key.role.level > 1 {
            let child = self
                .pool
                .frame_at(spte.addr())
                .expect("a link points into the pool");
            self.page_mut(child).parents.retain(|p| *p != ptr);
        } else {
            let gfn = self.page(sp).leaf_gfns.as_ref().expect("level 1")[index];
            if let Some(list) = self.rmap.get_mut(&gfn) {
                list.retain(|p| *p != ptr);
                if list.is_empty() {
                    self.rmap.remove(&gfn);
                }
            }
        }
        self.pool.store(sp, index, 0);
        self.need_flush = true;
    }

    /// Zaps one shadow page: unlinks it from its parents and its children,
    /// drops its leaves from the rmap, and queues its frame for freeing
    /// after the next remote flush (or marks it invalid if it is a root).
    pub(crate) fn zap_page(&mut self, frame: FrameId) {
        for i in 0..ENTRIES_PER_PAGE {
            self.drop_spte(frame, i);
        }
        let parents = std::mem::take(&mut self.page_mut(frame).parents);
        for p in parents {
            self.pool.store(p.sp, usize::from(p.index), 0);
            self.need_flush = true;
        }
        let (key, generation, seq, root_count, already_invalid) = {
            let p = self.page(frame);
            (p.key, p.generation, p.seq, p.root_count, p.invalid)
        };
        if !already_invalid {
            if self.hash.get(&(key, generation)) == Some(&frame) {
                self.hash.remove(&(key, generation));
            }
            if generation != self.valid_gen {
                self.obsolete_pending -= 1;
            }
            self.active.remove(&seq);
            if key.role.shadows_guest_table()
                && let Some(list) = self.gfn_pages.get_mut(&key.gfn)
            {
                list.retain(|f| *f != frame);
                if list.is_empty() {
                    self.gfn_pages.remove(&key.gfn);
                }
            }
            self.counters.sps_zapped += 1;
        }
        if root_count > 0 {
            self.page_mut(frame).invalid = true;
            self.need_reload = true;
        } else {
            self.retire_frame(frame);
        }
        tracing::debug!(
            frame,
            gfn = key.gfn.raw(),
            level = key.role.level,
            "shadow page zapped"
        );
    }

    /// Drops one root reference; frees an invalid root nobody uses.
    pub(crate) fn put_root(&mut self, frame: FrameId) {
        let p = self.page_mut(frame);
        p.root_count -= 1;
        if p.root_count == 0 && p.invalid {
            self.retire_frame(frame);
        }
    }

    /// Queues a zapped page's frame for freeing after the next remote
    /// flush, and journals it for a host that shadows the pool.
    fn retire_frame(&mut self, frame: FrameId) {
        self.pending_free.push(frame);
        self.pool.journal_frame(frame);
    }

    /// Zaps every shadow page under the lock (the naive zap-all).
    pub(crate) fn zap_all_pages(&mut self) {
        let frames: Vec<FrameId> = self.active.values().copied().collect();
        for f in frames {
            if self.pages[f as usize].as_ref().is_some_and(|p| !p.invalid) {
                self.zap_page(f);
            }
        }
        self.counters.zap_all += 1;
        self.counters.naive_zaps += 1;
    }

    /// True if `spte` is an MMIO SPTE of this backend.
    pub(crate) fn is_mmio_spte(&self, spte: u64) -> bool {
        self.mmio_enabled && crate::spte::mmio::is_mmio(spte)
    }

    /// Installs an MMIO SPTE (never in the rmap: it maps no memory).
    pub(crate) fn set_mmio_leaf(&mut self, sp: FrameId, index: usize, gfn: Gfn, value: u64) {
        self.drop_spte(sp, index);
        self.pool.store(sp, index, value);
        self.page_mut(sp).leaf_gfns.as_mut().expect("level 1")[index] = gfn;
        self.counters.mmio_sptes += 1;
    }

    /// Zaps up to `max` obsolete pages that no vCPU can reach any more,
    /// oldest first, into the zapped-obsolete list. No TLB flush is needed:
    /// the reload handshake already took every vCPU off them. Returns the
    /// number zapped.
    pub(crate) fn zap_obsolete_batch(&mut self, max: usize) -> usize {
        // Obsolete pages are the oldest: new pages are added at the young
        // end, and only valid pages are ever made young again.
        let safe_gen = self.safe_gen;
        let victims: Vec<FrameId> = self
            .active
            .values()
            .copied()
            .take_while(|&f| self.page(f).generation < safe_gen)
            .take(max)
            .collect();
        let flush_before = self.need_flush;
        let reload_before = self.need_reload;
        let pending_before = self.pending_free.len();
        for &v in &victims {
            self.zap_page(v);
        }
        self.need_flush = flush_before;
        self.need_reload = reload_before;
        for f in self.pending_free.split_off(pending_before) {
            self.pages[f as usize] = None;
            self.zapped_obsolete.push(f);
        }
        self.counters.obsolete_zapped += victims.len() as u64;
        victims.len()
    }

    /// Returns every frame on the zapped-obsolete list to the pool.
    pub(crate) fn free_zapped_obsolete(&mut self) -> u64 {
        let n = self.zapped_obsolete.len() as u64;
        for f in std::mem::take(&mut self.zapped_obsolete) {
            self.pool.free(f);
        }
        self.counters.obsolete_freed += n;
        n
    }

    /// The next valid page reclaim takes, by policy; roots are skipped.
    fn reclaim_victim(&self) -> Option<FrameId> {
        let evictable = |f: &FrameId| self.page(*f).root_count == 0;
        let mut pages = self.active.values().copied();
        match self.policy {
            ReclaimPolicy::Fifo => pages.find(evictable),
            ReclaimPolicy::ParentAware => self
                .active
                .values()
                .copied()
                .find(|f| evictable(f) && self.page(*f).key.role.level == 1)
                .or_else(|| pages.find(evictable)),
        }
    }

    /// Makes `need` pages allocatable under the limit. In order: the
    /// zapped-obsolete list and obsolete pages no vCPU can reach (zapped in
    /// batches); then, while obsolete pages are still pending (a reload
    /// handshake is under way), the limit is exceeded rather than any valid
    /// page reclaimed; only then valid pages, by policy. Called before a
    /// fault builds its path, so no page of that path is reclaimed while it
    /// is being linked. Returns the number of valid pages reclaimed.
    pub(crate) fn make_pages_available(&mut self, need: u64) -> u64 {
        let limit = self.effective_limit();
        let available =
            |s: &Self| limit.saturating_sub(s.used_pages()) + s.zapped_obsolete.len() as u64;
        if available(self) >= need {
            return 0;
        }
        // As KVM: once short, free a batch so the next faults do not
        // reclaim one page at a time.
        let target = need.max((limit / 4).min(25));
        while available(self) < target && self.zap_obsolete_batch(self.zap_batch) > 0 {}
        if available(self) >= need {
            return 0;
        }
        if self.obsolete_pending > 0 && u64::from(self.pool.free_frames()) >= need {
            return 0;
        }
        let mut reclaimed = 0;
        while available(self) < target {
            let want = (target - available(self)) as usize;
            let mut victims = Vec::new();
            for _ in 0..want {
                let Some(v) = self.reclaim_victim() else {
                    break;
                };
                if self.page(v).key.role.level == 1 {
                    self.counters.reclaimed_leaf_pages += 1;
                } else {
                    self.counters.reclaimed_directory_pages += 1;
                }
                self.zap_page(v);
                victims.push(v);
            }
            if victims.is_empty() && !self.evict_cached_roots() {
                break;
            }
            if self.obsolete_pending > 0 {
                self.counters.valid_reclaimed_with_obsolete_pending += victims.len() as u64;
            }
            reclaimed += victims.len() as u64;
            // Frames only return to the pool after the flush.
            self.commit_zap();
        }
        self.counters.reclaimed_valid += reclaimed;
        if reclaimed > 0 {
            tracing::debug!(
                reclaimed,
                used = self.used_pages(),
                limit,
                "reclaimed shadow pages"
            );
        }
        reclaimed
    }

    /// The first half of a fast zap, under the lock: every page becomes
    /// obsolete, and every vCPU is asked to load a fresh root before it
    /// enters again. Returns the vCPUs whose handshake the caller waits for
    /// (without the lock), and the new valid generation.
    pub(crate) fn begin_fast_zap(&mut self) -> (Vec<Arc<VcpuShared>>, u64) {
        self.valid_gen += 1;
        self.obsolete_pending = self.active.len() as u64;
        self.counters.fast_zaps += 1;
        self.counters.zap_all += 1;
        for v in &self.vcpus {
            v.post(Requests::RELOAD_ROOT);
        }
        tracing::debug!(
            generation = self.valid_gen,
            obsolete = self.obsolete_pending,
            "fast zap"
        );
        (self.vcpus.clone(), self.valid_gen)
    }

    /// The second half: every vCPU has reloaded or is out of guest mode and
    /// will reload before it enters, so pages older than `generation` are
    /// out of reach.
    pub(crate) fn finish_fast_zap(&mut self, generation: u64) {
        self.safe_gen = self.safe_gen.max(generation);
    }

    /// Drops every vCPU's cached roots except its current one. Returns true
    /// if any root reference was dropped.
    fn evict_cached_roots(&mut self) -> bool {
        let mut dropped = Vec::new();
        for cache in self.roots.values_mut() {
            while cache.entries.len() > 1 {
                dropped.push(cache.entries.pop_back().expect("len > 1").frame);
            }
        }
        let any = !dropped.is_empty();
        for f in dropped {
            self.put_root(f);
        }
        any
    }

    /// Makes every vCPU drop stale translations, then frees the zapped
    /// frames. Called before the lock is released after any zap.
    pub(crate) fn commit_zap(&mut self) {
        if self.need_reload {
            self.need_reload = false;
            self.request_all(Requests::RELOAD_ROOT);
        }
        if self.need_flush || !self.pending_free.is_empty() {
            self.need_flush = false;
            self.counters.remote_flushes += 1;
            self.request_all(Requests::FLUSH_TLB);
        }
        for f in std::mem::take(&mut self.pending_free) {
            self.pages[f as usize] = None;
            self.pool.free(f);
            self.counters.sps_freed += 1;
        }
    }

    /// Posts `req` to every vCPU, kicks those in guest mode, and waits until
    /// each has acknowledged or left guest mode (it then services the
    /// request before it enters again).
    pub(crate) fn request_all(&self, req: Requests) {
        for v in &self.vcpus {
            v.post(req);
        }
        for v in &self.vcpus {
            v.wait_out_of_guest_or_ack(req);
        }
    }

    /// Marks `gfn` dirty in its slot's log, if the slot logs.
    pub(crate) fn mark_dirty(&mut self, gfn: Gfn) {
        let Some(slot) = self.slots.find_gfn(gfn) else {
            return;
        };
        if slot.flags.contains(MemslotFlags::LOG_DIRTY) {
            let page = gfn.raw() - slot.base_gfn().raw();
            let id = slot.id;
            let pages = slot.pages();
            let map = self
                .dirty
                .entry(id)
                .or_insert_with(|| DirtyBitmap::new(pages));
            if !map.is_dirty(page) {
                self.counters.dirty_pages_logged += 1;
            }
            map.set(page);
        }
    }

    /// Removes write access from every leaf mapping a gfn in `[start, end)`.
    pub(crate) fn write_protect_range(&mut self, start: Gfn, end: Gfn) {
        let gfns = keys_in_range(&self.rmap, start, end);
        for g in gfns {
            self.write_protect_gfn(g);
        }
    }

    /// Zaps every shadow page shadowing a guest table in `[start, end)`
    /// (the host wrote there behind the guest's back).
    pub(crate) fn zap_shadowed_range(&mut self, start: Gfn, end: Gfn) {
        let frames: Vec<FrameId> = keys_in_range(&self.gfn_pages, start, end)
            .into_iter()
            .flat_map(|g| self.gfn_pages[&g].iter().copied())
            .collect();
        for f in frames {
            if self.pages[f as usize].as_ref().is_some_and(|p| !p.invalid) {
                self.zap_page(f);
            }
        }
    }

    /// Whether a guest-physical address is backed by a slot.
    pub(crate) fn slot_of(&self, gpa: Gpa) -> Option<mmu_api::Memslot> {
        self.slots.find(gpa).copied()
    }

    /// The vCPU with this id has its root cache entry.
    pub(crate) fn register_vcpu(&mut self, shared: Arc<VcpuShared>) {
        self.roots.insert(shared.id, RootCache::default());
        self.vcpus.push(shared);
    }
}

/// The keys of `map` in `[start, end)`, visiting whichever is smaller: the
/// range or the map. A harvest or a host write then costs what its slot or
/// range holds, not what the whole VM maps.
fn keys_in_range<V>(map: &HashMap<Gfn, V>, start: Gfn, end: Gfn) -> Vec<Gfn> {
    let span = end.raw().saturating_sub(start.raw());
    if span <= map.len() as u64 {
        (start.raw()..end.raw())
            .map(Gfn)
            .filter(|g| map.contains_key(g))
            .collect()
    } else {
        map.keys()
            .copied()
            .filter(|g| *g >= start && *g < end)
            .collect()
    }
}
