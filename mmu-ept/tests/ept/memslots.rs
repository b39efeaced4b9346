//! Memslot add / move / flag change / delete: typed errors, the hypervisor
//! mirror, and the generation protocol.

use std::sync::Arc;

use mmu_api::{
    BackendError, Gpa, HostBacking, HostVirtAddr, Hpa, MemslotChange, MemslotError, MemslotFlags,
    MemslotGeneration, MmuBackend, SlotId, VcpuId,
};
use mmu_ept::{EptBackend, EptConfig};

use crate::common::{GatedHypervisor, PAGE, Vm, add_ram, leak_ram, set_slot};

/// Every refused change leaves the backend, the hypervisor and the
/// generation exactly as they were, and the error says why.
#[test]
fn refused_changes_get_typed_errors_and_change_nothing() {
    let mut config = EptConfig::default();
    config.max_slots = 2;
    config.gpa_width = 36;
    let vm = Vm::with_config(config);
    let b = &vm.backend;
    let ram = leak_ram(4 * PAGE);
    let small = leak_ram(PAGE);
    add_ram(b, ram, 0, 0x10_0000, MemslotFlags::empty()).unwrap();

    let before = (b.memslots(), b.memslot_generation(), vm.hv.calls());
    let check_untouched = |what: &str| {
        assert_eq!(
            (b.memslots(), b.memslot_generation(), vm.hv.calls()),
            before,
            "{what} changed state"
        );
    };

    assert_eq!(
        add_ram(b, small, 1, 0x10_3000, MemslotFlags::empty()),
        Err(MemslotError::Overlap {
            slot: SlotId(1),
            other: SlotId(0),
            at: Gpa(0x10_3000)
        })
    );
    check_untouched("overlap");
    assert_eq!(
        b.delete_memslot(SlotId(7)),
        Err(MemslotError::UnknownSlot(SlotId(7)))
    );
    check_untouched("unknown delete");

    // A live slot may not change size or backing, nor move and change
    // flags at once.
    let live = b.memslots()[0];
    let mut shrunk = live;
    shrunk.size = PAGE;
    assert_eq!(
        set_slot(b, shrunk),
        Err(MemslotError::IllegalChange(SlotId(0)))
    );
    let mut rebacked = live;
    rebacked.backing = small
        .memslot(SlotId(0), live.guest_base, live.flags)
        .backing;
    rebacked.size = small.size();
    assert_eq!(
        set_slot(b, rebacked),
        Err(MemslotError::IllegalChange(SlotId(0)))
    );
    let mut both = live;
    both.guest_base = Gpa(0x20_0000);
    both.flags = MemslotFlags::READONLY;
    assert_eq!(
        set_slot(b, both),
        Err(MemslotError::IllegalChange(SlotId(0)))
    );
    check_untouched("illegal change");

    assert_eq!(
        add_ram(b, small, 1, 0x800, MemslotFlags::empty()),
        Err(MemslotError::Unaligned(SlotId(1)))
    );
    assert!(matches!(
        add_ram(b, small, 1, 1 << 36, MemslotFlags::empty()),
        Err(MemslotError::TooLarge {
            slot: SlotId(1),
            width: 36,
            ..
        })
    ));
    let mut empty = small.memslot(SlotId(1), Gpa(0), MemslotFlags::empty());
    empty.size = 0;
    assert_eq!(set_slot(b, empty), Err(MemslotError::ZeroSize(SlotId(1))));
    let null = {
        let mut m = small.memslot(SlotId(1), Gpa(0), MemslotFlags::empty());
        m.backing = HostBacking {
            hpa: Hpa(0),
            host_addr: HostVirtAddr(0),
        };
        m
    };
    // SAFETY: the backend refuses this slot before it could use its
    // (null) host address.
    let refused = unsafe { b.set_memslot(null) };
    assert_eq!(refused, Err(MemslotError::InvalidBacking(SlotId(1))));
    check_untouched("bad shape");

    add_ram(b, small, 1, 0, MemslotFlags::empty()).unwrap();
    assert_eq!(
        add_ram(b, leak_ram(PAGE), 2, 0x20_0000, MemslotFlags::empty()),
        Err(MemslotError::TooManySlots(2))
    );
}

/// Created, moved, flags changed, unchanged and deleted are reported as
/// `MemslotTable::set` reports them; the hypervisor holds the same regions
/// as the backend after each; the generation advances once per real
/// change and never for an unchanged slot.
#[test]
fn changes_are_reported_mirrored_and_counted() {
    let vm = Vm::new();
    let b = &vm.backend;
    let ram = leak_ram(2 * PAGE);
    let generation = || b.memslot_generation();
    let mirrored = || assert_eq!(vm.hv.regions(), b.memslots());
    assert_eq!(generation(), MemslotGeneration(0));

    let slot = ram.memslot(SlotId(3), Gpa(0x4000), MemslotFlags::empty());
    assert_eq!(set_slot(b, slot), Ok(MemslotChange::Created));
    mirrored();
    assert_eq!(generation(), MemslotGeneration(1));

    let calls = vm.hv.calls();
    assert_eq!(set_slot(b, slot), Ok(MemslotChange::Unchanged));
    assert_eq!(generation(), MemslotGeneration(1));
    assert_eq!(vm.hv.calls(), calls, "nothing to tell the hypervisor");

    let moved = {
        let mut m = slot;
        m.guest_base = Gpa(0x8000);
        m
    };
    assert_eq!(set_slot(b, moved), Ok(MemslotChange::Moved { old: slot }));
    mirrored();
    let ro = {
        let mut m = moved;
        m.flags = MemslotFlags::READONLY;
        m
    };
    assert_eq!(
        set_slot(b, ro),
        Ok(MemslotChange::FlagsChanged { old: moved })
    );
    mirrored();
    assert_eq!(generation(), MemslotGeneration(3));

    assert_eq!(b.delete_memslot(SlotId(3)), Ok(ro));
    mirrored();
    assert!(b.memslots().is_empty());
    assert_eq!(generation(), MemslotGeneration(4));
    assert_eq!(vm.stat("memslot_updates"), 4);
}

/// A change the hypervisor refuses comes back as
/// `MemslotError::Hypervisor`, and the backend keeps the old table and the
/// old generation, with no update-in-progress bit left behind.
#[test]
fn hypervisor_refusal_restores_everything() {
    let vm = Vm::new();
    let b = &vm.backend;
    let ram = leak_ram(PAGE);
    add_ram(b, ram, 0, 0, MemslotFlags::empty()).unwrap();
    let before = (b.memslots(), b.memslot_generation());

    vm.hv.refuse_next(12); // ENOMEM
    let err = add_ram(b, leak_ram(PAGE), 1, 0x10_0000, MemslotFlags::empty()).unwrap_err();
    assert!(
        matches!(&err, MemslotError::Hypervisor(msg) if msg.to_string().contains("slot 1")),
        "{err}"
    );
    assert_eq!((b.memslots(), b.memslot_generation()), before);

    vm.hv.refuse_next(22);
    assert!(matches!(
        b.delete_memslot(SlotId(0)),
        Err(MemslotError::Hypervisor(_))
    ));
    assert_eq!((b.memslots(), b.memslot_generation()), before);
    assert!(!b.memslot_generation().update_in_progress());
    assert_eq!(vm.hv.regions(), b.memslots());
    assert_eq!(vm.stat("memslot_updates"), 1);
}

/// While the hypervisor is applying a change the generation carries the
/// update-in-progress bit with the old count; afterwards the count has
/// advanced by one and the bit is clear.
#[test]
fn generation_is_in_progress_while_the_hypervisor_works() {
    let hv = Arc::new(GatedHypervisor::new());
    let backend = EptBackend::new(EptConfig::default(), hv.clone());
    let ram = leak_ram(PAGE);
    for (round, delete) in [(0u64, false), (1, true)] {
        hv.arm();
        std::thread::scope(|s| {
            let updater = s.spawn(|| {
                if delete {
                    backend.delete_memslot(SlotId(0)).map(drop)
                } else {
                    add_ram(&backend, ram, 0, 0, MemslotFlags::empty()).map(drop)
                }
            });
            hv.entered.wait();
            let mid = backend.memslot_generation();
            assert!(mid.update_in_progress());
            assert_eq!(mid.count(), round);
            hv.release.wait();
            updater.join().unwrap().unwrap();
        });
        assert_eq!(backend.memslot_generation(), MemslotGeneration(round + 1));
    }
}

/// The parts of `MmuBackend` that are not about memslots: the name, the
/// page limit that does not apply, vCPU ids, and the stats layout.
#[test]
fn backend_basics() {
    let vm = Vm::new();
    let b = &vm.backend;
    assert_eq!(b.name(), "ept");
    assert_eq!(b.page_limit(), None);
    assert_eq!(b.set_page_limit(None), Ok(()));
    let err = b.set_page_limit(Some(64)).unwrap_err();
    assert_eq!(
        err,
        BackendError::Unsupported {
            backend: "ept",
            what: "a page limit"
        }
    );
    assert_eq!(
        err.to_string(),
        "the ept backend does not support a page limit"
    );

    let v0 = vm.vcpu(0);
    assert_eq!(v0.id(), VcpuId(0));
    assert_eq!(
        b.create_vcpu(VcpuId(0), vm.kick.clone()).unwrap_err(),
        BackendError::VcpuExists(VcpuId(0))
    );
    drop(v0);
    assert!(
        b.create_vcpu(VcpuId(0), vm.kick.clone()).is_err(),
        "ids stay taken after the vCPU is dropped"
    );

    let stats = b.stats();
    assert_eq!(stats.backend, "ept");
    let names: Vec<_> = stats.counters.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        names,
        [
            "mmio_cache_hits",
            "mmio_cache_misses",
            "translations",
            "tlb_hits",
            "tlb_misses",
            "tlb_flushes",
            "page_faults_reflected",
            "memslot_updates",
            "dirty_pages_harvested",
            "host_writes_noted",
            "zap_alls",
        ]
    );
    assert!(format!("{b:?}").contains("EptBackend"));
}

/// Memslot changes and zap-all never need a vCPU kicked under EPT.
#[test]
fn nothing_ever_kicks() {
    let vm = Vm::new();
    let b = &vm.backend;
    let mut vcpu = vm.vcpu(0);
    vcpu.prepare_entry().unwrap();
    add_ram(b, leak_ram(PAGE), 0, 0, MemslotFlags::empty()).unwrap();
    b.zap_all();
    b.delete_memslot(SlotId(0)).unwrap();
    vcpu.exit_guest();
    assert_eq!(vm.kick.0.load(std::sync::atomic::Ordering::Relaxed), 0);
    assert_eq!(vm.stat("zap_alls"), 1);
}
