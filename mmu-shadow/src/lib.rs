//! Shadow paging backend for `mmu-api`.
//!
//! The backend builds the page tables the hardware walks (guest-virtual to
//! host frame) from the guest's own page tables and the memslots, in the
//! structure of Linux KVM's shadow MMU:
//!
//! - a **pool** of 4 KiB frames in one host region the hardware can walk
//!   (on KVM, a memslot outside the guest's physical space), holding real
//!   x86-64 4-level tables (5-level for 5-level guests);
//! - **shadow pages** looked up by (gfn, role) in a hash, where the role
//!   carries level, direct, access, CR0.WP, NX, SMEP/SMAP-and-not-WP, the
//!   guest's entry size and quadrant (32-bit guests) and whether it stands
//!   in for a guest level with no table in memory;
//! - an **rmap** (gfn to the leaf SPTEs mapping it) and per-page **parent
//!   lists**, kept exact;
//! - **roots** per vCPU with a cache of the last four CR3s;
//! - guest **A/D bits** set exactly as hardware sets them (every fault
//!   re-walks the guest tables with the reference walker; a clean page is
//!   mapped read-only until written);
//! - **write protection** of every guest page table it shadows: a write to
//!   one is emulated ([`mmu_api::FaultOutcome::Emulate`], then
//!   [`mmu_api::MmuVcpu::write_guest`]), which zaps the SPTEs derived from the
//!   written entries; three writes without a use in between, or one
//!   misaligned write, zap the page (write flooding). There are no unsync
//!   pages;
//! - **prefetch** of present, accessed neighbouring guest PTEs;
//! - **memslots** (add, delete, move, READONLY, LOG_DIRTY) and dirty-log
//!   harvest; a **page limit** with oldest-first reclaim;
//! - **host coherence**, chosen at creation ([`Coherence`]): `Direct` where
//!   the hardware walks the pool (EPT/NPT hosts), `Replay` where the host's
//!   hypervisor shadows the pool itself (PVM): every changed SPTE is
//!   journaled and the guest kit's CPL0 code rewrites it through a
//!   supervisor-only window onto the pool before CPL3 code runs;
//! - **stats**, `tracing` events, and [`ShadowBackend::audit`].
//!
//! # Locking
//!
//! One MMU lock (KVM's `mmu_lock`) guards the shadow pages, the rmap and
//! the roots. As in KVM, a fault walks the guest tables (setting A/D bits
//! with compare-and-exchange), looks up its memslot and serves a cached
//! MMIO access without it: it reads the MMU's invalidation sequence count
//! (KVM's `mmu_invalidate_seq`) first and, under the lock, walks again if
//! the count moved. Memslots are published as read-only snapshots
//! (`arc-swap`, KVM's SRCU); deleting a slot waits until no lock-free
//! reader holds the old snapshot. Every change that leaves a TLB flush owed
//! returns a token the compiler makes the caller commit, and the vCPUs'
//! acknowledgements of a flush or a root reload are waited for with the
//! lock dropped.
//!
//! The lock can be held shared, as KVM's TDP MMU holds `mmu_lock` for read
//! on faults. Most faults only fill an empty leaf entry below shadow pages
//! that already exist; those hold the lock shared and run side by side on
//! different vCPUs: the leaf is installed with a compare-and-exchange on
//! the empty entry, the rmap is sharded behind small locks, and each vCPU
//! announces a shared hold in a flag on its own cache lines, so faults on
//! different pages write no cache line in common. Everything else (a page
//! to allocate or link, reclaim, zaps, write protection, emulated writes,
//! memslot changes) holds the lock exclusively, after every shared holder
//! has left. [`ShadowConfig::lockless_faults`] turns the lock-free and
//! shared paths off, for comparison.
//!
//! Source map, by KVM counterpart: `page` (shadow pages, roles, the hash),
//! `rmap` (rmap and parent SPTEs), `zap` (prepare / commit, fast zap,
//! obsolete pages), `reclaim`, `root` (roots and the root cache),
//! `write_track` (write protection, write flooding), `fault`, `mmio`,
//! `memslots`, `spte`, `pool` and `vcpu` (requests and the entry
//! handshake).
//!
//! The hardware runs the shadow tables with the registers
//! [`hardware_context`] gives, not the guest's own.
//!
//! `soft::SoftVcpu` (feature `test-utils`) is a software CPU that walks
//! the shadow tables as the hardware would, with a TLB, so tests run
//! without KVM and a missing flush fails them.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use mmu_api::{MmuBackend, VcpuId};
//! use mmu_shadow::{ShadowBackend, ShadowConfig, soft::NoKick};
//!
//! let backend = ShadowBackend::new(ShadowConfig::default()).unwrap();
//! let vcpu = backend.create_vcpu(VcpuId(0), Arc::new(NoKick)).unwrap();
//! assert_eq!(vcpu.id(), VcpuId(0));
//! assert_eq!(backend.stats().get("sps_in_use"), Some(0));
//! backend.audit().unwrap();
//! ```
#![deny(missing_docs)]

mod audit;
mod backend;
mod fault;
#[cfg(any(test, feature = "test-utils"))]
#[doc(hidden)]
pub mod fuzzing;
mod lock;
mod memslots;
mod mmio;
mod page;
mod pool;
mod reclaim;
mod rmap;
mod root;
#[cfg(any(test, feature = "test-utils"))]
pub mod soft;
mod spte;
mod state;
mod stats;
mod vcpu;
mod write_track;
mod zap;

pub use audit::AuditError;
pub use backend::{MIN_PAGE_LIMIT, ReplayBatch, ShadowBackend};
pub use pool::PoolError;

/// How zap-all (and memslot delete / move) drops the shadow pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ZapMode {
    /// The generation ("fast") zap: bump the valid generation, make every
    /// vCPU load a fresh root, and reclaim the obsolete pages later, first
    /// in line, in lock-breaking batches.
    #[default]
    Fast,
    /// Walk and zap every page under the lock (the baseline).
    Naive,
}

/// How the SPTEs the VMM writes reach the hardware that walks the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Coherence {
    /// The hardware walks the pool directly (EPT/NPT hosts): a TLB flush
    /// after a change is enough.
    #[default]
    Direct,
    /// The host's hypervisor shadows the pool itself and does not see the
    /// VMM's writes (PVM, or KVM without EPT). Every present entry that is
    /// removed, narrowed or retargeted, and every zapped frame, is journaled
    /// ([`ShadowBackend::take_replay`]), and the guest kit's CPL0 code
    /// rewrites them through `window`, a supervisor-only mapping of the
    /// pool that every root carries in the 512 GiB at `window` (which must
    /// be canonical, 512 GiB aligned, not 0, and unused by the guest: a
    /// guest access there is answered #GP).
    Replay {
        /// Where every root maps the pool.
        window: mmu_api::Gva,
    },
}

/// Which valid pages reclaim takes when the page limit is reached (after
/// zapped-obsolete pages, which always go first).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ReclaimPolicy {
    /// The oldest page first, roots skipped (KVM).
    #[default]
    Fifo,
    /// Linking a child makes its parent young, and leaves are reclaimed
    /// before directories.
    ParentAware,
}
pub use vcpu::ShadowVcpu;

use mmu_api::paging::{CpuFeatures, Cr0, Cr4, Efer};
use mmu_api::{Hpa, PagingContext, PagingMode};

/// The registers the hardware must run the shadow tables of a guest in
/// context `guest` with, whose root is `root`.
///
/// - 4-level paging (5-level for a 5-level guest), whatever the guest's mode,
///   with the host's MAXPHYADDR (so MMIO SPTEs fault with RSVD);
/// - CR0.WP = 1 always: read-only SPTEs (clean pages, write-protected guest
///   tables, dirty logging) must stop supervisor writes too; a guest's
///   CR0.WP = 0 is emulated with kernel-only writable SPTEs, as KVM does;
/// - EFER.NXE = 1, so SPTEs can deny fetches;
/// - CR4.SMEP and CR4.SMAP as the guest has them when it pages (a
///   no-paging guest has no page protections), CR4.PKE only when the
///   guest's protection keys are active; CPL, EFLAGS.AC and PKRU the
///   guest's.
pub fn hardware_context(guest: &PagingContext, root: Hpa, host_maxphyaddr: u8) -> PagingContext {
    let mut cr4 = Cr4::PAE;
    if guest.mode() != PagingMode::NoPaging {
        cr4 |= guest.cr4 & (Cr4::SMEP | Cr4::SMAP);
    }
    if guest.pke_active() {
        cr4 |= Cr4::PKE;
    }
    if guest.mode() == PagingMode::Level5 {
        cr4 |= Cr4::LA57;
    }
    let mut hw = PagingContext::new(CpuFeatures::all(), host_maxphyaddr);
    hw.cr0 = Cr0::PE | Cr0::PG | Cr0::WP;
    hw.cr3 = root.raw();
    hw.cr4 = cr4;
    hw.efer = Efer::LME | Efer::LMA | Efer::NXE;
    hw.cpl = guest.cpl;
    hw.eflags_ac = guest.eflags_ac;
    hw.pkru = guest.pkru;
    hw
}

/// How a shadow backend is built.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShadowConfig {
    /// Frames in the shadow page pool (4 KiB each). The mapping is reserved
    /// lazily, so a large pool costs address space, not memory.
    pub pool_pages: u32,
    /// Where the hardware sees the pool. It must not overlap any memslot's
    /// backing; on KVM it is a guest-physical address above guest memory.
    pub pool_hpa: Hpa,
    /// The most shadow pages the backend may hold (`None`: the pool size).
    pub page_limit: Option<u64>,
    /// Neighbouring guest PTEs mapped on a fault, only those present and
    /// accessed (0 or 1: off). Rounded up to a power of two and capped at
    /// 512, the whole guest table (the default). KVM uses 8; where every
    /// fault costs an exit, the whole table pays: on the development host
    /// (PVM, 2 vCPUs, 128 MiB) `mmu-vmm bench faults` measured first touch
    /// 1.46x and re-touch after a memslot churn 4.48x faster than with 8.
    pub prefetch: usize,
    /// Width of the guest-physical address space in bits, for memslot
    /// validation.
    pub gpa_width: u8,
    /// Fast (generation) or naive zap-all.
    pub zap: ZapMode,
    /// Obsolete pages zapped per batch before the MMU lock is dropped.
    pub zap_batch: usize,
    /// Which valid pages reclaim takes.
    pub reclaim: ReclaimPolicy,
    /// Cache MMIO translations in reserved-bit SPTEs. Needs a
    /// host MAXPHYADDR of at most 51.
    pub mmio_caching: bool,
    /// Memslot-generation bits stored in an MMIO SPTE (1..=19; KVM: 19).
    /// Tests shrink it to force wraps.
    pub mmio_gen_bits: u8,
    /// MAXPHYADDR of the hardware that walks the shadow tables: bits from
    /// it up to 51 are reserved, which MMIO SPTEs rely on.
    pub host_maxphyaddr: u8,
    /// How SPTE writes reach the hardware (chosen at VM creation).
    pub coherence: Coherence,
    /// Serve the guest walk, the memslot lookup and the MMIO fast path
    /// without the MMU lock, rechecking the MMU's invalidation count under
    /// it (as KVM does), and fill empty leaf entries holding the lock
    /// shared. Off: every fault runs holding the lock exclusively (the
    /// baseline, for comparison).
    pub lockless_faults: bool,
    /// Where a hypervisor that runs the shadow tables has no memory: with
    /// MMIO caching on, a guest frame no memslot backs is then mapped by
    /// an ordinary leaf to `mmio_window + gpa` (where that stays below
    /// 2^`host_maxphyaddr`), so the guest's access exits as the
    /// hypervisor's own MMIO exit (on KVM `KVM_EXIT_MMIO`, the instruction
    /// already emulated; the exit handler takes the window off the
    /// address) instead of a reserved-bit #PF the guest must report.
    /// Frames beyond the window keep reserved-bit MMIO SPTEs. `None`: every
    /// MMIO SPTE is a reserved-bit one.
    pub mmio_window: Option<Hpa>,
}

impl Default for ShadowConfig {
    fn default() -> Self {
        ShadowConfig {
            pool_pages: 1 << 16,
            pool_hpa: Hpa(1 << 40),
            page_limit: None,
            prefetch: 512,
            gpa_width: 46,
            zap: ZapMode::Fast,
            zap_batch: 10,
            reclaim: ReclaimPolicy::Fifo,
            mmio_caching: true,
            mmio_gen_bits: 19,
            host_maxphyaddr: 46,
            coherence: Coherence::Direct,
            lockless_faults: true,
            mmio_window: None,
        }
    }
}
