//! Memslot layouts shared by the shadow and EPT benches.

use std::io;

use mmu_api::{Gpa, Hpa, Memslot, MemslotChange, MemslotError, MemslotFlags, MmuBackend, SlotId};

use super::memory::GuestMemory;

/// Where the "hardware" sees guest RAM (slot 0) in the shadow benches: any
/// address below the host MAXPHYADDR that is not the shadow pool.
pub const RAM_HPA: Hpa = Hpa(0x10_0000_0000);

/// Guest-physical base of the extra one-page memslots.
pub const EXTRA_SLOT_GPA: u64 = 0x80_0000_0000;

/// Guest-physical distance between two extra memslots.
pub const EXTRA_SLOT_STRIDE: u64 = 0x20_0000;

/// Where the hardware sees the extra memslots' memory.
pub const EXTRA_SLOT_HPA: Hpa = Hpa(0x20_0000_0000);

/// A guest-physical page no memslot covers: a device register page, above
/// RAM and above every extra memslot.
pub const MMIO_GPA: Gpa = Gpa(0xc0_0000_0000);

/// Registers `slot` with `backend`. Panics unless the slot's host range
/// lies inside `memory`.
///
/// Safe because the memory is `'static`: it stays mapped however long the
/// backend keeps the slot.
pub fn add_slot(
    backend: &dyn MmuBackend,
    memory: &'static GuestMemory,
    slot: Memslot,
) -> Result<MemslotChange, MemslotError> {
    let start = memory.host_addr().0;
    let host = slot.backing.host_addr.0;
    assert!(
        host >= start && host.saturating_add(slot.size) <= start + memory.size(),
        "memslot {:?} is not backed by this guest memory",
        slot.id
    );
    // SAFETY: the slot's host range lies inside `memory` (checked above), a
    // `'static` mapping that is never unmapped, so it outlives every use the
    // backend makes of it.
    unsafe { backend.set_memslot(slot) }
}

/// Adds memslots `1..total` (so that, with RAM as slot 0, the backend holds
/// `total` memslots): one page each, at [`EXTRA_SLOT_GPA`] plus multiples of
/// [`EXTRA_SLOT_STRIDE`], backed by fresh static memory.
pub fn add_extra_slots(backend: &dyn MmuBackend, total: u32) -> io::Result<()> {
    let extra = u64::from(total.saturating_sub(1));
    if extra == 0 {
        return Ok(());
    }
    let memory = GuestMemory::new(extra * mmu_api::PAGE_SIZE)?;
    for i in 0..extra {
        let slot = memory.memslot(
            SlotId(1 + i as u32),
            Gpa(EXTRA_SLOT_GPA + i * EXTRA_SLOT_STRIDE),
            i,
            1,
            Hpa(EXTRA_SLOT_HPA.raw() + i * mmu_api::PAGE_SIZE),
            MemslotFlags::empty(),
        );
        add_slot(backend, memory, slot).map_err(io::Error::other)?;
    }
    Ok(())
}
