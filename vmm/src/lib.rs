//! The reference VMM on KVM (not implemented yet).
//!
//! This crate will create KVM VMs with guest memory registered as memslots,
//! run vCPU threads with a kick any thread can send, provide the guest kit
//! (a small CPL0 kernel and CPL3 workloads) and the `mmu-vmm` command. Until
//! its issue lands it exports nothing.
#![deny(missing_docs)]
