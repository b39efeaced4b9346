//! Targeted tests of the shadow MMU through the soft vCPU.

mod common;

use common::{GuestRam, add_slot, backend};
use mmu_api::{
    AccessMode, Gpa, Gva, MemslotFlags, MmuBackend, PagingContext, PagingMode, PfErrorCode, SlotId,
    VcpuId,
};
use mmu_shadow::soft::{SoftOutcome, SoftVcpu};

const P: u64 = 1;
const W: u64 = 2;
const U: u64 = 4;
const A: u64 = 0x20;
const D: u64 = 0x40;
const PS: u64 = 0x80;
const PWU: u64 = P | W | U;

/// 4-level tables in RAM pages 1..=4 (gpa = page * 4K, slot 0 maps RAM 1:1)
/// mapping gva 0x1000 * i to RAM page 16 + i for i in 0..8.
fn four_level(ram: &mut GuestRam) {
    ram.set_word(1, 0, 0x2000 | PWU);
    ram.set_word(2, 0, 0x3000 | PWU);
    ram.set_word(3, 0, 0x4000 | PWU);
    for i in 0..8 {
        ram.set_word(4, i, (0x10_000 + 0x1000 * i as u64) | PWU);
    }
}

fn ctx4() -> PagingContext {
    PagingContext::for_mode(
        PagingMode::Level4,
        0x1000,
        40,
        mmu_api::paging::CpuFeatures::all(),
    )
    .unwrap()
}

fn setup(limit: Option<u64>) -> (GuestRam, mmu_shadow::ShadowBackend, SoftVcpu) {
    let mut ram = GuestRam::new(64);
    four_level(&mut ram);
    let b = backend(limit, 8);
    add_slot(&b, ram.slot(0, 0, 0, 48, MemslotFlags::empty()));
    let mut cpu = SoftVcpu::new(&b, VcpuId(0)).unwrap();
    cpu.load_context(&ctx4()).unwrap();
    (ram, b, cpu)
}

#[test]
fn read_write_and_guest_ad_bits() {
    let (ram, b, mut cpu) = setup(None);
    assert_eq!(
        cpu.write(Gva(0x1008), 8, 0xfeed, AccessMode::User).unwrap(),
        SoftOutcome::Done(0xfeed)
    );
    assert_eq!(ram.word(17, 1), 0xfeed);
    assert_eq!(
        cpu.read(Gva(0x1008), 8, AccessMode::User).unwrap(),
        SoftOutcome::Done(0xfeed)
    );
    // A on every level, D on the written leaf only.
    assert_eq!(ram.word(4, 1), 0x11_000 | PWU | A | D);
    assert_eq!(ram.word(3, 0), 0x4000 | PWU | A);
    // A read of another page: A, no D; prefetch did not touch guest bits.
    cpu.read(Gva(0x2000), 8, AccessMode::User).unwrap();
    assert_eq!(ram.word(4, 2), 0x12_000 | PWU | A);
    assert_eq!(ram.word(4, 5), 0x15_000 | PWU);
    b.audit().unwrap();
    let s = b.stats();
    assert!(s.get("faults").unwrap() >= 2, "{s}");
}

#[test]
fn guest_faults_are_exact() {
    let (mut ram, b, mut cpu) = setup(None);
    ram.set_word(4, 3, 0x13_000 | P | U); // read-only
    ram.set_word(4, 4, 0); // not present
    let out = cpu.write(Gva(0x3000), 8, 1, AccessMode::User).unwrap();
    assert_eq!(
        out,
        SoftOutcome::PageFault {
            error_code: PfErrorCode::PRESENT | PfErrorCode::WRITE | PfErrorCode::USER,
            cr2: Gva(0x3000)
        }
    );
    let out = cpu.read(Gva(0x4010), 8, AccessMode::Supervisor).unwrap();
    assert_eq!(
        out,
        SoftOutcome::PageFault {
            error_code: PfErrorCode::empty(),
            cr2: Gva(0x4010)
        }
    );
    b.audit().unwrap();
}

#[test]
fn mmio_and_read_only_slots() {
    let (mut ram, b, mut cpu) = setup(None);
    ram.set_word(4, 5, 0x80_0000 | PWU); // beyond every slot
    assert_eq!(
        cpu.read(Gva(0x5018), 8, AccessMode::User).unwrap(),
        SoftOutcome::Mmio(Gpa(0x80_0018))
    );
    // A read-only slot at gpa 0x40000 (RAM pages 48..50).
    add_slot(&b, ram.slot(1, 0x40_000, 48, 2, MemslotFlags::READONLY));
    ram.set_word(4, 6, 0x40_000 | PWU);
    assert_eq!(
        cpu.read(Gva(0x6000), 8, AccessMode::User).unwrap(),
        SoftOutcome::Done(0)
    );
    assert_eq!(
        cpu.write(Gva(0x6000), 8, 7, AccessMode::User).unwrap(),
        SoftOutcome::Mmio(Gpa(0x40_000))
    );
    assert_eq!(ram.word(48, 0), 0);
    b.audit().unwrap();
}

#[test]
fn writes_to_shadowed_tables_are_emulated_and_coherent() {
    let (mut ram, b, mut cpu) = setup(None);
    // gva 0x7000 maps the PT itself (RAM page 4): a self-map.
    ram.set_word(4, 7, 0x4000 | PWU);
    assert_eq!(
        cpu.read(Gva(0x1000), 8, AccessMode::User).unwrap(),
        SoftOutcome::Done(0)
    );
    // Remap gva 0x1000 to RAM page 30 by writing the PTE through the self-map.
    let out = cpu
        .write(Gva(0x7008), 8, 0x1e_000 | PWU, AccessMode::User)
        .unwrap();
    assert_eq!(out, SoftOutcome::Done(0x1e_000 | PWU));
    assert_eq!(ram.word(4, 1), 0x1e_000 | PWU);
    cpu.invlpg(Gva(0x1000));
    ram.set_word(30, 0, 0xabc);
    assert_eq!(
        cpu.read(Gva(0x1000), 8, AccessMode::User).unwrap(),
        SoftOutcome::Done(0xabc)
    );
    let s = b.stats();
    assert!(s.get("emulated_writes").unwrap() >= 1, "{s}");
    assert!(s.get("write_protect_hits").unwrap() >= 1, "{s}");
    b.audit().unwrap();
}

#[test]
fn write_flooding_zaps_the_page() {
    let (mut ram, b, mut cpu) = setup(None);
    // A second PT (RAM page 5) for gvas at 2 MiB, and gva 0x7000 mapping
    // it as data: writes through 0x7000 edit a table that is not on their
    // own path, so nothing uses it between them.
    ram.set_word(3, 1, 0x5000 | PWU);
    ram.set_word(5, 0, 0x14_000 | PWU);
    ram.set_word(4, 7, 0x5000 | PWU);
    cpu.read(Gva(0x20_0000), 8, AccessMode::User).unwrap();
    for i in 0..3u64 {
        cpu.write(Gva(0x7000 + 8 * 100 + 8 * i), 8, 0, AccessMode::Supervisor)
            .unwrap();
    }
    let s = b.stats();
    assert_eq!(s.get("flooding_zaps"), Some(1), "{s}");
    b.audit().unwrap();
    // A misaligned write (across two entries) zaps at once.
    cpu.read(Gva(0x20_0000), 8, AccessMode::User).unwrap();
    cpu.write(Gva(0x7000 + 8 * 10 + 4), 4, 0, AccessMode::Supervisor)
        .unwrap();
    cpu.write(Gva(0x7000 + 8 * 10), 8, 0, AccessMode::Supervisor)
        .unwrap();
    b.audit().unwrap();
}

#[test]
fn memslot_delete_leaves_no_stale_translation() {
    let (mut ram, b, mut cpu) = setup(None);
    add_slot(&b, ram.slot(1, 0x40_000, 48, 4, MemslotFlags::empty()));
    ram.set_word(4, 6, 0x40_000 | PWU);
    ram.set_word(48, 0, 0x55);
    assert_eq!(
        cpu.read(Gva(0x6000), 8, AccessMode::User).unwrap(),
        SoftOutcome::Done(0x55)
    );
    assert!(cpu.tlb_len() > 0);
    b.delete_memslot(SlotId(1)).unwrap();
    b.audit().unwrap();
    // The TLB entry must be gone: the access is MMIO now.
    assert_eq!(
        cpu.read(Gva(0x6000), 8, AccessMode::User).unwrap(),
        SoftOutcome::Mmio(Gpa(0x40_000))
    );
    // Move slot 0's tail: re-add slot 1 elsewhere and check the data follows.
    add_slot(&b, ram.slot(1, 0x80_000, 48, 4, MemslotFlags::empty()));
    ram.set_word(4, 6, 0x80_000 | PWU);
    cpu.invlpg(Gva(0x6000));
    assert_eq!(
        cpu.read(Gva(0x6000), 8, AccessMode::User).unwrap(),
        SoftOutcome::Done(0x55)
    );
    b.audit().unwrap();
}

#[test]
fn dirty_log_reports_every_write() {
    let (ram, b, mut cpu) = setup(None);
    let mut slot = ram.slot(0, 0, 0, 48, MemslotFlags::LOG_DIRTY);
    add_slot(&b, slot);
    for i in 0..8u64 {
        cpu.read(Gva(0x1000 * i), 8, AccessMode::User).unwrap();
    }
    let _ = b.get_dirty_log(SlotId(0)).unwrap();
    for i in [1u64, 3, 5] {
        cpu.write(Gva(0x1000 * i), 8, i, AccessMode::User).unwrap();
    }
    b.audit().unwrap();
    let log = b.get_dirty_log(SlotId(0)).unwrap();
    for i in [1u64, 3, 5] {
        assert!(log.is_dirty(16 + i), "page {} lost", 16 + i);
    }
    assert!(!log.is_dirty(18));
    // Writes after a harvest fault again and are logged again.
    cpu.write(Gva(0x3000), 8, 9, AccessMode::User).unwrap();
    let log = b.get_dirty_log(SlotId(0)).unwrap();
    assert!(log.is_dirty(19));
    slot.flags = MemslotFlags::empty();
    add_slot(&b, slot);
    assert!(b.get_dirty_log(SlotId(0)).is_err());
    b.audit().unwrap();
}

#[test]
fn page_limit_reclaims_oldest_first() {
    let mut ram = GuestRam::new(64);
    common::eight_table_guest(&mut ram);
    let b = backend(Some(12), 0);
    add_slot(&b, ram.slot(0, 0, 0, 48, MemslotFlags::empty()));
    let mut cpu = SoftVcpu::new(&b, VcpuId(0)).unwrap();
    cpu.load_context(&ctx4()).unwrap();
    for round in 0..3u64 {
        for t in 0..8u64 {
            let gva = Gva(t << 21);
            let out = cpu
                .write(gva, 8, round * 100 + t, AccessMode::User)
                .unwrap();
            assert_eq!(out, SoftOutcome::Done(round * 100 + t));
            b.audit().unwrap();
        }
    }
    let s = b.stats();
    assert!(s.get("reclaimed_valid").unwrap() > 0, "{s}");
    assert!(s.get("sps_in_use").unwrap() <= 12, "{s}");
    assert!(b.set_page_limit(Some(3)).is_err());
}

#[test]
fn root_cache_keeps_recent_address_spaces() {
    let (mut ram, b, mut cpu) = setup(None);
    // A second address space at RAM page 9 sharing the PDPT.
    ram.set_word(9, 0, 0x2000 | PWU);
    let mut other = ctx4();
    other.cr3 = 0x9000;
    for _ in 0..3 {
        cpu.load_context(&ctx4()).unwrap();
        cpu.read(Gva(0x1000), 8, AccessMode::User).unwrap();
        cpu.load_context(&other).unwrap();
        cpu.read(Gva(0x1000), 8, AccessMode::User).unwrap();
    }
    let s = b.stats();
    assert!(s.get("root_cache_hits").unwrap() >= 4, "{s}");
    b.audit().unwrap();
}

#[test]
fn thirty_two_bit_and_pae_guests() {
    let mut ram = GuestRam::new(64);
    // 32-bit: PD at page 1; PDE 0 -> PT at page 2; PDE 1 -> 4 MiB page at 0
    // (covers RAM 0..48 partly: only gfns inside the slot are memory).
    ram.set_word(1, 0, (0x2000 | PWU) | ((0x40_0000 | PWU | PS) << 32));
    ram.set_word(2, 0, (0x10_000 | PWU) | ((0x11_000 | P | U) << 32));
    let b = backend(None, 8);
    add_slot(&b, ram.slot(0, 0, 0, 48, MemslotFlags::empty()));
    add_slot(&b, ram.slot(1, 0x40_0000, 48, 16, MemslotFlags::empty()));
    let mut cpu = SoftVcpu::new(&b, VcpuId(0)).unwrap();
    let ctx32 = PagingContext::for_mode(
        PagingMode::Bits32,
        0x1000,
        40,
        mmu_api::paging::CpuFeatures::all(),
    )
    .unwrap();
    cpu.load_context(&ctx32).unwrap();
    assert_eq!(
        cpu.write(Gva(0x10), 4, 0x77, AccessMode::User).unwrap(),
        SoftOutcome::Done(0x77)
    );
    assert!(matches!(
        cpu.write(Gva(0x1000), 4, 1, AccessMode::User).unwrap(),
        SoftOutcome::PageFault { .. }
    ));
    assert_eq!(
        cpu.write(Gva(0x40_3008), 8, 5, AccessMode::User).unwrap(),
        SoftOutcome::Done(5)
    );
    assert_eq!(ram.word(51, 1), 5);
    assert_eq!(ram.word(1, 0) >> 32, 0x40_0000 | PWU | PS | A | D);
    b.audit().unwrap();

    // PAE: PDPT at page 5 (32-byte aligned), PD at page 6, PT at page 7.
    ram.set_word(5, 0, 0x6000 | P);
    ram.set_word(6, 0, 0x7000 | PWU);
    ram.set_word(7, 2, 0x12_000 | PWU);
    let pae = PagingContext::for_mode(
        PagingMode::Pae,
        0x5000,
        40,
        mmu_api::paging::CpuFeatures::all(),
    )
    .unwrap();
    cpu.load_context(&pae).unwrap();
    assert_eq!(
        cpu.write(Gva(0x2010), 8, 9, AccessMode::User).unwrap(),
        SoftOutcome::Done(9)
    );
    assert_eq!(ram.word(18, 2), 9);
    b.audit().unwrap();
}

#[test]
fn no_paging_guest_uses_a_direct_map() {
    let ram = GuestRam::new(64);
    let b = backend(None, 8);
    add_slot(&b, ram.slot(0, 0, 0, 32, MemslotFlags::empty()));
    let mut cpu = SoftVcpu::new(&b, VcpuId(0)).unwrap();
    let ctx = PagingContext::for_mode(
        PagingMode::NoPaging,
        0,
        40,
        mmu_api::paging::CpuFeatures::all(),
    )
    .unwrap();
    cpu.load_context(&ctx).unwrap();
    assert_eq!(
        cpu.write(Gva(0x17748), 8, 3, AccessMode::Supervisor)
            .unwrap(),
        SoftOutcome::Done(3)
    );
    assert_eq!(ram.word(0x17, 0x748 / 8), 3);
    assert_eq!(
        cpu.read(Gva(0x40_000), 8, AccessMode::User).unwrap(),
        SoftOutcome::Mmio(Gpa(0x40_000))
    );
    b.audit().unwrap();
}
