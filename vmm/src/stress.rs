//! The host half of the `stress` workload: a thread that harvests the
//! dirty log of a memslot and deletes, re-adds and moves it while every
//! vCPU writes to it and reads it (the guest program
//! [`stress()`](crate::kit::workloads::stress())), and the device that
//! answers the guest's accesses where the memslot is not.
//!
//! # What is checked, exactly
//!
//! The host publishes a control word per vCPU ([`stress::control`]): the
//! epoch (the number of harvests so far, plus one), the placement
//! generation (bumped by every add, move and delete) and where the slot
//! is. Every change of the memory map is bracketed: the host publishes
//! [`State::Changing`], makes the change, writes the identity word of the
//! new placement into every page (adds and moves), then publishes the new
//! state. Control words never repeat.
//!
//! **No lost dirty page.** The guest tags every write with the epoch it
//! read in the control word before the write: a write tagged `k` happened
//! after harvest `k - 1` returned. Harvest `k` is: read every page's tag
//! from the backing (snapshot `S_k`), then harvest the log (`D_k`), then
//! publish epoch `k + 1`. For every page whose tag changed since `S_{k-1}`
//! (or since the slot was added):
//!
//! - tag epoch `k`: the write landed after harvest `k - 1` and before
//!   `S_k`, so before harvest `k`: the page must be in `D_k`;
//! - an older epoch: the write landed between `S_{k-1}` and `S_k`, so
//!   between two harvests `k - 2` and `k`: the page must be in `D_{k-1}`
//!   or `D_k` (only `D_k` if the slot was added after harvest `k - 1`).
//!
//! A page that is in neither is a lost dirty page. A move keeps the log
//! (as KVM does), so the rule spans moves; a delete drops the log (as KVM
//! does), so the rule restarts at each add, and writes between the last
//! harvest and a delete are not checked (no log can report them).
//!
//! **No stale read.** The guest reads the control word, then the page's
//! identity word, then the control word again; when both control reads
//! agree (the memory map did not change in between), the read must be
//! exactly the identity of the published placement when the slot is
//! present at the window read, and [`stress::ABSENT`] (the VMM's MMIO
//! answer) when it is deleted or at the other location. Anything else is
//! a stale or wrong read, which the guest counts and records.
//!
//! **Unmapped at once.** After each delete returns, the host drops the
//! last reference to the backing, which unmaps it; the loop checks that
//! nothing else (the glue, the device) still held it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use mmu_api::{DirtyBitmap, Gpa, MemslotError, MemslotFlags};
use mmu_integration::arena::shared_guest_memory;
use mmu_integration::{BusError, Memslots};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::kit::workloads::stress::{self, State};
use crate::layout::PAGE_SIZE;
use crate::mmu::Devices;
use crate::workload::{STRESS_GPA_A, STRESS_GPA_B, STRESS_SIZE, STRESS_SLOT};

/// How long the host lets the vCPUs run between two of its steps.
const STEP: Duration = Duration::from_millis(2);

/// How long the host waits, at most, for every vCPU to see a deleted
/// slot before it re-adds it.
const ABSENT_WAIT: Duration = Duration::from_secs(2);

/// Cycles whose harvests, deletes and moves are followed by the
/// backend's audit.
/// An audit walks every shadow page, obsolete ones included, under the
/// MMU lock; obsolete pages pile up with every zap (reclaiming them costs
/// an emulated replay of each zapped frame on this host), so later audits
/// would cost more and more.
pub const AUDITED_CYCLES: u64 = 10;

/// Why the host loop stopped early.
#[derive(Debug, thiserror::Error)]
pub enum StressError {
    /// A memslot change or harvest failed.
    #[error("a memslot change of the stress loop failed")]
    Memslot(#[from] MemslotError),
    /// Allocating or accessing a backing failed.
    #[error("stress memory: {0}")]
    Memory(String),
    /// A deleted slot's backing was still referenced after the delete.
    #[error("the backing of the deleted stress slot is still referenced {0} more times")]
    StillMapped(usize),
    /// The backend's own audit failed right after a harvest or memslot
    /// change.
    #[error("the backend's audit failed after a {after}: {detail}")]
    Audit {
        /// After what (`harvest`, `memslot delete`, `memslot move`).
        after: &'static str,
        /// What the audit found.
        detail: String,
    },
}

/// The backend's consistency audit (the shadow backend's
/// [`audit`](mmu_backends::shadow::ShadowBackend::audit)), run by the host
/// loop right after each harvest, delete and move of the first [`AUDITED_CYCLES`]
/// cycles while the vCPUs keep running.
pub(crate) type Audit<'a> = Box<dyn Fn() -> Result<(), String> + Send + Sync + 'a>;

fn memory_error(e: impl std::fmt::Display) -> StressError {
    StressError::Memory(e.to_string())
}

/// What the stress devices and the host loop share.
#[derive(Debug)]
pub(crate) struct StressShared {
    /// The slot's current location and backing, for MMIO exits that
    /// raced an add or a move (`None` while deleted or changing).
    current: Mutex<Option<(u64, GuestMemoryMmap)>>,
    /// Per vCPU: reads answered [`stress::ABSENT`].
    absent_reads: Vec<AtomicU64>,
    /// Writes to where the slot is not, dropped.
    absent_writes: AtomicU64,
    /// Reads that exited as MMIO but found memory.
    raced_reads: AtomicU64,
}

impl StressShared {
    pub(crate) fn new(vcpus: usize) -> Arc<Self> {
        Arc::new(StressShared {
            current: Mutex::new(None),
            absent_reads: (0..vcpus).map(|_| AtomicU64::new(0)).collect(),
            absent_writes: AtomicU64::new(0),
            raced_reads: AtomicU64::new(0),
        })
    }

    fn set_current(&self, current: Option<(u64, GuestMemoryMmap)>) {
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = current;
    }

    fn absent_reads(&self) -> Vec<u64> {
        self.absent_reads
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }
}

/// True if `gpa` is where the stress slot can be (either location).
fn in_stress_range(gpa: u64) -> bool {
    [STRESS_GPA_A, STRESS_GPA_B]
        .iter()
        .any(|&base| (base..base + STRESS_SIZE).contains(&gpa))
}

fn fill_absent(data: &mut [u8]) {
    let bytes = stress::ABSENT.to_le_bytes();
    for (i, b) in data.iter_mut().enumerate() {
        *b = bytes[i % 8];
    }
}

/// One vCPU's device for the stress slot's two locations: reads where
/// no memslot is are answered [`stress::ABSENT`], writes are dropped.
#[derive(Debug)]
pub(crate) struct StressDevice {
    index: usize,
    shared: Arc<StressShared>,
}

impl StressDevice {
    pub(crate) fn new(index: usize, shared: Arc<StressShared>) -> Self {
        StressDevice { index, shared }
    }
}

impl Devices for StressDevice {
    fn mmio_read(&mut self, gpa: Gpa, data: &mut [u8]) -> Result<(), BusError> {
        if !in_stress_range(gpa.raw()) {
            return Err(BusError::NoDevice(gpa));
        }
        fill_absent(data);
        if let Some(c) = self.shared.absent_reads.get(self.index) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn mmio_write(&mut self, gpa: Gpa, _data: &[u8]) -> Result<(), BusError> {
        if !in_stress_range(gpa.raw()) {
            return Err(BusError::NoDevice(gpa));
        }
        self.shared.absent_writes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// An MMIO read that found the slot added (or moved) there meanwhile:
    /// read the slot's current backing, or answer ABSENT if it has gone
    /// again.
    fn memory_read(&mut self, gpa: Gpa, data: &mut [u8]) -> Result<(), BusError> {
        if !in_stress_range(gpa.raw()) {
            return Err(BusError::NoDevice(gpa));
        }
        self.shared.raced_reads.fetch_add(1, Ordering::Relaxed);
        let current = self
            .shared
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match &*current {
            Some((base, memory)) if (*base..*base + STRESS_SIZE).contains(&gpa.raw()) => memory
                .read_slice(data, GuestAddress(STRESS_GPA_A + (gpa.raw() - base)))
                .map_err(BusError::failed),
            _ => {
                fill_absent(data);
                Ok(())
            }
        }
    }
}

/// The host loop's figures.
#[derive(Clone, Debug, Default)]
pub(crate) struct StressStats {
    /// Cycles completed.
    pub(crate) cycles: u64,
    /// Dirty-log harvests.
    pub(crate) harvests: u64,
    /// Pages whose latest write was checked against the harvest of its
    /// own interval.
    pub(crate) verified_exact: u64,
    /// Pages whose latest write was checked against the two harvests
    /// around it (it landed after a snapshot, see the module docs).
    pub(crate) verified_late: u64,
    /// Checked pages the harvests lacked (must be 0).
    pub(crate) lost: u64,
    /// The first lost page, described.
    pub(crate) first_lost: Option<String>,
    /// Lost pages that the next harvest of the same slot did report (the
    /// write was logged one harvest late rather than never).
    pub(crate) lost_logged_next: u64,
    /// Memslot adds (the first included), moves, deletes.
    pub(crate) adds: u64,
    pub(crate) moves: u64,
    pub(crate) deletes: u64,
    /// Backings unmapped right after their delete.
    pub(crate) unmapped: u64,
    /// Deletes after which every vCPU was seen reading the MMIO answer
    /// before the re-add.
    pub(crate) absent_seen: u64,
    /// Reads answered ABSENT, writes dropped, raced reads (device).
    pub(crate) absent_reads: u64,
    pub(crate) absent_writes: u64,
    pub(crate) raced_reads: u64,
    /// Longest memslot change (add, move or delete), in microseconds.
    pub(crate) max_change_us: u64,
    /// Backend audits passed (after each harvest, delete and move of the first
    /// [`AUDITED_CYCLES`] cycles).
    pub(crate) audits: u64,
}

/// One step of the host loop.
#[derive(Clone, Copy, Debug)]
enum Step {
    Harvest,
    MoveTo(State),
    Delete,
    Add,
}

impl Step {
    /// A cycle: harvests at A, a move to B and back with harvests, a
    /// delete and a re-add at A.
    const CYCLE: [Step; 8] = [
        Step::Harvest,
        Step::Harvest,
        Step::MoveTo(State::AtB),
        Step::Harvest,
        Step::MoveTo(State::AtA),
        Step::Harvest,
        Step::Delete,
        Step::Add,
    ];
}

/// The host side of one `stress` run.
pub(crate) struct StressHost<'a> {
    memslots: &'a Memslots,
    guest: &'a GuestMemoryMmap,
    controls: Vec<u64>,
    /// Pages of the slot the vCPUs use (all vCPUs).
    pages: u64,
    shared: Arc<StressShared>,
    backing: Option<GuestMemoryMmap>,
    state: State,
    placement: u64,
    epoch: u64,
    tags: Vec<u64>,
    previous: Option<DirtyBitmap>,
    /// Pages found lost at the last harvest, to see if the next has them.
    lost_pages: Vec<u64>,
    audit: Option<Audit<'a>>,
    stats: StressStats,
}

impl<'a> StressHost<'a> {
    /// The host of a plan whose vCPUs have `controls` and use
    /// `pages_per_vcpu` pages each; adds the slot at location A. `audit`,
    /// if any, runs after every delete and move.
    pub(crate) fn start(
        memslots: &'a Memslots,
        guest: &'a GuestMemoryMmap,
        controls: Vec<u64>,
        pages_per_vcpu: u64,
        shared: Arc<StressShared>,
        audit: Option<Audit<'a>>,
    ) -> Result<Self, StressError> {
        let pages = pages_per_vcpu * controls.len() as u64;
        let mut host = StressHost {
            memslots,
            guest,
            controls,
            pages,
            shared,
            backing: None,
            state: State::Absent,
            placement: 0,
            epoch: 1,
            tags: vec![0; pages as usize],
            previous: None,
            lost_pages: Vec::new(),
            audit,
            stats: StressStats::default(),
        };
        host.add()?;
        Ok(host)
    }

    fn publish(&self, word: u64) -> Result<(), StressError> {
        for &c in &self.controls {
            self.guest
                .store(word, GuestAddress(c), Ordering::SeqCst)
                .map_err(memory_error)?;
        }
        Ok(())
    }

    fn publish_state(&mut self, state: State) -> Result<(), StressError> {
        self.state = state;
        self.publish(stress::control(self.epoch, self.placement, state))
    }

    fn backing(&self) -> Result<&GuestMemoryMmap, StressError> {
        self.backing
            .as_ref()
            .ok_or_else(|| StressError::Memory("the stress slot has no backing".to_string()))
    }

    /// Writes the identity of the current placement at `state` into every
    /// page.
    fn write_identity(&self, state: State) -> Result<(), StressError> {
        let backing = self.backing()?;
        let identity = stress::identity(self.placement, state);
        for p in 0..STRESS_SIZE / PAGE_SIZE {
            backing
                .store(
                    identity,
                    GuestAddress(STRESS_GPA_A + p * PAGE_SIZE + 8),
                    Ordering::SeqCst,
                )
                .map_err(memory_error)?;
        }
        Ok(())
    }

    fn audit(&mut self, after: &'static str) -> Result<(), StressError> {
        if self.stats.cycles >= AUDITED_CYCLES {
            return Ok(());
        }
        if let Some(audit) = &self.audit {
            audit().map_err(|detail| StressError::Audit { after, detail })?;
            self.stats.audits += 1;
        }
        Ok(())
    }

    fn timed<T>(
        &mut self,
        change: impl FnOnce(&Memslots) -> Result<T, MemslotError>,
    ) -> Result<T, StressError> {
        let started = Instant::now();
        let result = change(self.memslots)?;
        let us = started.elapsed().as_micros() as u64;
        self.stats.max_change_us = self.stats.max_change_us.max(us);
        Ok(result)
    }

    /// Adds the slot at location A with a fresh backing.
    fn add(&mut self) -> Result<(), StressError> {
        self.publish_state(State::Changing)?;
        let memory = shared_guest_memory(&[(GuestAddress(STRESS_GPA_A), STRESS_SIZE as usize)])
            .map_err(memory_error)?;
        self.backing = Some(memory.clone());
        self.placement += 1;
        self.write_identity(State::AtA)?;
        self.shared
            .set_current(Some((STRESS_GPA_A, memory.clone())));
        let region = memory
            .iter()
            .next()
            .ok_or_else(|| StressError::Memory("the stress backing has no region".to_string()))?;
        self.timed(|m| m.add_region(STRESS_SLOT, region, MemslotFlags::LOG_DIRTY))?;
        self.stats.adds += 1;
        // A new slot starts a new log.
        self.tags.iter_mut().for_each(|t| *t = 0);
        self.previous = None;
        self.lost_pages.clear();
        self.publish_state(State::AtA)
    }

    /// Moves the slot to `to` (A or B).
    fn move_to(&mut self, to: State) -> Result<(), StressError> {
        let base = match to {
            State::AtB => STRESS_GPA_B,
            _ => STRESS_GPA_A,
        };
        self.publish_state(State::Changing)?;
        self.timed(|m| m.move_slot(STRESS_SLOT, Gpa(base)))?;
        self.stats.moves += 1;
        self.audit("memslot move")?;
        self.placement += 1;
        self.write_identity(to)?;
        let backing = self.backing()?.clone();
        self.shared.set_current(Some((base, backing)));
        self.publish_state(to)
    }

    /// Deletes the slot, unmaps its backing at once, and waits (bounded)
    /// until every vCPU has read the MMIO answer, or `done`.
    fn delete(&mut self, done: &AtomicBool) -> Result<(), StressError> {
        self.publish_state(State::Changing)?;
        self.shared.set_current(None);
        self.timed(|m| m.delete(STRESS_SLOT))?;
        self.stats.deletes += 1;
        let backing = self
            .backing
            .take()
            .ok_or_else(|| StressError::Memory("the stress slot has no backing".to_string()))?;
        let mapping = backing
            .iter()
            .next()
            .ok_or_else(|| StressError::Memory("the stress backing has no region".to_string()))?
            .get_mmap();
        drop(backing);
        let others = Arc::strong_count(&mapping) - 1;
        if others != 0 {
            return Err(StressError::StillMapped(others));
        }
        // The last reference: this unmaps the backing.
        drop(mapping);
        self.stats.unmapped += 1;
        self.audit("memslot delete")?;
        self.placement += 1;
        let before = self.shared.absent_reads();
        self.publish_state(State::Absent)?;
        let started = Instant::now();
        while !done.load(Ordering::Acquire) && started.elapsed() < ABSENT_WAIT {
            let now = self.shared.absent_reads();
            if now.iter().zip(&before).all(|(n, b)| n > b) {
                self.stats.absent_seen += 1;
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(())
    }

    /// Harvest `epoch`: snapshot the tags, harvest, check, publish the
    /// next epoch.
    fn harvest(&mut self) -> Result<(), StressError> {
        let backing = self.backing()?;
        let mut tags = Vec::with_capacity(self.tags.len());
        for p in 0..self.pages {
            tags.push(
                backing
                    .load::<u64>(GuestAddress(STRESS_GPA_A + p * PAGE_SIZE), Ordering::SeqCst)
                    .map_err(memory_error)?,
            );
        }
        let log = self.memslots.dirty_log(STRESS_SLOT)?;
        self.stats.harvests += 1;
        self.audit("harvest")?;
        for page in std::mem::take(&mut self.lost_pages) {
            self.stats.lost_logged_next += u64::from(log.is_dirty(page));
        }
        for (page, (&tag, old)) in tags.iter().zip(&self.tags).enumerate() {
            if tag == *old {
                continue;
            }
            let page = page as u64;
            let tag_epoch = stress::tag_epoch(tag);
            let logged = if tag_epoch >= self.epoch {
                self.stats.verified_exact += 1;
                tag_epoch == self.epoch && log.is_dirty(page)
            } else {
                self.stats.verified_late += 1;
                log.is_dirty(page) || self.previous.as_ref().is_some_and(|d| d.is_dirty(page))
            };
            if !logged {
                self.stats.lost += 1;
                self.lost_pages.push(page);
                if self.stats.first_lost.is_none() {
                    self.stats.first_lost = Some(format!(
                        "slot page {page} (tag {tag:#x}, epoch {tag_epoch}) missing from harvest {} at {:?}",
                        self.epoch, self.state
                    ));
                }
            }
        }
        self.tags = tags;
        self.previous = Some(log);
        self.epoch += 1;
        let state = self.state;
        self.publish_state(state)
    }

    fn pause(&self) {
        std::thread::sleep(STEP);
    }

    /// One cycle: harvests at A, a move to B and back with harvests, a
    /// harvest, a delete and a re-add.
    fn cycle(&mut self, done: &AtomicBool) -> Result<(), StressError> {
        for step in Step::CYCLE {
            if done.load(Ordering::Acquire) {
                return Ok(());
            }
            self.pause();
            match step {
                Step::Harvest => self.harvest()?,
                Step::MoveTo(to) => self.move_to(to)?,
                Step::Delete => self.delete(done)?,
                Step::Add => self.add()?,
            }
        }
        self.stats.cycles += 1;
        Ok(())
    }

    /// Runs `cycles` cycles (fewer if `done` is set: the vCPUs ended),
    /// harvests once more, then tells the vCPUs to stop, also on error.
    pub(crate) fn run(
        mut self,
        cycles: u64,
        done: &AtomicBool,
    ) -> Result<StressStats, StressError> {
        let mut result = Ok(());
        for _ in 0..cycles {
            if done.load(Ordering::Acquire) {
                break;
            }
            result = self.cycle(done);
            if result.is_err() {
                break;
            }
        }
        if result.is_ok() && !done.load(Ordering::Acquire) {
            self.pause();
            result = self.harvest();
        }
        let stop = stress::control(self.epoch, self.placement, self.state) | stress::STOP;
        let stopped = self.publish(stop);
        result?;
        stopped?;
        let mut stats = self.stats;
        stats.absent_reads = self.shared.absent_reads().iter().sum();
        stats.absent_writes = self.shared.absent_writes.load(Ordering::Relaxed);
        stats.raced_reads = self.shared.raced_reads.load(Ordering::Relaxed);
        Ok(stats)
    }
}
