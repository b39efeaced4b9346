//! EPT-passthrough backend for `mmu-api` (not implemented yet).
//!
//! This crate will hold the backend for hardware two-dimensional paging: the
//! hypervisor owns the second stage, and the backend owns memslots, a
//! generation-tagged MMIO classification cache, dirty logging and guest-virtual
//! translation for emulation. Until its issue lands it exports nothing.
#![deny(missing_docs)]
