//! Carrying an [`Action`] out on a vCPU, through its [`VcpuPort`].

use mmu_api::RootLoad;
use tracing::debug;

use crate::exits::Action;
use crate::host::PageFaultDelivery;
use crate::ports::{Exception, PortError, VcpuPort};

/// The x86 #PF vector.
const PF_VECTOR: u8 = 14;
/// The x86 #GP vector.
const GP_VECTOR: u8 = 13;

/// Why [`apply_action`] could not carry an action out.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApplyError {
    /// The vCPU port failed (or the host cannot do what the action needs).
    #[error("the vCPU could not carry out {action:?}")]
    Port {
        /// The action.
        action: Action,
        /// The port's error.
        #[source]
        source: PortError,
    },
    /// The action needs an instruction emulator, which this crate does not
    /// have: the VMM must decode and perform the instruction at RIP.
    #[error("the instruction at RIP must be emulated by the VMM ({action:?})")]
    NeedsEmulation {
        /// The action (EmulateMmio or EmulateWrite).
        action: Action,
    },
    /// A TLB flush without a new root: KVM has no ioctl that flushes a
    /// vCPU's guest TLB alone.
    #[error("KVM cannot flush a vCPU's TLB without loading a new root")]
    FlushWithoutRoot,
}

impl ApplyError {
    /// The operating-system error number behind a port failure.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            ApplyError::Port { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// Carries out `action` on a vCPU, before its next entry.
///
/// - [`Action::Resume`] needs nothing.
/// - [`Action::LoadRoot`] with a root: CR3 is set to it (on KVM with
///   `KVM_SET_SREGS`, which resets KVM's MMU context for the vCPU and drops
///   the translations of the old root).
/// - [`Action::InjectPageFault`] / [`Action::InjectGeneralProtection`]:
///   the exception is queued (on KVM with `KVM_SET_VCPU_EVENTS`, see
///   [`PageFaultDelivery`]); the hypervisor delivers it on entry, after
///   completing an instruction an exit left pending.
/// - [`Action::EmulateMmio`] / [`Action::EmulateWrite`]:
///   [`ApplyError::NeedsEmulation`].
pub fn apply_action<P: VcpuPort + ?Sized>(
    vcpu: &P,
    action: Action,
    delivery: PageFaultDelivery,
) -> Result<(), ApplyError> {
    let port = |source| ApplyError::Port { action, source };
    match action {
        Action::Resume => Ok(()),
        Action::LoadRoot(RootLoad {
            root: Some(root), ..
        }) => {
            vcpu.set_cr3(root.raw()).map_err(port)?;
            debug!(root = root.raw(), "new root loaded into CR3");
            Ok(())
        }
        Action::LoadRoot(RootLoad { root: None, .. }) => Err(ApplyError::FlushWithoutRoot),
        Action::InjectPageFault { error_code, cr2 } => {
            let payload = match delivery {
                PageFaultDelivery::Payload => Some(cr2.raw()),
                PageFaultDelivery::SetCr2 => {
                    vcpu.set_cr2(cr2.raw()).map_err(port)?;
                    None
                }
            };
            vcpu.queue_exception(&Exception {
                vector: PF_VECTOR,
                error_code: Some(error_code.bits()),
                payload,
            })
            .map_err(port)?;
            debug!(
                error_code = error_code.bits(),
                cr2 = cr2.raw(),
                ?delivery,
                "#PF queued for the guest"
            );
            Ok(())
        }
        Action::InjectGeneralProtection => {
            vcpu.queue_exception(&Exception {
                vector: GP_VECTOR,
                error_code: Some(0),
                payload: None,
            })
            .map_err(port)?;
            debug!("#GP(0) queued for the guest");
            Ok(())
        }
        Action::EmulateMmio { .. } | Action::EmulateWrite { .. } => {
            Err(ApplyError::NeedsEmulation { action })
        }
    }
}
