//! Fuzzes the reference walker against the independent SDM model that
//! `mmu-api/tests/walker_model.rs` uses (`model_walk`, shared through
//! `mmu-api/tests/model/mod.rs`).
//!
//! The input picks a paging mode, control registers, MAXPHYADDR, CPU
//! features, PKRU, an access and a linear address, then fills table entries
//! in 8 backed guest frames (frames 8 and 9 are not backed, so entries can
//! point outside guest memory). Entries are shaped so that walks reach them:
//! their addresses mostly name one of the frames, and the linear address's
//! index at every level is one of the indices entries are written at.
//!
//! For every input, with and without A/D updates, the walker must give
//! exactly the model's outcome (translation, rights, page size, protection
//! key, global, every entry read; or the #PF with its error code and level,
//! the #GP of a non-canonical address or a bad PAE PDPTE) and leave guest
//! memory exactly as the model predicts (A/D only on success).
#![no_main]

#[allow(dead_code)]
#[path = "../../mmu-api/tests/model/mod.rs"]
mod model;

use std::cell::Cell;

use libfuzzer_sys::fuzz_target;
use mmu_api::paging::{
    Access, AccessKind, AccessMode, CpuFeatures, Cr0, Cr4, Efer, GuestPhysMemory, PagingContext,
    PhysMemError, WalkError, WalkOptions, walk_with,
};
use mmu_api::{Gpa, Gva};

use model::{model_walk, outcome_of};

/// Guest frames 0..BACKED hold the tables; FRAMES - BACKED more frames can
/// be named but are not backed.
const BACKED: u64 = 8;
const FRAMES: u64 = 10;

/// Table indices entries are written at and linear addresses use.
const INDICES_9: [u64; 5] = [0, 1, 2, 3, 511];
const INDICES_10: [u64; 5] = [0, 1, 2, 3, 1023];

/// Reads the input front to back; past the end it reads zeros.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    fn u64(&mut self) -> u64 {
        let mut v = [0u8; 8];
        for b in &mut v {
            *b = self.u8();
        }
        u64::from_le_bytes(v)
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Guest-physical memory: frames 0..BACKED, plain words (the walker's
/// compare-and-exchange is trivially atomic on one thread).
struct FlatMem {
    words: Vec<Cell<u64>>,
}

impl FlatMem {
    fn new() -> Self {
        Self {
            words: (0..BACKED * 512).map(|_| Cell::new(0)).collect(),
        }
    }

    fn word(&self, gpa: u64) -> Option<&Cell<u64>> {
        if gpa.is_multiple_of(8) {
            self.words.get(usize::try_from(gpa / 8).ok()?)
        } else {
            None
        }
    }

    fn write_u64(&self, gpa: u64, value: u64) {
        self.word(gpa).expect("backed, aligned").set(value);
    }

    fn write_u32(&self, gpa: u64, value: u32) {
        let w = self.word(gpa & !7).expect("backed");
        let shift = (gpa & 4) * 8;
        w.set((w.get() & !(0xffff_ffff << shift)) | (u64::from(value) << shift));
    }
}

impl GuestPhysMemory for FlatMem {
    fn read_u64(&self, gpa: Gpa) -> Result<u64, PhysMemError> {
        if !gpa.raw().is_multiple_of(8) {
            return Err(PhysMemError::Misaligned(gpa));
        }
        self.word(gpa.raw())
            .map(Cell::get)
            .ok_or(PhysMemError::Unbacked(gpa))
    }

    fn compare_exchange_u64(
        &self,
        gpa: Gpa,
        current: u64,
        new: u64,
    ) -> Result<Result<(), u64>, PhysMemError> {
        if !gpa.raw().is_multiple_of(8) {
            return Err(PhysMemError::Misaligned(gpa));
        }
        let w = self.word(gpa.raw()).ok_or(PhysMemError::Unbacked(gpa))?;
        if w.get() != current {
            return Ok(Err(w.get()));
        }
        w.set(new);
        Ok(Ok(()))
    }
}

fn mask(lo: u32, hi: u32) -> u64 {
    (u64::MAX >> (63 - hi)) & (u64::MAX << lo)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    NoPaging,
    Bits32,
    Pae,
    Level4,
    Level5,
}

/// A paging context from the input (not always one a CPU can be in).
///
/// `ctl` bits: 3:0 mode, 8:4 CR4.PSE/SMEP/SMAP/PKE/PGE, 9 CR0.WP, 10
/// EFER.NXE, 11 no 1 GiB pages, 12 no PSE-36, 17:13 MAXPHYADDR, 21:18 CR3
/// frame, 33:22 CR3 low bits, 34 EFLAGS.AC, 35 PKRU from `extra`, 37:36
/// access kind, 39:38 access mode, 41:40 CPL.
fn context(ctl: u64, extra: u64) -> (PagingContext, Mode) {
    let mode = match ctl & 0xf {
        0 => Mode::NoPaging,
        1..=3 => Mode::Bits32,
        4..=7 => Mode::Pae,
        8..=12 => Mode::Level4,
        _ => Mode::Level5,
    };
    let bit = |n: u32| ctl & (1 << n) != 0;
    let mut cr0 = Cr0::PE;
    let mut cr4 = Cr4::empty();
    let mut efer = Efer::empty();
    match mode {
        Mode::NoPaging => {}
        Mode::Bits32 => cr0 |= Cr0::PG,
        Mode::Pae => {
            cr0 |= Cr0::PG;
            cr4 |= Cr4::PAE;
        }
        Mode::Level4 | Mode::Level5 => {
            cr0 |= Cr0::PG;
            cr4 |= Cr4::PAE;
            efer |= Efer::LME | Efer::LMA;
            if mode == Mode::Level5 {
                cr4 |= Cr4::LA57;
            }
        }
    }
    for (n, flag) in [
        (4, Cr4::PSE),
        (5, Cr4::SMEP),
        (6, Cr4::SMAP),
        (7, Cr4::PKE),
        (8, Cr4::PGE),
    ] {
        if bit(n) {
            cr4 |= flag;
        }
    }
    if bit(9) {
        cr0 |= Cr0::WP;
    }
    if bit(10) {
        efer |= Efer::NXE;
    }
    let mut features = CpuFeatures::all();
    if bit(11) {
        features.remove(CpuFeatures::PAGE_1G);
    }
    if bit(12) {
        features.remove(CpuFeatures::PSE36);
    }
    // MAXPHYADDR 32..=52, and now and then out of range (the context
    // check must refuse it before any walk).
    let maxphyaddr = match (ctl >> 13) & 31 {
        n @ 0..=20 => 32 + n as u8,
        21 => 31,
        22 => 53,
        n => 36 + (n as u8 - 23) * 2,
    };
    let cr3_frame = ((ctl >> 18) & 0xf) % FRAMES;
    // Low CR3 bits: PDPT offset in PAE mode, PCD/PWT or junk otherwise.
    let cr3_low = (ctl >> 22) & if mode == Mode::Pae { 0xfe0 } else { 0xfff };
    let mut ctx = PagingContext::new(features, maxphyaddr);
    ctx.cr0 = cr0;
    ctx.cr3 = (cr3_frame << 12) | cr3_low;
    ctx.cr4 = cr4;
    ctx.efer = efer;
    ctx.eflags_ac = bit(34);
    ctx.pkru = if bit(35) { (extra >> 32) as u32 } else { 0 };
    (ctx, mode)
}

/// A table entry shaped from 8 input bytes: mostly pointing at one of the
/// frames, with random flags, now and then a large-page address, high
/// (protection-key / XD / reserved) bits or a single reserved bit.
fn entry(raw: u64, frame: u64, wide: bool) -> u64 {
    let shape = raw >> 56;
    let mut e = raw & 0xfff;
    if shape & 0x3 != 0 {
        e |= frame << 12;
    } else if wide {
        e |= raw & mask(12, 51);
    } else {
        e |= raw & mask(12, 31);
    }
    if wide {
        if shape & 0x4 != 0 {
            e |= raw & mask(52, 63);
        }
        if shape & 0x38 == 0 {
            e |= 1 << (12 + (raw >> 40) % 40);
        }
    } else if shape & 0x38 == 0 {
        e |= 1 << (12 + (raw >> 40) % 20);
    }
    e
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input(data);
    let ctl = inp.u64();
    let (mut ctx, mode) = context(ctl, inp.u64());
    let kind = match ((ctl >> 36) & 3) % 3 {
        0 => AccessKind::Read,
        1 => AccessKind::Write,
        _ => AccessKind::Fetch,
    };
    let amode = match ((ctl >> 38) & 3) % 3 {
        0 => AccessMode::User,
        1 => AccessMode::Supervisor,
        _ => AccessMode::ImplicitSupervisor,
    };
    ctx.cpl = match amode {
        AccessMode::User => 3,
        AccessMode::Supervisor => (((ctl >> 40) & 3) % 3) as u8,
        _ => ((ctl >> 40) & 3) as u8,
    };
    let access = Access { kind, mode: amode };
    if let Err(e) = ctx.validate() {
        // An impossible context (MAXPHYADDR out of range, a control bit
        // without its feature...) is refused before any memory is read.
        let mem = FlatMem::new();
        let r = walk_with(&ctx, &mem, Gva(0), access, WalkOptions::default());
        assert_eq!(r.unwrap_err(), WalkError::InvalidContext(e));
        return;
    }

    // The linear address: one of the written indices at every level, or
    // (top 4 bits zero) the raw input. `g` bits: 3l+2:3l the index at level
    // l (mod 5), 43:32 the page offset, 51:50 the PAE PDPTE, 59:56 zero for
    // a non-canonical address, 63:60 zero for the raw input.
    let g = inp.u64();
    let wide = mode != Mode::Bits32;
    let idx = |level: u32| (((g >> (3 * level)) & 7) % 5) as usize;
    let offset = (g >> 32) & 0xfff;
    let gva = match mode {
        Mode::NoPaging => g,
        _ if (g >> 60) == 0 => g,
        Mode::Bits32 => (INDICES_10[idx(2)] << 22) | (INDICES_10[idx(1)] << 12) | offset,
        Mode::Pae => {
            (((g >> 50) & 3) << 30) | (INDICES_9[idx(2)] << 21) | (INDICES_9[idx(1)] << 12) | offset
        }
        Mode::Level4 | Mode::Level5 => {
            let levels: u32 = if mode == Mode::Level5 { 5 } else { 4 };
            let mut v = offset;
            for l in 1..=levels {
                v |= INDICES_9[idx(l)] << (12 + 9 * (l - 1));
            }
            let bits = 12 + 9 * levels;
            // Canonical (sign-extended) unless the input says otherwise.
            if (g >> 56) & 0xf == 0 {
                v | (g & !mask(0, bits - 1))
            } else {
                ((v << (64 - bits)) as i64 >> (64 - bits)) as u64
            }
        }
    };

    let mem = FlatMem::new();
    while !inp.is_empty() {
        let frame = u64::from(inp.u8()) % BACKED;
        let pick = inp.u8();
        let target = u64::from(pick >> 3) % FRAMES;
        let raw = inp.u64();
        if wide {
            let index = if pick & 4 != 0 {
                // PAE PDPTEs and unaligned CR3 offsets.
                u64::from(pick & 3) + ((ctx.cr3 & 0xfe0) >> 3)
            } else {
                INDICES_9[usize::from(pick & 3) + usize::from(pick >> 7)]
            };
            mem.write_u64((frame << 12) + 8 * index, entry(raw, target, true));
        } else {
            let index = INDICES_10[usize::from(pick % 5)];
            let e = entry((raw & 0xffff_ffff) | (raw & mask(40, 63)), target, false);
            mem.write_u32((frame << 12) + 4 * index, e as u32);
        }
    }
    let snapshot: Vec<u64> = mem.words.iter().map(Cell::get).collect();
    let read = |gpa: u64| mem.read_u64(Gpa(gpa)).ok();

    for set_accessed_dirty in [false, true] {
        let model = model_walk(&ctx, &read, gva, access, set_accessed_dirty);
        let actual = outcome_of(walk_with(
            &ctx,
            &mem,
            Gva(gva),
            access,
            if set_accessed_dirty {
                WalkOptions::with_accessed_dirty()
            } else {
                WalkOptions::without_accessed_dirty()
            },
        ));
        assert!(
            actual == model.outcome,
            "walker and model disagree (A/D updates: {set_accessed_dirty})\n  \
             ctx={ctx:?}\n  gva={gva:#x} access={access:?}\n  \
             model:  {}\n  walker: {actual}",
            model.outcome
        );
        for (w, &old) in snapshot.iter().enumerate() {
            let gpa = w as u64 * 8;
            let want = model.words.get(&gpa).copied().unwrap_or(old);
            let got = mem.words[w].get();
            assert!(
                got == want,
                "memory word {gpa:#x}: model expects {want:#x}, walker left {got:#x} \
                 (was {old:#x}; A/D updates: {set_accessed_dirty})\n  ctx={ctx:?}\n  \
                 gva={gva:#x} access={access:?} outcome={actual}"
            );
            mem.words[w].set(old);
        }
    }
});
