//! Shared pieces of the criterion benches (`cargo bench -p benches`).
//!
//! The pure-MMU microbenches (`benches/pure_mmu.rs`) run without KVM: the
//! shadow backend on its soft vCPU ([`mmu_shadow::soft::SoftVcpu`]), the
//! EPT backend on the in-process hypervisor
//! ([`mmu_ept::testing::InProcessHypervisor`]). This library gives them
//! guests with real 4-level page tables in host memory ([`guest`],
//! [`memory`]), memslot layouts ([`slots`]) and ready-made backends with a
//! vCPU ([`shadow::ShadowRig`], [`ept::EptRig`]). How to run and read the
//! benches: `docs/benches-pure-mmu.md`.
#![deny(missing_docs)]

pub mod ept;
pub mod shadow;

/// Guests, guest RAM and memslot layouts for the soft vCPU; they live in
/// `mmu_bench` because `mmu-vmm bench reclaim` uses them too.
pub use mmu_bench::{guest, memory, slots};

pub use guest::{Guest, GuestBuilder};
pub use memory::GuestMemory;
