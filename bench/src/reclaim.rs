//! `reclaim`: shadow reclaim at a page limit on the soft vCPU (no KVM). The shadow
//! backend runs on `mmu_shadow::soft::SoftVcpu` with a 64-page limit; the
//! guest's working set needs 86 shadow pages, so every round reclaims.
//! The timeline records, after each page table's pages are read, the
//! faults so far (guest page references the MMU had to serve again) and
//! the shadow pages zapped so far, leaves and directories.
//!
//! A zapped directory page was in use by construction: every page table
//! under it is visited each round, and zapping it unlinks every child. So
//! `zapped_directories` counts in-use pages zapped.

use mmu_api::{AccessMode, Gpa, Gva, MemslotFlags, MmuBackend, SlotId, VcpuId};
use mmu_backends::shadow::soft::{SoftOutcome, SoftVcpu};
use mmu_backends::shadow::{ReclaimPolicy, ShadowBackend, ShadowConfig};

use super::BenchError;
use super::guest::{GUEST_MAXPHYADDR, GuestBuilder};
use super::slots::{RAM_HPA, add_slot};
use mmu_vmm::json::{self, Object};

/// The page limit of the reclaim bench.
pub const PAGE_LIMIT: u64 = 64;

/// Page directories of the guest (one per GiB of guest-virtual space).
const PDS: u64 = 4;
/// Page tables per directory.
const PTS_PER_PD: u64 = 20;
/// Pages mapped per page table (in different prefetch groups).
const PAGES_PER_PT: u64 = 4;

/// One point of a [`ReclaimTimeline`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReclaimPoint {
    /// Guest reads so far.
    pub accesses: u64,
    /// Faults the MMU served so far.
    pub faults: u64,
    /// Shadow pages zapped by reclaim so far.
    pub zapped: u64,
    /// Of which directory (non-leaf) pages.
    pub zapped_directories: u64,
    /// Shadow pages in use now (up to the limit, down after each reclaim).
    pub in_use: u64,
}

/// Faults and zaps over time under one reclaim policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReclaimTimeline {
    /// The policy's name (`fifo`, `parent-aware`).
    pub config: String,
    /// The points, one per page-table visit.
    pub points: Vec<ReclaimPoint>,
}

impl ReclaimTimeline {
    /// The last point.
    pub fn last(&self) -> ReclaimPoint {
        self.points.last().copied().unwrap_or_default()
    }

    pub(crate) fn json(&self) -> String {
        let points = self.points.iter().map(|p| {
            json::array([
                p.accesses.to_string(),
                p.faults.to_string(),
                p.zapped.to_string(),
                p.zapped_directories.to_string(),
                p.in_use.to_string(),
            ])
        });
        Object::new()
            .str("config", &self.config)
            .str(
                "columns",
                "accesses faults zapped zapped_directories in_use",
            )
            .raw("points", json::array(points))
            .finish()
    }
}

/// xorshift64: a fixed, dependency-free pseudo-random order.
fn shuffled_orders(tables: &[Gva], rounds: usize, seed: u64) -> Vec<Vec<Gva>> {
    let mut state = seed | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (0..rounds)
        .map(|_| {
            let mut order = tables.to_vec();
            for i in (1..order.len()).rev() {
                order.swap(i, (next() % (i as u64 + 1)) as usize);
            }
            order
        })
        .collect()
}

/// Runs `rounds` rounds of the reclaim workload (each page table visited
/// once per round, in a fresh pseudo-random order from `seed`, the same
/// for every policy) under `policy` at a [`PAGE_LIMIT`]-page limit.
pub fn reclaim_timeline(
    name: &str,
    policy: ReclaimPolicy,
    rounds: usize,
    seed: u64,
) -> Result<ReclaimTimeline, BenchError> {
    let soft = |e: &dyn std::fmt::Display| BenchError::Soft(e.to_string());
    let tables = 2 + PDS + PDS * PTS_PER_PD;
    let data = PDS * PTS_PER_PD * PAGES_PER_PT;
    let mut b = GuestBuilder::new(tables, data).map_err(|e| soft(&e))?;
    let mut pts = Vec::new();
    let mut page = 0;
    for pd in 0..PDS {
        for pt in 0..PTS_PER_PD {
            let base = Gva((pd << 30) | (pt << 21));
            for p in 0..PAGES_PER_PT {
                let gpa = b.data_gpa(page);
                page += 1;
                b.map(Gva(base.raw() | ((8 * p) << 12)), gpa);
            }
            pts.push(base);
        }
    }
    let guest = b.finish();
    let backend = ShadowBackend::new({
        let mut m = ShadowConfig::default();
        m.pool_pages = 256;
        m.pool_hpa = mmu_api::Hpa(1 << 40);
        m.gpa_width = GUEST_MAXPHYADDR;
        m.page_limit = Some(PAGE_LIMIT);
        m.reclaim = policy;
        m
    })
    .map_err(|e| soft(&e))?;
    let memory = guest.memory();
    let ram = memory.memslot(
        SlotId(0),
        Gpa(0),
        0,
        memory.pages(),
        RAM_HPA,
        MemslotFlags::empty(),
    );
    add_slot(&backend, memory, ram).map_err(|e| soft(&e))?;
    let mut cpu = SoftVcpu::new(&backend, VcpuId(0)).map_err(|e| soft(&e))?;
    cpu.load_context(&guest.context()).map_err(|e| soft(&e))?;
    let stat = |name: &str| backend.stats().get(name).unwrap_or(0);
    let mut points = Vec::new();
    let mut accesses = 0;
    for order in shuffled_orders(&pts, rounds, seed) {
        for base in order {
            for p in 0..PAGES_PER_PT {
                let out = cpu
                    .read(Gva(base.raw() | ((8 * p) << 12)), 8, AccessMode::User)
                    .map_err(|e| soft(&e))?;
                if !matches!(out, SoftOutcome::Done(_)) {
                    return Err(BenchError::Soft(format!(
                        "a read of a mapped page ended {out:?}"
                    )));
                }
                accesses += 1;
            }
            let leaves = stat("reclaimed_leaf_pages");
            let directories = stat("reclaimed_directory_pages");
            points.push(ReclaimPoint {
                accesses,
                faults: stat("faults"),
                zapped: leaves + directories,
                zapped_directories: directories,
                in_use: stat("sps_in_use"),
            });
        }
    }
    backend.audit().map_err(|e| soft(&e))?;
    drop(cpu);
    Ok(ReclaimTimeline {
        config: name.to_string(),
        points,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_policies_reclaim_at_the_limit_and_count_consistently() {
        for (name, policy) in super::super::Configuration::reclaim() {
            let t = reclaim_timeline(name, policy, 3, 7).unwrap();
            assert_eq!(t.points.len(), 3 * (PDS * PTS_PER_PD) as usize);
            let last = t.last();
            assert_eq!(last.accesses, 3 * PDS * PTS_PER_PD * PAGES_PER_PT);
            // 86 shadow pages do not fit in 64: something was zapped.
            assert!(last.zapped > 0, "{name}: {last:?}");
            assert!(last.zapped_directories <= last.zapped);
            // Reclaim keeps the shadow pages near the limit, and frees some.
            let most = t.points.iter().map(|p| p.in_use).max().unwrap();
            assert!(
                (PAGE_LIMIT - 8..=PAGE_LIMIT + 8).contains(&most),
                "{name}: {most}"
            );
            assert!(t.points.windows(2).any(|w| w[1].in_use < w[0].in_use));
            assert!(
                t.points
                    .windows(2)
                    .all(|w| w[0].faults <= w[1].faults && w[0].zapped <= w[1].zapped)
            );
            let json = t.json();
            assert!(json.starts_with(&format!("{{\"config\": \"{name}\", \"columns\"")));
        }
    }
}
