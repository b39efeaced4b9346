//! Keeping the shadow page count under the limit: obsolete pages first,
//! then valid pages by policy.
//!
//! KVM: mmu.c's `make_mmu_pages_available`, `kvm_mmu_zap_oldest_mmu_pages`
//! and `kvm_mmu_change_mmu_pages`.

use crate::ReclaimPolicy;
use crate::pool::FrameId;
use crate::state::MmuState;
use crate::zap::Flush;

impl MmuState {
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
                .find(|f| evictable(f) && self.page(*f).key.role.level.is_pt())
                .or_else(|| pages.find(evictable)),
        }
    }

    /// Pages that can be allocated under the limit once the owed commit
    /// returns the retired frames.
    pub(crate) fn available(&self, limit: u64) -> u64 {
        limit.saturating_sub(self.used_pages())
            + self.zapped_obsolete.len() as u64
            + self.pending_free.len() as u64
    }

    /// Makes `need` pages allocatable under the limit. In order: the
    /// zapped-obsolete list and obsolete pages no vCPU can reach (zapped in
    /// batches); then, while obsolete pages are still pending (a reload
    /// handshake is under way), the limit is exceeded rather than any valid
    /// page reclaimed; only then valid pages, by policy. Called before a
    /// fault builds its path, so no page of that path is reclaimed while it
    /// is being linked. Returns the number of valid pages reclaimed; their
    /// frames return to the pool when the flush is committed.
    pub(crate) fn make_pages_available(&mut self, need: u64) -> (u64, Flush) {
        let limit = self.effective_limit();
        if self.available(limit) >= need {
            return (0, Flush::NONE);
        }
        // As KVM: once short, free a batch so the next faults do not
        // reclaim one page at a time.
        let target = need.max((limit / 4).min(25));
        while self.available(limit) < target && self.zap_obsolete_batch(self.zap_batch) > 0 {}
        if self.available(limit) >= need {
            return (0, Flush::NONE);
        }
        if self.obsolete_pending > 0 && u64::from(self.pool.free_frames()) >= need {
            return (0, Flush::NONE);
        }
        let mut reclaimed = 0;
        let mut flush = Flush::NONE;
        while self.available(limit) < target {
            let want = (target - self.available(limit)) as usize;
            let mut victims = 0u64;
            for _ in 0..want {
                let Some(v) = self.reclaim_victim() else {
                    break;
                };
                if self.page(v).key.role.level.is_pt() {
                    self.counters.reclaimed_leaf_pages += 1;
                } else {
                    self.counters.reclaimed_directory_pages += 1;
                }
                flush |= self.zap_page(v);
                victims += 1;
            }
            if victims == 0 {
                let (any, evicted) = self.evict_cached_roots();
                flush |= evicted;
                if !any {
                    break;
                }
            }
            if self.obsolete_pending > 0 {
                self.counters.valid_reclaimed_with_obsolete_pending += victims;
            }
            reclaimed += victims;
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
        (reclaimed, flush)
    }

    /// Drops every vCPU's cached roots except its current one. Returns
    /// true if any root reference was dropped, and the flush owed for the
    /// invalid roots that were freed.
    fn evict_cached_roots(&mut self) -> (bool, Flush) {
        let mut dropped = Vec::new();
        for cache in self.roots.values_mut() {
            while cache.entries.len() > 1 {
                dropped.push(cache.entries.pop_back().expect("len > 1").frame);
            }
        }
        let any = !dropped.is_empty();
        let mut flush = Flush::NONE;
        for f in dropped {
            flush |= self.put_root(f);
        }
        (any, flush)
    }
}
