//! The workloads of `mmu-vmm run` and `diff` on real KVM, under the EPT
//! backend with two vCPUs, and `diff` of EPT against EPT. Each test skips
//! (and passes) where /dev/kvm cannot be opened.

mod common;
use common::kvm_or_skip;

use std::time::Duration;

use mmu_backends::BackendKind;
use mmu_vmm::diff::{DiffOptions, diff};
use mmu_vmm::kit::abi::tag;
use mmu_vmm::kit::workloads::TouchKind;
use mmu_vmm::run::{RunOptions, RunSummary, run};
use mmu_vmm::workload::{Params, Workload};

/// Small sizes: the tests check behaviour, not throughput.
fn options(workload: Workload) -> RunOptions {
    let (passes, ops) = match workload {
        Workload::Touch => (Some(2), None),
        Workload::PtEdit => (None, Some(200)),
        Workload::MultiAs => (Some(2), Some(8)),
        Workload::Access => (None, None),
        Workload::MmioRr => (None, Some(200)),
        Workload::Dirty => (None, Some(20_000)),
        Workload::Churn => (Some(3), None),
        Workload::Stress => (Some(2), None),
    };
    RunOptions {
        mmu: BackendKind::Ept,
        workload,
        vcpus: 2,
        mem_size: 16 << 20,
        params: Params {
            passes,
            ops,
            ..Params::default()
        },
        // Hang protection only. Churn under shadow in a debug build takes 5
        // to 18 s here: every memslot update (one a millisecond) sends each
        // vCPU back through its root reload, replay and faults.
        time_limit: Duration::from_secs(120),
        ..RunOptions::default()
    }
}

fn run_ok(options: RunOptions) -> RunSummary {
    let summary = run(options).expect("run");
    assert!(summary.ok(), "{}", summary.text());
    assert_eq!(summary.vcpus.len(), 2);
    assert_eq!(summary.backend.backend, "ept");
    summary
}

#[test]
fn touch_reads_and_writes_check_out() {
    if !kvm_or_skip("touch_reads_and_writes_check_out") {
        return;
    }
    for touch in [TouchKind::Write, TouchKind::Read] {
        let mut o = options(Workload::Touch);
        o.params.touch = touch;
        let s = run_ok(o);
        let pages = s.parameters.iter().find(|p| p.0 == "pages").unwrap().1;
        assert!(pages > 1000, "{pages}");
        // Both windows translated through the backend.
        assert_eq!(s.backend.get("translations"), Some(2 * pages));
        match touch {
            TouchKind::Write => {
                assert_eq!(s.dirty.written_pages, 2 * pages);
                assert!(s.dirty.dirty_pages >= 2 * pages);
            }
            TouchKind::Read => assert_eq!(s.dirty.written_pages, 0),
        }
        assert_eq!(s.dirty.missing, 0);
        // Every leaf of both windows was accessed, and dirtied by writes.
        let leaves = s.observation.ad.iter().filter(|e| e.level == 1);
        let dirty = leaves.filter(|e| e.bits & 2 != 0).count() as u64;
        match touch {
            TouchKind::Write => assert!(dirty >= 2 * pages),
            // Only the identity tables' preset D bits.
            TouchKind::Read => assert!(dirty < s.observation.ad.len() as u64 - 2 * pages),
        }
    }
}

#[test]
fn pt_edit_faults_where_the_model_says() {
    if !kvm_or_skip("pt_edit_faults_where_the_model_says") {
        return;
    }
    let s = run_ok(options(Workload::PtEdit));
    assert_eq!(s.rounds, 2);
    for v in &s.vcpus {
        // Unmapped, read-only and supervisor-only pages fault; the checks
        // compared every error code and address with the walker's.
        assert!(v.faults.count > 20, "{}", v.faults.count);
        assert_eq!(v.total(tag::FAULTS), Some(v.faults.count));
        let codes: std::collections::BTreeSet<u64> =
            v.faults.entries.iter().map(|f| f.error_code).collect();
        assert!(
            codes.contains(&0b100) && codes.contains(&0b111),
            "{codes:?}"
        );
        // 200 edits: STORE, INVLPG (a paging hypercall) and EXIT per round.
        assert!(v.stats.paging_ops >= 200);
    }
}

#[test]
fn multi_as_switches_address_spaces() {
    if !kvm_or_skip("multi_as_switches_address_spaces") {
        return;
    }
    let s = run_ok(options(Workload::MultiAs));
    // The identity root and 8 spaces per vCPU.
    assert_eq!(s.observation.roots.len(), 1 + 2 * 8);
    for v in &s.vcpus {
        // 2 passes over 8 spaces, each a LOAD_CR3 hypercall.
        assert_eq!(v.stats.paging_ops, 16);
    }
}

#[test]
fn the_access_matrix_matches_the_walker() {
    if !kvm_or_skip("the_access_matrix_matches_the_walker") {
        return;
    }
    let s = run_ok(options(Workload::Access));
    assert_eq!(s.rounds, 3);
    for v in &s.vcpus {
        // CPL3 and CPL0 faults, with and without U, W, NX at either level.
        let user = v.faults.entries.iter().filter(|f| f.error_code & 4 != 0);
        let kernel = v.faults.entries.iter().filter(|f| f.error_code & 4 == 0);
        assert!(user.count() > 50);
        assert!(kernel.count() > 50);
        assert!(v.faults.entries.iter().any(|f| f.error_code & 0x10 != 0));
        assert_eq!(v.faults.lost(), 0);
    }
}

#[test]
fn mmio_request_response_reaches_the_device() {
    if !kvm_or_skip("mmio_request_response_reaches_the_device") {
        return;
    }
    let s = run_ok(options(Workload::MmioRr));
    let host = |name: &str| s.host.iter().find(|h| h.0 == name).unwrap().1;
    assert_eq!(host("doorbells"), 400);
    assert_eq!(host("idle_reads"), 0);
    assert_eq!(s.exits.device_writes, 400);
    assert_eq!(s.exits.device_reads, host("status_reads"));
    for v in &s.vcpus {
        assert_eq!(v.total(tag::TRANSACTIONS), Some(200));
    }
    // The EPT backend's MMIO classification cache served the repeats.
    assert!(s.backend.get("mmio_cache_hits").unwrap() > 0);
}

#[test]
fn dirty_writes_are_all_logged() {
    if !kvm_or_skip("dirty_writes_are_all_logged") {
        return;
    }
    let s = run_ok(options(Workload::Dirty));
    assert!(s.dirty.written_pages > 1000);
    assert_eq!(s.dirty.missing, 0);
    assert_ne!(s.vcpus[0].checksum(), s.vcpus[1].checksum());
}

#[test]
fn churn_deletes_and_adds_a_memslot_while_vcpus_touch() {
    if !kvm_or_skip("churn_deletes_and_adds_a_memslot_while_vcpus_touch") {
        return;
    }
    let s = run_ok(options(Workload::Churn));
    let host = |name: &str| s.host.iter().find(|h| h.0 == name).unwrap().1;
    assert!(host("churn_cycles_during_run") >= 1);
    // Two memslots at creation, then a delete and an add per cycle.
    assert_eq!(
        s.backend.get("memslot_updates"),
        Some(3 + 2 * host("churn_cycles"))
    );
}

#[test]
fn diff_of_ept_against_ept_is_identical_for_every_workload() {
    if !kvm_or_skip("diff_of_ept_against_ept_is_identical_for_every_workload") {
        return;
    }
    for workload in Workload::ALL.into_iter().filter(|w| w.deterministic()) {
        let summary = diff(DiffOptions {
            a: BackendKind::Ept,
            b: BackendKind::Ept,
            run: options(workload),
        })
        .expect("diff");
        assert!(summary.identical(), "{}", summary.text());
        assert!(summary.ok(), "{}", summary.text());
        let json = summary.json();
        assert!(
            json.starts_with(&format!("{{\"workload\": \"{workload}\"")),
            "{json}"
        );
        assert!(json.contains("\"identical\": true"), "{json}");
    }
}

#[test]
fn other_inputs_are_seen_as_differences() {
    if !kvm_or_skip("other_inputs_are_seen_as_differences") {
        return;
    }
    // The same workload with another seed: other edits, faults, data.
    let a = run_ok(options(Workload::PtEdit));
    let mut o = options(Workload::PtEdit);
    o.params.seed += 1;
    let b = run_ok(o);
    let (list, unlisted) = mmu_vmm::diff::differences(&a.observation, &b.observation);
    let seen = |what: &str| list.iter().any(|d| d.what.contains(what));
    assert!(seen("data page"), "{list:?}");
    assert!(seen("vCPU 0 reports") && seen("vCPU 1 reports"), "{list:?}");
    assert!(seen("fault"), "{list:?}");
    assert!(seen("A/D of the level-1 entry"), "{list:?}");
    assert!(unlisted > 0);
    // And a run compared with itself has none.
    let (none, more) = mmu_vmm::diff::differences(&a.observation, &a.observation);
    assert!(none.is_empty() && more == 0);
}

/// The shadow backend end to end: every workload under the shadow backend (hosted on
/// KVM, 2 vCPUs) shows the guest exactly what ept shows it, and each
/// shadow run passes its checks, among them `audit()` after the run.
#[test]
fn every_workload_under_shadow_matches_ept_and_passes_audit() {
    if !kvm_or_skip("every_workload_under_shadow_matches_ept_and_passes_audit") {
        return;
    }
    // `stress` depends on thread timing; `diff` refuses it (its own test
    // runs it under both backends).
    for workload in Workload::ALL.into_iter().filter(|&w| w != Workload::Stress) {
        let summary = diff(DiffOptions {
            a: BackendKind::Shadow,
            b: BackendKind::Ept,
            run: options(workload),
        })
        .expect("diff");
        assert!(summary.identical(), "{}", summary.text());
        assert!(summary.ok(), "{}", summary.text());
        let shadow = summary.a.result.as_ref().expect("the shadow run");
        assert_eq!(shadow.backend.backend, "shadow");
        let audit = shadow
            .checks
            .iter()
            .find(|c| c.what == "shadow MMU audit")
            .expect("the shadow run audits the MMU");
        assert!(audit.ok, "{workload}: {}", audit.detail);
        if workload == Workload::Churn {
            // The churn thread reclaims obsolete pages after each update:
            // fast zaps happened, obsolete pages were freed,
            // and no valid page went while obsolete ones waited.
            let stat = |n: &str| shadow.backend.get(n).unwrap_or(0);
            println!(
                "churn under shadow: fast_zaps={} obsolete_freed={} \
                 valid_reclaimed_with_obsolete_pending={}",
                stat("fast_zaps"),
                stat("obsolete_freed"),
                stat("valid_reclaimed_with_obsolete_pending")
            );
            assert!(stat("fast_zaps") > 0);
            assert!(stat("obsolete_freed") > 0);
            assert_eq!(stat("valid_reclaimed_with_obsolete_pending"), 0);
        }
    }
}
