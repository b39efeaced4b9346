//! The MMU state behind the VM's MMU lock (KVM: the parts of `struct kvm`
//! and `kvm_arch` that `mmu_lock` protects). The mechanisms live in their
//! own modules: `page` (shadow pages and their hash), `rmap`, `zap`,
//! `reclaim`, `root`, `write_track`, `mmio` and `fault`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use mmu_api::{Gfn, Gpa, Hpa, VcpuId};

use crate::ReclaimPolicy;
use crate::ShadowConfig;
use crate::memslots::{Memslots, Slots};
use crate::page::{FastMap, ShadowPage, SpKey};
use crate::pool::{FrameId, ShadowPool};
use crate::rmap::Rmap;
use crate::root::{HostWindow, RootCache};
use crate::stats::Counters;
use crate::vcpu::VcpuShared;

/// Everything behind the MMU lock. Aligned so that the lock's own word
/// never shares a cache line with the state: a waiter trying the lock
/// would otherwise take the line from the holder working on the state.
#[derive(Debug)]
#[repr(align(128))]
pub(crate) struct MmuState {
    pub(crate) pool: ShadowPool,
    pub(crate) pages: Vec<Option<ShadowPage>>,
    /// Pages by (gfn, role) and generation: an obsolete page stays under its
    /// own generation, where no lookup looks.
    pub(crate) hash: FastMap<(SpKey, u64), FrameId>,
    /// Leaf SPTEs mapping each gfn.
    pub(crate) rmap: Rmap,
    /// Shadow pages shadowing each guest table frame (write-protected).
    pub(crate) gfn_pages: FastMap<Gfn, Vec<FrameId>>,
    /// Active pages by age (FIFO: oldest first).
    pub(crate) active: BTreeMap<u64, FrameId>,
    pub(crate) next_seq: u64,
    /// The current memslot snapshot (the one [`Memslots`] publishes).
    pub(crate) slots: Arc<Slots>,
    /// Where lock-free readers find the snapshot.
    pub(crate) memslots: Arc<Memslots>,
    /// KVM's `mmu_invalidate_seq`: bumped before any present SPTE is
    /// cleared and on every memslot change, so work done without the lock
    /// can tell it raced with one.
    pub(crate) invalidate_seq: Arc<AtomicU64>,
    /// Write protections that owed a flush so far (their epochs).
    pub(crate) wp_requested: u64,
    /// The highest write-protection epoch whose flush every vCPU has
    /// acknowledged (written by [`Inner::finish_commit`](crate::backend::Inner)
    /// without the lock).
    pub(crate) wp_flushed: Arc<AtomicU64>,
    pub(crate) counters: Counters,
    pub(crate) page_limit: Option<u64>,
    /// Zapped pages waiting for the remote TLB flush before reuse.
    pub(crate) pending_free: Vec<FrameId>,
    /// Frames whose flush was posted and is being waited for without the
    /// lock (out of `pages`, not yet back in the pool).
    pub(crate) flushing: u64,
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
    /// The hypervisor's MMIO window (`ShadowConfig::mmio_window`) and its
    /// end, 2^host_maxphyaddr.
    pub(crate) mmio_window: Option<(Hpa, u64)>,
    /// Window leaves by the gfn they map: a memslot added over the gfn
    /// zaps them (the hypervisor answers them without a fault, so no
    /// generation check ever sees them). Entries may be stale; each is
    /// checked against the pool before it is used.
    pub(crate) window_leaves: BTreeMap<Gfn, Vec<crate::rmap::SptePtr>>,
    /// Replay coherence: the window address and its level-3 and level-4
    /// pages, which every 4-level (resp. 5-level) root links.
    pub(crate) window: Option<HostWindow>,
}

impl MmuState {
    pub(crate) fn new(config: &ShadowConfig, pool: ShadowPool) -> Self {
        let frames = pool.capacity() as usize;
        let slots = Arc::new(Slots::new(config.gpa_width));
        MmuState {
            page_limit: config.page_limit,
            pool,
            pages: (0..frames).map(|_| None).collect(),
            hash: FastMap::default(),
            rmap: Rmap::default(),
            gfn_pages: FastMap::default(),
            active: BTreeMap::new(),
            next_seq: 0,
            memslots: Arc::new(Memslots::new(slots.clone())),
            slots,
            invalidate_seq: Arc::new(AtomicU64::new(0)),
            wp_requested: 0,
            wp_flushed: Arc::new(AtomicU64::new(0)),
            counters: Counters::default(),
            pending_free: Vec::new(),
            flushing: 0,
            vcpus: Vec::new(),
            roots: HashMap::new(),
            valid_gen: 0,
            safe_gen: 0,
            obsolete_pending: 0,
            zapped_obsolete: Vec::new(),
            policy: config.reclaim,
            zap_batch: config.zap_batch.max(1),
            mmio_enabled: config.mmio_caching,
            mmio_window: config
                .mmio_window
                .filter(|_| config.mmio_caching)
                .map(|w| (w, 1u64 << config.host_maxphyaddr.min(52))),
            window_leaves: BTreeMap::new(),
            window: None,
        }
    }

    /// Publishes a new memslot snapshot; returns the old one, whose readers
    /// the caller waits for ([`Memslots::wait_for_readers`]) without the
    /// lock when a slot's backing went away.
    pub(crate) fn publish_slots(&mut self, new: Slots) -> Arc<Slots> {
        self.slots = Arc::new(new);
        let old = self.memslots.publish(self.slots.clone());
        // After the publish: a fault reads the count, then the snapshot, so
        // one that read the count after this bump reads the new snapshot,
        // and one that read it before sees the count move under the lock.
        self.invalidate_begin();
        old
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

    /// Whether a guest-physical address is backed by a slot.
    pub(crate) fn slot_of(&self, gpa: Gpa) -> Option<mmu_api::Memslot> {
        self.slots.find(gpa)
    }

    /// The vCPU with this id has its root cache entry.
    pub(crate) fn register_vcpu(&mut self, shared: Arc<VcpuShared>) {
        self.roots.insert(shared.id, RootCache::default());
        self.vcpus.push(shared);
    }
}
