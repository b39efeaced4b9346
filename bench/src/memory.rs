//! Guest RAM for the benches: an anonymous host mapping that is never
//! unmapped.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use mmu_api::{Gpa, HostBacking, HostVirtAddr, Hpa, Memslot, MemslotFlags, PAGE_SIZE, SlotId};

/// Page-aligned, zero-filled host memory that backs guest RAM.
///
/// The mapping is anonymous and `MAP_NORESERVE`: a page is committed when it
/// is first written, so a 1 GiB guest whose data pages are only read costs
/// about the memory of its page tables. It is never unmapped, which is why
/// [`GuestMemory::new`] hands out a `&'static` reference: a memslot built
/// from it ([`GuestMemory::memslot`]) stays valid however long a backend
/// keeps it, the contract of `MmuBackend::set_memslot`.
///
/// Every access, the bench's and the backends', is a 64-bit atomic one.
#[derive(Debug)]
pub struct GuestMemory {
    words: &'static [AtomicU64],
}

impl GuestMemory {
    /// Maps `size` bytes (rounded up to whole pages, at least one) for the
    /// rest of the process.
    pub fn new(size: u64) -> io::Result<&'static GuestMemory> {
        let size = size.div_ceil(PAGE_SIZE).max(1) * PAGE_SIZE;
        let len = usize::try_from(size).map_err(|_| io::Error::other("guest memory too large"))?;
        // SAFETY: an anonymous private mapping at an address of the kernel's
        // choosing touches no memory this process already uses; the result
        // is checked against MAP_FAILED below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `ptr` is a fresh, page-aligned (so 8-byte aligned),
        // readable and writable mapping of `len` bytes, zero-filled (zero is
        // a valid `AtomicU64`). It is never unmapped, so it lives for
        // `'static`; no other Rust reference to it exists, and the backends
        // reach it only through raw pointers with atomic operations, which
        // `AtomicU64`'s interior mutability allows.
        let words = unsafe { std::slice::from_raw_parts(ptr.cast::<AtomicU64>(), len / 8) };
        Ok(Box::leak(Box::new(GuestMemory { words })))
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.words.len() as u64 * 8
    }

    /// Size in 4 KiB pages.
    pub fn pages(&self) -> u64 {
        self.size() / PAGE_SIZE
    }

    /// The address of the first byte in this process.
    pub fn host_addr(&self) -> HostVirtAddr {
        HostVirtAddr(self.words.as_ptr() as u64)
    }

    fn word(&self, offset: u64) -> &AtomicU64 {
        assert!(
            offset.is_multiple_of(8),
            "offset {offset:#x} is not 8-byte aligned"
        );
        &self.words[(offset / 8) as usize]
    }

    /// Reads the u64 at byte `offset` (8-byte aligned).
    pub fn read_u64(&self, offset: u64) -> u64 {
        self.word(offset).load(Ordering::Acquire)
    }

    /// Writes the u64 at byte `offset` (8-byte aligned).
    pub fn write_u64(&self, offset: u64, value: u64) {
        self.word(offset).store(value, Ordering::Release);
    }

    /// A memslot of `pages` pages of this memory, starting at page `first`,
    /// seen by the guest at `guest_base` and by the hardware at `hpa` (page
    /// `first` of the memory). Panics if the range is outside the memory.
    pub fn memslot(
        &'static self,
        id: SlotId,
        guest_base: Gpa,
        first: u64,
        pages: u64,
        hpa: Hpa,
        flags: MemslotFlags,
    ) -> Memslot {
        assert!(
            first + pages <= self.pages(),
            "pages {first}..{} outside a memory of {} pages",
            first + pages,
            self.pages()
        );
        let backing = HostBacking {
            hpa,
            host_addr: HostVirtAddr(self.host_addr().0 + first * PAGE_SIZE),
        };
        Memslot::new(id, guest_base, pages * PAGE_SIZE, backing, flags)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_aligned_and_word_addressed() {
        let mem = GuestMemory::new(3 * PAGE_SIZE - 1).unwrap();
        assert_eq!(mem.pages(), 3);
        assert!(mem.host_addr().0.is_multiple_of(PAGE_SIZE));
        assert_eq!(mem.read_u64(0x2ff8), 0);
        mem.write_u64(0x1008, 7);
        assert_eq!(mem.read_u64(0x1008), 7);
        let slot = mem.memslot(
            SlotId(1),
            Gpa(0x4000),
            1,
            2,
            Hpa(0x10_0000),
            MemslotFlags::empty(),
        );
        assert_eq!(slot.size, 2 * PAGE_SIZE);
        assert_eq!(slot.backing.host_addr.0, mem.host_addr().0 + PAGE_SIZE);
    }
}
