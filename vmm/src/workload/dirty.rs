//! `dirty`: each vCPU makes `ops` 8-byte writes (65536 by default) at
//! LCG-random places of its window from CPL3, and reports the wrapping sum
//! of the values written.
//!
//! The window maps the whole data part of the vCPU's slice. The model
//! replays the same LCG: it checks the checksum, the last value written
//! to every word, that the dirty log has every page written, and the
//! backend's translation of every window page.

use std::collections::HashMap;

use super::{
    Expect, Params, Plan, PlanError, Shape, Slice, SpaceBuilder, VcpuPlan, Word, Workload, build,
    report,
};
use crate::kit::abi::tag;
use crate::kit::workloads::{self, Lcg};
use crate::layout::PAGE_SIZE;
use crate::vm::{VcpuArgs, Vm};

/// Plans `dirty`.
pub(super) fn plan(vm: &Vm, params: &Params) -> Result<Plan, PlanError> {
    let writes = params.ops.unwrap_or(65536);
    let slice_pages = Slice::pages_after(vm, 0);
    let tables = SpaceBuilder::frames_for(slice_pages, vm.layout().levels());
    let pages = slice_pages.saturating_sub(tables).min(u64::from(u32::MAX));
    let shape = Shape {
        program: workloads::dirty()?,
        parameters: vec![("pages", pages), ("writes", writes)],
        table_frames: tables,
        data_pages: pages,
    };
    build(vm, Workload::Dirty, params, shape, |v| {
        let root = v.space.fork_identity()?;
        v.map_window(root, pages)?;
        let mut lcg = Lcg(v.seed);
        let mut last = HashMap::new();
        let mut checksum = 0u64;
        let mut expect = Expect::default();
        for _ in 0..writes {
            let x = lcg.next_value();
            let (page, offset) = workloads::dirty_target(x, pages);
            let frame = v.slice.frame(page);
            last.insert(frame + offset, x);
            expect.written.insert(frame);
            checksum = checksum.wrapping_add(x);
        }
        let mut words: Vec<_> = last.into_iter().collect();
        words.sort_unstable();
        expect.memory = words.into_iter().map(|(g, v)| Word::exact(g, v)).collect();
        expect.reports.push(report(tag::CHECKSUM, checksum));
        expect.translations = (0..pages)
            .map(|p| (v.base + p * PAGE_SIZE, v.slice.frame(p)))
            .collect();
        Ok(VcpuPlan {
            expect,
            roots: vec![root],
            rounds: vec![VcpuArgs([root, v.base, pages, writes, v.seed, 0])],
        })
    })
}
