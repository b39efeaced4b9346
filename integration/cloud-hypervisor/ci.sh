#!/usr/bin/env bash
# Builds, tests and lints the Cloud Hypervisor adapter against the pinned
# copy of Cloud Hypervisor's `hypervisor` crate, which lives next to the
# repository (../shared/vendor/cloud-hypervisor-hypervisor from the
# repository root). Without that copy it says so and succeeds.
#
# Run from anywhere; .ci/run calls it from the repository root.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
vendor="$root/../shared/vendor/cloud-hypervisor-hypervisor"

if [ ! -f "$vendor/Cargo.toml" ]; then
    echo "cloud-hypervisor adapter: SKIPPED (no vendored hypervisor crate at $vendor)"
    exit 0
fi

cd "$here"
echo "cloud-hypervisor adapter: kvm build, tests (KVM test skips without /dev/kvm)"
cargo test --locked -- --show-output
echo "cloud-hypervisor adapter: clippy (kvm)"
cargo clippy --locked --all-targets -- -D warnings
echo "cloud-hypervisor adapter: mshv build and unit tests"
cargo test --locked --no-default-features --features mshv --lib
cargo clippy --locked --no-default-features --features mshv --all-targets -- -D warnings
echo "cloud-hypervisor adapter: docs"
RUSTDOCFLAGS="-D warnings" cargo doc --locked --no-deps
echo "cloud-hypervisor adapter: OK"
