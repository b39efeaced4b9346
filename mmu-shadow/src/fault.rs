//! The fault path: from a hardware #PF on the shadow tables to an installed
//! SPTE, an MMIO exit, an emulated write, or a fault for the guest.
//!
//! KVM: mmu.c's `kvm_mmu_page_fault` with `struct kvm_page_fault`, and
//! paging_tmpl.h's `FNAME(page_fault)`, `FNAME(walk_addr)`, `FNAME(fetch)`
//! and `FNAME(pte_prefetch)`.
//!
//! As in KVM, the guest walk (with its A/D compare-and-exchange), the
//! memslot lookup and the MMIO fast path run without the MMU lock: the
//! fault snapshots the invalidation sequence count, walks, then takes the
//! lock and walks again under it only if the count moved.
//!
//! Then, as KVM's TDP MMU does, the fault first tries holding the lock
//! shared ([`MmuState::fix_fault_shared`]): when the whole shadow path to
//! the faulting entry exists and that entry is empty, it rechecks the
//! guest entries, fills the leaf with a compare-and-exchange and adds it
//! to the sharded rmap, and returns. That is what scales: vCPUs faulting
//! on different pages hold the lock side by side and write no cache line
//! in common (their counters, their shared-hold flags and, usually, their
//! rmap shards are their own). Anything more (allocating or linking a
//! shadow page, reclaim, a flush owed by a write protection, emulation, an
//! MMIO SPTE, dirty logging) takes the lock exclusively, as before.

use std::sync::atomic::Ordering;

use mmu_api::paging::{
    GuestPhysMemory, PageFault as GuestPageFault, PteFlags, Translation, WalkError, WalkOptions,
    walk, walk_with,
};
use mmu_api::{
    Access, AccessKind, AccessMode, FaultOutcome, Gfn, Gpa, Gva, Memslot, MemslotFlags,
    MemslotGeneration, PagingContext, PagingMode, PfErrorCode, Rights, VcpuError,
};

use crate::backend::Inner;
use crate::memslots::Slots;
use crate::mmio::mmio_fast_path;
use crate::page::{Access3, PtLevel, Role, SpKey};
use crate::pool::{ENTRIES_PER_PAGE, FrameId};
use crate::root::{in_window, root_level, root_page_key};
use crate::spte::{Spte, mmio};
use crate::state::MmuState;
use crate::stats::LocalCounters;
use crate::vcpu::{Requests, VcpuShared};
use crate::zap::Flush;

/// One #PF on the shadow tables, from the hardware's report to the guest
/// walk's result (KVM's `struct kvm_page_fault`).
#[derive(Debug)]
pub(crate) struct PageFault {
    /// The faulting guest-virtual address (CR2).
    pub(crate) addr: Gva,
    /// The hardware's error code.
    pub(crate) error_code: PfErrorCode,
    /// The access the error code describes.
    pub(crate) access: Access,
    /// The guest's paging registers.
    pub(crate) ctx: PagingContext,
    /// The root the hardware walked, and its level.
    pub(crate) root: FrameId,
    pub(crate) root_level: PtLevel,
    /// The published memslot generation when the fault began.
    pub(crate) generation: MemslotGeneration,
    /// Generation bits MMIO SPTEs carry (`None`: MMIO caching off).
    pub(crate) mmio_bits: Option<u8>,
    /// Neighbouring guest PTEs to map (0 or 1: none).
    pub(crate) prefetch: usize,
    /// The invalidation sequence count before the lock-free walk.
    pub(crate) mmu_seq: u64,
    /// The guest walk, once done.
    pub(crate) walk: Option<GuestWalk>,
}

/// What the guest walk found.
#[derive(Debug)]
pub(crate) struct GuestWalk {
    /// The translation.
    pub(crate) t: Translation,
    /// Each walked entry as the walk left it, by step (rechecked under the
    /// lock once the tables are write-protected); at most 5 levels.
    pub(crate) gptes: [Option<u64>; 5],
    /// The gfn the guest maps.
    pub(crate) gfn: Gfn,
    /// Its memslot.
    pub(crate) slot: Option<Memslot>,
    /// An MMIO SPTE may cache the answer: the generation bits to use.
    pub(crate) cache_mmio: Option<u8>,
    /// Neighbours to prefetch, walked without the lock.
    pub(crate) prefetch: Vec<PrefetchCandidate>,
    /// The root key the path was computed for, and the keys of the shadow
    /// pages on the path below it.
    pub(crate) root_key: SpKey,
    pub(crate) path: PathKeys,
}

/// A neighbouring guest PTE found present and accessed.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PrefetchCandidate {
    index: usize,
    gpte_gpa: Gpa,
    gpte: u64,
    gfn: Gfn,
    rights: Rights,
    dirty: bool,
    pkey: Option<u8>,
}

/// Reads a guest entry (4 or 8 bytes) at `gpa`.
fn read_gpte<M: GuestPhysMemory + ?Sized>(mem: &M, gpa: Gpa, four_byte: bool) -> Option<u64> {
    if four_byte {
        let word = mem.read_u64(Gpa(gpa.raw() & !7)).ok()?;
        Some((word >> ((gpa.raw() & 4) * 8)) & 0xffff_ffff)
    } else {
        mem.read_u64(gpa).ok()
    }
}

/// Rights of one guest entry (PAE PDPTEs grant everything).
fn entry_access(ctx: &PagingContext, level: u8, raw: u64) -> Access3 {
    if ctx.mode() == PagingMode::Pae && level == 3 {
        return Access3::ALL;
    }
    Access3 {
        write: raw & PteFlags::WRITABLE.bits() != 0,
        user: raw & PteFlags::USER.bits() != 0,
        exec: !(ctx.nx_enabled() && raw & PteFlags::NO_EXECUTE.bits() != 0),
    }
}

/// The AND of the rights of every guest entry above `level`.
fn access_above(ctx: &PagingContext, t: &Translation, level: PtLevel) -> Access3 {
    t.steps()
        .iter()
        .filter(|s| s.level > level.get())
        .fold(Access3::ALL, |acc, s| {
            let a = entry_access(ctx, s.level, s.entry.raw());
            Access3 {
                write: acc.write && a.write,
                user: acc.user && a.user,
                exec: acc.exec && a.exec,
            }
        })
}

/// The spte the WP=0 / SMEP rules and the guest's rights allow for this
/// access, before memslot, write-protection and dirty-logging limits.
struct LeafRights {
    write: bool,
    user: bool,
    exec: bool,
}

fn leaf_rights(ctx: &PagingContext, t: &Translation, access: Access) -> LeafRights {
    let r = t.rights;
    let mut lr = LeafRights {
        write: r.write,
        user: r.user,
        exec: r.exec,
    };
    // CR0.WP = 0: a supervisor write to a read-only page is allowed. Map it
    // writable but kernel-only so user accesses still fault, and with SMEP
    // also not executable (the page may be a user page SMEP protects).
    if access.is_write() && !access.is_user() && !r.write && !ctx.wp() {
        lr.write = true;
        lr.user = false;
        if ctx.smep() && r.user {
            lr.exec = false;
        }
    }
    lr
}

/// The guest's D bit on the leaf (true when there is no guest leaf).
fn guest_dirty(t: &Translation) -> bool {
    t.leaf()
        .is_none_or(|l| l.entry.raw() & PteFlags::DIRTY.bits() != 0)
}

/// The access an error code describes.
fn access_of(error_code: PfErrorCode) -> Access {
    let kind = if error_code.contains(PfErrorCode::FETCH) {
        AccessKind::Fetch
    } else if error_code.contains(PfErrorCode::WRITE) {
        AccessKind::Write
    } else {
        AccessKind::Read
    };
    let mode = if error_code.contains(PfErrorCode::USER) {
        AccessMode::User
    } else {
        AccessMode::Supervisor
    };
    Access { kind, mode }
}

/// The key of the shadow page at `level` on the path to `gva`; `base` is
/// [`Role::base`] of `ctx`.
fn path_key(
    ctx: &PagingContext,
    base: Role,
    root: &SpKey,
    t: &Translation,
    gva: u64,
    level: PtLevel,
) -> SpKey {
    let mode = ctx.mode();
    let direct = |level: PtLevel, gpa: u64, access: Access3| SpKey {
        gfn: Gfn((gpa & !(level.coverage() - 1)) >> 12),
        role: Role {
            level,
            direct: true,
            access,
            ..base
        },
    };
    if mode == PagingMode::NoPaging {
        return direct(level, gva & 0xffff_ffff, Access3::ALL);
    }
    let leaf_level = t.leaf().map_or(1, |s| s.level);
    if level.get() < leaf_level {
        // Pieces of a guest large page. A clean large page never shares
        // a page with a dirty mapping of the same range (whose SPTEs may
        // be writable), so its first write faults and sets D.
        let mut key = direct(level, t.gpa.raw(), t.rights.into());
        key.role.guest_dirty = t
            .leaf()
            .is_some_and(|l| l.entry.raw() & PteFlags::DIRTY.bits() != 0);
        return key;
    }
    let table_gfn = |l: PtLevel| {
        t.steps()
            .iter()
            .find(|s| s.level == l.get())
            .map_or(Gfn(0), |s| s.entry_gpa.gfn())
    };
    let mut key = SpKey {
        gfn: table_gfn(level),
        role: Role {
            level,
            access: access_above(ctx, t, level),
            ..base
        },
    };
    match mode {
        PagingMode::Pae | PagingMode::Bits32 if level == PtLevel::PDPT => {
            // The PDPT level: owned by the root, not in guest memory.
            key = *root;
            key.role.level = PtLevel::PDPT;
        }
        PagingMode::Bits32 if level == PtLevel::PD => {
            key.role.quadrant = ((gva >> 30) & 3) as u8;
        }
        PagingMode::Bits32 => key.role.quadrant = ((gva >> 21) & 1) as u8,
        _ => {}
    }
    key
}

/// The keys of the shadow pages on the path below a root, from the level
/// below the root down to the page table: at most 4, kept inline (a fault
/// computes them without the lock, and allocates nothing for them).
#[derive(Clone, Copy, Debug)]
pub(crate) struct PathKeys {
    keys: [SpKey; 4],
    len: usize,
}

impl std::ops::Deref for PathKeys {
    type Target = [SpKey];

    fn deref(&self) -> &[SpKey] {
        &self.keys[..self.len]
    }
}

/// The keys of the shadow pages on the path to `gva` below a root keyed
/// `root`, from the level below the root down to the page table.
fn path_keys(ctx: &PagingContext, root: &SpKey, t: &Translation, gva: u64) -> PathKeys {
    let base = Role::base(ctx);
    let mut path = PathKeys {
        keys: [*root; 4],
        len: 0,
    };
    let mut level = root.role.level;
    while let Some(below) = level.below() {
        path.keys[path.len] = path_key(ctx, base, root, t, gva, below);
        path.len += 1;
        level = below;
    }
    path
}

impl PageFault {
    /// A fault at `addr` on `root`, the root of `ctx`.
    pub(crate) fn new(
        inner: &Inner,
        ctx: &PagingContext,
        root: FrameId,
        addr: Gva,
        error_code: PfErrorCode,
    ) -> Self {
        PageFault {
            addr,
            error_code,
            access: access_of(error_code),
            ctx: *ctx,
            root,
            root_level: root_level(ctx),
            generation: inner.generation(),
            mmio_bits: inner.mmio_bits(),
            prefetch: inner.config.prefetch,
            mmu_seq: 0,
            walk: None,
        }
    }

    /// Walks the guest tables (setting A/D as the hardware would) and finds
    /// the memslot, in `slots`. `Some`: the fault ends here (a fault for
    /// the guest, or MMIO that no SPTE will cache).
    fn walk_guest(
        &mut self,
        slots: &Slots,
        stats: &LocalCounters,
    ) -> Result<Option<FaultOutcome>, VcpuError> {
        let mem = slots.guest_mem();
        let t = match walk(&self.ctx, &mem, self.addr, self.access) {
            Ok(t) => t,
            Err(WalkError::PageFault(GuestPageFault { error_code, .. })) => {
                LocalCounters::bump(&stats.faults_injected);
                tracing::trace!(
                    gva = self.addr.raw(),
                    error_code = error_code.bits(),
                    "guest page fault"
                );
                return Ok(Some(FaultOutcome::InjectPageFault {
                    error_code,
                    cr2: self.addr,
                }));
            }
            Err(WalkError::NonCanonical(_) | WalkError::InvalidPdpte { .. }) => {
                LocalCounters::bump(&stats.faults_injected);
                return Ok(Some(FaultOutcome::InjectGeneralProtection));
            }
            Err(WalkError::Contended) => return Ok(Some(FaultOutcome::Retry)),
            Err(WalkError::InvalidContext(e)) => return Err(VcpuError::Context(e)),
            Err(other) => return Err(VcpuError::Walk(other)),
        };
        // The entries as the walk left them. Read back rather than taken from
        // the walk: a frame used at two levels of the same walk (aliasing)
        // has its entry changed by the walk's own A/D update.
        let four_byte = self.ctx.mode() == PagingMode::Bits32;
        let mut gptes = [None; 5];
        debug_assert!(t.steps().len() <= gptes.len(), "at most 5 levels");
        for (gpte, s) in gptes.iter_mut().zip(t.steps()) {
            *gpte = read_gpte(&mem, s.entry_gpa, four_byte);
        }
        let gpa = t.gpa;
        let gfn = gpa.gfn();
        let slot = slots.find(gpa);
        // MMIO SPTEs carry the memslot generation; none is made while an
        // update is in progress, nor when protection keys would have to be
        // checked on a cached answer.
        let cache_mmio = self.mmio_bits.filter(|_| {
            slot.is_none()
                && !self.generation.update_in_progress()
                && !self.ctx.pke_active()
                && mmio::fits(gfn)
        });
        if (slot.is_none() && cache_mmio.is_none())
            || (self.access.is_write() && slot.is_some_and(|s| !s.is_writable()))
        {
            LocalCounters::bump(&stats.faults_mmio);
            return Ok(Some(FaultOutcome::Mmio { gpa }));
        }
        let prefetch = if slot.is_some() {
            self.walk_neighbours(&mem, &t)
        } else {
            Vec::new()
        };
        let root_key = root_page_key(&self.ctx);
        let path = path_keys(&self.ctx, &root_key, &t, self.addr.raw());
        self.walk = Some(GuestWalk {
            t,
            gptes,
            gfn,
            slot,
            cache_mmio,
            prefetch,
            root_key,
            path,
        });
        Ok(None)
    }

    /// Walks the neighbours of the faulting guest PTE in its prefetch group
    /// (never setting A/D bits) and keeps the present, accessed 4 KiB ones
    /// in the same guest table. Guest large pages and no-paging guests
    /// need no walk: their neighbours are computed under the lock.
    fn walk_neighbours<M: GuestPhysMemory>(
        &self,
        mem: &M,
        t: &Translation,
    ) -> Vec<PrefetchCandidate> {
        let Some(leaf) = t.leaf().filter(|l| l.level == 1) else {
            return Vec::new();
        };
        if self.prefetch <= 1 {
            return Vec::new();
        }
        let count = self.prefetch.next_power_of_two().min(ENTRIES_PER_PAGE);
        let index = PtLevel::PT.index(self.addr.raw());
        let first = index & !(count - 1);
        let table = leaf.entry_gpa.gfn();
        let mut peek = self.ctx;
        peek.cr4
            .remove(mmu_api::paging::Cr4::SMAP | mmu_api::paging::Cr4::PKE);
        peek.cpl = 0;
        let no_ad = WalkOptions::without_accessed_dirty();
        let mut out = Vec::new();
        for j in first..first + count {
            if j == index {
                continue;
            }
            let gva_j = (self.addr.raw() & !(0x1ff << 12)) | ((j as u64) << 12);
            let Ok(tj) = walk_with(
                &peek,
                mem,
                Gva(gva_j),
                Access::supervisor(AccessKind::Read),
                no_ad,
            ) else {
                continue;
            };
            let Some(l) = tj.leaf() else { continue };
            let accessed = l.entry.raw() & PteFlags::ACCESSED.bits() != 0;
            if l.level != 1 || !accessed || l.entry_gpa.gfn() != table {
                continue;
            }
            out.push(PrefetchCandidate {
                index: j,
                gpte_gpa: l.entry_gpa,
                gpte: l.entry.raw(),
                gfn: tj.gpa.gfn(),
                rights: tj.rights,
                dirty: l.entry.raw() & PteFlags::DIRTY.bits() != 0,
                pkey: self.ctx.pke_active().then(|| l.entry.pkey()),
            });
        }
        out
    }
}

impl Inner {
    /// Serves a #PF the hardware raised on the shadow tables of `root`.
    pub(crate) fn page_fault(
        &self,
        vcpu: &VcpuShared,
        ctx: &PagingContext,
        root: FrameId,
        gva: Gva,
        error_code: PfErrorCode,
    ) -> Result<FaultOutcome, VcpuError> {
        let stats = &vcpu.stats;
        LocalCounters::bump(&stats.faults);
        let mut pf = PageFault::new(self, ctx, root, gva, error_code);
        if in_window(self.window_gva(), gva, pf.root_level) {
            // Reserved for the host window.
            LocalCounters::bump(&stats.faults_injected);
            return Ok(FaultOutcome::InjectGeneralProtection);
        }
        // A vCPU asked to reload may run on an obsolete root: leave its
        // faults to the locked path, which tells it to retry.
        let reload_pending =
            vcpu.requests.load(Ordering::SeqCst) & Requests::RELOAD_ROOT.bits() != 0;
        let lockless = self.config.lockless_faults && !reload_pending;
        if lockless
            && let Some(bits) = pf.mmio_bits
            && error_code.contains(PfErrorCode::RSVD)
            && let Some(out) = mmio_fast_path(&self.pool, &self.invalidate_seq, &pf, bits, stats)
        {
            return Ok(out);
        }
        if lockless {
            pf.mmu_seq = self.invalidate_seq.load(Ordering::SeqCst);
            let slots = self.memslots.load();
            if let Some(out) = pf.walk_guest(&slots, stats)? {
                return Ok(out);
            }
            drop(slots);
            // Most faults only fill an empty leaf entry below shadow pages
            // that already exist: that needs the lock shared only.
            if let Some(out) = self
                .read(vcpu)
                .and_then(|st| st.fix_fault_shared(&pf, stats))
            {
                return Ok(out);
            }
        }
        let mut reclaim = true;
        loop {
            let (result, commit) = {
                let mut st = self.lock();
                let (result, flush) = st.fix_fault(&mut pf, reclaim, !lockless, stats);
                (result, st.prepare_commit(flush))
            };
            self.finish_commit(commit);
            match result? {
                Some(out) => return Ok(out),
                // Pages were reclaimed: their frames are back in the pool.
                None => reclaim = false,
            }
        }
    }
}

impl MmuState {
    /// The locked half of a fault; `try_fast`: try the MMIO fast path here
    /// (it did not run without the lock). `Ok(None)`: pages were reclaimed, commit
    /// the flush and call again without `reclaim`. The flush is returned on
    /// every path, errors included, so nothing zapped stays unflushed.
    fn fix_fault(
        &mut self,
        pf: &mut PageFault,
        reclaim: bool,
        try_fast: bool,
        stats: &LocalCounters,
    ) -> (Result<Option<FaultOutcome>, VcpuError>, Flush) {
        if self.is_obsolete(pf.root) {
            // The vCPU reloads its root before it enters again.
            return (Ok(Some(FaultOutcome::Retry)), Flush::NONE);
        }
        if try_fast
            && let Some(bits) = pf.mmio_bits
            && pf.error_code.contains(PfErrorCode::RSVD)
            && let Some(out) = mmio_fast_path(&self.pool, &self.invalidate_seq, pf, bits, stats)
        {
            return (Ok(Some(out)), Flush::NONE);
        }
        if reclaim {
            let (_, flush) = self.make_pages_available(u64::from(pf.root_level.get()) + 1);
            if flush.is_owed() {
                return (Ok(None), flush);
            }
        }
        if pf.walk.is_none() || self.invalidate_seq.load(Ordering::SeqCst) != pf.mmu_seq {
            // No lock-free walk, or it raced with an invalidation (a zap, a
            // memslot change): walk again under the lock.
            if pf.walk.is_some() {
                LocalCounters::bump(&stats.lockless_retries);
            }
            pf.walk = None;
            // Under the lock the count cannot move: a later pass of this
            // fault (after a commit) reuses this walk unless it does.
            pf.mmu_seq = self.invalidate_seq.load(Ordering::SeqCst);
            let slots = self.slots.clone();
            match pf.walk_guest(&slots, stats) {
                Ok(Some(out)) => return (Ok(Some(out)), Flush::NONE),
                Ok(None) => {}
                Err(e) => return (Err(e), Flush::NONE),
            }
        }
        let mut flush = Flush::NONE;
        let result = self.map_fault(pf, stats, &mut flush);
        (result, flush)
    }

    /// Builds the shadow path for a walked fault and installs the leaf.
    /// Everything owed is gathered in `flush`, whatever the outcome.
    /// `Ok(None)`: the path write-protected a guest table that some vCPU
    /// may still write through its TLB; commit the flush and call again,
    /// so the guest entries are rechecked only once no such write can
    /// land.
    fn map_fault(
        &mut self,
        pf: &PageFault,
        stats: &LocalCounters,
        flush: &mut Flush,
    ) -> Result<Option<FaultOutcome>, VcpuError> {
        let w = pf.walk.as_ref().expect("walked before mapping");
        let t = &w.t;
        let gva = pf.addr;
        let ctx = &pf.ctx;

        // Build the path down to the level-1 shadow page.
        let mut write_protected = Flush::NONE;
        let mut wp_epoch = 0;
        let root_key = self.page(pf.root).key;
        let recomputed;
        let path = if root_key == w.root_key {
            &w.path
        } else {
            recomputed = path_keys(ctx, &root_key, t, gva.raw());
            &recomputed
        };
        let mut sp = pf.root;
        let mut level = root_key.role.level;
        for &child_key in path.iter() {
            let index = level.index(gva.raw());
            let below = child_key.role.level;
            let spte = Spte(self.pool.load(sp, index));
            let mut linked = None;
            if spte.is_present() {
                let child = self
                    .pool
                    .frame_at(spte.addr())
                    .expect("links stay in the pool");
                if self.page(child).key == child_key {
                    linked = Some(child);
                } else {
                    *flush |= self.drop_spte(sp, index);
                }
            }
            let child = match linked {
                Some(c) => c,
                None => {
                    let (c, wp) = self.get_or_create(child_key)?;
                    write_protected |= wp;
                    self.link(sp, index, c);
                    c
                }
            };
            // Used: the write-flooding count starts over. Written only when
            // it changes, so vCPUs faulting under the same directory do not
            // bounce its metadata between them.
            let page = self.page_mut(child);
            if page.write_flooding != 0 {
                page.write_flooding = 0;
            }
            wp_epoch = wp_epoch.max(page.wp_epoch);
            sp = child;
            level = below;
        }

        // A table on the path was write-protected by a flush not yet
        // acknowledged (this fault's, or another's still waiting): a vCPU may
        // still write it through its TLB. Flush, then look again, so the
        // entries are rechecked only once no such write can land (KVM
        // flushes under its lock at once instead).
        if write_protected.is_owed() || wp_epoch > self.wp_flushed.load(Ordering::SeqCst) {
            *flush |= write_protected | Flush::TLB;
            return Ok(None);
        }

        // The guest may have changed an entry between the walk and the
        // write protection the path just set up: then walk again.
        let four_byte = ctx.mode() == PagingMode::Bits32;
        {
            let mem = self.slots.guest_mem();
            for (step, before) in t.steps().iter().zip(&w.gptes) {
                if read_gpte(&mem, step.entry_gpa, four_byte) != *before {
                    return Ok(Some(FaultOutcome::Retry));
                }
            }
        }

        let gfn = w.gfn;
        let gpa = t.gpa;
        let guest_dirty = guest_dirty(t);
        let index = PtLevel::PT.index(gva.raw());
        let Some(slot) = w.slot else {
            // Cache the MMIO answer: writable only if the guest's D is set,
            // so the first write walks and sets it.
            let bits = w.cache_mmio.expect("set when no slot backs the gfn");
            let mut rights = t.rights;
            rights.write &= guest_dirty;
            let spte = self.mmio_spte(gfn, pf.generation.count(), bits, rights);
            *flush |= self.set_mmio_leaf(sp, index, gfn, spte);
            self.counters.faults_mmio += 1;
            return Ok(Some(FaultOutcome::Mmio { gpa }));
        };
        let lr = leaf_rights(ctx, t, pf.access);
        let hidden_from_smap = ctx.smap() && t.rights.user && !lr.user;
        let shadowed = self.is_write_protected(gfn);
        if pf.access.is_write() && (shadowed || hidden_from_smap) {
            // A write to a guest page table (or, with SMAP and CR0.WP = 0, a
            // supervisor write that no kernel-only mapping can express
            // without hiding the page from SMAP): emulate it.
            self.counters.write_protect_hits += 1;
            return Ok(Some(FaultOutcome::Emulate { gpa }));
        }
        let mut write = lr.write && slot.is_writable() && !shadowed && guest_dirty;
        if slot.flags.contains(MemslotFlags::LOG_DIRTY) {
            if pf.access.is_write() {
                self.mark_dirty(gfn);
            } else {
                write = false;
            }
        }
        let hpa = slot.hpa_of(gfn.gpa()).expect("gfn is in the slot");
        let mut spte = Spte::leaf(hpa, write, lr.user, lr.exec);
        if let Some(key) = t.pkey {
            spte = spte.with_pkey(key);
        }
        *flush |= self.set_leaf(sp, index, gfn, spte);
        if pf.prefetch > 1 {
            *flush |= self.prefetch(pf, w, sp, index);
        }
        LocalCounters::bump(&stats.faults_fixed);
        tracing::trace!(
            gva = gva.raw(),
            gpa = gpa.raw(),
            write,
            "shadow fault fixed"
        );
        Ok(Some(FaultOutcome::Retry))
    }

    /// Maps the neighbours of `index` in level-1 page `sp` whose guest PTEs
    /// are present and accessed (KVM's prefetch). Never sets guest A/D bits.
    /// Guest PTEs were walked without the lock; each is re-read here, where
    /// its table is write-protected, and skipped if it changed.
    fn prefetch(&mut self, pf: &PageFault, w: &GuestWalk, sp: FrameId, index: usize) -> Flush {
        let mut flush = Flush::NONE;
        for c in self.prefetch_candidates(pf, w, sp, index) {
            if Spte(self.pool.load(sp, c.index)).is_present() {
                continue;
            }
            let Some(spte) = self.prefetch_spte(&c) else {
                continue;
            };
            flush |= self.set_leaf(sp, c.index, c.gfn, spte);
            self.counters.prefetched += 1;
        }
        flush
    }

    /// As [`prefetch`](Self::prefetch), holding the MMU lock shared: only
    /// empty entries are filled.
    fn prefetch_shared(
        &self,
        pf: &PageFault,
        w: &GuestWalk,
        sp: FrameId,
        index: usize,
        stats: &LocalCounters,
    ) {
        for c in self.prefetch_candidates(pf, w, sp, index) {
            if self.pool.load(sp, c.index) != 0 {
                continue;
            }
            if let Some(spte) = self.prefetch_spte(&c)
                && self.install_leaf_shared(sp, c.index, c.gfn, spte)
            {
                LocalCounters::bump(&stats.prefetched);
            }
        }
    }

    /// The neighbours of `index` in level-1 page `sp` to prefetch: computed
    /// for a direct page, else the ones walked without the lock whose guest
    /// PTE is unchanged.
    fn prefetch_candidates(
        &self,
        pf: &PageFault,
        w: &GuestWalk,
        sp: FrameId,
        index: usize,
    ) -> Vec<PrefetchCandidate> {
        let key = self.page(sp).key;
        let four_byte = pf.ctx.mode() == PagingMode::Bits32;
        if key.role.direct {
            let count = pf.prefetch.next_power_of_two().min(ENTRIES_PER_PAGE);
            let first = index & !(count - 1);
            (first..first + count)
                .filter(|&j| j != index)
                .map(|j| PrefetchCandidate {
                    index: j,
                    gpte_gpa: Gpa(0),
                    gpte: 0,
                    gfn: Gfn(key.gfn.raw() + j as u64),
                    rights: w.t.rights,
                    dirty: guest_dirty(&w.t),
                    pkey: w.t.pkey,
                })
                .collect()
        } else {
            let mem = self.slots.guest_mem();
            w.prefetch
                .iter()
                .filter(|c| {
                    c.gpte_gpa.gfn() == key.gfn
                        && read_gpte(&mem, c.gpte_gpa, four_byte) == Some(c.gpte)
                })
                .copied()
                .collect()
        }
    }

    /// The leaf SPTE a prefetch candidate gets (`None`: no memslot backs
    /// it). Never writable unless the guest's D bit is set, nor for a
    /// logging slot or a shadowed guest table.
    fn prefetch_spte(&self, c: &PrefetchCandidate) -> Option<Spte> {
        let slot = self.slots.table.find_gfn(c.gfn).copied()?;
        let write = c.rights.write
            && c.dirty
            && slot.is_writable()
            && !slot.flags.contains(MemslotFlags::LOG_DIRTY)
            && !self.is_write_protected(c.gfn);
        let hpa = slot.hpa_of(c.gfn.gpa())?;
        let mut spte = Spte::leaf(hpa, write, c.rights.user, c.rights.exec);
        if let Some(k) = c.pkey {
            spte = spte.with_pkey(k);
        }
        Some(spte)
    }

    /// The fault path holding the MMU lock shared: fills the empty leaf
    /// entry for a fault walked without the lock, when the whole shadow
    /// path to it exists already and nothing else is owed. `None`: the
    /// fault needs the lock exclusively (a page to allocate or link, pages
    /// to reclaim, a write protection not yet flushed, a write-flooding
    /// count to reset, an emulated write, an MMIO SPTE, a dirty-logging
    /// slot, an entry that is not empty, an invalidation since the walk).
    ///
    /// Everything that changes the shadow tables in any other way holds
    /// the lock exclusively, so here the path, the memslots, the shadowed
    /// guest tables and the invalidation count stay as they are. Faults
    /// holding the lock shared only fill entries that hold 0, with a
    /// compare-and-exchange: each entry has one winner, which alone records
    /// its gfn and adds it to the (sharded) rmap. No SPTE is removed or
    /// narrowed, so no flush is owed.
    fn fix_fault_shared(&self, pf: &PageFault, stats: &LocalCounters) -> Option<FaultOutcome> {
        let w = pf.walk.as_ref()?;
        let need = u64::from(pf.root_level.get()) + 1;
        if self.is_obsolete(pf.root)
            || self.invalidate_seq.load(Ordering::SeqCst) != pf.mmu_seq
            || self.available(self.effective_limit()) < need
        {
            return None;
        }
        let slot = w.slot?;
        if slot.flags.contains(MemslotFlags::LOG_DIRTY) {
            return None;
        }
        let root_key = self.page(pf.root).key;
        if root_key != w.root_key {
            return None;
        }
        let gva = pf.addr.raw();
        let flushed = self.wp_flushed.load(Ordering::SeqCst);
        let mut sp = pf.root;
        let mut level = root_key.role.level;
        for &child_key in w.path.iter() {
            let spte = Spte(self.pool.load(sp, level.index(gva)));
            if !spte.is_present() {
                return None;
            }
            let child = self.pool.frame_at(spte.addr())?;
            let page = self.pages[child as usize].as_ref()?;
            if page.key != child_key || page.write_flooding != 0 || page.wp_epoch > flushed {
                return None;
            }
            sp = child;
            level = child_key.role.level;
        }
        let index = PtLevel::PT.index(gva);
        if self.pool.load(sp, index) != 0 {
            return None;
        }

        // The guest may have changed an entry between the walk and now:
        // then walk again. The tables on the path are write-protected and
        // flushed, so no write can land from here to the install but an
        // emulated one, which holds the lock exclusively.
        let t = &w.t;
        let four_byte = pf.ctx.mode() == PagingMode::Bits32;
        {
            let mem = self.slots.guest_mem();
            for (step, before) in t.steps().iter().zip(&w.gptes) {
                if read_gpte(&mem, step.entry_gpa, four_byte) != *before {
                    return Some(FaultOutcome::Retry);
                }
            }
        }

        let lr = leaf_rights(&pf.ctx, t, pf.access);
        let hidden_from_smap = pf.ctx.smap() && t.rights.user && !lr.user;
        let shadowed = self.is_write_protected(w.gfn);
        if pf.access.is_write() && (shadowed || hidden_from_smap) {
            return None;
        }
        let write = lr.write && slot.is_writable() && !shadowed && guest_dirty(t);
        let hpa = slot.hpa_of(w.gfn.gpa())?;
        let mut spte = Spte::leaf(hpa, write, lr.user, lr.exec);
        if let Some(key) = t.pkey {
            spte = spte.with_pkey(key);
        }
        if !self.install_leaf_shared(sp, index, w.gfn, spte) {
            // Another vCPU filled it first: let the hardware walk again.
            return Some(FaultOutcome::Retry);
        }
        if pf.prefetch > 1 {
            self.prefetch_shared(pf, w, sp, index, stats);
        }
        LocalCounters::bump(&stats.faults_fixed);
        LocalCounters::bump(&stats.faults_fixed_shared);
        tracing::trace!(gva, gpa = t.gpa.raw(), write, "shadow fault fixed (shared)");
        Some(FaultOutcome::Retry)
    }
}
