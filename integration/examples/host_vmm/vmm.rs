//! The example's VMM: one VM, its MMU, the guest's image, one vCPU and
//! its loop (see `main.rs` for the walk-through). Also used by the crate's
//! KVM tests (`tests/kvm.rs`).

use std::error::Error;
use std::sync::Arc;

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Kvm, VcpuExit};
use mmu_api::paging::{CpuFeatures, CpuidLeaf, Cr0, Cr4, Efer};
use mmu_api::{DirtyBitmap, MemslotFlags, PagingContext, SlotId, VcpuId, VcpuKick};
use mmu_backends::shadow::Coherence;
use mmu_backends::{BackendConfig, BackendKind};
use mmu_integration::arena::shared_guest_memory;
use mmu_integration::kvm::{KvmMmu, Routed, apply_action};
use mmu_integration::shadow_host::abi::hypercall;
use mmu_integration::shadow_host::{
    HypercallAnswer, KvmPvVcpu, ReadExit, ReplayHub, ShadowVcpuHost, complete_read,
    read_exception_frame,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::guest::{Bus, RAM_SIZE, ROM_GPA, ROM_SIZE, ROM_WORD, TOUCH_GPA};
use crate::pv_guest::{self, GDT_GPA, IDT_GPA, KERNEL_GPA, SYSTEM_END, TSS_GPA, USER_CODE_GPA};

/// The memslots: the guest's system memory, its RAM (dirty-logged), the
/// ROM (read-only).
const SYSTEM: SlotId = SlotId(0);
const RAM: SlotId = SlotId(1);
const ROM: SlotId = SlotId(2);

/// Pages the guest touches and requests it makes.
const PAGES: u32 = 16;
const REQUESTS: u32 = 32;

/// This VMM runs its one vCPU on the main thread and no other thread posts
/// MMU requests, so a kick has nothing to interrupt. A VMM with vCPU
/// threads kicks with a signal plus `immediate_exit` (see `mmu_vmm::Kicker`).
#[derive(Debug)]
struct SingleThreaded;

impl VcpuKick for SingleThreaded {
    fn kick(&self) {}
}

/// What a run of the guest showed: the lines the example prints, and the
/// checks against the host's model of the guest that failed (none, when
/// all is well).
#[derive(Debug)]
pub(crate) struct Outcome {
    /// What the guest did and what the MMU saw.
    pub(crate) report: String,
    /// The checks that failed.
    pub(crate) failed: Vec<&'static str>,
}

/// Runs the guest once on a new VM whose MMU is backend `kind`.
pub(crate) fn run_guest(kind: BackendKind) -> Result<Outcome, Box<dyn Error>> {
    // The VM and its MMU: the one place the backend is named.
    let kvm = Kvm::new()?;
    let vm = Arc::new(kvm.create_vm()?);
    let mmu = KvmMmu::new(kind, &BackendConfig::default(), Arc::clone(&vm))?;

    // Guest memory, with the guest's image, registered through the MMU.
    // Shared, so the shadow backend's arena can map it a second time.
    let memory = shared_guest_memory(&[
        (GuestAddress(0), SYSTEM_END as usize),
        (GuestAddress(SYSTEM_END), (RAM_SIZE - SYSTEM_END) as usize),
        (GuestAddress(ROM_GPA), ROM_SIZE as usize),
    ])?;
    let kernel = pv_guest::kernel()?;
    for (gpa, words) in pv_guest::page_tables(PAGES) {
        write_words(&memory, gpa, &words)?;
    }
    write_words(&memory, GDT_GPA, &pv_guest::gdt())?;
    write_words(&memory, IDT_GPA, &pv_guest::idt(&kernel))?;
    memory.write_slice(&pv_guest::tss(), GuestAddress(TSS_GPA))?;
    memory.write_slice(&kernel.code, GuestAddress(KERNEL_GPA))?;
    memory.write_slice(
        &pv_guest::program(PAGES, REQUESTS)?,
        GuestAddress(USER_CODE_GPA),
    )?;
    memory.write_obj(ROM_WORD, GuestAddress(ROM_GPA + 0x20))?;
    let regions: Vec<_> = memory.iter().collect();
    mmu.memslots()
        .add_region(SYSTEM, regions[0], MemslotFlags::empty())?;
    mmu.memslots()
        .add_region(RAM, regions[1], MemslotFlags::LOG_DIRTY)?;
    mmu.memslots()
        .add_region(ROM, regions[2], MemslotFlags::READONLY)?;

    // One vCPU in long mode on the guest's own tables, and its MMU half.
    let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
    let leaves: Vec<CpuidLeaf> = cpuid
        .as_slice()
        .iter()
        .map(|e| CpuidLeaf::new(e.function, e.index, [e.eax, e.ebx, e.ecx, e.edx]))
        .collect();
    let mut vcpu = vm.create_vcpu(0)?;
    vcpu.set_cpuid2(&cpuid)?;
    let sregs = pv_guest::long_mode_sregs(vcpu.get_sregs()?);
    vcpu.set_sregs(&sregs)?;
    vcpu.set_regs(&pv_guest::start_regs(&kernel))?;
    let mut base = PagingContext::new(
        CpuFeatures::from_cpuid(&leaves),
        CpuidLeaf::maxphyaddr(&leaves),
    );
    base.cr0 = Cr0::from_bits_truncate(sregs.cr0);
    base.cr3 = sregs.cr3;
    base.cr4 = Cr4::from_bits_truncate(sregs.cr4);
    base.efer = Efer::from_bits_truncate(sregs.efer);
    let mut exits = mmu.create_vcpu(VcpuId(0), Arc::new(SingleThreaded))?;
    let delivery = mmu.page_fault_delivery();
    if mmu.shadow().is_none() {
        // Under shadow, the hosting's first `prepare_entry` finds the
        // guest's own CR3 and sets the context itself.
        apply_action(&vcpu, exits.set_paging_context(&base)?, delivery)?;
    }
    let mut bus = Bus::new(memory.clone());

    // Under shadow, the vCPU's hosting: the guest's facts come from the
    // guest image.
    let layout = pv_guest::vcpu_layout(&kernel);
    let mut shadow = mmu.shadow().map(|hosting| {
        let backend = hosting.backend().clone();
        let hub = ReplayHub::for_backend(&backend, 1);
        ShadowVcpuHost::new(0, backend, hub, layout, Arc::new(kernel.clone()), base)
    });

    // The vCPU loop, until the guest writes the device's done register.
    // At the guest's checkpoint, the dirty log is harvested while the
    // guest runs, as a live migration would (which makes the MMU
    // write-protect the pages again).
    let mut first_log = None;
    loop {
        match shadow.as_mut() {
            Some(host) => {
                host.prepare_entry(&mut KvmPvVcpu::new(&mut vcpu, &memory), &mut exits)?
            }
            None => apply_action(&vcpu, exits.prepare_entry()?, delivery)?,
        }
        let result = vcpu.run();
        match shadow.as_mut() {
            Some(host) => host.exit_guest(&mut exits),
            None => exits.exit_guest(),
        }
        let port = match exits.handle_kvm_exit(result?, &mut bus)? {
            Routed::Handled(action) => {
                apply_action(&vcpu, action, delivery)?;
                if bus.done {
                    break;
                }
                checkpoint(&mmu, &bus, &mut first_log)?;
                continue;
            }
            Routed::Unhandled(VcpuExit::IoIn(port, data))
                if (hypercall::BASE..hypercall::END).contains(&port) && data.len() == 4 =>
            {
                port
            }
            Routed::Unhandled(other) => {
                let other = format!("{other:?}");
                let regs = vcpu.get_regs()?;
                let sregs = vcpu.get_sregs()?;
                return Err(format!(
                    "unexpected exit {other} at rip {:#x} (cs {:#x}, cr2 {:#x})",
                    regs.rip, sregs.cs.selector, sregs.cr2
                )
                .into());
            }
        };
        // A hypercall of the paravirtual MMU ABI.
        let mut pv = KvmPvVcpu::new(&mut vcpu, &memory);
        let answer = match shadow.as_mut() {
            Some(host) => host.hypercall(&mut pv, &mut exits, &mut bus, port)?,
            // KVM walks the guest's tables: an exception is the guest's.
            None => HypercallAnswer::Unhandled(read_exception_frame(&mut pv)?),
        };
        let value = match answer {
            HypercallAnswer::Answer(value) => value,
            HypercallAnswer::DeliverPageFault { frame, .. } | HypercallAnswer::Unhandled(frame) => {
                return Err(format!(
                    "the guest took vector {} (error code {:#x}, cr2 {:#x}) at rip {:#x}",
                    frame.vector, frame.error_code, frame.cr2, frame.rip
                )
                .into());
            }
        };
        complete_read(&mut vcpu, ReadExit::Io, 4, &value.to_le_bytes())?;
        if bus.done {
            break;
        }
        checkpoint(&mmu, &bus, &mut first_log)?;
    }

    // What the guest did, and what the MMU saw.
    let reports = bus.reports.clone();
    let dirty = mmu.memslots().dirty_log(RAM)?;
    let touched: Vec<u64> = (0..u64::from(PAGES))
        .map(|i| (TOUCH_GPA - SYSTEM_END) / 4096 + i)
        .collect();
    let Some(first) = first_log else {
        return Err("the guest never reached its checkpoint".into());
    };
    // Both passes wrote every touched page: each harvest has them all.
    let missing = touched
        .iter()
        .filter(|&&p| !dirty.is_dirty(p) || !first.is_dirty(p))
        .count();
    let expected = pv_guest::expected_reports(PAGES, REQUESTS, ROM_WORD);
    let stats = mmu.backend().stats();
    let mut report = String::new();
    macro_rules! say {
        ($($arg:tt)*) => {{
            report.push_str(&format!($($arg)*));
            report.push('\n');
        }};
    }
    match mmu.shadow() {
        Some(hosting) => say!(
            "backend: {} (coherence {:?})",
            mmu.backend().name(),
            hosting.coherence()
        ),
        None => say!("backend: {}", mmu.backend().name()),
    }
    say!(
        "guest reported: status sum {:#x}, ROM word {:#x}, page sum {} (expected {:#x}, {:#x}, {})",
        reports.first().copied().unwrap_or(0),
        reports.get(1).copied().unwrap_or(0),
        reports.get(2).copied().unwrap_or(0),
        expected[0],
        expected[1],
        expected[2]
    );
    say!(
        "device: {} doorbell rings, ROM writes {:x?}",
        bus.rings,
        bus.rom_writes
    );
    say!(
        "dirty log of RAM: {} pages at the checkpoint, {} after it; the {} pages the guest touched are {}",
        first.count(),
        dirty.count(),
        touched.len(),
        if missing == 0 {
            "all in it"
        } else {
            "NOT all in it"
        }
    );
    say!("exit handler: {}", exits.stats());
    say!("backend stats: {stats}");

    let mut failed = Vec::new();
    let mut check = |ok: bool, what: &'static str| {
        if !ok {
            failed.push(what);
        }
    };
    check(reports == expected, "the guest's reports");
    check(missing == 0, "the dirty logs");
    check(bus.rings == u64::from(REQUESTS), "the doorbell rings");
    check(
        bus.rom_writes.get(&(ROM_GPA + 0x10)) == Some(&vec![0x55]),
        "the ROM writes",
    );
    if let Some(hosting) = mmu.shadow() {
        // The guest ran on the shadow tables: they faulted in.
        let faults = stats.get("faults").unwrap_or(0);
        say!("shadow faults: {faults}");
        check(faults > 0, "shadow faults");
        if matches!(hosting.coherence(), Coherence::Replay { .. }) {
            // The harvest narrowed SPTEs the host's KVM had already seen:
            // they went through the replay queue to the guest kernel.
            let replayed = stats.get("replayed_entries").unwrap_or(0);
            say!("SPTEs re-asserted by the guest kernel: {replayed}");
            check(replayed > 0, "replayed SPTEs");
        }
    }
    Ok(Outcome { report, failed })
}

/// At the guest's checkpoint (once): harvest the dirty log of RAM.
fn checkpoint(
    mmu: &KvmMmu,
    bus: &Bus,
    first_log: &mut Option<DirtyBitmap>,
) -> Result<(), Box<dyn Error>> {
    if bus.checkpoints > 0 && first_log.is_none() {
        *first_log = Some(mmu.memslots().dirty_log(RAM)?);
    }
    Ok(())
}

/// Writes little-endian words at `gpa`.
fn write_words(
    memory: &GuestMemoryMmap,
    gpa: u64,
    words: &[u64],
) -> Result<(), vm_memory::GuestMemoryError> {
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    memory.write_slice(&bytes, GuestAddress(gpa))
}
