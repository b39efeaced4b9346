//! The guest-physical memory port the walker reads tables through.

use crate::addr::Gpa;

/// Why the walker could not reach a guest-physical address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PhysMemError {
    /// No memory is backed at this address (it is MMIO or outside every
    /// memslot).
    #[error("no memory at guest-physical address {0}")]
    Unbacked(Gpa),
    /// The address is not 8-byte aligned.
    #[error("guest-physical address {0} is not 8-byte aligned")]
    Misaligned(Gpa),
}

/// A small port onto guest-physical memory: what a page-table walker needs.
///
/// Accesses are 8 bytes wide and 8-byte aligned. 32-bit paging reads the
/// aligned 8 bytes that contain its 4-byte entry and updates only its half.
pub trait GuestPhysMemory {
    /// Reads the aligned u64 at `gpa` (little endian, as the guest sees it).
    fn read_u64(&self, gpa: Gpa) -> Result<u64, PhysMemError>;

    /// Atomically replaces the u64 at `gpa` with `new` if it still holds
    /// `current`. Returns `Ok(Ok(()))` on success and `Ok(Err(actual))` when
    /// another writer got there first. This is how the walker sets A and D
    /// bits without losing a concurrent guest write.
    fn compare_exchange_u64(
        &self,
        gpa: Gpa,
        current: u64,
        new: u64,
    ) -> Result<Result<(), u64>, PhysMemError>;
}

impl<T: GuestPhysMemory + ?Sized> GuestPhysMemory for &T {
    fn read_u64(&self, gpa: Gpa) -> Result<u64, PhysMemError> {
        (**self).read_u64(gpa)
    }

    fn compare_exchange_u64(
        &self,
        gpa: Gpa,
        current: u64,
        new: u64,
    ) -> Result<Result<(), u64>, PhysMemError> {
        (**self).compare_exchange_u64(gpa, current, new)
    }
}

/// Writes `data` at `gpa` through `mem` with one compare-and-exchange per
/// 8-byte word, so a concurrent writer to the other bytes of a word is not
/// lost. Misaligned and short writes are fine; they are not atomic as a
/// whole (neither are the CPU's).
pub fn write_bytes<M: GuestPhysMemory + ?Sized>(
    mem: &M,
    gpa: Gpa,
    data: &[u8],
) -> Result<(), PhysMemError> {
    let start = gpa.raw();
    let end = start + data.len() as u64;
    let mut word = start & !7;
    while word < end {
        loop {
            let old = mem.read_u64(Gpa(word))?;
            let mut bytes = old.to_le_bytes();
            for (i, b) in bytes.iter_mut().enumerate() {
                let a = word + i as u64;
                if (start..end).contains(&a) {
                    *b = data[(a - start) as usize];
                }
            }
            if mem
                .compare_exchange_u64(Gpa(word), old, u64::from_le_bytes(bytes))?
                .is_ok()
            {
                break;
            }
        }
        word += 8;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Gfn;
    use crate::paging::SparseMemory;

    #[test]
    fn unbacked_and_misaligned_are_errors() {
        let mem = SparseMemory::new();
        assert_eq!(
            mem.read_u64(Gpa(0x1000)),
            Err(PhysMemError::Unbacked(Gpa(0x1000)))
        );
        mem.add_frame(Gfn(1));
        assert_eq!(mem.read_u64(Gpa(0x1000)), Ok(0));
        assert_eq!(
            mem.read_u64(Gpa(0x1004)),
            Err(PhysMemError::Misaligned(Gpa(0x1004)))
        );
    }

    #[test]
    fn cmpxchg_and_u32_halves() {
        let mem = SparseMemory::new();
        mem.add_frame(Gfn(0));
        mem.write_u32(Gpa(4), 0xdead_beef).unwrap();
        mem.write_u32(Gpa(0), 0x1234_5678).unwrap();
        assert_eq!(mem.read_u64(Gpa(0)), Ok(0xdead_beef_1234_5678));
        assert_eq!(
            mem.compare_exchange_u64(Gpa(0), 1, 2),
            Ok(Err(0xdead_beef_1234_5678))
        );
        assert_eq!(
            mem.compare_exchange_u64(Gpa(0), 0xdead_beef_1234_5678, 7),
            Ok(Ok(()))
        );
        assert_eq!(mem.read_u64(Gpa(0)), Ok(7));
        mem.remove_frame(Gfn(0));
        assert!(!mem.is_backed(Gfn(0)));
    }
}
