//! The `hypervisor::VmOps` newtype.

use std::sync::Arc;

use hypervisor::HypervisorVmError;
use mmu_api::Gpa;
use mmu_integration::cloud_hypervisor::MmuVmOps;
use mmu_integration::{BusError, ExitStats, MmioBus, VcpuExits};

/// One vCPU's `hypervisor::VmOps`: MMIO classified by the MMU before it
/// reaches the wrapped `VmOps` (Cloud Hypervisor's handler over its MMIO
/// bus and guest memory), and the emulator's guest-memory writes through
/// the MMU. Guest-memory reads and port I/O pass straight through.
///
/// Each MMU-served call runs with the vCPU out of the guest for the MMU
/// (`exit_guest` first, `prepare_entry` last), because Cloud Hypervisor
/// calls it from inside `Vcpu::run()`.
#[derive(Debug)]
pub struct MmuOps(MmuVmOps<dyn hypervisor::VmOps>);

impl MmuOps {
    /// Wraps `inner` for the vCPU whose exit handler is `vcpu`.
    pub fn new(inner: Arc<dyn hypervisor::VmOps>, vcpu: VcpuExits) -> Self {
        MmuOps(MmuVmOps::new(inner, vcpu))
    }

    /// The decorator inside (its enter / leave calls, its handler).
    pub fn decorator(&self) -> &MmuVmOps<dyn hypervisor::VmOps> {
        &self.0
    }

    /// The vCPU's exit counters.
    pub fn stats(&self) -> ExitStats {
        self.0.stats()
    }
}

/// The wrapped `VmOps` as the bus the MMU forwards to.
struct Bus<'a>(&'a dyn hypervisor::VmOps);

impl MmioBus for Bus<'_> {
    fn mmio_read(&mut self, gpa: Gpa, data: &mut [u8]) -> Result<(), BusError> {
        self.0.mmio_read(gpa.raw(), data).map_err(BusError::failed)
    }

    fn mmio_write(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), BusError> {
        self.0.mmio_write(gpa.raw(), data).map_err(BusError::failed)
    }

    fn memory_read(&mut self, gpa: Gpa, data: &mut [u8]) -> Result<(), BusError> {
        let n = self
            .0
            .guest_mem_read(gpa.raw(), data)
            .map_err(BusError::failed)?;
        if n != data.len() {
            return Err(BusError::failed(format!(
                "read {n} of {} bytes of guest memory at {gpa}",
                data.len()
            )));
        }
        Ok(())
    }
}

impl hypervisor::VmOps for MmuOps {
    fn guest_mem_write(&self, gpa: u64, buf: &[u8]) -> Result<usize, HypervisorVmError> {
        self.0
            .serve_guest_mem_write(gpa, buf)
            .map_err(|e| HypervisorVmError::GuestMemWrite(e.into()))?;
        Ok(buf.len())
    }

    fn guest_mem_read(&self, gpa: u64, buf: &mut [u8]) -> Result<usize, HypervisorVmError> {
        self.0.inner().guest_mem_read(gpa, buf)
    }

    fn mmio_read(&self, gpa: u64, data: &mut [u8]) -> Result<(), HypervisorVmError> {
        self.0
            .serve_mmio_read(gpa, data, &mut Bus(&**self.0.inner()))
            .map(drop)
            .map_err(|e| HypervisorVmError::MmioBusRead(e.into()))
    }

    fn mmio_write(&self, gpa: u64, data: &[u8]) -> Result<(), HypervisorVmError> {
        self.0
            .serve_mmio_write(gpa, data, &mut Bus(&**self.0.inner()))
            .map(drop)
            .map_err(|e| HypervisorVmError::MmioBusWrite(e.into()))
    }

    fn pio_read(&self, port: u64, data: &mut [u8]) -> Result<(), HypervisorVmError> {
        self.0.inner().pio_read(port, data)
    }

    fn pio_write(&self, port: u64, data: &[u8]) -> Result<(), HypervisorVmError> {
        self.0.inner().pio_write(port, data)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use hypervisor::VmOps;
    use mmu_api::{MmuBackend, VcpuId, VcpuKick};
    use mmu_backends::{BackendConfig, BackendKind, BackendParts};

    use super::*;

    #[derive(Debug)]
    struct NoKick;
    impl VcpuKick for NoKick {
        fn kick(&self) {}
    }

    /// A host handler: one device page at 0xd000_0000 answering 0x5a,
    /// port writes recorded.
    #[derive(Default)]
    struct Host {
        mmio_writes: Mutex<Vec<(u64, Vec<u8>)>>,
        pio_writes: Mutex<Vec<u64>>,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("no device at {0:#x}")]
    struct NoDevice(u64);

    impl VmOps for Host {
        fn guest_mem_write(&self, gpa: u64, _: &[u8]) -> Result<usize, HypervisorVmError> {
            Err(HypervisorVmError::GuestMemWrite(NoDevice(gpa).into()))
        }
        fn guest_mem_read(&self, _: u64, buf: &mut [u8]) -> Result<usize, HypervisorVmError> {
            buf.fill(0x11);
            Ok(buf.len())
        }
        fn mmio_read(&self, gpa: u64, data: &mut [u8]) -> Result<(), HypervisorVmError> {
            if gpa & !0xfff != 0xd000_0000 {
                return Err(HypervisorVmError::MmioBusRead(NoDevice(gpa).into()));
            }
            data.fill(0x5a);
            Ok(())
        }
        fn mmio_write(&self, gpa: u64, data: &[u8]) -> Result<(), HypervisorVmError> {
            self.mmio_writes.lock().unwrap().push((gpa, data.to_vec()));
            Ok(())
        }
        fn pio_read(&self, _: u64, data: &mut [u8]) -> Result<(), HypervisorVmError> {
            data.fill(0xff);
            Ok(())
        }
        fn pio_write(&self, port: u64, _: &[u8]) -> Result<(), HypervisorVmError> {
            self.pio_writes.lock().unwrap().push(port);
            Ok(())
        }
    }

    fn setup() -> (Arc<dyn MmuBackend>, Arc<Host>, MmuOps) {
        let port = Arc::new(mmu_ept::testing::InProcessHypervisor::new());
        let parts = BackendParts::new().with_hypervisor_memory(port);
        let backend =
            mmu_backends::create(BackendKind::Ept, &BackendConfig::default(), &parts).unwrap();
        let exits = VcpuExits::new(backend.create_vcpu(VcpuId(0), Arc::new(NoKick)).unwrap());
        let host = Arc::new(Host::default());
        let ops = MmuOps::new(host.clone(), exits);
        (backend, host, ops)
    }

    #[test]
    fn mmio_is_classified_then_served_by_the_host() {
        let (backend, host, ops) = setup();
        let mut data = [0u8; 4];
        ops.mmio_read(0xd000_0010, &mut data).unwrap();
        assert_eq!(data, [0x5a; 4]);
        ops.mmio_write(0xd000_0014, &[9]).unwrap();
        assert_eq!(*host.mmio_writes.lock().unwrap(), [(0xd000_0014, vec![9])]);
        let stats = ops.stats();
        assert_eq!(
            (stats.mmio_exits, stats.device_reads, stats.device_writes),
            (2, 1, 1)
        );
        assert_eq!(backend.stats().get("mmio_cache_hits"), Some(1));
        // Port I/O and memory reads pass straight through.
        ops.pio_write(0x80, &[1]).unwrap();
        assert_eq!(*host.pio_writes.lock().unwrap(), [0x80]);
        let mut buf = [0u8; 2];
        assert_eq!(ops.guest_mem_read(0x1000, &mut buf).unwrap(), 2);
        assert_eq!(ops.stats().mmio_exits, 2);
    }

    #[test]
    fn callbacks_leave_the_vcpu_ready_to_enter() {
        let (_backend, _host, ops) = setup();
        assert!(!ops.decorator().in_guest());
        ops.mmio_write(0xd000_0000, &[1]).unwrap();
        // The callback ran outside the guest and prepared the next entry.
        assert!(ops.decorator().in_guest());
        assert_eq!(
            ops.decorator().enter().unwrap(),
            mmu_integration::Action::Resume
        );
        ops.decorator().leave();
        assert!(!ops.decorator().in_guest());
    }

    #[test]
    fn host_failures_keep_their_source() {
        let (_backend, _host, ops) = setup();
        let err = ops.mmio_read(0xe000_0000, &mut [0; 4]).unwrap_err();
        assert!(matches!(err, HypervisorVmError::MmioBusRead(_)), "{err:?}");
        let chain: Vec<String> =
            std::iter::successors(Some(&err as &(dyn std::error::Error + 'static)), |e| {
                e.source()
            })
            .map(|e| e.to_string())
            .collect();
        assert!(
            chain.iter().any(|m| m.contains("no device at 0xe0000000")),
            "{chain:?}"
        );
        // An emulated write outside memory is the MMU's refusal.
        let err = ops.guest_mem_write(0x1000, &[0]).unwrap_err();
        assert!(
            matches!(err, HypervisorVmError::GuestMemWrite(_)),
            "{err:?}"
        );
    }
}
