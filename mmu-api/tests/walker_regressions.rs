//! Deterministic reproductions of walker bugs the `walker` fuzz target
//! found, each checked against exact values and against the independent
//! SDM model (`tests/model/mod.rs`), so they stay fixed whatever the
//! fuzzer draws.

#[allow(dead_code)]
mod model;

use mmu_api::paging::{
    Access, AccessKind, CpuFeatures, Cr0, Cr4, Efer, GuestPhysMemory, PageSize, PagingContext,
    SparseMemory, WalkOptions, walk_with,
};
use mmu_api::{Gfn, Gpa, Gva};

/// PAE: the PDPT is also the page directory and the page table (its entry
/// 0 names its own frame, P only). A supervisor write with CR0.WP = 0 uses
/// that one word at three levels: the PDPTE (held in a register since the
/// CR3 load), then the PDE and the PTE, whose A and D bits the CPU sets.
/// Setting A in the PDE puts a reserved bit into the word that is also the
/// PDPTE, but the CPU's PDPTE register is unchanged: the access completes,
/// and only a later CR3 load would raise #GP.
///
/// The walker set A for the PDE, then failed its compare-and-exchange for
/// the PTE (its own update had changed the word), restarted the walk, read
/// the PDPTEs from memory again and answered `InvalidPdpte` (#GP).
/// Ignored until `mmu-api/src/paging/walker.rs` stops tripping over its own
/// A/D updates.
#[test]
fn pae_pdpt_used_as_directory_and_table() {
    let mem = SparseMemory::new();
    mem.add_frame(Gfn(1));
    mem.write_u64(Gpa(0x1000), 0x1001).expect("backed");
    let mut ctx = PagingContext::new(CpuFeatures::all(), 44);
    ctx.cr0 = Cr0::PE | Cr0::PG;
    ctx.cr3 = 0x1000;
    ctx.cr4 = Cr4::PAE;
    ctx.efer = Efer::NXE;
    let access = Access::supervisor(AccessKind::Write);
    let read = |gpa: u64| mem.read_u64(Gpa(gpa)).ok();
    let expected = model::model_walk(&ctx, &read, 0x10, access, true);

    let t = walk_with(&ctx, &mem, Gva(0x10), access, WalkOptions::default())
        .expect("the write completes");
    assert_eq!((t.gpa, t.page_size), (Gpa(0x1010), PageSize::Size4K));
    assert!(
        !t.rights.write,
        "a read-only walk: CR0.WP = 0 lets it write"
    );
    // A from the PDE, A and D from the PTE, all in the one word.
    assert_eq!(mem.read_u64(Gpa(0x1000)), Ok(0x1061));
    assert_eq!(model::outcome_of(Ok(t)), expected.outcome);
    assert_eq!(expected.words.get(&0x1000), Some(&0x1061));
}
