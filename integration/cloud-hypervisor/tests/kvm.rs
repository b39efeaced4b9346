//! A real-mode guest on KVM through Cloud Hypervisor's own `hypervisor`
//! crate, with the MMU wrapped around its VM: MMIO served inside `run()`
//! and classified by the EPT backend, RAM writes in the VM-wide dirty log.
//! Skips (and passes) where `/dev/kvm` cannot be opened, unless
//! `MMU_REQUIRE_KVM=1`.
#![cfg(feature = "kvm")]

use std::sync::{Arc, Mutex};

use hypervisor::{HypervisorVmError, Vm, VmExit};
use mmu_backends::BackendKind;
use mmu_cloud_hypervisor::{MmuConfig, MmuVm};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

fn hypervisor_or_skip(name: &str) -> Option<Arc<dyn hypervisor::Hypervisor>> {
    match hypervisor::new() {
        Ok(h) => {
            println!("KVM test ran: {name}");
            Some(h)
        }
        Err(e) => {
            if std::env::var("MMU_REQUIRE_KVM").is_ok_and(|v| v == "1") {
                panic!("MMU_REQUIRE_KVM=1 but no hypervisor: {e}");
            }
            println!("SKIPPED (no /dev/kvm): {name}");
            None
        }
    }
}

const RAM_SIZE: usize = 0x8_0000;
const CODE: u64 = 0x1000;
/// A device page with one register, outside RAM.
const DEVICE: u64 = 0xd_0000;
const REPORT_PORT: u64 = 0x80;
/// Pages the guest writes.
const WRITTEN: [u64; 3] = [0x10, 0x11, 0x40];
const WRITES: u16 = 8;

/// Cloud Hypervisor's handler over its buses and memory, as a test
/// double of the same trait: guest memory, one MMIO register at
/// `DEVICE` that counts writes and answers reads with the count, and
/// port writes recorded.
struct Handler {
    memory: GuestMemoryMmap,
    register: Mutex<u16>,
    mmio: Mutex<Vec<(u64, Vec<u8>)>>,
    ports: Mutex<Vec<u16>>,
}

#[derive(Debug, thiserror::Error)]
#[error("no device at {0:#x}")]
struct NoDevice(u64);

impl hypervisor::VmOps for Handler {
    fn guest_mem_write(&self, gpa: u64, buf: &[u8]) -> Result<usize, HypervisorVmError> {
        self.memory
            .write(buf, GuestAddress(gpa))
            .map_err(|e| HypervisorVmError::GuestMemWrite(e.into()))
    }
    fn guest_mem_read(&self, gpa: u64, buf: &mut [u8]) -> Result<usize, HypervisorVmError> {
        self.memory
            .read(buf, GuestAddress(gpa))
            .map_err(|e| HypervisorVmError::GuestMemRead(e.into()))
    }
    fn mmio_read(&self, gpa: u64, data: &mut [u8]) -> Result<(), HypervisorVmError> {
        if gpa & !0xfff != DEVICE {
            return Err(HypervisorVmError::MmioBusRead(NoDevice(gpa).into()));
        }
        let value = self.register.lock().unwrap().to_le_bytes();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = value.get(i).copied().unwrap_or(0);
        }
        Ok(())
    }
    fn mmio_write(&self, gpa: u64, data: &[u8]) -> Result<(), HypervisorVmError> {
        if gpa & !0xfff != DEVICE {
            return Err(HypervisorVmError::MmioBusWrite(NoDevice(gpa).into()));
        }
        *self.register.lock().unwrap() += 1;
        self.mmio.lock().unwrap().push((gpa, data.to_vec()));
        Ok(())
    }
    fn pio_read(&self, _port: u64, data: &mut [u8]) -> Result<(), HypervisorVmError> {
        data.fill(0xff);
        Ok(())
    }
    fn pio_write(&self, port: u64, data: &[u8]) -> Result<(), HypervisorVmError> {
        if port == REPORT_PORT && data.len() == 2 {
            self.ports
                .lock()
                .unwrap()
                .push(u16::from_le_bytes([data[0], data[1]]));
        }
        Ok(())
    }
}

/// The guest, 16-bit real mode with DS = 0:
/// writes a word to each `WRITTEN` page, then `WRITES` times writes the
/// device register (ES = DEVICE >> 4), reads it back and reports it on
/// `REPORT_PORT`, then halts.
fn program() -> Vec<u8> {
    let mut code = Vec::new();
    // xor ax, ax; mov ds, ax
    code.extend_from_slice(&[0x31, 0xc0, 0x8e, 0xd8]);
    for page in WRITTEN {
        let at = (page * 0x1000) as u32;
        // Real mode reaches 0x4_0000 through a segment: mov bx, seg; mov es, bx
        let seg = (at >> 4) as u16;
        code.extend_from_slice(&[0xbb]);
        code.extend_from_slice(&seg.to_le_bytes());
        code.extend_from_slice(&[0x8e, 0xc3]);
        // mov word es:[0x8], 0xbeef
        code.extend_from_slice(&[0x26, 0xc7, 0x06, 0x08, 0x00, 0xef, 0xbe]);
    }
    // mov bx, DEVICE >> 4; mov es, bx; mov cx, WRITES
    code.extend_from_slice(&[0xbb]);
    code.extend_from_slice(&((DEVICE >> 4) as u16).to_le_bytes());
    code.extend_from_slice(&[0x8e, 0xc3, 0xb9]);
    code.extend_from_slice(&WRITES.to_le_bytes());
    let top = code.len();
    // mov word es:[0x10], cx
    code.extend_from_slice(&[0x26, 0x89, 0x0e, 0x10, 0x00]);
    // mov ax, es:[0x10]
    code.extend_from_slice(&[0x26, 0xa1, 0x10, 0x00]);
    // mov dx, REPORT_PORT; out dx, ax
    code.extend_from_slice(&[0xba]);
    code.extend_from_slice(&(REPORT_PORT as u16).to_le_bytes());
    code.push(0xef);
    // loop top
    let rel = top as isize - (code.len() as isize + 2);
    code.extend_from_slice(&[0xe2, rel as i8 as u8]);
    // hlt
    code.push(0xf4);
    code
}

fn start_real_mode(vcpu: &dyn hypervisor::Vcpu) {
    let mut sregs = vcpu.get_sregs().expect("get_sregs");
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
    vcpu.set_sregs(&sregs).expect("set_sregs");
    let mut regs = vcpu.create_standard_regs();
    regs.set_rip(CODE);
    regs.set_rflags(2);
    regs.set_rsp(0x8000);
    vcpu.set_regs(&regs).expect("set_regs");
}

#[test]
fn real_mode_guest_mmio_and_dirty_log_under_ept() {
    let Some(hv) = hypervisor_or_skip("real_mode_guest_mmio_and_dirty_log_under_ept") else {
        return;
    };
    let vm = hv
        .create_vm(hypervisor::HypervisorVmConfig::default())
        .expect("create_vm");
    vm.set_tss_address(0xfffb_d000).expect("set_tss_address");
    let mmu_vm = Arc::new(MmuVm::new(vm, &MmuConfig::new(BackendKind::Ept)).expect("MmuVm"));
    let vm: Arc<dyn Vm> = mmu_vm.clone();

    let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM_SIZE)]).unwrap();
    memory.write_slice(&program(), GuestAddress(CODE)).unwrap();
    let host = memory.get_host_address(GuestAddress(0)).unwrap();
    // SAFETY: `memory` outlives the VM's use of it: the slot is removed
    // below, before `memory` is dropped.
    unsafe { vm.create_user_memory_region(0, 0, RAM_SIZE, host, false, true) }
        .expect("create_user_memory_region");
    // Before the VM-wide start, the slot is recorded but not logging.
    assert!(vm.get_dirty_log(0, 0, RAM_SIZE as u64).is_err());
    vm.start_dirty_log().expect("start_dirty_log");

    let handler = Arc::new(Handler {
        memory: memory.clone(),
        register: Mutex::new(0),
        mmio: Mutex::new(Vec::new()),
        ports: Mutex::new(Vec::new()),
    });
    let mut vcpu = vm
        .create_vcpu(0, Some(handler.clone()), None)
        .expect("create_vcpu");
    start_real_mode(&*vcpu);
    let mut exits = 0;
    loop {
        match vcpu.run().expect("run") {
            VmExit::Ignore => exits += 1,
            // Without an in-kernel irqchip, HLT ends the run as a reset.
            VmExit::Reset => break,
            other => panic!("unexpected exit {other:?}"),
        }
        assert!(exits < 10_000, "the guest does not halt");
    }

    // What the device saw: WRITES writes, and the reads of the register.
    let reported = handler.ports.lock().unwrap().clone();
    let expected: Vec<u16> = (1..=WRITES).collect();
    assert_eq!(reported, expected);
    assert_eq!(handler.mmio.lock().unwrap().len(), usize::from(WRITES));

    // The MMU's classification: every MMIO exit went through it; the
    // first one per page missed the cache, the rest hit.
    let stats = mmu_vm.backend().stats();
    let hits = stats.get("mmio_cache_hits").unwrap();
    let misses = stats.get("mmio_cache_misses").unwrap();
    let vcpu_stats = mmu_vm.vcpu_stats(0).expect("vCPU 0's counters");
    println!("vCPU exit counters: {vcpu_stats}");
    println!("backend: mmio_cache_hits={hits} mmio_cache_misses={misses}");
    assert_eq!(vcpu_stats.mmio_exits, 2 * u64::from(WRITES));
    assert_eq!(vcpu_stats.device_writes, u64::from(WRITES));
    assert_eq!(vcpu_stats.device_reads, u64::from(WRITES));
    assert_eq!(misses, 1);
    assert_eq!(hits, 2 * u64::from(WRITES) - 1);

    let all = mmu_vm.exit_stats();
    assert_eq!(all, vcpu_stats);

    // The dirty log, through Cloud Hypervisor's own call. The program
    // itself was written before the start and is not in it.
    let words = vm
        .get_dirty_log(0, 0, RAM_SIZE as u64)
        .expect("get_dirty_log");
    let dirty = pages(&words);
    let listed: Vec<String> = dirty.iter().map(|p| format!("{p:#x}")).collect();
    println!("dirty pages: {}", listed.join(" "));
    assert_eq!(dirty, WRITTEN);
    // A harvest clears the log; stopping ends it.
    assert!(pages(&vm.get_dirty_log(0, 0, RAM_SIZE as u64).unwrap()).is_empty());
    vm.stop_dirty_log().expect("stop_dirty_log");
    assert!(vm.get_dirty_log(0, 0, RAM_SIZE as u64).is_err());

    drop(vcpu);
    // SAFETY: the slot was created with these arguments above.
    unsafe { vm.remove_user_memory_region(0, 0, RAM_SIZE, host, false, true) }
        .expect("remove_user_memory_region");
    assert!(mmu_vm.backend().memslots().is_empty());
}

fn pages(words: &[u64]) -> Vec<u64> {
    let mut pages = Vec::new();
    for (i, word) in words.iter().enumerate() {
        for bit in 0..64 {
            if word & (1 << bit) != 0 {
                pages.push(i as u64 * 64 + bit);
            }
        }
    }
    pages
}

#[test]
fn shadow_is_refused_for_a_stock_guest() {
    let Some(hv) = hypervisor_or_skip("shadow_is_refused_for_a_stock_guest") else {
        return;
    };
    let vm = hv
        .create_vm(hypervisor::HypervisorVmConfig::default())
        .expect("create_vm");
    let err = MmuVm::new(Arc::clone(&vm), &MmuConfig::new(BackendKind::Shadow)).unwrap_err();
    println!(
        "shadow under Cloud Hypervisor: {err}: {}",
        std::error::Error::source(&err).unwrap()
    );
    assert!(
        matches!(
            err,
            mmu_cloud_hypervisor::AdapterError::Host(
                mmu_integration::host::HostError::NoGuestMmuPath
            )
        ),
        "{err:?}"
    );
    // With the paravirtual MMU ABI declared, shadow still needs kicks.
    let config = MmuConfig {
        paravirtual_mmu: true,
        ..MmuConfig::new(BackendKind::Shadow)
    };
    let err = MmuVm::new(Arc::clone(&vm), &config).unwrap_err();
    assert!(
        matches!(err, mmu_cloud_hypervisor::AdapterError::NoKick),
        "{err:?}"
    );
    // With both, shadow is set up: its page pool becomes a region of the
    // VM through Cloud Hypervisor's own call.
    let kick: Arc<mmu_cloud_hypervisor::KickFactory> = Arc::new(|_| Arc::new(Counted::default()));
    let config = MmuConfig {
        kick: Some(kick),
        ..config
    };
    let shadow = MmuVm::new(Arc::clone(&vm), &config).expect("shadow with the ABI declared");
    assert_eq!(shadow.backend().name(), "shadow");
    assert!(shadow.mmu().shadow().is_some());
    drop(shadow);
    // ept runs a stock guest (the shadow pool's region is gone again).
    MmuVm::new(vm, &MmuConfig::new(BackendKind::Ept)).expect("ept");
}

/// A kick that counts.
#[derive(Debug, Default)]
struct Counted(std::sync::atomic::AtomicU64);

impl mmu_api::VcpuKick for Counted {
    fn kick(&self) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

#[test]
fn refusals_come_back_as_cloud_hypervisor_errors_with_their_source() {
    let Some(hv) =
        hypervisor_or_skip("refusals_come_back_as_cloud_hypervisor_errors_with_their_source")
    else {
        return;
    };
    let vm = hv
        .create_vm(hypervisor::HypervisorVmConfig::default())
        .expect("create_vm");
    let mmu_vm = Arc::new(MmuVm::new(vm, &MmuConfig::new(BackendKind::Ept)).expect("MmuVm"));
    let vm: Arc<dyn Vm> = mmu_vm.clone();
    let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
    let host = memory.get_host_address(GuestAddress(0)).unwrap();

    // Read-only and dirty-logged: refused by the glue, as Cloud Hypervisor
    // refuses it, before anything reaches KVM.
    // SAFETY: `memory` outlives the VM; the call is refused.
    let err =
        unsafe { vm.create_user_memory_region(0, 0, 0x1_0000, host, true, true) }.unwrap_err();
    let messages = chain(&err);
    println!("read-only + logged: {messages:?}");
    assert!(
        matches!(err, HypervisorVmError::CreateUserMemory(_)),
        "{err:?}"
    );
    assert!(
        messages
            .iter()
            .any(|m| m.contains("read-only and dirty-logged")),
        "{messages:?}"
    );
    assert!(mmu_vm.backend().memslots().is_empty());

    // Two regions at the same place: the backend refuses the overlap.
    // SAFETY: `memory` outlives the VM: slot 0 is removed below.
    unsafe { vm.create_user_memory_region(0, 0, 0x1_0000, host, false, false) }.unwrap();
    // SAFETY: as above; the call is refused.
    let err =
        unsafe { vm.create_user_memory_region(1, 0, 0x1_0000, host, false, false) }.unwrap_err();
    let messages = chain(&err);
    println!("overlap: {messages:?}");
    assert!(
        messages.iter().any(|m| m.contains("overlaps")),
        "{messages:?}"
    );

    // A slot KVM does not have: KVM's errno is in the message.
    let memory2 =
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0x10_0000), 0x1_0000)]).unwrap();
    let host2 = memory2.get_host_address(GuestAddress(0x10_0000)).unwrap();
    // SAFETY: `memory2` outlives the VM; the call is refused.
    let err =
        unsafe { vm.create_user_memory_region(40_000, 0x10_0000, 0x1_0000, host2, false, false) }
            .unwrap_err();
    let messages = chain(&err);
    println!("unknown slot: {messages:?}");
    assert!(
        messages
            .iter()
            .any(|m| m.contains(&format!("os error {}", libc::EINVAL))),
        "{messages:?}"
    );
    assert_eq!(mmu_vm.backend().memslots().len(), 1);

    // SAFETY: slot 0 was created with these arguments.
    unsafe { vm.remove_user_memory_region(0, 0, 0x1_0000, host, false, false) }.unwrap();
    // Removing it again: unknown to the glue.
    // SAFETY: as above; the call is refused.
    let err =
        unsafe { vm.remove_user_memory_region(0, 0, 0x1_0000, host, false, false) }.unwrap_err();
    assert!(
        matches!(err, HypervisorVmError::RemoveUserMemory(_)),
        "{err:?}"
    );
}

fn chain(error: &(dyn std::error::Error + 'static)) -> Vec<String> {
    std::iter::successors(Some(error), |e| e.source())
        .map(ToString::to_string)
        .collect()
}
