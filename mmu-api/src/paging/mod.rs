//! The x86 guest paging model: registers, modes, entry bits, accesses, and
//! the reference walker every backend translates with.

mod access;
mod context;
mod entry;
mod mem;
mod slot_mem;
mod walker;

pub use access::{Access, AccessKind, AccessMode, PfErrorCode, Rights};
pub use context::{
    CpuFeatures, Cr0, Cr4, Efer, MAX_MAXPHYADDR, MIN_MAXPHYADDR, PagingContext, PagingMode,
};
pub use entry::{GuestPte, PKEY_MASK, PKEY_SHIFT, PteFlags};
pub use mem::{GuestPhysMemory, PhysMemError, SparseMemory, write_bytes};
pub use slot_mem::SlotMemory;
pub use walker::{
    MAX_AD_RETRIES, PageFault, PageSize, RangeSegment, Translation, WalkError, WalkOptions,
    WalkStep, permission_fault, translate_range, walk, walk_with,
};
