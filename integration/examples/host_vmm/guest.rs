//! The example's device and memory map: an MMIO device with a doorbell
//! and a status register, in the style of a request/response NIC, plus
//! report, done and checkpoint registers the guest talks to the host
//! through; guest RAM and a ROM.
//!
//! Also a few bytes of 16-bit real-mode code (no firmware, no page
//! tables: the vCPU starts at `CODE_GPA` with every segment base at 0),
//! which the crate's KVM tests (`tests/kvm.rs`) run for the memslot paths
//! that need no paging; the example itself runs `pv_guest.rs`.

#![allow(dead_code)]

use std::collections::BTreeMap;

use kvm_ioctls::VcpuFd;
use mmu_api::Gpa;
use mmu_integration::{BusError, MmioBus};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest RAM: 512 KiB at guest-physical 0.
pub(crate) const RAM_SIZE: u64 = 0x8_0000;
/// Where the program is loaded and starts.
pub(crate) const CODE_GPA: u64 = 0x1000;
/// The first page the program touches.
pub(crate) const TOUCH_GPA: u64 = 0x1_0000;
/// The device's page: doorbell at +0, status at +4, report at +8, done at
/// +12, checkpoint at +16.
pub(crate) const DEVICE_GPA: u64 = 0xd_0000;
/// A 64 KiB ROM (a read-only memslot) at the top of the first megabyte.
pub(crate) const ROM_GPA: u64 = 0xf_0000;
/// The ROM's size.
pub(crate) const ROM_SIZE: u64 = 0x1_0000;
/// The word the host puts in the ROM at +0x20.
pub(crate) const ROM_WORD: u16 = 0xbeef;
/// The port the program reports on: it writes the sum of the statuses it
/// read, then the ROM word.
pub(crate) const REPORT_PORT: u16 = 0x10;

/// A tiny 16-bit assembler: the handful of instructions the program uses,
/// with backward labels.
#[derive(Default)]
pub(crate) struct Asm {
    code: Vec<u8>,
}

/// ES segment-override prefix.
const ES: u8 = 0x26;

impl Asm {
    /// Where the next instruction goes (a label).
    pub(crate) fn here(&self) -> usize {
        self.code.len()
    }

    fn bytes(&mut self, bytes: &[u8]) -> &mut Self {
        self.code.extend_from_slice(bytes);
        self
    }

    /// `mov ax, imm16`.
    pub(crate) fn mov_ax(&mut self, imm: u16) -> &mut Self {
        self.bytes(&[0xb8]).bytes(&imm.to_le_bytes())
    }

    /// `mov cx, imm16`.
    pub(crate) fn mov_cx(&mut self, imm: u16) -> &mut Self {
        self.bytes(&[0xb9]).bytes(&imm.to_le_bytes())
    }

    /// `mov dx, imm16`.
    pub(crate) fn mov_dx(&mut self, imm: u16) -> &mut Self {
        self.bytes(&[0xba]).bytes(&imm.to_le_bytes())
    }

    /// `mov es, ax`.
    pub(crate) fn mov_es_ax(&mut self) -> &mut Self {
        self.bytes(&[0x8e, 0xc0])
    }

    /// `mov es:[disp], cx`.
    pub(crate) fn store_cx(&mut self, disp: u16) -> &mut Self {
        self.bytes(&[ES, 0x89, 0x0e]).bytes(&disp.to_le_bytes())
    }

    /// `mov es:[disp], ax`.
    pub(crate) fn store_ax(&mut self, disp: u16) -> &mut Self {
        self.bytes(&[ES, 0xa3]).bytes(&disp.to_le_bytes())
    }

    /// `mov byte es:[disp], imm8`.
    pub(crate) fn store_byte(&mut self, disp: u16, imm: u8) -> &mut Self {
        self.bytes(&[ES, 0xc6, 0x06])
            .bytes(&disp.to_le_bytes())
            .bytes(&[imm])
    }

    /// `mov ax, es:[disp]`.
    pub(crate) fn load_ax(&mut self, disp: u16) -> &mut Self {
        self.bytes(&[ES, 0xa1]).bytes(&disp.to_le_bytes())
    }

    /// `add ax, imm16`.
    pub(crate) fn add_ax(&mut self, imm: u16) -> &mut Self {
        self.bytes(&[0x05]).bytes(&imm.to_le_bytes())
    }

    /// `add bx, ax`.
    pub(crate) fn add_bx_ax(&mut self) -> &mut Self {
        self.bytes(&[0x01, 0xc3])
    }

    /// `xor bx, bx`.
    pub(crate) fn zero_bx(&mut self) -> &mut Self {
        self.bytes(&[0x31, 0xdb])
    }

    /// `mov ax, bx`.
    pub(crate) fn mov_ax_bx(&mut self) -> &mut Self {
        self.bytes(&[0x89, 0xd8])
    }

    /// `dec cx; jnz label` (a backward label).
    pub(crate) fn loop_cx(&mut self, label: usize) -> &mut Self {
        self.bytes(&[0x49]);
        let rel = label as isize - (self.here() as isize + 2);
        let rel = i8::try_from(rel).expect("loop body too long for a short jump");
        self.bytes(&[0x75, rel as u8])
    }

    /// `mov dx, port; out dx, ax`.
    pub(crate) fn report_ax(&mut self, port: u16) -> &mut Self {
        self.mov_dx(port).bytes(&[0xef])
    }

    /// `hlt`.
    pub(crate) fn hlt(&mut self) -> &mut Self {
        self.bytes(&[0xf4])
    }

    /// The machine code.
    pub(crate) fn code(&self) -> Vec<u8> {
        self.code.clone()
    }
}

/// The example program:
///
/// 1. writes `pages` pages from `TOUCH_GPA` (one word each), which the
///    dirty log must show;
/// 2. `requests` times, rings the device's doorbell with the request
///    number and reads its status (MMIO exits; after the first, the MMU's
///    classification cache answers), summing the statuses;
/// 3. writes a byte to the ROM (an MMIO write to the device behind it) and
///    reads the ROM word (memory, no exit);
/// 4. reports the sum and the ROM word on `REPORT_PORT`, then halts.
pub(crate) fn program(pages: u16, requests: u16) -> Vec<u8> {
    let mut a = Asm::default();
    a.mov_ax((TOUCH_GPA >> 4) as u16).mov_cx(pages);
    let touch = a.here();
    a.mov_es_ax().store_cx(0).add_ax(0x100).loop_cx(touch);

    a.mov_ax((DEVICE_GPA >> 4) as u16)
        .mov_es_ax()
        .zero_bx()
        .mov_cx(requests);
    let request = a.here();
    a.store_cx(0).load_ax(4).add_bx_ax().loop_cx(request);

    a.mov_ax((ROM_GPA >> 4) as u16)
        .mov_es_ax()
        .store_byte(0x10, 0x55)
        .mov_ax_bx()
        .report_ax(REPORT_PORT)
        .load_ax(0x20)
        .report_ax(REPORT_PORT)
        .hlt();
    a.code()
}

/// What the host's model says the program reports: the sum of the
/// statuses (status = 2 * request + 1, requests counted down from
/// `requests` to 1), then the ROM word.
pub(crate) fn expected_reports(requests: u16) -> [u16; 2] {
    let n = u32::from(requests);
    let sum = n * (n + 1) + n;
    [sum as u16, ROM_WORD]
}

/// Points the vCPU at `rip` in real mode with every segment base at 0.
pub(crate) fn start_real_mode(vcpu: &VcpuFd, rip: u64) -> Result<(), kvm_ioctls::Error> {
    let mut sregs = vcpu.get_sregs()?;
    for seg in [
        &mut sregs.cs,
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.ss,
        &mut sregs.fs,
        &mut sregs.gs,
    ] {
        seg.base = 0;
        seg.selector = 0;
    }
    vcpu.set_sregs(&sregs)?;
    let mut regs = vcpu.get_regs()?;
    regs.rip = rip;
    regs.rflags = 2;
    vcpu.set_regs(&regs)
}

/// The device: a doorbell register (+0) the guest writes a request number
/// to, and a status register (+4) that answers `2 * request + 1`; it
/// records every write it gets, including those to the ROM, which a ROM
/// device behind the read-only memslot receives.
pub(crate) struct Bus {
    /// Guest memory, for an MMIO read that raced a memslot change.
    pub(crate) memory: GuestMemoryMmap,
    /// The last doorbell value.
    pub(crate) doorbell: u16,
    /// Doorbell rings.
    pub(crate) rings: u64,
    /// Writes that reached the ROM device: address to bytes.
    pub(crate) rom_writes: BTreeMap<u64, Vec<u8>>,
    /// Reads of addresses with no device: these answer 0xffff..., as an
    /// open bus does.
    pub(crate) unclaimed_reads: u64,
    /// Writes to addresses with no device (dropped).
    pub(crate) unclaimed_writes: u64,
    /// Values written to the report register (+8), in order.
    pub(crate) reports: Vec<u32>,
    /// The done register (+12) was written.
    pub(crate) done: bool,
    /// Writes to the checkpoint register (+16): the guest asks the host
    /// to act (the example harvests the dirty log).
    pub(crate) checkpoints: u64,
}

impl Bus {
    /// A bus over `memory`.
    pub(crate) fn new(memory: GuestMemoryMmap) -> Self {
        Bus {
            memory,
            doorbell: 0,
            rings: 0,
            rom_writes: BTreeMap::new(),
            unclaimed_reads: 0,
            unclaimed_writes: 0,
            reports: Vec::new(),
            done: false,
            checkpoints: 0,
        }
    }
}

impl MmioBus for Bus {
    fn mmio_read(&mut self, gpa: Gpa, data: &mut [u8]) -> Result<(), BusError> {
        match gpa.raw() {
            a if a == DEVICE_GPA + 4 => {
                let status = self.doorbell.wrapping_mul(2).wrapping_add(1).to_le_bytes();
                for (i, byte) in data.iter_mut().enumerate() {
                    *byte = status.get(i).copied().unwrap_or(0);
                }
            }
            _ => {
                self.unclaimed_reads += 1;
                data.fill(0xff);
            }
        }
        Ok(())
    }

    fn mmio_write(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), BusError> {
        match gpa.raw() {
            a if a == DEVICE_GPA => {
                let mut bytes = [0u8; 2];
                let n = data.len().min(2);
                bytes[..n].copy_from_slice(&data[..n]);
                self.doorbell = u16::from_le_bytes(bytes);
                self.rings += 1;
            }
            a if a == DEVICE_GPA + 8 => {
                let mut bytes = [0u8; 4];
                let n = data.len().min(4);
                bytes[..n].copy_from_slice(&data[..n]);
                self.reports.push(u32::from_le_bytes(bytes));
            }
            a if a == DEVICE_GPA + 12 => self.done = true,
            a if a == DEVICE_GPA + 16 => self.checkpoints += 1,
            a if (ROM_GPA..ROM_GPA + ROM_SIZE).contains(&a) => {
                self.rom_writes.insert(a, data.to_vec());
            }
            _ => self.unclaimed_writes += 1,
        }
        Ok(())
    }

    fn memory_read(&mut self, gpa: Gpa, data: &mut [u8]) -> Result<(), BusError> {
        self.memory
            .read_slice(data, GuestAddress(gpa.raw()))
            .map_err(BusError::failed)
    }
}
