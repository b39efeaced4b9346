//! What kind of memory access is being translated, and the #PF error code.

use bitflags::bitflags;

use super::context::PagingContext;

/// Read, write or instruction fetch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AccessKind {
    /// A data read.
    Read,
    /// A data write.
    Write,
    /// An instruction fetch.
    Fetch,
}

/// Who makes the access, in the architecture's terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AccessMode {
    /// A user-mode access: an explicit access made at CPL 3.
    User,
    /// An explicit supervisor-mode access: made at CPL 0, 1 or 2. Under
    /// SMAP, EFLAGS.AC lets it reach user pages.
    Supervisor,
    /// An implicit supervisor-mode access, at any CPL: the CPU reading or
    /// writing system structures (GDT, IDT, TSS). SMAP always applies;
    /// EFLAGS.AC is ignored.
    ImplicitSupervisor,
}

/// One memory access to translate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Access {
    /// Read, write or fetch.
    pub kind: AccessKind,
    /// User, supervisor or implicit supervisor.
    pub mode: AccessMode,
}

impl Access {
    /// An explicit access made at the context's CPL.
    pub fn at_cpl(kind: AccessKind, ctx: &PagingContext) -> Self {
        let mode = if ctx.cpl == 3 {
            AccessMode::User
        } else {
            AccessMode::Supervisor
        };
        Access { kind, mode }
    }

    /// A user-mode access.
    pub const fn user(kind: AccessKind) -> Self {
        Access {
            kind,
            mode: AccessMode::User,
        }
    }

    /// An explicit supervisor-mode access.
    pub const fn supervisor(kind: AccessKind) -> Self {
        Access {
            kind,
            mode: AccessMode::Supervisor,
        }
    }

    /// True for writes.
    pub const fn is_write(self) -> bool {
        matches!(self.kind, AccessKind::Write)
    }

    /// True for instruction fetches.
    pub const fn is_fetch(self) -> bool {
        matches!(self.kind, AccessKind::Fetch)
    }

    /// True for user-mode accesses.
    pub const fn is_user(self) -> bool {
        matches!(self.mode, AccessMode::User)
    }
}

bitflags! {
    /// The error code the CPU pushes with a #PF.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct PfErrorCode: u32 {
        /// P: 0 for a not-present entry, 1 for a protection violation
        /// (including a reserved bit).
        const PRESENT = 1 << 0;
        /// W/R: the access was a write.
        const WRITE = 1 << 1;
        /// U/S: the access was a user-mode access.
        const USER = 1 << 2;
        /// RSVD: a reserved bit was set in some paging-structure entry.
        const RSVD = 1 << 3;
        /// I/D: the access was an instruction fetch and either NX is
        /// enabled in a PAE-format mode or SMEP is on.
        const FETCH = 1 << 4;
        /// PK: a protection key denied the data access.
        const PK = 1 << 5;
    }
}

/// Rights granted by a whole walk: the AND of every level (and no level with
/// XD for executable).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Rights {
    /// Writes allowed by R/W at every level.
    pub write: bool,
    /// User-mode accesses allowed by U/S at every level.
    pub user: bool,
    /// Fetches allowed: XD clear at every level (always true without NX).
    pub exec: bool,
}

impl Rights {
    /// Everything allowed (what no paging gives).
    pub const ALL: Rights = Rights {
        write: true,
        user: true,
        exec: true,
    };
}
