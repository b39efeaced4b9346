//! KVM: exits from kvm-ioctls, the ports over kvm-ioctls' `VmFd`
//! ([`RegionPort`]) and `VcpuFd` ([`VcpuPort`]), and VM-level setup
//! ([`KvmMmu`]).
//!
//! A host vCPU loop on KVM looks like this (the `host_vmm` example runs
//! it):
//!
//! ```text
//! loop {
//!     apply_action(&vcpu_fd, exits.prepare_entry()?, delivery)?;
//!     let result = vcpu_fd.run();
//!     exits.exit_guest();
//!     match exits.handle_kvm_exit(result?, &mut bus)? {
//!         Routed::Handled(action) => apply_action(&vcpu_fd, action, delivery)?,
//!         Routed::Unhandled(VcpuExit::IoOut(port, data)) => { /* the VMM's own */ }
//!         Routed::Unhandled(other) => { /* ... */ }
//!     }
//! }
//! ```
//!
//! `VcpuExit` borrows the vCPU's `kvm_run` page, so the handler serves an
//! MMIO read in place (the data goes straight into the page) and returns
//! an owned [`Action`]; the loop applies it once the borrow has ended.

use std::io;

use kvm_bindings::{KVM_CAP_EXCEPTION_PAYLOAD, KVM_VCPUEVENT_VALID_PAYLOAD, kvm_enable_cap};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use tracing::{debug, trace};

use crate::bus::MmioBus;
use crate::error::ExitError;
use crate::exits::{Action, VcpuExits};
use crate::memslots::UserRegion;
use crate::ports::{Exception, PortError, RegionPort, VcpuPort};

pub use crate::apply::{ApplyError, apply_action};
pub use crate::host::{
    GuestMmuPath, HostCoherence, HostError as KvmHostError, HostOptions, PageFaultDelivery,
    check_hostable, host_shadows_page_tables,
};
#[cfg(feature = "shadow")]
pub use crate::host::{SHADOW_HOST_WINDOW, SHADOW_POOL_SLOT, ShadowHosting};

/// A KVM VM's MMU: [`HostMmu`](crate::host::HostMmu) over kvm-ioctls'
/// `VmFd`.
pub type KvmMmu<E = mmu_api::MemslotError> = crate::host::HostMmu<VmFd, E>;

/// The EPT backend's memory-region port on KVM: `KVM_SET_USER_MEMORY_REGION`
/// and `KVM_GET_DIRTY_LOG` on a VM fd the VMM shares with it.
#[cfg(feature = "ept")]
pub type KvmMemory = crate::ports::RegionMemory<VmFd>;

/// What [`VcpuExits::handle_kvm_exit`] did with an exit.
#[derive(Debug)]
pub enum Routed<'a> {
    /// The MMU served it; apply the action ([`apply_action`]).
    Handled(Action),
    /// Not the MMU's business (port I/O, HLT, shutdown, ...): the exit,
    /// untouched, for the VMM's own loop.
    Unhandled(VcpuExit<'a>),
}

impl VcpuExits {
    /// Routes one KVM exit: `KVM_EXIT_MMIO` is classified by the MMU and
    /// served through `bus` (a read fills the exit's data in place, so it
    /// is complete when this returns); every other exit comes back
    /// [`Routed::Unhandled`].
    ///
    /// On KVM the kernel has already emulated the instruction behind an
    /// MMIO exit, so the action for one is always [`Action::Resume`].
    pub fn handle_kvm_exit<'a>(
        &mut self,
        exit: VcpuExit<'a>,
        bus: &mut dyn MmioBus,
    ) -> Result<Routed<'a>, ExitError> {
        match exit {
            VcpuExit::MmioRead(addr, data) => {
                let (gpa, via_window) = self.exit_gpa(addr);
                trace!(
                    vcpu = self.id().0,
                    addr,
                    gpa = gpa.raw(),
                    len = data.len(),
                    "KVM_EXIT_MMIO read"
                );
                self.with_window(via_window, |s| s.mmio_read(gpa, data, bus))?;
                Ok(Routed::Handled(Action::Resume))
            }
            VcpuExit::MmioWrite(addr, data) => {
                let (gpa, via_window) = self.exit_gpa(addr);
                trace!(
                    vcpu = self.id().0,
                    addr,
                    gpa = gpa.raw(),
                    len = data.len(),
                    "KVM_EXIT_MMIO write"
                );
                self.with_window(via_window, |s| s.mmio_write(gpa, data, bus))?;
                Ok(Routed::Handled(Action::Resume))
            }
            other => {
                self.count_unhandled();
                Ok(Routed::Unhandled(other))
            }
        }
    }
}

/// Enables `KVM_CAP_EXCEPTION_PAYLOAD` on the VM if KVM has it (before any
/// vCPU runs), and says how #PFs will be delivered.
pub fn enable_exception_payload(vm: &VmFd) -> io::Result<PageFaultDelivery> {
    match vm.enable_exception_payload() {
        Ok(true) => Ok(PageFaultDelivery::Payload),
        Ok(false) => Ok(PageFaultDelivery::SetCr2),
        Err(e) => Err(e.into_io()),
    }
}

fn kvm_region(region: &UserRegion) -> kvm_bindings::kvm_userspace_memory_region {
    let mut flags = 0;
    if region.log_dirty {
        flags |= kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES;
    }
    if region.readonly {
        flags |= kvm_bindings::KVM_MEM_READONLY;
    }
    kvm_bindings::kvm_userspace_memory_region {
        slot: region.slot,
        flags,
        guest_phys_addr: region.guest_phys_addr,
        memory_size: region.memory_size,
        userspace_addr: region.userspace_addr,
    }
}

/// `KVM_SET_USER_MEMORY_REGION`, `KVM_GET_DIRTY_LOG`, and
/// `KVM_CAP_EXCEPTION_PAYLOAD`. KVM logs per slot
/// ([`DirtyLogMode::PerSlot`](crate::ports::DirtyLogMode::PerSlot)): a
/// known slot number is a move or a flag change, turning logging on starts
/// a clean log and turning it off drops it.
impl RegionPort for VmFd {
    unsafe fn set_region(&self, region: &UserRegion) -> Result<(), PortError> {
        let region = kvm_region(region);
        trace!(
            slot = region.slot,
            base = region.guest_phys_addr,
            size = region.memory_size,
            flags = region.flags,
            "KVM_SET_USER_MEMORY_REGION"
        );
        // SAFETY: our caller guarantees that `userspace_addr` is valid for
        // reads and writes of `memory_size` bytes until the region is
        // removed (this trait's contract), which is what KVM needs.
        unsafe { self.set_user_memory_region(region) }
            .map_err(|e| PortError::failed("KVM_SET_USER_MEMORY_REGION", e))
    }

    fn remove_region(&self, region: &UserRegion) -> Result<(), PortError> {
        let region = kvm_region(&UserRegion {
            memory_size: 0,
            readonly: false,
            log_dirty: false,
            ..*region
        });
        trace!(slot = region.slot, "KVM_SET_USER_MEMORY_REGION (delete)");
        // SAFETY: a region of size zero deletes the slot; KVM maps nothing
        // and keeps no pointer to the host range.
        unsafe { self.set_user_memory_region(region) }
            .map_err(|e| PortError::failed("KVM_SET_USER_MEMORY_REGION", e))
    }

    fn dirty_log(&self, region: &UserRegion) -> Result<Vec<u64>, PortError> {
        let size = usize::try_from(region.memory_size)
            .map_err(|e| PortError::failed("KVM_GET_DIRTY_LOG", e))?;
        self.get_dirty_log(region.slot, size)
            .map_err(|e| PortError::failed("KVM_GET_DIRTY_LOG", e))
    }

    fn enable_exception_payload(&self) -> Result<bool, PortError> {
        if self.check_extension_raw(u64::from(KVM_CAP_EXCEPTION_PAYLOAD)) <= 0 {
            return Ok(false);
        }
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_EXCEPTION_PAYLOAD,
            ..Default::default()
        };
        cap.args[0] = 1;
        self.enable_cap(&cap)
            .map_err(|e| PortError::failed("KVM_ENABLE_CAP(KVM_CAP_EXCEPTION_PAYLOAD)", e))?;
        debug!("KVM_CAP_EXCEPTION_PAYLOAD enabled");
        Ok(true)
    }
}

/// CR3 and CR2 through `KVM_GET_SREGS` / `KVM_SET_SREGS`, exceptions
/// through `KVM_GET_VCPU_EVENTS` / `KVM_SET_VCPU_EVENTS`.
impl VcpuPort for VcpuFd {
    fn set_cr3(&self, cr3: u64) -> Result<(), PortError> {
        let mut sregs = self
            .get_sregs()
            .map_err(|e| PortError::failed("KVM_GET_SREGS", e))?;
        sregs.cr3 = cr3;
        self.set_sregs(&sregs)
            .map_err(|e| PortError::failed("KVM_SET_SREGS", e))
    }

    fn set_cr2(&self, cr2: u64) -> Result<(), PortError> {
        let mut sregs = self
            .get_sregs()
            .map_err(|e| PortError::failed("KVM_GET_SREGS", e))?;
        sregs.cr2 = cr2;
        self.set_sregs(&sregs)
            .map_err(|e| PortError::failed("KVM_SET_SREGS", e))
    }

    fn queue_exception(&self, exception: &Exception) -> Result<(), PortError> {
        let mut events = self
            .get_vcpu_events()
            .map_err(|e| PortError::failed("KVM_GET_VCPU_EVENTS", e))?;
        events.exception.nr = exception.vector;
        events.exception.has_error_code = u8::from(exception.error_code.is_some());
        events.exception.error_code = exception.error_code.unwrap_or(0);
        match exception.payload {
            Some(payload) => {
                events.exception.pending = 1;
                events.exception.injected = 0;
                events.exception_has_payload = 1;
                events.exception_payload = payload;
                events.flags |= KVM_VCPUEVENT_VALID_PAYLOAD;
            }
            None => {
                events.exception.injected = 1;
                events.exception.pending = 0;
                events.exception_has_payload = 0;
                events.flags &= !KVM_VCPUEVENT_VALID_PAYLOAD;
            }
        }
        self.set_vcpu_events(&events)
            .map_err(|e| PortError::failed("KVM_SET_VCPU_EVENTS", e))
    }
}

#[cfg(all(test, feature = "ept"))]
mod tests {
    use mmu_api::Gpa;

    use super::*;
    use mmu_backends::BackendKind;

    use crate::test_support::{Call, RecordingBus, ept, vcpu};

    #[test]
    fn mmio_exits_are_served_in_place() {
        let (_port, backend) = ept();
        let mut exits = vcpu(&*backend, 0);
        let mut bus = RecordingBus::default();
        // The data area of the exit, as it sits in the kvm_run page.
        let mut run_data = [0u8; 8];
        let exit = VcpuExit::MmioRead(0xfee0_0020, &mut run_data[..4]);
        let routed = exits.handle_kvm_exit(exit, &mut bus).unwrap();
        assert!(
            matches!(routed, Routed::Handled(Action::Resume)),
            "{routed:?}"
        );
        assert_eq!(run_data, [0xa0, 0xa1, 0xa2, 0xa3, 0, 0, 0, 0]);
        let exit = VcpuExit::MmioWrite(0xfee0_00b0, &[0, 0, 0, 0]);
        assert!(matches!(
            exits.handle_kvm_exit(exit, &mut bus).unwrap(),
            Routed::Handled(Action::Resume)
        ));
        assert_eq!(
            bus.calls,
            [
                Call::MmioRead(Gpa(0xfee0_0020), 4),
                Call::MmioWrite(Gpa(0xfee0_00b0), vec![0; 4])
            ]
        );
        assert_eq!(exits.stats().mmio_exits, 2);
    }

    #[test]
    fn exits_in_the_mmio_window_are_for_the_guest_frame_at_the_offset() {
        let (_port, backend) = ept();
        let mut exits = vcpu(&*backend, 0);
        let window = mmu_api::Hpa(1 << 45);
        exits.set_mmio_window(Some(window));
        exits.record_mmio_service_times(true);
        let mut bus = RecordingBus::default();
        let mut run_data = [0u8; 4];
        let exit = VcpuExit::MmioRead((1 << 45) + 0xfee0_0020, &mut run_data);
        exits.handle_kvm_exit(exit, &mut bus).unwrap();
        let exit = VcpuExit::MmioWrite((1 << 45) + 0xfee0_00b0, &[1, 2]);
        exits.handle_kvm_exit(exit, &mut bus).unwrap();
        // Below the window an address is a guest-physical one.
        let exit = VcpuExit::MmioWrite(0xfee0_00b0, &[3]);
        exits.handle_kvm_exit(exit, &mut bus).unwrap();
        assert_eq!(
            bus.calls,
            [
                Call::MmioRead(Gpa(0xfee0_0020), 4),
                Call::MmioWrite(Gpa(0xfee0_00b0), vec![1, 2]),
                Call::MmioWrite(Gpa(0xfee0_00b0), vec![3]),
            ]
        );
        assert_eq!(run_data, [0xa0, 0xa1, 0xa2, 0xa3]);
        // The two window exits were answered by an MMIO leaf: the cached
        // path.
        assert!(exits.take_mmio_service_times().cached_ns.len() >= 2);
    }

    #[test]
    fn other_exits_come_back_untouched() {
        let (_port, backend) = ept();
        let mut exits = vcpu(&*backend, 0);
        let mut bus = RecordingBus::default();
        let mut port_data = [0x55u8; 2];
        let exit = VcpuExit::IoIn(0x3f8, &mut port_data);
        match exits.handle_kvm_exit(exit, &mut bus).unwrap() {
            Routed::Unhandled(VcpuExit::IoIn(port, data)) => {
                assert_eq!(port, 0x3f8);
                data[0] = 0x42;
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(port_data, [0x42, 0x55]);
        match exits.handle_kvm_exit(VcpuExit::Hlt, &mut bus).unwrap() {
            Routed::Unhandled(VcpuExit::Hlt) => {}
            other => panic!("{other:?}"),
        }
        assert!(bus.calls.is_empty());
        assert_eq!(exits.stats().unhandled, 2);
        assert_eq!(exits.stats().mmio_exits, 0);
    }

    #[test]
    fn kvm_memory_regions_carry_the_flags() {
        use mmu_api::{HostBacking, HostVirtAddr, Hpa, Memslot, MemslotFlags, SlotId};
        let slot = Memslot::new(
            SlotId(7),
            Gpa(0x10_0000),
            0x20_0000,
            HostBacking {
                hpa: Hpa(0x10_0000),
                host_addr: HostVirtAddr(0x7f00_0000_0000),
            },
            MemslotFlags::LOG_DIRTY | MemslotFlags::READONLY,
        );
        let region = kvm_region(&crate::ports::guest_region(&slot, slot.size));
        assert_eq!(region.slot, 7);
        assert_eq!(region.guest_phys_addr, 0x10_0000);
        assert_eq!(region.memory_size, 0x20_0000);
        assert_eq!(region.userspace_addr, 0x7f00_0000_0000);
        assert_eq!(
            region.flags,
            kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES | kvm_bindings::KVM_MEM_READONLY
        );
        let delete = kvm_region(&crate::ports::guest_region(
            &{
                let mut m = slot;
                m.flags = MemslotFlags::empty();
                m
            },
            0,
        ));
        assert_eq!((delete.memory_size, delete.flags), (0, 0));
    }

    #[test]
    fn compiled_in_backends_are_hostable() {
        assert!(check_hostable(BackendKind::Ept).is_ok());
        #[cfg(feature = "shadow")]
        assert!(check_hostable(BackendKind::Shadow).is_ok());
        #[cfg(not(feature = "shadow"))]
        assert!(matches!(
            check_hostable(BackendKind::Shadow),
            Err(KvmHostError::Create(
                mmu_backends::CreateError::NotCompiledIn { .. }
            ))
        ));
    }

    #[test]
    fn host_errors_say_what_is_missing() {
        let message = ApplyError::NeedsEmulation {
            action: Action::EmulateMmio { gpa: Gpa(0x1000) },
        }
        .to_string();
        assert!(message.contains("must be emulated by the VMM"), "{message}");
    }
}
