//! MMIO classification and its generation-tagged per-vCPU cache.

use std::sync::Arc;

use mmu_api::{Gpa, MemslotFlags, MmioClass, MmuBackend, SlotId, VcpuId};
use mmu_ept::{EptBackend, EptConfig};

use crate::common::{CountingKick, GatedHypervisor, PAGE, Vm, add_ram, leak_ram, set_slot};

const RAM: MmioClass = MmioClass::Memory { slot: SlotId(0) };

/// Classifies `gpa` twice (the second answer comes from the cache when the
/// cache is right) and checks both answers.
fn twice(vcpu: &mut dyn mmu_api::MmuVcpu, gpa: u64, is_write: bool, want: MmioClass) {
    assert_eq!(vcpu.classify_mmio(Gpa(gpa), is_write), want, "{gpa:#x}");
    assert_eq!(
        vcpu.classify_mmio(Gpa(gpa), is_write),
        want,
        "{gpa:#x} again"
    );
}

/// A cached answer never survives a memslot change that makes it wrong:
/// add, move and delete each flip the classification of the pages they
/// cover, even though those pages were cached just before.
#[test]
fn classification_follows_add_move_and_delete() {
    let vm = Vm::new();
    let b = &vm.backend;
    let mut vcpu = vm.vcpu(0);
    let ram = leak_ram(4 * PAGE);

    twice(&mut *vcpu, 0x10_0000, false, MmioClass::Mmio);
    twice(&mut *vcpu, 0x20_3fff, true, MmioClass::Mmio);

    add_ram(b, ram, 0, 0x10_0000, MemslotFlags::empty()).unwrap();
    twice(&mut *vcpu, 0x10_0000, false, RAM);
    twice(&mut *vcpu, 0x10_3fff, true, RAM);
    twice(&mut *vcpu, 0x10_4000, false, MmioClass::Mmio);

    let moved = {
        let mut m = b.memslots()[0];
        m.guest_base = Gpa(0x20_0000);
        m
    };
    set_slot(b, moved).unwrap();
    twice(&mut *vcpu, 0x10_0000, false, MmioClass::Mmio);
    twice(&mut *vcpu, 0x20_3fff, true, RAM);

    b.delete_memslot(SlotId(0)).unwrap();
    twice(&mut *vcpu, 0x20_3fff, true, MmioClass::Mmio);

    // Each "twice" was one search then one hit: the first call after a
    // memslot change never trusted the entry made before it.
    assert_eq!(vm.stat("mmio_cache_misses"), 8);
    assert_eq!(vm.stat("mmio_cache_hits"), 8);
}

/// A repeated exit to the same page skips the memslot search: one miss,
/// then hits for every offset in the page; another page misses once.
#[test]
fn repeated_exits_to_a_page_hit_the_cache() {
    let vm = Vm::new();
    add_ram(&vm.backend, leak_ram(PAGE), 0, 0, MemslotFlags::empty()).unwrap();
    let mut vcpu = vm.vcpu(0);
    for offset in (0..PAGE).step_by(0x100) {
        assert_eq!(
            vcpu.classify_mmio(Gpa(0xfebf_0000 + offset), offset % 0x200 == 0),
            MmioClass::Mmio
        );
    }
    assert_eq!(vcpu.classify_mmio(Gpa(0xfebf_1000), false), MmioClass::Mmio);
    assert_eq!(vcpu.classify_mmio(Gpa(0x0fff), false), RAM);
    assert_eq!(vm.stat("mmio_cache_misses"), 3);
    assert_eq!(vm.stat("mmio_cache_hits"), 15);
}

/// A write to a READONLY slot is a ROM-device write (MMIO), a read of it
/// is memory, from the cache as from the search; clearing READONLY makes
/// writes memory again.
#[test]
fn writes_to_read_only_slots_are_mmio_writes() {
    let vm = Vm::new();
    let b = &vm.backend;
    add_ram(
        b,
        leak_ram(2 * PAGE),
        0,
        0xffe0_0000,
        MemslotFlags::READONLY,
    )
    .unwrap();
    let mut vcpu = vm.vcpu(0);
    let rom_write = MmioClass::ReadOnlyWrite { slot: SlotId(0) };
    twice(&mut *vcpu, 0xffe0_1000, true, rom_write);
    twice(&mut *vcpu, 0xffe0_1000, false, RAM);
    assert_eq!(
        vm.stat("mmio_cache_hits"),
        3,
        "the read hit the write's entry"
    );

    let writable = {
        let mut m = b.memslots()[0];
        m.flags = MemslotFlags::empty();
        m
    };
    set_slot(b, writable).unwrap();
    twice(&mut *vcpu, 0xffe0_1000, true, RAM);
}

/// With the cache off every exit searches the memslots, with the same
/// answers: the "before" of the MMIO bench.
#[test]
fn cache_off_searches_every_time() {
    let vm = Vm::with_config(EptConfig::default().with_mmio_cache(false));
    add_ram(&vm.backend, leak_ram(PAGE), 0, 0, MemslotFlags::READONLY).unwrap();
    let mut vcpu = vm.vcpu(0);
    for _ in 0..5 {
        assert_eq!(vcpu.classify_mmio(Gpa(0x10_0000), true), MmioClass::Mmio);
        assert_eq!(
            vcpu.classify_mmio(Gpa(0x10), true),
            MmioClass::ReadOnlyWrite { slot: SlotId(0) }
        );
    }
    assert_eq!(vm.stat("mmio_cache_hits"), 0);
    assert_eq!(vm.stat("mmio_cache_misses"), 10);
}

/// The cache is bounded: with one entry, two pages evict each other.
#[test]
fn the_cache_is_bounded() {
    let mut config = EptConfig::default();
    config.mmio_cache_entries = 1;
    let vm = Vm::with_config(config);
    let mut vcpu = vm.vcpu(0);
    for _ in 0..4 {
        vcpu.classify_mmio(Gpa(0xa000), false);
        vcpu.classify_mmio(Gpa(0xb000), false);
    }
    assert_eq!(vm.stat("mmio_cache_hits"), 0);
    vcpu.classify_mmio(Gpa(0xb008), false);
    assert_eq!(vm.stat("mmio_cache_hits"), 1);
}

/// Zap-all drops every vCPU's cache; each vCPU has its own cache, and the
/// backend's stats add them up.
#[test]
fn zap_all_drops_per_vcpu_caches() {
    let vm = Vm::new();
    let mut v0 = vm.vcpu(0);
    let mut v1 = vm.vcpu(1);
    v0.classify_mmio(Gpa(0xd000), false);
    v0.classify_mmio(Gpa(0xd000), false);
    v1.classify_mmio(Gpa(0xd000), false);
    assert_eq!(
        (vm.stat("mmio_cache_misses"), vm.stat("mmio_cache_hits")),
        (2, 1),
        "v1 did not see v0's entry"
    );
    vm.backend.zap_all();
    v0.classify_mmio(Gpa(0xd000), false);
    v1.classify_mmio(Gpa(0xd000), false);
    assert_eq!(vm.stat("mmio_cache_misses"), 4);
}

/// A refused memslot change restores the old generation; the answers
/// cached under it are still right and still hit.
#[test]
fn refused_change_keeps_cached_answers() {
    let vm = Vm::new();
    let mut vcpu = vm.vcpu(0);
    twice(&mut *vcpu, 0x10_0000, false, MmioClass::Mmio);
    vm.hv.refuse_next(12);
    add_ram(
        &vm.backend,
        leak_ram(PAGE),
        0,
        0x10_0000,
        MemslotFlags::empty(),
    )
    .unwrap_err();
    twice(&mut *vcpu, 0x10_0000, false, MmioClass::Mmio);
    assert_eq!(vm.stat("mmio_cache_hits"), 3);
}

/// During a memslot update (generation with the in-progress bit) the cache
/// is neither trusted nor filled: every exit searches the table, and what
/// it finds is not kept. After the update the new answer is cached.
#[test]
fn update_in_progress_is_never_trusted() {
    let hv = Arc::new(GatedHypervisor::new());
    let backend = EptBackend::new(EptConfig::default(), hv.clone());
    let mut vcpu = backend
        .create_vcpu(VcpuId(0), Arc::new(CountingKick::default()))
        .unwrap();
    let stat = |name| backend.stats().get(name).unwrap();
    let gpa = Gpa(0x10_0000);
    assert_eq!(vcpu.classify_mmio(gpa, false), MmioClass::Mmio);
    assert_eq!(vcpu.classify_mmio(gpa, false), MmioClass::Mmio);
    assert_eq!(stat("mmio_cache_hits"), 1);

    hv.arm();
    let ram = leak_ram(PAGE);
    std::thread::scope(|s| {
        let updater = s.spawn(|| add_ram(&backend, ram, 0, 0x10_0000, MemslotFlags::empty()));
        hv.entered.wait();
        assert!(backend.memslot_generation().update_in_progress());
        for _ in 0..3 {
            // The hypervisor has not applied the slot yet, and the table
            // swap comes after it: still MMIO, but searched every time.
            assert_eq!(vcpu.classify_mmio(gpa, false), MmioClass::Mmio);
        }
        assert_eq!(stat("mmio_cache_hits"), 1, "no hit during the update");
        assert_eq!(stat("mmio_cache_misses"), 4);
        hv.release.wait();
        updater.join().unwrap().unwrap();
    });
    assert_eq!(vcpu.classify_mmio(gpa, false), RAM);
    assert_eq!(vcpu.classify_mmio(gpa, false), RAM);
    assert_eq!(stat("mmio_cache_misses"), 5);
    assert_eq!(stat("mmio_cache_hits"), 2);
}

/// Concurrent vCPU threads classify while the memslots churn; every answer
/// is one the memslots gave at some point (never a page the slot never
/// covered), and once the churn stops each vCPU's answer is the final one.
#[test]
fn classification_under_memslot_churn() {
    let vm = Vm::new();
    let b = &vm.backend;
    let ram = leak_ram(PAGE);
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        for id in 0..2 {
            let done = &done;
            let mut vcpu = vm.vcpu(id);
            s.spawn(move || {
                while !done.load(std::sync::atomic::Ordering::Acquire) {
                    let class = vcpu.classify_mmio(Gpa(0x5000), false);
                    assert!(matches!(class, MmioClass::Mmio | RAM), "{class:?}");
                    assert_eq!(vcpu.classify_mmio(Gpa(0x6000), false), MmioClass::Mmio);
                }
                assert_eq!(vcpu.classify_mmio(Gpa(0x5000), false), RAM);
            });
        }
        for _ in 0..200 {
            add_ram(b, ram, 0, 0x5000, MemslotFlags::empty()).unwrap();
            b.delete_memslot(SlotId(0)).unwrap();
        }
        add_ram(b, ram, 0, 0x5000, MemslotFlags::empty()).unwrap();
        done.store(true, std::sync::atomic::Ordering::Release);
    });
}
