//! Pure-MMU microbenches: no KVM. The shadow backend runs on its soft vCPU
//! (which walks the shadow tables as hardware would and exits to the MMU on
//! a #PF); the EPT backend runs on the in-process hypervisor.
//!
//! Every group puts the configurations it compares side by side, measured
//! in the same run. No group asserts anything about time. After the
//! criterion output, a table gives the backend counters of one pass of each
//! benchmark (faults, prefetched SPTEs, shadow pages allocated, pages
//! reclaimed, ...), which explain the times.
//!
//! How to run and read them: `docs/benches-pure-mmu.md`.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

use benches::ept::EptRig;
use benches::shadow::{ShadowRig, config};
use benches::slots::{MMIO_GPA, add_slot};
use benches::{Guest, GuestBuilder, GuestMemory};
use criterion::{BatchSize, BenchmarkId, Criterion, SamplingMode, Throughput};
use mmu_api::{AccessMode, VcpuId};
use mmu_api::{Gpa, Gva, Hpa, MemslotFlags, MmioClass, MmuBackend, PAGE_SIZE, SlotId};
use mmu_ept::EptConfig;
use mmu_shadow::soft::{SoftOutcome, SoftVcpu};
use mmu_shadow::{ReclaimPolicy, ShadowBackend, ShadowConfig, ZapMode};

/// 4 KiB pages in one MiB.
const MIB: u64 = 256;

/// Backend counters of one pass of each benchmark, by benchmark id.
static COUNTERS: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

/// A benchmark id, and its full name for the counters table.
fn bench_id(
    group: &str,
    function: &str,
    parameter: impl std::fmt::Display,
) -> (BenchmarkId, String) {
    let name = format!("{group}/{function}/{parameter}");
    (BenchmarkId::new(function, parameter), name)
}

/// Keeps `line` for the counters table printed at the end.
fn record(id: &str, line: String) {
    let id = id.to_owned();
    COUNTERS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((id, line));
}

/// True the first time it is called on `flag`.
fn first(flag: &mut bool) -> bool {
    std::mem::replace(flag, false)
}

/// A guest with `pages` data pages mapped linearly at guest-virtual 0,
/// built once per size and shared by every bench (the backends never write
/// it: its A and D bits are already set).
fn linear_guest(pages: u64) -> Guest {
    static CACHE: Mutex<BTreeMap<u64, Guest>> = Mutex::new(BTreeMap::new());
    *CACHE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(pages)
        .or_insert_with(|| Guest::linear(pages).expect("guest memory"))
}

/// A pool with room for two full shadows of `pages` pages (a fast zap
/// leaves the old one pending while the new one is built).
fn pool_for(pages: u64) -> u32 {
    u32::try_from(2 * pages.div_ceil(512) + 64).expect("pool size")
}

/// A fresh shadow backend on `guest` after a first touch of all `pages`.
fn populated(guest: &Guest, pages: u64, cfg: ShadowConfig) -> ShadowRig {
    let mut rig = ShadowRig::new(guest, cfg);
    rig.touch(Gva(0), pages);
    rig
}

/// First touch of N pages: every page faults into the shadow MMU once
/// (prefetch off) or once per group of 8 whose guest PTEs are accessed
/// (prefetch 8, KVM's default), on a fresh backend each iteration.
fn fault_first_touch(c: &mut Criterion) {
    const GROUP: &str = "shadow_fault_first_touch";
    let mut g = c.benchmark_group(GROUP);
    g.sample_size(20);
    for pages in [2 * MIB, 32 * MIB] {
        g.throughput(Throughput::Elements(pages));
        for (name, prefetch) in [("prefetch_off", 0), ("prefetch_8", 8)] {
            let (id, full) = bench_id(GROUP, name, pages);
            let cfg = {
                let mut m = config(pool_for(pages));
                m.prefetch = prefetch;
                m
            };
            let mut once = true;
            g.bench_function(id, |b| {
                let guest = linear_guest(pages);
                if first(&mut once) {
                    let rig = populated(&guest, pages, cfg.clone());
                    let line = rig.stats_line(&["faults", "prefetched_sptes", "sps_allocated"]);
                    record(&full, line);
                }
                b.iter_batched(
                    || ShadowRig::new(&guest, cfg.clone()),
                    |mut rig| {
                        rig.touch(Gva(0), pages);
                        rig
                    },
                    BatchSize::PerIteration,
                );
            });
        }
    }
    g.finish();
}

/// Zap-all against a populated shadow: the fast zap (a
/// generation bump and the reload handshake), a second fast zap right after
/// it, the obsolete pages they leave being reclaimed later
/// (`reclaim_obsolete`, the deferred half), and the naive zap (every page
/// zapped under the lock), at three populated sizes.
fn zap_all(c: &mut Criterion) {
    const GROUP: &str = "shadow_zap_all";
    let mut g = c.benchmark_group(GROUP);
    // Every iteration needs a freshly populated backend: few, expensive
    // iterations.
    g.sample_size(10).sampling_mode(SamplingMode::Flat);
    for mib in [8, 64, 512] {
        let pages = mib * MIB;
        let fast = config(pool_for(pages));
        let naive = {
            let mut m = fast.clone();
            m.zap = ZapMode::Naive;
            m
        };

        let (id, full) = bench_id(GROUP, "fast", format!("{mib}MiB"));
        let mut once = true;
        g.bench_function(id, |b| {
            let guest = linear_guest(pages);
            if first(&mut once) {
                let rig = populated(&guest, pages, fast.clone());
                let before = rig.stats_line(&["sps_in_use"]);
                rig.backend.zap_all();
                let after = rig.stats_line(&["fast_zaps", "obsolete_pending", "sps_freed"]);
                record(&full, format!("{before} -> {after}"));
            }
            b.iter_batched(
                || populated(&guest, pages, fast.clone()),
                |rig| {
                    rig.backend.zap_all();
                    rig
                },
                BatchSize::PerIteration,
            );
        });

        // The same O(1) work right after a first fast zap, with the
        // backend's state already in cache: separates the zap's own cost
        // from the cache misses a large populate leaves behind.
        let (id, full) = bench_id(GROUP, "fast_again", format!("{mib}MiB"));
        let mut once = true;
        g.bench_function(id, |b| {
            let guest = linear_guest(pages);
            let zapped = || {
                let rig = populated(&guest, pages, fast.clone());
                rig.backend.zap_all();
                rig
            };
            if first(&mut once) {
                let rig = zapped();
                rig.backend.zap_all();
                let after = rig.stats_line(&["fast_zaps", "obsolete_pending"]);
                record(&full, after);
            }
            b.iter_batched(
                zapped,
                |rig| {
                    rig.backend.zap_all();
                    rig
                },
                BatchSize::PerIteration,
            );
        });

        let (id, full) = bench_id(GROUP, "fast_reclaim_obsolete", format!("{mib}MiB"));
        let mut once = true;
        g.bench_function(id, |b| {
            let guest = linear_guest(pages);
            let zapped = || {
                let rig = populated(&guest, pages, fast.clone());
                rig.backend.zap_all();
                rig
            };
            if first(&mut once) {
                let rig = zapped();
                let n = rig.backend.reclaim_obsolete();
                let after = rig.stats_line(&["obsolete_pending", "obsolete_freed"]);
                record(&full, format!("reclaimed={n} {after}"));
            }
            b.iter_batched(
                zapped,
                |rig| {
                    black_box(rig.backend.reclaim_obsolete());
                    rig
                },
                BatchSize::PerIteration,
            );
        });

        let (id, full) = bench_id(GROUP, "naive", format!("{mib}MiB"));
        let mut once = true;
        g.bench_function(id, |b| {
            let guest = linear_guest(pages);
            if first(&mut once) {
                let rig = populated(&guest, pages, naive.clone());
                let before = rig.stats_line(&["sps_in_use"]);
                rig.backend.zap_all();
                let after = rig.stats_line(&["naive_zaps", "sps_in_use", "sps_freed"]);
                record(&full, format!("{before} -> {after}"));
            }
            b.iter_batched(
                || populated(&guest, pages, naive.clone()),
                |rig| {
                    rig.backend.zap_all();
                    rig
                },
                BatchSize::PerIteration,
            );
        });
    }
    g.finish();
}

/// Re-touch of 32 MiB after the shadow is gone: the rebuild cost. The
/// baseline `no_zap` only flushes the soft vCPU's TLB (no MMU work: the
/// soft vCPU re-walks the intact shadow tables), so the other rows minus it
/// are the MMU's rebuild. `fast_zap_at_limit` runs under a page limit just
/// above the populated size, so the rebuild must take the zapped-obsolete
/// pages first.
fn retouch_after_zap(c: &mut Criterion) {
    const GROUP: &str = "shadow_retouch_after_zap";
    let pages = 32 * MIB;
    let mut g = c.benchmark_group(GROUP);
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .throughput(Throughput::Elements(pages));
    let fast = config(pool_for(pages));
    // 16 page tables, a PD, a PDPT and the root; room for the headroom a
    // fault asks for, not for a second shadow.
    let at_limit = {
        let mut m = fast.clone();
        m.page_limit = Some(24);
        m
    };
    let naive = {
        let mut m = fast.clone();
        m.zap = ZapMode::Naive;
        m
    };
    #[derive(Clone, Copy)]
    enum Before {
        Flush,
        Zap,
        ZapReclaim,
    }
    let cases = [
        ("no_zap", fast.clone(), Before::Flush),
        ("fast_zap", fast.clone(), Before::Zap),
        ("fast_zap_reclaimed", fast.clone(), Before::ZapReclaim),
        ("fast_zap_at_limit", at_limit, Before::Zap),
        ("naive_zap", naive, Before::Zap),
    ];
    for (name, cfg, before) in cases {
        let (id, full) = bench_id(GROUP, name, pages);
        let guest = linear_guest(pages);
        let setup = || {
            let mut rig = populated(&guest, pages, cfg.clone());
            match before {
                Before::Flush => rig.cpu.flush(),
                Before::Zap => rig.backend.zap_all(),
                Before::ZapReclaim => {
                    rig.backend.zap_all();
                    rig.backend.reclaim_obsolete();
                }
            }
            rig
        };
        let mut once = true;
        g.bench_function(id, |b| {
            if first(&mut once) {
                let mut rig = setup();
                let faults = rig.stat("faults");
                let allocated = rig.stat("sps_allocated");
                rig.touch(Gva(0), pages);
                let line = format!(
                    "retouch_faults={} retouch_sps_allocated={} {}",
                    rig.stat("faults") - faults,
                    rig.stat("sps_allocated") - allocated,
                    rig.stats_line(&["obsolete_reused", "reclaimed_valid"])
                );
                record(&full, line);
            }
            b.iter_batched(
                setup,
                |mut rig| {
                    rig.touch(Gva(0), pages);
                    rig
                },
                BatchSize::PerIteration,
            );
        });
    }
    g.finish();
}

/// Shadow page lookup: 511 faults, each on a guest PDE not yet shadowed.
/// `hit`: every PDE points at the same guest page table, whose shadow page
/// exists, so each fault finds it in the hash and links it. `miss`: each
/// PDE has its own page table, so each fault allocates a shadow page (and
/// installs its leaf) from pool frames that were used before;
/// `miss_cold_pool`: the same from frames never touched, so each
/// allocation also pays the host's first-touch page fault on the pool
/// mapping. No prefetch.
fn sp_lookup(c: &mut Criterion) {
    const GROUP: &str = "shadow_sp_lookup";
    const FAULTS: u64 = 511;
    let build = |shared: bool| {
        let mut b = GuestBuilder::new(4 + if shared { 0 } else { 512 }, 512).expect("guest");
        let pd = b.table_for(Gva(0), 2);
        let shared_pt = b.table();
        for i in 0..512u64 {
            let pt = if shared { shared_pt } else { b.table() };
            b.set_entry(pd, i as usize, pt.raw() | benches::guest::TABLE_FLAGS);
            let page = if shared { 0 } else { i };
            let gpa = b.data_gpa(page);
            b.set_entry(pt, 0, gpa.raw() | benches::guest::LEAF_FLAGS);
        }
        b.finish()
    };
    let mut g = c.benchmark_group(GROUP);
    g.throughput(Throughput::Elements(FAULTS));
    let run = |rig: &mut ShadowRig| {
        for i in 1..=FAULTS {
            let out = rig.read(Gva(i << 21));
            assert!(matches!(out, SoftOutcome::Done(_)), "{out:?}");
        }
    };
    let cases = [
        ("hit", true, false),
        ("miss", false, true),
        ("miss_cold_pool", false, false),
    ];
    for (name, shared, warm_pool) in cases {
        let guest = build(shared);
        let cfg = {
            let mut m = config(1024);
            m.prefetch = 0;
            m
        };
        let setup = || {
            let mut rig = ShadowRig::new(&guest, cfg.clone());
            if warm_pool {
                // Use the frames once and give them back: the pool's free
                // list hands the most recently freed frames out first.
                rig.touch(Gva(0), 1);
                run(&mut rig);
                rig.backend.zap_all();
                rig.backend.reclaim_obsolete();
            }
            rig.touch(Gva(0), 1);
            rig
        };
        let (id, full) = bench_id(GROUP, name, FAULTS);
        let mut once = true;
        g.bench_function(id, |b| {
            if first(&mut once) {
                let mut rig = setup();
                let faults = rig.stat("faults");
                let allocated = rig.stat("sps_allocated");
                run(&mut rig);
                let line = format!(
                    "faults={} sps_allocated={}",
                    rig.stat("faults") - faults,
                    rig.stat("sps_allocated") - allocated
                );
                record(&full, line);
            }
            b.iter_batched(
                setup,
                |mut rig| {
                    run(&mut rig);
                    rig
                },
                BatchSize::PerIteration,
            );
        });
    }
    g.finish();
}

/// Guest-virtual address the MMIO benches' guest maps to [`MMIO_GPA`].
const MMIO_GVA: Gva = Gva(0x20_0000);

/// Repeated MMIO reads of one device page through the shadow MMU: with
/// MMIO caching each read after the first is a reserved-bit fault on the
/// MMIO SPTE, answered with no guest walk and no memslot search;
/// without it every read takes the full fault path. With 1 and 512
/// memslots.
fn shadow_mmio(c: &mut Criterion) {
    const GROUP: &str = "shadow_mmio_repeat";
    let mut b = GuestBuilder::new(5, 1).expect("guest");
    let data = b.data_gpa(0);
    b.map(Gva(0), data);
    b.map(MMIO_GVA, MMIO_GPA);
    let guest = b.finish();
    let mut g = c.benchmark_group(GROUP);
    for slots in [1u32, 512] {
        for (name, caching) in [("caching_on", true), ("caching_off", false)] {
            let (id, full) = bench_id(GROUP, name, format!("{slots}slots"));
            let cfg = {
                let mut m = config(64);
                m.mmio_caching = caching;
                m
            };
            let mut rig = None;
            g.bench_function(id, |b| {
                let rig = rig.get_or_insert_with(|| {
                    let mut rig = ShadowRig::with_slots(&guest, cfg.clone(), slots);
                    // The first access makes the MMIO SPTE (when caching).
                    assert_eq!(rig.read(MMIO_GVA), SoftOutcome::Mmio(MMIO_GPA));
                    let before = rig.stats_line(&["faults", "faults_mmio", "mmio_fast_hits"]);
                    for _ in 0..100 {
                        assert_eq!(rig.read(MMIO_GVA), SoftOutcome::Mmio(MMIO_GPA));
                    }
                    let after = rig.stats_line(&["faults", "faults_mmio", "mmio_fast_hits"]);
                    record(&full, format!("100 reads: {before} -> {after}"));
                    rig
                });
                b.iter(|| rig.read(MMIO_GVA));
            });
        }
    }
    g.finish();
}

/// The EPT backend's MMIO classification of repeated exits to one device
/// page, with its per-vCPU cache on and off, with 1 and 512 memslots.
fn ept_mmio(c: &mut Criterion) {
    const GROUP: &str = "ept_mmio_classify";
    let mut g = c.benchmark_group(GROUP);
    for slots in [1u32, 512] {
        for (name, cache) in [("cache_on", true), ("cache_off", false)] {
            let (id, full) = bench_id(GROUP, name, format!("{slots}slots"));
            let cfg = EptConfig::default().with_mmio_cache(cache);
            let mut rig = None;
            g.bench_function(id, |b| {
                let rig = rig.get_or_insert_with(|| {
                    let mut rig = EptRig::new(cfg.clone(), slots);
                    assert_eq!(rig.backend.memslots().len(), slots as usize);
                    for _ in 0..100 {
                        assert_eq!(rig.vcpu.classify_mmio(MMIO_GPA, true), MmioClass::Mmio);
                    }
                    let line = format!(
                        "100 exits: mmio_cache_hits={} mmio_cache_misses={}",
                        rig.stat("mmio_cache_hits"),
                        rig.stat("mmio_cache_misses")
                    );
                    record(&full, line);
                    rig
                });
                b.iter(|| rig.vcpu.classify_mmio(black_box(MMIO_GPA), true));
            });
        }
    }
    g.finish();
}

/// The reclaim workload's guest: 4 page directories (one per GiB of
/// guest-virtual space) with 20 page tables each, 4 pages mapped per page
/// table (in different prefetch groups). Its shadow is 86 pages (root,
/// PDPT, 4 PDs, 80 PTs): more than the 64-page limit.
///
/// A round visits every page table once and reads its 4 pages. `cyclic`
/// visits them in the same order every round (the worst case for any
/// oldest-first policy); `shuffled` in a fresh pseudo-random order per
/// round (the same orders for every policy).
struct ReclaimWorkload {
    guest: Guest,
    /// Per round, the page tables' first guest-virtual addresses in the
    /// order they are visited.
    rounds: Vec<Vec<Gva>>,
}

impl ReclaimWorkload {
    const PDS: u64 = 4;
    const PTS_PER_PD: u64 = 20;
    const PAGES_PER_PT: u64 = 4;
    const ROUNDS: usize = 10;

    fn guest() -> (Guest, Vec<Gva>) {
        let tables = 2 + Self::PDS + Self::PDS * Self::PTS_PER_PD;
        let data = Self::PDS * Self::PTS_PER_PD * Self::PAGES_PER_PT;
        let mut b = GuestBuilder::new(tables, data).expect("guest");
        let mut pts = Vec::new();
        let mut page = 0;
        for pd in 0..Self::PDS {
            for pt in 0..Self::PTS_PER_PD {
                let base = Gva((pd << 30) | (pt << 21));
                for p in 0..Self::PAGES_PER_PT {
                    let gpa = b.data_gpa(page);
                    page += 1;
                    b.map(Self::page(base, p), gpa);
                }
                pts.push(base);
            }
        }
        (b.finish(), pts)
    }

    /// Page `p` of the page table mapping from `base`.
    fn page(base: Gva, p: u64) -> Gva {
        Gva(base.raw() | ((8 * p) << 12))
    }

    fn new(guest: Guest, pts: &[Gva], shuffled: bool) -> Self {
        // xorshift64: a fixed, dependency-free pseudo-random order.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let rounds = (0..Self::ROUNDS)
            .map(|_| {
                let mut order = pts.to_vec();
                if shuffled {
                    for i in (1..order.len()).rev() {
                        order.swap(i, (next() % (i as u64 + 1)) as usize);
                    }
                }
                order
            })
            .collect();
        ReclaimWorkload { guest, rounds }
    }

    fn round(&self, rig: &mut ShadowRig, round: usize) {
        for &base in &self.rounds[round] {
            for p in 0..Self::PAGES_PER_PT {
                let out = rig.read(Self::page(base, p));
                assert!(matches!(out, SoftOutcome::Done(_)), "{out:?}");
            }
        }
    }

    fn run(&self, rig: &mut ShadowRig) {
        for r in 0..Self::ROUNDS {
            self.round(rig, r);
        }
    }
}

/// Reclaim at a 64-page limit: FIFO (KVM) against parent-aware
/// (a new child makes its parents young; leaves go before directories), and
/// no limit as the floor, for both access orders. Time is per 10 rounds on
/// a fresh backend; the counters table shows the pages each policy
/// reclaimed (leaves, directories), the shadow pages it had to build again,
/// and the faults that cost.
fn reclaim(c: &mut Criterion) {
    const GROUP: &str = "shadow_reclaim_limit64";
    let (guest, pts) = ReclaimWorkload::guest();
    let mut g = c.benchmark_group(GROUP);
    g.sample_size(20);
    let limited = |policy| {
        let mut m = config(256);
        m.page_limit = Some(64);
        m.reclaim = policy;
        m
    };
    for (order, shuffled) in [("cyclic", false), ("shuffled", true)] {
        let w = ReclaimWorkload::new(guest, &pts, shuffled);
        let cases = [
            ("fifo", limited(ReclaimPolicy::Fifo)),
            ("parent_aware", limited(ReclaimPolicy::ParentAware)),
            ("no_limit", config(256)),
        ];
        for (name, cfg) in cases {
            let (id, full) = bench_id(GROUP, name, order);
            let mut once = true;
            g.bench_function(id, |b| {
                if first(&mut once) {
                    let mut rig = ShadowRig::new(&w.guest, cfg.clone());
                    let mut last = 0;
                    for r in 0..ReclaimWorkload::ROUNDS {
                        last = rig.stat("faults");
                        w.round(&mut rig, r);
                    }
                    let line = format!(
                        "{} last_round_faults={}",
                        rig.stats_line(&[
                            "faults",
                            "sps_allocated",
                            "reclaimed_leaf_pages",
                            "reclaimed_directory_pages",
                        ]),
                        rig.stat("faults") - last
                    );
                    record(&full, line);
                    rig.backend.audit().expect("audit");
                }
                b.iter_batched(
                    || ShadowRig::new(&w.guest, cfg.clone()),
                    |mut rig| {
                        w.run(&mut rig);
                        rig
                    },
                    BatchSize::PerIteration,
                );
            });
        }
    }
    g.finish();
}

/// Guest-physical address of the small LOG_DIRTY memslot.
const LOG_SLOT_GPA: Gpa = Gpa(0x90_0000_0000);

/// Operations on one small memslot while other memory is populated: a
/// dirty-log harvest of a 1-page LOG_DIRTY slot, and an 8-byte host write
/// into it (what a device model reports with `note_host_write`). Only the
/// populated size of the *other* slot changes between the columns, so a
/// cost that grows with it scans state that is not the slot's.
fn small_slot_ops(c: &mut Criterion) {
    const GROUP: &str = "shadow_small_slot_ops";
    let mut g = c.benchmark_group(GROUP);
    let log_memory = GuestMemory::new(PAGE_SIZE).expect("guest memory");
    let rig_for = |pages: u64| {
        let mut rig = populated(&linear_guest(pages), pages, config(pool_for(pages)));
        let slot = log_memory.memslot(
            SlotId(1),
            LOG_SLOT_GPA,
            0,
            1,
            Hpa(0x30_0000_0000),
            MemslotFlags::LOG_DIRTY,
        );
        add_slot(&rig.backend, log_memory, slot).expect("LOG_DIRTY memslot");
        // The harvest must see the write.
        rig.backend.note_host_write(LOG_SLOT_GPA, 8);
        let log = rig.backend.get_dirty_log(SlotId(1)).expect("dirty log");
        assert_eq!(log.iter_dirty().collect::<Vec<_>>(), [0]);
        rig.cpu.flush();
        rig
    };
    for mib in [8, 64, 512] {
        let pages = mib * MIB;
        let (id, full) = bench_id(GROUP, "get_dirty_log", format!("{mib}MiB_populated"));
        let mut rig = None;
        g.bench_function(id, |b| {
            let rig = rig.get_or_insert_with(|| {
                let rig = rig_for(pages);
                record(&full, rig.stats_line(&["sps_in_use"]));
                rig
            });
            b.iter(|| rig.backend.get_dirty_log(SlotId(1)).expect("dirty log"));
        });
        let (id, full) = bench_id(GROUP, "note_host_write", format!("{mib}MiB_populated"));
        let mut rig = None;
        g.bench_function(id, |b| {
            let rig = rig.get_or_insert_with(|| {
                let rig = rig_for(pages);
                record(&full, rig.stats_line(&["sps_in_use"]));
                rig
            });
            b.iter(|| rig.backend.note_host_write(black_box(LOG_SLOT_GPA), 8));
        });
    }
    g.finish();
}

/// Elements done and time taken so far, by (workload, threads), for the
/// scaling ratios printed at the end.
static SCALING: Mutex<BTreeMap<(String, u64), (u64, Duration)>> = Mutex::new(BTreeMap::new());

/// Runs `work(item, index)` on one thread per item (a vCPU), all released
/// at once;
/// returns the wall-clock time from the first thread starting its work to
/// the last one done. Each thread reads the clock itself: a clock read by
/// the releasing thread would count (or miss) the time the scheduler takes
/// to wake it or the workers, which differs between 1 and 2 threads.
fn run_threads<T: Send>(items: &mut [T], work: impl Fn(&mut T, u64) + Sync) -> Duration {
    let start = Barrier::new(items.len());
    let spans: Vec<(Instant, Instant)> = std::thread::scope(|s| {
        let threads: Vec<_> = items
            .iter_mut()
            .enumerate()
            .map(|(i, item)| {
                let (start, work) = (&start, &work);
                s.spawn(move || {
                    start.wait();
                    let t0 = Instant::now();
                    work(item, i as u64);
                    (t0, Instant::now())
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("bench thread"))
            .collect()
    });
    let first = spans
        .iter()
        .map(|s| s.0)
        .min()
        .expect("at least one thread");
    let last = spans
        .iter()
        .map(|s| s.1)
        .max()
        .expect("at least one thread");
    last - first
}

/// Adds one measurement to the scaling table.
fn record_scaling(workload: &str, threads: u64, elements: u64, time: Duration) {
    let mut table = SCALING.lock().unwrap_or_else(|e| e.into_inner());
    let e = table
        .entry((workload.to_owned(), threads))
        .or_insert((0, Duration::ZERO));
    e.0 += elements;
    e.1 += time;
}

/// Extra soft vCPUs on `rig`'s backend, running `guest`, after the rig's
/// own.
fn more_cpus(rig: ShadowRig, guest: &Guest, threads: u64) -> (Vec<SoftVcpu>, ShadowBackend) {
    let ShadowRig { cpu, backend } = rig;
    let mut cpus = vec![cpu];
    for t in 1..threads {
        let mut cpu = SoftVcpu::new(&backend, VcpuId(t as u32)).expect("vCPU");
        cpu.load_context(&guest.context()).expect("guest context");
        cpus.push(cpu);
    }
    (cpus, backend)
}

/// Fault throughput against vCPU threads (1, 2), each thread a soft vCPU
/// of one backend: `distinct_pages`, first touches of pages no other
/// thread touches (prefetch off, so one fault each, on a fresh backend
/// each iteration); `mmio_fast_path`, repeated reads of a device page per
/// thread, each answered from its MMIO SPTE. Each with the lock-free fault
/// paths on and off (`ShadowConfig::lockless_faults`). The ratio of the
/// 2-thread to the 1-thread throughput is printed at the end.
fn fault_scaling(c: &mut Criterion) {
    const GROUP: &str = "shadow_fault_scaling";
    const PAGES_PER_THREAD: u64 = 2048;
    const MMIO_READS: u64 = 2000;
    let linear = linear_guest(2 * PAGES_PER_THREAD);
    let mmio_guest = {
        let mut b = GuestBuilder::new(5, 1).expect("guest");
        let data = b.data_gpa(0);
        b.map(Gva(0), data);
        for t in 0..2 {
            b.map(
                Gva(MMIO_GVA.raw() + t * PAGE_SIZE),
                Gpa(MMIO_GPA.raw() + t * PAGE_SIZE),
            );
        }
        b.finish()
    };
    let mut g = c.benchmark_group(GROUP);
    g.sample_size(10);
    // The machine's own parallelism in this run: pure computation, no MMU.
    // Other processes on a shared machine cap every ratio below at this one.
    const SPINS: u64 = 1 << 21;
    for threads in [1u64, 2] {
        let (id, _) = bench_id(GROUP, "cpu_only", format!("{threads}threads"));
        g.throughput(Throughput::Elements(threads * SPINS));
        g.bench_function(id, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let mut seeds: Vec<u64> = (0..threads).collect();
                    let time = run_threads(&mut seeds, |seed, _| {
                        let mut x = *seed;
                        for i in 0..SPINS {
                            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(i);
                        }
                        black_box(x);
                    });
                    record_scaling("cpu_only", threads, threads * SPINS, time);
                    total += time;
                }
                total
            });
        });
    }
    for (mode, lockless_faults) in [("lockless_on", true), ("lockless_off", false)] {
        for threads in [1u64, 2] {
            let workload = format!("distinct_pages_{mode}");
            let (id, full) = bench_id(GROUP, &workload, format!("{threads}threads"));
            let cfg = {
                let mut m = config(pool_for(2 * PAGES_PER_THREAD));
                m.prefetch = 0;
                m.lockless_faults = lockless_faults;
                m
            };
            g.throughput(Throughput::Elements(threads * PAGES_PER_THREAD));
            let mut once = true;
            g.bench_function(id, |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let rig = ShadowRig::new(&linear, cfg.clone());
                        let (mut cpus, backend) = more_cpus(rig, &linear, threads);
                        let time = run_threads(&mut cpus, |cpu, t| {
                            let first = t * PAGES_PER_THREAD;
                            for p in first..first + PAGES_PER_THREAD {
                                let out = cpu
                                    .read(Gva(p * PAGE_SIZE), 8, AccessMode::User)
                                    .expect("soft vCPU access");
                                assert!(matches!(out, SoftOutcome::Done(_)), "{out:?}");
                            }
                        });
                        record_scaling(&workload, threads, threads * PAGES_PER_THREAD, time);
                        total += time;
                        drop(cpus);
                        if first(&mut once) {
                            let stats = backend.stats();
                            let line = [
                                "faults",
                                "faults_fixed",
                                "faults_fixed_shared",
                                "fault_walk_retries",
                            ]
                            .iter()
                            .map(|n| format!("{n}={}", stats.get(n).unwrap_or_default()))
                            .collect::<Vec<_>>()
                            .join(" ");
                            record(&full, line);
                        }
                    }
                    total
                });
            });

            let workload = format!("mmio_fast_path_{mode}");
            let (id, full) = bench_id(GROUP, &workload, format!("{threads}threads"));
            let cfg = {
                let mut m = config(64);
                m.lockless_faults = lockless_faults;
                m
            };
            g.throughput(Throughput::Elements(threads * MMIO_READS));
            let mut rig = None;
            let mut once = true;
            g.bench_function(id, |b| {
                let (cpus, backend) = rig.get_or_insert_with(|| {
                    let (mut cpus, backend) = more_cpus(
                        ShadowRig::new(&mmio_guest, cfg.clone()),
                        &mmio_guest,
                        threads,
                    );
                    for (t, cpu) in cpus.iter_mut().enumerate() {
                        // The first access makes the MMIO SPTE.
                        let gva = Gva(MMIO_GVA.raw() + t as u64 * PAGE_SIZE);
                        let out = cpu.read(gva, 8, AccessMode::User).expect("access");
                        assert!(matches!(out, SoftOutcome::Mmio(_)), "{out:?}");
                    }
                    (cpus, backend)
                });
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let time = run_threads(cpus, |cpu, t| {
                            let gva = Gva(MMIO_GVA.raw() + t * PAGE_SIZE);
                            for _ in 0..MMIO_READS {
                                let out = cpu.read(gva, 8, AccessMode::User).expect("access");
                                assert!(matches!(out, SoftOutcome::Mmio(_)), "{out:?}");
                            }
                        });
                        record_scaling(&workload, threads, threads * MMIO_READS, time);
                        total += time;
                    }
                    total
                });
                if first(&mut once) {
                    let stats = backend.stats();
                    let line = ["faults", "mmio_fast_hits", "faults_mmio"]
                        .iter()
                        .map(|n| format!("{n}={}", stats.get(n).unwrap_or_default()))
                        .collect::<Vec<_>>()
                        .join(" ");
                    record(&full, format!("first sample: {line}"));
                }
            });
            // The vCPUs go before their backend.
            if let Some((cpus, backend)) = rig.take() {
                drop(cpus);
                drop(backend);
            }
        }
    }
    g.finish();
}

/// Prints the 2-thread / 1-thread throughput ratio of each scaling
/// workload measured in this run.
fn print_scaling() {
    let table = SCALING.lock().unwrap_or_else(|e| e.into_inner());
    if table.is_empty() {
        return;
    }
    println!(
        "\nshadow_fault_scaling: throughput, 2 threads / 1 thread (cpu_only is the \
         machine's own parallelism in this run, no MMU):\n"
    );
    let rate = |w: &str, t: u64| {
        table
            .get(&(w.to_owned(), t))
            .filter(|(_, d)| !d.is_zero())
            .map(|(n, d)| *n as f64 / d.as_secs_f64())
    };
    let workloads: std::collections::BTreeSet<&String> = table.keys().map(|(w, _)| w).collect();
    for w in workloads {
        if let (Some(one), Some(two)) = (rate(w, 1), rate(w, 2)) {
            println!(
                "{w}: 1 thread {:.0}/s, 2 threads {:.0}/s, ratio {:.2}x",
                one,
                two,
                two / one
            );
        }
    }
}

fn main() {
    // Short by default (two shared cores); `--warm-up-time` and
    // `--measurement-time` on the command line still win.
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    fault_first_touch(&mut c);
    zap_all(&mut c);
    retouch_after_zap(&mut c);
    sp_lookup(&mut c);
    shadow_mmio(&mut c);
    ept_mmio(&mut c);
    reclaim(&mut c);
    small_slot_ops(&mut c);
    fault_scaling(&mut c);
    c.final_summary();
    print_scaling();

    let counters = COUNTERS.lock().unwrap_or_else(|e| e.into_inner());
    if !counters.is_empty() {
        println!("\nBackend counters, one pass of each benchmark:\n");
        println!("| benchmark | counters |\n| --- | --- |");
        for (id, line) in counters.iter() {
            println!("| {id} | {line} |");
        }
    }
}
