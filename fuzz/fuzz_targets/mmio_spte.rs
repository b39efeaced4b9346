//! Fuzzes the MMIO SPTE encoding of the shadow backend (through
//! `mmu_shadow::fuzzing`, a hidden module that re-exports the crate-private
//! encoder for this target).
//!
//! `mmio_fits` (the fault path caches MMIO answers only for gfns it
//! accepts) is exactly the set of gfns a 52-bit guest can name that the
//! encoding gives back. For any gfn the encoding holds (bits 50:12 of the
//! SPTE: gfns below 2^39), any generation, 1 to 19 generation bits and any
//! rights:
//!
//! - decode(encode(..)) gives back the gfn, the generation's tag and the
//!   rights; the memslot generation's update-in-progress bit never reaches
//!   the SPTE; decode is the exact inverse of encode on every value the
//!   MMU takes for an MMIO SPTE (all bits but the unused bit 11);
//! - the hardware never translates through an MMIO SPTE: a walk of shadow
//!   tables (links built as the MMU builds them) ending in one faults with
//!   P and RSVD for every access, for every host MAXPHYADDR that allows
//!   MMIO caching (32..=51);
//! - no memory SPTE is ever taken for an MMIO SPTE: leaves for any frame
//!   the host can address, with any rights and protection key, their
//!   write-protected form, links, and the empty entry; and a walk through a
//!   memory leaf never faults with RSVD and lands on the leaf's frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mmu_api::paging::{
    Access, AccessKind, AccessMode, PagingContext, PagingMode, PfErrorCode, SparseMemory,
    WalkError, WalkOptions, walk_with,
};
use mmu_api::{Gfn, Gpa, Gva, Hpa, MemslotGeneration, Rights};
use mmu_shadow::fuzzing::{
    MMIO_MARKER, MMIO_MAX_GEN_BITS, is_mmio, link, memory_leaf, mmio_decode, mmio_encode,
    mmio_fits, mmio_tag, write_protected,
};
use mmu_shadow::hardware_context;

/// Gfns an MMIO SPTE holds: bits 50:12 of the entry.
const GFN_LIMIT: u64 = 1 << 39;
/// Bit 11 is the one bit an MMIO SPTE never uses.
const UNUSED: u64 = 1 << 11;

fn u64_at(data: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    for (i, byte) in b.iter_mut().enumerate() {
        *byte = data.get(at + i).copied().unwrap_or(0);
    }
    u64::from_le_bytes(b)
}

fn rights(bits: u64) -> Rights {
    Rights {
        write: bits & 1 != 0,
        user: bits & 2 != 0,
        exec: bits & 4 != 0,
    }
}

/// Walks 4-level shadow tables at host-physical 0x1000..0x5000 (links as
/// the MMU makes them) whose PTE at `index` is `leaf`, as the hardware
/// running a guest in `guest` would.
fn hardware_walk(
    guest: &PagingContext,
    host_maxphyaddr: u8,
    index: u64,
    leaf: u64,
    gva_offset: u64,
    access: Access,
) -> Result<mmu_api::paging::Translation, WalkError> {
    let mem = SparseMemory::new();
    for f in 1..=4 {
        mem.add_frame(Gfn(f));
    }
    // PML4 (0x1000) -> PDPT (0x2000) -> PD (0x3000) -> PT (0x4000), each
    // through entry 0.
    for table in [0x1000u64, 0x2000, 0x3000] {
        mem.write_u64(Gpa(table), link(Hpa(table + 0x1000)))
            .expect("backed");
    }
    mem.write_u64(Gpa(0x4000 + 8 * index), leaf)
        .expect("backed");
    let hw = hardware_context(guest, Hpa(0x1000), host_maxphyaddr);
    walk_with(
        &hw,
        &mem,
        Gva((index << 12) | gva_offset),
        access,
        WalkOptions::without_accessed_dirty(),
    )
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 40 {
        return;
    }
    // Any gfn of a 52-bit guest-physical space: the encoding holds it
    // exactly when `mmio_fits` says so.
    let any_gfn = Gfn(u64_at(data, 0) % (1 << 40));
    let held = mmio_decode(mmio_encode(any_gfn, 0, 1, Rights::ALL)).0 == any_gfn;
    assert_eq!(mmio_fits(any_gfn), held, "mmio_fits({any_gfn}) is wrong");
    let gfn = Gfn(any_gfn.raw() % GFN_LIMIT);
    let generation = u64_at(data, 8);
    let ctl = u64_at(data, 16);
    let frame_raw = u64_at(data, 24);
    let raw = u64_at(data, 32);
    let bits = 1 + (ctl % u64::from(MMIO_MAX_GEN_BITS)) as u8;
    let r = rights(ctl >> 8);
    let host_maxphyaddr = 32 + ((ctl >> 11) % 20) as u8; // 32..=51
    let index = (ctl >> 16) & 0x1ff;
    let offset = (ctl >> 25) & 0xff8;
    let kind = [AccessKind::Read, AccessKind::Write, AccessKind::Fetch][((ctl >> 37) % 3) as usize];
    let mode = [
        AccessMode::User,
        AccessMode::Supervisor,
        AccessMode::ImplicitSupervisor,
    ][((ctl >> 39) % 3) as usize];
    let mut guest = PagingContext::for_mode(
        PagingMode::Level4,
        0,
        46,
        mmu_api::paging::CpuFeatures::all(),
    )
    .expect("context");
    guest.cpl = if mode == AccessMode::User { 3 } else { 0 };
    let access = Access { kind, mode };

    // Round trip.
    let spte = mmio_encode(gfn, generation, bits, r);
    assert!(is_mmio(spte), "{spte:#x} is not taken for MMIO");
    assert_eq!(spte & 1, 1, "an MMIO SPTE is present");
    assert_eq!(spte & MMIO_MARKER, MMIO_MARKER);
    assert_eq!(
        mmio_decode(spte),
        (gfn, mmio_tag(generation, bits), r),
        "round trip of {spte:#x}"
    );
    assert_eq!(mmio_tag(generation, bits), generation & ((1 << bits) - 1));
    let busy = MemslotGeneration(generation).begin_update();
    assert_eq!(
        mmio_decode(mmio_encode(gfn, busy.0, MMIO_MAX_GEN_BITS, r)).1,
        mmio_tag(busy.count(), MMIO_MAX_GEN_BITS),
        "the update-in-progress bit reached the SPTE"
    );

    // Decode inverts encode on everything taken for MMIO.
    if is_mmio(raw) {
        let (g, tag, rr) = mmio_decode(raw);
        assert_eq!(
            mmio_encode(g, tag, MMIO_MAX_GEN_BITS, rr),
            raw & !UNUSED,
            "decode of {raw:#x} is not encode's inverse"
        );
    }

    // The hardware never translates through an MMIO SPTE.
    match hardware_walk(&guest, host_maxphyaddr, index, spte, offset, access) {
        Err(WalkError::PageFault(pf)) => assert!(
            pf.error_code
                .contains(PfErrorCode::PRESENT | PfErrorCode::RSVD),
            "MMIO SPTE {spte:#x} faulted without RSVD: {pf:?}"
        ),
        other => panic!("MMIO SPTE {spte:#x} was walked: {other:?}"),
    }

    // No memory SPTE is taken for MMIO, and the hardware walks it.
    let frame = Hpa(frame_raw & ((1u64 << host_maxphyaddr) - 1) & !0xfff);
    let (w, u, x) = (
        ctl & (1 << 41) != 0,
        ctl & (1 << 42) != 0,
        ctl & (1 << 43) != 0,
    );
    let pkey = (ctl & (1 << 44) != 0).then_some(((ctl >> 45) & 0xf) as u8);
    let leaf = memory_leaf(frame, w, u, x, pkey);
    for s in [leaf, write_protected(leaf), link(frame), 0] {
        assert!(!is_mmio(s), "memory SPTE {s:#x} taken for MMIO");
    }
    match hardware_walk(&guest, host_maxphyaddr, index, leaf, offset, access) {
        Ok(t) => assert_eq!(t.gpa.raw(), frame.raw() | offset, "leaf {leaf:#x}"),
        Err(WalkError::PageFault(pf)) => {
            assert!(
                !pf.error_code.contains(PfErrorCode::RSVD),
                "memory SPTE {leaf:#x} faulted with RSVD: {pf:?}"
            );
            assert!(
                !(w && u && x),
                "a leaf granting everything faulted: {leaf:#x} {pf:?}"
            );
        }
        Err(e) => panic!("memory SPTE {leaf:#x}: {e:?}"),
    }
});
