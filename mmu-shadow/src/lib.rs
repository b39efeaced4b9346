//! Shadow paging backend for `mmu-api` (not implemented yet).
//!
//! This crate will hold the software MMU: a pool of shadow pages that the
//! hardware walks, built from the guest's own page tables and the memslots,
//! with the generation ("fast") zap, zapped-obsolete-first reclaim, MMIO
//! caching in reserved-bit SPTEs and parent-aware reclaim. Until its issue
//! lands it exports nothing; see `DESIGN.md` for the invariants it will keep.
#![deny(missing_docs)]
