//! One operation sequence run on the shadow MMU and on a reference machine
//! side by side. Shared by the differential test (`tests/differential.rs`,
//! where proptest draws the sequences) and the `shadow_ops` fuzz target
//! (`fuzz/fuzz_targets/shadow_ops.rs`, where libFuzzer draws them).
//!
//! Two copies of guest memory: the soft vCPU runs on one through the shadow
//! tables (faults served by the MMU); the reference walks the guest's own
//! tables in the other with `mmu_api`'s walker. After every step the access
//! outcome, the whole guest memory (data and the A/D bits the guest sees),
//! and `audit()` must agree; a harvested dirty log must hold every page
//! written since the last harvest.
//!
//! Operations `0..BASE_OPS` are the differential test's. A [`Case`] with
//! `hostile` set also gets operations `BASE_OPS..ALL_OPS` and hostile table
//! contents: entries naming the shadow pool's hardware frames, the
//! hardware frames of guest RAM itself, the top of the physical address
//! space, reserved address bits, self-maps and loops; refused memslot
//! changes; page limits below the minimum; impossible MAXPHYADDR values;
//! host (DMA) writes; a READONLY slot holding the page tables; raw linear
//! addresses. `audit()` after every step checks the isolation invariant:
//! no present SPTE maps memory outside the memslots, a shadow-pool frame,
//! or a read-only slot writable.

use std::collections::BTreeSet;

use mmu_api::paging::{Cr0, Cr4, Efer, GuestPhysMemory, SlotMemory, WalkError, walk};
use mmu_api::{
    Access, AccessKind, AccessMode, BackendError, ContextError, Gpa, Gva, Hpa, Memslot,
    MemslotError, MemslotFlags, MemslotTable, MmuBackend, MmuStats, MmuVcpu, PagingContext,
    PagingMode, SlotId, VcpuError, VcpuId,
};
use mmu_shadow::soft::{ShadowingHost, SoftOutcome, SoftVcpu};
use mmu_shadow::{Coherence, MIN_PAGE_LIMIT, ReclaimPolicy, ShadowBackend, ZapMode};

use super::{GuestRam, POOL_HPA, POOL_PAGES, RAM_HPA, add_slot, config};

pub const RAM_PAGES: u64 = 40;
/// Guest tables live in RAM pages 1..=8 (gpa = page * 4 KiB, slot 0).
pub const TABLE_FRAMES: std::ops::RangeInclusive<u64> = 1..=8;
/// Slot 1 is RAM pages 32..40, at one of two guest bases.
pub const SLOT1_BASES: [u64; 2] = [0x2_0000, 0x3_0000];
/// The guests' MAXPHYADDR in the differential test (hostile cases choose).
pub const MAXPHYADDR: u8 = 40;
/// The guest-physical width memslots must fit in.
pub const GPA_WIDTH: u8 = 40;
/// Where `Coherence::Replay` backends map the pool into every root.
pub const WINDOW: Gva = Gva(0xffff_8000_0000_0000);

/// Operations the differential test draws from (`0..BASE_OPS`).
pub const BASE_OPS: u8 = 100;
/// Operations a hostile case draws from (`0..ALL_OPS`).
pub const ALL_OPS: u8 = 116;

/// A tiny deterministic generator for table contents.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A table frame an entry may point to. PAE PDPTs (frames 1 and 2) are
/// never a target: an entry that is a leaf on one path is a PDE on another,
/// so any target may become a page table whose A bits walks set, and the CPU
/// holds PDPTEs in registers that such a change does not reach until the
/// next CR3 load.
fn table_frame(rng: &mut Rng, mode: PagingMode) -> u64 {
    if mode == PagingMode::Pae {
        3 + rng.below(6)
    } else {
        *TABLE_FRAMES.start() + rng.below(8)
    }
}

/// A guest frame no guest should name: one of the shadow pool's hardware
/// frames, one of guest RAM's own hardware frames, or the top of a
/// `maxphyaddr`-bit guest-physical space. None is in a memslot.
fn hostile_frame(rng: &mut Rng, maxphyaddr: u8) -> u64 {
    match rng.below(3) {
        0 => (POOL_HPA >> 12) + rng.below(u64::from(POOL_PAGES)),
        1 => (RAM_HPA >> 12) + rng.below(RAM_PAGES),
        _ => (1u64 << (maxphyaddr - 12)) - 1 - rng.below(4),
    }
}

/// A random guest entry for `level` of `mode`; with `hostile`, some
/// entries name [`hostile_frame`]s (of a `MAXPHYADDR`-bit space).
fn random_entry(rng: &mut Rng, mode: PagingMode, level: u8, hostile: bool) -> u64 {
    let mut e = 0u64;
    if rng.chance(90) {
        e |= 1;
    }
    for (bit, pct) in [(1u64 << 1, 75), (1 << 2, 75), (1 << 5, 50), (1 << 6, 50)] {
        if rng.chance(pct) {
            e |= bit;
        }
    }
    let wide = mode != PagingMode::Bits32;
    if wide && rng.chance(15) {
        e |= 1 << 63;
    }
    let large = match (mode, level) {
        (_, 2) => rng.chance(20),
        (PagingMode::Level4 | PagingMode::Level5, 3) => rng.chance(8),
        _ => false,
    };
    let leaf = level == 1 || large;
    let target = if leaf {
        match rng.below(100) {
            0..=64 => 16 + rng.below(16),      // data in slot 0
            65..=79 => table_frame(rng, mode), // a table: self-map
            80..=89 => 32 + rng.below(8),      // slot 1 (if present)
            _ if hostile && rng.chance(75) => hostile_frame(rng, MAXPHYADDR),
            _ => 0x28 + rng.below(16), // MMIO hole or beyond
        }
    } else if rng.chance(90) {
        table_frame(rng, mode)
    } else if hostile && rng.chance(66) {
        hostile_frame(rng, MAXPHYADDR) // a "table" in the pool or at RAM's hpa
    } else {
        0x38 + rng.below(8) // a table outside guest memory
    };
    if large {
        e |= 1 << 7;
        // Large pages map from gpa 0 so they cover slot 0, slot 1 and holes;
        // hostile ones map the pool's or RAM's hardware addresses (both
        // 1 GiB aligned).
        if hostile && rng.chance(25) {
            e |= if rng.chance(50) { POOL_HPA } else { RAM_HPA };
        }
    } else {
        e |= target << 12;
    }
    if rng.chance(3) {
        e |= if wide { 1 << 51 } else { 1 << 21 };
    }
    if mode == PagingMode::Bits32 {
        e & 0xffff_ffff
    } else {
        e
    }
}

/// An entry built to attack the MMU, for table `frame`: a self-map, a loop
/// back to the root, a link or leaf into the shadow pool's or RAM's
/// hardware frames or the top of the guest-physical space, a 1 GiB / 2 MiB
/// page over the pool, or an address with a bit at or above `maxphyaddr`.
///
/// In PAE mode the PDPT frames (1 and 2) are never named, for the reason
/// [`table_frame`] gives: the CPU holds PDPTEs in registers, the reference
/// walker re-reads them from memory.
fn hostile_entry(
    rng: &mut Rng,
    mode: PagingMode,
    maxphyaddr: u8,
    frame: u64,
    cr3_frame: u64,
) -> u64 {
    const PWU: u64 = 0x7;
    let wide = mode != PagingMode::Bits32;
    let mut not_pdpt = |f: u64| {
        if mode == PagingMode::Pae && f <= 2 {
            table_frame(rng, mode)
        } else {
            f
        }
    };
    let (frame, cr3_frame) = (not_pdpt(frame), not_pdpt(cr3_frame));
    let e = match rng.below(7) {
        0 => (frame << 12) | PWU,                              // maps its own table
        1 => (cr3_frame << 12) | PWU,                          // loops back to the root
        2 | 3 => (hostile_frame(rng, maxphyaddr) << 12) | PWU, // pool, RAM's hpa, top
        4 => POOL_HPA | PWU | 0x80,                            // a large page over the pool
        5 => ((frame << 12) | PWU) | (1 << (maxphyaddr + rng.below(12) as u8)),
        _ => ((0x38 + rng.below(8)) << 12) | PWU, // outside guest memory
    };
    let e = if rng.chance(50) { e | 0x60 } else { e }; // A, D
    if wide { e } else { e & 0xffff_ffff }
}

/// Fills the guest tables of `mode` in `ram` (entries 0..4 of every table
/// frame, plus PAE PDPTEs).
fn build_tables(ram: &mut GuestRam, mode: PagingMode, seed: u64, hostile: bool) {
    let mut rng = Rng(seed | 1);
    for frame in TABLE_FRAMES {
        for index in 0..4usize {
            // Which level this frame plays differs per path; any level's
            // entry shape is plausible for any table frame.
            let level = 1 + rng.below(u64::from(mode.levels().max(1))) as u8;
            let e = random_entry(&mut rng, mode, level, hostile);
            write_entry(ram, mode, frame, index, e);
        }
    }
    if mode == PagingMode::Pae {
        // PDPTEs at the two CR3 candidates: only P and the address are legal.
        for frame in [1u64, 2] {
            for i in 0..4usize {
                let e = if rng.chance(85) {
                    (3 + rng.below(6)) << 12 | 1
                } else {
                    0
                };
                ram.set_word(frame, i, e);
            }
        }
    }
}

fn write_entry(ram: &mut GuestRam, mode: PagingMode, frame: u64, index: usize, e: u64) {
    if mode == PagingMode::Bits32 {
        let w = ram.word(frame, index / 2);
        let shift = (index % 2) * 32;
        let v = (w & !(0xffff_ffffu64 << shift)) | ((e & 0xffff_ffff) << shift);
        ram.set_word(frame, index / 2, v);
    } else {
        ram.set_word(frame, index, e);
    }
}

/// A gva whose path uses entries 0..4 at every level.
fn gva_for(mode: PagingMode, pick: u64) -> u64 {
    let i = |n: u32| (pick >> (2 * n)) & 3;
    match mode {
        // Physical pages 0..64: slot 0, slot 1 at either base, and holes.
        PagingMode::NoPaging => (pick & 0x3f) << 12,
        PagingMode::Bits32 => (i(0) << 22) | (i(1) << 12),
        PagingMode::Pae => (i(0) << 30) | (i(1) << 21) | (i(2) << 12),
        PagingMode::Level4 => (i(0) << 39) | (i(1) << 30) | (i(2) << 21) | (i(3) << 12),
        PagingMode::Level5 => {
            (i(0) << 48) | (i(1) << 39) | (i(2) << 30) | (i(3) << 21) | (i(4) << 12)
        }
    }
}

fn context(mode: PagingMode, cr3_frame: u64, wp: bool, maxphyaddr: u8) -> PagingContext {
    let mut ctx = PagingContext::for_mode(
        mode,
        cr3_frame << 12,
        maxphyaddr,
        mmu_api::paging::CpuFeatures::all(),
    )
    .expect("context");
    ctx.cr4.remove(Cr4::SMEP | Cr4::SMAP | Cr4::PKE);
    if !wp {
        ctx.cr0.remove(Cr0::WP);
    }
    ctx
}

/// The reference machine: guest memory, slots and registers, no MMU.
struct Reference {
    ram: GuestRam,
    slots: MemslotTable,
    ctx: [PagingContext; 2],
    written: BTreeSet<u64>,
}

impl Reference {
    fn mem(&self) -> SlotMemory<'_> {
        // SAFETY: the reference slots point into `self.ram`, which lives as
        // long as `self`.
        unsafe { SlotMemory::new(&self.slots) }
    }

    fn access(&mut self, vcpu: usize, gva: Gva, access: Access, value: u64) -> SoftOutcome {
        let t = match walk(&self.ctx[vcpu], &self.mem(), gva, access) {
            Ok(t) => t,
            Err(WalkError::PageFault(pf)) => {
                return SoftOutcome::PageFault {
                    error_code: pf.error_code,
                    cr2: gva,
                };
            }
            Err(_) => return SoftOutcome::GeneralProtection,
        };
        let Some(slot) = self.slots.find(t.gpa).copied() else {
            return SoftOutcome::Mmio(t.gpa);
        };
        if access.is_write() {
            if !slot.is_writable() {
                return SoftOutcome::Mmio(t.gpa);
            }
            let old = self.mem().read_u64(t.gpa).expect("backed");
            self.mem()
                .compare_exchange_u64(t.gpa, old, value)
                .expect("backed")
                .expect("no race");
            self.written.insert(t.gpa.gfn().raw());
            SoftOutcome::Done(value)
        } else {
            SoftOutcome::Done(self.mem().read_u64(t.gpa).expect("backed"))
        }
    }
}

fn slot1(ram: &GuestRam, base: u64, flags: MemslotFlags) -> Memslot {
    ram.slot(1, base, 32, 8, flags)
}

fn set_both(backend: &ShadowBackend, reference: &mut Reference, slot: Memslot) {
    let mut ref_slot = slot;
    ref_slot.backing.host_addr = reference
        .ram
        .host_addr(slot.backing.hpa.raw().wrapping_sub(RAM_HPA) >> 12);
    add_slot(backend, slot);
    reference.slots.set(ref_slot).expect("reference slot");
}

/// One sequence.
#[derive(Debug, Clone)]
pub struct Case {
    pub mode: PagingMode,
    pub seed: u64,
    pub prefetch: usize,
    pub limit: Option<u64>,
    pub zap: ZapMode,
    pub reclaim: ReclaimPolicy,
    /// MMIO caching off, or on with this many generation bits.
    pub mmio_bits: Option<u8>,
    /// Host a hypervisor that shadows the pool (PVM's model) and keep it
    /// coherent by replay.
    pub replay: bool,
    /// Hostile table contents and operations `BASE_OPS..ALL_OPS`.
    pub hostile: bool,
    /// The guests' MAXPHYADDR (`MAXPHYADDR` in the differential test; 52
    /// lets guests name gfns an MMIO SPTE cannot hold).
    pub maxphyaddr: u8,
    /// (operation, operand, value); operations `>= ALL_OPS` (or
    /// `>= BASE_OPS` without `hostile`) are zap-alls.
    pub ops: Vec<(u8, u64, u64)>,
}

/// What a sequence that passed did.
#[derive(Debug)]
pub struct CaseReport {
    /// Steps run (each followed by the memory comparison and `audit()`).
    pub steps: u64,
    /// The backend's counters at the end.
    pub stats: MmuStats,
}

/// What a correct guest does after editing its tables: flush every vCPU's
/// TLB. PAE guests reload CR3 instead, since the PDPTEs are only read then.
fn guest_flush(
    cpus: &mut [SoftVcpu; 2],
    reference: &Reference,
    mode: PagingMode,
) -> Result<(), String> {
    for (i, c) in cpus.iter_mut().enumerate() {
        if mode == PagingMode::Pae {
            c.load_context(&reference.ctx[i])
                .map_err(|e| format!("reload: {e}"))?;
        } else {
            c.flush();
        }
    }
    Ok(())
}

fn check(cond: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if cond { Ok(()) } else { Err(what()) }
}

/// Compares one access on the shadow MMU (through the soft vCPU) with the
/// reference.
fn compare_access(
    cpus: &mut [SoftVcpu; 2],
    reference: &mut Reference,
    vcpu: usize,
    gva: Gva,
    access: Access,
    value: u64,
) -> Result<SoftOutcome, String> {
    let kind = access.kind;
    let expected = reference.access(vcpu, gva, access, value);
    let size = if kind == AccessKind::Fetch { 1 } else { 8 };
    let got = cpus[vcpu]
        .access(gva, kind, access.mode, size, value)
        .map_err(|e| format!("soft vCPU error {e}"))?;
    let got = match (got, kind) {
        // A fetch reads one byte.
        (SoftOutcome::Done(x), AccessKind::Fetch) => SoftOutcome::Done(x & 0xff),
        (g, _) => g,
    };
    let expected = match (expected, kind) {
        (SoftOutcome::Done(x), AccessKind::Fetch) => SoftOutcome::Done(x & 0xff),
        (e, _) => e,
    };
    check(got == expected, || {
        format!("{gva} {access:?}: shadow {got:?}, reference {expected:?}")
    })?;
    Ok(got)
}

/// A memslot change the backend must refuse, the error it must give, and
/// what it is.
fn refused_change(
    pick: u64,
    ram: &GuestRam,
    slot0: Memslot,
    slot1: Option<Memslot>,
) -> (Memslot, MemslotError, &'static str) {
    let fresh = |gpa: u64, pages: u64| ram.slot(2, gpa, 16, pages, MemslotFlags::empty());
    let id = SlotId(2);
    match pick % 7 {
        0 => {
            let s = fresh(0x1f_000, 2);
            (
                s,
                MemslotError::Overlap {
                    slot: id,
                    other: SlotId(0),
                    at: Gpa(0x1f_000),
                },
                "overlaps slot 0",
            )
        }
        1 => {
            let mut s = fresh(0x80_0000, 1);
            match (pick >> 8) % 4 {
                0 => s.guest_base = Gpa(0x80_0800),
                1 => s.size = 0x1800,
                2 => s.backing.hpa = Hpa(s.backing.hpa.raw() + 8),
                _ => s.backing.host_addr.0 += 8,
            }
            (s, MemslotError::Unaligned(id), "unaligned")
        }
        2 => {
            let mut s = fresh(0x80_0000, 1);
            s.size = 0;
            (s, MemslotError::ZeroSize(id), "zero-sized")
        }
        3 => {
            let base = (1u64 << GPA_WIDTH) - 0x1000;
            (
                fresh(base, 2),
                MemslotError::TooLarge {
                    slot: id,
                    end: base + 0x2000,
                    width: GPA_WIDTH,
                },
                "beyond the guest-physical width",
            )
        }
        4 => {
            let mut s = fresh(0x80_0000, 2);
            s.backing.hpa = Hpa(POOL_HPA + ((pick >> 8) % u64::from(POOL_PAGES)) * 0x1000);
            (s, MemslotError::OverlapsBackend(id), "backed by the pool")
        }
        5 => {
            let mut s = fresh(0x80_0000, 1);
            s.backing.hpa = Hpa(1 << config(None, 0).host_maxphyaddr);
            (
                s,
                MemslotError::InvalidBacking(id),
                "backed beyond MAXPHYADDR",
            )
        }
        _ => {
            // A live slot changing size.
            let mut s = slot1.unwrap_or(slot0);
            s.size -= 0x1000;
            (s, MemslotError::IllegalChange(s.id), "resized")
        }
    }
}

/// True if `gva` is in the top-level slot of a `mode` root that holds the
/// replay window: the 512 GiB PML4 slot in 4-level roots, the whole 256 TiB
/// PML5 slot in 5-level roots.
fn in_window_slot(mode: PagingMode, gva: Gva) -> bool {
    let (g, w) = (gva.raw(), WINDOW.raw());
    if mode == PagingMode::Level5 {
        (g >> 48) & 0x1ff == (w >> 48) & 0x1ff
    } else {
        g >> 39 == w >> 39
    }
}

/// Runs one sequence; `Err` describes the first disagreement.
pub fn run_case(case: &Case) -> Result<CaseReport, String> {
    let mode = case.mode;
    let hostile = case.hostile;
    let mut shadow_ram = GuestRam::new(RAM_PAGES);
    let mut ref_ram = GuestRam::new(RAM_PAGES);
    build_tables(&mut shadow_ram, mode, case.seed, hostile);
    build_tables(&mut ref_ram, mode, case.seed, hostile);
    // Some data so reads are not all zero.
    for p in 16..RAM_PAGES {
        shadow_ram.set_word(p, 0, p * 0x1111);
        ref_ram.set_word(p, 0, p * 0x1111);
    }
    let b = ShadowBackend::new({
        let mut m = config(case.limit, case.prefetch);
        m.zap = case.zap;
        m.reclaim = case.reclaim;
        m.mmio_caching = case.mmio_bits.is_some();
        m.mmio_gen_bits = case.mmio_bits.unwrap_or(19);
        // Half the cases map MMIO through a hypervisor window instead of
        // reserved bits (the soft vCPU then exits as the hypervisor would).
        if case.seed & 1 == 1 {
            m.mmio_window = Some(Hpa(1 << (m.host_maxphyaddr - 1)));
        }
        m.coherence = if case.replay {
            Coherence::Replay { window: WINDOW }
        } else {
            Coherence::Direct
        };
        m
    })
    .map_err(|e| format!("backend: {e}"))?;
    let ctx0 = context(mode, 1, true, case.maxphyaddr);
    let mut reference = Reference {
        ram: ref_ram,
        slots: MemslotTable::new(GPA_WIDTH, 8),
        ctx: [ctx0; 2],
        written: BTreeSet::new(),
    };
    set_both(
        &b,
        &mut reference,
        shadow_ram.slot(0, 0, 0, 32, MemslotFlags::empty()),
    );
    set_both(
        &b,
        &mut reference,
        slot1(&shadow_ram, SLOT1_BASES[0], MemslotFlags::empty()),
    );
    let host = ShadowingHost::new();
    let cpu = |id| {
        if case.replay {
            SoftVcpu::with_shadowing_host(&b, VcpuId(id), host.clone())
        } else {
            SoftVcpu::new(&b, VcpuId(id))
        }
        .expect("vCPU")
    };
    let mut cpus = [cpu(0), cpu(1)];
    for c in &mut cpus {
        c.load_context(&ctx0).map_err(|e| format!("load: {e}"))?;
    }
    let mut slot1_base = Some(SLOT1_BASES[0]);
    let mut slot1_flags = MemslotFlags::empty();
    let mut logging = false;
    // READONLY on slot 0 (the page tables): hostile cases only.
    let mut slot0_ro = false;
    let slot0_flags = |logging: bool, ro: bool| {
        let mut f = MemslotFlags::empty();
        f.set(MemslotFlags::LOG_DIRTY, logging);
        f.set(MemslotFlags::READONLY, ro);
        f
    };
    let mut rng = Rng(case.seed ^ 0x9e37_79b9_7f4a_7c15 | 1);
    let mut steps = 0;

    for (step, &(op, a, v)) in case.ops.iter().enumerate() {
        let vcpu = (a & 1) as usize;
        let what = |s: &str| format!("step {step} op {op} ({s}) a={a:#x} v={v:#x}");
        let op = if !hostile && op >= BASE_OPS { 99 } else { op };
        match op {
            // Accesses: most of the work.
            0..=59 => {
                let gva = Gva(gva_for(mode, a >> 1) + 8 * ((a >> 20) % 512));
                let kind = match (a >> 40) % 3 {
                    0 => AccessKind::Read,
                    1 => AccessKind::Write,
                    _ => AccessKind::Fetch,
                };
                let amode = if (a >> 42) & 1 == 1 {
                    AccessMode::User
                } else {
                    AccessMode::Supervisor
                };
                let access = Access { kind, mode: amode };
                let got = compare_access(&mut cpus, &mut reference, vcpu, gva, access, v)
                    .map_err(|e| format!("{}: {e}", what("access")))?;
                // A guest that wrote its own page tables flushes.
                if kind == AccessKind::Write && matches!(got, SoftOutcome::Done(_)) {
                    guest_flush(&mut cpus, &reference, mode)?;
                }
            }
            // A guest page-table edit (emulated CPL0 store), then a flush;
            // a hostile edit (self-map, loop, pool, beyond MAXPHYADDR...).
            60..=69 | 100..=102 => {
                let frame = *TABLE_FRAMES.start() + (a >> 8) % 8;
                let index = ((a >> 16) % 4) as usize;
                let e = if op >= 100 {
                    let cr3_frame = reference.ctx[vcpu].cr3 >> 12;
                    hostile_entry(&mut rng, mode, case.maxphyaddr, frame, cr3_frame)
                } else {
                    let level = 1 + rng.below(u64::from(mode.levels().max(1))) as u8;
                    random_entry(&mut rng, mode, level, hostile)
                };
                let (gpa, bytes): (u64, Vec<u8>) = if mode == PagingMode::Bits32 {
                    (
                        (frame << 12) + 4 * index as u64,
                        (e as u32).to_le_bytes().to_vec(),
                    )
                } else {
                    ((frame << 12) + 8 * index as u64, e.to_le_bytes().to_vec())
                };
                let res = cpus[vcpu].mmu().write_guest(Gpa(gpa), &bytes);
                if slot0_ro {
                    // The tables are in a READONLY slot: the store is refused.
                    check(res == Err(VcpuError::ReadOnly(Gpa(gpa))), || {
                        format!("{}: read-only table store gave {res:?}", what("edit"))
                    })?;
                } else {
                    res.map_err(|e| format!("{}: {e}", what("edit")))?;
                    write_entry(&mut reference.ram, mode, frame, index, e);
                    reference.written.insert(frame);
                    guest_flush(&mut cpus, &reference, mode)?;
                }
            }
            // CR3 switch; CR0.WP, CR4.SMEP, CR4.SMAP, EFER.NXE changes;
            // EFLAGS.AC changes with every one of them.
            70..=77 => {
                let mut ctx = reference.ctx[vcpu];
                match op {
                    70..=72 => ctx.cr3 = (1 + (a >> 4) % 2) << 12,
                    73 | 74 => ctx.cr0.toggle(Cr0::WP),
                    75 => ctx.cr4.toggle(Cr4::SMEP),
                    76 => ctx.cr4.toggle(Cr4::SMAP),
                    _ => ctx.efer.toggle(Efer::NXE),
                }
                ctx.eflags_ac = (a >> 8) & 1 == 1;
                reference.ctx[vcpu] = ctx;
                cpus[vcpu]
                    .load_context(&ctx)
                    .map_err(|e| format!("{}: {e}", what("context")))?;
            }
            // Memslot delete / add / move of slot 1.
            78..=85 => match slot1_base {
                Some(base) if op >= 84 => {
                    slot1_flags.toggle(MemslotFlags::READONLY);
                    set_both(&b, &mut reference, slot1(&shadow_ram, base, slot1_flags));
                }
                Some(_) if op < 81 => {
                    b.delete_memslot(SlotId(1))
                        .map_err(|e| format!("{}: {e}", what("delete")))?;
                    reference.slots.delete(SlotId(1)).expect("reference slot");
                    slot1_base = None;
                }
                Some(base) => {
                    let new = if base == SLOT1_BASES[0] {
                        SLOT1_BASES[1]
                    } else {
                        SLOT1_BASES[0]
                    };
                    set_both(&b, &mut reference, slot1(&shadow_ram, new, slot1_flags));
                    slot1_base = Some(new);
                }
                None => {
                    let base = SLOT1_BASES[usize::from(a & 2 != 0)];
                    set_both(&b, &mut reference, slot1(&shadow_ram, base, slot1_flags));
                    slot1_base = Some(base);
                }
            },
            // Dirty logging on slot 0: toggle, or harvest.
            86..=93 => {
                if op < 89 || !logging {
                    logging = !logging;
                    let flags = slot0_flags(logging, slot0_ro);
                    set_both(&b, &mut reference, shadow_ram.slot(0, 0, 0, 32, flags));
                    reference.written.clear();
                } else {
                    let log = b
                        .get_dirty_log(SlotId(0))
                        .map_err(|e| format!("{}: {e}", what("harvest")))?;
                    for gfn in reference.written.iter().filter(|g| **g < 32) {
                        check(log.is_dirty(*gfn), || {
                            format!("{}: dirty page {gfn} lost", what("harvest"))
                        })?;
                    }
                    reference.written.clear();
                }
            }
            // Zap everything; or run the obsolete-page reclaimer.
            94..=96 => {
                b.reclaim_obsolete();
            }
            // Hostile operations from here on.
            // A page limit, possibly below the minimum (refused, typed).
            103 | 104 => {
                let before = b.page_limit();
                let want = (v & 1 == 1).then_some((v >> 1) % (MIN_PAGE_LIMIT + 8));
                let res = b.set_page_limit(want);
                match want {
                    Some(n) if n < MIN_PAGE_LIMIT => {
                        let err = BackendError::PageLimitTooLow {
                            requested: n,
                            minimum: MIN_PAGE_LIMIT,
                        };
                        check(res == Err(err) && b.page_limit() == before, || {
                            format!("{}: limit {n} gave {res:?}", what("page limit"))
                        })?;
                    }
                    _ => check(res.is_ok() && b.page_limit() == want, || {
                        format!("{}: limit {want:?} gave {res:?}", what("page limit"))
                    })?,
                }
            }
            // A memslot change the backend must refuse with a typed error,
            // changing nothing; unknown ids; a harvest of a slot that does
            // not log.
            105..=107 => {
                let slots_before = b.memslots();
                let generation = b.memslot_generation();
                let slot0 = shadow_ram.slot(0, 0, 0, 32, slot0_flags(logging, slot0_ro));
                let live1 = slot1_base.map(|base| slot1(&shadow_ram, base, slot1_flags));
                let (res, want, name) = match (v >> 60) % 4 {
                    0 => (
                        b.delete_memslot(SlotId(7)).map(|_| ()),
                        MemslotError::UnknownSlot(SlotId(7)),
                        "delete of an unknown id",
                    ),
                    1 if !logging => (
                        b.get_dirty_log(SlotId(0)).map(|_| ()),
                        MemslotError::NotLogging(SlotId(0)),
                        "harvest of a slot that does not log",
                    ),
                    1 => (
                        b.get_dirty_log(SlotId(9)).map(|_| ()),
                        MemslotError::UnknownSlot(SlotId(9)),
                        "harvest of an unknown id",
                    ),
                    _ => {
                        let (slot, want, name) = refused_change(v, &shadow_ram, slot0, live1);
                        // SAFETY: the slot's host range is inside
                        // `shadow_ram`, which outlives the backend (or is
                        // refused before it is used).
                        let res = unsafe { b.set_memslot(slot) }.map(|_| ());
                        (res, want, name)
                    }
                };
                check(res == Err(want.clone()), || {
                    format!("{}: {name}: {res:?}, expected {want:?}", what("refused"))
                })?;
                check(
                    b.memslots() == slots_before && b.memslot_generation() == generation,
                    || format!("{}: {name} changed the memslots", what("refused")),
                )?;
            }
            // A host (DMA) write into slot 0, page tables included; the
            // guest flushes before it relies on it.
            108 | 109 => {
                let page = a % 32;
                let index = ((a >> 8) % 512) as usize;
                shadow_ram.set_word(page, index, v);
                reference.ram.set_word(page, index, v);
                b.note_host_write(Gpa(page * 0x1000 + 8 * index as u64), 8);
                reference.written.insert(page);
                guest_flush(&mut cpus, &reference, mode)?;
            }
            // Slot 0, which holds the page tables, turns READONLY or back.
            110 | 111 => {
                slot0_ro = !slot0_ro;
                let flags = slot0_flags(logging, slot0_ro);
                set_both(&b, &mut reference, shadow_ram.slot(0, 0, 0, 32, flags));
            }
            // An impossible paging context: refused, the old one stays.
            112 | 113 => {
                let mut bad = reference.ctx[vcpu];
                let err = if v & 1 == 0 {
                    bad.maxphyaddr = [0, 31, 53, 64, 255][((v >> 1) % 5) as usize];
                    ContextError::MaxPhyAddr(bad.maxphyaddr)
                } else {
                    bad.cpl = 4 + ((v >> 1) % 250) as u8;
                    ContextError::Cpl(bad.cpl)
                };
                let res = cpus[vcpu].load_context(&bad);
                check(res == Err(VcpuError::Context(err)), || {
                    format!("{}: {bad:?} gave {res:?}", what("bad context"))
                })?;
                let kept = *cpus[vcpu].mmu().paging_context();
                check(kept == reference.ctx[vcpu], || {
                    format!("{}: the vCPU's context changed", what("bad context"))
                })?;
            }
            // An access at a raw linear address (non-canonical, high,
            // anywhere; 32 bits outside long mode, as no other linear
            // address exists there). Under replay the backend reserves the
            // window's top-level slot: a user access there gets #GP.
            114 | 115 => {
                let long = matches!(mode, PagingMode::Level4 | PagingMode::Level5);
                let gva = Gva(if long { a & !7 } else { a & 0xffff_fff8 });
                let kind = match (v >> 40) % 3 {
                    0 => AccessKind::Read,
                    1 => AccessKind::Write,
                    _ => AccessKind::Fetch,
                };
                let amode = if (v >> 42) & 1 == 1 {
                    AccessMode::User
                } else {
                    AccessMode::Supervisor
                };
                let access = Access { kind, mode: amode };
                if case.replay && long && in_window_slot(mode, gva) {
                    if amode == AccessMode::User {
                        let size = if kind == AccessKind::Fetch { 1 } else { 8 };
                        let got = cpus[vcpu].access(gva, kind, amode, size, v);
                        check(matches!(got, Ok(SoftOutcome::GeneralProtection)), || {
                            format!("{}: {gva} in the window gave {got:?}", what("raw access"))
                        })?;
                    }
                } else {
                    let got = compare_access(&mut cpus, &mut reference, vcpu, gva, access, v)
                        .map_err(|e| format!("{}: {e}", what("raw access")))?;
                    if kind == AccessKind::Write && matches!(got, SoftOutcome::Done(_)) {
                        guest_flush(&mut cpus, &reference, mode)?;
                    }
                }
            }
            _ => b.zap_all(),
        }
        // The whole guest memory, A/D bits included, must be identical.
        for p in 0..RAM_PAGES {
            if shadow_ram.page_words(p) != reference.ram.page_words(p) {
                let i = (0..512)
                    .find(|&i| shadow_ram.word(p, i) != reference.ram.word(p, i))
                    .expect("a word differs");
                return Err(format!(
                    "{}: guest memory differs at page {p} word {i}: shadow {:#x}, reference {:#x}",
                    what("memory"),
                    shadow_ram.word(p, i),
                    reference.ram.word(p, i)
                ));
            }
        }
        b.audit().map_err(|e| format!("{}: {e}", what("audit")))?;
        steps += 1;
    }
    Ok(CaseReport {
        steps,
        stats: b.stats(),
    })
}
