//! Many soft vCPUs on one backend at once: concurrent faults (on private
//! and shared pages, with a page limit that makes them reclaim), guest
//! page-table edits through the emulator, memslot churn with dirty
//! logging, zap-all and obsolete-page reclaim, with `audit()` run over and
//! over while all of it goes on. Bounded by iteration counts.

mod common;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use common::{GuestRam, add_slot, config};
use mmu_api::{
    AccessMode, Gpa, Gva, MemslotFlags, MmuBackend, MmuVcpu, PagingContext, PagingMode, SlotId,
    VcpuId,
};
use mmu_shadow::soft::{SoftOutcome, SoftVcpu};
use mmu_shadow::{ShadowBackend, ZapMode};

const PWU: u64 = 7;
const RAM_PAGES: u64 = 520;
/// Slot 0: RAM pages 0..SLOT0_PAGES at gpa 0.
const SLOT0_PAGES: u64 = 500;
/// Slot 1 (created, deleted, logged, by turns): RAM pages 500..508 at
/// this gpa.
const CHURN_GPA: u64 = 0x100_0000;
const CHURN_PAGES: u64 = 8;
const MAX_VCPUS: u64 = 8;
const PRIVATE_PAGES: u64 = 16;
/// Page-table entry each vCPU remaps between two pages.
const REMAP_INDEX: u64 = 16;
const SHARED_PD: u64 = MAX_VCPUS;
const CHURN_PD: u64 = MAX_VCPUS + 1;
const SHARED_PT_PAGE: u64 = 20;
const CHURN_PT_PAGE: u64 = 21;
const SHARED_PAGES: u64 = 32;
const ITERATIONS: u32 = 20_000;

fn pt_page(vcpu: u64) -> u64 {
    8 + vcpu
}

fn data_page(vcpu: u64, j: u64) -> u64 {
    64 + vcpu * 32 + j
}

fn marker(page: u64) -> u64 {
    0xabc0_0000_0000 | page
}

fn shared_page(j: u64) -> u64 {
    400 + j
}

fn churn_ram_page(j: u64) -> u64 {
    SLOT0_PAGES + j
}

/// PML4 at page 1, PDPT at page 2, PD at page 3. PD[v] (v < 8) points to
/// vCPU v's page table: entries 0..16 map its private pages, entry 16 one
/// of two pages it remaps between. PD[8] maps 32 shared pages, PD[9] the
/// churned slot. Every data page holds its marker in word 0.
fn guest(ram: &mut GuestRam) {
    ram.set_word(1, 0, 0x2000 | PWU);
    ram.set_word(2, 0, 0x3000 | PWU);
    for v in 0..MAX_VCPUS {
        ram.set_word(3, v as usize, (pt_page(v) << 12) | PWU);
        for j in 0..=REMAP_INDEX + 1 {
            let page = data_page(v, j);
            ram.set_word(page, 0, marker(page));
            if j <= REMAP_INDEX {
                ram.set_word(pt_page(v), j as usize, (page << 12) | PWU);
            }
        }
    }
    ram.set_word(3, SHARED_PD as usize, (SHARED_PT_PAGE << 12) | PWU);
    for j in 0..SHARED_PAGES {
        ram.set_word(SHARED_PT_PAGE, j as usize, (shared_page(j) << 12) | PWU);
    }
    ram.set_word(3, CHURN_PD as usize, (CHURN_PT_PAGE << 12) | PWU);
    for j in 0..CHURN_PAGES {
        let gpa = CHURN_GPA + (j << 12);
        ram.set_word(CHURN_PT_PAGE, j as usize, gpa | PWU);
        ram.set_word(churn_ram_page(j), 0, marker(churn_ram_page(j)));
    }
}

fn context() -> PagingContext {
    PagingContext::for_mode(
        PagingMode::Level4,
        0x1000,
        40,
        mmu_api::paging::CpuFeatures::all(),
    )
    .unwrap()
}

fn churn_slot(ram: &GuestRam, flags: MemslotFlags) -> mmu_api::Memslot {
    ram.slot(1, CHURN_GPA, SLOT0_PAGES, CHURN_PAGES, flags)
}

/// xorshift64: the workload's own reproducible randomness.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Counts a worker as finished even if it panics, so the auditor stops.
struct Finished<'a>(&'a AtomicUsize);

impl Drop for Finished<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

fn read(cpu: &mut SoftVcpu, gva: u64) -> SoftOutcome {
    cpu.read(Gva(gva), 8, AccessMode::User).unwrap()
}

/// One vCPU's workload; every value it reads is checked.
fn worker(b: &ShadowBackend, v: u64, finished: &AtomicUsize, progress: &AtomicU64) {
    let _done = Finished(finished);
    let mut cpu = SoftVcpu::new(b, VcpuId(v as u32)).unwrap();
    cpu.load_context(&context()).unwrap();
    let mut rng = 0x9e37_79b9_7f4a_7c15 ^ (v + 1);
    let mut remapped = false;
    let base = v << 21;
    for it in 0..ITERATIONS {
        progress.fetch_add(1, Ordering::SeqCst);
        if it == ITERATIONS - 1 {
            // Done: never holds the main thread's changes back.
            progress.store(u64::MAX / 2, Ordering::SeqCst);
        }
        let r = next(&mut rng);
        let j = (r >> 8) % PRIVATE_PAGES;
        match r % 8 {
            0..=2 => {
                let out = read(&mut cpu, base + (j << 12));
                assert_eq!(out, SoftOutcome::Done(marker(data_page(v, j))));
            }
            3 => {
                let gva = Gva(base + (j << 12) + 8);
                let value = r | 1;
                cpu.write(gva, 8, value, AccessMode::User).unwrap();
                assert_eq!(
                    cpu.read(gva, 8, AccessMode::User).unwrap(),
                    SoftOutcome::Done(value)
                );
            }
            4 => {
                // The guest kernel remaps its page and invalidates it: the
                // next read must see the new page.
                remapped = !remapped;
                let target = data_page(v, REMAP_INDEX + u64::from(remapped));
                let pte = Gpa((pt_page(v) << 12) + REMAP_INDEX * 8);
                cpu.mmu()
                    .write_guest(pte, &((target << 12) | PWU).to_le_bytes())
                    .unwrap();
                let gva = base + (REMAP_INDEX << 12);
                cpu.invlpg(Gva(gva));
                assert_eq!(read(&mut cpu, gva), SoftOutcome::Done(marker(target)));
            }
            5 => {
                // Shared pages: every vCPU owns one word of each.
                let gva = Gva((SHARED_PD << 21) + ((j % SHARED_PAGES) << 12) + 8 * v);
                cpu.write(gva, 8, r, AccessMode::User).unwrap();
                assert_eq!(
                    cpu.read(gva, 8, AccessMode::User).unwrap(),
                    SoftOutcome::Done(r)
                );
            }
            _ => {
                // The churned slot: memory while it exists, MMIO otherwise.
                let k = j % CHURN_PAGES;
                let gva = (CHURN_PD << 21) + (k << 12);
                let out = if r % 8 == 6 {
                    read(&mut cpu, gva)
                } else {
                    cpu.write(Gva(gva + 8), 8, r, AccessMode::User).unwrap()
                };
                let gpa = Gpa(CHURN_GPA + (k << 12) + if r % 8 == 6 { 0 } else { 8 });
                match out {
                    SoftOutcome::Mmio(g) => assert_eq!(g, gpa),
                    SoftOutcome::Done(value) if r % 8 == 6 => {
                        assert_eq!(value, marker(churn_ram_page(k)));
                    }
                    SoftOutcome::Done(value) => assert_eq!(value, r),
                    other => panic!("vCPU {v}: {other:?} in the churned slot"),
                }
            }
        }
        if it % 64 == 63 {
            // MOV CR3: the root comes from the cache.
            cpu.load_context(&context()).unwrap();
        }
    }
}

/// Runs `vcpus` workers while this thread audits and churns. Returns the
/// number of audits that passed.
fn run(vcpus: u64, zap: ZapMode, lockless_faults: bool) -> u64 {
    let mut ram = GuestRam::new(RAM_PAGES);
    guest(&mut ram);
    let b = ShadowBackend::new({
        let mut m = config(Some(20), 8);
        m.zap = zap;
        m.lockless_faults = lockless_faults;
        m
    })
    .unwrap();
    add_slot(&b, ram.slot(0, 0, 0, SLOT0_PAGES, MemslotFlags::empty()));
    let finished = AtomicUsize::new(0);
    let progress: Vec<AtomicU64> = (0..vcpus).map(|_| AtomicU64::new(0)).collect();
    let mut audits = 0u64;
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..vcpus)
            .map(|v| {
                let b = &b;
                let (finished, progress) = (&finished, &progress[v as usize]);
                s.spawn(move || worker(b, v, finished, progress))
            })
            .collect();
        let mut step = 0u64;
        let mut present = false;
        let mut logging = false;
        let progress_now =
            || -> Vec<u64> { progress.iter().map(|p| p.load(Ordering::SeqCst)).collect() };
        let mut at_last_change = progress_now();
        while finished.load(Ordering::SeqCst) < vcpus as usize {
            // Change something only once every vCPU has got an access done
            // since the last change: a vCPU whose every access met a
            // zap-all would make no progress (a real one would keep
            // retrying; the soft vCPU reports it).
            let now = progress_now();
            if now.iter().zip(&at_last_change).any(|(n, l)| n <= l) {
                std::hint::spin_loop();
                continue;
            }
            at_last_change = now;
            if let Err(e) = b.audit() {
                panic!("audit {audits} failed with {vcpus} vCPUs: {e}");
            }
            audits += 1;
            match step % 6 {
                0 => {
                    if present {
                        b.delete_memslot(SlotId(1)).unwrap();
                    } else {
                        add_slot(&b, churn_slot(&ram, MemslotFlags::empty()));
                    }
                    present = !present;
                    logging = false;
                }
                1 if present => {
                    logging = !logging;
                    let flags = if logging {
                        MemslotFlags::LOG_DIRTY
                    } else {
                        MemslotFlags::empty()
                    };
                    add_slot(&b, churn_slot(&ram, flags));
                }
                2 if logging => {
                    b.get_dirty_log(SlotId(1)).unwrap();
                }
                3 => b.zap_all(),
                4 => {
                    b.reclaim_obsolete();
                }
                5 => b.note_host_write(Gpa(SHARED_PT_PAGE << 12), 8),
                _ => {}
            }
            step += 1;
        }
        for w in workers {
            w.join().expect("worker");
        }
    });
    b.audit().unwrap();
    audits += 1;
    let stats = b.stats();
    println!(
        "{vcpus} vCPUs ({zap:?} zap, lock-free faults {lockless_faults}): \
         {audits} audits passed; faults {} (fixed holding the lock shared {}), \
         fast zaps {}, reclaimed {}, walk retries {}, remote flushes {}",
        stats.get("faults").unwrap_or(0),
        stats.get("faults_fixed_shared").unwrap_or(0),
        stats.get("fast_zaps").unwrap_or(0),
        stats.get("reclaimed_valid").unwrap_or(0),
        stats.get("fault_walk_retries").unwrap_or(0),
        stats.get("remote_flushes").unwrap_or(0),
    );
    audits
}

#[test]
fn two_vcpus() {
    assert!(run(2, ZapMode::Fast, true) > 1);
}

#[test]
fn four_vcpus() {
    assert!(run(4, ZapMode::Fast, true) > 1);
}

#[test]
fn eight_vcpus() {
    assert!(run(8, ZapMode::Fast, true) > 1);
}

#[test]
fn eight_vcpus_naive_zap_all_under_the_lock() {
    assert!(run(8, ZapMode::Naive, false) > 1);
}
