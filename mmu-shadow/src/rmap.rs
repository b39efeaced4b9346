//! The rmap (gfn to the leaf SPTEs mapping it) and each shadow page's
//! parent SPTEs, kept exact on every link, leaf and drop.
//!
//! KVM: mmu.c's `rmap_add` / `rmap_remove`, `mmu_page_add_parent_pte` /
//! `mmu_page_remove_parent_pte`, `link_shadow_page` and `drop_spte`.
//!
//! The rmap is split in shards by 2 MiB guest-physical region, each behind
//! its own small lock on its own cache lines: faults that install leaves
//! holding the MMU lock shared (different vCPUs, different pages) add to
//! it at the same time, and usually to different shards. Everything else
//! holds the MMU lock exclusively and reaches the shards without locking.

use std::sync::{Mutex, MutexGuard};

use mmu_api::Gfn;

use crate::ReclaimPolicy;
use crate::page::FastMap;
use crate::pool::FrameId;
use crate::spte::Spte;
use crate::state::MmuState;
use crate::zap::Flush;

/// Where one SPTE lives: shadow page and index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct SptePtr {
    pub(crate) sp: FrameId,
    pub(crate) index: u16,
}

/// The leaves mapping one gfn. Most gfns are mapped once: that case needs
/// no allocation (KVM's `pte_list_desc` keeps one entry inline likewise).
#[derive(Clone, Debug)]
pub(crate) enum RmapList {
    One(SptePtr),
    Many(Vec<SptePtr>),
}

impl RmapList {
    /// Every leaf in the list.
    pub(crate) fn as_slice(&self) -> &[SptePtr] {
        match self {
            RmapList::One(p) => std::slice::from_ref(p),
            RmapList::Many(v) => v,
        }
    }

    /// Adds a leaf.
    fn push(&mut self, ptr: SptePtr) {
        match self {
            RmapList::One(p) => *self = RmapList::Many(vec![*p, ptr]),
            RmapList::Many(v) => v.push(ptr),
        }
    }

    /// Removes a leaf; returns true if the list is now empty.
    fn remove(&mut self, ptr: SptePtr) -> bool {
        match self {
            RmapList::One(p) => *p == ptr,
            RmapList::Many(v) => {
                v.retain(|p| *p != ptr);
                v.is_empty()
            }
        }
    }
}

/// Number of rmap shards (a power of two).
const RMAP_SHARDS: usize = 16;

/// One shard, alone on its cache lines.
#[derive(Debug, Default)]
#[repr(align(128))]
struct RmapShard(Mutex<FastMap<Gfn, RmapList>>);

/// The rmap: gfn to the leaf SPTEs mapping it, in shards.
#[derive(Debug)]
pub(crate) struct Rmap {
    shards: Box<[RmapShard]>,
}

impl Default for Rmap {
    fn default() -> Self {
        Rmap {
            shards: (0..RMAP_SHARDS).map(|_| RmapShard::default()).collect(),
        }
    }
}

impl Rmap {
    /// The shard holding `gfn`: one per 2 MiB region, so a vCPU working
    /// through a range keeps to one shard.
    fn shard_index(gfn: Gfn) -> usize {
        (gfn.raw() >> 9) as usize & (RMAP_SHARDS - 1)
    }

    /// The shard holding `gfn`, for a holder of the MMU lock exclusively.
    fn shard_mut(&mut self, gfn: Gfn) -> &mut FastMap<Gfn, RmapList> {
        let shard = &mut self.shards[Self::shard_index(gfn)].0;
        shard.get_mut().unwrap_or_else(|e| e.into_inner())
    }

    /// The shard holding `gfn`, locked, for a holder of the MMU lock
    /// shared (or a reader holding it exclusively).
    fn shard(&self, gfn: Gfn) -> MutexGuard<'_, FastMap<Gfn, RmapList>> {
        // A panic under a shard lock is a bug that already failed its
        // thread; the map is still the best there is.
        self.shards[Self::shard_index(gfn)]
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a leaf to `gfn`'s list.
    fn add_to(map: &mut FastMap<Gfn, RmapList>, gfn: Gfn, ptr: SptePtr) {
        match map.entry(gfn) {
            std::collections::hash_map::Entry::Occupied(mut e) => e.get_mut().push(ptr),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(RmapList::One(ptr));
            }
        }
    }

    /// Adds a leaf mapping `gfn` (MMU lock held exclusively).
    pub(crate) fn add(&mut self, gfn: Gfn, ptr: SptePtr) {
        Self::add_to(self.shard_mut(gfn), gfn, ptr);
    }

    /// Adds a leaf mapping `gfn` (MMU lock held shared).
    pub(crate) fn add_shared(&self, gfn: Gfn, ptr: SptePtr) {
        Self::add_to(&mut self.shard(gfn), gfn, ptr);
    }

    /// Removes a leaf mapping `gfn`.
    pub(crate) fn remove(&mut self, gfn: Gfn, ptr: SptePtr) {
        let map = self.shard_mut(gfn);
        if map.get_mut(&gfn).is_some_and(|list| list.remove(ptr)) {
            map.remove(&gfn);
        }
    }

    /// The leaves mapping `gfn`.
    pub(crate) fn get(&mut self, gfn: Gfn) -> Option<&RmapList> {
        self.shard_mut(gfn).get(&gfn)
    }

    /// True if `ptr` is a leaf mapping `gfn` in the rmap.
    pub(crate) fn contains(&self, gfn: Gfn, ptr: SptePtr) -> bool {
        self.shard(gfn)
            .get(&gfn)
            .is_some_and(|v| v.as_slice().contains(&ptr))
    }

    /// Every gfn and its leaves, shard by shard.
    pub(crate) fn entries(&self) -> Vec<(Gfn, RmapList)> {
        self.shards
            .iter()
            .flat_map(|s| {
                let map = s.0.lock().unwrap_or_else(|e| e.into_inner());
                map.iter().map(|(g, l)| (*g, l.clone())).collect::<Vec<_>>()
            })
            .collect()
    }

    /// The gfns in `[start, end)` that have leaves, visiting whichever is
    /// smaller: the range or the rmap.
    pub(crate) fn keys_in_range(&mut self, start: Gfn, end: Gfn) -> Vec<Gfn> {
        let len: usize = self
            .shards
            .iter_mut()
            .map(|s| {
                s.0.get_mut()
                    .map_or_else(|e| e.into_inner().len(), |m| m.len())
            })
            .sum();
        let span = end.raw().saturating_sub(start.raw());
        if span <= len as u64 {
            (start.raw()..end.raw())
                .map(Gfn)
                .filter(|&g| self.shard_mut(g).contains_key(&g))
                .collect()
        } else {
            let mut keys: Vec<Gfn> = self
                .shards
                .iter_mut()
                .flat_map(|s| {
                    let map = s.0.get_mut().unwrap_or_else(|e| e.into_inner());
                    map.keys().copied().filter(|g| *g >= start && *g < end)
                })
                .collect();
            keys.sort_unstable();
            keys
        }
    }
}

impl MmuState {
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

    /// Installs a leaf SPTE in level-1 page `sp` mapping `gfn`. Replacing a
    /// leaf for another gfn, or narrowing one, owes a flush.
    pub(crate) fn set_leaf(&mut self, sp: FrameId, index: usize, gfn: Gfn, spte: Spte) -> Flush {
        let mut flush = Flush::NONE;
        let old = Spte(self.pool.load(sp, index));
        if old.is_present() {
            let old_gfn = self
                .page(sp)
                .leaf_gfns
                .as_ref()
                .expect("level 1")
                .get(index);
            if old_gfn != gfn || self.is_mmio_spte(old.0) {
                flush |= self.drop_spte(sp, index);
            } else if old.is_writable() && !spte.is_writable() {
                flush |= Flush::TLB;
            }
        }
        let was_present = Spte(self.pool.load(sp, index)).is_present();
        self.pool.store(sp, index, spte.0);
        self.page(sp)
            .leaf_gfns
            .as_ref()
            .expect("level 1")
            .set(index, gfn);
        if !was_present {
            let ptr = SptePtr {
                sp,
                index: index as u16,
            };
            self.rmap.add(gfn, ptr);
        }
        flush
    }

    /// Installs a leaf SPTE in the empty entry `index` of level-1 page
    /// `sp`, holding the MMU lock shared. False if the entry is not empty
    /// (another fault filled it first). Filling an empty entry owes no
    /// flush.
    pub(crate) fn install_leaf_shared(
        &self,
        sp: FrameId,
        index: usize,
        gfn: Gfn,
        spte: Spte,
    ) -> bool {
        if !self.pool.fill_empty(sp, index, spte.0) {
            return false;
        }
        // The entry is ours: no other fault writes its gfn or rmap entry.
        self.page(sp)
            .leaf_gfns
            .as_ref()
            .expect("level 1")
            .set(index, gfn);
        self.rmap.add_shared(
            gfn,
            SptePtr {
                sp,
                index: index as u16,
            },
        );
        true
    }

    /// Clears one SPTE, unlinking a child or dropping an rmap entry.
    pub(crate) fn drop_spte(&mut self, sp: FrameId, index: usize) -> Flush {
        let spte = Spte(self.pool.load(sp, index));
        if !spte.is_present() {
            return Flush::NONE;
        }
        // Lock-free walkers of the shadow tables must see the change.
        self.invalidate_begin();
        let ptr = SptePtr {
            sp,
            index: index as u16,
        };
        if self.page(sp).key.role.level.is_pt() {
            let gfn = self
                .page(sp)
                .leaf_gfns
                .as_ref()
                .expect("level 1")
                .get(index);
            self.rmap.remove(gfn, ptr);
        } else {
            let child = self
                .pool
                .frame_at(spte.addr())
                .expect("a link points into the pool");
            self.page_mut(child).parents.retain(|p| *p != ptr);
        }
        self.pool.store(sp, index, 0);
        Flush::TLB
    }
}

/// The keys of `map` in `[start, end)`, visiting whichever is smaller: the
/// range or the map. A harvest or a host write then costs what its slot or
/// range holds, not what the whole VM maps.
pub(crate) fn keys_in_range<V>(map: &FastMap<Gfn, V>, start: Gfn, end: Gfn) -> Vec<Gfn> {
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
