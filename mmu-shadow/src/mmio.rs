//! MMIO SPTEs: a leaf for a guest frame no memslot backs, tagged with the
//! memslot generation, so a repeated MMIO access is answered from the SPTE
//! alone, without the MMU lock (the encoding is in `spte::mmio`).
//!
//! KVM: mmu.c's `mark_mmio_spte`, `handle_mmio_page_fault` and
//! `check_mmio_spte`, with the lockless shadow walk
//! (`walk_shadow_page_lockless_begin` / `_end`).

use std::sync::atomic::{AtomicU64, Ordering};

use mmu_api::paging::{Rights, permission_fault};
use mmu_api::{FaultOutcome, Gfn, Gpa, Hpa, PAGE_SIZE};

use crate::fault::PageFault;
use crate::pool::{FrameId, PoolMem};
use crate::rmap::SptePtr;
use crate::spte::{Spte, mmio};
use crate::state::MmuState;
use crate::stats::LocalCounters;
use crate::zap::Flush;

impl MmuState {
    /// True if `spte` is an MMIO SPTE of this backend: a reserved-bit one,
    /// or a window leaf.
    pub(crate) fn is_mmio_spte(&self, spte: u64) -> bool {
        self.mmio_enabled && (mmio::is_mmio(spte) || self.window_gfn(spte).is_some())
    }

    /// The gfn a window leaf maps (a present leaf into the hypervisor's
    /// MMIO window), or `None` for any other entry.
    pub(crate) fn window_gfn(&self, spte: u64) -> Option<Gfn> {
        let (window, end) = self.mmio_window?;
        let spte = Spte(spte);
        let addr = spte.addr().raw();
        (spte.is_present() && !mmio::is_mmio(spte.0) && addr >= window.raw() && addr < end)
            .then(|| Gpa(addr - window.raw()).gfn())
    }

    /// The MMIO SPTE for `gfn` with `rights`: a window leaf where the
    /// window reaches the frame, else a reserved-bit SPTE tagged with
    /// `generation`.
    pub(crate) fn mmio_spte(&self, gfn: Gfn, generation: u64, bits: u8, rights: Rights) -> u64 {
        let in_window = self.mmio_window.and_then(|(window, end)| {
            let hpa = window.raw().checked_add(gfn.gpa().raw())?;
            (hpa.checked_add(PAGE_SIZE)? <= end).then_some(Hpa(hpa))
        });
        match in_window {
            Some(hpa) => Spte::leaf(hpa, rights.write, rights.user, rights.exec).0,
            None => mmio::encode(gfn, generation, bits, rights),
        }
    }

    /// What an MMIO SPTE says: its gfn, its generation tag (none for a
    /// window leaf, which no fault ever checks) and its rights.
    pub(crate) fn decode_mmio(&self, spte: u64) -> (Gfn, Option<u64>, Rights) {
        if let Some(gfn) = self.window_gfn(spte) {
            let s = Spte(spte);
            let rights = Rights {
                write: s.is_writable(),
                user: s.is_user(),
                exec: s.is_executable(),
            };
            return (gfn, None, rights);
        }
        let (gfn, tag, rights) = mmio::decode(spte);
        (gfn, Some(tag), rights)
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
        if self.window_gfn(value).is_some() {
            let ptr = SptePtr {
                sp,
                index: index as u16,
            };
            // Drop entries whose leaf went with a zap, so the list holds
            // only live leaves across fast zaps.
            let mut leaves = self.window_leaves.remove(&gfn).unwrap_or_default();
            leaves.retain(|&p| p != ptr && self.is_window_leaf(p, gfn));
            leaves.push(ptr);
            self.window_leaves.insert(gfn, leaves);
        }
        self.counters.mmio_sptes += 1;
        flush
    }

    /// Drops the window leaves of frames in `[start, end)`: memory now
    /// backs them, and the hypervisor would otherwise keep answering them
    /// as MMIO without a fault.
    pub(crate) fn zap_window_range(&mut self, start: Gfn, end: Gfn) -> Flush {
        let gfns: Vec<Gfn> = self
            .window_leaves
            .range(start..end)
            .map(|(g, _)| *g)
            .collect();
        let mut flush = Flush::NONE;
        for gfn in gfns {
            for ptr in self.window_leaves.remove(&gfn).unwrap_or_default() {
                if self.is_window_leaf(ptr, gfn) {
                    flush |= self.drop_spte(ptr.sp, usize::from(ptr.index));
                }
            }
        }
        flush
    }

    /// True if `ptr` is still a live window leaf for `gfn` (its page was
    /// not zapped and reused meanwhile).
    fn is_window_leaf(&self, ptr: SptePtr, gfn: Gfn) -> bool {
        let index = usize::from(ptr.index);
        let live = self.pages[ptr.sp as usize]
            .as_ref()
            .is_some_and(|p| p.leaf_gfns.as_ref().is_some_and(|g| g.get(index) == gfn));
        live && self.window_gfn(self.pool.load(ptr.sp, index)) == Some(gfn)
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
