//! `touch` and `churn`: each vCPU reads or writes the first quadword of
//! every 4 KiB page of its window, `passes` times, from CPL3, and reports
//! the wrapping sum.
//!
//! The window maps the whole data part of the vCPU's slice, one page to
//! one frame. `touch` reads (the host presets each page with [`preset`])
//! or writes (`gva ^ seed`); `churn` always writes, 10 passes by default,
//! while `run` deletes and re-adds [`CHURN_SLOT`](super::CHURN_SLOT) on a
//! host thread. The model checks the checksum, the first word of every
//! page, the dirty log (every page, when writing) and the backend's
//! translation of every window page.

use vm_memory::{Bytes, GuestAddress};

use super::{
    Expect, Params, Plan, PlanError, Shape, SpaceBuilder, VcpuPlan, Word, Workload, build, preset,
    report,
};
use crate::kit::abi::tag;
use crate::kit::workloads::{self, TouchKind};
use crate::layout::PAGE_SIZE;
use crate::vm::{VcpuArgs, Vm};

/// Plans `touch` (with `kind`) or `churn` (`workload`, writes).
pub(super) fn plan(
    vm: &Vm,
    workload: Workload,
    params: &Params,
    kind: TouchKind,
) -> Result<Plan, PlanError> {
    let default_passes = if workload == Workload::Churn { 10 } else { 1 };
    let passes = params.passes.unwrap_or(default_passes);
    let slice_pages = super::Slice::pages_after(vm, 0);
    let tables = SpaceBuilder::frames_for(slice_pages, vm.layout().levels());
    let pages = slice_pages.saturating_sub(tables);
    let shape = Shape {
        program: workloads::touch(kind)?,
        parameters: vec![("pages", pages), ("passes", passes)],
        table_frames: tables,
        data_pages: pages,
    };
    build(vm, workload, params, shape, |v| {
        let root = v.space.fork_identity()?;
        v.map_window(root, pages)?;
        let mut expect = Expect::default();
        for p in 0..pages {
            let gva = v.base + p * PAGE_SIZE;
            let frame = v.slice.frame(p);
            let value = match kind {
                TouchKind::Read => {
                    vm.memory().write_obj(preset(gva), GuestAddress(frame))?;
                    preset(gva)
                }
                TouchKind::Write => {
                    if passes > 0 {
                        expect.written.insert(frame);
                    }
                    gva ^ v.seed
                }
            };
            if passes > 0 || kind == TouchKind::Read {
                expect.memory.push(Word::exact(frame, value));
            }
            expect.translations.push((gva, frame));
        }
        let checksum = workloads::touch_checksum(kind, v.base, pages, passes, v.seed, preset);
        expect.reports.push(report(tag::CHECKSUM, checksum));
        Ok(VcpuPlan {
            expect,
            roots: vec![root],
            rounds: vec![VcpuArgs([v.base, pages, passes, v.seed, root, 0])],
        })
    })
}
