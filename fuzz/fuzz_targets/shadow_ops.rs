//! Fuzzes shadow-MMU operation sequences against the reference machine.
//!
//! The runner is the differential test's (`mmu-shadow/tests/common/
//! sequence.rs`, included with `#[path]`), in its hostile form: guest
//! accesses from two soft vCPUs (which walk the shadow tables with a TLB),
//! guest page-table edits, CR3 / CR0.WP / CR4.SMEP / CR4.SMAP / EFER.NXE
//! changes, memslot delete / add / move / READONLY / LOG_DIRTY, dirty-log
//! harvests, fast and naive zap-all, obsolete-page reclaim, tiny page
//! limits with both reclaim policies, MMIO caching with 19, 2 or 1
//! generation bits, direct or replayed host coherence, guest MAXPHYADDR 40,
//! 46 or 52 (52: gfns an MMIO SPTE cannot hold); and hostile input:
//! guest entries naming the shadow pool's hardware frames, guest RAM's own
//! hardware frames, the top of the physical space and reserved address
//! bits, self-maps and loops, refused memslot changes, page limits below
//! the minimum, impossible MAXPHYADDR / CPL, host DMA writes into the
//! tables, page tables in a READONLY slot, raw linear addresses.
//!
//! After every operation the access outcome and all of guest memory (A/D
//! bits included) must match the reference walker over a mirror copy, and
//! `ShadowBackend::audit()` must pass, which checks the isolation
//! invariant: no present SPTE maps memory outside the memslots or a
//! shadow-pool frame, and none is writable in a read-only slot.
#![no_main]

// The module allows its own dead code (parts only the tests use).
#[path = "../../mmu-shadow/tests/common/mod.rs"]
mod common;

use common::sequence::{ALL_OPS, Case, run_case};
use libfuzzer_sys::fuzz_target;
use mmu_api::PagingMode;
use mmu_shadow::{MIN_PAGE_LIMIT, ReclaimPolicy, ZapMode};

/// Operations per input at most (each is 17 bytes).
const MAX_OPS: usize = 64;

/// The input: byte 0 the paging mode, byte 1 prefetch / zap / reclaim /
/// MMIO caching / replay, byte 2 the page limit (bit 7, limit in bits 2:0)
/// and MAXPHYADDR (bits 4:3), bytes 3..11 the table seed, then 17 bytes per
/// operation (code, operand, value).
fn case(data: &[u8]) -> Option<Case> {
    let (head, rest) = data.split_first_chunk::<11>()?;
    let mode = match head[0] % 12 {
        0 => PagingMode::NoPaging,
        1..=3 => PagingMode::Bits32,
        4..=6 => PagingMode::Pae,
        7..=9 => PagingMode::Level4,
        _ => PagingMode::Level5,
    };
    let flags = head[1];
    let mmio_bits = match (flags >> 4) & 7 {
        0 => None,
        1..=3 => Some(19),
        4..=6 => Some(2),
        _ => Some(1),
    };
    let limit = (head[2] >= 128).then(|| MIN_PAGE_LIMIT + u64::from(head[2] % 8));
    let maxphyaddr = [40, 52, 46, 40][usize::from((head[2] >> 3) & 3)];
    let mut seed = [0u8; 8];
    seed.copy_from_slice(&head[3..11]);
    let ops = rest
        .chunks_exact(17)
        .take(MAX_OPS)
        .map(|c| {
            let a = u64::from_le_bytes(c[1..9].try_into().expect("8 bytes"));
            let v = u64::from_le_bytes(c[9..17].try_into().expect("8 bytes"));
            (c[0] % ALL_OPS, a, v)
        })
        .collect();
    Some(Case {
        mode,
        seed: u64::from_le_bytes(seed),
        prefetch: if flags & 1 != 0 { 8 } else { 0 },
        limit,
        zap: if (flags >> 1) & 3 == 0 {
            ZapMode::Naive
        } else {
            ZapMode::Fast
        },
        reclaim: if flags & 8 != 0 {
            ReclaimPolicy::ParentAware
        } else {
            ReclaimPolicy::Fifo
        },
        mmio_bits,
        replay: flags & 0x80 != 0,
        hostile: true,
        maxphyaddr,
        ops,
    })
}

fuzz_target!(|data: &[u8]| {
    let Some(case) = case(data) else {
        return;
    };
    if let Err(e) = run_case(&case) {
        panic!("shadow MMU and reference disagree: {e}\n{case:?}");
    }
});
