//! The reference guest page-table walker.
//!
//! Given a [`PagingContext`], guest-physical memory and an [`Access`], it
//! returns what the CPU would: the translation (guest-physical address, page
//! size, effective rights), or the exact #PF error code, or the #GP the
//! address or the PAE PDPTEs would raise. It sets A and D bits in guest
//! memory the way hardware does, with compare-and-exchange so a concurrent
//! guest write is never lost.
//!
//! Levels are numbered as KVM numbers them: 1 is the PTE, 2 the PDE, 3 the
//! PDPTE, 4 the PML4E, 5 the PML5E.
//!
//! A and D bits are set only when the access succeeds (every entry on the
//! path gets A, a leaf written through gets D). That is what KVM's walker
//! and kvm-unit-tests' `access.c` expect; a real CPU is allowed to set A in
//! upper levels of a walk that then faults (SDM Vol. 3 §4.8), which no guest
//! can rely on.
//!
//! # Example
//!
//! ```
//! use mmu_api::{Access, AccessKind, Gpa, Gva, PageSize, PagingContext, PagingMode};
//! use mmu_api::paging::{CpuFeatures, SparseMemory, walk};
//! use mmu_api::Gfn;
//!
//! // A 4-level guest mapping gva 0x40_0000 to gpa 0x9000 with a 4 KiB page.
//! let mem = SparseMemory::new();
//! for gfn in 1..=4 {
//!     mem.add_frame(Gfn(gfn));
//! }
//! let rw_present = 0x3; // P | W
//! mem.write_u64(Gpa(0x1000), 0x2000 | rw_present).unwrap(); // PML4E[0]
//! mem.write_u64(Gpa(0x2000), 0x3000 | rw_present).unwrap(); // PDPTE[0]
//! mem.write_u64(Gpa(0x3000 + 2 * 8), 0x4000 | rw_present).unwrap(); // PDE[2]
//! mem.write_u64(Gpa(0x4000), 0x9000 | rw_present).unwrap(); // PTE[0]
//!
//! let ctx = PagingContext::for_mode(PagingMode::Level4, 0x1000, 46, CpuFeatures::all()).unwrap();
//! let t = walk(&ctx, &mem, Gva(0x40_0123), Access::supervisor(AccessKind::Write)).unwrap();
//! assert_eq!(t.gpa, Gpa(0x9123));
//! assert_eq!(t.page_size, PageSize::Size4K);
//! // The write set A on every level and D on the leaf.
//! assert_eq!(mem.read_u64(Gpa(0x4000)).unwrap(), 0x9000 | rw_present | 0x60);
//! # use mmu_api::paging::GuestPhysMemory;
//! ```

use crate::addr::{Gpa, Gva, PAGE_SIZE};
use crate::error::ContextError;

use super::access::{Access, AccessKind, AccessMode, PfErrorCode, Rights};
use super::context::{CpuFeatures, Cr4, PagingContext, PagingMode};
use super::entry::{GuestPte, PteFlags};
use super::mem::{GuestPhysMemory, PhysMemError};

/// Size of the page a translation lands in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PageSize {
    /// 4 KiB (a PTE, or no paging).
    Size4K,
    /// 2 MiB (a PDE with PS, PAE or IA-32e).
    Size2M,
    /// 4 MiB (a PDE with PS under 32-bit paging).
    Size4M,
    /// 1 GiB (a PDPTE with PS, IA-32e).
    Size1G,
}

impl PageSize {
    /// The page size in bytes.
    pub const fn bytes(self) -> u64 {
        match self {
            PageSize::Size4K => 4 << 10,
            PageSize::Size2M => 2 << 20,
            PageSize::Size4M => 4 << 20,
            PageSize::Size1G => 1 << 30,
        }
    }
}

/// One paging-structure entry the walk used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct WalkStep {
    /// 1 = PTE ... 5 = PML5E.
    pub level: u8,
    /// Where the entry lives in guest-physical memory.
    pub entry_gpa: Gpa,
    /// Its value (after the walk's own A/D update, for successful walks).
    pub entry: GuestPte,
}

/// A successful translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Translation {
    /// The guest-physical address the access reaches.
    pub gpa: Gpa,
    /// The size of the page it lies in.
    pub page_size: PageSize,
    /// Rights the whole walk grants (the AND of every level).
    pub rights: Rights,
    /// The leaf's protection key, when protection keys are active.
    pub pkey: Option<u8>,
    /// G in the leaf (with CR4.PGE): survives a CR3 load.
    pub global: bool,
    steps: [WalkStep; 5],
    depth: u8,
}

impl Translation {
    /// The entries used, top level first. Empty without paging.
    pub fn steps(&self) -> &[WalkStep] {
        &self.steps[..usize::from(self.depth)]
    }

    /// The leaf entry (the one that mapped the page), if paging is on.
    pub fn leaf(&self) -> Option<&WalkStep> {
        self.steps().last()
    }

    /// The guest-physical address of the start of the mapped page.
    pub fn page_gpa(&self) -> Gpa {
        Gpa(self.gpa.raw() & !(self.page_size.bytes() - 1))
    }
}

/// A #PF the walk raises.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PageFault {
    /// The faulting linear address (what CR2 gets).
    pub address: Gva,
    /// The error code pushed with the fault.
    pub error_code: PfErrorCode,
    /// The level whose entry was not present or had a reserved bit; 0 when
    /// the fault is a permission (or protection-key) fault on the full walk.
    pub level: u8,
    /// Set when a paging structure lies outside guest memory. The fault is
    /// then reported as not present, as KVM reports it.
    pub unbacked_table: Option<Gpa>,
}

/// Why a walk produced no translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum WalkError {
    /// The access raises #PF.
    #[error("page fault at {} (error code {:#x})", .0.address, .0.error_code.bits())]
    PageFault(PageFault),
    /// The linear address is not canonical for the mode: #GP (or #SS), not #PF.
    #[error("non-canonical address {0}")]
    NonCanonical(Gva),
    /// A present PAE PDPTE (any of the four, not only the one the address
    /// uses) has a reserved bit set. The CPU raises #GP when it loads the
    /// PDPTEs at the CR3 load, so the guest never reaches this walk; the
    /// walker reads the PDPTEs as if CR3 was just loaded.
    #[error("PAE PDPTE {index} has reserved bits set: {value:#x}")]
    InvalidPdpte {
        /// Which of the four PDPTEs.
        index: u8,
        /// Its value.
        value: u64,
    },
    /// The registers are not a state a CPU can be in.
    #[error("invalid paging context")]
    InvalidContext(#[source] ContextError),
    /// Another agent kept rewriting the entries while the walk tried to set
    /// A/D bits; the walk gave up after [`MAX_AD_RETRIES`] tries.
    #[error("page-table entries changed on every retry while setting A/D bits")]
    Contended,
}

impl WalkError {
    /// The page fault, if this error is one.
    pub fn page_fault(&self) -> Option<&PageFault> {
        match self {
            WalkError::PageFault(pf) => Some(pf),
            _ => None,
        }
    }
}

/// How many times a walk restarts when its A/D update loses a race.
pub const MAX_AD_RETRIES: u32 = 64;

/// Options for a walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct WalkOptions {
    /// Set A/D bits in guest memory (what the CPU does). Debug translations
    /// (a debugger peeking at guest memory) turn this off.
    pub set_accessed_dirty: bool,
}

impl WalkOptions {
    /// A walk that sets A/D bits in guest memory, as the CPU does (the
    /// default).
    pub const fn with_accessed_dirty() -> Self {
        WalkOptions {
            set_accessed_dirty: true,
        }
    }

    /// A walk that leaves guest memory untouched (no A/D updates), as a
    /// debugger or an emulator peeking at guest memory needs.
    pub const fn without_accessed_dirty() -> Self {
        WalkOptions {
            set_accessed_dirty: false,
        }
    }
}

impl Default for WalkOptions {
    fn default() -> Self {
        Self::with_accessed_dirty()
    }
}

/// Translates `gva` for `access` as the CPU would, setting A/D bits.
pub fn walk<M: GuestPhysMemory + ?Sized>(
    ctx: &PagingContext,
    mem: &M,
    gva: Gva,
    access: Access,
) -> Result<Translation, WalkError> {
    walk_with(ctx, mem, gva, access, WalkOptions::default())
}

/// Translates `gva` for `access` with explicit [`WalkOptions`].
pub fn walk_with<M: GuestPhysMemory + ?Sized>(
    ctx: &PagingContext,
    mem: &M,
    gva: Gva,
    access: Access,
    options: WalkOptions,
) -> Result<Translation, WalkError> {
    ctx.validate().map_err(WalkError::InvalidContext)?;
    for _ in 0..MAX_AD_RETRIES {
        match walk_once(ctx, mem, gva, access, options)? {
            Some(t) => return Ok(t),
            None => continue,
        }
    }
    Err(WalkError::Contended)
}

/// One guest-physical piece of a linear range: the range crosses a page at
/// most once per piece.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RangeSegment {
    /// The linear address of the piece's first byte.
    pub gva: Gva,
    /// Where that byte is in guest-physical memory.
    pub gpa: Gpa,
    /// Length of the piece in bytes (never crosses a 4 KiB boundary).
    pub len: u64,
}

/// Translates `len` bytes at `gva`, page by page, for one access.
///
/// An access that crosses pages is checked on every page it touches, in
/// order; the first page that faults ends the walk with CR2 set to the
/// first byte of the access on that page, as the CPU reports it.
pub fn translate_range<M: GuestPhysMemory + ?Sized>(
    ctx: &PagingContext,
    mem: &M,
    gva: Gva,
    len: u64,
    access: Access,
    options: WalkOptions,
) -> Result<Vec<RangeSegment>, WalkError> {
    let mut segments = Vec::new();
    let mut cur = gva;
    let mut left = len;
    while left > 0 {
        let in_page = (PAGE_SIZE - cur.page_offset()).min(left);
        let t = walk_with(ctx, mem, cur, access, options)?;
        segments.push(RangeSegment {
            gva: cur,
            gpa: t.gpa,
            len: in_page,
        });
        left -= in_page;
        cur = cur.wrapping_add(in_page);
    }
    Ok(segments)
}

/// Mask of bits `lo..=hi` (empty when `lo > hi`).
const fn bits(lo: u32, hi: u32) -> u64 {
    if lo > hi {
        0
    } else {
        (u64::MAX >> (63 - hi)) & (u64::MAX << lo)
    }
}

/// Static description of how one mode lays out its tables.
struct Layout {
    mode: PagingMode,
    /// Entry width in bytes (4 or 8).
    entry_bytes: u64,
}

impl Layout {
    fn index(&self, gva: u64, level: u8) -> u64 {
        match self.mode {
            PagingMode::Bits32 => (gva >> (12 + 10 * (u32::from(level) - 1))) & 0x3ff,
            PagingMode::Pae if level == 3 => (gva >> 30) & 3,
            _ => (gva >> (12 + 9 * (u32::from(level) - 1))) & 0x1ff,
        }
    }
}

/// The reserved-bit mask of an entry at `level` whose PS bit is `ps`
/// (`ps` is only meaningful where PS selects a large page).
fn reserved_mask(ctx: &PagingContext, mode: PagingMode, level: u8, ps: bool) -> u64 {
    let m = u32::from(ctx.maxphyaddr);
    let nx_rsvd = if ctx.nx_enabled() { 0 } else { 1 << 63 };
    match mode {
        PagingMode::NoPaging => 0,
        PagingMode::Bits32 => {
            if level == 2 && ps && ctx.cr4.contains(Cr4::PSE) {
                // 4 MiB page: bits 20:13 carry physical-address bits 39:32
                // (PSE-36), limited by MAXPHYADDR; bit 21 is always reserved.
                let pm = if ctx.features.contains(CpuFeatures::PSE36) {
                    m.min(40)
                } else {
                    32
                };
                bits(21, 21) | bits(pm - 19, 20)
            } else {
                0
            }
        }
        PagingMode::Pae => {
            let addr = bits(m, 62);
            match level {
                // PDPTEs are checked at CR3 load; see WalkError::InvalidPdpte.
                3 => bits(1, 2) | bits(5, 8) | bits(m, 63),
                2 if ps => addr | nx_rsvd | bits(13, 20),
                _ => addr | nx_rsvd,
            }
        }
        PagingMode::Level4 | PagingMode::Level5 => {
            let addr = bits(m, 51);
            match level {
                5 | 4 => addr | nx_rsvd | (1 << 7),
                3 if ps => {
                    if ctx.features.contains(CpuFeatures::PAGE_1G) {
                        addr | nx_rsvd | bits(13, 29)
                    } else {
                        // Without 1 GiB pages PS itself is reserved.
                        addr | nx_rsvd | (1 << 7)
                    }
                }
                2 if ps => addr | nx_rsvd | bits(13, 20),
                _ => addr | nx_rsvd,
            }
        }
    }
}

/// Does an entry at `level` with this value end the walk?
fn is_leaf(ctx: &PagingContext, mode: PagingMode, level: u8, pte: GuestPte) -> bool {
    let ps = pte.has(PteFlags::PAGE_SIZE);
    match (mode, level) {
        (_, 1) => true,
        (PagingMode::Bits32, 2) => ps && ctx.cr4.contains(Cr4::PSE),
        (PagingMode::Pae, 2) => ps,
        (PagingMode::Level4 | PagingMode::Level5, 2 | 3) => ps,
        _ => false,
    }
}

/// The physical address an entry points to (the next table, or the page).
fn entry_target(ctx: &PagingContext, mode: PagingMode, level: u8, leaf: bool, raw: u64) -> u64 {
    let phys = ctx.phys_mask();
    match mode {
        PagingMode::Bits32 if leaf && level == 2 => {
            // 4 MiB page, with PSE-36 high bits from entry bits 20:13.
            let low = raw & 0xffc0_0000;
            let high = ((raw >> 13) & 0xff) << 32;
            (low | high) & bits(0, 39)
        }
        PagingMode::Bits32 => raw & 0xffff_f000,
        _ => {
            let size = match (leaf, level) {
                (true, 2) => 2 << 20,
                (true, 3) => 1 << 30,
                _ => PAGE_SIZE,
            };
            raw & phys & bits(12, 51) & !(size - 1)
        }
    }
}

/// Reads the entry at `gpa`: 4 bytes for 32-bit paging, 8 otherwise.
fn read_entry<M: GuestPhysMemory + ?Sized>(
    mem: &M,
    gpa: Gpa,
    entry_bytes: u64,
) -> Result<u64, PhysMemError> {
    if entry_bytes == 8 {
        mem.read_u64(gpa)
    } else {
        let word = mem.read_u64(Gpa(gpa.raw() & !7))?;
        Ok((word >> ((gpa.raw() & 4) * 8)) & 0xffff_ffff)
    }
}

/// Sets `set` bits in the entry at `gpa` if it still holds `expected`.
/// Returns false if the entry changed under us (the walk must restart).
fn update_entry<M: GuestPhysMemory + ?Sized>(
    mem: &M,
    gpa: Gpa,
    entry_bytes: u64,
    expected: u64,
    set: u64,
) -> Result<bool, PhysMemError> {
    if entry_bytes == 8 {
        return Ok(mem
            .compare_exchange_u64(gpa, expected, expected | set)?
            .is_ok());
    }
    let word_gpa = Gpa(gpa.raw() & !7);
    let shift = (gpa.raw() & 4) * 8;
    let word = mem.read_u64(word_gpa)?;
    if (word >> shift) & 0xffff_ffff != expected {
        return Ok(false);
    }
    Ok(mem
        .compare_exchange_u64(word_gpa, word, word | (set << shift))?
        .is_ok())
}

fn error_code_base(ctx: &PagingContext, access: Access) -> PfErrorCode {
    let mut code = PfErrorCode::empty();
    if access.is_write() {
        code |= PfErrorCode::WRITE;
    }
    if access.is_user() {
        code |= PfErrorCode::USER;
    }
    // I/D is reported only when fetches can be told apart: NX in a
    // PAE-format mode, or SMEP.
    if access.is_fetch() && (ctx.nx_enabled() || ctx.smep()) {
        code |= PfErrorCode::FETCH;
    }
    code
}

/// Is `access` denied by the rights of the whole walk (not counting keys)?
fn permission_denied(ctx: &PagingContext, rights: Rights, access: Access) -> bool {
    let smap_blocks =
        |mode: AccessMode| ctx.smap() && (mode == AccessMode::ImplicitSupervisor || !ctx.eflags_ac);
    match access.mode {
        AccessMode::User => {
            !rights.user
                || match access.kind {
                    AccessKind::Read => false,
                    AccessKind::Write => !rights.write,
                    AccessKind::Fetch => !rights.exec,
                }
        }
        mode => match access.kind {
            AccessKind::Fetch => (rights.user && ctx.smep()) || !rights.exec,
            AccessKind::Read => rights.user && smap_blocks(mode),
            AccessKind::Write => (rights.user && smap_blocks(mode)) || (!rights.write && ctx.wp()),
        },
    }
}

/// Is the data access denied by the leaf's protection key?
fn pkey_denied(ctx: &PagingContext, rights: Rights, pkey: u8, access: Access) -> bool {
    if !ctx.pke_active() || !rights.user || access.is_fetch() {
        return false;
    }
    let pkru = ctx.pkru >> (2 * u32::from(pkey));
    let access_disable = pkru & 1 != 0;
    let write_disable = pkru & 2 != 0;
    access_disable || (access.is_write() && write_disable && (access.is_user() || ctx.wp()))
}

/// The #PF error code the CPU raises when `access` uses a translation with
/// `rights` (and protection key `pkey`, if keys are active), or `None` if
/// the access is allowed.
///
/// This is the check a TLB hit goes through: a cached translation keeps the
/// rights of its whole walk, and the CPU checks them against the current
/// CR0.WP, CR4.SMEP/SMAP, EFLAGS.AC and PKRU.
pub fn permission_fault(
    ctx: &PagingContext,
    rights: Rights,
    pkey: Option<u8>,
    access: Access,
) -> Option<PfErrorCode> {
    let mut code = PfErrorCode::PRESENT | error_code_base(ctx, access);
    let mut denied = permission_denied(ctx, rights, access);
    if let Some(key) = pkey
        && pkey_denied(ctx, rights, key, access)
    {
        code |= PfErrorCode::PK;
        denied = true;
    }
    denied.then_some(code)
}

/// One attempt; `Ok(None)` means an A/D update lost a race: walk again.
fn walk_once<M: GuestPhysMemory + ?Sized>(
    ctx: &PagingContext,
    mem: &M,
    gva: Gva,
    access: Access,
    options: WalkOptions,
) -> Result<Option<Translation>, WalkError> {
    let mode = ctx.mode();
    if mode == PagingMode::NoPaging {
        return Ok(Some(Translation {
            gpa: Gpa(gva.raw() & 0xffff_ffff),
            page_size: PageSize::Size4K,
            rights: Rights::ALL,
            pkey: None,
            global: false,
            steps: [WalkStep::default(); 5],
            depth: 0,
        }));
    }

    let addr = if mode.is_long() {
        let bits_used = mode.linear_bits();
        let sign = (gva.raw() as i64) << (64 - bits_used) >> (64 - bits_used);
        if sign as u64 != gva.raw() {
            return Err(WalkError::NonCanonical(gva));
        }
        gva.raw()
    } else {
        gva.raw() & 0xffff_ffff
    };

    let layout = Layout {
        mode,
        entry_bytes: if mode == PagingMode::Bits32 { 4 } else { 8 },
    };
    let base_code = error_code_base(ctx, access);
    let fault = |level: u8, code: PfErrorCode, unbacked: Option<Gpa>| {
        WalkError::PageFault(PageFault {
            address: gva,
            error_code: base_code | code,
            level,
            unbacked_table: unbacked,
        })
    };

    let mut table = match mode {
        PagingMode::Bits32 => ctx.cr3 & 0xffff_f000,
        PagingMode::Pae => ctx.cr3 & 0xffff_ffe0,
        _ => ctx.cr3 & ctx.phys_mask() & bits(12, 51),
    };
    if mode == PagingMode::Pae {
        // The CPU loads all four PDPTEs at the CR3 load and raises #GP if
        // any present one has a reserved bit, whichever the address uses.
        for index in 0..4u8 {
            let gpa = Gpa(table + 8 * u64::from(index));
            let Ok(value) = mem.read_u64(gpa) else {
                continue;
            };
            if value & 1 != 0 && value & reserved_mask(ctx, mode, 3, false) != 0 {
                return Err(WalkError::InvalidPdpte { index, value });
            }
        }
    }
    let mut rights = Rights::ALL;
    let mut steps = [WalkStep::default(); 5];
    let mut depth = 0usize;
    let mut level = mode.levels();

    let (leaf_level, leaf_raw) = loop {
        let entry_gpa = Gpa(table + layout.index(addr, level) * layout.entry_bytes);
        let raw = match read_entry(mem, entry_gpa, layout.entry_bytes) {
            Ok(v) => v,
            Err(PhysMemError::Unbacked(_) | PhysMemError::Misaligned(_)) => {
                return Err(fault(level, PfErrorCode::empty(), Some(entry_gpa)));
            }
        };
        let pte = GuestPte(raw);

        if !pte.is_present() {
            return Err(fault(level, PfErrorCode::empty(), None));
        }
        let ps = pte.has(PteFlags::PAGE_SIZE);
        if raw & reserved_mask(ctx, mode, level, ps) != 0 {
            return Err(fault(level, PfErrorCode::PRESENT | PfErrorCode::RSVD, None));
        }
        if !(mode == PagingMode::Pae && level == 3) {
            rights.write &= pte.has(PteFlags::WRITABLE);
            rights.user &= pte.has(PteFlags::USER);
            if ctx.nx_enabled() {
                rights.exec &= !pte.has(PteFlags::NO_EXECUTE);
            }
        }
        steps[depth] = WalkStep {
            level,
            entry_gpa,
            entry: pte,
        };
        depth += 1;
        if is_leaf(ctx, mode, level, pte) {
            break (level, raw);
        }
        table = entry_target(ctx, mode, level, false, raw);
        level -= 1;
    };

    let pkey = ctx.pke_active().then(|| GuestPte(leaf_raw).pkey());
    if let Some(code) = permission_fault(ctx, rights, pkey, access) {
        return Err(fault(0, code, None));
    }

    if options.set_accessed_dirty {
        for i in 0..depth {
            let (done, rest) = steps.split_at_mut(i);
            let step = &mut rest[0];
            if mode == PagingMode::Pae && step.level == 3 {
                continue;
            }
            let mut set = PteFlags::ACCESSED.bits();
            if i + 1 == depth && access.is_write() {
                set |= PteFlags::DIRTY.bits();
            }
            // A table used at two levels of this walk: the entry holds what
            // the earlier level's update left there.
            let raw = done
                .iter()
                .rev()
                .find(|s| s.entry_gpa == step.entry_gpa)
                .map_or(step.entry.raw(), |s| s.entry.raw());
            if raw & set == set {
                step.entry = GuestPte(raw);
                continue;
            }
            match update_entry(mem, step.entry_gpa, layout.entry_bytes, raw, set) {
                Ok(true) => step.entry = GuestPte(raw | set),
                Ok(false) => return Ok(None),
                Err(_) => {
                    return Err(fault(
                        step.level,
                        PfErrorCode::empty(),
                        Some(step.entry_gpa),
                    ));
                }
            }
        }
    }

    let page_size = match (mode, leaf_level) {
        (_, 1) => PageSize::Size4K,
        (PagingMode::Bits32, 2) => PageSize::Size4M,
        (_, 2) => PageSize::Size2M,
        _ => PageSize::Size1G,
    };
    let base = entry_target(ctx, mode, leaf_level, true, leaf_raw);
    let gpa = Gpa(base | (addr & (page_size.bytes() - 1)));
    let global = ctx.cr4.contains(Cr4::PGE) && GuestPte(leaf_raw).has(PteFlags::GLOBAL);
    Ok(Some(Translation {
        gpa,
        page_size,
        rights,
        pkey,
        global,
        steps,
        depth: depth as u8,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::Gfn;
    use crate::paging::SparseMemory;

    const P: u64 = 1;
    const W: u64 = 2;
    const U: u64 = 4;
    const A: u64 = 0x20;
    const D: u64 = 0x40;
    const PS: u64 = 0x80;
    const XD: u64 = 1 << 63;

    fn mem_with(frames: &[u64]) -> SparseMemory {
        let mem = SparseMemory::new();
        for &f in frames {
            mem.add_frame(Gfn(f));
        }
        mem
    }

    /// 4-level tables at 0x1000.. mapping gva 0 to `leaf` (a PTE value).
    fn four_level(leaf: u64, upper: u64) -> SparseMemory {
        let mem = mem_with(&[1, 2, 3, 4]);
        mem.write_u64(Gpa(0x1000), 0x2000 | upper).unwrap();
        mem.write_u64(Gpa(0x2000), 0x3000 | upper).unwrap();
        mem.write_u64(Gpa(0x3000), 0x4000 | upper).unwrap();
        mem.write_u64(Gpa(0x4000), leaf).unwrap();
        mem
    }

    fn ctx4() -> PagingContext {
        PagingContext::for_mode(PagingMode::Level4, 0x1000, 46, CpuFeatures::all()).unwrap()
    }

    fn pf(err: WalkError) -> PageFault {
        *err.page_fault().expect("expected a page fault")
    }

    #[test]
    fn bits_helper() {
        assert_eq!(bits(0, 63), u64::MAX);
        assert_eq!(bits(13, 20), 0x1f_e000);
        assert_eq!(bits(5, 4), 0);
    }

    #[test]
    fn not_present_leaf_faults_with_p_clear() {
        let mem = four_level(0x9000, P | W | U);
        let e = walk(&ctx4(), &mem, Gva(0), Access::user(AccessKind::Write)).unwrap_err();
        let f = pf(e);
        assert_eq!(f.error_code, PfErrorCode::WRITE | PfErrorCode::USER);
        assert_eq!(f.level, 1);
        // Nothing was marked accessed.
        assert_eq!(mem.read_u64(Gpa(0x1000)).unwrap(), 0x2000 | P | W | U);
    }

    #[test]
    fn reserved_bit_faults_with_rsvd() {
        let mem = four_level(0x9000 | P | (1 << 51), P | W | U);
        let f = pf(walk(&ctx4(), &mem, Gva(0), Access::user(AccessKind::Read)).unwrap_err());
        assert_eq!(
            f.error_code,
            PfErrorCode::PRESENT | PfErrorCode::RSVD | PfErrorCode::USER
        );
    }

    #[test]
    fn xd_is_reserved_without_nxe() {
        let mem = four_level(0x9000 | P | XD, P | W | U);
        let mut ctx = ctx4();
        assert!(walk(&ctx, &mem, Gva(0), Access::user(AccessKind::Read)).is_err());
        ctx.efer.remove(crate::paging::Efer::NXE);
        let f = pf(walk(&ctx, &mem, Gva(0), Access::user(AccessKind::Read)).unwrap_err());
        assert!(f.error_code.contains(PfErrorCode::RSVD));
    }

    #[test]
    fn write_sets_dirty_only_on_leaf() {
        let mem = four_level(0x9000 | P | W | U, P | W | U);
        let t = walk(&ctx4(), &mem, Gva(0x10), Access::user(AccessKind::Write)).unwrap();
        assert_eq!(t.gpa, Gpa(0x9010));
        assert_eq!(
            mem.read_u64(Gpa(0x4000)).unwrap(),
            0x9000 | P | W | U | A | D
        );
        assert_eq!(mem.read_u64(Gpa(0x3000)).unwrap(), 0x4000 | P | W | U | A);
        assert_eq!(t.steps().len(), 4);
        assert_eq!(t.leaf().unwrap().entry.raw(), 0x9000 | P | W | U | A | D);
    }

    #[test]
    fn supervisor_write_to_read_only_depends_on_wp() {
        let mem = four_level(0x9000 | P | U, P | W | U);
        let mut ctx = ctx4();
        let e = walk(&ctx, &mem, Gva(0), Access::supervisor(AccessKind::Write)).unwrap_err();
        assert_eq!(pf(e).error_code, PfErrorCode::PRESENT | PfErrorCode::WRITE);
        ctx.cr0.remove(crate::paging::Cr0::WP);
        assert!(walk(&ctx, &mem, Gva(0), Access::supervisor(AccessKind::Write)).is_ok());
    }

    #[test]
    fn large_pages() {
        // 2 MiB via PDE PS.
        let mem = mem_with(&[1, 2, 3]);
        mem.write_u64(Gpa(0x1000), 0x2000 | P | W).unwrap();
        mem.write_u64(Gpa(0x2000), 0x3000 | P | W).unwrap();
        mem.write_u64(Gpa(0x3000 + 8), 0x4020_0000 | P | W | PS)
            .unwrap();
        let t = walk(
            &ctx4(),
            &mem,
            Gva(0x2f_1234),
            Access::supervisor(AccessKind::Read),
        )
        .unwrap();
        assert_eq!(t.page_size, PageSize::Size2M);
        assert_eq!(t.gpa, Gpa(0x402f_1234));
        // 1 GiB via PDPTE PS, then without the feature it is reserved.
        mem.write_u64(Gpa(0x2000 + 8), 0xc000_0000 | P | PS)
            .unwrap();
        let t = walk(
            &ctx4(),
            &mem,
            Gva(0x4123_4567),
            Access::supervisor(AccessKind::Read),
        )
        .unwrap();
        assert_eq!((t.page_size, t.gpa), (PageSize::Size1G, Gpa(0xc123_4567)));
        let mut ctx = ctx4();
        ctx.features.remove(CpuFeatures::PAGE_1G);
        let f = pf(walk(
            &ctx,
            &mem,
            Gva(0x4123_4567),
            Access::supervisor(AccessKind::Read),
        )
        .unwrap_err());
        assert!(f.error_code.contains(PfErrorCode::RSVD));
        assert_eq!(f.level, 3);
    }

    #[test]
    fn thirty_two_bit_pse36() {
        let mem = mem_with(&[1]);
        // PDE[1]: 4 MiB page at physical 0x3_0040_0000 (bits 39:32 = 3 in 20:13).
        let pde = 0x0040_0000u32 | (3 << 13) | (P | W | U | PS) as u32;
        mem.write_u32(Gpa(0x1004), pde).unwrap();
        mem.write_u32(Gpa(0x1000), 0xdead_0000).unwrap(); // neighbour untouched
        let ctx =
            PagingContext::for_mode(PagingMode::Bits32, 0x1000, 40, CpuFeatures::all()).unwrap();
        let t = walk(
            &ctx,
            &mem,
            Gva(0x0045_6789),
            Access::user(AccessKind::Write),
        )
        .unwrap();
        assert_eq!(t.page_size, PageSize::Size4M);
        assert_eq!(t.gpa, Gpa(0x3_0045_6789));
        assert_eq!(
            mem.read_u64(Gpa(0x1000)).unwrap() >> 32,
            u64::from(pde) | A | D
        );
        assert_eq!(
            mem.read_u64(Gpa(0x1000)).unwrap() & 0xffff_ffff,
            0xdead_0000
        );
        // With MAXPHYADDR 36, bits 20:17 are reserved.
        let mut ctx36 = ctx;
        ctx36.maxphyaddr = 36;
        mem.write_u32(Gpa(0x1004), pde | (1 << 17)).unwrap();
        let f = pf(walk(
            &ctx36,
            &mem,
            Gva(0x0040_0000),
            Access::user(AccessKind::Read),
        )
        .unwrap_err());
        assert!(f.error_code.contains(PfErrorCode::RSVD));
    }

    #[test]
    fn pae_pdpte_reserved_is_gp_not_pf() {
        let mem = mem_with(&[1, 2]);
        mem.write_u64(Gpa(0x1000), 0x2000 | P | W).unwrap(); // W is reserved in a PAE PDPTE
        let ctx = PagingContext::for_mode(PagingMode::Pae, 0x1000, 36, CpuFeatures::all()).unwrap();
        assert_eq!(
            walk(&ctx, &mem, Gva(0), Access::supervisor(AccessKind::Read)),
            Err(WalkError::InvalidPdpte {
                index: 0,
                value: 0x2000 | P | W
            })
        );
    }

    #[test]
    fn non_canonical_is_gp() {
        let mem = four_level(0x9000 | P, P);
        assert_eq!(
            walk(
                &ctx4(),
                &mem,
                Gva(0x0000_8000_0000_0000),
                Access::user(AccessKind::Read)
            ),
            Err(WalkError::NonCanonical(Gva(0x0000_8000_0000_0000)))
        );
    }

    #[test]
    fn unbacked_table_is_not_present() {
        let mem = mem_with(&[1]);
        mem.write_u64(Gpa(0x1000), 0x7000_0000 | P | W).unwrap();
        let f = pf(walk(&ctx4(), &mem, Gva(0), Access::supervisor(AccessKind::Write)).unwrap_err());
        assert_eq!(f.error_code, PfErrorCode::WRITE);
        assert_eq!(f.unbacked_table, Some(Gpa(0x7000_0000)));
    }

    #[test]
    fn cross_page_range_faults_on_second_page() {
        let mem = mem_with(&[1, 2, 3, 4]);
        mem.write_u64(Gpa(0x1000), 0x2000 | P | W | U).unwrap();
        mem.write_u64(Gpa(0x2000), 0x3000 | P | W | U).unwrap();
        mem.write_u64(Gpa(0x3000), 0x4000 | P | W | U).unwrap();
        mem.write_u64(Gpa(0x4000), 0x9000 | P | W | U).unwrap();
        mem.write_u64(Gpa(0x4008), 0xa000 | P | U).unwrap();
        let ctx = ctx4();
        let ok = translate_range(
            &ctx,
            &mem,
            Gva(0xffc),
            8,
            Access::user(AccessKind::Read),
            WalkOptions::default(),
        )
        .unwrap();
        assert_eq!(ok.len(), 2);
        assert_eq!((ok[0].gpa, ok[0].len), (Gpa(0x9ffc), 4));
        assert_eq!((ok[1].gpa, ok[1].len), (Gpa(0xa000), 4));
        let e = translate_range(
            &ctx,
            &mem,
            Gva(0xffc),
            8,
            Access::user(AccessKind::Write),
            WalkOptions::default(),
        )
        .unwrap_err();
        assert_eq!(pf(e).address, Gva(0x1000));
    }

    #[test]
    fn protection_keys() {
        let key = 3u64;
        let mem = four_level(0x9000 | P | W | U | (key << 59), P | W | U);
        let mut ctx = ctx4();
        ctx.cr4 |= Cr4::PKE;
        ctx.pkru = 0b10 << (2 * key); // write-disable
        assert!(walk(&ctx, &mem, Gva(0), Access::user(AccessKind::Read)).is_ok());
        let f = pf(walk(&ctx, &mem, Gva(0), Access::user(AccessKind::Write)).unwrap_err());
        assert_eq!(
            f.error_code,
            PfErrorCode::PRESENT | PfErrorCode::WRITE | PfErrorCode::USER | PfErrorCode::PK
        );
        // Fetches ignore keys.
        ctx.pkru = 0b11 << (2 * key);
        assert!(walk(&ctx, &mem, Gva(0), Access::user(AccessKind::Fetch)).is_ok());
    }

    #[test]
    fn no_ad_update_when_asked() {
        let mem = four_level(0x9000 | P | W, P | W);
        let opts = WalkOptions {
            set_accessed_dirty: false,
        };
        walk_with(
            &ctx4(),
            &mem,
            Gva(0),
            Access::supervisor(AccessKind::Write),
            opts,
        )
        .unwrap();
        assert_eq!(mem.read_u64(Gpa(0x4000)).unwrap(), 0x9000 | P | W);
    }
}
