//! Property test of the software TLB against the reference walker.
//!
//! A guest (the test) edits its page-table entries at every level, issues
//! INVLPG, flushes and CR3 loads, changes CR0/CR4/EFER/EFLAGS.AC/PKRU,
//! while the VMM churns memslots and zaps; in between the vCPU translates
//! random accesses. A model tracks which pages a correct guest may not rely
//! on yet (changed since their last invalidation). Every translation of the
//! other pages must equal a fresh reference walk over an identical copy of
//! guest memory (its own RAM, memslot table and `SlotMemory`): the same
//! segments or the same fault, and afterwards the same A/D bits in every
//! page-table entry.

use std::collections::BTreeSet;

use mmu_api::paging::{
    Cr0, Cr4, Efer, PageSize, RangeSegment, SlotMemory, Translation, WalkError, WalkOptions,
    translate_range, walk_with,
};
use mmu_api::{
    Access, AccessKind, AccessMode, Gpa, Gva, MemslotFlags, MemslotTable, MmuBackend, MmuVcpu,
    PagingContext, SlotId,
};
use mmu_ept::testing::GuestRam;
use proptest::prelude::*;

use crate::common::{
    A, AD, D, G, P, PAGE, PEEK, PS, U, Vm, W, XD, add_ram, ctx4, leak_ram, set_slot,
};

const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD: u64 = 0x3000;
const PT: [u64; 2] = [0x4000, 0x5000];
const TABLES: [u64; 5] = [PML4, PDPT, PD, PT[0], PT[1]];
/// Pages per page table that translations can reach (a translation starts
/// in pages 0..4 and may cross into the next one).
const REACH: u64 = 5;
/// Pages the data PTEs may point to (never read by the walker).
const DATA: u64 = 0x10_0000;
/// 2 MiB pages a PDE with PS may map.
const LARGE: u64 = 0x4000_0000;

/// A page the model tracks: (page directory entry, page in its table).
type Page = (u64, u64);

fn gva_of((pd, page): Page) -> u64 {
    (pd << 21) | (page << 12)
}

/// One paging-structure entry the guest may edit.
#[derive(Clone, Copy, Debug)]
enum Entry {
    Pml4e,
    Pdpte,
    Pde(u64),
    Pte(u64, u64),
}

impl Entry {
    fn gpa(self) -> u64 {
        match self {
            Entry::Pml4e => PML4,
            Entry::Pdpte => PDPT,
            Entry::Pde(pd) => PD + pd * 8,
            Entry::Pte(pd, page) => PT[pd as usize] + page * 8,
        }
    }

    /// The pages whose translation goes through this entry.
    fn affected(self) -> Vec<Page> {
        let all = |pds: std::ops::Range<u64>| {
            pds.flat_map(|pd| (0..REACH).map(move |page| (pd, page)))
                .collect()
        };
        match self {
            Entry::Pml4e | Entry::Pdpte => all(0..2),
            Entry::Pde(pd) => all(pd..pd + 1),
            Entry::Pte(pd, page) => vec![(pd, page)],
        }
    }
}

/// A control-register or flag bit the guest may flip.
#[derive(Clone, Copy, Debug)]
enum Knob {
    Wp,
    Nxe,
    Smep,
    Smap,
    Ac,
    Pke,
    Pge,
    Cpl3,
}

#[derive(Clone, Debug)]
enum Op {
    Edit(Entry, u64),
    Invlpg(Page, u64),
    Flush {
        include_global: bool,
    },
    Cr3Load,
    Toggle(Knob),
    SetPkru(u32),
    Translate {
        page: Page,
        offset: u64,
        len: u64,
        access: Access,
        set_ad: bool,
    },
    /// A memslot flag change: a new generation, same memory.
    /// The last translation again (emulation keeps touching the same
    /// page the same way), at another offset in its first page.
    Repeat(u64),
    MemslotChurn(MemslotFlags),
    /// The VMM deletes the slot holding the tables, the vCPU translates
    /// (the walk must fail), then the slot comes back.
    Unplug {
        page: Page,
        access: Access,
    },
    ZapAll,
}

/// Entry flags: mostly present, any rights, sometimes A/D/G/XD already
/// set, a protection key, and now and then a reserved bit.
fn flags() -> impl Strategy<Value = u64> {
    (
        prop::bool::weighted(0.85),
        0u64..64,
        0u64..16,
        prop::bool::weighted(0.05),
    )
        .prop_map(|(present, bits, key, rsvd)| {
            let pick = |bit: u64, flag: u64| if bits & bit != 0 { flag } else { 0 };
            let mut v = pick(1, W) | pick(2, U) | pick(4, A) | pick(8, D) | pick(16, G);
            v |= pick(32, XD) | (key << 59);
            if present {
                v |= P;
            }
            if rsvd {
                v |= 1 << 51;
            }
            v
        })
}

fn entry_edit() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => flags().prop_map(|f| Op::Edit(Entry::Pml4e, PDPT | f)),
        1 => flags().prop_map(|f| Op::Edit(Entry::Pdpte, PD | f)),
        // PS with a 2 MiB frame (a large page), mostly; now and then PS
        // with the table's address (reserved bits) or a frame without PS
        // (a table outside memory).
        3 => (0u64..2, flags(), prop::bool::weighted(0.4), 0u64..10, 0u64..2)
            .prop_map(|(pd, f, ps, odd, k)| {
                let large = if ps { odd != 0 } else { odd == 0 };
                let target = if large { LARGE + k * 0x20_0000 } else { PT[pd as usize] };
                Op::Edit(Entry::Pde(pd), target | f | if ps { PS } else { 0 })
            }),
        8 => (0u64..2, 0u64..REACH, flags(), 0u64..6)
            .prop_map(|(pd, page, f, frame)| Op::Edit(Entry::Pte(pd, page), DATA + frame * PAGE + f)),
    ]
}

fn access() -> impl Strategy<Value = Access> {
    (
        prop_oneof![
            3 => Just(AccessKind::Read),
            2 => Just(AccessKind::Write),
            1 => Just(AccessKind::Fetch)
        ],
        prop_oneof![
            2 => Just(AccessMode::User),
            2 => Just(AccessMode::Supervisor),
            1 => Just(AccessMode::ImplicitSupervisor)
        ],
    )
        .prop_map(|(kind, mode)| Access { kind, mode })
}

fn op() -> impl Strategy<Value = Op> {
    let knob = prop_oneof![
        Just(Knob::Wp),
        Just(Knob::Nxe),
        Just(Knob::Smep),
        Just(Knob::Smap),
        Just(Knob::Ac),
        Just(Knob::Pke),
        Just(Knob::Pge),
        Just(Knob::Cpl3),
    ];
    prop_oneof![
        6 => entry_edit(),
        4 => ((0u64..2, 0u64..REACH), 0u64..PAGE).prop_map(|(p, off)| Op::Invlpg(p, off)),
        1 => any::<bool>().prop_map(|include_global| Op::Flush { include_global }),
        1 => Just(Op::Cr3Load),
        2 => knob.prop_map(Op::Toggle),
        1 => any::<u32>().prop_map(Op::SetPkru),
        14 => ((0u64..2, 0u64..REACH - 1), 0u64..PAGE, 1u64..=PAGE, access(), prop::bool::weighted(0.8))
            .prop_map(|(page, offset, len, access, set_ad)| Op::Translate {
                page,
                offset,
                len,
                access,
                set_ad
            }),
        1 => prop_oneof![Just(MemslotFlags::LOG_DIRTY), Just(MemslotFlags::READONLY)]
            .prop_map(Op::MemslotChurn),
        1 => ((0u64..2, 0u64..REACH), access()).prop_map(|(page, access)| Op::Unplug { page, access }),
        10 => (0u64..PAGE).prop_map(Op::Repeat),
        1 => Just(Op::ZapAll),
    ]
}

/// The vCPU under test, its guest memory, an identical oracle memory, and
/// the model of what a correct guest may rely on.
struct Harness {
    vm: Vm,
    ram: &'static GuestRam,
    /// The reference copy of guest memory and its memslots.
    oracle_ram: &'static GuestRam,
    oracle_slots: MemslotTable,
    vcpu: Box<dyn MmuVcpu>,
    ctx: PagingContext,
    /// Pages changed since their last invalidation.
    stale: BTreeSet<Page>,
    /// Pages the TLB may hold a global entry for.
    maybe_global: BTreeSet<Page>,
    /// Pages the TLB may hold a 4 KiB-page entry for. The others can only
    /// hold pieces of a 2 MiB page, which INVLPG anywhere in it drops.
    maybe_small: BTreeSet<Page>,
    /// The last `Translate`, for `Repeat`.
    last: Option<Op>,
    compared: u64,
}

impl Harness {
    fn new() -> Self {
        let vm = Vm::new();
        let ram = leak_ram(8 * PAGE);
        add_ram(&vm.backend, ram, 0, 0, MemslotFlags::empty()).unwrap();
        let oracle_ram = leak_ram(8 * PAGE);
        let mut oracle_slots = MemslotTable::new(46, 1);
        oracle_slots
            .set(oracle_ram.memslot(SlotId(0), Gpa(0), MemslotFlags::empty()))
            .unwrap();
        let ctx = ctx4(PML4);
        let mut vcpu = vm.vcpu(0);
        vcpu.set_paging_context(&ctx).unwrap();
        let h = Self {
            vm,
            ram,
            oracle_ram,
            oracle_slots,
            vcpu,
            ctx,
            stale: BTreeSet::new(),
            maybe_global: BTreeSet::new(),
            maybe_small: BTreeSet::new(),
            last: None,
            compared: 0,
        };
        h.write(PML4, PDPT | P | W | U);
        h.write(PDPT, PD | P | W | U);
        for pd in 0..2 {
            h.write(PD + pd * 8, PT[pd as usize] | P | W | U);
            for page in 0..REACH {
                let frame = (pd * REACH + page) % 6;
                h.write(
                    PT[pd as usize] + page * 8,
                    DATA + frame * PAGE + (P | W | U),
                );
            }
        }
        h
    }

    /// A guest store to its own memory, seen by both copies.
    fn write(&self, gpa: u64, value: u64) {
        self.ram.write_u64(gpa, value);
        self.oracle_ram.write_u64(gpa, value);
    }

    /// The reference walker's view of guest memory.
    fn oracle(&self) -> SlotMemory<'_> {
        // SAFETY: the only slot the table ever holds is `oracle_ram`, which
        // is leaked (valid for reads and writes forever) and page aligned.
        unsafe { SlotMemory::new(&self.oracle_slots) }
    }

    /// Sets slot 0 in both the backend and the oracle's table.
    fn set_both(&mut self, flags: MemslotFlags) {
        let slot = self.ram.memslot(SlotId(0), Gpa(0), flags);
        set_slot(&self.vm.backend, slot).unwrap();
        self.oracle_slots
            .set(self.oracle_ram.memslot(SlotId(0), Gpa(0), flags))
            .unwrap();
    }

    fn load_context(&mut self) {
        self.vcpu.set_paging_context(&self.ctx).unwrap();
    }

    /// Translates on the vCPU and with the reference walker and compares
    /// the answers and the page tables afterwards.
    fn compare(
        &mut self,
        gva: u64,
        len: u64,
        access: Access,
        options: WalkOptions,
    ) -> Result<(), String> {
        let got = self.vcpu.translate(Gva(gva), len, access, options);
        let want: Result<Vec<RangeSegment>, WalkError> =
            translate_range(&self.ctx, &self.oracle(), Gva(gva), len, access, options);
        if got != want {
            return Err(format!(
                "{gva:#x}+{len:#x} {access:?}: got {got:?}, want {want:?}"
            ));
        }
        for table in TABLES {
            for offset in (0..PAGE).step_by(8) {
                let (ours, theirs) = (
                    self.ram.read_u64(table + offset),
                    self.oracle_ram.read_u64(table + offset),
                );
                if ours != theirs {
                    return Err(format!(
                        "entry at {:#x}: {ours:#x}, the walker left {theirs:#x}",
                        table + offset
                    ));
                }
            }
        }
        self.compared += 1;
        Ok(())
    }

    fn apply(&mut self, op: &Op) -> Result<(), String> {
        match *op {
            Op::Edit(entry, value) => {
                self.write(entry.gpa(), value);
                self.stale.extend(entry.affected());
            }
            Op::Invlpg(page, offset) => {
                self.vcpu.invlpg(Gva(gva_of(page) + offset));
                for q in (0..REACH).map(|q| (page.0, q)) {
                    // Any 2 MiB entry of this directory slot covers `page`.
                    if q == page || !self.maybe_small.contains(&q) {
                        self.stale.remove(&q);
                        self.maybe_global.remove(&q);
                        self.maybe_small.remove(&q);
                    }
                }
            }
            Op::Flush { include_global } => {
                self.vcpu.flush_tlb(include_global);
                self.after_flush(include_global);
            }
            Op::Cr3Load => {
                self.load_context();
                self.after_flush(false);
            }
            Op::Toggle(knob) => {
                let ctx = &mut self.ctx;
                match knob {
                    Knob::Wp => ctx.cr0.toggle(Cr0::WP),
                    Knob::Nxe => ctx.efer.toggle(Efer::NXE),
                    Knob::Smep => ctx.cr4.toggle(Cr4::SMEP),
                    Knob::Smap => ctx.cr4.toggle(Cr4::SMAP),
                    Knob::Pke => ctx.cr4.toggle(Cr4::PKE),
                    Knob::Pge => ctx.cr4.toggle(Cr4::PGE),
                    Knob::Ac => ctx.eflags_ac = !ctx.eflags_ac,
                    Knob::Cpl3 => ctx.cpl ^= 3,
                }
                // A correct guest relies on no invalidation here.
                self.load_context();
            }
            Op::SetPkru(pkru) => {
                self.ctx.pkru = pkru;
                self.load_context();
            }
            Op::Translate {
                page,
                offset,
                len,
                access,
                set_ad,
            } => {
                self.last = Some(op.clone());
                let gva = gva_of(page) + offset;
                let last = (page.0, (gva + len - 1 - gva_of((page.0, 0))) >> 12);
                if self.stale.contains(&page) || self.stale.contains(&last) {
                    return Ok(()); // a correct guest cannot rely on these
                }
                let options = if set_ad { AD } else { PEEK };
                self.compare(gva, len, access, options)?;
                for p in [page, last] {
                    self.note_cached(p);
                }
            }
            Op::Repeat(new_offset) => {
                if let Some(Op::Translate {
                    page,
                    offset,
                    len,
                    access,
                    set_ad,
                }) = self.last
                {
                    let end = offset + len;
                    return self.apply(&Op::Translate {
                        page,
                        offset: new_offset,
                        len: end.saturating_sub(new_offset).clamp(1, PAGE),
                        access,
                        set_ad,
                    });
                }
            }
            Op::MemslotChurn(flip) => {
                let flags = self.vm.backend.memslots()[0].flags ^ flip;
                self.set_both(flags);
            }
            Op::Unplug { page, access } => {
                // No guest behaviour makes a translation through a deleted
                // slot legitimate: compare even stale pages.
                let flags = self.vm.backend.memslots()[0].flags;
                self.vm.backend.delete_memslot(SlotId(0)).unwrap();
                self.oracle_slots.delete(SlotId(0)).unwrap();
                self.compare(gva_of(page), 1, access, AD)?;
                self.set_both(flags);
            }
            Op::ZapAll => self.vm.backend.zap_all(),
        }
        Ok(())
    }

    fn after_flush(&mut self, include_global: bool) {
        if include_global {
            self.stale.clear();
            self.maybe_global.clear();
            self.maybe_small.clear();
        } else {
            let keep = &self.maybe_global;
            self.stale.retain(|p| keep.contains(p));
        }
    }

    /// Records what the TLB may now hold for `page` after a translation
    /// touched it: a global entry if its leaf is global, a 4 KiB entry if
    /// it is a 4 KiB page. The probe drops SMEP/SMAP/PKE so it reaches the
    /// leaf whenever the translation did.
    fn note_cached(&mut self, page: Page) {
        let mut probe = self.ctx;
        probe.cr4.remove(Cr4::SMEP | Cr4::SMAP | Cr4::PKE);
        let walked: Result<Translation, WalkError> = walk_with(
            &probe,
            &self.oracle(),
            Gva(gva_of(page)),
            Access::supervisor(AccessKind::Read),
            PEEK,
        );
        if let Ok(t) = walked {
            if t.global {
                self.maybe_global.insert(page);
            }
            if t.page_size == PageSize::Size4K {
                self.maybe_small.insert(page);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn tlb_agrees_with_a_fresh_walk(ops in prop::collection::vec(op(), 1..128)) {
        let mut h = Harness::new();
        for op in &ops {
            if let Err(msg) = h.apply(op) {
                return Err(TestCaseError::fail(msg));
            }
        }
    }
}

/// The property has teeth: the harness does compare (and the TLB does
/// hit) on a plain sequence, and a translation of a page the guest changed
/// without invalidating really differs from a fresh walk, which is why the
/// model excludes it.
#[test]
fn harness_compares_hits_and_detects_staleness() {
    let mut h = Harness::new();
    let read = Access::supervisor(AccessKind::Read);
    for _ in 0..3 {
        h.apply(&Op::Translate {
            page: (0, 1),
            offset: 0x10,
            len: 8,
            access: read,
            set_ad: true,
        })
        .unwrap();
    }
    assert_eq!(h.compared, 3);
    assert_eq!(h.vm.stat("tlb_hits"), 2);

    h.apply(&Op::Edit(Entry::Pte(0, 1), DATA + 5 * PAGE + (P | W)))
        .unwrap();
    let err = h.compare(gva_of((0, 1)), 8, read, AD).unwrap_err();
    assert!(err.contains("got Ok"), "{err}");
    h.apply(&Op::Invlpg((0, 1), 0x800)).unwrap();
    h.compare(gva_of((0, 1)), 8, read, AD).unwrap();
}
