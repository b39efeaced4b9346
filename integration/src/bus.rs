//! Where the exits the MMU does not serve go: the VMM's devices and its
//! view of guest memory.

use std::error::Error;
use std::fmt;

use mmu_api::Gpa;

/// The VMM's device bus and guest memory, as the exit handler needs them.
///
/// A VMM implements it over its own MMIO bus (crosvm's `Bus`, Cloud
/// Hypervisor's `AddressManager`, vm-device's `IoManager`) and its guest
/// memory (vm-memory's `GuestMemoryMmap`). The adapters in
/// [`cloud_hypervisor`](crate::cloud_hypervisor) and
/// [`crosvm`](crate::crosvm) build one from their host's types.
pub trait MmioBus {
    /// A guest read of `data.len()` bytes at `gpa` that the MMU classified
    /// as MMIO: fill `data` from the device there.
    fn mmio_read(&mut self, gpa: Gpa, data: &mut [u8]) -> Result<(), BusError>;

    /// A guest write at `gpa` that the MMU classified as MMIO (including a
    /// write to a read-only memslot, which goes to the ROM device behind
    /// it, as KVM does).
    fn mmio_write(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), BusError>;

    /// A guest read that exited as MMIO but, by the time the MMU classified
    /// it, hits memory: a memslot was added at `gpa` while the exit was on
    /// its way. The hypervisor already committed to completing the
    /// instruction with the data the VMM supplies (KVM does), so fill
    /// `data` from guest memory.
    fn memory_read(&mut self, gpa: Gpa, data: &mut [u8]) -> Result<(), BusError>;
}

/// A device bus that could not serve an access.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// No device claims the address.
    #[error("no device at guest-physical address {0}")]
    NoDevice(Gpa),
    /// The device (or guest memory) failed the access.
    #[error("the access failed")]
    Failed(#[source] Box<dyn Error + Send + Sync>),
}

impl BusError {
    /// Wraps any error of the host's bus or memory.
    pub fn failed(error: impl Into<Box<dyn Error + Send + Sync>>) -> Self {
        BusError::Failed(error.into())
    }
}

/// Read or write, for messages and traces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// A guest read.
    Read,
    /// A guest write.
    Write,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Read => "read",
            Direction::Write => "write",
        })
    }
}
