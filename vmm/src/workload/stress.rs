//! `stress`: each vCPU makes tagged writes and checked reads to `ops`
//! pages (16 by default) of the stress memslot ([`STRESS_SLOT`]) until
//! the host stops it, while a host thread harvests the slot's dirty log
//! and deletes, re-adds and moves it (`passes` cycles, [`STRESS_CYCLES`]
//! by default).
//!
//! Each vCPU maps its pages twice, at the start of its window (the slot
//! at [`STRESS_GPA_A`]) and 1 GiB in (window B: the slot moved to
//! [`STRESS_GPA_B`]), and a control page 2 GiB in, through which the host
//! stops it. Which of its accesses land depends on timing, so the plan
//! expects no reports; the checks (no lost dirty page, no stale read, the
//! backing unmapped at each delete) are [`crate::stress`]'s audit. The
//! plan checks the control page's translation.

use super::{
    DATA_FLAGS, Expect, Params, Plan, PlanError, STRESS_CYCLES, STRESS_GPA_A, STRESS_GPA_B,
    STRESS_SIZE, Shape, SpaceBuilder, VcpuPlan, Workload, build, fill_frame,
};
use crate::kit::workloads;
use crate::layout::PAGE_SIZE;
use crate::vm::{VcpuArgs, Vm};

/// Where window B of `stress` starts in each vCPU's window.
const STRESS_WINDOW_B: u64 = 1 << 30;
/// Where the control page of `stress` is in each vCPU's window.
const STRESS_CONTROL: u64 = 2 << 30;

/// Plans `stress`.
pub(super) fn plan(vm: &Vm, params: &Params) -> Result<Plan, PlanError> {
    let workload = Workload::Stress;
    let pages = params.ops.unwrap_or(16);
    let vcpus = vm.vcpu_count() as u64;
    let slot_pages = STRESS_SIZE / PAGE_SIZE;
    if pages == 0 || pages * vcpus > slot_pages {
        return Err(PlanError::Option {
            workload,
            what: "--ops (pages per vCPU)",
            detail: format!(
                "{pages} x {vcpus} vCPUs is not in 1..={slot_pages} (the stress memslot's pages)"
            ),
        });
    }
    let shape = Shape {
        program: workloads::stress()?,
        parameters: vec![
            ("pages", pages),
            ("cycles", params.passes.unwrap_or(STRESS_CYCLES)),
        ],
        // Windows A and B and the control page sit in three 1 GiB regions.
        table_frames: 3 * SpaceBuilder::frames_for(pages, vm.layout().levels()),
        data_pages: 1,
    };
    let mut controls = Vec::new();
    let mut plan = build(vm, workload, params, shape, |v| {
        let root = v.space.fork_identity()?;
        let base = v.base;
        let first = v.index as u64 * pages * PAGE_SIZE;
        for p in 0..pages {
            let offset = first + p * PAGE_SIZE;
            v.space.map_4k(
                root,
                base + p * PAGE_SIZE,
                STRESS_GPA_A + offset,
                DATA_FLAGS,
            )?;
            v.space.map_4k(
                root,
                base + STRESS_WINDOW_B + p * PAGE_SIZE,
                STRESS_GPA_B + offset,
                DATA_FLAGS,
            )?;
        }
        let control = v.slice.frame(0);
        v.space
            .map_4k(root, base + STRESS_CONTROL, control, DATA_FLAGS)?;
        fill_frame(vm, control, |_| 0)?;
        controls.push(control);
        Ok(VcpuPlan {
            expect: Expect {
                translations: vec![(base + STRESS_CONTROL, control)],
                ..Expect::default()
            },
            roots: vec![root],
            rounds: vec![VcpuArgs([
                root,
                base + STRESS_CONTROL,
                base,
                base + STRESS_WINDOW_B,
                pages,
                0,
            ])],
        })
    })?;
    plan.stress = Some((controls, pages));
    Ok(plan)
}
