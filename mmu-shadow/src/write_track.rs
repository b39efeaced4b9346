//! Write protection of the guest page tables the MMU shadows, emulated
//! writes to them, and write-flooding detection.
//!
//! KVM: page_track.c (`kvm_slot_page_track_add_page`), mmu.c's
//! `kvm_mmu_slot_gfn_write_protect` / `rmap_write_protect`,
//! `kvm_mmu_track_write`, `detect_write_flooding` and
//! `detect_write_misaligned`.

use mmu_api::paging::write_bytes;
use mmu_api::{Gfn, Gpa, PAGE_SIZE, VcpuError};

use crate::backend::Inner;
use crate::pool::FrameId;
use crate::spte::Spte;
use crate::state::MmuState;
use crate::zap::Flush;

impl MmuState {
    /// True if `gfn` holds a guest page table some shadow page shadows.
    pub(crate) fn is_write_protected(&self, gfn: Gfn) -> bool {
        self.gfn_pages.get(&gfn).is_some_and(|v| !v.is_empty())
    }

    /// Removes write access from every leaf SPTE mapping `gfn`.
    pub(crate) fn write_protect_gfn(&mut self, gfn: Gfn) -> Flush {
        let Some(ptrs) = self.rmap.get(gfn) else {
            return Flush::NONE;
        };
        let mut flush = Flush::NONE;
        for p in ptrs.as_slice() {
            let spte = Spte(self.pool.load(p.sp, usize::from(p.index)));
            if spte.is_writable() {
                self.pool
                    .store(p.sp, usize::from(p.index), spte.write_protected().0);
                flush = Flush::TLB;
            }
        }
        flush
    }

    /// Removes write access from every leaf mapping a gfn in `[start, end)`.
    pub(crate) fn write_protect_range(&mut self, start: Gfn, end: Gfn) -> Flush {
        let mut flush = Flush::NONE;
        for g in self.rmap.keys_in_range(start, end) {
            flush |= self.write_protect_gfn(g);
        }
        flush
    }

    /// Marks `gfn` dirty in its slot's log, if the slot logs.
    pub(crate) fn mark_dirty(&mut self, gfn: Gfn) {
        if self.slots.mark_dirty(gfn) {
            self.counters.dirty_pages_logged += 1;
        }
    }

    /// Keeps the shadow tables coherent with an emulated write of `len`
    /// bytes at `gpa` that already reached guest memory: the SPTEs derived
    /// from the written guest entries are zapped; a page written three
    /// times without being used in between, or written misaligned, is
    /// zapped whole (write flooding).
    pub(crate) fn track_write(&mut self, gpa: Gpa, len: usize) -> Flush {
        self.counters.emulated_writes += 1;
        let gfn = gpa.gfn();
        let offset = gpa.page_offset() as usize;
        let frames: Vec<FrameId> = self.gfn_pages.get(&gfn).cloned().unwrap_or_default();
        let mut flush = Flush::NONE;
        for frame in frames {
            let role = self.page(frame).key.role;
            let size = if role.has_4_byte_gpte { 4 } else { 8 };
            let misaligned = offset % size + len > size;
            let flooded = {
                let p = self.page_mut(frame);
                p.write_flooding = p.write_flooding.saturating_add(1);
                p.write_flooding >= 3
            };
            if misaligned || flooded {
                flush |= self.zap_page(frame);
                self.counters.flooding_zaps += 1;
                continue;
            }
            let entry = offset / size;
            let q = usize::from(role.quadrant);
            let indices: Vec<usize> = match (role.has_4_byte_gpte, role.level.get()) {
                (false, _) => vec![entry],
                (true, 1) if entry / 512 == q => vec![entry % 512],
                (true, 2) if entry / 256 == q => vec![2 * (entry % 256), 2 * (entry % 256) + 1],
                _ => Vec::new(),
            };
            for i in indices {
                flush |= self.drop_spte(frame, i);
            }
        }
        self.mark_dirty(gfn);
        flush
    }
}

impl Inner {
    /// Performs a write the vCPU's instruction emulator made to guest
    /// memory, and keeps the shadow tables coherent with it
    /// ([`MmuState::track_write`]). The write and its zaps happen in one
    /// critical section, so the shadow tables never disagree with the guest
    /// tables while the lock is free ([`audit`](crate::ShadowBackend::audit)
    /// relies on it); a fault that walked the old entry without the lock
    /// sees the change when it re-reads the entry under it.
    pub(crate) fn emulated_write(&self, gpa: Gpa, data: &[u8]) -> Result<(), VcpuError> {
        if data.is_empty() {
            return Ok(());
        }
        if gpa.page_offset() + data.len() as u64 > PAGE_SIZE {
            return Err(VcpuError::CrossesPage {
                gpa,
                len: data.len(),
            });
        }
        self.with_mmu(|st| {
            match st.slot_of(gpa) {
                Some(s) if s.is_writable() => {}
                Some(_) => return (Err(VcpuError::ReadOnly(gpa)), Flush::NONE),
                None => return (Err(VcpuError::Unbacked(gpa)), Flush::NONE),
            }
            if write_bytes(&st.slots.guest_mem(), gpa, data).is_err() {
                return (Err(VcpuError::Unbacked(gpa)), Flush::NONE);
            }
            (Ok(()), st.track_write(gpa, data.len()))
        })
    }
}
