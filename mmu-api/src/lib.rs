//! The stable contract between a VMM and its pluggable MMU backends.
//!
//! A VMM picks, per VM, how guest memory is virtualized: software shadow
//! paging (`mmu-shadow`) or hardware two-dimensional paging passed through
//! (`mmu-ept`). Both implement the traits here, so the VMM's vCPU loop and
//! memory management do not change with the backend:
//!
//! - [`MmuBackend`]: one per VM, shared by every thread: memslots, the
//!   memslot generation, zap-all, dirty logging, vCPU creation, stats, the
//!   page limit.
//! - [`MmuVcpu`]: one per vCPU, owned by its thread: paging context and
//!   root, page faults, MMIO classification, guest-virtual translation,
//!   INVLPG / TLB flush, and the request check before every guest entry.
//!
//! It also holds the x86 guest paging model in [`paging`]: registers and
//! modes, entry bits, accesses, #PF error codes and the reference walker,
//! which both backends (and the test oracles) translate with.
//!
//! No hypervisor type (KVM, MSHV) appears in this API.
//!
//! # Example
//!
//! Validate a memslot layout the way every backend will:
//!
//! ```
//! use mmu_api::{Gpa, HostBacking, HostVirtAddr, Hpa, Memslot, MemslotFlags, MemslotTable, SlotId};
//!
//! let mut slots = MemslotTable::new(46, 32);
//! let backing = HostBacking { hpa: Hpa(0x1_0000_0000), host_addr: HostVirtAddr(0x7f00_0000_0000) };
//! let ram = Memslot::new(SlotId(0), Gpa(0), 1 << 30, backing, MemslotFlags::LOG_DIRTY);
//! slots.set(ram).unwrap();
//! assert_eq!(slots.find(Gpa(0x1234)).unwrap().id, SlotId(0));
//! assert!(slots.find(Gpa(1 << 30)).is_none()); // MMIO above RAM
//! ```
#![deny(missing_docs)]

mod addr;
mod backend;
mod error;
mod memslot;
pub mod paging;

pub use addr::{Gfn, Gpa, Gva, Hpa, PAGE_OFFSET_MASK, PAGE_SHIFT, PAGE_SIZE, SlotId, VcpuId};
pub use backend::{FaultOutcome, MmioClass, MmuBackend, MmuStats, MmuVcpu, RootLoad, VcpuKick};
pub use error::{BackendError, ContextError, HypervisorError, MemslotError, VcpuError};
pub use memslot::{
    DEFAULT_MAX_SLOTS, DirtyBitmap, HostBacking, HostVirtAddr, Memslot, MemslotChange,
    MemslotFlags, MemslotGeneration, MemslotTable,
};
pub use paging::{
    Access, AccessKind, AccessMode, PageSize, PagingContext, PagingMode, PfErrorCode, Rights,
};

/// The crate README's Rust examples, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
