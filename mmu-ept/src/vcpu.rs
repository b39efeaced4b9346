//! The per-vCPU half: MMIO classification, guest-virtual translation with
//! a software TLB, and the entry/exit protocol.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use mmu_api::paging::{RangeSegment, SlotMemory, WalkError, WalkOptions, walk_with, write_bytes};
use mmu_api::{
    Access, FaultOutcome, Gpa, Gva, MemslotGeneration, MmioClass, MmuVcpu, PAGE_SIZE,
    PagingContext, PagingMode, PfErrorCode, RootLoad, VcpuError, VcpuId,
};

use crate::backend::Shared;
use crate::config::cache_size;
use crate::mmio_cache::{FrameKind, MmioCache};
use crate::stats::{VcpuCounter, VcpuCounters};
use crate::tlb::{SoftTlb, TlbLookup};

/// What a vCPU must load before entry under EPT: nothing. The guest's own
/// CR3 is used, and the hypervisor keeps its second stage and the hardware
/// TLB coherent itself.
const PASSTHROUGH: RootLoad = RootLoad::new(None, false);

/// The MMU half of one vCPU under the EPT backend. Created by
/// [`EptBackend`](crate::EptBackend)'s `create_vcpu`; owned by the vCPU
/// thread, so its TLB and MMIO cache take no lock.
///
/// Its software TLB follows the hardware's rules, so that a guest that
/// invalidates correctly cannot tell it from a fresh walk:
///
/// - Only walks that set A/D bits fill it (the CPU caches a translation
///   only once A is set on every level); debug translations may hit but
///   never fill.
/// - An entry remembers which accesses (read, write, fetch; user,
///   supervisor, implicit supervisor) its walks allowed. A hit needs that
///   very access; anything else walks, so every fault comes from the
///   walker with its exact error code, and a right the guest added without
///   INVLPG is seen at once.
/// - A write through an entry whose leaf was clean walks, so D gets set.
/// - A large page is cached per 4 KiB page; INVLPG anywhere in it drops
///   every piece.
/// - A CR3 load drops non-global entries; any other change of the paging
///   context, a new memslot generation and zap-all drop them all.
pub struct EptVcpu {
    id: VcpuId,
    shared: Arc<Shared>,
    counters: Arc<VcpuCounters>,
    ctx: PagingContext,
    tlb: SoftTlb,
    mmio: MmioCache,
    /// The memslot generation the TLB was last made consistent with.
    tlb_generation: MemslotGeneration,
    /// The zap epoch the TLB and MMIO cache were last made consistent with.
    zap_epoch: u64,
    /// Whether the last MMIO classification was a cache hit.
    last_mmio_cached: Option<bool>,
}

impl fmt::Debug for EptVcpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EptVcpu")
            .field("id", &self.id)
            .field("mode", &self.ctx.mode())
            .field("cr3", &format_args!("{:#x}", self.ctx.cr3))
            .field("tlb_generation", &self.tlb_generation)
            .field("zap_epoch", &self.zap_epoch)
            .finish_non_exhaustive()
    }
}

impl EptVcpu {
    pub(crate) fn new(id: VcpuId, shared: Arc<Shared>, counters: Arc<VcpuCounters>) -> Self {
        let tlb = SoftTlb::new(cache_size(shared.config.tlb_entries));
        let mmio = MmioCache::new(cache_size(shared.config.mmio_cache_entries));
        let tlb_generation = shared.generation();
        let zap_epoch = shared.zap_epoch.load(Ordering::Acquire);
        Self {
            id,
            shared,
            counters,
            ctx: PagingContext::default(),
            tlb,
            mmio,
            tlb_generation,
            zap_epoch,
            last_mmio_cached: None,
        }
    }

    fn flush_tlb_entries(&mut self, include_global: bool) {
        self.tlb.flush(include_global);
        self.counters.bump(VcpuCounter::TlbFlush);
    }

    /// Catches up with what other threads did: a zap-all drops the TLB and
    /// the MMIO cache; a new memslot generation (or one in progress) drops
    /// the TLB, since the guest's tables may now read differently. The MMIO
    /// cache checks generations per entry instead. Returns the generation
    /// read, which callers tag what they cache with.
    fn catch_up(&mut self) -> MemslotGeneration {
        let epoch = self.shared.zap_epoch.load(Ordering::Acquire);
        let generation = self.shared.generation();
        if epoch != self.zap_epoch {
            self.zap_epoch = epoch;
            self.mmio.clear();
            self.flush_tlb_entries(true);
        }
        if generation != self.tlb_generation {
            self.tlb_generation = generation;
            self.flush_tlb_entries(true);
        }
        generation
    }

    /// The linear address the TLB is keyed by: outside IA-32e modes only
    /// the low 32 bits exist.
    fn linear(&self, gva: Gva) -> u64 {
        if self.ctx.mode().is_long() {
            gva.raw()
        } else {
            gva.raw() & 0xffff_ffff
        }
    }
}

impl MmuVcpu for EptVcpu {
    fn id(&self) -> VcpuId {
        self.id
    }

    /// Validates and loads `ctx`; the TLB follows the CPU's rules. A change
    /// of CR3 alone is a CR3 load: non-global translations go. Any other
    /// change (CR0, CR4, EFER, CPL, EFLAGS.AC, PKRU, features) drops every
    /// translation, because the TLB remembers which accesses were allowed
    /// under the old state. The hardware keeps using the guest's own CR3.
    fn set_paging_context(&mut self, ctx: &PagingContext) -> Result<RootLoad, VcpuError> {
        ctx.validate()?;
        let cr3_load_only = {
            let mut same_but_cr3 = self.ctx;
            same_but_cr3.cr3 = ctx.cr3;
            same_but_cr3 == *ctx
        };
        self.flush_tlb_entries(!cr3_load_only);
        self.ctx = *ctx;
        Ok(PASSTHROUGH)
    }

    fn paging_context(&self) -> &PagingContext {
        &self.ctx
    }

    /// Under EPT the CPU delivers guest #PFs to the guest itself; this is
    /// only called when the VMM intercepts one (an exception bitmap, an
    /// MSHV exception intercept). The backend reflects it unchanged: the
    /// hardware's error code and address are the truth about an access
    /// that already faulted, and a re-walk could not reproduce it exactly
    /// (the error code does not say whether the access was an implicit
    /// supervisor one, which SMAP treats differently), so answering `Retry`
    /// on a re-walk that happens to succeed could livelock the guest, while
    /// a spurious #PF is always safe for the guest to take. As the CPU does
    /// when it raises a #PF, the software TLB entry for `gva` is dropped.
    fn handle_page_fault(
        &mut self,
        gva: Gva,
        error_code: PfErrorCode,
    ) -> Result<FaultOutcome, VcpuError> {
        self.catch_up();
        let linear = self.linear(gva);
        self.tlb.invalidate(linear);
        self.counters.bump(VcpuCounter::PageFaultReflected);
        Ok(FaultOutcome::InjectPageFault {
            error_code,
            cr2: gva,
        })
    }

    /// Answers from the per-vCPU cache when it holds an entry for the frame
    /// made under the current memslot generation (and no update is in
    /// progress); otherwise searches the memslots and caches the answer.
    fn classify_mmio(&mut self, gpa: Gpa, is_write: bool) -> MmioClass {
        let generation = self.catch_up();
        let gfn = gpa.gfn();
        if let Some(kind) = self.mmio.lookup(gfn, generation) {
            self.counters.bump(VcpuCounter::MmioCacheHit);
            self.last_mmio_cached = Some(true);
            return kind.classify(is_write);
        }
        self.counters.bump(VcpuCounter::MmioCacheMiss);
        self.last_mmio_cached = Some(false);
        let kind = match self.shared.read_slots().table.find(gpa) {
            None => FrameKind::Mmio,
            Some(slot) => FrameKind::Memory {
                slot: slot.id,
                writable: slot.is_writable(),
            },
        };
        self.mmio.insert(gfn, generation, kind);
        let class = kind.classify(is_write);
        tracing::trace!(
            vcpu = self.id.0,
            gpa = gpa.raw(),
            is_write,
            generation = generation.0,
            ?class,
            "MMIO classification cache miss"
        );
        class
    }

    /// `translate_range` semantics, page by page, with the software TLB in
    /// front of the reference walker: a hit skips the walk only when the
    /// walker would give the same answer and change nothing (see the rules
    /// on [`EptVcpu`]). While a memslot update is in progress nothing is
    /// served from or added to the TLB.
    fn translate(
        &mut self,
        gva: Gva,
        len: u64,
        access: Access,
        options: WalkOptions,
    ) -> Result<Vec<RangeSegment>, WalkError> {
        self.counters.bump(VcpuCounter::Translation);
        let generation = self.catch_up();
        // Without paging there is nothing to cache (the walk reads no
        // memory); during a memslot update nothing may be cached or trusted.
        let paging = self.ctx.mode() != PagingMode::NoPaging;
        let use_tlb = paging && !generation.update_in_progress();
        let mut slots = None;
        let mut segments = Vec::new();
        let mut cur = gva;
        let mut left = len;
        while left > 0 {
            let in_page = (PAGE_SIZE - cur.page_offset()).min(left);
            let linear = self.linear(cur);
            let cached = if use_tlb {
                self.tlb.lookup(linear, access, options.set_accessed_dirty)
            } else {
                TlbLookup::Miss
            };
            let gpa = match cached {
                TlbLookup::Hit(gpa) => {
                    self.counters.bump(VcpuCounter::TlbHit);
                    gpa
                }
                TlbLookup::Miss => {
                    if paging {
                        self.counters.bump(VcpuCounter::TlbMiss);
                    }
                    let state = slots.get_or_insert_with(|| self.shared.read_slots());
                    // SAFETY: every slot in this table came through
                    // `set_memslot`, whose contract keeps its host range
                    // valid for reads and writes until `delete_memslot` for
                    // it returns; `delete_memslot` swaps the slot out of the
                    // table under the write lock before returning, and we
                    // hold the read lock while `mem` lives. The table made
                    // every host address page aligned (check_shape), hence
                    // 8-byte aligned.
                    let mem = unsafe { SlotMemory::new(&state.table) };
                    let t = walk_with(&self.ctx, &mem, cur, access, options)?;
                    if use_tlb && options.set_accessed_dirty {
                        self.tlb.insert(linear, access, &t);
                    }
                    t.gpa
                }
            };
            segments.push(RangeSegment {
                gva: cur,
                gpa,
                len: in_page,
            });
            left -= in_page;
            cur = cur.wrapping_add(in_page);
        }
        Ok(segments)
    }

    /// Writes guest memory for the VMM's instruction emulator and records
    /// the page in the dirty log: KVM's log only sees writes the hardware
    /// made.
    ///
    /// The page is logged under the same read lock as the write (a memslot
    /// move or delete between the two would lose the mark), both before
    /// the write (a harvest that returns after the data is visible reports
    /// the page, as the hardware's log does: a write faults and is logged
    /// before it lands) and after it (a harvest between the first mark and
    /// the write leaves the page marked again, so whoever copied it after
    /// that harvest copies it again).
    fn write_guest(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), VcpuError> {
        if gpa.page_offset() + data.len() as u64 > PAGE_SIZE {
            return Err(VcpuError::CrossesPage {
                gpa,
                len: data.len(),
            });
        }
        let state = self.shared.read_slots();
        let slot = state.table.find(gpa).ok_or(VcpuError::Unbacked(gpa))?;
        if !slot.is_writable() {
            return Err(VcpuError::ReadOnly(gpa));
        }
        let len = data.len() as u64;
        state.note_write(gpa, len);
        // SAFETY: as in `translate`: the slots in this table keep their
        // host ranges valid while we hold the read lock, and their host
        // addresses are page aligned.
        let mem = unsafe { SlotMemory::new(&state.table) };
        write_bytes(&mem, gpa, data).map_err(|_| VcpuError::Unbacked(gpa))?;
        state.note_write(gpa, len);
        Ok(())
    }

    fn invlpg(&mut self, gva: Gva) {
        let linear = self.linear(gva);
        self.tlb.invalidate(linear);
    }

    fn flush_tlb(&mut self, include_global: bool) {
        self.flush_tlb_entries(include_global);
    }

    /// The only requests other threads post to an EPT vCPU are a new zap
    /// epoch and a new memslot generation; both are acknowledged here by
    /// dropping the software caches they invalidate. Nothing waits for the
    /// acknowledgement (nothing the hardware uses was built by this
    /// backend), so there is no guest-mode flag to set.
    fn prepare_entry(&mut self) -> Result<RootLoad, VcpuError> {
        self.catch_up();
        Ok(PASSTHROUGH)
    }

    /// Nothing to do: see [`prepare_entry`](Self::prepare_entry).
    fn exit_guest(&mut self) {}

    fn last_mmio_cached(&self) -> Option<bool> {
        self.last_mmio_cached
    }
}
