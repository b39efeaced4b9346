//! The KVM side on a real VM: the memory-region port (memslots, flags,
//! dirty log), exits routed through the MMU, and actions applied to a
//! vCPU. Each test skips (and passes) where `/dev/kvm` cannot be opened,
//! and fails there instead when `MMU_REQUIRE_KVM=1`.
//!
//! The guests are a real-mode program (from the `host_vmm` example's
//! `guest.rs`) and the example's own long-mode guest, which speaks the
//! paravirtual MMU ABI and runs under both backends.
#![cfg(all(feature = "kvm", feature = "ept"))]

#[path = "../examples/host_vmm/guest.rs"]
mod guest;
#[cfg(feature = "shadow")]
#[path = "../examples/host_vmm/pv_guest.rs"]
mod pv_guest;
#[cfg(feature = "shadow")]
#[path = "../examples/host_vmm/vmm.rs"]
mod vmm;

use std::sync::Arc;

use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use mmu_api::{
    Gpa, Gva, Hpa, MemslotError, MemslotFlags, MmuBackend, PfErrorCode, RootLoad, SlotId, VcpuId,
    VcpuKick,
};
use mmu_backends::{BackendConfig, BackendKind, HypervisorMemory};
use mmu_integration::kvm::{
    ApplyError, KvmMemory, KvmMmu, PageFaultDelivery, Routed, apply_action,
};
use mmu_integration::{Action, VcpuExits};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use guest::{
    Asm, Bus, CODE_GPA, RAM_SIZE, REPORT_PORT, ROM_GPA, ROM_SIZE, ROM_WORD, TOUCH_GPA,
    expected_reports, program, start_real_mode,
};

use mmu_integration::testing::kvm_or_skip;

#[derive(Debug)]
struct SingleThreaded;

impl VcpuKick for SingleThreaded {
    fn kick(&self) {}
}

const RAM: SlotId = SlotId(0);
const ROM: SlotId = SlotId(1);
const SCRATCH: SlotId = SlotId(2);
/// A third region: 64 KiB at 0x9_0000, dirty-logged.
const SCRATCH_GPA: u64 = 0x9_0000;

/// A KVM VM with the EPT backend owning RAM, the ROM and a scratch
/// region, one real-mode vCPU and its exit handler.
struct Fixture {
    exits: VcpuExits,
    vcpu: VcpuFd,
    bus: Bus,
    mmu: KvmMmu,
    memory: GuestMemoryMmap,
    vm: Arc<VmFd>,
}

impl Fixture {
    fn new() -> Fixture {
        let kvm = Kvm::new().expect("KVM");
        let vm = Arc::new(kvm.create_vm().expect("KVM_CREATE_VM"));
        let mmu = KvmMmu::new(BackendKind::Ept, &BackendConfig::default(), Arc::clone(&vm))
            .expect("EPT backend on KVM");
        let memory = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), RAM_SIZE as usize),
            (GuestAddress(SCRATCH_GPA), 0x1_0000),
            (GuestAddress(ROM_GPA), ROM_SIZE as usize),
        ])
        .unwrap();
        memory
            .write_obj(ROM_WORD, GuestAddress(ROM_GPA + 0x20))
            .unwrap();
        let regions: Vec<_> = memory.iter().collect();
        let glue = mmu.memslots();
        glue.add_region(RAM, regions[0], MemslotFlags::LOG_DIRTY)
            .unwrap();
        glue.add_region(SCRATCH, regions[1], MemslotFlags::LOG_DIRTY)
            .unwrap();
        glue.add_region(ROM, regions[2], MemslotFlags::READONLY)
            .unwrap();
        let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
        let exits = mmu
            .create_vcpu(VcpuId(0), Arc::new(SingleThreaded))
            .unwrap();
        let bus = Bus::new(memory.clone());
        Fixture {
            exits,
            vcpu,
            bus,
            mmu,
            memory,
            vm,
        }
    }

    /// Loads `code` at `CODE_GPA` and runs it until HLT; returns the words
    /// it reported.
    fn run(&mut self, code: &[u8]) -> Vec<u16> {
        self.memory
            .write_slice(code, GuestAddress(CODE_GPA))
            .unwrap();
        start_real_mode(&self.vcpu, CODE_GPA).unwrap();
        let delivery = self.mmu.page_fault_delivery();
        let mut reports = Vec::new();
        loop {
            let entry = self.exits.prepare_entry().unwrap();
            apply_action(&self.vcpu, entry, delivery).unwrap();
            let result = self.vcpu.run();
            self.exits.exit_guest();
            match self
                .exits
                .handle_kvm_exit(result.expect("KVM_RUN"), &mut self.bus)
            {
                Ok(Routed::Handled(action)) => apply_action(&self.vcpu, action, delivery).unwrap(),
                Ok(Routed::Unhandled(VcpuExit::IoOut(REPORT_PORT, data))) => {
                    reports.push(u16::from_le_bytes([data[0], data[1]]));
                }
                Ok(Routed::Unhandled(VcpuExit::Hlt)) => return reports,
                Ok(Routed::Unhandled(other)) => panic!("unexpected exit {other:?}"),
                Err(e) => panic!("exit handler: {e}"),
            }
        }
    }

    fn backend(&self) -> &Arc<dyn MmuBackend> {
        self.mmu.backend()
    }

    fn stat(&self, name: &str) -> u64 {
        self.backend().stats().get(name).unwrap()
    }
}

#[cfg(feature = "shadow")]
#[test]
fn example_guest_pages_through_either_backend() {
    if !kvm_or_skip("example_guest_pages_through_either_backend") {
        return;
    }
    // Under shadow the run also checks that the backend took shadow
    // faults (and, under replay coherence, that the guest kernel replayed
    // the entries the mid-run dirty-log harvest narrowed).
    for kind in [BackendKind::Shadow, BackendKind::Ept] {
        let outcome = vmm::run_guest(kind).expect("the example's guest runs");
        assert!(
            outcome.failed.is_empty(),
            "{kind}: {:?} differ from the model\n{}",
            outcome.failed,
            outcome.report
        );
    }
}

#[test]
fn real_mode_guest_runs_through_the_mmu() {
    if !kvm_or_skip("real_mode_guest_runs_through_the_mmu") {
        return;
    }
    let mut f = Fixture::new();
    let (pages, requests) = (12, 20);
    let reports = f.run(&program(pages, requests));
    assert_eq!(reports, expected_reports(requests));
    assert_eq!(f.bus.rings, u64::from(requests));
    assert_eq!(f.bus.rom_writes.get(&(ROM_GPA + 0x10)), Some(&vec![0x55]));
    // Every doorbell and status exit after the first was a cache hit; the
    // ROM write was the one other miss.
    assert_eq!(f.stat("mmio_cache_misses"), 2);
    assert_eq!(f.stat("mmio_cache_hits"), 2 * u64::from(requests) - 1);
    let stats = f.exits.stats();
    assert_eq!(stats.mmio_exits, 2 * u64::from(requests) + 1);
    assert_eq!(stats.rom_writes, 1);

    // KVM's dirty log, read through the backend: every touched page, and
    // the ROM write did not make anything dirty.
    let log = f.mmu.memslots().dirty_log(RAM).unwrap();
    for i in 0..u64::from(pages) {
        assert!(log.is_dirty(TOUCH_GPA / 4096 + i), "page {i} missing");
    }
    assert!(!log.is_dirty(TOUCH_GPA / 4096 + u64::from(pages)));
    for i in 0..u64::from(pages) {
        let word: u16 = f
            .memory
            .read_obj(GuestAddress(TOUCH_GPA + i * 4096))
            .unwrap();
        assert_eq!(u64::from(word), u64::from(pages) - i);
    }
    // A harvest clears the log.
    assert_eq!(f.mmu.memslots().dirty_log(RAM).unwrap().count(), 0);
}

/// Reads `segment:[disp]` and reports it.
fn read_and_report(a: &mut Asm, segment: u64, disp: u16) {
    a.mov_ax((segment >> 4) as u16)
        .mov_es_ax()
        .load_ax(disp)
        .report_ax(REPORT_PORT);
}

#[test]
fn memslot_changes_reach_the_guest() {
    if !kvm_or_skip("memslot_changes_reach_the_guest") {
        return;
    }
    let mut f = Fixture::new();

    // The ROM, read through its slot; the scratch region written.
    let mut a = Asm::default();
    read_and_report(&mut a, ROM_GPA, 0x20);
    a.mov_ax((SCRATCH_GPA >> 4) as u16)
        .mov_es_ax()
        .mov_ax(0x1234)
        .store_ax(0x3000)
        .hlt();
    let code = a.code();
    assert_eq!(f.run(&code), [ROM_WORD]);
    let log = f.mmu.memslots().dirty_log(SCRATCH).unwrap();
    assert_eq!(log.iter_dirty().collect::<Vec<_>>(), [3]);

    // Move the ROM down to 0xe_0000 and delete the scratch region.
    let moved = 0xe_0000;
    f.mmu.memslots().move_slot(ROM, Gpa(moved)).unwrap();
    f.mmu.memslots().delete(SCRATCH).unwrap();
    let slots: Vec<_> = f
        .backend()
        .memslots()
        .iter()
        .map(|s| (s.id, s.guest_base))
        .collect();
    assert_eq!(slots, [(RAM, Gpa(0)), (ROM, Gpa(moved))]);

    // The ROM answers at its new place; its old place and the deleted
    // region are MMIO now (the classification cache saw the new
    // generations), so the reads reach the bus's open-bus answer and the
    // write is dropped there.
    let mut a = Asm::default();
    read_and_report(&mut a, moved, 0x20);
    read_and_report(&mut a, ROM_GPA, 0x20);
    read_and_report(&mut a, SCRATCH_GPA, 0x3000);
    a.mov_ax(0x5678).store_ax(0x3000).hlt();
    let misses_before = f.stat("mmio_cache_misses");
    assert_eq!(f.run(&a.code()), [ROM_WORD, 0xffff, 0xffff]);
    assert_eq!(f.bus.unclaimed_reads, 2);
    assert_eq!(f.bus.unclaimed_writes, 1);
    assert_eq!(f.stat("mmio_cache_misses"), misses_before + 2);
    // The deleted region's memory still has what the guest wrote before.
    let kept: u16 = f
        .memory
        .read_obj(GuestAddress(SCRATCH_GPA + 0x3000))
        .unwrap();
    assert_eq!(kept, 0x1234);

    // Dirty logging switched off and on again starts a clean log.
    let glue = f.mmu.memslots();
    glue.set_dirty_logging(RAM, false).unwrap();
    assert_eq!(
        glue.dirty_log(RAM).unwrap_err(),
        MemslotError::NotLogging(RAM)
    );
    glue.set_dirty_logging(RAM, true).unwrap();
    assert_eq!(glue.dirty_log(RAM).unwrap().count(), 0);
}

#[test]
fn kvm_refusals_are_reported_and_change_nothing() {
    if !kvm_or_skip("kvm_refusals_are_reported_and_change_nothing") {
        return;
    }
    let f = Fixture::new();
    let port = KvmMemory::new(Arc::clone(&f.vm));
    let rom = f
        .backend()
        .memslots()
        .into_iter()
        .find(|s| s.id == ROM)
        .unwrap();
    // KVM's own answers through the port.
    let err = port.get_dirty_log(&rom).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOENT), "{err}");
    let mut unknown = rom;
    unknown.id = SlotId(9);
    let err = port.delete_user_memory_region(&unknown).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err}");

    // A slot number KVM does not have (beyond KVM_USER_MEM_SLOTS): the
    // backend's table accepts it, KVM refuses, and nothing changes.
    let generation = f.backend().memslot_generation();
    let region = f.memory.find_region(GuestAddress(SCRATCH_GPA)).unwrap();
    f.mmu.memslots().delete(SCRATCH).unwrap();
    let generation_after_delete = f.backend().memslot_generation();
    assert!(generation_after_delete > generation);
    let err = f
        .mmu
        .memslots()
        .add_region(SlotId(40_000), region, MemslotFlags::empty())
        .unwrap_err();
    assert!(matches!(err, MemslotError::Hypervisor(_)), "{err:?}");
    assert_eq!(f.backend().memslot_generation(), generation_after_delete);
    assert_eq!(f.backend().memslots().len(), 2);
    assert!(!f.mmu.memslots().ids().contains(&SlotId(40_000)));

    // Overlaps are refused by the backend before KVM sees them.
    f.mmu
        .memslots()
        .add_region(SlotId(5), region, MemslotFlags::empty())
        .unwrap();
    let err = f.mmu.memslots().move_slot(SlotId(5), Gpa(0)).unwrap_err();
    assert!(matches!(err, MemslotError::Overlap { .. }), "{err:?}");
    let slot5 = f
        .backend()
        .memslots()
        .into_iter()
        .find(|s| s.id == SlotId(5));
    assert_eq!(slot5.map(|s| s.guest_base), Some(Gpa(SCRATCH_GPA)));
}

#[test]
fn actions_are_applied_to_the_vcpu() {
    if !kvm_or_skip("actions_are_applied_to_the_vcpu") {
        return;
    }
    let mut f = Fixture::new();
    let delivery = f.mmu.page_fault_delivery();

    // A new root goes to CR3.
    let root = RootLoad::new(Some(Hpa(0x7000)), true);
    apply_action(&f.vcpu, Action::LoadRoot(root), delivery).unwrap();
    assert_eq!(f.vcpu.get_sregs().unwrap().cr3, 0x7000);
    // What KVM cannot do, and what this crate does not do, are typed.
    let flush = RootLoad::new(None, true);
    assert!(matches!(
        apply_action(&f.vcpu, Action::LoadRoot(flush), delivery),
        Err(ApplyError::FlushWithoutRoot)
    ));
    assert!(matches!(
        apply_action(
            &f.vcpu,
            Action::EmulateMmio { gpa: Gpa(0xd_0000) },
            delivery
        ),
        Err(ApplyError::NeedsEmulation { .. })
    ));

    // Injected exceptions are delivered through the real-mode IVT. The #PF
    // handler reports CR2's two halves; the #GP handler reports 0x0d0d.
    let pf_handler = 0x3000u16;
    let gp_handler = 0x3100u16;
    f.memory
        .write_obj([pf_handler, 0u16], GuestAddress(14 * 4))
        .unwrap();
    f.memory
        .write_obj([gp_handler, 0u16], GuestAddress(13 * 4))
        .unwrap();
    let mut pf = Asm::default();
    pf.mov_dx(REPORT_PORT);
    let mut pf = pf.code();
    // mov eax, cr2; out dx, ax; shr eax, 16; out dx, ax; hlt
    pf.extend_from_slice(&[0x0f, 0x20, 0xd0, 0xef, 0x66, 0xc1, 0xe8, 0x10, 0xef, 0xf4]);
    f.memory
        .write_slice(&pf, GuestAddress(u64::from(pf_handler)))
        .unwrap();
    let mut gp = Asm::default();
    gp.mov_ax(0x0d0d).report_ax(REPORT_PORT).hlt();
    f.memory
        .write_slice(&gp.code(), GuestAddress(u64::from(gp_handler)))
        .unwrap();
    let mut main = Asm::default();
    main.hlt();
    f.memory
        .write_slice(&main.code(), GuestAddress(CODE_GPA))
        .unwrap();

    let mut inject = |action: Action, delivery| {
        start_real_mode(&f.vcpu, CODE_GPA).unwrap();
        apply_action(&f.vcpu, action, delivery).unwrap();
        let mut reports = Vec::new();
        loop {
            let result = f.vcpu.run();
            match f
                .exits
                .handle_kvm_exit(result.expect("KVM_RUN"), &mut f.bus)
                .unwrap()
            {
                Routed::Unhandled(VcpuExit::IoOut(REPORT_PORT, data)) => {
                    reports.push(u16::from_le_bytes([data[0], data[1]]));
                }
                Routed::Unhandled(VcpuExit::Hlt) => return reports,
                other => panic!("unexpected {other:?}"),
            }
        }
    };
    let pf_at = |cr2: u64| Action::InjectPageFault {
        error_code: PfErrorCode::WRITE,
        cr2: Gva(cr2),
    };
    assert_eq!(
        inject(pf_at(0x1234_5678), delivery),
        [0x5678, 0x1234],
        "CR2 seen by the guest's #PF handler ({delivery:?})"
    );
    assert_eq!(
        inject(pf_at(0x0bad_f00d), PageFaultDelivery::SetCr2),
        [0xf00d, 0x0bad],
        "CR2 seen by the guest's #PF handler (SetCr2)"
    );
    assert_eq!(inject(Action::InjectGeneralProtection, delivery), [0x0d0d]);
}

/// Registers a 4 KiB region at `gpa` as KVM slot `slot` and removes it
/// again: KVM's own answer to whether a slot already covers `gpa`.
#[cfg(feature = "shadow")]
fn kvm_has_room_at(vm: &VmFd, slot: u32, gpa: u64) -> Result<(), i32> {
    // SAFETY: a fresh anonymous page, unmapped below after KVM let go.
    let page = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(page, libc::MAP_FAILED);
    let mut region = kvm_bindings::kvm_userspace_memory_region {
        slot,
        flags: 0,
        guest_phys_addr: gpa,
        memory_size: 4096,
        userspace_addr: page as u64,
    };
    // SAFETY: `page` stays mapped until the slot is deleted below.
    let added = unsafe { vm.set_user_memory_region(region) }.map_err(|e| e.errno());
    if added.is_ok() {
        region.memory_size = 0;
        // SAFETY: a zero-sized region deletes the slot.
        unsafe { vm.set_user_memory_region(region) }.unwrap();
    }
    // SAFETY: KVM no longer maps the page.
    unsafe { libc::munmap(page, 4096) };
    added
}

#[cfg(feature = "shadow")]
#[test]
fn shadow_arena_is_one_kvm_memslot_guest_slots_never_reach_kvm() {
    if !kvm_or_skip("shadow_arena_is_one_kvm_memslot_guest_slots_never_reach_kvm") {
        return;
    }
    let kvm = Kvm::new().unwrap();
    let vm = Arc::new(kvm.create_vm().unwrap());
    let mmu = KvmMmu::new(
        BackendKind::Shadow,
        &BackendConfig::default(),
        Arc::clone(&vm),
    )
    .unwrap();
    let hosting = mmu.shadow().expect("shadow hosting");
    let arena = hosting.arena().expect("the arena is the default");
    let (pool_host, pool_size, pool_hpa) = hosting.backend().pool_region();
    let region = *arena.region();
    assert_eq!(region.guest_phys_addr, pool_hpa.raw());
    assert!(region.memory_size > pool_size);
    // KVM holds the arena: a region inside it is refused as an overlap.
    assert_eq!(kvm_has_room_at(&vm, 1, pool_hpa.raw()), Err(libc::EEXIST));
    assert_eq!(
        kvm_has_room_at(&vm, 1, pool_hpa.raw() + region.memory_size - 4096),
        Err(libc::EEXIST)
    );
    // The arena maps the pool's own frames.
    // SAFETY: the pool's first word, mapped while the backend lives.
    unsafe { std::ptr::write_volatile(pool_host.0 as *mut u64, 0x5a5a) };
    let in_arena = arena.host_addr(pool_hpa).unwrap();
    // SAFETY: the arena maps the pool at its start.
    let seen = unsafe { std::ptr::read_volatile(in_arena as *const u64) };
    assert_eq!(seen, 0x5a5a);
    // SAFETY: as above; the pool starts zeroed again for the backend.
    unsafe { std::ptr::write_volatile(pool_host.0 as *mut u64, 0) };

    // A guest memslot lives in the shadow MMU and the arena only.
    let memory =
        mmu_integration::arena::shared_guest_memory(&[(GuestAddress(0x10_0000), 0x4_0000)])
            .unwrap();
    memory
        .write_obj(0x1234_5678u32, GuestAddress(0x10_0010))
        .unwrap();
    let glue = mmu.memslots();
    glue.add_region(
        RAM,
        memory.find_region(GuestAddress(0x10_0000)).unwrap(),
        MemslotFlags::empty(),
    )
    .unwrap();
    let slot = mmu.backend().memslots()[0];
    let hpa = slot.backing.hpa;
    assert!(
        hpa.raw() >= pool_hpa.raw() + pool_size,
        "{hpa} is past the pool"
    );
    assert!(hpa.raw() + 0x4_0000 <= pool_hpa.raw() + region.memory_size);
    // KVM has nothing at the guest-physical address.
    assert_eq!(kvm_has_room_at(&vm, 1, 0x10_0000), Ok(()));
    let at = arena.host_addr(hpa).unwrap();
    // SAFETY: the slot's place in the arena, mapped while the slot lives.
    let word = unsafe { std::ptr::read_volatile((at + 0x10) as *const u32) };
    assert_eq!(word, 0x1234_5678, "the arena maps the guest's memory");
    println!(
        "arena at {:#x}, {} MiB; pool {} KiB; {} at {hpa}",
        region.guest_phys_addr,
        region.memory_size >> 20,
        pool_size >> 10,
        RAM
    );

    // After the delete the place is inaccessible: nothing reaches the old
    // backing through the arena (KVM's MMU notifier dropped its pages).
    glue.delete(RAM).unwrap();
    assert_eq!(arena.backing_used(), 0);
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let line = maps
        .lines()
        .find(|l| {
            let range = l.split_whitespace().next().unwrap();
            let (lo, hi) = range.split_once('-').unwrap();
            let (lo, hi) = (
                u64::from_str_radix(lo, 16).unwrap(),
                u64::from_str_radix(hi, 16).unwrap(),
            );
            lo <= at && at < hi
        })
        .expect("the arena is mapped");
    assert!(line.contains(" ---p "), "{line}");
    // The memory itself is untouched.
    assert_eq!(
        memory.read_obj::<u32>(GuestAddress(0x10_0010)).unwrap(),
        0x1234_5678
    );
    // A private mapping cannot be placed, and the refusal says why.
    let private = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
    let err = glue
        .add_region(
            RAM,
            private.find_region(GuestAddress(0)).unwrap(),
            MemslotFlags::empty(),
        )
        .unwrap_err();
    println!("private memory: {err}");
    let chain = format!("{:?}", err);
    assert!(chain.contains("shared mapping"), "{chain}");
    assert!(mmu.backend().memslots().is_empty());
    assert_eq!(arena.backing_used(), 0);
    assert_eq!(
        hosting.coherence(),
        if mmu_integration::kvm::host_shadows_page_tables() {
            mmu_backends::shadow::Coherence::Replay {
                window: mmu_integration::kvm::SHADOW_HOST_WINDOW,
            }
        } else {
            mmu_backends::shadow::Coherence::Direct
        }
    );
    drop(mmu);
    // Dropping the MMU removed the arena's slot.
    assert_eq!(kvm_has_room_at(&vm, 1, pool_hpa.raw()), Ok(()));
}

/// Shadow hosting with every guest memslot mirrored into a KVM memslot.
#[cfg(feature = "shadow")]
fn mirrored() -> mmu_integration::host::HostOptions {
    mmu_integration::host::HostOptions {
        shadow_backing: mmu_integration::host::ShadowBacking::Mirror,
        ..Default::default()
    }
}

/// Under shadow, switching dirty logging on for a slot added without it
/// must also switch it on for KVM's mirror of the slot: the harvest reads
/// KVM's log too, and KVM answers ENOENT for a region that does not log.
#[cfg(feature = "shadow")]
#[test]
fn shadow_dirty_logging_switched_on_later_reaches_kvm() {
    if !kvm_or_skip("shadow_dirty_logging_switched_on_later_reaches_kvm") {
        return;
    }
    let kvm = Kvm::new().unwrap();
    let vm = Arc::new(kvm.create_vm().unwrap());
    let mmu = KvmMmu::<MemslotError>::with_options(
        BackendKind::Shadow,
        &BackendConfig::default(),
        Arc::clone(&vm),
        mirrored(),
    )
    .unwrap();
    let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x4_0000)]).unwrap();
    let region = memory.find_region(GuestAddress(0)).unwrap();
    let glue = mmu.memslots();
    glue.add_region(RAM, region, MemslotFlags::empty()).unwrap();
    assert_eq!(
        glue.dirty_log(RAM).unwrap_err(),
        MemslotError::NotLogging(RAM)
    );
    glue.set_dirty_logging(RAM, true).unwrap();
    let log = glue.dirty_log(RAM).expect("KVM's mirror logs too");
    assert_eq!(log.count(), 0);
    // A write the VMM makes through the MMU is in the next harvest.
    let mut exits = mmu
        .create_vcpu(VcpuId(0), Arc::new(SingleThreaded))
        .unwrap();
    exits.write_guest(Gpa(0x2ff8), &[1; 16]).unwrap();
    let log = glue.dirty_log(RAM).unwrap();
    println!(
        "dirty pages after a VMM write: {:?}",
        log.iter_dirty().collect::<Vec<_>>()
    );
    assert_eq!(log.iter_dirty().collect::<Vec<_>>(), [2, 3]);
    // Off again: KVM's mirror stops logging, and the glue says so.
    glue.set_dirty_logging(RAM, false).unwrap();
    assert_eq!(
        glue.dirty_log(RAM).unwrap_err(),
        MemslotError::NotLogging(RAM)
    );
    // The mirror region really stopped logging: KVM's own answer.
    let mirror = mmu_integration::ports::RegionMirror::<VmFd>::region(
        &mmu.backend().memslots()[0],
        0x4_0000,
    );
    let err = mmu_integration::ports::RegionPort::dirty_log(&*vm, &mirror).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOENT), "{err}");
}

/// A hypervisor refusal keeps its errno with the typed glue.
#[cfg(feature = "shadow")]
#[test]
fn shadow_mirror_refusals_keep_the_errno() {
    if !kvm_or_skip("shadow_mirror_refusals_keep_the_errno") {
        return;
    }
    let kvm = Kvm::new().unwrap();
    let vm = Arc::new(kvm.create_vm().unwrap());
    let mmu = KvmMmu::<mmu_integration::SlotError>::with_options(
        BackendKind::Shadow,
        &BackendConfig::default(),
        Arc::clone(&vm),
        mirrored(),
    )
    .unwrap();
    let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
    let region = memory.find_region(GuestAddress(0)).unwrap();
    // A slot number beyond KVM_USER_MEM_SLOTS: the mirror's
    // KVM_SET_USER_MEMORY_REGION fails with EINVAL.
    let err = mmu
        .memslots()
        .add_region(SlotId(40_000), region, MemslotFlags::empty())
        .unwrap_err();
    println!("refusal: {err} (errno {:?})", err.raw_os_error());
    assert!(
        matches!(err, mmu_integration::SlotError::Hypervisor { .. }),
        "{err:?}"
    );
    assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
    assert!(mmu.memslots().ids().is_empty());
    assert!(mmu.backend().memslots().is_empty());
}

/// On KVM (per-slot logging) the glue's VM-wide switch turns every slot
/// recorded as logged off and on again, each with a clean log.
#[test]
fn vm_wide_switch_on_a_per_slot_host() {
    if !kvm_or_skip("vm_wide_switch_on_a_per_slot_host") {
        return;
    }
    let mut f = Fixture::new();
    let glue = f.mmu.memslots();
    assert_eq!(
        glue.dirty_log_mode(),
        mmu_integration::ports::DirtyLogMode::PerSlot
    );
    glue.stop_dirty_log().unwrap();
    for slot in [RAM, SCRATCH] {
        assert_eq!(
            glue.dirty_log(slot).unwrap_err(),
            MemslotError::NotLogging(slot)
        );
    }
    // The guest writes the scratch region while logging is off.
    let mut a = Asm::default();
    a.mov_ax((SCRATCH_GPA >> 4) as u16)
        .mov_es_ax()
        .mov_ax(0x1111)
        .store_ax(0x1000)
        .hlt();
    f.run(&a.code());
    f.mmu.memslots().start_dirty_log().unwrap();
    assert!(f.mmu.memslots().is_logging());
    assert_eq!(f.mmu.memslots().dirty_log(SCRATCH).unwrap().count(), 0);
    // And again with logging on: only that page.
    let mut a = Asm::default();
    a.mov_ax((SCRATCH_GPA >> 4) as u16)
        .mov_es_ax()
        .mov_ax(0x2222)
        .store_ax(0x4000)
        .hlt();
    f.run(&a.code());
    let log = f.mmu.memslots().dirty_log(SCRATCH).unwrap();
    println!(
        "scratch pages dirty after the restart: {:?}",
        log.iter_dirty().collect::<Vec<_>>()
    );
    assert_eq!(log.iter_dirty().collect::<Vec<_>>(), [4]);
    // The ROM was never logged and is not switched.
    assert_eq!(
        f.mmu.memslots().dirty_log(ROM).unwrap_err(),
        MemslotError::NotLogging(ROM)
    );
}
