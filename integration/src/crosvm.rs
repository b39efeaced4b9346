//! An adapter shaped like crosvm's `handle_mmio` closure.
//!
//! crosvm's vCPU loop gets `VcpuExit::Mmio` from `Vcpu::run()` and then
//! calls `vcpu.handle_mmio(&mut |IoParams { address, size, operation }| ...)`:
//! the hypervisor back end decodes the access and calls the closure, which
//! answers a read with `Some(data)`. [`IoParams`] and [`IoOperation`] here
//! have the same shape as crosvm's `hypervisor::IoParams` /
//! `hypervisor::IoOperation`:
//!
//! | crosvm (`hypervisor`) | here |
//! | --- | --- |
//! | `struct IoParams { address: u64, size: usize, operation: IoOperation }` | [`IoParams`] |
//! | `enum IoOperation { Read, Write { data: [u8; 8] } }` | [`IoOperation`] |
//! | `handle_mmio(&self, handle_fn: &mut dyn FnMut(IoParams) -> Option<[u8; 8]>)` | [`CrosvmMmio::handle`] is that closure's body |
//!
//! (Newer crosvm passes `IoOperation::Read(&mut [u8])` / `Write(&[u8])`
//! and a closure returning `Result<()>`; the mapping is the same, with the
//! read filled in place.)
//!
//! ```text
//! VcpuExit::Mmio => {
//!     let mut mmio = CrosvmMmio::new(&mut exits, &mut bus);
//!     vcpu.handle_mmio(&mut |params| mmio.handle(params))?;
//!     mmio.finish()?;
//! }
//! ```

use std::fmt;

use mmu_api::Gpa;

use crate::bus::MmioBus;
use crate::error::ExitError;
use crate::exits::VcpuExits;

/// Read or write, with the data of a write (crosvm's
/// `hypervisor::IoOperation`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IoOperation {
    /// A read: the closure returns the data.
    Read,
    /// A write of the first `size` bytes of `data`.
    Write {
        /// The bytes written (up to 8).
        data: [u8; 8],
    },
}

/// One MMIO access (crosvm's `hypervisor::IoParams`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IoParams {
    /// The guest-physical address.
    pub address: u64,
    /// The access size in bytes (1 to 8).
    pub size: usize,
    /// Read or write.
    pub operation: IoOperation,
}

/// The body of crosvm's `handle_mmio` closure, over a vCPU's exit handler
/// and the VMM's bus.
///
/// The closure cannot return an error, so the first one is kept (and the
/// read answered with zeros, as crosvm's bus answers an unclaimed read);
/// [`finish`](Self::finish) returns it once `handle_mmio` is done.
pub struct CrosvmMmio<'a> {
    exits: &'a mut VcpuExits,
    bus: &'a mut dyn MmioBus,
    error: Option<ExitError>,
}

impl fmt::Debug for CrosvmMmio<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CrosvmMmio")
            .field("exits", &self.exits)
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

impl<'a> CrosvmMmio<'a> {
    /// The closure body for one MMIO exit of the vCPU `exits` handles.
    pub fn new(exits: &'a mut VcpuExits, bus: &'a mut dyn MmioBus) -> Self {
        CrosvmMmio {
            exits,
            bus,
            error: None,
        }
    }

    /// Serves one access: classified by the MMU, then to the bus (or to
    /// memory added meanwhile). A read returns its data.
    pub fn handle(&mut self, params: IoParams) -> Option<[u8; 8]> {
        let size = params.size.min(8);
        let gpa = Gpa(params.address);
        match params.operation {
            IoOperation::Read => {
                let mut data = [0u8; 8];
                if let Err(e) = self.exits.mmio_read(gpa, &mut data[..size], self.bus) {
                    self.keep(e);
                    data = [0; 8];
                }
                Some(data)
            }
            IoOperation::Write { data } => {
                if let Err(e) = self.exits.mmio_write(gpa, &data[..size], self.bus) {
                    self.keep(e);
                }
                None
            }
        }
    }

    fn keep(&mut self, error: ExitError) {
        if self.error.is_none() {
            self.error = Some(error);
        }
    }

    /// The first error an access hit, if any.
    pub fn finish(self) -> Result<(), ExitError> {
        match self.error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

#[cfg(all(test, feature = "ept"))]
mod tests {
    use super::*;
    use crate::test_support::{Call, RecordingBus, ept, vcpu};

    #[test]
    fn reads_and_writes_go_through_the_closure() {
        let (_port, backend) = ept();
        let mut exits = vcpu(&*backend, 0);
        let mut bus = RecordingBus::default();
        let mut mmio = CrosvmMmio::new(&mut exits, &mut bus);
        // What crosvm's back end does inside `handle_mmio`.
        let mut handle_fn = |params: IoParams| mmio.handle(params);
        let read = handle_fn(IoParams {
            address: 0xd000_0000,
            size: 2,
            operation: IoOperation::Read,
        });
        assert_eq!(read, Some([0xa0, 0xa1, 0, 0, 0, 0, 0, 0]));
        let write = handle_fn(IoParams {
            address: 0xd000_0008,
            size: 4,
            operation: IoOperation::Write {
                data: [1, 2, 3, 4, 5, 6, 7, 8],
            },
        });
        assert_eq!(write, None);
        mmio.finish().unwrap();
        assert_eq!(
            bus.calls,
            [
                Call::MmioRead(Gpa(0xd000_0000), 2),
                Call::MmioWrite(Gpa(0xd000_0008), vec![1, 2, 3, 4])
            ]
        );
        assert_eq!(exits.stats().mmio_exits, 2);
    }

    #[test]
    fn the_first_error_is_kept_for_finish() {
        let (_port, backend) = ept();
        let mut exits = vcpu(&*backend, 0);
        let mut bus = RecordingBus {
            fail: true,
            ..RecordingBus::default()
        };
        let mut mmio = CrosvmMmio::new(&mut exits, &mut bus);
        let read = mmio.handle(IoParams {
            address: 0xd000_0000,
            size: 8,
            operation: IoOperation::Read,
        });
        assert_eq!(read, Some([0; 8]));
        mmio.handle(IoParams {
            address: 0xd000_1000,
            size: 1,
            operation: IoOperation::Write { data: [0; 8] },
        });
        match mmio.finish() {
            Err(ExitError::Bus { gpa, .. }) => assert_eq!(gpa, Gpa(0xd000_0000)),
            other => panic!("{other:?}"),
        }
    }
}
