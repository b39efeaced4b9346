//! The shadow backend's backing arena: one hypervisor memory region,
//! registered once when the VM is created, that covers the shadow page pool
//! and room for every guest backing.
//!
//! A shadow backend's SPTEs point at host-physical addresses, which on a
//! hypervisor are addresses in one of its memory regions. Mirroring each
//! guest memslot into a region of its own ([`RegionMirror`]) makes every
//! guest memslot change a hypervisor memslot change too, and on KVM that
//! zaps KVM's own shadow of everything: the shadow backend's fast zap could
//! never be cheaper than KVM's. With the arena the hypervisor's memory map
//! never changes after creation:
//!
//! - **add**: the slot's host memory is mapped a second time, at a free
//!   place inside the arena (`mremap` with an old size of 0, which
//!   duplicates a shared mapping), and that place is the slot's
//!   host-physical address;
//! - **delete**: once the backend has let go of the slot (its fast zap has
//!   had every vCPU load a fresh root), the place is mapped over with
//!   inaccessible memory (`MAP_FIXED`, `PROT_NONE`). The hypervisor's MMU
//!   notifier drops every mapping it had of those pages, so no path, not
//!   even the hypervisor's own cached translation of an obsolete shadow
//!   page, reaches the old backing; a stale access would fail in the
//!   hypervisor instead of reading it.
//!
//! Guest memory must therefore be a shared mapping (`MAP_SHARED`
//! anonymous memory, a memfd, a file): a private anonymous mapping cannot
//! be mapped twice. [`shared_guest_memory`] builds vm-memory guest memory
//! that can.
//!
//! Dirty logging is the shadow backend's own (its SPTEs write-protect the
//! pages of a logging slot); the hypervisor's log is not used.
//!
//! [`RegionMirror`]: crate::ports::RegionMirror

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use mmu_api::{Hpa, Memslot, SlotId};
use tracing::{debug, trace};
use vm_memory::mmap::{FromRangesError, MmapRegion};
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::memslots::{HostMirror, UserRegion};
use crate::ports::{PortError, RegionPort};

const PAGE_SIZE: u64 = 4096;
/// Backings of 2 MiB or more start on a 2 MiB boundary in the arena, so
/// the hypervisor can back them with large pages where it does.
const LARGE_PAGE: u64 = 2 << 20;

/// Why the arena could not be set up or could not place a backing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ArenaError {
    /// The arena's size is zero, not page aligned, or too large for the
    /// address space.
    #[error("an arena of {0:#x} bytes is not a usable size")]
    Size(u64),
    /// The host refused to reserve the arena's address range.
    #[error("cannot reserve {size:#x} bytes of address space for the arena")]
    Reserve {
        /// The arena's size.
        size: u64,
        /// The host's error.
        #[source]
        source: std::io::Error,
    },
    /// The pool could not be mapped into the arena (it is not a shared
    /// mapping).
    #[error("cannot map the shadow page pool into the arena")]
    Pool(#[source] std::io::Error),
    /// The hypervisor refused the arena's memory region.
    #[error("cannot register the arena with the hypervisor")]
    Register(#[source] PortError),
}

/// Where one backing sits in the arena.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Placement {
    slot: SlotId,
    len: u64,
    host_addr: u64,
    /// The backing is mapped there (not only reserved for it).
    mapped: bool,
}

/// The arena: the pool at its start, guest backings after it.
pub struct Arena<R: RegionPort + ?Sized> {
    port: Arc<R>,
    /// The hypervisor's region over the whole arena.
    region: UserRegion,
    /// Offset of the first backing place (the pool comes first).
    backings_from: u64,
    /// Placements by offset from the arena's start.
    places: Mutex<BTreeMap<u64, Placement>>,
    registered: bool,
}

impl<R: RegionPort + ?Sized> fmt::Debug for Arena<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Arena")
            .field("region", &self.region)
            .field("backings_from", &self.backings_from)
            .field("places", &*self.places())
            .finish_non_exhaustive()
    }
}

fn round_up(value: u64, to: u64) -> u64 {
    value.div_ceil(to) * to
}

impl<R: RegionPort + ?Sized> Arena<R> {
    /// Reserves an arena at host-physical address `base` with the pool
    /// (`pool_len` bytes mapped at `pool_host`, a shared mapping) at its
    /// start and `backings` bytes of room for guest backings after it, and
    /// registers it with the hypervisor as region `slot`.
    ///
    /// # Safety
    ///
    /// `pool_host` must be a shared mapping of at least `pool_len` bytes
    /// that stays mapped while the arena exists (the arena maps the same
    /// pages; it never writes them).
    pub unsafe fn new(
        port: Arc<R>,
        slot: u32,
        base: Hpa,
        pool_host: u64,
        pool_len: u64,
        backings: u64,
    ) -> Result<Self, ArenaError> {
        let backings_from = round_up(pool_len, LARGE_PAGE);
        let size = backings_from
            .checked_add(backings)
            .filter(|s| *s > 0 && backings.is_multiple_of(PAGE_SIZE))
            .ok_or(ArenaError::Size(backings))?;
        let len = usize::try_from(size).map_err(|_| ArenaError::Size(size))?;
        // SAFETY: an inaccessible, unreserved anonymous mapping at an
        // address of the kernel's choosing touches no existing memory; the
        // result is checked below.
        let va = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if va == libc::MAP_FAILED {
            return Err(ArenaError::Reserve {
                size,
                source: std::io::Error::last_os_error(),
            });
        }
        let mut arena = Arena {
            port,
            region: UserRegion {
                slot,
                guest_phys_addr: base.raw(),
                memory_size: size,
                userspace_addr: va as u64,
                readonly: false,
                log_dirty: false,
            },
            backings_from,
            places: Mutex::new(BTreeMap::new()),
            registered: false,
        };
        if pool_len > 0 {
            // SAFETY: the pool is a shared mapping of `pool_len` bytes (our
            // caller's contract), and the target is the start of our own
            // reservation.
            unsafe { duplicate(pool_host, va as u64, pool_len) }.map_err(ArenaError::Pool)?;
        }
        // SAFETY: the region is our reservation, mapped until `Drop`, which
        // removes the region first.
        unsafe { arena.port.set_region(&arena.region) }.map_err(ArenaError::Register)?;
        arena.registered = true;
        debug!(
            base = base.raw(),
            size, pool_len, backings, "shadow backing arena registered"
        );
        Ok(arena)
    }

    fn places(&self) -> MutexGuard<'_, BTreeMap<u64, Placement>> {
        self.places.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The hypervisor's memory region over the whole arena.
    pub fn region(&self) -> &UserRegion {
        &self.region
    }

    /// Bytes of room for guest backings.
    pub fn backing_room(&self) -> u64 {
        self.region.memory_size - self.backings_from
    }

    /// Bytes of that room in use (reserved or mapped), alignment included.
    pub fn backing_used(&self) -> u64 {
        self.places().values().map(|p| p.len).sum()
    }

    /// Where in this process the arena maps host-physical address `hpa`,
    /// if it lies in the arena.
    pub fn host_addr(&self, hpa: Hpa) -> Option<u64> {
        let offset = hpa.raw().checked_sub(self.region.guest_phys_addr)?;
        (offset < self.region.memory_size).then(|| self.region.userspace_addr + offset)
    }

    /// A free place of `len` bytes: the lowest gap that fits.
    fn find_gap(places: &BTreeMap<u64, Placement>, len: u64, end: u64, from: u64) -> Option<u64> {
        let align = if len >= LARGE_PAGE {
            LARGE_PAGE
        } else {
            PAGE_SIZE
        };
        let mut candidate = from;
        for (&offset, place) in places {
            if round_up(candidate, align) + len <= offset {
                break;
            }
            candidate = candidate.max(offset + place.len);
        }
        let start = round_up(candidate, align);
        (start.checked_add(len)? <= end).then_some(start)
    }

    fn offset_of(&self, slot: &Memslot) -> std::io::Result<u64> {
        slot.backing
            .hpa
            .raw()
            .checked_sub(self.region.guest_phys_addr)
            .filter(|o| *o >= self.backings_from)
            .ok_or_else(|| {
                std::io::Error::other(format!(
                    "{} at {} is not placed in the arena",
                    slot.id, slot.backing.hpa
                ))
            })
    }
}

/// Maps the `len` bytes of the shared mapping at `from` a second time, at
/// `to`, replacing whatever was mapped there.
///
/// # Safety
///
/// `to..to + len` must be a range this process owns and nothing else
/// relies on (it is replaced); `from..from + len` must be mapped.
unsafe fn duplicate(from: u64, to: u64, len: u64) -> std::io::Result<()> {
    let len = usize::try_from(len).map_err(std::io::Error::other)?;
    // SAFETY: with an old size of 0, mremap maps the pages of the shared
    // mapping at `from` again at `to` (MREMAP_FIXED replaces the range,
    // which our caller owns); `from` stays mapped. A private mapping is
    // refused with EINVAL and nothing changes.
    let got = unsafe {
        libc::mremap(
            from as *mut libc::c_void,
            0,
            len,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            to as *mut libc::c_void,
        )
    };
    if got == libc::MAP_FAILED {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINVAL) {
            return Err(std::io::Error::new(
                e.kind(),
                format!(
                    "the memory at {from:#x} cannot be mapped twice ({e}): guest memory under \
                     shadow hosting must be a shared mapping (MAP_SHARED, a memfd or a file)"
                ),
            ));
        }
        return Err(e);
    }
    Ok(())
}

/// Makes `at..at + len` inaccessible, dropping what was mapped there.
///
/// # Safety
///
/// The range must be one this process owns and nothing else relies on.
unsafe fn make_inaccessible(at: u64, len: u64) -> std::io::Result<()> {
    let len = usize::try_from(len).map_err(std::io::Error::other)?;
    // SAFETY: MAP_FIXED replaces our caller's range with an inaccessible
    // anonymous mapping; nothing else is touched.
    let got = unsafe {
        libc::mmap(
            at as *mut libc::c_void,
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    if got == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl<R: RegionPort + ?Sized> HostMirror for Arena<R> {
    /// The lowest free place that fits the slot (kept for the slot until
    /// it is unmapped); the same place again for a slot already placed
    /// with the same backing.
    fn place(&self, slot: &Memslot) -> std::io::Result<Hpa> {
        let mut places = self.places();
        let len = round_up(slot.size, PAGE_SIZE);
        if let Some((&offset, _)) = places.iter().find(|(_, p)| {
            p.slot == slot.id && p.host_addr == slot.backing.host_addr.0 && p.len == len
        }) {
            return Ok(Hpa(self.region.guest_phys_addr + offset));
        }
        let offset = Self::find_gap(&places, len, self.region.memory_size, self.backings_from)
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::OutOfMemory,
                    format!(
                        "the arena has no free {len:#x} bytes for {} ({:#x} of {:#x} in use): \
                         give the VM a larger arena",
                        slot.id,
                        places.values().map(|p| p.len).sum::<u64>(),
                        self.backing_room()
                    ),
                )
            })?;
        places.insert(
            offset,
            Placement {
                slot: slot.id,
                len,
                host_addr: slot.backing.host_addr.0,
                mapped: false,
            },
        );
        Ok(Hpa(self.region.guest_phys_addr + offset))
    }

    unsafe fn map(&self, slot: &Memslot) -> std::io::Result<()> {
        let offset = self.offset_of(slot)?;
        let mut places = self.places();
        let Some(place) = places.get_mut(&offset).filter(|p| p.slot == slot.id) else {
            return Err(std::io::Error::other(format!(
                "{} was not placed at {}",
                slot.id, slot.backing.hpa
            )));
        };
        if place.mapped {
            // A flag change (dirty logging): the shadow backend's own.
            return Ok(());
        }
        let to = self.region.userspace_addr + offset;
        // SAFETY: `to..to + len` is this slot's place in our reservation,
        // which nothing else uses; our caller keeps the backing mapped
        // until `unmap` (and the duplicate keeps its pages alive anyway).
        if let Err(e) = unsafe { duplicate(place.host_addr, to, slot.size) } {
            places.remove(&offset);
            return Err(e);
        }
        place.mapped = true;
        trace!(
            slot = slot.id.0,
            hpa = slot.backing.hpa.raw(),
            "backing mapped into the arena"
        );
        Ok(())
    }

    fn unmap(&self, slot: &Memslot) -> std::io::Result<()> {
        let offset = self.offset_of(slot)?;
        let mut places = self.places();
        let Some(place) = places.get(&offset).filter(|p| p.slot == slot.id).copied() else {
            return Ok(());
        };
        if place.mapped {
            // SAFETY: the slot's place in our reservation; the backend no
            // longer maps it.
            unsafe { make_inaccessible(self.region.userspace_addr + offset, place.len) }?;
        }
        places.remove(&offset);
        trace!(slot = slot.id.0, "backing removed from the arena");
        Ok(())
    }
}

impl<R: RegionPort + ?Sized> Drop for Arena<R> {
    fn drop(&mut self) {
        if self.registered
            && let Err(e) = self.port.remove_region(&self.region)
        {
            // The hypervisor still maps the arena: never unmap it.
            tracing::warn!(error = %e, "cannot remove the arena from the hypervisor; leaking it");
            return;
        }
        // SAFETY: the reservation is ours and the hypervisor let go of it.
        unsafe {
            libc::munmap(
                self.region.userspace_addr as *mut libc::c_void,
                self.region.memory_size as usize,
            );
        }
    }
}

/// Guest memory whose regions are shared anonymous mappings, which a
/// shadow backend's [`Arena`] can map a second time (private anonymous
/// memory, vm-memory's default, cannot be). One region per range, as
/// `GuestMemoryMmap::from_ranges`.
pub fn shared_guest_memory(
    ranges: &[(GuestAddress, usize)],
) -> Result<GuestMemoryMmap<()>, FromRangesError> {
    let regions = ranges
        .iter()
        .map(|&(start, len)| {
            let mapping = MmapRegion::build(
                None,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            )?;
            GuestRegionMmap::new(mapping, start).ok_or(FromRangesError::InvalidGuestRegion)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(GuestMemoryMmap::from_regions(regions)?)
}

#[cfg(test)]
mod tests {
    use mmu_api::{Gpa, HostBacking, HostVirtAddr, MemslotFlags};
    use vm_memory::{Bytes, GuestMemoryBackend};

    use super::*;

    /// A hypervisor that accepts every region and remembers nothing.
    #[derive(Debug)]
    struct Accepting;

    impl RegionPort for Accepting {
        unsafe fn set_region(&self, _: &UserRegion) -> Result<(), PortError> {
            Ok(())
        }
        fn remove_region(&self, _: &UserRegion) -> Result<(), PortError> {
            Ok(())
        }
        fn dirty_log(&self, _: &UserRegion) -> Result<Vec<u64>, PortError> {
            Err(PortError::Unsupported { op: "log" })
        }
    }

    const BASE: Hpa = Hpa(1 << 40);

    fn arena(room: u64) -> Arena<Accepting> {
        // SAFETY: no pool (length 0).
        unsafe { Arena::new(Arc::new(Accepting), 9, BASE, 0, 0, room) }.unwrap()
    }

    fn slot(id: u32, host_addr: u64, size: u64) -> Memslot {
        Memslot::new(
            SlotId(id),
            Gpa(0),
            size,
            HostBacking {
                hpa: Hpa(0),
                host_addr: HostVirtAddr(host_addr),
            },
            MemslotFlags::empty(),
        )
    }

    #[test]
    fn places_are_first_fit_aligned_and_reused() {
        let arena = arena(8 << 20);
        let small = slot(1, 0x1000, 0x3000);
        let large = slot(2, 0x10_0000, 2 << 20);
        let a = arena.place(&small).unwrap();
        assert_eq!(a, BASE);
        // A 2 MiB backing starts on a 2 MiB boundary.
        let b = arena.place(&large).unwrap();
        assert_eq!(b, Hpa(BASE.raw() + (2 << 20)));
        // The same slot and backing again: the same place.
        assert_eq!(arena.place(&small).unwrap(), a);
        // A small one fits in the gap before the large one.
        let c = arena.place(&slot(3, 0x9000, 0x1000)).unwrap();
        assert_eq!(c, Hpa(BASE.raw() + 0x3000));
        assert_eq!(arena.backing_used(), 0x3000 + (2 << 20) + 0x1000);
        // Room runs out with a typed, explanatory error.
        let err = arena.place(&slot(4, 0x20_0000, 8 << 20)).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::OutOfMemory);
        assert!(err.to_string().contains("larger arena"), "{err}");
        // An unmapped (never mapped) place is free again.
        let mut placed = small;
        placed.backing.hpa = a;
        arena.unmap(&placed).unwrap();
        assert_eq!(arena.place(&slot(5, 0x4000, 0x2000)).unwrap(), a);
    }

    #[test]
    fn a_mapped_backing_is_seen_through_the_arena_until_unmapped() {
        let arena = arena(4 << 20);
        let memory = shared_guest_memory(&[(GuestAddress(0), 0x2000)]).unwrap();
        memory.write_obj(0xfeed_u64, GuestAddress(0x1008)).unwrap();
        let host = memory.get_host_address(GuestAddress(0)).unwrap() as u64;
        let mut s = slot(1, host, 0x2000);
        s.backing.hpa = arena.place(&s).unwrap();
        // SAFETY: `memory` outlives the mapping (and the arena's duplicate
        // keeps its pages anyway).
        unsafe { arena.map(&s) }.unwrap();
        // A second map is a flag change: nothing to do.
        // SAFETY: as above.
        unsafe { arena.map(&s) }.unwrap();
        let at = arena.host_addr(s.backing.hpa).unwrap();
        // SAFETY: the slot's place, mapped above.
        let seen = unsafe { std::ptr::read_volatile((at + 0x1008) as *const u64) };
        assert_eq!(seen, 0xfeed);
        // SAFETY: as above: a write through the arena reaches the memory.
        unsafe { std::ptr::write_volatile((at + 0x10) as *mut u64, 7) };
        assert_eq!(memory.read_obj::<u64>(GuestAddress(0x10)).unwrap(), 7);
        arena.unmap(&s).unwrap();
        assert_eq!(arena.backing_used(), 0);
        assert_eq!(
            memory.read_obj::<u64>(GuestAddress(0x1008)).unwrap(),
            0xfeed
        );
    }

    #[test]
    fn private_memory_is_refused_and_its_place_freed() {
        let arena = arena(4 << 20);
        let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let region = memory.iter().next().unwrap();
        let mut s = slot(1, region.as_ptr() as u64, 0x1000);
        s.backing.hpa = arena.place(&s).unwrap();
        // SAFETY: `memory` outlives the attempt.
        let err = unsafe { arena.map(&s) }.unwrap_err();
        assert!(err.to_string().contains("shared mapping"), "{err}");
        assert_eq!(arena.backing_used(), 0);
    }

    #[test]
    fn bad_sizes_are_refused() {
        // SAFETY: no pool.
        let err = unsafe { Arena::new(Arc::new(Accepting), 9, BASE, 0, 0, 0) }.unwrap_err();
        assert!(matches!(err, ArenaError::Size(0)), "{err:?}");
        // SAFETY: no pool.
        let err = unsafe { Arena::new(Arc::new(Accepting), 9, BASE, 0, 0, 100) }.unwrap_err();
        assert!(matches!(err, ArenaError::Size(100)), "{err:?}");
    }
}
