//! Bad input to the shadow backend, one test per kind: careless callers
//! (overlapping, unaligned, zero-sized or oversized memslots, unknown slot
//! ids, page limits of 0 or below the minimum, impossible MAXPHYADDR
//! values) get a typed error and change nothing; hostile guests (self-maps,
//! table loops, entries naming the shadow pool's hardware frames, guest
//! RAM's own hardware frames or memory outside every memslot, reserved
//! address bits) get exactly the fault or MMIO exit the architecture gives,
//! and `audit()` (the isolation invariant) holds after each.

mod common;

use common::{GuestRam, POOL_HPA, POOL_PAGES, RAM_HPA, add_slot, backend, config};
use mmu_api::{
    AccessMode, BackendError, ContextError, Gpa, Gva, HostVirtAddr, Hpa, Memslot, MemslotError,
    MemslotFlags, MemslotGeneration, MmuBackend, MmuVcpu, PagingContext, PagingMode, PfErrorCode,
    SlotId, VcpuError, VcpuId,
};
use mmu_shadow::soft::{SoftOutcome, SoftVcpu};
use mmu_shadow::{MIN_PAGE_LIMIT, PoolError, ShadowBackend};

const P: u64 = 1;
const U: u64 = 4;
const A: u64 = 0x20;
const D: u64 = 0x40;
const PS: u64 = 0x80;
const PWU: u64 = 7;

/// RAM pages 0..48 as slot 0 at gpa 0, 4-level tables in pages 1..=4:
/// PML4 (page 1) -> PDPT (2) -> PD (3) -> PT (4). The test fills in the
/// entries it attacks with.
fn setup() -> (GuestRam, ShadowBackend, SoftVcpu) {
    let mut ram = GuestRam::new(64);
    ram.set_word(1, 0, 0x2000 | PWU);
    ram.set_word(2, 0, 0x3000 | PWU);
    ram.set_word(3, 0, 0x4000 | PWU);
    let b = backend(None, 8);
    add_slot(&b, ram.slot(0, 0, 0, 48, MemslotFlags::empty()));
    let mut cpu = SoftVcpu::new(&b, VcpuId(0)).expect("vCPU");
    cpu.load_context(&ctx4(0x1000)).expect("context");
    (ram, b, cpu)
}

fn ctx4(cr3: u64) -> PagingContext {
    PagingContext::for_mode(
        PagingMode::Level4,
        cr3,
        40,
        mmu_api::paging::CpuFeatures::all(),
    )
    .expect("context")
}

/// The memslots and generation, which a refused change must leave alone.
fn snapshot(b: &ShadowBackend) -> (Vec<Memslot>, MemslotGeneration) {
    (b.memslots(), b.memslot_generation())
}

/// A slot 1 of `pages` RAM pages from RAM page 48, at `gpa`.
fn slot1(ram: &GuestRam, gpa: u64, pages: u64) -> Memslot {
    ram.slot(1, gpa, 48, pages, MemslotFlags::empty())
}

fn set(b: &ShadowBackend, slot: Memslot) -> Result<mmu_api::MemslotChange, MemslotError> {
    // SAFETY: every slot the tests pass is refused before its host range is
    // used, and the host ranges they name are inside a `GuestRam` the test
    // keeps alive for the backend's lifetime anyway.
    unsafe { b.set_memslot(slot) }
}

fn user_read(cpu: &mut SoftVcpu, gva: u64) -> SoftOutcome {
    cpu.read(Gva(gva), 8, AccessMode::User).expect("soft vCPU")
}

fn fault(error_code: PfErrorCode, gva: u64) -> SoftOutcome {
    SoftOutcome::PageFault {
        error_code,
        cr2: Gva(gva),
    }
}

#[test]
fn overlapping_memslots_are_refused() {
    let (mut ram, b, mut cpu) = setup();
    ram.set_word(4, 0, 0x1_0000 | PWU);
    ram.set_word(16, 0, 0x42);
    let before = snapshot(&b);
    // Slot 0 is gpa 0..0x30000: inside it, across its end, around it, and
    // at the same base.
    for (gpa, pages, at) in [
        (0x1_0000, 2, 0x1_0000),
        (0x2_f000, 4, 0x2_f000),
        (0, 8, 0),
        (0x2_0000, 1, 0x2_0000),
    ] {
        assert_eq!(
            set(&b, slot1(&ram, gpa, pages)),
            Err(MemslotError::Overlap {
                slot: SlotId(1),
                other: SlotId(0),
                at: Gpa(at),
            }),
            "slot 1 at {gpa:#x}, {pages} pages"
        );
        assert_eq!(snapshot(&b), before);
    }
    // A slot right after slot 0 is fine; moving it onto slot 0 is not.
    set(&b, slot1(&ram, 0x3_0000, 4)).expect("adjacent slot");
    let after_add = snapshot(&b);
    assert_eq!(
        set(&b, slot1(&ram, 0x2_e000, 4)),
        Err(MemslotError::Overlap {
            slot: SlotId(1),
            other: SlotId(0),
            at: Gpa(0x2_e000),
        })
    );
    assert_eq!(snapshot(&b), after_add);
    assert_eq!(user_read(&mut cpu, 0), SoftOutcome::Done(0x42));
    b.audit().expect("audit");
}

#[test]
fn unaligned_memslots_are_refused() {
    let (ram, b, _cpu) = setup();
    let before = snapshot(&b);
    let good = slot1(&ram, 0x10_0000, 2);
    let mut cases = Vec::new();
    let mut s = good;
    s.guest_base = Gpa(0x10_0800);
    cases.push(("guest base", s));
    let mut s = good;
    s.size = 0x1800;
    cases.push(("size", s));
    let mut s = good;
    s.backing.hpa = Hpa(good.backing.hpa.raw() + 0x10);
    cases.push(("hardware address", s));
    let mut s = good;
    s.backing.host_addr = HostVirtAddr(good.backing.host_addr.0 + 0x200);
    cases.push(("host address", s));
    for (what, slot) in cases {
        assert_eq!(
            set(&b, slot),
            Err(MemslotError::Unaligned(SlotId(1))),
            "unaligned {what}"
        );
        assert_eq!(snapshot(&b), before, "unaligned {what}");
    }
    set(&b, good).expect("the aligned slot");
}

#[test]
fn zero_sized_memslot_is_refused() {
    let (ram, b, _cpu) = setup();
    let before = snapshot(&b);
    let mut s = slot1(&ram, 0x10_0000, 1);
    s.size = 0;
    assert_eq!(set(&b, s), Err(MemslotError::ZeroSize(SlotId(1))));
    // Also as a change of a live slot's size.
    let mut s0 = b.memslots()[0];
    s0.size = 0;
    assert_eq!(set(&b, s0), Err(MemslotError::ZeroSize(SlotId(0))));
    assert_eq!(snapshot(&b), before);
}

#[test]
fn oversized_memslots_are_refused() {
    let (ram, b, _cpu) = setup();
    let before = snapshot(&b);
    // The test configuration's guest-physical width is 40 bits.
    let width = config(None, 0).gpa_width;
    let base = (1u64 << width) - 0x1000;
    assert_eq!(
        set(&b, slot1(&ram, base, 2)),
        Err(MemslotError::TooLarge {
            slot: SlotId(1),
            end: base + 0x2000,
            width,
        })
    );
    // An end that wraps the address space saturates.
    let mut wrap = slot1(&ram, 0xffff_ffff_ffff_f000, 2);
    wrap.backing = slot1(&ram, 0, 2).backing;
    assert_eq!(
        set(&b, wrap),
        Err(MemslotError::TooLarge {
            slot: SlotId(1),
            end: u64::MAX,
            width,
        })
    );
    // A backing the hardware cannot address (beyond the host's
    // MAXPHYADDR, 46 bits here) or a null host mapping.
    let mut far = slot1(&ram, 0x10_0000, 2);
    far.backing.hpa = Hpa((1 << 46) - 0x1000);
    assert_eq!(set(&b, far), Err(MemslotError::InvalidBacking(SlotId(1))));
    let mut null = slot1(&ram, 0x10_0000, 2);
    null.backing.host_addr = HostVirtAddr(0);
    assert_eq!(set(&b, null), Err(MemslotError::InvalidBacking(SlotId(1))));
    // A backing that overlaps the shadow pool, at either end.
    let pool_end = POOL_HPA + u64::from(POOL_PAGES) * 0x1000;
    for hpa in [POOL_HPA - 0x1000, pool_end - 0x1000, POOL_HPA + 0x4000] {
        let mut s = slot1(&ram, 0x10_0000, 2);
        s.backing.hpa = Hpa(hpa);
        assert_eq!(
            set(&b, s),
            Err(MemslotError::OverlapsBackend(SlotId(1))),
            "backing at {hpa:#x}"
        );
    }
    assert_eq!(snapshot(&b), before);
}

#[test]
fn unknown_slot_ids_are_refused() {
    let (ram, b, _cpu) = setup();
    let before = snapshot(&b);
    assert_eq!(
        b.delete_memslot(SlotId(5)),
        Err(MemslotError::UnknownSlot(SlotId(5)))
    );
    assert_eq!(
        b.get_dirty_log(SlotId(5)).map(|_| ()),
        Err(MemslotError::UnknownSlot(SlotId(5)))
    );
    assert_eq!(
        b.get_dirty_log(SlotId(0)).map(|_| ()),
        Err(MemslotError::NotLogging(SlotId(0)))
    );
    assert_eq!(snapshot(&b), before);
    // A slot deleted twice: the second time it is unknown.
    set(&b, slot1(&ram, 0x10_0000, 2)).expect("slot 1");
    b.delete_memslot(SlotId(1)).expect("delete");
    let after = snapshot(&b);
    assert_eq!(
        b.delete_memslot(SlotId(1)),
        Err(MemslotError::UnknownSlot(SlotId(1)))
    );
    assert_eq!(snapshot(&b), after);
    b.audit().expect("audit");
}

#[test]
fn page_limits_of_zero_or_below_the_minimum_are_refused() {
    for limit in [0, 1, MIN_PAGE_LIMIT - 1] {
        assert!(
            matches!(
                ShadowBackend::new(config(Some(limit), 0)),
                Err(PoolError::Size(n)) if n == limit
            ),
            "page limit {limit} at creation"
        );
    }
    assert!(matches!(
        ShadowBackend::new({
            let mut m = config(None, 0);
            m.pool_pages = 0;
            m
        }),
        Err(PoolError::Size(0))
    ));

    let (mut ram, b, _) = setup();
    for limit in [0, MIN_PAGE_LIMIT - 1] {
        assert_eq!(
            b.set_page_limit(Some(limit)),
            Err(BackendError::PageLimitTooLow {
                requested: limit,
                minimum: MIN_PAGE_LIMIT,
            })
        );
        assert_eq!(b.page_limit(), None, "a refused limit changes nothing");
    }
    // The minimum itself is enough for a 5-level guest to make progress:
    // twelve 4 KiB pages, each behind its own PT (a new path every time;
    // more level-1 shadow pages than the limit leaves room for).
    const PATHS: u64 = 12;
    b.set_page_limit(Some(MIN_PAGE_LIMIT)).expect("the minimum");
    assert_eq!(b.page_limit(), Some(MIN_PAGE_LIMIT));
    ram.set_word(10, 0, 0x1000 | PWU); // PML5 -> the PML4 at page 1
    for t in 0..PATHS {
        ram.set_word(3, t as usize, (0x1_0000 + 0x1000 * t) | PWU); // PD -> PT
        ram.set_word(16 + t, 0, (0x2_0000 + 0x1000 * t) | PWU); // PT -> data
        ram.set_word(32 + t, 0, 0x100 + t);
    }
    let mut cpu = SoftVcpu::new(&b, VcpuId(1)).expect("vCPU");
    let ctx5 = PagingContext::for_mode(
        PagingMode::Level5,
        0xa000,
        40,
        mmu_api::paging::CpuFeatures::all(),
    )
    .expect("context");
    cpu.load_context(&ctx5).expect("context");
    for round in 0..2 {
        for t in 0..PATHS {
            assert_eq!(
                user_read(&mut cpu, t << 21),
                SoftOutcome::Done(0x100 + t),
                "round {round} page {t}"
            );
            b.audit().expect("audit");
        }
    }
    let s = b.stats();
    assert!(
        s.get("sps_in_use").expect("counter") <= MIN_PAGE_LIMIT,
        "{s}"
    );
    assert!(s.get("reclaimed_valid").expect("counter") > 0, "{s}");
}

#[test]
fn impossible_maxphyaddr_is_refused() {
    // The host's: the hardware that walks the shadow tables.
    for m in [0, 31, 53, 64, 255] {
        assert!(
            matches!(
                ShadowBackend::new({
                    let mut c = config(None, 0);
                    c.host_maxphyaddr = m;
                    c
                }),
                Err(PoolError::Config(_))
            ),
            "host MAXPHYADDR {m}"
        );
    }
    // MMIO SPTEs need a reserved address bit: none with MAXPHYADDR 52.
    assert!(matches!(
        ShadowBackend::new({
            let mut m = config(None, 0);
            m.host_maxphyaddr = 52;
            m
        }),
        Err(PoolError::Config(_))
    ));
    ShadowBackend::new({
        let mut m = config(None, 0);
        m.host_maxphyaddr = 52;
        m.mmio_caching = false;
        m
    })
    .expect("MAXPHYADDR 52 without MMIO caching");
    // A pool the host cannot address.
    assert!(matches!(
        ShadowBackend::new({
            let mut m = config(None, 0);
            m.host_maxphyaddr = 36;
            m
        }),
        Err(PoolError::Base(Hpa(POOL_HPA)))
    ));
    // Generation bits an MMIO SPTE cannot hold.
    for bits in [0, 20, 64] {
        assert!(
            matches!(
                ShadowBackend::new({
                    let mut m = config(None, 0);
                    m.mmio_gen_bits = bits;
                    m
                }),
                Err(PoolError::Config(_))
            ),
            "{bits} generation bits"
        );
    }
    // The guest's: a context no CPU can be in is refused and the old one
    // stays in force.
    let (_ram, _b, mut cpu) = setup();
    for m in [0, 31, 53, 255] {
        let mut bad = ctx4(0x1000);
        bad.maxphyaddr = m;
        assert_eq!(
            cpu.load_context(&bad),
            Err(VcpuError::Context(ContextError::MaxPhyAddr(m)))
        );
        assert_eq!(*cpu.mmu().paging_context(), ctx4(0x1000));
    }
    assert_eq!(user_read(&mut cpu, 0), fault(PfErrorCode::USER, 0));
}

/// PML4 slot 1 maps the PML4 itself (a recursive map): walking it 4 times
/// lands on the PML4 as data. Reads see the entries (with the A bits the
/// walks set); writes hit a shadowed table and are emulated.
#[test]
fn self_mapped_tables() {
    let (mut ram, b, mut cpu) = setup();
    ram.set_word(1, 1, 0x1000 | PWU);
    ram.set_word(4, 3, 0x5000 | PWU);
    ram.set_word(5, 0, 0xfeed);
    let rec = (1u64 << 39) | (1 << 30) | (1 << 21) | (1 << 12);
    assert_eq!(user_read(&mut cpu, rec), SoftOutcome::Done(0x2000 | PWU));
    assert_eq!(
        user_read(&mut cpu, rec + 8),
        SoftOutcome::Done(0x1000 | PWU | A)
    );
    b.audit().expect("audit");
    // A write through the recursive map: PML4[2] = the PDPT, an alias of
    // slot 0's path. The leaf (PML4[1]) gets D.
    assert_eq!(
        cpu.write(Gva(rec + 16), 8, 0x2000 | PWU, AccessMode::User)
            .expect("soft vCPU"),
        SoftOutcome::Done(0x2000 | PWU)
    );
    assert_eq!(ram.word(1, 2), 0x2000 | PWU);
    assert_eq!(ram.word(1, 1), 0x1000 | PWU | A | D);
    cpu.flush();
    assert_eq!(
        user_read(&mut cpu, (2 << 39) | 0x3000),
        SoftOutcome::Done(0xfeed)
    );
    let s = b.stats();
    assert!(s.get("emulated_writes").expect("counter") >= 1, "{s}");
    b.audit().expect("audit");
}

/// Tables that point back up: a PD entry naming the PML4 as a page table,
/// and a root whose entry 0 names the root itself at every level.
#[test]
fn table_loops() {
    let (mut ram, b, mut cpu) = setup();
    ram.set_word(3, 3, 0x1000 | PWU); // PD[3] -> the PML4 as a PT
    // gva 3 << 21: PML4[0] -> PDPT[0] -> PD[3] -> "PT" = PML4, whose entry 0
    // maps page 2 (the PDPT) as data.
    assert_eq!(
        user_read(&mut cpu, 3 << 21),
        SoftOutcome::Done(0x3000 | PWU | A)
    );
    // Entry 1 of that "PT" is empty: a not-present fault.
    assert_eq!(
        user_read(&mut cpu, (3 << 21) | 0x1000),
        fault(PfErrorCode::USER, (3 << 21) | 0x1000)
    );
    b.audit().expect("audit");

    // A one-entry loop: page 10's entry 0 names page 10. Every level of the
    // walk reads the same entry, and the leaf maps page 10 itself.
    ram.set_word(10, 0, 0xa000 | PWU);
    cpu.load_context(&ctx4(0xa000)).expect("context");
    assert_eq!(user_read(&mut cpu, 0), SoftOutcome::Done(0xa000 | PWU | A));
    // (0x7e: not present, so entry 1 stays a hole.)
    assert_eq!(
        cpu.write(Gva(8), 8, 0x7e, AccessMode::Supervisor)
            .expect("soft vCPU"),
        SoftOutcome::Done(0x7e)
    );
    assert_eq!(ram.word(10, 1), 0x7e);
    assert_eq!(ram.word(10, 0), 0xa000 | PWU | A | D);
    // The loop's other entries are not present.
    assert_eq!(
        user_read(&mut cpu, 0x1000),
        fault(PfErrorCode::USER, 0x1000)
    );
    b.audit().expect("audit");
}

/// Guest entries naming the shadow pool's hardware frames, or guest RAM's
/// own hardware frames, are addresses no memslot backs: data there is MMIO
/// (also when the answer comes from a cached MMIO SPTE), a page table there
/// is not present. Nothing maps the pool or RAM's hardware address.
#[test]
fn entries_naming_the_pool_or_host_addresses() {
    let (mut ram, b, mut cpu) = setup();
    ram.set_word(4, 1, POOL_HPA | PWU); // data in the pool's first frame
    ram.set_word(4, 2, (POOL_HPA + 0x5000) | PWU);
    ram.set_word(4, 3, RAM_HPA | PWU); // RAM's own hardware address
    ram.set_word(3, 1, POOL_HPA | PWU); // a PT in the pool
    ram.set_word(3, 2, POOL_HPA | PWU | PS); // a 2 MiB page over the pool
    ram.set_word(2, 1, POOL_HPA | PWU | PS); // a 1 GiB page over the pool
    for _ in 0..2 {
        assert_eq!(
            user_read(&mut cpu, 0x1008),
            SoftOutcome::Mmio(Gpa(POOL_HPA + 8))
        );
        assert_eq!(
            cpu.write(Gva(0x2010), 8, 1, AccessMode::Supervisor)
                .expect("soft vCPU"),
            SoftOutcome::Mmio(Gpa(POOL_HPA + 0x5010))
        );
        assert_eq!(user_read(&mut cpu, 0x3000), SoftOutcome::Mmio(Gpa(RAM_HPA)));
        assert_eq!(
            user_read(&mut cpu, 0x20_0000),
            fault(PfErrorCode::USER, 0x20_0000)
        );
        assert_eq!(
            user_read(&mut cpu, 0x40_1238),
            SoftOutcome::Mmio(Gpa(POOL_HPA + 0x1238))
        );
        assert_eq!(
            user_read(&mut cpu, 0x4123_4568),
            SoftOutcome::Mmio(Gpa(POOL_HPA + 0x123_4568))
        );
        b.audit().expect("audit");
    }
    let s = b.stats();
    // The second round was answered from MMIO SPTEs: still the right gpa.
    assert!(s.get("mmio_fast_hits").expect("counter") >= 4, "{s}");
}

/// Entries outside guest memory and reserved address bits: MMIO for data,
/// a not-present fault for a table, a reserved-bit fault for bits at or
/// above MAXPHYADDR, with the CPU's exact error codes.
#[test]
fn entries_outside_guest_memory() {
    let (mut ram, b, mut cpu) = setup();
    ram.set_word(4, 5, 0x80_0000 | PWU); // data beyond every slot
    ram.set_word(3, 4, 0x90_0000 | PWU); // a PT beyond every slot
    ram.set_word(4, 6, (1 << 40) | 0x5000 | PWU); // bit 40: reserved (MAXPHYADDR 40)
    ram.set_word(4, 7, (1 << 51) | 0x5000 | PWU); // bit 51: reserved
    ram.set_word(2, 2, 0x3000 | PWU | (1 << 45)); // reserved bit in a PDPTE
    assert_eq!(
        user_read(&mut cpu, 0x5018),
        SoftOutcome::Mmio(Gpa(0x80_0018))
    );
    assert_eq!(
        user_read(&mut cpu, 4 << 21),
        fault(PfErrorCode::USER, 4 << 21)
    );
    assert_eq!(
        cpu.write(Gva(4 << 21), 8, 1, AccessMode::Supervisor)
            .expect("soft vCPU"),
        SoftOutcome::PageFault {
            error_code: PfErrorCode::WRITE,
            cr2: Gva(4 << 21)
        }
    );
    let rsvd_user = PfErrorCode::PRESENT | PfErrorCode::RSVD | PfErrorCode::USER;
    assert_eq!(user_read(&mut cpu, 0x6000), fault(rsvd_user, 0x6000));
    assert_eq!(user_read(&mut cpu, 0x7000), fault(rsvd_user, 0x7000));
    assert_eq!(user_read(&mut cpu, 2 << 30), fault(rsvd_user, 2 << 30));
    assert_eq!(
        cpu.fetch(Gva(0x6000), AccessMode::Supervisor)
            .expect("soft vCPU"),
        SoftOutcome::PageFault {
            error_code: PfErrorCode::PRESENT | PfErrorCode::RSVD | PfErrorCode::FETCH,
            cr2: Gva(0x6000)
        }
    );
    b.audit().expect("audit");
    // A read-only guest page stays read-only, and nothing got mapped
    // writable or user beyond the guest's own entries.
    ram.set_word(4, 8, 0x9000 | P | U);
    assert_eq!(
        cpu.write(Gva(0x8000), 8, 1, AccessMode::User)
            .expect("soft vCPU"),
        fault(
            PfErrorCode::PRESENT | PfErrorCode::WRITE | PfErrorCode::USER,
            0x8000
        )
    );
    b.audit().expect("audit");
}

/// A guest with MAXPHYADDR 52 names an unbacked address with bit 51 set.
/// The MMIO SPTE's gfn field (bits 50:12) cannot hold it: the backend must
/// not cache such an answer (or must keep it exact). Before the fix the
/// cached SPTE dropped bit 51, `audit()` reported "MMIO leaf names 0x7,
/// recorded 0x8000000007", and the second access was answered "MMIO at
/// 0x7000", an address that is RAM.
#[test]
fn mmio_above_bit_50_with_maxphyaddr_52() {
    let (mut ram, b, mut cpu) = setup();
    let gpa = (1u64 << 51) | 0x7000;
    ram.set_word(4, 8, gpa | PWU);
    cpu.load_context(
        &PagingContext::for_mode(
            PagingMode::Level4,
            0x1000,
            52,
            mmu_api::paging::CpuFeatures::all(),
        )
        .expect("context"),
    )
    .expect("context");
    for round in 0..2 {
        assert_eq!(
            user_read(&mut cpu, 0x8010),
            SoftOutcome::Mmio(Gpa(gpa + 0x10)),
            "access {round}"
        );
        b.audit().expect("audit");
    }
}

/// A host with MAXPHYADDR 52 (allowed with MMIO caching off) backs a slot
/// at a hardware address with bit 51 set. Such a leaf is memory, not an
/// MMIO SPTE, and `audit()` must check it as memory. Before the fix any SPTE
/// with bit 51 was taken for an MMIO SPTE, even with MMIO caching off:
/// `audit()` reported "MMIO leaf ... is in the rmap" and skipped its
/// memslot / read-only / pool checks for that leaf.
#[test]
fn memory_above_bit_50_with_host_maxphyaddr_52() {
    let mut ram = GuestRam::new(64);
    ram.set_word(1, 0, 0x2000 | PWU);
    ram.set_word(2, 0, 0x3000 | PWU);
    ram.set_word(3, 0, 0x4000 | PWU);
    ram.set_word(4, 8, 0x1_0000 | PWU);
    ram.set_word(16, 0, 0x99);
    let b = ShadowBackend::new({
        let mut m = config(None, 0);
        m.host_maxphyaddr = 52;
        m.mmio_caching = false;
        m
    })
    .expect("backend");
    let mut slot = ram.slot(0, 0, 0, 48, MemslotFlags::empty());
    slot.backing.hpa = Hpa(1 << 51);
    set(&b, slot).expect("slot");
    let mut cpu = SoftVcpu::new(&b, VcpuId(0)).expect("vCPU");
    cpu.load_context(&ctx4(0x1000)).expect("context");
    assert_eq!(user_read(&mut cpu, 0x8000), SoftOutcome::Done(0x99));
    b.audit().expect("audit");
    assert_eq!(
        cpu.write(Gva(0x8000), 8, 5, AccessMode::User)
            .expect("soft vCPU"),
        SoftOutcome::Done(5)
    );
    b.audit().expect("audit");
}
