//! Bad input the other EPT tests do not cover already (memslot shape,
//! overlap and unknown-id errors are in `memslots.rs` and `dirty.rs`):
//! impossible MAXPHYADDR values, page limits of 0, and hostile guest tables
//! (self-maps, loops, entries outside guest memory or with reserved address
//! bits), which must translate or fault exactly as the CPU would and
//! classify as MMIO where no memslot backs the address.

use mmu_api::paging::{PageFault, WalkError};
use mmu_api::{
    Access, AccessKind, BackendError, ContextError, Gpa, Gva, MemslotError, MemslotFlags,
    MmioClass, MmuBackend, MmuVcpu, PfErrorCode, SlotId, VcpuError,
};
use mmu_ept::EptConfig;

use crate::common::{A, P, PAGE, PS, Tables, U, Vm, W, add_ram, ctx4, leak_ram};

const PWU: u64 = P | W | U;

/// 256 KiB of RAM at guest-physical 0 (slot 0), 4-level tables from
/// 0x1000, and a vCPU on them.
fn guest() -> (Vm, Tables, Box<dyn MmuVcpu>) {
    let vm = Vm::new();
    let ram = leak_ram(64 * PAGE);
    add_ram(&vm.backend, ram, 0, 0, MemslotFlags::empty()).expect("slot 0");
    let tables = Tables::new(ram, 0, 0x1000);
    let mut vcpu = vm.vcpu(0);
    vcpu.set_paging_context(&ctx4(tables.cr3)).expect("context");
    (vm, tables, vcpu)
}

fn gpa_of(vcpu: &mut dyn MmuVcpu, gva: u64, access: Access) -> Result<u64, WalkError> {
    vcpu.translate(Gva(gva), 1, access, crate::common::AD)
        .map(|s| s[0].gpa.raw())
}

fn page_fault(r: Result<u64, WalkError>) -> PageFault {
    match r {
        Err(WalkError::PageFault(pf)) => pf,
        other => panic!("not a #PF: {other:?}"),
    }
}

#[test]
fn impossible_maxphyaddr_is_refused() {
    let (_vm, tables, mut vcpu) = guest();
    let good = *vcpu.paging_context();
    for m in [0, 31, 53, 255] {
        let mut bad = good;
        bad.maxphyaddr = m;
        assert_eq!(
            vcpu.set_paging_context(&bad),
            Err(VcpuError::Context(ContextError::MaxPhyAddr(m)))
        );
        assert_eq!(*vcpu.paging_context(), good, "the old context stays");
    }
    let mut tables = tables;
    tables.map(0x40_0000, 0x1_0000, PWU);
    assert_eq!(
        gpa_of(&mut *vcpu, 0x40_0008, Access::user(AccessKind::Read)),
        Ok(0x1_0008)
    );

    // A guest-physical width out of range is clamped to 32..=52, so
    // memslots are checked against a width a CPU can have.
    for (asked, width) in [(0u8, 32u8), (31, 32), (53, 52), (255, 52)] {
        let mut config = EptConfig::default();
        config.gpa_width = asked;
        let vm = Vm::with_config(config);
        let base = (1u64 << width) - PAGE;
        let ram = leak_ram(2 * PAGE);
        assert_eq!(
            add_ram(&vm.backend, ram, 0, base, MemslotFlags::empty()),
            Err(MemslotError::TooLarge {
                slot: SlotId(0),
                end: base + 2 * PAGE,
                width,
            }),
            "gpa_width {asked}"
        );
        add_ram(&vm.backend, ram, 0, base - PAGE, MemslotFlags::empty())
            .expect("a slot that ends at the limit");
    }
}

#[test]
fn page_limits_are_refused_with_a_typed_error() {
    let vm = Vm::new();
    for limit in [0, 1, u64::MAX] {
        assert_eq!(
            vm.backend.set_page_limit(Some(limit)),
            Err(BackendError::Unsupported {
                backend: "ept",
                what: "a page limit",
            }),
            "limit {limit}"
        );
        assert_eq!(vm.backend.page_limit(), None);
    }
}

/// Self-maps and loops: the walk reads whatever the entries name, at
/// whatever level, and ends after as many levels as the mode has.
#[test]
fn self_maps_and_loops_translate_as_the_cpu_does() {
    let (_vm, mut tables, mut vcpu) = guest();
    let read = Access::user(AccessKind::Read);
    let cr3 = tables.cr3;
    let pdpt = tables.entry(0, 3) & !0xfff;
    let pd = tables.entry(0, 2) & !0xfff;
    // PML4[1] names the PML4: (1, 1, 1, 1) lands on the PML4 itself.
    tables.write(cr3 + 8, cr3 | PWU);
    let rec = (1u64 << 39) | (1 << 30) | (1 << 21) | (1 << 12);
    assert_eq!(gpa_of(&mut *vcpu, rec + 0x18, read), Ok(cr3 + 0x18));
    assert_eq!(tables.read(cr3 + 8), cr3 | PWU | A, "A set once per entry");
    // PD[3] names the PML4 as a page table: its entry 0 maps the PDPT.
    tables.write(pd + 3 * 8, cr3 | PWU);
    assert_eq!(gpa_of(&mut *vcpu, (3 << 21) | 0x10, read), Ok(pdpt + 0x10));
    // ... and its entry 2 is empty: a not-present fault at that level.
    let f = page_fault(gpa_of(&mut *vcpu, (3 << 21) | 0x2000, read));
    assert_eq!(f.error_code, PfErrorCode::USER);
    assert_eq!(f.address, Gva((3 << 21) | 0x2000));
    assert_eq!(f.unbacked_table, None);
    // A root whose entry 0 names itself: every level reads the same entry
    // and the leaf maps the root.
    let lone = 0x3_0000;
    tables.write(lone, lone | PWU);
    vcpu.set_paging_context(&ctx4(lone)).expect("context");
    assert_eq!(gpa_of(&mut *vcpu, 0x28, read), Ok(lone + 0x28));
    assert_eq!(tables.read(lone), lone | PWU | A);
}

/// Entries naming memory no memslot backs, tables outside guest memory and
/// reserved address bits.
#[test]
fn entries_outside_guest_memory() {
    let (vm, mut tables, mut vcpu) = guest();
    let read = Access::user(AccessKind::Read);
    // Data beyond every slot, and at "host-looking" addresses: the walk
    // gives the address, and the exit for it is MMIO.
    for (gva, gpa) in [
        (0x40_0000u64, 0x80_0000u64),
        (0x40_1000, 0x3f_ffff_f000),
        (0x40_2000, 0x10_0000_0000),
    ] {
        tables.map(gva, gpa, PWU);
        assert_eq!(gpa_of(&mut *vcpu, gva + 0x38, read), Ok(gpa + 0x38));
        assert_eq!(vcpu.classify_mmio(Gpa(gpa + 0x38), false), MmioClass::Mmio);
        assert_eq!(vcpu.classify_mmio(Gpa(gpa + 0x38), true), MmioClass::Mmio);
    }
    // A 1 GiB page over memory no slot backs.
    let pdpte = tables.entry(0x4000_0000, 3);
    tables.write(pdpte, 0x40_0000_0000 | PWU | PS);
    assert_eq!(gpa_of(&mut *vcpu, 0x4012_3450, read), Ok(0x40_0012_3450));
    // A page table outside guest memory: not present, flagged unbacked.
    let pde = tables.entry(0x60_0000, 2);
    tables.write(pde, 0x90_0000 | PWU);
    let f = page_fault(gpa_of(&mut *vcpu, 0x60_0000, read));
    assert_eq!(f.error_code, PfErrorCode::USER);
    assert_eq!(f.unbacked_table, Some(Gpa(0x90_0000)));
    // An address bit at or above MAXPHYADDR (46 here) is reserved.
    for bit in [46u32, 51] {
        let gva = 0x40_3000 + u64::from(bit - 46) * 0x1000;
        tables.map(gva, (1u64 << bit) | 0x1_0000, PWU);
        let f = page_fault(gpa_of(&mut *vcpu, gva, read));
        assert_eq!(
            f.error_code,
            PfErrorCode::PRESENT | PfErrorCode::RSVD | PfErrorCode::USER,
            "bit {bit}"
        );
    }
    // Memory stays memory.
    assert_eq!(
        vcpu.classify_mmio(Gpa(0x1_0000), true),
        MmioClass::Memory { slot: SlotId(0) }
    );
    assert_eq!(vm.backend.memslots().len(), 1);
}
