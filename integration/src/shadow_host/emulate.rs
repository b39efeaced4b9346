//! Emulation of the instruction a #PF interrupted, when the shadow MMU
//! answers it with MMIO or with a write to a page table it protects.

use kvm_bindings::kvm_regs;
use mmu_api::paging::WalkOptions;
use mmu_api::{Access, AccessKind, AccessMode, Gpa, Gva};

use super::abi::{ExceptionFrame, frame};
use super::insn::{self, MemAccess};
use super::{HostingError, PvVcpu};
use crate::bus::MmioBus;
use crate::exits::VcpuExits;

/// What an emulated instruction accesses.
#[derive(Clone, Copy, Debug)]
pub(super) enum Emulation {
    /// A device register at this address.
    Mmio(Gpa),
    /// A write-protected guest page table at this address.
    PageTableWrite(Gpa),
}

/// Emulates the instruction the exception in `exception` interrupted (its
/// frame is at the kernel's RSP) and moves its RIP past it.
pub(super) fn emulate(
    vcpu: &mut dyn PvVcpu,
    exits: &mut VcpuExits,
    bus: &mut dyn MmioBus,
    exception: &ExceptionFrame,
    target: Emulation,
) -> Result<(), HostingError> {
    let mut kregs = vcpu.get_regs()?;
    let at = exception.at;
    let saved_rdx = vcpu.read_guest_u64(Gpa(at + frame::RDX))?;
    let saved_rax = vcpu.read_guest_u64(Gpa(at + frame::RAX))?;
    let before = [
        saved_rax,
        kregs.rcx,
        saved_rdx,
        kregs.rbx,
        exception.rsp,
        kregs.rbp,
        kregs.rsi,
        kregs.rdi,
        kregs.r8,
        kregs.r9,
        kregs.r10,
        kregs.r11,
        kregs.r12,
        kregs.r13,
        kregs.r14,
        kregs.r15,
    ];
    let bytes = fetch_instruction(vcpu, exits, exception)?;
    let decoded = insn::decode(&bytes, exception.rip)?;
    let mut gprs = before;
    match (target, decoded.access) {
        (Emulation::PageTableWrite(gpa), MemAccess::Store { .. }) => {
            let data = decoded.store_bytes(&gprs).unwrap_or_default();
            exits.write_guest(gpa, &data)?;
        }
        (Emulation::Mmio(gpa), MemAccess::Store { .. }) => {
            let data = decoded.store_bytes(&gprs).unwrap_or_default();
            exits.mmio_write(gpa, &data, bus)?;
        }
        (Emulation::Mmio(gpa), MemAccess::Load { size, .. }) => {
            let mut data = vec![0u8; usize::from(size)];
            exits.mmio_read(gpa, &mut data, bus)?;
            decoded.complete_load(&mut gprs, &data);
        }
        (Emulation::PageTableWrite(gpa), MemAccess::Load { .. }) => {
            return Err(HostingError::ReadAsTableWrite {
                gpa,
                rip: exception.rip,
            });
        }
    }
    let mut regs_changed = false;
    for (index, (&old, &new)) in before.iter().zip(gprs.iter()).enumerate() {
        if old == new {
            continue;
        }
        match index {
            0 => vcpu.write_guest_u64(Gpa(at + frame::RAX), new)?,
            2 => vcpu.write_guest_u64(Gpa(at + frame::RDX), new)?,
            4 => vcpu.write_guest_u64(Gpa(at + frame::RSP), new)?,
            _ => {
                *gpr_mut(&mut kregs, index) = new;
                regs_changed = true;
            }
        }
    }
    if regs_changed {
        vcpu.set_regs(&kregs)?;
    }
    vcpu.write_guest_u64(Gpa(at + frame::RIP), exception.rip + u64::from(decoded.len))
}

fn gpr_mut(regs: &mut kvm_regs, index: usize) -> &mut u64 {
    match index {
        1 => &mut regs.rcx,
        3 => &mut regs.rbx,
        5 => &mut regs.rbp,
        6 => &mut regs.rsi,
        7 => &mut regs.rdi,
        8 => &mut regs.r8,
        9 => &mut regs.r9,
        10 => &mut regs.r10,
        11 => &mut regs.r11,
        12 => &mut regs.r12,
        13 => &mut regs.r13,
        14 => &mut regs.r14,
        _ => &mut regs.r15,
    }
}

/// Up to 15 bytes at the interrupted RIP, read through the guest's own
/// tables (the bytes the CPU fetched).
fn fetch_instruction(
    vcpu: &mut dyn PvVcpu,
    exits: &mut VcpuExits,
    exception: &ExceptionFrame,
) -> Result<Vec<u8>, HostingError> {
    let mode = if exception.cpl() == 3 {
        AccessMode::User
    } else {
        AccessMode::Supervisor
    };
    let access = Access {
        kind: AccessKind::Fetch,
        mode,
    };
    // Stop at the end of the second page: 15 bytes never span more.
    let segments = exits
        .mmu()
        .translate(
            Gva(exception.rip),
            15,
            access,
            WalkOptions::without_accessed_dirty(),
        )
        .map_err(|source| HostingError::Fetch {
            rip: exception.rip,
            source,
        })?;
    let mut bytes = Vec::with_capacity(15);
    for s in segments {
        let mut part = vec![0u8; s.len as usize];
        vcpu.read_guest(s.gpa, &mut part)
            .map_err(|source| HostingError::Memory { gpa: s.gpa, source })?;
        bytes.extend_from_slice(&part);
    }
    Ok(bytes)
}
