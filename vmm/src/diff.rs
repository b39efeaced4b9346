//! `mmu-vmm diff`: one workload under two MMU backends, with identical
//! inputs, and every difference the guest could observe.
//!
//! The same guest binary (paravirtual paging calls, so it runs under
//! either backend) and the same workload inputs run once per backend, each
//! in a fresh VM. Then, from each run's [`Observation`]:
//!
//! - the data area, page by page (hashes; page-table frames with A/D
//!   masked);
//! - the guest's page tables reachable from every root the workload used
//!   (hashes with A/D masked), then the A/D bits of every present entry;
//! - each vCPU's outcome, reports (checksums, counts) and fault log
//!   (vector, error code, CR2 of every fault delivered).
//!
//! A run that fails (an error instead of a summary) is a difference too.
//! Both runs' own checks against the host's model are reported beside
//! the comparison.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use mmu_backends::BackendKind;
use mmu_integration::kvm::check_hostable;

use crate::json::{self, Object};
use crate::observe::Observation;
use crate::run::{RunCommandError, RunOptions, RunSummary, reports_text};
use crate::workload::Workload;

/// Differences of one kind listed in full; the rest are counted.
const LISTED_PER_KIND: usize = 16;

/// What `diff` does.
#[derive(Clone, Debug)]
pub struct DiffOptions {
    /// The first backend (`--a`, default shadow).
    pub a: BackendKind,
    /// The second backend (`--b`, default ept).
    pub b: BackendKind,
    /// The run (its `mmu` is replaced by `a`, then `b`).
    pub run: RunOptions,
}

impl Default for DiffOptions {
    fn default() -> Self {
        DiffOptions {
            a: BackendKind::Shadow,
            b: BackendKind::Ept,
            run: RunOptions::default(),
        }
    }
}

/// One thing the guest observed differently under the two backends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Difference {
    /// What differs (`vCPU 1 fault 3`, `A/D of the entry at 0x...`).
    pub what: String,
    /// What it was under backend a.
    pub a: String,
    /// What it was under backend b.
    pub b: String,
}

impl Difference {
    fn new(what: impl Into<String>, a: impl Into<String>, b: impl Into<String>) -> Self {
        Difference {
            what: what.into(),
            a: a.into(),
            b: b.into(),
        }
    }
}

/// One side of a diff: a summary, or why the run failed.
#[derive(Debug)]
pub struct Side {
    /// The backend.
    pub mmu: BackendKind,
    /// The run's summary, or its error as one line.
    pub result: Result<RunSummary, String>,
}

impl Side {
    /// True if the run completed and every check of it held.
    pub fn ok(&self) -> bool {
        self.result.as_ref().is_ok_and(RunSummary::ok)
    }

    fn json(&self) -> String {
        let o = Object::new()
            .str("mmu", &self.mmu.to_string())
            .bool("ok", self.ok());
        match &self.result {
            Ok(s) => {
                let obs = &s.observation;
                o.float("elapsed_s", s.elapsed.as_secs_f64())
                    .str("data_hash", &format!("{:#018x}", obs.data_hash()))
                    .str("tables_hash", &format!("{:#018x}", obs.tables_hash()))
                    .num("table_frames", obs.tables.len() as u64)
                    .num("ad_entries", obs.ad.len() as u64)
                    .num("faults", obs.faults())
                    .raw(
                        "failed_checks",
                        json::array(s.failed_checks().map(|c| json::string(&c.what))),
                    )
                    .counters("backend", s.backend.counters.iter().copied())
                    .finish()
            }
            Err(e) => o.str("error", e).finish(),
        }
    }
}

/// Everything `diff` reports.
#[derive(Debug)]
pub struct DiffSummary {
    /// What was compared.
    pub options: DiffOptions,
    /// The run under `a`.
    pub a: Side,
    /// The run under `b`.
    pub b: Side,
    /// Every difference listed (at most 16 of each kind).
    pub differences: Vec<Difference>,
    /// Differences counted but not listed.
    pub unlisted: u64,
}

impl DiffSummary {
    /// True if the guest observed the same under both backends.
    pub fn identical(&self) -> bool {
        self.differences.is_empty() && self.unlisted == 0
    }

    /// True if the runs were identical and every check of both held: what
    /// the exit code says.
    pub fn ok(&self) -> bool {
        self.identical() && self.a.ok() && self.b.ok()
    }

    /// The summary as lines of text.
    pub fn text(&self) -> String {
        let o = &self.options;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "diff: {} under {} (a) and {} (b), {} vCPUs, {} MiB",
            o.run.workload,
            o.a,
            o.b,
            o.run.vcpus,
            o.run.mem_size >> 20
        );
        for (name, side) in [("a", &self.a), ("b", &self.b)] {
            match &side.result {
                Ok(s) => {
                    let obs = &s.observation;
                    let failed: Vec<&str> = s.failed_checks().map(|c| c.what.as_str()).collect();
                    let _ = writeln!(
                        out,
                        "  {name} ({}): {} in the guest, data hash {:#018x}, tables hash {:#018x}, {} A/D entries, {} faults, {} checks: {}",
                        side.mmu,
                        crate::units::duration(s.elapsed),
                        obs.data_hash(),
                        obs.tables_hash(),
                        obs.ad.len(),
                        obs.faults(),
                        s.checks.len(),
                        if failed.is_empty() {
                            "ok".to_string()
                        } else {
                            format!("FAILED: {}", failed.join(", "))
                        }
                    );
                }
                Err(e) => {
                    let _ = writeln!(out, "  {name} ({}): the run failed: {e}", side.mmu);
                }
            }
        }
        for d in &self.differences {
            let _ = writeln!(out, "  differs: {}: a {}, b {}", d.what, d.a, d.b);
        }
        if self.unlisted > 0 {
            let _ = writeln!(out, "  and {} more differences", self.unlisted);
        }
        let _ = write!(
            out,
            "result: {}",
            if self.identical() {
                "identical"
            } else {
                "DIFFERENT"
            }
        );
        if !(self.a.ok() && self.b.ok()) {
            out.push_str(" (a run's checks FAILED)");
        }
        out
    }

    /// The summary as one JSON object.
    pub fn json(&self) -> String {
        let o = &self.options;
        let differences = self.differences.iter().map(|d| {
            Object::new()
                .str("what", &d.what)
                .str("a", &d.a)
                .str("b", &d.b)
                .finish()
        });
        Object::new()
            .str("workload", o.run.workload.name())
            .str("a", &o.a.to_string())
            .str("b", &o.b.to_string())
            .num("vcpus", o.run.vcpus as u64)
            .num("mem_bytes", o.run.mem_size)
            .num("seed", o.run.params.seed)
            .bool("identical", self.identical())
            .bool("ok", self.ok())
            .raw("differences", json::array(differences))
            .num("unlisted_differences", self.unlisted)
            .raw(
                "runs",
                Object::new()
                    .raw("a", self.a.json())
                    .raw("b", self.b.json())
                    .finish(),
            )
            .finish()
    }
}

/// A chain of an error and its sources, one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}

/// Runs the workload under both backends and compares. Fails before
/// running anything if either backend cannot be hosted; a run that fails
/// later is reported as a difference.
pub fn diff(options: DiffOptions) -> Result<DiffSummary, RunCommandError> {
    let workload = options.run.workload;
    if !workload.deterministic() {
        return Err(RunCommandError::Options(format!(
            "{workload} depends on thread timing, so two runs cannot be compared; diff takes {}",
            Workload::ALL
                .into_iter()
                .filter(|w| w.deterministic())
                .map(Workload::name)
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    for mmu in [options.a, options.b] {
        check_hostable(mmu).map_err(|source| RunCommandError::NotHostable { mmu, source })?;
    }
    let side = |mmu| Side {
        mmu,
        result: crate::run::run(RunOptions {
            mmu,
            ..options.run.clone()
        })
        .map_err(|e| error_chain(&e)),
    };
    let a = side(options.a);
    let b = side(options.b);
    let mut list = Listing::default();
    match (&a.result, &b.result) {
        (Ok(sa), Ok(sb)) => compare(&sa.observation, &sb.observation, &mut list),
        (ra, rb) => {
            let state = |r: &Result<RunSummary, String>| match r {
                Ok(_) => "completed".to_string(),
                Err(e) => format!("failed: {e}"),
            };
            list.push("run", Difference::new("the run", state(ra), state(rb)));
        }
    }
    Ok(DiffSummary {
        options,
        a,
        b,
        differences: list.differences,
        unlisted: list.unlisted,
    })
}

/// Every difference between what the guest observed in two runs (made
/// by [`run`](crate::run::run), with the same workload and inputs): the
/// listed ones (at most 16 of each kind) and how many more were counted.
/// What `diff` reports, for runs a caller made itself.
pub fn differences(a: &Observation, b: &Observation) -> (Vec<Difference>, u64) {
    let mut list = Listing::default();
    compare(a, b, &mut list);
    (list.differences, list.unlisted)
}

/// Differences, at most [`LISTED_PER_KIND`] per kind.
#[derive(Debug, Default)]
struct Listing {
    differences: Vec<Difference>,
    per_kind: std::collections::BTreeMap<&'static str, usize>,
    unlisted: u64,
}

impl Listing {
    fn push(&mut self, kind: &'static str, difference: Difference) {
        let n = self.per_kind.entry(kind).or_insert(0);
        *n += 1;
        if *n <= LISTED_PER_KIND {
            self.differences.push(difference);
        } else {
            self.unlisted += 1;
        }
    }
}

fn present(v: Option<&u64>) -> String {
    v.map_or_else(|| "absent".to_string(), |h| format!("hash {h:#018x}"))
}

/// Every difference between two observations.
fn compare(a: &Observation, b: &Observation, list: &mut Listing) {
    if a.data_base != b.data_base || a.data_pages.len() != b.data_pages.len() {
        list.push(
            "layout",
            Difference::new(
                "the data area",
                format!("{} pages at {:#x}", a.data_pages.len(), a.data_base),
                format!("{} pages at {:#x}", b.data_pages.len(), b.data_base),
            ),
        );
    } else {
        for (i, (ha, hb)) in a.data_pages.iter().zip(&b.data_pages).enumerate() {
            if ha != hb {
                list.push(
                    "data",
                    Difference::new(
                        format!(
                            "the data page at {:#x}",
                            a.data_base + i as u64 * crate::layout::PAGE_SIZE
                        ),
                        format!("hash {ha:#018x}"),
                        format!("hash {hb:#018x}"),
                    ),
                );
            }
        }
    }

    let frames: BTreeSet<u64> = a.tables.keys().chain(b.tables.keys()).copied().collect();
    for frame in frames {
        let (ha, hb) = (a.tables.get(&frame), b.tables.get(&frame));
        if ha != hb {
            list.push(
                "tables",
                Difference::new(
                    format!("the page table at {frame:#x} (A/D masked)"),
                    present(ha),
                    present(hb),
                ),
            );
        }
    }

    let (mut i, mut j) = (0, 0);
    while i < a.ad.len() || j < b.ad.len() {
        let (ea, eb) = (a.ad.get(i), b.ad.get(j));
        match (ea, eb) {
            (Some(x), Some(y)) if x.gpa == y.gpa => {
                if x.bits != y.bits {
                    list.push(
                        "ad",
                        Difference::new(
                            format!("A/D of the level-{} entry at {:#x}", x.level, x.gpa),
                            x.flags(),
                            y.flags(),
                        ),
                    );
                }
                i += 1;
                j += 1;
            }
            (Some(x), y) if y.is_none_or(|y| x.gpa < y.gpa) => {
                list.push(
                    "ad",
                    Difference::new(
                        format!("the level-{} entry at {:#x}", x.level, x.gpa),
                        format!("present, {}", x.flags()),
                        "absent",
                    ),
                );
                i += 1;
            }
            (_, Some(y)) => {
                list.push(
                    "ad",
                    Difference::new(
                        format!("the level-{} entry at {:#x}", y.level, y.gpa),
                        "absent",
                        format!("present, {}", y.flags()),
                    ),
                );
                j += 1;
            }
            _ => break,
        }
    }

    if a.vcpus.len() != b.vcpus.len() {
        list.push(
            "vcpus",
            Difference::new(
                "vCPUs",
                a.vcpus.len().to_string(),
                b.vcpus.len().to_string(),
            ),
        );
    }
    for (n, (va, vb)) in a.vcpus.iter().zip(&b.vcpus).enumerate() {
        if va.outcome != vb.outcome {
            list.push(
                "outcome",
                Difference::new(
                    format!("vCPU {n} outcome"),
                    format!("{:?}", va.outcome),
                    format!("{:?}", vb.outcome),
                ),
            );
        }
        if va.reports != vb.reports {
            list.push(
                "reports",
                Difference::new(
                    format!("vCPU {n} reports"),
                    reports_text(&va.reports),
                    reports_text(&vb.reports),
                ),
            );
        }
        if va.faults.count != vb.faults.count {
            list.push(
                "faults",
                Difference::new(
                    format!("vCPU {n} faults delivered"),
                    va.faults.count.to_string(),
                    vb.faults.count.to_string(),
                ),
            );
        }
        let (fa, fb) = (&va.faults.entries, &vb.faults.entries);
        for k in 0..fa.len().max(fb.len()) {
            let (x, y) = (fa.get(k), fb.get(k));
            if x != y {
                let show = |f: Option<&crate::kit::FaultRecord>| {
                    f.map_or_else(|| "none".to_string(), ToString::to_string)
                };
                list.push(
                    "faults",
                    Difference::new(format!("vCPU {n} fault {k}"), show(x), show(y)),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kit::{FaultLog, FaultRecord};
    use crate::observe::{AdEntry, VcpuObservation};
    use crate::vcpu::{Report, VcpuOutcome};

    fn observation() -> Observation {
        Observation {
            data_base: 0x20_0000,
            data_pages: vec![1, 2, 3],
            tables: [(0x1000, 10), (0x2000, 20)].into_iter().collect(),
            ad: vec![
                AdEntry {
                    gpa: 0x1000,
                    level: 4,
                    bits: 1,
                },
                AdEntry {
                    gpa: 0x2008,
                    level: 1,
                    bits: 3,
                },
            ],
            roots: vec![0x1000],
            vcpus: vec![VcpuObservation {
                outcome: VcpuOutcome::Done { exit_code: 0 },
                reports: vec![Report { tag: 1, value: 5 }],
                faults: FaultLog {
                    count: 1,
                    entries: vec![FaultRecord {
                        vector: 14,
                        error_code: 7,
                        cr2: 0x8000_0000_0000,
                    }],
                },
            }],
        }
    }

    fn differences(a: &Observation, b: &Observation) -> Listing {
        let mut list = Listing::default();
        compare(a, b, &mut list);
        list
    }

    #[test]
    fn identical_observations_have_no_differences() {
        let a = observation();
        assert!(differences(&a, &a.clone()).differences.is_empty());
    }

    #[test]
    fn every_kind_of_difference_is_named() {
        let a = observation();
        let mut b = a.clone();
        b.data_pages[1] = 9;
        b.tables.insert(0x3000, 30);
        b.ad[1].bits = 1;
        b.ad.push(AdEntry {
            gpa: 0x3000,
            level: 1,
            bits: 0,
        });
        b.vcpus[0].reports[0].value = 6;
        b.vcpus[0].faults.entries[0].error_code = 5;
        let list = differences(&a, &b);
        let what: Vec<&str> = list.differences.iter().map(|d| d.what.as_str()).collect();
        assert_eq!(
            what,
            [
                "the data page at 0x201000",
                "the page table at 0x3000 (A/D masked)",
                "A/D of the level-1 entry at 0x2008",
                "the level-1 entry at 0x3000",
                "vCPU 0 reports",
                "vCPU 0 fault 0",
            ]
        );
        let ad = &list.differences[2];
        assert_eq!((ad.a.as_str(), ad.b.as_str()), ("AD", "A-"));
        assert_eq!(list.differences[3].a, "absent");
        let fault = &list.differences[5];
        assert_eq!(fault.a, "#PF error code 0x7 cr2 0x800000000000");
        assert_eq!(fault.b, "#PF error code 0x5 cr2 0x800000000000");
        assert_eq!(list.unlisted, 0);
    }

    #[test]
    fn long_lists_are_cut_per_kind() {
        let a = Observation {
            data_pages: vec![0; 40],
            ..observation()
        };
        let b = Observation {
            data_pages: vec![1; 40],
            ..observation()
        };
        let list = differences(&a, &b);
        assert_eq!(list.differences.len(), LISTED_PER_KIND);
        assert_eq!(list.unlisted, 40 - LISTED_PER_KIND as u64);
    }

    #[test]
    fn summaries_render_as_one_json_object() {
        let summary = crate::run::tests::summary();
        let side = |s: Result<RunSummary, String>| Side {
            mmu: BackendKind::Ept,
            result: s,
        };
        let diff = DiffSummary {
            options: DiffOptions {
                a: BackendKind::Ept,
                b: BackendKind::Ept,
                run: RunOptions::default(),
            },
            a: side(Ok(summary.clone())),
            b: side(Err("the guest run failed".into())),
            differences: vec![Difference::new("the run", "completed", "failed: x")],
            unlisted: 0,
        };
        assert!(!diff.identical());
        assert!(!diff.ok());
        let json = diff.json();
        assert!(
            json.starts_with(
                "{\"workload\": \"touch\", \"a\": \"ept\", \"b\": \"ept\", \"vcpus\": 2"
            ),
            "{json}"
        );
        assert!(json.contains("\"identical\": false"), "{json}");
        assert!(
            json.contains(
                "\"differences\": [{\"what\": \"the run\", \"a\": \"completed\", \"b\": \"failed: x\"}]"
            ),
            "{json}"
        );
        assert!(
            json.contains("\"error\": \"the guest run failed\""),
            "{json}"
        );
        assert_eq!(json.matches('{').count(), json.matches('}').count());
        let text = diff.text();
        assert!(text.contains("b (ept): the run failed"), "{text}");
        assert!(
            text.ends_with("result: DIFFERENT (a run's checks FAILED)"),
            "{text}"
        );

        let same = DiffSummary {
            b: side(Ok(summary)),
            differences: Vec::new(),
            ..diff
        };
        assert!(same.identical() && same.ok());
        assert!(same.json().contains("\"identical\": true, \"ok\": true"));
        assert!(same.text().ends_with("result: identical"));
    }
}
