//! The backend registry (not implemented yet).
//!
//! This crate will be the only place a host VMM names a backend: cargo
//! features `shadow` and `ept`, a `BackendKind` that parses "shadow" / "ept",
//! and one constructor returning `Arc<dyn mmu_api::MmuBackend>`. Until its
//! issue lands it exports nothing.
#![deny(missing_docs)]
