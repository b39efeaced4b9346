//! Glue between a host VMM's vCPU exit loop and an MMU backend.
//!
//! A VMM in the style of Cloud Hypervisor or crosvm enables this crate as a
//! cargo feature, builds the VM's backend by name (`"shadow"` / `"ept"`,
//! through the `mmu-backends` registry), and calls into it from three places:
//!
//! - **Its vCPU loop**, through one [`VcpuExits`] per vCPU: exits become
//!   [`MmuVcpu`](mmu_api::MmuVcpu) calls (MMIO classification, page
//!   faults, paging-context changes, emulated writes) and the answers
//!   become an [`Action`]: resume, MMIO served on the VMM's
//!   [`MmioBus`], inject a fault, load a new root, or emulate. Front ends:
//!   KVM's `VcpuExit` ([`VcpuExits::handle_kvm_exit`], feature `kvm`) and
//!   MSHV's `hv_message` (`VcpuExits::handle_mshv_message`, feature
//!   `mshv`); on KVM, [`kvm::apply_action`] carries an action out on the
//!   `VcpuFd`.
//! - **Its memory map**, through [`Memslots`]: every add, move, delete and
//!   dirty-logging switch (per slot, as KVM does, or VM-wide over the slots
//!   recorded as logged, as Cloud Hypervisor does). On KVM the EPT backend
//!   owns the VM's memslots through [`kvm::KvmMemory`]
//!   (`KVM_SET_USER_MEMORY_REGION`, `KVM_GET_DIRTY_LOG`); the shadow
//!   backend's pool and guest memory live in one KVM memslot registered at
//!   VM creation, the [`arena::Arena`], so its memslot changes never reach
//!   KVM's memory map; [`kvm::KvmMmu`] sets all of this up for a VM.
//! - **Its device dispatch**, through adapters of the host's own shape.
//!
//! Under the shadow backend on KVM, the hardware walks the MMU's tables,
//! and the guest must report its page faults and CR3 loads itself (KVM
//! never passes them to userspace): it speaks the paravirtual MMU ABI
//! defined here as a versioned contract ([`shadow_host::abi`], version
//! [`PV_MMU_ABI_VERSION`](shadow_host::abi::PV_MMU_ABI_VERSION)), and the
//! host runs one [`shadow_host::ShadowVcpuHost`] per vCPU around
//! `KVM_RUN`: it loads the MMU's roots into CR3, queues the table writes
//! the guest kernel must replay where the host's KVM shadows page tables
//! itself, and emulates the MOV-class accesses the MMU answers with MMIO
//! or a protected page-table write. The guest's side comes in as data
//! ([`shadow_host::PvVcpuLayout`]) and a trait ([`shadow_host::PvKernel`]);
//! the vCPU as a [`shadow_host::PvVcpu`] (implemented for `VcpuFd` with
//! guest memory).
//!
//! Everything that touches the hypervisor goes through two small
//! [`ports`]: a memory-region port per VM and a vCPU-register / event port
//! per vCPU, implemented here for kvm-ioctls' `VmFd` and `VcpuFd`. A host
//! that keeps those private implements the ports over its own types and
//! builds a [`host::HostMmu`] on them.
//!
//! # Host shapes
//!
//! **Cloud Hypervisor** serves MMIO inside `Vcpu::run()` through the
//! `Arc<dyn hypervisor::VmOps>` each vCPU is created with, and keeps
//! `VmFd` / `VcpuFd` private behind its `hypervisor::Vm` / `Vcpu` traits
//! (`create_user_memory_region` takes six arguments, `create_vcpu(id,
//! vm_ops, msr_config_update)` three; dirty logging is switched VM-wide
//! with `start_dirty_log`). The `mmu-cloud-hypervisor` crate (in
//! `integration/cloud-hypervisor`, built against that crate) decorates
//! its `Vm` and `Vcpu` and implements `hypervisor::VmOps` over
//! [`cloud_hypervisor::MmuVmOps`], which calls `exit_guest` and
//! `prepare_entry` itself around the MMIO it serves inside `run()`.
//! Shadow paging is refused there unless the guest speaks the
//! paravirtual MMU ABI ([`host::GuestMmuPath`]).
//!
//! **crosvm** returns MMIO from `Vcpu::run()` as `VcpuExit::Mmio` and
//! serves it with `vcpu.handle_mmio(&mut |IoParams { address, operation }|
//! ...)`, `operation` being `IoOperation::Read(&mut [u8])` (fill the
//! slice) or `IoOperation::Write(&[u8])`, the closure returning
//! `Result<()>`; [`crosvm::CrosvmMmio`] is the body of that closure.
//!
//! | feature | default | what |
//! | --- | --- | --- |
//! | `kvm` | yes | the [`kvm`] module (kvm-ioctls): the ports over `VmFd` / `VcpuFd` |
//! | `ept` | yes | the EPT backend (and [`ports::RegionMemory`]) |
//! | `shadow` | yes | the shadow backend and its hosting ([`host::ShadowHosting`]; with `kvm`, [`shadow_host`] and its iced-x86 decoder) |
//! | `mshv` | no | the `mshv` module (mshv-bindings) |
//!
//! # Example
//!
//! An MMIO write exit from KVM, classified by the EPT backend and served on
//! the VMM's bus (here with the backend's in-process hypervisor double, so
//! it runs without `/dev/kvm`; the `host_vmm` example does it on KVM, with
//! a paging guest under either backend):
//!
//! ```
//! # #[cfg(all(feature = "kvm", feature = "ept"))] {
//! use std::sync::Arc;
//!
//! use mmu_backends::{BackendConfig, BackendKind, BackendParts};
//! use mmu_integration::kvm::Routed;
//! use mmu_integration::{Action, BusError, MmioBus, VcpuExits};
//! use kvm_ioctls::VcpuExit;
//! use mmu_api::{Gpa, MmioClass, VcpuId, VcpuKick};
//!
//! #[derive(Debug)]
//! struct NoKick;
//! impl VcpuKick for NoKick {
//!     fn kick(&self) {}
//! }
//!
//! /// One device register at 0xd000_0000.
//! #[derive(Default)]
//! struct Bus {
//!     register: u32,
//! }
//! impl MmioBus for Bus {
//!     fn mmio_read(&mut self, gpa: Gpa, data: &mut [u8]) -> Result<(), BusError> {
//!         let bytes = self.register.to_le_bytes();
//!         data.copy_from_slice(&bytes[..data.len()]);
//!         Ok(())
//!     }
//!     fn mmio_write(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), BusError> {
//!         let mut bytes = [0; 4];
//!         bytes[..data.len()].copy_from_slice(data);
//!         self.register = u32::from_le_bytes(bytes);
//!         Ok(())
//!     }
//!     fn memory_read(&mut self, gpa: Gpa, _: &mut [u8]) -> Result<(), BusError> {
//!         Err(BusError::NoDevice(gpa))
//!     }
//! }
//!
//! let port = Arc::new(mmu_ept::testing::InProcessHypervisor::new());
//! let parts = BackendParts::new().with_hypervisor_memory(port);
//! let backend = mmu_backends::create(BackendKind::Ept, &BackendConfig::default(), &parts)?;
//! let mut exits = VcpuExits::new(backend.create_vcpu(VcpuId(0), Arc::new(NoKick))?);
//! let mut bus = Bus::default();
//!
//! // What `VcpuFd::run()` returns for `mov dword [0xd000_0000], 7`.
//! let exit = VcpuExit::MmioWrite(0xd000_0000, &[7, 0, 0, 0]);
//! match exits.handle_kvm_exit(exit, &mut bus)? {
//!     Routed::Handled(action) => assert_eq!(action, Action::Resume),
//!     Routed::Unhandled(other) => panic!("{other:?}"),
//! }
//! assert_eq!(bus.register, 7);
//! assert_eq!(exits.stats().device_writes, 1);
//! assert_eq!(exits.mmu().classify_mmio(Gpa(0xd000_0004), false), MmioClass::Mmio);
//! assert_eq!(backend.stats().get("mmio_cache_hits"), Some(1));
//! # }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]

mod apply;
#[cfg(feature = "shadow")]
pub mod arena;
mod bus;
pub mod cloud_hypervisor;
pub mod crosvm;
mod error;
mod exits;
pub mod host;
#[cfg(feature = "kvm")]
pub mod kvm;
mod memslots;
#[cfg(feature = "mshv")]
pub mod mshv;
pub mod ports;
#[cfg(all(feature = "shadow", feature = "kvm"))]
pub mod shadow_host;
#[cfg(all(test, feature = "ept"))]
mod test_support;
#[cfg(all(feature = "kvm", any(test, feature = "test-utils")))]
pub mod testing;

pub use apply::{ApplyError, apply_action};
pub use bus::{BusError, Direction, MmioBus};
pub use error::ExitError;
pub use exits::{Action, ExitStats, MmioServiceTimes, VcpuExits};
pub use memslots::{HostMirror, Memslots, SlotError, UserRegion};
pub use mmu_backends;
