//! Guests the benches run: RAM at guest-physical 0 holding real 4-level
//! page tables, written the way a guest kernel writes them.

use std::io;

use mmu_api::paging::CpuFeatures;
use mmu_api::paging::PteFlags;
use mmu_api::{Gpa, Gva, PAGE_SIZE, PagingContext, PagingMode};

use super::memory::GuestMemory;

/// Flags of a guest table entry that links the next level: present,
/// writable, user, accessed.
pub const TABLE_FLAGS: u64 = PteFlags::PRESENT.bits()
    | PteFlags::WRITABLE.bits()
    | PteFlags::USER.bits()
    | PteFlags::ACCESSED.bits();

/// Flags of a guest 4 KiB leaf: [`TABLE_FLAGS`] and dirty. Accessed and
/// dirty are set as they are in a guest that has used its memory before, so
/// the walker changes no entry and prefetch may map neighbours.
pub const LEAF_FLAGS: u64 = TABLE_FLAGS | PteFlags::DIRTY.bits();

/// The guest's MAXPHYADDR.
pub const GUEST_MAXPHYADDR: u8 = 40;

/// Index of `gva` in a table of `level` (1: PT ... 4: PML4).
fn index(gva: Gva, level: u32) -> usize {
    ((gva.raw() >> (12 + 9 * (level - 1))) & 0x1ff) as usize
}

/// Builds a guest: page 0 is left unused, page-table pages follow from page
/// 1 (the first one is the PML4), then data pages.
#[derive(Debug)]
pub struct GuestBuilder {
    memory: &'static GuestMemory,
    root: Gpa,
    next_table: u64,
    tables_end: u64,
}

impl GuestBuilder {
    /// RAM for `table_pages` page tables (the PML4 included) and
    /// `data_pages` data pages.
    pub fn new(table_pages: u64, data_pages: u64) -> io::Result<Self> {
        assert!(table_pages > 0, "the PML4 needs a page");
        let memory = GuestMemory::new((1 + table_pages + data_pages) * PAGE_SIZE)?;
        let mut builder = GuestBuilder {
            memory,
            root: Gpa(0),
            next_table: 1,
            tables_end: 1 + table_pages,
        };
        builder.root = builder.table();
        Ok(builder)
    }

    /// A fresh (zeroed) page-table page. Panics when the table pages are
    /// used up.
    pub fn table(&mut self) -> Gpa {
        assert!(self.next_table < self.tables_end, "out of table pages");
        let gpa = Gpa(self.next_table * PAGE_SIZE);
        self.next_table += 1;
        gpa
    }

    /// The PML4.
    pub fn root(&self) -> Gpa {
        self.root
    }

    /// The guest-physical address of data page `page`.
    pub fn data_gpa(&self, page: u64) -> Gpa {
        let gpa = Gpa((self.tables_end + page) * PAGE_SIZE);
        assert!(
            gpa.raw() < self.memory.size(),
            "data page {page} outside RAM"
        );
        gpa
    }

    /// Entry `index` of the table at `table`.
    pub fn entry(&self, table: Gpa, index: usize) -> u64 {
        self.memory.read_u64(table.raw() + 8 * index as u64)
    }

    /// Writes entry `index` of the table at `table`.
    pub fn set_entry(&self, table: Gpa, index: usize, value: u64) {
        assert!(index < 512);
        self.memory.write_u64(table.raw() + 8 * index as u64, value);
    }

    /// The table at `level` (3: PDPT, 2: PD, 1: PT) on the path to `gva`,
    /// created (linked with [`TABLE_FLAGS`]) if missing.
    pub fn table_for(&mut self, gva: Gva, level: u32) -> Gpa {
        assert!((1..=3).contains(&level));
        let mut table = self.root;
        for l in (level + 1..=4).rev() {
            let i = index(gva, l);
            let e = self.entry(table, i);
            table = if e & PteFlags::PRESENT.bits() != 0 {
                Gpa(e & 0x000f_ffff_ffff_f000)
            } else {
                let t = self.table();
                self.set_entry(table, i, t.raw() | TABLE_FLAGS);
                t
            };
        }
        table
    }

    /// Maps the 4 KiB page at `gva` to `gpa` with [`LEAF_FLAGS`].
    pub fn map(&mut self, gva: Gva, gpa: Gpa) {
        let pt = self.table_for(gva, 1);
        self.set_entry(pt, index(gva, 1), gpa.raw() | LEAF_FLAGS);
    }

    /// The finished guest.
    pub fn finish(self) -> Guest {
        Guest {
            memory: self.memory,
            cr3: self.root,
        }
    }
}

/// A guest: its RAM (one memslot at guest-physical 0) and its CR3.
#[derive(Debug, Clone, Copy)]
pub struct Guest {
    memory: &'static GuestMemory,
    cr3: Gpa,
}

impl Guest {
    /// `data_pages` data pages mapped linearly at guest-virtual 0, each
    /// to its own guest frame, through 4 KiB pages.
    pub fn linear(data_pages: u64) -> io::Result<Guest> {
        let tables = 2 + data_pages.div_ceil(512 * 512) + data_pages.div_ceil(512);
        let mut b = GuestBuilder::new(tables, data_pages)?;
        for i in 0..data_pages {
            let gpa = b.data_gpa(i);
            b.map(Gva(i * PAGE_SIZE), gpa);
        }
        Ok(b.finish())
    }

    /// The guest's RAM.
    pub fn memory(&self) -> &'static GuestMemory {
        self.memory
    }

    /// The guest's CR3 (its PML4).
    pub fn cr3(&self) -> Gpa {
        self.cr3
    }

    /// 4-level paging with this guest's CR3, NX on, CPL 0.
    pub fn context(&self) -> PagingContext {
        PagingContext::for_mode(
            PagingMode::Level4,
            self.cr3.raw(),
            GUEST_MAXPHYADDR,
            CpuFeatures::all(),
        )
        .expect("a valid 4-level context")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mmu_api::paging::walk;
    use mmu_api::{Access, AccessKind, AccessMode, Gfn, HostBacking, Hpa, Memslot, MemslotFlags};
    use mmu_api::{MemslotTable, SlotId, paging::SlotMemory};

    #[test]
    fn linear_guest_translates_like_the_reference_walker_says() {
        let guest = Guest::linear(1000).unwrap();
        let mut table = MemslotTable::new(GUEST_MAXPHYADDR, 8);
        let mem = guest.memory();
        table
            .set(Memslot::new(
                SlotId(0),
                Gpa(0),
                mem.size(),
                HostBacking {
                    hpa: Hpa(0x10_0000_0000),
                    host_addr: mem.host_addr(),
                },
                MemslotFlags::empty(),
            ))
            .unwrap();
        // SAFETY: the slot points into `GuestMemory`, which is never unmapped.
        let port = unsafe { SlotMemory::new(&table) };
        let access = Access {
            kind: AccessKind::Write,
            mode: AccessMode::User,
        };
        let first = walk(&guest.context(), &port, Gva(0), access).unwrap().gpa;
        let last = walk(&guest.context(), &port, Gva(999 * PAGE_SIZE + 8), access)
            .unwrap()
            .gpa;
        assert_eq!(last.raw() - first.raw(), 999 * PAGE_SIZE + 8);
        assert_eq!(first.gfn(), Gfn(mem.pages() - 1000));
    }
}
