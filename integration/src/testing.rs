//! What every KVM test and bench of the workspace shares (feature
//! `test-utils`): whether KVM can be used, and the rule that turns a skip
//! into a failure where KVM is required.
//!
//! A KVM test calls [`kvm_or_skip`] first. It prints the line CI counts,
//! `KVM test ran: <name>` or `SKIPPED (no /dev/kvm): <name>`, and panics
//! instead of skipping when `MMU_REQUIRE_KVM=1` (which `.ci/run` sets
//! where `/dev/kvm` exists), so a CI run on a host with KVM cannot pass by
//! skipping.

/// The environment variable that makes a KVM test fail, instead of skip,
/// where `/dev/kvm` cannot be used.
pub const REQUIRE_KVM: &str = "MMU_REQUIRE_KVM";

/// What a KVM test does, given whether KVM can be used and the value of
/// [`REQUIRE_KVM`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvmGate {
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
pub fn kvm_gate(kvm_usable: bool, require: Option<&str>) -> KvmGate {
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

/// True if `/dev/kvm` opens and answers with the KVM API version this
/// crate is built for.
pub fn kvm_usable() -> bool {
    kvm_ioctls::Kvm::new()
        .is_ok_and(|kvm| kvm.get_api_version() == kvm_bindings::KVM_API_VERSION as i32)
}

/// The gate for this process: [`kvm_usable`] and the environment.
pub fn gate() -> KvmGate {
    let require = std::env::var_os(REQUIRE_KVM);
    let require = require
        .as_ref()
        .map(|v| v.to_str().unwrap_or("(not UTF-8)"));
    kvm_gate(kvm_usable(), require)
}

/// True if the KVM test `name` can run; prints the line CI counts either
/// way. Panics instead of skipping when KVM is required (see
/// [`kvm_gate`]).
pub fn kvm_or_skip(name: &str) -> bool {
    match gate() {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_tests_fail_instead_of_skipping_when_kvm_is_required() {
        for require in [None, Some(""), Some("0"), Some("1")] {
            assert_eq!(kvm_gate(true, require), KvmGate::Run, "{require:?}");
        }
        for require in [None, Some(""), Some("0")] {
            assert_eq!(kvm_gate(false, require), KvmGate::Skip, "{require:?}");
        }
        let KvmGate::Fail(why) = kvm_gate(false, Some("1")) else {
            panic!("a required KVM that is missing must fail");
        };
        assert_eq!(
            why,
            "/dev/kvm cannot be opened as KVM, and MMU_REQUIRE_KVM=1 requires it"
        );
        for usable in [true, false] {
            assert!(
                matches!(kvm_gate(usable, Some("yes")), KvmGate::Fail(ref m) if m.contains("\"yes\"")),
                "{usable}"
            );
        }
    }
}
