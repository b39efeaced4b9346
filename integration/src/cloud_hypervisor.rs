//! A decorator of Cloud Hypervisor's `VmOps`: MMIO classified by the MMU.
//!
//! In Cloud Hypervisor the vCPU loop never sees an MMIO exit: the
//! `hypervisor` crate's KVM and MSHV vCPUs serve MMIO, port I/O and the
//! instruction emulator's guest-memory accesses inside `Vcpu::run()`,
//! through the `Arc<dyn hypervisor::VmOps>` each vCPU was created with
//! (`Vm::create_vcpu(id, Some(vm_ops), msr_config)`). [`MmuVmOps`] is one
//! vCPU's decorator, generic over the handler it wraps:
//!
//! - over Cloud Hypervisor's own `dyn hypervisor::VmOps`, the
//!   `mmu-cloud-hypervisor` crate (built against the real `hypervisor`
//!   crate) implements `hypervisor::VmOps` for it with
//!   [`MmuVmOps::serve_mmio_read`] and friends;
//! - over any handler of the same shape, the local [`VmOps`] trait here
//!   (same methods, [`VmOpsError`] for `HypervisorVmError`) is implemented
//!   for `MmuVmOps<H>` whenever `H: VmOps`.
//!
//! | Cloud Hypervisor (`hypervisor::VmOps`) | here |
//! | --- | --- |
//! | `fn guest_mem_write(&self, gpa: u64, buf: &[u8]) -> Result<usize>` | [`VmOps::guest_mem_write`] |
//! | `fn guest_mem_read(&self, gpa: u64, buf: &mut [u8]) -> Result<usize>` | [`VmOps::guest_mem_read`] |
//! | `fn mmio_read(&self, gpa: u64, data: &mut [u8]) -> Result<()>` | [`VmOps::mmio_read`] |
//! | `fn mmio_write(&self, gpa: u64, data: &[u8]) -> Result<()>` | [`VmOps::mmio_write`] |
//! | `fn pio_read(&self, port: u64, data: &mut [u8]) -> Result<()>` | [`VmOps::pio_read`] |
//! | `fn pio_write(&self, port: u64, data: &[u8]) -> Result<()>` | [`VmOps::pio_write`] |
//! | `HypervisorVmError` | [`VmOpsError`] |
//!
//! # Guest mode inside `run()`
//!
//! Because these callbacks run inside `Vcpu::run()`, the vCPU is out of
//! the guest while they run. Each MMU-served callback therefore calls the
//! MMU's `exit_guest` first and `prepare_entry` last: classifying an MMIO
//! access takes the MMU lock, and a vCPU still counted as in the guest
//! there would make a zap that waits for it wait forever. A root load that
//! `prepare_entry` asks for is kept until [`MmuVmOps::enter`] hands it to
//! the vCPU decorator, which also calls [`enter`](MmuVmOps::enter) before
//! and [`leave`](MmuVmOps::leave) after every `run()`.

use std::error::Error;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use mmu_api::{Gpa, MmioClass};

use crate::bus::{BusError, MmioBus};
use crate::error::ExitError;
use crate::exits::{Action, ExitStats, VcpuExits};

/// Errors of [`VmOps`] calls (Cloud Hypervisor: `HypervisorVmError`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VmOpsError {
    /// The host's own operation failed (a bus with no device, guest memory
    /// out of range).
    #[error("the host VMM's operation failed")]
    Host(#[source] Box<dyn Error + Send + Sync>),
    /// The MMU could not complete the access.
    #[error("the MMU could not complete the access")]
    Mmu(#[source] ExitError),
}

/// The result type of [`VmOps`].
pub type Result<T> = std::result::Result<T, VmOpsError>;

/// The operations a vCPU performs on its VM (the shape of Cloud
/// Hypervisor's `hypervisor::VmOps`), for hosts of that shape that do not
/// build against its crate.
pub trait VmOps: Send + Sync {
    /// Writes guest memory (the instruction emulator's stores). Returns the
    /// bytes written.
    fn guest_mem_write(&self, gpa: u64, buf: &[u8]) -> Result<usize>;
    /// Reads guest memory. Returns the bytes read.
    fn guest_mem_read(&self, gpa: u64, buf: &mut [u8]) -> Result<usize>;
    /// An MMIO read.
    fn mmio_read(&self, gpa: u64, data: &mut [u8]) -> Result<()>;
    /// An MMIO write.
    fn mmio_write(&self, gpa: u64, data: &[u8]) -> Result<()>;
    /// A port read.
    fn pio_read(&self, port: u64, data: &mut [u8]) -> Result<()>;
    /// A port write.
    fn pio_write(&self, port: u64, data: &[u8]) -> Result<()>;
}

/// A per-vCPU decorator of the VM's [`VmOps`]: MMIO goes through the MMU's
/// classification (and its cache and stats) before it reaches the inner
/// device bus, and the emulator's guest-memory writes go through the MMU,
/// so the dirty log and the shadow backend's write protection see them.
/// Guest-memory reads and port I/O pass through unchanged.
///
/// - `mmio_read`: a device address goes to the inner `mmio_read`; an
///   address that memory was added at meanwhile is read with the inner
///   `guest_mem_read`.
/// - `mmio_write`: a device address, or a read-only memslot (ROM), goes to
///   the inner `mmio_write`; writable memory added meanwhile is written
///   through the MMU.
/// - `guest_mem_write`: [`VcpuExits::write_guest`].
///
/// Only its own vCPU thread calls it, so the lock around the vCPU's MMU is
/// never contended.
pub struct MmuVmOps<H: ?Sized = dyn VmOps> {
    vcpu: Mutex<GuestState>,
    inner: Arc<H>,
}

/// The vCPU's handler and where the vCPU is.
#[derive(Debug)]
struct GuestState {
    exits: VcpuExits,
    /// `prepare_entry` was called and `exit_guest` not since.
    in_guest: bool,
    /// What a `prepare_entry` inside a callback asked for and nobody
    /// applied yet.
    pending: Option<Action>,
}

impl GuestState {
    fn leave(&mut self) {
        if self.in_guest {
            self.exits.exit_guest();
            self.in_guest = false;
        }
    }

    /// Prepares the next entry; keeps what must be applied first.
    fn reenter(&mut self) -> std::result::Result<(), ExitError> {
        let action = self.exits.prepare_entry()?;
        self.in_guest = true;
        // A later load supersedes an earlier one; a plain resume does not
        // cancel a load nobody applied yet.
        if action != Action::Resume {
            self.pending = Some(action);
        }
        Ok(())
    }
}

impl<H: ?Sized> fmt::Debug for MmuVmOps<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MmuVmOps")
            .field("vcpu", &*self.lock())
            .finish_non_exhaustive()
    }
}

impl<H: ?Sized> MmuVmOps<H> {
    /// Wraps the VM's `inner` operations for the vCPU whose handler is
    /// `vcpu`.
    pub fn new(inner: Arc<H>, vcpu: VcpuExits) -> Self {
        MmuVmOps {
            vcpu: Mutex::new(GuestState {
                exits: vcpu,
                in_guest: false,
                pending: None,
            }),
            inner,
        }
    }

    /// The wrapped handler.
    pub fn inner(&self) -> &Arc<H> {
        &self.inner
    }

    fn lock(&self) -> MutexGuard<'_, GuestState> {
        // A panic inside the MMU leaves nothing half-updated that a later
        // call would trust more than a fresh classification.
        self.vcpu.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The vCPU's exit counters.
    pub fn stats(&self) -> ExitStats {
        self.lock().exits.stats()
    }

    /// Runs `f` on the vCPU's handler (for the calls the vCPU loop makes
    /// itself).
    pub fn with_vcpu<R>(&self, f: impl FnOnce(&mut VcpuExits) -> R) -> R {
        f(&mut self.lock().exits)
    }

    /// Whether the MMU counts the vCPU as in the guest.
    pub fn in_guest(&self) -> bool {
        self.lock().in_guest
    }

    /// Right before the vCPU enters the guest (`run()`): serves requests
    /// other threads posted, unless a callback already did since the last
    /// exit, and returns what must be applied first (a root load a
    /// callback's `prepare_entry` kept, or this one's).
    pub fn enter(&self) -> std::result::Result<Action, ExitError> {
        let mut state = self.lock();
        if !state.in_guest {
            state.reenter()?;
        }
        Ok(state.pending.take().unwrap_or(Action::Resume))
    }

    /// Right after `run()` returns.
    pub fn leave(&self) {
        self.lock().leave();
    }

    /// Runs `f` with the vCPU out of the guest, then prepares its next
    /// entry.
    fn outside_guest<T>(
        &self,
        f: impl FnOnce(&mut VcpuExits) -> std::result::Result<T, ExitError>,
    ) -> std::result::Result<T, ExitError> {
        let mut state = self.lock();
        state.leave();
        let value = f(&mut state.exits)?;
        state.reenter()?;
        Ok(value)
    }

    /// An MMIO read exit served inside `run()`: classified by the MMU, then
    /// served by `bus` (the wrapped handler's MMIO and guest-memory reads).
    pub fn serve_mmio_read(
        &self,
        gpa: u64,
        data: &mut [u8],
        bus: &mut dyn MmioBus,
    ) -> std::result::Result<MmioClass, ExitError> {
        self.outside_guest(|exits| exits.mmio_read(Gpa(gpa), data, bus))
    }

    /// An MMIO write exit served inside `run()`.
    pub fn serve_mmio_write(
        &self,
        gpa: u64,
        data: &[u8],
        bus: &mut dyn MmioBus,
    ) -> std::result::Result<MmioClass, ExitError> {
        self.outside_guest(|exits| exits.mmio_write(Gpa(gpa), data, bus))
    }

    /// A guest-memory write of the hypervisor's instruction emulator,
    /// through the MMU (dirty log, write protection).
    pub fn serve_guest_mem_write(
        &self,
        gpa: u64,
        buf: &[u8],
    ) -> std::result::Result<(), ExitError> {
        self.outside_guest(|exits| exits.write_guest(Gpa(gpa), buf))
    }
}

/// The inner [`VmOps`] seen as an [`MmioBus`].
struct InnerBus<'a, H: ?Sized>(&'a H);

fn host(error: VmOpsError) -> BusError {
    BusError::failed(error)
}

impl<H: VmOps + ?Sized> MmioBus for InnerBus<'_, H> {
    fn mmio_read(&mut self, gpa: Gpa, data: &mut [u8]) -> std::result::Result<(), BusError> {
        self.0.mmio_read(gpa.raw(), data).map_err(host)
    }

    fn mmio_write(&mut self, gpa: Gpa, data: &[u8]) -> std::result::Result<(), BusError> {
        self.0.mmio_write(gpa.raw(), data).map_err(host)
    }

    fn memory_read(&mut self, gpa: Gpa, data: &mut [u8]) -> std::result::Result<(), BusError> {
        let n = self.0.guest_mem_read(gpa.raw(), data).map_err(host)?;
        if n != data.len() {
            return Err(BusError::failed(format!(
                "read {n} of {} bytes of guest memory at {gpa}",
                data.len()
            )));
        }
        Ok(())
    }
}

impl<H: VmOps + ?Sized> VmOps for MmuVmOps<H> {
    fn guest_mem_write(&self, gpa: u64, buf: &[u8]) -> Result<usize> {
        self.serve_guest_mem_write(gpa, buf)
            .map_err(VmOpsError::Mmu)?;
        Ok(buf.len())
    }

    fn guest_mem_read(&self, gpa: u64, buf: &mut [u8]) -> Result<usize> {
        self.inner.guest_mem_read(gpa, buf)
    }

    fn mmio_read(&self, gpa: u64, data: &mut [u8]) -> Result<()> {
        self.serve_mmio_read(gpa, data, &mut InnerBus(&*self.inner))
            .map(drop)
            .map_err(VmOpsError::Mmu)
    }

    fn mmio_write(&self, gpa: u64, data: &[u8]) -> Result<()> {
        self.serve_mmio_write(gpa, data, &mut InnerBus(&*self.inner))
            .map(drop)
            .map_err(VmOpsError::Mmu)
    }

    fn pio_read(&self, port: u64, data: &mut [u8]) -> Result<()> {
        self.inner.pio_read(port, data)
    }

    fn pio_write(&self, port: u64, data: &[u8]) -> Result<()> {
        self.inner.pio_write(port, data)
    }
}

#[cfg(all(test, feature = "ept"))]
mod tests {
    use mmu_api::{MemslotFlags, MmuBackend, SlotId};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::memslots::Memslots;
    use crate::test_support::{ept, vcpu};

    /// What reached the host's own VmOps.
    #[derive(Debug, PartialEq, Eq)]
    enum HostCall {
        Mmio(u64, Vec<u8>),
        Pio(u64, Vec<u8>),
    }

    /// A host VMM's VmOps: guest memory from vm-memory, an MMIO device at
    /// 0xd000_0000 that answers reads with 0x5a and refuses anything else,
    /// and a port bus that records writes.
    struct HostOps {
        memory: GuestMemoryMmap,
        calls: Mutex<Vec<HostCall>>,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("no device at {0:#x}")]
    struct NoDevice(u64);

    impl HostOps {
        fn record(&self, call: HostCall) {
            self.calls.lock().unwrap().push(call);
        }
    }

    impl VmOps for HostOps {
        fn guest_mem_write(&self, gpa: u64, buf: &[u8]) -> Result<usize> {
            self.memory
                .write(buf, GuestAddress(gpa))
                .map_err(|e| VmOpsError::Host(Box::new(e)))
        }
        fn guest_mem_read(&self, gpa: u64, buf: &mut [u8]) -> Result<usize> {
            self.memory
                .read(buf, GuestAddress(gpa))
                .map_err(|e| VmOpsError::Host(Box::new(e)))
        }
        fn mmio_read(&self, gpa: u64, data: &mut [u8]) -> Result<()> {
            if gpa & !0xfff != 0xd000_0000 {
                return Err(VmOpsError::Host(Box::new(NoDevice(gpa))));
            }
            data.fill(0x5a);
            Ok(())
        }
        fn mmio_write(&self, gpa: u64, data: &[u8]) -> Result<()> {
            self.record(HostCall::Mmio(gpa, data.to_vec()));
            Ok(())
        }
        fn pio_read(&self, _port: u64, data: &mut [u8]) -> Result<()> {
            data.fill(0xff);
            Ok(())
        }
        fn pio_write(&self, port: u64, data: &[u8]) -> Result<()> {
            self.record(HostCall::Pio(port, data.to_vec()));
            Ok(())
        }
    }

    /// A VM with 1 MiB of dirty-logged RAM at 0 and a 64 KiB ROM at
    /// 0x10_0000.
    fn setup() -> (
        Arc<dyn MmuBackend>,
        Memslots,
        Arc<HostOps>,
        MmuVmOps<HostOps>,
    ) {
        let (_port, backend) = ept();
        let memory = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x10_0000),
            (GuestAddress(0x10_0000), 0x1_0000),
        ])
        .unwrap();
        let glue = Memslots::new(Arc::clone(&backend));
        glue.add_memory(&memory, 0, MemslotFlags::LOG_DIRTY)
            .unwrap();
        glue.set_dirty_logging(SlotId(1), false).unwrap();
        let mut rom = backend
            .memslots()
            .into_iter()
            .find(|s| s.id == SlotId(1))
            .unwrap();
        rom.flags = MemslotFlags::READONLY;
        // SAFETY: slot 1 keeps its host range (the glue holds the mapping
        // until the slot is deleted); only the flags change.
        unsafe { backend.set_memslot(rom) }.unwrap();
        let host = Arc::new(HostOps {
            memory,
            calls: Mutex::new(Vec::new()),
        });
        let ops = MmuVmOps::new(host.clone(), vcpu(&*backend, 0));
        (backend, glue, host, ops)
    }

    #[test]
    fn mmio_is_classified_before_it_reaches_the_host() {
        let (backend, _glue, host, ops) = setup();
        let mut data = [0u8; 4];
        ops.mmio_read(0xd000_0010, &mut data).unwrap();
        assert_eq!(data, [0x5a; 4]);
        ops.mmio_write(0xd000_0014, &[9]).unwrap();
        // A write to the ROM goes to the device behind it.
        ops.mmio_write(0x10_0020, &[1, 2]).unwrap();
        assert_eq!(
            *host.calls.lock().unwrap(),
            [
                HostCall::Mmio(0xd000_0014, vec![9]),
                HostCall::Mmio(0x10_0020, vec![1, 2])
            ]
        );
        let stats = ops.stats();
        assert_eq!((stats.mmio_exits, stats.rom_writes), (3, 1));
        assert_eq!(backend.stats().get("mmio_cache_hits"), Some(1));
        ops.with_vcpu(|exits| assert_eq!(exits.id(), mmu_api::VcpuId(0)));
    }

    #[test]
    fn emulated_writes_go_through_the_mmu() {
        let (backend, glue, host, ops) = setup();
        let n = ops
            .guest_mem_write(0x3ffc, &[1, 2, 3, 4, 5, 6, 7, 8])
            .unwrap();
        assert_eq!(n, 8);
        let mut back = [0u8; 8];
        assert_eq!(ops.guest_mem_read(0x3ffc, &mut back).unwrap(), 8);
        assert_eq!(back, [1, 2, 3, 4, 5, 6, 7, 8]);
        // The write crossed pages 3 and 4; both are in the dirty log.
        let log = glue.dirty_log(SlotId(0)).unwrap();
        assert_eq!(log.iter_dirty().collect::<Vec<_>>(), [3, 4]);
        // A write to the ROM is refused by the MMU.
        let err = ops.guest_mem_write(0x10_0000, &[0]).unwrap_err();
        assert!(
            matches!(
                err,
                VmOpsError::Mmu(ExitError::Mmu(mmu_api::VcpuError::ReadOnly(_)))
            ),
            "{err:?}"
        );
        assert!(host.calls.lock().unwrap().is_empty());
        drop(backend);
    }

    #[test]
    fn port_io_passes_through() {
        let (_backend, _glue, host, ops) = setup();
        let mut data = [0u8; 2];
        ops.pio_read(0x60, &mut data).unwrap();
        assert_eq!(data, [0xff; 2]);
        ops.pio_write(0x80, &[0x12]).unwrap();
        assert_eq!(
            *host.calls.lock().unwrap(),
            [HostCall::Pio(0x80, vec![0x12])]
        );
        assert_eq!(ops.stats().mmio_exits, 0);
    }

    #[test]
    fn host_failures_come_back_as_mmu_errors() {
        let (_backend, _glue, _host, ops) = setup();
        let err = ops.mmio_read(0xe000_0000, &mut [0; 4]).unwrap_err();
        match err {
            VmOpsError::Mmu(ExitError::Bus { gpa, len, .. }) => {
                assert_eq!((gpa, len), (Gpa(0xe000_0000), 4));
            }
            other => panic!("{other:?}"),
        }
    }
}

#[cfg(all(test, feature = "ept"))]
mod guest_mode_tests {
    use std::result::Result;
    use std::sync::Mutex;

    use mmu_api::{
        Access, FaultOutcome, Gva, MmuVcpu, PagingContext, PfErrorCode, RootLoad, VcpuError,
        VcpuId,
        paging::{RangeSegment, WalkError, WalkOptions},
    };

    use super::*;
    use crate::test_support::{RecordingBus, ept};

    /// An MMU that records the calls the decorator makes, in order.
    #[derive(Debug)]
    struct Recorder {
        inner: Box<dyn MmuVcpu>,
        calls: Arc<Mutex<Vec<&'static str>>>,
        /// What `prepare_entry` answers.
        load: RootLoad,
    }

    impl Recorder {
        fn note(&self, call: &'static str) {
            self.calls.lock().unwrap().push(call);
        }
    }

    impl MmuVcpu for Recorder {
        fn id(&self) -> VcpuId {
            self.inner.id()
        }
        fn set_paging_context(&mut self, ctx: &PagingContext) -> Result<RootLoad, VcpuError> {
            self.inner.set_paging_context(ctx)
        }
        fn paging_context(&self) -> &PagingContext {
            self.inner.paging_context()
        }
        fn handle_page_fault(
            &mut self,
            gva: Gva,
            error_code: PfErrorCode,
        ) -> Result<FaultOutcome, VcpuError> {
            self.inner.handle_page_fault(gva, error_code)
        }
        fn classify_mmio(&mut self, gpa: Gpa, is_write: bool) -> MmioClass {
            self.note("classify");
            self.inner.classify_mmio(gpa, is_write)
        }
        fn translate(
            &mut self,
            gva: Gva,
            len: u64,
            access: Access,
            options: WalkOptions,
        ) -> Result<Vec<RangeSegment>, WalkError> {
            self.inner.translate(gva, len, access, options)
        }
        fn write_guest(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), VcpuError> {
            self.note("write");
            self.inner.write_guest(gpa, data)
        }
        fn invlpg(&mut self, gva: Gva) {
            self.inner.invlpg(gva);
        }
        fn flush_tlb(&mut self, include_global: bool) {
            self.inner.flush_tlb(include_global);
        }
        fn prepare_entry(&mut self) -> Result<RootLoad, VcpuError> {
            self.note("prepare_entry");
            self.inner.prepare_entry()?;
            Ok(self.load)
        }
        fn exit_guest(&mut self) {
            self.note("exit_guest");
            self.inner.exit_guest();
        }
    }

    fn recorded(load: RootLoad) -> (MmuVmOps<()>, Arc<Mutex<Vec<&'static str>>>) {
        let (_port, backend) = ept();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let inner = backend
            .create_vcpu(VcpuId(0), Arc::new(crate::test_support::NoKick))
            .unwrap();
        let exits = VcpuExits::new(Box::new(Recorder {
            inner,
            calls: Arc::clone(&calls),
            load,
        }));
        (MmuVmOps::new(Arc::new(()), exits), calls)
    }

    /// An MMIO exit served inside `run()` is classified with the vCPU out
    /// of the guest: a zap waiting for the vCPU is not held up by it.
    #[test]
    fn mmio_served_inside_run_is_classified_outside_the_guest() {
        let (ops, calls) = recorded(RootLoad::default());
        // The vCPU loop enters the guest; the hypervisor exits and calls
        // back inside `run()`.
        assert_eq!(ops.enter().unwrap(), Action::Resume);
        assert!(ops.in_guest());
        let mut bus = RecordingBus::default();
        ops.serve_mmio_write(0xd000_0000, &[1], &mut bus).unwrap();
        ops.serve_mmio_read(0xd000_0000, &mut [0; 4], &mut bus)
            .unwrap();
        // `run()` returns; the loop enters again.
        ops.leave();
        assert_eq!(ops.enter().unwrap(), Action::Resume);
        assert_eq!(
            *calls.lock().unwrap(),
            [
                "prepare_entry",
                "exit_guest",
                "classify",
                "prepare_entry",
                "exit_guest",
                "classify",
                "prepare_entry",
                "exit_guest",
                "prepare_entry"
            ]
        );
    }

    /// A root load asked for inside a callback is kept for the next entry.
    #[test]
    fn a_root_load_asked_for_inside_run_waits_for_the_next_entry() {
        let load = RootLoad::new(Some(mmu_api::Hpa(0x7000)), true);
        let (ops, calls) = recorded(load);
        let mut bus = RecordingBus::default();
        ops.serve_mmio_write(0xd000_0000, &[1], &mut bus).unwrap();
        // The callback prepared the entry; the decorator applies the load
        // without preparing again.
        assert_eq!(ops.enter().unwrap(), Action::LoadRoot(load));
        assert_eq!(
            *calls.lock().unwrap(),
            ["classify", "prepare_entry"],
            "the vCPU was outside the guest when the callback started"
        );
        assert_eq!(ops.stats().root_loads, 1);
    }
}
