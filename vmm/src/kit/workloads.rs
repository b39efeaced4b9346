//! Ready-made guest programs.
//!
//! CPL3 workloads take their arguments in RDI, RSI, RDX, RCX (per vCPU,
//! from [`VcpuArgs`](crate::VcpuArgs)), report through the REPORT system
//! call and end with EXIT 0. The CPL0 programs exist to exercise the VMM's
//! failure paths.

use iced_x86::code_asm::*;

use super::abi::{syscall, tag};
use super::{Program, Ring, emit};
use crate::error::KitError;
use crate::layout::PAGE_SIZE;

/// What [`touch`] does to each page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TouchKind {
    /// Read the first quadword of each page and add it to the checksum.
    Read,
    /// Write `address ^ seed` to the first quadword of each page and add
    /// that to the checksum.
    Write,
}

impl std::str::FromStr for TouchKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "read" => Ok(TouchKind::Read),
            "write" => Ok(TouchKind::Write),
            other => Err(format!(
                "unknown touch kind {other:?}: expected read or write"
            )),
        }
    }
}

/// `touch`: walks `pages` 4 KiB pages from `base`, `passes` times, reading
/// or writing the first quadword of each, then reports the wrapping sum
/// (tag [`tag::CHECKSUM`]).
///
/// Arguments: RDI = base (page aligned), RSI = pages, RDX = passes,
/// RCX = seed (used by [`TouchKind::Write`]).
pub fn touch(kind: TouchKind) -> Result<Program, KitError> {
    let name = match kind {
        TouchKind::Read => "touch-read",
        TouchKind::Write => "touch-write",
    };
    Program::assemble(name, Ring::User, |a| {
        let mut pass = a.create_label();
        let mut page = a.create_label();
        let mut done = a.create_label();
        a.xor(r12d, r12d)?; // checksum
        a.test(rsi, rsi)?;
        a.jz(done)?;
        a.test(rdx, rdx)?;
        a.jz(done)?;
        a.set_label(&mut pass)?;
        a.mov(rbx, rdi)?;
        a.mov(r8, rsi)?;
        a.set_label(&mut page)?;
        match kind {
            TouchKind::Read => a.add(r12, qword_ptr(rbx))?,
            TouchKind::Write => {
                a.mov(rax, rbx)?;
                a.xor(rax, rcx)?;
                a.mov(qword_ptr(rbx), rax)?;
                a.add(r12, rax)?;
            }
        }
        a.add(rbx, PAGE_SIZE as i32)?;
        a.dec(r8)?;
        a.jnz(page)?;
        a.dec(rdx)?;
        a.jnz(pass)?;
        a.set_label(&mut done)?;
        a.mov(rdi, r12)?;
        emit::report_rdi(a, tag::CHECKSUM)?;
        emit::exit(a, 0)
    })
}

/// The checksum [`touch`] reports, given the value of the first quadword
/// of each page before the run (`read_first_qword(page_address)`).
pub fn touch_checksum(
    kind: TouchKind,
    base: u64,
    pages: u64,
    passes: u64,
    seed: u64,
    mut read_first_qword: impl FnMut(u64) -> u64,
) -> u64 {
    let mut one_pass = 0u64;
    for i in 0..pages {
        let address = base + i * PAGE_SIZE;
        let value = match kind {
            TouchKind::Read => read_first_qword(address),
            TouchKind::Write => address ^ seed,
        };
        one_pass = one_pass.wrapping_add(value);
    }
    one_pass.wrapping_mul(passes)
}

/// `spin`: a CPL3 busy loop that never ends by itself.
pub fn spin() -> Result<Program, KitError> {
    Program::assemble("spin", Ring::User, |a| {
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.pause()?;
        a.jmp(top)
    })
}

/// What [`access`] does at its address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AccessOp {
    /// Load the quadword and report it (tag [`tag::VALUE`]).
    Read,
    /// Store RSI there.
    Write,
    /// Call it (the code there must return).
    Fetch,
}

/// `access`: one CPL3 access at RDI (storing RSI for a write), then EXIT 0.
/// Used to provoke a #PF the VMM must see.
pub fn access(op: AccessOp) -> Result<Program, KitError> {
    Program::assemble("access", Ring::User, |a| {
        match op {
            AccessOp::Read => {
                a.mov(rdi, qword_ptr(rdi))?;
                emit::report_rdi(a, tag::VALUE)?;
            }
            AccessOp::Write => a.mov(qword_ptr(rdi), rsi)?,
            AccessOp::Fetch => a.call(rdi)?,
        }
        emit::exit(a, 0)
    })
}

/// `remap`: the kernel stores RSI at RDI (a page-table entry, through the
/// STORE system call), invalidates the page at RDX (INVLPG), then the
/// program reads the quadword at RDX and reports it (tag [`tag::VALUE`]).
/// With a not-present entry the read takes a #PF: the test that page-table
/// edits made by guest CPL0 code reach the CPL3 walk.
pub fn remap() -> Result<Program, KitError> {
    Program::assemble("remap", Ring::User, |a| {
        a.mov(rbx, rdx)?;
        emit::syscall(a, syscall::STORE)?;
        a.mov(rdi, rbx)?;
        emit::syscall(a, syscall::INVLPG)?;
        a.mov(rdi, qword_ptr(rbx))?;
        emit::report_rdi(a, tag::VALUE)?;
        emit::exit(a, 0)
    })
}

/// `paging-calls`: READ_CR3, LOAD_CR3 of that value, INVLPG of RDI,
/// FLUSH_TLB, then reports CR3 (tag [`tag::VALUE`]) and a read of the
/// quadword at RDI (tag [`tag::CHECKSUM`]). Exercises every page-table
/// system call under either [`PagingOps`](super::PagingOps).
pub fn paging_calls() -> Result<Program, KitError> {
    Program::assemble("paging-calls", Ring::User, |a| {
        a.mov(rbx, rdi)?;
        emit::syscall(a, syscall::READ_CR3)?;
        a.mov(r12, rax)?;
        a.mov(rdi, rax)?;
        emit::syscall(a, syscall::LOAD_CR3)?;
        a.mov(rdi, rbx)?;
        emit::syscall(a, syscall::INVLPG)?;
        emit::syscall(a, syscall::FLUSH_TLB)?;
        a.mov(rdi, r12)?;
        emit::report_rdi(a, tag::VALUE)?;
        a.mov(rdi, qword_ptr(rbx))?;
        emit::report_rdi(a, tag::CHECKSUM)?;
        emit::exit(a, 0)
    })
}

/// `port-out`: CPL0 program that writes AL to the port in DI.
pub fn port_out() -> Result<Program, KitError> {
    Program::assemble("port-out", Ring::Kernel, |a| {
        a.mov(edx, edi)?;
        a.out(dx, al)?;
        emit::hypercall(a, super::abi::hypercall::DONE)
    })
}

/// `triple-fault`: CPL0 program that points RSP at the unmapped page 0 and
/// executes UD2. Delivering the #UD needs the stack, which raises #PF;
/// delivering that raises #DF, whose delivery fails too: a shutdown.
pub fn triple_fault() -> Result<Program, KitError> {
    Program::assemble("triple-fault", Ring::Kernel, |a| {
        a.mov(esp, PAGE_SIZE as u32)?;
        a.ud2()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workloads_assemble() {
        for p in [
            touch(TouchKind::Read).unwrap(),
            touch(TouchKind::Write).unwrap(),
            spin().unwrap(),
            access(AccessOp::Read).unwrap(),
            access(AccessOp::Write).unwrap(),
            access(AccessOp::Fetch).unwrap(),
            remap().unwrap(),
            paging_calls().unwrap(),
        ] {
            assert_eq!(p.ring(), Ring::User, "{}", p.name());
            assert!(!p.code().is_empty());
        }
        assert_eq!(port_out().unwrap().ring(), Ring::Kernel);
        assert_eq!(triple_fault().unwrap().ring(), Ring::Kernel);
    }

    #[test]
    fn touch_checksum_model() {
        let w = touch_checksum(TouchKind::Write, 0x1000, 2, 3, 0xff, |_| 0);
        assert_eq!(w, 3 * ((0x1000 ^ 0xff) + (0x2000 ^ 0xff)));
        let r = touch_checksum(TouchKind::Read, 0x1000, 2, 1, 0, |a| a * 2);
        assert_eq!(r, 0x2000 + 0x4000);
        assert_eq!(touch_checksum(TouchKind::Read, 0, 0, 5, 0, |_| 1), 0);
    }
}
