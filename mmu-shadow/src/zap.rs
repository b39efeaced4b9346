//! Zapping shadow pages: prepare (unlink, drop from the hash and the rmap)
//! then commit (remote TLB flush, then the frames go back to the pool),
//! the naive and the fast (generation) zap-all, and obsolete pages.
//!
//! KVM: mmu.c's `kvm_mmu_prepare_zap_page` / `kvm_mmu_commit_zap_page`,
//! `kvm_mmu_zap_all`, `kvm_mmu_zap_all_fast` and `kvm_zap_obsolete_pages`.
//!
//! Every operation that leaves a flush owed returns a [`Flush`]; the caller
//! turns it into a [`Commit`] under the MMU lock
//! ([`MmuState::prepare_commit`]) and waits for the vCPUs' acknowledgements
//! with the lock dropped ([`Inner::finish_commit`]), so a vCPU that needs
//! the lock to leave guest mode cannot deadlock the zapper.

use std::ops::{BitOr, BitOrAssign};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::backend::Inner;
use crate::pool::{ENTRIES_PER_PAGE, FrameId};
use crate::state::MmuState;
use crate::vcpu::{Requests, VcpuShared};

/// What a change to the shadow tables owes the vCPUs before its caller
/// returns: a remote TLB flush (an SPTE was removed or narrowed, or a frame
/// was retired), a root reload (a root was zapped), or both.
#[must_use = "a zapped or narrowed SPTE stays in other vCPUs' TLBs until the flush is committed"]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Flush {
    tlb: bool,
    reload: bool,
}

impl Flush {
    /// Nothing owed.
    pub(crate) const NONE: Flush = Flush {
        tlb: false,
        reload: false,
    };
    /// A remote TLB flush is owed.
    pub(crate) const TLB: Flush = Flush {
        tlb: true,
        reload: false,
    };
    /// Every vCPU must load a fresh root.
    pub(crate) const RELOAD: Flush = Flush {
        tlb: false,
        reload: true,
    };

    /// True if anything is owed.
    pub(crate) fn is_owed(self) -> bool {
        self.tlb || self.reload
    }
}

impl BitOr for Flush {
    type Output = Flush;

    fn bitor(self, rhs: Flush) -> Flush {
        Flush {
            tlb: self.tlb || rhs.tlb,
            reload: self.reload || rhs.reload,
        }
    }
}

impl BitOrAssign for Flush {
    fn bitor_assign(&mut self, rhs: Flush) {
        *self = *self | rhs;
    }
}

/// A flush posted to the vCPUs under the MMU lock, to be waited for and
/// finished without it ([`Inner::finish_commit`]).
#[must_use = "the zapped frames only return to the pool when the commit is finished"]
#[derive(Debug, Default)]
pub(crate) struct Commit {
    vcpus: Vec<Arc<VcpuShared>>,
    req: Option<Requests>,
    frames: Vec<FrameId>,
    /// Write protections this flush covers: every one requested before it
    /// was posted.
    wp_epoch: u64,
    wp_flushed: Option<Arc<AtomicU64>>,
}

impl MmuState {
    /// Starts an invalidation: lock-free walkers of the shadow tables (the
    /// MMIO fast path) and faults that walked the guest without the lock
    /// see the sequence count change and start over.
    pub(crate) fn invalidate_begin(&self) {
        self.invalidate_seq.fetch_add(1, Ordering::SeqCst);
    }

    /// Zaps one shadow page: unlinks it from its parents and its children,
    /// drops its leaves from the rmap, and queues its frame for freeing
    /// after the next remote flush (or marks it invalid if it is a root).
    pub(crate) fn zap_page(&mut self, frame: FrameId) -> Flush {
        self.invalidate_begin();
        let mut flush = Flush::NONE;
        for i in 0..ENTRIES_PER_PAGE {
            flush |= self.drop_spte(frame, i);
        }
        let parents = std::mem::take(&mut self.page_mut(frame).parents);
        for p in parents {
            self.pool.store(p.sp, usize::from(p.index), 0);
            flush |= Flush::TLB;
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
            flush |= Flush::RELOAD;
        } else {
            flush |= self.retire_frame(frame);
        }
        tracing::debug!(
            frame,
            gfn = key.gfn.raw(),
            level = key.role.level.get(),
            "shadow page zapped"
        );
        flush
    }

    /// Queues a zapped page's frame for freeing after the next remote
    /// flush, and journals it for a host that shadows the pool.
    pub(crate) fn retire_frame(&mut self, frame: FrameId) -> Flush {
        self.pending_free.push(frame);
        self.pool.journal_frame(frame);
        Flush::TLB
    }

    /// Zaps every shadow page under the lock (the naive zap-all).
    pub(crate) fn zap_all_pages(&mut self) -> Flush {
        let frames: Vec<FrameId> = self.active.values().copied().collect();
        let mut flush = Flush::NONE;
        for f in frames {
            if self.pages[f as usize].as_ref().is_some_and(|p| !p.invalid) {
                flush |= self.zap_page(f);
            }
        }
        self.counters.zap_all += 1;
        self.counters.naive_zaps += 1;
        flush
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
        let pending_before = self.pending_free.len();
        for &v in &victims {
            // Out of every vCPU's reach since the reload handshake: nothing
            // is owed for them.
            let _no_vcpu_reaches_it: Flush = self.zap_page(v);
        }
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

    /// The first half of a fast zap, under the lock: every page becomes
    /// obsolete, and every vCPU is asked to load a fresh root before it
    /// enters again. Returns the vCPUs whose handshake the caller waits for
    /// (without the lock), and the new valid generation.
    pub(crate) fn begin_fast_zap(&mut self) -> (Vec<Arc<VcpuShared>>, u64) {
        self.invalidate_begin();
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

    /// Zaps every shadow page shadowing a guest table in `[start, end)`
    /// (the host wrote there behind the guest's back).
    pub(crate) fn zap_shadowed_range(&mut self, start: mmu_api::Gfn, end: mmu_api::Gfn) -> Flush {
        let frames: Vec<FrameId> = crate::rmap::keys_in_range(&self.gfn_pages, start, end)
            .into_iter()
            .flat_map(|g| self.gfn_pages[&g].iter().copied())
            .collect();
        let mut flush = Flush::NONE;
        for f in frames {
            if self.pages[f as usize].as_ref().is_some_and(|p| !p.invalid) {
                flush |= self.zap_page(f);
            }
        }
        flush
    }

    /// Posts what `flush` owes to every vCPU (kicking those in guest mode)
    /// and takes the retired frames out of the metadata. The caller drops
    /// the lock and calls [`Inner::finish_commit`], which waits for the
    /// vCPUs and returns the frames to the pool.
    pub(crate) fn prepare_commit(&mut self, flush: Flush) -> Commit {
        let mut req = Requests::empty();
        if flush.reload {
            req |= Requests::RELOAD_ROOT;
        }
        if flush.tlb || !self.pending_free.is_empty() {
            req |= Requests::FLUSH_TLB;
            self.counters.remote_flushes += 1;
        }
        if req.is_empty() {
            return Commit::default();
        }
        for v in &self.vcpus {
            v.post(req);
        }
        let frames = std::mem::take(&mut self.pending_free);
        for &f in &frames {
            self.pages[f as usize] = None;
        }
        self.flushing += frames.len() as u64;
        Commit {
            vcpus: self.vcpus.clone(),
            req: Some(req),
            frames,
            wp_epoch: self.wp_requested,
            wp_flushed: Some(self.wp_flushed.clone()),
        }
    }
}

impl Inner {
    /// Finishes a commit without the MMU lock: waits until every vCPU has
    /// taken the request or is out of guest mode (it then takes it before
    /// it enters again), then returns the zapped frames to the pool.
    pub(crate) fn finish_commit(&self, commit: Commit) {
        let Some(req) = commit.req else {
            return;
        };
        for v in &commit.vcpus {
            v.wait_out_of_guest_or_ack(req);
        }
        if req.contains(Requests::FLUSH_TLB)
            && let Some(done) = &commit.wp_flushed
        {
            done.fetch_max(commit.wp_epoch, Ordering::SeqCst);
        }
        if commit.frames.is_empty() {
            return;
        }
        let mut st = self.lock();
        st.flushing -= commit.frames.len() as u64;
        for f in commit.frames {
            st.pool.free(f);
            st.counters.sps_freed += 1;
        }
    }

    /// Runs `op` under the MMU lock and commits the flush it owes after
    /// dropping the lock.
    pub(crate) fn with_mmu<R>(&self, op: impl FnOnce(&mut MmuState) -> (R, Flush)) -> R {
        let (result, commit) = {
            let mut st = self.lock();
            let (result, flush) = op(&mut st);
            (result, st.prepare_commit(flush))
        };
        self.finish_commit(commit);
        result
    }
}
