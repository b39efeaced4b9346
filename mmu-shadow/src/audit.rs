//! `audit()`: checks every invariant of the shadow MMU (KVM: mmu.c's
//! `MMU_WARN_ON` checks and the old mmu_audit.c).

use mmu_api::paging::{Cr4, PteFlags, WalkOptions, walk_with};
use mmu_api::{Access, AccessKind, Gva, MemslotFlags, PagingMode};

use crate::ShadowBackend;
use crate::pool::{ENTRIES_PER_PAGE, FrameId};
use crate::rmap::SptePtr;
use crate::root::CachedRoot;
use crate::spte::{Spte, mmio};
use crate::state::MmuState;

/// Broken invariants found by [`ShadowBackend::audit`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} shadow MMU invariant(s) broken: {}", .problems.len(), .problems.join("; "))]
pub struct AuditError {
    /// One line per broken invariant.
    pub problems: Vec<String>,
}

impl ShadowBackend {
    /// Checks every invariant of the shadow MMU:
    ///
    /// - the hash, the active list and the per-gfn page lists agree with
    ///   the pages; invalid pages are roots still in use;
    /// - every link points to a live page one level down whose parent list
    ///   holds it, and every parent-list entry is such a link;
    /// - every present leaf is in the rmap and every rmap entry is a present
    ///   leaf; each leaf maps the frame of its gfn inside a memslot's
    ///   backing (never the shadow pool, never outside guest memory);
    /// - no leaf is writable in a read-only slot, for a shadowed guest page
    ///   table, or for a page not yet logged dirty in a logging slot;
    /// - following each vCPU's cached roots, every leaf grants no more than
    ///   the guest's own walk of that address (and writable only if the
    ///   guest's D bit is set);
    /// - obsolete pages are the oldest on the active list and their count is
    ///   the pending count; a current MMIO SPTE names a gfn no memslot
    ///   backs; MMIO SPTEs are never in the rmap;
    /// - the page count matches the pool (pages plus the zapped-obsolete
    ///   list).
    pub fn audit(&self) -> Result<(), AuditError> {
        let st = self.inner.lock();
        // Read under the lock: memslot updates begin under it.
        let generation = self.inner.generation();
        let mmio_tag = self
            .inner
            .mmio_bits()
            .filter(|_| !generation.update_in_progress())
            .map(|bits| mmio::tag(generation.count(), bits));
        let mut problems = Vec::new();
        audit_pages(&st, mmio_tag, &mut problems);
        audit_generations(&st, &mut problems);
        audit_rmap(&st, &mut problems);
        let roots: Vec<CachedRoot> = st
            .roots
            .values()
            .flat_map(|c| c.entries.iter().copied())
            .collect();
        for root in roots {
            audit_against_guest(&st, &root, &mut problems);
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(AuditError { problems })
        }
    }
}

fn audit_generations(st: &MmuState, problems: &mut Vec<String>) {
    let mut seen_valid = false;
    let mut obsolete = 0;
    for &f in st.active.values() {
        let is_obsolete = st.page(f).generation != st.valid_gen;
        if is_obsolete {
            obsolete += 1;
            if seen_valid {
                problems.push(format!("obsolete page {f} is younger than a valid page"));
            }
        } else {
            seen_valid = true;
        }
    }
    if obsolete != st.obsolete_pending {
        problems.push(format!(
            "{obsolete} obsolete pages on the active list, {} counted pending",
            st.obsolete_pending
        ));
    }
}

fn audit_pages(st: &MmuState, mmio_tag: Option<u64>, problems: &mut Vec<String>) {
    let mut count = 0u64;
    for (frame, page) in st.pages.iter().enumerate() {
        let Some(page) = page else { continue };
        let frame = frame as FrameId;
        count += 1;
        let key = page.key;
        if key.role.host_window {
            // Pinned: maps the pool itself, for replay; links checked from
            // the roots' side below.
            continue;
        }
        let obsolete = page.invalid || page.generation != st.valid_gen;
        if page.invalid {
            if page.root_count == 0 {
                problems.push(format!("invalid page {frame} has no root user"));
            }
        } else {
            if st.hash.get(&(key, page.generation)) != Some(&frame) {
                problems.push(format!("page {frame} is not in the hash under its key"));
            }
            if st.active.get(&page.seq) != Some(&frame) {
                problems.push(format!("page {frame} is not in the active list"));
            }
            if key.role.shadows_guest_table()
                && !st
                    .gfn_pages
                    .get(&key.gfn)
                    .is_some_and(|v| v.contains(&frame))
            {
                problems.push(format!("page {frame} is not listed for gfn {}", key.gfn));
            }
        }
        for p in &page.parents {
            let link = Spte(st.pool.load(p.sp, usize::from(p.index)));
            let parent_level = st.pages[p.sp as usize].as_ref().map(|pp| pp.key.role.level);
            if !link.is_present() || link.addr() != st.pool.hpa(frame) {
                problems.push(format!(
                    "parent entry {p:?} of page {frame} does not link to it"
                ));
            }
            if parent_level.map(|l| l.get()) != Some(key.role.level.get() + 1) {
                problems.push(format!("parent {p:?} of page {frame} is not one level up"));
            }
        }
        for i in 0..ENTRIES_PER_PAGE {
            let spte = Spte(st.pool.load(frame, i));
            if !spte.is_present() {
                continue;
            }
            let ptr = SptePtr {
                sp: frame,
                index: i as u16,
            };
            if !key.role.level.is_pt() {
                let child = st.pool.frame_at(spte.addr());
                match child.and_then(|c| st.pages[c as usize].as_ref().map(|p| (c, p))) {
                    None => problems.push(format!("link {ptr:?} points outside live pages")),
                    Some((c, p)) => {
                        if !p.parents.contains(&ptr) {
                            problems.push(format!("page {c} lacks parent {ptr:?}"));
                        }
                        if p.key.role.level.get() + 1 != key.role.level.get() {
                            problems.push(format!("link {ptr:?} skips a level"));
                        }
                        let child_obsolete =
                            !p.key.role.host_window && (p.invalid || p.generation != st.valid_gen);
                        if !obsolete && child_obsolete {
                            problems.push(format!("valid page {frame} links obsolete page {c}"));
                        }
                    }
                }
                continue;
            }
            let gfn = page.leaf_gfns.as_ref().expect("level 1").get(i);
            if st.is_mmio_spte(spte.0) {
                let (mgfn, tag, _) = st.decode_mmio(spte.0);
                if mgfn != gfn {
                    problems.push(format!("MMIO leaf {ptr:?} names {mgfn}, recorded {gfn}"));
                }
                if st.rmap.contains(gfn, ptr) {
                    problems.push(format!("MMIO leaf {ptr:?} is in the rmap"));
                }
                // A window leaf is current until a memslot covers its gfn
                // (which zaps it); a reserved-bit one while its tag is.
                let current = tag.is_none() || tag == mmio_tag;
                if !obsolete && current && st.slots.table.find_gfn(gfn).is_some() {
                    problems.push(format!(
                        "current MMIO leaf {ptr:?} names gfn {gfn}, which a memslot backs"
                    ));
                }
                continue;
            }
            if !st.rmap.contains(gfn, ptr) {
                problems.push(format!("leaf {ptr:?} for gfn {gfn} is not in the rmap"));
            }
            if obsolete {
                // Out of every vCPU's reach once the reload handshake ended;
                // its memslot may be gone.
                continue;
            }
            let Some(slot) = st.slots.table.find_gfn(gfn) else {
                problems.push(format!("leaf {ptr:?} maps gfn {gfn} outside every memslot"));
                continue;
            };
            if Some(spte.addr()) != slot.hpa_of(gfn.gpa()) || st.pool.contains(spte.addr()) {
                problems.push(format!(
                    "leaf {ptr:?} maps {} instead of gfn {gfn}'s frame",
                    spte.addr()
                ));
            }
            if spte.is_writable() {
                if !slot.is_writable() {
                    problems.push(format!("leaf {ptr:?} is writable in read-only {}", slot.id));
                }
                if st.is_write_protected(gfn) {
                    problems.push(format!(
                        "leaf {ptr:?} is writable for shadowed table gfn {gfn}"
                    ));
                }
                if slot.flags.contains(MemslotFlags::LOG_DIRTY) && !st.slots.is_dirty(slot, gfn) {
                    problems.push(format!(
                        "leaf {ptr:?} is writable but gfn {gfn} is not logged dirty"
                    ));
                }
            }
        }
    }
    let zapped = st.zapped_obsolete.len() as u64;
    if count + zapped + st.flushing != st.used_pages() {
        problems.push(format!(
            "{count} pages in metadata, {zapped} zapped obsolete and {} being flushed, {} frames in use",
            st.flushing,
            st.used_pages()
        ));
    }
    for f in &st.zapped_obsolete {
        if st.pages[*f as usize].is_some()
            || (0..ENTRIES_PER_PAGE).any(|i| st.pool.load(*f, i) != 0)
        {
            problems.push(format!("zapped obsolete frame {f} is not clean"));
        }
    }
    for (gfn, frames) in &st.gfn_pages {
        for f in frames {
            let ok = st.pages[*f as usize].as_ref().is_some_and(|p| {
                !p.invalid && p.key.gfn == *gfn && p.key.role.shadows_guest_table()
            });
            if !ok {
                problems.push(format!("gfn {gfn} lists page {f} that does not shadow it"));
            }
        }
    }
}

fn audit_rmap(st: &MmuState, problems: &mut Vec<String>) {
    for (gfn, ptrs) in st.rmap.entries() {
        let gfn = &gfn;
        for p in ptrs.as_slice() {
            let ok = st.pages[p.sp as usize].as_ref().is_some_and(|page| {
                page.key.role.level.is_pt()
                    && Spte(st.pool.load(p.sp, usize::from(p.index))).is_present()
                    && page
                        .leaf_gfns
                        .as_ref()
                        .expect("level 1")
                        .get(usize::from(p.index))
                        == *gfn
            });
            if !ok {
                problems.push(format!(
                    "rmap entry {p:?} for gfn {gfn} is not a present leaf of it"
                ));
            }
        }
    }
}

/// Walks the shadow tree of one cached root and compares every leaf with the
/// guest's own translation of the same address.
fn audit_against_guest(st: &MmuState, root: &CachedRoot, problems: &mut Vec<String>) {
    let Some(page) = st.pages[root.frame as usize].as_ref() else {
        problems.push(format!("cached root {} is not a page", root.frame));
        return;
    };
    if page.invalid || page.generation != st.valid_gen {
        return; // The vCPU reloads before it enters again.
    }
    let ctx = root.ctx;
    if ctx.mode() == PagingMode::Pae {
        // PDPTEs are registers: if memory changed since the CR3 load, the
        // guest's walk of memory is not what the root was built from.
        let (_, now) = st.root_key(&ctx);
        if now != page.pdptes {
            return;
        }
    }
    let mut peek = ctx;
    peek.cr4.remove(Cr4::SMAP | Cr4::PKE);
    peek.cpl = 0;
    let mem = st.slots.guest_mem();
    let top = page.key.role.level.get();
    let mut stack = vec![(root.frame, top, 0u64)];
    while let Some((frame, level, base)) = stack.pop() {
        for i in 0..ENTRIES_PER_PAGE {
            let spte = Spte(st.pool.load(frame, i));
            if !spte.is_present() {
                continue;
            }
            let mut gva = base | ((i as u64) << (12 + 9 * (u32::from(level) - 1)));
            if level == top {
                let bits = 12 + 9 * u32::from(top);
                gva = ((gva << (64 - bits)) as i64 >> (64 - bits)) as u64;
            }
            if level > 1 {
                if let Some(child) = st.pool.frame_at(spte.addr())
                    && !st.page(child).key.role.host_window
                {
                    stack.push((child, level - 1, gva));
                }
                continue;
            }
            debug_assert_eq!(crate::page::PtLevel::PT.index(gva), i);
            let is_mmio = st.is_mmio_spte(spte.0);
            let t = walk_with(
                &peek,
                &mem,
                Gva(gva),
                Access::supervisor(AccessKind::Read),
                WalkOptions::without_accessed_dirty(),
            );
            let Ok(t) = t else {
                problems.push(format!(
                    "leaf for gva {gva:#x} exists but the guest walk fails: {t:?}"
                ));
                continue;
            };
            let gfn = st.pages[frame as usize]
                .as_ref()
                .expect("live")
                .leaf_gfns
                .as_ref()
                .expect("level 1")
                .get(i);
            if t.gpa.gfn() != gfn {
                problems.push(format!(
                    "leaf for gva {gva:#x} maps gfn {gfn}, the guest maps {}",
                    t.gpa.gfn()
                ));
            }
            let r = t.rights;
            if is_mmio {
                let (_, _, m) = st.decode_mmio(spte.0);
                let dirty = t
                    .leaf()
                    .is_none_or(|l| l.entry.raw() & PteFlags::DIRTY.bits() != 0);
                if (m.write && !(r.write && dirty)) || (m.user && !r.user) || (m.exec && !r.exec) {
                    problems.push(format!(
                        "MMIO leaf for gva {gva:#x} grants {m:?} beyond the guest walk {r:?}"
                    ));
                }
                continue;
            }
            let wp_trick = !ctx.wp() && !spte.is_user();
            if spte.is_writable() {
                let dirty = t
                    .leaf()
                    .is_none_or(|l| l.entry.raw() & PteFlags::DIRTY.bits() != 0);
                if !(r.write || wp_trick) || !dirty {
                    problems.push(format!(
                        "leaf for gva {gva:#x} is writable beyond the guest walk"
                    ));
                }
            }
            if spte.is_user() && !r.user {
                problems.push(format!(
                    "leaf for gva {gva:#x} is user beyond the guest walk"
                ));
            }
            if spte.is_executable() && !r.exec {
                problems.push(format!(
                    "leaf for gva {gva:#x} is executable beyond the guest walk"
                ));
            }
        }
    }
}
