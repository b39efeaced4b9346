//! `access`: the U/W/NX permission matrix. Each vCPU maps 8 x 8 pages:
//! 8 PDEs with every combination of U, W and NX, each over a page table
//! whose 8 PTEs have every combination again (A/D clear). It makes every
//! access of [`MatrixOp::ALL`] to every page: read, write and fetch from
//! CPL3, and LOAD, STORE and CALL from CPL0, each recording its result (the
//! value read, 0, or [`FAULTED`]) in a results array.
//!
//! The model walks every access with the reference walker: it checks, per
//! round, the checksum of the values read and the number of faults; every
//! #PF delivered with its error code and CR2; the results array; and
//! every data word written.

use mmu_api::AccessKind;
use vm_memory::{Bytes, GuestAddress};

use super::model::{Overlay, model_access};
use super::{
    Expect, Params, Plan, PlanError, Shape, SpaceBuilder, VcpuPlan, Word, Workload, build,
    fill_frame, preset, report, write_words,
};
use crate::kit::abi::{FAULTED, tag};
use crate::kit::workloads::{self, ACCESS_RECORD_WORDS, MatrixOp};
use crate::layout::{MIB2, PAGE_SIZE, pte};
use crate::vm::{VcpuArgs, Vm};

/// Records of `access` per round.
const ACCESS_ROUND: usize = 128;
/// Where the `access` matrix keeps a `ret` in each page.
const ACCESS_FETCH_OFFSET: u64 = 0x800;
/// Combinations of U, W and NX at each level.
const COMBOS: u64 = 8;

/// The flags of an `access` matrix entry for combination `combo`
/// (bit 0: U, bit 1: W, bit 2: NX), present, A/D clear.
fn matrix_flags(combo: u64) -> u64 {
    let mut flags = pte::P;
    if combo & 1 != 0 {
        flags |= pte::U;
    }
    if combo & 2 != 0 {
        flags |= pte::W;
    }
    if combo & 4 != 0 {
        flags |= pte::NX;
    }
    flags
}

/// Plans `access` (it has no knobs; `params` only seeds the prologue).
pub(super) fn plan(vm: &Vm, params: &Params) -> Result<Plan, PlanError> {
    // 8 PDE combinations, each over a PT with the 8 PTE combinations.
    let pages = COMBOS * COMBOS;
    let records = pages * MatrixOp::ALL.len() as u64;
    let record_pages = (records * 8 * ACCESS_RECORD_WORDS).div_ceil(PAGE_SIZE);
    let result_pages = (records * 8).div_ceil(PAGE_SIZE);
    let shape = Shape {
        program: workloads::access_matrix()?,
        parameters: vec![("pages", pages), ("accesses", records)],
        table_frames: SpaceBuilder::frames_for(1, vm.layout().levels()) - 1 + COMBOS,
        data_pages: pages + record_pages + result_pages,
    };
    build(vm, Workload::Access, params, shape, |v| {
        let root = v.space.fork_identity()?;
        let base = v.base;
        let gva_of = |d: u64, l: u64| base + d * MIB2 + l * PAGE_SIZE;
        for d in 0..COMBOS {
            for l in 0..COMBOS {
                let frame = v.slice.frame(d * COMBOS + l);
                v.space.map_4k(root, gva_of(d, l), frame, matrix_flags(l))?;
                fill_frame(vm, frame, |gpa| preset(gpa) | 1)?;
                vm.memory()
                    .write_obj(0xc3u8, GuestAddress(frame + ACCESS_FETCH_OFFSET))?;
            }
            v.space.set_flags(root, gva_of(d, 0), 2, matrix_flags(d))?;
        }
        let record_at = v.slice.frame(pages);
        let results_at = record_at + record_pages * PAGE_SIZE;

        let mut memory = Overlay::new(vm);
        let mut expect = Expect::default();
        let mut words = Vec::new();
        let mut results = Vec::new();
        let mut checksum = 0u64;
        let mut faults = 0u64;
        let mut n = 0usize;
        for d in 0..COMBOS {
            for l in 0..COMBOS {
                for op in MatrixOp::ALL {
                    let kind = op.kind();
                    let address = gva_of(d, l)
                        + match kind {
                            AccessKind::Read => 0,
                            AccessKind::Write => 8,
                            AccessKind::Fetch => ACCESS_FETCH_OFFSET,
                            other => unreachable!("the matrix has no {other:?} access"),
                        };
                    let value = address ^ ((op as u64) << 56);
                    words.extend([address, op as u64, value]);
                    let result = match model_access(vm, &memory, root, address, kind, op.cpl())? {
                        Ok(gpa) => match kind {
                            AccessKind::Read => {
                                let read = memory.read(gpa);
                                checksum = checksum.wrapping_add(read);
                                read
                            }
                            AccessKind::Write => {
                                memory.write(gpa, value);
                                expect.written.insert(gpa & !(PAGE_SIZE - 1));
                                0
                            }
                            AccessKind::Fetch => 0,
                            other => unreachable!("the matrix has no {other:?} access"),
                        },
                        Err(fault) => {
                            expect.faults.push(fault);
                            faults += 1;
                            FAULTED
                        }
                    };
                    results.push(result);
                    n += 1;
                    if n.is_multiple_of(ACCESS_ROUND) || n as u64 == records {
                        expect.reports.push(report(tag::CHECKSUM, checksum));
                        expect.reports.push(report(tag::FAULTS, faults));
                        checksum = 0;
                        faults = 0;
                    }
                }
            }
        }
        write_words(vm, record_at, &words)?;
        for (i, result) in results.iter().enumerate() {
            let gpa = results_at + 8 * i as u64;
            expect.memory.push(Word::exact(gpa, *result));
            expect.written.insert(gpa & !(PAGE_SIZE - 1));
        }
        expect
            .memory
            .extend(memory.written().into_iter().map(|(g, v)| Word::exact(g, v)));
        let mut rounds = Vec::new();
        for start in (0..records as usize).step_by(ACCESS_ROUND) {
            let count = ACCESS_ROUND.min(records as usize - start) as u64;
            rounds.push(VcpuArgs([
                root,
                record_at + start as u64 * 8 * ACCESS_RECORD_WORDS,
                count,
                results_at + start as u64 * 8,
                0,
                0,
            ]));
        }
        Ok(VcpuPlan {
            expect,
            roots: vec![root],
            rounds,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matrix_flags_cover_every_combination() {
        assert_eq!(matrix_flags(0), pte::P);
        assert_eq!(matrix_flags(7), pte::P | pte::U | pte::W | pte::NX);
        assert_eq!(matrix_flags(1) & (pte::A | pte::D), 0);
    }
}
