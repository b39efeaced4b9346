//! Criterion benches comparing the backends (not implemented yet).
//!
//! This crate will hold `memslot_churn`, `mmio_rr`, `faults` and pure-MMU
//! microbenches, run with `cargo bench -p benches`. Until its issue lands it
//! holds no bench.
#![deny(missing_docs)]
