//! A fault that fails after it dropped an SPTE must still flush: another
//! vCPU may hold a translation through the dropped entry.

mod common;

use std::sync::Arc;

use common::{GuestRam, add_slot, config};
use mmu_api::{
    Gpa, Gva, MemslotFlags, MmuBackend, MmuVcpu, PagingContext, PagingMode, PfErrorCode, VcpuError,
    VcpuId,
};
use mmu_shadow::soft::NoKick;
use mmu_shadow::{Coherence, ShadowBackend};

const PWU: u64 = 7;
const ACCESSED: u64 = 1 << 5;
const LARGE: u64 = 1 << 7;
/// Page directory entries 1.. each point to their own page table.
const FIRST_PT_PAGE: u64 = 8;
const FILLERS: u64 = 120;
const DATA_PAGE: u64 = 4;

/// A 4-level guest: PML4 at page 1, PDPT at page 2, PD at page 3. PD[0] is
/// a clean 2 MiB page at 2 MiB; PD[k] (k >= 1) points to the page table at
/// page `FIRST_PT_PAGE + k - 1`, whose entry 0 maps page `DATA_PAGE`.
fn guest(ram: &mut GuestRam) {
    ram.set_word(1, 0, 0x2000 | PWU);
    ram.set_word(2, 0, 0x3000 | PWU);
    ram.set_word(3, 0, 0x20_0000 | LARGE | ACCESSED | PWU);
    for k in 1..=FILLERS {
        let pt = FIRST_PT_PAGE + k - 1;
        ram.set_word(3, k as usize, (pt << 12) | PWU);
        ram.set_word(pt, 0, (DATA_PAGE << 12) | PWU);
    }
}

fn read_fault() -> PfErrorCode {
    PfErrorCode::USER
}

#[test]
fn a_failed_fault_still_commits_the_flush_it_owes() {
    let mut ram = GuestRam::new(1100);
    guest(&mut ram);
    // A replayed pool: zapped frames stay quarantined until the host
    // confirms a replay, which this test never does, so the pool runs out
    // of frames while the page count is still under the limit.
    let b = ShadowBackend::new({
        let mut m = config(None, 0);
        m.pool_pages = 64;
        m.coherence = Coherence::Replay {
            window: Gva(0xffff_8000_0000_0000),
        };
        m
    })
    .unwrap();
    add_slot(&b, ram.slot(0, 0, 0, 1100, MemslotFlags::empty()));
    let ctx = PagingContext::for_mode(
        PagingMode::Level4,
        0x1000,
        40,
        mmu_api::paging::CpuFeatures::all(),
    )
    .unwrap();
    let mut a = b.create_shadow_vcpu(VcpuId(0), Arc::new(NoKick)).unwrap();
    let mut other = b.create_shadow_vcpu(VcpuId(1), Arc::new(NoKick)).unwrap();
    a.set_paging_context(&ctx).unwrap();
    other.set_paging_context(&ctx).unwrap();

    // Sixteen shadow page tables, zapped by a host write: their frames go
    // into quarantine.
    for k in 1..=16u64 {
        let out = a.handle_page_fault(Gva(k << 21), read_fault()).unwrap();
        assert_eq!(out, mmu_api::FaultOutcome::Retry);
    }
    b.note_host_write(Gpa(FIRST_PT_PAGE << 12), 16 << 12);
    assert_eq!(b.stats().get("frames_quarantined"), Some(16));

    // Map the clean large page: its pieces get a direct page for clean
    // large pages.
    a.handle_page_fault(Gva(0x1000), read_fault()).unwrap();

    // Use up every frame outside quarantine.
    let mut k = 17;
    loop {
        assert!(k <= FILLERS, "the pool never ran out");
        match a.handle_page_fault(Gva(k << 21), read_fault()) {
            Ok(_) => k += 1,
            Err(VcpuError::OutOfPages) => break,
            Err(e) => panic!("unexpected error {e}"),
        }
    }

    // The other vCPU has taken every request so far.
    other.prepare_entry().unwrap();
    other.exit_guest();
    assert!(!other.prepare_entry().unwrap().flush_tlb);
    other.exit_guest();

    // A write to the large page sets its D bit: the link to the clean
    // direct page no longer fits and is dropped, and the dirty page it
    // needs cannot be allocated.
    let err = a
        .handle_page_fault(Gva(0x1000), PfErrorCode::USER | PfErrorCode::WRITE)
        .unwrap_err();
    assert!(matches!(err, VcpuError::OutOfPages), "{err}");

    // The dropped link may be in the other vCPU's TLB: it must flush
    // before it enters again.
    let load = other.prepare_entry().unwrap();
    other.exit_guest();
    assert!(
        load.flush_tlb,
        "the dropped SPTE's flush was never committed"
    );
    b.audit().unwrap();
}
