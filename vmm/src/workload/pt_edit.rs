//! `pt-edit`: each vCPU's guest CPL0 code edits the PTEs of its own
//! window, `ops` times (480 by default), each edit a STORE system call
//! followed by INVLPG and one CPL3 access (read or write) to the page.
//!
//! The window has 64 pages, each with two candidate frames (preset with
//! [`preset`]). The edits are generated from the vCPU's seed: unmap, map
//! or remap (read/write, read-only, supervisor-only), or keep the frame
//! and drop W. The model applies each edit to its overlay of guest memory
//! and walks the tables with the reference walker: it checks, per round,
//! the checksum of the values read and written and the number of faults;
//! every #PF delivered with its error code and CR2; every data word
//! written; and the final PTEs but their A/D bits.

use std::collections::BTreeSet;

use mmu_api::AccessKind;

use super::model::{Overlay, model_access};
use super::{
    DATA_FLAGS, Expect, Params, Plan, PlanError, Rng, Shape, SpaceBuilder, VcpuPlan, Word,
    Workload, build, fill_frame, preset, report, write_words,
};
use crate::kit::abi::tag;
use crate::kit::workloads::{self, PT_EDIT_RECORD_WORDS, PtEditRecord};
use crate::layout::{PAGE_SIZE, pte};
use crate::vm::{VcpuArgs, Vm};

/// Records of `pt-edit` per round: each faults at most once, so the fault
/// log never overflows.
const PT_EDIT_ROUND: usize = 160;
/// Window pages of `pt-edit` (each with two candidate frames).
const PT_EDIT_WINDOW: u64 = 64;

/// Plans `pt-edit`.
pub(super) fn plan(vm: &Vm, params: &Params) -> Result<Plan, PlanError> {
    let edits = params.ops.unwrap_or(480);
    let frames = 2 * PT_EDIT_WINDOW;
    let script_pages = (edits * 8 * PT_EDIT_RECORD_WORDS).div_ceil(PAGE_SIZE);
    let shape = Shape {
        program: workloads::pt_edit()?,
        parameters: vec![("edits", edits), ("window_pages", PT_EDIT_WINDOW)],
        table_frames: SpaceBuilder::frames_for(PT_EDIT_WINDOW, vm.layout().levels()),
        data_pages: frames + script_pages,
    };
    build(vm, Workload::PtEdit, params, shape, |v| {
        let root = v.space.fork_identity()?;
        let base = v.base;
        let mut entries = Vec::new();
        for j in 0..PT_EDIT_WINDOW {
            entries.push(v.space.map_4k(
                root,
                base + j * PAGE_SIZE,
                v.slice.frame(j),
                DATA_FLAGS,
            )?);
        }
        for f in 0..frames {
            fill_frame(vm, v.slice.frame(f), preset)?;
        }
        let script = v.slice.frame(frames);

        // Generate the edits and run them through the model.
        let mut rng = Rng(v.seed);
        let mut memory = Overlay::new(vm);
        let mut expect = Expect::default();
        let mut records = Vec::new();
        let mut checksum = 0u64;
        let mut faults = 0u64;
        for k in 0..edits {
            let j = rng.below(PT_EDIT_WINDOW);
            let current = memory.read(entries[j as usize]);
            let frame = if current & pte::P != 0 && rng.below(2) == 0 {
                current & pte::ADDR
            } else {
                v.slice.frame(rng.below(frames))
            };
            let entry = match rng.below(6) {
                0 => 0,
                1 | 2 => frame | DATA_FLAGS,
                3 => frame | pte::P | pte::U | pte::NX,
                4 => frame | pte::P | pte::W | pte::NX,
                _ => (current & pte::ADDR) | (current & pte::P) | pte::U | pte::NX,
            };
            let write = rng.below(2) == 0;
            let address = base + j * PAGE_SIZE + 8 * rng.below(PAGE_SIZE / 8);
            let value = rng.next();
            let record = PtEditRecord {
                entry_address: entries[j as usize],
                entry,
                address,
                write,
                value,
            };
            records.extend(record.words());
            memory.write(entries[j as usize], entry);
            expect
                .written
                .insert(entries[j as usize] & !(PAGE_SIZE - 1));
            let kind = if write {
                AccessKind::Write
            } else {
                AccessKind::Read
            };
            match model_access(vm, &memory, root, address, kind, 3)? {
                Ok(gpa) => {
                    if write {
                        memory.write(gpa, value);
                        expect.written.insert(gpa & !(PAGE_SIZE - 1));
                        checksum = checksum.wrapping_add(value);
                    } else {
                        checksum = checksum.wrapping_add(memory.read(gpa));
                    }
                }
                Err(fault) => {
                    expect.faults.push(fault);
                    faults += 1;
                }
            }
            if (k + 1) % PT_EDIT_ROUND as u64 == 0 || k + 1 == edits {
                expect.reports.push(report(tag::CHECKSUM, checksum));
                expect.reports.push(report(tag::FAULTS, faults));
                checksum = 0;
                faults = 0;
            }
        }
        write_words(vm, script, &records)?;
        // Every word the model wrote: data exactly, entries but their A/D.
        let entry_set: BTreeSet<u64> = entries.iter().copied().collect();
        for (gpa, value) in memory.written() {
            expect.memory.push(if entry_set.contains(&gpa) {
                Word {
                    gpa,
                    value: value & !(pte::A | pte::D),
                    mask: !(pte::A | pte::D),
                }
            } else {
                Word::exact(gpa, value)
            });
        }
        let mut rounds = Vec::new();
        for (round, chunk) in records
            .chunks((PT_EDIT_ROUND as u64 * PT_EDIT_RECORD_WORDS) as usize)
            .enumerate()
        {
            let at = script + (round * PT_EDIT_ROUND) as u64 * 8 * PT_EDIT_RECORD_WORDS;
            let count = chunk.len() as u64 / PT_EDIT_RECORD_WORDS;
            rounds.push(VcpuArgs([root, at, count, 0, 0, 0]));
        }
        if rounds.is_empty() {
            rounds.push(VcpuArgs([root, script, 0, 0, 0, 0]));
            expect.reports = vec![report(tag::CHECKSUM, 0), report(tag::FAULTS, 0)];
        }
        Ok(VcpuPlan {
            expect,
            roots: vec![root],
            rounds,
        })
    })
}
