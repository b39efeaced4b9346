//! A minimal host VMM on KVM with the MMU plugged in.
//!
//! ```text
//! cargo run -p mmu-integration --example host_vmm -- --mmu ept
//! cargo run -p mmu-integration --example host_vmm -- --mmu shadow
//! ```
//!
//! The backend is picked from the command line when the VM is created;
//! nothing else in the VMM changes with it. The VMM:
//!
//! 1. creates a KVM VM and builds its MMU with `KvmMmu::new(kind, ...)`;
//! 2. registers guest RAM (dirty-logged) and a ROM (read-only) through the
//!    MMU's memslot glue, so the backend owns the memslots (the EPT
//!    backend issues `KVM_SET_USER_MEMORY_REGION` itself);
//! 3. runs one vCPU in a loop: `prepare_entry` before `KVM_RUN`,
//!    `exit_guest` after it, every exit through `handle_kvm_exit` (MMIO is
//!    classified by the backend and served on the VMM's bus), and the
//!    VMM's own exits (port I/O, HLT) handled as before;
//! 4. prints what the guest reported, the dirty log and the backend's
//!    stats, and checks them against the host's model of the guest.
//!
//! The guest is a few bytes of real-mode code (see `guest.rs`): it touches
//! pages, does request/response over an MMIO doorbell and status register,
//! writes to the ROM and reads it.
//!
//! With `--mmu shadow`, `KvmMmu::new` registers the shadow page pool with
//! KVM and mirrors each memslot at its host-physical address (read-only
//! and dirty-logged as the slot is). This guest runs in real mode, without
//! page tables, so KVM translates its accesses through the mirror and the
//! shadow tables are never walked: the backend classifies its MMIO and the
//! glue merges KVM's dirty log into the backend's. A guest that pages runs
//! on the shadow tables themselves once its #PF vector and CR3 loads reach
//! the backend, as the `vmm` crate's guest kit does (`mmu-vmm run --mmu
//! shadow`).

mod guest;

use std::error::Error;
use std::process::ExitCode;
use std::sync::Arc;

use kvm_ioctls::{Kvm, VcpuExit};
use mmu_api::{MemslotFlags, SlotId, VcpuId, VcpuKick};
use mmu_backends::{BackendConfig, BackendKind};
use mmu_integration::kvm::{KvmMmu, Routed, apply_action};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use guest::{
    Bus, CODE_GPA, RAM_SIZE, REPORT_PORT, ROM_GPA, ROM_SIZE, ROM_WORD, TOUCH_GPA, expected_reports,
    program, start_real_mode,
};

/// Pages the guest touches and requests it makes.
const PAGES: u16 = 16;
const REQUESTS: u16 = 32;

/// This VMM runs its one vCPU on the main thread and no other thread posts
/// MMU requests, so a kick has nothing to interrupt. A VMM with vCPU
/// threads kicks with a signal plus `immediate_exit` (see `mmu_vmm::Kicker`).
#[derive(Debug)]
struct SingleThreaded;

impl VcpuKick for SingleThreaded {
    fn kick(&self) {}
}

fn parse_args() -> Result<BackendKind, Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [flag, kind] if flag == "--mmu" => Ok(kind.parse()?),
        _ => Err(format!(
            "usage: host_vmm --mmu shadow|ept (this build has {})",
            mmu_backends::KindList(BackendKind::compiled_in())
        )
        .into()),
    }
}

fn run() -> Result<bool, Box<dyn Error>> {
    let kind = parse_args()?;

    // The VM and its MMU: the one place the backend is named.
    let kvm = Kvm::new()?;
    let vm = Arc::new(kvm.create_vm()?);
    let mmu = KvmMmu::new(kind, &BackendConfig::default(), Arc::clone(&vm))?;

    // Guest memory, registered through the MMU.
    let memory = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), RAM_SIZE as usize),
        (GuestAddress(ROM_GPA), ROM_SIZE as usize),
    ])?;
    memory.write_slice(&program(PAGES, REQUESTS), GuestAddress(CODE_GPA))?;
    memory.write_obj(ROM_WORD, GuestAddress(ROM_GPA + 0x20))?;
    let regions: Vec<_> = memory.iter().collect();
    mmu.memslots()
        .add_region(SlotId(0), regions[0], MemslotFlags::LOG_DIRTY)?;
    mmu.memslots()
        .add_region(SlotId(1), regions[1], MemslotFlags::READONLY)?;

    // One vCPU and its MMU half.
    let mut vcpu = vm.create_vcpu(0)?;
    start_real_mode(&vcpu, CODE_GPA)?;
    let mut exits = mmu.create_vcpu(VcpuId(0), Arc::new(SingleThreaded))?;
    let delivery = mmu.page_fault_delivery();
    let mut bus = Bus::new(memory.clone());

    // The vCPU loop.
    let mut reports = Vec::new();
    loop {
        apply_action(&vcpu, exits.prepare_entry()?, delivery)?;
        let result = vcpu.run();
        exits.exit_guest();
        match exits.handle_kvm_exit(result?, &mut bus)? {
            Routed::Handled(action) => apply_action(&vcpu, action, delivery)?,
            Routed::Unhandled(VcpuExit::IoOut(REPORT_PORT, data)) => {
                let mut word = [0u8; 2];
                word[..data.len().min(2)].copy_from_slice(&data[..data.len().min(2)]);
                reports.push(u16::from_le_bytes(word));
            }
            Routed::Unhandled(VcpuExit::Hlt) => break,
            Routed::Unhandled(other) => return Err(format!("unexpected exit {other:?}").into()),
        }
    }

    // What the guest did, and what the MMU saw.
    let dirty = mmu.memslots().dirty_log(SlotId(0))?;
    let touched: Vec<u64> = (0..u64::from(PAGES))
        .map(|i| TOUCH_GPA / 4096 + i)
        .collect();
    let missing = touched.iter().filter(|&&p| !dirty.is_dirty(p)).count();
    let expected = expected_reports(REQUESTS);
    println!("backend: {}", mmu.backend().name());
    println!(
        "guest reported: status sum {:#x}, ROM word {:#x} (expected {:#x}, {:#x})",
        reports.first().copied().unwrap_or(0),
        reports.get(1).copied().unwrap_or(0),
        expected[0],
        expected[1]
    );
    println!(
        "device: {} doorbell rings, ROM writes {:x?}",
        bus.rings, bus.rom_writes
    );
    println!(
        "dirty log of RAM: {} pages; the {} pages the guest touched are {}",
        dirty.count(),
        touched.len(),
        if missing == 0 {
            "all in it"
        } else {
            "NOT all in it"
        }
    );
    println!("exit handler: {}", exits.stats());
    println!("backend stats: {}", mmu.backend().stats());

    let ok = reports == expected
        && missing == 0
        && bus.rings == u64::from(REQUESTS)
        && bus.rom_writes.get(&(ROM_GPA + 0x10)) == Some(&vec![0x55]);
    Ok(ok)
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("host_vmm: the guest did not do what the host's model says");
            ExitCode::FAILURE
        }
        Err(e) => {
            let mut message = e.to_string();
            let mut source = e.source();
            while let Some(s) = source {
                message.push_str(": ");
                message.push_str(&s.to_string());
                source = s.source();
            }
            eprintln!("host_vmm: {message}");
            ExitCode::FAILURE
        }
    }
}
