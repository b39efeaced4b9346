//! Errors of the exit handler.

use mmu_api::{Gpa, VcpuError};

use crate::bus::{BusError, Direction};

/// An exit the handler could not complete.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExitError {
    /// The vCPU's MMU refused an operation (an invalid paging context, an
    /// emulated write to memory that is not there or is read-only).
    #[error("the MMU refused the operation")]
    Mmu(#[from] VcpuError),
    /// The device bus (or guest memory behind it) failed an access.
    #[error("the device bus failed an MMIO {direction} of {len} bytes at {gpa}")]
    Bus {
        /// Where.
        gpa: Gpa,
        /// Read or write.
        direction: Direction,
        /// Access size in bytes.
        len: usize,
        /// What the bus said.
        #[source]
        source: BusError,
    },
    /// The guest fetched an instruction from a guest-physical address
    /// without memory; there is nothing to execute.
    #[error("the guest fetched an instruction from {0}, which has no memory")]
    FetchFromMmio(Gpa),
    /// The MMU answered with an outcome this crate does not know (a newer
    /// `mmu-api`).
    #[error("the MMU answered {0}, which this exit handler does not know")]
    UnknownOutcome(String),
}
