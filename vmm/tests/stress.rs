//! Stress on KVM under both backends: two vCPU threads write to a memslot
//! and read it from CPL3 in a hot loop while a host thread harvests its
//! dirty log and deletes, re-adds and moves it (the `stress` workload;
//! what is checked, exactly, is in `mmu_vmm::stress`). Every write the memory
//! shows must be in the harvest of its interval (no lost dirty page), no
//! read may see memory that is no longer there (no stale read), each
//! deleted backing is unmapped as soon as the delete returns, the shadow
//! backend passes its audit right after harvests and memslot changes of
//! the first cycles, and a watchdog bounds the whole test. Skips (and passes) where /dev/kvm
//! cannot be opened, and fails there instead when `MMU_REQUIRE_KVM=1`.

mod common;
use common::kvm_or_skip;

use std::sync::mpsc;
use std::time::Duration;

use mmu_backends::BackendKind;
use mmu_vmm::run::{RunOptions, RunSummary, run};
use mmu_vmm::workload::{Params, Workload};

/// Host cycles per backend (each: four harvests, two moves, a delete and
/// a re-add), a few seconds on the 2-core development machine.
const CYCLES: u64 = 150;

/// Pages each vCPU writes in the stress memslot. Few enough that under
/// the shadow backend a vCPU gets round all of them between two host
/// steps (each first write after a harvest is a fault through the guest
/// kit), so stale translations of every page exist when the host moves
/// or deletes the slot; with 32 pages, a move that did not zap left 10
/// stale reads in 100 cycles, with 16 pages 384,626.
const PAGES_PER_VCPU: u64 = 16;

/// Hang protection of each run (the VMM stops the vCPUs after it).
const RUN_LIMIT: Duration = Duration::from_secs(60);

/// The whole test, both backends: past it the watchdog ends the process.
const DEADLINE: Duration = Duration::from_secs(150);

fn stress(mmu: BackendKind) -> RunSummary {
    run(RunOptions {
        mmu,
        workload: Workload::Stress,
        vcpus: 2,
        mem_size: 16 << 20,
        params: Params {
            passes: Some(CYCLES),
            ops: Some(PAGES_PER_VCPU),
            ..Params::default()
        },
        time_limit: RUN_LIMIT,
        ..RunOptions::default()
    })
    .unwrap_or_else(|e| panic!("stress run under {mmu}: {e:?}"))
}

fn host(s: &RunSummary, name: &str) -> u64 {
    s.host
        .iter()
        .find(|h| h.0 == name)
        .unwrap_or_else(|| panic!("no host figure {name}: {:?}", s.host))
        .1
}

#[test]
fn stress_on_kvm_loses_no_dirty_page_and_reads_nothing_stale() {
    if !kvm_or_skip("stress_on_kvm_loses_no_dirty_page_and_reads_nothing_stale") {
        return;
    }
    // Watchdog: a deadlock anywhere (a vCPU, the host loop, a memslot
    // change) ends the test instead of hanging CI.
    let (finished, watchdog) = mpsc::channel::<()>();
    let dog = std::thread::spawn(move || {
        // Disconnected: the test ended (a panic drops the sender).
        if let Err(mpsc::RecvTimeoutError::Timeout) = watchdog.recv_timeout(DEADLINE) {
            eprintln!("stress: watchdog: not finished after {DEADLINE:?}");
            std::process::exit(101);
        }
    });
    for mmu in [BackendKind::Ept, BackendKind::Shadow] {
        let s = stress(mmu);
        let (lost, stale) = (host(&s, "lost"), host(&s, "stale"));
        println!(
            "stress {mmu}: {} vCPUs, {} cycles in {:.2?}: writes {}, writes checked (dirty pages verified) {} ({} in their own interval, {} late), lost {lost}; reads checked {} ({} absent, {} not judged), stale reads {stale}; {} harvests, {} moves, {} deletes ({} backings unmapped, {} seen absent by every vCPU); {} backend audits; slowest memslot change {} us",
            s.vcpus.len(),
            host(&s, "stress_cycles"),
            s.elapsed,
            host(&s, "writes"),
            host(&s, "dirty_pages_verified"),
            host(&s, "verified_in_own_interval"),
            host(&s, "verified_late"),
            host(&s, "reads_checked"),
            host(&s, "absent_reads_checked"),
            host(&s, "reads_unchecked"),
            host(&s, "harvests"),
            host(&s, "moves"),
            host(&s, "deletes"),
            host(&s, "backings_unmapped"),
            host(&s, "deletes_seen_by_every_vcpu"),
            host(&s, "backend_audits"),
            host(&s, "max_memslot_change_us"),
        );
        assert_eq!(lost, 0, "{}", s.text());
        assert_eq!(stale, 0, "{}", s.text());
        assert!(s.ok(), "{}", s.text());
        // The run did what it claims: every cycle ran, and checked
        // something.
        assert_eq!(host(&s, "stress_cycles"), CYCLES, "{}", s.text());
        assert_eq!(host(&s, "backings_unmapped"), CYCLES, "{}", s.text());
        assert!(host(&s, "dirty_pages_verified") > 0, "{}", s.text());
        assert!(host(&s, "reads_checked") > 0, "{}", s.text());
        // The shadow backend's audit ran while the vCPUs did (the EPT
        // backend has none).
        if mmu == BackendKind::Shadow {
            assert!(host(&s, "backend_audits") > 0, "{}", s.text());
        }
    }
    finished.send(()).expect("the watchdog waits");
    dog.join().expect("watchdog");
}
