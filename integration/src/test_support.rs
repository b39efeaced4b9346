//! Fixtures for the unit tests: real backends over the EPT backend's
//! in-process hypervisor double, guest RAM that lives for the whole test
//! process, and a host bus that records what reached it.

use std::sync::Arc;

use mmu_api::{Gpa, Hpa, MemslotFlags, MmuBackend, SlotId, VcpuId, VcpuKick};
use mmu_backends::{BackendConfig, BackendKind, BackendParts};
use mmu_ept::testing::{GuestRam, InProcessHypervisor};

use crate::bus::{BusError, MmioBus};
use crate::exits::VcpuExits;

/// A kick nobody needs in these tests.
#[derive(Debug)]
pub(crate) struct NoKick;

impl VcpuKick for NoKick {
    fn kick(&self) {}
}

/// Guest RAM that is never freed, so any memslot made from it satisfies
/// `set_memslot`'s contract for the rest of the process.
pub(crate) fn leak_ram(size: u64) -> &'static GuestRam {
    Box::leak(Box::new(GuestRam::new(size)))
}

/// An EPT backend over an in-process hypervisor.
pub(crate) fn ept() -> (Arc<InProcessHypervisor>, Arc<dyn MmuBackend>) {
    let port = Arc::new(InProcessHypervisor::new());
    let parts = BackendParts::new().with_hypervisor_memory(port.clone());
    let backend = mmu_backends::create(BackendKind::Ept, &BackendConfig::default(), &parts)
        .expect("EPT backend");
    (port, backend)
}

/// A shadow backend with a small pool.
#[cfg(feature = "shadow")]
pub(crate) fn shadow() -> Arc<dyn MmuBackend> {
    let mut config = BackendConfig::default();
    config.shadow.pool_pages = 256;
    mmu_backends::create(BackendKind::Shadow, &config, &BackendParts::new())
        .expect("shadow backend")
}

/// Where the "hardware" sees guest RAM at guest-physical 0: below the
/// 46-bit host address width the shadow backend checks, and away from its
/// pool.
const RAM_HPA: u64 = 0x10_0000_0000;

/// Adds `ram` as slot `id` at `base`.
pub(crate) fn add_ram(
    backend: &dyn MmuBackend,
    ram: &'static GuestRam,
    id: u32,
    base: u64,
    flags: MemslotFlags,
) {
    let mut slot = ram.memslot(SlotId(id), Gpa(base), flags);
    slot.backing.hpa = Hpa(RAM_HPA + base);
    // SAFETY: `ram` is leaked: its host range stays valid for reads and
    // writes for the rest of the process.
    unsafe { backend.set_memslot(slot) }.expect("memslot");
}

/// vCPU 0's exit handler.
pub(crate) fn vcpu(backend: &dyn MmuBackend, id: u32) -> VcpuExits {
    VcpuExits::new(
        backend
            .create_vcpu(VcpuId(id), Arc::new(NoKick))
            .expect("vCPU"),
    )
}

/// One access that reached the host's bus.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Call {
    MmioRead(Gpa, usize),
    MmioWrite(Gpa, Vec<u8>),
    MemoryRead(Gpa, usize),
}

/// A host bus: device reads answer `0xa0 + i` for byte `i`, memory reads
/// `0x11`; `fail` makes every call fail with "no device".
#[derive(Debug, Default)]
pub(crate) struct RecordingBus {
    pub(crate) calls: Vec<Call>,
    pub(crate) fail: bool,
}

impl RecordingBus {
    fn check(&self, gpa: Gpa) -> Result<(), BusError> {
        if self.fail {
            Err(BusError::NoDevice(gpa))
        } else {
            Ok(())
        }
    }
}

impl MmioBus for RecordingBus {
    fn mmio_read(&mut self, gpa: Gpa, data: &mut [u8]) -> Result<(), BusError> {
        self.calls.push(Call::MmioRead(gpa, data.len()));
        self.check(gpa)?;
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = 0xa0 + i as u8;
        }
        Ok(())
    }

    fn mmio_write(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), BusError> {
        self.calls.push(Call::MmioWrite(gpa, data.to_vec()));
        self.check(gpa)
    }

    fn memory_read(&mut self, gpa: Gpa, data: &mut [u8]) -> Result<(), BusError> {
        self.calls.push(Call::MemoryRead(gpa, data.len()));
        self.check(gpa)?;
        data.fill(0x11);
        Ok(())
    }
}
