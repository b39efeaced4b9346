//! An independent oracle for the guest page-table walker
//! (`mmu_api::paging::walk`), written from the Intel SDM Vol. 3, chapter 4
//! ("Paging"), without looking at the walker's internals.
//!
//! The model (`model_walk`, in `tests/model/mod.rs`, which the `walker`
//! fuzz target shares) is a second, deliberately plain implementation of
//! the architecture rules: it reads the tables, decides not-present /
//! reserved-bit / permission / protection-key faults with the exact error
//! code, computes the translation, and predicts every word of guest memory
//! the walk must leave behind (A/D bits only on success). The tests compare
//! the walker with it:
//!
//! - `walker_matches_model_exhaustively`: several hundred thousand
//!   enumerated combinations (entry flag bits at every level, one reserved
//!   bit at a time, CR0.WP, EFER.NXE, CR4.SMEP/SMAP/PKE/PGE/PSE, EFLAGS.AC,
//!   PKRU, every access kind and mode, 32-bit, PAE, 4-level and 5-level
//!   paging, several MAXPHYADDR values).
//! - `walker_matches_model_on_random_tables`: proptest over random tables.
//!
//! Both print their counts with `eprintln!`; run
//! `cargo test -p mmu-api --test walker_model -- --nocapture` to see them
//! when the tests pass. Every mismatch is printed in full (mode, registers,
//! entries, access, expected and actual outcome, memory differences).

mod model;

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use mmu_api::paging::{
    Access, AccessKind, AccessMode, CpuFeatures, Cr0, Cr4, Efer, GuestPhysMemory, PagingContext,
    PhysMemError, SparseMemory, WalkOptions, walk_with,
};
use mmu_api::{Gfn, Gpa, Gva};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use model::*;

type Histogram = BTreeMap<&'static str, u64>;

fn print_histogram(h: &Histogram) {
    let line: Vec<String> = h.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    eprintln!("  expected outcomes: {}", line.join(", "));
}

// ---------------------------------------------------------------------------
// Guest memory for the tests: records the original value of every word the
// walker changes, so the test can check (and undo) every write.

trait TestMemory: GuestPhysMemory {
    fn add_frame(&self, gfn: u64);
    fn peek(&self, gpa: u64) -> Option<u64>;
    fn poke(&self, gpa: u64, value: u64);
    /// The (gpa, original value) of every word changed since the last call.
    fn take_log(&self) -> Vec<(u64, u64)>;

    fn poke_entry(&self, gpa: u64, size: u64, value: u64) {
        if size == 4 {
            let word = gpa & !7;
            let shift = (gpa & 4) * 8;
            let old = self.peek(word).expect("entry frame is backed");
            self.poke(
                word,
                (old & !(0xffff_ffff << shift)) | ((value & 0xffff_ffff) << shift),
            );
        } else {
            self.poke(gpa, value);
        }
    }
}

fn log_write(log: &RefCell<Vec<(u64, u64)>>, gpa: u64, current: u64, new: u64) {
    if new != current {
        let mut log = log.borrow_mut();
        if !log.iter().any(|&(g, _)| g == gpa) {
            log.push((gpa, current));
        }
    }
}

/// Small, fast memory for the enumeration (a handful of frames).
#[derive(Default)]
struct FastMem {
    frames: RefCell<Vec<(u64, Box<[u64; 512]>)>>,
    log: RefCell<Vec<(u64, u64)>>,
}

impl GuestPhysMemory for FastMem {
    fn read_u64(&self, gpa: Gpa) -> Result<u64, PhysMemError> {
        if !gpa.raw().is_multiple_of(8) {
            return Err(PhysMemError::Misaligned(gpa));
        }
        self.peek(gpa.raw()).ok_or(PhysMemError::Unbacked(gpa))
    }

    fn compare_exchange_u64(
        &self,
        gpa: Gpa,
        current: u64,
        new: u64,
    ) -> Result<Result<(), u64>, PhysMemError> {
        let g = gpa.raw();
        if !g.is_multiple_of(8) {
            return Err(PhysMemError::Misaligned(gpa));
        }
        let mut frames = self.frames.borrow_mut();
        let Some((_, frame)) = frames.iter_mut().find(|(f, _)| *f == g >> 12) else {
            return Err(PhysMemError::Unbacked(gpa));
        };
        let slot = &mut frame[((g & 0xfff) >> 3) as usize];
        if *slot != current {
            return Ok(Err(*slot));
        }
        log_write(&self.log, g, current, new);
        *slot = new;
        Ok(Ok(()))
    }
}

impl TestMemory for FastMem {
    fn add_frame(&self, gfn: u64) {
        let mut frames = self.frames.borrow_mut();
        if !frames.iter().any(|(f, _)| *f == gfn) {
            frames.push((gfn, Box::new([0; 512])));
        }
    }

    fn peek(&self, gpa: u64) -> Option<u64> {
        self.frames
            .borrow()
            .iter()
            .find(|(f, _)| *f == gpa >> 12)
            .map(|(_, frame)| frame[((gpa & 0xfff) >> 3) as usize])
    }

    fn poke(&self, gpa: u64, value: u64) {
        let mut frames = self.frames.borrow_mut();
        let (_, frame) = frames
            .iter_mut()
            .find(|(f, _)| *f == gpa >> 12)
            .expect("poke into a backed frame");
        frame[((gpa & 0xfff) >> 3) as usize] = value;
    }

    fn take_log(&self) -> Vec<(u64, u64)> {
        std::mem::take(&mut *self.log.borrow_mut())
    }
}

/// The crate's `SparseMemory`, with a write log.
#[derive(Default)]
struct LoggedSparse {
    mem: SparseMemory,
    log: RefCell<Vec<(u64, u64)>>,
}

impl GuestPhysMemory for LoggedSparse {
    fn read_u64(&self, gpa: Gpa) -> Result<u64, PhysMemError> {
        self.mem.read_u64(gpa)
    }

    fn compare_exchange_u64(
        &self,
        gpa: Gpa,
        current: u64,
        new: u64,
    ) -> Result<Result<(), u64>, PhysMemError> {
        let res = self.mem.compare_exchange_u64(gpa, current, new);
        if let Ok(Ok(())) = res {
            log_write(&self.log, gpa.raw(), current, new);
        }
        res
    }
}

impl TestMemory for LoggedSparse {
    fn add_frame(&self, gfn: u64) {
        self.mem.add_frame(Gfn(gfn));
    }

    fn peek(&self, gpa: u64) -> Option<u64> {
        self.mem.read_u64(Gpa(gpa)).ok()
    }

    fn poke(&self, gpa: u64, value: u64) {
        self.mem
            .write_u64(Gpa(gpa), value)
            .expect("poke into a backed frame");
    }

    fn take_log(&self) -> Vec<(u64, u64)> {
        std::mem::take(&mut *self.log.borrow_mut())
    }
}

// ---------------------------------------------------------------------------
// Cases.

#[derive(Clone, Copy)]
struct EntryW {
    label: &'static str,
    gpa: u64,
    size: u64,
    value: u64,
}

#[derive(Clone)]
struct Case {
    ctx: PagingContext,
    gva: u64,
    access: Access,
    /// Everything written to guest memory before the walk.
    entries: Vec<EntryW>,
    /// Backed frames (gfns).
    frames: Vec<u64>,
}

fn describe(case: &Case) -> String {
    let r = regs(&case.ctx);
    let c = &case.ctx;
    let entries: Vec<String> = case
        .entries
        .iter()
        .map(|e| format!("{}@{:#x}={:#x}", e.label, e.gpa, e.value))
        .collect();
    format!(
        "mode={:?} MAXPHYADDR={} cr0={:#x} cr4={:#x} efer={:#x} [WP={} NX={} SMEP={} SMAP={} AC={} \
         PKE(active)={} PGE={} PSE={}] cpl={} pkru={:#010x} features={:?} cr3={:#x} gva={:#x} \
         access={:?}/{:?} entries=[{}] backed_gfns={:x?}",
        r.mode,
        c.maxphyaddr,
        c.cr0.bits(),
        c.cr4.bits(),
        c.efer.bits(),
        u8::from(r.wp),
        u8::from(r.nx),
        u8::from(r.smep),
        u8::from(r.smap),
        u8::from(r.ac),
        u8::from(r.pke),
        u8::from(r.pge),
        u8::from(r.pse),
        c.cpl,
        c.pkru,
        c.features,
        c.cr3,
        case.gva,
        case.access.kind,
        case.access.mode,
        entries.join(" "),
        case.frames,
    )
}

/// Sets up memory, runs the model and the walker, compares outcome and
/// memory, restores memory. Returns the class of the expected outcome and,
/// on mismatch, a full description of the case.
fn check_case<Mm: TestMemory>(
    mem: &Mm,
    case: &Case,
    options: WalkOptions,
) -> (&'static str, Option<String>) {
    for &f in &case.frames {
        mem.add_frame(f);
    }
    for e in &case.entries {
        mem.poke_entry(e.gpa, e.size, e.value);
    }
    let model = model_walk(
        &case.ctx,
        &|g| mem.peek(g),
        case.gva,
        case.access,
        options.set_accessed_dirty,
    );
    mem.take_log();
    let actual = match catch_unwind(AssertUnwindSafe(|| {
        walk_with(&case.ctx, mem, Gva(case.gva), case.access, options)
    })) {
        Ok(res) => outcome_of(res),
        Err(_) => Outcome::Other("walker panicked".to_string()),
    };
    let log = mem.take_log();

    let mut problems = Vec::new();
    for (&g, &v) in &model.words {
        let got = mem.peek(g);
        if got != Some(v) {
            problems.push(format!("word {g:#x}: expected {v:#x}, found {got:x?}"));
        }
    }
    for &(g, orig) in &log {
        if !model.words.contains_key(&g) {
            let got = mem.peek(g);
            if got != Some(orig) {
                problems.push(format!(
                    "word {g:#x} must stay {orig:#x}, walker wrote {got:x?}"
                ));
            }
        }
    }
    // Undo the walker's writes, then clear the entries.
    for &(g, orig) in log.iter().rev() {
        mem.poke(g, orig);
    }
    for e in &case.entries {
        mem.poke_entry(e.gpa, e.size, 0);
    }

    let class = classify(&model.outcome);
    if model.outcome == actual && problems.is_empty() {
        (class, None)
    } else {
        (
            class,
            Some(format!(
                "{}{}\n    expected: {}\n    actual:   {}\n    memory:   {}",
                describe(case),
                if options.set_accessed_dirty {
                    ""
                } else {
                    " (set_accessed_dirty=false)"
                },
                model.outcome,
                actual,
                if problems.is_empty() {
                    "as expected".to_string()
                } else {
                    problems.join("; ")
                },
            )),
        )
    }
}

// ---------------------------------------------------------------------------
// Contexts, layouts and accesses for the enumeration.

#[derive(Clone, Copy)]
struct Opts {
    wp: bool,
    nxe: bool,
    smep: bool,
    smap: bool,
    ac: bool,
    pke: bool,
    pge: bool,
    pse: bool,
    cpl: u8,
    pkru: u32,
    features: CpuFeatures,
    cr3_junk: u64,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            wp: true,
            nxe: true,
            smep: false,
            smap: false,
            ac: false,
            pke: false,
            pge: false,
            pse: true,
            cpl: 0,
            pkru: 0,
            features: CpuFeatures::all(),
            cr3_junk: 0,
        }
    }
}

fn make_ctx(mode: Mode, m: u8, cr3: u64, o: &Opts) -> PagingContext {
    let mut cr0 = CR0_PE;
    let mut cr4 = 0;
    let mut efer = 0;
    if mode != Mode::NoPaging {
        cr0 |= CR0_PG;
    }
    match mode {
        Mode::Pae => cr4 |= CR4_PAE,
        Mode::Level4 => {
            cr4 |= CR4_PAE;
            efer |= EFER_LME | EFER_LMA;
        }
        Mode::Level5 => {
            cr4 |= CR4_PAE | CR4_LA57;
            efer |= EFER_LME | EFER_LMA;
        }
        Mode::NoPaging | Mode::Bits32 => {}
    }
    for (on, bit) in [
        (o.pse, CR4_PSE),
        (o.pge, CR4_PGE),
        (o.smep, CR4_SMEP),
        (o.smap, CR4_SMAP),
        (o.pke, CR4_PKE),
    ] {
        if on {
            cr4 |= bit;
        }
    }
    if o.wp {
        cr0 |= CR0_WP;
    }
    if o.nxe {
        efer |= EFER_NXE;
    }
    let mut ctx = PagingContext::new(o.features, m);
    ctx.cr0 = Cr0::from_bits_retain(cr0);
    ctx.cr3 = cr3 | o.cr3_junk;
    ctx.cr4 = Cr4::from_bits_retain(cr4);
    ctx.efer = Efer::from_bits_retain(efer);
    ctx.cpl = o.cpl;
    ctx.eflags_ac = o.ac;
    ctx.pkru = o.pkru;
    if let Err(e) = ctx.validate() {
        panic!("test built an invalid context {ctx:?}: {e}");
    }
    ctx
}

const KINDS: [AccessKind; 3] = [AccessKind::Read, AccessKind::Write, AccessKind::Fetch];
const AMODES: [AccessMode; 3] = [
    AccessMode::User,
    AccessMode::Supervisor,
    AccessMode::ImplicitSupervisor,
];

/// The nine (kind, mode) accesses with a CPL that fits each: user at 3,
/// explicit supervisor at 0 (or 2), implicit supervisor at `implicit_cpl`.
fn accesses(implicit_cpl: u8) -> impl Iterator<Item = (Access, u8)> {
    KINDS.into_iter().flat_map(move |kind| {
        AMODES.into_iter().map(move |mode| {
            let cpl = match mode {
                AccessMode::User => 3,
                AccessMode::Supervisor => {
                    if implicit_cpl == 3 {
                        2
                    } else {
                        0
                    }
                }
                AccessMode::ImplicitSupervisor => implicit_cpl,
                other => panic!("the model has no CPL for {other:?}"),
            };
            (Access { kind, mode }, cpl)
        })
    })
}

const LABELS: [&str; 6] = ["-", "PTE", "PDE", "PDPTE", "PML4E", "PML5E"];

/// Where the tables of one enumeration live. `tables[l]` holds the level-`l`
/// entries; large-page leaves map the (suitably aligned) next table's
/// address, so PS can be flipped without changing the address field.
#[derive(Clone, Copy, Debug)]
struct Layout {
    mode: Mode,
    m: u8,
    cr3: u64,
    gva: u64,
    tables: [u64; 6],
    leaf: u64,
}

impl Layout {
    fn new(mode: Mode, m: u8, variant: u64) -> Self {
        let hi = 1u64 << (m - 1);
        let mut tables = [0u64; 6];
        let (cr3, gva, leaf) = match mode {
            Mode::Level4 | Mode::Level5 => {
                // PD 1-GByte aligned, PT 2-MByte aligned, both near MAXPHYADDR.
                tables[1] = (1u64 << (m - 2)) | (0x1b3 << 21);
                tables[2] = hi | (1 << 30);
                tables[3] = 0x2000;
                tables[4] = 0x1000;
                tables[5] = 0x3000;
                let top_idx = if variant & 1 != 0 { 0x1a5 } else { 0x0a5 };
                let upper = if mode == Mode::Level5 {
                    (0x1f3 << 48) | (top_idx << 39)
                } else {
                    top_idx << 39
                };
                let raw = upper | (0x0c7 << 30) | (0x1d9 << 21) | (0x0eb << 12) | 0x5a5;
                let width = if mode == Mode::Level5 { 57 } else { 48 };
                let raw = if mode == Mode::Level5 && variant & 1 == 0 {
                    raw & !(0x100 << 48)
                } else {
                    raw
                };
                let cr3 = tables[usize::from(mode.top())];
                (cr3, sign_extend(raw, width), hi | 0x0bad_c000)
            }
            Mode::Pae => {
                tables[1] = (1u64 << (m - 2)) | (0x13 << 21);
                tables[2] = hi | 0x0123_4000;
                tables[3] = 0x4060;
                let pdpt_idx = if variant & 1 != 0 { 3 } else { 2 };
                let gva = (pdpt_idx << 30) | (0x1a3 << 21) | (0x55 << 12) | 0x678;
                (tables[3], gva, hi | 0x0fed_c000)
            }
            Mode::Bits32 => {
                tables[1] = 0x7fc0_0000;
                tables[2] = 0x5000;
                let pd_idx = if variant & 1 != 0 { 0x3f0 } else { 0x2a5 };
                let gva = (pd_idx << 22) | (0x1c2 << 12) | 0x9ab;
                (tables[2], gva, 0xdead_b000)
            }
            Mode::NoPaging => (0, 0x1234_5678, 0),
        };
        Layout {
            mode,
            m,
            cr3,
            gva,
            tables,
            leaf,
        }
    }

    fn entry_gpa(&self, level: u8) -> u64 {
        self.tables[usize::from(level)] + self.mode.index(self.gva, level) * self.mode.entry_size()
    }

    fn target(&self, level: u8) -> u64 {
        if level == 1 {
            self.leaf
        } else {
            self.tables[usize::from(level - 1)]
        }
    }

    fn frames(&self) -> Vec<u64> {
        (1..=self.mode.top())
            .map(|l| self.tables[usize::from(l)] >> 12)
            .collect()
    }

    /// The entries for `flags[level]` (flag bits only; the address is added).
    fn entries(&self, flags: &[u64; 6]) -> Vec<EntryW> {
        let size = self.mode.entry_size();
        let mut out = Vec::new();
        for level in (1..=self.mode.top()).rev() {
            let mut value = flags[usize::from(level)] | self.target(level);
            let gpa = self.entry_gpa(level);
            if size == 4 {
                value &= 0xffff_ffff;
                // The other half of the 8-byte word holds a neighbouring
                // entry that must survive the walk's A/D update.
                out.push(EntryW {
                    label: "neighbour",
                    gpa: gpa ^ 4,
                    size: 4,
                    value: 0xa5a5_a067 ^ (u64::from(level) << 12),
                });
            }
            out.push(EntryW {
                label: LABELS[usize::from(level)],
                gpa,
                size,
                value,
            });
        }
        out
    }

    fn case(&self, o: &Opts, flags: &[u64; 6], access: Access, extra: &[EntryW]) -> Case {
        let mut entries = self.entries(flags);
        entries.extend_from_slice(extra);
        Case {
            ctx: make_ctx(self.mode, self.m, self.cr3, o),
            gva: self.gva,
            access,
            entries,
            frames: self.frames(),
        }
    }
}

fn subsets(bits: &[u64]) -> impl Iterator<Item = u64> + '_ {
    (0u32..(1 << bits.len())).map(move |sel| {
        bits.iter()
            .enumerate()
            .filter(|&(i, _)| sel & (1 << i) != 0)
            .fold(0, |acc, (_, &b)| acc | b)
    })
}

fn nx_bit(mode: Mode) -> Option<u64> {
    if mode == Mode::Bits32 { None } else { Some(XD) }
}

/// PDE-like variants: two non-present values, and every combination of
/// W, U, A, NX, PS (D too when PS makes it a leaf).
fn dir_variants(mode: Mode, pse: bool) -> Vec<u64> {
    let bits: Vec<u64> = [Some(W), Some(U), Some(A), Some(D), Some(PS), nx_bit(mode)]
        .into_iter()
        .flatten()
        .collect();
    let all = bits.iter().fold(0, |a, b| a | b);
    let mut out = vec![0, all];
    for v in subsets(&bits) {
        let v = v | P;
        let leaf = v & PS != 0 && (mode != Mode::Bits32 || pse);
        if !leaf && v & D != 0 {
            continue;
        }
        out.push(v);
    }
    out
}

/// PTE variants: two non-present values and every combination of
/// W, U, A, D, NX.
fn pte_variants(mode: Mode) -> Vec<u64> {
    let bits: Vec<u64> = [Some(W), Some(U), Some(A), Some(D), nx_bit(mode)]
        .into_iter()
        .flatten()
        .collect();
    let all = bits.iter().fold(0, |a, b| a | b);
    let mut out = vec![0, all];
    out.extend(subsets(&bits).map(|v| v | P));
    out
}

/// Upper-level variants: two non-present values and P with every
/// combination of W, U, A, NX.
fn upper_variants() -> Vec<u64> {
    let bits = [W, U, A, XD];
    let mut out = vec![0, W | U | A | XD | PS];
    out.extend(subsets(&bits).map(|v| v | P));
    out
}

type Sink<'a> = &'a mut dyn FnMut(&Case);
type Sweep = Box<dyn Fn(Sink<'_>) + Sync>;

/// Every flag combination of the two lowest levels (PDE, PTE) under every
/// combination of WP, NXE, SMEP, SMAP, AC (and PSE for 32-bit paging), for
/// all nine accesses. `wp_half` splits the work in two.
fn sweep_lower(mode: Mode, wp_half: bool, sink: Sink<'_>) {
    let (m, nctx) = match mode {
        Mode::Bits32 => (40, 64u32),
        Mode::Pae => (36, 32),
        _ => (46, 32),
    };
    for cb in 0..nctx {
        let bit = |i: u32| cb & (1 << i) != 0;
        if bit(0) != wp_half {
            continue;
        }
        let pge = cb.count_ones() % 2 == 1;
        let mut o = Opts {
            wp: bit(0),
            nxe: bit(1),
            smep: bit(2),
            smap: bit(3),
            ac: bit(4),
            pge,
            pse: if mode == Mode::Bits32 { bit(5) } else { bit(2) },
            ..Opts::default()
        };
        if mode.is_long() {
            // Key 0 (the leaves' key) write-disabled, key 1 fully disabled.
            o.pke = bit(1) ^ bit(4);
            o.pkru = 0b10 | (0b11 << 2);
        } else {
            // CR4.PKE has no effect outside IA-32e paging.
            o.pke = pge;
            o.pkru = u32::MAX;
        }
        let implicit_cpl = if bit(3) ^ bit(0) { 3 } else { 0 };
        let l = Layout::new(mode, m, u64::from((cb >> 1) & 1 == 1 && cb & 4 == 0));
        let mut flags = [0u64; 6];
        match mode {
            Mode::Level4 => {
                flags[4] = P | W | U;
                flags[3] = P | W | U | A;
            }
            Mode::Pae => flags[3] = P | if bit(2) { PWT | PCD } else { 0 },
            _ => {}
        }
        let ptes = pte_variants(mode);
        for pde in dir_variants(mode, o.pse) {
            let pde_leaf = pde & P != 0 && pde & PS != 0 && (mode != Mode::Bits32 || o.pse);
            flags[2] = pde | if pde_leaf && pde & A != 0 { G } else { 0 };
            let pte_list: &[u64] = if pde & P == 0 || pde_leaf {
                &[P | W | U]
            } else {
                &ptes
            };
            for &pte in pte_list {
                flags[1] = pte | if pte & A != 0 && pte & P != 0 { G } else { 0 };
                for (acc, cpl) in accesses(implicit_cpl) {
                    o.cpl = cpl;
                    sink(&l.case(&o, &flags, acc, &[]));
                }
            }
        }
    }
}

/// 4-level: every flag combination of the PML4E and the PDPTE (1-GByte
/// pages included), with a fixed PDE and PTE.
fn sweep_upper4(sink: Sink<'_>) {
    let l = Layout::new(Mode::Level4, 46, 1);
    let pdptes = dir_variants(Mode::Level4, true);
    for cb in 0u32..8 {
        let bit = |i: u32| cb & (1 << i) != 0;
        let mut o = Opts {
            wp: bit(0),
            nxe: bit(1),
            smep: bit(2),
            smap: bit(2),
            pge: true,
            ..Opts::default()
        };
        let l = if bit(0) {
            l
        } else {
            Layout::new(Mode::Level4, 46, 0)
        };
        for pml4e in upper_variants() {
            for &pdpte in &pdptes {
                let mut flags = [0u64; 6];
                flags[4] = pml4e;
                flags[3] = pdpte;
                flags[2] = P | W | U | A;
                flags[1] = P | W | U | D;
                if !o.nxe {
                    // Without NXE bit 63 is reserved; that is the reserved
                    // sweep's business. Keep XD only where it is legal.
                    flags[4] &= !XD;
                    flags[3] &= !XD;
                }
                for (acc, cpl) in accesses(if bit(1) { 3 } else { 0 }) {
                    o.cpl = cpl;
                    sink(&l.case(&o, &flags, acc, &[]));
                }
            }
        }
    }
}

/// 5-level: every flag combination of the PML5E and the PML4E.
fn sweep_upper5(sink: Sink<'_>) {
    for cb in 0u32..8 {
        let bit = |i: u32| cb & (1 << i) != 0;
        let mut o = Opts {
            wp: bit(0),
            nxe: true,
            smep: bit(1),
            smap: bit(2),
            ..Opts::default()
        };
        let l = Layout::new(Mode::Level5, 52, u64::from(bit(1)));
        for pml5e in upper_variants() {
            for pml4e in upper_variants() {
                let mut flags = [0u64; 6];
                flags[5] = pml5e;
                flags[4] = pml4e;
                flags[3] = P | W | U | A;
                flags[2] = P | W | U | PS;
                for (acc, cpl) in accesses(if bit(2) { 3 } else { 0 }) {
                    o.cpl = cpl;
                    sink(&l.case(&o, &flags, acc, &[]));
                }
            }
        }
    }
}

/// Every bit (0..63, or 0..31 for 32-bit paging) set alone in every entry of
/// the path, for several MAXPHYADDR values, with and without NXE / PKE /
/// 1-GByte pages / PSE / PSE-36, every page size, all nine accesses. The
/// model decides which bits are reserved, which are ignored and which change
/// the address. Also each bit with P clear (must stay a not-present fault).
fn sweep_reserved(mode: Mode, sink: Sink<'_>) {
    let ms: &[u8] = match mode {
        Mode::Level4 => &[36, 46, 52],
        Mode::Level5 => &[46, 52],
        Mode::Pae => &[32, 36, 46, 52],
        _ => &[32, 36, 40, 46, 52],
    };
    let nbits = if mode == Mode::Bits32 { 32 } else { 64 };
    let nvariants = if mode == Mode::Bits32 { 4 } else { 2 };
    for &m in ms {
        for v in 0..nvariants {
            let mut o = Opts {
                nxe: v & 1 == 1,
                pke: mode.is_long() && v & 1 == 0,
                smep: true,
                ..Opts::default()
            };
            if mode == Mode::Bits32 {
                if v & 1 == 0 {
                    o.features.remove(CpuFeatures::PSE36);
                }
                o.pse = v & 2 == 0;
            }
            let l = Layout::new(mode, m, u64::from(m) & 1);
            // (leaf level, 1-GByte pages supported)
            let kinds: &[(u8, bool)] = match mode {
                Mode::Level4 | Mode::Level5 => &[(1, true), (2, true), (3, true), (3, false)],
                _ => &[(1, true), (2, true)],
            };
            for &(leaf, page1g) in kinds {
                if mode == Mode::Level5 && !page1g {
                    continue;
                }
                let mut o = o;
                if !page1g {
                    o.features.remove(CpuFeatures::PAGE_1G);
                }
                let mut base = [0u64; 6];
                for lvl in leaf..=mode.top() {
                    base[usize::from(lvl)] = P | W | U;
                }
                if mode == Mode::Pae {
                    base[3] = P;
                }
                if leaf > 1 {
                    base[usize::from(leaf)] |= PS;
                }
                for lvl in leaf..=mode.top() {
                    for b in 0..nbits {
                        let mut flags = base;
                        flags[usize::from(lvl)] |= 1 << b;
                        for (acc, cpl) in accesses(0) {
                            o.cpl = cpl;
                            sink(&l.case(&o, &flags, acc, &[]));
                        }
                        if b > 0 {
                            flags[usize::from(lvl)] &= !P;
                            o.cpl = 3;
                            sink(&l.case(&o, &flags, Access::user(AccessKind::Write), &[]));
                        }
                    }
                }
            }
        }
    }
}

/// Protection keys: key in the leaf (4 KiB, 2 MiB, 1 GiB), every AD/WD pair
/// for that key with the other keys clear or all disabled, WP, SMAP/AC,
/// user/supervisor leaves, read-only leaves, all nine accesses.
fn sweep_pkru(mode: Mode, sink: Sink<'_>) {
    let l = Layout::new(mode, 46, 1);
    for (ki, key) in [0u64, 1, 7, 15].into_iter().enumerate() {
        let leaf = [1u8, 2, 3][ki % 3];
        for adwd in 0u32..4 {
            for noise in [false, true] {
                let k2 = 2 * key as u32;
                let pkru = (adwd << k2) | if noise { !(3u32 << k2) } else { 0 };
                for wp in [false, true] {
                    for (smap, ac) in [(false, false), (true, false), (true, true)] {
                        let mut o = Opts {
                            wp,
                            smap,
                            ac,
                            pke: true,
                            pkru,
                            ..Opts::default()
                        };
                        for leaf_uw in 0u64..4 {
                            for upper_u in [true, false] {
                                let mut flags = [0u64; 6];
                                for lvl in leaf..=mode.top() {
                                    flags[usize::from(lvl)] = P | W | U | A;
                                }
                                let lf = &mut flags[usize::from(leaf)];
                                *lf = P | A | (key << PKEY_SHIFT);
                                if leaf_uw & 1 != 0 {
                                    *lf |= U;
                                }
                                if leaf_uw & 2 != 0 {
                                    *lf |= W;
                                }
                                if leaf > 1 {
                                    *lf |= PS;
                                }
                                if !upper_u {
                                    flags[usize::from(leaf + 1)] &= !U;
                                }
                                // Keys in non-leaf entries are ignored.
                                flags[usize::from(mode.top())] |= 0xf << PKEY_SHIFT;
                                for (acc, cpl) in accesses(if noise { 3 } else { 0 }) {
                                    o.cpl = cpl;
                                    sink(&l.case(&o, &flags, acc, &[]));
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn permissive(l: &Layout) -> [u64; 6] {
    let mut flags = [0u64; 6];
    for lvl in 1..=l.mode.top() {
        flags[usize::from(lvl)] = P | W | U;
    }
    if l.mode == Mode::Pae {
        flags[3] = P;
    }
    flags
}

/// 32-bit 4-MByte pages: every value of bits 20:13 (PSE-36 address bits /
/// reserved bits) for MAXPHYADDR 32..52, with and without PSE-36.
fn sweep_pse36(sink: Sink<'_>) {
    for m in [32u8, 33, 35, 36, 39, 40, 41, 46, 52] {
        for pse36 in [false, true] {
            let mut o = Opts::default();
            if !pse36 {
                o.features.remove(CpuFeatures::PSE36);
            }
            let l = Layout::new(Mode::Bits32, m, 0);
            for hi in 0u64..256 {
                let mut flags = permissive(&l);
                flags[2] |= PS | (hi << 13) | (1 << 12);
                for kind in KINDS {
                    o.cpl = 0;
                    sink(&l.case(&o, &flags, Access::supervisor(kind), &[]));
                }
            }
        }
    }
}

/// Odds and ends: canonical addresses, the other three PAE PDPTEs, tables
/// outside guest memory, ignored CR3 bits, no paging.
fn sweep_misc(sink: Sink<'_>) {
    // Canonical and non-canonical linear addresses.
    for mode in [Mode::Level4, Mode::Level5] {
        let l = Layout::new(mode, 46, 1);
        let gvas: &[u64] = if mode == Mode::Level4 {
            &[
                1 << 47,
                0xffff_0000_0000_0000,
                0xffff_8000_0000_0000,
                0x0000_7fff_ffff_f000,
                1 << 63,
                1 << 48,
                0x8000_7fff_ffff_ffff,
                l.gva,
            ]
        } else {
            &[
                1 << 56,
                0xfe00_0000_0000_0000,
                0xff00_0000_0000_0000,
                0x00ff_ffff_ffff_f000,
                1 << 47,
                0xffff_8000_0000_0000,
                1 << 57,
                l.gva,
            ]
        };
        for &gva in gvas {
            for (acc, cpl) in accesses(0) {
                let o = Opts {
                    cpl,
                    ..Opts::default()
                };
                let mut case = l.case(&o, &permissive(&l), acc, &[]);
                case.gva = gva;
                sink(&case);
            }
        }
    }

    // The PAE PDPTEs the walk does not use are still loaded at CR3 load.
    for variant in 0..2 {
        let l = Layout::new(Mode::Pae, 36, variant);
        let used = Mode::Pae.index(l.gva, 3);
        let mut values = vec![0, P | 0x0333_3000, XD | 0x1e6 | (1 << 40)];
        for b in [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 35, 36, 51, 52, 62, 63] {
            values.push(P | (1 << b) | 0x0333_3000);
        }
        for other in (0..4).filter(|&i| i != used) {
            for &value in &values {
                for nxe in [false, true] {
                    let extra = [EntryW {
                        label: "other PDPTE",
                        gpa: l.tables[3] + 8 * other,
                        size: 8,
                        value,
                    }];
                    for kind in KINDS {
                        let o = Opts {
                            nxe,
                            ..Opts::default()
                        };
                        sink(&l.case(&o, &permissive(&l), Access::supervisor(kind), &extra));
                    }
                }
            }
        }
    }

    // A paging structure outside guest memory (and a leaf page outside it,
    // which is fine: the walk does not read the page).
    for (mode, m) in [
        (Mode::Level4, 46u8),
        (Mode::Level5, 46),
        (Mode::Pae, 36),
        (Mode::Bits32, 40),
    ] {
        let l = Layout::new(mode, m, 0);
        let nowhere = if mode == Mode::Bits32 {
            0x3330_0000
        } else {
            (1 << 40) | 0x7_7700_0000
        };
        for lvl in 2..=mode.top() {
            let mut l2 = l;
            l2.tables[usize::from(lvl - 1)] = nowhere;
            let frames: Vec<u64> = (1..=mode.top())
                .filter(|&x| x != lvl - 1)
                .map(|x| l.tables[usize::from(x)] >> 12)
                .collect();
            for present in [true, false] {
                let mut flags = permissive(&l2);
                if !present {
                    flags[usize::from(lvl - 1)] = 0;
                }
                for (acc, cpl) in accesses(0) {
                    let o = Opts {
                        cpl,
                        ..Opts::default()
                    };
                    let mut case = l2.case(&o, &flags, acc, &[]);
                    // Nothing can be written into the missing table.
                    case.entries.retain(|e| frames.contains(&(e.gpa >> 12)));
                    case.frames.clone_from(&frames);
                    sink(&case);
                }
            }
        }
    }

    // CR3 flag / ignored bits (PWT, PCD, and the ignored ones).
    for (mode, junk) in [
        (Mode::Level4, 0xfff),
        (Mode::Level5, 0xfe7),
        (Mode::Pae, 0x1f),
        (Mode::Bits32, 0xfff),
    ] {
        let l = Layout::new(mode, 40, 1);
        for (acc, cpl) in accesses(0) {
            let o = Opts {
                cpl,
                cr3_junk: junk,
                ..Opts::default()
            };
            let mut flags = permissive(&l);
            flags[1] |= A;
            sink(&l.case(&o, &flags, acc, &[]));
        }
    }

    // A recursive (self-referencing) PML4E: the same entry is used at
    // several levels and must get A (and, as the leaf, D) exactly once.
    let l = Layout::new(Mode::Level4, 46, 0);
    let slot = 0x1edu64;
    let pml4 = l.tables[4];
    let shapes = [
        // Every level through the self entry: the "page" is the PML4.
        [slot, slot, slot, slot],
        // Once through it: the PTE level reads the PD, the "page" is the PT.
        [slot, 0x0a5, 0x0c7, 0x1d9],
        // Twice: the "page" is the PD.
        [slot, slot, 0x0a5, 0x0c7],
    ];
    let self_bits = [W, U, A, D, XD];
    for (si, idx) in shapes.iter().enumerate() {
        let gva = sign_extend(
            (idx[0] << 39) | (idx[1] << 30) | (idx[2] << 21) | (idx[3] << 12) | 0x468,
            48,
        );
        for bits in subsets(&self_bits) {
            let mut entries = l.entries(&[0, P | W | U, P | W | U, P | W | U, P | W | U, 0]);
            entries.push(EntryW {
                label: "self PML4E",
                gpa: pml4 + 8 * slot,
                size: 8,
                value: P | bits | pml4,
            });
            for (acc, cpl) in accesses(0) {
                let o = Opts {
                    cpl,
                    smap: si == 1,
                    ..Opts::default()
                };
                sink(&Case {
                    ctx: make_ctx(Mode::Level4, 46, l.cr3, &o),
                    gva,
                    access: acc,
                    entries: entries.clone(),
                    frames: l.frames(),
                });
            }
        }
    }

    // No paging: linear = physical.
    for gva in [0u64, 0x1234_5678, 0xffff_f000, 0xffff_ffff] {
        for (acc, cpl) in accesses(0) {
            let o = Opts {
                cpl,
                ..Opts::default()
            };
            sink(&Case {
                ctx: make_ctx(Mode::NoPaging, 36, 0, &o),
                gva,
                access: acc,
                entries: Vec::new(),
                frames: Vec::new(),
            });
        }
    }
}

fn all_sweeps() -> Vec<(&'static str, Sweep)> {
    vec![
        (
            "4-level PDE x PTE (WP=1)",
            Box::new(|s: Sink<'_>| sweep_lower(Mode::Level4, true, s)),
        ),
        (
            "PAE PDE x PTE (WP=1)",
            Box::new(|s: Sink<'_>| sweep_lower(Mode::Pae, true, s)),
        ),
        (
            "4-level PDE x PTE (WP=0)",
            Box::new(|s: Sink<'_>| sweep_lower(Mode::Level4, false, s)),
        ),
        (
            "PAE PDE x PTE (WP=0)",
            Box::new(|s: Sink<'_>| sweep_lower(Mode::Pae, false, s)),
        ),
        (
            "32-bit PDE x PTE (WP=1)",
            Box::new(|s: Sink<'_>| sweep_lower(Mode::Bits32, true, s)),
        ),
        (
            "32-bit PDE x PTE (WP=0)",
            Box::new(|s: Sink<'_>| sweep_lower(Mode::Bits32, false, s)),
        ),
        ("4-level PML4E x PDPTE", Box::new(sweep_upper4)),
        (
            "4-level reserved bits",
            Box::new(|s: Sink<'_>| sweep_reserved(Mode::Level4, s)),
        ),
        (
            "5-level reserved bits",
            Box::new(|s: Sink<'_>| sweep_reserved(Mode::Level5, s)),
        ),
        (
            "PAE reserved bits",
            Box::new(|s: Sink<'_>| sweep_reserved(Mode::Pae, s)),
        ),
        (
            "32-bit reserved bits",
            Box::new(|s: Sink<'_>| sweep_reserved(Mode::Bits32, s)),
        ),
        ("5-level PML5E x PML4E", Box::new(sweep_upper5)),
        (
            "4-level protection keys",
            Box::new(|s: Sink<'_>| sweep_pkru(Mode::Level4, s)),
        ),
        (
            "5-level protection keys",
            Box::new(|s: Sink<'_>| sweep_pkru(Mode::Level5, s)),
        ),
        ("32-bit PSE-36", Box::new(sweep_pse36)),
        ("misc", Box::new(sweep_misc)),
    ]
}

#[test]
fn walker_matches_model_exhaustively() {
    let sweeps = all_sweeps();
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, 4);
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<(usize, u64, u64)>> = Mutex::new(Vec::new());
    let histogram: Mutex<Histogram> = Mutex::new(BTreeMap::new());
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                let mem = FastMem::default();
                let mut hist = Histogram::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((name, sweep)) = sweeps.get(i) else {
                        break;
                    };
                    let (mut n, mut bad) = (0u64, 0u64);
                    sweep(&mut |case: &Case| {
                        n += 1;
                        let (class, mismatch) = check_case(&mem, case, WalkOptions::default());
                        *hist.entry(class).or_default() += 1;
                        if let Some(msg) = mismatch {
                            bad += 1;
                            eprintln!("MISMATCH [{name}] {msg}");
                        }
                    });
                    results
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((i, n, bad));
                }
                let mut all = histogram.lock().unwrap_or_else(|e| e.into_inner());
                for (k, v) in hist {
                    *all.entry(k).or_default() += v;
                }
            });
        }
    });
    let mut results = results.into_inner().unwrap_or_else(|e| e.into_inner());
    results.sort_unstable();
    let (mut total, mut mismatches) = (0u64, 0u64);
    for &(i, n, bad) in &results {
        eprintln!(
            "  {:<28} {n:>7} combinations, {bad} mismatches",
            sweeps[i].0
        );
        total += n;
        mismatches += bad;
    }
    let histogram = histogram.into_inner().unwrap_or_else(|e| e.into_inner());
    print_histogram(&histogram);
    eprintln!("walker model: {total} combinations checked, {mismatches} mismatches");
    // Guard the enumeration itself: every kind of outcome must stay well
    // represented if the sweeps are edited.
    for (class, floor) in [
        ("translated", 100_000),
        ("#PF, access rights", 100_000),
        ("#PF, reserved bit", 50_000),
        ("#PF, not present", 20_000),
        ("#PF, protection key", 2_000),
        ("#PF, table outside memory", 1_000),
        ("invalid PAE PDPTE (#GP)", 1_000),
        ("non-canonical", 50),
    ] {
        let n = histogram.get(class).copied().unwrap_or(0);
        assert!(n >= floor, "only {n} cases expect {class:?}");
    }
    assert!(
        total >= 100_000,
        "only {total} combinations were enumerated"
    );
    assert_eq!(
        mismatches, 0,
        "the walker disagrees with the model on {mismatches} of {total} combinations (see MISMATCH lines above)"
    );
}

// ---------------------------------------------------------------------------
// Random tables.

#[derive(Clone, Debug)]
struct RawEntry {
    present_roll: u8,
    flags: u64,
    rsvd_roll: u8,
    rsvd_bit: u8,
    table: u8,
    addr: u64,
}

#[derive(Clone, Debug)]
struct RawCase {
    mode: u8,
    m: u8,
    regs: u32,
    pkru: u32,
    kind: u8,
    amode: u8,
    gva: u64,
    entries: [RawEntry; 5],
    cpl_roll: u8,
    noise: u64,
    noise_roll: u8,
}

fn raw_entry() -> impl Strategy<Value = RawEntry> {
    (
        any::<u8>(),
        any::<u64>(),
        any::<u8>(),
        any::<u8>(),
        0u8..4,
        any::<u64>(),
    )
        .prop_map(
            |(present_roll, flags, rsvd_roll, rsvd_bit, table, addr)| RawEntry {
                present_roll,
                flags,
                rsvd_roll,
                rsvd_bit,
                table,
                addr,
            },
        )
}

fn raw_case() -> impl Strategy<Value = RawCase> {
    (
        0u8..4,
        32u8..=52,
        any::<u32>(),
        any::<u32>(),
        0u8..3,
        0u8..3,
        any::<u64>(),
        prop::array::uniform5(raw_entry()),
        any::<u8>(),
        any::<u64>(),
        any::<u8>(),
    )
        .prop_map(
            |(mode, m, regs, pkru, kind, amode, gva, entries, cpl_roll, noise, noise_roll)| {
                RawCase {
                    mode,
                    m,
                    regs,
                    pkru,
                    kind,
                    amode,
                    gva,
                    entries,
                    cpl_roll,
                    noise,
                    noise_roll,
                }
            },
        )
}

/// Where the table holding level-`level` entries lives: distinct per level,
/// sometimes 1-GByte, 2-MByte or only 4-KByte aligned, all below 4 GiB
/// except the 1-GByte-aligned PML5 (at 4 GiB).
fn pool(level: u8, choice: u8) -> u64 {
    let l = u64::from(level);
    match choice {
        0 => l << 24,
        1 => (l << 24) + (3 << 21),
        2 => (l << 24) + (5 << 12),
        _ => (l - 1) << 30,
    }
}

fn raw_to_case(r: &RawCase) -> Case {
    let mode = [Mode::Bits32, Mode::Pae, Mode::Level4, Mode::Level5][usize::from(r.mode)];
    let m = r.m;
    let bit = |i: u32| r.regs & (1 << i) != 0;
    let mut features = CpuFeatures::all();
    if (r.regs >> 8) & 7 == 0 {
        features.remove(CpuFeatures::PAGE_1G);
    }
    if (r.regs >> 11) & 7 == 0 {
        features.remove(CpuFeatures::PSE36);
    }
    let amode = AMODES[usize::from(r.amode)];
    let cpl = match amode {
        AccessMode::User => 3,
        AccessMode::Supervisor => r.cpl_roll % 3,
        AccessMode::ImplicitSupervisor => r.cpl_roll % 4,
        other => panic!("the model has no CPL for {other:?}"),
    };
    let access = Access {
        kind: KINDS[usize::from(r.kind)],
        mode: amode,
    };
    let top = mode.top();
    let gva = match mode {
        Mode::Bits32 | Mode::Pae => r.gva & 0xffff_ffff,
        // Mostly canonical; 1 in 8 left as drawn.
        Mode::Level4 if r.regs >> 29 != 0 => sign_extend(r.gva, 48),
        Mode::Level5 if r.regs >> 29 != 0 => sign_extend(r.gva, 57),
        _ => r.gva,
    };

    let mut tables = [0u64; 6];
    for l in 1..=top {
        tables[usize::from(l)] = pool(l, r.entries[usize::from(l - 1)].table);
    }
    let mut cr3_junk = (r.noise >> 52) & 0xfff;
    if mode == Mode::Pae {
        tables[3] += u64::from((r.regs >> 16) & 0x7f) << 5;
        cr3_junk &= 0x1f;
    }
    let cr3 = tables[usize::from(top)];
    let o = Opts {
        wp: bit(0),
        nxe: bit(1),
        smep: bit(2),
        smap: bit(3),
        ac: bit(4),
        pke: bit(5),
        pge: bit(6),
        pse: bit(7),
        cpl,
        pkru: if bit(14) { r.pkru } else { 0 },
        features,
        cr3_junk,
    };
    let ctx = make_ctx(mode, m, cr3, &o);

    // A table left out of guest memory now and then.
    let missing = if (r.regs >> 20) & 0x1f == 0 {
        Some(((r.regs >> 24) % u32::from(top)) as u8 + 1)
    } else {
        None
    };
    let frames: Vec<u64> = (1..=top)
        .filter(|&l| Some(l) != missing)
        .map(|l| tables[usize::from(l)] >> 12)
        .collect();

    let size = mode.entry_size();
    let mut entries = Vec::new();
    for level in (1..=top).rev() {
        let e = &r.entries[usize::from(level - 1)];
        let gpa = tables[usize::from(level)] + mode.index(gva, level) * size;
        let present = e.present_roll < 220;
        let rsvd = if e.rsvd_roll < 26 {
            if size == 4 {
                1u64 << (12 + e.rsvd_bit % 20)
            } else {
                1u64 << (12 + e.rsvd_bit % 52)
            }
        } else {
            0
        };
        let mut value;
        if mode == Mode::Pae && level == 3 {
            value = (e.flags & (PWT | PCD | mask(9, 11))) | tables[2] | rsvd;
        } else {
            // Random low bits, then bias: W and U in 3/4 of the entries (so
            // user pages and writable walks are common), PS in 1/4 of the
            // PDEs/PDPTEs and 1/8 of the upper entries (where it is
            // reserved), XD in 1/8 (reserved without NXE).
            value = e.flags & mask(1, 11) & !PS;
            if e.flags & (1 << 48) != 0 {
                value |= W;
            }
            if e.flags & (1 << 47) != 0 {
                value |= U;
            }
            let ps_odds = if level >= 4 || (mode == Mode::Pae && level == 3) {
                0b111
            } else {
                0b11
            };
            if (e.flags >> 44) & ps_odds == 0 {
                value |= PS;
            }
            if (e.flags >> 40) & 0b111 == 0 {
                value |= XD;
            }
            // Bits 62:52: ignored (or the protection key) in IA-32e paging,
            // reserved in PAE paging, so rarer there.
            let include_high = if mode.is_long() {
                e.rsvd_roll & 0x80 == 0
            } else {
                e.rsvd_roll % 16 == 1
            };
            if include_high {
                value |= e.flags & mask(52, 62);
            }
            let leaf_intended = level == 1 || (value & PS != 0 && (level == 2 || level == 3));
            let addr = if leaf_intended {
                if size == 4 {
                    let a = e.addr & 0xffff_f000;
                    match e.addr & 3 {
                        0 | 1 => a & !mask(13, 21),
                        2 => a & !mask(17, 21),
                        _ => a,
                    }
                } else {
                    let a = e.addr & mask(12, u32::from(m) - 1);
                    let aligned = e.addr & 3 != 0;
                    match level {
                        2 if aligned => a & !mask(13, 20),
                        3 if aligned => a & !mask(13, 29),
                        _ => a,
                    }
                }
            } else {
                tables[usize::from(level - 1)]
            };
            value |= addr | rsvd;
        }
        if present {
            value |= P;
        } else {
            value &= !P;
        }
        if size == 4 {
            value &= 0xffff_ffff;
        }
        entries.push(EntryW {
            label: LABELS[usize::from(level)],
            gpa,
            size,
            value,
        });
    }
    if mode == Mode::Pae {
        let used = mode.index(gva, 3);
        for i in (0..4u64).filter(|&i| i != used) {
            let value = if r.noise_roll < 40 && u64::from(r.noise_roll % 4) == i {
                r.noise
            } else if r.noise_roll >= 200 {
                P | 0x0333_3000
            } else {
                0
            };
            entries.push(EntryW {
                label: "other PDPTE",
                gpa: tables[3] + 8 * i,
                size: 8,
                value,
            });
        }
    }
    entries.retain(|e| frames.contains(&(e.gpa >> 12)));
    Case {
        ctx,
        gva,
        access,
        entries,
        frames,
    }
}

#[test]
fn walker_matches_model_on_random_tables() {
    // PROPTEST_CASES overrides the default of 2000.
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let config = Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let checked = Cell::new(0u64);
    let failed = Cell::new(0u64);
    let hist = RefCell::new(Histogram::new());
    let result = runner.run(&raw_case(), |raw| {
        let case = raw_to_case(&raw);
        let mem = LoggedSparse::default();
        checked.set(checked.get() + 1);
        for options in [
            WalkOptions::without_accessed_dirty(),
            WalkOptions::default(),
        ] {
            let (class, mismatch) = check_case(&mem, &case, options);
            if options.set_accessed_dirty {
                *hist.borrow_mut().entry(class).or_default() += 1;
            }
            if let Some(msg) = mismatch {
                // Shrinking re-runs failing cases; proptest reports the
                // minimal one (with this message) when the run ends.
                if failed.get() == 0 {
                    eprintln!("MISMATCH [random, first found] {msg}");
                }
                failed.set(failed.get() + 1);
                return Err(TestCaseError::fail(msg));
            }
        }
        Ok(())
    });
    print_histogram(&hist.borrow());
    eprintln!(
        "walker model (proptest): {} random cases checked ({} failing, counting shrink steps)",
        checked.get(),
        failed.get()
    );
    if let Err(e) = result {
        panic!("walker disagrees with the model on random tables: {e}");
    }
}

/// Minimal reproduction of the one disagreement the oracle found: PAE paging
/// loads all four PDPTEs at CR3 load, and a present one with a reserved bit
/// makes the load #GP (SDM Vol. 3A §4.4.1: "If any of the PDPTEs sets both
/// the P flag (bit 0) and any reserved bit, the MOV to CR instruction causes
/// a general-protection exception (#GP(0)) and the PDPTEs are not loaded"),
/// even if the access at hand goes through another PDPTE. The walker's own
/// documentation of `WalkError::InvalidPdpte` says it reads the PDPTEs "as
/// if CR3 was just loaded".
#[test]
fn pae_reserved_bit_in_an_unused_pdpte_is_invalid_pdpte() {
    let mem = SparseMemory::new();
    for gfn in 1..=3 {
        mem.add_frame(Gfn(gfn));
    }
    mem.write_u64(Gpa(0x1000), 0x2000 | P).unwrap(); // PDPTE[0] -> PD
    mem.write_u64(Gpa(0x1008), P | W).unwrap(); // PDPTE[1]: bit 1 is reserved
    mem.write_u64(Gpa(0x2000), 0x3000 | P | W).unwrap(); // PDE[0] -> PT
    mem.write_u64(Gpa(0x3000), 0x9000 | P | W).unwrap(); // PTE[0]
    let ctx = make_ctx(Mode::Pae, 36, 0x1000, &Opts::default());
    let res = walk_with(
        &ctx,
        &mem,
        Gva(0x123),
        Access::supervisor(AccessKind::Read),
        WalkOptions::default(),
    );
    assert_eq!(
        outcome_of(res),
        Outcome::InvalidPdpte {
            index: 1,
            value: P | W
        },
        "expected #GP at the PDPTE load (PDPTE[1] = {:#x} is present with reserved bit 1)",
        P | W
    );
}
