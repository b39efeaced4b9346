//! MSHV: intercept messages (mshv-bindings' `hv_message`) decoded into the
//! same MMU calls (feature `mshv`).
//!
//! On MSHV the vCPU's run ioctl returns an `hv_message`. Three kinds are
//! the MMU's business:
//!
//! | message | payload | MMU call |
//! | --- | --- | --- |
//! | `HVMSG_UNMAPPED_GPA` (no memory at the GPA) | `hv_x64_memory_intercept_message` | [`VcpuExits::classify`] |
//! | `HVMSG_GPA_INTERCEPT` (an intercepted access to mapped memory, e.g. a write to a read-only mapping) | `hv_x64_memory_intercept_message` | [`VcpuExits::classify`] |
//! | `HVMSG_X64_EXCEPTION_INTERCEPT` with vector 14 (an intercepted #PF) | `hv_x64_exception_intercept_message` | [`VcpuExits::page_fault`] |
//!
//! Unlike KVM, MSHV has not performed the access when it reports it: an
//! MMIO access comes back as [`Action::EmulateMmio`] (the VMM's emulator
//! decodes `instruction_bytes` and runs the instruction against its bus,
//! as Cloud Hypervisor's MSHV vCPU does), and an access that memory was
//! added for meanwhile comes back as [`Action::Resume`] (re-executing it
//! now reaches the memory).
//!
//! mshv-bindings 0.7 ships its bindings pre-generated: it has no build
//! script and needs neither bindgen nor libclang (only `num_enum` and
//! `zerocopy` from crates.io), so this module builds and its tests run on
//! any x86-64 Linux host, with or without `/dev/mshv`.

use mmu_api::{Gpa, Gva, MmioClass, PfErrorCode};
use mshv_bindings::{
    HV_INTERCEPT_ACCESS_EXECUTE, HV_INTERCEPT_ACCESS_WRITE, hv_message,
    hv_message_type_HVMSG_GPA_INTERCEPT, hv_message_type_HVMSG_UNMAPPED_GPA,
    hv_message_type_HVMSG_X64_EXCEPTION_INTERCEPT, hv_x64_memory_intercept_message,
};
use tracing::trace;

use crate::error::ExitError;
use crate::exits::{Action, VcpuExits};

/// The x86 #PF vector.
const PF_VECTOR: u16 = 14;

/// The instruction behind an intercept, as the hypervisor fetched it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Instruction {
    /// RIP of the instruction.
    pub rip: u64,
    /// Its first bytes (`len` of them are valid).
    pub bytes: [u8; 16],
    /// How many of `bytes` the hypervisor fetched.
    pub len: usize,
}

impl Instruction {
    /// The fetched bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes[..self.len.min(16)]
    }
}

/// What [`VcpuExits::handle_mshv_message`] decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MshvRouted {
    /// The MMU's answer, with the instruction that caused the intercept
    /// (the emulator needs it for [`Action::EmulateMmio`]).
    Handled {
        /// What the vCPU loop does next.
        action: Action,
        /// The intercepted instruction.
        instruction: Instruction,
        /// The guest-virtual address accessed, when the hypervisor knew it.
        gva: Option<Gva>,
    },
    /// Not the MMU's business: the VMM handles the message itself.
    Unhandled,
}

impl VcpuExits {
    /// Decodes one MSHV intercept message into MMU calls (see the module
    /// docs for which messages).
    pub fn handle_mshv_message(&mut self, message: &hv_message) -> Result<MshvRouted, ExitError> {
        let message_type = message.header.message_type;
        if message_type == hv_message_type_HVMSG_UNMAPPED_GPA
            || message_type == hv_message_type_HVMSG_GPA_INTERCEPT
        {
            let Ok(info) = message.to_memory_info() else {
                self.count_unhandled();
                return Ok(MshvRouted::Unhandled);
            };
            return self.memory_intercept(&info);
        }
        if message_type == hv_message_type_HVMSG_X64_EXCEPTION_INTERCEPT {
            let Ok(info) = message.to_exception_info() else {
                self.count_unhandled();
                return Ok(MshvRouted::Unhandled);
            };
            let vector = info.exception_vector;
            if vector != PF_VECTOR {
                self.count_unhandled();
                return Ok(MshvRouted::Unhandled);
            }
            let cr2 = Gva(info.exception_parameter);
            let error_code = PfErrorCode::from_bits_retain(info.error_code);
            let header = info.header;
            let instruction = Instruction {
                rip: header.rip,
                bytes: info.instruction_bytes,
                len: usize::from(info.instruction_byte_count),
            };
            trace!(
                vcpu = self.id().0,
                cr2 = cr2.raw(),
                error_code = error_code.bits(),
                rip = instruction.rip,
                "MSHV #PF intercept"
            );
            let action = self.page_fault(cr2, error_code)?;
            return Ok(MshvRouted::Handled {
                action,
                instruction,
                gva: Some(cr2),
            });
        }
        self.count_unhandled();
        Ok(MshvRouted::Unhandled)
    }

    fn memory_intercept(
        &mut self,
        info: &hv_x64_memory_intercept_message,
    ) -> Result<MshvRouted, ExitError> {
        let header = info.header;
        let gpa = Gpa(info.guest_physical_address);
        let access = u32::from(header.intercept_access_type);
        // SAFETY: both members of this union are one byte of plain
        // integer bits (the raw byte and its bit-field view); every value
        // is valid for `as_uint8`.
        let access_info = unsafe { info.memory_access_info.as_uint8 };
        let gva = (access_info & 1 != 0).then_some(Gva(info.guest_virtual_address));
        let instruction = Instruction {
            rip: header.rip,
            bytes: info.instruction_bytes,
            len: usize::from(info.instruction_byte_count),
        };
        trace!(
            vcpu = self.id().0,
            gpa = gpa.raw(),
            access,
            rip = instruction.rip,
            "MSHV memory intercept"
        );
        if access == HV_INTERCEPT_ACCESS_EXECUTE {
            return match self.classify(gpa, false) {
                MmioClass::Memory { .. } => Ok(MshvRouted::Handled {
                    action: Action::Resume,
                    instruction,
                    gva,
                }),
                _ => Err(ExitError::FetchFromMmio(gpa)),
            };
        }
        let is_write = access == HV_INTERCEPT_ACCESS_WRITE;
        let action = match self.classify(gpa, is_write) {
            MmioClass::Memory { .. } => Action::Resume,
            _ => {
                self.count_emulation();
                Action::EmulateMmio { gpa }
            }
        };
        Ok(MshvRouted::Handled {
            action,
            instruction,
            gva,
        })
    }
}

#[cfg(all(test, feature = "ept"))]
mod tests {
    use mmu_api::MemslotFlags;
    use mshv_bindings::{
        HV_INTERCEPT_ACCESS_READ, hv_message_type_HVMSG_X64_HALT,
        hv_x64_exception_intercept_message,
    };

    use super::*;
    use crate::test_support::{add_ram, ept, leak_ram, vcpu};

    /// An `hv_message` of `message_type` carrying `payload`, as the MSHV
    /// run ioctl fills it.
    fn message<T: Copy>(message_type: u32, payload: T) -> hv_message {
        let size = size_of::<T>();
        assert!(size <= 240, "payload of {size} bytes");
        let mut msg = hv_message::default();
        msg.header.message_type = message_type;
        msg.header.payload_size = size as u8;
        let at = std::ptr::addr_of_mut!(msg.u.payload).cast::<T>();
        // SAFETY: `at` points to the message's 240-byte payload, which `T`
        // fits in (checked above); the write is unaligned-safe, and every
        // payload type here is plain integer data.
        unsafe { at.write_unaligned(payload) };
        msg
    }

    fn memory_message(message_type: u32, access: u32, gpa: u64, gva: Option<u64>) -> hv_message {
        let mut info = hv_x64_memory_intercept_message::default();
        info.header.vp_index = 0;
        info.header.intercept_access_type = access as u8;
        info.header.rip = 0xffff_8000_0010_0000;
        info.guest_physical_address = gpa;
        if let Some(gva) = gva {
            info.guest_virtual_address = gva;
            info.memory_access_info.as_uint8 = 1;
        }
        info.instruction_byte_count = 3;
        info.instruction_bytes[..3].copy_from_slice(&[0x89, 0x07, 0x90]);
        message(message_type, info)
    }

    fn exception_message(vector: u16, error_code: u32, parameter: u64) -> hv_message {
        let mut info = hv_x64_exception_intercept_message {
            exception_vector: vector,
            error_code,
            exception_parameter: parameter,
            ..Default::default()
        };
        info.header.rip = 0x40_1000;
        info.instruction_byte_count = 2;
        info.instruction_bytes[..2].copy_from_slice(&[0x8b, 0x00]);
        message(hv_message_type_HVMSG_X64_EXCEPTION_INTERCEPT, info)
    }

    #[test]
    fn unmapped_gpa_to_a_device_is_emulated() {
        let (_port, backend) = ept();
        let mut exits = vcpu(&*backend, 0);
        let msg = memory_message(
            hv_message_type_HVMSG_UNMAPPED_GPA,
            HV_INTERCEPT_ACCESS_WRITE,
            0xd000_0040,
            Some(0xffff_c000_0000_0040),
        );
        let routed = exits.handle_mshv_message(&msg).unwrap();
        let MshvRouted::Handled {
            action,
            instruction,
            gva,
        } = routed
        else {
            panic!("{routed:?}");
        };
        assert_eq!(
            action,
            Action::EmulateMmio {
                gpa: Gpa(0xd000_0040)
            }
        );
        assert_eq!(instruction.rip, 0xffff_8000_0010_0000);
        assert_eq!(instruction.bytes(), [0x89, 0x07, 0x90]);
        assert_eq!(gva, Some(Gva(0xffff_c000_0000_0040)));
        let stats = exits.stats();
        assert_eq!((stats.mmio_exits, stats.emulations), (1, 1));

        // The same page again: a classification cache hit, no GVA.
        let msg = memory_message(
            hv_message_type_HVMSG_UNMAPPED_GPA,
            HV_INTERCEPT_ACCESS_READ,
            0xd000_0048,
            None,
        );
        match exits.handle_mshv_message(&msg).unwrap() {
            MshvRouted::Handled { action, gva, .. } => {
                assert_eq!(
                    action,
                    Action::EmulateMmio {
                        gpa: Gpa(0xd000_0048)
                    }
                );
                assert_eq!(gva, None);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(backend.stats().get("mmio_cache_hits"), Some(1));
    }

    #[test]
    fn memory_added_meanwhile_is_retried() {
        let (_port, backend) = ept();
        add_ram(
            &*backend,
            leak_ram(0x2000),
            0,
            0x8000,
            MemslotFlags::empty(),
        );
        let mut exits = vcpu(&*backend, 0);
        for access in [
            HV_INTERCEPT_ACCESS_READ,
            HV_INTERCEPT_ACCESS_WRITE,
            HV_INTERCEPT_ACCESS_EXECUTE,
        ] {
            let msg = memory_message(hv_message_type_HVMSG_UNMAPPED_GPA, access, 0x8010, None);
            match exits.handle_mshv_message(&msg).unwrap() {
                MshvRouted::Handled { action, .. } => assert_eq!(action, Action::Resume),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(exits.stats().emulations, 0);
    }

    #[test]
    fn gpa_intercept_on_a_readonly_slot_emulates_the_write() {
        let (_port, backend) = ept();
        add_ram(
            &*backend,
            leak_ram(0x1000),
            2,
            0xf_0000,
            MemslotFlags::READONLY,
        );
        let mut exits = vcpu(&*backend, 0);
        let msg = memory_message(
            hv_message_type_HVMSG_GPA_INTERCEPT,
            HV_INTERCEPT_ACCESS_WRITE,
            0xf_0008,
            None,
        );
        match exits.handle_mshv_message(&msg).unwrap() {
            MshvRouted::Handled { action, .. } => {
                assert_eq!(action, Action::EmulateMmio { gpa: Gpa(0xf_0008) });
            }
            other => panic!("{other:?}"),
        }
        // A read of the same ROM is memory: retried.
        let msg = memory_message(
            hv_message_type_HVMSG_GPA_INTERCEPT,
            HV_INTERCEPT_ACCESS_READ,
            0xf_0008,
            None,
        );
        match exits.handle_mshv_message(&msg).unwrap() {
            MshvRouted::Handled { action, .. } => assert_eq!(action, Action::Resume),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn fetch_from_a_device_is_an_error() {
        let (_port, backend) = ept();
        let mut exits = vcpu(&*backend, 0);
        let msg = memory_message(
            hv_message_type_HVMSG_UNMAPPED_GPA,
            HV_INTERCEPT_ACCESS_EXECUTE,
            0xfed0_0000,
            None,
        );
        let err = exits.handle_mshv_message(&msg).unwrap_err();
        assert!(
            matches!(err, ExitError::FetchFromMmio(Gpa(0xfed0_0000))),
            "{err:?}"
        );
    }

    #[test]
    fn page_fault_intercepts_reach_the_mmu() {
        let (_port, backend) = ept();
        let mut exits = vcpu(&*backend, 0);
        let msg = exception_message(14, 0b110, 0x7fff_0000_1234);
        match exits.handle_mshv_message(&msg).unwrap() {
            MshvRouted::Handled {
                action,
                instruction,
                gva,
            } => {
                assert_eq!(
                    action,
                    Action::InjectPageFault {
                        error_code: PfErrorCode::WRITE | PfErrorCode::USER,
                        cr2: Gva(0x7fff_0000_1234)
                    }
                );
                assert_eq!(instruction.rip, 0x40_1000);
                assert_eq!(instruction.bytes(), [0x8b, 0x00]);
                assert_eq!(gva, Some(Gva(0x7fff_0000_1234)));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(exits.stats().page_faults, 1);
        assert_eq!(backend.stats().get("page_faults_reflected"), Some(1));
    }

    #[test]
    fn other_messages_are_not_the_mmus() {
        let (_port, backend) = ept();
        let mut exits = vcpu(&*backend, 0);
        // #GP intercept, a HLT message, and a memory message whose
        // declared type does not match its decoder.
        let gp = exception_message(13, 0, 0);
        let mut halt = hv_message::default();
        halt.header.message_type = hv_message_type_HVMSG_X64_HALT;
        for msg in [gp, halt] {
            assert_eq!(
                exits.handle_mshv_message(&msg).unwrap(),
                MshvRouted::Unhandled
            );
        }
        assert_eq!(exits.stats().unhandled, 2);
        assert_eq!(exits.stats().page_faults, 0);
        assert_eq!(exits.stats().mmio_exits, 0);
    }
}
