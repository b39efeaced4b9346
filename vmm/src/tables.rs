//! Building 4- and 5-level page tables on the host, before the guest runs.
//!
//! The builder allocates table frames from a pool range of guest-physical
//! memory and keeps their contents on the host until [`TableBuilder::frames`]
//! hands them over to be written into guest memory. Tables written this way
//! must be complete before the first `KVM_RUN`: once the guest runs, KVM
//! (on a host whose KVM shadows guest tables, such as PVM) does not see
//! host-side edits; later edits go through the guest kit's CPL0 code.

use std::collections::HashMap;
use std::ops::Range;

use crate::error::SetupError;
use crate::layout::{PAGE_SIZE, pte};

/// Flags of the non-leaf entries the builder creates: the most permissive,
/// so that the leaf alone decides an access.
const TABLE_FLAGS: u64 = pte::P | pte::W | pte::U | pte::A;

/// Builds page tables in a pool of guest frames.
#[derive(Debug)]
pub struct TableBuilder {
    pool: Range<u64>,
    next: u64,
    levels: u8,
    root: u64,
    frames: HashMap<u64, Box<[u64; 512]>>,
}

impl TableBuilder {
    /// A builder that allocates frames from `pool` (page aligned) for a
    /// `levels`-level (4 or 5) hierarchy; allocates the root at once.
    pub fn new(pool: Range<u64>, levels: u8) -> Result<Self, SetupError> {
        if !pool.start.is_multiple_of(PAGE_SIZE) || !(4..=5).contains(&levels) {
            return Err(SetupError::Config(format!(
                "bad table pool {:#x}..{:#x} or {levels} levels",
                pool.start, pool.end
            )));
        }
        let mut builder = Self {
            next: pool.start,
            pool,
            levels,
            root: 0,
            frames: HashMap::new(),
        };
        builder.root = builder.alloc()?;
        Ok(builder)
    }

    fn alloc(&mut self) -> Result<u64, SetupError> {
        if self.next + PAGE_SIZE > self.pool.end {
            return Err(SetupError::Config(format!(
                "page-table pool {:#x}..{:#x} is exhausted",
                self.pool.start, self.pool.end
            )));
        }
        let frame = self.next;
        self.next += PAGE_SIZE;
        self.frames.insert(frame, Box::new([0; 512]));
        Ok(frame)
    }

    /// The root table's guest-physical address (the CR3 value).
    pub fn root(&self) -> u64 {
        self.root
    }

    /// Maps the 4 KiB page at `va` to the frame `pa` with leaf flags `flags`.
    pub fn map_4k(&mut self, va: u64, pa: u64, flags: u64) -> Result<(), SetupError> {
        if !va.is_multiple_of(PAGE_SIZE) || !pa.is_multiple_of(PAGE_SIZE) {
            return Err(SetupError::Config(format!(
                "cannot map unaligned {va:#x} -> {pa:#x}"
            )));
        }
        let mut table = self.root;
        for level in (2..=self.levels).rev() {
            let index = index_at(va, level);
            let entry = self.frames[&table][index];
            table = if entry & pte::P != 0 {
                entry & pte::ADDR
            } else {
                let child = self.alloc()?;
                if let Some(frame) = self.frames.get_mut(&table) {
                    frame[index] = child | TABLE_FLAGS;
                }
                child
            };
        }
        if let Some(frame) = self.frames.get_mut(&table) {
            frame[index_at(va, 1)] = (pa & pte::ADDR) | flags;
        }
        Ok(())
    }

    /// The table frames built so far and their contents.
    pub fn frames(&self) -> impl Iterator<Item = (u64, &[u64; 512])> {
        self.frames.iter().map(|(gpa, frame)| (*gpa, &**frame))
    }

    /// Number of table frames used.
    pub fn frames_used(&self) -> usize {
        self.frames.len()
    }
}

/// The index of `va` in a level-`level` table (1 = PT, 4 = PML4, 5 = PML5).
pub fn index_at(va: u64, level: u8) -> usize {
    ((va >> (12 + 9 * (u32::from(level) - 1))) & 0x1ff) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use mmu_api::paging::{
        AccessKind, Cr4, PagingContext, PagingMode, SparseMemory, WalkError, walk,
    };
    use mmu_api::{Access, Gfn, Gpa, Gva};

    fn load(builder: &TableBuilder) -> SparseMemory {
        let mem = SparseMemory::new();
        for (gpa, frame) in builder.frames() {
            mem.add_frame(Gfn(gpa >> 12));
            for (i, v) in frame.iter().enumerate() {
                mem.write_u64(Gpa(gpa + 8 * i as u64), *v).unwrap();
            }
        }
        mem
    }

    #[test]
    fn the_reference_walker_agrees() {
        for levels in [4u8, 5] {
            let mut b = TableBuilder::new(0x10_0000..0x20_0000, levels).unwrap();
            b.map_4k(0x40_0000, 0x7000, pte::P | pte::U | pte::A)
                .unwrap();
            b.map_4k(
                0x40_1000,
                0x8000,
                pte::P | pte::W | pte::A | pte::D | pte::NX,
            )
            .unwrap();
            let mem = load(&b);
            let mode = if levels == 5 {
                PagingMode::Level5
            } else {
                PagingMode::Level4
            };
            let mut ctx =
                PagingContext::for_mode(mode, b.root(), 46, mmu_api::paging::CpuFeatures::all())
                    .unwrap();
            assert_eq!(ctx.cr4.contains(Cr4::LA57), levels == 5);

            let t = walk(
                &ctx,
                &mem,
                Gva(0x40_0123),
                Access::supervisor(AccessKind::Read),
            )
            .unwrap();
            assert_eq!(t.gpa, Gpa(0x7123));
            ctx.cpl = 3;
            // User read of a user page: fine; user write of a read-only page: #PF.
            assert!(walk(&ctx, &mem, Gva(0x40_0000), Access::user(AccessKind::Read)).is_ok());
            assert!(matches!(
                walk(&ctx, &mem, Gva(0x40_0000), Access::user(AccessKind::Write)),
                Err(WalkError::PageFault(_))
            ));
            // The second page is supervisor-only and NX.
            assert!(walk(&ctx, &mem, Gva(0x40_1000), Access::user(AccessKind::Read)).is_err());
            ctx.cpl = 0;
            let t = walk(
                &ctx,
                &mem,
                Gva(0x40_1008),
                Access::supervisor(AccessKind::Write),
            )
            .unwrap();
            assert_eq!(t.gpa, Gpa(0x8008));
            assert!(
                walk(
                    &ctx,
                    &mem,
                    Gva(0x40_1000),
                    Access::supervisor(AccessKind::Fetch)
                )
                .is_err()
            );
            // Unmapped.
            assert!(
                walk(
                    &ctx,
                    &mem,
                    Gva(0x40_2000),
                    Access::supervisor(AccessKind::Read)
                )
                .is_err()
            );
            assert_eq!(b.frames_used(), usize::from(levels));
        }
    }

    #[test]
    fn pool_exhaustion_is_an_error() {
        let mut b = TableBuilder::new(0x1000..0x4000, 4).unwrap();
        assert!(b.map_4k(0, 0, pte::P).is_err());
    }
}
