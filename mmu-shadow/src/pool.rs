//! The shadow page pool: 4 KiB frames in one host region the hardware walks
//! (KVM: the shadow page cache, `kvm_mmu_memory_cache`, and the frames its
//! `sp->spt` point to).
//!
//! The region is an anonymous mapping owned by the pool. The hardware sees it
//! at `hpa_base` (on KVM the VMM registers it as a memslot outside the
//! guest's physical address space, at that address). Entries are written
//! with single 64-bit atomic stores because the hardware may walk a table
//! while the MMU edits it.

use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use mmu_api::{HostVirtAddr, Hpa, PAGE_SIZE};

/// Entries in one table page.
pub(crate) const ENTRIES_PER_PAGE: usize = 512;

/// Index of a frame in the pool; also the id of the shadow page it holds.
pub(crate) type FrameId = u32;

/// Why the pool could not be created.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// Zero frames, or more than fit the address space.
    #[error("a pool of {0} frames is not possible")]
    Size(u64),
    /// `hpa_base` is not page aligned or the range wraps.
    #[error("pool base {0} is not page aligned or the range wraps")]
    Base(Hpa),
    /// A configuration value outside what the backend supports.
    #[error("invalid shadow configuration: {0}")]
    Config(&'static str),
    /// The host refused the mapping.
    #[error("could not map the pool")]
    Map(#[source] std::io::Error),
}

/// The pool's memory: the mapping the hardware walks. Shared with the
/// lock-free readers (the MMIO fast path, the soft vCPU's hardware walk),
/// which only ever load entries; every store goes through [`ShadowPool`]
/// under the MMU lock.
#[derive(Debug)]
pub(crate) struct PoolMem {
    base: NonNull<AtomicU64>,
    frames: u32,
    hpa_base: Hpa,
}

/// The frames and their entries: the allocator and the journal, behind the
/// MMU lock, over the shared [`PoolMem`].
#[derive(Debug)]
pub(crate) struct ShadowPool {
    mem: Arc<PoolMem>,
    free: Vec<FrameId>,
    /// What changed since the journal was last taken; `None` when no host
    /// needs to be told.
    journal: Option<Journal>,
}

/// Changes a host that shadows the pool itself (PVM) must be told of.
#[derive(Debug, Default)]
struct Journal {
    /// Entries whose old value the host may have cached: present entries
    /// that were removed, narrowed or retargeted, as `frame * 512 + index`.
    /// An entry that was not present needs no record: the host caches no
    /// translation for it and reads the new value on its next walk.
    entries: Vec<u32>,
    /// Frames whose page was zapped: the host must drop everything it
    /// derived from them before the frame is used again.
    frames: Vec<FrameId>,
    /// Zapped frames not yet known to be forgotten by the host, with the
    /// epoch of the batch that carried them (`u64::MAX` until taken).
    quarantined: std::collections::HashMap<FrameId, u64>,
    /// Batches taken so far.
    epoch: u64,
}

/// The journal taken at once: entries and frames, by index.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct JournalBatch {
    pub(crate) epoch: u64,
    pub(crate) entries: Vec<(FrameId, usize)>,
    pub(crate) frames: Vec<FrameId>,
}

// SAFETY: `PoolMem` owns its mapping; every access to the memory goes
// through `AtomicU64`, so sharing the pointer between threads is sound.
unsafe impl Send for PoolMem {}
// SAFETY: as above; `&PoolMem` only hands out atomic views of the memory.
unsafe impl Sync for PoolMem {}

impl PoolMem {
    /// Number of frames.
    pub(crate) fn capacity(&self) -> u32 {
        self.frames
    }

    /// Where the hardware sees the pool.
    pub(crate) fn hpa_base(&self) -> Hpa {
        self.hpa_base
    }

    /// The pool's host mapping and size, for registering it with a
    /// hypervisor (a memslot at [`hpa_base`](Self::hpa_base)).
    pub(crate) fn host_region(&self) -> (HostVirtAddr, u64) {
        (
            HostVirtAddr(self.base.as_ptr() as u64),
            u64::from(self.frames) * PAGE_SIZE,
        )
    }

    /// The hardware address of a frame.
    pub(crate) fn hpa(&self, frame: FrameId) -> Hpa {
        Hpa(self.hpa_base.raw() + u64::from(frame) * PAGE_SIZE)
    }

    /// The frame at hardware address `hpa`, if it lies in the pool.
    pub(crate) fn frame_at(&self, hpa: Hpa) -> Option<FrameId> {
        let off = hpa.raw().checked_sub(self.hpa_base.raw())?;
        let frame = off / PAGE_SIZE;
        (frame < u64::from(self.frames)).then_some(frame as FrameId)
    }

    /// True if `hpa` lies inside the pool.
    pub(crate) fn contains(&self, hpa: Hpa) -> bool {
        self.frame_at(hpa).is_some()
    }

    pub(crate) fn entry(&self, frame: FrameId, index: usize) -> &AtomicU64 {
        assert!(frame < self.frames && index < ENTRIES_PER_PAGE);
        let offset = frame as usize * ENTRIES_PER_PAGE + index;
        // SAFETY: the assert keeps `offset` inside the mapping, so the
        // pointer stays in bounds of one allocation.
        let ptr = unsafe { self.base.as_ptr().add(offset) };
        // SAFETY: `ptr` is in the mapping, which lives as long as `self`,
        // is 8-byte aligned and is only accessed atomically.
        unsafe { &*ptr }
    }

    /// Reads one entry.
    pub(crate) fn load(&self, frame: FrameId, index: usize) -> u64 {
        self.entry(frame, index).load(Ordering::Acquire)
    }

    /// Writes `value` into an entry that holds 0, with one
    /// compare-and-exchange; false if the entry holds anything else. For
    /// faults that fill empty leaf entries holding the MMU lock shared:
    /// of two racing for one entry, one wins. An entry that was not
    /// present needs no journal record (a host that shadows the pool
    /// cached nothing for it).
    pub(crate) fn fill_empty(&self, frame: FrameId, index: usize, value: u64) -> bool {
        self.entry(frame, index)
            .compare_exchange(0, value, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Compare-and-exchange on one entry (for a hardware model setting A/D).
    #[cfg(any(test, feature = "test-utils"))]
    pub(crate) fn compare_exchange(
        &self,
        frame: FrameId,
        index: usize,
        current: u64,
        new: u64,
    ) -> Result<u64, u64> {
        self.entry(frame, index)
            .compare_exchange(current, new, Ordering::AcqRel, Ordering::Acquire)
    }
}

impl ShadowPool {
    /// Maps `frames` zeroed frames, seen by the hardware at `hpa_base`.
    pub(crate) fn new(frames: u32, hpa_base: Hpa) -> Result<Self, PoolError> {
        if frames == 0 {
            return Err(PoolError::Size(0));
        }
        let len = u64::from(frames) * PAGE_SIZE;
        let len_usize = usize::try_from(len).map_err(|_| PoolError::Size(u64::from(frames)))?;
        if !hpa_base.is_aligned(PAGE_SIZE) || hpa_base.raw().checked_add(len).is_none() {
            return Err(PoolError::Base(hpa_base));
        }
        // Shared, so a host can map the same frames a second time (into
        // one hypervisor memory region with the guest's memory, say).
        // SAFETY: an anonymous mapping at an address of the kernel's
        // choosing touches no existing memory; the result is checked below.
        let ptr = unsafe {
            libc::mmap(
                core::ptr::null_mut(),
                len_usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(PoolError::Map(std::io::Error::last_os_error()));
        }
        let base = NonNull::new(ptr.cast::<AtomicU64>())
            .ok_or_else(|| PoolError::Map(std::io::Error::other("mmap returned null")))?;
        Ok(ShadowPool {
            mem: Arc::new(PoolMem {
                base,
                frames,
                hpa_base,
            }),
            // Pop from the end: hand out low frames first.
            free: (0..frames).rev().collect(),
            journal: None,
        })
    }

    /// The memory, for lock-free readers.
    pub(crate) fn mem(&self) -> &Arc<PoolMem> {
        &self.mem
    }

    /// Frames not holding a shadow page.
    pub(crate) fn free_frames(&self) -> u32 {
        self.free.len() as u32
    }

    /// Takes a free frame; its entries are all zero. A quarantined frame
    /// (see [`is_quarantined`](Self::is_quarantined)) is never handed out.
    pub(crate) fn alloc(&mut self) -> Option<FrameId> {
        let pos = self.free.iter().rposition(|&f| !self.is_quarantined(f))?;
        let frame = self.free.swap_remove(pos);
        // Written before anything reads it, a never-used frame gets a
        // fresh zeroed page from the host kernel at once. Read first, it
        // would be mapped to the shared zero page, and its first write
        // would replace that mapping, for which the kernel flushes the TLB
        // of every CPU running another thread of the VMM: an interrupt to
        // each vCPU thread, in the middle of its faults.
        self.entry(frame, 0).store(0, Ordering::Relaxed);
        Some(frame)
    }

    /// Returns a frame, zeroing it. The caller must have made sure that no
    /// hardware walk can still reach it (TLBs flushed) and journaled it
    /// with [`journal_frame`](Self::journal_frame) if the host must know.
    pub(crate) fn free(&mut self, frame: FrameId) {
        for i in 0..ENTRIES_PER_PAGE {
            self.entry(frame, i).store(0, Ordering::Release);
        }
        self.free.push(frame);
    }

    /// Records that the page in `frame` was zapped: the host must forget
    /// what it derived from the frame, and until a batch carrying the
    /// record is confirmed ([`confirm`](Self::confirm)) the frame is
    /// quarantined.
    pub(crate) fn journal_frame(&mut self, frame: FrameId) {
        if let Some(j) = self.journal.as_mut() {
            j.frames.push(frame);
            j.quarantined.insert(frame, u64::MAX);
        }
    }

    /// True if the frame was zapped and the host may still hold what it
    /// derived from the old contents: it must not be reused yet.
    pub(crate) fn is_quarantined(&self, frame: FrameId) -> bool {
        self.journal
            .as_ref()
            .is_some_and(|j| j.quarantined.contains_key(&frame))
    }

    /// Frames in quarantine.
    pub(crate) fn quarantined(&self) -> u64 {
        self.journal
            .as_ref()
            .map_or(0, |j| j.quarantined.len() as u64)
    }

    /// The host has acted on every batch up to `epoch`: their frames
    /// leave quarantine.
    pub(crate) fn confirm(&mut self, epoch: u64) {
        if let Some(j) = self.journal.as_mut() {
            j.quarantined.retain(|_, e| *e > epoch);
        }
    }

    /// Writes one entry with a single atomic store, and journals it if
    /// journaling is on and a host may have cached the old value
    /// ([`needs_record`]).
    pub(crate) fn store(&mut self, frame: FrameId, index: usize, value: u64) {
        let old = self.entry(frame, index).swap(value, Ordering::AcqRel);
        if needs_record(old, value)
            && let Some(j) = self.journal.as_mut()
        {
            j.entries
                .push(frame * ENTRIES_PER_PAGE as u32 + index as u32);
        }
    }

    /// Starts recording changed entries (for hosts that must be told).
    pub(crate) fn enable_journal(&mut self) {
        self.journal.get_or_insert_with(Journal::default);
    }

    /// What changed since the last call, each once, in ascending order:
    /// zapped frames, and entries outside those frames. Empty (epoch 0)
    /// when nothing changed or journaling is off.
    pub(crate) fn take_journal(&mut self) -> JournalBatch {
        let Some(j) = self.journal.as_mut() else {
            return JournalBatch::default();
        };
        if j.entries.is_empty() && j.frames.is_empty() {
            return JournalBatch::default();
        }
        j.epoch += 1;
        let epoch = j.epoch;
        let mut frames = std::mem::take(&mut j.frames);
        frames.sort_unstable();
        frames.dedup();
        for f in &frames {
            if let Some(e) = j.quarantined.get_mut(f) {
                *e = epoch;
            }
        }
        let mut entries = std::mem::take(&mut j.entries);
        entries.sort_unstable();
        entries.dedup();
        let per = ENTRIES_PER_PAGE as u32;
        let entries = entries
            .into_iter()
            .map(|e| (e / per, (e % per) as usize))
            .filter(|(f, _)| frames.binary_search(f).is_err())
            .collect();
        JournalBatch {
            epoch,
            entries,
            frames,
        }
    }
}

/// True if a host that caches translations from the pool (PVM) may hold
/// `old` in a form that `new` invalidates: `old` was present, and `new`
/// is not the same entry with only write access (W, D) added. A host walk
/// that finds too few rights reads the entry again, so widening needs no
/// record.
pub(crate) fn needs_record(old: u64, new: u64) -> bool {
    const PRESENT: u64 = 1;
    const WIDEN: u64 = (1 << 1) | (1 << 6);
    let changed = old ^ new;
    old & PRESENT != 0 && changed != 0 && (changed & !WIDEN != 0 || new & changed != changed)
}

impl core::ops::Deref for ShadowPool {
    type Target = PoolMem;

    fn deref(&self) -> &PoolMem {
        &self.mem
    }
}

impl Drop for PoolMem {
    fn drop(&mut self) {
        let len = self.frames as usize * PAGE_SIZE as usize;
        // SAFETY: `base` and `len` are exactly the mapping `new` created, and
        // no reference into it outlives `self`.
        let rc = unsafe { libc::munmap(self.base.as_ptr().cast(), len) };
        debug_assert_eq!(rc, 0, "munmap of the shadow pool failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_store_free() {
        let mut pool = ShadowPool::new(4, Hpa(0x10_0000_0000)).unwrap();
        let f = pool.alloc().unwrap();
        assert_eq!(f, 0);
        assert_eq!(pool.hpa(f), Hpa(0x10_0000_0000));
        pool.store(f, 511, 0xdead_b000);
        assert_eq!(pool.load(f, 511), 0xdead_b000);
        assert_eq!(pool.frame_at(Hpa(0x10_0000_1fff)), Some(1));
        assert_eq!(pool.frame_at(Hpa(0x10_0000_4000)), None);
        pool.free(f);
        assert_eq!(pool.load(f, 511), 0);
        assert_eq!(pool.free_frames(), 4);
        let (host, len) = pool.host_region();
        assert!(host.0 % PAGE_SIZE == 0 && len == 4 * PAGE_SIZE);
    }

    #[test]
    fn the_journal_keeps_what_a_host_may_have_cached() {
        let mut pool = ShadowPool::new(8, Hpa(0x10_0000_0000)).unwrap();
        pool.enable_journal();
        let (a, b) = (pool.alloc().unwrap(), pool.alloc().unwrap());
        pool.store(a, 1, 0x5000 | 1); // not present before: no record
        pool.store(a, 1, 0x5000 | 1 | 2 | 0x40); // widened: no record
        assert_eq!(pool.take_journal(), JournalBatch::default());
        pool.store(a, 1, 0x5000 | 1); // narrowed
        pool.store(a, 2, 0x6000 | 1);
        pool.store(a, 2, 0x7000 | 1); // retargeted
        pool.store(b, 3, 0x8000 | 1);
        pool.store(b, 3, 0); // removed, but the frame goes too
        pool.journal_frame(b);
        let batch = pool.take_journal();
        assert_eq!(batch.epoch, 1);
        assert_eq!(batch.entries, vec![(a, 1), (a, 2)]);
        assert_eq!(batch.frames, vec![b]);
        // The zapped frame stays out of circulation until confirmed.
        pool.free(b);
        assert!(pool.is_quarantined(b));
        let mut handed = Vec::new();
        while let Some(f) = pool.alloc() {
            handed.push(f);
        }
        assert!(!handed.contains(&b));
        assert_eq!(pool.quarantined(), 1);
        pool.confirm(1);
        assert_eq!(pool.alloc(), Some(b));
        assert_eq!(pool.quarantined(), 0);
    }

    #[test]
    fn bad_pools_are_errors() {
        assert!(matches!(
            ShadowPool::new(0, Hpa(0)),
            Err(PoolError::Size(0))
        ));
        assert!(matches!(
            ShadowPool::new(1, Hpa(0x123)),
            Err(PoolError::Base(_))
        ));
    }
}
