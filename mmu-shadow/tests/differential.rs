//! The shadow MMU against the reference: random guest page tables in
//! no-paging, 32-bit, PAE, 4-level and 5-level modes, random accesses,
//! guest page-table edits (followed by the flush a correct guest issues),
//! CR3 switches, CR0.WP / CR4.SMEP / CR4.SMAP / EFER.NXE / EFLAGS.AC
//! changes, memslot delete / add / move / READONLY, dirty logging, zap-all,
//! tiny page limits and prefetch on or off.
//!
//! Two copies of guest memory: the soft vCPU runs on one through the shadow
//! tables (faults served by the MMU); the reference walks the guest's own
//! tables in the other with `mmu_api`'s walker. After every step the access
//! outcome, the whole guest memory (data and the A/D bits the guest sees),
//! and `audit()` must agree; a harvested dirty log must hold every page
//! written since the last harvest.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};

use common::{GuestRam, add_slot, config};
use mmu_api::paging::{Cr0, Cr4, Efer, GuestPhysMemory, SlotMemory, WalkError, walk};
use mmu_api::{
    Access, AccessKind, AccessMode, Gpa, Gva, Memslot, MemslotFlags, MemslotTable, MmuBackend,
    MmuVcpu, PagingContext, PagingMode, SlotId, VcpuId,
};
use mmu_shadow::soft::{ShadowingHost, SoftOutcome, SoftVcpu};
use mmu_shadow::{Coherence, MIN_PAGE_LIMIT, ReclaimPolicy, ShadowBackend, ZapMode};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

const RAM_PAGES: u64 = 40;
/// Guest tables live in RAM pages 1..=8 (gpa = page * 4 KiB, slot 0).
const TABLE_FRAMES: std::ops::RangeInclusive<u64> = 1..=8;
/// Slot 1 is RAM pages 32..40, at one of two guest bases.
const SLOT1_BASES: [u64; 2] = [0x2_0000, 0x3_0000];
const MAXPHYADDR: u8 = 40;

/// A tiny deterministic generator for table contents.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn below(&mut self, n: u64) -> u64 {
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

/// A random guest entry for `level` of `mode`.
fn random_entry(rng: &mut Rng, mode: PagingMode, level: u8) -> u64 {
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
            _ => 0x28 + rng.below(16),         // MMIO hole or beyond
        }
    } else if rng.chance(90) {
        table_frame(rng, mode)
    } else {
        0x38 + rng.below(8) // a table outside guest memory
    };
    if large {
        e |= 1 << 7;
        // Large pages map from gpa 0 so they cover slot 0, slot 1 and holes.
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

/// Fills the guest tables of `mode` in `ram` (entries 0..4 of every table
/// frame, plus PAE PDPTEs).
fn build_tables(ram: &mut GuestRam, mode: PagingMode, seed: u64) {
    let mut rng = Rng(seed | 1);
    for frame in TABLE_FRAMES {
        for index in 0..4usize {
            // Which level this frame plays differs per path; any level's
            // entry shape is plausible for any table frame.
            let level = 1 + rng.below(u64::from(mode.levels().max(1))) as u8;
            let e = random_entry(&mut rng, mode, level);
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

fn context(mode: PagingMode, cr3_frame: u64, wp: bool) -> PagingContext {
    let mut ctx = PagingContext::for_mode(mode, cr3_frame << 12, MAXPHYADDR).expect("context");
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
    let ref_slot = Memslot {
        backing: mmu_api::HostBacking {
            host_addr: reference
                .ram
                .host_addr(slot.backing.hpa.raw().wrapping_sub(common::RAM_HPA) >> 12),
            ..slot.backing
        },
        ..slot
    };
    add_slot(backend, slot);
    reference.slots.set(ref_slot).expect("reference slot");
}

/// Counters summed over every case, to show each mechanism was exercised.
const EXERCISED: [&str; 17] = [
    "replayed_entries",
    "fast_zaps",
    "naive_zaps",
    "obsolete_zapped",
    "mmio_fast_hits",
    "mmio_stale",
    "generation_wraps",
    "faults_fixed",
    "faults_injected",
    "faults_mmio",
    "write_protect_hits",
    "emulated_writes",
    "flooding_zaps",
    "prefetched_sptes",
    "reclaimed_valid",
    "zap_all",
    "dirty_harvests",
];
static TOTALS: [AtomicU64; 17] = [const { AtomicU64::new(0) }; 17];
static SEQUENCES: AtomicU64 = AtomicU64::new(0);
static STEPS: AtomicU64 = AtomicU64::new(0);

#[derive(Debug, Clone)]
struct Case {
    mode: PagingMode,
    seed: u64,
    prefetch: usize,
    limit: Option<u64>,
    zap: ZapMode,
    reclaim: ReclaimPolicy,
    /// MMIO caching off, or on with this many generation bits.
    mmio_bits: Option<u8>,
    /// Host a hypervisor that shadows the pool (PVM's model) and keep it
    /// coherent by replay.
    replay: bool,
    ops: Vec<(u8, u64, u64)>,
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (
        prop_oneof![
            1 => Just(PagingMode::NoPaging),
            3 => Just(PagingMode::Bits32),
            3 => Just(PagingMode::Pae),
            3 => Just(PagingMode::Level4),
            2 => Just(PagingMode::Level5),
        ],
        any::<u64>(),
        prop_oneof![Just(0usize), Just(8usize)],
        prop_oneof![3 => Just(None), 1 => (MIN_PAGE_LIMIT..MIN_PAGE_LIMIT + 8).prop_map(Some)],
        prop::collection::vec((0u8..100, any::<u64>(), any::<u64>()), 1..24),
        (
            prop_oneof![3 => Just(ZapMode::Fast), 1 => Just(ZapMode::Naive)],
            prop_oneof![Just(ReclaimPolicy::Fifo), Just(ReclaimPolicy::ParentAware)],
            prop_oneof![1 => Just(None), 2 => Just(Some(19u8)), 2 => Just(Some(2u8))],
            prop_oneof![2 => Just(false), 1 => Just(true)],
        ),
    )
        .prop_map(
            |(mode, seed, prefetch, limit, ops, (zap, reclaim, mmio_bits, replay))| Case {
                mode,
                seed,
                prefetch,
                limit,
                zap,
                reclaim,
                mmio_bits,
                replay,
                ops,
            },
        )
}

/// What a correct guest does after editing its tables: flush every vCPU's
/// TLB. PAE guests reload CR3 instead, since the PDPTEs are only read then.
fn guest_flush(
    cpus: &mut [SoftVcpu; 2],
    reference: &Reference,
    mode: PagingMode,
) -> Result<(), TestCaseError> {
    for (i, c) in cpus.iter_mut().enumerate() {
        if mode == PagingMode::Pae {
            c.load_context(&reference.ctx[i])
                .map_err(|e| TestCaseError::fail(format!("reload: {e}")))?;
        } else {
            c.flush();
        }
    }
    Ok(())
}

fn check(cond: bool, what: impl FnOnce() -> String) -> Result<(), TestCaseError> {
    if cond {
        Ok(())
    } else {
        Err(TestCaseError::fail(what()))
    }
}

fn run_case(case: &Case) -> Result<(), TestCaseError> {
    let mode = case.mode;
    let mut shadow_ram = GuestRam::new(RAM_PAGES);
    let mut ref_ram = GuestRam::new(RAM_PAGES);
    build_tables(&mut shadow_ram, mode, case.seed);
    build_tables(&mut ref_ram, mode, case.seed);
    // Some data so reads are not all zero.
    for p in 16..RAM_PAGES {
        shadow_ram.set_word(p, 0, p * 0x1111);
        ref_ram.set_word(p, 0, p * 0x1111);
    }
    let b = ShadowBackend::new(mmu_shadow::ShadowConfig {
        zap: case.zap,
        reclaim: case.reclaim,
        mmio_caching: case.mmio_bits.is_some(),
        mmio_gen_bits: case.mmio_bits.unwrap_or(19),
        coherence: if case.replay {
            Coherence::Replay {
                window: Gva(0xffff_8000_0000_0000),
            }
        } else {
            Coherence::Direct
        },
        ..config(case.limit, case.prefetch)
    })
    .expect("backend");
    let ctx0 = context(mode, 1, true);
    let mut reference = Reference {
        ram: ref_ram,
        slots: MemslotTable::new(40, 8),
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
        .unwrap()
    };
    let mut cpus = [cpu(0), cpu(1)];
    for c in &mut cpus {
        c.load_context(&ctx0).unwrap();
    }
    let mut slot1_base = Some(SLOT1_BASES[0]);
    let mut slot1_flags = MemslotFlags::empty();
    let mut logging = false;
    let mut rng = Rng(case.seed ^ 0x9e37_79b9_7f4a_7c15 | 1);

    for (step, &(op, a, v)) in case.ops.iter().enumerate() {
        let vcpu = (a & 1) as usize;
        let what = |s: &str| format!("step {step} op {op} ({s}) a={a:#x} v={v:#x}");
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
                let expected = reference.access(vcpu, gva, access, v);
                let size = if kind == AccessKind::Fetch { 1 } else { 8 };
                let got = cpus[vcpu].access(gva, kind, amode, size, v).map_err(|e| {
                    TestCaseError::fail(format!("{}: soft vCPU error {e}", what("access")))
                })?;
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
                    format!(
                        "{}: {gva} {access:?}: shadow {got:?}, reference {expected:?}",
                        what("access")
                    )
                })?;
                // A guest that wrote its own page tables flushes.
                if kind == AccessKind::Write && matches!(got, SoftOutcome::Done(_)) {
                    guest_flush(&mut cpus, &reference, mode)?;
                }
            }
            // A guest page-table edit (emulated CPL0 store), then a flush.
            60..=69 => {
                let frame = *TABLE_FRAMES.start() + (a >> 8) % 8;
                let index = ((a >> 16) % 4) as usize;
                let level = 1 + rng.below(u64::from(mode.levels().max(1))) as u8;
                let e = random_entry(&mut rng, mode, level);
                let (gpa, bytes): (u64, Vec<u8>) = if mode == PagingMode::Bits32 {
                    (
                        (frame << 12) + 4 * index as u64,
                        (e as u32).to_le_bytes().to_vec(),
                    )
                } else {
                    ((frame << 12) + 8 * index as u64, e.to_le_bytes().to_vec())
                };
                cpus[vcpu]
                    .mmu()
                    .write_guest(Gpa(gpa), &bytes)
                    .map_err(|e| TestCaseError::fail(format!("{}: {e}", what("edit"))))?;
                write_entry(&mut reference.ram, mode, frame, index, e);
                reference.written.insert(frame);
                guest_flush(&mut cpus, &reference, mode)?;
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
                    .map_err(|e| TestCaseError::fail(format!("{}: {e}", what("context"))))?;
            }
            // Memslot delete / add / move of slot 1.
            78..=85 => match slot1_base {
                Some(base) if op >= 84 => {
                    slot1_flags.toggle(MemslotFlags::READONLY);
                    set_both(&b, &mut reference, slot1(&shadow_ram, base, slot1_flags));
                }
                Some(_) if op < 81 => {
                    b.delete_memslot(SlotId(1)).unwrap();
                    reference.slots.delete(SlotId(1)).unwrap();
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
                    let flags = if logging {
                        MemslotFlags::LOG_DIRTY
                    } else {
                        MemslotFlags::empty()
                    };
                    set_both(&b, &mut reference, shadow_ram.slot(0, 0, 0, 32, flags));
                    reference.written.clear();
                } else {
                    let log = b.get_dirty_log(SlotId(0)).unwrap();
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
            _ => b.zap_all(),
        }
        // The whole guest memory, A/D bits included, must be identical.
        for p in 0..RAM_PAGES {
            if shadow_ram.page_words(p) != reference.ram.page_words(p) {
                let i = (0..512)
                    .find(|&i| shadow_ram.word(p, i) != reference.ram.word(p, i))
                    .unwrap();
                return Err(TestCaseError::fail(format!(
                    "{}: guest memory differs at page {p} word {i}: shadow {:#x}, reference {:#x}",
                    what("memory"),
                    shadow_ram.word(p, i),
                    reference.ram.word(p, i)
                )));
            }
        }
        b.audit()
            .map_err(|e| TestCaseError::fail(format!("{}: {e}", what("audit"))))?;
        STEPS.fetch_add(1, Ordering::Relaxed);
    }
    let stats = b.stats();
    for (name, total) in EXERCISED.iter().zip(&TOTALS) {
        total.fetch_add(stats.get(name).unwrap_or(0), Ordering::Relaxed);
    }
    SEQUENCES.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

#[test]
fn shadow_matches_reference_on_random_sequences() {
    let cases = std::env::var("SHADOW_DIFF_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&case_strategy(), |case| run_case(&case));
    let sequences = SEQUENCES.load(Ordering::Relaxed);
    let steps = STEPS.load(Ordering::Relaxed);
    println!(
        "shadow differential: {sequences} random sequences checked ({steps} steps, audit after each)"
    );
    if let Err(e) = result {
        panic!("{e}");
    }
    assert!(sequences >= u64::from(cases));
    for (name, total) in EXERCISED.iter().zip(&TOTALS) {
        let total = total.load(Ordering::Relaxed);
        println!("  {name}: {total}");
        assert!(
            cases < 1000 || total > 0,
            "the random sequences never exercised {name}"
        );
    }
}
