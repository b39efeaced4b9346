//! An independent model of x86 paging, written from the Intel SDM Vol. 3,
//! chapter 4 ("Paging"), without looking at the walker's internals.
//!
//! `model_walk` is a second, deliberately plain implementation of the
//! architecture rules: it reads the tables, decides not-present /
//! reserved-bit / permission / protection-key faults with the exact error
//! code, computes the translation, and predicts every word of guest memory
//! the walk must leave behind (A/D bits only on success). `outcome_of` maps
//! the walker's answer to the same `Outcome` so the two compare with `==`.
//!
//! Shared by `tests/walker_model.rs` and the `walker` fuzz target
//! (`fuzz/fuzz_targets/walker.rs` includes this file with `#[path]`), so it
//! depends on nothing but `std` and `mmu_api`.

use std::collections::BTreeMap;
use std::fmt;

use mmu_api::paging::{
    Access, AccessKind, AccessMode, CpuFeatures, PageSize, PagingContext, Rights, Translation,
    WalkError,
};

// ---------------------------------------------------------------------------
// Architectural constants, spelled out from the SDM rather than taken from the
// crate, so that a wrong constant in the crate shows up as a mismatch.

/// Entry bits (SDM Vol. 3 §4.3 tables 4-4..4-6, §4.4.2 tables 4-8..4-11,
/// §4.5 tables 4-14..4-20).
pub(crate) const P: u64 = 1 << 0;
pub(crate) const W: u64 = 1 << 1;
pub(crate) const U: u64 = 1 << 2;
pub(crate) const PWT: u64 = 1 << 3;
pub(crate) const PCD: u64 = 1 << 4;
pub(crate) const A: u64 = 1 << 5;
pub(crate) const D: u64 = 1 << 6;
pub(crate) const PS: u64 = 1 << 7;
pub(crate) const G: u64 = 1 << 8;
pub(crate) const XD: u64 = 1 << 63;
pub(crate) const PKEY_SHIFT: u32 = 59;

/// Control-register bits (SDM Vol. 3 §2.5, §2.2.1).
pub(crate) const CR0_PE: u64 = 1 << 0;
pub(crate) const CR0_WP: u64 = 1 << 16;
pub(crate) const CR0_PG: u64 = 1 << 31;
pub(crate) const CR4_PSE: u64 = 1 << 4;
pub(crate) const CR4_PAE: u64 = 1 << 5;
pub(crate) const CR4_PGE: u64 = 1 << 7;
pub(crate) const CR4_LA57: u64 = 1 << 12;
pub(crate) const CR4_SMEP: u64 = 1 << 20;
pub(crate) const CR4_SMAP: u64 = 1 << 21;
pub(crate) const CR4_PKE: u64 = 1 << 22;
pub(crate) const EFER_LME: u64 = 1 << 8;
pub(crate) const EFER_LMA: u64 = 1 << 10;
pub(crate) const EFER_NXE: u64 = 1 << 11;

/// #PF error-code bits (SDM Vol. 3 §4.7, figure 4-12).
pub(crate) const EC_P: u32 = 1 << 0;
pub(crate) const EC_W: u32 = 1 << 1;
pub(crate) const EC_U: u32 = 1 << 2;
pub(crate) const EC_RSVD: u32 = 1 << 3;
pub(crate) const EC_I: u32 = 1 << 4;
pub(crate) const EC_PK: u32 = 1 << 5;

/// Bits `lo..=hi` (empty when `lo > hi`).
pub(crate) fn mask(lo: u32, hi: u32) -> u64 {
    if lo > hi || lo > 63 {
        0
    } else {
        let hi = hi.min(63);
        (u64::MAX >> (63 - hi)) & (u64::MAX << lo)
    }
}

pub(crate) fn sign_extend(v: u64, bits: u32) -> u64 {
    let sh = 64 - bits;
    (((v << sh) as i64) >> sh) as u64
}

// ---------------------------------------------------------------------------
// The model.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    NoPaging,
    Bits32,
    Pae,
    Level4,
    Level5,
}

impl Mode {
    pub(crate) fn top(self) -> u8 {
        match self {
            Mode::NoPaging => 0,
            Mode::Bits32 => 2,
            Mode::Pae => 3,
            Mode::Level4 => 4,
            Mode::Level5 => 5,
        }
    }

    pub(crate) fn entry_size(self) -> u64 {
        if self == Mode::Bits32 { 4 } else { 8 }
    }

    pub(crate) fn is_long(self) -> bool {
        matches!(self, Mode::Level4 | Mode::Level5)
    }

    /// Index of `gva`'s entry at `level` (SDM figures 4-2..4-11).
    pub(crate) fn index(self, gva: u64, level: u8) -> u64 {
        let l = u32::from(level);
        match self {
            Mode::Bits32 => (gva >> (12 + 10 * (l - 1))) & 0x3ff,
            Mode::Pae if level == 3 => (gva >> 30) & 3,
            _ => (gva >> (12 + 9 * (l - 1))) & 0x1ff,
        }
    }
}

/// The register state that matters, decoded from the raw register values.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Regs {
    pub(crate) mode: Mode,
    pub(crate) m: u32,
    pub(crate) wp: bool,
    /// Bit 63 of an entry is XD (PAE-format entries with EFER.NXE).
    pub(crate) nx: bool,
    pub(crate) smep: bool,
    pub(crate) smap: bool,
    pub(crate) ac: bool,
    /// Protection keys apply: IA-32e paging with CR4.PKE (§4.6.2).
    pub(crate) pke: bool,
    pub(crate) pge: bool,
    pub(crate) pse: bool,
    pub(crate) pkru: u32,
    pub(crate) page1g: bool,
    pub(crate) pse36: bool,
}

pub(crate) fn regs(ctx: &PagingContext) -> Regs {
    let cr0 = ctx.cr0.bits();
    let cr4 = ctx.cr4.bits();
    let efer = ctx.efer.bits();
    // §4.1.1, table 4-1.
    let mode = if cr0 & CR0_PG == 0 {
        Mode::NoPaging
    } else if cr4 & CR4_PAE == 0 {
        Mode::Bits32
    } else if efer & EFER_LMA == 0 {
        Mode::Pae
    } else if cr4 & CR4_LA57 != 0 {
        Mode::Level5
    } else {
        Mode::Level4
    };
    Regs {
        mode,
        m: u32::from(ctx.maxphyaddr),
        wp: cr0 & CR0_WP != 0,
        nx: efer & EFER_NXE != 0 && matches!(mode, Mode::Pae | Mode::Level4 | Mode::Level5),
        smep: cr4 & CR4_SMEP != 0,
        smap: cr4 & CR4_SMAP != 0,
        ac: ctx.eflags_ac,
        pke: cr4 & CR4_PKE != 0 && mode.is_long(),
        pge: cr4 & CR4_PGE != 0,
        pse: cr4 & CR4_PSE != 0,
        pkru: ctx.pkru,
        page1g: ctx.features.contains(CpuFeatures::PAGE_1G),
        pse36: ctx.features.contains(CpuFeatures::PSE36),
    }
}

/// Reserved bits of a present entry at `level` with value `e`.
pub(crate) fn reserved_bits(r: &Regs, level: u8, e: u64) -> u64 {
    let xd = if r.nx { 0 } else { XD };
    match r.mode {
        // §4.5.5 and tables 4-14..4-20: bits 51:M, bit 63 without NXE, PS in
        // a PML5E/PML4E, bits 29:13 of a 1-GByte PDPTE (PS itself without
        // 1-GByte page support), bits 20:13 of a 2-MByte PDE. Bits 62:52 are
        // ignored (62:59 are the protection key of a leaf with CR4.PKE).
        Mode::Level4 | Mode::Level5 => {
            let base = mask(r.m, 51) | xd;
            match level {
                4 | 5 => base | PS,
                3 if e & PS != 0 => {
                    if r.page1g {
                        base | mask(13, 29)
                    } else {
                        base | PS
                    }
                }
                2 if e & PS != 0 => base | mask(13, 20),
                _ => base,
            }
        }
        // §4.4.2, tables 4-9..4-11: PAE PDEs and PTEs reserve 62:M (there
        // are no ignored high bits), bit 63 without NXE, and bits 20:13 of a
        // 2-MByte PDE.
        Mode::Pae => {
            let base = mask(r.m, 62) | xd;
            if level == 2 && e & PS != 0 {
                base | mask(13, 20)
            } else {
                base
            }
        }
        // §4.3, table 4-4: a 4-MByte PDE reserves bits 21:(M-19) with
        // M = min(MAXPHYADDR, 40) (PSE-36); without PSE-36 bits 21:13.
        // Nothing else is reserved in 32-bit paging.
        Mode::Bits32 => {
            if level == 2 && r.pse && e & PS != 0 {
                let mm = if r.pse36 { r.m.min(40) } else { 32 };
                mask(mm - 19, 21)
            } else {
                0
            }
        }
        Mode::NoPaging => 0,
    }
}

/// Reserved bits of a present PAE PDPTE (§4.4.1, table 4-8): 2:1, 8:5, 63:M.
pub(crate) fn pae_pdpte_reserved(m: u32) -> u64 {
    mask(1, 2) | mask(5, 8) | mask(m, 63)
}

/// Does a present, valid entry at `level` map a page?
pub(crate) fn is_leaf(r: &Regs, level: u8, e: u64) -> bool {
    level == 1
        || (e & PS != 0
            && match r.mode {
                Mode::Level4 | Mode::Level5 => level == 2 || level == 3,
                Mode::Pae => level == 2,
                Mode::Bits32 => level == 2 && r.pse,
                Mode::NoPaging => false,
            })
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct StepV {
    pub(crate) level: u8,
    pub(crate) gpa: u64,
    pub(crate) value: u64,
}

impl fmt::Debug for StepV {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "L{}@{:#x}={:#x}", self.level, self.gpa, self.value)
    }
}

/// What a walk produced, in a form both the model and the walker map to.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    Translated {
        gpa: u64,
        size: PageSize,
        rights: Rights,
        pkey: Option<u8>,
        global: bool,
        steps: Vec<StepV>,
    },
    Fault {
        address: u64,
        code: u32,
        level: u8,
        /// The 4 KiB frame of the paging structure that is not backed.
        unbacked_frame: Option<u64>,
    },
    NonCanonical(u64),
    InvalidPdpte {
        index: u8,
        value: u64,
    },
    Other(String),
}

pub(crate) fn ec_str(code: u32) -> String {
    let names = [
        (EC_P, "P"),
        (EC_W, "W"),
        (EC_U, "U"),
        (EC_RSVD, "RSVD"),
        (EC_I, "I"),
        (EC_PK, "PK"),
    ];
    let mut parts: Vec<&str> = names
        .iter()
        .filter(|(b, _)| code & b != 0)
        .map(|&(_, n)| n)
        .collect();
    if parts.is_empty() {
        parts.push("0");
    }
    format!("{code:#x}({})", parts.join("|"))
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Translated {
                gpa,
                size,
                rights,
                pkey,
                global,
                steps,
            } => write!(
                f,
                "Ok(gpa={gpa:#x} {size:?} rights=w{}u{}x{} pkey={pkey:?} global={global} steps={steps:?})",
                u8::from(rights.write),
                u8::from(rights.user),
                u8::from(rights.exec)
            ),
            Outcome::Fault {
                address,
                code,
                level,
                unbacked_frame,
            } => write!(
                f,
                "#PF(addr={address:#x} ec={} level={level} unbacked={unbacked_frame:x?})",
                ec_str(*code)
            ),
            Outcome::NonCanonical(g) => write!(f, "NonCanonical({g:#x})"),
            Outcome::InvalidPdpte { index, value } => {
                write!(f, "InvalidPdpte(index={index} value={value:#x})")
            }
            Outcome::Other(s) => write!(f, "Other({s})"),
        }
    }
}

impl fmt::Debug for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

pub(crate) struct Model {
    pub(crate) outcome: Outcome,
    /// Final value of every aligned 8-byte word the walk must modify.
    pub(crate) words: BTreeMap<u64, u64>,
}

pub(crate) struct WalkStepM {
    pub(crate) level: u8,
    pub(crate) gpa: u64,
    pub(crate) size: u64,
    pub(crate) value: u64,
    /// A PAE PDPTE: no A bit, no rights.
    pub(crate) pdpte: bool,
}

/// The reference model. `read` returns the aligned 8-byte word at a
/// guest-physical address, or `None` when it is not backed.
pub(crate) fn model_walk(
    ctx: &PagingContext,
    read: &dyn Fn(u64) -> Option<u64>,
    gva: u64,
    acc: Access,
    set_ad: bool,
) -> Model {
    let r = regs(ctx);
    let write = acc.kind == AccessKind::Write;
    let fetch = acc.kind == AccessKind::Fetch;
    let user = acc.mode == AccessMode::User;
    let implicit = acc.mode == AccessMode::ImplicitSupervisor;
    let m = r.m;

    // §4.7: W/R and U/S describe the access; I/D is set for fetches when
    // SMEP is on or NX is enabled with PAE-format entries.
    let mut ec = 0;
    if write {
        ec |= EC_W;
    }
    if user {
        ec |= EC_U;
    }
    if fetch && (r.smep || r.nx) {
        ec |= EC_I;
    }
    let fault = |code: u32, level: u8, unbacked: Option<u64>| Model {
        outcome: Outcome::Fault {
            address: gva,
            code,
            level,
            unbacked_frame: unbacked,
        },
        words: BTreeMap::new(),
    };
    let read_entry = |gpa: u64, size: u64| -> Option<u64> {
        let word = read(gpa & !7)?;
        Some(if size == 4 {
            (word >> ((gpa & 4) * 8)) & 0xffff_ffff
        } else {
            word
        })
    };

    let mut steps: Vec<WalkStepM> = Vec::new();
    let (mut level, mut table) = match r.mode {
        Mode::NoPaging => {
            // §4.1.1: without paging the linear address is the physical
            // address; outside IA-32e mode (which needs paging) linear
            // addresses are 32 bits wide.
            return Model {
                outcome: Outcome::Translated {
                    gpa: gva & 0xffff_ffff,
                    size: PageSize::Size4K,
                    rights: Rights {
                        write: true,
                        user: true,
                        exec: true,
                    },
                    pkey: None,
                    global: false,
                    steps: Vec::new(),
                },
                words: BTreeMap::new(),
            };
        }
        Mode::Level4 | Mode::Level5 => {
            // §4.5 / §3.3.7.1: the linear address must be canonical.
            let width = if r.mode == Mode::Level5 { 57 } else { 48 };
            if sign_extend(gva, width) != gva {
                return Model {
                    outcome: Outcome::NonCanonical(gva),
                    words: BTreeMap::new(),
                };
            }
            (r.mode.top(), ctx.cr3 & mask(12, m - 1))
        }
        Mode::Pae => {
            // §4.4.1: the four PDPTEs are loaded from CR3[31:5] at CR3 load;
            // a present one with a reserved bit makes the load #GP.
            let base = ctx.cr3 & mask(5, 31);
            let mut pdptes = [0u64; 4];
            for (i, slot) in pdptes.iter_mut().enumerate() {
                let g = base + 8 * i as u64;
                let Some(v) = read(g) else {
                    return fault(ec, 3, Some(g & !0xfff));
                };
                if v & P != 0 && v & pae_pdpte_reserved(m) != 0 {
                    return Model {
                        outcome: Outcome::InvalidPdpte {
                            index: i as u8,
                            value: v,
                        },
                        words: BTreeMap::new(),
                    };
                }
                *slot = v;
            }
            let idx = (gva >> 30) & 3;
            let e = pdptes[idx as usize];
            if e & P == 0 {
                return fault(ec, 3, None);
            }
            steps.push(WalkStepM {
                level: 3,
                gpa: base + 8 * idx,
                size: 8,
                value: e,
                pdpte: true,
            });
            (2, e & mask(12, m - 1))
        }
        Mode::Bits32 => (2, ctx.cr3 & mask(12, 31)),
    };

    let size = r.mode.entry_size();
    loop {
        let egpa = table + r.mode.index(gva, level) * size;
        let Some(e) = read_entry(egpa, size) else {
            return fault(ec, level, Some(egpa & !0xfff));
        };
        if e & P == 0 {
            return fault(ec, level, None);
        }
        if e & reserved_bits(&r, level, e) != 0 {
            return fault(ec | EC_P | EC_RSVD, level, None);
        }
        let leaf = is_leaf(&r, level, e);
        steps.push(WalkStepM {
            level,
            gpa: egpa,
            size,
            value: e,
            pdpte: false,
        });
        if leaf {
            break;
        }
        table = if size == 4 {
            e & 0xffff_f000
        } else {
            e & mask(12, m - 1)
        };
        level -= 1;
    }

    // §4.6.1: R/W and U/S are ANDed, XD is ORed over every entry used
    // (PAE PDPTEs control none of them).
    let (mut wr, mut us, mut xd) = (true, true, false);
    for s in steps.iter().filter(|s| !s.pdpte) {
        wr &= s.value & W != 0;
        us &= s.value & U != 0;
        xd |= r.nx && s.value & XD != 0;
    }
    let leaf = steps.last().expect("a walk that did not fault has a leaf");
    let leaf_value = leaf.value;

    // §4.6.1 access rights.
    let smap_blocks = us && r.smap && (implicit || !r.ac);
    let denied = match acc.kind {
        AccessKind::Read => {
            if user {
                !us
            } else {
                smap_blocks
            }
        }
        AccessKind::Write => {
            if user {
                !us || !wr
            } else {
                smap_blocks || (r.wp && !wr)
            }
        }
        AccessKind::Fetch => {
            if user {
                !us || xd
            } else {
                (us && r.smep) || xd
            }
        }
        other => panic!("the model knows no access kind {other:?}"),
    };
    // §4.6.2 protection keys: data accesses to user-mode addresses.
    let key = ((leaf_value >> PKEY_SHIFT) & 0xf) as u32;
    let pk_denied = r.pke && !fetch && us && {
        let ad = (r.pkru >> (2 * key)) & 1 != 0;
        let wd = (r.pkru >> (2 * key + 1)) & 1 != 0;
        ad || (write && wd && (user || r.wp))
    };
    if denied || pk_denied {
        let pk = if pk_denied { EC_PK } else { 0 };
        return fault(ec | EC_P | pk, 0, None);
    }

    // The translation (§4.3 / §4.4.2 / §4.5.4).
    let (gpa, page) = match (r.mode, leaf.level) {
        (Mode::Bits32, 1) => ((leaf_value & 0xffff_f000) | (gva & 0xfff), PageSize::Size4K),
        (Mode::Bits32, _) => {
            let mm = if r.pse36 { m.min(40) } else { 32 };
            let high = if mm > 32 {
                (leaf_value >> 13) & mask(0, mm - 33)
            } else {
                0
            };
            (
                (leaf_value & 0xffc0_0000) | (high << 32) | (gva & 0x3f_ffff),
                PageSize::Size4M,
            )
        }
        (_, 1) => (
            (leaf_value & mask(12, m - 1)) | (gva & 0xfff),
            PageSize::Size4K,
        ),
        (_, 2) => (
            (leaf_value & mask(21, m - 1)) | (gva & mask(0, 20)),
            PageSize::Size2M,
        ),
        (_, _) => (
            (leaf_value & mask(30, m - 1)) | (gva & mask(0, 29)),
            PageSize::Size1G,
        ),
    };

    // §4.8: A in every entry used, D in the leaf for a write; the model
    // (like KVM) only updates them for an access that succeeds.
    let mut words = BTreeMap::new();
    let mut out_steps = Vec::new();
    let n = steps.len();
    for (i, s) in steps.iter().enumerate() {
        let mut set = 0;
        if set_ad && !s.pdpte {
            if s.value & A == 0 {
                set |= A;
            }
            if i == n - 1 && write && s.value & D == 0 {
                set |= D;
            }
        }
        if set != 0 {
            let wg = s.gpa & !7;
            let shift = if s.size == 4 { (s.gpa & 4) * 8 } else { 0 };
            let cur = words
                .get(&wg)
                .copied()
                .or_else(|| read(wg))
                .expect("an entry the walk read is backed");
            words.insert(wg, cur | (set << shift));
        }
        out_steps.push(StepV {
            level: s.level,
            gpa: s.gpa,
            value: s.value | set,
        });
    }

    Model {
        outcome: Outcome::Translated {
            gpa,
            size: page,
            rights: Rights {
                write: wr,
                user: us,
                exec: !xd,
            },
            pkey: if r.pke { Some(key as u8) } else { None },
            global: r.pge && leaf_value & G != 0,
            steps: out_steps,
        },
        words,
    }
}

/// A coarse class of an outcome, for the coverage histogram.
pub(crate) fn classify(o: &Outcome) -> &'static str {
    match o {
        Outcome::Translated { .. } => "translated",
        Outcome::Fault {
            unbacked_frame: Some(_),
            ..
        } => "#PF, table outside memory",
        Outcome::Fault { code, .. } if code & EC_RSVD != 0 => "#PF, reserved bit",
        Outcome::Fault { code, .. } if code & EC_PK != 0 => "#PF, protection key",
        Outcome::Fault { code, .. } if code & EC_P != 0 => "#PF, access rights",
        Outcome::Fault { .. } => "#PF, not present",
        Outcome::NonCanonical(_) => "non-canonical",
        Outcome::InvalidPdpte { .. } => "invalid PAE PDPTE (#GP)",
        Outcome::Other(_) => "other",
    }
}

pub(crate) fn outcome_of(res: Result<Translation, WalkError>) -> Outcome {
    match res {
        Ok(t) => Outcome::Translated {
            gpa: t.gpa.raw(),
            size: t.page_size,
            rights: t.rights,
            pkey: t.pkey,
            global: t.global,
            steps: t
                .steps()
                .iter()
                .map(|s| StepV {
                    level: s.level,
                    gpa: s.entry_gpa.raw(),
                    value: s.entry.raw(),
                })
                .collect(),
        },
        Err(WalkError::PageFault(pf)) => Outcome::Fault {
            address: pf.address.raw(),
            code: pf.error_code.bits(),
            level: pf.level,
            unbacked_frame: pf.unbacked_table.map(|g| g.raw() & !0xfff),
        },
        Err(WalkError::NonCanonical(g)) => Outcome::NonCanonical(g.raw()),
        Err(WalkError::InvalidPdpte { index, value }) => Outcome::InvalidPdpte { index, value },
        Err(e) => Outcome::Other(format!("{e:?}")),
    }
}
