//! Guests on real KVM. Each test skips (and passes) where /dev/kvm cannot
//! be opened, and fails there instead when `MMU_REQUIRE_KVM=1`.

mod common;
use common::kvm_or_skip;
#[path = "common/progress.rs"]
mod progress;
use progress::Progress;

use std::time::Duration;

use mmu_vmm::kit::abi::tag;
use mmu_vmm::kit::workloads::{self, TouchKind};
use mmu_vmm::{
    DefaultHandler, PagingOps, RunError, VcpuArgs, VcpuError, VcpuOutcome, Vm, VmConfig,
};

/// Hang protection only: no test asserts on time.
const LIMIT: Duration = Duration::from_secs(30);

fn vm(vcpus: usize, ops: PagingOps) -> Vm {
    Vm::new(VmConfig {
        vcpus,
        mem_size: 32 << 20,
        paging_ops: ops,
        ..VmConfig::default()
    })
    .expect("VM creation")
}

fn vcpu_error(result: Result<mmu_vmm::RunReport, RunError>) -> VcpuError {
    match result {
        Err(RunError::Vcpu { source, .. }) => source,
        other => panic!("expected a vCPU error, got {other:?}"),
    }
}

#[test]
fn touch_on_two_vcpus_reports_checksums() {
    if !kvm_or_skip("touch_on_two_vcpus_reports_checksums") {
        return;
    }
    let mut vm = vm(2, PagingOps::Native);
    let pages = 256;
    let seed = 0x5eed_0000_u64;
    let write = workloads::touch(TouchKind::Write).unwrap();
    let args: Vec<VcpuArgs> = (0..2)
        .map(|i| {
            VcpuArgs([
                vm.layout().data_slice(i, 2).start,
                pages,
                2,
                seed + i as u64,
                0,
                0,
            ])
        })
        .collect();
    let report = vm.run(&write, &args, LIMIT).expect("touch-write run");
    assert_eq!(report.vcpus.len(), 2);
    for (i, vcpu) in report.vcpus.iter().enumerate() {
        let [base, pages, passes, seed, ..] = args[i].0;
        assert_eq!(vcpu.outcome, VcpuOutcome::Done { exit_code: 0 });
        let expected =
            workloads::touch_checksum(TouchKind::Write, base, pages, passes, seed, |_| 0);
        assert_eq!(vcpu.last(tag::CHECKSUM), Some(expected), "vCPU {i}");
        // The host sees what the guest wrote.
        for p in [0, pages - 1] {
            let addr = base + p * 4096;
            assert_eq!(vm.read_u64(addr).unwrap(), addr ^ seed);
        }
    }

    // Now read back from CPL3 what the host wrote.
    let read = workloads::touch(TouchKind::Read).unwrap();
    for (i, arg) in args.iter().enumerate() {
        let base = arg.0[0];
        for p in 0..pages {
            vm.write_u64(base + p * 4096, (p + 1) * 0x1_0001 + i as u64)
                .unwrap();
        }
    }
    let report = vm.run(&read, &args, LIMIT).expect("touch-read run");
    for (i, vcpu) in report.vcpus.iter().enumerate() {
        let [base, pages, passes, seed, ..] = args[i].0;
        let expected = workloads::touch_checksum(TouchKind::Read, base, pages, passes, seed, |a| {
            vm.read_u64(a).unwrap()
        });
        assert_eq!(vcpu.last(tag::CHECKSUM), Some(expected), "vCPU {i}");
    }
}

#[test]
fn page_fault_reaches_the_vmm_with_error_code_and_cr2() {
    if !kvm_or_skip("page_fault_reaches_the_vmm_with_error_code_and_cr2") {
        return;
    }
    let mut vm = vm(1, PagingOps::Native);
    // Beyond the end of guest memory: nothing maps it.
    let unmapped = vm.layout().mem_size() + 0x1238;
    let program = workloads::access(workloads::AccessOp::Write).unwrap();
    let err = vcpu_error(vm.run(&program, &[VcpuArgs([unmapped, 1, 0, 0, 0, 0])], LIMIT));
    let VcpuError::GuestException(e) = err else {
        panic!("expected a guest exception, got {err:?}");
    };
    assert_eq!(e.vector, 14);
    // Not present, write, user.
    assert_eq!(e.error_code, 0b110);
    assert_eq!(e.cr2, unmapped);
    assert_eq!(e.cpl(), 3);
    assert_eq!(e.rip, program.entry());

    // A user read of a supervisor page: a protection violation.
    let kernel_page = vm.layout().kernel_page(0);
    let program = workloads::access(workloads::AccessOp::Read).unwrap();
    let err = vcpu_error(vm.run(&program, &[VcpuArgs([kernel_page, 0, 0, 0, 0, 0])], LIMIT));
    let VcpuError::GuestException(e) = err else {
        panic!("expected a guest exception, got {err:?}");
    };
    assert_eq!((e.vector, e.error_code, e.cr2), (14, 0b101, kernel_page));

    // A user fetch from an NX data page: present, user, instruction fetch.
    let data = vm.layout().data().start;
    let program = workloads::access(workloads::AccessOp::Fetch).unwrap();
    let err = vcpu_error(vm.run(&program, &[VcpuArgs([data, 0, 0, 0, 0, 0])], LIMIT));
    let VcpuError::GuestException(e) = err else {
        panic!("expected a guest exception, got {err:?}");
    };
    assert_eq!((e.vector, e.error_code, e.cr2), (14, 0b10101, data));
}

#[test]
fn triple_fault_is_a_typed_error() {
    if !kvm_or_skip("triple_fault_is_a_typed_error") {
        return;
    }
    let mut vm = vm(1, PagingOps::Native);
    let program = workloads::triple_fault().unwrap();
    let err = vcpu_error(vm.run(&program, &[VcpuArgs::default()], LIMIT));
    assert!(matches!(err, VcpuError::TripleFault { .. }), "{err:?}");
}

#[test]
fn spinning_guest_hits_the_time_limit() {
    if !kvm_or_skip("spinning_guest_hits_the_time_limit") {
        return;
    }
    let mut vm = vm(2, PagingOps::Native);
    let program = workloads::spin().unwrap();
    let limit = Duration::from_secs(1);
    let result = vm.run(&program, &[VcpuArgs::default(); 2], limit);
    let err = vcpu_error(result);
    assert!(
        matches!(err, VcpuError::Timeout { limit: l } if l == limit),
        "{err:?}"
    );
    // The VM is still usable afterwards.
    let touch = workloads::touch(TouchKind::Write).unwrap();
    let base = vm.layout().data().start;
    let report = vm
        .run(&touch, &[VcpuArgs([base, 4, 1, 0, 0, 0])], LIMIT)
        .expect("run after a timeout");
    assert_eq!(report.vcpus[0].outcome, VcpuOutcome::Done { exit_code: 0 });
}

#[test]
fn unknown_port_is_a_typed_error() {
    if !kvm_or_skip("unknown_port_is_a_typed_error") {
        return;
    }
    let mut vm = vm(1, PagingOps::Native);
    let program = workloads::port_out().unwrap();
    let err = vcpu_error(vm.run(&program, &[VcpuArgs([0x3f8, 0, 0, 0, 0, 0])], LIMIT));
    match err {
        VcpuError::UnknownPort {
            port,
            direction,
            size,
            ..
        } => {
            assert_eq!(port, 0x3f8);
            assert_eq!(direction, mmu_vmm::IoDirection::Write);
            assert_eq!(size, 1);
        }
        other => panic!("expected an unknown port, got {other:?}"),
    }
}

#[test]
fn kick_from_another_thread_stops_a_busy_loop() {
    if !kvm_or_skip("kick_from_another_thread_stops_a_busy_loop") {
        return;
    }
    let mut vm = vm(2, PagingOps::Native);
    let program = workloads::spin().unwrap();
    let kickers: Vec<_> = (0..2).map(|i| vm.kicker(i).unwrap()).collect();
    let progress = Progress::new(2);
    let handlers = (0..2)
        .map(|i| progress.observe(i, DefaultHandler))
        .collect();
    let (report, kickers) = std::thread::scope(|s| {
        let stopper = s.spawn(|| {
            // Both vCPUs entered the guest, where `spin` never exits by
            // itself.
            progress.wait_for("entry into the guest", LIMIT, |c| {
                c.finished || c.entries.iter().all(|&n| n >= 1)
            });
            // A plain kick first: the vCPU leaves guest mode and
            // re-enters (its second entry).
            kickers[0].kick();
            progress.wait_for("re-entry after the kick", LIMIT, |c| {
                c.finished || c.entries[0] >= 2
            });
            for k in &kickers {
                k.stop();
            }
            kickers
        });
        let report = vm.run_with(&program, &[VcpuArgs::default(); 2], LIMIT, handlers);
        progress.finish();
        (report, stopper.join().unwrap())
    });
    let report = report.expect("a stopped run is not an error");
    assert!(progress.snapshot().entries[0] >= 2);
    for vcpu in &report.vcpus {
        assert_eq!(vcpu.outcome, VcpuOutcome::Stopped);
        assert!(vcpu.stats.interrupted >= 1);
    }
    assert!(kickers[0].kicks_sent() >= 2);
}

#[test]
fn paging_calls_work_native_and_paravirt() {
    if !kvm_or_skip("paging_calls_work_native_and_paravirt") {
        return;
    }
    for ops in [PagingOps::Native, PagingOps::Paravirt] {
        let mut vm = vm(1, ops);
        let data = vm.layout().data().start;
        vm.write_u64(data, 0xfeed).unwrap();
        let program = workloads::paging_calls().unwrap();
        let report = vm
            .run(&program, &[VcpuArgs([data, 0, 0, 0, 0, 0])], LIMIT)
            .unwrap_or_else(|e| panic!("{ops:?}: {e:?}"));
        let vcpu = &report.vcpus[0];
        assert_eq!(vcpu.last(tag::VALUE), Some(vm.root()), "{ops:?}");
        assert_eq!(vcpu.last(tag::CHECKSUM), Some(0xfeed), "{ops:?}");
        let expected_ops = match ops {
            PagingOps::Native => 0,
            PagingOps::Paravirt => 3,
        };
        assert_eq!(vcpu.stats.paging_ops, expected_ops, "{ops:?}");
    }
}

#[test]
fn cpl0_table_edit_and_invlpg_reach_cpl3() {
    if !kvm_or_skip("cpl0_table_edit_and_invlpg_reach_cpl3") {
        return;
    }
    for ops in [PagingOps::Native, PagingOps::Paravirt] {
        let mut vm = vm(1, ops);
        let target = vm.layout().data().start + 0x5000;
        vm.write_u64(target, 0xabcd).unwrap();
        let pte = vm.leaf_entry_gpa(target).expect("target is mapped");
        let old = vm.read_u64(pte).unwrap();
        let remap = workloads::remap().unwrap();

        // Rewriting the entry with its own value: the read goes through.
        let report = vm
            .run(&remap, &[VcpuArgs([pte, old, target, 0, 0, 0])], LIMIT)
            .unwrap_or_else(|e| panic!("{ops:?}: {e:?}"));
        assert_eq!(report.vcpus[0].last(tag::VALUE), Some(0xabcd));

        // Clearing it: the CPL3 read now faults, although KVM had the old
        // translation cached for CPL3.
        let err = vcpu_error(vm.run(&remap, &[VcpuArgs([pte, 0, target, 0, 0, 0])], LIMIT));
        let VcpuError::GuestException(e) = err else {
            panic!("{ops:?}: expected a #PF, got {err:?}");
        };
        assert_eq!(
            (e.vector, e.error_code, e.cr2),
            (14, 0b100, target),
            "{ops:?}"
        );
    }
}

/// A handler that edits one page-table entry through the replay queue, the
/// way a VMM-side shadow MMU on a shadowing host must.
struct ReplayHandler {
    target: u64,
    pte: u64,
    /// The entry value to queue when the guest invalidates `target`.
    on_invlpg: Option<u64>,
    /// The entry value to queue when the guest faults on `target`.
    on_fault: Option<u64>,
    /// Instead of retrying after a fault, skip the faulting instruction.
    skip_faulting: bool,
    faults: u32,
}

impl mmu_vmm::ExitHandler for ReplayHandler {
    fn paging_op(
        &mut self,
        vcpu: &mut mmu_vmm::VcpuContext<'_>,
        op: mmu_vmm::PagingOp,
    ) -> Result<u32, VcpuError> {
        use mmu_vmm::kit::abi::action;
        if let (mmu_vmm::PagingOp::Invlpg(va), Some(value)) = (op, self.on_invlpg)
            && va == self.target
        {
            vcpu.queue_replay(&[(self.pte, value)])?;
            return Ok(action::REPLAY | action::NATIVE);
        }
        Ok(action::NATIVE)
    }

    fn exception(
        &mut self,
        vcpu: &mut mmu_vmm::VcpuContext<'_>,
        e: &mmu_vmm::GuestException,
    ) -> Result<mmu_vmm::ExceptionAction, VcpuError> {
        use mmu_vmm::kit::abi::action;
        if e.vector != 14 || e.cr2 != self.target || self.faults > 0 {
            return Ok(mmu_vmm::ExceptionAction::Fail);
        }
        self.faults += 1;
        if self.skip_faulting {
            let mut bytes = [0u8; 15];
            for (i, b) in bytes.iter_mut().enumerate() {
                *b = vcpu.memory_byte(e.rip + i as u64)?;
            }
            let len = iced_x86::Decoder::with_ip(64, &bytes, e.rip, 0)
                .decode()
                .len();
            return Ok(mmu_vmm::ExceptionAction::Redirect {
                rip: e.rip + len as u64,
                actions: 0,
            });
        }
        let Some(value) = self.on_fault else {
            return Ok(mmu_vmm::ExceptionAction::Fail);
        };
        vcpu.queue_replay(&[(self.pte, value)])?;
        Ok(mmu_vmm::ExceptionAction::Resume(
            action::REPLAY | action::NATIVE,
        ))
    }
}

#[test]
fn replay_queue_edits_reach_cpl3() {
    if !kvm_or_skip("replay_queue_edits_reach_cpl3") {
        return;
    }
    let mut vm = vm(1, PagingOps::Paravirt);
    let target = vm.layout().data().start + 0x9000;
    vm.write_u64(target, 0x600d).unwrap();
    let pte = vm.leaf_entry_gpa(target).unwrap();
    let present = vm.read_u64(pte).unwrap();

    // 1. The VMM unmaps the page through the queue when the guest
    //    invalidates it: the CPL3 read after it faults.
    let calls = workloads::paging_calls().unwrap();
    let handler = ReplayHandler {
        target,
        pte,
        on_invlpg: Some(0),
        on_fault: None,
        skip_faulting: false,
        faults: 0,
    };
    let err = vcpu_error(vm.run_with(
        &calls,
        &[VcpuArgs([target, 0, 0, 0, 0, 0])],
        LIMIT,
        vec![handler],
    ));
    let VcpuError::GuestException(e) = err else {
        panic!("expected a #PF, got {err:?}");
    };
    assert_eq!((e.vector, e.cr2), (14, target));
    assert_eq!(
        vm.read_u64(pte).unwrap(),
        0,
        "the kernel replayed the store"
    );

    // 2. The VMM maps it back from the fault handler and the guest retries
    //    the faulting read: a shadow-MMU style fault fix-up.
    let read = workloads::access(workloads::AccessOp::Read).unwrap();
    let handler = ReplayHandler {
        target,
        pte,
        on_invlpg: None,
        on_fault: Some(present),
        skip_faulting: false,
        faults: 0,
    };
    let report = vm
        .run_with(
            &read,
            &[VcpuArgs([target, 0, 0, 0, 0, 0])],
            LIMIT,
            vec![handler],
        )
        .expect("the fault is fixed up");
    assert_eq!(report.vcpus[0].last(tag::VALUE), Some(0x600d));
    assert_eq!(report.vcpus[0].stats.exceptions, 1);
}

#[test]
fn exception_redirect_skips_the_faulting_instruction() {
    if !kvm_or_skip("exception_redirect_skips_the_faulting_instruction") {
        return;
    }
    let mut vm = vm(1, PagingOps::Native);
    let target = vm.layout().mem_size() + 0x4000;
    let read = workloads::access(workloads::AccessOp::Read).unwrap();
    let handler = ReplayHandler {
        target,
        pte: 0,
        on_invlpg: None,
        on_fault: None,
        skip_faulting: true,
        faults: 0,
    };
    let report = vm
        .run_with(
            &read,
            &[VcpuArgs([target, 0, 0, 0, 0, 0])],
            LIMIT,
            vec![handler],
        )
        .expect("the faulting load is skipped");
    // The load never happened: RDI still holds the address it reports.
    assert_eq!(report.vcpus[0].last(tag::VALUE), Some(target));
}

#[test]
fn conformance_short_run_has_no_mismatches() {
    if !kvm_or_skip("conformance_short_run_has_no_mismatches") {
        return;
    }
    let options = mmu_vmm::conformance::Options {
        cases: 3000,
        seed: 7,
        levels: vec![4, 5],
    };
    let summary = mmu_vmm::conformance::run(&options).expect("conformance run");
    for m in &summary.mismatches {
        eprintln!("mismatch: {m}");
    }
    assert_eq!(summary.cases, 3000);
    assert!(summary.faults > 0 && summary.faults < summary.cases);
    assert!(summary.mismatches.is_empty());
}

#[test]
fn teardown_closes_every_file_descriptor() {
    if !kvm_or_skip("teardown_closes_every_file_descriptor") {
        return;
    }
    let open_fds = || {
        std::fs::read_dir("/proc/self/fd")
            .map(|d| d.count())
            .unwrap_or(0)
    };
    // Warm up lazily opened process-wide descriptors first.
    drop(vm(1, PagingOps::Native));
    let before = open_fds();
    for _ in 0..10 {
        let mut vm = vm(2, PagingOps::Paravirt);
        let touch = workloads::touch(TouchKind::Write).unwrap();
        let base = vm.layout().data().start;
        vm.run(&touch, &[VcpuArgs([base, 8, 1, 0, 0, 0]); 2], LIMIT)
            .expect("touch run");
    }
    // Other tests run in parallel threads and may hold a few descriptors
    // of their own for a moment; a leak of ours (the KVM handle, the VM, 2
    // vCPUs: 4 per iteration) would show as 40.
    let after = open_fds();
    assert!(
        after < before + 20,
        "file descriptors leaked: {before} -> {after}"
    );
}

/// Re-asserts one entry through the replay queue when the guest
/// invalidates `target`, or does nothing (the `reassert: false` run).
struct ReassertHandler {
    target: u64,
    pte: u64,
    reassert: bool,
}

impl mmu_vmm::ExitHandler for ReassertHandler {
    fn paging_op(
        &mut self,
        vcpu: &mut mmu_vmm::VcpuContext<'_>,
        op: mmu_vmm::PagingOp,
    ) -> Result<u32, VcpuError> {
        use mmu_vmm::kit::abi::{REASSERT, action};
        if self.reassert
            && let mmu_vmm::PagingOp::Invlpg(va) = op
            && va == self.target
        {
            let value = vcpu.read_u64(self.pte)?;
            vcpu.queue_replay(&[(self.pte | REASSERT, value)])?;
            return Ok(action::REPLAY | action::NATIVE);
        }
        Ok(action::NATIVE)
    }
}

/// The coherence fact the shadow backend's hosting rests on: once CPL3 code
/// has used a page-table entry, a change the VMM writes into guest memory
/// is not seen by CPL3 code on a host whose KVM shadows guest tables (PVM),
/// even after INVLPG; re-asserting the entry from guest CPL0 code (a
/// `lock cmpxchg` of its value with itself) makes KVM see it.
#[test]
fn host_written_entries_need_a_cpl0_reassertion() {
    if !kvm_or_skip("host_written_entries_need_a_cpl0_reassertion") {
        return;
    }
    for reassert in [false, true] {
        let mut vm = vm(1, PagingOps::Paravirt);
        let pvm = vm.cpu().pvm;
        let target = vm.layout().data().start + 0xa000;
        vm.write_u64(target, 0x5eed).unwrap();
        let pte = vm.leaf_entry_gpa(target).unwrap();
        // CPL3 reads the page: KVM builds its shadow of the entry.
        let read = workloads::access(workloads::AccessOp::Read).unwrap();
        let report = vm
            .run(&read, &[VcpuArgs([target, 0, 0, 0, 0, 0])], LIMIT)
            .unwrap();
        assert_eq!(report.vcpus[0].last(tag::VALUE), Some(0x5eed));
        // The VMM unmaps the page by writing guest memory from the host.
        vm.write_u64(pte, 0).unwrap();
        let calls = workloads::paging_calls().unwrap();
        let handler = ReassertHandler {
            target,
            pte,
            reassert,
        };
        let result = vm.run_with(
            &calls,
            &[VcpuArgs([target, 0, 0, 0, 0, 0])],
            LIMIT,
            vec![handler],
        );
        if reassert {
            let VcpuError::GuestException(e) = vcpu_error(result) else {
                panic!("the re-asserted, now unmapped page must fault");
            };
            assert_eq!((e.vector, e.cr2), (14, target));
            assert_eq!(
                vm.read_u64(pte).unwrap(),
                0,
                "a re-assertion changes nothing"
            );
        } else if pvm {
            let report = result.expect("the stale mapping still works on PVM");
            assert_eq!(report.vcpus[0].last(tag::CHECKSUM), Some(0x5eed));
        }
    }
}
