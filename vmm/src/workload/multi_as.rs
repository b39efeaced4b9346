//! `multi-as`: each vCPU has `ops` address spaces (16 by default, at most
//! 512) mapping the same 16-page window to different frames, the last
//! page shared by all; `passes` times (4 by default) it loads each space
//! with LOAD_CR3 and rewrites every page of the window through it, from
//! CPL3, then reports the wrapping sum of the values written.
//!
//! The roots are written to one page the program reads. The model checks
//! the checksum, every frame's final word (the shared frame sees every
//! space's writes), the dirty log, and that the last space loaded stays
//! the vCPU's translation context.

use std::collections::HashMap;

use vm_memory::{Bytes, GuestAddress};

use super::{
    DATA_FLAGS, Expect, Params, Plan, PlanError, Shape, SpaceBuilder, VcpuPlan, Word, Workload,
    build, preset, report, write_words,
};
use crate::kit::abi::tag;
use crate::kit::workloads;
use crate::layout::PAGE_SIZE;
use crate::vm::{VcpuArgs, Vm};

/// Window pages of each `multi-as` address space (the last one shared).
const MULTI_AS_WINDOW: u64 = 16;
/// Most address spaces `multi-as` takes (their roots fill one page).
const MULTI_AS_MAX: u64 = 512;

/// Plans `multi-as`.
pub(super) fn plan(vm: &Vm, params: &Params) -> Result<Plan, PlanError> {
    let workload = Workload::MultiAs;
    let spaces = params.ops.unwrap_or(16);
    let passes = params.passes.unwrap_or(4);
    if spaces == 0 || spaces > MULTI_AS_MAX {
        return Err(PlanError::Option {
            workload,
            what: "--ops (address spaces)",
            detail: format!("{spaces} is not in 1..={MULTI_AS_MAX}"),
        });
    }
    let w = MULTI_AS_WINDOW;
    // Private frames, the shared one, and the page of roots.
    let frames = spaces * (w - 1) + 1;
    let shape = Shape {
        program: workloads::multi_as()?,
        parameters: vec![
            ("address_spaces", spaces),
            ("window_pages", w),
            ("passes", passes),
        ],
        table_frames: spaces * SpaceBuilder::frames_for(w, vm.layout().levels()),
        data_pages: frames + 1,
    };
    build(vm, workload, params, shape, |v| {
        let base = v.base;
        let shared = v.slice.frame(frames - 1);
        let slice = &v.slice;
        let frame_of = |k: u64, j: u64| {
            if j == w - 1 {
                shared
            } else {
                slice.frame(k * (w - 1) + j)
            }
        };
        let mut roots = Vec::new();
        for k in 0..spaces {
            let root = v.space.fork_identity()?;
            for j in 0..w {
                v.space
                    .map_4k(root, base + j * PAGE_SIZE, frame_of(k, j), DATA_FLAGS)?;
            }
            roots.push(root);
        }
        let roots_at = slice.frame(frames);
        write_words(vm, roots_at, &roots)?;
        let mut memory = HashMap::new();
        for n in 0..frames {
            let frame = slice.frame(n);
            vm.memory().write_obj(preset(frame), GuestAddress(frame))?;
            memory.insert(frame, preset(frame));
        }
        let mut checksum = 0u64;
        for pass in 0..passes {
            for k in 0..spaces {
                for j in 0..w {
                    let slot = memory.entry(frame_of(k, j)).or_insert(0);
                    *slot = workloads::multi_as_value(*slot, pass, k, j);
                    checksum = checksum.wrapping_add(*slot);
                }
            }
        }
        let mut expect = Expect::default();
        expect.reports.push(report(tag::CHECKSUM, checksum));
        let mut words: Vec<_> = memory.into_iter().collect();
        words.sort_unstable();
        for (frame, value) in words {
            expect.memory.push(Word::exact(frame, value));
            if passes > 0 {
                expect.written.insert(frame);
            }
        }
        if passes > 0 {
            // The last space loaded stays the vCPU's context.
            for j in 0..w {
                expect
                    .translations
                    .push((base + j * PAGE_SIZE, frame_of(spaces - 1, j)));
            }
        }
        Ok(VcpuPlan {
            expect,
            roots,
            rounds: vec![VcpuArgs([roots_at, spaces, passes, base, w, 0])],
        })
    })
}
