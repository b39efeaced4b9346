//! Typed errors, one enum per concern.

use core::fmt;
use core::hash::{Hash, Hasher};
use std::sync::Arc;

use crate::addr::{Gpa, SlotId, VcpuId};

/// A paging context that no CPU can be in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum ContextError {
    /// MAXPHYADDR outside 32..=52.
    #[error("MAXPHYADDR {0} is outside 32..=52")]
    MaxPhyAddr(u8),
    /// CPL above 3.
    #[error("CPL {0} is above 3")]
    Cpl(u8),
    /// CR0.PG without CR0.PE.
    #[error("CR0.PG is set without CR0.PE")]
    PagingWithoutProtection,
    /// EFER.LMA without CR0.PG and CR4.PAE.
    #[error("EFER.LMA is set without CR0.PG and CR4.PAE")]
    LongModeWithoutPae,
    /// CR4.LA57 with paging on but outside long mode.
    #[error("CR4.LA57 is set with paging outside long mode")]
    La57OutsideLongMode,
    /// A control bit whose CPUID feature the vCPU does not have.
    #[error("{0} is set but the vCPU lacks the feature")]
    MissingFeature(&'static str),
}

/// A memslot operation the backend refuses.
#[derive(Clone, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum MemslotError {
    /// Size zero.
    #[error("{0} has size zero")]
    ZeroSize(SlotId),
    /// Base, size or backing not 4 KiB aligned.
    #[error("{0} is not 4 KiB aligned")]
    Unaligned(SlotId),
    /// Base + size beyond the guest-physical address width.
    #[error("{slot} ends at {end:#x}, beyond the {width}-bit guest-physical space")]
    TooLarge {
        /// The slot.
        slot: SlotId,
        /// Its end (exclusive), saturated.
        end: u64,
        /// The guest-physical address width in bits.
        width: u8,
    },
    /// The range overlaps another slot.
    #[error("{slot} overlaps {other} at {at}")]
    Overlap {
        /// The slot being set.
        slot: SlotId,
        /// The slot already there.
        other: SlotId,
        /// First overlapping guest-physical address.
        at: Gpa,
    },
    /// A live slot may move or change flags, not both, and never change
    /// its size or backing.
    #[error("{0} cannot change that way: delete and re-add it")]
    IllegalChange(SlotId),
    /// No slot with this id.
    #[error("{0} does not exist")]
    UnknownSlot(SlotId),
    /// Dirty logging is not enabled on the slot.
    #[error("{0} does not log dirty pages")]
    NotLogging(SlotId),
    /// The backing overlaps memory the backend owns (the shadow page pool).
    #[error("{0} overlaps memory the MMU backend owns")]
    OverlapsBackend(SlotId),
    /// The backend holds its maximum number of slots.
    #[error("the backend already holds {0} memslots")]
    TooManySlots(usize),
    /// The host backing is null or its frame address wraps.
    #[error("{0} has an invalid host backing")]
    InvalidBacking(SlotId),
    /// The host-side hypervisor refused the change.
    #[error("the hypervisor refused the memslot change")]
    Hypervisor(#[source] HypervisorError),
}

/// An error from the host-side hypervisor, kept whole (with its own
/// source chain and, for a failed system call, its errno) and cheap to
/// clone.
///
/// Two values compare equal when they are the same error or print the
/// same text.
#[derive(Clone)]
pub struct HypervisorError(Arc<dyn std::error::Error + Send + Sync + 'static>);

impl HypervisorError {
    /// Wraps `error`.
    pub fn new(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self(Arc::new(error))
    }

    /// The OS error number, when the hypervisor's error or one of its
    /// sources is a [`std::io::Error`] from a failed system call (ioctl).
    pub fn raw_os_error(&self) -> Option<i32> {
        let mut error: Option<&(dyn std::error::Error + 'static)> = Some(&*self.0);
        while let Some(e) = error {
            if let Some(errno) = e
                .downcast_ref::<std::io::Error>()
                .and_then(std::io::Error::raw_os_error)
            {
                return Some(errno);
            }
            error = e.source();
        }
        None
    }

    /// The error itself, e.g. to downcast to the hypervisor crate's type.
    pub fn get_ref(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.0
    }
}

impl fmt::Debug for HypervisorError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for HypervisorError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&*self.0, f)
    }
}

impl std::error::Error for HypervisorError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

impl PartialEq for HypervisorError {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.to_string() == other.to_string()
    }
}

impl Eq for HypervisorError {}

impl Hash for HypervisorError {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.to_string().hash(state);
    }
}

/// Errors from backend-wide operations.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// A memslot operation failed.
    #[error(transparent)]
    Memslot(#[from] MemslotError),
    /// A vCPU with this id was already created.
    #[error("{0} already exists")]
    VcpuExists(VcpuId),
    /// The page limit is below what the backend needs to make progress.
    #[error("page limit {requested} is below the minimum of {minimum}")]
    PageLimitTooLow {
        /// What the caller asked for.
        requested: u64,
        /// The smallest limit that works.
        minimum: u64,
    },
    /// The backend does not implement this operation.
    #[error("the {backend} backend does not support {what}")]
    Unsupported {
        /// Backend name.
        backend: &'static str,
        /// What was asked.
        what: &'static str,
    },
}

/// Errors from a vCPU's MMU operations.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VcpuError {
    /// The paging context is impossible.
    #[error("invalid paging context")]
    Context(#[from] ContextError),
    /// Guest memory the operation needs is not backed.
    #[error("guest-physical address {0} is not backed by a memslot")]
    Unbacked(Gpa),
    /// The guest-physical address lies in a read-only memslot.
    #[error("guest-physical address {0} is in a read-only memslot")]
    ReadOnly(Gpa),
    /// An emulated access crosses a page boundary.
    #[error("an emulated access of {len} bytes at {gpa} crosses a page")]
    CrossesPage {
        /// Where it starts.
        gpa: Gpa,
        /// Its length.
        len: usize,
    },
    /// The guest walk ended in an error the backend has no answer for.
    #[error("the guest page-table walk failed")]
    Walk(#[source] crate::paging::WalkError),
    /// The backend could not allocate a table page even after reclaim.
    #[error("no shadow page could be allocated after reclaim")]
    OutOfPages,
}
