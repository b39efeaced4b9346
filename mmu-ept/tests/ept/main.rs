//! Cross-crate tests of the EPT backend through the `mmu-api` traits, with
//! guest memory in real host RAM and an in-process hypervisor double.
//! One test binary (one link) with a module per concern.

mod bad_input;
mod common;
mod dirty;
mod memslots;
mod mmio;
mod tlb_prop;
mod translate;
