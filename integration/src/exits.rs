//! The hypervisor-neutral core: one vCPU's MMU, the calls an exit turns
//! into, and the action the vCPU loop takes next.

use std::fmt;
use std::time::Instant;

use mmu_api::{
    FaultOutcome, Gpa, Gva, Hpa, MmioClass, MmuVcpu, PAGE_SIZE, PagingContext, PfErrorCode,
    RootLoad, VcpuId,
};
use tracing::{debug, trace};

use crate::bus::{BusError, Direction, MmioBus};
use crate::error::ExitError;

/// What the host's vCPU loop does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Action {
    /// Re-enter the guest (the exit is complete, or the access is to be
    /// retried).
    Resume,
    /// Make the hardware use this root, or flush its TLB, before entering
    /// (only a backend that builds the tables the hardware walks asks).
    LoadRoot(RootLoad),
    /// Deliver a #PF to the guest.
    InjectPageFault {
        /// The error code to push.
        error_code: PfErrorCode,
        /// The faulting address, for CR2.
        cr2: Gva,
    },
    /// Deliver #GP(0) to the guest.
    InjectGeneralProtection,
    /// The faulting instruction accesses MMIO at `gpa`: the VMM decodes it,
    /// performs it against its device bus, and advances RIP. (KVM does
    /// this itself before an MMIO exit; a #PF or an MSHV intercept does
    /// not.)
    EmulateMmio {
        /// The guest-physical address accessed.
        gpa: Gpa,
    },
    /// The faulting instruction writes a guest page table the MMU
    /// write-protects: the VMM emulates it, hands each memory write it
    /// makes to [`VcpuExits::write_guest`], and advances RIP.
    EmulateWrite {
        /// The guest-physical address written.
        gpa: Gpa,
    },
}

impl Action {
    /// The action for what [`MmuVcpu::prepare_entry`] or
    /// [`MmuVcpu::set_paging_context`] returned.
    pub fn from_root_load(load: RootLoad) -> Action {
        if load.root.is_none() && !load.flush_tlb {
            Action::Resume
        } else {
            Action::LoadRoot(load)
        }
    }

    /// The action for a page-fault outcome.
    pub fn from_fault_outcome(outcome: FaultOutcome) -> Result<Action, ExitError> {
        Ok(match outcome {
            FaultOutcome::Retry => Action::Resume,
            FaultOutcome::Mmio { gpa } => Action::EmulateMmio { gpa },
            FaultOutcome::InjectPageFault { error_code, cr2 } => {
                Action::InjectPageFault { error_code, cr2 }
            }
            FaultOutcome::Emulate { gpa } => Action::EmulateWrite { gpa },
            FaultOutcome::InjectGeneralProtection => Action::InjectGeneralProtection,
            other => return Err(ExitError::UnknownOutcome(format!("{other:?}"))),
        })
    }
}

/// What one vCPU's exits did, counted by the handler.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ExitStats {
    /// MMIO exits (reads and writes) classified by the MMU.
    pub mmio_exits: u64,
    /// Reads forwarded to a device.
    pub device_reads: u64,
    /// Writes forwarded to a device (ROM writes included).
    pub device_writes: u64,
    /// Writes to a read-only memslot, forwarded to the device behind it.
    pub rom_writes: u64,
    /// MMIO exits that hit memory added while the exit was on its way.
    pub memory_races: u64,
    /// Page faults handed to the MMU.
    pub page_faults: u64,
    /// Faults the MMU gave back to the guest (#PF and #GP).
    pub faults_for_guest: u64,
    /// Instructions the VMM was asked to emulate.
    pub emulations: u64,
    /// Entries that needed a new root or a TLB flush.
    pub root_loads: u64,
    /// Exits handed back to the host as not the MMU's business.
    pub unhandled: u64,
}

impl ExitStats {
    /// Name and value of every counter, in declaration order.
    pub fn counters(&self) -> [(&'static str, u64); 10] {
        [
            ("mmio_exits", self.mmio_exits),
            ("device_reads", self.device_reads),
            ("device_writes", self.device_writes),
            ("rom_writes", self.rom_writes),
            ("memory_races", self.memory_races),
            ("page_faults", self.page_faults),
            ("faults_for_guest", self.faults_for_guest),
            ("emulations", self.emulations),
            ("root_loads", self.root_loads),
            ("unhandled", self.unhandled),
        ]
    }

    /// Adds `other` counter by counter (to sum vCPUs).
    pub fn add(&mut self, other: &ExitStats) {
        self.mmio_exits += other.mmio_exits;
        self.device_reads += other.device_reads;
        self.device_writes += other.device_writes;
        self.rom_writes += other.rom_writes;
        self.memory_races += other.memory_races;
        self.page_faults += other.page_faults;
        self.faults_for_guest += other.faults_for_guest;
        self.emulations += other.emulations;
        self.root_loads += other.root_loads;
        self.unhandled += other.unhandled;
    }
}

impl fmt::Display for ExitStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (name, value)) in self.counters().iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{name}={value}")?;
        }
        Ok(())
    }
}

/// One vCPU's exit handler: owns the vCPU's [`MmuVcpu`], turns exits into
/// its calls, and answers with the [`Action`] the vCPU loop takes.
///
/// Owned by the vCPU thread, like the `MmuVcpu` inside. The hypervisor
/// front ends are methods too: [`handle_kvm_exit`](Self::handle_kvm_exit)
/// (feature `kvm`), `handle_mshv_message`
/// (feature `mshv`); the host-VMM adapters wrap it
/// ([`cloud_hypervisor::MmuVmOps`](crate::cloud_hypervisor::MmuVmOps),
/// [`crosvm::CrosvmMmio`](crate::crosvm::CrosvmMmio)).
///
/// The vCPU loop calls [`prepare_entry`](Self::prepare_entry) before every
/// guest entry and [`exit_guest`](Self::exit_guest) right after every
/// return from it, so requests other threads post (root reloads, TLB
/// flushes) are served and never wait for a vCPU outside the guest.
#[derive(Debug)]
pub struct VcpuExits {
    mmu: Box<dyn MmuVcpu>,
    stats: ExitStats,
    /// MMIO service times, when they are recorded.
    mmio_times: Option<MmioServiceTimes>,
    /// The hypervisor's MMIO window of a shadow backend
    /// (`ShadowConfig::mmio_window`): an MMIO exit there is for the guest
    /// frame at its offset.
    mmio_window: Option<Hpa>,
    /// The MMIO access being served came through the window (an MMIO
    /// leaf answered it: the cached path).
    via_window: bool,
}

/// How long the MMU took to serve each MMIO access of one vCPU, in
/// nanoseconds, from the exit reaching the handler to the MMU's answer
/// (the exit itself and the device are not included), split by whether
/// the backend's MMIO cache answered ([`MmuVcpu::last_mmio_cached`]).
/// Accesses of a backend that does not say are not timed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MmioServiceTimes {
    /// Accesses the cache answered: an MMIO SPTE (shadow paging), a
    /// classification-cache hit (EPT).
    pub cached_ns: Vec<u64>,
    /// Accesses that took the full path: a guest walk and a memslot
    /// search (shadow), a memslot search (EPT).
    pub uncached_ns: Vec<u64>,
}

impl MmioServiceTimes {
    /// Appends `other`'s samples.
    pub fn extend(&mut self, other: MmioServiceTimes) {
        self.cached_ns.extend(other.cached_ns);
        self.uncached_ns.extend(other.uncached_ns);
    }

    /// Every sample, cached and uncached.
    pub fn all_ns(&self) -> impl Iterator<Item = u64> + '_ {
        self.cached_ns.iter().chain(&self.uncached_ns).copied()
    }
}

impl VcpuExits {
    /// A handler around the vCPU's MMU (from
    /// [`MmuBackend::create_vcpu`](mmu_api::MmuBackend::create_vcpu)).
    pub fn new(mmu: Box<dyn MmuVcpu>) -> Self {
        VcpuExits {
            mmu,
            stats: ExitStats::default(),
            mmio_times: None,
            mmio_window: None,
            via_window: false,
        }
    }

    /// Where the shadow backend's MMIO leaves point (its
    /// `ShadowConfig::mmio_window`): MMIO exits at or above it are taken
    /// as accesses to the guest frame at the offset. [`HostMmu`](crate::host::HostMmu)
    /// sets it for the vCPUs it creates.
    pub fn set_mmio_window(&mut self, window: Option<Hpa>) {
        self.mmio_window = window;
    }

    /// The guest-physical address of a hypervisor MMIO exit at `addr`,
    /// and whether it came through the MMIO window.
    pub(crate) fn exit_gpa(&self, addr: u64) -> (Gpa, bool) {
        match self.mmio_window {
            Some(w) if addr >= w.raw() => (Gpa(addr - w.raw()), true),
            _ => (Gpa(addr), false),
        }
    }

    /// Serves `op` as an MMIO access that came through the window (or
    /// not), so its service time lands on the right path.
    pub(crate) fn with_window<R>(
        &mut self,
        via_window: bool,
        op: impl FnOnce(&mut Self) -> R,
    ) -> R {
        self.via_window = via_window;
        let result = op(self);
        self.via_window = false;
        result
    }

    /// Starts (or stops) timing the MMU's service of every MMIO access
    /// ([`MmioServiceTimes`]); off by default, when it costs nothing.
    pub fn record_mmio_service_times(&mut self, on: bool) {
        self.mmio_times = on.then(MmioServiceTimes::default);
    }

    /// The MMIO service times recorded since the last call (empty when
    /// recording is off); recording goes on.
    pub fn take_mmio_service_times(&mut self) -> MmioServiceTimes {
        self.mmio_times
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Records one MMIO access served in `elapsed`, on the path the MMU
    /// says it took.
    fn record_mmio(&mut self, started: Option<Instant>) {
        let (Some(started), Some(times)) = (started, self.mmio_times.as_mut()) else {
            return;
        };
        let ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let cached = if self.via_window {
            Some(true)
        } else {
            self.mmu.last_mmio_cached()
        };
        match cached {
            Some(true) => times.cached_ns.push(ns),
            Some(false) => times.uncached_ns.push(ns),
            None => {}
        }
    }

    /// The vCPU's id.
    pub fn id(&self) -> VcpuId {
        self.mmu.id()
    }

    /// The vCPU's MMU, for anything this handler does not wrap
    /// (translation for a debugger, the paging context).
    pub fn mmu(&mut self) -> &mut dyn MmuVcpu {
        self.mmu.as_mut()
    }

    /// The counters so far.
    pub fn stats(&self) -> ExitStats {
        self.stats
    }

    /// Before every guest entry: serves requests other threads posted and
    /// returns what must be loaded first.
    pub fn prepare_entry(&mut self) -> Result<Action, ExitError> {
        let action = Action::from_root_load(self.mmu.prepare_entry()?);
        if let Action::LoadRoot(load) = action {
            self.stats.root_loads += 1;
            debug!(vcpu = self.id().0, root = ?load.root, flush = load.flush_tlb, "root load before entry");
        }
        Ok(action)
    }

    /// Right after every return from the guest (an exit, an interrupted
    /// entry).
    pub fn exit_guest(&mut self) {
        self.mmu.exit_guest();
    }

    /// The guest loaded CR3 or changed CR0, CR4 or EFER (a hypercall, an
    /// intercepted control-register write): the MMU loads the new context
    /// and says what the hardware must use.
    pub fn set_paging_context(&mut self, ctx: &PagingContext) -> Result<Action, ExitError> {
        let action = Action::from_root_load(self.mmu.set_paging_context(ctx)?);
        if let Action::LoadRoot(_) = action {
            self.stats.root_loads += 1;
        }
        trace!(
            vcpu = self.id().0,
            cr3 = ctx.cr3,
            ?action,
            "paging context loaded"
        );
        Ok(action)
    }

    /// The guest executed INVLPG for `gva`.
    pub fn invlpg(&mut self, gva: Gva) {
        trace!(vcpu = self.id().0, gva = gva.raw(), "invlpg");
        self.mmu.invlpg(gva);
    }

    /// The guest flushed its TLB.
    pub fn flush_tlb(&mut self, include_global: bool) {
        trace!(vcpu = self.id().0, include_global, "TLB flush");
        self.mmu.flush_tlb(include_global);
    }

    /// Classifies an access to `gpa` that exited as MMIO, and counts it.
    pub fn classify(&mut self, gpa: Gpa, is_write: bool) -> MmioClass {
        self.stats.mmio_exits += 1;
        let started = self.mmio_times.is_some().then(Instant::now);
        let class = self.mmu.classify_mmio(gpa, is_write);
        self.record_mmio(started);
        trace!(
            vcpu = self.id().0,
            gpa = gpa.raw(),
            is_write,
            ?class,
            "MMIO exit classified"
        );
        class
    }

    /// A guest read of `data.len()` bytes at `gpa` exited as MMIO and the
    /// hypervisor waits for the data (KVM's `KVM_EXIT_MMIO`). A device
    /// address goes to `bus.mmio_read`; an address that memory was added
    /// at meanwhile is read from guest memory (`bus.memory_read`).
    pub fn mmio_read(
        &mut self,
        gpa: Gpa,
        data: &mut [u8],
        bus: &mut dyn MmioBus,
    ) -> Result<MmioClass, ExitError> {
        let class = self.classify(gpa, false);
        let result = match class {
            MmioClass::Memory { slot } => {
                self.stats.memory_races += 1;
                debug!(vcpu = self.id().0, gpa = gpa.raw(), %slot, "MMIO read raced a memslot change; reading memory");
                bus.memory_read(gpa, data)
            }
            _ => {
                self.stats.device_reads += 1;
                bus.mmio_read(gpa, data)
            }
        };
        result.map_err(|source| bus_error(gpa, Direction::Read, data.len(), source))?;
        Ok(class)
    }

    /// A guest write at `gpa` exited as MMIO (the hypervisor already
    /// emulated the instruction). A device address, or a read-only memslot
    /// (a ROM device), goes to `bus.mmio_write`; an address that writable
    /// memory was added at meanwhile is written through the MMU
    /// ([`write_guest`](Self::write_guest)), so its dirty log and shadow
    /// state see it.
    pub fn mmio_write(
        &mut self,
        gpa: Gpa,
        data: &[u8],
        bus: &mut dyn MmioBus,
    ) -> Result<MmioClass, ExitError> {
        let class = self.classify(gpa, true);
        match class {
            MmioClass::Memory { slot } => {
                self.stats.memory_races += 1;
                debug!(vcpu = self.id().0, gpa = gpa.raw(), %slot, "MMIO write raced a memslot change; writing memory");
                match self.write_guest(gpa, data) {
                    Ok(()) => {}
                    // The memory went away again between the classification
                    // and the write (a delete or move on another thread):
                    // nothing backs the address, so the write is MMIO after
                    // all, as it was when the guest made it.
                    Err(ExitError::Mmu(mmu_api::VcpuError::Unbacked(_))) => {
                        debug!(vcpu = self.id().0, gpa = gpa.raw(), %slot, "the raced memory is gone again; the write goes to the bus");
                        self.stats.device_writes += 1;
                        bus.mmio_write(gpa, data).map_err(|source| {
                            bus_error(gpa, Direction::Write, data.len(), source)
                        })?;
                        return Ok(MmioClass::Mmio);
                    }
                    Err(e) => return Err(e),
                }
            }
            MmioClass::ReadOnlyWrite { slot } => {
                self.stats.rom_writes += 1;
                self.stats.device_writes += 1;
                trace!(vcpu = self.id().0, gpa = gpa.raw(), %slot, "write to a read-only memslot goes to its device");
                bus.mmio_write(gpa, data)
                    .map_err(|source| bus_error(gpa, Direction::Write, data.len(), source))?;
            }
            _ => {
                self.stats.device_writes += 1;
                bus.mmio_write(gpa, data)
                    .map_err(|source| bus_error(gpa, Direction::Write, data.len(), source))?;
            }
        }
        Ok(class)
    }

    /// A #PF at `gva` with `error_code` reached the VMM (the shadow
    /// backend's own tables faulted, or the VMM intercepts guest #PFs).
    pub fn page_fault(&mut self, gva: Gva, error_code: PfErrorCode) -> Result<Action, ExitError> {
        self.stats.page_faults += 1;
        let started = self.mmio_times.is_some().then(Instant::now);
        let outcome = self.mmu.handle_page_fault(gva, error_code)?;
        if matches!(outcome, FaultOutcome::Mmio { .. }) {
            self.record_mmio(started);
        }
        let action = Action::from_fault_outcome(outcome)?;
        match action {
            Action::InjectPageFault { .. } | Action::InjectGeneralProtection => {
                self.stats.faults_for_guest += 1;
            }
            Action::EmulateMmio { .. } | Action::EmulateWrite { .. } => self.stats.emulations += 1,
            _ => {}
        }
        debug!(
            vcpu = self.id().0,
            gva = gva.raw(),
            error_code = error_code.bits(),
            ?action,
            "page fault handled"
        );
        Ok(action)
    }

    /// Performs a guest-memory write the VMM's instruction emulator made
    /// for this vCPU, split at page boundaries, through the MMU (which
    /// keeps its shadow state and the dirty log coherent with it).
    pub fn write_guest(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), ExitError> {
        let mut offset = 0usize;
        while offset < data.len() {
            let at = gpa.wrapping_add(offset as u64);
            let in_page = ((PAGE_SIZE - at.page_offset()) as usize).min(data.len() - offset);
            self.mmu.write_guest(at, &data[offset..offset + in_page])?;
            offset += in_page;
        }
        Ok(())
    }

    /// Counts an exit handed back to the host unhandled.
    #[cfg_attr(not(any(feature = "kvm", feature = "mshv")), allow(dead_code))]
    pub(crate) fn count_unhandled(&mut self) {
        self.stats.unhandled += 1;
    }

    /// Counts an instruction the VMM must emulate.
    #[cfg_attr(not(feature = "mshv"), allow(dead_code))]
    pub(crate) fn count_emulation(&mut self) {
        self.stats.emulations += 1;
    }
}

fn bus_error(gpa: Gpa, direction: Direction, len: usize, source: BusError) -> ExitError {
    ExitError::Bus {
        gpa,
        direction,
        len,
        source,
    }
}

#[cfg(all(test, feature = "ept"))]
mod tests {
    use mmu_api::{MemslotFlags, PagingMode, SlotId};

    use super::*;
    use crate::test_support::{Call, RecordingBus, add_ram, ept, leak_ram, vcpu};

    const DEVICE: Gpa = Gpa(0xd000_0000);

    #[test]
    fn root_loads_and_fault_outcomes_map_to_actions() {
        assert_eq!(Action::from_root_load(RootLoad::default()), Action::Resume);
        let flush = RootLoad::new(None, true);
        assert_eq!(Action::from_root_load(flush), Action::LoadRoot(flush));
        let root = RootLoad::new(Some(Hpa(0x1000)), false);
        assert_eq!(Action::from_root_load(root), Action::LoadRoot(root));

        let gpa = Gpa(0x5000);
        let ec = PfErrorCode::WRITE | PfErrorCode::USER;
        for (outcome, action) in [
            (FaultOutcome::Retry, Action::Resume),
            (FaultOutcome::Mmio { gpa }, Action::EmulateMmio { gpa }),
            (FaultOutcome::Emulate { gpa }, Action::EmulateWrite { gpa }),
            (
                FaultOutcome::InjectGeneralProtection,
                Action::InjectGeneralProtection,
            ),
            (
                FaultOutcome::InjectPageFault {
                    error_code: ec,
                    cr2: Gva(0x1234),
                },
                Action::InjectPageFault {
                    error_code: ec,
                    cr2: Gva(0x1234),
                },
            ),
        ] {
            assert_eq!(Action::from_fault_outcome(outcome).unwrap(), action);
        }
    }

    #[test]
    fn device_reads_and_writes_reach_the_bus() {
        let (_port, backend) = ept();
        let mut exits = vcpu(&*backend, 0);
        let mut bus = RecordingBus::default();
        let mut data = [0u8; 4];
        let class = exits.mmio_read(DEVICE, &mut data, &mut bus).unwrap();
        assert_eq!(class, MmioClass::Mmio);
        assert_eq!(data, [0xa0, 0xa1, 0xa2, 0xa3]);
        exits
            .mmio_write(Gpa(0xd000_0004), &[1, 2], &mut bus)
            .unwrap();
        assert_eq!(
            bus.calls,
            [
                Call::MmioRead(DEVICE, 4),
                Call::MmioWrite(Gpa(0xd000_0004), vec![1, 2])
            ]
        );
        let stats = exits.stats();
        assert_eq!(
            (stats.mmio_exits, stats.device_reads, stats.device_writes),
            (2, 1, 1)
        );
        // The second exit to the page was a classification cache hit.
        assert_eq!(backend.stats().get("mmio_cache_hits"), Some(1));
        assert_eq!(backend.stats().get("mmio_cache_misses"), Some(1));
    }

    #[test]
    fn mmio_service_times_are_split_by_cache_path() {
        let (_port, backend) = ept();
        let mut exits = vcpu(&*backend, 0);
        let mut bus = RecordingBus::default();
        let mut data = [0u8; 4];
        // Off by default: nothing recorded.
        exits.mmio_read(DEVICE, &mut data, &mut bus).unwrap();
        assert_eq!(exits.take_mmio_service_times(), MmioServiceTimes::default());
        exits.record_mmio_service_times(true);
        // A new page misses the cache, then hits it twice.
        let other = Gpa(0xd000_1000);
        for _ in 0..3 {
            exits.mmio_read(other, &mut data, &mut bus).unwrap();
        }
        let times = exits.take_mmio_service_times();
        assert_eq!((times.cached_ns.len(), times.uncached_ns.len()), (2, 1));
        assert_eq!(times.all_ns().count(), 3);
        // Taken: the next harvest starts empty, and recording goes on.
        exits.mmio_read(other, &mut data, &mut bus).unwrap();
        assert_eq!(exits.take_mmio_service_times().cached_ns.len(), 1);
    }

    #[test]
    fn writes_to_a_readonly_slot_go_to_its_device() {
        let (_port, backend) = ept();
        let rom = leak_ram(0x2000);
        add_ram(&*backend, rom, 1, 0xf_0000, MemslotFlags::READONLY);
        let mut exits = vcpu(&*backend, 0);
        let mut bus = RecordingBus::default();
        let class = exits.mmio_write(Gpa(0xf_0010), &[0xee], &mut bus).unwrap();
        assert_eq!(class, MmioClass::ReadOnlyWrite { slot: SlotId(1) });
        assert_eq!(bus.calls, [Call::MmioWrite(Gpa(0xf_0010), vec![0xee])]);
        assert_eq!(exits.stats().rom_writes, 1);
        assert_eq!(rom.read_u64(0x10), 0, "ROM contents unchanged");
    }

    #[test]
    fn exits_that_raced_a_memslot_add_use_memory() {
        let (_port, backend) = ept();
        let ram = leak_ram(0x4000);
        add_ram(&*backend, ram, 0, 0x10_0000, MemslotFlags::LOG_DIRTY);
        let mut exits = vcpu(&*backend, 0);
        let mut bus = RecordingBus::default();

        // A write: through the MMU, into the slot, into the dirty log.
        let value = 0x1122_3344_5566_7788u64;
        let class = exits
            .mmio_write(Gpa(0x10_2008), &value.to_le_bytes(), &mut bus)
            .unwrap();
        assert_eq!(class, MmioClass::Memory { slot: SlotId(0) });
        assert_eq!(ram.read_u64(0x2008), value);
        let log = backend.get_dirty_log(SlotId(0)).unwrap();
        assert_eq!(log.iter_dirty().collect::<Vec<_>>(), [2]);

        // A read: from guest memory, through the host.
        let mut data = [0u8; 2];
        exits
            .mmio_read(Gpa(0x10_0000), &mut data, &mut bus)
            .unwrap();
        assert_eq!(data, [0x11, 0x11]);
        assert_eq!(bus.calls, [Call::MemoryRead(Gpa(0x10_0000), 2)]);
        assert_eq!(exits.stats().memory_races, 2);
    }

    /// An MMU whose memslot is deleted right after it classifies an
    /// access, as a VMM thread's delete can land between the two calls.
    #[derive(Debug)]
    struct DeletedAfterClassify {
        inner: Box<dyn MmuVcpu>,
        backend: std::sync::Arc<dyn mmu_api::MmuBackend>,
        slot: SlotId,
    }

    impl MmuVcpu for DeletedAfterClassify {
        fn id(&self) -> VcpuId {
            self.inner.id()
        }
        fn set_paging_context(
            &mut self,
            ctx: &PagingContext,
        ) -> Result<RootLoad, mmu_api::VcpuError> {
            self.inner.set_paging_context(ctx)
        }
        fn paging_context(&self) -> &PagingContext {
            self.inner.paging_context()
        }
        fn handle_page_fault(
            &mut self,
            gva: Gva,
            error_code: PfErrorCode,
        ) -> Result<FaultOutcome, mmu_api::VcpuError> {
            self.inner.handle_page_fault(gva, error_code)
        }
        fn classify_mmio(&mut self, gpa: Gpa, is_write: bool) -> MmioClass {
            let class = self.inner.classify_mmio(gpa, is_write);
            let _ = self.backend.delete_memslot(self.slot);
            class
        }
        fn translate(
            &mut self,
            gva: Gva,
            len: u64,
            access: mmu_api::Access,
            options: mmu_api::paging::WalkOptions,
        ) -> Result<Vec<mmu_api::paging::RangeSegment>, mmu_api::paging::WalkError> {
            self.inner.translate(gva, len, access, options)
        }
        fn write_guest(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), mmu_api::VcpuError> {
            self.inner.write_guest(gpa, data)
        }
        fn invlpg(&mut self, gva: Gva) {
            self.inner.invlpg(gva);
        }
        fn flush_tlb(&mut self, include_global: bool) {
            self.inner.flush_tlb(include_global);
        }
        fn prepare_entry(&mut self) -> Result<RootLoad, mmu_api::VcpuError> {
            self.inner.prepare_entry()
        }
        fn exit_guest(&mut self) {
            self.inner.exit_guest();
        }
    }

    /// Found by `vmm/tests/stress.rs` (EPT): a write that exited as MMIO,
    /// was classified as memory a memslot add had put there, and found the
    /// memslot deleted again by the time it was written, ended the vCPU
    /// with `Unbacked`. It goes to the bus instead.
    #[test]
    fn a_raced_write_whose_memory_went_away_again_goes_to_the_bus() {
        let (_port, backend) = ept();
        let ram = leak_ram(0x4000);
        add_ram(&*backend, ram, 0, 0x10_0000, MemslotFlags::LOG_DIRTY);
        let inner = backend
            .create_vcpu(VcpuId(0), std::sync::Arc::new(crate::test_support::NoKick))
            .unwrap();
        let mut exits = VcpuExits::new(Box::new(DeletedAfterClassify {
            inner,
            backend: std::sync::Arc::clone(&backend),
            slot: SlotId(0),
        }));
        let mut bus = RecordingBus::default();
        let class = exits.mmio_write(Gpa(0x10_2008), &[7; 8], &mut bus).unwrap();
        assert_eq!(class, MmioClass::Mmio);
        assert_eq!(bus.calls, [Call::MmioWrite(Gpa(0x10_2008), vec![7; 8])]);
        assert_eq!(ram.read_u64(0x2008), 0, "the deleted memory is untouched");
        let stats = exits.stats();
        assert_eq!((stats.memory_races, stats.device_writes), (1, 1));
    }

    #[test]
    fn bus_failures_are_typed() {
        let (_port, backend) = ept();
        let mut exits = vcpu(&*backend, 0);
        let mut bus = RecordingBus {
            fail: true,
            ..RecordingBus::default()
        };
        let err = exits.mmio_read(DEVICE, &mut [0; 8], &mut bus).unwrap_err();
        match &err {
            ExitError::Bus {
                gpa,
                direction,
                len,
                source: BusError::NoDevice(at),
            } => {
                assert_eq!(
                    (*gpa, *direction, *len, *at),
                    (DEVICE, Direction::Read, 8, DEVICE)
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            err.to_string(),
            "the device bus failed an MMIO read of 8 bytes at 0xd0000000"
        );
    }

    #[test]
    fn write_guest_splits_at_page_boundaries() {
        let (_port, backend) = ept();
        let ram = leak_ram(0x4000);
        add_ram(&*backend, ram, 0, 0, MemslotFlags::LOG_DIRTY);
        let mut exits = vcpu(&*backend, 0);
        let bytes: Vec<u8> = (1..=16).collect();
        exits.write_guest(Gpa(0x1ff8), &bytes).unwrap();
        assert_eq!(
            ram.read_u64(0x1ff8),
            u64::from_le_bytes(bytes[..8].try_into().unwrap())
        );
        assert_eq!(
            ram.read_u64(0x2000),
            u64::from_le_bytes(bytes[8..].try_into().unwrap())
        );
        let log = backend.get_dirty_log(SlotId(0)).unwrap();
        assert_eq!(log.iter_dirty().collect::<Vec<_>>(), [1, 2]);
        // Outside memory the MMU refuses.
        let err = exits.write_guest(Gpa(0x8000), &[0]).unwrap_err();
        assert!(
            matches!(err, ExitError::Mmu(mmu_api::VcpuError::Unbacked(_))),
            "{err:?}"
        );
    }

    #[test]
    fn ept_reflects_intercepted_page_faults() {
        let (_port, backend) = ept();
        let mut exits = vcpu(&*backend, 0);
        let ec = PfErrorCode::PRESENT | PfErrorCode::WRITE;
        let action = exits.page_fault(Gva(0xdead_b000), ec).unwrap();
        assert_eq!(
            action,
            Action::InjectPageFault {
                error_code: ec,
                cr2: Gva(0xdead_b000)
            }
        );
        assert_eq!(exits.stats().faults_for_guest, 1);
        assert_eq!(backend.stats().get("page_faults_reflected"), Some(1));
        assert_eq!(exits.prepare_entry().unwrap(), Action::Resume);
        exits.exit_guest();
    }

    #[test]
    fn paging_context_changes_reach_the_mmu() {
        let (_port, backend) = ept();
        let ram = leak_ram(0x4000);
        add_ram(&*backend, ram, 0, 0, MemslotFlags::empty());
        let mut exits = vcpu(&*backend, 0);
        let ctx = PagingContext::for_mode(
            PagingMode::Level4,
            0x1000,
            46,
            mmu_api::paging::CpuFeatures::all(),
        )
        .unwrap();
        assert_eq!(exits.set_paging_context(&ctx).unwrap(), Action::Resume);
        assert_eq!(exits.mmu().paging_context().cr3, 0x1000);
        exits.invlpg(Gva(0x4000));
        exits.flush_tlb(true);
        // The PML4 at 0x1000 is empty: a guest walk faults not-present.
        let walk = exits.mmu().translate(
            Gva(0x10),
            8,
            mmu_api::Access::supervisor(mmu_api::AccessKind::Read),
            mmu_api::paging::WalkOptions::default(),
        );
        assert!(walk.is_err());
        assert!(backend.stats().get("tlb_flushes").unwrap() >= 2);
    }

    #[cfg(feature = "shadow")]
    #[test]
    fn shadow_asks_for_a_root_and_injects_guest_faults() {
        let backend = crate::test_support::shadow();
        let ram = leak_ram(0x10_0000);
        add_ram(&*backend, ram, 0, 0, MemslotFlags::empty());
        let mut exits = vcpu(&*backend, 0);
        // 4-level paging with an empty PML4 at 0x1000.
        let ctx = PagingContext::for_mode(
            PagingMode::Level4,
            0x1000,
            46,
            mmu_api::paging::CpuFeatures::all(),
        )
        .unwrap();
        let action = exits.set_paging_context(&ctx).unwrap();
        assert!(
            matches!(action, Action::LoadRoot(RootLoad { root: Some(_), .. })),
            "{action:?}"
        );
        assert_eq!(exits.stats().root_loads, 1);
        let action = exits
            .page_fault(Gva(0x40_0000), PfErrorCode::WRITE)
            .unwrap();
        assert_eq!(
            action,
            Action::InjectPageFault {
                error_code: PfErrorCode::WRITE,
                cr2: Gva(0x40_0000)
            }
        );
        assert_eq!(exits.stats().page_faults, 1);
        assert_eq!(exits.stats().faults_for_guest, 1);
    }

    #[test]
    fn stats_add_and_print() {
        let mut a = ExitStats {
            mmio_exits: 2,
            unhandled: 1,
            ..ExitStats::default()
        };
        a.add(&ExitStats {
            mmio_exits: 3,
            root_loads: 4,
            ..ExitStats::default()
        });
        assert_eq!((a.mmio_exits, a.root_loads, a.unhandled), (5, 4, 1));
        let text = a.to_string();
        assert!(text.starts_with("mmio_exits=5 device_reads=0"), "{text}");
        assert!(text.ends_with("root_loads=4 unhandled=1"), "{text}");
    }
}
