//! x86-64 system structures the VMM builds for the guest: segment and
//! system descriptors, interrupt gates, the TSS, control-register bits, and
//! their KVM register-state forms.
//!
//! Everything here is plain encoding, checked by unit tests against the
//! values the architecture manuals give.

use kvm_bindings::{kvm_dtable, kvm_segment};

/// CR0.PE: protected mode.
pub const CR0_PE: u64 = 1 << 0;
/// CR0.MP: monitor coprocessor.
pub const CR0_MP: u64 = 1 << 1;
/// CR0.ET: extension type (always 1 on modern CPUs).
pub const CR0_ET: u64 = 1 << 4;
/// CR0.NE: native x87 error reporting.
pub const CR0_NE: u64 = 1 << 5;
/// CR0.WP: supervisor writes honour read-only pages.
pub const CR0_WP: u64 = 1 << 16;
/// CR0.AM: alignment checking (with EFLAGS.AC at CPL3).
pub const CR0_AM: u64 = 1 << 18;
/// CR0.PG: paging.
pub const CR0_PG: u64 = 1 << 31;

/// CR4.PAE: 64-bit page-table entries.
pub const CR4_PAE: u64 = 1 << 5;
/// CR4.PGE: global pages.
pub const CR4_PGE: u64 = 1 << 7;
/// CR4.OSFXSR: SSE instructions enabled.
pub const CR4_OSFXSR: u64 = 1 << 9;
/// CR4.OSXMMEXCPT: SSE exceptions enabled.
pub const CR4_OSXMMEXCPT: u64 = 1 << 10;
/// CR4.LA57: 5-level paging.
pub const CR4_LA57: u64 = 1 << 12;

/// EFER.LME: long mode enable.
pub const EFER_LME: u64 = 1 << 8;
/// EFER.LMA: long mode active.
pub const EFER_LMA: u64 = 1 << 10;
/// EFER.NXE: no-execute enable.
pub const EFER_NXE: u64 = 1 << 11;

/// RFLAGS bit 1, which always reads as 1.
pub const RFLAGS_FIXED: u64 = 1 << 1;
/// RFLAGS.CF, the carry flag.
pub const RFLAGS_CF: u64 = 1 << 0;
/// RFLAGS.IF: maskable interrupts enabled.
pub const RFLAGS_IF: u64 = 1 << 9;
/// RFLAGS.AC: alignment check / SMAP override.
pub const RFLAGS_AC: u64 = 1 << 18;

/// #DE.
pub const VECTOR_DE: u8 = 0;
/// #UD: invalid opcode.
pub const VECTOR_UD: u8 = 6;
/// #DF: double fault.
pub const VECTOR_DF: u8 = 8;
/// #GP: general protection.
pub const VECTOR_GP: u8 = 13;
/// #PF: page fault.
pub const VECTOR_PF: u8 = 14;

/// True if the CPU pushes an error code for exceptions on `vector`.
pub const fn vector_has_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

pub use mmu_integration::shadow_host::abi::vector_name;

/// GDT selector of the ring-0 64-bit code segment.
pub const SEL_KERNEL_CODE: u16 = 0x08;
/// GDT selector of the ring-0 data segment.
pub const SEL_KERNEL_DATA: u16 = 0x10;
/// GDT selector of the ring-3 data segment (RPL 3 included).
pub const SEL_USER_DATA: u16 = 0x18 | 3;
/// GDT selector of the ring-3 64-bit code segment (RPL 3 included).
pub const SEL_USER_CODE: u16 = 0x20 | 3;
/// GDT selector of vCPU 0's TSS; vCPU `i` uses `SEL_TSS_BASE + 16 * i`.
pub const SEL_TSS_BASE: u16 = 0x28;

/// Size of a 64-bit TSS (no I/O permission bitmap).
pub const TSS_SIZE: u64 = 104;
/// Offset of RSP0 in the 64-bit TSS.
pub const TSS_RSP0_OFFSET: u64 = 4;
/// Offset of the I/O map base in the 64-bit TSS.
pub const TSS_IOMAP_OFFSET: u64 = 102;

/// Segment type: execute/read code, accessed.
const TYPE_CODE_XRA: u64 = 0xb;
/// Segment type: read/write data, accessed.
const TYPE_DATA_RWA: u64 = 0x3;
/// System type: available 64-bit TSS.
const TYPE_TSS_AVAILABLE: u64 = 0x9;
/// System type: busy 64-bit TSS.
const TYPE_TSS_BUSY: u8 = 0xb;
/// System type: 64-bit interrupt gate.
const TYPE_INTERRUPT_GATE: u64 = 0xe;

/// A flat 64-bit code segment descriptor with privilege `dpl`.
pub const fn code64_descriptor(dpl: u8) -> u64 {
    // limit 0xfffff, G=1, L=1, D=0, P=1, S=1.
    0xffff
        | (0xf << 48)
        | (TYPE_CODE_XRA << 40)
        | (1 << 44)
        | (((dpl & 3) as u64) << 45)
        | (1 << 47)
        | (1 << 53)
        | (1 << 55)
}

/// A flat data segment descriptor with privilege `dpl`.
pub const fn data_descriptor(dpl: u8) -> u64 {
    // limit 0xfffff, G=1, D/B=1, P=1, S=1.
    0xffff
        | (0xf << 48)
        | (TYPE_DATA_RWA << 40)
        | (1 << 44)
        | (((dpl & 3) as u64) << 45)
        | (1 << 47)
        | (1 << 54)
        | (1 << 55)
}

/// The 16-byte descriptor of an available 64-bit TSS at `base`.
pub const fn tss_descriptor(base: u64, limit: u32) -> [u64; 2] {
    let limit = limit as u64;
    let low = (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (TYPE_TSS_AVAILABLE << 40)
        | (1 << 47)
        | (((limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56);
    [low, base >> 32]
}

/// The 16-byte 64-bit interrupt gate to `handler` through `selector`,
/// callable by software `int` from privilege `dpl` and above.
pub const fn interrupt_gate(handler: u64, selector: u16, dpl: u8) -> [u64; 2] {
    let low = (handler & 0xffff)
        | ((selector as u64) << 16)
        | (TYPE_INTERRUPT_GATE << 40)
        | (((dpl & 3) as u64) << 45)
        | (1 << 47)
        | (((handler >> 16) & 0xffff) << 48);
    [low, handler >> 32]
}

/// The GDT entries (as 8-byte words) for `vcpus` vCPUs whose TSSs are at
/// `tss_base(i)`: null, kernel code, kernel data, user data, user code,
/// then one 16-byte TSS descriptor per vCPU.
pub fn gdt_entries(vcpus: usize, tss_base: impl Fn(usize) -> u64) -> Vec<u64> {
    let mut gdt = vec![
        0,
        code64_descriptor(0),
        data_descriptor(0),
        data_descriptor(3),
        code64_descriptor(3),
    ];
    for i in 0..vcpus {
        gdt.extend_from_slice(&tss_descriptor(tss_base(i), (TSS_SIZE - 1) as u32));
    }
    gdt
}

/// The selector of vCPU `index`'s TSS.
pub fn tss_selector(index: usize) -> u16 {
    SEL_TSS_BASE + 16 * index as u16
}

/// The 64-bit TSS image with the ring-0 stack pointer `rsp0` and no I/O
/// permission bitmap (every port is denied to CPL3 while IOPL is 0).
pub fn tss_image(rsp0: u64) -> [u8; TSS_SIZE as usize] {
    let mut tss = [0u8; TSS_SIZE as usize];
    let at = TSS_RSP0_OFFSET as usize;
    tss[at..at + 8].copy_from_slice(&rsp0.to_le_bytes());
    let at = TSS_IOMAP_OFFSET as usize;
    tss[at..at + 2].copy_from_slice(&(TSS_SIZE as u16).to_le_bytes());
    tss
}

/// KVM's view of a flat 64-bit code segment with selector `selector`.
pub fn code_segment(selector: u16) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: TYPE_CODE_XRA as u8,
        present: 1,
        dpl: (selector & 3) as u8,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// KVM's view of a flat data segment with selector `selector`.
pub fn data_segment(selector: u16) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: TYPE_DATA_RWA as u8,
        present: 1,
        dpl: (selector & 3) as u8,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// KVM's view of a loaded (busy) 64-bit TSS.
pub fn task_segment(selector: u16, base: u64) -> kvm_segment {
    kvm_segment {
        base,
        limit: (TSS_SIZE - 1) as u32,
        selector,
        type_: TYPE_TSS_BUSY,
        present: 1,
        dpl: 0,
        db: 0,
        s: 0,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// KVM's view of an empty LDT.
pub fn unusable_ldt() -> kvm_segment {
    kvm_segment {
        selector: 0,
        type_: 2,
        present: 0,
        unusable: 1,
        ..Default::default()
    }
}

/// A descriptor-table register value.
pub fn dtable(base: u64, limit: u16) -> kvm_dtable {
    kvm_dtable {
        base,
        limit,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_segments_match_the_manual() {
        // The classic values every 64-bit kernel's GDT holds.
        assert_eq!(code64_descriptor(0), 0x00af_9b00_0000_ffff);
        assert_eq!(code64_descriptor(3), 0x00af_fb00_0000_ffff);
        assert_eq!(data_descriptor(0), 0x00cf_9300_0000_ffff);
        assert_eq!(data_descriptor(3), 0x00cf_f300_0000_ffff);
    }

    #[test]
    fn tss_descriptor_splits_base_and_limit() {
        let [low, high] = tss_descriptor(0x1234_5678_9abc_def0, 0x67);
        assert_eq!(low & 0xffff, 0x67);
        assert_eq!((low >> 16) & 0xff_ffff, 0xbc_def0);
        assert_eq!((low >> 40) & 0xf, 0x9);
        assert_eq!((low >> 47) & 1, 1);
        assert_eq!(low >> 56, 0x9a);
        assert_eq!(high, 0x1234_5678);
    }

    #[test]
    fn interrupt_gate_splits_offset() {
        let [low, high] = interrupt_gate(0xffff_8000_1234_5678, SEL_KERNEL_CODE, 3);
        assert_eq!(low & 0xffff, 0x5678);
        assert_eq!((low >> 16) & 0xffff, u64::from(SEL_KERNEL_CODE));
        assert_eq!((low >> 32) & 0x7, 0, "IST 0");
        assert_eq!((low >> 40) & 0xf, 0xe);
        assert_eq!((low >> 45) & 3, 3);
        assert_eq!((low >> 47) & 1, 1);
        assert_eq!(low >> 48, 0x1234);
        assert_eq!(high, 0xffff_8000);
    }

    #[test]
    fn gdt_layout_matches_selectors() {
        let gdt = gdt_entries(2, |i| 0x3000 + 128 * i as u64);
        assert_eq!(gdt.len(), 5 + 4);
        assert_eq!(gdt[usize::from(SEL_KERNEL_CODE >> 3)], code64_descriptor(0));
        assert_eq!(gdt[usize::from(SEL_KERNEL_DATA >> 3)], data_descriptor(0));
        assert_eq!(gdt[usize::from(SEL_USER_DATA >> 3)], data_descriptor(3));
        assert_eq!(gdt[usize::from(SEL_USER_CODE >> 3)], code64_descriptor(3));
        let t1 = usize::from(tss_selector(1) >> 3);
        assert_eq!(gdt[t1..t1 + 2], tss_descriptor(0x3080, 0x67));
    }

    #[test]
    fn tss_image_has_rsp0_and_no_iomap() {
        let tss = tss_image(0xdead_beef_0000);
        assert_eq!(&tss[4..12], &0xdead_beef_0000u64.to_le_bytes());
        assert_eq!(u16::from_le_bytes([tss[102], tss[103]]), 104);
    }

    #[test]
    fn error_code_vectors() {
        let with: Vec<u8> = (0..32).filter(|&v| vector_has_error_code(v)).collect();
        assert_eq!(with, [8, 10, 11, 12, 13, 14, 17, 21, 29, 30]);
        assert_eq!(vector_name(VECTOR_PF), "#PF");
        assert_eq!(vector_name(200), "vector 200");
    }
}
