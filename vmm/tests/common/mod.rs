//! What every KVM test file of this crate shares.

/// The environment variable that makes a KVM test fail, instead of skip,
/// where `/dev/kvm` cannot be used (`.ci/run` sets it where `/dev/kvm`
/// exists).
pub(crate) const REQUIRE_KVM: &str = "MMU_REQUIRE_KVM";

/// What a KVM test does, given whether KVM can be used and the value of
/// [`REQUIRE_KVM`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum KvmGate {
    /// Run the test.
    Run,
    /// Skip it (pass without running).
    Skip,
    /// Fail it, for this reason.
    Fail(String),
}

/// The decision: `MMU_REQUIRE_KVM=1` turns a skip into a failure; unset,
/// empty or `0` allow the skip; any other value is a mistake and fails,
/// so a misspelt setting cannot let a CI run pass without KVM.
pub(crate) fn kvm_gate(kvm_usable: bool, require: Option<&str>) -> KvmGate {
    let required = match require {
        None | Some("") | Some("0") => false,
        Some("1") => true,
        Some(other) => {
            return KvmGate::Fail(format!(
                "{REQUIRE_KVM}={other:?} is neither 1 nor 0 (nor empty)"
            ));
        }
    };
    match (kvm_usable, required) {
        (true, _) => KvmGate::Run,
        (false, false) => KvmGate::Skip,
        (false, true) => KvmGate::Fail(format!(
            "/dev/kvm cannot be opened as KVM, and {REQUIRE_KVM}=1 requires it"
        )),
    }
}

/// True if /dev/kvm can be used; prints the line CI counts either way
/// (`KVM test ran: <name>` or `SKIPPED (no /dev/kvm): <name>`). Panics
/// instead of skipping when `MMU_REQUIRE_KVM=1` (see [`kvm_gate`]).
pub(crate) fn kvm_or_skip(name: &str) -> bool {
    let usable = std::fs::File::open("/dev/kvm").is_ok() && mmu_vmm::kvm_available();
    let require = std::env::var_os(REQUIRE_KVM);
    let require = require
        .as_ref()
        .map(|v| v.to_str().unwrap_or("(not UTF-8)"));
    match kvm_gate(usable, require) {
        KvmGate::Run => {
            println!("KVM test ran: {name}");
            true
        }
        KvmGate::Skip => {
            println!("SKIPPED (no /dev/kvm): {name}");
            false
        }
        KvmGate::Fail(why) => panic!("KVM test {name} cannot run: {why}"),
    }
}
