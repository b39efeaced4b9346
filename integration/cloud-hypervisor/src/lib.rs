//! The pluggable MMU in Cloud Hypervisor, built against its own
//! `hypervisor` crate.
//!
//! Cloud Hypervisor keeps kvm-ioctls' `VmFd` and `VcpuFd` inside its
//! `hypervisor` crate and serves MMIO inside `Vcpu::run()`. This crate
//! plugs the MMU in where every memory, vCPU and dirty-log call passes:
//!
//! - [`MmuVm`] decorates an `Arc<dyn hypervisor::Vm>`: memory regions go
//!   to the MMU's memslot glue (the EPT backend then creates them in the
//!   wrapped VM through [`ChRegions`]), dirty logging is switched VM-wide
//!   over the regions created with `log_dirty` (as Cloud Hypervisor does),
//!   and every vCPU is created with an [`MmuOps`] around its
//!   `hypervisor::VmOps` and comes back as an [`MmuVcpu`].
//! - [`MmuOps`] is the `hypervisor::VmOps` newtype: MMIO is classified by
//!   the MMU (with its cache and counters) before it reaches the VMM's
//!   buses, and the emulator's guest-memory writes go through the MMU.
//! - [`MmuVcpu`] decorates a `Box<dyn hypervisor::Vcpu>`: it tells the
//!   MMU when the vCPU enters and leaves the guest, and applies the root
//!   loads the MMU asks for.
//!
//! Adopting it is one change in Cloud Hypervisor's `create_hypervisor_vm`
//! (`vmm/src/vm.rs`): wrap the VM it returns (see the README).
//!
//! Shadow paging cannot run a stock guest here (KVM never passes the
//! guest's page faults or CR3 loads to userspace): [`MmuVm::new`] refuses
//! it unless [`MmuConfig::paravirtual_mmu`] says the guest speaks the
//! paravirtual MMU ABI.
#![deny(missing_docs)]

mod ops;
mod regions;
mod vcpu;
mod vm;

pub use ops::MmuOps;
pub use regions::ChRegions;
pub use vcpu::MmuVcpu;
pub use vm::{AdapterError, KickFactory, MmuConfig, MmuVm};
