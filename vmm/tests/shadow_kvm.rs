//! The shadow backend hosted on KVM: remote flushes, root reloads and host
//! coherence, seen by guest CPL3 code. Each test skips (and passes) where
//! /dev/kvm cannot be opened, and fails there instead when
//! `MMU_REQUIRE_KVM=1`.

mod common;
use common::kvm_or_skip;
#[path = "common/progress.rs"]
mod progress;
use progress::Progress;

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use iced_x86::code_asm::*;
use mmu_api::{Gpa, MmuBackend};
use mmu_backends::{BackendConfig, BackendKind};
use mmu_integration::kvm::{HostCoherence, host_shadows_page_tables};
use mmu_vmm::kit::abi::tag;
use mmu_vmm::kit::{Ring, emit};
use mmu_vmm::mmu::{MmuVm, MmuVmConfig};
use mmu_vmm::{PagingOps, Program, VcpuArgs, VmConfig};

/// Hang protection only: no test asserts on time.
const LIMIT: Duration = Duration::from_secs(60);

/// Exits of the vCPUs (kicks, refaults, replays) the churn test waits for
/// between two memslot cycles, so the guest runs between them.
const CHURN_PROGRESS: u64 = 16;

fn shadow_vm(vcpus: usize, coherence: HostCoherence) -> MmuVm {
    shadow_vm_with(vcpus, coherence, BackendConfig::default())
}

/// [`shadow_vm`] with the backend's configuration given.
fn shadow_vm_with(vcpus: usize, coherence: HostCoherence, backend: BackendConfig) -> MmuVm {
    MmuVm::new(MmuVmConfig {
        kind: BackendKind::Shadow,
        backend,
        vm: VmConfig {
            vcpus,
            mem_size: 16 << 20,
            paging_ops: PagingOps::Paravirt,
            ..VmConfig::default()
        },
        log_dirty_data: false,
        coherence,
    })
    .expect("shadow VM")
}

/// `watch`: reads the quadword at RDI and reports it (tag CHECKSUM: the
/// vCPU now maps the page and has read it), then reads it in a loop until
/// the quadword at RSI is non-zero, then reads RDI once more and reports
/// that value (tag VALUE): the first read made after the host's call
/// returned.
fn watch() -> Program {
    Program::assemble("watch", Ring::User, |a| {
        let mut top = a.create_label();
        a.mov(r12, rdi)?;
        a.mov(r13, rsi)?;
        a.mov(rdi, qword_ptr(rdi))?;
        emit::report_rdi(a, tag::CHECKSUM)?;
        a.mov(rdi, r12)?;
        a.mov(rsi, r13)?;
        a.set_label(&mut top)?;
        a.mov(rax, qword_ptr(rdi))?;
        a.mov(rbx, qword_ptr(rsi))?;
        a.test(rbx, rbx)?;
        a.jz(top)?;
        a.mov(rdi, qword_ptr(rdi))?;
        emit::report_rdi(a, tag::VALUE)?;
        emit::exit(a, 0)
    })
    .expect("watch assembles")
}

/// Where the watched page's guest PTE is, what to write there to move it,
/// and guest memory, for the thread that changes the mapping.
struct Target {
    pte: u64,
    moved_pte: u64,
    memory: vm_memory::GuestMemoryMmap,
}

/// What the watcher read after `change` ran on another thread while it
/// looped: `change` gets the backend and the target, and must leave the
/// watched address reading 2 (it read 1 before).
fn watch_while(
    coherence: HostCoherence,
    change: impl FnOnce(&Arc<dyn MmuBackend>, &Target) + Send,
) -> (u64, mmu_api::MmuStats) {
    let mut vm = shadow_vm(2, coherence);
    let data = vm.vm().layout().data();
    let (old_page, new_page, stop) = (data.start, data.start + 0x1000, data.start + 0x2000);
    vm.vm().write_u64(old_page, 1).unwrap();
    vm.vm().write_u64(new_page, 2).unwrap();
    vm.vm().write_u64(stop, 0).unwrap();
    let pte = vm.vm().leaf_entry_gpa(old_page).expect("mapped");
    let old_pte = vm.vm().read_u64(pte).unwrap();
    let target = Target {
        pte,
        moved_pte: (old_pte & !0x000f_ffff_ffff_f000) | new_page,
        memory: vm.vm().memory().clone(),
    };
    let backend = Arc::clone(vm.backend());
    let program = watch();
    let memory = vm.vm().memory().clone();
    let progress = Progress::new(2);
    let report = {
        let (inner, handlers, _) = vm.parts();
        let handlers = handlers
            .iter_mut()
            .enumerate()
            .map(|(i, h)| progress.observe(i, h))
            .collect();
        thread::scope(|s| {
            let host = s.spawn(|| {
                // Both watchers have mapped the old page and read it, and
                // now spin on it.
                let counts = progress.wait_for("first read of both watchers", LIMIT, |c| {
                    c.finished || c.reports.iter().all(|r| !r.is_empty())
                });
                if !counts.finished {
                    change(&backend, &target);
                }
                vm_memory::Bytes::write_obj(&memory, 1u64, vm_memory::GuestAddress(stop)).unwrap();
                counts
            });
            let args = [
                VcpuArgs([old_page, stop, 0, 0, 0, 0]),
                VcpuArgs([old_page + 0x100, stop, 0, 0, 0, 0]),
            ];
            let report = inner.run_with(&program, &args, LIMIT, handlers);
            progress.finish();
            let counts = host.join().unwrap();
            assert!(
                !counts.finished,
                "a watcher ended before the change: {report:?}"
            );
            report
        })
        .expect("watch run")
    };
    assert_eq!(
        report.vcpus[0].reports[0],
        mmu_vmm::Report {
            tag: u64::from(tag::CHECKSUM),
            value: 1
        },
        "the watcher read the old page first"
    );
    let shadow = vm.shadow_backend().expect("shadow");
    shadow.audit().expect("audit after the run");
    let stats = vm.backend().stats();
    let value = report.vcpus[0].last(tag::VALUE).expect("watcher reported");
    (value, stats)
}

/// The host rewrites the guest's PTE (as a VMM restoring a snapshot
/// would) and tells the backend: the shadow pages derived from it are
/// zapped and every vCPU is kicked; once the call returns, CPL3 reads see
/// the new page.
fn remap_from_host(backend: &Arc<dyn MmuBackend>, t: &Target) {
    vm_memory::Bytes::write_obj(&t.memory, t.moved_pte, vm_memory::GuestAddress(t.pte)).unwrap();
    backend.note_host_write(Gpa(t.pte), 8);
}

#[test]
fn a_remote_change_reaches_cpl3_once_the_call_returns() {
    if !kvm_or_skip("a_remote_change_reaches_cpl3_once_the_call_returns") {
        return;
    }
    let (value, stats) = watch_while(HostCoherence::Detect, remap_from_host);
    assert_eq!(value, 2);
    if host_shadows_page_tables() {
        // The change reached KVM through the replay: the zapped shadow
        // page went as a frame, its parent entry as an entry.
        assert!(stats.get("replayed_frames").unwrap_or(0) > 0, "{stats}");
        assert!(stats.get("replayed_entries").unwrap_or(0) > 0, "{stats}");
    }
}

#[test]
fn a_zap_all_reloads_every_root_and_reaches_cpl3() {
    if !kvm_or_skip("a_zap_all_reloads_every_root_and_reaches_cpl3") {
        return;
    }
    let (value, stats) = watch_while(HostCoherence::Detect, |backend, t| {
        // The guest PTE changes without a word to the backend; only the
        // zap-all (fast: new roots for every vCPU) makes the MMU read it
        // again.
        vm_memory::Bytes::write_obj(&t.memory, t.moved_pte, vm_memory::GuestAddress(t.pte))
            .unwrap();
        backend.zap_all();
    });
    assert_eq!(value, 2);
    assert_eq!(stats.get("fast_zaps"), Some(1), "{stats}");
}

/// The coherence policy is what makes the first test pass on a host whose
/// KVM shadows page tables: without the replay, the watcher keeps reading
/// the old page through KVM's stale copy of the shadow entry.
#[test]
fn without_replay_cpl3_runs_on_stale_entries_here() {
    if !kvm_or_skip("without_replay_cpl3_runs_on_stale_entries_here") {
        return;
    }
    let (value, _) = watch_while(HostCoherence::Direct, remap_from_host);
    if host_shadows_page_tables() {
        assert_eq!(
            value, 1,
            "KVM saw a host write to the pool without a replay"
        );
    } else {
        assert_eq!(value, 2);
    }
}

/// Memslot churn on the shadow backend: two vCPUs write their
/// slices of the data area from CPL3, pass after pass, while the host
/// deletes and re-adds a memslot the guest does not use, and reclaims
/// obsolete pages as a VMM's background reclaimer would. Every delete is a
/// fast zap; the guest's results stay exact and the MMU passes its audit.
#[test]
fn memslot_churn_under_running_vcpus_fast_zaps_and_frees_obsolete_pages() {
    if !kvm_or_skip("memslot_churn_under_running_vcpus_fast_zaps_and_frees_obsolete_pages") {
        return;
    }
    use mmu_integration::arena::shared_guest_memory;
    use mmu_vmm::kit::workloads::{self, TouchKind};
    use vm_memory::{GuestAddress, GuestMemoryBackend};
    // KVM's 8-entry prefetch: with the whole-table default the vCPUs
    // refault so few pages after a zap that they can finish their passes
    // before a second churn cycle, and the test would churn once.
    let mut backend = BackendConfig::default();
    backend.shadow.prefetch = 8;
    let mut vm = shadow_vm_with(2, HostCoherence::Detect, backend);
    let spare = shared_guest_memory(&[(GuestAddress(1 << 30), 2 << 20)]).unwrap();
    let spare_region = spare.iter().next().unwrap();
    let spare_slot = mmu_api::SlotId(2);
    vm.memslots()
        .add_region(spare_slot, spare_region, mmu_api::MemslotFlags::empty())
        .unwrap();
    let layout = vm.vm().layout().clone();
    let passes = 20;
    let seed = 0x77;
    let args: Vec<VcpuArgs> = (0..2)
        .map(|i| {
            let slice = layout.data_slice(i, 2);
            let pages = (slice.end - slice.start) / 4096;
            VcpuArgs([slice.start, pages, passes, seed, 0, 0])
        })
        .collect();
    let program = workloads::touch(TouchKind::Write).unwrap();
    let churns = std::sync::atomic::AtomicU64::new(0);
    let shadow = vm.shadow_backend().expect("shadow").clone();
    let progress = Progress::new(2);
    let report = {
        let (inner, handlers, glue) = vm.parts();
        let handlers = handlers
            .iter_mut()
            .enumerate()
            .map(|(i, h)| progress.observe(i, h))
            .collect();
        thread::scope(|s| {
            let host = s.spawn(|| {
                // A bounded churn: each cycle's zapped frames are replayed by
                // every vCPU (512 emulated re-assertions a frame), so an
                // unbounded one would starve the guest on this host. Each
                // cycle waits for the vCPUs to run again: a few exits after
                // the previous one (its kicks, refaults and replays).
                for _ in 0..10 {
                    glue.delete(spare_slot).unwrap();
                    glue.add_region(spare_slot, spare_region, mmu_api::MemslotFlags::empty())
                        .unwrap();
                    shadow.reclaim_obsolete();
                    churns.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let seen = progress.snapshot().exits.iter().sum::<u64>();
                    let counts = progress.wait_for("guest progress after a churn", LIMIT, |c| {
                        c.finished || c.exits.iter().sum::<u64>() >= seen + CHURN_PROGRESS
                    });
                    if counts.finished {
                        break;
                    }
                }
            });
            let report = inner.run_with(&program, &args, LIMIT, handlers);
            progress.finish();
            host.join().unwrap();
            report
        })
        .expect("touch under churn")
    };
    for (i, v) in report.vcpus.iter().enumerate() {
        let slice = layout.data_slice(i, 2);
        let pages = (slice.end - slice.start) / 4096;
        let expected =
            workloads::touch_checksum(TouchKind::Write, slice.start, pages, passes, seed, |_| 0);
        assert_eq!(v.last(tag::CHECKSUM), Some(expected), "vCPU {i}");
    }
    shadow.reclaim_obsolete();
    shadow.audit().expect("audit after the churn");
    let stats = vm.backend().stats();
    println!(
        "churn: {} delete+add cycles; {stats}",
        churns.load(std::sync::atomic::Ordering::Relaxed)
    );
    assert!(stats.get("fast_zaps").unwrap() > 0, "{stats}");
    assert!(stats.get("obsolete_freed").unwrap() > 0, "{stats}");
    assert_eq!(stats.get("valid_reclaimed_with_obsolete_pending"), Some(0));
}
