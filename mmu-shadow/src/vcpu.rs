//! The per-vCPU half: requests other threads post, the entry handshake, and
//! the `MmuVcpu` implementation (KVM: `kvm_make_all_cpus_request`,
//! `vcpu->mode` and `vcpu_enter_guest`'s request loop).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use mmu_api::paging::{RangeSegment, WalkError, WalkOptions, translate_range};
use mmu_api::{
    Access, FaultOutcome, Gpa, Gva, Hpa, MemslotFlags, MmioClass, MmuVcpu, PAGE_SIZE,
    PagingContext, PfErrorCode, RootLoad, VcpuError, VcpuId, VcpuKick,
};

use crate::backend::Inner;
use crate::pool::FrameId;
use crate::stats::LocalCounters;

bitflags::bitflags! {
    /// Work another thread asks a vCPU to do before it enters the guest.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(crate) struct Requests: u32 {
        /// Load a fresh root: the current one was zapped.
        const RELOAD_ROOT = 1 << 0;
        /// Flush the hardware TLB: SPTEs were removed or narrowed.
        const FLUSH_TLB = 1 << 1;
    }
}

/// A vCPU's shared-hold flag, on cache lines of its own: every exclusive
/// holder of the MMU lock reads it, and it must not share a line with
/// what the vCPU writes on every entry and exit.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct ReadingFlag(pub(crate) AtomicBool);

/// The part of a vCPU other threads touch: its requests and whether it is
/// in guest mode (KVM's `vcpu->requests` and `vcpu->mode`). Aligned to
/// its own cache lines: its vCPU writes it on every entry and exit.
#[derive(Debug)]
#[repr(align(128))]
pub(crate) struct VcpuShared {
    pub(crate) id: VcpuId,
    pub(crate) requests: AtomicU32,
    pub(crate) in_guest: AtomicBool,
    /// The vCPU holds the MMU lock shared ([`crate::lock::MmuLock::read`]).
    pub(crate) reading: ReadingFlag,
    pub(crate) kick: Arc<dyn VcpuKick>,
    /// Counters of the lock-free paths.
    pub(crate) stats: LocalCounters,
}

impl VcpuShared {
    /// Posts `req` and kicks the vCPU if it is in guest mode.
    pub(crate) fn post(&self, req: Requests) {
        self.requests.fetch_or(req.bits(), Ordering::SeqCst);
        // Pairs with the store of `in_guest` then the load of `requests` in
        // `prepare_entry`: either the vCPU sees the request before it
        // enters, or we see it in guest mode and kick it.
        if self.in_guest.load(Ordering::SeqCst) {
            self.kick.kick();
        }
    }

    /// Waits until the vCPU has taken `req` or is outside guest mode (then
    /// it takes `req` before it enters again). Kicks again now and then in
    /// case the vCPU raced into the guest.
    pub(crate) fn wait_out_of_guest_or_ack(&self, req: Requests) {
        let start = Instant::now();
        let mut last_kick = start;
        let mut warned = false;
        loop {
            let pending = self.requests.load(Ordering::SeqCst) & req.bits() != 0;
            if !pending || !self.in_guest.load(Ordering::SeqCst) {
                return;
            }
            if last_kick.elapsed() > Duration::from_millis(1) {
                self.kick.kick();
                last_kick = Instant::now();
            }
            if !warned && start.elapsed() > Duration::from_secs(1) {
                tracing::warn!(
                    vcpu = self.id.0,
                    "vCPU has not left guest mode after 1 s of kicks"
                );
                warned = true;
            }
            std::thread::yield_now();
        }
    }
}

/// The shadow backend's vCPU.
#[derive(Debug)]
pub struct ShadowVcpu {
    pub(crate) shared: Arc<VcpuShared>,
    pub(crate) inner: Arc<Inner>,
    pub(crate) ctx: PagingContext,
    pub(crate) root: Option<FrameId>,
    pending_flush: bool,
    /// Whether the last MMIO fault was served from an MMIO SPTE.
    last_mmio_cached: Option<bool>,
}

impl ShadowVcpu {
    pub(crate) fn new(shared: Arc<VcpuShared>, inner: Arc<Inner>) -> Self {
        ShadowVcpu {
            shared,
            inner,
            ctx: PagingContext::default(),
            root: None,
            pending_flush: false,
            last_mmio_cached: None,
        }
    }

    /// What to load. Called by `prepare_entry` after the vCPU is marked in
    /// guest mode, where taking the MMU lock could deadlock with a thread
    /// that holds it and waits for this vCPU: the root's address comes from
    /// the configuration, not the pool.
    fn root_load(&mut self, flush: bool) -> RootLoad {
        let flush_tlb = flush || std::mem::take(&mut self.pending_flush);
        let base = self.inner.config.pool_hpa.raw();
        let root = self.root.map(|f| Hpa(base + u64::from(f) * PAGE_SIZE));
        RootLoad::new(root, flush_tlb)
    }

    /// The MMU is only called between `exit_guest` and `prepare_entry`: a
    /// vCPU marked in guest mode is waited for by zaps and flushes, so one
    /// that blocked on the MMU lock while marked could deadlock them.
    fn assert_out_of_guest(&self) {
        debug_assert!(
            !self.shared.in_guest.load(Ordering::SeqCst),
            "vCPU {} called into the MMU while marked in guest mode (exit_guest first)",
            self.shared.id.0
        );
    }
}

impl Drop for ShadowVcpu {
    fn drop(&mut self) {
        self.inner.remove_vcpu(&self.shared);
    }
}

impl MmuVcpu for ShadowVcpu {
    fn id(&self) -> VcpuId {
        self.shared.id
    }

    fn set_paging_context(&mut self, ctx: &PagingContext) -> Result<RootLoad, VcpuError> {
        self.assert_out_of_guest();
        ctx.validate()?;
        let frame = self.inner.resolve_root(self.shared.id, ctx)?;
        self.ctx = *ctx;
        self.root = Some(frame);
        Ok(self.root_load(true))
    }

    fn paging_context(&self) -> &PagingContext {
        &self.ctx
    }

    fn handle_page_fault(
        &mut self,
        gva: Gva,
        error_code: PfErrorCode,
    ) -> Result<FaultOutcome, VcpuError> {
        self.assert_out_of_guest();
        let Some(root) = self.root else {
            // No context loaded yet: the hardware cannot have walked our
            // tables; load one first.
            let frame = self.inner.resolve_root(self.shared.id, &self.ctx)?;
            self.root = Some(frame);
            return Ok(FaultOutcome::Retry);
        };
        let fast_hits = || self.shared.stats.mmio_fast_hits.load(Ordering::Relaxed);
        let before = fast_hits();
        let outcome = self
            .inner
            .page_fault(&self.shared, &self.ctx, root, gva, error_code)?;
        if let FaultOutcome::Mmio { .. } = outcome {
            // The MMIO SPTE fast path counts its hits on this vCPU.
            self.last_mmio_cached = Some(fast_hits() != before);
        }
        Ok(outcome)
    }

    fn classify_mmio(&mut self, gpa: Gpa, is_write: bool) -> MmioClass {
        self.assert_out_of_guest();
        match self.inner.memslots.load().find(gpa) {
            None => MmioClass::Mmio,
            Some(s) if is_write && s.flags.contains(MemslotFlags::READONLY) => {
                MmioClass::ReadOnlyWrite { slot: s.id }
            }
            Some(s) => MmioClass::Memory { slot: s.id },
        }
    }

    fn translate(
        &mut self,
        gva: Gva,
        len: u64,
        access: Access,
        options: WalkOptions,
    ) -> Result<Vec<RangeSegment>, WalkError> {
        self.assert_out_of_guest();
        let slots = self.inner.memslots.load();
        translate_range(&self.ctx, &slots.guest_mem(), gva, len, access, options)
    }

    /// The SPTEs derived from guest entries the write changes are zapped;
    /// a shadowed table written three times without a use in between, or
    /// written misaligned, is zapped whole (write flooding).
    fn write_guest(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), VcpuError> {
        self.assert_out_of_guest();
        self.inner.emulated_write(gpa, data)
    }

    fn invlpg(&mut self, _gva: Gva) {
        // Guest page-table writes are emulated and zap the SPTEs they change
        // at once (no unsync pages), so the shadow tables already match the
        // guest's; only the hardware TLB may hold the old translation.
        self.pending_flush = true;
    }

    fn flush_tlb(&mut self, _include_global: bool) {
        self.pending_flush = true;
    }

    fn prepare_entry(&mut self) -> Result<RootLoad, VcpuError> {
        let mut flush = false;
        if self.root.is_none() {
            let frame = self.inner.resolve_root(self.shared.id, &self.ctx)?;
            self.root = Some(frame);
            flush = true;
        }
        loop {
            self.shared.in_guest.store(true, Ordering::SeqCst);
            let req = Requests::from_bits_truncate(self.shared.requests.swap(0, Ordering::SeqCst));
            if req.is_empty() {
                return Ok(self.root_load(flush));
            }
            self.shared.in_guest.store(false, Ordering::SeqCst);
            if req.contains(Requests::FLUSH_TLB) {
                flush = true;
            }
            if req.contains(Requests::RELOAD_ROOT) {
                let reload = self.root.is_none_or(|f| self.inner.lock().is_obsolete(f));
                if reload {
                    let frame = self.inner.resolve_root(self.shared.id, &self.ctx)?;
                    self.root = Some(frame);
                    flush = true;
                }
            }
        }
    }

    fn exit_guest(&mut self) {
        self.shared.in_guest.store(false, Ordering::SeqCst);
    }

    fn last_mmio_cached(&self) -> Option<bool> {
        self.last_mmio_cached
    }
}
