//! An adapter shaped like crosvm's `handle_mmio` closure.
//!
//! crosvm's vCPU loop gets `VcpuExit::Mmio` from `Vcpu::run()` and then
//! calls `vcpu.handle_mmio(&mut |IoParams { address, operation }| ...)`:
//! the hypervisor back end decodes the access and calls the closure, which
//! fills a read's slice in place. [`IoParams`] and [`IoOperation`] here
//! have the same shape as crosvm's `hypervisor::IoParams` /
//! `hypervisor::IoOperation`:
//!
//! | crosvm (`hypervisor`) | here |
//! | --- | --- |
//! | `struct IoParams<'a> { address: u64, operation: IoOperation<'a> }` | [`IoParams`] |
//! | `enum IoOperation<'a> { Read(&'a mut [u8]), Write(&'a [u8]) }` | [`IoOperation`] |
//! | `fn handle_mmio(&self, handle_fn: &mut dyn FnMut(IoParams) -> Result<()>) -> Result<()>` | [`CrosvmMmio::handle`] is that closure's body |
//!
//! ```text
//! VcpuExit::Mmio => {
//!     let mut mmio = CrosvmMmio::new(&mut exits, &mut bus);
//!     vcpu.handle_mmio(&mut |hypervisor::IoParams { address, operation }| {
//!         let operation = match operation {
//!             hypervisor::IoOperation::Read(data) => IoOperation::Read(data),
//!             hypervisor::IoOperation::Write(data) => IoOperation::Write(data),
//!         };
//!         mmio.handle(IoParams { address, operation });
//!         Ok(())
//!     })?;
//!     mmio.finish()?;
//! }
//! ```

use std::fmt;

use mmu_api::Gpa;

use crate::bus::MmioBus;
use crate::error::ExitError;
use crate::exits::VcpuExits;

/// Read or write, with the data (crosvm's `hypervisor::IoOperation`).
#[derive(Debug, PartialEq, Eq, Hash)]
pub enum IoOperation<'a> {
    /// A read: fill the whole slice.
    Read(&'a mut [u8]),
    /// A write of these bytes.
    Write(&'a [u8]),
}

/// One MMIO access (crosvm's `hypervisor::IoParams`).
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct IoParams<'a> {
    /// The guest-physical address.
    pub address: u64,
    /// Read or write.
    pub operation: IoOperation<'a>,
}

/// The body of crosvm's `handle_mmio` closure, over a vCPU's exit handler
/// and the VMM's bus.
///
/// An access that fails is kept (the first one) and a failed read is
/// answered with zeros, as crosvm's bus answers an unclaimed read; the
/// closure returns `Ok(())` and [`finish`](Self::finish) returns the kept
/// error once `handle_mmio` is done, typed.
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
    /// memory added meanwhile). A read fills its slice.
    pub fn handle(&mut self, params: IoParams<'_>) {
        let gpa = Gpa(params.address);
        match params.operation {
            IoOperation::Read(data) => {
                if let Err(e) = self.exits.mmio_read(gpa, data, self.bus) {
                    self.keep(e);
                    data.fill(0);
                }
            }
            IoOperation::Write(data) => {
                if let Err(e) = self.exits.mmio_write(gpa, data, self.bus) {
                    self.keep(e);
                }
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
        let mut handle_fn = |params: IoParams<'_>| mmio.handle(params);
        let mut read = [0u8; 2];
        handle_fn(IoParams {
            address: 0xd000_0000,
            operation: IoOperation::Read(&mut read),
        });
        assert_eq!(read, [0xa0, 0xa1]);
        handle_fn(IoParams {
            address: 0xd000_0008,
            operation: IoOperation::Write(&[1, 2, 3, 4]),
        });
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
        let mut read = [0x55u8; 8];
        mmio.handle(IoParams {
            address: 0xd000_0000,
            operation: IoOperation::Read(&mut read),
        });
        assert_eq!(read, [0; 8]);
        mmio.handle(IoParams {
            address: 0xd000_1000,
            operation: IoOperation::Write(&[0]),
        });
        match mmio.finish() {
            Err(ExitError::Bus { gpa, .. }) => assert_eq!(gpa, Gpa(0xd000_0000)),
            other => panic!("{other:?}"),
        }
    }
}
