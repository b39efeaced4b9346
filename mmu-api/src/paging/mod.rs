//! The x86 guest paging model: registers, modes, entry bits, accesses, and
//! the reference walker every backend translates with.

mod access;
mod context;
mod entry;
mod mem;
mod slot_mem;
#[cfg(any(test, feature = "test-utils"))]
mod sparse;
mod walker;

pub use access::{Access, AccessKind, AccessMode, PfErrorCode, Rights};
pub use context::{
    CpuFeatures, CpuidLeaf, Cr0, Cr4, Efer, MAX_MAXPHYADDR, MIN_MAXPHYADDR, PagingContext,
    PagingMode,
};
pub use entry::{GuestPte, PKEY_MASK, PKEY_SHIFT, PteFlags};
pub use mem::{GuestPhysMemory, PhysMemError, write_bytes};
pub use slot_mem::SlotMemory;
#[cfg(any(test, feature = "test-utils"))]
pub use sparse::SparseMemory;
pub use walker::{
    MAX_AD_RETRIES, PageFault, PageSize, RangeSegment, Translation, WalkError, WalkOptions,
    WalkStep, permission_fault, translate_range, walk, walk_with,
};
