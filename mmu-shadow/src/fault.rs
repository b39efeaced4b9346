//! The fault path: from a hardware #PF on the shadow tables to an installed
//! SPTE, an MMIO exit, an emulated write, or a fault for the guest. Also
//! root resolution and emulated writes to guest page tables.

use mmu_api::paging::{
    GuestPhysMemory, PageFault, PteFlags, Translation, WalkError, WalkOptions, permission_fault,
    walk, walk_with, write_bytes,
};
use mmu_api::{
    Access, AccessKind, AccessMode, FaultOutcome, Gfn, Gpa, Gva, MemslotFlags, MemslotGeneration,
    PAGE_SIZE, PagingContext, PagingMode, PfErrorCode, VcpuError, VcpuId,
};

use crate::pool::{ENTRIES_PER_PAGE, FrameId};
use crate::role::{Access3, Role, SpKey};
use crate::spte::{Spte, mmio};
use crate::state::{CachedRoot, MmuState, ROOT_CACHE_SIZE};

/// Index of `gva` in a shadow table of `level` (standard 4/5-level layout).
pub(crate) fn shadow_index(gva: u64, level: u8) -> usize {
    ((gva >> (12 + 9 * (u32::from(level) - 1))) & 0x1ff) as usize
}

/// Bytes one shadow page of `level` covers.
fn coverage(level: u8) -> u64 {
    1u64 << (12 + 9 * u32::from(level))
}

/// Root level of the shadow tables for a guest context.
pub(crate) fn root_level(ctx: &PagingContext) -> u8 {
    if ctx.mode() == PagingMode::Level5 {
        5
    } else {
        4
    }
}

/// Reads a guest entry (4 or 8 bytes) at `gpa`.
fn read_gpte<M: GuestPhysMemory + ?Sized>(mem: &M, gpa: Gpa, four_byte: bool) -> Option<u64> {
    if four_byte {
        let word = mem.read_u64(Gpa(gpa.raw() & !7)).ok()?;
        Some((word >> ((gpa.raw() & 4) * 8)) & 0xffff_ffff)
    } else {
        mem.read_u64(gpa).ok()
    }
}

/// Rights of one guest entry (PAE PDPTEs grant everything).
fn entry_access(ctx: &PagingContext, level: u8, raw: u64) -> Access3 {
    if ctx.mode() == PagingMode::Pae && level == 3 {
        return Access3::ALL;
    }
    Access3 {
        write: raw & PteFlags::WRITABLE.bits() != 0,
        user: raw & PteFlags::USER.bits() != 0,
        exec: !(ctx.nx_enabled() && raw & PteFlags::NO_EXECUTE.bits() != 0),
    }
}

/// The AND of the rights of every guest entry above `level`.
fn access_above(ctx: &PagingContext, t: &Translation, level: u8) -> Access3 {
    t.steps()
        .iter()
        .filter(|s| s.level > level)
        .fold(Access3::ALL, |acc, s| {
            let a = entry_access(ctx, s.level, s.entry.raw());
            Access3 {
                write: acc.write && a.write,
                user: acc.user && a.user,
                exec: acc.exec && a.exec,
            }
        })
}

/// The spte the WP=0 / SMEP rules and the guest's rights allow for this
/// access, before memslot, write-protection and dirty-logging limits.
struct LeafRights {
    write: bool,
    user: bool,
    exec: bool,
}

fn leaf_rights(ctx: &PagingContext, t: &Translation, access: Access) -> LeafRights {
    let r = t.rights;
    let mut lr = LeafRights {
        write: r.write,
        user: r.user,
        exec: r.exec,
    };
    // CR0.WP = 0: a supervisor write to a read-only page is allowed. Map it
    // writable but kernel-only so user accesses still fault, and with SMEP
    // also not executable (the page may be a user page SMEP protects).
    if access.is_write() && !access.is_user() && !r.write && !ctx.wp() {
        lr.write = true;
        lr.user = false;
        if ctx.smep() && r.user {
            lr.exec = false;
        }
    }
    lr
}

impl MmuState {
    /// The root key for a guest context, and the PDPTEs for PAE guests.
    pub(crate) fn root_key(&self, ctx: &PagingContext) -> (SpKey, Option<[u64; 4]>) {
        let mut role = Role::base(ctx);
        role.level = root_level(ctx);
        match ctx.mode() {
            PagingMode::NoPaging => (SpKey { gfn: Gfn(0), role }, None),
            PagingMode::Bits32 => {
                role.passthrough = true;
                let gfn = Gfn((ctx.cr3 & 0xffff_f000) >> 12);
                (SpKey { gfn, role }, None)
            }
            PagingMode::Pae => {
                role.passthrough = true;
                let base = ctx.cr3 & 0xffff_ffe0;
                role.quadrant = ((base >> 5) & 0x7f) as u8;
                let mem = self.guest_mem();
                let mut pdptes = [0u64; 4];
                for (i, p) in pdptes.iter_mut().enumerate() {
                    *p = mem.read_u64(Gpa(base + 8 * i as u64)).unwrap_or(0);
                }
                (
                    SpKey {
                        gfn: Gfn(base >> 12),
                        role,
                    },
                    Some(pdptes),
                )
            }
            PagingMode::Level4 | PagingMode::Level5 => {
                let gfn = Gfn((ctx.cr3 & ctx.phys_mask() & 0x000f_ffff_ffff_f000) >> 12);
                (SpKey { gfn, role }, None)
            }
        }
    }

    /// Finds or builds the root for `ctx` in `vcpu`'s root cache and makes
    /// it current.
    pub(crate) fn resolve_root(
        &mut self,
        vcpu: VcpuId,
        ctx: &PagingContext,
    ) -> Result<FrameId, VcpuError> {
        let (key, pdptes) = self.root_key(ctx);
        let valid_gen = self.valid_gen;
        let cache = self.roots.entry(vcpu).or_default();
        // Drop cached roots that were zapped or are obsolete.
        let mut stale = Vec::new();
        let pages = &self.pages;
        cache.entries.retain(|e| {
            let invalid = pages[e.frame as usize]
                .as_ref()
                .is_none_or(|p| p.invalid || p.generation != valid_gen);
            if invalid {
                stale.push(e.frame);
            }
            !invalid
        });
        let hit = cache
            .entries
            .iter()
            .position(|e| e.key == key && e.pdptes == pdptes);
        if let Some(pos) = hit {
            let mut e = cache.entries.remove(pos).expect("position is valid");
            e.ctx = *ctx;
            cache.entries.push_front(e);
            for f in stale {
                self.put_root(f);
            }
            self.counters.root_cache_hits += 1;
            self.commit_zap();
            return Ok(e.frame);
        }
        for f in stale {
            self.put_root(f);
        }

        self.make_pages_available(u64::from(root_level(ctx)) + 2);
        let frame = match self.lookup(&key) {
            Some(f) if self.page(f).pdptes == pdptes => f,
            Some(f) => {
                // A PAE root built from other PDPTEs: the PDPTEs are loaded
                // at CR3 load, so rebuild it and its PDPT page.
                self.zap_page(f);
                let mut pdpt = key;
                pdpt.role.level = 3;
                if let Some(p) = self.lookup(&pdpt) {
                    self.zap_page(p);
                }
                self.commit_zap();
                self.alloc_page(key)?
            }
            None => self.alloc_page(key)?,
        };
        if self.page(frame).root_count == 0 && self.window.is_some() {
            let level = self.page(frame).key.role.level;
            let index = if level == 5 { 48 } else { 39 };
            let w = self.window.expect("checked");
            if self
                .pool
                .load(frame, ((w.gva.raw() >> index) & 0x1ff) as usize)
                == 0
            {
                self.link_window(frame, level);
            }
        }
        let page = self.page_mut(frame);
        page.pdptes = pdptes;
        page.root_count += 1;
        let cache = self.roots.entry(vcpu).or_default();
        cache.entries.push_front(CachedRoot {
            ctx: *ctx,
            key,
            pdptes,
            frame,
        });
        let evicted = if cache.entries.len() > ROOT_CACHE_SIZE {
            cache.entries.pop_back()
        } else {
            None
        };
        if let Some(e) = evicted {
            self.put_root(e.frame);
        }
        self.counters.root_loads += 1;
        self.commit_zap();
        Ok(frame)
    }

    /// The key of the shadow page at `level` on the path to `gva`.
    fn path_key(
        &self,
        ctx: &PagingContext,
        root: &SpKey,
        t: &Translation,
        gva: u64,
        level: u8,
    ) -> SpKey {
        let base = Role::base(ctx);
        let mode = ctx.mode();
        let direct = |level: u8, gpa: u64, access: Access3| SpKey {
            gfn: Gfn((gpa & !(coverage(level) - 1)) >> 12),
            role: Role {
                level,
                direct: true,
                access,
                ..base
            },
        };
        if mode == PagingMode::NoPaging {
            return direct(level, gva & 0xffff_ffff, Access3::ALL);
        }
        let leaf_level = t.leaf().map_or(1, |s| s.level);
        if level < leaf_level {
            // Pieces of a guest large page. A clean large page never shares
            // a page with a dirty mapping of the same range (whose SPTEs may
            // be writable), so its first write faults and sets D.
            let mut key = direct(level, t.gpa.raw(), t.rights.into());
            key.role.guest_dirty = t
                .leaf()
                .is_some_and(|l| l.entry.raw() & PteFlags::DIRTY.bits() != 0);
            return key;
        }
        let table_gfn = |l: u8| {
            t.steps()
                .iter()
                .find(|s| s.level == l)
                .map_or(Gfn(0), |s| s.entry_gpa.gfn())
        };
        let mut key = SpKey {
            gfn: table_gfn(level),
            role: Role {
                level,
                access: access_above(ctx, t, level),
                ..base
            },
        };
        match mode {
            PagingMode::Pae | PagingMode::Bits32 if level == 3 => {
                // The PDPT level: owned by the root, not in guest memory.
                key = *root;
                key.role.level = 3;
            }
            PagingMode::Bits32 if level == 2 => key.role.quadrant = ((gva >> 30) & 3) as u8,
            PagingMode::Bits32 => key.role.quadrant = ((gva >> 21) & 1) as u8,
            _ => {}
        }
        key
    }

    /// Answers a reserved-bit #PF from the MMIO SPTE at `gva` alone (no
    /// guest walk, no memslot search) when its generation is current and
    /// the guest's rights allow the access. `None`: take the full path.
    fn mmio_fast_path(
        &mut self,
        ctx: &PagingContext,
        root: FrameId,
        gva: Gva,
        access: Access,
        generation: MemslotGeneration,
        bits: u8,
    ) -> Option<FaultOutcome> {
        let mut sp = root;
        let mut level = self.page(root).key.role.level;
        let spte = loop {
            let spte = self.pool.load(sp, shadow_index(gva.raw(), level));
            if level == 1 || spte & 1 == 0 {
                break spte;
            }
            sp = self.pool.frame_at(Spte(spte).addr())?;
            level -= 1;
        };
        if level != 1 || !self.is_mmio_spte(spte) {
            return None;
        }
        let (gfn, tag, rights) = mmio::decode(spte);
        if generation.update_in_progress() || tag != mmio::tag(generation.count(), bits) {
            self.counters.mmio_stale += 1;
            return None;
        }
        // A write needs W in the SPTE, not just the guest's permission: W is
        // only set once the guest's D bit is, and with CR0.WP = 0 a supervisor
        // write the rights check allows could still owe the guest its D bit.
        if permission_fault(ctx, rights, None, access).is_some()
            || (access.is_write() && !rights.write)
        {
            return None;
        }
        self.counters.mmio_fast_hits += 1;
        Some(FaultOutcome::Mmio {
            gpa: Gpa(gfn.gpa().raw() | gva.page_offset()),
        })
    }

    /// Serves a #PF the hardware raised on the shadow tables of `root`.
    /// `generation` is the published memslot generation; `mmio_bits` the
    /// generation bits MMIO SPTEs carry (`None`: MMIO caching off).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn handle_fault(
        &mut self,
        ctx: &PagingContext,
        root: FrameId,
        gva: Gva,
        error_code: PfErrorCode,
        prefetch: usize,
        generation: MemslotGeneration,
        mmio_bits: Option<u8>,
    ) -> Result<FaultOutcome, VcpuError> {
        self.counters.faults += 1;
        let kind = if error_code.contains(PfErrorCode::FETCH) {
            AccessKind::Fetch
        } else if error_code.contains(PfErrorCode::WRITE) {
            AccessKind::Write
        } else {
            AccessKind::Read
        };
        let mode = if error_code.contains(PfErrorCode::USER) {
            AccessMode::User
        } else {
            AccessMode::Supervisor
        };
        let access = Access { kind, mode };
        if self.in_window(gva, self.page(root).key.role.level) {
            // Reserved for the host window.
            self.counters.faults_injected += 1;
            return Ok(FaultOutcome::InjectGeneralProtection);
        }
        if self.is_obsolete(root) {
            // The vCPU reloads its root before it enters again.
            return Ok(FaultOutcome::Retry);
        }
        if let Some(bits) = mmio_bits
            && error_code.contains(PfErrorCode::RSVD)
            && let Some(out) = self.mmio_fast_path(ctx, root, gva, access, generation, bits)
        {
            return Ok(out);
        }
        self.make_pages_available(u64::from(root_level(ctx)) + 1);

        let t = match walk(ctx, &self.guest_mem(), gva, access) {
            Ok(t) => t,
            Err(WalkError::PageFault(PageFault { error_code, .. })) => {
                self.counters.faults_injected += 1;
                tracing::trace!(
                    gva = gva.raw(),
                    error_code = error_code.bits(),
                    "guest page fault"
                );
                return Ok(FaultOutcome::InjectPageFault {
                    error_code,
                    cr2: gva,
                });
            }
            Err(WalkError::NonCanonical(_) | WalkError::InvalidPdpte { .. }) => {
                self.counters.faults_injected += 1;
                return Ok(FaultOutcome::InjectGeneralProtection);
            }
            Err(WalkError::Contended) => return Ok(FaultOutcome::Retry),
            Err(WalkError::InvalidContext(e)) => return Err(VcpuError::Context(e)),
            Err(other) => return Err(VcpuError::Walk(other)),
        };
        // The entries as the walk left them. Read back rather than taken from
        // the walk: a frame used at two levels of the same walk (aliasing)
        // has its entry changed by the walk's own A/D update.
        let four_byte = ctx.mode() == PagingMode::Bits32;
        let snapshot: Vec<Option<u64>> = {
            let mem = self.guest_mem();
            t.steps()
                .iter()
                .map(|s| read_gpte(&mem, s.entry_gpa, four_byte))
                .collect()
        };
        let gpa = t.gpa;
        let gfn = gpa.gfn();
        let slot = self.slot_of(gpa);
        // MMIO SPTEs carry the memslot generation; none is made while an
        // update is in progress, nor when protection keys would have to be
        // checked on a cached answer.
        let cache_mmio = mmio_bits.filter(|_| {
            slot.is_none()
                && !generation.update_in_progress()
                && !ctx.pke_active()
                && mmio::fits(gfn)
        });
        if (slot.is_none() && cache_mmio.is_none())
            || (access.is_write() && slot.is_some_and(|s| !s.is_writable()))
        {
            self.counters.faults_mmio += 1;
            return Ok(FaultOutcome::Mmio { gpa });
        }

        // Build the path down to the level-1 shadow page.
        let root_key = self.page(root).key;
        let levels = root_key.role.level;
        let mut sp = root;
        for level in (2..=levels).rev() {
            let index = shadow_index(gva.raw(), level);
            let child_key = self.path_key(ctx, &root_key, &t, gva.raw(), level - 1);
            let spte = Spte(self.pool.load(sp, index));
            let mut linked = None;
            if spte.is_present() {
                let child = self
                    .pool
                    .frame_at(spte.addr())
                    .expect("links stay in the pool");
                if self.page(child).key == child_key {
                    linked = Some(child);
                } else {
                    self.drop_spte(sp, index);
                }
            }
            let child = match linked {
                Some(c) => c,
                None => {
                    let c = self.get_or_create(child_key)?;
                    self.link(sp, index, c);
                    c
                }
            };
            self.page_mut(child).write_flooding = 0;
            sp = child;
        }

        // The guest may have changed an entry between the walk and the
        // write protection the path just set up: then walk again.
        let mem = self.guest_mem();
        for (step, before) in t.steps().iter().zip(&snapshot) {
            if read_gpte(&mem, step.entry_gpa, four_byte) != *before {
                self.commit_zap();
                return Ok(FaultOutcome::Retry);
            }
        }

        let guest_dirty = t
            .leaf()
            .is_none_or(|l| l.entry.raw() & PteFlags::DIRTY.bits() != 0);
        let index = shadow_index(gva.raw(), 1);
        let Some(slot) = slot else {
            // Cache the MMIO answer: writable only if the guest's D is set,
            // so the first write walks and sets it.
            let bits = cache_mmio.expect("set when no slot backs the gfn");
            let mut rights = t.rights;
            rights.write &= guest_dirty;
            let spte = mmio::encode(gfn, generation.count(), bits, rights);
            self.set_mmio_leaf(sp, index, gfn, spte);
            self.counters.faults_mmio += 1;
            self.commit_zap();
            return Ok(FaultOutcome::Mmio { gpa });
        };
        let lr = leaf_rights(ctx, &t, access);
        let hidden_from_smap = ctx.smap() && t.rights.user && !lr.user;
        if access.is_write() && (self.is_write_protected(gfn) || hidden_from_smap) {
            // A write to a guest page table (or, with SMAP and CR0.WP = 0, a
            // supervisor write that no kernel-only mapping can express
            // without hiding the page from SMAP): emulate it.
            self.counters.write_protect_hits += 1;
            self.commit_zap();
            return Ok(FaultOutcome::Emulate { gpa });
        }
        let mut write =
            lr.write && slot.is_writable() && !self.is_write_protected(gfn) && guest_dirty;
        if slot.flags.contains(MemslotFlags::LOG_DIRTY) {
            if access.is_write() {
                self.mark_dirty(gfn);
            } else {
                write = false;
            }
        }
        let hpa = slot.hpa_of(gfn.gpa()).expect("gfn is in the slot");
        let mut spte = Spte::leaf(hpa, write, lr.user, lr.exec);
        if let Some(key) = t.pkey {
            spte = spte.with_pkey(key);
        }
        self.set_leaf(sp, index, gfn, spte);
        if prefetch > 1 {
            self.prefetch(ctx, &t, sp, gva, index, prefetch);
        }
        self.counters.faults_fixed += 1;
        tracing::trace!(
            gva = gva.raw(),
            gpa = gpa.raw(),
            write,
            "shadow fault fixed"
        );
        self.commit_zap();
        Ok(FaultOutcome::Retry)
    }

    /// Maps the neighbours of `index` in level-1 page `sp` whose guest PTEs
    /// are present and accessed (KVM's prefetch). Never sets guest A/D bits.
    fn prefetch(
        &mut self,
        ctx: &PagingContext,
        t: &Translation,
        sp: FrameId,
        gva: Gva,
        index: usize,
        count: usize,
    ) {
        let count = count.next_power_of_two().min(ENTRIES_PER_PAGE);
        let first = index & !(count - 1);
        let key = self.page(sp).key;
        let mut peek = *ctx;
        peek.cr4
            .remove(mmu_api::paging::Cr4::SMAP | mmu_api::paging::Cr4::PKE);
        peek.cpl = 0;
        let no_ad = WalkOptions::without_accessed_dirty();
        for j in first..first + count {
            if j == index || Spte(self.pool.load(sp, j)).is_present() {
                continue;
            }
            let gva_j = (gva.raw() & !(0x1ff << 12)) | ((j as u64) << 12);
            let (gfn_j, rights, dirty, pkey) = if key.role.direct {
                let dirty = t
                    .leaf()
                    .is_none_or(|l| l.entry.raw() & PteFlags::DIRTY.bits() != 0);
                (Gfn(key.gfn.raw() + j as u64), t.rights, dirty, t.pkey)
            } else {
                let mem = self.guest_mem();
                let Ok(tj) = walk_with(
                    &peek,
                    &mem,
                    Gva(gva_j),
                    Access::supervisor(AccessKind::Read),
                    no_ad,
                ) else {
                    continue;
                };
                let Some(leaf) = tj.leaf() else { continue };
                let accessed = leaf.entry.raw() & PteFlags::ACCESSED.bits() != 0;
                if leaf.level != 1 || !accessed || leaf.entry_gpa.gfn() != key.gfn {
                    continue;
                }
                let dirty = leaf.entry.raw() & PteFlags::DIRTY.bits() != 0;
                let pkey = ctx.pke_active().then(|| leaf.entry.pkey());
                (tj.gpa.gfn(), tj.rights, dirty, pkey)
            };
            let Some(slot) = self.slots.find_gfn(gfn_j).copied() else {
                continue;
            };
            let write = rights.write
                && dirty
                && slot.is_writable()
                && !slot.flags.contains(MemslotFlags::LOG_DIRTY)
                && !self.is_write_protected(gfn_j);
            let hpa = slot.hpa_of(gfn_j.gpa()).expect("gfn is in the slot");
            let mut spte = Spte::leaf(hpa, write, rights.user, rights.exec);
            if let Some(k) = pkey {
                spte = spte.with_pkey(k);
            }
            self.set_leaf(sp, j, gfn_j, spte);
            self.counters.prefetched += 1;
        }
    }

    /// Performs a write the vCPU's instruction emulator made to guest
    /// memory, and keeps the shadow tables coherent with it: the SPTEs
    /// derived from the written guest entries are zapped; a page written
    /// three times without being used in between, or written misaligned,
    /// is zapped whole (write flooding).
    pub(crate) fn emulated_write(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), VcpuError> {
        if data.is_empty() {
            return Ok(());
        }
        if gpa.page_offset() + data.len() as u64 > PAGE_SIZE {
            return Err(VcpuError::CrossesPage {
                gpa,
                len: data.len(),
            });
        }
        let slot = self.slot_of(gpa).ok_or(VcpuError::Unbacked(gpa))?;
        if !slot.is_writable() {
            return Err(VcpuError::ReadOnly(gpa));
        }
        write_bytes(&self.guest_mem(), gpa, data).map_err(|_| VcpuError::Unbacked(gpa))?;
        self.counters.emulated_writes += 1;

        let gfn = gpa.gfn();
        let offset = gpa.page_offset() as usize;
        let frames = self.gfn_pages.get(&gfn).cloned().unwrap_or_default();
        for frame in frames {
            let role = self.page(frame).key.role;
            let size = if role.has_4_byte_gpte { 4 } else { 8 };
            let misaligned = offset % size + data.len() > size;
            let flooded = {
                let p = self.page_mut(frame);
                p.write_flooding = p.write_flooding.saturating_add(1);
                p.write_flooding >= 3
            };
            if misaligned || flooded {
                self.zap_page(frame);
                self.counters.flooding_zaps += 1;
                continue;
            }
            let entry = offset / size;
            let q = usize::from(role.quadrant);
            let indices: Vec<usize> = match (role.has_4_byte_gpte, role.level) {
                (false, _) => vec![entry],
                (true, 1) if entry / 512 == q => vec![entry % 512],
                (true, 2) if entry / 256 == q => vec![2 * (entry % 256), 2 * (entry % 256) + 1],
                _ => Vec::new(),
            };
            for i in indices {
                self.drop_spte(frame, i);
            }
        }
        self.mark_dirty(gfn);
        self.commit_zap();
        Ok(())
    }
}
