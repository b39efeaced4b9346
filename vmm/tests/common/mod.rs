//! What every KVM test file of this crate shares.

pub(crate) use mmu_integration::testing::kvm_or_skip;
