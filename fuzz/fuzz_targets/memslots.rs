//! Fuzzes `mmu_api::MemslotTable` against a plain model: a `Vec` of slots
//! searched linearly, with the validation rules written out again.
//!
//! Every `set` and `delete` must give the model's answer: the same
//! `MemslotChange`, or the same typed error (zero size, unaligned base /
//! size / backing, beyond the guest-physical width, null or wrapping
//! backing, an illegal change of a live slot, too many slots, an overlap
//! naming the lowest-based slot in the way and the first shared address,
//! an unknown id); a refused operation changes nothing. After every
//! operation the slots (sorted by base), their count and every lookup
//! (`find` at both edges of every slot and at input addresses, `find_gfn`,
//! `get`) must agree with the model.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mmu_api::{
    Gfn, Gpa, HostBacking, HostVirtAddr, Hpa, Memslot, MemslotChange, MemslotError, MemslotFlags,
    MemslotTable, SlotId,
};

const PAGE: u64 = 0x1000;

/// The model: slots in insertion order, every rule spelled out.
struct Model {
    slots: Vec<Memslot>,
    width: u8,
    max: usize,
}

impl Model {
    fn find_id(&self, id: SlotId) -> Option<usize> {
        self.slots.iter().position(|s| s.id == id)
    }

    fn set(&mut self, slot: Memslot) -> Result<MemslotChange, MemslotError> {
        let id = slot.id;
        if slot.size == 0 {
            return Err(MemslotError::ZeroSize(id));
        }
        let aligned = [
            slot.guest_base.raw(),
            slot.size,
            slot.backing.hpa.raw(),
            slot.backing.host_addr.0,
        ]
        .iter()
        .all(|v| v % PAGE == 0);
        if !aligned {
            return Err(MemslotError::Unaligned(id));
        }
        let end = slot.guest_base.raw().saturating_add(slot.size);
        if u128::from(end) > 1u128 << self.width {
            return Err(MemslotError::TooLarge {
                slot: id,
                end,
                width: self.width,
            });
        }
        if slot.backing.host_addr.0 == 0
            || slot.backing.hpa.raw().checked_add(slot.size).is_none()
            || slot.backing.host_addr.0.checked_add(slot.size).is_none()
        {
            return Err(MemslotError::InvalidBacking(id));
        }
        let old = self.find_id(id).map(|i| self.slots[i]);
        match old {
            Some(old) if old.size != slot.size || old.backing != slot.backing => {
                return Err(MemslotError::IllegalChange(id));
            }
            Some(old) if old == slot => return Ok(MemslotChange::Unchanged),
            Some(old) if old.guest_base != slot.guest_base && old.flags != slot.flags => {
                return Err(MemslotError::IllegalChange(id));
            }
            None if self.slots.len() >= self.max => {
                return Err(MemslotError::TooManySlots(self.max));
            }
            _ => {}
        }
        let (start, stop) = (u128::from(slot.guest_base.raw()), u128::from(end));
        let blocker = self
            .slots
            .iter()
            .filter(|s| s.id != id)
            .filter(|s| {
                let (a, b) = (
                    u128::from(s.guest_base.raw()),
                    u128::from(s.guest_base.raw()) + u128::from(s.size),
                );
                a < stop && start < b
            })
            .min_by_key(|s| s.guest_base);
        if let Some(other) = blocker {
            return Err(MemslotError::Overlap {
                slot: id,
                other: other.id,
                at: Gpa(slot.guest_base.raw().max(other.guest_base.raw())),
            });
        }
        Ok(match self.find_id(id) {
            None => {
                self.slots.push(slot);
                MemslotChange::Created
            }
            Some(i) => {
                let old = std::mem::replace(&mut self.slots[i], slot);
                if old.guest_base != slot.guest_base {
                    MemslotChange::Moved { old }
                } else {
                    MemslotChange::FlagsChanged { old }
                }
            }
        })
    }

    fn delete(&mut self, id: SlotId) -> Result<Memslot, MemslotError> {
        let i = self.find_id(id).ok_or(MemslotError::UnknownSlot(id))?;
        Ok(self.slots.remove(i))
    }

    fn find(&self, gpa: u64) -> Option<Memslot> {
        self.slots
            .iter()
            .find(|s| gpa >= s.guest_base.raw() && gpa - s.guest_base.raw() < s.size)
            .copied()
    }

    fn sorted(&self) -> Vec<Memslot> {
        let mut v = self.slots.clone();
        v.sort_by_key(|s| s.guest_base);
        v
    }
}

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

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
}

/// An address from 16 input bits: mostly a page in a small window (so
/// slots collide), sometimes misaligned, near the top of the guest-physical
/// space, or near the top of the 64-bit space.
fn address(sel: u16, width: u8) -> u64 {
    let page = u64::from(sel & 0x3ff) * PAGE;
    match sel >> 12 {
        0..=9 => page,
        10 | 11 => page + u64::from(sel >> 10 & 3) * 0x400 + 8,
        12 | 13 => (1u64 << width).wrapping_sub(PAGE * u64::from(sel & 0xf)),
        _ => u64::MAX - u64::from(sel & 0xfff) * PAGE - (u64::from(sel >> 12 & 1) * 0xfff),
    }
}

fn size(sel: u8) -> u64 {
    match sel {
        0 => 0,
        1..=199 => u64::from(sel % 32) * PAGE,
        200..=229 => u64::from(sel - 199) * PAGE + 0x800,
        230..=239 => 1 << (30 + (sel - 230)),
        _ => u64::MAX - u64::from(sel - 240) * PAGE - 0xfff,
    }
}

fn backing(sel: u16) -> HostBacking {
    let v = u64::from(sel);
    match sel >> 13 {
        0..=5 => HostBacking {
            hpa: Hpa(0x1_0000_0000 + (v & 0xff) * PAGE),
            host_addr: HostVirtAddr(0x7f00_0000_0000 + (v & 0xff) * PAGE),
        },
        6 => HostBacking {
            hpa: Hpa(v & 7),
            host_addr: HostVirtAddr((v >> 3 & 3) * PAGE),
        },
        _ => HostBacking {
            hpa: Hpa(u64::MAX - (v & 3) * PAGE - 0xfff),
            host_addr: HostVirtAddr(!0xfff),
        },
    }
}

fn check_state(table: &MemslotTable, model: &Model, probes: &[u64]) {
    let sorted = model.sorted();
    let got: Vec<Memslot> = table.iter().copied().collect();
    assert_eq!(got, sorted, "slots differ");
    assert_eq!(table.len(), sorted.len());
    assert_eq!(table.is_empty(), sorted.is_empty());
    for id in 0..10 {
        let id = SlotId(id);
        assert_eq!(
            table.get(id).copied(),
            model.find_id(id).map(|i| model.slots[i]),
            "get({id})"
        );
    }
    let edges = sorted.iter().flat_map(|s| {
        let b = s.guest_base.raw();
        let e = b.saturating_add(s.size);
        [b.wrapping_sub(1), b, e.wrapping_sub(1), e]
    });
    for gpa in edges.chain(probes.iter().copied()) {
        let want = model.find(gpa);
        assert_eq!(table.find(Gpa(gpa)).copied(), want, "find({gpa:#x})");
        let gfn = gpa >> 12;
        assert_eq!(
            table.find_gfn(Gfn(gfn)).copied(),
            model.find(gfn << 12),
            "find_gfn({gfn:#x})"
        );
        if let Some(s) = want {
            let off = gpa - s.guest_base.raw();
            assert_eq!(s.hpa_of(Gpa(gpa)), Some(Hpa(s.backing.hpa.raw() + off)));
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input(data);
    let width = inp.u8();
    let max = 1 + usize::from(inp.u8() % 8);
    let mut table = MemslotTable::new(width, max);
    let mut model = Model {
        slots: Vec::new(),
        width: width.clamp(32, 52),
        max,
    };
    assert_eq!(table.gpa_width(), model.width);
    let mut probes = Vec::new();
    while !inp.0.is_empty() {
        let op = inp.u8();
        let id = SlotId(u32::from(inp.u8() % 10));
        let base_sel = inp.u16();
        let size_sel = inp.u8();
        let backing_sel = inp.u16();
        let flags = MemslotFlags::from_bits_truncate(u32::from(op >> 4));
        probes.push(address(base_sel ^ 0x5a5a, model.width));
        match op % 8 {
            // Delete (also of unknown ids).
            0 => {
                let before = model.sorted();
                let want = model.delete(id);
                assert_eq!(table.delete(id), want, "delete({id})");
                if want.is_err() {
                    assert_eq!(model.sorted(), before);
                }
            }
            // Change a live slot: move it, change its flags, both, or
            // resize it; or re-set it unchanged.
            1..=3 => {
                let Some(i) = model.find_id(id) else { continue };
                let mut s = model.slots[i];
                match size_sel % 5 {
                    0 => s.guest_base = Gpa(address(base_sel, model.width)),
                    1 => s.flags = flags,
                    2 => {
                        s.guest_base = Gpa(address(base_sel, model.width));
                        s.flags = flags;
                    }
                    3 => s.size = size(size_sel.rotate_left(3)),
                    _ => {}
                }
                let want = model.set(s);
                assert_eq!(table.set(s), want, "set({s:?})");
            }
            // A new (or replacing) slot from the input.
            _ => {
                let s = Memslot::new(
                    id,
                    Gpa(address(base_sel, model.width)),
                    size(size_sel),
                    backing(backing_sel),
                    flags,
                );
                let want = model.set(s);
                assert_eq!(table.set(s), want, "set({s:?})");
            }
        }
        check_state(&table, &model, &probes);
    }
});
