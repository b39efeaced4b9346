//! Guests whose memory and exits go through an MMU backend (`MmuVm`,
//! `mmu-vmm run`), and MMU actions applied to kit guests. Each test skips
//! (and passes) where /dev/kvm cannot be opened, and fails there instead
//! when `MMU_REQUIRE_KVM=1`.

mod common;
use common::kvm_or_skip;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use mmu_api::{Gpa, Gva, MemslotFlags, PfErrorCode};
use mmu_backends::{BackendConfig, BackendKind};
use mmu_integration::kvm::{PageFaultDelivery, apply_action, enable_exception_payload};
use mmu_integration::{Action, BusError};
use mmu_vmm::kit::abi::tag;
use mmu_vmm::kit::workloads::{self, AccessOp};
use mmu_vmm::mmu::{DATA_SLOT, Devices, MmuVm, MmuVmConfig};
use mmu_vmm::run::{RunOptions, Workload};
use mmu_vmm::{
    ExceptionAction, ExitHandler, GuestException, PagingOps, Report, VcpuArgs, VcpuContext,
    VcpuError, Vm, VmConfig,
};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// Hang protection only: no test asserts on time.
const LIMIT: Duration = Duration::from_secs(30);

fn ept_vm(vcpus: usize, log_dirty_data: bool) -> MmuVmConfig {
    MmuVmConfig {
        kind: BackendKind::Ept,
        backend: BackendConfig::default(),
        vm: VmConfig {
            vcpus,
            mem_size: 16 << 20,
            ..VmConfig::default()
        },
        log_dirty_data,
        coherence: mmu_integration::kvm::HostCoherence::Detect,
    }
}

#[test]
fn run_touch_under_ept_checks_out() {
    if !kvm_or_skip("run_touch_under_ept_checks_out") {
        return;
    }
    let summary = mmu_vmm::run::run(RunOptions {
        mmu: BackendKind::Ept,
        workload: Workload::Touch,
        vcpus: 2,
        mem_size: 16 << 20,
        params: mmu_vmm::workload::Params {
            passes: Some(2),
            ..Default::default()
        },
        ..RunOptions::default()
    })
    .expect("run");
    assert!(summary.ok(), "{}", summary.text());
    // The data slot and the system slot, through the KVM port.
    assert_eq!(summary.backend.get("memslot_updates"), Some(2));
    let json = summary.json();
    assert!(json.contains("\"mmu\": \"ept\""), "{json}");
    assert!(json.contains("\"ok\": true"), "{json}");
}

/// The data area as a device: reads answer `0xd0d0_0000 | offset`, writes
/// are recorded.
/// Writes a device received: address and bytes.
type Writes = Arc<Mutex<Vec<(u64, Vec<u8>)>>>;

#[derive(Clone)]
struct DataDevice {
    base: u64,
    writes: Writes,
}

impl Devices for DataDevice {
    fn mmio_read(&mut self, gpa: Gpa, data: &mut [u8]) -> Result<(), BusError> {
        if gpa.raw() < self.base {
            return Err(BusError::NoDevice(gpa));
        }
        let value = 0xd0d0_0000u64 | (gpa.raw() - self.base);
        let bytes = value.to_le_bytes();
        data.copy_from_slice(&bytes[..data.len()]);
        Ok(())
    }

    fn mmio_write(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), BusError> {
        self.writes.lock().unwrap().push((gpa.raw(), data.to_vec()));
        Ok(())
    }
}

#[test]
fn deleted_memory_becomes_mmio_through_the_backend() {
    if !kvm_or_skip("deleted_memory_becomes_mmio_through_the_backend") {
        return;
    }
    let config = ept_vm(1, true);
    let data = mmu_vmm::layout::Layout::new(1, config.vm.mem_size, config.vm.paging_levels)
        .unwrap()
        .data()
        .start;
    let device = DataDevice {
        base: data,
        writes: Arc::default(),
    };
    let mut vm = MmuVm::with_devices(config, |_| Box::new(device.clone())).unwrap();
    assert_eq!(vm.vm().layout().data().start, data);
    let read = workloads::access(AccessOp::Read).unwrap();
    let write = workloads::access(AccessOp::Write).unwrap();
    let at = data + 0x3010;

    // Memory first: the guest reads what the host put there.
    vm.vm().write_u64(at, 0x1111).unwrap();
    let report = vm
        .run(&read, &[VcpuArgs([at, 0, 0, 0, 0, 0])], LIMIT)
        .unwrap();
    assert_eq!(report.vcpus[0].last(tag::VALUE), Some(0x1111));
    assert_eq!(vm.exit_stats()[0].mmio_exits, 0);

    // The data slot deleted: the same load and a store exit as MMIO, are
    // classified by the backend, and reach the device.
    let old = vm.memslots().delete(DATA_SLOT).unwrap();
    let report = vm
        .run(&read, &[VcpuArgs([at, 0, 0, 0, 0, 0])], LIMIT)
        .unwrap();
    assert_eq!(report.vcpus[0].last(tag::VALUE), Some(0xd0d0_3010));
    assert!(report.vcpus[0].stats.routed >= 1);
    vm.run(&write, &[VcpuArgs([at, 0x77, 0, 0, 0, 0])], LIMIT)
        .unwrap();
    assert_eq!(
        *device.writes.lock().unwrap(),
        [(at, 0x77u64.to_le_bytes().to_vec())]
    );
    let stats = vm.exit_stats()[0];
    assert_eq!((stats.device_reads, stats.device_writes), (1, 1));
    assert_eq!(vm.backend().stats().get("mmio_cache_hits"), Some(1));

    // Re-added: memory again, with what it held before.
    let region = vm
        .vm()
        .memory()
        .iter()
        .find(|r| r.start_addr().0 == old.guest_base.raw())
        .unwrap();
    vm.memslots()
        .add_region(DATA_SLOT, region, MemslotFlags::LOG_DIRTY)
        .unwrap();
    let report = vm
        .run(&read, &[VcpuArgs([at, 0, 0, 0, 0, 0])], LIMIT)
        .unwrap();
    assert_eq!(report.vcpus[0].last(tag::VALUE), Some(0x1111));
    assert_eq!(vm.exit_stats()[0].mmio_exits, 2);
}

#[test]
fn guest_page_faults_go_to_the_backend() {
    if !kvm_or_skip("guest_page_faults_go_to_the_backend") {
        return;
    }
    let mut vm = MmuVm::new(ept_vm(1, false)).unwrap();
    let unmapped = vm.vm().layout().mem_size() + 0x2468;
    let write = workloads::access(AccessOp::Write).unwrap();
    let err = vm
        .run(&write, &[VcpuArgs([unmapped, 1, 0, 0, 0, 0])], LIMIT)
        .unwrap_err();
    let Some(VcpuError::GuestException(e)) = err.vcpu_error() else {
        panic!("expected a guest exception, got {err:?}");
    };
    // The EPT backend gave the fault back to the guest, whose kernel has
    // no handler of its own: the run ends on it.
    assert_eq!((e.vector, e.error_code, e.cr2), (14, 0b110, unmapped));
    assert_eq!(vm.exit_stats()[0].page_faults, 1);
    assert_eq!(vm.exit_stats()[0].faults_for_guest, 1);
    assert_eq!(vm.backend().stats().get("page_faults_reflected"), Some(1));
}

#[test]
fn paravirtual_paging_calls_reach_the_backend() {
    if !kvm_or_skip("paravirtual_paging_calls_reach_the_backend") {
        return;
    }
    let mut config = ept_vm(1, false);
    config.vm.paging_ops = PagingOps::Paravirt;
    let mut vm = MmuVm::new(config).unwrap();
    let data = vm.vm().layout().data().start;
    vm.vm().write_u64(data, 0xfeed).unwrap();
    let flushes_before = vm.backend().stats().get("tlb_flushes").unwrap();
    let program = workloads::paging_calls().unwrap();
    let report = vm
        .run(&program, &[VcpuArgs([data, 0, 0, 0, 0, 0])], LIMIT)
        .unwrap();
    let vcpu = &report.vcpus[0];
    assert_eq!(vcpu.last(tag::VALUE), Some(vm.vm().root()));
    assert_eq!(vcpu.last(tag::CHECKSUM), Some(0xfeed));
    assert_eq!(vcpu.stats.paging_ops, 3);
    // LOAD_CR3 (a CR3 load) and FLUSH_TLB each flushed the backend's
    // software TLB; its context has the CR3 the guest loaded, at CPL0.
    let flushes = vm.backend().stats().get("tlb_flushes").unwrap();
    assert_eq!(flushes - flushes_before, 2);
    let handler = vm.handler(0).unwrap();
    let ctx = *handler.exits().mmu().paging_context();
    assert_eq!(ctx.cr3, vm.vm().root());
    assert_eq!(ctx.cpl, 0);
    assert_eq!(ctx.mode(), mmu_api::PagingMode::Level4);
}

#[test]
fn shadow_vm_needs_paravirtual_paging() {
    if !kvm_or_skip("shadow_vm_needs_paravirtual_paging") {
        return;
    }
    let mut config = ept_vm(1, false);
    config.kind = BackendKind::Shadow;
    config.vm.paging_ops = PagingOps::Native;
    let err = MmuVm::new(config).unwrap_err();
    assert!(matches!(err, mmu_vmm::SetupError::Config(_)), "{err:?}");
}

/// Injects a #PF with `integration`'s action when the guest reports, and
/// records the exceptions the kit's stub then reports.
struct Injector {
    cr2: u64,
    delivery: PageFaultDelivery,
    seen: Vec<GuestException>,
}

impl ExitHandler for Injector {
    fn report(&mut self, vcpu: &mut VcpuContext<'_>, _report: Report) -> Result<(), VcpuError> {
        let action = Action::InjectPageFault {
            error_code: PfErrorCode::PRESENT | PfErrorCode::WRITE,
            cr2: Gva(self.cr2),
        };
        apply_action(vcpu.fd(), action, self.delivery)?;
        Ok(())
    }

    fn exception(
        &mut self,
        _vcpu: &mut VcpuContext<'_>,
        exception: &GuestException,
    ) -> Result<ExceptionAction, VcpuError> {
        self.seen.push(*exception);
        Ok(ExceptionAction::Resume(0))
    }
}

#[test]
fn injected_page_faults_reach_the_guest_kernel() {
    if !kvm_or_skip("injected_page_faults_reach_the_guest_kernel") {
        return;
    }
    let mut vm = Vm::new(VmConfig {
        mem_size: 16 << 20,
        ..VmConfig::default()
    })
    .unwrap();
    let payload = enable_exception_payload(vm.vm_fd()).unwrap();
    let read = workloads::access(AccessOp::Read).unwrap();
    let data = vm.layout().data().start;
    vm.write_u64(data, 42).unwrap();
    for (delivery, cr2) in [
        (PageFaultDelivery::SetCr2, 0xdead_b000u64),
        (payload, 0xfeed_f000u64),
    ] {
        let injector = Injector {
            cr2,
            delivery,
            seen: Vec::new(),
        };
        let mut handlers = [injector];
        let report = vm
            .run_with(
                &read,
                &[VcpuArgs([data, 0, 0, 0, 0, 0])],
                LIMIT,
                handlers.iter_mut().collect(),
            )
            .unwrap();
        // The program still finished and reported what it read.
        assert_eq!(report.vcpus[0].last(tag::VALUE), Some(42));
        let seen = &handlers[0].seen;
        assert_eq!(seen.len(), 1, "{delivery:?}: {seen:?}");
        let e = seen[0];
        assert_eq!(
            (e.vector, e.error_code, e.cr2, e.cpl()),
            (14, 0b11, cr2, 0),
            "{delivery:?}"
        );
    }
}

#[test]
fn faults_are_delivered_to_the_program() {
    use iced_x86::code_asm::*;
    use mmu_vmm::kit::abi::{FAULTED, syscall};
    use mmu_vmm::kit::{FaultRecord, Program, Ring, emit};
    if !kvm_or_skip("faults_are_delivered_to_the_program") {
        return;
    }
    let mut config = ept_vm(1, false);
    config.vm.paging_ops = PagingOps::Paravirt;
    let mut vm = MmuVm::new(config).unwrap();
    let unmapped = vm.vm().layout().mem_size() + 0x2468;
    let code = mmu_vmm::layout::PROGRAM_CODE_GPA + 0x10;
    // A not-present read and a write to read-only code at CPL3, each
    // resumed at the next handler; a CPL0 read of the unmapped address
    // (LOAD), which returns FAULTED.
    let program = Program::assemble("deliver", Ring::User, |a| {
        let mut h1 = a.create_label();
        let mut h2 = a.create_label();
        a.mov(r12, rdi)?;
        a.mov(r13, rsi)?;
        a.lea(rdi, ptr(h1))?;
        emit::syscall(a, syscall::SET_FAULT_HANDLER)?;
        a.mov(rax, qword_ptr(r12))?;
        a.set_label(&mut h1)?;
        a.lea(rdi, ptr(h2))?;
        emit::syscall(a, syscall::SET_FAULT_HANDLER)?;
        a.mov(qword_ptr(r13), rax)?;
        a.set_label(&mut h2)?;
        a.mov(rdi, r12)?;
        emit::syscall(a, syscall::LOAD)?;
        a.mov(rdi, rax)?;
        emit::report_rdi(a, tag::VALUE)?;
        emit::exit(a, 0)
    })
    .unwrap();
    let report = vm
        .run(&program, &[VcpuArgs([unmapped, code, 0, 0, 0, 0])], LIMIT)
        .unwrap();
    assert_eq!(report.vcpus[0].last(tag::VALUE), Some(FAULTED));
    let log = vm.vm().fault_log(0).unwrap();
    let pf = |error_code, address| FaultRecord {
        vector: 14,
        error_code,
        cr2: address,
    };
    assert_eq!(
        log.entries,
        [pf(0b100, unmapped), pf(0b111, code), pf(0, unmapped)]
    );
    assert_eq!(log.count, 3);
    assert_eq!(vm.exit_stats()[0].faults_for_guest, 3);
    // A new run starts with an empty log and no handler.
    let read = workloads::access(AccessOp::Read).unwrap();
    assert!(
        vm.run(&read, &[VcpuArgs([unmapped, 0, 0, 0, 0, 0])], LIMIT)
            .is_err()
    );
    assert_eq!(vm.vm().fault_log(0).unwrap().count, 0);
}
