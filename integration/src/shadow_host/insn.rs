//! Decoding and emulating the one instruction that faulted, for MMIO and
//! for writes to page tables a shadow MMU protects (a #PF the shadow backend
//! answers `Mmio` or `Emulate`, which KVM does not decode for us because the
//! fault reaches the guest's exception stub, not KVM's MMIO exit). The
//! shadow hosting ([`crate::shadow_host`]) uses it.
//!
//! Only what guest workloads and a VMM's device accesses typically need:
//! MOV loads and stores of 1, 2, 4 or 8 bytes between a general-purpose
//! register (or an immediate) and memory, and MOVZX / MOVSX loads. Anything
//! else is a typed error, never a guess.

use iced_x86::{Code, Decoder, DecoderOptions, Instruction, OpKind, Register};

/// Why an instruction could not be emulated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EmulateError {
    /// The bytes at RIP do not decode.
    #[error("the instruction at {0:#x} does not decode")]
    Undecodable(u64),
    /// It decodes but is not a MOV to or from memory this emulator handles.
    #[error("the instruction at {rip:#x} ({text}) cannot be emulated")]
    Unsupported {
        /// Where it is.
        rip: u64,
        /// What it is, disassembled.
        text: String,
    },
}

/// A general-purpose register as KVM's `kvm_regs` orders them (RAX = 0,
/// RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8 .. R15 = 15), and which part.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gpr {
    /// Index 0..=15.
    pub index: usize,
    /// Width of the part named, in bytes.
    pub size: u8,
    /// AH, CH, DH or BH: bits 15:8 of the register.
    pub high_byte: bool,
}

impl Gpr {
    fn from_register(r: Register) -> Option<Gpr> {
        use Register::*;
        let (index, size, high_byte) = match r {
            RAX => (0, 8, false),
            RCX => (1, 8, false),
            RDX => (2, 8, false),
            RBX => (3, 8, false),
            RSP => (4, 8, false),
            RBP => (5, 8, false),
            RSI => (6, 8, false),
            RDI => (7, 8, false),
            R8 => (8, 8, false),
            R9 => (9, 8, false),
            R10 => (10, 8, false),
            R11 => (11, 8, false),
            R12 => (12, 8, false),
            R13 => (13, 8, false),
            R14 => (14, 8, false),
            R15 => (15, 8, false),
            AH => (0, 1, true),
            CH => (1, 1, true),
            DH => (2, 1, true),
            BH => (3, 1, true),
            other => {
                const D: [Register; 16] = [
                    EAX, ECX, EDX, EBX, ESP, EBP, ESI, EDI, R8D, R9D, R10D, R11D, R12D, R13D, R14D,
                    R15D,
                ];
                const W: [Register; 16] = [
                    AX, CX, DX, BX, SP, BP, SI, DI, R8W, R9W, R10W, R11W, R12W, R13W, R14W, R15W,
                ];
                const B: [Register; 16] = [
                    AL, CL, DL, BL, SPL, BPL, SIL, DIL, R8L, R9L, R10L, R11L, R12L, R13L, R14L,
                    R15L,
                ];
                [(D, 4u8), (W, 2), (B, 1)].iter().find_map(|(set, size)| {
                    set.iter()
                        .position(|r| *r == other)
                        .map(|i| (i, *size, false))
                })?
            }
        };
        Some(Gpr {
            index,
            size,
            high_byte,
        })
    }

    /// The register's current value as this part reads it.
    pub fn read(self, regs: &[u64; 16]) -> u64 {
        let full = regs[self.index];
        if self.high_byte {
            (full >> 8) & 0xff
        } else {
            full & mask(self.size)
        }
    }

    /// Writes `value` to this part with x86 semantics: a 32-bit write
    /// zero-extends to 64 bits, 8- and 16-bit writes keep the other bits.
    pub fn write(self, regs: &mut [u64; 16], value: u64) {
        let r = &mut regs[self.index];
        *r = match (self.high_byte, self.size) {
            (true, _) => (*r & !0xff00) | ((value & 0xff) << 8),
            (false, 8) => value,
            (false, 4) => value & 0xffff_ffff,
            (false, size) => (*r & !mask(size)) | (value & mask(size)),
        };
    }
}

fn mask(size: u8) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (8 * u32::from(size))) - 1
    }
}

/// What the faulting instruction does to memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemAccess {
    /// Read `size` bytes, extend them, and write the register.
    Load {
        /// Bytes read.
        size: u8,
        /// Where the value goes.
        dst: Gpr,
        /// MOVSX: sign-extend (otherwise zero-extend, as MOVZX and MOV do
        /// within the destination's width).
        sign_extend: bool,
    },
    /// Write `size` bytes.
    Store {
        /// Bytes written.
        size: u8,
        /// Where the value comes from.
        src: StoreSource,
    },
}

/// The value a store writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreSource {
    /// A register.
    Reg(Gpr),
    /// An immediate (already sign-extended to 64 bits where x86 does).
    Imm(u64),
}

/// A decoded instruction the emulator can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decoded {
    /// Its length: RIP advances by this much.
    pub len: u8,
    /// What it does.
    pub access: MemAccess,
}

impl Decoded {
    /// The bytes a store writes, given the registers (little endian, `size`
    /// of them). `None` for a load.
    pub fn store_bytes(&self, regs: &[u64; 16]) -> Option<Vec<u8>> {
        let MemAccess::Store { size, src } = self.access else {
            return None;
        };
        let value = match src {
            StoreSource::Reg(g) => g.read(regs),
            StoreSource::Imm(v) => v,
        };
        Some(value.to_le_bytes()[..usize::from(size)].to_vec())
    }

    /// Completes a load with the `size` bytes read (little endian).
    pub fn complete_load(&self, regs: &mut [u64; 16], data: &[u8]) {
        let MemAccess::Load {
            size,
            dst,
            sign_extend,
        } = self.access
        else {
            return;
        };
        let mut raw = [0u8; 8];
        let n = usize::from(size).min(data.len());
        raw[..n].copy_from_slice(&data[..n]);
        let mut value = u64::from_le_bytes(raw);
        if sign_extend && size < 8 {
            let shift = 64 - 8 * u32::from(size);
            value = (((value << shift) as i64) >> shift) as u64;
        }
        dst.write(regs, value);
    }
}

/// Decodes the 64-bit-mode instruction in `bytes` (at `rip`).
pub fn decode(bytes: &[u8], rip: u64) -> Result<Decoded, EmulateError> {
    let mut decoder = Decoder::with_ip(64, bytes, rip, DecoderOptions::NONE);
    let insn = decoder.decode();
    if insn.is_invalid() {
        return Err(EmulateError::Undecodable(rip));
    }
    let unsupported = |insn: &Instruction| EmulateError::Unsupported {
        rip,
        text: format!("{:?}", insn.code()),
    };
    let mem_size = insn.memory_size().size() as u8;
    let access = match insn.code() {
        Code::Mov_rm8_r8 | Code::Mov_rm16_r16 | Code::Mov_rm32_r32 | Code::Mov_rm64_r64
            if insn.op0_kind() == OpKind::Memory =>
        {
            let src = Gpr::from_register(insn.op1_register()).ok_or_else(|| unsupported(&insn))?;
            MemAccess::Store {
                size: mem_size,
                src: StoreSource::Reg(src),
            }
        }
        Code::Mov_rm8_imm8 | Code::Mov_rm16_imm16 | Code::Mov_rm32_imm32 | Code::Mov_rm64_imm32
            if insn.op0_kind() == OpKind::Memory =>
        {
            MemAccess::Store {
                size: mem_size,
                src: StoreSource::Imm(insn.immediate(1)),
            }
        }
        Code::Mov_r8_rm8
        | Code::Mov_r16_rm16
        | Code::Mov_r32_rm32
        | Code::Mov_r64_rm64
        | Code::Movzx_r16_rm8
        | Code::Movzx_r32_rm8
        | Code::Movzx_r64_rm8
        | Code::Movzx_r16_rm16
        | Code::Movzx_r32_rm16
        | Code::Movzx_r64_rm16
        | Code::Movsx_r16_rm8
        | Code::Movsx_r32_rm8
        | Code::Movsx_r64_rm8
        | Code::Movsx_r16_rm16
        | Code::Movsx_r32_rm16
        | Code::Movsx_r64_rm16
        | Code::Movsxd_r64_rm32
            if insn.op1_kind() == OpKind::Memory =>
        {
            let dst = Gpr::from_register(insn.op0_register()).ok_or_else(|| unsupported(&insn))?;
            let sign_extend = matches!(
                insn.code(),
                Code::Movsx_r16_rm8
                    | Code::Movsx_r32_rm8
                    | Code::Movsx_r64_rm8
                    | Code::Movsx_r16_rm16
                    | Code::Movsx_r32_rm16
                    | Code::Movsx_r64_rm16
                    | Code::Movsxd_r64_rm32
            );
            MemAccess::Load {
                size: mem_size,
                dst,
                sign_extend,
            }
        }
        _ => return Err(unsupported(&insn)),
    };
    Ok(Decoded {
        len: insn.len() as u8,
        access,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::code_asm::*;

    fn assemble(f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
        let mut a = CodeAssembler::new(64).unwrap();
        f(&mut a).unwrap();
        a.assemble(0x1000).unwrap()
    }

    #[test]
    fn stores_of_every_size() {
        let mut regs = [0u64; 16];
        regs[0] = 0x1122_3344_5566_7788; // RAX
        regs[3] = 0xaabb; // RBX
        for (bytes, want) in [
            (
                assemble(|a| a.mov(qword_ptr(rdi), rax)),
                vec![0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11],
            ),
            (
                assemble(|a| a.mov(dword_ptr(rdi + 8), eax)),
                vec![0x88, 0x77, 0x66, 0x55],
            ),
            (assemble(|a| a.mov(word_ptr(rdi), ax)), vec![0x88, 0x77]),
            (assemble(|a| a.mov(byte_ptr(rdi), al)), vec![0x88]),
            (assemble(|a| a.mov(byte_ptr(rdi), bh)), vec![0xaa]),
            (
                assemble(|a| a.mov(qword_ptr(rdi), -2i32)),
                vec![0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
            ),
            (
                assemble(|a| a.mov(dword_ptr(rdi), 0x1234_5678u32)),
                vec![0x78, 0x56, 0x34, 0x12],
            ),
        ] {
            let d = decode(&bytes, 0x1000).unwrap();
            assert_eq!(usize::from(d.len), bytes.len());
            assert_eq!(d.store_bytes(&regs).unwrap(), want, "{d:?}");
        }
    }

    #[test]
    fn loads_extend_as_x86_does() {
        let mut regs = [u64::MAX; 16];
        let d = decode(&assemble(|a| a.mov(eax, dword_ptr(rsi))), 0).unwrap();
        d.complete_load(&mut regs, &[1, 2, 3, 4]);
        assert_eq!(regs[0], 0x0403_0201, "32-bit writes zero-extend");
        let d = decode(&assemble(|a| a.mov(cx, word_ptr(rsi))), 0).unwrap();
        d.complete_load(&mut regs, &[0x34, 0x12]);
        assert_eq!(
            regs[1], 0xffff_ffff_ffff_1234,
            "16-bit writes keep the rest"
        );
        let d = decode(&assemble(|a| a.movsx(rdx, byte_ptr(rsi))), 0).unwrap();
        d.complete_load(&mut regs, &[0x80]);
        assert_eq!(regs[2], 0xffff_ffff_ffff_ff80);
        let d = decode(&assemble(|a| a.movzx(ebx, byte_ptr(rsi))), 0).unwrap();
        d.complete_load(&mut regs, &[0x80]);
        assert_eq!(regs[3], 0x80);
        let d = decode(&assemble(|a| a.mov(r12, qword_ptr(rsi))), 0).unwrap();
        d.complete_load(&mut regs, &7u64.to_le_bytes());
        assert_eq!(regs[12], 7);
        assert!(decode(&assemble(|a| a.mov(ah, byte_ptr(rsi))), 0).is_ok());
    }

    #[test]
    fn anything_else_is_a_typed_error() {
        let add = assemble(|a| a.add(qword_ptr(rdi), rax));
        assert!(matches!(
            decode(&add, 5),
            Err(EmulateError::Unsupported { rip: 5, .. })
        ));
        let reg_to_reg = assemble(|a| a.mov(rax, rbx));
        assert!(decode(&reg_to_reg, 0).is_err());
        assert_eq!(decode(&[0x0f, 0xff], 9), Err(EmulateError::Undecodable(9)));
    }
}
