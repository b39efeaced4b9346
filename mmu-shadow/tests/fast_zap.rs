//! The generation ("fast") zap, zapped-obsolete-first reclaim, reclaim
//! policies and MMIO SPTEs, one mechanism per test.

mod common;

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;

use common::{GuestRam, add_slot, config};
use mmu_api::{
    AccessMode, Gpa, Gva, MemslotFlags, MmuBackend, MmuVcpu, PagingContext, PagingMode,
    PfErrorCode, SlotId, VcpuId, VcpuKick,
};
use mmu_shadow::soft::{SoftOutcome, SoftVcpu};
use mmu_shadow::{ReclaimPolicy, ShadowBackend, ShadowConfig, ZapMode};

const PWU: u64 = 7;

fn ctx(cr3: u64) -> PagingContext {
    PagingContext::for_mode(
        PagingMode::Level4,
        cr3,
        40,
        mmu_api::paging::CpuFeatures::all(),
    )
    .unwrap()
}

fn stat(b: &ShadowBackend, name: &str) -> u64 {
    b.stats()
        .get(name)
        .unwrap_or_else(|| panic!("no counter {name}"))
}

/// Two address spaces sharing nothing below the root:
/// AS1 (CR3 0x1000): PDPT 2, PD 3, PT 4; gva 0x1000 * i -> RAM 16 + i;
///   gva 0x7000 -> RAM page 12 (AS2's page table) as data;
///   gva 0x8000 -> gpa 0x80_0000 (MMIO, no slot).
/// AS2 (CR3 0x9000): PDPT 10, PD 11, PT 12; gva 0 -> RAM 20.
fn two_spaces(ram: &mut GuestRam) {
    ram.set_word(1, 0, 0x2000 | PWU);
    ram.set_word(2, 0, 0x3000 | PWU);
    ram.set_word(3, 0, 0x4000 | PWU);
    for i in 0..7u64 {
        ram.set_word(4, i as usize, (0x10_000 + 0x1000 * i) | PWU);
    }
    ram.set_word(4, 7, 0xc000 | PWU);
    ram.set_word(4, 8, 0x80_0000 | PWU);
    ram.set_word(9, 0, 0xa000 | PWU);
    ram.set_word(10, 0, 0xb000 | PWU);
    ram.set_word(11, 0, 0xc000 | PWU);
    ram.set_word(12, 0, 0x14_000 | PWU);
}

fn setup(cfg: ShadowConfig) -> (GuestRam, ShadowBackend) {
    let mut ram = GuestRam::new(64);
    two_spaces(&mut ram);
    let b = ShadowBackend::new(cfg).unwrap();
    add_slot(&b, ram.slot(0, 0, 0, 48, MemslotFlags::empty()));
    (ram, b)
}

/// A kick that tells a test thread the vCPU was kicked.
#[derive(Debug)]
struct ChannelKick(Mutex<mpsc::Sender<()>>);

impl VcpuKick for ChannelKick {
    fn kick(&self) {
        let _ = self.0.lock().unwrap().send(());
    }
}

#[test]
fn fast_zap_never_reuses_obsolete_pages() {
    let (_ram, b) = setup(config(None, 8));
    let mut cpu = SoftVcpu::new(&b, VcpuId(0)).unwrap();
    cpu.load_context(&ctx(0x1000)).unwrap();
    cpu.read(Gva(0x1000), 8, AccessMode::User).unwrap();
    let before = stat(&b, "sps_allocated");
    b.zap_all();
    assert_eq!(stat(&b, "fast_zaps"), 1);
    assert_eq!(stat(&b, "obsolete_pending"), 4, "root, PDPT, PD, PT");
    // The same address again: a fresh path, never the obsolete pages.
    assert_eq!(
        cpu.read(Gva(0x1000), 8, AccessMode::User).unwrap(),
        SoftOutcome::Done(0)
    );
    assert_eq!(stat(&b, "sps_allocated"), before + 4);
    b.audit().unwrap();
    // Reclaimed later, in batches, with nothing left behind.
    assert_eq!(b.reclaim_obsolete(), 4);
    assert_eq!(stat(&b, "obsolete_pending"), 0);
    assert_eq!(stat(&b, "obsolete_freed"), 4);
    b.audit().unwrap();
}

#[test]
fn naive_zap_is_selectable() {
    let (_ram, b) = setup({
        let mut m = config(None, 8);
        m.zap = ZapMode::Naive;
        m
    });
    let mut cpu = SoftVcpu::new(&b, VcpuId(0)).unwrap();
    cpu.load_context(&ctx(0x1000)).unwrap();
    cpu.read(Gva(0x1000), 8, AccessMode::User).unwrap();
    b.zap_all();
    assert_eq!((stat(&b, "naive_zaps"), stat(&b, "fast_zaps")), (1, 0));
    assert_eq!(stat(&b, "obsolete_pending"), 0);
    assert_eq!(
        cpu.read(Gva(0x1000), 8, AccessMode::User).unwrap(),
        SoftOutcome::Done(0)
    );
    b.audit().unwrap();
}

/// Until every vCPU has acknowledged the reload, a guest page table
/// shadowed only by an obsolete page stays write-protected (a vCPU that has
/// not reloaded may still run on it); afterwards, once reclaimed, it is not.
#[test]
fn obsolete_pages_write_protect_until_every_vcpu_reloaded() {
    let (ram, b) = setup(config(None, 0));
    let (tx, rx) = mpsc::channel();
    // vCPU A sits in guest mode on AS2 until it is kicked.
    let mut a = b
        .create_vcpu(VcpuId(0), Arc::new(ChannelKick(Mutex::new(tx))))
        .unwrap();
    a.set_paging_context(&ctx(0x9000)).unwrap();
    // vCPU B shadows AS2's page table, then runs AS1, which maps that
    // table as data at gva 0x7000.
    let mut cpu_b = SoftVcpu::new(&b, VcpuId(1)).unwrap();
    cpu_b.load_context(&ctx(0x9000)).unwrap();
    cpu_b.read(Gva(0), 8, AccessMode::User).unwrap();
    cpu_b.load_context(&ctx(0x1000)).unwrap();
    a.prepare_entry().unwrap();

    let hits_before = stat(&b, "write_protect_hits");
    let worker = thread::spawn(move || {
        rx.recv().unwrap();
        // The zap is waiting for A. B writes AS2's page table through AS1.
        let during = cpu_b.write(Gva(0x7008), 8, 0x15_000 | PWU, AccessMode::User);
        a.exit_guest();
        (during.unwrap(), cpu_b, a)
    });
    b.zap_all();
    let (during, mut cpu_b, _a) = worker.join().unwrap();
    assert_eq!(during, SoftOutcome::Done(0x15_000 | PWU));
    assert_eq!(
        stat(&b, "write_protect_hits"),
        hits_before + 1,
        "the write had to be emulated: the obsolete page still shadows the table"
    );
    assert_eq!(ram.word(12, 1), 0x15_000 | PWU);
    b.audit().unwrap();

    // Every vCPU is off the old roots: reclaim, and the table is plain data.
    assert!(b.reclaim_obsolete() > 0);
    let out = cpu_b.write(Gva(0x7010), 8, 5, AccessMode::User).unwrap();
    assert_eq!(out, SoftOutcome::Done(5));
    assert_eq!(stat(&b, "write_protect_hits"), hits_before + 1);
    b.audit().unwrap();
}

/// An MMIO fault served while a memslot update is in progress caches
/// nothing, so nothing made then can hit afterwards; later MMIO SPTEs hit
/// until a memslot change makes them stale.
#[test]
fn mmio_sptes_made_during_an_update_never_hit() {
    let (mut ram, b) = setup(config(None, 0));
    add_slot(&b, ram.slot(1, 0x40_0000, 48, 4, MemslotFlags::empty()));
    let (tx, rx) = mpsc::channel();
    let mut a = b
        .create_vcpu(VcpuId(0), Arc::new(ChannelKick(Mutex::new(tx))))
        .unwrap();
    a.set_paging_context(&ctx(0x1000)).unwrap();
    let mut cpu_b = SoftVcpu::new(&b, VcpuId(1)).unwrap();
    cpu_b.load_context(&ctx(0x1000)).unwrap();
    a.prepare_entry().unwrap();

    let worker = thread::spawn(move || {
        rx.recv().unwrap();
        let during = cpu_b.read(Gva(0x8010), 8, AccessMode::User);
        a.exit_guest();
        (during.unwrap(), cpu_b, a)
    });
    b.delete_memslot(SlotId(1)).unwrap();
    let (during, mut cpu_b, _a) = worker.join().unwrap();
    assert_eq!(during, SoftOutcome::Mmio(Gpa(0x80_0010)));
    assert_eq!(
        stat(&b, "mmio_sptes"),
        0,
        "no MMIO SPTE while the update was in progress"
    );

    // After the update: the first access makes the SPTE, the second hits it.
    assert_eq!(
        cpu_b.read(Gva(0x8010), 8, AccessMode::User).unwrap(),
        SoftOutcome::Mmio(Gpa(0x80_0010))
    );
    assert_eq!((stat(&b, "mmio_sptes"), stat(&b, "mmio_fast_hits")), (1, 0));
    assert_eq!(
        cpu_b.read(Gva(0x8018), 8, AccessMode::User).unwrap(),
        SoftOutcome::Mmio(Gpa(0x80_0018))
    );
    assert_eq!(stat(&b, "mmio_fast_hits"), 1);
    // A new slot covering the address: the SPTE is stale, memory is read.
    ram.set_word(52, 2, 0x99);
    add_slot(&b, ram.slot(2, 0x80_0000, 52, 4, MemslotFlags::empty()));
    assert_eq!(
        cpu_b.read(Gva(0x8010), 8, AccessMode::User).unwrap(),
        SoftOutcome::Done(0x99)
    );
    assert_eq!((stat(&b, "mmio_stale"), stat(&b, "mmio_fast_hits")), (1, 1));
    b.audit().unwrap();
}

#[test]
fn mmio_caching_respects_guest_rights_and_can_be_off() {
    for caching in [true, false] {
        let (mut ram, b) = setup({
            let mut m = config(None, 0);
            m.mmio_caching = caching;
            m
        });
        // A read-only user mapping of MMIO at gva 0x9000.
        ram.set_word(4, 9, 0x80_1000 | 5);
        let mut cpu = SoftVcpu::new(&b, VcpuId(0)).unwrap();
        cpu.load_context(&ctx(0x1000)).unwrap();
        assert_eq!(cpu.mmu().last_mmio_cached(), None);
        for i in 0..3 {
            assert_eq!(
                cpu.read(Gva(0x9000), 8, AccessMode::User).unwrap(),
                SoftOutcome::Mmio(Gpa(0x80_1000))
            );
            // The first access walks and searches; later ones hit the MMIO
            // SPTE, when caching is on.
            assert_eq!(cpu.mmu().last_mmio_cached(), Some(caching && i > 0));
        }
        // A write the guest forbids is a guest #PF, cached or not.
        assert_eq!(
            cpu.write(Gva(0x9000), 8, 1, AccessMode::User).unwrap(),
            SoftOutcome::PageFault {
                error_code: PfErrorCode::PRESENT | PfErrorCode::WRITE | PfErrorCode::USER,
                cr2: Gva(0x9000)
            }
        );
        let hits = stat(&b, "mmio_fast_hits");
        assert_eq!(hits, if caching { 2 } else { 0 });
        b.audit().unwrap();
    }
}

#[test]
fn generation_wrap_zaps_mmio_sptes() {
    let (ram, b) = setup({
        let mut m = config(None, 0);
        m.mmio_gen_bits = 2;
        m
    });
    let mut cpu = SoftVcpu::new(&b, VcpuId(0)).unwrap();
    cpu.load_context(&ctx(0x1000)).unwrap();
    cpu.read(Gva(0x8000), 8, AccessMode::User).unwrap();
    cpu.read(Gva(0x8000), 8, AccessMode::User).unwrap();
    assert_eq!(stat(&b, "mmio_fast_hits"), 1);
    // Four updates bring the 2-bit tag back to the same value: the wrap must
    // have dropped the old SPTE, or it would hit again with a stale answer.
    for i in 0..4u32 {
        add_slot(
            &b,
            ram.slot(
                10 + i,
                0x100_0000 + u64::from(i) * 0x1000,
                60,
                1,
                MemslotFlags::empty(),
            ),
        );
        b.delete_memslot(SlotId(10 + i)).unwrap();
    }
    assert!(stat(&b, "generation_wraps") >= 1);
    let hits = stat(&b, "mmio_fast_hits");
    cpu.read(Gva(0x8000), 8, AccessMode::User).unwrap();
    assert_eq!(stat(&b, "mmio_fast_hits"), hits, "no hit across a wrap");
    b.audit().unwrap();
}

/// With the page limit reached and obsolete pages pending, allocation takes
/// zapped-obsolete pages before any valid page.
#[test]
fn allocation_takes_zapped_obsolete_pages_first() {
    let mut ram = GuestRam::new(64);
    // 11 shadow pages for 8 addresses, under a limit with room for a
    // fault's headroom (5) on top.
    common::eight_table_guest(&mut ram);
    let b = ShadowBackend::new(config(Some(16), 0)).unwrap();
    add_slot(&b, ram.slot(0, 0, 0, 48, MemslotFlags::empty()));
    let mut cpu = SoftVcpu::new(&b, VcpuId(0)).unwrap();
    cpu.load_context(&ctx(0x1000)).unwrap();
    for t in 0..8u64 {
        cpu.read(Gva(t << 21), 8, AccessMode::User).unwrap();
    }
    assert_eq!(stat(&b, "sps_in_use"), 11);
    b.zap_all();
    for t in 0..8u64 {
        assert_eq!(
            cpu.read(Gva(t << 21), 8, AccessMode::User).unwrap(),
            SoftOutcome::Done(0)
        );
        b.audit().unwrap();
    }
    let s = b.stats();
    assert!(s.get("obsolete_reused").unwrap() > 0, "{s}");
    assert_eq!(s.get("reclaimed_valid"), Some(0), "{s}");
    assert_eq!(
        s.get("valid_reclaimed_with_obsolete_pending"),
        Some(0),
        "{s}"
    );
    assert!(
        s.get("pages_over_limit_max").unwrap() <= 11,
        "excess bounded by the obsolete pages: {s}"
    );
}

/// Under a small limit, FIFO reclaims directories holding fresh
/// tables; parent-aware reclaim takes leaves first and keeps the parents of
/// new children young.
#[test]
fn parent_aware_reclaim_keeps_directories() {
    let mut results = Vec::new();
    for policy in [ReclaimPolicy::Fifo, ReclaimPolicy::ParentAware] {
        let mut ram = GuestRam::new(64);
        ram.set_word(1, 0, 0x2000 | PWU);
        ram.set_word(2, 0, 0x3000 | PWU);
        for t in 0..16u64 {
            ram.set_word(3, t as usize, (0x4000 + 0x1000 * (t % 8)) | PWU);
        }
        for t in 0..8u64 {
            ram.set_word(4 + t, 0, (0x10_000 + 0x1000 * t) | PWU);
        }
        let b = ShadowBackend::new({
            let mut m = config(Some(12), 0);
            m.reclaim = policy;
            m
        })
        .unwrap();
        add_slot(&b, ram.slot(0, 0, 0, 48, MemslotFlags::empty()));
        let mut cpu = SoftVcpu::new(&b, VcpuId(0)).unwrap();
        cpu.load_context(&ctx(0x1000)).unwrap();
        for round in 0..4u64 {
            for t in 0..16u64 {
                let v = round * 100 + t;
                assert_eq!(
                    cpu.write(Gva(t << 21), 8, v, AccessMode::User).unwrap(),
                    SoftOutcome::Done(v)
                );
            }
            b.audit().unwrap();
        }
        let s = b.stats();
        results.push((
            s.get("reclaimed_leaf_pages").unwrap(),
            s.get("reclaimed_directory_pages").unwrap(),
        ));
    }
    let (fifo, aware) = (results[0], results[1]);
    assert!(fifo.1 > 0, "FIFO reclaims directories: {fifo:?}");
    assert_eq!(
        aware.1, 0,
        "parent-aware reclaim keeps directories: {aware:?}"
    );
    assert!(aware.0 > 0);
}

#[test]
fn fast_zap_waits_for_vcpus_in_guest_mode() {
    let (_ram, b) = setup(config(None, 0));
    let (tx, rx) = mpsc::channel();
    let mut a = b
        .create_vcpu(VcpuId(0), Arc::new(ChannelKick(Mutex::new(tx))))
        .unwrap();
    let first = a.set_paging_context(&ctx(0x1000)).unwrap().root;
    a.prepare_entry().unwrap();
    let worker = thread::spawn(move || {
        rx.recv().unwrap();
        a.exit_guest();
        // Before it enters again, the vCPU loads a fresh root.
        let load = a.prepare_entry().unwrap();
        assert!(load.flush_tlb);
        (load.root, a)
    });
    b.zap_all();
    let (second, _a) = worker.join().unwrap();
    assert!(second.is_some() && second != first);
    b.audit().unwrap();
}

/// With an MMIO window, an MMIO leaf is an ordinary leaf into the
/// hypervisor's window: the second access exits as the hypervisor's MMIO
/// (no fault reaches the MMU), and a memslot added over the frame zaps the
/// leaf so memory is read from then on.
#[test]
fn mmio_window_leaves_exit_without_a_fault_until_memory_comes() {
    let (mut ram, b) = setup({
        let mut c = config(None, 0);
        c.mmio_window = Some(mmu_api::Hpa(1 << 45));
        c
    });
    let mut cpu = SoftVcpu::new(&b, VcpuId(0)).unwrap();
    cpu.load_context(&ctx(0x1000)).unwrap();
    assert_eq!(
        cpu.read(Gva(0x8010), 8, AccessMode::User).unwrap(),
        SoftOutcome::Mmio(Gpa(0x80_0010))
    );
    let faults = stat(&b, "faults");
    assert_eq!((stat(&b, "mmio_sptes"), stat(&b, "faults_mmio")), (1, 1));
    b.audit().unwrap();
    // Answered by the "hypervisor" from the leaf: no fault, no fast path.
    assert_eq!(
        cpu.read(Gva(0x8018), 8, AccessMode::User).unwrap(),
        SoftOutcome::Mmio(Gpa(0x80_0018))
    );
    assert_eq!(stat(&b, "faults"), faults);
    assert_eq!(stat(&b, "mmio_fast_hits"), 0);
    // The guest maps it read-only-until-dirty: a write faults once and is
    // served as MMIO, then writes exit without a fault too.
    assert_eq!(
        cpu.write(Gva(0x8010), 8, 5, AccessMode::User).unwrap(),
        SoftOutcome::Mmio(Gpa(0x80_0010))
    );
    assert_eq!(
        cpu.write(Gva(0x8010), 8, 6, AccessMode::User).unwrap(),
        SoftOutcome::Mmio(Gpa(0x80_0010))
    );
    let after_writes = stat(&b, "faults");
    assert!(
        after_writes <= faults + 1,
        "{after_writes} faults after {faults}"
    );
    b.audit().unwrap();
    // Memory added over the frame: the leaf goes at once, memory is read.
    ram.set_word(52, 2, 0x99);
    add_slot(&b, ram.slot(2, 0x80_0000, 52, 4, MemslotFlags::empty()));
    b.audit().unwrap();
    assert_eq!(
        cpu.read(Gva(0x8010), 8, AccessMode::User).unwrap(),
        SoftOutcome::Done(0x99)
    );
    b.audit().unwrap();
}
