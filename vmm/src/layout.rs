//! Where everything lives in guest-physical memory, and how the VMM's
//! identity page tables map it.
//!
//! Guest-physical memory is one block starting at 0. The VMM identity-maps
//! all of it (guest-virtual == guest-physical) with 4 KiB pages, so every
//! address below is both a GPA and a GVA:
//!
//! | range | what | mapping |
//! | --- | --- | --- |
//! | page 0 | guard | not present |
//! | [`GDT_GPA`] | GDT | supervisor, RW, NX |
//! | [`IDT_GPA`] | IDT (256 gates) | supervisor, RW, NX |
//! | [`TSS_GPA`] | one 128-byte slot per vCPU | supervisor, RW, NX |
//! | [`KERNEL_CODE_GPA`] | the guest kit's kernel | supervisor, RO, X |
//! | [`PROGRAM_CODE_GPA`] | the program being run | user, RO, X |
//! | [`PERCPU_GPA`] + i * [`PERCPU_STRIDE`] | vCPU i: kernel page, replay queue, kernel stack, then its user stack | kernel part supervisor RW NX, user stack user RW NX |
//! | [`Layout::page_tables`] | the identity tables | supervisor, RW, NX |
//! | [`Layout::data`] | workload data, up to the end of memory | user, RW, NX |
//!
//! A/D bits are preset in every entry the VMM writes.

use std::ops::Range;

use crate::error::SetupError;

/// Base page size.
pub const PAGE_SIZE: u64 = 4096;
/// 2 MiB.
pub const MIB2: u64 = 2 << 20;

/// The GDT.
pub const GDT_GPA: u64 = 0x1000;
/// The IDT.
pub const IDT_GPA: u64 = 0x2000;
/// The TSSs, one [`TSS_STRIDE`]-byte slot per vCPU.
pub const TSS_GPA: u64 = 0x3000;
/// Bytes between two vCPUs' TSSs.
pub const TSS_STRIDE: u64 = 128;
/// Most vCPUs a VM may have (the TSS page holds this many).
pub const MAX_VCPUS: usize = (PAGE_SIZE / TSS_STRIDE) as usize;
/// The guest kit's kernel code.
pub const KERNEL_CODE_GPA: u64 = 0x1_0000;
/// Bytes reserved for the kernel code.
pub const KERNEL_CODE_SIZE: u64 = 0x1_0000;
/// The program (workload) code.
pub const PROGRAM_CODE_GPA: u64 = 0x2_0000;
/// Bytes reserved for program code.
pub const PROGRAM_CODE_SIZE: u64 = 0x4_0000;
/// The first vCPU's per-vCPU area.
pub const PERCPU_GPA: u64 = 0x10_0000;
/// Bytes per vCPU: the kernel part, then the user stack.
pub const PERCPU_STRIDE: u64 = 2 * KERNEL_AREA_SIZE;
/// Size (and alignment) of a vCPU's kernel part: the kernel page, the
/// replay queue page, then the kernel stack up to the end. The kernel finds
/// its per-vCPU page by rounding RSP down to this size.
pub const KERNEL_AREA_SIZE: u64 = 0x8000;
/// Offset of the replay queue page inside the kernel part.
pub const REPLAY_QUEUE_OFFSET: u64 = PAGE_SIZE;
/// Offset of the user stack inside a per-vCPU area.
pub const USER_STACK_OFFSET: u64 = KERNEL_AREA_SIZE;
/// Size of a user stack.
pub const USER_STACK_SIZE: u64 = PERCPU_STRIDE - USER_STACK_OFFSET;

/// Page-table entry bits the VMM uses.
pub mod pte {
    /// Present.
    pub const P: u64 = 1 << 0;
    /// Writable.
    pub const W: u64 = 1 << 1;
    /// User.
    pub const U: u64 = 1 << 2;
    /// Accessed.
    pub const A: u64 = 1 << 5;
    /// Dirty.
    pub const D: u64 = 1 << 6;
    /// Execute disable.
    pub const NX: u64 = 1 << 63;
    /// The address bits of a 4 KiB-aligned frame (MAXPHYADDR 52).
    pub const ADDR: u64 = 0x000f_ffff_ffff_f000;
}

/// How a range of guest memory is mapped by the identity tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protection {
    /// Not mapped at all.
    Unmapped,
    /// Supervisor read/write, no execute.
    KernelData,
    /// Supervisor read-only, executable.
    KernelCode,
    /// User read-only, executable.
    UserCode,
    /// User read/write, no execute.
    UserData,
}

impl Protection {
    /// The leaf-entry flag bits (without the frame address).
    pub const fn leaf_flags(self) -> u64 {
        use pte::*;
        match self {
            Protection::Unmapped => 0,
            Protection::KernelData => P | W | A | D | NX,
            Protection::KernelCode => P | A | D,
            Protection::UserCode => P | U | A | D,
            Protection::UserData => P | W | U | A | D | NX,
        }
    }
}

/// The guest-physical layout of one VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    mem_size: u64,
    vcpus: usize,
    levels: u8,
    page_tables: Range<u64>,
    data: Range<u64>,
}

impl Layout {
    /// The layout for `vcpus` vCPUs and `mem_size` bytes of memory, mapped
    /// with `levels` (4 or 5) levels of tables.
    pub fn new(vcpus: usize, mem_size: u64, levels: u8) -> Result<Self, SetupError> {
        if vcpus == 0 || vcpus > MAX_VCPUS {
            return Err(SetupError::Config(format!(
                "{vcpus} vCPUs requested; 1..={MAX_VCPUS} are supported"
            )));
        }
        if !(4..=5).contains(&levels) {
            return Err(SetupError::Config(format!(
                "{levels}-level paging requested; 4 or 5 are supported"
            )));
        }
        if !mem_size.is_multiple_of(MIB2) {
            return Err(SetupError::Config(format!(
                "memory size {mem_size:#x} is not a multiple of 2 MiB"
            )));
        }
        let percpu_end = PERCPU_GPA + vcpus as u64 * PERCPU_STRIDE;
        let pt_base = percpu_end.next_multiple_of(PAGE_SIZE);
        let pt_pages = Self::table_pages(mem_size, levels);
        let pt_end = pt_base + pt_pages * PAGE_SIZE;
        let data_base = pt_end.next_multiple_of(MIB2);
        if data_base >= mem_size {
            return Err(SetupError::Config(format!(
                "memory size {mem_size:#x} leaves no data area (it starts at {data_base:#x})"
            )));
        }
        Ok(Self {
            mem_size,
            vcpus,
            levels,
            page_tables: pt_base..pt_end,
            data: data_base..mem_size,
        })
    }

    /// Table pages needed to identity-map `mem_size` bytes with 4 KiB pages.
    fn table_pages(mem_size: u64, levels: u8) -> u64 {
        let pts = mem_size.div_ceil(MIB2);
        let pds = mem_size.div_ceil(1 << 30);
        let pdpts = mem_size.div_ceil(1 << 39);
        let pml4s = if levels == 5 {
            mem_size.div_ceil(1 << 48)
        } else {
            0
        };
        1 + pml4s + pdpts + pds + pts
    }

    /// Guest memory size in bytes.
    pub fn mem_size(&self) -> u64 {
        self.mem_size
    }

    /// Number of vCPUs.
    pub fn vcpus(&self) -> usize {
        self.vcpus
    }

    /// Paging levels of the identity tables (4 or 5).
    pub fn levels(&self) -> u8 {
        self.levels
    }

    /// The page-table pool.
    pub fn page_tables(&self) -> Range<u64> {
        self.page_tables.clone()
    }

    /// The workload data area: user RW, up to the end of memory.
    pub fn data(&self) -> Range<u64> {
        self.data.clone()
    }

    /// The `index`-th of `parts` equal, page-aligned slices of the data area.
    pub fn data_slice(&self, index: usize, parts: usize) -> Range<u64> {
        let pages = (self.data.end - self.data.start) / PAGE_SIZE / parts.max(1) as u64;
        let start = self.data.start + index as u64 * pages * PAGE_SIZE;
        start..start + pages * PAGE_SIZE
    }

    /// vCPU `index`'s TSS.
    pub fn tss(&self, index: usize) -> u64 {
        TSS_GPA + index as u64 * TSS_STRIDE
    }

    /// vCPU `index`'s kernel page (the base of its kernel part).
    pub fn kernel_page(&self, index: usize) -> u64 {
        PERCPU_GPA + index as u64 * PERCPU_STRIDE
    }

    /// vCPU `index`'s replay queue page.
    pub fn replay_queue(&self, index: usize) -> u64 {
        self.kernel_page(index) + REPLAY_QUEUE_OFFSET
    }

    /// The top of vCPU `index`'s kernel stack (its TSS RSP0).
    pub fn kernel_stack_top(&self, index: usize) -> u64 {
        self.kernel_page(index) + KERNEL_AREA_SIZE
    }

    /// The top of vCPU `index`'s user stack.
    pub fn user_stack_top(&self, index: usize) -> u64 {
        self.kernel_page(index) + PERCPU_STRIDE
    }

    /// How the page at `gpa` is mapped.
    pub fn protection(&self, gpa: u64) -> Protection {
        let in_range = |base: u64, size: u64| (base..base + size).contains(&gpa);
        if gpa < GDT_GPA || gpa >= self.mem_size {
            Protection::Unmapped
        } else if in_range(KERNEL_CODE_GPA, KERNEL_CODE_SIZE) {
            Protection::KernelCode
        } else if in_range(PROGRAM_CODE_GPA, PROGRAM_CODE_SIZE) {
            Protection::UserCode
        } else if gpa >= PERCPU_GPA && gpa < PERCPU_GPA + self.vcpus as u64 * PERCPU_STRIDE {
            if (gpa - PERCPU_GPA) % PERCPU_STRIDE >= USER_STACK_OFFSET {
                Protection::UserData
            } else {
                Protection::KernelData
            }
        } else if self.data.contains(&gpa) {
            Protection::UserData
        } else {
            Protection::KernelData
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_do_not_overlap() {
        let l = Layout::new(4, 64 << 20, 4).unwrap();
        const {
            assert!(KERNEL_CODE_GPA >= TSS_GPA + PAGE_SIZE);
            assert!(PROGRAM_CODE_GPA >= KERNEL_CODE_GPA + KERNEL_CODE_SIZE);
            assert!(PERCPU_GPA >= PROGRAM_CODE_GPA + PROGRAM_CODE_SIZE);
        }
        assert!(l.page_tables().start >= l.user_stack_top(3));
        assert!(l.data().start >= l.page_tables().end);
        assert_eq!(l.data().end, 64 << 20);
        assert!(l.kernel_page(1).is_multiple_of(KERNEL_AREA_SIZE));
    }

    #[test]
    fn protections() {
        let l = Layout::new(2, 32 << 20, 4).unwrap();
        assert_eq!(l.protection(0), Protection::Unmapped);
        assert_eq!(l.protection(GDT_GPA), Protection::KernelData);
        assert_eq!(l.protection(KERNEL_CODE_GPA), Protection::KernelCode);
        assert_eq!(l.protection(PROGRAM_CODE_GPA + 8), Protection::UserCode);
        assert_eq!(l.protection(l.kernel_page(1)), Protection::KernelData);
        assert_eq!(
            l.protection(l.kernel_stack_top(1) - 8),
            Protection::KernelData
        );
        assert_eq!(l.protection(l.user_stack_top(1) - 8), Protection::UserData);
        assert_eq!(l.protection(l.page_tables().start), Protection::KernelData);
        assert_eq!(l.protection(l.data().start), Protection::UserData);
        assert_eq!(l.protection(32 << 20), Protection::Unmapped);
    }

    #[test]
    fn slices_split_the_data_area() {
        let l = Layout::new(2, 32 << 20, 4).unwrap();
        let a = l.data_slice(0, 2);
        let b = l.data_slice(1, 2);
        assert_eq!(a.end, b.start);
        assert!(b.end <= l.data().end);
        assert!(a.start.is_multiple_of(PAGE_SIZE));
    }

    #[test]
    fn bad_configs_are_rejected() {
        assert!(Layout::new(0, 32 << 20, 4).is_err());
        assert!(Layout::new(MAX_VCPUS + 1, 32 << 20, 4).is_err());
        assert!(Layout::new(1, (32 << 20) + 4096, 4).is_err());
        assert!(Layout::new(1, 2 << 20, 4).is_err());
        assert!(Layout::new(1, 32 << 20, 3).is_err());
    }
}
