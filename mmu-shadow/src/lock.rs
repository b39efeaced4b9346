//! The MMU lock: exclusive holders serialise on a mutex; shared holders,
//! each a vCPU on its fault path, announce themselves in a flag on their
//! own vCPU's cache lines (KVM's TDP MMU takes `mmu_lock` for read on
//! faults likewise; here the readers write no line in common).
//!
//! A shared holder sets its flag, then checks that no exclusive holder is
//! in: if one is, it clears the flag, waits for the holder to leave and
//! tries again; if the lock stays wanted exclusively, the caller takes it
//! exclusively instead (the shared path is only ever a faster way to the
//! same result).
//! An exclusive holder takes the mutex, marks itself in, then waits for
//! every registered vCPU's flag to clear. Both sides store then load with
//! sequential consistency, so of a reader and a writer arriving together
//! at least one sees the other. A shared holder never waits for anything
//! while its flag is set, so the writer's wait ends.
//!
//! An ordinary reader-writer lock would do the same, but every shared
//! acquisition and release writes the lock's word: two vCPUs faulting side
//! by side then pass that cache line back and forth twice a fault, which
//! costs about a fifth of a fault here.

use std::cell::UnsafeCell;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, TryLockError};

use crate::state::MmuState;
use crate::vcpu::VcpuShared;

/// The flag of an exclusive holder, alone on its cache lines: shared
/// holders read it on every fault, and it changes only when the lock is
/// taken exclusively.
#[derive(Debug, Default)]
#[repr(align(128))]
struct ExclusiveFlag(AtomicBool);

/// The MMU lock and the state it protects.
pub(crate) struct MmuLock {
    /// Serialises exclusive holders.
    mutex: Mutex<()>,
    /// An exclusive holder is in, or waiting for shared holders to leave.
    exclusive: ExclusiveFlag,
    state: UnsafeCell<MmuState>,
}

// SAFETY: the state is reached mutably only through an `ExclusiveGuard`,
// made while holding the mutex after every shared holder left and while
// `exclusive` keeps new ones out; and shared only through `SharedGuard`s,
// which hand out `&MmuState`, never while an `ExclusiveGuard` lives.
// `MmuState` is `Send + Sync` (checked by the bound), so handing it across
// threads under that discipline is sound.
unsafe impl Sync for MmuLock where MmuState: Send + Sync {}

impl std::fmt::Debug for MmuLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmuLock")
            .field("exclusive", &self.exclusive.0.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl MmuLock {
    /// A lock around `state`.
    pub(crate) fn new(state: MmuState) -> Self {
        MmuLock {
            mutex: Mutex::new(()),
            exclusive: ExclusiveFlag::default(),
            state: UnsafeCell::new(state),
        }
    }

    /// Takes the lock exclusively. Critical sections are short (a fault's
    /// is well under a microsecond), shorter than putting a thread to sleep
    /// and waking it, so a contended mutex is first spun on, as KVM's
    /// `mmu_lock` spins, before the thread blocks; then every shared
    /// holder is waited out.
    pub(crate) fn lock(&self) -> ExclusiveGuard<'_> {
        let mutex = spin_until(|| match self.mutex.try_lock() {
            Ok(guard) => Some(guard),
            // A panic under the lock is a bug that already failed its
            // thread; the state is still the best there is for teardown.
            Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        })
        .unwrap_or_else(|| self.mutex.lock().unwrap_or_else(|e| e.into_inner()));
        self.exclusive.0.store(true, Ordering::SeqCst);
        // SAFETY: holding the mutex, no other exclusive guard exists, and
        // shared holders only read the state; the vCPU list is changed
        // only by exclusive holders.
        let vcpus = unsafe { &(*self.state.get()).vcpus };
        for v in vcpus {
            // A shared holder is out within a fault's worth of work, unless
            // its thread was preempted: then give the CPU to it.
            while spin_until(|| (!v.reading.0.load(Ordering::SeqCst)).then_some(())).is_none() {
                std::thread::yield_now();
            }
        }
        ExclusiveGuard {
            lock: self,
            _mutex: mutex,
        }
    }

    /// Takes the lock shared for `vcpu`, a vCPU registered with the state,
    /// on its own thread. An exclusive holder is usually out again within
    /// a microsecond: it is waited for (reading its flag only, which takes
    /// no cache line from it) rather than queued behind on the mutex.
    /// `None` if the lock stays wanted exclusively: the caller takes it
    /// exclusively instead. The caller must not wait for anything while it
    /// holds the guard.
    pub(crate) fn read<'a>(&'a self, vcpu: &'a VcpuShared) -> Option<SharedGuard<'a>> {
        for _ in 0..2 {
            vcpu.reading.0.store(true, Ordering::SeqCst);
            if !self.exclusive.0.load(Ordering::SeqCst) {
                return Some(SharedGuard { lock: self, vcpu });
            }
            vcpu.reading.0.store(false, Ordering::Release);
            spin_until(|| (!self.exclusive.0.load(Ordering::Relaxed)).then_some(()))?;
        }
        None
    }
}

/// Calls `attempt` until it succeeds, pausing between calls, for a bounded
/// time; `None` if it never did. Waiting in the CPU beats sleeping for the
/// short waits of the MMU lock, but a spin of several thousand pause
/// instructions in a row makes a hypervisor with pause-loop exiting
/// deschedule the vCPU, so the budget stays well below that (about 1000
/// pauses, some 25 us where a pause takes 25 ns), with the pause between
/// attempts doubling up to 8.
fn spin_until<T>(mut attempt: impl FnMut() -> Option<T>) -> Option<T> {
    const BUDGET: u32 = 1000;
    let mut spent = 0u32;
    let mut pause = 1u32;
    loop {
        if let Some(done) = attempt() {
            return Some(done);
        }
        if spent >= BUDGET {
            return None;
        }
        for _ in 0..pause {
            std::hint::spin_loop();
        }
        spent += pause;
        pause = (pause * 2).min(8);
    }
}

/// The MMU lock held exclusively.
pub(crate) struct ExclusiveGuard<'a> {
    lock: &'a MmuLock,
    // Dropped after `Drop::drop` cleared the flag.
    _mutex: MutexGuard<'a, ()>,
}

impl Deref for ExclusiveGuard<'_> {
    type Target = MmuState;

    fn deref(&self) -> &MmuState {
        // SAFETY: see `MmuLock::lock`: this guard is the only one.
        unsafe { &*self.lock.state.get() }
    }
}

impl DerefMut for ExclusiveGuard<'_> {
    fn deref_mut(&mut self) -> &mut MmuState {
        // SAFETY: see `MmuLock::lock`: this guard is the only one, and
        // `&mut self` makes the reference unique.
        unsafe { &mut *self.lock.state.get() }
    }
}

impl Drop for ExclusiveGuard<'_> {
    fn drop(&mut self) {
        // Release: a shared holder that sees the flag clear sees every
        // change made under this guard.
        self.lock.exclusive.0.store(false, Ordering::Release);
    }
}

/// The MMU lock held shared by one vCPU.
pub(crate) struct SharedGuard<'a> {
    lock: &'a MmuLock,
    vcpu: &'a VcpuShared,
}

impl Deref for SharedGuard<'_> {
    type Target = MmuState;

    fn deref(&self) -> &MmuState {
        // SAFETY: see `MmuLock::read`: no exclusive guard exists while the
        // vCPU's flag is set and the exclusive flag was seen clear.
        unsafe { &*self.lock.state.get() }
    }
}

impl Drop for SharedGuard<'_> {
    fn drop(&mut self) {
        // Release: an exclusive holder that sees the flag clear sees every
        // entry this holder filled.
        self.vcpu.reading.0.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

    use mmu_api::{Hpa, VcpuId};

    use super::MmuLock;
    use crate::ShadowConfig;
    use crate::pool::ShadowPool;
    use crate::soft::NoKick;
    use crate::state::MmuState;
    use crate::vcpu::VcpuShared;

    fn vcpu(id: u32) -> Arc<VcpuShared> {
        Arc::new(VcpuShared {
            id: VcpuId(id),
            requests: AtomicU32::new(0),
            in_guest: AtomicBool::new(false),
            reading: Default::default(),
            kick: Arc::new(NoKick),
            stats: Default::default(),
        })
    }

    /// Two vCPU threads take the lock shared over and over while a third
    /// takes it exclusively, until each kind has had many holds: no shared
    /// holder is ever inside while the exclusive one is, and the last
    /// exclusive holder leaves no shared flag set.
    #[test]
    fn shared_and_exclusive_holders_never_overlap() {
        const HOLDS: u64 = 5_000;
        let pool = ShadowPool::new(16, Hpa(1 << 40)).unwrap();
        let mut state = MmuState::new(&ShadowConfig::default(), pool);
        let vcpus = [vcpu(0), vcpu(1)];
        for v in &vcpus {
            state.register_vcpu(v.clone());
        }
        let lock = MmuLock::new(state);
        let inside = AtomicU64::new(0);
        let writer_in = AtomicBool::new(false);
        let shared_holds = AtomicU64::new(0);
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            for v in &vcpus {
                let (lock, inside, writer_in) = (&lock, &inside, &writer_in);
                let (shared_holds, stop) = (&shared_holds, &stop);
                s.spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        if let Some(st) = lock.read(v) {
                            inside.fetch_add(1, Ordering::SeqCst);
                            for _ in 0..20 {
                                assert!(
                                    !writer_in.load(Ordering::SeqCst),
                                    "shared inside exclusive"
                                );
                                std::hint::spin_loop();
                            }
                            // The exclusive holder leaves the page limit
                            // even; it is odd only while it is inside.
                            assert_eq!(st.page_limit.unwrap_or(0) % 2, 0);
                            inside.fetch_sub(1, Ordering::SeqCst);
                            shared_holds.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                });
            }
            let mut exclusive = 0u64;
            while exclusive < HOLDS || shared_holds.load(Ordering::SeqCst) < HOLDS {
                let mut st = lock.lock();
                writer_in.store(true, Ordering::SeqCst);
                let limit = st.page_limit.unwrap_or(0);
                st.page_limit = Some(limit + 1);
                // Stay in long enough for a shared holder that ignored the
                // exclusive holder to be caught inside.
                for _ in 0..50 {
                    assert_eq!(inside.load(Ordering::SeqCst), 0, "exclusive inside shared");
                    std::hint::spin_loop();
                }
                std::hint::black_box(&mut st.page_limit);
                st.page_limit = Some(limit + 2);
                writer_in.store(false, Ordering::SeqCst);
                drop(st);
                exclusive += 1;
            }
            stop.store(true, Ordering::SeqCst);
        });
        assert!(vcpus.iter().all(|v| !v.reading.0.load(Ordering::SeqCst)));
    }
}
