//! What the shadow hosting needs from one vCPU, and its implementation over
//! kvm-ioctls' `VcpuFd` and a guest-memory accessor.

use std::fmt;

use kvm_bindings::{kvm_regs, kvm_sregs, kvm_vcpu_events};
use kvm_ioctls::VcpuFd;
use mmu_api::Gpa;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use super::HostingError;
use crate::ports::PortError;

/// One vCPU as the shadow hosting sees it during an exit: its registers
/// and events, and guest memory by guest-physical address.
///
/// [`KvmPvVcpu`] implements it over a `VcpuFd`; a VMM with its own vCPU
/// context (one that caches registers, say) implements it there.
pub trait PvVcpu {
    /// The general registers.
    fn get_regs(&mut self) -> Result<kvm_regs, PortError>;
    /// Replaces the general registers.
    fn set_regs(&mut self, regs: &kvm_regs) -> Result<(), PortError>;
    /// The special registers (control registers, segments).
    fn get_sregs(&mut self) -> Result<kvm_sregs, PortError>;
    /// Replaces the special registers.
    fn set_sregs(&mut self, sregs: &kvm_sregs) -> Result<(), PortError>;
    /// The vCPU's pending and injected events.
    fn get_vcpu_events(&mut self) -> Result<kvm_vcpu_events, PortError>;
    /// Replaces them.
    fn set_vcpu_events(&mut self, events: &kvm_vcpu_events) -> Result<(), PortError>;
    /// Lets the hypervisor finish an instruction the last exit left
    /// pending (a port read the guest waits for) without running guest
    /// code, so that register changes made now are not undone by it. The
    /// registers may change; an implementation that caches them drops its
    /// copy.
    fn complete_pending_io(&mut self) -> Result<(), PortError>;
    /// Reads guest memory at `gpa`.
    fn read_guest(&mut self, gpa: Gpa, data: &mut [u8]) -> Result<(), GuestMemoryError>;
    /// Writes guest memory at `gpa` (guest data only: page-table entries
    /// written from the host are not seen by a KVM that shadows guest
    /// tables).
    fn write_guest(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), GuestMemoryError>;

    /// Reads the little-endian u64 at `gpa`.
    fn read_guest_u64(&mut self, gpa: Gpa) -> Result<u64, HostingError> {
        let mut bytes = [0u8; 8];
        self.read_guest(gpa, &mut bytes)
            .map_err(|source| HostingError::Memory { gpa, source })?;
        Ok(u64::from_le_bytes(bytes))
    }

    /// Writes the little-endian u64 at `gpa`.
    fn write_guest_u64(&mut self, gpa: Gpa, value: u64) -> Result<(), HostingError> {
        self.write_guest(gpa, &value.to_le_bytes())
            .map_err(|source| HostingError::Memory { gpa, source })
    }
}

/// Lets KVM finish an instruction left pending by the last exit (the
/// guest's hypercalls are port reads): with `immediate_exit` set,
/// `KVM_RUN` completes it and returns without running guest code.
pub fn complete_pending_io(fd: &mut VcpuFd) -> Result<(), PortError> {
    fd.set_kvm_immediate_exit(1);
    let result = fd.run().map(|_| ());
    fd.set_kvm_immediate_exit(0);
    match result {
        Ok(()) => Ok(()),
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(()),
        Err(e) => Err(PortError::failed("KVM_RUN", e)),
    }
}

/// [`PvVcpu`] over kvm-ioctls' `VcpuFd` and guest memory `M` (a
/// vm-memory `GuestMemoryMmap`, say). The general registers are read once
/// and cached until they are set or a pending instruction is completed.
pub struct KvmPvVcpu<'a, M: ?Sized> {
    fd: &'a mut VcpuFd,
    memory: &'a M,
    regs: Option<kvm_regs>,
}

impl<M: ?Sized> fmt::Debug for KvmPvVcpu<'_, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KvmPvVcpu")
            .field("regs_cached", &self.regs.is_some())
            .finish_non_exhaustive()
    }
}

impl<'a, M: ?Sized> KvmPvVcpu<'a, M> {
    /// The vCPU `fd` with guest memory `memory`, for the length of one exit.
    pub fn new(fd: &'a mut VcpuFd, memory: &'a M) -> Self {
        KvmPvVcpu {
            fd,
            memory,
            regs: None,
        }
    }

    /// The vCPU's file descriptor.
    pub fn fd(&mut self) -> &mut VcpuFd {
        self.fd
    }
}

/// A vCPU context over kvm-ioctls' `VcpuFd` that caches the general
/// registers between the hypervisor's calls: giving out its parts makes it
/// a [`PvVcpu`] (registers read once and cached until set or until a
/// pending instruction is completed). [`KvmPvVcpu`] is one; a VMM's own
/// per-exit context can be another and share its cache with the hosting.
pub trait KvmVcpuContext {
    /// The guest memory type.
    type Memory: Bytes<GuestAddress, E = GuestMemoryError> + ?Sized;

    /// The vCPU, its register cache and guest memory.
    fn kvm_parts(&mut self) -> (&mut VcpuFd, &mut Option<kvm_regs>, &Self::Memory);
}

impl<M> KvmVcpuContext for KvmPvVcpu<'_, M>
where
    M: Bytes<GuestAddress, E = GuestMemoryError> + ?Sized,
{
    type Memory = M;

    fn kvm_parts(&mut self) -> (&mut VcpuFd, &mut Option<kvm_regs>, &M) {
        (self.fd, &mut self.regs, self.memory)
    }
}

impl<T: KvmVcpuContext> PvVcpu for T {
    fn get_regs(&mut self) -> Result<kvm_regs, PortError> {
        let (fd, cache, _) = self.kvm_parts();
        if let Some(regs) = *cache {
            return Ok(regs);
        }
        let regs = fd
            .get_regs()
            .map_err(|e| PortError::failed("KVM_GET_REGS", e))?;
        *cache = Some(regs);
        Ok(regs)
    }

    fn set_regs(&mut self, regs: &kvm_regs) -> Result<(), PortError> {
        let (fd, cache, _) = self.kvm_parts();
        fd.set_regs(regs)
            .map_err(|e| PortError::failed("KVM_SET_REGS", e))?;
        *cache = Some(*regs);
        Ok(())
    }

    fn get_sregs(&mut self) -> Result<kvm_sregs, PortError> {
        self.kvm_parts()
            .0
            .get_sregs()
            .map_err(|e| PortError::failed("KVM_GET_SREGS", e))
    }

    fn set_sregs(&mut self, sregs: &kvm_sregs) -> Result<(), PortError> {
        self.kvm_parts()
            .0
            .set_sregs(sregs)
            .map_err(|e| PortError::failed("KVM_SET_SREGS", e))
    }

    fn get_vcpu_events(&mut self) -> Result<kvm_vcpu_events, PortError> {
        self.kvm_parts()
            .0
            .get_vcpu_events()
            .map_err(|e| PortError::failed("KVM_GET_VCPU_EVENTS", e))
    }

    fn set_vcpu_events(&mut self, events: &kvm_vcpu_events) -> Result<(), PortError> {
        self.kvm_parts()
            .0
            .set_vcpu_events(events)
            .map_err(|e| PortError::failed("KVM_SET_VCPU_EVENTS", e))
    }

    fn complete_pending_io(&mut self) -> Result<(), PortError> {
        let (fd, cache, _) = self.kvm_parts();
        *cache = None;
        complete_pending_io(fd)
    }

    fn read_guest(&mut self, gpa: Gpa, data: &mut [u8]) -> Result<(), GuestMemoryError> {
        self.kvm_parts().2.read_slice(data, GuestAddress(gpa.raw()))
    }

    fn write_guest(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), GuestMemoryError> {
        self.kvm_parts()
            .2
            .write_slice(data, GuestAddress(gpa.raw()))
    }
}

/// The kind of read exit whose answer [`complete_read`] writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReadExit {
    /// A port read (`KVM_EXIT_IO`, direction in).
    Io,
    /// An MMIO read (`KVM_EXIT_MMIO`, not a write).
    Mmio,
}

/// Writes `bytes` (truncated or zero-padded to the access size) as the
/// answer to the read exit `KVM_RUN` last returned on `fd`, which KVM hands
/// to the guest on the next `KVM_RUN`.
///
/// The data area is found again from `kvm_run` through this borrow of
/// `fd` (nothing is kept from the exit but its kind and size), and only
/// if `kvm_run` still describes a read exit of `kind` with `len` bytes.
/// This is how a host answers a hypercall of the paravirtual MMU ABI (a
/// 4-byte port read) after the exit's borrow of the vCPU ended.
pub fn complete_read(
    fd: &mut VcpuFd,
    kind: ReadExit,
    len: usize,
    bytes: &[u8],
) -> Result<(), HostingError> {
    let run = fd.get_kvm_run();
    let Some(area) = read_area(run, kind).filter(|area| area.len() == len) else {
        return Err(HostingError::NoReadExit { kind, len });
    };
    let n = bytes.len().min(len);
    area[..n].copy_from_slice(&bytes[..n]);
    area[n..].fill(0);
    Ok(())
}

/// The data area of the read exit of `kind` that `run` describes, or None
/// if it describes something else.
fn read_area(run: &mut kvm_bindings::kvm_run, kind: ReadExit) -> Option<&mut [u8]> {
    match kind {
        ReadExit::Io => {
            if run.exit_reason != kvm_bindings::KVM_EXIT_IO {
                return None;
            }
            // SAFETY: the exit reason is KVM_EXIT_IO, so KVM filled the
            // `io` member of the union; it is plain integers.
            let io = unsafe { run.__bindgen_anon_1.io };
            if u32::from(io.direction) != kvm_bindings::KVM_EXIT_IO_IN {
                return None;
            }
            let len = usize::from(io.size) * io.count as usize;
            let offset = usize::try_from(io.data_offset).ok()?;
            let data = std::ptr::from_mut(run).cast::<u8>().wrapping_add(offset);
            // SAFETY: for KVM_EXIT_IO, KVM puts the data `data_offset`
            // bytes into the vCPU's kvm_run mapping, which `fd` keeps
            // mapped and which holds `size * count` bytes there (the same
            // area kvm-ioctls hands out as `VcpuExit::IoIn`). The slice
            // borrows `run`, so it cannot outlive this borrow of the vCPU,
            // and nothing else writes the area before the next KVM_RUN.
            Some(unsafe { std::slice::from_raw_parts_mut(data, len) })
        }
        ReadExit::Mmio => {
            if run.exit_reason != kvm_bindings::KVM_EXIT_MMIO {
                return None;
            }
            // SAFETY: the exit reason is KVM_EXIT_MMIO, so KVM filled the
            // `mmio` member of the union; it is plain integers and bytes.
            let mmio = unsafe { &mut run.__bindgen_anon_1.mmio };
            if mmio.is_write != 0 {
                return None;
            }
            let len = (mmio.len as usize).min(mmio.data.len());
            Some(&mut mmio.data[..len])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_answers_go_only_to_the_read_exit_they_answer() {
        // SAFETY: kvm_run is plain integers, bytes and unions of them; all
        // zeroes is a valid value.
        let mut run: kvm_bindings::kvm_run = unsafe { std::mem::zeroed() };
        run.exit_reason = kvm_bindings::KVM_EXIT_MMIO;
        run.__bindgen_anon_1.mmio.len = 4;
        run.__bindgen_anon_1.mmio.is_write = 0;
        assert!(read_area(&mut run, ReadExit::Io).is_none());
        let area = read_area(&mut run, ReadExit::Mmio).expect("an MMIO read");
        assert_eq!(area.len(), 4);
        area.copy_from_slice(&[1, 2, 3, 4]);
        // SAFETY: the `mmio` member was written above.
        assert_eq!(unsafe { run.__bindgen_anon_1.mmio.data }[..4], [1, 2, 3, 4]);
        run.__bindgen_anon_1.mmio.is_write = 1;
        assert!(read_area(&mut run, ReadExit::Mmio).is_none());
        // A port write is not a read: no area, whatever its offset says.
        run.exit_reason = kvm_bindings::KVM_EXIT_IO;
        run.__bindgen_anon_1.io.direction = kvm_bindings::KVM_EXIT_IO_OUT as u8;
        run.__bindgen_anon_1.io.data_offset = 1 << 40;
        assert!(read_area(&mut run, ReadExit::Io).is_none());
        run.exit_reason = kvm_bindings::KVM_EXIT_HLT;
        assert!(read_area(&mut run, ReadExit::Mmio).is_none());
        assert!(read_area(&mut run, ReadExit::Io).is_none());
    }
}
