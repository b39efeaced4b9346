//! The guest kit: a small CPL0 kernel and CPL3 workloads, assembled in Rust
//! with iced-x86's `code_asm`.
//!
//! The kernel stays tiny because, on a KVM that runs guest CPL0 code in its
//! instruction emulator (PVM here), every kernel instruction costs about
//! 1.8 us; hot loops belong in CPL3 workloads, which run natively. The
//! kernel:
//!
//! - enters a CPL3 program with `iretq` ([`Kernel::enter_user`]);
//! - serves system calls from CPL3 through an `int3` gate (see
//!   [`abi::syscall`]);
//! - has one stub per IDT vector that exits to the VMM by port I/O
//!   ([`abi::hypercall::EXCEPTION`]) and then does what the VMM answers
//!   (retry, replay queued page-table writes, flush, deliver the fault to
//!   the program through its fault log and handler, resume elsewhere);
//! - implements "load CR3", "invlpg" and "flush TLB" either with the
//!   native instruction ([`PagingOps::Native`], for hardware paging) or as
//!   hypercalls the VMM serves in software ([`PagingOps::Paravirt`], for a
//!   shadow MMU). Workloads call the same system calls under both, so one
//!   workload binary runs under both.
//!
//! The register and port ABI is in [`abi`].

pub mod abi;
mod faults;
mod kernel;
pub mod workloads;

pub use faults::{FaultLog, FaultRecord};
pub use kernel::{Kernel, ReplayRestart};

use iced_x86::code_asm::CodeAssembler;
use iced_x86::{BlockEncoderOptions, IcedError};

use crate::error::KitError;
use crate::layout::{PROGRAM_CODE_GPA, PROGRAM_CODE_SIZE};

/// How the kernel implements "load CR3", "invlpg" and "flush TLB".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum PagingOps {
    /// The native instructions (`mov cr3`, `invlpg`): the hypervisor's
    /// hardware or its own MMU sees them. What hardware paging (EPT/NPT,
    /// or KVM's own shadow MMU) needs.
    #[default]
    Native,
    /// A hypercall first; the VMM serves it in software and answers which
    /// of "replay the queue" and "execute the native instruction" the
    /// kernel must still do. What a VMM-side shadow MMU needs.
    Paravirt,
}

impl std::str::FromStr for PagingOps {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "native" => Ok(PagingOps::Native),
            "paravirt" => Ok(PagingOps::Paravirt),
            other => Err(format!(
                "unknown paging ops {other:?}: expected native or paravirt"
            )),
        }
    }
}

/// The privilege a program starts at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Ring {
    /// CPL3: entered through the kernel's `iretq`; uses system calls.
    User,
    /// CPL0: started directly, with the kernel stack; uses hypercalls.
    /// Runs under KVM's emulator on PVM, so keep it short.
    Kernel,
}

/// A guest program: code assembled at [`PROGRAM_CODE_GPA`] and where it starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Program {
    name: String,
    ring: Ring,
    code: Vec<u8>,
    entry: u64,
}

impl Program {
    /// Assembles a program. `emit` writes its code; execution starts at the
    /// first instruction it emits.
    ///
    /// A [`Ring::User`] program gets the run's per-vCPU arguments in RDI,
    /// RSI, RDX, RCX, R8 and R9, a user stack in RSP, and ends with the
    /// [`abi::syscall::EXIT`] system call. A [`Ring::Kernel`] program gets
    /// the same registers and ends with the [`abi::hypercall::DONE`]
    /// hypercall.
    pub fn assemble(
        name: &str,
        ring: Ring,
        emit: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
    ) -> Result<Program, KitError> {
        let asm_error = |source| KitError::Asm {
            what: name.to_string(),
            source,
        };
        let mut a = CodeAssembler::new(64).map_err(asm_error)?;
        emit(&mut a).map_err(asm_error)?;
        let code = a
            .assemble_options(PROGRAM_CODE_GPA, BlockEncoderOptions::NONE)
            .map_err(asm_error)?
            .inner
            .code_buffer;
        if code.len() as u64 > PROGRAM_CODE_SIZE {
            return Err(KitError::TooLarge {
                what: name.to_string(),
                size: code.len(),
                limit: PROGRAM_CODE_SIZE as usize,
            });
        }
        Ok(Program {
            name: name.to_string(),
            ring,
            code,
            entry: PROGRAM_CODE_GPA,
        })
    }

    /// The program's name (for reports and traces).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The privilege it starts at.
    pub fn ring(&self) -> Ring {
        self.ring
    }

    /// Its machine code, to be loaded at [`PROGRAM_CODE_GPA`].
    pub fn code(&self) -> &[u8] {
        &self.code
    }

    /// Its entry point (a guest-virtual address).
    pub fn entry(&self) -> u64 {
        self.entry
    }
}

/// Emitters for the kit's calling conventions, for use inside
/// [`Program::assemble`].
pub mod emit {
    use iced_x86::IcedError;
    use iced_x86::code_asm::*;

    use super::abi;

    /// A system call from CPL3: `mov eax, number; stc; int3` (the gate of
    /// [`abi::SYSCALL_VECTOR`]). Arguments go in RDI and RSI; the result
    /// comes back in RAX, with CF clear. The set CF marks the kernel entry
    /// as not yet made: see [`abi::syscall_entry_pending`].
    pub fn syscall(a: &mut CodeAssembler, number: u32) -> Result<(), IcedError> {
        a.mov(eax, number)?;
        a.stc()?;
        a.int3()
    }

    /// A hypercall from CPL0: `mov edx, port; in eax, dx`. Arguments go in
    /// RDI and RSI; the VMM's answer comes back in EAX. Clobbers RDX.
    pub fn hypercall(a: &mut CodeAssembler, port: u16) -> Result<(), IcedError> {
        a.mov(edx, u32::from(port))?;
        a.in_(eax, dx)
    }

    /// Reports the value in RDI with tag `tag` (CPL3).
    pub fn report_rdi(a: &mut CodeAssembler, tag: u32) -> Result<(), IcedError> {
        a.mov(esi, tag)?;
        syscall(a, abi::syscall::REPORT)
    }

    /// Ends a CPL3 program with exit code `code`.
    pub fn exit(a: &mut CodeAssembler, code: u32) -> Result<(), IcedError> {
        a.mov(edi, code)?;
        syscall(a, abi::syscall::EXIT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::code_asm::*;
    use iced_x86::{Decoder, DecoderOptions, Mnemonic};

    #[test]
    fn programs_assemble_at_their_base() {
        let p = Program::assemble("t", Ring::User, |a| {
            a.mov(rdi, 7u64)?;
            emit::exit(a, 0)
        })
        .unwrap();
        assert_eq!(p.entry(), PROGRAM_CODE_GPA);
        let mut d = Decoder::with_ip(64, p.code(), PROGRAM_CODE_GPA, DecoderOptions::NONE);
        let mnemonics: Vec<Mnemonic> = d.iter().map(|i| i.mnemonic()).collect();
        assert_eq!(
            mnemonics,
            [
                Mnemonic::Mov,
                Mnemonic::Mov,
                Mnemonic::Mov,
                Mnemonic::Stc,
                Mnemonic::Int3
            ]
        );
    }

    #[test]
    fn paging_ops_parse() {
        assert_eq!("native".parse::<PagingOps>(), Ok(PagingOps::Native));
        assert_eq!("paravirt".parse::<PagingOps>(), Ok(PagingOps::Paravirt));
        assert!("shadow".parse::<PagingOps>().is_err());
    }

    #[test]
    fn a_pending_system_call_is_recognised_exactly() {
        use crate::x86::RFLAGS_CF;
        for number in [abi::syscall::STORE, abi::syscall::REPORT, 0x1234_5678] {
            let p = Program::assemble("t", Ring::User, |a| emit::syscall(a, number)).unwrap();
            let bytes = abi::syscall_bytes(number);
            assert_eq!(
                &p.code()[..bytes.len()],
                bytes,
                "emit::syscall and syscall_bytes agree"
            );
            let n = u64::from(number);
            assert!(abi::syscall_entry_pending(&bytes, n, RFLAGS_CF | 2));
            // Returned: CF clear, or RAX holds a result.
            assert!(!abi::syscall_entry_pending(&bytes, n, 2));
            assert!(!abi::syscall_entry_pending(&bytes, n + 1, RFLAGS_CF));
            assert!(!abi::syscall_entry_pending(&bytes, n | 1 << 32, RFLAGS_CF));
            // Other code before RIP.
            let mut other = bytes;
            other[5] = 0x90;
            assert!(!abi::syscall_entry_pending(&other, n, RFLAGS_CF));
            assert!(!abi::syscall_entry_pending(&bytes[1..], n, RFLAGS_CF));
        }
    }
}
