//! [`SparseMemory`]: guest-physical memory without a VM, for tests,
//! fuzzers and benches (feature `test-utils`).

use std::collections::HashMap;
use std::sync::Mutex;

use super::mem::{GuestPhysMemory, PhysMemError};
use crate::addr::{Gfn, Gpa, PAGE_SIZE};

const WORDS_PER_PAGE: usize = (PAGE_SIZE / 8) as usize;

/// Guest-physical memory made of 4 KiB frames held in a hash map; frames
/// that were never added are unbacked.
///
/// Meant for tests, fuzzers and benches that need a guest's tables without
/// a VM. Thread-safe.
#[derive(Debug, Default)]
pub struct SparseMemory {
    frames: Mutex<HashMap<Gfn, Box<[u64; WORDS_PER_PAGE]>>>,
}

impl SparseMemory {
    /// Empty memory: every address is unbacked.
    pub fn new() -> Self {
        Self::default()
    }

    /// Backs `gfn` with a zeroed frame (no change if already backed).
    pub fn add_frame(&self, gfn: Gfn) {
        self.lock()
            .entry(gfn)
            .or_insert_with(|| Box::new([0; WORDS_PER_PAGE]));
    }

    /// Removes the frame `gfn`; its addresses become unbacked.
    pub fn remove_frame(&self, gfn: Gfn) {
        self.lock().remove(&gfn);
    }

    /// True if `gfn` is backed.
    pub fn is_backed(&self, gfn: Gfn) -> bool {
        self.lock().contains_key(&gfn)
    }

    /// Writes the aligned u64 at `gpa`.
    pub fn write_u64(&self, gpa: Gpa, value: u64) -> Result<(), PhysMemError> {
        let (gfn, idx) = split(gpa)?;
        let mut frames = self.lock();
        let frame = frames.get_mut(&gfn).ok_or(PhysMemError::Unbacked(gpa))?;
        frame[idx] = value;
        Ok(())
    }

    /// Writes a 4-byte value at a 4-byte aligned `gpa` (a 32-bit paging entry).
    pub fn write_u32(&self, gpa: Gpa, value: u32) -> Result<(), PhysMemError> {
        if !gpa.raw().is_multiple_of(4) {
            return Err(PhysMemError::Misaligned(gpa));
        }
        let word = Gpa(gpa.raw() & !7);
        let shift = (gpa.raw() & 4) * 8;
        let old = self.read_u64(word)?;
        let new = (old & !(0xffff_ffffu64 << shift)) | (u64::from(value) << shift);
        self.write_u64(word, new)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Gfn, Box<[u64; WORDS_PER_PAGE]>>> {
        // A panic while holding this lock cannot leave a frame half-written
        // (every update is one store), so a poisoned lock is still usable.
        self.frames.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn split(gpa: Gpa) -> Result<(Gfn, usize), PhysMemError> {
    if !gpa.raw().is_multiple_of(8) {
        return Err(PhysMemError::Misaligned(gpa));
    }
    Ok((gpa.gfn(), (gpa.page_offset() / 8) as usize))
}

impl GuestPhysMemory for SparseMemory {
    fn read_u64(&self, gpa: Gpa) -> Result<u64, PhysMemError> {
        let (gfn, idx) = split(gpa)?;
        self.lock()
            .get(&gfn)
            .map(|f| f[idx])
            .ok_or(PhysMemError::Unbacked(gpa))
    }

    fn compare_exchange_u64(
        &self,
        gpa: Gpa,
        current: u64,
        new: u64,
    ) -> Result<Result<(), u64>, PhysMemError> {
        let (gfn, idx) = split(gpa)?;
        let mut frames = self.lock();
        let frame = frames.get_mut(&gfn).ok_or(PhysMemError::Unbacked(gpa))?;
        if frame[idx] == current {
            frame[idx] = new;
            Ok(Ok(()))
        } else {
            Ok(Err(frame[idx]))
        }
    }
}
