//! Test support: a [`HypervisorMemory`] with no hypervisor behind it, and
//! page-aligned guest RAM, so this crate and the crates built on it (the
//! backends' conformance suite) can run the EPT backend without `/dev/kvm`.
//!
//! [`InProcessHypervisor`] is a test double of KVM's memslot ioctls, not of
//! the backend: it keeps the regions and their dirty bitmaps with KVM's
//! rules, and the test, playing the guest, reports the writes the CPU would
//! have logged.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use mmu_api::{
    Gpa, HostBacking, HostVirtAddr, Hpa, Memslot, MemslotFlags, PAGE_SHIFT, PAGE_SIZE, SlotId,
};

use crate::port::HypervisorMemory;

/// One region as the hypervisor holds it.
#[derive(Debug)]
struct Region {
    slot: Memslot,
    /// The dirty bitmap (KVM layout), present while the region logs.
    dirty: Option<Vec<u64>>,
}

#[derive(Debug, Default)]
struct Regions {
    by_id: BTreeMap<SlotId, Region>,
    /// Fail the next port call with this errno.
    refuse_next: Option<i32>,
    /// Port calls made (including refused ones).
    calls: u64,
}

/// An in-process stand-in for KVM's memory-region ioctls.
///
/// Checks what KVM checks (`EEXIST` for an overlap, `EINVAL` for a size or
/// host-address change or the deletion of an unknown region, `ENOENT` for
/// the dirty log of a region that does not log), keeps a dirty bitmap per
/// LOG_DIRTY region (fresh when logging is turned on, dropped when it is
/// turned off, kept across a move), and can be told to refuse its next
/// call.
#[derive(Debug, Default)]
pub struct InProcessHypervisor {
    inner: Mutex<Regions>,
}

impl InProcessHypervisor {
    /// A hypervisor with no regions.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Regions> {
        // Every update below is a single insert, remove or store.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts a call and fails it if a refusal is pending.
    fn enter(regions: &mut Regions) -> io::Result<()> {
        regions.calls += 1;
        match regions.refuse_next.take() {
            Some(errno) => Err(io::Error::from_raw_os_error(errno)),
            None => Ok(()),
        }
    }

    /// The regions, sorted by guest base.
    pub fn regions(&self) -> Vec<Memslot> {
        let mut slots: Vec<Memslot> = self.lock().by_id.values().map(|r| r.slot).collect();
        slots.sort_by_key(|s| s.guest_base);
        slots
    }

    /// Port calls made so far, refused ones included.
    pub fn calls(&self) -> u64 {
        self.lock().calls
    }

    /// Makes the next port call fail with `errno` (e.g. `libc`'s `ENOMEM`),
    /// as a real hypervisor may refuse.
    pub fn refuse_next(&self, errno: i32) {
        self.lock().refuse_next = Some(errno);
    }

    /// The guest wrote `len` bytes at `gpa`: log the pages that lie in
    /// writable LOG_DIRTY regions, as the CPU's second-stage dirty tracking
    /// would. (A write to a READONLY region exits as MMIO instead.)
    pub fn guest_write(&self, gpa: Gpa, len: u64) {
        if len == 0 {
            return;
        }
        let end = gpa.raw().saturating_add(len);
        let mut regions = self.lock();
        for region in regions.by_id.values_mut() {
            let slot = region.slot;
            let Some(bitmap) = region.dirty.as_mut() else {
                continue;
            };
            let start = gpa.raw().max(slot.guest_base.raw());
            let stop = end.min(slot.end().raw());
            if start >= stop || !slot.is_writable() {
                continue;
            }
            let first = (start - slot.guest_base.raw()) >> PAGE_SHIFT;
            let last = (stop - 1 - slot.guest_base.raw()) >> PAGE_SHIFT;
            for page in first..=last {
                bitmap[(page / 64) as usize] |= 1 << (page % 64);
            }
        }
    }
}

fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

// Linux errno values (asm-generic), as KVM returns them.
const ENOENT: i32 = 2;
const EEXIST: i32 = 17;
const EINVAL: i32 = 22;

impl HypervisorMemory for InProcessHypervisor {
    /// # Safety
    ///
    /// As the trait's: the region is only recorded here, never accessed,
    /// so a test may pass any host range it keeps alive.
    unsafe fn set_user_memory_region(&self, slot: &Memslot) -> io::Result<()> {
        let mut regions = self.lock();
        Self::enter(&mut regions)?;
        let overlaps = regions.by_id.values().any(|r| {
            r.slot.id != slot.id && r.slot.guest_base < slot.end() && slot.guest_base < r.slot.end()
        });
        if overlaps {
            return Err(errno(EEXIST));
        }
        let logs = slot.flags.contains(MemslotFlags::LOG_DIRTY);
        let fresh = || vec![0u64; slot.pages().div_ceil(64) as usize];
        let dirty = match regions.by_id.get_mut(&slot.id) {
            None => logs.then(fresh),
            Some(old) => {
                if old.slot.size != slot.size || old.slot.backing != slot.backing {
                    return Err(errno(EINVAL));
                }
                match (old.dirty.take(), logs) {
                    (Some(kept), true) => Some(kept),
                    (None, true) => Some(fresh()),
                    (_, false) => None,
                }
            }
        };
        regions.by_id.insert(slot.id, Region { slot: *slot, dirty });
        Ok(())
    }

    fn delete_user_memory_region(&self, slot: &Memslot) -> io::Result<()> {
        let mut regions = self.lock();
        Self::enter(&mut regions)?;
        regions
            .by_id
            .remove(&slot.id)
            .map(drop)
            .ok_or_else(|| errno(EINVAL))
    }

    fn get_dirty_log(&self, slot: &Memslot) -> io::Result<Vec<u64>> {
        let mut regions = self.lock();
        Self::enter(&mut regions)?;
        let bitmap = regions
            .by_id
            .get_mut(&slot.id)
            .and_then(|r| r.dirty.as_mut())
            .ok_or_else(|| errno(ENOENT))?;
        let words = bitmap.len();
        Ok(std::mem::replace(bitmap, vec![0; words]))
    }
}

const WORDS_PER_PAGE: usize = (PAGE_SIZE / 8) as usize;

/// One 4 KiB frame, aligned as the hardware maps it.
#[repr(C, align(4096))]
struct Frame([AtomicU64; WORDS_PER_PAGE]);

/// Page-aligned host memory to back a memslot in tests.
///
/// Every access, the test's and the backend's, is a 64-bit atomic
/// operation, so a test can edit guest page tables while the backend holds
/// a raw pointer to them.
pub struct GuestRam {
    frames: Box<[Frame]>,
}

impl fmt::Debug for GuestRam {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuestRam")
            .field("host_addr", &format_args!("{:#x}", self.host_addr().0))
            .field("size", &self.size())
            .finish()
    }
}

impl GuestRam {
    /// `size` bytes of zeroed RAM, rounded up to whole pages (at least one).
    pub fn new(size: u64) -> Self {
        let frames = size.div_ceil(PAGE_SIZE).max(1);
        Self {
            frames: (0..frames)
                .map(|_| Frame(std::array::from_fn(|_| AtomicU64::new(0))))
                .collect(),
        }
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.frames.len() as u64 * PAGE_SIZE
    }

    /// The address of the first byte in this process.
    pub fn host_addr(&self) -> HostVirtAddr {
        HostVirtAddr(self.frames.as_ptr() as u64)
    }

    /// A memslot of the whole RAM at `guest_base`. The "hardware" address
    /// is the host address: in-process, there is no other view.
    pub fn memslot(&self, id: SlotId, guest_base: Gpa, flags: MemslotFlags) -> Memslot {
        let backing = HostBacking {
            hpa: Hpa(self.host_addr().0),
            host_addr: self.host_addr(),
        };
        Memslot::new(id, guest_base, self.size(), backing, flags)
    }

    fn word(&self, offset: u64) -> &AtomicU64 {
        assert!(
            offset.is_multiple_of(8),
            "offset {offset:#x} is not 8-byte aligned"
        );
        let frame = &self.frames[(offset / PAGE_SIZE) as usize];
        &frame.0[((offset % PAGE_SIZE) / 8) as usize]
    }

    /// Reads the u64 at byte `offset` (8-byte aligned).
    pub fn read_u64(&self, offset: u64) -> u64 {
        self.word(offset).load(Ordering::Acquire)
    }

    /// Writes the u64 at byte `offset` (8-byte aligned).
    pub fn write_u64(&self, offset: u64, value: u64) {
        self.word(offset).store(value, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(id: u32, base: u64, pages: u64, flags: MemslotFlags) -> Memslot {
        Memslot::new(
            SlotId(id),
            Gpa(base),
            pages * PAGE_SIZE,
            HostBacking {
                hpa: Hpa(0x1_0000_0000 * u64::from(id + 1)),
                host_addr: HostVirtAddr(0x7f00_0000_0000 + 0x1_0000_0000 * u64::from(id)),
            },
            flags,
        )
    }

    fn set(hv: &InProcessHypervisor, s: &Memslot) -> io::Result<()> {
        // SAFETY: the double never dereferences the host range.
        unsafe { hv.set_user_memory_region(s) }
    }

    #[test]
    fn refuses_what_kvm_refuses() {
        let hv = InProcessHypervisor::new();
        let a = slot(0, 0, 4, MemslotFlags::empty());
        set(&hv, &a).unwrap();
        let err = set(&hv, &slot(1, 0x3000, 1, MemslotFlags::empty())).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(EEXIST));
        let mut grown = a;
        grown.size += PAGE_SIZE;
        assert_eq!(set(&hv, &grown).unwrap_err().raw_os_error(), Some(EINVAL));
        let unknown = slot(5, 0x10_0000, 1, MemslotFlags::empty());
        assert_eq!(
            hv.delete_user_memory_region(&unknown)
                .unwrap_err()
                .raw_os_error(),
            Some(EINVAL)
        );
        assert_eq!(
            hv.get_dirty_log(&a).unwrap_err().raw_os_error(),
            Some(ENOENT),
            "no log without LOG_DIRTY"
        );
        hv.refuse_next(12);
        assert_eq!(hv.get_dirty_log(&a).unwrap_err().raw_os_error(), Some(12));
        assert_eq!(hv.regions(), vec![a]);
        assert_eq!(hv.calls(), 6);
    }

    #[test]
    fn dirty_log_follows_the_flags() {
        let hv = InProcessHypervisor::new();
        let mut s = slot(0, 0x10_0000, 70, MemslotFlags::LOG_DIRTY);
        set(&hv, &s).unwrap();
        hv.guest_write(Gpa(0x10_0ff8), 16); // pages 0 and 1
        hv.guest_write(Gpa(0x14_5000), 1); // page 69
        hv.guest_write(Gpa(0x20_0000), 8); // outside
        // A move keeps the log.
        s.guest_base = Gpa(0x40_0000);
        set(&hv, &s).unwrap();
        assert_eq!(hv.get_dirty_log(&s).unwrap(), vec![0b11, 1 << 5]);
        assert_eq!(hv.get_dirty_log(&s).unwrap(), vec![0, 0], "harvest clears");
        hv.guest_write(Gpa(0x40_0000), 1);
        // Turning logging off drops the log; on again starts clean.
        s.flags = MemslotFlags::empty();
        set(&hv, &s).unwrap();
        s.flags = MemslotFlags::LOG_DIRTY;
        set(&hv, &s).unwrap();
        assert_eq!(hv.get_dirty_log(&s).unwrap(), vec![0, 0]);
        // Read-only memory is never written by the guest.
        s.flags = MemslotFlags::LOG_DIRTY | MemslotFlags::READONLY;
        set(&hv, &s).unwrap();
        hv.guest_write(Gpa(0x40_0000), 1);
        assert_eq!(hv.get_dirty_log(&s).unwrap(), vec![0, 0]);
        hv.delete_user_memory_region(&s).unwrap();
        assert!(hv.regions().is_empty());
    }

    #[test]
    fn guest_ram_is_page_aligned_and_word_addressed() {
        let ram = GuestRam::new(3 * PAGE_SIZE - 1);
        assert_eq!(ram.size(), 3 * PAGE_SIZE);
        assert!(ram.host_addr().0.is_multiple_of(PAGE_SIZE));
        ram.write_u64(0x1ff8, 7);
        assert_eq!(ram.read_u64(0x1ff8), 7);
        assert_eq!(ram.read_u64(0x2000), 0);
        let s = ram.memslot(SlotId(1), Gpa(0x8000), MemslotFlags::READONLY);
        assert_eq!(s.size, ram.size());
        assert_eq!(s.backing.host_addr, ram.host_addr());
    }
}
