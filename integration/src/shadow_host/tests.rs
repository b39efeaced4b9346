//! The hosting over a real shadow backend and a software vCPU: guest page
//! tables in test RAM, an MMIO page without memory, and the exception
//! frame a guest stub would leave.

use std::sync::Arc;

use iced_x86::IcedError;
use iced_x86::code_asm::{CodeAssembler, dword_ptr, eax, r9w, rsi, word_ptr};
use kvm_bindings::{kvm_regs, kvm_sregs, kvm_vcpu_events};
use mmu_api::MmuBackend;
use mmu_api::paging::{Cr0, Cr4, Efer};
use mmu_api::{Gpa, Gva, MemslotFlags, PagingContext, PfErrorCode, VcpuId};
use mmu_backends::shadow::{Coherence, ShadowBackend};
use mmu_ept::testing::GuestRam;
use vm_memory::GuestMemoryError;

use super::abi::{self, frame, hypercall};
use super::{
    HostingError, HypercallAnswer, PageFaultAnswer, PvKernel, PvVcpu, PvVcpuLayout, ReplayHub,
    ShadowVcpuHost,
};
use crate::exits::VcpuExits;
use crate::ports::PortError;
use crate::test_support::{Call, NoKick, RecordingBus, add_ram, leak_ram};

const PML4: u64 = 0x1000;
const CODE: u64 = 0x5000;
const STACK: u64 = 0x6000;
/// Where the kernel's RSP points during the EXCEPTION hypercall.
const FRAME: u64 = STACK + 0xf00;
const DEVICE: u64 = 0xd_0000;
const RAM_SIZE: u64 = 0x1_0000;

/// A vCPU in software: registers, and guest memory in `ram`.
struct SoftVcpu {
    regs: kvm_regs,
    sregs: kvm_sregs,
    events: kvm_vcpu_events,
    ram: &'static GuestRam,
    pending_io_completed: u32,
}

impl SoftVcpu {
    fn byte(&self, gpa: u64) -> Result<u8, GuestMemoryError> {
        if gpa >= self.ram.size() {
            return Err(GuestMemoryError::InvalidGuestAddress(
                vm_memory::GuestAddress(gpa),
            ));
        }
        Ok(self.ram.read_u64(gpa & !7).to_le_bytes()[(gpa & 7) as usize])
    }
}

impl PvVcpu for SoftVcpu {
    fn get_regs(&mut self) -> Result<kvm_regs, PortError> {
        Ok(self.regs)
    }
    fn set_regs(&mut self, regs: &kvm_regs) -> Result<(), PortError> {
        self.regs = *regs;
        Ok(())
    }
    fn get_sregs(&mut self) -> Result<kvm_sregs, PortError> {
        Ok(self.sregs)
    }
    fn set_sregs(&mut self, sregs: &kvm_sregs) -> Result<(), PortError> {
        self.sregs = *sregs;
        Ok(())
    }
    fn get_vcpu_events(&mut self) -> Result<kvm_vcpu_events, PortError> {
        Ok(self.events)
    }
    fn set_vcpu_events(&mut self, events: &kvm_vcpu_events) -> Result<(), PortError> {
        self.events = *events;
        Ok(())
    }
    fn complete_pending_io(&mut self) -> Result<(), PortError> {
        self.pending_io_completed += 1;
        Ok(())
    }
    fn read_guest(&mut self, gpa: Gpa, data: &mut [u8]) -> Result<(), GuestMemoryError> {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = self.byte(gpa.raw() + i as u64)?;
        }
        Ok(())
    }
    fn write_guest(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), GuestMemoryError> {
        for (i, &byte) in data.iter().enumerate() {
            let at = gpa.raw() + i as u64;
            self.byte(at)?;
            let mut word = self.ram.read_u64(at & !7).to_le_bytes();
            word[(at & 7) as usize] = byte;
            self.ram.write_u64(at & !7, u64::from_le_bytes(word));
        }
        Ok(())
    }
}

/// A kernel with no restart points.
#[derive(Debug)]
struct NoRestarts;

impl PvKernel for NoRestarts {
    fn replay_restart_rip(&self, rip: u64) -> u64 {
        rip
    }
    fn cr3_reload_restart(&self, _rip: u64) -> Option<u64> {
        None
    }
    fn in_replay_routine(&self, _rip: u64) -> bool {
        false
    }
}

struct Fixture {
    host: ShadowVcpuHost,
    exits: VcpuExits,
    vcpu: SoftVcpu,
    bus: RecordingBus,
}

/// Guest tables mapping the code page (user), the stack page
/// (supervisor) and the device page (user, no memory behind it), `code`
/// at `CODE`, and the vCPU at CPL0 in the EXCEPTION hypercall for a user
/// #PF at `cr2` (`write` or not) on the instruction at `CODE`.
fn fixture(code: &[u8], cr2: u64, write: bool, regs: kvm_regs) -> Fixture {
    fixture_with(code, cr2, write, regs, None, Arc::new(NoRestarts))
}

/// As [`fixture`], with `coherence` instead of the default (direct) and a
/// dirty-logged RAM slot if it is given.
fn fixture_with(
    code: &[u8],
    cr2: u64,
    write: bool,
    regs: kvm_regs,
    coherence: Option<Coherence>,
    kernel: Arc<dyn PvKernel>,
) -> Fixture {
    let ram = leak_ram(RAM_SIZE);
    let mut config = mmu_backends::ShadowConfig::default();
    config.pool_pages = 64;
    let mut flags = MemslotFlags::empty();
    if let Some(coherence) = coherence {
        config.coherence = coherence;
        flags = MemslotFlags::LOG_DIRTY;
    }
    let backend = ShadowBackend::new(config).expect("shadow backend");
    add_ram(&backend, ram, 0, 0, flags);
    let upper = 0x7;
    ram.write_u64(PML4, (PML4 + 0x1000) | upper);
    ram.write_u64(PML4 + 0x1000, (PML4 + 0x2000) | upper);
    ram.write_u64(PML4 + 0x2000, (PML4 + 0x3000) | upper);
    let pt = PML4 + 0x3000;
    ram.write_u64(pt + 8 * (CODE >> 12), CODE | 0x5);
    ram.write_u64(pt + 8 * (STACK >> 12), STACK | 0x3);
    ram.write_u64(pt + 8 * (DEVICE >> 12), DEVICE | 0x7);
    for (i, chunk) in code.chunks(8).enumerate() {
        let mut word = [0u8; 8];
        word[..chunk.len()].copy_from_slice(chunk);
        ram.write_u64(CODE + 8 * i as u64, u64::from_le_bytes(word));
    }
    // The stub's frame: saved RDX and RAX, vector, error code, RIP, CS,
    // RFLAGS, RSP, SS.
    let error_code = if write { 0x6 } else { 0x4 };
    for (offset, value) in [
        (frame::RDX, 0xd0d0),
        (frame::RAX, 0xa0a0_a0a0_a0a0_a0a0),
        (frame::VECTOR, 14),
        (frame::ERROR_CODE, error_code),
        (frame::RIP, CODE),
        (frame::CS, 0x23),
        (frame::RFLAGS, 0x2),
        (frame::RSP, 0x8000),
        (frame::SS, 0x1b),
    ] {
        ram.write_u64(FRAME + offset, value);
    }

    let mut base = PagingContext::default();
    base.cr0 = Cr0::PE | Cr0::WP | Cr0::PG;
    base.cr3 = PML4;
    base.cr4 = Cr4::PAE;
    base.efer = Efer::LME | Efer::LMA;
    let mut exits = VcpuExits::new(
        backend
            .create_vcpu(VcpuId(0), Arc::new(NoKick))
            .expect("vCPU"),
    );
    exits.set_paging_context(&base).expect("paging context");
    let layout = PvVcpuLayout {
        kernel_pages: vec![(Gva(STACK), PfErrorCode::WRITE)],
        kernel_page: Gpa(0x7000),
        replay_queue: Gpa(0x8000),
    };
    let hub = ReplayHub::for_backend(&backend, 1);
    assert_eq!(hub.is_some(), coherence.is_some());
    let host = ShadowVcpuHost::new(0, backend, hub, layout, kernel, base);
    let mut sregs = kvm_sregs {
        cr0: base.cr0.bits(),
        cr3: PML4,
        cr4: base.cr4.bits(),
        efer: base.efer.bits(),
        cr2,
        ..Default::default()
    };
    sregs.cs.selector = 0x08;
    let regs = kvm_regs {
        rsp: FRAME,
        rflags: 2,
        ..regs
    };
    Fixture {
        host,
        exits,
        vcpu: SoftVcpu {
            regs,
            sregs,
            events: kvm_vcpu_events::default(),
            ram,
            pending_io_completed: 0,
        },
        bus: RecordingBus::default(),
    }
}

fn assemble(f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).expect("64-bit assembler");
    f(&mut a).expect("instruction");
    a.assemble(CODE).expect("assembled")
}

impl Fixture {
    fn hypercall(&mut self, port: u16) -> Result<HypercallAnswer, HostingError> {
        self.host
            .hypercall(&mut self.vcpu, &mut self.exits, &mut self.bus, port)
    }

    fn frame_word(&self, offset: u64) -> u64 {
        self.vcpu.ram.read_u64(FRAME + offset)
    }
}

#[test]
fn an_mmio_load_is_emulated_into_the_frame_and_rip_moves_on() {
    let code = assemble(|a| a.mov(eax, dword_ptr(rsi + 4)));
    let regs = kvm_regs {
        rsi: DEVICE,
        rcx: 0x77,
        ..Default::default()
    };
    let mut f = fixture(&code, DEVICE + 4, false, regs);
    assert_eq!(
        f.hypercall(hypercall::EXCEPTION).unwrap(),
        HypercallAnswer::Answer(0)
    );
    assert_eq!(f.bus.calls, vec![Call::MmioRead(Gpa(DEVICE + 4), 4)]);
    // EAX (saved in the frame) gets the device's bytes, zero-extended;
    // RIP moves past the instruction; nothing else changes.
    assert_eq!(f.frame_word(frame::RAX), 0xa3a2_a1a0);
    assert_eq!(f.frame_word(frame::RIP), CODE + code.len() as u64);
    assert_eq!(f.frame_word(frame::RDX), 0xd0d0);
    assert_eq!(f.vcpu.regs.rcx, 0x77);
    assert_eq!(f.exits.stats().emulations, 1);
}

#[test]
fn an_mmio_store_reaches_the_bus_from_a_register_outside_the_frame() {
    let code = assemble(|a| a.mov(word_ptr(rsi + 2), r9w));
    let regs = kvm_regs {
        rsi: DEVICE,
        r9: 0x1234_5678,
        ..Default::default()
    };
    let mut f = fixture(&code, DEVICE + 2, true, regs);
    let frame = super::read_exception_frame(&mut f.vcpu).unwrap();
    assert_eq!(frame.cpl(), 3);
    let answer = f
        .host
        .page_fault(&mut f.vcpu, &mut f.exits, &mut f.bus, &frame)
        .unwrap();
    assert_eq!(answer, PageFaultAnswer::Resume);
    assert_eq!(
        f.bus.calls,
        vec![Call::MmioWrite(Gpa(DEVICE + 2), vec![0x78, 0x56])]
    );
    assert_eq!(f.frame_word(frame::RIP), CODE + code.len() as u64);
    assert_eq!(f.frame_word(frame::RAX), 0xa0a0_a0a0_a0a0_a0a0);
}

#[test]
fn an_instruction_the_emulator_lacks_is_a_typed_error() {
    let code = assemble(|a| a.add(dword_ptr(rsi), 1));
    let regs = kvm_regs {
        rsi: DEVICE,
        ..Default::default()
    };
    let mut f = fixture(&code, DEVICE, true, regs);
    let err = f.hypercall(hypercall::EXCEPTION).unwrap_err();
    assert!(matches!(err, HostingError::Emulate(_)), "{err:?}");
    // Nothing reached the device, and the guest would retry, not skip.
    assert!(f.bus.calls.is_empty());
    assert_eq!(f.frame_word(frame::RIP), CODE);
}

#[test]
fn a_fault_outside_the_guest_tables_goes_back_to_the_vmm() {
    let code = assemble(|a| a.mov(eax, dword_ptr(rsi)));
    let regs = kvm_regs {
        rsi: 0x40_0000,
        ..Default::default()
    };
    let mut f = fixture(&code, 0x40_0000, false, regs);
    match f.hypercall(hypercall::EXCEPTION).unwrap() {
        HypercallAnswer::DeliverPageFault {
            frame,
            error_code,
            cr2,
        } => {
            assert_eq!(frame.rip, CODE);
            assert_eq!(cr2, Gva(0x40_0000));
            assert!(error_code.contains(PfErrorCode::USER));
            assert!(!error_code.contains(PfErrorCode::PRESENT));
        }
        other => panic!("{other:?}"),
    }
    assert!(f.bus.calls.is_empty());
}

#[test]
fn a_new_run_loads_a_root_with_the_kernel_pages_and_read_cr3_answers_the_guests() {
    let mut f = fixture(&[0x90], 0, false, kvm_regs::default());
    f.host.prepare_entry(&mut f.vcpu, &mut f.exits).unwrap();
    let root = f.vcpu.sregs.cr3;
    assert!(f.host.is_root(root), "CR3 {root:#x} is not a shadow root");
    assert_eq!(f.vcpu.pending_io_completed, 1);
    // The stack page was faulted in with the new root.
    assert!(f.exits.stats().page_faults >= 1);
    assert_eq!(
        f.hypercall(hypercall::READ_CR3).unwrap(),
        HypercallAnswer::Answer(PML4 as u32)
    );
    // Entering again finds nothing to do.
    f.host.exit_guest(&mut f.exits);
    f.host.prepare_entry(&mut f.vcpu, &mut f.exits).unwrap();
    assert_eq!(f.vcpu.sregs.cr3, root);
    assert_eq!(f.vcpu.pending_io_completed, 1);
}

#[test]
fn ports_the_contract_does_not_name_are_refused() {
    let mut f = fixture(&[0x90], 0, false, kvm_regs::default());
    for port in [
        hypercall::BASE,
        hypercall::BASE + 1,
        hypercall::BASE + 6,
        hypercall::END,
    ] {
        assert!(matches!(
            f.hypercall(port),
            Err(HostingError::NotAHypercall { port: p }) if p == port
        ));
    }
}

#[test]
fn the_abi_ports_are_distinct_and_in_range() {
    let ports = [
        hypercall::EXCEPTION,
        hypercall::LOAD_CR3,
        hypercall::INVLPG,
        hypercall::FLUSH_TLB,
        hypercall::READ_CR3,
        hypercall::REPLAY_REFILL,
    ];
    for (i, p) in ports.iter().enumerate() {
        assert!((hypercall::BASE..hypercall::END).contains(p));
        assert!(!ports[i + 1..].contains(p));
    }
    assert_eq!(abi::PV_MMU_ABI_VERSION, 1);
    // The fault log fills the kernel page and no more.
    let end = abi::percpu::FAULT_LOG + abi::FAULT_CAPACITY * 8 * abi::FAULT_ENTRY_WORDS;
    assert!(end <= mmu_api::PAGE_SIZE);
    assert!(end + 8 * abi::FAULT_ENTRY_WORDS > mmu_api::PAGE_SIZE);
    // The queue fills its page.
    assert_eq!(
        abi::REPLAY_CAPACITY as u64 * abi::REPLAY_ENTRY_SIZE,
        mmu_api::PAGE_SIZE
    );
}

/// A kernel whose return path reads the queue at `CHECK` and has read it
/// by `CHECK + 4`, and whose replay routine is `ROUTINE`.
#[derive(Debug)]
struct Restarts;

const CHECK: u64 = CODE + 0x40;
const ROUTINE: std::ops::Range<u64> = CODE + 0x100..CODE + 0x200;

impl PvKernel for Restarts {
    fn replay_restart_rip(&self, rip: u64) -> u64 {
        if rip == CHECK + 4 { CHECK } else { rip }
    }
    fn cr3_reload_restart(&self, _rip: u64) -> Option<u64> {
        None
    }
    fn in_replay_routine(&self, rip: u64) -> bool {
        ROUTINE.contains(&rip)
    }
}

const KERNEL_PAGE: u64 = 0x7000;
const QUEUE: u64 = 0x8000;

impl Fixture {
    fn kernel_word(&self, offset: u64) -> u64 {
        self.vcpu.ram.read_u64(KERNEL_PAGE + offset)
    }

    /// Enters, then harvests the dirty log: the stack page the entry
    /// faulted in writable is write-protected again, a narrowing the
    /// host's KVM must be told about.
    fn narrow_after_entry(&mut self) {
        self.host
            .prepare_entry(&mut self.vcpu, &mut self.exits)
            .unwrap();
        self.host.exit_guest(&mut self.exits);
        self.host
            .backend
            .get_dirty_log(mmu_api::SlotId(0))
            .expect("dirty log");
    }
}

fn replay_fixture(cs: u16, rip: u64) -> Fixture {
    let window = crate::host::SHADOW_HOST_WINDOW;
    let mut f = fixture_with(
        &[0x90],
        0,
        false,
        kvm_regs::default(),
        Some(Coherence::Replay { window }),
        Arc::new(Restarts),
    );
    f.vcpu.sregs.cs.selector = cs;
    f.vcpu.regs.rip = rip;
    f
}

#[test]
fn replay_records_reach_the_queue_and_a_cpl3_vcpu_gets_the_replay_vector() {
    let mut f = replay_fixture(0x23, CODE);
    f.narrow_after_entry();
    f.host.prepare_entry(&mut f.vcpu, &mut f.exits).unwrap();
    let count = f.kernel_word(abi::percpu::REPLAY_COUNT);
    assert!(count > 0, "nothing queued");
    for i in 0..count {
        let record = f.vcpu.ram.read_u64(QUEUE + abi::REPLAY_ENTRY_SIZE * i);
        assert_ne!(record & (abi::REASSERT | abi::REASSERT_FRAME), 0);
        assert!(
            record >= crate::host::SHADOW_HOST_WINDOW.raw(),
            "{record:#x}"
        );
    }
    assert_eq!(f.kernel_word(abi::percpu::REPLAY_PENDING), 0);
    assert_eq!(f.vcpu.events.exception.injected, 1);
    assert_eq!(f.vcpu.events.exception.nr, abi::REPLAY_VECTOR);

    // The guest replays the queue (clears the count) and comes back:
    // nothing new is queued, nothing injected.
    f.vcpu
        .ram
        .write_u64(KERNEL_PAGE + abi::percpu::REPLAY_COUNT, 0);
    f.vcpu.events = kvm_vcpu_events::default();
    f.host.exit_guest(&mut f.exits);
    f.host.prepare_entry(&mut f.vcpu, &mut f.exits).unwrap();
    assert_eq!(f.kernel_word(abi::percpu::REPLAY_COUNT), 0);
    assert_eq!(f.vcpu.events.exception.injected, 0);
}

#[test]
fn a_vcpu_past_the_return_paths_check_goes_back_to_it() {
    let mut f = replay_fixture(0x08, CHECK + 4);
    f.narrow_after_entry();
    // The first entry had nothing to replay: the vCPU stayed where it was.
    assert_eq!(f.vcpu.regs.rip, CHECK + 4);
    assert_eq!(f.kernel_word(abi::percpu::REPLAY_COUNT), 0);
    f.host.prepare_entry(&mut f.vcpu, &mut f.exits).unwrap();
    assert!(f.kernel_word(abi::percpu::REPLAY_COUNT) > 0);
    assert_eq!(f.vcpu.regs.rip, CHECK);
    // At CPL0 the kernel replays on its way out: no vector.
    assert_eq!(f.vcpu.events.exception.injected, 0);
}

#[test]
fn a_vcpu_inside_the_replay_routine_is_told_there_is_more() {
    let rip = ROUTINE.start + 8;
    let mut f = replay_fixture(0x08, rip);
    f.narrow_after_entry();
    f.host.prepare_entry(&mut f.vcpu, &mut f.exits).unwrap();
    assert_eq!(f.kernel_word(abi::percpu::REPLAY_COUNT), 0);
    assert_eq!(f.kernel_word(abi::percpu::REPLAY_PENDING), 1);
    assert_eq!(f.vcpu.regs.rip, rip);
    // Its REPLAY_REFILL then gets the records.
    assert_eq!(
        f.hypercall(hypercall::REPLAY_REFILL).unwrap(),
        HypercallAnswer::Answer(0)
    );
    assert!(f.kernel_word(abi::percpu::REPLAY_COUNT) > 0);
    assert_eq!(f.kernel_word(abi::percpu::REPLAY_PENDING), 0);
}
