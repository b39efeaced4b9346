//! Dirty logging: the hypervisor's log of guest writes merged with the
//! VMM's own writes, nothing lost across harvests.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};

use mmu_api::{Gpa, MemslotError, MemslotFlags, MmuBackend, SlotId};

use crate::common::{PAGE, Vm, add_ram, leak_ram, set_slot};

fn dirty(b: &dyn MmuBackend, id: u32) -> Vec<u64> {
    b.get_dirty_log(SlotId(id)).unwrap().iter_dirty().collect()
}

/// Guest writes (the hypervisor's log) and VMM writes (noted) come back in
/// one bitmap, in KVM's layout, and the harvest clears both.
#[test]
fn harvest_merges_guest_and_host_writes() {
    let vm = Vm::new();
    let b = &vm.backend;
    add_ram(
        b,
        leak_ram(100 * PAGE),
        0,
        0x10_0000,
        MemslotFlags::LOG_DIRTY,
    )
    .unwrap();
    vm.hv.guest_write(Gpa(0x10_1000), 8); // page 1
    vm.hv.guest_write(Gpa(0x14_0ffc), 8); // pages 64 and 65
    b.note_host_write(Gpa(0x10_1800), 4); // page 1 again
    b.note_host_write(Gpa(0x10_2ff8), 0x1010); // pages 2, 3 and 4
    b.note_host_write(Gpa(0x16_3000), 1); // page 99

    let log = b.get_dirty_log(SlotId(0)).unwrap();
    assert_eq!(log.pages(), 100);
    assert_eq!(
        log.iter_dirty().collect::<Vec<_>>(),
        [1, 2, 3, 4, 64, 65, 99]
    );
    assert_eq!(log.words(), [0b11110, 0b11 | (1 << 35)]);
    assert!(dirty(b, 0).is_empty(), "the harvest cleared both logs");
    assert_eq!(vm.stat("dirty_pages_harvested"), 7);
    assert_eq!(vm.stat("host_writes_noted"), 3);
}

/// One host write across two logging slots and the hole between them
/// marks the pages of both slots; a slot without logging and MMIO are
/// ignored; an empty write marks nothing.
#[test]
fn host_writes_span_slots_and_holes() {
    let vm = Vm::new();
    let b = &vm.backend;
    add_ram(b, leak_ram(4 * PAGE), 0, 0, MemslotFlags::LOG_DIRTY).unwrap();
    add_ram(b, leak_ram(4 * PAGE), 1, 0x8000, MemslotFlags::LOG_DIRTY).unwrap();
    add_ram(b, leak_ram(4 * PAGE), 2, 0xc000, MemslotFlags::empty()).unwrap();
    b.note_host_write(Gpa(0x3000), 0x6000); // slot 0 page 3, hole, slot 1 pages 0..=0
    b.note_host_write(Gpa(0xbfff), 0x4000); // slot 1 page 3, slot 2 (not logging)
    b.note_host_write(Gpa(0xf_0000), 0x100); // MMIO
    b.note_host_write(Gpa(0x2000), 0); // nothing
    assert_eq!(dirty(b, 0), [3]);
    assert_eq!(dirty(b, 1), [0, 3]);
    assert_eq!(vm.stat("host_writes_noted"), 3);
}

/// A harvest the hypervisor refuses keeps the VMM's noted writes for the
/// next one (the hypervisor keeps its own log, as KVM does on error).
#[test]
fn refused_harvest_loses_nothing() {
    let vm = Vm::new();
    let b = &vm.backend;
    add_ram(b, leak_ram(8 * PAGE), 0, 0, MemslotFlags::LOG_DIRTY).unwrap();
    b.note_host_write(Gpa(0x5000), 1);
    vm.hv.guest_write(Gpa(0x6000), 1);
    vm.hv.refuse_next(14); // EFAULT
    assert!(matches!(
        b.get_dirty_log(SlotId(0)),
        Err(MemslotError::Hypervisor(_))
    ));
    assert_eq!(dirty(b, 0), [5, 6]);
}

/// Logging follows the flags: turning it on starts clean, a move keeps
/// the pending pages (they are slot-relative), turning it off refuses
/// harvests, and deleting the slot makes it unknown.
#[test]
fn logging_follows_flags_moves_and_deletes() {
    let vm = Vm::new();
    let b = &vm.backend;
    add_ram(b, leak_ram(4 * PAGE), 0, 0, MemslotFlags::empty()).unwrap();
    b.note_host_write(Gpa(0), 1); // before logging: not recorded
    let err = b.get_dirty_log(SlotId(0)).unwrap_err();
    assert_eq!(err, MemslotError::NotLogging(SlotId(0)));

    let slot = b.memslots()[0];
    let logging = {
        let mut m = slot;
        m.flags = MemslotFlags::LOG_DIRTY;
        m
    };
    set_slot(b, logging).unwrap();
    assert!(dirty(b, 0).is_empty(), "logging starts clean");
    b.note_host_write(Gpa(0x1000), 1);
    vm.hv.guest_write(Gpa(0x2000), 1);

    let moved = {
        let mut m = logging;
        m.guest_base = Gpa(0x10_0000);
        m
    };
    set_slot(b, moved).unwrap();
    b.note_host_write(Gpa(0x10_3000), 1);
    b.note_host_write(Gpa(0x1000), 1); // the old place: now MMIO
    assert_eq!(dirty(b, 0), [1, 2, 3]);

    set_slot(b, {
        let mut m = moved;
        m.flags = MemslotFlags::empty();
        m
    })
    .unwrap();
    assert!(b.get_dirty_log(SlotId(0)).is_err());
    b.delete_memslot(SlotId(0)).unwrap();
    assert_eq!(
        b.get_dirty_log(SlotId(0)),
        Err(MemslotError::UnknownSlot(SlotId(0)))
    );
}

/// Writers on several threads (the VMM's device models noting writes, the
/// guest's writes logged by the hypervisor) race with a thread harvesting
/// in a loop. Every page written is reported by exactly one harvest.
#[test]
fn nothing_is_lost_across_concurrent_harvests() {
    const PAGES: u64 = 2048;
    let vm = Vm::new();
    let b = &vm.backend;
    add_ram(b, leak_ram(PAGES * PAGE), 0, 0, MemslotFlags::LOG_DIRTY).unwrap();
    let writers_done = AtomicBool::new(false);
    let mut seen = BTreeSet::new();
    std::thread::scope(|s| {
        let host = s.spawn(|| {
            for page in (0..PAGES).filter(|p| p % 3 != 0) {
                b.note_host_write(Gpa(page * PAGE + 8), 8);
            }
        });
        let guest = s.spawn(|| {
            for page in (0..PAGES).filter(|p| p % 3 == 0) {
                vm.hv.guest_write(Gpa(page * PAGE), 8);
            }
        });
        let harvester = s.spawn(|| {
            let mut seen = Vec::new();
            loop {
                let finished = writers_done.load(Ordering::Acquire);
                seen.extend(b.get_dirty_log(SlotId(0)).unwrap().iter_dirty());
                if finished {
                    return seen;
                }
            }
        });
        host.join().unwrap();
        guest.join().unwrap();
        writers_done.store(true, Ordering::Release);
        for page in harvester.join().unwrap() {
            assert!(seen.insert(page), "page {page} reported twice");
        }
    });
    assert_eq!(seen.len() as u64, PAGES, "every written page was harvested");
    assert_eq!(vm.stat("dirty_pages_harvested"), PAGES);
}

/// Writes the VMM's instruction emulator makes through a vCPU reach guest
/// memory and the dirty log; bad targets get typed errors.
#[test]
fn emulated_writes_are_logged() {
    let vm = Vm::new();
    let b = &vm.backend;
    let ram = leak_ram(4 * PAGE);
    add_ram(b, ram, 0, 0, MemslotFlags::LOG_DIRTY).unwrap();
    add_ram(b, leak_ram(PAGE), 1, 0x10_0000, MemslotFlags::READONLY).unwrap();
    let mut vcpu = vm.vcpu(0);
    vcpu.write_guest(Gpa(0x2004), &[0xaa, 0xbb]).unwrap();
    assert_eq!(ram.read_u64(0x2000), 0xbbaa_0000_0000);
    assert_eq!(dirty(b, 0), [2]);
    assert_eq!(
        vcpu.write_guest(Gpa(0x1ffc), &[0; 8]),
        Err(mmu_api::VcpuError::CrossesPage {
            gpa: Gpa(0x1ffc),
            len: 8
        })
    );
    assert_eq!(
        vcpu.write_guest(Gpa(0x10_0000), &[1]),
        Err(mmu_api::VcpuError::ReadOnly(Gpa(0x10_0000)))
    );
    assert_eq!(
        vcpu.write_guest(Gpa(0x20_0000), &[1]),
        Err(mmu_api::VcpuError::Unbacked(Gpa(0x20_0000)))
    );
}
