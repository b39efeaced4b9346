//! The rmap (gfn to the leaf SPTEs mapping it) and each shadow page's
//! parent SPTEs, kept exact on every link, leaf and drop.
//!
//! KVM: mmu.c's `rmap_add` / `rmap_remove`, `mmu_page_add_parent_pte` /
//! `mmu_page_remove_parent_pte`, `link_shadow_page` and `drop_spte`.

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
            let old_gfn = self.page(sp).leaf_gfns.as_ref().expect("level 1")[index];
            if old_gfn != gfn || self.is_mmio_spte(old.0) {
                flush |= self.drop_spte(sp, index);
            } else if old.is_writable() && !spte.is_writable() {
                flush |= Flush::TLB;
            }
        }
        let was_present = Spte(self.pool.load(sp, index)).is_present();
        self.pool.store(sp, index, spte.0);
        self.page_mut(sp).leaf_gfns.as_mut().expect("level 1")[index] = gfn;
        if !was_present {
            let ptr = SptePtr {
                sp,
                index: index as u16,
            };
            match self.rmap.entry(gfn) {
                std::collections::hash_map::Entry::Occupied(mut e) => e.get_mut().push(ptr),
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(RmapList::One(ptr));
                }
            }
        }
        flush
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
            let gfn = self.page(sp).leaf_gfns.as_ref().expect("level 1")[index];
            if self.rmap.get_mut(&gfn).is_some_and(|list| list.remove(ptr)) {
                self.rmap.remove(&gfn);
            }
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
