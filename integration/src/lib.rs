//! Glue between a host VMM's vCPU exit loop and an MMU backend (not
//! implemented yet).
//!
//! This crate will turn KVM exits (and MSHV messages behind feature `mshv`)
//! into `mmu_api::MmuVcpu` calls and their answers into actions, and provide
//! adapters shaped like Cloud Hypervisor's `VmOps` and crosvm's `handle_mmio`.
//! Until its issue lands it exports nothing.
#![deny(missing_docs)]
