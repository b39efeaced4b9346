//! Workload address spaces: page tables the VMM builds in guest memory for
//! a workload, next to the identity tables, before the guest first uses
//! them.
//!
//! A workload's root is a copy of the identity root, so the kernel, the
//! program and the stacks stay mapped; the workload's own mappings live in
//! PML4 slots the identity tables leave empty (above the end of memory).
//! Tables on a mapping's path that the identity tables own are copied
//! first, so the identity tables are never changed.
//!
//! Entries the builder writes have A and D clear (unless the caller's
//! flags set them): the bits the guest's accesses then set are what the
//! differential runner compares between backends.
//!
//! The builder writes guest memory from the host. That is only seen by a
//! KVM that shadows guest tables (PVM) for frames it has not shadowed yet,
//! so build before the frames are first used as tables: before the run
//! that loads the root. Later edits go through the guest's CPL0 code (the
//! STORE and SWAP_ENTRIES system calls).

use std::ops::Range;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{PAGE_SIZE, pte};
use crate::tables::index_at;
use crate::vm::Vm;

/// Flags of the non-leaf entries the builder creates: the most permissive
/// (the leaf decides an access), A clear.
pub const TABLE_FLAGS: u64 = pte::P | pte::W | pte::U;

/// PS: a large page at level 2 or 3.
const PS: u64 = 1 << 7;

/// Why a table could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SpaceError {
    /// The frames set aside for tables are used up.
    #[error("the table pool {start:#x}..{end:#x} is exhausted")]
    PoolExhausted {
        /// First frame of the pool.
        start: u64,
        /// End of the pool.
        end: u64,
    },
    /// An address or the pool is not 4 KiB aligned.
    #[error("cannot map unaligned {gva:#x} -> {gpa:#x}")]
    Unaligned {
        /// The guest-virtual address.
        gva: u64,
        /// The guest-physical address.
        gpa: u64,
    },
    /// A large page already maps the address.
    #[error("{gva:#x} is already mapped by a large page at level {level}")]
    LargePage {
        /// The guest-virtual address.
        gva: u64,
        /// The level of the large page.
        level: u8,
    },
    /// A level outside 1..=levels.
    #[error("no level {level} in {levels}-level paging")]
    Level {
        /// The level asked for.
        level: u8,
        /// The paging levels.
        levels: u8,
    },
    /// Guest memory could not be read or written.
    #[error("cannot access guest memory")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// Builds workload page tables in a pool of guest frames (see the module
/// docs).
#[derive(Debug)]
pub struct SpaceBuilder<'a> {
    memory: &'a GuestMemoryMmap,
    identity_root: u64,
    levels: u8,
    pool: Range<u64>,
    next: u64,
}

impl<'a> SpaceBuilder<'a> {
    /// A builder for `vm`'s guest that allocates table frames from `pool`
    /// (page aligned, inside guest memory, unused by anything else).
    pub fn new(vm: &'a Vm, pool: Range<u64>) -> Result<Self, SpaceError> {
        if !pool.start.is_multiple_of(PAGE_SIZE) {
            return Err(SpaceError::Unaligned {
                gva: pool.start,
                gpa: pool.start,
            });
        }
        Ok(SpaceBuilder {
            memory: vm.memory(),
            identity_root: vm.root(),
            levels: vm.layout().levels(),
            next: pool.start,
            pool,
        })
    }

    /// Table frames needed, at most, to map `pages` consecutive 4 KiB pages
    /// from the start of an empty PML4 slot of a fresh root: the root, a
    /// copied PML4 under 5-level paging, then the new PDPT, PDs and PTs.
    pub fn frames_for(pages: u64, levels: u8) -> u64 {
        let copies = if levels == 5 { 2 } else { 1 };
        copies + 1 + pages.div_ceil(512 * 512) + pages.div_ceil(512)
    }

    /// Frames allocated so far.
    pub fn frames_used(&self) -> u64 {
        (self.next - self.pool.start) / PAGE_SIZE
    }

    fn read(&self, gpa: u64) -> Result<u64, SpaceError> {
        Ok(self.memory.read_obj(GuestAddress(gpa))?)
    }

    fn write(&self, gpa: u64, value: u64) -> Result<(), SpaceError> {
        Ok(self.memory.write_obj(value, GuestAddress(gpa))?)
    }

    /// A zeroed frame from the pool, or a copy of `from`.
    fn alloc(&mut self, from: Option<u64>) -> Result<u64, SpaceError> {
        if self.next + PAGE_SIZE > self.pool.end {
            return Err(SpaceError::PoolExhausted {
                start: self.pool.start,
                end: self.pool.end,
            });
        }
        let frame = self.next;
        let mut bytes = vec![0u8; PAGE_SIZE as usize];
        if let Some(source) = from {
            self.memory.read_slice(&mut bytes, GuestAddress(source))?;
        }
        self.memory.write_slice(&bytes, GuestAddress(frame))?;
        self.next += PAGE_SIZE;
        Ok(frame)
    }

    fn owns(&self, frame: u64) -> bool {
        (self.pool.start..self.next).contains(&frame)
    }

    /// A new root: a copy of the identity root (everything the identity
    /// tables map stays mapped, through the identity's own tables).
    pub fn fork_identity(&mut self) -> Result<u64, SpaceError> {
        self.alloc(Some(self.identity_root))
    }

    /// The guest-physical address of the level-`level` entry on `gva`'s
    /// path under `root`, creating (or copying from the identity tables)
    /// every table above it.
    pub fn entry(&mut self, root: u64, gva: u64, level: u8) -> Result<u64, SpaceError> {
        if level == 0 || level > self.levels {
            return Err(SpaceError::Level {
                level,
                levels: self.levels,
            });
        }
        let mut table = root;
        for above in ((level + 1)..=self.levels).rev() {
            let entry_gpa = table + 8 * index_at(gva, above) as u64;
            let entry = self.read(entry_gpa)?;
            table = if entry & pte::P == 0 {
                let child = self.alloc(None)?;
                self.write(entry_gpa, child | TABLE_FLAGS)?;
                child
            } else if above <= 3 && entry & PS != 0 {
                return Err(SpaceError::LargePage { gva, level: above });
            } else if self.owns(entry & pte::ADDR) {
                entry & pte::ADDR
            } else {
                let copy = self.alloc(Some(entry & pte::ADDR))?;
                self.write(entry_gpa, copy | (entry & !pte::ADDR))?;
                copy
            };
        }
        Ok(table + 8 * index_at(gva, level) as u64)
    }

    /// Maps the 4 KiB page at `gva` to `gpa` under `root` with leaf flags
    /// `flags`. Returns where the leaf entry lives.
    pub fn map_4k(&mut self, root: u64, gva: u64, gpa: u64, flags: u64) -> Result<u64, SpaceError> {
        if !gva.is_multiple_of(PAGE_SIZE) || !gpa.is_multiple_of(PAGE_SIZE) {
            return Err(SpaceError::Unaligned { gva, gpa });
        }
        let leaf = self.entry(root, gva, 1)?;
        self.write(leaf, (gpa & pte::ADDR) | flags)?;
        Ok(leaf)
    }

    /// Replaces the flags of the (present) level-`level` entry on `gva`'s
    /// path under `root`, keeping its address. Returns where it lives.
    pub fn set_flags(
        &mut self,
        root: u64,
        gva: u64,
        level: u8,
        flags: u64,
    ) -> Result<u64, SpaceError> {
        let at = self.entry(root, gva, level)?;
        let entry = self.read(at)?;
        self.write(at, (entry & pte::ADDR) | flags)?;
        Ok(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_bounds_cover_the_tables_a_window_needs() {
        // 4-level: root, PDPT, PD, PT.
        assert_eq!(SpaceBuilder::frames_for(1, 4), 4);
        assert_eq!(SpaceBuilder::frames_for(512, 4), 4);
        assert_eq!(SpaceBuilder::frames_for(513, 4), 5);
        // 5-level copies the PML4 too.
        assert_eq!(SpaceBuilder::frames_for(1, 5), 5);
        assert_eq!(SpaceBuilder::frames_for(512 * 512 + 1, 4), 2 + 2 + 513);
    }
}
