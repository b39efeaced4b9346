//! Typed errors, one enum per concern.
//!
//! - [`SetupError`]: creating the VM, its memory, its vCPUs and the guest
//!   image, before any guest code runs.
//! - [`KitError`]: assembling guest code with the guest kit.
//! - [`VcpuError`]: why one vCPU stopped running its guest.
//! - [`RunError`]: why a run of the whole VM failed.

use std::time::Duration;

use mmu_api::{Gpa, VcpuId};

/// A kernel call into KVM failed, with the operation that was attempted.
#[derive(Debug, thiserror::Error)]
#[error("KVM {op} failed")]
pub struct KvmError {
    /// The ioctl or operation, in KVM's terms (`KVM_RUN`, `KVM_SET_SREGS`).
    pub op: &'static str,
    /// The errno KVM returned.
    #[source]
    pub source: kvm_ioctls::Error,
}

impl KvmError {
    pub(crate) fn new(op: &'static str, source: kvm_ioctls::Error) -> Self {
        Self { op, source }
    }
}

/// Building a VM failed before any guest code ran.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// `/dev/kvm` could not be opened (no KVM, or no permission).
    #[error("cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// KVM lacks a capability this VMM needs.
    #[error("KVM lacks the {0} capability")]
    MissingCapability(&'static str),
    /// A KVM call failed.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// 5-level paging was asked for, but KVM's supported CPUID has no LA57.
    #[error("KVM does not offer LA57 (5-level paging)")]
    La57Unavailable,
    /// KVM's CPUID offers LA57 but KVM refuses a vCPU state with CR4.LA57
    /// (PVM on a host that itself uses 4-level paging does this).
    #[error("KVM offers LA57 but rejects 5-level paging (CR4.LA57)")]
    La57Rejected(#[source] kvm_ioctls::Error),
    /// The configuration cannot be laid out in guest memory.
    #[error("invalid VM configuration: {0}")]
    Config(String),
    /// The host could not allocate guest memory.
    #[error("cannot allocate {size:#x} bytes of guest memory")]
    AllocateMemory {
        /// Requested size in bytes.
        size: u64,
        /// What vm-memory reported.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// Writing the guest image (tables, descriptors, code) failed.
    #[error("cannot write the guest image at {gpa}")]
    WriteImage {
        /// Where the write went.
        gpa: Gpa,
        /// What vm-memory reported.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The guest kit could not assemble the kernel.
    #[error("cannot assemble the guest kernel")]
    Kit(#[from] KitError),
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// The MMU backend could not be set up for this VM.
    #[error("cannot set up the MMU backend")]
    Mmu(#[from] mmu_integration::kvm::KvmHostError),
    /// The MMU backend refused guest memory.
    #[error("the MMU backend refused guest memory")]
    Memslot(#[from] mmu_api::MemslotError),
    /// The MMU backend could not create a vCPU.
    #[error("the MMU backend could not create a vCPU")]
    MmuVcpu(#[from] mmu_api::BackendError),
    /// The MMU refused a vCPU's initial paging context.
    #[error("the MMU refused the initial paging context")]
    MmuContext(#[source] mmu_integration::ExitError),
}

/// Assembling guest code failed.
#[derive(Debug, thiserror::Error)]
pub enum KitError {
    /// iced-x86 rejected an instruction or could not encode the block.
    #[error("assembler error in {what}")]
    Asm {
        /// Which piece of guest code was being assembled.
        what: String,
        /// What the assembler said.
        #[source]
        source: iced_x86::IcedError,
    },
    /// The assembled code does not fit the area reserved for it.
    #[error("{what} is {size} bytes, more than the {limit} bytes reserved")]
    TooLarge {
        /// Which piece of guest code.
        what: String,
        /// Its size in bytes.
        size: usize,
        /// The size of its area.
        limit: usize,
    },
    /// A symbol the kit needs was not defined by the assembled code.
    #[error("{what} does not define {symbol}")]
    MissingSymbol {
        /// Which piece of guest code.
        what: String,
        /// The missing symbol.
        symbol: &'static str,
    },
}

/// The direction of a port I/O or MMIO access.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IoDirection {
    /// A read by the guest (`in`, a load).
    Read,
    /// A write by the guest (`out`, a store).
    Write,
}

impl std::fmt::Display for IoDirection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IoDirection::Read => "read",
            IoDirection::Write => "write",
        })
    }
}

/// An exception the guest took, as the guest kit's stub reported it (the
/// frame of the paravirtual MMU ABI).
pub use mmu_integration::shadow_host::abi::ExceptionFrame as GuestException;

/// Why a vCPU stopped running its guest, other than finishing.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// The guest triple-faulted (`KVM_EXIT_SHUTDOWN`).
    #[error("the guest triple-faulted at rip {rip:#x}")]
    TripleFault {
        /// RIP when KVM reported the shutdown.
        rip: u64,
    },
    /// The run's time limit passed; the VMM kicked the vCPU out.
    #[error("the guest ran past the {limit:?} time limit")]
    Timeout {
        /// The limit that passed.
        limit: Duration,
    },
    /// The guest accessed a port nothing serves.
    #[error("the guest made a {size}-byte {direction} of unknown port {port:#x} at rip {rip:#x}")]
    UnknownPort {
        /// The port.
        port: u16,
        /// Read (`in`) or write (`out`).
        direction: IoDirection,
        /// Access size in bytes.
        size: usize,
        /// RIP after the instruction (as KVM reports it on the exit).
        rip: u64,
    },
    /// The guest accessed a guest-physical address with no memory and no device.
    #[error("the guest made a {size}-byte MMIO {direction} of unknown address {gpa}")]
    UnknownMmio {
        /// The address.
        gpa: Gpa,
        /// Read or write.
        direction: IoDirection,
        /// Access size in bytes.
        size: usize,
    },
    /// A guest-kit hypercall port was used with the wrong size or direction.
    #[error("malformed hypercall on port {port:#x}: {size}-byte {direction}")]
    BadHypercall {
        /// The port.
        port: u16,
        /// Read or write.
        direction: IoDirection,
        /// Access size in bytes.
        size: usize,
    },
    /// A CPL3 workload made a system call the guest kernel does not have.
    #[error("the guest made unknown system call {number}")]
    UnknownSyscall {
        /// The number in RAX.
        number: u64,
    },
    /// The guest took an exception and nothing resolved it.
    #[error("the guest took {0}")]
    GuestException(GuestException),
    /// The guest executed HLT (the kit never does; without an in-kernel
    /// interrupt controller nothing would wake it).
    #[error("the guest halted at rip {rip:#x}")]
    Halted {
        /// RIP after the HLT.
        rip: u64,
    },
    /// KVM could not run or emulate the guest (`KVM_EXIT_INTERNAL_ERROR`).
    #[error("KVM internal error {suberror} at rip {rip:#x} (data {data:x?})")]
    Internal {
        /// The sub-error (1: emulation failure).
        suberror: u32,
        /// Extra words KVM supplied.
        data: Vec<u64>,
        /// RIP at the exit.
        rip: u64,
    },
    /// KVM refused to enter the guest (`KVM_EXIT_FAIL_ENTRY`).
    #[error("KVM failed to enter the guest: hardware reason {reason:#x}")]
    FailEntry {
        /// The hardware entry failure reason.
        reason: u64,
    },
    /// An exit this VMM does not handle.
    #[error("unexpected exit {exit} at rip {rip:#x}")]
    UnexpectedExit {
        /// The exit, as kvm-ioctls names it.
        exit: String,
        /// RIP at the exit.
        rip: u64,
    },
    /// Another vCPU of the VM failed, so this one was stopped.
    #[error("stopped because another vCPU failed")]
    Aborted,
    /// A KVM call failed.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// Reading or writing guest memory on the guest's behalf failed.
    #[error("cannot access guest memory at {gpa}")]
    Memory {
        /// The address.
        gpa: Gpa,
        /// What vm-memory reported.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// An exit handler supplied by the caller failed.
    #[error("exit handler failed: {0}")]
    Handler(String),
    /// The MMU exit handler could not complete an exit.
    #[error("the MMU exit handler failed")]
    Mmu(#[from] mmu_integration::ExitError),
    /// The MMU's answer could not be carried out on the vCPU.
    #[error("cannot carry out the MMU's action on the vCPU")]
    MmuAction(#[from] mmu_integration::kvm::ApplyError),
    /// The shadow backend's hosting could not serve an exit.
    #[error("the shadow hosting failed")]
    Hosting(#[from] mmu_integration::shadow_host::HostingError),
}

/// A run of the VM failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The program or arguments do not fit this VM.
    #[error("invalid run request: {0}")]
    Request(String),
    /// Loading the program or the vCPUs' registers failed.
    #[error("cannot prepare the run")]
    Setup(#[from] SetupError),
    /// A vCPU stopped with an error; the others were stopped too.
    #[error("{vcpu} failed")]
    Vcpu {
        /// The first vCPU that failed.
        vcpu: VcpuId,
        /// Why.
        #[source]
        source: VcpuError,
    },
}

impl RunError {
    /// The vCPU error, if a vCPU failed.
    pub fn vcpu_error(&self) -> Option<&VcpuError> {
        match self {
            RunError::Vcpu { source, .. } => Some(source),
            _ => None,
        }
    }
}
