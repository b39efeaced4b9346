//! The shadow MMU against the reference: random guest page tables in
//! no-paging, 32-bit, PAE, 4-level and 5-level modes, random accesses,
//! guest page-table edits (followed by the flush a correct guest issues),
//! CR3 switches, CR0.WP / CR4.SMEP / CR4.SMAP / EFER.NXE / EFLAGS.AC
//! changes, memslot delete / add / move / READONLY, dirty logging, zap-all,
//! tiny page limits and prefetch on or off.
//!
//! Two copies of guest memory: the soft vCPU runs on one through the shadow
//! tables (faults served by the MMU); the reference walks the guest's own
//! tables in the other with `mmu_api`'s walker. After every step the access
//! outcome, the whole guest memory (data and the A/D bits the guest sees),
//! and `audit()` must agree; a harvested dirty log must hold every page
//! written since the last harvest. The runner is `common::sequence`, which
//! the `shadow_ops` fuzz target shares; proptest draws the sequences here.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};

use common::sequence::{BASE_OPS, Case, MAXPHYADDR, run_case};
use mmu_api::PagingMode;
use mmu_shadow::{MIN_PAGE_LIMIT, ReclaimPolicy, ZapMode};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

/// Counters summed over every case, to show each mechanism was exercised.
const EXERCISED: [&str; 18] = [
    "replayed_entries",
    "fast_zaps",
    "naive_zaps",
    "obsolete_zapped",
    "mmio_fast_hits",
    "mmio_stale",
    "generation_wraps",
    "faults_fixed",
    "faults_fixed_shared",
    "faults_injected",
    "faults_mmio",
    "write_protect_hits",
    "emulated_writes",
    "flooding_zaps",
    "prefetched_sptes",
    "reclaimed_valid",
    "zap_all",
    "dirty_harvests",
];
static TOTALS: [AtomicU64; 18] = [const { AtomicU64::new(0) }; 18];
static SEQUENCES: AtomicU64 = AtomicU64::new(0);
static STEPS: AtomicU64 = AtomicU64::new(0);

fn case_strategy() -> impl Strategy<Value = Case> {
    (
        prop_oneof![
            1 => Just(PagingMode::NoPaging),
            3 => Just(PagingMode::Bits32),
            3 => Just(PagingMode::Pae),
            3 => Just(PagingMode::Level4),
            2 => Just(PagingMode::Level5),
        ],
        any::<u64>(),
        prop_oneof![Just(0usize), Just(8usize)],
        prop_oneof![3 => Just(None), 1 => (MIN_PAGE_LIMIT..MIN_PAGE_LIMIT + 8).prop_map(Some)],
        prop::collection::vec((0u8..BASE_OPS, any::<u64>(), any::<u64>()), 1..24),
        (
            prop_oneof![3 => Just(ZapMode::Fast), 1 => Just(ZapMode::Naive)],
            prop_oneof![Just(ReclaimPolicy::Fifo), Just(ReclaimPolicy::ParentAware)],
            prop_oneof![1 => Just(None), 2 => Just(Some(19u8)), 2 => Just(Some(2u8))],
            prop_oneof![2 => Just(false), 1 => Just(true)],
        ),
    )
        .prop_map(
            |(mode, seed, prefetch, limit, ops, (zap, reclaim, mmio_bits, replay))| Case {
                mode,
                seed,
                prefetch,
                limit,
                zap,
                reclaim,
                mmio_bits,
                replay,
                hostile: false,
                maxphyaddr: MAXPHYADDR,
                ops,
            },
        )
}

/// Runs one case and adds its counters to the totals.
fn run_and_count(case: &Case) -> Result<(), TestCaseError> {
    let report = run_case(case).map_err(TestCaseError::fail)?;
    STEPS.fetch_add(report.steps, Ordering::Relaxed);
    for (name, total) in EXERCISED.iter().zip(&TOTALS) {
        total.fetch_add(report.stats.get(name).unwrap_or(0), Ordering::Relaxed);
    }
    SEQUENCES.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

#[test]
fn shadow_matches_reference_on_random_sequences() {
    let cases = std::env::var("SHADOW_DIFF_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&case_strategy(), |case| run_and_count(&case));
    let sequences = SEQUENCES.load(Ordering::Relaxed);
    let steps = STEPS.load(Ordering::Relaxed);
    println!(
        "shadow differential: {sequences} random sequences checked ({steps} steps, audit after each)"
    );
    if let Err(e) = result {
        panic!("{e}");
    }
    assert!(sequences >= u64::from(cases));
    for (name, total) in EXERCISED.iter().zip(&TOTALS) {
        let total = total.load(Ordering::Relaxed);
        println!("  {name}: {total}");
        assert!(
            cases < 1000 || total > 0,
            "the random sequences never exercised {name}"
        );
    }
}
