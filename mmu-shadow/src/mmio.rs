//! MMIO SPTEs: a leaf for a guest frame no memslot backs, tagged with the
//! memslot generation, so a repeated MMIO access is answered from the SPTE
//! alone, without the MMU lock (the encoding is in `spte::mmio`).
//!
//! KVM: mmu.c's `mark_mmio_spte`, `handle_mmio_page_fault` and
//! `check_mmio_spte`, with the lockless shadow walk
//! (`walk_shadow_page_lockless_begin` / `_end`).

use std::sync::atomic::{AtomicU64, Ordering};

use mmu_api::paging::permission_fault;
use mmu_api::{FaultOutcome, Gfn, Gpa};

use crate::fault::PageFault;
use crate::pool::{FrameId, PoolMem};
use crate::spte::{Spte, mmio};
use crate::state::MmuState;
use crate::stats::LocalCounters;
use crate::zap::Flush;

impl MmuState {
    /// True if `spte` is an MMIO SPTE of this backend.
    pub(crate) fn is_mmio_spte(&self, spte: u64) -> bool {
        self.mmio_enabled && mmio::is_mmio(spte)
    }

    /// Installs an MMIO SPTE (never in the rmap: it maps no memory).
    pub(crate) fn set_mmio_leaf(
        &mut self,
        sp: FrameId,
        index: usize,
        gfn: Gfn,
        value: u64,
    ) -> Flush {
        let flush = self.drop_spte(sp, index);
        self.pool.store(sp, index, value);
        self.page(sp)
            .leaf_gfns
            .as_ref()
            .expect("level 1")
            .set(index, gfn);
        self.counters.mmio_sptes += 1;
        flush
    }
}

/// Answers a reserved-bit #PF from the MMIO SPTE on the path to the
/// faulting address alone (no guest walk, no memslot search, no MMU
/// lock) when its generation is current and the guest's rights allow
/// the access. `None`: take the full path.
///
/// The walk reads the pool without the lock. Frames on the path may be
/// zapped and reused meanwhile; every zap bumps the invalidation
/// sequence count before it clears an entry, so a walk that saw the
/// count unchanged from start to end read entries that were all live
/// together.
pub(crate) fn mmio_fast_path(
    pool: &PoolMem,
    invalidate_seq: &AtomicU64,
    pf: &PageFault,
    bits: u8,
    stats: &LocalCounters,
) -> Option<FaultOutcome> {
    let start = invalidate_seq.load(Ordering::SeqCst);
    let mut sp = pf.root;
    let mut level = pf.root_level;
    let spte = loop {
        let spte = Spte(pool.load(sp, level.index(pf.addr.raw())));
        match level.below() {
            Some(below) if spte.is_present() => {
                sp = pool.frame_at(spte.addr())?;
                level = below;
            }
            _ => break spte.0,
        }
    };
    if !level.is_pt() || !mmio::is_mmio(spte) {
        return None;
    }
    let (gfn, tag, rights) = mmio::decode(spte);
    if pf.generation.update_in_progress() || tag != mmio::tag(pf.generation.count(), bits) {
        LocalCounters::bump(&stats.mmio_stale);
        return None;
    }
    // A write needs W in the SPTE, not just the guest's permission: W is
    // only set once the guest's D bit is, and with CR0.WP = 0 a supervisor
    // write the rights check allows could still owe the guest its D bit.
    if permission_fault(&pf.ctx, rights, None, pf.access).is_some()
        || (pf.access.is_write() && !rights.write)
    {
        return None;
    }
    if invalidate_seq.load(Ordering::SeqCst) != start {
        LocalCounters::bump(&stats.lockless_retries);
        return None;
    }
    LocalCounters::bump(&stats.mmio_fast_hits);
    Some(FaultOutcome::Mmio {
        gpa: Gpa(gfn.gpa().raw() | pf.addr.page_offset()),
    })
}
