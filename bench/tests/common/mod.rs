//! What every KVM test file of this crate shares.

/// True if /dev/kvm can be used; prints the line CI counts either way
/// (`KVM test ran: <name>` or `SKIPPED (no /dev/kvm): <name>`).
pub(crate) fn kvm_or_skip(name: &str) -> bool {
    if std::fs::File::open("/dev/kvm").is_err() || !mmu_vmm::kvm_available() {
        println!("SKIPPED (no /dev/kvm): {name}");
        return false;
    }
    println!("KVM test ran: {name}");
    true
}
