//! EPT-passthrough backend for `mmu-api`.
//!
//! With hardware two-dimensional paging (Intel EPT, AMD NPT) the hypervisor
//! owns the second stage: on KVM the kernel builds and zaps it. What a VMM
//! still decides itself is what this backend does:
//!
//! - **Memslots**, validated by [`mmu_api::MemslotTable`] and mirrored into
//!   the hypervisor through the small [`HypervisorMemory`] port (the
//!   `mmu-integration` crate implements it for a KVM VM fd, so this crate never
//!   owns one). Every change publishes the update-in-progress generation
//!   first and the next generation last.
//! - **MMIO classification** of exits to guest-physical addresses without
//!   memory, through a per-vCPU cache keyed by guest frame and tagged with
//!   the memslot generation: a repeated exit to a device page skips the
//!   memslot search. [`EptConfig::mmio_cache_entries`] turns it off.
//! - **Dirty logging** that merges the hypervisor's log of guest writes
//!   with the writes the VMM made itself ([`MmuBackend::note_host_write`](mmu_api::MmuBackend::note_host_write));
//!   nothing is lost across harvests.
//! - **Guest-virtual translation** for instruction emulation and debuggers,
//!   with the reference walker over guest memory and a small per-vCPU
//!   software TLB that follows the CPU's invalidation rules (CR3 load,
//!   INVLPG, flush) and is dropped when the memslot generation changes.
//!
//! Guest #PFs never reach this backend under EPT unless the VMM intercepts
//! them; it then reflects them unchanged (see [`EptVcpu`]). The backend
//! builds no table the hardware walks, so there is no page limit and no
//! root to load.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//!
//! use mmu_api::{Gpa, MemslotFlags, MmioClass, MmuBackend, SlotId, VcpuId, VcpuKick};
//! use mmu_ept::testing::{GuestRam, InProcessHypervisor};
//! use mmu_ept::{EptBackend, EptConfig};
//!
//! #[derive(Debug)]
//! struct NoKick;
//! impl VcpuKick for NoKick {
//!     fn kick(&self) {}
//! }
//!
//! // 64 KiB of guest RAM at guest-physical 0, with dirty logging. On KVM
//! // the port would be the VM fd's memory-region ioctls.
//! let ram = GuestRam::new(0x1_0000);
//! let hypervisor = Arc::new(InProcessHypervisor::new());
//! let backend = EptBackend::new(EptConfig::default(), hypervisor.clone());
//! let slot = ram.memslot(SlotId(0), Gpa(0), MemslotFlags::LOG_DIRTY);
//! // SAFETY: `ram` is declared before the backend and the vCPU, so it is
//! // dropped after them: its host range outlives every use.
//! unsafe { backend.set_memslot(slot) }.unwrap();
//! let mut vcpu = backend.create_vcpu(VcpuId(0), Arc::new(NoKick)).unwrap();
//!
//! // An exit to the local APIC page is MMIO; the second one is a cache hit.
//! assert_eq!(vcpu.classify_mmio(Gpa(0xfee0_0000), true), MmioClass::Mmio);
//! assert_eq!(vcpu.classify_mmio(Gpa(0xfee0_0030), false), MmioClass::Mmio);
//! assert_eq!(backend.stats().get("mmio_cache_hits"), Some(1));
//!
//! // The guest wrote page 5, the VMM's own device model page 2.
//! hypervisor.guest_write(Gpa(0x5000), 8);
//! backend.note_host_write(Gpa(0x2ff0), 4);
//! let log = backend.get_dirty_log(SlotId(0)).unwrap();
//! assert_eq!(log.iter_dirty().collect::<Vec<_>>(), [2, 5]);
//! assert_eq!(backend.get_dirty_log(SlotId(0)).unwrap().count(), 0);
//! ```
#![deny(missing_docs)]

mod backend;
mod config;
mod dirty;
mod mmio_cache;
mod port;
mod stats;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;
mod tlb;
mod vcpu;

pub use backend::{BACKEND_NAME, EptBackend};
pub use config::{EptConfig, MAX_CACHE_ENTRIES};
pub use port::HypervisorMemory;
pub use vcpu::EptVcpu;
