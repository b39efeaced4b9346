//! The traits a VMM drives: one [`MmuBackend`] per VM, one [`MmuVcpu`] per
//! vCPU.
//!
//! Threading model (the same as KVM's): the backend is shared by every
//! thread of the VMM (`Send + Sync`); each [`MmuVcpu`] is owned by its vCPU
//! thread and only ever called from it. A backend that needs every vCPU to
//! do something (drop a stale root, flush its TLB) posts a request, kicks
//! the vCPUs that are in guest mode through their [`VcpuKick`], and waits
//! until each has either acknowledged in [`MmuVcpu::prepare_entry`] or is
//! outside guest mode (it will see the request before it enters).

use std::fmt;
use std::sync::Arc;

use crate::addr::{Gpa, Gva, Hpa, SlotId, VcpuId};
use crate::error::{BackendError, MemslotError, VcpuError};
use crate::memslot::{DirtyBitmap, Memslot, MemslotChange, MemslotGeneration};
use crate::paging::{Access, PagingContext, PfErrorCode, RangeSegment, WalkError, WalkOptions};

/// Forces one vCPU out of guest mode (KVM: a signal to its thread plus
/// `immediate_exit`). Provided by the VMM when it creates the vCPU.
pub trait VcpuKick: Send + Sync + fmt::Debug {
    /// Makes the vCPU leave guest mode soon, or not enter it if it is about
    /// to. Called from any thread, possibly with backend locks held: it must
    /// not block and must not call back into the backend.
    fn kick(&self);
}

/// What the hardware must load before the guest runs (again).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub struct RootLoad {
    /// The root table the hardware's CR3 must point to; `None` when the
    /// guest's own CR3 is used (hardware two-dimensional paging).
    pub root: Option<Hpa>,
    /// Flush the hardware TLB for this vCPU before entry.
    pub flush_tlb: bool,
}

impl RootLoad {
    /// Load `root` (`None`: keep the guest's own CR3), flushing the TLB
    /// first if `flush_tlb`.
    pub const fn new(root: Option<Hpa>, flush_tlb: bool) -> Self {
        Self { root, flush_tlb }
    }
}

/// Result of [`MmuVcpu::handle_page_fault`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FaultOutcome {
    /// The MMU fixed the mapping (or the fault was spurious): re-enter the
    /// guest at the same instruction.
    Retry,
    /// The access targets MMIO at `gpa`: emulate the instruction against the
    /// device bus, then advance RIP.
    Mmio {
        /// Guest-physical address of the access.
        gpa: Gpa,
    },
    /// The fault belongs to the guest: inject #PF with this error code and
    /// CR2.
    InjectPageFault {
        /// Error code to push.
        error_code: PfErrorCode,
        /// Value for CR2.
        cr2: Gva,
    },
    /// The access is allowed but must not go through a mapping: it writes a
    /// guest page table the MMU shadows (write-protected). Emulate the
    /// faulting instruction and hand each guest-memory write it makes to the
    /// vCPU's MMU (`write_guest`), which updates its shadow state; then
    /// advance RIP.
    Emulate {
        /// Guest-physical address of the access.
        gpa: Gpa,
    },
    /// The access raises #GP in the guest (a non-canonical address, or
    /// PAE PDPTEs with reserved bits).
    InjectGeneralProtection,
}

/// Result of [`MmuVcpu::classify_mmio`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MmioClass {
    /// No memslot covers the address: forward it to the device bus.
    Mmio,
    /// A memslot covers it now (the exit raced with a memslot change):
    /// re-enter the guest.
    Memory {
        /// The slot that covers it.
        slot: SlotId,
    },
    /// A read-only slot covers it and the access was a write: forward the
    /// write to the device bus (ROM-device semantics, as KVM does).
    ReadOnlyWrite {
        /// The slot that covers it.
        slot: SlotId,
    },
}

/// Named counters a backend exposes (in the spirit of KVM's binary stats).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct MmuStats {
    /// Which backend produced them.
    pub backend: &'static str,
    /// Counter name and value, in a stable order chosen by the backend.
    pub counters: Vec<(&'static str, u64)>,
}

impl MmuStats {
    /// The counters of `backend`, in the order given.
    pub fn new(backend: &'static str, counters: Vec<(&'static str, u64)>) -> Self {
        Self { backend, counters }
    }

    /// The value of counter `name`, if the backend has it.
    pub fn get(&self, name: &str) -> Option<u64> {
        self.counters
            .iter()
            .find(|(n, _)| *n == name)
            .map(|&(_, v)| v)
    }
}

impl fmt::Display for MmuStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.backend)?;
        for (name, value) in &self.counters {
            write!(f, " {name}={value}")?;
        }
        Ok(())
    }
}

/// One VM's MMU. Shared by every VMM thread.
pub trait MmuBackend: Send + Sync + fmt::Debug {
    /// The backend's name ("shadow", "ept"). Any thread.
    fn name(&self) -> &'static str;

    /// Adds a memslot, or moves / changes the flags of the slot with the
    /// same id. Called by the VMM's memory-management thread, never
    /// concurrently with another memslot call (the VMM serializes them, as
    /// KVM's slots lock does). Guarantees on return: no translation held by
    /// any vCPU or cached by the backend maps the slot's old range or grants
    /// rights the new flags remove, and the memslot generation has advanced
    /// (except for [`MemslotChange::Unchanged`], which changes nothing).
    ///
    /// # Safety
    ///
    /// `slot.backing.host_addr` must be valid for reads and writes of
    /// `slot.size` bytes, page aligned, from this call until
    /// [`delete_memslot`](Self::delete_memslot) for the slot has returned
    /// (the backend reads guest page tables and dirty state through it).
    /// `slot.backing.hpa` must be where the hardware walking the backend's
    /// tables sees that same memory.
    unsafe fn set_memslot(&self, slot: Memslot) -> Result<MemslotChange, MemslotError>;

    /// Deletes memslot `id` and returns it. Same caller rules as
    /// [`set_memslot`](Self::set_memslot). Guarantees on return: no vCPU can
    /// reach the old range through any translation (the VMM may unmap the
    /// host backing at once).
    fn delete_memslot(&self, id: SlotId) -> Result<Memslot, MemslotError>;

    /// The current memslots, sorted by guest base. Any thread.
    fn memslots(&self) -> Vec<Memslot>;

    /// The memslot generation (with the update-in-progress bit). Any
    /// thread; advances once per completed memslot change.
    fn memslot_generation(&self) -> MemslotGeneration;

    /// Drops every translation the backend built. Any thread. Guarantees on
    /// return: every vCPU will load a fresh root (or flush) before its next
    /// guest entry, and none is still running on an old one.
    fn zap_all(&self);

    /// Returns the pages of slot `id` written since the last call, and
    /// starts a new logging period. The slot must have
    /// [`LOG_DIRTY`](crate::MemslotFlags::LOG_DIRTY). Any thread. Guarantees:
    /// every guest write that completed before the call is in this bitmap or
    /// a later one; none is lost.
    fn get_dirty_log(&self, id: SlotId) -> Result<DirtyBitmap, MemslotError>;

    /// Records that the VMM itself wrote `len` bytes at `gpa` (device
    /// emulation, DMA), so the dirty log reports them. Any thread.
    fn note_host_write(&self, gpa: Gpa, len: u64);

    /// Creates the MMU half of vCPU `id`; `kick` forces that vCPU out of
    /// guest mode. Called once per vCPU, before it first runs.
    fn create_vcpu(
        &self,
        id: VcpuId,
        kick: Arc<dyn VcpuKick>,
    ) -> Result<Box<dyn MmuVcpu>, BackendError>;

    /// A snapshot of the backend's counters. Any thread.
    fn stats(&self) -> MmuStats;

    /// The page limit: the most table pages the backend may hold (`None`:
    /// unlimited, or not applicable).
    fn page_limit(&self) -> Option<u64>;

    /// Sets the page limit, reclaiming pages if the backend is above it.
    /// Errors if the limit is below what the backend needs to make progress.
    fn set_page_limit(&self, pages: Option<u64>) -> Result<(), BackendError>;
}

/// One vCPU's MMU. Owned and called by that vCPU's thread only.
pub trait MmuVcpu: Send + fmt::Debug {
    /// The vCPU's id.
    fn id(&self) -> VcpuId;

    /// Loads the registers that decide translation: at setup, and whenever
    /// the guest loads CR3 or changes CR0, CR4 or EFER. Returns the root the
    /// hardware must use. The context is validated first.
    fn set_paging_context(&mut self, ctx: &PagingContext) -> Result<RootLoad, VcpuError>;

    /// The context last loaded.
    fn paging_context(&self) -> &PagingContext;

    /// Handles a #PF the hardware raised on the backend's tables (for the
    /// shadow backend) at `gva` with `error_code`. Returns what the vCPU
    /// loop must do next. Under hardware two-dimensional paging it is called
    /// only for an intercepted guest #PF, which the backend reflects.
    fn handle_page_fault(
        &mut self,
        gva: Gva,
        error_code: PfErrorCode,
    ) -> Result<FaultOutcome, VcpuError>;

    /// Classifies an MMIO exit (an access to a guest-physical address that
    /// faulted in the second stage). `is_write` tells ROM writes apart.
    fn classify_mmio(&mut self, gpa: Gpa, is_write: bool) -> MmioClass;

    /// Translates `len` bytes at `gva` for `access`, page by page, as the
    /// CPU would (with the rights of the whole walk), for instruction
    /// emulation and debuggers. With `options.set_accessed_dirty` the guest
    /// sees A/D bits set exactly as if it had made the access.
    fn translate(
        &mut self,
        gva: Gva,
        len: u64,
        access: Access,
        options: WalkOptions,
    ) -> Result<Vec<RangeSegment>, WalkError>;

    /// Performs a guest-memory write the VMM's instruction emulator made for
    /// this vCPU (after [`FaultOutcome::Emulate`], or any emulated store),
    /// so the MMU keeps its shadow state and the dirty log coherent with
    /// it. `data` must not cross a page. Errors if no writable memslot
    /// backs `gpa`.
    fn write_guest(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), VcpuError>;

    /// The guest invalidated the translation of `gva` (INVLPG).
    fn invlpg(&mut self, gva: Gva);

    /// The guest flushed its TLB (non-global translations go, as on a CR3
    /// load without PCID; global ones too if `include_global`).
    fn flush_tlb(&mut self, include_global: bool);

    /// Called right before every guest entry: services pending requests
    /// (root reload, TLB flush) posted by other threads, acknowledges them,
    /// and marks the vCPU as in guest mode. The returned [`RootLoad`] must
    /// be applied before entering.
    fn prepare_entry(&mut self) -> Result<RootLoad, VcpuError>;

    /// Called right after every guest exit: marks the vCPU as outside guest
    /// mode, so requests no longer wait for it.
    fn exit_guest(&mut self);

    /// Whether the MMIO access this vCPU served last (a
    /// [`FaultOutcome::Mmio`] from [`handle_page_fault`](Self::handle_page_fault),
    /// or [`classify_mmio`](Self::classify_mmio)) was answered from the
    /// backend's MMIO cache (an MMIO SPTE under shadow paging, the
    /// classification cache under EPT) rather than by a guest walk and a
    /// memslot search. `None` when the backend does not say. Lets a VMM
    /// time the fast and slow paths apart.
    fn last_mmio_cached(&self) -> Option<bool> {
        None
    }
}
