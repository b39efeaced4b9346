//! Guest-physical memory read through the memslots' host mappings.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::addr::Gpa;
use crate::memslot::{MemslotFlags, MemslotTable};

use super::mem::{GuestPhysMemory, PhysMemError};

/// A [`GuestPhysMemory`] over a [`MemslotTable`]: every access goes through
/// the host mapping of the slot that holds the address, with 64-bit atomic
/// operations (the guest may be writing the same entry on another CPU).
///
/// Compare-and-exchange on a READONLY slot fails with
/// [`PhysMemError::Unbacked`]: the guest cannot write there, so neither can
/// its page walker.
#[derive(Debug)]
pub struct SlotMemory<'a> {
    slots: &'a MemslotTable,
}

impl<'a> SlotMemory<'a> {
    /// A port over `slots`.
    ///
    /// # Safety
    ///
    /// For as long as the port lives, every slot in `slots` must have a host
    /// mapping (`backing.host_addr`) that is valid for reads and writes of
    /// `size` bytes and aligned to 8 bytes. This is the promise a VMM makes
    /// when it registers a memslot with a backend.
    pub unsafe fn new(slots: &'a MemslotTable) -> Self {
        SlotMemory { slots }
    }

    fn word(&self, gpa: Gpa, for_write: bool) -> Result<&AtomicU64, PhysMemError> {
        if !gpa.raw().is_multiple_of(8) {
            return Err(PhysMemError::Misaligned(gpa));
        }
        let slot = self.slots.find(gpa).ok_or(PhysMemError::Unbacked(gpa))?;
        if for_write && slot.flags.contains(MemslotFlags::READONLY) {
            return Err(PhysMemError::Unbacked(gpa));
        }
        let host = slot.host_addr_of(gpa).ok_or(PhysMemError::Unbacked(gpa))?;
        let ptr = host.0 as *mut u64;
        // SAFETY: `new`'s contract makes the slot's host mapping valid and
        // 8-byte aligned for its whole size while `self` lives; `gpa` lies in
        // the slot and is 8-byte aligned, so `ptr` points to 8 valid,
        // aligned bytes. All accesses through the port are atomic, and the
        // guest's own accesses are hardware-atomic for aligned u64s.
        Ok(unsafe { AtomicU64::from_ptr(ptr) })
    }
}

impl GuestPhysMemory for SlotMemory<'_> {
    fn read_u64(&self, gpa: Gpa) -> Result<u64, PhysMemError> {
        Ok(self.word(gpa, false)?.load(Ordering::Acquire))
    }

    fn compare_exchange_u64(
        &self,
        gpa: Gpa,
        current: u64,
        new: u64,
    ) -> Result<Result<(), u64>, PhysMemError> {
        Ok(self
            .word(gpa, true)?
            .compare_exchange(current, new, Ordering::AcqRel, Ordering::Acquire)
            .map(|_| ()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::{Hpa, SlotId};
    use crate::memslot::{HostBacking, HostVirtAddr, Memslot};

    #[test]
    fn reads_and_cmpxchg_through_host_memory() {
        let mut backing = vec![0u64; 1024]; // two pages
        backing[513] = 0xabcd;
        let host = backing.as_mut_ptr() as u64;
        let mut table = MemslotTable::new(40, 4);
        let mut slot = Memslot {
            id: SlotId(0),
            guest_base: Gpa(0x10_0000),
            size: 0x1000,
            backing: HostBacking {
                hpa: Hpa(0),
                // The page-aligned page inside the vector.
                host_addr: HostVirtAddr((host + 0xfff) & !0xfff),
            },
            flags: MemslotFlags::empty(),
        };
        let aligned = slot.backing.host_addr.0;
        table.set(slot).unwrap();
        let word = ((aligned - host) / 8) as usize;
        backing[word + 3] = 0x1234;
        // SAFETY: the slot's host mapping is one page inside `backing`,
        // which outlives `mem`.
        let mem = unsafe { SlotMemory::new(&table) };
        assert_eq!(mem.read_u64(Gpa(0x10_0018)), Ok(0x1234));
        assert_eq!(
            mem.read_u64(Gpa(0x10_1000)),
            Err(PhysMemError::Unbacked(Gpa(0x10_1000)))
        );
        assert_eq!(
            mem.compare_exchange_u64(Gpa(0x10_0018), 0x1234, 7),
            Ok(Ok(()))
        );
        assert_eq!(
            mem.compare_exchange_u64(Gpa(0x10_0018), 0x1234, 8),
            Ok(Err(7))
        );
        assert_eq!(backing[word + 3], 7);
        slot.flags = MemslotFlags::READONLY;
        table.set(slot).unwrap();
        // SAFETY: as above.
        let mem = unsafe { SlotMemory::new(&table) };
        assert_eq!(
            mem.compare_exchange_u64(Gpa(0x10_0018), 7, 9),
            Err(PhysMemError::Unbacked(Gpa(0x10_0018)))
        );
    }
}
